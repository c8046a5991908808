//! Controller calls by name and id, each one line, answering ids and sizes: what scenario tests
//! (crash recovery, storms, full file systems, hostile input) make many of.
//!
//! ```ignore
//! let src = create_volume(&p, "src", 16 * MIB, &[("pool", "small")]).await?;
//! let snap = snapshot(&p, "snap", &src).await?;
//! let restored = create_from(&p, "restored", from_snapshot(&snap)).await?;
//! assert_eq!(list_volumes(&p).await.get(&restored), Some(&(16 * MIB)));
//! ```

use crate::plugin::Plugin;
use crate::rpc::*;
use std::collections::{BTreeMap, BTreeSet};

/// CreateVolume of `name`, `size` bytes, with parameters → the volume id.
pub async fn create_volume(
    p: &Plugin,
    name: &str,
    size: i64,
    kv: &[(&str, &str)],
) -> Result<String, Status> {
    let req = crate::csi::CreateVolumeRequest {
        parameters: params(kv),
        ..create_req(name, size)
    };
    p.controller().create(req).await.map(|v| v.volume_id)
}

/// `n` concurrent calls of `call`, spread over the plugins' channels in turn (one name raced
/// by several controller processes); each answers an id or ABORTED (asserted). The ids
/// answered.
async fn race<F, Fut>(plugins: &[&Plugin], n: usize, call: F) -> BTreeSet<String>
where
    F: Fn(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<String, Status>> + Send + 'static,
{
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..n {
        calls.spawn(call(plugins[i % plugins.len()].channel.clone()));
    }
    let mut ids = BTreeSet::new();
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            Ok(id) => {
                ids.insert(id);
            }
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
    }
    ids
}

/// `n` concurrent CreateVolume calls of `req` ([`race`]): the volume ids answered.
pub async fn race_create(
    plugins: &[&Plugin],
    n: usize,
    req: crate::csi::CreateVolumeRequest,
) -> BTreeSet<String> {
    race(plugins, n, |ch| {
        let req = req.clone();
        async move {
            crate::csi::controller_client::ControllerClient::new(ch)
                .create_volume(req)
                .await
                .map(|r| r.into_inner().volume.unwrap().volume_id)
        }
    })
    .await
}

/// `n` concurrent CreateVolumeGroupSnapshot calls of `req` ([`race`]): the group snapshot ids
/// answered.
pub async fn race_group(
    plugins: &[&Plugin],
    n: usize,
    req: crate::csi::CreateVolumeGroupSnapshotRequest,
) -> BTreeSet<String> {
    race(plugins, n, |ch| {
        let req = req.clone();
        async move {
            crate::csi::group_controller_client::GroupControllerClient::new(ch)
                .create_volume_group_snapshot(req)
                .await
                .map(|r| r.into_inner().group_snapshot.unwrap().group_snapshot_id)
        }
    })
    .await
}

/// CreateVolume of `name` from a snapshot or volume (its size) → the volume id.
pub async fn create_from(p: &Plugin, name: &str, source: Source) -> Result<String, Status> {
    let req = create_from_req(name, 0, source);
    p.controller().create(req).await.map(|v| v.volume_id)
}

/// CreateSnapshot `name` of `source` → the snapshot id.
pub async fn snapshot(p: &Plugin, name: &str, source: &str) -> Result<String, Status> {
    let req = snapshot_req(name, source);
    p.controller().snapshot(req).await.map(|s| s.snapshot_id)
}

/// CreateVolumeGroupSnapshot `name` of `sources` → the group snapshot id.
pub async fn group_snapshot(p: &Plugin, name: &str, sources: &[&str]) -> Result<String, Status> {
    let req = group_snapshot_req(name, sources);
    let g = p.group_controller().create_group(req).await?;
    Ok(g.group_snapshot_id)
}

/// GetVolumeGroupSnapshot of `id` → its member snapshot ids, in the group's order.
pub async fn group_members(p: &Plugin, id: &str) -> Result<Vec<String>, Status> {
    let g = p.group_controller().group(id, &[]).await?;
    Ok(g.snapshots.into_iter().map(|s| s.snapshot_id).collect())
}

/// DeleteVolumeGroupSnapshot of `id`.
pub async fn delete_group(p: &Plugin, id: &str) -> Result<(), Status> {
    p.group_controller().delete_group(id, &[]).await
}

pub async fn delete_volume(p: &Plugin, id: &str) -> Result<(), Status> {
    p.controller().delete(id).await
}

pub async fn delete_snapshot(p: &Plugin, id: &str) -> Result<(), Status> {
    p.controller().remove_snapshot(id).await
}

/// ControllerExpandVolume to `size` bytes → the capacity answered.
pub async fn expand(p: &Plugin, id: &str, size: i64) -> Result<i64, Status> {
    let r = p.controller().expand(expand_req(id, size)).await?;
    Ok(r.capacity_bytes)
}

/// ListVolumes: volume id → capacity.
pub async fn list_volumes(p: &Plugin) -> BTreeMap<String, i64> {
    let entries = p.controller().all_volumes().await;
    entries
        .into_iter()
        .map(|e| e.volume.unwrap())
        .map(|v| (v.volume_id, v.capacity_bytes))
        .collect()
}

/// ListVolumes: volume id → the volume condition its entry reports.
pub async fn listed_conditions(p: &Plugin) -> BTreeMap<String, crate::csi::VolumeCondition> {
    let entries = p.controller().all_volumes().await;
    entries
        .into_iter()
        .map(|e| {
            let id = e.volume.unwrap().volume_id;
            let status = e.status.expect("ListVolumes reports a status");
            (id, status.volume_condition.expect("and a volume condition"))
        })
        .collect()
}

/// ControllerGetVolume of `id`, which must answer: the volume condition it reports.
pub async fn volume_condition(p: &Plugin, id: &str) -> crate::csi::VolumeCondition {
    let r = p
        .controller()
        .volume(id)
        .await
        .expect("ControllerGetVolume");
    let status = r.status.expect("ControllerGetVolume reports a status");
    status.volume_condition.expect("and a volume condition")
}

/// ListSnapshots: every snapshot id.
pub async fn list_snapshots(p: &Plugin) -> BTreeSet<String> {
    let req = crate::csi::ListSnapshotsRequest::default();
    let r = p.controller().list_snapshots(req).await;
    let entries = r.expect("list snapshots").into_inner().entries;
    entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect()
}
