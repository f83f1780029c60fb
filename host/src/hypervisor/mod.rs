//! The hypervisor backend of the VM half of `qx-node`.
//!
//! Layers, bottom up:
//! - [`xml`]: a small element tree over quick-xml (escaping writer, entity-aware reader).
//! - [`domain`]: the structured [`domain::DomainSpec`] and the libvirt domain XML it becomes,
//!   and [`domain::DomainFacts`], what the daemon reads back from a domain's XML (agent
//!   socket, disks, console, labels).
//! - [`Hypervisor`]: the blocking operations the daemon needs, implemented for libvirt by
//!   [`libvirt::Libvirt`] (and by [`none::NoHypervisor`] when there is none). Callers keep these calls off the async workers (`spawn_blocking`).
//! - [`events`]: the sequenced event ring behind `StreamEvents` and the lifecycle watcher
//!   that produces domain events by diffing domain states.

pub mod domain;
pub mod events;
pub mod libvirt;
pub mod none;
pub mod xml;

use std::fmt;

/// A domain's power state, as the daemon reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerState {
    Running,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    /// Suspended by the guest (ACPI S3/S4).
    PmSuspended,
    /// libvirt reported no state or one this daemon does not know.
    Unknown,
}

impl PowerState {
    /// True when the domain has a running QEMU process (it can be paused, stopped, ...).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            PowerState::Running
                | PowerState::Paused
                | PowerState::ShuttingDown
                | PowerState::PmSuspended
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::ShuttingDown => "shutting-down",
            PowerState::ShutOff => "shut-off",
            PowerState::Crashed => "crashed",
            PowerState::PmSuspended => "pm-suspended",
            PowerState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One domain in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRef {
    pub uuid: String,
    pub name: String,
    pub state: PowerState,
    /// Paused only for the moment by libvirt itself (starting up, taking a snapshot, saving,
    /// dumping, migrating, shutting down): not a pause anyone asked for.
    pub transient: bool,
}

/// Counters of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    pub state: PowerState,
    pub vcpus: u32,
    pub max_memory_kib: u64,
    pub memory_kib: u64,
    pub cpu_time_ns: u64,
}

/// Facts about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub hostname: String,
    pub hypervisor_version: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub cpu_model: String,
}

/// A snapshot as libvirt describes it: its XML and whether it is the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub name: String,
    pub xml: String,
    pub current: bool,
}

/// What failed in a hypervisor call, classified so the API can answer with a precise code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HypervisorError {
    #[error("no such VM: {0}")]
    NoDomain(String),
    #[error("no such snapshot: {0}")]
    NoSnapshot(String),
    #[error("already exists: {0}")]
    Exists(String),
    #[error("invalid definition: {0}")]
    Invalid(String),
    #[error("not possible in the VM's current state: {0}")]
    WrongState(String),
    #[error("not supported by this hypervisor: {0}")]
    Unsupported(String),
    #[error("hypervisor unreachable: {0}")]
    Unreachable(String),
    #[error("libvirt failed: {0}")]
    Failed(String),
}

/// The blocking hypervisor operations behind the VM API. Domains are named by UUID.
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// The connection URI.
    fn uri(&self) -> &str;
    /// The `<domain type=...>` this hypervisor runs: "kvm", "qemu" (TCG) or "test".
    fn domain_type(&self) -> &str;
    fn is_alive(&self) -> bool;
    /// Reopens a connection the daemon lost (libvirtd restarted); true when it did. Called
    /// by the lifecycle watcher on every tick.
    fn reconnect_if_dead(&self) -> bool {
        false
    }
    fn host_facts(&self) -> Result<HostFacts, HypervisorError>;

    fn list(&self) -> Result<Vec<DomainRef>, HypervisorError>;
    /// Resolves a VM id (UUID, or a domain name) to the domain's UUID.
    fn resolve(&self, id: &str) -> Result<String, HypervisorError>;
    /// Defines a persistent domain; returns its UUID.
    fn define(&self, xml: &str) -> Result<String, HypervisorError>;
    /// Removes the definition and its snapshot metadata (and NVRAM when `nvram`).
    fn undefine(&self, uuid: &str, nvram: bool) -> Result<(), HypervisorError>;
    fn info(&self, uuid: &str) -> Result<DomainInfo, HypervisorError>;
    fn state(&self, uuid: &str) -> Result<PowerState, HypervisorError> {
        self.info(uuid).map(|i| i.state)
    }
    /// The domain's XML: live when running and `inactive` is false, else the persistent one.
    fn xml(&self, uuid: &str, inactive: bool) -> Result<String, HypervisorError>;

    fn start(&self, uuid: &str) -> Result<(), HypervisorError>;
    /// ACPI power button.
    fn shutdown(&self, uuid: &str) -> Result<(), HypervisorError>;
    /// Pulls the plug.
    fn destroy(&self, uuid: &str) -> Result<(), HypervisorError>;
    fn reboot(&self, uuid: &str) -> Result<(), HypervisorError>;
    fn suspend(&self, uuid: &str) -> Result<(), HypervisorError>;
    fn resume(&self, uuid: &str) -> Result<(), HypervisorError>;

    /// Replaces a device (e.g. a CD-ROM's medium), forcing an eject of a locked tray. `live`
    /// also changes the running domain; the persistent definition is always changed.
    fn update_device(&self, uuid: &str, xml: &str, live: bool) -> Result<(), HypervisorError>;

    /// Creates a snapshot from `<domainsnapshot>` XML; returns its name.
    fn snapshot_create(&self, uuid: &str, xml: &str) -> Result<String, HypervisorError>;
    fn snapshot_list(&self, uuid: &str) -> Result<Vec<SnapshotRecord>, HypervisorError>;
    fn snapshot_get(&self, uuid: &str, name: &str) -> Result<SnapshotRecord, HypervisorError>;
    fn snapshot_revert(&self, uuid: &str, name: &str, start: bool) -> Result<(), HypervisorError>;
    fn snapshot_delete(&self, uuid: &str, name: &str) -> Result<(), HypervisorError>;

    /// (read, written) bytes of a disk target.
    fn block_stats(&self, uuid: &str, target: &str) -> Result<(u64, u64), HypervisorError>;
    /// (received, transmitted) bytes of a host-side interface.
    fn interface_stats(&self, uuid: &str, dev: &str) -> Result<(u64, u64), HypervisorError>;
    /// The libvirt connection, for the storage RPCs; `None` without libvirt.
    fn connection(&self) -> Option<virt::connect::Connect> {
        None
    }
}
