//! Node facts and the VM lifecycle: start, force-stop, reboot, pause, resume (with the
//! guest clock synced through the agent), delete, status, list and console.

use super::{VmApi, VmError, VmResult};
use crate::hypervisor::domain::DomainFacts;
use crate::hypervisor::{Hypervisor, HypervisorError, PowerState};
use crate::pb;
use crate::storage;
use std::path::{Path, PathBuf};

impl VmApi {
    pub async fn health_check(
        &self,
        _request: pb::HealthCheckRequest,
    ) -> VmResult<pb::HealthCheckResponse> {
        let reachable = self.run(|hv| Ok(hv.is_alive())).await.unwrap_or(false);
        Ok(pb::HealthCheckResponse {
            healthy: reachable,
            version: env!("CARGO_PKG_VERSION").to_string(),
            hypervisor: self.hv.uri().to_string(),
            hypervisor_reachable: reachable,
            uptime_s: self.started.elapsed().as_secs(),
        })
    }

    pub async fn get_node_info(&self, _request: pb::GetNodeInfoRequest) -> VmResult<pb::NodeInfo> {
        let (host, domains) = self.run(|hv| Ok((hv.host_facts()?, hv.list()?))).await?;
        let running = domains.iter().filter(|d| d.state.is_active()).count();
        let agents = self.agent.connected_count();
        Ok(pb::NodeInfo {
            hostname: host.hostname,
            version: env!("CARGO_PKG_VERSION").to_string(),
            hypervisor_uri: self.hv.uri().to_string(),
            hypervisor_version: host.hypervisor_version,
            cpus: host.cpus,
            memory_bytes: host.memory_bytes,
            cpu_model: host.cpu_model,
            running_vms: u32::try_from(running).unwrap_or(u32::MAX),
            agents_connected: u32::try_from(agents).unwrap_or(u32::MAX),
        })
    }

    pub(super) async fn start_inner(&self, uuid: &str) -> VmResult<()> {
        self.require_state(uuid, &[PowerState::ShutOff, PowerState::Crashed], "start")
            .await?;
        let id = uuid.to_string();
        self.run(move |hv| Ok(hv.start(&id)?)).await?;
        self.refresh().await;
        Ok(())
    }

    pub async fn start_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        let uuid = self.resolve(&request.vm_id).await?;
        self.start_inner(&uuid).await?;
        self.status(&uuid).await
    }

    pub async fn force_stop_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        let allowed = [
            PowerState::Running,
            PowerState::Paused,
            PowerState::ShuttingDown,
            PowerState::PmSuspended,
        ];
        let uuid = self
            .transition(&request.vm_id, &allowed, "force-stop", |hv, id| {
                hv.destroy(id)
            })
            .await?;
        self.refresh().await;
        self.status(&uuid).await
    }

    pub async fn reboot_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        let uuid = self
            .transition(
                &request.vm_id,
                &[PowerState::Running],
                "reboot",
                |hv, id| hv.reboot(id),
            )
            .await?;
        self.hub
            .emit(&uuid, pb::EventKind::VmRebooted, "reboot requested");
        self.refresh().await;
        self.status(&uuid).await
    }

    pub async fn pause_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        let uuid = self
            .transition(&request.vm_id, &[PowerState::Running], "pause", |hv, id| {
                hv.suspend(id)
            })
            .await?;
        self.refresh().await;
        self.status(&uuid).await
    }

    pub async fn resume_vm(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        let uuid = self
            .transition(&request.vm_id, &[PowerState::Paused], "resume", |hv, id| {
                hv.resume(id)
            })
            .await?;
        self.refresh().await;
        // The guest clock stood still while paused: set it from the host. A failed sync
        // does not fail the resume; it is reported in state_reason.
        let reason = if self.agent_connected(&uuid) {
            match self.agent.sync_clock(&uuid, true, false).await {
                Ok(r) => format!(
                    "resumed; guest clock synced (offset {:.3} s)",
                    r.offset_seconds
                ),
                Err(e) => {
                    log::warn!("VM {uuid}: time sync after resume failed: {e}");
                    format!("resumed; guest clock NOT synced: {e}")
                }
            }
        } else {
            "resumed; no agent connected, guest clock not synced".to_string()
        };
        let mut status = self.status(&uuid).await?;
        status.state_reason = reason;
        Ok(status)
    }

    pub async fn delete_vm(&self, request: pb::DeleteVmRequest) -> VmResult<pb::DeleteVmResponse> {
        let uuid = self.resolve(&request.vm_id).await?;
        let state = self.power_state(&uuid).await?;
        if state.is_active() && !request.force {
            return Err(VmError::WrongState(format!(
                "VM {uuid} is {state}: stop it first or delete with force"
            )));
        }
        let id = uuid.clone();
        let delete_storage = request.delete_storage;
        let image_dir = self.config.image_dir.clone();
        let deleted = self
            .run(move |hv| {
                let facts = DomainFacts::parse(&hv.xml(&id, true)?)
                    .map_err(|e| VmError::Internal(format!("domain XML: {e}")))?;
                if hv.state(&id)?.is_active() {
                    hv.destroy(&id)?;
                }
                hv.undefine(&id, facts.has_nvram)?;
                let deleted = if delete_storage {
                    delete_owned_volumes(hv, &facts, &image_dir)
                } else {
                    Vec::new()
                };
                Ok(deleted)
            })
            .await?;
        self.agent.detach(&uuid);
        self.notes.forget(&uuid);
        self.refresh().await;
        Ok(pb::DeleteVmResponse {
            deleted_volumes: deleted,
        })
    }

    pub async fn get_vm_status(&self, request: pb::VmIdRequest) -> VmResult<pb::VmStatus> {
        let uuid = self.resolve(&request.vm_id).await?;
        self.status(&uuid).await
    }

    pub async fn list_v_ms(&self, _request: pb::ListVmsRequest) -> VmResult<pb::ListVmsResponse> {
        let domains = self.run(|hv| Ok(hv.list()?)).await?;
        let mut vms = Vec::with_capacity(domains.len());
        for d in domains {
            match self.status(&d.uuid).await {
                Ok(s) => vms.push(s),
                // Undefined since the listing.
                Err(VmError::Hypervisor(HypervisorError::NoDomain(_))) => {}
                Err(e) => return Err(e),
            }
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pb::ListVmsResponse { vms })
    }

    pub async fn get_console(&self, request: pb::VmIdRequest) -> VmResult<pb::ConsoleInfo> {
        let uuid = self.resolve(&request.vm_id).await?;
        self.require_state(
            &uuid,
            &[PowerState::Running, PowerState::Paused],
            "open a console of",
        )
        .await?;
        let id = uuid.clone();
        let facts = self
            .run(move |hv| {
                DomainFacts::parse(&hv.xml(&id, false)?)
                    .map_err(|e| VmError::Internal(format!("domain XML: {e}")))
            })
            .await?;
        if let Some(g) = facts
            .graphics
            .iter()
            .find(|g| g.port.is_some_and(|p| p > 0))
        {
            return Ok(pb::ConsoleInfo {
                r#type: g.kind.clone(),
                host: if g.listen.is_empty() {
                    "127.0.0.1".to_string()
                } else {
                    g.listen.clone()
                },
                port: g.port.unwrap_or(0),
                path: String::new(),
            });
        }
        if let Some(pty) = facts.serial_pty {
            return Ok(pb::ConsoleInfo {
                r#type: "pty".to_string(),
                host: String::new(),
                port: 0,
                path: pty,
            });
        }
        Err(VmError::WrongState(format!("VM {uuid} has no console")))
    }
}

/// DeleteVM's storage half: the images qx-node created for this VM (recorded in its
/// metadata), still attached to it, still inside the image directory. Anything else (a shared
/// base image, a file attached by path, media) is never touched. Blocking.
fn delete_owned_volumes(hv: &dyn Hypervisor, facts: &DomainFacts, image_dir: &Path) -> Vec<String> {
    let mut deleted = Vec::new();
    let roots = [image_dir.to_path_buf()];
    for path in &facts.owned_volumes {
        let attached = facts
            .disks
            .iter()
            .any(|d| !d.cdrom && d.source.as_deref() == Some(path.as_str()));
        let inside = Path::new(path)
            .canonicalize()
            .is_ok_and(|real| crate::storage::policy::inside_any(&real, &roots));
        if !attached {
            log::warn!(
                "VM {}: not deleting {path}: no longer its own image",
                facts.uuid
            );
            continue;
        }
        if !inside {
            // A storage-pool volume created for the VM: deleted through libvirt.
            if let Some(conn) = hv.connection() {
                deleted.extend(storage::disks::delete_created(
                    &conn,
                    &[PathBuf::from(path)],
                ));
            }
            continue;
        }
        match std::fs::remove_file(path) {
            Ok(()) => deleted.push(path.clone()),
            Err(e) => log::warn!("cannot delete {path}: {e}"),
        }
    }
    deleted
}
