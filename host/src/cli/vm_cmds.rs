//! `qxctl vm|snapshot|media|events`: VM lifecycle commands.
//!
//! Each `run_*` function makes its calls and prints either aligned tables and `key: value`
//! lines (like virsh) or, with `--json`, the daemon's messages as JSON. It returns qxctl's
//! exit code (see [`super::exit`]); a failed RPC prints its message to stderr.

use super::exit;
use crate::pb;
use crate::pb::node_daemon_service_client::NodeDaemonServiceClient;
use crate::text::{escape, Esc};
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Status;

type Client = NodeDaemonServiceClient<Channel>;

/// `qxctl vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM (and optionally start it).
    #[command(
        long_about = "Define a VM (and optionally start it).\n\n\
    Disks are attached in this order, the first one as vda: the --volume disks, the volume that \
    --disk-size creates without --volume, the --disk images, then the CD-ROMs.\n\n\
    A disk from a storage pool (see `qxctl volume`) is named by --pool and --volume. An existing \
    volume is attached as it is, in the format its pool reports; the VM does not own it, and \
    `qxctl vm delete --storage` leaves it alone. A volume that does not exist yet is created in the \
    pool when --disk-size is given (qcow2); it belongs to the VM, and `qxctl vm delete --storage` \
    deletes it with the VM. If defining the VM fails, the volumes created for it are deleted again. \
    Volumes of dir, fs and netfs pools can be disks; a volume under a thin clone or a volume \
    snapshot is refused, since the guest's writes would change the overlay's data.",
        after_long_help = "EXAMPLES:\n    \
    qxctl volume create images web1 --backing base\n    \
    qxctl vm create web1 --pool images --volume web1 --start\n        \
    A thin clone of volume base as the VM's first disk.\n\n    \
    qxctl vm create web2 --pool images --volume web2-root --disk-size 20G\n        \
    Volume web2-root, created with 20 GiB for the VM if it does not exist.\n\n    \
    qxctl vm create web3 --pool images --disk-size 10\n        \
    A new 10 GiB volume <vm-id>-disk0 in pool images, deleted with the VM."
    )]
    Create(Box<CreateArgs>),
    /// Start a stopped VM.
    Start(VmRef),
    /// Stop a VM gracefully: agent power-off, then ACPI, then force after the timeout.
    Stop {
        vm: String,
        /// Total seconds before forcing (0: the daemon's default, 60).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
        /// Go straight to ACPI.
        #[arg(long)]
        skip_agent: bool,
        /// Pull the plug at once.
        #[arg(long)]
        force: bool,
    },
    /// Reboot a running VM.
    Reboot(VmRef),
    /// Pause a running VM.
    Pause(VmRef),
    /// Resume a paused VM (and sync its clock when its agent is connected).
    Resume(VmRef),
    /// Undefine a VM.
    Delete {
        vm: String,
        /// Also delete its writable disk images.
        #[arg(long)]
        storage: bool,
        /// Stop it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// List the VMs on the node.
    List,
    /// Show a VM's state and its agent's view of the guest.
    Status(VmRef),
}

/// A VM by UUID or name.
#[derive(Debug, Args)]
pub struct VmRef {
    /// VM UUID or name.
    pub vm: String,
}

/// `qxctl vm create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Domain name.
    pub name: String,
    /// VM UUID (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    /// Cores per socket.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// CPU sockets.
    #[arg(long, default_value_t = 1)]
    pub sockets: u32,
    /// Threads per core.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// A disk: a size in GiB (a qcow2 image is created in the node's image directory) or an
    /// existing image path inside the node's allowed directories (repeatable).
    #[arg(long)]
    pub disk: Vec<String>,
    /// The storage pool that holds the --volume disks and the volume --disk-size creates.
    #[arg(long, value_name = "POOL")]
    pub pool: Option<String>,
    /// A disk that is volume NAME of --pool (repeatable): attached if it exists, created with
    /// --disk-size if not.
    #[arg(long, value_name = "NAME", requires = "pool")]
    pub volume: Vec<String>,
    /// The size of each volume created in --pool: GiB, or a number with G or T (whole GiB).
    /// Without --volume, one new volume is created, named <vm-id>-disk<N>.
    #[arg(long, value_name = "SIZE", requires = "pool")]
    pub disk_size: Option<String>,
    /// A CD-ROM with this ISO (repeatable).
    #[arg(long)]
    pub cdrom: Vec<String>,
    /// An empty CD-ROM drive (for `qxctl media insert` later).
    #[arg(long)]
    pub empty_cdrom: bool,
    /// A NIC on this libvirt network (repeatable).
    #[arg(long)]
    pub network: Vec<String>,
    /// A NIC on this host bridge (repeatable).
    #[arg(long)]
    pub bridge: Vec<String>,
    /// A VNC console.
    #[arg(long)]
    pub vnc: bool,
    /// A SPICE console.
    #[arg(long)]
    pub spice: bool,
    /// Boot with UEFI instead of BIOS.
    #[arg(long)]
    pub uefi: bool,
    /// Boot order: disk, cdrom, network (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub boot: Vec<String>,
    /// Direct kernel boot: kernel image.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Direct kernel boot: initrd image.
    #[arg(long)]
    pub initrd: Option<String>,
    /// Direct kernel boot: kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// A label KEY=VALUE (repeatable).
    #[arg(long)]
    pub label: Vec<String>,
    /// Start it once defined.
    #[arg(long)]
    pub start: bool,
}

/// `qxctl snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot.
    Create {
        vm: String,
        /// Snapshot name (default: snap-<unix ms>).
        name: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Freeze the guest's filesystems through its agent around the snapshot.
        #[arg(long)]
        quiesce: bool,
        /// Require the memory state: refused unless the VM is running or paused. (A snapshot
        /// of a running VM holds its memory either way: libvirt's internal snapshots do.)
        #[arg(long)]
        memory: bool,
    },
    /// List a VM's snapshots.
    List(VmRef),
    /// Revert a VM to a snapshot.
    Revert {
        vm: String,
        snapshot: String,
        /// Start the VM after reverting.
        #[arg(long)]
        start: bool,
    },
    /// Delete a snapshot.
    Delete { vm: String, snapshot: String },
}

/// `qxctl media ...`
#[derive(Debug, Subcommand)]
pub enum MediaCommand {
    /// Insert an ISO into a CD-ROM drive (forcing the tray).
    Insert {
        vm: String,
        /// Absolute path of the ISO on the node.
        iso: String,
        /// Target device, e.g. sda (default: the first CD-ROM).
        #[arg(long, default_value = "")]
        device: String,
    },
    /// Eject a CD-ROM drive.
    Eject {
        vm: String,
        #[arg(long, default_value = "")]
        device: String,
    },
}

/// `qxctl events`
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only this VM's events.
    #[arg(long)]
    pub vm: Option<String>,
    /// Resume after this sequence number.
    #[arg(long, default_value_t = 0)]
    pub after_seq: u64,
    /// Stop after this many events (default: follow until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

/// Prints a failed call and maps its code to qxctl's exit code.
fn fail(status: &Status) -> i32 {
    eprintln!("qxctl: {} ({:?})", Esc(status.message()), status.code());
    super::dispatch::code_for(status)
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match pb::VmState::try_from(state) {
        Ok(pb::VmState::Running) => "running",
        Ok(pb::VmState::Paused) => "paused",
        Ok(pb::VmState::ShuttingDown) => "shutting down",
        Ok(pb::VmState::Stopped) => "shut off",
        Ok(pb::VmState::Crashed) => "crashed",
        Ok(pb::VmState::Suspended) => "pmsuspended",
        _ => "unknown",
    }
}

fn event_name(kind: i32) -> String {
    pb::EventKind::try_from(kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("kind-{kind}"))
}

fn step_name(step: i32) -> &'static str {
    match pb::StopStep::try_from(step) {
        Ok(pb::StopStep::Agent) => "agent",
        Ok(pb::StopStep::Acpi) => "acpi",
        Ok(pb::StopStep::Force) => "force",
        _ => "-",
    }
}

/// Renders rows as a virsh-style table: a header, a rule, left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(escape(cell).chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            // Escaped before padding, so the columns line up with what is shown.
            let cell = escape(cell);
            s.push(' ');
            s.push_str(&format!("{cell:<w$}"));
            s.push_str("  ");
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    let total: usize = widths.iter().map(|w| w + 3).sum();
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

fn print_status(s: &pb::VmStatus) {
    let agent = s.guest_agent.clone().unwrap_or_default();
    let mut lines = vec![
        ("UUID", s.vm_id.clone()),
        ("Name", s.name.clone()),
        ("State", state_name(s.state).to_string()),
    ];
    if !s.state_reason.is_empty() {
        lines.push(("Reason", s.state_reason.clone()));
    }
    lines.extend([
        ("CPU(s)", s.vcpus.to_string()),
        ("Max memory", format!("{} MiB", s.memory_mib)),
        ("CPU time", format!("{:.1}s", s.cpu_time_ns as f64 / 1e9)),
        ("Agent socket", s.agent_socket.clone()),
        (
            "Agent",
            if agent.connected {
                format!("connected (version {})", agent.version)
            } else {
                "not connected".to_string()
            },
        ),
    ]);
    if agent.connected {
        lines.extend([
            (
                "Guest OS",
                format!("{} {}", agent.os_name, agent.os_version),
            ),
            ("Guest kernel", agent.kernel_release.clone()),
            ("Hostname", agent.hostname.clone()),
            ("IP addresses", agent.ip_addresses.join(", ")),
        ]);
    }
    let mut labels: Vec<_> = s.labels.iter().collect();
    labels.sort();
    for (k, v) in labels {
        lines.push(("Label", format!("{k}={v}")));
    }
    for (k, v) in lines {
        println!("{:<14}{}", format!("{k}:"), Esc(&v));
    }
}

/// `--disk-size`: a plain number is GiB; with a suffix, a whole number of GiB.
fn parse_gib(s: &str) -> anyhow::Result<u64> {
    const GIB: u64 = 1 << 30;
    if let Ok(gib) = s.trim().parse::<u64>() {
        return Ok(gib);
    }
    let bytes = super::storage_cmds::parse_size(s)?;
    if bytes == 0 || bytes % GIB != 0 {
        anyhow::bail!("--disk-size {s:?} is not a whole number of GiB");
    }
    Ok(bytes / GIB)
}

/// The disks from `--pool`, `--volume` and `--disk-size`.
fn volume_disks(a: &CreateArgs) -> anyhow::Result<Vec<pb::DiskSpec>> {
    let size_gib = a.disk_size.as_deref().map(parse_gib).transpose()?;
    let Some(pool) = &a.pool else {
        return Ok(Vec::new());
    };
    if a.volume.is_empty() && size_gib.is_none() {
        anyhow::bail!("--pool needs --volume or --disk-size");
    }
    let disk = |volume: &str| pb::DiskSpec {
        pool: pool.clone(),
        volume: volume.to_string(),
        size_gib: size_gib.unwrap_or(0),
        ..Default::default()
    };
    Ok(if a.volume.is_empty() {
        vec![disk("")]
    } else {
        a.volume.iter().map(|v| disk(v)).collect()
    })
}

fn create_request(a: &CreateArgs) -> anyhow::Result<pb::CreateVmRequest> {
    let mut disks = volume_disks(a)?;
    for d in &a.disk {
        disks.push(match d.parse::<u64>() {
            Ok(gib) => pb::DiskSpec {
                size_gib: gib,
                ..Default::default()
            },
            Err(_) => pb::DiskSpec {
                path: d.clone(),
                ..Default::default()
            },
        });
    }
    for iso in &a.cdrom {
        disks.push(pb::DiskSpec {
            path: iso.clone(),
            cdrom: true,
            ..Default::default()
        });
    }
    if a.empty_cdrom {
        disks.push(pb::DiskSpec {
            cdrom: true,
            ..Default::default()
        });
    }
    let mut nics: Vec<pb::NicSpec> = a
        .network
        .iter()
        .map(|n| pb::NicSpec {
            network: n.clone(),
            ..Default::default()
        })
        .collect();
    nics.extend(a.bridge.iter().map(|b| pb::NicSpec {
        bridge: b.clone(),
        ..Default::default()
    }));
    let mut boot_order = Vec::new();
    for b in &a.boot {
        boot_order.push(match b.as_str() {
            "disk" | "hd" => pb::BootDevice::Disk,
            "cdrom" => pb::BootDevice::Cdrom,
            "network" | "net" => pb::BootDevice::Network,
            other => anyhow::bail!("unknown boot device {other:?} (disk, cdrom, network)"),
        } as i32);
    }
    let mut labels = std::collections::HashMap::new();
    for l in &a.label {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("label {l:?} is not KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(pb::CreateVmRequest {
        vm_id: a.id.clone().unwrap_or_default(),
        name: a.name.clone(),
        labels,
        start: a.start,
        spec: Some(pb::VmSpec {
            cpu_cores: a.cpus,
            cpu_sockets: a.sockets,
            cpu_threads_per_core: a.threads,
            memory_mib: a.memory,
            firmware: if a.uefi {
                pb::Firmware::Uefi
            } else {
                pb::Firmware::Bios
            } as i32,
            boot_order,
            disks,
            nics,
            console: Some(pb::ConsoleSpec {
                vnc_enabled: a.vnc,
                spice_enabled: a.spice,
            }),
            kernel_path: a.kernel.clone().unwrap_or_default(),
            initrd_path: a.initrd.clone().unwrap_or_default(),
            kernel_cmdline: a.cmdline.clone().unwrap_or_default(),
        }),
    })
}

fn id(vm: &str) -> pb::VmIdRequest {
    pb::VmIdRequest {
        vm_id: vm.to_string(),
    }
}

/// Prints a VmStatus result (or the error) and returns the exit code.
fn done_status(
    r: Result<tonic::Response<pb::VmStatus>, Status>,
    json: bool,
    verb: &str,
) -> anyhow::Result<i32> {
    match r {
        Ok(resp) => {
            let s = resp.into_inner();
            if json {
                print_json(&s)?;
            } else {
                println!("Domain '{}' {verb} ({})", s.name, state_name(s.state));
                if !s.state_reason.is_empty() {
                    println!("{}", s.state_reason);
                }
            }
            Ok(exit::OK)
        }
        Err(e) => Ok(fail(&e)),
    }
}

/// `qxctl vm ...`
pub async fn run_vm(cmd: VmCommand, client: &mut Client, json: bool) -> anyhow::Result<i32> {
    match cmd {
        VmCommand::Create(a) => {
            let req = create_request(&a)?;
            done_status(client.create_vm(req).await, json, "defined")
        }
        VmCommand::Start(v) => done_status(client.start_vm(id(&v.vm)).await, json, "started"),
        VmCommand::Reboot(v) => {
            done_status(client.reboot_vm(id(&v.vm)).await, json, "is being rebooted")
        }
        VmCommand::Pause(v) => done_status(client.pause_vm(id(&v.vm)).await, json, "suspended"),
        VmCommand::Resume(v) => done_status(client.resume_vm(id(&v.vm)).await, json, "resumed"),
        VmCommand::Stop {
            vm, force: true, ..
        } => done_status(client.force_stop_vm(id(&vm)).await, json, "destroyed"),
        VmCommand::Stop {
            vm,
            timeout,
            skip_agent,
            force: false,
        } => {
            let req = pb::StopVmRequest {
                vm_id: vm,
                timeout_s: timeout,
                skip_agent,
            };
            match client.stop_vm(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if json {
                        print_json(&r)?;
                    } else {
                        let rows: Vec<Vec<String>> = r
                            .steps
                            .iter()
                            .map(|s| {
                                vec![
                                    step_name(s.step).to_string(),
                                    if !s.attempted {
                                        "skipped"
                                    } else if s.succeeded {
                                        "ok"
                                    } else {
                                        "failed"
                                    }
                                    .to_string(),
                                    format!("{} ms", s.elapsed_ms),
                                    s.detail.clone(),
                                ]
                            })
                            .collect();
                        print!("{}", table(&["Step", "Result", "Time", "Detail"], &rows));
                        let name = r.status.map(|s| s.name).unwrap_or_default();
                        println!("Domain '{name}' stopped by {}", step_name(r.stopped_by));
                    }
                    Ok(exit::OK)
                }
                Err(e) => Ok(fail(&e)),
            }
        }
        VmCommand::Delete { vm, storage, force } => {
            let req = pb::DeleteVmRequest {
                vm_id: vm.clone(),
                delete_storage: storage,
                force,
            };
            match client.delete_vm(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if json {
                        print_json(&r)?;
                    } else {
                        println!("Domain '{vm}' has been undefined");
                        for v in &r.deleted_volumes {
                            println!("Volume '{v}' removed");
                        }
                    }
                    Ok(exit::OK)
                }
                Err(e) => Ok(fail(&e)),
            }
        }
        VmCommand::List => match client.list_v_ms(pb::ListVmsRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                if json {
                    print_json(&r)?;
                } else {
                    let rows: Vec<Vec<String>> = r
                        .vms
                        .iter()
                        .map(|v| {
                            let agent = v.guest_agent.as_ref().is_some_and(|a| a.connected);
                            vec![
                                v.vm_id.clone(),
                                v.name.clone(),
                                state_name(v.state).to_string(),
                                v.vcpus.to_string(),
                                format!("{} MiB", v.memory_mib),
                                if agent { "connected" } else { "-" }.to_string(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(&["UUID", "Name", "State", "CPUs", "Memory", "Agent"], &rows)
                    );
                }
                Ok(exit::OK)
            }
            Err(e) => Ok(fail(&e)),
        },
        VmCommand::Status(v) => match client.get_vm_status(id(&v.vm)).await {
            Ok(r) => {
                let s = r.into_inner();
                if json {
                    print_json(&s)?;
                } else {
                    print_status(&s);
                }
                Ok(exit::OK)
            }
            Err(e) => Ok(fail(&e)),
        },
    }
}

/// `YYYY-MM-DD HH:MM:SS +0000` of a unix time (civil-from-days, proleptic Gregorian).
pub fn utc_time(unix_s: i64) -> String {
    let (days, secs) = (unix_s.div_euclid(86_400), unix_s.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} +0000",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn snapshot_rows(snaps: &[pb::Snapshot]) -> Vec<Vec<String>> {
    snaps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                utc_time(s.created_unix_s),
                s.state.clone(),
                if s.quiesced { "yes" } else { "no" }.to_string(),
                if s.has_memory { "yes" } else { "no" }.to_string(),
                if s.current { "*" } else { "" }.to_string(),
                s.description.clone(),
            ]
        })
        .collect()
}

const SNAPSHOT_HEADER: [&str; 7] = [
    "Name",
    "Creation Time",
    "State",
    "Quiesced",
    "Memory",
    "Current",
    "Description",
];

/// `qxctl snapshot ...`
pub async fn run_snapshot(
    cmd: SnapshotCommand,
    client: &mut Client,
    json: bool,
) -> anyhow::Result<i32> {
    match cmd {
        SnapshotCommand::Create {
            vm,
            name,
            description,
            quiesce,
            memory,
        } => {
            let req = pb::CreateSnapshotRequest {
                vm_id: vm,
                name: name.unwrap_or_default(),
                description,
                quiesce,
                include_memory: memory,
            };
            match client.create_snapshot(req).await {
                Ok(r) => {
                    let s = r.into_inner();
                    if json {
                        print_json(&s)?;
                    } else {
                        let with = match (s.quiesced, s.has_memory) {
                            (true, true) => " (quiesced, with memory)",
                            (true, false) => " (quiesced)",
                            (false, true) => " (with memory)",
                            (false, false) => "",
                        };
                        println!("Domain snapshot {} created{with}", s.name);
                    }
                    Ok(exit::OK)
                }
                Err(e) => Ok(fail(&e)),
            }
        }
        SnapshotCommand::List(v) => match client.list_snapshots(id(&v.vm)).await {
            Ok(r) => {
                let r = r.into_inner();
                if json {
                    print_json(&r)?;
                } else {
                    print!("{}", table(&SNAPSHOT_HEADER, &snapshot_rows(&r.snapshots)));
                }
                Ok(exit::OK)
            }
            Err(e) => Ok(fail(&e)),
        },
        SnapshotCommand::Revert {
            vm,
            snapshot,
            start,
        } => {
            let req = pb::SnapshotRequest {
                vm_id: vm,
                snapshot_id: snapshot.clone(),
                start_after_revert: start,
            };
            done_status(
                client.revert_snapshot(req).await,
                json,
                &format!("reverted to snapshot {snapshot}"),
            )
        }
        SnapshotCommand::Delete { vm, snapshot } => {
            let req = pb::SnapshotRequest {
                vm_id: vm,
                snapshot_id: snapshot.clone(),
                start_after_revert: false,
            };
            match client.delete_snapshot(req).await {
                Ok(r) => {
                    if json {
                        print_json(&r.into_inner())?;
                    } else {
                        println!("Domain snapshot {snapshot} deleted");
                    }
                    Ok(exit::OK)
                }
                Err(e) => Ok(fail(&e)),
            }
        }
    }
}

/// `qxctl media ...`
pub async fn run_media(cmd: MediaCommand, client: &mut Client, json: bool) -> anyhow::Result<i32> {
    let req = match cmd {
        MediaCommand::Insert { vm, iso, device } => pb::ChangeMediaRequest {
            vm_id: vm,
            device,
            iso_path: iso,
        },
        MediaCommand::Eject { vm, device } => pb::ChangeMediaRequest {
            vm_id: vm,
            device,
            iso_path: String::new(),
        },
    };
    match client.change_media(req).await {
        Ok(r) => {
            let r = r.into_inner();
            if json {
                print_json(&r)?;
            } else if r.inserted.is_empty() {
                println!("Media ejected from {} (was {:?})", r.device, r.previous);
            } else {
                println!("Media {} inserted into {}", r.inserted, r.device);
            }
            Ok(exit::OK)
        }
        Err(e) => Ok(fail(&e)),
    }
}

/// `qxctl events`: one line (or one JSON object) per event.
pub async fn run_events(args: EventsArgs, client: &mut Client, json: bool) -> anyhow::Result<i32> {
    let req = pb::StreamEventsRequest {
        after_seq: args.after_seq,
        vm_id: args.vm.unwrap_or_default(),
    };
    let mut stream = match client.stream_events(req).await {
        Ok(r) => r.into_inner(),
        Err(e) => return Ok(fail(&e)),
    };
    let mut seen = 0u64;
    while args.count.is_none_or(|c| seen < c) {
        match stream.next().await {
            Some(Ok(e)) => {
                seen += 1;
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    println!(
                        "{:>6}  {}  {}  {:<20}  {}",
                        e.seq,
                        e.unix_ms,
                        e.vm_id,
                        event_name(e.kind),
                        Esc(&e.detail)
                    );
                }
            }
            Some(Err(e)) => return Ok(fail(&e)),
            None => break,
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn table_aligns_columns_to_the_widest_cell() {
        let t = table(
            &["Id", "Name"],
            &[
                vec!["1".into(), "short".into()],
                vec!["22".into(), "a-longer-name".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], " Id   Name");
        assert_eq!(lines[2], " 1    short");
        assert_eq!(lines[3], " 22   a-longer-name");
    }

    #[test]
    fn utc_time_renders_civil_dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 +0000");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 +0000");
        assert_eq!(utc_time(1_795_346_067), "2026-11-22 11:14:27 +0000");
    }

    #[test]
    fn create_args_become_a_spec() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct T {
            #[command(subcommand)]
            vm: VmCommand,
        }
        let t = T::parse_from([
            "t",
            "create",
            "web",
            "--cpus",
            "2",
            "--memory",
            "256",
            "--disk",
            "4",
            "--disk",
            "/img/a.qcow2",
            "--empty-cdrom",
            "--label",
            "a=b=c",
            "--boot",
            "cdrom,disk",
        ]);
        let VmCommand::Create(a) = t.vm else {
            panic!("not create")
        };
        let r = create_request(&a).unwrap();
        let s = r.spec.unwrap();
        assert_eq!((s.cpu_cores, s.memory_mib), (2, 256));
        assert_eq!(s.disks[0].size_gib, 4);
        assert_eq!(s.disks[1].path, "/img/a.qcow2");
        assert!(s.disks[2].cdrom && s.disks[2].path.is_empty());
        assert_eq!(r.labels.get("a").map(String::as_str), Some("b=c"));
        assert!(s.disks.iter().all(|d| d.pool.is_empty()));
        assert_eq!(
            s.boot_order,
            [pb::BootDevice::Cdrom as i32, pb::BootDevice::Disk as i32]
        );
    }

    #[test]
    fn pool_volume_and_disk_size_become_volume_disks_first() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct T {
            #[command(subcommand)]
            vm: VmCommand,
        }
        let parse = |args: &[&str]| {
            let mut all = vec!["t", "create", "web"];
            all.extend_from_slice(args);
            T::try_parse_from(all).map(|t| match t.vm {
                VmCommand::Create(a) => create_request(&a),
                _ => panic!("not create"),
            })
        };
        // Existing or created volumes, before the --disk images.
        let r = parse(&[
            "--disk",
            "/img/a.qcow2",
            "--pool",
            "images",
            "--volume",
            "root",
            "--volume",
            "data",
            "--disk-size",
            "20G",
        ])
        .unwrap()
        .unwrap();
        let d = r.spec.unwrap().disks;
        let got: Vec<_> = d
            .iter()
            .map(|d| {
                (
                    d.pool.as_str(),
                    d.volume.as_str(),
                    d.size_gib,
                    d.path.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("images", "root", 20, ""),
                ("images", "data", 20, ""),
                ("", "", 0, "/img/a.qcow2")
            ]
        );
        // --disk-size alone: one new volume the daemon names.
        let r = parse(&["--pool", "images", "--disk-size", "3"])
            .unwrap()
            .unwrap();
        let d = &r.spec.unwrap().disks[0];
        assert_eq!(
            (d.pool.as_str(), d.volume.as_str(), d.size_gib),
            ("images", "", 3)
        );
        // An existing volume, no size.
        let r = parse(&["--pool", "images", "--volume", "v"])
            .unwrap()
            .unwrap();
        assert_eq!(r.spec.unwrap().disks[0].size_gib, 0);
        // Refused: --volume or --disk-size without --pool (clap), --pool alone, a size that
        // is not whole GiB.
        assert!(parse(&["--volume", "v"]).is_err());
        assert!(parse(&["--disk-size", "1"]).is_err());
        assert!(parse(&["--pool", "images"]).unwrap().is_err());
        assert!(parse(&["--pool", "p", "--disk-size", "1536M"])
            .unwrap()
            .is_err());
        assert_eq!(parse_gib("2T").unwrap(), 2048);
    }
}
