//! [`NoHypervisor`]: a hypervisor with nothing behind it.

use super::{DomainInfo, DomainRef, HostFacts, Hypervisor, HypervisorError, SnapshotRecord};
use std::sync::Mutex;

/// The hypervisor when libvirt is off or unreachable, and the one stub the tests use: the
/// VM list is whatever was last [set](NoHypervisor::set_domains) (empty at first) and every
/// other call fails `Unreachable` with the reason given. With the empty list the daemon's
/// agent bindings from `--vm-socket` stay untouched.
#[derive(Debug)]
pub struct NoHypervisor {
    why: String,
    domains: Mutex<Vec<DomainRef>>,
}

impl NoHypervisor {
    pub fn new(why: impl Into<String>) -> NoHypervisor {
        NoHypervisor {
            why: why.into(),
            domains: Mutex::new(Vec::new()),
        }
    }

    /// What [`Hypervisor::list`] answers from now on.
    pub fn set_domains(&self, domains: Vec<DomainRef>) {
        *self.domains.lock().unwrap_or_else(|p| p.into_inner()) = domains;
    }

    fn err<T>(&self) -> Result<T, HypervisorError> {
        Err(HypervisorError::Unreachable(self.why.clone()))
    }
}

impl Hypervisor for NoHypervisor {
    fn uri(&self) -> &str {
        "none"
    }
    fn domain_type(&self) -> &str {
        "none"
    }
    fn is_alive(&self) -> bool {
        false
    }
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        self.err()
    }
    fn list(&self) -> Result<Vec<DomainRef>, HypervisorError> {
        Ok(self
            .domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
    fn resolve(&self, _: &str) -> Result<String, HypervisorError> {
        self.err()
    }
    fn define(&self, _: &str) -> Result<String, HypervisorError> {
        self.err()
    }
    fn undefine(&self, _: &str, _: bool) -> Result<(), HypervisorError> {
        self.err()
    }
    fn info(&self, _: &str) -> Result<DomainInfo, HypervisorError> {
        self.err()
    }
    fn xml(&self, _: &str, _: bool) -> Result<String, HypervisorError> {
        self.err()
    }
    fn start(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn shutdown(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn destroy(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn reboot(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn suspend(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn resume(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn update_device(&self, _: &str, _: &str, _: bool) -> Result<(), HypervisorError> {
        self.err()
    }
    fn snapshot_create(&self, _: &str, _: &str) -> Result<String, HypervisorError> {
        self.err()
    }
    fn snapshot_list(&self, _: &str) -> Result<Vec<SnapshotRecord>, HypervisorError> {
        self.err()
    }
    fn snapshot_get(&self, _: &str, _: &str) -> Result<SnapshotRecord, HypervisorError> {
        self.err()
    }
    fn snapshot_revert(&self, _: &str, _: &str, _: bool) -> Result<(), HypervisorError> {
        self.err()
    }
    fn snapshot_delete(&self, _: &str, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn block_stats(&self, _: &str, _: &str) -> Result<(u64, u64), HypervisorError> {
        self.err()
    }
    fn interface_stats(&self, _: &str, _: &str) -> Result<(u64, u64), HypervisorError> {
        self.err()
    }
}
