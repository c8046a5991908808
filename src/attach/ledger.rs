//! What a backend that can be unreachable (libvirt: libvirtd restarts, a remote host is down)
//! may hold, kept durably in the pools, so that an RPC about a volume that backend does not
//! hold never needs it. The backend's own state stays the truth: the ledger is only ever
//! consulted while the backend cannot be asked, and every full read of the backend brings the
//! ledger back in line with it.
//!
//! One file per volume that may be attached through the backend,
//! `<pool>/attach-ledger/<backend>/<volume id>` in the volume's pool, lists the nodes (JSON).
//! It is written (durably) BEFORE an attach starts and removed only after a detach was
//! confirmed, so it never misses an attachment this plugin made: it may only claim too much,
//! which costs availability during an outage, never correctness. Living in the pool, it is
//! shared by every controller process that shares the pool (Nomad runs several): each sees
//! the attachments the others made, also while a host cannot be read. Every change of a
//! ledger directory is made under its lock (`flock` on `.lock`, which NFS clients implement
//! as a whole-file fcntl lock), so processes never lose each other's updates; `.lock` also
//! holds the directory's attach count, which stamps each attach's entry, so that a full read
//! of the backend leaves alone the entries of attaches recorded after it began. A ledger
//! directory starts when `init` first runs there: the volumes that exist then are entered with
//! unknown nodes, until a full read of the backend tells where they are.

use crate::attach::Attachment;
use crate::error::{Error, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Marks a ledger directory that `init` completed.
const READY: &str = ".ready";
/// Taken (flock, exclusive) around every change of a ledger directory; holds the count of
/// attaches recorded there (decimal).
const LOCK: &str = ".lock";

/// One volume's entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Nodes the volume may be attached to through the backend.
    #[serde(default)]
    pub(crate) nodes: BTreeSet<String>,
    /// The volume existed before the ledger did: where it is attached is unknown.
    #[serde(default)]
    pub(crate) unknown: bool,
    /// The directory's attach count when an attach last recorded itself here: a full read of
    /// the backend that began before cannot judge the entry (that attach may be in flight).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) stamp: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The ledger of one backend: a directory in each pool.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    /// Pool name → its ledger directory for this backend.
    dirs: Arc<BTreeMap<String, PathBuf>>,
}

/// Volume ids are validated before they reach here; a file name must still never climb.
fn file_of(dir: &Path, volume_id: &str) -> Result<PathBuf> {
    if volume_id.is_empty()
        || volume_id.starts_with('.')
        || volume_id.contains('/')
        || volume_id.contains('\0')
    {
        return Err(Error::internal(format!(
            "volume id {volume_id:?} cannot name a ledger entry"
        )));
    }
    Ok(dir.join(volume_id))
}

/// The pool of a volume id (`<pool>.<key>`).
fn pool_of(volume_id: &str) -> &str {
    volume_id.split_once('.').map_or("", |(pool, _)| pool)
}

/// The lock of a ledger directory (created if missing), held until dropped. Blocking.
fn lock(dir: &Path) -> Result<Flock<File>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
        Error::io(
            format!("locking {}", path.display()),
            std::io::Error::from(errno),
        )
    })
}

/// The attach count of a locked ledger directory.
fn count(lock: &File, dir: &Path) -> Result<u64> {
    use std::io::Read;
    let mut text = String::new();
    (&*lock)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(format!("reading {}", dir.join(LOCK).display()), e))?;
    Ok(text.trim().parse().unwrap_or(0))
}

/// Sets the attach count of a locked ledger directory. Not synced: it only has to grow while
/// the processes that read it live.
fn set_count(lock: &File, dir: &Path, n: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    lock.set_len(0)
        .and_then(|()| lock.write_all_at(n.to_string().as_bytes(), 0))
        .map_err(|e| Error::io(format!("writing {}", dir.join(LOCK).display()), e))
}

fn read(dir: &Path, volume_id: &str) -> Result<Option<Entry>> {
    crate::fsutil::read_json(&file_of(dir, volume_id)?)
}

fn write(dir: &Path, volume_id: &str, e: &Entry) -> Result<()> {
    let path = file_of(dir, volume_id)?;
    if e.nodes.is_empty() && !e.unknown {
        crate::fsutil::remove_durable(&path)
    } else {
        crate::fsutil::write_json(&path, e)
    }
}

/// Every entry of one ledger directory.
fn entries_of(dir: &Path) -> Result<BTreeMap<String, Entry>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = BTreeMap::new();
    for ent in rd.filter_map(|e| e.ok()) {
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if let Some(e) = read(dir, &name)? {
            out.insert(name, e);
        }
    }
    Ok(out)
}

impl Ledger {
    /// The ledger in `<pool dir>/attach-ledger/<name>` of each pool (name, directory).
    pub(crate) fn new(name: &str, pools: &[(String, PathBuf)]) -> Ledger {
        let dirs = pools
            .iter()
            .map(|(pool, dir)| (pool.clone(), dir.join("attach-ledger").join(name)))
            .collect();
        Ledger {
            dirs: Arc::new(dirs),
        }
    }

    /// The directory holding a volume's entry.
    fn dir_of(&self, volume_id: &str) -> Result<&Path> {
        self.dirs
            .get(pool_of(volume_id))
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                Error::internal(format!(
                    "volume {volume_id} is not of a configured pool; it has no attach ledger"
                ))
            })
    }

    /// The ledger can answer (`init` has run in every pool). Blocking.
    pub(crate) fn ready(&self) -> bool {
        self.dirs.values().all(|d| d.join(READY).exists())
    }

    /// Starts the ledger of each pool once: `existing` volumes (all the pools hold now) are
    /// entered with unknown nodes, since the backend may hold them from before. Idempotent.
    /// Blocking.
    pub(crate) fn init(&self, existing: &[String]) -> Result<()> {
        for (pool, dir) in self.dirs.iter() {
            if dir.join(READY).exists() {
                continue;
            }
            let _lock = lock(dir)?;
            if dir.join(READY).exists() {
                continue;
            }
            for v in existing.iter().filter(|v| pool_of(v) == pool) {
                let mut e = read(dir, v)?.unwrap_or_default();
                if !e.unknown {
                    e.unknown = true;
                    write(dir, v, &e)?;
                }
            }
            crate::fsutil::write_atomic(&dir.join(READY), b"")?;
        }
        Ok(())
    }

    /// Before an attach: the volume may be on `node` from now on. Blocking.
    pub(crate) fn add(&self, volume_id: &str, node: &str) -> Result<()> {
        let dir = self.dir_of(volume_id)?;
        let lock = lock(dir)?;
        let stamp = count(&lock, dir)? + 1;
        set_count(&lock, dir, stamp)?;
        let mut e = read(dir, volume_id)?.unwrap_or_default();
        e.nodes.insert(node.to_string());
        e.stamp = stamp;
        write(dir, volume_id, &e)
    }

    /// After a confirmed detach: the volume is not on `node`. Blocking.
    pub(crate) fn remove(&self, volume_id: &str, node: &str) -> Result<()> {
        let dir = self.dir_of(volume_id)?;
        let _lock = lock(dir)?;
        let Some(mut e) = read(dir, volume_id)? else {
            return Ok(());
        };
        if e.nodes.remove(node) {
            write(dir, volume_id, &e)?;
        }
        Ok(())
    }

    /// Every entry of every pool, when the ledger is ready. Blocking.
    pub(crate) fn entries(&self) -> Result<Option<BTreeMap<String, Entry>>> {
        if !self.ready() {
            return Ok(None);
        }
        let mut all = BTreeMap::new();
        for dir in self.dirs.values() {
            all.extend(entries_of(dir)?);
        }
        Ok(Some(all))
    }

    /// Each pool's attach count now: taken before a full read of the backend, for
    /// `reconcile`. Blocking.
    pub(crate) fn marks(&self) -> Result<BTreeMap<String, u64>> {
        let mut marks = BTreeMap::new();
        for (pool, dir) in self.dirs.iter() {
            let lock = lock(dir)?;
            marks.insert(pool.clone(), count(&lock, dir)?);
        }
        Ok(marks)
    }

    /// Brings the ledger in line with a full read of the backend (`found`) that began at
    /// `marks` (see `marks`): what it found is entered; entries it did not find are dropped,
    /// unless an attach recorded itself since the read began (it may be in flight, here or in
    /// another process). Blocking.
    pub(crate) fn reconcile(
        &self,
        found: &[Attachment],
        marks: &BTreeMap<String, u64>,
    ) -> Result<()> {
        let mut want: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for a in found {
            want.entry(a.volume_id.as_str())
                .or_default()
                .insert(a.node_id.clone());
        }
        for (pool, dir) in self.dirs.iter() {
            let _lock = lock(dir)?;
            let have = entries_of(dir)?;
            let mark = marks.get(pool).copied().unwrap_or(0);
            let since = |now: &Entry| now.stamp > mark;
            for (volume, nodes) in want.iter().filter(|(v, _)| pool_of(v) == pool) {
                let had = have.get(*volume).cloned().unwrap_or_default();
                let mut next = Entry {
                    nodes: nodes.clone(),
                    unknown: false,
                    stamp: had.stamp,
                };
                if since(&had) {
                    next.nodes.extend(had.nodes.iter().cloned());
                }
                if next != had {
                    write(dir, volume, &next)?;
                }
            }
            for (volume, e) in have {
                if want.contains_key(volume.as_str()) || since(&e) {
                    continue;
                }
                tracing::debug!(volume = %volume, nodes = ?e.nodes, "ledger: not attached after all");
                write(dir, &volume, &Entry::default())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(volume: &str, node: &str) -> Attachment {
        Attachment {
            node_id: node.into(),
            volume_id: volume.into(),
            serial: String::new(),
            bus: Default::default(),
            readonly: false,
            shareable: false,
            context: BTreeMap::new(),
            abnormal: None,
        }
    }

    #[test]
    fn starts_pessimistic_records_attaches_and_follows_the_backend() {
        let t = tempfile::tempdir().unwrap();
        let pools = [
            ("p".to_string(), t.path().join("p")),
            ("q".to_string(), t.path().join("q")),
        ];
        let l = Ledger::new("libvirt", &pools);
        assert_eq!(l.entries().unwrap(), None, "not ready before init");
        l.init(&["p.old".into()]).unwrap();
        assert!(t.path().join("p/attach-ledger/libvirt/p.old").is_file());
        let e = l.entries().unwrap().unwrap();
        assert!(e["p.old"].unknown && e["p.old"].nodes.is_empty());
        // init again changes nothing.
        l.add("p.new", "vm1").unwrap();
        l.init(&["p.old".into(), "p.new".into()]).unwrap();
        let e = l.entries().unwrap().unwrap();
        assert!(!e["p.new"].unknown);
        assert_eq!(e["p.new"].nodes, BTreeSet::from(["vm1".to_string()]));

        // A full read finds p.old on vm2 and nothing else.
        let marks = l.marks().unwrap();
        l.reconcile(&[att("p.old", "vm2")], &marks).unwrap();
        let e = l.entries().unwrap().unwrap();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(!e["p.old"].unknown);
        // An attach recorded after the read began is kept, also when it names a node the
        // entry had before.
        let marks = l.marks().unwrap();
        l.add("q.inflight", "vm3").unwrap();
        l.add("p.old", "vm2").unwrap();
        l.reconcile(&[], &marks).unwrap();
        let e = l.entries().unwrap().unwrap();
        assert!(
            e.contains_key("q.inflight") && e.contains_key("p.old"),
            "{e:?}"
        );
        l.remove("q.inflight", "vm3").unwrap();
        assert!(!l.entries().unwrap().unwrap().contains_key("q.inflight"));
        assert!(l.add("../x", "vm").is_err());
        assert!(
            l.add("r.0123456789abcdef", "vm").is_err(),
            "not a configured pool"
        );
    }

    /// Two processes sharing the pools share the ledger: each sees what the other recorded,
    /// and a read by one does not drop an attach the other recorded meanwhile.
    #[test]
    fn processes_sharing_a_pool_share_its_ledger() {
        let t = tempfile::tempdir().unwrap();
        let pools = [("p".to_string(), t.path().join("p"))];
        let (a, b) = (
            Ledger::new("libvirt", &pools),
            Ledger::new("libvirt", &pools),
        );
        a.init(&[]).unwrap();
        assert!(b.ready());
        let marks = b.marks().unwrap();
        a.add("p.0123456789abcdef", "vm-a").unwrap();
        b.reconcile(&[], &marks).unwrap();
        let e = b.entries().unwrap().unwrap();
        assert_eq!(
            e["p.0123456789abcdef"].nodes,
            BTreeSet::from(["vm-a".to_string()])
        );
        // A read by b that began after the attach and did not find it drops it.
        let marks = b.marks().unwrap();
        b.reconcile(&[], &marks).unwrap();
        assert!(a.entries().unwrap().unwrap().is_empty());
    }
}
