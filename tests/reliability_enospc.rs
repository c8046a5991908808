//! A full filesystem: pools on a small loop-mounted ext4 that fills up (bytes, then inodes)
//! while volumes are created, snapshotted (alone and in groups), restored and expanded. Every
//! such call answers RESOURCE_EXHAUSTED, leaves nothing half-made (no temp file, record, layer,
//! group or unfinished switch), and the volumes already there keep their data; once space is
//! freed the same calls succeed without restarting the plugin. Needs root (mount, loop
//! devices).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use virtdisk_test_support::calls::*;
use virtdisk_test_support::pool::{assert_pool_clean, volume_image, PoolView};
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::run_cmd as run;

const M: u64 = 1 << 20;

/// A small ext4 filesystem in an image file, loop-mounted; unmounted (and its loop device
/// released: `-o loop` sets autoclear) on drop, also when the test fails.
struct SmallFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl SmallFs {
    /// `inodes`: how many inodes mkfs makes (None: its default).
    fn new(size_mib: u64, inodes: Option<u32>) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mib * M)
            .unwrap();
        let mut mkfs = Command::new("mkfs.ext4");
        // No root reserve: root would write into it, past what statvfs calls available.
        mkfs.args(["-q", "-F", "-m", "0"]);
        if let Some(n) = inodes {
            mkfs.args(["-N", &n.to_string()]);
        }
        run(mkfs.arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt));
        SmallFs { _dir: dir, mnt }
    }

    fn pool(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }

    /// Fills the filesystem with a filler file until ENOSPC, then gives `leave` bytes back.
    fn fill_leaving(&self, leave: u64) {
        let path = self.mnt.join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        // Big chunks first, then single blocks for the last corners.
        for size in [1 << 20, 4096] {
            let chunk = vec![0xeeu8; size];
            loop {
                match f.write(&chunk) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => panic!("filling: {e}"),
                }
            }
        }
        let _ = f.sync_all();
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(leave)).unwrap();
        f.sync_all().unwrap();
        drop(f);
        // Let a freshly filled ext4 settle its delayed-allocation reservations.
        run(Command::new("sync").arg("-f").arg(&self.mnt));
        eprintln!("filesystem filled: {} bytes free", self.free_bytes());
    }

    fn unfill(&self) {
        let _ = std::fs::remove_file(self.mnt.join("filler"));
        run(Command::new("sync").arg("-f").arg(&self.mnt));
    }

    /// Creates empty files until no inode is left, then frees `leave` of them.
    fn use_up_inodes_leaving(&self, leave: usize) {
        let dir = self.mnt.join("inodes");
        let _ = std::fs::create_dir(&dir);
        let mut made = Vec::new();
        for i in 0.. {
            let p = dir.join(i.to_string());
            match std::fs::File::create(&p) {
                Ok(_) => made.push(p),
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("using up inodes: {e}"),
            }
        }
        for p in made.iter().rev().take(leave) {
            std::fs::remove_file(p).unwrap();
        }
    }

    fn free_inodes(&self) {
        let _ = std::fs::remove_dir_all(self.mnt.join("inodes"));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn can_run() -> bool {
    let ok = nix::unistd::geteuid().is_root() && Path::new("/dev/loop-control").exists();
    if !ok {
        eprintln!("SKIPPED: needs root and loop devices");
    }
    ok
}

fn exhausted<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::ResourceExhausted, "{what}: {e:?}");
    eprintln!("{what}: RESOURCE_EXHAUSTED: {}", e.message());
}

fn record_of(pool: &Path, id: &str) -> serde_json::Value {
    PoolView::read(pool).volume(id).cloned().expect("record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_filesystem_is_resource_exhausted_and_leaves_nothing_half_made() {
    if !can_run() {
        return;
    }
    let fs = SmallFs::new(64, None);
    let (small, tight) = (fs.pool("small"), fs.pool("tight"));
    let config = format!(
        "[libvirt]\nenabled = false\n\
         [[pool]]\nname = \"small\"\npath = \"{}\"\n\
         [[pool]]\nname = \"tight\"\npath = \"{}\"\nformat = \"raw\"\novercommit = false\n",
        small.display(),
        tight.display()
    );
    let p = Plugin::start_with_config("controller", &config, &[]).await;
    let keep = create_volume(&p, "keep", 16 * MIB, &[("pool", "small")])
        .await
        .unwrap();
    write_pattern(&volume_image(&small, &keep), 0x5a, 0, 4 * M);
    let snap0 = snapshot(&p, "snap0", &keep).await.unwrap();
    write_pattern(&volume_image(&small, &keep), 0x6b, 4 * M, M);
    let other = create_volume(&p, "other", 16 * MIB, &[("pool", "small")])
        .await
        .unwrap();
    let raw = create_volume(&p, "raw", 8 * MIB, &[("pool", "tight")])
        .await
        .unwrap();
    write_pattern(&volume_image(&tight, &raw), 0x7c, 0, M);

    let unharmed = || {
        let img = volume_image(&small, &keep);
        assert_pattern(&img, 0x5a, 0, 4 * M);
        assert_pattern(&img, 0x6b, 4 * M, M);
        assert_pattern(&volume_image(&tight, &raw), 0x7c, 0, M);
        let r = record_of(&small, &keep);
        assert_eq!(r["capacity_bytes"], 16 * MIB, "{r}");
        assert_eq!(qemu_img_info(&img)["virtual-size"], 16 * MIB);
        assert_pool_clean(&small);
        assert_pool_clean(&tight);
        assert!(PoolView::read(&small).groups.is_empty(), "no group left");
    };

    // 1.5 MiB left: a 1 PiB qcow2 volume (thin, as the pool allows) is still made: its
    // 16 MiB L1 table is a hole, like every cluster QEMU allocates when the guest writes.
    fs.fill_leaving(3 * M / 2);
    let huge = create_volume(&p, "huge", 1 << 50, &[("pool", "small")])
        .await
        .expect("a 1 PiB thin volume");
    let taken = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(volume_image(&small, &huge)).unwrap(),
    ) * 512;
    assert!(
        taken <= 64 * 1024,
        "a 1 PiB empty image takes {taken} bytes"
    );
    assert_eq!(
        qemu_img_info(&volume_image(&small, &huge))["virtual-size"],
        1i64 << 50
    );
    delete_volume(&p, &huge).await.unwrap();
    // Raw without overcommit: refused before anything is written, for create and growth.
    exhausted(
        create_volume(&p, "raw-big", 8 * MIB, &[("pool", "tight")]).await,
        "create a raw volume larger than the free space",
    );
    exhausted(
        expand(&p, &raw, 16 * MIB).await,
        "grow a raw volume past the free space",
    );
    assert_eq!(list_volumes(&p).await.get(&raw), Some(&(8 * MIB)));
    unharmed();

    // 128 KiB left: a grown L1 table (64 TiB: 1 MiB) does not fit. (A new layer is three
    // metadata blocks, so snapshots, restores and clones fail only when nothing is left.)
    fs.fill_leaving(128 * 1024);
    exhausted(expand(&p, &keep, 64 << 40).await, "grow to 64 TiB");
    unharmed();

    // Nothing left: even the records cannot be written.
    fs.fill_leaving(0);
    exhausted(
        snapshot(&p, "snap1", &keep).await,
        "snapshot with no space at all",
    );
    exhausted(
        create_from(&p, "restored", from_snapshot(&snap0)).await,
        "restore with no space at all",
    );
    exhausted(
        create_from(&p, "clone", from_volume(&keep)).await,
        "clone with no space at all",
    );
    exhausted(
        group_snapshot(&p, "group1", &[&keep, &other]).await,
        "group snapshot with no space at all",
    );
    exhausted(
        create_volume(&p, "tiny", MIB, &[("pool", "small")]).await,
        "create with no space",
    );
    unharmed();
    assert_eq!(list_snapshots(&p).await.len(), 1);

    // Space comes back: the same calls succeed, without a restart.
    fs.unfill();
    let snap1 = snapshot(&p, "snap1", &keep).await.expect("snapshot");
    let restored = create_from(&p, "restored", from_snapshot(&snap0))
        .await
        .expect("restore");
    assert_pattern(&volume_image(&small, &restored), 0x5a, 0, 4 * M);
    assert_pattern(&volume_image(&small, &restored), 0, 4 * M, M);
    let from1 = create_from(&p, "from1", from_snapshot(&snap1))
        .await
        .expect("restore");
    assert_pattern(&volume_image(&small, &from1), 0x6b, 4 * M, M);
    assert_eq!(expand(&p, &keep, 32 * MIB).await.unwrap(), 32 * MIB);
    assert_eq!(expand(&p, &raw, 16 * MIB).await.unwrap(), 16 * MIB);
    let group1 = group_snapshot(&p, "group1", &[&keep, &other])
        .await
        .expect("group snapshot");
    assert_eq!(group_members(&p, &group1).await.unwrap().len(), 2);
    assert_pattern(&volume_image(&small, &keep), 0x5a, 0, 4 * M);
    assert_pattern(&volume_image(&tight, &raw), 0x7c, 0, M);
    assert_pool_clean(&small);
    assert_pool_clean(&tight);
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_inodes_during_create_is_resource_exhausted() {
    if !can_run() {
        return;
    }
    let fs = SmallFs::new(32, Some(64));
    let pool = fs.pool("pool");
    let config = format!(
        "[libvirt]\nenabled = false\n[[pool]]\nname = \"p\"\npath = \"{}\"\n",
        pool.display()
    );
    let p = Plugin::start_with_config("controller", &config, &[]).await;
    let keep = create_volume(&p, "keep", 16 * MIB, &[]).await.unwrap();
    write_pattern(&volume_image(&pool, &keep), 0x5a, 0, M);

    // One inode left: the record takes it, the image file finds none (qemu-img fails).
    fs.use_up_inodes_leaving(1);
    exhausted(
        create_volume(&p, "one-short", 16 * MIB, &[]).await,
        "create with one inode left",
    );
    assert_pool_clean(&pool);
    // None left: the record itself cannot be written.
    fs.use_up_inodes_leaving(0);
    exhausted(
        create_volume(&p, "none-left", 16 * MIB, &[]).await,
        "create with no inode left",
    );
    exhausted(snapshot(&p, "snap", &keep).await, "snapshot with no inode");
    exhausted(
        group_snapshot(&p, "group", &[&keep]).await,
        "group snapshot with no inode",
    );
    assert!(PoolView::read(&pool).groups.is_empty(), "no group left");
    assert_pool_clean(&pool);
    assert_eq!(list_volumes(&p).await.len(), 1);
    assert_pattern(&volume_image(&pool, &keep), 0x5a, 0, M);

    fs.free_inodes();
    create_volume(&p, "one-short", 16 * MIB, &[])
        .await
        .expect("create once inodes are free");
    snapshot(&p, "snap", &keep).await.expect("snapshot");
    group_snapshot(&p, "group", &[&keep])
        .await
        .expect("group snapshot once inodes are free");
    assert_pool_clean(&pool);
    drop(p);
}
