//! CreateVM: volume disks resolved (and created) in their pools, images created with
//! qemu-img, the domain defined and optionally started; anything made is removed again on
//! failure.

use super::{VmApi, VmError, VmResult};
use crate::hypervisor::domain::{DomainSpec, SpecContext};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::pb;
use crate::storage;
use std::path::{Path, PathBuf};

impl VmApi {
    pub async fn create_vm(&self, request: pb::CreateVmRequest) -> VmResult<pb::VmStatus> {
        self.create_inner(request).await
    }

    /// CreateVM: volume disks are resolved (and missing ones created in their pools) first;
    /// if anything after fails, the volumes created for the VM are deleted again.
    async fn create_inner(&self, mut request: pb::CreateVmRequest) -> VmResult<pb::VmStatus> {
        let uuid = if request.vm_id.is_empty() {
            uuid::Uuid::new_v4()
        } else {
            uuid::Uuid::parse_str(&request.vm_id).map_err(|_| {
                VmError::InvalidArgument(format!("vm_id {:?} is not a UUID", request.vm_id))
            })?
        }
        .hyphenated()
        .to_string();
        let (spec, id) = (request.spec.take(), uuid.clone());
        let (spec, pool_roots, resolved, created) = self
            .run(move |hv| {
                let Some(conn) = hv.connection() else {
                    return Ok((spec, Vec::new(), Vec::new(), Vec::new()));
                };
                let mut spec = spec;
                let (resolved, created) = match spec.as_mut() {
                    Some(s) => storage::disks::resolve(&conn, &id, s)?,
                    None => Default::default(),
                };
                Ok((spec, storage::disks::pool_roots(&conn), resolved, created))
            })
            .await?;
        request.spec = spec;
        let result = self
            .create_defined(uuid, request, pool_roots, resolved, created.clone())
            .await;
        if result.is_err() && !created.is_empty() {
            let _ = self
                .run(move |hv| {
                    if let Some(conn) = hv.connection() {
                        storage::disks::delete_created(&conn, &created);
                    }
                    Ok(())
                })
                .await;
        }
        result
    }

    async fn create_defined(
        &self,
        uuid: String,
        request: pb::CreateVmRequest,
        pool_roots: Vec<PathBuf>,
        volume_paths: Vec<PathBuf>,
        volumes: Vec<PathBuf>,
    ) -> VmResult<pb::VmStatus> {
        let (mut disk_roots, media_roots) = self.allowed_roots();
        disk_roots.extend(pool_roots);
        let ctx = SpecContext {
            domain_type: self.hv.domain_type(),
            socket_dir: &self.config.socket_dir,
            image_dir: &self.config.image_dir,
            disk_roots: &disk_roots,
            media_roots: &media_roots,
            volume_paths: &volume_paths,
        };
        let mut spec = DomainSpec::from_request(&uuid, &request, &ctx)?;
        spec.volumes_created = volumes;
        let xml = spec.to_xml()?;

        let _create = self.create_lock.lock().await;
        let define_spec = spec.clone();
        let created = self
            .run(move |hv| define_with_volumes(hv, &define_spec, &xml))
            .await?;
        self.refresh().await;
        if request.start {
            if let Err(e) = self.start_inner(&uuid).await {
                log::warn!("VM {uuid}: start after create failed, removing it: {e}");
                let id = uuid.clone();
                let _ = self
                    .run(move |hv| {
                        let _ = hv.destroy(&id);
                        hv.undefine(&id, false)?;
                        remove_files(&created);
                        Ok(())
                    })
                    .await;
                self.refresh().await;
                return Err(e);
            }
        }
        self.status(&uuid).await
    }
}

fn remove_files(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = std::fs::remove_file(p) {
            log::warn!("cannot remove {}: {e}", p.display());
        }
    }
}

/// Creates the spec's missing images with qemu-img and defines the domain; on any failure
/// removes what it created. Returns the created images. Blocking.
fn define_with_volumes(
    hv: &dyn Hypervisor,
    spec: &DomainSpec,
    xml: &str,
) -> VmResult<Vec<PathBuf>> {
    match hv.resolve(&spec.uuid) {
        Ok(_) => {
            return Err(VmError::AlreadyExists(format!(
                "a VM with id {} exists",
                spec.uuid
            )))
        }
        Err(HypervisorError::NoDomain(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match hv.resolve(&spec.name) {
        Ok(_) => {
            return Err(VmError::AlreadyExists(format!(
                "a VM named {:?} exists",
                spec.name
            )))
        }
        Err(HypervisorError::NoDomain(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let mut created = Vec::new();
    let result = (|| {
        for d in &spec.disks {
            if let (Some(path), Some(gib)) = (&d.path, d.create_gib) {
                create_image(path, &d.format, gib)?;
                created.push(path.clone());
            }
        }
        hv.define(xml)?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(created),
        Err(e) => {
            remove_files(&created);
            Err(e)
        }
    }
}

/// The program that creates disk images.
const QEMU_IMG: &str = "qemu-img";

fn create_image(path: &Path, format: &str, gib: u64) -> VmResult<()> {
    create_image_with(QEMU_IMG, path, format, gib)
}

pub(crate) fn create_image_with(
    qemu_img: &str,
    path: &Path,
    format: &str,
    gib: u64,
) -> VmResult<()> {
    if path.exists() {
        return Err(VmError::AlreadyExists(format!(
            "image {} already exists",
            path.display()
        )));
    }
    let out = std::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(format!("{gib}G"))
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VmError::MissingProgram {
                program: QEMU_IMG,
                package: "qemu-utils",
                purpose: "to create disk images",
            },
            _ => VmError::Internal(format!("cannot run {qemu_img}: {e}")),
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(VmError::Internal(format!(
            "qemu-img create {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
