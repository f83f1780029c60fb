//! qx-node: the Quantix node daemon.
//!
//! Layers: [`service`] (the generated gRPC surface, delegation only) over [`vm_api`] (libvirt)
//! and [`agent_api`] (guest-agent RPCs) over [`agent`] (one link per VM: connection, reader,
//! writer, command lifecycle). [`error`] maps agent errors to gRPC status codes in one place;
//! [`metrics`] renders the Prometheus text endpoint; [`config`] is the daemon's configuration.

/// Messages and the `NodeDaemonService` of `node.proto` (package `quantix.node.v1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("quantix.node.v1");
}

pub mod agent;
pub mod agent_api;
pub mod cli;
pub mod config;
pub mod error;
pub mod hypervisor;
pub mod metrics;
pub mod service;
pub mod text;
pub mod vm_api;
