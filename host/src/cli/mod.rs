//! qxctl's subcommands, one module per area.

pub mod vm_cmds;
