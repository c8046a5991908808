//! Resident memory of a freshly started plugin, in each mode, after it has served a few calls
//! and settled.

use super::plugin::{memory, probe_ready, threads_of};
use super::stats::{mib, ValueRow};
use std::time::Duration;
use virtdisk_test_support::prelude::csi;

pub const IDLE_TARGET: u64 = 8 << 20;

/// Set by scripts/bench.sh: the node plugin built without libvirt, as it runs in the VMs.
pub const NODE_BIN_ENV: &str = "VIRTDISK_BENCH_NODE_BIN";

pub async fn run() -> Vec<ValueRow> {
    let mut rows = Vec::new();
    let mut runs: Vec<(String, std::path::PathBuf, &str)> = ["controller", "node", "monolith"]
        .iter()
        .map(|m| (m.to_string(), super::plugin::bin(), *m))
        .collect();
    match std::env::var_os(NODE_BIN_ENV) {
        Some(bin) => runs.push((
            "node, built for the VMs (no libvirt, profile guest)".into(),
            bin.into(),
            "node",
        )),
        None => {
            eprintln!("footprint: {NODE_BIN_ENV} unset: no figure for the no-libvirt node build")
        }
    }
    for (label, bin, mode) in runs {
        let args: &[&str] = if mode == "node" {
            &["--node-id", "vdt-bench-node"]
        } else {
            &[]
        };
        let p = super::plugin::start_bin(&bin, mode, "", args).await;
        // What a CO does at registration: identity, capabilities, a probe.
        let _ = p
            .identity()
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await;
        let _ = probe_ready(&p).await;
        if mode != "node" {
            let _ = p
                .controller()
                .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
                .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m = memory(&p);
        let pid = p.pid().expect("plugin is running");
        let threads = threads_of(pid);
        let (anon, file, pss) = breakdown(pid);
        rows.push(
            ValueRow::new(
                format!("idle RSS, {label} (VmRSS / VmHWM)"),
                format!("{} / {}", mib(m.rss), mib(m.hwm)),
            )
            .target(format!("≤ {}", mib(IDLE_TARGET)), m.rss <= IDLE_TARGET)
            .note(format!(
                "RssAnon {} (the plugin's own memory), RssFile {} (mapped code: the binary and \
                 shared libraries), Pss {}; {threads} threads",
                mib(anon),
                mib(file),
                mib(pss)
            )),
        );
    }
    rows
}

/// (RssAnon, RssFile, Pss) in bytes: what of the RSS is the process's own memory, and what is
/// mapped code shared with other processes.
pub fn breakdown(pid: u32) -> (u64, u64, u64) {
    let kib = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    (
        kib(&status, "RssAnon:"),
        kib(&status, "RssFile:"),
        kib(&rollup, "Pss:"),
    )
}
