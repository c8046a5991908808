//! Identifiers. Every id that reaches the filesystem or libvirt XML is checked here first.
//!
//! A volume id is `<pool>.<key>`, where `key` is 16 lower-case hex digits derived from the
//! volume name, so a repeated CreateVolume finds its volume on disk without any index, and a
//! crash can never create a second volume for one name. Snapshot keys start with `s`.

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

fn name_key(kind: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{kind}\0{name}").as_bytes());
    digest[..KEY_HEX / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key of the volume with this name (the same in every pool).
pub fn volume_key_for_name(name: &str) -> String {
    name_key("volume", name)
}

/// The key of the snapshot with this name.
pub fn snapshot_key_for_name(name: &str) -> String {
    format!("s{}", name_key("snapshot", name))
}

/// The key of the group snapshot with this name.
pub fn group_key_for_name(name: &str) -> String {
    format!("g{}", name_key("group snapshot", name))
}

/// The key of the member snapshot of volume `volume_id` in group snapshot `group_key`.
pub fn member_key(group_key: &str, volume_id: &str) -> String {
    format!(
        "s{}",
        name_key("group member", &format!("{group_key}\0{volume_id}"))
    )
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
        ObjectId::new("default", &snapshot_key_for_name("snap")).to_string()
    }

    #[test]
    fn keys_round_trip_and_serial_fits() {
        let key = volume_key_for_name("my volume ✓");
        let id = ObjectId::new("default", &key);
        assert_eq!(
            ObjectId::parse_volume(&id.to_string()).unwrap(),
            Some(id.clone())
        );
        assert!(id.serial().len() <= 20);
        let skey = snapshot_key_for_name("snap");
        let sid = ObjectId::new("default", &skey);
        assert_eq!(
            ObjectId::parse_snapshot(&sid.to_string()).unwrap(),
            Some(sid)
        );
        assert_eq!(ObjectId::parse_snapshot(&id.to_string()).unwrap(), None);
        let gkey = group_key_for_name("g");
        let gid = ObjectId::new("default", &gkey);
        assert_eq!(ObjectId::parse_group(&gid.to_string()).unwrap(), Some(gid));
        assert_eq!(ObjectId::parse_group(&sid_string()).unwrap(), None);
        let m = member_key(&gkey, "default.0123456789abcdef");
        assert!(ObjectId::parse_snapshot(&format!("default.{m}"))
            .unwrap()
            .is_some());
        assert_ne!(m, member_key(&gkey, "default.0123456789abcdee"));
        assert_ne!(volume_key_for_name("a"), volume_key_for_name("b"));
    }
}
