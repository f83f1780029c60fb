//! Storage: which host files requests may name ([`policy`]).

pub mod policy;
