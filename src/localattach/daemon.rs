//! The qemu-storage-daemon that opens a volume's image and exports it as a FUSE file. It runs
//! daemonized (its own session, re-parented to init), so a restarted plugin leaves it running
//! and finds it again through its pid file.

use super::slot::{Record, Slot};
use crate::error::{Error, Result};
use crate::exec;
use serde_json::json;
use std::ffi::OsString;
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
pub(super) fn args(slot: &Slot, rec: &Record, discard: bool) -> Vec<OsString> {
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
    if discard {
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

/// Starts the daemon; returns once the export is mounted (`--daemonize` waits for that).
pub(super) async fn start(slot: &Slot, rec: &Record, discard: bool) -> Result<()> {
    exec::run(PROGRAM, args(slot, rec, discard)).await?;
    Ok(())
}

/// The daemon's pid, if its pid file names a live qemu-storage-daemon of this slot. Blocking.
pub(super) fn running_pid(slot: &Slot) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(slot.pid_path())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_ours(pid, &slot.pid_path()).then_some(pid)
}

/// Guards against a recycled pid: the process must be alive and carry our pid file path.
fn is_ours(pid: i32, pid_file: &Path) -> bool {
    if pid <= 1 || !alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = pid_file.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

/// Running and not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Stops the slot's daemon (SIGTERM, then SIGKILL) and waits until it is gone. OK when none
/// runs. On SIGTERM the daemon unmounts its export and closes the image cleanly.
pub(super) async fn stop(slot: &Slot) -> Result<()> {
    let s = slot.clone();
    let Some(pid) = exec::blocking(move || Ok(running_pid(&s))).await? else {
        return Ok(());
    };
    use nix::sys::signal::{kill, Signal};
    let target = nix::unistd::Pid::from_raw(pid);
    for (signal, wait) in [
        (Signal::SIGTERM, Duration::from_secs(10)),
        (Signal::SIGKILL, Duration::from_secs(5)),
    ] {
        if let Err(e) = kill(target, signal) {
            if e == nix::errno::Errno::ESRCH {
                return Ok(());
            }
            return Err(Error::sys(format!("signalling {PROGRAM} {pid}"), e));
        }
        let start = Instant::now();
        // The daemon usually exits within milliseconds: look again soon, then less often.
        let mut nap = Duration::from_millis(1);
        while start.elapsed() < wait {
            if !alive(pid) {
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
        };
        let a: Vec<String> = args(&slot, &rec, false)
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
        assert!(alive(std::process::id() as i32));
    }
}
