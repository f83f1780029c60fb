//! Benchmark, not a test (ignored; run with `cargo test --release -p quantix-kvm-agent --test
//! sha256_speed -- --ignored --nocapture`): the agent's own SHA-256 against the `sha2` crate,
//! which picks SHA-NI at run time where the CPU has it. Figures in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qx_agent::ops::sha256::Sha256;
use sha2::Digest;
use std::time::Instant;

#[test]
#[ignore = "benchmark: prints throughput, asserts only that both agree"]
fn sha256_in_tree_against_the_sha2_crate() {
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i >> 7) as u8).collect();
    let mib = data.len() as f64 / (1 << 20) as f64;
    let best = |f: &dyn Fn() -> Vec<u8>| {
        let mut out = Vec::new();
        let mut fastest = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            out = f();
            fastest = fastest.min(t.elapsed().as_secs_f64());
        }
        (out, mib / fastest)
    };
    let (ours, ours_speed) = best(&|| {
        let mut h = Sha256::new();
        for c in data.chunks(48 * 1024) {
            h.update(c);
        }
        h.finish().to_vec()
    });
    let (theirs, theirs_speed) = best(&|| {
        let mut h = sha2::Sha256::new();
        for c in data.chunks(48 * 1024) {
            h.update(c);
        }
        h.finalize().to_vec()
    });
    assert_eq!(ours, theirs);
    let crc_speed = best(&|| qx_proto::crc32c(&data).to_be_bytes().to_vec()).1;
    println!(
        "sha256 over 64 MiB in 48 KiB pieces, best of 3: in-tree {ours_speed:.0} MiB/s, sha2 crate \
         {theirs_speed:.0} MiB/s; crc32c {crc_speed:.0} MiB/s"
    );
}
