//! The agent in real VMs, driven through the real qx-node daemon's gRPC API.
//!
//! Each test boots its VM(s) once and checks a group of behaviours, to keep the suite short
//! under TCG on two cores. QEMU and qx-node are owned by pid and killed when the test ends;
//! a failed test prints the guest console and the daemon log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use qx_e2e::{Node, Vm, VmSpec};
use qx_node::pb;
use qx_proto::agent::{ExecRequest, FileWriteOpen, FreezeState, OutputStream};
use tokio_stream::StreamExt;

const DATA_MOUNT: &str = "/mnt/data";

/// A whole guest file through ReadGuestFile.
async fn read_file(c: &mut qx_e2e::node::Client, vm_id: &str, path: &str) -> Vec<u8> {
    let mut rs = c
        .read_guest_file(pb::ReadGuestFileRequest {
            vm_id: vm_id.into(),
            path: path.into(),
            timeout_ms: CALL_TIMEOUT_MS,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("read {path}: {s}"))
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = rs.next().await {
        out.extend_from_slice(&chunk.unwrap().data);
    }
    out
}

fn vm_id_req(vm_id: &str) -> pb::AgentRequest {
    pb::AgentRequest {
        vm_id: vm_id.to_string(),
        timeout_ms: CALL_TIMEOUT_MS,
    }
}

#[test]
fn agent_info_ping_exec_files_time_users_network_and_disks_through_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = ext4_image(tmp.path(), 32, &[("hello.txt", b"hello from the host\n")]);
    let mut spec = VmSpec::new("node-ops");
    spec.disks.push(disk);
    spec.nic = true;
    spec.cmdline.push(format!("qx.disk=vda:{DATA_MOUNT}"));
    spec.cmdline.push("qx.ip=10.0.2.15/24".into());
    let mut vm = Vm::start(spec).unwrap();
    let vm_id = "ops";
    let node = Node::start(&vm_socket_args(&[(vm_id, &vm.agent_socket())])).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut c = node.client().await.unwrap();

        // AgentReady, as the daemon reports it.
        let info = wait_agent(&mut c, vm_id).await;
        assert_eq!(info.kernel_release, vm.image.kernel_release);
        // Read by the agent from the image's /etc/os-release (ci/vm/build-image.sh).
        assert_eq!(
            (info.os_name.as_str(), info.os_version.as_str()),
            ("Quantix test image", "1")
        );
        assert_eq!(info.os_pretty_name, "Quantix test image 1 (busybox)");
        assert_eq!(info.hostname, vm.spec.hostname);
        for cap in ["ping", "exec", "file-read", "file-write"] {
            assert!(info.capabilities.iter().any(|c| c == cap), "no {cap}: {info:?}");
        }

        // Ping.
        let pong = c.ping_agent(vm_id_req(vm_id)).await.unwrap().into_inner();
        assert_eq!(pong.session_id, info.session_id);

        // Exec, collected: stdout, stderr and the exit code are the child's.
        let exit = sh(&mut c, vm_id, "echo out; echo err >&2; exit 7").await;
        assert!(exit.exited);
        assert_eq!(exit.exit_code, 7);
        assert_eq!(exit.stdout, b"out\n");
        assert_eq!(exit.stderr, b"err\n");
        assert_eq!(sh_ok(&mut c, vm_id, "cat /mnt/data/hello.txt").await, "hello from the host\n");

        // Exec, streaming: lines arrive in order, offsets are contiguous, then the exit.
        let mut stream = c
            .stream_exec_in_guest(pb::ExecuteInGuestRequest {
                vm_id: vm_id.into(),
                exec: Some(ExecRequest {
                    argv: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done".into(),
                    ],
                    stream: true,
                    ..Default::default()
                }),
                timeout_ms: CALL_TIMEOUT_MS,
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        let mut outputs = 0;
        let mut exit = None;
        while let Some(ev) = stream.next().await {
            match ev.unwrap().event {
                Some(pb::exec_event::Event::Output(o)) => {
                    if o.stream == OutputStream::Stdout as i32 {
                        assert_eq!(o.offset, out.len() as u64, "stdout offsets not contiguous");
                        out.extend_from_slice(&o.data);
                        outputs += 1;
                    }
                }
                Some(pb::exec_event::Event::Exit(e)) => exit = Some(e),
                Some(pb::exec_event::Event::StartedId(_)) | None => {}
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&out),
            "line1\nline2\nline3\nline4\nline5\n"
        );
        assert!(outputs >= 2, "output was not streamed ({outputs} chunk)");
        let exit = exit.expect("no exit event at the end of the stream");
        assert!(exit.exited && exit.exit_code == 0);

        // File round trip, host -> guest -> host, checked by sha256 on both sides.
        let data = pattern(3 * 1024 * 1024 + 123, 42);
        let want = sha256(&data);
        let path = "/mnt/data/roundtrip.bin";
        let mut parts = vec![pb::WriteGuestFileRequest {
            part: Some(pb::write_guest_file_request::Part::Header(pb::WriteGuestFileHeader {
                vm_id: vm_id.into(),
                open: Some(FileWriteOpen {
                    path: path.into(),
                    mode: 0o600,
                    overwrite: true,
                    ..Default::default()
                }),
                size: data.len() as u64,
                expected_sha256: want.clone(),
                timeout_ms: CALL_TIMEOUT_MS,
            })),
        }];
        for chunk in data.chunks(200_000) {
            parts.push(pb::WriteGuestFileRequest {
                part: Some(pb::write_guest_file_request::Part::Data(chunk.to_vec())),
            });
        }
        let done = c
            .write_guest_file(tokio_stream::iter(parts))
            .await
            .unwrap()
            .into_inner();
        assert!(done.committed);
        assert_eq!(done.bytes, data.len() as u64);
        assert_eq!(done.sha256, want);
        let guest_sum = sh_ok(&mut c, vm_id, &format!("sha256sum {path}")).await;
        let hex: String = want.iter().map(|b| format!("{b:02x}")).collect();
        assert!(guest_sum.starts_with(&hex), "guest sha256sum: {guest_sum}");
        let hash = c
            .hash_guest_file(pb::GuestHashRequest {
                vm_id: vm_id.into(),
                path: path.into(),
                timeout_ms: CALL_TIMEOUT_MS,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hash.sha256, want);
        let mut back = Vec::new();
        let mut last_sha = Vec::new();
        let mut rs = c
            .read_guest_file(pb::ReadGuestFileRequest {
                vm_id: vm_id.into(),
                path: path.into(),
                timeout_ms: CALL_TIMEOUT_MS,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(chunk) = rs.next().await {
            let chunk = chunk.unwrap();
            assert_eq!(chunk.offset, back.len() as u64);
            back.extend_from_slice(&chunk.data);
            if chunk.eof {
                last_sha = chunk.sha256;
            }
        }
        assert_eq!(back.len(), data.len());
        assert_eq!(sha256(&back), want, "content read back differs");
        assert_eq!(last_sha, want);

        // Time: put the guest clock far off, sync it from the host, read it back.
        sh_ok(&mut c, vm_id, "date -s @1000000000 >/dev/null").await;
        let before = c.get_guest_time(vm_id_req(vm_id)).await.unwrap().into_inner();
        assert!(before.unix_ns < 1_100_000_000 * 1_000_000_000, "{before:?}");
        let synced = c
            .sync_time(pb::SyncTimeRequest {
                vm_id: vm_id.into(),
                force: true,
                write_rtc: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(synced.changed);
        assert!(synced.offset_seconds.abs() > 1.0e8, "{synced:?}");
        let after = c.get_guest_time(vm_id_req(vm_id)).await.unwrap().into_inner();
        let host_ns = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
        let skew_s = (host_ns - after.unix_ns).abs() as f64 / 1e9;
        assert!(skew_s < 60.0, "guest clock {skew_s} s from the host's after sync");

        // Users: the list call works; a password set lands in /etc/shadow.
        c.list_guest_users(vm_id_req(vm_id)).await.unwrap();
        c.set_guest_password(pb::SetGuestPasswordRequest {
            vm_id: vm_id.into(),
            user: "qxtest".into(),
            password: "s3cret-e2e".into(),
            crypted: false,
        })
        .await
        .unwrap();
        let shadow = sh_ok(&mut c, vm_id, "grep '^qxtest:' /etc/shadow").await;
        let hash_field = shadow.split(':').nth(1).unwrap_or_default().to_string();
        assert!(hash_field.starts_with('$'), "password not set: {shadow}");

        // SSH keys: add, list, file on disk with the right owner and mode, remove.
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2eTestKeyForQuantixE2eOnly qx@e2e";
        let added = c
            .add_ssh_keys(pb::SshKeysChangeRequest {
                vm_id: vm_id.into(),
                user: "qxtest".into(),
                keys: vec![key.into()],
                reset: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(added.keys.iter().any(|k| k == key), "{added:?}");
        let listed = c
            .list_ssh_keys(pb::GuestUserRequest {
                vm_id: vm_id.into(),
                user: "qxtest".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(listed.keys.iter().any(|k| k == key));
        let on_disk = sh_ok(
            &mut c,
            vm_id,
            "stat -c '%u %a' /home/qxtest/.ssh/authorized_keys && cat /home/qxtest/.ssh/authorized_keys",
        )
        .await;
        assert!(on_disk.starts_with("1000 600\n"), "{on_disk}");
        assert!(on_disk.contains(key));
        let removed = c
            .remove_ssh_keys(pb::SshKeysChangeRequest {
                vm_id: vm_id.into(),
                user: "qxtest".into(),
                keys: vec![key.into()],
                reset: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!removed.keys.iter().any(|k| k == key));

        // Network: eth0 with the address init gave it, and lo.
        let net = c.get_guest_network(vm_id_req(vm_id)).await.unwrap().into_inner();
        let eth0 = net
            .interfaces
            .iter()
            .find(|i| i.name == "eth0")
            .unwrap_or_else(|| panic!("no eth0: {net:?}"));
        assert!(eth0.addresses.iter().any(|a| a.address == "10.0.2.15" && a.prefix == 24));
        assert_eq!(eth0.mac.len(), 17, "{eth0:?}");
        assert!(net.interfaces.iter().any(|i| i.loopback));

        // Disks: vda and the ext4 filesystem on it.
        let disks = c.get_guest_disks(vm_id_req(vm_id)).await.unwrap().into_inner();
        let vda = disks
            .devices
            .iter()
            .find(|d| d.name == "vda")
            .unwrap_or_else(|| panic!("no vda: {disks:?}"));
        assert_eq!(vda.size_bytes, 32 * 1024 * 1024);
        let fs = disks
            .filesystems
            .iter()
            .find(|f| f.mountpoint == DATA_MOUNT)
            .unwrap_or_else(|| panic!("no {DATA_MOUNT}: {disks:?}"));
        assert_eq!(fs.fstype, "ext4");
        assert!(fs.used_bytes > 3 * 1024 * 1024);

    });
    // Shutdown through the agent, as an operator types it, powers the VM off: QEMU exits by
    // itself.
    let qxctl = qx_e2e::node::host_binary("qxctl").unwrap();
    let out = std::process::Command::new(qxctl)
        .args(["--addr", &node.addr, "agent", "shutdown", vm_id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qxctl agent shutdown: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        status.is_some(),
        "QEMU still running after the agent's shutdown"
    );
}

#[test]
fn freeze_blocks_writes_until_thaw_and_the_agent_thaws_by_itself_when_the_host_never_does() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = ext4_image(tmp.path(), 32, &[]);
    let mut spec = VmSpec::new("node-freeze");
    spec.disks.push(disk);
    spec.cmdline.push(format!("qx.disk=vda:{DATA_MOUNT}"));
    let vm = Vm::start(spec).unwrap();
    let node = Node::start(&vm_socket_args(&[("frz", &vm.agent_socket())])).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut c = node.client().await.unwrap();
        let vm_id = "frz";
        wait_agent(&mut c, vm_id).await;

        // A writer keeps writing to the disk and logs each completed write to tmpfs.
        sh_ok(
            &mut c,
            vm_id,
            "setsid sh -c 'i=0; while :; do echo $i > /mnt/data/tick; echo $i >> /tmp/ticks; i=$((i+1)); sleep 0.05; done' </dev/null >/dev/null 2>&1 &",
        )
        .await;
        sh_ok(&mut c, vm_id, "while [ ! -s /tmp/ticks ]; do sleep 0.05; done").await;

        let frozen = c
            .quiesce_filesystems(pb::QuiesceFilesystemsRequest {
                vm_id: vm_id.into(),
                mount_points: vec![DATA_MOUNT.into()],
                timeout_seconds: 60,
                run_pre_freeze_scripts: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(frozen.frozen, vec![DATA_MOUNT.to_string()]);
        let status = c.fs_freeze_status(vm_id_req(vm_id)).await.unwrap().into_inner();
        assert_eq!(status.state, FreezeState::Frozen as i32);
        // While frozen the writer is stuck in the kernel: its log stops growing (give it a
        // moment to finish the log line it may have been writing when the freeze came).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ticks_frozen = read_file(&mut c, vm_id, "/tmp/ticks").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ticks_later = read_file(&mut c, vm_id, "/tmp/ticks").await;
        assert_eq!(ticks_frozen, ticks_later, "writes went on while frozen");

        let thawed = c
            .thaw_filesystems(pb::ThawFilesystemsRequest {
                vm_id: vm_id.into(),
                quiesce_token: frozen.token,
                run_post_thaw_scripts: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(thawed.thawed, vec![DATA_MOUNT.to_string()]);
        // After the thaw the writer moves on.
        let deadline = Instant::now() + Duration::from_secs(30);
        while read_file(&mut c, vm_id, "/tmp/ticks").await.len() <= ticks_later.len() {
            assert!(Instant::now() < deadline, "the writer never resumed after the thaw");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Freeze with a short auto-thaw and never thaw: the agent thaws by itself.
        c.quiesce_filesystems(pb::QuiesceFilesystemsRequest {
            vm_id: vm_id.into(),
            mount_points: vec![DATA_MOUNT.into()],
            timeout_seconds: 2,
            run_pre_freeze_scripts: false,
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = c.fs_freeze_status(vm_id_req(vm_id)).await.unwrap().into_inner();
            if st.state == FreezeState::Thawed as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "never auto-thawed: {st:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(
            sh_ok(&mut c, vm_id, "echo again > /mnt/data/after-auto-thaw && sync && cat /mnt/data/after-auto-thaw").await,
            "again\n"
        );
    });
}

#[test]
fn the_daemon_rides_out_its_own_restart_mid_stream_and_an_agent_restart_in_the_guest() {
    let vm = Vm::start(VmSpec::new("node-restarts")).unwrap();
    let args = vm_socket_args(&[("rst", &vm.agent_socket())]);
    let rt = runtime();
    let vm_id = "rst";
    let first_session = {
        let node = Node::start(&args).unwrap();
        rt.block_on(async {
            let mut c = node.client().await.unwrap();
            let info = wait_agent(&mut c, vm_id).await;
            // A long streaming exec is running when the host goes away.
            let mut stream = c
                .stream_exec_in_guest(pb::ExecuteInGuestRequest {
                    vm_id: vm_id.into(),
                    exec: Some(ExecRequest {
                        argv: vec![
                            "/bin/sh".into(),
                            "-c".into(),
                            "i=0; while [ $i -lt 200 ]; do echo tick $i; i=$((i+1)); sleep 0.05; done".into(),
                        ],
                        stream: true,
                        ..Default::default()
                    }),
                    timeout_ms: CALL_TIMEOUT_MS,
                })
                .await
                .unwrap()
                .into_inner();
            let mut got = 0;
            while got < 3 {
                if let Some(ev) = stream.next().await {
                    if matches!(ev.unwrap().event, Some(pb::exec_event::Event::Output(_))) {
                        got += 1;
                    }
                }
            }
            info.session_id
        })
        // The daemon is killed here, mid-stream.
    };

    let node = Node::start(&args).unwrap();
    rt.block_on(async {
        let mut c = node.client().await.unwrap();
        // Same agent process: the reconnect is not an agent restart.
        let info = wait_agent(&mut c, vm_id).await;
        assert_eq!(info.session_id, first_session, "agent restarted on a host reconnect");
        assert_eq!(sh_ok(&mut c, vm_id, "echo after-reconnect").await, "after-reconnect\n");

        // Kill the agent inside the guest; init restarts it while the daemon stays connected.
        sh_ok(
            &mut c,
            vm_id,
            "setsid sh -c 'sleep 0.3; kill -9 $(pidof quantix-kvm-agent)' </dev/null >/dev/null 2>&1 &",
        )
        .await;
        let restarted = wait_agent_where(&mut c, vm_id, |i| i.session_id != first_session).await;
        assert_ne!(restarted.session_id, first_session);
        assert_eq!(sh_ok(&mut c, vm_id, "echo after-restart").await, "after-restart\n");
        let stats = c
            .get_agent_connection_stats(pb::AgentStatsRequest { vm_id: vm_id.into() })
            .await
            .unwrap()
            .into_inner();
        let conn = &stats.connections[0];
        assert!(conn.agent_restarts >= 1, "{conn:?}");
    });
}

#[test]
fn two_vms_at_once_are_never_confused() {
    let mut a = VmSpec::new("node-two-a");
    a.hostname = "guest-alpha".into();
    let mut b = VmSpec::new("node-two-b");
    b.hostname = "guest-beta".into();
    for spec in [&mut a, &mut b] {
        spec.cmdline
            .push("qx.agent_args=--telemetry-interval-ms=500".into());
    }
    let vm_a = Vm::start(a).unwrap();
    let vm_b = Vm::start(b).unwrap();
    let node = Node::start(&vm_socket_args(&[
        ("alpha", &vm_a.agent_socket()),
        ("beta", &vm_b.agent_socket()),
    ]))
    .unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut c = node.client().await.unwrap();
        let ia = wait_agent(&mut c, "alpha").await;
        let ib = wait_agent(&mut c, "beta").await;
        assert_eq!(ia.hostname, "guest-alpha");
        assert_eq!(ib.hostname, "guest-beta");
        assert_ne!(ia.session_id, ib.session_id);
        // Interleaved commands land on the right guest.
        for round in 0..3 {
            let (ra, rb) = tokio::join!(
                async {
                    let mut c = c.clone();
                    sh_ok(&mut c, "alpha", &format!("echo $(hostname)-{round}")).await
                },
                async {
                    let mut c = c.clone();
                    sh_ok(&mut c, "beta", &format!("echo $(hostname)-{round}")).await
                }
            );
            assert_eq!(ra, format!("guest-alpha-{round}\n"));
            assert_eq!(rb, format!("guest-beta-{round}\n"));
        }
        // Each VM's telemetry stream carries that VM's samples, live.
        for (vm_id, host) in [("alpha", "guest-alpha"), ("beta", "guest-beta")] {
            let mut tel = c
                .stream_telemetry(vm_id_req(vm_id))
                .await
                .unwrap()
                .into_inner();
            let mut stamps = Vec::new();
            while stamps.len() < 3 {
                let u = tel
                    .next()
                    .await
                    .unwrap_or_else(|| panic!("telemetry of {vm_id} ended"))
                    .unwrap();
                assert_eq!(u.vm_id, vm_id);
                let t = u.telemetry.unwrap();
                assert_eq!(t.hostname, host);
                assert!(t.memory.unwrap_or_default().total_bytes > 0, "{t:?}");
                stamps.push(t.unix_ms);
            }
            assert!(
                stamps.windows(2).all(|w| w[0] <= w[1]) && stamps[0] < stamps[2],
                "telemetry is not live: {stamps:?}"
            );
        }
    });
}
