//! Guest-agent RPCs: every call goes through the agent connection manager.
//!
//! Each operation builds one agent request (or, for files and exec streams, a short sequence
//! of them), hands it to the VM's link and returns the typed reply or an [`AgentError`].
//! The VM layer calls the typed operations ([`AgentApi::power`], [`AgentApi::freeze`],
//! [`AgentApi::thaw`], [`AgentApi::sync_time`]); the RPC-shaped ones take node.proto's
//! request messages. Nothing here knows about gRPC: errors become `tonic::Status` at the gRPC
//! edge ([`crate::service::status`]).

use crate::agent::command::{Command, CommandOptions, Redelivery, Step};
use crate::agent::link::Link;
use crate::agent::stats::LinkSnapshot;
use crate::agent::{AgentConfig, AgentManager};
pub use crate::agent::{AgentEvent, AgentEventKind};
use crate::error::AgentError;
use crate::pb;
use crate::stream::BoxStream;
use qx_proto::agent::envelope::Payload;
use qx_proto::agent::{self as ap};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

/// Largest data chunk of one FileWriteChunk (each is acknowledged and answered).
pub const WRITE_CHUNK_BYTES: usize = qx_proto::MAX_FILE_CHUNK_BYTES as usize;
/// FileWriteChunks in flight at once: the next chunks cross the port while the agent writes
/// the previous one, instead of every chunk waiting for the last one's answer.
pub const WRITE_WINDOW_CHUNKS: usize = 4;
/// Chunk size asked of the agent for reads: the largest, since each chunk costs the agent a
/// fixed share of time on top of its bytes (docs/benchmarks.md).
pub const READ_CHUNK_BYTES: u32 = qx_proto::MAX_FILE_CHUNK_BYTES;
/// Bytes asked for by one FileReadRequest. A window's chunks always fit the command's item
/// buffer, so the VM's reader task never waits for a slow gRPC client.
pub const READ_WINDOW_BYTES: u64 = 1024 * 1024;
const READ_WINDOW_ITEMS: usize = (READ_WINDOW_BYTES / READ_CHUNK_BYTES as u64) as usize + 8;
/// Times one read may resume after a lost connection, from the last byte it received.
const READ_RESUMES: u32 = 16;
/// Exec output items buffered per streaming exec before the caller counts as too slow; the
/// bytes they may hold are bounded apart ([`crate::agent::command::ITEM_BUFFER_BYTES`]).
const EXEC_STREAM_ITEMS: usize = 1024;
/// SyncTime sets the guest clock only when it is off by more than this (or `force`).
pub const TIME_SYNC_THRESHOLD_NS: i64 = 100_000_000;
/// Total time for an exec without any timeout given.
const EXEC_DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Extra time beyond the exec's own timeout for the agent to report the exit.
const EXEC_MARGIN: Duration = Duration::from_secs(10);
const LONG_OP_TIMEOUT: Duration = Duration::from_secs(600);

/// Guest-agent RPCs: every call goes through the agent connection manager.
#[derive(Debug)]
pub struct AgentApi {
    mgr: AgentManager,
}

impl Default for AgentApi {
    fn default() -> Self {
        AgentApi::new(AgentConfig::default())
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn unix_ms(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn ms(timeout_ms: u32) -> Option<Duration> {
    (timeout_ms > 0).then(|| Duration::from_millis(u64::from(timeout_ms)))
}

fn unexpected(link: &Link, id: u64, kind: &'static str, got: Payload) -> AgentError {
    AgentError::UnexpectedReply {
        vm_id: link.vm_id.clone(),
        id,
        kind,
        got: qx_proto::payload_name(&got),
    }
}

/// Runs one request to its terminal reply and extracts the expected variant.
macro_rules! call {
    ($self:ident, $vm:expr, $timeout:expr, $red:expr, $req:expr, $variant:ident) => {{
        let link = $self.mgr.link($vm)?;
        let cmd = link.start($req, $self.opts($timeout, $red), 1)?;
        let (id, kind) = (cmd.id(), cmd.kind);
        match cmd.finish().await? {
            Payload::$variant(x) => Ok::<_, AgentError>(x),
            other => Err(unexpected(&link, id, kind, other)),
        }
    }};
}

/// Why a WriteGuestFile failed: the agent side, or the caller's own request stream (whose
/// error, of the caller's type, is handed back as it came).
#[derive(Debug)]
pub enum WriteError<E> {
    Agent(AgentError),
    Caller(E),
}

impl<E> From<AgentError> for WriteError<E> {
    fn from(e: AgentError) -> Self {
        WriteError::Agent(e)
    }
}

/// Waits for the answer to one queued FileWriteChunk.
async fn chunk_written((link, cmd): (Arc<Link>, Command)) -> Result<(), AgentError> {
    let (id, kind) = (cmd.id(), cmd.kind);
    match cmd.finish().await? {
        Payload::Done(_) => Ok(()),
        other => Err(unexpected(&link, id, kind, other)),
    }
}

impl AgentApi {
    pub fn new(cfg: AgentConfig) -> AgentApi {
        AgentApi {
            mgr: AgentManager::new(cfg),
        }
    }

    /// The connection manager (stats, links, tests).
    pub fn manager(&self) -> &AgentManager {
        &self.mgr
    }

    /// Binds `vm_id` to its agent socket, as read from the VM's own definition, and
    /// (re)starts its connection. Replacing a binding closes the old connection first.
    pub fn attach(&self, vm_id: &str, socket: PathBuf) {
        if let Err(e) = self.mgr.attach(vm_id, socket) {
            log::error!("vm {vm_id}: cannot bind agent socket: {e}");
        }
    }

    /// `vm_id` went back to a snapshot: the guest's memory and its agent are those of the
    /// snapshot's moment. Every command in flight fails "VM reverted", the connection is
    /// closed and opened again (to `socket`, read back from the reverted definition, when
    /// given), and the agent is met as new. With `thaw` (the snapshot was taken with the
    /// filesystems frozen, so the restored guest is frozen) the agent is told to thaw once
    /// it is back, in the background.
    pub fn reset_after_revert(&self, vm_id: &str, socket: Option<PathBuf>, thaw: bool) {
        if let Ok(link) = self.mgr.link(vm_id) {
            link.reset_for_revert();
        }
        if let Some(path) = socket {
            self.attach(vm_id, path);
        }
        let Ok(link) = self.mgr.link(vm_id) else {
            return;
        };
        if !thaw {
            return;
        }
        let opts = self.opts(0, Redelivery::SameSession);
        let vm_id = vm_id.to_string();
        tokio::spawn(async move {
            // Token 0 thaws whatever the agent of the snapshot's moment had frozen.
            let req = Payload::FsThawRequest(ap::FsThawRequest {
                token: 0,
                run_hooks: true,
            });
            let res = match link.start(req, opts, 1) {
                Ok(cmd) => cmd.finish().await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                log::warn!("vm {vm_id}: thaw after reverting to a quiesced snapshot failed: {e}");
            }
        });
    }

    /// Closes `vm_id`'s agent connection and forgets its socket.
    pub fn detach(&self, vm_id: &str) {
        self.mgr.detach(vm_id)
    }

    /// Agent connection changes, for `StreamEvents`.
    pub fn agent_events(&self) -> broadcast::Receiver<AgentEvent> {
        self.mgr.subscribe()
    }

    /// What the daemon knows of `vm_id`'s agent, never an error: an unbound VM reads as
    /// not connected. For VmStatus.
    pub fn agent_info(&self, vm_id: &str) -> pb::GuestAgentInfo {
        match self.mgr.link(vm_id) {
            Ok(link) => info_of(&link),
            Err(_) => pb::GuestAgentInfo::default(),
        }
    }

    /// How many bound agents read as connected.
    pub fn connected_count(&self) -> usize {
        self.mgr.links().iter().filter(|l| l.is_connected()).count()
    }

    fn opts(&self, timeout_ms: u32, redelivery: Redelivery) -> CommandOptions {
        let cfg = self.mgr.config();
        let timeout = ms(timeout_ms).unwrap_or(cfg.default_timeout);
        CommandOptions {
            ack_timeout: cfg.ack_timeout.min(timeout),
            timeout: Some(timeout),
            redelivery,
        }
    }

    fn opts_for(&self, timeout: Duration, redelivery: Redelivery) -> CommandOptions {
        CommandOptions {
            ack_timeout: self.mgr.config().ack_timeout.min(timeout),
            timeout: Some(timeout),
            redelivery,
        }
    }

    /// One tracked Ping; returns the round trip.
    async fn ping(&self, link: &Arc<Link>, timeout_ms: u32) -> Result<Duration, AgentError> {
        let timeout = ms(timeout_ms).unwrap_or(self.mgr.config().ack_timeout);
        let opts = CommandOptions {
            ack_timeout: timeout,
            timeout: Some(timeout),
            redelivery: Redelivery::SameSession,
        };
        let started = Instant::now();
        let cmd = link.start(Payload::Ping(ap::Ping { seq: 0 }), opts, 1)?;
        let (id, kind) = (cmd.id(), cmd.kind);
        match cmd.finish().await? {
            Payload::Pong(_) => Ok(started.elapsed()),
            other => Err(unexpected(link, id, kind, other)),
        }
    }

    pub async fn ping_agent(
        &self,
        request: pb::AgentRequest,
    ) -> Result<pb::PingAgentResponse, AgentError> {
        let link = self.mgr.link(&request.vm_id)?;
        let rtt = self.ping(&link, request.timeout_ms).await?;
        let cache = link.cache();
        Ok(pb::PingAgentResponse {
            rtt_us: rtt.as_micros() as u64,
            session_id: link.session().unwrap_or(0),
            agent_version: cache
                .ready
                .map(|r| r.agent_version.clone())
                .unwrap_or_default(),
        })
    }

    pub async fn get_agent_info(
        &self,
        request: pb::AgentRequest,
    ) -> Result<pb::GuestAgentInfo, AgentError> {
        let link = self.mgr.link(&request.vm_id)?;
        Ok(info_of(&link))
    }

    pub async fn get_agent_connection_stats(
        &self,
        request: pb::AgentStatsRequest,
    ) -> Result<pb::AgentConnectionStatsResponse, AgentError> {
        let links = if request.vm_id.is_empty() {
            self.mgr.links()
        } else {
            vec![self.mgr.link(&request.vm_id)?]
        };
        Ok(pb::AgentConnectionStatsResponse {
            connections: links.iter().map(|l| stats_pb(&l.stats())).collect(),
        })
    }

    /// The request's exec, checked and set to `stream`, with the time the host waits for it:
    /// the call's own timeout, else the exec's plus a margin, else the default.
    fn exec_of(
        request: &pb::ExecuteInGuestRequest,
        stream: bool,
    ) -> Result<(ap::ExecRequest, Duration), AgentError> {
        let mut exec = request
            .exec
            .clone()
            .ok_or_else(|| AgentError::InvalidArgument("exec is missing".into()))?;
        if exec.argv.is_empty() {
            return Err(AgentError::InvalidArgument("exec.argv is empty".into()));
        }
        exec.stream = stream;
        let timeout = ms(request.timeout_ms).unwrap_or_else(|| {
            ms(exec.timeout_ms)
                .map(|t| t + EXEC_MARGIN)
                .unwrap_or(EXEC_DEFAULT_TIMEOUT)
        });
        Ok((exec, timeout))
    }

    pub async fn execute_in_guest(
        &self,
        request: pb::ExecuteInGuestRequest,
    ) -> Result<ap::ExecExit, AgentError> {
        let (exec, timeout) = Self::exec_of(&request, false)?;
        let link = self.mgr.link(&request.vm_id)?;
        let cmd = link.start(
            Payload::ExecRequest(exec),
            self.opts_for(timeout, Redelivery::SameSession),
            1,
        )?;
        let (id, kind) = (cmd.id(), cmd.kind);
        match cmd.finish().await? {
            Payload::ExecExit(x) => Ok(x),
            other => Err(unexpected(&link, id, kind, other)),
        }
    }

    pub async fn stream_exec_in_guest(
        &self,
        request: pb::ExecuteInGuestRequest,
    ) -> Result<BoxStream<pb::ExecEvent, AgentError>, AgentError> {
        let (exec, timeout) = Self::exec_of(&request, true)?;
        let link = self.mgr.link(&request.vm_id)?;
        let mut cmd = link.start(
            Payload::ExecRequest(exec),
            self.opts_for(timeout, Redelivery::Never),
            EXEC_STREAM_ITEMS,
        )?;
        // Two events queued for the gRPC stream: what waits for a slow client is the command's
        // item buffer, bounded in bytes.
        let (tx, rx) = mpsc::channel::<Result<pb::ExecEvent, AgentError>>(2);
        let started = pb::ExecEvent {
            event: Some(pb::exec_event::Event::StartedId(cmd.id())),
        };
        tokio::spawn(async move {
            if tx.send(Ok(started)).await.is_err() {
                return;
            }
            loop {
                // Dropping `cmd` (the client went away) cancels the exec in the guest.
                let ev = match cmd.next().await {
                    Ok(Step::Item(Payload::ExecOutput(o))) => Ok(pb::ExecEvent {
                        event: Some(pb::exec_event::Event::Output(o)),
                    }),
                    Ok(Step::Done(Payload::ExecExit(x))) => {
                        let _ = tx
                            .send(Ok(pb::ExecEvent {
                                event: Some(pb::exec_event::Event::Exit(x)),
                            }))
                            .await;
                        return;
                    }
                    Ok(Step::Item(_)) => continue,
                    Ok(Step::Done(other)) => {
                        let e = unexpected(&cmd.link, cmd.id(), cmd.kind, other);
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    pub async fn kill_guest_exec(
        &self,
        request: pb::KillGuestExecRequest,
    ) -> Result<pb::Empty, AgentError> {
        let req = Payload::ExecKill(ap::ExecKill {
            target_id: request.exec_id,
            signal: request.signal,
        });
        call!(self, &request.vm_id, 0, Redelivery::SameSession, req, Done)?;
        Ok(pb::Empty {})
    }

    pub async fn read_guest_file(
        &self,
        request: pb::ReadGuestFileRequest,
    ) -> Result<BoxStream<pb::GuestFileChunk, AgentError>, AgentError> {
        let link = self.mgr.link(&request.vm_id)?;
        let stat_req = Payload::FileStatRequest(ap::FileStatRequest {
            path: request.path.clone(),
            follow_symlinks: true,
        });
        let stat = call!(
            self,
            &request.vm_id,
            request.timeout_ms,
            Redelivery::SameSession,
            stat_req,
            FileStat
        )?;
        let file_size = stat.size;
        let window_timeout = ms(request.timeout_ms).unwrap_or(self.mgr.config().default_timeout);
        let opts = self.opts_for(window_timeout, Redelivery::Never);
        let (tx, rx) = mpsc::channel::<Result<pb::GuestFileChunk, AgentError>>(8);
        tokio::spawn(async move {
            let res = read_windows(&link, &request, file_size, opts, &tx).await;
            if let Err(e) = res {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// WriteGuestFile: the first message of `requests` is the header, the rest is data. The
    /// caller's own stream errors come back as [`WriteError::Caller`], untouched.
    pub async fn write_guest_file<S, E>(
        &self,
        mut requests: S,
    ) -> Result<ap::FileWriteDone, WriteError<E>>
    where
        S: Stream<Item = Result<pb::WriteGuestFileRequest, E>> + Unpin + Send,
    {
        let first = requests
            .next()
            .await
            .transpose()
            .map_err(WriteError::Caller)?
            .ok_or_else(|| AgentError::InvalidArgument("empty WriteGuestFile stream".into()))?;
        let header = match first.part {
            Some(pb::write_guest_file_request::Part::Header(h)) => h,
            _ => {
                return Err(AgentError::InvalidArgument(
                    "the first WriteGuestFile message must carry the header".into(),
                )
                .into())
            }
        };
        let open = header
            .open
            .clone()
            .ok_or_else(|| AgentError::InvalidArgument("header.open is missing".into()))?;
        let vm = header.vm_id.clone();
        let t = header.timeout_ms;
        // Held until the transfer is closed: beyond the agent's open-file limit a transfer
        // waits here, within the call's timeout, instead of being refused Busy by the agent.
        let timeout = ms(t).unwrap_or(self.mgr.config().default_timeout);
        let _slot = self
            .mgr
            .link(&vm)?
            .write_slot(Instant::now() + timeout)
            .await?;
        // An agent that keeps a CRC32C is checked by it and hashes nothing: SHA-256 is its
        // largest per-byte cost in a VM, and the host hashes the data for the caller anyway.
        let crc = agent_keeps_crc32c(&*self.mgr.link(&vm)?);
        let open = ap::FileWriteOpen {
            skip_sha256: crc,
            ..open
        };
        let req = Payload::FileWriteOpen(open);
        let opened = call!(self, &vm, t, Redelivery::SameSession, req, FileWriteOpened)?;
        let handle = opened.handle;
        let result = self
            .write_body(&vm, t, handle, crc, &header, &mut requests)
            .await;
        if result.is_err() {
            // Best effort: drop the temporary file in the guest.
            let close = Payload::FileWriteClose(ap::FileWriteClose {
                handle,
                commit: false,
                expected_sha256: Vec::new(),
                expected_crc32c: None,
            });
            let _ = call!(self, &vm, t, Redelivery::SameSession, close, FileWriteDone);
        }
        result
    }

    async fn write_body<S, E>(
        &self,
        vm: &str,
        t: u32,
        handle: u64,
        crc_check: bool,
        header: &pb::WriteGuestFileHeader,
        requests: &mut S,
    ) -> Result<ap::FileWriteDone, WriteError<E>>
    where
        S: Stream<Item = Result<pb::WriteGuestFileRequest, E>> + Unpin + Send,
    {
        let mut hasher = Sha256::new();
        let mut crc = 0u32;
        let mut offset = 0u64;
        let mut buf: Vec<u8> = Vec::new();
        // Chunks already queued on the link, oldest first. The agent takes them in order (each
        // offset must follow the last), so answers come back in order too. Dropping them on an
        // error cancels them.
        let mut in_flight = std::collections::VecDeque::with_capacity(WRITE_WINDOW_CHUNKS);
        loop {
            let msg = requests
                .next()
                .await
                .transpose()
                .map_err(WriteError::Caller)?;
            let eof = msg.is_none();
            if let Some(m) = msg {
                match m.part {
                    Some(pb::write_guest_file_request::Part::Data(d)) => buf.extend_from_slice(&d),
                    _ => {
                        return Err(AgentError::InvalidArgument(
                            "only the first WriteGuestFile message may carry a header".into(),
                        )
                        .into())
                    }
                }
            }
            while buf.len() >= WRITE_CHUNK_BYTES || (eof && !buf.is_empty()) {
                let n = buf.len().min(WRITE_CHUNK_BYTES);
                let data: Vec<u8> = buf.drain(..n).collect();
                hasher.update(&data);
                crc = qx_proto::crc32c_append(crc, &data);
                let req = Payload::FileWriteChunk(ap::FileWriteChunk {
                    handle,
                    offset,
                    data,
                });
                if in_flight.len() == WRITE_WINDOW_CHUNKS {
                    if let Some(oldest) = in_flight.pop_front() {
                        chunk_written(oldest).await?;
                    }
                }
                let link = self.mgr.link(vm)?;
                let cmd = link.start(req, self.opts(t, Redelivery::SameSession), 1)?;
                in_flight.push_back((link, cmd));
                offset += n as u64;
            }
            if eof {
                break;
            }
        }
        while let Some(oldest) = in_flight.pop_front() {
            chunk_written(oldest).await?;
        }
        let digest = hasher.finalize().to_vec();
        if !header.expected_sha256.is_empty() && header.expected_sha256 != digest {
            return Err(AgentError::Integrity {
                vm_id: vm.to_string(),
                what: "the data received does not match expected_sha256; nothing committed".into(),
            }
            .into());
        }
        // The agent commits only content that matches: by CRC32C when it keeps one, else by
        // sha256.
        let close = Payload::FileWriteClose(ap::FileWriteClose {
            handle,
            commit: true,
            expected_sha256: if crc_check {
                Vec::new()
            } else {
                digest.clone()
            },
            expected_crc32c: crc_check.then_some(crc),
        });
        let mut done = call!(self, vm, t, Redelivery::SameSession, close, FileWriteDone)?;
        let matches = if crc_check {
            done.crc32c == crc
        } else {
            done.sha256 == digest
        };
        if !matches || done.bytes != offset {
            let check = if crc_check { "crc32c" } else { "sha256" };
            return Err(AgentError::Integrity {
                vm_id: vm.to_string(),
                what: format!(
                    "the guest stored {} bytes with a different {check} than the {offset} bytes sent",
                    done.bytes
                ),
            }
            .into());
        }
        // The content's sha256, for the caller: the host's own, equal to the agent's when it
        // hashed.
        done.sha256 = digest;
        Ok(done)
    }

    pub async fn list_guest_dir(
        &self,
        request: pb::GuestListRequest,
    ) -> Result<ap::FileList, AgentError> {
        let req = Payload::FileListRequest(request.request.unwrap_or_default());
        call!(
            self,
            &request.vm_id,
            0,
            Redelivery::SameSession,
            req,
            FileList
        )
    }

    pub async fn stat_guest_path(
        &self,
        request: pb::GuestStatRequest,
    ) -> Result<ap::FileStat, AgentError> {
        let req = Payload::FileStatRequest(request.request.unwrap_or_default());
        call!(
            self,
            &request.vm_id,
            0,
            Redelivery::SameSession,
            req,
            FileStat
        )
    }

    pub async fn mkdir_guest(
        &self,
        request: pb::GuestMkdirRequest,
    ) -> Result<pb::Empty, AgentError> {
        let req = Payload::MkdirRequest(request.request.unwrap_or_default());
        call!(self, &request.vm_id, 0, Redelivery::SameSession, req, Done)?;
        Ok(pb::Empty {})
    }

    pub async fn delete_guest_path(
        &self,
        request: pb::GuestDeleteRequest,
    ) -> Result<pb::Empty, AgentError> {
        let req = Payload::DeleteRequest(request.request.unwrap_or_default());
        call!(self, &request.vm_id, 0, Redelivery::SameSession, req, Done)?;
        Ok(pb::Empty {})
    }

    pub async fn hash_guest_file(
        &self,
        request: pb::GuestHashRequest,
    ) -> Result<ap::FileHash, AgentError> {
        let req = Payload::FileHashRequest(ap::FileHashRequest { path: request.path });
        let t = request.timeout_ms;
        let t = if t == 0 {
            LONG_OP_TIMEOUT.as_millis() as u32
        } else {
            t
        };
        call!(
            self,
            &request.vm_id,
            t,
            Redelivery::SameSession,
            req,
            FileHash
        )
    }

    /// Asks the agent to power the guest off, halt it or reboot it, after `delay_ms`.
    pub async fn power(
        &self,
        vm_id: &str,
        action: ap::PowerAction,
        delay_ms: u32,
    ) -> Result<ap::PowerReply, AgentError> {
        let req = Payload::PowerRequest(ap::PowerRequest {
            action: action as i32,
            delay_ms,
        });
        call!(self, vm_id, 0, Redelivery::SameSession, req, PowerReply)
    }

    pub async fn guest_shutdown(
        &self,
        request: pb::GuestPowerRequest,
    ) -> Result<ap::PowerReply, AgentError> {
        let action = if request.halt {
            ap::PowerAction::Halt
        } else {
            ap::PowerAction::Shutdown
        };
        self.power(&request.vm_id, action, request.delay_ms).await
    }

    pub async fn guest_reboot(
        &self,
        request: pb::GuestPowerRequest,
    ) -> Result<ap::PowerReply, AgentError> {
        self.power(&request.vm_id, ap::PowerAction::Reboot, request.delay_ms)
            .await
    }

    /// Freezes the guest's filesystems (`mountpoints`, or all of them); the agent thaws them
    /// by itself after `auto_thaw_s`. The reply's token thaws them ([`AgentApi::thaw`]).
    pub async fn freeze(
        &self,
        vm_id: &str,
        mountpoints: Vec<String>,
        auto_thaw_s: u32,
        run_hooks: bool,
    ) -> Result<ap::FsFreezeReply, AgentError> {
        let req = Payload::FsFreezeRequest(ap::FsFreezeRequest {
            mountpoints,
            auto_thaw_ms: auto_thaw_s.saturating_mul(1000),
            run_hooks,
        });
        call!(self, vm_id, 0, Redelivery::SameSession, req, FsFreezeReply)
    }

    /// Thaws what the freeze that returned `token` froze (0: whatever is frozen).
    pub async fn thaw(
        &self,
        vm_id: &str,
        token: u64,
        run_hooks: bool,
    ) -> Result<ap::FsThawReply, AgentError> {
        let req = Payload::FsThawRequest(ap::FsThawRequest { token, run_hooks });
        call!(self, vm_id, 0, Redelivery::SameSession, req, FsThawReply)
    }

    pub async fn quiesce_filesystems(
        &self,
        request: pb::QuiesceFilesystemsRequest,
    ) -> Result<ap::FsFreezeReply, AgentError> {
        self.freeze(
            &request.vm_id,
            request.mount_points,
            request.timeout_seconds,
            request.run_pre_freeze_scripts,
        )
        .await
    }

    pub async fn thaw_filesystems(
        &self,
        request: pb::ThawFilesystemsRequest,
    ) -> Result<ap::FsThawReply, AgentError> {
        self.thaw(
            &request.vm_id,
            request.quiesce_token,
            request.run_post_thaw_scripts,
        )
        .await
    }

    pub async fn fs_freeze_status(
        &self,
        request: pb::AgentRequest,
    ) -> Result<ap::FsFreezeStatus, AgentError> {
        let req = Payload::FsFreezeStatusRequest(ap::FsFreezeStatusRequest {});
        let t = request.timeout_ms;
        call!(
            self,
            &request.vm_id,
            t,
            Redelivery::SameSession,
            req,
            FsFreezeStatus
        )
    }

    pub async fn trim_filesystems(
        &self,
        request: pb::TrimFilesystemsRequest,
    ) -> Result<ap::FsTrimReply, AgentError> {
        let req = Payload::FsTrimRequest(ap::FsTrimRequest {
            mountpoints: request.mount_points,
            minimum_bytes: request.minimum_bytes,
        });
        let t = LONG_OP_TIMEOUT.as_millis() as u32;
        call!(
            self,
            &request.vm_id,
            t,
            Redelivery::SameSession,
            req,
            FsTrimReply
        )
    }

    pub async fn sync_time(
        &self,
        request: pb::SyncTimeRequest,
    ) -> Result<pb::SyncTimeResponse, AgentError> {
        self.sync_clock(&request.vm_id, request.force, request.write_rtc)
            .await
    }

    /// Measures the round trip with a ping, reads the guest clock, and sets it to
    /// the host's time plus half the round trip when it is off by more than the threshold
    /// plus the reading's own uncertainty (half the round trip of the read), or with `force`.
    pub async fn sync_clock(
        &self,
        vm_id: &str,
        force: bool,
        write_rtc: bool,
    ) -> Result<pb::SyncTimeResponse, AgentError> {
        let link = self.mgr.link(vm_id)?;
        let rtt = self.ping(&link, 0).await?;
        let before = Instant::now();
        let host_before = now_unix_ns();
        let req = Payload::TimeGetRequest(ap::TimeGetRequest {});
        let guest = call!(self, vm_id, 0, Redelivery::SameSession, req, TimeInfo)?;
        let rtt_get = before.elapsed();
        // The guest read its clock about half a round trip after we sent the request.
        let host_at_read = host_before + (rtt_get.as_nanos() / 2) as i64;
        // The guest's number is untrusted: a reading so far off that the offset does not fit
        // in i64 nanoseconds (±292 years) is refused, not wrapped.
        let offset_ns = guest
            .unix_ns
            .checked_sub(host_at_read)
            .filter(|o| *o != i64::MIN)
            .ok_or_else(|| AgentError::Integrity {
                vm_id: vm_id.to_string(),
                what: format!(
                    "guest clock reading {} ns is out of range of the host's clock",
                    guest.unix_ns
                ),
            })?;
        let mut resp = pb::SyncTimeResponse {
            offset_seconds: offset_ns as f64 / 1e9,
            time_source: "host".into(),
            rtt_us: rtt.as_micros() as u64,
            rtc_written: false,
            changed: false,
        };
        // The reading is uncertain by half the round trip of the read itself: set the clock
        // only when the offset is beyond the threshold plus that uncertainty (or `force`).
        let uncertainty_ns = (rtt_get.as_nanos() / 2) as i64;
        if force || offset_ns.abs() > TIME_SYNC_THRESHOLD_NS + uncertainty_ns {
            let half = (rtt.as_nanos() / 2) as i64;
            let req = Payload::TimeSetRequest(ap::TimeSetRequest {
                unix_ns: now_unix_ns() + half,
                write_rtc,
                force,
            });
            let set = call!(self, vm_id, 0, Redelivery::SameSession, req, TimeSetReply)?;
            resp.changed = true;
            resp.rtc_written = set.rtc_written;
        }
        Ok(resp)
    }

    pub async fn get_guest_time(
        &self,
        request: pb::AgentRequest,
    ) -> Result<ap::TimeInfo, AgentError> {
        let req = Payload::TimeGetRequest(ap::TimeGetRequest {});
        let t = request.timeout_ms;
        call!(
            self,
            &request.vm_id,
            t,
            Redelivery::SameSession,
            req,
            TimeInfo
        )
    }

    pub async fn list_guest_users(
        &self,
        request: pb::AgentRequest,
    ) -> Result<ap::UserList, AgentError> {
        let req = Payload::UsersRequest(ap::UsersRequest {});
        let t = request.timeout_ms;
        call!(
            self,
            &request.vm_id,
            t,
            Redelivery::SameSession,
            req,
            UserList
        )
    }

    pub async fn set_guest_password(
        &self,
        request: pb::SetGuestPasswordRequest,
    ) -> Result<pb::Empty, AgentError> {
        let req = Payload::SetPasswordRequest(ap::SetPasswordRequest {
            user: request.user,
            password: request.password,
            crypted: request.crypted,
        });
        call!(self, &request.vm_id, 0, Redelivery::SameSession, req, Done)?;
        Ok(pb::Empty {})
    }

    pub async fn list_ssh_keys(
        &self,
        request: pb::GuestUserRequest,
    ) -> Result<ap::SshKeys, AgentError> {
        let req = Payload::SshKeysListRequest(ap::SshKeysListRequest { user: request.user });
        call!(
            self,
            &request.vm_id,
            0,
            Redelivery::SameSession,
            req,
            SshKeys
        )
    }

    pub async fn add_ssh_keys(
        &self,
        request: pb::SshKeysChangeRequest,
    ) -> Result<ap::SshKeys, AgentError> {
        let req = Payload::SshKeysAddRequest(ap::SshKeysAddRequest {
            user: request.user,
            keys: request.keys,
            reset: request.reset,
        });
        call!(
            self,
            &request.vm_id,
            0,
            Redelivery::SameSession,
            req,
            SshKeys
        )
    }

    pub async fn remove_ssh_keys(
        &self,
        request: pb::SshKeysChangeRequest,
    ) -> Result<ap::SshKeys, AgentError> {
        let req = Payload::SshKeysRemoveRequest(ap::SshKeysRemoveRequest {
            user: request.user,
            keys: request.keys,
        });
        call!(
            self,
            &request.vm_id,
            0,
            Redelivery::SameSession,
            req,
            SshKeys
        )
    }

    pub async fn get_guest_network(
        &self,
        request: pb::AgentRequest,
    ) -> Result<ap::NetworkInfo, AgentError> {
        let req = Payload::NetworkRequest(ap::NetworkRequest {});
        let t = request.timeout_ms;
        call!(
            self,
            &request.vm_id,
            t,
            Redelivery::SameSession,
            req,
            NetworkInfo
        )
    }

    pub async fn get_guest_disks(
        &self,
        request: pb::AgentRequest,
    ) -> Result<ap::DisksInfo, AgentError> {
        let req = Payload::DisksRequest(ap::DisksRequest {});
        let t = request.timeout_ms;
        call!(
            self,
            &request.vm_id,
            t,
            Redelivery::SameSession,
            req,
            DisksInfo
        )
    }

    pub async fn get_guest_logs(
        &self,
        request: pb::GuestLogsRequest,
    ) -> Result<ap::AgentLogs, AgentError> {
        let req = Payload::LogsRequest(ap::LogsRequest {
            max_lines: request.max_lines,
        });
        call!(
            self,
            &request.vm_id,
            0,
            Redelivery::SameSession,
            req,
            AgentLogs
        )
    }

    /// The latest pushed report (if any) first, then each newer one. A subscriber that reads
    /// slowly skips to the newest report: nothing queues up for it beyond one message.
    pub async fn stream_telemetry(
        &self,
        request: pb::AgentRequest,
    ) -> Result<BoxStream<pb::TelemetryUpdate, AgentError>, AgentError> {
        let link = self.mgr.link(&request.vm_id)?;
        let mut live = link.subscribe_telemetry();
        let vm_id = request.vm_id.clone();
        // One message queued: a subscriber that reads slowly skips to the newest report.
        let (tx, rx) = mpsc::channel::<Result<pb::TelemetryUpdate, AgentError>>(1);
        tokio::spawn(async move {
            loop {
                let latest = live.borrow_and_update().clone();
                if let Some(r) = latest {
                    let u = pb::TelemetryUpdate {
                        vm_id: vm_id.clone(),
                        telemetry: Some(ap::Telemetry::clone(&r.telemetry)),
                        received_unix_ms: r.received_unix_ms,
                    };
                    if tx.send(Ok(u)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = live.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

impl From<AgentEventKind> for pb::EventKind {
    fn from(kind: AgentEventKind) -> pb::EventKind {
        match kind {
            AgentEventKind::Connected => pb::EventKind::AgentConnected,
            AgentEventKind::Disconnected => pb::EventKind::AgentDisconnected,
            AgentEventKind::Restarted => pb::EventKind::AgentRestarted,
        }
    }
}

impl PartialEq<pb::EventKind> for AgentEventKind {
    fn eq(&self, other: &pb::EventKind) -> bool {
        pb::EventKind::from(*self) == *other
    }
}

/// A link's counters as the gRPC message.
fn stats_pb(s: &LinkSnapshot) -> pb::AgentConnectionStats {
    let counts = |m: &std::collections::BTreeMap<&'static str, (u64, u64)>| {
        m.iter()
            .map(|(k, (frames, bytes))| pb::FrameCount {
                kind: (*k).to_string(),
                frames: *frames,
                bytes: *bytes,
            })
            .collect()
    };
    let c = &s.counters;
    let n = s.commands;
    pb::AgentConnectionStats {
        vm_id: s.vm_id.clone(),
        socket_path: s.socket_path.clone(),
        connection_id: s.connection_id,
        state: s.state.to_string(),
        connected: s.connected,
        agent_session_id: s.agent_session_id,
        last_rx_unix_ms: c.last_rx_unix_ms,
        last_tx_unix_ms: c.last_tx_unix_ms,
        reconnects: c.reconnects,
        agent_restarts: c.agent_restarts,
        rx: counts(&c.rx),
        tx: counts(&c.tx),
        commands: Some(pb::CommandStageCounts {
            queued: n.queued,
            written: n.written,
            acknowledged: n.acknowledged,
            completed: n.completed,
            failed_not_written: n.failed_not_written,
            failed_not_acknowledged: n.failed_not_acknowledged,
            failed_ack_timeout: n.failed_ack_timeout,
            failed_connection_lost: n.failed_connection_lost,
            failed_agent_error: n.failed_agent_error,
            redelivered: n.redelivered,
        }),
        garbage_bytes: c.garbage_bytes,
        bad_frames: c.bad_frames,
        protocol_errors: c.protocol_errors,
        in_flight: s.in_flight as u32,
        last_error: s.last_error.clone(),
    }
}

/// GuestAgentInfo from a link's cache; data older than the liveness window is `stale`.
fn info_of(link: &Link) -> pb::GuestAgentInfo {
    let cache = link.cache();
    let connected = link.is_connected();
    let stale = link
        .last_rx_elapsed()
        .is_none_or(|e| e >= link.liveness_window());
    let last_seen = link
        .last_rx_elapsed()
        .map(|e| now_unix_ms() - e.as_millis() as i64)
        .unwrap_or(0);
    let mut info = pb::GuestAgentInfo {
        connected,
        last_seen_unix_ms: last_seen,
        session_id: link.session().unwrap_or(0),
        stale: stale && cache.ready.is_some(),
        telemetry_unix_ms: unix_ms(cache.telemetry_at),
        ..Default::default()
    };
    if let Some(r) = &cache.ready {
        info.version = r.agent_version.clone();
        info.os_name = r.os_name.clone();
        info.os_version = r.os_version.clone();
        info.os_pretty_name = r.os_pretty_name.clone();
        info.kernel_version = r.kernel_version.clone();
        info.kernel_release = r.kernel_release.clone();
        info.arch = r.arch.clone();
        info.hostname = r.hostname.clone();
        info.ip_addresses = r.ip_addresses.clone();
        info.capabilities = r.capabilities.clone();
    }
    if let Some(n) = &cache.network {
        info.interfaces = n.interfaces.clone();
    }
    if let Some(t) = &cache.telemetry {
        if !t.hostname.is_empty() {
            info.hostname = t.hostname.clone();
        }
        let mem = t.memory.unwrap_or_default();
        let (disk_total, disk_used) = t.filesystems.iter().fold((0u64, 0u64), |(a, b), f| {
            (
                a.saturating_add(f.total_bytes),
                b.saturating_add(f.used_bytes),
            )
        });
        info.resource_usage = Some(pb::GuestResourceUsage {
            cpu_usage_percent: t.cpu.map(|c| c.usage_percent).unwrap_or(0.0),
            memory_total_bytes: mem.total_bytes,
            memory_used_bytes: mem.total_bytes.saturating_sub(mem.available_bytes),
            disk_total_bytes: disk_total,
            disk_used_bytes: disk_used,
            uptime_s: t.uptime_s,
            load_one: t.load.map(|l| l.one).unwrap_or(0.0),
        });
    }
    info
}

/// Whether `link`'s agent keeps a CRC32C of the file bytes it reads and writes (capability
/// `file-crc32c`): transfers are then checked by it, and the agent hashes nothing.
fn agent_keeps_crc32c(link: &Link) -> bool {
    link.cache()
        .ready
        .is_some_and(|r| r.capabilities.iter().any(|c| c == "file-crc32c"))
}

/// Streams a file in windows of [`READ_WINDOW_BYTES`]: one FileReadRequest per window, each
/// window checked against the agent's CRC32C (its sha256, from an agent that keeps no CRC),
/// the whole stream's sha256, computed here, on the last message.
/// A window cut by a lost connection is asked for again from the last byte received (up to
/// [`READ_RESUMES`] times), so the caller sees one unbroken stream.
async fn read_windows(
    link: &Arc<Link>,
    request: &pb::ReadGuestFileRequest,
    file_size: u64,
    opts: CommandOptions,
    tx: &mpsc::Sender<Result<pb::GuestFileChunk, AgentError>>,
) -> Result<(), AgentError> {
    let end = if request.length == 0 {
        file_size
    } else {
        request.offset.saturating_add(request.length).min(file_size)
    };
    let mut offset = request.offset.min(end);
    let crc_check = agent_keeps_crc32c(link);
    let mut whole = Sha256::new();
    let mut first = true;
    let mut resumes = 0;
    while offset < end {
        let want = (end - offset).min(READ_WINDOW_BYTES);
        let mut cmd: Command = link.start(
            Payload::FileReadRequest(ap::FileReadRequest {
                path: request.path.clone(),
                offset,
                length: want,
                chunk_bytes: READ_CHUNK_BYTES,
                skip_sha256: crc_check,
            }),
            opts,
            READ_WINDOW_ITEMS,
        )?;
        let mut window = (!crc_check).then(Sha256::new);
        let mut window_crc = 0u32;
        let mut got = 0u64;
        let mut shrank = false;
        loop {
            let step = match cmd.next().await {
                Err(AgentError::ConnectionLost { .. }) if resumes < READ_RESUMES => {
                    resumes += 1;
                    break;
                }
                other => other?,
            };
            match step {
                Step::Item(Payload::FileChunk(c)) => {
                    // Sizes are the guest's word: more than was asked for is an error, so a
                    // read is bounded by the window and the file size whatever it sends.
                    let len = c.data.len() as u64;
                    if len > u64::from(READ_CHUNK_BYTES) || got.saturating_add(len) > want {
                        return Err(AgentError::Integrity {
                            vm_id: link.vm_id.clone(),
                            what: format!(
                                "a {len}-byte file chunk at offset {} goes past the {want}-byte window at {offset} (chunks of at most {READ_CHUNK_BYTES} bytes were asked for)",
                                c.offset
                            ),
                        });
                    }
                    if c.offset != offset + got {
                        return Err(AgentError::Integrity {
                            vm_id: link.vm_id.clone(),
                            what: format!(
                                "file chunk at offset {} where {} was expected",
                                c.offset,
                                offset + got
                            ),
                        });
                    }
                    got += c.data.len() as u64;
                    match window.as_mut() {
                        Some(sha) => sha.update(&c.data),
                        None => window_crc = qx_proto::crc32c_append(window_crc, &c.data),
                    }
                    whole.update(&c.data);
                    let msg = pb::GuestFileChunk {
                        offset: c.offset,
                        data: c.data,
                        file_size: if first { file_size } else { 0 },
                        eof: false,
                        sha256: Vec::new(),
                    };
                    first = false;
                    if tx.send(Ok(msg)).await.is_err() {
                        return Ok(()); // the client went away; dropping cmd cancels
                    }
                }
                Step::Item(_) => {}
                Step::Done(Payload::FileReadDone(d)) => {
                    // A digest that was asked for and is missing is an error, not a pass.
                    let (matches, check) = match window.take() {
                        Some(sha) => (d.sha256 == sha.finalize().to_vec(), "sha256"),
                        None => (d.crc32c == window_crc, "crc32c"),
                    };
                    if d.bytes != got || !matches {
                        return Err(AgentError::Integrity {
                            vm_id: link.vm_id.clone(),
                            what: format!(
                                "file window at {offset}: the agent reports {} bytes and a {check} that do not match the {got} bytes received",
                                d.bytes
                            ),
                        });
                    }
                    shrank = got == 0;
                    break;
                }
                Step::Done(other) => return Err(unexpected(link, cmd.id(), cmd.kind, other)),
            }
        }
        offset += got;
        if shrank {
            break; // the file shrank under us
        }
    }
    let _ = tx
        .send(Ok(pb::GuestFileChunk {
            offset,
            data: Vec::new(),
            file_size: if first { file_size } else { 0 },
            eof: true,
            sha256: whole.finalize().to_vec(),
        }))
        .await;
    Ok(())
}
