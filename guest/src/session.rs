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

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use prost::Message;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{Ack, AgentReady, Envelope, Error as WireError, ErrorCode, Ping, Pong};
use qx_proto::{decode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION};
use qx_proto::{envelope_payload_name as payload_name_env, payload_name};

use crate::outbox::{Outbox, OutboxError};

/// Terminal replies remembered for redelivered ids.
pub const REPLY_CACHE_ENTRIES: usize = 64;
/// Bytes of terminal replies remembered (collected exec output can be large).
pub const REPLY_CACHE_BYTES: usize = 1024 * 1024;
/// Request ids remembered after their reply left the cache.
pub const SEEN_IDS: usize = 4096;

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

/// Terminal replies by request id, bounded by entries and bytes.
#[derive(Debug, Default)]
struct ReplyCache {
    entries: VecDeque<(u64, Envelope, usize)>,
    bytes: usize,
    seen: HashSet<u64>,
    seen_order: VecDeque<u64>,
}

impl ReplyCache {
    fn get(&self, id: u64) -> Option<&Envelope> {
        self.entries
            .iter()
            .find(|(i, _, _)| *i == id)
            .map(|(_, e, _)| e)
    }

    fn seen(&self, id: u64) -> bool {
        self.seen.contains(&id)
    }

    fn mark_seen(&mut self, id: u64) {
        if self.seen.insert(id) {
            self.seen_order.push_back(id);
            while self.seen_order.len() > SEEN_IDS {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    fn insert(&mut self, id: u64, env: Envelope) {
        let size = env.encoded_len();
        self.entries.push_back((id, env, size));
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
    running: HashSet<u64>,
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
            running: HashSet::new(),
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
                self.decoder.reset();
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
    /// request (already acked), or `None` when the buffered bytes hold no more.
    pub fn next_request(&mut self, now: Instant) -> Option<Request> {
        loop {
            let env = match self.decoder.decode() {
                Ok(None) => return None,
                Err(e) => {
                    self.stats.bad_frames += 1;
                    if self.noisy.allow(now) {
                        debug!("input skipped: {e}");
                    }
                    continue;
                }
                Ok(Some(payload)) => match decode_envelope(payload) {
                    Ok(env) => env,
                    Err(e) => {
                        self.stats.bad_envelopes += 1;
                        if self.noisy.allow(now) {
                            warn!("undecodable envelope skipped: {e}");
                        }
                        continue;
                    }
                },
            };
            if let Some(req) = self.on_envelope(env, now) {
                return Some(req);
            }
        }
    }

    fn on_envelope(&mut self, env: Envelope, now: Instant) -> Option<Request> {
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
                    // A restarted host numbers its requests afresh: replies cached for the
                    // old host's ids must not answer the new host's requests.
                    if self.host_session_id != 0 {
                        self.host_changed = true;
                    }
                    self.host_session_id = h.host_session_id;
                    self.cache = ReplyCache::default();
                }
                self.announce(id, now);
                return None;
            }
            Some(Payload::Ping(p)) => {
                self.send(id, Payload::Pong(Pong { seq: p.seq }));
                return None;
            }
            Some(Payload::Pong(_)) => return None,
            Some(p @ (Payload::Ack(_) | Payload::Error(_) | Payload::Done(_))) if id == 0 => {
                if self.noisy.allow(now) {
                    debug!("ignored {} from host", payload_name(&p));
                }
                return None;
            }
            Some(p) => p,
            None => {
                if id != 0 {
                    self.send(
                        id,
                        Payload::Error(WireError {
                            code: ErrorCode::InvalidArgument as i32,
                            message: "envelope carries no payload".into(),
                        }),
                    );
                }
                return None;
            }
        };
        if id == 0 {
            if self.noisy.allow(now) {
                warn!("{} with request id 0 ignored", payload_name(&payload));
            }
            return None;
        }
        if let Some(cached) = self.cache.get(id).cloned() {
            self.stats.redelivered += 1;
            self.ack(id);
            let _ = self.push(&cached);
            return None;
        }
        if self.running.contains(&id) {
            self.stats.redelivered += 1;
            self.ack(id);
            return None;
        }
        if self.cache.seen(id) {
            self.stats.redelivered += 1;
            self.ack(id);
            self.send(
                id,
                Payload::Error(WireError {
                    code: ErrorCode::FailedPrecondition as i32,
                    message: "request already ran; its reply is no longer cached".into(),
                }),
            );
            return None;
        }
        self.stats.requests += 1;
        self.cache.mark_seen(id);
        self.running.insert(id);
        self.ack(id);
        Some(Request { id, payload })
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

    fn push(&mut self, env: &Envelope) -> Result<(), OutboxError> {
        let res = self.outbox.push_reply(env);
        if let Err(e) = &res {
            if self.noisy.allow(Instant::now()) {
                warn!("{} not sent: {e}", payload_name_env(env));
            }
        }
        res
    }

    /// Queues a non-terminal message (pong, hello, ack) for `correlation_id`.
    fn send(&mut self, correlation_id: u64, payload: Payload) {
        let env = self.envelope(correlation_id, payload);
        let _ = self.push(&env);
    }

    fn ack(&mut self, id: u64) {
        self.send(id, Payload::Ack(Ack {}));
    }

    fn ping(&mut self, _now: Instant) {
        self.ping_seq += 1;
        self.stats.pings_sent += 1;
        let seq = self.ping_seq;
        self.send(0, Payload::Ping(Ping { seq }));
    }

    fn announce(&mut self, correlation_id: u64, now: Instant) {
        let mut ready = self.ready.clone();
        ready.protocol_version = PROTOCOL_VERSION;
        ready.session_id = self.session_id;
        ready.agent_uptime_ms = now.duration_since(self.started).as_millis() as u64;
        ready.guest_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        // Ahead of queued replies: the new host learns who it talks to first.
        let env = self.envelope(correlation_id, Payload::AgentReady(ready));
        let _ = self.outbox.push_urgent(&env);
    }

    /// Queues a stream item (ExecOutput, FileChunk) of request `id`.
    pub fn stream(&mut self, id: u64, payload: Payload) -> Result<(), OutboxError> {
        let env = self.envelope(id, payload);
        self.push(&env)
    }

    /// Queues the terminal reply of request `id` and remembers it for redeliveries. The reply
    /// is cached even if the outbox refuses it, so a redelivery still gets it.
    pub fn reply(&mut self, id: u64, payload: Payload) -> Result<(), OutboxError> {
        let env = self.envelope(id, payload);
        self.running.remove(&id);
        let res = self.push(&env);
        self.cache.insert(id, env);
        res
    }

    /// Terminal `Error` for request `id`.
    pub fn error(&mut self, id: u64, code: ErrorCode, message: impl Into<String>) {
        let _ = self.reply(
            id,
            Payload::Error(WireError {
                code: code as i32,
                message: message.into(),
            }),
        );
    }

    /// Pushes unsolicited telemetry into the coalescing slot.
    pub fn push_telemetry(&mut self, t: qx_proto::agent::Telemetry) {
        let env = self.envelope(0, Payload::Telemetry(t));
        let _ = self.outbox.push_telemetry(&env);
    }
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
    use qx_proto::agent::{ExecRequest, HostHello, TimeGetRequest};
    use qx_proto::encode_envelope;

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
        assert_eq!(ids, vec![42, 42]);
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
