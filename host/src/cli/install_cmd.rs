//! `qxctl agent install VM`: puts the node's agent ISO into the VM's CD-ROM drive and, when the
//! VM already runs our agent, runs the ISO's installer through it (an upgrade in place);
//! otherwise prints the one command an operator runs inside the guest.
//!
//! The flow, and why each step is shaped the way it is:
//! 1. `MountAgentIso`: the node inserts its own image with a forced media change, so the drive
//!    holds the newest ISO, never a cached older one.
//! 2. `GetAgentInfo`: is our agent connected? If not, the command to run is printed; with
//!    `--qemu-ga` the launcher of step 3 runs through the VM's qemu-guest-agent instead
//!    (`virsh qemu-agent-command` `guest-exec`, so qxctl must run on the node), and steps 4-5
//!    go through our agent once the installer has started it.
//! 3. `ExecuteInGuest` runs a short launcher that finds the disc (by content: `install.sh`,
//!    `SHA256SUMS` and `VERSION` at its root), mounts it read-only and starts `install.sh`
//!    *detached* (under `systemd-run` on systemd, `setsid` elsewhere): the installer restarts
//!    the very agent that started it, so it must not live in the agent's cgroup or hold the
//!    agent's output pipes. The launcher returns at once.
//! 4. The host polls (through the agent, which comes back with a new session after the restart)
//!    for the installer's exit status file, then prints the installer's log.
//! 5. On success the disc is unmounted in the guest and ejected (unless `--keep-iso`).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use qx_proto::agent::{ExecExit, ExecRequest};
use tonic::transport::Channel;

use crate::pb;
use crate::pb::node_daemon_service_client::NodeDaemonServiceClient;

/// Where the detached installer leaves its exit status and its output in the guest (the paths
/// `iso-build/guest-launch.sh` writes).
const GUEST_RC_FILE: &str = "/run/quantix-kvm-agent-install.rc";
const GUEST_LOG_FILE: &str = "/var/log/quantix-kvm-agent-install.log";
/// How often the host asks whether the installer has finished.
const POLL_INTERVAL_MS: u64 = 1000;
/// Per-call budget for the small commands the host runs in the guest.
const EXEC_TIMEOUT_MS: u32 = 20_000;

/// Exit code: installed (or, without an agent, the command to run was printed).
pub const EXIT_OK: i32 = 0;
/// Exit code: the installer ran and failed (its exit code and log are printed).
pub const EXIT_INSTALL_FAILED: i32 = 1;
/// Exit code: the installer did not report back within `--timeout-s`.
pub const EXIT_TIMED_OUT: i32 = 2;

/// `qxctl agent install VM`
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The VM (libvirt domain UUID or name).
    pub vm: String,
    /// Only mount the ISO and print the command to run in the guest, even if an agent is
    /// connected.
    #[arg(long)]
    pub print_only: bool,
    /// Leave the ISO in the drive after a successful install.
    #[arg(long)]
    pub keep_iso: bool,
    /// How long to wait for the installer to finish, in seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout_s: u64,
    /// Extra arguments for install.sh (e.g. `--prefix=/opt/qx`), space-separated.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub install_args: String,
    /// When no Quantix agent is connected, start the installer through the VM's
    /// qemu-guest-agent (`virsh qemu-agent-command ... guest-exec`; qxctl must run on the node).
    #[arg(long)]
    pub qemu_ga: bool,
    /// libvirt URI for --qemu-ga.
    #[arg(long, env = "LIBVIRT_DEFAULT_URI", default_value = "qemu:///system")]
    pub libvirt_uri: String,
}

/// The command an operator runs as root inside the guest (any login shell: it is one `sh -c`):
/// mount the disc by its label, else the first CD-ROM, run its installer, unmount, and exit
/// with the installer's code.
pub fn manual_command(volume_id: &str) -> String {
    format!(
        "sh -c 'mkdir -p /mnt/qx && (mount -o ro LABEL={volume_id} /mnt/qx 2>/dev/null \
         || mount -o ro /dev/sr0 /mnt/qx) && sh /mnt/qx/install.sh; rc=$?; umount /mnt/qx; exit $rc'"
    )
}

/// The ISO's volume id for an image path such as `.../quantix-kvm-agent-0.1.0.iso`
/// (`QX_AGENT_0_1_0`); falls back to this qxctl's own version.
pub fn volume_id_for(iso_path: &str) -> String {
    let version = iso_path
        .rsplit('/')
        .next()
        .and_then(|name| name.strip_prefix("quantix-kvm-agent-"))
        .and_then(|rest| rest.strip_suffix(".iso"))
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .unwrap_or(env!("CARGO_PKG_VERSION"));
    format!("QX_AGENT_{}", version.replace('.', "_"))
}

/// The launcher the agent runs (`iso-build/guest-launch.sh`, shared with the VM test that
/// exercises it): find the disc by content, mount it, start install.sh detached.
pub const LAUNCHER_SCRIPT: &str = include_str!("../../../iso-build/guest-launch.sh");

/// The exec request that runs the launcher; `install_args` (options only) go to install.sh.
pub fn launcher_request(install_args: &str) -> ExecRequest {
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        LAUNCHER_SCRIPT.to_string(),
        "qx-agent-install".to_string(),
    ];
    argv.extend(install_args.split_whitespace().map(str::to_string));
    ExecRequest {
        argv,
        timeout_ms: EXEC_TIMEOUT_MS,
        ..Default::default()
    }
}

fn in_guest(vm: &str, exec: ExecRequest) -> pb::ExecuteInGuestRequest {
    pb::ExecuteInGuestRequest {
        vm_id: vm.to_string(),
        exec: Some(exec),
        timeout_ms: EXEC_TIMEOUT_MS + 5000,
    }
}

fn shell(vm: &str, script: String) -> pb::ExecuteInGuestRequest {
    in_guest(
        vm,
        ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), script],
            timeout_ms: EXEC_TIMEOUT_MS,
            ..Default::default()
        },
    )
}

/// The qemu-guest-agent command that runs the launcher: `guest-exec` of the same argv the
/// agent path uses, as `virsh qemu-agent-command` takes it.
pub fn qga_exec_command(install_args: &str) -> String {
    let argv = launcher_request(install_args).argv;
    serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": argv[0], "arg": argv[1..], "capture-output": true},
    })
    .to_string()
}

/// Runs one qemu-guest-agent command through libvirt; returns its `return` value.
async fn qga(uri: &str, vm: &str, command: &str) -> anyhow::Result<serde_json::Value> {
    let out = tokio::process::Command::new("virsh")
        .args(["-c", uri, "qemu-agent-command", vm, command])
        .output()
        .await
        .context("running virsh (is libvirt-clients installed on this node?)")?;
    if !out.status.success() {
        anyhow::bail!(
            "virsh qemu-agent-command failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let reply: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("qemu-guest-agent reply")?;
    Ok(reply["return"].clone())
}

/// Starts the launcher through qemu-guest-agent and waits for the launcher (not the installer)
/// to exit; returns what it printed.
async fn launch_through_qemu_ga(args: &InstallArgs, vm: &str) -> anyhow::Result<String> {
    let started = qga(&args.libvirt_uri, vm, &qga_exec_command(&args.install_args))
        .await
        .with_context(|| format!("starting the installer in {vm} through qemu-guest-agent"))?;
    let pid = started["pid"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("qemu-guest-agent guest-exec returned no pid"))?;
    let status_cmd =
        serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string();
    let deadline = Instant::now() + Duration::from_millis(u64::from(EXEC_TIMEOUT_MS));
    loop {
        let st = qga(&args.libvirt_uri, vm, &status_cmd).await?;
        if st["exited"].as_bool() == Some(true) {
            if st["exitcode"].as_i64() != Some(0) {
                anyhow::bail!("the installer launcher failed in {vm} under qemu-guest-agent: {st}");
            }
            return Ok(format!(
                "launcher started through qemu-guest-agent (pid {pid})"
            ));
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the installer launcher did not finish under qemu-guest-agent");
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_string()
}

fn exit_code(exit: &ExecExit) -> i32 {
    if exit.exited {
        exit.exit_code
    } else {
        128 + exit.signal
    }
}

/// Runs `qxctl agent install`. Returns the process exit code (the `EXIT_*` constants).
pub async fn run(
    args: InstallArgs,
    client: &mut NodeDaemonServiceClient<Channel>,
    json: bool,
) -> anyhow::Result<i32> {
    let vm = args.vm.clone();
    let media = client
        .mount_agent_iso(pb::VmIdRequest { vm_id: vm.clone() })
        .await
        .with_context(|| format!("mounting the agent ISO in {vm}"))?
        .into_inner();
    let volume_id = volume_id_for(&media.inserted);
    if !json {
        println!("{vm}: {} is in drive {}", media.inserted, media.device);
    }

    let agent = client
        .get_agent_info(pb::AgentRequest {
            vm_id: vm.clone(),
            timeout_ms: 0,
        })
        .await
        .map(|r| r.into_inner())
        .ok();
    let connected = agent.as_ref().is_some_and(|a| a.connected && !a.stale);

    if args.print_only || (!connected && !args.qemu_ga) {
        let command = manual_command(&volume_id);
        if json {
            let out = serde_json::json!({
                "vm_id": vm,
                "device": media.device,
                "iso": media.inserted,
                "installed": false,
                "agent_connected": connected,
                "command": command,
            });
            println!("{out}");
        } else {
            if !connected {
                println!("{vm}: no Quantix agent is connected; run this inside the guest as root:");
            } else {
                println!("{vm}: run this inside the guest as root:");
            }
            println!();
            println!("    {command}");
        }
        return Ok(EXIT_OK);
    }
    let old = agent.unwrap_or_default();

    let started = if connected {
        let launched = client
            .execute_in_guest(in_guest(&vm, launcher_request(&args.install_args)))
            .await
            .with_context(|| format!("starting the installer in {vm}"))?
            .into_inner();
        if exit_code(&launched) != 0 {
            anyhow::bail!(
                "the installer launcher failed in {vm} (exit {}): {}",
                exit_code(&launched),
                text(&launched.stderr)
            );
        }
        text(&launched.stdout)
    } else {
        launch_through_qemu_ga(&args, &vm).await?
    };
    if !json {
        println!("{vm}: {started}");
    }

    // The installer restarts the agent: calls fail until it is back, then the status appears.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let check = format!("cat {GUEST_RC_FILE} 2>/dev/null || exit 1; cat {GUEST_LOG_FILE}");
    let (rc, log) = loop {
        if Instant::now() >= deadline {
            if json {
                let out = serde_json::json!({"vm_id": vm, "installed": false, "timed_out": true});
                println!("{out}");
            } else {
                eprintln!(
                    "{vm}: the installer did not report back within {}s; see {GUEST_LOG_FILE} in the guest",
                    args.timeout_s
                );
            }
            return Ok(EXIT_TIMED_OUT);
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
        let Ok(reply) = client.execute_in_guest(shell(&vm, check.clone())).await else {
            continue;
        };
        let reply = reply.into_inner();
        if exit_code(&reply) != 0 {
            continue;
        }
        let out = text(&reply.stdout);
        let (first, rest) = out.split_once('\n').unwrap_or((out.as_str(), ""));
        let Ok(rc) = first.trim().parse::<i32>() else {
            continue;
        };
        break (rc, rest.to_string());
    };

    let now = client
        .get_agent_info(pb::AgentRequest {
            vm_id: vm.clone(),
            timeout_ms: 0,
        })
        .await
        .map(|r| r.into_inner())
        .unwrap_or_default();
    let installed = rc == 0;
    let mut ejected = false;
    if installed && !args.keep_iso {
        ejected = client
            .eject_agent_iso(pb::VmIdRequest { vm_id: vm.clone() })
            .await
            .is_ok();
    }

    if json {
        let out = serde_json::json!({
            "vm_id": vm,
            "installed": installed,
            "installer_exit_code": rc,
            "previous_version": old.version,
            "version": now.version,
            "session_id": now.session_id,
            "ejected": ejected,
            "log": log,
        });
        println!("{out}");
    } else {
        println!("{log}");
        if installed {
            println!(
                "{vm}: agent {} -> {} (session {:#x}){}",
                old.version,
                now.version,
                now.session_id,
                if ejected { ", ISO ejected" } else { "" }
            );
        } else {
            eprintln!("{vm}: install.sh exited with {rc} (install.sh --help lists the codes)");
        }
    }
    Ok(if installed {
        EXIT_OK
    } else {
        EXIT_INSTALL_FAILED
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn volume_id_comes_from_the_image_name() {
        assert_eq!(
            volume_id_for("/var/lib/qx/iso/quantix-kvm-agent-1.12.3.iso"),
            "QX_AGENT_1_12_3"
        );
    }

    #[test]
    fn volume_id_falls_back_to_own_version_for_other_names() {
        let own = format!("QX_AGENT_{}", env!("CARGO_PKG_VERSION").replace('.', "_"));
        assert_eq!(volume_id_for("/srv/custom.iso"), own);
        assert_eq!(volume_id_for("/srv/quantix-kvm-agent-x;rm.iso"), own);
        assert_eq!(volume_id_for(""), own);
    }

    #[test]
    fn launcher_parses_under_sh_and_names_the_files_polled() {
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", LAUNCHER_SCRIPT])
            .status()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        assert!(status.success());
        assert!(LAUNCHER_SCRIPT.contains(&format!("rcf={GUEST_RC_FILE}\n")));
        assert!(LAUNCHER_SCRIPT.contains(&format!("log={GUEST_LOG_FILE}\n")));
    }

    #[test]
    fn launcher_request_passes_install_options_as_separate_words() {
        let req = launcher_request(" --timeout 60  --prefix=/opt/qx ");
        assert_eq!(req.argv[..2], ["/bin/sh".to_string(), "-c".to_string()]);
        assert_eq!(req.argv[2], LAUNCHER_SCRIPT);
        assert_eq!(
            req.argv[3..],
            ["qx-agent-install", "--timeout", "60", "--prefix=/opt/qx"].map(String::from)
        );
    }

    #[test]
    fn qemu_ga_command_runs_the_same_launcher_argv() {
        let cmd: serde_json::Value =
            serde_json::from_str(&qga_exec_command("--timeout 60")).unwrap();
        assert_eq!(cmd["execute"], "guest-exec");
        assert_eq!(cmd["arguments"]["path"], "/bin/sh");
        let arg: Vec<String> = serde_json::from_value(cmd["arguments"]["arg"].clone()).unwrap();
        assert_eq!(arg, launcher_request("--timeout 60").argv[1..]);
    }

    #[test]
    fn manual_command_mounts_by_label_then_sr0() {
        let c = manual_command("QX_AGENT_0_1_0");
        assert!(c.contains("LABEL=QX_AGENT_0_1_0"));
        assert!(c.contains("/dev/sr0"));
        assert!(c.contains("sh /mnt/qx/install.sh"));
    }

    #[test]
    fn manual_command_is_one_valid_sh_command() {
        let c = manual_command("QX_AGENT_0_1_0");
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", &c])
            .status()
            .unwrap();
        assert!(status.success());
        // The inner script parses too (sh -n does not look inside the quoted argument).
        let inner = c
            .strip_prefix("sh -c '")
            .and_then(|s| s.strip_suffix('\''))
            .unwrap();
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", inner])
            .status()
            .unwrap();
        assert!(status.success());
    }
}
