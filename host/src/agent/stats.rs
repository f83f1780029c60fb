//! Per-VM link counters: frames and bytes by payload kind, commands by stage.

use super::table::StageCounts;
use crate::pb;
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
    /// Messages over the field limits (`super::limits`); each ended its connection.
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

    /// The counters as a message; identity and state fields are filled by the link.
    pub fn to_pb(&self, c: StageCounts, last_error: &str) -> pb::AgentConnectionStats {
        let counts = |m: &BTreeMap<&'static str, (u64, u64)>| {
            m.iter()
                .map(|(k, (frames, bytes))| pb::FrameCount {
                    kind: (*k).to_string(),
                    frames: *frames,
                    bytes: *bytes,
                })
                .collect()
        };
        pb::AgentConnectionStats {
            last_rx_unix_ms: self.last_rx_unix_ms,
            last_tx_unix_ms: self.last_tx_unix_ms,
            reconnects: self.reconnects,
            agent_restarts: self.agent_restarts,
            rx: counts(&self.rx),
            tx: counts(&self.tx),
            commands: Some(pb::CommandStageCounts {
                queued: c.queued,
                written: c.written,
                acknowledged: c.acknowledged,
                completed: c.completed,
                failed_not_written: c.failed_not_written,
                failed_not_acknowledged: c.failed_not_acknowledged,
                failed_ack_timeout: c.failed_ack_timeout,
                failed_connection_lost: c.failed_connection_lost,
                failed_agent_error: c.failed_agent_error,
                redelivered: c.redelivered,
            }),
            garbage_bytes: self.garbage_bytes,
            bad_frames: self.bad_frames,
            protocol_errors: self.protocol_errors,
            last_error: last_error.to_string(),
            ..Default::default()
        }
    }
}
