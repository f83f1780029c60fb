//! One VM's agent link: a supervisor task, and per connection exactly one reader task and one
//! writer task.
//!
//! Primer. QEMU's chardev socket takes one client; bytes cross connection boundaries (what the
//! host wrote before a drop may reach the agent later, what the agent could not write reaches
//! the next host client). So every connection starts from a clean slate on both sides: the
//! host resets its decoder, writes the SYNC PREAMBLE (65552 zero bytes, which pushes any half
//! frame a previous host left in the guest's queue through the guest's decoder) and a
//! `HostHello`; the agent answers `AgentReady` with its session id. Frames for unknown request
//! ids (stale replies) are ignored. A new session id means the agent restarted: every command
//! it had in flight is lost and fails "agent restarted".
//!
//! Every command lives in the VM's [`Table`] (sans-io): this file is the shell around it. The
//! writer asks the table what to write, the reader and the writer tell it what happened, a
//! timer in the supervisor task wakes it at its next deadline, and its outputs are routed to
//! the callers' channels. Nothing here changes a command's stage.
//!
//! Liveness is a shared [`LinkStatus`] in a `watch` channel. The reader and the writer each
//! hold a [`TaskGuard`] that marks the task dead when it is dropped, however the task ends
//! (error, EOF, panic, abort), so a dead reader with a living writer reads as disconnected at
//! once, and the supervisor, which waits on the same channel, tears the connection down.

use super::command::{item_bytes, Command, CommandOptions, Redelivery, ITEM_BUFFER_BYTES};
use super::limits;
use super::stats::{LinkSnapshot, LinkStats};
use super::table::{self, Event, Output, Table, TableConfig, Transmit};
use super::AgentEventKind;
use super::{AgentConfig, AgentEvent};
use crate::error::AgentError;
use crate::text::{sanitize, Esc};
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{AgentReady, Envelope, HostHello, Ping, Pong, Telemetry};
use qx_proto::{decode_envelope, envelope_payload_name as payload_name, Decoder};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{
    broadcast, mpsc, mpsc::error::TrySendError, oneshot, watch, Notify, OwnedSemaphorePermit,
    Semaphore,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use qx_proto::SYNC_PREAMBLE_BYTES;

/// The largest frame payload the host accepts: the agent never sends more than 64 KiB, and the
/// margin only absorbs a field added later. A larger header is refused before any allocation.
pub const MAX_RX_FRAME_BYTES: u32 = 64 * 1024 + 4 * 1024;

/// Protocol errors of one VM are logged at most this often; the rest are only counted.
const PROTOCOL_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// A VM's AGENT_RESTARTED events: a burst of this many, then one per interval; the restarts in
/// between are counted in the next event (a flapping guest cannot flood the event ring).
const RESTART_EVENT_BURST: u32 = 4;
const RESTART_EVENT_INTERVAL: Duration = Duration::from_secs(15);

/// Guest text copied into an event detail: escaped, and at most this many characters.
const EVENT_GUEST_TEXT_CHARS: usize = 64;

/// Pongs waiting for the writer; an agent that pings faster than the writer answers loses
/// pongs, never host memory.
const PONG_QUEUE: usize = 64;

/// The preamble itself, shared by every connection.
static SYNC_PREAMBLE: [u8; SYNC_PREAMBLE_BYTES] = [0u8; SYNC_PREAMBLE_BYTES];

/// Bytes asked of one socket read. Small, so an idle link's decoder buffer stays small; it
/// grows only while a large frame is arriving.
const READ_BYTES: usize = 8 * 1024;

/// Frames with a valid header but a damaged payload that one connection may deliver before it
/// is reset. Each costs a checksum over up to a whole frame, and a stream of nested headers
/// would make every 16 bytes received cost one (docs/security.md): an honest agent produces
/// at most one such frame per connection (a write cut short by its own death).
pub const MAX_BAD_PAYLOADS_PER_CONNECTION: u64 = 16;

/// What one connection may cost the daemon in input that is never useful, per
/// [`WASTE_WINDOW`]: garbage bytes scanned, frames rejected (bad headers, oversized, damaged
/// or undecodable), AgentReady frames. An honest agent stays far below (at most a frame of
/// leftovers after a reconnect, one AgentReady per connection and per restart); past any of
/// them the connection ends in a protocol error, and the backoff bounds the next one, so a
/// guest cannot make the daemon scan its input at full rate.
const WASTE_WINDOW: Duration = Duration::from_secs(10);
pub const MAX_GARBAGE_BYTES_PER_WINDOW: u64 = 1 << 20;
pub const MAX_BAD_FRAMES_PER_WINDOW: u64 = 64;
pub const MAX_AGENT_READY_PER_WINDOW: u64 = 32;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No socket: waiting to (re)connect.
    Disconnected,
    /// Connecting to the socket.
    Connecting,
    /// Socket open, preamble and hello written, waiting for AgentReady.
    Handshaking,
    /// AgentReady received on this connection.
    Open,
}

/// The shared liveness state of a VM's link.
#[derive(Debug, Clone, Copy)]
pub struct LinkStatus {
    pub conn_id: u64,
    pub phase: Phase,
    pub reader_alive: bool,
    pub writer_alive: bool,
}

impl LinkStatus {
    /// Socket open and both tasks alive (the liveness window is checked by the caller).
    pub fn tasks_alive(&self) -> bool {
        self.phase != Phase::Disconnected
            && self.phase != Phase::Connecting
            && self.reader_alive
            && self.writer_alive
    }
}

/// Which task a guard watches.
#[derive(Debug, Clone, Copy)]
enum Role {
    Reader,
    Writer,
}

/// Marks its task dead in [`LinkStatus`] when dropped, however the task ended.
#[derive(Debug)]
struct TaskGuard {
    link: Arc<Link>,
    conn_id: u64,
    role: Role,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let conn_id = self.conn_id;
        let role = self.role;
        self.link.status.send_modify(|s| {
            if s.conn_id == conn_id {
                match role {
                    Role::Reader => s.reader_alive = false,
                    Role::Writer => s.writer_alive = false,
                }
            }
        });
    }
}

/// Where a caller waits for its command's items and end.
#[derive(Debug)]
struct Waiter {
    items: mpsc::Sender<Payload>,
    /// Item bytes in `items` not yet taken by the caller.
    queued: Arc<AtomicUsize>,
    done: oneshot::Sender<Result<Payload, AgentError>>,
}

/// One telemetry report the agent pushed, with when it arrived.
#[derive(Debug, Clone)]
pub struct TelemetryReport {
    pub telemetry: Arc<Telemetry>,
    pub received_unix_ms: i64,
}

/// What the daemon last heard from the agent, with when. Each message was checked against
/// the field limits; they are shared, so a copy of the cache costs three reference counts.
#[derive(Debug, Default, Clone)]
pub struct AgentCache {
    pub ready: Option<Arc<AgentReady>>,
    pub ready_at: Option<SystemTime>,
    pub telemetry: Option<Arc<Telemetry>>,
    pub telemetry_at: Option<SystemTime>,
    /// Interfaces, asked for after every AgentReady of an agent that serves "network".
    pub network: Option<Arc<qx_proto::agent::NetworkInfo>>,
}

#[derive(Debug)]
struct Inner {
    table: Table,
    waiters: HashMap<u64, Waiter>,
    cache: AgentCache,
    stats: LinkStats,
    last_rx: Option<Instant>,
    /// The connection's session id is known (AgentReady seen on it).
    ready_on_conn: u64,
    /// The connection that ended in a protocol error, if the last one did.
    protocol_error_on: u64,
    last_protocol_log: Option<Instant>,
    /// Restart events that may still be emitted now, refilled one per interval.
    restart_tokens: u32,
    restart_refill_at: Option<Instant>,
    /// Restarts not reported yet (coalesced into the next event).
    restarts_unreported: u64,
    /// The supervisor's last wait before reconnecting, before jitter.
    reconnect_backoff: Duration,
}

impl Inner {
    /// Whether an AGENT_RESTARTED event may be emitted now, and if so how many restarts
    /// before it went unreported; otherwise the restart is counted for the next event.
    fn restart_event_allowed(&mut self) -> Option<u64> {
        let now = Instant::now();
        let refill_at = *self.restart_refill_at.get_or_insert(now);
        if now >= refill_at {
            let periods = (now.duration_since(refill_at).as_secs()
                / RESTART_EVENT_INTERVAL.as_secs())
            .saturating_add(1);
            let tokens = u64::from(self.restart_tokens).saturating_add(periods);
            self.restart_tokens = tokens.min(u64::from(RESTART_EVENT_BURST)) as u32;
            self.restart_refill_at = Some(now + RESTART_EVENT_INTERVAL);
        }
        if self.restart_tokens == 0 {
            self.restarts_unreported += 1;
            return None;
        }
        self.restart_tokens -= 1;
        Some(std::mem::take(&mut self.restarts_unreported))
    }
}

/// One VM's link to its agent.
#[derive(Debug)]
pub struct Link {
    pub(crate) vm_id: String,
    pub(crate) socket: PathBuf,
    cfg: Arc<AgentConfig>,
    host_session: u64,
    status: watch::Sender<LinkStatus>,
    inner: Mutex<Inner>,
    /// The table may have a frame to write.
    writable: Notify,
    /// The table's next deadline may have moved.
    rearm: Notify,
    /// Closes the current connection (the VM was reverted); the supervisor reconnects.
    reset: Notify,
    events: broadcast::Sender<AgentEvent>,
    /// The latest pushed telemetry report: a subscriber that reads slowly skips to the
    /// newest, it never holds a backlog.
    telemetry_tx: watch::Sender<Option<TelemetryReport>>,
    /// Test hook: the running reader task, so a test can kill it alone.
    reader_task: Mutex<Option<JoinHandle<()>>>,
    /// Write-transfer slots ([`Link::write_slot`]).
    write_slots: Mutex<WriteSlots>,
}

/// The agent keeps at most `limits.max_open_files` write transfers open at once (its
/// AgentReady says how many). A transfer spans several commands (open, chunks, close), so its
/// slot is not the table's business: the transfer holds a permit from before its open until
/// after its close, and the transfers beyond the limit wait for one in arrival order.
#[derive(Debug)]
struct WriteSlots {
    /// The limit last announced; 0: none announced, nothing waits.
    limit: u32,
    slots: Arc<Semaphore>,
}

/// A write transfer's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct WriteSlot {
    _permit: Option<OwnedSemaphorePermit>,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random-enough u64 from the std hasher's per-process random keys.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

use table::encode;

impl Link {
    pub(crate) fn new(
        vm_id: String,
        socket: PathBuf,
        cfg: Arc<AgentConfig>,
        host_session: u64,
        events: broadcast::Sender<AgentEvent>,
    ) -> Arc<Link> {
        let table = Table::new(TableConfig {
            vm_id: vm_id.clone(),
            socket: socket.display().to_string(),
            queue_capacity: cfg.queue_capacity.max(1),
            max_in_flight: cfg.max_in_flight.max(1),
        });
        let (status, _) = watch::channel(LinkStatus {
            conn_id: 0,
            phase: Phase::Disconnected,
            reader_alive: false,
            writer_alive: false,
        });
        let (telemetry_tx, _) = watch::channel(None);
        Arc::new(Link {
            vm_id,
            socket,
            cfg,
            host_session,
            status,
            inner: Mutex::new(Inner {
                table,
                waiters: HashMap::new(),
                cache: AgentCache::default(),
                stats: LinkStats::default(),
                last_rx: None,
                ready_on_conn: 0,
                protocol_error_on: 0,
                last_protocol_log: None,
                restart_tokens: RESTART_EVENT_BURST,
                restart_refill_at: None,
                restarts_unreported: 0,
                reconnect_backoff: Duration::ZERO,
            }),
            writable: Notify::new(),
            rearm: Notify::new(),
            reset: Notify::new(),
            write_slots: Mutex::new(WriteSlots {
                limit: 0,
                slots: Arc::new(Semaphore::new(0)),
            }),
            events,
            telemetry_tx,
            reader_task: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps half-updated in a way that
        // matters more than losing the daemon's view of one VM, so recover the guard.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.lock().table.next_id()
    }

    /// Runs `f` on the table (and the state beside it) at the current time, then hands the
    /// table's outputs to the callers and wakes the writer and the timer.
    /// A new limit from AgentReady: a new set of slots. Transfers waiting on the old set are
    /// woken (it is closed) and wait again on the new one; permits of the old set die with it.
    fn set_write_limit(&self, limit: u32) {
        let mut w = self.write_slots.lock().unwrap_or_else(|p| p.into_inner());
        if w.limit != limit {
            w.slots.close();
            w.limit = limit;
            w.slots = Arc::new(Semaphore::new(limit as usize));
        }
    }

    /// Waits until `deadline` for a write-transfer slot, in arrival order, and fails
    /// [`AgentError::NotAdmitted`] when none freed in time. No limit announced: no wait.
    pub async fn write_slot(&self, deadline: Instant) -> Result<WriteSlot, AgentError> {
        let started = Instant::now();
        loop {
            let (limit, slots) = {
                let w = self.write_slots.lock().unwrap_or_else(|p| p.into_inner());
                (w.limit, w.slots.clone())
            };
            if limit == 0 {
                return Ok(WriteSlot { _permit: None });
            }
            match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
                Ok(Ok(permit)) => {
                    return Ok(WriteSlot {
                        _permit: Some(permit),
                    })
                }
                Ok(Err(_)) => continue, // a new limit replaced the slots: wait on those
                Err(_) => {
                    return Err(AgentError::NotAdmitted {
                        vm_id: self.vm_id.clone(),
                        kind: "file_write_open",
                        waited_ms: started.elapsed().as_millis() as u64,
                        limit,
                        what: "file write slots",
                    })
                }
            }
        }
    }

    fn with_table<R>(&self, f: impl FnOnce(&mut Inner, std::time::Instant) -> R) -> R {
        let now = Instant::now().into_std();
        let mut inner = self.lock();
        let r = f(&mut inner, now);
        let mut restarts = Vec::new();
        loop {
            let mut slow = Vec::new();
            while let Some(out) = inner.table.poll() {
                match out {
                    Output::Item { id, payload } => {
                        if let Some(w) = inner.waiters.get(&id) {
                            // The reader never waits for a caller that reads too slowly, and
                            // a caller holds at most ITEM_BUFFER_BYTES of items.
                            let n = item_bytes(&payload);
                            let held = w.queued.fetch_add(n, Ordering::Relaxed);
                            if held.saturating_add(n) > ITEM_BUFFER_BYTES {
                                w.queued.fetch_sub(n, Ordering::Relaxed);
                                slow.push(id);
                            } else if let Err(TrySendError::Full(_)) = w.items.try_send(payload) {
                                w.queued.fetch_sub(n, Ordering::Relaxed);
                                slow.push(id);
                            }
                        }
                    }
                    Output::Done { id, result } => {
                        if let Some(w) = inner.waiters.remove(&id) {
                            let _ = w.done.send(result);
                        }
                    }
                    Output::AgentRestarted {
                        old_session,
                        new_session,
                        failed,
                    } => {
                        inner.stats.agent_restarts += 1;
                        if let Some(coalesced) = inner.restart_event_allowed() {
                            restarts.push((old_session, new_session, failed, coalesced));
                        }
                    }
                }
            }
            if slow.is_empty() {
                break;
            }
            for id in slow {
                inner.table.handle_event(Event::TooSlow { id }, now);
            }
        }
        drop(inner);
        self.writable.notify_one();
        self.rearm.notify_one();
        for (old, new, failed, coalesced) in restarts {
            let more = if coalesced > 0 {
                format!(" ({coalesced} earlier restarts not reported separately)")
            } else {
                String::new()
            };
            self.emit(
                AgentEventKind::Restarted,
                format!(
                    "agent session {old:#x} -> {new:#x}; {failed} in-flight commands failed{more}"
                ),
            );
        }
        r
    }

    /// Wakes the table at its deadlines; runs until its caller drops it.
    async fn run_timer(&self) {
        loop {
            let next = self.lock().table.poll_timeout();
            let rearmed = self.rearm.notified();
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(Instant::from_std(at)) => {
                            self.with_table(|i, now| i.table.handle_timeout(now));
                        }
                        _ = rearmed => {}
                    }
                }
                None => rearmed.await,
            }
        }
    }

    fn emit(&self, kind: AgentEventKind, detail: String) {
        let _ = self.events.send(AgentEvent {
            vm_id: self.vm_id.clone(),
            kind,
            detail,
        });
    }

    // ---------------------------------------------------------------------------------------
    // Caller side
    // ---------------------------------------------------------------------------------------

    /// Queues `payload` as a new command. Fails at once with `QueueFull` when the queue or the
    /// table is full; beyond the agent's announced limits a command waits in the queue.
    pub fn start(
        self: &Arc<Self>,
        payload: Payload,
        opts: CommandOptions,
        item_capacity: usize,
    ) -> Result<Command, AgentError> {
        let (items_tx, items_rx) = mpsc::channel(item_capacity.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = oneshot::channel();
        let (id, kind) = self.with_table(|inner, now| {
            let (id, kind) = inner.table.submit(payload, opts, now)?;
            inner.waiters.insert(
                id,
                Waiter {
                    items: items_tx,
                    queued: queued.clone(),
                    done: done_tx,
                },
            );
            Ok::<_, AgentError>((id, kind))
        })?;
        Ok(Command {
            link: self.clone(),
            id,
            kind,
            items: items_rx,
            queued,
            done: done_rx,
            finished: false,
        })
    }

    /// The command's reply channel closed without a reply (link torn down).
    pub(crate) fn vanished(&self, id: u64, kind: &'static str) -> AgentError {
        AgentError::Detached {
            vm_id: self.vm_id.clone(),
            id,
            kind,
        }
    }

    /// The caller went away: forget the command (the table cancels a stream the agent runs).
    pub(crate) fn abandon(&self, id: u64) {
        self.with_table(|inner, now| {
            inner.waiters.remove(&id);
            inner.table.handle_event(Event::Abandoned { id }, now);
        });
    }

    /// Fails every command in flight "VM reverted" and closes the connection; the next one
    /// meets the reverted guest's agent as new.
    pub fn reset_for_revert(&self) {
        self.with_table(|inner, now| inner.table.handle_event(Event::Reverted, now));
        self.reset.notify_waiters();
    }

    // ---------------------------------------------------------------------------------------
    // State for the API
    // ---------------------------------------------------------------------------------------

    /// Connected: socket open, reader and writer alive, heard from within the liveness window.
    pub fn is_connected(&self) -> bool {
        let st = *self.status.borrow();
        st.phase == Phase::Open && st.tasks_alive() && self.heard_recently()
    }

    fn heard_recently(&self) -> bool {
        self.lock()
            .last_rx
            .is_some_and(|t| t.elapsed() < self.cfg.liveness_window)
    }

    /// "connecting", "handshaking", "connected", "stale", "disconnected".
    pub fn state_name(&self) -> &'static str {
        let st = *self.status.borrow();
        match st.phase {
            _ if !st.tasks_alive() && st.phase != Phase::Connecting => "disconnected",
            Phase::Connecting => "connecting",
            Phase::Handshaking => "handshaking",
            Phase::Open if self.heard_recently() => "connected",
            Phase::Open => "stale",
            Phase::Disconnected => "disconnected",
        }
    }

    pub fn status(&self) -> LinkStatus {
        *self.status.borrow()
    }

    pub fn cache(&self) -> AgentCache {
        self.lock().cache.clone()
    }

    pub fn session(&self) -> Option<u64> {
        self.lock().table.session()
    }

    pub fn last_rx_elapsed(&self) -> Option<Duration> {
        self.lock().last_rx.map(|t| t.elapsed())
    }

    pub fn liveness_window(&self) -> Duration {
        self.cfg.liveness_window
    }

    pub fn subscribe_telemetry(&self) -> watch::Receiver<Option<TelemetryReport>> {
        self.telemetry_tx.subscribe()
    }

    pub fn stats(&self) -> LinkSnapshot {
        let st = self.status();
        let state = self.state_name();
        let connected = self.is_connected();
        let inner = self.lock();
        LinkSnapshot {
            vm_id: self.vm_id.clone(),
            socket_path: self.socket.display().to_string(),
            connection_id: st.conn_id,
            state,
            connected,
            agent_session_id: inner.table.session().unwrap_or(0),
            in_flight: inner.table.len(),
            counters: inner.stats.clone(),
            commands: inner.table.counts(),
            last_error: inner.table.last_error().to_string(),
            reconnect_backoff: inner.reconnect_backoff,
        }
    }

    /// Test hook: aborts the current reader task alone and waits until it has ended.
    #[doc(hidden)]
    pub async fn kill_reader_for_test(&self) {
        let task = self
            .reader_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    // ---------------------------------------------------------------------------------------
    // Supervisor
    // ---------------------------------------------------------------------------------------

    /// Connects, runs one reader and one writer, tears down, backs off, reconnects; until
    /// `stop` turns true. `previous` (the task of a replaced binding) is awaited first so the
    /// old connection is closed before the new one opens.
    pub(crate) async fn supervise(
        self: Arc<Self>,
        stop: watch::Receiver<bool>,
        previous: Option<JoinHandle<()>>,
    ) {
        if let Some(prev) = previous {
            let _ = prev.await;
        }
        tokio::select! {
            _ = self.run_timer() => {}
            _ = self.connect_loop(stop) => {}
        }
        self.status.send_modify(|s| s.phase = Phase::Disconnected);
        self.with_table(|inner, now| inner.table.handle_event(Event::Detached, now));
    }

    async fn connect_loop(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff = self.cfg.backoff_initial;
        let mut conn_id = 0u64;
        loop {
            if *stop.borrow() {
                break;
            }
            self.status.send_modify(|s| s.phase = Phase::Connecting);
            let connected = tokio::select! {
                r = UnixStream::connect(&self.socket) => r,
                _ = stop.changed() => break,
            };
            match connected {
                Err(e) => {
                    log::debug!("vm {}: connect failed: {e}", self.vm_id);
                    let e = format!("connect {}: {e}", self.socket.display());
                    self.lock().table.set_last_error(e);
                    self.status.send_modify(|s| s.phase = Phase::Disconnected);
                }
                Ok(stream) => {
                    conn_id += 1;
                    let opened = Instant::now();
                    let ready = self.run_connection(conn_id, stream, &mut stop).await;
                    // A connection that ended in a protocol error keeps the backoff growing:
                    // a guest cannot buy a fast reconnect by misbehaving after AgentReady.
                    let misbehaved = self.lock().protocol_error_on == conn_id;
                    if ready && !misbehaved && opened.elapsed() >= self.cfg.backoff_initial {
                        backoff = self.cfg.backoff_initial;
                    }
                }
            }
            if *stop.borrow() {
                break;
            }
            let delay = jittered(backoff);
            self.lock().reconnect_backoff = backoff;
            backoff = (backoff * 2).min(self.cfg.backoff_max);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => break,
            }
        }
    }

    /// Runs one connection to its end. Returns whether the agent said AgentReady on it.
    async fn run_connection(
        self: &Arc<Self>,
        conn_id: u64,
        stream: UnixStream,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        {
            let mut inner = self.lock();
            if inner.stats.connection_id > 0 {
                inner.stats.reconnects += 1;
            }
            inner.stats.connection_id = conn_id;
            inner.last_rx = None;
        }
        self.with_table(|inner, now| {
            inner
                .table
                .handle_event(Event::Connected { conn: conn_id }, now)
        });
        let (rd, wr) = stream.into_split();
        self.status.send_replace(LinkStatus {
            conn_id,
            phase: Phase::Handshaking,
            reader_alive: true,
            writer_alive: true,
        });
        // Pongs jump the queue.
        let (prio_tx, prio_rx) = mpsc::channel::<Transmit>(PONG_QUEUE);
        let (ready_tx, ready_rx) = watch::channel(false);
        let reader_guard = TaskGuard {
            link: self.clone(),
            conn_id,
            role: Role::Reader,
        };
        let writer_guard = TaskGuard {
            link: self.clone(),
            conn_id,
            role: Role::Writer,
        };
        let me = self.clone();
        let reader = tokio::spawn(async move {
            let _guard = reader_guard;
            let res = me.read_loop(conn_id, rd, prio_tx, ready_tx).await;
            if let Err(e) = res {
                me.record_error(conn_id, format!("reader: {e}"));
            }
        });
        let abort_reader = reader.abort_handle();
        *self.reader_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
        let me = self.clone();
        let writer = tokio::spawn(async move {
            let _guard = writer_guard;
            let res = me.write_loop(conn_id, wr, prio_rx, ready_rx).await;
            if let Err(e) = res {
                me.record_error(conn_id, format!("writer: {e}"));
            }
        });
        let mut status = self.status.subscribe();
        tokio::select! {
            _ = status.wait_for(|s| s.conn_id != conn_id || !s.reader_alive || !s.writer_alive) => {}
            _ = stop.changed() => {}
            _ = self.reset.notified() => self.record_error(conn_id, "VM reverted to a snapshot".into()),
        }
        // Tear down: both halves drop with their tasks, closing the socket.
        abort_reader.abort();
        writer.abort();
        let _ = writer.await;
        let reader = self
            .reader_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(reader) = reader {
            let _ = reader.await;
        }
        self.status.send_modify(|s| {
            if s.conn_id == conn_id {
                s.phase = Phase::Disconnected;
                s.reader_alive = false;
                s.writer_alive = false;
            }
        });
        self.after_drop(conn_id)
    }

    /// The agent sent something over its limits: counted, logged at most once per
    /// [`PROTOCOL_ERROR_LOG_INTERVAL`], and the connection ends (the caller returns the text).
    fn protocol_error(&self, conn_id: u64, what: String) -> String {
        let e = format!("protocol error: {what}; resetting the connection");
        let mut inner = self.lock();
        inner.stats.protocol_errors += 1;
        inner.protocol_error_on = conn_id;
        let now = Instant::now();
        let log_now = inner
            .last_protocol_log
            .is_none_or(|t| now.duration_since(t) >= PROTOCOL_ERROR_LOG_INTERVAL);
        if log_now {
            inner.last_protocol_log = Some(now);
            let total = inner.stats.protocol_errors;
            drop(inner);
            log::warn!(
                "vm {}: connection {conn_id}: {e} ({total} protocol errors so far)",
                self.vm_id
            );
        }
        e
    }

    fn record_error(&self, conn_id: u64, e: String) {
        let mut inner = self.lock();
        // A protocol error was logged (rate limited) where it was found.
        if inner.protocol_error_on == conn_id {
            log::debug!("vm {}: connection {conn_id} ended: {e}", self.vm_id);
        } else {
            log::info!("vm {}: connection {conn_id} ended: {e}", self.vm_id);
        }
        inner.table.set_last_error(e);
    }

    /// A connection ended: the table decides what becomes of the commands written on it.
    fn after_drop(&self, conn_id: u64) -> bool {
        let was_ready = self.with_table(|inner, now| {
            inner
                .table
                .handle_event(Event::Disconnected { conn: conn_id }, now);
            inner.ready_on_conn == conn_id
        });
        if was_ready {
            self.emit(
                AgentEventKind::Disconnected,
                format!("connection {conn_id} closed"),
            );
        }
        was_ready
    }

    // ---------------------------------------------------------------------------------------
    // Writer
    // ---------------------------------------------------------------------------------------

    /// Owns the write half: writes whole frames only, each within the write deadline; a stall
    /// past it ends the task, which tears the connection down.
    async fn write_loop(
        self: &Arc<Self>,
        conn_id: u64,
        mut wr: OwnedWriteHalf,
        mut prio: mpsc::Receiver<Transmit>,
        mut ready: watch::Receiver<bool>,
    ) -> Result<(), String> {
        self.write_whole(&mut wr, &SYNC_PREAMBLE, "sync_preamble")
            .await?;
        let hello = Envelope {
            id: self.next_id(),
            correlation_id: 0,
            payload: Some(Payload::HostHello(HostHello {
                protocol_version: qx_proto::PROTOCOL_VERSION,
                host_version: env!("CARGO_PKG_VERSION").to_string(),
                host_session_id: self.host_session,
                max_frame_bytes: MAX_RX_FRAME_BYTES,
            })),
        };
        let hello = Arc::new(encode(&hello).map_err(|e| e.to_string())?);
        self.write_whole(&mut wr, &hello, "host_hello").await?;
        self.count_tx("host_hello", hello.len());

        let mut handshaken = *ready.borrow();
        let mut ping = tokio::time::interval(self.cfg.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let handshake_deadline = tokio::time::sleep(self.cfg.handshake_timeout);
        tokio::pin!(handshake_deadline);
        let mut overdue = false;
        loop {
            let job = tokio::select! {
                biased;
                j = prio.recv() => match j {
                    Some(j) => j,
                    None => return Ok(()),
                },
                r = ready.changed(), if !handshaken => {
                    if r.is_err() {
                        return Ok(());
                    }
                    handshaken = *ready.borrow();
                    continue;
                }
                _ = &mut handshake_deadline, if !handshaken && !overdue => {
                    // No agent yet (the VM is booting, or the agent is stopped). Keep the
                    // connection: the agent announces itself when it opens the port, and
                    // reconnecting would only push more preambles into the guest's queue.
                    overdue = true;
                    self.lock().table.set_last_error(format!(
                        "no AgentReady within {} ms of HostHello; waiting for the agent",
                        self.cfg.handshake_timeout.as_millis()
                    ));
                    continue;
                }
                _ = ping.tick(), if handshaken => {
                    let env = Envelope {
                        id: self.next_id(),
                        correlation_id: 0,
                        payload: Some(Payload::Ping(Ping { seq: random_u64() >> 1 })),
                    };
                    Transmit { id: 0, kind: "ping", frame: Arc::new(encode(&env).map_err(|e| e.to_string())?) }
                }
                _ = self.writable.notified(), if handshaken => {
                    let now = Instant::now().into_std();
                    match self.lock().table.poll_transmit(conn_id, now) {
                        Some(t) => t,
                        None => continue,
                    }
                }
            };
            self.write_whole(&mut wr, &job.frame, job.kind).await?;
            self.count_tx(job.kind, job.frame.len());
            if job.id != 0 {
                // Wakes this loop again: the table may hold more.
                self.with_table(|inner, now| {
                    inner.table.handle_event(
                        Event::Flushed {
                            conn: conn_id,
                            id: job.id,
                        },
                        now,
                    )
                });
            }
        }
    }

    async fn write_whole(
        &self,
        wr: &mut OwnedWriteHalf,
        frame: &[u8],
        kind: &str,
    ) -> Result<(), String> {
        let deadline = self.cfg.write_deadline;
        match tokio::time::timeout(deadline, async {
            wr.write_all(frame).await?;
            wr.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write of a {kind} frame failed: {e}")),
            Err(_) => Err(format!(
                "writer stalled: a {}-byte {kind} frame was not flushed within {} ms; tearing the connection down",
                frame.len(),
                deadline.as_millis()
            )),
        }
    }

    fn count_tx(&self, kind: &'static str, bytes: usize) {
        let mut inner = self.lock();
        inner.stats.count_tx(kind, bytes);
        inner.stats.last_tx_unix_ms = unix_ms(SystemTime::now());
    }

    // ---------------------------------------------------------------------------------------
    // Reader
    // ---------------------------------------------------------------------------------------

    async fn read_loop(
        self: &Arc<Self>,
        conn_id: u64,
        rd: OwnedReadHalf,
        prio: mpsc::Sender<Transmit>,
        ready: watch::Sender<bool>,
    ) -> Result<(), String> {
        // A fresh decoder per connection: nothing of the last connection's bytes survives.
        let mut dec = Decoder::new(MAX_RX_FRAME_BYTES);
        let mut seen = dec.stats();
        // Liveness counts whole frames: bytes that never make a frame keep nothing alive.
        let mut last_frame = Instant::now();
        // Unproductive input in the current window: garbage bytes, bad frames, AgentReadys.
        let mut window_at = Instant::now();
        let (mut garbage, mut bad, mut readies) = (0u64, 0u64, 0u64);
        loop {
            // No whole frame within the idle window (the liveness window before the first
            // AgentReady) ends the connection.
            let idle = if *ready.borrow() {
                self.cfg.idle_reconnect
            } else {
                self.cfg.liveness_window
            };
            let idle_at = last_frame + idle;
            // A started frame must arrive whole within the frame deadline (the bound the
            // writer holds itself to), or it is abandoned and the bytes after its magic are
            // read again.
            let frame_at = dec
                .partial_deadline(Instant::now().into_std(), self.cfg.write_deadline)
                .map(Instant::from_std);
            let wake = frame_at.map_or(idle_at, |f| f.min(idle_at));
            // Waits for bytes without holding a buffer: the decoder's is allocated for a read
            // and freed here once it is empty again (also after a read that found nothing:
            // readiness can be stale), so an idle link holds none.
            dec.release_if_empty();
            let n = match tokio::time::timeout_at(wake, rd.readable()).await {
                Err(_) => {
                    let now = Instant::now();
                    if dec.handle_timeout(now.into_std()) {
                        log::debug!(
                            "vm {}: a started frame did not arrive whole within {} ms; abandoned",
                            self.vm_id,
                            self.cfg.write_deadline.as_millis()
                        );
                        0
                    } else if now >= idle_at {
                        return Err(format!("no whole frame heard for {} ms", idle.as_millis()));
                    } else {
                        continue;
                    }
                }
                Ok(Err(e)) => return Err(format!("read failed: {e}")),
                Ok(Ok(())) => match rd.try_read(dec.spare(READ_BYTES)) {
                    Ok(0) => return Err("socket closed (EOF)".to_string()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(format!("read failed: {e}")),
                },
            };
            dec.commit(n);
            let mut flood = false;
            let mut violation = None;
            loop {
                let env = match dec.decode() {
                    Ok(None) => break,
                    Ok(Some(payload)) => {
                        let len = payload.len();
                        decode_envelope(payload).map(|e| (e, len))
                    }
                    Err(e) => {
                        log::debug!("vm {}: frame damage: {e}", self.vm_id);
                        if dec.stats().bad_payloads > MAX_BAD_PAYLOADS_PER_CONNECTION {
                            flood = true;
                            break;
                        }
                        continue;
                    }
                };
                last_frame = Instant::now();
                match env {
                    Ok((env, len)) => {
                        if matches!(env.payload, Some(Payload::AgentReady(_))) {
                            readies += 1;
                            if readies > MAX_AGENT_READY_PER_WINDOW {
                                violation = Some(format!(
                                    "more than {MAX_AGENT_READY_PER_WINDOW} AgentReady frames within {} s",
                                    WASTE_WINDOW.as_secs()
                                ));
                                break;
                            }
                        }
                        // Checked before anything is cached or handed to a caller.
                        if let Err(v) = limits::check(&env) {
                            // Ends the connection once this read's garbage is counted.
                            violation = Some(v.to_string());
                            break;
                        }
                        self.on_frame(conn_id, env, len, &prio, &ready)
                    }
                    Err(e) => {
                        log::debug!("vm {}: undecodable envelope: {e}", self.vm_id);
                        self.lock().stats.bad_frames += 1;
                        bad += 1;
                    }
                }
            }
            let now = dec.stats();
            let new_garbage = now.garbage_bytes - seen.garbage_bytes;
            let new_bad = (now.bad_headers - seen.bad_headers)
                + (now.oversized - seen.oversized)
                + (now.bad_payloads - seen.bad_payloads)
                + (now.abandoned - seen.abandoned);
            let mut inner = self.lock();
            inner.stats.garbage_bytes += new_garbage;
            inner.stats.bad_frames += new_bad;
            seen = now;
            drop(inner);
            garbage += new_garbage;
            bad += new_bad;
            if violation.is_none() && garbage > MAX_GARBAGE_BYTES_PER_WINDOW {
                violation = Some(format!(
                    "more than {MAX_GARBAGE_BYTES_PER_WINDOW} bytes of garbage within {} s",
                    WASTE_WINDOW.as_secs()
                ));
            }
            if violation.is_none() && bad > MAX_BAD_FRAMES_PER_WINDOW {
                violation = Some(format!(
                    "more than {MAX_BAD_FRAMES_PER_WINDOW} rejected frames within {} s",
                    WASTE_WINDOW.as_secs()
                ));
            }
            if window_at.elapsed() >= WASTE_WINDOW {
                window_at = Instant::now();
                (garbage, bad, readies) = (0, 0, 0);
            }
            if let Some(v) = violation {
                return Err(self.protocol_error(conn_id, v));
            }
            if flood {
                // A protocol error like any other: an honest agent sends at most one such
                // frame per connection, so the backoff keeps growing and the log is limited.
                return Err(self.protocol_error(
                    conn_id,
                    format!(
                        "more than {MAX_BAD_PAYLOADS_PER_CONNECTION} frames with valid headers but damaged payloads on one connection"
                    ),
                ));
            }
        }
    }

    fn on_frame(
        self: &Arc<Self>,
        conn_id: u64,
        env: Envelope,
        payload_len: usize,
        prio: &mpsc::Sender<Transmit>,
        ready: &watch::Sender<bool>,
    ) {
        let kind = payload_name(&env);
        let now = SystemTime::now();
        {
            let mut inner = self.lock();
            inner
                .stats
                .count_rx(kind, payload_len + qx_proto::HEADER_BYTES);
            inner.stats.last_rx_unix_ms = unix_ms(now);
            inner.last_rx = Some(Instant::now());
        }
        let corr = env.correlation_id;
        match env.payload {
            Some(Payload::AgentReady(r)) => self.on_ready(conn_id, r, now, ready),
            Some(Payload::Ping(p)) => {
                let pong = Envelope {
                    id: self.next_id(),
                    correlation_id: env.id,
                    payload: Some(Payload::Pong(Pong { seq: p.seq })),
                };
                if let Ok(frame) = encode(&pong) {
                    let _ = prio.try_send(Transmit {
                        id: 0,
                        kind: "pong",
                        frame: Arc::new(frame),
                    });
                }
            }
            Some(Payload::Pong(p)) => {
                // Tracked pings use their request id as seq; keep-alive pongs match nothing.
                let id = if corr != 0 { corr } else { p.seq };
                self.with_table(|inner, now| {
                    if inner.table.kind(id) == Some("ping") {
                        let payload = Payload::Pong(p);
                        inner.table.handle_event(Event::Reply { id, payload }, now);
                    }
                });
            }
            Some(Payload::Telemetry(t)) if corr == 0 => {
                let t = Arc::new(t);
                let mut inner = self.lock();
                inner.cache.telemetry = Some(t.clone());
                inner.cache.telemetry_at = Some(now);
                drop(inner);
                self.telemetry_tx.send_replace(Some(TelemetryReport {
                    telemetry: t,
                    received_unix_ms: unix_ms(now),
                }));
            }
            Some(Payload::Ack(_)) => {
                self.with_table(|inner, now| {
                    inner.table.handle_event(Event::Ack { id: corr }, now)
                });
            }
            Some(Payload::Error(e)) if corr != 0 => {
                let refused = Event::Refused {
                    id: corr,
                    code: qx_proto::agent::ErrorCode::try_from(e.code)
                        .unwrap_or(qx_proto::agent::ErrorCode::Unspecified),
                    message: e.message,
                };
                self.with_table(|inner, now| inner.table.handle_event(refused, now));
            }
            Some(Payload::Error(e)) => {
                // The agent can repeat this at will: debug only, never a flood at info.
                log::debug!(
                    "vm {}: agent protocol complaint: {}",
                    self.vm_id,
                    Esc(&e.message)
                );
            }
            Some(payload @ (Payload::ExecOutput(_) | Payload::FileChunk(_))) if corr != 0 => {
                let item = Event::Item { id: corr, payload };
                self.with_table(|inner, now| inner.table.handle_event(item, now));
            }
            Some(payload) if corr != 0 => {
                let at = now;
                self.with_table(|inner, now| {
                    // Telemetry asked for with a TelemetryRequest also updates the cache.
                    if let Payload::Telemetry(t) = &payload {
                        if inner.table.stage(corr).is_some() {
                            inner.cache.telemetry = Some(Arc::new(t.clone()));
                            inner.cache.telemetry_at = Some(at);
                        }
                    }
                    inner
                        .table
                        .handle_event(Event::Reply { id: corr, payload }, now);
                });
            }
            _ => log::debug!("vm {}: ignored {kind} frame", self.vm_id),
        }
    }

    fn on_ready(
        self: &Arc<Self>,
        conn_id: u64,
        r: AgentReady,
        at: SystemTime,
        ready: &watch::Sender<bool>,
    ) {
        let new = r.session_id;
        let max_exec = r.limits.map(|l| l.max_concurrent_exec).unwrap_or(0);
        self.set_write_limit(r.limits.map(|l| l.max_open_files).unwrap_or(0));
        let first_on_conn = self.with_table(|inner, now| {
            let first_on_conn = inner.ready_on_conn != conn_id;
            inner.ready_on_conn = conn_id;
            inner.cache.ready = Some(Arc::new(r.clone()));
            inner.cache.ready_at = Some(at);
            inner.table.handle_event(
                Event::Ready {
                    conn: conn_id,
                    session: new,
                    max_concurrent_exec: max_exec,
                },
                now,
            );
            first_on_conn
        });
        self.status.send_modify(|s| {
            if s.conn_id == conn_id {
                s.phase = Phase::Open;
            }
        });
        let _ = ready.send(true);
        if r.capabilities.iter().any(|c| c == "network") {
            self.refresh_network();
        }
        if first_on_conn {
            self.emit(
                AgentEventKind::Connected,
                format!(
                    "connection {conn_id}, agent {} session {new:#x}",
                    sanitize(&r.agent_version, EVENT_GUEST_TEXT_CHARS)
                ),
            );
        }
    }
}

impl Link {
    /// Fetches the guest's interfaces into the cache, in the background.
    fn refresh_network(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let opts = CommandOptions {
                ack_timeout: me.cfg.ack_timeout,
                timeout: Some(me.cfg.default_timeout),
                redelivery: Redelivery::SameSession,
            };
            let req = Payload::NetworkRequest(qx_proto::agent::NetworkRequest {});
            let Ok(cmd) = me.start(req, opts, 1) else {
                return;
            };
            if let Ok(Payload::NetworkInfo(n)) = cmd.finish().await {
                me.lock().cache.network = Some(Arc::new(n));
            }
        });
    }
}

/// `base` scaled by a random factor in [0.5, 1.0).
fn jittered(base: Duration) -> Duration {
    let frac = (random_u64() % 1000) as f64 / 2000.0;
    base.mul_f64(0.5 + frac)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn link() -> Arc<Link> {
        let (events, _) = broadcast::channel(8);
        Link::new(
            "vm".into(),
            PathBuf::from("/nonexistent"),
            Arc::new(AgentConfig::default()),
            1,
            events,
        )
    }

    #[tokio::test]
    async fn dead_reader_guard_reads_disconnected_while_writer_lives() {
        let link = link();
        link.status.send_replace(LinkStatus {
            conn_id: 3,
            phase: Phase::Open,
            reader_alive: true,
            writer_alive: true,
        });
        link.lock().last_rx = Some(Instant::now());
        let writer = TaskGuard {
            link: link.clone(),
            conn_id: 3,
            role: Role::Writer,
        };
        let reader = TaskGuard {
            link: link.clone(),
            conn_id: 3,
            role: Role::Reader,
        };
        assert!(link.is_connected());
        drop(reader);
        assert!(!link.is_connected());
        assert_eq!(link.state_name(), "disconnected");
        assert!(link.status().writer_alive);
        drop(writer);
    }

    #[tokio::test(start_paused = true)]
    async fn write_transfers_beyond_the_announced_limit_wait_for_a_slot_until_their_deadline() {
        let link = link();
        // No limit announced: nothing waits.
        let free = link.write_slot(Instant::now()).await.unwrap();
        drop(free);
        link.set_write_limit(1);
        let first = link.write_slot(Instant::now()).await.unwrap();
        // The slot stays taken past the second transfer's deadline: it is not admitted.
        let started = Instant::now();
        let err = link
            .write_slot(started + Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        match err {
            AgentError::NotAdmitted {
                waited_ms, limit, ..
            } => assert_eq!((waited_ms, limit), (2000, 1)),
            other => panic!("{other:?}"),
        }
        let spawn_waiter = || {
            let link = link.clone();
            tokio::spawn(async move {
                link.write_slot(Instant::now() + Duration::from_secs(60))
                    .await
            })
        };
        // A waiter gets the slot as soon as the transfer holding it ends.
        let waiter = spawn_waiter();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        drop(first);
        let second = waiter.await.unwrap().unwrap();
        // A new limit (a new agent session) wakes the waiters onto the new slots.
        let waiter = spawn_waiter();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        link.set_write_limit(2);
        waiter.await.unwrap().unwrap();
        drop(second);
    }

    #[tokio::test(start_paused = true)]
    async fn unwritten_command_fails_at_its_ack_deadline_naming_the_stage() {
        let link = link();
        let opts = CommandOptions {
            ack_timeout: Duration::from_secs(5),
            timeout: Some(Duration::from_secs(30)),
            redelivery: Redelivery::SameSession,
        };
        let timer = link.clone();
        tokio::spawn(async move { timer.run_timer().await });
        let started = Instant::now();
        let cmd = link.start(Payload::Ping(Ping { seq: 0 }), opts, 1).unwrap();
        let err = cmd.finish().await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        match err {
            AgentError::NotWritten { waited_ms, why, .. } => {
                assert_eq!(waited_ms, 5000);
                assert!(why.contains("not connected"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let stats = link.stats();
        assert_eq!(stats.commands.failed_not_written, 1);
        assert_eq!(stats.in_flight, 0);
    }

    #[test]
    fn full_queue_is_refused_at_once() {
        let (events, _) = broadcast::channel(8);
        let cfg = AgentConfig {
            queue_capacity: 2,
            ..AgentConfig::default()
        };
        let link = Link::new(
            "vm".into(),
            PathBuf::from("/nonexistent"),
            Arc::new(cfg),
            1,
            events,
        );
        let opts = CommandOptions {
            ack_timeout: Duration::from_secs(1),
            timeout: None,
            redelivery: Redelivery::SameSession,
        };
        let ping = || Payload::Ping(Ping { seq: 1 });
        let _a = link.start(ping(), opts, 1).unwrap();
        let _b = link.start(ping(), opts, 1).unwrap();
        let err = link.start(ping(), opts, 1).unwrap_err();
        assert!(matches!(err, AgentError::QueueFull { capacity: 2, .. }));
    }
}
