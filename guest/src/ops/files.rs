//! File operations under the [`PathPolicy`]: stat, paged list, mkdir -p, delete, chunked
//! reads, stepped hashing and atomic chunked writes (temp file beside the target, fsync,
//! rename).

use qx_proto::agent::{
    DeleteRequest, ErrorCode, FileChunk, FileHash, FileHashRequest, FileList, FileListRequest,
    FileReadDone, FileReadRequest, FileStat, FileStatRequest, FileWriteChunk, FileWriteClose,
    FileWriteDone, FileWriteOpen, FileWriteOpened, MkdirRequest,
};

use super::policy::PathPolicy;
use super::{OpError, OpResult};

/// Largest data chunk a FileChunk carries, so the frame stays well under 64 KiB.
pub const MAX_CHUNK_BYTES: u32 = 48 * 1024;

fn todo_err() -> OpError {
    OpError::new(
        ErrorCode::Unsupported,
        "file operations are not implemented yet",
    )
}

pub fn stat(policy: &PathPolicy, req: &FileStatRequest) -> OpResult<FileStat> {
    let _ = (policy, req);
    Err(todo_err())
}

pub fn list(policy: &PathPolicy, req: &FileListRequest) -> OpResult<FileList> {
    let _ = (policy, req);
    Err(todo_err())
}

pub fn mkdir(policy: &PathPolicy, req: &MkdirRequest) -> OpResult<()> {
    let _ = (policy, req);
    Err(todo_err())
}

pub fn delete(policy: &PathPolicy, req: &DeleteRequest) -> OpResult<()> {
    let _ = (policy, req);
    Err(todo_err())
}

/// A read transfer: one [`FileChunk`] per [`FileReader::next_chunk`] call.
#[derive(Debug)]
pub struct FileReader {
    _private: (),
}

impl FileReader {
    pub fn open(
        policy: &PathPolicy,
        req: &FileReadRequest,
        default_chunk: u32,
    ) -> OpResult<FileReader> {
        let _ = (policy, req, default_chunk);
        Err(todo_err())
    }

    /// The next chunk, or `None` when the range is complete.
    pub fn next_chunk(&mut self) -> OpResult<Option<FileChunk>> {
        Err(todo_err())
    }

    /// The terminal reply once `next_chunk` returned `None`.
    pub fn done(&self) -> FileReadDone {
        FileReadDone::default()
    }
}

/// A sha256 of a whole file, computed `budget_bytes` per step.
#[derive(Debug)]
pub struct FileHasher {
    _private: (),
}

impl FileHasher {
    pub fn open(policy: &PathPolicy, req: &FileHashRequest) -> OpResult<FileHasher> {
        let _ = (policy, req);
        Err(todo_err())
    }

    /// Hashes up to `budget_bytes`; `Some` once the whole file is hashed.
    pub fn step(&mut self, budget_bytes: usize) -> OpResult<Option<FileHash>> {
        let _ = budget_bytes;
        Err(todo_err())
    }
}

/// Open write transfers, by handle.
#[derive(Debug)]
pub struct FileWriters {
    max_open: usize,
}

impl FileWriters {
    pub fn new(max_open: usize) -> Self {
        FileWriters { max_open }
    }

    pub fn open(&mut self, policy: &PathPolicy, req: &FileWriteOpen) -> OpResult<FileWriteOpened> {
        let _ = (policy, req, self.max_open);
        Err(todo_err())
    }

    pub fn write(&mut self, req: &FileWriteChunk) -> OpResult<()> {
        let _ = req;
        Err(todo_err())
    }

    pub fn close(&mut self, req: &FileWriteClose) -> OpResult<FileWriteDone> {
        let _ = req;
        Err(todo_err())
    }

    /// Aborts every open transfer (temp files removed), e.g. on a new host session.
    pub fn abort_all(&mut self) {}

    /// Number of open transfers.
    pub fn open_count(&self) -> usize {
        0
    }
}
