//! The standard gRPC services beside `NodeDaemonService`: health checking
//! (`grpc.health.v1.Health`) and server reflection (`grpc.reflection.v1` and `v1alpha`), so
//! that `grpcurl`, `grpc_health_probe`, load balancers and Kubernetes probes work unchanged.
//!
//! Health: the overall service (`""`) and `quantix.node.v1.NodeDaemonService` are SERVING
//! while libvirt answers and NOT_SERVING while it does not (down, unreachable, or disabled
//! with `--libvirt-uri none`: the node cannot run VMs then, although the guest-agent RPCs
//! still work). The status is checked every [`HEALTH_POLL_INTERVAL_MS`]; `Watch` callers hear
//! each change.

use crate::pb::node_daemon_service_server::NodeDaemonServiceServer;
use crate::service::NodeService;
use crate::vm_api::VmApi;
use std::sync::Arc;
use std::time::Duration;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// How often libvirt's reachability is checked for the health service.
pub const HEALTH_POLL_INTERVAL_MS: u64 = 5000;

/// Why the standard services could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StandardServicesError {
    #[error("the reflection service cannot read the compiled descriptors")]
    Reflection(#[source] tonic_reflection::server::Error),
}

/// The health reporter and its gRPC service.
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// Server reflection, v1 and v1alpha (older clients speak only the latter), describing
/// node.proto, agent.proto and the health service.
#[allow(clippy::type_complexity)]
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    StandardServicesError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .build_v1()
        .map_err(StandardServicesError::Reflection)?;
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(StandardServicesError::Reflection)?;
    Ok((v1, v1alpha))
}

/// The serving status for libvirt's reachability.
pub fn status_for(hypervisor_reachable: bool) -> ServingStatus {
    if hypervisor_reachable {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Checks libvirt once and publishes the status; returns whether it is reachable.
pub async fn check_once(vm: &VmApi, reporter: &HealthReporter) -> bool {
    let reachable = vm
        .health_check(Default::default())
        .await
        .map(|r| r.hypervisor_reachable)
        .unwrap_or(false);
    let status = status_for(reachable);
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <NodeDaemonServiceServer<NodeService> as NamedService>::NAME,
            status,
        )
        .await;
    reachable
}

/// Publishes libvirt's reachability until the process ends, logging each change.
pub async fn watch(vm: Arc<VmApi>, reporter: HealthReporter) {
    let mut last = None;
    loop {
        let reachable = check_once(&vm, &reporter).await;
        if last != Some(reachable) {
            if reachable {
                log::info!("health: SERVING (libvirt reachable)");
            } else {
                log::warn!("health: NOT_SERVING (libvirt unreachable or disabled)");
            }
            last = Some(reachable);
        }
        tokio::time::sleep(Duration::from_millis(HEALTH_POLL_INTERVAL_MS)).await;
    }
}
