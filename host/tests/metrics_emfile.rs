//! The metrics endpoint outlives an accept() that fails with EMFILE (too many open files):
//! the process runs out of descriptors while a scrape is waiting, then gets them back, and
//! the next scrape is answered. Alone in its test binary, because it lowers the process's
//! descriptor limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qx_node::agent::AgentConfig;
use qx_node::agent_api::AgentApi;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(start_paused = true)]
async fn an_accept_that_fails_with_emfile_does_not_end_the_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = Arc::new(AgentApi::new(AgentConfig::default()));
    tokio::spawn(qx_node::metrics::serve(listener, agent, Arc::default()));

    // Lower the soft limit a little above what is open, then use up every descriptor.
    let soft = open_fds() + 16;
    let st = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={soft}:"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success());
    let mut fillers = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => fillers.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // One descriptor for the client; the server's accept() then has none.
    fillers.pop();
    let starved = TcpStream::connect(addr).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(fillers);
    drop(starved);

    let mut c = TcpStream::connect(addr)
        .await
        .expect("the metrics server is gone: it ended on EMFILE");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: qx\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(3600), c.read_to_end(&mut buf)).await;
    assert!(
        answered.is_ok(),
        "no answer an hour after the descriptors came back: the server ended on EMFILE"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
}
