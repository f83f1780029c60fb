//! Sans-io frame codec: bytes in, frames out. No file descriptors, no async runtime.
//!
//! A frame is a 16-byte header followed by the payload (one protobuf `Envelope`):
//!
//! ```text
//! offset  size  field
//!      0     4  magic 51 54 58 01 ("QTX" + protocol version 1)
//!      4     4  payload length, u32 big-endian
//!      8     4  CRC32C of the payload, u32 big-endian
//!     12     4  CRC32C of header bytes 0..12, u32 big-endian
//!     16     n  payload
//! ```
//!
//! The header checksum lets the [`Decoder`] reject a corrupted or absurd length from the
//! header alone: it never waits for a payload that a damaged header promised. Lengths above
//! the receiver's maximum are refused before anything is allocated. After any damage the
//! decoder resynchronises by scanning for the next magic, starting one byte after the damaged
//! frame's magic, so a valid frame hidden inside garbage (or after a truncated frame) is found.
//!
//! docs/protocol.md is the normative description, with test vectors.

use std::time::{Duration, Instant};
use thiserror::Error;

/// "QTX" followed by the protocol version.
pub const MAGIC: [u8; 4] = [0x51, 0x54, 0x58, 0x01];
/// Size of the fixed frame header.
pub const HEADER_BYTES: usize = 16;
/// Default and upper bound for the payload size a receiver accepts.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1024 * 1024;
/// The smallest maximum a peer may announce; every fixed-size message fits in it.
pub const MIN_MAX_FRAME_BYTES: u32 = 4096;

/// Computes the CRC32C (Castagnoli) checksum used for headers and payloads.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The CRC32C of `a ++ b` from `crc_a` and `crc_b`, `b` being `len_b` bytes long.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    crc32c::crc32c_combine(crc_a, crc_b, len_b)
}

/// Extends `crc` (the CRC32C of earlier bytes; 0 for none) over `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// The CRC32C of `payload`, whose last `tail_len` bytes have CRC32C `tail_crc`: only the
/// bytes before them are read. (A transfer's data is the last field of its message, and its
/// CRC32C is already known: the frame's checksum is built from it, not computed again.)
pub fn crc32c_with_tail(payload: &[u8], tail_len: usize, tail_crc: u32) -> u32 {
    match payload.len().checked_sub(tail_len) {
        Some(head) => crc32c::crc32c_combine(crc32c(&payload[..head]), tail_crc, tail_len),
        None => crc32c(payload),
    }
}

/// The CRC32C of the last `tail_len` bytes of `payload`, from the whole payload's
/// (`payload_crc`, as a frame header carries it): only the bytes before them are read.
pub fn tail_crc32c(payload: &[u8], payload_crc: u32, tail_len: usize) -> u32 {
    match payload.len().checked_sub(tail_len) {
        // crc(head ++ tail) = shift(crc(head), len(tail)) ^ crc(tail), and combining with a
        // zero CRC is that shift alone.
        Some(head) => payload_crc ^ crc32c::crc32c_combine(crc32c(&payload[..head]), 0, tail_len),
        None => crc32c(payload),
    }
}

/// Builds the 16-byte header for `payload`.
pub fn frame_header(payload: &[u8]) -> Result<[u8; HEADER_BYTES], EncodeError> {
    header_with_crc(payload.len(), crc32c(payload))
}

/// Builds the 16-byte header for a payload of `len` bytes whose CRC32C is `payload_crc`.
pub fn header_with_crc(len: usize, payload_crc: u32) -> Result<[u8; HEADER_BYTES], EncodeError> {
    let len = u32::try_from(len).map_err(|_| EncodeError::TooLarge {
        len,
        max: DEFAULT_MAX_FRAME_BYTES,
    })?;
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..8].copy_from_slice(&len.to_be_bytes());
    header[8..12].copy_from_slice(&payload_crc.to_be_bytes());
    let hcrc = crc32c(&header[0..12]);
    header[12..16].copy_from_slice(&hcrc.to_be_bytes());
    Ok(header)
}

/// Appends one whole frame carrying `payload` to `out`.
pub fn encode_frame(
    payload: &[u8],
    max_frame_bytes: u32,
    out: &mut Vec<u8>,
) -> Result<usize, EncodeError> {
    check_len(payload.len(), max_frame_bytes)?;
    let header = frame_header(payload)?;
    out.reserve(HEADER_BYTES + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(HEADER_BYTES + payload.len())
}

/// Writes one whole frame carrying `payload` at the start of `out`, or nothing at all.
/// Returns the number of bytes written.
pub fn encode_frame_into(
    payload: &[u8],
    max_frame_bytes: u32,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    check_len(payload.len(), max_frame_bytes)?;
    let total = HEADER_BYTES + payload.len();
    if out.len() < total {
        return Err(EncodeError::NoRoom {
            need: total,
            room: out.len(),
        });
    }
    let header = frame_header(payload)?;
    out[..HEADER_BYTES].copy_from_slice(&header);
    out[HEADER_BYTES..total].copy_from_slice(payload);
    Ok(total)
}

pub(crate) fn check_len(len: usize, max_frame_bytes: u32) -> Result<(), EncodeError> {
    if len > max_frame_bytes as usize {
        return Err(EncodeError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    Ok(())
}

/// Why a frame could not be encoded. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("payload of {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge { len: usize, max: u32 },
    #[error("frame needs {need} bytes but only {room} are free")]
    NoRoom { need: usize, room: usize },
}

/// Damage the decoder found and stepped over. The decoder has already resynchronised: call
/// [`Decoder::decode`] again to continue.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("skipped {bytes} bytes that were not part of any frame")]
    Garbage { bytes: usize },
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("frame length {len} exceeds the {max}-byte limit")]
    TooLarge { len: u32, max: u32 },
    #[error("payload checksum mismatch in a {len}-byte frame")]
    PayloadChecksum { len: u32 },
}

/// Counters a decoder keeps over its lifetime (across resets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderStats {
    pub frames: u64,
    pub payload_bytes: u64,
    pub garbage_bytes: u64,
    pub bad_headers: u64,
    pub oversized: u64,
    pub bad_payloads: u64,
    /// Started frames whose rest did not arrive within the frame deadline.
    pub abandoned: u64,
}

/// Incremental frame decoder with a bounded buffer.
///
/// Feed bytes with [`Decoder::spare`] + [`Decoder::commit`] (read straight into the buffer)
/// or [`Decoder::push`], then call [`Decoder::decode`] until it returns `Ok(None)`.
/// The buffer never holds more than `HEADER_BYTES + max_frame_bytes` bytes, and after
/// `decode` has returned `Ok(None)` there is always room for at least one more byte.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame_bytes: u32,
    /// Garbage skipped but not yet reported.
    pending_garbage: usize,
    /// Stream position of `buf[start]`: every byte consumed so far, frames and garbage.
    consumed: u64,
    /// A started frame waiting for its rest: its stream position, and when it is abandoned.
    partial: Option<(u64, Instant)>,
    stats: DecoderStats,
}

/// Bytes a buffer grows by when it needs room; also the initial allocation.
const GROW_STEP_BYTES: usize = 8192;

impl Decoder {
    /// A decoder accepting payloads up to `max_frame_bytes` (clamped to
    /// [`MIN_MAX_FRAME_BYTES`]..=[`DEFAULT_MAX_FRAME_BYTES`]).
    pub fn new(max_frame_bytes: u32) -> Self {
        let max_frame_bytes = max_frame_bytes.clamp(MIN_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_BYTES);
        Decoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_frame_bytes,
            pending_garbage: 0,
            consumed: 0,
            partial: None,
            stats: DecoderStats::default(),
        }
    }

    /// The largest payload this decoder accepts.
    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// Most bytes the buffer can ever hold.
    pub fn capacity_limit(&self) -> usize {
        HEADER_BYTES + self.max_frame_bytes as usize
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// How many more bytes can be accepted right now.
    pub fn room(&self) -> usize {
        self.capacity_limit() - self.buffered()
    }

    /// Lifetime counters.
    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Drops everything buffered (a new connection starts from a clean slate).
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.pending_garbage = 0;
        self.partial = None;
    }

    /// Returns writable space (at most `want` bytes, at least one byte when `room() > 0`) at
    /// the end of the buffer. Bytes written there become input after [`Decoder::commit`].
    pub fn spare(&mut self, want: usize) -> &mut [u8] {
        let want = want.min(self.room());
        if self.buf.len() - self.end < want {
            // Move the unconsumed bytes to the front before growing.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < want {
                let target = (self.end + want.max(GROW_STEP_BYTES)).min(self.capacity_limit());
                self.buf.resize(target, 0);
            }
        }
        let avail = (self.buf.len() - self.end).min(want);
        &mut self.buf[self.end..self.end + avail]
    }

    /// Frees the buffer when nothing is buffered, so that an idle connection holds none (the
    /// next [`Decoder::spare`] allocates again). Keeps everything else: counters, position.
    pub fn release_if_empty(&mut self) {
        if self.start == self.end {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    /// Marks `n` bytes written into [`Decoder::spare`] as input.
    pub fn commit(&mut self, n: usize) {
        assert!(
            self.end + n <= self.buf.len(),
            "commit past the spare region"
        );
        self.end += n;
    }

    /// Copies as much of `data` as fits; returns how many bytes were taken.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let mut taken = 0;
        while taken < data.len() {
            let spare = self.spare(data.len() - taken);
            if spare.is_empty() {
                break;
            }
            let n = spare.len();
            spare.copy_from_slice(&data[taken..taken + n]);
            self.commit(n);
            taken += n;
        }
        taken
    }

    /// Returns the next whole frame's payload, `Ok(None)` when more bytes are needed, or the
    /// damage it just stepped over (call again to continue).
    pub fn decode(&mut self) -> Result<Option<&[u8]>, FrameError> {
        Ok(self.decode_with_crc()?.map(|(payload, _)| payload))
    }

    /// As [`Decoder::decode`], with the payload's CRC32C as its checked header carries it
    /// (with [`tail_crc32c`], the CRC32C of a field encoded at the payload's end).
    pub fn decode_with_crc(&mut self) -> Result<Option<(&[u8], u32)>, FrameError> {
        let window = &self.buf[self.start..self.end];
        // 1. Find the magic; everything before it is garbage.
        let skip = match find_magic(window) {
            Some(at) => at,
            None => window.len() - magic_prefix_len(window),
        };
        if skip > 0 {
            self.start += skip;
            self.consumed += skip as u64;
            self.pending_garbage += skip;
            self.stats.garbage_bytes += skip as u64;
        }
        self.flush_garbage()?;
        let window = &self.buf[self.start..self.end];
        if window.len() < HEADER_BYTES {
            return Ok(None);
        }

        // 2. Check the header on its own.
        let header = &window[..HEADER_BYTES];
        let len = be_u32(&header[4..8]);
        let payload_crc = be_u32(&header[8..12]);
        let header_crc = be_u32(&header[12..16]);
        if crc32c(&header[..12]) != header_crc {
            self.stats.bad_headers += 1;
            self.step_over_magic();
            return Err(FrameError::HeaderChecksum);
        }
        if len > self.max_frame_bytes {
            self.stats.oversized += 1;
            self.step_over_magic();
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }

        // 3. Wait for the whole payload, then check it.
        let total = HEADER_BYTES + len as usize;
        if window.len() < total {
            return Ok(None);
        }
        let payload = &window[HEADER_BYTES..total];
        if crc32c(payload) != payload_crc {
            self.stats.bad_payloads += 1;
            self.step_over_magic();
            return Err(FrameError::PayloadChecksum { len });
        }
        let payload_start = self.start + HEADER_BYTES;
        self.start += total;
        self.consumed += total as u64;
        if self.start == self.end {
            // Everything is consumed: the next read starts at the front again. The
            // payload returned below stays intact until `spare` is next called, which the
            // borrow on `self` prevents while it is alive.
            self.start = 0;
            self.end = 0;
        }
        self.stats.frames += 1;
        self.stats.payload_bytes += u64::from(len);
        Ok(Some((
            &self.buf[payload_start..payload_start + len as usize],
            payload_crc,
        )))
    }

    /// Resynchronise after a damaged header or payload: the byte after this magic is where
    /// the search for the next frame starts. The skipped magic byte counts as garbage.
    fn step_over_magic(&mut self) {
        self.start += 1;
        self.consumed += 1;
        self.pending_garbage += 1;
        self.stats.garbage_bytes += 1;
    }

    /// Call after [`Decoder::decode`] returned `Ok(None)`: the time at which the frame begun
    /// in the buffer, if any, is abandoned unless its rest arrives first. A frame seen waiting
    /// for the first time gets `now + frame_deadline`; it keeps that deadline while it waits.
    /// Time is an input: the caller reads the clock and arms its own timer.
    pub fn partial_deadline(&mut self, now: Instant, frame_deadline: Duration) -> Option<Instant> {
        if self.buffered() == 0 {
            self.partial = None;
            return None;
        }
        match self.partial {
            Some((pos, at)) if pos == self.consumed => Some(at),
            _ => {
                let at = now + frame_deadline;
                self.partial = Some((self.consumed, at));
                Some(at)
            }
        }
    }

    /// Abandons the started frame whose deadline is at or before `now`: the search for the
    /// next frame restarts at the byte after its magic, so the frames its announced length
    /// swallowed are found. Returns whether a frame was abandoned; call [`Decoder::decode`]
    /// again after it.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        match self.partial {
            Some((pos, at)) if pos == self.consumed && at <= now && self.buffered() > 0 => {
                self.partial = None;
                self.stats.abandoned += 1;
                self.step_over_magic();
                true
            }
            _ => false,
        }
    }

    fn flush_garbage(&mut self) -> Result<(), FrameError> {
        if self.pending_garbage > 0 {
            let bytes = std::mem::take(&mut self.pending_garbage);
            return Err(FrameError::Garbage { bytes });
        }
        Ok(())
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Offset of the first complete magic in `data`.
fn find_magic(data: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = data[from..].iter().position(|&b| b == MAGIC[0]) {
        let at = from + pos;
        if data.len() - at < MAGIC.len() {
            return None;
        }
        if data[at..at + MAGIC.len()] == MAGIC {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Length of the longest suffix of `data` that is a proper prefix of the magic.
fn magic_prefix_len(data: &[u8]) -> usize {
    (1..MAGIC.len())
        .rev()
        .find(|&n| data.len() >= n && data[data.len() - n..] == MAGIC[..n])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(payload, DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
        out
    }

    /// Drains every frame and error currently decodable.
    fn drain(dec: &mut Decoder) -> (Vec<Vec<u8>>, Vec<FrameError>) {
        let mut frames = Vec::new();
        let mut errors = Vec::new();
        loop {
            match dec.decode() {
                Ok(Some(p)) => frames.push(p.to_vec()),
                Ok(None) => return (frames, errors),
                Err(e) => errors.push(e),
            }
        }
    }

    #[test]
    fn an_empty_decoder_releases_its_buffer_and_keeps_a_partial_frame() {
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let f = frame(b"hello");
        dec.push(&f);
        dec.push(&f[..7]);
        assert_eq!(drain(&mut dec).0, vec![b"hello".to_vec()]);
        // A started frame is kept whole.
        dec.release_if_empty();
        assert_eq!(dec.buffered(), 7);
        dec.push(&f[7..]);
        assert_eq!(drain(&mut dec).0, vec![b"hello".to_vec()]);
        dec.release_if_empty();
        assert_eq!(dec.buffered(), 0);
        assert_eq!(
            dec.buf.capacity(),
            0,
            "an empty decoder still holds its buffer"
        );
        // And it decodes on from there, its counters intact.
        dec.push(&[0x5a; 3]);
        dec.push(&f);
        assert_eq!(drain(&mut dec).0, vec![b"hello".to_vec()]);
        assert_eq!(dec.stats().garbage_bytes, 3);
    }

    #[test]
    fn header_layout_matches_the_document() {
        let f = frame(b"hi");
        assert_eq!(&f[0..4], &MAGIC);
        assert_eq!(&f[4..8], &[0, 0, 0, 2]);
        assert_eq!(be_u32(&f[8..12]), crc32c(b"hi"));
        assert_eq!(be_u32(&f[12..16]), crc32c(&f[0..12]));
        assert_eq!(&f[16..], b"hi");
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The standard check value for CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn whole_frame_decodes() {
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&frame(b"hello"));
        assert_eq!(dec.decode().unwrap(), Some(&b"hello"[..]));
        assert_eq!(dec.decode().unwrap(), None);
    }

    #[test]
    fn empty_payload_is_a_frame() {
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&frame(b""));
        assert_eq!(dec.decode().unwrap(), Some(&b""[..]));
    }

    #[test]
    fn byte_at_a_time_is_not_yet_until_the_last_byte() {
        let f = frame(b"split across many reads");
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        for (i, b) in f.iter().enumerate() {
            dec.push(&[*b]);
            let got = dec.decode().unwrap().map(<[u8]>::to_vec);
            if i + 1 < f.len() {
                assert_eq!(got, None, "frame surfaced early at byte {i}");
            } else {
                assert_eq!(got.as_deref(), Some(&b"split across many reads"[..]));
            }
        }
    }

    #[test]
    fn leading_garbage_is_reported_then_skipped() {
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut input = b"noise!".to_vec();
        input.extend(frame(b"x"));
        dec.push(&input);
        let (frames, errors) = drain(&mut dec);
        assert_eq!(frames, vec![b"x".to_vec()]);
        assert_eq!(errors, vec![FrameError::Garbage { bytes: 6 }]);
        assert_eq!(dec.stats().garbage_bytes, 6);
    }

    #[test]
    fn absurd_length_is_refused_from_the_header_alone() {
        // The "1.3 GB hallucination": a header that claims a huge payload, correctly
        // checksummed, must be refused at once, not waited for.
        let mut hdr = [0u8; HEADER_BYTES];
        hdr[0..4].copy_from_slice(&MAGIC);
        hdr[4..8].copy_from_slice(&0x5154_5801u32.to_be_bytes());
        let c = crc32c(&hdr[..12]);
        hdr[12..16].copy_from_slice(&c.to_be_bytes());
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&hdr);
        assert_eq!(
            dec.decode(),
            Err(FrameError::TooLarge {
                len: 0x5154_5801,
                max: DEFAULT_MAX_FRAME_BYTES
            })
        );
        let (frames, _) = drain(&mut dec);
        assert!(frames.is_empty());
        // Nothing big was allocated for it.
        assert!(dec.buf.len() <= GROW_STEP_BYTES);
    }

    #[test]
    fn corrupted_length_fails_the_header_checksum() {
        let mut f = frame(b"payload");
        f[5] ^= 0x40;
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&f);
        assert_eq!(dec.decode(), Err(FrameError::HeaderChecksum));
    }

    #[test]
    fn corrupted_payload_is_dropped_and_the_next_frame_survives() {
        let mut input = frame(b"first");
        input[HEADER_BYTES] ^= 1;
        input.extend(frame(b"second"));
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&input);
        let (frames, errors) = drain(&mut dec);
        assert_eq!(frames, vec![b"second".to_vec()]);
        assert_eq!(errors[0], FrameError::PayloadChecksum { len: 5 });
        assert!(matches!(errors[1], FrameError::Garbage { .. }));
    }

    #[test]
    fn magic_inside_the_length_field_resynchronises() {
        // A stray magic, then a real frame whose header starts inside the stray "length".
        let real = frame(b"real");
        let mut input = MAGIC.to_vec();
        input.extend_from_slice(&real);
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&input);
        let (frames, errors) = drain(&mut dec);
        assert_eq!(frames, vec![b"real".to_vec()]);
        assert_eq!(errors[0], FrameError::HeaderChecksum);
    }

    #[test]
    fn frame_hidden_after_a_truncated_frame_is_recovered() {
        // A frame cut short (its sender died) followed by whole frames: once enough bytes
        // arrive to fill the truncated frame's length, its checksum fails and the scan finds
        // the whole frames inside.
        let big = vec![7u8; 64];
        let truncated = frame(&big)[..30].to_vec();
        let mut input = truncated;
        for i in 0..5u8 {
            input.extend(frame(&[i; 20]));
        }
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&input);
        let (frames, _) = drain(&mut dec);
        assert_eq!(frames.len(), 5);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f, &vec![i as u8; 20]);
        }
    }

    #[test]
    fn magic_in_a_payload_does_not_split_the_frame() {
        let mut payload = b"abc".to_vec();
        payload.extend(frame(b"inner"));
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&frame(&payload));
        let (frames, errors) = drain(&mut dec);
        assert_eq!(frames, vec![payload]);
        assert!(errors.is_empty());
    }

    #[test]
    fn partial_magic_at_the_end_is_kept() {
        let f = frame(b"z");
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut first = b"junk".to_vec();
        first.extend_from_slice(&f[..3]);
        dec.push(&first);
        assert_eq!(dec.decode(), Err(FrameError::Garbage { bytes: 4 }));
        assert_eq!(dec.decode(), Ok(None));
        assert_eq!(dec.buffered(), 3);
        dec.push(&f[3..]);
        assert_eq!(dec.decode().unwrap(), Some(&b"z"[..]));
    }

    #[test]
    fn buffer_is_bounded_and_always_has_room_after_draining() {
        let mut dec = Decoder::new(MIN_MAX_FRAME_BYTES);
        let limit = dec.capacity_limit();
        // Pure garbage forever: the buffer never exceeds its limit and never fills up.
        for _ in 0..1000 {
            let taken = dec.push(&[0xAB; 1000]);
            assert_eq!(taken, 1000);
            drain(&mut dec);
            assert!(dec.buffered() <= 3);
            assert!(dec.buf.len() <= limit);
        }
        // A maximum-size frame fits exactly.
        let big = vec![1u8; MIN_MAX_FRAME_BYTES as usize];
        let f = frame(&big);
        assert_eq!(dec.push(&f), f.len());
        assert_eq!(dec.decode().unwrap().map(<[u8]>::len), Some(big.len()));
        assert!(dec.room() > 0);
    }

    #[test]
    fn frame_above_the_decoder_limit_is_refused_before_buffering_it() {
        let mut dec = Decoder::new(MIN_MAX_FRAME_BYTES);
        let f = frame(&vec![0u8; MIN_MAX_FRAME_BYTES as usize + 1]);
        dec.push(&f[..HEADER_BYTES]);
        assert_eq!(
            dec.decode(),
            Err(FrameError::TooLarge {
                len: MIN_MAX_FRAME_BYTES + 1,
                max: MIN_MAX_FRAME_BYTES
            })
        );
    }

    #[test]
    fn reset_drops_a_half_frame() {
        let f = frame(b"stale");
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&f[..10]);
        assert_eq!(dec.decode(), Ok(None));
        dec.reset();
        dec.push(&frame(b"fresh"));
        assert_eq!(dec.decode().unwrap(), Some(&b"fresh"[..]));
    }

    #[test]
    fn encode_into_refuses_rather_than_truncates() {
        let mut small = [0u8; 10];
        assert_eq!(
            encode_frame_into(b"0123456789", DEFAULT_MAX_FRAME_BYTES, &mut small),
            Err(EncodeError::NoRoom { need: 26, room: 10 })
        );
        assert_eq!(small, [0u8; 10]);
        assert!(matches!(
            encode_frame(&[0u8; 5000], MIN_MAX_FRAME_BYTES, &mut Vec::new()),
            Err(EncodeError::TooLarge { len: 5000, .. })
        ));
    }

    #[test]
    fn started_frame_past_its_deadline_is_abandoned_and_the_frames_it_swallowed_are_read() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(2);
        let mut d = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        // A valid header announcing 48 KiB, 1 KiB of it, then two whole frames.
        let big = frame(&vec![7u8; 48 * 1024]);
        d.push(&big[..HEADER_BYTES + 1024]);
        d.push(&frame(b"pong"));
        d.push(&frame(b"telemetry"));
        assert_eq!(d.decode(), Ok(None));
        assert_eq!(d.partial_deadline(t0, limit), Some(t0 + limit));
        // Still waiting later: the deadline does not move.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(d.partial_deadline(later, limit), Some(t0 + limit));
        assert!(!d.handle_timeout(later));
        assert!(d.handle_timeout(t0 + limit));
        assert_eq!(d.stats().abandoned, 1);
        let mut got = Vec::new();
        loop {
            match d.decode() {
                Ok(Some(p)) => got.push(p.to_vec()),
                Ok(None) => break,
                Err(_) => continue,
            }
        }
        assert_eq!(got, vec![b"pong".to_vec(), b"telemetry".to_vec()]);
        assert_eq!(d.partial_deadline(t0 + limit, limit), None);
    }

    #[test]
    fn frame_completing_before_its_deadline_is_kept_and_the_next_gets_a_new_deadline() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(2);
        let mut d = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        let f = frame(b"slow frame");
        d.push(&f[..10]);
        assert_eq!(d.decode(), Ok(None));
        assert_eq!(d.partial_deadline(t0, limit), Some(t0 + limit));
        d.push(&f[10..]);
        d.push(&f[..10]);
        assert_eq!(d.decode(), Ok(Some(&b"slow frame"[..])));
        assert_eq!(d.decode(), Ok(None));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(d.partial_deadline(t1, limit), Some(t1 + limit));
        assert!(!d.handle_timeout(t0 + limit));
        assert_eq!(d.stats().abandoned, 0);
    }
}
