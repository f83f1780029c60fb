//! The path policy: which absolute paths file operations may touch, and the descriptors
//! through which they touch them.
//!
//! A request path is never resolved in user space and then used by name (a guest user could
//! swap a component for a symlink in between). Instead:
//! - the request path is matched lexically against the allowed prefixes (each also in its
//!   canonical form, so `/var/run/x` matches an allowed `/run`); none matching: refused;
//! - the prefix is opened (prefixes are the operator's, trusted), and the rest of the path is
//!   opened beneath it by descriptor ([`crate::sys::open_beneath`]): nothing leaves the prefix
//!   (`..` above it and absolute symlinks are refused, except under `/`), only root's
//!   symlinks are followed on the way, and a last component that is a symlink is refused
//!   unless the caller follows it on purpose;
//! - what was opened is judged against the denied prefixes by where the kernel says it is
//!   (`/proc/self/fd`), and the operation then works on the descriptor (or, for a new or
//!   removed name, relative to the opened parent directory).

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use qx_proto::agent::ErrorCode;

use super::{OpError, OpResult};
use crate::sys::{self, Beneath, UntrustedSymlink};

/// Allowed and denied path prefixes. An empty allow list allows nothing (fail closed).
#[derive(Debug, Clone)]
pub struct PathPolicy {
    allow: Vec<PathBuf>,
    deny: Vec<PathBuf>,
}

/// A request path, opened.
#[derive(Debug)]
pub struct Opened {
    pub fd: OwnedFd,
    /// Where the kernel says the opened object is.
    pub real: PathBuf,
}

/// The parent directory of a request path, opened (O_PATH), and the path's last component:
/// for operations on a name that may not exist yet or that must not be followed.
#[derive(Debug)]
pub struct Parent {
    pub dir: OwnedFd,
    pub name: OsString,
    /// Where the kernel says the parent is, joined with `name`.
    pub real: PathBuf,
}

/// A request path split at the allowed prefix it lies under.
struct Rooted<'a> {
    requested: &'a str,
    prefix: PathBuf,
    root: OwnedFd,
    rel: PathBuf,
    in_root: bool,
}

impl PathPolicy {
    pub fn new(allow: Vec<PathBuf>, deny: Vec<PathBuf>) -> Self {
        PathPolicy { allow, deny }
    }

    /// A policy that allows every path (allow "/", deny nothing).
    pub fn allow_all() -> Self {
        PathPolicy::new(vec![PathBuf::from("/")], Vec::new())
    }

    /// Opens `path` with `flags` (O_CLOEXEC is added). With `follow_last` a last component
    /// that is a root-owned symlink is followed (its target must lie beneath the same
    /// prefix); without it a symlink there is refused, or with O_PATH opened itself.
    pub fn open(&self, path: &str, flags: libc::c_int, follow_last: bool) -> OpResult<Opened> {
        let r = self.rooted(path)?;
        let fd = sys::open_beneath(
            r.root.as_fd(),
            &r.rel,
            flags,
            Beneath {
                in_root: r.in_root,
                follow_last,
            },
        )
        .map_err(|e| r.error(&e, follow_last))?;
        let real = self.real_path(path, &fd)?;
        self.judge_denied(path, &real)?;
        Ok(Opened { fd, real })
    }

    /// Opens the parent directory of `path` (creating missing directories, mode
    /// `parents_mode`, when it is `Some`) and returns it with the last component, which is
    /// not looked at. `path` must name something below an allowed prefix.
    pub fn open_parent(&self, path: &str, parents_mode: Option<u32>) -> OpResult<Parent> {
        let r = self.rooted(path)?;
        let (Some(parent_rel), Some(Component::Normal(name))) =
            (r.rel.parent(), r.rel.components().next_back())
        else {
            // "/" itself, or an allowed prefix itself: things below it may change, not it.
            let code = if r.rel.as_os_str().is_empty() && r.prefix != Path::new("/") {
                ErrorCode::PolicyDenied
            } else {
                ErrorCode::InvalidArgument
            };
            return Err(OpError::new(
                code,
                format!(
                    "{path} names no entry below the allowed prefix {}",
                    r.prefix.display()
                ),
            ));
        };
        let name = name.to_os_string();
        let dir = match self.open_dir(&r, parent_rel) {
            Err(e) if e.code == ErrorCode::NotFound => match parents_mode {
                Some(mode) => self.make_dirs(&r, parent_rel, mode)?,
                None => {
                    return Err(OpError::new(
                        ErrorCode::NotFound,
                        format!(
                            "{path}: directory {} does not exist",
                            Path::new(path).parent().unwrap_or(Path::new("/")).display()
                        ),
                    ))
                }
            },
            other => other?,
        };
        let real = self.real_path(path, &dir)?.join(&name);
        self.judge_denied(path, &real)?;
        Ok(Parent { dir, name, real })
    }

    /// True when `real` lies under a denied prefix, or a denied prefix lies under it (a
    /// recursive operation on it would reach denied ground).
    pub fn reaches_denied(&self, real: &Path) -> bool {
        self.resolved_deny()
            .iter()
            .any(|d| real.starts_with(d) || d.starts_with(real))
    }

    /// The denied prefixes, resolved (for checking many entries of one directory).
    pub fn resolved_deny(&self) -> Vec<PathBuf> {
        self.deny.iter().map(|d| resolve_prefix(d)).collect()
    }

    fn rooted<'a>(&self, path: &'a str) -> OpResult<Rooted<'a>> {
        let p = validate(path)?;
        if let Some(d) = self.deny.iter().find(|d| p.starts_with(d)) {
            return Err(denied(path, p, d));
        }
        // Every allowed prefix allows all below it: the one with the fewest components
        // gives the widest room for `..` and symlinks.
        let mut forms: Vec<PathBuf> = self
            .allow
            .iter()
            .flat_map(|a| [a.clone(), resolve_prefix(a)])
            .filter(|a| p.starts_with(a))
            .collect();
        forms.sort_by_key(|a| a.components().count());
        let Some(prefix) = forms.into_iter().next() else {
            return Err(OpError::new(
                ErrorCode::PolicyDenied,
                format!("{path} is not under any allowed prefix"),
            ));
        };
        let rel = p
            .strip_prefix(&prefix)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let root = sys::open_dir_path(&prefix)
            .map_err(|e| OpError::io(&format!("allowed prefix {}", prefix.display()), &e))?;
        Ok(Rooted {
            requested: path,
            in_root: prefix == Path::new("/"),
            prefix,
            root,
            rel,
        })
    }

    fn open_dir(&self, r: &Rooted<'_>, rel: &Path) -> OpResult<OwnedFd> {
        sys::open_beneath(
            r.root.as_fd(),
            rel,
            libc::O_PATH | libc::O_DIRECTORY,
            Beneath {
                in_root: r.in_root,
                follow_last: true,
            },
        )
        .map_err(|e| r.error(&e, true))
    }

    /// mkdir -p of `rel` beneath the root, one component at a time, each created relative
    /// to its opened parent.
    fn make_dirs(&self, r: &Rooted<'_>, rel: &Path, mode: u32) -> OpResult<OwnedFd> {
        let mut walked = PathBuf::new();
        let mut dir = self.open_dir(r, Path::new(""))?;
        for c in rel.components() {
            walked.push(c);
            dir = match self.open_dir(r, &walked) {
                Err(e) if e.code == ErrorCode::NotFound => {
                    let Component::Normal(name) = c else {
                        return Err(e);
                    };
                    match sys::mkdirat(dir.as_fd(), name, mode) {
                        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                            return Err(OpError::io(r.requested, &e))
                        }
                        _ => {}
                    }
                    self.open_dir(r, &walked)?
                }
                other => other?,
            };
        }
        Ok(dir)
    }

    /// Where the kernel says `fd` is. Without /proc that cannot be told, which matters only
    /// when there are denied prefixes to judge it against.
    fn real_path(&self, path: &str, fd: &OwnedFd) -> OpResult<PathBuf> {
        match sys::fd_path(fd.as_fd()) {
            Ok(p) => Ok(p),
            Err(_) if self.deny.is_empty() => Ok(PathBuf::from(path)),
            Err(e) => Err(OpError::new(
                ErrorCode::PolicyDenied,
                format!("{path}: cannot tell where it is to judge it against file_deny ({e})"),
            )),
        }
    }

    fn judge_denied(&self, requested: &str, real: &Path) -> OpResult<()> {
        match self
            .deny
            .iter()
            .find(|d| real.starts_with(resolve_prefix(d)))
        {
            Some(d) => Err(denied(requested, real, d)),
            None => Ok(()),
        }
    }
}

fn denied(requested: &str, real: &Path, d: &Path) -> OpError {
    let shown = if Path::new(requested) == real {
        requested.to_string()
    } else {
        format!("{requested} (resolved to {})", real.display())
    };
    OpError::new(
        ErrorCode::PolicyDenied,
        format!("{shown} is under the denied prefix {}", d.display()),
    )
}

impl Rooted<'_> {
    /// The clear error for a failed resolution beneath the prefix.
    fn error(&self, e: &std::io::Error, follow_last: bool) -> OpError {
        let path = self.requested;
        if let Some(u) = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<UntrustedSymlink>())
        {
            return OpError::new(ErrorCode::PolicyDenied, format!("{path}: {u}"));
        }
        match e.raw_os_error() {
            Some(libc::EXDEV) => OpError::new(
                ErrorCode::PolicyDenied,
                format!(
                    "{path} leads outside the allowed prefix {} (through '..' or an absolute symlink)",
                    self.prefix.display()
                ),
            ),
            Some(libc::ELOOP) if !follow_last => OpError::new(
                ErrorCode::PolicyDenied,
                format!("{path} is a symlink; refusing to follow it"),
            ),
            Some(libc::ELOOP) => OpError::new(
                ErrorCode::PolicyDenied,
                format!("{path}: too many symlinks"),
            ),
            _ => OpError::io(path, e),
        }
    }
}

fn validate(path: &str) -> OpResult<&Path> {
    if path.is_empty() {
        return Err(OpError::new(ErrorCode::InvalidArgument, "path is empty"));
    }
    if path.contains('\0') {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            "path contains a NUL byte",
        ));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("{path} is not an absolute path"),
        ));
    }
    Ok(p)
}

/// A configured prefix, canonicalised (one that cannot be stays as given).
fn resolve_prefix(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::os::unix::fs::symlink;

    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Tree {
            let root = std::env::temp_dir().join(format!(
                "qx-policy-{tag}-{}-{}",
                std::process::id(),
                crate::sys::random_u64().unwrap()
            ));
            std::fs::create_dir_all(root.join("allowed/sub")).unwrap();
            std::fs::create_dir_all(root.join("allowed/secret")).unwrap();
            std::fs::create_dir_all(root.join("outside")).unwrap();
            std::fs::write(root.join("outside/file"), b"x").unwrap();
            Tree(std::fs::canonicalize(root).unwrap())
        }
        fn p(&self, rel: &str) -> PathBuf {
            self.0.join(rel)
        }
        fn s(&self, rel: &str) -> String {
            self.p(rel).display().to_string()
        }
        fn policy(&self) -> PathPolicy {
            PathPolicy::new(vec![self.p("allowed")], vec![self.p("allowed/secret")])
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(pol: &PathPolicy, path: &str) -> OpResult<PathBuf> {
        pol.open(path, libc::O_PATH, false).map(|o| o.real)
    }

    #[test]
    fn allows_existing_and_missing_paths_under_an_allowed_prefix() {
        let t = Tree::new("allow");
        let pol = t.policy();
        assert_eq!(open(&pol, &t.s("allowed/sub")).unwrap(), t.p("allowed/sub"));
        let e = pol
            .open_parent(&t.s("allowed/new/deeper/file"), None)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        let parent = pol
            .open_parent(&t.s("allowed/new/deeper/file"), Some(0o755))
            .unwrap();
        assert_eq!(parent.real, t.p("allowed/new/deeper/file"));
        assert_eq!(parent.name, "file");
        assert!(t.p("allowed/new/deeper").is_dir());
        assert_eq!(
            pol.open_parent(&t.s("allowed/sub/../sub/./x"), None)
                .unwrap()
                .real,
            t.p("allowed/sub/x")
        );
        // The prefix itself can be opened, but it has no parent under it.
        assert_eq!(open(&pol, &t.s("allowed")).unwrap(), t.p("allowed"));
        assert_eq!(
            pol.open_parent(&t.s("allowed"), None).unwrap_err().code,
            ErrorCode::PolicyDenied
        );
    }

    #[test]
    fn refuses_paths_outside_allowed_and_inside_denied_prefixes() {
        let t = Tree::new("deny");
        let pol = t.policy();
        let e = open(&pol, &t.s("outside/file")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("not under any allowed prefix"), "{e}");
        let e = open(&pol, &t.s("allowed/secret/key")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("denied prefix"), "{e}");
        // `..` climbing out is refused by the resolution beneath the prefix.
        let e = open(&pol, &t.s("allowed/sub/../../outside/file")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("leads outside"), "{e}");
    }

    #[test]
    fn a_symlink_cannot_escape_an_allowed_prefix_or_enter_a_denied_one() {
        let t = Tree::new("symlink");
        symlink(t.p("outside"), t.p("allowed/escape")).unwrap();
        symlink("../outside", t.p("allowed/climb")).unwrap();
        symlink("secret", t.p("allowed/sneak")).unwrap();
        let pol = t.policy();
        for via in [
            "allowed/escape/file",
            "allowed/escape/newfile",
            "allowed/climb/file",
        ] {
            let e = open(&pol, &t.s(via)).unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyDenied, "{via}");
            assert!(e.message.contains("leads outside"), "{e}");
        }
        // A root-owned link inside the prefix is followed, and judged where it leads.
        let e = pol
            .open_parent(&t.s("allowed/sneak/key"), None)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("resolved to"), "{e}");
        // The last component: refused when followed without being asked to...
        let e = pol
            .open(&t.s("allowed/escape"), libc::O_RDONLY, false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("is a symlink"), "{e}");
        // ... opened itself with O_PATH, and followed when asked only if it stays inside.
        assert_eq!(
            open(&pol, &t.s("allowed/escape")).unwrap(),
            t.p("allowed/escape")
        );
        assert_eq!(
            pol.open(&t.s("allowed/escape"), libc::O_PATH, true)
                .unwrap_err()
                .code,
            ErrorCode::PolicyDenied
        );
        symlink("sub", t.p("allowed/alias")).unwrap();
        assert_eq!(
            pol.open(&t.s("allowed/alias"), libc::O_PATH, true)
                .unwrap()
                .real,
            t.p("allowed/sub")
        );
    }

    #[test]
    fn a_symlinked_allowed_prefix_still_matches_its_target() {
        let t = Tree::new("prefix-link");
        symlink(t.p("allowed"), t.p("alias")).unwrap();
        let pol = PathPolicy::new(vec![t.p("alias")], vec![]);
        assert_eq!(open(&pol, &t.s("allowed/sub")).unwrap(), t.p("allowed/sub"));
        assert_eq!(open(&pol, &t.s("alias/sub")).unwrap(), t.p("allowed/sub"));
        assert_eq!(
            open(&pol, &t.s("outside")).unwrap_err().code,
            ErrorCode::PolicyDenied
        );
    }

    #[test]
    fn rejects_relative_empty_and_nul_paths() {
        let pol = PathPolicy::allow_all();
        for bad in ["", "relative/path", "a\0b", "/tmp/x\0"] {
            assert_eq!(
                open(&pol, bad).unwrap_err().code,
                ErrorCode::InvalidArgument,
                "{bad:?}"
            );
        }
        assert_eq!(open(&pol, "/").unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn an_empty_allow_list_allows_nothing() {
        let pol = PathPolicy::new(vec![], vec![]);
        let e = open(&pol, "/tmp").unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
    }

    #[test]
    fn reaches_denied_sees_denied_ground_below_a_directory() {
        let t = Tree::new("reach");
        let pol = t.policy();
        assert!(pol.reaches_denied(&t.p("allowed")));
        assert!(!pol.reaches_denied(&t.p("allowed/sub")));
    }

    /// The component walk (the resolver of kernels without openat2) keeps the same rules.
    #[test]
    fn the_component_walk_stays_beneath_and_follows_only_roots_links() {
        use crate::sys::{walk_for_tests, Beneath};
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let t = Tree::new("walk");
        symlink(t.p("outside"), t.p("allowed/escape")).unwrap();
        symlink("sub", t.p("allowed/alias")).unwrap();
        symlink("alias/../sub", t.p("allowed/twice")).unwrap();
        symlink("sub", t.p("allowed/users")).unwrap();
        std::os::unix::fs::lchown(t.p("allowed/users"), Some(65534), Some(65534)).unwrap();
        let root = sys::open_dir_path(&t.p("allowed")).unwrap();
        let walk = |rel: &str, flags, follow_last| {
            walk_for_tests(
                root.as_fd(),
                Path::new(rel),
                flags,
                Beneath {
                    in_root: false,
                    follow_last,
                },
            )
        };
        let ino = |fd: OwnedFd| std::fs::File::from(fd).metadata().unwrap().ino();
        let sub = std::fs::metadata(t.p("allowed/sub")).unwrap().ino();
        assert_eq!(ino(walk("sub", libc::O_PATH, false).unwrap()), sub);
        assert_eq!(ino(walk("alias", libc::O_RDONLY, true).unwrap()), sub);
        assert_eq!(ino(walk("twice", libc::O_RDONLY, true).unwrap()), sub);
        assert_eq!(
            ino(walk("", libc::O_RDONLY, false).unwrap()),
            ino(root.try_clone().unwrap())
        );
        let errno = |r: std::io::Result<OwnedFd>| r.unwrap_err().raw_os_error();
        assert_eq!(
            errno(walk("alias", libc::O_RDONLY, false)),
            Some(libc::ELOOP)
        );
        assert_eq!(
            errno(walk("escape/file", libc::O_RDONLY, false)),
            Some(libc::EXDEV)
        );
        assert_eq!(
            errno(walk("sub/../..", libc::O_RDONLY, false)),
            Some(libc::EXDEV)
        );
        let e = walk("users/x", libc::O_RDONLY, false).unwrap_err();
        assert!(e.get_ref().unwrap().is::<UntrustedSymlink>(), "{e}");
        // O_PATH without following: the link itself.
        let link = std::fs::File::from(walk("escape", libc::O_PATH, false).unwrap());
        assert!(link.metadata().unwrap().file_type().is_symlink());
    }
}
