//! Property tests of the frame codec: damaged streams, chunking, bounds, envelope round trips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{
    Ack, AgentReady, Cancel, Done, Envelope, Error as ErrorMsg, ExecExit, ExecOutput, ExecRequest,
    FileChunk, HostHello, Limits, Ping, Pong,
};
use qx_proto::codec::{crc32c, encode_frame, Decoder, DecoderStats, MIN_MAX_FRAME_BYTES};
use qx_proto::{
    decode_envelope, decode_host_envelope, encode_envelope, encoded_frame_len,
    envelope_payload_name, DEFAULT_MAX_FRAME_BYTES, HEADER_BYTES, MAGIC,
};
use std::collections::HashSet;

/// Largest payload the generators put in a frame (a peer sends at most 64 KiB).
const MAX_GEN_PAYLOAD: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Stream generator
// ---------------------------------------------------------------------------------------------

/// One piece of a generated stream.
#[derive(Debug, Clone)]
enum Piece {
    /// A whole frame nothing touches.
    Frame(Vec<u8>),
    /// Bytes between frames that are no frame (see [`garbage`]).
    Garbage(Vec<u8>),
    /// The first `keep` bytes of the frame for `payload` (its sender died mid-frame).
    Truncated { payload: Vec<u8>, keep: usize },
    /// The frame for `payload` with `garbage` inserted after its first `at` bytes.
    Split {
        payload: Vec<u8>,
        at: usize,
        garbage: Vec<u8>,
    },
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(payload, DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
    out
}

/// A header whose own checksum is right, around any length and payload checksum.
fn header(len: u32, payload_crc: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend(len.to_be_bytes());
    h.extend(payload_crc.to_be_bytes());
    let c = crc32c(&h);
    h.extend(c.to_be_bytes());
    h
}

/// `n` pseudo-random bytes from `seed` (xorshift64): large payloads without one proptest
/// value tree per byte, which would dominate the run time.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => vec(any::<u8>(), 0..200),
        1 => (0..=MAX_GEN_PAYLOAD, any::<u64>()).prop_map(|(n, seed)| noise(n, seed)),
    ]
}

/// Garbage built to be hard on a resynchronising decoder: random bytes, runs of magic bytes,
/// a partial magic at the end, a bare magic with part of a header, a plausible header (right
/// header checksum, claimed length up to [`MAX_GEN_PAYLOAD`], payload checksum that matches
/// nothing), an absurd length with a right header checksum, a header with a wrong checksum.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    let magic_byte = prop_oneof![
        Just(0x51u8),
        Just(0x54),
        Just(0x58),
        Just(0x01),
        any::<u8>()
    ];
    prop_oneof![
        vec(any::<u8>(), 1..40),
        vec(magic_byte, 1..40),
        (vec(any::<u8>(), 0..8), 1..4usize).prop_map(|(mut g, n)| {
            g.extend(&MAGIC[..n]);
            g
        }),
        vec(any::<u8>(), 0..12).prop_map(|rest| {
            let mut g = MAGIC.to_vec();
            g.extend(rest);
            g
        }),
        (
            prop_oneof![0..300u32, 0..=MAX_GEN_PAYLOAD as u32],
            any::<u32>()
        )
            .prop_map(|(len, crc)| {
                // crc32c("") is 0: a zero-length header with payload checksum 0 would be a
                // valid empty frame, not garbage.
                let crc = if len == 0 { crc | 1 } else { crc };
                header(len, crc)
            }),
        (DEFAULT_MAX_FRAME_BYTES + 1.., any::<u32>()).prop_map(|(len, crc)| header(len, crc)),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(len, crc, bad)| {
            let mut h = header(len, crc);
            let c = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            h[12..16].copy_from_slice(&(c ^ (bad | 1)).to_be_bytes());
            h
        }),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        6 => payload().prop_map(Piece::Frame),
        3 => garbage().prop_map(Piece::Garbage),
        2 => (payload(), any::<prop::sample::Index>()).prop_map(|(payload, i)| {
            let total = HEADER_BYTES + payload.len();
            let keep = 1 + i.index(total - 1);
            Piece::Truncated { payload, keep }
        }),
        2 => (payload(), any::<prop::sample::Index>(), garbage()).prop_map(|(payload, i, garbage)| {
            let total = HEADER_BYTES + payload.len();
            let at = 1 + i.index(total - 1);
            Piece::Split { payload, at, garbage }
        }),
    ]
}

/// Where a frame of the stream lies, and whether the property requires it to come out.
#[derive(Debug)]
struct Placed {
    payload: Vec<u8>,
    /// Not touched by garbage or truncation: must come out.
    whole: bool,
    start: usize,
    end: usize,
}

/// A generated stream and what it is made of.
#[derive(Debug)]
struct Stream {
    bytes: Vec<u8>,
    frames: Vec<Placed>,
    /// `(start, start + 16 + claimed length)` of every header in the stream with a right
    /// checksum and an acceptable length.
    header_extents: Vec<(usize, usize)>,
}

impl Stream {
    /// Lays the pieces out, then appends a sync preamble of zero bytes long enough to fill
    /// any claimed length (as the host does on connect).
    fn build(mut pieces: Vec<Piece>) -> Stream {
        // Distinct payloads, so that which frame came out is never ambiguous.
        let mut seen = HashSet::new();
        for (i, p) in pieces.iter_mut().enumerate() {
            let payload = match p {
                Piece::Frame(payload)
                | Piece::Truncated { payload, .. }
                | Piece::Split { payload, .. } => payload,
                Piece::Garbage(_) => continue,
            };
            while !seen.insert(payload.clone()) {
                payload.extend((i as u32).to_be_bytes());
            }
        }
        // A truncated frame is lost only if the bytes that follow it are not, by chance,
        // exactly its missing tail (then it would be a whole frame, eating into the next
        // piece). Change the unsent tail where that happens, last piece first so that what
        // follows each piece is final when it is checked.
        for i in (0..pieces.len()).rev() {
            let following: Vec<u8> = pieces[i + 1..].iter().flat_map(piece_bytes).collect();
            if let Piece::Truncated { payload, keep } = &mut pieces[i] {
                loop {
                    let f = frame(payload);
                    let tail = &f[*keep..];
                    // Past the last piece come zero bytes.
                    let mut after = following.clone();
                    after.resize(after.len().max(tail.len()), 0);
                    if !after.starts_with(tail) {
                        break;
                    }
                    payload.push(0xA5);
                }
            }
        }

        let mut bytes = Vec::new();
        let mut frames = Vec::new();
        for p in &pieces {
            let start = bytes.len();
            match p {
                Piece::Frame(payload) => {
                    bytes.extend(frame(payload));
                    frames.push(Placed {
                        payload: payload.clone(),
                        whole: true,
                        start,
                        end: bytes.len(),
                    });
                }
                Piece::Garbage(g) => bytes.extend(g),
                Piece::Truncated { payload, keep } => {
                    bytes.extend(&frame(payload)[..*keep]);
                    frames.push(Placed {
                        payload: payload.clone(),
                        whole: false,
                        start,
                        end: bytes.len(),
                    });
                }
                Piece::Split { payload, .. } => {
                    bytes.extend(piece_bytes(p));
                    frames.push(Placed {
                        payload: payload.clone(),
                        whole: false,
                        start,
                        end: bytes.len(),
                    });
                }
            }
        }
        // Every header with a right checksum and an acceptable length, wherever it is: in a
        // frame, in garbage (also garbage inserted into a frame), or across pieces. Zero
        // bytes hold no magic, so padding adds none.
        bytes.resize(bytes.len() + HEADER_BYTES, 0);
        let mut header_extents = Vec::new();
        for (at, h) in bytes.windows(HEADER_BYTES).enumerate() {
            let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            if h[..4] == MAGIC
                && crc32c(&h[..12]) == u32::from_be_bytes([h[12], h[13], h[14], h[15]])
                && len <= DEFAULT_MAX_FRAME_BYTES
            {
                header_extents.push((at, at + HEADER_BYTES + len as usize));
            }
        }
        // The preamble: zero bytes up to the end of the furthest claimed length.
        let furthest = header_extents.iter().map(|&(_, e)| e).max().unwrap_or(0);
        bytes.resize(bytes.len().max(furthest), 0);
        Stream {
            bytes,
            frames,
            header_extents,
        }
    }

    /// How many bytes must have been fed before frame `i` must have come out: its own end,
    /// or the end of any claimed length that starts before it, whichever is later.
    fn deadline(&self, i: usize) -> usize {
        let f = &self.frames[i];
        self.header_extents
            .iter()
            .filter(|&&(start, _)| start < f.start)
            .map(|&(_, end)| end)
            .fold(f.end, usize::max)
    }
}

fn piece_bytes(p: &Piece) -> Vec<u8> {
    match p {
        Piece::Frame(payload) => frame(payload),
        Piece::Garbage(g) => g.clone(),
        Piece::Truncated { payload, keep } => frame(payload)[..*keep].to_vec(),
        Piece::Split {
            payload,
            at,
            garbage,
        } => {
            let f = frame(payload);
            let mut out = f[..*at].to_vec();
            out.extend(garbage);
            out.extend(&f[*at..]);
            out
        }
    }
}

fn stream() -> impl Strategy<Value = Stream> {
    vec(piece(), 0..12).prop_map(Stream::build)
}

/// Read sizes, used in turn (cycling): tiny, ordinary and larger than any frame.
fn chunking() -> impl Strategy<Value = Vec<usize>> {
    vec(
        prop_oneof![2 => 1..8usize, 4 => 1..512usize, 2 => 1..100_000usize],
        1..8,
    )
}

// ---------------------------------------------------------------------------------------------
// Driving a decoder
// ---------------------------------------------------------------------------------------------

/// What came out of a decoder, and how many input bytes had been fed when each frame did.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    payloads: Vec<Vec<u8>>,
    fed_at: Vec<usize>,
    /// Bytes fed after each read.
    boundaries: Vec<usize>,
    stats: DecoderStats,
    leftover: usize,
}

/// Feeds `input` in reads of the given sizes (cycling), draining after every read, and checks
/// the buffer bounds all along.
fn run(input: &[u8], max: u32, chunks: &[usize]) -> Run {
    let mut dec = Decoder::new(max);
    let limit = dec.capacity_limit();
    let mut payloads = Vec::new();
    let mut fed_at = Vec::new();
    let mut boundaries = Vec::new();
    let mut fed = 0;
    let mut sizes = chunks.iter().cycle();
    while fed < input.len() {
        let n = (*sizes.next().unwrap()).min(input.len() - fed);
        let mut piece = &input[fed..fed + n];
        while !piece.is_empty() {
            let taken = dec.push(piece);
            piece = &piece[taken..];
            fed += taken;
            assert!(dec.buffered() <= limit, "buffer above its limit");
            loop {
                match dec.decode() {
                    Ok(Some(p)) => {
                        assert!(p.len() <= max as usize);
                        payloads.push(p.to_vec());
                        fed_at.push(fed);
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                assert!(dec.buffered() <= limit, "buffer above its limit");
            }
            assert!(dec.room() > 0, "full after Ok(None): the input would stall");
            boundaries.push(fed);
        }
    }
    Run {
        payloads,
        fed_at,
        boundaries,
        stats: dec.stats(),
        leftover: dec.buffered(),
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope generator
// ---------------------------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,24}", "[a-z0-9./_-]{0,16}"]
}

fn envelope_payload() -> impl Strategy<Value = Option<Payload>> {
    let bytes = || vec(any::<u8>(), 0..300);
    prop_oneof![
        Just(None),
        any::<u64>().prop_map(|seq| Some(Payload::Ping(Ping { seq }))),
        any::<u64>().prop_map(|seq| Some(Payload::Pong(Pong { seq }))),
        Just(Some(Payload::Ack(Ack {}))),
        Just(Some(Payload::Done(Done {}))),
        any::<u64>().prop_map(|target_id| Some(Payload::Cancel(Cancel { target_id }))),
        // Any i32, including codes this build does not know: they must survive.
        (any::<i32>(), text())
            .prop_map(|(code, message)| Some(Payload::Error(ErrorMsg { code, message }))),
        (any::<u32>(), text(), any::<u64>(), any::<u32>()).prop_map(|(v, host, sid, max)| {
            Some(Payload::HostHello(HostHello {
                protocol_version: v,
                host_version: host,
                host_session_id: sid,
                max_frame_bytes: max,
            }))
        }),
        (
            any::<u64>(),
            text(),
            vec(text(), 0..4),
            vec(text(), 0..6),
            any::<u32>(),
            any::<i64>(),
        )
            .prop_map(|(sid, host, ips, caps, max, now)| {
                Some(Payload::AgentReady(AgentReady {
                    protocol_version: 1,
                    session_id: sid,
                    hostname: host,
                    ip_addresses: ips,
                    capabilities: caps,
                    limits: Some(Limits {
                        max_frame_bytes: max,
                        ..Limits::default()
                    }),
                    guest_unix_ns: now,
                    ..AgentReady::default()
                }))
            }),
        (
            vec(text(), 0..5),
            vec(text(), 0..3),
            text(),
            bytes(),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(|(argv, env, cwd, stdin, timeout_ms, stream)| {
                Some(Payload::ExecRequest(ExecRequest {
                    argv,
                    env,
                    cwd,
                    stdin,
                    timeout_ms,
                    stream,
                    ..ExecRequest::default()
                }))
            }),
        (any::<i32>(), bytes(), any::<u64>()).prop_map(|(stream, data, offset)| {
            Some(Payload::ExecOutput(ExecOutput {
                stream,
                data,
                offset,
            }))
        }),
        (
            any::<u32>(),
            any::<bool>(),
            any::<i32>(),
            any::<i32>(),
            bytes()
        )
            .prop_map(|(pid, exited, exit_code, signal, stdout)| {
                Some(Payload::ExecExit(ExecExit {
                    pid,
                    exited,
                    exit_code,
                    signal,
                    stdout,
                    ..ExecExit::default()
                }))
            }),
        (any::<u64>(), 0..=MAX_GEN_PAYLOAD - 64, any::<u64>()).prop_map(|(offset, n, seed)| {
            Some(Payload::FileChunk(FileChunk {
                offset,
                data: noise(n, seed),
            }))
        }),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (any::<u64>(), any::<u64>(), envelope_payload()).prop_map(|(id, correlation_id, payload)| {
        Envelope {
            id,
            correlation_id,
            payload,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    /// Frames interleaved with garbage, truncated frames and frames with garbage inside them,
    /// then a sync preamble of zero bytes, fed to a 1 MiB decoder in arbitrary reads:
    ///
    /// 1. Every whole frame (one that no garbage was inserted into and that was not cut
    ///    short) comes out, intact, in stream order. Nothing else comes out except, by
    ///    coincidence, a touched frame whose bytes happened to survive (for example a
    ///    single inserted byte equal to the byte it displaced), and then in its place in
    ///    the stream order.
    /// 2. A whole frame never comes out before its last byte has been fed.
    /// 3. A whole frame has come out by the time the decoder has been fed its last byte, or
    ///    the end of the longest payload claimed by a header (with a right checksum and an
    ///    acceptable length) that starts before it, whichever is later. So garbage between
    ///    frames, a partial magic, a plausible header or a truncated frame can delay a
    ///    following frame, but only until the bytes it claims have arrived (which the sync
    ///    preamble guarantees), and never destroys it.
    #[test]
    fn whole_frames_survive_garbage_and_truncation_in_order(s in stream(), chunks in chunking()) {
        let got = run(&s.bytes, DEFAULT_MAX_FRAME_BYTES, &chunks);
        let mut next = 0;
        for (out, &fed) in got.payloads.iter().zip(&got.fed_at) {
            // Which frame this is: one at or after `next` with this payload, reached without
            // passing over a whole frame. Payloads are distinct (see `Stream::build`); should
            // a truncation fix-up have made two equal, the later candidate is taken.
            let mut found = None;
            for (j, f) in s.frames.iter().enumerate().skip(next) {
                if &f.payload == out {
                    found = Some(j);
                }
                if f.whole {
                    break;
                }
            }
            let Some(i) = found else {
                panic!(
                    "a {}-byte payload came out that is no frame of the stream, or a whole frame \
                     before it was lost or reordered",
                    out.len()
                );
            };
            prop_assert!(fed >= s.frames[i].end, "frame at {} came out early", s.frames[i].start);
            if s.frames[i].whole {
                // It came out in the read that crossed its deadline, or earlier.
                let deadline = s.deadline(i);
                let crossing = got.boundaries.iter().copied().find(|&b| b >= deadline);
                prop_assert!(
                    crossing.is_some_and(|b| fed <= b),
                    "frame at {} came out after {} bytes, deadline {}",
                    s.frames[i].start, fed, deadline
                );
            }
            next = i + 1;
        }
        for f in &s.frames[next..] {
            prop_assert!(!f.whole, "whole frame at {} never came out", f.start);
        }
    }

    /// Any way of splitting the input into reads gives the same frames, counters and
    /// leftover as feeding it whole.
    #[test]
    fn chunking_does_not_change_the_output(s in stream(), chunks in chunking(), small in any::<bool>()) {
        let max = if small { MIN_MAX_FRAME_BYTES } else { DEFAULT_MAX_FRAME_BYTES };
        let whole = run(&s.bytes, max, &[s.bytes.len().max(1)]);
        let chunked = run(&s.bytes, max, &chunks);
        prop_assert_eq!(whole.payloads, chunked.payloads);
        prop_assert_eq!(whole.stats, chunked.stats);
        prop_assert_eq!(whole.leftover, chunked.leftover);
    }

    /// Arbitrary bytes (biased towards magic bytes and well-formed headers) never panic
    /// the decoder, never push its buffer past the limit, and never leave it full after
    /// `Ok(None)` (checked inside `run`); every frame it returns is a frame of the input.
    #[test]
    fn arbitrary_bytes_keep_the_decoder_bounded(
        parts in vec(prop_oneof![
            vec(any::<u8>(), 0..64),
            vec(prop_oneof![Just(0x51u8), Just(0x54), Just(0x58), Just(0x01), Just(0)], 0..64),
            garbage(),
            payload().prop_map(|p| frame(&p)),
        ], 0..24),
        chunks in chunking(),
        small in any::<bool>(),
    ) {
        let input: Vec<u8> = parts.concat();
        let max = if small { MIN_MAX_FRAME_BYTES } else { DEFAULT_MAX_FRAME_BYTES };
        let got = run(&input, max, &chunks);
        let mut cursor = 0;
        for p in &got.payloads {
            let f = frame(p);
            let at = input[cursor..].windows(f.len()).position(|w| w == f.as_slice());
            prop_assert!(at.is_some(), "decoded a frame that is not in the input (in order)");
            cursor += at.unwrap() + f.len();
        }
        prop_assert_eq!(got.stats.frames, got.payloads.len() as u64);
    }

    /// Reading straight into [`Decoder::spare`] with short reads (a read may fill less than
    /// it was offered, or nothing) gives the same frames and counters as [`Decoder::push`].
    #[test]
    fn short_reads_into_spare_match_push(
        s in stream(),
        reads in vec((0..70_000usize, any::<prop::sample::Index>()), 1..16),
    ) {
        let want = run(&s.bytes, DEFAULT_MAX_FRAME_BYTES, &[4096]);
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut payloads = Vec::new();
        let mut fed = 0;
        let mut reads = reads.iter().cycle();
        let mut idle = 0;
        while fed < s.bytes.len() {
            let &(offer, ref fill) = reads.next().unwrap();
            let spare = dec.spare(offer);
            prop_assert!(spare.len() <= offer);
            // A read of 0 bytes is allowed; the loop still ends because some reads fill.
            let n = fill.index(spare.len() + 1).min(s.bytes.len() - fed);
            spare[..n].copy_from_slice(&s.bytes[fed..fed + n]);
            dec.commit(n);
            fed += n;
            idle = if n == 0 { idle + 1 } else { 0 };
            prop_assume!(idle < 64);
            loop {
                match dec.decode() {
                    Ok(Some(p)) => payloads.push(p.to_vec()),
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            prop_assert!(dec.room() > 0);
        }
        prop_assert_eq!(payloads, want.payloads);
        prop_assert_eq!(dec.stats(), want.stats);
        prop_assert_eq!(dec.buffered(), want.leftover);
    }

    /// For any maximum, a payload of exactly that size is accepted and one byte more is
    /// refused from its header; a frame after the refused one comes out.
    #[test]
    fn the_limit_is_inclusive_and_exact(max in MIN_MAX_FRAME_BYTES..=70_000u32, fill in any::<u8>()) {
        let at_limit = vec![fill; max as usize];
        let over = vec![fill; max as usize + 1];
        let mut input = frame(&at_limit);
        input.extend(frame(&over));
        input.extend(frame(b"after"));
        let got = run(&input, max, &[1000]);
        prop_assert_eq!(got.payloads, vec![at_limit, b"after".to_vec()]);
        prop_assert_eq!(got.stats.oversized, 1);
    }

    /// Any envelope encodes to a frame of `encoded_frame_len` bytes that decodes, through a
    /// decoder fed in arbitrary reads, back to the same envelope.
    #[test]
    fn envelopes_round_trip_through_frames(envs in vec(envelope(), 1..6), chunks in chunking()) {
        let mut stream = Vec::new();
        for env in &envs {
            let n = encode_envelope(env, DEFAULT_MAX_FRAME_BYTES, &mut stream).unwrap();
            prop_assert_eq!(n, encoded_frame_len(env));
        }
        let got = run(&stream, DEFAULT_MAX_FRAME_BYTES, &chunks);
        prop_assert_eq!(got.leftover, 0);
        let decoded: Vec<Envelope> =
            got.payloads.iter().map(|p| decode_envelope(p).unwrap()).collect();
        prop_assert_eq!(decoded, envs);
        prop_assert_eq!(got.stats.garbage_bytes, 0);
    }

    /// The agent's decoder takes whatever the full decoder takes (an envelope, one with bytes
    /// after it, bytes alone), with the same ids and payload kind; it gives back the envelope
    /// itself unless its payload is one only the agent sends, which comes back empty.
    #[test]
    fn the_agents_decoder_agrees_with_the_full_one(
        env in envelope(),
        junk in vec(any::<u8>(), 0..64),
    ) {
        let bytes = prost::Message::encode_to_vec(&env);
        for input in [bytes.clone(), [bytes.as_slice(), &junk].concat(), junk.clone()] {
            let host = decode_host_envelope(&input);
            if let Ok(full) = decode_envelope(&input) {
                let h = host.unwrap();
                prop_assert_eq!((h.id, h.correlation_id), (full.id, full.correlation_id));
                prop_assert_eq!(envelope_payload_name(&h), envelope_payload_name(&full));
            }
        }
        let h = decode_host_envelope(&bytes).unwrap();
        let empty = match (&env.payload, &h.payload) {
            (Some(Payload::AgentReady(_)), Some(Payload::AgentReady(m))) => {
                *m == AgentReady::default()
            }
            (Some(Payload::ExecExit(_)), Some(Payload::ExecExit(m))) => {
                *m == ExecExit::default()
            }
            (Some(Payload::ExecOutput(_)), Some(Payload::ExecOutput(m))) => {
                *m == ExecOutput::default()
            }
            (Some(Payload::FileChunk(_)), Some(Payload::FileChunk(m))) => {
                *m == FileChunk::default()
            }
            _ => {
                prop_assert_eq!(&h, &env);
                true
            }
        };
        prop_assert!(empty, "{h:?}");
        prop_assert_eq!((h.id, h.correlation_id), (env.id, env.correlation_id));
    }
}
