//! Node events: a ring of sequenced [`pb::NodeEvent`]s behind `StreamEvents`, and the
//! lifecycle watcher that produces domain events.
//!
//! The `virt` crate 0.5 exposes no domain event callbacks (only the raw `virt-sys`
//! bindings, which would need `unsafe` and a C callback trampoline), so lifecycle events come
//! from diffing domain states: a background task polls every [`WATCH_INTERVAL_MS`], and every
//! VM operation runs the same diff right after it acts, so its events are in the ring before
//! its RPC returns. One mutex serialises diffs: each reads the current truth inside the lock
//! and compares it with the last state it published, so no stale read can publish a
//! transition backwards and no transition is published twice. State changes that come and go
//! between two polls (a reboot) are invisible to a diff; the daemon's own reboot publishes
//! VM_REBOOTED explicitly.

use super::{Hypervisor, PowerState};
use crate::pb;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// How many events the ring keeps for resuming clients.
pub const EVENT_RING_CAPACITY: usize = 4096;
/// Events of one VM the full ring keeps before that VM's own oldest ones go first: a guest that
/// makes its VM flap evicts its own events, not another VM's.
pub const EVENT_RING_PER_VM: usize = 256;
/// Interval of the lifecycle poll.
pub const WATCH_INTERVAL_MS: u64 = 500;

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug)]
struct Ring {
    next_seq: u64,
    events: VecDeque<pb::NodeEvent>,
    /// Events in the ring per VM id.
    per_vm: HashMap<String, usize>,
}

impl Ring {
    /// Drops one event to make room: the oldest of `vm` if it holds more than its share, else
    /// the oldest of the VM holding the most if that is over its share, else the oldest.
    fn evict(&mut self, vm: &str) {
        let held = |id: &str| self.per_vm.get(id).copied().unwrap_or(0);
        let victim = if held(vm) > EVENT_RING_PER_VM {
            Some(vm.to_string())
        } else {
            self.per_vm
                .iter()
                .max_by_key(|(_, n)| **n)
                .filter(|(_, n)| **n > EVENT_RING_PER_VM)
                .map(|(id, _)| id.clone())
        };
        let at = victim
            .and_then(|v| self.events.iter().position(|e| e.vm_id == v))
            .unwrap_or(0);
        if let Some(e) = self.events.remove(at) {
            if let Some(n) = self.per_vm.get_mut(&e.vm_id) {
                *n -= 1;
                if *n == 0 {
                    self.per_vm.remove(&e.vm_id);
                }
            }
        }
    }
}

/// Sequenced events: a ring for replay and a broadcast for live subscribers.
#[derive(Debug)]
pub struct EventHub {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<pb::NodeEvent>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub::new()
    }
}

impl EventHub {
    pub fn new() -> Self {
        EventHub {
            ring: Mutex::new(Ring {
                next_seq: 1,
                events: VecDeque::new(),
                per_vm: HashMap::new(),
            }),
            tx: broadcast::channel(1024).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding this lock cannot leave the ring inconsistent (pushes and
        // pops are single calls), so a poisoned lock is still usable.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event with the next sequence number and wakes subscribers.
    pub fn emit(&self, vm_id: &str, kind: pb::EventKind, detail: impl Into<String>) -> u64 {
        let mut ring = self.lock();
        let seq = ring.next_seq;
        ring.next_seq += 1;
        let event = pb::NodeEvent {
            seq,
            unix_ms: now_unix_ms(),
            vm_id: vm_id.to_string(),
            kind: kind as i32,
            detail: detail.into(),
        };
        ring.events.push_back(event.clone());
        *ring.per_vm.entry(vm_id.to_string()).or_default() += 1;
        while ring.events.len() > EVENT_RING_CAPACITY {
            ring.evict(vm_id);
        }
        // Sent under the lock so broadcast order is sequence order. No receiver: fine.
        let _ = self.tx.send(event);
        seq
    }

    /// Events after `after_seq` still in the ring, and a receiver for what follows them;
    /// taken together under the lock, so nothing is missed or repeated.
    pub fn subscribe(
        &self,
        after_seq: u64,
    ) -> (Vec<pb::NodeEvent>, broadcast::Receiver<pb::NodeEvent>) {
        let ring = self.lock();
        let rx = self.tx.subscribe();
        let backlog = ring
            .events
            .iter()
            .filter(|e| e.seq > after_seq)
            .cloned()
            .collect();
        (backlog, rx)
    }

    /// Events after `after_seq` still in the ring.
    pub fn since(&self, after_seq: u64) -> Vec<pb::NodeEvent> {
        self.subscribe(after_seq).0
    }

    /// The sequence number of the newest event (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }
}

/// What the caller must do with the agent connection manager after a diff (done on the
/// async side: the manager spawns tasks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    /// The VM runs: bind its agent socket, read from its live XML.
    Attach(String, PathBuf),
    /// The VM stopped or vanished.
    Detach(String),
}

/// Diffs domain states against what it last published.
#[derive(Debug, Default)]
pub struct Watcher {
    known: Mutex<Option<BTreeMap<String, PowerState>>>,
}

fn transition_event(from: Option<PowerState>, to: PowerState) -> Option<pb::EventKind> {
    use PowerState::*;
    match (from, to) {
        (Some(a), b) if a == b => None,
        (_, Running) if from == Some(Paused) => Some(pb::EventKind::VmResumed),
        (_, Running) => Some(pb::EventKind::VmStarted),
        (_, Paused) => Some(pb::EventKind::VmPaused),
        (_, Crashed) => Some(pb::EventKind::VmCrashed),
        (Some(a), ShutOff) if a.is_active() => Some(pb::EventKind::VmStopped),
        _ => None,
    }
}

impl Watcher {
    /// Reads every domain's state, publishes the transitions since the last diff, and says
    /// which agent bindings to change. The first diff publishes nothing (it is the baseline)
    /// but binds the agents of running VMs. Blocking.
    pub fn sync(&self, hv: &dyn Hypervisor, hub: &EventHub) -> Vec<AgentAction> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        hv.reconnect_if_dead();
        let domains = match hv.list() {
            Ok(d) => d,
            Err(e) => {
                log::warn!("lifecycle watcher: cannot list domains: {e}");
                return Vec::new();
            }
        };
        let baseline = known.is_none();
        let prev = known.take().unwrap_or_default();
        let mut next = BTreeMap::new();
        let mut actions = Vec::new();
        for d in &domains {
            let before = prev.get(&d.uuid).copied();
            // A transient pause is not a state change: keep what was published (a domain
            // first seen starting up counts as shut off until it runs).
            let d = &super::DomainRef {
                state: if d.transient {
                    before.unwrap_or(PowerState::ShutOff)
                } else {
                    d.state
                },
                ..d.clone()
            };
            if !baseline {
                if before.is_none() {
                    hub.emit(&d.uuid, pb::EventKind::VmDefined, d.name.clone());
                }
                if let Some(kind) = transition_event(before, d.state) {
                    hub.emit(&d.uuid, kind, d.state.as_str());
                }
            }
            let was_active = before.is_some_and(|s| s.is_active());
            if d.state.is_active() && (baseline || !was_active) {
                match agent_socket(hv, &d.uuid) {
                    Some(path) => actions.push(AgentAction::Attach(d.uuid.clone(), path)),
                    None => log::info!("VM {} has no agent channel", d.uuid),
                }
            } else if !d.state.is_active() && was_active {
                actions.push(AgentAction::Detach(d.uuid.clone()));
            }
            next.insert(d.uuid.clone(), d.state);
        }
        for (uuid, state) in &prev {
            if !next.contains_key(uuid) {
                if state.is_active() {
                    hub.emit(uuid, pb::EventKind::VmStopped, "undefined while running");
                    actions.push(AgentAction::Detach(uuid.clone()));
                }
                hub.emit(uuid, pb::EventKind::VmUndefined, "");
            }
        }
        *known = Some(next);
        actions
    }
}

/// The agent socket as the running domain's live XML names it.
pub fn agent_socket(hv: &dyn Hypervisor, uuid: &str) -> Option<PathBuf> {
    let xml = hv.xml(uuid, false).ok()?;
    super::domain::DomainFacts::parse(&xml).ok()?.agent_socket
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::hypervisor::none::NoHypervisor;

    #[test]
    fn ring_keeps_sequence_and_replays_after_seq() {
        let hub = EventHub::new();
        for i in 0..5 {
            hub.emit("vm", pb::EventKind::VmStarted, format!("{i}"));
        }
        let (backlog, mut rx) = hub.subscribe(3);
        assert_eq!(backlog.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        hub.emit("vm", pb::EventKind::VmStopped, "");
        assert_eq!(rx.try_recv().unwrap().seq, 6);
        assert_eq!(hub.last_seq(), 6);
    }

    #[test]
    fn ring_drops_oldest_beyond_capacity() {
        let hub = EventHub::new();
        for _ in 0..EVENT_RING_CAPACITY + 10 {
            hub.emit("vm", pb::EventKind::VmStarted, "");
        }
        let all = hub.since(0);
        assert_eq!(all.len(), EVENT_RING_CAPACITY);
        assert_eq!(all[0].seq, 11);
    }

    #[test]
    fn a_full_ring_evicts_the_loudest_vms_events_first() {
        let hub = EventHub::new();
        hub.emit("quiet", pb::EventKind::VmStarted, "");
        for _ in 0..EVENT_RING_CAPACITY * 2 {
            hub.emit("loud", pb::EventKind::AgentRestarted, "");
        }
        hub.emit("quiet2", pb::EventKind::VmStopped, "");
        let all = hub.since(0);
        assert_eq!(all.len(), EVENT_RING_CAPACITY);
        assert_eq!(all[0].vm_id, "quiet");
        assert_eq!(all[0].seq, 1);
        assert_eq!(all.last().unwrap().vm_id, "quiet2");
    }

    /// The stub hypervisor with one domain in `state` (the watcher's layer has the real
    /// libvirt tests above it).
    fn set(hv: &NoHypervisor, state: PowerState, transient: bool) {
        hv.set_domains(vec![super::super::DomainRef {
            uuid: "u1".into(),
            name: "vm".into(),
            state,
            transient,
        }]);
    }

    fn kinds(hub: &EventHub) -> Vec<pb::EventKind> {
        hub.since(0)
            .iter()
            .map(|e| pb::EventKind::try_from(e.kind).unwrap())
            .collect()
    }

    #[test]
    fn watcher_sees_a_start_through_qemus_starting_up_pause_as_one_start() {
        let (hv, hub, w) = (
            NoHypervisor::new("test"),
            EventHub::new(),
            Watcher::default(),
        );
        set(&hv, PowerState::ShutOff, false);
        assert!(w.sync(&hv, &hub).is_empty(), "baseline: nothing to bind");
        assert!(kinds(&hub).is_empty(), "baseline publishes nothing");
        set(&hv, PowerState::Paused, true);
        w.sync(&hv, &hub);
        set(&hv, PowerState::Running, false);
        w.sync(&hv, &hub);
        set(&hv, PowerState::Paused, true); // an internal snapshot in progress
        w.sync(&hv, &hub);
        set(&hv, PowerState::Running, false);
        w.sync(&hv, &hub);
        set(&hv, PowerState::Paused, false); // a real pause
        w.sync(&hv, &hub);
        hv.set_domains(Vec::new());
        let actions = w.sync(&hv, &hub);
        assert_eq!(actions, [AgentAction::Detach("u1".into())]);
        use pb::EventKind::*;
        assert_eq!(kinds(&hub), [VmStarted, VmPaused, VmStopped, VmUndefined]);
    }

    #[test]
    fn transitions_map_to_events() {
        use PowerState::*;
        assert_eq!(transition_event(Some(Running), Running), None);
        assert_eq!(
            transition_event(Some(ShutOff), Running),
            Some(pb::EventKind::VmStarted)
        );
        assert_eq!(
            transition_event(Some(Paused), Running),
            Some(pb::EventKind::VmResumed)
        );
        assert_eq!(
            transition_event(Some(Running), ShutOff),
            Some(pb::EventKind::VmStopped)
        );
        assert_eq!(transition_event(None, ShutOff), None);
    }
}
