//! The I/O shell: one `mio::Poll`, one thread, every fd non-blocking and registered.
//!
//! Each turn: run [`Agent::service`] (open the transport when due, read the port while the
//! outbox has room, decode and dispatch requests, liveness and telemetry timers, children,
//! file transfers, flush), then sleep in `poll` until the earliest deadline or an event.
//! Readiness is edge-triggered: after an event the loop reads or writes until `WouldBlock`,
//! and a source it could not drain (no room in the outbox) stays marked ready. Nothing blocks
//! and nothing sleeps outside `poll`: the calls that can wait on a filesystem (file
//! operations, listings, freeze and trim, telemetry's statvfs) runs on the one worker thread
//! ([`crate::worker`]), which reports back through its own token.
//!
//! Interest follows state: the transport is watched for writable only while the outbox holds
//! bytes, or while no host is attached (the host's arrival on a virtio-serial port shows as
//! the OUT edge). A host-less port reports IN|HUP once per edge, not in a loop.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use qx_proto::agent::{AgentReady, Limits};
use thiserror::Error;

use crate::config::Config;
use crate::exec::{ChildFd, Jobs, OutputSink};
use crate::logring;
use crate::ops::files::{FileWriters, Listings};
use crate::ops::fsfreeze::Freezer;
use crate::ops::policy::PathPolicy;
use crate::ops::telemetry::Collector;
use crate::ops::users::UserDb;
use crate::outbox::MAX_FRAME_TOTAL_BYTES;
use crate::session::{LinkEvent, Session, SessionConfig};
use crate::sys;
use crate::transport::{Endpoint, Transport};
use crate::worker::Worker;

/// State the worker's jobs share (open uploads, kept listings), locked by the worker alone. A
/// job that panicked cannot leave it half changed in a way a later job must not see (each
/// call is whole), so poisoning is ignored.
pub(crate) fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The transport's token.
pub const PORT: Token = Token(0);
/// The signalfd's token.
pub const SIGNALS: Token = Token(1);
/// The filesystem worker's waker.
pub const WORKER: Token = Token(8);
/// Bytes asked of one read() on the port (a virtio-serial read returns at most 4096).
pub const PORT_READ_BYTES: usize = 4096;
/// Free outbox bytes ([`crate::outbox::Outbox::room`]) needed before the loop queues another
/// stream item (a file chunk, an exec output chunk): one maximum frame. Terminal replies
/// need none: their room was reserved when the request was admitted.
pub const WORK_ROOM_BYTES: usize = MAX_FRAME_TOTAL_BYTES;
/// How long SIGTERM waits for the outbox to drain to a connected host (and the thaw hooks
/// to finish, after the thaw that comes first).
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);
/// How long a hook or power command that found no free child slot waits before it tries
/// again.
pub const SLOT_RETRY: Duration = Duration::from_secs(1);
/// Most chunks one read transfer asks of the worker at a time (fewer when the outbox has less
/// room, or several reads share it): the worker reads the next chunks while the port takes
/// the last ones. docs/benchmarks.md has the figures.
pub const READ_AHEAD_CHUNKS: usize = 2;
/// A read transfer queues its next chunk only while the outbox holds less than this: the
/// chunks read ahead wait as chunks, and a reply queued during a read (a pong, another
/// request's answer) waits behind at most this much of it.
pub const READ_QUEUE_BYTES: usize = 2 * WORK_ROOM_BYTES;
/// Service rounds per turn before the loop polls again (fairness between transfers and I/O).
const ROUNDS_PER_TURN: usize = 8;

/// Typed poll tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Port,
    Signals,
    Worker,
    Qga,
    Child(usize, ChildFd),
    Unknown(usize),
}

impl From<Token> for Tok {
    fn from(t: Token) -> Self {
        match t {
            PORT => Tok::Port,
            SIGNALS => Tok::Signals,
            WORKER => Tok::Worker,
            crate::qga::QGA => Tok::Qga,
            other => match ChildFd::from_token(other) {
                Some((slot, fd)) => Tok::Child(slot, fd),
                None => Tok::Unknown(other.0),
            },
        }
    }
}

/// Why the loop could not start or had to stop.
#[derive(Debug, Error)]
pub enum LoopError {
    #[error("cannot create the poll: {0}")]
    Poll(std::io::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the filesystem worker: {0}")]
    Worker(std::io::Error),
}

/// The capabilities this build serves (docs/protocol.md, "Capabilities").
pub const CAPABILITIES: [&str; 16] = [
    "ping",
    "exec",
    "file-read",
    "file-write",
    "file-crc32c",
    "file-ops",
    "fsfreeze",
    "fstrim",
    "time",
    "power",
    "users",
    "ssh-keys",
    "network",
    "disks",
    "logs",
    "telemetry",
];

/// Where the configuration came from, for SIGHUP reloads.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub optional: bool,
    pub overrides: Vec<(String, String)>,
}

/// A file transfer or other long operation stepped by the loop one piece at a time, each
/// piece on the filesystem worker.
#[derive(Debug)]
pub(crate) enum Transfer {
    /// `reader` is `None` while the worker reads chunks; `pending` holds chunks (each with
    /// the CRC32C of its data) read ahead and not yet queued; `spare` the buffers of chunks
    /// queued, for the worker to read the next ones into.
    Read {
        id: u64,
        reader: Option<crate::ops::files::FileReader>,
        pending: std::collections::VecDeque<(qx_proto::agent::FileChunk, u32)>,
        spare: Vec<Vec<u8>>,
    },
    /// `hasher` is `None` while the worker hashes a step.
    Hash {
        id: u64,
        hasher: Option<crate::ops::files::FileHasher>,
    },
    /// `in_flight` while the worker trims `targets[next - 1]`.
    Trim {
        id: u64,
        targets: Vec<String>,
        next: usize,
        minimum_bytes: u64,
        results: Vec<qx_proto::agent::FsTrimResult>,
        in_flight: bool,
    },
}

impl Transfer {
    /// Whether the loop can take its next step: send the next piece to the worker (none is
    /// there now), or queue a chunk read ahead (`outbox_short`: the outbox holds less than
    /// [`READ_QUEUE_BYTES`]).
    fn ready(&self, outbox_short: bool) -> bool {
        match self {
            Transfer::Read {
                reader, pending, ..
            } => reader.is_some() && (pending.is_empty() || outbox_short),
            Transfer::Hash { hasher, .. } => hasher.is_some(),
            Transfer::Trim { in_flight, .. } => !in_flight,
        }
    }

    pub(crate) fn id(&self) -> u64 {
        match self {
            Transfer::Read { id, .. } | Transfer::Hash { id, .. } | Transfer::Trim { id, .. } => {
                *id
            }
        }
    }
}

/// A read, hash or upload whose file is being opened on the worker.
#[derive(Debug)]
pub(crate) struct Opening {
    /// The request's id.
    pub id: u64,
    /// The host cancelled it meanwhile: its end was sent, and what the open brings back is
    /// dropped (an upload's is aborted by a job queued on the worker behind the open).
    pub cancelled: bool,
    /// An upload's: where the open leaves its handle, for that abort.
    pub upload: Option<Arc<Mutex<Option<u64>>>>,
}

/// A power action waiting for its delay.
#[derive(Debug, Clone)]
pub(crate) struct PendingPower {
    pub action: qx_proto::agent::PowerAction,
    pub method: crate::power::Method,
    pub at: Instant,
}

/// A freeze waiting for its pre-freeze hooks.
#[derive(Debug)]
pub(crate) struct FreezeChain {
    pub id: u64,
    pub req: qx_proto::agent::FsFreezeRequest,
    pub remaining: std::collections::VecDeque<crate::ops::ChildCommand>,
}

/// Everything the agent process holds.
#[derive(Debug)]
pub struct Agent {
    pub(crate) cfg: Config,
    source: ConfigSource,
    pub(crate) poll: Poll,
    pub(crate) session: Session,
    transport: Transport,
    signals: OwnedFd,
    pub(crate) jobs: Jobs,
    pub(crate) policy: PathPolicy,
    /// Open uploads; only the worker locks them (see [`lock`]).
    pub(crate) writers: Arc<Mutex<FileWriters>>,
    /// Directory listings kept between pages; only the worker locks them.
    pub(crate) listings: Arc<Mutex<Listings>>,
    pub(crate) worker: Worker,
    /// A freeze was sent to the worker and has not come back.
    pub(crate) freezing: bool,
    pub(crate) freezer: Freezer,
    pub(crate) users: UserDb,
    /// Telemetry's CPU baseline; only the worker locks it.
    pub(crate) collector: Arc<Mutex<Collector>>,
    /// A pushed telemetry sample is being taken by the worker.
    sampling: bool,
    pub(crate) transfers: Vec<Transfer>,
    /// Reads, hashes and uploads whose open is on the worker (reads and hashes not cancelled
    /// count against `max_open_reads`).
    pub(crate) openings: Vec<Opening>,
    pub(crate) next_telemetry: Option<Instant>,
    pub(crate) power: Option<PendingPower>,
    pub(crate) freeze_chain: Option<FreezeChain>,
    /// Thaw hooks still to run, in order; one runs at a time.
    pub(crate) thaw_hooks: std::collections::VecDeque<crate::ops::ChildCommand>,
    pub(crate) thaw_hook_running: bool,
    /// When a thaw hook that found no free slot tries again.
    pub(crate) thaw_hook_retry: Option<Instant>,
    /// Temporary files of aborted uploads, removed after the thaw (never on a frozen
    /// filesystem).
    pub(crate) postponed_unlinks: Vec<crate::ops::files::AbandonedTemp>,
    /// The qemu-ga front end (docs/qemu-ga.md), when configured.
    pub(crate) qga: Option<crate::qga::QgaPort>,
    port_ready: bool,
    exit_by: Option<Instant>,
}

/// Adapts the session to the exec module's output sink.
struct SessionSink<'a>(&'a mut Session);

impl OutputSink for SessionSink<'_> {
    fn has_room(&self) -> bool {
        self.0.outbox().room() >= WORK_ROOM_BYTES
    }

    fn output(&mut self, id: u64, item: qx_proto::agent::ExecOutput) {
        let _ = self
            .0
            .stream(id, qx_proto::agent::envelope::Payload::ExecOutput(item));
    }
}

/// Builds the identity part of AgentReady.
pub(crate) fn ready_template(cfg: &Config) -> AgentReady {
    let id = crate::ops::sysinfo::identity();
    AgentReady {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        os_id: id.os_id,
        os_name: id.os_name,
        os_version: id.os_version,
        os_pretty_name: id.os_pretty_name,
        kernel_release: id.kernel_release,
        kernel_version: id.kernel_version,
        arch: id.arch,
        hostname: id.hostname,
        ip_addresses: crate::ops::netinfo::ip_addresses(),
        capabilities: CAPABILITIES
            .iter()
            .filter(|c| !cfg.disabled(c))
            .map(|c| (*c).to_string())
            .collect(),
        limits: Some(Limits {
            max_frame_bytes: qx_proto::DEFAULT_MAX_FRAME_BYTES,
            max_concurrent_exec: cfg.max_concurrent_exec as u32,
            max_open_files: cfg.max_open_files as u32,
            file_chunk_bytes: cfg.file_chunk_bytes,
            exec_output_cap_bytes: cfg.exec_output_cap_bytes,
        }),
        ..Default::default()
    }
}

/// The reply lane's size: the configured size, raised so that `max_concurrent_exec`
/// collected-output execs plus one request of every other kind are always admitted at once
/// (docs/architecture.md, "Admission control").
fn session_config(cfg: &Config) -> SessionConfig {
    let exec = qx_proto::agent::ExecRequest::default();
    let exec_reply = crate::session::reply_bound(
        &qx_proto::agent::envelope::Payload::ExecRequest(exec),
        cfg.exec_output_cap_bytes,
    );
    let floor = crate::outbox::SESSION_RESERVE_BYTES
        + cfg.max_concurrent_exec * exec_reply
        + 2 * MAX_FRAME_TOTAL_BYTES;
    SessionConfig {
        ping_interval: cfg.ping_interval(),
        stale_after_pings: cfg.stale_after_pings.max(1),
        outbox_bytes: cfg.outbox_bytes.max(floor),
    }
}

impl Agent {
    /// Sets up the poll, signals and state; opens nothing yet (the first turn does).
    pub fn new(cfg: Config, source: ConfigSource) -> Result<Agent, LoopError> {
        let now = Instant::now();
        let poll = Poll::new().map_err(LoopError::Poll)?;
        let signals = sys::signalfd().map_err(LoopError::Signals)?;
        poll.registry()
            .register(
                &mut SourceFd(&signals.as_raw_fd()),
                SIGNALS,
                Interest::READABLE,
            )
            .map_err(LoopError::Signals)?;
        let endpoint = match &cfg.connect {
            Some(path) => Endpoint::Unix(path.clone()),
            None => Endpoint::Device {
                path: cfg.device.clone(),
                explicit: cfg.device != std::path::Path::new(crate::config::DEFAULT_DEVICE),
                name: crate::config::PORT_NAME,
            },
        };
        let mut session = Session::new(
            session_config(&cfg),
            crate::session::random_session_id(),
            ready_template(&cfg),
            now,
        );
        session.set_exec_cap(cfg.exec_output_cap_bytes);
        let mut freezer = Freezer::new(
            cfg.freeze_state_file.clone(),
            Some(cfg.freeze_hooks_dir.clone()),
        );
        match freezer.recover() {
            Ok(thawed) if !thawed.is_empty() => {
                log::warn!("thawed filesystems a previous agent left frozen: {thawed:?}")
            }
            Ok(_) => {}
            Err(e) => log::error!("cannot recover the freeze state: {e}"),
        }
        let next_telemetry = (cfg.telemetry_interval_ms > 0)
            .then(|| now + Duration::from_millis(u64::from(cfg.telemetry_interval_ms)));
        Ok(Agent {
            jobs: Jobs::new(cfg.max_concurrent_exec),
            policy: PathPolicy::new(cfg.file_allow.clone(), cfg.file_deny.clone()),
            writers: Arc::new(Mutex::new(FileWriters::new(cfg.max_open_files))),
            listings: Arc::default(),
            worker: Worker::start(poll.registry(), WORKER).map_err(LoopError::Worker)?,
            freezing: false,
            freezer,
            users: UserDb::system(),
            collector: Arc::default(),
            sampling: false,
            transfers: Vec::new(),
            openings: Vec::new(),
            next_telemetry,
            power: None,
            freeze_chain: None,
            thaw_hooks: Default::default(),
            thaw_hook_running: false,
            thaw_hook_retry: None,
            postponed_unlinks: Vec::new(),
            qga: crate::qga::QgaPort::from_config(&cfg),
            port_ready: false,
            exit_by: None,
            transport: Transport::new(endpoint),
            session,
            signals,
            poll,
            source,
            cfg,
        })
    }

    /// The session id announced in AgentReady.
    pub fn session_id(&self) -> u64 {
        self.session.session_id()
    }

    /// Runs until SIGTERM/SIGINT. Whichever way the loop ends, nothing stays frozen.
    pub fn run(&mut self) -> Result<(), LoopError> {
        let res = self.run_loop();
        if self.freezing {
            // The worker did not bring a freeze back in time (a freeze sent to the worker
            // before the exit comes back and is thawed by `thaw_for`): thaw what the state
            // file, written before the first FIFREEZE, lists.
            match self.freezer.recover() {
                Ok(thawed) if !thawed.is_empty() => {
                    log::warn!("thawed {thawed:?}: the agent exits")
                }
                Ok(_) => {}
                Err(e) => log::error!("thaw before exiting failed: {e}"),
            }
        }
        self.thaw_for("the agent exits");
        res
    }

    /// Thaws whatever is frozen, now (the thaw hooks follow from the loop, if it runs on).
    pub(crate) fn thaw_for(&mut self, why: &str) {
        if let Some(res) = self.freezer.thaw_all() {
            match res {
                Ok(reply) => log::warn!("thawed {:?}: {why}", reply.thawed),
                Err(e) => log::error!("thaw before exiting failed: {e}"),
            }
            logring::set_frozen(self.freezer.is_frozen());
        }
        if !self.freezer.is_frozen() {
            for temp in std::mem::take(&mut self.postponed_unlinks) {
                temp.remove();
            }
        }
    }

    pub(crate) fn exiting(&self) -> bool {
        self.exit_by.is_some()
    }

    fn run_loop(&mut self) -> Result<(), LoopError> {
        let mut events = Events::with_capacity(64);
        log::info!(
            "quantix-kvm-agent {} started, session {:016x}, {:?}",
            env!("CARGO_PKG_VERSION"),
            self.session.session_id(),
            self.transport.endpoint()
        );
        // One clock read per turn, right after the poll returns: every step of a turn sees the
        // same time, and a guest whose clocksource is not the TSC pays a system call (and an
        // emulated timer read) for each. Deadlines are computed from that reading, so they can
        // fire late by the length of one turn's work, far below the resolution any needs.
        let mut now = Instant::now();
        loop {
            let busy = self.service(now);
            if self.done_exiting(now) {
                log::info!("exiting");
                return Ok(());
            }
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                self.next_deadline()
                    .map(|d| d.saturating_duration_since(now))
            };
            let polled = self.poll.poll(&mut events, timeout);
            now = Instant::now();
            if let Err(e) = polled {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(LoopError::Poll(e));
            }
            for event in events.iter() {
                match Tok::from(event.token()) {
                    Tok::Port => self.port_ready = true,
                    Tok::Signals => self.on_signals(now),
                    // Finished jobs are taken every round of `service`.
                    Tok::Worker => {}
                    Tok::Qga => {
                        if let Some(q) = self.qga.as_mut() {
                            q.on_event();
                        }
                    }
                    Tok::Child(slot, fd) => self.jobs.on_event(slot, fd),
                    Tok::Unknown(t) => log::warn!("event for unknown token {t}"),
                }
            }
        }
    }

    fn done_exiting(&self, now: Instant) -> bool {
        match self.exit_by {
            None => false,
            Some(by) => {
                let hooks_done =
                    !self.thaw_hook_running && self.thaw_hooks.is_empty() && self.worker.is_idle();
                now >= by
                    || (hooks_done
                        && (!self.session.host_present() || self.session.outbox().is_empty()))
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.session.next_deadline(),
            self.transport.next_deadline(),
            self.next_telemetry,
            self.freezer.deadline(),
            self.power.as_ref().map(|p| p.at),
            self.jobs.next_deadline(),
            self.thaw_hook_retry,
            self.qga.as_ref().and_then(|q| q.next_deadline()),
            self.exit_by,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Room for another stream item.
    fn has_room(&self) -> bool {
        self.session.outbox().room() >= WORK_ROOM_BYTES
    }

    /// Whether decoding more input can make progress: not while an envelope waits for
    /// outbox room.
    fn takes_input(&self) -> bool {
        !self.session.is_holding()
    }

    /// One turn of work. Returns true when work is left that can progress at once.
    fn service(&mut self, now: Instant) -> bool {
        self.open_transport(now);
        for _ in 0..ROUNDS_PER_TURN {
            let before = self.session.outbox().stats();
            self.finish_jobs(now);
            self.read_port(now);
            self.handle_requests(now);
            self.session.transition(LinkEvent::Tick, now);
            self.timers(now);
            self.service_jobs(now);
            self.step_transfers(now);
            self.flush(now);
            let after = self.session.outbox().stats();
            let progressed = after.frames_queued != before.frames_queued
                || after.bytes_sent != before.bytes_sent;
            // Another round helps only where this one may have made room or left work: not
            // after a lone request was answered and written (a ping's usual turn).
            let more = self.port_ready
                || self.session.is_holding()
                || !self.transfers.is_empty()
                || !self.jobs.is_empty()
                || !self.session.outbox().is_empty();
            if !progressed || !more {
                break;
            }
        }
        if self.transfers.is_empty() && self.session.outbox().is_empty() {
            self.session.outbox_mut().shed_spares();
        }
        let outbox_short = self.session.outbox().pending_bytes() < READ_QUEUE_BYTES;
        let qga_busy = self.service_qga(now);
        let want_write = !self.session.host_present() || !self.session.outbox().is_empty();
        self.transport
            .set_interest(self.poll.registry(), PORT, want_write);
        qga_busy
            || (self.takes_input() && self.port_ready && self.transport.is_open())
            || (self.has_room()
                && (self.transfers.iter().any(|t| t.ready(outbox_short)) || self.jobs.wants_room()))
    }

    fn open_transport(&mut self, now: Instant) {
        if self.transport.is_open() {
            return;
        }
        if self.transport.try_open(self.poll.registry(), PORT, now) {
            // A connected socket is a host; a port tells with its first readiness edge,
            // which registration delivers at once: read it now.
            self.port_ready = true;
            if self.transport.is_socket() {
                self.link_up(now);
            }
        }
    }

    fn link_up(&mut self, now: Instant) {
        if !self.session.host_present() {
            let mut ready = ready_template(&self.cfg);
            ready.ip_addresses = crate::ops::netinfo::ip_addresses();
            self.session.set_ready(ready);
            self.session.transition(LinkEvent::Up, now);
        }
    }

    fn link_down(&mut self, now: Instant) {
        self.session.transition(LinkEvent::Down, now);
        self.transport.host_gone(self.poll.registry(), now);
        self.port_ready = false;
    }

    /// Reads until `WouldBlock` (a host is attached), EOF (no host) or an envelope waits
    /// for outbox room (the port stays ready for a later turn).
    fn read_port(&mut self, now: Instant) {
        while self.port_ready && self.transport.is_open() {
            if !self.takes_input() && self.session.host_present() {
                return;
            }
            let buf = self.session.read_buf(PORT_READ_BYTES);
            if buf.is_empty() {
                // Decoder full of undecoded input: decode first.
                self.handle_requests(now);
                if self.session.read_buf(PORT_READ_BYTES).is_empty() {
                    return;
                }
                continue;
            }
            match self.transport.read(self.session.read_buf(PORT_READ_BYTES)) {
                Ok(0) => {
                    self.port_ready = false;
                    if self.session.host_present() || self.transport.is_socket() {
                        self.link_down(now);
                    }
                    return;
                }
                Ok(n) => {
                    if !self.session.host_present() && self.transport.is_socket() {
                        self.link_up(now);
                    }
                    self.session.received(n, now);
                    self.handle_requests(now);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.port_ready = false;
                    self.link_up(now);
                    return;
                }
                Err(e) => {
                    log::warn!("transport read failed: {e}; reopening it");
                    self.link_down(now);
                    self.transport.reset(self.poll.registry(), now);
                    return;
                }
            }
        }
    }

    fn handle_requests(&mut self, now: Instant) {
        loop {
            let next = self.session.next_request(now);
            if self.session.take_host_changed() {
                // The old host session's uploads end; their temporary files go after a
                // thaw: an unlink on a frozen filesystem would block, and with it the thaw.
                let writers = self.writers.clone();
                self.worker.submit(move || {
                    let temps = lock(&writers).abandon_all();
                    Box::new(move |agent: &mut Agent, now: Instant| {
                        if !temps.is_empty() {
                            log::info!(
                                "new host session: aborted {} open write transfers",
                                temps.len()
                            );
                        }
                        agent.postponed_unlinks.extend(temps);
                        agent.after_thaw(now);
                    })
                });
            }
            match next {
                Some(req) => self.dispatch(req, now),
                None => return,
            }
        }
    }

    /// Runs the replies of the jobs the worker has finished.
    fn finish_jobs(&mut self, now: Instant) {
        while let Some(finish) = self.worker.next_finished() {
            finish(self, now);
        }
    }

    fn flush(&mut self, now: Instant) {
        if !self.session.host_present() || self.session.outbox().is_empty() {
            return;
        }
        if let Err(e) = self.session.outbox_mut().flush(&mut self.transport) {
            log::warn!("transport write failed: {e}; reopening it");
            self.link_down(now);
            self.transport.reset(self.poll.registry(), now);
        }
    }

    fn timers(&mut self, now: Instant) {
        if let Some(at) = self.next_telemetry {
            if now >= at {
                // Sampled by the worker: statvfs of a filesystem whose device hangs would
                // block. One sample at a time, however long the worker is busy.
                if !self.sampling {
                    self.sampling = true;
                    let collector = self.collector.clone();
                    self.worker.submit(move || {
                        let sample = lock(&collector).sample();
                        Box::new(move |agent: &mut Agent, _now: Instant| {
                            agent.sampling = false;
                            agent.session.push_telemetry(sample);
                        })
                    });
                }
                let interval = Duration::from_millis(u64::from(self.cfg.telemetry_interval_ms));
                self.next_telemetry = (!interval.is_zero()).then(|| now + interval);
            }
        }
        if let Some(result) = self.freezer.auto_thaw(now) {
            match result {
                Ok(reply) => log::warn!("auto-thawed {:?}: the host did not thaw", reply.thawed),
                Err(e) => log::error!("auto-thaw failed: {e}"),
            }
            logring::set_frozen(self.freezer.is_frozen());
        }
        // Thaw hooks due after any thaw (the host's, the deadline's, the exit's, or the
        // start-up recovery's), and their retries.
        self.after_thaw(now);
        if self.power.as_ref().is_some_and(|p| now >= p.at) {
            if let Some(p) = self.power.take() {
                self.carry_out_power(p, now);
            }
        }
    }

    fn service_jobs(&mut self, now: Instant) {
        if self.jobs.is_empty() {
            return;
        }
        let finished = self.jobs.service(
            self.poll.registry(),
            now,
            &mut SessionSink(&mut self.session),
        );
        for f in finished {
            self.child_finished(f, now);
        }
    }

    fn on_signals(&mut self, now: Instant) {
        loop {
            match sys::read_signal(&self.signals) {
                Ok(Some(sig)) if sig == libc::SIGTERM || sig == libc::SIGINT => {
                    log::info!("signal {sig}: thawing, flushing and exiting");
                    self.exit_by.get_or_insert(now + EXIT_FLUSH);
                    // First of all: nothing may stay frozen once the agent is gone.
                    self.thaw_for("the agent was told to exit");
                }
                Ok(Some(sig)) if sig == libc::SIGHUP => self.reload(),
                Ok(Some(sig)) if sig == libc::SIGCHLD => self.jobs.on_sigchld(),
                Ok(Some(sig)) => log::debug!("ignored signal {sig}"),
                Ok(None) => return,
                Err(e) => {
                    log::error!("signalfd read failed: {e}");
                    return;
                }
            }
        }
    }

    fn reload(&mut self) {
        let src = &self.source;
        let cfg = match Config::load(&src.path, src.optional, &src.overrides) {
            Ok(cfg) => cfg,
            Err(e) => {
                log::warn!("configuration not reloaded: {e}");
                return;
            }
        };
        if cfg.device != self.cfg.device || cfg.connect != self.cfg.connect {
            log::warn!("transport changes take effect at the next start");
        }
        logring::configure(cfg.log_level, cfg.log_target);
        if cfg.telemetry_interval_ms != self.cfg.telemetry_interval_ms {
            self.set_telemetry_interval(cfg.telemetry_interval_ms, Instant::now());
        }
        self.session
            .set_ping_interval(cfg.ping_interval(), cfg.stale_after_pings);
        self.jobs.set_max_exec(cfg.max_concurrent_exec);
        self.session.set_exec_cap(cfg.exec_output_cap_bytes);
        self.policy = PathPolicy::new(cfg.file_allow.clone(), cfg.file_deny.clone());
        self.session.set_ready(ready_template(&cfg));
        if let Some(q) = self.qga.as_mut() {
            q.set_policy(cfg.qga_policy());
        }
        self.cfg = cfg;
        log::info!("configuration reloaded");
    }

    pub(crate) fn set_telemetry_interval(&mut self, ms: u32, now: Instant) {
        self.cfg.telemetry_interval_ms = ms;
        self.next_telemetry = (ms > 0).then(|| now + Duration::from_millis(u64::from(ms)));
    }
}

/// Runs the agent with `cfg` until it is told to stop.
pub fn run(cfg: Config, source: ConfigSource) -> Result<(), LoopError> {
    Agent::new(cfg, source)?.run()
}
