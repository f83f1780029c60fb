//! `qxctl vm|snapshot|media|events`: VM lifecycle commands.

use clap::Subcommand;

/// `qxctl vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List the VMs on the node.
    List,
}
