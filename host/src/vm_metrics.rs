//! StreamMetrics' one shared poller. However many clients subscribe, one task samples every
//! running VM through libvirt, at the shortest interval any subscriber asked for (never below
//! [`MIN_INTERVAL_MS`]), and publishes the batch on a `watch` channel. Each subscriber takes
//! the newest batch at its own interval, keeps its own previous CPU times for the usage
//! figure, and filters its VM. The poller runs only while someone subscribes.

use crate::hypervisor::domain::DomainFacts;
use crate::hypervisor::events;
use crate::hypervisor::Hypervisor;
use crate::pb;
use crate::stream::BoxStream;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Default and minimum StreamMetrics intervals.
pub const DEFAULT_INTERVAL_MS: u32 = 5000;
pub const MIN_INTERVAL_MS: u32 = 1000;

/// One sample per running VM with its vCPU count.
type Batch = Arc<Vec<(pb::VmMetrics, u32)>>;

#[derive(Debug, Default)]
struct Subscribers {
    next_id: u64,
    /// Interval in milliseconds of each live subscriber.
    intervals: BTreeMap<u64, u32>,
    /// Whether the poller task runs.
    polling: bool,
}

/// The shared poller (one per daemon).
#[derive(Debug)]
pub struct MetricsPoller {
    hv: Arc<dyn Hypervisor>,
    subs: Mutex<Subscribers>,
    tx: watch::Sender<Batch>,
    polls: AtomicU64,
}

/// Removes its subscriber's interval when the stream ends.
struct Registration {
    poller: Arc<MetricsPoller>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.poller.lock().intervals.remove(&self.id);
    }
}

impl MetricsPoller {
    pub fn new(hv: Arc<dyn Hypervisor>) -> Arc<MetricsPoller> {
        Arc::new(MetricsPoller {
            hv,
            subs: Mutex::new(Subscribers::default()),
            tx: watch::channel(Arc::new(Vec::new())).0,
            polls: AtomicU64::new(0),
        })
    }

    /// How many times libvirt was sampled (one sample covers every VM).
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The interval a request asks for, after the default and the floor.
    pub fn interval_of(requested_ms: u32) -> u32 {
        match requested_ms {
            0 => DEFAULT_INTERVAL_MS,
            ms => ms.max(MIN_INTERVAL_MS),
        }
    }

    /// A metrics stream of every running VM, or of `only`. Must run inside a tokio runtime.
    pub fn subscribe(
        self: &Arc<Self>,
        only: Option<String>,
        requested_ms: u32,
    ) -> BoxStream<pb::VmMetrics, Infallible> {
        let interval_ms = Self::interval_of(requested_ms);
        let mut rx = self.tx.subscribe();
        let registration = {
            let mut subs = self.lock();
            let id = subs.next_id;
            subs.next_id += 1;
            subs.intervals.insert(id, interval_ms);
            if !subs.polling {
                subs.polling = true;
                tokio::spawn(self.clone().poll());
            }
            Registration {
                poller: self.clone(),
                id,
            }
        };
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            let _registration = registration;
            let mut tick = tokio::time::interval(Duration::from_millis(u64::from(interval_ms)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut prev: HashMap<String, (u64, Instant)> = HashMap::new();
            loop {
                tick.tick().await;
                // A batch newer than the last one this subscriber used.
                if rx.changed().await.is_err() {
                    return;
                }
                let batch = rx.borrow_and_update().clone();
                let now = Instant::now();
                for (m, vcpus) in batch.iter() {
                    if only.as_ref().is_some_and(|o| o != &m.vm_id) {
                        continue;
                    }
                    let mut m = m.clone();
                    if let Some((cpu, at)) = prev.get(&m.vm_id) {
                        let wall_ns = now.duration_since(*at).as_nanos() as f64;
                        let used = m.cpu_time_ns.saturating_sub(*cpu) as f64;
                        if wall_ns > 0.0 && *vcpus > 0 {
                            m.cpu_usage_percent =
                                (used / (wall_ns * f64::from(*vcpus)) * 100.0) as f32;
                        }
                    }
                    prev.insert(m.vm_id.clone(), (m.cpu_time_ns, now));
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(out))
    }

    /// The poller task: samples at the shortest subscribed interval until nobody subscribes.
    async fn poll(self: Arc<Self>) {
        loop {
            let period = {
                let mut subs = self.lock();
                match subs.intervals.values().min() {
                    Some(ms) => *ms,
                    None => {
                        subs.polling = false;
                        return;
                    }
                }
            };
            let hv = self.hv.clone();
            match tokio::task::spawn_blocking(move || sample_metrics(hv.as_ref())).await {
                Ok(batch) => {
                    self.polls.fetch_add(1, Ordering::Relaxed);
                    self.tx.send_replace(Arc::new(batch));
                }
                Err(e) => log::error!("metrics poller: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(u64::from(period))).await;
        }
    }
}

/// One metrics sample per running VM, with its vCPU count. Blocking.
fn sample_metrics(hv: &dyn Hypervisor) -> Vec<(pb::VmMetrics, u32)> {
    let ids: Vec<String> = hv
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.state.is_active())
        .map(|d| d.uuid)
        .collect();
    let mut out = Vec::new();
    for id in ids {
        let Ok(info) = hv.info(&id) else { continue };
        if !info.state.is_active() {
            continue;
        }
        let facts = hv
            .xml(&id, false)
            .ok()
            .and_then(|x| DomainFacts::parse(&x).ok())
            .unwrap_or_default();
        let mut m = pb::VmMetrics {
            vm_id: id.clone(),
            unix_ms: events::now_unix_ms(),
            cpu_time_ns: info.cpu_time_ns,
            cpu_usage_percent: 0.0,
            memory_bytes: info.memory_kib.saturating_mul(1024),
            ..Default::default()
        };
        for d in facts.disks.iter().filter(|d| d.source.is_some()) {
            if let Ok((rd, wr)) = hv.block_stats(&id, &d.target) {
                m.disk_read_bytes += rd;
                m.disk_write_bytes += wr;
            }
        }
        for dev in &facts.interfaces {
            if let Ok((rx, tx)) = hv.interface_stats(&id, dev) {
                m.net_rx_bytes += rx;
                m.net_tx_bytes += tx;
            }
        }
        out.push((m, info.vcpus));
    }
    out
}
