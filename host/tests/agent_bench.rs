//! Benchmarks, not tests (ignored by default): one real `qx-node` process against many
//! simulated agents. Figures are printed, never asserted; docs/benchmarks.md ("Host daemon")
//! records them with the method.
//!
//! - `bench_one_daemon_many_agents` (`QX_BENCH_AGENTS`, default 10,000): the daemon's RSS per
//!   agent link, the time until every link is connected, then `QX_BENCH_CLIENTS` (64)
//!   concurrent gRPC clients issuing `PingAgent` and a small `ExecuteInGuest` to random VMs
//!   for `QX_BENCH_SECS` (10) seconds: calls/s, p50/p99 of each.
//! - `bench_honest_against_hostile` (`QX_BENCH_HOSTILE_AGENTS`, default 1,000): the same
//!   number of agents twice, back to back: all honest, then with 10 hostile ones attacking at
//!   full rate (oversized frames, garbage, session-id flapping, reconnect storms). The
//!   daemon's RSS (largest sample) and the honest VMs' `PingAgent` p50/p99 under
//!   `QX_BENCH_PING_CLIENTS` (8) concurrent clients, side by side.
//!
//! Run: `cargo build --release -p qx-node --bin qx-node && QX_NODE_BIN=$PWD/target/release/qx-node
//! cargo test -p qx-node --release --test agent_bench -- --ignored --nocapture --test-threads=1 bench_`
//!
//! The simulated agents run in child processes (this test binary again, running the ignored
//! `sim_agent_process` with `QX_BENCH_SIM` set), at most `AGENTS_PER_PROCESS` each: an agent
//! holds a listening socket and an accepted one, and one process may hold only so many
//! descriptors. Each agent listens on `<dir>/<vm>.agent.sock` (it plays QEMU's chardev and
//! the agent at once), says AgentReady, answers HostHello, pings and execs. The daemon is the
//! real `qx-node` binary in its own process, bound to every socket by a config file, so its
//! RSS is its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use qx_node::pb;
use qx_node::pb::node_daemon_service_client::NodeDaemonServiceClient;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{
    Ack, AgentReady, Envelope, ExecExit, ExecRequest, FilesystemUsage, Pong, Telemetry,
};
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

type Client = NodeDaemonServiceClient<tonic::transport::Channel>;

/// Simulated agents per child process: two descriptors each.
const AGENTS_PER_PROCESS: usize = 2_500;
/// In the hostile run, every this many agents one is hostile (10 of 1,000).
const HOSTILE_EVERY: usize = 100;
/// Set in a child process: `DIR FIRST COUNT HOSTILE_EVERY` (0: none hostile).
const SIM_ENV: &str = "QX_BENCH_SIM";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn frame(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::new();
    encode_envelope(env, 4 << 20, &mut out).unwrap();
    out
}

fn vm_name(i: usize) -> String {
    format!("sim-{i:05}")
}

fn is_hostile(i: usize, every: usize) -> bool {
    every > 0 && i % every == every / 2
}

// -------------------------------------------------------------------------------------------
// Simulated agents (in the child processes)
// -------------------------------------------------------------------------------------------

fn ready_frame(id: u64, session_id: u64) -> Vec<u8> {
    frame(&Envelope {
        id,
        correlation_id: 0,
        payload: Some(Payload::AgentReady(AgentReady {
            protocol_version: 1,
            agent_version: "sim".into(),
            session_id,
            capabilities: vec!["ping".into(), "exec".into()],
            ..Default::default()
        })),
    })
}

/// An honest agent: accepts the host, says AgentReady, answers HostHello, pings and execs
/// (Ack, then an ExecExit with two bytes of output).
async fn honest_agent(listener: UnixListener, session_id: u64) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let (mut rd, mut wr) = s.into_split();
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut id = 1u64;
        if wr.write_all(&ready_frame(id, session_id)).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 16 * 1024];
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
                let reply = |payload| Envelope {
                    id,
                    correlation_id: env.id,
                    payload: Some(payload),
                };
                match env.payload {
                    Some(Payload::HostHello(_)) => out.extend(ready_frame(id, session_id)),
                    Some(Payload::Ping(p)) => {
                        out.extend(frame(&reply(Payload::Pong(Pong { seq: p.seq }))))
                    }
                    Some(Payload::ExecRequest(_)) => {
                        out.extend(frame(&reply(Payload::Ack(Ack {}))));
                        id += 1;
                        out.extend(frame(&Envelope {
                            id,
                            correlation_id: env.id,
                            payload: Some(Payload::ExecExit(ExecExit {
                                exited: true,
                                exit_code: 0,
                                stdout: b"ok".to_vec(),
                                ..Default::default()
                            })),
                        }));
                    }
                    _ => {}
                }
            }
            if !out.is_empty() && wr.write_all(&out).await.is_err() {
                break 'conn;
            }
        }
    }
}

/// What a hostile agent sends, over and over, as fast as the socket takes it.
#[derive(Debug, Clone, Copy)]
enum Attack {
    /// Valid headers claiming 1 MiB payloads (over the host's frame limit), with filler.
    Oversized,
    /// Bytes that never make a frame.
    Garbage,
    /// AgentReady frames alternating two session ids.
    Flapping,
    /// AgentReady, then a message over the field limits: the host resets the connection,
    /// and the agent accepts the next one at once.
    ReconnectStorm,
}

fn attack_bytes(attack: Attack) -> Vec<u8> {
    match attack {
        Attack::Oversized => {
            let mut out = Vec::new();
            while out.len() < 64 * 1024 {
                out.extend_from_slice(&agent_support::oversized_header());
                out.extend(std::iter::repeat_n(0x5a, 1024));
            }
            out
        }
        Attack::Garbage => (0..64 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
        Attack::Flapping => {
            let mut out = Vec::new();
            let mut i = 0u64;
            while out.len() < 64 * 1024 {
                out.extend(ready_frame(1000 + i, 0xbad0 + i % 2));
                i += 1;
            }
            out
        }
        Attack::ReconnectStorm => {
            let fs = (0..2_000).map(|_| FilesystemUsage::default()).collect();
            frame(&Envelope {
                id: 7,
                correlation_id: 0,
                payload: Some(Payload::Telemetry(Telemetry {
                    filesystems: fs,
                    ..Default::default()
                })),
            })
        }
    }
}

/// A hostile agent: says AgentReady on every connection, then attacks until the host hangs
/// up; what the host sends is read and dropped (a host whose writes stall would give up on
/// its own, which is not the attack measured here).
async fn hostile_agent(listener: UnixListener, session_id: u64, attack: Attack) {
    let bytes = Arc::new(attack_bytes(attack));
    loop {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let (mut rd, mut wr) = s.into_split();
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        if wr.write_all(&ready_frame(1, session_id)).await.is_ok() {
            while wr.write_all(&bytes).await.is_ok() {
                if let Attack::ReconnectStorm = attack {
                    // Once is enough: the host resets the connection.
                    let _ = drain.await;
                    break;
                }
            }
        }
    }
}

/// The child process's body: binds its agents' sockets, says `sim-ready`, and serves them
/// until its stdin closes (the bench ended, or died).
#[test]
#[ignore = "the benchmarks' agent process: started by them, does nothing on its own"]
fn sim_agent_process() {
    let Ok(spec) = std::env::var(SIM_ENV) else {
        return;
    };
    let _ = qx_node::sys::raise_nofile_limit();
    let mut f = spec.split(' ');
    let dir = PathBuf::from(f.next().unwrap());
    let first: usize = f.next().unwrap().parse().unwrap();
    let count: usize = f.next().unwrap().parse().unwrap();
    let every: usize = f.next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut hostile = 0usize;
        for i in first..first + count {
            let path = dir.join(format!("{}.agent.sock", vm_name(i)));
            let l = UnixListener::bind(&path).unwrap();
            let session = 0x1000 + i as u64;
            if is_hostile(i, every) {
                let attack = [
                    Attack::Oversized,
                    Attack::Garbage,
                    Attack::Flapping,
                    Attack::ReconnectStorm,
                ][hostile % 4];
                hostile += 1;
                tokio::spawn(hostile_agent(l, session, attack));
            } else {
                tokio::spawn(honest_agent(l, session));
            }
        }
        println!("sim-ready");
        let stdin = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while matches!(std::io::stdin().read_line(&mut sink), Ok(n) if n > 0) {
                sink.clear();
            }
        });
        let _ = stdin.await;
    });
}

/// The child processes of one run; killed when dropped.
struct Sims(Vec<Child>);

impl Drop for Sims {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `agents` simulated agents in `dir` over enough child processes; returns once every
/// socket is bound.
fn start_sims(dir: &Path, agents: usize, hostile_every: usize) -> Sims {
    let exe = std::env::current_exe().unwrap();
    let mut sims = Sims(Vec::new());
    let mut first = 0;
    while first < agents {
        let count = AGENTS_PER_PROCESS.min(agents - first);
        let child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "sim_agent_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                SIM_ENV,
                format!("{} {first} {count} {hostile_every}", dir.display()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        sims.0.push(child);
        first += count;
    }
    for c in &mut sims.0 {
        let out = c.stdout.take().unwrap();
        let ready = BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            // libtest prints the test's name first on the same line.
            .any(|l| l.ends_with("sim-ready"));
        assert!(ready, "an agent process ended before binding its sockets");
    }
    sims
}

// -------------------------------------------------------------------------------------------
// The daemon
// -------------------------------------------------------------------------------------------

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_node(dir: &Path, name: &str, vms: &[String]) -> (Node, String) {
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
    for vm in vms {
        cfg.push_str(&format!(
            "\"{vm}\" = \"{}\"\n",
            dir.join(format!("{vm}.agent.sock")).display()
        ));
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

async fn client_for(addr: &str) -> Client {
    for _ in 0..600 {
        if let Ok(c) = NodeDaemonServiceClient::connect(format!("http://{addr}")).await {
            return c.max_decoding_message_size(256 << 20);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("qx-node never listened on {addr}");
}

async fn all_stats(client: &mut Client) -> Vec<pb::AgentConnectionStats> {
    client
        .get_agent_connection_stats(pb::AgentStatsRequest::default())
        .await
        .map(|r| r.into_inner().connections)
        .unwrap_or_default()
}

/// Polls the daemon's own view until `want` of the VMs `counted` are connected; returns how
/// long that took from `t0`.
async fn wait_connected(
    client: &mut Client,
    want: usize,
    counted: impl Fn(&str) -> bool,
    t0: Instant,
) -> Duration {
    loop {
        let n = all_stats(client)
            .await
            .iter()
            .filter(|c| c.connected && counted(&c.vm_id))
            .count();
        if n >= want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "only {n} of {want} agents connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// -------------------------------------------------------------------------------------------
// The load
// -------------------------------------------------------------------------------------------

/// Latencies of one kind of call, in microseconds.
#[derive(Default)]
struct Lat(Vec<u64>);

impl Lat {
    fn pct(&mut self, p: f64) -> f64 {
        self.0.sort_unstable();
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0[((self.0.len() as f64 * p) as usize).min(self.0.len() - 1)] as f64 / 1000.0
    }
}

/// `clients` gRPC clients (one HTTP/2 connection each), each issuing calls back to back for
/// `secs` seconds to VMs picked at random from `vms`: `PingAgent`, or, with probability
/// `exec_share`, an `ExecuteInGuest` of `/bin/true` collected. Returns (ping, exec)
/// latencies, calls failed, and the time the load ran.
async fn load(
    addr: &str,
    vms: Arc<Vec<String>>,
    clients: usize,
    secs: u64,
    exec_share: f64,
) -> (Lat, Lat, u64, Duration) {
    let failed = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(client_for(addr).await);
    }
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (n, mut c) in conns.into_iter().enumerate() {
        let (vms, failed) = (vms.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ping, mut exec) = (Vec::new(), Vec::new());
            let mut x =
                0x9e37_79b9_7f4a_7c15u64 ^ (n as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
            while Instant::now() < until {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let vm = vms[(x % vms.len() as u64) as usize].clone();
                let do_exec = ((x >> 40) as f64 / (1u64 << 24) as f64) < exec_share;
                let t = Instant::now();
                let ok = if do_exec {
                    c.execute_in_guest(pb::ExecuteInGuestRequest {
                        vm_id: vm,
                        exec: Some(ExecRequest {
                            argv: vec!["/bin/true".into()],
                            ..Default::default()
                        }),
                        timeout_ms: 10_000,
                    })
                    .await
                    .is_ok()
                } else {
                    c.ping_agent(pb::AgentRequest {
                        vm_id: vm,
                        timeout_ms: 10_000,
                    })
                    .await
                    .is_ok()
                };
                let us = t.elapsed().as_micros() as u64;
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                } else if do_exec {
                    exec.push(us);
                } else {
                    ping.push(us);
                }
            }
            (ping, exec)
        }));
    }
    let (mut ping, mut exec) = (Lat::default(), Lat::default());
    for t in tasks {
        let (p, e) = t.await.unwrap();
        ping.0.extend(p);
        exec.0.extend(e);
    }
    let ran = t0.elapsed();
    (ping, exec, failed.load(Ordering::Relaxed), ran)
}

/// Samples a process's RSS every 200 ms until dropped; the largest sample.
struct RssPeak {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    fn start(pid: u32) -> RssPeak {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        RssPeak { peak, task }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// RSS of the daemon bound to no VM, after it settled.
async fn baseline_rss(dir: &Path) -> u64 {
    let (base, base_addr) = start_node(dir, "base", &[]);
    client_for(&base_addr).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    rss_kib(base.0.id())
}

// -------------------------------------------------------------------------------------------
// The benchmarks
// -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_one_daemon_many_agents() {
    let agents = env_usize("QX_BENCH_AGENTS", 10_000);
    let clients = env_usize("QX_BENCH_CLIENTS", 64);
    let secs = env_usize("QX_BENCH_SECS", 10) as u64;
    let dir = tempfile::tempdir().unwrap();
    let vms: Vec<String> = (0..agents).map(vm_name).collect();
    let sims = start_sims(dir.path(), agents, 0);
    let rss_base = baseline_rss(dir.path()).await;

    let load_before = load_average();
    let t0 = Instant::now();
    let (node, addr) = start_node(dir.path(), "full", &vms);
    let pid = node.0.id();
    let mut client = client_for(&addr).await;
    let connect_all = wait_connected(&mut client, agents, |_| true, t0).await;
    // Let the links settle through a few keep-alive pings.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_full = rss_kib(pid);
    let per_agent = rss_full.saturating_sub(rss_base) as f64 / agents as f64;
    println!(
        "scale: agents={agents} processes={} load_before=[{load_before}] connect_all={:.2}s \
         rss_base={rss_base}KiB rss_full={rss_full}KiB rss_per_agent={per_agent:.2}KiB",
        sims.0.len(),
        connect_all.as_secs_f64(),
    );

    let load_at = load_average();
    let cpu0 = cpu_ticks(pid);
    let peak = RssPeak::start(pid);
    let (mut ping, mut exec, failed, ran) = load(&addr, Arc::new(vms), clients, secs, 0.5).await;
    let cpu = cpu_ticks(pid) - cpu0;
    let calls = ping.0.len() + exec.0.len();
    println!(
        "load: clients={clients} secs={:.1} load_at_start=[{load_at}] load_at_end=[{}] \
         calls={calls} calls_per_s={:.0} failed={failed} ping_n={} ping_p50={:.2}ms \
         ping_p99={:.2}ms exec_n={} exec_p50={:.2}ms exec_p99={:.2}ms \
         daemon_cpu={:.1}s rss_peak={}KiB",
        ran.as_secs_f64(),
        load_average(),
        calls as f64 / ran.as_secs_f64(),
        ping.0.len(),
        ping.pct(0.50),
        ping.pct(0.99),
        exec.0.len(),
        exec.pct(0.50),
        exec.pct(0.99),
        cpu as f64 / 100.0,
        peak.peak(),
    );
    let connected = all_stats(&mut client)
        .await
        .iter()
        .filter(|c| c.connected)
        .count();
    println!("after: connected={connected} of {agents}");
    drop(sims);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_honest_against_hostile() {
    let agents = env_usize("QX_BENCH_HOSTILE_AGENTS", 1_000);
    let clients = env_usize("QX_BENCH_PING_CLIENTS", 8);
    let secs = env_usize("QX_BENCH_SECS", 10) as u64;
    let rounds = env_usize("QX_BENCH_ROUNDS", 2);
    let vms: Vec<String> = (0..agents).map(vm_name).collect();
    let honest: Vec<String> = (0..agents)
        .filter(|&i| !is_hostile(i, HOSTILE_EVERY))
        .map(vm_name)
        .collect();
    let honest = Arc::new(honest);
    for round in 0..rounds {
        for every in [0, HOSTILE_EVERY] {
            let label = if every == 0 { "honest" } else { "hostile" };
            let dir = tempfile::tempdir().unwrap();
            let sims = start_sims(dir.path(), agents, every);
            let load_before = load_average();
            let t0 = Instant::now();
            let (node, addr) = start_node(dir.path(), "node", &vms);
            let pid = node.0.id();
            let peak = RssPeak::start(pid);
            let mut client = client_for(&addr).await;
            let hostile_set: std::collections::HashSet<String> = (0..agents)
                .filter(|&i| is_hostile(i, every))
                .map(vm_name)
                .collect();
            let connect = wait_connected(
                &mut client,
                honest.len(),
                |vm| !hostile_set.contains(vm),
                t0,
            )
            .await;
            // The attack runs from the first connection on; the links settle meanwhile.
            tokio::time::sleep(Duration::from_secs(6)).await;
            let rss_settled = rss_kib(pid);
            let cpu0 = cpu_ticks(pid);
            let (mut ping, _, failed, ran) = load(&addr, honest.clone(), clients, secs, 0.0).await;
            let cpu = cpu_ticks(pid) - cpu0;
            let rss_end = rss_kib(pid);
            let stats = all_stats(&mut client).await;
            let of_hostile = |f: fn(&pb::AgentConnectionStats) -> u64| -> u64 {
                stats
                    .iter()
                    .filter(|s| hostile_set.contains(&s.vm_id))
                    .map(f)
                    .sum()
            };
            let honest_connected = stats
                .iter()
                .filter(|s| s.connected && !hostile_set.contains(&s.vm_id))
                .count();
            println!(
                "{label} round={round} agents={agents} hostile={} load_before=[{load_before}] \
                 load_end=[{}] connect={:.2}s rss_settled={rss_settled}KiB rss_end={rss_end}KiB \
                 rss_peak={}KiB pings={} failed={failed} calls_per_s={:.0} ping_p50={:.3}ms \
                 ping_p99={:.3}ms daemon_cpu={:.1}s honest_connected={honest_connected} \
                 hostile: garbage_bytes={} bad_frames={} protocol_errors={} reconnects={} \
                 restarts={} rx_bytes={}",
                hostile_set.len(),
                load_average(),
                connect.as_secs_f64(),
                peak.peak(),
                ping.0.len(),
                ping.0.len() as f64 / ran.as_secs_f64(),
                ping.pct(0.50),
                ping.pct(0.99),
                cpu as f64 / 100.0,
                of_hostile(|s| s.garbage_bytes),
                of_hostile(|s| s.bad_frames),
                of_hostile(|s| s.protocol_errors),
                of_hostile(|s| s.reconnects),
                of_hostile(|s| s.agent_restarts),
                of_hostile(|s| s.rx.iter().map(|f| f.bytes).sum()),
            );
            drop(peak);
            drop(node);
            drop(sims);
        }
    }
}
