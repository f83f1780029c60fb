//! qxctl: the command-line client of the Quantix node daemon. See `qxctl --help`.

use clap::Parser;
use qx_node::cli::{agent_cmds, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let code = agent_cmds::run(cli).await;
    std::process::exit(code);
}
