//! Envelopes in frames: the join between the messages and the codec.

use crate::agent::{envelope::Payload, Envelope};
use crate::codec::{self, EncodeError, HEADER_BYTES};
use prost::Message;

/// Size of the whole frame `env` encodes to.
pub fn encoded_frame_len(env: &Envelope) -> usize {
    HEADER_BYTES + env.encoded_len()
}

/// Appends `env` to `out` as one whole frame, or appends nothing.
pub fn encode_envelope(
    env: &Envelope,
    max_frame_bytes: u32,
    out: &mut Vec<u8>,
) -> Result<usize, EncodeError> {
    encode_envelope_with_tail(env, max_frame_bytes, None, out)
}

/// As [`encode_envelope`], for an envelope whose encoding ends with `tail = (len, crc32c)`:
/// a transfer's data, encoded last, whose CRC32C the sender already has. The payload is
/// encoded straight after the header's place in `out` (no copy of its own), and only the
/// bytes before the tail are read for the frame's checksum.
pub fn encode_envelope_with_tail(
    env: &Envelope,
    max_frame_bytes: u32,
    tail: Option<(usize, u32)>,
    out: &mut Vec<u8>,
) -> Result<usize, EncodeError> {
    let len = env.encoded_len();
    codec::check_len(len, max_frame_bytes)?;
    let start = out.len();
    out.reserve(HEADER_BYTES + len);
    out.resize(start + HEADER_BYTES, 0);
    if env.encode(out).is_err() {
        // Reserved above: prost cannot run out of room in a Vec.
        out.truncate(start);
        return Err(EncodeError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    let payload = &out[start + HEADER_BYTES..];
    let crc = match tail {
        Some((n, crc)) => codec::crc32c_with_tail(payload, n, crc),
        None => codec::crc32c(payload),
    };
    let header = codec::header_with_crc(len, crc)?;
    out[start..start + HEADER_BYTES].copy_from_slice(&header);
    Ok(HEADER_BYTES + len)
}

/// Decodes a frame payload produced by [`crate::Decoder::decode`].
pub fn decode_envelope(payload: &[u8]) -> Result<Envelope, prost::DecodeError> {
    Envelope::decode(payload)
}

/// Decodes a frame payload the agent received from a host: as [`decode_envelope`], except
/// that a payload only the agent sends (its replies, telemetry, `AgentReady`: the list is in
/// `build.rs`) is recognised by its tag and comes back empty, its bytes skipped unread. The
/// agent only ever refuses those, and so links none of their decoders (about 30 KB of it).
pub fn decode_host_envelope(mut buf: &[u8]) -> Result<Envelope, prost::DecodeError> {
    use prost::encoding::{decode_key, uint64, DecodeContext};
    let mut env = Envelope::default();
    let ctx = DecodeContext::default();
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match tag {
            1 => uint64::merge(wire_type, &mut env.id, &mut buf, ctx.clone())?,
            2 => uint64::merge(wire_type, &mut env.correlation_id, &mut buf, ctx.clone())?,
            _ => merge_host_payload(&mut env.payload, tag, wire_type, &mut buf, ctx.clone())?,
        }
    }
    Ok(env)
}

/// Defines `merge_host_payload` (one payload field into `payload`, or an unknown field
/// skipped) and `HOST_SENT_TAGS`, `AGENT_SENT_TAGS` from `host_payloads.rs`.
macro_rules! host_payloads {
    (decoded: [$($dt:literal => $dv:ident,)*], skipped: [$($st:literal => $sv:ident,)*],) => {
        /// Payload tags the agent decodes.
        #[cfg(test)]
        const HOST_SENT_TAGS: &[u32] = &[$($dt),*];
        /// Payload tags the agent recognises without decoding.
        #[cfg(test)]
        const AGENT_SENT_TAGS: &[u32] = &[$($st),*];

        fn merge_host_payload(
            payload: &mut Option<Payload>,
            tag: u32,
            wire_type: prost::encoding::WireType,
            buf: &mut &[u8],
            ctx: prost::encoding::DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            use prost::encoding::{check_wire_type, message, skip_field, WireType};
            match tag {
                $($dt => {
                    // A repeated field merges into the message already there, as prost does.
                    let mut m = match payload.take() {
                        Some(Payload::$dv(m)) => m,
                        _ => Default::default(),
                    };
                    message::merge(wire_type, &mut m, buf, ctx)?;
                    *payload = Some(Payload::$dv(m));
                })*
                $($st => {
                    check_wire_type(WireType::LengthDelimited, wire_type)?;
                    skip_field(wire_type, tag, buf, ctx)?;
                    *payload = Some(Payload::$sv(Default::default()));
                })*
                _ => skip_field(wire_type, tag, buf, ctx)?,
            }
            Ok(())
        }
    };
}

include!(concat!(env!("OUT_DIR"), "/host_payloads.rs"));

/// The envelope's payload field name in `agent.proto` ("none" when absent).
pub fn envelope_payload_name(env: &Envelope) -> &'static str {
    env.payload.as_ref().map_or("none", payload_name)
}

/// The payload's field name in `agent.proto`, for logs and counters.
pub fn payload_name(payload: &Payload) -> &'static str {
    match payload {
        Payload::HostHello(_) => "host_hello",
        Payload::AgentReady(_) => "agent_ready",
        Payload::Ping(_) => "ping",
        Payload::Pong(_) => "pong",
        Payload::Ack(_) => "ack",
        Payload::Error(_) => "error",
        Payload::Cancel(_) => "cancel",
        Payload::Done(_) => "done",
        Payload::TelemetryRequest(_) => "telemetry_request",
        Payload::Telemetry(_) => "telemetry",
        Payload::SetTelemetryInterval(_) => "set_telemetry_interval",
        Payload::ExecRequest(_) => "exec_request",
        Payload::ExecOutput(_) => "exec_output",
        Payload::ExecExit(_) => "exec_exit",
        Payload::ExecKill(_) => "exec_kill",
        Payload::FileReadRequest(_) => "file_read_request",
        Payload::FileChunk(_) => "file_chunk",
        Payload::FileReadDone(_) => "file_read_done",
        Payload::FileWriteOpen(_) => "file_write_open",
        Payload::FileWriteOpened(_) => "file_write_opened",
        Payload::FileWriteChunk(_) => "file_write_chunk",
        Payload::FileWriteClose(_) => "file_write_close",
        Payload::FileWriteDone(_) => "file_write_done",
        Payload::FileListRequest(_) => "file_list_request",
        Payload::FileList(_) => "file_list",
        Payload::FileStatRequest(_) => "file_stat_request",
        Payload::FileStat(_) => "file_stat",
        Payload::MkdirRequest(_) => "mkdir_request",
        Payload::DeleteRequest(_) => "delete_request",
        Payload::FileHashRequest(_) => "file_hash_request",
        Payload::FileHash(_) => "file_hash",
        Payload::FsFreezeRequest(_) => "fs_freeze_request",
        Payload::FsFreezeReply(_) => "fs_freeze_reply",
        Payload::FsThawRequest(_) => "fs_thaw_request",
        Payload::FsThawReply(_) => "fs_thaw_reply",
        Payload::FsFreezeStatusRequest(_) => "fs_freeze_status_request",
        Payload::FsFreezeStatus(_) => "fs_freeze_status",
        Payload::FsTrimRequest(_) => "fs_trim_request",
        Payload::FsTrimReply(_) => "fs_trim_reply",
        Payload::TimeGetRequest(_) => "time_get_request",
        Payload::TimeInfo(_) => "time_info",
        Payload::TimeSetRequest(_) => "time_set_request",
        Payload::TimeSetReply(_) => "time_set_reply",
        Payload::PowerRequest(_) => "power_request",
        Payload::PowerReply(_) => "power_reply",
        Payload::UsersRequest(_) => "users_request",
        Payload::UserList(_) => "user_list",
        Payload::SetPasswordRequest(_) => "set_password_request",
        Payload::SshKeysListRequest(_) => "ssh_keys_list_request",
        Payload::SshKeys(_) => "ssh_keys",
        Payload::SshKeysAddRequest(_) => "ssh_keys_add_request",
        Payload::SshKeysRemoveRequest(_) => "ssh_keys_remove_request",
        Payload::NetworkRequest(_) => "network_request",
        Payload::NetworkInfo(_) => "network_info",
        Payload::DisksRequest(_) => "disks_request",
        Payload::DisksInfo(_) => "disks_info",
        Payload::LogsRequest(_) => "logs_request",
        Payload::AgentLogs(_) => "agent_logs",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::agent::Ping;
    use crate::{Decoder, DEFAULT_MAX_FRAME_BYTES};

    /// The vectors printed in docs/protocol.md, computed there by an independent
    /// implementation (bitwise CRC-32C, hand-assembled protobuf).
    #[test]
    fn document_vectors_match_the_encoder() {
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut out = Vec::new();
        crate::codec::encode_frame(&[], DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
        assert_eq!(hex(&out), "51 54 58 01 00 00 00 00 00 00 00 00 1d e0 8b 20");

        let ping = Envelope {
            id: 1,
            correlation_id: 0,
            payload: Some(Payload::Ping(Ping { seq: 1 })),
        };
        out.clear();
        encode_envelope(&ping, DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
        assert_eq!(
            hex(&out),
            "51 54 58 01 00 00 00 06 b1 2b 4d 63 42 a5 b5 da 08 01 2a 02 08 01"
        );

        let ack = Envelope {
            id: 2,
            correlation_id: 7,
            payload: Some(Payload::Ack(crate::agent::Ack {})),
        };
        out.clear();
        encode_envelope(&ack, DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
        assert_eq!(
            hex(&out),
            "51 54 58 01 00 00 00 06 20 85 8f 4c fa 98 9d 0c 08 02 10 07 3a 00"
        );
    }

    /// Envelope id 7 whose payload field `tag` holds `contents`.
    fn raw(tag: u32, contents: &[u8]) -> Vec<u8> {
        let mut b = vec![0x08, 0x07];
        prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut b);
        prost::encoding::encode_varint(contents.len() as u64, &mut b);
        b.extend_from_slice(contents);
        b
    }

    #[test]
    fn every_payload_is_either_decoded_or_recognised_for_the_agent() {
        let mut all: Vec<u32> = HOST_SENT_TAGS
            .iter()
            .chain(AGENT_SENT_TAGS)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), HOST_SENT_TAGS.len() + AGENT_SENT_TAGS.len());
        for &tag in &all {
            let full = decode_envelope(&raw(tag, &[])).unwrap();
            assert!(full.payload.is_some(), "tag {tag}");
            assert_eq!(
                decode_host_envelope(&raw(tag, &[])).unwrap(),
                full,
                "tag {tag}"
            );
        }
        // Host requests: everything the agent serves is decoded.
        for name in [
            "host_hello",
            "ping",
            "exec_request",
            "file_write_chunk",
            "logs_request",
        ] {
            let tag = all
                .iter()
                .copied()
                .find(|&t| envelope_payload_name(&decode_envelope(&raw(t, &[])).unwrap()) == name)
                .unwrap();
            assert!(HOST_SENT_TAGS.contains(&tag), "{name}");
        }
    }

    #[test]
    fn host_envelopes_decode_as_the_full_decoder_does() {
        use crate::agent::{ExecRequest, FileWriteChunk};
        let envs = [
            Envelope {
                id: 9,
                correlation_id: 3,
                payload: Some(Payload::ExecRequest(ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "true".into()],
                    env: vec!["A=b".into()],
                    stdin: b"in".to_vec(),
                    ..Default::default()
                })),
            },
            Envelope {
                id: 10,
                correlation_id: 0,
                payload: Some(Payload::FileWriteChunk(FileWriteChunk {
                    data: vec![1, 2, 3],
                    ..Default::default()
                })),
            },
            Envelope {
                id: 11,
                correlation_id: 0,
                payload: None,
            },
        ];
        for env in envs {
            let bytes = env.encode_to_vec();
            assert_eq!(decode_host_envelope(&bytes).unwrap(), env);
            // A field repeated merges into the first, as prost's decoder does.
            let twice = [bytes.clone(), bytes].concat();
            assert_eq!(
                decode_host_envelope(&twice).unwrap(),
                decode_envelope(&twice).unwrap()
            );
        }
        // Unknown fields are skipped by both.
        let mut odd = raw(5, &[0x08, 0x01]);
        odd.extend_from_slice(&[0xf8, 0x3f, 0x05]);
        assert_eq!(
            decode_host_envelope(&odd).unwrap(),
            decode_envelope(&odd).unwrap()
        );
        // Truncated input fails in both.
        let cut = &raw(5, &[0x08, 0x01])[..5];
        assert!(decode_envelope(cut).is_err());
        assert!(decode_host_envelope(cut).is_err());
    }

    #[test]
    fn payloads_only_the_agent_sends_are_skipped_unread() {
        let tag = AGENT_SENT_TAGS[0];
        // Contents that do not decode as any message: the agent never looks at them.
        let junk = raw(tag, &[0xff, 0xff, 0xff]);
        assert!(decode_envelope(&junk).is_err());
        let env = decode_host_envelope(&junk).unwrap();
        assert_eq!(env, decode_envelope(&raw(tag, &[])).unwrap());
        assert_eq!(env.id, 7);
        // The wire type is still checked.
        let mut varint = vec![0x08, 0x07];
        prost::encoding::encode_key(tag, prost::encoding::WireType::Varint, &mut varint);
        varint.push(1);
        assert!(decode_host_envelope(&varint).is_err());
    }

    #[test]
    fn envelope_round_trips_through_a_frame() {
        let env = Envelope {
            id: 7,
            correlation_id: 0,
            payload: Some(Payload::Ping(Ping { seq: 42 })),
        };
        let mut out = Vec::new();
        let n = encode_envelope(&env, DEFAULT_MAX_FRAME_BYTES, &mut out).unwrap();
        assert_eq!(n, encoded_frame_len(&env));
        let mut dec = Decoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&out);
        let got = decode_envelope(dec.decode().unwrap().unwrap()).unwrap();
        assert_eq!(got, env);
        assert_eq!(envelope_payload_name(&got), "ping");
    }

    #[test]
    fn a_transfers_data_crc_builds_and_is_read_back_from_the_frame_checksum() {
        use crate::agent::{FileChunk, FileWriteChunk};
        use crate::codec::{crc32c, tail_crc32c};
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 31 / 7) as u8).collect();
        let envs = [
            Envelope {
                id: 7,
                correlation_id: 3,
                payload: Some(Payload::FileChunk(FileChunk {
                    offset: 1 << 40,
                    data: data.clone(),
                })),
            },
            Envelope {
                id: u64::MAX,
                correlation_id: 0,
                payload: Some(Payload::FileWriteChunk(FileWriteChunk {
                    handle: 9,
                    offset: 12345,
                    data: data.clone(),
                })),
            },
        ];
        for env in envs {
            // The frame built from the data's CRC is the frame built from the bytes.
            let (mut plain, mut tailed) = (Vec::new(), Vec::new());
            encode_envelope(&env, 1 << 20, &mut plain).unwrap();
            let tail = Some((data.len(), crc32c(&data)));
            encode_envelope_with_tail(&env, 1 << 20, tail, &mut tailed).unwrap();
            assert_eq!(plain, tailed);
            // The data is the payload's tail, and its CRC comes back from the header's.
            let mut dec = crate::Decoder::new(1 << 20);
            dec.push(&tailed);
            let (payload, crc) = dec.decode_with_crc().unwrap().unwrap();
            assert!(payload.ends_with(&data));
            let data_crc = tail_crc32c(payload, crc, data.len());
            assert_eq!(data_crc, crc32c(&data));
        }
    }
}
