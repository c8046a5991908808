//! Local attach: this host is a node. ControllerPublish to the host's own node id exports the
//! volume's image as a host block device: a qemu-storage-daemon opens the image (qcow2 or raw)
//! and serves it as a FUSE file, and a loop device turns that file into `/dev/loopN`. The node
//! service then finds the loop device by serial (the export file is named after it) and
//! formats and mounts it like any hot-plugged disk.
//!
//! Nothing is kept in memory: attachments are read back from the state directory and the
//! kernel's loop devices, so a restarted controller knows them, and leftovers of an attach a
//! crash interrupted are cleaned when the backend opens.
//!
//! Attached volumes outlive the plugin: the storage daemon runs in its own session and its own
//! cgroups (`daemon`, `cgroup`), so killing the plugin, its process group or its cgroup (the
//! way Nomad and container runtimes stop a task) leaves every attachment working. The
//! restarted plugin adopts the daemons it finds (pidfd, command line, QMP). An attachment whose
//! daemon died anyway is reported as such (`Attachment::abnormal`), never as healthy: it is
//! attached afresh when nothing uses it, and refused with what to do when something does.

mod cgroup;
mod daemon;
mod fsfreeze;
mod limit;
mod loopdev;
mod probe;
mod qmp;
mod slot;
mod snapshot;

use crate::attach::{
    outcome_unknown, Attacher, Attachment, DiskSpec, FsFreeze, LiveMember, CTX_BUS, CTX_DEVICE,
};
use crate::config::{Config, Mode};
use crate::error::{Error, Result};
use crate::exec;
use crate::ids::VolumeId;
use crate::node::mountinfo::MountTable;
use crate::node::Sysfs;
use crate::params::{Bus, Discard, Qos};
use cgroup::Placement;
use slot::{Record, Slot};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// publish_context `bus` of a locally attached volume.
pub(crate) const BUS_LOCAL: &str = "local";

/// `node.daemon_cgroup` when not configured.
pub(crate) const DEFAULT_DAEMON_CGROUP: &str = "virtdisk-csi";
/// `node.cgroup_root` when not configured.
pub(crate) const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

pub(crate) struct LocalAttacher {
    node_id: String,
    state_dir: PathBuf,
    sysfs: Sysfs,
    /// Most volumes attached here at once (`node_limit`).
    limit: u64,
    /// Held from counting the attachments to the end of an attach, so concurrent publishes
    /// of different volumes never pass the limit together.
    attaching: tokio::sync::Mutex<()>,
    /// Per slot, the live snapshots holding its file system frozen (see `fsfreeze`).
    freezes: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<SlotFreeze>>>>,
    /// Bounded probes of the loop devices (a daemon that does not answer blocks them).
    probes: probe::Probes,
    /// Where new daemons go in the cgroup tree; None leaves them in the plugin's cgroups.
    placement: Option<Placement>,
    /// The node id cannot name a libvirt domain (it is not a QEMU guest's DMI UUID, nor a
    /// `--node-id` that might be a domain name): asked before the libvirt backend.
    serves_first: bool,
}

/// The host label of local attaches and detaches in the metrics: this machine.
const LOCAL_HOST: &str = crate::config::IMPLICIT_HOST;

/// Whether this process attaches volumes locally: `[node] local_attach`, by default in
/// monolith mode (a controller that serves this host as a node).
pub(crate) fn enabled(cfg: &Config) -> bool {
    cfg.node.local_attach.unwrap_or(cfg.mode == Mode::Monolith) && cfg.mode.runs_controller()
}

/// The backend for `cfg`, when local attach is on (default: monolith mode only).
pub(crate) async fn from_config(cfg: &Config) -> Result<Option<Arc<dyn Attacher>>> {
    if !enabled(cfg) {
        return Ok(None);
    }
    let node_id = crate::nodeid::resolve(cfg.node_id.as_deref(), Path::new("/"))?;
    let placement = placement(&cfg.node)?;
    let serves_first = cfg.node_id.is_none() && !crate::nodeid::is_qemu_guest(Path::new("/"));
    let mut attacher = LocalAttacher::open(
        node_id,
        cfg.data_dir.join("localattach"),
        placement,
        serves_first,
    )
    .await?;
    attacher.limit = node_limit(cfg).await?.unwrap_or(0);
    Ok(Some(Arc::new(attacher)))
}

/// The daemons' cgroup placement from `[node]`; InvalidArgument names a bad setting.
fn placement(node: &crate::config::NodeConfig) -> Result<Option<Placement>> {
    let path = node
        .daemon_cgroup
        .clone()
        .unwrap_or_else(|| DEFAULT_DAEMON_CGROUP.to_string());
    if path.is_empty() {
        return Ok(None);
    }
    cgroup::check_path(Path::new(&path))?;
    let root = node
        .cgroup_root
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CGROUP_ROOT));
    if !root.is_absolute() {
        return Err(Error::invalid(format!(
            "node.cgroup_root {} must be absolute",
            root.display()
        )));
    }
    Ok(Some(Placement {
        root,
        path: path.into(),
        hierarchies: node.daemon_cgroup_hierarchies.clone(),
    }))
}

/// With local attach on in this process, how many volumes this host holds attached at most:
/// what its kernel allows (see `limit`), lowered by `node.max_volumes_per_node`. NodeGetInfo
/// reports it and ControllerPublish enforces it. None when local attach is off.
pub(crate) async fn node_limit(cfg: &Config) -> Result<Option<u64>> {
    if !enabled(cfg) {
        return Ok(None);
    }
    let host = exec::blocking(|| Ok(limit::HostBounds::read())).await?;
    let limit = limit::effective(cfg.node.max_volumes_per_node, host.volumes());
    tracing::debug!(?host, limit, "local attach: volumes per node");
    Ok(Some(limit))
}

/// Live snapshots holding one slot's file system frozen: the first freezes it, the last thaws
/// it, so that concurrent snapshots never thaw each other's freeze (FIFREEZE of a frozen file
/// system fails).
#[derive(Debug, Default)]
struct SlotFreeze {
    /// Freezes not yet thawed (`freeze_filesystems` calls that froze it or tried to).
    holders: u32,
    /// Whether it is frozen now (by this plugin).
    frozen: bool,
}

/// What a slot holds, read back from the host.
#[derive(Debug)]
enum State {
    /// No record: nothing is attached (leftovers of a teardown at most).
    Empty,
    /// A record but no loop device: an attach that a crash interrupted.
    Partial,
    /// Attached. `dead` says why I/O through the loop device fails; None when it works.
    Attached {
        rec: Record,
        loop_name: String,
        dead: Option<String>,
    },
    /// Attached, but its storage daemon does not answer the kernel (stopped, or stuck on its
    /// disk): whatever touches the volume would hang, so nothing does until it answers.
    NotAnswering {
        rec: Record,
        loop_name: String,
        reason: String,
    },
}

impl State {
    /// UNAVAILABLE naming the volume, when its daemon does not answer.
    fn refuse_hung(&self, what: &str) -> Result<()> {
        match self {
            State::NotAnswering { rec, reason, .. } => Err(Error::Unavailable(format!(
                "volume {} cannot {what} now: {reason}; retry once its storage daemon answers \
                 (see the volume's condition in ControllerGetVolume)",
                rec.volume_id
            ))),
            _ => Ok(()),
        }
    }
}

/// Why the attachment's I/O fails, or None when the loop device reads through the slot's live
/// daemon: the daemon is alive (pidfd + command line), its FUSE export is mounted, and the
/// loop device's open file is on that very mount (device numbers, not paths). Err when the
/// daemon does not answer the loop device's status in time (see `probe`). Blocking, bounded.
fn dead_reason(
    sysfs: &Sysfs,
    probes: &probe::Probes,
    wait: std::time::Duration,
    slot: &Slot,
    export: &Path,
    loop_name: &str,
    table: &MountTable,
) -> std::result::Result<Option<String>, String> {
    let Some(d) = daemon::find(slot) else {
        return Ok(Some(format!(
            "its storage daemon is gone (pid file {}), so /dev/{loop_name} fails every I/O",
            slot.pid_path().display()
        )));
    };
    let Some(m) = table.at(export).filter(|m| m.fs_type.starts_with("fuse")) else {
        return Ok(Some(format!(
            "the FUSE export {} behind /dev/{loop_name} is not mounted",
            export.display()
        )));
    };
    let (s, n) = (sysfs.clone(), loop_name.to_string());
    let status = probes
        .run(&slot.key, wait, move || s.loop_backing_identity(&n))
        .map_err(|why| {
            format!(
                "storage daemon not answering (pid {}): the status of /dev/{loop_name}, which \
                 the kernel reads from its FUSE export, did not come ({why}); a stopped or \
                 hung daemon blocks every I/O of the volume",
                d.pid
            )
        })?;
    Ok(match status {
        Ok((dev, _)) if dev != m.dev() => Some(format!(
            "/dev/{loop_name} reads an export that is gone (device {}:{}), not the live one at \
             {} (device {}:{})",
            dev.0,
            dev.1,
            export.display(),
            m.major,
            m.minor
        )),
        Ok(_) => None,
        Err(e) => Some(format!("cannot read the status of /dev/{loop_name}: {e}")),
    })
}

impl LocalAttacher {
    /// Opens the state directory, prepares the daemons' cgroup, adopts the attachments a
    /// previous plugin left and cleans up what an interrupted attach left behind.
    pub(crate) async fn open(
        node_id: String,
        state_dir: PathBuf,
        placement: Option<Placement>,
        serves_first: bool,
    ) -> Result<Self> {
        let dir = state_dir.clone();
        exec::blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))
        })
        .await?;
        let me = LocalAttacher {
            node_id,
            state_dir,
            sysfs: Sysfs::host(),
            limit: 0,
            attaching: tokio::sync::Mutex::new(()),
            freezes: std::sync::Mutex::default(),
            probes: probe::Probes::default(),
            placement,
            serves_first,
        };
        me.report_placement().await?;
        me.recover().await?;
        Ok(me)
    }

    /// Says once, at start, whether the daemons will outlive the plugin here.
    async fn report_placement(&self) -> Result<()> {
        let Some(p) = self.placement.clone() else {
            tracing::warn!(
                "node.daemon_cgroup is empty: storage daemons stay in the plugin's cgroup and                  die when the plugin's task or container is stopped"
            );
            return Ok(());
        };
        let (targets, problems) = exec::blocking(move || p.prepare()).await?;
        for t in &targets {
            tracing::debug!(hierarchy = %t.hierarchy, cgroup = %t.dir.display(), "storage daemon cgroup ready");
        }
        if !problems.is_empty() {
            tracing::warn!(
                problems = %problems.join("; "),
                "storage daemons cannot leave the plugin's cgroup in every hierarchy: where they                  stay, stopping the plugin's task or container stops them too (see README,                  'Attached volumes survive the plugin')"
            );
        }
        if !crate::nodeid::in_initial_pid_namespace() {
            tracing::warn!(
                "the plugin runs in its own PID namespace: the storage daemons die when that                  namespace's init exits; run it with the host's PID namespace (hostPID: true)"
            );
        }
        Ok(())
    }

    async fn recover(&self) -> Result<()> {
        let dir = self.state_dir.clone();
        for slot in exec::blocking(move || slot::list(&dir)).await? {
            fsfreeze::thaw_left(&slot).await;
            match self.inspect(&slot).await? {
                State::Attached {
                    rec,
                    loop_name,
                    dead: None,
                } => self.adopt(&slot, &rec, &loop_name).await,
                State::Attached {
                    dead: Some(reason),
                    loop_name,
                    ..
                } => {
                    tracing::warn!(slot = %slot.key, device = %loop_name, %reason,
                        "a local attachment is dead; it is attached afresh at the next publish                          once nothing uses it");
                }
                State::NotAnswering { reason, .. } => {
                    tracing::warn!(slot = %slot.key, %reason,
                        "a local attachment's storage daemon does not answer; left as it is");
                }
                State::Empty | State::Partial => {
                    tracing::info!(slot = %slot.key, "cleaning up an interrupted local attach");
                    // Never fail startup over it: a detach or attach retries the cleanup.
                    if let Err(e) = self.teardown(&slot).await {
                        tracing::warn!(slot = %slot.key, error = %e, "cleanup failed");
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes over a live attachment a previous plugin made: confirms through QMP that the
    /// daemon serves this slot's image (or a live snapshot's overlay on it: then the record
    /// follows), deletes overlay nodes an interrupted snapshot left, and moves the daemon out
    /// of the plugin's cgroups if an older plugin left it there.
    async fn adopt(&self, slot: &Slot, rec: &Record, loop_name: &str) {
        let s = slot.clone();
        let Ok(Some(d)) = exec::blocking(move || Ok(daemon::find(&s))).await else {
            return;
        };
        match daemon::confirm(slot, rec, &d).await {
            Ok(Ok(active)) => {
                snapshot::record_image(slot, rec, &active).await;
                if let Err(e) = snapshot::drop_unswitched(slot, &active).await {
                    tracing::warn!(slot = %slot.key, error = %e,
                        "cannot delete the overlay nodes of an interrupted snapshot");
                }
            }
            Ok(Err(mismatch)) => {
                tracing::warn!(slot = %slot.key, %mismatch, "storage daemon does not serve what its slot records");
                return;
            }
            Err(e) => {
                tracing::warn!(slot = %slot.key, pid = d.pid, error = %e, "storage daemon does not answer QMP");
                return;
            }
        }
        self.place(slot, d.pid, true).await;
        tracing::info!(volume = %rec.volume_id, pid = d.pid, device = %loop_name, "adopted a storage daemon left by a previous plugin");
    }

    /// Checks that daemon `pid` is in the daemons' cgroups (moving it there when `move_it`);
    /// warns where it is not: there it dies with the plugin.
    async fn place(&self, slot: &Slot, pid: i32, move_it: bool) {
        let Some(p) = self.placement.clone() else {
            return;
        };
        let res = exec::blocking(move || {
            let (targets, _) = p.prepare()?;
            let mut missing = cgroup::missing(&targets, pid);
            if move_it && !missing.is_empty() {
                cgroup::move_pid(&targets, pid);
                missing = cgroup::missing(&targets, pid);
            }
            Ok(missing)
        })
        .await;
        match res {
            Ok(missing) if missing.is_empty() => {}
            Ok(missing) => tracing::warn!(slot = %slot.key, pid, cgroups = %missing.join(", "),
                "storage daemon is not in its cgroup here: it dies with the plugin's cgroup"),
            Err(e) => {
                tracing::warn!(slot = %slot.key, pid, error = %e, "cannot check the storage daemon's cgroups")
            }
        }
    }

    /// What the slot holds now.
    async fn inspect(&self, slot: &Slot) -> Result<State> {
        let mut all = self.inspect_all(vec![slot.clone()]).await?;
        Ok(all.pop().map_or(State::Empty, |(_, st)| st))
    }

    /// What each slot holds now; the loop devices and the mount table are read once.
    async fn inspect_all(&self, slots: Vec<Slot>) -> Result<Vec<(Slot, State)>> {
        let (sysfs, probes) = (self.sysfs.clone(), self.probes.clone());
        exec::blocking(move || {
            let loops = sysfs.loop_devices()?;
            // One bound for all the slots' probes (a healthy one answers in microseconds), so
            // several hung daemons do not add up.
            let deadline = Instant::now() + probe::PROBE_TIMEOUT;
            let mut table: Option<MountTable> = None;
            let mut out = Vec::with_capacity(slots.len());
            for s in slots {
                let Some(rec) = s.read_record()? else {
                    out.push((s, State::Empty));
                    continue;
                };
                let export = s.export_path(&rec.serial);
                let Some(loop_name) = loops
                    .iter()
                    .find(|(_, backing)| *backing == export)
                    .map(|(name, _)| name.clone())
                else {
                    out.push((s, State::Partial));
                    continue;
                };
                let t = match table.take() {
                    Some(t) => t,
                    None => MountTable::read()?,
                };
                let wait = deadline
                    .saturating_duration_since(Instant::now())
                    .max(probe::PROBE_MIN_WAIT);
                let health = dead_reason(&sysfs, &probes, wait, &s, &export, &loop_name, &t);
                table = Some(t);
                let st = match health {
                    Ok(dead) => State::Attached {
                        rec,
                        loop_name,
                        dead,
                    },
                    Err(reason) => State::NotAnswering {
                        rec,
                        loop_name,
                        reason,
                    },
                };
                out.push((s, st));
            }
            Ok(out)
        })
        .await
    }

    fn attachment(&self, rec: &Record, loop_name: &str, dead: Option<String>) -> Attachment {
        let mut context = BTreeMap::new();
        context.insert(CTX_BUS.to_string(), BUS_LOCAL.to_string());
        context.insert(
            CTX_DEVICE.to_string(),
            self.sysfs.dev_path(loop_name).display().to_string(),
        );
        Attachment {
            node_id: self.node_id.clone(),
            volume_id: rec.volume_id.clone(),
            serial: rec.serial.clone(),
            // Placeholder: the context's `bus=local` is what the node reads.
            bus: Bus::default(),
            readonly: rec.readonly,
            shareable: rec.shareable,
            context,
            abnormal: dead.map(|reason| format!("local attachment on {}: {reason}", self.node_id)),
        }
    }

    /// Who uses the loop device (mounts, bind mounts, an exclusive opener).
    async fn users(&self, loop_name: &str) -> Result<Vec<String>> {
        let (sysfs, n) = (self.sysfs.clone(), loop_name.to_string());
        exec::blocking(move || loopdev::users(&sysfs, &n)).await
    }

    /// Takes a slot apart in dependency order: loop devices (refused while the volume is in
    /// use here), the daemon, a FUSE mount a killed daemon left, then the files.
    async fn teardown(&self, slot: &Slot) -> Result<()> {
        let (s, sysfs) = (slot.clone(), self.sysfs.clone());
        let loops: Vec<(String, PathBuf)> = exec::blocking(move || {
            Ok(sysfs
                .loop_devices()?
                .into_iter()
                .filter(|(_, backing)| backing.starts_with(&s.dir))
                .collect())
        })
        .await?;
        for (name, backing) in &loops {
            let users = self.users(name).await?;
            if !users.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume is still in use on this host: /dev/{name} is used by {}; \
                     NodeUnpublishVolume and NodeUnstageVolume it first",
                    users.join(", ")
                )));
            }
            loopdev::detach(&self.sysfs, name, backing).await?;
            crate::failpoint!("localattach.loop-detached");
            tracing::info!(device = %name, slot = %slot.key, "loop device detached");
        }
        daemon::stop(slot).await?;
        let s = slot.clone();
        exec::blocking(move || {
            let table = MountTable::read()?;
            for m in table.under(&s.dir) {
                tracing::warn!(mount = %m.mount_point.display(), "detaching a leftover FUSE export");
                nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH).map_err(
                    |e| Error::sys(format!("unmounting {}", m.mount_point.display()), e),
                )?;
            }
            match std::fs::remove_dir_all(&s.dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(format!("removing {}", s.dir.display()), e)),
            }
        })
        .await
    }

    /// Why the slot's live daemon cannot be trusted with the attachment (QMP: another process
    /// answers, another image, no export), or None when it serves `rec`.
    async fn unconfirmed(&self, slot: &Slot, rec: &Record) -> Result<Option<String>> {
        let s = slot.clone();
        let Some(d) = exec::blocking(move || Ok(daemon::find(&s))).await? else {
            return Ok(Some("its storage daemon is gone".into()));
        };
        match daemon::confirm(slot, rec, &d).await {
            Ok(found) => Ok(found.err()),
            Err(e) => Ok(Some(format!(
                "its storage daemon (pid {}) does not answer QMP: {e}",
                d.pid
            ))),
        }
    }

    fn check_node(&self, node_id: &str) -> Result<()> {
        if node_id == self.node_id {
            Ok(())
        } else {
            Err(Error::NotFound(format!(
                "node {node_id} is not this host ({})",
                self.node_id
            )))
        }
    }

    /// Attaches `rec` in an empty slot: record, daemon (in its own cgroups), loop device.
    async fn start(&self, slot: &Slot, rec: &Record) -> Result<String> {
        let (s, r) = (slot.clone(), rec.clone());
        let placement = self.placement.clone();
        let procs = exec::blocking(move || {
            for dev in ["/dev/fuse", "/dev/loop-control"] {
                if !Path::new(dev).exists() {
                    return Err(Error::Unavailable(format!(
                        "local attach needs {dev}; load the fuse and loop kernel modules"
                    )));
                }
            }
            s.check_paths()?;
            std::fs::create_dir_all(&s.dir)
                .map_err(|e| Error::io(format!("creating {}", s.dir.display()), e))?;
            crate::fsutil::write_json(&s.record_path(), &r)?;
            let export = s.export_path(&r.serial);
            std::fs::write(&export, b"")
                .map_err(|e| Error::io(format!("creating {}", export.display()), e))?;
            let Some(p) = placement else {
                return Ok(Vec::new());
            };
            let (targets, _) = p.prepare()?;
            Ok(cgroup::open_procs(&targets).0)
        })
        .await?;
        crate::failpoint!("localattach.recorded");
        daemon::start(slot, rec, &procs).await?;
        drop(procs);
        crate::failpoint!("localattach.daemon-started");
        let s = slot.clone();
        if let Some(d) = exec::blocking(move || Ok(daemon::find(&s))).await? {
            self.place(slot, d.pid, false).await;
        }
        let export = slot.export_path(&rec.serial);
        let name = loopdev::attach(&export, rec.readonly, rec.logical_block_size).await?;
        crate::failpoint!("localattach.loop-attached");
        // Confirm through sysfs, the way the node will look for it.
        let (sysfs, n) = (self.sysfs.clone(), name.clone());
        let backing = exec::blocking(move || Ok(sysfs.loop_backing_file(&n))).await?;
        if backing.as_deref() != Some(export.as_path()) {
            return Err(Error::internal(format!(
                "/dev/{name} is not backed by {} after losetup",
                export.display()
            )));
        }
        Ok(name)
    }

    /// The live, read-write attachment in `slot` (its record and loop device); None when
    /// nothing is attached. FAILED_PRECONDITION when it is dead or read-only: then the volume
    /// cannot `what` (e.g. "grow online").
    async fn writable(
        &self,
        slot: &Slot,
        volume_id: &VolumeId,
        what: &str,
    ) -> Result<Option<(Record, String)>> {
        let st = self.inspect(slot).await?;
        st.refuse_hung(what)?;
        let State::Attached {
            rec,
            loop_name,
            dead,
        } = st
        else {
            return Ok(None);
        };
        if let Some(reason) = dead {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} cannot {what}: its attachment on this host is dead \
                 ({reason}); unpublish it on this node and publish it again"
            )));
        }
        if rec.readonly {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} cannot {what}: it is attached read-only to this host; \
                 unpublish it first"
            )));
        }
        Ok(Some((rec, loop_name)))
    }

    /// The slots of `members` attached here read-write and alive whose file system is mounted
    /// on this host, with one mount point each (never another volume's: a snapshot freezes
    /// only what it cuts). A member whose daemon does not answer is left out (its freeze would
    /// hang; its cut is refused).
    async fn mounted_members(&self, members: &[VolumeId]) -> Result<Vec<(Slot, PathBuf)>> {
        let slots: Vec<Slot> = members
            .iter()
            .map(|v| Slot::new(&self.state_dir, v.key()))
            .collect();
        let live: Vec<(Slot, String)> = self
            .inspect_all(slots)
            .await?
            .into_iter()
            .filter_map(|(slot, st)| match st {
                State::Attached {
                    rec,
                    loop_name,
                    dead: None,
                } if !rec.readonly => Some((slot, loop_name)),
                _ => None,
            })
            .collect();
        let sysfs = self.sysfs.clone();
        exec::blocking(move || {
            let mut out = Vec::new();
            let mut table = None;
            for (slot, loop_name) in live {
                if let Some(mount) = fsfreeze::mount_of(&sysfs, &loop_name, &mut table)? {
                    out.push((slot, mount));
                }
            }
            Ok(out)
        })
        .await
    }

    /// The freeze state of slot `key`.
    fn slot_freeze(&self, key: &str) -> Arc<tokio::sync::Mutex<SlotFreeze>> {
        let mut all = self.freezes.lock().unwrap_or_else(|e| e.into_inner());
        all.entry(key.to_string()).or_default().clone()
    }

    /// Holds the file system of `slot` at `mount` frozen for one more snapshot (freezing it
    /// when it is the first and `freeze`, bounded by `fsfreeze`); whether it is frozen now.
    async fn hold_frozen(&self, slot: &Slot, mount: &Path, freeze: bool) -> bool {
        let cell = self.slot_freeze(&slot.key);
        let mut st = cell.lock().await;
        st.holders += 1;
        if st.holders == 1 && freeze {
            // Thawed through its marker by `release_frozen`.
            st.frozen = fsfreeze::freeze(slot, mount).await.is_some();
        }
        st.frozen
    }

    /// Gives one snapshot's hold on the file system of `slot` up; the last thaws it. With
    /// `keep_hold`, only undoes a freeze this snapshot alone holds (its caller releases the
    /// hold later).
    async fn release_frozen(&self, slot: &Slot, keep_hold: bool) -> Result<()> {
        let cell = self.slot_freeze(&slot.key);
        let mut st = cell.lock().await;
        let last = if keep_hold {
            st.holders <= 1
        } else {
            st.holders = st.holders.saturating_sub(1);
            st.holders == 0
        };
        // A freeze given up (not `frozen`) is thawed by `fsfreeze` once it completes: a thaw
        // here would wait for it.
        if last && st.frozen {
            fsfreeze::thaw_marked(slot).await?;
            st.frozen = false;
        }
        Ok(())
    }

    /// Attaches `rec` afresh (slot torn down first), cleaning up when that fails.
    async fn attach_fresh(&self, slot: &Slot, rec: &Record) -> Result<String> {
        self.teardown(slot).await?;
        match self.start(slot, rec).await {
            Ok(name) => Ok(name),
            Err(e) => {
                if let Err(t) = self.teardown(slot).await {
                    tracing::warn!(volume = %rec.volume_id, error = %t, "cleanup after a failed local attach failed");
                }
                Err(e)
            }
        }
    }

    /// A dead attachment: attached afresh when nothing uses its loop device; otherwise an
    /// error that says what to do (a loop device's backing file cannot be swapped under a
    /// read-write user).
    async fn repair(
        &self,
        slot: &Slot,
        had: &Record,
        rec: &Record,
        loop_name: &str,
        reason: &str,
    ) -> Result<String> {
        let users = self.users(loop_name).await?;
        if !users.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is attached to this host but the attachment is dead: {reason}; \
                 /dev/{loop_name} is still used by {}: NodeUnpublishVolume and NodeUnstageVolume \
                 it on this node (stop the workload that uses it), then publish it again",
                had.volume_id,
                users.join(", ")
            )));
        }
        tracing::warn!(volume = %rec.volume_id, device = %loop_name, %reason, "dead local attachment unused: attaching it afresh");
        let name = self.attach_fresh(slot, rec).await?;
        tracing::info!(volume = %rec.volume_id, device = %name, "dead local attachment repaired");
        Ok(name)
    }
}

#[async_trait::async_trait]
impl Attacher for LocalAttacher {
    async fn serves(&self, node_id: &str) -> Result<bool> {
        Ok(node_id == self.node_id)
    }

    fn serves_first(&self) -> bool {
        self.serves_first
    }

    async fn attachments(&self) -> Result<Vec<Attachment>> {
        let dir = self.state_dir.clone();
        let slots = exec::blocking(move || slot::list(&dir)).await?;
        let mut out = Vec::new();
        for (_, st) in self.inspect_all(slots).await? {
            match st {
                State::Attached {
                    rec,
                    loop_name,
                    dead,
                } => out.push(self.attachment(&rec, &loop_name, dead)),
                State::NotAnswering {
                    rec,
                    loop_name,
                    reason,
                } => out.push(self.attachment(&rec, &loop_name, Some(reason))),
                State::Empty | State::Partial => {}
            }
        }
        Ok(out)
    }

    async fn attach(&self, node_id: &str, spec: &DiskSpec, max: u64) -> Result<Attachment> {
        self.check_node(node_id)?;
        let started = Instant::now();
        let slot = Slot::new(&self.state_dir, spec.volume_id.key());
        let rec = Record {
            volume_id: spec.volume_id.to_string(),
            serial: slot.serial(),
            image: spec.image.clone(),
            format: spec.format,
            readonly: spec.readonly,
            shareable: spec.shareable,
            discard: spec.options.discard == Some(Discard::Unmap),
            logical_block_size: spec.options.logical_block_size,
        };
        let st = self.inspect(&slot).await?;
        st.refuse_hung("be published")?;
        if let State::Attached {
            rec: had,
            loop_name,
            dead,
        } = st
        {
            // Alive by the host's state; the daemon must also say it serves this image.
            let dead = match dead {
                Some(reason) => Some(reason),
                None => self.unconfirmed(&slot, &had).await?,
            };
            let Some(reason) = dead else {
                return Ok(self.attachment(&had, &loop_name, None));
            };
            // Nothing may use the dead device for a repair: the request's settings apply.
            let name = self.repair(&slot, &had, &rec, &loop_name, &reason).await?;
            crate::metrics::observe_attach(LOCAL_HOST, started.elapsed());
            return Ok(self.attachment(&rec, &name, None));
        }
        let _counted = self.attaching.lock().await;
        let max = match (max, self.limit) {
            (0, l) | (l, 0) => l,
            (m, l) => m.min(l),
        };
        if max > 0 && self.attachments().await?.len() as u64 >= max {
            return Err(Error::ResourceExhausted(format!(
                "this host already has {max} volumes attached locally, its limit \
                 (max_volumes_per_node, reported by NodeGetInfo); unpublish one first"
            )));
        }
        let name = self.attach_fresh(&slot, &rec).await?;
        crate::metrics::observe_attach(LOCAL_HOST, started.elapsed());
        tracing::info!(volume = %spec.volume_id, device = %name, readonly = rec.readonly, "volume attached locally");
        Ok(self.attachment(&rec, &name, None))
    }

    async fn detach(&self, node_id: &str, volume_id: &VolumeId) -> Result<()> {
        self.check_node(node_id)?;
        let started = Instant::now();
        let slot = Slot::new(&self.state_dir, volume_id.key());
        let dir = slot.dir.clone();
        let attached = exec::blocking(move || Ok(dir.exists())).await?;
        if attached {
            // Detaching a loop device whose daemon does not answer would hang.
            self.inspect(&slot).await?.refuse_hung("be detached")?;
        }
        self.teardown(&slot).await?;
        if attached {
            crate::metrics::observe_detach(LOCAL_HOST, started.elapsed());
        }
        Ok(())
    }

    async fn resize(&self, node_id: &str, volume_id: &VolumeId, size: u64) -> Result<()> {
        self.check_node(node_id)?;
        let slot = Slot::new(&self.state_dir, volume_id.key());
        let Some((_, name)) = self.writable(&slot, volume_id, "grow online").await? else {
            return Err(Error::NotFound(format!(
                "volume {volume_id} is not attached to this host"
            )));
        };
        // The export's node: a live snapshot moved it onto its overlay.
        let active = qmp::served(&slot.qmp_path())
            .await?
            .active()
            .map_err(|why| {
                Error::FailedPrecondition(format!(
                    "volume {volume_id} cannot grow online: its storage daemon: {why}"
                ))
            })?;
        qmp::execute(
            &slot.qmp_path(),
            "block_resize",
            serde_json::json!({"node-name": daemon::format_node(active.layer), "size": size}),
        )
        .await?;
        // The kernel caches the FUSE file's size for a second (the export's attribute
        // timeout): refresh until the loop device sees the new size.
        let start = std::time::Instant::now();
        loop {
            loopdev::refresh_capacity(&self.sysfs, &name).await?;
            let (sysfs, n) = (self.sysfs.clone(), name.clone());
            let now = exec::blocking(move || Ok(sysfs.device(&n)))
                .await?
                .map(|d| d.size_bytes)
                .unwrap_or(0);
            if now >= size {
                break;
            }
            if start.elapsed() > std::time::Duration::from_secs(10) {
                return Err(Error::internal(format!(
                    "/dev/{name} is {now} bytes after growing the image to {size}"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        tracing::info!(volume = %volume_id, device = %name, size, "locally attached volume grown");
        Ok(())
    }

    /// Each member in its own storage daemon (see `snapshot`), in parallel. Several members
    /// are cut at one point only while their file systems are frozen (`freeze_filesystems`):
    /// each daemon switches on its own, there is no transaction across them.
    async fn snapshot_live(&self, node_id: &str, members: &[LiveMember]) -> Result<()> {
        self.check_node(node_id)?;
        let started = Instant::now();
        let mut work = Vec::with_capacity(members.len());
        for m in members {
            let slot = Slot::new(&self.state_dir, m.volume_id.key());
            let Some((rec, _)) = self.writable(&slot, &m.volume_id, "snapshot live").await? else {
                return Err(Error::Aborted(format!(
                    "volume {} was detached from this host meanwhile; retry",
                    m.volume_id
                )));
            };
            work.push((slot, rec, m.overlay.clone()));
        }
        if work.len() > 1 {
            let mut loose = Vec::new();
            for (slot, rec, _) in &work {
                if !self.slot_freeze(&slot.key).lock().await.frozen {
                    loose.push(rec.volume_id.as_str());
                }
            }
            if !loose.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volumes {} are attached to this host without a file system frozen here \
                     (block volumes, not staged, or the freeze failed): each locally attached \
                     volume has its own storage daemon, so several are cut at one point of \
                     their writes only while their file systems are frozen; snapshot them one \
                     at a time",
                    loose.join(", ")
                )));
            }
        }
        let results = futures_util::future::join_all(
            work.iter()
                .map(|(slot, rec, overlay)| snapshot::switch(slot, rec, overlay)),
        )
        .await;
        let failed: Vec<(&str, Error)> = work
            .iter()
            .zip(results)
            .filter_map(|((_, rec, _), r)| r.err().map(|e| (rec.volume_id.as_str(), e)))
            .collect();
        let switched = work.len() - failed.len();
        let mut failed = failed.into_iter();
        match failed.next() {
            None => {
                tracing::info!(node = %node_id, volumes = work.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "live snapshot: the storage daemons write to the new overlays");
                Ok(())
            }
            // Nothing switched and every outcome known: the caller deletes the overlays.
            Some((_, e)) if switched == 0 && !outcome_unknown(&e) && failed.len() == 0 => Err(e),
            Some((volume, e)) => Err(Error::Unavailable(format!(
                "the live snapshot switched {switched} of {} volumes on this host; volume \
                 {volume} failed ({e}); each volume is reconciled from its image locks when \
                 it is next used",
                work.len()
            ))),
        }
    }

    fn freezer(&self) -> &'static str {
        "fsfreeze on this host"
    }

    /// Whether a file system of one of `members` (attached read-write here) is mounted on this
    /// host: then `freeze_filesystems` has something to freeze (the host plays the guest
    /// agent, for the members only).
    async fn guest_agent(&self, node_id: &str, members: &[VolumeId]) -> Result<bool> {
        self.check_node(node_id)?;
        Ok(!self.mounted_members(members).await?.is_empty())
    }

    /// Freezes the file systems of `members` mounted on this host, and only theirs (the other
    /// volumes' workloads never stall for this snapshot), in parallel, each bounded (`fsfreeze`,
    /// a marker per slot). Their dirty data is written out first: when one does not finish in
    /// time, none is frozen; when one cannot be frozen in time, the others are thawed at once.
    /// Either way the snapshot is crash-consistent, and nothing stays frozen waiting for a
    /// member whose daemon hangs.
    async fn freeze_filesystems(&self, node_id: &str, members: &[VolumeId]) -> Result<FsFreeze> {
        self.check_node(node_id)?;
        let mounted = self.mounted_members(members).await?;
        if mounted.is_empty() {
            return Ok(FsFreeze::NoAgent);
        }
        // Every slot is held from here on: the caller thaws after any outcome but NoAgent.
        // Nothing is frozen unless every member wrote its dirty data out in time.
        let started = Instant::now();
        let synced =
            futures_util::future::join_all(mounted.iter().map(|(_, m)| fsfreeze::sync(m))).await;
        let freeze = synced.iter().all(|s| *s);
        let frozen = futures_util::future::join_all(
            mounted
                .iter()
                .map(|(slot, mount)| self.hold_frozen(slot, mount, freeze)),
        )
        .await;
        let mounts = |want: bool| -> Vec<String> {
            mounted
                .iter()
                .zip(&frozen)
                .filter(|(_, f)| **f == want)
                .map(|((_, m), _)| m.display().to_string())
                .collect()
        };
        let (done, failed) = (mounts(true), mounts(false));
        if failed.is_empty() {
            tracing::info!(node = %node_id, filesystems = ?done,
                ms = started.elapsed().as_millis() as u64,
                "file systems of the snapshot's volumes frozen");
            return Ok(FsFreeze::Frozen(done.len() as u32));
        }
        // Give the whole freeze up at once: what froze is thawed now, not after the cut.
        for ((slot, _), f) in mounted.iter().zip(&frozen) {
            if *f {
                if let Err(e) = self.release_frozen(slot, true).await {
                    tracing::warn!(slot = %slot.key, error = %e, "cannot thaw a file system");
                }
            }
        }
        tracing::warn!(node = %node_id, not_frozen = ?failed, thawed = ?done,
            ms = started.elapsed().as_millis() as u64,
            "file systems of the snapshot's volumes could not all be frozen; none stays frozen \
             (those frozen are thawed at once)");
        Err(Error::internal(format!(
            "{} of {} file systems of the snapshot's volumes could not be frozen: {}",
            failed.len(),
            mounted.len(),
            failed.join(", ")
        )))
    }

    /// Thaws what `freeze_filesystems` froze for `members`, each once its last holder is
    /// done; no members (a restart), everything a marker names.
    async fn thaw_filesystems(&self, node_id: &str, members: &[VolumeId]) -> Result<()> {
        self.check_node(node_id)?;
        let mut first_err = None;
        if members.is_empty() {
            let dir = self.state_dir.clone();
            for slot in exec::blocking(move || slot::list(&dir)).await? {
                if let Err(e) = fsfreeze::thaw_marked(&slot).await {
                    first_err.get_or_insert(e);
                }
            }
        }
        for v in members {
            let slot = Slot::new(&self.state_dir, v.key());
            if let Err(e) = self.release_frozen(&slot, false).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn set_qos(&self, node_id: &str, volume_id: &VolumeId, qos: &Qos) -> Result<()> {
        self.check_node(node_id)?;
        if !qos.is_empty() {
            tracing::warn!(volume = %volume_id, "local attach does not enforce QoS limits; they apply when the volume is attached to a VM");
        }
        Ok(())
    }

    /// Only the state directory: a host without FUSE or loop support (e.g. a monolith inside
    /// a guest that attaches through libvirt) stays healthy; an attach here says what is missing.
    async fn check_health(&self) -> Result<()> {
        let dir = self.state_dir.clone();
        exec::blocking(move || {
            if dir.is_dir() {
                Ok(())
            } else {
                Err(Error::Unavailable(format!(
                    "local attach state directory {} is missing",
                    dir.display()
                )))
            }
        })
        .await
    }
}
