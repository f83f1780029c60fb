//! qx-node: the Quantix node daemon.

/// Messages and the `NodeDaemonService` of `node.proto` (package `quantix.node.v1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("quantix.node.v1");
}

pub mod agent_api;
pub mod cli;
pub mod service;
pub mod vm_api;
