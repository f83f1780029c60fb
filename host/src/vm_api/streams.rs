//! The event and metrics streams, and the two tasks that feed the event ring: the lifecycle
//! watcher (which also binds and unbinds agent sockets) and the agent-event forwarder.

use super::{apply_agent_actions, VmApi, VmError, VmResult};
use crate::agent_api::AgentApi;
use crate::hypervisor::events::{EventHub, Watcher, WATCH_INTERVAL_MS};
use crate::hypervisor::Hypervisor;
use crate::pb;
use crate::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

impl VmApi {
    pub async fn stream_events(
        &self,
        request: pb::StreamEventsRequest,
    ) -> VmResult<BoxStream<pb::NodeEvent, VmError>> {
        let filter = if request.vm_id.is_empty() {
            None
        } else {
            // A deleted VM's events may still be asked for: fall back to the id as given.
            Some(
                self.resolve(&request.vm_id)
                    .await
                    .unwrap_or_else(|_| request.vm_id.clone()),
            )
        };
        let (backlog, mut rx) = self.hub.subscribe(request.after_seq);
        let hub = self.hub.clone();
        let (tx, out) = mpsc::channel(256);
        tokio::spawn(async move {
            let wanted = |e: &pb::NodeEvent| filter.as_ref().is_none_or(|f| &e.vm_id == f);
            let mut last = request.after_seq;
            for e in backlog {
                last = e.seq;
                if wanted(&e) && tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                let batch = match rx.recv().await {
                    Ok(e) => vec![e],
                    // Fell behind the broadcast: catch up from the ring.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => hub.since(last),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                for e in batch {
                    if e.seq <= last {
                        continue;
                    }
                    last = e.seq;
                    if wanted(&e) && tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(out)))
    }

    pub async fn stream_metrics(
        &self,
        request: pb::StreamMetricsRequest,
    ) -> VmResult<BoxStream<pb::VmMetrics, VmError>> {
        let only = if request.vm_id.is_empty() {
            None
        } else {
            Some(self.resolve(&request.vm_id).await?)
        };
        let metrics = self.metrics.subscribe(only, request.interval_ms);
        Ok(Box::pin(metrics.map(|m| m.map_err(|never| match never {}))))
    }
}

/// The lifecycle watcher: diffs domain states every [`WATCH_INTERVAL_MS`] until the
/// [`VmApi`] that owns the watcher is dropped.
pub(super) async fn watch_lifecycle(
    watcher: std::sync::Weak<Watcher>,
    hv: Arc<dyn Hypervisor>,
    hub: Arc<EventHub>,
    agent: Arc<AgentApi>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(WATCH_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(w) = watcher.upgrade() else { return };
        let (hv2, hub2) = (hv.clone(), hub.clone());
        match tokio::task::spawn_blocking(move || w.sync(hv2.as_ref(), &hub2)).await {
            Ok(actions) => apply_agent_actions(&agent, actions),
            // A panicking libvirt call must not end the watching.
            Err(e) => log::error!("lifecycle watcher: {e}"),
        }
    }
}

/// Publishes agent connection changes into the node event ring.
pub(super) async fn forward_agent_events(
    mut rx: tokio::sync::broadcast::Receiver<crate::agent_api::AgentEvent>,
    hub: Arc<EventHub>,
) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                hub.emit(&ev.vm_id, ev.kind.into(), ev.detail);
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                log::warn!("missed {n} agent events");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
