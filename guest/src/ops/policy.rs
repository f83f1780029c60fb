//! The path policy: which absolute paths file operations may touch.
//!
//! A path is resolved before it is judged: the longest existing prefix is canonicalised (so
//! symlinks and `..` in it are followed the way the kernel would follow them) and the rest is
//! appended lexically (and may not contain `..`). The resolved path must lie under an allowed
//! prefix (when any are configured) and under no denied prefix. Prefixes are resolved the same
//! way, so `/var/run` and `/run` name the same place.

use std::path::PathBuf;

use qx_proto::agent::ErrorCode;

use super::{OpError, OpResult};

/// Allowed and denied path prefixes. An empty allow list allows everything not denied.
#[derive(Debug, Clone, Default)]
pub struct PathPolicy {
    allow: Vec<PathBuf>,
    deny: Vec<PathBuf>,
}

impl PathPolicy {
    pub fn new(allow: Vec<PathBuf>, deny: Vec<PathBuf>) -> Self {
        PathPolicy { allow, deny }
    }

    /// A policy that allows every path.
    pub fn allow_all() -> Self {
        PathPolicy::default()
    }

    /// Resolves `path` following every symlink (including the last component) and checks it.
    pub fn check(&self, path: &str) -> OpResult<PathBuf> {
        let _ = (path, &self.allow, &self.deny);
        Err(OpError::new(
            ErrorCode::Unsupported,
            "path policy is not implemented yet",
        ))
    }

    /// Resolves `path` without following its last component (for lstat, delete, rename
    /// targets) and checks it.
    pub fn check_nofollow(&self, path: &str) -> OpResult<PathBuf> {
        let _ = path;
        Err(OpError::new(
            ErrorCode::Unsupported,
            "path policy is not implemented yet",
        ))
    }
}
