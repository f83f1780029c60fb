//! `qxctl node ...`: the node itself (GetNodeInfo, HealthCheck).

use crate::pb;
use crate::pb::node_daemon_service_client::NodeDaemonServiceClient;
use clap::Subcommand;
use tonic::transport::Channel;

/// `qxctl node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Host, hypervisor, running VMs and connected agents, and the daemon's health.
    Info,
}

#[derive(Debug, serde::Serialize)]
struct NodeView {
    info: pb::NodeInfo,
    health: pb::HealthCheckResponse,
}

pub async fn run_node(
    cmd: NodeCommand,
    client: &mut NodeDaemonServiceClient<Channel>,
    json: bool,
) -> anyhow::Result<i32> {
    match cmd {
        NodeCommand::Info => {
            let health = client
                .health_check(pb::HealthCheckRequest::default())
                .await?
                .into_inner();
            let info = client
                .get_node_info(pb::GetNodeInfoRequest::default())
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&NodeView { info, health })?
                );
                return Ok(super::exit::OK);
            }
            let gib = info.memory_bytes as f64 / (1u64 << 30) as f64;
            println!("hostname     {}", info.hostname);
            println!("qx-node      {} (up {} s)", info.version, health.uptime_s);
            println!(
                "hypervisor   {} (version {}), {}",
                info.hypervisor_uri,
                info.hypervisor_version,
                if health.hypervisor_reachable {
                    "reachable"
                } else {
                    "UNREACHABLE"
                }
            );
            println!("cpus         {} ({})", info.cpus, info.cpu_model);
            println!("memory       {gib:.1} GiB");
            println!("running VMs  {}", info.running_vms);
            println!("agents       {} connected", info.agents_connected);
        }
    }
    Ok(super::exit::OK)
}
