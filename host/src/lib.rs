//! qx-node: the Quantix node daemon.
//!
//! Layers, each importing only the ones below it: [`service`] (the generated gRPC surface,
//! delegation only, and the one mapping of errors to `tonic::Status`) over [`vm_api`]
//! (libvirt; `VmError`) and [`agent_api`] (typed guest-agent operations; [`error::AgentError`])
//! over [`agent`] (one link per VM: connection, reader, writer, and the sans-io command table)
//! over `qx-proto`. [`stream`] is the stream shape the layers share; [`metrics`] renders the
//! Prometheus text endpoint;
//! [`rpc_layer`] is the tower layer at the gRPC edge (request spans, RPC metrics);
//! [`health`] the standard health and reflection services; [`config`] is the daemon's
//! configuration; [`logging`] sets up its `tracing` output; [`manpages`] writes man pages
//! and completions from the clap definitions; [`systemd`] the readiness notification; [`sys`]
//! the process limits (`RLIMIT_NOFILE`).

/// Messages and the `NodeDaemonService` of `node.proto` (package `quantix.node.v1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("quantix.node.v1");

    /// The encoded `FileDescriptorSet` of node.proto and agent.proto (server reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/node_descriptor.bin"));
}

pub mod agent;
pub mod agent_api;
pub mod cli;
pub mod config;
pub mod error;
pub mod health;
pub mod hypervisor;
#[cfg(test)]
mod layers;
pub mod listen;
pub mod logging;
pub mod manpages;
pub mod metrics;
pub mod rpc_layer;
pub mod service;
pub mod storage;
pub mod stream;
pub mod sys;
pub mod systemd;
pub mod text;
pub mod vm_api;
pub mod vm_metrics;
