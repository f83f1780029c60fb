//! Node, VM lifecycle, snapshot, media and event RPCs, backed by libvirt.

use crate::agent_api::AgentApi;
use crate::pb;
use crate::service::RpcStream;
use std::path::PathBuf;
use std::sync::Arc;
use tonic::Status;

/// Where the VM side of the daemon finds its hypervisor and files.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// libvirt connection URI, e.g. `qemu:///system` or `test:///default`.
    pub libvirt_uri: String,
    /// Directory of the per-VM agent sockets: `<socket_dir>/<vm-id>.agent.sock`.
    pub socket_dir: PathBuf,
    /// Directory for disk images created by CreateVM.
    pub image_dir: PathBuf,
    /// The agent ISO that MountAgentIso inserts.
    pub agent_iso: Option<PathBuf>,
}

/// Node, VM lifecycle, snapshot, media and event RPCs, backed by libvirt.
#[derive(Debug)]
pub struct VmApi {
    #[allow(dead_code)]
    config: VmConfig,
    #[allow(dead_code)]
    agent: Arc<AgentApi>,
}

impl VmApi {
    /// Connects to the hypervisor and binds every running VM's agent socket.
    pub fn new(config: VmConfig, agent: Arc<AgentApi>) -> anyhow::Result<Self> {
        Ok(VmApi { config, agent })
    }

    pub async fn health_check(
        &self,
        _request: pb::HealthCheckRequest,
    ) -> Result<pb::HealthCheckResponse, Status> {
        Err(Status::unimplemented("health_check"))
    }

    pub async fn get_node_info(
        &self,
        _request: pb::GetNodeInfoRequest,
    ) -> Result<pb::NodeInfo, Status> {
        Err(Status::unimplemented("get_node_info"))
    }

    pub async fn create_vm(&self, _request: pb::CreateVmRequest) -> Result<pb::VmStatus, Status> {
        Err(Status::unimplemented("create_vm"))
    }

    pub async fn start_vm(&self, _request: pb::VmIdRequest) -> Result<pb::VmStatus, Status> {
        Err(Status::unimplemented("start_vm"))
    }

    pub async fn stop_vm(&self, _request: pb::StopVmRequest) -> Result<pb::StopVmResponse, Status> {
        Err(Status::unimplemented("stop_vm"))
    }

    pub async fn force_stop_vm(&self, _request: pb::VmIdRequest) -> Result<pb::VmStatus, Status> {
        Err(Status::unimplemented("force_stop_vm"))
    }

    pub async fn reboot_vm(&self, _request: pb::VmIdRequest) -> Result<pb::VmStatus, Status> {
        Err(Status::unimplemented("reboot_vm"))
    }

    pub async fn pause_vm(&self, _request: pb::VmIdRequest) -> Result<pb::VmStatus, Status> {
        Err(Status::unimplemented("pause_vm"))
    }

    pub async fn resume_vm(&self, _request: pb::VmIdRequest) -> Result<pb::VmStatus, Status> {
        Err(Status::unimplemented("resume_vm"))
    }

    pub async fn delete_vm(
        &self,
        _request: pb::DeleteVmRequest,
    ) -> Result<pb::DeleteVmResponse, Status> {
        Err(Status::unimplemented("delete_vm"))
    }

    pub async fn get_vm_status(&self, _request: pb::VmIdRequest) -> Result<pb::VmStatus, Status> {
        Err(Status::unimplemented("get_vm_status"))
    }

    pub async fn list_v_ms(
        &self,
        _request: pb::ListVmsRequest,
    ) -> Result<pb::ListVmsResponse, Status> {
        Err(Status::unimplemented("list_v_ms"))
    }

    pub async fn create_snapshot(
        &self,
        _request: pb::CreateSnapshotRequest,
    ) -> Result<pb::Snapshot, Status> {
        Err(Status::unimplemented("create_snapshot"))
    }

    pub async fn list_snapshots(
        &self,
        _request: pb::VmIdRequest,
    ) -> Result<pb::ListSnapshotsResponse, Status> {
        Err(Status::unimplemented("list_snapshots"))
    }

    pub async fn revert_snapshot(
        &self,
        _request: pb::SnapshotRequest,
    ) -> Result<pb::VmStatus, Status> {
        Err(Status::unimplemented("revert_snapshot"))
    }

    pub async fn delete_snapshot(
        &self,
        _request: pb::SnapshotRequest,
    ) -> Result<pb::DeleteSnapshotResponse, Status> {
        Err(Status::unimplemented("delete_snapshot"))
    }

    pub async fn change_media(
        &self,
        _request: pb::ChangeMediaRequest,
    ) -> Result<pb::ChangeMediaResponse, Status> {
        Err(Status::unimplemented("change_media"))
    }

    pub async fn mount_agent_iso(
        &self,
        _request: pb::VmIdRequest,
    ) -> Result<pb::ChangeMediaResponse, Status> {
        Err(Status::unimplemented("mount_agent_iso"))
    }

    pub async fn eject_agent_iso(
        &self,
        _request: pb::VmIdRequest,
    ) -> Result<pb::ChangeMediaResponse, Status> {
        Err(Status::unimplemented("eject_agent_iso"))
    }

    pub async fn get_console(&self, _request: pb::VmIdRequest) -> Result<pb::ConsoleInfo, Status> {
        Err(Status::unimplemented("get_console"))
    }

    pub async fn stream_events(
        &self,
        _request: pb::StreamEventsRequest,
    ) -> Result<RpcStream<pb::NodeEvent>, Status> {
        Err(Status::unimplemented("stream_events"))
    }

    pub async fn stream_metrics(
        &self,
        _request: pb::StreamMetricsRequest,
    ) -> Result<RpcStream<pb::VmMetrics>, Status> {
        Err(Status::unimplemented("stream_metrics"))
    }
}
