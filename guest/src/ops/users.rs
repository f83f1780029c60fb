//! Users: logged-in sessions (utmp), passwords (through chpasswd on stdin) and ssh
//! authorized keys (atomic rewrite, owned by the user).
//!
//! Users and groups come from the passwd and group files ([`UserDb`], injectable for tests),
//! not NSS: the agent is static and must not load NSS modules.
//!
//! authorized_keys is rewritten the way sshd expects to find it: `~/.ssh` 0700 and the file
//! 0600, both owned by the user; the new content goes to a temp file in `~/.ssh` that is
//! fsynced and renamed over the old one. The home directory's owner controls `~/.ssh`, so
//! everything goes through descriptors: the home directory is opened, `~/.ssh` is opened (or
//! made) relative to it with O_NOFOLLOW and must be a directory owned by the user (or root),
//! and the temp file is created, given its owner and mode, synced and renamed relative to the
//! `~/.ssh` descriptor. Swapping `~/.ssh` for a symlink at any moment cannot make root chown,
//! read or write anything else. An authorized_keys over 1 MiB is refused whole
//! (INVALID_ARGUMENT), never truncated. Lines that are not keys (comments, blank lines) are
//! kept as they are.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use qx_proto::agent::{
    ErrorCode, LoggedInUser, SetPasswordRequest, SshKeys, SshKeysAddRequest, SshKeysListRequest,
    SshKeysRemoveRequest, UserList,
};

use super::{ChildCommand, OpError, OpResult};
use crate::sys::{self, Beneath};

/// Longest accepted authorized_keys line, and largest file read.
pub const MAX_KEY_BYTES: usize = 16 * 1024;
pub const MAX_AUTHORIZED_KEYS_BYTES: u64 = 1024 * 1024;
/// Timeout for the chpasswd child.
pub const CHPASSWD_TIMEOUT_MS: u32 = 10_000;

/// One passwd entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
}

/// The user and group databases, as files (injectable for tests).
#[derive(Debug, Clone)]
pub struct UserDb {
    passwd: PathBuf,
    group: PathBuf,
}

fn read_db(path: &Path) -> OpResult<String> {
    std::fs::read_to_string(path).map_err(|e| OpError::io(&path.display().to_string(), &e))
}

impl UserDb {
    /// /etc/passwd and /etc/group.
    pub fn system() -> Self {
        UserDb::new(PathBuf::from("/etc/passwd"), PathBuf::from("/etc/group"))
    }

    pub fn new(passwd: PathBuf, group: PathBuf) -> Self {
        UserDb { passwd, group }
    }

    /// The passwd entry of `user` (a name, or a numeric uid).
    pub fn user(&self, user: &str) -> OpResult<PasswdEntry> {
        if user.is_empty() {
            return Err(OpError::new(ErrorCode::InvalidArgument, "user is empty"));
        }
        let text = read_db(&self.passwd)?;
        let by_uid: Option<u32> = user.parse().ok();
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                continue;
            }
            let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
                continue;
            };
            if f[0] == user || by_uid == Some(uid) {
                return Ok(PasswdEntry {
                    name: f[0].to_string(),
                    uid,
                    gid,
                    home: PathBuf::from(f[5]),
                    shell: PathBuf::from(f[6]),
                });
            }
        }
        Err(OpError::new(
            ErrorCode::NotFound,
            format!("no user {user} in {}", self.passwd.display()),
        ))
    }

    /// The uid of `user` (a name, or a numeric uid, which need not be listed).
    pub fn uid(&self, user: &str) -> OpResult<u32> {
        match user.parse::<u32>() {
            Ok(uid) => Ok(uid),
            Err(_) => Ok(self.user(user)?.uid),
        }
    }

    /// The groups `user` is in, as initgroups(3) sets them: the primary group, then every group
    /// of the group file that lists the user as a member.
    pub fn groups(&self, user: &PasswdEntry) -> OpResult<Vec<u32>> {
        let text = read_db(&self.group)?;
        let mut gids = vec![user.gid];
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            let Some((Ok(gid), members)) = f.get(2).map(|g| g.parse::<u32>()).zip(f.get(3)) else {
                continue;
            };
            if members.split(',').any(|m| m.trim() == user.name) && !gids.contains(&gid) {
                gids.push(gid);
            }
        }
        Ok(gids)
    }

    /// The gid of `group` (a name, or a numeric gid, which need not be listed).
    pub fn gid(&self, group: &str) -> OpResult<u32> {
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(gid);
        }
        let text = read_db(&self.group)?;
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 3 && f[0] == group {
                if let Ok(gid) = f[2].parse() {
                    return Ok(gid);
                }
            }
        }
        Err(OpError::new(
            ErrorCode::NotFound,
            format!("no group {group} in {}", self.group.display()),
        ))
    }
}

/// The search path `su -` gives root, and everybody else.
pub const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The environment a login of `user` starts with, as `su -` sets it: HOME, USER, LOGNAME,
/// SHELL (`/bin/sh` when the passwd entry names none) and PATH.
pub fn login_env(user: &PasswdEntry) -> Vec<(String, String)> {
    let shell = match user.shell.as_os_str().is_empty() {
        true => "/bin/sh".to_string(),
        false => user.shell.display().to_string(),
    };
    let path = if user.uid == 0 { ROOT_PATH } else { USER_PATH };
    vec![
        ("HOME".into(), user.home.display().to_string()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("SHELL".into(), shell),
        ("PATH".into(), path.into()),
    ]
}

// ---------------------------------------------------------------------------------------------
// utmp
// ---------------------------------------------------------------------------------------------

/// The Linux utmp record (glibc layout, also what busybox writes): 384 bytes.
const UTMP_RECORD_BYTES: usize = 384;
const UT_USER_PROCESS: i16 = 7;
const UT_LINE: std::ops::Range<usize> = 8..40;
const UT_USER: std::ops::Range<usize> = 44..76;
const UT_HOST: std::ops::Range<usize> = 76..332;
const UT_TV_SEC: usize = 340;
/// utmp files are small; more than this is not a utmp file.
const MAX_UTMP_BYTES: u64 = 4 * 1024 * 1024;

fn c_field(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn le_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_le_bytes(a)
}

/// USER_PROCESS records of a utmp file's bytes (a trailing partial record is ignored).
pub fn parse_utmp(bytes: &[u8]) -> Vec<LoggedInUser> {
    bytes
        .chunks_exact(UTMP_RECORD_BYTES)
        .filter(|r| i16::from_le_bytes([r[0], r[1]]) == UT_USER_PROCESS)
        .map(|r| LoggedInUser {
            user: c_field(&r[UT_USER]),
            tty: c_field(&r[UT_LINE]),
            host: c_field(&r[UT_HOST]),
            login_unix_s: i64::from(le_i32(r, UT_TV_SEC)),
            pid: le_i32(r, 4).max(0) as u32,
        })
        .filter(|u| !u.user.is_empty())
        .collect()
}

/// Logged-in users from `path`; a missing file means nobody.
pub fn logged_in_from(path: &Path) -> OpResult<UserList> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(f) => {
            f.take(MAX_UTMP_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| OpError::io(&path.display().to_string(), &e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(OpError::io(&path.display().to_string(), &e)),
    }
    Ok(UserList {
        users: parse_utmp(&bytes),
    })
}

/// USER_PROCESS entries of /run/utmp (or /var/run/utmp); no file means nobody.
pub fn logged_in() -> OpResult<UserList> {
    let run = Path::new("/run/utmp");
    if run.exists() {
        logged_in_from(run)
    } else {
        logged_in_from(Path::new("/var/run/utmp"))
    }
}

// ---------------------------------------------------------------------------------------------
// Passwords
// ---------------------------------------------------------------------------------------------

/// The chpasswd child that sets the password: "user:password" on stdin, never argv; `-e`
/// when the password is already a crypt(3) hash.
pub fn set_password_command(db: &UserDb, req: &SetPasswordRequest) -> OpResult<ChildCommand> {
    for (what, v) in [("user", &req.user), ("password", &req.password)] {
        if v.is_empty() {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!("{what} is empty"),
            ));
        }
        if v.contains([':', '\n', '\r', '\0']) {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!("{what} contains ':', a line break or NUL"),
            ));
        }
    }
    let entry = db.user(&req.user)?;
    let mut argv = vec!["chpasswd".to_string()];
    if req.crypted {
        argv.push("-e".to_string());
    }
    Ok(ChildCommand {
        argv,
        stdin: format!("{}:{}\n", entry.name, req.password).into_bytes(),
        timeout_ms: CHPASSWD_TIMEOUT_MS,
    })
}

// ---------------------------------------------------------------------------------------------
// ssh authorized keys
// ---------------------------------------------------------------------------------------------

const KEY_TYPES: &[&str] = &[
    "ssh-rsa",
    "ssh-dss",
    "ssh-ed25519",
    "ssh-ed448",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

fn is_key_type(t: &str) -> bool {
    KEY_TYPES.contains(&t)
        || t.strip_suffix("-cert-v01@openssh.com").is_some_and(|base| {
            KEY_TYPES.contains(&base) || KEY_TYPES.contains(&format!("{base}@openssh.com").as_str())
        })
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let body = s.trim_end_matches('=');
    if s.len() - body.len() > 2 || !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in body.as_bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The (type, base64 blob) of an authorized_keys line, when it holds a key whose blob
/// decodes and names the same type.
fn key_of(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let tokens: Vec<&str> = line.split_whitespace().collect();
    tokens.windows(2).find_map(|w| {
        if !is_key_type(w[0]) {
            return None;
        }
        let blob = base64_decode(w[1])?;
        let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
        (blob.get(4..4 + len)? == w[0].as_bytes()).then_some((w[0], w[1]))
    })
}

fn validate_key(key: &str) -> OpResult<&str> {
    let key = key.trim();
    if key.len() > MAX_KEY_BYTES {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("key is {} bytes, more than {MAX_KEY_BYTES}", key.len()),
        ));
    }
    if key.contains(['\n', '\r', '\0']) {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            "key spans more than one line",
        ));
    }
    if key_of(key).is_none() {
        let shown: String = key.chars().take(40).collect();
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("not an ssh public key: {shown:?}"),
        ));
    }
    Ok(key)
}

fn failed(msg: String) -> OpError {
    OpError::new(ErrorCode::FailedPrecondition, msg)
}

/// The user's home directory, opened by descriptor (O_PATH). Only root's symlinks are
/// followed on the way (a user's symlink in the path is refused).
fn open_home(user: &PasswdEntry) -> OpResult<OwnedFd> {
    let shown = user.home.display().to_string();
    let Ok(rel) = user.home.strip_prefix("/") else {
        return Err(failed(format!(
            "{} has no absolute home directory",
            user.name
        )));
    };
    let root = sys::open_dir_path(Path::new("/")).map_err(|e| OpError::io("/", &e))?;
    sys::open_beneath(
        root.as_fd(),
        rel,
        libc::O_PATH | libc::O_DIRECTORY,
        Beneath {
            in_root: true,
            follow_last: true,
        },
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => failed(format!(
            "home directory {shown} of {} does not exist",
            user.name
        )),
        _ => failed(format!("home directory {shown} of {}: {e}", user.name)),
    })
}

/// The user's ~/.ssh, opened relative to the home directory's descriptor without following
/// a symlink, and refused unless it is a directory owned by the user (or by root, which
/// only root could have made). With `create`, a missing one is made (0700) and given to the
/// user through its descriptor.
fn ssh_dir(user: &PasswdEntry, create: bool) -> OpResult<Option<File>> {
    let home = open_home(user)?;
    let shown = user.home.join(".ssh").display().to_string();
    let name = OsStr::new(".ssh");
    let open = || {
        sys::openat(
            home.as_fd(),
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
    };
    let fd = match open() {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match sys::mkdirat(home.as_fd(), name, 0o700) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(OpError::io(&shown, &e))
                }
                _ => {}
            }
            open().map_err(|e| refused(&shown, &e))?
        }
        Err(e) => return Err(refused(&shown, &e)),
    };
    let dir = File::from(fd);
    let m = dir.metadata().map_err(|e| OpError::io(&shown, &e))?;
    if m.uid() != user.uid && m.uid() != 0 {
        return Err(failed(format!(
            "{shown} is owned by uid {}, not {}",
            m.uid(),
            user.name
        )));
    }
    Ok(Some(dir))
}

/// The error for a ~/.ssh or authorized_keys that could not be opened.
fn refused(shown: &str, e: &std::io::Error) -> OpError {
    match e.raw_os_error() {
        Some(libc::ELOOP) => failed(format!("{shown} is a symlink; refusing to follow it")),
        Some(libc::ENOTDIR) => failed(format!("{shown} is not a directory")),
        _ => OpError::io(shown, e),
    }
}

fn too_big(shown: &str, bytes: u64) -> OpError {
    OpError::new(
        ErrorCode::InvalidArgument,
        format!(
            "{shown} is {bytes} bytes, more than {MAX_AUTHORIZED_KEYS_BYTES}; refusing to read or rewrite it"
        ),
    )
}

/// The lines of dir/authorized_keys (empty when missing), never through a symlink; a file
/// over [`MAX_AUTHORIZED_KEYS_BYTES`] is refused whole.
fn read_lines(user: &PasswdEntry, dir: &File) -> OpResult<Vec<String>> {
    let shown = user.home.join(".ssh/authorized_keys").display().to_string();
    let fd = match sys::openat(
        dir.as_fd(),
        OsStr::new("authorized_keys"),
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
    ) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(refused(&shown, &e)),
    };
    let f = File::from(fd);
    let meta = f.metadata().map_err(|e| OpError::io(&shown, &e))?;
    if !meta.is_file() {
        return Err(failed(format!("{shown} is not a regular file")));
    }
    if meta.len() > MAX_AUTHORIZED_KEYS_BYTES {
        return Err(too_big(&shown, meta.len()));
    }
    let mut bytes = Vec::new();
    f.take(MAX_AUTHORIZED_KEYS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| OpError::io(&shown, &e))?;
    if bytes.len() as u64 > MAX_AUTHORIZED_KEYS_BYTES {
        // It grew since the fstat.
        return Err(too_big(&shown, bytes.len() as u64));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| failed(format!("{shown} is not UTF-8 text")))?;
    Ok(text.lines().map(str::to_string).collect())
}

fn keys_in(lines: &[String]) -> SshKeys {
    SshKeys {
        keys: lines
            .iter()
            .filter(|l| key_of(l).is_some())
            .map(|l| l.trim().to_string())
            .collect(),
    }
}

/// Writes `lines` to dir/authorized_keys atomically, 0600, owned by the user: a temp file
/// made, owned, moded, synced and renamed relative to the ~/.ssh descriptor, which is first
/// given the owner and mode sshd's StrictModes expects.
fn write_lines(user: &PasswdEntry, dir: &File, lines: &[String]) -> OpResult<()> {
    let dir_shown = user.home.join(".ssh").display().to_string();
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    if text.len() as u64 > MAX_AUTHORIZED_KEYS_BYTES {
        return Err(too_big(
            &format!("{dir_shown}/authorized_keys (as it would be)"),
            text.len() as u64,
        ));
    }
    std::os::unix::fs::fchown(dir, Some(user.uid), Some(user.gid))
        .map_err(|e| OpError::io(&dir_shown, &e))?;
    dir.set_permissions(std::fs::Permissions::from_mode(0o700))
        .map_err(|e| OpError::io(&dir_shown, &e))?;
    let suffix = crate::sys::random_u64().map_err(|e| OpError::io("getrandom", &e))?;
    let temp = OsString::from(format!(".authorized_keys.qx-{suffix:016x}.tmp"));
    let shown = format!("{dir_shown}/{}", temp.to_string_lossy());
    let fd = sys::openat(
        dir.as_fd(),
        &temp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o600,
    )
    .map_err(|e| OpError::io(&shown, &e))?;
    let result = (|| {
        let mut f = File::from(fd);
        f.write_all(text.as_bytes())
            .map_err(|e| OpError::io(&shown, &e))?;
        std::os::unix::fs::fchown(&f, Some(user.uid), Some(user.gid))
            .map_err(|e| OpError::io(&shown, &e))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| OpError::io(&shown, &e))?;
        f.sync_all().map_err(|e| OpError::io(&shown, &e))?;
        sys::renameat(
            dir.as_fd(),
            &temp,
            dir.as_fd(),
            OsStr::new("authorized_keys"),
        )
        .map_err(|e| OpError::io(&format!("{dir_shown}/authorized_keys"), &e))?;
        dir.sync_all().map_err(|e| OpError::io(&dir_shown, &e))
    })();
    if result.is_err() {
        let _ = sys::unlinkat(dir.as_fd(), &temp, false);
    }
    result
}

/// The keys in the user's authorized_keys (no file: none).
pub fn ssh_keys_list(db: &UserDb, req: &SshKeysListRequest) -> OpResult<SshKeys> {
    let user = db.user(&req.user)?;
    match ssh_dir(&user, false)? {
        Some(dir) => Ok(keys_in(&read_lines(&user, &dir)?)),
        None => Ok(SshKeys::default()),
    }
}

/// Appends keys not already present (same type and blob), or with `reset` replaces the
/// whole file with them. Returns the resulting keys.
pub fn ssh_keys_add(db: &UserDb, req: &SshKeysAddRequest) -> OpResult<SshKeys> {
    let user = db.user(&req.user)?;
    let new: Vec<&str> = req
        .keys
        .iter()
        .map(|k| validate_key(k))
        .collect::<OpResult<_>>()?;
    let dir = ssh_dir(&user, true)?.ok_or_else(|| failed("~/.ssh missing".to_string()))?;
    let mut lines = if req.reset {
        Vec::new()
    } else {
        read_lines(&user, &dir)?
    };
    for key in new {
        let id = key_of(key);
        if !lines.iter().any(|l| key_of(l) == id) {
            lines.push(key.to_string());
        }
    }
    write_lines(&user, &dir, &lines)?;
    Ok(keys_in(&lines))
}

/// Removes every line holding one of the given keys (matched by type and blob, whatever
/// the options and comment). Returns the remaining keys.
pub fn ssh_keys_remove(db: &UserDb, req: &SshKeysRemoveRequest) -> OpResult<SshKeys> {
    let user = db.user(&req.user)?;
    let gone: Vec<(&str, &str)> = req
        .keys
        .iter()
        .map(|k| validate_key(k).map(|k| key_of(k).unwrap_or_default()))
        .collect::<OpResult<_>>()?;
    let Some(dir) = ssh_dir(&user, false)? else {
        return Ok(SshKeys::default());
    };
    let mut lines = read_lines(&user, &dir)?;
    let before = lines.len();
    lines.retain(|l| key_of(l).is_none_or(|id| !gone.contains(&id)));
    if lines.len() != before {
        write_lines(&user, &dir, &lines)?;
    }
    Ok(keys_in(&lines))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::ops::testutil::TempDir;

    fn b64(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    /// A well-formed ssh-ed25519 public key line with a distinct blob per `seed`.
    fn key(seed: u8, comment: &str) -> String {
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[seed; 32]);
        format!("ssh-ed25519 {} {comment}", b64(&blob))
    }

    struct Env {
        t: TempDir,
        db: UserDb,
    }

    fn env() -> Env {
        let t = TempDir::new("users");
        std::fs::create_dir_all(t.join("home/alice")).unwrap();
        std::fs::write(
            t.join("passwd"),
            format!(
                "root:x:0:0:root:/root:/bin/sh\nbroken line\nalice:x:4242:4343:Alice:{}:/bin/sh\n",
                t.s("home/alice")
            ),
        )
        .unwrap();
        std::fs::write(t.join("group"), "root:x:0:\nstaff:x:50:alice\n").unwrap();
        let db = UserDb::new(t.join("passwd"), t.join("group"));
        Env { t, db }
    }

    #[test]
    fn user_db_resolves_names_and_ids() {
        let e = env();
        let a = e.db.user("alice").unwrap();
        assert_eq!((a.uid, a.gid), (4242, 4343));
        assert_eq!(e.db.user("4242").unwrap().name, "alice");
        assert_eq!(e.db.user("bob").unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(e.db.uid("alice").unwrap(), 4242);
        assert_eq!(e.db.uid("777").unwrap(), 777);
        assert_eq!(e.db.gid("staff").unwrap(), 50);
        assert_eq!(e.db.gid("9").unwrap(), 9);
        assert_eq!(
            e.db.gid("nogroup-qx").unwrap_err().code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn a_users_groups_and_login_environment_are_those_of_su_dash() {
        let e = env();
        let alice = e.db.user("alice").unwrap();
        assert_eq!(e.db.groups(&alice).unwrap(), vec![4343, 50]);
        let env: Vec<String> = login_env(&alice)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            env,
            [
                format!("HOME={}", e.t.s("home/alice")),
                "USER=alice".into(),
                "LOGNAME=alice".into(),
                "SHELL=/bin/sh".into(),
                format!("PATH={USER_PATH}"),
            ]
        );
        let root = e.db.user("root").unwrap();
        assert_eq!(e.db.groups(&root).unwrap(), vec![0]);
        assert!(login_env(&root).contains(&("PATH".into(), ROOT_PATH.into())));
    }

    #[test]
    fn keys_add_creates_ssh_dir_and_file_owned_by_the_user_with_strict_modes() {
        let e = env();
        let k1 = key(1, "one@host");
        let keys = ssh_keys_add(
            &e.db,
            &SshKeysAddRequest {
                user: "alice".into(),
                keys: vec![k1.clone()],
                reset: false,
            },
        )
        .unwrap();
        assert_eq!(keys.keys, vec![k1.clone()]);
        let dir = e.t.join("home/alice/.ssh");
        let dm = std::fs::metadata(&dir).unwrap();
        assert_eq!(dm.mode() & 0o7777, 0o700);
        assert_eq!((dm.uid(), dm.gid()), (4242, 4343));
        let fm = std::fs::metadata(dir.join("authorized_keys")).unwrap();
        assert_eq!(fm.mode() & 0o7777, 0o600);
        assert_eq!((fm.uid(), fm.gid()), (4242, 4343));
        assert_eq!(
            std::fs::read_to_string(dir.join("authorized_keys")).unwrap(),
            format!("{k1}\n")
        );
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn keys_add_keeps_comments_and_skips_duplicates_remove_matches_by_blob_reset_replaces() {
        let e = env();
        let dir = e.t.join("home/alice/.ssh");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let k1 = key(1, "one");
        let k2 = format!("from=\"10.0.0.1\" {}", key(2, "two"));
        std::fs::write(
            dir.join("authorized_keys"),
            format!("# managed by hand\n{k1}\n\n{k2}\n"),
        )
        .unwrap();
        let listed = ssh_keys_list(
            &e.db,
            &SshKeysListRequest {
                user: "alice".into(),
            },
        )
        .unwrap();
        assert_eq!(listed.keys, vec![k1.clone(), k2.clone()]);

        let k3 = key(3, "three");
        let added = ssh_keys_add(
            &e.db,
            &SshKeysAddRequest {
                user: "alice".into(),
                keys: vec![key(1, "same blob other comment"), k3.clone()],
                reset: false,
            },
        )
        .unwrap();
        assert_eq!(added.keys, vec![k1.clone(), k2.clone(), k3.clone()]);
        let text = std::fs::read_to_string(dir.join("authorized_keys")).unwrap();
        assert!(text.starts_with("# managed by hand\n"), "{text}");
        // A writable-by-all ~/.ssh (which sshd would reject) is tightened and given to the user.
        let dm = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (dm.mode() & 0o7777, dm.uid(), dm.gid()),
            (0o700, 4242, 4343)
        );

        let left = ssh_keys_remove(
            &e.db,
            &SshKeysRemoveRequest {
                user: "alice".into(),
                keys: vec![key(2, "")],
            },
        )
        .unwrap();
        assert_eq!(left.keys, vec![k1, k3]);
        assert!(std::fs::read_to_string(dir.join("authorized_keys"))
            .unwrap()
            .contains("# managed by hand"));

        let reset = ssh_keys_add(
            &e.db,
            &SshKeysAddRequest {
                user: "alice".into(),
                keys: vec![key(9, "only")],
                reset: true,
            },
        )
        .unwrap();
        assert_eq!(reset.keys, vec![key(9, "only")]);
        assert_eq!(
            std::fs::read_to_string(dir.join("authorized_keys")).unwrap(),
            format!("{}\n", key(9, "only"))
        );
    }

    #[test]
    fn keys_refuse_bad_keys_unknown_users_and_symlinks() {
        let e = env();
        let add = |keys: Vec<String>| {
            ssh_keys_add(
                &e.db,
                &SshKeysAddRequest {
                    user: "alice".into(),
                    keys,
                    reset: false,
                },
            )
        };
        for bad in [
            format!("{}\n{}", key(1, "a"), key(2, "b")),
            "ssh-ed25519 not-base64!".to_string(),
            "hello world".to_string(),
            // Blob says ssh-ed25519, line says ssh-rsa.
            key(1, "x").replace("ssh-ed25519 ", "ssh-rsa "),
            String::new(),
        ] {
            assert_eq!(
                add(vec![bad.clone()]).unwrap_err().code,
                ErrorCode::InvalidArgument,
                "{bad:?}"
            );
        }
        assert!(!e.t.join("home/alice/.ssh").exists());
        let e2 = ssh_keys_list(&e.db, &SshKeysListRequest { user: "bob".into() }).unwrap_err();
        assert_eq!(e2.code, ErrorCode::NotFound);

        let outside = e.t.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, e.t.join("home/alice/.ssh")).unwrap();
        let err = add(vec![key(1, "a")]).unwrap_err();
        assert_eq!(err.code, ErrorCode::FailedPrecondition);
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        std::fs::remove_file(e.t.join("home/alice/.ssh")).unwrap();

        std::fs::create_dir(e.t.join("home/alice/.ssh")).unwrap();
        std::fs::write(outside.join("shadow"), "root:secret\n").unwrap();
        std::os::unix::fs::symlink(
            outside.join("shadow"),
            e.t.join("home/alice/.ssh/authorized_keys"),
        )
        .unwrap();
        let err = ssh_keys_list(
            &e.db,
            &SshKeysListRequest {
                user: "alice".into(),
            },
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::FailedPrecondition);
        assert!(err.message.contains("symlink"), "{err}");
    }

    /// The unprivileged user of the attack tests, with a home of their own and root's ~/.ssh
    /// elsewhere.
    fn victim_env(tag: &str) -> (TempDir, UserDb, PathBuf, PathBuf) {
        let t = TempDir::new(tag);
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = t.join("home/mallory");
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
        let root_ssh = t.join("root-ssh");
        std::fs::create_dir(&root_ssh).unwrap();
        std::fs::set_permissions(&root_ssh, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(
            t.join("passwd"),
            format!("mallory:x:65534:65534::{}:/bin/sh\n", home.display()),
        )
        .unwrap();
        std::fs::write(t.join("group"), "nogroup:x:65534:\n").unwrap();
        let db = UserDb::new(t.join("passwd"), t.join("group"));
        (t, db, home, root_ssh)
    }

    #[test]
    fn a_user_swapping_ssh_for_a_symlink_never_gets_roots_directory_or_keys() {
        use crate::sys::attack::{Attacker, Move};
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let (_t, db, home, root_ssh) = victim_env("attack-ssh");
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let ssh = home.join(".ssh");
        let aside = home.join(".ssh-aside");
        // The home's owner keeps replacing the ~/.ssh the agent makes or uses with a link to
        // root's, between the agent's check and its use.
        let _user = Attacker::start(
            65534,
            65534,
            &[
                Move::Rmdir(c(&ssh)),
                Move::Rename {
                    from: c(&ssh),
                    to: c(&aside),
                },
                Move::Symlink {
                    target: c(&root_ssh),
                    link: c(&ssh),
                },
                Move::Unlink(c(&ssh)),
                Move::Rename {
                    from: c(&aside),
                    to: c(&ssh),
                },
            ],
            true,
        )
        .unwrap();
        let req = SshKeysAddRequest {
            user: "mallory".into(),
            keys: vec![key(7, "mallory@evil")],
            reset: false,
        };
        let clear = |p: &Path| match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => drop(std::fs::remove_dir_all(p)),
            Ok(_) => drop(std::fs::remove_file(p)),
            Err(_) => {}
        };
        for _ in 0..1000 {
            let _ = ssh_keys_add(&db, &req);
            let m = std::fs::metadata(&root_ssh).unwrap();
            assert_eq!(
                (m.uid(), m.mode() & 0o7777),
                (0, 0o700),
                "root's dir given away"
            );
            assert!(
                std::fs::read_dir(&root_ssh).unwrap().next().is_none(),
                "wrote into root's ~/.ssh"
            );
            // A fresh start: the agent has to make ~/.ssh again.
            clear(&ssh);
            clear(&aside);
        }
    }

    #[test]
    fn an_oversized_authorized_keys_is_refused_not_truncated() {
        let e = env();
        let dir = e.t.join("home/alice/.ssh");
        std::fs::create_dir(&dir).unwrap();
        let mut text = format!("{}\n", key(1, "first"));
        while text.len() <= MAX_AUTHORIZED_KEYS_BYTES as usize {
            text.push_str(&format!("# padding {}\n", "x".repeat(100)));
        }
        text.push_str(&format!("{}\n", key(2, "last, past 1 MiB")));
        std::fs::write(dir.join("authorized_keys"), &text).unwrap();
        let err = ssh_keys_add(
            &e.db,
            &SshKeysAddRequest {
                user: "alice".into(),
                keys: vec![key(3, "new")],
                reset: false,
            },
        );
        let now = std::fs::read_to_string(dir.join("authorized_keys")).unwrap();
        assert!(
            now == text,
            "the file was rewritten: {} bytes, was {}",
            now.len(),
            text.len()
        );
        let err = err.unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
        let err = ssh_keys_list(
            &e.db,
            &SshKeysListRequest {
                user: "alice".into(),
            },
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    }

    #[test]
    fn password_goes_to_chpasswd_on_stdin_never_argv() {
        let e = env();
        let cmd = set_password_command(
            &e.db,
            &SetPasswordRequest {
                user: "4242".into(),
                password: "s3cret pass".into(),
                crypted: false,
            },
        )
        .unwrap();
        assert_eq!(cmd.argv, vec!["chpasswd"]);
        assert_eq!(cmd.stdin, b"alice:s3cret pass\n");
        assert!(cmd.argv.iter().all(|a| !a.contains("s3cret")));
        let cmd = set_password_command(
            &e.db,
            &SetPasswordRequest {
                user: "alice".into(),
                password: "$6$salt$hash".into(),
                crypted: true,
            },
        )
        .unwrap();
        assert_eq!(cmd.argv, vec!["chpasswd", "-e"]);
        for (user, password) in [
            ("alice", "a:b"),
            ("alice", "a\nroot:x"),
            ("ali:ce", "x"),
            ("alice", ""),
        ] {
            let err = set_password_command(
                &e.db,
                &SetPasswordRequest {
                    user: user.into(),
                    password: password.into(),
                    crypted: false,
                },
            )
            .unwrap_err();
            assert_eq!(
                err.code,
                ErrorCode::InvalidArgument,
                "{user:?} {password:?}"
            );
        }
        let err = set_password_command(
            &e.db,
            &SetPasswordRequest {
                user: "bob".into(),
                password: "x".into(),
                crypted: false,
            },
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
    }

    #[test]
    fn the_chpasswd_command_really_sets_a_crypted_password() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        // A throwaway root for chpasswd -R, so the machine's own users are untouched (-e needs
        // no PAM, so it works inside a bare chroot).
        let t = TempDir::new("chpasswd");
        std::fs::create_dir(t.join("etc")).unwrap();
        std::fs::write(
            t.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:4242:4242::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(t.join("etc/group"), "root:x:0:\nalice:x:4242:\n").unwrap();
        std::fs::write(
            t.join("etc/shadow"),
            "root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n",
        )
        .unwrap();
        let db = UserDb::new(t.join("etc/passwd"), t.join("etc/group"));
        let hash = "$6$qxsalt$0123456789abcdefghijklmnopqrstuvwxyzABCDEF";
        let cmd = set_password_command(
            &db,
            &SetPasswordRequest {
                user: "alice".into(),
                password: hash.into(),
                crypted: true,
            },
        )
        .unwrap();
        let mut child = Command::new(&cmd.argv[0])
            .args(&cmd.argv[1..])
            .arg("-R")
            .arg(t.path())
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&cmd.stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shadow = std::fs::read_to_string(t.join("etc/shadow")).unwrap();
        assert!(shadow.contains(&format!("alice:{hash}:")), "{shadow}");
        assert!(shadow.contains("root:*:"), "{shadow}");
    }

    fn utmp_record(kind: i16, pid: i32, line: &str, user: &str, host: &str, sec: i32) -> Vec<u8> {
        let mut r = vec![0u8; UTMP_RECORD_BYTES];
        r[0..2].copy_from_slice(&kind.to_le_bytes());
        r[4..8].copy_from_slice(&pid.to_le_bytes());
        r[UT_LINE.start..UT_LINE.start + line.len()].copy_from_slice(line.as_bytes());
        r[UT_USER.start..UT_USER.start + user.len()].copy_from_slice(user.as_bytes());
        r[UT_HOST.start..UT_HOST.start + host.len()].copy_from_slice(host.as_bytes());
        r[UT_TV_SEC..UT_TV_SEC + 4].copy_from_slice(&sec.to_le_bytes());
        r
    }

    #[test]
    fn utmp_written_by_util_linux_utmpdump_parses() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let t = TempDir::new("utmpdump");
        let text = "[2] [00000] [~~  ] [reboot  ] [~           ] [6.1.0               ] [0.0.0.0        ] [2023-11-14T22:00:00,000000+00:00]\n\
                    [7] [01234] [ts/0] [alice   ] [pts/0       ] [10.1.2.3            ] [10.1.2.3       ] [2023-11-14T22:13:20,000000+00:00]\n";
        let mut child = Command::new("utmpdump")
            .arg("-r")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        std::fs::write(t.join("utmp"), &out.stdout).unwrap();
        let users = logged_in_from(&t.join("utmp")).unwrap().users;
        assert_eq!(users.len(), 1);
        let a = &users[0];
        assert_eq!(
            (
                a.user.as_str(),
                a.tty.as_str(),
                a.host.as_str(),
                a.pid,
                a.login_unix_s
            ),
            ("alice", "pts/0", "10.1.2.3", 1234, 1_700_000_000)
        );
    }

    #[test]
    fn utmp_parser_returns_user_process_records_only() {
        let t = TempDir::new("utmp");
        let mut bytes = Vec::new();
        bytes.extend(utmp_record(2, 0, "~", "reboot", "6.1.0", 1_700_000_000)); // BOOT_TIME
        bytes.extend(utmp_record(6, 500, "tty1", "LOGIN", "", 1_700_000_001)); // LOGIN_PROCESS
        bytes.extend(utmp_record(
            7,
            1234,
            "pts/0",
            "alice",
            "10.1.2.3",
            1_700_000_100,
        ));
        bytes.extend(utmp_record(8, 999, "pts/1", "", "", 0)); // DEAD_PROCESS
        bytes.extend(utmp_record(
            7,
            1300,
            "tty2",
            &"u".repeat(32),
            "",
            1_700_000_200,
        ));
        bytes.extend_from_slice(&[7, 0, 0]); // torn trailing record
        std::fs::write(t.join("utmp"), &bytes).unwrap();
        let list = logged_in_from(&t.join("utmp")).unwrap();
        assert_eq!(list.users.len(), 2);
        let a = &list.users[0];
        assert_eq!(
            (
                a.user.as_str(),
                a.tty.as_str(),
                a.host.as_str(),
                a.pid,
                a.login_unix_s
            ),
            ("alice", "pts/0", "10.1.2.3", 1234, 1_700_000_100)
        );
        assert_eq!(list.users[1].user, "u".repeat(32));
        assert!(logged_in_from(&t.join("missing")).unwrap().users.is_empty());
    }
}
