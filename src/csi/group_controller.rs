//! GroupController service: group snapshots (CSI VolumeGroupSnapshot) of volumes in pools.

use super::convert;
use super::proto::{self as csi, group_controller_server::GroupController};
use crate::error::{Error, Result};
use crate::guard::InFlight;
use crate::ids::{self, ObjectId, VolumeId};
use crate::pool::{CreateGroupSnapshot, GroupSnapshotRecord, Pools, MAX_GROUP_MEMBERS};
use std::collections::BTreeSet;
use tonic::{Request, Response, Status};

/// The GroupController RPCs. Creating and deleting run as tasks of their own
/// (`guard::InFlight`), like the controller's changes: a client that gives up does not cut a
/// freeze, a cut or a commit short, and an identical retry meanwhile gets the running one's
/// result.
#[derive(Clone)]
pub(crate) struct GroupControllerService {
    pub pools: Pools,
    /// The changes in flight in this process (shared with the controller service).
    pub inflight: InFlight,
}

type RpcResult<T> = std::result::Result<Response<T>, Status>;

/// The CO's `snapshot_ids`, when it sent any, must be the group's members (as a set): the
/// spec's "snapshot list mismatch", INVALID_ARGUMENT.
fn check_members(group: &GroupSnapshotRecord, snapshot_ids: &[String]) -> Result<()> {
    if snapshot_ids.is_empty() {
        return Ok(());
    }
    let sent: BTreeSet<&String> = snapshot_ids.iter().collect();
    let have: BTreeSet<&String> = group.snapshot_ids.iter().collect();
    if sent != have {
        return Err(Error::invalid(format!(
            "snapshot_ids do not match the members of group snapshot {}: it holds {}",
            group.id,
            group.snapshot_ids.join(", ")
        )));
    }
    Ok(())
}

/// INVALID_ARGUMENT when `ids` (the request's field `what`) names more than a group holds.
fn check_member_count(what: &str, ids: &[String]) -> Result<()> {
    if ids.len() > MAX_GROUP_MEMBERS {
        return Err(Error::invalid(format!(
            "{} {what}; a group snapshot holds at most {MAX_GROUP_MEMBERS}",
            ids.len()
        )));
    }
    Ok(())
}

fn check_snapshot_ids(ids: &[String]) -> Result<()> {
    check_member_count("snapshot_ids", ids)?;
    ids.iter()
        .try_for_each(|id| ids::check_safe_id("snapshot_ids entry", id))
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _req: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> RpcResult<csi::GroupControllerGetCapabilitiesResponse> {
        use csi::group_controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(Cap::Rpc(Rpc {
                    r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> RpcResult<csi::CreateVolumeGroupSnapshotResponse> {
        let r = req.into_inner();
        ids::check_name("name", &r.name)?;
        if r.source_volume_ids.is_empty() {
            return Err(Error::invalid("source_volume_ids is required").into());
        }
        check_member_count("source_volume_ids", &r.source_volume_ids)?;
        let mut seen = BTreeSet::new();
        let mut volumes = Vec::with_capacity(r.source_volume_ids.len());
        for id in &r.source_volume_ids {
            let volume = VolumeId::parse("source_volume_ids entry", id)?
                .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist")))?;
            if !seen.insert(id) {
                return Err(
                    Error::invalid(format!("source_volume_ids names volume {id} twice")).into(),
                );
            }
            volumes.push(volume);
        }
        convert::check_map("parameters", &r.parameters)?;
        let object = format!("groupname:{}", r.name);
        let op = format!("create {:?} {:?}", r.source_volume_ids, r.parameters);
        let pools = self.pools.clone();
        let response = self.inflight.run(object, op, async move {
            // Holds the name's lock and every volume's lock.
            let group = pools
                .create_group_snapshot(CreateGroupSnapshot {
                    name: r.name,
                    source_volume_ids: volumes,
                    parameters: r.parameters,
                })
                .await
                .map_err(Status::from)?;
            Ok::<_, Status>(csi::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(convert::group_snapshot(&group)),
            })
        });
        Ok(Response::new(response.await??))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> RpcResult<csi::DeleteVolumeGroupSnapshotResponse> {
        let r = req.into_inner();
        ids::check_safe_id("group_snapshot_id", &r.group_snapshot_id)?;
        check_snapshot_ids(&r.snapshot_ids)?;
        if ObjectId::parse_group(&r.group_snapshot_id)?.is_none() {
            return Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}));
        }
        let object = format!("group:{}", r.group_snapshot_id);
        let op = format!("delete {:?}", r.snapshot_ids);
        let pools = self.pools.clone();
        let done = self.inflight.run(object, op, async move {
            let sent = r.snapshot_ids;
            pools
                .delete_group_snapshot(&r.group_snapshot_id, move |g| check_members(g, &sent))
                .await
                .map_err(Status::from)
        });
        done.await??;
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> RpcResult<csi::GetVolumeGroupSnapshotResponse> {
        let r = req.into_inner();
        ids::check_safe_id("group_snapshot_id", &r.group_snapshot_id)?;
        check_snapshot_ids(&r.snapshot_ids)?;
        let group = self
            .pools
            .group_snapshot(&r.group_snapshot_id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "group snapshot {} does not exist",
                    r.group_snapshot_id
                ))
            })?;
        check_members(&group.record, &r.snapshot_ids)?;
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(convert::group_snapshot(&group)),
        }))
    }
}
