//! The lifecycle of one agent command, as the caller sees it.
//!
//! A command is created `Queued` (its whole frame is in the VM's bounded queue), becomes
//! `Writing` when the writer task takes it, `Written` once every byte of its frame was flushed
//! to the socket, `Acknowledged` when the agent's `Ack` arrives, and ends `Completed` with the
//! terminal reply or failed with the stage it had reached. "Sent" never means "queued".
//!
//! The caller holds a [`Command`]; dropping it (a cancelled gRPC call, a timeout) forgets the
//! command: a frame still queued is skipped by the writer, a frame being written is finished
//! by the writer (which owns it), so a cancelled caller never leaves half a frame behind.

use super::link::Link;
use crate::error::AgentError;
use qx_proto::agent::envelope::Payload;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How far a command got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// In the VM's queue; no byte of it is on the socket.
    Queued,
    /// The writer task took it and is writing its frame.
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

/// Which commands may be written again, with the same id, on the next connection after a
/// drop. Within one agent session every command is safe to redeliver once, because the agent
/// answers a repeated id from its reply cache and never runs it twice. After an agent restart
/// (new session id) nothing is redelivered: the in-flight commands fail "agent restarted".
/// Streams (exec output, file windows) are not redelivered: their items may have been lost
/// with the connection, so the caller gets "connection lost" and may retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Reads, pings, stat, list, info: harmless even if run twice.
    Idempotent,
    /// Exec, power, writes, freeze: safe only through the reply cache of the same session.
    SameSessionOnly,
    /// Streams: never redelivered.
    Never,
}

/// Per-command options.
#[derive(Debug, Clone, Copy)]
pub struct CommandOptions {
    /// From enqueue to the agent's Ack (or, for pings, the Pong).
    pub ack_timeout: Duration,
    /// From enqueue to the terminal reply; `None`: no limit once acknowledged.
    pub timeout: Option<Duration>,
    pub redelivery: Redelivery,
    /// Whether the agent acks this request (pings are answered by a Pong only).
    pub expects_ack: bool,
}

/// A command in flight. Await [`Command::next_item`] / [`Command::finish`].
#[derive(Debug)]
pub struct Command {
    pub(crate) link: Arc<Link>,
    pub(crate) id: u64,
    pub(crate) kind: &'static str,
    pub(crate) items: mpsc::Receiver<Payload>,
    pub(crate) done: oneshot::Receiver<Result<Payload, AgentError>>,
    pub(crate) started: Instant,
    pub(crate) opts: CommandOptions,
    pub(crate) finished: bool,
}

/// One step of a command's output.
#[derive(Debug)]
pub enum Step {
    Item(Payload),
    Done(Payload),
}

impl Command {
    /// The request id (the agent echoes it as correlation id).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Next stream item, or the terminal reply, or the failure naming the stage reached.
    pub async fn next(&mut self) -> Result<Step, AgentError> {
        if self.finished {
            return Err(AgentError::InvalidArgument(format!(
                "command {} already finished",
                self.id
            )));
        }
        loop {
            let stage = self.link.stage_of(self.id);
            let deadline = match stage {
                Some(s) if s < Stage::Acknowledged => Some(match self.opts.timeout {
                    Some(t) => self.started + self.opts.ack_timeout.min(t),
                    None => self.started + self.opts.ack_timeout,
                }),
                _ => self.opts.timeout.map(|t| self.started + t),
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                item = self.items.recv() => {
                    if let Some(p) = item {
                        return Ok(Step::Item(p));
                    }
                    // The item sender lives as long as the pending entry; fall through to
                    // the terminal reply.
                    return self.terminal().await;
                }
                res = &mut self.done => {
                    self.finished = true;
                    return match res {
                        Ok(Ok(p)) => Ok(Step::Done(p)),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(self.link.vanished(self.id, self.kind)),
                    };
                }
                _ = sleep => {
                    // A stage that moved on while we slept gets a new deadline.
                    let now_stage = self.link.stage_of(self.id);
                    if now_stage != stage {
                        continue;
                    }
                    self.finished = true;
                    return Err(self.link.time_out(self.id, self.kind, self.started.elapsed()));
                }
            }
        }
    }

    async fn terminal(&mut self) -> Result<Step, AgentError> {
        self.finished = true;
        match (&mut self.done).await {
            Ok(Ok(p)) => Ok(Step::Done(p)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.link.vanished(self.id, self.kind)),
        }
    }

    /// Waits for the terminal reply, failing on any stream item.
    pub async fn finish(mut self) -> Result<Payload, AgentError> {
        match self.next().await? {
            Step::Done(p) => Ok(p),
            Step::Item(p) => Err(AgentError::UnexpectedReply {
                vm_id: self.link.vm_id.clone(),
                id: self.id,
                kind: self.kind,
                got: qx_proto::payload_name(&qx_proto::agent::Envelope {
                    id: 0,
                    correlation_id: 0,
                    payload: Some(p),
                }),
            }),
        }
    }
}

impl Drop for Command {
    fn drop(&mut self) {
        if !self.finished {
            self.link.abandon(self.id);
        }
    }
}
