//! The qemu-ga front end: qemu-guest-agent's JSON protocol on `org.qemu.guest_agent.0`.
//!
//! Primer (docs/qemu-ga.md has the whole story): the host writes JSON objects with no
//! framing; a request runs when its closing `}` arrives, 0xFF resets the stream. Each request
//! gets exactly one `\n`-terminated ASCII reply line, in request order.
//!
//! Layers: [`json`] (stream splitter, parser, encoder), [`request`] (members, arguments,
//! reply lines), [`base64`] and [`outbox`] are sans-io.

pub mod base64;
pub mod json;
pub mod outbox;
pub mod request;
