//! Snapshots: create (quiesced through the agent: freeze, snapshot, thaw on every path),
//! list, revert (which resets the VM's agent link) and delete, and the notes of which
//! snapshots were quiesced.

use super::{VmApi, VmError, VmResult, QUIESCE_TIMEOUT_S};
use crate::hypervisor::domain::{self, SnapshotFacts};
use crate::hypervisor::events;
use crate::hypervisor::{HypervisorError, PowerState};
use crate::pb;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

impl VmApi {
    pub async fn create_snapshot(
        &self,
        request: pb::CreateSnapshotRequest,
    ) -> VmResult<pb::Snapshot> {
        self.snapshot_inner(request).await
    }

    async fn snapshot_inner(&self, request: pb::CreateSnapshotRequest) -> VmResult<pb::Snapshot> {
        let uuid = self.resolve(&request.vm_id).await?;
        let name = if request.name.is_empty() {
            format!("snap-{}", events::now_unix_ms())
        } else {
            request.name.clone()
        };
        if !domain::valid_name(&name) {
            return Err(VmError::InvalidArgument(format!(
                "snapshot name {name:?} must be 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
        let (id, n) = (uuid.clone(), name.clone());
        let exists = self
            .run(move |hv| match hv.snapshot_get(&id, &n) {
                Ok(_) => Ok(true),
                Err(HypervisorError::NoSnapshot(_)) => Ok(false),
                Err(e) => Err(e.into()),
            })
            .await?;
        if exists {
            return Err(VmError::AlreadyExists(format!(
                "VM {uuid} already has a snapshot {name:?}"
            )));
        }
        // Internal qcow2 snapshots: of a shut-off VM they hold the disks; of a running VM
        // libvirt 9 always includes the memory state (QEMU's savevm), whatever
        // `include_memory` says. `has_memory` in the answer tells which was taken.
        if request.include_memory {
            self.require_state(
                &uuid,
                &[PowerState::Running, PowerState::Paused],
                "include the memory state in a snapshot",
            )
            .await?;
        }
        let xml = domain::snapshot_xml(&name, &request.description)
            .map_err(|e| VmError::Internal(e.to_string()))?;

        // Freeze through the agent. A requested quiesce that cannot happen fails the
        // snapshot: an unfrozen snapshot must never be reported as quiesced.
        let mut token = None;
        if request.quiesce {
            self.require_state(&uuid, &[PowerState::Running], "quiesce")
                .await?;
            match self
                .agent
                .freeze(&uuid, Vec::new(), QUIESCE_TIMEOUT_S, true)
                .await
            {
                Ok(reply) => {
                    log::info!("VM {uuid}: froze {:?} for snapshot {name}", reply.frozen);
                    token = Some(reply.token);
                }
                Err(e) => {
                    return Err(VmError::WrongState(format!(
                        "quiesce requested but the guest agent could not freeze filesystems: {e}"
                    )))
                }
            }
        }

        let id = uuid.clone();
        // The snapshot XML is ours; libvirt refusing it means the VM's configuration
        // forbids it (e.g. a raw disk cannot hold an internal snapshot).
        let created = self
            .run(move |hv| match hv.snapshot_create(&id, &xml) {
                Err(HypervisorError::Invalid(m)) => Err(VmError::WrongState(format!(
                    "the VM's configuration does not allow this snapshot: {m}"
                ))),
                other => Ok(other?),
            })
            .await;

        // Thaw on every path, whatever the snapshot did.
        if let Some(token) = token {
            if let Err(e) = self.agent.thaw(&uuid, token, true).await {
                log::error!(
                    "VM {uuid}: thaw after snapshot {name} failed (the agent auto-thaws within {QUIESCE_TIMEOUT_S} s): {e}"
                );
            }
        }
        let snap_name = created?;
        let quiesced = token.is_some();
        let notes = self.notes.clone();
        let (id, n) = (uuid.clone(), snap_name.clone());
        let record = self
            .run(move |hv| {
                notes.set(&id, &n, Some(quiesced));
                Ok(hv.snapshot_get(&id, &n)?)
            })
            .await?;
        self.hub.emit(
            &uuid,
            pb::EventKind::SnapshotCreated,
            format!("{snap_name}{}", if quiesced { " (quiesced)" } else { "" }),
        );
        snapshot_pb(&record.xml, record.current, quiesced)
    }

    pub async fn list_snapshots(
        &self,
        request: pb::VmIdRequest,
    ) -> VmResult<pb::ListSnapshotsResponse> {
        let uuid = self.resolve(&request.vm_id).await?;
        let notes = self.notes.clone();
        let (records, quiesced) = self
            .run(move |hv| Ok((hv.snapshot_list(&uuid)?, notes.load(&uuid))))
            .await?;
        let mut snapshots = records
            .iter()
            .map(|r| {
                let q = quiesced.get(&r.name).copied().unwrap_or(false);
                snapshot_pb(&r.xml, r.current, q)
            })
            .collect::<VmResult<Vec<_>>>()?;
        snapshots.sort_by(|a, b| (a.created_unix_s, &a.name).cmp(&(b.created_unix_s, &b.name)));
        Ok(pb::ListSnapshotsResponse { snapshots })
    }

    pub async fn revert_snapshot(&self, request: pb::SnapshotRequest) -> VmResult<pb::VmStatus> {
        let uuid = self.resolve(&request.vm_id).await?;
        if request.snapshot_id.is_empty() {
            return Err(VmError::InvalidArgument("snapshot_id is required".into()));
        }
        let (id, name, start) = (
            uuid.clone(),
            request.snapshot_id.clone(),
            request.start_after_revert,
        );
        let notes = self.notes.clone();
        let (socket, quiesced) = self
            .run(move |hv| {
                hv.snapshot_revert(&id, &name, start)?;
                let quiesced = notes.load(&id).get(&name).copied().unwrap_or(false);
                Ok(if hv.state(&id)?.is_active() {
                    (events::agent_socket(hv, &id), quiesced)
                } else {
                    (None, false)
                })
            })
            .await?;
        self.refresh().await;
        // The guest's memory went back in time: its agent link starts again from scratch.
        self.agent.reset_after_revert(&uuid, socket, quiesced);
        self.status(&uuid).await
    }

    pub async fn delete_snapshot(
        &self,
        request: pb::SnapshotRequest,
    ) -> VmResult<pb::DeleteSnapshotResponse> {
        let uuid = self.resolve(&request.vm_id).await?;
        if request.snapshot_id.is_empty() {
            return Err(VmError::InvalidArgument("snapshot_id is required".into()));
        }
        let (id, name, notes) = (
            uuid.clone(),
            request.snapshot_id.clone(),
            self.notes.clone(),
        );
        self.run(move |hv| {
            hv.snapshot_delete(&id, &name)?;
            notes.set(&id, &name, None);
            Ok(())
        })
        .await?;
        self.hub
            .emit(&uuid, pb::EventKind::SnapshotDeleted, request.snapshot_id);
        Ok(pb::DeleteSnapshotResponse {})
    }
}

fn snapshot_pb(xml: &str, current: bool, quiesced: bool) -> VmResult<pb::Snapshot> {
    let f =
        SnapshotFacts::parse(xml).map_err(|e| VmError::Internal(format!("snapshot XML: {e}")))?;
    Ok(pb::Snapshot {
        id: f.name.clone(),
        name: f.name,
        description: f.description,
        created_unix_s: f.created_unix_s,
        has_memory: matches!(f.state.as_str(), "running" | "paused" | "blocked"),
        state: f.state,
        quiesced,
        parent: f.parent,
        current,
    })
}

/// Which snapshots were taken with the guest's filesystems frozen. libvirt's snapshot XML
/// has no place for it, so it lives beside the images: `<image_dir>/<vm-id>.snapshots.json`.
#[derive(Debug)]
pub(super) struct QuiesceNotes {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl QuiesceNotes {
    pub(super) fn new(dir: PathBuf) -> QuiesceNotes {
        QuiesceNotes {
            dir,
            lock: Mutex::new(()),
        }
    }

    fn path(&self, uuid: &str) -> PathBuf {
        self.dir.join(format!("{uuid}.snapshots.json"))
    }

    fn load(&self, uuid: &str) -> BTreeMap<String, bool> {
        std::fs::read(self.path(uuid))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn set(&self, uuid: &str, name: &str, quiesced: Option<bool>) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut notes = self.load(uuid);
        match quiesced {
            Some(q) => notes.insert(name.to_string(), q),
            None => notes.remove(name),
        };
        let result = serde_json::to_vec(&notes)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(self.path(uuid), bytes));
        if let Err(e) = result {
            log::warn!("cannot record snapshot notes of VM {uuid}: {e}");
        }
    }

    pub(super) fn forget(&self, uuid: &str) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = std::fs::remove_file(self.path(uuid));
    }
}
