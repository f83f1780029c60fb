//! Test utilities for the agent-side tests: a stand-in for QEMU's chardev socket, the real
//! guest agent as a child process, a small codec-based agent for the failure modes the real
//! one cannot be asked to show, and an in-process qx-node (tonic server and client).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use qx_node::agent::AgentConfig;
use qx_node::agent_api::AgentApi;
use qx_node::pb;
use qx_node::pb::node_daemon_service_client::NodeDaemonServiceClient;
use qx_node::pb::node_daemon_service_server::NodeDaemonServiceServer;
use qx_node::service::NodeService;
use qx_node::vm_api::{VmApi, VmConfig};
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{Ack, AgentReady, Envelope, Pong};
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Notify};
use tonic::transport::Channel;

pub type Client = NodeDaemonServiceClient<Channel>;

/// Short link timings so the tests run in seconds.
pub fn fast_config(socket_dir: Option<PathBuf>) -> AgentConfig {
    AgentConfig {
        socket_dir,
        ping_interval: Duration::from_millis(200),
        liveness_window: Duration::from_millis(2000),
        idle_reconnect: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(3),
        write_deadline: Duration::from_millis(500),
        ack_timeout: Duration::from_secs(2),
        default_timeout: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        queue_capacity: 64,
        max_in_flight: 256,
    }
}

// -------------------------------------------------------------------------------------------
// QEMU's chardev socket, played by a relay
// -------------------------------------------------------------------------------------------

type Writer = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// A pause switch for one direction of the relay.
#[derive(Debug, Default)]
struct Gate {
    closed: AtomicBool,
    opened: Notify,
}

impl Gate {
    fn set_closed(&self, closed: bool) {
        self.closed.store(closed, Ordering::SeqCst);
        if !closed {
            self.opened.notify_waiters();
            self.opened.notify_one();
        }
    }

    /// Returns once the gate is open.
    async fn passable(&self) {
        while self.closed.load(Ordering::SeqCst) {
            self.opened.notified().await;
        }
    }
}

/// Plays QEMU: listens on `<dir>/<vm>.agent.sock` for the host (one client at a time, the
/// next one is accepted when the previous closes) and on `<dir>/<vm>.guest.sock` for the
/// agent's `--connect`, and pumps bytes between them. Bytes one side writes while the other
/// is absent wait for the next connection, as with a virtio-serial port.
#[derive(Debug)]
pub struct Relay {
    pub host_path: PathBuf,
    pub guest_path: PathBuf,
    /// Every byte forwarded to the agent, in order.
    pub to_guest_log: Arc<Mutex<Vec<u8>>>,
    to_host_tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Closed: the relay stops reading what the host writes.
    host_gate: Arc<Gate>,
    /// Notified: the relay drops the host's connection with whatever it had not read yet.
    host_cut: Arc<Notify>,
    /// Closed: the relay holds what the agent writes.
    guest_gate: Arc<Gate>,
    pub host_connections: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn pump(mut rx: mpsc::UnboundedReceiver<Vec<u8>>, mut cur: watch::Receiver<Option<Writer>>) {
    while let Some(bytes) = rx.recv().await {
        loop {
            let w = cur
                .wait_for(|w| w.is_some())
                .await
                .unwrap()
                .clone()
                .unwrap();
            let ok = w.lock().await.write_all(&bytes).await.is_ok();
            if ok {
                break;
            }
            let _ = cur.changed().await;
        }
    }
}

impl Relay {
    pub fn start(dir: &Path, vm: &str) -> Relay {
        let host_path = dir.join(format!("{vm}.agent.sock"));
        let guest_path = dir.join(format!("{vm}.guest.sock"));
        let host_l = UnixListener::bind(&host_path).unwrap();
        let guest_l = UnixListener::bind(&guest_path).unwrap();
        let (to_guest_tx, to_guest_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (to_host_tx, to_host_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (host_w_tx, host_w_rx) = watch::channel::<Option<Writer>>(None);
        let (guest_w_tx, guest_w_rx) = watch::channel::<Option<Writer>>(None);
        let log = Arc::new(Mutex::new(Vec::new()));
        let host_gate = Arc::new(Gate::default());
        let host_cut = Arc::new(Notify::new());
        let guest_gate = Arc::new(Gate::default());
        let host_connections = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(pump(to_host_rx, host_w_rx)));
        {
            let log = log.clone();
            let (tx, mut rx) = (to_guest_tx.clone(), to_guest_rx);
            let (ltx, lrx) = mpsc::unbounded_channel::<Vec<u8>>();
            drop(tx);
            tasks.push(tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    log.lock().unwrap().extend_from_slice(&b);
                    let _ = ltx.send(b);
                }
            }));
            tasks.push(tokio::spawn(pump(lrx, guest_w_rx)));
        }
        // Host side: one client at a time; its bytes go to the guest.
        {
            let gate = host_gate.clone();
            let cut = host_cut.clone();
            let count = host_connections.clone();
            let to_guest = to_guest_tx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let (s, _) = host_l.accept().await.unwrap();
                    count.fetch_add(1, Ordering::SeqCst);
                    let (mut rd, wr) = s.into_split();
                    host_w_tx.send_replace(Some(Arc::new(tokio::sync::Mutex::new(wr))));
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = tokio::select! {
                            _ = cut.notified() => break,
                            n = async {
                                gate.passable().await;
                                rd.read(&mut buf).await
                            } => n,
                        };
                        match n {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let _ = to_guest.send(buf[..n].to_vec());
                            }
                        }
                    }
                    host_w_tx.send_replace(None);
                }
            }));
        }
        // Guest side: the agent's --connect.
        {
            let to_host = to_host_tx.clone();
            let gate = guest_gate.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let (s, _) = guest_l.accept().await.unwrap();
                    let (mut rd, wr) = s.into_split();
                    guest_w_tx.send_replace(Some(Arc::new(tokio::sync::Mutex::new(wr))));
                    let mut buf = vec![0u8; 65536];
                    loop {
                        match rd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                // Held after the read, so that nothing read while paused
                                // slips through.
                                gate.passable().await;
                                let _ = to_host.send(buf[..n].to_vec());
                            }
                        }
                    }
                    guest_w_tx.send_replace(None);
                }
            }));
        }
        Relay {
            host_path,
            guest_path,
            to_guest_log: log,
            to_host_tx,
            host_gate,
            host_cut,
            guest_gate,
            host_connections,
            tasks,
        }
    }

    /// Stops (or resumes) reading what the host writes: the host's writes back up.
    pub fn pause_host_reads(&self, paused: bool) {
        self.host_gate.set_closed(paused);
    }

    /// Drops the host's connection as QEMU would lose it: bytes the host wrote that the relay
    /// had not read yet are gone.
    pub fn cut_host(&self) {
        self.host_cut.notify_one();
    }

    /// Stops (or resumes) passing on what the agent writes: its answers wait (in the relay,
    /// then in the agent).
    pub fn pause_guest_reads(&self, paused: bool) {
        self.guest_gate.set_closed(paused);
    }

    /// Bytes delivered to the host as if the guest had written them.
    pub fn inject_to_host(&self, bytes: Vec<u8>) {
        self.to_host_tx.send(bytes).unwrap();
    }

    /// Every envelope the agent was given, in order.
    pub fn to_guest_envelopes(&self) -> Vec<Envelope> {
        let log = self.to_guest_log.lock().unwrap().clone();
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut out = Vec::new();
        let mut at = 0;
        while at < log.len() {
            at += dec.push(&log[at..]);
            loop {
                match dec.decode() {
                    Ok(Some(p)) => out.push(decode_envelope(p).unwrap()),
                    Ok(None) => break,
                    Err(_) => continue,
                }
            }
        }
        out
    }

    /// Decoder statistics over every byte the agent was given.
    pub fn to_guest_stats(&self) -> (qx_proto::DecoderStats, Vec<&'static str>) {
        let log = self.to_guest_log.lock().unwrap().clone();
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut kinds = Vec::new();
        let mut at = 0;
        while at < log.len() {
            at += dec.push(&log[at..]);
            loop {
                match dec.decode() {
                    Ok(Some(p)) => kinds.push(qx_proto::envelope_payload_name(
                        &decode_envelope(p).unwrap(),
                    )),
                    Ok(None) => break,
                    Err(_) => continue,
                }
            }
        }
        (dec.stats(), kinds)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// -------------------------------------------------------------------------------------------
// The real agent
// -------------------------------------------------------------------------------------------

/// `target/debug/quantix-kvm-agent`, built once if missing.
pub fn agent_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
            let bin = target.join("debug/quantix-kvm-agent");
            if !bin.exists() {
                let st = Command::new(env!("CARGO"))
                    .args([
                        "build",
                        "-p",
                        "quantix-kvm-agent",
                        "--bin",
                        "quantix-kvm-agent",
                    ])
                    .status()
                    .unwrap();
                assert!(st.success(), "building the guest agent failed");
            }
            bin
        })
        .clone()
}

/// The real guest agent, connected to a relay's guest socket; killed on drop.
#[derive(Debug)]
pub struct RealAgent {
    child: Child,
    _config: tempfile::NamedTempFile,
}

impl RealAgent {
    pub fn start(guest_sock: &Path, extra: &[&str]) -> RealAgent {
        let config = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(agent_binary())
            .arg("--connect")
            .arg(format!("unix:{}", guest_sock.display()))
            .arg("--config")
            .arg(config.path())
            .args([
                "--telemetry-interval-ms",
                "200",
                "--ping-interval-ms",
                "500",
            ])
            .args(["--log-level", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        RealAgent {
            child,
            _config: config,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies without a word, like a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RealAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

// -------------------------------------------------------------------------------------------
// A codec agent for failures on demand
// -------------------------------------------------------------------------------------------

/// How the codec agent behaves after AgentReady.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers pings, never acknowledges requests.
    NeverAck,
    /// Acknowledges requests, never replies.
    AckOnly,
}

/// A minimal agent on qx_proto's codec: says AgentReady, answers pings, and handles
/// requests per [`Behaviour`]. For the failure modes the real agent does not show on demand.
pub async fn codec_agent(guest_sock: PathBuf, session_id: u64, behaviour: Behaviour) {
    let s = UnixStream::connect(&guest_sock).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let send = |env: Envelope| {
        let mut out = Vec::new();
        encode_envelope(&env, 65536, &mut out).unwrap();
        out
    };
    let ready = |id| Envelope {
        id,
        correlation_id: 0,
        payload: Some(Payload::AgentReady(AgentReady {
            protocol_version: 1,
            agent_version: "codec-agent".into(),
            session_id,
            hostname: format!("codec-{session_id}"),
            ..Default::default()
        })),
    };
    wr.write_all(&send(ready(1))).await.unwrap();
    let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut next_id = 2u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        let mut replies = Vec::new();
        loop {
            let env = match dec.decode() {
                Ok(Some(p)) => decode_envelope(p).unwrap(),
                Ok(None) => break,
                Err(_) => continue,
            };
            next_id += 1;
            match env.payload {
                Some(Payload::HostHello(_)) => replies.push(ready(next_id)),
                Some(Payload::Ping(p)) => replies.push(Envelope {
                    id: next_id,
                    correlation_id: env.id,
                    payload: Some(Payload::Pong(Pong { seq: p.seq })),
                }),
                Some(Payload::Pong(_)) => {}
                Some(_) if behaviour == Behaviour::AckOnly => replies.push(Envelope {
                    id: next_id,
                    correlation_id: env.id,
                    payload: Some(Payload::Ack(Ack {})),
                }),
                _ => {}
            }
        }
        for r in replies {
            if wr.write_all(&send(r)).await.is_err() {
                return;
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
// In-process daemon
// -------------------------------------------------------------------------------------------

/// qx-node in this process: the real service on a loopback port, with a client.
#[derive(Debug)]
pub struct Daemon {
    pub agent: Arc<AgentApi>,
    pub client: Client,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub async fn start(cfg: AgentConfig, vms: &[(&str, &Path)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let agent = Arc::new(AgentApi::new(cfg));
        for (vm, path) in vms {
            agent.manager().attach(vm, path.to_path_buf()).unwrap();
        }
        // A private, empty libvirt test driver: the VM half needs a hypervisor.
        let node = dir.path().join("node.xml");
        std::fs::write(&node, "<node/>").unwrap();
        let vm = VmApi::new(
            VmConfig {
                libvirt_uri: format!("test://{}", node.display()),
                socket_dir: dir.path().join("sock"),
                image_dir: dir.path().join("images"),
                agent_iso: None,
                ..Default::default()
            },
            agent.clone(),
        )
        .unwrap();
        let service = NodeService {
            vm: Arc::new(vm),
            agent: agent.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = qx_node::listen::grpc_server()
                .add_service(NodeDaemonServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        let client = NodeDaemonServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Daemon {
            agent,
            client,
            server,
            _dir: dir,
        }
    }

    /// Polls until `vm`'s agent is connected with a session other than `not`; returns it.
    pub async fn wait_connected(&mut self, vm: &str, not: u64) -> pb::GuestAgentInfo {
        for _ in 0..600 {
            if let Ok(r) = self
                .client
                .get_agent_info(pb::AgentRequest {
                    vm_id: vm.into(),
                    timeout_ms: 0,
                })
                .await
            {
                let info = r.into_inner();
                if info.connected && info.session_id != 0 && info.session_id != not {
                    return info;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("agent of {vm} never connected");
    }

    pub async fn ping(&mut self, vm: &str) -> Result<pb::PingAgentResponse, tonic::Status> {
        self.client
            .ping_agent(pb::AgentRequest {
                vm_id: vm.into(),
                timeout_ms: 0,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn stats(&mut self, vm: &str) -> pb::AgentConnectionStats {
        self.client
            .get_agent_connection_stats(pb::AgentStatsRequest { vm_id: vm.into() })
            .await
            .unwrap()
            .into_inner()
            .connections
            .remove(0)
    }

    /// Stops serving and drops the agent links (the daemon "exits").
    pub fn stop(self) {
        self.server.abort();
    }
}

/// A valid frame header that claims a 1 MiB payload, over the host's frame limit: what a
/// hostile agent sends to make the host buffer or skip.
pub fn oversized_header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&qx_proto::MAGIC);
    h[4..8].copy_from_slice(&(1u32 << 20).to_be_bytes());
    h[8..12].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    let c = qx_proto::codec::crc32c(&h[..12]);
    h[12..16].copy_from_slice(&c.to_be_bytes());
    h
}
