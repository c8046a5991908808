//! Identifiers. Every id that reaches the filesystem or libvirt XML is checked here first.
//!
//! A volume id is `<pool>.<key>`, where `key` is 16 lower-case hex digits, and a snapshot id
//! `<pool>.s<key>`. Keys are 64 random bits, so ids are unique over time: a volume or snapshot
//! created again under a name used before gets a new id. The name is the idempotency key;
//! the pool's index finds a name's record through the name's hash (`name_hash`). Versions
//! before this one derived keys from names (`<16 hex of sha256(kind NUL name)>`, the same
//! value as `name_hash`): those ids look the same and stay valid.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// The CSI spec bounds ids and names to 128 bytes.
pub(crate) const MAX_ID_LEN: usize = 128;
pub(crate) const MAX_NAME_LEN: usize = 128;
const KEY_HEX: usize = 16;

/// Rejects anything that could escape a directory or break a file name.
pub(crate) fn check_safe_id(what: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{what} is required")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(format!(
            "{what} is {} bytes; at most {MAX_ID_LEN} are allowed",
            id.len()
        )));
    }
    let ok = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !ok || id == "." || id.contains("..") || id.starts_with('.') {
        return Err(Error::invalid(format!(
            "{what} {id:?} is not a valid id: only letters, digits, '.', '-' and '_' are allowed, \
             with no '..' and no leading '.'"
        )));
    }
    Ok(())
}

/// Names are any UTF-8 up to 128 bytes without NUL; they are stored, never used as paths.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("{what} is required")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{what} is {} bytes; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Error::invalid(format!("{what} must not contain NUL")));
    }
    Ok(())
}

/// Pool names become part of ids and directory names.
pub(crate) fn check_pool_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "pool name {name:?} is invalid: use 1-32 letters, digits, '-' or '_'"
        )))
    }
}

/// The name-hash domain of volume names.
pub const VOLUME: &str = "volume";
/// The name-hash domain of snapshot names.
pub const SNAPSHOT: &str = "snapshot";
/// The name-hash domain of group snapshot names.
pub const GROUP: &str = "group snapshot";

/// A stable 64-bit hash of a name within a domain (`VOLUME`, `SNAPSHOT`): the first 8 bytes
/// of sha256(`domain` NUL `name`). The same in every process and version, so processes
/// sharing a pool lock a name at the same place; it was the key of ids of earlier versions.
pub fn name_hash(domain: &str, name: &str) -> u64 {
    let digest = Sha256::digest(format!("{domain}\0{name}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// 64 bits from the operating system's random source.
pub fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        // No entropy source (never seen on Linux): time and pid still make repeats unlikely.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ (u64::from(std::process::id()) << 32)
    })
}

/// The key an id of an earlier version got from its volume name (tests and tools).
pub fn legacy_volume_key(name: &str) -> String {
    format!("{:016x}", name_hash(VOLUME, name))
}

/// The key an id of an earlier version got from its snapshot name (tests and tools).
pub fn legacy_snapshot_key(name: &str) -> String {
    format!("s{:016x}", name_hash(SNAPSHOT, name))
}

/// A parsed object id: `<pool>.<key>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub(crate) pool: String,
    pub(crate) key: String,
}

impl ObjectId {
    /// The id of object `key` in pool `pool` (no validation: both come from validated input).
    pub fn new(pool: &str, key: &str) -> Self {
        ObjectId {
            pool: pool.to_string(),
            key: key.to_string(),
        }
    }

    /// Parses a volume id. `Err(InvalidArgument)` if unsafe; `Ok(None)` if safe but not one of
    /// ours (such a volume cannot exist).
    pub(crate) fn parse_volume(id: &str) -> Result<Option<ObjectId>> {
        Self::parse(id, "volume id", None)
    }

    pub(crate) fn parse_snapshot(id: &str) -> Result<Option<ObjectId>> {
        Self::parse(id, "snapshot id", Some('s'))
    }

    pub(crate) fn parse_group(id: &str) -> Result<Option<ObjectId>> {
        Self::parse(id, "group snapshot id", Some('g'))
    }

    fn parse(id: &str, what: &str, prefix: Option<char>) -> Result<Option<ObjectId>> {
        check_safe_id(what, id)?;
        let Some((pool, key)) = id.rsplit_once('.') else {
            return Ok(None);
        };
        if check_pool_name(pool).is_err() {
            return Ok(None);
        }
        let hex = match prefix {
            Some(p) => match key.strip_prefix(p) {
                Some(h) => h,
                None => return Ok(None),
            },
            None => key,
        };
        let ok =
            hex.len() == KEY_HEX && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        Ok(ok.then(|| ObjectId::new(pool, key)))
    }

    /// The 20-byte-safe disk serial for a volume key (virtio-blk truncates serials at 20 bytes).
    pub(crate) fn serial(&self) -> String {
        format!("vd-{}", self.key)
    }
}

/// A volume id of this plugin (`<pool>.<key>`, the scheme above), parsed once where it enters
/// (a request, at the gRPC edge in `csi/`) and passed inward as this type, so nothing behind
/// the edge parses it again. Its text form (`Display`) is the CSI volume id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(ObjectId);

impl VolumeId {
    /// Parses the volume id in request field `field`: `Err(InvalidArgument)` when it is empty or
    /// unsafe; `Ok(None)` when it is safe but not one of ours (no volume of ours has it).
    pub fn parse(field: &str, id: &str) -> Result<Option<VolumeId>> {
        Ok(ObjectId::parse(id, field, None)?.map(VolumeId))
    }

    /// The pool the volume is in.
    pub(crate) fn pool(&self) -> &str {
        &self.0.pool
    }

    /// The volume's key in its pool (16 lower-case hex digits).
    pub(crate) fn key(&self) -> &str {
        &self.0.key
    }

    /// The serial of the volume's disk (`vd-<key>`, see [`ObjectId::serial`]).
    pub(crate) fn serial(&self) -> String {
        self.0.serial()
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether a disk serial is one this plugin gives its volumes' disks (`vd-<16 hex digits>`,
/// see [`ObjectId::serial`]).
pub(crate) fn is_volume_serial(serial: &str) -> bool {
    serial.strip_prefix("vd-").is_some_and(|hex| {
        hex.len() == KEY_HEX && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.pool, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_ids_are_invalid() {
        for bad in [
            "",
            "..",
            "a/b",
            "../x",
            "a\0b",
            ".hidden",
            "a..b",
            &"x".repeat(129),
        ] {
            assert!(ObjectId::parse_volume(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn foreign_but_safe_ids_are_none() {
        assert_eq!(ObjectId::parse_volume("nope").unwrap(), None);
        assert_eq!(ObjectId::parse_volume("pool.xyz").unwrap(), None);
    }

    fn sid_string() -> String {
        ObjectId::new("default", &legacy_snapshot_key("snap")).to_string()
    }

    #[test]
    fn keys_round_trip_and_serial_fits() {
        let key = legacy_volume_key("my volume ✓");
        let id = ObjectId::new("default", &key);
        assert_eq!(
            ObjectId::parse_volume(&id.to_string()).unwrap(),
            Some(id.clone())
        );
        assert!(id.serial().len() <= 20);
        let skey = legacy_snapshot_key("snap");
        let sid = ObjectId::new("default", &skey);
        assert_eq!(
            ObjectId::parse_snapshot(&sid.to_string()).unwrap(),
            Some(sid)
        );
        assert_eq!(ObjectId::parse_snapshot(&id.to_string()).unwrap(), None);
        let gid = ObjectId::new("default", "g0123456789abcdef");
        assert_eq!(
            ObjectId::parse_group(&gid.to_string()).unwrap(),
            Some(gid.clone())
        );
        assert_eq!(ObjectId::parse_group(&sid_string()).unwrap(), None);
        assert_eq!(ObjectId::parse_snapshot(&gid.to_string()).unwrap(), None);
        assert_ne!(legacy_volume_key("a"), legacy_volume_key("b"));
    }

    #[test]
    fn volume_ids_parse_once_into_pool_key_and_serial() {
        let id = VolumeId::parse("volume_id", "fast-1.0123456789abcdef")
            .unwrap()
            .unwrap();
        assert_eq!((id.pool(), id.key()), ("fast-1", "0123456789abcdef"));
        assert_eq!(id.serial(), "vd-0123456789abcdef");
        assert_eq!(id.to_string(), "fast-1.0123456789abcdef");
        // Safe but not ours: no volume has it. A snapshot id is not a volume id.
        for foreign in ["nope", "pool.xyz", "default.s0123456789abcdef"] {
            assert_eq!(VolumeId::parse("volume_id", foreign).unwrap(), None);
        }
        let err = VolumeId::parse("volume_id", "../x").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("volume_id"), "{err}");
    }

    #[test]
    fn name_hashes_are_the_keys_earlier_versions_derived() {
        // Pools made by earlier versions name this volume `<pool>.<this key>`.
        assert_eq!(legacy_volume_key("data"), "3060d9f7a9d3a2a3");
        assert_eq!(
            format!("{:016x}", name_hash(VOLUME, "data")),
            legacy_volume_key("data")
        );
        assert_ne!(random_u64(), random_u64());
    }
}
