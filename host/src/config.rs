//! qx-node's configuration: a TOML file (`--config`), overridden by command-line flags.
//!
//! Every key is optional. Example (`/etc/quantix/qx-node.toml`):
//!
//! ```toml
//! listen = "unix:/run/quantix-kvm/qx-node.sock"  # gRPC: unix:/PATH or IP:PORT (TLS, see below)
//! socket_group = "quantix"           # group of the unix socket (mode 0660)
//! metrics_listen = "127.0.0.1:9091"  # Prometheus text at GET /metrics; absent: off
//! libvirt_uri = "qemu:///system"     # "none": serve the agent RPCs without libvirt
//! agent_socket_dir = "/var/run/quantix-kvm/vms"  # <dir>/<vm-id>.agent.sock
//! image_dir = "/var/lib/quantix-kvm/images"
//! agent_iso = "/usr/share/quantix-kvm/agent.iso"
//! disk_roots = ["/srv/vm-disks"]    # besides image_dir and libvirt's pools: disks by path
//! media_dirs = ["/var/lib/quantix-kvm/media"]  # ISOs, kernels, initrds (this is the default)
//!
//! [vm_sockets]                       # explicit bindings, as --vm-socket VMID=PATH
//! web1 = "/run/qemu/web1.agent.sock"
//!
//! [timeouts]                         # milliseconds
//! ping_interval_ms = 5000
//! liveness_window_ms = 15000
//! idle_reconnect_ms = 45000
//! handshake_timeout_ms = 10000
//! write_deadline_ms = 5000
//! ack_timeout_ms = 5000
//! default_timeout_ms = 30000
//! backoff_initial_ms = 100
//! backoff_max_ms = 10000
//!
//! [limits]
//! queue_capacity = 256               # commands waiting for the writer, per VM
//! max_in_flight = 1024               # unfinished commands, per VM
//!
//! [tls]            # TCP needs cert+key; beyond loopback also client_ca (mutual TLS)
//! cert = "/etc/quantix/node.crt"
//! key = "/etc/quantix/node.key"
//! client_ca = "/etc/quantix/ca.crt"
//! ```

use crate::agent::AgentConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Why the configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("--vm-socket {0:?}: expected VMID=PATH")]
    VmSocket(String),
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// Timeouts in milliseconds; absent keys keep the defaults of [`AgentConfig`].
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub ping_interval_ms: Option<u64>,
    pub liveness_window_ms: Option<u64>,
    pub idle_reconnect_ms: Option<u64>,
    pub handshake_timeout_ms: Option<u64>,
    pub write_deadline_ms: Option<u64>,
    pub ack_timeout_ms: Option<u64>,
    pub default_timeout_ms: Option<u64>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub queue_capacity: Option<usize>,
    pub max_in_flight: Option<usize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub listen: Option<String>,
    pub socket_group: Option<String>,
    pub metrics_listen: Option<String>,
    pub libvirt_uri: Option<String>,
    pub agent_socket_dir: Option<PathBuf>,
    pub image_dir: Option<PathBuf>,
    pub agent_iso: Option<PathBuf>,
    #[serde(default)]
    pub disk_roots: Vec<PathBuf>,
    pub media_dirs: Option<Vec<PathBuf>>,
    #[serde(default)]
    pub vm_sockets: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tls: TlsFiles,
}

pub const DEFAULT_LISTEN: &str = "unix:/run/quantix-kvm/qx-node.sock";
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/quantix-kvm/vms";
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/quantix-kvm/images";
pub const DEFAULT_MEDIA_DIR: &str = "/var/lib/quantix-kvm/media";

impl NodeConfig {
    pub fn load(path: &std::path::Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        NodeConfig::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    pub fn parse(text: &str) -> Result<NodeConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// The agent link settings this file describes.
    pub fn agent_config(&self) -> AgentConfig {
        let d = AgentConfig::default();
        let t = &self.timeouts;
        let ms = |v: Option<u64>, dflt: Duration| v.map(Duration::from_millis).unwrap_or(dflt);
        AgentConfig {
            socket_dir: Some(
                self.agent_socket_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR)),
            ),
            ping_interval: ms(t.ping_interval_ms, d.ping_interval),
            liveness_window: ms(t.liveness_window_ms, d.liveness_window),
            idle_reconnect: ms(t.idle_reconnect_ms, d.idle_reconnect),
            handshake_timeout: ms(t.handshake_timeout_ms, d.handshake_timeout),
            write_deadline: ms(t.write_deadline_ms, d.write_deadline),
            ack_timeout: ms(t.ack_timeout_ms, d.ack_timeout),
            default_timeout: ms(t.default_timeout_ms, d.default_timeout),
            backoff_initial: ms(t.backoff_initial_ms, d.backoff_initial),
            backoff_max: ms(t.backoff_max_ms, d.backoff_max),
            queue_capacity: self.limits.queue_capacity.unwrap_or(d.queue_capacity),
            max_in_flight: self.limits.max_in_flight.unwrap_or(d.max_in_flight),
        }
    }
}

/// Checks the agent link settings as the daemon starts: one sentence per bad key, instead of
/// a panic (a zero interval) or a spin (a zero backoff) later. Keys are named as in the
/// `[timeouts]` and `[limits]` tables; the flags of the same names set the same keys.
pub fn validate_agent_config(a: &AgentConfig) -> Result<(), ConfigError> {
    let mut bad = Vec::new();
    let ms = |d: Duration| d.as_millis();
    let positive = [
        (
            "ping_interval_ms",
            a.ping_interval,
            "the link would ping without pause",
        ),
        (
            "liveness_window_ms",
            a.liveness_window,
            "no agent would ever count as connected",
        ),
        (
            "idle_reconnect_ms",
            a.idle_reconnect,
            "every connection would end at once",
        ),
        (
            "handshake_timeout_ms",
            a.handshake_timeout,
            "no agent could ever be waited for",
        ),
        (
            "write_deadline_ms",
            a.write_deadline,
            "no frame could ever be written",
        ),
        (
            "ack_timeout_ms",
            a.ack_timeout,
            "every command would fail before it is written",
        ),
        (
            "default_timeout_ms",
            a.default_timeout,
            "every command would time out at once",
        ),
        (
            "backoff_initial_ms",
            a.backoff_initial,
            "reconnects would spin",
        ),
        ("backoff_max_ms", a.backoff_max, "reconnects would spin"),
    ];
    for (key, v, why) in positive {
        if v.is_zero() {
            bad.push(format!(
                "timeouts.{key} is 0; it must be at least 1 ({why})."
            ));
        }
    }
    if !a.ping_interval.is_zero() && a.liveness_window <= a.ping_interval {
        bad.push(format!(
            "timeouts.liveness_window_ms ({}) must be longer than ping_interval_ms ({}), or an idle link reads stale between two pings.",
            ms(a.liveness_window),
            ms(a.ping_interval)
        ));
    }
    if !a.idle_reconnect.is_zero() && a.idle_reconnect < a.liveness_window {
        bad.push(format!(
            "timeouts.idle_reconnect_ms ({}) must not be shorter than liveness_window_ms ({}), or a link is torn down before it could read stale.",
            ms(a.idle_reconnect),
            ms(a.liveness_window)
        ));
    }
    if !a.backoff_max.is_zero() && a.backoff_max < a.backoff_initial {
        bad.push(format!(
            "timeouts.backoff_max_ms ({}) must not be shorter than backoff_initial_ms ({}).",
            ms(a.backoff_max),
            ms(a.backoff_initial)
        ));
    }
    if a.queue_capacity == 0 {
        bad.push("limits.queue_capacity is 0; it must be at least 1.".to_string());
    }
    if a.max_in_flight == 0 {
        bad.push("limits.max_in_flight is 0; it must be at least 1.".to_string());
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(bad))
    }
}

/// Parses `VMID=PATH`.
pub fn parse_vm_socket(arg: &str) -> Result<(String, PathBuf), ConfigError> {
    match arg.split_once('=') {
        Some((id, path)) if !id.is_empty() && !path.is_empty() => {
            Ok((id.to_string(), PathBuf::from(path)))
        }
        _ => Err(ConfigError::VmSocket(arg.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn file_keys_reach_the_agent_config() {
        let cfg = NodeConfig::parse(
            "listen = \"0.0.0.0:1\"\n[vm_sockets]\na = \"/x\"\n[timeouts]\nack_timeout_ms = 250\n[limits]\nqueue_capacity = 3\n",
        )
        .unwrap();
        let a = cfg.agent_config();
        assert_eq!(a.ack_timeout, Duration::from_millis(250));
        assert_eq!(a.queue_capacity, 3);
        assert_eq!(cfg.vm_sockets["a"], PathBuf::from("/x"));
    }

    #[test]
    fn defaults_are_valid_and_bad_keys_each_get_a_sentence() {
        assert!(validate_agent_config(&AgentConfig::default()).is_ok());
        let cfg = NodeConfig::parse(
            "[timeouts]\nping_interval_ms = 0\nbackoff_initial_ms = 0\nliveness_window_ms = 1000\nidle_reconnect_ms = 500\nbackoff_max_ms = 50\n",
        )
        .unwrap();
        let Err(ConfigError::Invalid(bad)) = validate_agent_config(&cfg.agent_config()) else {
            panic!("accepted");
        };
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].starts_with("timeouts.ping_interval_ms is 0"));
        assert!(bad[1].starts_with("timeouts.backoff_initial_ms is 0"));
        assert!(bad[2].starts_with("timeouts.idle_reconnect_ms (500)"));
    }

    #[test]
    fn unknown_key_is_refused() {
        assert!(NodeConfig::parse("listn = \"x\"").is_err());
    }

    #[test]
    fn vm_socket_needs_both_halves() {
        assert!(parse_vm_socket("vm1=/a/b").is_ok());
        assert!(parse_vm_socket("vm1").is_err());
        assert!(parse_vm_socket("=/a").is_err());
    }
}
