//! Errors of the agent side of the daemon and their one mapping to gRPC status codes.
//!
//! Every failed agent command names the stage it reached (see [`crate::agent::table::Stage`]):
//! "never written", "written but not acknowledged", "acknowledged but no reply", "connection
//! lost", "agent restarted" or the agent's own error. [`to_status`] is the only place that
//! turns these into `tonic::Status`.

use qx_proto::agent::ErrorCode;
use thiserror::Error;
use tonic::{Code, Status};

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

/// The one mapping from agent errors to gRPC status codes.
pub fn to_status(err: &AgentError) -> Status {
    let code = match err {
        AgentError::UnknownVm { .. } => Code::NotFound,
        AgentError::InvalidVmId { .. } | AgentError::InvalidArgument(_) => Code::InvalidArgument,
        AgentError::QueueFull { .. } => Code::ResourceExhausted,
        AgentError::NotWritten { .. } => Code::Unavailable,
        AgentError::NotAcknowledged { .. } | AgentError::AckTimeout { .. } => {
            Code::DeadlineExceeded
        }
        AgentError::ConnectionLost { .. } | AgentError::Detached { .. } => Code::Unavailable,
        AgentError::AgentRestarted { .. } | AgentError::Reverted { .. } => Code::Aborted,
        AgentError::Agent { code, .. } => agent_code(*code),
        AgentError::UnexpectedReply { .. } | AgentError::NoRuntime => Code::Internal,
        AgentError::SlowConsumer { .. } => Code::ResourceExhausted,
        AgentError::Integrity { .. } => Code::DataLoss,
    };
    Status::new(code, err.to_string())
}

impl From<AgentError> for Status {
    fn from(err: AgentError) -> Status {
        to_status(&err)
    }
}

fn agent_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::Unsupported => Code::Unimplemented,
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::PermissionDenied | ErrorCode::PolicyDenied => Code::PermissionDenied,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::Busy => Code::ResourceExhausted,
        ErrorCode::Frozen | ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::Timeout => Code::DeadlineExceeded,
        ErrorCode::Cancelled => Code::Cancelled,
        ErrorCode::Io | ErrorCode::Internal | ErrorCode::Unspecified => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unacknowledged_command_message_names_stage_and_lost_connection() {
        let err = AgentError::NotAcknowledged {
            vm_id: "vm1".into(),
            id: 17,
            kind: "exec_request",
            waited_ms: 5000,
            connection_lost: true,
        };
        let status = to_status(&err);
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "agent for vm vm1: command 17 (exec_request) written but not acknowledged within 5000 ms; connection lost"
        );
    }

    #[test]
    fn agent_policy_refusal_maps_to_permission_denied() {
        let err = AgentError::Agent {
            vm_id: "v".into(),
            id: 1,
            kind: "exec_request",
            code: ErrorCode::PolicyDenied,
            message: "exec disabled".into(),
        };
        assert_eq!(to_status(&err).code(), Code::PermissionDenied);
    }
}
