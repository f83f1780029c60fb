//! The agent connection manager: one [`link::Link`] per VM.
//!
//! Layers:
//! - [`AgentManager`]: the VM -> socket bindings. A socket is bound explicitly
//!   ([`AgentManager::attach`], from the domain's own channel definition or `--vm-socket`) or
//!   found as `<socket_dir>/<vm-id>.agent.sock`, a name that belongs to that VM alone. No
//!   directory is ever scanned and no other VM's socket is ever opened.
//! - [`link::Link`]: one VM's supervisor, reader and writer tasks (one connection at a time).
//! - [`table`]: every command's lifecycle (queued, written, acknowledged, completed or failed
//!   at a named stage), sans-io; [`command`] is what a caller holds while it waits.

pub mod command;
pub mod limits;
pub mod link;
pub mod stats;
pub mod table;

use crate::error::AgentError;
use link::Link;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// Timeouts and limits of the agent links. Every field has a default suited to production;
/// tests shorten them.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `<dir>/<vm-id>.agent.sock` is the socket of `<vm-id>` when nothing was attached.
    pub socket_dir: Option<PathBuf>,
    /// How often the host pings an idle agent.
    pub ping_interval: Duration,
    /// A link is "connected" only if something was heard within this window; cached agent
    /// data older than it is marked stale.
    pub liveness_window: Duration,
    /// No whole frame heard for this long: tear the connection down and reconnect. Before the
    /// first AgentReady on a connection the liveness window applies instead.
    pub idle_reconnect: Duration,
    /// After this long without AgentReady the link reports "waiting for the agent" (it keeps
    /// the connection: the agent announces itself when it starts).
    pub handshake_timeout: Duration,
    /// One frame must be flushed within this, or the connection is torn down; a frame the
    /// agent started must arrive whole within it, or the reader abandons it and rescans.
    pub write_deadline: Duration,
    /// A command must be acknowledged this long after it was queued.
    pub ack_timeout: Duration,
    /// Default total time for a command (RPCs may pass their own `timeout_ms`).
    pub default_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Commands waiting for the writer, per VM.
    pub queue_capacity: usize,
    /// Commands not yet finished, per VM.
    pub max_in_flight: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket_dir: None,
            ping_interval: Duration::from_secs(5),
            liveness_window: Duration::from_secs(15),
            idle_reconnect: Duration::from_secs(45),
            handshake_timeout: Duration::from_secs(10),
            write_deadline: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(5),
            default_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            queue_capacity: 256,
            max_in_flight: 1024,
        }
    }
}

/// What changed on an agent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentEventKind {
    /// AgentReady on a new connection.
    Connected,
    /// A connection on which the agent had said AgentReady ended.
    Disconnected,
    /// The agent's session id changed: it restarted.
    Restarted,
}

/// An agent connection change, for `StreamEvents`.
#[derive(Debug, Clone)]
pub struct AgentEvent {
    pub vm_id: String,
    pub kind: AgentEventKind,
    pub detail: String,
}

#[derive(Debug)]
struct Binding {
    link: Arc<Link>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// Every VM's agent link.
#[derive(Debug)]
pub struct AgentManager {
    cfg: Arc<AgentConfig>,
    bindings: Mutex<HashMap<String, Binding>>,
    events: broadcast::Sender<AgentEvent>,
    host_session: u64,
}

/// A VM id names a file in the socket directory, so it may not contain path syntax.
pub fn validate_vm_id(vm_id: &str) -> Result<(), AgentError> {
    let ok = !vm_id.is_empty()
        && vm_id.len() <= 128
        && vm_id != "."
        && vm_id != ".."
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidVmId {
            vm_id: vm_id.to_string(),
        })
    }
}

/// `<dir>/<vm-id>.agent.sock`.
pub fn socket_in_dir(dir: &Path, vm_id: &str) -> PathBuf {
    dir.join(format!("{vm_id}.agent.sock"))
}

impl AgentManager {
    pub fn new(cfg: AgentConfig) -> AgentManager {
        let (events, _) = broadcast::channel(1024);
        AgentManager {
            cfg: Arc::new(cfg),
            bindings: Mutex::new(HashMap::new()),
            events,
            host_session: link::random_u64() | 1,
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Binding>> {
        self.bindings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds `vm_id` to `socket` and starts its link. The same binding again is a no-op; a
    /// different socket replaces the binding, closing the old connection before the new
    /// one opens.
    pub fn attach(&self, vm_id: &str, socket: PathBuf) -> Result<Arc<Link>, AgentError> {
        validate_vm_id(vm_id)?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| AgentError::NoRuntime)?;
        let mut map = self.lock();
        let previous = match map.remove(vm_id) {
            Some(b) if b.link.socket == socket => {
                let link = b.link.clone();
                map.insert(vm_id.to_string(), b);
                return Ok(link);
            }
            Some(mut old) => {
                let _ = old.stop.send(true);
                old.task.take()
            }
            None => None,
        };
        let link = Link::new(
            vm_id.to_string(),
            socket,
            self.cfg.clone(),
            self.host_session,
            self.events.clone(),
        );
        let (stop, stop_rx) = watch::channel(false);
        let task = rt.spawn(link.clone().supervise(stop_rx, previous));
        map.insert(
            vm_id.to_string(),
            Binding {
                link: link.clone(),
                stop,
                task: Some(task),
            },
        );
        log::info!(
            "vm {vm_id}: agent socket bound to {}",
            link.socket.display()
        );
        Ok(link)
    }

    /// Closes `vm_id`'s link and forgets its socket. In-flight commands fail "detached".
    pub fn detach(&self, vm_id: &str) {
        if let Some(b) = self.lock().remove(vm_id) {
            let _ = b.stop.send(true);
            log::info!("vm {vm_id}: agent socket detached");
        }
    }

    /// The link of `vm_id`: its binding, or `<socket_dir>/<vm-id>.agent.sock` when that file
    /// exists (then bound).
    pub fn link(&self, vm_id: &str) -> Result<Arc<Link>, AgentError> {
        validate_vm_id(vm_id)?;
        if let Some(b) = self.lock().get(vm_id) {
            return Ok(b.link.clone());
        }
        if let Some(dir) = &self.cfg.socket_dir {
            let path = socket_in_dir(dir, vm_id);
            if path.exists() {
                return self.attach(vm_id, path);
            }
        }
        Err(AgentError::UnknownVm {
            vm_id: vm_id.to_string(),
        })
    }

    /// Every bound link, sorted by VM id.
    pub fn links(&self) -> Vec<Arc<Link>> {
        let mut v: Vec<Arc<Link>> = self.lock().values().map(|b| b.link.clone()).collect();
        v.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        v
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }
}

impl Drop for AgentManager {
    fn drop(&mut self) {
        for (_, b) in self.lock().drain() {
            let _ = b.stop.send(true);
        }
    }
}
