//! qxctl's storage commands, like virsh's `pool-*` and `vol-*` but through qx-node:
//! `qxctl pool list|info|create|delete|refresh` and
//! `qxctl volume list|info|create|resize|clone|delete|upload|download`.

use super::exit;
use super::vm_cmds::table;
use crate::pb;
use crate::pb::node_daemon_service_client::NodeDaemonServiceClient;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Client = NodeDaemonServiceClient<Channel>;

/// Bytes per UploadVolume data message.
const UPLOAD_CHUNK: usize = 256 * 1024;

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Every storage pool with its state and space.
    List,
    /// One pool.
    Info { pool: String },
    /// Define, (build,) start a pool.
    Create(PoolCreateArgs),
    /// Stop and undefine a pool (with --delete-data, delete its storage too).
    Delete {
        pool: String,
        #[arg(long)]
        delete_data: bool,
    },
    /// Rescan a pool's volumes.
    Refresh { pool: String },
}

#[derive(Debug, Args)]
pub struct PoolCreateArgs {
    pub pool: String,
    /// dir, fs, netfs, logical, rbd or iscsi.
    #[arg(long = "type", default_value = "dir")]
    pub kind: String,
    /// Directory (dir, fs, netfs).
    #[arg(long)]
    pub target: Option<String>,
    /// Server: HOST or HOST:PORT (netfs, rbd, iscsi).
    #[arg(long)]
    pub source_host: Option<String>,
    /// NFS export (netfs).
    #[arg(long)]
    pub source_path: Option<String>,
    /// Block device (fs), physical volume (logical) or target IQN (iscsi).
    #[arg(long)]
    pub source_device: Option<String>,
    /// Volume group (logical) or RADOS pool (rbd).
    #[arg(long)]
    pub source_name: Option<String>,
    /// cephx user (rbd).
    #[arg(long)]
    pub auth_user: Option<String>,
    /// UUID of the libvirt secret holding the cephx key (rbd).
    #[arg(long)]
    pub auth_secret: Option<String>,
    /// Build the pool first (mkdir, mkfs, vgcreate).
    #[arg(long)]
    pub build: bool,
    #[arg(long)]
    pub autostart: bool,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// The volumes of a pool.
    List {
        pool: String,
    },
    /// One volume.
    Info {
        pool: String,
        volume: String,
    },
    /// Create a volume; with --backing, a thin qcow2 clone of another volume.
    Create {
        pool: String,
        volume: String,
        /// Size: bytes, or with K, M, G, T (powers of 1024); optional with --backing.
        #[arg(long)]
        size: Option<String>,
        /// qcow2 (default) or raw.
        #[arg(long, default_value = "qcow2")]
        format: String,
        #[arg(long)]
        backing: Option<String>,
    },
    /// Grow a volume (shrinking needs --allow-shrink).
    Resize {
        pool: String,
        volume: String,
        size: String,
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Snapshot a volume: an external qcow2 overlay.
    ///
    /// The volume's data as of now is kept, unchanged from then on, as the new volume
    /// SNAPSHOT, and VOLUME becomes, at the same path, a qcow2 overlay on it that takes the
    /// writes: a stopped VM with VOLUME as a disk boots on the overlay. Nothing is copied. To go
    /// back to the snapshot, delete VOLUME and create it again with --backing SNAPSHOT; the
    /// snapshot cannot be deleted while a volume is on it. Refused while VOLUME is a disk of a
    /// running VM (snapshot the VM instead), a raw disk of any VM, or the backing volume of
    /// another volume. Volumes of dir, fs and netfs pools.
    Snapshot {
        /// The storage pool.
        pool: String,
        /// The volume to snapshot; it stays the writable volume, now on top of SNAPSHOT.
        volume: String,
        /// The name of the new volume that keeps VOLUME's data as of now.
        snapshot: String,
    },
    /// Full copy of a volume in its pool, with progress.
    Clone {
        pool: String,
        volume: String,
        new_volume: String,
    },
    Delete {
        pool: String,
        volume: String,
    },
    /// Write a local file into a volume from --offset (resume), verified by sha256.
    Upload {
        pool: String,
        volume: String,
        file: PathBuf,
        /// Start at this byte of both the file and the volume.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Read a volume into a local file from --offset (resume: --offset of the file's length).
    Download {
        pool: String,
        volume: String,
        file: PathBuf,
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `10G`, `512M`, `4096`: bytes (suffixes are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("size {s:?}: unknown unit {c:?} (K, M, G, T)"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .with_context(|| format!("size {s:?} is not a number of bytes"))
}

fn pool_type(s: &str) -> Result<pb::StoragePoolType> {
    Ok(match s {
        "dir" => pb::StoragePoolType::Dir,
        "fs" => pb::StoragePoolType::Fs,
        "netfs" => pb::StoragePoolType::Netfs,
        "logical" => pb::StoragePoolType::Logical,
        "rbd" => pb::StoragePoolType::Rbd,
        "iscsi" => pb::StoragePoolType::Iscsi,
        _ => bail!("--type {s:?}: dir, fs, netfs, logical, rbd or iscsi"),
    })
}

fn type_label(t: i32) -> &'static str {
    match pb::StoragePoolType::try_from(t) {
        Ok(pb::StoragePoolType::Dir) => "dir",
        Ok(pb::StoragePoolType::Fs) => "fs",
        Ok(pb::StoragePoolType::Netfs) => "netfs",
        Ok(pb::StoragePoolType::Logical) => "logical",
        Ok(pb::StoragePoolType::Rbd) => "rbd",
        Ok(pb::StoragePoolType::Iscsi) => "iscsi",
        _ => "?",
    }
}

fn state_label(s: i32) -> &'static str {
    match pb::StoragePoolState::try_from(s) {
        Ok(pb::StoragePoolState::Inactive) => "inactive",
        Ok(pb::StoragePoolState::Building) => "building",
        Ok(pb::StoragePoolState::Running) => "running",
        Ok(pb::StoragePoolState::Degraded) => "degraded",
        Ok(pb::StoragePoolState::Inaccessible) => "inaccessible",
        _ => "?",
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn pool_text(p: &pb::StoragePoolInfoResponse) -> String {
    format!(
        "Name:       {}\nUUID:       {}\nType:       {}\nState:      {}\nAutostart:  {}\nTarget:     {}\nCapacity:   {}\nAllocation: {}\nAvailable:  {}\nVolumes:    {}",
        p.pool_id,
        p.uuid,
        type_label(p.r#type),
        state_label(p.state),
        if p.autostart { "yes" } else { "no" },
        p.target_path,
        gib(p.capacity_bytes),
        gib(p.allocation_bytes),
        gib(p.available_bytes),
        p.volume_count
    )
}

fn volume_text(v: &pb::VolumeInfo) -> String {
    let mut s = format!(
        "Name:       {}\nPool:       {}\nPath:       {}\nKey:        {}\nFormat:     {}\nCapacity:   {}\nAllocation: {}",
        v.volume_id,
        v.pool_id,
        v.path,
        v.key,
        v.format,
        gib(v.capacity_bytes),
        gib(v.allocation_bytes)
    );
    if !v.backing_path.is_empty() {
        s.push_str(&format!("\nBacking:    {}", v.backing_path));
    }
    s
}

fn show<T: Serialize>(json: bool, v: &T, text: impl FnOnce(&T) -> String) -> Result<i32> {
    if json {
        print_json(v)?;
    } else {
        println!("{}", text(v));
    }
    Ok(exit::OK)
}

pub async fn run_pool(cmd: PoolCommand, client: &mut Client, json: bool) -> Result<i32> {
    let req = |pool: String| pb::StoragePoolRequest { pool_id: pool };
    match cmd {
        PoolCommand::List => {
            let r = client
                .list_storage_pools(pb::ListStoragePoolsRequest {})
                .await?
                .into_inner();
            show(json, &r, |r| {
                let rows: Vec<Vec<String>> = r
                    .pools
                    .iter()
                    .map(|p| {
                        vec![
                            p.pool_id.clone(),
                            type_label(p.r#type).into(),
                            state_label(p.state).into(),
                            gib(p.capacity_bytes),
                            gib(p.available_bytes),
                            p.target_path.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["Name", "Type", "State", "Capacity", "Available", "Target"],
                    &rows,
                )
            })
        }
        PoolCommand::Info { pool } => {
            let p = client.get_storage_pool(req(pool)).await?.into_inner();
            show(json, &p, pool_text)
        }
        PoolCommand::Refresh { pool } => {
            let p = client.refresh_storage_pool(req(pool)).await?.into_inner();
            show(json, &p, |p| format!("Pool {} refreshed", p.pool_id))
        }
        PoolCommand::Delete { pool, delete_data } => {
            client
                .delete_storage_pool(pb::DeleteStoragePoolRequest {
                    pool_id: pool.clone(),
                    delete_data,
                })
                .await?;
            show(json, &pool, |p| format!("Pool {p} deleted"))
        }
        PoolCommand::Create(a) => {
            let r = pb::InitStoragePoolRequest {
                pool_id: a.pool,
                r#type: pool_type(&a.kind)? as i32,
                target_path: a.target.unwrap_or_default(),
                source_host: a.source_host.unwrap_or_default(),
                source_path: a.source_path.unwrap_or_default(),
                source_device: a.source_device.unwrap_or_default(),
                source_name: a.source_name.unwrap_or_default(),
                auth_username: a.auth_user.unwrap_or_default(),
                auth_secret_uuid: a.auth_secret.unwrap_or_default(),
                build: a.build,
                autostart: a.autostart,
            };
            let p = client.init_storage_pool(r).await?.into_inner();
            show(json, &p, |p| {
                format!("Pool {} created and started", p.pool_id)
            })
        }
    }
}

#[derive(Debug, Serialize)]
struct Transfer {
    bytes: u64,
    sha256: String,
    verified: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub async fn run_volume(cmd: VolumeCommand, client: &mut Client, json: bool) -> Result<i32> {
    let vreq = |pool: String, volume: String| pb::VolumeRequest {
        pool_id: pool,
        volume_id: volume,
    };
    match cmd {
        VolumeCommand::List { pool } => {
            let r = client
                .list_volumes(pb::StoragePoolRequest { pool_id: pool })
                .await?
                .into_inner();
            show(json, &r, |r| {
                let rows: Vec<Vec<String>> = r
                    .volumes
                    .iter()
                    .map(|v| {
                        vec![
                            v.volume_id.clone(),
                            v.format.clone(),
                            gib(v.capacity_bytes),
                            v.path.clone(),
                        ]
                    })
                    .collect();
                table(&["Name", "Format", "Capacity", "Path"], &rows)
            })
        }
        VolumeCommand::Info { pool, volume } => {
            let v = client.get_volume(vreq(pool, volume)).await?.into_inner();
            show(json, &v, volume_text)
        }
        VolumeCommand::Create {
            pool,
            volume,
            size,
            format,
            backing,
        } => {
            let size_bytes = size.as_deref().map(parse_size).transpose()?.unwrap_or(0);
            let v = client
                .create_volume(pb::CreateVolumeRequest {
                    pool_id: pool,
                    volume_id: volume,
                    size_bytes,
                    format,
                    backing_volume: backing.unwrap_or_default(),
                })
                .await?
                .into_inner();
            show(json, &v, |v| {
                format!("Volume {} created: {}", v.volume_id, v.path)
            })
        }
        VolumeCommand::Resize {
            pool,
            volume,
            size,
            allow_shrink,
        } => {
            let v = client
                .resize_volume(pb::ResizeVolumeRequest {
                    pool_id: pool,
                    volume_id: volume,
                    size_bytes: parse_size(&size)?,
                    allow_shrink,
                })
                .await?
                .into_inner();
            show(json, &v, |v| {
                format!(
                    "Volume {} resized to {}",
                    v.volume_id,
                    gib(v.capacity_bytes)
                )
            })
        }
        VolumeCommand::Delete { pool, volume } => {
            client.delete_volume(vreq(pool, volume.clone())).await?;
            show(json, &volume, |v| format!("Volume {v} deleted"))
        }
        VolumeCommand::Snapshot {
            pool,
            volume,
            snapshot,
        } => {
            let r = client
                .snapshot_volume(pb::SnapshotVolumeRequest {
                    pool_id: pool,
                    volume_id: volume,
                    snapshot_id: snapshot,
                })
                .await?
                .into_inner();
            show(json, &r, |r| {
                let (v, s) = (r.volume.clone().unwrap_or_default(), r.snapshot.clone());
                let s = s.unwrap_or_default();
                format!(
                    "Snapshot {} of volume {} taken: {}\nVolume {} is now an overlay on it: {}",
                    s.volume_id, v.volume_id, s.path, v.volume_id, v.path
                )
            })
        }
        VolumeCommand::Clone {
            pool,
            volume,
            new_volume,
        } => {
            let mut s = client
                .clone_volume(pb::CloneVolumeRequest {
                    pool_id: pool,
                    volume_id: volume,
                    new_volume_id: new_volume,
                })
                .await?
                .into_inner();
            let mut progress: Option<indicatif::ProgressBar> = None;
            while let Some(p) = s.next().await {
                let p = p?;
                let b = progress.get_or_insert_with(|| {
                    super::agent_cmds::progress(p.total_bytes, "clone")
                        .unwrap_or_else(indicatif::ProgressBar::hidden)
                });
                b.set_position(p.done_bytes);
                if let (true, Some(v)) = (p.done, p.volume) {
                    b.finish_and_clear();
                    return show(json, &v, |v| {
                        format!("Volume {} cloned: {}", v.volume_id, v.path)
                    });
                }
            }
            bail!("the clone stream ended without the new volume")
        }
        VolumeCommand::Upload {
            pool,
            volume,
            file,
            offset,
        } => upload(client, pool, volume, file, offset, json).await,
        VolumeCommand::Download {
            pool,
            volume,
            file,
            offset,
        } => download(client, pool, volume, file, offset, json).await,
    }
}

async fn upload(
    client: &mut Client,
    pool: String,
    volume: String,
    file: PathBuf,
    offset: u64,
    json: bool,
) -> Result<i32> {
    let mut f =
        std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata()?.len();
    if offset > len {
        bail!(
            "--offset {offset} is past the end of {} ({len} bytes)",
            file.display()
        );
    }
    f.seek(SeekFrom::Start(offset))?;
    let size = len - offset;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let progress = super::agent_cmds::progress(size, "upload");
    let reader_bar = progress.clone();
    // The file is read on a blocking thread; the bounded channel paces it to the network.
    let reader = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let header = pb::UploadVolumeRequest {
            part: Some(pb::upload_volume_request::Part::Header(
                pb::UploadVolumeHeader {
                    pool_id: pool,
                    volume_id: volume,
                    offset,
                    size,
                },
            )),
        };
        if tx.blocking_send(header).is_err() {
            return Ok(Vec::new());
        }
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(hash.finalize().to_vec());
            }
            hash.update(&buf[..n]);
            let msg = pb::UploadVolumeRequest {
                part: Some(pb::upload_volume_request::Part::Data(buf[..n].to_vec())),
            };
            if tx.blocking_send(msg).is_err() {
                return Ok(Vec::new());
            }
            if let Some(b) = &reader_bar {
                b.inc(n as u64);
            }
        }
    });
    let done = client
        .upload_volume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let local = reader.await??;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    let done = done?.into_inner();
    let verified = done.sha256 == local && done.bytes == size;
    let t = Transfer {
        bytes: done.bytes,
        sha256: hex(&done.sha256),
        verified,
    };
    show(json, &t, |t| {
        format!(
            "uploaded {} bytes, sha256 {} ({})",
            t.bytes,
            t.sha256,
            if t.verified { "verified" } else { "MISMATCH" }
        )
    })?;
    Ok(if verified { exit::OK } else { exit::INTEGRITY })
}

async fn download(
    client: &mut Client,
    pool: String,
    volume: String,
    file: PathBuf,
    offset: u64,
    json: bool,
) -> Result<i32> {
    let mut s = client
        .download_volume(pb::DownloadVolumeRequest {
            pool_id: pool,
            volume_id: volume,
            offset,
            length: 0,
        })
        .await?
        .into_inner();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(offset == 0)
        .open(&file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    f.set_len(offset)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut hash = Sha256::new();
    let mut bytes = 0u64;
    let mut progress = None;
    while let Some(chunk) = s.next().await {
        let chunk = chunk?;
        if chunk.total_bytes > 0 && progress.is_none() {
            progress =
                super::agent_cmds::progress(chunk.total_bytes.saturating_sub(offset), "download");
        }
        f.write_all(&chunk.data)?;
        hash.update(&chunk.data);
        bytes += chunk.data.len() as u64;
        if let Some(b) = &progress {
            b.inc(chunk.data.len() as u64);
        }
        if chunk.eof {
            if let Some(b) = &progress {
                b.finish_and_clear();
            }
            f.sync_all()?;
            let local = hash.finalize().to_vec();
            let verified = local == chunk.sha256;
            let t = Transfer {
                bytes,
                sha256: hex(&local),
                verified,
            };
            show(json, &t, |t| {
                format!(
                    "downloaded {} bytes, sha256 {} ({})",
                    t.bytes,
                    t.sha256,
                    if t.verified { "verified" } else { "MISMATCH" }
                )
            })?;
            return Ok(if verified { exit::OK } else { exit::INTEGRITY });
        }
    }
    bail!(
        "the download ended after {bytes} bytes without its end; resume with --offset {}",
        offset + bytes
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
