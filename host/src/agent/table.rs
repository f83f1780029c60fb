//! The pending-command table of one VM's agent link: a sans-io state machine.
//!
//! Primer. The host writes requests to the agent as whole frames; the agent acknowledges each
//! one (`Ack`), may stream items for it (`ExecOutput`, `FileChunk`), and ends it with one
//! terminal reply (or `Error`). Connections come and go under an agent *session*: within one
//! session the agent answers a repeated request id from its reply cache and never runs it
//! twice, so a command written on a connection that dropped is written again, with the same
//! id, on the next connection of the same session. A new session id means the agent
//! restarted: whatever it had been given is lost.
//!
//! This table holds every command of one VM from submission to its end, and nothing else: no
//! socket, no task, no clock. The link feeds it what happened ([`Table::handle_event`]) and the
//! time ([`Table::handle_timeout`]), asks it what to write next ([`Table::poll_transmit`]),
//! what the callers should learn ([`Table::poll`]), and when to wake it ([`Table::poll_timeout`]).
//! The shape is that of quinn-proto's `Connection`.
//!
//! A command's [`State`] is where it is now; whether its frame ever went out whole, and to which
//! agent session, is kept apart (`written`), because that alone decides what a caller learns
//! after a drop: never written (it did not run, it stays queued), written (it may have run: it
//! is redelivered on the same session, or fails saying whether it ran is unknown), or the real
//! result. Every transition happens in [`Table::handle_event`], [`Table::handle_timeout`] and
//! [`Table::poll_transmit`]; docs/architecture.md draws them.

use crate::error::AgentError;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{Cancel, Envelope, ErrorCode};
use qx_proto::{encode_envelope, envelope_payload_name as payload_name};
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use qx_proto::MAX_SENT_PAYLOAD_BYTES;

/// Which commands are written again, with the same id, on the next connection after a drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Redelivered on every later connection of the same agent session, until it ends or its
    /// deadline passes: the agent's reply cache makes a repeated id harmless. After an agent
    /// restart it fails "agent restarted".
    SameSession,
    /// Streams: their items may have been lost with the connection, so a drop after the frame
    /// was written fails the command ("connection lost"); the caller resumes or retries.
    Never,
}

/// Per-command options.
#[derive(Debug, Clone, Copy)]
pub struct CommandOptions {
    /// From submission (or from the moment an agent slot freed for it) to the agent's Ack.
    /// Pings, answered by a Pong alone, pass their whole timeout here.
    pub ack_timeout: Duration,
    /// From submission to the terminal reply; `None`: no limit once acknowledged.
    pub timeout: Option<Duration>,
    pub redelivery: Redelivery,
}

/// How far a command got, for messages and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// No byte of it is on the socket.
    Queued,
    /// The writer took it and is writing its frame.
    Writing,
    /// Every byte of its frame was flushed to the socket.
    Written,
    /// The agent acknowledged it (parsed it and will run it).
    Acknowledged,
}

impl Stage {
    /// Past-tense description for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Writing => "being written",
            Stage::Written => "written",
            Stage::Acknowledged => "acknowledged",
        }
    }
}

/// Where a command is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the writer: never written, or queued again for redelivery on this
    /// connection (then `written` is set).
    Queued,
    /// The writer of connection `conn` holds its frame.
    Writing { conn: u64 },
    /// Every byte went out on connection `conn`.
    Written { conn: u64 },
    /// The agent acknowledged it on connection `conn`.
    Acknowledged { conn: u64 },
    /// Written on a connection that dropped: waits for the next AgentReady of its session.
    AwaitingRedelivery,
}

/// The link's connection, as far as the table needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conn {
    /// No connection.
    Down,
    /// Connected, no AgentReady yet: nothing but the hello may be written.
    Handshaking { conn: u64 },
    /// AgentReady of `session` seen on `conn`: commands may be written.
    Open { conn: u64, session: u64 },
}

/// What happened, fed to [`Table::handle_event`].
#[derive(Debug)]
pub enum Event {
    /// Connection `conn` opened (preamble and hello are the link's business).
    Connected { conn: u64 },
    /// The agent announced `session` on `conn`, with its limit on concurrent execs (0: none).
    Ready {
        conn: u64,
        session: u64,
        max_concurrent_exec: u32,
    },
    /// Every byte of command `id`'s frame was flushed on `conn`.
    Flushed { conn: u64, id: u64 },
    /// Connection `conn` ended.
    Disconnected { conn: u64 },
    /// The agent acknowledged `id`.
    Ack { id: u64 },
    /// A stream item for `id`.
    Item { id: u64, payload: Payload },
    /// The terminal reply to `id`.
    Reply { id: u64, payload: Payload },
    /// The agent refused or failed `id`.
    Refused {
        id: u64,
        code: ErrorCode,
        message: String,
    },
    /// The caller of `id` went away.
    Abandoned { id: u64 },
    /// The caller of `id` reads its stream too slowly; the command is cancelled.
    TooSlow { id: u64 },
    /// The link is going away (detached): every command fails.
    Detached,
    /// The VM was reverted to a snapshot: every command fails.
    Reverted,
}

/// What a caller should learn, from [`Table::poll`].
#[derive(Debug)]
pub enum Output {
    Item {
        id: u64,
        payload: Payload,
    },
    Done {
        id: u64,
        result: Result<Payload, AgentError>,
    },
    /// The agent's session changed; `failed` commands ended "agent restarted".
    AgentRestarted {
        old_session: u64,
        new_session: u64,
        failed: usize,
    },
}

/// A whole frame for the writer.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// The command it belongs to; 0 for untracked frames (cancels).
    pub id: u64,
    pub kind: &'static str,
    pub frame: Arc<Vec<u8>>,
}

/// Command counters across the link's life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageCounts {
    pub queued: u64,
    pub written: u64,
    pub acknowledged: u64,
    pub completed: u64,
    pub failed_not_written: u64,
    pub failed_not_acknowledged: u64,
    pub failed_ack_timeout: u64,
    pub failed_connection_lost: u64,
    pub failed_agent_error: u64,
    pub redelivered: u64,
    /// Answers naming a command that was never written, or no command at all.
    pub ignored_answers: u64,
}

/// Limits of the table.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// `vm <id>` in messages.
    pub vm_id: String,
    /// Named in "not connected to ..." messages.
    pub socket: String,
    /// Commands never written yet, waiting for the writer.
    pub queue_capacity: usize,
    /// Commands not yet finished.
    pub max_in_flight: usize,
}

#[derive(Debug)]
struct Entry {
    /// Submission order: the writer takes queued commands in this order, redeliveries included.
    seq: u64,
    kind: &'static str,
    frame: Arc<Vec<u8>>,
    opts: CommandOptions,
    state: State,
    /// The agent session its whole frame went out to, once it did.
    written: Option<u64>,
    acknowledged: bool,
    /// A connection dropped under it after it was written.
    connection_lost: bool,
    /// An exec: it takes one of the agent's exec slots from its first write to its end.
    exec: bool,
    holds_slot: bool,
    /// Skipped by the writer because every agent exec slot was taken; its ack clock restarts
    /// when it is written.
    waiting_for_slot: bool,
    submitted: Instant,
    ack_from: Instant,
}

impl Entry {
    fn stage(&self) -> Stage {
        if self.acknowledged {
            Stage::Acknowledged
        } else if self.written.is_some() {
            Stage::Written
        } else if matches!(self.state, State::Writing { .. }) {
            Stage::Writing
        } else {
            Stage::Queued
        }
    }

    /// Whether an answer naming this command can be genuine: only one whose frame went out.
    fn answerable(&self) -> bool {
        self.written.is_some() || matches!(self.state, State::Writing { .. })
    }

    fn deadline(&self) -> Option<Instant> {
        let overall = self.opts.timeout.map(|t| self.submitted + t);
        if self.acknowledged || self.waiting_for_slot {
            return overall;
        }
        let ack = self.ack_from + self.opts.ack_timeout;
        Some(overall.map_or(ack, |o| o.min(ack)))
    }
}

/// Every command of one VM that has not ended. See the module doc.
#[derive(Debug)]
pub struct Table {
    cfg: TableConfig,
    entries: HashMap<u64, Entry>,
    /// Queued commands by submission order (first writes and redeliveries alike).
    queue: BTreeMap<u64, u64>,
    /// Untracked frames (cancels), written before queued commands.
    control: VecDeque<Transmit>,
    outputs: VecDeque<Output>,
    conn: Conn,
    /// The agent session last announced on any connection.
    session: Option<u64>,
    max_concurrent_exec: u32,
    execs_out: u32,
    next_seq: u64,
    /// Keys the request ids: unpredictable to the guest, private to this VM.
    id_key: RandomState,
    id_counter: u64,
    last_error: String,
    counts: StageCounts,
}

pub(crate) fn encode(env: &Envelope) -> Result<Vec<u8>, AgentError> {
    let mut out = Vec::new();
    encode_envelope(env, MAX_SENT_PAYLOAD_BYTES, &mut out).map_err(|e| {
        AgentError::InvalidArgument(format!("{} request cannot be sent: {e}", payload_name(env)))
    })?;
    Ok(out)
}

impl Table {
    pub fn new(cfg: TableConfig) -> Table {
        Table {
            cfg,
            entries: HashMap::new(),
            queue: BTreeMap::new(),
            control: VecDeque::new(),
            outputs: VecDeque::new(),
            conn: Conn::Down,
            session: None,
            max_concurrent_exec: 0,
            execs_out: 0,
            next_seq: 0,
            id_key: RandomState::new(),
            id_counter: 0,
            last_error: String::new(),
            counts: StageCounts::default(),
        }
    }

    /// A fresh request id: non-zero, below 2^63, not in use, and not guessable from the ids
    /// the guest has seen (a keyed hash of a counter, the key private to this VM's table).
    pub fn next_id(&mut self) -> u64 {
        loop {
            self.id_counter += 1;
            let id = self.id_key.hash_one(self.id_counter) >> 1;
            if id != 0 && !self.entries.contains_key(&id) {
                return id;
            }
        }
    }

    /// Queues `payload` as a new command. Fails at once with `QueueFull` when the queue or
    /// the table is full; a command beyond the agent's exec limit waits in the queue.
    pub fn submit(
        &mut self,
        payload: Payload,
        opts: CommandOptions,
        now: Instant,
    ) -> Result<(u64, &'static str), AgentError> {
        if self.entries.len() >= self.cfg.max_in_flight {
            return Err(AgentError::QueueFull {
                vm_id: self.cfg.vm_id.clone(),
                capacity: self.cfg.max_in_flight,
            });
        }
        let fresh = self
            .queue
            .values()
            .filter(|id| self.entries.get(id).is_some_and(|e| e.written.is_none()))
            .count();
        if fresh >= self.cfg.queue_capacity {
            return Err(AgentError::QueueFull {
                vm_id: self.cfg.vm_id.clone(),
                capacity: self.cfg.queue_capacity,
            });
        }
        let id = self.next_id();
        let exec = matches!(payload, Payload::ExecRequest(_));
        let mut env = Envelope {
            id,
            correlation_id: 0,
            payload: Some(payload),
        };
        if let Some(Payload::Ping(p)) = &mut env.payload {
            // A tracked ping's seq is its request id, so its Pong finds it.
            p.seq = id;
        }
        let kind = payload_name(&env);
        let frame = Arc::new(encode(&env)?);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            id,
            Entry {
                seq,
                kind,
                frame,
                opts,
                state: State::Queued,
                written: None,
                acknowledged: false,
                connection_lost: false,
                exec,
                holds_slot: false,
                waiting_for_slot: false,
                submitted: now,
                ack_from: now,
            },
        );
        self.queue.insert(seq, id);
        self.counts.queued += 1;
        Ok((id, kind))
    }

    /// An untracked frame nobody waits for (cancel, kill). Best effort: a full queue drops it.
    pub fn send_untracked(&mut self, payload: Payload) {
        if self.control.len() >= self.cfg.queue_capacity {
            return;
        }
        let env = Envelope {
            id: self.next_id(),
            correlation_id: 0,
            payload: Some(payload),
        };
        let kind = payload_name(&env);
        if let Ok(frame) = encode(&env) {
            self.control.push_back(Transmit {
                id: 0,
                kind,
                frame: Arc::new(frame),
            });
        }
    }

    /// The next frame for the writer of `conn`, marking its command `Writing`. Nothing until
    /// the agent said AgentReady on `conn`. Queued commands go in submission order; an exec
    /// that would exceed the agent's exec limit is passed over (it keeps its place) until a
    /// slot frees.
    pub fn poll_transmit(&mut self, conn: u64, now: Instant) -> Option<Transmit> {
        let Conn::Open { conn: open, .. } = self.conn else {
            return None;
        };
        if open != conn {
            return None;
        }
        if let Some(t) = self.control.pop_front() {
            return Some(t);
        }
        let limit = self.max_concurrent_exec;
        let mut picked = None;
        for (&seq, id) in &self.queue {
            let Some(e) = self.entries.get_mut(id) else {
                continue;
            };
            if e.exec && !e.holds_slot && limit > 0 && self.execs_out >= limit {
                if !e.waiting_for_slot {
                    e.waiting_for_slot = true;
                }
                continue;
            }
            picked = Some((seq, *id));
            break;
        }
        let (seq, id) = picked?;
        self.queue.remove(&seq);
        let e = self.entries.get_mut(&id)?;
        if e.waiting_for_slot {
            e.waiting_for_slot = false;
            e.ack_from = now;
        }
        if e.exec && !e.holds_slot {
            e.holds_slot = true;
            self.execs_out += 1;
        }
        e.state = State::Writing { conn };
        Some(Transmit {
            id,
            kind: e.kind,
            frame: e.frame.clone(),
        })
    }

    /// The next thing a caller should learn.
    pub fn poll(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The earliest command deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.entries.values().filter_map(Entry::deadline).min()
    }

    /// Fails every command whose deadline is at or before `now`, naming the stage it reached.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.deadline().is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(e) = self.remove(id) else { continue };
            let waited_ms = now.saturating_duration_since(e.submitted).as_millis() as u64;
            let vm_id = self.cfg.vm_id.clone();
            let kind = e.kind;
            let err = match e.stage() {
                Stage::Queued => {
                    self.counts.failed_not_written += 1;
                    let why = if e.waiting_for_slot {
                        format!(
                            "all {} exec slots the agent announced stayed busy",
                            self.max_concurrent_exec
                        )
                    } else {
                        self.not_written_reason()
                    };
                    AgentError::NotWritten {
                        vm_id,
                        id,
                        kind,
                        waited_ms,
                        why,
                    }
                }
                Stage::Writing | Stage::Written => {
                    self.counts.failed_not_acknowledged += 1;
                    AgentError::NotAcknowledged {
                        vm_id,
                        id,
                        kind,
                        waited_ms,
                        connection_lost: e.connection_lost,
                    }
                }
                Stage::Acknowledged => {
                    self.counts.failed_ack_timeout += 1;
                    AgentError::AckTimeout {
                        vm_id,
                        id,
                        kind,
                        waited_ms,
                        connection_lost: e.connection_lost,
                    }
                }
            };
            self.outputs.push_back(Output::Done {
                id,
                result: Err(err),
            });
        }
    }

    fn not_written_reason(&self) -> String {
        let last = if self.last_error.is_empty() {
            String::new()
        } else {
            format!("; last error: {}", self.last_error)
        };
        match self.conn {
            Conn::Open { .. } => format!("the writer did not reach it (queue busy){last}"),
            Conn::Handshaking { conn } => format!(
                "the agent has not answered HostHello on connection {conn} (is the agent running in the guest?){last}"
            ),
            Conn::Down => format!("not connected to {}{last}", self.cfg.socket),
        }
    }

    /// Every transition caused by something that happened.
    pub fn handle_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Connected { conn } => self.conn = Conn::Handshaking { conn },
            Event::Ready {
                conn,
                session,
                max_concurrent_exec,
            } => self.on_ready(conn, session, max_concurrent_exec),
            Event::Flushed { conn, id } => {
                self.counts.written += 1;
                let session = self.session;
                if let Some(e) = self.entries.get_mut(&id) {
                    if e.state == (State::Writing { conn }) {
                        e.state = if e.acknowledged {
                            State::Acknowledged { conn }
                        } else {
                            State::Written { conn }
                        };
                    }
                    e.written = e.written.or(session);
                }
            }
            Event::Disconnected { conn } => self.on_disconnected(conn),
            Event::Ack { id } => {
                if let Some(e) = self.answerable(id) {
                    if let State::Writing { conn } | State::Written { conn } = e.state {
                        e.state = State::Acknowledged { conn };
                    }
                    if !e.acknowledged {
                        e.acknowledged = true;
                        self.counts.acknowledged += 1;
                    }
                }
            }
            Event::Item { id, payload } => {
                if let Some(e) = self.answerable(id) {
                    e.acknowledged = true;
                    self.outputs.push_back(Output::Item { id, payload });
                }
            }
            Event::Reply { id, payload } => {
                if self.answerable(id).is_some() {
                    self.remove(id);
                    self.counts.completed += 1;
                    self.outputs.push_back(Output::Done {
                        id,
                        result: Ok(payload),
                    });
                }
            }
            Event::Refused { id, code, message } => {
                if let Some(e) = self.answerable(id) {
                    let kind = e.kind;
                    self.remove(id);
                    self.counts.failed_agent_error += 1;
                    let err = AgentError::Agent {
                        vm_id: self.cfg.vm_id.clone(),
                        id,
                        kind,
                        code,
                        message,
                    };
                    self.outputs.push_back(Output::Done {
                        id,
                        result: Err(err),
                    });
                }
            }
            Event::Abandoned { id } => {
                let Some(e) = self.remove(id) else { return };
                match e.stage() {
                    Stage::Queued => self.counts.failed_not_written += 1,
                    Stage::Writing | Stage::Written => self.counts.failed_not_acknowledged += 1,
                    Stage::Acknowledged => self.counts.failed_ack_timeout += 1,
                }
                if e.written.is_some() && e.opts.redelivery == Redelivery::Never {
                    self.send_untracked(Payload::Cancel(Cancel { target_id: id }));
                }
            }
            Event::TooSlow { id } => {
                let Some(e) = self.remove(id) else { return };
                self.counts.failed_agent_error += 1;
                let err = AgentError::SlowConsumer {
                    vm_id: self.cfg.vm_id.clone(),
                    id,
                    kind: e.kind,
                };
                self.outputs.push_back(Output::Done {
                    id,
                    result: Err(err),
                });
                self.send_untracked(Payload::Cancel(Cancel { target_id: id }));
            }
            Event::Detached | Event::Reverted => {
                let reverted = matches!(event, Event::Reverted);
                let ids: Vec<u64> = self.entries.keys().copied().collect();
                for id in ids {
                    let Some(e) = self.remove(id) else { continue };
                    let vm_id = self.cfg.vm_id.clone();
                    let err = if reverted {
                        self.counts.failed_connection_lost += 1;
                        AgentError::Reverted {
                            vm_id,
                            id,
                            kind: e.kind,
                            stage: e.stage().describe(),
                        }
                    } else {
                        AgentError::Detached {
                            vm_id,
                            id,
                            kind: e.kind,
                        }
                    };
                    self.outputs.push_back(Output::Done {
                        id,
                        result: Err(err),
                    });
                }
                self.control.clear();
                if reverted {
                    // The reverted guest runs another agent session's past: nothing of this
                    // one is redelivered, and the next AgentReady is not a restart.
                    self.session = None;
                }
            }
        }
        let _ = now;
    }

    fn on_ready(&mut self, conn: u64, session: u64, max_concurrent_exec: u32) {
        let old = self.session;
        self.conn = Conn::Open { conn, session };
        self.session = Some(session);
        self.max_concurrent_exec = max_concurrent_exec;
        let mut failed = 0;
        let mut ids: Vec<(u64, u64)> = self.entries.iter().map(|(id, e)| (e.seq, *id)).collect();
        ids.sort_unstable();
        for (seq, id) in ids {
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            match e.written {
                Some(s) if s != session => {
                    let (kind, stage) = (e.kind, e.stage().describe());
                    self.remove(id);
                    self.counts.failed_connection_lost += 1;
                    failed += 1;
                    self.outputs.push_back(Output::Done {
                        id,
                        result: Err(AgentError::AgentRestarted {
                            vm_id: self.cfg.vm_id.clone(),
                            id,
                            kind,
                            stage,
                            old_session: s,
                            new_session: session,
                        }),
                    });
                }
                Some(_) if e.state == State::AwaitingRedelivery => {
                    e.state = State::Queued;
                    self.queue.insert(seq, id);
                    self.counts.redelivered += 1;
                }
                _ => {}
            }
        }
        if let Some(old) = old.filter(|&s| s != session) {
            self.outputs.push_back(Output::AgentRestarted {
                old_session: old,
                new_session: session,
                failed,
            });
        }
    }

    fn on_disconnected(&mut self, conn: u64) {
        let current = match self.conn {
            Conn::Down => None,
            Conn::Handshaking { conn } | Conn::Open { conn, .. } => Some(conn),
        };
        if current == Some(conn) {
            self.conn = Conn::Down;
        }
        let ids: Vec<u64> = self.entries.keys().copied().collect();
        for id in ids {
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            let on_conn = match e.state {
                State::Writing { conn: c }
                | State::Written { conn: c }
                | State::Acknowledged { conn: c } => c == conn,
                State::Queued => e.written.is_some(),
                State::AwaitingRedelivery => false,
            };
            if !on_conn {
                continue;
            }
            if e.written.is_none() {
                // Its frame never went out whole: cut off by the drop, the next connection's
                // preamble makes it garbage in the guest. It did not run; write it again.
                e.state = State::Queued;
                self.queue.insert(e.seq, id);
                continue;
            }
            e.connection_lost = true;
            if let Some(seq) = (e.state == State::Queued).then_some(e.seq) {
                self.queue.remove(&seq);
            }
            match e.opts.redelivery {
                Redelivery::SameSession => e.state = State::AwaitingRedelivery,
                Redelivery::Never => {
                    let (kind, stage) = (e.kind, e.stage().describe());
                    self.remove(id);
                    self.counts.failed_connection_lost += 1;
                    self.outputs.push_back(Output::Done {
                        id,
                        result: Err(AgentError::ConnectionLost {
                            vm_id: self.cfg.vm_id.clone(),
                            id,
                            kind,
                            stage,
                            why: "streams are not redelivered",
                        }),
                    });
                }
            }
        }
    }

    fn answerable(&mut self, id: u64) -> Option<&mut Entry> {
        if !self.entries.get(&id).is_some_and(Entry::answerable) {
            self.counts.ignored_answers += 1;
            return None;
        }
        let session = self.session;
        let e = self.entries.get_mut(&id)?;
        // An answer proves the frame went out, even before the writer says so.
        e.written = e.written.or(session);
        Some(e)
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        if e.state == State::Queued {
            self.queue.remove(&e.seq);
        }
        if e.holds_slot {
            self.execs_out -= 1;
        }
        Some(e)
    }

    /// The link's last connection error, named when a command was never written.
    pub fn set_last_error(&mut self, e: String) {
        self.last_error = e;
    }

    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    pub fn stage(&self, id: u64) -> Option<Stage> {
        self.entries.get(&id).map(Entry::stage)
    }

    pub fn state(&self, id: u64) -> Option<State> {
        self.entries.get(&id).map(|e| e.state)
    }

    pub fn kind(&self, id: u64) -> Option<&'static str> {
        self.entries.get(&id).map(|e| e.kind)
    }

    /// Commands not yet ended.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn counts(&self) -> StageCounts {
        self.counts
    }

    pub fn session(&self) -> Option<u64> {
        self.session
    }

    pub fn conn(&self) -> Conn {
        self.conn
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use qx_proto::agent::{ExecRequest, FileReadRequest, TimeGetRequest, TimeInfo};

    const S1: u64 = 0x51;
    const S2: u64 = 0x52;
    const SEC: Duration = Duration::from_secs(1);

    fn table() -> Table {
        Table::new(TableConfig {
            vm_id: "vm".into(),
            socket: "/run/vm.agent.sock".into(),
            queue_capacity: 8,
            max_in_flight: 16,
        })
    }

    fn opts(redelivery: Redelivery) -> CommandOptions {
        CommandOptions {
            ack_timeout: 5 * SEC,
            timeout: Some(30 * SEC),
            redelivery,
        }
    }

    fn time_req() -> Payload {
        Payload::TimeGetRequest(TimeGetRequest {})
    }

    fn exec() -> Payload {
        Payload::ExecRequest(ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        })
    }

    fn read() -> Payload {
        Payload::FileReadRequest(FileReadRequest::default())
    }

    fn submit(t: &mut Table, p: Payload, red: Redelivery, now: Instant) -> u64 {
        t.submit(p, opts(red), now).unwrap().0
    }

    fn open(t: &mut Table, conn: u64, session: u64, max_exec: u32, now: Instant) {
        t.handle_event(Event::Connected { conn }, now);
        t.handle_event(
            Event::Ready {
                conn,
                session,
                max_concurrent_exec: max_exec,
            },
            now,
        );
    }

    /// Writes whatever the table gives the writer of `conn`, whole; the tracked ids in order.
    fn write_all(t: &mut Table, conn: u64, now: Instant) -> Vec<u64> {
        let mut ids = Vec::new();
        while let Some(tx) = t.poll_transmit(conn, now) {
            if tx.id != 0 {
                t.handle_event(Event::Flushed { conn, id: tx.id }, now);
                ids.push(tx.id);
            }
        }
        ids
    }

    fn results(t: &mut Table) -> Vec<(u64, Result<Payload, AgentError>)> {
        let mut v = Vec::new();
        while let Some(o) = t.poll() {
            if let Output::Done { id, result } = o {
                v.push((id, result));
            }
        }
        v
    }

    fn reply() -> Payload {
        Payload::TimeInfo(TimeInfo {
            unix_ns: 7,
            ..Default::default()
        })
    }

    #[test]
    fn command_goes_queued_writing_written_acknowledged_completed() {
        let mut t = table();
        let t0 = Instant::now();
        let id = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        assert_eq!(t.state(id), Some(State::Queued));
        assert!(
            t.poll_transmit(1, t0).is_none(),
            "nothing before a connection"
        );
        t.handle_event(Event::Connected { conn: 1 }, t0);
        assert!(
            t.poll_transmit(1, t0).is_none(),
            "nothing before AgentReady"
        );
        t.handle_event(
            Event::Ready {
                conn: 1,
                session: S1,
                max_concurrent_exec: 0,
            },
            t0,
        );
        assert!(
            t.poll_transmit(2, t0).is_none(),
            "not for another connection"
        );
        let tx = t.poll_transmit(1, t0).unwrap();
        assert_eq!(tx.id, id);
        assert_eq!(tx.kind, "time_get_request");
        assert_eq!(t.state(id), Some(State::Writing { conn: 1 }));
        assert_eq!(t.stage(id), Some(Stage::Writing));
        t.handle_event(Event::Flushed { conn: 1, id }, t0);
        assert_eq!(t.state(id), Some(State::Written { conn: 1 }));
        t.handle_event(Event::Ack { id }, t0);
        assert_eq!(t.state(id), Some(State::Acknowledged { conn: 1 }));
        t.handle_event(
            Event::Reply {
                id,
                payload: reply(),
            },
            t0,
        );
        let r = results(&mut t);
        assert_eq!(r.len(), 1);
        assert!(matches!(r[0].1, Ok(Payload::TimeInfo(_))));
        assert!(t.is_empty());
        let c = t.counts();
        assert_eq!(
            (c.queued, c.written, c.acknowledged, c.completed),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn deadlines_follow_the_stage_and_failures_name_it() {
        let t0 = Instant::now();
        // Never connected: the ack deadline fails it "never written", naming why.
        let mut t = table();
        let id = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        assert_eq!(t.poll_timeout(), Some(t0 + 5 * SEC));
        t.handle_timeout(t0 + 4 * SEC);
        assert!(results(&mut t).is_empty());
        t.handle_timeout(t0 + 5 * SEC);
        let r = results(&mut t);
        assert_eq!(r[0].0, id);
        match &r[0].1 {
            Err(AgentError::NotWritten { why, waited_ms, .. }) => {
                assert!(why.contains("not connected to /run/vm.agent.sock"), "{why}");
                assert_eq!(*waited_ms, 5000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.counts().failed_not_written, 1);

        // Connected, no AgentReady: the message names the missing answer to HostHello.
        let mut t = table();
        t.handle_event(Event::Connected { conn: 3 }, t0);
        submit(&mut t, time_req(), Redelivery::SameSession, t0);
        t.handle_timeout(t0 + 5 * SEC);
        match &results(&mut t)[0].1 {
            Err(AgentError::NotWritten { why, .. }) => {
                assert!(why.contains("HostHello on connection 3"), "{why}")
            }
            other => panic!("{other:?}"),
        }

        // Written, never acknowledged.
        let mut t = table();
        open(&mut t, 1, S1, 0, t0);
        let id = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        write_all(&mut t, 1, t0);
        t.handle_timeout(t0 + 5 * SEC);
        assert!(matches!(
            results(&mut t)[0].1,
            Err(AgentError::NotAcknowledged {
                connection_lost: false,
                ..
            })
        ));
        assert_eq!(t.counts().failed_not_acknowledged, 1);
        assert_eq!(t.stage(id), None);

        // Acknowledged: the whole timeout applies, then "acknowledged but no reply".
        let mut t = table();
        open(&mut t, 1, S1, 0, t0);
        let id = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        write_all(&mut t, 1, t0);
        t.handle_event(Event::Ack { id }, t0 + SEC);
        assert_eq!(t.poll_timeout(), Some(t0 + 30 * SEC));
        t.handle_timeout(t0 + 29 * SEC);
        assert!(results(&mut t).is_empty());
        t.handle_timeout(t0 + 30 * SEC);
        assert!(matches!(
            results(&mut t)[0].1,
            Err(AgentError::AckTimeout { .. })
        ));
        assert_eq!(t.counts().failed_ack_timeout, 1);
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn drop_requeues_the_unwritten_and_redelivers_the_written_in_order() {
        let mut t = table();
        let t0 = Instant::now();
        open(&mut t, 1, S1, 0, t0);
        let ids: Vec<u64> = (0..4)
            .map(|_| submit(&mut t, time_req(), Redelivery::SameSession, t0))
            .collect();
        // Two written and acknowledged, one being written when the connection drops, one queued.
        for &id in &ids[..2] {
            let tx = t.poll_transmit(1, t0).unwrap();
            assert_eq!(tx.id, id);
            t.handle_event(Event::Flushed { conn: 1, id }, t0);
            t.handle_event(Event::Ack { id }, t0);
        }
        assert_eq!(t.poll_transmit(1, t0).unwrap().id, ids[2]);
        t.handle_event(Event::Disconnected { conn: 1 }, t0);
        assert_eq!(t.state(ids[0]), Some(State::AwaitingRedelivery));
        assert_eq!(t.state(ids[1]), Some(State::AwaitingRedelivery));
        assert_eq!(
            t.state(ids[2]),
            Some(State::Queued),
            "a cut frame never ran"
        );
        assert_eq!(t.stage(ids[2]), Some(Stage::Queued));
        assert_eq!(t.state(ids[3]), Some(State::Queued));
        // Handshaking on the next connection: nothing goes out yet.
        t.handle_event(Event::Connected { conn: 2 }, t0);
        assert!(t.poll_transmit(2, t0).is_none());
        t.handle_event(
            Event::Ready {
                conn: 2,
                session: S1,
                max_concurrent_exec: 0,
            },
            t0,
        );
        assert_eq!(write_all(&mut t, 2, t0), ids, "original order");
        assert_eq!(t.counts().redelivered, 2);
        assert!(results(&mut t).is_empty());
    }

    #[test]
    fn redelivery_caught_by_a_second_drop_waits_for_the_third_connection() {
        let mut t = table();
        let t0 = Instant::now();
        open(&mut t, 1, S1, 0, t0);
        let id = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        write_all(&mut t, 1, t0);
        t.handle_event(Event::Ack { id }, t0);
        t.handle_event(Event::Disconnected { conn: 1 }, t0);
        // Connection 2 announces the session and drops before the writer took the command.
        open(&mut t, 2, S1, 0, t0);
        assert_eq!(t.state(id), Some(State::Queued));
        t.handle_event(Event::Disconnected { conn: 2 }, t0);
        assert_eq!(t.state(id), Some(State::AwaitingRedelivery));
        assert!(results(&mut t).is_empty(), "neither orphaned nor failed");
        // Connection 3 writes it again, and the answer is the result.
        open(&mut t, 3, S1, 0, t0);
        assert_eq!(write_all(&mut t, 3, t0), vec![id]);
        t.handle_event(
            Event::Reply {
                id,
                payload: reply(),
            },
            t0,
        );
        assert!(results(&mut t)[0].1.is_ok());
        // A timeout while it waited would have said it may have run, never "never written".
        let mut t = table();
        open(&mut t, 1, S1, 0, t0);
        let id = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        write_all(&mut t, 1, t0);
        t.handle_event(Event::Ack { id }, t0);
        t.handle_event(Event::Disconnected { conn: 1 }, t0);
        open(&mut t, 2, S1, 0, t0);
        t.handle_event(Event::Disconnected { conn: 2 }, t0);
        t.handle_timeout(t0 + 30 * SEC);
        let r = results(&mut t);
        match &r[0].1 {
            Err(
                e @ AgentError::AckTimeout {
                    connection_lost: true,
                    ..
                },
            ) => {
                assert!(e.to_string().contains("connection lost"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn streams_written_before_a_drop_fail_saying_whether_they_ran_is_unknown() {
        let mut t = table();
        let t0 = Instant::now();
        open(&mut t, 1, S1, 0, t0);
        let written = submit(&mut t, read(), Redelivery::Never, t0);
        write_all(&mut t, 1, t0);
        let queued = submit(&mut t, read(), Redelivery::Never, t0);
        t.handle_event(Event::Disconnected { conn: 1 }, t0);
        let r = results(&mut t);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, written);
        let msg = r[0].1.as_ref().unwrap_err().to_string();
        assert!(msg.contains("whether it ran is unknown"), "{msg}");
        assert_eq!(t.state(queued), Some(State::Queued));
        assert_eq!(t.counts().failed_connection_lost, 1);
    }

    #[test]
    fn agent_restart_fails_the_written_and_keeps_the_unwritten() {
        let mut t = table();
        let t0 = Instant::now();
        open(&mut t, 1, S1, 0, t0);
        let written = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        write_all(&mut t, 1, t0);
        t.handle_event(Event::Disconnected { conn: 1 }, t0);
        let queued = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        open(&mut t, 2, S2, 0, t0);
        let mut restarted = None;
        let mut failed = Vec::new();
        while let Some(o) = t.poll() {
            match o {
                Output::AgentRestarted {
                    old_session,
                    new_session,
                    failed,
                } => restarted = Some((old_session, new_session, failed)),
                Output::Done { id, result } => failed.push((id, result)),
                Output::Item { .. } => panic!("no items"),
            }
        }
        assert_eq!(restarted, Some((S1, S2, 1)));
        assert_eq!(failed[0].0, written);
        assert!(matches!(
            failed[0].1,
            Err(AgentError::AgentRestarted {
                old_session: S1,
                new_session: S2,
                ..
            })
        ));
        assert_eq!(write_all(&mut t, 2, t0), vec![queued]);
        // A second AgentReady of a new session on the same connection does the same.
        open(&mut t, 2, 0x53, 0, t0);
        assert!(matches!(
            results(&mut t)[0].1,
            Err(AgentError::AgentRestarted { .. })
        ));
    }

    #[test]
    fn answers_for_commands_never_written_are_ignored() {
        let mut t = table();
        let t0 = Instant::now();
        open(&mut t, 1, S1, 0, t0);
        let id = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        // The guest guesses the id before the writer took the command.
        t.handle_event(Event::Ack { id }, t0);
        t.handle_event(
            Event::Reply {
                id,
                payload: reply(),
            },
            t0,
        );
        t.handle_event(
            Event::Reply {
                id: 12345,
                payload: reply(),
            },
            t0,
        );
        assert!(results(&mut t).is_empty());
        assert_eq!(t.stage(id), Some(Stage::Queued));
        assert_eq!(t.counts().ignored_answers, 3);
        // Once it is being written an answer is genuine, even before the writer says so.
        assert_eq!(t.poll_transmit(1, t0).unwrap().id, id);
        t.handle_event(
            Event::Reply {
                id,
                payload: reply(),
            },
            t0,
        );
        assert!(results(&mut t)[0].1.is_ok());
        t.handle_event(Event::Flushed { conn: 1, id }, t0);
        assert_eq!(t.counts().written, 1);
    }

    #[test]
    fn execs_beyond_the_agents_limit_wait_for_a_slot_within_their_deadline() {
        let mut t = table();
        let t0 = Instant::now();
        open(&mut t, 1, S1, 2, t0);
        let e: Vec<u64> = (0..3)
            .map(|_| submit(&mut t, exec(), Redelivery::SameSession, t0))
            .collect();
        let other = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        // Two execs take the slots; the third waits, and does not hold up other commands.
        assert_eq!(write_all(&mut t, 1, t0), vec![e[0], e[1], other]);
        assert_eq!(t.state(e[2]), Some(State::Queued));
        // Its ack clock does not run while it waits for a slot: only its whole timeout.
        assert_eq!(t.poll_timeout(), Some(t0 + 5 * SEC));
        t.handle_event(Event::Ack { id: e[0] }, t0);
        t.handle_event(Event::Ack { id: e[1] }, t0);
        t.handle_event(Event::Ack { id: other }, t0);
        t.handle_timeout(t0 + 10 * SEC);
        assert!(results(&mut t).is_empty());
        t.handle_event(
            Event::Reply {
                id: e[0],
                payload: reply(),
            },
            t0 + 10 * SEC,
        );
        assert_eq!(write_all(&mut t, 1, t0 + 10 * SEC), vec![e[2]]);
        // Written now: its ack clock starts now.
        assert_eq!(t.poll_timeout(), Some(t0 + 15 * SEC));
        // An exec that waits for a slot past its timeout says why.
        let mut t = table();
        open(&mut t, 1, S1, 1, t0);
        let a = submit(&mut t, exec(), Redelivery::SameSession, t0);
        let b = submit(&mut t, exec(), Redelivery::SameSession, t0);
        write_all(&mut t, 1, t0);
        t.handle_event(Event::Ack { id: a }, t0);
        t.handle_timeout(t0 + 30 * SEC);
        let r = results(&mut t);
        let (id, res) = r.iter().find(|(id, _)| *id == b).unwrap();
        assert_eq!(*id, b);
        match res {
            Err(AgentError::NotWritten { why, .. }) => assert!(why.contains("exec slots"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn full_queue_and_full_table_are_refused_at_once() {
        let mut t = table();
        let t0 = Instant::now();
        for _ in 0..8 {
            submit(&mut t, time_req(), Redelivery::SameSession, t0);
        }
        let e = t.submit(time_req(), opts(Redelivery::SameSession), t0);
        assert!(matches!(e, Err(AgentError::QueueFull { capacity: 8, .. })));
        open(&mut t, 1, S1, 0, t0);
        write_all(&mut t, 1, t0);
        for _ in 0..8 {
            submit(&mut t, time_req(), Redelivery::SameSession, t0);
        }
        write_all(&mut t, 1, t0);
        let e = t.submit(time_req(), opts(Redelivery::SameSession), t0);
        assert!(matches!(e, Err(AgentError::QueueFull { capacity: 16, .. })));
    }

    #[test]
    fn abandoned_streams_are_cancelled_and_abandoned_queued_commands_never_written() {
        let mut t = table();
        let t0 = Instant::now();
        let queued = submit(&mut t, time_req(), Redelivery::SameSession, t0);
        t.handle_event(Event::Abandoned { id: queued }, t0);
        open(&mut t, 1, S1, 0, t0);
        assert!(t.poll_transmit(1, t0).is_none());
        let stream = submit(&mut t, read(), Redelivery::Never, t0);
        write_all(&mut t, 1, t0);
        t.handle_event(Event::Abandoned { id: stream }, t0);
        let cancel = t.poll_transmit(1, t0).unwrap();
        assert_eq!((cancel.id, cancel.kind), (0, "cancel"));
        assert!(t.is_empty());
        assert!(results(&mut t).is_empty());
        let c = t.counts();
        assert_eq!((c.failed_not_written, c.failed_not_acknowledged), (1, 1));
    }

    #[test]
    fn items_reach_the_caller_and_a_slow_one_is_cancelled() {
        let mut t = table();
        let t0 = Instant::now();
        open(&mut t, 1, S1, 0, t0);
        let id = submit(&mut t, read(), Redelivery::Never, t0);
        write_all(&mut t, 1, t0);
        let chunk = Payload::FileChunk(Default::default());
        t.handle_event(Event::Item { id, payload: chunk }, t0);
        assert!(matches!(t.poll(), Some(Output::Item { .. })));
        assert_eq!(t.stage(id), Some(Stage::Acknowledged));
        t.handle_event(Event::TooSlow { id }, t0);
        assert!(matches!(
            results(&mut t)[0].1,
            Err(AgentError::SlowConsumer { .. })
        ));
        assert_eq!(t.poll_transmit(1, t0).unwrap().kind, "cancel");
    }

    #[test]
    fn revert_and_detach_fail_everything_and_revert_forgets_the_session() {
        let mut t = table();
        let t0 = Instant::now();
        open(&mut t, 1, S1, 0, t0);
        submit(&mut t, time_req(), Redelivery::SameSession, t0);
        write_all(&mut t, 1, t0);
        submit(&mut t, time_req(), Redelivery::SameSession, t0);
        t.handle_event(Event::Reverted, t0);
        let r = results(&mut t);
        assert_eq!(r.len(), 2);
        for (_, res) in &r {
            let msg = res.as_ref().unwrap_err().to_string();
            assert!(msg.contains("VM reverted"), "{msg}");
        }
        assert_eq!(t.session(), None);
        // The reverted guest's agent is met as new, not as a restart.
        open(&mut t, 2, S2, 0, t0);
        assert!(t.poll().is_none());
        submit(&mut t, time_req(), Redelivery::SameSession, t0);
        t.handle_event(Event::Detached, t0);
        assert!(matches!(
            results(&mut t)[0].1,
            Err(AgentError::Detached { .. })
        ));
    }

    #[test]
    fn request_ids_are_nonzero_distinct_and_not_a_counter() {
        let mut t = table();
        let ids: Vec<u64> = (0..64).map(|_| t.next_id()).collect();
        assert!(ids.iter().all(|&id| id != 0 && id < 1 << 63));
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        assert!(ids.windows(2).any(|w| w[1] != w[0].wrapping_add(1)));
        // Another VM's table draws from another key.
        let mut other = table();
        assert_ne!(other.next_id(), ids[0]);
    }
}
