//! Every request payload of agent.proto to its handler.
//!
//! Quick operations run inline and reply at once. File reads, hashes and trims become
//! [`Transfer`]s the loop steps one piece per turn while the outbox has room. Commands
//! (exec, password changes, hooks, power) become child jobs. While filesystems are frozen only
//! requests that cannot write to a disk run; the rest get `Error{FROZEN}`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{
    Done, ErrorCode, ExecRequest, FsFreezeRequest, FsTrimReply, PowerAction, PowerReply,
    PowerRequest,
};

use crate::event_loop::{Agent, FreezeChain, PendingPower, Transfer};
use crate::exec::{Finished, Owner, Spec};
use crate::logring;
use crate::ops::fsfreeze::HookPhase;
use crate::ops::{self, files, fsfreeze, ChildCommand, OpError, OpResult};
use crate::outbox::{OutboxError, SEND_MAX_FRAME_BYTES};
use crate::power::{self, Method};
use crate::session::Request;

/// Largest collected output per stream, so ExecExit with both streams fits one frame.
pub const COLLECTED_CAP_BYTES: u32 = 30 * 1024;
/// Bytes hashed per loop turn.
pub const HASH_STEP_BYTES: usize = 256 * 1024;
/// Budget for the lines of one AgentLogs reply.
const LOGS_REPLY_BYTES: usize = SEND_MAX_FRAME_BYTES as usize - 1024;

/// The capability (as announced in AgentReady) a request belongs to.
fn capability(p: &Payload) -> Option<&'static str> {
    Some(match p {
        Payload::ExecRequest(_) | Payload::ExecKill(_) => "exec",
        Payload::FileReadRequest(_) | Payload::FileHashRequest(_) => "file-read",
        Payload::FileWriteOpen(_) | Payload::FileWriteChunk(_) | Payload::FileWriteClose(_) => {
            "file-write"
        }
        Payload::FileListRequest(_)
        | Payload::FileStatRequest(_)
        | Payload::MkdirRequest(_)
        | Payload::DeleteRequest(_) => "file-ops",
        Payload::FsFreezeRequest(_)
        | Payload::FsThawRequest(_)
        | Payload::FsFreezeStatusRequest(_) => "fsfreeze",
        Payload::FsTrimRequest(_) => "fstrim",
        Payload::TimeGetRequest(_) | Payload::TimeSetRequest(_) => "time",
        Payload::PowerRequest(_) => "power",
        Payload::UsersRequest(_) | Payload::SetPasswordRequest(_) => "users",
        Payload::SshKeysListRequest(_)
        | Payload::SshKeysAddRequest(_)
        | Payload::SshKeysRemoveRequest(_) => "ssh-keys",
        Payload::NetworkRequest(_) => "network",
        Payload::DisksRequest(_) => "disks",
        Payload::LogsRequest(_) => "logs",
        Payload::TelemetryRequest(_) | Payload::SetTelemetryInterval(_) => "telemetry",
        _ => return None,
    })
}

/// Requests that run while filesystems are frozen: nothing that writes to a disk.
fn allowed_while_frozen(p: &Payload) -> bool {
    matches!(
        p,
        Payload::FsThawRequest(_)
            | Payload::FsFreezeStatusRequest(_)
            | Payload::TelemetryRequest(_)
            | Payload::SetTelemetryInterval(_)
            | Payload::TimeGetRequest(_)
            | Payload::UsersRequest(_)
            | Payload::NetworkRequest(_)
            | Payload::DisksRequest(_)
            | Payload::LogsRequest(_)
            | Payload::FileStatRequest(_)
            | Payload::FileListRequest(_)
            | Payload::FileReadRequest(_)
            | Payload::FileHashRequest(_)
            | Payload::SshKeysListRequest(_)
            | Payload::ExecKill(_)
            | Payload::Cancel(_)
    )
}

fn done() -> Payload {
    Payload::Done(Done {})
}

impl Agent {
    /// Sends the terminal reply of `id`; a reply too large for one frame becomes an error.
    pub(crate) fn reply(&mut self, id: u64, payload: Payload) {
        if let Err(OutboxError::TooLarge(e)) = self.session.reply(id, payload) {
            self.session.error(id, ErrorCode::Internal, e.to_string());
        }
    }

    fn reply_with<T>(&mut self, id: u64, result: OpResult<T>, wrap: impl FnOnce(T) -> Payload) {
        match result {
            Ok(v) => self.reply(id, wrap(v)),
            Err(e) => self.op_error(id, e),
        }
    }

    fn op_error(&mut self, id: u64, e: OpError) {
        log::debug!("request {id} failed: {e}");
        self.session.error(id, e.code, e.message);
    }

    /// Runs (or starts) request `req`; its Ack is already queued.
    pub(crate) fn dispatch(&mut self, req: Request, now: Instant) {
        let id = req.id;
        log::debug!("request {id}: {}", payload_label(&req.payload));
        if let Some(cap) = capability(&req.payload) {
            if self.cfg.disabled(cap) {
                self.session.error(
                    id,
                    ErrorCode::Unsupported,
                    format!("{cap} is disabled by the agent's configuration"),
                );
                return;
            }
        }
        if self.freezer.is_frozen() && !allowed_while_frozen(&req.payload) {
            self.session.error(
                id,
                ErrorCode::Frozen,
                "filesystems are frozen; thaw them first",
            );
            return;
        }
        match req.payload {
            Payload::TelemetryRequest(_) => {
                let t = self.collector.sample();
                self.reply(id, Payload::Telemetry(t));
            }
            Payload::SetTelemetryInterval(s) => {
                self.set_telemetry_interval(s.interval_ms, now);
                self.reply(id, done());
            }
            Payload::ExecRequest(r) => self.start_exec(id, r, now),
            Payload::ExecKill(k) => {
                let sig = if k.signal == 0 {
                    libc::SIGKILL
                } else {
                    k.signal
                };
                if self.jobs.signal(k.target_id, sig) {
                    self.reply(id, done());
                } else {
                    self.session.error(
                        id,
                        ErrorCode::NotFound,
                        format!("no running exec {}", k.target_id),
                    );
                }
            }
            Payload::Cancel(c) => self.cancel(id, c.target_id),
            Payload::FileReadRequest(r) => {
                match files::FileReader::open(&self.policy, &r, self.cfg.file_chunk_bytes) {
                    Ok(reader) => self.transfers.push(Transfer::Read { id, reader }),
                    Err(e) => self.op_error(id, e),
                }
            }
            Payload::FileHashRequest(r) => match files::FileHasher::open(&self.policy, &r) {
                Ok(hasher) => self.transfers.push(Transfer::Hash { id, hasher }),
                Err(e) => self.op_error(id, e),
            },
            Payload::FileWriteOpen(r) => {
                let res = self.writers.open(&self.policy, &r);
                self.reply_with(id, res, Payload::FileWriteOpened);
            }
            Payload::FileWriteChunk(r) => {
                let res = self.writers.write(&r);
                self.reply_with(id, res, |()| done());
            }
            Payload::FileWriteClose(r) => {
                let res = self.writers.close(&r);
                self.reply_with(id, res, Payload::FileWriteDone);
            }
            Payload::FileListRequest(r) => {
                let res = files::list(&self.policy, &r);
                self.reply_with(id, res, Payload::FileList);
            }
            Payload::FileStatRequest(r) => {
                let res = files::stat(&self.policy, &r);
                self.reply_with(id, res, Payload::FileStat);
            }
            Payload::MkdirRequest(r) => {
                let res = files::mkdir(&self.policy, &r);
                self.reply_with(id, res, |()| done());
            }
            Payload::DeleteRequest(r) => {
                let res = files::delete(&self.policy, &r);
                self.reply_with(id, res, |()| done());
            }
            Payload::FsFreezeRequest(r) => self.start_freeze(id, r, now),
            Payload::FsThawRequest(r) => {
                let res = self.freezer.thaw(&r);
                logring::set_frozen(self.freezer.is_frozen());
                let ok = res.is_ok();
                self.reply_with(id, res, Payload::FsThawReply);
                if ok && r.run_hooks {
                    for cmd in self.freezer.hook_commands(HookPhase::Thaw) {
                        self.spawn_command(0, Owner::Detached, cmd, now);
                    }
                }
            }
            Payload::FsFreezeStatusRequest(_) => {
                let status = self.freezer.status(now);
                self.reply(id, Payload::FsFreezeStatus(status));
            }
            Payload::FsTrimRequest(r) => match fsfreeze::trim_targets(&r) {
                Ok(targets) => self.transfers.push(Transfer::Trim {
                    id,
                    targets,
                    next: 0,
                    minimum_bytes: r.minimum_bytes,
                    results: Vec::new(),
                }),
                Err(e) => self.op_error(id, e),
            },
            Payload::TimeGetRequest(_) => {
                let res = ops::timeops::get();
                self.reply_with(id, res, Payload::TimeInfo);
            }
            Payload::TimeSetRequest(r) => {
                let res = ops::timeops::set(&r);
                self.reply_with(id, res, Payload::TimeSetReply);
            }
            Payload::PowerRequest(r) => self.schedule_power(id, r, now),
            Payload::UsersRequest(_) => {
                let res = ops::users::logged_in();
                self.reply_with(id, res, Payload::UserList);
            }
            Payload::SetPasswordRequest(r) => {
                match ops::users::set_password_command(&self.users, &r) {
                    Ok(cmd) => {
                        let owner = Owner::Command {
                            what: "password change".into(),
                        };
                        self.spawn_command(id, owner, cmd, now);
                    }
                    Err(e) => self.op_error(id, e),
                }
            }
            Payload::SshKeysListRequest(r) => {
                let res = ops::users::ssh_keys_list(&self.users, &r);
                self.reply_with(id, res, Payload::SshKeys);
            }
            Payload::SshKeysAddRequest(r) => {
                let res = ops::users::ssh_keys_add(&self.users, &r);
                self.reply_with(id, res, Payload::SshKeys);
            }
            Payload::SshKeysRemoveRequest(r) => {
                let res = ops::users::ssh_keys_remove(&self.users, &r);
                self.reply_with(id, res, Payload::SshKeys);
            }
            Payload::NetworkRequest(_) => {
                let res = ops::netinfo::interfaces();
                self.reply_with(id, res, Payload::NetworkInfo);
            }
            Payload::DisksRequest(_) => {
                let res = ops::disks::disks();
                self.reply_with(id, res, Payload::DisksInfo);
            }
            Payload::LogsRequest(r) => {
                let mut logs = logring::snapshot(r.max_lines);
                // Keep the newest lines that fit one frame.
                let mut size = 0;
                let keep = logs
                    .lines
                    .iter()
                    .rev()
                    .take_while(|l| {
                        size += l.encoded_len() + 4;
                        size <= LOGS_REPLY_BYTES
                    })
                    .count();
                let cut = logs.lines.len() - keep;
                logs.lines.drain(..cut);
                logs.dropped += cut as u64;
                self.reply(id, Payload::AgentLogs(logs));
            }
            // Messages only the agent sends, or session messages the session already
            // handled: a host that sends them as requests gets a clear refusal.
            other @ (Payload::HostHello(_)
            | Payload::AgentReady(_)
            | Payload::Ping(_)
            | Payload::Pong(_)
            | Payload::Ack(_)
            | Payload::Error(_)
            | Payload::Done(_)
            | Payload::Telemetry(_)
            | Payload::ExecOutput(_)
            | Payload::ExecExit(_)
            | Payload::FileChunk(_)
            | Payload::FileReadDone(_)
            | Payload::FileWriteOpened(_)
            | Payload::FileWriteDone(_)
            | Payload::FileList(_)
            | Payload::FileStat(_)
            | Payload::FileHash(_)
            | Payload::FsFreezeReply(_)
            | Payload::FsThawReply(_)
            | Payload::FsFreezeStatus(_)
            | Payload::FsTrimReply(_)
            | Payload::TimeInfo(_)
            | Payload::TimeSetReply(_)
            | Payload::PowerReply(_)
            | Payload::UserList(_)
            | Payload::SshKeys(_)
            | Payload::NetworkInfo(_)
            | Payload::DisksInfo(_)
            | Payload::AgentLogs(_)) => {
                self.session.error(
                    id,
                    ErrorCode::Unsupported,
                    format!(
                        "{} is not a request the agent serves",
                        payload_label(&other)
                    ),
                );
            }
        }
    }

    fn cancel(&mut self, id: u64, target: u64) {
        if self.jobs.signal(target, libc::SIGKILL) {
            // The exec's own terminal reply (ExecExit, killed) follows when it is reaped.
            self.reply(id, done());
        } else if let Some(at) = self.transfers.iter().position(|t| t.id() == target) {
            self.transfers.remove(at);
            self.session
                .error(target, ErrorCode::Cancelled, "cancelled by the host");
            self.reply(id, done());
        } else {
            self.session.error(
                id,
                ErrorCode::NotFound,
                format!("nothing running with id {target}"),
            );
        }
    }

    fn start_exec(&mut self, id: u64, r: ExecRequest, now: Instant) {
        let spec = match self.exec_spec(r) {
            Ok(spec) => spec,
            Err(e) => return self.op_error(id, e),
        };
        let stream = spec.1;
        if let Err(e) = self.jobs.spawn(
            self.poll.registry(),
            id,
            Owner::Exec { stream },
            spec.0,
            now,
        ) {
            self.op_error(id, e);
        }
    }

    fn exec_spec(&self, r: ExecRequest) -> OpResult<(Spec, bool)> {
        if r.argv.is_empty() || r.argv[0].is_empty() {
            return Err(OpError::new(ErrorCode::InvalidArgument, "argv is empty"));
        }
        let mut env = Vec::with_capacity(r.env.len());
        for kv in &r.env {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                OpError::new(
                    ErrorCode::InvalidArgument,
                    format!("environment entry {kv:?} is not KEY=VALUE"),
                )
            })?;
            env.push((k.to_string(), v.to_string()));
        }
        let (mut uid, mut gid) = (None, None);
        if !r.user.is_empty() {
            let user = self.users.user(&r.user)?;
            uid = Some(user.uid);
            gid = Some(user.gid);
        }
        if !r.group.is_empty() {
            gid = Some(self.users.gid(&r.group)?);
        }
        let default_cap = self.cfg.exec_output_cap_bytes;
        // Streaming output is flow-controlled, so it is uncapped unless the request asks;
        // collected output must fit the one ExecExit frame.
        let cap = |req: u32| match (r.stream, req) {
            (true, 0) => u64::MAX,
            (true, c) => u64::from(c),
            (false, 0) => u64::from(default_cap.min(COLLECTED_CAP_BYTES)),
            (false, c) => u64::from(c.min(COLLECTED_CAP_BYTES)),
        };
        let timeout_ms = if r.timeout_ms == 0 {
            self.cfg.exec_timeout_ms
        } else {
            r.timeout_ms
        };
        let spec = Spec {
            caps: [cap(r.stdout_cap_bytes), cap(r.stderr_cap_bytes)],
            argv: r.argv,
            shell: r.shell,
            env,
            clear_env: r.clear_env,
            cwd: (!r.cwd.is_empty()).then(|| r.cwd.into()),
            stdin: r.stdin,
            timeout: Duration::from_millis(u64::from(timeout_ms)),
            kill_grace: Duration::from_millis(u64::from(self.cfg.exec_kill_grace_ms)),
            uid,
            gid,
        };
        Ok((spec, r.stream))
    }

    /// Runs an operation's command as a child job.
    fn spawn_command(&mut self, id: u64, owner: Owner, cmd: ChildCommand, now: Instant) {
        let spec = Spec {
            argv: cmd.argv,
            stdin: cmd.stdin,
            // 0: the agent's default exec timeout.
            timeout: Duration::from_millis(u64::from(if cmd.timeout_ms == 0 {
                self.cfg.exec_timeout_ms
            } else {
                cmd.timeout_ms
            })),
            kill_grace: Duration::from_millis(u64::from(self.cfg.exec_kill_grace_ms)),
            caps: [4096, 4096],
            ..Default::default()
        };
        if let Err(e) = self
            .jobs
            .spawn(self.poll.registry(), id, owner.clone(), spec, now)
        {
            match owner {
                Owner::Detached => log::warn!("hook not started: {e}"),
                Owner::Power(action) => self.power_fallback(action, &e.to_string()),
                Owner::FreezeHook => {
                    self.freeze_chain = None;
                    self.op_error(id, e);
                }
                _ => self.op_error(id, e),
            }
        }
    }

    /// A child ended: answer whoever started it.
    pub(crate) fn child_finished(&mut self, f: Finished, now: Instant) {
        let ok = f.exit.exited && f.exit.exit_code == 0;
        match f.owner.clone() {
            Owner::Exec { .. } => self.reply(f.id, Payload::ExecExit(f.exit)),
            Owner::Command { what } => {
                if ok {
                    self.reply(f.id, done());
                } else {
                    let err = String::from_utf8_lossy(&f.exit.stderr).trim().to_string();
                    self.session.error(
                        f.id,
                        ErrorCode::FailedPrecondition,
                        format!("{what} failed ({}): {err}", describe_exit(&f)),
                    );
                }
            }
            Owner::Detached => {
                if !ok {
                    log::warn!("hook failed ({})", describe_exit(&f));
                }
            }
            Owner::FreezeHook => {
                if ok {
                    self.continue_freeze(now);
                } else if let Some(chain) = self.freeze_chain.take() {
                    let err = String::from_utf8_lossy(&f.exit.stderr).trim().to_string();
                    self.session.error(
                        chain.id,
                        ErrorCode::FailedPrecondition,
                        format!("pre-freeze hook failed ({}): {err}", describe_exit(&f)),
                    );
                }
            }
            Owner::Power(action) => {
                if !ok {
                    self.power_fallback(action, &describe_exit(&f));
                }
            }
        }
    }

    fn start_freeze(&mut self, id: u64, r: FsFreezeRequest, now: Instant) {
        if self.freeze_chain.is_some() {
            self.session
                .error(id, ErrorCode::Busy, "a freeze is already in progress");
            return;
        }
        let remaining = if r.run_hooks {
            self.freezer.hook_commands(HookPhase::Freeze).into()
        } else {
            Default::default()
        };
        self.freeze_chain = Some(FreezeChain {
            id,
            req: r,
            remaining,
        });
        self.continue_freeze(now);
    }

    /// Runs the next pre-freeze hook, or freezes when none is left.
    fn continue_freeze(&mut self, now: Instant) {
        let Some(chain) = self.freeze_chain.as_mut() else {
            return;
        };
        let id = chain.id;
        if let Some(cmd) = chain.remaining.pop_front() {
            self.spawn_command(id, Owner::FreezeHook, cmd, now);
            return;
        }
        if let Some(chain) = self.freeze_chain.take() {
            let res = self.freezer.freeze(&chain.req, now);
            logring::set_frozen(self.freezer.is_frozen());
            self.reply_with(id, res, Payload::FsFreezeReply);
        }
    }

    fn schedule_power(&mut self, id: u64, r: PowerRequest, now: Instant) {
        let action = PowerAction::try_from(r.action).unwrap_or(PowerAction::Unspecified);
        if action == PowerAction::Unspecified {
            self.session.error(
                id,
                ErrorCode::InvalidArgument,
                "power action is unspecified",
            );
            return;
        }
        let method = match &self.cfg.power_command {
            Some(template) => power::configured(action, template),
            None => power::method(action, power::detect_init(std::path::Path::new("/proc"))),
        };
        let delay = Duration::from_millis(u64::from(r.delay_ms));
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| (d + delay).as_millis() as i64);
        log::info!(
            "power {} in {} ms via {}",
            action.as_str_name(),
            r.delay_ms,
            method.describe()
        );
        self.reply(
            id,
            Payload::PowerReply(PowerReply {
                at_unix_ms,
                method: method.describe(),
            }),
        );
        self.power = Some(PendingPower {
            action,
            method,
            at: now + delay,
        });
    }

    pub(crate) fn carry_out_power(&mut self, p: PendingPower, now: Instant) {
        match p.method {
            Method::Command(argv) => {
                let cmd = ChildCommand {
                    argv,
                    stdin: Vec::new(),
                    timeout_ms: 60_000,
                };
                self.spawn_command(0, Owner::Power(p.action), cmd, now);
            }
            Method::Syscall => self.power_fallback(p.action, "no init to ask"),
        }
    }

    fn power_fallback(&mut self, action: PowerAction, why: &str) {
        if !self.cfg.power_syscall_fallback {
            log::error!("power command failed ({why}); reboot(2) fallback is disabled");
            return;
        }
        log::warn!("power command failed ({why}): sync and reboot(2)");
        let err = power::syscall_fallback(action);
        log::error!("reboot(2) failed: {err}");
    }

    /// Steps every transfer once, while the outbox has room.
    pub(crate) fn step_transfers(&mut self, _now: Instant) {
        let mut i = 0;
        while i < self.transfers.len() {
            if self.session.outbox().room() < crate::event_loop::WORK_ROOM_BYTES {
                return;
            }
            let finished = match &mut self.transfers[i] {
                Transfer::Read { id, reader } => {
                    let id = *id;
                    match reader.next_chunk() {
                        Ok(Some(chunk)) => {
                            let _ = self.session.stream(id, Payload::FileChunk(chunk));
                            false
                        }
                        Ok(None) => {
                            let d = reader.done();
                            self.reply(id, Payload::FileReadDone(d));
                            true
                        }
                        Err(e) => {
                            self.op_error(id, e);
                            true
                        }
                    }
                }
                Transfer::Hash { id, hasher } => {
                    let id = *id;
                    match hasher.step(HASH_STEP_BYTES) {
                        Ok(None) => false,
                        Ok(Some(h)) => {
                            self.reply(id, Payload::FileHash(h));
                            true
                        }
                        Err(e) => {
                            self.op_error(id, e);
                            true
                        }
                    }
                }
                Transfer::Trim {
                    id,
                    targets,
                    next,
                    minimum_bytes,
                    results,
                } => {
                    if let Some(mp) = targets.get(*next) {
                        results.push(fsfreeze::trim_one(mp, *minimum_bytes));
                        *next += 1;
                        false
                    } else {
                        let id = *id;
                        let results = std::mem::take(results);
                        self.reply(id, Payload::FsTrimReply(FsTrimReply { results }));
                        true
                    }
                }
            };
            if finished {
                self.transfers.remove(i);
            } else {
                i += 1;
            }
        }
    }
}

fn describe_exit(f: &Finished) -> String {
    if f.exit.timed_out {
        "timed out".into()
    } else if f.exit.exited {
        format!("exit code {}", f.exit.exit_code)
    } else {
        format!("signal {}", f.exit.signal)
    }
}

fn payload_label(p: &Payload) -> &'static str {
    qx_proto::payload_name(p)
}
