//! The real agent binary against a test host written on the codec, over a unix socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{
    AgentLogs, Cancel, Envelope, ErrorCode, ExecKill, ExecRequest, HostHello, LogsRequest,
    OutputStream, Ping, SetTelemetryInterval, TimeGetRequest,
};
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};

/// How long a test waits for something the agent should do promptly; a generous bound for
/// a loaded CI machine, not a performance assertion.
const PATIENCE: Duration = Duration::from_secs(20);

struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    listener: UnixListener,
    dir_path: PathBuf,
}

impl Agent {
    fn start(extra: &[&str]) -> Agent {
        Self::start_in(Command::new(env!("CARGO_BIN_EXE_quantix-kvm-agent")), extra)
    }

    /// The agent started with its fds 0, 1 and 2 closed (as a careless init might).
    fn start_with_closed_stdio() -> Agent {
        let mut sh = Command::new("sh");
        sh.args(["-c", "exec \"$0\" \"$@\" <&- >&- 2>&-"])
            .arg(env!("CARGO_BIN_EXE_quantix-kvm-agent"));
        Self::start_in(sh, &[])
    }

    fn start_in(cmd: Command, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("host.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let child = Self::spawn_in(cmd, &sock, dir.path(), extra);
        Agent {
            child,
            dir_path: dir.path().to_path_buf(),
            _dir: dir,
            listener,
        }
    }

    fn spawn(sock: &Path, dir: &Path, extra: &[&str]) -> Child {
        let cmd = Command::new(env!("CARGO_BIN_EXE_quantix-kvm-agent"));
        Self::spawn_in(cmd, sock, dir, extra)
    }

    fn spawn_in(mut cmd: Command, sock: &Path, dir: &Path, extra: &[&str]) -> Child {
        cmd.arg("--connect")
            .arg(format!("unix:{}", sock.display()))
            .arg("--config")
            .arg(dir.join("agent.conf"))
            .args(["--log-level", "debug", "--telemetry-interval-ms", "0"])
            .args([
                "--set",
                &format!("freeze_state_file={}", dir.join("frozen").display()),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("QX_AGENT_STDERR").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        if !dir.join("agent.conf").exists() {
            std::fs::write(dir.join("agent.conf"), "# test\n").unwrap();
        }
        cmd.spawn().unwrap()
    }

    fn restart(&mut self, extra: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.dir_path.join("host.sock"), &self.dir_path, extra);
    }

    fn accept(&self) -> Host {
        self.listener.set_nonblocking(true).unwrap();
        let start = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    return Host::new(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < PATIENCE, "agent never connected");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Request `id` as one frame.
fn request_frame(id: u64, payload: Payload) -> Vec<u8> {
    let mut out = Vec::new();
    let env = Envelope {
        id,
        correlation_id: 0,
        payload: Some(payload),
    };
    encode_envelope(&env, DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
    out
}

struct Host {
    stream: UnixStream,
    dec: Decoder,
    next_id: u64,
}

fn is_terminal(env: &Envelope) -> bool {
    !matches!(
        env.payload,
        Some(Payload::Ack(_)) | Some(Payload::ExecOutput(_)) | Some(Payload::FileChunk(_))
    )
}

impl Host {
    fn new(stream: UnixStream) -> Host {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Host {
            stream,
            dec: Decoder::new(DEFAULT_MAX_FRAME_BYTES),
            next_id: 1000,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn send(&mut self, id: u64, payload: Payload) {
        self.send_raw(&request_frame(id, payload));
    }

    /// The next envelope from the agent.
    fn recv(&mut self) -> Envelope {
        loop {
            match self.dec.decode() {
                Ok(Some(p)) => return decode_envelope(p).unwrap(),
                Ok(None) => {}
                Err(_) => continue,
            }
            let mut buf = [0u8; 4096];
            let n = match self.stream.read(&mut buf) {
                // A signal to this test process (a child of another test ending) is no silence.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("agent went quiet"),
            };
            assert!(n > 0, "agent closed the connection");
            self.dec.push(&buf[..n]);
        }
    }

    /// Envelopes up to and including the first one `stop` accepts (unsolicited pings and
    /// telemetry are skipped).
    fn recv_until(&mut self, mut stop: impl FnMut(&Envelope) -> bool) -> Vec<Envelope> {
        let mut seen = Vec::new();
        loop {
            let env = self.recv();
            if env.correlation_id == 0
                && matches!(
                    env.payload,
                    Some(Payload::Ping(_)) | Some(Payload::Telemetry(_))
                )
                && !stop(&env)
            {
                continue;
            }
            let last = stop(&env);
            seen.push(env);
            if last {
                return seen;
            }
        }
    }

    fn hello(&mut self) -> u64 {
        let env = self.recv_until(|e| matches!(e.payload, Some(Payload::AgentReady(_))));
        match &env.last().unwrap().payload {
            Some(Payload::AgentReady(r)) => r.session_id,
            _ => unreachable!(),
        }
    }

    /// Sends a request and returns what the agent sent for it, through its terminal reply.
    fn request(&mut self, payload: Payload) -> (u64, Vec<Envelope>) {
        self.next_id += 1;
        let id = self.next_id;
        self.send(id, payload);
        (id, self.replies(id))
    }

    fn replies(&mut self, id: u64) -> Vec<Envelope> {
        let all = self.recv_until(|e| e.correlation_id == id && is_terminal(e));
        all.into_iter().filter(|e| e.correlation_id == id).collect()
    }
}

fn terminal(envs: &[Envelope]) -> &Payload {
    envs.last().unwrap().payload.as_ref().unwrap()
}

fn assert_acked_first(envs: &[Envelope]) {
    assert!(
        matches!(envs[0].payload, Some(Payload::Ack(_))),
        "first answer is not an Ack: {envs:?}"
    );
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn exec_exit(envs: &[Envelope]) -> qx_proto::agent::ExecExit {
    match terminal(envs) {
        Payload::ExecExit(x) => x.clone(),
        other => panic!("expected ExecExit, got {other:?}"),
    }
}

fn error_code(envs: &[Envelope]) -> ErrorCode {
    match terminal(envs) {
        Payload::Error(e) => ErrorCode::try_from(e.code).unwrap(),
        other => panic!("expected Error, got {other:?}"),
    }
}

#[test]
fn agent_ready_on_connect_then_ping_is_answered() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    let sid = host.hello();
    assert_ne!(sid, 0);
    host.send(77, Payload::Ping(Ping { seq: 5 }));
    let got = host.recv_until(|e| e.correlation_id == 77);
    assert_eq!(
        got.last().unwrap().payload,
        Some(Payload::Pong(qx_proto::agent::Pong { seq: 5 }))
    );
    // A HostHello is answered with AgentReady for the same session.
    host.send(78, Payload::HostHello(HostHello::default()));
    let got = host.recv_until(|e| e.correlation_id == 78);
    match terminal(&got) {
        Payload::AgentReady(r) => {
            assert_eq!(r.session_id, sid);
            assert!(r.capabilities.iter().any(|c| c == "exec"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_request_is_acked_before_its_reply() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let requests = vec![
        Payload::TimeGetRequest(TimeGetRequest {}),
        Payload::ExecRequest(exec(&["true"])),
        Payload::LogsRequest(LogsRequest { max_lines: 5 }),
        Payload::SetTelemetryInterval(SetTelemetryInterval { interval_ms: 0 }),
        Payload::AgentLogs(AgentLogs::default()),
        Payload::Cancel(Cancel { target_id: 424242 }),
    ];
    for p in requests {
        let (_, envs) = host.request(p);
        assert_acked_first(&envs);
        assert!(envs.len() >= 2);
    }
}

#[test]
fn messages_the_agent_does_not_serve_get_a_clear_unsupported_error() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(Payload::AgentLogs(AgentLogs::default()));
    assert_eq!(error_code(&envs), ErrorCode::Unsupported);
    let agent = Agent::start(&["--set", "disable=exec"]);
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["true"])));
    assert_eq!(error_code(&envs), ErrorCode::Unsupported);
}

#[test]
fn redelivered_request_is_answered_from_cache_and_runs_once() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let file = agent.dir_path.join("appended");
    let script = format!("sleep 0.2; echo ran >> {}", file.display());
    let mut req = exec(&["sh", "-c", &script]);
    req.timeout_ms = 10_000;
    host.send(7, Payload::ExecRequest(req.clone()));
    // Redelivered while it runs: acked again, not started again.
    host.send(7, Payload::ExecRequest(req.clone()));
    let first = host.replies(7);
    assert_acked_first(&first);
    let exit = exec_exit(&first);
    assert_eq!(exit.exit_code, 0);
    // Redelivered after it finished: the same reply from the cache.
    host.send(7, Payload::ExecRequest(req));
    let again = host.replies(7);
    assert_acked_first(&again);
    assert_eq!(again.last(), first.last());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "ran\n");
}

#[test]
fn garbage_on_the_port_is_skipped_and_ping_still_answered() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let mut junk: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    junk.extend_from_slice(&qx_proto::MAGIC);
    junk.extend_from_slice(&[0xFF; 12]); // a header with a bad checksum
    junk.extend_from_slice(&qx_proto::MAGIC[..3]); // a partial magic
    host.send_raw(&junk);
    // The host's sync preamble, then a request.
    host.send_raw(&vec![0u8; 65552]);
    host.send(9, Payload::Ping(Ping { seq: 9 }));
    let got = host.recv_until(|e| e.correlation_id == 9);
    assert!(matches!(terminal(&got), Payload::Pong(p) if p.seq == 9));
}

#[test]
fn host_gone_and_back_gets_agent_ready_with_the_same_session_id() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    let sid = host.hello();
    drop(host);
    let mut host = agent.accept();
    assert_eq!(host.hello(), sid);
    let (_, envs) = host.request(Payload::TimeGetRequest(TimeGetRequest {}));
    assert!(matches!(
        terminal(&envs),
        Payload::TimeInfo(_) | Payload::Error(_)
    ));
}

#[test]
fn agent_restart_announces_a_new_session_id() {
    let mut agent = Agent::start(&[]);
    let mut host = agent.accept();
    let first = host.hello();
    agent.restart(&[]);
    let mut host = agent.accept();
    let second = host.hello();
    assert_ne!(first, second);
    assert_ne!(second, 0);
}

#[test]
fn exec_collected_returns_exit_code_and_both_streams() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let mut req = exec(&["echo out; echo err >&2; echo \"$QX_T\"; pwd; exit 3"]);
    req.shell = true;
    req.env = vec!["QX_T=env-ok".into()];
    req.cwd = "/tmp".into();
    let (_, envs) = host.request(Payload::ExecRequest(req));
    let exit = exec_exit(&envs);
    assert!(exit.exited);
    assert_eq!(exit.exit_code, 3);
    assert_eq!(exit.stdout, b"out\nenv-ok\n/tmp\n");
    assert_eq!(exit.stderr, b"err\n");
    assert!(!exit.stdout_truncated);
}

#[test]
fn exec_feeds_stdin_and_truncates_at_the_cap() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let mut req = exec(&["cat"]);
    req.stdin = b"0123456789".to_vec();
    req.stdout_cap_bytes = 4;
    let (_, envs) = host.request(Payload::ExecRequest(req));
    let exit = exec_exit(&envs);
    assert_eq!(exit.stdout, b"0123");
    assert!(exit.stdout_truncated);
    assert_eq!(exit.stdout_bytes, 10);
    // A missing program is a clear NOT_FOUND.
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["/nonexistent/program"])));
    assert_eq!(error_code(&envs), ErrorCode::NotFound);
}

#[test]
fn exec_streaming_sends_output_items_then_exit() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let mut req = exec(&[
        "sh",
        "-c",
        "printf one; sleep 0.1; printf two >&2; printf three",
    ]);
    req.stream = true;
    let (_, envs) = host.request(Payload::ExecRequest(req));
    assert_acked_first(&envs);
    let mut out = Vec::new();
    let mut err = Vec::new();
    for e in &envs {
        if let Some(Payload::ExecOutput(o)) = &e.payload {
            let target = if o.stream == OutputStream::Stdout as i32 {
                &mut out
            } else {
                &mut err
            };
            assert_eq!(o.offset as usize, target.len());
            target.extend_from_slice(&o.data);
        }
    }
    assert_eq!(out, b"onethree");
    assert_eq!(err, b"two");
    let exit = exec_exit(&envs);
    assert!(exit.stdout.is_empty());
    assert_eq!(exit.stdout_bytes, 8);
}

#[test]
fn exec_timeout_terminates_the_child() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let mut req = exec(&["sleep", "30"]);
    req.timeout_ms = 200;
    let (_, envs) = host.request(Payload::ExecRequest(req));
    let exit = exec_exit(&envs);
    assert!(exit.timed_out);
    assert!(!exit.exited);
    assert_eq!(exit.signal, libc::SIGTERM);
}

#[test]
fn exec_that_ignores_term_is_killed_after_the_grace_period() {
    let agent = Agent::start(&["--set", "exec_kill_grace_ms=100"]);
    let mut host = agent.accept();
    host.hello();
    let mut req = exec(&["sh", "-c", "trap '' TERM; sleep 30"]);
    req.timeout_ms = 100;
    let (_, envs) = host.request(Payload::ExecRequest(req));
    let exit = exec_exit(&envs);
    assert!(exit.timed_out);
    assert_eq!(exit.signal, libc::SIGKILL);
}

#[test]
fn too_many_concurrent_execs_get_busy_and_kill_stops_them() {
    let agent = Agent::start(&["--max-concurrent-exec", "2"]);
    let mut host = agent.accept();
    host.hello();
    host.send(1, Payload::ExecRequest(exec(&["sleep", "30"])));
    host.send(2, Payload::ExecRequest(exec(&["sleep", "30"])));
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["true"])));
    assert_eq!(error_code(&envs), ErrorCode::Busy);
    let (_, envs) = host.request(Payload::ExecKill(ExecKill {
        target_id: 1,
        signal: 0,
    }));
    assert!(matches!(terminal(&envs), Payload::Done(_)));
    let exit = exec_exit(&host.replies(1));
    assert_eq!(exit.signal, libc::SIGKILL);
    let (_, envs) = host.request(Payload::Cancel(Cancel { target_id: 2 }));
    assert!(matches!(terminal(&envs), Payload::Done(_)));
    let exit = exec_exit(&host.replies(2));
    assert!(!exit.exited);
    // Room again.
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["true"])));
    assert_eq!(exec_exit(&envs).exit_code, 0);
}

#[test]
fn silent_host_is_pinged_then_reannounced() {
    let agent = Agent::start(&["--ping-interval-ms", "100"]);
    let mut host = agent.accept();
    let sid = host.hello();
    let got = host.recv_until(|e| matches!(e.payload, Some(Payload::Ping(_))));
    assert!(matches!(
        got.last().unwrap().payload,
        Some(Payload::Ping(_))
    ));
    // Say nothing: after three silent intervals the agent re-announces itself.
    assert_eq!(host.hello(), sid);
}

#[test]
fn telemetry_is_pushed_when_enabled() {
    let agent = Agent::start(&["--telemetry-interval-ms", "50"]);
    let mut host = agent.accept();
    host.hello();
    let got = host.recv_until(|e| matches!(e.payload, Some(Payload::Telemetry(_))));
    assert_eq!(got.last().unwrap().correlation_id, 0);
}

#[test]
fn logs_request_returns_the_agents_own_lines() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(Payload::LogsRequest(LogsRequest { max_lines: 0 }));
    match terminal(&envs) {
        Payload::AgentLogs(l) => {
            assert!(l.lines.iter().any(|l| l.message.contains("started")));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sigterm_exits_cleanly() {
    let mut agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let pid = agent.child.id() as i32;
    // SAFETY-free: kill(1) is enough.
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = agent.child.wait().unwrap();
    assert!(code.success(), "{code:?}");
}

#[test]
fn bad_command_line_is_refused_with_status_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_quantix-kvm-agent"))
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_quantix-kvm-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--connect unix:PATH"));
}

fn sha256sum(path: &Path) -> Vec<u8> {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    let hex = hex.split_whitespace().next().unwrap().to_string();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn file_read_streams_chunks_then_done_and_hash_matches() {
    use qx_proto::agent::{FileHashRequest, FileReadRequest};
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let path = agent.dir_path.join("data.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let (_, envs) = host.request(Payload::FileReadRequest(FileReadRequest {
        path: path.display().to_string(),
        chunk_bytes: 32 * 1024,
        ..Default::default()
    }));
    assert_acked_first(&envs);
    let mut got = Vec::new();
    for e in &envs {
        if let Some(Payload::FileChunk(c)) = &e.payload {
            assert_eq!(c.offset as usize, got.len());
            got.extend_from_slice(&c.data);
        }
    }
    assert_eq!(got, data);
    match terminal(&envs) {
        Payload::FileReadDone(d) => {
            assert_eq!(d.bytes, data.len() as u64);
            assert_eq!(d.sha256, sha256sum(&path));
        }
        other => panic!("{other:?}"),
    }
    let (_, envs) = host.request(Payload::FileHashRequest(FileHashRequest {
        path: path.display().to_string(),
    }));
    match terminal(&envs) {
        Payload::FileHash(h) => assert_eq!(h.sha256, sha256sum(&path)),
        other => panic!("{other:?}"),
    }
}

/// A sparse 4 MiB file `big` and a 5-byte file `small` in the agent's directory.
fn big_and_small_files(agent: &Agent) -> (PathBuf, PathBuf) {
    let big = agent.dir_path.join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let small = agent.dir_path.join("small");
    std::fs::write(&small, b"small").unwrap();
    (big, small)
}

#[test]
fn too_many_concurrent_reads_and_hashes_get_busy() {
    use qx_proto::agent::{FileHashRequest, FileReadRequest};
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    // No read of the big one ends while the host is not reading (the outbox fills, and
    // while it is full no transfer is stepped).
    let (big, small) = big_and_small_files(&agent);
    let read = |p: &Path| {
        Payload::FileReadRequest(FileReadRequest {
            path: p.display().to_string(),
            ..Default::default()
        })
    };
    let hash = |p: &Path| {
        Payload::FileHashRequest(FileHashRequest {
            path: p.display().to_string(),
        })
    };
    // The default limit, 16, shared by reads and hashes.
    for id in 1..=8 {
        host.send(id, read(&big));
        host.send(100 + id, hash(&big));
    }
    let (_, envs) = host.request(read(&small));
    assert_eq!(error_code(&envs), ErrorCode::Busy);
    let (_, envs) = host.request(hash(&small));
    assert_eq!(error_code(&envs), ErrorCode::Busy);
    // Cancelled, they make room again (one that finished meanwhile answers NotFound).
    for target_id in (1..=8).chain(101..=108) {
        host.request(Payload::Cancel(Cancel { target_id }));
    }
    let (_, envs) = host.request(hash(&small));
    assert!(matches!(terminal(&envs), Payload::FileHash(h) if h.size == 5));
}

/// Sends `request` (id 1) and a cancel of it (id 2) in one write, so the agent takes both in
/// one turn, before the worker's open has come back to the loop; checks that the cancel
/// succeeds and the request ends `Cancelled`.
fn cancel_while_it_opens(host: &mut Host, request: Payload) {
    let mut out = request_frame(1, request);
    out.extend(request_frame(2, Payload::Cancel(Cancel { target_id: 1 })));
    host.send_raw(&out);
    let got = host.recv_until(|e| e.correlation_id == 2 && is_terminal(e));
    assert_eq!(terminal(&got), &Payload::Done(qx_proto::agent::Done {}));
    let ended: Vec<&Envelope> = got
        .iter()
        .filter(|e| e.correlation_id == 1 && is_terminal(e))
        .collect();
    assert!(
        matches!(ended[..], [e] if matches!(&e.payload, Some(Payload::Error(err))
            if err.code == ErrorCode::Cancelled as i32)),
        "{ended:?}"
    );
}

#[test]
fn a_read_cancelled_while_it_opens_is_cancelled_and_frees_its_slot() {
    use qx_proto::agent::{FileHashRequest, FileReadRequest};
    let agent = Agent::start(&["--set", "max_open_reads=1"]);
    let mut host = agent.accept();
    host.hello();
    let (big, small) = big_and_small_files(&agent);
    cancel_while_it_opens(
        &mut host,
        Payload::FileReadRequest(FileReadRequest {
            path: big.display().to_string(),
            ..Default::default()
        }),
    );
    // Its slot is free again (the limit is one).
    let (_, envs) = host.request(Payload::FileHashRequest(FileHashRequest {
        path: small.display().to_string(),
    }));
    assert!(matches!(terminal(&envs), Payload::FileHash(h) if h.size == 5));
}

#[test]
fn an_upload_cancelled_while_it_opens_is_cancelled_and_frees_its_slot() {
    use qx_proto::agent::FileWriteOpen;
    let agent = Agent::start(&["--set", "max_open_files=1"]);
    let mut host = agent.accept();
    host.hello();
    let path = agent.dir_path.join("up.txt");
    let open = || {
        Payload::FileWriteOpen(FileWriteOpen {
            path: path.display().to_string(),
            mode: 0o600,
            overwrite: true,
            ..Default::default()
        })
    };
    cancel_while_it_opens(&mut host, open());
    // Its slot is free again (the limit is one), and only the new upload's temporary file
    // is there.
    let (_, envs) = host.request(open());
    assert!(
        matches!(terminal(&envs), Payload::FileWriteOpened(_)),
        "{envs:?}"
    );
    let temps = std::fs::read_dir(&agent.dir_path)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".qx-")
        })
        .count();
    assert_eq!(temps, 1);
}

#[test]
fn file_write_is_committed_atomically() {
    use qx_proto::agent::{FileWriteChunk, FileWriteClose, FileWriteOpen};
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let path = agent.dir_path.join("sub/written.txt");
    let (_, envs) = host.request(Payload::FileWriteOpen(FileWriteOpen {
        path: path.display().to_string(),
        mode: 0o600,
        create_parents: true,
        overwrite: true,
        ..Default::default()
    }));
    let handle = match terminal(&envs) {
        Payload::FileWriteOpened(o) => o.handle,
        other => panic!("{other:?}"),
    };
    for (offset, part) in [(0u64, &b"hello "[..]), (6, &b"world"[..])] {
        let (_, envs) = host.request(Payload::FileWriteChunk(FileWriteChunk {
            handle,
            offset,
            data: part.to_vec(),
        }));
        assert!(matches!(terminal(&envs), Payload::Done(_)), "{envs:?}");
        assert!(!path.exists(), "visible before commit");
    }
    let (_, envs) = host.request(Payload::FileWriteClose(FileWriteClose {
        handle,
        commit: true,
        ..Default::default()
    }));
    assert!(matches!(terminal(&envs), Payload::FileWriteDone(d) if d.committed));
    assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
}

#[test]
fn file_policy_refusal_is_a_clear_error() {
    use qx_proto::agent::FileStatRequest;
    let agent = Agent::start(&["--set", "file_allow=/", "--set", "file_deny=/etc"]);
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(Payload::FileStatRequest(FileStatRequest {
        path: "/etc/passwd".into(),
        follow_symlinks: true,
    }));
    assert_eq!(error_code(&envs), ErrorCode::PolicyDenied);
}

#[test]
fn exec_runs_as_the_requested_user() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let mut req = exec(&["cat", "/proc/self/status"]);
    req.user = "nobody".into();
    let (_, envs) = host.request(Payload::ExecRequest(req));
    if !unsafe_free_euid_is_root() {
        // Not root: setuid fails and the spawn is refused.
        return;
    }
    // This child is forked (posix_spawn cannot change users): it too starts with no blocked
    // or ignored signals.
    let status = String::from_utf8(exec_exit(&envs).stdout).unwrap();
    assert!(status.contains("\nUid:\t65534\t"), "{status}");
    assert_starts_unmasked(&status);
}

#[test]
fn exec_as_a_user_gets_their_login_environment_and_groups() {
    if !unsafe_free_euid_is_root() {
        return;
    }
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let nobody: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .unwrap()
        .split(':')
        .collect();
    let script = "echo HOME=$HOME; echo USER=$USER; echo LOGNAME=$LOGNAME; echo SHELL=$SHELL; \
                  echo PATH=$PATH; echo KEEP=$KEEP; grep ^Groups: /proc/self/status";
    let mut req = exec(&["sh", "-c", script]);
    req.user = "nobody".into();
    req.env = vec!["KEEP=set by the request".into()];
    let (_, envs) = host.request(Payload::ExecRequest(req));
    let out = String::from_utf8(exec_exit(&envs).stdout).unwrap();
    let expected = format!(
        "HOME={}\nUSER=nobody\nLOGNAME=nobody\nSHELL={}\nPATH=/usr/local/bin:/usr/bin:/bin\nKEEP=set by the request\n",
        nobody[5], nobody[6]
    );
    assert!(out.starts_with(&expected), "{out}");
    // Its primary group, as initgroups gives it (none would be left after setgroups(0)).
    let groups = out.lines().last().unwrap();
    assert_eq!(
        groups.split_whitespace().collect::<Vec<_>>(),
        ["Groups:", nobody[3]],
        "{out}"
    );
    // What the request sets wins.
    let mut req = exec(&["sh", "-c", "echo HOME=$HOME"]);
    req.user = "nobody".into();
    req.env = vec!["HOME=/tmp".into()];
    let (_, envs) = host.request(Payload::ExecRequest(req));
    assert_eq!(exec_exit(&envs).stdout, b"HOME=/tmp\n");
}

#[test]
fn exec_as_a_user_enters_its_working_directory_as_that_user() {
    use std::os::unix::fs::PermissionsExt;
    if !unsafe_free_euid_is_root() {
        return;
    }
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let mut req = exec(&["pwd"]);
    req.user = "nobody".into();
    req.cwd = "/tmp".into();
    let (_, envs) = host.request(Payload::ExecRequest(req));
    assert_eq!(exec_exit(&envs).stdout, b"/tmp\n");
    // A directory only root may enter: the spawn fails (root could have entered it).
    let closed = agent.dir_path.join("root-only");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut req = exec(&["pwd"]);
    req.user = "nobody".into();
    req.cwd = closed.display().to_string();
    let (_, envs) = host.request(Payload::ExecRequest(req));
    assert_eq!(error_code(&envs), ErrorCode::PermissionDenied);
}

/// Checks a child's /proc/PID/status: no signal blocked (the agent blocks SIGTERM, SIGINT,
/// SIGHUP and SIGCHLD for its signalfd) and SIGPIPE not ignored (Rust's runtime ignores it in
/// the agent). Other ignored signals are not the agent's doing: a glibc posix_spawn, as the
/// test harness uses to start the agent, leaves glibc's internal signals 32 and 33 ignored.
fn assert_starts_unmasked(status: &str) {
    let mask = |field: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        u64::from_str_radix(hex.trim(), 16).unwrap()
    };
    assert_eq!(mask("SigBlk"), 0, "{status}");
    let sigpipe_bit = 1 << (13 - 1);
    assert_eq!(mask("SigIgn") & sigpipe_bit, 0, "{status}");
}

#[test]
fn exec_children_start_unmasked_in_their_own_process_group() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["cat", "/proc/self/status"])));
    assert_starts_unmasked(&String::from_utf8(exec_exit(&envs).stdout).unwrap());
    // Fields 1 and 5 of /proc/PID/stat: pid and process group.
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["cat", "/proc/self/stat"])));
    let stat = String::from_utf8(exec_exit(&envs).stdout).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let pid = stat.split(' ').next().unwrap();
    assert_eq!(
        fields[2], pid,
        "the child leads its own process group: {stat}"
    );
}

#[test]
fn exec_finds_programs_on_the_requests_path_or_the_system_one() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let bin = tempfile::tempdir().unwrap();
    let script = bin.path().join("qx-hello");
    std::fs::write(&script, "#!/bin/sh\necho \"found $1\"\n").unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    // Not on the agent's PATH: only the request's PATH finds it.
    let mut req = exec(&["qx-hello", "it"]);
    req.env = vec![format!("PATH=/nonexistent:{}", bin.path().display())];
    let (_, envs) = host.request(Payload::ExecRequest(req));
    assert_eq!(exec_exit(&envs).stdout, b"found it\n");
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["qx-hello"])));
    assert_eq!(error_code(&envs), ErrorCode::NotFound);
    // A cleared environment without PATH still finds system programs, and passes nothing on.
    let mut req = exec(&["env"]);
    req.clear_env = true;
    req.env = vec!["ONLY=this".into()];
    let (_, envs) = host.request(Payload::ExecRequest(req));
    assert_eq!(exec_exit(&envs).stdout, b"ONLY=this\n");
}

#[test]
fn exec_works_when_the_agent_was_started_with_its_standard_fds_closed() {
    // Were fds 0-2 free, the pipes to the child could get them, and moving them onto the
    // child's 0, 1 and 2 would cross the streams (Rust's runtime fills them with /dev/null).
    let agent = Agent::start_with_closed_stdio();
    let mut host = agent.accept();
    host.hello();
    let mut req = exec(&["cat; echo err >&2"]);
    req.shell = true;
    req.stdin = b"in to out\n".to_vec();
    let (_, envs) = host.request(Payload::ExecRequest(req));
    let exit = exec_exit(&envs);
    assert_eq!(exit.stdout, b"in to out\n");
    assert_eq!(exit.stderr, b"err\n");
}

fn unsafe_free_euid_is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

#[test]
fn streaming_exec_survives_a_stalled_host_without_loss_or_unbounded_memory() {
    let agent = Agent::start(&["--set", "outbox_bytes=262144"]);
    let mut host = agent.accept();
    host.hello();
    const TOTAL: u64 = 8 * 1024 * 1024;
    let mut req = exec(&["head", "-c", &TOTAL.to_string(), "/dev/zero"]);
    req.stream = true;
    host.next_id += 1;
    let id = host.next_id;
    host.send(id, Payload::ExecRequest(req));
    // The host reads nothing for a while: the child fills its pipe and blocks.
    std::thread::sleep(Duration::from_millis(500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rss_kb < 16 * 1024,
        "agent RSS {rss_kb} kB while the host stalls"
    );
    let envs = host.replies(id);
    let streamed: u64 = envs
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::ExecOutput(o)) => Some(o.data.len() as u64),
            _ => None,
        })
        .sum();
    assert_eq!(streamed, TOTAL);
    assert_eq!(exec_exit(&envs).exit_code, 0);
}

#[test]
fn sighup_reloads_the_configuration() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["true"])));
    assert_eq!(exec_exit(&envs).exit_code, 0);
    std::fs::write(agent.dir_path.join("agent.conf"), "disable = exec\n").unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &agent.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The reload is asynchronous: ask until the new configuration answers.
    let start = Instant::now();
    loop {
        let (_, envs) = host.request(Payload::ExecRequest(exec(&["true"])));
        if matches!(terminal(&envs), Payload::Error(_)) {
            assert_eq!(error_code(&envs), ErrorCode::Unsupported);
            break;
        }
        assert!(start.elapsed() < PATIENCE, "configuration never reloaded");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pty whose master is closed reports HUP to every poll, like a virtio-serial port with no
/// host: the agent must wait on it without spinning.
#[test]
#[allow(unsafe_code)]
fn hung_up_port_without_a_host_does_not_spin() {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: posix_openpt returns a new fd (checked), owned at once; grantpt/unlockpt/
    // ptsname_r take that fd and a buffer that outlives the calls.
    let (master, slave) = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(fd >= 0);
        let master = OwnedFd::from_raw_fd(fd);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        let name = std::ffi::CStr::from_ptr(name.as_ptr());
        (master, name.to_string_lossy().into_owned())
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.conf"), "").unwrap();
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_quantix-kvm-agent"))
            .args(["--device", &slave, "--config"])
            .arg(dir.path().join("agent.conf"))
            .args(["--telemetry-interval-ms", "0", "--log-level", "warn"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut guard.0;
    // Wait until the agent holds the port open, then hang up the other side.
    let start = Instant::now();
    let fd_dir = format!("/proc/{}/fd", child.id());
    while !std::fs::read_dir(&fd_dir)
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|p| p.display().to_string() == slave))
    {
        assert!(start.elapsed() < PATIENCE, "agent never opened the port");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(master);
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let fields: Vec<u64> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        fields[0] + fields[1]
    };
    std::thread::sleep(Duration::from_millis(100));
    let before = ticks();
    std::thread::sleep(Duration::from_secs(1));
    let used = ticks() - before;
    // A spinning loop burns ~100 ticks a second; an idle one none.
    assert!(used < 20, "{used} CPU ticks in one second with no host");
    assert!(child.try_wait().unwrap().is_none(), "agent exited");
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
fn while_frozen_only_safe_requests_run_and_the_agent_thaws_by_itself() {
    use qx_proto::agent::{FreezeState, FsFreezeRequest, FsFreezeStatusRequest, FsThawRequest};
    let fs = LoopFs::new();
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(Payload::FsFreezeRequest(FsFreezeRequest {
        mountpoints: vec![fs.mnt.clone()],
        auto_thaw_ms: 60_000,
        run_hooks: false,
    }));
    let token = match terminal(&envs) {
        Payload::FsFreezeReply(r) => {
            assert_eq!(r.frozen, vec![fs.mnt.clone()]);
            r.token
        }
        other => panic!("{other:?}"),
    };
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["true"])));
    assert_eq!(error_code(&envs), ErrorCode::Frozen);
    host.send(5, Payload::Ping(Ping { seq: 5 }));
    let got = host.recv_until(|e| e.correlation_id == 5);
    assert!(matches!(terminal(&got), Payload::Pong(_)));
    let (_, envs) = host.request(Payload::FsFreezeStatusRequest(FsFreezeStatusRequest {}));
    assert!(matches!(terminal(&envs),
        Payload::FsFreezeStatus(s) if s.state == FreezeState::Frozen as i32));
    let (_, envs) = host.request(Payload::FsThawRequest(FsThawRequest {
        token,
        run_hooks: false,
    }));
    assert!(matches!(terminal(&envs), Payload::FsThawReply(r) if r.thawed == vec![fs.mnt.clone()]));
    let (_, envs) = host.request(Payload::ExecRequest(exec(&["true"])));
    assert_eq!(exec_exit(&envs).exit_code, 0);

    // A host that never thaws: the agent thaws at the deadline on its own.
    let (_, envs) = host.request(Payload::FsFreezeRequest(FsFreezeRequest {
        mountpoints: vec![fs.mnt.clone()],
        auto_thaw_ms: 200,
        run_hooks: false,
    }));
    assert!(matches!(terminal(&envs), Payload::FsFreezeReply(_)));
    let start = Instant::now();
    loop {
        let (_, envs) = host.request(Payload::FsFreezeStatusRequest(FsFreezeStatusRequest {}));
        if matches!(terminal(&envs),
            Payload::FsFreezeStatus(s) if s.state == FreezeState::Thawed as i32)
        {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "never auto-thawed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Writable again.
    std::fs::write(format!("{}/after", fs.mnt), b"ok").unwrap();
}

#[test]
fn power_request_is_answered_first_then_the_command_runs_after_the_delay() {
    use qx_proto::agent::{PowerAction, PowerRequest};
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
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(Payload::PowerRequest(PowerRequest {
        action: PowerAction::Reboot as i32,
        delay_ms: 1000,
    }));
    assert_acked_first(&envs);
    match terminal(&envs) {
        Payload::PowerReply(r) => assert!(r.method.ends_with("power.sh reboot"), "{r:?}"),
        other => panic!("{other:?}"),
    }
    // The reply came before the action.
    assert!(!marker.exists());
    let start = Instant::now();
    while !marker.exists() {
        assert!(start.elapsed() < PATIENCE, "power command never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    while std::fs::read_to_string(&marker).unwrap_or_default() != "reboot\n" {
        assert!(start.elapsed() < PATIENCE);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn host_leaving_mid_frame_gets_the_tail_then_agent_ready_first_on_return() {
    let agent = Agent::start(&[]);
    let mut host = agent.accept();
    let sid = host.hello();
    let mut req = exec(&["head", "-c", "3000000", "/dev/zero"]);
    req.stream = true;
    host.send(40, Payload::ExecRequest(req));
    // Read an odd number of bytes, almost surely ending inside a frame, then vanish.
    let mut taken = 0;
    let mut buf = [0u8; 1000];
    while taken < 100_001 {
        let n = host
            .stream
            .read(&mut buf[..(100_001 - taken).min(1000)])
            .unwrap();
        assert!(n > 0);
        taken += n;
    }
    drop(host);
    let mut host = agent.accept();
    // The first whole frame on the new connection is AgentReady, same session; what came
    // before it was at most the tail of one frame.
    let first = host.recv();
    match &first.payload {
        Some(Payload::AgentReady(r)) => assert_eq!(r.session_id, sid),
        other => panic!("first frame after reconnect: {other:?}"),
    }
    let skipped = host.dec.stats().garbage_bytes;
    assert!(
        skipped <= 16 + 64 * 1024,
        "{skipped} bytes before AgentReady"
    );
    // The exec kept running and finishes on the new connection.
    let envs = host.replies(40);
    assert_eq!(exec_exit(&envs).exit_code, 0);
}

#[test]
fn freeze_hooks_run_before_freezing_and_a_failing_hook_prevents_the_freeze() {
    use qx_proto::agent::{FreezeState, FsFreezeRequest, FsFreezeStatusRequest, FsThawRequest};
    use std::os::unix::fs::PermissionsExt;
    let fs = LoopFs::new();
    let hooks = tempfile::tempdir().unwrap();
    let marker = hooks.path().join("marker");
    let write_hook = |name: &str, body: &str| {
        let path = hooks.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_hook("10-record", &format!("echo \"$1\" >> {}", marker.display()));
    write_hook("20-fail", "echo hook refuses >&2; exit 1");
    let hooks_dir = format!("freeze_hooks_dir={}", hooks.path().display());
    let agent = Agent::start(&["--set", &hooks_dir]);
    let mut host = agent.accept();
    host.hello();
    let freeze = || {
        Payload::FsFreezeRequest(FsFreezeRequest {
            mountpoints: vec![fs.mnt.clone()],
            auto_thaw_ms: 60_000,
            run_hooks: true,
        })
    };
    let (_, envs) = host.request(freeze());
    assert_eq!(error_code(&envs), ErrorCode::FailedPrecondition);
    let (_, envs) = host.request(Payload::FsFreezeStatusRequest(FsFreezeStatusRequest {}));
    assert!(matches!(terminal(&envs),
        Payload::FsFreezeStatus(s) if s.state == FreezeState::Thawed as i32));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "freeze\n");

    std::fs::remove_file(hooks.path().join("20-fail")).unwrap();
    let (_, envs) = host.request(freeze());
    let token = match terminal(&envs) {
        Payload::FsFreezeReply(r) => r.token,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "freeze\nfreeze\n"
    );
    let (_, envs) = host.request(Payload::FsThawRequest(FsThawRequest {
        token,
        run_hooks: true,
    }));
    assert!(matches!(terminal(&envs), Payload::FsThawReply(_)));
    let start = Instant::now();
    while std::fs::read_to_string(&marker).unwrap() != "freeze\nfreeze\nthaw\n" {
        assert!(start.elapsed() < PATIENCE, "post-thaw hook never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `mnt` is frozen, found without writing to it: FIFREEZE of a frozen filesystem
/// fails (EBUSY); one that was not frozen is thawed again at once.
fn is_frozen(mnt: &str) -> bool {
    let froze = Command::new("fsfreeze")
        .args(["-f", mnt])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    if froze {
        let _ = Command::new("fsfreeze").args(["-u", mnt]).status();
    }
    !froze
}

/// Waits (at most [`PATIENCE`]) until `done` holds.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn freeze_request(mnt: &str, auto_thaw_ms: u32, run_hooks: bool) -> Payload {
    Payload::FsFreezeRequest(qx_proto::agent::FsFreezeRequest {
        mountpoints: vec![mnt.to_string()],
        auto_thaw_ms,
        run_hooks,
    })
}

fn freeze_token(envs: &[Envelope]) -> u64 {
    match terminal(envs) {
        Payload::FsFreezeReply(r) => r.token,
        other => panic!("{other:?}"),
    }
}

/// Two hooks that each record their start and end around a short sleep, so hooks that run
/// at the same time interleave in the marker file.
fn slow_recording_hooks(dir: &Path, marker: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    for name in ["a", "b"] {
        let path = dir.join(format!("{}-{name}", if name == "a" { 10 } else { 20 }));
        let m = marker.display();
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"$1 {name} start\" >> {m}\nsleep 0.3\necho \"$1 {name} end\" >> {m}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    format!("freeze_hooks_dir={}", dir.display())
}

const FREEZE_HOOKS_RAN: &str = "freeze a start\nfreeze a end\nfreeze b start\nfreeze b end\n";
const THAW_HOOKS_RAN: &str = "thaw b start\nthaw b end\nthaw a start\nthaw a end\n";

#[test]
fn sigterm_of_a_frozen_agent_thaws_before_it_exits() {
    let mut agent = Agent::start(&[]);
    // Dropped before the agent: a failing test thaws before it kills the agent.
    let fs = LoopFs::new();
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(freeze_request(&fs.mnt, 60_000, false));
    freeze_token(&envs);
    assert!(is_frozen(&fs.mnt));
    let pid = agent.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let code = agent.child.wait().unwrap();
    assert!(code.success(), "{code:?}");
    assert!(
        !is_frozen(&fs.mnt),
        "the agent exited and left the filesystem frozen"
    );
    assert!(!agent.dir_path.join("frozen").exists());
}

#[test]
fn auto_thaw_delay_is_capped() {
    // docs/operations.md: a freeze lasts at most 10 minutes, whatever the host asks.
    const CAP_MS: i64 = 10 * 60 * 1000;
    let agent = Agent::start(&[]);
    // Dropped before the agent: a failing test thaws before it kills the agent.
    let fs = LoopFs::new();
    let mut host = agent.accept();
    host.hello();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (_, envs) = host.request(freeze_request(&fs.mnt, u32::MAX, false));
    let (token, at) = match terminal(&envs) {
        Payload::FsFreezeReply(r) => (r.token, r.auto_thaw_unix_ms),
        other => panic!("{other:?}"),
    };
    let (_, envs) = host.request(Payload::FsThawRequest(qx_proto::agent::FsThawRequest {
        token,
        run_hooks: false,
    }));
    assert!(matches!(terminal(&envs), Payload::FsThawReply(_)));
    assert!(
        at - before <= CAP_MS + 60_000,
        "auto-thaw {} ms away",
        at - before
    );
}

#[test]
fn thaw_hooks_run_one_after_another_in_reverse_order() {
    let hooks = tempfile::tempdir().unwrap();
    let marker = hooks.path().join("marker");
    let hooks_dir = slow_recording_hooks(hooks.path(), &marker);
    let agent = Agent::start(&["--set", &hooks_dir]);
    // Dropped before the agent: a failing test thaws before it kills the agent.
    let fs = LoopFs::new();
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(freeze_request(&fs.mnt, 60_000, true));
    let token = freeze_token(&envs);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), FREEZE_HOOKS_RAN);
    let (_, envs) = host.request(Payload::FsThawRequest(qx_proto::agent::FsThawRequest {
        token,
        run_hooks: true,
    }));
    assert!(matches!(terminal(&envs), Payload::FsThawReply(_)));
    let expected = format!("{FREEZE_HOOKS_RAN}{THAW_HOOKS_RAN}");
    wait_for("thaw hooks did not run one after another", || {
        let got = std::fs::read_to_string(&marker).unwrap();
        assert!(expected.starts_with(&got), "hooks ran out of order:\n{got}");
        got == expected
    });
}

#[test]
fn auto_thaw_runs_the_thaw_hooks() {
    let hooks = tempfile::tempdir().unwrap();
    let marker = hooks.path().join("marker");
    let hooks_dir = slow_recording_hooks(hooks.path(), &marker);
    let agent = Agent::start(&["--set", &hooks_dir]);
    // Dropped before the agent: a failing test thaws before it kills the agent.
    let fs = LoopFs::new();
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(freeze_request(&fs.mnt, 300, true));
    freeze_token(&envs);
    let expected = format!("{FREEZE_HOOKS_RAN}{THAW_HOOKS_RAN}");
    wait_for("the auto-thaw did not run the thaw hooks", || {
        std::fs::read_to_string(&marker).unwrap() == expected
    });
    assert!(!is_frozen(&fs.mnt));
}

#[test]
fn a_restarted_agent_thaws_and_runs_the_thaw_hooks_a_dead_one_left() {
    let hooks = tempfile::tempdir().unwrap();
    let marker = hooks.path().join("marker");
    let hooks_dir = slow_recording_hooks(hooks.path(), &marker);
    let mut agent = Agent::start(&["--set", &hooks_dir]);
    // Dropped before the agent: a failing test thaws before it kills the agent.
    let fs = LoopFs::new();
    let mut host = agent.accept();
    host.hello();
    let (_, envs) = host.request(freeze_request(&fs.mnt, 60_000, true));
    freeze_token(&envs);
    // SIGKILL: no code of the agent runs; the next one recovers from the state file.
    agent.restart(&["--set", &hooks_dir]);
    let _host = agent.accept();
    wait_for("the restarted agent did not thaw", || !is_frozen(&fs.mnt));
    let expected = format!("{FREEZE_HOOKS_RAN}{THAW_HOOKS_RAN}");
    wait_for("the restarted agent did not run the thaw hooks", || {
        std::fs::read_to_string(&marker).unwrap() == expected
    });
}

#[test]
fn an_upload_aborted_while_frozen_never_blocks_the_agent() {
    use qx_proto::agent::{FileWriteChunk, FileWriteOpen, FsThawRequest};
    let agent = Agent::start(&[]);
    // Dropped before the agent: a failing test thaws before it kills the agent.
    let fs = LoopFs::new();
    let mut host = agent.accept();
    host.hello();
    let hello = |id| {
        Payload::HostHello(HostHello {
            host_session_id: id,
            ..Default::default()
        })
    };
    host.send(1, hello(0x14));
    host.recv_until(|e| e.correlation_id == 1);
    let (_, envs) = host.request(Payload::FileWriteOpen(FileWriteOpen {
        path: format!("{}/upload.bin", fs.mnt),
        overwrite: true,
        ..Default::default()
    }));
    let handle = match terminal(&envs) {
        Payload::FileWriteOpened(o) => o.handle,
        other => panic!("{other:?}"),
    };
    let (_, envs) = host.request(Payload::FileWriteChunk(FileWriteChunk {
        handle,
        offset: 0,
        data: vec![1; 4096],
    }));
    assert!(matches!(terminal(&envs), Payload::Done(_)));
    let (_, envs) = host.request(freeze_request(&fs.mnt, 60_000, false));
    let token = freeze_token(&envs);
    // The daemon restarts: the agent aborts the upload of the old host session.
    host.send(2, hello(0x15));
    host.recv_until(|e| e.correlation_id == 2);
    host.send(3, Payload::Ping(Ping { seq: 3 }));
    let got = host.recv_until(|e| e.correlation_id == 3);
    assert!(matches!(terminal(&got), Payload::Pong(_)));
    let (_, envs) = host.request(Payload::FsThawRequest(FsThawRequest {
        token,
        run_hooks: false,
    }));
    assert!(matches!(terminal(&envs), Payload::FsThawReply(_)));
    // The aborted upload's temporary file goes once the filesystem is thawed.
    wait_for("the aborted upload's temporary file stayed", || {
        std::fs::read_dir(&fs.mnt)
            .unwrap()
            .flatten()
            .all(|e| e.file_name() == "lost+found")
    });
}

#[test]
fn a_freeze_cancels_a_trim_that_has_not_reached_the_filesystem_and_says_so() {
    use qx_proto::agent::{FsThawRequest, FsTrimRequest};
    let agent = Agent::start(&[]);
    // Dropped before the agent: a failing test thaws before it kills the agent.
    let fs = LoopFs::new();
    let mut host = agent.accept();
    host.hello();
    // Both in one write: the agent takes them in the same turn, the trim first.
    let mut bytes = Vec::new();
    for (id, payload) in [
        (
            50,
            Payload::FsTrimRequest(FsTrimRequest {
                mountpoints: vec![fs.mnt.clone()],
                minimum_bytes: 0,
            }),
        ),
        (51, freeze_request(&fs.mnt, 60_000, false)),
    ] {
        bytes.extend(request_frame(id, payload));
    }
    host.send_raw(&bytes);
    let mut trim = None;
    let mut token = None;
    while trim.is_none() || token.is_none() {
        let env = host.recv();
        match env.payload {
            Some(Payload::FsTrimReply(r)) => trim = Some(r),
            Some(Payload::FsFreezeReply(r)) => token = Some(r.token),
            Some(Payload::Error(e)) => panic!("{e:?}"),
            _ => {}
        }
    }
    let trim = trim.unwrap();
    let (_, envs) = host.request(Payload::FsThawRequest(FsThawRequest {
        token: token.unwrap(),
        run_hooks: false,
    }));
    assert!(matches!(terminal(&envs), Payload::FsThawReply(_)));
    assert_eq!(trim.results.len(), 1);
    assert!(
        trim.results[0].error.contains("freeze"),
        "trimmed a filesystem being frozen: {:?}",
        trim.results[0]
    );
}

#[test]
fn a_filesystem_call_that_blocks_never_keeps_a_ping_waiting() {
    use qx_proto::agent::MkdirRequest;
    let agent = Agent::start(&[]);
    // Dropped before the agent: a failing test thaws before it kills the agent.
    let fs = LoopFs::new();
    let mut host = agent.accept();
    host.hello();
    // Frozen behind the agent's back (another tool): a mkdir there blocks in the kernel
    // until the thaw.
    let frozen = Command::new("fsfreeze")
        .args(["-f", &fs.mnt])
        .status()
        .unwrap();
    assert!(frozen.success());
    host.send(
        60,
        Payload::MkdirRequest(MkdirRequest {
            path: format!("{}/made-while-frozen", fs.mnt),
            ..Default::default()
        }),
    );
    host.send(61, Payload::Ping(Ping { seq: 61 }));
    let got = host.recv_until(|e| e.correlation_id == 61);
    assert!(matches!(terminal(&got), Payload::Pong(_)));
    assert!(Command::new("fsfreeze")
        .args(["-u", &fs.mnt])
        .status()
        .unwrap()
        .success());
    let envs = host.replies(60);
    assert!(matches!(terminal(&envs), Payload::Done(_)), "{envs:?}");
}
