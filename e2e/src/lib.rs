//! Whole-VM test harness for the Quantix agent.
//!
//! Layers, bottom up:
//! - [`image`]: where the VM image built by `ci/vm/build-image.sh` lives.
//! - [`qemu`]: a QEMU process per [`qemu::Vm`], owned by pid: killed on drop, its serial console
//!   kept in a file and printed when the test that owned it failed.
//! - [`wire`]: a raw host-side client of the agent protocol over the chardev socket (frames
//!   from `qx_proto`), for the first boot check, fault injection and the benchmark.
//! - [`node`]: the real `qx-node` daemon as a child process, and its gRPC client.
//! - [`sys`]: the only unsafe code: children die with the thread that started them.

pub mod image;
pub mod node;
pub mod qemu;
pub mod sys;
pub mod wire;

pub use image::Image;
pub use node::Node;
pub use qemu::{Vm, VmSpec};
pub use wire::AgentConn;
