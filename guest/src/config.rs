//! Configuration: `/etc/quantix-kvm/agent.conf` plus command-line overrides.
//!
//! The file is `key = value` lines; `#` starts a comment; blank lines are ignored; unknown
//! keys are an error (a typo must not silently change nothing). A missing file at the default
//! path means "all defaults". Command-line flags override the file, and keep overriding it
//! after a SIGHUP reload.
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `device` | `/dev/virtio-ports/org.quantix.agent.0` | the virtio-serial port |
//! | `connect` | (none) | `unix:PATH`: use a unix socket instead of the port |
//! | `log_level` | `info` | off, error, warn, info, debug, trace |
//! | `log_target` | `stderr` | `stderr` or `syslog` |
//! | `log_ring_lines` | `1000` | lines kept for `LogsRequest` |
//! | `telemetry_interval_ms` | `10000` | telemetry push period; 0 disables |
//! | `ping_interval_ms` | `5000` | ping a silent host this often; 0 disables liveness |
//! | `stale_after_pings` | `3` | silent intervals before the link counts as stale |
//! | `outbox_bytes` | `262144` | reply-lane capacity of the outbox (raised to fit `max_concurrent_exec` collected exec replies) |
//! | `max_concurrent_exec` | `8` | running children; more get `Error{BUSY}` |
//! | `exec_timeout_ms` | `300000` | exec timeout when the request gives none |
//! | `exec_kill_grace_ms` | `2000` | SIGTERM to SIGKILL grace on timeout |
//! | `exec_output_cap_bytes` | `16384` | collected-mode per-stream cap when the request gives none (at most 30720, so ExecExit fits one frame); streaming output is flow-controlled and uncapped unless the request sets a cap |
//! | `file_chunk_bytes` | `49152` | default file read chunk (also the largest) |
//! | `max_open_files` | `16` | concurrent write transfers |
//! | `max_open_reads` | `16` | concurrent read and hash transfers |
//! | `file_allow` | `/tmp, /var/tmp, /home, /root, /srv, /opt` | comma-separated path prefixes the file operations may touch (`/`: everywhere) |
//! | `file_deny` | (none) | comma-separated path prefixes they may not |
//! | `freeze_state_file` | `/run/quantix-kvm-agent.frozen` | freeze record for crash recovery |
//! | `freeze_hooks_dir` | `/etc/quantix-kvm/fsfreeze-hook.d` | pre-freeze/post-thaw hooks |
//! | `time_max_skew_s` | `31622400` | a time set further than this from the guest's clock is refused unless forced (so is one before the agent's build date) |
//! | `disable` | (none) | comma-separated capabilities to refuse, e.g. `exec,power` |
//! | `power_command` | (detected) | command for power actions, words split on spaces, `{action}` replaced by poweroff, reboot or halt; by default chosen from what PID 1 is (guest/src/power.rs) |
//! | `power_syscall_fallback` | `true` | when the power command fails, sync and call reboot(2) |
//! | `qga_device` | `/dev/virtio-ports/org.qemu.guest_agent.0` | the qemu-ga port (docs/qemu-ga.md); `none` turns that front end off |
//! | `qga_connect` | (none) | `unix:PATH`: serve qemu-ga's protocol on a unix socket instead |
//! | `qga_config` | `/etc/qemu/qemu-ga.conf` | qemu-ga's configuration, `[general]` keys (absent is fine) |
//! | `qga_block_rpcs` | (none) | comma-separated qemu-ga commands to refuse (`--block-rpcs`) |
//! | `qga_allow_rpcs` | (none) | comma-separated qemu-ga commands to allow, all others refused (`--allow-rpcs`) |
//! | `qga_fsfreeze_hook` | (none) | script run with `freeze` / `thaw` around a qemu-ga freeze |
//! | `qga_exec_reply_wait_ms` | `20` | how long a `guest-exec` reply waits for its child to end (0: at once, as qemu-ga) |

use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;
use thiserror::Error;

use crate::logring::{self, LogTarget};

/// Where file operations may go by default: the places an operator copies files to and from
/// (scratch, home directories, service data, add-on software), not the system's own files.
/// `file_allow = /` restores reach everywhere (docs/security.md says why it is not the default).
pub const DEFAULT_FILE_ALLOW: &[&str] = &["/tmp", "/var/tmp", "/home", "/root", "/srv", "/opt"];
pub const DEFAULT_CONFIG_PATH: &str = "/etc/quantix-kvm/agent.conf";
pub const DEFAULT_DEVICE: &str = "/dev/virtio-ports/org.quantix.agent.0";
/// The qemu-ga port.
pub const DEFAULT_QGA_DEVICE: &str = "/dev/virtio-ports/org.qemu.guest_agent.0";
pub const DEFAULT_QGA_CONFIG: &str = "/etc/qemu/qemu-ga.conf";
/// The virtio-serial port name the agent looks for under /sys/class/virtio-ports.
pub const PORT_NAME: &str = "org.quantix.agent.0";

/// Why the configuration could not be loaded. The previous configuration stays in force.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: unknown key {key:?}")]
    UnknownKey { origin: String, key: String },
    #[error("{origin}: bad value {value:?} for {key}: {why}")]
    BadValue {
        origin: String,
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("{origin}: expected `key = value`")]
    Syntax { origin: String },
}

/// Everything the agent can be told.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub device: PathBuf,
    pub connect: Option<PathBuf>,
    pub log_level: LevelFilter,
    pub log_target: LogTarget,
    pub log_ring_lines: usize,
    pub telemetry_interval_ms: u32,
    pub ping_interval_ms: u32,
    pub stale_after_pings: u32,
    pub outbox_bytes: usize,
    pub max_concurrent_exec: usize,
    pub exec_timeout_ms: u32,
    pub exec_kill_grace_ms: u32,
    pub exec_output_cap_bytes: u32,
    pub file_chunk_bytes: u32,
    pub max_open_files: usize,
    pub max_open_reads: usize,
    pub file_allow: Vec<PathBuf>,
    pub file_deny: Vec<PathBuf>,
    pub freeze_state_file: PathBuf,
    pub freeze_hooks_dir: PathBuf,
    pub time_max_skew_s: u64,
    pub disable: Vec<String>,
    pub power_command: Option<String>,
    pub power_syscall_fallback: bool,
    pub qga_device: Option<PathBuf>,
    pub qga_connect: Option<PathBuf>,
    pub qga_config: PathBuf,
    pub qga_block_rpcs: Vec<String>,
    pub qga_allow_rpcs: Vec<String>,
    pub qga_fsfreeze_hook: Option<PathBuf>,
    pub qga_exec_reply_wait_ms: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            device: PathBuf::from(DEFAULT_DEVICE),
            connect: None,
            log_level: LevelFilter::Info,
            log_target: LogTarget::Stderr,
            log_ring_lines: 1000,
            telemetry_interval_ms: 10_000,
            ping_interval_ms: 5000,
            stale_after_pings: 3,
            outbox_bytes: 256 * 1024,
            max_concurrent_exec: 8,
            exec_timeout_ms: 300_000,
            exec_kill_grace_ms: 2000,
            exec_output_cap_bytes: 16 * 1024,
            file_chunk_bytes: crate::ops::files::DEFAULT_CHUNK_BYTES,
            max_open_files: 16,
            max_open_reads: 16,
            file_allow: DEFAULT_FILE_ALLOW.iter().map(PathBuf::from).collect(),
            file_deny: Vec::new(),
            freeze_state_file: PathBuf::from("/run/quantix-kvm-agent.frozen"),
            freeze_hooks_dir: PathBuf::from("/etc/quantix-kvm/fsfreeze-hook.d"),
            time_max_skew_s: crate::ops::timeops::DEFAULT_MAX_SKEW_S,
            disable: Vec::new(),
            power_command: None,
            power_syscall_fallback: true,
            qga_device: Some(PathBuf::from(DEFAULT_QGA_DEVICE)),
            qga_connect: None,
            qga_config: PathBuf::from(DEFAULT_QGA_CONFIG),
            qga_block_rpcs: Vec::new(),
            qga_allow_rpcs: Vec::new(),
            qga_fsfreeze_hook: None,
            qga_exec_reply_wait_ms: 20,
        }
    }
}

fn num<T: std::str::FromStr>(origin: &str, key: &str, value: &str) -> Result<T, ConfigError> {
    value.parse().map_err(|_| ConfigError::BadValue {
        origin: origin.into(),
        key: key.into(),
        value: value.into(),
        why: "not a number",
    })
}

fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl Config {
    /// Sets one key. `origin` names where it came from, for error messages.
    pub fn set(&mut self, origin: &str, key: &str, value: &str) -> Result<(), ConfigError> {
        let value = value.trim();
        match key {
            "device" => self.device = PathBuf::from(value),
            "connect" | "qga_connect" => {
                let sock = if value.is_empty() {
                    None
                } else {
                    let path = value.strip_prefix("unix:").ok_or(ConfigError::BadValue {
                        origin: origin.into(),
                        key: key.into(),
                        value: value.into(),
                        why: "expected unix:PATH",
                    })?;
                    Some(PathBuf::from(path))
                };
                if key == "connect" {
                    self.connect = sock;
                } else {
                    self.qga_connect = sock;
                }
            }
            "qga_device" => {
                self.qga_device =
                    (value != "none" && !value.is_empty()).then(|| PathBuf::from(value))
            }
            "qga_config" => self.qga_config = PathBuf::from(value),
            "qga_block_rpcs" => self.qga_block_rpcs = list(value),
            "qga_allow_rpcs" => self.qga_allow_rpcs = list(value),
            "qga_fsfreeze_hook" => {
                self.qga_fsfreeze_hook = (!value.is_empty()).then(|| PathBuf::from(value))
            }
            "log_level" => {
                self.log_level = logring::parse_level(value).ok_or(ConfigError::BadValue {
                    origin: origin.into(),
                    key: key.into(),
                    value: value.into(),
                    why: "expected off, error, warn, info, debug or trace",
                })?
            }
            "log_target" => {
                self.log_target = match value {
                    "stderr" => LogTarget::Stderr,
                    "syslog" => LogTarget::Syslog,
                    _ => {
                        return Err(ConfigError::BadValue {
                            origin: origin.into(),
                            key: key.into(),
                            value: value.into(),
                            why: "expected stderr or syslog",
                        })
                    }
                }
            }
            "log_ring_lines" => self.log_ring_lines = num(origin, key, value)?,
            "telemetry_interval_ms" => self.telemetry_interval_ms = num(origin, key, value)?,
            "ping_interval_ms" => self.ping_interval_ms = num(origin, key, value)?,
            "stale_after_pings" => self.stale_after_pings = num(origin, key, value)?,
            "outbox_bytes" => self.outbox_bytes = num(origin, key, value)?,
            "max_concurrent_exec" => self.max_concurrent_exec = num(origin, key, value)?,
            "exec_timeout_ms" => self.exec_timeout_ms = num(origin, key, value)?,
            "exec_kill_grace_ms" => self.exec_kill_grace_ms = num(origin, key, value)?,
            "qga_exec_reply_wait_ms" => self.qga_exec_reply_wait_ms = num(origin, key, value)?,
            "exec_output_cap_bytes" => self.exec_output_cap_bytes = num(origin, key, value)?,
            "file_chunk_bytes" => self.file_chunk_bytes = num(origin, key, value)?,
            "max_open_files" => self.max_open_files = num(origin, key, value)?,
            "max_open_reads" => self.max_open_reads = num(origin, key, value)?,
            "file_allow" => self.file_allow = list(value).into_iter().map(PathBuf::from).collect(),
            "file_deny" => self.file_deny = list(value).into_iter().map(PathBuf::from).collect(),
            "freeze_state_file" => self.freeze_state_file = PathBuf::from(value),
            "freeze_hooks_dir" => self.freeze_hooks_dir = PathBuf::from(value),
            "time_max_skew_s" => self.time_max_skew_s = num(origin, key, value)?,
            "disable" => self.disable = list(value),
            "power_command" => self.power_command = (!value.is_empty()).then(|| value.to_string()),
            "power_syscall_fallback" => {
                self.power_syscall_fallback = match value {
                    "true" | "yes" | "1" => true,
                    "false" | "no" | "0" => false,
                    _ => {
                        return Err(ConfigError::BadValue {
                            origin: origin.into(),
                            key: key.into(),
                            value: value.into(),
                            why: "expected true or false",
                        })
                    }
                }
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    origin: origin.into(),
                    key: key.into(),
                })
            }
        }
        Ok(())
    }

    /// Applies the `key = value` lines of `text`.
    pub fn apply_text(&mut self, origin: &str, text: &str) -> Result<(), ConfigError> {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = format!("{origin}:{}", n + 1);
            let (key, value) = line
                .split_once('=')
                .ok_or(ConfigError::Syntax { origin: at.clone() })?;
            self.set(&at, key.trim(), value)?;
        }
        Ok(())
    }

    /// Defaults, then the file at `path` (a missing file is fine only when `optional`), then
    /// the `overrides` from the command line.
    pub fn load(
        path: &Path,
        optional: bool,
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        match std::fs::read_to_string(path) {
            Ok(text) => cfg.apply_text(&path.display().to_string(), &text)?,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
        for (key, value) in overrides {
            cfg.set("command line", key, value)?;
        }
        match std::fs::read_to_string(&cfg.qga_config) {
            Ok(text) => crate::qga::conf::apply(&mut cfg, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("{}: {e}", cfg.qga_config.display()),
        }
        Ok(cfg)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.ping_interval_ms))
    }

    /// The qemu-ga front end's policy.
    pub fn qga_policy(&self) -> crate::qga::QgaPolicy {
        crate::qga::QgaPolicy {
            block: self.qga_block_rpcs.clone(),
            allow: self.qga_allow_rpcs.clone(),
            fsfreeze_hook: self.qga_fsfreeze_hook.clone(),
        }
    }

    /// Whether capability `name` was disabled by the `disable` key.
    pub fn disabled(&self, name: &str) -> bool {
        self.disable.iter().any(|d| d == name)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn file_values_and_comments_are_read() {
        let mut cfg = Config::default();
        cfg.apply_text(
            "t",
            "# comment\n telemetry_interval_ms = 0 \n\nconnect=unix:/tmp/s # trailing\ndisable = exec, power\n",
        )
        .unwrap();
        assert_eq!(cfg.telemetry_interval_ms, 0);
        assert_eq!(cfg.connect, Some(PathBuf::from("/tmp/s")));
        assert!(cfg.disabled("power"));
        assert!(!cfg.disabled("ping"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_their_line() {
        let mut cfg = Config::default();
        let err = cfg
            .apply_text("f", "\ntelemetry_intervl_ms = 5\n")
            .unwrap_err();
        assert_eq!(err.to_string(), "f:2: unknown key \"telemetry_intervl_ms\"");
        assert!(cfg.apply_text("f", "ping_interval_ms = soon").is_err());
        assert!(cfg.apply_text("f", "just words").is_err());
        assert!(cfg.apply_text("f", "connect = tcp:1").is_err());
    }

    #[test]
    fn the_default_file_policy_reaches_operator_places_not_system_files() {
        use crate::ops::policy::PathPolicy;
        use qx_proto::agent::ErrorCode;
        let policy = |cfg: &Config| PathPolicy::new(cfg.file_allow.clone(), cfg.file_deny.clone());
        let default = policy(&Config::default());
        for system in [
            "/etc/passwd",
            "/etc/shadow",
            "/usr/bin",
            "/var/lib",
            "/boot",
            "/",
        ] {
            let e = default.open(system, libc::O_PATH, false).unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyDenied, "{system}: {e}");
        }
        for place in ["/tmp", "/var/tmp", "/root"] {
            assert!(default.open(place, libc::O_PATH, false).is_ok(), "{place}");
        }
        // The old behaviour is one line away.
        let mut cfg = Config::default();
        cfg.apply_text("t", "file_allow = /\n").unwrap();
        assert!(policy(&cfg)
            .open("/etc/passwd", libc::O_PATH, false)
            .is_ok());
    }

    #[test]
    fn command_line_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("qx-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.conf");
        std::fs::write(&path, "max_concurrent_exec = 2\nlog_level = debug\n").unwrap();
        let cfg =
            Config::load(&path, false, &[("max_concurrent_exec".into(), "5".into())]).unwrap();
        assert_eq!(cfg.max_concurrent_exec, 5);
        assert_eq!(cfg.log_level, LevelFilter::Debug);
        assert!(Config::load(&dir.join("missing"), true, &[]).is_ok());
        assert!(Config::load(&dir.join("missing"), false, &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
