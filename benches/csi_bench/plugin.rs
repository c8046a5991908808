//! The plugin under test: the release binary, started as production would run it (default log
//! level, no debug logging), on a temp socket and data dir under a `vdt-bench-` temp dir that
//! libvirt's QEMU can reach; and what the footprint figures read from `/proc`.

use std::path::{Path, PathBuf};
use std::time::Duration;
use virtdisk_test_support::prelude::*;

/// Another build of the plugin to measure instead (e.g. an older commit, for a before/after).
pub const BIN_ENV: &str = "VIRTDISK_BENCH_BIN";

/// The plugin binary under test: `$VIRTDISK_BENCH_BIN`, else the one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os(BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(virtdisk_test_support::plugin::bin)
}

/// `serve --mode <mode>` with `config` (TOML, `{dir}` = the temp dir) and `args`.
pub async fn start(mode: &str, config: &str, args: &[&str]) -> Plugin {
    start_bin(&bin(), mode, config, args).await
}

/// Like `start`, with its temp dir (socket, data dir, pool) under `parent`.
pub async fn start_in(parent: &Path, mode: &str, config: &str, args: &[&str]) -> Plugin {
    launch(&bin(), mode, config, args)
        .in_dir(parent)
        .start()
        .await
}

/// Like `start`, with another build of the plugin. Polls every 2 ms for the first answer (the
/// resolution of the start-up figure, `Plugin::started_in`).
pub async fn start_bin(bin: &Path, mode: &str, config: &str, args: &[&str]) -> Plugin {
    launch(bin, mode, config, args).start().await
}

fn launch(
    bin: &Path,
    mode: &str,
    config: &str,
    args: &[&str],
) -> virtdisk_test_support::plugin::Launch {
    Plugin::launch(mode)
        .bin(bin)
        .config(config)
        .args(args)
        .production()
        .dir_prefix("vdt-bench-")
        .readable_by_qemu()
        .poll(Duration::from_millis(2), Duration::from_secs(300))
}

/// Whether Probe answers ready (pools open and libvirt answering).
pub async fn probe_ready(p: &Plugin) -> bool {
    let ready = p.identity().ready().await;
    ready.map(|r| r.unwrap_or(true)).unwrap_or(false)
}

/// Resident memory of a process, from /proc/<pid>/status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: u64,
    pub hwm: u64,
}

/// The running plugin's resident memory.
pub fn memory(p: &Plugin) -> Memory {
    memory_of(p.pid().expect("plugin is running"))
}

pub fn memory_of(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
    }
}

/// Threads of a process.
pub fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}
