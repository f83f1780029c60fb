//! The qemu-ga port's outbound bytes: whole reply lines or nothing, partial writes kept.
//!
//! A reply is queued whole or refused ([`LineOutbox::push`]); [`LineOutbox::flush`] advances
//! by exactly what the port took, so a stalled host never sees half a line followed by
//! another. The front end takes a new request only while fewer than
//! [`QGA_OUTBOX_LOW_BYTES`] are pending, so the buffer holds at most that plus one reply.

use std::io::{self, Write};

/// Pending bytes below which the front end takes the next request.
pub const QGA_OUTBOX_LOW_BYTES: usize = 64 * 1024;
/// Largest single reply line (a `guest-file-read` of 8 MiB is ~10.7 MiB of base64).
pub const MAX_REPLY_BYTES: usize = 12 * 1024 * 1024;

/// Why a reply was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineOutboxError {
    #[error("reply of {0} bytes is larger than the agent's limit of {MAX_REPLY_BYTES}")]
    TooLarge(usize),
    #[error("no room for the reply")]
    Full,
}

/// Pending reply bytes.
#[derive(Debug, Default)]
pub struct LineOutbox {
    buf: Vec<u8>,
    head: usize,
}

impl LineOutbox {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn pending_bytes(&self) -> usize {
        self.buf.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// Whether the front end may take another request.
    pub fn has_room(&self) -> bool {
        self.pending_bytes() < QGA_OUTBOX_LOW_BYTES
    }

    /// Queues the line `write` appends to the pending bytes, whole, or refuses it and keeps
    /// none of it. The line is written where it is sent from: no buffer of its own, no copy
    /// (a file read's reply is megabytes).
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), LineOutboxError> {
        if self.is_empty() {
            self.buf.clear();
            self.head = 0;
        }
        let start = self.buf.len();
        write(&mut self.buf);
        let len = self.buf.len() - start;
        let refused = if len > MAX_REPLY_BYTES {
            Some(LineOutboxError::TooLarge(len))
        } else if self.pending_bytes() > QGA_OUTBOX_LOW_BYTES + MAX_REPLY_BYTES {
            Some(LineOutboxError::Full)
        } else {
            None
        };
        match refused {
            Some(e) => {
                self.buf.truncate(start);
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Drops everything pending (a new host begins with a sync and skips old lines).
    pub fn clear(&mut self) {
        self.buf = Vec::new();
        self.head = 0;
    }

    /// Writes until the sink would block; returns the bytes written.
    pub fn flush<W: Write + ?Sized>(&mut self, sink: &mut W) -> io::Result<usize> {
        let mut written = 0;
        while self.head < self.buf.len() {
            match sink.write(&self.buf[self.head..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.head += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.head == self.buf.len() {
            // A large reply's memory goes back once it is out.
            if self.buf.capacity() > QGA_OUTBOX_LOW_BYTES {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
            self.head = 0;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn push(ob: &mut LineOutbox, line: &[u8]) -> Result<(), LineOutboxError> {
        ob.push_with(|buf| buf.extend_from_slice(line))
    }

    /// Takes at most `per_write` bytes a call and `budget` bytes in all, then `WouldBlock`.
    struct TestSink {
        got: Vec<u8>,
        per_write: usize,
        budget: usize,
    }

    impl Write for TestSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.per_write).min(self.budget);
            self.got.extend_from_slice(&buf[..n]);
            self.budget -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reply_survives_a_stalled_host_and_flushes_whole_in_order() {
        let mut ob = LineOutbox::new();
        push(&mut ob, b"{\"return\": 1}\n").unwrap();
        push(&mut ob, b"{\"return\": 2}\n").unwrap();
        let mut sink = TestSink {
            got: Vec::new(),
            per_write: 5,
            budget: 7,
        };
        assert_eq!(ob.flush(&mut sink).unwrap(), 7);
        assert_eq!(ob.pending_bytes(), 28 - 7);
        sink.budget = usize::MAX;
        ob.flush(&mut sink).unwrap();
        assert!(ob.is_empty());
        assert_eq!(sink.got, b"{\"return\": 1}\n{\"return\": 2}\n");
    }

    #[test]
    fn oversized_reply_is_refused_whole() {
        let mut ob = LineOutbox::new();
        let big = vec![b'x'; MAX_REPLY_BYTES + 1];
        assert_eq!(
            push(&mut ob, &big),
            Err(LineOutboxError::TooLarge(MAX_REPLY_BYTES + 1))
        );
        assert!(ob.is_empty());
    }

    #[test]
    fn room_closes_above_the_low_mark_and_full_refuses() {
        let mut ob = LineOutbox::new();
        push(&mut ob, &vec![b'x'; QGA_OUTBOX_LOW_BYTES]).unwrap();
        assert!(!ob.has_room());
        push(&mut ob, &vec![b'x'; MAX_REPLY_BYTES]).unwrap();
        assert_eq!(push(&mut ob, b"x"), Err(LineOutboxError::Full));
    }
}
