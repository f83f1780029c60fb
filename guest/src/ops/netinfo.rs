//! Network interfaces: getifaddrs(3) for flags and addresses, /sys/class/net for MAC, MTU and
//! counters, /proc/net/dev for telemetry counters.

use std::path::Path;

use qx_proto::agent::{IpAddress, NetCounters, NetInterface, NetworkInfo};

use super::{OpError, OpResult};
use crate::sys::{self, IfAddress};

fn sys_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn sys_counters(name: &str) -> NetCounters {
    let base = Path::new("/sys/class/net").join(name).join("statistics");
    let get = |f: &str| sys_u64(&base.join(f));
    NetCounters {
        interface: name.to_string(),
        rx_bytes: get("rx_bytes"),
        tx_bytes: get("tx_bytes"),
        rx_packets: get("rx_packets"),
        tx_packets: get("tx_packets"),
        rx_errors: get("rx_errors"),
        tx_errors: get("tx_errors"),
        rx_dropped: get("rx_dropped"),
        tx_dropped: get("tx_dropped"),
    }
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Every interface (sorted by name) with its MAC, MTU, flags, addresses and counters.
pub fn interfaces() -> OpResult<NetworkInfo> {
    let addrs = sys::getifaddrs().map_err(|e| OpError::io("getifaddrs", &e))?;
    let mut by_name: Vec<NetInterface> = Vec::new();
    for a in addrs {
        let at = match by_name.iter().position(|i| i.name == a.name) {
            Some(at) => at,
            None => {
                by_name.push(NetInterface {
                    name: a.name.clone(),
                    ..Default::default()
                });
                by_name.len() - 1
            }
        };
        let iface = &mut by_name[at];
        let flags = a.flags as libc::c_int;
        iface.up |= flags & libc::IFF_UP != 0;
        iface.running |= flags & libc::IFF_RUNNING != 0;
        iface.loopback |= flags & libc::IFF_LOOPBACK != 0;
        match a.address {
            IfAddress::V4 { addr, prefix } => iface.addresses.push(IpAddress {
                address: addr.to_string(),
                prefix,
                ipv6: false,
            }),
            IfAddress::V6 { addr, prefix } => iface.addresses.push(IpAddress {
                address: addr.to_string(),
                prefix,
                ipv6: true,
            }),
            IfAddress::Link { mac } => iface.mac = format_mac(&mac),
            IfAddress::Other => {}
        }
    }
    by_name.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    for iface in &mut by_name {
        let dir = Path::new("/sys/class/net").join(&iface.name);
        iface.mtu = sys_u64(&dir.join("mtu")) as u32;
        if iface.mac.is_empty() {
            iface.mac = std::fs::read_to_string(dir.join("address"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
        }
        iface.counters = Some(sys_counters(&iface.name));
    }
    Ok(NetworkInfo {
        interfaces: by_name,
    })
}

/// Non-loopback IPv4 and IPv6 addresses (IPv6 link-local excluded), for AgentReady.
pub fn ip_addresses() -> Vec<String> {
    let Ok(addrs) = sys::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .into_iter()
        .filter(|a| (a.flags as libc::c_int) & libc::IFF_LOOPBACK == 0)
        .filter_map(|a| match a.address {
            IfAddress::V4 { addr, .. } if !addr.is_loopback() => Some(addr.to_string()),
            IfAddress::V6 { addr, .. }
                if !addr.is_loopback() && (addr.segments()[0] & 0xffc0) != 0xfe80 =>
            {
                Some(addr.to_string())
            }
            _ => None,
        })
        .collect()
}

/// Counters of /proc/net/dev text.
pub fn parse_proc_net_dev(text: &str) -> Vec<NetCounters> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            if v.len() < 16 {
                return None;
            }
            Some(NetCounters {
                interface: name.trim().to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            })
        })
        .collect()
}

/// Per-interface counters from /proc/net/dev, for telemetry (empty when unreadable).
pub fn counters() -> Vec<NetCounters> {
    std::fs::read_to_string("/proc/net/dev")
        .map(|t| parse_proc_net_dev(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn loopback_is_listed_up_with_127_0_0_1_and_not_offered_as_an_address() {
        let info = interfaces().unwrap();
        let lo = info.interfaces.iter().find(|i| i.name == "lo").unwrap();
        assert!(lo.up && lo.loopback);
        assert!(lo
            .addresses
            .iter()
            .any(|a| a.address == "127.0.0.1" && a.prefix == 8 && !a.ipv6));
        assert!(lo.mtu > 0);
        assert_eq!(lo.counters.as_ref().unwrap().interface, "lo");
        let addrs = ip_addresses();
        assert!(!addrs.iter().any(|a| a == "127.0.0.1" || a == "::1"));
        // Every offered address belongs to some non-loopback interface.
        for a in &addrs {
            assert!(info
                .interfaces
                .iter()
                .filter(|i| !i.loopback)
                .any(|i| i.addresses.iter().any(|x| &x.address == a)));
        }
    }

    #[test]
    fn interfaces_match_sysfs_names_macs_and_mtus() {
        let info = interfaces().unwrap();
        for iface in &info.interfaces {
            let dir = Path::new("/sys/class/net").join(&iface.name);
            if !dir.exists() {
                continue;
            }
            let mtu: u32 = std::fs::read_to_string(dir.join("mtu"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(iface.mtu, mtu, "{}", iface.name);
            let addr = std::fs::read_to_string(dir.join("address")).unwrap();
            assert_eq!(iface.mac, addr.trim(), "{}", iface.name);
        }
    }

    #[test]
    fn proc_net_dev_counters_parse_and_the_real_file_has_lo() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets ...\n  eth0: 100 2 3 4 0 0 0 0 200 5 6 7 0 0 0 0\nbad line\n";
        let c = parse_proc_net_dev(text);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (
                c[0].rx_bytes,
                c[0].rx_packets,
                c[0].rx_errors,
                c[0].rx_dropped
            ),
            (100, 2, 3, 4)
        );
        assert_eq!(
            (
                c[0].tx_bytes,
                c[0].tx_packets,
                c[0].tx_errors,
                c[0].tx_dropped
            ),
            (200, 5, 6, 7)
        );
        assert!(counters().iter().any(|c| c.interface == "lo"));
    }
}
