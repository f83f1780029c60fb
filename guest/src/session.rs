//! The session: link state, hellos, liveness, acks and the reply cache. No I/O of its own.
//!
//! # Primer: the protocol this file speaks
//!
//! The agent and the host exchange frames (proto/src/codec.rs), each carrying one `Envelope`.
//!
//! - **Connect.** On every connect edge (the port stopped reporting HUP, or a socket connected)
//!   the agent resets its decoder (stale bytes from a previous host are expected and skipped)
//!   and queues `AgentReady` carrying the session id: random, non-zero, fixed for the life of
//!   this process, so the host can tell "same agent, new connection" from "agent restarted".
//!   The host sends a sync preamble then `HostHello`; the agent answers that with `AgentReady`
//!   too (correlation id = the hello's id).
//! - **Liveness, both ways.** Either side may send `Ping{seq}`; the other answers `Pong{seq}`.
//!   The agent pings a connected host every `ping_interval` of silence. If it hears nothing at
//!   all for `stale_after` intervals the link is [`LinkState::Stale`]: the agent resets its
//!   decoder and re-announces itself, and keeps doing its work (nothing is lost).
//! - **Requests.** Every host request has a fresh non-zero id. The agent queues `Ack` before
//!   the request runs, then the handler's stream items, then exactly one terminal reply. A
//!   terminal reply is remembered in a small cache: a redelivered id (the host resends after a
//!   reconnect) is answered from the cache, acked again if it is still running, and never run
//!   twice. Ids that fell out of the cache are still remembered (ids only) and get
//!   `Error{FAILED_PRECONDITION}` rather than a second run.
//!
//! # States
//!
//! ```text
//!            link_up                 nothing heard for stale_after pings
//! HostAbsent ───────► Connected ────────────────────────────────────► Stale
//!     ▲                  │  ▲                 bytes received            │
//!     └── link_down ─────┘  └───────────────────────────────────────────┘
//!     ▲                                                                  │
//!     └────────────────────────── link_down ─────────────────────────────┘
//! ```
//!
//! All transitions happen in [`Session::transition`]. Time is an input (`now`); the loop asks
//! [`Session::next_deadline`] how long it may sleep.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use prost::Message;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{
    Ack, AgentReady, Envelope, Error as WireError, ErrorCode, FileChunk, Ping, Pong,
};
use qx_proto::{decode_host_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION};
use qx_proto::{envelope_payload_name as payload_name_env, payload_name};

use crate::outbox::{Outbox, OutboxError, MAX_FRAME_TOTAL_BYTES};

/// Terminal replies remembered for redelivered ids.
pub const REPLY_CACHE_ENTRIES: usize = 64;
/// Bytes of terminal replies remembered (collected exec output can be large).
pub const REPLY_CACHE_BYTES: usize = 1024 * 1024;
/// Request ids remembered after their reply left the cache.
pub const SEEN_IDS: usize = 4096;
/// The reservation of a request whose terminal reply is small (Done, a status, an error).
pub const SMALL_REPLY_BYTES: usize = 4096;
/// Error messages are cut to this many bytes, so any error fits [`SMALL_REPLY_BYTES`].
pub const ERROR_MESSAGE_BYTES: usize = 2048;

/// Session tunables.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Ping a silent connected host this often. Zero disables pings and staleness.
    pub ping_interval: Duration,
    /// Silent intervals before the link counts as stale.
    pub stale_after_pings: u32,
    /// Reply-lane capacity of the outbox, in bytes.
    pub outbox_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ping_interval: Duration::from_millis(5000),
            stale_after_pings: 3,
            outbox_bytes: 256 * 1024,
        }
    }
}

/// State of the link to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No host is attached (the port reports HUP, or the socket is closed). Replies wait in
    /// the outbox; nothing is pinged; nothing is an error.
    HostAbsent,
    /// A host is attached and was heard from at `last_rx`; the next agent ping is due at
    /// `next_ping`.
    Connected {
        last_rx: Instant,
        next_ping: Instant,
    },
    /// A host is attached but silent for `stale_after_pings` ping intervals. The decoder was
    /// reset and AgentReady re-sent; pings continue at `next_ping`. Any byte from the host
    /// returns the link to `Connected`.
    Stale { next_ping: Instant },
}

/// Inputs that move the link state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// A host attached (connect edge).
    Up,
    /// The host detached (HUP / EOF / socket error).
    Down,
    /// Bytes arrived from the host.
    Rx,
    /// Time passed; check liveness deadlines.
    Tick,
}

/// A host request the session accepted (acked) and the dispatcher must run.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: u64,
    pub payload: Payload,
    /// The CRC32C of a FileWriteChunk's data, read back from the frame's checksum (the data
    /// is the frame's tail), so the data is not read again for it; `None`: not known.
    pub data_crc: Option<u32>,
}

/// Session counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub connects: u64,
    pub stale: u64,
    pub requests: u64,
    pub redelivered: u64,
    pub bad_frames: u64,
    pub bad_envelopes: u64,
    pub pings_sent: u64,
}

/// Allows `burst` log lines per `window`, then counts what it suppresses.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    burst: u32,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        RateLimiter {
            window,
            burst,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now. When a new window opens after suppression, the
    /// number of suppressed lines is logged first.
    pub fn allow(&mut self, now: Instant) -> bool {
        let fresh = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= self.window);
        if fresh {
            if self.suppressed > 0 {
                warn!("{} similar log lines suppressed", self.suppressed);
                self.suppressed = 0;
            }
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// A request id as the host that sent it knows it: (host session, request id). Two hosts
/// on one port (an upgrade overlap) number their requests independently.
type Key = (u64, u64);

/// Terminal replies by request key, bounded by entries and bytes.
#[derive(Debug, Default)]
struct ReplyCache {
    entries: VecDeque<(Key, Envelope, usize)>,
    bytes: usize,
    seen: HashSet<Key>,
    seen_order: VecDeque<Key>,
}

impl ReplyCache {
    fn get(&self, key: Key) -> Option<&Envelope> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, e, _)| e)
    }

    fn seen(&self, key: Key) -> bool {
        self.seen.contains(&key)
    }

    fn mark_seen(&mut self, key: Key) {
        if self.seen.insert(key) {
            self.seen_order.push_back(key);
            while self.seen_order.len() > SEEN_IDS {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    fn insert(&mut self, key: Key, env: Envelope) {
        let size = env.encoded_len();
        self.entries.push_back((key, env, size));
        self.bytes += size;
        while self.entries.len() > REPLY_CACHE_ENTRIES
            || (self.bytes > REPLY_CACHE_BYTES && self.entries.len() > 1)
        {
            if let Some((_, _, s)) = self.entries.pop_front() {
                self.bytes -= s;
            }
        }
    }
}

/// An admitted request: whose it is and the outbox bytes reserved for its terminal reply.
#[derive(Debug, Clone, Copy)]
struct Running {
    host: u64,
    reserved: usize,
}

/// What became of one decoded envelope.
enum Step {
    /// Answered (or ignored); decode the next.
    Handled,
    /// A new request, acked and admitted: run it.
    Run(Request),
    /// Its answer does not fit the outbox yet: keep it and stop decoding until the host reads.
    Wait(Envelope),
}

/// The most bytes a terminal reply to `p` can take, frame header included; the session
/// reserves this much before it admits the request. `exec_cap` is the collected-output cap
/// of an exec request that gives none.
pub fn reply_bound(p: &Payload, exec_cap: u32) -> usize {
    match p {
        Payload::ExecRequest(r) if r.stream => SMALL_REPLY_BYTES,
        Payload::ExecRequest(r) => {
            let cap = |c: u32| {
                let c = if c == 0 { exec_cap } else { c };
                c.min(crate::dispatch::COLLECTED_CAP_BYTES) as usize
            };
            (cap(r.stdout_cap_bytes) + cap(r.stderr_cap_bytes) + SMALL_REPLY_BYTES)
                .min(MAX_FRAME_TOTAL_BYTES)
        }
        Payload::TimeGetRequest(_)
        | Payload::TimeSetRequest(_)
        | Payload::SetTelemetryInterval(_)
        | Payload::ExecKill(_)
        | Payload::Cancel(_)
        | Payload::FileReadRequest(_)
        | Payload::FileHashRequest(_)
        | Payload::FileWriteOpen(_)
        | Payload::FileWriteChunk(_)
        | Payload::FileWriteClose(_)
        | Payload::MkdirRequest(_)
        | Payload::DeleteRequest(_)
        | Payload::SetPasswordRequest(_) => SMALL_REPLY_BYTES,
        _ => MAX_FRAME_TOTAL_BYTES,
    }
}

/// The protocol state of one agent process. See the module docs.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    state: LinkState,
    session_id: u64,
    started: Instant,
    ready: AgentReady,
    decoder: Decoder,
    outbox: Outbox,
    next_envelope_id: u64,
    ping_seq: u64,
    cache: ReplyCache,
    running: HashMap<u64, Running>,
    /// A decoded envelope whose answer waits for outbox room.
    held: Option<Envelope>,
    /// Collected-output cap of an exec request that gives none (for [`reply_bound`]).
    exec_cap: u32,
    /// The correlation id of a hello answer not yet started, kept when a newer hello
    /// replaces it.
    hello_correlation: u64,
    stats: SessionStats,
    noisy: RateLimiter,
    /// Connect/disconnect/hello lines: a host reconnecting in a loop must not flood the log.
    link_log: RateLimiter,
    /// The host session announced in the last HostHello (0: none yet).
    host_session_id: u64,
    host_changed: bool,
}

impl Session {
    /// A session with id `session_id` (non-zero, random per process) that announces `ready`
    /// (identity fields; the session fills in id, version, uptime and clock).
    pub fn new(cfg: SessionConfig, session_id: u64, ready: AgentReady, now: Instant) -> Self {
        let outbox = Outbox::new(cfg.outbox_bytes);
        Session {
            cfg,
            state: LinkState::HostAbsent,
            session_id: session_id.max(1),
            started: now,
            ready,
            decoder: Decoder::new(DEFAULT_MAX_FRAME_BYTES),
            outbox,
            next_envelope_id: 1,
            ping_seq: 0,
            cache: ReplyCache::default(),
            running: HashMap::new(),
            held: None,
            exec_cap: crate::dispatch::COLLECTED_CAP_BYTES,
            hello_correlation: 0,
            stats: SessionStats::default(),
            noisy: RateLimiter::new(10, Duration::from_secs(60)),
            link_log: RateLimiter::new(20, Duration::from_secs(60)),
            host_session_id: 0,
            host_changed: false,
        }
    }

    /// True once after a HostHello from a different host session than the previous one (the
    /// host restarted): per-host state such as open write transfers should be dropped.
    pub fn take_host_changed(&mut self) -> bool {
        std::mem::take(&mut self.host_changed)
    }

    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn outbox_mut(&mut self) -> &mut Outbox {
        &mut self.outbox
    }

    /// Sets the collected-output cap of exec requests that give none (the configuration's).
    pub fn set_exec_cap(&mut self, cap: u32) {
        self.exec_cap = cap;
    }

    /// Whether a decoded envelope waits for outbox room: the loop reads no more input until
    /// the host has taken some output.
    pub fn is_holding(&self) -> bool {
        self.held.is_some()
    }

    /// Replaces the identity announced in AgentReady (addresses change at run time).
    pub fn set_ready(&mut self, ready: AgentReady) {
        self.ready = ready;
    }

    pub fn set_ping_interval(&mut self, interval: Duration, stale_after_pings: u32) {
        self.cfg.ping_interval = interval;
        self.cfg.stale_after_pings = stale_after_pings.max(1);
    }

    /// Whether a host is attached (connected or stale).
    pub fn host_present(&self) -> bool {
        !matches!(self.state, LinkState::HostAbsent)
    }

    /// The one place the link state changes.
    pub fn transition(&mut self, ev: LinkEvent, now: Instant) {
        let interval = self.cfg.ping_interval;
        let next = match (self.state, ev) {
            (LinkState::HostAbsent, LinkEvent::Up) => {
                self.stats.connects += 1;
                if self.link_log.allow(now) {
                    info!("host connected");
                }
                // Undecoded input from a previous host is dropped, with any envelope that
                // was waiting for room: its host redelivers what it saw no ack for.
                self.decoder.reset();
                self.held = None;
                self.announce(0, now);
                Some(LinkState::Connected {
                    last_rx: now,
                    next_ping: now + interval,
                })
            }
            (LinkState::HostAbsent, _) => None,
            (_, LinkEvent::Down) => {
                if self.link_log.allow(now) {
                    info!("host disconnected");
                }
                Some(LinkState::HostAbsent)
            }
            (_, LinkEvent::Up) => None,
            (LinkState::Connected { next_ping, .. }, LinkEvent::Rx) => Some(LinkState::Connected {
                last_rx: now,
                next_ping: next_ping.max(now + interval),
            }),
            (LinkState::Stale { .. }, LinkEvent::Rx) => {
                if self.link_log.allow(now) {
                    info!("host heard again");
                }
                Some(LinkState::Connected {
                    last_rx: now,
                    next_ping: now + interval,
                })
            }
            (LinkState::Connected { last_rx, next_ping }, LinkEvent::Tick) => {
                if interval.is_zero() {
                    None
                } else if now >= last_rx + interval * self.cfg.stale_after_pings {
                    self.stats.stale += 1;
                    warn!(
                        "host silent for {} ms: resynchronising",
                        now.duration_since(last_rx).as_millis()
                    );
                    self.decoder.reset();
                    self.announce(0, now);
                    self.ping(now);
                    Some(LinkState::Stale {
                        next_ping: now + interval,
                    })
                } else if now >= next_ping {
                    self.ping(now);
                    Some(LinkState::Connected {
                        last_rx,
                        next_ping: now + interval,
                    })
                } else {
                    None
                }
            }
            (LinkState::Stale { next_ping }, LinkEvent::Tick) => {
                if !interval.is_zero() && now >= next_ping {
                    self.ping(now);
                    Some(LinkState::Stale {
                        next_ping: now + interval,
                    })
                } else {
                    None
                }
            }
        };
        if let Some(state) = next {
            self.state = state;
        }
    }

    /// When [`LinkEvent::Tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.cfg.ping_interval.is_zero() {
            return None;
        }
        match self.state {
            LinkState::HostAbsent => None,
            LinkState::Connected { last_rx, next_ping } => {
                Some(next_ping.min(last_rx + self.cfg.ping_interval * self.cfg.stale_after_pings))
            }
            LinkState::Stale { next_ping } => Some(next_ping),
        }
    }

    /// Free space at the end of the decoder, for reading straight into it.
    pub fn read_buf(&mut self, want: usize) -> &mut [u8] {
        self.decoder.spare(want)
    }

    /// Marks `n` bytes read into [`Session::read_buf`] as received.
    pub fn received(&mut self, n: usize, now: Instant) {
        if n > 0 {
            self.decoder.commit(n);
            self.transition(LinkEvent::Rx, now);
        }
    }

    /// Feeds bytes (for tests and socket transports that do not read in place).
    pub fn receive(&mut self, data: &[u8], now: Instant) {
        let mut rest = data;
        while !rest.is_empty() {
            let taken = self.decoder.push(rest);
            self.transition(LinkEvent::Rx, now);
            rest = &rest[taken..];
            if taken == 0 {
                break;
            }
        }
    }

    /// Decodes buffered frames, answers session messages itself, and returns the next new
    /// request (already acked and admitted), or `None` when the buffered bytes hold no more or
    /// the next answer waits for outbox room ([`Session::is_holding`]).
    pub fn next_request(&mut self, now: Instant) -> Option<Request> {
        loop {
            // Known only for an envelope decoded now, not for a held one.
            let mut data_crc = None;
            let env = match self.held.take() {
                Some(env) => env,
                None => match self.decoder.decode_with_crc() {
                    Ok(None) => return None,
                    Err(e) => {
                        self.stats.bad_frames += 1;
                        if self.noisy.allow(now) {
                            debug!("input skipped: {e}");
                        }
                        continue;
                    }
                    Ok(Some((payload, crc))) => match decode_host_envelope(payload) {
                        Ok(env) => {
                            data_crc = match &env.payload {
                                Some(Payload::FileWriteChunk(c)) => {
                                    Some(qx_proto::tail_crc32c(payload, crc, c.data.len()))
                                }
                                _ => None,
                            };
                            env
                        }
                        Err(e) => {
                            self.stats.bad_envelopes += 1;
                            if self.noisy.allow(now) {
                                warn!("undecodable envelope skipped: {e}");
                            }
                            continue;
                        }
                    },
                },
            };
            match self.on_envelope(env, now) {
                Step::Handled => {}
                Step::Run(req) => return Some(Request { data_crc, ..req }),
                Step::Wait(env) => {
                    self.held = Some(env);
                    return None;
                }
            }
        }
    }

    fn on_envelope(&mut self, env: Envelope, now: Instant) -> Step {
        let id = env.id;
        let payload = match env.payload {
            Some(Payload::HostHello(h)) => {
                if self.link_log.allow(now) {
                    info!(
                        "host hello: version {:?}, host session {:x}",
                        h.host_version, h.host_session_id
                    );
                }
                if h.host_session_id != self.host_session_id {
                    // Request ids are per host session: cached replies stay keyed by the
                    // session that asked, for when that host comes back (an upgrade overlap).
                    if self.host_session_id != 0 {
                        self.host_changed = true;
                    }
                    self.host_session_id = h.host_session_id;
                }
                self.announce(id, now);
                return Step::Handled;
            }
            Some(Payload::Ping(p)) => {
                let pong = self.envelope(id, Payload::Pong(Pong { seq: p.seq }));
                return self.session_frames(&[pong], env_again(id, Payload::Ping(p)));
            }
            Some(Payload::Pong(_)) => return Step::Handled,
            Some(p @ (Payload::Ack(_) | Payload::Error(_) | Payload::Done(_))) if id == 0 => {
                if self.noisy.allow(now) {
                    debug!("ignored {} from host", payload_name(&p));
                }
                return Step::Handled;
            }
            Some(p) => p,
            None => {
                if id == 0 {
                    return Step::Handled;
                }
                let err = self.envelope(
                    id,
                    wire_error(ErrorCode::InvalidArgument, "envelope carries no payload"),
                );
                return self.session_frames(
                    &[err],
                    Envelope {
                        id,
                        correlation_id: env.correlation_id,
                        payload: None,
                    },
                );
            }
        };
        if id == 0 {
            if self.noisy.allow(now) {
                warn!("{} with request id 0 ignored", payload_name(&payload));
            }
            return Step::Handled;
        }
        let key = (self.host_session_id, id);
        if let Some(cached) = self.cache.get(key).cloned() {
            let ack = self.envelope(id, Payload::Ack(Ack {}));
            let step = self.session_frames(&[ack, cached], env_again(id, payload));
            if matches!(step, Step::Handled) {
                self.stats.redelivered += 1;
            }
            return step;
        }
        if let Some(run) = self.running.get(&id).copied() {
            let ack = self.envelope(id, Payload::Ack(Ack {}));
            if run.host == key.0 {
                let step = self.session_frames(&[ack], env_again(id, payload));
                if matches!(step, Step::Handled) {
                    self.stats.redelivered += 1;
                }
                return step;
            }
            // Another host session's request of the same id still runs: replies carry only
            // the id, so this one cannot run beside it.
            let busy = self.envelope(
                id,
                wire_error(
                    ErrorCode::Busy,
                    "a request with this id from another host session is still running",
                ),
            );
            return self.refuse(key, ack, busy, env_again(id, payload));
        }
        if self.cache.seen(key) {
            let ack = self.envelope(id, Payload::Ack(Ack {}));
            let err = self.envelope(
                id,
                wire_error(
                    ErrorCode::FailedPrecondition,
                    "request already ran; its reply is no longer cached",
                ),
            );
            let step = self.session_frames(&[ack, err], env_again(id, payload));
            if matches!(step, Step::Handled) {
                self.stats.redelivered += 1;
            }
            return step;
        }
        // Admission: the ack and the reservation for the terminal reply, or wait.
        let bound = reply_bound(&payload, self.exec_cap);
        let ack = self.envelope(id, Payload::Ack(Ack {}));
        let ack_len = qx_proto::encoded_frame_len(&ack);
        if self.outbox.room() < ack_len + bound {
            if self.outbox.could_reserve(ack_len + bound) {
                // The host has not read enough yet: wait for it.
                return Step::Wait(env_again(id, payload));
            }
            // Only finishing requests would make room, which can take any time: refuse
            // now, so that nothing behind this request (a ping) waits for it.
            let busy = self.envelope(
                id,
                wire_error(
                    ErrorCode::Busy,
                    "too many replies outstanding; retry when requests finish",
                ),
            );
            return self.refuse(key, ack, busy, env_again(id, payload));
        }
        // Both checked against room() above: neither can be refused.
        if self.outbox.push_reply(&ack, None).is_err() || !self.outbox.reserve(bound) {
            warn!("request {id}: admission failed after its room was checked");
            return Step::Wait(env_again(id, payload));
        }
        self.stats.requests += 1;
        self.cache.mark_seen(key);
        self.running.insert(
            id,
            Running {
                host: key.0,
                reserved: bound,
            },
        );
        Step::Run(Request {
            id,
            payload,
            data_crc: None,
        })
    }

    /// Acks request `key` and answers it with the terminal `err` without running it. The
    /// error is its one terminal reply: cached, so a redelivery gets it again.
    fn refuse(&mut self, key: Key, ack: Envelope, err: Envelope, env: Envelope) -> Step {
        let step = self.session_frames(&[ack, err.clone()], env);
        if matches!(step, Step::Handled) {
            self.cache.mark_seen(key);
            self.cache.insert(key, err);
        }
        step
    }

    /// Queues `frames` together from the session reserve, or none of them: then `env` waits.
    fn session_frames(&mut self, frames: &[Envelope], env: Envelope) -> Step {
        let need: usize = frames.iter().map(qx_proto::encoded_frame_len).sum();
        if need > self.outbox.session_room() {
            return Step::Wait(env);
        }
        for f in frames {
            if let Err(e) = self.outbox.push_session(f) {
                // Checked above; a frame too large for the codec is the only way here.
                warn!("{} not sent: {e}", payload_name_env(f));
            }
        }
        Step::Handled
    }

    fn envelope(&mut self, correlation_id: u64, payload: Payload) -> Envelope {
        let id = self.next_envelope_id;
        self.next_envelope_id += 1;
        Envelope {
            id,
            correlation_id,
            payload: Some(payload),
        }
    }

    /// Pings the host unless the outbox is short of room: a ping nobody can read is
    /// worthless, and the next interval tries again.
    fn ping(&mut self, _now: Instant) {
        self.ping_seq += 1;
        let seq = self.ping_seq;
        let env = self.envelope(0, Payload::Ping(Ping { seq }));
        if self.outbox.push_session(&env).is_ok() {
            self.stats.pings_sent += 1;
        }
    }

    fn announce(&mut self, correlation_id: u64, now: Instant) {
        let mut ready = self.ready.clone();
        ready.protocol_version = PROTOCOL_VERSION;
        ready.session_id = self.session_id;
        ready.agent_uptime_ms = now.duration_since(self.started).as_millis() as u64;
        ready.guest_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        // A newer hello replaces one that has not gone out; it still answers the host hello
        // the replaced one answered.
        let correlation_id = if correlation_id == 0 && self.outbox.hello_pending() {
            self.hello_correlation
        } else {
            correlation_id
        };
        self.hello_correlation = correlation_id;
        // Ahead of queued replies: the new host learns who it talks to first.
        let env = self.envelope(correlation_id, Payload::AgentReady(ready));
        if let Err(e) = self.outbox.push_urgent(&env) {
            warn!("agent_ready not sent: {e}");
        }
    }

    /// Queues a stream item (ExecOutput, FileChunk) of request `id`. The caller checks
    /// [`Outbox::room`] first; a refused item is the caller's to retry.
    pub fn stream(&mut self, id: u64, payload: Payload) -> Result<(), OutboxError> {
        let env = self.envelope(id, payload);
        self.outbox.push_reply(&env, None)
    }

    /// Queues a FileChunk of request `id` whose data has CRC32C `data_crc`: the frame's
    /// checksum is built from it, and the data is not read again.
    pub fn stream_chunk(
        &mut self,
        id: u64,
        chunk: FileChunk,
        data_crc: u32,
    ) -> Result<Vec<u8>, OutboxError> {
        let tail = Some((chunk.data.len(), data_crc));
        let env = self.envelope(id, Payload::FileChunk(chunk));
        self.outbox.push_reply(&env, tail)?;
        // The data was copied into its frame; its buffer can hold the next chunk.
        match env.payload {
            Some(Payload::FileChunk(c)) => Ok(c.data),
            _ => Ok(Vec::new()),
        }
    }

    /// Queues the terminal reply of request `id` in the room reserved for it when it was
    /// admitted, and remembers it for redeliveries. A reply larger than its reservation (or
    /// than a frame) becomes an `Error{INTERNAL}`, which always fits: the host learns of every
    /// request's end. Fails only for an id that is not running.
    pub fn reply(&mut self, id: u64, payload: Payload) -> Result<(), OutboxError> {
        let Some(run) = self.running.remove(&id) else {
            warn!("reply for request {id}, which is not running, not sent");
            return Err(OutboxError::NotRunning(id));
        };
        let mut env = self.envelope(id, payload);
        if let Err(e) = self.outbox.push_terminal(&env, run.reserved) {
            warn!("{} of request {id} not sent: {e}", payload_name_env(&env));
            env = self.envelope(id, wire_error(ErrorCode::Internal, &e.to_string()));
            if let Err(e) = self.outbox.push_terminal(&env, run.reserved) {
                // Unreachable: an error fits the smallest reservation.
                warn!("error reply of request {id} not sent: {e}");
            }
        }
        self.cache.insert((run.host, id), env);
        Ok(())
    }

    /// Terminal `Error` for request `id`, its message cut to [`ERROR_MESSAGE_BYTES`].
    pub fn error(&mut self, id: u64, code: ErrorCode, message: impl Into<String>) {
        let _ = self.reply(id, wire_error(code, &message.into()));
    }

    /// Pushes unsolicited telemetry into the coalescing slot.
    pub fn push_telemetry(&mut self, t: qx_proto::agent::Telemetry) {
        let env = self.envelope(0, Payload::Telemetry(t));
        let _ = self.outbox.push_telemetry(&env);
    }
}

/// An envelope put back together to wait for room.
fn env_again(id: u64, payload: Payload) -> Envelope {
    Envelope {
        id,
        correlation_id: 0,
        payload: Some(payload),
    }
}

/// An `Error` payload whose message is cut to [`ERROR_MESSAGE_BYTES`] on a char boundary.
fn wire_error(code: ErrorCode, message: &str) -> Payload {
    let mut end = message.len().min(ERROR_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Payload::Error(WireError {
        code: code as i32,
        message: message[..end].to_string(),
    })
}

/// A random non-zero session id. It only has to differ between agent processes: it comes
/// from [`crate::sys::random_u64`] (which never waits for the kernel's generator), mixed with
/// the clock and the pid.
pub fn random_session_id() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed =
        t.rotate_left(17) ^ u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (crate::sys::random_u64().unwrap_or(0) ^ mixed).max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use qx_proto::agent::{
        AgentLogs, ExecExit, ExecRequest, FileChunk, HostHello, LogLine, TimeGetRequest,
    };
    use qx_proto::{decode_envelope, encode_envelope};
    use std::collections::HashMap;

    fn session(now: Instant) -> Session {
        let cfg = SessionConfig {
            ping_interval: Duration::from_millis(100),
            stale_after_pings: 3,
            outbox_bytes: 0,
        };
        Session::new(cfg, 42, AgentReady::default(), now)
    }

    fn frame(id: u64, payload: Payload) -> Vec<u8> {
        let mut out = Vec::new();
        let env = Envelope {
            id,
            correlation_id: 0,
            payload: Some(payload),
        };
        encode_envelope(&env, DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
        out
    }

    fn sent(s: &mut Session) -> Vec<Envelope> {
        let mut bytes = Vec::new();
        s.outbox_mut().flush(&mut bytes).unwrap();
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&bytes);
        let mut out = Vec::new();
        while let Ok(Some(p)) = dec.decode() {
            out.push(decode_envelope(p).unwrap());
        }
        out
    }

    fn kinds(envs: &[Envelope]) -> Vec<(&'static str, u64)> {
        envs.iter()
            .map(|e| (qx_proto::envelope_payload_name(e), e.correlation_id))
            .collect()
    }

    fn exec() -> Payload {
        Payload::ExecRequest(ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        })
    }

    #[test]
    fn connect_edge_announces_the_session_id() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert!(sent(&mut s).is_empty());
        s.transition(LinkEvent::Up, t0);
        let out = sent(&mut s);
        assert_eq!(kinds(&out), vec![("agent_ready", 0)]);
        match &out[0].payload {
            Some(Payload::AgentReady(r)) => {
                assert_eq!(r.session_id, 42);
                assert_eq!(r.protocol_version, PROTOCOL_VERSION);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_hello_is_answered_with_agent_ready() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.transition(LinkEvent::Up, t0);
        sent(&mut s);
        s.receive(&frame(5, Payload::HostHello(HostHello::default())), t0);
        assert_eq!(s.next_request(t0), None);
        assert_eq!(kinds(&sent(&mut s)), vec![("agent_ready", 5)]);
    }

    #[test]
    fn ping_is_answered_with_the_same_seq() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&frame(3, Payload::Ping(Ping { seq: 99 })), t0);
        assert_eq!(s.next_request(t0), None);
        let out = sent(&mut s);
        assert_eq!(out[0].payload, Some(Payload::Pong(Pong { seq: 99 })));
        assert_eq!(out[0].correlation_id, 3);
    }

    #[test]
    fn request_is_acked_before_it_runs_and_a_redelivery_is_answered_from_cache() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&frame(7, exec()), t0);
        let req = s.next_request(t0).unwrap();
        assert_eq!(req.id, 7);
        assert_eq!(kinds(&sent(&mut s)), vec![("ack", 7)]);
        // Redelivered while still running: acked again, not returned for running.
        s.receive(&frame(7, exec()), t0);
        assert_eq!(s.next_request(t0), None);
        assert_eq!(kinds(&sent(&mut s)), vec![("ack", 7)]);
        s.reply(7, Payload::Done(Default::default())).unwrap();
        let first = sent(&mut s);
        // Redelivered after it finished: the same reply again, nothing run.
        s.receive(&frame(7, exec()), t0);
        assert_eq!(s.next_request(t0), None);
        let again = sent(&mut s);
        assert_eq!(kinds(&again), vec![("ack", 7), ("done", 7)]);
        assert_eq!(again[1], first[0]);
    }

    #[test]
    fn a_restarted_host_may_reuse_request_ids() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let hello = |id| {
            Payload::HostHello(HostHello {
                host_session_id: id,
                ..Default::default()
            })
        };
        s.receive(&frame(1, hello(100)), t0);
        s.receive(&frame(7, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        let req = s.next_request(t0).unwrap();
        s.reply(req.id, Payload::Done(Default::default())).unwrap();
        assert!(!s.take_host_changed());
        // Same host reconnecting: id 7 is a redelivery.
        s.receive(&frame(2, hello(100)), t0);
        s.receive(&frame(7, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        assert_eq!(s.next_request(t0), None);
        // A new host session: id 7 is a new request.
        s.receive(&frame(1, hello(200)), t0);
        s.receive(&frame(7, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        assert_eq!(s.next_request(t0).map(|r| r.id), Some(7));
        assert!(s.take_host_changed());
    }

    #[test]
    fn ids_evicted_from_the_cache_are_still_never_run_twice() {
        let t0 = Instant::now();
        let mut s = session(t0);
        for id in 1..=(REPLY_CACHE_ENTRIES as u64 + 10) {
            s.receive(&frame(id, Payload::TimeGetRequest(TimeGetRequest {})), t0);
            let req = s.next_request(t0).unwrap();
            s.reply(req.id, Payload::Done(Default::default())).unwrap();
            sent(&mut s);
        }
        s.receive(&frame(1, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        assert_eq!(s.next_request(t0), None);
        let out = sent(&mut s);
        assert_eq!(kinds(&out), vec![("ack", 1), ("error", 1)]);
    }

    #[test]
    fn garbage_is_skipped_and_the_next_frame_is_served() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let mut input = vec![0xAA; 1000];
        input.extend_from_slice(&qx_proto::MAGIC);
        input.extend_from_slice(&[0xFF; 20]);
        input.extend(frame(1, Payload::Ping(Ping { seq: 1 })));
        s.receive(&input, t0);
        assert_eq!(s.next_request(t0), None);
        assert_eq!(kinds(&sent(&mut s)), vec![("pong", 1)]);
        assert!(s.stats().bad_frames > 0);
    }

    #[test]
    fn silent_host_is_pinged_then_declared_stale_and_reannounced() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.transition(LinkEvent::Up, t0);
        sent(&mut s);
        let iv = Duration::from_millis(100);
        assert_eq!(s.next_deadline(), Some(t0 + iv));
        s.transition(LinkEvent::Tick, t0 + iv);
        assert_eq!(kinds(&sent(&mut s)), vec![("ping", 0)]);
        s.transition(LinkEvent::Tick, t0 + iv * 2);
        assert_eq!(kinds(&sent(&mut s)), vec![("ping", 0)]);
        s.transition(LinkEvent::Tick, t0 + iv * 3);
        assert!(matches!(s.state(), LinkState::Stale { .. }));
        assert_eq!(kinds(&sent(&mut s)), vec![("agent_ready", 0), ("ping", 0)]);
        // Any byte heard brings the link back.
        s.receive(&frame(9, Payload::Pong(Pong { seq: 3 })), t0 + iv * 4);
        assert!(matches!(s.state(), LinkState::Connected { .. }));
    }

    #[test]
    fn traffic_postpones_pings() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.transition(LinkEvent::Up, t0);
        sent(&mut s);
        let iv = Duration::from_millis(100);
        for i in 1..20u32 {
            let now = t0 + iv * i / 2;
            s.receive(&frame(u64::from(i), Payload::Ping(Ping { seq: 1 })), now);
            s.next_request(now);
            s.transition(LinkEvent::Tick, now);
        }
        let out = sent(&mut s);
        assert!(out
            .iter()
            .all(|e| matches!(e.payload, Some(Payload::Pong(_)))));
        assert!(matches!(s.state(), LinkState::Connected { .. }));
    }

    #[test]
    fn absent_host_has_no_deadline_and_reconnect_keeps_the_session_id() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(s.next_deadline(), None);
        s.transition(LinkEvent::Up, t0);
        s.transition(LinkEvent::Down, t0);
        assert_eq!(s.next_deadline(), None);
        s.transition(LinkEvent::Up, t0);
        let out = sent(&mut s);
        let ids: Vec<u64> = out
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::AgentReady(r)) => Some(r.session_id),
                _ => None,
            })
            .collect();
        // The second hello replaced the first, which had not gone out.
        assert_eq!(ids, vec![42]);
    }

    fn hello(host_session_id: u64) -> Payload {
        Payload::HostHello(HostHello {
            host_session_id,
            ..Default::default()
        })
    }

    fn collected_exec(cap: u32) -> Payload {
        Payload::ExecRequest(ExecRequest {
            argv: vec!["true".into()],
            stdout_cap_bytes: cap,
            stderr_cap_bytes: cap,
            ..Default::default()
        })
    }

    fn exec_exit(bytes: usize) -> Payload {
        Payload::ExecExit(ExecExit {
            exited: true,
            stdout: vec![b'o'; bytes],
            stderr: vec![b'e'; bytes],
            ..Default::default()
        })
    }

    /// Fills the lane with stream items of request `id` until the outbox refuses one.
    fn fill_lane(s: &mut Session, id: u64) {
        let chunk = |n| {
            Payload::FileChunk(FileChunk {
                offset: 0,
                data: vec![0; n],
            })
        };
        let mut n = 0;
        // Down to the last bytes: an empty chunk's frame is smaller than a pong's.
        for size in [8000, 1000, 100, 10, 1, 0] {
            while s.stream(id, chunk(size)).is_ok() {
                n += 1;
                assert!(n < 1000, "the lane takes stream items without limit");
            }
        }
    }

    /// Terminal frames (not acks, pongs, hellos, pings, telemetry or stream items) by
    /// correlation id: the set of distinct envelope ids for each.
    fn terminals(envs: &[Envelope]) -> HashMap<u64, HashSet<u64>> {
        let mut out: HashMap<u64, HashSet<u64>> = HashMap::new();
        for e in envs {
            match e.payload {
                Some(
                    Payload::Ack(_)
                    | Payload::Pong(_)
                    | Payload::Ping(_)
                    | Payload::AgentReady(_)
                    | Payload::Telemetry(_)
                    | Payload::FileChunk(_)
                    | Payload::ExecOutput(_),
                ) => {}
                _ => {
                    out.entry(e.correlation_id).or_default().insert(e.id);
                }
            }
        }
        out
    }

    #[test]
    fn terminal_replies_wait_for_room_instead_of_being_dropped() {
        let t0 = Instant::now();
        let cfg = SessionConfig {
            ping_interval: Duration::ZERO,
            stale_after_pings: 3,
            outbox_bytes: 300_000,
        };
        let mut s = Session::new(cfg, 42, AgentReady::default(), t0);
        // Twelve commands whose collected output nearly fills a frame, to a host that does
        // not read while they run.
        for id in 1..=12 {
            s.receive(&frame(id, collected_exec(30_000)), t0);
        }
        let mut out = Vec::new();
        let mut ran = HashSet::new();
        for _ in 0..100 {
            let mut running = Vec::new();
            while let Some(req) = s.next_request(t0) {
                assert!(ran.insert(req.id), "request {} ran twice", req.id);
                running.push(req.id);
            }
            for id in running {
                let _ = s.reply(id, exec_exit(30_000));
            }
            out.extend(sent(&mut s));
        }
        let acked: HashSet<u64> = out
            .iter()
            .filter(|e| matches!(e.payload, Some(Payload::Ack(_))))
            .map(|e| e.correlation_id)
            .collect();
        assert_eq!(acked, (1..=12).collect());
        let terms = terminals(&out);
        for id in 1..=12 {
            assert_eq!(
                terms.get(&id).map(HashSet::len),
                Some(1),
                "request {id}: one terminal reply"
            );
        }
    }

    #[test]
    fn pong_waits_for_room_rather_than_being_dropped() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&frame(7, Payload::FileReadRequest(Default::default())), t0);
        let req = s.next_request(t0).unwrap();
        fill_lane(&mut s, req.id);
        s.receive(&frame(8, Payload::Ping(Ping { seq: 5 })), t0);
        let mut out = Vec::new();
        for _ in 0..100 {
            s.next_request(t0);
            out.extend(sent(&mut s));
        }
        assert!(out
            .iter()
            .any(|e| e.payload == Some(Payload::Pong(Pong { seq: 5 }))));
    }

    #[test]
    fn cached_reply_of_a_redelivery_waits_for_room_rather_than_being_dropped() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&frame(7, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        let req = s.next_request(t0).unwrap();
        s.reply(req.id, Payload::Done(Default::default())).unwrap();
        s.receive(&frame(9, Payload::FileReadRequest(Default::default())), t0);
        let reader = s.next_request(t0).unwrap();
        let mut out = sent(&mut s);
        fill_lane(&mut s, reader.id);
        s.receive(&frame(7, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        for _ in 0..100 {
            assert_eq!(s.next_request(t0), None);
            out.extend(sent(&mut s));
        }
        let dones = out
            .iter()
            .filter(|e| e.correlation_id == 7 && matches!(e.payload, Some(Payload::Done(_))))
            .count();
        assert_eq!(
            dones, 2,
            "the reply, then the same reply for the redelivery"
        );
    }

    #[test]
    fn hosts_alternating_on_one_port_never_rerun_a_request() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&frame(1, hello(100)), t0);
        s.receive(&frame(7, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        let req = s.next_request(t0).unwrap();
        s.reply(req.id, Payload::Done(Default::default())).unwrap();
        let first = sent(&mut s);
        // An upgrade overlap: the new daemon says hello, then the old one again, which
        // redelivers the request it did not see answered.
        s.receive(&frame(1, hello(200)), t0);
        assert_eq!(s.next_request(t0), None);
        s.receive(&frame(2, hello(100)), t0);
        s.receive(&frame(7, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        assert_eq!(s.next_request(t0), None, "request 7 of host 100 ran twice");
        let again = sent(&mut s);
        let done = |envs: &[Envelope]| {
            envs.iter()
                .find(|e| e.correlation_id == 7 && matches!(e.payload, Some(Payload::Done(_))))
                .cloned()
        };
        assert_eq!(done(&again), done(&first));
        assert!(done(&first).is_some());
    }

    #[test]
    fn a_reply_larger_than_its_reservation_becomes_one_internal_error() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&frame(7, Payload::TimeGetRequest(TimeGetRequest {})), t0);
        let req = s.next_request(t0).unwrap();
        // A TimeGet reserves a small reply; this one is far larger.
        s.reply(req.id, exec_exit(20_000)).unwrap();
        let out = sent(&mut s);
        assert_eq!(kinds(&out), vec![("ack", 7), ("error", 7)]);
        match &out[1].payload {
            Some(Payload::Error(e)) => assert_eq!(e.code, ErrorCode::Internal as i32),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_that_only_finished_requests_could_make_room_for_gets_busy_at_once() {
        let t0 = Instant::now();
        let mut s = session(t0);
        // The smallest outbox admits one largest reply at a time.
        s.receive(&frame(1, Payload::LogsRequest(Default::default())), t0);
        assert!(s.next_request(t0).is_some());
        s.receive(&frame(2, Payload::LogsRequest(Default::default())), t0);
        s.receive(&frame(3, Payload::Ping(Ping { seq: 3 })), t0);
        assert_eq!(s.next_request(t0), None);
        assert!(!s.is_holding(), "the ping behind it waits");
        let out = sent(&mut s);
        assert_eq!(
            kinds(&out),
            vec![("ack", 1), ("ack", 2), ("error", 2), ("pong", 3)]
        );
        // The refusal is request 2's one terminal reply: a redelivery gets it again.
        s.receive(&frame(2, Payload::LogsRequest(Default::default())), t0);
        assert_eq!(s.next_request(t0), None);
        let again = sent(&mut s);
        assert_eq!(again[1], out[2]);
    }

    /// The invariant of admission control, over random interleavings.
    mod admission {
        use super::*;
        use proptest::prelude::*;

        const OUTBOX_BYTES: usize = 300_000;
        const HOSTS: [u64; 2] = [100, 200];

        #[derive(Debug, Clone)]
        enum Op {
            /// The connected host sends request `n` (a redelivery when it sent `n` before).
            Request {
                n: u64,
                kind: u8,
                cap: u32,
            },
            /// A running request ends; its reply size is `per_mille` of its maximum.
            Finish {
                pick: usize,
                per_mille: u32,
            },
            /// A streaming request queues an output item if the outbox has room.
            Stream {
                pick: usize,
            },
            Stall,
            Resume,
            /// The host reads up to `bytes`.
            Read {
                bytes: usize,
            },
            /// The link goes down and comes up with host `host`'s hello.
            Reconnect {
                host: usize,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (1..40u64, 0..3u8, 1..30_721u32)
                    .prop_map(|(n, kind, cap)| Op::Request { n, kind, cap }),
                3 => (any::<usize>(), 0..=1000u32)
                    .prop_map(|(pick, per_mille)| Op::Finish { pick, per_mille }),
                1 => any::<usize>().prop_map(|pick| Op::Stream { pick }),
                1 => Just(Op::Stall),
                1 => Just(Op::Resume),
                2 => (1..200_000usize).prop_map(|bytes| Op::Read { bytes }),
                1 => (0..2usize).prop_map(|host| Op::Reconnect { host }),
            ]
        }

        /// A host that takes `budget` more bytes, then blocks.
        struct Host {
            data: Vec<u8>,
            budget: usize,
        }

        impl std::io::Write for Host {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if self.budget == 0 {
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                let n = buf.len().min(self.budget);
                self.budget -= n;
                self.data.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        struct Harness {
            s: Session,
            now: Instant,
            host: usize,
            stalled: bool,
            wire: Host,
            /// Requests the session returned to run: (id, kind, cap), in order.
            running: Vec<(u64, u8, u32)>,
            ran: HashSet<u64>,
            /// What each id of each host asks for (a redelivery repeats it).
            sent: HashMap<u64, (u8, u32)>,
        }

        impl Harness {
            fn new() -> Self {
                let now = Instant::now();
                let cfg = SessionConfig {
                    ping_interval: Duration::ZERO,
                    stale_after_pings: 3,
                    outbox_bytes: OUTBOX_BYTES,
                };
                let mut h = Harness {
                    s: Session::new(cfg, 42, AgentReady::default(), now),
                    now,
                    host: 0,
                    stalled: false,
                    wire: Host {
                        data: Vec::new(),
                        budget: 0,
                    },
                    running: Vec::new(),
                    ran: HashSet::new(),
                    sent: HashMap::new(),
                };
                h.s.transition(LinkEvent::Up, now);
                h.s.receive(&frame(1, hello(HOSTS[0])), now);
                h
            }

            fn request(kind: u8, cap: u32) -> Payload {
                match kind {
                    0 => Payload::TimeGetRequest(TimeGetRequest {}),
                    1 => collected_exec(cap),
                    _ => Payload::LogsRequest(Default::default()),
                }
            }

            fn reply(kind: u8, cap: u32, per_mille: u32) -> Payload {
                match kind {
                    0 => Payload::Done(Default::default()),
                    1 => {
                        let max = cap.min(30 * 1024) as usize;
                        exec_exit(max * per_mille as usize / 1000)
                    }
                    _ => {
                        let len = 60_000 * per_mille as usize / 1000;
                        Payload::AgentLogs(AgentLogs {
                            lines: vec![LogLine {
                                message: "l".repeat(len),
                                ..Default::default()
                            }],
                            dropped: 0,
                        })
                    }
                }
            }

            fn pump(&mut self) {
                while let Some(req) = self.s.next_request(self.now) {
                    assert!(self.ran.insert(req.id), "request {} ran twice", req.id);
                    let (kind, cap) = self.sent[&req.id];
                    self.running.push((req.id, kind, cap));
                }
            }

            fn flush(&mut self) {
                if !self.stalled {
                    self.s.outbox_mut().flush(&mut self.wire).unwrap();
                }
            }

            fn apply(&mut self, op: Op) {
                match op {
                    Op::Request { n, kind, cap } => {
                        let id = (self.host as u64 + 1) * 1000 + n;
                        let (kind, cap) = *self.sent.entry(id).or_insert((kind, cap));
                        self.s
                            .receive(&frame(id, Self::request(kind, cap)), self.now);
                    }
                    Op::Finish { pick, per_mille } => {
                        if !self.running.is_empty() {
                            let (id, kind, cap) = self.running.remove(pick % self.running.len());
                            let _ = self.s.reply(id, Self::reply(kind, cap, per_mille));
                        }
                    }
                    Op::Stream { pick } => {
                        if !self.running.is_empty() && self.s.outbox().room() >= 2 * 8192 {
                            let (id, _, _) = self.running[pick % self.running.len()];
                            let item = Payload::FileChunk(FileChunk {
                                offset: 0,
                                data: vec![1; 8000],
                            });
                            self.s.stream(id, item).unwrap();
                        }
                    }
                    Op::Stall => self.stalled = true,
                    Op::Resume => self.stalled = false,
                    Op::Read { bytes } => {
                        self.wire.budget += bytes;
                        self.flush();
                    }
                    Op::Reconnect { host } => {
                        self.s.transition(LinkEvent::Down, self.now);
                        self.s.transition(LinkEvent::Up, self.now);
                        self.host = host;
                        self.s.receive(&frame(1, hello(HOSTS[host])), self.now);
                    }
                }
                self.pump();
                let bound = OUTBOX_BYTES + 4 * crate::outbox::MAX_FRAME_TOTAL_BYTES;
                assert!(self.s.outbox().pending_bytes() <= bound);
            }

            /// The host reads everything, every request ends, and the host redelivers what
            /// it never saw acked.
            fn settle(&mut self) -> Vec<Envelope> {
                self.stalled = false;
                for _ in 0..200 {
                    self.pump();
                    while let Some((id, kind, cap)) = self.running.pop() {
                        let _ = self.s.reply(id, Self::reply(kind, cap, 1000));
                    }
                    self.wire.budget = usize::MAX / 2;
                    self.flush();
                }
                let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
                dec.push(&self.wire.data);
                let mut out = Vec::new();
                loop {
                    match dec.decode() {
                        Ok(Some(p)) => out.push(decode_envelope(p).unwrap()),
                        Ok(None) => break,
                        Err(_) => {}
                    }
                }
                out
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn every_acked_request_gets_exactly_one_terminal_reply(
                ops in proptest::collection::vec(op(), 1..120)
            ) {
                let mut h = Harness::new();
                for op in ops {
                    h.apply(op);
                }
                // The current host redelivers every request of its own it never saw acked.
                let mut out = h.settle();
                let acked: HashSet<u64> = out
                    .iter()
                    .filter(|e| matches!(e.payload, Some(Payload::Ack(_))))
                    .map(|e| e.correlation_id)
                    .collect();
                let base = (h.host as u64 + 1) * 1000;
                let unacked: Vec<u64> = h
                    .sent
                    .keys()
                    .copied()
                    .filter(|id| *id / 1000 * 1000 == base && !acked.contains(id))
                    .collect();
                for id in unacked {
                    let (kind, cap) = h.sent[&id];
                    h.s.receive(&frame(id, Harness::request(kind, cap)), h.now);
                }
                out = h.settle();
                let acked: HashSet<u64> = out
                    .iter()
                    .filter(|e| matches!(e.payload, Some(Payload::Ack(_))))
                    .map(|e| e.correlation_id)
                    .collect();
                for id in h.sent.keys().filter(|id| *id / 1000 * 1000 == base) {
                    prop_assert!(acked.contains(id), "request {} never acked", id);
                }
                let terms = terminals(&out);
                for id in &acked {
                    prop_assert_eq!(
                        terms.get(id).map(HashSet::len),
                        Some(1),
                        "request {}: one terminal reply", id
                    );
                }
                for id in &h.ran {
                    prop_assert!(terms.contains_key(id), "request {} ran without a reply", id);
                }
            }
        }
    }

    #[test]
    fn rate_limiter_allows_a_burst_per_window() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(3, Duration::from_secs(1));
        let allowed = (0..10).filter(|_| rl.allow(t0)).count();
        assert_eq!(allowed, 3);
        assert!(rl.allow(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn random_session_ids_are_non_zero_and_differ() {
        let a = random_session_id();
        let b = random_session_id();
        assert_ne!(a, 0);
        assert_ne!(a, b);
    }
}
