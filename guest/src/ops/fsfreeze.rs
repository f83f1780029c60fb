//! Filesystem freeze/thaw (FIFREEZE/FITHAW) with a token, an auto-thaw deadline, hooks and a
//! state file under /run so a restarted agent thaws what a dead one froze; and FITRIM.

use std::path::PathBuf;
use std::time::Instant;

use qx_proto::agent::{
    ErrorCode, FsFreezeReply, FsFreezeRequest, FsFreezeStatus, FsThawReply, FsThawRequest,
    FsTrimReply, FsTrimRequest, FsTrimResult,
};

use super::{ChildCommand, OpError, OpResult};

/// Default auto-thaw delay when the request leaves it 0.
pub const DEFAULT_AUTO_THAW_MS: u32 = 60_000;
/// Timeout for each hook script.
pub const HOOK_TIMEOUT_MS: u32 = 10_000;

/// Which hook phase to run: before freezing, or after thawing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPhase {
    Freeze,
    Thaw,
}

fn todo_err() -> OpError {
    OpError::new(
        ErrorCode::Unsupported,
        "filesystem freeze is not implemented yet",
    )
}

#[derive(Debug)]
pub struct Freezer {
    state_file: PathBuf,
    hooks_dir: Option<PathBuf>,
}

impl Freezer {
    pub fn new(state_file: PathBuf, hooks_dir: Option<PathBuf>) -> Self {
        Freezer {
            state_file,
            hooks_dir,
        }
    }

    /// Thaws what a previous agent left frozen according to the state file.
    pub fn recover(&mut self) -> OpResult<Vec<String>> {
        let _ = &self.state_file;
        Ok(Vec::new())
    }

    pub fn freeze(&mut self, req: &FsFreezeRequest, now: Instant) -> OpResult<FsFreezeReply> {
        let _ = (req, now);
        Err(todo_err())
    }

    pub fn thaw(&mut self, req: &FsThawRequest) -> OpResult<FsThawReply> {
        let _ = req;
        Err(todo_err())
    }

    pub fn status(&self, now: Instant) -> FsFreezeStatus {
        let _ = now;
        FsFreezeStatus::default()
    }

    pub fn is_frozen(&self) -> bool {
        false
    }

    /// When the agent must thaw by itself.
    pub fn deadline(&self) -> Option<Instant> {
        None
    }

    /// Thaws (forced) when the deadline has passed; `None` when nothing was due.
    pub fn auto_thaw(&mut self, now: Instant) -> Option<OpResult<FsThawReply>> {
        let _ = now;
        None
    }

    /// Hook commands to run for `phase`, in order.
    pub fn hook_commands(&self, phase: HookPhase) -> Vec<ChildCommand> {
        let _ = (phase, &self.hooks_dir);
        Vec::new()
    }
}

/// FITRIM on each requested (or every local writable) filesystem.
pub fn trim(req: &FsTrimRequest) -> OpResult<FsTrimReply> {
    let _ = req;
    Err(todo_err())
}

/// The mountpoints `trim` would visit, so the loop may trim one per turn with [`trim_one`].
pub fn trim_targets(req: &FsTrimRequest) -> OpResult<Vec<String>> {
    let _ = req;
    Err(todo_err())
}

/// FITRIM on one mountpoint; failures are carried in the result's `error`.
pub fn trim_one(mountpoint: &str, minimum_bytes: u64) -> FsTrimResult {
    FsTrimResult {
        mountpoint: mountpoint.to_string(),
        trimmed_bytes: 0,
        error: format!("{minimum_bytes}: not implemented yet"),
    }
}
