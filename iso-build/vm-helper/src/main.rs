//! `qx-iso-vm-helper SOCKET TIMEOUT_S`: connects to a VM's agent chardev socket (QEMU's
//! `server=on,wait=off` end), performs the host side of the session start (the 65552-byte sync
//! preamble, then `HostHello`) and waits for `AgentReady`. On success it prints one line,
//! `agent_version=.. session_id=.. arch=.. kernel_release=.. hostname=..`, and exits 0; exit 1
//! on timeout or error (with the reason on stderr).
//!
//! The agent may not exist yet when this starts (the test installs it from the ISO while this
//! waits): until then the socket accepts and stays silent, so the hello is re-sent on every
//! reconnect and the wait is only on the overall deadline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{Envelope, HostHello};
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};

/// Zero bytes sent before the hello (one maximum sent frame plus a header).
const SYNC_PREAMBLE_BYTES: usize = 65552;
const READ_SLICE_MS: u64 = 100;
const RECONNECT_MS: u64 = 200;

fn hello() -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; SYNC_PREAMBLE_BYTES];
    let env = Envelope {
        id: 1,
        correlation_id: 0,
        payload: Some(Payload::HostHello(HostHello {
            protocol_version: qx_proto::PROTOCOL_VERSION,
            host_version: "qx-iso-vm-helper".into(),
            host_session_id: u64::from(std::process::id()),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        })),
    };
    encode_envelope(&env, DEFAULT_MAX_FRAME_BYTES, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// One connection: hello, then frames until AgentReady, EOF or the deadline.
fn session(path: &str, deadline: Instant) -> Result<Option<String>, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_millis(READ_SLICE_MS)))
        .map_err(|e| e.to_string())?;
    stream.write_all(&hello()?).map_err(|e| e.to_string())?;
    let mut decoder = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
    while Instant::now() < deadline {
        loop {
            match decoder.decode() {
                Ok(Some(payload)) => {
                    if let Ok(Envelope {
                        payload: Some(Payload::AgentReady(r)),
                        ..
                    }) = decode_envelope(payload)
                    {
                        return Ok(Some(format!(
                            "agent_version={} session_id={:#x} arch={} kernel_release={} hostname={}",
                            r.agent_version, r.session_id, r.arch, r.kernel_release, r.hostname
                        )));
                    }
                }
                Ok(None) => break,
                // Damaged frames are skipped; the decoder resynchronises.
                Err(_) => continue,
            }
        }
        match stream.read(decoder.spare(64 * 1024)) {
            Ok(0) => return Ok(None),
            Ok(n) => decoder.commit(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(None)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(timeout_s)) =
        (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok()))
    else {
        eprintln!("usage: qx-iso-vm-helper SOCKET TIMEOUT_S");
        std::process::exit(2);
    };
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let mut last_error = String::from("no AgentReady");
    while Instant::now() < deadline {
        match session(path, deadline) {
            Ok(Some(line)) => {
                println!("{line}");
                return;
            }
            Ok(None) => {}
            Err(e) => last_error = e,
        }
        std::thread::sleep(Duration::from_millis(RECONNECT_MS));
    }
    eprintln!("qx-iso-vm-helper: no AgentReady on {path} within {timeout_s}s ({last_error})");
    std::process::exit(1);
}
