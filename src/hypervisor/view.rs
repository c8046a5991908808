//! Finding the domain that is a node, and reading what of ours it holds.

use super::conn::Libvirt;
use super::domxml::{DiskXml, DomainXml};
use crate::error::{Error, Result};
use crate::ids::ObjectId;
use std::path::{Path, PathBuf};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

pub use crate::config::NodeIdKind;

/// A pool's images directory: disks whose source lies here are plugin volumes of that pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolImages {
    /// The pool's name.
    pub pool: String,
    /// The pool's `images/` directory.
    pub images_dir: PathBuf,
}

/// A domain as read in one go: who it is and its live and persistent definitions.
#[derive(Debug, Clone)]
pub(crate) struct DomainView {
    pub(crate) name: String,
    pub(crate) uuid: String,
    pub(crate) active: bool,
    pub(crate) persistent: bool,
    /// Running definition; None when the domain is shut off.
    pub(crate) live: Option<DomainXml>,
    /// Persistent definition (what the next boot uses); None for transient domains.
    pub(crate) config: Option<DomainXml>,
}

impl DomainView {
    /// The node id reported for this domain.
    pub(crate) fn node_id(&self, kind: NodeIdKind) -> &str {
        match kind {
            NodeIdKind::Uuid => &self.uuid,
            NodeIdKind::Name => &self.name,
        }
    }

    pub(crate) fn live_disk(&self, serial: &str) -> Option<&DiskXml> {
        self.live.as_ref().and_then(|x| x.disk_by_serial(serial))
    }

    pub(crate) fn config_disk(&self, serial: &str) -> Option<&DiskXml> {
        self.config.as_ref().and_then(|x| x.disk_by_serial(serial))
    }

    /// Plugin disks (volume id, disk) in the live definition, then those only in the
    /// persistent one (a persist=true disk of a shut-off domain is still attached).
    pub(crate) fn plugin_disks(&self, pools: &[PoolImages]) -> Vec<(String, &DiskXml)> {
        let mut out: Vec<(String, &DiskXml)> = Vec::new();
        for xml in [&self.live, &self.config].into_iter().flatten() {
            for disk in &xml.disks {
                if let Some(vol) = volume_of(disk, pools) {
                    if !out.iter().any(|(v, _)| *v == vol) {
                        out.push((vol, disk));
                    }
                }
            }
        }
        out
    }

    /// Every target name in use, live or persistent (a new disk must be free in both).
    pub(crate) fn used_targets(&self) -> std::collections::HashSet<String> {
        [&self.live, &self.config]
            .into_iter()
            .flatten()
            .flat_map(|x| x.disks.iter().map(|d| d.target.clone()))
            .collect()
    }
}

/// The volume id of a plugin disk: serial `vd-<key>` and source in a pool's images dir.
/// Anything else (the guest's own disks, other tools' disks) is not ours and never touched.
pub(crate) fn volume_of(disk: &DiskXml, pools: &[PoolImages]) -> Option<String> {
    let key = disk.serial.as_deref()?.strip_prefix("vd-")?;
    let source = disk.source.as_deref()?;
    let pool = pools
        .iter()
        .find(|p| source.parent() == Some(p.images_dir.as_path()))?;
    let id = ObjectId::new(&pool.pool, key).to_string();
    // Only well-formed ids: a foreign `vd-…` serial must not pass for a volume.
    ObjectId::parse_volume(&id).ok().flatten().map(|_| id)
}

/// Whether `s` looks like a UUID (libvirt accepts dashes anywhere; we want the usual form).
fn looks_like_uuid(s: &str) -> bool {
    let hex = s.bytes().filter(|b| *b != b'-').count();
    s.len() <= 36 && hex == 32 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The domain whose UUID, else name, is `node_id`; None when there is none.
pub(crate) fn find_domain(conn: &Connect, lv: &Libvirt, node_id: &str) -> Result<Option<Domain>> {
    if looks_like_uuid(node_id) {
        match conn.lookup_domain_by_uuid_string(node_id) {
            Ok(d) => return Ok(Some(d)),
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN => {}
            Err(e) => return Err(lv.error(&format!("looking up domain {node_id}"), e)),
        }
    }
    match conn.lookup_domain_by_name(node_id) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN => Ok(None),
        Err(e) => Err(lv.error(&format!("looking up domain {node_id}"), e)),
    }
}

/// Reads a domain's live and persistent definitions.
pub(crate) fn read_view(dom: &Domain, lv: &Libvirt) -> Result<DomainView> {
    let active = dom
        .is_active()
        .map_err(|e| lv.error("reading domain state", e))?;
    let persistent = dom
        .is_persistent()
        .map_err(|e| lv.error("reading domain persistence", e))?;
    read_definitions(dom, lv, active, persistent)
}

/// Every domain of the connection, read as `read_view` reads one, in about half the calls:
/// the listing carries each domain's id (set while it runs) and one more listing names the
/// transient ones, so per domain only its definitions are fetched. Domains undefined
/// meanwhile are left out.
pub(crate) fn read_all_views(conn: &Connect, lv: &Libvirt) -> Result<Vec<DomainView>> {
    let transient: std::collections::HashSet<String> = conn
        .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
        .map_err(|e| lv.error("listing transient libvirt domains", e))?
        .iter()
        .filter_map(|d| d.uuid_string().ok())
        .collect();
    let mut views = Vec::new();
    for dom in all_domains(conn, lv)? {
        let uuid = dom
            .uuid_string()
            .map_err(|e| lv.error("reading the domain UUID", e))?;
        let active = dom.id().is_some();
        match read_definitions(&dom, lv, active, !transient.contains(&uuid)) {
            Ok(v) => views.push(v),
            Err(e) if e.code() == tonic::Code::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(views)
}

fn read_definitions(
    dom: &Domain,
    lv: &Libvirt,
    active: bool,
    persistent: bool,
) -> Result<DomainView> {
    let err = |what: &str, e| lv.error(what, e);
    let live = if active {
        let xml = dom
            .xml_desc(0)
            .map_err(|e| err("reading the live domain XML", e))?;
        Some(DomainXml::parse(&xml)?)
    } else {
        None
    };
    let config = if persistent {
        let xml = dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| err("reading the persistent domain XML", e))?;
        Some(DomainXml::parse(&xml)?)
    } else {
        None
    };
    let any = live
        .as_ref()
        .or(config.as_ref())
        .ok_or_else(|| Error::internal("a domain that is neither running nor defined"))?;
    Ok(DomainView {
        name: any.name.clone(),
        uuid: any.uuid.clone(),
        active,
        persistent,
        live,
        config,
    })
}

/// Every domain of the connection (running or defined).
pub(crate) fn all_domains(conn: &Connect, lv: &Libvirt) -> Result<Vec<Domain>> {
    conn.list_all_domains(0)
        .map_err(|e| lv.error("listing libvirt domains", e))
}

/// Whether a path lies in one of the pools' images directories.
pub(crate) fn in_pools(path: &Path, pools: &[PoolImages]) -> bool {
    pools
        .iter()
        .any(|p| path.parent() == Some(p.images_dir.as_path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(serial: Option<&str>, source: &str) -> DiskXml {
        DiskXml {
            target: "sda".into(),
            bus: "scsi".into(),
            source: Some(source.into()),
            serial: serial.map(str::to_string),
            ..DiskXml::default()
        }
    }

    #[test]
    fn volume_of_needs_serial_and_pool_dir() {
        let pools = vec![
            PoolImages {
                pool: "default".into(),
                images_dir: "/p/default/images".into(),
            },
            PoolImages {
                pool: "fast".into(),
                images_dir: "/p/fast/images".into(),
            },
        ];
        let ok = disk(Some("vd-0123456789abcdef"), "/p/fast/images/x.qcow2");
        assert_eq!(
            volume_of(&ok, &pools).as_deref(),
            Some("fast.0123456789abcdef")
        );
        for other in [
            disk(None, "/p/fast/images/x.qcow2"),
            disk(Some("vd-0123456789abcdef"), "/elsewhere/x.qcow2"),
            disk(Some("vd-0123456789abcdef"), "/p/fast/images/sub/x.qcow2"),
            disk(Some("vd-XYZ"), "/p/fast/images/x.qcow2"),
            disk(Some("guest-root"), "/p/fast/images/x.qcow2"),
        ] {
            assert_eq!(volume_of(&other, &pools), None, "{other:?}");
        }
    }

    #[test]
    fn uuid_shape() {
        assert!(looks_like_uuid("5dad5d3c-6e12-466e-9b43-47a61f27de97"));
        assert!(looks_like_uuid("5DAD5D3C6E12466E9B4347A61F27DE97"));
        assert!(!looks_like_uuid("vdt-hv-node"));
        assert!(!looks_like_uuid("5dad5d3c-6e12-466e-9b43-47a61f27de9"));
    }
}
