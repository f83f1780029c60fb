//! A qemu-ga request's members and arguments, and the reply line, sans-io.
//!
//! A request is an object with `execute` (string), optional `arguments` (object) and optional
//! `id` (echoed). Arguments are checked the way QEMU's generated marshallers check them, with
//! the same messages, so clients that match on them keep working.

use super::json::{obj, Value};

/// qemu-ga's two error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QgaError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QgaError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QgaError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn not_found(name: &str) -> Self {
        QgaError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {name} has not been found"),
        }
    }

    pub fn disabled(name: &str) -> Self {
        QgaError {
            class: ErrorClass::CommandNotFound,
            desc: format!("Command {name} has been disabled: the command is not allowed"),
        }
    }
}

pub type QgaResult<T> = Result<T, QgaError>;

/// A well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    pub args: Args,
    pub id: Option<Value>,
}

/// Turns a parsed value into a request. The error carries the id when there was one.
pub fn request(v: Value) -> Result<Request, (QgaError, Option<Value>)> {
    let Value::Object(members) = v else {
        return Err((QgaError::generic("QMP input must be a JSON object"), None));
    };
    let mut execute = None;
    let mut args = None;
    let mut id = None;
    let mut bad = None;
    for (k, v) in members {
        match k.as_str() {
            "execute" => execute = Some(v),
            "arguments" => args = Some(v),
            "id" => id = Some(v),
            _ => bad = bad.or(Some(format!("QMP input member '{k}' is unexpected"))),
        }
    }
    if let Some(desc) = bad {
        return Err((QgaError::generic(desc), id));
    }
    let execute = match execute {
        Some(Value::Str(s)) => s,
        Some(_) => {
            return Err((
                QgaError::generic("QMP input member 'execute' must be a string"),
                id,
            ))
        }
        None => return Err((QgaError::generic("QMP input lacks member 'execute'"), id)),
    };
    let args = match args {
        None => Vec::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err((
                QgaError::generic("QMP input member 'arguments' must be an object"),
                id,
            ))
        }
    };
    Ok(Request {
        execute,
        args: Args(args),
        id,
    })
}

/// A command's arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Args(pub Vec<(String, Value)>);

fn type_error(key: &str, expected: &str) -> QgaError {
    QgaError::generic(format!(
        "Invalid parameter type for '{key}', expected: {expected}"
    ))
}

fn missing(key: &str) -> QgaError {
    QgaError::generic(format!("Parameter '{key}' is missing"))
}

impl Args {
    /// Refuses members the command does not take.
    pub fn only(&self, allowed: &[&str]) -> QgaResult<()> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(QgaError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }

    /// The member `key`; JSON `null` counts as absent, as in QEMU.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .filter(|v| **v != Value::Null)
    }

    pub fn opt_int(&self, key: &str) -> QgaResult<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Int(i)) => Ok(Some(*i)),
            Some(_) => Err(type_error(key, "integer")),
        }
    }

    pub fn int(&self, key: &str) -> QgaResult<i64> {
        self.opt_int(key)?.ok_or_else(|| missing(key))
    }

    pub fn opt_bool(&self, key: &str) -> QgaResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(type_error(key, "boolean")),
        }
    }

    pub fn opt_str(&self, key: &str) -> QgaResult<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(key, "string")),
        }
    }

    pub fn str(&self, key: &str) -> QgaResult<&str> {
        self.opt_str(key)?.ok_or_else(|| missing(key))
    }

    pub fn opt_str_list(&self, key: &str) -> QgaResult<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    _ => Err(type_error(key, "string")),
                })
                .collect::<QgaResult<Vec<_>>>()
                .map(Some),
            Some(_) => Err(type_error(key, "array")),
        }
    }

    pub fn str_list(&self, key: &str) -> QgaResult<Vec<String>> {
        self.opt_str_list(key)?.ok_or_else(|| missing(key))
    }
}

/// Appends the reply line (with its `\n`) for a result to `line`, after `prefix` (the 0xFF
/// of `guest-sync-delimited`, or nothing). The result is consumed: a file read's base64 is
/// written once, not copied. Written member by member rather than as one object value, so a
/// ping's reply allocates nothing of its own.
pub fn write_reply_line(
    line: &mut Vec<u8>,
    prefix: &[u8],
    id: Option<&Value>,
    result: QgaResult<Value>,
) {
    line.extend_from_slice(prefix);
    match result {
        Ok(v) => {
            line.extend_from_slice(b"{\"return\": ");
            v.write_bytes(line);
        }
        Err(e) => {
            let class = match e.class {
                ErrorClass::GenericError => "GenericError",
                ErrorClass::CommandNotFound => "CommandNotFound",
            };
            line.extend_from_slice(b"{\"error\": ");
            obj([("class", Value::from(class)), ("desc", Value::from(e.desc))]).write_bytes(line);
        }
    }
    if let Some(id) = id {
        line.extend_from_slice(b", \"id\": ");
        id.write_bytes(line);
    }
    line.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::json::parse;
    use super::*;

    fn req(text: &str) -> Result<Request, (QgaError, Option<Value>)> {
        request(parse(text.as_bytes()).unwrap())
    }

    #[test]
    fn request_members_are_checked_with_qemus_messages() {
        let r = req(r#"{"execute":"guest-sync","arguments":{"id":7},"id":"a"}"#).unwrap();
        assert_eq!(r.execute, "guest-sync");
        assert_eq!(r.args.int("id"), Ok(7));
        assert_eq!(r.id, Some(Value::from("a")));
        assert_eq!(
            req(r#"[1]"#).unwrap_err().0.desc,
            "QMP input must be a JSON object"
        );
        assert_eq!(
            req(r#"{"arguments":{}}"#).unwrap_err().0.desc,
            "QMP input lacks member 'execute'"
        );
        let e = req(r#"{"execute":"guest-ping","exec-oob":"x","id":3}"#).unwrap_err();
        assert_eq!(e.0.desc, "QMP input member 'exec-oob' is unexpected");
        assert_eq!(e.1, Some(Value::Int(3)));
        assert_eq!(
            req(r#"{"execute":"guest-ping","arguments":[]}"#)
                .unwrap_err()
                .0
                .desc,
            "QMP input member 'arguments' must be an object"
        );
    }

    #[test]
    fn argument_types_are_strict() {
        let r = req(r#"{"execute":"x","arguments":{"id":1.0,"b":"true","n":null}}"#).unwrap();
        assert_eq!(
            r.args.int("id").unwrap_err().desc,
            "Invalid parameter type for 'id', expected: integer"
        );
        assert!(r.args.opt_bool("b").is_err());
        assert_eq!(r.args.opt_int("n"), Ok(None));
        assert_eq!(
            r.args.int("missing").unwrap_err().desc,
            "Parameter 'missing' is missing"
        );
        assert_eq!(
            r.args.only(&["id", "b"]).unwrap_err().desc,
            "Parameter 'n' is unexpected"
        );
    }

    fn line(prefix: &[u8], id: Option<&Value>, result: QgaResult<Value>) -> Vec<u8> {
        let mut out = Vec::new();
        write_reply_line(&mut out, prefix, id, result);
        out
    }

    #[test]
    fn reply_lines_echo_the_id_and_end_with_a_newline() {
        assert_eq!(
            line(&[0xFF], Some(&Value::Int(-1)), Ok(Value::Int(5))),
            b"\xff{\"return\": 5, \"id\": -1}\n"
        );
        assert_eq!(
            line(b"", None, Err(QgaError::not_found("guest-foo"))),
            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command guest-foo has not been found\"}}\n"
        );
    }
}
