//! The outbox: every byte the agent sends, in a fixed-capacity buffer chosen at start-up.
//!
//! # Primer
//!
//! The port under the agent is a byte pipe that can stop taking bytes at any moment (the host
//! stopped reading, or went away: a virtio-serial `write()` then returns `EAGAIN`). The outbox
//! is what makes that harmless:
//!
//! - **Whole frames or nothing.** Every push encodes an envelope into one frame and queues all
//!   of it, or refuses it with [`OutboxError::Full`] (counted in [`OutboxStats::refused`]).
//!   Nothing ever queues a partial frame.
//! - **Exact progress.** [`Outbox::flush`] hands the sink at most [`MAX_WRITE_BYTES`] at a time
//!   and advances by exactly what the sink took. `WouldBlock` means "not now", never an error;
//!   `Interrupted` is retried. No deadline ever cuts a frame: there is no timeout in here.
//! - **One copy.** A frame is encoded once, straight into its own buffer (header, then the
//!   envelope, its data copied in from where it was read), and that buffer is what is
//!   written: it moves from lane to write position, it is not copied again. A small pool
//!   ([`SPARE_BUFFERS`]) reuses the buffers of frames that went out.
//! - **Three lanes.** The *reply lane* holds acks, replies, errors, stream items and pongs, in
//!   order, as whole frames of at most `capacity` bytes in all. The *hello slot* holds at most one
//!   AgentReady: a newer one replaces one that has not started going out, and it goes ahead of
//!   the reply lane. The *telemetry slot* holds at most one pushed telemetry frame, latest wins,
//!   so a host that stops reading costs one frame, not a backlog. Between frames the order is
//!   hello, reply lane, telemetry.
//! - **Admission, not refusal.** The reply lane is shared out so that a terminal reply never
//!   finds it full (docs/architecture.md, "Admission control"):
//!   - the session keeps [`SESSION_RESERVE_BYTES`] for its own frames (pongs, pings, an ack
//!     and a cached reply for a redelivered request), pushed with [`Outbox::push_session`];
//!   - a request is admitted only once [`Outbox::reserve`] has set aside the most its
//!     terminal reply can take; [`Outbox::push_terminal`] spends that reservation, and a
//!     reply that fits its reservation always fits the lane;
//!   - acks of new requests and stream items ([`Outbox::push_reply`]) use only what is left
//!     beyond both ([`Outbox::room`]).
//!
//!   The invariant `queued + reserved <= capacity` holds after every call, so a refused push
//!   means "wait until the host reads", never "drop".
//! - **A started frame is always finished.** The frame being written lives in its own buffer
//!   (`current`) until its last byte is taken, whatever happens meanwhile. When the host
//!   disconnects mid-frame the remainder stays there, and on the next connection the outbox
//!   finishes that frame *before* anything else, then sends the new AgentReady. The new host's
//!   decoder sees the tail as leading garbage and skips it; nothing after it is misparsed,
//!   because every later frame starts on a frame boundary. The alternative (dropping the tail)
//!   would leave the *old* host's half frame to swallow the start of the next frame on a
//!   device whose queue survives the reconnect, which is exactly the corruption the field report
//!   describes. A reply-lane frame taken up for writing of which the sink took nothing goes
//!   back to the head of the lane behind a new hello; while it sits in `current` it still
//!   counts against the lane, so moving it back never overfills the lane.
//!
//! Memory is bounded by `capacity + 3 * MAX_FRAME_TOTAL_BYTES` (the lane; the frame in
//! progress when it came from a slot; the hello and telemetry slots), plus the pool of
//! [`SPARE_BUFFERS`] empty frame buffers.

use std::collections::VecDeque;
use std::io::{self, Write};

use qx_proto::agent::Envelope;
use thiserror::Error;

/// The most bytes handed to one `write()` (a virtio-serial port takes at most 32 KiB per call).
pub const MAX_WRITE_BYTES: usize = 32 * 1024;
/// The largest payload the agent ever sends, so the host's 65552-byte sync preamble covers
/// any partial frame.
pub const SEND_MAX_FRAME_BYTES: u32 = qx_proto::MAX_SENT_PAYLOAD_BYTES;
/// Header plus largest payload.
pub const MAX_FRAME_TOTAL_BYTES: usize = qx_proto::HEADER_BYTES + SEND_MAX_FRAME_BYTES as usize;
/// Reply-lane bytes kept for the session's own frames: a redelivered request's ack and its
/// cached reply (up to one frame) fit in it together.
pub const SESSION_RESERVE_BYTES: usize = MAX_FRAME_TOTAL_BYTES + 1024;
/// The smallest reply lane: the session reserve plus one request's largest reply and its ack.
pub const MIN_CAPACITY_BYTES: usize = SESSION_RESERVE_BYTES + MAX_FRAME_TOTAL_BYTES + 1024;

/// Frame buffers kept for reuse once their frame went out.
pub const SPARE_BUFFERS: usize = 4;
/// Spare buffers up to this capacity are kept when the loop sheds the pool
/// ([`Outbox::shed_spares`]): enough for pings and replies, not a transfer's chunk frames.
pub const KEPT_SPARE_BYTES: usize = 4096;

/// Why a frame was not queued. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OutboxError {
    #[error("outbox is full: frame needs {need} bytes, {room} free")]
    Full { need: usize, room: usize },
    #[error("envelope does not fit in one frame")]
    TooLarge(#[from] qx_proto::EncodeError),
    #[error("reply of {need} bytes exceeds the {reserved} bytes reserved for it")]
    OverReservation { need: usize, reserved: usize },
    #[error("request {0} is not running")]
    NotRunning(u64),
}

/// Where the frame in progress came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Reply,
    Hello,
    Telemetry,
}

/// Counters over the outbox's lifetime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub frames_queued: u64,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Pushes refused because the reply lane was full (the caller waits and retries).
    pub refused: u64,
    /// Telemetry frames replaced by a newer sample before they went out.
    pub coalesced: u64,
}

/// Fixed-capacity, frame-preserving output buffer. See the module docs.
#[derive(Debug)]
pub struct Outbox {
    /// Reply lane: whole frames, oldest first.
    frames: VecDeque<Vec<u8>>,
    /// Bytes in `frames`.
    lane_bytes: usize,
    capacity: usize,
    /// Bytes set aside for the terminal replies of admitted requests.
    reserved: usize,
    /// Latest AgentReady not yet started (empty: none).
    hello: Vec<u8>,
    /// Latest telemetry frame not yet started.
    telemetry: Option<Vec<u8>>,
    /// The frame being written, where it came from, and how much of it the sink has taken.
    current: Vec<u8>,
    current_lane: Lane,
    current_pos: usize,
    /// Empty frame buffers for reuse.
    spare: Vec<Vec<u8>>,
    stats: OutboxStats,
}

impl Outbox {
    /// An outbox whose reply lane holds `capacity` bytes (raised to [`MIN_CAPACITY_BYTES`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(MIN_CAPACITY_BYTES);
        Outbox {
            frames: VecDeque::with_capacity(64),
            lane_bytes: 0,
            capacity,
            reserved: 0,
            hello: Vec::new(),
            telemetry: None,
            current: Vec::new(),
            current_lane: Lane::Reply,
            current_pos: 0,
            spare: Vec::with_capacity(SPARE_BUFFERS),
            stats: OutboxStats::default(),
        }
    }

    /// Reply-lane bytes queued, counting the unwritten rest of a lane frame in progress.
    fn queued(&self) -> usize {
        let in_progress = if self.current_lane == Lane::Reply {
            self.current.len() - self.current_pos
        } else {
            0
        };
        self.lane_bytes + in_progress
    }

    /// The reply-lane capacity, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes reserved for terminal replies not yet pushed.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Free bytes for acks, stream items and new reservations: what is left beyond the
    /// queued frames, the reservations and the session reserve.
    pub fn room(&self) -> usize {
        (self.capacity - SESSION_RESERVE_BYTES).saturating_sub(self.queued() + self.reserved)
    }

    /// Free bytes for the session's own frames (the session reserve included).
    pub fn session_room(&self) -> usize {
        self.capacity.saturating_sub(self.queued() + self.reserved)
    }

    /// Whether a request whose reply needs `bytes` could ever be admitted while the current
    /// reservations stand (false: only finishing requests makes room, not the host reading).
    pub fn could_reserve(&self, bytes: usize) -> bool {
        self.reserved + bytes <= self.capacity - SESSION_RESERVE_BYTES
    }

    /// Sets `bytes` aside for a terminal reply, or returns false (nothing reserved).
    pub fn reserve(&mut self, bytes: usize) -> bool {
        if bytes > self.room() {
            self.stats.refused += 1;
            return false;
        }
        self.reserved += bytes;
        true
    }

    /// Bytes waiting to be written (both lanes and the frame in progress).
    pub fn pending_bytes(&self) -> usize {
        self.lane_bytes
            + self.hello.len()
            + self.telemetry.as_ref().map_or(0, Vec::len)
            + (self.current.len() - self.current_pos)
    }

    /// True when nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// True while a frame is partly written.
    pub fn mid_frame(&self) -> bool {
        self.current_pos > 0 && self.current_pos < self.current.len()
    }

    /// Lifetime counters.
    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    /// Lets go of the spare buffers larger than [`KEPT_SPARE_BYTES`]: the loop calls it when
    /// no transfer is going and the outbox is empty, so an idle agent does not keep a
    /// transfer's frame buffers.
    pub fn shed_spares(&mut self) {
        self.spare.retain(|b| b.capacity() <= KEPT_SPARE_BYTES);
    }

    /// Keeps `buf` for a later frame, unless the pool is full.
    fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS && buf.capacity() > 0 {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Encodes `env` as one frame into a buffer of its own (from the pool when one is
    /// there). `tail`: the length and CRC32C of data encoded last (see
    /// [`qx_proto::encode_envelope_with_tail`]).
    fn encode(
        &mut self,
        env: &Envelope,
        tail: Option<(usize, u32)>,
    ) -> Result<Vec<u8>, OutboxError> {
        let mut buf = self.spare.pop().unwrap_or_default();
        match qx_proto::encode_envelope_with_tail(env, SEND_MAX_FRAME_BYTES, tail, &mut buf) {
            Ok(_) => Ok(buf),
            Err(e) => {
                self.recycle(buf);
                Err(e.into())
            }
        }
    }

    /// Encodes `env` and checks that `room` bytes hold it.
    fn encode_within(
        &mut self,
        env: &Envelope,
        room: usize,
        tail: Option<(usize, u32)>,
    ) -> Result<Vec<u8>, OutboxError> {
        let need = qx_proto::encoded_frame_len(env);
        if need > room {
            self.stats.refused += 1;
            return Err(OutboxError::Full { need, room });
        }
        self.encode(env, tail)
    }

    /// Appends `frame` to the reply lane.
    fn enqueue(&mut self, frame: Vec<u8>) {
        self.lane_bytes += frame.len();
        self.frames.push_back(frame);
        self.stats.frames_queued += 1;
    }

    /// Queues an ack or a stream item on the reply lane, whole, or refuses it when it does
    /// not fit [`Outbox::room`]. `tail`: the length and CRC32C of data encoded last.
    pub fn push_reply(
        &mut self,
        env: &Envelope,
        tail: Option<(usize, u32)>,
    ) -> Result<(), OutboxError> {
        let frame = self.encode_within(env, self.room(), tail)?;
        self.enqueue(frame);
        Ok(())
    }

    /// Queues one of the session's own frames, which may use the session reserve.
    pub fn push_session(&mut self, env: &Envelope) -> Result<(), OutboxError> {
        let frame = self.encode_within(env, self.session_room(), None)?;
        self.enqueue(frame);
        Ok(())
    }

    /// Queues a terminal reply in place of the `reserved` bytes set aside for it. A reply
    /// larger than its reservation is refused with [`OutboxError::OverReservation`] and the
    /// reservation stands (the caller sends a smaller error in its place).
    pub fn push_terminal(&mut self, env: &Envelope, reserved: usize) -> Result<(), OutboxError> {
        let reserved = reserved.min(self.reserved);
        let frame = self.encode(env, None)?;
        let need = frame.len();
        if need > reserved {
            self.recycle(frame);
            return Err(OutboxError::OverReservation { need, reserved });
        }
        // queued + reserved <= capacity held before; the frame takes no more than it frees.
        self.reserved -= reserved;
        self.enqueue(frame);
        Ok(())
    }

    /// Puts `env` (the AgentReady of a new connection) in the hello slot, ahead of every
    /// queued frame but after the frame in progress, which is always finished first. A hello
    /// that has not started is replaced.
    pub fn push_urgent(&mut self, env: &Envelope) -> Result<(), OutboxError> {
        let frame = self.encode(env, None)?;
        // A frame taken up for writing of which the sink has not taken a byte has not
        // started: it yields to the hello.
        if self.current_pos == 0 && !self.current.is_empty() {
            let unstarted = std::mem::take(&mut self.current);
            match self.current_lane {
                // It counted against the lane while in `current`: the lane stays within
                // its capacity.
                Lane::Reply => {
                    self.lane_bytes += unstarted.len();
                    self.frames.push_front(unstarted);
                }
                // Superseded by the new hello.
                Lane::Hello => {
                    self.stats.coalesced += 1;
                    self.recycle(unstarted);
                }
                Lane::Telemetry => {
                    let slot = self.telemetry.get_or_insert_with(Vec::new);
                    if slot.is_empty() {
                        *slot = unstarted;
                    } else {
                        self.stats.coalesced += 1;
                        self.recycle(unstarted);
                    }
                }
            }
        }
        if self.hello.is_empty() {
            self.stats.frames_queued += 1;
        }
        let old = std::mem::replace(&mut self.hello, frame);
        self.recycle(old);
        Ok(())
    }

    /// Whether an AgentReady waits in the hello slot, not yet started.
    pub fn hello_pending(&self) -> bool {
        !self.hello.is_empty()
    }

    /// Puts `env` in the telemetry slot, replacing a sample that has not started going out.
    pub fn push_telemetry(&mut self, env: &Envelope) -> Result<(), OutboxError> {
        let frame = self.encode(env, None)?;
        let slot = self.telemetry.get_or_insert_with(Vec::new);
        if !slot.is_empty() {
            self.stats.coalesced += 1;
        } else {
            self.stats.frames_queued += 1;
        }
        let old = std::mem::replace(slot, frame);
        self.recycle(old);
        Ok(())
    }

    /// Moves the next whole frame into `current` when the previous one is finished.
    fn load_next(&mut self) -> bool {
        if self.current_pos < self.current.len() {
            return true;
        }
        let done = std::mem::take(&mut self.current);
        self.recycle(done);
        self.current_pos = 0;
        if !self.hello.is_empty() {
            self.current = std::mem::take(&mut self.hello);
            self.current_lane = Lane::Hello;
            return true;
        }
        if let Some(frame) = self.frames.pop_front() {
            self.lane_bytes -= frame.len();
            self.current = frame;
            self.current_lane = Lane::Reply;
            return true;
        }
        if let Some(slot) = self.telemetry.as_mut() {
            if !slot.is_empty() {
                self.current = std::mem::take(slot);
                self.current_lane = Lane::Telemetry;
                return true;
            }
        }
        false
    }

    /// Writes as much as `sink` takes. Returns the bytes written; `Ok` also when the sink
    /// would block (then bytes remain: see [`Outbox::is_empty`]).
    pub fn flush<W: Write + ?Sized>(&mut self, sink: &mut W) -> io::Result<usize> {
        let mut total = 0;
        while self.load_next() {
            let end = self.current.len().min(self.current_pos + MAX_WRITE_BYTES);
            match sink.write(&self.current[self.current_pos..end]) {
                Ok(0) => return Ok(total),
                Ok(n) => {
                    self.current_pos += n;
                    total += n;
                    self.stats.bytes_sent += n as u64;
                    if self.current_pos == self.current.len() {
                        self.stats.frames_sent += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use qx_proto::agent::envelope::Payload;
    use qx_proto::agent::{Ack, FileChunk, Ping, Telemetry};
    use qx_proto::{decode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};

    /// A sink that takes at most `per_write` bytes per call, and `WouldBlock`s while `stalled`
    /// or every `block_every`-th call.
    struct TestSink {
        data: Vec<u8>,
        per_write: usize,
        stalled: bool,
        calls: usize,
        block_every: usize,
    }

    impl TestSink {
        fn new(per_write: usize) -> Self {
            TestSink {
                data: Vec::new(),
                per_write,
                stalled: false,
                calls: 0,
                block_every: 0,
            }
        }
    }

    impl Write for TestSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.stalled || (self.block_every > 0 && self.calls.is_multiple_of(self.block_every))
            {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.per_write);
            self.data.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn env(id: u64, payload: Payload) -> Envelope {
        Envelope {
            id,
            correlation_id: 0,
            payload: Some(payload),
        }
    }

    fn ack(id: u64) -> Envelope {
        Envelope {
            id: 0,
            correlation_id: id,
            payload: Some(Payload::Ack(Ack {})),
        }
    }

    fn telemetry(uptime_s: u64) -> Envelope {
        env(
            0,
            Payload::Telemetry(Telemetry {
                uptime_s,
                ..Default::default()
            }),
        )
    }

    fn decode_all(bytes: &[u8]) -> (Vec<Envelope>, u64) {
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(bytes);
        let mut out = Vec::new();
        loop {
            match dec.decode() {
                Ok(Some(p)) => out.push(decode_envelope(p).unwrap()),
                Ok(None) => break,
                Err(_) => {}
            }
        }
        (out, dec.stats().garbage_bytes)
    }

    /// A file chunk of 40,000 bytes.
    fn chunk_40k() -> Envelope {
        env(
            0,
            Payload::FileChunk(FileChunk {
                offset: 0,
                data: vec![0x51; 40_000],
            }),
        )
    }

    #[test]
    fn frame_survives_host_stall_and_flushes_whole() {
        let mut ob = Outbox::new(0);
        let big = chunk_40k();
        ob.push_reply(&big, None).unwrap();
        ob.push_reply(&ack(9), None).unwrap();
        let mut sink = TestSink::new(7);
        sink.block_every = 3;
        // Some progress, then the host stalls.
        ob.flush(&mut sink).unwrap();
        assert!(ob.mid_frame());
        sink.stalled = true;
        for _ in 0..100 {
            assert_eq!(ob.flush(&mut sink).unwrap(), 0);
        }
        sink.stalled = false;
        while !ob.is_empty() {
            ob.flush(&mut sink).unwrap();
        }
        let (frames, garbage) = decode_all(&sink.data);
        assert_eq!(garbage, 0);
        assert_eq!(frames, vec![big, ack(9)]);
    }

    #[test]
    fn shedding_lets_go_of_chunk_sized_spares_and_keeps_small_ones() {
        let mut ob = Outbox::new(0);
        ob.push_reply(&chunk_40k(), None).unwrap();
        ob.push_reply(&ack(9), None).unwrap();
        let mut sink = TestSink::new(usize::MAX);
        while !ob.is_empty() {
            ob.flush(&mut sink).unwrap();
        }
        assert!(ob.spare.iter().any(|b| b.capacity() > KEPT_SPARE_BYTES));
        ob.shed_spares();
        assert!(!ob.spare.is_empty());
        assert!(ob.spare.iter().all(|b| b.capacity() <= KEPT_SPARE_BYTES));
    }

    #[test]
    fn a_write_never_exceeds_the_port_limit() {
        struct Recorder(Vec<usize>);
        impl Write for Recorder {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.push(buf.len());
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut ob = Outbox::new(0);
        let big = env(
            0,
            Payload::FileChunk(FileChunk {
                offset: 0,
                data: vec![1; 60_000],
            }),
        );
        ob.push_reply(&big, None).unwrap();
        let mut rec = Recorder(Vec::new());
        ob.flush(&mut rec).unwrap();
        assert!(rec.0.iter().all(|&n| n <= MAX_WRITE_BYTES));
        assert_eq!(
            rec.0.iter().sum::<usize>(),
            qx_proto::encoded_frame_len(&big)
        );
    }

    #[test]
    fn host_that_never_reads_keeps_memory_bounded_and_refuses_replies() {
        let mut ob = Outbox::new(MAX_FRAME_TOTAL_BYTES);
        let mut sink = TestSink::new(1000);
        sink.stalled = true;
        let mut refused = 0;
        for i in 1..=100_000u64 {
            ob.push_telemetry(&telemetry(i)).unwrap();
            if ob.push_reply(&ack(i), None).is_err() {
                refused += 1;
            }
            ob.flush(&mut sink).unwrap();
        }
        // Acks use the lane beyond the session reserve; telemetry one slot.
        assert!(ob.pending_bytes() <= ob.capacity() - SESSION_RESERVE_BYTES + 64);
        assert!(refused > 90_000);
        assert_eq!(ob.stats().refused, refused);
        assert_eq!(ob.stats().coalesced, 99_999);
        // When the host reads again, the replies that fit come out, then only the latest
        // telemetry sample.
        sink.stalled = false;
        while !ob.is_empty() {
            ob.flush(&mut sink).unwrap();
        }
        let (frames, _) = decode_all(&sink.data);
        let telemetry_frames: Vec<_> = frames
            .iter()
            .filter(|e| matches!(e.payload, Some(Payload::Telemetry(_))))
            .collect();
        assert_eq!(telemetry_frames, vec![&telemetry(100_000)]);
        assert_eq!(frames.len() as u64, 100_000 - refused + 1);
    }

    #[test]
    fn replies_overtake_waiting_telemetry_but_not_a_started_frame() {
        let mut ob = Outbox::new(0);
        ob.push_telemetry(&telemetry(1)).unwrap();
        let mut sink = TestSink::new(5);
        sink.block_every = 2;
        ob.flush(&mut sink).unwrap(); // the telemetry frame has started
        assert!(ob.mid_frame());
        ob.push_reply(&ack(1), None).unwrap();
        ob.push_telemetry(&telemetry(2)).unwrap();
        ob.push_reply(&ack(2), None).unwrap();
        sink.block_every = 0;
        ob.flush(&mut sink).unwrap();
        let (frames, garbage) = decode_all(&sink.data);
        assert_eq!(garbage, 0);
        assert_eq!(frames, vec![telemetry(1), ack(1), ack(2), telemetry(2)]);
    }

    #[test]
    fn host_disconnecting_mid_frame_gets_the_frame_finished_before_the_hello() {
        let mut ob = Outbox::new(0);
        let reply = env(
            0,
            Payload::FileChunk(FileChunk {
                offset: 0,
                data: vec![9; 3000],
            }),
        );
        ob.push_reply(&reply, None).unwrap();
        let mut first_host = TestSink::new(1000);
        first_host.block_every = 2;
        ob.flush(&mut first_host).unwrap();
        assert!(ob.mid_frame());
        // Another reply was queued meanwhile.
        let later = ack(5);
        ob.push_reply(&later, None).unwrap();
        // The host goes away; a new host connects and the agent queues its hello ahead.
        let hello = env(1, Payload::Ping(Ping { seq: 77 }));
        ob.push_urgent(&hello).unwrap();
        let mut second_host = TestSink::new(3);
        while !ob.is_empty() {
            ob.flush(&mut second_host).unwrap();
        }
        // The first host saw the start of the frame, the second its tail then whole frames.
        let mut joined = first_host.data.clone();
        joined.extend_from_slice(&second_host.data);
        let (frames, _) = decode_all(&joined);
        assert_eq!(frames, vec![reply, hello.clone(), later.clone()]);
        let (second_frames, garbage) = decode_all(&second_host.data);
        assert_eq!(second_frames, vec![hello.clone(), later.clone()]);
        assert_eq!(
            garbage as usize,
            second_host.data.len()
                - qx_proto::encoded_frame_len(&hello)
                - qx_proto::encoded_frame_len(&later)
        );
    }

    #[test]
    fn frame_taken_up_but_not_started_yields_to_the_hello() {
        let mut ob = Outbox::new(0);
        let reply = ack(3);
        ob.push_reply(&reply, None).unwrap();
        // The host is gone: the write of the next frame takes nothing.
        let mut gone = TestSink::new(1000);
        gone.stalled = true;
        ob.flush(&mut gone).unwrap();
        assert!(gone.data.is_empty());
        let hello = env(1, Payload::Ping(Ping { seq: 9 }));
        ob.push_urgent(&hello).unwrap();
        let mut next_host = TestSink::new(1000);
        ob.flush(&mut next_host).unwrap();
        let (frames, garbage) = decode_all(&next_host.data);
        assert_eq!(garbage, 0);
        assert_eq!(frames, vec![hello, reply]);
    }

    #[test]
    fn hello_behind_an_unstarted_frame_never_overfills_the_lane() {
        let chunk = |n| {
            env(
                0,
                Payload::FileChunk(FileChunk {
                    offset: 0,
                    data: vec![7; n],
                }),
            )
        };
        let mut ob = Outbox::new(0);
        let first = chunk(40_000);
        ob.push_reply(&first, None).unwrap();
        // The host stops reading: the first frame is taken up for writing, nothing of it is
        // written, and the lane fills up behind it.
        let mut sink = TestSink::new(1000);
        sink.stalled = true;
        ob.flush(&mut sink).unwrap();
        let mut queued = vec![first];
        loop {
            let next = chunk(10_000);
            if ob.push_reply(&next, None).is_err() {
                break;
            }
            queued.push(next);
        }
        // A reconnect (or a stale link) queues the hello ahead of everything not started.
        let hello = env(1, Payload::Ping(Ping { seq: 1 }));
        ob.push_urgent(&hello).unwrap();
        let bound = Outbox::new(0).room() + 4 * MAX_FRAME_TOTAL_BYTES;
        assert!(ob.pending_bytes() <= bound);
        assert!(ob.room() <= Outbox::new(0).room());
        // Nothing more is taken than the lane holds, and everything comes out whole.
        let before = ob.stats().frames_queued;
        while ob.push_reply(&chunk(10_000), None).is_ok() {
            assert!(
                ob.stats().frames_queued - before < 100,
                "the lane takes frames without limit"
            );
        }
        let more = ob.stats().frames_queued - before;
        sink.stalled = false;
        while !ob.is_empty() {
            ob.flush(&mut sink).unwrap();
        }
        let (frames, garbage) = decode_all(&sink.data);
        assert_eq!(garbage, 0);
        assert_eq!(frames[0], hello);
        assert_eq!(frames[1..=queued.len()], queued[..]);
        assert_eq!(frames.len(), 1 + queued.len() + more as usize);
    }

    #[test]
    fn a_reserved_reply_always_fits_even_when_the_lane_is_full() {
        let mut ob = Outbox::new(0);
        let reply = env(
            0,
            Payload::FileChunk(FileChunk {
                offset: 0,
                data: vec![3; 30_000],
            }),
        );
        let need = qx_proto::encoded_frame_len(&reply);
        assert!(ob.reserve(need));
        // Stream items and session frames take every other byte.
        while ob.push_reply(&ack(1), None).is_ok() {}
        while ob.push_session(&ack(2)).is_ok() {}
        assert_eq!(ob.room(), 0);
        assert!(!ob.reserve(1));
        ob.push_terminal(&reply, need).unwrap();
        assert_eq!(ob.reserved(), 0);
        assert!(ob.pending_bytes() <= ob.capacity());
    }

    #[test]
    fn a_reply_larger_than_its_reservation_is_refused_and_the_reservation_kept() {
        let mut ob = Outbox::new(0);
        assert!(ob.reserve(100));
        let big = env(
            0,
            Payload::FileChunk(FileChunk {
                offset: 0,
                data: vec![3; 1000],
            }),
        );
        assert!(matches!(
            ob.push_terminal(&big, 100),
            Err(OutboxError::OverReservation { reserved: 100, .. })
        ));
        assert_eq!(ob.reserved(), 100);
        ob.push_terminal(&ack(1), 100).unwrap();
        assert_eq!(ob.reserved(), 0);
    }

    #[test]
    fn a_newer_hello_replaces_one_not_yet_started() {
        let mut ob = Outbox::new(0);
        let first = env(1, Payload::Ping(Ping { seq: 1 }));
        let second = env(2, Payload::Ping(Ping { seq: 2 }));
        ob.push_reply(&ack(3), None).unwrap();
        ob.push_urgent(&first).unwrap();
        ob.push_urgent(&second).unwrap();
        let mut sink = TestSink::new(1000);
        ob.flush(&mut sink).unwrap();
        let (frames, garbage) = decode_all(&sink.data);
        assert_eq!(garbage, 0);
        assert_eq!(frames, vec![second, ack(3)]);
    }

    #[test]
    fn oversized_envelope_is_refused_without_queueing() {
        let mut ob = Outbox::new(0);
        let huge = env(
            0,
            Payload::FileChunk(FileChunk {
                offset: 0,
                data: vec![0; SEND_MAX_FRAME_BYTES as usize + 1],
            }),
        );
        assert!(matches!(
            ob.push_reply(&huge, None),
            Err(OutboxError::TooLarge(_))
        ));
        assert!(ob.is_empty());
    }
}
