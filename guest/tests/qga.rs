//! The real agent binary's qemu-ga front end against a client that behaves as Proxmox's
//! does: one connection per command, `guest-sync-delimited` and the command in one write,
//! everything up to the last 0xFF skipped, then exactly two lines. Replies are read with
//! serde_json, independently of the agent's own parser.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a test waits for something the agent should do promptly; a generous bound for
/// a loaded CI machine, not a performance assertion.
const PATIENCE: Duration = Duration::from_secs(20);

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    listener: UnixListener,
    next_sync: u64,
}

impl Agent {
    fn start(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        std::fs::write(dir.path().join("agent.conf"), "# test\n").unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_quantix-kvm-agent"))
            // The native port goes nowhere here; only the qemu-ga socket is served.
            .arg("--connect")
            .arg(format!("unix:{}", dir.path().join("none.sock").display()))
            .arg("--config")
            .arg(dir.path().join("agent.conf"))
            .args(["--log-level", "debug", "--telemetry-interval-ms", "0"])
            .arg("--set")
            .arg(format!("qga_connect=unix:{}", sock.display()))
            .arg("--set")
            .arg(format!(
                "qga_config={}",
                dir.path().join("qemu-ga.conf").display()
            ))
            .arg("--set")
            .arg(format!(
                "freeze_state_file={}",
                dir.path().join("frozen").display()
            ))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("QX_AGENT_STDERR").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        Agent {
            child,
            dir,
            listener,
            next_sync: 7_000_000_000,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The agent's next connection to the qemu-ga socket (it reconnects after each close).
    fn accept(&self) -> UnixStream {
        let start = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream.set_read_timeout(Some(PATIENCE)).unwrap();
                    return stream;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < PATIENCE, "agent never connected");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// One command as Proxmox sends it: a new connection, `guest-sync-delimited` and the
    /// command in one write, skip to the last 0xFF, two lines. Returns the command's reply.
    fn proxmox(&mut self, execute: &str, arguments: Value) -> Value {
        self.next_sync += 1;
        let id = self.next_sync;
        let mut conn = self.accept();
        let text = format!(
            "{}\n{}\n",
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
            json!({"execute": execute, "arguments": arguments})
        );
        conn.write_all(text.as_bytes()).unwrap();
        let lines = read_lines_after_last_ff(&mut conn, 2);
        assert_eq!(lines[0], json!({"return": id}), "sync reply");
        lines[1].clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until `n` complete lines follow the last 0xFF seen; returns them parsed.
fn read_lines_after_last_ff(conn: &mut UnixStream, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let tail = match got.iter().rposition(|&b| b == 0xFF) {
            Some(at) => &got[at + 1..],
            None => &got[..0],
        };
        let lines: Vec<&[u8]> = tail
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        if tail.ends_with(b"\n") && lines.len() >= n {
            assert_eq!(
                lines.len(),
                n,
                "extra lines: {}",
                String::from_utf8_lossy(tail)
            );
            return lines
                .iter()
                .map(|l| {
                    assert!(l.is_ascii(), "non-ASCII reply");
                    serde_json::from_slice(l).unwrap()
                })
                .collect();
        }
        let mut buf = [0u8; 65536];
        let k = match conn.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.expect("agent went quiet"),
        };
        assert!(k > 0, "agent closed the connection");
        got.extend_from_slice(&buf[..k]);
    }
}

/// Reads one line.
fn read_line(conn: &mut UnixStream) -> Value {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\n") {
        let k = match conn.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.expect("agent went quiet"),
        };
        assert!(k > 0, "agent closed the connection");
        got.push(b[0]);
    }
    serde_json::from_slice(&got).unwrap()
}

/// Base64 as Perl's MIME::Base64 (Proxmox) writes it: lines of 76 characters, each ending in
/// a newline.
fn b64_wrapped(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut flat = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            flat.push(if i <= c.len() {
                char::from(A[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            });
        }
    }
    let mut out = String::new();
    for line in flat.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|&b| b != b'=').collect();
    let mut out = Vec::new();
    for c in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &b) in c.iter().enumerate() {
            n |= u32::from(val(b)) << (18 - 6 * i);
        }
        let k = c.len() - 1;
        out.extend_from_slice(&n.to_be_bytes()[1..1 + k]);
    }
    out
}

fn error_class(reply: &Value) -> &str {
    reply["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
}

#[test]
fn ping_info_sync_and_time_through_proxmox_style_connections() {
    let mut agent = Agent::start(&[]);
    assert_eq!(
        agent.proxmox("guest-ping", json!({})),
        json!({"return": {}})
    );
    let info = agent.proxmox("guest-info", json!({}));
    let cmds = info["return"]["supported_commands"].as_array().unwrap();
    for name in [
        "guest-ping",
        "guest-exec",
        "guest-fsfreeze-freeze",
        "guest-get-fsinfo",
    ] {
        assert!(
            cmds.iter()
                .any(|c| c["name"] == name && c["enabled"] == true),
            "{name} missing from {info}"
        );
    }
    assert!(cmds
        .iter()
        .any(|c| c["name"] == "guest-shutdown" && c["success-response"] == false));
    let host_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let t = agent.proxmox("guest-get-time", json!({}))["return"]
        .as_i64()
        .unwrap();
    // Same machine, same clock: agreement within a minute proves units and epoch.
    assert!((t - host_ns).abs() < 60_000_000_000, "{t} vs {host_ns}");
    let host = agent.proxmox("guest-get-host-name", json!({}));
    let uname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(host["return"]["host-name"], uname.trim());
}

#[test]
fn requests_need_no_newline_run_in_order_and_echo_their_ids() {
    let agent = Agent::start(&[]);
    let mut conn = agent.accept();
    conn.write_all(
        br#"{"execute":"guest-sync","arguments":{"id":-42},"id":"first"}{'execute':'guest-ping','id':[1,2]}{"execute":"guest-sync","arguments":{"id":9223372036854775807}}"#,
    )
    .unwrap();
    assert_eq!(read_line(&mut conn), json!({"return": -42, "id": "first"}));
    assert_eq!(read_line(&mut conn), json!({"return": {}, "id": [1, 2]}));
    assert_eq!(
        read_line(&mut conn),
        json!({"return": 9223372036854775807_i64})
    );
}

#[test]
fn errors_carry_qemu_ga_classes_and_the_next_request_still_runs() {
    let agent = Agent::start(&["--block-rpcs", "guest-get-users,guest-get-osinfo"]);
    let mut conn = agent.accept();
    for (req, class) in [
        (
            &br#"{"execute":"guest-no-such-thing"}"#[..],
            "CommandNotFound",
        ),
        (br#"{"execute":"guest-get-users"}"#, "CommandNotFound"),
        (
            br#"{"execute":"guest-sync","arguments":{"id":1.0}}"#,
            "GenericError",
        ),
        (
            br#"{"execute":"guest-ping","arguments":{"x":1}}"#,
            "GenericError",
        ),
        (
            br#"{"execute":"guest-ping","exec-oob":true}"#,
            "GenericError",
        ),
        (br#"{"arguments":{}}"#, "GenericError"),
        (br#"garbage "#, "GenericError"),
    ] {
        conn.write_all(req).unwrap();
        let reply = read_line(&mut conn);
        assert_eq!(
            error_class(&reply),
            class,
            "{}",
            String::from_utf8_lossy(req)
        );
    }
    conn.write_all(br#"{"execute":"guest-info"}"#).unwrap();
    let info = read_line(&mut conn);
    let cmds = info["return"]["supported_commands"].as_array().unwrap();
    assert!(cmds
        .iter()
        .any(|c| c["name"] == "guest-get-users" && c["enabled"] == false));
}

#[test]
fn a_partial_request_from_a_previous_connection_never_runs() {
    let mut agent = Agent::start(&[]);
    let marker = agent.path("must-not-exist");
    {
        let mut conn = agent.accept();
        let half = format!(
            r#"{{"execute":"guest-exec","arguments":{{"path":"/bin/touch","arg":["{}"]"#,
            marker.display()
        );
        conn.write_all(half.as_bytes()).unwrap();
        // Closing here: the agent sees EOF with the request half-read.
    }
    // The next client's bytes would complete the old request if the parser kept it.
    let reply = agent.proxmox("guest-ping", json!({}));
    assert_eq!(reply, json!({"return": {}}));
    let mut conn = agent.accept();
    conn.write_all(b"}}").unwrap();
    conn.write_all(br#"{"execute":"guest-sync","arguments":{"id":5}}"#)
        .unwrap();
    let lines = [read_line(&mut conn), read_line(&mut conn)];
    assert_eq!(error_class(&lines[0]), "GenericError", "{lines:?}");
    assert_eq!(lines[1], json!({"return": 5}));
    assert!(!marker.exists(), "the half request ran");
}

#[test]
fn exec_with_wrapped_base64_input_then_status_polling() {
    let mut agent = Agent::start(&[]);
    let input: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let reply = agent.proxmox(
        "guest-exec",
        json!({"path": "/bin/sh", "arg": ["-c", "cat; echo err >&2; exit 3"],
               "input-data": b64_wrapped(&input), "capture-output": true}),
    );
    let pid = reply["return"]["pid"].as_i64().unwrap();
    let start = Instant::now();
    let status = loop {
        let s = agent.proxmox("guest-exec-status", json!({"pid": pid}));
        if s["return"]["exited"] == true {
            break s;
        }
        assert!(start.elapsed() < PATIENCE, "never exited: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["return"]["exitcode"], 3);
    assert_eq!(
        b64_decode(status["return"]["out-data"].as_str().unwrap()),
        input
    );
    assert_eq!(
        b64_decode(status["return"]["err-data"].as_str().unwrap()),
        b"err\n"
    );
    // The record is dropped once its exit was reported.
    let again = agent.proxmox("guest-exec-status", json!({"pid": pid}));
    assert_eq!(error_class(&again), "GenericError");
}

#[test]
fn file_open_write_seek_read_close_match_the_file_on_disk() {
    let mut agent = Agent::start(&[]);
    let path = agent.path("data.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let h = agent.proxmox(
        "guest-file-open",
        json!({"path": path.display().to_string(), "mode": "w+"}),
    )["return"]
        .as_i64()
        .unwrap();
    assert!(h >= 1000);
    let w = agent.proxmox(
        "guest-file-write",
        json!({"handle": h, "buf-b64": b64_wrapped(&data)}),
    );
    assert_eq!(w["return"]["count"], data.len());
    assert_eq!(
        agent.proxmox("guest-file-flush", json!({"handle": h})),
        json!({"return": {}})
    );
    // The guest's own view of the file.
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let s = agent.proxmox(
        "guest-file-seek",
        json!({"handle": h, "offset": 1000, "whence": "set"}),
    );
    assert_eq!(s["return"]["position"], 1000);
    let mut back = Vec::new();
    loop {
        let r = agent.proxmox("guest-file-read", json!({"handle": h, "count": 65536}));
        back.extend(b64_decode(r["return"]["buf-b64"].as_str().unwrap()));
        if r["return"]["eof"] == true {
            break;
        }
    }
    assert_eq!(back, &data[1000..]);
    assert_eq!(
        agent.proxmox("guest-file-close", json!({"handle": h})),
        json!({"return": {}})
    );
    let gone = agent.proxmox("guest-file-read", json!({"handle": h}));
    assert_eq!(
        gone["error"]["desc"],
        format!("handle '{h}' has not been found")
    );
}

/// A guest user can put a FIFO where the host expects a file. Opening one for reading waits
/// for a writer that may never come; the agent must answer at once and keep serving.
#[test]
fn file_open_of_a_fifo_is_refused_without_waiting_for_a_writer() {
    let mut agent = Agent::start(&[]);
    let fifo = agent.path("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for mode in ["r", "r+", "a"] {
        let r = agent.proxmox(
            "guest-file-open",
            json!({"path": fifo.display().to_string(), "mode": mode}),
        );
        assert_eq!(error_class(&r), "GenericError", "mode {mode}: {r}");
        // Writing to a FIFO nobody reads fails in open(2) itself (ENXIO).
        let desc = r["error"]["desc"].as_str().unwrap();
        assert!(
            desc.contains("not a regular file") || (mode == "a" && desc.contains("os error 6")),
            "mode {mode}: {r}"
        );
    }
    assert_eq!(
        agent.proxmox("guest-ping", json!({})),
        json!({"return": {}})
    );
}

#[test]
fn shutdown_sends_no_reply_and_runs_the_power_command() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("power-ran");
    let script = dir.path().join("power.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$1\" > {}\n", marker.display()),
    )
    .unwrap();
    let template = format!("power_command=/bin/sh {} {{action}}", script.display());
    // The fallback stays off: a failing command must never reboot the test machine.
    let agent = Agent::start(&["--set", &template, "--set", "power_syscall_fallback=false"]);
    let mut conn = agent.accept();
    conn.write_all(
        br#"{"execute":"guest-sync-delimited","arguments":{"id":1}}{"execute":"guest-shutdown","arguments":{"mode":"bogus"}}"#,
    )
    .unwrap();
    let lines = read_lines_after_last_ff(&mut conn, 2);
    assert_eq!(error_class(&lines[1]), "GenericError");
    conn.write_all(
        br#"{"execute":"guest-shutdown","arguments":{"mode":"reboot"}}{"execute":"guest-sync","arguments":{"id":2}}"#,
    )
    .unwrap();
    // The line after the shutdown is the sync's: the shutdown answered nothing.
    assert_eq!(read_line(&mut conn), json!({"return": 2}));
    let start = Instant::now();
    while std::fs::read_to_string(&marker).unwrap_or_default() != "reboot\n" {
        assert!(start.elapsed() < PATIENCE, "power command never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fsinfo_and_interfaces_match_the_guests_own_view() {
    let mut agent = Agent::start(&[]);
    let fs = agent.proxmox("guest-get-fsinfo", json!({}));
    let list = fs["return"].as_array().unwrap();
    let root = list
        .iter()
        .find(|f| f["mountpoint"] == "/")
        .unwrap_or_else(|| panic!("no / in {fs}"));
    for key in ["name", "type", "disk"] {
        assert!(!root[key].is_null(), "{key} missing: {root}");
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root_type = mountinfo
        .lines()
        .rev()
        .filter(|l| l.split(' ').nth(4) == Some("/"))
        .find_map(|l| l.split(" - ").nth(1)?.split(' ').next())
        .unwrap();
    assert_eq!(root["type"], root_type);
    let ifs = agent.proxmox("guest-network-get-interfaces", json!({}));
    let lo = ifs["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "lo")
        .unwrap_or_else(|| panic!("no lo in {ifs}"));
    assert!(lo["ip-addresses"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["ip-address"] == "127.0.0.1"
            && a["ip-address-type"] == "ipv4"
            && a["prefix"] == 8));
}

/// A 16 MiB ext4 image loop-mounted under a temp dir (needs root and loop devices, as the CI
/// machine has).
struct LoopFs {
    _dir: tempfile::TempDir,
    mnt: String,
}

impl LoopFs {
    fn new() -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {out:?}");
        };
        run(Command::new("truncate").arg("-s").arg("16M").arg(&img));
        run(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(&img));
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(&img)
            .arg(&mnt));
        LoopFs {
            mnt: mnt.display().to_string(),
            _dir: dir,
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").args(["-u", &self.mnt]).status();
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").args(["-l", &self.mnt]).status();
        }
    }
}

#[test]
fn freeze_list_allows_only_the_frozen_list_and_thaw_counts() {
    let fs = LoopFs::new();
    let hooks = tempfile::tempdir().unwrap();
    let hook = hooks.path().join("fsfreeze-hook");
    let hook_log = hooks.path().join("hook.log");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", hook_log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The hook comes from qemu-ga's own configuration file, as on a guest that had qemu-ga.
    let conf = hooks.path().join("qemu-ga.conf");
    std::fs::write(
        &conf,
        format!("[general]\nfsfreeze-hook={}\n", hook.display()),
    )
    .unwrap();
    let mut agent = Agent::start(&["--set", &format!("qga_config={}", conf.display())]);
    let n = agent.proxmox(
        "guest-fsfreeze-freeze-list",
        json!({"mountpoints": [fs.mnt]}),
    );
    assert_eq!(n, json!({"return": 1}));
    // The freeze hook ran (and ended) before the freeze was answered.
    assert_eq!(std::fs::read_to_string(&hook_log).unwrap(), "freeze\n");
    // The freeze record the native protocol shares.
    assert!(agent.path("frozen").exists());
    assert_eq!(
        agent.proxmox("guest-fsfreeze-status", json!({})),
        json!({"return": "frozen"})
    );
    // Writes block while frozen: a writer started now finishes only after the thaw.
    let target = format!("{}/written", fs.mnt);
    let mut writer = Command::new("sh")
        .args(["-c", &format!("echo x > {target} && sync -f {target}")])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        writer.try_wait().unwrap().is_none(),
        "a write finished while frozen"
    );
    let refused = agent.proxmox("guest-exec", json!({"path": "/bin/true"}));
    assert_eq!(
        refused["error"]["desc"],
        "Command guest-exec has been disabled: the command is not allowed"
    );
    assert_eq!(
        agent.proxmox("guest-ping", json!({})),
        json!({"return": {}})
    );
    assert_eq!(
        agent.proxmox("guest-fsfreeze-thaw", json!({})),
        json!({"return": 1})
    );
    assert!(writer.wait().unwrap().success());
    let start = Instant::now();
    while std::fs::read_to_string(&hook_log).unwrap() != "freeze\nthaw\n" {
        assert!(start.elapsed() < PATIENCE, "the thaw hook never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "x\n");
    assert_eq!(
        agent.proxmox("guest-fsfreeze-thaw", json!({})),
        json!({"return": 0})
    );
    assert_eq!(
        agent.proxmox("guest-fsfreeze-status", json!({})),
        json!({"return": "thawed"})
    );
}

impl Agent {
    /// Runs `guest-exec` with `args` and polls `guest-exec-status` until the child exited.
    fn exec_to_exit(&mut self, args: Value) -> Value {
        let pid = self.proxmox("guest-exec", args)["return"]["pid"]
            .as_i64()
            .unwrap();
        let start = Instant::now();
        loop {
            let s = self.proxmox("guest-exec-status", json!({"pid": pid}));
            if s["return"]["exited"] == true {
                return s["return"].clone();
            }
            assert!(start.elapsed() < PATIENCE, "never exited: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn exec_capture_modes_merge_or_pick_the_streams() {
    let mut agent = Agent::start(&[]);
    let script = "echo one; echo two >&2; echo three";
    let run = |agent: &mut Agent, mode: Value| {
        agent
            .exec_to_exit(json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": mode}))
    };
    // Merged: one pipe for both streams, in the order written.
    let merged = run(&mut agent, json!("merged"));
    assert_eq!(
        b64_decode(merged["out-data"].as_str().unwrap()),
        b"one\ntwo\nthree\n"
    );
    assert!(merged.get("err-data").is_none(), "{merged}");
    let out = run(&mut agent, json!("stdout"));
    assert_eq!(
        b64_decode(out["out-data"].as_str().unwrap()),
        b"one\nthree\n"
    );
    assert!(out.get("err-data").is_none(), "{out}");
    let err = run(&mut agent, json!("stderr"));
    assert!(err.get("out-data").is_none(), "{err}");
    assert_eq!(b64_decode(err["err-data"].as_str().unwrap()), b"two\n");
    let none = run(&mut agent, json!("none"));
    assert_eq!(none, json!({"exited": true, "exitcode": 0}));
    let bad = agent.proxmox(
        "guest-exec",
        json!({"path": "/bin/true", "capture-output": "both"}),
    );
    assert_eq!(error_class(&bad), "GenericError");
}

#[test]
fn routes_match_the_kernels_route_tables() {
    let mut agent = Agent::start(&[]);
    let routes = agent.proxmox("guest-network-get-route", json!({}))["return"]
        .as_array()
        .unwrap()
        .clone();
    // IPv4: one per line of /proc/net/route after its header, in order, addresses in memory
    // order of the kernel's hex.
    let text = std::fs::read_to_string("/proc/net/route").unwrap();
    let v4: Vec<&Value> = routes.iter().filter(|r| r["version"] == 4).collect();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(v4.len(), lines.len(), "{routes:?}");
    let ip = |hex: &str| {
        let b = u32::from_str_radix(hex, 16).unwrap().to_le_bytes();
        format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])
    };
    for (r, f) in v4.iter().zip(&lines) {
        assert_eq!(r["iface"], f[0]);
        assert_eq!(r["destination"], ip(f[1]));
        assert_eq!(r["gateway"], ip(f[2]));
        assert_eq!(r["mask"], ip(f[7]));
        assert_eq!(r["metric"], f[6].parse::<i64>().unwrap());
        assert_eq!(r["flags"], i64::from_str_radix(f[3], 16).unwrap());
    }
    // IPv6: one per line of /proc/net/ipv6_route, when the guest has IPv6.
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    assert_eq!(
        routes.iter().filter(|r| r["version"] == 6).count(),
        v6.lines().count()
    );
    if let Some(r) = routes.iter().find(|r| r["version"] == 6) {
        assert!(r["destination"].as_str().unwrap().contains(':'), "{r}");
        assert!(r["desprefixlen"].as_str().unwrap().parse::<u8>().unwrap() <= 128);
    }
}

#[test]
fn set_memory_blocks_answers_block_by_block() {
    let mut agent = Agent::start(&[]);
    // A block already in the state asked for is a success that writes nothing; an unknown one
    // is not-found (or, without memory hotplug, operation-not-supported), with ENOENT (2).
    let online = agent.proxmox("guest-get-memory-blocks", json!({}))["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["online"] == true)
        .map(|b| b["phys-index"].as_i64().unwrap());
    let mut blocks = vec![json!({"phys-index": 99_999_999, "online": true})];
    if let Some(n) = online {
        blocks.push(json!({"phys-index": n, "online": true}));
    }
    let reply = agent.proxmox("guest-set-memory-blocks", json!({"mem-blks": blocks}));
    let got = reply["return"].as_array().unwrap();
    assert_eq!(got.len(), blocks.len(), "{reply}");
    let hotplug = std::path::Path::new("/sys/devices/system/memory").exists();
    assert_eq!(
        got[0],
        json!({"phys-index": 99_999_999,
               "response": if hotplug { "not-found" } else { "operation-not-supported" },
               "error-code": 2})
    );
    if let Some(n) = online {
        assert_eq!(got[1], json!({"phys-index": n, "response": "success"}));
    }
    let bad = agent.proxmox(
        "guest-set-memory-blocks",
        json!({"mem-blks": [{"online": true}]}),
    );
    assert_eq!(error_class(&bad), "GenericError");
}

#[test]
fn suspend_is_refused_when_the_kernel_does_not_offer_the_mode() {
    let mut agent = Agent::start(&[]);
    let info = agent.proxmox("guest-info", json!({}));
    let cmds = info["return"]["supported_commands"].as_array().unwrap();
    for name in [
        "guest-suspend-ram",
        "guest-suspend-disk",
        "guest-suspend-hybrid",
    ] {
        assert!(
            cmds.iter()
                .any(|c| c["name"] == name && c["success-response"] == false),
            "{name}: {info}"
        );
    }
    // Only modes this machine cannot enter are tried: a success would suspend it.
    let state = std::fs::read_to_string("/sys/power/state").unwrap_or_default();
    let offered = |w: &str| state.split_whitespace().any(|s| s == w);
    for (name, needs) in [("guest-suspend-ram", "mem"), ("guest-suspend-disk", "disk")] {
        if offered(needs) {
            eprintln!("skipped {name}: this machine offers {needs}");
            continue;
        }
        let reply = agent.proxmox(name, json!({}));
        assert_eq!(error_class(&reply), "GenericError", "{name}");
        assert!(
            reply["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("not supported"),
            "{reply}"
        );
    }
    let bad = agent.proxmox("guest-suspend-ram", json!({"mode": "now"}));
    assert_eq!(error_class(&bad), "GenericError");
}

#[test]
fn a_short_exec_is_reported_exited_at_the_first_status_poll() {
    // The wait is long here so that it cannot run out on a loaded machine: the reply comes
    // when the child ends, milliseconds after it starts.
    let agent = Agent::start(&["--set", "qga_exec_reply_wait_ms=60000"]);
    // One connection, the poll sent the moment the pid is known, as a polling client does.
    let mut conn = agent.accept();
    let exec =
        json!({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", "exit 4"]}});
    conn.write_all(
        format!(
            "{}\n{exec}\n",
            json!({"execute": "guest-sync-delimited", "arguments": {"id": 1}})
        )
        .as_bytes(),
    )
    .unwrap();
    let lines = read_lines_after_last_ff(&mut conn, 2);
    let pid = lines[1]["return"]["pid"].as_i64().unwrap();
    let poll = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
    conn.write_all(format!("{poll}\n").as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(conn);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let status: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(status, json!({"return": {"exited": true, "exitcode": 4}}));
}

#[test]
fn a_long_exec_is_answered_when_the_wait_runs_out() {
    let mut agent = Agent::start(&["--set", "qga_exec_reply_wait_ms=200"]);
    let started = agent.proxmox("guest-exec", json!({"path": "/bin/sleep", "arg": ["30"]}));
    let pid = started["return"]["pid"].as_i64().unwrap();
    let status = agent.proxmox("guest-exec-status", json!({"pid": pid}));
    assert_eq!(status, json!({"return": {"exited": false}}));
    // The child is the test's to end: the agent does not kill what guest-exec started.
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}
