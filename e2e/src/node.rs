//! The real `qx-node` daemon as a child process, and a gRPC client to it.
//!
//! The binary is the one cargo built for the workspace (`target/{debug,release}/qx-node`, or
//! `QX_NODE_BIN`): build it with `cargo build -p qx-node --bins` before the tests. The daemon
//! listens on a free loopback port and is killed by pid on drop; its log is printed when the
//! test that owned it failed.

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use qx_node::pb::node_daemon_service_client::NodeDaemonServiceClient;
use thiserror::Error;
use tonic::transport::Channel;

use crate::image::target_dir;

/// The daemon's gRPC client type.
pub type Client = NodeDaemonServiceClient<Channel>;

const STARTUP_TIMEOUT_MS: u64 = 20_000;
const POLL_INTERVAL_MS: u64 = 50;

/// Failures starting the daemon.
#[derive(Debug, Error)]
pub enum NodeError {
    #[error("qx-node binary not found at {0} (run `cargo build -p qx-node --bins`)")]
    NoBinary(PathBuf),
    #[error("cannot pick a free loopback port")]
    Port(#[source] std::io::Error),
    #[error("cannot start qx-node")]
    Spawn(#[source] std::io::Error),
    #[error("qx-node did not answer on {addr} within the timeout; log:\n{log}")]
    NotListening { addr: String, log: String },
    #[error("qx-node exited at start-up; log:\n{0}")]
    Exited(String),
}

/// Where the `qx-node` (or `qxctl`) binary is.
pub fn host_binary(name: &str) -> Result<PathBuf, NodeError> {
    let var = format!("QX_{}_BIN", name.replace('-', "_").to_uppercase());
    if let Some(p) = std::env::var_os(var) {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        target_dir().join("debug").join(name),
        target_dir().join("release").join(name),
    ];
    candidates
        .iter()
        .filter(|p| p.exists())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .cloned()
        .ok_or_else(|| NodeError::NoBinary(candidates[0].clone()))
}

/// A running qx-node.
#[derive(Debug)]
pub struct Node {
    child: Child,
    pub addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts qx-node with `args` (e.g. `--vm-socket vm1=/path`) plus a loopback listen
    /// address, and waits until its gRPC port accepts connections.
    pub fn start(args: &[String]) -> anyhow::Result<Self> {
        let bin = host_binary("qx-node")?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(NodeError::Port)?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let dir = tempfile::Builder::new().prefix("qx-node-").tempdir()?;
        let log = dir.path().join("qx-node.log");
        let mut cmd = Command::new(bin);
        crate::sys::kill_with_parent(&mut cmd);
        let child = cmd
            .arg("--listen")
            .arg(&listen)
            // Plain loopback TCP: the harness's own throw-away daemon.
            .arg("--insecure-listen")
            // The VMs are QEMU processes the harness owns, not libvirt domains.
            .args(["--libvirt-uri", "none"])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(fs::File::create(&log)?))
            .stderr(Stdio::from(fs::File::options().append(true).open(&log)?))
            .spawn()
            .map_err(NodeError::Spawn)?;
        let mut node = Self {
            child,
            addr: listen,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_millis(STARTUP_TIMEOUT_MS);
        loop {
            if std::net::TcpStream::connect(&node.addr).is_ok() {
                return Ok(node);
            }
            if node.child.try_wait()?.is_some() {
                return Err(NodeError::Exited(node.log_text()).into());
            }
            if Instant::now() > deadline {
                return Err(NodeError::NotListening {
                    addr: node.addr.clone(),
                    log: node.log_text(),
                }
                .into());
            }
            thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
    }

    /// A connected gRPC client.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(NodeDaemonServiceClient::connect(format!("http://{}", self.addr)).await?)
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "---- qx-node log (pid {}) ----\n{}\n---- end of qx-node log ----",
                self.pid(),
                self.log_text()
            );
        }
    }
}
