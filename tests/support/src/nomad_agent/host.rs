//! What the plugin leaves on this host for one volume (mounts, loop devices, storage daemons),
//! and the sweep that removes whatever a test run left below its temp dir.

use std::path::{Path, PathBuf};

/// Loop devices (`loopN`) whose backing file is the export of the volume with this key
/// (`…/vd-<key>`, the local-attach serial).
pub fn loop_devices_of(key: &str) -> Vec<String> {
    let needle = format!("vd-{key}");
    virtdisk_csi::node::Sysfs::host()
        .loop_devices()
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, backing)| backing.ends_with(&needle))
        .map(|(name, _)| name)
        .collect()
}

/// `major:minor` of a block device (`loop3`), from sysfs.
pub fn dev_numbers(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/block/{name}/dev"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Mount points (from /proc/self/mountinfo, unescaped) whose path contains `needle`, or whose
/// source is one of `devices` (`/dev/loopN`).
pub fn mounts_matching(needle: &str, devices: &[String]) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let point = unescape(fields[4]);
        let source = fields.get(sep + 2).copied().unwrap_or("");
        let dev_match = devices.iter().any(|d| source == format!("/dev/{d}"));
        if point.contains(needle) || dev_match {
            out.push(point);
        }
    }
    out
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap(), 8);
            if let Ok(v) = v {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Processes whose command line contains every one of `needles` (never this process).
pub fn processes_with(needles: &[&str]) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if !cmd.is_empty() && needles.iter().all(|n| cmd.contains(n)) {
            out.push((pid, cmd.trim_end().to_string()));
        }
    }
    out
}

/// What is left of one volume on this host: its loop devices, the mounts of its disk or below
/// Nomad's directories for it, and its storage daemons. Empty once it is fully released.
pub fn leftovers(key: &str, nomad_volume_id: &str, plugin_dirs: &[PathBuf]) -> Vec<String> {
    let loops = loop_devices_of(key);
    let mut left: Vec<String> = loops.iter().map(|l| format!("loop device {l}")).collect();
    for m in mounts_matching(&format!("/localattach/{key}"), &loops) {
        left.push(format!("mount {m}"));
    }
    for dir in plugin_dirs {
        for m in mounts_matching(&dir.display().to_string(), &[]) {
            let staged = m.contains(&format!("/staging/{nomad_volume_id}/"));
            let published =
                m.contains("/per-alloc/") && m.contains(&format!("/{nomad_volume_id}/"));
            if staged || published {
                left.push(format!("mount {m}"));
            }
        }
    }
    for (pid, cmd) in processes_with(&["qemu-storage-daemon", key]) {
        left.push(format!("storage daemon {pid}: {cmd}"));
    }
    left.sort();
    left.dedup();
    left
}

/// Removes what a run left below `dir` (its own temp dir, never anything else): processes
/// whose command line names `dir` (the agent's executors, plugin tasks), then, as
/// [`crate::local_attach::cleanup`], mounts, loop devices and storage daemons below it.
/// Returns what it found, for the log.
pub fn sweep(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let mut found = Vec::new();
    for (pid, cmd) in processes_with(&[&d]) {
        found.push(format!("process {pid}: {cmd}"));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if !found.is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    found.extend(crate::local_attach::leftovers(dir));
    crate::local_attach::cleanup(dir);
    found
}

/// Directories below `/sys/fs/cgroup/*/nomad` (cgroup v1 hierarchies; Nomad 1.1 puts its
/// cpuset and task cgroups there), for removing those a run created.
pub fn nomad_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let root = h.path().join("nomad");
        let mut todo = vec![root];
        while let Some(d) = todo.pop() {
            if !d.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    todo.push(e.path());
                }
            }
            out.push(d);
        }
    }
    out
}

/// Removes the cgroup directories that are not in `before` (deepest first); a cgroup that
/// still has tasks is left alone (rmdir refuses it).
pub fn remove_new_cgroups(before: &[PathBuf]) -> Vec<PathBuf> {
    let mut new: Vec<PathBuf> = nomad_cgroups()
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    new.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    new.into_iter()
        .filter(|d| std::fs::remove_dir(d).is_err())
        .collect()
}

/// Removes what crashed earlier runs left: every `<tmp>/<prefix>*` directory older than ten
/// minutes that no process names any more is swept (as [`sweep`]) and deleted.
pub fn sweep_stale_runs(prefix: &str) -> Vec<String> {
    let tmp = std::env::temp_dir();
    let mut found = Vec::new();
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(600));
        if !name.starts_with(prefix) || !old {
            continue;
        }
        let dir = e.path();
        if !processes_with(&[&dir.display().to_string()]).is_empty() {
            continue;
        }
        found.extend(sweep(&dir));
        if std::fs::remove_dir_all(&dir).is_ok() {
            found.push(format!("stale run dir {}", dir.display()));
        }
    }
    found
}
