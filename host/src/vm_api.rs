//! Node, VM lifecycle, snapshot, media and event RPCs, backed by libvirt.
//!
//! Every libvirt call runs on a blocking thread ([`VmApi::run`]); guest-agent work goes
//! through [`AgentApi`], and "agent unavailable" is a normal outcome (a graceful stop falls
//! through to ACPI, a resume reports that the clock was not synced). VMs are named by their
//! libvirt domain UUID (a domain name is accepted too and resolved to the UUID).
//!
//! Agent discovery is exact: each running domain's `org.quantix.agent.0` socket is read back
//! from its live XML and bound with [`AgentApi::attach`] (at start-up for running domains,
//! and whenever the lifecycle watcher sees a domain start); stopping detaches it.

use crate::agent_api::AgentApi;
use crate::hypervisor::domain::{
    self, disk_element, DiskDef, DomainFacts, DomainSpec, SnapshotFacts, SpecContext, SpecError,
};
use crate::hypervisor::events::{self, AgentAction, EventHub, Watcher, WATCH_INTERVAL_MS};
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::{Hypervisor, HypervisorError, PowerState};
use crate::pb;
use crate::storage::api::StorageApi;
use crate::storage::{self, StorageError};
use crate::stream::BoxStream;
use crate::vm_metrics::MetricsPoller;
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

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

/// Which snapshots were taken with the guest's filesystems frozen. libvirt's snapshot XML
/// has no place for it, so it lives beside the images: `<image_dir>/<vm-id>.snapshots.json`.
#[derive(Debug)]
struct QuiesceNotes {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl QuiesceNotes {
    fn path(&self, uuid: &str) -> PathBuf {
        self.dir.join(format!("{uuid}.snapshots.json"))
    }

    fn load(&self, uuid: &str) -> BTreeMap<String, bool> {
        std::fs::read(self.path(uuid))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn set(&self, uuid: &str, name: &str, quiesced: Option<bool>) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut notes = self.load(uuid);
        match quiesced {
            Some(q) => notes.insert(name.to_string(), q),
            None => notes.remove(name),
        };
        let result = serde_json::to_vec(&notes)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(self.path(uuid), bytes));
        if let Err(e) = result {
            log::warn!("cannot record snapshot notes of VM {uuid}: {e}");
        }
    }

    fn forget(&self, uuid: &str) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = std::fs::remove_file(self.path(uuid));
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
        let notes = Arc::new(QuiesceNotes {
            dir: config.image_dir.clone(),
            lock: Mutex::new(()),
        });
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

    /// Polls until the domain is no longer active or `deadline` passes.
    async fn wait_inactive(&self, uuid: &str, deadline: Instant) -> bool {
        loop {
            match self.power_state(uuid).await {
                Ok(s) if !s.is_active() => return true,
                Err(VmError::Hypervisor(HypervisorError::NoDomain(_))) => return true,
                _ => {}
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(STOP_POLL_MS)).await;
        }
    }

    pub async fn health_check(
        &self,
        _request: pb::HealthCheckRequest,
    ) -> VmResult<pb::HealthCheckResponse> {
        let reachable = self.run(|hv| Ok(hv.is_alive())).await.unwrap_or(false);
        Ok(pb::HealthCheckResponse {
            healthy: reachable,
            version: env!("CARGO_PKG_VERSION").to_string(),
            hypervisor: self.hv.uri().to_string(),
            hypervisor_reachable: reachable,
            uptime_s: self.started.elapsed().as_secs(),
        })
    }

    pub async fn get_node_info(&self, _request: pb::GetNodeInfoRequest) -> VmResult<pb::NodeInfo> {
        let (host, domains) = self.run(|hv| Ok((hv.host_facts()?, hv.list()?))).await?;
        let running = domains.iter().filter(|d| d.state.is_active()).count();
        let agents = self.agent.connected_count();
        Ok(pb::NodeInfo {
            hostname: host.hostname,
            version: env!("CARGO_PKG_VERSION").to_string(),
            hypervisor_uri: self.hv.uri().to_string(),
            hypervisor_version: host.hypervisor_version,
            cpus: host.cpus,
            memory_bytes: host.memory_bytes,
            cpu_model: host.cpu_model,
            running_vms: u32::try_from(running).unwrap_or(u32::MAX),
            agents_connected: u32::try_from(agents).unwrap_or(u32::MAX),
        })
    }

    pub async fn create_vm(&self, request: pb::CreateVmRequest) -> VmResult<pb::VmStatus> {
        self.create_inner(request).await
    }

    /// CreateVM: volume disks are resolved (and missing ones created in their pools) first;
    /// if anything after fails, the volumes created for the VM are deleted again.
    async fn create_inner(&self, mut request: pb::CreateVmRequest) -> VmResult<pb::VmStatus> {
        let uuid = if request.vm_id.is_empty() {
            uuid::Uuid::new_v4()
        } else {
            uuid::Uuid::parse_str(&request.vm_id).map_err(|_| {
                VmError::InvalidArgument(format!("vm_id {:?} is not a UUID", request.vm_id))
            })?
        }
        .hyphenated()
        .to_string();
        let (spec, id) = (request.spec.take(), uuid.clone());
        let (spec, pool_roots, resolved, created) = self
            .run(move |hv| {
                let Some(conn) = hv.connection() else {
                    return Ok((spec, Vec::new(), Vec::new(), Vec::new()));
                };
                let mut spec = spec;
                let (resolved, created) = match spec.as_mut() {
                    Some(s) => storage::disks::resolve(&conn, &id, s)?,
                    None => Default::default(),
                };
                Ok((spec, storage::disks::pool_roots(&conn), resolved, created))
            })
            .await?;
        request.spec = spec;
        let result = self
            .create_defined(uuid, request, pool_roots, resolved, created.clone())
            .await;
        if result.is_err() && !created.is_empty() {
            let _ = self
                .run(move |hv| {
                    if let Some(conn) = hv.connection() {
                        storage::disks::delete_created(&conn, &created);
                    }
                    Ok(())
                })
                .await;
        }
        result
    }

    async fn create_defined(
        &self,
        uuid: String,
        request: pb::CreateVmRequest,
        pool_roots: Vec<PathBuf>,
        volume_paths: Vec<PathBuf>,
        volumes: Vec<PathBuf>,
    ) -> VmResult<pb::VmStatus> {
        let (mut disk_roots, media_roots) = self.allowed_roots();
        disk_roots.extend(pool_roots);
        let ctx = SpecContext {
            domain_type: self.hv.domain_type(),
            socket_dir: &self.config.socket_dir,
            image_dir: &self.config.image_dir,
            disk_roots: &disk_roots,
            media_roots: &media_roots,
            volume_paths: &volume_paths,
        };
        let mut spec = DomainSpec::from_request(&uuid, &request, &ctx)?;
        spec.volumes_created = volumes;
        let xml = spec.to_xml()?;

        let _create = self.create_lock.lock().await;
        let define_spec = spec.clone();
        let created = self
            .run(move |hv| define_with_volumes(hv, &define_spec, &xml))
            .await?;
        self.refresh().await;
        if request.start {
            if let Err(e) = self.start_inner(&uuid).await {
                log::warn!("VM {uuid}: start after create failed, removing it: {e}");
                let id = uuid.clone();
                let _ = self
                    .run(move |hv| {
                        let _ = hv.destroy(&id);
                        hv.undefine(&id, false)?;
                        remove_files(&created);
                        Ok(())
                    })
                    .await;
                self.refresh().await;
                return Err(e);
            }
        }
        self.status(&uuid).await
    }

    async fn start_inner(&self, uuid: &str) -> VmResult<()> {
        self.require_state(uuid, &[PowerState::ShutOff, PowerState::Crashed], "start")
            .await?;
        let id = uuid.to_string();
        self.run(move |hv| Ok(hv.start(&id)?)).await?;
        self.refresh().await;
        Ok(())
    }

    pub async fn start_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            self.start_inner(&uuid).await?;
            self.status(&uuid).await
        }
        .await
    }

    pub async fn stop_vm(&self, request: pb::StopVmRequest) -> VmResult<pb::StopVmResponse> {
        self.stop_inner(request).await
    }

    async fn stop_inner(&self, request: pb::StopVmRequest) -> VmResult<pb::StopVmResponse> {
        let uuid = self.resolve(&request.vm_id).await?;
        let state = self
            .require_state(
                &uuid,
                &[
                    PowerState::Running,
                    PowerState::Paused,
                    PowerState::ShuttingDown,
                    PowerState::PmSuspended,
                ],
                "stop",
            )
            .await?;
        let timeout_s = if request.timeout_s == 0 {
            DEFAULT_STOP_TIMEOUT_S
        } else {
            request.timeout_s
        };
        let begin = Instant::now();
        let deadline = begin + Duration::from_secs(u64::from(timeout_s));
        let mut steps = Vec::new();
        let mut stopped_by = pb::StopStep::Unspecified;
        let paused = state == PowerState::Paused;

        // 1. The agent: a clean power-off from inside the guest. Gets half the budget.
        let agent_step = step_start(pb::StopStep::Agent);
        if request.skip_agent || paused {
            let why = if paused {
                "VM is paused"
            } else {
                "skipped by request"
            };
            steps.push(step_done(agent_step, false, false, why));
        } else {
            match self
                .agent
                .power(&uuid, qx_proto::agent::PowerAction::Shutdown, 0)
                .await
            {
                Ok(reply) => {
                    let agent_deadline = begin + Duration::from_secs(u64::from(timeout_s)) / 2;
                    let off = self.wait_inactive(&uuid, agent_deadline).await;
                    let detail = if off {
                        format!("guest powered off ({})", reply.method)
                    } else {
                        format!("agent accepted ({}) but the VM still runs", reply.method)
                    };
                    steps.push(step_done(agent_step, true, off, &detail));
                    if off {
                        stopped_by = pb::StopStep::Agent;
                    }
                }
                Err(e) => {
                    let detail = format!("agent unavailable: {e}");
                    steps.push(step_done(agent_step, true, false, &detail));
                }
            }
        }

        // 2. ACPI power button, until the deadline.
        if stopped_by == pb::StopStep::Unspecified {
            let acpi_step = step_start(pb::StopStep::Acpi);
            if paused {
                steps.push(step_done(acpi_step, false, false, "VM is paused"));
            } else {
                let id = uuid.clone();
                match self.run(move |hv| Ok(hv.shutdown(&id)?)).await {
                    Ok(()) => {
                        let off = self.wait_inactive(&uuid, deadline).await;
                        let detail = if off {
                            "guest powered off on ACPI shutdown"
                        } else {
                            "no power-off before the timeout"
                        };
                        steps.push(step_done(acpi_step, true, off, detail));
                        if off {
                            stopped_by = pb::StopStep::Acpi;
                        }
                    }
                    Err(VmError::Hypervisor(HypervisorError::WrongState(_)))
                        if self.wait_inactive(&uuid, Instant::now()).await =>
                    {
                        steps.push(step_done(acpi_step, true, true, "already off"));
                        stopped_by = pb::StopStep::Acpi;
                    }
                    Err(e) => steps.push(step_done(acpi_step, true, false, &e.to_string())),
                }
            }
        }

        // 3. Pull the plug.
        if stopped_by == pb::StopStep::Unspecified {
            let force_step = step_start(pb::StopStep::Force);
            let id = uuid.clone();
            match self.run(move |hv| Ok(hv.destroy(&id)?)).await {
                Ok(()) => {
                    steps.push(step_done(force_step, true, true, "destroyed"));
                    stopped_by = pb::StopStep::Force;
                }
                Err(e) => {
                    // Stopped by itself between the last poll and the destroy?
                    if self.wait_inactive(&uuid, Instant::now()).await {
                        steps.push(step_done(force_step, true, true, "already off"));
                        stopped_by = pb::StopStep::Force;
                    } else {
                        steps.push(step_done(force_step, true, false, &e.to_string()));
                        self.refresh().await;
                        return Err(e);
                    }
                }
            }
        }
        self.refresh().await;
        let mut status = self.status(&uuid).await?;
        status.state_reason = format!("stopped by {}", stop_step_name(stopped_by));
        Ok(pb::StopVmResponse {
            status: Some(status),
            steps: steps.into_iter().map(|(r, _)| r).collect(),
            stopped_by: stopped_by as i32,
        })
    }

    pub async fn force_stop_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        async {
            let allowed = [
                PowerState::Running,
                PowerState::Paused,
                PowerState::ShuttingDown,
                PowerState::PmSuspended,
            ];
            let uuid = self
                .transition(&request.vm_id, &allowed, "force-stop", |hv, id| {
                    hv.destroy(id)
                })
                .await?;
            self.refresh().await;
            self.status(&uuid).await
        }
        .await
    }

    pub async fn reboot_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        async {
            let uuid = self
                .transition(
                    &request.vm_id,
                    &[PowerState::Running],
                    "reboot",
                    |hv, id| hv.reboot(id),
                )
                .await?;
            self.hub
                .emit(&uuid, pb::EventKind::VmRebooted, "reboot requested");
            self.refresh().await;
            self.status(&uuid).await
        }
        .await
    }

    pub async fn pause_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        async {
            let uuid = self
                .transition(&request.vm_id, &[PowerState::Running], "pause", |hv, id| {
                    hv.suspend(id)
                })
                .await?;
            self.refresh().await;
            self.status(&uuid).await
        }
        .await
    }

    pub async fn resume_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        async {
            let uuid = self
                .transition(&request.vm_id, &[PowerState::Paused], "resume", |hv, id| {
                    hv.resume(id)
                })
                .await?;
            self.refresh().await;
            // The guest clock stood still while paused: set it from the host. A failed sync
            // does not fail the resume; it is reported in state_reason.
            let reason = if self.agent_connected(&uuid) {
                match self.agent.sync_clock(&uuid, true, false).await {
                    Ok(r) => format!(
                        "resumed; guest clock synced (offset {:.3} s)",
                        r.offset_seconds
                    ),
                    Err(e) => {
                        log::warn!("VM {uuid}: time sync after resume failed: {e}");
                        format!("resumed; guest clock NOT synced: {e}")
                    }
                }
            } else {
                "resumed; no agent connected, guest clock not synced".to_string()
            };
            let mut status = self.status(&uuid).await?;
            status.state_reason = reason;
            Ok(status)
        }
        .await
    }

    pub async fn delete_vm(&self, request: pb::DeleteVmRequest) -> VmResult<pb::DeleteVmResponse> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            let state = self.power_state(&uuid).await?;
            if state.is_active() && !request.force {
                return Err(VmError::WrongState(format!(
                    "VM {uuid} is {state}: stop it first or delete with force"
                )));
            }
            let id = uuid.clone();
            let delete_storage = request.delete_storage;
            let image_dir = self.config.image_dir.clone();
            let deleted = self
                .run(move |hv| {
                    let facts = DomainFacts::parse(&hv.xml(&id, true)?)
                        .map_err(|e| VmError::Internal(format!("domain XML: {e}")))?;
                    if hv.state(&id)?.is_active() {
                        hv.destroy(&id)?;
                    }
                    hv.undefine(&id, facts.has_nvram)?;
                    let deleted = if delete_storage {
                        delete_owned_volumes(hv, &facts, &image_dir)
                    } else {
                        Vec::new()
                    };
                    Ok(deleted)
                })
                .await?;
            self.agent.detach(&uuid);
            self.notes.forget(&uuid);
            self.refresh().await;
            Ok(pb::DeleteVmResponse {
                deleted_volumes: deleted,
            })
        }
        .await
    }

    pub async fn get_vm_status(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            self.status(&uuid).await
        }
        .await
    }

    pub async fn list_v_ms(&self, _request: pb::ListVmsRequest) -> VmResult<pb::ListVmsResponse> {
        let domains = self.run(|hv| Ok(hv.list()?)).await?;
        let mut vms = Vec::with_capacity(domains.len());
        for d in domains {
            match self.status(&d.uuid).await {
                Ok(s) => vms.push(s),
                // Undefined since the listing.
                Err(VmError::Hypervisor(HypervisorError::NoDomain(_))) => {}
                Err(e) => return Err(e),
            }
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pb::ListVmsResponse { vms })
    }

    pub async fn create_snapshot(
        &self,
        request: pb::CreateSnapshotRequest,
    ) -> VmResult<pb::Snapshot> {
        self.snapshot_inner(request).await
    }

    async fn snapshot_inner(&self, request: pb::CreateSnapshotRequest) -> VmResult<pb::Snapshot> {
        let uuid = self.resolve(&request.vm_id).await?;
        let name = if request.name.is_empty() {
            format!("snap-{}", events::now_unix_ms())
        } else {
            request.name.clone()
        };
        if !domain::valid_name(&name) {
            return Err(VmError::InvalidArgument(format!(
                "snapshot name {name:?} must be 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
        let (id, n) = (uuid.clone(), name.clone());
        let exists = self
            .run(move |hv| match hv.snapshot_get(&id, &n) {
                Ok(_) => Ok(true),
                Err(HypervisorError::NoSnapshot(_)) => Ok(false),
                Err(e) => Err(e.into()),
            })
            .await?;
        if exists {
            return Err(VmError::AlreadyExists(format!(
                "VM {uuid} already has a snapshot {name:?}"
            )));
        }
        // Internal qcow2 snapshots: of a shut-off VM they hold the disks; of a running VM
        // libvirt 9 always includes the memory state (QEMU's savevm), whatever
        // `include_memory` says. `has_memory` in the answer tells which was taken.
        if request.include_memory {
            self.require_state(
                &uuid,
                &[PowerState::Running, PowerState::Paused],
                "include the memory state in a snapshot",
            )
            .await?;
        }
        let xml = domain::snapshot_xml(&name, &request.description)
            .map_err(|e| VmError::Internal(e.to_string()))?;

        // Freeze through the agent. A requested quiesce that cannot happen fails the
        // snapshot: an unfrozen snapshot must never be reported as quiesced.
        let mut token = None;
        if request.quiesce {
            self.require_state(&uuid, &[PowerState::Running], "quiesce")
                .await?;
            match self
                .agent
                .freeze(&uuid, Vec::new(), QUIESCE_TIMEOUT_S, true)
                .await
            {
                Ok(reply) => {
                    log::info!("VM {uuid}: froze {:?} for snapshot {name}", reply.frozen);
                    token = Some(reply.token);
                }
                Err(e) => {
                    return Err(VmError::WrongState(format!(
                        "quiesce requested but the guest agent could not freeze filesystems: {e}"
                    )))
                }
            }
        }

        let id = uuid.clone();
        // The snapshot XML is ours; libvirt refusing it means the VM's configuration
        // forbids it (e.g. a raw disk cannot hold an internal snapshot).
        let created = self
            .run(move |hv| match hv.snapshot_create(&id, &xml) {
                Err(HypervisorError::Invalid(m)) => Err(VmError::WrongState(format!(
                    "the VM's configuration does not allow this snapshot: {m}"
                ))),
                other => Ok(other?),
            })
            .await;

        // Thaw on every path, whatever the snapshot did.
        if let Some(token) = token {
            if let Err(e) = self.agent.thaw(&uuid, token, true).await {
                log::error!(
                    "VM {uuid}: thaw after snapshot {name} failed (the agent auto-thaws within {QUIESCE_TIMEOUT_S} s): {e}"
                );
            }
        }
        let snap_name = created?;
        let quiesced = token.is_some();
        let notes = self.notes.clone();
        let (id, n) = (uuid.clone(), snap_name.clone());
        let record = self
            .run(move |hv| {
                notes.set(&id, &n, Some(quiesced));
                Ok(hv.snapshot_get(&id, &n)?)
            })
            .await?;
        self.hub.emit(
            &uuid,
            pb::EventKind::SnapshotCreated,
            format!("{snap_name}{}", if quiesced { " (quiesced)" } else { "" }),
        );
        snapshot_pb(&record.xml, record.current, quiesced)
    }

    pub async fn list_snapshots(
        &self,
        request: pb::VmIdRequest,
    ) -> VmResult<pb::ListSnapshotsResponse> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            let notes = self.notes.clone();
            let (records, quiesced) = self
                .run(move |hv| Ok((hv.snapshot_list(&uuid)?, notes.load(&uuid))))
                .await?;
            let mut snapshots = records
                .iter()
                .map(|r| {
                    let q = quiesced.get(&r.name).copied().unwrap_or(false);
                    snapshot_pb(&r.xml, r.current, q)
                })
                .collect::<VmResult<Vec<_>>>()?;
            snapshots.sort_by(|a, b| (a.created_unix_s, &a.name).cmp(&(b.created_unix_s, &b.name)));
            Ok(pb::ListSnapshotsResponse { snapshots })
        }
        .await
    }

    pub async fn revert_snapshot(&self, request: pb::SnapshotRequest) -> VmResult<pb::VmStatus> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            if request.snapshot_id.is_empty() {
                return Err(VmError::InvalidArgument("snapshot_id is required".into()));
            }
            let (id, name, start) = (
                uuid.clone(),
                request.snapshot_id.clone(),
                request.start_after_revert,
            );
            let notes = self.notes.clone();
            let (socket, quiesced) = self
                .run(move |hv| {
                    hv.snapshot_revert(&id, &name, start)?;
                    let quiesced = notes.load(&id).get(&name).copied().unwrap_or(false);
                    Ok(if hv.state(&id)?.is_active() {
                        (events::agent_socket(hv, &id), quiesced)
                    } else {
                        (None, false)
                    })
                })
                .await?;
            self.refresh().await;
            // The guest's memory went back in time: its agent link starts again from scratch.
            self.agent.reset_after_revert(&uuid, socket, quiesced);
            self.status(&uuid).await
        }
        .await
    }

    pub async fn delete_snapshot(
        &self,
        request: pb::SnapshotRequest,
    ) -> VmResult<pb::DeleteSnapshotResponse> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            if request.snapshot_id.is_empty() {
                return Err(VmError::InvalidArgument("snapshot_id is required".into()));
            }
            let (id, name, notes) = (
                uuid.clone(),
                request.snapshot_id.clone(),
                self.notes.clone(),
            );
            self.run(move |hv| {
                hv.snapshot_delete(&id, &name)?;
                notes.set(&id, &name, None);
                Ok(())
            })
            .await?;
            self.hub
                .emit(&uuid, pb::EventKind::SnapshotDeleted, request.snapshot_id);
            Ok(pb::DeleteSnapshotResponse {})
        }
        .await
    }

    pub async fn change_media(
        &self,
        request: pb::ChangeMediaRequest,
    ) -> VmResult<pb::ChangeMediaResponse> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            let iso = if request.iso_path.is_empty() {
                None
            } else {
                let (_, media) = self.allowed_roots();
                let iso = crate::storage::policy::resolve_inside("ISO", &request.iso_path, &media)
                    .map_err(SpecError::from)?;
                Some(iso)
            };
            self.change_media_inner(&uuid, &request.device, iso).await
        }
        .await
    }

    /// Inserts `iso` into (or, with `None`, ejects) a VM's CD-ROM, forcing the tray. On a
    /// running VM with a medium already in, the old medium is ejected first and the new one
    /// inserted after, so QEMU reopens the file even when the path is the same: the guest
    /// sees the newest file. The result is read back from the domain's XML.
    async fn change_media_inner(
        &self,
        uuid: &str,
        device: &str,
        iso: Option<PathBuf>,
    ) -> VmResult<pb::ChangeMediaResponse> {
        let (id, dev) = (uuid.to_string(), device.to_string());
        let (target, previous, inserted) = self
            .run(move |hv| change_media_blocking(hv, &id, &dev, iso.as_deref()))
            .await?;
        self.hub.emit(
            uuid,
            pb::EventKind::MediaChanged,
            format!(
                "{target}: {}",
                if inserted.is_empty() {
                    "ejected"
                } else {
                    &inserted
                }
            ),
        );
        Ok(pb::ChangeMediaResponse {
            device: target,
            inserted,
            previous,
        })
    }

    pub async fn mount_agent_iso(
        &self,
        request: pb::VmIdRequest,
    ) -> VmResult<pb::ChangeMediaResponse> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            let iso = self.agent_iso()?;
            self.change_media_inner(&uuid, "", Some(iso)).await
        }
        .await
    }

    pub async fn eject_agent_iso(
        &self,
        request: pb::VmIdRequest,
    ) -> VmResult<pb::ChangeMediaResponse> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            let iso = self.agent_iso()?;
            let id = uuid.clone();
            let facts = self
                .run(move |hv| {
                    let active = hv.state(&id)?.is_active();
                    DomainFacts::parse(&hv.xml(&id, !active)?)
                        .map_err(|e| VmError::Internal(format!("domain XML: {e}")))
                })
                .await?;
            let iso_str = iso.to_string_lossy();
            let drive = facts
                .disks
                .iter()
                .find(|d| d.cdrom && d.source.as_deref() == Some(iso_str.as_ref()))
                .ok_or_else(|| {
                    VmError::WrongState(format!("the agent ISO is not inserted in VM {uuid}"))
                })?;
            self.change_media_inner(&uuid, &drive.target, None).await
        }
        .await
    }

    /// Where disks given by host path may lie (the image directory, the configured disk
    /// roots) and where media, kernels and initrds may come from (the media directories; the
    /// configured agent ISO is trusted as it is).
    fn allowed_roots(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let mut disks = vec![self.config.image_dir.clone()];
        disks.extend(self.config.disk_roots.iter().cloned());
        (disks, self.config.media_dirs.clone())
    }

    fn agent_iso(&self) -> VmResult<PathBuf> {
        let iso =
            self.config.agent_iso.clone().ok_or_else(|| {
                VmError::WrongState("no agent ISO is configured on this node".into())
            })?;
        if !iso.is_file() {
            return Err(VmError::WrongState(format!(
                "the agent ISO {} does not exist",
                iso.display()
            )));
        }
        Ok(iso)
    }

    pub async fn get_console(&self, request: pb::VmIdRequest) -> VmResult<pb::ConsoleInfo> {
        async {
            let uuid = self.resolve(&request.vm_id).await?;
            self.require_state(
                &uuid,
                &[PowerState::Running, PowerState::Paused],
                "open a console of",
            )
            .await?;
            let id = uuid.clone();
            let facts = self
                .run(move |hv| {
                    DomainFacts::parse(&hv.xml(&id, false)?)
                        .map_err(|e| VmError::Internal(format!("domain XML: {e}")))
                })
                .await?;
            if let Some(g) = facts
                .graphics
                .iter()
                .find(|g| g.port.is_some_and(|p| p > 0))
            {
                return Ok(pb::ConsoleInfo {
                    r#type: g.kind.clone(),
                    host: if g.listen.is_empty() {
                        "127.0.0.1".to_string()
                    } else {
                        g.listen.clone()
                    },
                    port: g.port.unwrap_or(0),
                    path: String::new(),
                });
            }
            if let Some(pty) = facts.serial_pty {
                return Ok(pb::ConsoleInfo {
                    r#type: "pty".to_string(),
                    host: String::new(),
                    port: 0,
                    path: pty,
                });
            }
            Err(VmError::WrongState(format!("VM {uuid} has no console")))
        }
        .await
    }

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

fn step_start(step: pb::StopStep) -> (pb::StopStepResult, Instant) {
    (
        pb::StopStepResult {
            step: step as i32,
            ..Default::default()
        },
        Instant::now(),
    )
}

fn step_done(
    (mut r, at): (pb::StopStepResult, Instant),
    attempted: bool,
    succeeded: bool,
    detail: &str,
) -> (pb::StopStepResult, Instant) {
    r.attempted = attempted;
    r.succeeded = succeeded;
    r.detail = detail.to_string();
    r.elapsed_ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
    (r, at)
}

fn stop_step_name(step: pb::StopStep) -> &'static str {
    match step {
        pb::StopStep::Agent => "agent",
        pb::StopStep::Acpi => "acpi",
        pb::StopStep::Force => "force",
        pb::StopStep::Unspecified => "nothing",
    }
}

fn snapshot_pb(xml: &str, current: bool, quiesced: bool) -> VmResult<pb::Snapshot> {
    let f =
        SnapshotFacts::parse(xml).map_err(|e| VmError::Internal(format!("snapshot XML: {e}")))?;
    Ok(pb::Snapshot {
        id: f.name.clone(),
        name: f.name,
        description: f.description,
        created_unix_s: f.created_unix_s,
        has_memory: matches!(f.state.as_str(), "running" | "paused" | "blocked"),
        state: f.state,
        quiesced,
        parent: f.parent,
        current,
    })
}

/// DeleteVM's storage half: the images qx-node created for this VM (recorded in its
/// metadata), still attached to it, still inside the image directory. Anything else (a shared
/// base image, a file attached by path, media) is never touched. Blocking.
fn delete_owned_volumes(hv: &dyn Hypervisor, facts: &DomainFacts, image_dir: &Path) -> Vec<String> {
    let mut deleted = Vec::new();
    let roots = [image_dir.to_path_buf()];
    for path in &facts.owned_volumes {
        let attached = facts
            .disks
            .iter()
            .any(|d| !d.cdrom && d.source.as_deref() == Some(path.as_str()));
        let inside = Path::new(path)
            .canonicalize()
            .is_ok_and(|real| crate::storage::policy::inside_any(&real, &roots));
        if !attached {
            log::warn!(
                "VM {}: not deleting {path}: no longer its own image",
                facts.uuid
            );
            continue;
        }
        if !inside {
            // A storage-pool volume created for the VM: deleted through libvirt.
            if let Some(conn) = hv.connection() {
                deleted.extend(storage::disks::delete_created(
                    &conn,
                    &[PathBuf::from(path)],
                ));
            }
            continue;
        }
        match std::fs::remove_file(path) {
            Ok(()) => deleted.push(path.clone()),
            Err(e) => log::warn!("cannot delete {path}: {e}"),
        }
    }
    deleted
}

fn remove_files(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = std::fs::remove_file(p) {
            log::warn!("cannot remove {}: {e}", p.display());
        }
    }
}

/// Creates the spec's missing images with qemu-img and defines the domain; on any failure
/// removes what it created. Returns the created images. Blocking.
fn define_with_volumes(
    hv: &dyn Hypervisor,
    spec: &DomainSpec,
    xml: &str,
) -> VmResult<Vec<PathBuf>> {
    match hv.resolve(&spec.uuid) {
        Ok(_) => {
            return Err(VmError::AlreadyExists(format!(
                "a VM with id {} exists",
                spec.uuid
            )))
        }
        Err(HypervisorError::NoDomain(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match hv.resolve(&spec.name) {
        Ok(_) => {
            return Err(VmError::AlreadyExists(format!(
                "a VM named {:?} exists",
                spec.name
            )))
        }
        Err(HypervisorError::NoDomain(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let mut created = Vec::new();
    let result = (|| {
        for d in &spec.disks {
            if let (Some(path), Some(gib)) = (&d.path, d.create_gib) {
                create_image(path, &d.format, gib)?;
                created.push(path.clone());
            }
        }
        hv.define(xml)?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(created),
        Err(e) => {
            remove_files(&created);
            Err(e)
        }
    }
}

/// The program that creates disk images.
const QEMU_IMG: &str = "qemu-img";

fn create_image(path: &Path, format: &str, gib: u64) -> VmResult<()> {
    create_image_with(QEMU_IMG, path, format, gib)
}

pub(crate) fn create_image_with(
    qemu_img: &str,
    path: &Path,
    format: &str,
    gib: u64,
) -> VmResult<()> {
    if path.exists() {
        return Err(VmError::AlreadyExists(format!(
            "image {} already exists",
            path.display()
        )));
    }
    let out = std::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(format!("{gib}G"))
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VmError::MissingProgram {
                program: QEMU_IMG,
                package: "qemu-utils",
                purpose: "to create disk images",
            },
            _ => VmError::Internal(format!("cannot run {qemu_img}: {e}")),
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(VmError::Internal(format!(
            "qemu-img create {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The blocking half of ChangeMedia: returns (target, previous, inserted).
fn change_media_blocking(
    hv: &dyn Hypervisor,
    uuid: &str,
    device: &str,
    iso: Option<&Path>,
) -> VmResult<(String, String, String)> {
    let active = hv.state(uuid)?.is_active();
    let facts = DomainFacts::parse(&hv.xml(uuid, !active)?)
        .map_err(|e| VmError::Internal(format!("domain XML: {e}")))?;
    let drive = match facts.cdrom(device) {
        Some(d) => d.clone(),
        None if !device.is_empty() && facts.disks.iter().any(|d| d.target == device) => {
            return Err(VmError::InvalidArgument(format!(
                "device {device} of VM {uuid} is not a CD-ROM"
            )))
        }
        None if !device.is_empty() => {
            return Err(VmError::NotFound(format!(
                "VM {uuid} has no device {device}"
            )))
        }
        None => {
            return Err(VmError::WrongState(format!(
                "VM {uuid} has no CD-ROM drive"
            )));
        }
    };
    let previous = drive.source.clone().unwrap_or_default();
    let def = |path: Option<&Path>| DiskDef {
        target: drive.target.clone(),
        bus: drive.bus.clone(),
        path: path.map(Path::to_path_buf),
        format: "raw".to_string(),
        readonly: true,
        cdrom: true,
        create_gib: None,
    };
    let xml_of = |path: Option<&Path>| {
        disk_element(&def(path))
            .to_xml()
            .map_err(|e| VmError::Internal(e.to_string()))
    };
    if active {
        if drive.source.is_some() {
            hv.update_device(uuid, &xml_of(None)?, true)?;
        }
        if iso.is_some() {
            hv.update_device(uuid, &xml_of(iso)?, true)?;
        }
    } else {
        match hv.update_device(uuid, &xml_of(iso)?, false) {
            Ok(()) => {}
            // Drivers without device updates (libvirt's test driver): redefine the
            // persistent XML with the new medium. Only for a shut-off domain.
            Err(HypervisorError::Unsupported(_)) => {
                let xml = domain::replace_disk(
                    &hv.xml(uuid, true)?,
                    &drive.target,
                    disk_element(&def(iso)),
                )
                .map_err(|e| VmError::Internal(e.to_string()))?;
                hv.define(&xml)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let after = DomainFacts::parse(&hv.xml(uuid, !active)?)
        .map_err(|e| VmError::Internal(format!("domain XML: {e}")))?;
    let now = after
        .cdrom(&drive.target)
        .and_then(|d| d.source.clone())
        .unwrap_or_default();
    let wanted = iso
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if now != wanted {
        return Err(VmError::Internal(format!(
            "drive {} holds {now:?} after the change, not {wanted:?}",
            drive.target
        )));
    }
    Ok((drive.target, previous, now))
}

/// The lifecycle watcher: diffs domain states every [`WATCH_INTERVAL_MS`] until the
/// [`VmApi`] that owns the watcher is dropped.
async fn watch_lifecycle(
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
async fn forward_agent_events(
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
