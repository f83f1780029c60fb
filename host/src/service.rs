//! The tonic `NodeDaemonService` implementation: the gRPC edge, a thin delegation layer.
//!
//! Node and VM RPCs go to [`VmApi`] (libvirt), guest-agent RPCs to [`AgentApi`], storage RPCs
//! to [`crate::storage::api::StorageApi`]. The VM and agent layers return their own errors
//! ([`VmError`], [`AgentError`]); this is the one place they become `tonic::Status`
//! ([`status`]). Nothing below this layer imports it.

pub mod status;

use crate::agent_api::{AgentApi, WriteError};
use crate::error::AgentError;
use crate::pb;
use crate::pb::node_daemon_service_server::NodeDaemonService;
use crate::stream::BoxStream;
use crate::vm_api::{VmApi, VmError};
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// A boxed server stream, the shape every streaming RPC returns.
pub type RpcStream<T> = BoxStream<T, Status>;

fn vm_reply<T>(r: Result<T, VmError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(status::vm)
}

fn agent_reply<T>(r: Result<T, AgentError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(status::agent)
}

/// A stream of typed results as a gRPC stream: the call's error and each item's through `map`.
fn stream_reply<T, E>(
    r: Result<BoxStream<T, E>, E>,
    map: fn(E) -> Status,
) -> Result<Response<RpcStream<T>>, Status>
where
    T: Send + 'static,
    E: Send + 'static,
{
    let items = r.map_err(map)?;
    Ok(Response::new(Box::pin(
        items.map(move |item| item.map_err(map)),
    )))
}

/// The gRPC service: one per daemon.
#[derive(Debug, Clone)]
pub struct NodeService {
    pub vm: Arc<VmApi>,
    pub agent: Arc<AgentApi>,
}

#[tonic::async_trait]
impl NodeDaemonService for NodeService {
    async fn health_check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        vm_reply(self.vm.health_check(request.into_inner()).await)
    }

    async fn get_node_info(
        &self,
        request: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        vm_reply(self.vm.get_node_info(request.into_inner()).await)
    }

    async fn create_vm(
        &self,
        request: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::VmStatus>, Status> {
        vm_reply(self.vm.create_vm(request.into_inner()).await)
    }

    async fn start_vm(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::VmStatus>, Status> {
        vm_reply(self.vm.start_vm(request.into_inner()).await)
    }

    async fn stop_vm(
        &self,
        request: Request<pb::StopVmRequest>,
    ) -> Result<Response<pb::StopVmResponse>, Status> {
        vm_reply(self.vm.stop_vm(request.into_inner()).await)
    }

    async fn force_stop_vm(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::VmStatus>, Status> {
        vm_reply(self.vm.force_stop_vm(request.into_inner()).await)
    }

    async fn reboot_vm(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::VmStatus>, Status> {
        vm_reply(self.vm.reboot_vm(request.into_inner()).await)
    }

    async fn pause_vm(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::VmStatus>, Status> {
        vm_reply(self.vm.pause_vm(request.into_inner()).await)
    }

    async fn resume_vm(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::VmStatus>, Status> {
        vm_reply(self.vm.resume_vm(request.into_inner()).await)
    }

    async fn delete_vm(
        &self,
        request: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        vm_reply(self.vm.delete_vm(request.into_inner()).await)
    }

    async fn get_vm_status(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::VmStatus>, Status> {
        vm_reply(self.vm.get_vm_status(request.into_inner()).await)
    }

    async fn list_v_ms(
        &self,
        request: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        vm_reply(self.vm.list_v_ms(request.into_inner()).await)
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        vm_reply(self.vm.create_snapshot(request.into_inner()).await)
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        vm_reply(self.vm.list_snapshots(request.into_inner()).await)
    }

    async fn revert_snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::VmStatus>, Status> {
        vm_reply(self.vm.revert_snapshot(request.into_inner()).await)
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        vm_reply(self.vm.delete_snapshot(request.into_inner()).await)
    }

    async fn change_media(
        &self,
        request: Request<pb::ChangeMediaRequest>,
    ) -> Result<Response<pb::ChangeMediaResponse>, Status> {
        vm_reply(self.vm.change_media(request.into_inner()).await)
    }

    async fn mount_agent_iso(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::ChangeMediaResponse>, Status> {
        vm_reply(self.vm.mount_agent_iso(request.into_inner()).await)
    }

    async fn eject_agent_iso(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::ChangeMediaResponse>, Status> {
        vm_reply(self.vm.eject_agent_iso(request.into_inner()).await)
    }

    async fn get_console(
        &self,
        request: Request<pb::VmIdRequest>,
    ) -> Result<Response<pb::ConsoleInfo>, Status> {
        vm_reply(self.vm.get_console(request.into_inner()).await)
    }

    type StreamEventsStream = RpcStream<pb::NodeEvent>;

    async fn stream_events(
        &self,
        request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        stream_reply(
            self.vm.stream_events(request.into_inner()).await,
            status::vm,
        )
    }

    type StreamMetricsStream = RpcStream<pb::VmMetrics>;

    async fn stream_metrics(
        &self,
        request: Request<pb::StreamMetricsRequest>,
    ) -> Result<Response<Self::StreamMetricsStream>, Status> {
        stream_reply(
            self.vm.stream_metrics(request.into_inner()).await,
            status::vm,
        )
    }

    async fn ping_agent(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::PingAgentResponse>, Status> {
        agent_reply(self.agent.ping_agent(request.into_inner()).await)
    }

    async fn get_agent_info(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::GuestAgentInfo>, Status> {
        agent_reply(self.agent.get_agent_info(request.into_inner()).await)
    }

    async fn get_agent_connection_stats(
        &self,
        request: Request<pb::AgentStatsRequest>,
    ) -> Result<Response<pb::AgentConnectionStatsResponse>, Status> {
        agent_reply(
            self.agent
                .get_agent_connection_stats(request.into_inner())
                .await,
        )
    }

    async fn execute_in_guest(
        &self,
        request: Request<pb::ExecuteInGuestRequest>,
    ) -> Result<Response<qx_proto::agent::ExecExit>, Status> {
        agent_reply(self.agent.execute_in_guest(request.into_inner()).await)
    }

    type StreamExecInGuestStream = RpcStream<pb::ExecEvent>;

    async fn stream_exec_in_guest(
        &self,
        request: Request<pb::ExecuteInGuestRequest>,
    ) -> Result<Response<Self::StreamExecInGuestStream>, Status> {
        stream_reply(
            self.agent.stream_exec_in_guest(request.into_inner()).await,
            status::agent,
        )
    }

    async fn kill_guest_exec(
        &self,
        request: Request<pb::KillGuestExecRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        agent_reply(self.agent.kill_guest_exec(request.into_inner()).await)
    }

    type ReadGuestFileStream = RpcStream<pb::GuestFileChunk>;

    async fn read_guest_file(
        &self,
        request: Request<pb::ReadGuestFileRequest>,
    ) -> Result<Response<Self::ReadGuestFileStream>, Status> {
        stream_reply(
            self.agent.read_guest_file(request.into_inner()).await,
            status::agent,
        )
    }

    async fn write_guest_file(
        &self,
        request: Request<Streaming<pb::WriteGuestFileRequest>>,
    ) -> Result<Response<qx_proto::agent::FileWriteDone>, Status> {
        self.agent
            .write_guest_file(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| match e {
                WriteError::Agent(e) => status::agent(e),
                WriteError::Caller(s) => s,
            })
    }

    async fn list_guest_dir(
        &self,
        request: Request<pb::GuestListRequest>,
    ) -> Result<Response<qx_proto::agent::FileList>, Status> {
        agent_reply(self.agent.list_guest_dir(request.into_inner()).await)
    }

    async fn stat_guest_path(
        &self,
        request: Request<pb::GuestStatRequest>,
    ) -> Result<Response<qx_proto::agent::FileStat>, Status> {
        agent_reply(self.agent.stat_guest_path(request.into_inner()).await)
    }

    async fn mkdir_guest(
        &self,
        request: Request<pb::GuestMkdirRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        agent_reply(self.agent.mkdir_guest(request.into_inner()).await)
    }

    async fn delete_guest_path(
        &self,
        request: Request<pb::GuestDeleteRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        agent_reply(self.agent.delete_guest_path(request.into_inner()).await)
    }

    async fn hash_guest_file(
        &self,
        request: Request<pb::GuestHashRequest>,
    ) -> Result<Response<qx_proto::agent::FileHash>, Status> {
        agent_reply(self.agent.hash_guest_file(request.into_inner()).await)
    }

    async fn guest_shutdown(
        &self,
        request: Request<pb::GuestPowerRequest>,
    ) -> Result<Response<qx_proto::agent::PowerReply>, Status> {
        agent_reply(self.agent.guest_shutdown(request.into_inner()).await)
    }

    async fn guest_reboot(
        &self,
        request: Request<pb::GuestPowerRequest>,
    ) -> Result<Response<qx_proto::agent::PowerReply>, Status> {
        agent_reply(self.agent.guest_reboot(request.into_inner()).await)
    }

    async fn quiesce_filesystems(
        &self,
        request: Request<pb::QuiesceFilesystemsRequest>,
    ) -> Result<Response<qx_proto::agent::FsFreezeReply>, Status> {
        agent_reply(self.agent.quiesce_filesystems(request.into_inner()).await)
    }

    async fn thaw_filesystems(
        &self,
        request: Request<pb::ThawFilesystemsRequest>,
    ) -> Result<Response<qx_proto::agent::FsThawReply>, Status> {
        agent_reply(self.agent.thaw_filesystems(request.into_inner()).await)
    }

    async fn fs_freeze_status(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<qx_proto::agent::FsFreezeStatus>, Status> {
        agent_reply(self.agent.fs_freeze_status(request.into_inner()).await)
    }

    async fn trim_filesystems(
        &self,
        request: Request<pb::TrimFilesystemsRequest>,
    ) -> Result<Response<qx_proto::agent::FsTrimReply>, Status> {
        agent_reply(self.agent.trim_filesystems(request.into_inner()).await)
    }

    async fn sync_time(
        &self,
        request: Request<pb::SyncTimeRequest>,
    ) -> Result<Response<pb::SyncTimeResponse>, Status> {
        agent_reply(self.agent.sync_time(request.into_inner()).await)
    }

    async fn get_guest_time(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<qx_proto::agent::TimeInfo>, Status> {
        agent_reply(self.agent.get_guest_time(request.into_inner()).await)
    }

    async fn list_guest_users(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<qx_proto::agent::UserList>, Status> {
        agent_reply(self.agent.list_guest_users(request.into_inner()).await)
    }

    async fn set_guest_password(
        &self,
        request: Request<pb::SetGuestPasswordRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        agent_reply(self.agent.set_guest_password(request.into_inner()).await)
    }

    async fn list_ssh_keys(
        &self,
        request: Request<pb::GuestUserRequest>,
    ) -> Result<Response<qx_proto::agent::SshKeys>, Status> {
        agent_reply(self.agent.list_ssh_keys(request.into_inner()).await)
    }

    async fn add_ssh_keys(
        &self,
        request: Request<pb::SshKeysChangeRequest>,
    ) -> Result<Response<qx_proto::agent::SshKeys>, Status> {
        agent_reply(self.agent.add_ssh_keys(request.into_inner()).await)
    }

    async fn remove_ssh_keys(
        &self,
        request: Request<pb::SshKeysChangeRequest>,
    ) -> Result<Response<qx_proto::agent::SshKeys>, Status> {
        agent_reply(self.agent.remove_ssh_keys(request.into_inner()).await)
    }

    async fn get_guest_network(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<qx_proto::agent::NetworkInfo>, Status> {
        agent_reply(self.agent.get_guest_network(request.into_inner()).await)
    }

    async fn get_guest_disks(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<qx_proto::agent::DisksInfo>, Status> {
        agent_reply(self.agent.get_guest_disks(request.into_inner()).await)
    }

    async fn get_guest_logs(
        &self,
        request: Request<pb::GuestLogsRequest>,
    ) -> Result<Response<qx_proto::agent::AgentLogs>, Status> {
        agent_reply(self.agent.get_guest_logs(request.into_inner()).await)
    }

    type StreamTelemetryStream = RpcStream<pb::TelemetryUpdate>;

    async fn stream_telemetry(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<Self::StreamTelemetryStream>, Status> {
        stream_reply(
            self.agent.stream_telemetry(request.into_inner()).await,
            status::agent,
        )
    }

    // --- storage: delegated to StorageApi (host/src/storage/api.rs) ---

    async fn init_storage_pool(
        &self,
        request: Request<pb::InitStoragePoolRequest>,
    ) -> Result<Response<pb::StoragePoolInfoResponse>, Status> {
        let r = request.into_inner();
        self.vm
            .storage()
            .init_storage_pool(r)
            .await
            .map(Response::new)
    }

    async fn list_storage_pools(
        &self,
        _request: Request<pb::ListStoragePoolsRequest>,
    ) -> Result<Response<pb::ListStoragePoolsResponse>, Status> {
        self.vm
            .storage()
            .list_storage_pools()
            .await
            .map(Response::new)
    }

    async fn get_storage_pool(
        &self,
        request: Request<pb::StoragePoolRequest>,
    ) -> Result<Response<pb::StoragePoolInfoResponse>, Status> {
        let r = request.into_inner();
        self.vm
            .storage()
            .get_storage_pool(r, false)
            .await
            .map(Response::new)
    }

    async fn refresh_storage_pool(
        &self,
        request: Request<pb::StoragePoolRequest>,
    ) -> Result<Response<pb::StoragePoolInfoResponse>, Status> {
        let r = request.into_inner();
        self.vm
            .storage()
            .get_storage_pool(r, true)
            .await
            .map(Response::new)
    }

    async fn delete_storage_pool(
        &self,
        request: Request<pb::DeleteStoragePoolRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.vm
            .storage()
            .delete_storage_pool(r)
            .await
            .map(Response::new)
    }

    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        let r = request.into_inner();
        self.vm.storage().create_volume(r).await.map(Response::new)
    }

    async fn list_volumes(
        &self,
        request: Request<pb::StoragePoolRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        self.vm.storage().list_volumes(r).await.map(Response::new)
    }

    async fn get_volume(
        &self,
        request: Request<pb::VolumeRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        let r = request.into_inner();
        self.vm.storage().get_volume(r).await.map(Response::new)
    }

    async fn resize_volume(
        &self,
        request: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        let r = request.into_inner();
        self.vm.storage().resize_volume(r).await.map(Response::new)
    }

    async fn snapshot_volume(
        &self,
        request: Request<pb::SnapshotVolumeRequest>,
    ) -> Result<Response<pb::SnapshotVolumeResponse>, Status> {
        let r = request.into_inner();
        self.vm
            .storage()
            .snapshot_volume(r)
            .await
            .map(Response::new)
    }

    type CloneVolumeStream = RpcStream<pb::VolumeProgress>;

    async fn clone_volume(
        &self,
        request: Request<pb::CloneVolumeRequest>,
    ) -> Result<Response<Self::CloneVolumeStream>, Status> {
        let r = request.into_inner();
        self.vm.storage().clone_volume(r).await.map(Response::new)
    }

    async fn delete_volume(
        &self,
        request: Request<pb::VolumeRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.vm.storage().delete_volume(r).await.map(Response::new)
    }

    async fn upload_volume(
        &self,
        request: Request<Streaming<pb::UploadVolumeRequest>>,
    ) -> Result<Response<pb::VolumeTransferDone>, Status> {
        let r = request.into_inner();
        self.vm.storage().upload_volume(r).await.map(Response::new)
    }

    type DownloadVolumeStream = RpcStream<pb::VolumeChunk>;

    async fn download_volume(
        &self,
        request: Request<pb::DownloadVolumeRequest>,
    ) -> Result<Response<Self::DownloadVolumeStream>, Status> {
        let r = request.into_inner();
        self.vm
            .storage()
            .download_volume(r)
            .await
            .map(Response::new)
    }
}
