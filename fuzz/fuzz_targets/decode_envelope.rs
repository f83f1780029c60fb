//! Arbitrary bytes as a frame payload: decoding an `Envelope` never panics, and whatever
//! decodes re-encodes to a payload that decodes to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};

fuzz_target!(|data: &[u8]| {
    let Ok(env) = decode_envelope(data) else {
        return;
    };
    let _ = qx_proto::envelope_payload_name(&env);
    let mut frame = Vec::new();
    if encode_envelope(&env, DEFAULT_MAX_FRAME_BYTES, &mut frame).is_err() {
        // Only possible for an envelope above the frame limit, which cannot come from a
        // fuzz input of this size.
        panic!("re-encoding a decoded envelope failed");
    }
    let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
    assert_eq!(dec.push(&frame), frame.len());
    let payload = match dec.decode() {
        Ok(Some(p)) => p.to_vec(),
        other => panic!("own frame did not decode: {other:?}"),
    };
    let again = match decode_envelope(&payload) {
        Ok(e) => e,
        Err(e) => panic!("re-encoded envelope does not decode: {e}"),
    };
    assert_eq!(again, env);
});
