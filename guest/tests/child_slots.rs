//! The child table: it keeps slots for freeze and thaw hooks and the power command, whatever the
//! operation commands (password changes) take, and a finished child keeps only its output.
//! Real children, a real poll.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use qx_agent::exec::{Jobs, Owner, Spec};
use qx_proto::agent::{ErrorCode, PowerAction};

fn sleeper() -> Spec {
    Spec {
        argv: vec!["sleep".into(), "1".into()],
        timeout: Duration::from_secs(30),
        kill_grace: Duration::from_secs(1),
        caps: [0, 0],
        ..Default::default()
    }
}

#[test]
fn operation_commands_never_take_the_hook_and_power_slots() {
    let poll = mio::Poll::new().unwrap();
    let now = Instant::now();
    // No exec slots at all: only the agent's own children.
    let mut jobs = Jobs::new(0);
    let command = |what: &str| Owner::Command { what: what.into() };
    jobs.spawn(poll.registry(), 1, command("first"), sleeper(), now)
        .unwrap();
    let refused = jobs
        .spawn(poll.registry(), 2, command("second"), sleeper(), now)
        .expect_err("a second operation command took a reserved slot");
    assert_eq!(refused.code, ErrorCode::Busy);
    for owner in [
        Owner::FreezeHook,
        Owner::Detached,
        Owner::Power(PowerAction::Reboot),
    ] {
        jobs.spawn(poll.registry(), 0, owner.clone(), sleeper(), now)
            .unwrap_or_else(|e| panic!("{owner:?} found no slot: {e}"));
    }
}

/// Collects nothing: a sink for children whose output is collected, not streamed.
struct NoStream;

impl qx_agent::exec::OutputSink for NoStream {
    fn has_room(&self) -> bool {
        true
    }

    fn output(&mut self, _id: u64, _item: qx_proto::agent::ExecOutput) {
        panic!("collected output was streamed");
    }
}

#[test]
fn a_finished_childs_collected_output_holds_only_its_bytes() {
    // Exits are kept a while (the session's reply cache, qemu-ga status records): the room
    // output was read into must not stay with them.
    let mut poll = mio::Poll::new().unwrap();
    let mut events = mio::Events::with_capacity(16);
    let mut jobs = Jobs::new(1);
    let spec = Spec {
        argv: vec!["sh".into(), "-c".into(), "echo out; echo err >&2".into()],
        timeout: Duration::from_secs(30),
        kill_grace: Duration::from_secs(1),
        caps: [16 * 1024, 16 * 1024],
        ..Default::default()
    };
    let start = Instant::now();
    jobs.spawn(
        poll.registry(),
        1,
        Owner::Exec { stream: false },
        spec,
        start,
    )
    .unwrap();
    let finished = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the child never finished"
        );
        poll.poll(&mut events, Some(Duration::from_millis(50)))
            .unwrap();
        for e in events.iter() {
            if let Some((slot, fd)) = qx_agent::exec::ChildFd::from_token(e.token()) {
                jobs.on_event(slot, fd);
            }
        }
        jobs.on_sigchld();
        let done = jobs.service(poll.registry(), Instant::now(), &mut NoStream);
        if let Some(f) = done.into_iter().next() {
            break f;
        }
    };
    assert_eq!(finished.exit.stdout, b"out\n");
    assert_eq!(finished.exit.stderr, b"err\n");
    assert_eq!(finished.exit.stdout.capacity(), finished.exit.stdout.len());
    assert_eq!(finished.exit.stderr.capacity(), finished.exit.stderr.len());
}
