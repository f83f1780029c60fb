//! qx-node's logging: `tracing` events (tonic's and hyper's, and the daemon's own `log::`
//! lines through the `tracing-log` bridge) rendered by `tracing-subscriber`.
//!
//! - Filter: `RUST_LOG` in `EnvFilter` syntax (`info`, `qx_node=debug,h2=warn`, ...);
//!   default `info`.
//! - Format ([`LogFormat`]): `text` (timestamp, level, spans with their fields, target,
//!   message) or `json` (one object a line, for log shippers).
//! - Under systemd (`JOURNAL_STREAM` names stderr) the text format drops the timestamp and
//!   the colours, which the journal adds and cannot show, and prefixes each line with its
//!   syslog priority (`<3>` error ... `<7>` trace) so that `journalctl -p` filters work.
//! - Text lines escape control characters, DEL and bidi overrides in every field
//!   ([`escaped_fields`]): guest text cannot forge log lines.
//!
//! Levels: error = an operation failed and nobody was told otherwise; warn = a degraded but
//! working state (libvirt off, agent reconnecting); info = lifecycle (listening, VM started,
//! agent connected); debug = per command; trace = per frame. Payloads never go above debug.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "info";

/// How log lines are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; journald-style when run under systemd.
    Text,
    /// One JSON object a line: timestamp, level, target, fields, spans.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("RUST_LOG is not a valid filter")]
    Filter(#[source] tracing_subscriber::filter::ParseError),
    #[error("a global logger is already installed")]
    Install(#[source] tracing_subscriber::util::TryInitError),
}

/// True when stderr is the journal stream systemd handed us: `JOURNAL_STREAM` is
/// `DEVICE:INODE` of that stream, compared with what fd 2 really is (a child whose stderr
/// was redirected inherits the variable but not the stream).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The filter from a `RUST_LOG` value (`None` or empty: [`DEFAULT_FILTER`]).
pub fn filter(rust_log: Option<&str>) -> Result<EnvFilter, LoggingError> {
    let spec = match rust_log.map(str::trim) {
        Some(s) if !s.is_empty() => s,
        _ => DEFAULT_FILTER,
    };
    EnvFilter::builder()
        .parse(spec)
        .map_err(LoggingError::Filter)
}

/// Installs the global subscriber (and the `log` bridge) writing to stderr.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref())?;
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry
            .with(layer.json().with_current_span(true).with_span_list(true))
            .try_init(),
        LogFormat::Text if stderr_is_journal() => registry
            .with(
                layer
                    .fmt_fields(escaped_fields())
                    .with_ansi(false)
                    .event_format(Journald::default()),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                layer
                    .fmt_fields(escaped_fields())
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
    }
    .map_err(LoggingError::Install)
}

/// Text-format fields with every control character, DEL and bidi override escaped
/// ([`crate::text::escape_line`]): one event is one line, and guest text inside a message
/// can neither add lines nor reach the terminal reading the log as controls. (The JSON
/// format escapes control characters itself.)
pub fn escaped_fields() -> impl for<'w> FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let text = crate::text::escape_line(&text);
        if field.name() == "message" {
            write!(w, "{text}")
        } else {
            write!(w, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

/// The syslog priority journald reads from a `<N>` line prefix.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The text format for the journal: `<priority>` then the usual line without a timestamp.
#[derive(Debug)]
pub struct Journald {
    inner: format::Format<format::Full, ()>,
}

impl Default for Journald {
    fn default() -> Self {
        Journald {
            inner: format::Format::default().without_time().with_ansi(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// Collects what the formatter writes.
    #[derive(Debug, Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
                .unwrap_or_default()
        }
    }

    #[test]
    fn filter_accepts_env_filter_syntax_and_rejects_garbage() {
        assert!(filter(None).is_ok());
        assert!(filter(Some("")).is_ok());
        assert!(filter(Some("qx_node::agent=debug,h2=warn,info")).is_ok());
        assert!(matches!(
            filter(Some("qx_node=loud")),
            Err(LoggingError::Filter(_))
        ));
    }

    #[test]
    fn log_macros_reach_the_subscriber_with_the_request_span() {
        let buf = Buf::default();
        let sub = tracing_subscriber::registry()
            .with(filter(Some("debug,quiet=warn")).unwrap_or_default())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(buf.clone())
                    .with_ansi(false)
                    .event_format(Journald::default()),
            );
        // The bridge qx-node installs globally, called directly (no global logger in tests).
        let bridge = tracing_log::LogTracer::new();
        let log_line = |level: log::Level, target: &str, msg: &str| {
            log::Log::log(
                &bridge,
                &log::Record::builder()
                    .level(level)
                    .target(target)
                    .args(format_args!("{msg}"))
                    .build(),
            );
        };
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("rpc", method = "GetAgentInfo", vm = "web1");
            let _g = span.enter();
            log_line(log::Level::Info, "qx_node::agent", "agent connected");
            log_line(
                log::Level::Debug,
                "quiet",
                "dropped by the per-target filter",
            );
            tracing::error!("it failed");
        });
        let out = buf.text();
        assert!(
            out.contains("<6> INFO rpc{method=\"GetAgentInfo\" vm=\"web1\"}: qx_node::agent: agent connected"),
            "{out}"
        );
        assert!(out.contains("<3>ERROR rpc{"), "{out}");
        assert!(!out.contains("dropped"), "{out}");
    }

    #[test]
    fn guest_text_in_a_log_line_cannot_add_lines_or_reach_the_terminal() {
        let buf = Buf::default();
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(buf.clone())
                .fmt_fields(escaped_fields())
                .with_ansi(false)
                .event_format(Journald::default()),
        );
        let bridge = tracing_log::LogTracer::new();
        let hostile = "web1\n<3>ERROR forged: node on fire\x1b]52;c;SGVsbG8=\x07\u{202e}";
        tracing::subscriber::with_default(sub, || {
            log::Log::log(
                &bridge,
                &log::Record::builder()
                    .level(log::Level::Warn)
                    .target("qx_node::agent")
                    .args(format_args!("agent hostname {hostile}"))
                    .build(),
            );
            tracing::warn!(hostname = hostile, "telemetry");
        });
        let out = buf.text();
        assert_eq!(out.lines().count(), 2, "one line an event: {out}");
        assert!(
            !out.chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "no raw controls: {out:?}"
        );
        assert!(out.contains("forged"), "the text is kept, escaped: {out}");
    }

    #[test]
    fn json_lines_carry_level_fields_and_spans() {
        let buf = Buf::default();
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(buf.clone())
                .json()
                .with_current_span(true)
                .with_span_list(true),
        );
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("rpc", method = "StartVM", vm = "db1");
            let _g = span.enter();
            tracing::warn!(attempt = 2, "retrying");
        });
        let out = buf.text();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        assert_eq!(v["level"], "WARN", "{out}");
        assert_eq!(v["fields"]["message"], "retrying", "{out}");
        assert_eq!(v["fields"]["attempt"], 2, "{out}");
        assert_eq!(v["span"]["vm"], "db1", "{out}");
        assert!(v["timestamp"].is_string(), "{out}");
    }
}
