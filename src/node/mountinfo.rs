//! `/proc/self/mountinfo`: the only source of truth for what is mounted where, so a restarted
//! plugin sees exactly what the kernel has (nothing is remembered in memory).

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

pub(crate) const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub(crate) id: u32,
    pub(crate) parent: u32,
    pub(crate) major: u32,
    pub(crate) minor: u32,
    /// The directory of the filesystem mounted here (not `/` for bind mounts of a subtree).
    pub(crate) root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, …).
    pub(crate) options: Vec<String>,
    /// Peer group when the mount is shared (`shared:N`).
    pub(crate) shared_group: Option<u32>,
    /// The peer group this mount receives propagation from when it is a slave (`master:N`).
    pub(crate) master_group: Option<u32>,
    /// Filesystem type (`ext4`, `xfs`, `fuse`, …).
    pub fs_type: String,
    pub(crate) source: String,
    /// Per-superblock options (shared by every mount of the filesystem).
    pub super_options: Vec<String>,
}

impl MountEntry {
    pub(crate) fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    pub(crate) fn dev(&self) -> (u32, u32) {
        (self.major, self.minor)
    }

    /// A device node bound here (a block volume's staging file or target): a bind of one file
    /// of a devtmpfs or tmpfs, not a file system mounted whole.
    pub(crate) fn is_device_bind(&self) -> bool {
        matches!(self.fs_type.as_str(), "devtmpfs" | "tmpfs") && self.root != Path::new("/")
    }
}

/// Decodes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if v <= 0xff {
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.len() < 10 {
        return None;
    }
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    if fields.len() < sep + 3 {
        return None;
    }
    let (major, minor) = fields[2].split_once(':')?;
    let tag = |name: &str| {
        fields[6..sep]
            .iter()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|g| g.parse().ok())
    };
    let (shared_group, master_group) = (tag("shared:"), tag("master:"));
    Some(MountEntry {
        id: fields[0].parse().ok()?,
        parent: fields[1].parse().ok()?,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: unescape(fields[3]),
        mount_point: unescape(fields[4]),
        options: fields[5].split(',').map(str::to_string).collect(),
        shared_group,
        master_group,
        fs_type: fields[sep + 1].to_string(),
        source: unescape(fields[sep + 2]).to_string_lossy().into_owned(),
        super_options: fields
            .get(sep + 3)
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
    })
}

/// The mounts of this process's mount namespace, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    pub(crate) entries: Vec<MountEntry>,
}

impl MountTable {
    pub(crate) fn parse(text: &str) -> Result<MountTable> {
        let mut entries = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            entries.push(
                parse_line(line).ok_or_else(|| {
                    Error::internal(format!("cannot parse mountinfo line {line:?}"))
                })?,
            );
        }
        Ok(MountTable { entries })
    }

    /// Reads `/proc/self/mountinfo`. Blocking.
    pub fn read() -> Result<MountTable> {
        let text = std::fs::read_to_string(MOUNTINFO)
            .map_err(|e| Error::io(format!("reading {MOUNTINFO}"), e))?;
        Self::parse(&text)
    }

    /// The mount visible at `path` (the topmost when several are stacked there).
    pub fn at(&self, path: &Path) -> Option<&MountEntry> {
        self.entries.iter().rev().find(|e| e.mount_point == path)
    }

    pub(crate) fn by_id(&self, id: u32) -> Option<&MountEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Every mount of the block device `major:minor`.
    pub(crate) fn of_device(&self, dev: (u32, u32)) -> Vec<&MountEntry> {
        self.entries.iter().filter(|e| e.dev() == dev).collect()
    }

    /// Mounts under `dir` (not `dir` itself), deepest first.
    pub fn under(&self, dir: &Path) -> Vec<&MountEntry> {
        let mut v: Vec<&MountEntry> = self
            .entries
            .iter()
            .filter(|e| e.mount_point != dir && e.mount_point.starts_with(dir))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.mount_point.components().count()));
        v
    }

    /// Where `m` sits inside its parent's filesystem (parent root + relative mount point).
    fn place_in_parent(&self, m: &MountEntry) -> Option<(&MountEntry, PathBuf)> {
        let parent = self.by_id(m.parent)?;
        let rel = m.mount_point.strip_prefix(&parent.mount_point).ok()?;
        Some((parent, parent.root.join(rel)))
    }

    /// A copy of `stage` that mount propagation made under a peer of its parent: it goes away
    /// with `stage`, so it is no user of it.
    fn is_propagated_copy(&self, stage: &MountEntry, other: &MountEntry) -> bool {
        let (Some((sp, srel)), Some((op, orel))) =
            (self.place_in_parent(stage), self.place_in_parent(other))
        else {
            return false;
        };
        sp.id != op.id
            && sp.shared_group.is_some()
            && sp.shared_group == op.shared_group
            && srel == orel
    }

    /// What `m` (a mount of a volume's disk) is to the plugin, told from the mount table
    /// alone, never from the RPC that names its path. A block volume's staging mount is the
    /// device node bound onto the file named `stage_file` in the staging directory; any
    /// other bind of a device node is a publish. A file system mounted whole is a publish when
    /// it is a slave of the peer group of another mount of the same file system (how
    /// NodePublishVolume binds, see `fs::bind_publish`), or — made by versions that bound without
    /// `slave` — when it joined such a group after another member (mountinfo lists the mounts
    /// of a namespace in the order they were made, so a staging mount precedes its binds); the
    /// copies mount propagation makes of a staging mount are staging mounts. A bind of a
    /// directory inside the file system is a publish (the plugin stages whole file systems).
    pub(crate) fn role(&self, m: &MountEntry, stage_file: &str) -> Role {
        if m.is_device_bind() {
            return if m.mount_point.file_name() == Some(std::ffi::OsStr::new(stage_file)) {
                Role::Stage
            } else {
                Role::Publish
            };
        }
        if m.root != Path::new("/") {
            return Role::Publish;
        }
        let same = |e: &MountEntry| e.id != m.id && e.dev() == m.dev() && e.root == m.root;
        if let Some(g) = m.master_group {
            if self
                .entries
                .iter()
                .any(|e| same(e) && e.shared_group == Some(g))
            {
                return Role::Publish;
            }
        }
        match m.shared_group {
            Some(g) => {
                let after_its_stage = self.entries.iter().take_while(|e| e.id != m.id).any(|e| {
                    same(e) && e.shared_group == Some(g) && !self.is_propagated_copy(e, m)
                });
                if after_its_stage {
                    Role::Publish
                } else {
                    Role::Stage
                }
            }
            None => Role::Either,
        }
    }

    /// The publishes that still use a staging mount: the binds of it at targets (and the
    /// copies mount propagation made of those), never itself, another staging mount of the
    /// same disk, or the copies propagation made of it (they go away with it).
    ///
    /// When the stage owns its peer group (all members are the same filesystem subtree), its
    /// publishes are the slaves of that group, and the members that are not copies of it
    /// (binds made before publishes were slaves). When the group is not the stage's alone (a
    /// block device node bound from a shared `/dev` joins `/dev`'s group) or the stage is not
    /// shared, every other mount of the same device and subtree whose [`role`](Self::role) is
    /// not a staging mount counts.
    pub(crate) fn publishes_of(&self, stage: &MountEntry, stage_file: &str) -> Vec<&MountEntry> {
        let same = |e: &MountEntry| e.dev() == stage.dev() && e.root == stage.root;
        let own_group = stage.shared_group.filter(|g| {
            self.entries
                .iter()
                .filter(|e| e.shared_group == Some(*g))
                .all(same)
        });
        self.entries
            .iter()
            .filter(|e| e.id != stage.id && same(e))
            .filter(|e| match own_group {
                Some(g) => {
                    e.master_group == Some(g)
                        || (e.shared_group == Some(g) && !self.is_propagated_copy(stage, e))
                }
                None => self.role(e, stage_file) != Role::Stage,
            })
            .collect()
    }

    /// The staging mount a publish `m` was bound from, when the table tells.
    pub(crate) fn stage_of(&self, m: &MountEntry, stage_file: &str) -> Option<&MountEntry> {
        self.entries.iter().find(|e| {
            e.id != m.id
                && e.dev() == m.dev()
                && e.root == m.root
                && self.role(e, stage_file) == Role::Stage
                && (m.is_device_bind()
                    || (e.shared_group.is_some()
                        && (m.master_group == e.shared_group || m.shared_group == e.shared_group)))
        })
    }

    /// The mount a path that may not exist yet would be in: the topmost mount on the deepest
    /// mount point that is `path` or above it. `path` must be resolved (see
    /// `paths::real_location`).
    pub(crate) fn containing(&self, path: &Path) -> Option<&MountEntry> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| path.starts_with(&e.mount_point))
            .max_by_key(|(i, e)| (e.mount_point.components().count(), *i))
            .map(|(_, e)| e)
    }
}

/// What a mount of a volume's disk is to the plugin (see [`MountTable::role`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A staging mount: the file system mounted at a staging path, or the device node bound
    /// onto a block volume's staging file.
    Stage,
    /// A publish: a bind of a staging mount at a target.
    Publish,
    /// Cannot be told: a whole file system in no peer group and no slave of one (a staging
    /// mount whose `--make-shared` a crash interrupted, or a publish whose staging mount was
    /// unmounted behind the plugin's back). Either kind of RPC may take it down.
    Either,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=123k,mode=755
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 27 0:39 / /srv/with\\040space/exp rw,nosuid,nodev,relatime - fuse /dev/fuse rw,user_id=0
59 27 7:0 / /var/csi/staging/v1 rw,relatime shared:5 - ext4 /dev/loop0 rw
60 27 7:0 / /var/csi/per-alloc/a1/v1 ro,relatime shared:5 - ext4 /dev/loop0 rw
62 27 7:0 / /var/csi/staging/v1-second rw,relatime shared:6 master:2 - ext4 /dev/loop0 rw
67 27 0:6 /loop1 /var/csi/staging/b1/device rw,relatime shared:7 - devtmpfs devtmpfs rw
68 27 0:6 /loop1 /var/csi/per-alloc/a2/b1 rw,relatime shared:7 - devtmpfs devtmpfs rw
70 59 0:50 / /var/csi/staging/v1/tab\\011and\\134back rw - tmpfs none rw
";

    #[test]
    fn parses_fields_and_escapes() {
        let t = MountTable::parse(SAMPLE).unwrap();
        assert_eq!(t.entries.len(), 10);
        let fuse = &t.entries[3];
        assert_eq!(fuse.mount_point, PathBuf::from("/srv/with space/exp"));
        assert_eq!(fuse.fs_type, "fuse");
        assert_eq!(fuse.source, "/dev/fuse");
        assert_eq!(fuse.shared_group, None);
        let odd = t
            .at(Path::new("/var/csi/staging/v1/tab\tand\\back"))
            .unwrap();
        assert_eq!(odd.fs_type, "tmpfs");
        let stage = t.at(Path::new("/var/csi/staging/v1")).unwrap();
        assert_eq!(stage.dev(), (7, 0));
        assert_eq!(stage.shared_group, Some(5));
        assert!(!stage.read_only());
        assert!(t
            .at(Path::new("/var/csi/per-alloc/a1/v1"))
            .unwrap()
            .read_only());
        let second = t.at(Path::new("/var/csi/staging/v1-second")).unwrap();
        assert_eq!(second.shared_group, Some(6));
        let blk = t.at(Path::new("/var/csi/staging/b1/device")).unwrap();
        assert_eq!(blk.root, PathBuf::from("/loop1"));
        assert!(t.at(Path::new("/var/csi/staging")).is_none());
    }

    #[test]
    fn users_are_peers_not_other_stagings() {
        let t = MountTable::parse(SAMPLE).unwrap();
        let stage = t.at(Path::new("/var/csi/staging/v1")).unwrap();
        let users: Vec<_> = t
            .publishes_of(stage, "device")
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(users, vec![60]);
        let second = t.at(Path::new("/var/csi/staging/v1-second")).unwrap();
        assert!(t.publishes_of(second, "device").is_empty());
        let blk = t.at(Path::new("/var/csi/staging/b1/device")).unwrap();
        assert_eq!(t.publishes_of(blk, "device").len(), 1);
        assert_eq!(t.of_device((7, 0)).len(), 3);
    }

    #[test]
    fn propagation_copies_are_not_users() {
        // /a and /b are peers (shared:9); staging under /a propagated a copy under /b. 22 is a
        // publish of an older version (a peer of the stage); 23 a slave publish, which became
        // shared too under the shared /a, with its copy 24 under /b.
        let text = "\
1 0 254:0 / / rw shared:1 - ext4 /dev/vda rw
10 1 0:40 / /a rw shared:9 - tmpfs t rw
11 1 0:40 / /b rw shared:9 - tmpfs t rw
20 10 7:3 / /a/stage rw shared:12 - xfs /dev/loop3 rw
21 11 7:3 / /b/stage rw shared:12 - xfs /dev/loop3 rw
22 10 7:3 / /a/target rw shared:12 - xfs /dev/loop3 rw
23 10 7:3 / /a/t2 rw shared:13 master:12 - xfs /dev/loop3 rw
24 11 7:3 / /b/t2 rw shared:13 master:12 - xfs /dev/loop3 rw
";
        let t = MountTable::parse(text).unwrap();
        let stage = t.at(Path::new("/a/stage")).unwrap();
        let users: Vec<_> = t
            .publishes_of(stage, "device")
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(users, vec![22, 23, 24]);
        let role = |p: &str| t.role(t.at(Path::new(p)).unwrap(), "device");
        for (p, want) in [
            ("/a/stage", Role::Stage),
            ("/b/stage", Role::Stage),
            ("/a/target", Role::Publish),
            ("/a/t2", Role::Publish),
            ("/b/t2", Role::Publish),
        ] {
            assert_eq!(role(p), want, "{p}");
        }
    }

    #[test]
    fn unshared_stage_falls_back_to_same_device_and_root() {
        let text = "\
1 0 254:0 / / rw - ext4 /dev/vda rw
20 1 7:3 / /s rw - ext4 /dev/loop3 rw
21 1 7:3 / /t rw - ext4 /dev/loop3 rw
22 1 7:3 /sub /u rw - ext4 /dev/loop3 rw
";
        let t = MountTable::parse(text).unwrap();
        let users: Vec<_> = t
            .publishes_of(t.at(Path::new("/s")).unwrap(), "device")
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(users, vec![21]);
        assert_eq!(
            t.under(Path::new("/")).first().unwrap().mount_point,
            PathBuf::from("/s")
        );
    }

    #[test]
    fn block_binds_from_a_shared_dev_count_by_device_node() {
        // systemd hosts: /dev is shared, so binds of /dev/loop2 join /dev's peer group.
        let text = "\
1 0 254:0 / / rw shared:1 - ext4 /dev/vda rw
2 1 0:6 / /dev rw shared:2 - devtmpfs devtmpfs rw
30 1 0:6 /loop2 /s1/device rw shared:2 - devtmpfs devtmpfs rw
31 1 0:6 /loop2 /s2/device rw shared:2 - devtmpfs devtmpfs rw
32 1 0:6 /loop2 /t1 rw shared:2 - devtmpfs devtmpfs rw
33 1 0:6 /loop3 /t9 rw shared:2 - devtmpfs devtmpfs rw
";
        let t = MountTable::parse(text).unwrap();
        let users: Vec<_> = t
            .publishes_of(t.at(Path::new("/s1/device")).unwrap(), "device")
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(users, vec![32]);
    }

    #[test]
    fn roles_are_told_by_what_is_mounted() {
        // 40 stage of loop4 at /s; 41 a publish bound as a slave of its group; 42 a publish of
        // an older version (a peer, made after the stage); 43 a second stage of the same disk
        // (a group of its own); 44 a bind of a directory inside the file system; 45 a private
        // mount of the same disk (cannot be told). Block: 50 the stage file, 51 its publish.
        let text = "\
1 0 254:0 / / rw - ext4 /dev/vda rw
2 1 0:6 / /dev rw - devtmpfs devtmpfs rw
40 1 7:4 / /s rw shared:20 - ext4 /dev/loop4 rw
41 1 7:4 / /t1 rw master:20 - ext4 /dev/loop4 rw
42 1 7:4 / /t2 rw shared:20 - ext4 /dev/loop4 rw
43 1 7:4 / /s2 rw shared:21 - ext4 /dev/loop4 rw
44 1 7:4 /dir /t3 rw master:20 - ext4 /dev/loop4 rw
45 1 7:4 / /p rw - ext4 /dev/loop4 rw
50 1 0:6 /loop5 /b/device rw shared:30 - devtmpfs devtmpfs rw
51 1 0:6 /loop5 /bt rw master:30 - devtmpfs devtmpfs rw
";
        let t = MountTable::parse(text).unwrap();
        let role = |p: &str| t.role(t.at(Path::new(p)).unwrap(), "device");
        assert_eq!(role("/s"), Role::Stage);
        assert_eq!(role("/t1"), Role::Publish);
        assert_eq!(role("/t2"), Role::Publish);
        assert_eq!(role("/s2"), Role::Stage);
        assert_eq!(role("/t3"), Role::Publish);
        assert_eq!(role("/p"), Role::Either);
        assert_eq!(role("/b/device"), Role::Stage);
        assert_eq!(role("/bt"), Role::Publish);
        let ids = |stage: &str| -> Vec<u32> {
            t.publishes_of(t.at(Path::new(stage)).unwrap(), "device")
                .iter()
                .map(|e| e.id)
                .collect()
        };
        assert_eq!(ids("/s"), vec![41, 42]);
        assert_eq!(ids("/s2"), Vec::<u32>::new());
        assert_eq!(ids("/b/device"), vec![51]);
    }

    #[test]
    fn the_containing_mount_is_the_deepest_topmost_one() {
        let t = MountTable::parse(SAMPLE).unwrap();
        let within = |p: &str| t.containing(Path::new(p)).unwrap().id;
        assert_eq!(within("/var/csi/staging/v1/new/dir"), 59);
        assert_eq!(within("/var/csi/staging/v1"), 59);
        assert_eq!(within("/var/csi/staging/v1-other"), 27);
        assert_eq!(within("/proc/x"), 22);
        let stacked = MountTable::parse(
            "1 0 254:0 / / rw - ext4 /dev/vda rw\n5 1 7:1 / /m rw - ext4 /dev/loop1 rw\n\
             6 5 7:2 / /m rw - ext4 /dev/loop2 rw\n",
        )
        .unwrap();
        assert_eq!(stacked.containing(Path::new("/m/x")).unwrap().id, 6);
    }

    #[test]
    fn rejects_garbage() {
        assert!(MountTable::parse("not a mountinfo line").is_err());
    }
}
