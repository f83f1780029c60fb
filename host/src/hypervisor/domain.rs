//! The structured VM definition ([`DomainSpec`]), validated from a `CreateVmRequest`, the
//! libvirt domain XML it becomes, and [`DomainFacts`]: what the daemon reads back from a
//! domain's own XML (its agent socket above all: discovery is never a guess).

use super::xml::{Element, XmlError};
use crate::pb;
use crate::storage::policy::{self, PathError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The virtio-serial port name the Quantix agent opens in the guest.
pub const AGENT_CHANNEL: &str = "org.quantix.agent.0";
/// The port libvirt itself uses for qemu-guest-agent.
pub const QEMU_GA_CHANNEL: &str = "org.qemu.guest_agent.0";
/// The namespace of the daemon's `<metadata>` element.
pub const METADATA_NS: &str = "https://quantix.invalid/xmlns/vm/1";
/// Upper bounds of a spec (a sanity check, not a capacity plan).
pub const MAX_VCPUS: u32 = 512;
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
pub const MAX_DISK_GIB: u64 = 64 * 1024;
/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;
/// Count and size caps of one request, checked before any per-item work.
pub const MAX_DISKS: usize = 64;
pub const MAX_NICS: usize = 32;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 256;
pub const MAX_LABEL_VALUE_BYTES: usize = 4096;
pub const MAX_BOOT_ENTRIES: usize = 8;
pub const MAX_CMDLINE_BYTES: usize = 4096;

/// Why a spec was refused (all map to INVALID_ARGUMENT).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Invalid(String),
    /// A host file outside every directory the node allows for that use (PERMISSION_DENIED).
    #[error("{0}")]
    Denied(String),
    #[error(transparent)]
    Xml(#[from] XmlError),
}

impl From<PathError> for SpecError {
    fn from(e: PathError) -> Self {
        match e {
            PathError::Invalid(m) => SpecError::Invalid(m),
            PathError::Denied(m) => SpecError::Denied(m),
        }
    }
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

/// One disk of a [`DomainSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDef {
    pub target: String,
    pub bus: String,
    /// Image file; `None` only for an empty CD-ROM tray.
    pub path: Option<PathBuf>,
    pub format: String,
    pub readonly: bool,
    pub cdrom: bool,
    /// Size of the image CreateVM must create at `path` (`None`: it exists).
    pub create_gib: Option<u64>,
}

/// One NIC of a [`DomainSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicDef {
    /// `("network", name)` or `("bridge", name)`.
    pub kind: &'static str,
    pub source: String,
    pub mac: Option<String>,
    pub model: String,
}

/// A validated, fully resolved VM definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub uuid: String,
    pub name: String,
    pub domain_type: String,
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
    pub memory_mib: u64,
    pub uefi: bool,
    pub boot: Vec<&'static str>,
    pub disks: Vec<DiskDef>,
    pub nics: Vec<NicDef>,
    pub vnc: bool,
    pub spice: bool,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub labels: BTreeMap<String, String>,
    pub agent_socket: PathBuf,
    /// Storage-pool volumes created for this VM (recorded as its own, like created images).
    pub volumes_created: Vec<PathBuf>,
}

/// Where a spec's files go, and where the files it names may come from.
#[derive(Debug, Clone)]
pub struct SpecContext<'a> {
    pub domain_type: &'a str,
    pub socket_dir: &'a Path,
    pub image_dir: &'a Path,
    /// Directories a disk given by host path must lie in (the image directory among them).
    pub disk_roots: &'a [PathBuf],
    /// Directories kernels and initrds must lie in.
    pub media_roots: &'a [PathBuf],
    /// Paths of storage volumes the request named by pool and volume, resolved by libvirt
    /// (not by the caller): taken as they are.
    pub volume_paths: &'a [PathBuf],
}

/// The agent socket of a VM: `<socket_dir>/<vm-id>.agent.sock`.
pub fn agent_socket_path(socket_dir: &Path, uuid: &str) -> PathBuf {
    socket_dir.join(format!("{uuid}.agent.sock"))
}

/// A VM or snapshot name: 1-64 letters, digits, '-', '_' or '.', not starting with '-' or '.'.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Refuses a request whose counts or sizes exceed the caps, naming the cap.
fn check_caps(req: &pb::CreateVmRequest, spec: &pb::VmSpec) -> Result<(), SpecError> {
    let count = |what: &str, n: usize, max: usize| {
        if n > max {
            Err(invalid(format!("{n} {what} requested; at most {max}")))
        } else {
            Ok(())
        }
    };
    count("disks", spec.disks.len(), MAX_DISKS)?;
    count("NICs", spec.nics.len(), MAX_NICS)?;
    count("labels", req.labels.len(), MAX_LABELS)?;
    count(
        "boot_order entries",
        spec.boot_order.len(),
        MAX_BOOT_ENTRIES,
    )?;
    if spec.kernel_cmdline.len() > MAX_CMDLINE_BYTES {
        return Err(invalid(format!(
            "kernel_cmdline is {} bytes; at most {MAX_CMDLINE_BYTES}",
            spec.kernel_cmdline.len()
        )));
    }
    for (k, v) in &req.labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_BYTES || v.len() > MAX_LABEL_VALUE_BYTES {
            return Err(invalid(format!(
                "label {:?}: key 1 to at most {MAX_LABEL_KEY_BYTES} bytes, value at most {MAX_LABEL_VALUE_BYTES} bytes",
                truncated(k)
            )));
        }
    }
    Ok(())
}

/// The start of a caller's string, for an error message.
fn truncated(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn disk_prefix(bus: &str) -> &'static str {
    match bus {
        "virtio" => "vd",
        _ => "sd",
    }
}

fn target_name(prefix: &str, index: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    let mut suffix = String::new();
    let mut n = index;
    loop {
        suffix.insert(0, char::from(letters[n % 26]));
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    format!("{prefix}{suffix}")
}

fn valid_target(t: &str) -> bool {
    let prefix_ok = t.starts_with("vd") || t.starts_with("sd") || t.starts_with("hd");
    prefix_ok && t.len() >= 3 && t.len() <= 5 && t[2..].chars().all(|c| c.is_ascii_lowercase())
}

impl DomainSpec {
    /// Validates a CreateVM request. `uuid` is the VM id already chosen.
    pub fn from_request(
        uuid: &str,
        req: &pb::CreateVmRequest,
        ctx: &SpecContext<'_>,
    ) -> Result<DomainSpec, SpecError> {
        if !valid_name(&req.name) {
            return Err(invalid(format!(
                "name {:?} must be 1-64 characters of [A-Za-z0-9._-], not starting with '-' or '.'",
                req.name
            )));
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| invalid("spec is required"))?;
        check_caps(req, spec)?;
        let one_if_zero = |v: u32| if v == 0 { 1 } else { v };
        let (sockets, cores, threads) = (
            one_if_zero(spec.cpu_sockets),
            one_if_zero(spec.cpu_cores),
            one_if_zero(spec.cpu_threads_per_core),
        );
        let vcpus = sockets
            .checked_mul(cores)
            .and_then(|v| v.checked_mul(threads))
            .filter(|v| *v <= MAX_VCPUS)
            .ok_or_else(|| invalid(format!("more than {MAX_VCPUS} vCPUs")))?;
        let _ = vcpus;
        if spec.memory_mib == 0 || spec.memory_mib > MAX_MEMORY_MIB {
            return Err(invalid(format!(
                "memory_mib must be 1..={MAX_MEMORY_MIB}, got {}",
                spec.memory_mib
            )));
        }
        let uefi = match pb::Firmware::try_from(spec.firmware) {
            Ok(pb::Firmware::Uefi) => true,
            Ok(pb::Firmware::Bios | pb::Firmware::Unspecified) => false,
            Err(_) => return Err(invalid(format!("unknown firmware {}", spec.firmware))),
        };
        let mut boot = Vec::new();
        for dev in &spec.boot_order {
            let name = match pb::BootDevice::try_from(*dev) {
                Ok(pb::BootDevice::Disk) => "hd",
                Ok(pb::BootDevice::Cdrom) => "cdrom",
                Ok(pb::BootDevice::Network) => "network",
                _ => return Err(invalid(format!("unknown boot device {dev}"))),
            };
            if !boot.contains(&name) {
                boot.push(name);
            }
        }

        let mut disks: Vec<DiskDef> = Vec::new();
        let mut next_index: BTreeMap<&'static str, usize> = BTreeMap::new();
        // Every target named or assigned so far: assignment is one set lookup per try.
        let named: BTreeSet<&str> = spec.disks.iter().map(|d| d.id.as_str()).collect();
        let mut taken: BTreeSet<String> = BTreeSet::new();
        for (i, d) in spec.disks.iter().enumerate() {
            let bus = if d.bus.is_empty() {
                if d.cdrom {
                    "sata"
                } else {
                    "virtio"
                }
            } else {
                d.bus.as_str()
            };
            if !matches!(bus, "virtio" | "sata" | "scsi" | "ide") {
                return Err(invalid(format!("disk {i}: unknown bus {bus:?}")));
            }
            if d.cdrom && bus == "virtio" {
                return Err(invalid(format!("disk {i}: a CD-ROM cannot be on virtio")));
            }
            let format = if d.format.is_empty() {
                if d.cdrom {
                    "raw"
                } else {
                    "qcow2"
                }
            } else {
                d.format.as_str()
            };
            if !matches!(format, "qcow2" | "raw") {
                return Err(invalid(format!("disk {i}: unknown format {format:?}")));
            }
            let target = if d.id.is_empty() {
                let prefix = if bus == "ide" { "hd" } else { disk_prefix(bus) };
                let slot = next_index.entry(prefix).or_insert(0);
                loop {
                    let t = target_name(prefix, *slot);
                    *slot += 1;
                    if !taken.contains(&t) && !named.contains(t.as_str()) {
                        break t;
                    }
                }
            } else {
                if !valid_target(&d.id) {
                    return Err(invalid(format!("disk {i}: bad target name {:?}", d.id)));
                }
                d.id.clone()
            };
            if !taken.insert(target.clone()) {
                return Err(invalid(format!("disk {i}: duplicate target {target}")));
            }
            if !d.pool.is_empty() || !d.volume.is_empty() {
                return Err(invalid(format!(
                    "disk {i}: pool and volume must be resolved to a path first"
                )));
            }
            let (path, create_gib) = if ctx
                .volume_paths
                .iter()
                .any(|p| p.as_os_str() == d.path.as_str())
            {
                (Some(PathBuf::from(&d.path)), None)
            } else if !d.path.is_empty() {
                let roots = if d.cdrom {
                    ctx.media_roots
                } else {
                    ctx.disk_roots
                };
                let what = format!("disk {i}");
                (Some(policy::resolve_inside(&what, &d.path, roots)?), None)
            } else if d.cdrom {
                (None, None)
            } else {
                if d.size_gib == 0 || d.size_gib > MAX_DISK_GIB {
                    return Err(invalid(format!(
                        "disk {i}: needs a path or a size_gib of 1..={MAX_DISK_GIB}"
                    )));
                }
                let file = ctx.image_dir.join(format!("{uuid}-{target}.{format}"));
                (Some(file), Some(d.size_gib))
            };
            disks.push(DiskDef {
                target,
                bus: bus.to_string(),
                path,
                format: format.to_string(),
                readonly: d.readonly || d.cdrom,
                cdrom: d.cdrom,
                create_gib,
            });
        }

        let mut nics = Vec::new();
        for (i, n) in spec.nics.iter().enumerate() {
            let (kind, source) = match (n.bridge.is_empty(), n.network.is_empty()) {
                (false, true) => ("bridge", n.bridge.clone()),
                (true, true) => ("network", "default".to_string()),
                (true, false) => ("network", n.network.clone()),
                (false, false) => {
                    return Err(invalid(format!(
                        "nic {i}: give a network or a bridge, not both"
                    )))
                }
            };
            if !plain_word(&source) {
                return Err(invalid(format!("nic {i}: bad {kind} name {source:?}")));
            }
            let mac = if n.mac.is_empty() {
                None
            } else if valid_mac(&n.mac) {
                Some(n.mac.to_ascii_lowercase())
            } else {
                return Err(invalid(format!("nic {i}: bad MAC {:?}", n.mac)));
            };
            let model = if n.model.is_empty() {
                "virtio".to_string()
            } else if plain_word(&n.model) {
                n.model.clone()
            } else {
                return Err(invalid(format!("nic {i}: bad model {:?}", n.model)));
            };
            nics.push(NicDef {
                kind,
                source,
                mac,
                model,
            });
        }

        let kernel = if spec.kernel_path.is_empty() {
            None
        } else {
            Some(policy::resolve_inside(
                "kernel",
                &spec.kernel_path,
                ctx.media_roots,
            )?)
        };
        let initrd = if spec.initrd_path.is_empty() {
            None
        } else {
            if kernel.is_none() {
                return Err(invalid("initrd_path needs kernel_path"));
            }
            Some(policy::resolve_inside(
                "initrd",
                &spec.initrd_path,
                ctx.media_roots,
            )?)
        };
        if kernel.is_none() && !spec.kernel_cmdline.is_empty() {
            return Err(invalid("kernel_cmdline needs kernel_path"));
        }
        let agent_socket = agent_socket_path(ctx.socket_dir, uuid);
        if agent_socket.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
            return Err(invalid(format!(
                "agent socket path {} is longer than a unix socket allows",
                agent_socket.display()
            )));
        }
        let console = spec.console.unwrap_or_default();
        Ok(DomainSpec {
            uuid: uuid.to_string(),
            name: req.name.clone(),
            domain_type: ctx.domain_type.to_string(),
            sockets,
            cores,
            threads,
            memory_mib: spec.memory_mib,
            uefi,
            boot,
            disks,
            nics,
            vnc: console.vnc_enabled,
            spice: console.spice_enabled,
            kernel,
            initrd,
            cmdline: spec.kernel_cmdline.clone(),
            labels: req
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            agent_socket,
            volumes_created: Vec::new(),
        })
    }

    pub fn vcpus(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }

    /// The libvirt domain XML.
    pub fn to_element(&self) -> Element {
        let mut os = Element::new("os");
        if self.uefi {
            os = os.attr("firmware", "efi");
        }
        os = os.child(Element::new("type").attr("arch", "x86_64").text("hvm"));
        if let Some(kernel) = &self.kernel {
            os = os.child(Element::new("kernel").text(kernel.to_string_lossy()));
            if let Some(initrd) = &self.initrd {
                os = os.child(Element::new("initrd").text(initrd.to_string_lossy()));
            }
            if !self.cmdline.is_empty() {
                os = os.child(Element::new("cmdline").text(self.cmdline.as_str()));
            }
        } else {
            for dev in &self.boot {
                os = os.child(Element::new("boot").attr("dev", *dev));
            }
        }

        let mut metadata = Element::new("qx:vm").attr("xmlns:qx", METADATA_NS);
        for (k, v) in &self.labels {
            metadata = metadata.child(Element::new("qx:label").attr("key", k).text(v.as_str()));
        }
        // The images qx-node creates for this VM: the only files DeleteVM may remove.
        let own = |d: &DiskDef| {
            d.create_gib.is_some()
                || d.path
                    .as_ref()
                    .is_some_and(|p| self.volumes_created.contains(p))
        };
        for d in self.disks.iter().filter(|d| own(d)) {
            if let Some(path) = &d.path {
                metadata = metadata.child(
                    Element::new("qx:volume")
                        .attr("target", d.target.as_str())
                        .attr("path", path.to_string_lossy()),
                );
            }
        }

        let mut cpu = Element::new("cpu");
        if self.domain_type == "kvm" {
            cpu = cpu.attr("mode", "host-passthrough");
        }
        cpu = cpu.child(
            Element::new("topology")
                .attr("sockets", self.sockets.to_string())
                .attr("cores", self.cores.to_string())
                .attr("threads", self.threads.to_string()),
        );

        let mut devices = Element::new("devices");
        for d in &self.disks {
            devices = devices.child(disk_element(d));
        }
        for n in &self.nics {
            let mut nic = Element::new("interface")
                .attr("type", n.kind)
                .child(Element::new("source").attr(n.kind, n.source.as_str()));
            if let Some(mac) = &n.mac {
                nic = nic.child(Element::new("mac").attr("address", mac.as_str()));
            }
            nic = nic.child(Element::new("model").attr("type", n.model.as_str()));
            devices = devices.child(nic);
        }
        devices = devices
            .child(
                Element::new("serial")
                    .attr("type", "pty")
                    .child(Element::new("target").attr("port", "0")),
            )
            .child(
                Element::new("console").attr("type", "pty").child(
                    Element::new("target")
                        .attr("type", "serial")
                        .attr("port", "0"),
                ),
            )
            .child(
                Element::new("channel")
                    .attr("type", "unix")
                    .child(
                        Element::new("source")
                            .attr("mode", "bind")
                            .attr("path", self.agent_socket.to_string_lossy()),
                    )
                    .child(
                        Element::new("target")
                            .attr("type", "virtio")
                            .attr("name", AGENT_CHANNEL),
                    ),
            )
            .child(
                Element::new("channel").attr("type", "unix").child(
                    Element::new("target")
                        .attr("type", "virtio")
                        .attr("name", QEMU_GA_CHANNEL),
                ),
            );
        for (kind, on) in [("vnc", self.vnc), ("spice", self.spice)] {
            if on {
                devices = devices.child(
                    Element::new("graphics")
                        .attr("type", kind)
                        .attr("autoport", "yes")
                        .attr("listen", "127.0.0.1"),
                );
            }
        }

        let mut domain = Element::new("domain")
            .attr("type", self.domain_type.as_str())
            .child(Element::new("name").text(self.name.as_str()))
            .child(Element::new("uuid").text(self.uuid.as_str()))
            .child(Element::new("metadata").child(metadata))
            .child(
                Element::new("memory")
                    .attr("unit", "MiB")
                    .text(self.memory_mib.to_string()),
            )
            .child(Element::new("vcpu").text(self.vcpus().to_string()))
            .child(os);
        if self.domain_type != "test" {
            domain = domain.child(
                Element::new("features")
                    .child(Element::new("acpi"))
                    .child(Element::new("apic")),
            );
        }
        domain
            .child(cpu)
            .child(Element::new("on_poweroff").text("destroy"))
            .child(Element::new("on_reboot").text("restart"))
            .child(Element::new("on_crash").text("destroy"))
            .child(devices)
    }

    pub fn to_xml(&self) -> Result<String, SpecError> {
        Ok(self.to_element().to_xml()?)
    }
}

/// A `<disk>` element; also used to change a CD-ROM's medium.
pub fn disk_element(d: &DiskDef) -> Element {
    let device = if d.cdrom { "cdrom" } else { "disk" };
    let mut disk = Element::new("disk")
        .attr("type", "file")
        .attr("device", device)
        .child(
            Element::new("driver")
                .attr("name", "qemu")
                .attr("type", d.format.as_str()),
        );
    if let Some(path) = &d.path {
        disk = disk.child(Element::new("source").attr("file", path.to_string_lossy()));
    }
    disk = disk.child(
        Element::new("target")
            .attr("dev", d.target.as_str())
            .attr("bus", d.bus.as_str()),
    );
    if d.readonly {
        disk = disk.child(Element::new("readonly"));
    }
    disk
}

/// A disk as found in a domain's XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFacts {
    pub target: String,
    pub bus: String,
    pub source: Option<String>,
    pub format: String,
    pub readonly: bool,
    pub cdrom: bool,
}

/// A graphics console as found in a domain's (live) XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphicsFacts {
    pub kind: String,
    pub port: Option<u32>,
    pub listen: String,
}

/// What the daemon reads back from a domain's XML.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainFacts {
    pub uuid: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Images qx-node created for this VM (from its metadata): the only files it may delete.
    pub owned_volumes: Vec<String>,
    pub disks: Vec<DiskFacts>,
    /// The bound unix socket of the `org.quantix.agent.0` channel.
    pub agent_socket: Option<PathBuf>,
    pub graphics: Vec<GraphicsFacts>,
    pub serial_pty: Option<String>,
    /// Host-side interface names (live XML only).
    pub interfaces: Vec<String>,
    pub has_nvram: bool,
}

impl DomainFacts {
    pub fn parse(xml: &str) -> Result<DomainFacts, XmlError> {
        let root = Element::parse(xml)?;
        let mut facts = DomainFacts {
            uuid: root.path_text("uuid").unwrap_or_default().to_string(),
            name: root.path_text("name").unwrap_or_default().to_string(),
            has_nvram: root.path("os/nvram").is_some(),
            ..DomainFacts::default()
        };
        if let Some(meta) = root.find("metadata") {
            for vm in meta
                .find_all("vm")
                .filter(|v| v.attrs.iter().any(|(_, val)| val == METADATA_NS))
            {
                for label in vm.find_all("label") {
                    if let Some(key) = label.get_attr("key") {
                        facts.labels.insert(key.to_string(), label.text.clone());
                    }
                }
                for volume in vm.find_all("volume") {
                    if let Some(path) = volume.get_attr("path") {
                        facts.owned_volumes.push(path.to_string());
                    }
                }
            }
        }
        let Some(devices) = root.find("devices") else {
            return Ok(facts);
        };
        for disk in devices.find_all("disk") {
            let target = disk.find("target");
            facts.disks.push(DiskFacts {
                target: target
                    .and_then(|t| t.get_attr("dev"))
                    .unwrap_or_default()
                    .to_string(),
                bus: target
                    .and_then(|t| t.get_attr("bus"))
                    .unwrap_or_default()
                    .to_string(),
                source: disk
                    .find("source")
                    .and_then(|s| s.get_attr("file"))
                    .map(str::to_string),
                format: disk
                    .find("driver")
                    .and_then(|d| d.get_attr("type"))
                    .unwrap_or("raw")
                    .to_string(),
                readonly: disk.find("readonly").is_some(),
                cdrom: disk.get_attr("device") == Some("cdrom"),
            });
        }
        for channel in devices.find_all("channel") {
            let is_agent =
                channel.find("target").and_then(|t| t.get_attr("name")) == Some(AGENT_CHANNEL);
            if is_agent && channel.get_attr("type") == Some("unix") {
                facts.agent_socket = channel
                    .find("source")
                    .and_then(|s| s.get_attr("path"))
                    .map(PathBuf::from);
            }
        }
        for g in devices.find_all("graphics") {
            let port = g
                .get_attr("port")
                .and_then(|p| p.parse::<i64>().ok())
                .and_then(|p| u32::try_from(p).ok());
            let listen = g
                .get_attr("listen")
                .or_else(|| g.find("listen").and_then(|l| l.get_attr("address")))
                .unwrap_or_default()
                .to_string();
            facts.graphics.push(GraphicsFacts {
                kind: g.get_attr("type").unwrap_or_default().to_string(),
                port,
                listen,
            });
        }
        facts.serial_pty = devices
            .find_all("serial")
            .chain(devices.find_all("console"))
            .filter(|s| s.get_attr("type") == Some("pty"))
            .find_map(|s| s.find("source").and_then(|src| src.get_attr("path")))
            .map(str::to_string);
        facts.interfaces = devices
            .find_all("interface")
            .filter_map(|i| i.find("target").and_then(|t| t.get_attr("dev")))
            .map(str::to_string)
            .collect();
        Ok(facts)
    }

    /// The CD-ROM named `device`, or the first CD-ROM when `device` is empty.
    pub fn cdrom(&self, device: &str) -> Option<&DiskFacts> {
        self.disks
            .iter()
            .find(|d| d.cdrom && (device.is_empty() || d.target == device))
    }
}

/// Replaces the `<disk>` whose target is `target` in a domain document (for hypervisors
/// without live device updates, on a shut-off domain).
pub fn replace_disk(domain_xml: &str, target: &str, disk: Element) -> Result<String, XmlError> {
    let mut root = Element::parse(domain_xml)?;
    if let Some(devices) = root
        .children
        .iter_mut()
        .find(|c| c.local_name() == "devices")
    {
        for child in devices.children.iter_mut() {
            let matches = child.local_name() == "disk"
                && child.find("target").and_then(|t| t.get_attr("dev")) == Some(target);
            if matches {
                // Keep libvirt's address so the device does not move.
                let address = child.find("address").cloned();
                *child = disk.clone();
                if let Some(address) = address {
                    child.children.push(address);
                }
            }
        }
    }
    root.to_xml()
}

/// A snapshot's description, read from its `<domainsnapshot>` XML.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotFacts {
    pub name: String,
    pub description: String,
    pub state: String,
    pub created_unix_s: i64,
    pub parent: String,
}

impl SnapshotFacts {
    pub fn parse(xml: &str) -> Result<SnapshotFacts, XmlError> {
        let root = Element::parse(xml)?;
        Ok(SnapshotFacts {
            name: root.path_text("name").unwrap_or_default().to_string(),
            description: root
                .path_text("description")
                .unwrap_or_default()
                .to_string(),
            state: root.path_text("state").unwrap_or_default().to_string(),
            created_unix_s: root
                .path_text("creationTime")
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0),
            parent: root
                .path_text("parent/name")
                .unwrap_or_default()
                .to_string(),
        })
    }
}

/// `<domainsnapshot>` XML for a new snapshot.
pub fn snapshot_xml(name: &str, description: &str) -> Result<String, XmlError> {
    let mut el = Element::new("domainsnapshot").child(Element::new("name").text(name));
    if !description.is_empty() {
        el = el.child(Element::new("description").text(description));
    }
    el.to_xml()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ctx(dir: &Path) -> SpecContext<'_> {
        let roots: &'static [PathBuf] = Box::leak(vec![dir.to_path_buf()].into_boxed_slice());
        SpecContext {
            domain_type: "qemu",
            socket_dir: dir,
            image_dir: dir,
            disk_roots: roots,
            media_roots: roots,
            volume_paths: &[],
        }
    }

    fn request(name: &str) -> pb::CreateVmRequest {
        pb::CreateVmRequest {
            name: name.to_string(),
            spec: Some(pb::VmSpec {
                cpu_cores: 2,
                memory_mib: 256,
                disks: vec![
                    pb::DiskSpec {
                        size_gib: 1,
                        ..Default::default()
                    },
                    pb::DiskSpec {
                        cdrom: true,
                        ..Default::default()
                    },
                ],
                console: Some(pb::ConsoleSpec {
                    vnc_enabled: true,
                    spice_enabled: false,
                }),
                ..Default::default()
            }),
            labels: [("team".to_string(), "a&b <c>".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn spec_xml_carries_agent_channel_labels_and_reads_back() {
        let dir = Path::new("/run/qx");
        let uuid = "7a1b2c3d-0000-4000-8000-000000000001";
        let spec = DomainSpec::from_request(uuid, &request("web-1"), &ctx(dir)).unwrap();
        let xml = spec.to_xml().unwrap();
        let facts = DomainFacts::parse(&xml).unwrap();
        assert_eq!(facts.uuid, uuid);
        assert_eq!(facts.name, "web-1");
        assert_eq!(
            facts.agent_socket,
            Some(dir.join(format!("{uuid}.agent.sock")))
        );
        assert_eq!(
            facts.labels.get("team").map(String::as_str),
            Some("a&b <c>")
        );
        assert_eq!(facts.disks.len(), 2);
        assert_eq!(facts.disks[0].target, "vda");
        assert_eq!(facts.cdrom("").map(|d| d.target.as_str()), Some("sda"));
        assert!(xml.contains(QEMU_GA_CHANNEL));
        assert!(xml.contains("<acpi/>"));
    }

    #[test]
    fn spec_rejects_bad_names_memory_and_disks() {
        let dir = Path::new("/run/qx");
        let u = "7a1b2c3d-0000-4000-8000-000000000001";
        assert!(DomainSpec::from_request(u, &request("bad name"), &ctx(dir)).is_err());
        assert!(DomainSpec::from_request(u, &request("x</name>"), &ctx(dir)).is_err());
        let mut r = request("ok");
        if let Some(s) = r.spec.as_mut() {
            s.memory_mib = 0;
        }
        assert!(DomainSpec::from_request(u, &r, &ctx(dir)).is_err());
        let mut r = request("ok");
        if let Some(s) = r.spec.as_mut() {
            s.disks[0].size_gib = 0;
        }
        assert!(DomainSpec::from_request(u, &r, &ctx(dir)).is_err());
        let mut r = request("ok");
        if let Some(s) = r.spec.as_mut() {
            s.disks[0].path = "/nonexistent/disk.qcow2".into();
        }
        assert!(DomainSpec::from_request(u, &r, &ctx(dir)).is_err());
    }

    #[test]
    fn spec_xml_has_firmware_boot_order_nics_kernel_and_topology() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let mut r = request("appliance");
        if let Some(s) = r.spec.as_mut() {
            s.cpu_sockets = 2;
            s.cpu_threads_per_core = 2;
            s.firmware = pb::Firmware::Uefi as i32;
            s.boot_order = vec![pb::BootDevice::Cdrom as i32, pb::BootDevice::Disk as i32];
            s.nics = vec![
                pb::NicSpec {
                    network: "lan".into(),
                    mac: "52:54:00:AA:bb:01".into(),
                    ..Default::default()
                },
                pb::NicSpec {
                    bridge: "br0".into(),
                    model: "e1000".into(),
                    ..Default::default()
                },
            ];
        }
        let spec =
            DomainSpec::from_request("7a1b2c3d-0000-4000-8000-000000000001", &r, &ctx(dir.path()))
                .unwrap();
        let root = Element::parse(&spec.to_xml().unwrap()).unwrap();
        assert_eq!(root.path_text("vcpu"), Some("8"));
        let topo = root.path("cpu/topology").unwrap();
        assert_eq!(
            (
                topo.get_attr("sockets"),
                topo.get_attr("cores"),
                topo.get_attr("threads")
            ),
            (Some("2"), Some("2"), Some("2"))
        );
        assert_eq!(root.path("os").unwrap().get_attr("firmware"), Some("efi"));
        let boots: Vec<_> = root
            .path("os")
            .unwrap()
            .find_all("boot")
            .filter_map(|b| b.get_attr("dev"))
            .collect();
        assert_eq!(boots, ["cdrom", "hd"]);
        let nics: Vec<_> = root
            .path("devices")
            .unwrap()
            .find_all("interface")
            .collect();
        assert_eq!(
            nics[0].path("source").unwrap().get_attr("network"),
            Some("lan")
        );
        assert_eq!(
            nics[0].path("mac").unwrap().get_attr("address"),
            Some("52:54:00:aa:bb:01")
        );
        assert_eq!(
            nics[1].path("source").unwrap().get_attr("bridge"),
            Some("br0")
        );
        assert_eq!(
            nics[1].path("model").unwrap().get_attr("type"),
            Some("e1000")
        );

        // Direct kernel boot replaces the boot order.
        let mut r = request("direct");
        if let Some(s) = r.spec.as_mut() {
            s.kernel_path = kernel.to_string_lossy().into();
            s.kernel_cmdline = "console=ttyS0 a=\"b\" <x>".into();
            s.boot_order = vec![pb::BootDevice::Disk as i32];
        }
        let spec =
            DomainSpec::from_request("7a1b2c3d-0000-4000-8000-000000000002", &r, &ctx(dir.path()))
                .unwrap();
        let root = Element::parse(&spec.to_xml().unwrap()).unwrap();
        assert_eq!(
            root.path_text("os/cmdline"),
            Some("console=ttyS0 a=\"b\" <x>")
        );
        assert_eq!(
            root.path_text("os/kernel"),
            Some(&*kernel.to_string_lossy())
        );
        assert!(root.path("os/boot").is_none());
    }

    #[test]
    fn target_names_continue_past_z() {
        assert_eq!(target_name("vd", 0), "vda");
        assert_eq!(target_name("vd", 25), "vdz");
        assert_eq!(target_name("vd", 26), "vdaa");
    }

    #[test]
    fn replace_disk_swaps_the_medium_and_keeps_the_address() {
        let xml = "<domain><devices><disk type='file' device='cdrom'><target dev='sda' bus='sata'/><address type='drive'/></disk></devices></domain>";
        let d = DiskDef {
            target: "sda".into(),
            bus: "sata".into(),
            path: Some("/isos/a.iso".into()),
            format: "raw".into(),
            readonly: true,
            cdrom: true,
            create_gib: None,
        };
        let out = replace_disk(xml, "sda", disk_element(&d)).unwrap();
        let facts = DomainFacts::parse(&out).unwrap();
        assert_eq!(facts.disks[0].source.as_deref(), Some("/isos/a.iso"));
        assert!(out.contains("address"));
    }
}
