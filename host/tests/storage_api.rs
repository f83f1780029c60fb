//! The storage RPCs through a real in-process tonic server over libvirt's test driver (a
//! private `test:///<tmp>/node.xml` hypervisor per test): each RPC's answer and its errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qx_node::agent_api::AgentApi;
use qx_node::pb;
use qx_node::pb::node_daemon_service_client::NodeDaemonServiceClient;
use qx_node::pb::node_daemon_service_server::NodeDaemonServiceServer;
use qx_node::service::NodeService;
use qx_node::vm_api::{VmApi, VmConfig};
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

type Client = NodeDaemonServiceClient<Channel>;

const GIB: u64 = 1 << 30;

async fn client() -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(&node, "<node/>").unwrap();
    let config = VmConfig {
        libvirt_uri: format!("test://{}", node.display()),
        socket_dir: dir.path().join("sock"),
        image_dir: dir.path().join("images"),
        ..Default::default()
    };
    let agent = Arc::new(AgentApi::default());
    let vm = Arc::new(VmApi::new(config, agent.clone()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        qx_node::listen::grpc_server()
            .add_service(NodeDaemonServiceServer::new(NodeService { vm, agent }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let c = NodeDaemonServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (c, dir)
}

fn dir_pool(name: &str, path: &str) -> pb::InitStoragePoolRequest {
    pb::InitStoragePoolRequest {
        pool_id: name.into(),
        r#type: pb::StoragePoolType::Dir as i32,
        target_path: path.into(),
        ..Default::default()
    }
}

fn vol(pool: &str, name: &str) -> pb::VolumeRequest {
    pb::VolumeRequest {
        pool_id: pool.into(),
        volume_id: name.into(),
    }
}

fn pool_req(pool: &str) -> pb::StoragePoolRequest {
    pb::StoragePoolRequest {
        pool_id: pool.into(),
    }
}

#[tokio::test]
async fn pools_are_defined_started_listed_refreshed_and_deleted() {
    let (mut c, _dir) = client().await;
    let p = c
        .init_storage_pool(dir_pool("pool16", "/qx16/pool"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.pool_id, "pool16");
    assert_eq!(p.r#type, pb::StoragePoolType::Dir as i32);
    assert_eq!(p.state, pb::StoragePoolState::Running as i32);
    assert_eq!(p.target_path, "/qx16/pool");
    assert!(p.capacity_bytes > 0 && p.available_bytes <= p.capacity_bytes);
    assert!(!p.uuid.is_empty());

    let err = c
        .init_storage_pool(dir_pool("pool16", "/qx16/other"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let list = c
        .list_storage_pools(pb::ListStoragePoolsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.pools
            .iter()
            .map(|p| p.pool_id.as_str())
            .collect::<Vec<_>>(),
        ["pool16"]
    );
    let r = c.refresh_storage_pool(pool_req("pool16")).await.unwrap();
    assert_eq!(r.into_inner().pool_id, "pool16");
    let g = c.get_storage_pool(pool_req("pool16")).await.unwrap();
    assert_eq!(g.into_inner().volume_count, 0);

    // Errors: unknown pool, bad names, bad or missing sources, every type's requirements.
    let codes = [
        c.get_storage_pool(pool_req("nope"))
            .await
            .unwrap_err()
            .code(),
        c.get_storage_pool(pool_req("../x"))
            .await
            .unwrap_err()
            .code(),
        c.init_storage_pool(dir_pool("rel", "relative"))
            .await
            .unwrap_err()
            .code(),
        c.init_storage_pool(pb::InitStoragePoolRequest {
            pool_id: "nfs16".into(),
            r#type: pb::StoragePoolType::Netfs as i32,
            target_path: "/mnt/x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        c.init_storage_pool(pb::InitStoragePoolRequest {
            pool_id: "none16".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        c.delete_storage_pool(pb::DeleteStoragePoolRequest {
            pool_id: "nope".into(),
            delete_data: false,
        })
        .await
        .unwrap_err()
        .code(),
    ];
    assert_eq!(
        codes,
        [
            Code::NotFound,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::NotFound
        ]
    );

    // A pool with a volume keeps its data unless the volume goes first.
    c.create_volume(pb::CreateVolumeRequest {
        pool_id: "pool16".into(),
        volume_id: "v".into(),
        size_bytes: GIB,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c
        .delete_storage_pool(pb::DeleteStoragePoolRequest {
            pool_id: "pool16".into(),
            delete_data: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    c.delete_volume(vol("pool16", "v")).await.unwrap();
    c.delete_storage_pool(pb::DeleteStoragePoolRequest {
        pool_id: "pool16".into(),
        delete_data: false,
    })
    .await
    .unwrap();
    let list = c
        .list_storage_pools(pb::ListStoragePoolsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.pools.is_empty(), "{list:?}");
}

#[tokio::test]
async fn volumes_are_created_listed_resized_cloned_and_deleted() {
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("vols16", "/qx16/vols"))
        .await
        .unwrap();
    let base = c
        .create_volume(pb::CreateVolumeRequest {
            pool_id: "vols16".into(),
            volume_id: "base".into(),
            size_bytes: GIB,
            format: "qcow2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            base.volume_id.as_str(),
            base.format.as_str(),
            base.capacity_bytes
        ),
        ("base", "qcow2", GIB)
    );
    assert_eq!(base.path, "/qx16/vols/base");
    assert!(!base.key.is_empty());

    // A thin clone: a qcow2 overlay on the base, its size by default.
    let thin = c
        .create_volume(pb::CreateVolumeRequest {
            pool_id: "vols16".into(),
            volume_id: "thin".into(),
            backing_volume: "base".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(thin.backing_path, base.path);
    assert_eq!(thin.capacity_bytes, GIB);

    // A full clone with progress: the last message says done and names the new volume.
    let mut progress = c
        .clone_volume(pb::CloneVolumeRequest {
            pool_id: "vols16".into(),
            volume_id: "base".into(),
            new_volume_id: "copy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = progress.next().await {
        let p = p.unwrap();
        assert!(p.done_bytes <= p.total_bytes || p.total_bytes == 0, "{p:?}");
        last = Some(p);
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(last.volume.unwrap().volume_id, "copy");

    let list = c
        .list_volumes(pool_req("vols16"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.volumes
            .iter()
            .map(|v| v.volume_id.as_str())
            .collect::<Vec<_>>(),
        ["base", "copy", "thin"]
    );

    // Resize: shrinking only when asked for (checked before libvirt). Growing reaches the
    // driver, and libvirt's test driver has no resize: reported as such (qemu:///system
    // grows for real in vm_qemu's storage test).
    let err = c
        .resize_volume(pb::ResizeVolumeRequest {
            pool_id: "vols16".into(),
            volume_id: "copy".into(),
            size_bytes: 2 * GIB,
            allow_shrink: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = c
        .resize_volume(pb::ResizeVolumeRequest {
            pool_id: "vols16".into(),
            volume_id: "copy".into(),
            size_bytes: GIB / 2,
            allow_shrink: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("allow_shrink"), "{err:?}");

    // Errors.
    let create = |name: &str, size: u64, format: &str, backing: &str| pb::CreateVolumeRequest {
        pool_id: "vols16".into(),
        volume_id: name.into(),
        size_bytes: size,
        format: format.into(),
        backing_volume: backing.into(),
    };
    let codes = [
        c.create_volume(create("base", GIB, "", ""))
            .await
            .unwrap_err()
            .code(),
        c.create_volume(create("x", 0, "", ""))
            .await
            .unwrap_err()
            .code(),
        c.create_volume(create("x", GIB, "vmdk", ""))
            .await
            .unwrap_err()
            .code(),
        c.create_volume(create("x", GIB, "raw", "base"))
            .await
            .unwrap_err()
            .code(),
        c.create_volume(create("x", 0, "", "missing"))
            .await
            .unwrap_err()
            .code(),
        c.create_volume(create("a/b", GIB, "", ""))
            .await
            .unwrap_err()
            .code(),
        c.get_volume(vol("vols16", "missing"))
            .await
            .unwrap_err()
            .code(),
        c.get_volume(vol("nopool", "base"))
            .await
            .unwrap_err()
            .code(),
        // The base backs the thin clone: it stays.
        c.delete_volume(vol("vols16", "base"))
            .await
            .unwrap_err()
            .code(),
    ];
    assert_eq!(
        codes,
        [
            Code::AlreadyExists,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::NotFound,
            Code::InvalidArgument,
            Code::NotFound,
            Code::NotFound,
            Code::FailedPrecondition
        ]
    );
    c.delete_volume(vol("vols16", "thin")).await.unwrap();
    c.delete_volume(vol("vols16", "base")).await.unwrap();
    let err = c.get_volume(vol("vols16", "base")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn transfers_need_a_header_and_say_what_the_driver_cannot_do() {
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("xfer16", "/qx16/xfer"))
        .await
        .unwrap();
    c.create_volume(pb::CreateVolumeRequest {
        pool_id: "xfer16".into(),
        volume_id: "raw".into(),
        size_bytes: 1 << 20,
        format: "raw".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Data before the header.
    let msgs = vec![pb::UploadVolumeRequest {
        part: Some(pb::upload_volume_request::Part::Data(vec![1, 2, 3])),
    }];
    let err = c.upload_volume(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A header without a size.
    let msgs = vec![pb::UploadVolumeRequest {
        part: Some(pb::upload_volume_request::Part::Header(
            pb::UploadVolumeHeader {
                pool_id: "xfer16".into(),
                volume_id: "raw".into(),
                offset: 0,
                size: 0,
            },
        )),
    }];
    let err = c.upload_volume(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // libvirt's test driver has no volume streams: reported as such, never faked.
    let err = c
        .download_volume(pb::DownloadVolumeRequest {
            pool_id: "xfer16".into(),
            volume_id: "raw".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = c
        .download_volume(pb::DownloadVolumeRequest {
            pool_id: "xfer16".into(),
            volume_id: "missing".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn vm_disks_from_volumes_and_delete_storage_removes_only_the_vms_own() {
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("vmvols16", "/qx16/vmvols"))
        .await
        .unwrap();
    c.create_volume(pb::CreateVolumeRequest {
        pool_id: "vmvols16".into(),
        volume_id: "shared".into(),
        size_bytes: GIB,
        format: "raw".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let disk = |pool: &str, volume: &str, gib: u64| pb::DiskSpec {
        pool: pool.into(),
        volume: volume.into(),
        size_gib: gib,
        ..Default::default()
    };
    let create = |name: &str, disks: Vec<pb::DiskSpec>| pb::CreateVmRequest {
        name: name.into(),
        spec: Some(pb::VmSpec {
            cpu_cores: 1,
            memory_mib: 64,
            disks,
            ..Default::default()
        }),
        ..Default::default()
    };
    // An existing volume attached, and a new one created in the pool for the VM.
    let vm = c
        .create_vm(create(
            "onvols",
            vec![disk("vmvols16", "shared", 0), disk("vmvols16", "", 2)],
        ))
        .await
        .unwrap()
        .into_inner();
    let own = format!("{}-disk1", vm.vm_id);
    let v = c
        .get_volume(vol("vmvols16", &own))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v.capacity_bytes, v.format.as_str()), (2 * GIB, "qcow2"));
    // In use: not deletable.
    let err = c
        .delete_volume(vol("vmvols16", "shared"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Errors: unknown pool, missing volume without a size, a volume with a path; nothing is
    // left behind by a refused CreateVM.
    let codes = [
        c.create_vm(create("e1", vec![disk("nopool", "x", 1)]))
            .await
            .unwrap_err()
            .code(),
        c.create_vm(create("e2", vec![disk("vmvols16", "missing", 0)]))
            .await
            .unwrap_err()
            .code(),
        c.create_vm(create(
            "e3",
            vec![disk("vmvols16", "", 1), disk("vmvols16", "missing", 0)],
        ))
        .await
        .unwrap_err()
        .code(),
    ];
    assert_eq!(codes, [Code::NotFound, Code::NotFound, Code::NotFound]);
    let names: Vec<String> = c
        .list_volumes(pool_req("vmvols16"))
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    assert_eq!(names, [own.clone(), "shared".to_string()]);

    let r = c
        .delete_vm(pb::DeleteVmRequest {
            vm_id: vm.vm_id.clone(),
            delete_storage: true,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted_volumes, [format!("/qx16/vmvols/{own}")]);
    c.get_volume(vol("vmvols16", "shared")).await.unwrap();
    let err = c.get_volume(vol("vmvols16", &own)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn qxctl_pool_and_volume_commands_return_exit_codes() {
    use qx_node::cli::exit;
    use qx_node::cli::storage_cmds::{
        run_pool, run_volume, PoolCommand, PoolCreateArgs, VolumeCommand,
    };
    let (mut c, _dir) = client().await;
    let create = PoolCreateArgs {
        pool: "cli16".into(),
        kind: "dir".into(),
        target: Some("/qx16/cli".into()),
        source_host: None,
        source_path: None,
        source_device: None,
        source_name: None,
        auth_user: None,
        auth_secret: None,
        build: false,
        autostart: false,
    };
    assert_eq!(
        run_pool(PoolCommand::Create(create), &mut c, true)
            .await
            .unwrap(),
        exit::OK
    );
    assert_eq!(
        run_pool(PoolCommand::List, &mut c, false).await.unwrap(),
        exit::OK
    );
    let info = PoolCommand::Info {
        pool: "cli16".into(),
    };
    assert_eq!(run_pool(info, &mut c, false).await.unwrap(), exit::OK);
    let refresh = PoolCommand::Refresh {
        pool: "cli16".into(),
    };
    assert_eq!(run_pool(refresh, &mut c, true).await.unwrap(), exit::OK);
    let vc = VolumeCommand::Create {
        pool: "cli16".into(),
        volume: "v".into(),
        size: Some("1G".into()),
        format: "qcow2".into(),
        backing: None,
    };
    assert_eq!(run_volume(vc, &mut c, false).await.unwrap(), exit::OK);
    let clone = VolumeCommand::Clone {
        pool: "cli16".into(),
        volume: "v".into(),
        new_volume: "w".into(),
    };
    assert_eq!(run_volume(clone, &mut c, true).await.unwrap(), exit::OK);
    let list = VolumeCommand::List {
        pool: "cli16".into(),
    };
    assert_eq!(run_volume(list, &mut c, false).await.unwrap(), exit::OK);
    let info = VolumeCommand::Info {
        pool: "cli16".into(),
        volume: "w".into(),
    };
    assert_eq!(run_volume(info, &mut c, true).await.unwrap(), exit::OK);
    // Failures come back as gRPC statuses, which qxctl maps to its exit codes.
    let missing = VolumeCommand::Info {
        pool: "cli16".into(),
        volume: "nope".into(),
    };
    let err = run_volume(missing, &mut c, false).await.unwrap_err();
    let status = err.downcast_ref::<tonic::Status>().unwrap();
    assert_eq!(qx_node::cli::agent_cmds::code_for(status), exit::NOT_FOUND);
    let snapshot = VolumeCommand::Snapshot {
        pool: "cli16".into(),
        volume: "nope".into(),
        snapshot: "s".into(),
    };
    let err = run_volume(snapshot, &mut c, false).await.unwrap_err();
    let status = err.downcast_ref::<tonic::Status>().unwrap();
    assert_eq!(qx_node::cli::agent_cmds::code_for(status), exit::NOT_FOUND);
    for v in ["w", "v"] {
        let del = VolumeCommand::Delete {
            pool: "cli16".into(),
            volume: v.into(),
        };
        assert_eq!(run_volume(del, &mut c, false).await.unwrap(), exit::OK);
    }
    let del = PoolCommand::Delete {
        pool: "cli16".into(),
        delete_data: false,
    };
    assert_eq!(run_pool(del, &mut c, false).await.unwrap(), exit::OK);
}

#[tokio::test]
async fn qxctl_vm_create_attaches_a_pool_volume_and_creates_one_with_disk_size() {
    use clap::Parser;
    use qx_node::cli::exit;
    use qx_node::cli::vm_cmds::{run_vm, VmCommand};
    #[derive(Debug, Parser)]
    struct T {
        #[command(subcommand)]
        vm: VmCommand,
    }
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("clivm16", "/qx16/clivm"))
        .await
        .unwrap();
    c.create_volume(pb::CreateVolumeRequest {
        pool_id: "clivm16".into(),
        volume_id: "root".into(),
        size_bytes: GIB,
        ..Default::default()
    })
    .await
    .unwrap();
    let vm_create = |args: &[&str]| {
        let mut all = vec!["t", "create"];
        all.extend_from_slice(args);
        T::try_parse_from(all).unwrap().vm
    };
    let id = "6b0e2a39-3f51-4c1b-9d7e-16a0000c0001";
    let create = vm_create(&[
        "onvol",
        "--id",
        id,
        "--pool",
        "clivm16",
        "--volume",
        "root",
        "--volume",
        "data",
        "--disk-size",
        "2G",
    ]);
    assert_eq!(run_vm(create, &mut c, true).await.unwrap(), exit::OK);
    // root attached as it was; data created for the VM, 2 GiB.
    let data = c
        .get_volume(vol("clivm16", "data"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (data.capacity_bytes, data.format.as_str()),
        (2 * GIB, "qcow2")
    );
    let root = c
        .get_volume(vol("clivm16", "root"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(root.capacity_bytes, GIB);
    // A missing volume without --disk-size: NOT_FOUND, which qxctl turns into its exit code.
    let missing = vm_create(&["other", "--pool", "clivm16", "--volume", "nope"]);
    assert_eq!(
        run_vm(missing, &mut c, false).await.unwrap(),
        exit::NOT_FOUND
    );
    // Deleted with its storage: only the volume created for it goes.
    let r = c
        .delete_vm(pb::DeleteVmRequest {
            vm_id: id.into(),
            delete_storage: true,
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted_volumes, ["/qx16/clivm/data"]);
    c.get_volume(vol("clivm16", "root")).await.unwrap();
}

#[tokio::test]
async fn volume_snapshots_refuse_what_would_change_under_the_overlay() {
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("snap16", "/qx16/snap"))
        .await
        .unwrap();
    let create = |name: &str, format: &str, backing: &str| pb::CreateVolumeRequest {
        pool_id: "snap16".into(),
        volume_id: name.into(),
        size_bytes: GIB,
        format: format.into(),
        backing_volume: backing.into(),
    };
    for (name, format, backing) in [
        ("base", "raw", ""),
        ("clone", "qcow2", "base"),
        ("rawdisk", "raw", ""),
        ("live", "qcow2", ""),
        ("taken", "qcow2", ""),
    ] {
        c.create_volume(create(name, format, backing))
            .await
            .unwrap();
    }
    let vm = |name: &str, volume: &str, start: bool| pb::CreateVmRequest {
        name: name.into(),
        start,
        spec: Some(pb::VmSpec {
            cpu_cores: 1,
            memory_mib: 64,
            disks: vec![pb::DiskSpec {
                pool: "snap16".into(),
                volume: volume.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    c.create_vm(vm("stopped", "rawdisk", false)).await.unwrap();
    c.create_vm(vm("running", "live", true)).await.unwrap();
    let snap = |volume: &str, snapshot: &str| pb::SnapshotVolumeRequest {
        pool_id: "snap16".into(),
        volume_id: volume.into(),
        snapshot_id: snapshot.into(),
    };
    let cases = [
        (snap("base", "../x"), Code::InvalidArgument, "snapshot_id"),
        (snap("", "s"), Code::InvalidArgument, "volume_id"),
        (snap("nope", "s"), Code::NotFound, "no volume"),
        (snap("live", "taken"), Code::AlreadyExists, "exists"),
        (
            snap("base", "s"),
            Code::FailedPrecondition,
            "backs volume \"clone\"",
        ),
        (
            snap("rawdisk", "s"),
            Code::FailedPrecondition,
            "raw disk of stopped",
        ),
        (
            snap("live", "s"),
            Code::FailedPrecondition,
            "running VM running",
        ),
    ];
    for (req, code, text) in cases {
        let err = c.snapshot_volume(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(text), "{req:?}: {err:?}");
    }
    let err = c
        .snapshot_volume(pb::SnapshotVolumeRequest {
            pool_id: "nopool".into(),
            volume_id: "v".into(),
            snapshot_id: "s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Nothing changed: every volume is still there, no snapshot was left behind.
    let names: Vec<String> = c
        .list_volumes(pool_req("snap16"))
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    assert_eq!(names, ["base", "clone", "live", "rawdisk", "taken"]);
}

#[tokio::test]
async fn a_volume_under_a_thin_clone_or_snapshot_is_attached_only_readonly() {
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("under16", "/qx16/under"))
        .await
        .unwrap();
    for (name, backing) in [("base", ""), ("clone", "base")] {
        c.create_volume(pb::CreateVolumeRequest {
            pool_id: "under16".into(),
            volume_id: name.into(),
            size_bytes: GIB,
            backing_volume: backing.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let create = |name: &str, volume: &str, readonly: bool| pb::CreateVmRequest {
        name: name.into(),
        spec: Some(pb::VmSpec {
            cpu_cores: 1,
            memory_mib: 64,
            disks: vec![pb::DiskSpec {
                pool: "under16".into(),
                volume: volume.into(),
                readonly,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    // Writing into the volume under the clone would change what the clone reads.
    let err = c
        .create_vm(create("writer", "base", false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("backs volume \"clone\""), "{err:?}");
    // Read-only it may be shared; the clone itself is an ordinary writable disk.
    c.create_vm(create("reader", "base", true)).await.unwrap();
    c.create_vm(create("onclone", "clone", false))
        .await
        .unwrap();
}

#[tokio::test]
async fn delete_vm_keeps_its_own_volume_while_a_thin_clone_is_on_it() {
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("keep16", "/qx16/keep"))
        .await
        .unwrap();
    let vm = c
        .create_vm(pb::CreateVmRequest {
            name: "template".into(),
            spec: Some(pb::VmSpec {
                cpu_cores: 1,
                memory_mib: 64,
                // Read-only: a thin clone may be made on it (not on a disk a VM writes).
                disks: vec![pb::DiskSpec {
                    pool: "keep16".into(),
                    size_gib: 1,
                    readonly: true,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let own = format!("{}-disk0", vm.vm_id);
    // A thin clone of the VM's own disk (a template): it reads that volume.
    c.create_volume(pb::CreateVolumeRequest {
        pool_id: "keep16".into(),
        volume_id: "from-template".into(),
        backing_volume: own.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = c
        .delete_vm(pb::DeleteVmRequest {
            vm_id: vm.vm_id.clone(),
            delete_storage: true,
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.deleted_volumes.is_empty(), "{r:?}");
    c.get_volume(vol("keep16", &own)).await.unwrap();
}

#[tokio::test]
async fn uploads_and_shrinks_refuse_a_running_vms_disk_and_a_volume_under_another() {
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("guard16", "/qx16/guard"))
        .await
        .unwrap();
    for (name, backing) in [("base", ""), ("clone", "base"), ("live", "")] {
        c.create_volume(pb::CreateVolumeRequest {
            pool_id: "guard16".into(),
            volume_id: name.into(),
            size_bytes: GIB,
            backing_volume: backing.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.create_vm(pb::CreateVmRequest {
        name: "runner".into(),
        start: true,
        spec: Some(pb::VmSpec {
            cpu_cores: 1,
            memory_mib: 64,
            disks: vec![pb::DiskSpec {
                pool: "guard16".into(),
                volume: "live".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    // Bytes written under a running guest, or under a clone that reads them, corrupt its
    // data: refused before any byte is taken.
    for (volume, text) in [
        ("live", "disk of the running VM runner"),
        ("base", "backs volume \"clone\""),
    ] {
        let msgs = vec![
            pb::UploadVolumeRequest {
                part: Some(pb::upload_volume_request::Part::Header(
                    pb::UploadVolumeHeader {
                        pool_id: "guard16".into(),
                        volume_id: volume.into(),
                        offset: 0,
                        size: 3,
                    },
                )),
            },
            pb::UploadVolumeRequest {
                part: Some(pb::upload_volume_request::Part::Data(vec![1, 2, 3])),
            },
        ];
        let err = c.upload_volume(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{volume}: {err:?}");
        assert!(err.message().contains(text), "{volume}: {err:?}");
    }
    // Shrinking the volume under a clone cuts the clone's data too, allow_shrink or not.
    let err = c
        .resize_volume(pb::ResizeVolumeRequest {
            pool_id: "guard16".into(),
            volume_id: "base".into(),
            size_bytes: GIB / 2,
            allow_shrink: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("backs volume \"clone\""), "{err:?}");
}

#[tokio::test]
async fn a_thin_clone_is_refused_on_a_volume_a_vm_writes() {
    let (mut c, _dir) = client().await;
    c.init_storage_pool(dir_pool("onvm16", "/qx16/onvm"))
        .await
        .unwrap();
    for name in ["rw", "ro"] {
        c.create_volume(pb::CreateVolumeRequest {
            pool_id: "onvm16".into(),
            volume_id: name.into(),
            size_bytes: GIB,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let disk = |volume: &str, readonly: bool| pb::DiskSpec {
        pool: "onvm16".into(),
        volume: volume.into(),
        readonly,
        ..Default::default()
    };
    // Stopped: it writes into rw once started, which the clone would read.
    c.create_vm(pb::CreateVmRequest {
        name: "writer".into(),
        spec: Some(pb::VmSpec {
            cpu_cores: 1,
            memory_mib: 64,
            disks: vec![disk("rw", false), disk("ro", true)],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let clone = |name: &str, backing: &str| pb::CreateVolumeRequest {
        pool_id: "onvm16".into(),
        volume_id: name.into(),
        backing_volume: backing.into(),
        ..Default::default()
    };
    let err = c.create_volume(clone("c1", "rw")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("writable disk of writer"), "{err:?}");
    // A read-only disk stays as it is: a clone of it is fine.
    c.create_volume(clone("c2", "ro")).await.unwrap();
}
