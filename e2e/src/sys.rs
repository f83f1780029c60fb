//! The one place this crate calls libc directly: tie a child's life to ours.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the kernel SIGKILL the child when the thread that spawned it dies, so a test runner
/// killed by a CI timeout leaves no QEMU or qx-node behind. (Normal ends kill by pid on drop.)
pub fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
