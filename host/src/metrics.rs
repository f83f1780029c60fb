//! The Prometheus text endpoint: `GET /metrics` on its own plain-HTTP port, with the same
//! connection and command figures as GetAgentConnectionStats, and the gRPC server's RPC
//! figures ([`crate::rpc_layer`]). HTTP is hyper's; the endpoint bounds what a client can
//! hold: the request head in size and time, the connection in time, the connections in
//! number.
//!
//! Label cardinality is bounded by what the operator configures, never by what a guest
//! sends: every VM has the same fixed set of series (labelled `vm`, the VM id, which the
//! daemon validated; `state` and `stage` take a few fixed values), and the figures by payload
//! kind are node-wide (labelled `kind` only, a payload name of agent.proto).

use crate::agent_api::AgentApi;
use crate::pb;
use crate::rpc_layer::RpcMetrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Largest request head read (hyper's smallest allowed buffer).
const MAX_REQUEST_BYTES: usize = 8192;

/// Reads one figure of a VM's stats.
type Getter = fn(&pb::AgentConnectionStats) -> u64;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every VM's link figures in the Prometheus text format.
pub fn render(stats: &[pb::AgentConnectionStats]) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    gauge(
        &mut out,
        "qx_agent_connected",
        "1 when the VM's agent link is connected (socket open, reader and writer alive, heard from within the liveness window).",
        "gauge",
    );
    for s in stats {
        let _ = writeln!(
            out,
            "qx_agent_connected{{vm=\"{}\",state=\"{}\"}} {}",
            escape(&s.vm_id),
            s.state,
            u8::from(s.connected)
        );
    }
    let simple: [(&str, &str, &str, Getter); 14] = [
        (
            "qx_agent_reconnects_total",
            "Connections opened after the first.",
            "counter",
            |s| s.reconnects,
        ),
        (
            "qx_agent_restarts_total",
            "Agent session id changes seen.",
            "counter",
            |s| s.agent_restarts,
        ),
        (
            "qx_agent_protocol_errors_total",
            "Connections the agent ended in a protocol error (a message over the field limits, or a flood of damaged payloads); each reset its connection.",
            "counter",
            |s| s.protocol_errors,
        ),
        (
            "qx_agent_garbage_bytes_total",
            "Bytes skipped while resynchronising.",
            "counter",
            |s| s.garbage_bytes,
        ),
        (
            "qx_agent_bad_frames_total",
            "Frames rejected by the decoder.",
            "counter",
            |s| s.bad_frames,
        ),
        (
            "qx_agent_rx_frames_total",
            "Whole frames received from the agent and accepted by the decoder (every payload kind).",
            "counter",
            |s| sum(&s.rx, |f| f.frames),
        ),
        (
            "qx_agent_rx_bytes_total",
            "Bytes of those frames, headers included.",
            "counter",
            |s| sum(&s.rx, |f| f.bytes),
        ),
        (
            "qx_agent_tx_frames_total",
            "Frames written whole to the agent (every payload kind).",
            "counter",
            |s| sum(&s.tx, |f| f.frames),
        ),
        (
            "qx_agent_tx_bytes_total",
            "Bytes of those frames.",
            "counter",
            |s| sum(&s.tx, |f| f.bytes),
        ),
        (
            "qx_agent_in_flight",
            "Commands not yet finished.",
            "gauge",
            |s| u64::from(s.in_flight),
        ),
        (
            "qx_agent_connection_id",
            "Current connection number.",
            "gauge",
            |s| s.connection_id,
        ),
        (
            "qx_agent_last_rx_unix_ms",
            "When the last frame arrived.",
            "gauge",
            |s| s.last_rx_unix_ms.max(0) as u64,
        ),
        (
            "qx_agent_last_tx_unix_ms",
            "When the last frame was written.",
            "gauge",
            |s| s.last_tx_unix_ms.max(0) as u64,
        ),
        (
            "qx_agent_session_id",
            "The agent's current session id (0 before the first AgentReady).",
            "gauge",
            |s| s.agent_session_id,
        ),
    ];
    for (name, help, kind, get) in simple {
        gauge(&mut out, name, help, kind);
        for s in stats {
            let _ = writeln!(out, "{name}{{vm=\"{}\"}} {}", escape(&s.vm_id), get(s));
        }
    }
    gauge(
        &mut out,
        "qx_agent_commands_total",
        "Commands by the stage they reached or failed at.",
        "counter",
    );
    for s in stats {
        let c = s.commands.unwrap_or_default();
        for (stage, v) in [
            ("queued", c.queued),
            ("written", c.written),
            ("acknowledged", c.acknowledged),
            ("completed", c.completed),
            ("failed_not_written", c.failed_not_written),
            ("failed_not_acknowledged", c.failed_not_acknowledged),
            ("failed_ack_timeout", c.failed_ack_timeout),
            ("failed_connection_lost", c.failed_connection_lost),
            ("failed_agent_error", c.failed_agent_error),
            ("redelivered", c.redelivered),
        ] {
            let _ = writeln!(
                out,
                "qx_agent_commands_total{{vm=\"{}\",stage=\"{stage}\"}} {v}",
                escape(&s.vm_id)
            );
        }
    }
    // By payload kind, for the whole node: a VM's series do not multiply with the kinds its
    // agent chooses to send (the kinds are the payload names of agent.proto, a fixed set).
    for (dir, pick) in [
        (
            "rx",
            (|s| &s.rx) as fn(&pb::AgentConnectionStats) -> &Vec<pb::FrameCount>,
        ),
        ("tx", |s| &s.tx),
    ] {
        let mut by_kind: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for s in stats {
            for f in pick(s) {
                let e = by_kind.entry(f.kind.as_str()).or_default();
                e.0 = e.0.saturating_add(f.frames);
                e.1 = e.1.saturating_add(f.bytes);
            }
        }
        for (what, help, value) in [
            (
                "frames",
                "Frames of every VM by payload kind.",
                (|v| v.0) as fn(&(u64, u64)) -> u64,
            ),
            ("bytes", "Frame bytes of every VM by payload kind.", |v| v.1),
        ] {
            let name = format!("qx_node_agent_{dir}_{what}_total");
            gauge(&mut out, &name, help, "counter");
            for (kind, v) in &by_kind {
                let _ = writeln!(out, "{name}{{kind=\"{}\"}} {}", escape(kind), value(v));
            }
        }
    }
    out
}

/// The sum of one figure over a VM's frame counts.
fn sum(counts: &[pb::FrameCount], figure: fn(&pb::FrameCount) -> u64) -> u64 {
    counts
        .iter()
        .fold(0u64, |acc, f| acc.saturating_add(figure(f)))
}

/// Connections served at once; past that, new ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its whole request head.
pub const HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Time a connection may live in all, writing the response included (a client that never
/// reads it is let go).
pub const CONNECTION_DEADLINE_MS: u64 = 30_000;
/// Pause after a failed accept() (EMFILE, ENFILE, ENOMEM: it may succeed later).
pub const ACCEPT_BACKOFF_MS: u64 = 100;
/// At most one warning about failed accepts in this interval.
const ACCEPT_WARN_INTERVAL_MS: u64 = 10_000;

/// The endpoint's answer to one request.
async fn respond(
    req: &http::Request<hyper::body::Incoming>,
    agent: &AgentApi,
    rpc: &RpcMetrics,
) -> http::Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/metrics") => {
            let stats = agent
                .get_agent_connection_stats(pb::AgentStatsRequest::default())
                .await
                .map(|r| r.connections)
                .unwrap_or_default();
            let mut body = render(&stats);
            rpc.render(&mut body);
            (http::StatusCode::OK, body)
        }
        (_, "/metrics") => (
            http::StatusCode::METHOD_NOT_ALLOWED,
            "only GET /metrics is served here\n".to_string(),
        ),
        _ => (
            http::StatusCode::NOT_FOUND,
            "only GET /metrics is served here\n".to_string(),
        ),
    };
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// Serves `GET /metrics` (HTTP/1.1, one request a connection) for as long as its task runs:
/// the link figures of every VM, then the gRPC server's RPC figures. At most
/// [`MAX_CONNECTIONS`] at once. A failed accept() is logged and retried after
/// [`ACCEPT_BACKOFF_MS`]; it never ends the server.
pub async fn serve(listener: TcpListener, agent: Arc<AgentApi>, rpc: Arc<RpcMetrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        // A free slot first: past the cap, connections wait in the kernel's backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                let now = tokio::time::Instant::now();
                if last_warning
                    .is_none_or(|t| now - t >= Duration::from_millis(ACCEPT_WARN_INTERVAL_MS))
                {
                    log::warn!("metrics: accept failed, retrying: {e}");
                    last_warning = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(ACCEPT_BACKOFF_MS)).await;
                continue;
            }
        };
        let (agent, rpc) = (agent.clone(), rpc.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let (agent, rpc) = (agent.clone(), rpc.clone());
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &agent, &rpc).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS))
                .max_buf_size(MAX_REQUEST_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(sock), svc);
            let deadline = Duration::from_millis(CONNECTION_DEADLINE_MS);
            match tokio::time::timeout(deadline, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("metrics: connection ended: {e}"),
                Err(_) => log::debug!("metrics: connection past its deadline, closed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::agent::AgentConfig;
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const CAP: usize = MAX_CONNECTIONS;

    async fn start() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let agent = Arc::new(AgentApi::new(AgentConfig::default()));
        tokio::spawn(serve(listener, agent, Arc::default()));
        addr
    }

    /// Sends a whole GET and reads until the server closes; `None` if it never does (an
    /// hour of paused time, which passes at once when nothing else can run).
    async fn get(addr: SocketAddr, path: &str) -> Option<String> {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: qx\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(3600), c.read_to_end(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_are_served_and_other_paths_are_not_found() {
        let addr = start().await;
        let ok = get(addr, "/metrics").await.unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("# TYPE qx_agent_connected gauge"), "{ok}");
        let nf = get(addr, "/").await.unwrap();
        assert!(nf.starts_with("HTTP/1.1 404 Not Found\r\n"), "{nf}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_request_is_let_go() {
        let addr = start().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: qx\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(3600), c.read_to_end(&mut buf)).await;
        assert!(
            closed.is_ok(),
            "an hour on, the server still holds a connection whose request never ended"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connections_past_the_cap_wait_for_a_free_slot() {
        let addr = start().await;
        let t0 = tokio::time::Instant::now();
        let mut idle = Vec::new();
        for _ in 0..CAP {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
            idle.push(c);
        }
        // Time is paused: it moves only when every task waits, so the answer to one more
        // connection comes at once unless that connection waits for a slot, which the
        // stalled ones free when their header timeout ends.
        let over = get(addr, "/metrics").await.unwrap_or_default();
        assert!(over.starts_with("HTTP/1.1 200 OK\r\n"), "{over:?}");
        assert!(
            t0.elapsed() >= Duration::from_millis(HEADER_READ_TIMEOUT_MS),
            "connection {} was served while {CAP} others held every slot",
            CAP + 1
        );
        drop(idle);
    }
}
