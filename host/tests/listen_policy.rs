//! Who may reach qx-node's gRPC API: the real `qx-node` binary refuses to listen where anyone
//! could drive it (plain TCP, or beyond loopback without mutual TLS) unless told
//! `--insecure-listen`, and by default serves a unix socket that qxctl reaches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A hang guard, not a timing assertion: a refusing daemon exits at once.
const EXIT_WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qx_node(dir: &Path, args: &[&str]) -> Node {
    Node(
        Command::new(env!("CARGO_BIN_EXE_qx-node"))
            .args(["--libvirt-uri", "none"])
            .arg("--agent-socket-dir")
            .arg(dir.join("sockets"))
            .arg("--image-dir")
            .arg(dir.join("images"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Waits for a daemon that must refuse to start; returns its stderr.
fn refused(mut node: Node) -> String {
    let deadline = Instant::now() + EXIT_WAIT;
    loop {
        if let Some(status) = node.0.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(node.0.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "qx-node exited 0: {err}");
            return err;
        }
        assert!(
            Instant::now() < deadline,
            "qx-node did not refuse within {EXIT_WAIT:?}: it is listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qxctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qxctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Retries `qxctl ARGS vm list` until it succeeds (the daemon is starting).
fn wait_serving(args: &[&str]) {
    let deadline = Instant::now() + EXIT_WAIT;
    loop {
        let mut all = args.to_vec();
        all.extend(["vm", "list"]);
        let out = qxctl(&all);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "qxctl {args:?} never reached qx-node: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn beyond_loopback_without_mutual_tls_qx_node_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("0.0.0.0:{}", free_port());
    let err = refused(qx_node(dir.path(), &["--listen", &addr]));
    assert!(
        err.contains("mutual TLS") && err.contains("--insecure-listen"),
        "the refusal says why and what overrides it: {err}"
    );
}

#[test]
fn plain_tcp_on_loopback_is_refused_unless_insecure_listen_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let err = refused(qx_node(dir.path(), &["--listen", &addr]));
    assert!(
        err.contains("TLS") && err.contains("--insecure-listen"),
        "{err}"
    );
    let _node = qx_node(dir.path(), &["--listen", &addr, "--insecure-listen"]);
    wait_serving(&["--addr", &format!("http://{addr}")]);
}

#[test]
fn a_unix_socket_is_served_with_mode_0660_and_qxctl_reaches_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qx-node-16.sock");
    let listen = format!("unix:{}", sock.display());
    let _node = qx_node(dir.path(), &["--listen", &listen]);
    wait_serving(&["--addr", &listen]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");
}

/// `qxctl --addr ADDR vm list` run by `setpriv` as uid 65534 with the given primary group and
/// supplementary groups.
fn qxctl_as(gid: u32, groups: &[u32], addr: &str) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", &gid.to_string()]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.args(["--groups", &list.join(",")]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_qxctl"))
        .args(["--addr", addr, "vm", "list"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
#[ignore = "needs root and setpriv (clients run as another uid); run by ci/test.sh"]
fn the_unix_socket_admits_root_and_its_group_and_refuses_other_users() {
    // A group nobody has: the socket's. Clients run as uid 65534 (nobody).
    const GROUP: u32 = 4716;
    const NOGROUP: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    // The clients must reach the socket's directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("qx-node-16.sock");
    let listen = format!("unix:{}", sock.display());
    let mut node = qx_node(
        dir.path(),
        &["--listen", &listen, "--socket-group", &GROUP.to_string()],
    );
    wait_serving(&["--addr", &listen]);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, GROUP)
    );

    // Mode 0660 alone already keeps other users out: connect() is refused by the kernel.
    let out = qxctl_as(NOGROUP, &[], &listen);
    assert_eq!(out.status.code(), Some(4), "{out:?}");

    // With the mode opened up, the credential check is what decides.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = qxctl_as(NOGROUP, &[], &listen);
    assert_eq!(out.status.code(), Some(4), "another user got in: {out:?}");
    for (gid, groups) in [(GROUP, vec![]), (NOGROUP, vec![GROUP])] {
        let out = qxctl_as(gid, &groups, &listen);
        assert!(
            out.status.success(),
            "uid 65534 gid {gid} groups {groups:?} is in the socket's group: {out:?}"
        );
    }

    // The daemon said whom it refused.
    let _ = node.0.kill();
    let _ = node.0.wait();
    let mut log = String::new();
    std::io::Read::read_to_string(node.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(
        log.contains("refused a connection from uid 65534 gid 65534"),
        "{log}"
    );
}
