//! Every guest-agent RPC end to end: gRPC client -> in-process qx-node -> unix socket ->
//! relay (QEMU's chardev) -> the real quantix-kvm-agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use agent_support::{fast_config, Daemon, RealAgent, Relay};
use qx_node::pb;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{self as ap, ExecRequest};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tonic::Code;

const VM: &str = "rpc-vm";

async fn setup(extra: &[&str]) -> (tempfile::TempDir, Relay, RealAgent, Daemon) {
    setup_with(fast_config(None), extra).await
}

async fn setup_with(
    cfg: qx_node::agent::AgentConfig,
    extra: &[&str],
) -> (tempfile::TempDir, Relay, RealAgent, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), VM);
    let agent = RealAgent::start(&relay.guest_path, extra);
    let mut daemon = Daemon::start(cfg, &[(VM, &relay.host_path)]).await;
    daemon.wait_connected(VM, 0).await;
    (dir, relay, agent, daemon)
}

/// The first message of a WriteGuestFile stream: write `data` to `path` (0600, replacing it),
/// expecting its sha256.
fn write_header(path: &std::path::Path, data: &[u8]) -> pb::WriteGuestFileRequest {
    pb::WriteGuestFileRequest {
        part: Some(pb::write_guest_file_request::Part::Header(
            pb::WriteGuestFileHeader {
                vm_id: VM.into(),
                open: Some(ap::FileWriteOpen {
                    path: path.display().to_string(),
                    mode: 0o600,
                    overwrite: true,
                    ..Default::default()
                }),
                size: data.len() as u64,
                expected_sha256: Sha256::digest(data).to_vec(),
                timeout_ms: 0,
            },
        )),
    }
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_info_stats_and_telemetry_reach_the_real_agent() {
    let (_dir, _relay, _agent, mut d) = setup(&[]).await;
    let pong = d.ping(VM).await.unwrap();
    assert_ne!(pong.session_id, 0);
    assert!(!pong.agent_version.is_empty());

    let info = d.wait_connected(VM, 0).await;
    assert_eq!(info.session_id, pong.session_id);
    assert!(!info.stale);
    assert!(info.capabilities.iter().any(|c| c == "ping"));
    assert!(!info.hostname.is_empty());
    // The interfaces the daemon asked for after AgentReady reach GuestAgentInfo.
    let mut with_ifaces = info.clone();
    for _ in 0..200 {
        if !with_ifaces.interfaces.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        with_ifaces = d.wait_connected(VM, 0).await;
    }
    assert!(with_ifaces.interfaces.iter().any(|i| i.loopback));

    let mut telemetry = d
        .client
        .stream_telemetry(pb::AgentRequest {
            vm_id: VM.into(),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let update = telemetry.message().await.unwrap().unwrap();
    assert_eq!(update.vm_id, VM);
    assert!(update.telemetry.unwrap().memory.unwrap().total_bytes > 0);

    let stats = d.stats(VM).await;
    assert_eq!(stats.state, "connected");
    assert!(stats.connected);
    assert_eq!(stats.agent_session_id, pong.session_id);
    assert!(stats.rx.iter().any(|f| f.kind == "agent_ready"));
    assert!(stats.tx.iter().any(|f| f.kind == "host_hello"));
    let cmds = stats.commands.unwrap();
    assert!(cmds.completed >= 1 && cmds.written >= 1, "{cmds:?}");

    let metrics = qx_node::metrics::render(&[stats]);
    assert!(metrics.contains("qx_agent_connected{vm=\"rpc-vm\",state=\"connected\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_collected_streamed_and_killed() {
    let (_dir, _relay, _agent, mut d) = setup(&[]).await;
    let exit = d
        .client
        .execute_in_guest(pb::ExecuteInGuestRequest {
            vm_id: VM.into(),
            exec: Some(exec(&["sh", "-c", "echo out; echo err >&2; exit 3"])),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(exit.exited);
    assert_eq!(exit.exit_code, 3);
    assert_eq!(exit.stdout, b"out\n");
    assert_eq!(exit.stderr, b"err\n");

    let mut s = d
        .client
        .stream_exec_in_guest(pb::ExecuteInGuestRequest {
            vm_id: VM.into(),
            exec: Some(exec(&["sh", "-c", "echo one; echo two >&2; exit 7"])),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut code = None;
    let mut started = false;
    while let Some(ev) = s.message().await.unwrap() {
        match ev.event.unwrap() {
            pb::exec_event::Event::StartedId(id) => started = id != 0,
            pb::exec_event::Event::Output(o) => match o.stream() {
                ap::OutputStream::Stderr => err.extend(o.data),
                _ => out.extend(o.data),
            },
            pb::exec_event::Event::Exit(x) => code = Some(x.exit_code),
        }
    }
    assert!(started);
    assert_eq!(out, b"one\n");
    assert_eq!(err, b"two\n");
    assert_eq!(code, Some(7));

    // A long command, killed through KillGuestExec with the id from the stream.
    let mut s = d
        .client
        .stream_exec_in_guest(pb::ExecuteInGuestRequest {
            vm_id: VM.into(),
            exec: Some(exec(&["sleep", "30"])),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let id = match s.message().await.unwrap().unwrap().event.unwrap() {
        pb::exec_event::Event::StartedId(id) => id,
        other => panic!("first event {other:?}"),
    };
    // The kill may race the spawn: retry until the agent knows the exec.
    let mut killed = false;
    for _ in 0..50 {
        let r = d
            .client
            .kill_guest_exec(pb::KillGuestExecRequest {
                vm_id: VM.into(),
                exec_id: id,
                signal: 9,
            })
            .await;
        if r.is_ok() {
            killed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(killed);
    let mut exit = None;
    while let Some(ev) = s.message().await.unwrap() {
        if let Some(pb::exec_event::Event::Exit(x)) = ev.event {
            exit = Some(x);
        }
    }
    let exit = exit.unwrap();
    assert!(!exit.exited);
    assert_eq!(exit.signal, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_write_read_list_stat_hash_mkdir_delete() {
    let (dir, _relay, _agent, mut d) = setup(&[]).await;
    let root = dir.path().join("guestfs");
    let sub = root.join("a/b");
    d.client
        .mkdir_guest(pb::GuestMkdirRequest {
            vm_id: VM.into(),
            request: Some(ap::MkdirRequest {
                path: sub.display().to_string(),
                mode: 0o755,
                parents: true,
            }),
        })
        .await
        .unwrap();
    assert!(sub.is_dir());

    // 300 KiB of varied bytes: several 48 KiB write chunks, one read window.
    let data: Vec<u8> = (0..300 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let digest = Sha256::digest(&data).to_vec();
    let path = sub.join("blob.bin");
    let mut msgs = vec![write_header(&path, &data)];
    for c in data.chunks(70_000) {
        msgs.push(pb::WriteGuestFileRequest {
            part: Some(pb::write_guest_file_request::Part::Data(c.to_vec())),
        });
    }
    let done = d
        .client
        .write_guest_file(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert!(done.committed);
    assert_eq!(done.sha256, digest);
    assert_eq!(std::fs::read(&path).unwrap(), data);

    let (back, final_sha) = read_whole(&mut d, &path).await;
    assert_eq!(back, data);
    assert_eq!(final_sha, digest);

    let hash = d
        .client
        .hash_guest_file(pb::GuestHashRequest {
            vm_id: VM.into(),
            path: path.display().to_string(),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hash.sha256, digest);
    assert_eq!(hash.size, data.len() as u64);

    let stat = d
        .client
        .stat_guest_path(pb::GuestStatRequest {
            vm_id: VM.into(),
            request: Some(ap::FileStatRequest {
                path: path.display().to_string(),
                follow_symlinks: false,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.size, data.len() as u64);
    assert_eq!(stat.mode & 0o777, 0o600);

    let list = d
        .client
        .list_guest_dir(pb::GuestListRequest {
            vm_id: VM.into(),
            request: Some(ap::FileListRequest {
                path: sub.display().to_string(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.entries.iter().any(|e| e.name == "blob.bin"));

    d.client
        .delete_guest_path(pb::GuestDeleteRequest {
            vm_id: VM.into(),
            request: Some(ap::DeleteRequest {
                path: root.display().to_string(),
                recursive: true,
            }),
        })
        .await
        .unwrap();
    assert!(!root.exists());

    let missing = d
        .client
        .stat_guest_path(pb::GuestStatRequest {
            vm_id: VM.into(),
            request: Some(ap::FileStatRequest {
                path: root.display().to_string(),
                follow_symlinks: false,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_info_time_users_and_logs() {
    let (_dir, _relay, _agent, mut d) = setup(&[]).await;
    let req = || pb::AgentRequest {
        vm_id: VM.into(),
        timeout_ms: 0,
    };
    let net = d
        .client
        .get_guest_network(req())
        .await
        .unwrap()
        .into_inner();
    assert!(net.interfaces.iter().any(|i| i.loopback));
    let disks = d.client.get_guest_disks(req()).await.unwrap().into_inner();
    assert!(!disks.filesystems.is_empty());
    let t = d.client.get_guest_time(req()).await.unwrap().into_inner();
    assert!(t.unix_ns > 0 && t.monotonic_ns > 0);
    // The "guest" is this machine, so its clock agrees with ours: no change without force.
    let sync = d
        .client
        .sync_time(pb::SyncTimeRequest {
            vm_id: VM.into(),
            force: false,
            write_rtc: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!sync.changed);
    assert!(sync.offset_seconds.abs() < 1.0);
    assert_eq!(sync.time_source, "host");
    d.client.list_guest_users(req()).await.unwrap();
    d.client
        .fs_freeze_status(req())
        .await
        .map(|s| assert_eq!(s.into_inner().state(), ap::FreezeState::Thawed))
        .unwrap();
    let logs = d
        .client
        .get_guest_logs(pb::GuestLogsRequest {
            vm_id: VM.into(),
            max_lines: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(logs.lines.len() <= 10);
}

/// Power, freeze, trim, passwords and keys would act on this machine, so the agent runs with
/// those capabilities disabled: the refusals still travel the whole path and map to
/// UNIMPLEMENTED with the agent's words in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_capabilities_are_refused_end_to_end() {
    let (_dir, _relay, _agent, mut d) =
        setup(&["--set", "disable=power,fsfreeze,fstrim,users,ssh-keys"]).await;
    let power = pb::GuestPowerRequest {
        vm_id: VM.into(),
        delay_ms: 0,
        halt: false,
    };
    let e = d.client.guest_shutdown(power.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("power_request"), "{}", e.message());
    let e = d.client.guest_reboot(power).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let e = d
        .client
        .quiesce_filesystems(pb::QuiesceFilesystemsRequest {
            vm_id: VM.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let e = d
        .client
        .thaw_filesystems(pb::ThawFilesystemsRequest {
            vm_id: VM.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let e = d
        .client
        .trim_filesystems(pb::TrimFilesystemsRequest {
            vm_id: VM.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let e = d
        .client
        .set_guest_password(pb::SetGuestPasswordRequest {
            vm_id: VM.into(),
            user: "nobody".into(),
            password: "x".into(),
            crypted: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    for r in [
        d.client
            .list_ssh_keys(pb::GuestUserRequest {
                vm_id: VM.into(),
                user: "nobody".into(),
            })
            .await
            .map(|_| ()),
        d.client
            .add_ssh_keys(pb::SshKeysChangeRequest {
                vm_id: VM.into(),
                user: "nobody".into(),
                keys: vec!["ssh-ed25519 AAAA test".into()],
                reset: false,
            })
            .await
            .map(|_| ()),
        d.client
            .remove_ssh_keys(pb::SshKeysChangeRequest {
                vm_id: VM.into(),
                user: "nobody".into(),
                keys: vec!["ssh-ed25519 AAAA test".into()],
                reset: false,
            })
            .await
            .map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().code(), Code::Unimplemented);
    }
    // The link survived every refusal.
    d.ping(VM).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_write_keeps_a_window_of_chunks_in_flight() {
    use qx_node::agent_api::{WRITE_CHUNK_BYTES, WRITE_WINDOW_CHUNKS};
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), VM);
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    // Timings loose enough that answers held back for seconds fail nothing.
    let mut cfg = fast_config(None);
    cfg.liveness_window = Duration::from_secs(30);
    cfg.ack_timeout = Duration::from_secs(30);
    cfg.default_timeout = Duration::from_secs(60);
    let mut d = Daemon::start(cfg, &[(VM, &relay.host_path)]).await;
    d.wait_connected(VM, 0).await;

    let path = dir.path().join("windowed.bin");
    let data: Vec<u8> = (0..(2 * WRITE_WINDOW_CHUNKS * WRITE_CHUNK_BYTES) as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(write_header(&path, &data)).await.unwrap();
    let mut client = d.client.clone();
    let write = tokio::spawn(async move {
        client
            .write_guest_file(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // Once the daemon has the agent's FileWriteOpened, hold every answer back and send the data.
    let chunks_seen = |relay: &Relay| {
        let (_, kinds) = relay.to_guest_stats();
        kinds.iter().filter(|k| **k == "file_write_chunk").count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats = d
            .client
            .get_agent_connection_stats(pb::AgentStatsRequest { vm_id: VM.into() })
            .await
            .unwrap()
            .into_inner();
        let opened = stats
            .connections
            .iter()
            .flat_map(|c| &c.rx)
            .any(|f| f.kind == "file_write_opened" && f.frames > 0);
        if opened {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the file never opened"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    relay.pause_guest_reads(true);
    tx.send(pb::WriteGuestFileRequest {
        part: Some(pb::write_guest_file_request::Part::Data(data.clone())),
    })
    .await
    .unwrap();
    drop(tx);
    // Without an answer the daemon still sends the next chunks, up to the window and no more.
    while chunks_seen(&relay) < WRITE_WINDOW_CHUNKS {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} chunks sent while the first waited for its answer",
            chunks_seen(&relay)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(chunks_seen(&relay), WRITE_WINDOW_CHUNKS);
    relay.pause_guest_reads(false);
    let done = write.await.unwrap().unwrap().into_inner();
    assert!(done.committed);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(chunks_seen(&relay), 2 * WRITE_WINDOW_CHUNKS);
}

/// More concurrent execs than the agent's announced limit (8 by default): the host holds the
/// extra ones in its queue and starts each as a slot frees, instead of passing on the agent's
/// RESOURCE_EXHAUSTED (Busy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execs_beyond_the_agents_limit_wait_for_a_slot() {
    let (_dir, _relay, _agent, d) = setup(&[]).await;
    let mut calls = Vec::new();
    for i in 0..32 {
        let mut c = d.client.clone();
        let req = pb::ExecuteInGuestRequest {
            vm_id: VM.into(),
            exec: Some(exec(&["sh", "-c", &format!("sleep 0.2; echo {i}")])),
            timeout_ms: 0,
        };
        calls.push(tokio::spawn(async move { c.execute_in_guest(req).await }));
    }
    for (i, c) in calls.into_iter().enumerate() {
        let exit = c.await.unwrap().unwrap().into_inner();
        assert_eq!(exit.stdout, format!("{i}\n").as_bytes());
    }
}

/// More concurrent WriteGuestFile calls than the agent's announced `max_open_files` (2 here):
/// the host holds the extra transfers until an open one closes, instead of passing on the
/// agent's RESOURCE_EXHAUSTED (Busy). Every header goes out before any data, so the first two
/// transfers stay open while the others ask for theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_writes_beyond_the_agents_open_file_limit_wait_for_a_slot() {
    let (dir, _relay, _agent, d) = setup(&["--set", "max_open_files=2"]).await;
    let mut feeds = Vec::new();
    let mut calls = Vec::new();
    let mut expected = Vec::new();
    for i in 0..6u8 {
        let path = dir.path().join(format!("slot-{i}.bin"));
        let data: Vec<u8> = (0..200_000u32).map(|n| (n as u8) ^ i).collect();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(write_header(&path, &data)).await.unwrap();
        let mut client = d.client.clone();
        calls.push(tokio::spawn(async move {
            client
                .write_guest_file(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }));
        feeds.push((tx, data.clone()));
        expected.push((path, data));
    }
    // Let every open reach the daemon (and, without admission, the agent) first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (tx, data) in feeds {
        tokio::spawn(async move {
            let _ = tx
                .send(pb::WriteGuestFileRequest {
                    part: Some(pb::write_guest_file_request::Part::Data(data)),
                })
                .await;
        });
    }
    for (c, (path, data)) in calls.into_iter().zip(expected) {
        let done = c.await.unwrap().unwrap().into_inner();
        assert!(done.committed);
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}

/// Transfers are checked end to end with CRC32C, which costs the agent next to nothing:
/// qx-node asks it for no SHA-256 (its largest per-byte cost in a VM) and hashes the data
/// itself for the caller. The results still carry the whole file's sha256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_checked_by_crc32c_and_the_agent_hashes_nothing() {
    let (dir, relay, _agent, mut d) = setup(&[]).await;
    let path = dir.path().join("crc.bin");
    let data = pattern(300 * 1024);
    let digest = Sha256::digest(&data).to_vec();
    let msgs = vec![
        write_header(&path, &data),
        pb::WriteGuestFileRequest {
            part: Some(pb::write_guest_file_request::Part::Data(data.clone())),
        },
    ];
    let done = d
        .client
        .write_guest_file(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert!(done.committed);
    assert_eq!(done.sha256, digest);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let (back, sha) = read_whole(&mut d, &path).await;
    assert!(back == data, "the read differs");
    assert_eq!(sha, digest);
    let (mut opens, mut closes, mut reads) = (0, 0, 0);
    for env in relay.to_guest_envelopes() {
        match env.payload {
            Some(Payload::FileWriteOpen(o)) => {
                assert!(o.skip_sha256, "the agent was asked to hash a write");
                opens += 1;
            }
            Some(Payload::FileWriteClose(c)) => {
                assert!(c.expected_sha256.is_empty());
                assert_eq!(c.expected_crc32c, Some(qx_proto::crc32c(&data)));
                closes += 1;
            }
            Some(Payload::FileReadRequest(r)) => {
                assert!(r.skip_sha256, "the agent was asked to hash a read");
                reads += 1;
            }
            _ => {}
        }
    }
    assert_eq!((opens, closes), (1, 1));
    assert!(reads >= 1);
}

/// A ReadGuestFile of the whole file at `path`.
async fn open_read(d: &mut Daemon, path: &std::path::Path) -> tonic::Streaming<pb::GuestFileChunk> {
    d.client
        .read_guest_file(pb::ReadGuestFileRequest {
            vm_id: VM.into(),
            path: path.display().to_string(),
            offset: 0,
            length: 0,
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The whole file at `path` through ReadGuestFile, and the sha256 its last message carries.
async fn read_whole(d: &mut Daemon, path: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let mut s = open_read(d, path).await;
    let (mut back, mut sha) = (Vec::new(), Vec::new());
    while let Some(c) = s.message().await.unwrap() {
        back.extend(c.data);
        if c.eof {
            sha = c.sha256;
        }
    }
    (back, sha)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// The connection drops in the middle of an 8 MiB WriteGuestFile: the chunks in flight go out
/// again on the next connection in their order, the agent takes each offset once, and the
/// call succeeds with the whole file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_write_survives_a_reconnect_mid_transfer() {
    // The agent works through the chunks it was given before it reads the next HostHello;
    // with a debug agent on a busy machine that can take longer than the fast 2 s, and the
    // commands queued behind the reconnect must not expire meanwhile.
    let cfg = qx_node::agent::AgentConfig {
        ack_timeout: Duration::from_secs(15),
        handshake_timeout: Duration::from_secs(15),
        ..fast_config(None)
    };
    let (dir, relay, _agent, mut d) = setup_with(cfg, &[]).await;
    let path = dir.path().join("vm12-cut-write.bin");
    let data = pattern(8 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(write_header(&path, &data)).await.unwrap();
    let mut client = d.client.clone();
    let write = tokio::spawn(async move {
        client
            .write_guest_file(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let send = |piece: &[u8]| pb::WriteGuestFileRequest {
        part: Some(pb::write_guest_file_request::Part::Data(piece.to_vec())),
    };
    // The first 2 MiB go through (the open and 42 whole chunks answered).
    for piece in data[..2 << 20].chunks(1 << 20) {
        tx.send(send(piece)).await.unwrap();
    }
    loop {
        let c = d.stats(VM).await.commands.unwrap();
        if c.completed >= 43 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Then the relay stops reading what the host writes, the rest is fed, and once chunks
    // written and not yet answered pile up the connection is cut: those chunks are lost.
    relay.pause_host_reads(true);
    let feed = {
        let data = data.clone();
        tokio::spawn(async move {
            for piece in data[2 << 20..].chunks(1 << 20) {
                if tx.send(send(piece)).await.is_err() {
                    return;
                }
            }
        })
    };
    loop {
        let c = d.stats(VM).await.commands.unwrap();
        if c.written >= c.completed + 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    relay.cut_host();
    relay.pause_host_reads(false);
    feed.await.unwrap();
    let done = write.await.unwrap().unwrap().into_inner();
    assert!(done.committed);
    assert_eq!(done.bytes, data.len() as u64);
    assert!(std::fs::read(&path).unwrap() == data, "the file differs");
    assert!(d.stats(VM).await.connection_id >= 2);
}

/// The connection drops in the middle of an 8 MiB ReadGuestFile, while a window's answers are
/// on their way: the read resumes from the last byte received, and the stream ends with every
/// byte and the whole file's sha256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_read_resumes_after_a_reconnect_mid_transfer() {
    let (dir, relay, _agent, mut d) = setup(&[]).await;
    let relay = std::sync::Arc::new(relay);
    let path = dir.path().join("vm12-cut-read.bin");
    let data = pattern(8 << 20);
    std::fs::write(&path, &data).unwrap();
    let mut s = open_read(&mut d, &path).await;
    let requests = |relay: &Relay| {
        let (_, kinds) = relay.to_guest_stats();
        kinds.iter().filter(|k| **k == "file_read_request").count()
    };
    let mut back = Vec::new();
    let mut sha = Vec::new();
    let mut cutter = None;
    while let Some(c) = s.message().await.unwrap() {
        assert_eq!(
            c.offset,
            back.len() as u64,
            "a gap or a repeat in the stream"
        );
        back.extend(c.data);
        if c.eof {
            sha = c.sha256;
        }
        if cutter.is_none() && back.len() >= 3 << 20 {
            // Hold the agent's answers; once a window is asked for and not yet answered, cut
            // the connection under it, then let the held answers go (to a connection that
            // never asked for them).
            relay.pause_guest_reads(true);
            let (relay, agent) = (relay.clone(), d.agent.clone());
            cutter = Some(tokio::spawn(async move {
                let link = agent.manager().link(VM).unwrap();
                // The fourth window's request has reached the agent (three whole windows
                // were read): its answer is held, so the cut lands with it outstanding.
                // (`in_flight` alone also counts a request not yet written.)
                while link.stats().in_flight == 0 || requests(&relay) < 4 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                link.kill_reader_for_test().await;
                relay.pause_guest_reads(false);
                requests(&relay)
            }));
        }
    }
    let asked = cutter.unwrap().await.unwrap();
    assert!(asked >= 4);
    assert!(back == data, "the bytes differ");
    assert_eq!(sha, Sha256::digest(&data).to_vec());
    assert!(d.stats(VM).await.connection_id >= 2);
}
