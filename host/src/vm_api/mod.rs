//! Node, VM lifecycle, snapshot, media and event RPCs, backed by libvirt.
//!
//! Every libvirt call runs on a blocking thread ([`VmApi::run`]); guest-agent work goes
//! through [`AgentApi`], and "agent unavailable" is a normal outcome (a graceful stop falls
//! through to ACPI, a resume reports that the clock was not synced). VMs are named by their
//! libvirt domain UUID (a domain name is accepted too and resolved to the UUID).
//!
//! One file per concern: [`lifecycle`] (node facts, start, pause, resume, delete, status),
//! [`stop`] (StopVM's ladder), [`snapshots`], [`media`], [`create`] and [`streams`] (events,
//! metrics, and the tasks feeding the event ring). This file holds the shared state and the
//! helpers every concern uses.
//!
//! Agent discovery is exact: each running domain's `org.quantix.agent.0` socket is read back
//! from its live XML and bound with [`AgentApi::attach`] (at start-up for running domains,
//! and whenever the lifecycle watcher sees a domain start); stopping detaches it.

mod create;
mod lifecycle;
mod media;
mod snapshots;
mod stop;
mod streams;

#[cfg(test)]
pub(crate) use create::create_image_with;
use snapshots::QuiesceNotes;
use streams::{forward_agent_events, watch_lifecycle};

use crate::agent_api::AgentApi;
use crate::hypervisor::domain::{DomainFacts, SpecError};
use crate::hypervisor::events::{AgentAction, EventHub, Watcher};
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::{Hypervisor, HypervisorError, PowerState};
use crate::pb;
use crate::storage::api::StorageApi;
use crate::storage::StorageError;
use crate::vm_metrics::MetricsPoller;
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Default graceful-stop budget.
pub const DEFAULT_STOP_TIMEOUT_S: u32 = 60;
/// How often a stop polls the domain state.
pub const STOP_POLL_MS: u64 = 100;
/// The auto-thaw deadline asked of the agent when a snapshot quiesces.
pub const QUIESCE_TIMEOUT_S: u32 = 60;

/// Where the VM side of the daemon finds its hypervisor and files.
#[derive(Debug, Clone, Default)]
pub struct VmConfig {
    /// libvirt connection URI, e.g. `qemu:///system`, or for tests libvirt's test driver:
    /// `test:///<dir>/node.xml` (a private hypervisor per connection; `test:///default` is
    /// shared by all connections of a process while one is open).
    pub libvirt_uri: String,
    /// Directory of the per-VM agent sockets: `<socket_dir>/<vm-id>.agent.sock`.
    pub socket_dir: PathBuf,
    /// Directory for disk images created by CreateVM.
    pub image_dir: PathBuf,
    /// The agent ISO that MountAgentIso inserts.
    pub agent_iso: Option<PathBuf>,
    /// Directories besides `image_dir` (and libvirt's storage pools) where a disk named by
    /// its host path may live.
    pub disk_roots: Vec<PathBuf>,
    /// Directories that ISOs, kernels and initrds may come from.
    pub media_dirs: Vec<PathBuf>,
}

/// Why a VM operation failed; the gRPC edge maps it to a status code
/// ([`crate::service::status::vm`]).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    WrongState(String),
    /// A program the host needs is not installed.
    #[error("{program} is not installed on this host: it is needed {purpose}; install the {package} package (for example `apt-get install {package}`)")]
    MissingProgram {
        program: &'static str,
        package: &'static str,
        purpose: &'static str,
    },
    #[error("{0}")]
    Internal(String),
}

pub type VmResult<T> = Result<T, VmError>;

fn state_pb(s: PowerState) -> pb::VmState {
    match s {
        PowerState::Running => pb::VmState::Running,
        PowerState::Paused => pb::VmState::Paused,
        PowerState::ShuttingDown => pb::VmState::ShuttingDown,
        PowerState::ShutOff => pb::VmState::Stopped,
        PowerState::Crashed => pb::VmState::Crashed,
        PowerState::PmSuspended => pb::VmState::Suspended,
        PowerState::Unknown => pb::VmState::Unspecified,
    }
}

/// Node, VM lifecycle, snapshot, media and event RPCs, backed by libvirt.
#[derive(Debug)]
pub struct VmApi {
    config: VmConfig,
    agent: Arc<AgentApi>,
    hv: Arc<dyn Hypervisor>,
    hub: Arc<EventHub>,
    watcher: Arc<Watcher>,
    notes: Arc<QuiesceNotes>,
    /// Serialises CreateVM, so "does this id or name exist" and "define" are one step.
    create_lock: tokio::sync::Mutex<()>,
    started: Instant,
    /// StreamMetrics' one shared libvirt poller.
    metrics: Arc<MetricsPoller>,
    /// The storage RPCs, over the same libvirt connection.
    storage: StorageApi,
}

fn apply_agent_actions(agent: &AgentApi, actions: Vec<AgentAction>) {
    for action in actions {
        match action {
            AgentAction::Attach(vm, path) => {
                log::info!("VM {vm}: agent socket {}", path.display());
                agent.attach(&vm, path);
            }
            AgentAction::Detach(vm) => {
                log::info!("VM {vm}: agent detached");
                agent.detach(&vm);
            }
        }
    }
}

impl VmApi {
    /// Connects to the hypervisor and binds every running VM's agent socket. Blocking (it
    /// runs once at start-up). When called inside a tokio runtime it also starts the
    /// lifecycle watcher and the agent-event forwarder.
    pub fn new(config: VmConfig, agent: Arc<AgentApi>) -> anyhow::Result<Self> {
        let hv = Libvirt::open(&config.libvirt_uri)
            .with_context(|| format!("cannot connect to libvirt at {}", config.libvirt_uri))?;
        Self::with_hypervisor(config, agent, Arc::new(hv))
    }

    /// [`VmApi::new`] over any [`Hypervisor`].
    pub fn with_hypervisor(
        config: VmConfig,
        agent: Arc<AgentApi>,
        hv: Arc<dyn Hypervisor>,
    ) -> anyhow::Result<Self> {
        for dir in [&config.socket_dir, &config.image_dir] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let hub = Arc::new(EventHub::new());
        let watcher = Arc::new(Watcher::default());
        apply_agent_actions(&agent, watcher.sync(hv.as_ref(), &hub));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(watch_lifecycle(
                Arc::downgrade(&watcher),
                hv.clone(),
                hub.clone(),
                agent.clone(),
            ));
            rt.spawn(forward_agent_events(agent.agent_events(), hub.clone()));
        } else {
            log::warn!("VmApi created outside a tokio runtime: no lifecycle watcher");
        }
        let notes = Arc::new(QuiesceNotes::new(config.image_dir.clone()));
        Ok(VmApi {
            config,
            agent,
            hub,
            watcher,
            notes,
            create_lock: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            metrics: MetricsPoller::new(hv.clone()),
            storage: StorageApi::new(hv.clone()),
            hv,
        })
    }

    /// The storage pool and volume RPCs.
    pub fn storage(&self) -> &StorageApi {
        &self.storage
    }

    /// How many times StreamMetrics sampled libvirt (for tests and diagnostics).
    pub fn metrics_polls(&self) -> u64 {
        self.metrics.polls()
    }

    /// The event hub (for tests and diagnostics).
    pub fn events(&self) -> &EventHub {
        &self.hub
    }

    /// Runs blocking hypervisor work off the async workers.
    async fn run<T, F>(&self, f: F) -> VmResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> VmResult<T> + Send + 'static,
    {
        let hv = self.hv.clone();
        tokio::task::spawn_blocking(move || f(hv.as_ref()))
            .await
            .map_err(|e| VmError::Internal(format!("hypervisor task failed: {e}")))?
    }

    /// Publishes lifecycle transitions and applies agent bindings.
    async fn refresh(&self) {
        let watcher = self.watcher.clone();
        let hub = self.hub.clone();
        let actions = self
            .run(move |hv| Ok(watcher.sync(hv, &hub)))
            .await
            .unwrap_or_default();
        apply_agent_actions(&self.agent, actions);
    }

    async fn resolve(&self, id: &str) -> VmResult<String> {
        if id.is_empty() {
            return Err(VmError::InvalidArgument("vm_id is required".into()));
        }
        let id = id.to_string();
        self.run(move |hv| Ok(hv.resolve(&id)?)).await
    }

    async fn power_state(&self, uuid: &str) -> VmResult<PowerState> {
        let uuid = uuid.to_string();
        self.run(move |hv| Ok(hv.state(&uuid)?)).await
    }

    /// The agent connection manager's cached view (never a round trip to the guest).
    fn agent_info(&self, uuid: &str) -> pb::GuestAgentInfo {
        self.agent.agent_info(uuid)
    }

    fn agent_connected(&self, uuid: &str) -> bool {
        self.agent_info(uuid).connected
    }

    async fn status(&self, uuid: &str) -> VmResult<pb::VmStatus> {
        let id = uuid.to_string();
        let (info, facts) = self
            .run(move |hv| {
                let info = hv.info(&id)?;
                let xml = hv.xml(&id, !info.state.is_active())?;
                let facts = DomainFacts::parse(&xml)
                    .map_err(|e| VmError::Internal(format!("domain XML: {e}")))?;
                Ok((info, facts))
            })
            .await?;
        let guest_agent = if info.state.is_active() {
            self.agent_info(uuid)
        } else {
            pb::GuestAgentInfo::default()
        };
        Ok(pb::VmStatus {
            vm_id: facts.uuid.clone(),
            name: facts.name.clone(),
            state: state_pb(info.state) as i32,
            state_reason: String::new(),
            vcpus: info.vcpus,
            memory_mib: info.max_memory_kib / 1024,
            cpu_time_ns: info.cpu_time_ns,
            labels: facts.labels.into_iter().collect(),
            guest_agent: Some(guest_agent),
            agent_socket: facts
                .agent_socket
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
    }

    /// Resolves the VM, checks that its state allows `op`, and runs one hypervisor action on
    /// it. Returns the VM's uuid; the caller reports the new status.
    async fn transition(
        &self,
        vm_id: &str,
        allowed: &[PowerState],
        op: &'static str,
        act: fn(&dyn Hypervisor, &str) -> Result<(), HypervisorError>,
    ) -> VmResult<String> {
        let uuid = self.resolve(vm_id).await?;
        self.require_state(&uuid, allowed, op).await?;
        let id = uuid.clone();
        self.run(move |hv| Ok(act(hv, &id)?)).await?;
        Ok(uuid)
    }

    async fn require_state(
        &self,
        uuid: &str,
        allowed: &[PowerState],
        op: &str,
    ) -> VmResult<PowerState> {
        let state = self.power_state(uuid).await?;
        if allowed.contains(&state) {
            Ok(state)
        } else {
            Err(VmError::WrongState(format!(
                "cannot {op} VM {uuid}: it is {state}"
            )))
        }
    }

    /// Where disks given by host path may lie (the image directory, the configured disk
    /// roots) and where media, kernels and initrds may come from (the media directories; the
    /// configured agent ISO is trusted as it is).
    fn allowed_roots(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let mut disks = vec![self.config.image_dir.clone()];
        disks.extend(self.config.disk_roots.iter().cloned());
        (disks, self.config.media_dirs.clone())
    }
}
