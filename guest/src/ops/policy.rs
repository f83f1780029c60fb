//! The path policy: which absolute paths file operations may touch.
//!
//! A path is resolved before it is judged: the longest existing prefix is canonicalised (so
//! symlinks and `..` in it are followed the way the kernel would follow them) and the rest is
//! appended lexically (and may not contain `..`). The resolved path must lie under an allowed
//! prefix (none configured: nothing is allowed) and under no denied prefix. Prefixes are
//! resolved the same way, so `/var/run` and `/run` name the same place. Operations then use the
//! resolved path, so a symlink cannot lead them out of an allowed prefix or into a denied one.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use qx_proto::agent::ErrorCode;

use super::{OpError, OpResult};

/// Allowed and denied path prefixes. An empty allow list allows nothing (fail closed).
#[derive(Debug, Clone)]
pub struct PathPolicy {
    allow: Vec<PathBuf>,
    deny: Vec<PathBuf>,
}

impl PathPolicy {
    pub fn new(allow: Vec<PathBuf>, deny: Vec<PathBuf>) -> Self {
        PathPolicy { allow, deny }
    }

    /// A policy that allows every path (allow "/", deny nothing).
    pub fn allow_all() -> Self {
        PathPolicy::new(vec![PathBuf::from("/")], Vec::new())
    }

    /// Resolves `path` following every symlink (including the last component) and checks it.
    pub fn check(&self, path: &str) -> OpResult<PathBuf> {
        let resolved = resolve(validate(path)?)?;
        self.judge(path, &resolved)?;
        Ok(resolved)
    }

    /// Resolves `path` without following its last component (for lstat, delete) and checks
    /// it: the parent directory is resolved, the last component is kept as given.
    pub fn check_nofollow(&self, path: &str) -> OpResult<PathBuf> {
        let p = validate(path)?;
        let resolved = match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => resolve(parent)?.join(name),
            // "/" itself, or a path ending in "..": nothing to keep unresolved.
            _ => resolve(p)?,
        };
        self.judge(path, &resolved)?;
        Ok(resolved)
    }

    /// True when `resolved` (an already resolved path) lies under a denied prefix, or a denied
    /// prefix lies under it (a recursive operation on it would reach denied ground).
    pub fn reaches_denied(&self, resolved: &Path) -> bool {
        self.deny.iter().any(|d| {
            let d = resolve_prefix(d);
            resolved.starts_with(&d) || d.starts_with(resolved)
        })
    }

    /// True when `resolved` lies under a denied prefix.
    pub fn is_denied(&self, resolved: &Path) -> bool {
        self.resolved_deny().iter().any(|d| resolved.starts_with(d))
    }

    /// The denied prefixes, resolved (for checking many entries of one directory).
    pub fn resolved_deny(&self) -> Vec<PathBuf> {
        self.deny.iter().map(|d| resolve_prefix(d)).collect()
    }

    fn judge(&self, requested: &str, resolved: &Path) -> OpResult<()> {
        let shown = if Path::new(requested) == resolved {
            requested.to_string()
        } else {
            format!("{requested} (resolved to {})", resolved.display())
        };
        if let Some(d) = self
            .deny
            .iter()
            .find(|d| resolved.starts_with(resolve_prefix(d)))
        {
            return Err(OpError::new(
                ErrorCode::PolicyDenied,
                format!("{shown} is under the denied prefix {}", d.display()),
            ));
        }
        if !self
            .allow
            .iter()
            .any(|a| resolved.starts_with(resolve_prefix(a)))
        {
            return Err(OpError::new(
                ErrorCode::PolicyDenied,
                format!("{shown} is not under any allowed prefix"),
            ));
        }
        Ok(())
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

/// Canonicalises the longest existing prefix of `p` and appends the rest lexically.
fn resolve(p: &Path) -> OpResult<PathBuf> {
    let mut base = p;
    let mut rest: Vec<&OsStr> = Vec::new();
    loop {
        match std::fs::canonicalize(base) {
            Ok(mut resolved) => {
                for part in rest.iter().rev() {
                    resolved.push(part);
                }
                return Ok(resolved);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Missing, or a symlink to something missing: the latter could be made to
                // point anywhere later, so it is refused rather than walked lexically.
                if std::fs::symlink_metadata(base).is_ok() {
                    return Err(OpError::new(
                        ErrorCode::PolicyDenied,
                        format!("{}: {} is a dangling symlink", p.display(), base.display()),
                    ));
                }
            }
            Err(e) => return Err(OpError::io(&p.display().to_string(), &e)),
        }
        match base.components().next_back() {
            Some(Component::Normal(name)) => rest.push(name),
            Some(Component::CurDir) => {}
            Some(Component::ParentDir) => {
                return Err(OpError::new(
                    ErrorCode::InvalidArgument,
                    format!("{}: '..' after a missing directory", p.display()),
                ))
            }
            _ => {
                return Err(OpError::new(
                    ErrorCode::NotFound,
                    format!("{}: cannot resolve", p.display()),
                ))
            }
        }
        base = match base.parent() {
            Some(parent) => parent,
            None => {
                return Err(OpError::new(
                    ErrorCode::NotFound,
                    format!("{}: cannot resolve", p.display()),
                ))
            }
        };
    }
}

/// A configured prefix, resolved like a requested path (unresolvable prefixes stay as given).
fn resolve_prefix(p: &Path) -> PathBuf {
    resolve(p).unwrap_or_else(|_| p.to_path_buf())
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

    #[test]
    fn allows_existing_and_missing_paths_under_an_allowed_prefix() {
        let t = Tree::new("allow");
        let pol = t.policy();
        assert_eq!(pol.check(&t.s("allowed/sub")).unwrap(), t.p("allowed/sub"));
        assert_eq!(
            pol.check(&t.s("allowed/new/deeper/file")).unwrap(),
            t.p("allowed/new/deeper/file")
        );
        assert_eq!(
            pol.check(&t.s("allowed/sub/../sub/./x")).unwrap(),
            t.p("allowed/sub/x")
        );
    }

    #[test]
    fn refuses_paths_outside_allowed_and_inside_denied_prefixes() {
        let t = Tree::new("deny");
        let pol = t.policy();
        let e = pol.check(&t.s("outside/file")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("not under any allowed prefix"), "{e}");
        let e = pol.check(&t.s("allowed/secret/key")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("denied prefix"), "{e}");
        // `..` climbing out is resolved before judging.
        let e = pol
            .check(&t.s("allowed/sub/../../outside/file"))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
    }

    #[test]
    fn a_symlink_cannot_escape_an_allowed_prefix_or_enter_a_denied_one() {
        let t = Tree::new("symlink");
        symlink(t.p("outside"), t.p("allowed/escape")).unwrap();
        symlink(t.p("allowed/secret"), t.p("allowed/sneak")).unwrap();
        let pol = t.policy();
        let e = pol.check(&t.s("allowed/escape/file")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("resolved to"), "{e}");
        let e = pol.check(&t.s("allowed/escape/newfile")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        let e = pol.check(&t.s("allowed/sneak/key")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        // Following the last component: denied. Not following it: the link itself is fine.
        assert_eq!(
            pol.check(&t.s("allowed/escape")).unwrap_err().code,
            ErrorCode::PolicyDenied
        );
        assert_eq!(
            pol.check_nofollow(&t.s("allowed/escape")).unwrap(),
            t.p("allowed/escape")
        );
    }

    #[test]
    fn a_dangling_symlink_on_the_way_is_refused() {
        let t = Tree::new("dangling");
        symlink(t.p("outside/not-yet"), t.p("allowed/later")).unwrap();
        let pol = t.policy();
        let e = pol.check(&t.s("allowed/later/file")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("dangling symlink"), "{e}");
        assert_eq!(
            pol.check_nofollow(&t.s("allowed/later")).unwrap(),
            t.p("allowed/later")
        );
    }

    #[test]
    fn a_symlinked_allowed_prefix_still_matches_its_target() {
        let t = Tree::new("prefix-link");
        symlink(t.p("allowed"), t.p("alias")).unwrap();
        let pol = PathPolicy::new(vec![t.p("alias")], vec![]);
        assert_eq!(pol.check(&t.s("allowed/sub")).unwrap(), t.p("allowed/sub"));
        assert_eq!(
            pol.check(&t.s("outside")).unwrap_err().code,
            ErrorCode::PolicyDenied
        );
    }

    #[test]
    fn rejects_relative_empty_and_nul_paths() {
        let pol = PathPolicy::allow_all();
        for bad in ["", "relative/path", "a\0b", "/tmp/x\0"] {
            assert_eq!(
                pol.check(bad).unwrap_err().code,
                ErrorCode::InvalidArgument,
                "{bad:?}"
            );
        }
        assert_eq!(pol.check("/").unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn an_empty_allow_list_allows_nothing() {
        let pol = PathPolicy::new(vec![], vec![]);
        let e = pol.check("/tmp").unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
    }

    #[test]
    fn reaches_denied_sees_denied_ground_below_a_directory() {
        let t = Tree::new("reach");
        let pol = t.policy();
        assert!(pol.reaches_denied(&t.p("allowed")));
        assert!(!pol.reaches_denied(&t.p("allowed/sub")));
    }
}
