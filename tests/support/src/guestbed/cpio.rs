//! A `cpio -H newc` archive writer, the format the kernel unpacks as an initramfs. Written here
//! so the test bed needs no `cpio` package. Entries are sorted and every parent directory is
//! emitted before its children, as the kernel's unpacker requires.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    /// Contents read from a host file when the archive is written.
    File {
        source: PathBuf,
        mode: u32,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: String,
    },
    CharDevice {
        major: u32,
        minor: u32,
        mode: u32,
    },
}

/// The archive's contents, keyed by path without the leading `/`.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    pub fn dir(&mut self, path: &str) {
        let key = normalize(path);
        self.add_parents(&key);
        if !key.is_empty() {
            self.entries.entry(key).or_insert(Entry::Dir);
        }
    }

    /// Copies the host file `source` (following symlinks) to `path`.
    pub fn file(&mut self, path: &str, source: &Path, mode: u32) {
        self.put(
            path,
            Entry::File {
                source: source.to_path_buf(),
                mode,
            },
        );
    }

    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.put(
            path,
            Entry::Bytes {
                data: data.into(),
                mode,
            },
        );
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.put(
            path,
            Entry::Symlink {
                target: target.to_string(),
            },
        );
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32, mode: u32) {
        self.put(path, Entry::CharDevice { major, minor, mode });
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&normalize(path))
    }

    /// Host files the archive reads, for cache keys.
    pub fn sources(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.entries.iter().filter_map(|(k, e)| match e {
            Entry::File { source, .. } => Some((k.as_str(), source.as_path())),
            _ => None,
        })
    }

    /// Everything but host file contents, for cache keys.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (path, entry) in &self.entries {
            let line = match entry {
                Entry::Dir => format!("d {path}\n"),
                Entry::File { source, mode } => format!("f {path} {mode:o} {}\n", source.display()),
                Entry::Bytes { data, mode } => {
                    format!("b {path} {mode:o} {}\n", String::from_utf8_lossy(data))
                }
                Entry::Symlink { target } => format!("l {path} {target}\n"),
                Entry::CharDevice { major, minor, mode } => {
                    format!("c {path} {major}:{minor} {mode:o}\n")
                }
            };
            out.push_str(&line);
        }
        out
    }

    fn put(&mut self, path: &str, entry: Entry) {
        let key = normalize(path);
        assert!(!key.is_empty(), "an archive entry needs a path");
        self.add_parents(&key);
        self.entries.insert(key, entry);
    }

    fn add_parents(&mut self, key: &str) {
        let mut parent = Path::new(key).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries
                .entry(p.to_str().expect("utf-8 path").to_string())
                .or_insert(Entry::Dir);
            parent = p.parent();
        }
    }

    /// Writes the archive (sorted: parents precede children) and its trailer.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut ino = 1u32;
        for (path, entry) in &self.entries {
            ino += 1;
            match entry {
                Entry::Dir => header(out, ino, S_IFDIR | 0o755, 0, (0, 0), path)?,
                Entry::File { source, mode } => {
                    let data = std::fs::read(source).map_err(|e| {
                        io::Error::new(e.kind(), format!("reading {}: {e}", source.display()))
                    })?;
                    header(out, ino, S_IFREG | mode, data.len(), (0, 0), path)?;
                    body(out, &data)?;
                }
                Entry::Bytes { data, mode } => {
                    header(out, ino, S_IFREG | mode, data.len(), (0, 0), path)?;
                    body(out, data)?;
                }
                Entry::Symlink { target } => {
                    header(out, ino, S_IFLNK | 0o777, target.len(), (0, 0), path)?;
                    body(out, target.as_bytes())?;
                }
                Entry::CharDevice { major, minor, mode } => {
                    header(out, ino, S_IFCHR | mode, 0, (*major, *minor), path)?
                }
            }
        }
        header(out, 0, 0, 0, (0, 0), "TRAILER!!!")?;
        Ok(())
    }
}

fn normalize(path: &str) -> String {
    path.trim_matches('/').to_string()
}

fn header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let name_size = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        if mode & S_IFDIR == S_IFDIR { 2 } else { 1 },
        0, // mtime: fixed, so equal inputs give equal archives
        u32::try_from(size).expect("initramfs entries are < 4 GiB"),
        0,
        0,
        rdev.0,
        rdev.1,
        name_size as u32,
        0, // check
    ];
    let mut text = String::from("070701");
    for f in fields {
        text.push_str(&format!("{f:08x}"));
    }
    out.write_all(text.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + name_size)
}

fn body(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    out.write_all(data)?;
    pad(out, data.len())
}

fn pad(out: &mut impl Write, len: usize) -> io::Result<()> {
    let zeros = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..zeros])
}
