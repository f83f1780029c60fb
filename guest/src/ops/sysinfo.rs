//! Who the guest is: os-release, uname(2), hostname. No child processes.

use std::path::Path;

use crate::sys;

/// The guest's identity, as AgentReady carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub os_id: String,
    pub os_name: String,
    pub os_version: String,
    pub os_pretty_name: String,
    pub kernel_release: String,
    pub kernel_version: String,
    pub arch: String,
    pub hostname: String,
}

/// The largest os-release file read.
const MAX_OS_RELEASE_BYTES: u64 = 64 * 1024;

/// Value of `key` in os-release text (shell-style assignments; quotes and backslash escapes
/// removed as os-release(5) describes).
pub fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().rev().find_map(|line| {
        let (k, v) = line.trim().split_once('=')?;
        if k.trim() != key {
            return None;
        }
        Some(unquote(v.trim()))
    })
}

fn unquote(v: &str) -> String {
    let bytes = v.as_bytes();
    let quoted = bytes.len() >= 2
        && (bytes[0] == b'"' || bytes[0] == b'\'')
        && bytes[bytes.len() - 1] == bytes[0];
    let inner = if quoted { &v[1..v.len() - 1] } else { v };
    if quoted && bytes[0] == b'\'' {
        return inner.to_string();
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_OS_RELEASE_BYTES)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// Identity from the first readable os-release of `os_release_paths` plus uname(2).
pub fn identity_from(os_release_paths: &[&Path]) -> Identity {
    let text = os_release_paths
        .iter()
        .find_map(|p| read_small(p))
        .unwrap_or_default();
    let get = |k: &str| os_release_value(&text, k).unwrap_or_default();
    let uts = sys::uname().unwrap_or_default();
    Identity {
        os_id: get("ID"),
        os_name: get("NAME"),
        os_version: get("VERSION_ID"),
        os_pretty_name: get("PRETTY_NAME"),
        kernel_release: uts.release,
        kernel_version: uts.version,
        arch: uts.machine,
        hostname: uts.nodename,
    }
}

/// Reads the identity of the running system (/etc/os-release, else /usr/lib/os-release).
/// Missing sources leave fields empty.
pub fn identity() -> Identity {
    identity_from(&[
        Path::new("/etc/os-release"),
        Path::new("/usr/lib/os-release"),
    ])
}

/// The current hostname (uname nodename; empty if uname fails).
pub fn hostname() -> String {
    sys::uname().map(|u| u.nodename).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::ops::testutil::TempDir;

    #[test]
    fn os_release_values_are_unquoted_and_the_last_assignment_wins() {
        let text = "NAME=\"Alpine \\\"Linux\\\"\"\nID=alpine\n# comment\nVERSION_ID='3.20.1'\n\
                    PRETTY_NAME=\"Alpine Linux v3.20\"\nID=alpine2\nBROKEN\n";
        assert_eq!(os_release_value(text, "NAME").unwrap(), "Alpine \"Linux\"");
        assert_eq!(os_release_value(text, "ID").unwrap(), "alpine2");
        assert_eq!(os_release_value(text, "VERSION_ID").unwrap(), "3.20.1");
        assert_eq!(
            os_release_value(text, "PRETTY_NAME").unwrap(),
            "Alpine Linux v3.20"
        );
        assert_eq!(os_release_value(text, "MISSING"), None);
    }

    #[test]
    fn identity_falls_back_to_the_second_os_release_and_matches_uname_and_proc() {
        let t = TempDir::new("sysinfo");
        std::fs::write(t.join("os-release"), "ID=qx\nNAME=Quantix\nVERSION_ID=1\n").unwrap();
        let missing = t.join("missing");
        let second = t.join("os-release");
        let id = identity_from(&[&missing, &second]);
        assert_eq!(
            (
                id.os_id.as_str(),
                id.os_name.as_str(),
                id.os_version.as_str()
            ),
            ("qx", "Quantix", "1")
        );
        let proc = |f: &str| {
            std::fs::read_to_string(format!("/proc/sys/kernel/{f}"))
                .unwrap()
                .trim_end()
                .to_string()
        };
        assert_eq!(id.kernel_release, proc("osrelease"));
        assert_eq!(id.kernel_version, proc("version"));
        assert_eq!(id.hostname, proc("hostname"));
        assert_eq!(hostname(), proc("hostname"));
        assert_eq!(id.arch, std::env::consts::ARCH);
    }

    #[test]
    fn identity_reads_the_system_os_release() {
        let id = identity();
        let text = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .unwrap();
        assert!(!id.os_id.is_empty());
        assert!(text.contains(&format!("ID={}", id.os_id)));
    }
}
