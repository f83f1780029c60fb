//! The agent's libc calls, and its only `unsafe` code: every block names its invariants, and
//! raw fds become `OwnedFd` at once. Here: signalfd, pidfd, signals, spawning children, sync,
//! reboot, the worker thread; in [`os`], the calls of the operations, and in [`fs`], the descriptor-relative
//! filesystem calls (both re-exported here).
#![allow(unsafe_code)]

#[cfg(test)]
pub mod attack;
mod fs;
mod os;
#[cfg(test)]
pub use fs::walk_for_tests;
pub use fs::{
    fd_path, linkat, mkdirat, open_beneath, open_dir_path, openat, read_dir_names, readlinkat,
    renameat, resolver, unlinkat, Beneath, Resolver, UntrustedSymlink,
};
pub use os::{
    clock_ns, fifreeze, fithaw, fitrim, getifaddrs, local_utc_offset, rtc_set_time,
    set_realtime_ns, statvfs, uname, FsSpace, IfAddr, IfAddress, RtcTime, Uname,
};

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Signals the agent takes through its signalfd.
pub const HANDLED_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Eight random bytes that never wait for the kernel's generator to be seeded:
/// `getrandom(GRND_INSECURE)` (Linux 5.6+), else /dev/urandom (which does not wait before
/// 5.18 either). For ids, file-name suffixes and tokens that must differ, never for secrets: a
/// freshly booted guest without a hardware RNG can take a second or more to seed its
/// generator, and the agent's one thread must not wait for it (a blocking read held the first
/// AgentReady of a TCG guest for 1.3 s).
pub fn random_u64() -> io::Result<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is writable for its full length; the call writes at most that many bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_INSECURE) };
    if n != 8 {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    }
    Ok(u64::from_ne_bytes(buf))
}

/// Blocks [`HANDLED_SIGNALS`] for this (single-threaded) process and returns a non-blocking
/// signalfd that reports them. Children must get an empty mask back at spawn: [`spawn`] sees
/// to it.
pub fn signalfd() -> io::Result<OwnedFd> {
    // SAFETY: `set` is a plain C struct that sigemptyset initialises before any other use;
    // sigaddset only writes inside it; every pointer passed lives for the whole call.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        cvt(libc::sigemptyset(&mut set))?;
        for sig in HANDLED_SIGNALS {
            cvt(libc::sigaddset(&mut set, sig))?;
        }
        cvt(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?;
        // The fd is fresh and owned by nobody else.
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// posix_spawn's functions return an error number instead of setting errno.
fn cvt_nz(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// A pipe whose two ends are close-on-exec: `(read, write)`. Neither can be fd 0, 1 or 2,
/// where moving an end onto a child's standard fd would clobber another: Rust's runtime opens
/// /dev/null on any of them that is closed when the agent starts.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the two-element array it is given.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A child started by [`spawn`]: its pid (also its process group) and the agent's ends of its
/// pipes (no stderr pipe when stderr was merged into stdout).
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: Option<OwnedFd>,
}

/// Who a child becomes before exec, as a login does: with a `uid`, the supplementary
/// `groups` (none left when empty), then the `gid`, then the `uid`.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Vec<u32>,
}

/// Starts the program at `path` (a path, not searched for) with `argv` and the whole
/// environment `envp`. The child gets its own process group, an empty signal mask (the
/// agent's blocked signals would otherwise stay blocked in it), SIGPIPE at its default,
/// stdout and stderr on fresh pipes (with `merge_stderr`, stderr on stdout's pipe), stdin on
/// a pipe when `stdin_pipe` else on /dev/null, and `cwd` as working directory. A program that cannot be executed is an error here, not an
/// exit status.
///
/// Without `user` this is `posix_spawn`, which in musl and glibc is vfork-like: the agent's
/// page tables are not copied and nothing runs in the child before exec. posix_spawn cannot
/// change users, so a child with a `user` is forked (`fork_exec`).
pub fn spawn(
    path: &CStr,
    argv: &[CString],
    envp: &[CString],
    cwd: Option<&CStr>,
    stdin_pipe: bool,
    merge_stderr: bool,
    user: Option<&Identity>,
) -> io::Result<Spawned> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = match merge_stderr {
        true => (None, None),
        false => pipe().map(|(r, w)| (Some(r), Some(w)))?,
    };
    let err_fd = err_w.as_ref().unwrap_or(&out_w).as_raw_fd();
    let stdin = if stdin_pipe { Some(pipe()?) } else { None };
    let argv: Vec<*mut libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect();
    let envp: Vec<*mut libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect();
    if let Some(user) = user {
        let devnull;
        let stdin_fd = match &stdin {
            Some((r, _)) => r.as_raw_fd(),
            None => {
                devnull = std::fs::File::open("/dev/null")?;
                devnull.as_raw_fd()
            }
        };
        let child = ChildSetup {
            path,
            argv: &argv,
            envp: &envp,
            cwd,
            fds: [stdin_fd, out_w.as_raw_fd(), err_fd],
            user,
        };
        let pid = fork_exec(&child)?;
        return Ok(Spawned {
            pid,
            stdin: stdin.map(|(_, w)| w),
            stdout: out_r,
            stderr: err_r,
        });
    }
    let mut pid: libc::pid_t = 0;
    // SAFETY: the file actions and attributes are initialised before use and destroyed on
    // every path by their guards; every fd they name stays open until posix_spawn returns;
    // `path`, `cwd` and the NUL-terminated `argv`/`envp` pointer arrays (whose strings are
    // borrowed for the whole call) outlive the call; the sigsets are initialised by
    // sigemptyset before use.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        cvt_nz(libc::posix_spawn_file_actions_init(&mut actions))?;
        let actions = Guard(&mut actions, |a| {
            libc::posix_spawn_file_actions_destroy(a);
        });
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        cvt_nz(libc::posix_spawnattr_init(&mut attr))?;
        let attr = Guard(&mut attr, |a| {
            libc::posix_spawnattr_destroy(a);
        });

        match &stdin {
            Some((r, _)) => cvt_nz(libc::posix_spawn_file_actions_adddup2(
                actions.0,
                r.as_raw_fd(),
                0,
            ))?,
            None => cvt_nz(libc::posix_spawn_file_actions_addopen(
                actions.0,
                0,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
                0,
            ))?,
        }
        cvt_nz(libc::posix_spawn_file_actions_adddup2(
            actions.0,
            out_w.as_raw_fd(),
            1,
        ))?;
        cvt_nz(libc::posix_spawn_file_actions_adddup2(actions.0, err_fd, 2))?;
        if let Some(cwd) = cwd {
            cvt_nz(libc::posix_spawn_file_actions_addchdir_np(
                actions.0,
                cwd.as_ptr(),
            ))?;
        }

        let mut empty: libc::sigset_t = std::mem::zeroed();
        cvt(libc::sigemptyset(&mut empty))?;
        cvt_nz(libc::posix_spawnattr_setsigmask(attr.0, &empty))?;
        let mut default: libc::sigset_t = std::mem::zeroed();
        cvt(libc::sigemptyset(&mut default))?;
        cvt(libc::sigaddset(&mut default, libc::SIGPIPE))?;
        cvt_nz(libc::posix_spawnattr_setsigdefault(attr.0, &default))?;
        cvt_nz(libc::posix_spawnattr_setpgroup(attr.0, 0))?;
        let flags = libc::POSIX_SPAWN_SETPGROUP
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF;
        cvt_nz(libc::posix_spawnattr_setflags(
            attr.0,
            flags as libc::c_short,
        ))?;

        cvt_nz(libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            actions.0,
            attr.0,
            argv.as_ptr(),
            envp.as_ptr(),
        ))?;
    }
    // The child's ends (out_w, err_w, the stdin pipe's read end) close here, in the agent.
    Ok(Spawned {
        pid: pid as u32,
        stdin: stdin.map(|(_, w)| w),
        stdout: out_r,
        stderr: err_r,
    })
}

/// What a forked child sets up before exec; everything is prepared before the fork, so that
/// the child only makes system calls.
struct ChildSetup<'a> {
    path: &'a CStr,
    /// NUL-terminated pointer arrays.
    argv: &'a [*mut libc::c_char],
    envp: &'a [*mut libc::c_char],
    cwd: Option<&'a CStr>,
    /// The child's fds 0, 1 and 2 (none of them is 0, 1 or 2: see [`pipe`]).
    fds: [RawFd; 3],
    user: &'a Identity,
}

/// Forks, sets the child up as [`spawn`] says, switches to `user` and then changes to `cwd`
/// (with the user's permissions), and executes it; returns the pid once the child has
/// executed its program. A step that fails in the child sends its errno back through a
/// close-on-exec pipe and the child exits: the error is returned here, the child reaped.
fn fork_exec(child: &ChildSetup) -> io::Result<u32> {
    let (report_r, report_w) = pipe()?;
    let groups = &child.user.groups;
    // SAFETY: `set` is initialised by sigemptyset before use.
    let empty = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        cvt(libc::sigemptyset(&mut set))?;
        set
    };
    // SAFETY: the child runs only async-signal-safe system calls (dup2, setgroups, setresgid,
    // setresuid, chdir, setpgid, signal, sigprocmask, execve, write, _exit) on memory prepared
    // before the fork and still mapped in it (its copy of the parent's); it never returns.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid == 0 {
        // SAFETY: see above; this is the child.
        unsafe {
            let fail = |fd: RawFd| -> ! {
                let errno = *libc::__errno_location();
                libc::write(fd, (&raw const errno).cast(), 4);
                libc::_exit(127)
            };
            let report = report_w.as_raw_fd();
            for (to, from) in child.fds.into_iter().enumerate() {
                if libc::dup2(from, to as libc::c_int) < 0 {
                    fail(report);
                }
            }
            let user = child.user;
            if user.uid.is_some() && libc::setgroups(groups.len(), groups.as_ptr()) < 0 {
                fail(report);
            }
            if let Some(gid) = user.gid {
                if libc::setresgid(gid, gid, gid) < 0 {
                    fail(report);
                }
            }
            if let Some(uid) = user.uid {
                if libc::setresuid(uid, uid, uid) < 0 {
                    fail(report);
                }
            }
            if let Some(cwd) = child.cwd {
                if libc::chdir(cwd.as_ptr()) < 0 {
                    fail(report);
                }
            }
            if libc::setpgid(0, 0) < 0
                || libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
                || libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) < 0
            {
                fail(report);
            }
            libc::execve(
                child.path.as_ptr(),
                child.argv.as_ptr().cast(),
                child.envp.as_ptr().cast(),
            );
            fail(report)
        }
    }
    drop(report_w);
    let mut errno = [0u8; 4];
    let mut got = 0;
    while got < errno.len() {
        // SAFETY: reads at most the rest of `errno` into it.
        let n = unsafe {
            libc::read(
                report_r.as_raw_fd(),
                errno[got..].as_mut_ptr().cast(),
                errno.len() - got,
            )
        };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    if got == 0 {
        // The pipe closed on exec: the child runs its program.
        return Ok(pid as u32);
    }
    let _ = wait_child(pid as u32, true);
    Err(if got == errno.len() {
        io::Error::from_raw_os_error(i32::from_ne_bytes(errno))
    } else {
        io::Error::other("the child failed before exec")
    })
}

/// Runs its function on its pointer when dropped (posix_spawn's C objects).
struct Guard<T>(*mut T, unsafe fn(*mut T));

impl<T> Drop for Guard<T> {
    fn drop(&mut self) {
        // SAFETY: the pointer was initialised by the matching init function and is destroyed
        // exactly once, here.
        unsafe { (self.1)(self.0) }
    }
}

/// The exit status of child `pid` (a raw wait status) once it has ended, without waiting;
/// `Ok(None)` while it runs. With `block`, waits for it instead.
pub fn wait_child(pid: u32, block: bool) -> io::Result<Option<i32>> {
    let mut status = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: waitpid writes one int into `status`.
        let ret = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, flags) };
        match ret {
            0 => return Ok(None),
            r if r > 0 => return Ok(Some(status)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Reads one pending signal number from a signalfd; `Ok(None)` when none is pending.
pub fn read_signal(fd: &OwnedFd) -> io::Result<Option<i32>> {
    // SAFETY: signalfd_siginfo is a plain C struct (all-zero is valid); read() writes at most
    // size_of::<signalfd_siginfo>() bytes into it.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        );
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        if n as usize != size {
            return Ok(None);
        }
        Ok(Some(info.ssi_signo as i32))
    }
}

/// A pidfd for `pid` (Linux 5.3+); readable once the process exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// Sends `sig` to the process group `pgid` (the agent starts every child in its own group).
pub fn kill_group(pgid: u32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers; a negative pid addresses a process group.
    cvt(unsafe { libc::kill(-(pgid as libc::pid_t), sig) }).map(|_| ())
}

/// Sets O_NONBLOCK on `fd`.
/// One read(2) of `fd` appended to `buf`, at most `max` bytes, into its spare capacity: the
/// bytes land where they are kept, with no zeroing beforehand and no copy after.
pub fn read_append(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let want = max.min(spare.len());
    // SAFETY: the pointer and length describe `want` bytes of `buf`'s spare capacity, valid for
    // writes; read(2) writes at most that many.
    let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), want) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = buf.len() + n as usize;
    // SAFETY: read(2) initialised the first `n` bytes of the spare capacity, and `len` is within
    // the capacity reserved above.
    unsafe { buf.set_len(len) };
    Ok(n as usize)
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    set_nonblock_flag(fd, true)
}

/// Sets or clears O_NONBLOCK on `fd`.
pub fn set_nonblock_flag(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL/F_SETFL on an fd the caller owns; no memory is passed.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        cvt(libc::fcntl(fd, libc::F_SETFL, flags))?;
    }
    Ok(())
}

/// A thread's body, as [`spawn_thread`] takes it.
pub type ThreadBody = Box<dyn FnOnce() + Send>;

/// Starts `body` on a new detached thread named `name` (at most 15 bytes, as the kernel keeps
/// it) with a stack of `stack_bytes`: `pthread_create` itself. std's `thread::Builder` would
/// add its spawning machinery, a signal stack set up in the thread, and a `snprintf` for the
/// name (musl's `pthread_setname_np`), about 24 KB of the agent for the one thread it starts.
/// The thread inherits the caller's signal mask, as with std. A panic in `body` aborts the
/// process.
pub fn spawn_thread(name: &'static CStr, stack_bytes: usize, body: ThreadBody) -> io::Result<()> {
    extern "C" fn start(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the pointer `spawn_thread` made with `Box::into_raw` and gave to
        // this thread only; it is taken back exactly once, here.
        let (name, body) = *unsafe { Box::from_raw(arg.cast::<(&'static CStr, ThreadBody)>()) };
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which
        // `name` is (longer names are cut by the kernel, never read past their NUL).
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
        body();
        std::ptr::null_mut()
    }
    let arg = Box::into_raw(Box::new((name, body)));
    // SAFETY: the attributes are initialised before use and destroyed by their guard on every
    // path; `thread` is written by pthread_create; `arg` goes to the new thread, or back into
    // a Box here when no thread started.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        cvt_nz(libc::pthread_attr_init(&mut attr))?;
        let attr = Guard(&mut attr, |a| {
            libc::pthread_attr_destroy(a);
        });
        cvt_nz(libc::pthread_attr_setstacksize(attr.0, stack_bytes))?;
        cvt_nz(libc::pthread_attr_setdetachstate(
            attr.0,
            libc::PTHREAD_CREATE_DETACHED,
        ))?;
        let mut thread: libc::pthread_t = std::mem::zeroed();
        let ret = libc::pthread_create(&mut thread, attr.0, start, arg.cast());
        if ret != 0 {
            drop(Box::from_raw(arg));
            return Err(io::Error::from_raw_os_error(ret));
        }
    }
    Ok(())
}

/// Flushes filesystem buffers (blocks until the kernel has queued them; power path only).
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// What [`reboot`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootCmd {
    PowerOff,
    Restart,
    Halt,
}

/// reboot(2): the last resort when the init's own command failed. Returns only on error.
pub fn reboot(cmd: RebootCmd) -> io::Error {
    let arg = match cmd {
        RebootCmd::PowerOff => libc::RB_POWER_OFF,
        RebootCmd::Restart => libc::RB_AUTOBOOT,
        RebootCmd::Halt => libc::RB_HALT_SYSTEM,
    };
    // SAFETY: reboot takes one integer command; it returns only on failure.
    unsafe { libc::reboot(arg) };
    io::Error::last_os_error()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pidfd_becomes_readable_when_the_child_exits() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1);
        assert!(child.wait().unwrap().success());
    }
}
