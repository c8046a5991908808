//! `client snapshot …`: the Controller service's snapshot RPCs.

use super::args::{key_value, to_map, PageArgs};
use super::render::Report;
use super::view::{self, SNAPSHOT_COLUMNS};
use super::{pages, ClientError, Ctx};
use crate::csi::proto as csi;
use serde_json::json;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum SnapshotCmd {
    /// CreateSnapshot (idempotent by name).
    Create {
        /// The snapshot's name: the idempotency key.
        #[arg(long)]
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        source: String,
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
        params: Vec<(String, String)>,
    },
    /// ListSnapshots, one page or every page (--all).
    List {
        /// Only snapshots of this volume.
        #[arg(long, default_value = "")]
        source: String,
        /// Only this snapshot.
        #[arg(long, default_value = "")]
        id: String,
        #[command(flatten)]
        page: PageArgs,
    },
    /// GetSnapshot.
    Get { snapshot_id: String },
    /// DeleteSnapshot (OK when it does not exist).
    Delete { snapshot_id: String },
}

pub(super) async fn run(cmd: SnapshotCmd, ctx: &Ctx) -> Result<Report, ClientError> {
    let mut c = ctx.controller();
    Ok(match cmd {
        SnapshotCmd::Create {
            name,
            source,
            params,
        } => {
            let r = c
                .create_snapshot(ctx.request(csi::CreateSnapshotRequest {
                    source_volume_id: source,
                    name,
                    parameters: to_map(&params),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            let s = r.snapshot.unwrap_or_default();
            Report::fields(
                view::snapshot_fields(&s),
                json!({ "snapshot": view::snapshot(&s) }),
            )
        }
        SnapshotCmd::List { source, id, page } => {
            let max_entries = page.max_entries;
            let (snaps, token) = pages(page.starting_token, page.all, |starting_token| {
                let (source, id, mut c) = (source.clone(), id.clone(), c.clone());
                async move {
                    let r = c
                        .list_snapshots(ctx.request(csi::ListSnapshotsRequest {
                            max_entries,
                            starting_token,
                            source_volume_id: source,
                            snapshot_id: id,
                            ..Default::default()
                        }))
                        .await?
                        .into_inner();
                    let snaps: Vec<_> = r.entries.into_iter().filter_map(|e| e.snapshot).collect();
                    Ok((snaps, r.next_token))
                }
            })
            .await?;
            let footer = if token.is_empty() {
                vec![]
            } else {
                vec![format!("next token: {token}")]
            };
            Report::table(
                SNAPSHOT_COLUMNS.to_vec(),
                snaps.iter().map(view::snapshot_row).collect(),
                footer,
                json!({
                    "entries": snaps.iter().map(|s| json!({ "snapshot": view::snapshot(s) })).collect::<Vec<_>>(),
                    "next_token": token,
                }),
            )
        }
        SnapshotCmd::Get { snapshot_id } => {
            let r = c
                .get_snapshot(ctx.request(csi::GetSnapshotRequest {
                    snapshot_id,
                    ..Default::default()
                }))
                .await?
                .into_inner();
            let s = r.snapshot.unwrap_or_default();
            Report::fields(
                view::snapshot_fields(&s),
                json!({ "snapshot": view::snapshot(&s) }),
            )
        }
        SnapshotCmd::Delete { snapshot_id } => {
            c.delete_snapshot(ctx.request(csi::DeleteSnapshotRequest {
                snapshot_id: snapshot_id.clone(),
                ..Default::default()
            }))
            .await?;
            Report::message(
                format!("deleted snapshot {snapshot_id}"),
                json!({ "deleted": snapshot_id }),
            )
        }
    })
}
