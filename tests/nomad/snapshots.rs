//! Snapshots as `nomad volume snapshot create|list|delete` make them (§3.8).

use super::*;

impl Nomad {
    // ---------------------------------------------------------------- (d) snapshots

    /// `nomad volume snapshot create <vol> <name> -parameter k=v`.
    pub async fn snapshot_create(
        &mut self,
        vol: &Volume,
        name: &str,
        parameters: Map,
    ) -> Result<Snapshot, Status> {
        self.require(CtrlCap::CreateDeleteSnapshot);
        let req = csi::CreateSnapshotRequest {
            source_volume_id: vol.external_id.clone(),
            name: name.to_string(),
            secrets: vol.spec.secrets.clone(),
            parameters,
        };
        let r = self.controller_call("CreateSnapshot", |mut c| async move {
            c.create_snapshot(deadlined(req)).await
        });
        let s = r
            .await?
            .snapshot
            .ok_or_else(|| Status::internal("CreateSnapshot answered without a snapshot"))?;
        Ok(snapshot_of(s))
    }

    /// `nomad volume snapshot delete <plugin> <id>`.
    pub async fn snapshot_delete(&mut self, id: &str) -> Result<(), Status> {
        self.require(CtrlCap::CreateDeleteSnapshot);
        let req = csi::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            secrets: Map::new(),
        };
        let r = self.controller_call("DeleteSnapshot", |mut c| async move {
            c.delete_snapshot(deadlined(req)).await
        });
        r.await.map(drop)
    }

    /// One page of `GET /v1/volumes/snapshot?per_page=N&next_token=T`, truncated to N.
    pub async fn snapshot_list_page(
        &mut self,
        per_page: i32,
        next_token: &str,
    ) -> Result<(Vec<Snapshot>, String), Status> {
        self.require(CtrlCap::ListSnapshots);
        let req = csi::ListSnapshotsRequest {
            max_entries: per_page,
            starting_token: next_token.to_string(),
            ..Default::default()
        };
        let r = self.controller_call("ListSnapshots", |mut c| async move {
            c.list_snapshots(deadlined(req)).await
        });
        let r = r.await?;
        let mut out: Vec<Snapshot> = r
            .entries
            .into_iter()
            .map(|e| snapshot_of(e.snapshot.expect("every snapshot entry has a snapshot")))
            .collect();
        if per_page > 0 {
            out.truncate(per_page as usize);
        }
        Ok((out, r.next_token))
    }

    /// `nomad volume snapshot list -per-page N`, following next_token until it is "".
    pub async fn snapshot_list_all(&mut self, per_page: i32) -> Result<Vec<Snapshot>, Status> {
        let (mut all, mut token) = self.snapshot_list_page(per_page, "").await?;
        let mut pages = 1;
        while !token.is_empty() {
            let (page, next) = self.snapshot_list_page(per_page, &token).await?;
            assert!(
                !page.is_empty() || next.is_empty(),
                "empty page with a next_token"
            );
            all.extend(page);
            token = next;
            pages += 1;
            assert!(pages < 1000, "ListSnapshots paging does not end");
        }
        Ok(all)
    }
}
