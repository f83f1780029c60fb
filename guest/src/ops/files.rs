//! File operations under the [`PathPolicy`]: stat, paged list, mkdir -p, delete, chunked
//! reads, stepped hashing and atomic chunked writes.
//!
//! Every call does bounded work: a read returns one chunk, a hash step reads at most its
//! budget, a write takes one chunk. Reads and hashes accept regular files only (opened
//! non-blocking, so a FIFO cannot stall the loop). Writes go to a temp file beside the target
//! (`O_EXCL`, mode 0600) and become visible only on commit: fsync, owner, mode, rename over the
//! target (or link, when overwriting is not allowed), fsync of the directory.
//!
//! Everything happens through descriptors the [`PathPolicy`] opened: metadata, owner and mode
//! are read and set on the open file (`fstat`, `fchown`, `fchmod`); names are created, renamed,
//! linked and removed relative to the opened parent directory (`openat`, `renameat`,
//! `linkat`, `unlinkat`). A last component that is a symlink is never written, read or
//! listed through; a recursive delete walks by descriptor, removes symlinks without following
//! them and leaves other filesystems mounted inside the tree alone.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use prost::Message;
use qx_proto::agent::{
    DeleteRequest, ErrorCode, FileChunk, FileHash, FileHashRequest, FileList, FileListRequest,
    FileReadDone, FileReadRequest, FileStat, FileStatRequest, FileType, FileWriteChunk,
    FileWriteClose, FileWriteDone, FileWriteOpen, FileWriteOpened, MkdirRequest,
};

use super::policy::PathPolicy;
use super::sha256::{hex, Sha256};
use super::users::UserDb;
use super::{OpError, OpResult};
use crate::sys;

/// Largest data chunk a FileChunk carries, so the frame stays well under 64 KiB.
pub const MAX_CHUNK_BYTES: u32 = qx_proto::MAX_FILE_CHUNK_BYTES;
/// Chunk size when neither the request nor the caller names one: the largest, since each
/// chunk costs a fixed share of time beside its bytes (docs/benchmarks.md).
pub const DEFAULT_CHUNK_BYTES: u32 = MAX_CHUNK_BYTES;
/// Entries per list page when the request says 0, and the most it may ask for.
pub const DEFAULT_PAGE_SIZE: u32 = 256;
pub const MAX_PAGE_SIZE: u32 = 1024;
/// A list page stops growing at this encoded size, so its frame stays under 64 KiB.
pub const LIST_PAGE_BUDGET_BYTES: usize = 48 * 1024;
/// Mode of a written file when the request says 0, and of a created directory.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
pub const DEFAULT_DIR_MODE: u32 = 0o755;

fn file_type(meta: &Metadata) -> FileType {
    let ft = meta.file_type();
    if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Directory
    } else if ft.is_file() {
        FileType::Regular
    } else if ft.is_block_device() {
        FileType::Block
    } else if ft.is_char_device() {
        FileType::Char
    } else if ft.is_fifo() {
        FileType::Fifo
    } else if ft.is_socket() {
        FileType::Socket
    } else {
        FileType::Unspecified
    }
}

fn ns(secs: i64, nsecs: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

fn to_file_stat(
    shown_path: String,
    name: String,
    meta: &Metadata,
    link: Option<&Path>,
) -> FileStat {
    FileStat {
        path: shown_path,
        name,
        file_type: file_type(meta) as i32,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_unix_ns: ns(meta.mtime(), meta.mtime_nsec()),
        atime_unix_ns: ns(meta.atime(), meta.atime_nsec()),
        ctime_unix_ns: ns(meta.ctime(), meta.ctime_nsec()),
        symlink_target: link
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn display_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string())
}

/// Metadata of one path; `follow_symlinks` false describes a symlink itself. A symlink is
/// followed only when asked, only when root owns it, and only to a target the policy allows.
pub fn stat(policy: &PathPolicy, req: &FileStatRequest) -> OpResult<FileStat> {
    let opened = policy.open(&req.path, libc::O_PATH, req.follow_symlinks)?;
    let file = File::from(opened.fd);
    let meta = file.metadata().map_err(|e| OpError::io(&req.path, &e))?;
    let link = if meta.file_type().is_symlink() {
        sys::readlinkat(file.as_fd(), OsStr::new("")).ok()
    } else {
        None
    };
    Ok(to_file_stat(
        req.path.clone(),
        display_name(&req.path),
        &meta,
        link.as_deref(),
    ))
}

/// Metadata of `name` in `dir`, not following it.
fn meta_at(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<Metadata> {
    let fd = sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    File::from(fd).metadata()
}

fn decode_token(token: &str) -> OpResult<Vec<u8>> {
    let bad = || {
        OpError::new(
            ErrorCode::InvalidArgument,
            "page_token is not one this agent issued",
        )
    };
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

/// Directories being listed page by page, kept between pages: a listing reads and sorts its
/// directory once, for its first page, and later pages are taken from those names (the
/// listing is a snapshot, as `ls` prints one). A listing is found by its directory (device
/// and inode), and a page by its token (the last name returned), so a listing replaced by a
/// newer one of the same directory still pages on correctly. Bounded: at most
/// [`MAX_LISTINGS`] listings and [`LISTINGS_BUDGET_BYTES`] of names, the least recently used
/// dropped first, and a listing not paged for [`LISTING_IDLE`] is dropped. A page whose
/// listing was dropped reads the directory again.
#[derive(Debug, Default)]
pub struct Listings {
    open: Vec<Listing>,
}

#[derive(Debug)]
struct Listing {
    dir: (u64, u64),
    names: Vec<Vec<u8>>,
    bytes: usize,
    used: Instant,
}

/// Listings kept between pages.
pub const MAX_LISTINGS: usize = 4;
/// Names (with their bookkeeping) kept between pages, over every listing.
pub const LISTINGS_BUDGET_BYTES: usize = 4 << 20;
/// A listing not paged for this long is dropped.
pub const LISTING_IDLE: Duration = Duration::from_secs(60);

/// What one kept name costs: its bytes and its vector.
fn name_cost(name: &[u8]) -> usize {
    name.len() + std::mem::size_of::<Vec<u8>>()
}

impl Listings {
    fn expire(&mut self, now: Instant) {
        self.open
            .retain(|l| now.saturating_duration_since(l.used) < LISTING_IDLE);
    }

    /// Whether names of directory `dir` are kept; marks them used.
    fn touch(&mut self, dir: (u64, u64), now: Instant) -> bool {
        self.expire(now);
        match self.open.iter_mut().find(|l| l.dir == dir) {
            Some(l) => {
                l.used = now;
                true
            }
            None => false,
        }
    }

    /// The kept names of directory `dir` (none if there are none).
    fn names_of(&self, dir: (u64, u64)) -> &[Vec<u8>] {
        self.open
            .iter()
            .find(|l| l.dir == dir)
            .map_or(&[], |l| &l.names)
    }

    /// Keeps `names` (sorted) for the next pages of `dir`'s listing, unless they alone
    /// exceed the budget (returns whether they are kept).
    fn keep(&mut self, dir: (u64, u64), names: Vec<Vec<u8>>, now: Instant) -> bool {
        self.expire(now);
        self.open.retain(|l| l.dir != dir);
        let bytes: usize = names.iter().map(|n| name_cost(n)).sum();
        if bytes > LISTINGS_BUDGET_BYTES {
            return false;
        }
        while self.open.len() >= MAX_LISTINGS
            || self.open.iter().map(|l| l.bytes).sum::<usize>() + bytes > LISTINGS_BUDGET_BYTES
        {
            let Some(oldest) = (0..self.open.len()).min_by_key(|&i| self.open[i].used) else {
                break;
            };
            self.open.swap_remove(oldest);
        }
        self.open.push(Listing {
            dir,
            names,
            bytes,
            used: now,
        });
        true
    }
}

/// One page of a directory's entries, sorted by name (bytewise), symlinks not followed.
/// The page token is the last name returned, so pages stay stable while the directory
/// changes. Entries under a denied prefix are left out. Later pages come from the names
/// read for the first (see [`Listings`]).
pub fn list(
    policy: &PathPolicy,
    listings: &mut Listings,
    req: &FileListRequest,
    now: Instant,
) -> OpResult<FileList> {
    let dir = policy.open(&req.path, libc::O_PATH | libc::O_DIRECTORY, false)?;
    let after = if req.page_token.is_empty() {
        None
    } else {
        Some(decode_token(&req.page_token)?)
    };
    let page_size = match req.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    } as usize;
    let meta = File::from(dir.fd.try_clone().map_err(|e| OpError::io(&req.path, &e))?)
        .metadata()
        .map_err(|e| OpError::io(&req.path, &e))?;
    let id = (meta.dev(), meta.ino());
    let mut fresh = Vec::new();
    let names: &[Vec<u8>] = if after.is_some() && listings.touch(id, now) {
        listings.names_of(id)
    } else {
        let read = sys::read_dir_names(dir.fd.as_fd()).map_err(|e| OpError::io(&req.path, &e))?;
        fresh = read.into_iter().map(OsString::into_vec).collect();
        fresh.sort_unstable();
        &fresh
    };
    let start = after.as_ref().map_or(0, |a| {
        names.partition_point(|n| n.as_slice() <= a.as_slice())
    });
    let names = &names[start..];
    let base = req.path.trim_end_matches('/');
    let denied = policy.resolved_deny();
    let mut out = FileList::default();
    let mut size = 0usize;
    let mut last: Option<&[u8]> = None;
    let mut more = false;
    for name in names {
        if out.entries.len() >= page_size {
            more = true;
            break;
        }
        let name_os = OsStr::from_bytes(name);
        if denied.iter().any(|d| dir.real.join(name_os).starts_with(d)) {
            last = Some(name);
            continue;
        }
        let Ok(meta) = meta_at(dir.fd.as_fd(), name_os) else {
            // Gone since readdir.
            last = Some(name);
            continue;
        };
        let link = if meta.file_type().is_symlink() {
            sys::readlinkat(dir.fd.as_fd(), name_os).ok()
        } else {
            None
        };
        let shown = String::from_utf8_lossy(name).into_owned();
        let st = to_file_stat(format!("{base}/{shown}"), shown, &meta, link.as_deref());
        let len = st.encoded_len() + 4;
        // Room is kept for the page token (a hex name of at most 255 bytes).
        if size + len + 2 * 256 + 8 > LIST_PAGE_BUDGET_BYTES && !out.entries.is_empty() {
            more = true;
            break;
        }
        size += len;
        out.entries.push(st);
        last = Some(name);
    }
    if more {
        out.next_page_token = last.map(hex).unwrap_or_default();
        if after.is_none() {
            // A listing over more than one page: its names are kept for the next pages.
            listings.keep(id, fresh, now);
        }
    }
    Ok(out)
}

/// Creates a directory (and its parents with `parents`, where an existing directory is fine).
pub fn mkdir(policy: &PathPolicy, req: &MkdirRequest) -> OpResult<()> {
    let mode = match req.mode & 0o7777 {
        0 => DEFAULT_DIR_MODE,
        m => m,
    };
    let parent = policy.open_parent(&req.path, req.parents.then_some(DEFAULT_DIR_MODE))?;
    let open_it = || {
        sys::openat(
            parent.dir.as_fd(),
            &parent.name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => OpError::new(
                ErrorCode::AlreadyExists,
                format!("{} exists and is not a directory", req.path),
            ),
            _ => OpError::io(&req.path, &e),
        })
    };
    match sys::mkdirat(parent.dir.as_fd(), &parent.name, DEFAULT_DIR_MODE) {
        Ok(()) => {}
        Err(e) if req.parents && e.kind() == std::io::ErrorKind::AlreadyExists => {
            return open_it().map(drop);
        }
        Err(e) => return Err(OpError::io(&req.path, &e)),
    }
    // The umask applied to the mkdir; the requested mode is set exactly on the new directory.
    File::from(open_it()?)
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| OpError::io(&req.path, &e))
}

/// Deepest directory nesting a recursive delete descends (each level holds a descriptor).
pub const MAX_DELETE_DEPTH: usize = 256;

/// Deletes a file, a symlink (not its target), an empty directory, or with `recursive` a
/// whole tree: walked by descriptor, symlinks inside removed and never followed, directories
/// of other filesystems mounted inside left alone (and reported).
pub fn delete(policy: &PathPolicy, req: &DeleteRequest) -> OpResult<()> {
    let parent = policy.open_parent(&req.path, None)?;
    let dir = parent.dir.as_fd();
    let meta = meta_at(dir, &parent.name).map_err(|e| OpError::io(&req.path, &e))?;
    if !meta.is_dir() {
        return sys::unlinkat(dir, &parent.name, false).map_err(|e| OpError::io(&req.path, &e));
    }
    if !req.recursive {
        return sys::unlinkat(dir, &parent.name, true).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTEMPTY) {
                OpError::new(
                    ErrorCode::FailedPrecondition,
                    format!("{}: directory is not empty (set recursive)", req.path),
                )
            } else {
                OpError::io(&req.path, &e)
            }
        });
    }
    if policy.reaches_denied(&parent.real) {
        return Err(OpError::new(
            ErrorCode::PolicyDenied,
            format!("{}: the tree holds a denied prefix", req.path),
        ));
    }
    remove_tree(dir, &parent.name, meta.dev(), &req.path)
}

/// A directory being emptied by [`remove_tree`].
struct Level {
    fd: OwnedFd,
    name: OsString,
    left: Vec<OsString>,
}

/// Opens the directory `name` of `parent` for emptying: never through a symlink, and only on
/// filesystem `dev`. `Ok(None)`: another filesystem.
fn open_level(parent: BorrowedFd<'_>, name: &OsStr, dev: u64) -> std::io::Result<Option<Level>> {
    let fd = sys::openat(
        parent,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    let file = File::from(fd);
    if file.metadata()?.dev() != dev {
        return Ok(None);
    }
    let fd = OwnedFd::from(file);
    let left = sys::read_dir_names(fd.as_fd())?;
    Ok(Some(Level {
        fd,
        name: name.to_os_string(),
        left,
    }))
}

/// Removes the directory `name` of `parent` and everything in it that is on filesystem `dev`.
fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr, dev: u64, what: &str) -> OpResult<()> {
    let io = |e: std::io::Error| OpError::io(what, &e);
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut skipped = 0usize;
    let mut stack: Vec<Level> = match open_level(parent, name, dev).map_err(io)? {
        Some(top) => vec![top],
        // Swapped for another filesystem's directory since it was looked at.
        None => {
            return Err(OpError::new(
                ErrorCode::FailedPrecondition,
                format!("{what} changed while it was being opened; nothing was deleted"),
            ))
        }
    };
    while let Some(level) = stack.last_mut() {
        let Some(entry) = level.left.pop() else {
            let Some(done) = stack.pop() else { break };
            drop(done.fd);
            let up = stack.last().map_or(parent, |l| l.fd.as_fd());
            match sys::unlinkat(up, &done.name, true) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && skipped > 0 => {}
                Err(e) if !gone(&e) => return Err(io(e)),
                _ => {}
            }
            continue;
        };
        let depth = stack.len();
        let here = stack[depth - 1].fd.as_fd();
        let meta = match meta_at(here, &entry) {
            Ok(m) => m,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(io(e)),
        };
        if !meta.is_dir() {
            match sys::unlinkat(here, &entry, false) {
                Err(e) if !gone(&e) => return Err(io(e)),
                _ => continue,
            }
        }
        if meta.dev() != dev {
            skipped += 1;
            continue;
        }
        if depth >= MAX_DELETE_DEPTH {
            return Err(OpError::new(
                ErrorCode::FailedPrecondition,
                format!("{what}: the tree is nested deeper than {MAX_DELETE_DEPTH} directories"),
            ));
        }
        match open_level(here, &entry, dev) {
            Ok(Some(next)) => stack.push(next),
            Ok(None) => skipped += 1,
            Err(e) if gone(&e) => {}
            Err(e) => return Err(io(e)),
        }
    }
    if skipped > 0 {
        return Err(OpError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "{what}: {skipped} directories on other filesystems (mount points) were left alone with the directories holding them; the rest was deleted"
            ),
        ));
    }
    Ok(())
}

/// Opens a regular file for reading without blocking on FIFOs or devices.
fn open_regular(policy: &PathPolicy, path: &str) -> OpResult<(File, Metadata)> {
    let opened = policy.open(
        path,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        false,
    )?;
    let file = File::from(opened.fd);
    let meta = file.metadata().map_err(|e| OpError::io(path, &e))?;
    if !meta.is_file() {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("{path} is not a regular file"),
        ));
    }
    Ok((file, meta))
}

fn read_some(file: &mut File, buf: &mut [u8], what: &str) -> OpResult<usize> {
    loop {
        match file.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(OpError::io(what, &e)),
        }
    }
}

/// A read transfer: [`FileChunk`]s, a few per [`FileReader::next_chunks`] call.
#[derive(Debug)]
pub struct FileReader {
    path: String,
    file: File,
    offset: u64,
    /// Bytes still wanted; `None`: to the end of the file.
    remaining: Option<u64>,
    chunk_bytes: u32,
    file_size: u64,
    sent: u64,
    /// `None` when the request set `skip_sha256`.
    sha: Option<Sha256>,
    /// CRC32C of the bytes sent, always: the host's end-to-end check.
    crc: u32,
    finished: bool,
}

impl FileReader {
    /// Opens `req.path` at `req.offset`. The chunk size is the request's, else
    /// `default_chunk`, capped at [`MAX_CHUNK_BYTES`].
    pub fn open(
        policy: &PathPolicy,
        req: &FileReadRequest,
        default_chunk: u32,
    ) -> OpResult<FileReader> {
        let (mut file, meta) = open_regular(policy, &req.path)?;
        if req.offset > 0 {
            file.seek(SeekFrom::Start(req.offset))
                .map_err(|e| OpError::io(&req.path, &e))?;
        }
        let chunk = [req.chunk_bytes, default_chunk, DEFAULT_CHUNK_BYTES]
            .into_iter()
            .find(|&c| c > 0)
            .unwrap_or(DEFAULT_CHUNK_BYTES)
            .min(MAX_CHUNK_BYTES);
        Ok(FileReader {
            path: req.path.clone(),
            file,
            offset: req.offset,
            remaining: (req.length > 0).then_some(req.length),
            chunk_bytes: chunk,
            file_size: meta.size(),
            sent: 0,
            sha: (!req.skip_sha256).then(Sha256::new),
            crc: 0,
            finished: false,
        })
    }

    /// The next chunk with the CRC32C of its data, or `None` when the range (or the file) is
    /// complete. Read into `buf`, the data of a chunk already sent (or an empty one): its
    /// memory is used again, and only what it lacks of a chunk's length is zeroed first.
    fn next_chunk(&mut self, buf: Vec<u8>) -> OpResult<Option<(FileChunk, u32)>> {
        if self.finished {
            return Ok(None);
        }
        let want = match self.remaining {
            Some(r) => r.min(u64::from(self.chunk_bytes)) as usize,
            None => self.chunk_bytes as usize,
        };
        if want == 0 {
            self.finished = true;
            return Ok(None);
        }
        let mut data = buf;
        data.resize(want, 0);
        let n = read_some(&mut self.file, &mut data, &self.path)?;
        if n == 0 {
            self.finished = true;
            return Ok(None);
        }
        data.truncate(n);
        if let Some(sha) = self.sha.as_mut() {
            sha.update(&data);
        }
        // One pass over the data: the chunk's CRC goes into the read's and, by the outbox,
        // into the frame's checksum.
        let crc = qx_proto::crc32c(&data);
        self.crc = qx_proto::crc32c_combine(self.crc, crc, n);
        let chunk = FileChunk {
            offset: self.offset,
            data,
        };
        self.offset += n as u64;
        self.sent += n as u64;
        if let Some(r) = self.remaining.as_mut() {
            *r -= n as u64;
        }
        Ok(Some((chunk, crc)))
    }

    /// Up to `count` next chunks, read in one go on the worker into `bufs` (the data of
    /// chunks already sent) or new buffers; empty once the read is done. An error drops the
    /// chunks read before it: the read ends with the error.
    pub fn next_chunks(
        &mut self,
        count: usize,
        mut bufs: Vec<Vec<u8>>,
    ) -> OpResult<Vec<(FileChunk, u32)>> {
        let mut chunks = Vec::with_capacity(count);
        while chunks.len() < count {
            match self.next_chunk(bufs.pop().unwrap_or_default())? {
                Some(c) => chunks.push(c),
                None => break,
            }
        }
        Ok(chunks)
    }

    /// The terminal reply: bytes sent, the file's size at open, sha256 of the bytes sent
    /// (empty when the request set `skip_sha256`) and their CRC32C.
    pub fn done(&self) -> FileReadDone {
        FileReadDone {
            bytes: self.sent,
            file_size: self.file_size,
            sha256: self
                .sha
                .as_ref()
                .map_or_else(Vec::new, |s| s.clone().finish().to_vec()),
            crc32c: self.crc,
        }
    }
}

/// A sha256 of a whole file, computed `budget_bytes` per step.
#[derive(Debug)]
pub struct FileHasher {
    path: String,
    file: File,
    sha: Sha256,
    size: u64,
    buf: Vec<u8>,
    result: Option<FileHash>,
}

impl FileHasher {
    pub fn open(policy: &PathPolicy, req: &FileHashRequest) -> OpResult<FileHasher> {
        let (file, _) = open_regular(policy, &req.path)?;
        Ok(FileHasher {
            path: req.path.clone(),
            file,
            sha: Sha256::new(),
            size: 0,
            buf: vec![0u8; 64 * 1024],
            result: None,
        })
    }

    /// Hashes up to `budget_bytes` (at least one read); `Some` once the whole file is hashed.
    pub fn step(&mut self, budget_bytes: usize) -> OpResult<Option<FileHash>> {
        if let Some(r) = &self.result {
            return Ok(Some(r.clone()));
        }
        let mut done = 0usize;
        loop {
            let want = self.buf.len().min(budget_bytes.saturating_sub(done).max(1));
            let n = read_some(&mut self.file, &mut self.buf[..want], &self.path)?;
            if n == 0 {
                let r = FileHash {
                    sha256: self.sha.clone().finish().to_vec(),
                    size: self.size,
                };
                self.result = Some(r.clone());
                return Ok(Some(r));
            }
            self.sha.update(&self.buf[..n]);
            self.size += n as u64;
            done += n;
            if done >= budget_bytes {
                return Ok(None);
            }
        }
    }
}

#[derive(Debug)]
struct Writer {
    requested: String,
    /// The target's directory (O_PATH); the temp file and the target are names in it.
    dir: OwnedFd,
    name: OsString,
    temp: OsString,
    file: File,
    next_offset: u64,
    /// `None` when the open set `skip_sha256`.
    sha: Option<Sha256>,
    /// CRC32C of the content written.
    crc: u32,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
    overwrite: bool,
}

impl Writer {
    fn remove_temp(&self) {
        let _ = sys::unlinkat(self.dir.as_fd(), &self.temp, false);
    }
}

/// The temporary file of an upload that was given up, still to be removed: a name in its
/// directory, held by descriptor so that the removal cannot be redirected.
#[derive(Debug)]
pub struct AbandonedTemp {
    dir: OwnedFd,
    name: OsString,
}

impl AbandonedTemp {
    /// Removes the file; one that is already gone is not an error.
    pub fn remove(self) {
        if let Err(e) = sys::unlinkat(self.dir.as_fd(), &self.name, false) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", Path::new(&self.name).display());
            }
        }
    }
}

/// Open write transfers, by handle.
#[derive(Debug)]
pub struct FileWriters {
    max_open: usize,
    next_handle: u64,
    /// In handle order; at most `max_open` (a list searched is as fast as a map at that size,
    /// and a fraction of the code).
    open: Vec<(u64, Writer)>,
    users: UserDb,
}

impl FileWriters {
    /// At most `max_open` concurrent transfers; owners resolved with the system's user db.
    pub fn new(max_open: usize) -> Self {
        FileWriters::with_user_db(max_open, UserDb::system())
    }

    pub fn with_user_db(max_open: usize, users: UserDb) -> Self {
        FileWriters {
            max_open,
            next_handle: 1,
            open: Vec::new(),
            users,
        }
    }

    /// Number of open transfers.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Starts a transfer into a new temp file beside `req.path`.
    ///
    /// Empty owner/group: those of the file being replaced, else the agent's. Mode 0: 0644.
    pub fn open(&mut self, policy: &PathPolicy, req: &FileWriteOpen) -> OpResult<FileWriteOpened> {
        if self.open.len() >= self.max_open {
            return Err(OpError::new(
                ErrorCode::Busy,
                format!("{} file writes are already open", self.open.len()),
            ));
        }
        let parent =
            policy.open_parent(&req.path, req.create_parents.then_some(DEFAULT_DIR_MODE))?;
        let existing = match meta_at(parent.dir.as_fd(), &parent.name) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(OpError::io(&req.path, &e)),
        };
        if let Some(m) = &existing {
            if m.file_type().is_symlink() {
                return Err(OpError::new(
                    ErrorCode::PolicyDenied,
                    format!("{} is a symlink; refusing to write through it", req.path),
                ));
            }
            if m.is_dir() {
                return Err(OpError::new(
                    ErrorCode::InvalidArgument,
                    format!("{} is a directory", req.path),
                ));
            }
            if !req.overwrite {
                return Err(OpError::new(
                    ErrorCode::AlreadyExists,
                    format!("{} exists (set overwrite)", req.path),
                ));
            }
        }
        let mut owner = match req.owner.as_str() {
            "" => None,
            o => Some(self.users.uid(o)?),
        };
        let mut group = match req.group.as_str() {
            "" => None,
            g => Some(self.users.gid(g)?),
        };
        if let Some(m) = &existing {
            owner = owner.or(Some(m.uid()));
            group = group.or(Some(m.gid()));
        }
        let suffix = crate::sys::random_u64().map_err(|e| OpError::io("getrandom", &e))?;
        // A long target name is shortened in the temp name so it stays under NAME_MAX.
        let name = parent.name.as_bytes();
        let short = &name[..name.len().min(200)];
        let mut temp = OsString::from(".");
        temp.push(OsStr::from_bytes(short));
        temp.push(format!(".qx-{suffix:016x}.tmp"));
        let fd = sys::openat(
            parent.dir.as_fd(),
            &temp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(|e| OpError::io(&req.path, &e))?;
        let file = File::from(fd);
        let handle = self.next_handle;
        self.next_handle += 1;
        self.open.push((
            handle,
            Writer {
                requested: req.path.clone(),
                dir: parent.dir,
                name: parent.name,
                temp,
                file,
                next_offset: 0,
                sha: (!req.skip_sha256).then(Sha256::new),
                crc: 0,
                mode: match req.mode & 0o7777 {
                    0 => DEFAULT_FILE_MODE,
                    m => m,
                },
                owner,
                group,
                overwrite: req.overwrite,
            },
        ));
        Ok(FileWriteOpened { handle })
    }

    /// Appends one chunk; its offset must be the next expected one. `data_crc`: the CRC32C of
    /// its data when already known (from the frame's checksum).
    pub fn write(&mut self, req: &FileWriteChunk, data_crc: Option<u32>) -> OpResult<()> {
        let (_, w) = self
            .open
            .iter_mut()
            .find(|(h, _)| *h == req.handle)
            .ok_or_else(|| unknown_handle(req.handle))?;
        if req.offset != w.next_offset {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "{}: chunk at offset {} but the next expected offset is {}",
                    w.requested, req.offset, w.next_offset
                ),
            ));
        }
        w.file
            .write_all(&req.data)
            .map_err(|e| OpError::io(&w.requested, &e))?;
        if let Some(sha) = w.sha.as_mut() {
            sha.update(&req.data);
        }
        let crc = data_crc.unwrap_or_else(|| qx_proto::crc32c(&req.data));
        w.crc = qx_proto::crc32c_combine(w.crc, crc, req.data.len());
        w.next_offset += req.data.len() as u64;
        Ok(())
    }

    /// Commits (fsync, owner, mode, rename, fsync dir) or aborts (unlink) a transfer. The
    /// handle is gone afterwards either way; a failed commit leaves the target untouched.
    pub fn close(&mut self, req: &FileWriteClose) -> OpResult<FileWriteDone> {
        let at = self
            .open
            .iter()
            .position(|(h, _)| *h == req.handle)
            .ok_or_else(|| unknown_handle(req.handle))?;
        let (_, w) = self.open.remove(at);
        let digest = w.sha.as_ref().map(|s| s.clone().finish());
        let sha256 = digest.map_or_else(Vec::new, |d| d.to_vec());
        if !req.commit {
            w.remove_temp();
            return Ok(FileWriteDone {
                bytes: w.next_offset,
                sha256,
                committed: false,
                crc32c: w.crc,
            });
        }
        let result = check_content(&w, digest.as_ref(), req).and_then(|()| commit(&w));
        if result.is_err() {
            w.remove_temp();
        }
        result?;
        Ok(FileWriteDone {
            bytes: w.next_offset,
            sha256,
            committed: true,
            crc32c: w.crc,
        })
    }

    /// Ends every open transfer without touching its filesystem and returns the temporary
    /// files, for the caller to remove when that cannot block (not while frozen).
    pub fn abandon_all(&mut self) -> Vec<AbandonedTemp> {
        std::mem::take(&mut self.open)
            .into_iter()
            .map(|(_, w)| AbandonedTemp {
                dir: w.dir,
                name: w.temp,
            })
            .collect()
    }

    /// Aborts every open transfer (temp files removed).
    pub fn abort_all(&mut self) {
        for (_, w) in std::mem::take(&mut self.open) {
            w.remove_temp();
        }
    }
}

impl Drop for FileWriters {
    fn drop(&mut self) {
        self.abort_all();
    }
}

fn unknown_handle(handle: u64) -> OpError {
    OpError::new(
        ErrorCode::NotFound,
        format!("no open file write with handle {handle}"),
    )
}

/// Checks the content written against the close's expected sha256 and CRC32C, when given.
fn check_content(w: &Writer, digest: Option<&[u8; 32]>, req: &FileWriteClose) -> OpResult<()> {
    let what = w.requested.as_str();
    let expected = req.expected_sha256.as_slice();
    if !expected.is_empty() {
        if expected.len() != 32 {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!("expected_sha256 has {} bytes, not 32", expected.len()),
            ));
        }
        let Some(digest) = digest else {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "{what}: expected_sha256 given for a write opened with skip_sha256; nothing was written"
                ),
            ));
        };
        if expected != digest {
            return Err(OpError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "{what}: content sha256 {} does not match the expected {}; nothing was written",
                    hex(digest),
                    hex(expected)
                ),
            ));
        }
    }
    match req.expected_crc32c {
        Some(crc) if crc != w.crc => Err(OpError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "{what}: content crc32c {:08x} does not match the expected {crc:08x}; nothing was written",
                w.crc
            ),
        )),
        _ => Ok(()),
    }
}

fn commit(w: &Writer) -> OpResult<()> {
    let what = w.requested.as_str();
    w.file.sync_all().map_err(|e| OpError::io(what, &e))?;
    if w.owner.is_some() || w.group.is_some() {
        std::os::unix::fs::fchown(&w.file, w.owner, w.group).map_err(|e| OpError::io(what, &e))?;
    }
    // After chown, which clears set-id bits.
    w.file
        .set_permissions(std::fs::Permissions::from_mode(w.mode))
        .map_err(|e| OpError::io(what, &e))?;
    let dir = w.dir.as_fd();
    if w.overwrite {
        // renameat replaces a name that became a symlink meanwhile; it never follows it.
        sys::renameat(dir, &w.temp, dir, &w.name).map_err(|e| OpError::io(what, &e))?;
    } else {
        // link(2) refuses to replace, so a file that appeared since open is not clobbered.
        sys::linkat(dir, &w.temp, dir, &w.name).map_err(|e| OpError::io(what, &e))?;
        w.remove_temp();
    }
    sys::openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .and_then(|d| File::from(d).sync_all())
        .map_err(|e| OpError::io(&format!("directory of {what}"), &e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::ops::testutil::TempDir;
    use std::os::unix::fs::symlink;

    use crate::sys::attack::{Attacker, Move};
    use std::ffi::CString;
    use std::path::PathBuf;

    /// The unprivileged guest user of the attack tests.
    const USER: u32 = 65534;

    fn c(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    /// A world-writable sticky directory like /tmp, and a root-owned file outside it.
    fn sticky_tmp(t: &TempDir) -> (PathBuf, PathBuf) {
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let tmp = t.join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let victim = t.join("victim");
        std::fs::write(&victim, b"root's data\n").unwrap();
        (tmp, victim)
    }

    /// As the user, once.
    fn as_user(moves: &[Move]) {
        assert_eq!(
            Attacker::start(USER, USER, moves, false)
                .unwrap()
                .wait()
                .unwrap(),
            0
        );
    }

    #[test]
    fn a_write_to_a_users_symlink_does_not_overwrite_its_target() {
        let t = TempDir::new("attack-write");
        let (tmp, victim) = sticky_tmp(&t);
        let link = tmp.join("report.txt");
        as_user(&[Move::Symlink {
            target: c(&victim),
            link: c(&link),
        }]);
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        // Even with everything allowed (the old default `file_allow = /`).
        let pol = PathPolicy::allow_all();
        let mut w = FileWriters::new(4);
        let mut req = open_req(link.display().to_string());
        req.overwrite = true;
        let result = w.open(&pol, &req).and_then(|o| {
            w.write(
                &FileWriteChunk {
                    handle: o.handle,
                    offset: 0,
                    data: b"pwned\n".to_vec(),
                },
                None,
            )?;
            w.close(&FileWriteClose {
                handle: o.handle,
                commit: true,
                expected_sha256: vec![],
                expected_crc32c: None,
            })
        });
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's data\n");
        let e = result.unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied, "{e}");
        assert!(e.message.contains("symlink"), "{e}");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_recursive_delete_below_a_users_symlink_does_not_reach_its_target() {
        let t = TempDir::new("attack-delete");
        let (tmp, _) = sticky_tmp(&t);
        let lib = t.join("var-lib");
        std::fs::create_dir_all(lib.join("mysql")).unwrap();
        std::fs::write(lib.join("mysql/canary"), b"c").unwrap();
        as_user(&[Move::Symlink {
            target: c(&lib),
            link: c(&tmp.join("build")),
        }]);
        let pol = PathPolicy::allow_all();
        let result = delete(
            &pol,
            &DeleteRequest {
                path: tmp.join("build/mysql").display().to_string(),
                recursive: true,
            },
        );
        assert!(
            lib.join("mysql/canary").exists(),
            "deleted through the link"
        );
        let e = result.unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied, "{e}");
        assert!(e.message.contains("symlink"), "{e}");
    }

    #[test]
    fn a_read_through_a_users_symlink_is_refused_while_it_races() {
        let t = TempDir::new("attack-read");
        let (tmp, victim) = sticky_tmp(&t);
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The user keeps planting and removing a link to root's file.
        let name = tmp.join("r");
        let _user = Attacker::start(
            USER,
            USER,
            &[
                Move::Symlink {
                    target: c(&victim),
                    link: c(&name),
                },
                Move::Unlink(c(&name)),
            ],
            true,
        )
        .unwrap();
        let pol = PathPolicy::allow_all();
        for _ in 0..2000 {
            let req = FileReadRequest {
                path: name.display().to_string(),
                ..Default::default()
            };
            if let Ok(mut r) = FileReader::open(&pol, &req, 0) {
                let (data, _) = read_all(&mut r);
                assert_ne!(data, b"root's data\n", "read root's file through the link");
            }
        }
    }

    #[test]
    fn a_recursive_delete_leaves_a_filesystem_mounted_inside_alone() {
        let t = TempDir::new("delete-mount");
        let mnt = t.join("tree/sub/mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::write(t.join("tree/sub/f"), b"x").unwrap();
        // Needs root (the CI machine runs the tests as root).
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "qx-issue15"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::write(mnt.join("keep"), b"k").unwrap();
        let result = delete(
            &PathPolicy::allow_all(),
            &DeleteRequest {
                path: t.s("tree"),
                recursive: true,
            },
        );
        let kept = mnt.join("keep").exists();
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        assert!(kept, "deleted inside another filesystem");
        let e = result.unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e}");
        assert!(e.message.contains("mount point"), "{e}");
        assert!(!t.join("tree/sub/f").exists());
    }

    fn policy_for(t: &TempDir) -> PathPolicy {
        std::fs::create_dir_all(t.join("allowed/denied")).unwrap();
        std::fs::create_dir_all(t.join("outside")).unwrap();
        PathPolicy::new(vec![t.join("allowed")], vec![t.join("allowed/denied")])
    }

    fn read_all(r: &mut FileReader) -> (Vec<u8>, Vec<FileChunk>) {
        let mut data = Vec::new();
        let mut chunks = Vec::new();
        while let Some((c, crc)) = r.next_chunks(1, Vec::new()).unwrap().pop() {
            assert_eq!(crc, qx_proto::crc32c(&c.data));
            assert_eq!(
                c.offset,
                chunks
                    .iter()
                    .map(|c: &FileChunk| c.offset + c.data.len() as u64)
                    .next_back()
                    .unwrap_or(c.offset)
            );
            data.extend_from_slice(&c.data);
            chunks.push(c);
        }
        (data, chunks)
    }

    #[test]
    fn read_with_skip_sha256_sends_the_same_bytes_and_an_empty_digest() {
        let t = TempDir::new("read-nosha");
        let pol = policy_for(&t);
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(t.join("allowed/f"), &content).unwrap();
        let req = FileReadRequest {
            path: t.s("allowed/f"),
            skip_sha256: true,
            ..Default::default()
        };
        let mut r = FileReader::open(&pol, &req, 0).unwrap();
        let (data, _) = read_all(&mut r);
        assert_eq!(data, content);
        let done = r.done();
        assert_eq!(done.bytes, content.len() as u64);
        assert!(done.sha256.is_empty());
    }

    #[test]
    fn read_reports_the_crc32c_of_what_was_sent_with_or_without_sha256() {
        let t = TempDir::new("read-crc");
        let pol = policy_for(&t);
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(t.join("allowed/f"), &content).unwrap();
        for skip_sha256 in [true, false] {
            let req = FileReadRequest {
                path: t.s("allowed/f"),
                offset: 1000,
                length: 50_000,
                chunk_bytes: 4096,
                skip_sha256,
            };
            let mut r = FileReader::open(&pol, &req, 0).unwrap();
            let (data, _) = read_all(&mut r);
            assert_eq!(data, content[1000..51_000]);
            assert_eq!(r.done().crc32c, qx_proto::crc32c(&content[1000..51_000]));
        }
    }

    #[test]
    fn read_streams_the_range_in_capped_chunks_with_the_sha_of_what_was_sent() {
        let t = TempDir::new("read");
        let pol = policy_for(&t);
        let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(t.join("allowed/f"), &content).unwrap();
        let req = FileReadRequest {
            path: t.s("allowed/f"),
            offset: 0,
            length: 0,
            chunk_bytes: 1_000_000,
            skip_sha256: false,
        };
        let mut r = FileReader::open(&pol, &req, 0).unwrap();
        let (data, chunks) = read_all(&mut r);
        assert_eq!(data, content);
        assert!(chunks
            .iter()
            .all(|c| c.data.len() <= MAX_CHUNK_BYTES as usize));
        assert_eq!(chunks[0].data.len(), MAX_CHUNK_BYTES as usize);
        let done = r.done();
        assert_eq!(done.bytes, content.len() as u64);
        assert_eq!(done.file_size, content.len() as u64);
        assert_eq!(done.sha256, Sha256::digest(&content).to_vec());
        assert_eq!(r.next_chunks(1, Vec::new()).unwrap().pop(), None);

        let req = FileReadRequest {
            path: t.s("allowed/f"),
            offset: 1000,
            length: 5000,
            chunk_bytes: 4096,
            skip_sha256: false,
        };
        let mut r = FileReader::open(&pol, &req, 0).unwrap();
        let (data, chunks) = read_all(&mut r);
        assert_eq!(data, &content[1000..6000]);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].offset, 1000);
        assert_eq!(
            r.done().sha256,
            Sha256::digest(&content[1000..6000]).to_vec()
        );
    }

    #[test]
    fn read_of_a_proc_file_reports_size_zero_but_sends_its_content() {
        let pol = PathPolicy::allow_all();
        let req = FileReadRequest {
            path: "/proc/self/mountinfo".into(),
            ..Default::default()
        };
        let mut r = FileReader::open(&pol, &req, 0).unwrap();
        let (data, _) = read_all(&mut r);
        let text = String::from_utf8(data).unwrap();
        assert!(text.lines().any(|l| l.contains(" / / ")), "{text}");
        let done = r.done();
        assert_eq!(done.file_size, 0);
        assert_eq!(done.bytes, text.len() as u64);
    }

    #[test]
    fn read_refuses_missing_files_fifos_and_policy_escapes() {
        let t = TempDir::new("read-err");
        let pol = policy_for(&t);
        let open = |p: String| {
            FileReader::open(
                &pol,
                &FileReadRequest {
                    path: p,
                    ..Default::default()
                },
                0,
            )
            .unwrap_err()
        };
        assert_eq!(open(t.s("allowed/missing")).code, ErrorCode::NotFound);
        let fifo = std::ffi::CString::new(t.s("allowed/fifo")).unwrap();
        assert_eq!(
            std::process::Command::new("mkfifo")
                .arg(t.join("allowed/fifo"))
                .status()
                .unwrap()
                .code(),
            Some(0),
            "{fifo:?}"
        );
        // Would block forever on open without O_NONBLOCK.
        let e = open(t.s("allowed/fifo"));
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("not a regular file"), "{e}");
        std::fs::write(t.join("outside/secret"), b"s").unwrap();
        symlink(t.join("outside/secret"), t.join("allowed/link")).unwrap();
        assert_eq!(open(t.s("allowed/link")).code, ErrorCode::PolicyDenied);
        std::fs::write(t.join("allowed/denied/k"), b"k").unwrap();
        assert_eq!(open(t.s("allowed/denied/k")).code, ErrorCode::PolicyDenied);
        assert_eq!(open(t.s("allowed")).code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn hasher_steps_within_budget_and_matches_sha256sum() {
        let t = TempDir::new("hash");
        let pol = PathPolicy::allow_all();
        let content: Vec<u8> = (0..300_001u32).map(|i| (i * 31 % 256) as u8).collect();
        std::fs::write(t.join("f"), &content).unwrap();
        let mut h = FileHasher::open(&pol, &FileHashRequest { path: t.s("f") }).unwrap();
        let mut steps = 0;
        let result = loop {
            steps += 1;
            if let Some(r) = h.step(100_000).unwrap() {
                break r;
            }
        };
        assert_eq!(steps, 4);
        assert_eq!(result.size, content.len() as u64);
        let out = std::process::Command::new("sha256sum")
            .arg(t.join("f"))
            .output()
            .unwrap();
        let expected = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            hex(&result.sha256),
            expected.split_whitespace().next().unwrap()
        );
    }

    fn open_req(path: String) -> FileWriteOpen {
        FileWriteOpen {
            path,
            mode: 0o640,
            owner: String::new(),
            group: String::new(),
            create_parents: false,
            overwrite: false,
            skip_sha256: false,
        }
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".qx-"))
            .collect()
    }

    #[test]
    fn write_commits_atomically_with_mode_owner_and_hash() {
        let t = TempDir::new("write");
        let pol = policy_for(&t);
        let mut w = FileWriters::new(4);
        let mut req = open_req(t.s("allowed/new/dir/file"));
        assert_eq!(w.open(&pol, &req).unwrap_err().code, ErrorCode::NotFound);
        req.create_parents = true;
        req.owner = "1234".into();
        req.group = "4321".into();
        let h = w.open(&pol, &req).unwrap().handle;
        let target = t.join("allowed/new/dir/file");
        w.write(
            &FileWriteChunk {
                handle: h,
                offset: 0,
                data: b"hello ".to_vec(),
            },
            None,
        )
        .unwrap();
        w.write(
            &FileWriteChunk {
                handle: h,
                offset: 6,
                data: b"world".to_vec(),
            },
            None,
        )
        .unwrap();
        // Nothing visible before the commit.
        assert!(!target.exists());
        assert_eq!(temp_files(&t.join("allowed/new/dir")).len(), 1);
        let done = w
            .close(&FileWriteClose {
                handle: h,
                commit: true,
                expected_sha256: Sha256::digest(b"hello world").to_vec(),
                expected_crc32c: None,
            })
            .unwrap();
        assert!(done.committed);
        assert_eq!(done.bytes, 11);
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
        let m = std::fs::metadata(&target).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!((m.uid(), m.gid()), (1234, 4321));
        assert!(temp_files(&t.join("allowed/new/dir")).is_empty());
        assert_eq!(w.open_count(), 0);

        // Exists: refused without overwrite, replaced with it (keeping its owner).
        let mut req = open_req(t.s("allowed/new/dir/file"));
        assert_eq!(
            w.open(&pol, &req).unwrap_err().code,
            ErrorCode::AlreadyExists
        );
        req.overwrite = true;
        req.mode = 0;
        let h = w.open(&pol, &req).unwrap().handle;
        w.write(
            &FileWriteChunk {
                handle: h,
                offset: 0,
                data: b"v2".to_vec(),
            },
            None,
        )
        .unwrap();
        w.close(&FileWriteClose {
            handle: h,
            commit: true,
            expected_sha256: vec![],
            expected_crc32c: None,
        })
        .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"v2");
        let m = std::fs::metadata(&target).unwrap();
        assert_eq!(m.mode() & 0o7777, DEFAULT_FILE_MODE);
        assert_eq!((m.uid(), m.gid()), (1234, 4321));
    }

    #[test]
    fn write_without_sha256_commits_only_on_the_expected_crc32c() {
        let t = TempDir::new("write-crc");
        let pol = policy_for(&t);
        let mut w = FileWriters::new(4);
        let target = t.join("allowed/f");
        let mut req = open_req(t.s("allowed/f"));
        req.skip_sha256 = true;
        req.overwrite = true;
        let write = |w: &mut FileWriters| {
            let h = w.open(&pol, &req).unwrap().handle;
            for (i, part) in [&b"hello "[..], b"world"].iter().enumerate() {
                let chunk = FileWriteChunk {
                    handle: h,
                    offset: 6 * i as u64,
                    data: part.to_vec(),
                };
                w.write(&chunk, None).unwrap();
            }
            h
        };
        let crc = qx_proto::crc32c(b"hello world");
        let close = |handle, expected_crc32c, expected_sha256: Vec<u8>| FileWriteClose {
            handle,
            commit: true,
            expected_sha256,
            expected_crc32c,
        };
        // A wrong CRC: nothing is written.
        let h = write(&mut w);
        let e = w.close(&close(h, Some(crc ^ 1), vec![])).unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
        assert!(!target.exists());
        assert!(temp_files(&t.join("allowed")).is_empty());
        // A sha256 cannot be checked when none was computed.
        let h = write(&mut w);
        let sha = Sha256::digest(b"hello world").to_vec();
        let e = w.close(&close(h, Some(crc), sha)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
        assert!(!target.exists());
        // The right one commits, and the reply carries the CRC and no sha256.
        let h = write(&mut w);
        let done = w.close(&close(h, Some(crc), vec![])).unwrap();
        assert!(done.committed);
        assert_eq!((done.bytes, done.crc32c), (11, crc));
        assert!(done.sha256.is_empty());
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
    }

    #[test]
    fn write_rejects_a_wrong_offset_a_wrong_hash_and_unknown_handles() {
        let t = TempDir::new("write-err");
        let pol = policy_for(&t);
        let mut w = FileWriters::new(4);
        let h = w.open(&pol, &open_req(t.s("allowed/f"))).unwrap().handle;
        w.write(
            &FileWriteChunk {
                handle: h,
                offset: 0,
                data: vec![1; 10],
            },
            None,
        )
        .unwrap();
        let e = w
            .write(
                &FileWriteChunk {
                    handle: h,
                    offset: 20,
                    data: vec![2; 10],
                },
                None,
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("next expected offset is 10"), "{e}");
        let e = w
            .close(&FileWriteClose {
                handle: h,
                commit: true,
                expected_sha256: Sha256::digest(b"other").to_vec(),
                expected_crc32c: None,
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(!t.join("allowed/f").exists());
        assert!(temp_files(&t.join("allowed")).is_empty());
        let e = w
            .write(
                &FileWriteChunk {
                    handle: h,
                    offset: 10,
                    data: vec![],
                },
                None,
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(
            w.open(&pol, &open_req(t.s("outside/f"))).unwrap_err().code,
            ErrorCode::PolicyDenied
        );
        assert_eq!(
            w.open(&pol, &open_req(t.s("allowed/denied/f")))
                .unwrap_err()
                .code,
            ErrorCode::PolicyDenied
        );
        let mut req = open_req(t.s("allowed/g"));
        req.owner = "no-such-user-qx".into();
        assert_eq!(w.open(&pol, &req).unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn write_abort_and_abort_all_remove_temp_files_and_limit_open_transfers() {
        let t = TempDir::new("write-abort");
        let pol = policy_for(&t);
        let mut w = FileWriters::new(2);
        let a = w.open(&pol, &open_req(t.s("allowed/a"))).unwrap().handle;
        let _b = w.open(&pol, &open_req(t.s("allowed/b"))).unwrap().handle;
        assert_eq!(
            w.open(&pol, &open_req(t.s("allowed/c"))).unwrap_err().code,
            ErrorCode::Busy
        );
        assert_eq!(temp_files(&t.join("allowed")).len(), 2);
        let done = w
            .close(&FileWriteClose {
                handle: a,
                commit: false,
                expected_sha256: vec![],
                expected_crc32c: None,
            })
            .unwrap();
        assert!(!done.committed);
        assert!(!t.join("allowed/a").exists());
        assert_eq!(temp_files(&t.join("allowed")).len(), 1);
        w.abort_all();
        assert_eq!(w.open_count(), 0);
        assert!(temp_files(&t.join("allowed")).is_empty());
        assert!(!t.join("allowed/b").exists());
    }

    #[test]
    fn write_to_a_name_of_255_bytes_commits() {
        let t = TempDir::new("write-long");
        let pol = PathPolicy::allow_all();
        let mut w = FileWriters::new(1);
        let name = "n".repeat(255);
        let h = w.open(&pol, &open_req(t.s(&name))).unwrap().handle;
        w.write(
            &FileWriteChunk {
                handle: h,
                offset: 0,
                data: b"x".to_vec(),
            },
            None,
        )
        .unwrap();
        w.close(&FileWriteClose {
            handle: h,
            commit: true,
            expected_sha256: vec![],
            expected_crc32c: None,
        })
        .unwrap();
        assert_eq!(std::fs::read(t.join(&name)).unwrap(), b"x");
    }

    #[test]
    fn write_without_overwrite_does_not_clobber_a_file_created_meanwhile() {
        let t = TempDir::new("write-race");
        let pol = PathPolicy::allow_all();
        let mut w = FileWriters::new(2);
        let h = w.open(&pol, &open_req(t.s("f"))).unwrap().handle;
        std::fs::write(t.join("f"), b"theirs").unwrap();
        let e = w
            .close(&FileWriteClose {
                handle: h,
                commit: true,
                expected_sha256: vec![],
                expected_crc32c: None,
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AlreadyExists);
        assert_eq!(std::fs::read(t.join("f")).unwrap(), b"theirs");
        assert!(temp_files(t.path()).is_empty());
    }

    #[test]
    fn list_pages_in_name_order_skipping_denied_entries() {
        let t = TempDir::new("list");
        let pol = policy_for(&t);
        let mut expected = Vec::new();
        for i in 0..25 {
            let name = format!("f{i:02}");
            std::fs::write(t.join(&format!("allowed/{name}")), vec![0; i]).unwrap();
            expected.push(name);
        }
        symlink("/etc/passwd", t.join("allowed/zlink")).unwrap();
        expected.push("zlink".into());
        let mut names = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = list(
                &pol,
                &mut Listings::default(),
                &FileListRequest {
                    path: t.s("allowed"),
                    page_size: 10,
                    page_token: token.clone(),
                },
                Instant::now(),
            )
            .unwrap();
            pages += 1;
            assert!(page.entries.len() <= 10);
            for e in &page.entries {
                assert_eq!(e.path, format!("{}/{}", t.s("allowed"), e.name));
                if e.name == "zlink" {
                    assert_eq!(e.file_type, FileType::Symlink as i32);
                    assert_eq!(e.symlink_target, "/etc/passwd");
                } else {
                    assert_eq!(e.file_type, FileType::Regular as i32);
                    assert_eq!(e.size, e.name[1..].parse::<u64>().unwrap());
                }
                names.push(e.name.clone());
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        // "denied" (a denied prefix) is left out.
        assert_eq!(names, expected);
        assert_eq!(pages, 3);
        let e = list(
            &pol,
            &mut Listings::default(),
            &FileListRequest {
                path: t.s("allowed"),
                page_size: 0,
                page_token: "zz".into(),
            },
            Instant::now(),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
    }

    /// Every page of `path`'s listing, `page_size` entries each, calling `between` after
    /// the first page.
    fn list_all(pol: &PathPolicy, path: &str, page_size: u32, between: impl Fn()) -> Vec<String> {
        let mut listings = Listings::default();
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let req = FileListRequest {
                path: path.into(),
                page_size,
                page_token: token.clone(),
            };
            let page = list(pol, &mut listings, &req, Instant::now()).unwrap();
            names.extend(page.entries.into_iter().map(|e| e.name));
            if page.next_page_token.is_empty() {
                return names;
            }
            if token.is_empty() {
                between();
            }
            token = page.next_page_token;
        }
    }

    #[test]
    fn a_listing_reads_its_directory_once() {
        let t = TempDir::new("list-once");
        let pol = PathPolicy::allow_all();
        let mut expected: Vec<String> = (0..25).map(|i| format!("f{i:02}")).collect();
        for name in &expected {
            std::fs::write(t.join(name), b"").unwrap();
        }
        // A file made after the first page is not in this listing: the later pages come
        // from the names read for the first one, not from a new read of the directory.
        let names = list_all(&pol, &t.s(""), 10, || {
            std::fs::write(t.join("zz-new"), b"").unwrap();
        });
        assert_eq!(names, expected);
        // A new listing reads the directory again.
        expected.push("zz-new".into());
        assert_eq!(list_all(&pol, &t.s(""), 10, || {}), expected);
    }

    #[test]
    fn kept_listings_stay_within_their_budget_and_idle_time() {
        let t0 = Instant::now();
        let names = |n: usize, len: usize| -> Vec<Vec<u8>> { vec![vec![b'x'; len]; n] };
        let mut l = Listings::default();
        // At most MAX_LISTINGS: the least recently used goes first.
        for d in 0..MAX_LISTINGS as u64 {
            assert!(l.keep((1, d), names(10, 8), t0 + Duration::from_secs(d)));
        }
        assert!(l.touch((1, 0), t0 + Duration::from_secs(10)));
        assert!(l.keep((1, 99), names(10, 8), t0 + Duration::from_secs(11)));
        assert!(
            l.touch((1, 0), t0 + Duration::from_secs(12)),
            "used recently, kept"
        );
        assert!(
            !l.touch((1, 1), t0 + Duration::from_secs(12)),
            "least recently used"
        );
        // Names beyond the budget are not kept, and make room by dropping others.
        let per = name_cost(&[b'x'; 100]);
        assert!(!l.keep((2, 0), names(LISTINGS_BUDGET_BYTES / per + 1, 100), t0));
        assert!(l.keep((2, 1), names(LISTINGS_BUDGET_BYTES / per, 100), t0));
        let kept: usize = l.open.iter().map(|x| x.bytes).sum();
        assert!(kept <= LISTINGS_BUDGET_BYTES);
        assert_eq!(l.names_of((2, 1)).len(), LISTINGS_BUDGET_BYTES / per);
        // A listing not paged for LISTING_IDLE is gone.
        let later = t0 + LISTING_IDLE + Duration::from_secs(1);
        assert!(!l.touch((2, 1), later));
        assert!(l.open.is_empty());
    }

    #[test]
    fn list_page_stays_under_the_frame_budget_with_long_names() {
        let t = TempDir::new("list-big");
        let pol = PathPolicy::allow_all();
        for i in 0..400 {
            std::fs::write(t.join(&format!("{i:03}{}", "n".repeat(200))), b"").unwrap();
        }
        let page = list(
            &pol,
            &mut Listings::default(),
            &FileListRequest {
                path: t.s(""),
                page_size: 1000,
                page_token: String::new(),
            },
            Instant::now(),
        )
        .unwrap();
        assert!(page.encoded_len() <= LIST_PAGE_BUDGET_BYTES);
        assert!(page.entries.len() < 400);
        assert!(!page.next_page_token.is_empty());
    }

    #[test]
    fn stat_reports_types_and_follows_symlinks_only_when_asked() {
        let t = TempDir::new("stat");
        let pol = PathPolicy::allow_all();
        std::fs::write(t.join("f"), b"12345").unwrap();
        symlink(t.join("f"), t.join("l")).unwrap();
        let st = stat(
            &pol,
            &FileStatRequest {
                path: t.s("l"),
                follow_symlinks: false,
            },
        )
        .unwrap();
        assert_eq!(st.file_type, FileType::Symlink as i32);
        assert_eq!(st.symlink_target, t.s("f"));
        assert_eq!(st.name, "l");
        let st = stat(
            &pol,
            &FileStatRequest {
                path: t.s("l"),
                follow_symlinks: true,
            },
        )
        .unwrap();
        assert_eq!(st.file_type, FileType::Regular as i32);
        assert_eq!(st.size, 5);
        assert!(st.mtime_unix_ns > 1_500_000_000_000_000_000);
        let st = stat(
            &pol,
            &FileStatRequest {
                path: "/dev/null".into(),
                follow_symlinks: true,
            },
        )
        .unwrap();
        assert_eq!(st.file_type, FileType::Char as i32);
        let e = stat(
            &pol,
            &FileStatRequest {
                path: t.s("missing"),
                follow_symlinks: true,
            },
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn mkdir_creates_parents_with_the_mode_and_delete_removes_trees_not_link_targets() {
        let t = TempDir::new("mkdir");
        let pol = policy_for(&t);
        let req = MkdirRequest {
            path: t.s("allowed/a/b/c"),
            mode: 0o700,
            parents: false,
        };
        assert_eq!(mkdir(&pol, &req).unwrap_err().code, ErrorCode::NotFound);
        let req = MkdirRequest {
            parents: true,
            ..req
        };
        mkdir(&pol, &req).unwrap();
        mkdir(&pol, &req).unwrap();
        let m = std::fs::metadata(t.join("allowed/a/b/c")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o700);
        let again = MkdirRequest {
            parents: false,
            ..req.clone()
        };
        assert_eq!(
            mkdir(&pol, &again).unwrap_err().code,
            ErrorCode::AlreadyExists
        );

        std::fs::write(t.join("outside/keep"), b"k").unwrap();
        symlink(t.join("outside"), t.join("allowed/a/b/link")).unwrap();
        let del = |path: String, recursive: bool| delete(&pol, &DeleteRequest { path, recursive });
        let e = del(t.s("allowed/a"), false).unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        del(t.s("allowed/a"), true).unwrap();
        assert!(!t.join("allowed/a").exists());
        assert!(t.join("outside/keep").exists());
        assert_eq!(
            del(t.s("allowed/a"), true).unwrap_err().code,
            ErrorCode::NotFound
        );
        // A tree holding a denied prefix is refused whole.
        assert_eq!(
            del(t.s("allowed"), true).unwrap_err().code,
            ErrorCode::PolicyDenied
        );
        assert_eq!(
            del("/".into(), true).unwrap_err().code,
            ErrorCode::PolicyDenied
        );
        assert_eq!(
            delete(
                &PathPolicy::allow_all(),
                &DeleteRequest {
                    path: "/".into(),
                    recursive: true
                }
            )
            .unwrap_err()
            .code,
            ErrorCode::InvalidArgument
        );
    }
}
