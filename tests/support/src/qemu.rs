//! qemu-img and qemu-io on image files, outside the plugin: what a test uses to make images,
//! check them, and write and read back data patterns.
//!
//! ```ignore
//! let info = qemu_img_info(&image);                 // `qemu-img info -U --output=json`
//! qemu_img_check(&image);                           // must pass
//! write_pattern(&image, 0xaa, 0, 1 << 20);          // qemu-io write -P
//! assert_pattern(&image, 0xaa, 0, 1 << 20);         // qemu-io read -P, force-share
//! qemu_io(&image, &["read -v 0 16"], Read::LockedNow);  // any commands, their output
//! let held = ImageHolder::open(&image);             // a qemu-io holding it open, locked
//! ```
//!
//! Every qemu-io run waits (5 s at most) while another process holds the image's lock (the
//! plugin's background flattener takes one for a moment), except force-share reads, which
//! need no lock.

use crate::run_ok;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `qemu-img <args>`, which must succeed: its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok("qemu-img", args)
}

/// `qemu-img info -U --output=json` of an image.
pub fn qemu_img_info(path: &Path) -> Value {
    let out = qemu_img(&["info", "-U", "--output=json", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

/// The backing file an image's header names, if any.
pub fn backing_of(path: &Path) -> Option<String> {
    qemu_img_info(path)["backing-filename"]
        .as_str()
        .map(str::to_string)
}

/// `qemu-img check -U` passes.
pub fn qemu_img_check(path: &Path) {
    qemu_img(&["check", "-U", path.to_str().unwrap()]);
}

/// A new qcow2 image of `size` bytes.
pub fn create_qcow2(path: &Path, size: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
}

/// A new qcow2 overlay on `backing` (named as given: relative names are relative to the
/// overlay's directory), of `size` bytes or the backing file's size.
pub fn create_overlay(path: &Path, backing: &str, size: Option<u64>) {
    let size = size.map(|s| s.to_string());
    let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2"];
    args.push(path.to_str().unwrap());
    args.extend(size.as_deref());
    qemu_img(&args);
}

/// How qemu-io opens an image to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Read-only with force-share (`-r -U`): also an image a running domain has open.
    Shared,
    /// Read-only, taking the image's lock (`-r`), waiting (5 s at most) while another process
    /// holds it (the background flattener, for a moment).
    Locked,
    /// Read-only, taking the image's lock (`-r`) and failing at once when another process
    /// holds it: a read that works proves nothing else has the image open.
    LockedNow,
}

/// Runs qemu-io commands on an image (its format detected); only reads: it opens the image as
/// `read` says, else read-write, waiting while another process holds it. Returns whether every
/// command succeeded (a pattern mismatch is a failure) and the output.
pub fn qemu_io(image: &Path, cmds: &[&str], read: Read) -> (bool, String) {
    let format = qemu_img_info(image)["format"]
        .as_str()
        .unwrap_or("qcow2")
        .to_string();
    let readonly = cmds.iter().all(|c| c.starts_with("read"));
    for tries in 0.. {
        let mut c = Command::new("qemu-io");
        c.args(["-f", &format]);
        if readonly {
            c.arg("-r");
            if read == Read::Shared {
                c.arg("-U");
            }
        }
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c.arg(image).output().expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let locked = text.contains("Failed to get") && text.contains("lock");
        if locked && tries < 50 && !(readonly && read == Read::LockedNow) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        return (out.status.success() && !text.contains("failed"), text);
    }
    unreachable!()
}

/// Writes `len` bytes of `byte` at `offset` into an image.
pub fn write_pattern(image: &Path, byte: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {byte:#x} {offset} {len}");
    let (ok, text) = qemu_io(image, &[&cmd], Read::Locked);
    assert!(ok, "qemu-io write into {}: {text}", image.display());
}

/// Reads `len` bytes at `offset` (as `read` says): Ok when all are `byte`, else what qemu-io
/// said.
pub fn reads_pattern(
    image: &Path,
    byte: u8,
    offset: u64,
    len: u64,
    read: Read,
) -> Result<(), String> {
    let cmd = format!("read -P {byte:#x} {offset} {len}");
    match qemu_io(image, &[&cmd], read) {
        (true, _) => Ok(()),
        (false, text) => Err(text),
    }
}

/// Whether `len` bytes at `offset` all read as `byte` (a force-share read).
pub fn has_pattern(image: &Path, byte: u8, offset: u64, len: u64) -> bool {
    reads_pattern(image, byte, offset, len, Read::Shared).is_ok()
}

/// Asserts `len` bytes at `offset` all read as `byte` (a force-share read).
pub fn assert_pattern(image: &Path, byte: u8, offset: u64, len: u64) {
    assert_reads(image, byte, offset, len, Read::Shared);
}

/// Asserts `len` bytes at `offset` all read as `byte` (read as `read` says).
pub fn assert_reads(image: &Path, byte: u8, offset: u64, len: u64, read: Read) {
    if let Err(text) = reads_pattern(image, byte, offset, len, read) {
        panic!(
            "{} does not read {byte:#x} at {offset}+{len}: {text}",
            image.display()
        );
    }
}

/// A `qemu-io` process that holds an image open read-write, with the locks QEMU takes on every
/// image it uses, as a domain or a qemu-storage-daemon holds an attached volume's image. It
/// waits for commands on its stdin, kept open; dropping the holder ends it (and its locks).
pub struct ImageHolder {
    child: Child,
}

impl ImageHolder {
    /// Starts the holder on the qcow2 `image`; returns once the image is locked (10 s at most).
    pub fn open(image: &Path) -> ImageHolder {
        let child = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(image)
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let mut holder = ImageHolder { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_locked(image) {
            if let Ok(Some(status)) = holder.child.try_wait() {
                panic!("qemu-io on {} exited: {status}", image.display());
            }
            assert!(
                Instant::now() < deadline,
                "qemu-io never locked {}",
                image.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        holder
    }
}

impl Drop for ImageHolder {
    fn drop(&mut self) {
        // End of input ends qemu-io; a kill makes sure.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether some process holds a lock on the file at `path` (an open-file-description lock
/// query, what the plugin asks before it removes or empties an image).
pub fn is_locked(path: &Path) -> bool {
    use nix::fcntl::{fcntl, FcntlArg};
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)).expect("F_OFD_GETLK");
    probe.l_type != libc::F_UNLCK as libc::c_short
}
