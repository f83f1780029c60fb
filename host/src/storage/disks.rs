//! CreateVM disks that name a storage volume (`DiskSpec.pool` + `volume`): an existing volume is
//! attached by its path; a missing one with `size_gib` is created in the pool for the VM. The
//! pools' target paths are where disks given by path may also live. Blocking.

use super::xml::{self, PoolFacts, VolumeFacts};
use super::StorageError;
use crate::pb;
use std::path::PathBuf;
use virt::connect::Connect;
use virt::storage_vol::StorageVol;

/// `VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE`.
const ACTIVE: u32 = 2;

/// The target directories of the active pools whose volumes are files (dir, fs, netfs).
pub fn pool_roots(conn: &Connect) -> Vec<PathBuf> {
    conn.list_all_storage_pools(ACTIVE)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| PoolFacts::parse(&p.xml_desc(0).ok()?).ok())
        .filter(|f| matches!(f.kind.as_str(), "dir" | "fs" | "netfs") && !f.target_path.is_empty())
        .map(|f| PathBuf::from(f.target_path))
        .collect()
}

/// Volume paths: every one resolved, and those created for the VM.
pub type Resolved = (Vec<PathBuf>, Vec<PathBuf>);

/// Replaces each volume disk of `spec` by the volume's path. Returns the resolved paths and
/// those of the volumes created for this VM; on error, those already created are deleted.
pub fn resolve(
    conn: &Connect,
    uuid: &str,
    spec: &mut pb::VmSpec,
) -> Result<Resolved, StorageError> {
    let (mut resolved, mut created) = (Vec::new(), Vec::new());
    let result = resolve_each(conn, uuid, spec, &mut resolved, &mut created);
    if result.is_err() {
        delete_created(conn, &created);
        created.clear();
    }
    result.map(|()| (resolved, created))
}

fn resolve_each(
    conn: &Connect,
    uuid: &str,
    spec: &mut pb::VmSpec,
    resolved: &mut Vec<PathBuf>,
    created: &mut Vec<PathBuf>,
) -> Result<(), StorageError> {
    for (i, d) in spec.disks.iter_mut().enumerate() {
        if d.pool.is_empty() && d.volume.is_empty() {
            continue;
        }
        if d.pool.is_empty() || !d.path.is_empty() || d.cdrom {
            return Err(StorageError::Invalid(format!(
                "disk {i}: a volume needs its pool, and neither a path nor a CD-ROM"
            )));
        }
        xml::check_name("pool", &d.pool)?;
        let name = if d.volume.is_empty() {
            format!("{uuid}-disk{i}")
        } else {
            xml::check_name("volume", &d.volume)?;
            d.volume.clone()
        };
        let pool = conn.lookup_storage_pool_by_name(&d.pool).map_err(|_| {
            StorageError::NotFound(format!("disk {i}: no storage pool {:?}", d.pool))
        })?;
        let kind = PoolFacts::parse(
            &pool
                .xml_desc(0)
                .map_err(|e| StorageError::Failed(e.to_string()))?,
        )?
        .kind;
        if !matches!(kind.as_str(), "dir" | "fs" | "netfs") {
            return Err(StorageError::Unsupported(format!(
                "disk {i}: disks from {kind} pools are not supported yet (dir, fs and netfs are)"
            )));
        }
        let path = match pool.lookup_storage_vol_by_name(&name) {
            Ok(vol) => {
                let x = vol
                    .xml_desc(0)
                    .map_err(|e| StorageError::Failed(e.to_string()))?;
                d.format = VolumeFacts::parse(&x)?.format;
                let path = vol
                    .path()
                    .map_err(|e| StorageError::Failed(e.to_string()))?;
                // The overlays on it read it: a guest writing into it would change their data.
                if !d.readonly {
                    if let Some(other) = super::api::overlay_on(&pool, &path)? {
                        return Err(StorageError::WrongState(format!(
                            "disk {i}: volume {name:?} backs volume {other:?}: attach it \
                             readonly, or a thin clone of it"
                        )));
                    }
                }
                path
            }
            Err(_) if d.size_gib > 0 => {
                let format = xml::volume_format(&d.format)?;
                let bytes = d.size_gib.checked_mul(1 << 30).ok_or_else(|| {
                    StorageError::Invalid(format!("disk {i}: size_gib too large"))
                })?;
                let x = xml::volume_xml(&name, bytes, format, None)?;
                let vol = StorageVol::create_xml(&pool, &x, 0).map_err(|e| {
                    StorageError::Failed(format!("disk {i}: cannot create volume {name:?}: {e}"))
                })?;
                let path = vol
                    .path()
                    .map_err(|e| StorageError::Failed(e.to_string()))?;
                created.push(PathBuf::from(&path));
                d.format = format.to_string();
                path
            }
            Err(_) => {
                return Err(StorageError::NotFound(format!(
                    "disk {i}: no volume {name:?} in pool {:?} (give size_gib to create it)",
                    d.pool
                )))
            }
        };
        resolved.push(PathBuf::from(&path));
        d.path = path;
        d.size_gib = 0;
        d.pool.clear();
        d.volume.clear();
    }
    Ok(())
}

/// Deletes volumes by path through libvirt; returns those deleted. A volume that backs
/// another (a thin clone made from it, say a template's) is kept, with a warning: DeleteVolume
/// would refuse it too.
pub fn delete_created(conn: &Connect, paths: &[PathBuf]) -> Vec<String> {
    let mut deleted = Vec::new();
    for p in paths {
        let p = p.to_string_lossy();
        let pools = conn.list_all_storage_pools(ACTIVE).unwrap_or_default();
        if let Some(other) = pools
            .iter()
            .find_map(|pool| super::api::overlay_on(pool, &p).ok().flatten())
        {
            log::warn!("not deleting volume {p}: volume {other:?} is on it");
            continue;
        }
        match conn
            .lookup_storage_vol_by_path(&p)
            .and_then(|v| v.delete(0))
        {
            Ok(()) => deleted.push(p.into_owned()),
            Err(e) => log::warn!("cannot delete volume {p}: {e}"),
        }
    }
    deleted
}
