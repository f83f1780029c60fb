//! The child table keeps slots for freeze and thaw hooks and the power command, whatever the
//! operation commands (password changes) take. Real children, a real poll.
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
