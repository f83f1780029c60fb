//! Descriptor-relative filesystem calls: every operation on a path a guest user can change
//! starts from a directory descriptor and names one component at a time, so nothing is
//! resolved twice and a symlink planted between a check and a use cannot redirect the use.
//! Part of [`crate::sys`], re-exported there.
//!
//! [`open_beneath`] resolves a relative path under a directory descriptor the way
//! `openat2(2)` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` does (Linux 5.6+), or, on
//! older kernels, by walking it component by component with `O_PATH | O_NOFOLLOW` and
//! expanding each symlink's text itself. [`resolver`] says which one this kernel gets; it is
//! decided once.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// How [`open_beneath`] resolves paths on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// openat2(2) with RESOLVE_BENEATH (or RESOLVE_IN_ROOT) and RESOLVE_NO_MAGICLINKS.
    Openat2,
    /// openat(2) one component at a time with O_PATH|O_NOFOLLOW (kernels before 5.6).
    Walk,
}

impl Resolver {
    pub fn describe(self) -> &'static str {
        match self {
            Resolver::Openat2 => "openat2 (RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS)",
            Resolver::Walk => "component walk (O_PATH|O_NOFOLLOW; openat2 is missing)",
        }
    }
}

static RESOLVER: OnceLock<Resolver> = OnceLock::new();

/// The resolver this kernel gets: openat2 unless it answers ENOSYS (or is filtered with
/// EPERM, as some seccomp profiles do). Probed once.
pub fn resolver() -> Resolver {
    *RESOLVER.get_or_init(
        || match openat2(None, c"/", libc::O_PATH | libc::O_DIRECTORY, 0) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
                Resolver::Walk
            }
            _ => Resolver::Openat2,
        },
    )
}

/// The component walk of [`open_beneath`] whatever the kernel has (tests of the fallback).
#[cfg(test)]
pub fn walk_for_tests(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: libc::c_int,
    opts: Beneath,
) -> io::Result<OwnedFd> {
    walk(root, rel, flags, opts)
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// struct open_how of linux/openat2.h (libc's is non-exhaustive, so it cannot be built).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// openat2(2) without O_CREAT (so no mode), close-on-exec.
fn openat2(
    dir: Option<BorrowedFd<'_>>,
    path: &CStr,
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    loop {
        // SAFETY: `path` is NUL-terminated and `how` is an open_how (three u64, repr(C)) whose
        // size is passed; both outlive the call, which only reads them.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if ret >= 0 {
            // SAFETY: the syscall returned a fresh fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
        }
        let e = io::Error::last_os_error();
        // EAGAIN: a concurrent rename made the kernel unsure `..` stayed beneath; retry.
        if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
            return Err(e);
        }
    }
}

/// openat(2) of one component `name` (no `/`) of `dir`, close-on-exec.
pub fn openat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    let c = c_name(name)?;
    loop {
        // SAFETY: `c` is NUL-terminated and outlives the call; `dir` is an open fd.
        let ret = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if ret >= 0 {
            // SAFETY: openat returned a fresh fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(ret) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// An `O_PATH` descriptor of the directory `path`, following symlinks (for configured,
/// trusted prefixes only).
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = c_name(path.as_os_str())?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Options of [`open_beneath`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Beneath {
    /// `..` at the root stays at the root and an absolute symlink restarts there
    /// (RESOLVE_IN_ROOT: for a root that is `/` itself, where that is ordinary resolution).
    /// Otherwise both are refused with EXDEV.
    pub in_root: bool,
    /// Follow a symlink in the last component. Otherwise the last component is opened with
    /// O_NOFOLLOW: ELOOP for a symlink, or the link itself with O_PATH.
    pub follow_last: bool,
}

/// A symlink the resolution refused to follow because root does not own it (see
/// [`open_beneath`]); carried inside an `io::Error` of kind `PermissionDenied`.
#[derive(Debug)]
pub struct UntrustedSymlink {
    pub owner: u32,
}

impl std::fmt::Display for UntrustedSymlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a symlink on the way is owned by uid {}; only root's symlinks are followed",
            self.owner
        )
    }
}

impl std::error::Error for UntrustedSymlink {}

/// Opens `rel` (relative; empty means the root itself) beneath `root` with `flags`.
///
/// No step leaves `root`: `..` above it and absolute symlinks give EXDEV (unless
/// `in_root`). Only symlinks owned by root are followed, whatever their directory: a
/// symlink a guest user made is refused (a stricter form of the kernel's
/// `fs.protected_symlinks`, which the agent must not depend on). Magic links
/// (/proc/PID/fd/N and the like) are never followed as links; a root-owned one is read as
/// text like any other.
///
/// With openat2 a path without symlinks is resolved by the kernel in one call
/// (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS); a path with one, and
/// every path on kernels without openat2, is walked a component at a time.
pub fn open_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: libc::c_int,
    opts: Beneath,
) -> io::Result<OwnedFd> {
    if resolver() == Resolver::Openat2 {
        let path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let scope = if opts.in_root {
            libc::RESOLVE_IN_ROOT
        } else {
            libc::RESOLVE_BENEATH
        };
        let nofollow = if opts.follow_last {
            0
        } else {
            libc::O_NOFOLLOW
        };
        match openat2(
            Some(root),
            &c_name(path.as_os_str())?,
            flags | nofollow,
            scope | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        ) {
            // A symlink somewhere: the walk decides whether it may be followed.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {}
            other => return other,
        }
    }
    walk(root, rel, flags, opts)
}

/// Symlinks expanded in one walk before it gives up, as the kernel's own limit.
const MAX_SYMLINKS: usize = 40;

fn errno(n: libc::c_int) -> io::Error {
    io::Error::from_raw_os_error(n)
}

/// What one step of the walk found.
enum Step {
    /// The component, opened (a directory as O_PATH, the last one with the caller's flags).
    Opened(OwnedFd),
    /// A symlink: an O_PATH descriptor of the link itself and its owner.
    Link(OwnedFd, u32),
}

fn meta(fd: &OwnedFd) -> io::Result<std::fs::Metadata> {
    std::fs::File::from(fd.try_clone()?).metadata()
}

/// Opens `name` in `cur` without following it: the last component with `flags`, others as
/// O_PATH directories; a symlink is reported as such.
fn step(cur: BorrowedFd<'_>, name: &OsStr, last: bool, flags: libc::c_int) -> io::Result<Step> {
    use std::os::unix::fs::MetadataExt;
    let link = |e: io::Error| -> io::Result<Step> {
        let fd = openat(cur, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let m = meta(&fd)?;
        if m.file_type().is_symlink() {
            Ok(Step::Link(fd, m.uid()))
        } else {
            Err(e)
        }
    };
    if last && flags & libc::O_PATH == 0 {
        return match openat(cur, name, flags | libc::O_NOFOLLOW, 0) {
            Ok(fd) => Ok(Step::Opened(fd)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                link(e)
            }
            Err(e) => Err(e),
        };
    }
    let fd = openat(cur, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    let m = meta(&fd)?;
    if m.file_type().is_symlink() {
        return Ok(Step::Link(fd, m.uid()));
    }
    if !last && !m.is_dir() {
        return Err(errno(libc::ENOTDIR));
    }
    if last && flags & libc::O_DIRECTORY != 0 && !m.is_dir() {
        return Err(errno(libc::ENOTDIR));
    }
    Ok(Step::Opened(fd))
}

/// The component walk of [`open_beneath`]. The directories walked into are kept open on a
/// stack, so `..` returns to the directory the walk came from and can never climb above
/// `root`. A symlink's text is read through a descriptor of the link whose owner was
/// checked, and spliced in front of the remaining components.
fn walk(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: libc::c_int,
    opts: Beneath,
) -> io::Result<OwnedFd> {
    use std::os::fd::AsFd;
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, rel)?;
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut links = 0usize;
    loop {
        let cur = stack.last().map_or(root, |d| d.as_fd());
        let Some(name) = todo.pop() else {
            // The path named the root, or ended in `..`: reopen where the walk stands.
            return openat(cur, OsStr::new("."), flags & !libc::O_NOFOLLOW, 0);
        };
        if name == ".." {
            if stack.pop().is_none() && !opts.in_root {
                return Err(errno(libc::EXDEV));
            }
            continue;
        }
        let last = todo.is_empty();
        match step(cur, &name, last, flags)? {
            Step::Opened(fd) if last => return Ok(fd),
            Step::Opened(fd) => stack.push(fd),
            Step::Link(fd, _) if last && !opts.follow_last => {
                return if flags & libc::O_PATH != 0 {
                    Ok(fd)
                } else {
                    Err(errno(libc::ELOOP))
                };
            }
            Step::Link(fd, owner) => {
                if owner != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        UntrustedSymlink { owner },
                    ));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(errno(libc::ELOOP));
                }
                let target = readlinkat(fd.as_fd(), OsStr::new(""))?;
                if target.is_absolute() {
                    if !opts.in_root {
                        return Err(errno(libc::EXDEV));
                    }
                    stack.clear();
                }
                push_components(&mut todo, &target)?;
            }
        }
    }
}

/// Pushes the components of `p` onto `todo` so that the first one is popped first.
fn push_components(todo: &mut Vec<OsString>, p: &Path) -> io::Result<()> {
    let mut parts: Vec<OsString> = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => parts.push(OsString::from("..")),
            Component::Normal(n) => parts.push(n.to_os_string()),
            Component::Prefix(_) => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
    }
    todo.extend(parts.into_iter().rev());
    Ok(())
}

/// readlinkat(2): the text of the symlink `name` in `dir` (empty `name`: `dir` itself, an
/// O_PATH descriptor of a symlink).
pub fn readlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<PathBuf> {
    let c = c_name(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `c` is NUL-terminated; `buf` is writable for its full length, which is passed.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsString::from_vec(buf)))
}

/// mkdirat(2) of `name` in `dir`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: `c` is NUL-terminated and outlives the call; `dir` is an open fd.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

/// unlinkat(2) of `name` in `dir`; `remove_dir` for an (empty) directory.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, remove_dir: bool) -> io::Result<()> {
    let c = c_name(name)?;
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `c` is NUL-terminated and outlives the call; `dir` is an open fd.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(|_| ())
}

/// renameat(2) within or across directory descriptors (replaces `to`, never follows it).
pub fn renameat(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> io::Result<()> {
    let (f, t) = (c_name(from)?, c_name(to)?);
    // SAFETY: both names are NUL-terminated and outlive the call; both fds are open.
    cvt(unsafe {
        libc::renameat(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
        )
    })
    .map(|_| ())
}

/// linkat(2) without following `from` (fails with EEXIST when `to` exists).
pub fn linkat(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> io::Result<()> {
    let (f, t) = (c_name(from)?, c_name(to)?);
    // SAFETY: both names are NUL-terminated and outlive the call; both fds are open.
    cvt(unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
            0,
        )
    })
    .map(|_| ())
}

/// The path the kernel has for an open descriptor (readlink of /proc/self/fd/N): where the
/// object is now, for judging it against path prefixes after it was opened.
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The names in the directory `dir` (without `.` and `..`), read through a fresh descriptor
/// of it so `dir` itself may be O_PATH.
pub fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let fd = openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is an open directory fd; on success fdopendir owns it (closedir closes
    // it), on failure it is closed here.
    let dirp = unsafe { libc::fdopendir(raw) };
    if dirp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it tells end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dirp` is a valid DIR stream until closedir below.
        let ent = unsafe { libc::readdir(dirp) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().unwrap_or(0) == 0 {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: a non-null dirent from readdir holds a NUL-terminated d_name, valid until
        // the next readdir on this stream.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    };
    // SAFETY: `dirp` came from fdopendir and is closed exactly once.
    unsafe { libc::closedir(dirp) };
    result.map(|()| names)
}
