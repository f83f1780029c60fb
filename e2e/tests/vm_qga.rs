//! The agent as a drop-in qemu-ga, driven by real libvirt (`qemu:///system`) through the
//! standard `org.qemu.guest_agent.0` channel: libvirt itself is the client, as it is for
//! every stack built on it. One TCG VM boot; each step compares what virsh prints with the
//! guest's own view (read through `guest-exec`, or from the disk image on the host).
//!
//! Needs root, QEMU, libvirt (started with `ci/libvirt.sh`), debugfs and the test image
//! (`bash ci/vm/build-image.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

const URI: &str = "qemu:///system";
/// Hang guards, not timing assertions: TCG boots in seconds, but CI machines are slow.
const AGENT_WAIT: Duration = Duration::from_secs(180);
const PATIENCE: Duration = Duration::from_secs(60);
const HOSTNAME: &str = "qx-qga17";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Destroys and undefines the domain however the test ends.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        for args in [
            vec!["destroy", self.0.as_str()],
            vec!["undefine", self.0.as_str(), "--snapshots-metadata"],
        ] {
            let _ = Command::new("virsh")
                .args(["-q", "-c", URI])
                .args(args)
                .output();
        }
    }
}

impl Domain {
    fn virsh(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("virsh");
        cmd.args(["-q", "-c", URI]).arg(args[0]).arg(&self.0);
        run(cmd.args(&args[1..]))
    }

    /// `virsh` without `-q`, for commands whose result is their message ("Froze 2 ...").
    fn virsh_says(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("virsh");
        cmd.args(["-c", URI]).arg(args[0]).arg(&self.0);
        run(cmd.args(&args[1..]))
    }

    /// `virsh qemu-agent-command`: libvirt syncs, sends, and hands back the reply's `return`.
    fn agent(&self, cmd: Value) -> Value {
        let out = self.virsh(&["qemu-agent-command", &cmd.to_string()]);
        let reply: Value = serde_json::from_str(out.trim()).unwrap();
        reply["return"].clone()
    }

    /// A shell script run in the guest through guest-exec; returns (exit code, stdout).
    fn sh(&self, script: &str) -> (i64, String) {
        let started = self.agent(json!({"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}}));
        let pid = started["pid"].as_i64().unwrap();
        let start = Instant::now();
        loop {
            let s = self.agent(json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
            if s["exited"] == true {
                let out = s["out-data"]
                    .as_str()
                    .map(|b| base64::engine::general_purpose::STANDARD.decode(b).unwrap())
                    .unwrap_or_default();
                return (
                    s["exitcode"].as_i64().unwrap_or(-1),
                    String::from_utf8_lossy(&out).into_owned(),
                );
            }
            assert!(start.elapsed() < PATIENCE, "{script:?} never exited");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn sh_ok(&self, script: &str) -> String {
        let (code, out) = self.sh(script);
        assert_eq!(code, 0, "{script:?} failed: {out}");
        out
    }
}

fn domain_xml(name: &str, dir: &Path, kernel: &Path, initrd: &Path) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 qx.disk=vda:/data qx.hostname={HOSTNAME} qx.ip=10.0.2.15/24</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
      <serial>QGA17DATA</serial>
    </disk>
    <interface type='user'>
      <model type='virtio'/>
    </interface>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>",
        kernel = kernel.display(),
        initrd = initrd.display(),
        disk = dir.join("data.raw").display(),
        console = dir.join("console.log").display(),
    )
}

/// Whether `path` exists in the ext4 image `image`, read on the host with debugfs.
fn on_disk(image: &Path, path: &str) -> bool {
    let out = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    !text.contains("File not found")
}

#[test]
fn libvirt_drives_the_agent_as_qemu_ga() {
    run(Command::new("bash").arg(root().join("ci/libvirt.sh")));
    let image = target_dir().join("vm");
    let (kernel, initrd) = (image.join("vmlinux"), image.join("initramfs.cpio.gz"));
    assert!(
        kernel.exists() && initrd.exists(),
        "{} missing: run `bash ci/vm/build-image.sh`",
        image.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("data.raw");
    run(Command::new("truncate").arg("-s").arg("64M").arg(&disk));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk));
    let name = format!("qx-qga17-{}", std::process::id());
    let xml = dir.path().join("domain.xml");
    std::fs::write(&xml, domain_xml(&name, dir.path(), &kernel, &initrd)).unwrap();
    run(Command::new("virsh")
        .args(["-q", "-c", URI, "define"])
        .arg(&xml));
    let dom = Domain(name);
    dom.virsh(&["start"]);

    // The agent answers once the guest has opened the port.
    let start = Instant::now();
    loop {
        let out = Command::new("virsh")
            .args(["-q", "-c", URI, "qemu-agent-command", &dom.0])
            .arg(r#"{"execute":"guest-ping"}"#)
            .output()
            .unwrap();
        if out.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                r#"{"return":{}}"#
            );
            break;
        }
        assert!(
            start.elapsed() < AGENT_WAIT,
            "agent never answered: {}; console: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // guest-info names our commands; exec runs in the guest.
    let info = dom.agent(json!({"execute": "guest-info"}));
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let cmds = info["supported_commands"].as_array().unwrap();
    assert!(cmds
        .iter()
        .any(|c| c["name"] == "guest-exec" && c["enabled"] == true));
    assert_eq!(dom.sh_ok("cat /proc/sys/kernel/hostname").trim(), HOSTNAME);

    // Host name.
    assert_eq!(
        dom.virsh(&["domhostname", "--source", "agent"]).trim(),
        HOSTNAME
    );

    // Interfaces: what libvirt lists is what the guest has.
    let ifaddr = dom.virsh(&["domifaddr", "--source", "agent"]);
    let guest_ip = dom.sh_ok("ip -o -4 addr show dev eth0");
    assert!(guest_ip.contains("10.0.2.15/24"), "{guest_ip}");
    let mac = dom.sh_ok("cat /sys/class/net/eth0/address");
    let eth0 = ifaddr
        .lines()
        .find(|l| l.trim_start().starts_with("eth0"))
        .unwrap_or_else(|| panic!("no eth0 in {ifaddr}"));
    assert!(eth0.contains(mac.trim()), "{eth0} vs {mac}");
    assert!(eth0.contains("10.0.2.15/24"), "{eth0}");

    // Filesystems: /data on vda, named by the domain's own disk target.
    let fsinfo = dom.virsh(&["domfsinfo"]);
    let mounts = dom.sh_ok("cat /proc/mounts");
    assert!(mounts.contains("/dev/vda /data ext4"), "{mounts}");
    let row: Vec<&str> = fsinfo
        .lines()
        .find(|l| l.split_whitespace().next() == Some("/data"))
        .unwrap_or_else(|| panic!("no /data in {fsinfo}"))
        .split_whitespace()
        .collect();
    assert_eq!(row, ["/data", "vda", "ext4", "vda"], "{fsinfo}");

    // guestinfo: every category libvirt asks for, against the guest's view.
    let gi = dom.virsh(&["guestinfo"]);
    let field = |k: &str| {
        gi.lines()
            .find_map(|l| {
                let (key, v) = l.split_once(':')?;
                (key.trim() == k).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {k} in {gi}"))
    };
    assert_eq!(field("hostname"), HOSTNAME);
    let os_id = dom.sh_ok(". /etc/os-release; echo $ID");
    assert_eq!(field("os.id"), os_id.trim());
    assert_eq!(field("os.kernel-release"), dom.sh_ok("uname -r").trim());
    assert_eq!(field("os.machine"), dom.sh_ok("uname -m").trim());
    assert_eq!(field("user.count"), "0");
    assert_eq!(field("timezone.offset"), "0");
    assert_eq!(field("fs.count"), "1");
    assert_eq!(field("fs.0.mountpoint"), "/data");
    assert_eq!(field("fs.0.fstype"), "ext4");
    assert_eq!(field("fs.0.disk.0.alias"), "vda");
    assert_eq!(field("fs.0.disk.0.serial"), "QGA17DATA");
    // The disk category (guest-get-disks): /dev/vda is the domain's vda.
    let n = (0..field("disk.count").parse::<usize>().unwrap())
        .find(|i| field(&format!("disk.{i}.name")) == "/dev/vda")
        .unwrap_or_else(|| panic!("no /dev/vda among the disks: {gi}"));
    assert_eq!(field(&format!("disk.{n}.alias")), "vda");
    assert_eq!(field(&format!("disk.{n}.partition")), "no");
    // qemu-ga's total: (blocks - free + available) * fragment size.
    let st: Vec<u64> = dom
        .sh_ok("stat -f -c '%S %b %f %a' /data")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(
        field("fs.0.total-bytes").parse::<u64>().unwrap(),
        (st[1] - st[2] + st[3]) * st[0]
    );

    // vCPUs.
    let vcpus = dom.virsh(&["guestvcpus"]);
    let vfield = |k: &str| {
        vcpus
            .lines()
            .find_map(|l| {
                let (key, v) = l.split_once(':')?;
                (key.trim() == k).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {k} in {vcpus}"))
    };
    let online = dom.sh_ok("cat /sys/devices/system/cpu/online");
    assert_eq!(vfield("online"), online.trim());
    assert_eq!(vfield("vcpus"), online.trim());

    // Time: get, set (the guest's clock and RTC follow), sync from the RTC.
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t: i64 = dom
        .virsh(&["domtime"])
        .trim()
        .trim_start_matches("Time:")
        .trim()
        .parse()
        .unwrap();
    let guest_now: i64 = dom.sh_ok("date +%s").trim().parse().unwrap();
    assert!((t - guest_now).abs() < 60, "{t} vs guest {guest_now}");
    let target = 1_893_456_000; // 2030-01-01
    dom.virsh(&["domtime", "--time", &target.to_string()]);
    let after: i64 = dom.sh_ok("date +%s").trim().parse().unwrap();
    assert!(
        (after - target).abs() < 60,
        "guest clock {after}, set {target}"
    );
    // --sync: the guest takes the RTC's time (QEMU's RTC follows the host; the set above
    // wrote the guest's RTC, so set it back first through the same path).
    dom.virsh(&["domtime", "--time", &host_now.to_string()]);
    dom.virsh(&["domtime", "--sync"]);
    let synced: i64 = dom.sh_ok("date +%s").trim().parse().unwrap();
    let rtc: i64 = dom
        .sh_ok("cat /sys/class/rtc/rtc0/since_epoch")
        .trim()
        .parse()
        .unwrap();
    assert!((synced - rtc).abs() < 60, "{synced} vs rtc {rtc}");

    // Freeze: libvirt's count, the guest's writes blocked until the thaw (seen on the disk
    // image from the host), then written. The writer waits for the agent's freeze record
    // (written just before the first FIFREEZE) and then a little longer, so that its write
    // comes while the filesystem is frozen.
    dom.sh_ok(
        "( while [ ! -e /run/quantix-kvm-agent.frozen ]; do sleep 0.05; done; sleep 2; \
         echo during > /data/during; sync; echo done > /run/writer ) >/dev/null 2>&1 &",
    );
    let froze = dom.virsh_says(&["domfsfreeze"]);
    assert!(froze.contains("Froze 1 filesystem"), "{froze}");
    let status = dom.agent(json!({"execute": "guest-fsfreeze-status"}));
    assert_eq!(status, "frozen");
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !on_disk(&disk, "/during"),
        "a write reached the disk while frozen"
    );
    let thawed = dom.virsh_says(&["domfsthaw"]);
    assert!(thawed.contains("Thawed 1 filesystem"), "{thawed}");
    let start = Instant::now();
    while dom.sh("cat /run/writer").1.trim() != "done" {
        assert!(
            start.elapsed() < PATIENCE,
            "the writer never finished after the thaw"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(on_disk(&disk, "/during"));

    // Trim.
    dom.virsh(&["domfstrim"]);
    let trim = dom.agent(json!({"execute": "guest-fstrim", "arguments": {"minimum": 0}}));
    let data = trim["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == "/data")
        .unwrap_or_else(|| panic!("{trim}"));
    assert!(data["error"].is_null(), "{trim}");

    // Password: set through libvirt, checked against /etc/shadow in the guest.
    dom.virsh(&["set-user-password", "qxtest", "s3cret-17"]);
    let check = dom.sh_ok(
        "h=$(grep '^qxtest:' /etc/shadow | cut -d: -f2); s=$(echo \"$h\" | cut -d'$' -f3); \
         [ \"$(mkpasswd -m sha512 -S \"$s\" s3cret-17)\" = \"$h\" ] && echo match",
    );
    assert_eq!(check.trim(), "match");

    // SSH keys through libvirt, against the guest's authorized_keys.
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB8f5LJf0V9DLyg9xu0OSoQ2tY0gA6BG6qM0QYqP0nVt qx17";
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{key}\n")).unwrap();
    dom.sh_ok("mkdir -p /home/qxtest && chown 1000:1000 /home/qxtest");
    dom.virsh(&[
        "set-user-sshkeys",
        "qxtest",
        "--file",
        &keys.display().to_string(),
    ]);
    let listed = dom.virsh(&["get-user-sshkeys", "qxtest"]);
    assert_eq!(listed.trim(), key);
    assert_eq!(
        dom.sh_ok("cat /home/qxtest/.ssh/authorized_keys").trim(),
        key
    );

    // A quiesced external snapshot: libvirt freezes and thaws through the agent.
    let overlay = dir.path().join("overlay.qcow2");
    dom.virsh(&[
        "snapshot-create-as",
        "qga17",
        "--disk-only",
        "--quiesce",
        "--atomic",
        "--no-metadata",
        "--diskspec",
        &format!("vda,file={}", overlay.display()),
    ]);
    assert_eq!(
        dom.agent(json!({"execute": "guest-fsfreeze-status"})),
        "thawed"
    );
    assert!(overlay.exists());

    // Shutdown through the agent: no reply, the guest powers off.
    dom.virsh(&["shutdown", "--mode", "agent"]);
    let start = Instant::now();
    loop {
        let state = Command::new("virsh")
            .args(["-q", "-c", URI, "domstate", &dom.0])
            .output()
            .unwrap();
        let state = String::from_utf8_lossy(&state.stdout).into_owned();
        if state.contains("shut off") {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the guest never powered off ({state}); console: {}",
            std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
