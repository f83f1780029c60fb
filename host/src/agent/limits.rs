//! Field limits on every message the agent sends, checked before it is cached or handed to a
//! caller (docs/security.md, "The per-VM budget").
//!
//! The frame cap bounds the wire size of a message, not what it decodes to: two bytes
//! (`0a 00`) decode to a whole empty list entry, so a 64 KiB frame can hold 32,000 of them.
//! These limits bound the decoded structure. They sit above what an honest agent sends (its
//! pages are 1,024 entries, its paths `PATH_MAX`), so a violation is a protocol error.

use qx_proto::agent::envelope::Payload;
use qx_proto::agent::Envelope;
use std::fmt;

/// Hostname, versions, OS and kernel names, interface names and the like.
pub const IDENTITY_STRING_BYTES: usize = 256;
/// Any other string: paths, messages, log lines.
pub const STRING_BYTES: usize = 4096;
/// One SSH public key (the agent's own limit).
pub const SSH_KEY_BYTES: usize = 16 * 1024;
/// Entries of any list.
pub const LIST_ENTRIES: usize = 1024;

/// A field over its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: &'static str,
    pub got: usize,
    pub limit: usize,
    pub unit: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} has {} {}, more than the limit of {}",
            self.field, self.got, self.unit, self.limit
        )
    }
}

type Checked = Result<(), Violation>;

fn s(field: &'static str, v: &str, limit: usize) -> Checked {
    if v.len() > limit {
        return Err(Violation {
            field,
            got: v.len(),
            limit,
            unit: "bytes",
        });
    }
    Ok(())
}

fn n<T>(field: &'static str, v: &[T], limit: usize) -> Checked {
    if v.len() > limit {
        return Err(Violation {
            field,
            got: v.len(),
            limit,
            unit: "entries",
        });
    }
    Ok(())
}

fn strings(field: &'static str, v: &[String], each: usize) -> Checked {
    n(field, v, LIST_ENTRIES)?;
    v.iter().try_for_each(|x| s(field, x, each))
}

fn filesystems(field: &'static str, v: &[qx_proto::agent::FilesystemUsage]) -> Checked {
    n(field, v, LIST_ENTRIES)?;
    for f in v {
        s(field, &f.mountpoint, STRING_BYTES)?;
        s(field, &f.device, STRING_BYTES)?;
        s(field, &f.fstype, IDENTITY_STRING_BYTES)?;
    }
    Ok(())
}

fn counters(field: &'static str, c: &qx_proto::agent::NetCounters) -> Checked {
    s(field, &c.interface, IDENTITY_STRING_BYTES)
}

/// Checks every string and list of `env` against its limit.
pub fn check(env: &Envelope) -> Checked {
    const ID: usize = IDENTITY_STRING_BYTES;
    const STR: usize = STRING_BYTES;
    let Some(p) = &env.payload else {
        return Ok(());
    };
    match p {
        Payload::AgentReady(r) => {
            s("agent_ready.agent_version", &r.agent_version, ID)?;
            s("agent_ready.os_id", &r.os_id, ID)?;
            s("agent_ready.os_name", &r.os_name, ID)?;
            s("agent_ready.os_version", &r.os_version, ID)?;
            s("agent_ready.os_pretty_name", &r.os_pretty_name, ID)?;
            s("agent_ready.kernel_release", &r.kernel_release, ID)?;
            s("agent_ready.kernel_version", &r.kernel_version, ID)?;
            s("agent_ready.arch", &r.arch, ID)?;
            s("agent_ready.hostname", &r.hostname, ID)?;
            strings("agent_ready.ip_addresses", &r.ip_addresses, ID)?;
            strings("agent_ready.capabilities", &r.capabilities, ID)
        }
        Payload::Error(e) => s("error.message", &e.message, STR),
        Payload::Telemetry(t) => {
            s("telemetry.hostname", &t.hostname, ID)?;
            filesystems("telemetry.filesystems", &t.filesystems)?;
            n("telemetry.network", &t.network, LIST_ENTRIES)?;
            t.network
                .iter()
                .try_for_each(|c| counters("telemetry.network", c))
        }
        Payload::FileList(l) => {
            n("file_list.entries", &l.entries, LIST_ENTRIES)?;
            s("file_list.next_page_token", &l.next_page_token, STR)?;
            for e in &l.entries {
                s("file_list.entries", &e.path, STR)?;
                s("file_list.entries", &e.name, STR)?;
                s("file_list.entries", &e.symlink_target, STR)?;
            }
            Ok(())
        }
        Payload::FileStat(e) => {
            s("file_stat.path", &e.path, STR)?;
            s("file_stat.name", &e.name, STR)?;
            s("file_stat.symlink_target", &e.symlink_target, STR)
        }
        Payload::FsFreezeReply(r) => strings("fs_freeze_reply.frozen", &r.frozen, STR),
        Payload::FsThawReply(r) => strings("fs_thaw_reply.thawed", &r.thawed, STR),
        Payload::FsFreezeStatus(r) => strings("fs_freeze_status.frozen", &r.frozen, STR),
        Payload::FsTrimReply(r) => {
            n("fs_trim_reply.results", &r.results, LIST_ENTRIES)?;
            for x in &r.results {
                s("fs_trim_reply.results", &x.mountpoint, STR)?;
                s("fs_trim_reply.results", &x.error, STR)?;
            }
            Ok(())
        }
        Payload::PowerReply(r) => s("power_reply.method", &r.method, ID),
        Payload::UserList(u) => {
            n("user_list.users", &u.users, LIST_ENTRIES)?;
            for x in &u.users {
                s("user_list.users", &x.user, ID)?;
                s("user_list.users", &x.tty, ID)?;
                s("user_list.users", &x.host, ID)?;
            }
            Ok(())
        }
        Payload::SshKeys(k) => strings("ssh_keys.keys", &k.keys, SSH_KEY_BYTES),
        Payload::NetworkInfo(ni) => {
            n("network_info.interfaces", &ni.interfaces, LIST_ENTRIES)?;
            for i in &ni.interfaces {
                s("network_info.interfaces", &i.name, ID)?;
                s("network_info.interfaces", &i.mac, ID)?;
                n("network_info.addresses", &i.addresses, LIST_ENTRIES)?;
                for a in &i.addresses {
                    s("network_info.addresses", &a.address, ID)?;
                }
                if let Some(c) = &i.counters {
                    counters("network_info.interfaces", c)?;
                }
            }
            Ok(())
        }
        Payload::DisksInfo(d) => {
            filesystems("disks_info.filesystems", &d.filesystems)?;
            n("disks_info.devices", &d.devices, LIST_ENTRIES)?;
            for b in &d.devices {
                s("disks_info.devices", &b.name, ID)?;
                s("disks_info.devices", &b.model, ID)?;
                s("disks_info.devices", &b.serial, ID)?;
            }
            Ok(())
        }
        Payload::AgentLogs(l) => {
            n("agent_logs.lines", &l.lines, LIST_ENTRIES)?;
            l.lines
                .iter()
                .try_for_each(|x| s("agent_logs.lines", &x.message, STR))
        }
        // The rest carry numbers and bytes only (bounded by the frame), or are requests the
        // agent has no business sending: those are dropped as stale or unexpected replies.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use qx_proto::agent::{AgentReady, FilesystemUsage, Telemetry};

    fn env(p: Payload) -> Envelope {
        Envelope {
            id: 1,
            correlation_id: 0,
            payload: Some(p),
        }
    }

    #[test]
    fn honest_sizes_pass() {
        let t = Telemetry {
            hostname: "web-1".into(),
            filesystems: vec![FilesystemUsage::default(); 64],
            ..Default::default()
        };
        assert_eq!(check(&env(Payload::Telemetry(t))), Ok(()));
    }

    #[test]
    fn a_giant_list_of_empty_entries_is_refused() {
        let t = Telemetry {
            filesystems: vec![FilesystemUsage::default(); LIST_ENTRIES + 1],
            ..Default::default()
        };
        let v = check(&env(Payload::Telemetry(t))).unwrap_err();
        assert_eq!(v.field, "telemetry.filesystems");
        assert_eq!(v.got, LIST_ENTRIES + 1);
    }

    #[test]
    fn a_long_identity_string_is_refused() {
        let r = AgentReady {
            agent_version: "v".repeat(IDENTITY_STRING_BYTES + 1),
            ..Default::default()
        };
        let v = check(&env(Payload::AgentReady(r))).unwrap_err();
        assert_eq!(
            v.to_string(),
            "agent_ready.agent_version has 257 bytes, more than the limit of 256"
        );
    }
}
