//! `/etc/qemu/qemu-ga.conf`: the `[general]` keys of qemu-ga that apply to this agent.
//!
//! The file is GLib key-file syntax (`[group]`, `key=value`, `#` comments). `path`,
//! `block-rpcs`, `allow-rpcs` and `fsfreeze-hook` are taken; lists are separated by `,` (or
//! `;`, GLib's list separator). They fill in only what the agent's own configuration left
//! at its default, so `agent.conf` and the command line win.

use std::path::PathBuf;

use crate::config::{Config, DEFAULT_QGA_DEVICE};

/// Keys qemu-ga has that this agent does not use; accepted without a warning.
const IGNORED: &[&str] = &[
    "method",
    "daemon",
    "pidfile",
    "logfile",
    "verbose",
    "statedir",
    "retry-path",
];

fn rpc_list(v: &str) -> Vec<String> {
    v.split([',', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Applies the `[general]` keys of qemu-ga.conf `text` to `cfg`.
pub fn apply(cfg: &mut Config, text: &str) {
    let mut general = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(group) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            general = group.trim() == "general";
            continue;
        }
        if !general {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            log::warn!("qemu-ga.conf: ignoring {line:?}");
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "path" => {
                if cfg.qga_device.as_deref() == Some(std::path::Path::new(DEFAULT_QGA_DEVICE)) {
                    cfg.qga_device = Some(PathBuf::from(value));
                }
            }
            "block-rpcs" if cfg.qga_block_rpcs.is_empty() => cfg.qga_block_rpcs = rpc_list(value),
            "allow-rpcs" if cfg.qga_allow_rpcs.is_empty() => cfg.qga_allow_rpcs = rpc_list(value),
            "fsfreeze-hook" if cfg.qga_fsfreeze_hook.is_none() => {
                // qemu-ga's `fsfreeze-hook` with no value means its built-in default path.
                cfg.qga_fsfreeze_hook = Some(PathBuf::from(if value.is_empty() {
                    "/etc/qemu/fsfreeze-hook"
                } else {
                    value
                }))
            }
            "block-rpcs" | "allow-rpcs" | "fsfreeze-hook" => {}
            k if IGNORED.contains(&k) => log::debug!("qemu-ga.conf: {k} does not apply"),
            k => log::warn!("qemu-ga.conf: unknown key {k:?} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn general_keys_fill_in_defaults_only() {
        let mut cfg = Config {
            qga_allow_rpcs: vec!["guest-ping".into()],
            ..Config::default()
        };
        apply(
            &mut cfg,
            "# qemu-ga\n[general]\nmethod=virtio-serial\npath=/dev/vport1p1\n\
             block-rpcs=guest-exec,guest-file-open;guest-shutdown\nallow-rpcs=guest-info\n\
             fsfreeze-hook=\n[other]\nblock-rpcs=guest-ping\n",
        );
        assert_eq!(cfg.qga_device, Some(PathBuf::from("/dev/vport1p1")));
        assert_eq!(
            cfg.qga_block_rpcs,
            vec!["guest-exec", "guest-file-open", "guest-shutdown"]
        );
        assert_eq!(cfg.qga_allow_rpcs, vec!["guest-ping"]);
        assert_eq!(
            cfg.qga_fsfreeze_hook,
            Some(PathBuf::from("/etc/qemu/fsfreeze-hook"))
        );
    }
}
