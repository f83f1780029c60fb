//! Arbitrary bytes fed to the qemu-ga request splitter in arbitrary chunks, each complete
//! value parsed, each parsed value encoded back.
//!
//! Input layout: bytes 0..4 are a cycle of chunk lengths (each `b % 64 + 1`, 0 means "one
//! 4 KiB chunk"), the rest is the stream.
//!
//! Checks: no panic; the splitter's output does not depend on the chunking; every value it
//! hands out is at most `MAX_REQUEST_BYTES` long and starts with `{` or `[`; every parsed
//! value encodes to ASCII text that parses back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qx_agent::qga::json::{parse, Split, Splitter, Value, MAX_REQUEST_BYTES};

const CHUNK_HEADER_BYTES: usize = 4;

fuzz_target!(|data: &[u8]| {
    if data.len() < CHUNK_HEADER_BYTES {
        return;
    }
    let lens: Vec<usize> = data[..CHUNK_HEADER_BYTES]
        .iter()
        .map(|&b| if b == 0 { 4096 } else { usize::from(b % 64) + 1 })
        .collect();
    let stream = &data[CHUNK_HEADER_BYTES..];
    let chunked = run(stream, &lens);
    let whole = run(stream, &[stream.len().max(1)]);
    assert_eq!(chunked, whole, "splits depend on how the input was chunked");
    for split in &chunked {
        if let Split::Value(bytes) = split {
            assert!(bytes.len() <= MAX_REQUEST_BYTES);
            assert!(bytes[0] == b'{' || bytes[0] == b'[');
            if let Ok(v) = parse(bytes) {
                round_trip(&v);
            }
        }
    }
});

fn round_trip(v: &Value) {
    let text = v.to_text();
    assert!(text.is_ascii(), "output is not ASCII");
    let back = parse(text.as_bytes()).expect("encoded value does not parse");
    assert_eq!(back.to_text(), text, "value changed on a round trip");
}

fn run(stream: &[u8], lens: &[usize]) -> Vec<Split> {
    let mut s = Splitter::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut cycle = lens.iter().cycle();
    while fed < stream.len() {
        let want = cycle.next().copied().unwrap_or(1).min(stream.len() - fed);
        let mut chunk = &stream[fed..fed + want];
        while !chunk.is_empty() {
            let (n, found) = s.push(chunk);
            assert!(n > 0 && n <= chunk.len(), "the splitter made no progress");
            chunk = &chunk[n..];
            fed += n;
            out.extend(found);
        }
    }
    out
}
