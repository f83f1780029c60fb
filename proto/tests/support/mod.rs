//! Reads and checks `proto/testdata/vectors.txt`. Shared, via `#[path]`, by the vector tests
//! of qx-proto, the guest agent and the host daemon, so that each crate's own build of
//! `qx_proto` is held to the same bytes.
//!
//! The file format is described at the top of the file itself. The checks here do not trust
//! the codec for checksums: [`crc32c_bitwise`] is an independent, bit-at-a-time CRC-32C.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use qx_proto::agent::{envelope::Payload, Ack, AgentReady, Envelope, Limits, Ping, Pong};
use qx_proto::codec::{encode_frame, Decoder, FrameError};
use qx_proto::{decode_envelope, encode_envelope, DEFAULT_MAX_FRAME_BYTES, HEADER_BYTES, MAGIC};

/// The vectors file, relative to any crate directory of the workspace.
pub const VECTORS_PATH: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/testdata/vectors.txt");

/// One record of the vectors file.
#[derive(Debug, Clone, Default)]
pub struct Vector {
    pub name: String,
    pub note: String,
    /// The byte stream fed to a decoder.
    pub input: Vec<u8>,
    /// The bytes of each `frame` line (each one whole frame; they are also part of `input`).
    pub frames: Vec<Vec<u8>>,
    /// True when `input` is exactly one `frame` line: the encoding of the one payload.
    pub is_frame: bool,
    /// Payloads a decoder must produce, in order.
    pub payloads: Vec<Vec<u8>>,
    /// The damage this decoder reports, in order (see [`error_token`]).
    pub errors: Option<Vec<String>>,
    /// The first payload as an `Envelope`, in the `key=value` form of the file.
    pub envelope: Option<String>,
    /// Bytes the decoder still holds after the whole input.
    pub leftover: Option<usize>,
}

/// Parses the checked-in vectors file.
pub fn load() -> Vec<Vector> {
    let text = std::fs::read_to_string(VECTORS_PATH)
        .unwrap_or_else(|e| panic!("cannot read {VECTORS_PATH}: {e}"));
    parse(&text)
}

/// Parses vectors text (records separated by blank lines, `#` comments).
pub fn parse(text: &str) -> Vec<Vector> {
    let mut out = Vec::new();
    let mut cur: Option<Vector> = None;
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.starts_with('#') {
            continue;
        }
        if line.is_empty() {
            out.extend(cur.take());
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("line {}: no `key:`", lineno + 1));
        let value = value.trim();
        let v = cur.get_or_insert_with(Vector::default);
        match key {
            "name" => v.name = value.to_string(),
            "note" => v.note = value.to_string(),
            "input" => v.input.extend(bytes(value)),
            "frame" => {
                let frame = bytes(value);
                v.input.extend(&frame);
                v.frames.push(frame);
            }
            "payload" => v.payloads.push(bytes(value)),
            "errors" => v.errors = Some(value.split_whitespace().map(str::to_string).collect()),
            "envelope" => v.envelope = Some(value.to_string()),
            "leftover" => v.leftover = Some(value.parse().unwrap()),
            other => panic!("line {}: unknown key {other:?}", lineno + 1),
        }
    }
    out.extend(cur);
    for v in &mut out {
        assert!(!v.name.is_empty(), "a record without a name");
        v.is_frame = v.frames.len() == 1 && v.frames[0] == v.input;
    }
    out
}

/// Decodes a token list: hex digits, `zeros*N` or `pattern*N` (byte i = i mod 251).
pub fn bytes(tokens: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for tok in tokens.split_whitespace() {
        if let Some(n) = tok.strip_prefix("zeros*") {
            out.resize(out.len() + n.parse::<usize>().unwrap(), 0);
        } else if let Some(n) = tok.strip_prefix("pattern*") {
            out.extend(pattern(n.parse().unwrap()));
        } else {
            assert!(tok.len() % 2 == 0, "odd hex token {tok:?}");
            for i in (0..tok.len()).step_by(2) {
                out.push(u8::from_str_radix(&tok[i..i + 2], 16).unwrap());
            }
        }
    }
    out
}

/// `n` bytes where byte i is `i mod 251` (a prime, so the pattern does not line up with
/// powers of two).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF),
/// one bit at a time: independent of the table-driven/hardware one in the codec.
pub fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The frame for `payload`, built by hand from the documented layout (not by the codec).
pub fn frame_by_hand(payload: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.extend((payload.len() as u32).to_be_bytes());
    f.extend(crc32c_bitwise(payload).to_be_bytes());
    let hcrc = crc32c_bitwise(&f);
    f.extend(hcrc.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// How an error is written in the `errors:` line.
pub fn error_token(e: &FrameError) -> String {
    match e {
        FrameError::Garbage { bytes } => format!("garbage:{bytes}"),
        FrameError::HeaderChecksum => "header_checksum".to_string(),
        FrameError::TooLarge { len, .. } => format!("too_large:{len}"),
        FrameError::PayloadChecksum { len } => format!("payload_checksum:{len}"),
    }
}

/// What a decoder made of a stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub payloads: Vec<Vec<u8>>,
    pub errors: Vec<String>,
    pub leftover: usize,
}

/// Feeds `input` to a default decoder in `chunk`-byte reads, draining after each read.
pub fn decode_stream(input: &[u8], chunk: usize) -> Decoded {
    let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut payloads = Vec::new();
    let mut errors = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        let mut piece = piece;
        while !piece.is_empty() {
            let taken = dec.push(piece);
            piece = &piece[taken..];
            loop {
                match dec.decode() {
                    Ok(Some(p)) => payloads.push(p.to_vec()),
                    Ok(None) => break,
                    Err(e) => errors.push(error_token(&e)),
                }
            }
        }
    }
    Decoded {
        payloads,
        errors,
        leftover: dec.buffered(),
    }
}

/// Builds the `Envelope` an `envelope:` line describes: `id=N correlation_id=N payload=KIND`
/// followed by the payload's fields as `key=value` (lists comma-separated, `limits.*` for the
/// nested Limits). Only the kinds the vectors use are known.
pub fn envelope_from_text(text: &str) -> Envelope {
    let mut env = Envelope::default();
    let mut kind = "";
    let mut fields = Vec::new();
    for kv in text.split_whitespace() {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("bad field {kv:?}"));
        match k {
            "id" => env.id = v.parse().unwrap(),
            "correlation_id" => env.correlation_id = v.parse().unwrap(),
            "payload" => kind = v,
            _ => fields.push((k, v)),
        }
    }
    let list = |v: &str| v.split(',').map(str::to_string).collect::<Vec<_>>();
    env.payload = match kind {
        "ping" | "pong" => {
            let mut seq = 0;
            for (k, v) in fields {
                assert_eq!(k, "seq", "unknown {kind} field");
                seq = v.parse().unwrap();
            }
            Some(if kind == "ping" {
                Payload::Ping(Ping { seq })
            } else {
                Payload::Pong(Pong { seq })
            })
        }
        "ack" => {
            assert!(fields.is_empty(), "ack has no fields");
            Some(Payload::Ack(Ack {}))
        }
        "agent_ready" => {
            let mut r = AgentReady::default();
            let mut limits = Limits::default();
            for (k, v) in fields {
                match k {
                    "protocol_version" => r.protocol_version = v.parse().unwrap(),
                    "agent_version" => r.agent_version = v.to_string(),
                    "session_id" => {
                        r.session_id = u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
                    }
                    "os_id" => r.os_id = v.to_string(),
                    "os_version" => r.os_version = v.to_string(),
                    "kernel_release" => r.kernel_release = v.to_string(),
                    "arch" => r.arch = v.to_string(),
                    "hostname" => r.hostname = v.to_string(),
                    "ip_addresses" => r.ip_addresses = list(v),
                    "capabilities" => r.capabilities = list(v),
                    "limits.max_frame_bytes" => limits.max_frame_bytes = v.parse().unwrap(),
                    other => panic!("unknown agent_ready field {other:?}"),
                }
            }
            r.limits = Some(limits);
            Some(Payload::AgentReady(r))
        }
        "none" => None,
        other => panic!("unknown payload kind {other:?}"),
    };
    env
}

/// Every check one vector supports, against the `qx_proto` this test crate links.
pub fn check(v: &Vector) {
    let name = &v.name;
    // The stream decodes to exactly the listed payloads, fed whole or a byte at a time or in
    // odd-sized reads.
    let whole = decode_stream(&v.input, v.input.len());
    assert_eq!(
        whole.payloads.len(),
        v.payloads.len(),
        "{name}: number of payloads"
    );
    assert!(whole.payloads == v.payloads, "{name}: payload bytes differ");
    if let Some(errors) = &v.errors {
        assert_eq!(&whole.errors, errors, "{name}: reported damage");
    }
    if let Some(leftover) = v.leftover {
        assert_eq!(whole.leftover, leftover, "{name}: bytes left buffered");
    }
    for chunk in [1, 7, 4096] {
        let got = decode_stream(&v.input, chunk);
        assert!(
            got.payloads == whole.payloads,
            "{name}: payloads differ when read {chunk} bytes at a time"
        );
        assert_eq!(
            got.leftover, whole.leftover,
            "{name}: leftover, chunk {chunk}"
        );
    }
    // Every `frame` line is one whole frame in the documented layout, and the encoder
    // writes exactly those bytes for its payload.
    for frame in &v.frames {
        assert!(
            frame.len() >= HEADER_BYTES,
            "{name}: frame shorter than a header"
        );
        let payload = &frame[HEADER_BYTES..];
        assert!(
            *frame == frame_by_hand(payload),
            "{name}: frame bytes are not the documented layout"
        );
        let mut encoded = Vec::new();
        encode_frame(payload, DEFAULT_MAX_FRAME_BYTES, &mut encoded).unwrap();
        assert!(encoded == *frame, "{name}: encoder output differs");
    }
    if v.is_frame {
        assert_eq!(
            v.payloads.len(),
            1,
            "{name}: a frame vector has one payload"
        );
        let payload = &v.payloads[0];
        assert!(
            v.input == frame_by_hand(payload),
            "{name}: frame bytes are not the documented layout"
        );
        let mut encoded = Vec::new();
        let n = encode_frame(payload, DEFAULT_MAX_FRAME_BYTES, &mut encoded).unwrap();
        assert_eq!(n, HEADER_BYTES + payload.len());
        assert!(encoded == v.input, "{name}: encoder output differs");
    }
    // The envelope decodes to what the text says and encodes back to the same payload.
    if let Some(text) = &v.envelope {
        let expected = envelope_from_text(text);
        let got = decode_envelope(&v.payloads[0]).unwrap();
        assert_eq!(got, expected, "{name}: decoded envelope");
        if v.is_frame {
            let mut encoded = Vec::new();
            encode_envelope(&expected, DEFAULT_MAX_FRAME_BYTES, &mut encoded).unwrap();
            assert!(
                encoded == v.input,
                "{name}: envelope encodes to other bytes"
            );
        }
    }
}

/// Checks every vector of the checked-in file; returns how many there were.
pub fn check_all() -> usize {
    let vectors = load();
    assert!(vectors.len() >= 8, "vectors file looks truncated");
    let mut names: Vec<&str> = vectors.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), vectors.len(), "duplicate vector names");
    for v in &vectors {
        check(v);
    }
    vectors.len()
}
