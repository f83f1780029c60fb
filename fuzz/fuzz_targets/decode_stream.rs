//! Arbitrary bytes fed to the frame decoder in arbitrary chunks.
//!
//! Input layout: byte 0 picks the decoder's maximum frame size, bytes 1..=8 are a cycle of
//! chunk lengths (each `b % 64 + 1`, and 0 means "one 4 KiB chunk"), the rest is the stream.
//!
//! Checks: no panic; the buffer never exceeds its limit; after `Ok(None)` there is room for
//! another byte (so feeding always makes progress); every decoded payload re-encodes to a
//! frame that occurs in the input, in order and without overlapping the previous one (its
//! CRCs were valid and the decoder did not invent or reorder bytes); and the frames and
//! counters are the same as when the whole stream is fed at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qx_proto::codec::{encode_frame, Decoder, DecoderStats, MIN_MAX_FRAME_BYTES};
use qx_proto::DEFAULT_MAX_FRAME_BYTES;

const CHUNK_HEADER_BYTES: usize = 8;

fuzz_target!(|data: &[u8]| {
    if data.len() < 1 + CHUNK_HEADER_BYTES {
        return;
    }
    let max = if data[0] & 1 == 0 {
        MIN_MAX_FRAME_BYTES
    } else {
        DEFAULT_MAX_FRAME_BYTES
    };
    let chunk_lens: Vec<usize> = data[1..=CHUNK_HEADER_BYTES]
        .iter()
        .map(|&b| {
            if b == 0 {
                4096
            } else {
                usize::from(b % 64) + 1
            }
        })
        .collect();
    let stream = &data[1 + CHUNK_HEADER_BYTES..];

    let chunked = run(stream, max, &chunk_lens);
    let whole = run(stream, max, &[stream.len().max(1)]);
    assert_eq!(
        chunked.0, whole.0,
        "frames depend on how the input was chunked"
    );
    assert_eq!(
        chunked.1, whole.1,
        "counters depend on how the input was chunked"
    );
    assert_eq!(
        chunked.2, whole.2,
        "leftover depends on how the input was chunked"
    );

    // Every frame is really in the input, with valid checksums, in order.
    let mut cursor = 0;
    for payload in &chunked.0 {
        let mut frame = Vec::new();
        assert!(encode_frame(payload, max, &mut frame).is_ok());
        let at = stream[cursor..]
            .windows(frame.len())
            .position(|w| w == frame.as_slice());
        match at {
            Some(at) => cursor += at + frame.len(),
            None => panic!(
                "decoded a {}-byte payload that is not in the input",
                payload.len()
            ),
        }
    }
});

/// Feeds `stream` in chunks of the given cyclic lengths; returns the payloads, the final
/// counters and how many bytes stayed buffered.
fn run(stream: &[u8], max: u32, chunk_lens: &[usize]) -> (Vec<Vec<u8>>, DecoderStats, usize) {
    let mut dec = Decoder::new(max);
    let limit = dec.capacity_limit();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut lens = chunk_lens.iter().cycle();
    while fed < stream.len() {
        let want = lens.next().copied().unwrap_or(1).min(stream.len() - fed);
        let mut chunk = &stream[fed..fed + want];
        while !chunk.is_empty() {
            let taken = dec.push(chunk);
            chunk = &chunk[taken..];
            fed += taken;
            assert!(dec.buffered() <= limit, "buffer over its limit");
            loop {
                match dec.decode() {
                    Ok(Some(p)) => {
                        assert!(p.len() <= max as usize);
                        frames.push(p.to_vec());
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                assert!(dec.buffered() <= limit, "buffer over its limit");
            }
            assert!(
                dec.room() > 0,
                "no room after the decoder said it needs more bytes"
            );
        }
    }
    (frames, dec.stats(), dec.buffered())
}
