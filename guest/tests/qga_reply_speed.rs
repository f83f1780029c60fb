//! Benchmark, not a test (ignored; run with `cargo test --release -p quantix-kvm-agent --test
//! qga_reply_speed -- --ignored --nocapture`): the agent's cost of turning 1 MiB that a
//! `guest-file-read` read into its reply line and queueing it. Figures in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qx_agent::qga::json::Value;
use qx_agent::qga::outbox::LineOutbox;
use qx_agent::qga::request;
use std::time::{Duration, Instant};

#[test]
#[ignore = "benchmark: prints the time per reply, asserts only the reply's size"]
fn file_read_reply_of_one_mib() {
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut best = Duration::MAX;
    for _ in 0..20 {
        let buf = data.clone();
        let t = Instant::now();
        let v = Value::Object(vec![
            ("count".into(), Value::Int(buf.len() as i64)),
            ("buf-b64".into(), Value::Base64(buf)),
            ("eof".into(), Value::from(false)),
        ]);
        let mut outbox = LineOutbox::new();
        outbox
            .push_with(|out| request::write_reply_line(out, b"", None, Ok(v)))
            .unwrap();
        let len = outbox.pending_bytes();
        best = best.min(t.elapsed());
        // `{"return": {"count": 1048576, "buf-b64": "` ... `", "eof": false}}\n`
        assert_eq!(len, (1usize << 20).div_ceil(3) * 4 + 60);
    }
    println!(
        "1 MiB guest-file-read reply encoded and queued: best of 20 {} us",
        best.as_micros()
    );
}

#[test]
#[ignore = "benchmark: prints the time per request"]
fn guest_ping_request_to_reply() {
    use qx_agent::qga::json::{parse, Split, Splitter};
    let mut splitter = Splitter::new();
    let input = b"{\"execute\": \"guest-ping\"}\n";
    let n = 200_000;
    let t = Instant::now();
    let mut sent = 0;
    let mut outbox = LineOutbox::new();
    let mut sink = Vec::new();
    for _ in 0..n {
        let (_, found) = splitter.push(input);
        let Some(Split::Value(bytes)) = found else {
            panic!()
        };
        let req = request::request(parse(&bytes).unwrap()).unwrap();
        assert_eq!(req.execute, "guest-ping");
        outbox
            .push_with(|out| {
                request::write_reply_line(out, b"", req.id.as_ref(), Ok(Value::Object(Vec::new())))
            })
            .unwrap();
        sent += outbox.flush(&mut sink).unwrap();
        sink.clear();
    }
    println!(
        "guest-ping parsed and answered: {} ns each ({sent} bytes)",
        t.elapsed().as_nanos() / n
    );
}
