//! A command in flight, as its caller holds it.
//!
//! The command's lifecycle lives in the VM's [`super::table::Table`]; the caller only waits
//! for what the table tells it: stream items, then one terminal reply or a failure that names
//! the stage the command reached. Deadlines are the table's too: the link wakes it when the
//! earliest one passes.
//!
//! Dropping a [`Command`] (a cancelled gRPC call) forgets it: a frame still queued is never
//! written, a frame being written is finished by the writer (which holds it), so a cancelled
//! caller never leaves half a frame behind; a stream the agent runs is cancelled.

use super::link::Link;
pub use super::table::{CommandOptions, Redelivery, Stage};
use crate::error::AgentError;
use qx_proto::agent::envelope::Payload;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Bytes of stream items (exec output, file data) one command may hold waiting for its
/// caller; past it the caller counts as too slow and the command is cancelled. A file read
/// window ([`crate::agent_api::READ_WINDOW_BYTES`]) fits it whole.
pub const ITEM_BUFFER_BYTES: usize = 1024 * 1024;

/// The bytes an item counts for against [`ITEM_BUFFER_BYTES`].
pub(crate) fn item_bytes(p: &Payload) -> usize {
    match p {
        Payload::ExecOutput(o) => o.data.len(),
        Payload::FileChunk(c) => c.data.len(),
        _ => 0,
    }
}

/// A command in flight. Await [`Command::next`] / [`Command::finish`].
#[derive(Debug)]
pub struct Command {
    pub(crate) link: Arc<Link>,
    pub(crate) id: u64,
    pub(crate) kind: &'static str,
    pub(crate) items: mpsc::Receiver<Payload>,
    /// Item bytes queued in `items`, shared with the link that queues them.
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) done: oneshot::Receiver<Result<Payload, AgentError>>,
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

    /// The request's payload name.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Next stream item, or the terminal reply, or the failure naming the stage reached.
    pub async fn next(&mut self) -> Result<Step, AgentError> {
        if self.finished {
            return Err(AgentError::InvalidArgument(format!(
                "command {} already finished",
                self.id
            )));
        }
        tokio::select! {
            biased;
            Some(p) = self.items.recv() => {
                self.queued.fetch_sub(item_bytes(&p), Ordering::Relaxed);
                Ok(Step::Item(p))
            }
            res = &mut self.done => {
                self.finished = true;
                match res {
                    Ok(Ok(p)) => Ok(Step::Done(p)),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(self.link.vanished(self.id, self.kind)),
                }
            }
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
                got: qx_proto::payload_name(&p),
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
