//! The Quantix guest agent as a library: everything but the device I/O.

pub mod ops;
