//! Benchmark, not a test (ignored by default): one qx-node process with N simulated agents
//! over unix sockets. Reports the daemon's RSS per agent connection and PingAgent latency
//! (p50/p99) through gRPC while every link is up and pinged by the daemon.
//!
//! Run: `cargo test -p qx-node --release --test agent_bench -- --ignored --nocapture`
//! (`QX_BENCH_AGENTS` = number of agents, default 1000; `QX_BENCH_PINGS`, default 5000).
//!
//! Each simulated agent listens on `<dir>/<vm>.agent.sock` in this process (it plays QEMU's
//! chardev and the agent at once), says AgentReady, and answers pings. The daemon is the real
//! `qx-node` binary in its own process, bound to every socket by a config file, so its RSS is
//! its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qx_node::pb;
use qx_node::pb::node_daemon_service_client::NodeDaemonServiceClient;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{AgentReady, Envelope, Pong};
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn frame(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::new();
    encode_envelope(env, 65536, &mut out).unwrap();
    out
}

/// One simulated agent: accepts the host, says AgentReady, answers HostHello and pings.
async fn sim_agent(listener: UnixListener, session_id: u64) {
    let ready = |id| {
        frame(&Envelope {
            id,
            correlation_id: 0,
            payload: Some(Payload::AgentReady(AgentReady {
                protocol_version: 1,
                agent_version: "sim".into(),
                session_id,
                capabilities: vec!["ping".into()],
                ..Default::default()
            })),
        })
    };
    loop {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let (mut rd, mut wr) = s.into_split();
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut id = 1u64;
        if wr.write_all(&ready(id)).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        'conn: loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            dec.push(&buf[..n]);
            let mut out = Vec::new();
            loop {
                let env = match dec.decode() {
                    Ok(Some(p)) => decode_envelope(p).unwrap(),
                    Ok(None) => break,
                    Err(_) => continue,
                };
                id += 1;
                match env.payload {
                    Some(Payload::HostHello(_)) => out.extend(ready(id)),
                    Some(Payload::Ping(p)) => out.extend(frame(&Envelope {
                        id,
                        correlation_id: env.id,
                        payload: Some(Payload::Pong(Pong { seq: p.seq })),
                    })),
                    _ => {}
                }
            }
            if !out.is_empty() && wr.write_all(&out).await.is_err() {
                break 'conn;
            }
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_node(dir: &Path, name: &str, vms: &[(String, std::path::PathBuf)]) -> (Node, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut cfg = format!(
        "listen = \"{addr}\"\nlibvirt_uri = \"none\"\nagent_socket_dir = \"{}\"\nimage_dir = \"{}\"\n[vm_sockets]\n",
        dir.join("none").display(),
        dir.join("images").display()
    );
    for (vm, path) in vms {
        cfg.push_str(&format!("\"{vm}\" = \"{}\"\n", path.display()));
    }
    let cfg_path = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg_path, cfg).unwrap();
    let bin = std::env::var("QX_NODE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_qx-node").into());
    let child = Command::new(bin)
        .arg("--config")
        .arg(&cfg_path)
        // Plain loopback TCP for the benchmark's own throw-away daemon.
        .arg("--insecure-listen")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    (Node(child), addr)
}

async fn connected_count(client: &mut NodeDaemonServiceClient<tonic::transport::Channel>) -> usize {
    client
        .get_agent_connection_stats(pb::AgentStatsRequest::default())
        .await
        .map(|r| {
            r.into_inner()
                .connections
                .iter()
                .filter(|c| c.connected)
                .count()
        })
        .unwrap_or(0)
}

async fn client_for(addr: &str) -> NodeDaemonServiceClient<tonic::transport::Channel> {
    for _ in 0..600 {
        if let Ok(c) = NodeDaemonServiceClient::connect(format!("http://{addr}")).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("qx-node never listened on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_one_daemon_many_agents() {
    let agents = env_usize("QX_BENCH_AGENTS", 1000);
    let pings = env_usize("QX_BENCH_PINGS", 5000);
    let dir = tempfile::tempdir().unwrap();
    let mut vms = Vec::new();
    for i in 0..agents {
        let vm = format!("sim-{i:04}");
        let path = dir.path().join(format!("{vm}.agent.sock"));
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(sim_agent(l, 0x1000 + i as u64));
        vms.push((vm, path));
    }

    // Baseline: the same daemon with no VMs.
    let (base, base_addr) = start_node(dir.path(), "base", &[]);
    client_for(&base_addr).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_base = rss_kib(base.0.id());
    drop(base);

    let (node, addr) = start_node(dir.path(), "full", &vms);
    let mut client = client_for(&addr).await;
    let t0 = Instant::now();
    while connected_count(&mut client).await < agents {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "agents did not all connect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_all = t0.elapsed();
    // Let the links settle through a few keep-alive pings.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_full = rss_kib(node.0.id());

    let mut lat = Vec::with_capacity(pings);
    for i in 0..pings {
        let vm = &vms[(i * 7919) % agents].0;
        let t = Instant::now();
        client
            .ping_agent(pb::AgentRequest {
                vm_id: vm.clone(),
                timeout_ms: 5000,
            })
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let per_conn = (rss_full.saturating_sub(rss_base)) as f64 / agents as f64;
    println!(
        "agents={agents} connect_all={:.2}s rss_base={rss_base}KiB rss_full={rss_full}KiB \
         rss_per_connection={per_conn:.1}KiB ping_p50={:?} ping_p99={:?} pings={pings}",
        connect_all.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    );
    assert_eq!(connected_count(&mut client).await, agents);
}
