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
    let payload = env.encode_to_vec();
    codec::encode_frame(&payload, max_frame_bytes, out)
}

/// Decodes a frame payload produced by [`crate::Decoder::decode`].
pub fn decode_envelope(payload: &[u8]) -> Result<Envelope, prost::DecodeError> {
    Envelope::decode(payload)
}

/// The payload's field name in `agent.proto` ("none" when absent), for logs and counters.
pub fn payload_name(env: &Envelope) -> &'static str {
    match &env.payload {
        Some(Payload::HostHello(_)) => "host_hello",
        Some(Payload::AgentReady(_)) => "agent_ready",
        Some(Payload::Ping(_)) => "ping",
        Some(Payload::Pong(_)) => "pong",
        Some(Payload::Ack(_)) => "ack",
        Some(Payload::Error(_)) => "error",
        Some(Payload::Cancel(_)) => "cancel",
        Some(Payload::Done(_)) => "done",
        Some(Payload::TelemetryRequest(_)) => "telemetry_request",
        Some(Payload::Telemetry(_)) => "telemetry",
        Some(Payload::SetTelemetryInterval(_)) => "set_telemetry_interval",
        Some(Payload::ExecRequest(_)) => "exec_request",
        Some(Payload::ExecOutput(_)) => "exec_output",
        Some(Payload::ExecExit(_)) => "exec_exit",
        Some(Payload::ExecKill(_)) => "exec_kill",
        Some(Payload::FileReadRequest(_)) => "file_read_request",
        Some(Payload::FileChunk(_)) => "file_chunk",
        Some(Payload::FileReadDone(_)) => "file_read_done",
        Some(Payload::FileWriteOpen(_)) => "file_write_open",
        Some(Payload::FileWriteOpened(_)) => "file_write_opened",
        Some(Payload::FileWriteChunk(_)) => "file_write_chunk",
        Some(Payload::FileWriteClose(_)) => "file_write_close",
        Some(Payload::FileWriteDone(_)) => "file_write_done",
        Some(Payload::FileListRequest(_)) => "file_list_request",
        Some(Payload::FileList(_)) => "file_list",
        Some(Payload::FileStatRequest(_)) => "file_stat_request",
        Some(Payload::FileStat(_)) => "file_stat",
        Some(Payload::MkdirRequest(_)) => "mkdir_request",
        Some(Payload::DeleteRequest(_)) => "delete_request",
        Some(Payload::FileHashRequest(_)) => "file_hash_request",
        Some(Payload::FileHash(_)) => "file_hash",
        Some(Payload::FsFreezeRequest(_)) => "fs_freeze_request",
        Some(Payload::FsFreezeReply(_)) => "fs_freeze_reply",
        Some(Payload::FsThawRequest(_)) => "fs_thaw_request",
        Some(Payload::FsThawReply(_)) => "fs_thaw_reply",
        Some(Payload::FsFreezeStatusRequest(_)) => "fs_freeze_status_request",
        Some(Payload::FsFreezeStatus(_)) => "fs_freeze_status",
        Some(Payload::FsTrimRequest(_)) => "fs_trim_request",
        Some(Payload::FsTrimReply(_)) => "fs_trim_reply",
        Some(Payload::TimeGetRequest(_)) => "time_get_request",
        Some(Payload::TimeInfo(_)) => "time_info",
        Some(Payload::TimeSetRequest(_)) => "time_set_request",
        Some(Payload::TimeSetReply(_)) => "time_set_reply",
        Some(Payload::PowerRequest(_)) => "power_request",
        Some(Payload::PowerReply(_)) => "power_reply",
        Some(Payload::UsersRequest(_)) => "users_request",
        Some(Payload::UserList(_)) => "user_list",
        Some(Payload::SetPasswordRequest(_)) => "set_password_request",
        Some(Payload::SshKeysListRequest(_)) => "ssh_keys_list_request",
        Some(Payload::SshKeys(_)) => "ssh_keys",
        Some(Payload::SshKeysAddRequest(_)) => "ssh_keys_add_request",
        Some(Payload::SshKeysRemoveRequest(_)) => "ssh_keys_remove_request",
        Some(Payload::NetworkRequest(_)) => "network_request",
        Some(Payload::NetworkInfo(_)) => "network_info",
        Some(Payload::DisksRequest(_)) => "disks_request",
        Some(Payload::DisksInfo(_)) => "disks_info",
        Some(Payload::LogsRequest(_)) => "logs_request",
        Some(Payload::AgentLogs(_)) => "agent_logs",
        None => "none",
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
        assert_eq!(payload_name(&got), "ping");
    }
}
