//! Observability: Prometheus metrics and the per-RPC tracing span.
//!
//! - `layer`: a tower layer around the gRPC server that counts every RPC by service, method and
//!   gRPC code, times it, and runs it inside a span carrying the ids it concerns (volume, node,
//!   snapshot). Only those ids are read from the request: secrets and whole messages never reach
//!   a log line or a label.
//! - hooks other modules call: [`observe_attach`], [`observe_detach`], [`observe_operation`].
//! - [`watch_pools`]: pool capacity gauges, refreshed on every scrape.
//! - [`serve`]: `GET /metrics` on a TCP address (`serve --metrics-addr 127.0.0.1:9808`).

mod http;
pub(crate) mod layer;
mod pools;
mod registry;
mod request_ids;

pub(crate) use http::serve;
pub(crate) use layer::RpcLayer;

use std::time::Duration;

/// A volume was attached to a node (hot-plug or local attach), confirmed, in `took`.
// Not fed yet: issue 17 defect 1 wires it up.
#[allow(dead_code)]
pub(crate) fn observe_attach(took: Duration) {
    registry::get().attach_seconds.observe(took.as_secs_f64());
}

/// A volume was detached from a node, confirmed, in `took`.
// Not fed yet: issue 17 defect 1 wires it up.
#[allow(dead_code)]
pub(crate) fn observe_detach(took: Duration) {
    registry::get().detach_seconds.observe(took.as_secs_f64());
}

/// Any other timed step worth a histogram (`"snapshot"`, `"resize"`, `"flatten"`, `"mkfs"`…).
/// Use a fixed, small set of names: each becomes a label value.
// Not fed yet: issue 17 defect 1 wires it up.
#[allow(dead_code)]
pub(crate) fn observe_operation(operation: &'static str, took: Duration) {
    registry::get()
        .operation_seconds
        .with_label_values(&[operation])
        .observe(took.as_secs_f64());
}

/// A group snapshot was created, meeting `consistency`, in `took`.
pub(crate) fn observe_group_snapshot(consistency: crate::model::Consistency, took: Duration) {
    let m = registry::get();
    m.group_snapshots
        .with_label_values(&[consistency.as_str()])
        .inc();
    m.operation_seconds
        .with_label_values(&["group_snapshot"])
        .observe(took.as_secs_f64());
}

/// Guests were held (file systems frozen, or paused) for `took` around a live cut.
pub(crate) fn observe_quiesce_window(took: Duration) {
    registry::get()
        .operation_seconds
        .with_label_values(&["quiesce_window"])
        .observe(took.as_secs_f64());
}

/// Lets the pool gauges follow these pools (controller modes call this once at start).
pub(crate) fn watch_pools(pools: crate::pool::Pools) {
    pools::watch(pools);
}

/// Records the build and the mode once at start (`virtdisk_csi_build_info`).
pub(crate) fn set_build_info(mode: &str) {
    registry::get()
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), mode])
        .set(1);
}

/// The whole registry in the Prometheus text format (refreshes the pool gauges first; blocking).
pub(crate) fn render() -> String {
    pools::refresh();
    registry::get().render()
}
