//! `quantix-kvm-agent`: parses the command line, loads the configuration, runs the loop.

use std::path::PathBuf;
use std::process::ExitCode;

use qx_agent::config::{Config, DEFAULT_CONFIG_PATH};
use qx_agent::event_loop::{self, ConfigSource};
use qx_agent::logring;

const HELP: &str = "\
NAME
    quantix-kvm-agent - Quantix KVM guest agent

SYNOPSIS
    quantix-kvm-agent [OPTIONS]

DESCRIPTION
    Serves the Quantix host (qx-node) over the virtio-serial port
    org.quantix.agent.0: identity, liveness, telemetry, command execution, file
    transfer, filesystem freeze and trim, time, users and keys, network and disk
    information, power actions. One thread, one poll loop; a host that is absent
    or stops reading is a normal state, not an error. The agent never exits on
    its own: it waits for the port to appear and for a host to connect.

OPTIONS
    --device PATH
        The virtio-serial port. Default: /dev/virtio-ports/org.quantix.agent.0,
        falling back to the /dev/vportNpM whose
        /sys/class/virtio-ports/vportNpM/name is org.quantix.agent.0.
    --connect unix:PATH
        Connect to a unix stream socket instead of a port (tests, containers).
        Reconnects with a capped back-off when the socket closes.
    --config PATH
        Configuration file. Default: /etc/quantix-kvm/agent.conf (optional; a
        file named explicitly must exist).
    --log-level LEVEL
        off, error, warn, info (default), debug or trace.
    --log-target TARGET
        stderr (default) or syslog (/dev/log; stderr when no syslog daemon).
    --telemetry-interval-ms N
        Telemetry push period; 0 disables pushes. Default 10000.
    --ping-interval-ms N
        Ping a silent host this often; after stale_after_pings silent intervals
        the link is stale and the agent re-announces itself. 0 disables.
        Default 5000.
    --max-concurrent-exec N
        Children running at once; more requests get Error BUSY. Default 8.
    --block-rpcs LIST
        qemu-ga commands to refuse on the qemu-ga port (comma-separated).
    --allow-rpcs LIST
        qemu-ga commands to allow there; all others are refused.
    --set KEY=VALUE
        Set any configuration key (repeatable); see CONFIGURATION.
    -V, --version
        Print the version and exit.
    -h, --help
        Print this help and exit.

CONFIGURATION
    The file holds `key = value` lines; `#` starts a comment. Unknown keys are
    an error. Command-line options override the file, also after a reload.
    Keys: device, connect, log_level, log_target, log_ring_lines,
    telemetry_interval_ms, ping_interval_ms, stale_after_pings, outbox_bytes,
    max_concurrent_exec, exec_timeout_ms, exec_kill_grace_ms,
    exec_output_cap_bytes, file_chunk_bytes, max_open_files, max_open_reads,
    file_allow,
    file_deny (comma-separated path prefixes), freeze_state_file,
    freeze_hooks_dir, time_max_skew_s, disable (comma-separated capabilities,
    e.g. exec,power), power_command, power_syscall_fallback, qga_device,
    qga_connect, qga_config, qga_block_rpcs, qga_allow_rpcs, qga_fsfreeze_hook,
    qga_exec_reply_wait_ms.

QEMU GUEST AGENT PROTOCOL
    The agent also serves qemu-guest-agent's JSON protocol on
    /dev/virtio-ports/org.qemu.guest_agent.0 when that port exists (qga_device;
    none turns it off), so libvirt, Proxmox and OpenStack drive it unchanged.
    The [general] keys path, block-rpcs, allow-rpcs and fsfreeze-hook of
    /etc/qemu/qemu-ga.conf apply where the agent's own configuration is silent.
    A guest-exec reply waits for its child to end, at most
    qga_exec_reply_wait_ms (20; 0 answers at once, as qemu-ga does), so that a
    short command is reported exited at the first guest-exec-status.

SIGNALS
    SIGTERM, SIGINT  thaw filesystems the agent froze, flush pending output to
                     a connected host (at most 2 s), then exit 0.
    SIGHUP           reload the configuration (transport changes need a
                     restart).

EXIT STATUS
    0 after SIGTERM/SIGINT; 1 when the poll or signal handling cannot be set
    up; 2 for a bad command line or configuration.

FILES
    /etc/quantix-kvm/agent.conf          configuration
    /etc/quantix-kvm/fsfreeze-hook.d/    pre-freeze / post-thaw hooks
    /run/quantix-kvm-agent.frozen        freeze record (a restarted agent thaws)
    /etc/qemu/qemu-ga.conf               qemu-ga's configuration (optional)
";

/// What the command line asked for.
enum Action {
    Run {
        config: PathBuf,
        optional: bool,
        overrides: Vec<(String, String)>,
    },
    Print(String),
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Action, String> {
    let mut config = PathBuf::from(DEFAULT_CONFIG_PATH);
    let mut optional = true;
    let mut overrides = Vec::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let key = match flag.as_str() {
            "-h" | "--help" => return Ok(Action::Print(HELP.to_string())),
            "-V" | "--version" => {
                return Ok(Action::Print(format!(
                    "quantix-kvm-agent {} (protocol {})\n",
                    env!("CARGO_PKG_VERSION"),
                    qx_proto::PROTOCOL_VERSION
                )))
            }
            "--config" => {
                config = PathBuf::from(value("--config")?);
                optional = false;
                continue;
            }
            "--set" => {
                let kv = value("--set")?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--set {kv}: expected KEY=VALUE"))?;
                overrides.push((k.trim().to_string(), v.to_string()));
                continue;
            }
            "--device" => "device",
            "--connect" => "connect",
            "--log-level" => "log_level",
            "--log-target" => "log_target",
            "--telemetry-interval-ms" => "telemetry_interval_ms",
            "--ping-interval-ms" => "ping_interval_ms",
            "--max-concurrent-exec" => "max_concurrent_exec",
            "--block-rpcs" => "qga_block_rpcs",
            "--allow-rpcs" => "qga_allow_rpcs",
            other => return Err(format!("unknown option {other} (see --help)")),
        };
        let v = value(&flag)?;
        overrides.push((key.to_string(), v));
    }
    Ok(Action::Run {
        config,
        optional,
        overrides,
    })
}

fn main() -> ExitCode {
    let (config, optional, overrides) = match parse_args(std::env::args().skip(1)) {
        Ok(Action::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Action::Run {
            config,
            optional,
            overrides,
        }) => (config, optional, overrides),
        Err(e) => {
            eprintln!("quantix-kvm-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match Config::load(&config, optional, &overrides) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("quantix-kvm-agent: {e}");
            return ExitCode::from(2);
        }
    };
    logring::init(cfg.log_level, cfg.log_target, cfg.log_ring_lines);
    // Probed once, here, before any request: which way request paths are resolved.
    log::info!(
        "file paths resolved by {}",
        qx_agent::sys::resolver().describe()
    );
    let source = ConfigSource {
        path: config,
        optional,
        overrides,
    };
    match event_loop::run(cfg, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HELP;

    /// The hand-kept man page (`quantix-kvm-agent.8`, shipped in the packages and on the
    /// ISO) names every section and option of `--help`, so the two cannot drift apart.
    #[test]
    fn man_page_names_every_section_and_option_of_help() {
        let page = include_str!("../quantix-kvm-agent.8").replace("\\-", "-");
        for line in HELP.lines() {
            let heading = !line.is_empty() && !line.starts_with(' ');
            if heading {
                assert!(page.contains(&format!(".SH {line}\n")), "section {line}");
            }
            let opt = line.trim_start();
            if line.starts_with("    -") && opt.starts_with('-') {
                assert!(page.contains(&format!(".B {opt}\n")), "option {opt}");
            }
        }
        assert!(page.contains(".TH QUANTIX-KVM-AGENT 8 "));
    }
}
