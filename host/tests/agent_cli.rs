//! The real binaries: `qx-node` (without libvirt, agent socket from --vm-socket, metrics on)
//! and `qxctl` against it, with the real agent behind a relay that plays QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use agent_support::{RealAgent, Relay};
use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

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

async fn qxctl(addr: &str, args: &[&str]) -> Output {
    qxctl_with_input(addr, args, None).await
}

/// qxctl with `input` on its standard input (None: /dev/null).
async fn qxctl_with_input(addr: &str, args: &[&str], input: Option<Vec<u8>>) -> Output {
    let mut all = vec!["--addr".to_string(), format!("http://{addr}")];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qxctl"));
        cmd.args(&all).stdout(Stdio::piped()).stderr(Stdio::piped());
        let Some(input) = input else {
            return cmd.stdin(Stdio::null()).output().unwrap();
        };
        let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        out
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qx_node_and_qxctl_drive_the_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), "vm1");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let (port, mport) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{port}");
    let maddr = format!("127.0.0.1:{mport}");
    let _node = Node(
        Command::new(env!("CARGO_BIN_EXE_qx-node"))
            .args([
                "--listen",
                &addr,
                "--insecure-listen",
                "--metrics-listen",
                &maddr,
            ])
            .args(["--libvirt-uri", "none"])
            .arg("--agent-socket-dir")
            .arg(dir.path().join("sockets"))
            .arg("--image-dir")
            .arg(dir.path().join("images"))
            .arg("--vm-socket")
            .arg(format!("vm1={}", relay.host_path.display()))
            .args(["--ping-interval-ms", "200", "--liveness-window-ms", "2000"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut up = false;
    for _ in 0..400 {
        if qxctl(&addr, &["agent", "ping", "vm1"])
            .await
            .status
            .success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "qxctl agent ping never succeeded");

    // exec: live output, the command's own exit code, 128+signal when killed.
    let out = qxctl(
        &addr,
        &[
            "exec",
            "vm1",
            "--",
            "sh",
            "-c",
            "echo hi; echo oops >&2; exit 42",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"oops\n");
    let out = qxctl(&addr, &["exec", "vm1", "--", "sh", "-c", "kill -9 $$"]).await;
    assert_eq!(out.status.code(), Some(137));

    // exec --stdin: from qxctl's own standard input, or from a file.
    let out = qxctl_with_input(
        &addr,
        &["exec", "vm1", "--stdin", "-", "--", "wc", "-c"],
        Some(vec![b'x'; 5000]),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5000");
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "one\ntwo\n").unwrap();
    let out = qxctl(
        &addr,
        &[
            "exec",
            "vm1",
            "--stdin",
            input.to_str().unwrap(),
            "--",
            "tail",
            "-n1",
        ],
    )
    .await;
    assert_eq!(out.stdout, b"two\n");
    // Input that cannot fit one request is refused before anything runs, saying why.
    std::fs::write(&input, vec![b'y'; 200_000]).unwrap();
    let out = qxctl(
        &addr,
        &[
            "exec",
            "vm1",
            "--stdin",
            input.to_str().unwrap(),
            "--",
            "wc",
            "-c",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be sent"), "{err}");

    // cp both ways, verified by sha256.
    let local = dir.path().join("local.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let guest = dir.path().join("guest-copy.bin");
    let out = qxctl(
        &addr,
        &[
            "cp",
            local.to_str().unwrap(),
            &format!("vm1:{}", guest.display()),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&guest).unwrap(), data);
    let back = dir.path().join("back.bin");
    let out = qxctl(
        &addr,
        &[
            "--json",
            "cp",
            &format!("vm1:{}", guest.display()),
            back.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true);

    // --json stats; a missing VM exits 3.
    let out = qxctl(&addr, &["--json", "agent", "stats", "vm1"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["connections"][0]["state"], "connected");
    let out = qxctl(&addr, &["agent", "ping", "nosuch"]).await;
    assert_eq!(out.status.code(), Some(3));
    let out = qxctl(&addr, &["fs", "status", "vm1"]).await;
    assert!(out.status.success());
    let out = qxctl(&addr, &["time", "get", "vm1"]).await;
    assert!(out.status.success());

    // Prometheus text on its own port.
    let metrics = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&maddr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    })
    .await
    .unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("qx_agent_connected{vm=\"vm1\",state=\"connected\"} 1"));
    assert!(metrics.contains("qx_agent_commands_total{vm=\"vm1\",stage=\"completed\"}"));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_certs(dir: &std::path::Path) {
    let sh = |script: &str| {
        let st = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "openssl failed: {script}");
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(&format!(
        "openssl req -x509 {ec} -keyout ca.key -out ca.crt -days 2 -subj /CN=qx-test-ca"
    ));
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "subjectAltName=DNS:qxctl\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        sh(&format!(
            "openssl req {ec} -keyout {name}.key -out {name}.csr -subj /CN={name} && \
             openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
             -out {name}.crt -days 2 -extfile {name}.ext"
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let relay = Relay::start(dir.path(), "vm1");
    let _agent = RealAgent::start(&relay.guest_path, &[]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let p = |n: &str| dir.path().join(n).display().to_string();
    let _node = Node(
        Command::new(env!("CARGO_BIN_EXE_qx-node"))
            .args([
                "--listen",
                &addr,
                "--insecure-listen",
                "--libvirt-uri",
                "none",
            ])
            .args([
                "--agent-socket-dir",
                &p("sockets"),
                "--image-dir",
                &p("images"),
            ])
            .args([
                "--tls-cert",
                &p("server.crt"),
                "--tls-key",
                &p("server.key"),
            ])
            .args(["--tls-client-ca", &p("ca.crt")])
            .arg("--vm-socket")
            .arg(format!("vm1={}", relay.host_path.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let https = format!("https://{addr}");
    let with_cert = |extra: &[&str]| {
        let mut v: Vec<String> = vec!["--addr".into(), https.clone(), "--ca".into(), p("ca.crt")];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(["agent", "ping", "vm1"].map(String::from));
        v
    };
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_qxctl"))
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let mut ok = false;
    for _ in 0..400 {
        let out = run(with_cert(&[
            "--cert",
            &p("client.crt"),
            "--key",
            &p("client.key"),
        ]))
        .await;
        if out.status.success() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a client with a certificate was never admitted");
    let out = run(with_cert(&[])).await;
    assert!(
        !out.status.success(),
        "a client without a certificate was admitted"
    );
}
