//! The Quantix guest agent as a library.
//!
//! Two layers:
//! - **Protocol core, no I/O:** [`outbox`] (fixed-capacity, frame-preserving output),
//!   [`session`] (link state, hellos, liveness, acks, reply cache), [`logring`] (the agent's
//!   own log), [`config`]. Tests drive them with byte buffers and `Instant`s.
//! - **I/O shell:** [`event_loop`] (one `mio::Poll`, one thread), [`transport`] (the
//!   virtio-serial port or a unix socket), [`exec`] (child processes), [`power`], [`dispatch`]
//!   (every request type to its handler), [`worker`] (the one thread for calls that can block
//!   in a filesystem) and [`sys`] (the crate's only `unsafe`: its libc calls, the operations'
//!   included). `main.rs` parses the command line and calls [`event_loop::run`].
//!
//! Operations themselves (files, freeze, users, ...) live in [`ops`]. [`qga`] is the second
//! front end: qemu-guest-agent's JSON protocol on its own port, calling the same operations.

pub mod config;
pub mod dispatch;
pub mod event_loop;
pub mod exec;
pub mod logring;
pub mod ops;
pub mod outbox;
pub mod power;
pub mod qga;
pub mod session;
pub mod sys;
pub mod transport;
pub mod worker;
