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
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("host.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let child = Self::spawn(&sock, dir.path(), extra);
        Agent {
            child,
            dir_path: dir.path().to_path_buf(),
            _dir: dir,
            listener,
        }
    }

    fn spawn(sock: &Path, dir: &Path, extra: &[&str]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_quantix-kvm-agent"));
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
        let mut out = Vec::new();
        let env = Envelope {
            id,
            correlation_id: 0,
            payload: Some(payload),
        };
        encode_envelope(&env, DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
        self.send_raw(&out);
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
            let n = self.stream.read(&mut buf).expect("agent went quiet");
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
