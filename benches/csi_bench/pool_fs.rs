//! CreateVolume and DeleteVolume beside hostpath and the durable-write floor, with the pools on
//! different file systems: the system's temp dir (where every other section runs), and ext4 with
//! its journal and XFS, each made on a loop device for the run.
//!
//! Why: what a durable commit costs depends on the file system far more than on the plugin.
//! Without a journal (this CI machine's root file system) every fsync is its own device flush;
//! with one, fsyncs of one transaction share a commit. hostpath never fsyncs, so its figure
//! barely moves, while the floor and the plugin move together.
//!
//! A loop device's flush is an fsync of its backing file, which lives on the temp dir's file
//! system: its floors are higher than a disk of its own would give. Compare each row with its
//! own floor and its own hostpath figure.

use super::floors;
use super::peer::{creates_and_deletes, HostPath};
use super::stats::{ms, Samples};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// One file system's figures.
pub struct FsRow {
    /// What the pools were on, e.g. "ext4 with journal (loop device)".
    pub fs: String,
    pub create: Samples,
    pub create_hostpath: Samples,
    pub delete: Samples,
    pub delete_hostpath: Samples,
    /// One durable record write (write, fsync, rename, fsync dir) on the same file system.
    pub floor: Samples,
}

impl FsRow {
    fn p50(s: &Samples) -> Duration {
        s.p50().unwrap_or_default()
    }

    /// The Markdown row: file system, creates, × hostpath, × floor, deletes, × hostpath, floor.
    pub fn markdown(&self) -> String {
        let (c, ch, d, dh, f) = (
            Self::p50(&self.create),
            Self::p50(&self.create_hostpath),
            Self::p50(&self.delete),
            Self::p50(&self.delete_hostpath),
            Self::p50(&self.floor),
        );
        let times = |a: Duration, b: Duration| {
            if b.is_zero() {
                "–".to_string()
            } else {
                format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
            }
        };
        let yes = |ok: bool| if ok { "yes" } else { "**NO**" };
        format!(
            "| {} | {} / {} | {} ({}) | {} ({}) | {} / {} | {} ({}) | {} |",
            self.fs,
            ms(c),
            ms(ch),
            times(c, ch),
            yes(c <= ch * 2),
            times(c, f),
            yes(c.as_secs_f64() <= 1.5 * f.as_secs_f64()),
            ms(d),
            ms(dh),
            times(d, dh),
            yes(d <= dh * 2),
            ms(f),
        )
    }
}

/// A file system made on a loop device for the run, mounted on a temp dir; unmounted (and the
/// loop device let go) when dropped.
struct LoopFs {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// `mkfs.<fs>` with its defaults on a sparse file of `size` under the system's temp dir.
    fn make(fs: &str, size: &str) -> Result<LoopFs, String> {
        let dir = tempfile::Builder::new()
            .prefix("vdt-bench-fs-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let image = dir.path().join(format!("{fs}.img"));
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        sh("truncate", &["-s", size, &image.to_string_lossy()])?;
        sh(&format!("mkfs.{fs}"), &["-q", &image.to_string_lossy()])?;
        sh(
            "mount",
            &[
                "-o",
                "loop",
                &image.to_string_lossy(),
                &mount.to_string_lossy(),
            ],
        )?;
        // Mounted: from here on, dropping it unmounts.
        let fs = LoopFs { mount, _dir: dir };
        // The plugin's and hostpath's temp dirs go below; searchable like /tmp.
        sh("chmod", &["1777", &fs.mount.to_string_lossy()])?;
        Ok(fs)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // `mount -o loop` sets autoclear: the loop device goes with the mount.
        if sh("umount", &[&self.mount.to_string_lossy()]).is_err() {
            let _ = sh("umount", &["-l", &self.mount.to_string_lossy()]);
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Both drivers with their state under `parent`: `n` creates and deletes each, and the floor.
async fn measure(bin: &Path, parent: &Path, fs: String, n: usize) -> FsRow {
    let ours = super::plugin::start_in(
        parent,
        "controller",
        "[libvirt]\nenabled = false\n[snapshots]\nmax_chain_depth = 64\n",
        &[],
    )
    .await;
    let theirs = HostPath::start(bin, Some(parent)).await;
    let floor = floors::durable_write(&ours.data_dir(), n);
    let [create, create_hostpath, delete, delete_hostpath] =
        creates_and_deletes(&mut ours.controller(), &mut theirs.controller(), n).await;
    FsRow {
        fs,
        create,
        create_hostpath,
        delete,
        delete_hostpath,
        floor,
    }
}

/// The section: one row per file system that could be made here.
pub async fn run(s: &super::Settings) -> Vec<FsRow> {
    let Some(bin) = super::peer::tool() else {
        eprintln!("filesystems: hostpathplugin not found; no figures");
        return Vec::new();
    };
    let n = s.creates;
    let mut rows = Vec::new();
    let tmp = std::env::temp_dir();
    eprintln!(
        "filesystems: {n} creates and deletes each on {}",
        tmp.display()
    );
    rows.push(
        measure(
            &bin,
            &tmp,
            format!(
                "{} (as every other section)",
                super::machine::filesystem_of(&tmp)
            ),
            n,
        )
        .await,
    );
    for (fs, what) in [
        ("ext4", "ext4 with its journal (mkfs defaults), loop device"),
        ("xfs", "XFS (mkfs defaults), loop device"),
    ] {
        match LoopFs::make(fs, "4G") {
            Ok(lo) => {
                eprintln!("filesystems: {n} creates and deletes each on {what}");
                rows.push(measure(&bin, &lo.mount, what.to_string(), n).await);
            }
            Err(e) => eprintln!("filesystems: no {fs} row: {e}"),
        }
    }
    rows
}
