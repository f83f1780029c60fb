//! Per-VM link counters: frames and bytes by payload kind, commands by stage.

use super::table::StageCounts;
use std::collections::BTreeMap;

/// Counters of one VM's link, across its connections.
#[derive(Debug, Default, Clone)]
pub struct LinkStats {
    pub connection_id: u64,
    pub reconnects: u64,
    pub agent_restarts: u64,
    pub last_rx_unix_ms: i64,
    pub last_tx_unix_ms: i64,
    /// payload kind -> (frames, bytes)
    pub rx: BTreeMap<&'static str, (u64, u64)>,
    pub tx: BTreeMap<&'static str, (u64, u64)>,
    pub garbage_bytes: u64,
    pub bad_frames: u64,
    /// Connections the agent ended in a protocol error: a message over the field limits
    /// (`super::limits`), or more damaged payloads than an honest agent sends.
    pub protocol_errors: u64,
}

impl LinkStats {
    pub fn count_rx(&mut self, kind: &'static str, bytes: usize) {
        let e = self.rx.entry(kind).or_default();
        e.0 += 1;
        e.1 += bytes as u64;
    }

    pub fn count_tx(&mut self, kind: &'static str, bytes: usize) {
        let e = self.tx.entry(kind).or_default();
        e.0 += 1;
        e.1 += bytes as u64;
    }
}

/// One VM's link as [`super::link::Link::stats`] sees it at one moment.
#[derive(Debug, Clone)]
pub struct LinkSnapshot {
    pub vm_id: String,
    pub socket_path: String,
    pub connection_id: u64,
    /// "connecting", "handshaking", "connected", "stale", "disconnected".
    pub state: &'static str,
    pub connected: bool,
    pub agent_session_id: u64,
    pub in_flight: usize,
    pub counters: LinkStats,
    pub commands: StageCounts,
    pub last_error: String,
    /// The supervisor's last wait before reconnecting, before jitter (zero before the
    /// first): it doubles after every connection that failed, ended early or ended in a
    /// protocol error, up to `backoff_max`.
    pub reconnect_backoff: std::time::Duration,
}
