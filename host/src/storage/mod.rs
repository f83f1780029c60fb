//! Storage: which host files requests may name ([`policy`]), and libvirt storage pools and
//! volumes ([`api`], their XML in [`xml`]). See docs/storage.md.

pub mod api;
pub mod disks;
pub mod policy;
pub mod xml;

use tonic::{Code, Status};

/// Why a storage operation failed; [`StorageError::into_status`] maps it to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    /// The object's state forbids it (in use, shrinking without leave, ...).
    #[error("{0}")]
    WrongState(String),
    /// A pool could not be built or started (server unreachable, device or kernel support
    /// missing); it was not kept.
    #[error("{0}")]
    StartFailed(String),
    /// A transfer ended early; the message says where to resume.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

impl StorageError {
    pub fn into_status(self) -> Status {
        let code = match &self {
            StorageError::NotFound(_) => Code::NotFound,
            StorageError::Exists(_) => Code::AlreadyExists,
            StorageError::Invalid(_) => Code::InvalidArgument,
            StorageError::WrongState(_) | StorageError::StartFailed(_) => Code::FailedPrecondition,
            StorageError::Aborted(_) => Code::Aborted,
            StorageError::Unsupported(_) => Code::Unimplemented,
            StorageError::Unavailable(_) => Code::Unavailable,
            StorageError::Failed(_) => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}
