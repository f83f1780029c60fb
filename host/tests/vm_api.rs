//! The VM half of NodeDaemonService through a real in-process tonic server and client, over
//! libvirt's test driver (a real libvirt driver with a simulated hypervisor). Each test opens
//! `test:///<tmp>/node.xml`, a private empty hypervisor, so parallel tests never meet.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use qx_node::agent_api::AgentApi;
use qx_node::pb;
use qx_node::pb::node_daemon_service_client::NodeDaemonServiceClient;
use qx_node::pb::node_daemon_service_server::NodeDaemonServiceServer;
use qx_node::service::NodeService;
use qx_node::vm_api::{VmApi, VmConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

type Client = NodeDaemonServiceClient<Channel>;

struct Harness {
    client: Client,
    dir: tempfile::TempDir,
}

impl Harness {
    fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }
    fn sockets(&self) -> PathBuf {
        self.dir.path().join("sock")
    }
    fn agent_iso(&self) -> PathBuf {
        self.dir.path().join("agent.iso")
    }
    fn file(&self, name: &str, content: &[u8]) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.iso"), b"agent iso").unwrap();
    // A private test-driver hypervisor: `test:///default` is shared by every connection
    // of a process while one is open, so parallel tests would see each other's VMs.
    let node = dir.path().join("node.xml");
    std::fs::write(&node, "<node/>").unwrap();
    let config = VmConfig {
        libvirt_uri: format!("test://{}", node.display()),
        socket_dir: dir.path().join("sock"),
        image_dir: dir.path().join("images"),
        agent_iso: Some(dir.path().join("agent.iso")),
        disk_roots: Vec::new(),
        media_dirs: vec![dir.path().to_path_buf()],
    };
    let agent = Arc::new(AgentApi::default());
    let vm = Arc::new(VmApi::new(config, agent.clone()).unwrap());
    let service = NodeService { vm, agent };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        qx_node::listen::grpc_server()
            .add_service(NodeDaemonServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = NodeDaemonServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness { client, dir }
}

fn spec() -> pb::VmSpec {
    pb::VmSpec {
        cpu_cores: 2,
        cpu_sockets: 1,
        cpu_threads_per_core: 1,
        memory_mib: 128,
        disks: vec![
            pb::DiskSpec {
                size_gib: 1,
                ..Default::default()
            },
            pb::DiskSpec {
                cdrom: true,
                ..Default::default()
            },
        ],
        console: Some(pb::ConsoleSpec {
            vnc_enabled: true,
            spice_enabled: false,
        }),
        ..Default::default()
    }
}

fn create_req(name: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: name.to_string(),
        labels: [("tier".to_string(), "web & <db>".to_string())].into(),
        spec: Some(spec()),
        ..Default::default()
    }
}

async fn create(h: &mut Harness, name: &str) -> pb::VmStatus {
    h.client
        .create_vm(create_req(name))
        .await
        .unwrap()
        .into_inner()
}

fn id(vm: &str) -> pb::VmIdRequest {
    pb::VmIdRequest {
        vm_id: vm.to_string(),
    }
}

fn state(s: &pb::VmStatus) -> pb::VmState {
    pb::VmState::try_from(s.state).unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn vm_names(h: &mut Harness) -> Vec<String> {
    let list = h
        .client
        .list_v_ms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner();
    list.vms.into_iter().map(|v| v.name).collect()
}

#[tokio::test]
async fn health_and_node_info_describe_the_hypervisor() {
    let mut h = harness().await;
    let health = h
        .client
        .health_check(pb::HealthCheckRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.healthy && health.hypervisor_reachable);
    assert!(health.hypervisor.starts_with("test:///"));
    let info = h
        .client
        .get_node_info(pb::GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.cpus > 0 && info.memory_bytes > 0);
    assert_eq!(info.running_vms, 0);
    assert_eq!(info.agents_connected, 0);
}

#[tokio::test]
async fn create_defines_a_stopped_vm_with_its_agent_channel_labels_and_qcow2_disk() {
    let mut h = harness().await;
    let vm = create(&mut h, "web-1").await;
    assert_eq!(state(&vm), pb::VmState::Stopped);
    assert_eq!((vm.vcpus, vm.memory_mib), (2, 128));
    assert_eq!(
        vm.labels.get("tier").map(String::as_str),
        Some("web & <db>")
    );
    let socket = h.sockets().join(format!("{}.agent.sock", vm.vm_id));
    assert_eq!(vm.agent_socket, socket.to_string_lossy());
    let image = h.images().join(format!("{}-vda.qcow2", vm.vm_id));
    let head = std::fs::read(&image).unwrap();
    assert_eq!(&head[..4], b"QFI\xfb", "qemu-img made a qcow2 image");
    assert!(vm_names(&mut h).await.contains(&"web-1".to_string()));
    // By name as well as by id.
    let by_name = h
        .client
        .get_vm_status(id("web-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_name.vm_id, vm.vm_id);
    assert!(!by_name.guest_agent.unwrap().connected);
}

#[tokio::test]
async fn lifecycle_start_pause_resume_reboot_stop_delete() {
    let mut h = harness().await;
    let vm = create(&mut h, "life").await;
    let c = &mut h.client;
    let s = c.start_vm(id(&vm.vm_id)).await.unwrap().into_inner();
    assert_eq!(state(&s), pb::VmState::Running);
    let err = c.start_vm(id(&vm.vm_id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let s = c.pause_vm(id(&vm.vm_id)).await.unwrap().into_inner();
    assert_eq!(state(&s), pb::VmState::Paused);
    assert_eq!(
        c.pause_vm(id(&vm.vm_id)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        c.reboot_vm(id(&vm.vm_id)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let s = c.resume_vm(id(&vm.vm_id)).await.unwrap().into_inner();
    assert_eq!(state(&s), pb::VmState::Running);
    assert!(
        s.state_reason.contains("not synced"),
        "no agent: the clock sync is reported as skipped: {}",
        s.state_reason
    );
    assert_eq!(
        c.resume_vm(id(&vm.vm_id)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let s = c.reboot_vm(id(&vm.vm_id)).await.unwrap().into_inner();
    assert_eq!(state(&s), pb::VmState::Running);

    // Running: delete without force is refused.
    let err = c
        .delete_vm(pb::DeleteVmRequest {
            vm_id: vm.vm_id.clone(),
            delete_storage: true,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Graceful stop: no agent, so the agent step fails and ACPI stops it.
    let stop = c
        .stop_vm(pb::StopVmRequest {
            vm_id: vm.vm_id.clone(),
            timeout_s: 2,
            skip_agent: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stop.stopped_by, pb::StopStep::Acpi as i32);
    assert_eq!(stop.steps.len(), 2, "{:?}", stop.steps);
    assert_eq!(stop.steps[0].step, pb::StopStep::Agent as i32);
    assert!(stop.steps[0].attempted && !stop.steps[0].succeeded);
    assert!(stop.steps[0].detail.contains("agent unavailable"));
    assert_eq!(stop.steps[1].step, pb::StopStep::Acpi as i32);
    assert!(stop.steps[1].succeeded);
    assert_eq!(state(stop.status.as_ref().unwrap()), pb::VmState::Stopped);
    let err = c
        .stop_vm(pb::StopVmRequest {
            vm_id: vm.vm_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        c.force_stop_vm(id(&vm.vm_id)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    let deleted = c
        .delete_vm(pb::DeleteVmRequest {
            vm_id: vm.vm_id.clone(),
            delete_storage: true,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    let image = h.images().join(format!("{}-vda.qcow2", vm.vm_id));
    assert_eq!(
        deleted.deleted_volumes,
        [image.to_string_lossy().to_string()]
    );
    assert!(!image.exists());
    let err = h.client.get_vm_status(id(&vm.vm_id)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn skip_agent_stop_and_force_stop_and_forced_delete() {
    let mut h = harness().await;
    let mut req = create_req("fast");
    req.start = true;
    let vm = h.client.create_vm(req).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Running);
    let stop = h
        .client
        .stop_vm(pb::StopVmRequest {
            vm_id: vm.vm_id.clone(),
            timeout_s: 1,
            skip_agent: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stop.steps[0].attempted);
    assert_eq!(stop.stopped_by, pb::StopStep::Acpi as i32);

    h.client.start_vm(id(&vm.vm_id)).await.unwrap();
    let s = h
        .client
        .force_stop_vm(id(&vm.vm_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&s), pb::VmState::Stopped);

    h.client.start_vm(id(&vm.vm_id)).await.unwrap();
    h.client
        .delete_vm(pb::DeleteVmRequest {
            vm_id: vm.vm_id.clone(),
            delete_storage: false,
            force: true,
        })
        .await
        .unwrap();
    assert!(!vm_names(&mut h).await.contains(&"fast".to_string()));
    // Storage kept when not asked to delete it.
    assert!(h.images().join(format!("{}-vda.qcow2", vm.vm_id)).exists());
}

#[tokio::test]
async fn unknown_vm_is_not_found_and_empty_id_is_invalid() {
    let mut h = harness().await;
    let ghost = "00000000-0000-4000-8000-00000000dead";
    let c = &mut h.client;
    let codes = vec![
        c.get_vm_status(id(ghost)).await.unwrap_err().code(),
        c.start_vm(id(ghost)).await.unwrap_err().code(),
        c.pause_vm(id("no-such-name")).await.unwrap_err().code(),
        c.stop_vm(pb::StopVmRequest {
            vm_id: ghost.into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: ghost.into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        c.list_snapshots(id(ghost)).await.unwrap_err().code(),
        c.change_media(pb::ChangeMediaRequest {
            vm_id: ghost.into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        c.get_console(id(ghost)).await.unwrap_err().code(),
        c.stream_metrics(pb::StreamMetricsRequest {
            vm_id: ghost.into(),
            interval_ms: 100,
        })
        .await
        .unwrap_err()
        .code(),
    ];
    assert!(codes.iter().all(|c| *c == Code::NotFound), "{codes:?}");
    assert_eq!(
        c.get_vm_status(id("")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn bad_specs_are_invalid_argument_and_leave_nothing_behind() {
    let mut h = harness().await;
    let before = vm_names(&mut h).await;
    let mut bad = Vec::new();
    bad.push(create_req("has space"));
    let mut r = create_req("ok");
    r.spec = None;
    bad.push(r);
    let mut r = create_req("ok");
    r.vm_id = "not-a-uuid".into();
    bad.push(r);
    let mut r = create_req("ok");
    r.spec.as_mut().unwrap().memory_mib = 0;
    bad.push(r);
    let mut r = create_req("ok");
    // Missing, inside the image directory (outside it the answer is PERMISSION_DENIED).
    r.spec.as_mut().unwrap().disks[0].path =
        h.images().join("missing.qcow2").to_string_lossy().into();
    bad.push(r);
    let mut r = create_req("ok");
    r.spec.as_mut().unwrap().disks[0].bus = "floppy".into();
    bad.push(r);
    let mut r = create_req("ok");
    r.spec.as_mut().unwrap().cpu_sockets = 1024;
    bad.push(r);
    let mut r = create_req("ok");
    r.spec.as_mut().unwrap().kernel_cmdline = "console=ttyS0".into();
    bad.push(r);
    // Passes our checks, refused by libvirt after the disk image was created: a multicast
    // MAC. The created image must be removed again.
    let mut r = create_req("ok");
    r.spec.as_mut().unwrap().nics.push(pb::NicSpec {
        mac: "01:00:5e:00:00:01".into(),
        ..Default::default()
    });
    bad.push(r);
    for r in bad {
        let err = h.client.create_vm(r.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{r:?}: {err:?}");
    }
    assert_eq!(vm_names(&mut h).await, before);
    assert_eq!(files_in(&h.images()), Vec::<String>::new());
}

#[tokio::test]
async fn failed_image_creation_removes_the_images_already_made() {
    let mut h = harness().await;
    let vm_id = "6f1c1a52-1111-4222-8333-444455556666";
    let mut r = create_req("two-disks");
    r.vm_id = vm_id.into();
    r.spec.as_mut().unwrap().disks.insert(
        1,
        pb::DiskSpec {
            size_gib: 1,
            ..Default::default()
        },
    );
    // Someone else's file sits where the second image would go.
    let squatter = h.images().join(format!("{vm_id}-vdb.qcow2"));
    std::fs::write(&squatter, b"not ours").unwrap();
    let err = h.client.create_vm(r).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(files_in(&h.images()), [format!("{vm_id}-vdb.qcow2")]);
    assert_eq!(std::fs::read(&squatter).unwrap(), b"not ours");
    assert_eq!(
        h.client.get_vm_status(id(vm_id)).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn duplicate_id_or_name_is_already_exists() {
    let mut h = harness().await;
    let vm = create(&mut h, "dup").await;
    let err = h.client.create_vm(create_req("dup")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let mut r = create_req("other");
    r.vm_id = vm.vm_id.clone();
    let err = h.client.create_vm(r).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // The original is untouched and its image still exists.
    let s = h
        .client
        .get_vm_status(id(&vm.vm_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.name, "dup");
    assert_eq!(files_in(&h.images()), [format!("{}-vda.qcow2", vm.vm_id)]);
}

#[tokio::test]
async fn snapshot_lifecycle_and_quiesce_without_agent_is_refused() {
    let mut h = harness().await;
    let vm = create(&mut h, "snappy").await;
    let c = &mut h.client;
    let snap = |name: &str, quiesce: bool| pb::CreateSnapshotRequest {
        vm_id: vm.vm_id.clone(),
        name: name.to_string(),
        description: "before <upgrade> & co".to_string(),
        quiesce,
        include_memory: false,
    };
    let s1 = c
        .create_snapshot(snap("s1", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s1.id.as_str(), s1.quiesced), ("s1", false));
    assert!(!s1.has_memory, "a shut-off VM has no memory state");
    assert_eq!(s1.description, "before <upgrade> & co");
    assert!(s1.current && s1.created_unix_s > 0);
    assert_eq!(
        c.create_snapshot(snap("s1", false))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(
        c.create_snapshot(snap("bad name", false))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // Memory, and quiesce, need a running VM (quiesce then an agent): no snapshot is left.
    let err = c
        .create_snapshot(pb::CreateSnapshotRequest {
            include_memory: true,
            ..snap("m1", false)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("memory"), "{err:?}");
    assert_eq!(
        c.create_snapshot(snap("q1", true))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    c.start_vm(id(&vm.vm_id)).await.unwrap();
    let err = c.create_snapshot(snap("q2", true)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("quiesce"), "{err:?}");

    let s2 = c
        .create_snapshot(snap("s2", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s2.state, "running");
    assert!(s2.has_memory);
    assert_eq!(s2.parent, "s1");
    let list = c.list_snapshots(id(&vm.vm_id)).await.unwrap().into_inner();
    let names: Vec<_> = list.snapshots.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(names, ["s1", "s2"]);
    assert!(list.snapshots.iter().all(|s| !s.quiesced));

    // Back to the shut-off snapshot, then to the running one.
    let s = c
        .revert_snapshot(pb::SnapshotRequest {
            vm_id: vm.vm_id.clone(),
            snapshot_id: "s1".into(),
            start_after_revert: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&s), pb::VmState::Stopped);
    let s = c
        .revert_snapshot(pb::SnapshotRequest {
            vm_id: vm.vm_id.clone(),
            snapshot_id: "s2".into(),
            start_after_revert: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&s), pb::VmState::Running);
    let err = c
        .revert_snapshot(pb::SnapshotRequest {
            vm_id: vm.vm_id.clone(),
            snapshot_id: "nope".into(),
            start_after_revert: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    c.delete_snapshot(pb::SnapshotRequest {
        vm_id: vm.vm_id.clone(),
        snapshot_id: "s1".into(),
        start_after_revert: false,
    })
    .await
    .unwrap();
    let err = c
        .delete_snapshot(pb::SnapshotRequest {
            vm_id: vm.vm_id.clone(),
            snapshot_id: "s1".into(),
            start_after_revert: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let list = c.list_snapshots(id(&vm.vm_id)).await.unwrap().into_inner();
    assert_eq!(list.snapshots.len(), 1);
    assert_eq!(list.snapshots[0].id, "s2");
}

#[tokio::test]
async fn change_media_inserts_swaps_and_ejects_with_precise_errors() {
    let mut h = harness().await;
    let vm = create(&mut h, "media").await;
    let a = h.file("a.iso", b"A");
    let b = h.file("b.iso", b"B");
    let change = |device: &str, iso: &str| pb::ChangeMediaRequest {
        vm_id: vm.vm_id.clone(),
        device: device.to_string(),
        iso_path: iso.to_string(),
    };
    let agent_iso = h.agent_iso().to_string_lossy().into_owned();
    // Missing, inside the media directory (the harness's directory).
    let missing = h
        .dir
        .path()
        .join("missing.iso")
        .to_string_lossy()
        .into_owned();
    let c = &mut h.client;
    let r = c.change_media(change("", &a)).await.unwrap().into_inner();
    assert_eq!(
        (r.device.as_str(), r.inserted.as_str(), r.previous.as_str()),
        ("sda", a.as_str(), "")
    );
    let r = c
        .change_media(change("sda", &b))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.inserted.as_str(), r.previous.as_str()),
        (b.as_str(), a.as_str())
    );
    let r = c.change_media(change("", "")).await.unwrap().into_inner();
    assert_eq!((r.inserted.as_str(), r.previous.as_str()), ("", b.as_str()));

    let codes = [
        c.change_media(change("", &missing))
            .await
            .unwrap_err()
            .code(),
        c.change_media(change("", "relative.iso"))
            .await
            .unwrap_err()
            .code(),
        c.change_media(change("vda", &a)).await.unwrap_err().code(),
        c.change_media(change("sdz", &a)).await.unwrap_err().code(),
    ];
    assert_eq!(
        codes,
        [
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::NotFound
        ]
    );

    let r = c.mount_agent_iso(id(&vm.vm_id)).await.unwrap().into_inner();
    assert_eq!(r.inserted, agent_iso);
    let r = c.eject_agent_iso(id(&vm.vm_id)).await.unwrap().into_inner();
    assert_eq!(r.inserted, "");
    assert_eq!(
        c.eject_agent_iso(id(&vm.vm_id)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // A VM without a CD-ROM drive.
    let mut r = create_req("nocd");
    r.spec.as_mut().unwrap().disks.truncate(1);
    let nocd = c.create_vm(r).await.unwrap().into_inner();
    let err = c
        .change_media(pb::ChangeMediaRequest {
            vm_id: nocd.vm_id,
            device: String::new(),
            iso_path: a.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // libvirt's test driver has no live device update: on a running VM that is reported
    // as unimplemented, never faked.
    c.start_vm(id(&vm.vm_id)).await.unwrap();
    let err = c.change_media(change("", &a)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

async fn next_event(stream: &mut tonic::Streaming<pb::NodeEvent>) -> pb::NodeEvent {
    // A guard against a hang, not a timing assertion.
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("no event within 20 s")
        .expect("stream ended")
        .expect("stream error")
}

async fn events_until(
    stream: &mut tonic::Streaming<pb::NodeEvent>,
    vm: &str,
    last: pb::EventKind,
) -> Vec<pb::NodeEvent> {
    let mut seen = Vec::new();
    loop {
        let e = next_event(stream).await;
        let done = e.vm_id == vm && e.kind == last as i32;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// The VM's lifecycle, snapshot and media events (agent connection events are the agent
/// manager's business and left out).
fn kinds(events: &[pb::NodeEvent], vm: &str) -> Vec<pb::EventKind> {
    use pb::EventKind::*;
    events
        .iter()
        .filter(|e| e.vm_id == vm)
        .map(|e| pb::EventKind::try_from(e.kind).unwrap())
        .filter(|k| !matches!(k, AgentConnected | AgentDisconnected | AgentRestarted))
        .collect()
}

#[tokio::test]
async fn events_are_sequenced_filtered_and_resumable() {
    let mut h = harness().await;
    let mut all = h
        .client
        .stream_events(pb::StreamEventsRequest {
            after_seq: 0,
            vm_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let vm = create(&mut h, "evt").await;
    let other = create(&mut h, "evt-other").await;
    let c = &mut h.client;
    c.start_vm(id(&vm.vm_id)).await.unwrap();
    c.pause_vm(id(&vm.vm_id)).await.unwrap();
    c.resume_vm(id(&vm.vm_id)).await.unwrap();
    c.create_snapshot(pb::CreateSnapshotRequest {
        vm_id: vm.vm_id.clone(),
        name: "e1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.force_stop_vm(id(&vm.vm_id)).await.unwrap();
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: vm.vm_id.clone(),
        delete_storage: true,
        force: false,
    })
    .await
    .unwrap();

    let seen = events_until(&mut all, &vm.vm_id, pb::EventKind::VmUndefined).await;
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    use pb::EventKind::*;
    assert_eq!(
        kinds(&seen, &vm.vm_id),
        [
            VmDefined,
            VmStarted,
            VmPaused,
            VmResumed,
            SnapshotCreated,
            VmStopped,
            VmUndefined
        ]
    );
    assert_eq!(kinds(&seen, &other.vm_id), [VmDefined]);

    // Resume after the "started" event, for this VM only: replayed from the ring.
    let started = seen
        .iter()
        .find(|e| e.vm_id == vm.vm_id && e.kind == VmStarted as i32)
        .unwrap();
    let mut resumed = h
        .client
        .stream_events(pb::StreamEventsRequest {
            after_seq: started.seq,
            vm_id: vm.vm_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let replay = events_until(&mut resumed, &vm.vm_id, VmUndefined).await;
    assert_eq!(
        kinds(&replay, &vm.vm_id),
        [VmPaused, VmResumed, SnapshotCreated, VmStopped, VmUndefined]
    );
    assert!(replay
        .iter()
        .all(|e| e.vm_id == vm.vm_id && e.seq > started.seq));

    // Live events keep flowing on the resumed stream.
    h.client.start_vm(id(&other.vm_id)).await.unwrap();
    let mut other_stream = h
        .client
        .stream_events(pb::StreamEventsRequest {
            after_seq: replay.last().unwrap().seq,
            vm_id: other.vm_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let e = loop {
        let e = next_event(&mut other_stream).await;
        if !kinds(std::slice::from_ref(&e), &other.vm_id).is_empty() {
            break e;
        }
    };
    assert_eq!(
        (e.vm_id.as_str(), e.kind),
        (other.vm_id.as_str(), VmStarted as i32)
    );
}

#[tokio::test]
async fn metrics_stream_samples_a_running_vm() {
    let mut h = harness().await;
    let mut r = create_req("metered");
    r.start = true;
    let vm = h.client.create_vm(r).await.unwrap().into_inner();
    let mut stream = h
        .client
        .stream_metrics(pb::StreamMetricsRequest {
            vm_id: vm.vm_id.clone(),
            interval_ms: 100,
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.vm_id, vm.vm_id);
        assert_eq!(m.memory_bytes, 128 * 1024 * 1024);
        assert!(m.unix_ms > 0);
    }
}

#[tokio::test]
async fn console_needs_a_running_vm() {
    let mut h = harness().await;
    let vm = create(&mut h, "cons").await;
    let err = h.client.get_console(id(&vm.vm_id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn stopping_a_paused_vm_skips_agent_and_acpi_and_forces() {
    let mut h = harness().await;
    let mut r = create_req("paused");
    r.start = true;
    let vm = h.client.create_vm(r).await.unwrap().into_inner();
    h.client.pause_vm(id(&vm.vm_id)).await.unwrap();
    let stop = h
        .client
        .stop_vm(pb::StopVmRequest {
            vm_id: vm.vm_id.clone(),
            timeout_s: 1,
            skip_agent: false,
        })
        .await
        .unwrap()
        .into_inner();
    let attempted: Vec<bool> = stop.steps.iter().map(|s| s.attempted).collect();
    assert_eq!(attempted, [false, false, true], "{:?}", stop.steps);
    assert_eq!(stop.stopped_by, pb::StopStep::Force as i32);
    assert_eq!(state(stop.status.as_ref().unwrap()), pb::VmState::Stopped);
}

/// Reverting a running VM to a snapshot resets its agent link: the guest went back in time,
/// so a command in flight fails "VM reverted" at once, and the link meets the agent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_resets_the_agent_link_and_fails_commands_in_flight() {
    use agent_support::{RealAgent, Relay};
    let mut h = harness().await;
    let vm = create(&mut h, "vm12-revert").await;
    // QEMU's chardev, played by a relay at the socket the domain names, with the real agent.
    std::fs::create_dir_all(h.sockets()).unwrap();
    let relay = Relay::start(&h.sockets(), &vm.vm_id);
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let c = &mut h.client;
    c.start_vm(id(&vm.vm_id)).await.unwrap();
    c.create_snapshot(pb::CreateSnapshotRequest {
        vm_id: vm.vm_id.clone(),
        name: "before".into(),
        description: String::new(),
        quiesce: false,
        include_memory: false,
    })
    .await
    .unwrap();
    let ping = pb::AgentRequest {
        vm_id: vm.vm_id.clone(),
        timeout_ms: 10_000,
    };
    c.ping_agent(ping.clone()).await.unwrap();
    let stats = |c: &mut Client| {
        let mut c = c.clone();
        let vm_id = vm.vm_id.clone();
        async move {
            c.get_agent_connection_stats(pb::AgentStatsRequest { vm_id })
                .await
                .unwrap()
                .into_inner()
                .connections
                .remove(0)
        }
    };
    // Nothing else in flight (the link's own interface query is done), then the exec.
    let acked = loop {
        let s = stats(c).await;
        if s.in_flight == 0 {
            break s.commands.unwrap().acknowledged;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut exec_client = c.clone();
    let exec = pb::ExecuteInGuestRequest {
        vm_id: vm.vm_id.clone(),
        exec: Some(qx_proto::agent::ExecRequest {
            argv: vec!["sleep".into(), "5".into()],
            ..Default::default()
        }),
        timeout_ms: 0,
    };
    let running = tokio::spawn(async move { exec_client.execute_in_guest(exec).await });
    loop {
        let s = stats(c).await;
        let n = s.commands.unwrap();
        if (s.in_flight == 1 && n.acknowledged > acked) || running.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = stats(c).await.connection_id;
    c.revert_snapshot(pb::SnapshotRequest {
        vm_id: vm.vm_id.clone(),
        snapshot_id: "before".into(),
        start_after_revert: false,
    })
    .await
    .unwrap();
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("VM reverted"), "{}", err.message());
    c.ping_agent(ping).await.unwrap();
    assert!(stats(c).await.connection_id > before);
}
