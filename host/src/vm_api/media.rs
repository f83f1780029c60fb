//! CD-ROM media: ChangeMedia, and inserting or ejecting the agent ISO. The tray is forced
//! and the result read back from the domain XML.

use super::{VmApi, VmError, VmResult};
use crate::hypervisor::domain::{self, disk_element, DiskDef, DomainFacts, SpecError};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::pb;
use std::path::{Path, PathBuf};

impl VmApi {
    pub async fn change_media(
        &self,
        request: pb::ChangeMediaRequest,
    ) -> VmResult<pb::ChangeMediaResponse> {
        let uuid = self.resolve(&request.vm_id).await?;
        let iso = if request.iso_path.is_empty() {
            None
        } else {
            let (_, media) = self.allowed_roots();
            let iso = crate::storage::policy::resolve_inside("ISO", &request.iso_path, &media)
                .map_err(SpecError::from)?;
            Some(iso)
        };
        self.change_media_inner(&uuid, &request.device, iso).await
    }

    /// Inserts `iso` into (or, with `None`, ejects) a VM's CD-ROM, forcing the tray. On a
    /// running VM with a medium already in, the old medium is ejected first and the new one
    /// inserted after, so QEMU reopens the file even when the path is the same: the guest
    /// sees the newest file. The result is read back from the domain's XML.
    async fn change_media_inner(
        &self,
        uuid: &str,
        device: &str,
        iso: Option<PathBuf>,
    ) -> VmResult<pb::ChangeMediaResponse> {
        let (id, dev) = (uuid.to_string(), device.to_string());
        let (target, previous, inserted) = self
            .run(move |hv| change_media_blocking(hv, &id, &dev, iso.as_deref()))
            .await?;
        self.hub.emit(
            uuid,
            pb::EventKind::MediaChanged,
            format!(
                "{target}: {}",
                if inserted.is_empty() {
                    "ejected"
                } else {
                    &inserted
                }
            ),
        );
        Ok(pb::ChangeMediaResponse {
            device: target,
            inserted,
            previous,
        })
    }

    pub async fn mount_agent_iso(
        &self,
        request: pb::VmIdRequest,
    ) -> VmResult<pb::ChangeMediaResponse> {
        let uuid = self.resolve(&request.vm_id).await?;
        let iso = self.agent_iso()?;
        self.change_media_inner(&uuid, "", Some(iso)).await
    }

    pub async fn eject_agent_iso(
        &self,
        request: pb::VmIdRequest,
    ) -> VmResult<pb::ChangeMediaResponse> {
        let uuid = self.resolve(&request.vm_id).await?;
        let iso = self.agent_iso()?;
        let id = uuid.clone();
        let facts = self
            .run(move |hv| {
                let active = hv.state(&id)?.is_active();
                DomainFacts::parse(&hv.xml(&id, !active)?)
                    .map_err(|e| VmError::Internal(format!("domain XML: {e}")))
            })
            .await?;
        let iso_str = iso.to_string_lossy();
        let drive = facts
            .disks
            .iter()
            .find(|d| d.cdrom && d.source.as_deref() == Some(iso_str.as_ref()))
            .ok_or_else(|| {
                VmError::WrongState(format!("the agent ISO is not inserted in VM {uuid}"))
            })?;
        self.change_media_inner(&uuid, &drive.target, None).await
    }

    fn agent_iso(&self) -> VmResult<PathBuf> {
        let iso =
            self.config.agent_iso.clone().ok_or_else(|| {
                VmError::WrongState("no agent ISO is configured on this node".into())
            })?;
        if !iso.is_file() {
            return Err(VmError::WrongState(format!(
                "the agent ISO {} does not exist",
                iso.display()
            )));
        }
        Ok(iso)
    }
}

/// The blocking half of ChangeMedia: returns (target, previous, inserted).
fn change_media_blocking(
    hv: &dyn Hypervisor,
    uuid: &str,
    device: &str,
    iso: Option<&Path>,
) -> VmResult<(String, String, String)> {
    let active = hv.state(uuid)?.is_active();
    let facts = DomainFacts::parse(&hv.xml(uuid, !active)?)
        .map_err(|e| VmError::Internal(format!("domain XML: {e}")))?;
    let drive = match facts.cdrom(device) {
        Some(d) => d.clone(),
        None if !device.is_empty() && facts.disks.iter().any(|d| d.target == device) => {
            return Err(VmError::InvalidArgument(format!(
                "device {device} of VM {uuid} is not a CD-ROM"
            )))
        }
        None if !device.is_empty() => {
            return Err(VmError::NotFound(format!(
                "VM {uuid} has no device {device}"
            )))
        }
        None => {
            return Err(VmError::WrongState(format!(
                "VM {uuid} has no CD-ROM drive"
            )));
        }
    };
    let previous = drive.source.clone().unwrap_or_default();
    let def = |path: Option<&Path>| DiskDef {
        target: drive.target.clone(),
        bus: drive.bus.clone(),
        path: path.map(Path::to_path_buf),
        format: "raw".to_string(),
        readonly: true,
        cdrom: true,
        create_gib: None,
    };
    let xml_of = |path: Option<&Path>| {
        disk_element(&def(path))
            .to_xml()
            .map_err(|e| VmError::Internal(e.to_string()))
    };
    if active {
        if drive.source.is_some() {
            hv.update_device(uuid, &xml_of(None)?, true)?;
        }
        if iso.is_some() {
            hv.update_device(uuid, &xml_of(iso)?, true)?;
        }
    } else {
        match hv.update_device(uuid, &xml_of(iso)?, false) {
            Ok(()) => {}
            // Drivers without device updates (libvirt's test driver): redefine the
            // persistent XML with the new medium. Only for a shut-off domain.
            Err(HypervisorError::Unsupported(_)) => {
                let xml = domain::replace_disk(
                    &hv.xml(uuid, true)?,
                    &drive.target,
                    disk_element(&def(iso)),
                )
                .map_err(|e| VmError::Internal(e.to_string()))?;
                hv.define(&xml)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let after = DomainFacts::parse(&hv.xml(uuid, !active)?)
        .map_err(|e| VmError::Internal(format!("domain XML: {e}")))?;
    let now = after
        .cdrom(&drive.target)
        .and_then(|d| d.source.clone())
        .unwrap_or_default();
    let wanted = iso
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if now != wanted {
        return Err(VmError::Internal(format!(
            "drive {} holds {now:?} after the change, not {wanted:?}",
            drive.target
        )));
    }
    Ok((drive.target, previous, now))
}
