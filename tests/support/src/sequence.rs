//! A writer whose order across several volumes shows in any snapshot of them. Write `i` goes
//! to volume `i % n`, block `i / n`, and fills that block with the byte `(i / n) % 250 + 1`, one
//! write after the other (each completes before the next starts). A state of the volumes taken
//! at one point of that stream holds exactly the first `T` writes for some `T`: volume `v`
//! holds its first `ceil((T - v) / n)` blocks and nothing after. A snapshot that cut the
//! volumes at different points shows a volume ahead of one before it (or a hole), which
//! [`Sequence::prefix`] reports.
//!
//! ```ignore
//! let seq = Sequence::new(3, 4096);
//! let (volume, offset, byte) = seq.step(7);            // (1, 8192, 3)
//! let counts = [3, 3, 2];                               // leading blocks written per volume
//! assert_eq!(seq.prefix(&counts), Ok(8));               // the first 8 writes, in order
//! let n = seq.written_blocks(&image, 1000);             // counted in a qcow2/raw image
//! ```

use std::path::Path;
use std::process::Command;

/// The write stream over `volumes` volumes in blocks of `block` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Sequence {
    pub volumes: usize,
    pub block: u64,
}

impl Sequence {
    pub fn new(volumes: usize, block: u64) -> Sequence {
        assert!(volumes > 0 && block > 0);
        Sequence { volumes, block }
    }

    /// Write `i`: (volume index, byte offset, fill byte).
    pub fn step(&self, i: u64) -> (usize, u64, u8) {
        let n = self.volumes as u64;
        let block = i / n;
        (
            (i % n) as usize,
            block * self.block,
            (block % 250) as u8 + 1,
        )
    }

    /// The fill byte of block `b` of any volume.
    pub fn byte_of_block(&self, b: u64) -> u8 {
        (b % 250) as u8 + 1
    }

    /// How many writes a state holds, given each volume's count of leading written blocks,
    /// when it is a prefix of the stream; else why it is not.
    pub fn prefix(&self, counts: &[u64]) -> Result<u64, String> {
        assert_eq!(counts.len(), self.volumes);
        let total: u64 = counts.iter().sum();
        let n = self.volumes as u64;
        for (v, &c) in counts.iter().enumerate() {
            let want = (total + n - 1 - v as u64) / n;
            if c != want {
                return Err(format!(
                    "volume {v} holds {c} blocks, but a prefix of {total} writes gives it {want}: \
                     the volumes were not cut at one point of the writes ({counts:?})"
                ));
            }
        }
        Ok(total)
    }

    /// The leading blocks of `image` (qcow2 or raw, read through `qemu-img convert`) that
    /// hold their fill byte, at most `max_blocks`; panics when a block holds a wrong byte or
    /// a written block follows an unwritten one (a hole). The image may be in use (`-U`).
    pub fn written_blocks(&self, image: &Path, max_blocks: u64) -> u64 {
        let dir = tempfile::tempdir().expect("temp dir");
        let raw = dir.path().join("image.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(image)
            .arg(&raw)
            .env("LC_ALL", "C")
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "qemu-img convert {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&raw).expect("reading the raw copy");
        let bs = self.block as usize;
        let mut count = 0;
        let mut ended = false;
        for (b, chunk) in data.chunks(bs).take(max_blocks as usize).enumerate() {
            let want = self.byte_of_block(b as u64);
            if chunk.iter().all(|&x| x == 0) {
                ended = true;
                continue;
            }
            assert!(
                !ended,
                "{}: block {b} is written after an unwritten block",
                image.display()
            );
            assert!(
                chunk.iter().all(|&x| x == want),
                "{}: block {b} does not hold {want:#x} throughout",
                image.display()
            );
            count += 1;
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_cuts_at_different_points() {
        let s = Sequence::new(3, 512);
        assert_eq!(s.step(0), (0, 0, 1));
        assert_eq!(s.step(4), (1, 512, 2));
        assert_eq!(s.prefix(&[0, 0, 0]), Ok(0));
        assert_eq!(s.prefix(&[1, 0, 0]), Ok(1));
        assert_eq!(s.prefix(&[3, 3, 2]), Ok(8));
        assert_eq!(s.prefix(&[3, 3, 3]), Ok(9));
        // Volume 2 ahead of volume 0, or behind volume 1 by two: not one point.
        assert!(s.prefix(&[2, 2, 3]).is_err());
        assert!(s.prefix(&[3, 3, 1]).is_err());
        assert!(s.prefix(&[3, 1, 1]).is_err());
    }
}

/// A disk the writer writes to: its domain (on the libvirtd at `uri`) and its device id (the
/// disk's alias in the live XML). `TestDomain::monitor_disk` makes one.
#[derive(Debug, Clone)]
pub struct MonitorDisk {
    pub uri: String,
    pub domain: String,
    pub device: String,
}

/// The stream written by the QEMU of running domains, as their guests would write: HMP
/// `qemu-io -d <device>` on each volume's disk, one write after the other, from a thread.
///
/// A guest's writes stop when its vCPUs are paused, but HMP's `qemu-io` writes to the block
/// backend of a paused domain as well: a writer that went on writing while a group snapshot
/// holds its domains paused lands writes between the cuts of different domains, which no
/// guest can (the cuts then hold a later write on one domain and miss an earlier one on
/// another). So before each write the writer waits while the domain of that write is paused
/// (libvirt's `domstate`), as a guest's next write waits for its vCPU. The check and the write
/// are two calls, so a pause may fall between them and one write land on a paused domain, as
/// a guest's request in flight at the pause does. That keeps the cuts at one point: every
/// domain of a group is paused before its first cut and resumed after its last, so the check
/// after a write that landed after the first cut finds its domain paused, and at most one
/// write lands between the first cut and the last — in its volume's cut or not, either way
/// the cuts hold one prefix of the stream.
pub struct MonitorWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    issued: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MonitorWriter {
    /// Starts writing `seq` to `disks`, one per volume of the sequence.
    pub fn start(seq: Sequence, disks: Vec<MonitorDisk>) -> MonitorWriter {
        use std::sync::atomic::Ordering;
        assert_eq!(disks.len(), seq.volumes);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, count, started) = (stop.clone(), done.clone(), issued.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0;
            while !s.load(Ordering::SeqCst) {
                let (v, offset, byte) = seq.step(i);
                let d = &disks[v];
                wait_running(d, i);
                started.store(i + 1, Ordering::SeqCst);
                let cmd = format!(
                    "qemu-io -d {} \"write -P {byte:#x} {offset} {}\"",
                    d.device, seq.block
                );
                let args = ["qemu-monitor-command", &d.domain, "--hmp", &cmd];
                let out = crate::virsh::virsh_ok_at(&d.uri, &args);
                // HMP's qemu-io prints nothing on success, the failure otherwise.
                assert!(
                    out.trim().is_empty() || out.contains("wrote"),
                    "write {i} to {}/{}: {out}",
                    d.domain,
                    d.device
                );
                i += 1;
                count.store(i, Ordering::SeqCst);
            }
        });
        MonitorWriter {
            stop,
            done,
            issued,
            thread: Some(thread),
        }
    }

    /// Writes completed so far (their `virsh` returned): every one of them is in the image.
    pub fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes started so far: no later one can be in the image yet. A snapshot taken between
    /// `done()` = a and `issued()` = b (read after it) holds between a and b writes; not
    /// `done()` after it, since a write lands before its `virsh` has returned.
    pub fn issued(&self) -> u64 {
        self.issued.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` writes completed.
    pub async fn wait_for(&self, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while self.done() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer did only {} of {n} writes",
                self.done()
            );
            assert!(
                !self.thread.as_ref().is_some_and(|t| t.is_finished()),
                "the writer stopped"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Stops after the write in progress; the number of writes done (a panic of the writer
    /// is raised here).
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
        self.done()
    }
}

/// Waits while the domain of `d` is paused (at most two minutes); panics when it is in any
/// other state than running or paused (it cannot be written to as a guest would).
fn wait_running(d: &MonitorDisk, write: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let state = crate::virsh::virsh_ok_at(&d.uri, &["domstate", &d.domain]);
        match state.trim() {
            "running" => return,
            "paused" if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            other => panic!(
                "write {write} to {}/{}: the domain is {other}, not running",
                d.domain, d.device
            ),
        }
    }
}

impl Drop for MonitorWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
