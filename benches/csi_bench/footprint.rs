//! Resident memory of a freshly started plugin, in each mode, after it has served a few calls
//! and settled.

use super::plugin::{threads_of, BenchPlugin};
use super::stats::{mib, ValueRow};
use std::time::Duration;
use virtdisk_csi::csi::proto as csi;

pub const IDLE_TARGET: u64 = 8 << 20;

pub async fn run() -> Vec<ValueRow> {
    let mut rows = Vec::new();
    for mode in ["controller", "node", "monolith"] {
        let args: &[&str] = if mode == "node" {
            &["--node-id", "vdt-bench-node"]
        } else {
            &[]
        };
        let p = BenchPlugin::start(mode, "", args).await;
        // What a CO does at registration: identity, capabilities, a probe.
        let _ = p
            .identity()
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await;
        let _ = p.probe_ready().await;
        if mode != "node" {
            let _ = p
                .controller()
                .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
                .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m = p.memory();
        let threads = threads_of(p.pid());
        rows.push(
            ValueRow::new(
                format!("idle RSS, {mode} (VmRSS / VmHWM)"),
                format!("{} / {}", mib(m.rss), mib(m.hwm)),
            )
            .target(format!("≤ {}", mib(IDLE_TARGET)), m.rss <= IDLE_TARGET)
            .note(format!("{threads} threads")),
        );
    }
    rows
}
