//! How many volumes this host can hold attached locally: the `max_volumes_per_node` NodeGetInfo
//! reports in local-attach mode and ControllerPublish enforces.
//!
//! Each locally attached volume takes one loop device, one FUSE mount (its export) and one
//! qemu-storage-daemon; a staged and published volume adds at least two more mounts (staging
//! and target). What bounds them on Linux, read from the running kernel:
//! - loop devices: `losetup` creates them on demand (`LOOP_CTL_GET_FREE`), past the kernel's
//!   `max_loop` (which only pre-creates devices); the bound is the minor number space, 2^20
//!   divided among `max_part + 1` minors per device;
//! - FUSE exports and the mounts of the volumes: `fs.mount-max` per mount namespace;
//! - daemons: `kernel.pid_max` tasks (threads count), and a daemon runs up to
//!   `TASKS_PER_DAEMON` of them when its I/O thread pool is full.
//!
//! The smallest of the three is the host's limit; `node.max_volumes_per_node` can lower it.

use std::path::Path;

/// Minor numbers of one block major (MINORBITS).
const MINORS: u64 = 1 << 20;
/// Mounts one volume in use takes at least: its FUSE export, a staging mount, a target.
const MOUNTS_PER_VOLUME: u64 = 3;
/// Tasks one qemu-storage-daemon may run: its main and RCU threads, the FUSE export's
/// thread, and QEMU's I/O worker pool (64 threads at most by default).
const TASKS_PER_DAEMON: u64 = 4 + 64;

/// The kernel settings the limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostBounds {
    /// `/sys/module/loop/parameters/max_part`.
    pub(crate) loop_max_part: u64,
    /// `/proc/sys/fs/mount-max`.
    pub(crate) mount_max: u64,
    /// `/proc/sys/kernel/pid_max`.
    pub(crate) pid_max: u64,
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(Path::new(path))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl HostBounds {
    /// This host's settings; Linux's defaults where a file cannot be read. Blocking (three
    /// small reads).
    pub(crate) fn read() -> HostBounds {
        HostBounds {
            loop_max_part: read_number("/sys/module/loop/parameters/max_part").unwrap_or(0),
            mount_max: read_number("/proc/sys/fs/mount-max").unwrap_or(100_000),
            pid_max: read_number("/proc/sys/kernel/pid_max").unwrap_or(32_768),
        }
    }

    /// How many volumes the host can hold attached locally.
    pub(crate) fn volumes(&self) -> u64 {
        // The loop driver rounds max_part up to 2^n - 1 and gives each device 2^n minors.
        let minors_per_loop = (self.loop_max_part + 1).next_power_of_two();
        let loops = MINORS / minors_per_loop;
        let mounts = self.mount_max / MOUNTS_PER_VOLUME;
        let daemons = self.pid_max / TASKS_PER_DAEMON;
        loops.min(mounts).min(daemons).max(1)
    }
}

/// The limit to report and enforce: the host's, or `configured` when that is lower (0: not
/// configured).
pub(crate) fn effective(configured: u64, host: u64) -> u64 {
    if configured == 0 {
        host
    } else {
        configured.min(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_bound_wins() {
        // This kind of machine: max_part=0, mount-max 100000, pid_max 32768.
        let here = HostBounds {
            loop_max_part: 0,
            mount_max: 100_000,
            pid_max: 32_768,
        };
        assert_eq!(here.volumes(), 32_768 / 68);
        let big_pids = HostBounds {
            pid_max: 4_194_304,
            ..here
        };
        assert_eq!(big_pids.volumes(), 100_000 / 3);
        // Loop minors alone: max_part=15 gives 16 minors a device; 5 is rounded up to 7.
        let loops_only = |loop_max_part| HostBounds {
            loop_max_part,
            mount_max: u64::MAX / 2,
            pid_max: u64::MAX / 2,
        };
        assert_eq!(loops_only(0).volumes(), 1 << 20);
        assert_eq!(loops_only(15).volumes(), 1 << 16);
        assert_eq!(loops_only(5).volumes(), 1 << 17);
        assert_eq!(effective(0, 481), 481);
        assert_eq!(effective(16, 481), 16);
        assert_eq!(effective(1000, 481), 481);
    }
}
