//! The link's failure modes, each of which broke a system like this one (docs/architecture.md, "Why it cannot wedge"):
//! agent restart, host restart, garbage on the wire, a stalled writer, a dead reader, two VMs
//! whose sockets must not be confused, a full queue, a cancelled caller, "sent" that only
//! meant "queued", and telemetry/AgentReady that never reached the cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use agent_support::{codec_agent, fast_config, Behaviour, Daemon, RealAgent, Relay};
use qx_node::pb;
use qx_proto::agent::ExecRequest;
use std::time::Duration;
use tonic::Code;

fn sleep_exec(vm: &str, secs: u32) -> pb::ExecuteInGuestRequest {
    pb::ExecuteInGuestRequest {
        vm_id: vm.into(),
        exec: Some(ExecRequest {
            argv: vec!["sleep".into(), secs.to_string()],
            ..Default::default()
        }),
        timeout_ms: 0,
    }
}

/// Waits until `vm`'s link reports `pred`.
async fn until(d: &mut Daemon, vm: &str, pred: impl Fn(&pb::AgentConnectionStats) -> bool) {
    for _ in 0..400 {
        if pred(&d.stats(vm).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition never held; stats: {:?}", d.stats(vm).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_fails_in_flight_commands_naming_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let mut agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    let first = d.wait_connected("vm", 0).await.session_id;
    let mut events = d.agent.agent_events();

    // A command the agent acknowledged and is running.
    let mut client = d.client.clone();
    let running = tokio::spawn(async move { client.execute_in_guest(sleep_exec("vm", 20)).await });
    // The exec is the one acknowledged command not yet completed.
    until(&mut d, "vm", |s| {
        let c = s.commands.unwrap();
        s.in_flight == 1 && c.acknowledged > c.completed
    })
    .await;

    agent.kill();
    let _agent2 = RealAgent::start(&relay.guest_path, &[]);
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(
        err.message().contains("agent restarted"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("acknowledged"), "{}", err.message());

    let second = d.wait_connected("vm", first).await.session_id;
    assert_ne!(first, second);
    assert_eq!(d.ping("vm").await.unwrap().session_id, second);
    let stats = d.stats("vm").await;
    assert_eq!(stats.agent_restarts, 1);
    loop {
        let ev = events.recv().await.unwrap();
        if ev.kind == pb::EventKind::AgentRestarted {
            assert_eq!(ev.vm_id, "vm");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_restart_reconnects_to_the_same_agent_session() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d1 = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    let session = d1.wait_connected("vm", 0).await.session_id;
    d1.ping("vm").await.unwrap();
    d1.stop();

    let mut d2 = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    let info = d2.wait_connected("vm", 0).await;
    assert_eq!(info.session_id, session, "the agent did not restart");
    let exit = d2
        .client
        .execute_in_guest(pb::ExecuteInGuestRequest {
            vm_id: "vm".into(),
            exec: Some(ExecRequest {
                argv: vec!["echo".into(), "again".into()],
                ..Default::default()
            }),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exit.stdout, b"again\n");
    // Each daemon connected once, one after the other: QEMU's socket had one client at a time.
    assert_eq!(
        relay
            .host_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    d.wait_connected("vm", 0).await;
    // Noise, a false magic with a broken header, and a whole frame with a bad payload CRC.
    let mut junk = b"\x00\xffnoise\x51\x54\x58\x01\x00\x00\x00\x05garbage!".to_vec();
    let mut frame = Vec::new();
    qx_proto::encode_envelope(
        &qx_proto::agent::Envelope {
            id: 9,
            correlation_id: 0,
            payload: Some(qx_proto::agent::envelope::Payload::Ping(
                qx_proto::agent::Ping { seq: 1 },
            )),
        },
        65536,
        &mut frame,
    )
    .unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 0xff;
    junk.extend(frame);
    relay.inject_to_host(junk);
    for _ in 0..5 {
        d.ping("vm").await.unwrap();
    }
    until(&mut d, "vm", |s| s.garbage_bytes > 0 && s.bad_frames >= 1).await;
    let s = d.stats("vm").await;
    assert_eq!(s.connection_id, 1, "garbage must not cost the connection");
}

/// A flood of nested headers, each valid and claiming a large payload that never checks out,
/// would cost the host a checksum over the whole claimed length for every 16 bytes received.
/// The link resets after a bounded number of them and the agent is reachable again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_header_flood_resets_the_connection_and_the_agent_stays_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    d.wait_connected("vm", 0).await;
    let before = d.stats("vm").await.connection_id;

    // 4096 back-to-back headers, each with a valid header checksum, claiming 64 KiB.
    let claimed: u32 = 64 * 1024;
    let mut flood = Vec::new();
    for _ in 0..4096 {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&qx_proto::MAGIC);
        h[4..8].copy_from_slice(&claimed.to_be_bytes());
        h[8..12].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        let c = qx_proto::codec::crc32c(&h[..12]);
        h[12..16].copy_from_slice(&c.to_be_bytes());
        flood.extend_from_slice(&h);
    }
    // Enough filler that every claimed payload is complete and fails its checksum.
    flood.extend(vec![0u8; claimed as usize + 16]);
    relay.inject_to_host(flood);

    until(&mut d, "vm", |s| {
        s.last_error.contains("damaged payloads") && s.connection_id > before
    })
    .await;
    let s = d.stats("vm").await;
    assert!(
        s.bad_frames <= 4 * qx_node::agent::link::MAX_BAD_PAYLOADS_PER_CONNECTION,
        "the link kept checking damaged payloads: {} bad frames",
        s.bad_frames
    );
    d.wait_connected("vm", 0).await;
    d.ping("vm").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_writer_tears_down_and_the_agent_never_decodes_a_partial_frame() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let _agent = RealAgent::start(&relay.guest_path, &["--max-concurrent-exec", "64"]);
    let mut d = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    d.wait_connected("vm", 0).await;

    // QEMU stops reading: big requests fill the socket and the writer stalls mid-frame.
    relay.pause_host_reads(true);
    let big = vec![b'x'; 60 * 1024];
    let mut calls = Vec::new();
    for _ in 0..24 {
        let mut c = d.client.clone();
        let req = pb::ExecuteInGuestRequest {
            vm_id: "vm".into(),
            exec: Some(ExecRequest {
                argv: vec!["true".into()],
                stdin: big.clone(),
                ..Default::default()
            }),
            timeout_ms: 1500,
        };
        calls.push(tokio::spawn(async move { c.execute_in_guest(req).await }));
    }
    until(&mut d, "vm", |s| s.last_error.contains("writer stalled")).await;
    let s = d.stats("vm").await;
    assert_ne!(s.state, "connected");
    relay.pause_host_reads(false);
    for c in calls {
        if let Err(e) = c.await.unwrap() {
            // Whatever failed names the stage it reached.
            let m = e.message();
            assert!(
                m.contains("never written")
                    || m.contains("not acknowledged")
                    || m.contains("connection lost"),
                "{m}"
            );
        }
    }
    d.wait_connected("vm", 0).await;
    d.ping("vm").await.unwrap();
    assert!(d.stats("vm").await.reconnects >= 1);

    // Everything the agent was given decodes as whole frames, except one cut-off frame that
    // the next connection's sync preamble turned into a checksum failure, never a command.
    let (stats, kinds) = relay.to_guest_stats();
    assert!(stats.bad_payloads + stats.bad_headers <= 1, "{stats:?}");
    assert!(kinds.iter().filter(|k| **k == "host_hello").count() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_reader_reads_as_disconnected_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    d.wait_connected("vm", 0).await;
    let link = d.agent.manager().link("vm").unwrap();
    assert!(link.is_connected());
    let before = link.status().conn_id;

    link.kill_reader_for_test().await;
    // No waiting, no timer: the reader's end alone makes the link read as disconnected, even
    // though nothing told the writer yet.
    let st = link.status();
    assert!(!st.reader_alive);
    assert!(!link.is_connected());
    assert_eq!(link.state_name(), "disconnected");

    // The supervisor tore the zombie down and reconnected.
    let info = d.wait_connected("vm", 0).await;
    assert!(info.connected);
    assert!(link.status().conn_id > before);
    d.ping("vm").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_never_share_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let ra = Relay::start(dir.path(), "vm-a");
    let rb = Relay::start(dir.path(), "vm-b");
    let _a = RealAgent::start(&ra.guest_path, &[]);
    let _b = RealAgent::start(&rb.guest_path, &[]);
    // vm-a is bound explicitly; vm-b is found by name in the socket directory.
    let mut d = Daemon::start(
        fast_config(Some(dir.path().to_path_buf())),
        &[("vm-a", &ra.host_path)],
    )
    .await;
    let a = d.wait_connected("vm-a", 0).await.session_id;
    let b = d.wait_connected("vm-b", 0).await.session_id;
    assert_ne!(a, b);
    for _ in 0..3 {
        assert_eq!(d.ping("vm-a").await.unwrap().session_id, a);
        assert_eq!(d.ping("vm-b").await.unwrap().session_id, b);
    }
    assert_eq!(
        d.stats("vm-b").await.socket_path,
        rb.host_path.display().to_string()
    );
    // A VM with no socket of its own is not served by anyone else's.
    let e = d.ping("vm-c").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = d.ping("../vm-a").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Each relay saw exactly one host client.
    for r in [&ra, &rb] {
        assert_eq!(
            r.host_connections.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("nobody.agent.sock");
    let mut cfg = fast_config(None);
    cfg.queue_capacity = 2;
    cfg.ack_timeout = Duration::from_secs(30);
    let mut d = Daemon::start(cfg, &[("vm", &absent)]).await;
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut c = d.client.clone();
        waiting.push(tokio::spawn(async move {
            c.ping_agent(pb::AgentRequest {
                vm_id: "vm".into(),
                timeout_ms: 30_000,
            })
            .await
        }));
    }
    until(&mut d, "vm", |s| s.commands.unwrap().queued == 2).await;
    let e = d.ping("vm").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("queue is full"), "{}", e.message());
    for w in waiting {
        w.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_name_the_stage_reached() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast_config(None);
    cfg.ack_timeout = Duration::from_millis(400);
    // No agent at all: the host connects and says hello, nobody answers.
    let silent = Relay::start(dir.path(), "silent");
    // An agent that says AgentReady and answers pings, but never acknowledges a command.
    let deaf = Relay::start(dir.path(), "deaf");
    tokio::spawn(codec_agent(
        deaf.guest_path.clone(),
        11,
        Behaviour::NeverAck,
    ));
    // An agent that acknowledges and never replies.
    let slow = Relay::start(dir.path(), "slow");
    tokio::spawn(codec_agent(slow.guest_path.clone(), 12, Behaviour::AckOnly));
    let mut d = Daemon::start(
        cfg,
        &[
            ("silent", &silent.host_path),
            ("deaf", &deaf.host_path),
            ("slow", &slow.host_path),
        ],
    )
    .await;
    d.wait_connected("deaf", 0).await;
    d.wait_connected("slow", 0).await;
    let req = |vm: &str| pb::AgentRequest {
        vm_id: vm.into(),
        timeout_ms: 1000,
    };

    let e = d.client.get_guest_time(req("silent")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("never written"), "{}", e.message());
    assert!(e.message().contains("HostHello"), "{}", e.message());

    let e = d.client.get_guest_time(req("deaf")).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("written but not acknowledged"),
        "{}",
        e.message()
    );

    let e = d.client.get_guest_time(req("slow")).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("acknowledged but no reply"),
        "{}",
        e.message()
    );
    let s = d.stats("slow").await.commands.unwrap();
    assert_eq!(s.failed_ack_timeout, 1);
    assert_eq!(
        d.stats("deaf")
            .await
            .commands
            .unwrap()
            .failed_not_acknowledged,
        1
    );
    assert_eq!(
        d.stats("silent").await.commands.unwrap().failed_not_written,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_callers_never_leave_half_a_frame() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    d.wait_connected("vm", 0).await;
    let big = vec![b'y'; 60 * 1024];
    for round in 0..30u64 {
        let mut c = d.client.clone();
        let req = pb::ExecuteInGuestRequest {
            vm_id: "vm".into(),
            exec: Some(ExecRequest {
                argv: vec!["true".into()],
                stdin: big.clone(),
                ..Default::default()
            }),
            timeout_ms: 0,
        };
        let call = tokio::spawn(async move { c.execute_in_guest(req).await });
        // Cancel at varying points: before, during and after the frame is written.
        tokio::time::sleep(Duration::from_micros(200 * (round % 7))).await;
        call.abort();
    }
    d.ping("vm").await.unwrap();
    let s = d.stats("vm").await;
    assert_eq!(
        s.connection_id, 1,
        "cancellations must not cost the connection"
    );
    let (stats, _) = relay.to_guest_stats();
    assert_eq!(
        stats.bad_payloads + stats.bad_headers + stats.oversized,
        0,
        "{stats:?}"
    );
    // Only the sync preamble's zeros were skipped.
    assert_eq!(
        stats.garbage_bytes,
        qx_node::agent::link::SYNC_PREAMBLE_BYTES as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_ready_and_telemetry_fill_the_cache_and_go_stale() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let mut agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    let info = d.wait_connected("vm", 0).await;
    assert!(!info.os_name.is_empty() || !info.kernel_release.is_empty());
    for _ in 0..200 {
        let i = d.wait_connected("vm", 0).await;
        if i.resource_usage.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let info = d.wait_connected("vm", 0).await;
    assert!(info.resource_usage.unwrap().memory_total_bytes > 0);
    assert!(info.telemetry_unix_ms > 0);

    // The agent dies silently (the host sees no EOF through QEMU): the data stays, marked stale.
    agent.kill();
    let mut stale = None;
    for _ in 0..400 {
        let i = d
            .client
            .get_agent_info(pb::AgentRequest {
                vm_id: "vm".into(),
                timeout_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        if i.stale {
            stale = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let stale = stale.expect("cached data never marked stale");
    assert!(!stale.connected);
    assert_eq!(stale.session_id, info.session_id);
    assert!(!stale.hostname.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_in_flight_at_a_drop_is_redelivered_once_in_the_same_session() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d = Daemon::start(fast_config(None), &[("vm", &relay.host_path)]).await;
    let session = d.wait_connected("vm", 0).await.session_id;
    let mut client = d.client.clone();
    let running = tokio::spawn(async move {
        client
            .execute_in_guest(pb::ExecuteInGuestRequest {
                vm_id: "vm".into(),
                exec: Some(ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "sleep 1; echo done".into()],
                    ..Default::default()
                }),
                timeout_ms: 0,
            })
            .await
    });
    // The exec is the one acknowledged command not yet completed.
    until(&mut d, "vm", |s| {
        let c = s.commands.unwrap();
        s.in_flight == 1 && c.acknowledged > c.completed
    })
    .await;
    // The connection dies under the acknowledged command (its reader ends).
    let link = d.agent.manager().link("vm").unwrap();
    link.kill_reader_for_test().await;
    let exit = running.await.unwrap().unwrap().into_inner();
    assert_eq!(
        exit.stdout, b"done\n",
        "the exec ran once and its reply arrived"
    );
    let s = d.stats("vm").await;
    assert_eq!(s.agent_session_id, session);
    assert_eq!(s.commands.unwrap().redelivered, 1);
    assert!(s.connection_id >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_starts_late_is_met_on_the_first_connection() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm");
    let mut cfg = fast_config(None);
    cfg.handshake_timeout = Duration::from_millis(100);
    let mut d = Daemon::start(cfg, &[("vm", &relay.host_path)]).await;
    // The VM is "booting": the host is connected, nobody answers.
    until(&mut d, "vm", |s| {
        s.last_error.contains("waiting for the agent")
    })
    .await;
    assert_eq!(d.stats("vm").await.state, "handshaking");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    d.wait_connected("vm", 0).await;
    let s = d.stats("vm").await;
    assert_eq!(s.connection_id, 1, "no reconnect churn while waiting");
    assert_eq!(
        relay
            .host_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    d.ping("vm").await.unwrap();
}

/// The agent played frame by frame by the test itself, listening where QEMU's socket would be:
/// for drops at moments the real agent cannot be asked to choose.
struct Scripted {
    rd: tokio::net::unix::OwnedReadHalf,
    wr: tokio::net::unix::OwnedWriteHalf,
    dec: qx_proto::Decoder,
}

impl Scripted {
    async fn accept(l: &tokio::net::UnixListener) -> Scripted {
        let (s, _) = l.accept().await.unwrap();
        let (rd, wr) = s.into_split();
        Scripted {
            rd,
            wr,
            dec: qx_proto::Decoder::new(qx_proto::DEFAULT_MAX_FRAME_BYTES),
        }
    }

    /// The next frame from the host that `pred` accepts (the sync preamble and anything else
    /// are skipped).
    async fn until(
        &mut self,
        pred: impl Fn(&qx_proto::agent::Envelope) -> bool,
    ) -> qx_proto::agent::Envelope {
        use tokio::io::AsyncReadExt;
        loop {
            while let Some(p) = self.dec.decode().transpose() {
                if let Ok(p) = p {
                    let env = qx_proto::decode_envelope(p).unwrap();
                    if pred(&env) {
                        return env;
                    }
                }
            }
            let spare = self.dec.spare(64 * 1024);
            let n = self.rd.read(spare).await.unwrap();
            assert_ne!(n, 0, "the host closed the connection");
            self.dec.commit(n);
        }
    }

    async fn send(&mut self, corr: u64, payload: qx_proto::agent::envelope::Payload) {
        use tokio::io::AsyncWriteExt;
        self.wr.write_all(&frame(corr, payload)).await.unwrap();
    }
}

fn frame(corr: u64, payload: qx_proto::agent::envelope::Payload) -> Vec<u8> {
    let mut out = Vec::new();
    qx_proto::encode_envelope(
        &qx_proto::agent::Envelope {
            id: 7,
            correlation_id: corr,
            payload: Some(payload),
        },
        65536,
        &mut out,
    )
    .unwrap();
    out
}

fn ready(session_id: u64) -> qx_proto::agent::envelope::Payload {
    qx_proto::agent::envelope::Payload::AgentReady(qx_proto::agent::AgentReady {
        protocol_version: 1,
        agent_version: "scripted".into(),
        session_id,
        ..Default::default()
    })
}

fn is_hello(e: &qx_proto::agent::Envelope) -> bool {
    matches!(
        e.payload,
        Some(qx_proto::agent::envelope::Payload::HostHello(_))
    )
}

fn is_time_request(e: &qx_proto::agent::Envelope) -> bool {
    matches!(
        e.payload,
        Some(qx_proto::agent::envelope::Payload::TimeGetRequest(_))
    )
}

/// A command written and acknowledged on one connection is queued for redelivery; the next
/// connection announces the same agent session and drops before the host could write it
/// again. The command must be neither lost nor reported "never written": the connection after
/// that redelivers it with its id, and the caller gets the agent's real answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_caught_by_a_second_drop_is_neither_orphaned_nor_misreported() {
    use qx_proto::agent::envelope::Payload;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm12.agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let mut d = Daemon::start(fast_config(None), &[("vm", &path)]).await;
    const SESSION: u64 = 0x5e55_1012;

    // Connection 1: the command is written and acknowledged, then the host's reader dies.
    let mut c1 = Scripted::accept(&listener).await;
    c1.until(is_hello).await;
    c1.send(0, ready(SESSION)).await;
    let mut client = d.client.clone();
    let mut call = tokio::spawn(async move {
        client
            .get_guest_time(pb::AgentRequest {
                vm_id: "vm".into(),
                timeout_ms: 4000,
            })
            .await
    });
    let req = c1.until(is_time_request).await;
    c1.send(req.id, Payload::Ack(qx_proto::agent::Ack {})).await;
    until(&mut d, "vm", |s| s.commands.unwrap().acknowledged == 1).await;
    d.agent
        .manager()
        .link("vm")
        .unwrap()
        .kill_reader_for_test()
        .await;

    // Connection 2: the same session announces itself, and the connection drops at once.
    let (s2, _) = listener.accept().await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut s2 = s2;
        s2.write_all(&frame(0, ready(SESSION))).await.unwrap();
    }

    // Connection 3: the command comes again, under its own id, and its answer is the result.
    let mut c3 = Scripted::accept(&listener).await;
    c3.until(is_hello).await;
    c3.send(0, ready(SESSION)).await;
    let again = tokio::select! {
        again = c3.until(is_time_request) => again,
        res = &mut call => panic!("the call ended before its command was redelivered: {:?}", res.unwrap()),
    };
    assert_eq!(again.id, req.id, "redelivered under another id");
    let answer = qx_proto::agent::TimeInfo {
        unix_ns: 1012,
        ..Default::default()
    };
    c3.send(req.id, Payload::TimeInfo(answer)).await;
    let got = call.await.unwrap().unwrap().into_inner();
    assert_eq!(got.unix_ns, 1012);
    drop(c1);
}

/// A valid header announcing 48 KiB, then only 1 KiB of the payload: without a frame deadline
/// every later pong and telemetry frame is swallowed as that payload, and since bytes keep
/// arriving the link never notices. The started frame is abandoned after the frame deadline,
/// the decoder rescans from the byte after its magic, and the frames it held are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_never_completes_is_abandoned_and_the_frames_after_it_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm12-frame");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let mut d = Daemon::start(fast_config(None), &[("vm12-frame", &relay.host_path)]).await;
    d.wait_connected("vm12-frame", 0).await;
    let announced: u32 = 48 * 1024;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&qx_proto::MAGIC);
    h[4..8].copy_from_slice(&announced.to_be_bytes());
    h[8..12].copy_from_slice(&0x1012_1012u32.to_be_bytes());
    let c = qx_proto::codec::crc32c(&h[..12]);
    h[12..16].copy_from_slice(&c.to_be_bytes());
    let mut started = h.to_vec();
    started.extend(vec![0x5a; 1024]);
    relay.inject_to_host(started);
    for _ in 0..3 {
        let pong = d
            .client
            .ping_agent(pb::AgentRequest {
                vm_id: "vm12-frame".into(),
                timeout_ms: 5000,
            })
            .await;
        assert!(pong.is_ok(), "{pong:?}");
    }
    let s = d.stats("vm12-frame").await;
    assert_eq!(s.connection_id, 1, "the connection itself was fine");
    assert!(s.bad_frames >= 1, "the abandoned frame is counted: {s:?}");
}
