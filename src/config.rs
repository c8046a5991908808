//! Configuration: an optional TOML file plus command-line flags. With no file, one pool named
//! `default` lives at `<data-dir>/pools/default`.

use crate::error::{Error, Result};
use crate::model::ImageFormat;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(crate) const DEFAULT_DRIVER_NAME: &str = "virtdisk.csi.io";
pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/virtdisk";
pub(crate) const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
pub(crate) const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
/// The topology key of a hypervisor host: `topology.virtdisk.csi.io/host = <host name>`.
pub const HOST_TOPOLOGY_KEY: &str = "topology.virtdisk.csi.io/host";
/// The name of the one host when the file has no `[[host]]` (it announces no topology).
pub const IMPLICIT_HOST: &str = "local";

/// A topology: segment key → value.
pub type Topology = BTreeMap<String, String>;

/// Which CSI services the process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Controller and Identity services.
    Controller,
    /// Node and Identity services.
    Node,
    /// Controller, Node and Identity services in one process.
    Monolith,
}

impl Mode {
    pub(crate) fn runs_controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::Monolith)
    }
    pub(crate) fn runs_node(self) -> bool {
        matches!(self, Mode::Node | Mode::Monolith)
    }
}

/// One storage pool: a directory holding `images/`, volume and snapshot records.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The pool's name: the prefix of its volume ids (`<pool>.<key>`).
    pub name: String,
    /// The pool's directory (created if missing).
    pub path: PathBuf,
    /// The image format of new volumes (qcow2 by default).
    #[serde(default)]
    pub format: ImageFormat,
    /// Topology segments of the pool, e.g. `{ "topology.virtdisk.csi.io/host" = "hv1" }`.
    #[serde(default)]
    pub topology: BTreeMap<String, String>,
    /// Upper bound on the sum of the volumes' virtual sizes.
    #[serde(default)]
    pub capacity_bytes: Option<u64>,
    /// Thin provisioning: allow volumes whose virtual size exceeds the free space.
    #[serde(default = "default_true")]
    pub overcommit: bool,
    /// The `[[host]]` entries that list this pool (filled in by [`Config`], never read from
    /// the `[[pool]]` table): one host makes it local to that host, several make it shared.
    #[serde(skip)]
    pub hosts: Vec<String>,
}

impl PoolConfig {
    /// Where the pool's volumes are accessible from: one topology per host that attaches the
    /// pool (`{HOST_TOPOLOGY_KEY: host}` plus the pool's own `topology` keys), else the pool's
    /// own `topology` alone; empty: from everywhere.
    pub fn accessible_topologies(&self) -> Vec<Topology> {
        if self.hosts.is_empty() {
            return if self.topology.is_empty() {
                Vec::new()
            } else {
                vec![self.topology.clone()]
            };
        }
        self.hosts
            .iter()
            .map(|h| {
                let mut t = self.topology.clone();
                t.insert(HOST_TOPOLOGY_KEY.to_string(), h.clone());
                t
            })
            .collect()
    }

    /// Whether the pool's volumes are accessible from `wanted` (a requisite or preferred
    /// topology of CreateVolume, or GetCapacity's): every segment of `wanted` matches one of
    /// the pool's topologies. A pool without topology is accessible from everywhere.
    pub fn accessible_from(&self, wanted: &Topology) -> bool {
        let all = self.accessible_topologies();
        all.is_empty()
            || all
                .iter()
                .any(|t| wanted.iter().all(|(k, v)| t.get(k) == Some(v)))
    }

    /// Whether the pool declares where it is accessible from (`[[host]]` or `topology`).
    pub fn has_topology(&self) -> bool {
        !self.hosts.is_empty() || !self.topology.is_empty()
    }
}

/// `[[host]]`: one hypervisor host whose domains are nodes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The host's name: its topology segment value (`topology.virtdisk.csi.io/host`), used in
    /// errors, logs and metrics. 1-63 letters, digits, '-', '_' or '.', alphanumeric at both
    /// ends (a Kubernetes label value).
    pub name: String,
    /// libvirt URI: `qemu:///system`, `qemu+ssh://user@hv1/system`, `qemu+tls://hv1/system`,
    /// `qemu+unix:///system?socket=/path/libvirt-sock`…
    pub uri: String,
    /// The pools whose image directories this host reaches (the same path on every host that
    /// lists a pool: NFS, CephFS…). A pool listed by one host is local to it.
    #[serde(default)]
    pub pools: Vec<String>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeConfig {
    /// Reported by NodeGetInfo and enforced by ControllerPublish; 0 = unlimited.
    #[serde(default)]
    pub(crate) max_volumes_per_node: u64,
    #[serde(default)]
    pub(crate) topology: BTreeMap<String, String>,
    /// Where sysfs is mounted (default /sys); tests point it at a fake tree.
    #[serde(default)]
    pub(crate) sysfs_root: Option<PathBuf>,
    /// Where device nodes live (default /dev).
    #[serde(default)]
    pub(crate) dev_root: Option<PathBuf>,
    /// How long NodeStageVolume waits for a hot-plugged disk to appear (default 30 s).
    #[serde(default)]
    pub(crate) device_wait_secs: Option<u64>,
    /// Local attach (this host is a node: its volumes become loop devices here). Default: on
    /// in monolith mode, off in controller mode.
    #[serde(default)]
    pub(crate) local_attach: Option<bool>,
    /// Staging and target paths must lead (symlinks resolved) below one of these directories,
    /// e.g. the CO's plugin directory; empty: any absolute path.
    #[serde(default)]
    pub(crate) allowed_path_roots: Vec<PathBuf>,
    /// Local attach: the storage daemons' cgroup, relative to each hierarchy's root (default
    /// `virtdisk-csi`), so that stopping the plugin's task or container does not stop them;
    /// `""` leaves them in the plugin's cgroup.
    #[serde(default)]
    pub(crate) daemon_cgroup: Option<String>,
    /// Only these hierarchies (directory names under `cgroup_root`, e.g. `freezer`,
    /// `unified`); empty: every hierarchy.
    #[serde(default)]
    pub(crate) daemon_cgroup_hierarchies: Vec<String>,
    /// Where the cgroup hierarchies are mounted (default `/sys/fs/cgroup`; in a container, the
    /// host's cgroupfs mounted elsewhere).
    #[serde(default)]
    pub(crate) cgroup_root: Option<PathBuf>,
    /// Where the node keeps what each stage and publish asked for (`<data_dir>/node`, set at
    /// startup; not a config key).
    #[serde(skip)]
    pub(crate) state_dir: Option<PathBuf>,
}

impl NodeConfig {
    pub(crate) fn sysfs_root(&self) -> PathBuf {
        self.sysfs_root.clone().unwrap_or_else(|| "/sys".into())
    }

    pub(crate) fn dev_root(&self) -> PathBuf {
        self.dev_root.clone().unwrap_or_else(|| "/dev".into())
    }

    pub(crate) fn device_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.device_wait_secs.unwrap_or(30))
    }
}

/// `[libvirt]`: the hypervisor whose domains are the nodes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// Attach through libvirt in controller modes (builds with the `libvirt` feature).
    #[serde(default = "default_true")]
    pub(crate) enabled: bool,
    /// libvirt URI (`qemu:///system` by default).
    #[serde(default = "default_uri")]
    pub uri: String,
    /// How long ControllerUnpublish waits for the guest to release a disk.
    #[serde(default = "default_detach_timeout")]
    pub(crate) detach_timeout_secs: u64,
    /// Which id of a domain published_node_ids reports; publish accepts either.
    #[serde(default)]
    pub(crate) node_id: NodeIdKind,
}

/// Which id of a libvirt domain is its node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeIdKind {
    /// The domain UUID: the guest's DMI product_uuid, the node plugin's default node id.
    #[default]
    Uuid,
    /// The domain name, for node plugins started with `--node-id <domain name>`.
    Name,
}

fn default_uri() -> String {
    DEFAULT_LIBVIRT_URI.to_string()
}

fn default_detach_timeout() -> u64 {
    20
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            enabled: true,
            uri: default_uri(),
            detach_timeout_secs: default_detach_timeout(),
            node_id: NodeIdKind::default(),
        }
    }
}

/// Snapshots, restores and clones (`[snapshots]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotConfig {
    /// Most images a volume's backing chain may hold (its active layer included); deeper
    /// chains are flattened in the background. At least 2.
    #[serde(default = "default_max_chain_depth")]
    pub(crate) max_chain_depth: usize,
    /// Advertise the controller capability GET_SNAPSHOT (alpha in CSI 1.12). The GetSnapshot
    /// RPC answers either way; no CO calls it, and clients that check capabilities against
    /// the ones they know (csi-sanity v5) fail on it, so it is off unless asked for.
    #[serde(default)]
    pub(crate) get_snapshot_capability: bool,
    /// Live snapshots: how long a guest agent may take to freeze the file systems, and the
    /// longest the guests stay frozen (or paused, for a group on several domains) around the
    /// cut. 1 to 300 seconds.
    #[serde(default = "default_quiesce_timeout_secs")]
    pub(crate) quiesce_timeout_secs: u64,
}

fn default_quiesce_timeout_secs() -> u64 {
    crate::attach::DEFAULT_QUIESCE_TIMEOUT.as_secs()
}

fn default_max_chain_depth() -> usize {
    crate::pool::DEFAULT_MAX_CHAIN_DEPTH
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            max_chain_depth: default_max_chain_depth(),
            get_snapshot_capability: false,
            quiesce_timeout_secs: default_quiesce_timeout_secs(),
        }
    }
}

/// The TOML file's shape.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    #[serde(default)]
    pub(crate) driver_name: Option<String>,
    #[serde(default)]
    pub(crate) data_dir: Option<PathBuf>,
    #[serde(default)]
    pub(crate) default_volume_size: Option<u64>,
    #[serde(default, rename = "pool")]
    pub(crate) pools: Vec<PoolConfig>,
    #[serde(default, rename = "host")]
    pub(crate) hosts: Vec<HostConfig>,
    #[serde(default)]
    pub(crate) node: NodeConfig,
    #[serde(default)]
    pub(crate) libvirt: LibvirtConfig,
    #[serde(default)]
    pub(crate) snapshots: SnapshotConfig,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) mode: Mode,
    pub(crate) driver_name: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) node_id: Option<String>,
    pub(crate) default_volume_size: u64,
    /// The storage pools (the embedded `default` pool when none is configured).
    pub pools: Vec<PoolConfig>,
    pub(crate) node: NodeConfig,
    /// `[libvirt]` settings.
    pub libvirt: LibvirtConfig,
    /// The hypervisor hosts: the `[[host]]` entries, else one implicit host ([`IMPLICIT_HOST`]
    /// at `[libvirt] uri`, attaching every pool, announcing no topology).
    pub hosts: Vec<HostConfig>,
    /// Whether the hosts come from `[[host]]` entries (then they are topology segments).
    pub hosts_configured: bool,
    pub(crate) snapshots: SnapshotConfig,
}

/// Flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub(crate) driver_name: Option<String>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) node_id: Option<String>,
    pub(crate) libvirt_uri: Option<String>,
    /// Added to `[node] allowed_path_roots` (`--allowed-path-root`, repeatable): the CO's
    /// plugin directory, which a job file knows and a shared config file does not.
    pub(crate) allowed_path_roots: Vec<PathBuf>,
}

impl Config {
    /// Reads the TOML `file` (if any) for `mode`, applies `ov` and validates everything; InvalidArgument names the bad setting.
    pub fn load(mode: Mode, file: Option<&Path>, ov: Overrides) -> Result<Config> {
        let fc = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Error::invalid(format!(
                            "config file {} does not exist: create it, or leave --config out \
                             for the embedded default (one pool `default` under \
                             <data-dir>/pools/default)",
                            p.display()
                        ))
                    } else {
                        Error::io(format!("reading config {}", p.display()), e)
                    }
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| {
                    Error::invalid(format!("config {} is invalid: {e}", p.display()))
                })?
            }
            None => FileConfig::default(),
        };
        Self::from_file_config(mode, fc, ov)
    }

    pub(crate) fn from_file_config(
        mode: Mode,
        mut fc: FileConfig,
        ov: Overrides,
    ) -> Result<Config> {
        fc.node.allowed_path_roots.extend(ov.allowed_path_roots);
        let data_dir = ov
            .data_dir
            .or(fc.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let mut pools = fc.pools;
        if pools.is_empty() {
            pools.push(PoolConfig {
                name: "default".into(),
                path: data_dir.join("pools").join("default"),
                format: ImageFormat::Qcow2,
                topology: BTreeMap::new(),
                capacity_bytes: None,
                overcommit: true,
                hosts: Vec::new(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for p in &pools {
            crate::ids::check_pool_name(&p.name)?;
            if !seen.insert(p.name.clone()) {
                return Err(Error::invalid(format!(
                    "pool {:?} is declared twice",
                    p.name
                )));
            }
            if !p.path.is_absolute() {
                return Err(Error::invalid(format!(
                    "pool {:?}: path {} must be absolute",
                    p.name,
                    p.path.display()
                )));
            }
        }
        check_pool_paths(&pools)?;
        if let Some(r) = fc.node.allowed_path_roots.iter().find(|r| !r.is_absolute()) {
            return Err(Error::invalid(format!(
                "node.allowed_path_roots (or --allowed-path-root): {} must be absolute",
                r.display()
            )));
        }
        let mut libvirt = fc.libvirt;
        let hosts_configured = !fc.hosts.is_empty();
        if let Some(uri) = ov.libvirt_uri {
            if hosts_configured {
                return Err(Error::invalid(
                    "--libvirt-uri cannot be used with [[host]] entries: set each host's uri in \
                     the config file",
                ));
            }
            libvirt.uri = uri;
        }
        let hosts = if hosts_configured {
            check_hosts(&fc.hosts, &mut pools)?;
            fc.hosts
        } else {
            vec![HostConfig {
                name: IMPLICIT_HOST.to_string(),
                uri: libvirt.uri.clone(),
                pools: pools.iter().map(|p| p.name.clone()).collect(),
            }]
        };
        let driver_name = ov
            .driver_name
            .or(fc.driver_name)
            .unwrap_or_else(|| DEFAULT_DRIVER_NAME.to_string());
        check_driver_name(&driver_name)?;
        if !(2..=64).contains(&fc.snapshots.max_chain_depth) {
            return Err(Error::invalid(format!(
                "snapshots.max_chain_depth {} is out of range: use 2 to 64",
                fc.snapshots.max_chain_depth
            )));
        }
        if !(1..=300).contains(&fc.snapshots.quiesce_timeout_secs) {
            return Err(Error::invalid(format!(
                "snapshots.quiesce_timeout_secs {} is out of range: use 1 to 300",
                fc.snapshots.quiesce_timeout_secs
            )));
        }
        Ok(Config {
            mode,
            driver_name,
            data_dir,
            node_id: ov.node_id,
            default_volume_size: fc.default_volume_size.unwrap_or(DEFAULT_VOLUME_SIZE),
            pools,
            node: fc.node,
            libvirt,
            hosts,
            hosts_configured,
            snapshots: fc.snapshots,
        })
    }

    /// Whether any pool declares topology, or `[[host]]` entries make hosts topology segments
    /// (then VOLUME_ACCESSIBILITY_CONSTRAINTS is offered).
    pub fn has_topology(&self) -> bool {
        self.hosts_configured
            || self.pools.iter().any(PoolConfig::has_topology)
            || !self.node.topology.is_empty()
    }
}

/// Refuses two pools whose directories are one and the same or one inside the other: each
/// would take the other's records, images and locks as its own (every CreateVolume would find
/// the name's lock held by itself: ABORTED forever). The paths are compared as `resolve`
/// spells them, so two spellings of one directory (`a/../a`, a symlink) are caught too, also
/// before the pool directories exist (they are created at start). Reads the file system.
fn check_pool_paths(pools: &[PoolConfig]) -> Result<()> {
    let resolved: Vec<PathBuf> = pools.iter().map(|p| resolve(&p.path)).collect();
    let Some((i, j)) = overlapping(&resolved) else {
        return Ok(());
    };
    let (a, b) = (&pools[i], &pools[j]);
    let how = if resolved[i] == resolved[j] {
        "the same directory".to_string()
    } else {
        let (outer, inner) = if resolved[j].starts_with(&resolved[i]) {
            (a, b)
        } else {
            (b, a)
        };
        format!(
            "nested: pool {:?} lies inside pool {:?}",
            inner.name, outer.name
        )
    };
    let spelled = |k: usize| {
        let p = &pools[k];
        if p.path == resolved[k] {
            format!("pool {:?} at {}", p.name, p.path.display())
        } else {
            format!(
                "pool {:?} at {} (that is {})",
                p.name,
                p.path.display(),
                resolved[k].display()
            )
        }
    };
    Err(Error::invalid(format!(
        "{} and {} are {how}; give each pool a directory of its own, outside the others",
        spelled(i),
        spelled(j)
    )))
}

/// The first two of `paths` (absolute, normalized) that are equal or one inside the other.
fn overlapping(paths: &[PathBuf]) -> Option<(usize, usize)> {
    (0..paths.len()).find_map(|i| {
        (i + 1..paths.len())
            .find(|&j| paths[i].starts_with(&paths[j]) || paths[j].starts_with(&paths[i]))
            .map(|j| (i, j))
    })
}

/// The directory an absolute `path` names (or will name once created): each prefix that
/// exists is canonicalized (symlinks resolved), `.` is dropped, and `..` removes the last
/// component (of a resolved prefix, or of one that does not exist yet, which `mkdir -p` will
/// create as spelled).
fn resolve(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if let Ok(real) = out.canonicalize() {
                    out = real;
                }
            }
        }
    }
    out
}

/// Checks the `[[host]]` entries and records in each pool the hosts that list it.
fn check_hosts(hosts: &[HostConfig], pools: &mut [PoolConfig]) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    for h in hosts {
        check_topology_value(&format!("host name {:?}", h.name), &h.name)?;
        if !names.insert(h.name.as_str()) {
            return Err(Error::invalid(format!(
                "host {:?} is declared twice",
                h.name
            )));
        }
        if h.uri.trim().is_empty() || h.uri.contains(char::is_whitespace) {
            return Err(Error::invalid(format!(
                "host {:?}: uri {:?} is not a libvirt URI (e.g. qemu+ssh://root@{}/system)",
                h.name, h.uri, h.name
            )));
        }
        let mut listed = std::collections::HashSet::new();
        for name in &h.pools {
            if !listed.insert(name.as_str()) {
                return Err(Error::invalid(format!(
                    "host {:?} lists pool {name:?} twice",
                    h.name
                )));
            }
            let pool = pools.iter_mut().find(|p| p.name == *name).ok_or_else(|| {
                Error::invalid(format!(
                    "host {:?} lists pool {name:?}, which no [[pool]] declares",
                    h.name
                ))
            })?;
            pool.hosts.push(h.name.clone());
        }
    }
    for p in pools.iter() {
        if p.hosts.is_empty() {
            return Err(Error::invalid(format!(
                "pool {:?} is listed by no [[host]]: no node could attach its volumes; add it to \
                 the pools of the hosts that reach {}",
                p.name,
                p.path.display()
            )));
        }
        if p.topology.contains_key(HOST_TOPOLOGY_KEY) {
            return Err(Error::invalid(format!(
                "pool {:?}: topology key {HOST_TOPOLOGY_KEY} comes from the [[host]] entries \
                 that list the pool; remove it from the pool's topology",
                p.name
            )));
        }
    }
    Ok(())
}

/// A topology segment value (Kubernetes label value rules): 1-63 characters, letters, digits,
/// '-', '_' and '.', alphanumeric at both ends.
pub(crate) fn check_topology_value(what: &str, v: &str) -> Result<()> {
    let b = v.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} is invalid: use 1-63 letters, digits, '-', '_' or '.', beginning and ending \
             with a letter or digit"
        )))
    }
}

/// CSI: at most 63 characters, begin and end with alphanumerics, `-`, `.` and alphanumerics.
fn check_driver_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "driver name {name:?} is invalid: up to 63 letters, digits, '-' and '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_pool() {
        let c = Config::from_file_config(
            Mode::Controller,
            FileConfig::default(),
            Overrides {
                data_dir: Some("/tmp/d".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.pools[0].path, PathBuf::from("/tmp/d/pools/default"));
        assert_eq!(c.driver_name, DEFAULT_DRIVER_NAME);
    }

    #[test]
    fn toml_with_pools() {
        let fc: FileConfig = toml::from_str(
            r#"
            default_volume_size = 2097152
            [[pool]]
            name = "fast"
            path = "/srv/fast"
            capacity_bytes = 1000000000
            topology = { "topology.virtdisk.csi.io/host" = "hv1" }
            [[pool]]
            name = "shared"
            path = "/srv/shared"
            format = "raw"
            [node]
            max_volumes_per_node = 16
            [libvirt]
            uri = "qemu+ssh://hv1/system"
            [snapshots]
            max_chain_depth = 4
            quiesce_timeout_secs = 3
            "#,
        )
        .unwrap();
        let c = Config::from_file_config(Mode::Monolith, fc, Overrides::default()).unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[1].format, ImageFormat::Raw);
        assert!(c.has_topology());
        assert_eq!(c.node.max_volumes_per_node, 16);
        assert_eq!(c.libvirt.uri, "qemu+ssh://hv1/system");
        assert_eq!(c.snapshots.max_chain_depth, 4);
        assert_eq!(c.snapshots.quiesce_timeout_secs, 3);
        assert!(c.libvirt.enabled);
        assert_eq!(c.libvirt.node_id, NodeIdKind::Uuid);
    }

    #[test]
    fn libvirt_section_and_uri_flag() {
        let fc: FileConfig = toml::from_str(
            "[libvirt]\nenabled = false\ndetach_timeout_secs = 3\nnode_id = \"name\"\n",
        )
        .unwrap();
        let c = Config::from_file_config(
            Mode::Controller,
            fc,
            Overrides {
                libvirt_uri: Some("qemu:///session".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!c.libvirt.enabled);
        assert_eq!(c.libvirt.detach_timeout_secs, 3);
        assert_eq!(c.libvirt.node_id, NodeIdKind::Name);
        assert_eq!(c.libvirt.uri, "qemu:///session");
        assert!(toml::from_str::<FileConfig>("[libvirt]\nnode_id = \"mac\"\n").is_err());
    }

    #[test]
    fn allowed_path_root_flags_add_to_the_file() {
        let fc: FileConfig = toml::from_str("[node]\nallowed_path_roots = [\"/a\"]\n").unwrap();
        let c = Config::from_file_config(
            Mode::Node,
            fc,
            Overrides {
                allowed_path_roots: vec!["/b".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            c.node.allowed_path_roots,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        let relative = Config::from_file_config(
            Mode::Node,
            FileConfig::default(),
            Overrides {
                allowed_path_roots: vec!["rel".into()],
                ..Default::default()
            },
        );
        assert!(relative.is_err());
    }

    #[test]
    fn a_missing_config_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.toml");
        let e = Config::load(Mode::Monolith, Some(&missing), Overrides::default()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("does not exist") && msg.contains("leave --config out"),
            "{msg}"
        );
        // An empty file is the embedded default, like no file.
        std::fs::write(&missing, "").unwrap();
        let c = Config::load(Mode::Monolith, Some(&missing), Overrides::default()).unwrap();
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.pools[0].name, "default");
    }

    #[test]
    fn rejects_duplicate_and_relative_pools() {
        for text in [
            "[[pool]]\nname='a'\npath='/a'\n[[pool]]\nname='a'\npath='/b'\n",
            "[[pool]]\nname='a'\npath='rel'\n",
            "[[pool]]\nname='../a'\npath='/a'\n",
            "[snapshots]\nmax_chain_depth = 1\n",
            "[snapshots]\nquiesce_timeout_secs = 0\n",
            "[snapshots]\nquiesce_timeout_secs = 301\n",
        ] {
            let fc: FileConfig = toml::from_str(text).unwrap();
            assert!(Config::from_file_config(Mode::Controller, fc, Overrides::default()).is_err());
        }
    }

    fn hosts_config(text: &str) -> Result<Config> {
        let fc: FileConfig = toml::from_str(text).map_err(|e| Error::invalid(e.to_string()))?;
        Config::from_file_config(Mode::Controller, fc, Overrides::default())
    }

    const TWO_HOSTS: &str = r#"
        [[pool]]
        name = "local1"
        path = "/srv/local1"
        [[pool]]
        name = "shared"
        path = "/mnt/nfs/shared"
        topology = { "topology.virtdisk.csi.io/zone" = "z1" }
        [[host]]
        name = "hv1"
        uri = "qemu+ssh://root@hv1/system"
        pools = ["local1", "shared"]
        [[host]]
        name = "hv2.example"
        uri = "qemu+unix:///system?socket=/run/hv2/libvirt-sock"
        pools = ["shared"]
    "#;

    fn topo(kv: &[(&str, &str)]) -> Topology {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn hosts_make_pools_local_or_shared() {
        let c = hosts_config(TWO_HOSTS).unwrap();
        assert!(c.hosts_configured && c.has_topology());
        assert_eq!(c.hosts.len(), 2);
        let (local, shared) = (&c.pools[0], &c.pools[1]);
        assert_eq!(local.hosts, ["hv1"]);
        assert_eq!(
            local.accessible_topologies(),
            [topo(&[(HOST_TOPOLOGY_KEY, "hv1")])]
        );
        assert_eq!(
            shared.accessible_topologies(),
            [
                topo(&[
                    (HOST_TOPOLOGY_KEY, "hv1"),
                    ("topology.virtdisk.csi.io/zone", "z1")
                ]),
                topo(&[
                    (HOST_TOPOLOGY_KEY, "hv2.example"),
                    ("topology.virtdisk.csi.io/zone", "z1")
                ]),
            ]
        );
        let on = |h: &str| topo(&[(HOST_TOPOLOGY_KEY, h)]);
        assert!(local.accessible_from(&on("hv1")));
        assert!(!local.accessible_from(&on("hv2.example")));
        assert!(shared.accessible_from(&on("hv2.example")));
        assert!(!shared.accessible_from(&on("hv3")));
        assert!(shared.accessible_from(&topo(&[("topology.virtdisk.csi.io/zone", "z1")])));
    }

    #[test]
    fn no_hosts_is_one_implicit_host_without_topology() {
        let c = hosts_config("[[pool]]\nname='a'\npath='/a'\n").unwrap();
        assert!(!c.hosts_configured && !c.has_topology());
        assert_eq!(c.hosts.len(), 1);
        assert_eq!(c.hosts[0].name, IMPLICIT_HOST);
        assert_eq!(c.hosts[0].uri, DEFAULT_LIBVIRT_URI);
        assert_eq!(c.hosts[0].pools, ["a"]);
        assert!(c.pools[0].accessible_topologies().is_empty());
        assert!(c.pools[0].accessible_from(&topo(&[(HOST_TOPOLOGY_KEY, "x")])));
    }

    #[test]
    fn bad_hosts_are_refused_with_the_reason() {
        let pools = "[[pool]]\nname='a'\npath='/a'\n";
        for (hosts, why) in [
            ("[[host]]\nname='h'\nuri='qemu:///system'\npools=['b']\n", "no [[pool]]"),
            ("[[host]]\nname='h'\nuri='qemu:///system'\npools=[]\n", "listed by no"),
            (
                "[[host]]\nname='h'\nuri='qemu:///system'\npools=['a']\n[[host]]\nname='h'\nuri='x'\n",
                "declared twice",
            ),
            ("[[host]]\nname='-h'\nuri='qemu:///system'\npools=['a']\n", "host name"),
            ("[[host]]\nname='h'\nuri=''\npools=['a']\n", "not a libvirt URI"),
            ("[[host]]\nname='h'\nuri='qemu:///system'\npools=['a','a']\n", "twice"),
            ("[[host]]\nname='h'\npools=['a']\n", "uri"),
        ] {
            let err = hosts_config(&format!("{pools}{hosts}")).unwrap_err();
            assert!(err.to_string().contains(why), "{hosts}: {err}");
        }
        let err = hosts_config(
            "[[pool]]\nname='a'\npath='/a'\ntopology={'topology.virtdisk.csi.io/host'='x'}\n\
             [[host]]\nname='h'\nuri='qemu:///system'\npools=['a']\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("comes from the [[host]]"), "{err}");
        let fc: FileConfig = toml::from_str(TWO_HOSTS).unwrap();
        let err = Config::from_file_config(
            Mode::Controller,
            fc,
            Overrides {
                libvirt_uri: Some("qemu:///session".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("--libvirt-uri"), "{err}");
    }

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn overlapping_finds_equal_and_nested_directories() {
        assert_eq!(overlapping(&paths(&["/s/a", "/s/b", "/s/ab"])), None);
        assert_eq!(overlapping(&paths(&["/s/a", "/s/b", "/s/a"])), Some((0, 2)));
        assert_eq!(
            overlapping(&paths(&["/s/a/b", "/s/c", "/s/a"])),
            Some((0, 2))
        );
        assert_eq!(overlapping(&paths(&["/s", "/s/a"])), Some((0, 1)));
        assert_eq!(overlapping(&paths(&["/", "/s/a"])), Some((0, 1)));
        assert_eq!(overlapping(&paths(&["/s/a"])), None);
    }

    #[test]
    fn resolve_normalizes_and_follows_symlinks_of_what_exists() {
        assert_eq!(
            resolve(Path::new("/nonexistent-vdt/a/../a/./b/")),
            PathBuf::from("/nonexistent-vdt/a/b")
        );
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(resolve(&link), real);
        // Below the symlink, the pool directory not made yet.
        assert_eq!(resolve(&link.join("pool")), real.join("pool"));
        assert_eq!(resolve(&link.join("x/../pool")), real.join("pool"));
        // `..` after a symlink leaves its target, not the link.
        assert_eq!(resolve(&link.join("..")), real.parent().unwrap());
    }

    #[test]
    fn pools_sharing_a_directory_are_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().display().to_string();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let two_pools = |a: &str, b: &str| {
            format!("[[pool]]\nname='a'\npath='{s}/{a}'\n[[pool]]\nname='b'\npath='{s}/{b}'\n")
        };
        for (a, b, how) in [
            ("a", "a", "the same directory"),
            ("a", "a/", "the same directory"),
            ("a", "a/../a", "the same directory"),
            ("a", "./x/../a", "the same directory"),
            ("real/p", "link/p", "the same directory"),
            ("real", "link", "the same directory"),
            ("a", "a/inner", "nested: pool \"b\" lies inside pool \"a\""),
            ("a/inner", "a", "nested: pool \"a\" lies inside pool \"b\""),
            ("real", "link/p", "nested"),
        ] {
            let err = hosts_config(&two_pools(a, b)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            let msg = err.to_string();
            assert!(
                msg.contains(how)
                    && msg.contains(&format!("pool \"a\" at {s}/{a}"))
                    && msg.contains(&format!("pool \"b\" at {s}/{b}")),
                "{a} {b}: {msg}"
            );
        }
        for (a, b) in [
            ("a", "b"),
            ("a", "ab"),
            ("real/p", "link/q"),
            ("a/x", "a/y"),
        ] {
            hosts_config(&two_pools(a, b)).unwrap_or_else(|e| panic!("{a} {b}: {e}"));
        }
    }

    /// The embedded default pool exists only when no `[[pool]]` is configured: a configured
    /// pool at its path is the only pool, nothing to collide with.
    #[test]
    fn a_configured_pool_at_the_default_pool_path_is_alone() {
        let fc: FileConfig =
            toml::from_str("[[pool]]\nname='mine'\npath='/tmp/d/pools/default'\n").unwrap();
        let c = Config::from_file_config(
            Mode::Controller,
            fc,
            Overrides {
                data_dir: Some("/tmp/d".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.pools[0].name, "mine");
    }
}
