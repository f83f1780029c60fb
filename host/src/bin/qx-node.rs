//! qx-node: the Quantix node daemon. Serves `NodeDaemonService` over gRPC (optionally TLS or
//! mutual TLS), keeps one agent link per VM, and exposes Prometheus metrics.
//!
//! Configuration: `--config FILE` (TOML, see `qx_node::config`) then flags, which win.
//! Without libvirt (`--libvirt-uri none`, or when the connection fails) the daemon still
//! serves every guest-agent RPC; the VM RPCs then answer UNAVAILABLE.

use anyhow::{Context, Result};
use clap::Parser;
use qx_node::agent_api::AgentApi;
use qx_node::config::{self, NodeConfig};
use qx_node::hypervisor::{
    DomainInfo, DomainRef, HostFacts, Hypervisor, HypervisorError, SnapshotRecord,
};
use qx_node::pb::node_daemon_service_server::NodeDaemonServiceServer;
use qx_node::service::NodeService;
use qx_node::text::escape_line;
use qx_node::vm_api::{VmApi, VmConfig};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "qx-node",
    version,
    about = "Quantix node daemon: VM lifecycle through libvirt and the guest agents over virtio-serial",
    long_about = "Quantix node daemon. Serves the NodeDaemonService gRPC API, keeps one \
connection per VM to its guest agent's socket, and exposes Prometheus metrics.\n\n\
A VM's agent socket is bound from its libvirt domain definition, from --vm-socket VMID=PATH, \
or found as <agent-socket-dir>/<vm-id>.agent.sock. No directory is ever scanned.\n\n\
Settings come from --config (TOML) and are overridden by flags."
)]
struct Args {
    /// TOML configuration file (keys: listen, metrics_listen, libvirt_uri, agent_socket_dir,
    /// image_dir, agent_iso, [vm_sockets], [timeouts], [limits], [tls]).
    #[arg(long, env = "QX_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:9090].
    #[arg(long)]
    listen: Option<String>,
    /// Prometheus metrics listen address (plain HTTP, GET /metrics); off when absent.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// libvirt URI [default: qemu:///system]; "none" serves the agent RPCs only.
    #[arg(long)]
    libvirt_uri: Option<String>,
    /// Directory of agent sockets named <vm-id>.agent.sock [default: /var/run/quantix-kvm/vms].
    #[arg(long)]
    agent_socket_dir: Option<PathBuf>,
    /// Directory for disk images [default: /var/lib/quantix-kvm/images].
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// The agent ISO inserted by MountAgentIso.
    #[arg(long)]
    agent_iso: Option<PathBuf>,
    /// Binds a VM's agent socket explicitly (repeatable): --vm-socket web1=/run/web1.sock.
    #[arg(long = "vm-socket", value_name = "VMID=PATH")]
    vm_sockets: Vec<String>,
    /// Command acknowledgement timeout in milliseconds [default: 5000].
    #[arg(long)]
    ack_timeout_ms: Option<u64>,
    /// Default total command timeout in milliseconds [default: 30000].
    #[arg(long)]
    default_timeout_ms: Option<u64>,
    /// Host ping interval in milliseconds [default: 5000].
    #[arg(long)]
    ping_interval_ms: Option<u64>,
    /// Liveness window in milliseconds [default: 15000].
    #[arg(long)]
    liveness_window_ms: Option<u64>,
    /// Per-frame write deadline in milliseconds [default: 5000].
    #[arg(long)]
    write_deadline_ms: Option<u64>,
    /// Server certificate (PEM) for TLS.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM) for TLS.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: mutual TLS.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
}

/// A minimal stderr logger: `RUST_LOG` = error|warn|info|debug|trace (default info).
#[derive(Debug)]
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) && r.target().starts_with("qx") {
            // One record, one line: guest text inside it cannot add lines or reach the
            // terminal reading the log as controls.
            let msg = r.args().to_string();
            eprintln!("{} {}: {}", r.level(), r.target(), escape_line(&msg));
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Info);
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(level);
}

fn merge(args: &Args) -> Result<NodeConfig> {
    let mut cfg = match &args.config {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig::default(),
    };
    macro_rules! over {
        ($($field:ident),*) => { $( if let Some(v) = &args.$field { cfg.$field = Some(v.clone()); } )* };
    }
    over!(
        listen,
        metrics_listen,
        libvirt_uri,
        agent_socket_dir,
        image_dir,
        agent_iso
    );
    for s in &args.vm_sockets {
        let (id, path) = config::parse_vm_socket(s)?;
        cfg.vm_sockets.insert(id, path);
    }
    let t = &mut cfg.timeouts;
    t.ack_timeout_ms = args.ack_timeout_ms.or(t.ack_timeout_ms);
    t.default_timeout_ms = args.default_timeout_ms.or(t.default_timeout_ms);
    t.ping_interval_ms = args.ping_interval_ms.or(t.ping_interval_ms);
    t.liveness_window_ms = args.liveness_window_ms.or(t.liveness_window_ms);
    t.write_deadline_ms = args.write_deadline_ms.or(t.write_deadline_ms);
    if args.tls_cert.is_some() {
        cfg.tls.cert = args.tls_cert.clone();
    }
    if args.tls_key.is_some() {
        cfg.tls.key = args.tls_key.clone();
    }
    if args.tls_client_ca.is_some() {
        cfg.tls.client_ca = args.tls_client_ca.clone();
    }
    Ok(cfg)
}

/// The hypervisor when libvirt is off or unreachable: every VM call answers "unreachable",
/// the VM list is empty, so the agent bindings from --vm-socket stay untouched.
#[derive(Debug)]
struct NoHypervisor {
    why: String,
}

impl NoHypervisor {
    fn err<T>(&self) -> Result<T, HypervisorError> {
        Err(HypervisorError::Unreachable(self.why.clone()))
    }
}

impl Hypervisor for NoHypervisor {
    fn uri(&self) -> &str {
        "none"
    }
    fn domain_type(&self) -> &str {
        "none"
    }
    fn is_alive(&self) -> bool {
        false
    }
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        self.err()
    }
    fn list(&self) -> Result<Vec<DomainRef>, HypervisorError> {
        Ok(Vec::new())
    }
    fn resolve(&self, _: &str) -> Result<String, HypervisorError> {
        self.err()
    }
    fn define(&self, _: &str) -> Result<String, HypervisorError> {
        self.err()
    }
    fn undefine(&self, _: &str, _: bool) -> Result<(), HypervisorError> {
        self.err()
    }
    fn info(&self, _: &str) -> Result<DomainInfo, HypervisorError> {
        self.err()
    }
    fn xml(&self, _: &str, _: bool) -> Result<String, HypervisorError> {
        self.err()
    }
    fn start(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn shutdown(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn destroy(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn reboot(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn suspend(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn resume(&self, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn update_device(&self, _: &str, _: &str, _: bool) -> Result<(), HypervisorError> {
        self.err()
    }
    fn snapshot_create(&self, _: &str, _: &str) -> Result<String, HypervisorError> {
        self.err()
    }
    fn snapshot_list(&self, _: &str) -> Result<Vec<SnapshotRecord>, HypervisorError> {
        self.err()
    }
    fn snapshot_get(&self, _: &str, _: &str) -> Result<SnapshotRecord, HypervisorError> {
        self.err()
    }
    fn snapshot_revert(&self, _: &str, _: &str, _: bool) -> Result<(), HypervisorError> {
        self.err()
    }
    fn snapshot_delete(&self, _: &str, _: &str) -> Result<(), HypervisorError> {
        self.err()
    }
    fn block_stats(&self, _: &str, _: &str) -> Result<(u64, u64), HypervisorError> {
        self.err()
    }
    fn interface_stats(&self, _: &str, _: &str) -> Result<(u64, u64), HypervisorError> {
        self.err()
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    log::info!("qx-node: shutting down");
}

#[tokio::main]
async fn main() -> Result<()> {
    init_logging();
    let args = Args::parse();
    let cfg = merge(&args)?;
    let agent_cfg = cfg.agent_config();
    config::validate_agent_config(&agent_cfg)?;
    let agent = Arc::new(AgentApi::new(agent_cfg));
    for (vm, path) in &cfg.vm_sockets {
        agent
            .manager()
            .attach(vm, path.clone())
            .with_context(|| format!("--vm-socket {vm}={}", path.display()))?;
    }
    let uri = cfg
        .libvirt_uri
        .clone()
        .unwrap_or_else(|| config::DEFAULT_LIBVIRT_URI.to_string());
    let vm_cfg = VmConfig {
        libvirt_uri: uri.clone(),
        socket_dir: cfg
            .agent_socket_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_SOCKET_DIR)),
        image_dir: cfg
            .image_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_IMAGE_DIR)),
        agent_iso: cfg.agent_iso.clone(),
    };
    let vm = if uri == "none" {
        log::warn!("libvirt disabled (--libvirt-uri none): serving guest-agent RPCs only");
        no_hypervisor(
            vm_cfg,
            agent.clone(),
            "libvirt is disabled (--libvirt-uri none)",
        )?
    } else {
        let attempt = {
            let (c, a) = (vm_cfg.clone(), agent.clone());
            tokio::task::spawn_blocking(move || VmApi::new(c, a)).await?
        };
        match attempt {
            Ok(vm) => vm,
            Err(e) => {
                log::error!("{e:#}; serving guest-agent RPCs only, VM RPCs answer UNAVAILABLE");
                no_hypervisor(vm_cfg, agent.clone(), &format!("{e:#}"))?
            }
        }
    };
    let svc = NodeService {
        vm: Arc::new(vm),
        agent: agent.clone(),
    };
    if let Some(addr) = &cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        log::info!("qx-node: metrics on http://{addr}/metrics");
        tokio::spawn(qx_node::metrics::serve(listener, agent.clone()));
    }
    let listen = cfg
        .listen
        .clone()
        .unwrap_or_else(|| config::DEFAULT_LISTEN.to_string());
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?} is not IP:PORT"))?;
    let mut server = tonic::transport::Server::builder();
    if cfg.tls.cert.is_some() || cfg.tls.key.is_some() || cfg.tls.client_ca.is_some() {
        server = tls::configure(server, &cfg.tls)?;
    }
    log::info!("qx-node: gRPC on {addr}");
    server
        .add_service(NodeDaemonServiceServer::new(svc))
        .serve_with_shutdown(addr, shutdown_signal())
        .await
        .with_context(|| format!("gRPC server on {addr}"))?;
    Ok(())
}

fn no_hypervisor(cfg: VmConfig, agent: Arc<AgentApi>, why: &str) -> Result<VmApi> {
    VmApi::with_hypervisor(
        cfg,
        agent,
        Arc::new(NoHypervisor {
            why: why.to_string(),
        }),
    )
}

mod tls {
    use anyhow::{bail, Context, Result};
    use qx_node::config::TlsFiles;
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

    /// TLS needs a certificate and a key; a client CA makes it mutual (clients without a
    /// certificate from that CA are refused).
    pub fn configure(server: Server, files: &TlsFiles) -> Result<Server> {
        let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
            bail!("TLS needs both a certificate (--tls-cert) and a key (--tls-key)");
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &files.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
            log::info!("qx-node: mutual TLS (client CA {})", ca.display());
        } else {
            log::info!("qx-node: TLS");
        }
        server.tls_config(tls).context("TLS configuration")
    }
}
