//! qemu-ga commands mapped onto the agent's operations.
//!
//! Each command checks its arguments as QEMU's marshaller does, calls the same operation the
//! native protocol calls (`ops`, the child jobs, the one `Freezer`), and shapes the result as
//! qemu-ga's schema says. Nothing here freezes, spawns or touches a file by itself.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qx_proto::agent::{
    FsFreezeRequest, FsThawRequest, FsTrimRequest, PowerAction, SetPasswordRequest,
    SshKeysAddRequest, SshKeysListRequest, SshKeysRemoveRequest, TimeSetRequest,
};

use super::base64;
use super::json::{obj, Value};
use super::request::{Args, QgaError, QgaResult, Request};
use super::{ExecRecord, Waiting, EXEC_RECORDS_PER_SLOT};
use crate::event_loop::{Agent, PendingPower};
use crate::exec::{Owner, Spec};
use crate::logring;
use crate::ops::{self, fsfreeze, OpError};
use crate::power;

/// Largest `guest-file-read` count (qemu-ga's is 48 MiB; libvirt takes replies up to 10 MiB).
pub const MAX_FILE_READ_BYTES: i64 = 8 * 1024 * 1024;
/// Output captured per stream of a `guest-exec` child, as qemu-ga.
pub const EXEC_CAPTURE_BYTES: u64 = 16 * 1024 * 1024;
/// The auto-thaw of a qemu-ga freeze: qemu-ga has none, so the longest the freezer takes.
pub const QGA_AUTO_THAW_MS: u32 = u32::MAX;
/// The RTC's time in seconds since the epoch (the RTC keeps UTC, as QEMU's does by default).
const RTC_SINCE_EPOCH: &str = "/sys/class/rtc/rtc0/since_epoch";
/// CPU and memory hotplug in sysfs.
const CPU_DIR: &str = "/sys/devices/system/cpu";
const MEMORY_DIR: &str = "/sys/devices/system/memory";
/// The kernel's sleep states (`state`) and hibernation modes (`disk`).
const POWER_DIR: &str = "/sys/power";
/// The largest procfs file read.
const MAX_PROC_BYTES: u64 = 1024 * 1024;
/// The fsfreeze hook's time limit.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// The commands this front end serves (`guest-info` lists them); any other is
/// `CommandNotFound`.
pub const COMMANDS: &[&str] = &[
    "guest-exec",
    "guest-exec-status",
    "guest-file-close",
    "guest-file-flush",
    "guest-file-open",
    "guest-file-read",
    "guest-file-seek",
    "guest-file-write",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
    "guest-get-cpustats",
    "guest-get-diskstats",
    "guest-get-disks",
    "guest-get-fsinfo",
    "guest-get-host-name",
    "guest-get-load",
    "guest-get-memory-block-info",
    "guest-get-memory-blocks",
    "guest-get-osinfo",
    "guest-get-time",
    "guest-get-timezone",
    "guest-get-users",
    "guest-get-vcpus",
    "guest-info",
    "guest-network-get-interfaces",
    "guest-network-get-route",
    "guest-ping",
    "guest-set-memory-blocks",
    "guest-set-time",
    "guest-set-vcpus",
    "guest-set-user-password",
    "guest-shutdown",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-get-authorized-keys",
    "guest-ssh-remove-authorized-keys",
    "guest-suspend-disk",
    "guest-suspend-hybrid",
    "guest-suspend-ram",
    "guest-sync",
    "guest-sync-delimited",
];

/// Commands that answer nothing when they succeed.
const NO_SUCCESS_RESPONSE: &[&str] = &[
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-hybrid",
    "guest-suspend-ram",
];

/// What runs while filesystems are frozen; the list wins over `--allow-rpcs`.
pub const FROZEN_ALLOWED: &[&str] = &[
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
];

/// How a command ended.
#[derive(Debug)]
pub(super) enum Outcome {
    Reply(QgaResult<Value>),
    /// Success that qemu-ga does not answer (`guest-shutdown`, `guest-suspend-*`).
    NoReply,
    /// A child runs; the reply follows when it ends.
    Pending,
}

fn empty() -> Value {
    Value::Object(Vec::new())
}

fn op_err(e: OpError) -> QgaError {
    QgaError::generic(e.message)
}

fn int(v: impl TryInto<i64>) -> Value {
    Value::Int(v.try_into().unwrap_or(i64::MAX))
}

fn opt_str(s: &str) -> Option<Value> {
    (!s.is_empty()).then(|| Value::from(s))
}

/// An object from members, leaving out the absent ones.
fn sparse(members: Vec<(&str, Option<Value>)>) -> Value {
    Value::Object(
        members
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect(),
    )
}

impl Agent {
    pub(super) fn qga_execute(&mut self, req: Request, now: Instant) -> Outcome {
        let name = req.execute.as_str();
        let Some(q) = self.qga.as_ref() else {
            return Outcome::NoReply;
        };
        if !COMMANDS.contains(&name) {
            return Outcome::Reply(Err(QgaError::not_found(name)));
        }
        if !q.policy.enabled(name) || (self.frozen_or_freezing() && !FROZEN_ALLOWED.contains(&name))
        {
            return Outcome::Reply(Err(QgaError::disabled(name)));
        }
        match name {
            "guest-shutdown" => match self.qga_shutdown(&req.args, now) {
                Ok(()) => Outcome::NoReply,
                Err(e) => Outcome::Reply(Err(e)),
            },
            "guest-suspend-disk" | "guest-suspend-ram" | "guest-suspend-hybrid" => {
                match self.qga_suspend(name, &req.args) {
                    Ok(()) => Outcome::NoReply,
                    Err(e) => Outcome::Reply(Err(e)),
                }
            }
            "guest-set-user-password" => match self.qga_set_password(&req, now) {
                Ok(()) => Outcome::Pending,
                Err(e) => Outcome::Reply(Err(e)),
            },
            "guest-fsfreeze-freeze" | "guest-fsfreeze-freeze-list" => {
                match self.qga_freeze(&req, now) {
                    Ok(()) => Outcome::Pending,
                    Err(e) => Outcome::Reply(Err(e)),
                }
            }
            // Calls that can wait on a filesystem run on the worker, as the native ones do.
            "guest-fstrim" => match req
                .args
                .only(&["minimum"])
                .and_then(|()| Ok(req.args.opt_int("minimum")?.unwrap_or(0).max(0) as u64))
            {
                Ok(minimum) => self.qga_offload(req.id.clone(), move || qga_fstrim(minimum)),
                Err(e) => Outcome::Reply(Err(e)),
            },
            "guest-get-fsinfo" => match req.args.only(&[]) {
                Ok(()) => self.qga_offload(req.id.clone(), qga_fsinfo),
                Err(e) => Outcome::Reply(Err(e)),
            },
            "guest-file-read" => match self.qga_file_read(&req.args) {
                Ok(job) => self.qga_offload(req.id.clone(), job),
                Err(e) => Outcome::Reply(Err(e)),
            },
            "guest-file-write" => match self.qga_file_write(&req.args) {
                Ok(job) => self.qga_offload(req.id.clone(), job),
                Err(e) => Outcome::Reply(Err(e)),
            },
            "guest-exec" => match self.qga_exec(&req, now) {
                Ok(()) => Outcome::Pending,
                Err(e) => Outcome::Reply(Err(e)),
            },
            _ => Outcome::Reply(self.qga_simple(name, &req.args, now)),
        }
    }

    /// Commands answered at once.
    fn qga_simple(&mut self, name: &str, a: &Args, now: Instant) -> QgaResult<Value> {
        match name {
            "guest-ping" => a.only(&[]).map(|()| empty()),
            "guest-sync" | "guest-sync-delimited" => {
                a.only(&["id"])?;
                a.int("id").map(Value::Int)
            }
            "guest-info" => {
                a.only(&[])?;
                let policy = self
                    .qga
                    .as_ref()
                    .map(|q| q.policy.clone())
                    .unwrap_or_default();
                let cmds = COMMANDS
                    .iter()
                    .map(|c| {
                        obj([
                            ("name", Value::from(*c)),
                            ("enabled", Value::from(policy.enabled(c))),
                            (
                                "success-response",
                                Value::from(!NO_SUCCESS_RESPONSE.contains(c)),
                            ),
                        ])
                    })
                    .collect();
                Ok(obj([
                    ("version", Value::from(env!("CARGO_PKG_VERSION"))),
                    ("supported_commands", Value::Array(cmds)),
                ]))
            }
            "guest-fsfreeze-status" => {
                a.only(&[])?;
                Ok(Value::from(if self.freezer.is_frozen() {
                    "frozen"
                } else {
                    "thawed"
                }))
            }
            "guest-fsfreeze-thaw" => {
                a.only(&[])?;
                self.qga_thaw(now)
            }
            "guest-get-disks" => a.only(&[]).map(|()| qga_disks(Path::new("/sys/block"))),
            "guest-get-time" => {
                a.only(&[])?;
                ops::timeops::get()
                    .map(|t| Value::Int(t.unix_ns))
                    .map_err(op_err)
            }
            "guest-set-time" => {
                a.only(&["time"])?;
                let Some(ns) = a.opt_int("time")? else {
                    // No time: set the system clock from the RTC (qemu-ga runs `hwclock -s`).
                    let rtc = read_trim(Path::new(RTC_SINCE_EPOCH));
                    let secs: i64 = rtc.parse().map_err(|_| {
                        QgaError::generic(format!("cannot read the RTC ({RTC_SINCE_EPOCH})"))
                    })?;
                    return ops::timeops::set(&TimeSetRequest {
                        unix_ns: secs.saturating_mul(1_000_000_000),
                        write_rtc: false,
                        force: true,
                    })
                    .map(|_| empty())
                    .map_err(op_err);
                };
                // qemu-ga's range: years 1970 to 2069.
                if !(0..3_155_760_000_000_000_000).contains(&ns) {
                    return Err(QgaError::generic("Invalid parameter 'time'"));
                }
                ops::timeops::set(&TimeSetRequest {
                    unix_ns: ns,
                    write_rtc: true,
                    force: true,
                })
                .map(|_| empty())
                .map_err(op_err)
            }
            "guest-network-get-interfaces" => a.only(&[]).and_then(|()| qga_interfaces()),
            "guest-network-get-route" => {
                a.only(&[])?;
                // A guest without IPv6 has no ipv6_route: no IPv6 routes, not an error.
                let v6 = proc_text("/proc/net/ipv6_route").unwrap_or_default();
                Ok(qga_routes(&proc_text("/proc/net/route")?, &v6))
            }
            "guest-get-host-name" => {
                a.only(&[])?;
                Ok(obj([("host-name", Value::from(ops::sysinfo::hostname()))]))
            }
            "guest-get-osinfo" => a.only(&[]).map(|()| qga_osinfo()),
            "guest-get-users" => a.only(&[]).and_then(|()| qga_users()),
            "guest-get-timezone" => {
                a.only(&[])?;
                let (offset, zone) = crate::sys::local_utc_offset();
                Ok(sparse(vec![
                    ("zone", opt_str(&zone)),
                    ("offset", Some(Value::Int(offset))),
                ]))
            }
            "guest-get-load" => {
                a.only(&[])?;
                let text = std::fs::read_to_string("/proc/loadavg")
                    .map_err(|e| QgaError::generic(format!("/proc/loadavg: {e}")))?;
                // The kernel's own decimal text is the number: nothing to convert.
                let mut f = text
                    .split_whitespace()
                    .map(|v| Value::Number(v.to_string()));
                let mut next = || f.next().unwrap_or(Value::Int(0));
                Ok(obj([
                    ("load1m", next()),
                    ("load5m", next()),
                    ("load15m", next()),
                ]))
            }
            "guest-set-vcpus" => {
                a.only(&["vcpus"])?;
                qga_set_vcpus(Path::new(CPU_DIR), a.get("vcpus"))
            }
            "guest-get-memory-blocks" => a
                .only(&[])
                .map(|()| qga_memory_blocks(Path::new(MEMORY_DIR))),
            "guest-set-memory-blocks" => {
                a.only(&["mem-blks"])?;
                qga_set_memory_blocks(Path::new(MEMORY_DIR), a.get("mem-blks"))
            }
            "guest-get-memory-block-info" => {
                a.only(&[])?;
                let size = read_trim(&Path::new(MEMORY_DIR).join("block_size_bytes"));
                let size = i64::from_str_radix(&size, 16)
                    .map_err(|_| QgaError::generic("cannot read the memory block size"))?;
                Ok(obj([("size", Value::Int(size))]))
            }
            "guest-get-cpustats" => a
                .only(&[])
                .and_then(|()| proc_text("/proc/stat").map(|t| qga_cpustats(&t))),
            "guest-get-diskstats" => a
                .only(&[])
                .and_then(|()| proc_text("/proc/diskstats").map(|t| qga_diskstats(&t))),
            "guest-get-vcpus" => a.only(&[]).map(|()| qga_vcpus(Path::new(CPU_DIR))),
            "guest-ssh-get-authorized-keys" => {
                a.only(&["username"])?;
                let keys = ops::users::ssh_keys_list(
                    &self.users,
                    &SshKeysListRequest {
                        user: a.str("username")?.to_string(),
                    },
                )
                .map_err(op_err)?;
                Ok(obj([(
                    "keys",
                    Value::Array(keys.keys.into_iter().map(Value::from).collect()),
                )]))
            }
            "guest-ssh-add-authorized-keys" => {
                a.only(&["username", "keys", "reset"])?;
                ops::users::ssh_keys_add(
                    &self.users,
                    &SshKeysAddRequest {
                        user: a.str("username")?.to_string(),
                        keys: non_blank(a.str_list("keys")?),
                        reset: a.opt_bool("reset")?.unwrap_or(false),
                    },
                )
                .map(|_| empty())
                .map_err(op_err)
            }
            "guest-ssh-remove-authorized-keys" => {
                a.only(&["username", "keys"])?;
                ops::users::ssh_keys_remove(
                    &self.users,
                    &SshKeysRemoveRequest {
                        user: a.str("username")?.to_string(),
                        keys: non_blank(a.str_list("keys")?),
                    },
                )
                .map(|_| empty())
                .map_err(op_err)
            }
            "guest-exec-status" => self.qga_exec_status(a),
            "guest-file-open" => self.qga_file_open(a),
            "guest-file-seek" => self.qga_file_seek(a),
            "guest-file-flush" => {
                a.only(&["handle"])?;
                let f = self.qga_file(a)?;
                f.flush()
                    .map(|()| empty())
                    .map_err(|e| QgaError::generic(format!("failed to flush file: {e}")))
            }
            "guest-file-close" => {
                a.only(&["handle"])?;
                let h = a.int("handle")?;
                let q = self.qga_mut()?;
                let at = q
                    .files
                    .iter()
                    .position(|(n, _)| *n == h)
                    .ok_or_else(|| handle_not_found(h))?;
                q.files.remove(at);
                Ok(empty())
            }
            other => Err(QgaError::not_found(other)),
        }
    }

    fn qga_mut(&mut self) -> QgaResult<&mut super::QgaPort> {
        self.qga
            .as_mut()
            .ok_or_else(|| QgaError::generic("the qemu-ga front end is off"))
    }

    fn qga_shutdown(&mut self, a: &Args, now: Instant) -> QgaResult<()> {
        a.only(&["mode"])?;
        let action = match a.opt_str("mode")?.unwrap_or("powerdown") {
            "powerdown" => PowerAction::Shutdown,
            "halt" => PowerAction::Halt,
            "reboot" => PowerAction::Reboot,
            other => {
                return Err(QgaError::generic(format!(
                    "Parameter 'mode' does not accept value '{other}'"
                )))
            }
        };
        let method = match &self.cfg.power_command {
            Some(template) => power::configured(action, template),
            None => power::method(action, power::detect_init(Path::new("/proc"))),
        };
        log::info!(
            "qemu-ga: power {} via {}",
            action.as_str_name(),
            method.describe()
        );
        self.power = Some(PendingPower {
            action,
            method,
            at: now,
        });
        Ok(())
    }

    /// `guest-suspend-MODE`: the kernel's own suspend through /sys/power, written on the
    /// filesystem worker because the write returns only after the guest has resumed. No reply
    /// once the mode is known to be offered; a write that fails after that is logged.
    fn qga_suspend(&mut self, name: &str, a: &Args) -> QgaResult<()> {
        a.only(&[])?;
        let writes = suspend_writes(Path::new(POWER_DIR), name)?;
        log::info!("qemu-ga: {name}");
        self.worker.submit(move || {
            let res = writes.iter().try_for_each(|(f, v)| std::fs::write(f, v));
            Box::new(move |_: &mut Agent, _: Instant| {
                if let Err(e) = res {
                    log::warn!("qemu-ga: suspend failed: {e}");
                }
            })
        });
        Ok(())
    }

    fn qga_set_password(&mut self, req: &Request, now: Instant) -> QgaResult<()> {
        let a = &req.args;
        a.only(&["username", "password", "crypted"])?;
        let user = a.str("username")?.to_string();
        let password = base64::decode(a.str("password")?)
            .and_then(|p| String::from_utf8(p).ok())
            .ok_or_else(|| QgaError::generic("Invalid base64 data in 'password'"))?;
        let crypted = a
            .opt_bool("crypted")?
            .ok_or_else(|| QgaError::generic("Parameter 'crypted' is missing"))?;
        let cmd = ops::users::set_password_command(
            &self.users,
            &SetPasswordRequest {
                user,
                password,
                crypted,
            },
        )
        .map_err(op_err)?;
        let job = self.qga_mut()?.job_id();
        let spec = Spec {
            argv: cmd.argv,
            stdin: cmd.stdin,
            timeout: Duration::from_millis(u64::from(cmd.timeout_ms)),
            kill_grace: Duration::from_millis(u64::from(self.cfg.exec_kill_grace_ms)),
            caps: [4096, 4096],
            ..Default::default()
        };
        let owner = Owner::Command {
            what: "password change".into(),
        };
        self.jobs
            .spawn(self.poll.registry(), job, owner, spec, now)
            .map_err(op_err)?;
        self.qga_mut()?.waiting = Some(Waiting::Password {
            job,
            id: req.id.clone(),
        });
        Ok(())
    }

    /// Starts the freeze, or the freeze hook first; the reply follows.
    fn qga_freeze(&mut self, req: &Request, now: Instant) -> QgaResult<()> {
        let a = &req.args;
        let mountpoints = if req.execute == "guest-fsfreeze-freeze-list" {
            a.only(&["mountpoints"])?;
            a.opt_str_list("mountpoints")?.unwrap_or_default()
        } else {
            a.only(&[])?;
            Vec::new()
        };
        if self.freeze_chain.is_some() || self.freezing {
            return Err(QgaError::generic("a freeze is already in progress"));
        }
        let hook = self
            .qga
            .as_ref()
            .and_then(|q| q.policy.fsfreeze_hook.clone());
        let Some(hook) = hook.filter(|h| h.exists()) else {
            self.qga_start_freeze(req.id.clone(), mountpoints, now);
            return Ok(());
        };
        let job = self.qga_mut()?.job_id();
        self.qga_hook(job, &hook, "freeze", now)?;
        self.qga_mut()?.waiting = Some(Waiting::FreezeHook {
            job,
            id: req.id.clone(),
            mountpoints,
        });
        Ok(())
    }

    fn qga_hook(&mut self, job: u64, hook: &Path, arg: &str, now: Instant) -> QgaResult<()> {
        let spec = Spec {
            argv: vec![hook.display().to_string(), arg.to_string()],
            timeout: HOOK_TIMEOUT,
            kill_grace: Duration::from_millis(u64::from(self.cfg.exec_kill_grace_ms)),
            caps: [4096, 4096],
            ..Default::default()
        };
        let owner = if job == 0 {
            Owner::Detached
        } else {
            Owner::Command {
                what: "fsfreeze hook".into(),
            }
        };
        self.jobs
            .spawn(self.poll.registry(), job, owner, spec, now)
            .map(|_| ())
            .map_err(op_err)
    }

    /// The freeze itself, through the one freezer, on the worker (FIFREEZE flushes dirty
    /// data, which can take long): the reply to request `id` follows, as the native freeze's.
    pub(super) fn qga_start_freeze(
        &mut self,
        id: Option<Value>,
        mountpoints: Vec<String>,
        now: Instant,
    ) {
        let req = FsFreezeRequest {
            mountpoints,
            auto_thaw_ms: QGA_AUTO_THAW_MS,
            run_hooks: false,
        };
        if let Some(q) = self.qga.as_mut() {
            q.waiting = Some(Waiting::Worker);
        }
        self.freezing = true;
        let mut freezer = self.freezer.clone();
        self.worker.submit(move || {
            let res = freezer.freeze(&req, now);
            Box::new(move |agent: &mut Agent, _now: Instant| {
                agent.freezing = false;
                agent.freezer.adopt_freeze(freezer);
                logring::set_frozen(agent.freezer.is_frozen());
                agent.qga_finish(id, res.map(|r| int(r.frozen.len())).map_err(op_err));
                if agent.exiting() {
                    agent.thaw_for("the agent is exiting");
                }
            })
        });
    }

    /// Runs `op` on the filesystem worker; its result answers request `id` when it comes
    /// back. The front end takes no other request meanwhile, so replies keep their order.
    fn qga_offload(
        &mut self,
        id: Option<Value>,
        op: impl FnOnce() -> QgaResult<Value> + Send + 'static,
    ) -> Outcome {
        let Some(q) = self.qga.as_mut() else {
            return Outcome::NoReply;
        };
        q.waiting = Some(Waiting::Worker);
        self.worker.submit(move || {
            let res = op();
            Box::new(move |agent: &mut Agent, _now: Instant| agent.qga_finish(id, res))
        });
        Outcome::Pending
    }

    fn qga_thaw(&mut self, now: Instant) -> QgaResult<Value> {
        if !self.freezer.is_frozen() {
            return Ok(Value::Int(0));
        }
        let res = self.freezer.thaw(&FsThawRequest {
            token: 0,
            run_hooks: false,
        });
        logring::set_frozen(self.freezer.is_frozen());
        let thawed = res.map_err(op_err)?;
        let hook = self
            .qga
            .as_ref()
            .and_then(|q| q.policy.fsfreeze_hook.clone());
        if let Some(hook) = hook.filter(|h| h.exists()) {
            if let Err(e) = self.qga_hook(0, &hook, "thaw", now) {
                log::warn!("fsfreeze hook (thaw) not started: {}", e.desc);
            }
        }
        Ok(int(thawed.thawed.len()))
    }

    /// Starts the child. Its reply waits until the child ends, at most `qga_exec_reply_wait_ms`:
    /// a client learns the exit only by polling `guest-exec-status`, and on a guest whose
    /// vCPU is busy every poll takes time from the child it waits for, so a short command is
    /// reported exited at the first poll instead (docs/qemu-ga.md, "guest-exec").
    fn qga_exec(&mut self, req: &Request, now: Instant) -> QgaResult<()> {
        let a = &req.args;
        a.only(&["path", "arg", "env", "input-data", "capture-output"])?;
        let mut argv = vec![a.str("path")?.to_string()];
        argv.extend(a.opt_str_list("arg")?.unwrap_or_default());
        let env_list = a.opt_str_list("env")?;
        let mut env = Vec::new();
        for kv in env_list.iter().flatten() {
            let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
            env.push((k.to_string(), v.to_string()));
        }
        let stdin = match a.opt_str("input-data")? {
            Some(b64) => base64::decode(b64)
                .ok_or_else(|| QgaError::generic("Invalid base64 data in 'input-data'"))?,
            None => Vec::new(),
        };
        // Which streams are captured ([stdout, stderr]) and whether stderr joins stdout; a
        // stream not captured is read and dropped (qemu-ga sends it to /dev/null).
        let (capture, merge_stderr) =
            match a.get("capture-output") {
                None => ([false; 2], false),
                Some(Value::Bool(b)) => ([*b; 2], false),
                Some(Value::Str(s)) => match s.as_str() {
                    "none" => ([false; 2], false),
                    "stdout" => ([true, false], false),
                    "stderr" => ([false, true], false),
                    "separated" => ([true; 2], false),
                    "merged" => ([true, false], true),
                    _ => {
                        return Err(QgaError::generic(format!(
                            "Parameter 'capture-output' does not accept value '{s}'"
                        )))
                    }
                },
                Some(_) => return Err(QgaError::generic(
                    "Invalid parameter type for 'capture-output', expected: GuestExecCaptureOutput",
                )),
            };
        let cap = |on: bool| if on { EXEC_CAPTURE_BYTES } else { 0 };
        let spec = Spec {
            argv,
            env,
            clear_env: env_list.is_some(),
            stdin,
            // qemu-ga sets no time limit on guest-exec.
            timeout: Duration::ZERO,
            kill_grace: Duration::from_millis(u64::from(self.cfg.exec_kill_grace_ms)),
            merge_stderr,
            caps: capture.map(cap),
            ..Default::default()
        };
        let job = self.qga_mut()?.job_id();
        let pid = self
            .jobs
            .spawn(
                self.poll.registry(),
                job,
                Owner::Exec { stream: false },
                spec,
                now,
            )
            .map_err(op_err)?;
        let keep = self.cfg.max_concurrent_exec.max(1) * EXEC_RECORDS_PER_SLOT;
        let until = now + Duration::from_millis(u64::from(self.cfg.qga_exec_reply_wait_ms));
        let q = self.qga_mut()?;
        while q.execs.len() >= keep {
            match q.execs.iter().position(|r| r.exit.is_some()) {
                Some(oldest) => {
                    q.execs.remove(oldest);
                }
                None => break,
            }
        }
        q.execs.push(ExecRecord {
            pid,
            job,
            capture,
            exit: None,
        });
        q.waiting = Some(Waiting::ExecStart {
            job,
            pid,
            id: req.id.clone(),
            until,
        });
        Ok(())
    }

    fn qga_exec_status(&mut self, a: &Args) -> QgaResult<Value> {
        a.only(&["pid"])?;
        let pid = a.int("pid")?;
        let q = self.qga_mut()?;
        let at = q
            .execs
            .iter()
            .position(|r| i64::from(r.pid) == pid)
            .ok_or_else(|| QgaError::generic("Invalid parameter 'pid'"))?;
        if q.execs[at].exit.is_none() {
            return Ok(obj([("exited", Value::from(false))]));
        }
        let rec = q.execs.remove(at);
        let Some(exit) = rec.exit else {
            return Err(QgaError::generic("Invalid parameter 'pid'"));
        };
        let [out, err] = rec.capture;
        let data = |on: bool, b: Vec<u8>| (on && !b.is_empty()).then_some(Value::Base64(b));
        let flag = |on: bool, t: bool| (on && t).then(|| Value::from(true));
        Ok(sparse(vec![
            ("exited", Some(Value::from(true))),
            ("exitcode", exit.exited.then(|| int(exit.exit_code))),
            ("signal", (!exit.exited).then(|| int(exit.signal))),
            ("out-data", data(out, exit.stdout)),
            ("err-data", data(err, exit.stderr)),
            ("out-truncated", flag(out, exit.stdout_truncated)),
            ("err-truncated", flag(err, exit.stderr_truncated)),
        ]))
    }

    fn qga_file(&mut self, a: &Args) -> QgaResult<&mut std::fs::File> {
        let h = a.int("handle")?;
        self.qga_mut()?
            .files
            .iter_mut()
            .find(|(n, _)| *n == h)
            .map(|(_, f)| f)
            .ok_or_else(|| handle_not_found(h))
    }

    fn qga_file_open(&mut self, a: &Args) -> QgaResult<Value> {
        a.only(&["path", "mode"])?;
        let path = a.str("path")?;
        let mode = a.opt_str("mode")?.unwrap_or("r");
        let flags = match mode.replace('b', "").as_str() {
            "r" => libc::O_RDONLY,
            "r+" => libc::O_RDWR,
            "w" => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            "w+" => libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            "a" => libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
            "a+" => libc::O_RDWR | libc::O_APPEND | libc::O_CREAT,
            _ => {
                return Err(QgaError::generic(format!(
                    "invalid file open mode '{mode}'"
                )))
            }
        };
        let max = self.cfg.max_open_files;
        if self.qga_mut()?.files.len() >= max {
            return Err(QgaError::generic(format!(
                "too many open files ({max}); close one first"
            )));
        }
        // By descriptor beneath the allowed prefix, never through a guest user's symlink
        // (docs/security.md); a file that may be created is opened relative to its parent.
        // Opened non-blocking, so that a FIFO a guest user put there cannot make the agent
        // wait for a writer (or a reader) that never comes; only regular files are served.
        let flags = flags | libc::O_NONBLOCK | libc::O_NOCTTY;
        let fd = if flags & libc::O_CREAT != 0 {
            let parent = self.policy.open_parent(path, None).map_err(op_err)?;
            crate::sys::openat(
                std::os::fd::AsFd::as_fd(&parent.dir),
                &parent.name,
                flags | libc::O_NOFOLLOW,
                0o644,
            )
            .map_err(|e| QgaError::generic(format!("failed to open file '{path}': {e}")))?
        } else {
            self.policy.open(path, flags, false).map_err(op_err)?.fd
        };
        let file = std::fs::File::from(fd);
        let regular = file.metadata().is_ok_and(|m| m.is_file());
        if !regular {
            return Err(QgaError::generic(format!(
                "failed to open file '{path}': not a regular file"
            )));
        }
        crate::sys::set_nonblock_flag(std::os::fd::AsRawFd::as_raw_fd(&file), false)
            .map_err(|e| QgaError::generic(format!("failed to open file '{path}': {e}")))?;
        let q = self.qga_mut()?;
        let h = q.next_handle;
        q.next_handle += 1;
        q.files.push((h, file));
        Ok(Value::Int(h))
    }

    /// A dup of open handle `handle`'s descriptor (sharing its offset), for the worker.
    fn qga_file_dup(&mut self, a: &Args) -> QgaResult<std::fs::File> {
        self.qga_file(a)?
            .try_clone()
            .map_err(|e| QgaError::generic(format!("failed to use the file handle: {e}")))
    }

    /// Checks a `guest-file-read` and returns the read, for the worker.
    fn qga_file_read(
        &mut self,
        a: &Args,
    ) -> QgaResult<impl FnOnce() -> QgaResult<Value> + Send + 'static> {
        a.only(&["handle", "count"])?;
        let count = a.opt_int("count")?.unwrap_or(4096);
        if !(0..=MAX_FILE_READ_BYTES).contains(&count) {
            return Err(QgaError::generic(format!(
                "value '{count}' is invalid for argument count (at most {MAX_FILE_READ_BYTES})"
            )));
        }
        let f = self.qga_file_dup(a)?;
        Ok(move || {
            let mut buf = Vec::with_capacity(count as usize);
            f.take(count as u64)
                .read_to_end(&mut buf)
                .map_err(|e| QgaError::generic(format!("failed to read file: {e}")))?;
            let eof = (buf.len() as i64) < count || count == 0;
            Ok(obj([
                ("count", int(buf.len())),
                ("buf-b64", Value::Base64(buf)),
                ("eof", Value::from(eof)),
            ]))
        })
    }

    /// Checks a `guest-file-write` and returns the write, for the worker.
    fn qga_file_write(
        &mut self,
        a: &Args,
    ) -> QgaResult<impl FnOnce() -> QgaResult<Value> + Send + 'static> {
        a.only(&["handle", "buf-b64", "count"])?;
        let data = base64::decode(a.str("buf-b64")?)
            .ok_or_else(|| QgaError::generic("Invalid base64 data in 'buf-b64'"))?;
        let count = match a.opt_int("count")? {
            None => data.len(),
            Some(c) if c >= 0 && (c as u64) <= data.len() as u64 => c as usize,
            Some(c) => {
                return Err(QgaError::generic(format!(
                    "value '{c}' is invalid for argument count"
                )))
            }
        };
        let mut f = self.qga_file_dup(a)?;
        Ok(move || {
            f.write_all(&data[..count])
                .map_err(|e| QgaError::generic(format!("failed to write to file: {e}")))?;
            Ok(obj([("count", int(count)), ("eof", Value::from(false))]))
        })
    }

    fn qga_file_seek(&mut self, a: &Args) -> QgaResult<Value> {
        a.only(&["handle", "offset", "whence"])?;
        let offset = a.int("offset")?;
        let whence = match a.get("whence") {
            Some(Value::Int(0)) => 0,
            Some(Value::Int(1)) => 1,
            Some(Value::Int(2)) => 2,
            Some(Value::Str(s)) if s == "set" => 0,
            Some(Value::Str(s)) if s == "cur" => 1,
            Some(Value::Str(s)) if s == "end" => 2,
            None => return Err(QgaError::generic("Parameter 'whence' is missing")),
            Some(_) => return Err(QgaError::generic("Invalid parameter 'whence'")),
        };
        let pos = match whence {
            0 => SeekFrom::Start(
                u64::try_from(offset)
                    .map_err(|_| QgaError::generic("failed to seek file: negative offset"))?,
            ),
            1 => SeekFrom::Current(offset),
            _ => SeekFrom::End(offset),
        };
        let f = self.qga_file(a)?;
        let at = f
            .seek(pos)
            .map_err(|e| QgaError::generic(format!("failed to seek file: {e}")))?;
        Ok(obj([("position", int(at)), ("eof", Value::from(false))]))
    }
}

/// The keys without blank entries: `virsh set-user-sshkeys` sends the empty string after a
/// key file's last newline, and qemu-ga takes it.
fn non_blank(keys: Vec<String>) -> Vec<String> {
    keys.into_iter().filter(|k| !k.trim().is_empty()).collect()
}

fn handle_not_found(h: i64) -> QgaError {
    QgaError::generic(format!("handle '{h}' has not been found"))
}

fn qga_fstrim(minimum: u64) -> QgaResult<Value> {
    let targets = fsfreeze::trim_targets(&FsTrimRequest {
        mountpoints: Vec::new(),
        minimum_bytes: minimum,
    })
    .map_err(op_err)?;
    let paths = targets
        .iter()
        .map(|mp| {
            let r = fsfreeze::trim_one(mp, minimum);
            if r.error.is_empty() {
                obj([
                    ("path", Value::from(mp.as_str())),
                    ("trimmed", int(r.trimmed_bytes)),
                    ("minimum", int(minimum)),
                ])
            } else {
                obj([
                    ("path", Value::from(mp.as_str())),
                    ("error", Value::from(r.error)),
                ])
            }
        })
        .collect();
    Ok(obj([("paths", Value::Array(paths))]))
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `dddd:bb:ss.f` → (domain, bus, slot, function).
fn pci_address(component: &str) -> Option<[i64; 4]> {
    let (dom, rest) = component.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (slot, func) = rest.split_once('.')?;
    if dom.len() != 4 || bus.len() != 2 || slot.len() != 2 || func.len() != 1 {
        return None;
    }
    let h = |s: &str| i64::from_str_radix(s, 16).ok();
    Some([h(dom)?, h(bus)?, h(slot)?, h(func)?])
}

/// The GuestDiskAddress of a whole disk from its sysfs device path
/// (e.g. `/sys/devices/pci0000:00/0000:00:05.0/virtio2/block/vda`).
pub fn disk_address(sys_path: &Path, name: &str, serial: &str) -> Option<Value> {
    let comps: Vec<String> = sys_path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let (pci_at, pci) = comps
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, c)| pci_address(c).map(|a| (i, a)))?;
    let after = &comps[pci_at + 1..];
    let hctl = after.iter().rev().find_map(|c| {
        let p: Vec<i64> = c.split(':').filter_map(|n| n.parse().ok()).collect();
        (p.len() == 4 && c.split(':').count() == 4).then_some(p)
    });
    let (bus_type, bus, target, unit) = if let Some(p) = hctl {
        let ty = if after.iter().any(|c| c.starts_with("ata")) {
            "sata"
        } else {
            "scsi"
        };
        (ty, p[1], p[2], p[3])
    } else if after.iter().any(|c| c.starts_with("virtio")) {
        ("virtio", 0, 0, 0)
    } else {
        ("unknown", 0, 0, 0)
    };
    Some(sparse(vec![
        (
            "pci-controller",
            Some(obj([
                ("domain", Value::Int(pci[0])),
                ("bus", Value::Int(pci[1])),
                ("slot", Value::Int(pci[2])),
                ("function", Value::Int(pci[3])),
            ])),
        ),
        ("bus-type", Some(Value::from(bus_type))),
        ("bus", Some(Value::Int(bus))),
        ("target", Some(Value::Int(target))),
        ("unit", Some(Value::Int(unit))),
        ("serial", opt_str(serial)),
        ("dev", Some(Value::from(format!("/dev/{name}")))),
    ]))
}

/// The disks under a block device's sysfs directory: itself, its parent disk when it is a
/// partition, or the disks under its `slaves` (device-mapper, md).
fn disks_of(dir: &Path, depth: usize, out: &mut Vec<Value>) {
    let Ok(real) = std::fs::canonicalize(dir) else {
        return;
    };
    if depth < 8 {
        if let Ok(slaves) = std::fs::read_dir(real.join("slaves")) {
            let mut any = false;
            for s in slaves.flatten() {
                any = true;
                disks_of(&s.path(), depth + 1, out);
            }
            if any {
                return;
            }
        }
    }
    let disk = if real.join("partition").exists() {
        match real.parent() {
            Some(p) => p.to_path_buf(),
            None => return,
        }
    } else {
        real
    };
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut serial = read_trim(&disk.join("serial"));
    if serial.is_empty() {
        serial = read_trim(&disk.join("device/serial"));
    }
    if let Some(a) = disk_address(&disk, &name, &serial) {
        out.push(a);
    }
}

/// `/dev/` names of the entries of a sysfs `slaves` directory.
fn slaves(dir: &Path) -> Vec<Value> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("slaves"))
        .map(|rd| {
            rd.flatten()
                .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().map(Value::from).collect()
}

/// The disks of a /sys/block-like directory and their partitions, with what each depends on
/// and, for disks on a PCI device, the address libvirt maps to the domain's disk.
pub fn qga_disks(sys_block: &Path) -> Value {
    let mut disks: Vec<String> = std::fs::read_dir(sys_block)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    disks.sort();
    let mut out = Vec::new();
    for name in disks {
        let dir = sys_block.join(&name);
        let real = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        let mut serial = read_trim(&real.join("serial"));
        if serial.is_empty() {
            serial = read_trim(&real.join("device/serial"));
        }
        let deps = slaves(&real);
        out.push(sparse(vec![
            ("name", Some(Value::from(format!("/dev/{name}")))),
            ("partition", Some(Value::from(false))),
            (
                "dependencies",
                (!deps.is_empty()).then_some(Value::Array(deps)),
            ),
            ("address", disk_address(&real, &name, &serial)),
        ]));
        let mut parts: Vec<String> = std::fs::read_dir(&real)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("partition").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        parts.sort();
        for p in parts {
            out.push(obj([
                ("name", Value::from(format!("/dev/{p}"))),
                ("partition", Value::from(true)),
                (
                    "dependencies",
                    Value::Array(vec![Value::from(format!("/dev/{name}"))]),
                ),
            ]));
        }
    }
    Value::Array(out)
}

fn qga_fsinfo() -> QgaResult<Value> {
    let mounts = ops::disks::mounts().map_err(op_err)?;
    let mut seen = std::collections::HashSet::new();
    let mut list = Vec::new();
    for m in mounts
        .iter()
        .filter(|m| m.source.starts_with('/') && m.dev.0 != 0)
    {
        if !seen.insert(m.dev) {
            continue;
        }
        let dev_dir = PathBuf::from(format!("/sys/dev/block/{}:{}", m.dev.0, m.dev.1));
        let name = std::fs::canonicalize(&dev_dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| format!("{}:{}", m.dev.0, m.dev.1));
        let mut disks = Vec::new();
        disks_of(&dev_dir, 0, &mut disks);
        let space = crate::sys::statvfs(Path::new(&m.mountpoint)).ok();
        let used = space
            .as_ref()
            .map(|s| s.total_bytes.saturating_sub(s.free_bytes));
        list.push(sparse(vec![
            ("name", Some(Value::from(name))),
            ("mountpoint", Some(Value::from(m.mountpoint.as_str()))),
            ("type", Some(Value::from(m.fstype.as_str()))),
            ("used-bytes", used.map(int)),
            (
                "total-bytes",
                space
                    .as_ref()
                    .zip(used)
                    .map(|(s, u)| int(u.saturating_add(s.available_bytes))),
            ),
            (
                "total-bytes-privileged",
                space.as_ref().map(|s| int(s.total_bytes)),
            ),
            ("disk", Some(Value::Array(disks))),
        ]));
    }
    // qemu-ga lists the newest mount first; libvirt reverses it back.
    list.reverse();
    Ok(Value::Array(list))
}

fn qga_interfaces() -> QgaResult<Value> {
    let info = ops::netinfo::interfaces().map_err(op_err)?;
    let counters = ops::netinfo::counters();
    let list = info
        .interfaces
        .into_iter()
        .map(|i| {
            let addrs = i
                .addresses
                .iter()
                .map(|a| {
                    obj([
                        ("ip-address", Value::from(a.address.as_str())),
                        (
                            "ip-address-type",
                            Value::from(if a.ipv6 { "ipv6" } else { "ipv4" }),
                        ),
                        ("prefix", int(a.prefix)),
                    ])
                })
                .collect();
            let stats = counters.iter().find(|c| c.interface == i.name).map(|c| {
                obj([
                    ("rx-bytes", int(c.rx_bytes)),
                    ("rx-packets", int(c.rx_packets)),
                    ("rx-errs", int(c.rx_errors)),
                    ("rx-dropped", int(c.rx_dropped)),
                    ("tx-bytes", int(c.tx_bytes)),
                    ("tx-packets", int(c.tx_packets)),
                    ("tx-errs", int(c.tx_errors)),
                    ("tx-dropped", int(c.tx_dropped)),
                ])
            });
            sparse(vec![
                ("name", Some(Value::from(i.name.as_str()))),
                ("hardware-address", opt_str(&i.mac)),
                ("ip-addresses", Some(Value::Array(addrs))),
                ("statistics", stats),
            ])
        })
        .collect();
    Ok(Value::Array(list))
}

fn qga_osinfo() -> Value {
    let id = ops::sysinfo::identity();
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let rel = |k: &str| {
        ops::sysinfo::os_release_value(&text, k)
            .filter(|v| !v.is_empty())
            .map(Value::from)
    };
    sparse(vec![
        ("kernel-release", opt_str(&id.kernel_release)),
        ("kernel-version", opt_str(&id.kernel_version)),
        ("machine", opt_str(&id.arch)),
        ("id", rel("ID")),
        ("name", rel("NAME")),
        ("pretty-name", rel("PRETTY_NAME")),
        ("version", rel("VERSION")),
        ("version-id", rel("VERSION_ID")),
        ("variant", rel("VARIANT")),
        ("variant-id", rel("VARIANT_ID")),
    ])
}

fn qga_users() -> QgaResult<Value> {
    let list = ops::users::logged_in().map_err(op_err)?;
    // One entry per user, with the earliest login, as qemu-ga.
    let mut users: Vec<(String, i64)> = Vec::new();
    for u in list.users {
        match users.iter_mut().find(|(n, _)| *n == u.user) {
            Some((_, t)) => *t = (*t).min(u.login_unix_s),
            None => users.push((u.user, u.login_unix_s)),
        }
    }
    Ok(Value::Array(
        users
            .into_iter()
            .map(|(user, t)| {
                obj([
                    ("user", Value::from(user)),
                    // Whole seconds (utmp has microseconds; libvirt reads a number).
                    ("login-time", Value::Int(t)),
                ])
            })
            .collect(),
    ))
}

/// `cpuN` entries of a /sys/devices/system/cpu-like directory, by N.
pub fn qga_vcpus(dir: &Path) -> Value {
    Value::Array(
        numbered(dir, "cpu")
            .into_iter()
            .map(|(n, p)| {
                let online_file = p.join("online");
                let can = online_file.exists();
                obj([
                    ("logical-id", Value::Int(n)),
                    (
                        "online",
                        Value::from(!can || read_trim(&online_file) == "1"),
                    ),
                    ("can-offline", Value::from(can)),
                ])
            })
            .collect(),
    )
}

fn proc_text(path: &str) -> QgaResult<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PROC_BYTES).read_to_string(&mut text))
        .map_err(|e| QgaError::generic(format!("{path}: {e}")))?;
    Ok(text)
}

/// Numbered entries (`cpu3`, `memory12`) of a sysfs directory, by number.
fn numbered(dir: &Path, prefix: &str) -> Vec<(i64, PathBuf)> {
    let mut v: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `guest-set-vcpus`: the count of leading requests carried out; an error only when the first
/// one fails, as qemu-ga.
fn qga_set_vcpus(dir: &Path, vcpus: Option<&Value>) -> QgaResult<Value> {
    let Some(Value::Array(list)) = vcpus else {
        return Err(QgaError::generic("Parameter 'vcpus' is missing"));
    };
    let mut done = 0;
    for v in list {
        let (Some(Value::Int(id)), Some(Value::Bool(online))) =
            (v.get("logical-id"), v.get("online"))
        else {
            return Err(QgaError::generic("Invalid parameter type for 'vcpus'"));
        };
        let file = dir.join(format!("cpu{id}")).join("online");
        let result = if !dir.join(format!("cpu{id}")).exists() {
            Err(format!("CPU {id} does not exist"))
        } else if !file.exists() {
            if *online {
                Ok(())
            } else {
                Err(format!("CPU {id} cannot be offlined"))
            }
        } else {
            std::fs::write(&file, if *online { "1" } else { "0" })
                .map_err(|e| format!("CPU {id}: {e}"))
        };
        match result {
            Ok(()) => done += 1,
            Err(e) if done == 0 => return Err(QgaError::generic(e)),
            Err(_) => break,
        }
    }
    Ok(Value::Int(done))
}

fn qga_memory_blocks(dir: &Path) -> Value {
    Value::Array(
        numbered(dir, "memory")
            .into_iter()
            .map(|(n, p)| {
                obj([
                    ("phys-index", Value::Int(n)),
                    (
                        "online",
                        Value::from(read_trim(&p.join("state")) == "online"),
                    ),
                    (
                        "can-offline",
                        Value::from(read_trim(&p.join("removable")) == "1"),
                    ),
                ])
            })
            .collect(),
    )
}

/// `guest-set-memory-blocks`: each block onlined or offlined through sysfs, answered block by
/// block as qemu-ga does (`success`, `not-found`, `operation-not-supported`,
/// `operation-failed`, the last three with the errno as `error-code`).
fn qga_set_memory_blocks(dir: &Path, blocks: Option<&Value>) -> QgaResult<Value> {
    let Some(Value::Array(list)) = blocks else {
        return Err(QgaError::generic("Parameter 'mem-blks' is missing"));
    };
    let mut out = Vec::new();
    for b in list {
        let (Some(Value::Int(n)), Some(Value::Bool(online))) =
            (b.get("phys-index"), b.get("online"))
        else {
            return Err(QgaError::generic("Invalid parameter type for 'mem-blks'"));
        };
        let (response, errno) = set_memory_block(dir, *n, *online);
        out.push(sparse(vec![
            ("phys-index", Some(Value::Int(*n))),
            ("response", Some(Value::from(response))),
            ("error-code", errno.map(|e| Value::Int(e.into()))),
        ]));
    }
    Ok(Value::Array(out))
}

fn set_memory_block(dir: &Path, n: i64, online: bool) -> (&'static str, Option<i32>) {
    let failed = |e: std::io::Error, missing: &'static str| {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let response = match e.kind() {
            std::io::ErrorKind::NotFound => missing,
            _ => "operation-failed",
        };
        (response, Some(errno))
    };
    // No memory directory: no memory hotplug in this guest.
    if let Err(e) = dir.metadata() {
        return failed(e, "operation-not-supported");
    }
    let block = dir.join(format!("memory{n}"));
    if let Err(e) = block.metadata() {
        return failed(e, "not-found");
    }
    let state = match std::fs::read_to_string(block.join("state")) {
        Ok(s) => s,
        // An old kernel without `state`: every block is online for good.
        Err(e) if online && e.kind() == std::io::ErrorKind::NotFound => return ("success", None),
        Err(e) => return failed(e, "operation-not-supported"),
    };
    if state.starts_with("online") == online {
        return ("success", None);
    }
    match std::fs::write(
        block.join("state"),
        if online { "online" } else { "offline" },
    ) {
        Ok(()) => ("success", None),
        Err(e) => failed(e, "operation-failed"),
    }
}

/// What `guest-suspend-MODE` (`command`) writes, in order, under `dir` (/sys/power): `mem` or
/// `disk` to `state`; for `hybrid`, `suspend` to `disk` first (hibernate, then stay suspended
/// to RAM: systemd's hybrid-sleep). An error when the kernel does not offer the mode.
fn suspend_writes(dir: &Path, command: &str) -> QgaResult<Vec<(PathBuf, &'static str)>> {
    let offers = |file: &str, word: &str| {
        read_trim(&dir.join(file))
            .split_whitespace()
            .any(|w| w.trim_matches(['[', ']']) == word)
    };
    let state = dir.join("state");
    match command {
        "guest-suspend-ram" if offers("state", "mem") => Ok(vec![(state, "mem")]),
        "guest-suspend-disk" if offers("state", "disk") => Ok(vec![(state, "disk")]),
        "guest-suspend-hybrid" if offers("state", "disk") && offers("disk", "suspend") => {
            Ok(vec![(dir.join("disk"), "suspend"), (state, "disk")])
        }
        _ => Err(QgaError::generic(
            "the requested suspend mode is not supported by the guest",
        )),
    }
}

/// How a column of a route table becomes a member.
#[derive(Clone, Copy)]
enum Column {
    Text,
    Dec,
    Hex,
    /// A hexadecimal number, as decimal text (qemu-ga's prefix lengths).
    HexText,
    /// An IPv4 address as the kernel prints a `__be32`: hexadecimal, in memory order.
    Ip4,
    /// An IPv6 address: 32 hexadecimal digits.
    Ip6,
}

/// /proc/net/route's columns (after its header line) and qemu-ga's names for them.
const ROUTE_V4: &[(&str, Column)] = &[
    ("iface", Column::Text),
    ("destination", Column::Ip4),
    ("gateway", Column::Ip4),
    ("flags", Column::Hex),
    ("refcnt", Column::Dec),
    ("use", Column::Dec),
    ("metric", Column::Dec),
    ("mask", Column::Ip4),
    ("mtu", Column::Dec),
    ("window", Column::Dec),
    ("irtt", Column::Dec),
];

/// /proc/net/ipv6_route's columns (no header line).
const ROUTE_V6: &[(&str, Column)] = &[
    ("destination", Column::Ip6),
    ("desprefixlen", Column::HexText),
    ("source", Column::Ip6),
    ("srcprefixlen", Column::HexText),
    ("nexthop", Column::Ip6),
    ("metric", Column::Hex),
    ("refcnt", Column::Hex),
    ("use", Column::Hex),
    ("flags", Column::Hex),
    ("iface", Column::Text),
];

/// `guest-network-get-route`: the routes of /proc/net/route (`v4`) and /proc/net/ipv6_route
/// (`v6`) with qemu-ga's members; a line that does not parse is left out.
pub fn qga_routes(v4: &str, v6: &str) -> Value {
    let v4 = v4.lines().skip(1).map(|l| route(l, ROUTE_V4, 4));
    let v6 = v6.lines().map(|l| route(l, ROUTE_V6, 6));
    Value::Array(v4.chain(v6).flatten().collect())
}

fn route(line: &str, columns: &[(&str, Column)], version: i64) -> Option<Value> {
    let mut fields = line.split_whitespace();
    let mut members = Vec::new();
    for &(name, column) in columns {
        let f = fields.next()?;
        let hex = || i64::from_str_radix(f, 16).ok();
        let v = match column {
            Column::Text => Value::from(f),
            Column::Dec => Value::Int(f.parse().ok()?),
            Column::Hex => Value::Int(hex()?),
            Column::HexText => Value::from(hex()?.to_string()),
            Column::Ip4 => {
                let a = u32::from_str_radix(f, 16).ok()?;
                Value::from(Ipv4Addr::from(a.to_ne_bytes()).to_string())
            }
            Column::Ip6 => {
                let mut segments = [0u16; 8];
                for (i, seg) in segments.iter_mut().enumerate() {
                    *seg = u16::from_str_radix(f.get(i * 4..i * 4 + 4)?, 16).ok()?;
                }
                Value::from(Ipv6Addr::from(segments).to_string())
            }
        };
        members.push((name.to_string(), v));
    }
    members.push(("version".to_string(), Value::Int(version)));
    Some(Value::Object(members))
}

/// Fields of whitespace-separated numbers as JSON integers under `names`.
fn counters(names: &[&str], fields: &[&str]) -> Vec<(String, Value)> {
    names
        .iter()
        .zip(fields)
        .filter_map(|(n, f)| Some((n.to_string(), Value::Int(f.parse().ok()?))))
        .collect()
}

/// `/proc/stat`'s per-CPU lines.
pub fn qga_cpustats(text: &str) -> Value {
    const NAMES: &[&str] = &[
        "user",
        "nice",
        "system",
        "idle",
        "iowait",
        "irq",
        "softirq",
        "steal",
        "guest",
        "guestnice",
    ];
    Value::Array(
        text.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let cpu: i64 = f.next()?.strip_prefix("cpu")?.parse().ok()?;
                let fields: Vec<&str> = f.collect();
                let mut m = vec![
                    ("type".to_string(), Value::from("linux")),
                    ("cpu".to_string(), Value::Int(cpu)),
                ];
                m.extend(counters(NAMES, &fields));
                Some(Value::Object(m))
            })
            .collect(),
    )
}

/// `/proc/diskstats`.
pub fn qga_diskstats(text: &str) -> Value {
    const NAMES: &[&str] = &[
        "read-ios",
        "read-merges",
        "read-sectors",
        "read-ticks",
        "write-ios",
        "write-merges",
        "write-sectors",
        "write-ticks",
        "ios-pgr",
        "total-ticks",
        "weight-ticks",
        "discard-ios",
        "discard-merges",
        "discard-sectors",
        "discard-ticks",
        "flush-ios",
        "flush-ticks",
    ];
    Value::Array(
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (major, minor) = (f.first()?.parse().ok()?, f.get(1)?.parse().ok()?);
                Some(obj([
                    ("name", Value::from(*f.get(2)?)),
                    ("major", Value::Int(major)),
                    ("minor", Value::Int(minor)),
                    ("stats", Value::Object(counters(NAMES, &f[3..]))),
                ]))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn virtio_disk_address_names_the_pci_device() {
        let a = disk_address(
            Path::new("/sys/devices/pci0000:00/0000:00:0a.0/virtio3/block/vdb"),
            "vdb",
            "SER1",
        )
        .unwrap();
        assert_eq!(
            a.to_text(),
            r#"{"pci-controller": {"domain": 0, "bus": 0, "slot": 10, "function": 0}, "bus-type": "virtio", "bus": 0, "target": 0, "unit": 0, "serial": "SER1", "dev": "/dev/vdb"}"#
        );
    }

    #[test]
    fn scsi_disk_address_takes_channel_target_and_lun() {
        let a = disk_address(
            Path::new(
                "/sys/devices/pci0000:00/0000:00:04.0/virtio1/host2/target2:0:3/2:0:3:1/block/sdc",
            ),
            "sdc",
            "",
        )
        .unwrap();
        assert_eq!(a.get("bus-type"), Some(&Value::from("scsi")));
        assert_eq!(a.get("target"), Some(&Value::Int(3)));
        assert_eq!(a.get("unit"), Some(&Value::Int(1)));
        assert_eq!(a.get("serial"), None);
    }

    #[test]
    fn a_disk_outside_pci_has_no_address() {
        assert_eq!(
            disk_address(Path::new("/sys/devices/virtual/block/loop0"), "loop0", ""),
            None
        );
    }

    #[test]
    fn disks_list_partitions_and_device_mapper_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        std::fs::create_dir_all(b.join("vda/vda1")).unwrap();
        std::fs::write(b.join("vda/vda1/partition"), "1").unwrap();
        std::fs::create_dir_all(b.join("dm-0/slaves/vda1")).unwrap();
        assert_eq!(
            qga_disks(b).to_text(),
            r#"[{"name": "/dev/dm-0", "partition": false, "dependencies": ["/dev/vda1"]}, {"name": "/dev/vda", "partition": false}, {"name": "/dev/vda1", "partition": true, "dependencies": ["/dev/vda"]}]"#
        );
    }

    #[test]
    fn cpu_and_disk_stats_name_procfs_columns() {
        let cpu = qga_cpustats("cpu  9 9 9 9 9 9 9 9 9 9\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 5\n");
        assert_eq!(
            cpu.to_text(),
            r#"[{"type": "linux", "cpu": 0, "user": 1, "nice": 2, "system": 3, "idle": 4, "iowait": 5, "irq": 6, "softirq": 7, "steal": 8, "guest": 9, "guestnice": 10}]"#
        );
        let disk = qga_diskstats(" 253 0 vda 10 1 200 5 3 0 24 7 0 12 12\n");
        assert_eq!(disk.get("x"), None);
        let Value::Array(d) = disk else { panic!() };
        assert_eq!(d[0].get("name"), Some(&Value::from("vda")));
        assert_eq!(
            d[0].get("stats").and_then(|s| s.get("write-sectors")),
            Some(&Value::Int(24))
        );
        assert_eq!(d[0].get("stats").and_then(|s| s.get("flush-ios")), None);
    }

    #[test]
    fn set_vcpus_counts_the_prefix_it_carried_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cpu0")).unwrap();
        std::fs::create_dir(dir.path().join("cpu1")).unwrap();
        std::fs::write(dir.path().join("cpu1/online"), "1").unwrap();
        let req = |v: &str| crate::qga::json::parse(v.as_bytes()).unwrap();
        let two =
            req(r#"[{"logical-id": 1, "online": false}, {"logical-id": 0, "online": false}]"#);
        assert_eq!(qga_set_vcpus(dir.path(), Some(&two)), Ok(Value::Int(1)));
        assert_eq!(read_trim(&dir.path().join("cpu1/online")), "0");
        let bad = req(r#"[{"logical-id": 7, "online": true}]"#);
        assert!(qga_set_vcpus(dir.path(), Some(&bad)).is_err());
    }

    #[test]
    fn routes_read_both_tables_with_qemu_ga_members() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0102000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t1500\t0\t0\n\
                  bad line\n";
        let v6 = "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000100 00000001 00000002 00000001     eth0\n";
        let r = qga_routes(v4, v6);
        let Value::Array(routes) = &r else { panic!() };
        assert_eq!(routes.len(), 3, "{}", r.to_text());
        let (a, b) = (v4_addresses(&routes[0]), v4_addresses(&routes[1]));
        assert_eq!(a, ("0.0.0.0".into(), "10.0.2.1".into(), "0.0.0.0".into()));
        assert_eq!(
            b,
            ("10.0.2.0".into(), "0.0.0.0".into(), "255.255.255.0".into())
        );
        assert_eq!(routes[0].get("metric"), Some(&Value::Int(100)));
        assert_eq!(routes[0].get("flags"), Some(&Value::Int(3)));
        assert_eq!(routes[1].get("mtu"), Some(&Value::Int(1500)));
        assert_eq!(
            routes[2].to_text(),
            r#"{"destination": "fe80::", "desprefixlen": "64", "source": "::", "srcprefixlen": "0", "nexthop": "::", "metric": 256, "refcnt": 1, "use": 2, "flags": 1, "iface": "eth0", "version": 6}"#
        );
    }

    /// (destination, gateway, mask) of an IPv4 route, on a little-endian machine.
    fn v4_addresses(r: &Value) -> (String, String, String) {
        let s = |k: &str| match r.get(k) {
            Some(Value::Str(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        let (d, g, m) = (s("destination"), s("gateway"), s("mask"));
        if cfg!(target_endian = "little") {
            (d, g, m)
        } else {
            let flip = |a: String| {
                let mut o: Vec<&str> = a.split('.').collect();
                o.reverse();
                o.join(".")
            };
            (flip(d), flip(g), flip(m))
        }
    }

    #[test]
    fn memory_blocks_are_set_through_their_state_files() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("memory");
        let req = |v: &str| crate::qga::json::parse(v.as_bytes()).unwrap();
        let one = req(r#"[{"phys-index": 3, "online": false}]"#);
        assert_eq!(
            qga_set_memory_blocks(&mem, Some(&one)).unwrap().to_text(),
            r#"[{"phys-index": 3, "response": "operation-not-supported", "error-code": 2}]"#
        );
        std::fs::create_dir_all(mem.join("memory3")).unwrap();
        std::fs::write(mem.join("memory3/state"), "online\n").unwrap();
        std::fs::create_dir_all(mem.join("memory4")).unwrap();
        let three = req(
            r#"[{"phys-index": 3, "online": false}, {"phys-index": 4, "online": true},
                {"phys-index": 5, "online": true}]"#,
        );
        assert_eq!(
            qga_set_memory_blocks(&mem, Some(&three)).unwrap().to_text(),
            r#"[{"phys-index": 3, "response": "success"}, {"phys-index": 4, "response": "success"}, {"phys-index": 5, "response": "not-found", "error-code": 2}]"#
        );
        assert_eq!(read_trim(&mem.join("memory3/state")), "offline");
        let off = req(r#"[{"phys-index": 4, "online": false}]"#);
        assert_eq!(
            qga_set_memory_blocks(&mem, Some(&off)).unwrap().to_text(),
            r#"[{"phys-index": 4, "response": "operation-not-supported", "error-code": 2}]"#
        );
        assert!(qga_set_memory_blocks(&mem, None).is_err());
    }

    #[test]
    fn suspend_writes_only_modes_the_kernel_offers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(suspend_writes(d, "guest-suspend-ram").is_err());
        std::fs::write(d.join("state"), "freeze mem disk\n").unwrap();
        std::fs::write(d.join("disk"), "[platform] shutdown reboot\n").unwrap();
        assert_eq!(
            suspend_writes(d, "guest-suspend-ram").unwrap(),
            vec![(d.join("state"), "mem")]
        );
        assert_eq!(
            suspend_writes(d, "guest-suspend-disk").unwrap(),
            vec![(d.join("state"), "disk")]
        );
        assert!(suspend_writes(d, "guest-suspend-hybrid").is_err());
        std::fs::write(d.join("disk"), "[platform] shutdown reboot suspend\n").unwrap();
        assert_eq!(
            suspend_writes(d, "guest-suspend-hybrid").unwrap(),
            vec![(d.join("disk"), "suspend"), (d.join("state"), "disk")]
        );
        std::fs::write(d.join("state"), "freeze\n").unwrap();
        for mode in ["ram", "disk", "hybrid", "standby"] {
            let mode = format!("guest-suspend-{mode}");
            assert!(suspend_writes(d, &mode).is_err(), "{mode}");
        }
    }

    #[test]
    fn vcpus_are_listed_by_number_with_hotplug_state() {
        let dir = tempfile::tempdir().unwrap();
        for (cpu, online) in [("cpu0", None), ("cpu1", Some("0")), ("cpu10", Some("1"))] {
            std::fs::create_dir(dir.path().join(cpu)).unwrap();
            if let Some(v) = online {
                std::fs::write(dir.path().join(cpu).join("online"), v).unwrap();
            }
        }
        std::fs::create_dir(dir.path().join("cpufreq")).unwrap();
        assert_eq!(
            qga_vcpus(dir.path()).to_text(),
            r#"[{"logical-id": 0, "online": true, "can-offline": false}, {"logical-id": 1, "online": false, "can-offline": true}, {"logical-id": 10, "online": true, "can-offline": true}]"#
        );
    }
}
