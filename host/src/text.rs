//! Guest text made safe for a terminal or a log line.
//!
//! Everything a guest reports (hostname, OS names, error messages, log lines, file names) is
//! untrusted text. Printed raw, an ESC starts a terminal escape sequence (`ESC ] 52` writes the
//! operator's clipboard, `ESC [ 2K` erases a line), a CR or LF forges a line, and a bidi
//! override reorders what the reader sees. [`escape`] turns every such character into a
//! visible escape: `\e`, `\a`, `\n`, `\r`, `\t`, `\\`, `\xNN` for the other C0 controls and
//! DEL, `\u{NN}` for the C1 controls and the bidi controls. Printable text, including
//! non-ASCII letters, is unchanged. JSON output needs none of this: it escapes controls itself.

use std::borrow::Cow;
use std::fmt;

/// True for the characters [`escape`] rewrites.
fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL, C1
        || c == '\\'
        || ('\u{202a}'..='\u{202e}').contains(&c) // LRE, RLE, PDF, LRO, RLO
        || ('\u{2066}'..='\u{2069}').contains(&c) // LRI, RLI, FSI, PDI
        || c == '\u{200e}'
        || c == '\u{200f}'
        || c == '\u{061c}'
}

fn push_escaped(out: &mut String, c: char) {
    use std::fmt::Write;
    match c {
        '\u{1b}' => out.push_str("\\e"),
        '\u{7}' => out.push_str("\\a"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\\' => out.push_str("\\\\"),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// `s` with every control, DEL, bidi control and backslash escaped; borrowed when there is
/// nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_if(s, needs_escape)
}

/// `s` with the characters `escape_this` selects escaped; borrowed when there are none.
fn escape_if(s: &str, escape_this: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(&escape_this) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if escape_this(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`escape`] for whole lines of output the program composed itself: the line breaks and tabs
/// of the layout and backslashes are kept, every other control is escaped. A safety net under
/// the per-field escaping, which is what keeps a guest from adding lines.
pub fn escape_layout(s: &str) -> Cow<'_, str> {
    escape_if(s, |c| {
        c != '\n' && c != '\t' && c != '\\' && needs_escape(c)
    })
}

/// A log record as one line: every control escaped (line breaks too), backslashes kept.
pub fn escape_line(s: &str) -> Cow<'_, str> {
    escape_if(s, |c| c != '\\' && needs_escape(c))
}

/// An escaped, truncated copy: at most `max_chars` characters of the escaped text, with `...`
/// in place of the rest. For guest text kept by the daemon (event details).
pub fn sanitize(s: &str, max_chars: usize) -> String {
    let e = escape(s);
    if e.chars().count() <= max_chars {
        return e.into_owned();
    }
    let keep = max_chars.saturating_sub(3);
    let mut out: String = e.chars().take(keep).collect();
    out.push_str("...");
    out
}

/// The strings of a guest list, each escaped, joined by `sep`.
pub fn escape_join(v: &[String], sep: &str) -> String {
    v.iter().map(|x| escape(x)).collect::<Vec<_>>().join(sep)
}

/// Displays its string escaped: `format!("{}", Esc(&hostname))`.
#[derive(Debug, Clone, Copy)]
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_become_visible_escapes() {
        assert_eq!(
            escape("x\u{1b}]52;c;SGVsbG8=\u{7}y"),
            "x\\e]52;c;SGVsbG8=\\ay"
        );
        assert_eq!(escape("a\r\nb\tc\u{0}d\u{7f}"), "a\\r\\nb\\tc\\x00d\\x7f");
        assert_eq!(escape("\u{9b}2K\u{85}"), "\\u{9b}2K\\u{85}");
        assert_eq!(escape("abc\u{202e}cba\u{2066}"), "abc\\u{202e}cba\\u{2066}");
        assert_eq!(escape("a\\e"), "a\\\\e");
    }

    #[test]
    fn printable_text_is_borrowed_unchanged() {
        assert!(matches!(
            escape("web-1.example (Debian GNU/Linux 12) é 日本"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn layout_keeps_line_breaks_and_escapes_the_rest() {
        assert_eq!(escape_layout("a: x\u{1b}[2K\nb\tc\\"), "a: x\\e[2K\nb\tc\\");
    }

    #[test]
    fn a_log_line_stays_one_line() {
        assert_eq!(
            escape_line("vm a: x\n WARN forged \\path"),
            "vm a: x\\n WARN forged \\path"
        );
    }

    #[test]
    fn sanitize_escapes_then_truncates() {
        assert_eq!(sanitize("short", 64), "short");
        let long = "v".repeat(100_000);
        let s = sanitize(&long, 64);
        assert_eq!(s.chars().count(), 64);
        assert!(s.ends_with("..."));
        assert_eq!(sanitize("\u{1b}\u{1b}\u{1b}", 5), "\\e...");
    }
}
