//! What a backend that can be unreachable (libvirt: libvirtd restarts, a remote host is down)
//! may hold, kept durably beside the plugin's data, so that an RPC about a volume that backend
//! does not hold never needs it. The backend's own state stays the truth: the ledger is only
//! ever consulted while the backend cannot be asked, and every full read of the backend
//! brings the ledger back in line with it.
//!
//! One file per volume that may be attached through the backend, `<dir>/<volume id>`, lists
//! the nodes (JSON). It is written (durably) BEFORE an attach starts and removed only after
//! a detach was confirmed, so it never misses an attachment this plugin made: it may only
//! claim too much, which costs availability during an outage, never correctness. The ledger
//! starts when `init` first runs: the volumes that exist then are entered with unknown nodes,
//! until a full read of the backend tells where they are.

use crate::attach::Attachment;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Marks a ledger that `init` completed.
const READY: &str = ".ready";

/// One volume's entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Nodes the volume may be attached to through the backend.
    #[serde(default)]
    pub(crate) nodes: BTreeSet<String>,
    /// The volume existed before the ledger did: where it is attached is unknown.
    #[serde(default)]
    pub(crate) unknown: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    dir: PathBuf,
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

impl Ledger {
    pub(crate) fn new(dir: PathBuf) -> Ledger {
        Ledger { dir }
    }

    /// The ledger can answer (`init` has run). Blocking.
    pub(crate) fn ready(&self) -> bool {
        self.dir.join(READY).exists()
    }

    /// Starts the ledger once: `existing` volumes (all the pools hold now) are entered with
    /// unknown nodes, since the backend may hold them from before. Idempotent. Blocking.
    pub(crate) fn init(&self, existing: &[String]) -> Result<()> {
        if self.ready() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("creating {}", self.dir.display()), e))?;
        for v in existing {
            let mut e = self.read(v)?.unwrap_or_default();
            if !e.unknown {
                e.unknown = true;
                self.write(v, &e)?;
            }
        }
        crate::fsutil::write_atomic(&self.dir.join(READY), b"")
    }

    fn read(&self, volume_id: &str) -> Result<Option<Entry>> {
        crate::fsutil::read_json(&file_of(&self.dir, volume_id)?)
    }

    fn write(&self, volume_id: &str, e: &Entry) -> Result<()> {
        let path = file_of(&self.dir, volume_id)?;
        if e.nodes.is_empty() && !e.unknown {
            crate::fsutil::remove_durable(&path)
        } else {
            crate::fsutil::write_json(&path, e)
        }
    }

    /// Before an attach: the volume may be on `node` from now on. Blocking.
    pub(crate) fn add(&self, volume_id: &str, node: &str) -> Result<()> {
        let mut e = self.read(volume_id)?.unwrap_or_default();
        if e.nodes.insert(node.to_string()) {
            self.write(volume_id, &e)?;
        }
        Ok(())
    }

    /// After a confirmed detach: the volume is not on `node`. Blocking.
    pub(crate) fn remove(&self, volume_id: &str, node: &str) -> Result<()> {
        let Some(mut e) = self.read(volume_id)? else {
            return Ok(());
        };
        if e.nodes.remove(node) {
            self.write(volume_id, &e)?;
        }
        Ok(())
    }

    /// Every entry, when the ledger is ready. Blocking.
    pub(crate) fn entries(&self) -> Result<Option<BTreeMap<String, Entry>>> {
        if !self.ready() {
            return Ok(None);
        }
        Ok(Some(
            self.entries_with_times()?
                .into_iter()
                .map(|(k, (e, _))| (k, e))
                .collect(),
        ))
    }

    fn entries_with_times(&self) -> Result<BTreeMap<String, (Entry, SystemTime)>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(Error::io(format!("listing {}", self.dir.display()), e)),
        };
        let mut out = BTreeMap::new();
        for ent in rd.filter_map(|e| e.ok()) {
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let modified = ent
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now());
            if let Some(e) = self.read(&name)? {
                out.insert(name, (e, modified));
            }
        }
        Ok(out)
    }

    /// Brings the ledger in line with a full read of the backend that began at `started`:
    /// what it found is entered; entries it did not find are dropped, unless written since
    /// `started` (an attach in flight). Blocking.
    pub(crate) fn reconcile(&self, found: &[Attachment], started: SystemTime) -> Result<()> {
        let mut want: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for a in found {
            want.entry(a.volume_id.as_str())
                .or_default()
                .insert(a.node_id.clone());
        }
        let have = self.entries_with_times()?;
        for (volume, nodes) in &want {
            let (had, modified) = match have.get(*volume) {
                Some((e, m)) => (e.clone(), *m),
                None => (Entry::default(), started),
            };
            // Written since the read began: an attach in flight may add nodes; keep them.
            let mut next = Entry {
                nodes: nodes.clone(),
                unknown: false,
            };
            if modified >= started {
                next.nodes.extend(had.nodes.iter().cloned());
            }
            if next != had {
                self.write(volume, &next)?;
            }
        }
        for (volume, (e, modified)) in have {
            if want.contains_key(volume.as_str()) || modified >= started {
                continue;
            }
            tracing::debug!(volume = %volume, nodes = ?e.nodes, "ledger: not attached after all");
            self.write(&volume, &Entry::default())?;
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
        let l = Ledger::new(t.path().join("libvirt"));
        assert_eq!(l.entries().unwrap(), None, "not ready before init");
        l.init(&["p.old".into()]).unwrap();
        let e = l.entries().unwrap().unwrap();
        assert!(e["p.old"].unknown && e["p.old"].nodes.is_empty());
        // init again changes nothing.
        l.add("p.new", "vm1").unwrap();
        l.init(&["p.old".into(), "p.new".into()]).unwrap();
        let e = l.entries().unwrap().unwrap();
        assert!(!e["p.new"].unknown);
        assert_eq!(e["p.new"].nodes, BTreeSet::from(["vm1".to_string()]));

        // A full read finds p.old on vm2 and nothing else.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let started = SystemTime::now();
        l.reconcile(&[att("p.old", "vm2")], started).unwrap();
        let e = l.entries().unwrap().unwrap();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(!e["p.old"].unknown);
        // An attach recorded after the read began is kept.
        let started = SystemTime::now() - std::time::Duration::from_secs(5);
        l.add("p.inflight", "vm3").unwrap();
        l.reconcile(&[], started).unwrap();
        assert!(l.entries().unwrap().unwrap().contains_key("p.inflight"));
        l.remove("p.inflight", "vm3").unwrap();
        assert!(!l.entries().unwrap().unwrap().contains_key("p.inflight"));
        assert!(l.add("../x", "vm").is_err());
    }
}
