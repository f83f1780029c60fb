//! The one mapping from the daemon's errors to `tonic::Status`, at the gRPC edge.
//!
//! Below the gRPC layer errors keep their type: agent operations return [`AgentError`], VM
//! operations [`VmError`] (which carries a [`StorageError`] for the storage half of CreateVM).
//! Only here do they become status codes; the message is always the error's own text.

use crate::error::AgentError;
use crate::hypervisor::domain::SpecError;
use crate::hypervisor::HypervisorError;
use crate::vm_api::VmError;
use qx_proto::agent::ErrorCode;
use tonic::{Code, Status};

/// An agent error's status.
pub fn agent(err: AgentError) -> Status {
    to_status(&err)
}

/// The one mapping from agent errors to gRPC status codes.
pub fn to_status(err: &AgentError) -> Status {
    let code = match err {
        AgentError::UnknownVm { .. } => Code::NotFound,
        AgentError::InvalidVmId { .. } | AgentError::InvalidArgument(_) => Code::InvalidArgument,
        AgentError::QueueFull { .. } => Code::ResourceExhausted,
        AgentError::NotWritten { .. } | AgentError::NotAdmitted { .. } => Code::Unavailable,
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

/// The one mapping from VM errors to gRPC status codes.
pub fn vm(e: VmError) -> Status {
    if let VmError::Storage(s) = e {
        return s.into_status();
    }
    let code = match &e {
        VmError::Storage(_) => Code::Internal,
        VmError::Hypervisor(h) => match h {
            HypervisorError::NoDomain(_) | HypervisorError::NoSnapshot(_) => Code::NotFound,
            HypervisorError::Exists(_) => Code::AlreadyExists,
            HypervisorError::Invalid(_) => Code::InvalidArgument,
            HypervisorError::WrongState(_) => Code::FailedPrecondition,
            HypervisorError::Unsupported(_) => Code::Unimplemented,
            HypervisorError::Unreachable(_) => Code::Unavailable,
            HypervisorError::Failed(_) => Code::Internal,
        },
        VmError::Spec(SpecError::Denied(_)) => Code::PermissionDenied,
        VmError::Spec(_) | VmError::InvalidArgument(_) => Code::InvalidArgument,
        VmError::NotFound(_) => Code::NotFound,
        VmError::AlreadyExists(_) => Code::AlreadyExists,
        VmError::WrongState(_) | VmError::MissingProgram { .. } => Code::FailedPrecondition,
        VmError::Internal(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
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

    #[test]
    fn a_missing_qemu_img_is_a_failed_precondition_that_says_how_to_install_it() {
        let dir = std::env::temp_dir().join(format!("qx-no-qemu-img-{}", std::process::id()));
        let err = crate::vm_api::create_image_with(
            "qx-no-such-qemu-img",
            &dir.join("d.qcow2"),
            "qcow2",
            1,
        )
        .expect_err("a missing program cannot create an image");
        let status = vm(err);
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("qemu-utils"),
            "names the package: {}",
            status.message()
        );
    }
}
