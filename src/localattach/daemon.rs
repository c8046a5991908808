//! The qemu-storage-daemon that opens a volume's image and exports it as a FUSE file. It is
//! made to outlive the plugin: it daemonizes (its own session, re-parented to init, so a kill
//! of the plugin's process group misses it) and leaves the plugin's cgroups before it execs
//! (see `cgroup`), so a CO that kills every process of the plugin's cgroup misses it too. A
//! restarted plugin adopts it: the pid file names it, and the pid is trusted only once a pidfd
//! holds the process and its command line names this slot's pid file (QMP then confirms what
//! it serves, see `LocalAttacher::adopt`). Every signal goes through the pidfd, so a recycled
//! pid is never signalled.

use super::slot::{Record, Slot};
use crate::error::{Error, Result};
use crate::exec;
use serde_json::json;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

pub(super) const PROGRAM: &str = "qemu-storage-daemon";
/// The format node that the export serves and QMP resizes.
pub(super) const DISK_NODE: &str = "disk0";

/// QemuOpts syntax doubles commas in values.
fn opts_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// The command line (arguments after the program name).
pub(super) fn args(slot: &Slot, rec: &Record) -> Vec<OsString> {
    let ro = rec.readonly;
    let mut file = json!({
        "driver": "file",
        "node-name": "file0",
        "filename": rec.image,
        "read-only": ro,
    });
    let mut format = json!({
        "driver": rec.format.as_str(),
        "node-name": DISK_NODE,
        "file": "file0",
        "read-only": ro,
    });
    if rec.discard {
        file["discard"] = json!("unmap");
        format["discard"] = json!("unmap");
    }
    let export = json!({
        "type": "fuse",
        "id": "exp0",
        "node-name": DISK_NODE,
        "mountpoint": slot.export_path(&rec.serial),
        "writable": !ro,
    });
    vec![
        "--daemonize".into(),
        "--pidfile".into(),
        slot.pid_path().into(),
        "--blockdev".into(),
        file.to_string().into(),
        "--blockdev".into(),
        format.to_string().into(),
        "--export".into(),
        export.to_string().into(),
        "--chardev".into(),
        format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            opts_escape(&slot.qmp_path().to_string_lossy())
        )
        .into(),
        "--monitor".into(),
        "chardev=qmp0,mode=control".into(),
    ]
}

/// Starts the daemon; returns once the export is mounted (`--daemonize` waits for that). The
/// daemon joins the cgroups whose `cgroup.procs` are given before it runs.
pub(super) async fn start(slot: &Slot, rec: &Record, cgroup_procs: &[std::fs::File]) -> Result<()> {
    exec::run_in_cgroups(PROGRAM, args(slot, rec), cgroup_procs).await?;
    Ok(())
}

/// A live storage daemon, held by a pidfd: its pid cannot be recycled under us.
#[derive(Debug)]
pub(super) struct Daemon {
    pub(super) pid: i32,
    fd: OwnedFd,
}

impl Daemon {
    /// The process has not exited (not even as a zombie). Blocking, returns at once.
    pub(super) fn alive(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        // A pidfd turns readable when its process exits.
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    fn signal(&self, signal: rustix::process::Signal) -> std::io::Result<()> {
        rustix::process::pidfd_send_signal(&self.fd, signal).map_err(std::io::Error::from)
    }
}

/// The slot's daemon, if its pid file names a live qemu-storage-daemon started for this slot.
/// The pidfd is opened first and checked again after the command line was read, so the
/// command line read is that process's. Blocking.
pub(super) fn find(slot: &Slot) -> Option<Daemon> {
    let pid: i32 = std::fs::read_to_string(slot.pid_path())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid <= 1 {
        return None;
    }
    let fd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid)?,
        rustix::process::PidfdFlags::empty(),
    )
    .ok()?;
    let d = Daemon { pid, fd };
    (is_ours(pid, &slot.pid_path()) && d.alive()).then_some(d)
}

/// The process carries our program name and this slot's pid file path, and is no zombie.
fn is_ours(pid: i32, pid_file: &Path) -> bool {
    if !running(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    let program_ok = args
        .next()
        .and_then(|a| a.rsplit(|b| *b == b'/').next())
        .is_some_and(|name| name == PROGRAM.as_bytes());
    let want = pid_file.as_os_str().as_encoded_bytes();
    program_ok && args.any(|arg| arg == want)
}

/// Running and not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The daemon's image and export, as QMP reports them, match the slot's record, and the
/// process answering QMP is `d`. Not an error when they differ: the reason is returned.
pub(super) async fn confirm(slot: &Slot, rec: &Record, d: &Daemon) -> Result<Option<String>> {
    let served = super::qmp::served(&slot.qmp_path()).await?;
    if served.pid != Some(d.pid) {
        return Ok(Some(format!(
            "{} is served by pid {:?}, not by the daemon of pid {}",
            slot.qmp_path().display(),
            served.pid,
            d.pid
        )));
    }
    let image = rec.image.to_string_lossy();
    if !served
        .nodes
        .iter()
        .any(|(node, file)| node == "file0" && *file == image)
    {
        return Ok(Some(format!(
            "storage daemon {} does not serve {image} (it serves {:?})",
            d.pid, served.nodes
        )));
    }
    if !served
        .exports
        .iter()
        .any(|(id, node, kind)| id == "exp0" && node == DISK_NODE && kind == "fuse")
    {
        return Ok(Some(format!(
            "storage daemon {} has no FUSE export of {DISK_NODE} (exports: {:?})",
            d.pid, served.exports
        )));
    }
    Ok(None)
}

/// Stops the slot's daemon (SIGTERM, then SIGKILL) and waits until it is gone. OK when none
/// runs. On SIGTERM the daemon unmounts its export and closes the image cleanly.
pub(super) async fn stop(slot: &Slot) -> Result<()> {
    let s = slot.clone();
    let Some(d) = exec::blocking(move || Ok(find(&s))).await? else {
        return Ok(());
    };
    let d = std::sync::Arc::new(d);
    let pid = d.pid;
    use rustix::process::Signal;
    for (signal, wait) in [
        (Signal::TERM, Duration::from_secs(10)),
        (Signal::KILL, Duration::from_secs(5)),
    ] {
        if let Err(e) = d.signal(signal) {
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(Error::io(format!("signalling {PROGRAM} {pid}"), e));
        }
        let start = Instant::now();
        // The daemon usually exits within milliseconds: look again soon, then less often.
        let mut nap = Duration::from_millis(1);
        while start.elapsed() < wait {
            let dd = d.clone();
            if !exec::blocking(move || Ok(dd.alive())).await? {
                tracing::info!(pid, slot = %slot.key, "storage daemon stopped");
                crate::failpoint!("localattach.daemon-stopped");
                return Ok(());
            }
            tokio::time::sleep(nap).await;
            nap = (nap * 2).min(Duration::from_millis(50));
        }
        tracing::warn!(pid, ?signal, "storage daemon did not exit in time");
    }
    Err(Error::internal(format!(
        "{PROGRAM} {pid} did not exit after SIGKILL"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ImageFormat;

    #[test]
    fn command_line_is_json_and_escaped() {
        let slot = Slot::new(Path::new("/var/lib/x,y/localattach"), "0123456789abcdef");
        let rec = Record {
            volume_id: "default.0123456789abcdef".into(),
            serial: "vd-0123456789abcdef".into(),
            image: "/pool/images/a\"b.qcow2".into(),
            format: ImageFormat::Qcow2,
            readonly: true,
            shareable: false,
            discard: false,
            logical_block_size: None,
        };
        let a: Vec<String> = args(&slot, &rec)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let file: serde_json::Value = serde_json::from_str(&a[4]).unwrap();
        assert_eq!(file["filename"], "/pool/images/a\"b.qcow2");
        assert_eq!(file["read-only"], true);
        let export: serde_json::Value = serde_json::from_str(&a[8]).unwrap();
        assert_eq!(export["writable"], false);
        assert_eq!(
            export["mountpoint"],
            "/var/lib/x,y/localattach/0123456789abcdef/vd-0123456789abcdef"
        );
        assert!(
            a[10].contains("path=/var/lib/x,,y/localattach/"),
            "{}",
            a[10]
        );
        assert!(!is_ours(std::process::id() as i32, Path::new("/nope")));
        assert!(running(std::process::id() as i32));
    }
}
