//! Observability: Prometheus metrics and the per-RPC tracing span.
//!
//! - `layer`: a tower layer around the gRPC server that counts every RPC by service, method and
//!   gRPC code, times it, and runs it inside a span carrying the ids it concerns (volume, node,
//!   snapshot). Only those ids are read from the request: secrets and whole messages never reach
//!   a log line or a label.
//! - hooks other modules call: [`observe_attach`], [`observe_detach`] (by the attach backends,
//!   by hypervisor host, once the change is confirmed), [`set_host_up`], [`observe_operation`] /
//!   [`timed`] (domain steps: `mkfs`, `grow-fs`, …).
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

/// A volume was attached to a node on hypervisor host `host` (the local host's name for local
/// attach), confirmed, in `took`.
pub(crate) fn observe_attach(host: &str, took: Duration) {
    registry::get()
        .attach_seconds
        .with_label_values(&[host])
        .observe(took.as_secs_f64());
}

/// A volume was detached from a node on hypervisor host `host`, confirmed, in `took`.
pub(crate) fn observe_detach(host: &str, took: Duration) {
    registry::get()
        .detach_seconds
        .with_label_values(&[host])
        .observe(took.as_secs_f64());
}

/// Makes the per-host series of hypervisor host `host` exist (at zero) before its first
/// attach, detach or call, so a dashboard sees every configured host at once.
#[cfg(feature = "libvirt")]
pub(crate) fn register_host(host: &str) {
    let m = registry::get();
    m.attach_seconds.with_label_values(&[host]);
    m.detach_seconds.with_label_values(&[host]);
}

/// Whether the last libvirt call to hypervisor host `host` reached its libvirtd
/// (`virtdisk_csi_host_up`).
#[cfg(feature = "libvirt")]
pub(crate) fn set_host_up(host: &str, up: bool) {
    registry::get()
        .host_up
        .with_label_values(&[host])
        .set(i64::from(up));
}

/// Any other timed step worth a histogram (`"snapshot"`, `"resize"`, `"flatten"`, `"mkfs"`…).
/// Use a fixed, small set of names: each becomes a label value.
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
    observe_operation("group_snapshot", took);
}

/// Guests were held (file systems frozen, or paused) for `took` around a live cut.
pub(crate) fn observe_quiesce_window(took: Duration) {
    observe_operation("quiesce_window", took);
}

/// Runs `step`; when it succeeds, observes how long it took as `operation`
/// ([`observe_operation`]).
pub(crate) async fn timed<T>(
    operation: &'static str,
    step: impl std::future::Future<Output = crate::error::Result<T>>,
) -> crate::error::Result<T> {
    let started = std::time::Instant::now();
    let done = step.await;
    if done.is_ok() {
        observe_operation(operation, started.elapsed());
    }
    done
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

/// CSI RPCs being handled now, of every service and method (`virtdisk_csi_rpc_in_flight`).
pub(crate) fn rpcs_in_flight() -> i64 {
    use prometheus::core::Collector;
    registry::get()
        .rpc_in_flight
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_gauge().get_value() as i64)
        .sum()
}

/// The whole registry in the Prometheus text format (refreshes the pool gauges first; blocking).
pub(crate) fn render() -> String {
    pools::refresh();
    registry::get().render()
}
