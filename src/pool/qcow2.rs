//! New, empty images written directly, without a `qemu-img` process: CreateVolume's hot path.
//!
//! An empty qcow2 image is metadata only: a header cluster, a refcount table of one cluster
//! pointing at one refcount block, and a zeroed L1 table. This writes exactly what
//! `qemu-img create -f qcow2 [-b FILE -F qcow2]` of QEMU 7.2 writes (version 3 / compat 1.1,
//! 64 KiB clusters, 16-bit refcounts, zlib compression type, no lazy refcounts, no extended
//! L2, the feature name table, and for overlays the backing file and its format), byte for
//! byte: `tests/qcow2_header.rs` compares the files and `qemu-img info`/`check` against
//! `qemu-img create`. Only the non-zero bytes are written (the header, the refcount table's
//! first entry, the first refcounts); the rest of the file, the zeroed L1 table included, is a
//! hole of the file's length, which reads as the zeros QEMU writes. A create then flushes
//! three small blocks instead of ~200 KiB of zeros (measured on ext4: a two-phase create
//! went from 0.69 to 0.49 ms), and a delete frees three blocks. The metadata's space is thus
//! not taken at create time: like every cluster of a thin image, QEMU allocates it on the first
//! guest write, and a full file system fails that write (`doctor` warns when a pool fills). A
//! raw image is a sparse file of the size with its first 4 KiB written, as `qemu-img create
//! -f raw` leaves it.
//!
//! A blank volume's image is made durable after the journaled commit of the record that names
//! it (`volumes::materialize`, `store::journal`), so after a crash of the machine the record may
//! name an image whose blocks never reached the disk (a hole of the right length, or an empty
//! file), or none (written again when the pool opens: `Pool::recover`). Such an image
//! cannot hold data: QEMU grows the file for its first guest write, and cannot open it
//! without its header. [`repair_empty`] writes it again from the record (size, no backing)
//! when an operation next takes the volume; `tests/store_torn.rs` shows it.
//!
//! Resizing, converting and rebasing stay with `qemu-img` (`qemu_img`): they are not on a hot
//! path and change images that hold data.

use crate::error::{Error, Result};
use crate::model::ImageFormat;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: u32 = 0x5146_49fb;
const VERSION: u32 = 3;
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Bytes one L1 entry maps: an L2 table of CLUSTER / 8 entries, each one cluster.
const L1_ENTRY_SPAN: u64 = (CLUSTER / 8) * CLUSTER;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
const HEADER_LEN: u32 = 112;
const REFCOUNT_TABLE: u64 = CLUSTER;
const REFCOUNT_BLOCK: u64 = 2 * CLUSTER;
const L1_TABLE: u64 = 3 * CLUSTER;
/// QEMU's limit on a backing file name.
const MAX_BACKING_NAME: usize = 1023;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// The feature name table QEMU 7.2 writes: (type: 0 incompatible, 1 compatible, 2 autoclear;
/// bit; name).
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
const FEATURE_NAME_LEN: usize = 46;

/// Where everything of an empty qcow2 image of `size` bytes lies.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    l1_entries: u64,
    /// Clusters holding the L1 table.
    l1_clusters: u64,
    /// The file length (the end of the L1 table).
    len: u64,
}

fn layout(size: u64) -> Layout {
    let l1_entries = size.div_ceil(L1_ENTRY_SPAN).max(1);
    let l1_bytes = l1_entries * 8;
    Layout {
        l1_entries,
        l1_clusters: l1_bytes.div_ceil(CLUSTER),
        len: L1_TABLE + l1_bytes,
    }
}

fn be32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn be64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn pad8(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(8) * 8, 0);
}

/// The header cluster's bytes (header, extensions, backing file name).
fn header_cluster(size: u64, l: &Layout, backing: Option<&str>) -> Vec<u8> {
    let mut ext = Vec::new();
    if backing.is_some() {
        let fmt = ImageFormat::Qcow2.as_str().as_bytes();
        be32(&mut ext, EXT_BACKING_FORMAT);
        be32(&mut ext, fmt.len() as u32);
        ext.extend_from_slice(fmt);
        pad8(&mut ext);
    }
    be32(&mut ext, EXT_FEATURE_NAMES);
    be32(
        &mut ext,
        (FEATURE_NAMES.len() * (2 + FEATURE_NAME_LEN)) as u32,
    );
    for (kind, bit, name) in FEATURE_NAMES {
        ext.push(kind);
        ext.push(bit);
        let mut field = [0u8; FEATURE_NAME_LEN];
        field[..name.len()].copy_from_slice(name.as_bytes());
        ext.extend_from_slice(&field);
    }
    pad8(&mut ext);
    be32(&mut ext, EXT_END);
    be32(&mut ext, 0);

    let backing_offset = u64::from(HEADER_LEN) + ext.len() as u64;
    let mut h = Vec::with_capacity(backing_offset as usize + 64);
    be32(&mut h, MAGIC);
    be32(&mut h, VERSION);
    be64(&mut h, if backing.is_some() { backing_offset } else { 0 });
    be32(&mut h, backing.map_or(0, |b| b.len() as u32));
    be32(&mut h, CLUSTER_BITS);
    be64(&mut h, size);
    be32(&mut h, 0); // no encryption
    be32(&mut h, l.l1_entries as u32);
    be64(&mut h, L1_TABLE);
    be64(&mut h, REFCOUNT_TABLE);
    be32(&mut h, 1); // refcount table clusters
    be32(&mut h, 0); // snapshots
    be64(&mut h, 0); // snapshots offset
    be64(&mut h, 0); // incompatible features
    be64(&mut h, 0); // compatible features
    be64(&mut h, 0); // autoclear features
    be32(&mut h, REFCOUNT_ORDER);
    be32(&mut h, HEADER_LEN);
    h.push(0); // compression type: zlib
    h.resize(HEADER_LEN as usize, 0);
    h.extend_from_slice(&ext);
    if let Some(b) = backing {
        h.extend_from_slice(b.as_bytes());
    }
    h
}

/// A full file system (ENOSPC) or a file past its largest size (EFBIG) keep their errno, and
/// so their gRPC code (`Error::code`).
fn map_err(path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("writing image {}", path.display()), e)
}

/// Creates the image file `path` (which must not exist) of `size` bytes; `backing` (qcow2
/// only) makes it an overlay on that file, named relative to the image's directory. Returns
/// the open file, written but not yet fsynced: the caller makes it durable together with
/// whatever else its commit needs (`fsutil::sync_all_at_once`). Blocking. On error nothing is
/// left behind. (`Store::create_layer` does the same in a pool, reusing a spare inode.)
pub(crate) fn create(
    path: &Path,
    format: ImageFormat,
    size: u64,
    backing: Option<&str>,
) -> Result<File> {
    check(format, backing)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| map_err(path, e))?;
    if let Err(e) = write(&file, format, size, backing) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(map_err(path, e));
    }
    Ok(file)
}

/// Refuses what no image of ours may be: a backing file for raw, a bad backing file name.
pub(crate) fn check(format: ImageFormat, backing: Option<&str>) -> Result<()> {
    if let Some(b) = backing {
        if format != ImageFormat::Qcow2 {
            return Err(Error::internal("only qcow2 images have a backing file"));
        }
        if b.is_empty() || b.len() > MAX_BACKING_NAME || b.contains('\0') {
            return Err(Error::internal(format!("bad backing file name {b:?}")));
        }
    }
    Ok(())
}

/// Writes a new, empty image into the empty file `file` (see `create`; `check` first).
pub(crate) fn write(
    file: &File,
    format: ImageFormat,
    size: u64,
    backing: Option<&str>,
) -> std::io::Result<()> {
    match format {
        ImageFormat::Qcow2 => write_qcow2(file, size, backing),
        ImageFormat::Raw => write_raw(file, size),
    }
}

/// Whether a qcow2 image that `create` made empty for `size` bytes has had data written since:
/// QEMU allocates clusters at the end of the file, so the file has grown past the metadata.
/// Blocking.
pub(crate) fn has_data(path: &Path, size: u64) -> Result<bool> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .len();
    Ok(grown(len, size))
}

/// Whether a qcow2 file of `len` bytes is longer than an empty image of `size` bytes: the
/// first guest write puts clusters past the metadata, so only a longer file can hold data.
fn grown(len: u64, size: u64) -> bool {
    len > layout(size).len
}

/// Whether the image file at `path`, written by `create` for a size that is no longer known
/// (its record was lost), can hold no data: a qcow2 file no longer than the empty image its
/// header describes (without a readable header: than any empty image of at most 4 TiB, the
/// first guest write puts clusters past that), or a raw file with at most its first 4 KiB
/// allocated. A missing file holds none; what is not a regular file is not known to be empty
/// (false). Blocking.
pub(crate) fn holds_no_data(path: &Path, format: ImageFormat) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Ok(false),
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    Ok(match format {
        ImageFormat::Raw => meta.blocks() * 512 <= 4096,
        ImageFormat::Qcow2 => match read_header(path) {
            Ok(h) => !grown(meta.len(), h.size),
            Err(_) => !grown(meta.len(), 1 << 42),
        },
    })
}

/// What a `stat` and one small read tell of an existing image file ([`probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    /// The file's length in bytes.
    pub(crate) len: u64,
    /// Whether it starts as a qcow2 image does (its magic; QEMU checks the rest when it opens
    /// it). Not read, and false, for a raw image.
    pub(crate) magic: bool,
    /// What is there instead, when it is not a regular file ("a fifo", "a directory", …):
    /// no image of any format (QEMU's `file` driver refuses it), so a damaged layer.
    pub(crate) not_regular: Option<&'static str>,
}

/// What is at an image path ([`open_image`]).
#[derive(Debug)]
pub(crate) enum Opened {
    Missing,
    /// Something that is not a regular file: what it is ([`file_kind`]).
    NotRegular(&'static str),
    /// A regular file, open, and its metadata.
    File(File, std::fs::Metadata),
}

/// What a file that is not a regular file is, in words ("a fifo", …).
pub(crate) fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a fifo"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a file"
    }
}

/// Opens the pool file at `path` (read-only, or read-write with `write`), following a
/// symbolic link as QEMU does, without ever blocking on what is there: `O_NONBLOCK` (open(2)
/// of a FIFO otherwise waits for a writer for ever), `O_NOCTTY`, close-on-exec; then an
/// `fstat` of the descriptor tells the file type. Whatever is not a regular file comes back as
/// [`Opened::NotRegular`] (its descriptor closed), also when it cannot be opened at all (a
/// socket: ENXIO). On a regular file `O_NONBLOCK` changes nothing.
///
/// A device node is not opened: a driver acts on open and close (a watchdog arms, a tape
/// rewinds), whatever the flags. So the file is first looked at by a `stat` (which no driver
/// sees), and only a regular file is opened; the `fstat` after the open catches what was
/// swapped in between (a device opened in that instant needs someone with write access to
/// the pool's images/, who could do worse). A stat, an open and an fstat: cheaper than an
/// `O_PATH` look and a reopen through `/proc` (ListVolumes does it per layer). Blocking.
pub(crate) fn open_image(path: &Path, write: bool) -> std::io::Result<Opened> {
    let kind = match std::fs::metadata(path) {
        Ok(m) => m.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Opened::Missing),
        Err(e) => return Err(e),
    };
    if !kind.is_file() {
        return Ok(Opened::NotRegular(file_kind(kind)));
    }
    let opened = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Opened::Missing),
        Err(e) => {
            // A socket (ENXIO), a directory opened for writing (EISDIR), a FIFO without a
            // reader opened for writing (ENXIO): said as what they are.
            return match std::fs::metadata(path) {
                Ok(m) if !m.is_file() => Ok(Opened::NotRegular(file_kind(m.file_type()))),
                _ => Err(e),
            };
        }
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Opened::NotRegular(file_kind(meta.file_type())));
    }
    Ok(Opened::File(file, meta))
}

/// [`open_image`] of a file that must be a regular image file: a missing one is `NotFound`,
/// anything else `InvalidInput` ("is not a regular file (a fifo)"). Blocking.
pub(crate) fn open_regular(path: &Path, write: bool) -> std::io::Result<File> {
    match open_image(path, write)? {
        Opened::File(f, _) => Ok(f),
        Opened::Missing => Err(std::io::ErrorKind::NotFound.into()),
        Opened::NotRegular(what) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is not a regular file ({what})"),
        )),
    }
}

/// Looks at the image file at `path` of `format`: `None` when it is missing; else its length,
/// whether it is a regular file at all, and (qcow2) whether it starts with the qcow2 magic.
/// Raw: a `stat`. Qcow2: a non-blocking open ([`open_image`]), an `fstat` and one 4-byte
/// read. Never blocks on a FIFO. Blocking.
pub(crate) fn probe(path: &Path, format: ImageFormat) -> Result<Option<Probe>> {
    let read_err = |e| Error::io(format!("reading {}", path.display()), e);
    let odd = |what| {
        Ok(Some(Probe {
            len: 0,
            magic: false,
            not_regular: Some(what),
        }))
    };
    if format == ImageFormat::Raw {
        return match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => odd(file_kind(m.file_type())),
            Ok(m) => Ok(Some(Probe {
                len: m.len(),
                magic: false,
                not_regular: None,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_err(e)),
        };
    }
    // Opened once, then stat-ed and read through the descriptor: one path lookup.
    let (file, meta) = match open_image(path, false).map_err(read_err)? {
        Opened::Missing => return Ok(None),
        Opened::NotRegular(what) => return odd(what),
        Opened::File(f, m) => (f, m),
    };
    let mut magic = [0u8; 4];
    let magic = match file.read_exact_at(&mut magic, 0) {
        Ok(()) => u32::from_be_bytes(magic) == MAGIC,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(read_err(e)),
    };
    Ok(Some(Probe {
        len: meta.len(),
        magic,
        not_regular: None,
    }))
}

impl Probe {
    /// Whether the image, of `format`, is damaged: not a regular file, or a qcow2 file that
    /// does not start as a qcow2 image. A raw regular file has nothing more to check.
    pub(crate) fn damaged(&self, format: ImageFormat) -> bool {
        self.not_regular.is_some() || (format == ImageFormat::Qcow2 && !self.magic)
    }

    /// Whether this image, at `path`, of a volume created blank (no backing file) for `size`
    /// bytes is one a crash of the machine left without its blocks, which [`repair_empty`]
    /// writes again: a qcow2 file no longer than an empty image of `size` whose non-zero parts
    /// are not what `create` writes, or a raw file shorter than `size`. Read-only: a qcow2
    /// file without the magic needs no read (its header cannot be whole), one with it up to
    /// three small reads. Blocking.
    pub(crate) fn lost_its_blocks(
        &self,
        path: &Path,
        format: ImageFormat,
        size: u64,
    ) -> Result<bool> {
        if self.not_regular.is_some() {
            return Ok(false);
        }
        Ok(match format {
            ImageFormat::Raw => self.len < size,
            ImageFormat::Qcow2 => {
                !grown(self.len, size) && (!self.magic || !is_whole_empty(path, size)?)
            }
        })
    }
}

/// What [`repair_empty`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repair {
    /// The image is whole (or has been used since it was made): nothing was done.
    Intact,
    /// The image was an empty one whose blocks a crash lost; it was written again, durably.
    Rewritten,
    /// The image is an empty one whose blocks a crash lost, but a process holds it open (QEMU
    /// locks what it uses): it was not touched, and cannot be used until that process lets go.
    Held,
}

/// Makes sure the image of a volume created blank (no backing file) at `path` is whole,
/// writing it again if a crash of the machine lost its blocks (see the module documentation
/// and [`Probe::lost_its_blocks`], which tells it read-only: the volume condition uses it;
/// a raw file is only lengthened). An image some process holds open is
/// never touched ([`Repair::Held`]), nor one that has grown (it has held data), nor a missing one (an operator's
/// mistake looks the same: the operation fails as it would have; on ext4 and xfs, whose
/// journals commit in order, a crash does not leave it; elsewhere operations on the volume
/// answer FAILED_PRECONDITION naming the missing file, see `Pool::check_layers`). Blocking.
pub(crate) fn repair_empty(path: &Path, format: ImageFormat, size: u64) -> Result<Repair> {
    let Some(found) = probe(path, format)? else {
        return Ok(Repair::Intact);
    };
    if !found.lost_its_blocks(path, format, size)? {
        return Ok(Repair::Intact);
    }
    if crate::pool::store::file_is_locked(path)? {
        return Ok(Repair::Held);
    }
    if format == ImageFormat::Raw {
        // A raw image's bytes are the guest's: only its length is restored.
        let file = open_regular(path, true).map_err(|e| map_err(path, e))?;
        file.set_len(size)
            .and_then(|()| file.sync_all())
            .map_err(|e| map_err(path, e))?;
        return Ok(Repair::Rewritten);
    }
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal(format!("{} has no directory", path.display())))?;
    let temp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| map_err(path, e))?;
    // Locked until renamed, so that an open-time sweep of another process leaves it alone.
    crate::pool::store::lock_whole_file(temp.as_file()).map_err(|e| map_err(path, e))?;
    write_qcow2(temp.as_file(), size, None)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| map_err(path, e))?;
    temp.persist(path).map_err(|e| map_err(path, e.error))?;
    crate::fsutil::sync_dir(dir)?;
    Ok(Repair::Rewritten)
}

/// Whether the non-zero parts of the empty qcow2 image at `path` are what `create` writes
/// for `size` (a file too short to hold them is not). Blocking.
fn is_whole_empty(path: &Path, size: u64) -> Result<bool> {
    let file = open_regular(path, false)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    for (offset, want) in qcow2_spans(size, None) {
        let mut got = vec![0u8; want.len()];
        match file.read_exact_at(&mut got, offset) {
            Ok(()) if got == want => {}
            Ok(()) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
    Ok(true)
}

/// What a qcow2 image's header says of its size and backing file.
// Read only by live cuts (hypervisor::snapshot), which need libvirt.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    /// Virtual size in bytes.
    pub(crate) size: u64,
    /// The backing file's name as written (relative to the image's directory, or absolute).
    pub(crate) backing: Option<String>,
    /// The backing file's format (header extension), when named.
    pub(crate) backing_format: Option<String>,
}

/// Reads a qcow2 image's header (any qcow2, not only those `create` made): what `qemu-img
/// info` reports of size and backing file, without a process. Blocking.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(crate) fn read_header(path: &Path) -> Result<Header> {
    let bad =
        |why: &str| Error::internal(format!("{} is not a qcow2 image: {why}", path.display()));
    let file = match open_image(path, false)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
    {
        Opened::File(f, _) => f,
        Opened::Missing => {
            return Err(Error::io(
                format!("reading {}", path.display()),
                std::io::ErrorKind::NotFound.into(),
            ))
        }
        Opened::NotRegular(what) => return Err(bad(&format!("not a regular file ({what})"))),
    };
    let mut cluster = vec![0u8; CLUSTER as usize];
    let mut len = 0;
    while len < cluster.len() {
        match file.read_at(&mut cluster[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
    let h = &cluster[..len];
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(h.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(h.get(at..at + 8)?.try_into().ok()?))
    };
    if u32_at(0) != Some(MAGIC) {
        return Err(bad("no qcow2 magic"));
    }
    let version = u32_at(4).ok_or_else(|| bad("short header"))?;
    let backing_offset = u64_at(8).ok_or_else(|| bad("short header"))? as usize;
    let backing_len = u32_at(16).ok_or_else(|| bad("short header"))? as usize;
    let size = u64_at(24).ok_or_else(|| bad("short header"))?;
    let backing = if backing_offset == 0 || backing_len == 0 {
        None
    } else {
        let name = h
            .get(backing_offset..backing_offset + backing_len)
            .ok_or_else(|| bad("backing file name past the first cluster"))?;
        Some(String::from_utf8_lossy(name).into_owned())
    };
    // Header extensions follow the header (version 2: at 72; version 3: its header_length).
    let mut at = if version >= 3 {
        u32_at(100).ok_or_else(|| bad("short header"))? as usize
    } else {
        72
    };
    let mut backing_format = None;
    while let (Some(kind), Some(ext_len)) = (u32_at(at), u32_at(at + 4)) {
        if kind == EXT_END {
            break;
        }
        let data = h
            .get(at + 8..at + 8 + ext_len as usize)
            .ok_or_else(|| bad("header extension past the first cluster"))?;
        if kind == EXT_BACKING_FORMAT {
            backing_format = Some(String::from_utf8_lossy(data).into_owned());
        }
        at += 8 + (ext_len as usize).div_ceil(8) * 8;
    }
    Ok(Header {
        size,
        backing,
        backing_format,
    })
}

/// The whole file's bytes: header cluster, refcount table, refcount block, zeroed L1 table.
#[cfg(test)]
fn qcow2_bytes(size: u64, backing: Option<&str>) -> Vec<u8> {
    let mut out = vec![0u8; layout(size).len as usize];
    for (offset, bytes) in qcow2_spans(size, backing) {
        out[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
    }
    out
}

/// The non-zero byte ranges of an empty image: (offset, bytes). Everything else is zero.
fn qcow2_spans(size: u64, backing: Option<&str>) -> [(u64, Vec<u8>); 3] {
    let l = layout(size);
    let header = header_cluster(size, &l, backing);
    // Header, refcount table, refcount block and the L1 table: one reference each.
    let refcounts: Vec<u8> = (0..3 + l.l1_clusters)
        .flat_map(|_| 1u16.to_be_bytes())
        .collect();
    [
        (0, header),
        (REFCOUNT_TABLE, REFCOUNT_BLOCK.to_be_bytes().to_vec()),
        (REFCOUNT_BLOCK, refcounts),
    ]
}

fn write_qcow2(file: &File, size: u64, backing: Option<&str>) -> std::io::Result<()> {
    file.set_len(layout(size).len)?;
    for (offset, bytes) in qcow2_spans(size, backing) {
        file.write_all_at(&bytes, offset)?;
    }
    Ok(())
}

fn write_raw(file: &File, size: u64) -> std::io::Result<()> {
    file.set_len(size)?;
    let first = size.min(4096) as usize;
    file.write_all_at(&vec![0u8; first], 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("0123456789abcdef.qcow2");
        create(&base, ImageFormat::Qcow2, 1 << 30, None).unwrap();
        let top = dir.path().join("0123456789abcdef-1.qcow2");
        create(
            &top,
            ImageFormat::Qcow2,
            2 << 30,
            Some("0123456789abcdef.qcow2"),
        )
        .unwrap();
        assert_eq!(
            read_header(&base).unwrap(),
            Header {
                size: 1 << 30,
                backing: None,
                backing_format: None
            }
        );
        assert_eq!(
            read_header(&top).unwrap(),
            Header {
                size: 2 << 30,
                backing: Some("0123456789abcdef.qcow2".into()),
                backing_format: Some("qcow2".into())
            }
        );
        let raw = dir.path().join("r.raw");
        create(&raw, ImageFormat::Raw, 1 << 20, None).unwrap();
        assert!(read_header(&raw).is_err());
    }

    #[test]
    fn layouts_match_qemu_img() {
        // File lengths `qemu-img create -f qcow2` gives (QEMU 7.2).
        for (size, len) in [
            (1u64 << 20, 196_616u64),
            (1 << 30, 196_624),
            (100 << 30, 198_208),
            (1 << 40, 212_992),
            (1 << 50, 16_973_824),
        ] {
            assert_eq!(layout(size).len, len, "size {size}");
        }
        assert_eq!(layout(1 << 50).l1_clusters, 256);
    }

    #[test]
    fn the_header_says_what_it_should() {
        let l = layout(1 << 30);
        let plain = header_cluster(1 << 30, &l, None);
        assert_eq!(&plain[..8], &[0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
        assert_eq!(plain.len(), 0x200);
        let overlay = header_cluster(1 << 30, &l, Some("q1.qcow2"));
        // Where qemu-img puts the backing file name.
        assert_eq!(&overlay[8..16], &0x210u64.to_be_bytes());
        assert_eq!(&overlay[0x210..], b"q1.qcow2");
        assert_eq!(&overlay[0x70..0x78], &[0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 5]);
    }

    #[test]
    fn a_failed_create_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        create(&p, ImageFormat::Qcow2, 1 << 20, None).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), layout(1 << 20).len);
        assert_eq!(qcow2_bytes(1 << 20, None).len() as u64, layout(1 << 20).len);
        assert!(create(&p, ImageFormat::Qcow2, 1 << 20, None).is_err());
        assert!(create(
            &dir.path().join("y.raw"),
            ImageFormat::Raw,
            1 << 20,
            Some("x")
        )
        .is_err());
        assert!(!dir.path().join("y.raw").exists());
    }

    #[test]
    fn an_empty_image_that_lost_its_blocks_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.qcow2");
        let size = 1 << 30;
        create(&p, ImageFormat::Qcow2, size, None).unwrap();
        assert_eq!(
            repair_empty(&p, ImageFormat::Qcow2, size).unwrap(),
            Repair::Intact
        );
        let whole = qcow2_bytes(size, None);
        // What a crash of the machine can leave: zeros of the file's length (the length made
        // it to the disk, the blocks did not), an empty file, a header without its refcounts.
        let zeros = vec![0u8; whole.len()];
        let mut half = zeros.clone();
        half[..512].copy_from_slice(&whole[..512]);
        let lost = |p: &Path| {
            let found = probe(p, ImageFormat::Qcow2).unwrap().unwrap();
            found.lost_its_blocks(p, ImageFormat::Qcow2, size).unwrap()
        };
        assert!(!lost(&p));
        for torn in [zeros, Vec::new(), half] {
            std::fs::write(&p, &torn).unwrap();
            // Told read-only (the volume condition): the file is left as it is.
            assert!(lost(&p));
            assert_eq!(std::fs::read(&p).unwrap(), torn);
            assert_eq!(
                repair_empty(&p, ImageFormat::Qcow2, size).unwrap(),
                Repair::Rewritten
            );
            assert_eq!(std::fs::read(&p).unwrap(), whole);
            assert_eq!(read_header(&p).unwrap().size, size);
        }
        // No temp file is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_image_that_held_data_or_is_open_is_never_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 30;
        // Grown past the metadata (QEMU wrote data): untouched, even with a broken header.
        let p = dir.path().join("grown.qcow2");
        let mut grown = vec![0u8; layout(size).len as usize + CLUSTER as usize];
        grown[layout(size).len as usize..].fill(0xab);
        std::fs::write(&p, &grown).unwrap();
        assert_eq!(
            repair_empty(&p, ImageFormat::Qcow2, size).unwrap(),
            Repair::Intact
        );
        assert_eq!(std::fs::read(&p).unwrap(), grown);
        let found = probe(&p, ImageFormat::Qcow2).unwrap().unwrap();
        assert!(found.damaged(ImageFormat::Qcow2));
        assert!(!found.lost_its_blocks(&p, ImageFormat::Qcow2, size).unwrap());
        // Missing: not recreated (a crash does not leave that; an operator's mistake would).
        let gone = dir.path().join("gone.qcow2");
        assert_eq!(
            repair_empty(&gone, ImageFormat::Qcow2, size).unwrap(),
            Repair::Intact
        );
        assert!(!gone.exists());
        assert_eq!(probe(&gone, ImageFormat::Qcow2).unwrap(), None);
        // Held open and locked (as QEMU holds its images): untouched.
        let open = dir.path().join("open.qcow2");
        std::fs::write(&open, vec![0u8; 4096]).unwrap();
        let locker = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&open)
            .unwrap();
        crate::pool::store::lock_whole_file(&locker).unwrap();
        assert_eq!(
            repair_empty(&open, ImageFormat::Qcow2, size).unwrap(),
            Repair::Held
        );
        assert_eq!(std::fs::read(&open).unwrap(), vec![0u8; 4096]);
        drop(locker);
        // Raw: only a short file is lengthened; its bytes are never written.
        let raw = dir.path().join("r.raw");
        std::fs::write(&raw, [7u8; 16]).unwrap();
        assert_eq!(
            repair_empty(&raw, ImageFormat::Raw, 1 << 20).unwrap(),
            Repair::Rewritten
        );
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 20);
        assert_eq!(std::fs::read(&raw).unwrap()[..16], [7u8; 16]);
        assert_eq!(
            repair_empty(&raw, ImageFormat::Raw, 1 << 20).unwrap(),
            Repair::Intact
        );
    }

    #[test]
    fn an_image_with_data_is_told_from_an_empty_one_without_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.qcow2");
        create(&p, ImageFormat::Qcow2, 1 << 30, None).unwrap();
        assert!(holds_no_data(&p, ImageFormat::Qcow2).unwrap());
        // Grown by a guest write.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[1u8; 4096], layout(1 << 30).len + 2 * CLUSTER)
            .unwrap();
        assert!(!holds_no_data(&p, ImageFormat::Qcow2).unwrap());
        // Its header zeroed: still too long to be an empty image.
        f.write_all_at(&[0u8; 512], 0).unwrap();
        assert!(!holds_no_data(&p, ImageFormat::Qcow2).unwrap());
        // A header a crash lost, on an image that never grew.
        let q = dir.path().join("w.qcow2");
        std::fs::write(&q, vec![0u8; layout(1 << 30).len as usize]).unwrap();
        assert!(holds_no_data(&q, ImageFormat::Qcow2).unwrap());
        assert!(holds_no_data(&dir.path().join("none"), ImageFormat::Qcow2).unwrap());
        let r = dir.path().join("r.raw");
        create(&r, ImageFormat::Raw, 1 << 30, None).unwrap();
        assert!(holds_no_data(&r, ImageFormat::Raw).unwrap());
        let f = OpenOptions::new().write(true).open(&r).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        f.sync_all().unwrap();
        assert!(!holds_no_data(&r, ImageFormat::Raw).unwrap());
    }

    /// A dangling symbolic link at an image's path is a missing image, raw or qcow2; a link
    /// to a real image is looked at through the link.
    #[test]
    fn a_dangling_link_probes_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("v.qcow2");
        std::os::unix::fs::symlink(dir.path().join("gone"), &link).unwrap();
        for format in [ImageFormat::Qcow2, ImageFormat::Raw] {
            assert!(probe(&link, format).unwrap().is_none(), "{format:?}");
        }
        let real = dir.path().join("real.qcow2");
        create(&real, ImageFormat::Qcow2, 1 << 30, None).unwrap();
        let to_real = dir.path().join("w.qcow2");
        std::os::unix::fs::symlink(&real, &to_real).unwrap();
        let found = probe(&to_real, ImageFormat::Qcow2).unwrap().unwrap();
        assert!(!found.damaged(ImageFormat::Qcow2));
    }

    /// What is not a regular file at an image's path (a FIFO, a socket, a directory) is a
    /// damaged layer of any format, found at once: nothing opens it in a way that can block,
    /// and nothing writes it.
    #[test]
    fn what_is_not_a_regular_file_is_damaged_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f.qcow2");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let sock = dir.path().join("s.qcow2");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let sub = dir.path().join("d.qcow2");
        std::fs::create_dir(&sub).unwrap();
        // Through a symbolic link too (layer paths are followed, as QEMU follows them).
        let link = dir.path().join("l.qcow2");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let null = dir.path().join("n.qcow2");
        std::os::unix::fs::symlink("/dev/null", &null).unwrap();
        for (path, what) in [
            (&fifo, "a fifo"),
            (&sock, "a socket"),
            (&sub, "a directory"),
            (&link, "a fifo"),
            // Never opened: a driver acts on open and close whatever the flags.
            (&null, "a character device"),
        ] {
            for format in [ImageFormat::Qcow2, ImageFormat::Raw] {
                let found = probe(path, format).unwrap().unwrap();
                assert_eq!(found.not_regular, Some(what), "{path:?} {format:?}");
                assert!(found.damaged(format));
                assert!(!found.lost_its_blocks(path, format, 1 << 20).unwrap());
                assert_eq!(repair_empty(path, format, 1 << 20).unwrap(), Repair::Intact);
                assert!(!holds_no_data(path, format).unwrap());
            }
            assert!(read_header(path)
                .unwrap_err()
                .to_string()
                .contains(&format!("not a regular file ({what})")));
            for write in [false, true] {
                let e = open_regular(path, write).unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{path:?}");
            }
            assert!(!crate::pool::store::file_is_locked(path).unwrap());
        }
    }
}
