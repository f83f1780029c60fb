//! Power actions: which command asks this guest's init to power off, reboot or halt.
//!
//! The agent replies `PowerReply` first (naming the method), waits the requested delay on its
//! deadline queue, then runs the method as a child job (never blocking the loop). If the
//! command cannot be started or fails, it falls back to `sync()` + `reboot(2)`.
//!
//! | PID 1 | method |
//! | --- | --- |
//! | systemd | `systemctl poweroff` / `reboot` / `halt` |
//! | busybox init | `busybox poweroff` / `reboot` / `halt` (signals init, which runs its shutdown actions) |
//! | another init (sysvinit, openrc, runit) | `poweroff` / `reboot` / `halt` from PATH |
//! | a plain program or script (initramfs `/init`, containers) | `sync` + `reboot(2)` directly: nothing would act on an init's signal |

use std::path::Path;

use qx_proto::agent::PowerAction;

use crate::sys::{self, RebootCmd};

/// How the agent will carry out a power action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// Run this command (argv).
    Command(Vec<String>),
    /// sync + reboot(2) in the agent itself.
    Syscall,
}

impl Method {
    /// The `PowerReply.method` text.
    pub fn describe(&self) -> String {
        match self {
            Method::Command(argv) => argv.join(" "),
            Method::Syscall => "reboot(2)".into(),
        }
    }
}

/// The configured `power_command` for `action`: words split on spaces, `{action}` replaced.
pub fn configured(action: PowerAction, template: &str) -> Method {
    Method::Command(
        template
            .split_whitespace()
            .map(|w| w.replace("{action}", verb(action)))
            .collect(),
    )
}

fn verb(action: PowerAction) -> &'static str {
    match action {
        PowerAction::Reboot => "reboot",
        PowerAction::Halt => "halt",
        PowerAction::Shutdown | PowerAction::Unspecified => "poweroff",
    }
}

/// What PID 1 is, from /proc/1/comm and /proc/1/exe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Systemd,
    Busybox,
    OtherInit,
    NotAnInit,
}

pub fn detect_init(proc_root: &Path) -> Init {
    let comm = std::fs::read_to_string(proc_root.join("1/comm")).unwrap_or_default();
    let comm = comm.trim();
    let exe = std::fs::read_link(proc_root.join("1/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if comm == "systemd" || exe.ends_with("/systemd") {
        Init::Systemd
    } else if exe.ends_with("busybox") && comm == "init" {
        Init::Busybox
    } else if comm == "init" || comm == "runit" || comm == "openrc-init" {
        Init::OtherInit
    } else {
        Init::NotAnInit
    }
}

/// Chooses the method for `action` on a system whose PID 1 is `init`.
pub fn method(action: PowerAction, init: Init) -> Method {
    let verb = verb(action).to_string();
    match init {
        Init::Systemd => Method::Command(vec!["systemctl".into(), verb]),
        Init::Busybox => Method::Command(vec!["busybox".into(), verb]),
        Init::OtherInit => Method::Command(vec![verb]),
        Init::NotAnInit => Method::Syscall,
    }
}

/// The last resort: sync, then reboot(2). Returns only if the kernel refused.
pub fn syscall_fallback(action: PowerAction) -> std::io::Error {
    let cmd = match action {
        PowerAction::Reboot => RebootCmd::Restart,
        PowerAction::Halt => RebootCmd::Halt,
        PowerAction::Shutdown | PowerAction::Unspecified => RebootCmd::PowerOff,
    };
    sys::sync();
    sys::reboot(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_init_gets_its_own_command() {
        assert_eq!(
            method(PowerAction::Reboot, Init::Systemd).describe(),
            "systemctl reboot"
        );
        assert_eq!(
            method(PowerAction::Shutdown, Init::Busybox).describe(),
            "busybox poweroff"
        );
        assert_eq!(
            method(PowerAction::Halt, Init::OtherInit).describe(),
            "halt"
        );
        assert_eq!(
            method(PowerAction::Shutdown, Init::NotAnInit),
            Method::Syscall
        );
    }

    #[test]
    fn configured_command_names_the_action() {
        assert_eq!(
            configured(PowerAction::Halt, "/sbin/my-power --now {action}").describe(),
            "/sbin/my-power --now halt"
        );
    }

    #[test]
    fn init_is_detected_from_a_proc_tree() {
        let root = std::env::temp_dir().join(format!("qx-power-{}", std::process::id()));
        std::fs::create_dir_all(root.join("1")).unwrap_or_default();
        std::fs::write(root.join("1/comm"), "systemd\n").unwrap_or_default();
        assert_eq!(detect_init(&root), Init::Systemd);
        std::fs::write(root.join("1/comm"), "sh\n").unwrap_or_default();
        assert_eq!(detect_init(&root), Init::NotAnInit);
        let _ = std::os::unix::fs::symlink("/bin/busybox", root.join("1/exe"));
        std::fs::write(root.join("1/comm"), "init\n").unwrap_or_default();
        assert_eq!(detect_init(&root), Init::Busybox);
        let _ = std::fs::remove_dir_all(&root);
    }
}
