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
/// The FUSE export's id.
const EXPORT_ID: &str = "exp0";

/// The format node of layer `n` of the daemon: `disk0` is the image the daemon was started
/// with; each live snapshot adds the next (`disk1`, ...) on top, and the export follows it.
pub(super) fn format_node(n: u32) -> String {
    format!("disk{n}")
}

/// The protocol (file) node under `format_node(n)`: its file name is the plain image path.
pub(super) fn protocol_node(n: u32) -> String {
    format!("file{n}")
}

/// The layer number of a format node name.
fn layer_of(node: &str) -> Option<u32> {
    let n = node.strip_prefix("disk")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// The layer the export serves now (the daemon's active layer), as QMP reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Active {
    /// Its number (see `format_node`).
    pub(super) layer: u32,
    /// Its image file.
    pub(super) image: std::path::PathBuf,
    /// The virtual size the export serves.
    pub(super) size: u64,
}

impl super::qmp::Served {
    fn node(&self, name: &str) -> Option<&super::qmp::Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The layer the FUSE export serves, or why it cannot be told: the export follows each
    /// live snapshot to the new overlay, while the command line still names the first image.
    pub(super) fn active(&self) -> std::result::Result<Active, String> {
        let node = self
            .exports
            .iter()
            .find(|(id, _, kind)| id == EXPORT_ID && kind == "fuse")
            .map(|(_, node, _)| node.as_str())
            .ok_or_else(|| format!("no FUSE export {EXPORT_ID} (exports: {:?})", self.exports))?;
        let layer =
            layer_of(node).ok_or_else(|| format!("the export serves an unknown node {node}"))?;
        let (format, file) = (self.node(node), self.node(&protocol_node(layer)));
        let (Some(format), Some(file)) = (format, file) else {
            return Err(format!(
                "the export serves {node}, but the daemon has no such node with a file node \
                 under it"
            ));
        };
        Ok(Active {
            layer,
            image: file.file.clone().into(),
            size: format.virtual_size,
        })
    }

    /// Whether `image` is the file of layer `layer` or of one below it.
    pub(super) fn holds_below(&self, layer: u32, image: &Path) -> bool {
        (0..=layer).any(|n| {
            self.node(&protocol_node(n))
                .is_some_and(|f| Path::new(&f.file) == image)
        })
    }

    /// Layers above `layer` (added for a live snapshot that never switched): their format
    /// nodes, lowest first.
    pub(super) fn above(&self, layer: u32) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .nodes
            .iter()
            .filter_map(|n| layer_of(&n.name))
            .filter(|n| *n > layer)
            .collect();
        out.sort_unstable();
        out
    }
}

/// QemuOpts syntax doubles commas in values.
fn opts_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// The command line (arguments after the program name).
pub(super) fn args(slot: &Slot, rec: &Record) -> Vec<OsString> {
    let ro = rec.readonly;
    let mut file = json!({
        "driver": "file",
        "node-name": protocol_node(0),
        "filename": rec.image,
        "read-only": ro,
    });
    let mut format = json!({
        "driver": rec.format.as_str(),
        "node-name": format_node(0),
        "file": protocol_node(0),
        "read-only": ro,
    });
    if rec.discard {
        file["discard"] = json!("unmap");
        format["discard"] = json!("unmap");
    }
    let export = json!({
        "type": "fuse",
        "id": EXPORT_ID,
        "node-name": format_node(0),
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

/// The daemon's export, as QMP reports it, serves the slot's record, and the process
/// answering QMP is `d`: the layer it serves, or why it does not (not an error). The record
/// may name a layer below the one served: a live snapshot switched the export, and the plugin
/// stopped before it recorded the new image (the caller records it then).
pub(super) async fn confirm(
    slot: &Slot,
    rec: &Record,
    d: &Daemon,
) -> Result<std::result::Result<Active, String>> {
    let served = super::qmp::served(&slot.qmp_path()).await?;
    if served.pid != Some(d.pid) {
        return Ok(Err(format!(
            "{} is served by pid {:?}, not by the daemon of pid {}",
            slot.qmp_path().display(),
            served.pid,
            d.pid
        )));
    }
    let active = match served.active() {
        Ok(a) => a,
        Err(why) => return Ok(Err(format!("storage daemon {}: {why}", d.pid))),
    };
    if !served.holds_below(active.layer, &rec.image) {
        return Ok(Err(format!(
            "storage daemon {} does not serve {} (it serves {})",
            d.pid,
            rec.image.display(),
            active.image.display()
        )));
    }
    Ok(Ok(active))
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
    use crate::localattach::qmp::{Node, Served};
    use crate::model::ImageFormat;

    fn node(name: &str, file: &str, size: u64) -> Node {
        Node {
            name: name.into(),
            file: file.into(),
            virtual_size: size,
            backing_filename: None,
        }
    }

    /// After a live snapshot the export serves `disk1` (whose own file name is a `json:`
    /// description): the active image is read from `file1`; a node added above and never
    /// switched (`disk2`) is found; an unnamed node QEMU made is ignored.
    #[test]
    fn the_active_layer_is_the_one_the_export_serves() {
        let served = Served {
            pid: Some(7),
            exports: vec![("exp0".into(), "disk1".into(), "fuse".into())],
            nodes: vec![
                node("disk2", "json:{}", 64),
                node("file2", "/p/c.qcow2", 1),
                node("disk1", "json:{\"backing\": {}}", 64),
                node("file1", "/p/b.qcow2", 1),
                node("disk0", "/p/a.qcow2", 64),
                node("file0", "/p/a.qcow2", 1),
                node("#block123", "/p/a.qcow2", 64),
            ],
        };
        let active = served.active().unwrap();
        assert_eq!(
            active,
            Active {
                layer: 1,
                image: "/p/b.qcow2".into(),
                size: 64
            }
        );
        assert!(served.holds_below(1, Path::new("/p/a.qcow2")));
        assert!(served.holds_below(1, Path::new("/p/b.qcow2")));
        assert!(!served.holds_below(1, Path::new("/p/c.qcow2")));
        assert_eq!(served.above(1), vec![2]);
        assert_eq!(served.above(2), Vec::<u32>::new());
        for bad in ["disk", "diskx", "disk-1", "file1", "#block1"] {
            assert_eq!(layer_of(bad), None, "{bad}");
        }
        // No export, or an export of a node not ours: said, not guessed.
        let mut none = served.clone();
        none.exports.clear();
        assert!(none.active().unwrap_err().contains("no FUSE export"));
        none.exports = vec![("exp0".into(), "#block123".into(), "fuse".into())];
        assert!(none.active().unwrap_err().contains("unknown node"));
    }

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
