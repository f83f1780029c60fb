//! Guest-agent RPCs: every call goes through the agent connection manager.

use crate::pb;
use crate::service::RpcStream;
use std::path::PathBuf;
use tokio::sync::broadcast;
use tonic::{Status, Streaming};

/// Guest-agent RPCs: every call goes through the agent connection manager.
#[derive(Debug, Default)]
pub struct AgentApi {}

/// An agent connection change, for `StreamEvents`.
#[derive(Debug, Clone)]
pub struct AgentEvent {
    pub vm_id: String,
    /// AGENT_CONNECTED, AGENT_DISCONNECTED or AGENT_RESTARTED.
    pub kind: pb::EventKind,
    pub detail: String,
}

impl AgentApi {
    /// Binds `vm_id` to its agent socket, as read from the VM's own definition, and
    /// (re)starts its connection. Replacing a binding closes the old connection first.
    pub fn attach(&self, _vm_id: &str, _socket: PathBuf) {}

    /// Closes `vm_id`'s agent connection and forgets its socket.
    pub fn detach(&self, _vm_id: &str) {}

    /// Agent connection changes, for `StreamEvents`.
    pub fn agent_events(&self) -> broadcast::Receiver<AgentEvent> {
        broadcast::channel(1).1
    }

    pub async fn ping_agent(
        &self,
        _request: pb::AgentRequest,
    ) -> Result<pb::PingAgentResponse, Status> {
        Err(Status::unimplemented("ping_agent"))
    }

    pub async fn get_agent_info(
        &self,
        _request: pb::AgentRequest,
    ) -> Result<pb::GuestAgentInfo, Status> {
        Err(Status::unimplemented("get_agent_info"))
    }

    pub async fn get_agent_connection_stats(
        &self,
        _request: pb::AgentStatsRequest,
    ) -> Result<pb::AgentConnectionStatsResponse, Status> {
        Err(Status::unimplemented("get_agent_connection_stats"))
    }

    pub async fn execute_in_guest(
        &self,
        _request: pb::ExecuteInGuestRequest,
    ) -> Result<qx_proto::agent::ExecExit, Status> {
        Err(Status::unimplemented("execute_in_guest"))
    }

    pub async fn stream_exec_in_guest(
        &self,
        _request: pb::ExecuteInGuestRequest,
    ) -> Result<RpcStream<pb::ExecEvent>, Status> {
        Err(Status::unimplemented("stream_exec_in_guest"))
    }

    pub async fn kill_guest_exec(
        &self,
        _request: pb::KillGuestExecRequest,
    ) -> Result<pb::Empty, Status> {
        Err(Status::unimplemented("kill_guest_exec"))
    }

    pub async fn read_guest_file(
        &self,
        _request: pb::ReadGuestFileRequest,
    ) -> Result<RpcStream<pb::GuestFileChunk>, Status> {
        Err(Status::unimplemented("read_guest_file"))
    }

    pub async fn write_guest_file(
        &self,
        _requests: Streaming<pb::WriteGuestFileRequest>,
    ) -> Result<qx_proto::agent::FileWriteDone, Status> {
        Err(Status::unimplemented("write_guest_file"))
    }

    pub async fn list_guest_dir(
        &self,
        _request: pb::GuestListRequest,
    ) -> Result<qx_proto::agent::FileList, Status> {
        Err(Status::unimplemented("list_guest_dir"))
    }

    pub async fn stat_guest_path(
        &self,
        _request: pb::GuestStatRequest,
    ) -> Result<qx_proto::agent::FileStat, Status> {
        Err(Status::unimplemented("stat_guest_path"))
    }

    pub async fn mkdir_guest(&self, _request: pb::GuestMkdirRequest) -> Result<pb::Empty, Status> {
        Err(Status::unimplemented("mkdir_guest"))
    }

    pub async fn delete_guest_path(
        &self,
        _request: pb::GuestDeleteRequest,
    ) -> Result<pb::Empty, Status> {
        Err(Status::unimplemented("delete_guest_path"))
    }

    pub async fn hash_guest_file(
        &self,
        _request: pb::GuestHashRequest,
    ) -> Result<qx_proto::agent::FileHash, Status> {
        Err(Status::unimplemented("hash_guest_file"))
    }

    pub async fn guest_shutdown(
        &self,
        _request: pb::GuestPowerRequest,
    ) -> Result<qx_proto::agent::PowerReply, Status> {
        Err(Status::unimplemented("guest_shutdown"))
    }

    pub async fn guest_reboot(
        &self,
        _request: pb::GuestPowerRequest,
    ) -> Result<qx_proto::agent::PowerReply, Status> {
        Err(Status::unimplemented("guest_reboot"))
    }

    pub async fn quiesce_filesystems(
        &self,
        _request: pb::QuiesceFilesystemsRequest,
    ) -> Result<qx_proto::agent::FsFreezeReply, Status> {
        Err(Status::unimplemented("quiesce_filesystems"))
    }

    pub async fn thaw_filesystems(
        &self,
        _request: pb::ThawFilesystemsRequest,
    ) -> Result<qx_proto::agent::FsThawReply, Status> {
        Err(Status::unimplemented("thaw_filesystems"))
    }

    pub async fn fs_freeze_status(
        &self,
        _request: pb::AgentRequest,
    ) -> Result<qx_proto::agent::FsFreezeStatus, Status> {
        Err(Status::unimplemented("fs_freeze_status"))
    }

    pub async fn trim_filesystems(
        &self,
        _request: pb::TrimFilesystemsRequest,
    ) -> Result<qx_proto::agent::FsTrimReply, Status> {
        Err(Status::unimplemented("trim_filesystems"))
    }

    pub async fn sync_time(
        &self,
        _request: pb::SyncTimeRequest,
    ) -> Result<pb::SyncTimeResponse, Status> {
        Err(Status::unimplemented("sync_time"))
    }

    pub async fn get_guest_time(
        &self,
        _request: pb::AgentRequest,
    ) -> Result<qx_proto::agent::TimeInfo, Status> {
        Err(Status::unimplemented("get_guest_time"))
    }

    pub async fn list_guest_users(
        &self,
        _request: pb::AgentRequest,
    ) -> Result<qx_proto::agent::UserList, Status> {
        Err(Status::unimplemented("list_guest_users"))
    }

    pub async fn set_guest_password(
        &self,
        _request: pb::SetGuestPasswordRequest,
    ) -> Result<pb::Empty, Status> {
        Err(Status::unimplemented("set_guest_password"))
    }

    pub async fn list_ssh_keys(
        &self,
        _request: pb::GuestUserRequest,
    ) -> Result<qx_proto::agent::SshKeys, Status> {
        Err(Status::unimplemented("list_ssh_keys"))
    }

    pub async fn add_ssh_keys(
        &self,
        _request: pb::SshKeysChangeRequest,
    ) -> Result<qx_proto::agent::SshKeys, Status> {
        Err(Status::unimplemented("add_ssh_keys"))
    }

    pub async fn remove_ssh_keys(
        &self,
        _request: pb::SshKeysChangeRequest,
    ) -> Result<qx_proto::agent::SshKeys, Status> {
        Err(Status::unimplemented("remove_ssh_keys"))
    }

    pub async fn get_guest_network(
        &self,
        _request: pb::AgentRequest,
    ) -> Result<qx_proto::agent::NetworkInfo, Status> {
        Err(Status::unimplemented("get_guest_network"))
    }

    pub async fn get_guest_disks(
        &self,
        _request: pb::AgentRequest,
    ) -> Result<qx_proto::agent::DisksInfo, Status> {
        Err(Status::unimplemented("get_guest_disks"))
    }

    pub async fn get_guest_logs(
        &self,
        _request: pb::GuestLogsRequest,
    ) -> Result<qx_proto::agent::AgentLogs, Status> {
        Err(Status::unimplemented("get_guest_logs"))
    }

    pub async fn stream_telemetry(
        &self,
        _request: pb::AgentRequest,
    ) -> Result<RpcStream<pb::TelemetryUpdate>, Status> {
        Err(Status::unimplemented("stream_telemetry"))
    }
}
