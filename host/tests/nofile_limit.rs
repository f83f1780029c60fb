//! qx-node raises its open-file soft limit to the hard limit at start-up, and says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// `Max open files` from `/proc/PID/limits`: (soft, hard).
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let mut f = line["Max open files".len()..].split_whitespace();
    (f.next().unwrap().into(), f.next().unwrap().into())
}

#[test]
fn the_daemon_raises_its_soft_open_file_limit_to_the_hard_limit_and_logs_it() {
    let (_, hard) = nofile(std::process::id());
    let hard_n: u64 = hard.parse().unwrap_or(u64::MAX);
    if hard_n <= 256 {
        eprintln!("hard limit {hard} leaves nothing to raise; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("node.sock");
    // Started with a soft limit of 256, as a shell with `ulimit -Sn 256` would.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_qx-node"))
        .args(["--libvirt-uri", "none", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--agent-socket-dir")
        .arg(dir.path())
        .arg("--image-dir")
        .arg(dir.path().join("images"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let said = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("qx-node ended without logging its open file limit");
        };
        if line.contains("open file limit") {
            break line;
        }
    };
    let (soft, hard_now) = nofile(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft, hard_now, "the soft limit was not raised: {said}");
    assert!(
        said.contains("raised from 256 to ") && said.contains(&soft),
        "{said}"
    );
}
