//! Side-by-side benchmark of quantix-kvm-agent and Debian's qemu-guest-agent in one VM.
//!
//! One VM (the bench image from `ci/vm/build-image.sh --bench`) carries both agents, each on
//! its own virtio-serial port; this program speaks both protocols directly over the QEMU
//! chardev sockets (ours: qx_proto frames; qemu-ga: its JSON lines) and measures, in the same
//! run: ping round trip, exec of /bin/true until its exit status is known, 16 MiB file read
//! throughput, agent RSS idle and after the transfer, binary size, and time from launch to
//! the first answer. Our agent also serves qemu-ga's protocol on a fourth port, so the same
//! JSON client measures ping, exec + exec-status and the file read on both agents on the same
//! protocol. It prints a Markdown table (ratios included) on stdout; `ci/bench.sh`
//! writes it into docs/benchmarks.md. Not a test: no pass/fail, only numbers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use qx_e2e::image::target_dir;
use qx_e2e::qemu::{AGENT_PORT, QGA_PORT};
use qx_e2e::wire::AgentConn;
use qx_e2e::{Vm, VmSpec};
use qx_node::agent_api::{WRITE_CHUNK_BYTES, WRITE_WINDOW_CHUNKS};
use qx_proto::agent::{
    envelope::Payload, Envelope, ExecRequest, FileReadRequest, FileWriteChunk, FileWriteClose,
    FileWriteOpen, HostHello,
};
use serde_json::{json, Value};
use sha2::Digest;

const PINGS: usize = 1000;
const EXECS: usize = 50;
const SHELL_SPAWNS: u32 = 20;
const FILE_READS: usize = 3;
const FILE_BYTES: usize = 16 * 1024 * 1024;
/// qemu-ga's guest-file-read count per call (its maximum is 48 MiB; 1 MiB is what
/// management tools typically ask for).
const QGA_READ_COUNT: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(60);
const BIG_FILE: &str = "/tmp/bench-16m";
/// A third port where `cat` echoes bytes back: the transport's own round trip, the floor
/// under both agents' pings, measured in the same run.
const ECHO_PORT: &str = "org.quantix.echo.0";
const ECHO_BYTES: usize = 16;
/// A fourth port where our agent serves qemu-ga's protocol (its qemu-ga front end), so the
/// same client measures both agents on the same protocol while qemu-ga keeps its own port.
const QGA_SAME_PORT: &str = "org.quantix.qga-bench.0";

/// The raw echo on [`ECHO_PORT`]: `ECHO_BYTES` out, the same bytes back.
struct Echo(UnixStream);

impl Echo {
    fn round_trip(&mut self, seq: u8) -> Result<Duration> {
        use std::io::Read;
        let out = [seq; ECHO_BYTES];
        let t = Instant::now();
        self.0.write_all(&out)?;
        let mut back = [0u8; ECHO_BYTES];
        self.0.read_exact(&mut back).context("echo")?;
        let elapsed = t.elapsed();
        if back != out {
            bail!("the echo sent back {back:?} for {out:?}");
        }
        Ok(elapsed)
    }
}

/// qemu-ga's JSON-lines protocol over its chardev socket.
struct Qga {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qga {
    fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    fn send(&mut self, cmd: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(cmd)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    /// The next reply, which must not be an error.
    fn recv(&mut self) -> Result<Value> {
        let v = self.recv_any()?;
        if let Some(err) = v.get("error") {
            bail!("qemu-ga error: {err}");
        }
        Ok(v)
    }

    /// The next JSON reply line (sync delimiters 0xff stripped), error or not.
    fn recv_any(&mut self) -> Result<Value> {
        loop {
            let mut line = Vec::new();
            let n = self.reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                bail!("qemu-ga closed the connection");
            }
            let text: Vec<u8> = line.into_iter().filter(|&b| b != 0xff).collect();
            let text = String::from_utf8_lossy(&text);
            if text.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(text.trim()).context("qemu-ga reply");
        }
    }

    fn call(&mut self, cmd: Value) -> Result<Value> {
        self.send(&cmd)?;
        Ok(self.recv()?.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Skips stale replies: guest-sync-delimited until its id comes back.
    fn sync(&mut self, id: u64) -> Result<()> {
        self.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}))?;
        loop {
            if self.recv_any()?.get("return") == Some(&json!(id)) {
                return Ok(());
            }
        }
    }

    /// Runs a shell script through guest-exec and waits for it to exit 0.
    fn run_sh(&mut self, script: &str) -> Result<()> {
        let pid = self.call(json!({"execute": "guest-exec",
                "arguments": {"path": "/bin/sh", "arg": ["-c", script]}}))?["pid"]
            .as_i64()
            .ok_or_else(|| anyhow!("guest-exec gave no pid"))?;
        loop {
            let st =
                self.call(json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}))?;
            if st["exited"].as_bool() == Some(true) {
                if st["exitcode"].as_i64() != Some(0) {
                    bail!("{script:?}: {st}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn exec_true(&mut self) -> Result<()> {
        let pid = self
            .call(json!({"execute": "guest-exec", "arguments": {"path": "/bin/true"}}))?["pid"]
            .as_i64()
            .ok_or_else(|| anyhow!("guest-exec gave no pid"))?;
        loop {
            let st =
                self.call(json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}))?;
            if st["exited"].as_bool() == Some(true) {
                if st["exitcode"].as_i64() != Some(0) {
                    bail!("/bin/true under qemu-ga: {st}");
                }
                return Ok(());
            }
        }
    }

    fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        let h = self
            .call(json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}}))?
            .as_i64()
            .ok_or_else(|| anyhow!("guest-file-open gave no handle"))?;
        let mut out = Vec::new();
        loop {
            let r = self.call(json!({"execute": "guest-file-read",
                "arguments": {"handle": h, "count": QGA_READ_COUNT}}))?;
            let b64 = r["buf-b64"].as_str().unwrap_or_default();
            out.extend_from_slice(&BASE64.decode(b64).context("qemu-ga's buf-b64")?);
            if r["eof"].as_bool() == Some(true) || r["count"].as_u64() == Some(0) {
                break;
            }
        }
        self.call(json!({"execute": "guest-file-close", "arguments": {"handle": h}}))?;
        Ok(out)
    }

    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        let h = self
            .call(json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}))?
            .as_i64()
            .ok_or_else(|| anyhow!("guest-file-open gave no handle"))?;
        for chunk in data.chunks(QGA_READ_COUNT) {
            self.call(json!({"execute": "guest-file-write",
                "arguments": {"handle": h, "buf-b64": BASE64.encode(chunk)}}))?;
        }
        self.call(json!({"execute": "guest-file-close", "arguments": {"handle": h}}))?;
        Ok(())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn exec_ours(conn: &mut AgentConn, argv: &[&str]) -> Result<qx_proto::agent::ExecExit> {
    let reply = conn.request(
        Payload::ExecRequest(ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        TIMEOUT,
    )?;
    match reply.terminal.and_then(|e| e.payload) {
        Some(Payload::ExecExit(x)) => Ok(x),
        other => bail!("exec {argv:?}: {other:?}"),
    }
}

fn sh_ours(conn: &mut AgentConn, script: &str) -> Result<String> {
    let x = exec_ours(conn, &["/bin/sh", "-c", script])?;
    if !(x.exited && x.exit_code == 0) {
        bail!("{script:?}: {x:?} {}", String::from_utf8_lossy(&x.stderr));
    }
    Ok(String::from_utf8_lossy(&x.stdout).into_owned())
}

/// How a transfer through our agent is checked end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Not at all (the floor).
    None,
    /// The agent's CRC32C of the file's bytes against the bench's: qx-node's default.
    Crc32c,
    /// The agent's SHA-256 against the bench's: qx-node's path before CRC32C.
    Sha256,
}

/// One file read through our agent, checked by `check` (the bench also checks the data
/// against the guest's sha256sum afterwards, as it does for qemu-ga, which checks nothing).
fn read_ours(conn: &mut AgentConn, path: &str, check: Check) -> Result<Vec<u8>> {
    let reply = conn.request(
        Payload::FileReadRequest(FileReadRequest {
            path: path.into(),
            skip_sha256: check != Check::Sha256,
            ..Default::default()
        }),
        TIMEOUT,
    )?;
    let mut out = Vec::with_capacity(FILE_BYTES);
    let mut crc = 0u32;
    for item in reply.items {
        if let Some(Payload::FileChunk(c)) = item.payload {
            if check == Check::Crc32c {
                crc = qx_proto::crc32c_append(crc, &c.data);
            }
            out.extend_from_slice(&c.data);
        }
    }
    match reply.terminal.and_then(|e| e.payload) {
        Some(Payload::FileReadDone(d)) => {
            let ok = match check {
                Check::None => true,
                Check::Crc32c => d.crc32c == crc,
                Check::Sha256 => d.sha256 == sha2::Sha256::digest(&out).as_slice(),
            };
            if !ok {
                bail!("our agent's FileReadDone ({check:?}) differs from the data");
            }
            Ok(out)
        }
        other => bail!("file read: {other:?}"),
    }
}

/// One file written through our agent as qx-node writes it: FileWriteOpen, 48 KiB
/// FileWriteChunks with up to `window` of them unanswered, FileWriteClose with the expected
/// CRC32C or sha256 that `check` asks for (the bench computes it, as qx-node does).
fn write_ours(
    conn: &mut AgentConn,
    path: &str,
    data: &[u8],
    window: usize,
    check: Check,
) -> Result<()> {
    let opened = conn.request(
        Payload::FileWriteOpen(FileWriteOpen {
            path: path.into(),
            mode: 0o644,
            overwrite: true,
            skip_sha256: check != Check::Sha256,
            ..Default::default()
        }),
        TIMEOUT,
    )?;
    let handle = match opened.terminal.and_then(|e| e.payload) {
        Some(Payload::FileWriteOpened(o)) => o.handle,
        other => bail!("file write open: {other:?}"),
    };
    let mut pending = std::collections::VecDeque::new();
    let wait_oldest = |conn: &mut AgentConn, pending: &mut std::collections::VecDeque<u64>| {
        let id = pending
            .pop_front()
            .ok_or_else(|| anyhow!("no chunk in flight"))?;
        loop {
            let env = conn
                .recv_deadline(Instant::now() + TIMEOUT)?
                .ok_or_else(|| anyhow!("no answer to chunk {id}"))?;
            if env.correlation_id != id {
                continue;
            }
            match env.payload {
                Some(Payload::Ack(_)) => {}
                Some(Payload::Done(_)) => return Ok::<_, anyhow::Error>(()),
                other => bail!("file write chunk: {other:?}"),
            }
        }
    };
    for (i, chunk) in data.chunks(WRITE_CHUNK_BYTES).enumerate() {
        if pending.len() == window {
            wait_oldest(conn, &mut pending)?;
        }
        let id = conn.fresh_id();
        conn.send(&Envelope {
            id,
            correlation_id: 0,
            payload: Some(Payload::FileWriteChunk(FileWriteChunk {
                handle,
                offset: (i * WRITE_CHUNK_BYTES) as u64,
                data: chunk.to_vec(),
            })),
        })?;
        pending.push_back(id);
    }
    while !pending.is_empty() {
        wait_oldest(conn, &mut pending)?;
    }
    let closed = conn.request(
        Payload::FileWriteClose(FileWriteClose {
            handle,
            commit: true,
            expected_sha256: match check {
                Check::Sha256 => sha2::Sha256::digest(data).to_vec(),
                _ => Vec::new(),
            },
            expected_crc32c: (check == Check::Crc32c).then(|| qx_proto::crc32c(data)),
        }),
        TIMEOUT,
    )?;
    match closed.terminal.and_then(|e| e.payload) {
        Some(Payload::FileWriteDone(d)) if d.committed => Ok(()),
        other => bail!("file write close: {other:?}"),
    }
}

/// Resident memory of process `pid` (a number, or a shell expression giving exactly one), from
/// `smaps_rollup`, which walks the page tables. (`VmRSS` in `status` gave 4 KiB for our idle
/// agent in two runs on this 6.1 guest kernel, whose per-thread RSS counters reach the
/// process's total in batches.)
fn rss_kib(conn: &mut AgentConn, pid: &str) -> Result<u64> {
    let out = sh_ours(conn, &format!("grep '^Rss:' /proc/{pid}/smaps_rollup"))?;
    // "Rss:                 760 kB"
    match out.split_whitespace().collect::<Vec<_>>()[..] {
        ["Rss:", kib, "kB"] => match kib.parse() {
            Ok(kib) if kib > 0 => Ok(kib),
            _ => bail!("Rss of {pid}: {out:?}"),
        },
        _ => bail!("Rss of {pid}: {out:?}"),
    }
}

fn file_size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .len())
}

/// qemu-ga's binary plus every shared library it loads, as copied into the image.
fn qga_size() -> Result<(u64, u64)> {
    let bin = PathBuf::from("/usr/sbin/qemu-ga");
    let own = file_size(&bin)?;
    let out = std::process::Command::new("ldd").arg(&bin).output()?;
    let mut total = own;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split("=>")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .or_else(|| {
                line.split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/'))
            });
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            total += std::fs::metadata(std::fs::canonicalize(p)?)?.len();
        }
    }
    Ok((own, total))
}

struct Row {
    what: &'static str,
    ours: f64,
    qga: f64,
    unit: &'static str,
    /// true: smaller is better (the ratio is qga/ours); false: larger is better.
    lower_better: bool,
    target: &'static str,
}

fn main() -> Result<()> {
    let mut spec = VmSpec::new("bench");
    spec.bench_image = true;
    spec.memory_mib = 512;
    spec.ports = vec![
        AGENT_PORT.into(),
        QGA_PORT.into(),
        ECHO_PORT.into(),
        QGA_SAME_PORT.into(),
    ];
    spec.cmdline = vec!["qx.agent=0".into(), "qx.qga=once".into()];
    let mut vm = Vm::start(spec)?;
    eprintln!("bench: VM booting (qemu pid {})", vm.pid());
    if !vm.wait_console("qx-init: up", TIMEOUT)? {
        vm.keep_log();
        bail!("the bench VM did not come up");
    }

    // qemu-ga is up (started by init); our agent is not yet.
    let mut qga = Qga::connect(&vm.port_socket(QGA_PORT))?;
    qga.sync(1).context("qemu-ga at boot")?;

    // --- time from launch to first answer: ours, launched by qemu-ga ---------------------
    let mut ours = AgentConn::connect(&vm.agent_socket(), TIMEOUT)?;
    ours.write_raw(&vec![0u8; qx_e2e::wire::SYNC_PREAMBLE_BYTES])?;
    let hello_id = ours.fresh_id();
    ours.send(&Envelope {
        id: hello_id,
        correlation_id: 0,
        payload: Some(Payload::HostHello(HostHello {
            protocol_version: qx_proto::PROTOCOL_VERSION,
            host_version: "qx-bench".into(),
            host_session_id: 1,
            max_frame_bytes: qx_proto::DEFAULT_MAX_FRAME_BYTES,
        })),
    })?;
    // Every port under its /dev/virtio-ports name (init only waited for the ones it needed).
    qga.run_sh(
        "mkdir -p /dev/virtio-ports; for p in /sys/class/virtio-ports/vport*; do \
         ln -sf /dev/${p##*/} /dev/virtio-ports/$(cat $p/name); done",
    )
    .context("qemu-ga's guest-exec of the port links")?;
    let t0 = Instant::now();
    let launched = qga
        .call(
            json!({"execute": "guest-exec", "arguments": {"path": "/bin/quantix-kvm-agent",
        "arg": ["--set", format!("qga_device=/dev/virtio-ports/{QGA_SAME_PORT}")]}}),
        )
        .context("qemu-ga's guest-exec of our agent")?;
    // Our agent's RSS is read by this pid.
    let ours_pid = launched["pid"]
        .as_i64()
        .ok_or_else(|| anyhow!("guest-exec of our agent gave no pid: {launched}"))?
        .to_string();
    loop {
        let env = ours
            .recv_deadline(Instant::now() + TIMEOUT)?
            .ok_or_else(|| anyhow!("our agent never answered"))?;
        if matches!(env.payload, Some(Payload::AgentReady(_))) {
            break;
        }
    }
    let ours_first = t0.elapsed();
    // A proper handshake on top, so the session is settled before measuring.
    ours.handshake(TIMEOUT)
        .context("our agent, launched by qemu-ga")?;

    // --- and qemu-ga, relaunched by ours ------------------------------------------------------
    sh_ours(
        &mut ours,
        "kill $(pidof qemu-ga); while pidof qemu-ga >/dev/null; do sleep 0.01; done",
    )?;
    // The host stays connected; what it sends now waits in the port for the next opener.
    qga.send(&json!({"execute": "guest-ping"}))?;
    let t0 = Instant::now();
    sh_ours(
        &mut ours,
        "setsid /usr/bin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run </dev/null >/dev/null 2>&1 &",
    )?;
    qga.recv()
        .context("qemu-ga's first answer after its relaunch")?;
    let qga_first = t0.elapsed();
    qga.sync(2).context("qemu-ga, relaunched by our agent")?;

    // Our agent's qemu-ga front end, on its own port.
    let mut same = Qga::connect(&vm.port_socket(QGA_SAME_PORT))?;
    same.sync(1).context("our agent's qemu-ga front end")?;

    // Let both settle before the idle RSS.
    std::thread::sleep(Duration::from_secs(1));
    let ours_rss_idle = rss_kib(&mut ours, &ours_pid)?;
    let status = sh_ours(
        &mut ours,
        &format!("grep '^VmRSS:' /proc/{ours_pid}/status"),
    )?;
    eprintln!(
        "bench: our agent idle: smaps_rollup Rss {ours_rss_idle} kB; status {}",
        status.trim()
    );
    let qga_rss_idle = rss_kib(&mut ours, "$(pidof qemu-ga)")?;

    // --- ping, and the raw echo under both ------------------------------------------------------
    let mut echo = Echo(UnixStream::connect(vm.port_socket(ECHO_PORT))?);
    echo.0.set_read_timeout(Some(TIMEOUT))?;
    sh_ours(
        &mut ours,
        &format!(
            "setsid sh -c 'exec cat 0<>/dev/virtio-ports/{ECHO_PORT} 1>&0' </dev/null >/dev/null 2>&1 &"
        ),
    )?;
    echo.round_trip(0)?;
    let mut ours_ping = Vec::with_capacity(PINGS);
    let mut qga_ping = Vec::with_capacity(PINGS);
    let mut echo_ping = Vec::with_capacity(PINGS);
    let mut same_ping = Vec::with_capacity(PINGS);
    for i in 0..PINGS {
        ours_ping.push(ours.ping(i as u64 + 1, TIMEOUT)?);
        let t = Instant::now();
        qga.call(json!({"execute": "guest-ping"}))?;
        qga_ping.push(t.elapsed());
        let t = Instant::now();
        same.call(json!({"execute": "guest-ping"}))?;
        same_ping.push(t.elapsed());
        echo_ping.push(echo.round_trip(i as u8)?);
    }
    ours_ping.sort();
    qga_ping.sort();
    same_ping.sort();
    echo_ping.sort();
    // The echo only serves the pings: with its port held open, file reads on the agent's
    // port measured ~25% slower for both agents.
    sh_ours(&mut ours, "kill $(pidof cat)")?;
    drop(echo);

    // --- exec /bin/true until the exit status is known -----------------------------------------
    let mut ours_exec = Vec::with_capacity(EXECS);
    // The agent's own account of each run: from its spawn call to the child reaped.
    let mut ours_child = Vec::with_capacity(EXECS);
    let mut qga_exec = Vec::with_capacity(EXECS);
    let mut same_exec = Vec::with_capacity(EXECS);
    for _ in 0..EXECS {
        let t = Instant::now();
        same.exec_true()?;
        same_exec.push(t.elapsed());
        let t = Instant::now();
        let x = exec_ours(&mut ours, &["/bin/true"])?;
        if !(x.exited && x.exit_code == 0) {
            bail!("/bin/true under our agent: {x:?}");
        }
        ours_exec.push(t.elapsed());
        ours_child.push(Duration::from_micros(x.duration_us));
        let t = Instant::now();
        qga.exec_true()?;
        qga_exec.push(t.elapsed());
    }
    ours_exec.sort();
    ours_child.sort();
    // The guest's own cost of starting /bin/true and waiting for it, with no agent: busybox
    // sh forks and execs it in a loop (a path, so never as a builtin); the agent only reports
    // how long the whole loop took.
    let mut shell_spawn = Vec::new();
    for _ in 0..5 {
        let x = exec_ours(
            &mut ours,
            &[
                "/bin/sh",
                "-c",
                &format!("for i in $(seq {SHELL_SPAWNS}); do /bin/true; done"),
            ],
        )?;
        shell_spawn.push(Duration::from_micros(x.duration_us) / SHELL_SPAWNS);
    }
    shell_spawn.sort();
    qga_exec.sort();
    same_exec.sort();

    // --- 16 MiB file read -------------------------------------------------------------------------
    let sum = sh_ours(
        &mut ours,
        &format!("dd if=/dev/urandom of={BIG_FILE} bs=1048576 count=16 2>/dev/null && sha256sum {BIG_FILE}"),
    )?;
    let want = sum
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let hex = |d: &[u8]| -> String {
        sha2::Sha256::digest(d)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let mut ours_read = Vec::new();
    let mut ours_read_crc = Vec::new();
    let mut ours_read_sha = Vec::new();
    let mut qga_read = Vec::new();
    let mut same_read = Vec::new();
    for _ in 0..FILE_READS {
        let t = Instant::now();
        let d = same.read_file(BIG_FILE)?;
        same_read.push(t.elapsed());
        if hex(&d) != want {
            bail!("our agent's qemu-ga read differs from the file");
        }
        for (check, times) in [
            (Check::None, &mut ours_read),
            (Check::Crc32c, &mut ours_read_crc),
            (Check::Sha256, &mut ours_read_sha),
        ] {
            let t = Instant::now();
            let d = read_ours(&mut ours, BIG_FILE, check)?;
            times.push(t.elapsed());
            if hex(&d) != want {
                bail!("our agent's read differs from the file");
            }
        }
        let t = Instant::now();
        let d = qga.read_file(BIG_FILE)?;
        qga_read.push(t.elapsed());
        if hex(&d) != want {
            bail!("qemu-ga's read differs from the file");
        }
    }
    ours_read.sort();
    ours_read_crc.sort();
    ours_read_sha.sort();
    qga_read.sort();
    same_read.sort();
    let mib_s = |d: Duration| FILE_BYTES as f64 / (1024.0 * 1024.0) / d.as_secs_f64();

    let ours_rss_after = rss_kib(&mut ours, &ours_pid)?;
    let qga_rss_after = rss_kib(&mut ours, "$(pidof qemu-ga)")?;

    // --- 16 MiB file write ------------------------------------------------------------------------
    sh_ours(&mut ours, &format!("rm -f {BIG_FILE}"))?;
    let upload: Vec<u8> = (0..FILE_BYTES as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let upload_sha = hex(&upload);
    let check_upload = |ours: &mut AgentConn, who: &str| -> Result<()> {
        let sum = sh_ours(ours, &format!("sha256sum {BIG_FILE}; rm -f {BIG_FILE}"))?;
        if !sum.starts_with(&upload_sha) {
            bail!("the file {who} wrote differs from what was sent");
        }
        Ok(())
    };
    let mut ours_write = Vec::new();
    let mut ours_write_crc = Vec::new();
    let mut ours_write_sha = Vec::new();
    let mut ours_write_one = Vec::new();
    let mut qga_write = Vec::new();
    for _ in 0..FILE_READS {
        for (window, check, times) in [
            (WRITE_WINDOW_CHUNKS, Check::None, &mut ours_write),
            (WRITE_WINDOW_CHUNKS, Check::Crc32c, &mut ours_write_crc),
            (WRITE_WINDOW_CHUNKS, Check::Sha256, &mut ours_write_sha),
            (1, Check::Crc32c, &mut ours_write_one),
        ] {
            let t = Instant::now();
            write_ours(&mut ours, BIG_FILE, &upload, window, check)?;
            times.push(t.elapsed());
            check_upload(&mut ours, "our agent")?;
        }
        let t = Instant::now();
        qga.write_file(BIG_FILE, &upload)?;
        qga_write.push(t.elapsed());
        check_upload(&mut ours, "qemu-ga")?;
    }
    ours_write.sort();
    ours_write_crc.sort();
    ours_write_sha.sort();
    ours_write_one.sort();
    qga_write.sort();

    // What the guest's clock costs: under TCG without a TSC it trusts, every clock read
    // is a system call reading a timer device.
    let clock = sh_ours(
        &mut ours,
        "cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
    )
    .unwrap_or_default();
    eprintln!("bench: guest clocksource {}", clock.trim());

    let ours_bin =
        file_size(&target_dir().join("x86_64-unknown-linux-musl/release/quantix-kvm-agent"))?;
    let (qga_bin, qga_total) = qga_size()?;

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let rows = [
        Row {
            what: "qemu-ga protocol: guest-ping, p50",
            ours: us(percentile(&same_ping, 0.5)),
            qga: us(percentile(&qga_ping, 0.5)),
            unit: "µs",
            lower_better: true,
            target: "≥ 2x",
        },
        Row {
            what: "qemu-ga protocol: guest-ping, p99",
            ours: us(percentile(&same_ping, 0.99)),
            qga: us(percentile(&qga_ping, 0.99)),
            unit: "µs",
            lower_better: true,
            target: "≥ 2x",
        },
        Row {
            what: "qemu-ga protocol: guest-exec + guest-exec-status of /bin/true, p50",
            ours: ms(percentile(&same_exec, 0.5)),
            qga: ms(percentile(&qga_exec, 0.5)),
            unit: "ms",
            lower_better: true,
            target: "≥ 2x",
        },
        Row {
            what: "qemu-ga protocol: 16 MiB guest-file-read in 1 MiB counts (median of 3)",
            ours: mib_s(percentile(&same_read, 0.5)),
            qga: mib_s(percentile(&qga_read, 0.5)),
            unit: "MiB/s",
            lower_better: false,
            target: "≥ 2x",
        },
        Row {
            what: "ping round trip, p50",
            ours: us(percentile(&ours_ping, 0.5)),
            qga: us(percentile(&qga_ping, 0.5)),
            unit: "µs",
            lower_better: true,
            target: "≥ 3x",
        },
        Row {
            what: "ping round trip, p99",
            ours: us(percentile(&ours_ping, 0.99)),
            qga: us(percentile(&qga_ping, 0.99)),
            unit: "µs",
            lower_better: true,
            target: "≥ 3x",
        },
        Row {
            what: "exec /bin/true to exit status, p50",
            ours: ms(percentile(&ours_exec, 0.5)),
            qga: ms(percentile(&qga_exec, 0.5)),
            unit: "ms",
            lower_better: true,
            target: "≥ 3x",
        },
        Row {
            what: "exec /bin/true to exit status, p99",
            ours: ms(percentile(&ours_exec, 0.99)),
            qga: ms(percentile(&qga_exec, 0.99)),
            unit: "ms",
            lower_better: true,
            target: "",
        },
        Row {
            what: "16 MiB file read, checked by CRC32C: qx-node's path (median of 3)",
            ours: mib_s(percentile(&ours_read_crc, 0.5)),
            qga: mib_s(percentile(&qga_read, 0.5)),
            unit: "MiB/s",
            lower_better: false,
            target: "≥ 4x",
        },
        Row {
            what: "16 MiB file read, unchecked (median of 3)",
            ours: mib_s(percentile(&ours_read, 0.5)),
            qga: mib_s(percentile(&qga_read, 0.5)),
            unit: "MiB/s",
            lower_better: false,
            target: "",
        },
        Row {
            what: "16 MiB file read, checked by the agent's sha256 (median of 3)",
            ours: mib_s(percentile(&ours_read_sha, 0.5)),
            qga: mib_s(percentile(&qga_read, 0.5)),
            unit: "MiB/s",
            lower_better: false,
            target: "",
        },
        Row {
            what: "16 MiB file write, checked by CRC32C: qx-node's path (median of 3)",
            ours: mib_s(percentile(&ours_write_crc, 0.5)),
            qga: mib_s(percentile(&qga_write, 0.5)),
            unit: "MiB/s",
            lower_better: false,
            target: "≥ 6x",
        },
        Row {
            what: "16 MiB file write, unchecked (median of 3)",
            ours: mib_s(percentile(&ours_write, 0.5)),
            qga: mib_s(percentile(&qga_write, 0.5)),
            unit: "MiB/s",
            lower_better: false,
            target: "",
        },
        Row {
            what: "16 MiB file write, checked by the agent's sha256 (median of 3)",
            ours: mib_s(percentile(&ours_write_sha, 0.5)),
            qga: mib_s(percentile(&qga_write, 0.5)),
            unit: "MiB/s",
            lower_better: false,
            target: "",
        },
        Row {
            what: "16 MiB file write, CRC32C, one chunk in flight at a time (median of 3)",
            ours: mib_s(percentile(&ours_write_one, 0.5)),
            qga: mib_s(percentile(&qga_write, 0.5)),
            unit: "MiB/s",
            lower_better: false,
            target: "",
        },
        Row {
            what: "RSS idle",
            ours: ours_rss_idle as f64 / 1024.0,
            qga: qga_rss_idle as f64 / 1024.0,
            unit: "MiB",
            lower_better: true,
            target: "≥ 4x",
        },
        Row {
            what: "RSS after the file reads",
            ours: ours_rss_after as f64 / 1024.0,
            qga: qga_rss_after as f64 / 1024.0,
            unit: "MiB",
            lower_better: true,
            target: "≥ 4x",
        },
        Row {
            what: "binary (qemu-ga: with its shared libraries)",
            ours: ours_bin as f64 / 1e6,
            qga: qga_total as f64 / 1e6,
            unit: "MB",
            lower_better: true,
            target: "≥ 10x",
        },
        Row {
            what: "binary alone",
            ours: ours_bin as f64 / 1e6,
            qga: qga_bin as f64 / 1e6,
            unit: "MB",
            lower_better: true,
            target: "",
        },
        Row {
            what: "launch to first answer",
            ours: ms(ours_first),
            qga: ms(qga_first),
            unit: "ms",
            lower_better: true,
            target: "",
        },
    ];

    println!("| measure | quantix-kvm-agent | qemu-ga | ratio (ours is N× better) | target |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for r in &rows {
        let ratio = if r.lower_better {
            r.qga / r.ours
        } else {
            r.ours / r.qga
        };
        let prec = if r.ours < 10.0 || r.qga < 10.0 { 2 } else { 0 };
        println!(
            "| {} | {:.p$} {} | {:.p$} {} | {:.1}x | {} |",
            r.what,
            r.ours,
            r.unit,
            r.qga,
            r.unit,
            ratio,
            r.target,
            p = prec
        );
    }
    println!();
    let (floor, ours_p50, qga_p50) = (
        us(percentile(&echo_ping, 0.5)),
        us(percentile(&ours_ping, 0.5)),
        us(percentile(&qga_ping, 0.5)),
    );
    println!(
        "Transport floor in the same run: `cat` echoing {ECHO_BYTES} bytes on a third port, \
         interleaved with the pings, p50 {floor:.0} µs, p99 {:.0} µs. Above that floor a ping \
         costs ours {:.0} µs and qemu-ga {:.0} µs ({:.1}x).",
        us(percentile(&echo_ping, 0.99)),
        ours_p50 - floor,
        qga_p50 - floor,
        (qga_p50 - floor) / (ours_p50 - floor)
    );
    println!(
        "Of our exec's p50 {:.2} ms, the child's own life in the guest (the agent's spawn call to \
         the child reaped, as the agent reports it in `ExecExit.duration_us`) is p50 {:.2} ms; \
         the rest is the request and the reply crossing the port. For scale, the guest's \
         busybox sh needs {:.2} ms to fork, exec and reap one `/bin/true` (median of 5 loops of \
         {SHELL_SPAWNS}).",
        ms(percentile(&ours_exec, 0.5)),
        ms(percentile(&ours_child, 0.5)),
        ms(percentile(&shell_spawn, 0.5)),
    );
    println!();
    let share = |checked: &[Duration], unchecked: &[Duration]| {
        100.0 * percentile(unchecked, 0.5).as_secs_f64() / percentile(checked, 0.5).as_secs_f64()
    };
    println!(
        "End-to-end checks, as a share of the unchecked transfer's speed in this run: reads \
         {:.0}% by CRC32C and {:.0}% by the agent's sha256; writes {:.0}% by CRC32C and {:.0}% by \
         sha256 (target for CRC32C: at least 90%).",
        share(&ours_read_crc, &ours_read),
        share(&ours_read_sha, &ours_read),
        share(&ours_write_crc, &ours_write),
        share(&ours_write_sha, &ours_write),
    );
    println!();
    println!(
        "Samples: {PINGS} pings and {EXECS} execs per agent, interleaved; {FILE_READS} reads of a 16 MiB \
         random file per agent (ours: {FILE_READS} each unchecked, by CRC32C and by the agent's \
         sha256) and {FILE_READS} writes of 16 MiB per agent (ours: {FILE_READS} each unchecked, \
         by CRC32C, by sha256, and by CRC32C with one chunk in flight), each checked against the \
         guest's sha256sum. Guest kernel {}, accel {}, 1 vCPU, {} MiB.",
        vm.image.kernel_release,
        if qx_e2e::qemu::kvm_usable() { "kvm" } else { "tcg" },
        vm.spec.memory_mib
    );

    // Power the VM off through our agent: QEMU exits by itself.
    let _ = ours.request(
        Payload::PowerRequest(qx_proto::agent::PowerRequest {
            action: qx_proto::agent::PowerAction::Shutdown as i32,
            delay_ms: 0,
        }),
        TIMEOUT,
    );
    let _ = vm.wait_exit(Duration::from_secs(30));
    Ok(())
}
