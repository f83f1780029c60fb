//! qxctl's VM commands (`run_vm`, `run_snapshot`, `run_media`, `run_events`) against an
//! in-process daemon over libvirt's test driver: exit codes for success and each failure
//! class.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qx_node::agent_api::AgentApi;
use qx_node::cli::exit;
use qx_node::cli::vm_cmds::{
    run_events, run_media, run_snapshot, run_vm, CreateArgs, EventsArgs, MediaCommand,
    SnapshotCommand, VmCommand, VmRef,
};
use qx_node::pb::node_daemon_service_client::NodeDaemonServiceClient;
use qx_node::pb::node_daemon_service_server::NodeDaemonServiceServer;
use qx_node::service::NodeService;
use qx_node::vm_api::{VmApi, VmConfig};
use std::sync::Arc;

#[tokio::test]
async fn vm_snapshot_media_and_events_commands_return_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(&node, "<node/>").unwrap();
    let iso = dir.path().join("a.iso");
    std::fs::write(&iso, b"A").unwrap();
    let config = VmConfig {
        libvirt_uri: format!("test://{}", node.display()),
        socket_dir: dir.path().join("sock"),
        image_dir: dir.path().join("images"),
        agent_iso: None,
        disk_roots: Vec::new(),
        media_dirs: vec![dir.path().to_path_buf()],
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
    let mut c = NodeDaemonServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let create = CreateArgs {
        name: "cli".into(),
        id: None,
        cpus: 1,
        sockets: 1,
        threads: 1,
        memory: 64,
        disk: vec!["1".into()],
        pool: None,
        volume: vec![],
        disk_size: None,
        cdrom: vec![],
        empty_cdrom: true,
        network: vec![],
        bridge: vec![],
        vnc: false,
        spice: false,
        uefi: false,
        boot: vec![],
        kernel: None,
        initrd: None,
        cmdline: None,
        label: vec!["k=v".into()],
        start: true,
    };
    let r = |vm: &str| VmRef { vm: vm.into() };
    assert_eq!(
        run_vm(VmCommand::Create(Box::new(create)), &mut c, false)
            .await
            .unwrap(),
        exit::OK
    );
    assert_eq!(
        run_vm(VmCommand::List, &mut c, false).await.unwrap(),
        exit::OK
    );
    assert_eq!(
        run_vm(VmCommand::Status(r("cli")), &mut c, true)
            .await
            .unwrap(),
        exit::OK
    );
    assert_eq!(
        run_vm(VmCommand::Status(r("ghost")), &mut c, false)
            .await
            .unwrap(),
        exit::NOT_FOUND
    );
    assert_eq!(
        run_vm(VmCommand::Start(r("cli")), &mut c, false)
            .await
            .unwrap(),
        exit::FAILED
    );
    assert_eq!(
        run_vm(VmCommand::Pause(r("cli")), &mut c, false)
            .await
            .unwrap(),
        exit::OK
    );
    assert_eq!(
        run_vm(VmCommand::Resume(r("cli")), &mut c, false)
            .await
            .unwrap(),
        exit::OK
    );

    let snap = SnapshotCommand::Create {
        vm: "cli".into(),
        name: Some("s1".into()),
        description: String::new(),
        quiesce: false,
        memory: false,
    };
    assert_eq!(run_snapshot(snap, &mut c, false).await.unwrap(), exit::OK);
    assert_eq!(
        run_snapshot(SnapshotCommand::List(r("cli")), &mut c, false)
            .await
            .unwrap(),
        exit::OK
    );
    let del = SnapshotCommand::Delete {
        vm: "cli".into(),
        snapshot: "nope".into(),
    };
    assert_eq!(
        run_snapshot(del, &mut c, false).await.unwrap(),
        exit::NOT_FOUND
    );

    let stop = VmCommand::Stop {
        vm: "cli".into(),
        timeout: 1,
        skip_agent: true,
        force: false,
    };
    assert_eq!(run_vm(stop, &mut c, false).await.unwrap(), exit::OK);
    let insert = MediaCommand::Insert {
        vm: "cli".into(),
        iso: iso.to_string_lossy().into(),
        device: String::new(),
    };
    assert_eq!(run_media(insert, &mut c, false).await.unwrap(), exit::OK);
    let eject = MediaCommand::Eject {
        vm: "cli".into(),
        device: String::new(),
    };
    assert_eq!(run_media(eject, &mut c, true).await.unwrap(), exit::OK);

    let events = EventsArgs {
        vm: Some("cli".into()),
        after_seq: 0,
        count: Some(3),
    };
    assert_eq!(run_events(events, &mut c, false).await.unwrap(), exit::OK);
    let delete = VmCommand::Delete {
        vm: "cli".into(),
        storage: true,
        force: false,
    };
    assert_eq!(run_vm(delete, &mut c, false).await.unwrap(), exit::OK);
}
