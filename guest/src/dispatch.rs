//! Every request payload of agent.proto to its handler.
//!
//! Quick operations run inline and reply at once. File reads, hashes and trims become
//! [`Transfer`]s the loop steps one piece per turn while the outbox has room. Commands
//! (exec, password changes, hooks, power) become child jobs. While filesystems are frozen only
//! requests that cannot write to a disk run; the rest get `Error{FROZEN}`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{
    Done, ErrorCode, ExecRequest, FileChunk, FsFreezeRequest, FsTrimReply, FsTrimResult,
    PowerAction, PowerReply, PowerRequest,
};

use crate::event_loop::{
    lock, Agent, FreezeChain, Opening, PendingPower, Transfer, READ_AHEAD_CHUNKS, READ_QUEUE_BYTES,
    WORK_ROOM_BYTES,
};
use crate::exec::{Finished, Owner, Spec};
use crate::logring;
use crate::ops::fsfreeze::HookPhase;
use crate::ops::{self, files, fsfreeze, ChildCommand, OpError, OpResult};
use crate::outbox::SEND_MAX_FRAME_BYTES;
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
    /// Sends the terminal reply of `id` in the room reserved for it at admission (a reply
    /// too large for that room becomes an error: see [`crate::session::Session::reply`]).
    pub(crate) fn reply(&mut self, id: u64, payload: Payload) {
        let _ = self.session.reply(id, payload);
    }

    fn reply_with<T>(&mut self, id: u64, result: OpResult<T>, wrap: impl FnOnce(T) -> Payload) {
        match result {
            Ok(v) => self.reply(id, wrap(v)),
            Err(e) => self.op_error(id, e),
        }
    }

    /// Runs `op` on the filesystem worker (see [`crate::worker`]) and replies with its
    /// result, wrapped by `wrap`.
    fn offload<T: Send + 'static>(
        &mut self,
        id: u64,
        op: impl FnOnce() -> OpResult<T> + Send + 'static,
        wrap: fn(T) -> Payload,
    ) {
        self.worker.submit(move || {
            let res = op();
            Box::new(move |agent: &mut Agent, _now: Instant| agent.reply_with(id, res, wrap))
        });
    }

    /// Filesystems are frozen, or a freeze is on its way to the worker.
    pub(crate) fn frozen_or_freezing(&self) -> bool {
        self.freezer.is_frozen() || self.freezing
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
        if self.frozen_or_freezing() && !allowed_while_frozen(&req.payload) {
            self.session.error(
                id,
                ErrorCode::Frozen,
                "filesystems are frozen; thaw them first",
            );
            return;
        }
        match req.payload {
            Payload::TelemetryRequest(_) => {
                let collector = self.collector.clone();
                self.offload(
                    id,
                    move || Ok(lock(&collector).sample()),
                    Payload::Telemetry,
                );
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
            // Everything that touches a filesystem runs on the worker.
            Payload::FileReadRequest(r) => {
                if let Err(e) = self.room_for_read() {
                    return self.op_error(id, e);
                }
                self.openings.push(Opening {
                    id,
                    cancelled: false,
                    upload: None,
                });
                let (policy, chunk) = (self.policy.clone(), self.cfg.file_chunk_bytes);
                self.worker.submit(move || {
                    let res = files::FileReader::open(&policy, &r, chunk);
                    Box::new(move |agent: &mut Agent, _now: Instant| {
                        if agent.opened(id) {
                            return;
                        }
                        match res {
                            Ok(reader) => agent.transfers.push(Transfer::Read {
                                id,
                                reader: Some(reader),
                                pending: Default::default(),
                                spare: Vec::new(),
                            }),
                            Err(e) => agent.op_error(id, e),
                        }
                    })
                });
            }
            Payload::FileHashRequest(r) => {
                if let Err(e) = self.room_for_read() {
                    return self.op_error(id, e);
                }
                self.openings.push(Opening {
                    id,
                    cancelled: false,
                    upload: None,
                });
                let policy = self.policy.clone();
                self.worker.submit(move || {
                    let res = files::FileHasher::open(&policy, &r);
                    Box::new(move |agent: &mut Agent, _now: Instant| {
                        if agent.opened(id) {
                            return;
                        }
                        match res {
                            Ok(hasher) => agent.transfers.push(Transfer::Hash {
                                id,
                                hasher: Some(hasher),
                            }),
                            Err(e) => agent.op_error(id, e),
                        }
                    })
                });
            }
            Payload::FileWriteOpen(r) => {
                let handle = Arc::new(Mutex::new(None));
                self.openings.push(Opening {
                    id,
                    cancelled: false,
                    upload: Some(handle.clone()),
                });
                let (writers, policy) = (self.writers.clone(), self.policy.clone());
                self.worker.submit(move || {
                    let res = lock(&writers).open(&policy, &r);
                    if let Ok(opened) = &res {
                        *lock(&handle) = Some(opened.handle);
                    }
                    Box::new(move |agent: &mut Agent, _now: Instant| {
                        // Cancelled meanwhile: its end was sent, and the abort queued behind
                        // this open undoes it.
                        if !agent.opened(id) {
                            agent.reply_with(id, res, Payload::FileWriteOpened);
                        }
                    })
                });
            }
            Payload::FileWriteChunk(r) => {
                let (writers, crc) = (self.writers.clone(), req.data_crc);
                self.offload(id, move || lock(&writers).write(&r, crc), |()| done());
            }
            Payload::FileWriteClose(r) => {
                let writers = self.writers.clone();
                self.offload(id, move || lock(&writers).close(&r), Payload::FileWriteDone);
            }
            Payload::FileListRequest(r) => {
                let (listings, policy) = (self.listings.clone(), self.policy.clone());
                self.offload(
                    id,
                    move || files::list(&policy, &mut lock(&listings), &r, Instant::now()),
                    Payload::FileList,
                );
            }
            Payload::FileStatRequest(r) => {
                let policy = self.policy.clone();
                self.offload(id, move || files::stat(&policy, &r), Payload::FileStat);
            }
            Payload::MkdirRequest(r) => {
                let policy = self.policy.clone();
                self.offload(id, move || files::mkdir(&policy, &r), |()| done());
            }
            Payload::DeleteRequest(r) => {
                let policy = self.policy.clone();
                self.offload(id, move || files::delete(&policy, &r), |()| done());
            }
            Payload::FsFreezeRequest(r) => self.start_freeze(id, r, now),
            Payload::FsThawRequest(r) => {
                // The thaw hooks follow from the loop (`Agent::after_thaw`).
                let res = self.freezer.thaw(&r);
                logring::set_frozen(self.freezer.is_frozen());
                self.reply_with(id, res, Payload::FsThawReply);
                self.after_thaw(now);
            }
            Payload::FsFreezeStatusRequest(_) => {
                let status = self.freezer.status(now);
                self.reply(id, Payload::FsFreezeStatus(status));
            }
            Payload::FsTrimRequest(r) => self.worker.submit(move || {
                let res = fsfreeze::trim_targets(&r);
                Box::new(move |agent: &mut Agent, _now: Instant| match res {
                    Ok(targets) => agent.transfers.push(Transfer::Trim {
                        id,
                        targets,
                        next: 0,
                        minimum_bytes: r.minimum_bytes,
                        results: Vec::new(),
                        in_flight: false,
                    }),
                    Err(e) => agent.op_error(id, e),
                })
            }),
            Payload::TimeGetRequest(_) => {
                let res = ops::timeops::get();
                self.reply_with(id, res, Payload::TimeInfo);
            }
            Payload::TimeSetRequest(r) => {
                let window = ops::timeops::TimeWindow::new(self.cfg.time_max_skew_s);
                let res = ops::timeops::set_within(&r, &window);
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
                let users = self.users.clone();
                let op = move || ops::users::ssh_keys_list(&users, &r);
                self.offload(id, op, Payload::SshKeys);
            }
            Payload::SshKeysAddRequest(r) => {
                let users = self.users.clone();
                let op = move || ops::users::ssh_keys_add(&users, &r);
                self.offload(id, op, Payload::SshKeys);
            }
            Payload::SshKeysRemoveRequest(r) => {
                let users = self.users.clone();
                let op = move || ops::users::ssh_keys_remove(&users, &r);
                self.offload(id, op, Payload::SshKeys);
            }
            Payload::NetworkRequest(_) => {
                let res = ops::netinfo::interfaces();
                self.reply_with(id, res, Payload::NetworkInfo);
            }
            // statvfs of every mount: a dead network mount blocks it.
            Payload::DisksRequest(_) => self.offload(id, ops::disks::disks, Payload::DisksInfo),
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

    /// `Error{BUSY}` when `max_open_reads` reads and hashes are open (each holds a descriptor,
    /// a hash also a 64 KiB buffer).
    fn room_for_read(&self) -> OpResult<()> {
        let open = self
            .transfers
            .iter()
            .filter(|t| matches!(t, Transfer::Read { .. } | Transfer::Hash { .. }))
            .count()
            // One cancelled while opening no longer counts: its descriptor is closed the
            // moment its open comes back.
            + self
                .openings
                .iter()
                .filter(|o| o.upload.is_none() && !o.cancelled)
                .count();
        if open >= self.cfg.max_open_reads {
            return Err(OpError::new(
                ErrorCode::Busy,
                format!("{open} file reads and hashes are already open"),
            ));
        }
        Ok(())
    }

    /// A read's, hash's or upload's open came back from the worker: true when the host
    /// cancelled it meanwhile (what the open brought back is then dropped).
    fn opened(&mut self, id: u64) -> bool {
        match self.openings.iter().position(|o| o.id == id) {
            Some(at) => self.openings.remove(at).cancelled,
            None => false,
        }
    }

    fn cancel(&mut self, id: u64, target: u64) {
        if self.jobs.signal(target, libc::SIGKILL) {
            // The exec's own terminal reply (ExecExit, killed) follows when it is reaped.
            self.reply(id, done());
            return;
        }
        let found = if let Some(at) = self.transfers.iter().position(|t| t.id() == target) {
            self.transfers.remove(at);
            true
        } else if let Some(open) = self
            .openings
            .iter_mut()
            .find(|o| o.id == target && !o.cancelled)
        {
            // Its open is on the worker: it ends now, and what the open brings back is dropped.
            // An upload's is undone by an abort queued on the worker behind it, which runs
            // before any later request's job (while filesystems are frozen, it waits there
            // for the thaw).
            open.cancelled = true;
            if let Some(handle) = open.upload.clone() {
                let writers = self.writers.clone();
                self.worker.submit(move || {
                    if let Some(handle) = *lock(&handle) {
                        let abort = qx_proto::agent::FileWriteClose {
                            handle,
                            commit: false,
                            ..Default::default()
                        };
                        if let Err(e) = lock(&writers).close(&abort) {
                            log::warn!("cancelled upload {target} not aborted: {e}");
                        }
                    }
                    Box::new(|_: &mut Agent, _: Instant| {})
                });
            }
            true
        } else {
            false
        };
        if found {
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
        let (mut uid, mut gid, mut groups, mut login_env) = (None, None, Vec::new(), Vec::new());
        if !r.user.is_empty() {
            let user = self.users.user(&r.user)?;
            uid = Some(user.uid);
            gid = Some(user.gid);
            groups = self.users.groups(&user)?;
            login_env = ops::users::login_env(&user);
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
            groups,
            login_env,
            merge_stderr: false,
        };
        Ok((spec, r.stream))
    }

    /// The child spec of an operation's command.
    fn command_spec(&self, cmd: ChildCommand) -> Spec {
        Spec {
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
        }
    }

    /// Runs an operation's command (or a pre-freeze hook) as a child job.
    fn spawn_command(&mut self, id: u64, owner: Owner, cmd: ChildCommand, now: Instant) {
        let spec = self.command_spec(cmd);
        if let Err(e) = self
            .jobs
            .spawn(self.poll.registry(), id, owner.clone(), spec, now)
        {
            if owner == Owner::FreezeHook {
                self.freeze_chain = None;
            }
            self.op_error(id, e);
        }
    }

    /// After a thaw: queue the thaw hooks if they are due, and remove what had to wait for
    /// the thaw (the temporary files of aborted uploads).
    pub(crate) fn after_thaw(&mut self, now: Instant) {
        if self.frozen_or_freezing() {
            return;
        }
        if self.freezer.take_thaw_hooks_due() {
            self.thaw_hooks = self.freezer.hook_commands(HookPhase::Thaw).into();
        }
        if !self.postponed_unlinks.is_empty() {
            let temps = std::mem::take(&mut self.postponed_unlinks);
            self.worker.submit(move || {
                for temp in temps {
                    temp.remove();
                }
                Box::new(|_: &mut Agent, _: Instant| {})
            });
        }
        self.next_thaw_hook(now);
    }

    /// Starts the next thaw hook unless one runs: one after another, in the order
    /// [`fsfreeze::Freezer::hook_commands`] gives (descending), in a slot the exec limit
    /// cannot take. No free slot: try again later.
    pub(crate) fn next_thaw_hook(&mut self, now: Instant) {
        if self.thaw_hook_running || self.thaw_hook_retry.is_some_and(|at| now < at) {
            return;
        }
        self.thaw_hook_retry = None;
        let Some(cmd) = self.thaw_hooks.front().cloned() else {
            return;
        };
        let spec = self.command_spec(cmd);
        match self
            .jobs
            .spawn(self.poll.registry(), 0, Owner::Detached, spec, now)
        {
            Ok(_) => {
                self.thaw_hooks.pop_front();
                self.thaw_hook_running = true;
            }
            Err(e) if e.code == ErrorCode::Busy => {
                log::warn!("thaw hook waits for a free child slot");
                self.thaw_hook_retry = Some(now + crate::event_loop::SLOT_RETRY);
            }
            Err(e) => {
                log::warn!("thaw hook not started: {e}");
                self.thaw_hooks.pop_front();
                self.next_thaw_hook(now);
            }
        }
    }

    /// A child ended: answer whoever started it.
    pub(crate) fn child_finished(&mut self, f: Finished, now: Instant) {
        if crate::qga::is_qga_job(f.id) {
            return self.qga_child_finished(f, now);
        }
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
                    log::warn!("thaw hook failed ({})", describe_exit(&f));
                }
                self.thaw_hook_running = false;
                self.next_thaw_hook(now);
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
        if self.freeze_chain.is_some() || self.freezing {
            self.session
                .error(id, ErrorCode::Busy, "a freeze is already in progress");
            return;
        }
        if self.exiting() {
            self.session.error(
                id,
                ErrorCode::FailedPrecondition,
                "the agent is exiting; nothing was frozen",
            );
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
            // FIFREEZE flushes dirty data: the worker does it, after the trims and writes
            // already sent to it (it takes jobs in order). Trims not yet sent stop here
            // (`step_transfer`), and writes are refused from now on.
            self.freezing = true;
            let mut freezer = self.freezer.clone();
            self.worker.submit(move || {
                let res = freezer.freeze(&chain.req, now);
                Box::new(move |agent: &mut Agent, _now: Instant| {
                    agent.freezing = false;
                    agent.freezer.adopt_freeze(freezer);
                    logring::set_frozen(agent.freezer.is_frozen());
                    agent.reply_with(id, res, Payload::FsFreezeReply);
                    if agent.exiting() {
                        agent.thaw_for("the agent is exiting");
                    }
                })
            });
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
                    argv: argv.clone(),
                    stdin: Vec::new(),
                    timeout_ms: 60_000,
                };
                let spec = self.command_spec(cmd);
                let owner = Owner::Power(p.action);
                match self.jobs.spawn(self.poll.registry(), 0, owner, spec, now) {
                    Ok(_) => {}
                    // A full child table is no reason to reboot(2) behind the init's back:
                    // the power command has a slot of its own; wait for it.
                    Err(e) if e.code == ErrorCode::Busy => {
                        log::warn!("power command waits for a free child slot");
                        self.power = Some(PendingPower {
                            action: p.action,
                            method: Method::Command(argv),
                            at: now + crate::event_loop::SLOT_RETRY,
                        });
                    }
                    Err(e) => self.power_fallback(p.action, &e.to_string()),
                }
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

    /// Steps every transfer that is not waiting for the worker once.
    pub(crate) fn step_transfers(&mut self, _now: Instant) {
        let mut i = 0;
        while i < self.transfers.len() {
            let t = self.transfers.remove(i);
            if let Some(t) = self.step_transfer(t) {
                self.transfers.insert(i, t);
                i += 1;
            }
        }
    }

    /// Sends the next piece of `t` to the worker; returns `t` while it goes on.
    fn step_transfer(&mut self, t: Transfer) -> Option<Transfer> {
        match t {
            Transfer::Read {
                id,
                reader: Some(mut reader),
                mut pending,
                mut spare,
            } => {
                // Chunks read ahead go first, while the outbox is short.
                while self.session.outbox().room() >= WORK_ROOM_BYTES
                    && self.session.outbox().pending_bytes() < READ_QUEUE_BYTES
                {
                    let Some((chunk, crc)) = pending.pop_front() else {
                        break;
                    };
                    if let Ok(buf) = self.session.stream_chunk(id, chunk, crc) {
                        if spare.len() < READ_AHEAD_CHUNKS {
                            spare.push(buf);
                        }
                    }
                }
                let room_for = self.session.outbox().room() / WORK_ROOM_BYTES;
                if !pending.is_empty() || room_for == 0 {
                    return Some(Transfer::Read {
                        id,
                        reader: Some(reader),
                        pending,
                        spare,
                    });
                }
                // As many chunks as the outbox has room for, shared among the reads (the
                // others' are counted too), so what waits in `pending` stays bounded.
                let reads = 1 + self
                    .transfers
                    .iter()
                    .filter(|t| matches!(t, Transfer::Read { .. }))
                    .count();
                let count = (room_for / reads).clamp(1, READ_AHEAD_CHUNKS);
                let bufs = std::mem::take(&mut spare);
                self.worker.submit(move || {
                    let res = reader.next_chunks(count, bufs);
                    Box::new(move |agent: &mut Agent, _now: Instant| {
                        agent.read_stepped(id, reader, res)
                    })
                });
                Some(Transfer::Read {
                    id,
                    reader: None,
                    pending,
                    spare,
                })
            }
            Transfer::Hash {
                id,
                hasher: Some(mut hasher),
            } => {
                self.worker.submit(move || {
                    let res = hasher.step(HASH_STEP_BYTES);
                    Box::new(move |agent: &mut Agent, _now: Instant| {
                        agent.hash_stepped(id, hasher, res)
                    })
                });
                Some(Transfer::Hash { id, hasher: None })
            }
            Transfer::Trim {
                id,
                targets,
                mut next,
                minimum_bytes,
                mut results,
                in_flight: false,
            } => {
                // FITRIM never reaches a frozen filesystem: once a freeze has started, the
                // mounts not yet trimmed are reported skipped.
                if self.frozen_or_freezing() {
                    for mp in &targets[next..] {
                        results.push(FsTrimResult {
                            mountpoint: mp.clone(),
                            trimmed_bytes: 0,
                            error: "skipped: a filesystem freeze came first".into(),
                        });
                    }
                    next = targets.len();
                }
                let Some(mp) = targets.get(next).cloned() else {
                    self.reply(id, Payload::FsTrimReply(FsTrimReply { results }));
                    return None;
                };
                self.worker.submit(move || {
                    let result = fsfreeze::trim_one(&mp, minimum_bytes);
                    Box::new(move |agent: &mut Agent, _now: Instant| agent.trim_stepped(id, result))
                });
                Some(Transfer::Trim {
                    id,
                    targets,
                    next: next + 1,
                    minimum_bytes,
                    results,
                    in_flight: true,
                })
            }
            // Waiting for the worker.
            t => Some(t),
        }
    }

    fn transfer_mut(&mut self, id: u64) -> Option<&mut Transfer> {
        self.transfers.iter_mut().find(|t| t.id() == id)
    }

    fn remove_transfer(&mut self, id: u64) {
        self.transfers.retain(|t| t.id() != id);
    }

    /// A chunk read by the worker. (A transfer cancelled meanwhile is gone: drop it.)
    fn read_stepped(
        &mut self,
        id: u64,
        reader: files::FileReader,
        res: OpResult<Vec<(FileChunk, u32)>>,
    ) {
        if self.transfer_mut(id).is_none() {
            return;
        }
        match res {
            Ok(chunks) if chunks.is_empty() => {
                self.remove_transfer(id);
                self.reply(id, Payload::FileReadDone(reader.done()));
            }
            Ok(chunks) => {
                if let Some(Transfer::Read {
                    reader: r, pending, ..
                }) = self.transfer_mut(id)
                {
                    *r = Some(reader);
                    pending.extend(chunks);
                }
            }
            Err(e) => {
                self.remove_transfer(id);
                self.op_error(id, e);
            }
        }
    }

    /// A hash step done by the worker.
    fn hash_stepped(
        &mut self,
        id: u64,
        hasher: files::FileHasher,
        res: OpResult<Option<qx_proto::agent::FileHash>>,
    ) {
        if self.transfer_mut(id).is_none() {
            return;
        }
        match res {
            Ok(None) => {
                if let Some(t) = self.transfer_mut(id) {
                    *t = Transfer::Hash {
                        id,
                        hasher: Some(hasher),
                    };
                }
            }
            Ok(Some(h)) => {
                self.remove_transfer(id);
                self.reply(id, Payload::FileHash(h));
            }
            Err(e) => {
                self.remove_transfer(id);
                self.op_error(id, e);
            }
        }
    }

    /// One mount trimmed by the worker.
    fn trim_stepped(&mut self, id: u64, result: FsTrimResult) {
        if let Some(Transfer::Trim {
            results, in_flight, ..
        }) = self.transfer_mut(id)
        {
            results.push(result);
            *in_flight = false;
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
