//! The agent's own log: a bounded ring of recent lines (served by `LogsRequest`) plus a
//! `log::Log` implementation writing each line to stderr or syslog and to the ring.
//!
//! Level meanings: `error` the agent cannot do something it should (a port it cannot open,
//! a child it cannot spawn); `warn` the other side or the system misbehaved and the agent
//! coped (garbage on the port, a stale host, a refused reply); `info` lifecycle (start,
//! connect, disconnect, reload, power); `debug` one line per request; `trace` bytes.
//! Payloads are never logged at info. Lines the host can trigger are rate limited by their
//! callers ([`crate::session::RateLimiter`]).
//!
//! While filesystems are frozen the logger writes to neither stderr nor syslog (either may
//! end on a frozen disk): lines go to the ring only.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};
use qx_proto::agent::{AgentLogs, LogLevel, LogLine};

/// Longest line kept, in bytes (longer lines are cut at a character boundary).
pub const MAX_LINE_BYTES: usize = 512;

/// Bounded ring of log lines.
#[derive(Debug)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
    capacity: usize,
    dropped: u64,
}

impl LogRing {
    pub fn new(capacity: usize) -> Self {
        LogRing {
            lines: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    pub fn push(&mut self, unix_ms: i64, level: Level, message: &str) {
        if self.lines.len() >= self.capacity {
            self.lines.pop_front();
            self.dropped += 1;
        }
        let mut end = message.len().min(MAX_LINE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.lines.push_back(LogLine {
            unix_ms,
            level: wire_level(level) as i32,
            message: message[..end].to_string(),
        });
    }

    /// The newest `max_lines` lines (all when 0), oldest first.
    pub fn snapshot(&self, max_lines: u32) -> AgentLogs {
        let n = if max_lines == 0 {
            self.lines.len()
        } else {
            (max_lines as usize).min(self.lines.len())
        };
        AgentLogs {
            lines: self
                .lines
                .iter()
                .skip(self.lines.len() - n)
                .cloned()
                .collect(),
            dropped: self.dropped,
        }
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

fn wire_level(level: Level) -> LogLevel {
    match level {
        Level::Error => LogLevel::Error,
        Level::Warn => LogLevel::Warn,
        Level::Info => LogLevel::Info,
        Level::Debug => LogLevel::Debug,
        Level::Trace => LogLevel::Trace,
    }
}

/// Where log lines go besides the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    Syslog,
}

#[derive(Debug)]
struct Logger {
    ring: Mutex<LogRing>,
    target: Mutex<LogTarget>,
    syslog: Mutex<Option<UnixDatagram>>,
    frozen: AtomicBool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if let Ok(mut ring) = self.ring.lock() {
            ring.push(unix_ms, record.level(), &message);
        }
        if self.frozen.load(Ordering::Relaxed) {
            return;
        }
        let target = self.target.lock().map_or(LogTarget::Stderr, |t| *t);
        match target {
            LogTarget::Stderr => {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "quantix-kvm-agent: {:5} {}",
                    record.level(),
                    message
                );
            }
            LogTarget::Syslog => self.to_syslog(record.level(), &message),
        }
    }

    fn flush(&self) {}
}

impl Logger {
    fn to_syslog(&self, level: Level, message: &str) {
        // Facility daemon (3); severities err(3), warning(4), info(6), debug(7).
        let severity = match level {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug | Level::Trace => 7,
        };
        let line = format!(
            "<{}>quantix-kvm-agent[{}]: {}",
            3 * 8 + severity,
            std::process::id(),
            message
        );
        let Ok(mut sock) = self.syslog.lock() else {
            return;
        };
        if sock.is_none() {
            *sock = UnixDatagram::unbound()
                .and_then(|s| {
                    s.connect("/dev/log")?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
                .ok();
        }
        let sent = sock
            .as_ref()
            .is_some_and(|s| s.send(line.as_bytes()).is_ok());
        if !sent {
            // No syslog daemon (yet): fall back to stderr, retry the socket next time.
            *sock = None;
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }
}

/// Installs the logger (once per process; later calls only change level and target).
pub fn init(level: LevelFilter, target: LogTarget, ring_lines: usize) {
    let logger = LOGGER.get_or_init(|| Logger {
        ring: Mutex::new(LogRing::new(ring_lines)),
        target: Mutex::new(target),
        syslog: Mutex::new(None),
        frozen: AtomicBool::new(false),
    });
    let _ = log::set_logger(logger);
    configure(level, target);
}

/// Changes level and target (config reload).
pub fn configure(level: LevelFilter, target: LogTarget) {
    log::set_max_level(level);
    if let Some(logger) = LOGGER.get() {
        if let Ok(mut t) = logger.target.lock() {
            *t = target;
        }
    }
}

/// Stops (or resumes) writing lines anywhere but the ring, for filesystem freezes.
pub fn set_frozen(frozen: bool) {
    if let Some(logger) = LOGGER.get() {
        logger.frozen.store(frozen, Ordering::Relaxed);
    }
}

/// The newest `max_lines` lines of the agent's log.
pub fn snapshot(max_lines: u32) -> AgentLogs {
    LOGGER
        .get()
        .and_then(|l| l.ring.lock().ok().map(|r| r.snapshot(max_lines)))
        .unwrap_or_default()
}

/// Parses a level name (`off`, `error`, `warn`, `info`, `debug`, `trace`).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ring_keeps_the_newest_lines_and_counts_the_dropped() {
        let mut ring = LogRing::new(3);
        for i in 0..5 {
            ring.push(i, Level::Info, &format!("line {i}"));
        }
        let snap = ring.snapshot(0);
        let msgs: Vec<_> = snap.lines.iter().map(|l| l.message.as_str()).collect();
        assert_eq!(msgs, vec!["line 2", "line 3", "line 4"]);
        assert_eq!(snap.dropped, 2);
        let last = ring.snapshot(1);
        assert_eq!(last.lines[0].message, "line 4");
        assert_eq!(last.lines[0].level, LogLevel::Info as i32);
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        let mut ring = LogRing::new(1);
        let long = "é".repeat(MAX_LINE_BYTES);
        ring.push(0, Level::Warn, &long);
        let msg = &ring.snapshot(0).lines[0].message;
        assert!(msg.len() <= MAX_LINE_BYTES);
        assert!(msg.chars().all(|c| c == 'é'));
    }
}
