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

/// Worst case for resynchronisation: headers with right checksums, 16 bytes apart, each
/// claiming the decoder's whole maximum. Every header makes the decoder wait for, then
/// checksum, `max` bytes before stepping one byte on to the next header, so each 16 input
/// bytes cost one `max`-byte CRC. Throughput is in input bytes: it shows how much CPU a
/// hostile peer can make a decoder spend per byte it sends, for a 1 MiB and a 64 KiB limit.
fn bench_nested_headers(c: &mut Criterion) {
    let mut group = c.benchmark_group("nested_headers");
    const HEADERS: usize = 32;
    for max in [DEFAULT_MAX_FRAME_BYTES, 64 * 1024] {
        let mut stream = Vec::new();
        for _ in 0..HEADERS {
            let mut h = qx_proto::MAGIC.to_vec();
            h.extend(max.to_be_bytes());
            h.extend(1u32.to_be_bytes());
            let hcrc = qx_proto::codec::crc32c(&h);
            h.extend(hcrc.to_be_bytes());
            stream.extend(h);
        }
        stream.resize(stream.len() + max as usize, 0);
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_with_input(BenchmarkId::new("decode", max), &stream, |b, s| {
            let mut dec = Decoder::new(max);
            b.iter(|| {
                dec.reset();
                let mut errors = 0usize;
                let mut rest = &s[..];
                while !rest.is_empty() {
                    let n = dec.push(rest);
                    rest = &rest[n..];
                    loop {
                        match dec.decode() {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(_) => errors += 1,
                        }
                    }
                }
                black_box(errors)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_codec, bench_nested_headers);
criterion_main!(benches);
