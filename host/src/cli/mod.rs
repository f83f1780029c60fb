//! qxctl's subcommands, one module per area.

pub mod agent_cmds;
pub mod dispatch;
pub mod install_cmd;
pub mod node_cmds;
pub mod storage_cmds;
pub mod uds;
pub mod vm_cmds;

use clap::{Parser, Subcommand};

/// Exit codes of qxctl (also listed in `qxctl --help`).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The operation failed (the message says why).
    pub const FAILED: i32 = 1;
    /// Bad usage (clap's own code).
    pub const USAGE: i32 = 2;
    /// The VM, its agent socket, or the guest path does not exist.
    pub const NOT_FOUND: i32 = 3;
    /// The daemon or the agent is unreachable, or a deadline passed.
    pub const UNAVAILABLE: i32 = 4;
    /// Data did not verify (sha256 mismatch).
    pub const INTEGRITY: i32 = 5;
    /// `qxctl exec` only: qxctl itself failed (the command's own codes are passed through).
    pub const EXEC_FAILED: i32 = 125;
}

const EXIT_HELP: &str = "\
EXIT CODES:
    0    success
    1    the operation failed (the message says why)
    2    bad usage
    3    the VM, its agent socket or the guest path does not exist
    4    the daemon or the agent is unreachable, or a deadline passed
    5    data did not verify (sha256 mismatch)
    qxctl exec: the command's own exit code, 128+N when killed by signal N, 125 when qxctl
    itself failed";

/// qxctl: the Quantix node daemon's command-line client.
#[derive(Debug, Parser)]
#[command(
    name = "qxctl",
    version,
    about = "Command-line client of the Quantix node daemon (qx-node)",
    long_about = "Command-line client of the Quantix node daemon (qx-node): talks to its gRPC \
API to reach VMs' guest agents (ping, exec, file copy, filesystem freeze, time) and, with the \
vm commands, the VM lifecycle.",
    after_help = EXIT_HELP
)]
pub struct Cli {
    /// The daemon's gRPC address: unix:/PATH (its unix socket), a URI, or HOST:PORT (http,
    /// or https with --ca/--cert).
    #[arg(
        long,
        global = true,
        env = "QXCTL_ADDR",
        default_value = "unix:/run/quantix-kvm/qx-node.sock"
    )]
    pub addr: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// CA certificate (PEM) that the daemon's TLS certificate must chain to; use an
    /// https:// --addr.
    #[arg(long, global = true, env = "QXCTL_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "QXCTL_CERT")]
    pub cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true, env = "QXCTL_KEY")]
    pub key: Option<std::path::PathBuf>,
    /// Server name to verify in the daemon's certificate [default: the --addr host].
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
    /// Per-call timeout passed to the daemon in milliseconds (0: the daemon's default).
    #[arg(long, global = true, default_value_t = 0)]
    pub timeout_ms: u32,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Guest agent: ping, info, logs, connection stats, install, shutdown, reboot.
    #[command(subcommand)]
    Agent(agent_cmds::AgentCommand),
    /// Run a command in the guest, streaming its output; exits with its exit code.
    Exec(agent_cmds::ExecArgs),
    /// Copy a file to or from a guest: `qxctl cp VM:PATH LOCAL` or `qxctl cp LOCAL VM:PATH`.
    Cp(agent_cmds::CpArgs),
    /// Guest filesystems: freeze, thaw, status, trim.
    #[command(subcommand)]
    Fs(agent_cmds::FsCommand),
    /// Guest clock: sync to the host, or read it.
    #[command(subcommand)]
    Time(agent_cmds::TimeCommand),
    /// Live telemetry of a guest until interrupted.
    Watch(agent_cmds::VmArg),
    /// VM lifecycle: list, create, start, stop, ...
    #[command(subcommand)]
    Vm(vm_cmds::VmCommand),
    /// VM snapshots (quiesced through the agent when asked).
    #[command(subcommand)]
    Snapshot(vm_cmds::SnapshotCommand),
    /// CD-ROM media and the agent ISO.
    #[command(subcommand)]
    Media(vm_cmds::MediaCommand),
    /// The node's event stream (VM and agent changes).
    Events(vm_cmds::EventsArgs),
    /// The node: host, hypervisor and daemon health.
    #[command(subcommand)]
    Node(node_cmds::NodeCommand),
    /// Storage pools: list, info, create, delete, refresh.
    #[command(subcommand)]
    Pool(storage_cmds::PoolCommand),
    /// Storage volumes: list, info, create, resize, clone, delete, upload, download.
    #[command(subcommand)]
    Volume(storage_cmds::VolumeCommand),
}
