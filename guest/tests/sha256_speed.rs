//! Benchmark, not a test (ignored; run with `cargo test --release -p quantix-kvm-agent --test
//! sha256_speed -- --ignored --nocapture`, natively, or the built test binary under
//! `qemu-x86_64 -cpu qemu64` for the code a TCG guest runs): the agent's SHA-256 (the `sha2`
//! crate, SHA extensions picked at run time) and CRC32C. Figures in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qx_agent::ops::sha256::{hex, Sha256};
use std::time::Instant;

#[test]
#[ignore = "benchmark: prints throughput, asserts only the digest"]
fn sha256_and_crc32c_throughput() {
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
    let (digest, sha_speed) = best(&|| {
        let mut h = Sha256::new();
        for c in data.chunks(48 * 1024) {
            h.update(c);
        }
        h.finish().to_vec()
    });
    assert_eq!(hex(&digest), hex(&Sha256::digest(&data)));
    let crc_speed = best(&|| qx_proto::crc32c(&data).to_be_bytes().to_vec()).1;
    println!(
        "over 64 MiB in 48 KiB pieces, best of 3: sha256 {sha_speed:.0} MiB/s, crc32c \
         {crc_speed:.0} MiB/s"
    );
}
