//! Errors of the agent side of the daemon.
//!
//! Every failed agent command names the stage it reached (see [`crate::agent::table::Stage`]):
//! "never written", "written but not acknowledged", "acknowledged but no reply", "connection
//! lost", "agent restarted" or the agent's own error. Nothing here knows about gRPC: the
//! gRPC layer turns these into `tonic::Status` in one place ([`crate::service::status`]).

use qx_proto::agent::ErrorCode;
use thiserror::Error;

/// Why an agent operation failed.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum AgentError {
    #[error("vm {vm_id}: no agent socket is bound (attach it, pass --vm-socket, or put {vm_id}.agent.sock in --agent-socket-dir)")]
    UnknownVm { vm_id: String },
    #[error("vm id {vm_id:?} is not valid: use letters, digits, '.', '_' and '-'")]
    InvalidVmId { vm_id: String },
    #[error("agent for vm {vm_id}: the command queue is full ({capacity} commands waiting); retry later")]
    QueueFull { vm_id: String, capacity: usize },
    #[error(
        "agent for vm {vm_id}: command {id} ({kind}) never written within {waited_ms} ms: {why}"
    )]
    NotWritten {
        vm_id: String,
        id: u64,
        kind: &'static str,
        waited_ms: u64,
        why: String,
    },
    #[error("agent for vm {vm_id}: {kind} never written within {waited_ms} ms: all {limit} {what} the agent announced stayed busy")]
    NotAdmitted {
        vm_id: String,
        kind: &'static str,
        waited_ms: u64,
        limit: u32,
        what: &'static str,
    },
    #[error("agent for vm {vm_id}: command {id} ({kind}) written but not acknowledged within {waited_ms} ms{}", lost_suffix(*.connection_lost))]
    NotAcknowledged {
        vm_id: String,
        id: u64,
        kind: &'static str,
        waited_ms: u64,
        connection_lost: bool,
    },
    #[error("agent for vm {vm_id}: command {id} ({kind}) acknowledged but no reply within {waited_ms} ms{}", lost_suffix(*.connection_lost))]
    AckTimeout {
        vm_id: String,
        id: u64,
        kind: &'static str,
        waited_ms: u64,
        connection_lost: bool,
    },
    #[error("agent for vm {vm_id}: command {id} ({kind}) failed: connection lost after it was {stage}; it was not redelivered ({why}), so whether it ran is unknown")]
    ConnectionLost {
        vm_id: String,
        id: u64,
        kind: &'static str,
        stage: &'static str,
        why: &'static str,
    },
    #[error("agent for vm {vm_id}: command {id} ({kind}) failed: agent restarted (session {old_session:#x} -> {new_session:#x}) after the command was {stage}; whether it ran is unknown")]
    AgentRestarted {
        vm_id: String,
        id: u64,
        kind: &'static str,
        stage: &'static str,
        old_session: u64,
        new_session: u64,
    },
    #[error(
        "agent for vm {vm_id}: command {id} ({kind}) failed in the guest: {message} ({code:?})"
    )]
    Agent {
        vm_id: String,
        id: u64,
        kind: &'static str,
        code: ErrorCode,
        message: String,
    },
    #[error("agent for vm {vm_id}: command {id} ({kind}) got an unexpected reply: {got}")]
    UnexpectedReply {
        vm_id: String,
        id: u64,
        kind: &'static str,
        got: &'static str,
    },
    #[error("agent for vm {vm_id}: command {id} ({kind}) failed: VM reverted to a snapshot after the command was {stage}; the guest's state is the snapshot's")]
    Reverted {
        vm_id: String,
        id: u64,
        kind: &'static str,
        stage: &'static str,
    },
    #[error(
        "agent for vm {vm_id}: the socket was detached while command {id} ({kind}) was in flight"
    )]
    Detached {
        vm_id: String,
        id: u64,
        kind: &'static str,
    },
    #[error("agent for vm {vm_id}: command {id} ({kind}) fell behind: the caller read its stream too slowly and it was cancelled")]
    SlowConsumer {
        vm_id: String,
        id: u64,
        kind: &'static str,
    },
    #[error("request is invalid: {0}")]
    InvalidArgument(String),
    #[error("agent for vm {vm_id}: {what}")]
    Integrity { vm_id: String, what: String },
    #[error("the agent connection manager is not running inside a tokio runtime")]
    NoRuntime,
}

fn lost_suffix(lost: bool) -> &'static str {
    if lost {
        "; connection lost"
    } else {
        ""
    }
}
