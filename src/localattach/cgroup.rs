//! Where the storage daemons live in the cgroup tree. An orchestrator stops a task or container
//! by killing every process of its cgroup: Nomad's executor freezes the task's freezer cgroup
//! and SIGKILLs every pid in it (cgroup v1), runc signals every pid of the container's cgroup,
//! the kubelet kills what is left in a pod's cgroups, systemd kills a unit's control group.
//! A daemon that stayed in the plugin's cgroup would die with the plugin and take every
//! attached volume with it. So each daemon is placed, before it runs a single instruction of
//! its own, in a cgroup of its own choosing (`node.daemon_cgroup`, e.g. `virtdisk-csi`) in
//! every hierarchy under `node.cgroup_root` (each v1 controller hierarchy, the v1 named
//! `systemd` hierarchy, and the unified v2 one).
//!
//! The child writes `0` (itself) to each `cgroup.procs` that the plugin opened before the
//! fork; afterwards the plugin reads the cgroups back and says where the move failed (for
//! example a read-only cgroupfs in a container), because there the daemon dies with the plugin.

use crate::error::{Error, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The placement settings (from `[node]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Where the cgroup hierarchies are mounted (`/sys/fs/cgroup`; in a container, the host's
    /// cgroupfs mounted somewhere, e.g. `/host/sys/fs/cgroup`).
    pub(crate) root: PathBuf,
    /// The daemons' cgroup, relative to each hierarchy's root (e.g. `virtdisk-csi`).
    pub(crate) path: PathBuf,
    /// Only these hierarchies (directory names under `root`, e.g. `freezer`, `unified`);
    /// empty: every hierarchy.
    pub(crate) hierarchies: Vec<String>,
}

/// One hierarchy's cgroup for the daemons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The hierarchy (directory name under the root; empty for a pure v2 root).
    pub(crate) hierarchy: String,
    /// The cgroup's directory.
    pub(crate) dir: PathBuf,
}

/// Each hierarchy mounted under `root`: a pure cgroup v2 root is one hierarchy; otherwise every
/// real directory (not the `cpu`→`cpu,cpuacct` style symlinks) that holds `cgroup.procs`.
/// Blocking.
pub(crate) fn hierarchies(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![(String::new(), root.to_path_buf())]);
    }
    let rd = std::fs::read_dir(root)
        .map_err(|e| Error::io(format!("listing cgroup root {}", root.display()), e))?;
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.path().join("cgroup.procs").exists())
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// A relative cgroup path of plain components.
pub(crate) fn check_path(path: &Path) -> Result<()> {
    use std::path::Component;
    let plain = path
        .components()
        .all(|c| matches!(c, Component::Normal(s) if s.to_str().is_some()));
    if path.as_os_str().is_empty() || !plain {
        return Err(Error::invalid(format!(
            "node.daemon_cgroup {:?} must be a relative path of plain names (e.g. \"virtdisk-csi\"), \
             or \"\" to leave the storage daemons in the plugin's cgroup",
            path.display()
        )));
    }
    Ok(())
}

/// A new v1 cpuset cgroup has no CPUs and memory nodes, and refuses tasks until it gets some:
/// it inherits its parent's.
fn init_cpuset(dir: &Path) -> Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let Ok(current) = std::fs::read_to_string(&own) else {
            return Ok(());
        };
        if !current.trim().is_empty() {
            continue;
        }
        let Some(parent) = dir.parent() else {
            continue;
        };
        let value = std::fs::read_to_string(parent.join(file))
            .map_err(|e| Error::io(format!("reading {}", parent.join(file).display()), e))?;
        std::fs::write(&own, value.trim())
            .map_err(|e| Error::io(format!("writing {}", own.display()), e))?;
    }
    Ok(())
}

impl Placement {
    /// Creates the daemons' cgroup in every selected hierarchy (idempotent). Hierarchies that
    /// refuse (read-only, no permission) are returned as problems, not errors: the daemons
    /// then run, but die with the plugin there. Blocking.
    pub(crate) fn prepare(&self) -> Result<(Vec<Target>, Vec<String>)> {
        let mut targets = Vec::new();
        let mut problems = Vec::new();
        for (name, hier) in hierarchies(&self.root)? {
            if !self.hierarchies.is_empty() && !self.hierarchies.contains(&name) {
                continue;
            }
            let dir = hier.join(&self.path);
            let made = (|| {
                let mut at = hier.clone();
                for part in self.path.components() {
                    at.push(part);
                    match std::fs::create_dir(&at) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(Error::io(format!("creating {}", at.display()), e)),
                    }
                    init_cpuset(&at)?;
                }
                Ok(())
            })();
            match made {
                Ok(()) => targets.push(Target {
                    hierarchy: name,
                    dir,
                }),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if targets.is_empty() && problems.is_empty() {
            problems.push(format!("no cgroup hierarchy under {}", self.root.display()));
        }
        Ok((targets, problems))
    }
}

/// `cgroup.procs` of each target, opened for writing (close-on-exec: the child writes to them
/// before it execs, the daemon never holds them). Blocking.
pub(crate) fn open_procs(targets: &[Target]) -> (Vec<File>, Vec<String>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for t in targets {
        let p = t.dir.join("cgroup.procs");
        match std::fs::OpenOptions::new().write(true).open(&p) {
            Ok(f) => files.push(f),
            Err(e) => problems.push(format!("opening {}: {e}", p.display())),
        }
    }
    (files, problems)
}

/// Hierarchies of `targets` whose cgroup does not hold `pid`. Blocking.
pub(crate) fn missing(targets: &[Target], pid: i32) -> Vec<String> {
    targets
        .iter()
        .filter(|t| {
            let procs = std::fs::read_to_string(t.dir.join("cgroup.procs")).unwrap_or_default();
            !procs.lines().any(|l| l.trim().parse::<i32>() == Ok(pid))
        })
        .map(|t| t.dir.display().to_string())
        .collect()
}

/// Moves a running `pid` into every target (an adopted daemon that an older plugin started in
/// its own cgroup). Returns the targets that refused. Blocking.
pub(crate) fn move_pid(targets: &[Target], pid: i32) -> Vec<String> {
    let mut failed = Vec::new();
    for t in targets {
        let p = t.dir.join("cgroup.procs");
        if let Err(e) = std::fs::write(&p, pid.to_string()) {
            failed.push(format!("{}: {e}", p.display()));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_hierarchies_and_a_v2_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for h in ["freezer", "cpu,cpuacct", "unified", "systemd"] {
            std::fs::create_dir_all(root.join(h)).unwrap();
            std::fs::write(root.join(h).join("cgroup.procs"), "").unwrap();
        }
        std::os::unix::fs::symlink(root.join("cpu,cpuacct"), root.join("cpu")).unwrap();
        std::fs::create_dir_all(root.join("not-a-hierarchy")).unwrap();
        let names: Vec<String> = hierarchies(root)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["cpu,cpuacct", "freezer", "systemd", "unified"]);

        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory").unwrap();
        assert_eq!(
            hierarchies(v2.path()).unwrap(),
            vec![(String::new(), v2.path().to_path_buf())]
        );
    }

    #[test]
    fn prepare_creates_the_cgroup_where_selected_and_inherits_cpusets() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for h in ["freezer", "cpuset", "memory"] {
            std::fs::create_dir_all(root.join(h)).unwrap();
            std::fs::write(root.join(h).join("cgroup.procs"), "").unwrap();
        }
        std::fs::write(root.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        // A real cpuset cgroup starts with empty files; the fake one gets them from its maker.
        std::fs::create_dir_all(root.join("cpuset/a")).unwrap();
        std::fs::write(root.join("cpuset/a/cpuset.cpus"), "").unwrap();
        std::fs::write(root.join("cpuset/a/cpuset.mems"), "").unwrap();
        let p = Placement {
            root: root.to_path_buf(),
            path: "a".into(),
            hierarchies: vec!["freezer".into(), "cpuset".into()],
        };
        let (targets, problems) = p.prepare().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(targets.len(), 2);
        assert!(root.join("freezer/a").is_dir());
        assert!(!root.join("memory/a").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("cpuset/a/cpuset.cpus")).unwrap(),
            "0-1"
        );
        assert_eq!(missing(&targets, 42).len(), 2);
    }

    #[test]
    fn cgroup_paths_are_plain_and_relative() {
        check_path(Path::new("virtdisk-csi")).unwrap();
        check_path(Path::new("a/b")).unwrap();
        for bad in ["", "/abs", "../up", "a/../b", "./a"] {
            assert!(check_path(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
