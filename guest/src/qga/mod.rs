//! The qemu-ga front end: qemu-guest-agent's JSON protocol on `org.qemu.guest_agent.0`.
//!
//! Primer (docs/qemu-ga.md has the whole story): the host writes JSON objects with no
//! framing; a request runs when its closing `}` arrives, 0xFF resets the stream. Each request
//! gets exactly one `\n`-terminated ASCII reply line, in request order (`guest-shutdown`
//! answers nothing on success). `guest-sync-delimited` puts a 0xFF before its line so a
//! client can skip whatever an earlier client left in the port.
//!
//! Layers: [`json`] (stream splitter, parser, encoder), [`request`] (members, arguments,
//! reply lines), [`base64`] and [`outbox`] are sans-io. [`QgaPort`] holds the port's state;
//! the `impl Agent` blocks here and in `commands.rs` drive it from the event loop and call
//! the same operations the native protocol calls.

pub mod base64;
mod commands;
pub mod conf;
pub mod json;
pub mod outbox;
pub mod request;

use std::path::PathBuf;
use std::time::Instant;

use mio::Token;
use qx_proto::agent::ExecExit;

use crate::config::Config;
use crate::event_loop::Agent;
use crate::exec::Finished;
use crate::transport::{Endpoint, Transport};
use json::{Split, Splitter, Value};
use outbox::LineOutbox;
use request::{QgaError, QgaResult};

/// The qemu-ga port's virtio-serial name.
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// The qemu-ga port's poll token.
pub const QGA: Token = Token(2);
/// Child job ids of this front end have this bit set (native request ids never do in
/// practice: qx-node counts from 1).
pub const QGA_JOB_BIT: u64 = 1 << 63;
/// Bytes asked of one read() on the port.
const READ_BYTES: usize = 4096;
/// Finished exec records kept per allowed concurrent exec before the oldest is dropped.
const EXEC_RECORDS_PER_SLOT: usize = 4;
/// qemu-ga's first `guest-file-open` handle.
const FIRST_FILE_HANDLE: i64 = 1000;

/// Whether a child job belongs to this front end.
pub fn is_qga_job(id: u64) -> bool {
    id & QGA_JOB_BIT != 0
}

/// A request whose reply waits for a child.
#[derive(Debug)]
enum Waiting {
    /// `guest-set-user-password`: chpasswd runs as job `job`.
    Password { job: u64, id: Option<Value> },
    /// A freeze whose `fsfreeze-hook freeze` runs as job `job`.
    FreezeHook {
        job: u64,
        id: Option<Value>,
        mountpoints: Vec<String>,
    },
    /// A call on the filesystem worker; its finish sends the reply.
    Worker,
    /// `guest-exec` started child `job` (`pid`): the reply waits until the child ends or
    /// `until`, whichever is first (`qga_exec_reply_wait_ms`).
    ExecStart {
        job: u64,
        pid: u32,
        id: Option<Value>,
        until: Instant,
    },
}

/// A `guest-exec` child and, once it ended, its exit.
#[derive(Debug)]
struct ExecRecord {
    pid: u32,
    job: u64,
    /// Whether stdout and stderr are captured.
    capture: [bool; 2],
    exit: Option<ExecExit>,
}

/// The qemu-ga policy: `--block-rpcs`, `--allow-rpcs`, the freeze hook.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QgaPolicy {
    pub block: Vec<String>,
    pub allow: Vec<String>,
    pub fsfreeze_hook: Option<PathBuf>,
}

impl QgaPolicy {
    /// Whether `name` may run (the frozen allow-list is checked separately).
    pub fn enabled(&self, name: &str) -> bool {
        !self.block.iter().any(|b| b == name)
            && (self.allow.is_empty() || self.allow.iter().any(|a| a == name))
    }
}

/// The qemu-ga port's state.
#[derive(Debug)]
pub struct QgaPort {
    transport: Transport,
    splitter: Splitter,
    outbox: LineOutbox,
    /// The read buffer (sized at the first read, then kept): `inbuf[inpos..inlen]` are bytes
    /// read and not yet given to the splitter.
    inbuf: Vec<u8>,
    inpos: usize,
    inlen: usize,
    /// An edge said readable and the port was not yet read to `WouldBlock`.
    ready: bool,
    host_present: bool,
    waiting: Option<Waiting>,
    policy: QgaPolicy,
    next_job: u64,
    execs: Vec<ExecRecord>,
    files: Vec<(i64, std::fs::File)>,
    next_handle: i64,
    /// While the port does not exist (a VM without a qemu-ga channel, the normal case for
    /// many), when to look again; nothing is logged for it.
    look_again_at: Option<Instant>,
}

impl QgaPort {
    /// The front end `cfg` asks for, if any.
    pub fn from_config(cfg: &Config) -> Option<QgaPort> {
        let endpoint = match (&cfg.qga_connect, &cfg.qga_device) {
            (Some(sock), _) => Endpoint::Unix(sock.clone()),
            (None, Some(dev)) => Endpoint::Device {
                path: dev.clone(),
                explicit: dev != std::path::Path::new(crate::config::DEFAULT_QGA_DEVICE),
                name: QGA_PORT_NAME,
            },
            (None, None) => return None,
        };
        Some(QgaPort {
            transport: Transport::new(endpoint),
            splitter: Splitter::new(),
            outbox: LineOutbox::new(),
            inbuf: Vec::new(),
            inpos: 0,
            inlen: 0,
            ready: false,
            host_present: false,
            waiting: None,
            policy: cfg.qga_policy(),
            next_job: 1,
            execs: Vec::new(),
            files: Vec::new(),
            next_handle: FIRST_FILE_HANDLE,
            look_again_at: None,
        })
    }

    /// A configuration reload: new policy; the port itself changes at the next start.
    pub fn set_policy(&mut self, policy: QgaPolicy) {
        self.policy = policy;
    }

    pub fn on_event(&mut self) {
        self.ready = true;
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        if let Some(Waiting::ExecStart { until, .. }) = &self.waiting {
            return Some(*until);
        }
        if self.transport.is_open() {
            return None;
        }
        self.transport.next_deadline().max(self.look_again_at)
    }

    /// Whether the port exists (a socket is always worth a connect).
    fn port_exists(&self) -> bool {
        match self.transport.endpoint() {
            Endpoint::Device {
                path,
                explicit,
                name,
            } => path.exists() || (!explicit && crate::transport::find_vport(name).is_some()),
            Endpoint::Unix(_) => true,
        }
    }

    /// Opens the port when it exists and the retry is due; true when it just opened.
    fn open(&mut self, registry: &mio::Registry, now: Instant) -> bool {
        if self.transport.is_open() || self.look_again_at.is_some_and(|t| now < t) {
            return false;
        }
        if !self.port_exists() {
            self.look_again_at = Some(now + crate::transport::PORT_RETRY);
            return false;
        }
        self.look_again_at = None;
        self.transport.try_open(registry, QGA, now)
    }

    fn job_id(&mut self) -> u64 {
        let id = QGA_JOB_BIT | self.next_job;
        self.next_job = (self.next_job + 1) & !QGA_JOB_BIT;
        id
    }

    /// The host went away (its socket closed, or the port failed): a partial request never
    /// runs, unsent replies are dropped.
    fn host_gone(&mut self) {
        self.port_eof();
        self.outbox.clear();
    }

    /// The port read end of file: its kernel knows of no host now. A partial request never
    /// runs, but unsent replies stay queued for when a host is there. The guest can read a new
    /// host's first request before its kernel learns that the host connected, so this end of
    /// file may come right after a request whose host is still waiting for the reply; a host
    /// that did leave is followed by one that syncs first and skips what it did not ask for.
    fn port_eof(&mut self) {
        if self.splitter.mid_value() || self.inpos < self.inlen {
            log::debug!("qemu-ga host left mid-request; dropping the partial request");
        }
        self.splitter.reset();
        self.inpos = 0;
        self.inlen = 0;
        self.host_present = false;
        self.ready = false;
    }

    /// Queues a reply line (0xFF-prefixed when `delimited`); an oversized one becomes an error.
    fn push_reply(&mut self, id: Option<&Value>, result: QgaResult<Value>, delimited: bool) {
        let prefix: &[u8] = if delimited { &[0xFF] } else { &[] };
        let pushed = self
            .outbox
            .push_with(|out| request::write_reply_line(out, prefix, id, result));
        if let Err(e) = pushed {
            let err = Err(QgaError::generic(e.to_string()));
            let pushed = self
                .outbox
                .push_with(|out| request::write_reply_line(out, b"", id, err));
            if let Err(e) = pushed {
                log::error!("qemu-ga reply dropped: {e}");
            }
        }
    }

    /// Sends the `guest-exec` reply that waits, if any, once its child ended or at its time.
    /// Any other wait is left alone.
    fn exec_started(&mut self, now: Instant) {
        let due = match &self.waiting {
            Some(Waiting::ExecStart { job, until, .. }) => {
                now >= *until || self.execs.iter().any(|r| r.job == *job && r.exit.is_some())
            }
            _ => false,
        };
        if !due {
            return;
        }
        if let Some(Waiting::ExecStart { pid, id, .. }) = self.waiting.take() {
            let reply = json::obj([("pid", Value::Int(pid.into()))]);
            self.push_reply(id.as_ref(), Ok(reply), false);
        }
    }

    /// The next request boundary among the bytes already read.
    fn next_split(&mut self) -> Option<Split> {
        while self.inpos < self.inlen {
            let (n, found) = self.splitter.push(&self.inbuf[self.inpos..self.inlen]);
            self.inpos += n;
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

impl Agent {
    /// One turn of the qemu-ga port: open it when due, flush, take requests while the outbox
    /// has room and no reply is outstanding, read more. True when it can progress at once.
    pub(crate) fn service_qga(&mut self, now: Instant) -> bool {
        let Some(q) = self.qga.as_mut() else {
            return false;
        };
        if q.open(self.poll.registry(), now) {
            q.ready = true;
            q.host_present = q.transport.is_socket();
        }
        q.exec_started(now);
        loop {
            let Some(q) = self.qga.as_mut() else {
                return false;
            };
            if q.host_present && !q.outbox.is_empty() {
                if let Err(e) = q.outbox.flush(&mut q.transport) {
                    log::warn!("qemu-ga port write failed: {e}; reopening it");
                    q.host_gone();
                    q.transport.reset(self.poll.registry(), now);
                    return false;
                }
            }
            if q.waiting.is_some() || !q.outbox.has_room() {
                break;
            }
            if let Some(split) = q.next_split() {
                self.qga_handle(split, now);
                continue;
            }
            if !q.ready || !q.transport.is_open() {
                break;
            }
            // Zeroed once; later reads overwrite it.
            q.inbuf.resize(READ_BYTES, 0);
            q.inpos = 0;
            q.inlen = 0;
            match q.transport.read(&mut q.inbuf) {
                Ok(0) => {
                    if q.transport.is_socket() {
                        q.host_gone();
                    } else {
                        q.port_eof();
                    }
                    q.transport.host_gone(self.poll.registry(), now);
                }
                Ok(n) => {
                    q.inlen = n;
                    q.host_present = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    q.ready = false;
                    q.host_present = true;
                }
                Err(e) => {
                    log::warn!("qemu-ga port read failed: {e}; reopening it");
                    q.host_gone();
                    q.transport.reset(self.poll.registry(), now);
                }
            }
        }
        let Some(q) = self.qga.as_mut() else {
            return false;
        };
        let want_write = !q.host_present || !q.outbox.is_empty();
        q.transport
            .set_interest(self.poll.registry(), QGA, want_write);
        q.ready && q.waiting.is_none() && q.outbox.has_room() && q.transport.is_open()
    }

    fn qga_handle(&mut self, split: Split, now: Instant) {
        let parsed = match split {
            Split::Error(e) => Err((QgaError::generic(e.to_string()), None)),
            Split::Value(bytes) => {
                let parsed = json::parse(&bytes)
                    .map_err(|e| (QgaError::generic(e.to_string()), None))
                    .and_then(request::request);
                if let Some(q) = self.qga.as_mut() {
                    q.splitter.recycle(bytes);
                }
                parsed
            }
        };
        let req = match parsed {
            Ok(req) => req,
            Err((e, id)) => {
                if let Some(q) = self.qga.as_mut() {
                    q.push_reply(id.as_ref(), Err(e), false);
                }
                return;
            }
        };
        log::debug!("qemu-ga request {}", req.execute);
        let delimited = req.execute == "guest-sync-delimited";
        let id = req.id.clone();
        match self.qga_execute(req, now) {
            commands::Outcome::Reply(result) => {
                let delimited = delimited && result.is_ok();
                if let Some(q) = self.qga.as_mut() {
                    q.push_reply(id.as_ref(), result, delimited);
                }
            }
            commands::Outcome::NoReply | commands::Outcome::Pending => {}
        }
    }

    /// Sends the reply of the request that waited for a child.
    fn qga_finish(&mut self, id: Option<Value>, result: QgaResult<Value>) {
        if let Some(q) = self.qga.as_mut() {
            q.waiting = None;
            q.push_reply(id.as_ref(), result, false);
        }
    }

    /// A child of this front end ended (the loop's `child_finished` hands it over).
    pub(crate) fn qga_child_finished(&mut self, f: Finished, now: Instant) {
        let Some(q) = self.qga.as_mut() else {
            return;
        };
        if let Some(rec) = q.execs.iter_mut().find(|r| r.job == f.id) {
            rec.exit = Some(f.exit);
            if matches!(q.waiting, Some(Waiting::ExecStart { job, .. }) if job == f.id) {
                q.exec_started(now);
            }
            return;
        }
        let ok = f.exit.exited && f.exit.exit_code == 0;
        let why = || {
            let err = String::from_utf8_lossy(&f.exit.stderr).trim().to_string();
            if f.exit.exited {
                format!("exit code {}: {err}", f.exit.exit_code)
            } else {
                format!("signal {}: {err}", f.exit.signal)
            }
        };
        match q.waiting.take() {
            Some(Waiting::Password { job, id }) if job == f.id => {
                let result = if ok {
                    Ok(Value::Object(Vec::new()))
                } else {
                    Err(QgaError::generic(format!("chpasswd failed ({})", why())))
                };
                self.qga_finish(id, result);
            }
            Some(Waiting::FreezeHook {
                job,
                id,
                mountpoints,
            }) if job == f.id => {
                if ok {
                    self.qga_start_freeze(id, mountpoints, now);
                } else {
                    let e = QgaError::generic(format!("the fsfreeze hook failed ({})", why()));
                    self.qga_finish(id, Err(e));
                }
            }
            other => {
                q.waiting = other;
                log::debug!("qemu-ga child {:x} ended with nobody waiting", f.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn port() -> QgaPort {
        let cfg = Config {
            qga_device: Some(PathBuf::from("/nonexistent/qx-test-port")),
            ..Config::default()
        };
        QgaPort::from_config(&cfg).unwrap()
    }

    #[test]
    fn end_of_file_on_the_port_keeps_replies_and_drops_a_partial_request() {
        let mut q = port();
        q.push_reply(None, Ok(Value::Int(1)), true);
        let (_, found) = q.splitter.push(b"{\"execute\": \"guest-");
        assert!(found.is_none() && q.splitter.mid_value());
        q.port_eof();
        assert_eq!(q.outbox.pending_bytes(), b"\xff{\"return\": 1}\n".len());
        assert!(!q.splitter.mid_value());
        // A closed socket or a failed port drops them.
        q.host_gone();
        assert!(q.outbox.is_empty());
    }
}
