//! [`Hypervisor`] over libvirt with the `virt` crate. Every call blocks: callers run them on
//! blocking threads. One `Connect` is shared (libvirt connections are thread-safe) and
//! reopened by [`Hypervisor::reconnect_if_dead`] when libvirtd went away and came back.

use super::{
    DomainInfo, DomainRef, HostFacts, Hypervisor, HypervisorError, PowerState, SnapshotRecord,
};
use std::fmt;
use std::sync::RwLock;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::domain_snapshot::DomainSnapshot;
use virt::error::ErrorNumber;
use virt::sys;

/// A libvirt connection.
pub struct Libvirt {
    conn: RwLock<Connect>,
    uri: String,
    domain_type: String,
}

impl fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Libvirt")
            .field("uri", &self.uri)
            .field("domain_type", &self.domain_type)
            .finish()
    }
}

impl Libvirt {
    /// Opens `uri`. libvirt's default error printer (to stderr) is turned off: errors are
    /// returned and logged by the daemon instead.
    pub fn open(uri: &str) -> Result<Libvirt, HypervisorError> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| HypervisorError::Unreachable(msg(&e)))?;
        let domain_type = if uri.starts_with("test:") {
            "test".to_string()
        } else if kvm_usable() {
            "kvm".to_string()
        } else {
            "qemu".to_string()
        };
        Ok(Libvirt {
            conn: RwLock::new(conn),
            uri: uri.to_string(),
            domain_type,
        })
    }

    /// The current connection (a new reference to it).
    fn conn(&self) -> Connect {
        // Only a replaced connection is written under this lock: never half-updated.
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn domain(&self, uuid: &str) -> Result<Domain, HypervisorError> {
        self.conn()
            .lookup_domain_by_uuid_string(uuid)
            .map_err(|e| classify(e, uuid))
    }

    fn snapshot(&self, uuid: &str, name: &str) -> Result<DomainSnapshot, HypervisorError> {
        let dom = self.domain(uuid)?;
        Domain::lookup_snapshot_by_name(&dom, name, 0).map_err(|e| classify(e, name))
    }
}

/// KVM only where the CPU shows vmx/svm and the nested "PVM" module is absent: stock
/// kernels hang under kvm_pvm (see VIRTIO-SERIAL.md). Everything else runs TCG.
fn kvm_usable() -> bool {
    if !std::path::Path::new("/dev/kvm").exists()
        || std::path::Path::new("/sys/module/kvm_pvm").exists()
    {
        return false;
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines().any(|l| {
                l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm")
            })
        })
        .unwrap_or(false)
}

fn msg(e: &virt::error::Error) -> String {
    e.message().to_string()
}

/// Maps a libvirt error to the daemon's classes; `what` names the object looked up.
fn classify(e: virt::error::Error, what: &str) -> HypervisorError {
    let text = msg(&e);
    // The RPC layer failing ("Cannot write data: Broken pipe", "client socket is closed")
    // means libvirtd is gone, not that the operation was wrong: unavailable until the
    // lifecycle watcher reconnects.
    if matches!(
        e.domain(),
        virt::enumutil::Enum::Known(virt::error::ErrorDomain::Rpc)
    ) {
        return HypervisorError::Unreachable(text);
    }
    match e.code() {
        virt::enumutil::Enum::Known(code) => match code {
            ErrorNumber::NoDomain => HypervisorError::NoDomain(what.to_string()),
            ErrorNumber::NoDomainSnapshot => HypervisorError::NoSnapshot(what.to_string()),
            ErrorNumber::DomExist => HypervisorError::Exists(text),
            ErrorNumber::XmlError
            | ErrorNumber::XmlDetail
            | ErrorNumber::InvalidArg
            | ErrorNumber::ConfigUnsupported => HypervisorError::Invalid(text),
            ErrorNumber::OperationInvalid => HypervisorError::WrongState(text),
            ErrorNumber::NoSupport | ErrorNumber::OperationUnsupported => {
                HypervisorError::Unsupported(text)
            }
            _ => HypervisorError::Failed(text),
        },
        virt::enumutil::Enum::Unknown(_) => HypervisorError::Failed(text),
    }
}

fn power_state(state: virt::domain::DomainStateEnum) -> PowerState {
    match state {
        virt::enumutil::Enum::Known(s) => match s {
            DomainState::Running | DomainState::Blocked => PowerState::Running,
            DomainState::Paused => PowerState::Paused,
            DomainState::Shutdown => PowerState::ShuttingDown,
            DomainState::Shutoff => PowerState::ShutOff,
            DomainState::Crashed => PowerState::Crashed,
            DomainState::PMSuspended => PowerState::PmSuspended,
            DomainState::NoState => PowerState::Unknown,
        },
        virt::enumutil::Enum::Unknown(_) => PowerState::Unknown,
    }
}

/// A pause libvirt makes on its own for a moment (QEMU starts paused and is resumed once
/// set up; internal snapshots, saves and dumps pause the guest while they run).
fn transient_pause(reason: virt::domain::DomainStateReasonEnum) -> bool {
    use virt::domain::{DomainPausedReason as R, DomainStateReason};
    matches!(
        reason,
        virt::enumutil::Enum::Known(DomainStateReason::Paused(virt::enumutil::Enum::Known(
            R::StartingUp | R::Snapshot | R::Save | R::Dump | R::Migration | R::ShuttingDown
        )))
    )
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

fn snapshot_record(snap: &DomainSnapshot) -> Result<SnapshotRecord, HypervisorError> {
    let name = snap.name().map_err(|e| classify(e, "snapshot"))?;
    let xml = snap.xml_desc(0).map_err(|e| classify(e, &name))?;
    let current = snap.is_current(0).map_err(|e| classify(e, &name))?;
    Ok(SnapshotRecord { name, xml, current })
}

impl Hypervisor for Libvirt {
    fn connection(&self) -> Option<Connect> {
        Some(self.conn())
    }

    fn uri(&self) -> &str {
        &self.uri
    }

    fn domain_type(&self) -> &str {
        &self.domain_type
    }

    fn reconnect_if_dead(&self) -> bool {
        if self.conn().is_alive().unwrap_or(false) {
            return false;
        }
        match Connect::open(Some(&self.uri)) {
            Ok(fresh) => {
                log::warn!("libvirt connection to {} was lost; reopened", self.uri);
                *self.conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                true
            }
            Err(e) => {
                log::warn!("libvirt at {} is unreachable: {}", self.uri, msg(&e));
                false
            }
        }
    }

    fn is_alive(&self) -> bool {
        self.conn().is_alive().unwrap_or(false)
    }

    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        let conn = self.conn();
        let node = conn.node_info().map_err(|e| classify(e, "node"))?;
        let hostname = conn.hostname().map_err(|e| classify(e, "node"))?;
        let version = conn.hyp_version().map(version_string).unwrap_or_default();
        Ok(HostFacts {
            hostname,
            hypervisor_version: version,
            cpus: node.cpus,
            memory_bytes: node.memory.saturating_mul(1024),
            cpu_model: node.model,
        })
    }

    fn list(&self) -> Result<Vec<DomainRef>, HypervisorError> {
        let domains = self
            .conn()
            .list_all_domains(0)
            .map_err(|e| classify(e, "domains"))?;
        let mut out = Vec::with_capacity(domains.len());
        for dom in domains {
            // A domain undefined between the listing and these calls is skipped.
            let (Ok(uuid), Ok(name), Ok((state, reason))) =
                (dom.uuid_string(), dom.name(), dom.state())
            else {
                continue;
            };
            out.push(DomainRef {
                uuid,
                name,
                state: power_state(state),
                transient: transient_pause(reason),
            });
        }
        Ok(out)
    }

    fn resolve(&self, id: &str) -> Result<String, HypervisorError> {
        let dom = if uuid::Uuid::parse_str(id).is_ok() {
            self.conn().lookup_domain_by_uuid_string(id)
        } else {
            self.conn().lookup_domain_by_name(id)
        };
        dom.and_then(|d| d.uuid_string())
            .map_err(|e| classify(e, id))
    }

    fn define(&self, xml: &str) -> Result<String, HypervisorError> {
        let dom = self
            .conn()
            .define_domain_xml(xml)
            .map_err(|e| classify(e, "domain"))?;
        dom.uuid_string().map_err(|e| classify(e, "domain"))
    }

    fn undefine(&self, uuid: &str, nvram: bool) -> Result<(), HypervisorError> {
        let mut flags = sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
        if nvram {
            flags |= sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        }
        self.domain(uuid)?
            .undefine_flags(flags)
            .map_err(|e| classify(e, uuid))
    }

    fn info(&self, uuid: &str) -> Result<DomainInfo, HypervisorError> {
        let info = self.domain(uuid)?.info().map_err(|e| classify(e, uuid))?;
        Ok(DomainInfo {
            state: power_state(info.state),
            vcpus: info.nr_virt_cpu,
            max_memory_kib: info.max_mem,
            memory_kib: info.memory,
            cpu_time_ns: info.cpu_time,
        })
    }

    fn state(&self, uuid: &str) -> Result<PowerState, HypervisorError> {
        let (state, _) = self.domain(uuid)?.state().map_err(|e| classify(e, uuid))?;
        Ok(power_state(state))
    }

    fn xml(&self, uuid: &str, inactive: bool) -> Result<String, HypervisorError> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.domain(uuid)?
            .xml_desc(flags)
            .map_err(|e| classify(e, uuid))
    }

    fn start(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.domain(uuid)?.create().map_err(|e| classify(e, uuid))
    }

    fn shutdown(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.domain(uuid)?.shutdown().map_err(|e| classify(e, uuid))
    }

    fn destroy(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.domain(uuid)?.destroy().map_err(|e| classify(e, uuid))
    }

    fn reboot(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.domain(uuid)?.reboot(0).map_err(|e| classify(e, uuid))
    }

    fn suspend(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.domain(uuid)?.suspend().map_err(|e| classify(e, uuid))
    }

    fn resume(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.domain(uuid)?.resume().map_err(|e| classify(e, uuid))
    }

    fn update_device(&self, uuid: &str, xml: &str, live: bool) -> Result<(), HypervisorError> {
        let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG | sys::VIR_DOMAIN_DEVICE_MODIFY_FORCE;
        if live {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        self.domain(uuid)?
            .update_device_flags(xml, flags)
            .map_err(|e| classify(e, uuid))
    }

    fn snapshot_create(&self, uuid: &str, xml: &str) -> Result<String, HypervisorError> {
        let snap = self
            .domain(uuid)?
            .create_snapshot_xml(xml, 0)
            .map_err(|e| classify(e, uuid))?;
        snap.name().map_err(|e| classify(e, uuid))
    }

    fn snapshot_list(&self, uuid: &str) -> Result<Vec<SnapshotRecord>, HypervisorError> {
        let snaps = self
            .domain(uuid)?
            .list_all_snapshots(0)
            .map_err(|e| classify(e, uuid))?;
        snaps.iter().map(snapshot_record).collect()
    }

    fn snapshot_get(&self, uuid: &str, name: &str) -> Result<SnapshotRecord, HypervisorError> {
        snapshot_record(&self.snapshot(uuid, name)?)
    }

    fn snapshot_revert(&self, uuid: &str, name: &str, start: bool) -> Result<(), HypervisorError> {
        let flags = if start {
            sys::VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
        } else {
            0
        };
        self.snapshot(uuid, name)?
            .revert(flags)
            .map_err(|e| classify(e, name))
    }

    fn snapshot_delete(&self, uuid: &str, name: &str) -> Result<(), HypervisorError> {
        self.snapshot(uuid, name)?
            .delete(0)
            .map_err(|e| classify(e, name))
    }

    fn block_stats(&self, uuid: &str, target: &str) -> Result<(u64, u64), HypervisorError> {
        let stats = self
            .domain(uuid)?
            .block_stats(target)
            .map_err(|e| classify(e, target))?;
        Ok((
            u64::try_from(stats.rd_bytes).unwrap_or(0),
            u64::try_from(stats.wr_bytes).unwrap_or(0),
        ))
    }

    fn interface_stats(&self, uuid: &str, dev: &str) -> Result<(u64, u64), HypervisorError> {
        let stats = self
            .domain(uuid)?
            .interface_stats(dev)
            .map_err(|e| classify(e, dev))?;
        Ok((
            u64::try_from(stats.rx_bytes).unwrap_or(0),
            u64::try_from(stats.tx_bytes).unwrap_or(0),
        ))
    }
}
