//! Filesystem freeze/thaw (FIFREEZE/FITHAW) with a token, an auto-thaw deadline, hooks and a
//! state file so a restarted agent thaws what a dead one froze; and FITRIM.
//!
//! Freeze: the targets (every local writable disk filesystem, or the requested mountpoints;
//! one per filesystem) are recorded in the state file first, then frozen in reverse mount
//! order, so nested mounts freeze before the filesystems holding them. Any failure thaws
//! everything frozen so far and removes the state file. Thaw goes in mount order; FITHAW's
//! EINVAL ("not frozen") counts as thawed.
//!
//! The state file must live on a filesystem that is never frozen (a tmpfs such as /run): the
//! freeze refuses to freeze the filesystem holding it, so the agent never has to write to a
//! frozen disk, and it is only written before freezing and removed after thawing.
//!
//! Hooks are executables in the hooks directory, run by the loop as children one after another
//! (see [`Freezer::hook_commands`]): ascending name order with the argument "freeze" before a
//! freeze, descending order with "thaw" after a thaw, each with [`HOOK_TIMEOUT_MS`]. The state
//! file records whether the freeze hooks ran; if they did, every thaw (by the host, by the
//! deadline, at exit, or by a restarted agent's recovery) leaves [`Freezer::take_thaw_hooks_due`]
//! set so the loop runs the thaw hooks.
//!
//! The auto-thaw delay is capped at [`MAX_AUTO_THAW_MS`]: a guest whose disks stay frozen
//! longer than that is broken, whatever the host asked.
//!
//! While filesystems are frozen the dispatcher must run only safe requests (ping, status,
//! thaw); in particular [`trim`] on a frozen filesystem would block until the thaw.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qx_proto::agent::{
    ErrorCode, FreezeState, FsFreezeReply, FsFreezeRequest, FsFreezeStatus, FsThawReply,
    FsThawRequest, FsTrimReply, FsTrimRequest, FsTrimResult,
};

use super::disks::{self, Mount};
use super::{ChildCommand, OpError, OpResult};
use crate::sys;

/// Default auto-thaw delay when the request leaves it 0.
pub const DEFAULT_AUTO_THAW_MS: u32 = 60_000;
/// The longest auto-thaw delay: larger requests are cut to this (10 minutes).
pub const MAX_AUTO_THAW_MS: u32 = 600_000;
/// Timeout for each hook script.
pub const HOOK_TIMEOUT_MS: u32 = 10_000;
/// First line of the state file.
const STATE_MAGIC: &str = "qx-freeze 1";
/// A state file larger than this is not ours.
const MAX_STATE_BYTES: u64 = 1024 * 1024;

/// Which hook phase to run: before freezing, or after thawing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPhase {
    Freeze,
    Thaw,
}

/// The current freeze.
#[derive(Debug, Clone)]
struct Frozen {
    token: u64,
    /// Mountpoints in the order they were frozen (reverse mount order).
    mounts: Vec<String>,
    deadline: Instant,
    auto_thaw_unix_ms: i64,
    /// The freeze hooks ran before this freeze: the thaw hooks must run after it.
    hooks_ran: bool,
}

/// Owns the freeze state of this agent. A clone does a freeze on the filesystem worker; the
/// loop's copy takes the result with [`Freezer::adopt_freeze`].
#[derive(Debug, Clone)]
pub struct Freezer {
    state_file: PathBuf,
    hooks_dir: Option<PathBuf>,
    /// The mount table consulted (/proc/self/mountinfo; a file in tests).
    mountinfo: PathBuf,
    current: Option<Frozen>,
    /// A thaw (or a recovery) happened after a freeze whose hooks ran.
    thaw_hooks_due: bool,
}

/// major/minor of a dev_t (glibc's encoding, which the kernel's new_encode_dev matches).
fn dev_major_minor(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' | '\t' | '\n' | '\r' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn open_dir(mountpoint: &str) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOCTTY)
        .open(mountpoint)
}

/// FITHAW on `mountpoint`: Ok(true) thawed, Ok(false) was not frozen.
fn thaw_one(mountpoint: &str) -> std::io::Result<bool> {
    let dir = open_dir(mountpoint)?;
    match sys::fithaw(&dir) {
        Ok(()) => Ok(true),
        Err(e) if errno_of(&e) == libc::EINVAL => Ok(false),
        Err(e) => Err(e),
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The filesystems a default freeze or trim visits: local disk filesystems, writable, one
/// mount per filesystem, in mount order.
pub fn default_targets(mounts: &[Mount]) -> Vec<Mount> {
    let mut picked: Vec<Mount> = Vec::new();
    for m in mounts {
        if disks::is_local_disk_fs(&m.fstype)
            && !m.read_only
            && !picked.iter().any(|p| p.dev == m.dev)
        {
            picked.push(m.clone());
        }
    }
    picked
}

/// The mounts named by `wanted` (trailing slashes ignored), one per filesystem, in mount
/// order; the last mount on a mountpoint is the visible one.
fn requested_targets(mounts: &[Mount], wanted: &[String]) -> OpResult<Vec<Mount>> {
    let mut picked: Vec<(usize, Mount)> = Vec::new();
    for w in wanted {
        let norm = match w.trim_end_matches('/') {
            "" => "/",
            n => n,
        };
        // As given, else with symlinks resolved (/var/run names the /run mount).
        let canonical = std::fs::canonicalize(norm)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let found = [norm, canonical.as_str()].into_iter().find_map(|want| {
            mounts
                .iter()
                .enumerate()
                .rev()
                .find(|(_, m)| m.mountpoint == want)
        });
        let Some((idx, m)) = found else {
            return Err(OpError::new(
                ErrorCode::NotFound,
                format!("{w} is not a mountpoint"),
            ));
        };
        if !picked.iter().any(|(_, p)| p.dev == m.dev) {
            picked.push((idx, m.clone()));
        }
    }
    picked.sort_by_key(|(i, _)| *i);
    Ok(picked.into_iter().map(|(_, m)| m).collect())
}

impl Freezer {
    /// `state_file` should be on a tmpfs (e.g. /run/quantix-kvm/freeze.state); `hooks_dir`
    /// holds the freeze/thaw hook executables.
    pub fn new(state_file: PathBuf, hooks_dir: Option<PathBuf>) -> Self {
        Freezer {
            state_file,
            hooks_dir,
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            current: None,
            thaw_hooks_due: false,
        }
    }

    /// Reads the mount table from `mountinfo` instead of /proc/self/mountinfo (tests: a
    /// default freeze that can only see a loop mount).
    pub fn with_mountinfo(mut self, mountinfo: PathBuf) -> Self {
        self.mountinfo = mountinfo;
        self
    }

    pub fn is_frozen(&self) -> bool {
        self.current.is_some()
    }

    /// Takes the freeze `other` (a clone that did [`Freezer::freeze`]) made, if any.
    pub fn adopt_freeze(&mut self, other: Freezer) {
        if other.current.is_some() {
            self.current = other.current;
        }
    }

    /// True once after a thaw or recovery that must be followed by the thaw hooks.
    pub fn take_thaw_hooks_due(&mut self) -> bool {
        std::mem::take(&mut self.thaw_hooks_due)
    }

    /// When the agent must thaw by itself.
    pub fn deadline(&self) -> Option<Instant> {
        self.current.as_ref().map(|f| f.deadline)
    }

    pub fn status(&self, now: Instant) -> FsFreezeStatus {
        match &self.current {
            None => FsFreezeStatus {
                state: FreezeState::Thawed as i32,
                ..Default::default()
            },
            Some(f) => FsFreezeStatus {
                state: FreezeState::Frozen as i32,
                frozen: f.mounts.clone(),
                token: f.token,
                auto_thaw_in_ms: f.deadline.saturating_duration_since(now).as_millis() as u64,
            },
        }
    }

    fn state_shown(&self) -> String {
        self.state_file.display().to_string()
    }

    /// Writes the state file atomically (temp, fsync, rename, fsync dir).
    fn write_state(&self, f: &Frozen) -> OpResult<()> {
        let shown = self.state_shown();
        let dir = self
            .state_file
            .parent()
            .ok_or_else(|| OpError::new(ErrorCode::Internal, "state file has no directory"))?;
        let mut text = format!(
            "{STATE_MAGIC}\ntoken {:016x}\nauto_thaw_unix_ms {}\n",
            f.token, f.auto_thaw_unix_ms
        );
        if f.hooks_ran {
            text.push_str("hooks ran\n");
        }
        for m in &f.mounts {
            text.push_str(&format!("mount {}\n", escape(m)));
        }
        let mut tmp_name = self.state_file.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let result = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.state_file)?;
            File::open(dir)?.sync_all()
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            OpError::io(&shown, &e)
        })
    }

    fn remove_state(&self) {
        let _ = std::fs::remove_file(&self.state_file);
    }

    /// Reads the state file: (token, mountpoints in freeze order, whether the freeze hooks
    /// ran), None when absent.
    fn read_state(&self) -> OpResult<Option<(u64, Vec<String>, bool)>> {
        use std::io::Read;
        let shown = self.state_shown();
        let mut text = String::new();
        match File::open(&self.state_file) {
            Ok(f) => f
                .take(MAX_STATE_BYTES)
                .read_to_string(&mut text)
                .map_err(|e| OpError::io(&shown, &e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OpError::io(&shown, &e)),
        };
        let mut lines = text.lines();
        if lines.next() != Some(STATE_MAGIC) {
            return Err(OpError::new(
                ErrorCode::Internal,
                format!("{shown} is not a freeze state file"),
            ));
        }
        let mut token = 0;
        let mut mounts = Vec::new();
        let mut hooks_ran = false;
        for line in lines {
            match line.split_once(' ') {
                Some(("token", t)) => token = u64::from_str_radix(t, 16).unwrap_or(0),
                Some(("mount", m)) => mounts.push(disks::unescape(m)),
                Some(("hooks", "ran")) => hooks_ran = true,
                _ => {}
            }
        }
        Ok(Some((token, mounts, hooks_ran)))
    }

    /// Thaws what a previous agent left frozen according to the state file, then removes
    /// it. Returns the mountpoints that were actually frozen. If the dead agent's freeze ran
    /// the freeze hooks, the thaw hooks are due.
    pub fn recover(&mut self) -> OpResult<Vec<String>> {
        let state = self.read_state();
        let Some((_, mounts, hooks_ran)) = (match state {
            Ok(s) => s,
            Err(e) => {
                self.remove_state();
                return Err(e);
            }
        }) else {
            return Ok(Vec::new());
        };
        let mut thawed = Vec::new();
        let mut failed = Vec::new();
        for m in mounts.iter().rev() {
            match thaw_one(m) {
                Ok(true) => thawed.push(m.clone()),
                Ok(false) => {}
                // Gone since (unmounted): nothing to thaw.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failed.push(format!("{m}: {e}")),
            }
        }
        if !failed.is_empty() {
            return Err(OpError::new(
                ErrorCode::Io,
                format!("could not thaw {}", failed.join("; ")),
            ));
        }
        self.remove_state();
        self.thaw_hooks_due |= hooks_ran;
        Ok(thawed)
    }

    /// The st_dev of the state file's directory, created if needed.
    fn state_dev(&self) -> OpResult<(u32, u32)> {
        let dir = self
            .state_file
            .parent()
            .ok_or_else(|| OpError::new(ErrorCode::Internal, "state file has no directory"))?;
        std::fs::create_dir_all(dir).map_err(|e| OpError::io(&dir.display().to_string(), &e))?;
        let meta =
            std::fs::metadata(dir).map_err(|e| OpError::io(&dir.display().to_string(), &e))?;
        Ok(dev_major_minor(meta.dev()))
    }

    /// Freezes the requested (or every local writable) filesystem.
    pub fn freeze(&mut self, req: &FsFreezeRequest, now: Instant) -> OpResult<FsFreezeReply> {
        if let Some(f) = &self.current {
            return Err(OpError::new(
                ErrorCode::Frozen,
                format!("already frozen: {}", f.mounts.join(", ")),
            ));
        }
        let all = disks::mounts_from(&self.mountinfo)?;
        let explicit = !req.mountpoints.is_empty();
        let targets = if explicit {
            requested_targets(&all, &req.mountpoints)?
        } else {
            default_targets(&all)
        };
        if targets.is_empty() {
            return Err(OpError::new(
                ErrorCode::FailedPrecondition,
                "no local writable filesystem to freeze",
            ));
        }
        let state_dev = self.state_dev()?;
        if let Some(m) = targets.iter().find(|m| m.dev == state_dev) {
            return Err(OpError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "the freeze state file {} is on {}, which would be frozen; configure a state \
                     file on a tmpfs such as /run",
                    self.state_shown(),
                    m.mountpoint
                ),
            ));
        }
        let auto_ms = match req.auto_thaw_ms {
            0 => DEFAULT_AUTO_THAW_MS,
            ms => ms.min(MAX_AUTO_THAW_MS),
        };
        let token = sys::random_u64()
            .map_err(|e| OpError::io("getrandom", &e))?
            .max(1);
        let mut frozen = Frozen {
            token,
            mounts: targets.iter().rev().map(|m| m.mountpoint.clone()).collect(),
            deadline: now + Duration::from_millis(u64::from(auto_ms)),
            auto_thaw_unix_ms: now_unix_ms() + i64::from(auto_ms),
            hooks_ran: req.run_hooks,
        };
        // Recorded before anything is frozen, so a crash at any point below is recoverable.
        self.write_state(&frozen)?;
        let mut done: Vec<String> = Vec::new();
        for mp in frozen.mounts.clone() {
            let result = open_dir(&mp).and_then(|d| sys::fifreeze(&d));
            match result {
                Ok(()) => done.push(mp),
                Err(e) if !explicit && errno_of(&e) == libc::EOPNOTSUPP => {}
                Err(e) => {
                    for m in done.iter().rev() {
                        let _ = thaw_one(m);
                    }
                    self.remove_state();
                    let code = match errno_of(&e) {
                        libc::EBUSY => ErrorCode::FailedPrecondition,
                        libc::EOPNOTSUPP => ErrorCode::Unsupported,
                        _ => OpError::io("", &e).code,
                    };
                    let why = if errno_of(&e) == libc::EBUSY {
                        "it is already frozen (by another tool?)".to_string()
                    } else {
                        e.to_string()
                    };
                    return Err(OpError::new(
                        code,
                        format!("freezing {mp} failed: {why}; everything was thawed again"),
                    ));
                }
            }
        }
        if done.is_empty() {
            self.remove_state();
            return Err(OpError::new(
                ErrorCode::Unsupported,
                "no filesystem supports freezing",
            ));
        }
        if done.len() != frozen.mounts.len() {
            frozen.mounts = done;
            // The state filesystem is never among the frozen ones, so this write cannot block.
            self.write_state(&frozen)?;
        }
        let reply = FsFreezeReply {
            token,
            frozen: frozen.mounts.clone(),
            auto_thaw_unix_ms: frozen.auto_thaw_unix_ms,
        };
        self.current = Some(frozen);
        Ok(reply)
    }

    /// Thaws the current freeze. `token` must match it, or be 0 (force).
    pub fn thaw(&mut self, req: &FsThawRequest) -> OpResult<FsThawReply> {
        let Some(f) = self.current.as_mut() else {
            if req.token == 0 {
                return Ok(FsThawReply::default());
            }
            return Err(OpError::new(
                ErrorCode::FailedPrecondition,
                "nothing is frozen (the freeze may have been thawed by its deadline)",
            ));
        };
        if req.token != 0 && req.token != f.token {
            return Err(OpError::new(
                ErrorCode::FailedPrecondition,
                "the token does not match the current freeze; nothing was thawed",
            ));
        }
        let mut thawed = Vec::new();
        let mut failed = Vec::new();
        let mut still = Vec::new();
        for m in f.mounts.iter().rev() {
            match thaw_one(m) {
                Ok(_) => thawed.push(m.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => thawed.push(m.clone()),
                Err(e) => {
                    failed.push(format!("{m}: {e}"));
                    still.push(m.clone());
                }
            }
        }
        if failed.is_empty() {
            self.thaw_hooks_due |= f.hooks_ran || req.run_hooks;
            self.current = None;
            self.remove_state();
            return Ok(FsThawReply { thawed });
        }
        still.reverse();
        f.mounts = still;
        let f = f.clone();
        let _ = self.write_state(&f);
        Err(OpError::new(
            ErrorCode::Io,
            format!(
                "could not thaw {} (thawed: {})",
                failed.join("; "),
                thawed.join(", ")
            ),
        ))
    }

    /// Thaws whatever is frozen (forced), e.g. before the agent exits; `None` when nothing
    /// was frozen.
    pub fn thaw_all(&mut self) -> Option<OpResult<FsThawReply>> {
        self.is_frozen().then(|| {
            self.thaw(&FsThawRequest {
                token: 0,
                run_hooks: false,
            })
        })
    }

    /// Thaws (forced) when the deadline has passed; `None` when nothing was due.
    pub fn auto_thaw(&mut self, now: Instant) -> Option<OpResult<FsThawReply>> {
        let due = self.current.as_ref().is_some_and(|f| now >= f.deadline);
        due.then(|| {
            self.thaw(&FsThawRequest {
                token: 0,
                run_hooks: false,
            })
        })
    }

    /// Hook commands to run for `phase`, in order: executables of the hooks directory
    /// (hidden names, `~` backups and dpkg/rpm leftovers skipped), ascending for a freeze,
    /// descending for a thaw.
    pub fn hook_commands(&self, phase: HookPhase) -> Vec<ChildCommand> {
        let Some(dir) = &self.hooks_dir else {
            return Vec::new();
        };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut hooks: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| {
                // Hidden files and package-manager or editor leftovers are not hooks.
                let n = e.file_name().to_string_lossy().into_owned();
                !(n.starts_with('.')
                    || n.ends_with('~')
                    || n.contains(".dpkg-")
                    || n.contains(".rpm"))
            })
            .map(|e| e.path())
            .filter(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .collect();
        hooks.sort();
        let arg = match phase {
            HookPhase::Freeze => "freeze",
            HookPhase::Thaw => {
                hooks.reverse();
                "thaw"
            }
        };
        hooks
            .into_iter()
            .map(|p| ChildCommand {
                argv: vec![p.display().to_string(), arg.to_string()],
                stdin: Vec::new(),
                timeout_ms: HOOK_TIMEOUT_MS,
            })
            .collect()
    }
}

/// The mountpoints `trim` visits, so the loop may trim one per turn with [`trim_one`].
pub fn trim_targets(req: &FsTrimRequest) -> OpResult<Vec<String>> {
    let all = disks::mounts()?;
    let targets = if req.mountpoints.is_empty() {
        default_targets(&all)
    } else {
        requested_targets(&all, &req.mountpoints)?
    };
    Ok(targets.into_iter().map(|m| m.mountpoint).collect())
}

/// FITRIM on one mountpoint; failures are carried in the result's `error`.
pub fn trim_one(mountpoint: &str, minimum_bytes: u64) -> FsTrimResult {
    let result = open_dir(mountpoint).and_then(|d| sys::fitrim(&d, minimum_bytes));
    match result {
        Ok(trimmed_bytes) => FsTrimResult {
            mountpoint: mountpoint.to_string(),
            trimmed_bytes,
            error: String::new(),
        },
        Err(e) => FsTrimResult {
            mountpoint: mountpoint.to_string(),
            trimmed_bytes: 0,
            error: if errno_of(&e) == libc::EOPNOTSUPP {
                "the filesystem or its device does not support discard".to_string()
            } else {
                e.to_string()
            },
        },
    }
}

/// FITRIM on each requested (or every local writable) filesystem. One FITRIM can take a
/// while on a large disk; the loop may prefer [`trim_targets`] + [`trim_one`] per turn.
pub fn trim(req: &FsTrimRequest) -> OpResult<FsTrimReply> {
    Ok(FsTrimReply {
        results: trim_targets(req)?
            .iter()
            .map(|m| trim_one(m, req.minimum_bytes))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::ops::testutil::TempDir;
    use std::path::Path;
    use std::process::{Child, Command};

    /// A loop-mounted ext4 image, thawed and unmounted on drop.
    struct LoopFs {
        dir: TempDir,
        mnt: String,
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    impl LoopFs {
        fn new(tag: &str) -> LoopFs {
            let dir = TempDir::new(tag);
            let img = dir.join("fs.img");
            let mnt = dir.join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            run(Command::new("truncate").arg("-s").arg("16M").arg(&img));
            run(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(&img));
            // Needs root and loop devices (the CI machine has both).
            run(Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&mnt));
            LoopFs {
                mnt: mnt.display().to_string(),
                dir,
            }
        }

        fn file(&self, name: &str) -> String {
            format!("{}/{name}", self.mnt)
        }
    }

    impl Drop for LoopFs {
        fn drop(&mut self) {
            let _ = thaw_one(&self.mnt);
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
    }

    /// Starts a child that creates `path` with "hello".
    fn start_write(path: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo hello > '{path}'"))
            .spawn()
            .unwrap()
    }

    fn proc_state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    /// Waits (up to 10 s) until the child sleeps uninterruptibly, i.e. is blocked in the
    /// kernel on the frozen filesystem. Panics if it finishes instead.
    fn assert_blocks(child: &mut Child) {
        for _ in 0..1000 {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the write completed on a frozen filesystem"
            );
            if proc_state(child.id()) == Some('D') {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the writer never blocked on the frozen filesystem");
    }

    /// Waits (up to 10 s) for the child to exit successfully.
    fn assert_completes(child: &mut Child) {
        for _ in 0..1000 {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success());
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the write did not complete: is the filesystem still frozen?");
    }

    fn freezer(t: &TempDir) -> Freezer {
        Freezer::new(t.join("run/freeze.state"), None)
    }

    fn freeze_req(mounts: &[&str], auto_thaw_ms: u32) -> FsFreezeRequest {
        FsFreezeRequest {
            mountpoints: mounts.iter().map(|m| m.to_string()).collect(),
            auto_thaw_ms,
            run_hooks: false,
        }
    }

    fn thaw_req(token: u64) -> FsThawRequest {
        FsThawRequest {
            token,
            run_hooks: false,
        }
    }

    #[test]
    fn freeze_blocks_writes_until_thaw_and_a_wrong_token_cannot_thaw() {
        let fs = LoopFs::new("freeze");
        let t = TempDir::new("freeze-state");
        let mut fz = freezer(&t);
        let now = Instant::now();
        let before_ms = now_unix_ms();
        let reply = fz.freeze(&freeze_req(&[&fs.mnt], 0), now).unwrap();
        assert_ne!(reply.token, 0);
        assert_eq!(reply.frozen, vec![fs.mnt.clone()]);
        assert!(reply.auto_thaw_unix_ms >= before_ms + i64::from(DEFAULT_AUTO_THAW_MS));
        assert!(fz.is_frozen());
        assert_eq!(fz.deadline(), Some(now + Duration::from_secs(60)));
        let st = fz.status(now);
        assert_eq!(st.state, FreezeState::Frozen as i32);
        assert_eq!((st.token, st.auto_thaw_in_ms), (reply.token, 60_000));
        let state = std::fs::read_to_string(t.join("run/freeze.state")).unwrap();
        assert!(
            state.contains(&format!("mount {}", escape(&fs.mnt))),
            "{state}"
        );

        let mut writer = start_write(&fs.file("f"));
        assert_blocks(&mut writer);

        let e = fz.thaw(&thaw_req(reply.token ^ 1)).unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(fz.is_frozen());
        assert_eq!(proc_state(writer.id()), Some('D'));
        let e = fz.freeze(&freeze_req(&[&fs.mnt], 0), now).unwrap_err();
        assert_eq!(e.code, ErrorCode::Frozen);

        let thawed = fz.thaw(&thaw_req(reply.token)).unwrap();
        assert_eq!(thawed.thawed, vec![fs.mnt.clone()]);
        assert_completes(&mut writer);
        assert_eq!(std::fs::read_to_string(fs.file("f")).unwrap(), "hello\n");
        assert!(!t.join("run/freeze.state").exists());
        assert_eq!(fz.status(now).state, FreezeState::Thawed as i32);

        let e = fz.thaw(&thaw_req(reply.token)).unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(fz.thaw(&thaw_req(0)).unwrap().thawed.is_empty());
    }

    #[test]
    fn a_default_freeze_takes_every_writable_disk_filesystem_it_sees() {
        let fs = LoopFs::new("default");
        let ro = LoopFs::new("default-ro");
        run(Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&ro.mnt));
        let t = TempDir::new("default-state");
        // Only the two loop mounts and a tmpfs are visible to this freezer, so the default
        // selection runs for real without any chance of freezing the machine's own disks.
        let real = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = |mnt: &str| {
            real.lines()
                .rfind(|l| l.split(' ').nth(4) == Some(mnt))
                .unwrap()
                .to_string()
        };
        let table = format!(
            "{}\n{}\n1000 1 0:999 / /qx-not-a-disk rw - tmpfs tmpfs rw\n",
            line(&fs.mnt),
            line(&ro.mnt)
        );
        std::fs::write(t.join("mountinfo"), table).unwrap();
        let mut fz = freezer(&t).with_mountinfo(t.join("mountinfo"));
        let r = fz.freeze(&freeze_req(&[], 0), Instant::now()).unwrap();
        assert_eq!(r.frozen, vec![fs.mnt.clone()]);
        let mut writer = start_write(&fs.file("f"));
        assert_blocks(&mut writer);
        fz.thaw(&thaw_req(r.token)).unwrap();
        assert_completes(&mut writer);
    }

    #[test]
    fn auto_thaw_fires_at_the_deadline_and_not_before() {
        let fs = LoopFs::new("autothaw");
        let t = TempDir::new("autothaw-state");
        let mut fz = freezer(&t);
        let now = Instant::now();
        fz.freeze(&freeze_req(&[&fs.mnt], 500), now).unwrap();
        assert_eq!(fz.deadline(), Some(now + Duration::from_millis(500)));
        assert!(fz.auto_thaw(now).is_none());
        assert!(fz.auto_thaw(now + Duration::from_millis(499)).is_none());
        assert_eq!(
            fz.status(now + Duration::from_millis(200)).auto_thaw_in_ms,
            300
        );
        let r = fz
            .auto_thaw(now + Duration::from_millis(500))
            .unwrap()
            .unwrap();
        assert_eq!(r.thawed, vec![fs.mnt.clone()]);
        assert!(!fz.is_frozen());
        assert_eq!(fz.deadline(), None);
        assert_completes(&mut start_write(&fs.file("g")));
        assert!(fz.auto_thaw(now + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn a_restarted_agent_thaws_what_the_state_file_records() {
        let fs = LoopFs::new("recover");
        let t = TempDir::new("recover-state");
        let mut dead = freezer(&t);
        dead.freeze(&freeze_req(&[&fs.mnt], 0), Instant::now())
            .unwrap();
        drop(dead);
        let mut writer = start_write(&fs.file("f"));
        assert_blocks(&mut writer);
        let mut fresh = freezer(&t);
        assert!(!fresh.is_frozen());
        assert!(
            fresh.thaw(&thaw_req(0)).unwrap().thawed.is_empty(),
            "a new agent froze nothing"
        );
        assert_eq!(fresh.recover().unwrap(), vec![fs.mnt.clone()]);
        assert_completes(&mut writer);
        assert!(!t.join("run/freeze.state").exists());
        assert!(fresh.recover().unwrap().is_empty());
        // A state file that is not ours is reported and removed.
        std::fs::write(t.join("run/freeze.state"), "garbage\n").unwrap();
        assert_eq!(fresh.recover().unwrap_err().code, ErrorCode::Internal);
        assert!(!t.join("run/freeze.state").exists());
    }

    #[test]
    fn a_mountpoint_named_through_a_symlink_is_found() {
        let fs = LoopFs::new("symlinked");
        let t = TempDir::new("symlinked-state");
        std::os::unix::fs::symlink(&fs.mnt, t.join("alias")).unwrap();
        let mut fz = freezer(&t);
        let r = fz
            .freeze(&freeze_req(&[&t.s("alias/")], 0), Instant::now())
            .unwrap();
        assert_eq!(r.frozen, vec![fs.mnt.clone()]);
        assert_eq!(
            fz.thaw(&thaw_req(r.token)).unwrap().thawed,
            vec![fs.mnt.clone()]
        );
    }

    #[test]
    fn the_filesystem_holding_the_state_file_is_never_frozen() {
        let fs = LoopFs::new("statefs");
        let mut fz = Freezer::new(PathBuf::from(fs.file("run/freeze.state")), None);
        let e = fz
            .freeze(&freeze_req(&[&fs.mnt], 0), Instant::now())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(e.message.contains("state file"), "{e}");
        assert!(!fz.is_frozen());
        assert!(!Path::new(&fs.file("run/freeze.state")).exists());
        assert_completes(&mut start_write(&fs.file("f")));
    }

    #[test]
    fn a_failed_freeze_thaws_what_it_froze_and_leaves_others_alone() {
        let a = LoopFs::new("fail-a");
        let b = LoopFs::new("fail-b");
        let t = TempDir::new("fail-state");
        // Someone else froze A. B (mounted later) freezes first, then A fails.
        sys::fifreeze(&open_dir(&a.mnt).unwrap()).unwrap();
        let mut fz = freezer(&t);
        let e = fz
            .freeze(&freeze_req(&[&a.mnt, &b.mnt], 0), Instant::now())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(
            e.message.contains(&a.mnt) && e.message.contains("already frozen"),
            "{e}"
        );
        assert!(!fz.is_frozen());
        assert!(!t.join("run/freeze.state").exists());
        assert_completes(&mut start_write(&b.file("f")));
        // A is still frozen by its owner: we never thaw what we did not freeze.
        let mut writer = start_write(&a.file("f"));
        assert_blocks(&mut writer);
        assert!(thaw_one(&a.mnt).unwrap());
        assert_completes(&mut writer);

        let e = fz
            .freeze(&freeze_req(&[&a.dir.s("")], 0), Instant::now())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn default_targets_are_local_writable_disk_filesystems_once_each() {
        let mounts = disks::parse_mountinfo(
            "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
28 27 0:30 / /run rw - tmpfs tmpfs rw
29 27 254:0 /srv /srv rw - ext4 /dev/vda rw
30 27 8:1 / /boot rw - vfat /dev/sda1 rw
31 27 7:1 / /media/cd ro - iso9660 /dev/sr0 ro
32 27 0:40 / /mnt/nfs rw - nfs4 srv:/x rw
33 30 8:2 / /boot/efi rw - vfat /dev/sda2 rw
",
        );
        let points: Vec<String> = default_targets(&mounts)
            .into_iter()
            .map(|m| m.mountpoint)
            .collect();
        assert_eq!(points, ["/", "/boot", "/boot/efi"]);
        let picked =
            requested_targets(&mounts, &["/boot/efi/".into(), "/".into(), "/srv".into()]).unwrap();
        let points: Vec<&str> = picked.iter().map(|m| m.mountpoint.as_str()).collect();
        assert_eq!(points, ["/", "/boot/efi"]);
        assert_eq!(
            requested_targets(&mounts, &["/nope".into()])
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn hooks_are_executables_in_name_order_unwound_on_thaw() {
        let t = TempDir::new("hooks");
        let hooks = t.join("hooks");
        std::fs::create_dir(&hooks).unwrap();
        for (name, mode) in [
            ("20-db", 0o755),
            ("10-app", 0o700),
            ("30-notes", 0o644),
            (".hidden", 0o755),
            ("15-db~", 0o755),
            ("25-x.dpkg-old", 0o755),
        ] {
            std::fs::write(hooks.join(name), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(hooks.join(name), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        std::fs::create_dir(hooks.join("40-dir")).unwrap();
        let fz = Freezer::new(t.join("state"), Some(hooks.clone()));
        let argv = |phase| {
            fz.hook_commands(phase)
                .into_iter()
                .map(|c| {
                    assert_eq!(c.timeout_ms, HOOK_TIMEOUT_MS);
                    c.argv.join(" ")
                })
                .collect::<Vec<_>>()
        };
        let h = |n: &str| hooks.join(n).display().to_string();
        assert_eq!(
            argv(HookPhase::Freeze),
            [
                format!("{} freeze", h("10-app")),
                format!("{} freeze", h("20-db"))
            ]
        );
        assert_eq!(
            argv(HookPhase::Thaw),
            [
                format!("{} thaw", h("20-db")),
                format!("{} thaw", h("10-app"))
            ]
        );
        assert!(Freezer::new(t.join("state"), None)
            .hook_commands(HookPhase::Freeze)
            .is_empty());
        assert!(Freezer::new(t.join("state"), Some(t.join("missing")))
            .hook_commands(HookPhase::Freeze)
            .is_empty());
    }

    #[test]
    fn trim_discards_free_space_on_a_loop_mount_and_reports_failures_per_mount() {
        let fs = LoopFs::new("trim");
        let reply = trim(&FsTrimRequest {
            mountpoints: vec![fs.mnt.clone(), "/dev/shm".into()],
            minimum_bytes: 0,
        });
        // /dev/shm is a tmpfs mountpoint on any usual Linux; without it, ask for the loop only.
        let reply = match reply {
            Ok(r) => r,
            Err(_) => trim(&FsTrimRequest {
                mountpoints: vec![fs.mnt.clone()],
                minimum_bytes: 0,
            })
            .unwrap(),
        };
        let r = reply
            .results
            .iter()
            .find(|r| r.mountpoint == fs.mnt)
            .unwrap();
        assert_eq!(r.error, "");
        assert!(r.trimmed_bytes > 0);
        if let Some(shm) = reply.results.iter().find(|r| r.mountpoint == "/dev/shm") {
            assert!(!shm.error.is_empty());
            assert_eq!(shm.trimmed_bytes, 0);
        }
        let e = trim(&FsTrimRequest {
            mountpoints: vec![fs.dir.s("")],
            minimum_bytes: 0,
        })
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
    }
}
