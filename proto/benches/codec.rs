//! Encode/decode throughput of the frame codec for small and large frames.
//! Run: `cargo bench -p qx-proto --bench codec`. Figures go to docs/benchmarks.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qx_proto::codec::{encode_frame, Decoder};
use qx_proto::DEFAULT_MAX_FRAME_BYTES;
use std::hint::black_box;

fn bench_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for size in [64usize, 64 * 1024] {
        let payload = vec![0x5au8; size];
        // Enough frames per iteration that per-call overhead does not dominate.
        let frames_per_iter = (1 << 20) / size.max(1);
        group.throughput(Throughput::Bytes((size * frames_per_iter) as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, p| {
            let mut out = Vec::with_capacity((size + 16) * frames_per_iter);
            b.iter(|| {
                out.clear();
                for _ in 0..frames_per_iter {
                    encode_frame(black_box(p), DEFAULT_MAX_FRAME_BYTES, &mut out).ok();
                }
                black_box(out.len())
            })
        });
        let mut stream = Vec::new();
        for _ in 0..frames_per_iter {
            encode_frame(&payload, DEFAULT_MAX_FRAME_BYTES, &mut stream).ok();
        }
        group.bench_with_input(BenchmarkId::new("decode", size), &stream, |b, s| {
            let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
            b.iter(|| {
                let mut n = 0usize;
                // Feed in 32 KiB pieces, the most one port write carries.
                for piece in s.chunks(32 * 1024) {
                    dec.push(piece);
                    while let Ok(Some(p)) = dec.decode() {
                        n += p.len();
                    }
                }
                black_box(n)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
