//! A raw host-side client of the agent protocol over a QEMU chardev socket.
//!
//! It speaks exactly what docs/protocol.md says a host does: on connect, the 65552-byte zero
//! sync preamble and a `HostHello`; then requests with fresh non-zero ids, answered by an `Ack`,
//! optional stream items and one terminal reply. It is blocking and single-threaded on
//! purpose: tests use it to inject faults (garbage, half frames, stalls) that a well-behaved
//! daemon never produces, and the benchmark uses it to time the agent without a daemon.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qx_proto::agent::{envelope::Payload, AgentReady, Envelope, HostHello, Ping};
use qx_proto::{
    decode_envelope, encode_envelope, envelope_payload_name as payload_name, Decoder,
    DEFAULT_MAX_FRAME_BYTES,
};
use thiserror::Error;

/// Zero bytes sent before the hello on every connect (one maximum sent frame plus a header).
pub use qx_proto::SYNC_PREAMBLE_BYTES;
const READ_SLICE_MS: u64 = 50;

/// Request ids: seeded from the clock so two runs against one long-lived agent differ too.
fn next_request_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = || {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        (ns << 16) | 1
    };
    let _ = NEXT.compare_exchange(0, seed(), Ordering::Relaxed, Ordering::Relaxed);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    if id == 0 {
        NEXT.fetch_add(1, Ordering::Relaxed)
    } else {
        id
    }
}

/// Failures of the raw client.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket i/o failed")]
    Io(#[from] std::io::Error),
    #[error("cannot encode a frame")]
    Encode(#[from] qx_proto::EncodeError),
    #[error("cannot decode an envelope")]
    Decode(#[from] prost::DecodeError),
    #[error("the agent closed the connection")]
    Closed,
    #[error("no {0} within the timeout")]
    Timeout(String),
    #[error("request {id}: unexpected {got}")]
    Unexpected { id: u64, got: &'static str },
}

/// One request's answer.
#[derive(Debug, Default)]
pub struct Reply {
    pub acked: bool,
    /// Stream items (ExecOutput, FileChunk, ...) in order.
    pub items: Vec<Envelope>,
    /// The terminal reply.
    pub terminal: Option<Envelope>,
}

/// A connection to one agent port.
#[derive(Debug)]
pub struct AgentConn {
    stream: UnixStream,
    decoder: Decoder,
    /// Whole frames received so far.
    pub frames_seen: u64,
}

impl AgentConn {
    /// Connects to QEMU's chardev socket, retrying while QEMU is still creating it.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, WireError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(READ_SLICE_MS));
                }
                Err(source) => {
                    return Err(WireError::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_millis(READ_SLICE_MS)))?;
        Ok(Self {
            stream,
            decoder: Decoder::new(DEFAULT_MAX_FRAME_BYTES),
            frames_seen: 0,
        })
    }

    /// Connects and performs the handshake: preamble, HostHello, wait for AgentReady.
    pub fn open(path: &Path, timeout: Duration) -> Result<(Self, AgentReady), WireError> {
        let mut conn = Self::connect(path, timeout)?;
        let ready = conn.handshake(timeout)?;
        Ok((conn, ready))
    }

    /// Sends the sync preamble and a HostHello; returns the AgentReady that answers it.
    pub fn handshake(&mut self, timeout: Duration) -> Result<AgentReady, WireError> {
        self.write_raw(&vec![0u8; SYNC_PREAMBLE_BYTES])?;
        let id = self.fresh_id();
        self.send(&Envelope {
            id,
            correlation_id: 0,
            payload: Some(Payload::HostHello(HostHello {
                protocol_version: qx_proto::PROTOCOL_VERSION,
                host_version: format!("qx-e2e {}", env!("CARGO_PKG_VERSION")),
                host_session_id: u64::from(std::process::id()) << 32 | (id & 0xffff_ffff),
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            })),
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            let env = self.recv_until(deadline, "agent_ready")?;
            if let Some(Payload::AgentReady(ready)) = env.payload {
                return Ok(ready);
            }
        }
    }

    /// A fresh non-zero request id, unique across every connection of this process: an
    /// agent session outlives host connections, and it answers a repeated id from its reply
    /// cache, so ids must never restart with a new connection.
    pub fn fresh_id(&mut self) -> u64 {
        next_request_id()
    }

    /// Writes bytes as they are (preambles, garbage, half frames).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Writes one whole frame.
    pub fn send(&mut self, env: &Envelope) -> Result<(), WireError> {
        let mut out = Vec::new();
        encode_envelope(env, DEFAULT_MAX_FRAME_BYTES, &mut out)?;
        self.write_raw(&out)
    }

    /// The next whole frame, or `Ok(None)` when `deadline` passes first.
    pub fn recv_deadline(&mut self, deadline: Instant) -> Result<Option<Envelope>, WireError> {
        loop {
            // Frames the codec cannot use (damage) are skipped; it resynchronises by itself.
            loop {
                match self.decoder.decode() {
                    Ok(Some(payload)) => {
                        let env = decode_envelope(payload)?;
                        self.frames_seen += 1;
                        return Ok(Some(env));
                    }
                    Ok(None) => break,
                    Err(_) => continue,
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let spare = self.decoder.spare(64 * 1024);
            match self.stream.read(spare) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => self.decoder.commit(n),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut
                        || e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn recv_until(&mut self, deadline: Instant, what: &str) -> Result<Envelope, WireError> {
        self.recv_deadline(deadline)?
            .ok_or_else(|| WireError::Timeout(what.to_string()))
    }

    /// Sends `payload` as a request and collects Ack, stream items and the terminal reply.
    /// Frames about other requests (telemetry, stale replies, hellos) are skipped.
    pub fn request(&mut self, payload: Payload, timeout: Duration) -> Result<Reply, WireError> {
        let id = self.fresh_id();
        self.request_with_id(id, payload, timeout)
    }

    /// Like [`Self::request`] with a caller-chosen id (replays of a repeated id).
    pub fn request_with_id(
        &mut self,
        id: u64,
        payload: Payload,
        timeout: Duration,
    ) -> Result<Reply, WireError> {
        self.send(&Envelope {
            id,
            correlation_id: 0,
            payload: Some(payload),
        })?;
        let deadline = Instant::now() + timeout;
        let mut reply = Reply::default();
        loop {
            let env = self.recv_until(deadline, "reply")?;
            if env.correlation_id != id {
                continue;
            }
            match env.payload {
                Some(Payload::Ack(_)) => reply.acked = true,
                Some(Payload::ExecOutput(_)) | Some(Payload::FileChunk(_)) => reply.items.push(env),
                Some(_) => {
                    reply.terminal = Some(env);
                    return Ok(reply);
                }
                None => {
                    return Err(WireError::Unexpected {
                        id,
                        got: payload_name(&env),
                    })
                }
            }
        }
    }

    /// Ping round trip: sends `Ping{seq}` and waits for the matching `Pong`.
    pub fn ping(&mut self, seq: u64, timeout: Duration) -> Result<Duration, WireError> {
        let id = self.fresh_id();
        let start = Instant::now();
        self.send(&Envelope {
            id,
            correlation_id: 0,
            payload: Some(Payload::Ping(Ping { seq })),
        })?;
        let deadline = start + timeout;
        loop {
            let env = self.recv_until(deadline, "pong")?;
            if let Some(Payload::Pong(p)) = env.payload {
                if p.seq == seq {
                    return Ok(start.elapsed());
                }
            }
        }
    }

    /// Bytes the decoder skipped so far (garbage and damaged frames).
    pub fn decoder_stats(&self) -> qx_proto::DecoderStats {
        self.decoder.stats()
    }
}
