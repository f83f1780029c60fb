//! One QEMU process per [`Vm`], owned by pid.
//!
//! The VM boots the uncompressed kernel through its PVH entry with TCG (KVM only where the CPU
//! really has vmx/svm and the host is not the nested PVM hypervisor, see
//! docs/protocol.md, "The port's measured behaviour"). Each virtio-serial port is a chardev socket in server mode
//! (`server=on,wait=off`) in the VM's own temporary directory, so two VMs never share a path.
//! Dropping the [`Vm`] kills QEMU and reaps it; when the dropping thread is panicking (a failed
//! test) the serial console is printed and kept under `target/vm/logs/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::image::{target_dir, Image};

/// The port the agent opens.
pub const AGENT_PORT: &str = "org.quantix.agent.0";
/// The port qemu-ga opens (bench image).
pub const QGA_PORT: &str = "org.qemu.guest_agent.0";
const POLL_INTERVAL_MS: u64 = 20;

/// Failures starting or waiting for QEMU.
#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot create the VM's working directory")]
    WorkDir(#[source] std::io::Error),
    #[error("cannot start qemu-system-x86_64 (run ci/setup.sh)")]
    Spawn(#[source] std::io::Error),
    #[error("qemu exited during start-up with {status}: {console}")]
    EarlyExit { status: ExitStatus, console: String },
    #[error("socket {0} did not appear")]
    NoSocket(PathBuf),
    #[error("cannot wait for qemu")]
    Wait(#[source] std::io::Error),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// A label for logs and log file names.
    pub name: String,
    pub hostname: String,
    pub memory_mib: u32,
    /// virtio-serial port names; each gets a chardev socket `<name>.sock`.
    pub ports: Vec<String>,
    /// Raw images attached as virtio-blk (vda, vdb, ...).
    pub disks: Vec<PathBuf>,
    /// A bandwidth limit on every disk, in bytes per second (QEMU's I/O throttling), to make
    /// a slow disk.
    pub disk_bps: Option<u64>,
    /// A restricted user-mode NIC (no route out) so the guest has an eth0.
    pub nic: bool,
    /// Extra kernel command-line words (see ci/vm/init.sh for the qx.* ones).
    pub cmdline: Vec<String>,
    /// The image carrying qemu-ga as well.
    pub bench_image: bool,
}

impl VmSpec {
    /// A VM with the agent on its port and nothing else.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            hostname: format!("qx-{name}"),
            memory_mib: 256,
            ports: vec![AGENT_PORT.to_string()],
            disks: Vec::new(),
            disk_bps: None,
            nic: false,
            cmdline: Vec::new(),
            bench_image: false,
        }
    }
}

/// Whether KVM can boot a stock kernel here: real vmx/svm and not the nested PVM hypervisor.
pub fn kvm_usable() -> bool {
    let cpu_ok = fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    cpu_ok && !Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists()
}

/// A running QEMU, killed and reaped on drop.
#[derive(Debug)]
pub struct Vm {
    pub spec: VmSpec,
    pub image: Image,
    child: Child,
    dir: tempfile::TempDir,
    started: Instant,
    keep_log: bool,
}

impl Vm {
    /// Starts QEMU and waits until every port's socket exists (the guest is still booting).
    pub fn start(spec: VmSpec) -> anyhow::Result<Self> {
        let image = Image::locate(spec.bench_image)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("qx-vm-{}-", spec.name))
            .tempdir()
            .map_err(QemuError::WorkDir)?;
        let console = dir.path().join("console.log");
        let mut append = vec![
            "console=ttyS0".to_string(),
            "panic=-1".to_string(),
            "quiet".to_string(),
            format!("qx.hostname={}", spec.hostname),
        ];
        append.extend(spec.cmdline.iter().cloned());

        let mut cmd = Command::new("qemu-system-x86_64");
        let accel = if kvm_usable() { "kvm" } else { "tcg" };
        cmd.args(["-accel", accel, "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot", "-smp", "1"])
            .args(["-m", &spec.memory_mib.to_string()])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", &append.join(" ")])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-device", "virtio-serial-pci,id=vser0"]);
        for (i, port) in spec.ports.iter().enumerate() {
            let sock = dir.path().join(format!("{port}.sock"));
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=port{i},path={},server=on,wait=off",
                    sock.display()
                ))
                .arg("-device")
                .arg(format!(
                    "virtserialport,bus=vser0.0,chardev=port{i},name={port}"
                ));
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            let throttle = spec
                .disk_bps
                .map(|bps| format!(",throttling.bps-total={bps}"))
                .unwrap_or_default();
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,index={i},cache=unsafe{throttle}",
                disk.display()
            ));
        }
        if spec.nic {
            cmd.args(["-netdev", "user,id=net0,restrict=on"])
                .args(["-device", "virtio-net-pci,netdev=net0"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::File::create(dir.path().join("qemu.stderr")).map_err(QemuError::WorkDir)?,
            ));
        crate::sys::kill_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(QemuError::Spawn)?;
        let mut vm = Self {
            spec,
            image,
            child,
            dir,
            started: Instant::now(),
            keep_log: false,
        };
        for port in vm.spec.ports.clone() {
            vm.wait_for_socket(&vm.port_socket(&port))?;
        }
        Ok(vm)
    }

    fn wait_for_socket(&mut self, path: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            if let Some(status) = self.child.try_wait().map_err(QemuError::Wait)? {
                let mut console = self.console();
                console.push_str(
                    &fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default(),
                );
                return Err(QemuError::EarlyExit { status, console }.into());
            }
            if Instant::now() > deadline {
                return Err(QemuError::NoSocket(path.to_path_buf()).into());
            }
            thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
        Ok(())
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The host end of a virtio-serial port.
    pub fn port_socket(&self, port: &str) -> PathBuf {
        self.dir.path().join(format!("{port}.sock"))
    }

    /// The agent port's socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.port_socket(AGENT_PORT)
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Keep and print the console log when this VM is dropped, failed test or not.
    pub fn keep_log(&mut self) {
        self.keep_log = true;
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(QemuError::Wait)? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
    }

    /// Waits until the console shows `needle` (e.g. the init's "qx-init: up").
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return Ok(true);
            }
            if self.child.try_wait().map_err(QemuError::Wait)?.is_some()
                || Instant::now() > deadline
            {
                return Ok(false);
            }
            thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
    }

    fn save_log(&self) {
        let console = self.console();
        let logs = target_dir().join("vm").join("logs");
        let file = logs.join(format!("{}-{}.log", self.spec.name, self.pid()));
        let saved = fs::create_dir_all(&logs)
            .and_then(|()| fs::write(&file, &console))
            .is_ok();
        eprintln!(
            "---- console of VM {} (qemu pid {}, up {:.1} s){} ----\n{}\n---- end of console ----",
            self.spec.name,
            self.pid(),
            self.uptime().as_secs_f64(),
            if saved {
                format!(", kept in {}", file.display())
            } else {
                String::new()
            },
            console
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Kill by our own child handle (its pid), never by name.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if self.keep_log || thread::panicking() {
            self.save_log();
        }
    }
}
