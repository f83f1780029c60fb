//! Storage: which host files requests may name ([`policy`]), and libvirt storage pools and
//! volumes ([`api`], their XML in [`xml`]). See docs/storage.md.

pub mod api;
pub mod disks;
pub mod policy;
pub mod xml;

/// Why a storage operation failed; the gRPC layer maps it to a status code
/// (`service::status::storage`).
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
