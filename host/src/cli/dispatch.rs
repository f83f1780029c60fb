//! qxctl's top level: connect to the daemon, hand the command to its area's module, and turn
//! the outcome into the process exit code ([`super::exit`]).

use super::{agent_cmds, exit, node_cmds, storage_cmds, uds, vm_cmds, Cli, Command};
use crate::pb::node_daemon_service_client::NodeDaemonServiceClient;
use crate::text::escape;
use anyhow::{bail, Context, Result};
use std::path::Path;
use tonic::transport::Channel;
use tonic::Code;

/// The gRPC client qxctl uses.
pub type Client = NodeDaemonServiceClient<Channel>;

/// Exit code for a failed RPC.
pub fn code_for(status: &tonic::Status) -> i32 {
    match status.code() {
        Code::NotFound => exit::NOT_FOUND,
        Code::Unavailable | Code::DeadlineExceeded => exit::UNAVAILABLE,
        Code::DataLoss => exit::INTEGRITY,
        // The connection itself failed (the daemon closed it, e.g. refusing this peer): tonic
        // says "transport error" with an unknown code.
        Code::Unknown if from_transport(status) => exit::UNAVAILABLE,
        _ => exit::FAILED,
    }
}

/// Whether `status` stands for a failed connection rather than an answer from the daemon:
/// tonic turns its own transport errors into `Unknown` statuses with that error's text,
/// "transport error" (the error itself is not kept as a source).
fn from_transport(status: &tonic::Status) -> bool {
    status.message() == "transport error"
}

/// Runs one qxctl invocation; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let is_exec = matches!(cli.command, Command::Exec(_));
    let fail = if is_exec {
        exit::EXEC_FAILED
    } else {
        exit::FAILED
    };
    let mut client = match connect(&cli).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qxctl: cannot reach qx-node at {}: {e}", cli.addr);
            return if is_exec {
                exit::EXEC_FAILED
            } else {
                exit::UNAVAILABLE
            };
        }
    };
    let res = dispatch(cli, &mut client).await;
    match res {
        Ok(code) => code,
        Err(e) => {
            // Errors carry the agent's own messages: guest text.
            eprintln!("qxctl: {}", escape(&format!("{e:#}")));
            match e.downcast_ref::<tonic::Status>() {
                Some(s) if !is_exec => code_for(s),
                _ => fail,
            }
        }
    }
}

/// `--addr` as a URI: a bare `HOST:PORT` gets `https://` when TLS is asked for, else `http://`.
fn endpoint_uri(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// Connects to the daemon, with TLS when --ca/--cert/--key are given.
pub async fn connect(cli: &Cli) -> Result<Client> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    if let Some(path) = cli.addr.strip_prefix("unix:") {
        return Ok(Client::new(uds::channel(path).await?));
    }
    let tls_wanted = cli.ca.is_some() || cli.cert.is_some();
    let mut ep = Endpoint::from_shared(endpoint_uri(&cli.addr, tls_wanted))
        .with_context(|| format!("{} is not a valid address", cli.addr))?;
    if tls_wanted {
        let read =
            |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cli.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&cli.cert, &cli.key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => bail!("--cert and --key go together"),
        }
        if let Some(d) = &cli.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        ep = ep.tls_config(tls)?;
    }
    Ok(Client::new(ep.connect().await?))
}

/// One command, to its area's module.
async fn dispatch(cli: Cli, client: &mut Client) -> Result<i32> {
    let (json, t) = (cli.json, cli.timeout_ms);
    match cli.command {
        Command::Agent(cmd) => agent_cmds::run_agent(cmd, client, json, t).await,
        Command::Exec(a) => agent_cmds::exec(a, client, json, t).await,
        Command::Cp(a) => agent_cmds::cp(a, client, json, t).await,
        Command::Fs(f) => {
            agent_cmds::fs(f, client, json).await?;
            Ok(exit::OK)
        }
        Command::Time(cmd) => agent_cmds::run_time(cmd, client, json, t).await,
        Command::Watch(a) => agent_cmds::run_watch(a, client, json, t).await,
        Command::Vm(cmd) => vm_cmds::run_vm(cmd, client, json).await,
        Command::Snapshot(cmd) => vm_cmds::run_snapshot(cmd, client, json).await,
        Command::Media(cmd) => vm_cmds::run_media(cmd, client, json).await,
        Command::Events(args) => vm_cmds::run_events(args, client, json).await,
        Command::Node(cmd) => node_cmds::run_node(cmd, client, json).await,
        Command::Pool(cmd) => storage_cmds::run_pool(cmd, client, json).await,
        Command::Volume(cmd) => storage_cmds::run_volume(cmd, client, json).await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bare_host_port_gets_a_scheme() {
        assert_eq!(
            super::endpoint_uri("127.0.0.1:9090", false),
            "http://127.0.0.1:9090"
        );
        assert_eq!(
            super::endpoint_uri("node1:9090", true),
            "https://node1:9090"
        );
        assert_eq!(super::endpoint_uri("http://h:1", true), "http://h:1");
    }
}
