//! qxctl: the command-line client of the Quantix node daemon. See `qxctl --help`.

use clap::{CommandFactory, Parser};
use qx_node::cli::{dispatch, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    restore_sigpipe();
    match qx_node::manpages::generate_if_asked(Cli::command(), "1") {
        Ok(false) => {}
        Ok(true) => return,
        Err(e) => {
            eprintln!("qxctl: cannot write man pages and completions: {e}");
            std::process::exit(1);
        }
    }
    let cli = Cli::parse();
    let code = dispatch::run(cli).await;
    std::process::exit(code);
}

/// Rust starts programs with SIGPIPE ignored, so printing into a closed pipe
/// (`qxctl vm list | head -1`) would panic. Like every Unix tool, qxctl ends quietly instead.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE and no Rust code relies on the ignored default.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
