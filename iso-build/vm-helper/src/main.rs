//! The host end of iso-build/vm-test.sh, speaking the agent protocol with the `qx_proto` codec
//! over a VM's agent chardev socket (QEMU's `server=on,wait=off` end).
//!
//! `qx-iso-vm-helper ready SOCKET TIMEOUT_S`
//!   Performs the host side of the session start (the 65552-byte sync preamble, then
//!   `HostHello`) and waits for `AgentReady`; prints `agent_version=.. session_id=.. arch=..
//!   kernel_release=.. hostname=..`. The agent may not exist yet (the guest is installing it),
//!   so every reconnect repeats the hello and only the overall deadline ends the wait.
//!
//! `qx-iso-vm-helper upgrade SOCKET TIMEOUT_S LAUNCHER [INSTALL_OPTION...]`
//!   What `qxctl agent install` does through the agent, minus gRPC: runs the launcher script
//!   (iso-build/guest-launch.sh) through `ExecRequest`, waits for an `AgentReady` with a new
//!   session id (the installer restarted the agent), then reads the installer's exit status
//!   file through the new agent. Prints `old_session=.. new_session=.. installer_rc=..` and the
//!   installer's log.
//!
//! `qx-iso-vm-helper qga-install QGA_SOCKET TIMEOUT_S AGENT_SOCKET LAUNCHER [INSTALL_OPTION...]`
//!   What `qxctl agent install --qemu-ga` does, minus libvirt: runs the launcher through
//!   qemu-guest-agent's `guest-exec` on a guest without our agent, then waits for the new
//!   agent's `AgentReady` and reads the installer's exit status through it. Prints
//!   `installer_rc=.. agent_version=..` and the installer's log.
//!
//! Exit 0 on success, 1 on failure or timeout (reason on stderr), 2 on bad usage.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{AgentReady, Envelope, ExecExit, ExecRequest, HostHello};
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};

/// Zero bytes sent before the hello (one maximum sent frame plus a header).
const SYNC_PREAMBLE_BYTES: usize = 65552;
const READ_SLICE_MS: u64 = 100;
const RECONNECT_MS: u64 = 200;
const WRITE_STALL_S: u64 = 5;
const RC_FILE: &str = "/run/quantix-kvm-agent-install.rc";
const LOG_FILE: &str = "/var/log/quantix-kvm-agent-install.log";

/// One connection to the socket.
struct Conn {
    stream: UnixStream,
    decoder: Decoder,
    next_id: u64,
}

impl Conn {
    /// Connects and sends the preamble and a HostHello.
    fn open(path: &str) -> Result<Self, String> {
        let stream = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_millis(READ_SLICE_MS)))
            .map_err(|e| e.to_string())?;
        // QEMU stops reading the socket while no guest process holds the port: a write that
        // stalls this long ends the attempt (the caller reconnects; zeros are harmless).
        stream
            .set_write_timeout(Some(Duration::from_secs(WRITE_STALL_S)))
            .map_err(|e| e.to_string())?;
        let mut conn = Conn {
            stream,
            decoder: Decoder::new(DEFAULT_MAX_FRAME_BYTES),
            next_id: 1,
        };
        conn.stream
            .write_all(&vec![0u8; SYNC_PREAMBLE_BYTES])
            .map_err(|e| e.to_string())?;
        conn.send(Payload::HostHello(HostHello {
            protocol_version: qx_proto::PROTOCOL_VERSION,
            host_version: "qx-iso-vm-helper".into(),
            host_session_id: u64::from(std::process::id()),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }))?;
        Ok(conn)
    }

    /// Sends a request with a fresh id; returns the id.
    fn send(&mut self, payload: Payload) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = Vec::new();
        let env = Envelope {
            id,
            correlation_id: 0,
            payload: Some(payload),
        };
        encode_envelope(&env, DEFAULT_MAX_FRAME_BYTES, &mut out).map_err(|e| e.to_string())?;
        self.stream.write_all(&out).map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// The next whole envelope; `Ok(None)` at the deadline; an error when the socket closes.
    fn recv(&mut self, deadline: Instant) -> Result<Option<Envelope>, String> {
        loop {
            loop {
                match self.decoder.decode() {
                    Ok(Some(payload)) => {
                        if let Ok(env) = decode_envelope(payload) {
                            return Ok(Some(env));
                        }
                    }
                    Ok(None) => break,
                    // Damaged frames are skipped; the decoder resynchronises.
                    Err(_) => continue,
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            match self.stream.read(self.decoder.spare(64 * 1024)) {
                Ok(0) => return Err("the socket closed".into()),
                Ok(n) => self.decoder.commit(n),
                Err(e) if read_timed_out(&e) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Waits for an AgentReady whose session id `accept`s.
    fn ready(
        &mut self,
        deadline: Instant,
        accept: &dyn Fn(u64) -> bool,
    ) -> Result<Option<AgentReady>, String> {
        while let Some(env) = self.recv(deadline)? {
            if let Some(Payload::AgentReady(r)) = env.payload {
                if accept(r.session_id) {
                    return Ok(Some(r));
                }
            }
        }
        Ok(None)
    }

    /// Runs a command and returns its ExecExit (Ack and other frames are skipped).
    fn exec(&mut self, argv: Vec<String>, deadline: Instant) -> Result<ExecExit, String> {
        let id = self.send(Payload::ExecRequest(ExecRequest {
            argv,
            ..Default::default()
        }))?;
        while let Some(env) = self.recv(deadline)? {
            if env.correlation_id != id {
                continue;
            }
            match env.payload {
                Some(Payload::ExecExit(exit)) => return Ok(exit),
                Some(Payload::Error(e)) => return Err(format!("exec failed: {e:?}")),
                _ => {}
            }
        }
        Err("no ExecExit before the deadline".into())
    }
}

/// Connects (again and again) until an AgentReady that `accept`s arrives or the deadline.
fn wait_ready(
    path: &str,
    deadline: Instant,
    accept: &dyn Fn(u64) -> bool,
) -> Result<(Conn, AgentReady), String> {
    let mut last_error = String::from("no AgentReady");
    while Instant::now() < deadline {
        match Conn::open(path) {
            Ok(mut conn) => match conn.ready(deadline, accept) {
                Ok(Some(r)) => return Ok((conn, r)),
                Ok(None) => {}
                Err(e) => last_error = e,
            },
            Err(e) => last_error = e,
        }
        std::thread::sleep(Duration::from_millis(RECONNECT_MS));
    }
    Err(format!("no AgentReady on {path} ({last_error})"))
}

fn describe(r: &AgentReady) -> String {
    format!(
        "agent_version={} session_id={:#x} arch={} kernel_release={} hostname={}",
        r.agent_version, r.session_id, r.arch, r.kernel_release, r.hostname
    )
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn upgrade(path: &str, deadline: Instant, launcher: &str, opts: &[String]) -> Result<(), String> {
    let (mut conn, old) = wait_ready(path, deadline, &|_| true)?;
    let mut argv = sh(launcher);
    argv.push("qx-agent-install".into());
    argv.extend(opts.iter().cloned());
    let launched = conn.exec(argv, deadline)?;
    let out = String::from_utf8_lossy(&launched.stdout);
    if !(launched.exited && launched.exit_code == 0) {
        return Err(format!(
            "launcher failed: {launched:?} stderr={}",
            String::from_utf8_lossy(&launched.stderr)
        ));
    }
    eprintln!("launcher: {}", out.trim());
    drop(conn);
    let (mut conn, new) = wait_ready(path, deadline, &|s| s != old.session_id)?;
    // The installer writes its status after the new agent holds the port: poll for it.
    loop {
        let exit = conn.exec(sh(&format!("cat {RC_FILE} && cat {LOG_FILE}")), deadline)?;
        if exit.exited && exit.exit_code == 0 {
            let text = String::from_utf8_lossy(&exit.stdout).into_owned();
            let (rc, log) = text.split_once('\n').unwrap_or((text.as_str(), ""));
            println!(
                "old_session={:#x} new_session={:#x} installer_rc={} {}",
                old.session_id,
                new.session_id,
                rc.trim(),
                describe(&new)
            );
            println!("{}", log.trim_end());
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err("the installer's status file never appeared".into());
        }
        std::thread::sleep(Duration::from_millis(RECONNECT_MS));
    }
}

/// A JSON string literal (for the launcher script inside a qemu-ga command).
fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The integer after `"key":` in a compact or spaced JSON reply.
fn json_int(reply: &str, key: &str) -> Option<i64> {
    let compact: String = reply.chars().filter(|c| !c.is_whitespace()).collect();
    let at = compact.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = compact[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// A line-oriented qemu-guest-agent client.
struct Qga {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Qga {
    fn open(path: &str) -> Result<Self, String> {
        let stream = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_millis(READ_SLICE_MS)))
            .map_err(|e| e.to_string())?;
        Ok(Qga {
            stream,
            buf: Vec::new(),
        })
    }

    /// The next reply line (0xff sync delimiters dropped), or None at the deadline.
    fn line(&mut self, deadline: Instant) -> Result<Option<String>, String> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).filter(|&b| b != 0xff).collect();
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if !text.is_empty() {
                    return Ok(Some(text));
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("qemu-ga closed the connection".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if read_timed_out(&e) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends a command and returns the next reply line that is not a stale sync answer.
    fn call(&mut self, command: &str, deadline: Instant) -> Result<String, String> {
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let reply = self
                .line(deadline)?
                .ok_or_else(|| format!("no reply to {command:.60}"))?;
            // A late answer to a repeated guest-sync-delimited: not ours.
            if json_int(&reply, "return") == Some(i64::from(std::process::id())) {
                continue;
            }
            if reply.contains("\"error\"") {
                return Err(format!("qemu-ga: {reply}"));
            }
            return Ok(reply);
        }
    }

    /// guest-sync-delimited until its id comes back (qemu-ga may still be starting).
    fn sync(&mut self, deadline: Instant) -> Result<(), String> {
        let id = u64::from(std::process::id());
        let cmd =
            format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n");
        while Instant::now() < deadline {
            self.stream
                .write_all(cmd.as_bytes())
                .map_err(|e| e.to_string())?;
            let slice = (Instant::now() + Duration::from_secs(2)).min(deadline);
            while let Some(line) = self.line(slice)? {
                if json_int(&line, "return") == Some(i64::from(std::process::id())) {
                    return Ok(());
                }
            }
        }
        Err("qemu-ga never answered guest-sync-delimited".into())
    }
}

/// The first install with only qemu-guest-agent in the guest, as `qxctl agent install --qemu-ga`
/// does: guest-exec of the launcher, its exit status, then the new agent's AgentReady and the
/// installer's status read through it.
fn qga_install(
    qga_path: &str,
    agent_path: &str,
    deadline: Instant,
    launcher: &str,
    opts: &[String],
) -> Result<(), String> {
    let mut qga = Qga::open(qga_path)?;
    qga.sync(deadline)?;
    let mut args = vec![
        json_str("-c"),
        json_str(launcher),
        json_str("qx-agent-install"),
    ];
    args.extend(opts.iter().map(|o| json_str(o)));
    let exec = format!(
        "{{\"execute\":\"guest-exec\",\"arguments\":{{\"path\":\"/bin/sh\",\"arg\":[{}],\"capture-output\":true}}}}",
        args.join(",")
    );
    let reply = qga.call(&exec, deadline)?;
    let pid = json_int(&reply, "pid").ok_or_else(|| format!("guest-exec: {reply}"))?;
    let status = format!("{{\"execute\":\"guest-exec-status\",\"arguments\":{{\"pid\":{pid}}}}}");
    loop {
        let st = qga.call(&status, deadline)?;
        if st
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .contains("\"exited\":true")
        {
            if json_int(&st, "exitcode") != Some(0) {
                return Err(format!("launcher under qemu-ga failed: {st}"));
            }
            eprintln!("launcher exited 0 under qemu-ga (pid {pid})");
            break;
        }
        if Instant::now() >= deadline {
            return Err("the launcher never exited under qemu-ga".into());
        }
        std::thread::sleep(Duration::from_millis(RECONNECT_MS));
    }
    let (mut conn, ready) = wait_ready(agent_path, deadline, &|_| true)?;
    loop {
        let exit = conn.exec(sh(&format!("cat {RC_FILE} && cat {LOG_FILE}")), deadline)?;
        if exit.exited && exit.exit_code == 0 {
            let text = String::from_utf8_lossy(&exit.stdout).into_owned();
            let (rc, log) = text.split_once('\n').unwrap_or((text.as_str(), ""));
            println!("installer_rc={} {}", rc.trim(), describe(&ready));
            println!("{}", log.trim_end());
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err("the installer's status file never appeared".into());
        }
        std::thread::sleep(Duration::from_millis(RECONNECT_MS));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let timeout = args.get(3).and_then(|s| s.parse::<u64>().ok());
    let (Some(mode), Some(path), Some(timeout_s)) = (args.get(1), args.get(2), timeout) else {
        eprintln!("usage: qx-iso-vm-helper ready|upgrade|qga-install SOCKET TIMEOUT_S [..] (see the source)");
        std::process::exit(2);
    };
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let result = match (mode.as_str(), args.get(4)) {
        ("ready", None) => wait_ready(path, deadline, &|_| true).map(|(_, r)| {
            println!("{}", describe(&r));
        }),
        // qga-install QGA_SOCKET TIMEOUT_S AGENT_SOCKET LAUNCHER [OPTION...]
        ("qga-install", Some(agent_sock)) => match args.get(5) {
            Some(launcher_file) => std::fs::read_to_string(launcher_file)
                .map_err(|e| format!("{launcher_file}: {e}"))
                .and_then(|launcher| {
                    qga_install(path, agent_sock, deadline, &launcher, &args[6..])
                }),
            None => Err("qga-install needs AGENT_SOCKET LAUNCHER".into()),
        },
        ("upgrade", Some(launcher_file)) => std::fs::read_to_string(launcher_file)
            .map_err(|e| format!("{launcher_file}: {e}"))
            .and_then(|launcher| upgrade(path, deadline, &launcher, &args[5..])),
        _ => {
            eprintln!(
                "usage: qx-iso-vm-helper ready|upgrade|qga-install SOCKET TIMEOUT_S [..] (see the source)"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("qx-iso-vm-helper: {e}");
        std::process::exit(1);
    }
}

/// A read that ended by its timeout (or a signal) rather than by a failure: try again.
fn read_timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}
