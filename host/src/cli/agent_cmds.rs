//! `qxctl agent|exec|cp|fs|time|watch`: the guest-agent commands.

pub use super::dispatch::code_for;
use super::dispatch::Client;
use super::vm_cmds::utc_time;
use super::{exit, install_cmd};
use crate::pb;
use crate::text::{escape, escape_join, escape_layout, Esc};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use qx_proto::agent::{ExecRequest, FileWriteOpen};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

/// Bytes per WriteGuestFile data message.
const UPLOAD_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, Args)]
pub struct VmArg {
    /// The VM (libvirt domain UUID or name, or the id given to --vm-socket).
    pub vm: String,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Round trip to the agent through the daemon; prints the time and the agent session.
    Ping(VmArg),
    /// What the agent reported: OS, kernel, hostname, addresses, capabilities, freshness.
    Info(VmArg),
    /// The agent's own log ring.
    Logs {
        vm: String,
        /// Only the last N lines (0: all).
        #[arg(long, default_value_t = 0)]
        lines: u32,
    },
    /// The daemon's link to the agent: state, frames, bytes, commands by stage.
    Stats {
        /// One VM; all VMs when absent.
        vm: Option<String>,
    },
    /// Install or upgrade the agent from the node's agent ISO.
    Install(install_cmd::InstallArgs),
    /// Power the guest off through its agent (sync, then the guest's own shutdown).
    Shutdown(PowerArgs),
    /// Reboot the guest through its agent.
    Reboot(PowerArgs),
}

#[derive(Debug, Args)]
pub struct PowerArgs {
    pub vm: String,
    /// Wait this many milliseconds in the guest before acting.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u32,
    /// With shutdown: halt instead of powering off.
    #[arg(long)]
    pub halt: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub vm: String,
    /// Run the words through /bin/sh -c.
    #[arg(long)]
    pub shell: bool,
    /// Working directory in the guest.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Extra environment, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Run as this guest user.
    #[arg(long)]
    pub user: Option<String>,
    /// Kill the command after this many seconds (0: the agent's default).
    #[arg(long, default_value_t = 0)]
    pub timeout_s: u32,
    /// Feed this file to the command's standard input (`-`: qxctl's own standard input); the
    /// input travels in the request, so it must fit one frame (about 64 KiB): copy larger
    /// input in with `qxctl cp` and redirect from the copy. Without it the command's
    /// standard input is /dev/null.
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// VM:PATH or a local path.
    pub src: String,
    /// VM:PATH or a local path.
    pub dst: String,
    /// File mode for uploads, octal (e.g. 755); default 644.
    #[arg(long)]
    pub mode: Option<String>,
    /// Create missing parent directories in the guest.
    #[arg(long)]
    pub parents: bool,
    /// Refuse to replace an existing guest file.
    #[arg(long)]
    pub no_overwrite: bool,
}

#[derive(Debug, Subcommand)]
pub enum FsCommand {
    /// Freeze guest filesystems (the agent thaws by itself after --auto-thaw-s).
    Freeze {
        vm: String,
        /// Mount points; all local writable filesystems when none.
        mounts: Vec<String>,
        #[arg(long, default_value_t = 60)]
        auto_thaw_s: u32,
    },
    /// Thaw filesystems (token from freeze; 0 thaws whatever is frozen).
    Thaw {
        vm: String,
        #[arg(long, default_value_t = 0)]
        token: u64,
    },
    /// Whether filesystems are frozen.
    Status(VmArg),
    /// Discard unused blocks.
    Trim { vm: String, mounts: Vec<String> },
}

#[derive(Debug, Subcommand)]
pub enum TimeCommand {
    /// Set the guest clock to the host's (plus half the measured round trip).
    Sync {
        vm: String,
        /// Set even when the offset is below the threshold.
        #[arg(long)]
        force: bool,
        /// Also write the hardware clock.
        #[arg(long)]
        rtc: bool,
    },
    /// Read the guest clocks.
    Get(VmArg),
}

pub(super) fn print<T: Serialize + std::fmt::Debug>(
    json: bool,
    v: &T,
    text: impl FnOnce(&T) -> String,
) {
    if json {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("qxctl: cannot encode JSON: {e}"),
        }
    } else {
        // Guest fields are escaped where they are formatted; this catches any that were not
        // (every control but the layout's own line breaks).
        println!("{}", escape_layout(&text(v)));
    }
}

fn power_request(a: PowerArgs) -> pb::GuestPowerRequest {
    pb::GuestPowerRequest {
        vm_id: a.vm,
        delay_ms: a.delay_ms,
        halt: a.halt,
    }
}

fn power_text(r: &qx_proto::agent::PowerReply) -> String {
    format!(
        "accepted: the guest will run {} (at {} ms since the epoch)",
        Esc(&r.method),
        r.at_unix_ms
    )
}

/// `qxctl agent ...`.
pub(super) async fn run_agent(
    cmd: AgentCommand,
    client: &mut Client,
    json: bool,
    t: u32,
) -> Result<i32> {
    match cmd {
        AgentCommand::Ping(a) => {
            let r = client
                .ping_agent(pb::AgentRequest {
                    vm_id: a.vm.clone(),
                    timeout_ms: t,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                format!(
                    "{}: agent {} session {:#x}: rtt {} us",
                    a.vm,
                    Esc(&r.agent_version),
                    r.session_id,
                    r.rtt_us
                )
            });
        }
        AgentCommand::Info(a) => {
            let r = client
                .get_agent_info(pb::AgentRequest {
                    vm_id: a.vm.clone(),
                    timeout_ms: t,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                let os = if !r.os_pretty_name.is_empty() {
                    escape(&r.os_pretty_name).into_owned()
                } else if !r.os_name.is_empty() {
                    format!("{} {}", Esc(&r.os_name), Esc(&r.os_version))
                        .trim()
                        .to_string()
                } else {
                    "unknown (the guest has no /etc/os-release)".to_string()
                };
                let or_none = |v: &[String]| {
                    if v.is_empty() {
                        "none".to_string()
                    } else {
                        escape_join(v, " ")
                    }
                };
                format!(
                    "connected:    {}{}\nagent:        {} (session {:#x})\nos:           {os}\n\
                     kernel:       {} {}\nhostname:     {}\naddresses:    {}\n\
                     capabilities: {}\nlast seen:    {}",
                    r.connected,
                    if r.stale { " (data is stale)" } else { "" },
                    Esc(&r.version),
                    r.session_id,
                    Esc(&r.kernel_release),
                    Esc(&r.arch),
                    Esc(&r.hostname),
                    or_none(&r.ip_addresses),
                    or_none(&r.capabilities),
                    seen(r.last_seen_unix_ms)
                )
            });
        }
        AgentCommand::Logs { vm, lines } => {
            let r = client
                .get_guest_logs(pb::GuestLogsRequest {
                    vm_id: vm,
                    max_lines: lines,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                let mut s = String::new();
                if r.dropped > 0 {
                    s.push_str(&format!("({} older lines dropped)\n", r.dropped));
                }
                for l in &r.lines {
                    s.push_str(&format!(
                        "{} {:?} {}\n",
                        l.unix_ms,
                        l.level(),
                        Esc(&l.message)
                    ));
                }
                s.trim_end().to_string()
            });
        }
        AgentCommand::Shutdown(a) => {
            let r = client.guest_shutdown(power_request(a)).await?.into_inner();
            print(json, &r, power_text);
        }
        AgentCommand::Reboot(a) => {
            let r = client.guest_reboot(power_request(a)).await?.into_inner();
            print(json, &r, power_text);
        }
        AgentCommand::Stats { vm } => {
            let r = client
                .get_agent_connection_stats(pb::AgentStatsRequest {
                    vm_id: vm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                let mut s = String::new();
                for c in &r.connections {
                    let k = c.commands.unwrap_or_default();
                    s.push_str(&format!(
                        "{}: {} (connection {}, {} reconnects, agent session {:#x}, {} restarts)\n  socket {}\n  commands: {} queued, {} written, {} acked, {} completed; failed: {} not written, {} not acked, {} ack timeout, {} connection lost, {} agent error; {} redelivered; {} in flight\n  garbage {} bytes, {} bad frames{}\n",
                        c.vm_id, c.state, c.connection_id, c.reconnects, c.agent_session_id, c.agent_restarts,
                        c.socket_path,
                        k.queued, k.written, k.acknowledged, k.completed,
                        k.failed_not_written, k.failed_not_acknowledged, k.failed_ack_timeout,
                        k.failed_connection_lost, k.failed_agent_error, k.redelivered, c.in_flight,
                        c.garbage_bytes, c.bad_frames,
                        if c.last_error.is_empty() { String::new() } else { format!("\n  last error: {}", Esc(&c.last_error)) }
                    ));
                    for (dir, list) in [("rx", &c.rx), ("tx", &c.tx)] {
                        for f in list {
                            s.push_str(&format!(
                                "  {dir} {:<24} {:>8} frames {:>12} bytes\n",
                                f.kind, f.frames, f.bytes
                            ));
                        }
                    }
                }
                s.trim_end().to_string()
            });
        }
        AgentCommand::Install(args) => {
            return install_cmd::run(args, client, json).await;
        }
    }
    Ok(exit::OK)
}

/// `qxctl time ...`.
pub(super) async fn run_time(
    cmd: TimeCommand,
    client: &mut Client,
    json: bool,
    t: u32,
) -> Result<i32> {
    match cmd {
        TimeCommand::Sync { vm, force, rtc } => {
            let r = client
                .sync_time(pb::SyncTimeRequest {
                    vm_id: vm.clone(),
                    force,
                    write_rtc: rtc,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                format!(
                    "{vm}: guest was {:+.6} s off the host (rtt {} us); {}",
                    r.offset_seconds,
                    r.rtt_us,
                    if r.changed { "clock set" } else { "left as is" }
                )
            });
        }
        TimeCommand::Get(a) => {
            let r = client
                .get_guest_time(pb::AgentRequest {
                    vm_id: a.vm,
                    timeout_ms: t,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                format!(
                    "realtime {} ns\nmonotonic {} ns\nboottime {} ns",
                    r.unix_ns, r.monotonic_ns, r.boottime_ns
                )
            });
        }
    }
    Ok(exit::OK)
}

/// `qxctl watch VM`: live telemetry until interrupted.
pub(super) async fn run_watch(a: VmArg, client: &mut Client, json: bool, t: u32) -> Result<i32> {
    let mut s = client
        .stream_telemetry(pb::AgentRequest {
            vm_id: a.vm,
            timeout_ms: t,
        })
        .await?
        .into_inner();
    while let Some(u) = s.message().await? {
        print(json, &u, |u| {
            let tm = u.telemetry.clone().unwrap_or_default();
            let mem = tm.memory.unwrap_or_default();
            format!(
                "{} {}: cpu {:.1}% load {:.2} mem {}/{} MiB procs {} up {} s",
                // HH:MM:SS of the UTC time the daemon received it.
                &utc_time(u.received_unix_ms.div_euclid(1000))[11..19],
                Esc(&tm.hostname),
                tm.cpu.map(|c| c.usage_percent).unwrap_or(0.0),
                tm.load.map(|l| l.one).unwrap_or(0.0),
                (mem.total_bytes - mem.available_bytes.min(mem.total_bytes)) >> 20,
                mem.total_bytes >> 20,
                tm.processes,
                tm.uptime_s
            )
        });
    }
    Ok(exit::OK)
}

pub(super) async fn fs(cmd: FsCommand, client: &mut Client, json: bool) -> Result<()> {
    match cmd {
        FsCommand::Freeze {
            vm,
            mounts,
            auto_thaw_s,
        } => {
            let r = client
                .quiesce_filesystems(pb::QuiesceFilesystemsRequest {
                    vm_id: vm,
                    mount_points: mounts,
                    timeout_seconds: auto_thaw_s,
                    run_pre_freeze_scripts: false,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                format!(
                    "frozen: {} (token {}; auto-thaw at {} unix ms)",
                    escape_join(&r.frozen, " "),
                    r.token,
                    r.auto_thaw_unix_ms
                )
            });
        }
        FsCommand::Thaw { vm, token } => {
            let r = client
                .thaw_filesystems(pb::ThawFilesystemsRequest {
                    vm_id: vm,
                    quiesce_token: token,
                    run_post_thaw_scripts: false,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                format!("thawed: {}", escape_join(&r.thawed, " "))
            });
        }
        FsCommand::Status(a) => {
            let r = client
                .fs_freeze_status(pb::AgentRequest {
                    vm_id: a.vm,
                    timeout_ms: 0,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                format!(
                    "{:?} {} (token {}, auto-thaw in {} ms)",
                    r.state(),
                    escape_join(&r.frozen, " "),
                    r.token,
                    r.auto_thaw_in_ms
                )
            });
        }
        FsCommand::Trim { vm, mounts } => {
            let r = client
                .trim_filesystems(pb::TrimFilesystemsRequest {
                    vm_id: vm,
                    mount_points: mounts,
                    minimum_bytes: 0,
                })
                .await?
                .into_inner();
            print(json, &r, |r| {
                r.results
                    .iter()
                    .map(|t| {
                        if t.error.is_empty() {
                            format!("{}: {} bytes trimmed", Esc(&t.mountpoint), t.trimmed_bytes)
                        } else {
                            format!("{}: {}", Esc(&t.mountpoint), Esc(&t.error))
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

/// Exit code of a finished guest command: its own, or 128+signal.
/// When the daemon last heard from the agent: UTC time and how long ago, or "never".
fn seen(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".to_string();
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let ago = (now_ms - unix_ms).max(0) as f64 / 1000.0;
    format!("{} ({ago:.1} s ago)", utc_time(unix_ms.div_euclid(1000)))
}

pub fn exit_code_of(x: &qx_proto::agent::ExecExit) -> i32 {
    if x.exited {
        x.exit_code
    } else {
        128 + x.signal
    }
}

pub(super) async fn exec(a: ExecArgs, client: &mut Client, json: bool, t: u32) -> Result<i32> {
    let stdin = match a.stdin.as_deref() {
        None => Vec::new(),
        Some(p) if p == Path::new("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading standard input")?;
            buf
        }
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
    };
    let req = pb::ExecuteInGuestRequest {
        vm_id: a.vm.clone(),
        exec: Some(ExecRequest {
            argv: a.argv,
            env: a.env,
            cwd: a.cwd.unwrap_or_default(),
            timeout_ms: a.timeout_s.saturating_mul(1000),
            user: a.user.unwrap_or_default(),
            shell: a.shell,
            stdin,
            stream: true,
            ..Default::default()
        }),
        timeout_ms: t,
    };
    let mut s = client.stream_exec_in_guest(req).await?.into_inner();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    while let Some(ev) = s.message().await? {
        match ev.event {
            Some(pb::exec_event::Event::Output(o)) => {
                if json {
                    print(true, &o, |_| String::new());
                } else if o.stream() == qx_proto::agent::OutputStream::Stderr {
                    err.write_all(&o.data)?;
                    err.flush()?;
                } else {
                    out.write_all(&o.data)?;
                    out.flush()?;
                }
            }
            Some(pb::exec_event::Event::Exit(x)) => {
                if json {
                    print(true, &x, |_| String::new());
                } else if x.timed_out {
                    eprintln!("qxctl: the command timed out in the guest");
                }
                return Ok(exit_code_of(&x));
            }
            Some(pb::exec_event::Event::StartedId(_)) | None => {}
        }
    }
    bail!("the exec stream ended without an exit status")
}

/// `VM:PATH` -> (vm, path); a local path otherwise.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (vm, path) = spec.split_once(':')?;
    let ok = !vm.is_empty()
        && !path.is_empty()
        && crate::agent::validate_vm_id(vm).is_ok()
        && !vm.starts_with('.');
    ok.then_some((vm, path))
}

/// A byte progress bar on stderr when it is a terminal (copies, volume transfers).
pub(crate) fn progress(total: u64, label: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    Some(bar)
}

#[derive(Debug, Serialize)]
struct CopyResult {
    bytes: u64,
    sha256: String,
    verified: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) async fn cp(a: CpArgs, client: &mut Client, json: bool, t: u32) -> Result<i32> {
    match (remote(&a.src), remote(&a.dst)) {
        (Some((vm, path)), None) => download(client, vm, path, Path::new(&a.dst), json, t).await,
        (None, Some((vm, path))) => upload(client, &a, vm, path, json, t).await,
        _ => bail!("exactly one of SRC and DST must be VM:PATH"),
    }
}

async fn download(
    client: &mut Client,
    vm: &str,
    path: &str,
    local: &Path,
    json: bool,
    t: u32,
) -> Result<i32> {
    let local: PathBuf = if local.is_dir() {
        local.join(Path::new(path).file_name().unwrap_or_default())
    } else {
        local.to_path_buf()
    };
    let mut s = client
        .read_guest_file(pb::ReadGuestFileRequest {
            vm_id: vm.to_string(),
            path: path.to_string(),
            offset: 0,
            length: 0,
            timeout_ms: t,
        })
        .await?
        .into_inner();
    let tmp = local.with_extension("qxctl-part");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut bar = None;
    let mut verified = false;
    let mut agent_sha = Vec::new();
    while let Some(c) = s.message().await? {
        if bar.is_none() && c.file_size > 0 {
            bar = progress(c.file_size, path);
        }
        file.write_all(&c.data)?;
        hasher.update(&c.data);
        bytes += c.data.len() as u64;
        if let Some(b) = &bar {
            b.set_position(bytes);
        }
        if c.eof {
            agent_sha = c.sha256;
            verified = true;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    file.sync_all()?;
    let digest = hasher.finalize().to_vec();
    if !verified || agent_sha != digest {
        let _ = std::fs::remove_file(&tmp);
        eprintln!("qxctl: {vm}:{path}: the received data does not match the guest's sha256");
        return Ok(exit::INTEGRITY);
    }
    std::fs::rename(&tmp, &local)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), local.display()))?;
    let r = CopyResult {
        bytes,
        sha256: hex(&digest),
        verified: true,
    };
    print(json, &r, |r| {
        format!(
            "{vm}:{path} -> {}: {} bytes, sha256 {} verified",
            local.display(),
            r.bytes,
            r.sha256
        )
    });
    Ok(exit::OK)
}

async fn upload(
    client: &mut Client,
    a: &CpArgs,
    vm: &str,
    path: &str,
    json: bool,
    t: u32,
) -> Result<i32> {
    let local = Path::new(&a.src);
    let mut data = Vec::new();
    std::fs::File::open(local)
        .and_then(|mut f| f.read_to_end(&mut data))
        .with_context(|| format!("cannot read {}", local.display()))?;
    let digest = Sha256::digest(&data).to_vec();
    let mode = match &a.mode {
        Some(m) => u32::from_str_radix(m, 8).with_context(|| format!("mode {m:?} is not octal"))?,
        None => 0,
    };
    let header = pb::WriteGuestFileRequest {
        part: Some(pb::write_guest_file_request::Part::Header(
            pb::WriteGuestFileHeader {
                vm_id: vm.to_string(),
                open: Some(FileWriteOpen {
                    path: path.to_string(),
                    mode,
                    create_parents: a.parents,
                    overwrite: !a.no_overwrite,
                    ..Default::default()
                }),
                size: data.len() as u64,
                expected_sha256: digest.clone(),
                timeout_ms: t,
            },
        )),
    };
    let bar = progress(data.len() as u64, path);
    let bar2 = bar.clone();
    let total = data.len();
    let mut msgs = vec![header];
    let mut chunks = Vec::new();
    for c in data.chunks(UPLOAD_MESSAGE_BYTES) {
        chunks.push(pb::WriteGuestFileRequest {
            part: Some(pb::write_guest_file_request::Part::Data(c.to_vec())),
        });
    }
    msgs.extend(chunks);
    let mut sent = 0usize;
    let stream = tokio_stream::iter(msgs.into_iter().inspect(move |m| {
        if let (Some(b), Some(pb::write_guest_file_request::Part::Data(d))) = (&bar2, &m.part) {
            sent += d.len();
            b.set_position(sent as u64);
        }
    }));
    let done = client.write_guest_file(stream).await?.into_inner();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if done.sha256 != digest || done.bytes != total as u64 {
        eprintln!("qxctl: {vm}:{path}: the guest stored data that does not match the local sha256");
        return Ok(exit::INTEGRITY);
    }
    let r = CopyResult {
        bytes: done.bytes,
        sha256: hex(&done.sha256),
        verified: true,
    };
    print(json, &r, |r| {
        format!(
            "{} -> {vm}:{path}: {} bytes, sha256 {} verified",
            local.display(),
            r.bytes,
            r.sha256
        )
    });
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    #[test]
    fn last_seen_is_a_utc_time_and_an_age_or_never() {
        assert_eq!(super::seen(0), "never");
        let s = super::seen(1_795_358_785_625);
        assert!(s.starts_with("2026-11-22 14:46:25 +0000 ("), "{s}");
        assert!(s.ends_with(" s ago)"), "{s}");
    }
}
