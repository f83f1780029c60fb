//! The Prometheus text endpoint: `GET /metrics` on its own plain-HTTP port, with the same
//! connection and command figures as GetAgentConnectionStats.

use crate::agent_api::AgentApi;
use crate::pb;
use std::fmt::Write as _;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Largest request head read before answering.
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
    let simple: [(&str, &str, &str, Getter); 7] = [
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
    for (dir, pick) in [
        (
            "rx",
            (|s| &s.rx) as fn(&pb::AgentConnectionStats) -> &Vec<pb::FrameCount>,
        ),
        ("tx", |s| &s.tx),
    ] {
        for (what, help, value) in [
            (
                "frames",
                "Frames by payload kind.",
                (|f| f.frames) as fn(&pb::FrameCount) -> u64,
            ),
            ("bytes", "Frame bytes by payload kind.", |f| f.bytes),
        ] {
            let name = format!("qx_agent_{dir}_{what}_total");
            gauge(&mut out, &name, help, "counter");
            for s in stats {
                for f in pick(s) {
                    let _ = writeln!(
                        out,
                        "{name}{{vm=\"{}\",kind=\"{}\"}} {}",
                        escape(&s.vm_id),
                        f.kind,
                        value(f)
                    );
                }
            }
        }
    }
    out
}

/// Serves `GET /metrics` until the listener fails.
pub async fn serve(listener: TcpListener, agent: Arc<AgentApi>) -> std::io::Result<()> {
    loop {
        let (mut sock, _) = listener.accept().await?;
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_REQUEST_BYTES];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                let stats = agent
                    .get_agent_connection_stats(pb::AgentStatsRequest::default())
                    .await
                    .map(|r| r.connections)
                    .unwrap_or_default();
                ("200 OK", render(&stats))
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
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
    use tokio::net::TcpStream;

    /// Connections the server takes at once (MAX_CONNECTIONS).
    const CAP: usize = 64;

    async fn start() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let agent = Arc::new(AgentApi::new(AgentConfig::default()));
        tokio::spawn(serve(listener, agent));
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
    async fn connections_past_the_cap_are_refused_not_served() {
        let addr = start().await;
        let mut idle = Vec::new();
        for _ in 0..CAP {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
            idle.push(c);
        }
        // Let the server take every idle connection before the next one arrives.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let over = get(addr, "/metrics").await.unwrap_or_default();
        assert!(
            over.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "connection {} of {CAP} allowed got: {over:?}",
            CAP + 1
        );
        drop(idle);
    }
}
