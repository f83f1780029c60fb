//! Network interfaces: getifaddrs(3) for flags and addresses, /sys/class/net for MAC, MTU and
//! counters.

use qx_proto::agent::{ErrorCode, NetCounters, NetworkInfo};

use super::{OpError, OpResult};

/// Every interface with its MAC, MTU, flags, addresses and counters.
pub fn interfaces() -> OpResult<NetworkInfo> {
    Err(OpError::new(
        ErrorCode::Unsupported,
        "network info is not implemented yet",
    ))
}

/// Non-loopback IPv4 and IPv6 addresses, for AgentReady.
pub fn ip_addresses() -> Vec<String> {
    Vec::new()
}

/// Per-interface counters from /proc/net/dev, for telemetry.
pub fn counters() -> Vec<NetCounters> {
    Vec::new()
}
