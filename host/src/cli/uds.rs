//! qxctl's connection to qx-node's unix socket (`--addr unix:/PATH`, the default).

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint};

/// A gRPC channel over the unix socket at `path`. The URI is a placeholder: every connection
/// goes to the socket.
pub async fn channel(path: &str) -> Result<Channel> {
    let path = PathBuf::from(path.strip_prefix("//").unwrap_or(path));
    let shown = path.display().to_string();
    Endpoint::from_static("http://qx-node.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to {shown}"))
}
