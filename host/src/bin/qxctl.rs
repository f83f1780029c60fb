//! qxctl: the command-line client of the Quantix node daemon. See `qxctl --help`.

use clap::{CommandFactory, Parser};
use qx_node::cli::{dispatch, Cli};

fn main() {
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
    // The connection to the daemon lives on the runtime's own thread, where SIGPIPE is
    // blocked: a daemon that closes the connection (it refused this user) is an error to
    // report, not a signal that ends qxctl without a word. The main thread, which prints,
    // keeps the default.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(block_sigpipe)
        .build();
    let code = match runtime {
        Ok(rt) => rt.block_on(dispatch::run(cli)),
        Err(e) => {
            eprintln!("qxctl: cannot start: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Rust starts programs with SIGPIPE ignored, so printing into a closed pipe
/// (`qxctl vm list | head -1`) would panic. Like every Unix tool, qxctl ends quietly instead.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE and no Rust code relies on the ignored default (the runtime's
    // thread blocks it: see `block_sigpipe`).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Blocks SIGPIPE in the calling (runtime) thread: a write to a closed socket there fails
/// with EPIPE instead.
#[allow(unsafe_code)]
fn block_sigpipe() {
    // SAFETY: `set` is initialised by sigemptyset before use; pthread_sigmask only changes
    // the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
