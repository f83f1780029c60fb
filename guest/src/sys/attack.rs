//! The unprivileged guest user of the attack tests: a forked child that drops to a test uid
//! and makes its moves with raw system calls.

use std::ffi::CString;
use std::io;

/// A guest user's move in an attack test: done by a forked child running as that user.
#[derive(Debug, Clone)]
pub enum Move {
    Symlink { target: CString, link: CString },
    Unlink(CString),
    Rmdir(CString),
    Rename { from: CString, to: CString },
}

/// A forked child that runs as `uid`/`gid` (no supplementary groups) and does `moves` in
/// order, once or (with `repeat`) until it is killed: the unprivileged user of the attack
/// tests. The child makes raw calls only (no allocation after fork). Dropping it kills and
/// reaps it.
#[derive(Debug)]
pub struct Attacker {
    pid: libc::pid_t,
}

impl Attacker {
    pub fn start(uid: u32, gid: u32, moves: &[Move], repeat: bool) -> io::Result<Attacker> {
        // SAFETY: the child only makes async-signal-safe system calls on data prepared
        // before fork (the CStrings in `moves`) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; every pointer comes from a CString that lives in the
            // child's copy of the parent's memory.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    libc::_exit(100);
                }
                loop {
                    for m in moves {
                        match m {
                            Move::Symlink { target, link } => {
                                libc::symlink(target.as_ptr(), link.as_ptr());
                            }
                            Move::Unlink(p) => {
                                libc::unlink(p.as_ptr());
                            }
                            Move::Rmdir(p) => {
                                libc::rmdir(p.as_ptr());
                            }
                            Move::Rename { from, to } => {
                                libc::rename(from.as_ptr(), to.as_ptr());
                            }
                        }
                    }
                    if !repeat {
                        libc::_exit(0);
                    }
                }
            }
        }
        Ok(Attacker { pid })
    }

    /// Waits for a one-shot attacker to finish; its exit code (100: could not drop root).
    pub fn wait(self) -> io::Result<i32> {
        let status = super::wait_child(self.pid as u32, true)?.unwrap_or(-1);
        std::mem::forget(self);
        Ok(libc::WEXITSTATUS(status))
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        // SAFETY: kill takes plain integers; the pid is our own unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = super::wait_child(self.pid as u32, true);
    }
}

/// This thread (only: the raw syscall, not libc's process-wide setresuid) runs with effective
/// uid `euid`, and so without effective capabilities, until dropped. For tests of refusals
/// that, were the check missing, would otherwise change the machine (the clock): the call
/// then fails with EPERM instead.
#[derive(Debug)]
pub struct ThreadEuid(());

impl ThreadEuid {
    pub fn set(euid: u32) -> io::Result<ThreadEuid> {
        // SAFETY: setresuid takes plain integers; -1 leaves the real and saved uids alone.
        let ret = unsafe { libc::syscall(libc::SYS_setresuid, -1, euid, -1) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ThreadEuid(()))
    }
}

impl Drop for ThreadEuid {
    fn drop(&mut self) {
        // SAFETY: as above; the saved uid is still 0, so the thread may return to it, and its
        // effective capabilities come back from its permitted set.
        unsafe { libc::syscall(libc::SYS_setresuid, -1, 0, -1) };
    }
}
