//! The attacks on the VM API that the daemon must refuse, through a real in-process tonic
//! server over libvirt's test driver: host files outside every allowed directory as disks,
//! media, kernels or initrds (also through symlinks), DeleteVM{delete_storage} of files that
//! qx-node did not create, and requests too large to handle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qx_node::agent_api::AgentApi;
use qx_node::pb;
use qx_node::pb::node_daemon_service_client::NodeDaemonServiceClient;
use qx_node::pb::node_daemon_service_server::NodeDaemonServiceServer;
use qx_node::service::NodeService;
use qx_node::vm_api::{VmApi, VmConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

struct Harness {
    client: NodeDaemonServiceClient<Channel>,
    vm: Arc<VmApi>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }
    fn media(&self) -> PathBuf {
        self.dir.path().join("media")
    }
    /// A file outside every directory the daemon may use.
    fn outside(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, b"precious").unwrap();
        p
    }
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(&node, "<node/>").unwrap();
    std::fs::create_dir_all(dir.path().join("media")).unwrap();
    let config = VmConfig {
        libvirt_uri: format!("test://{}", node.display()),
        socket_dir: dir.path().join("sock"),
        image_dir: dir.path().join("images"),
        agent_iso: None,
        disk_roots: Vec::new(),
        media_dirs: vec![dir.path().join("media")],
    };
    let agent = Arc::new(AgentApi::default());
    let vm = Arc::new(VmApi::new(config, agent.clone()).unwrap());
    let service = NodeService {
        vm: vm.clone(),
        agent,
    };
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
    Harness { client, vm, dir }
}

fn request(name: &str, disks: Vec<pb::DiskSpec>) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: name.to_string(),
        spec: Some(pb::VmSpec {
            cpu_cores: 1,
            memory_mib: 64,
            disks,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn disk_at(path: &Path) -> pb::DiskSpec {
    pb::DiskSpec {
        path: path.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

fn new_disk() -> pb::DiskSpec {
    pb::DiskSpec {
        size_gib: 1,
        ..Default::default()
    }
}

fn cdrom() -> pb::DiskSpec {
    pb::DiskSpec {
        cdrom: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_disk_outside_every_allowed_directory_is_permission_denied() {
    let mut h = harness().await;
    std::fs::create_dir_all(h.images()).unwrap();
    let foreign = h.outside("foreign.qcow2");
    // A symlink inside the image directory that leads out of it.
    let link = h.images().join("link.qcow2");
    std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
    let link2 = h.images().join("link2.qcow2");
    std::os::unix::fs::symlink(&foreign, &link2).unwrap();
    for (i, path) in [
        Path::new("/etc/shadow"),
        foreign.as_path(),
        link.as_path(),
        link2.as_path(),
        Path::new("/var/../etc/shadow"),
    ]
    .into_iter()
    .enumerate()
    {
        let err = h
            .client
            .create_vm(request(&format!("evil-{i}"), vec![disk_at(path)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{path:?}: {err:?}");
        assert!(
            err.message().contains("outside"),
            "{path:?}: {}",
            err.message()
        );
    }
    let vms = h.client.list_v_ms(pb::ListVmsRequest {}).await.unwrap();
    assert!(vms.into_inner().vms.is_empty());

    // Inside the image directory, by path: accepted.
    let ok = h.images().join("mine.qcow2");
    std::fs::write(&ok, b"disk").unwrap();
    h.client
        .create_vm(request("good", vec![disk_at(&ok)]))
        .await
        .unwrap();
}

#[tokio::test]
async fn delete_storage_deletes_only_the_volumes_qx_node_created_for_the_vm() {
    let mut h = harness().await;
    std::fs::create_dir_all(h.images()).unwrap();
    // A base image shared by two VMs, attached by path: not theirs to delete.
    let base = h.images().join("base.qcow2");
    std::fs::write(&base, b"shared base").unwrap();
    let a = h
        .client
        .create_vm(request("share-a", vec![new_disk(), disk_at(&base)]))
        .await
        .unwrap()
        .into_inner();
    let b = h
        .client
        .create_vm(request("share-b", vec![disk_at(&base)]))
        .await
        .unwrap()
        .into_inner();
    let created = h.images().join(format!("{}-vda.qcow2", a.vm_id));
    assert!(created.exists());
    let r = h
        .client
        .delete_vm(pb::DeleteVmRequest {
            vm_id: a.vm_id.clone(),
            force: false,
            delete_storage: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.deleted_volumes,
        [created.to_string_lossy().into_owned()],
        "only the image created for the VM"
    );
    assert!(!created.exists());
    assert_eq!(std::fs::read(&base).unwrap(), b"shared base");
    let r = h
        .client
        .delete_vm(pb::DeleteVmRequest {
            vm_id: b.vm_id,
            force: false,
            delete_storage: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.deleted_volumes.is_empty(), "{r:?}");
    assert_eq!(std::fs::read(&base).unwrap(), b"shared base");
}

#[tokio::test]
async fn media_kernels_and_initrds_come_only_from_the_media_directories() {
    let mut h = harness().await;
    std::fs::create_dir_all(h.images()).unwrap();
    let iso = h.media().join("a.iso");
    std::fs::write(&iso, b"iso").unwrap();
    let kernel = h.media().join("vmlinuz");
    std::fs::write(&kernel, b"kernel").unwrap();
    let not_media = h.images().join("b.iso");
    std::fs::write(&not_media, b"iso").unwrap();
    let foreign = h.outside("secret");
    let link = h.media().join("link.iso");
    std::os::unix::fs::symlink(&foreign, &link).unwrap();

    let vm = h
        .client
        .create_vm(request("media", vec![cdrom()]))
        .await
        .unwrap()
        .into_inner();
    let change = |p: &Path| pb::ChangeMediaRequest {
        vm_id: vm.vm_id.clone(),
        device: String::new(),
        iso_path: p.to_string_lossy().into_owned(),
    };
    for p in [
        Path::new("/etc/shadow"),
        not_media.as_path(),
        link.as_path(),
    ] {
        let err = h.client.change_media(change(p)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{p:?}: {err:?}");
    }
    let r = h.client.change_media(change(&iso)).await.unwrap();
    assert_eq!(r.into_inner().inserted, iso.to_string_lossy());

    let boot = |k: &Path, i: Option<&Path>| {
        let mut r = request("direct", vec![]);
        let s = r.spec.as_mut().unwrap();
        s.kernel_path = k.to_string_lossy().into_owned();
        s.initrd_path = i
            .map(|i| i.to_string_lossy().into_owned())
            .unwrap_or_default();
        r
    };
    for r in [
        boot(Path::new("/etc/shadow"), None),
        boot(&foreign, None),
        boot(&kernel, Some(Path::new("/etc/shadow"))),
        boot(&kernel, Some(&link)),
    ] {
        let err = h.client.create_vm(r.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{r:?}: {err:?}");
    }
    h.client.create_vm(boot(&kernel, None)).await.unwrap();
}

#[tokio::test]
async fn oversized_requests_are_refused_naming_the_limit() {
    let mut h = harness().await;
    let mut cases: Vec<(pb::CreateVmRequest, &str)> = Vec::new();
    cases.push((request("many-disks", vec![cdrom(); 10_000]), "disks"));
    let mut r = request("many-nics", vec![]);
    r.spec.as_mut().unwrap().nics = vec![pb::NicSpec::default(); 1000];
    cases.push((r, "NICs"));
    let mut r = request("many-labels", vec![]);
    r.labels = (0..10_000).map(|i| (format!("k{i}"), "v".into())).collect();
    cases.push((r, "labels"));
    let mut r = request("long-cmdline", vec![]);
    r.spec.as_mut().unwrap().kernel_cmdline = "x".repeat(1 << 20);
    cases.push((r, "kernel_cmdline"));
    let mut r = request("long-path", vec![]);
    r.spec.as_mut().unwrap().disks = vec![pb::DiskSpec {
        path: format!("/{}", "a".repeat(1 << 20)),
        ..Default::default()
    }];
    cases.push((r, "path"));
    let mut r = request("many-boot", vec![]);
    r.spec.as_mut().unwrap().boot_order = vec![pb::BootDevice::Disk as i32; 100_000];
    cases.push((r, "boot_order"));
    for (r, what) in cases {
        let name = r.name.clone();
        let err = h.client.create_vm(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(
            err.message().contains("at most") && err.message().contains(what),
            "{name}: the message names the limit: {}",
            err.message()
        );
    }
    let vms = h.client.list_v_ms(pb::ListVmsRequest {}).await.unwrap();
    assert!(vms.into_inner().vms.is_empty());
}

#[tokio::test]
async fn metrics_subscribers_share_one_poller() {
    let mut h = harness().await;
    let mut r = request("metered", vec![]);
    r.start = true;
    let vm = h.client.create_vm(r).await.unwrap().into_inner();
    const SUBSCRIBERS: usize = 8;
    const SAMPLES: usize = 3;
    let mut streams = Vec::new();
    for i in 0..SUBSCRIBERS {
        let req = pb::StreamMetricsRequest {
            // Half for the VM, half for every VM; all at the same (floored) interval.
            vm_id: if i % 2 == 0 {
                vm.vm_id.clone()
            } else {
                String::new()
            },
            interval_ms: 100,
        };
        streams.push(h.client.stream_metrics(req).await.unwrap().into_inner());
    }
    for _ in 0..SAMPLES {
        for s in &mut streams {
            let m = tokio::time::timeout(std::time::Duration::from_secs(60), s.next())
                .await
                .expect("a sample within the hang guard")
                .unwrap()
                .unwrap();
            assert_eq!(m.vm_id, vm.vm_id);
        }
    }
    let polls = h.vm.metrics_polls();
    // Every subscriber got SAMPLES samples; one poller per subscriber would have sampled
    // libvirt SUBSCRIBERS * SAMPLES times.
    assert!(
        polls < (SUBSCRIBERS * SAMPLES / 2) as u64,
        "{polls} libvirt polls for {SUBSCRIBERS} subscribers of {SAMPLES} samples"
    );
}
