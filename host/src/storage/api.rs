//! The storage RPCs: libvirt pools and volumes through the `virt` crate's `StoragePool`,
//! `StorageVol` and `Stream` (no external tools). Every libvirt call runs on a blocking
//! thread; the connection is the hypervisor's own, so VMs and pools see the same libvirt.

use super::xml::{self, PoolFacts, VolumeFacts};
use super::StorageError;
use crate::hypervisor::domain::DomainFacts;
use crate::hypervisor::Hypervisor;
use crate::pb;
use crate::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};
use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

/// The storage RPCs still answer in `tonic::Status` themselves.
type RpcStream<T> = BoxStream<T, Status>;

/// Bytes per DownloadVolume message.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// How often CloneVolume reports progress.
pub const PROGRESS_MS: u64 = 500;
/// `VIR_STORAGE_VOL_RESIZE_SHRINK`.
const RESIZE_SHRINK: u32 = 4;
/// `VIR_DOMAIN_BLOCK_RESIZE_BYTES`.
const BLOCK_RESIZE_BYTES: u32 = 1;
/// `VIR_STORAGE_VOL_GET_PHYSICAL`: `allocation` holds the bytes a download yields.
const GET_PHYSICAL: u32 = 1;

type SResult<T> = Result<T, StorageError>;

/// The storage RPCs.
#[derive(Debug)]
pub struct StorageApi {
    hv: Arc<dyn Hypervisor>,
}

fn classify(e: virt::error::Error) -> StorageError {
    use virt::error::ErrorNumber as N;
    let text = e.message().to_string();
    if matches!(
        e.domain(),
        virt::enumutil::Enum::Known(virt::error::ErrorDomain::Rpc)
    ) {
        return StorageError::Unavailable(text);
    }
    match e.code() {
        virt::enumutil::Enum::Known(code) => match code {
            N::NoStoragePool | N::NoStorageVolume => StorageError::NotFound(text),
            N::StorageVolExist | N::StoragePoolBuilt => StorageError::Exists(text),
            N::XmlError | N::XmlDetail | N::InvalidArg | N::ConfigUnsupported => {
                StorageError::Invalid(text)
            }
            N::OperationInvalid => StorageError::WrongState(text),
            N::NoSupport | N::OperationUnsupported => StorageError::Unsupported(text),
            _ => StorageError::Failed(text),
        },
        virt::enumutil::Enum::Unknown(_) => StorageError::Failed(text),
    }
}

fn state_of(s: u32) -> pb::StoragePoolState {
    match s {
        0 => pb::StoragePoolState::Inactive,
        1 => pb::StoragePoolState::Building,
        2 => pb::StoragePoolState::Running,
        3 => pb::StoragePoolState::Degraded,
        4 => pb::StoragePoolState::Inaccessible,
        _ => pb::StoragePoolState::Unspecified,
    }
}

fn pool_info(pool: &StoragePool) -> SResult<pb::StoragePoolInfoResponse> {
    let facts = PoolFacts::parse(&pool.xml_desc(0).map_err(classify)?)?;
    let info = pool.info().map_err(classify)?;
    let active = pool.is_active().map_err(classify)?;
    let volumes = if active {
        pool.num_of_volumes().map_err(classify)?
    } else {
        0
    };
    Ok(pb::StoragePoolInfoResponse {
        pool_id: pool.name().map_err(classify)?,
        uuid: pool.uuid_string().map_err(classify)?,
        r#type: xml::type_of(&facts.kind) as i32,
        state: state_of(info.state) as i32,
        capacity_bytes: info.capacity,
        allocation_bytes: info.allocation,
        available_bytes: info.available,
        target_path: facts.target_path,
        autostart: pool.autostart().unwrap_or(false),
        volume_count: volumes,
    })
}

fn volume_info(pool_id: &str, vol: &StorageVol) -> SResult<pb::VolumeInfo> {
    let facts = VolumeFacts::parse(&vol.xml_desc(0).map_err(classify)?)?;
    let info = vol.info().map_err(classify)?;
    Ok(pb::VolumeInfo {
        pool_id: pool_id.to_string(),
        volume_id: vol.name().map_err(classify)?,
        key: vol.key().map_err(classify)?,
        path: vol.path().map_err(classify)?,
        format: facts.format,
        capacity_bytes: info.capacity,
        allocation_bytes: info.allocation,
        backing_path: facts.backing_path,
    })
}

/// The domains (by name) whose disks use `path`.
fn users_of(conn: &Connect, path: &str) -> SResult<Vec<String>> {
    domains_with(conn, |d| d.source.as_deref() == Some(path))
}

/// The domains (by name) that have `path` as a writable disk.
fn writers_of(conn: &Connect, path: &str) -> SResult<Vec<String>> {
    domains_with(conn, |d| !d.readonly && d.source.as_deref() == Some(path))
}

fn domains_with(
    conn: &Connect,
    disk: impl Fn(&crate::hypervisor::domain::DiskFacts) -> bool,
) -> SResult<Vec<String>> {
    let mut users = Vec::new();
    for dom in conn.list_all_domains(0).map_err(classify)? {
        let Ok(x) = dom.xml_desc(0) else { continue };
        let Ok(facts) = DomainFacts::parse(&x) else {
            continue;
        };
        if facts.disks.iter().any(&disk) {
            users.push(facts.name);
        }
    }
    Ok(users)
}

/// A running domain with `path` as a disk, and that disk's target.
fn running_user_of(conn: &Connect, path: &str) -> SResult<Option<(virt::domain::Domain, String)>> {
    for dom in conn.list_all_domains(0).map_err(classify)? {
        if !dom.is_active().unwrap_or(false) {
            continue;
        }
        let Ok(x) = dom.xml_desc(0) else { continue };
        let Ok(facts) = DomainFacts::parse(&x) else {
            continue;
        };
        if let Some(d) = facts
            .disks
            .iter()
            .find(|d| d.source.as_deref() == Some(path))
        {
            let target = d.target.clone();
            return Ok(Some((dom, target)));
        }
    }
    Ok(None)
}

/// Refuses writes into `vol` from outside a guest (uploads) while a running VM has it as a
/// disk or another volume reads it as its backing store: either would see its data change
/// under it.
fn writable_under_nobody(
    conn: &Connect,
    pool_id: &str,
    volume_id: &str,
    vol: &StorageVol,
) -> SResult<()> {
    let path = vol.path().map_err(classify)?;
    if let Some((dom, _)) = running_user_of(conn, &path)? {
        return Err(StorageError::WrongState(format!(
            "volume {volume_id:?} is a disk of the running VM {}: stop it first",
            dom.name().unwrap_or_default()
        )));
    }
    if let Some(other) = overlay_on(&lookup_pool(conn, pool_id)?, &path)? {
        return Err(StorageError::WrongState(format!(
            "volume {volume_id:?} backs volume {other:?}: writing into it would change that \
             volume's data"
        )));
    }
    Ok(())
}

/// The name of a volume of `pool` whose backing store is `path` (a thin clone or a volume
/// snapshot's overlay on it), if there is one.
pub(super) fn overlay_on(pool: &StoragePool, path: &str) -> SResult<Option<String>> {
    for other in pool.list_all_volumes(0).map_err(classify)? {
        let Ok(x) = other.xml_desc(0) else { continue };
        if VolumeFacts::parse(&x).is_ok_and(|f| f.backing_path == path) {
            return Ok(Some(other.name().unwrap_or_default()));
        }
    }
    Ok(None)
}

fn ids(pool_id: &str, volume_id: &str) -> SResult<()> {
    xml::check_name("pool_id", pool_id)?;
    if !volume_id.is_empty() {
        xml::check_name("volume_id", volume_id)?;
    }
    Ok(())
}

impl StorageApi {
    pub fn new(hv: Arc<dyn Hypervisor>) -> StorageApi {
        StorageApi { hv }
    }

    /// Runs `f` with the libvirt connection on a blocking thread.
    async fn run<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> SResult<T> + Send + 'static,
    {
        let hv = self.hv.clone();
        tokio::task::spawn_blocking(move || {
            let conn = hv.connection().ok_or_else(|| {
                StorageError::Unavailable("no libvirt connection: storage is unavailable".into())
            })?;
            f(&conn)
        })
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
        .map_err(StorageError::into_status)
    }

    pub async fn init_storage_pool(
        &self,
        req: pb::InitStoragePoolRequest,
    ) -> Result<pb::StoragePoolInfoResponse, Status> {
        let x = xml::pool_xml(&req).map_err(StorageError::into_status)?;
        self.run(move |conn| {
            if conn.lookup_storage_pool_by_name(&req.pool_id).is_ok() {
                return Err(StorageError::Exists(format!(
                    "a storage pool named {:?} exists",
                    req.pool_id
                )));
            }
            let pool = conn.define_storage_pool_xml(&x, 0).map_err(|e| {
                // libvirt built without this pool type's driver says so only in its text.
                if e.message().contains("missing backend") {
                    StorageError::Unsupported(format!(
                        "this libvirt has no storage driver for this pool type: {}",
                        e.message()
                    ))
                } else {
                    classify(e)
                }
            })?;
            // A pool that cannot be built or started is not kept: the caller fixes the cause
            // (server unreachable, device missing, kernel support absent) and asks again.
            let started = (|| {
                if req.build {
                    pool.build(0).map_err(classify)?;
                }
                pool.create(0).map_err(classify)?;
                if req.autostart {
                    pool.set_autostart(true).map_err(classify)?;
                }
                Ok::<_, StorageError>(())
            })();
            if let Err(e) = started {
                let _ = pool.undefine();
                return Err(StorageError::StartFailed(format!(
                    "storage pool {:?} could not be started, so it was not kept: {e}",
                    req.pool_id
                )));
            }
            pool_info(&pool)
        })
        .await
    }

    pub async fn list_storage_pools(&self) -> Result<pb::ListStoragePoolsResponse, Status> {
        self.run(|conn| {
            let mut pools = conn
                .list_all_storage_pools(0)
                .map_err(classify)?
                .iter()
                .map(pool_info)
                .collect::<SResult<Vec<_>>>()?;
            pools.sort_by(|a, b| a.pool_id.cmp(&b.pool_id));
            Ok(pb::ListStoragePoolsResponse { pools })
        })
        .await
    }

    pub async fn get_storage_pool(
        &self,
        req: pb::StoragePoolRequest,
        refresh: bool,
    ) -> Result<pb::StoragePoolInfoResponse, Status> {
        ids(&req.pool_id, "").map_err(StorageError::into_status)?;
        self.run(move |conn| {
            let pool = lookup_pool(conn, &req.pool_id)?;
            if refresh {
                pool.refresh(0).map_err(classify)?;
            }
            pool_info(&pool)
        })
        .await
    }

    pub async fn delete_storage_pool(
        &self,
        req: pb::DeleteStoragePoolRequest,
    ) -> Result<pb::Empty, Status> {
        ids(&req.pool_id, "").map_err(StorageError::into_status)?;
        self.run(move |conn| {
            let pool = lookup_pool(conn, &req.pool_id)?;
            if pool.is_active().map_err(classify)? {
                let vols = pool.list_volumes().map_err(classify)?;
                if req.delete_data && !vols.is_empty() {
                    return Err(StorageError::WrongState(format!(
                        "storage pool {:?} holds {} volumes: delete them before its data",
                        req.pool_id,
                        vols.len()
                    )));
                }
                pool.destroy().map_err(classify)?;
            }
            if req.delete_data {
                pool.delete(0).map_err(classify)?;
            }
            pool.undefine().map_err(classify)?;
            Ok(pb::Empty {})
        })
        .await
    }

    pub async fn create_volume(
        &self,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::VolumeInfo, Status> {
        ids(&req.pool_id, &req.volume_id).map_err(StorageError::into_status)?;
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let format = xml::volume_format(&req.format).map_err(StorageError::into_status)?;
        if !req.backing_volume.is_empty() {
            xml::check_name("backing_volume", &req.backing_volume)
                .map_err(StorageError::into_status)?;
            if format != "qcow2" {
                return Err(Status::invalid_argument(
                    "a volume on a backing volume (thin clone) must be qcow2",
                ));
            }
        }
        self.run(move |conn| create_volume_blocking(conn, &req, format))
            .await
    }

    pub async fn list_volumes(
        &self,
        req: pb::StoragePoolRequest,
    ) -> Result<pb::ListVolumesResponse, Status> {
        ids(&req.pool_id, "").map_err(StorageError::into_status)?;
        self.run(move |conn| {
            let pool = lookup_pool(conn, &req.pool_id)?;
            let mut volumes = pool
                .list_all_volumes(0)
                .map_err(classify)?
                .iter()
                .map(|v| volume_info(&req.pool_id, v))
                .collect::<SResult<Vec<_>>>()?;
            volumes.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
            Ok(pb::ListVolumesResponse { volumes })
        })
        .await
    }

    pub async fn get_volume(&self, req: pb::VolumeRequest) -> Result<pb::VolumeInfo, Status> {
        ids(&req.pool_id, &req.volume_id).map_err(StorageError::into_status)?;
        self.run(move |conn| {
            let vol = lookup_volume(conn, &req.pool_id, &req.volume_id)?;
            volume_info(&req.pool_id, &vol)
        })
        .await
    }

    pub async fn resize_volume(
        &self,
        req: pb::ResizeVolumeRequest,
    ) -> Result<pb::VolumeInfo, Status> {
        ids(&req.pool_id, &req.volume_id).map_err(StorageError::into_status)?;
        if req.size_bytes == 0 {
            return Err(Status::invalid_argument("size_bytes must be more than 0"));
        }
        self.run(move |conn| {
            let vol = lookup_volume(conn, &req.pool_id, &req.volume_id)?;
            let now = vol.info().map_err(classify)?.capacity;
            let shrink = req.size_bytes < now;
            if shrink && !req.allow_shrink {
                return Err(StorageError::WrongState(format!(
                    "volume {:?} is {now} bytes: shrinking it to {} loses data; set allow_shrink",
                    req.volume_id, req.size_bytes
                )));
            }
            if shrink {
                let pool = lookup_pool(conn, &req.pool_id)?;
                if let Some(other) = overlay_on(&pool, &vol.path().map_err(classify)?)? {
                    return Err(StorageError::WrongState(format!(
                        "volume {:?} backs volume {other:?}: shrinking it would cut that \
                         volume's data too",
                        req.volume_id
                    )));
                }
            }
            if req.size_bytes != now {
                let path = vol.path().map_err(classify)?;
                match running_user_of(conn, &path)? {
                    // QEMU holds the image open: it resizes it, and the guest sees the new
                    // size at once.
                    Some((dom, target)) => dom
                        .block_resize(&target, req.size_bytes, BLOCK_RESIZE_BYTES)
                        .map_err(classify)?,
                    None => {
                        let flags = if shrink { RESIZE_SHRINK } else { 0 };
                        vol.resize(req.size_bytes, flags).map_err(classify)?;
                    }
                }
            }
            volume_info(&req.pool_id, &vol)
        })
        .await
    }

    pub async fn delete_volume(&self, req: pb::VolumeRequest) -> Result<pb::Empty, Status> {
        ids(&req.pool_id, &req.volume_id).map_err(StorageError::into_status)?;
        self.run(move |conn| {
            let pool = lookup_pool(conn, &req.pool_id)?;
            let vol = lookup_volume(conn, &req.pool_id, &req.volume_id)?;
            let path = vol.path().map_err(classify)?;
            let users = users_of(conn, &path)?;
            if !users.is_empty() {
                return Err(StorageError::WrongState(format!(
                    "volume {:?} is a disk of {}: detach or delete them first",
                    req.volume_id,
                    users.join(", ")
                )));
            }
            if let Some(other) = overlay_on(&pool, &path)? {
                return Err(StorageError::WrongState(format!(
                    "volume {:?} backs volume {other:?}: delete that first",
                    req.volume_id
                )));
            }
            vol.delete(0).map_err(classify)?;
            Ok(pb::Empty {})
        })
        .await
    }

    /// SnapshotVolume: an external overlay. The volume's file becomes the snapshot (linked
    /// under the snapshot's name, then unlinked under its own, so an existing file is never
    /// replaced), and a qcow2 overlay on it is created at the volume's path. Nothing is
    /// copied; the volume keeps its path, so a stopped VM that has it as a disk boots on the
    /// overlay.
    pub async fn snapshot_volume(
        &self,
        req: pb::SnapshotVolumeRequest,
    ) -> Result<pb::SnapshotVolumeResponse, Status> {
        ids(&req.pool_id, &req.volume_id).map_err(StorageError::into_status)?;
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        xml::check_name("snapshot_id", &req.snapshot_id).map_err(StorageError::into_status)?;
        self.run(move |conn| snapshot_volume_blocking(conn, &req))
            .await
    }

    pub async fn clone_volume(
        &self,
        req: pb::CloneVolumeRequest,
    ) -> Result<RpcStream<pb::VolumeProgress>, Status> {
        ids(&req.pool_id, &req.volume_id).map_err(StorageError::into_status)?;
        xml::check_name("new_volume_id", &req.new_volume_id).map_err(StorageError::into_status)?;
        let (r, total) = (req.clone(), 0u64);
        let total = self
            .run(move |conn| {
                let src = lookup_volume(conn, &r.pool_id, &r.volume_id)?;
                let pool = lookup_pool(conn, &r.pool_id)?;
                if pool.lookup_storage_vol_by_name(&r.new_volume_id).is_ok() {
                    return Err(StorageError::Exists(format!(
                        "volume {:?} exists in pool {:?}",
                        r.new_volume_id, r.pool_id
                    )));
                }
                Ok(src
                    .info_flags(GET_PHYSICAL)
                    .map(|i| i.allocation)
                    .unwrap_or(total))
            })
            .await?;
        let (tx, out) = mpsc::channel(16);
        let hv = self.hv.clone();
        tokio::spawn(async move {
            let r = req.clone();
            let hv2 = hv.clone();
            let mut copy = tokio::task::spawn_blocking(move || {
                let conn = hv2
                    .connection()
                    .ok_or_else(|| StorageError::Unavailable("no libvirt connection".into()))?;
                let src = lookup_volume(&conn, &r.pool_id, &r.volume_id)?;
                let pool = lookup_pool(&conn, &r.pool_id)?;
                let facts = VolumeFacts::parse(&src.xml_desc(0).map_err(classify)?)?;
                let cap = src.info().map_err(classify)?.capacity;
                let x = xml::volume_xml(&r.new_volume_id, cap, &facts.format, None)?;
                let new = StorageVol::create_xml_from(&pool, &x, &src, 0).map_err(classify)?;
                volume_info(&r.pool_id, &new)
            });
            let mut tick = tokio::time::interval(Duration::from_millis(PROGRESS_MS));
            loop {
                tokio::select! {
                    done = &mut copy => {
                        let msg = match done {
                            Ok(Ok(info)) => Ok(pb::VolumeProgress {
                                done_bytes: total,
                                total_bytes: total,
                                done: true,
                                volume: Some(info),
                            }),
                            Ok(Err(e)) => Err(e.into_status()),
                            Err(e) => Err(Status::internal(format!("clone task failed: {e}"))),
                        };
                        let _ = tx.send(msg).await;
                        return;
                    }
                    _ = tick.tick() => {
                        let (hv3, r) = (hv.clone(), req.clone());
                        let copied = tokio::task::spawn_blocking(move || {
                            let conn = hv3.connection()?;
                            let pool = conn.lookup_storage_pool_by_name(&r.pool_id).ok()?;
                            let vol = pool.lookup_storage_vol_by_name(&r.new_volume_id).ok()?;
                            vol.info_flags(GET_PHYSICAL).ok().map(|i| i.allocation)
                        })
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                        let p = pb::VolumeProgress {
                            done_bytes: copied.min(total),
                            total_bytes: total,
                            done: false,
                            volume: None,
                        };
                        if tx.send(Ok(p)).await.is_err() {
                            // The client left; the copy finishes on its own.
                            return;
                        }
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(out)))
    }

    pub async fn upload_volume(
        &self,
        mut input: Streaming<pb::UploadVolumeRequest>,
    ) -> Result<pb::VolumeTransferDone, Status> {
        let header = match input.next().await {
            Some(Ok(pb::UploadVolumeRequest {
                part: Some(pb::upload_volume_request::Part::Header(h)),
            })) => h,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be the header",
                ))
            }
        };
        ids(&header.pool_id, &header.volume_id).map_err(StorageError::into_status)?;
        if header.size == 0 || header.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id and size are required"));
        }
        // Chunks go to the blocking writer through a small bounded queue: a slow volume
        // slows the client down instead of filling memory.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
        let h = header.clone();
        let hv = self.hv.clone();
        let writer = tokio::task::spawn_blocking(move || -> SResult<pb::VolumeTransferDone> {
            let conn = hv
                .connection()
                .ok_or_else(|| StorageError::Unavailable("no libvirt connection".into()))?;
            let vol = lookup_volume(&conn, &h.pool_id, &h.volume_id)?;
            writable_under_nobody(&conn, &h.pool_id, &h.volume_id, &vol)?;
            let stream = virt::stream::Stream::new(&conn, 0).map_err(classify)?;
            vol.upload(&stream, h.offset, h.size, 0).map_err(classify)?;
            let mut hash = Sha256::new();
            let mut sent = 0u64;
            while let Ok(chunk) = rx.recv() {
                if sent + chunk.len() as u64 > h.size {
                    let _ = stream.abort();
                    return Err(StorageError::Invalid(format!(
                        "more than the announced {} bytes were sent",
                        h.size
                    )));
                }
                let mut at = 0;
                while at < chunk.len() {
                    match stream.send(&chunk[at..]) {
                        Ok(n) if n > 0 => at += n as usize,
                        Ok(_) => continue,
                        Err(e) => {
                            let _ = stream.abort();
                            return Err(classify(e));
                        }
                    }
                }
                hash.update(&chunk);
                sent += chunk.len() as u64;
            }
            if sent != h.size {
                let _ = stream.abort();
                return Err(StorageError::Aborted(format!(
                    "the upload ended after {sent} of {} bytes; resume with offset {}",
                    h.size,
                    h.offset + sent
                )));
            }
            stream.finish().map_err(classify)?;
            Ok(pb::VolumeTransferDone {
                bytes: sent,
                sha256: hash.finalize().to_vec(),
            })
        });
        let mut failed = None;
        while let Some(msg) = input.next().await {
            match msg {
                Ok(pb::UploadVolumeRequest {
                    part: Some(pb::upload_volume_request::Part::Data(d)),
                }) => {
                    let tx = tx.clone();
                    // The writer went away (an error): stop reading, report its error.
                    let queued = tokio::task::spawn_blocking(move || tx.send(d).is_ok())
                        .await
                        .unwrap_or(false);
                    if !queued {
                        break;
                    }
                }
                Ok(_) => {
                    failed = Some(Status::invalid_argument("only data may follow the header"));
                    break;
                }
                Err(s) => {
                    failed = Some(s);
                    break;
                }
            }
        }
        drop(tx);
        let result = writer
            .await
            .map_err(|e| Status::internal(format!("upload task failed: {e}")))?
            .map_err(StorageError::into_status);
        match failed {
            Some(s) if result.is_ok() => Err(s),
            _ => result,
        }
    }

    pub async fn download_volume(
        &self,
        req: pb::DownloadVolumeRequest,
    ) -> Result<RpcStream<pb::VolumeChunk>, Status> {
        ids(&req.pool_id, &req.volume_id).map_err(StorageError::into_status)?;
        let (tx, out) = mpsc::channel(8);
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let hv = self.hv.clone();
        tokio::task::spawn_blocking(move || {
            let opened = (|| {
                let conn = hv
                    .connection()
                    .ok_or_else(|| StorageError::Unavailable("no libvirt connection".into()))?;
                let vol = lookup_volume(&conn, &req.pool_id, &req.volume_id)?;
                let total = vol.info_flags(GET_PHYSICAL).map_err(classify)?.allocation;
                let stream = virt::stream::Stream::new(&conn, 0).map_err(classify)?;
                vol.download(&stream, req.offset, req.length, 0)
                    .map_err(classify)?;
                Ok::<_, StorageError>((stream, total))
            })();
            let (stream, total) = match opened {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into_status()));
                    return;
                }
            };
            let mut hash = Sha256::new();
            let mut offset = req.offset;
            let mut first = true;
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                match stream.recv(&mut buf) {
                    Ok(n) if n > 0 => {
                        let data = buf[..n as usize].to_vec();
                        hash.update(&data);
                        let chunk = pb::VolumeChunk {
                            offset,
                            total_bytes: if first { total } else { 0 },
                            data,
                            eof: false,
                            sha256: Vec::new(),
                        };
                        first = false;
                        offset += n as u64;
                        if tx.blocking_send(Ok(chunk)).is_err() {
                            let _ = stream.abort();
                            return;
                        }
                    }
                    Ok(_) => {
                        let end = stream.finish().map_err(classify);
                        let msg = end.map(|()| pb::VolumeChunk {
                            offset,
                            total_bytes: if first { total } else { 0 },
                            data: Vec::new(),
                            eof: true,
                            sha256: hash.finalize().to_vec(),
                        });
                        let _ = tx.blocking_send(msg.map_err(StorageError::into_status));
                        return;
                    }
                    Err(e) => {
                        let _ = stream.abort();
                        let _ = tx.blocking_send(Err(classify(e).into_status()));
                        return;
                    }
                }
            }
        });
        ready
            .await
            .map_err(|_| Status::internal("download task failed"))??;
        Ok(Box::pin(ReceiverStream::new(out)))
    }
}

fn lookup_pool(conn: &Connect, pool_id: &str) -> SResult<StoragePool> {
    conn.lookup_storage_pool_by_name(pool_id)
        .map_err(|e| match classify(e) {
            StorageError::NotFound(_) => {
                StorageError::NotFound(format!("no storage pool named {pool_id:?}"))
            }
            other => other,
        })
}

fn lookup_volume(conn: &Connect, pool_id: &str, volume_id: &str) -> SResult<StorageVol> {
    let pool = lookup_pool(conn, pool_id)?;
    pool.lookup_storage_vol_by_name(volume_id)
        .map_err(|e| match classify(e) {
            StorageError::NotFound(_) => StorageError::NotFound(format!(
                "no volume {volume_id:?} in storage pool {pool_id:?}"
            )),
            other => other,
        })
}

fn create_volume_blocking(
    conn: &Connect,
    req: &pb::CreateVolumeRequest,
    format: &str,
) -> SResult<pb::VolumeInfo> {
    let pool = lookup_pool(conn, &req.pool_id)?;
    if pool.lookup_storage_vol_by_name(&req.volume_id).is_ok() {
        return Err(StorageError::Exists(format!(
            "volume {:?} exists in pool {:?}",
            req.volume_id, req.pool_id
        )));
    }
    let backing = if req.backing_volume.is_empty() {
        None
    } else {
        let b = lookup_volume(conn, &req.pool_id, &req.backing_volume)?;
        let facts = VolumeFacts::parse(&b.xml_desc(0).map_err(classify)?)?;
        let cap = b.info().map_err(classify)?.capacity;
        let path = b.path().map_err(classify)?;
        // A VM that writes into it would change what the clone reads.
        let writers = writers_of(conn, &path)?;
        if !writers.is_empty() {
            return Err(StorageError::WrongState(format!(
                "volume {:?} is a writable disk of {}: a thin clone needs a volume nobody \
                 writes (clone a snapshot of it, or detach it)",
                req.backing_volume,
                writers.join(", ")
            )));
        }
        Some((path, facts.format, cap))
    };
    let size = match (&backing, req.size_bytes) {
        (Some((_, _, cap)), 0) => *cap,
        (Some((_, _, cap)), s) if s < *cap => {
            return Err(StorageError::Invalid(format!(
                "size_bytes {s} is smaller than the backing volume's {cap}"
            )))
        }
        (None, 0) => return Err(StorageError::Invalid("size_bytes is required".into())),
        (_, s) => s,
    };
    let x = xml::volume_xml(
        &req.volume_id,
        size,
        format,
        backing.as_ref().map(|(p, f, _)| (p.as_str(), f.as_str())),
    )?;
    let vol = StorageVol::create_xml(&pool, &x, 0).map_err(classify)?;
    volume_info(&req.pool_id, &vol)
}

fn snapshot_volume_blocking(
    conn: &Connect,
    req: &pb::SnapshotVolumeRequest,
) -> SResult<pb::SnapshotVolumeResponse> {
    let pool = lookup_pool(conn, &req.pool_id)?;
    let kind = PoolFacts::parse(&pool.xml_desc(0).map_err(classify)?)?.kind;
    if !matches!(kind.as_str(), "dir" | "fs" | "netfs") {
        return Err(StorageError::Unsupported(format!(
            "volume snapshots of {kind} pools are not supported (dir, fs and netfs are)"
        )));
    }
    let vol = lookup_volume(conn, &req.pool_id, &req.volume_id)?;
    if pool.lookup_storage_vol_by_name(&req.snapshot_id).is_ok() {
        return Err(StorageError::Exists(format!(
            "volume {:?} exists in pool {:?}",
            req.snapshot_id, req.pool_id
        )));
    }
    let path = vol.path().map_err(classify)?;
    let facts = VolumeFacts::parse(&vol.xml_desc(0).map_err(classify)?)?;
    let capacity = vol.info().map_err(classify)?.capacity;
    // QEMU keeps writing to the file it opened: a running VM's disk would go on changing
    // under the overlay. A raw disk would become qcow2 under a domain that reads it as raw.
    if let Some((dom, _)) = running_user_of(conn, &path)? {
        return Err(StorageError::WrongState(format!(
            "volume {:?} is a disk of the running VM {}: stop it, or snapshot the VM",
            req.volume_id,
            dom.name().unwrap_or_default()
        )));
    }
    let users = users_of(conn, &path)?;
    if facts.format != "qcow2" && !users.is_empty() {
        return Err(StorageError::WrongState(format!(
            "volume {:?} is a {} disk of {}: its snapshot would turn it into qcow2",
            req.volume_id,
            facts.format,
            users.join(", ")
        )));
    }
    // An overlay on this volume reads it by path: it would read the new overlay instead.
    if let Some(other) = overlay_on(&pool, &path)? {
        return Err(StorageError::WrongState(format!(
            "volume {:?} backs volume {other:?}: snapshot that one instead",
            req.volume_id
        )));
    }
    let file = std::path::Path::new(&path);
    let snap = file
        .parent()
        .map(|d| d.join(&req.snapshot_id))
        .ok_or_else(|| StorageError::Failed(format!("volume path {path:?} has no directory")))?;
    let snap_str = snap.to_string_lossy().into_owned();
    std::fs::hard_link(file, &snap).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            StorageError::Exists(format!("{snap_str} exists in the pool's directory"))
        }
        _ => StorageError::Failed(format!("cannot link {path} to {snap_str}: {e}")),
    })?;
    if let Err(e) = std::fs::remove_file(file) {
        let _ = std::fs::remove_file(&snap);
        return Err(StorageError::Failed(format!("cannot unlink {path}: {e}")));
    }
    let overlay = (|| {
        pool.refresh(0).map_err(classify)?;
        let x = xml::volume_xml(
            &req.volume_id,
            capacity,
            "qcow2",
            Some((&snap_str, &facts.format)),
        )?;
        StorageVol::create_xml(&pool, &x, 0).map_err(classify)
    })();
    let overlay = match overlay {
        Ok(v) => v,
        Err(e) => {
            // Put the volume back as it was; never over a file made under its name meanwhile.
            let restored =
                std::fs::hard_link(&snap, file).and_then(|()| std::fs::remove_file(&snap));
            let _ = pool.refresh(0);
            return Err(match restored {
                Ok(()) => e,
                Err(r) => StorageError::Failed(format!(
                    "{e}; and the volume's data could not be moved back from {snap_str}: {r}"
                )),
            });
        }
    };
    let snapshot = lookup_volume(conn, &req.pool_id, &req.snapshot_id)?;
    Ok(pb::SnapshotVolumeResponse {
        volume: Some(volume_info(&req.pool_id, &overlay)?),
        snapshot: Some(volume_info(&req.pool_id, &snapshot)?),
    })
}
