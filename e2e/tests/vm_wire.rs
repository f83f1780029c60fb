//! The agent in a real VM, spoken to directly over the chardev socket (no daemon): the boot
//! handshake, ping, and what a misbehaving host does to the stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use qx_e2e::{AgentConn, Vm, VmSpec};
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::Envelope;
use qx_proto::agent::{ExecRequest, Ping};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

fn exec_stdout(conn: &mut AgentConn, script: &str) -> String {
    let reply = conn
        .request(
            Payload::ExecRequest(ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                ..Default::default()
            }),
            REPLY_TIMEOUT,
        )
        .unwrap();
    match reply.terminal.and_then(|e| e.payload) {
        Some(Payload::ExecExit(exit)) => String::from_utf8_lossy(&exit.stdout).into_owned(),
        other => panic!("exec {script:?}: {other:?}"),
    }
}

#[test]
fn agent_ready_names_the_guest_kernel_and_hostname_then_answers_pings() {
    let vm = Vm::start(VmSpec::new("wire-ready")).unwrap();
    let (mut conn, ready) = AgentConn::open(&vm.agent_socket(), BOOT_TIMEOUT).unwrap();
    assert_eq!(ready.kernel_release, vm.image.kernel_release);
    assert_eq!(ready.hostname, vm.spec.hostname);
    assert_ne!(ready.session_id, 0);
    assert_eq!(ready.protocol_version, qx_proto::PROTOCOL_VERSION);
    for seq in 1..=5 {
        conn.ping(seq, REPLY_TIMEOUT).unwrap();
    }
}

#[test]
fn garbage_and_a_torn_frame_from_the_host_do_not_desynchronise_the_agent() {
    let vm = Vm::start(VmSpec::new("wire-garbage")).unwrap();
    let (mut conn, ready) = AgentConn::open(&vm.agent_socket(), BOOT_TIMEOUT).unwrap();
    // Random-looking bytes, a fake magic with a bad header, and the first half of a real frame.
    let mut junk: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    junk.extend_from_slice(&[
        0x51, 0x54, 0x58, 0x01, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8,
    ]);
    let mut half = Vec::new();
    qx_proto::encode_envelope(
        &Envelope {
            id: 999_999,
            correlation_id: 0,
            payload: Some(Payload::Ping(Ping { seq: 77 })),
        },
        qx_proto::DEFAULT_MAX_FRAME_BYTES,
        &mut half,
    )
    .unwrap();
    junk.extend_from_slice(&half[..half.len() / 2]);
    conn.write_raw(&junk).unwrap();
    // A fresh preamble + hello resynchronises; the same agent session answers.
    let again = conn.handshake(REPLY_TIMEOUT).unwrap();
    assert_eq!(
        again.session_id, ready.session_id,
        "the agent restarted on garbage"
    );
    conn.ping(1234, REPLY_TIMEOUT).unwrap();
    assert_eq!(
        exec_stdout(&mut conn, "echo still-in-sync").trim(),
        "still-in-sync"
    );
}
