//! The protocol test vectors (proto/testdata/vectors.txt) against qx_proto as the
//! guest crate links it (its own features and build), so both ends agree on the bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../proto/tests/support/mod.rs"]
mod support;

#[test]
fn guest_build_of_the_codec_decodes_and_encodes_every_vector() {
    assert!(support::check_all() >= 12);
}
