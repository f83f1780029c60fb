//! A hostile guest against the real daemon: a fake agent that speaks the real codec on the
//! VM's agent socket and sends what root in a compromised guest could write. Each test asserts
//! a bound from the daemon's own accounting (`GetAgentConnectionStats`) or from the effect on
//! another VM, never from timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use agent_support::{fast_config, Daemon};
use qx_node::pb;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{Ack, AgentReady, Envelope, FilesystemUsage, Pong, Telemetry, TimeInfo};
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Mutex};

/// One connection of the daemon to the hostile agent. Pings are answered in the background
/// (so the link stays alive) and every other frame from the host is handed to the test.
struct Conn {
    wr: Arc<Mutex<OwnedWriteHalf>>,
    from_host: mpsc::UnboundedReceiver<Envelope>,
    next_id: u64,
    /// Owns the read half: aborted on drop, which closes the socket.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn frame(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::new();
    encode_envelope(env, 4 << 20, &mut out).unwrap();
    out
}

impl Conn {
    /// Accepts the daemon's next connection.
    async fn accept(l: &UnixListener) -> Conn {
        let (s, _) = l.accept().await.unwrap();
        let (mut rd, wr) = s.into_split();
        let wr = Arc::new(Mutex::new(wr));
        let (tx, from_host) = mpsc::unbounded_channel();
        let pong_wr = wr.clone();
        let reader = tokio::spawn(async move {
            let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut at = 0;
                while at < n {
                    at += dec.push(&buf[at..n]);
                    loop {
                        let env = match dec.decode() {
                            Ok(Some(p)) => decode_envelope(p).unwrap(),
                            Ok(None) => break,
                            Err(_) => continue,
                        };
                        if let Some(Payload::Ping(p)) = &env.payload {
                            let pong = Envelope {
                                id: (1 << 40) | env.id,
                                correlation_id: env.id,
                                payload: Some(Payload::Pong(Pong { seq: p.seq })),
                            };
                            let _ = pong_wr.lock().await.write_all(&frame(&pong)).await;
                        } else {
                            let _ = tx.send(env);
                        }
                    }
                }
            }
        });
        Conn {
            wr,
            from_host,
            next_id: 1,
            reader,
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> bool {
        self.wr.lock().await.write_all(bytes).await.is_ok()
    }

    async fn send(&mut self, correlation_id: u64, payload: Payload) -> bool {
        self.next_id += 1;
        let env = Envelope {
            id: self.next_id,
            correlation_id,
            payload: Some(payload),
        };
        self.send_raw(&frame(&env)).await
    }

    /// Waits for HostHello, then announces itself.
    async fn handshake(&mut self, ready: AgentReady) {
        loop {
            let env = self.from_host.recv().await.expect("host hung up");
            if matches!(env.payload, Some(Payload::HostHello(_))) {
                break;
            }
        }
        self.send(0, Payload::AgentReady(ready)).await;
    }

    /// The next request from the host that is not a ping.
    async fn request(&mut self) -> Envelope {
        self.from_host.recv().await.expect("host hung up")
    }
}

fn ready(session_id: u64, hostname: &str) -> AgentReady {
    AgentReady {
        protocol_version: 1,
        agent_version: "hostile-agent".into(),
        session_id,
        hostname: hostname.into(),
        ..Default::default()
    }
}

fn telemetry(hostname: &str, filesystems: Vec<FilesystemUsage>) -> Payload {
    Payload::Telemetry(Telemetry {
        hostname: hostname.into(),
        filesystems,
        ..Default::default()
    })
}

/// A listener on `<dir>/<vm>.agent.sock`, where the daemon connects.
fn listen(dir: &Path, vm: &str) -> (UnixListener, PathBuf) {
    let path = dir.join(format!("{vm}.agent.sock"));
    (UnixListener::bind(&path).unwrap(), path)
}

async fn info(d: &mut Daemon, vm: &str) -> pb::GuestAgentInfo {
    d.client
        .get_agent_info(pb::AgentRequest {
            vm_id: vm.into(),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls until `vm`'s reported hostname is `name` (a frame sent after the attack was
/// processed, so the attack was too).
async fn wait_hostname(d: &mut Daemon, vm: &str, name: &str) -> pb::GuestAgentInfo {
    for _ in 0..1200 {
        let i = info(d, vm).await;
        if i.hostname == name {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{vm} never reported hostname {name:?}");
}

fn rx_frames(stats: &pb::AgentConnectionStats, kind: &str) -> (u64, u64) {
    stats
        .rx
        .iter()
        .find(|c| c.kind == kind)
        .map(|c| (c.frames, c.bytes))
        .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_larger_than_the_agent_may_send_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listen(dir.path(), "h13");
    let mut d = Daemon::start(fast_config(None), &[("h13", &path)]).await;
    let mut c = Conn::accept(&l).await;
    c.handshake(ready(1, "before")).await;
    wait_hostname(&mut d, "h13", "before").await;

    // 200 KiB of plausible filesystems: every field within its limit, the frame not.
    let fs = (0..50)
        .map(|i| FilesystemUsage {
            mountpoint: format!("/{i}{}", "m".repeat(4000)),
            total_bytes: 1,
            ..Default::default()
        })
        .collect();
    c.send(0, telemetry("oversized", fs)).await;
    c.send(0, telemetry("after", Vec::new())).await;
    let i = wait_hostname(&mut d, "h13", "after").await;

    let stats = d.stats("h13").await;
    let (frames, bytes) = rx_frames(&stats, "telemetry");
    assert_eq!(
        frames, 1,
        "only the small telemetry frame was accepted: {stats:?}"
    );
    assert!(bytes < 1024, "{bytes} telemetry bytes accepted");
    assert!(stats.bad_frames >= 1, "the oversized header was counted");
    assert_eq!(i.resource_usage.unwrap_or_default().disk_total_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_giant_repeated_field_is_a_protocol_error_and_never_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listen(dir.path(), "h13r");
    let mut d = Daemon::start(fast_config(None), &[("h13r", &path)]).await;
    // Every connection: AgentReady, then (first connection only) 15,000 tiny filesystem
    // entries in one 60 KB frame, then a marker telemetry naming the connection.
    tokio::spawn(async move {
        let mut kept = Vec::new();
        for n in 0u64.. {
            let mut c = Conn::accept(&l).await;
            c.handshake(ready(7, "ready")).await;
            if n == 0 {
                let fs = (0..15_000)
                    .map(|_| FilesystemUsage {
                        total_bytes: 1,
                        ..Default::default()
                    })
                    .collect();
                c.send(0, telemetry("giant", fs)).await;
            }
            c.send(0, telemetry(&format!("after-{n}"), Vec::new()))
                .await;
            // Kept open (and its pings answered) while the test runs.
            kept.push(c);
        }
    });
    let mut i = info(&mut d, "h13r").await;
    for _ in 0..1200 {
        i = info(&mut d, "h13r").await;
        if i.hostname.starts_with("after-") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(i.hostname.starts_with("after-"), "{i:?}");
    let usage = i.resource_usage.unwrap_or_default();
    assert_eq!(
        usage.disk_total_bytes, 0,
        "the 15,000-entry telemetry was cached"
    );
    let stats = d.stats("h13r").await;
    let (frames, bytes) = rx_frames(&stats, "telemetry");
    assert!(
        bytes < 1024,
        "the daemon took in {bytes} telemetry bytes in {frames} frames: the giant frame was accepted"
    );
    assert!(stats.reconnects >= 1, "the link was reset: {stats:?}");
    assert_eq!(stats.protocol_errors, 1, "{stats:?}");
    assert!(
        stats.last_error.contains("filesystems"),
        "{}",
        stats.last_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_session_id_cannot_evict_another_vms_events() {
    let dir = tempfile::tempdir().unwrap();
    let (good_l, good_path) = listen(dir.path(), "good13");
    let (bad_l, bad_path) = listen(dir.path(), "bad13");
    let mut d = Daemon::start(
        fast_config(None),
        &[("good13", &good_path), ("bad13", &bad_path)],
    )
    .await;
    let mut good = Conn::accept(&good_l).await;
    good.handshake(ready(1, "good")).await;
    wait_hostname(&mut d, "good13", "good").await;

    // 20,000 AgentReady frames alternating two session ids, in one write.
    let mut bad = Conn::accept(&bad_l).await;
    bad.handshake(ready(2, "bad")).await;
    let mut storm = Vec::new();
    for i in 0..20_000u64 {
        storm.extend(frame(&Envelope {
            id: 100 + i,
            correlation_id: 0,
            payload: Some(Payload::AgentReady(ready(2 + i % 2, "flap"))),
        }));
    }
    bad.send_raw(&storm).await;
    // The storm is cut short: a protocol error, the link resets, and the agent is met again.
    let stats = until_stats(&mut d, "bad13", |s| {
        s.protocol_errors >= 1 || rx_frames(s, "agent_ready").0 >= 20_001
    })
    .await;
    assert_eq!(
        stats.protocol_errors, 1,
        "the storm was read whole: {stats:?}"
    );
    drop(bad);
    let mut bad = Conn::accept(&bad_l).await;
    bad.handshake(ready(2, "bad")).await;
    bad.send(0, telemetry("flapped", Vec::new())).await;
    wait_hostname(&mut d, "bad13", "flapped").await;

    // The good VM's AGENT_CONNECTED is still in the ring: replayed before its next event.
    let mut events = d
        .client
        .stream_events(pb::StreamEventsRequest {
            after_seq: 0,
            vm_id: "good13".into(),
        })
        .await
        .unwrap()
        .into_inner();
    drop(good);
    let mut kinds = Vec::new();
    while let Some(e) = events.message().await.unwrap() {
        let kind = pb::EventKind::try_from(e.kind).unwrap();
        kinds.push(kind);
        if kind == pb::EventKind::AgentDisconnected {
            break;
        }
    }
    assert_eq!(
        kinds,
        [
            pb::EventKind::AgentConnected,
            pb::EventKind::AgentDisconnected
        ]
    );
    let stats = d.stats("bad13").await;
    let readies = rx_frames(&stats, "agent_ready").0;
    assert!(
        readies <= qx_node::agent::link::MAX_AGENT_READY_PER_WINDOW + 2,
        "{readies} AgentReady frames taken in"
    );
}

/// Polls `vm`'s stats until `done` holds.
async fn until_stats(
    d: &mut Daemon,
    vm: &str,
    done: impl Fn(&pb::AgentConnectionStats) -> bool,
) -> pb::AgentConnectionStats {
    for _ in 0..2400 {
        let s = d.stats(vm).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{vm}: the condition never held: {:?}", d.stats(vm).await);
}

/// A guest that writes input the daemon can only scan and throw away (garbage, or headers it
/// must reject), as fast as it can: the daemon takes at most its budget of it per connection,
/// then resets the connection for a protocol error (the backoff bounds the next one).
async fn wasted_input_is_cut_off(
    vm: &str,
    attack: Vec<u8>,
    within_budget: fn(&pb::AgentConnectionStats) -> bool,
) {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listen(dir.path(), vm);
    let mut d = Daemon::start(fast_config(None), &[(vm, &path)]).await;
    let mut c = Conn::accept(&l).await;
    c.handshake(ready(5, "w")).await;
    wait_hostname(&mut d, vm, "w").await;
    // 8 MiB, in one write the daemon reads at its own pace.
    let mut all = Vec::new();
    while all.len() < 8 << 20 {
        all.extend_from_slice(&attack);
    }
    let writer = tokio::spawn(async move {
        c.send_raw(&all).await;
        c
    });
    let stats = until_stats(&mut d, vm, |s| {
        s.protocol_errors >= 1 || s.garbage_bytes >= 4 << 20 || s.bad_frames >= 10_000
    })
    .await;
    assert_eq!(
        stats.protocol_errors, 1,
        "the daemon kept scanning: {stats:?}"
    );
    assert!(within_budget(&stats), "{stats:?}");
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_full_rate_is_cut_off_at_its_budget() {
    wasted_input_is_cut_off("w13g", vec![0x5a; 64 * 1024], |s| {
        s.garbage_bytes <= qx_node::agent::link::MAX_GARBAGE_BYTES_PER_WINDOW + 64 * 1024
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_headers_at_full_rate_are_cut_off_at_their_budget() {
    // A valid header claiming 1 MiB (over the host's limit), then filler.
    let mut one = agent_support::oversized_header().to_vec();
    one.extend([0x5a; 48]);
    wasted_input_is_cut_off("w13o", one, |s| {
        s.bad_frames <= qx_node::agent::link::MAX_BAD_FRAMES_PER_WINDOW + 8 * 1024 / 64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_numbers_that_overflow_are_errors_or_clamps_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listen(dir.path(), "n13");
    let mut d = Daemon::start(fast_config(None), &[("n13", &path)]).await;
    let mut c = Conn::accept(&l).await;
    c.handshake(ready(1, "n")).await;
    // Two filesystems of u64::MAX bytes: their total does not fit.
    let huge = FilesystemUsage {
        total_bytes: u64::MAX,
        used_bytes: u64::MAX,
        ..Default::default()
    };
    c.send(0, telemetry("huge", vec![huge.clone(), huge])).await;
    let i = wait_hostname(&mut d, "n13", "huge").await;
    let usage = i.resource_usage.unwrap();
    assert_eq!(usage.disk_total_bytes, u64::MAX);
    assert_eq!(usage.disk_used_bytes, u64::MAX);

    // A guest clock at the far end of i64.
    let sync = tokio::spawn({
        let mut client = d.client.clone();
        async move {
            client
                .sync_time(pb::SyncTimeRequest {
                    vm_id: "n13".into(),
                    ..Default::default()
                })
                .await
        }
    });
    loop {
        let req = c.request().await;
        if let Some(Payload::TimeGetRequest(_)) = req.payload {
            c.send(req.id, Payload::Ack(Ack {})).await;
            let t = TimeInfo {
                unix_ns: i64::MIN,
                ..Default::default()
            };
            c.send(req.id, Payload::TimeInfo(t)).await;
            break;
        }
    }
    let err = sync.await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    assert!(err.message().contains("out of range"), "{err:?}");
    // The daemon is still serving this VM.
    assert!(d.ping("n13").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cannot_stream_past_the_window_or_skip_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listen(dir.path(), "s13");
    let mut d = Daemon::start(fast_config(None), &[("s13", &path)]).await;
    let mut c = Conn::accept(&l).await;
    c.handshake(ready(1, "s")).await;
    wait_hostname(&mut d, "s13", "s").await;
    let mut reads = tokio::spawn({
        let mut client = d.client.clone();
        async move {
            let mut s = client
                .read_guest_file(pb::ReadGuestFileRequest {
                    vm_id: "s13".into(),
                    path: "/etc/hostname".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut bytes = 0usize;
            loop {
                match s.message().await {
                    Ok(Some(c)) => bytes += c.data.len(),
                    Ok(None) => return Ok(bytes),
                    Err(e) => return Err(e),
                }
            }
        }
    });
    // A 100-byte file, then 30 chunks of 1,000 bytes for it (within the item channel's
    // capacity, so only the checks can stop them) and no digest.
    loop {
        let req = tokio::select! {
            r = c.request() => r,
            r = &mut reads => panic!("the read ended before the attack: {r:?}"),
        };
        match req.payload {
            Some(Payload::FileStatRequest(_)) => {
                c.send(req.id, Payload::Ack(Ack {})).await;
                let st = qx_proto::agent::FileStat {
                    path: "/etc/hostname".into(),
                    size: 100,
                    ..Default::default()
                };
                c.send(req.id, Payload::FileStat(st)).await;
            }
            Some(Payload::FileReadRequest(r)) => {
                assert_eq!(r.length, 100);
                c.send(req.id, Payload::Ack(Ack {})).await;
                for i in 0..30u64 {
                    let chunk = qx_proto::agent::FileChunk {
                        offset: i * 1000,
                        data: vec![b'x'; 1000],
                    };
                    c.send(req.id, Payload::FileChunk(chunk)).await;
                }
                let done = qx_proto::agent::FileReadDone {
                    bytes: 30_000,
                    ..Default::default()
                };
                c.send(req.id, Payload::FileReadDone(done)).await;
                break;
            }
            _ => {}
        }
    }
    match reads.await.unwrap() {
        Ok(bytes) => panic!("the read succeeded with {bytes} bytes of a 100-byte file"),
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");
            assert!(e.message().contains("window"), "{e:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_stream_is_buffered_by_bytes_not_by_items() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listen(dir.path(), "e13");
    let mut d = Daemon::start(fast_config(None), &[("e13", &path)]).await;
    let mut c = Conn::accept(&l).await;
    c.handshake(ready(1, "e")).await;
    wait_hostname(&mut d, "e13", "e").await;
    // The client starts a streamed exec and reads nothing until the agent is done.
    let mut stream = d
        .client
        .stream_exec_in_guest(pb::ExecuteInGuestRequest {
            vm_id: "e13".into(),
            exec: Some(qx_proto::agent::ExecRequest {
                argv: vec!["yes".into()],
                stream: true,
                ..Default::default()
            }),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let req = loop {
        let req = c.request().await;
        if let Some(Payload::ExecRequest(_)) = req.payload {
            break req;
        }
    };
    c.send(req.id, Payload::Ack(Ack {})).await;
    // 200 items of 60 KiB (12 MiB), then the exit, then a marker.
    const ITEM: usize = 60 * 1024;
    for i in 0..200u64 {
        let o = qx_proto::agent::ExecOutput {
            stream: 1,
            data: vec![b'y'; ITEM],
            offset: i * ITEM as u64,
        };
        c.send(req.id, Payload::ExecOutput(o)).await;
    }
    c.send(req.id, Payload::ExecExit(Default::default())).await;
    c.send(0, telemetry("flooded", Vec::new())).await;
    wait_hostname(&mut d, "e13", "flooded").await;
    let mut bytes = 0usize;
    let mut end = None;
    loop {
        match stream.message().await {
            Ok(Some(ev)) => match ev.event {
                Some(pb::exec_event::Event::Output(o)) => bytes += o.data.len(),
                Some(pb::exec_event::Event::Exit(_)) => end = Some(Ok(())),
                _ => {}
            },
            Ok(None) => break,
            Err(e) => {
                end = Some(Err(e));
                break;
            }
        }
    }
    // What reached the caller: at most 1 MiB from the command's buffer, plus what the gRPC
    // layer had taken on before the caller fell behind (a few queued events and the HTTP/2
    // flow-control window).
    assert!(bytes <= 4 << 20, "{bytes} bytes were buffered for one exec");
    let err = end.expect("the stream ended without a word").unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
}

// -------------------------------------------------------------------------------------------
// The operator's terminal, through the real binaries
// -------------------------------------------------------------------------------------------

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn qxctl(addr: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--addr".to_string(), format!("http://{addr}")];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_qxctl"))
            .args(&all)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Bytes that must never reach a terminal from guest data.
fn has_terminal_controls(s: &str) -> bool {
    s.chars().any(|c| {
        (c.is_control() && c != '\n')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    })
}

const EVIL_HOSTNAME: &str = "x\u{1b}]52;c;SGVsbG8=\u{7}\u{1b}[2K\rconnected: true\u{9b}\u{202e}y";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qxctl_text_output_escapes_guest_controls_and_json_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listen(dir.path(), "t13");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _node = Node(
        Command::new(env!("CARGO_BIN_EXE_qx-node"))
            .args([
                "--listen",
                &addr,
                "--insecure-listen",
                "--libvirt-uri",
                "none",
            ])
            .arg("--agent-socket-dir")
            .arg(dir.path().join("sockets"))
            .arg("--image-dir")
            .arg(dir.path().join("images"))
            .arg("--vm-socket")
            .arg(format!("t13={}", path.display()))
            .args(["--ping-interval-ms", "200", "--liveness-window-ms", "2000"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut c = Conn::accept(&l).await;
    let mut r = ready(1, EVIL_HOSTNAME);
    r.os_pretty_name = "Debian\u{1b}[31m\nforged line".into();
    r.agent_version = "1.0\u{7f}\u{85}".into();
    c.handshake(r).await;
    c.send(0, telemetry(EVIL_HOSTNAME, Vec::new())).await;
    tokio::spawn(async move { while c.from_host.recv().await.is_some() {} });

    let mut text = String::new();
    for _ in 0..400 {
        let out = qxctl(&addr, &["agent", "info", "t13"]).await;
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success()
            && text.starts_with("connected:    true")
            && text.contains("SGVsbG8")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(text.contains("SGVsbG8"), "{text}");
    assert!(!has_terminal_controls(&text), "raw controls in: {text:?}");
    assert!(text.contains("x\\e]52;c;SGVsbG8=\\a"), "{text}");
    assert!(!text.contains("\nforged line"), "{text}");

    let out = qxctl(&addr, &["--json", "agent", "info", "t13"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["hostname"], EVIL_HOSTNAME, "{json}");
}

#[test]
fn bad_timeouts_are_refused_at_start_up_with_a_sentence_per_key() {
    let dir = tempfile::tempdir().unwrap();
    // The daemon must be able to connect somewhere for a zero ping interval to matter.
    let sock = dir.path().join("c13.agent.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let cfg = dir.path().join("qx-node.toml");
    std::fs::write(
        &cfg,
        "[timeouts]\nping_interval_ms = 0\nbackoff_initial_ms = 0\n\
         liveness_window_ms = 1000\nidle_reconnect_ms = 500\n",
    )
    .unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qx-node"))
        .arg("--config")
        .arg(&cfg)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--insecure-listen",
        ])
        .args(["--libvirt-uri", "none"])
        .arg("--image-dir")
        .arg(dir.path().join("images"))
        .arg("--vm-socket")
        .arg(format!("c13={}", sock.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A daemon that starts anyway (and panics in a task, or spins) is stopped after a while;
    // the assertions below then fail on its exit status.
    for _ in 0..100 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for key in [
        "ping_interval_ms",
        "backoff_initial_ms",
        "idle_reconnect_ms",
    ] {
        assert!(err.contains(key), "{key} not named in: {err}");
    }
}

// -------------------------------------------------------------------------------------------
// Reconnect backoff and log lines a guest can cause
// -------------------------------------------------------------------------------------------

/// Every log line at info or above that names a VM (`vm <id>: ...`), in order: the daemon's
/// log lines as an operator's journal would hold them.
static LOG_LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct CaptureLog;

impl log::Log for CaptureLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}", r.level(), r.args());
            if line.contains(" vm ") {
                LOG_LINES.lock().unwrap().push(line);
            }
        }
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&CaptureLog).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// The captured lines about `vm` from index `from` on.
fn log_lines_about(vm: &str, from: usize) -> Vec<String> {
    let tag = format!("vm {vm}:");
    LOG_LINES.lock().unwrap()[from..]
        .iter()
        .filter(|l| l.contains(&tag))
        .cloned()
        .collect()
}

/// A telemetry report with more filesystems than any list may hold: a field-limit violation.
fn over_field_limits() -> Vec<u8> {
    let fs = (0..2_000).map(|_| FilesystemUsage::default()).collect();
    frame(&Envelope {
        id: 1 << 41,
        correlation_id: 0,
        payload: Some(telemetry("over-limits", fs)),
    })
}

/// More frames with a valid header and a damaged payload than one connection may deliver.
fn damaged_payload_flood() -> Vec<u8> {
    let mut flood = Vec::new();
    for i in 0..(qx_node::agent::link::MAX_BAD_PAYLOADS_PER_CONNECTION + 4) {
        let mut f = frame(&Envelope {
            id: (1 << 42) + i,
            correlation_id: 0,
            payload: Some(telemetry("damaged", Vec::new())),
        });
        let last = f.len() - 1;
        f[last] ^= 0xff;
        flood.extend(f);
    }
    flood
}

/// `rounds` connections on each of which the agent says AgentReady, stays connected longer
/// than `backoff_initial` (so that an honest end would reset the backoff), then sends
/// `attack` and waits for the daemon to hang up. Returns the listener's next connection.
async fn misbehave_on_every_connection(
    d: &mut Daemon,
    l: &UnixListener,
    vm: &str,
    rounds: usize,
    attack: &[u8],
) -> Conn {
    for n in 0..rounds {
        let mut c = Conn::accept(l).await;
        c.handshake(ready(7, &format!("round-{n}"))).await;
        wait_hostname(d, vm, &format!("round-{n}")).await;
        tokio::time::sleep(fast_config(None).backoff_initial * 3).await;
        c.send_raw(attack).await;
        // The daemon hangs up: the reader sees EOF and drops its channel.
        while c.from_host.recv().await.is_some() {}
    }
    Conn::accept(l).await
}

/// The link's backoff, read from the daemon itself.
fn backoff(d: &Daemon, vm: &str) -> Duration {
    d.agent
        .manager()
        .link(vm)
        .unwrap()
        .stats()
        .reconnect_backoff
}

/// What a misbehaving guest gets, whatever the kind of misbehaviour: every connection ending
/// in a protocol error doubles the backoff up to its cap, however long the connection lasted,
/// the errors are counted, and one line is logged for all of them within the log interval.
/// The same connection pattern ending honestly (the socket closed) resets the backoff.
async fn protocol_errors_keep_the_backoff_growing_and_log_once(vm: &str, attack: &[u8]) {
    capture_logs();
    let cfg = fast_config(None);
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listen(dir.path(), vm);
    let mut d = Daemon::start(cfg.clone(), &[(vm, &path)]).await;
    let logged_before = LOG_LINES.lock().unwrap().len();

    // Backoff 20 ms doubling to its 200 ms cap: 20, 40, 80, 160, 200, 200.
    let rounds = 6;
    let mut c = misbehave_on_every_connection(&mut d, &l, vm, rounds, attack).await;
    let stats = d.stats(vm).await;
    assert_eq!(
        backoff(&d, vm),
        cfg.backoff_max,
        "after {rounds} connections ending in protocol errors the backoff is not at its cap: {stats:?}"
    );
    assert_eq!(stats.protocol_errors, rounds as u64, "{stats:?}");
    let lines = log_lines_about(vm, logged_before);
    assert_eq!(
        lines.len(),
        1,
        "{rounds} protocol errors within the log interval logged more than one line: {lines:#?}"
    );
    assert!(lines[0].contains("protocol error"), "{lines:?}");

    // Control: the same connection, ended by the socket closing, resets the backoff.
    c.handshake(ready(7, "honest")).await;
    wait_hostname(&mut d, vm, "honest").await;
    tokio::time::sleep(cfg.backoff_initial * 3).await;
    drop(c);
    let _next = Conn::accept(&l).await;
    assert_eq!(backoff(&d, vm), cfg.backoff_initial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_limit_violations_never_reset_the_reconnect_backoff_and_are_logged_once() {
    protocol_errors_keep_the_backoff_growing_and_log_once("b13f", &over_field_limits()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_payload_floods_never_reset_the_reconnect_backoff_and_are_logged_once() {
    protocol_errors_keep_the_backoff_growing_and_log_once("b13d", &damaged_payload_flood()).await;
}

// -------------------------------------------------------------------------------------------
// The metrics endpoint
// -------------------------------------------------------------------------------------------

/// `GET /metrics` from the endpoint the daemon serves over `d`'s agent links.
async fn scrape(d: &Daemon) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(qx_node::metrics::serve(
        listener,
        d.agent.clone(),
        Arc::default(),
    ));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: qx\r\n\r\n")
        .await
        .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.unwrap();
    server.abort();
    let text = String::from_utf8(body).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    text
}

/// The value of the series `name{labels}` in a scrape.
fn series(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_and_byte_accounting_are_on_metrics_with_a_fixed_set_of_series_per_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (good_l, good_path) = listen(dir.path(), "m13good");
    let (bad_l, bad_path) = listen(dir.path(), "m13bad");
    let mut d = Daemon::start(
        fast_config(None),
        &[("m13good", &good_path), ("m13bad", &bad_path)],
    )
    .await;
    let mut good = Conn::accept(&good_l).await;
    good.handshake(ready(1, "good")).await;
    wait_hostname(&mut d, "m13good", "good").await;

    // Garbage, then unasked-for frames of many kinds (answers to nothing), then a marker.
    let mut bad = Conn::accept(&bad_l).await;
    bad.handshake(ready(2, "bad")).await;
    bad.send_raw(&[0x5a; 5000]).await;
    for (i, p) in [
        Payload::Ack(Ack {}),
        Payload::ExecOutput(Default::default()),
        Payload::FileChunk(Default::default()),
        Payload::TimeInfo(TimeInfo::default()),
        Payload::NetworkInfo(Default::default()),
        Payload::ExecExit(Default::default()),
    ]
    .into_iter()
    .enumerate()
    {
        bad.send(77 + i as u64, p).await;
    }
    bad.send(0, telemetry("after-garbage", Vec::new())).await;
    wait_hostname(&mut d, "m13bad", "after-garbage").await;
    // Then a message over the field limits: a protocol error, and the link resets.
    bad.send_raw(&over_field_limits()).await;
    while bad.from_host.recv().await.is_some() {}

    let stats = d.stats("m13bad").await;
    let text = scrape(&d).await;
    assert_eq!(stats.protocol_errors, 1, "{stats:?}");
    assert_eq!(
        series(&text, "qx_agent_protocol_errors_total{vm=\"m13bad\"}"),
        Some(1),
        "{text}"
    );
    assert_eq!(
        series(&text, "qx_agent_protocol_errors_total{vm=\"m13good\"}"),
        Some(0)
    );
    assert!(stats.garbage_bytes >= 5000, "{stats:?}");
    assert_eq!(
        series(&text, "qx_agent_garbage_bytes_total{vm=\"m13bad\"}"),
        Some(stats.garbage_bytes)
    );
    // The rx bytes on /metrics are the daemon's own per-VM accounting: the sum over kinds
    // in GetAgentConnectionStats (the stats were read before the scrape, and the VM's agent
    // has sent nothing since: the daemon hung up on it).
    let rx_bytes: u64 = stats.rx.iter().map(|f| f.bytes).sum();
    assert!(stats.rx.len() >= 6, "{stats:?}");
    assert_eq!(
        series(&text, "qx_agent_rx_bytes_total{vm=\"m13bad\"}"),
        Some(rx_bytes)
    );

    // Bounded cardinality: the hostile VM has exactly the series of the honest one, and
    // nothing per VM is labelled by what the agent chose to send.
    // Each VM's series, named without their value and with the VM's own label taken out
    // (`state` is left out: its value is the link's state, which differs).
    let of = |vm: &str| {
        let tag = format!("vm=\"{vm}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&tag) && !l.contains("state="))
            .map(|l| l.split(' ').next().unwrap().replace(&tag, ""))
            .collect::<Vec<_>>()
    };
    let (good_series, bad_series) = (of("m13good"), of("m13bad"));
    assert!(!bad_series.is_empty());
    assert_eq!(bad_series, good_series);
    assert!(
        !text
            .lines()
            .any(|l| l.contains("vm=\"m13bad\"") && l.contains("kind=")),
        "{text}"
    );
    assert!(
        text.contains("qx_node_agent_rx_frames_total{kind=\"exec_output\"} 1"),
        "{text}"
    );
}
