//! Record kinds: where each kind lives, how its key is spelt, and which index table it feeds.
//! Everything else in the store is generic over [`Record`].

use super::index::{GroupHead, Index, SnapshotHead, VolumeHead};
use crate::error::{Error, Result};
use crate::ids::ObjectId;
use crate::pool::record::{FlattenJob, GroupSnapshotRecord, SnapshotRecord, VolumeRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The kinds of record a pool holds. A new kind (e.g. group snapshots) adds a variant here,
/// its arms in the `match`es of this file, a record type implementing [`Record`], and an index
/// table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Volume,
    Snapshot,
    /// A background flattening of a volume's chain (keyed by the volume's key).
    Flatten,
    /// A group snapshot: several snapshots taken at one point (its members are snapshots).
    Group,
}

impl Kind {
    pub(crate) const ALL: [Kind; 4] = [Kind::Volume, Kind::Snapshot, Kind::Flatten, Kind::Group];

    /// The record directory in the pool.
    pub(crate) fn dir(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
            Kind::Flatten => "flatten",
            Kind::Group => "groups",
        }
    }

    /// What a record of the kind describes, in messages.
    pub(crate) fn noun(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
            Kind::Flatten => "flattening job",
            Kind::Group => "group snapshot",
        }
    }

    /// The tag of the kind in the change log.
    pub(super) fn tag(self) -> u8 {
        match self {
            Kind::Volume => b'v',
            Kind::Snapshot => b's',
            Kind::Flatten => b'f',
            Kind::Group => b'g',
        }
    }

    pub(super) fn from_tag(tag: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.tag() == tag)
    }

    /// The prefix of the kind's keys in file names and ids (snapshots: `s`, groups: `g`).
    fn prefix(self) -> &'static str {
        match self {
            Kind::Snapshot => "s",
            Kind::Group => "g",
            Kind::Volume | Kind::Flatten => "",
        }
    }

    /// A key as file names and ids spell it: the prefix and 16 lower-case hex digits.
    pub(crate) fn file_key(self, key: u64) -> String {
        format!("{}{}", self.prefix(), key_hex(key))
    }

    /// The record file of `key` in the pool at `pool_dir`: `<dir>/<file key>.json`.
    pub(crate) fn record_path(self, pool_dir: &std::path::Path, key: u64) -> std::path::PathBuf {
        pool_dir
            .join(self.dir())
            .join(format!("{}.json", self.file_key(key)))
    }

    /// The key of a file name stem or id suffix of this kind; `None` when it is not one.
    pub(crate) fn parse_file_key(self, s: &str) -> Option<u64> {
        parse_key(s.strip_prefix(self.prefix())?)
    }

    /// Adds (or replaces) the entry of a record of this kind from its file's bytes; `dir` is
    /// the pool directory (errors name the record file by its full path).
    pub(super) fn insert_bytes(
        self,
        index: &mut Index,
        dir: &std::path::Path,
        key: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let record = || self.record_path(dir, key).display().to_string();
        let parsed = |e: serde_json::Error| super::corrupt_record(&record(), &e);
        match self {
            Kind::Volume => {
                let head: VolumeHead<'_> = serde_json::from_slice(bytes).map_err(parsed)?;
                // A new record is renamed into place before its bytes are durable (a
                // journaled commit): after a crash a file system without ordering may show a
                // block another record had. Such a file is not this volume's record.
                if key_of_id(self, &head.id).ok() != Some(key) {
                    return Err(Error::UnreadableRecord(format!(
                        "record {} holds the record of volume {:?}, not its own (a crash of \
                         the machine left another file's bytes in it): restore it from a \
                         backup. Do not edit its id: two records would then name one image. \
                         While it is unreadable the pool collects no unused image files",
                        record(),
                        head.id
                    )));
                }
                // A volume's active image is named after its own key (every way a volume gets
                // one: create, restore, clone, snapshot, flattening). A record naming another
                // volume's image (edited by hand to "mend" a copied record) would make a second
                // owner of one writable image and leave its own image unnamed, collected.
                let image_key = super::Layer::parse(&head.image).volume_key();
                if image_key.is_some_and(|k| k != key) {
                    return Err(Error::UnreadableRecord(format!(
                        "record {} names image {:?}, which belongs to another volume (a \
                         volume's image files start with its own key, {}): restore the record \
                         from a backup. Two records must never name one image. While it is \
                         unreadable the pool collects no unused image files",
                        record(),
                        head.image,
                        self.file_key(key)
                    )));
                }
                index.insert_volume(key, &head)
            }
            Kind::Snapshot => {
                let head: SnapshotHead<'_> = serde_json::from_slice(bytes).map_err(parsed)?;
                index.insert_snapshot(key, &head)
            }
            Kind::Flatten => {
                let job: FlattenJob = serde_json::from_slice(bytes).map_err(parsed)?;
                index.insert_job(key, &job)
            }
            Kind::Group => {
                let head: GroupHead<'_> = serde_json::from_slice(bytes).map_err(parsed)?;
                index.insert_group(key, &head)
            }
        }
        Ok(())
    }

    /// Drops the index entry of one record of this kind.
    pub(crate) fn remove_from(self, index: &mut Index, key: u64) {
        match self {
            Kind::Volume => index.remove_volume(key),
            Kind::Snapshot => index.remove_snapshot(key),
            Kind::Flatten => index.remove_job(key),
            Kind::Group => index.remove_group(key),
        }
    }
}

/// 16 lower-case hex digits.
pub(crate) fn key_hex(key: u64) -> String {
    format!("{key:016x}")
}

/// The key spelt by exactly 16 lower-case hex digits.
pub(crate) fn parse_key(hex: &str) -> Option<u64> {
    let ok = hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

/// One kind of record: a JSON file in its kind's directory, named by its key.
pub(crate) trait Record: Serialize + DeserializeOwned + Send + Sync + 'static {
    const KIND: Kind;
    /// The record's key (from its id).
    fn key(&self) -> Result<u64>;
    /// Adds (or replaces) the record's entry in the index.
    fn insert_into(&self, index: &mut Index, key: u64);
}

/// The pool name and key that an id of `kind` names; `Ok(None)` when it cannot be one of
/// ours, INVALID_ARGUMENT when it is unsafe.
pub(crate) fn parse_id(kind: Kind, id: &str) -> Result<Option<(String, u64)>> {
    let parsed = match kind {
        Kind::Snapshot => ObjectId::parse_snapshot(id)?,
        Kind::Group => ObjectId::parse_group(id)?,
        Kind::Volume | Kind::Flatten => ObjectId::parse_volume(id)?,
    };
    Ok(parsed.and_then(|o| kind.parse_file_key(&o.key).map(|key| (o.pool, key))))
}

fn key_of_id(kind: Kind, id: &str) -> Result<u64> {
    parse_id(kind, id)?
        .map(|(_, key)| key)
        .ok_or_else(|| Error::internal(format!("{id:?} is not a {} id", kind.dir())))
}

impl Record for VolumeRecord {
    const KIND: Kind = Kind::Volume;
    fn key(&self) -> Result<u64> {
        key_of_id(Kind::Volume, &self.id)
    }
    fn insert_into(&self, index: &mut Index, key: u64) {
        index.insert_volume(key, &self.head())
    }
}

impl Record for SnapshotRecord {
    const KIND: Kind = Kind::Snapshot;
    fn key(&self) -> Result<u64> {
        key_of_id(Kind::Snapshot, &self.id)
    }
    fn insert_into(&self, index: &mut Index, key: u64) {
        index.insert_snapshot(key, &self.head())
    }
}

impl Record for GroupSnapshotRecord {
    const KIND: Kind = Kind::Group;
    fn key(&self) -> Result<u64> {
        key_of_id(Kind::Group, &self.id)
    }
    fn insert_into(&self, index: &mut Index, key: u64) {
        index.insert_group(key, &self.head())
    }
}

impl Record for FlattenJob {
    const KIND: Kind = Kind::Flatten;
    fn key(&self) -> Result<u64> {
        key_of_id(Kind::Flatten, &self.volume_id)
    }
    fn insert_into(&self, index: &mut Index, key: u64) {
        index.insert_job(key, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_per_kind() {
        for kind in Kind::ALL {
            let spelt = kind.file_key(0x0123_4567_89ab_cdef);
            assert_eq!(kind.parse_file_key(&spelt), Some(0x0123_4567_89ab_cdef));
            assert_eq!(Kind::from_tag(kind.tag()), Some(kind));
        }
        assert_eq!(Kind::Snapshot.file_key(1), "s0000000000000001");
        assert_eq!(Kind::Group.file_key(1), "g0000000000000001");
        for bad in [
            "",
            "0123",
            "0123456789ABCDEF",
            "s0123456789abcdef",
            ".tmp-x",
        ] {
            assert_eq!(Kind::Volume.parse_file_key(bad), None, "{bad}");
        }
        assert_eq!(Kind::Snapshot.parse_file_key("0123456789abcdef"), None);
    }
}
