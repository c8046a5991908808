//! The guest's root: an uncompressed initramfs with busybox, the kernel modules the test bed
//! needs (with their dependencies, in load order), the host's filesystem tools with their
//! shared libraries, and the node plugin. Cached under a key of all its inputs, so a rebuilt
//! node binary gives a new initramfs and an unchanged one costs nothing.
//!
//! Uncompressed because unpacking gzip under TCG costs more than reading a larger file.

use super::bed::{world_readable_dir, Kernel};
use super::cpio::Archive;
use super::report::Skip;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const INIT: &str = include_str!("init.sh");
const BLOCK_EVENT: &str = include_str!("block-event.sh");
const DISK_SERIAL: &str = include_str!("disk-serial.sh");
const EXEC: &str = include_str!("exec.sh");

/// Drivers the guest needs (ext4, jbd2, mbcache and crc32c are built into Debian's kernel).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "virtio_net",
    "virtio_rng",
    "xfs",
    "loop",
    // The virtio-serial port qemu-guest-agent talks through.
    "virtio_console",
];

/// Tools a node plugin may run; the test bed skips when one is missing on the host.
const REQUIRED_TOOLS: &[&str] = &[
    "mkfs.ext4",
    "mkfs.xfs",
    "blkid",
    "resize2fs",
    "xfs_growfs",
    "mount",
    "umount",
];

/// Packed when the host has them.
const OPTIONAL_TOOLS: &[&str] = &[
    "mke2fs",
    "e2fsck",
    "fsck.ext4",
    "tune2fs",
    "dumpe2fs",
    "xfs_repair",
    "xfs_db",
    "xfs_io",
    "xfs_info",
    "xfs_spaceman",
    "xfs_admin",
    "findmnt",
    "lsblk",
    "blockdev",
    "wipefs",
    "fsck",
    "fstrim",
    "losetup",
];

/// Where the node binary lives in the guest (on PATH).
pub const NODE_BINARY_IN_GUEST: &str = "/usr/bin/virtdisk-csi";
/// Where qemu-guest-agent lives in the guest; /init starts it on the port named
/// `org.qemu.guest_agent.0`, logging to [`GUEST_AGENT_LOG`].
pub const GUEST_AGENT_IN_GUEST: &str = "/usr/sbin/qemu-ga";
/// qemu-guest-agent's log in the guest (verbose: every command it runs).
pub const GUEST_AGENT_LOG: &str = "/run/qemu-ga.log";

pub fn build(
    cache: &Path,
    kernel: &Kernel,
    busybox: &Path,
    guest_agent: &Path,
    node_binary: &Path,
) -> Result<PathBuf, Skip> {
    let archive = contents(kernel, busybox, guest_agent, node_binary)?;
    let dir = cache.join("initramfs");
    std::fs::create_dir_all(&dir).map_err(|e| Skip(format!("{}: {e}", dir.display())))?;
    world_readable_dir(&dir);
    let path = dir.join(format!("{}.cpio", cache_key(&archive)));
    if path.exists() {
        // Marks it as in use for `prune`.
        if let Ok(f) = std::fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        return Ok(path);
    }
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).map_err(|e| Skip(format!("{}: {e}", tmp.display())))?,
    );
    archive
        .write_to(&mut out)
        .and_then(|()| std::io::Write::flush(&mut out))
        .unwrap_or_else(|e| panic!("writing the initramfs {}: {e}", tmp.display()));
    drop(out);
    std::fs::rename(&tmp, &path).expect("renaming the initramfs into place");
    prune(&dir, &path);
    Ok(path)
}

fn contents(
    kernel: &Kernel,
    busybox: &Path,
    guest_agent: &Path,
    node_binary: &Path,
) -> Result<Archive, Skip> {
    let mut a = Archive::default();
    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "var/lib", "mnt"] {
        a.dir(dir);
    }
    // The kernel opens /dev/console for init before /init can mount devtmpfs.
    a.char_device("dev/console", 5, 1, 0o600);
    a.char_device("dev/null", 1, 3, 0o666);
    a.file("bin/busybox", busybox, 0o755);
    a.bytes("init", INIT, 0o755);
    a.bytes("sbin/vdt-block-event", BLOCK_EVENT, 0o755);
    a.bytes("sbin/vdt-disk-serial", DISK_SERIAL, 0o755);
    a.bytes("sbin/vdt-exec", EXEC, 0o755);
    a.bytes("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
    a.bytes("etc/group", "root:x:0:\ndisk:x:6:\n", 0o644);
    a.symlink("etc/mtab", "/proc/self/mounts");
    if Path::new("/etc/mke2fs.conf").exists() {
        a.file("etc/mke2fs.conf", Path::new("/etc/mke2fs.conf"), 0o644);
    }

    let modules = module_load_order(&kernel.modules, MODULES)?;
    let mut list = String::new();
    for (name, path) in &modules {
        a.file(&format!("lib/modules/{name}.ko"), path, 0o644);
        list.push_str(name);
        list.push('\n');
    }
    a.bytes("etc/vdt/modules", list, 0o644);

    let mut executables: Vec<(String, PathBuf)> = Vec::new();
    for tool in REQUIRED_TOOLS {
        let path = which(tool).ok_or_else(|| {
            Skip(format!(
                "{tool} is not installed on the host (needed in the guest: install e2fsprogs, xfsprogs, util-linux, mount)"
            ))
        })?;
        executables.push((path.display().to_string(), path));
    }
    for tool in OPTIONAL_TOOLS {
        if let Some(path) = which(tool) {
            executables.push((path.display().to_string(), path));
        }
    }
    check_no_libvirt(node_binary);
    executables.push((NODE_BINARY_IN_GUEST.to_string(), node_binary.to_path_buf()));
    executables.push((GUEST_AGENT_IN_GUEST.to_string(), guest_agent.to_path_buf()));
    let mut libraries = BTreeSet::new();
    let mut elf_tools = String::new();
    for (in_guest, host) in &executables {
        a.file(in_guest, host, 0o755);
        let libs = shared_libraries(host);
        if !libs.is_empty() {
            elf_tools.push_str(in_guest);
            elf_tools.push('\n');
        }
        libraries.extend(libs);
    }
    // /init checks that each of these finds its libraries in the guest.
    a.bytes("etc/vdt/elf-tools", elf_tools, 0o644);
    for lib in &libraries {
        a.file(&lib.display().to_string(), lib, 0o755);
    }
    Ok(a)
}

/// A key over everything the archive holds: paths, modes, scripts, and each host file's
/// size and modification time (cheaper than hashing ~40 MB on every run).
fn cache_key(archive: &Archive) -> String {
    let mut h = Sha256::new();
    h.update(archive.describe());
    for (path, source) in archive.sources() {
        let meta =
            std::fs::metadata(source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        h.update(format!(
            "{path} {} {} {}\n",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        ));
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Removes initramfs files unused for a day (a running guest read its copy when it started).
fn prune(dir: &Path, keep: &Path) {
    let day = std::time::Duration::from_secs(24 * 3600);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        if path != keep && old {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The node binary must run in a guest without libvirt.
fn check_no_libvirt(binary: &Path) {
    let libs = shared_libraries(binary);
    assert!(
        !libs.iter().any(|l| l.to_string_lossy().contains("libvirt")),
        "{} links libvirt: the guest's node plugin must be built with --no-default-features",
        binary.display()
    );
}

fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.exists())
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`; none for scripts
/// and static binaries.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .expect("ldd (libc-bin)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        assert!(
            !line.contains("not found"),
            "{}: a shared library is missing on the host: {line}",
            binary.display()
        );
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    libs
}

/// `wanted` modules and what they depend on (the `depends=` field of each module's
/// `.modinfo`), dependencies first. Modules built into the kernel are left out.
pub fn module_load_order(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, PathBuf)>, Skip> {
    let mut index = BTreeMap::new();
    index_modules(&modules_dir.join("kernel"), &mut index);
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Path::new(l).file_stem())
        .map(|s| module_name(&s.to_string_lossy()))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit(&module_name(name), &index, &builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<(), Skip> {
    if !seen.insert(name.to_string()) || builtin.contains(name) {
        return Ok(());
    }
    let path = index.get(name).ok_or_else(|| {
        Skip(format!(
            "the guest kernel has no module {name} (neither .ko nor built in)"
        ))
    })?;
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for dep in modinfo_depends(&data) {
        visit(&module_name(&dep), index, builtin, seen, order)?;
    }
    order.push((name.to_string(), path.clone()));
    Ok(())
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            index_modules(&path, index);
        } else if let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            index.insert(module_name(stem), path);
        }
    }
}

/// The kernel treats `-` and `_` in module names alike.
fn module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The `depends=a,b` entry of a module's `.modinfo` section (NUL-separated `key=value`s).
pub fn modinfo_depends(data: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(start) = data.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let value = &data[start + key.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}
