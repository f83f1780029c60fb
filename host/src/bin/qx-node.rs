//! qx-node: the Quantix node daemon. Serves `NodeDaemonService` over gRPC (optionally TLS or
//! mutual TLS), keeps one agent link per VM, and exposes Prometheus metrics.
//!
//! Configuration: `--config FILE` (TOML, see `qx_node::config`) then flags, which win.
//! Without libvirt (`--libvirt-uri none`, or when the connection fails) the daemon still
//! serves every guest-agent RPC; the VM RPCs then answer UNAVAILABLE.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use qx_node::agent_api::AgentApi;
use qx_node::config::{self, NodeConfig};
use qx_node::hypervisor::none::NoHypervisor;
use qx_node::listen;
use qx_node::logging::LogFormat;
use qx_node::pb::node_daemon_service_server::NodeDaemonServiceServer;
use qx_node::rpc_layer::{MethodTable, RpcLayer, RpcMetrics};
use qx_node::service::NodeService;
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
    /// image_dir, agent_iso, disk_roots, media_dirs, [vm_sockets], [timeouts], [limits], [tls]).
    #[arg(long, env = "QX_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address: unix:/PATH or IP:PORT [default:
    /// unix:/run/quantix-kvm/qx-node.sock]. TCP needs TLS, beyond loopback mutual TLS.
    #[arg(long)]
    listen: Option<String>,
    /// Group (name or id) of the unix socket; its members may connect.
    #[arg(long)]
    socket_group: Option<String>,
    /// Listen on TCP without the TLS the address needs. Anyone who reaches the port drives
    /// every VM as root: for throw-away test setups only.
    #[arg(long)]
    insecure_listen: bool,
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
    /// A directory where disks named by host path may live, besides --image-dir and
    /// libvirt's storage pools (repeatable).
    #[arg(long = "disk-root", value_name = "DIR")]
    disk_roots: Vec<PathBuf>,
    /// A directory that ISOs, kernels and initrds may come from (repeatable)
    /// [default: /var/lib/quantix-kvm/media].
    #[arg(long = "media-dir", value_name = "DIR")]
    media_dirs: Vec<PathBuf>,
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
    /// Log line format; filter with RUST_LOG (e.g. "info,qx_node::agent=debug").
    #[arg(long, value_enum, env = "QX_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
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
        socket_group,
        metrics_listen,
        libvirt_uri,
        agent_socket_dir,
        image_dir,
        agent_iso
    );
    cfg.disk_roots.extend(args.disk_roots.iter().cloned());
    if !args.media_dirs.is_empty() {
        cfg.media_dirs = Some(args.media_dirs.clone());
    }
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

/// Type=notify: everything is set up and the listener is bound (for TCP it binds as the
/// server starts).
fn notify_ready() {
    if let Err(e) = qx_node::systemd::notify_ready() {
        log::warn!("cannot notify systemd of readiness: {e}");
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if qx_node::manpages::generate_if_asked(Args::command(), "8")
        .context("cannot write man pages and completions")?
    {
        return Ok(());
    }
    let args = Args::parse();
    qx_node::logging::init(args.log_format)?;
    // One descriptor per VM's agent link: the usual soft limit (1024) would stop a node at
    // about a thousand VMs whatever its hard limit says.
    match qx_node::sys::raise_nofile_limit() {
        Ok(l) if l.was < l.now => log::info!(
            "qx-node: open file limit raised from {} to {} (the hard limit)",
            l.was,
            l.now
        ),
        Ok(l) => log::info!(
            "qx-node: open file limit {} (already the hard limit)",
            l.now
        ),
        Err(e) => log::warn!("qx-node: cannot raise the open file limit: {e}"),
    }
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
        disk_roots: cfg.disk_roots.clone(),
        media_dirs: cfg
            .media_dirs
            .clone()
            .unwrap_or_else(|| vec![PathBuf::from(config::DEFAULT_MEDIA_DIR)]),
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
    let (health, health_svc) = qx_node::health::health();
    qx_node::health::check_once(&svc.vm, &health).await;
    tokio::spawn(qx_node::health::watch(svc.vm.clone(), health));
    let (reflection_v1, reflection_v1alpha) = qx_node::health::reflection()?;
    let rpc_metrics = Arc::new(RpcMetrics::default());
    let rpc_layer = RpcLayer::new(MethodTable::served()?, rpc_metrics.clone());
    if let Some(addr) = &cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        log::info!("qx-node: metrics on http://{addr}/metrics");
        tokio::spawn(qx_node::metrics::serve(
            listener,
            agent.clone(),
            rpc_metrics.clone(),
        ));
    }
    let listen = cfg
        .listen
        .clone()
        .unwrap_or_else(|| config::DEFAULT_LISTEN.to_string());
    let endpoint = listen::Endpoint::parse(&listen).map_err(anyhow::Error::msg)?;
    let protection = match (&cfg.tls.cert, &cfg.tls.key, &cfg.tls.client_ca) {
        (Some(_), Some(_), Some(_)) => listen::Protection::MutualTls,
        (Some(_), Some(_), None) => listen::Protection::Tls,
        _ => listen::Protection::None,
    };
    match listen::check(&endpoint, protection, args.insecure_listen) {
        Ok(None) => {}
        Ok(Some(warning)) => log::warn!("{warning}"),
        Err(why) => anyhow::bail!("{why}"),
    }
    let mut server = listen::grpc_server();
    let tcp = matches!(endpoint, listen::Endpoint::Tcp(_));
    if tcp && (cfg.tls.cert.is_some() || cfg.tls.key.is_some() || cfg.tls.client_ca.is_some()) {
        server = tls::configure(server, &cfg.tls)?;
    }
    log::info!("qx-node: gRPC on {endpoint}");
    let router = server
        .layer(rpc_layer)
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(NodeDaemonServiceServer::new(svc));
    match &endpoint {
        listen::Endpoint::Tcp(addr) => {
            notify_ready();
            router.serve_with_shutdown(*addr, shutdown_signal()).await
        }
        listen::Endpoint::Unix(path) => {
            let group = cfg
                .socket_group
                .as_deref()
                .map(listen::group_id)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let listener = listen::bind_unix(path, group)
                .await
                .map_err(anyhow::Error::msg)?;
            notify_ready();
            let served = router
                .serve_with_incoming_shutdown(
                    listen::checked_incoming(listener, group),
                    shutdown_signal(),
                )
                .await;
            let _ = std::fs::remove_file(path);
            served
        }
    }
    .with_context(|| format!("gRPC server on {endpoint}"))?;
    Ok(())
}

fn no_hypervisor(cfg: VmConfig, agent: Arc<AgentApi>, why: &str) -> Result<VmApi> {
    VmApi::with_hypervisor(cfg, agent, Arc::new(NoHypervisor::new(why)))
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
