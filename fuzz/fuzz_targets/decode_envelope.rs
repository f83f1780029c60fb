//! Arbitrary bytes as a frame payload: decoding an `Envelope` never panics, and whatever
//! decodes re-encodes to a payload that decodes to the same envelope. The agent's own decoder
//! (`decode_host_envelope`) never panics either, and takes whatever the full decoder takes,
//! with the same ids and the same payload kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qx_proto::{decode_envelope, encode_envelope, Decoder, DEFAULT_MAX_FRAME_BYTES};

fuzz_target!(|data: &[u8]| {
    let host = qx_proto::decode_host_envelope(data);
    let Ok(env) = decode_envelope(data) else {
        return;
    };
    match host {
        Ok(h) => {
            assert_eq!((h.id, h.correlation_id), (env.id, env.correlation_id));
            assert_eq!(
                qx_proto::envelope_payload_name(&h),
                qx_proto::envelope_payload_name(&env)
            );
        }
        Err(e) => panic!("the agent's decoder refused what the full decoder took: {e}"),
    }
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
