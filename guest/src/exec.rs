//! Child processes run inside the event loop: execs, operation commands, hooks, power.
//!
//! Every child gets its own process group, non-blocking pipes registered with the poll, and a
//! pidfd (fallback: SIGCHLD + `waitpid`) so its exit is an event, never a wait. Output is
//! read only while the consumer has room: a streaming exec whose host stopped reading stops
//! being read, the child blocks on its full pipe, and memory stays bounded. Timeouts send
//! SIGTERM to the group, then SIGKILL after the grace period.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use qx_proto::agent::{ErrorCode, ExecExit, ExecOutput, OutputStream, PowerAction};

use crate::ops::{OpError, OpResult};
use crate::sys;

/// First token of child fds; each slot uses four tokens (stdout, stderr, stdin, pidfd).
pub const CHILD_TOKEN_BASE: usize = 16;
/// Bytes read from a pipe at a time (also the largest ExecOutput chunk).
pub const PIPE_READ_BYTES: usize = 32 * 1024;
/// Slots kept for the agent's own children (commands of operations, hooks, power) beyond the
/// exec limit.
pub const INTERNAL_SLOTS: usize = 4;
/// Internal slots operation commands (password changes) may not take: one each for a
/// pre-freeze hook, a thaw hook and the power command, which run one at a time.
pub const RESERVED_SLOTS: usize = 3;

/// Which fd of a child a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildFd {
    Stdout,
    Stderr,
    Stdin,
    Pidfd,
}

impl ChildFd {
    fn index(self) -> usize {
        match self {
            ChildFd::Stdout => 0,
            ChildFd::Stderr => 1,
            ChildFd::Stdin => 2,
            ChildFd::Pidfd => 3,
        }
    }

    /// The token of this fd of the child in `slot`.
    pub fn token(self, slot: usize) -> Token {
        Token(CHILD_TOKEN_BASE + slot * 4 + self.index())
    }

    /// Decodes a child token.
    pub fn from_token(token: Token) -> Option<(usize, ChildFd)> {
        let n = token.0.checked_sub(CHILD_TOKEN_BASE)?;
        let kind = match n % 4 {
            0 => ChildFd::Stdout,
            1 => ChildFd::Stderr,
            2 => ChildFd::Stdin,
            _ => ChildFd::Pidfd,
        };
        Some((n / 4, kind))
    }
}

/// Who asked for a child and what its end means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// An `ExecRequest`: stream items and `ExecExit` go to the request.
    Exec { stream: bool },
    /// A command of an operation (`ChildCommand`): `Done` on exit 0, else an `Error`.
    Command { what: String },
    /// A freeze hook; the agent continues the freeze when it ends.
    FreezeHook,
    /// A post-thaw hook; nobody waits for it.
    Detached,
    /// The init's power command; on failure the agent falls back to reboot(2).
    Power(PowerAction),
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub argv: Vec<String>,
    pub shell: bool,
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    pub cwd: Option<PathBuf>,
    pub stdin: Vec<u8>,
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Supplementary groups of a child with a `uid` (initgroups' list).
    pub groups: Vec<u32>,
    /// The environment a child with a `uid` starts from instead of the agent's (`su -`'s:
    /// HOME, USER, LOGNAME, SHELL, PATH); `env` is set over it.
    pub login_env: Vec<(String, String)>,
    /// stderr on stdout's pipe (qemu-ga's `capture-output: "merged"`): one stream, stdout.
    pub merge_stderr: bool,
    /// Per-stream caps (stdout, stderr).
    pub caps: [u64; 2],
}

/// A finished child, for the agent to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub id: u64,
    pub owner: Owner,
    pub exit: ExecExit,
}

#[derive(Debug, Default)]
struct Pipe {
    file: Option<File>,
    /// An edge said readable and we have not yet read to `WouldBlock`.
    ready: bool,
    cap: u64,
    total: u64,
    sent: u64,
    collected: Vec<u8>,
    truncated: bool,
}

#[derive(Debug)]
struct Job {
    id: u64,
    owner: Owner,
    pid: u32,
    pidfd: Option<OwnedFd>,
    stdin: Option<File>,
    stdin_data: Vec<u8>,
    stdin_pos: usize,
    pipes: [Pipe; 2],
    started: Instant,
    deadline: Option<Instant>,
    kill_at: Option<Instant>,
    grace: Duration,
    timed_out: bool,
    status: Option<ExitStatus>,
    /// The pipes were read once more after the exit was seen.
    drained: bool,
}

impl Job {
    fn streaming(&self) -> bool {
        matches!(self.owner, Owner::Exec { stream: true })
    }
}

/// Where the output of streaming children goes, and how much room it has.
pub trait OutputSink {
    /// Whether one more output chunk (up to [`PIPE_READ_BYTES`]) can be queued now.
    fn has_room(&self) -> bool;
    /// Queues a stream item for request `id`.
    fn output(&mut self, id: u64, item: ExecOutput);
}

/// The table of running children.
#[derive(Debug)]
pub struct Jobs {
    slots: Vec<Option<Job>>,
    max_exec: usize,
    buf: Vec<u8>,
}

impl Jobs {
    pub fn new(max_exec: usize) -> Self {
        let mut slots = Vec::new();
        slots.resize_with(max_exec + INTERNAL_SLOTS, || None);
        Jobs {
            slots,
            max_exec,
            buf: vec![0; PIPE_READ_BYTES],
        }
    }

    /// Changes the exec limit (config reload); running children are not touched.
    pub fn set_max_exec(&mut self, max_exec: usize) {
        self.max_exec = max_exec;
        if self.slots.len() < max_exec + INTERNAL_SLOTS {
            self.slots.resize_with(max_exec + INTERNAL_SLOTS, || None);
        }
    }

    pub fn running_execs(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|j| matches!(j.owner, Owner::Exec { .. }))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Starts a child. `Error{BUSY}` beyond the exec limit.
    pub fn spawn(
        &mut self,
        registry: &Registry,
        id: u64,
        owner: Owner,
        spec: Spec,
        now: Instant,
    ) -> OpResult<u32> {
        let is_exec = matches!(owner, Owner::Exec { .. });
        if is_exec && self.running_execs() >= self.max_exec {
            return Err(OpError::new(
                ErrorCode::Busy,
                format!("{} commands already running", self.max_exec),
            ));
        }
        let is_command = matches!(owner, Owner::Command { .. });
        let commands = || {
            let running = self.slots.iter().flatten();
            running
                .filter(|j| matches!(j.owner, Owner::Command { .. }))
                .count()
        };
        if is_command && commands() >= INTERNAL_SLOTS - RESERVED_SLOTS {
            return Err(OpError::new(
                ErrorCode::Busy,
                "another operation command is running",
            ));
        }
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| OpError::new(ErrorCode::Busy, "no free child slot"))?;
        let Some(program) = spec.argv.first() else {
            return Err(OpError::new(ErrorCode::InvalidArgument, "argv is empty"));
        };
        let spawned = start(&spec).map_err(|e| OpError::io(program, &e))?;
        let pid = spawned.pid;
        let stdout = Some(File::from(spawned.stdout));
        let stderr = spawned.stderr.map(File::from);
        let stdin = spawned.stdin.map(File::from);
        let pidfd = sys::pidfd_open(pid).ok();
        let mut job = Job {
            id,
            owner,
            pid,
            pidfd,
            stdin,
            stdin_data: spec.stdin,
            stdin_pos: 0,
            pipes: [Pipe::default(), Pipe::default()],
            started: now,
            deadline: (!spec.timeout.is_zero()).then(|| now + spec.timeout),
            kill_at: None,
            grace: spec.kill_grace,
            timed_out: false,
            status: None,
            drained: false,
        };
        job.pipes[0].cap = spec.caps[0];
        job.pipes[1].cap = spec.caps[1];
        job.pipes[0].file = stdout;
        job.pipes[1].file = stderr;
        let registered = register_job(registry, slot, &job);
        if let Err(e) = registered {
            let _ = sys::kill_group(pid, libc::SIGKILL);
            let _ = sys::wait_child(pid, true);
            return Err(OpError::new(
                ErrorCode::Internal,
                format!("cannot watch the child: {e}"),
            ));
        }
        log::debug!("started pid {pid} for request {id}");
        self.slots[slot] = Some(job);
        Ok(pid)
    }

    /// Records a readiness event on a child fd.
    pub fn on_event(&mut self, slot: usize, fd: ChildFd) {
        let Some(job) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        match fd {
            ChildFd::Stdout => job.pipes[0].ready = true,
            ChildFd::Stderr => job.pipes[1].ready = true,
            ChildFd::Stdin => {}
            ChildFd::Pidfd => reap(job),
        }
    }

    /// SIGCHLD: reaps whatever exited (the fallback when pidfds are unavailable).
    pub fn on_sigchld(&mut self) {
        for job in self.slots.iter_mut().flatten() {
            reap(job);
        }
    }

    /// Sends `signal` to the exec of request `target`. False when no such exec runs.
    pub fn signal(&mut self, target: u64, signal: i32) -> bool {
        if target == 0 {
            // Id 0 marks the agent's own children (hooks, power): not the host's to signal.
            return false;
        }
        for job in self.slots.iter_mut().flatten() {
            if job.id == target && job.status.is_none() {
                if let Err(e) = sys::kill_group(job.pid, signal) {
                    log::warn!("cannot signal pid {}: {e}", job.pid);
                }
                return true;
            }
        }
        false
    }

    /// Earliest timeout or kill deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .flatten()
            .filter(|j| j.status.is_none())
            .filter_map(|j| match (j.kill_at, j.deadline) {
                (Some(k), _) => Some(k),
                (None, d) => d,
            })
            .min()
    }

    /// Whether some pipe has unread data waiting for room in the sink.
    pub fn wants_room(&self) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|j| j.streaming() && j.pipes.iter().any(|p| p.ready && p.file.is_some()))
    }

    /// Runs timeouts, feeds stdin, reads output (streaming output only while `sink` has
    /// room) and returns the children that finished. (The room for a child's terminal reply
    /// was reserved when its request was admitted.)
    pub fn service(
        &mut self,
        registry: &Registry,
        now: Instant,
        sink: &mut dyn OutputSink,
    ) -> Vec<Finished> {
        let mut done = Vec::new();
        for slot in 0..self.slots.len() {
            let Some(job) = self.slots[slot].as_mut() else {
                continue;
            };
            // Timeouts: TERM, then KILL after the grace period.
            if job.status.is_none() {
                if let Some(kill_at) = job.kill_at {
                    if now >= kill_at {
                        let _ = sys::kill_group(job.pid, libc::SIGKILL);
                        job.kill_at = None;
                        job.deadline = None;
                    }
                } else if job.deadline.is_some_and(|d| now >= d) {
                    log::debug!("pid {} timed out: terminating", job.pid);
                    job.timed_out = true;
                    let _ = sys::kill_group(job.pid, libc::SIGTERM);
                    job.kill_at = Some(now + job.grace);
                }
            }
            feed_stdin(registry, slot, job);
            for i in 0..2 {
                read_pipe(registry, slot, job, i, &mut self.buf, sink);
            }
            if job.pidfd.is_none() || job.status.is_none() {
                // Without a pidfd, or when an event raced the exit: poll the status cheaply.
                reap(job);
            }
            if job.status.is_some() && !job.drained {
                // Everything the child wrote is in its pipes now, whether or not their
                // readiness edges have been seen yet: read them to the end once more.
                job.drained = true;
                for i in 0..2 {
                    job.pipes[i].ready = job.pipes[i].file.is_some();
                    read_pipe(registry, slot, job, i, &mut self.buf, sink);
                }
            }
            let pipes_done = job.pipes.iter().all(|p| p.file.is_none() || !p.ready);
            if job.status.is_some() && pipes_done {
                if let Some(job) = self.slots[slot].take() {
                    done.push(finish(registry, slot, job, now));
                }
            }
        }
        done
    }
}

/// Starts the child of `spec` through [`sys::spawn`]: posix_spawn (no fork of the agent)
/// unless it must run as another user or group, which only a fork can set up.
fn start(spec: &Spec) -> io::Result<sys::Spawned> {
    let (program, args) = if spec.shell {
        (
            "/bin/sh".to_owned(),
            vec!["-c".to_owned(), spec.argv.join(" ")],
        )
    } else {
        (spec.argv[0].clone(), spec.argv[1..].to_vec())
    };
    let env = child_env(spec);
    let path = find_program(
        &program,
        env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v),
    )?;
    let argv = std::iter::once(&program)
        .chain(&args)
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<io::Result<Vec<_>>>()?;
    let cwd = spec
        .cwd
        .as_ref()
        .map(|c| cstring(c.as_os_str().as_bytes()))
        .transpose()?;
    let user = (spec.uid.is_some() || spec.gid.is_some()).then(|| sys::Identity {
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
    });
    sys::spawn(
        &cstring(path.as_os_str().as_bytes())?,
        &argv,
        &envp,
        cwd.as_deref(),
        !spec.stdin.is_empty(),
        spec.merge_stderr,
        user.as_ref(),
    )
}

/// The child's whole environment: the agent's own, or for a child running as a user that
/// user's login environment (none at all with `clear_env`), with the request's variables set
/// over it.
fn child_env(spec: &Spec) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = if spec.clear_env {
        Vec::new()
    } else if spec.uid.is_some() && !spec.login_env.is_empty() {
        spec.login_env
            .iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect()
    } else {
        std::env::vars_os().collect()
    };
    for (k, v) in &spec.env {
        env.retain(|(old, _)| old != k.as_str());
        env.push((k.into(), v.into()));
    }
    env
}

/// Where the child's `PATH` (or, without one, the usual system directories) finds `program`,
/// as `execvp` would; a name with a `/` is taken as it is.
fn find_program(program: &str, path: Option<&OsString>) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let default = OsString::from(DEFAULT_PATH);
    std::env::split_paths(path.unwrap_or(&default))
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not found in PATH"))
}

/// The search path for children whose environment has no `PATH`.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

fn register_job(registry: &Registry, slot: usize, job: &Job) -> io::Result<()> {
    for (i, kind) in [ChildFd::Stdout, ChildFd::Stderr].into_iter().enumerate() {
        if let Some(f) = &job.pipes[i].file {
            sys::set_nonblocking(f.as_raw_fd())?;
            registry.register(
                &mut SourceFd(&f.as_raw_fd()),
                kind.token(slot),
                Interest::READABLE,
            )?;
        }
    }
    if let Some(f) = &job.stdin {
        sys::set_nonblocking(f.as_raw_fd())?;
        registry.register(
            &mut SourceFd(&f.as_raw_fd()),
            ChildFd::Stdin.token(slot),
            Interest::WRITABLE,
        )?;
    }
    if let Some(fd) = &job.pidfd {
        registry.register(
            &mut SourceFd(&fd.as_raw_fd()),
            ChildFd::Pidfd.token(slot),
            Interest::READABLE,
        )?;
    }
    Ok(())
}

fn reap(job: &mut Job) {
    if job.status.is_none() {
        match sys::wait_child(job.pid, false) {
            Ok(Some(status)) => job.status = Some(ExitStatus::from_raw(status)),
            Ok(None) => {}
            Err(e) => log::warn!("waitpid {}: {e}", job.pid),
        }
    }
}

fn feed_stdin(registry: &Registry, _slot: usize, job: &mut Job) {
    let Some(f) = job.stdin.as_mut() else { return };
    while job.stdin_pos < job.stdin_data.len() {
        match f.write(&job.stdin_data[job.stdin_pos..]) {
            Ok(0) => break,
            Ok(n) => job.stdin_pos += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => break, // EPIPE: the child does not read its stdin
        }
    }
    if let Some(f) = job.stdin.take() {
        let _ = registry.deregister(&mut SourceFd(&f.as_raw_fd()));
    }
    job.stdin_data = Vec::new();
}

fn read_pipe(
    registry: &Registry,
    _slot: usize,
    job: &mut Job,
    i: usize,
    buf: &mut [u8],
    sink: &mut dyn OutputSink,
) {
    let streaming = job.streaming();
    let id = job.id;
    let pipe = &mut job.pipes[i];
    while pipe.ready {
        let Some(f) = pipe.file.as_mut() else {
            pipe.ready = false;
            return;
        };
        if streaming && !sink.has_room() {
            return;
        }
        // Output within the cap is read straight into where it is kept: the collected buffer,
        // or the stream item's own data (which the outbox then encodes into its frame, the
        // one copy on the way out). Output past the cap is read into `buf` and dropped.
        let room = pipe
            .cap
            .saturating_sub(pipe.total)
            .min(PIPE_READ_BYTES as u64) as usize;
        let mut item = Vec::new();
        let res = match (room, streaming) {
            (0, _) => f.read(buf),
            (_, true) => sys::read_append(f.as_raw_fd(), &mut item, room),
            (_, false) => sys::read_append(f.as_raw_fd(), &mut pipe.collected, room),
        };
        match res {
            Ok(0) => {
                let _ = registry.deregister(&mut SourceFd(&f.as_raw_fd()));
                pipe.file = None;
                pipe.ready = false;
            }
            Ok(n) => {
                pipe.total += n as u64;
                if room == 0 {
                    pipe.truncated = true;
                } else if streaming {
                    let stream = if i == 0 {
                        OutputStream::Stdout
                    } else {
                        OutputStream::Stderr
                    };
                    sink.output(
                        id,
                        ExecOutput {
                            stream: stream as i32,
                            data: item,
                            offset: pipe.sent,
                        },
                    );
                    pipe.sent += n as u64;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => pipe.ready = false,
            Err(_) => {
                let _ = registry.deregister(&mut SourceFd(&f.as_raw_fd()));
                pipe.file = None;
                pipe.ready = false;
            }
        }
    }
}

fn finish(registry: &Registry, _slot: usize, mut job: Job, now: Instant) -> Finished {
    for pipe in &mut job.pipes {
        if let Some(f) = pipe.file.take() {
            let _ = registry.deregister(&mut SourceFd(&f.as_raw_fd()));
        }
    }
    if let Some(f) = job.stdin.take() {
        let _ = registry.deregister(&mut SourceFd(&f.as_raw_fd()));
    }
    if let Some(fd) = job.pidfd.take() {
        let _ = registry.deregister(&mut SourceFd(&fd.as_raw_fd()));
    }
    let status = job.status.unwrap_or_else(|| ExitStatus::from_raw(0));
    let [mut out, mut err] = job.pipes;
    // Output was read straight into these, a pipe read's worth of room at a time; the exit is
    // kept a while (the session's reply cache, a qemu-ga status record), so it keeps only its
    // bytes.
    out.collected.shrink_to_fit();
    err.collected.shrink_to_fit();
    let exit = ExecExit {
        pid: job.pid,
        exited: status.code().is_some(),
        exit_code: status.code().unwrap_or(0),
        signal: status.signal().unwrap_or(0),
        timed_out: job.timed_out,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        stdout_bytes: out.total,
        stderr_bytes: err.total,
        stdout: out.collected,
        stderr: err.collected,
        duration_us: now.duration_since(job.started).as_micros() as u64,
    };
    log::debug!(
        "pid {} ended (code {:?}, signal {:?})",
        job.pid,
        status.code(),
        status.signal()
    );
    Finished {
        id: job.id,
        owner: job.owner,
        exit,
    }
}
