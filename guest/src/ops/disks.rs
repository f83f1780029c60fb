//! Mounted filesystems (/proc/self/mountinfo + statvfs) and block devices (/sys/block).

use qx_proto::agent::{DisksInfo, ErrorCode, FilesystemUsage};

use super::{OpError, OpResult};

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Major:minor of the filesystem (the same for every bind mount of it).
    pub dev: (u32, u32),
    pub mountpoint: String,
    pub fstype: String,
    pub source: String,
    pub read_only: bool,
}

/// Mounts in mount order.
pub fn mounts() -> OpResult<Vec<Mount>> {
    Err(OpError::new(
        ErrorCode::Unsupported,
        "mount table is not implemented yet",
    ))
}

/// True for filesystem types that live on a local block device.
pub fn is_local_disk_fs(fstype: &str) -> bool {
    let _ = fstype;
    false
}

/// Mounted filesystems and block devices.
pub fn disks() -> OpResult<DisksInfo> {
    Err(OpError::new(
        ErrorCode::Unsupported,
        "disks are not implemented yet",
    ))
}

/// Usage of the real local filesystems (one entry per filesystem), for telemetry.
pub fn filesystems() -> Vec<FilesystemUsage> {
    Vec::new()
}
