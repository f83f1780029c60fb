//! JSON for the qemu-ga front end, sans-io: a stream splitter, a bounded parser, an encoder.
//!
//! qemu-ga's input is a stream of JSON objects with no framing: a request ends at the `}`
//! that closes it, 0xFF (or 0xFE) resets the stream, and junk between objects is an error
//! answered once. [`Splitter`] finds those boundaries byte by byte (tracking only depth and
//! strings) and hands out each complete value's bytes; [`parse`] then parses them whole.
//! Output is ASCII only: [`Value::write`] escapes every non-ASCII and control character.
//! docs/qemu-ga.md has the state table and the limits.

use thiserror::Error;

/// Largest request, in bytes, the splitter buffers.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
/// Largest buffer [`Splitter::recycle`] keeps for the next request.
const RECYCLED_MAX_BYTES: usize = 4096;
/// Deepest nesting of arrays and objects [`parse`] accepts.
pub const MAX_DEPTH: usize = 32;

/// A JSON value. Objects keep their members in input order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// Any other number (a fraction, an exponent, or beyond `i64`), kept as its JSON text:
    /// no command takes one, and the agent never needs its value.
    Number(String),
    Str(String),
    /// Bytes sent as a base64 string, encoded straight into the reply line: a file read's
    /// data is never copied into a `String` first, nor scanned for characters to escape
    /// (base64 has none). The parser never makes one.
    Base64(Vec<u8>),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

/// Why a request's text is not JSON the front end takes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JsonError {
    #[error("JSON parse error, {0}")]
    Syntax(&'static str),
    #[error("JSON parse error, nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("JSON parse error, request larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("JSON parse error, invalid keyword '{0}'")]
    Junk(String),
}

/// What the splitter found.
#[derive(Debug, Clone, PartialEq)]
pub enum Split {
    /// The bytes of one complete top-level value (starting with `{` or `[`).
    Value(Vec<u8>),
    /// Input that is not a value, or a value over the size limit: answer one error.
    Error(JsonError),
}

/// The splitter's state (docs/qemu-ga.md, "Requests: a stream parser").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between values.
    Idle,
    /// Inside a value at `depth`; `quote` is the open string's quote, `escaped` after `\`.
    Value {
        depth: usize,
        quote: Option<u8>,
        escaped: bool,
    },
    /// Inside junk between values.
    Junk,
    /// Skipping the rest of an over-long value (same tracking, nothing kept).
    Skip {
        depth: usize,
        quote: Option<u8>,
        escaped: bool,
    },
}

/// Finds request boundaries in the byte stream.
#[derive(Debug)]
pub struct Splitter {
    state: State,
    buf: Vec<u8>,
    junk: String,
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new()
    }
}

fn is_reset(b: u8) -> bool {
    b == 0xFF || b == 0xFE
}

/// Steps depth/string tracking over one byte; returns the new depth.
fn track(b: u8, depth: usize, quote: &mut Option<u8>, escaped: &mut bool) -> usize {
    if let Some(q) = *quote {
        if *escaped {
            *escaped = false;
        } else if b == b'\\' {
            *escaped = true;
        } else if b == q {
            *quote = None;
        }
        return depth;
    }
    match b {
        b'"' | b'\'' => {
            *quote = Some(b);
            depth
        }
        b'{' | b'[' => depth + 1,
        b'}' | b']' => depth - 1,
        _ => depth,
    }
}

impl Splitter {
    pub fn new() -> Self {
        Splitter {
            state: State::Idle,
            buf: Vec::new(),
            junk: String::new(),
        }
    }

    /// Drops any partial value (the host went away).
    pub fn reset(&mut self) {
        self.state = State::Idle;
        self.buf = Vec::new();
        self.junk.clear();
    }

    /// Takes back the buffer of a value handed out, once it was parsed, for the next one's
    /// bytes (a small one only: a large request's memory is let go).
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.buf.capacity() == 0 && buf.capacity() <= RECYCLED_MAX_BYTES {
            buf.clear();
            self.buf = buf;
        }
    }

    /// Whether part of a value is buffered.
    pub fn mid_value(&self) -> bool {
        self.state != State::Idle
    }

    /// Consumes bytes of `input` up to and including the end of the next complete value or
    /// error; returns how many bytes were consumed and what was found, if anything.
    pub fn push(&mut self, input: &[u8]) -> (usize, Option<Split>) {
        let mut i = 0;
        while i < input.len() {
            if let State::Value {
                mut depth,
                mut quote,
                mut escaped,
            } = self.state
            {
                // Inside a value: track a run of its bytes in one pass and keep them at once.
                // A reset byte, or the size limit, stops the run; `step` takes that byte.
                let limit = input
                    .len()
                    .min(i + MAX_REQUEST_BYTES.saturating_sub(self.buf.len()));
                let mut j = i;
                while j < limit && !is_reset(input[j]) {
                    depth = track(input[j], depth, &mut quote, &mut escaped);
                    j += 1;
                    if depth == 0 {
                        break;
                    }
                }
                self.buf.extend_from_slice(&input[i..j]);
                if depth == 0 {
                    self.state = State::Idle;
                    return (j, Some(Split::Value(std::mem::take(&mut self.buf))));
                }
                self.state = State::Value {
                    depth,
                    quote,
                    escaped,
                };
                i = j;
                if i == input.len() {
                    break;
                }
            }
            if let Some(found) = self.step(input[i]) {
                return (i + 1, Some(found));
            }
            i += 1;
        }
        (input.len(), None)
    }

    fn step(&mut self, b: u8) -> Option<Split> {
        match self.state {
            State::Idle => {
                if b == b'{' || b == b'[' {
                    // A request's bytes are handed out whole (`mem::take`) and usually come
                    // back ([`Splitter::recycle`]); else room for a small one at once saves
                    // the growing steps from nothing.
                    self.buf.clear();
                    self.buf.reserve(64);
                    self.buf.push(b);
                    self.state = State::Value {
                        depth: 1,
                        quote: None,
                        escaped: false,
                    };
                } else if !b.is_ascii_whitespace() && !is_reset(b) {
                    self.junk.clear();
                    self.junk.push(char::from(b));
                    self.state = State::Junk;
                }
                None
            }
            State::Junk => {
                if b.is_ascii_whitespace() || is_reset(b) || b == b'{' || b == b'[' {
                    let junk = std::mem::take(&mut self.junk);
                    self.state = State::Idle;
                    if b == b'{' || b == b'[' {
                        self.step(b);
                    }
                    return Some(Split::Error(JsonError::Junk(junk)));
                }
                if self.junk.len() < 32 {
                    self.junk.push(if b.is_ascii_graphic() {
                        char::from(b)
                    } else {
                        '?'
                    });
                }
                None
            }
            State::Value {
                depth,
                mut quote,
                mut escaped,
            } => {
                if is_reset(b) {
                    self.reset();
                    return None;
                }
                if self.buf.len() >= MAX_REQUEST_BYTES {
                    self.buf = Vec::new();
                    self.state = State::Skip {
                        depth,
                        quote,
                        escaped,
                    };
                    return self.step(b);
                }
                self.buf.push(b);
                let depth = track(b, depth, &mut quote, &mut escaped);
                if depth == 0 {
                    self.state = State::Idle;
                    return Some(Split::Value(std::mem::take(&mut self.buf)));
                }
                self.state = State::Value {
                    depth,
                    quote,
                    escaped,
                };
                None
            }
            State::Skip {
                depth,
                mut quote,
                mut escaped,
            } => {
                if is_reset(b) {
                    self.reset();
                    return Some(Split::Error(JsonError::TooLarge));
                }
                let depth = track(b, depth, &mut quote, &mut escaped);
                if depth == 0 {
                    self.state = State::Idle;
                    return Some(Split::Error(JsonError::TooLarge));
                }
                self.state = State::Skip {
                    depth,
                    quote,
                    escaped,
                };
                None
            }
        }
    }
}

/// Parses one complete value (as the splitter hands it out).
pub fn parse(text: &[u8]) -> Result<Value, JsonError> {
    let mut p = Parser { s: text, at: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.at != p.s.len() {
        return Err(JsonError::Syntax("trailing characters"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        self.ws();
        if self.peek() == Some(b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        self.ws();
        match self.peek() {
            Some(b'{') => {
                self.at += 1;
                let mut members = Vec::new();
                if self.eat(b'}') {
                    return Ok(Value::Object(members));
                }
                loop {
                    self.ws();
                    let key = match self.peek() {
                        Some(q @ (b'"' | b'\'')) => self.string(q)?,
                        _ => return Err(JsonError::Syntax("expected a member name")),
                    };
                    if !self.eat(b':') {
                        return Err(JsonError::Syntax("expected ':'"));
                    }
                    let v = self.value(depth + 1)?;
                    members.push((key, v));
                    if self.eat(b',') {
                        continue;
                    }
                    if self.eat(b'}') {
                        return Ok(Value::Object(members));
                    }
                    return Err(JsonError::Syntax("expected ',' or '}'"));
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                if self.eat(b']') {
                    return Ok(Value::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    if self.eat(b',') {
                        continue;
                    }
                    if self.eat(b']') {
                        return Ok(Value::Array(items));
                    }
                    return Err(JsonError::Syntax("expected ',' or ']'"));
                }
            }
            Some(q @ (b'"' | b'\'')) => self.string(q).map(Value::Str),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'a'..=b'z') => {
                let start = self.at;
                while self.peek().is_some_and(|b| b.is_ascii_alphabetic()) {
                    self.at += 1;
                }
                match &self.s[start..self.at] {
                    b"true" => Ok(Value::Bool(true)),
                    b"false" => Ok(Value::Bool(false)),
                    b"null" => Ok(Value::Null),
                    _ => Err(JsonError::Syntax("invalid keyword")),
                }
            }
            Some(_) => Err(JsonError::Syntax("unexpected character")),
            None => Err(JsonError::Syntax("unexpected end of input")),
        }
    }

    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.at;
        let digits = |p: &mut Self| {
            let from = p.at;
            while p.peek().is_some_and(|b| b.is_ascii_digit()) {
                p.at += 1;
            }
            p.at > from
        };
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let int_start = self.at;
        if !digits(self) || (self.s[int_start] == b'0' && self.at - int_start > 1) {
            return Err(JsonError::Syntax("invalid number"));
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.at += 1;
            integer = false;
            if !digits(self) {
                return Err(JsonError::Syntax("invalid number"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            integer = false;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if !digits(self) {
                return Err(JsonError::Syntax("invalid number"));
            }
        }
        // ASCII digits and signs only, checked above.
        let text = String::from_utf8_lossy(&self.s[start..self.at]).into_owned();
        if integer {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Value::Int(i));
            }
        }
        // An integer beyond i64 is not an integer, as in QEMU's parser.
        Ok(Value::Number(text))
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .s
            .get(self.at..self.at + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or(JsonError::Syntax("invalid \\u escape"))?;
        self.at += 4;
        Ok(digits)
    }

    fn string(&mut self, quote: u8) -> Result<String, JsonError> {
        self.at += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            // A run of plain bytes is copied at once (a `guest-file-write`'s base64 is one).
            let rest = &self.s[self.at..];
            let run = rest
                .iter()
                .position(|&b| b == quote || b == b'\\' || b < 0x20)
                .unwrap_or(rest.len());
            out.extend_from_slice(&rest[..run]);
            self.at += run;
            let Some(b) = self.peek() else {
                return Err(JsonError::Syntax("unterminated string"));
            };
            self.at += 1;
            match b {
                _ if b == quote => break,
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err(JsonError::Syntax("unterminated string"));
                    };
                    self.at += 1;
                    let c = match e {
                        b'"' | b'\'' | b'\\' | b'/' => char::from(e),
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi)
                                && self.s.get(self.at..self.at + 2) == Some(b"\\u")
                            {
                                self.at += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(JsonError::Syntax("invalid surrogate pair"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or(JsonError::Syntax("invalid \\u escape"))?
                        }
                        _ => return Err(JsonError::Syntax("invalid escape")),
                    };
                    let mut tmp = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                }
                _ => return Err(JsonError::Syntax("control character in a string")),
            }
        }
        String::from_utf8(out).map_err(|_| JsonError::Syntax("invalid UTF-8 in a string"))
    }
}

impl Value {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Appends the ASCII JSON text of the value to `out`.
    pub fn write_bytes(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Value::Number(text) => out.extend_from_slice(text.as_bytes()),
            Value::Str(s) => write_str(s, out),
            Value::Base64(data) => {
                // Room for what usually follows (the rest of the reply), so the large line is
                // not moved again.
                out.reserve(super::base64::encoded_len(data) + 64);
                out.push(b'"');
                super::base64::encode_into(data, out);
                out.push(b'"');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    v.write_bytes(out);
                }
                out.push(b']');
            }
            Value::Object(members) => {
                out.push(b'{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    write_str(k, out);
                    out.extend_from_slice(b": ");
                    v.write_bytes(out);
                }
                out.push(b'}');
            }
        }
    }

    /// The value as ASCII JSON text.
    pub fn to_text(&self) -> String {
        let mut out = Vec::new();
        self.write_bytes(&mut out);
        // write_bytes writes ASCII only.
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Writes `s` as a JSON string: printable ASCII runs are copied whole (a file read's base64
/// is one run), everything else is escaped.
fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let mut run = 0;
    for (at, c) in s.char_indices() {
        if matches!(c, ' '..='~') && c != '"' && c != '\\' {
            continue;
        }
        out.extend_from_slice(&s.as_bytes()[run..at]);
        run = at + c.len_utf8();
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.extend_from_slice(b"\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(HEX[usize::from((*u >> shift) & 0xF)]);
                    }
                }
            }
        }
    }
    out.extend_from_slice(&s.as_bytes()[run..]);
    out.push(b'"');
}

/// Builds an object from `(name, value)` pairs.
pub fn obj<const N: usize>(members: [(&str, Value); N]) -> Value {
    Value::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<u64> for Value {
    /// Values above `i64::MAX` (none a guest reports) saturate.
    fn from(i: u64) -> Self {
        Value::Int(i64::try_from(i).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// `push` tracks a value's bytes in runs; stepping byte by byte is the reference.
        #[test]
        fn pushing_runs_splits_as_stepping_byte_by_byte(
            input in proptest::collection::vec(
                proptest::sample::select(b"{}[]\"'\\ a:,\xff\n".to_vec()), 0..200),
            cut in 0usize..200,
        ) {
            let mut stepped = Splitter::new();
            let want: Vec<Split> = input.iter().filter_map(|&b| stepped.step(b)).collect();
            // Fed in two pieces, so a run also ends at the end of the input.
            let cut = cut.min(input.len());
            let mut pushed = Splitter::new();
            let mut got = Vec::new();
            for mut rest in [&input[..cut], &input[cut..]] {
                while !rest.is_empty() {
                    let (n, found) = pushed.push(rest);
                    rest = &rest[n..];
                    got.extend(found);
                }
            }
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(pushed.mid_value(), stepped.mid_value());
        }
    }

    fn split_all(input: &[u8]) -> Vec<Split> {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let (n, found) = s.push(rest);
            rest = &rest[n..];
            out.extend(found);
        }
        out
    }

    #[test]
    fn request_ends_at_its_closing_brace_without_a_newline() {
        let got = split_all(br#"{"execute":"guest-ping"}"#);
        assert_eq!(
            got,
            vec![Split::Value(br#"{"execute":"guest-ping"}"#.to_vec())]
        );
    }

    #[test]
    fn two_requests_in_one_write_come_out_in_order() {
        let got = split_all(b"{\"a\":1}\n  {\"b\":\"}\"}\n");
        assert_eq!(
            got,
            vec![
                Split::Value(b"{\"a\":1}".to_vec()),
                Split::Value(b"{\"b\":\"}\"}".to_vec())
            ]
        );
    }

    #[test]
    fn braces_inside_strings_and_escaped_quotes_do_not_end_a_request() {
        let req = br#"{"a":"x\"}{","b":'y}\''}"#;
        assert_eq!(split_all(req), vec![Split::Value(req.to_vec())]);
    }

    #[test]
    fn byte_ff_drops_a_partial_request() {
        let got = split_all(b"{\"execute\":\"guest-shut\xff{\"execute\":\"guest-ping\"}");
        assert_eq!(
            got,
            vec![Split::Value(b"{\"execute\":\"guest-ping\"}".to_vec())]
        );
    }

    #[test]
    fn reset_forgets_what_a_previous_host_sent() {
        let mut s = Splitter::new();
        assert_eq!(s.push(b"{\"execute\":\"guest-shutdown\"").1, None);
        assert!(s.mid_value());
        s.reset();
        let req = br#"{"execute":"guest-ping"}"#;
        assert_eq!(s.push(req), (req.len(), Some(Split::Value(req.to_vec()))));
    }

    #[test]
    fn junk_between_requests_is_one_error_and_the_next_request_still_runs() {
        let got = split_all(b"garbage{\"a\":1}");
        assert_eq!(
            got,
            vec![
                Split::Error(JsonError::Junk("garbage".into())),
                Split::Value(b"{\"a\":1}".to_vec())
            ]
        );
    }

    #[test]
    fn oversized_request_is_skipped_whole_with_one_error() {
        let mut input = b"{\"a\":\"".to_vec();
        input.resize(MAX_REQUEST_BYTES + 10, b'x');
        input.extend_from_slice(b"\"}{\"b\":1}");
        let got = split_all(&input);
        assert_eq!(
            got,
            vec![
                Split::Error(JsonError::TooLarge),
                Split::Value(b"{\"b\":1}".to_vec())
            ]
        );
    }

    #[test]
    fn parses_requests_with_single_quotes_unicode_and_negative_ids() {
        let v = parse(
            br#"{'execute': "guest-sync", "arguments": {"id": -5}, "x": "\u00e9\ud83d\ude00"}"#,
        )
        .unwrap();
        assert_eq!(v.get("execute"), Some(&Value::from("guest-sync")));
        assert_eq!(
            v.get("arguments").and_then(|a| a.get("id")),
            Some(&Value::Int(-5))
        );
        assert_eq!(v.get("x"), Some(&Value::from("é😀")));
    }

    #[test]
    fn numbers_with_a_fraction_or_beyond_i64_are_not_integers() {
        assert_eq!(
            parse(b"[1.0]").unwrap(),
            Value::Array(vec![Value::Number("1.0".into())])
        );
        assert_eq!(
            parse(b"[-2.5e+3]").unwrap(),
            Value::Array(vec![Value::Number("-2.5e+3".into())])
        );
        for bad in [&b"[01]"[..], b"[1.]", b"[.5]", b"[1e]", b"[-]", b"[+1]"] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            parse(b"[99999999999999999999]").unwrap(),
            Value::Array(vec![Value::Number("99999999999999999999".into())])
        );
        assert_eq!(
            parse(b"[-9223372036854775808]").unwrap(),
            Value::Array(vec![Value::Int(i64::MIN)])
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut t = vec![b'['; 10_000];
        t.extend(vec![b']'; 10_000]);
        assert_eq!(parse(&t), Err(JsonError::TooDeep));
    }

    #[test]
    fn malformed_values_are_errors() {
        for bad in [
            &b"{\"a\" 1}"[..],
            b"{\"a\":tru}",
            b"{\"a\":\"x\ny\"}",
            b"{\"a\":1,}",
            b"{\"a\":\"\\u12\"}",
            b"{\"a\":\"\\ud800\\u0041\"}",
            b"{1:2}",
            b"{\"a\":\"\xff\"}",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn output_is_ascii_with_escapes() {
        let v = obj([
            ("s", Value::from("é\u{1}\"\\\n😀")),
            ("n", Value::Int(-3)),
            ("f", Value::Number("1.5".into())),
            ("a", Value::Array(vec![Value::Null, Value::Bool(true)])),
        ]);
        let text = v.to_text();
        assert!(text.is_ascii());
        assert_eq!(
            text,
            r#"{"s": "\u00E9\u0001\"\\\n\uD83D\uDE00", "n": -3, "f": 1.5, "a": [null, true]}"#
        );
        assert_eq!(parse(text.as_bytes()).unwrap(), v);
    }
}
