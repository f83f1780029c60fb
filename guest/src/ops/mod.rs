//! Guest operations: pure, synchronous building blocks the session dispatches to.
//!
//! Contract with the event loop (guest/src/session.rs and friends):
//! - Every function here returns quickly: bounded work, no sleeping, no waiting on another
//!   process. Work that could take long is split into steps the loop drives ([`files::FileReader`],
//!   [`files::FileHasher`]) or handed back as a [`ChildCommand`] for the loop to run as a child
//!   job (password changes, freeze hooks).
//! - Failures are [`OpError`]s carrying the wire [`ErrorCode`] and a sentence a person can act on.
//!
//! Modules: [`policy`] (path allow/deny, symlink-aware), [`files`] (stat, list, mkdir, delete,
//! chunked read/hash/write), [`fsfreeze`] (freeze/thaw/trim), [`timeops`], [`users`] (utmp,
//! chpasswd, ssh keys), [`sysinfo`], [`netinfo`], [`disks`], [`telemetry`], [`sha256`]. Their
//! libc calls and ioctls are in [`crate::sys`]: `ops` itself has no `unsafe` code.

use qx_proto::agent::ErrorCode;

/// A failed operation, as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
        }
    }

    /// Maps an OS error on `what` (e.g. a path) to the closest wire code.
    pub fn io(what: &str, err: &std::io::Error) -> Self {
        let code = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorCode::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            std::io::ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
            std::io::ErrorKind::InvalidInput => ErrorCode::InvalidArgument,
            _ => ErrorCode::Io,
        };
        OpError::new(code, format!("{what}: {err}"))
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str_name(), self.message)
    }
}

impl std::error::Error for OpError {}

pub type OpResult<T> = Result<T, OpError>;

/// A short-lived child process the loop runs on an operation's behalf (non-blocking pipes,
/// a deadline), feeding `stdin` and reporting the exit status back to the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildCommand {
    pub argv: Vec<String>,
    pub stdin: Vec<u8>,
    pub timeout_ms: u32,
}

pub mod disks;
pub mod files;
pub mod fsfreeze;
pub mod netinfo;
pub mod policy;
pub mod sha256;
pub mod sysinfo;
pub mod telemetry;
#[cfg(test)]
mod testutil;
pub mod timeops;
pub mod users;
