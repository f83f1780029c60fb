//! The daemon's own process limits, through libc: the one place in the library that needs
//! `unsafe` for them.

use std::io;

/// The open-file limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit the process started with.
    pub was: u64,
    /// The soft limit now (the hard limit, unless it could not be raised).
    pub now: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Raises the process's `RLIMIT_NOFILE` soft limit to its hard limit. Every VM's agent link
/// holds a descriptor, and the usual soft default (1024) would refuse connections long before
/// the hard limit the operator set. Never lowers it.
#[allow(unsafe_code)]
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call, and
    // RLIMIT_NOFILE is a valid resource.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let was = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit whose soft limit does not exceed its hard limit
        // (the one the kernel just reported), which an unprivileged process may set.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(NofileLimit {
        was,
        now: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit_and_never_lower() {
        // Raising is idempotent, so running it inside the test process changes nothing the
        // other tests rely on (it only ever raises).
        let first = raise_nofile_limit().unwrap();
        assert_eq!(first.now, first.hard);
        assert!(first.now >= first.was);
        let again = raise_nofile_limit().unwrap();
        assert_eq!(again.was, again.hard);
        assert_eq!(again.now, again.hard);
    }
}
