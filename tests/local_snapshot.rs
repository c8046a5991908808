//! Live snapshots of volumes attached to this host (monolith, local attach: a
//! qemu-storage-daemon FUSE export + loop device per volume), against the real things: the
//! daemon switches its export to the new overlay over QMP while the file system stays mounted,
//! the snapshot restores what was synced before it and nothing written after, its file system
//! is clean (frozen around the switch), the volume keeps working, a plugin killed afterwards
//! adopts the daemon whose active layer changed, and everything comes apart cleanly. Needs
//! root.

use std::path::Path;
use std::time::Instant;
use virtdisk_test_support::calls::{delete_group, expand, group_members, group_snapshot};
use virtdisk_test_support::local_attach::*;
use virtdisk_test_support::prelude::*;

const SHORT_WAIT: &str = "[node]\ndevice_wait_secs = 2\n";

/// CreateSnapshot of `vol`, which must succeed ready to use; prints how long it took.
async fn snapshot(env: &Env, name: &str, vol: &csi::Volume) -> csi::Snapshot {
    let started = Instant::now();
    let snap = env
        .plugin
        .controller()
        .snapshot(snapshot_req(&unique(name), &vol.volume_id))
        .await
        .unwrap();
    eprintln!(
        "CreateSnapshot {name} of an attached volume: {} ms",
        started.elapsed().as_millis()
    );
    assert!(snap.ready_to_use, "{snap:?}");
    if let Some(line) = env
        .plugin
        .log()
        .lines()
        .rfind(|l| l.contains("live snapshot cut"))
    {
        eprintln!("  {line}");
    }
    snap
}

/// The image the slot of `vol` records as attached.
fn recorded_image(env: &Env, vol: &csi::Volume) -> String {
    let state = env
        .plugin
        .data_dir()
        .join("localattach")
        .join(key_of(&vol.volume_id))
        .join("state.json");
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
    rec["image"].as_str().unwrap().to_string()
}

fn read(dir: &str, name: &str) -> Option<Vec<u8>> {
    std::fs::read(Path::new(dir).join(name)).ok()
}

/// Restores `snapshot_id` as a new volume named after `tag`: its file system is clean (no
/// journal to replay), `present` (file, content) reads back and `absent` is not there; then
/// the restore goes.
async fn check_restore(
    env: &Env,
    tag: &str,
    snapshot_id: &str,
    cap: &csi::VolumeCapability,
    present: (&str, &[u8]),
    absent: &str,
) {
    let (restored, rctx) = env.restored(tag, snapshot_id, cap).await;
    assert_fsck_clean(&rctx["devicePath"]);
    let rs = env.staging(tag);
    env.stage(&restored, &rctx, &rs, cap).await.unwrap();
    assert_eq!(read(&rs, present.0).as_deref(), Some(present.1));
    assert_eq!(read(&rs, absent), None, "{absent} is not in the snapshot");
    env.unstage_twice(&restored, &rs).await;
    env.controller_unpublish(&restored).await.unwrap();
    env.delete(&restored).await;
}

/// New ext4 volumes of 32 MiB named after `tags`, published to this host and staged: (volume,
/// staging path) each.
async fn staged(
    env: &Env,
    tags: &[&str],
    cap: &csi::VolumeCapability,
) -> Vec<(csi::Volume, String)> {
    let mut vols = Vec::new();
    for tag in tags {
        let (vol, ctx) = env.attached(tag, 32 * MIB, cap).await;
        let staging = env.staging(tag);
        env.stage(&vol, &ctx, &staging, cap).await.unwrap();
        vols.push((vol, staging));
    }
    vols
}

/// Unstages, unpublishes and deletes what `staged` made.
async fn remove_staged(env: &Env, vols: &[(csi::Volume, String)]) {
    for (vol, staging) in vols {
        env.unstage(vol, staging).await.unwrap();
        env.controller_unpublish(vol).await.unwrap();
        env.delete(vol).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_a_mounted_volume_then_restore_restart_and_teardown() {
    let Some(mut env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (vol, ctx) = env.attached("snap", 64 * MIB, &cap).await;
    let (s, t) = (env.staging("snap"), env.target("snap"));
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    write_file(&t, "a.txt", b"before the snapshot");
    let pid = env.daemon_pid(&vol).expect("a storage daemon");
    let first_image = recorded_image(&env, &vol);

    let snap = snapshot(&env, "snap-1", &vol).await;
    // Repeated (a lost reply): the same snapshot, no second switch.
    let again = env
        .plugin
        .controller()
        .snapshot(snapshot_req(&unique("snap-1"), &vol.volume_id))
        .await
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    assert_eq!(env.daemon_pid(&vol), Some(pid), "the same daemon serves on");
    assert_ne!(
        recorded_image(&env, &vol),
        first_image,
        "the slot records the overlay the daemon writes now"
    );
    let log = env.plugin.log();
    assert!(
        log.contains("the storage daemons write to the new overlays")
            && log.contains("consistency=\"application-consistent\""),
        "the switch ran with the file system frozen: {log}"
    );
    write_file(&t, "b.txt", b"after the snapshot");

    // The snapshot holds A, not B, in a clean file system.
    let present = ("a.txt", &b"before the snapshot"[..]);
    check_restore(&env, "snap-r", &snap.snapshot_id, &cap, present, "b.txt").await;

    // The original goes on.
    assert_eq!(
        read(&t, "b.txt").as_deref(),
        Some(&b"after the snapshot"[..])
    );
    write_file(&t, "c.txt", b"still writable");

    // kill -9: the restarted plugin adopts the daemon whose export moved to the overlay
    // (its command line still names the first image).
    env.plugin.kill();
    env.plugin.restart().await;
    assert_eq!(env.daemon_pid(&vol), Some(pid), "adopted, not restarted");
    assert_eq!(env.controller_publish(&vol, &cap, false).await, ctx);
    assert!(
        !env.plugin
            .log()
            .contains("does not serve what its slot records"),
        "{}",
        env.plugin.log()
    );
    // A second snapshot on the adopted daemon (a second overlay node), then online growth
    // of the layer the export serves now.
    write_file(&t, "d.txt", b"before the second snapshot");
    let snap2 = snapshot(&env, "snap-2", &vol).await;
    write_file(&t, "e.txt", b"after the second snapshot");
    let grown = expand(&env.plugin, &vol.volume_id, 96 * MIB).await.unwrap();
    assert!(grown >= 96 * MIB);
    let dev = ctx["devicePath"].trim_start_matches("/dev/").to_string();
    let size: u64 = std::fs::read_to_string(format!("/sys/block/{dev}/size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        size * 512,
        96 * MIB as u64,
        "the loop device sees the new size"
    );
    for f in ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt"] {
        assert!(read(&t, f).is_some(), "{f}");
    }

    // Teardown: nothing left (no daemon, loop device or FUSE mount); snapshots go too.
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    for id in [&snap.snapshot_id, &snap2.snapshot_id] {
        env.plugin.controller().remove_snapshot(id).await.unwrap();
    }
    env.finish(&vol).await;
}

/// A raw block volume (nothing mounted on this host: no freeze, a crash-consistent cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_an_attached_block_volume() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = block_cap(Mode::SingleNodeWriter);
    let (vol, ctx) = env.attached("snapblk", 16 * MIB, &cap).await;
    let dev = ctx["devicePath"].clone();
    block_write(&dev, 0x11);
    let snap = snapshot(&env, "snapblk-1", &vol).await;
    block_write(&dev, 0x22);
    assert!(block_reads(&dev, 0x22));

    let (restored, rctx) = env.restored("snapblk-r", &snap.snapshot_id, &cap).await;
    assert!(
        block_reads(&rctx["devicePath"], 0x11),
        "the snapshot's data"
    );
    env.controller_unpublish(&restored).await.unwrap();
    env.delete(&restored).await;
    env.plugin
        .controller()
        .remove_snapshot(&snap.snapshot_id)
        .await
        .unwrap();
    env.finish(&vol).await;
}

/// Two mounted volumes of this host in one group: both file systems frozen, each daemon
/// switched, the members restore one point of the writes, clean. A block volume with them is
/// refused (its daemon would switch at its own moment), and nothing is switched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshot_of_volumes_attached_to_this_host() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vols = staged(&env, &["grp-a", "grp-b"], &cap).await;
    for (tag, (_, staging)) in ["grp-a", "grp-b"].iter().zip(&vols) {
        write_file(staging, "a.txt", tag.as_bytes());
    }
    let ids: Vec<&str> = vols.iter().map(|(v, _)| v.volume_id.as_str()).collect();
    let started = Instant::now();
    let group = group_snapshot(&env.plugin, &unique("grp"), &ids)
        .await
        .unwrap();
    eprintln!(
        "CreateVolumeGroupSnapshot of 2 mounted volumes attached here: {} ms",
        started.elapsed().as_millis()
    );
    let log = env.plugin.log();
    let cut = log
        .lines()
        .rfind(|l| l.contains("live snapshot cut"))
        .unwrap();
    eprintln!("  {cut}");
    assert!(
        cut.contains("application-consistent") && cut.contains("2 file systems frozen"),
        "{cut}"
    );
    for (_, staging) in &vols {
        write_file(staging, "b.txt", b"after the group snapshot");
    }
    let members = group_members(&env.plugin, &group).await.unwrap();
    assert_eq!(members.len(), 2);
    for (i, (member, tag)) in members.iter().zip(["grp-a", "grp-b"]).enumerate() {
        let present = ("a.txt", tag.as_bytes());
        check_restore(&env, &format!("grp-r{i}"), member, &cap, present, "b.txt").await;
    }

    // With a block volume (nothing frozen for it): FAILED_PRECONDITION, nothing switched.
    let (blk, _) = env
        .attached("grp-blk", 16 * MIB, &block_cap(Mode::SingleNodeWriter))
        .await;
    let before = recorded_image(&env, &vols[0].0);
    let err = group_snapshot(&env.plugin, &unique("grp-2"), &[ids[0], &blk.volume_id])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("one at a time"), "{err:?}");
    assert_eq!(recorded_image(&env, &vols[0].0), before, "not switched");
    write_file(&vols[0].1, "c.txt", b"thawed and writable");

    delete_group(&env.plugin, &group).await.unwrap();
    remove_staged(&env, &vols).await;
    env.finish(&blk).await;
}

/// Writes and fsyncs a small file in `dir` over and over until `stop`; (writes done, the
/// longest one).
fn keep_writing(
    dir: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, std::time::Duration)> {
    std::thread::spawn(move || {
        let (mut n, mut longest) = (0u64, std::time::Duration::ZERO);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let started = Instant::now();
            write_file(&dir, "busy.txt", format!("write {n}").as_bytes());
            longest = longest.max(started.elapsed());
            n += 1;
        }
        (n, longest)
    })
}

/// A snapshot of one volume freezes only that volume's file system: another volume mounted on
/// this host, written the whole time, is never frozen (the log lists what was frozen) and its
/// writes never stall; the snapshot is still application-consistent (a clean restore).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_freezes_only_its_own_volume() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vols = staged(&env, &["only-a", "only-b"], &cap).await;
    let ((a, sa), sb) = (&vols[0], &vols[1].1);
    write_file(sa, "a.txt", b"before the snapshot");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = keep_writing(sb.clone(), stop.clone());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let snap = snapshot(&env, "only-a-1", a).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (writes, longest) = writer.join().unwrap();
    eprintln!(
        "writes to the other volume meanwhile: {writes}, the longest {} ms",
        longest.as_millis()
    );
    assert!(writes > 0);

    let log = env.plugin.log();
    let frozen: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("file systems of the snapshot's volumes frozen"))
        .collect();
    assert_eq!(frozen.len(), 1, "{log}");
    eprintln!("  {}", frozen[0]);
    assert!(
        frozen[0].contains(sa.as_str()) && !frozen[0].contains(sb.as_str()),
        "only the snapshot's file system is frozen: {}",
        frozen[0]
    );
    let cut = log
        .lines()
        .rfind(|l| l.contains("live snapshot cut"))
        .unwrap();
    assert!(
        cut.contains("application-consistent") && cut.contains("1 file systems frozen"),
        "{cut}"
    );
    assert!(!log.contains("guest agent"), "{log}");

    let present = ("a.txt", &b"before the snapshot"[..]);
    check_restore(
        &env,
        "only-a-r",
        &snap.snapshot_id,
        &cap,
        present,
        "busy.txt",
    )
    .await;
    env.plugin
        .controller()
        .remove_snapshot(&snap.snapshot_id)
        .await
        .unwrap();
    remove_staged(&env, &vols).await;
}

/// `write_file` in a thread: whether it completed within `limit` (a frozen file system or a
/// stopped daemon blocks it; the thread is left behind then).
fn writes_within(dir: &str, name: &str, limit: std::time::Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let (dir, name) = (dir.to_string(), name.to_string());
    std::thread::spawn(move || {
        write_file(&dir, &name, b"written");
        let _ = tx.send(());
    });
    rx.recv_timeout(limit).is_ok()
}

/// A group whose member's storage daemon hangs (SIGSTOPped with dirty data): the snapshot
/// fails without holding the healthy member's file system frozen (its writes go on at once),
/// and once the daemon runs again both volumes work and come apart cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_does_not_keep_the_others_frozen() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vols = staged(&env, &["hung-a", "hung-b"], &cap).await;
    let ((a, sa), (b, sb)) = (&vols[0], &vols[1]);
    // Dirty data in A's page cache: its freeze has to write it out through the daemon.
    std::fs::write(Path::new(sa).join("dirty.bin"), vec![7u8; 8 * MIB as usize]).unwrap();
    let stopped = env.stop_daemon(a);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = keep_writing(sb.clone(), stop.clone());

    let started = Instant::now();
    let ids = [a.volume_id.as_str(), b.volume_id.as_str()];
    let res = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        group_snapshot(&env.plugin, &unique("hung-grp"), &ids),
    )
    .await
    .expect("the group snapshot answers");
    eprintln!(
        "CreateVolumeGroupSnapshot with a stopped member: {} ms, {:?}",
        started.elapsed().as_millis(),
        res.as_ref().map_err(|e| e.code())
    );
    // B is not frozen once the call returned: a write completes at once.
    assert!(writes_within(
        sb,
        "after.txt",
        std::time::Duration::from_secs(1)
    ));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (writes, longest) = writer.join().unwrap();
    eprintln!(
        "writes to the healthy member meanwhile: {writes}, the longest {} ms",
        longest.as_millis()
    );
    let err = res.expect_err("a member's daemon does not answer");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&a.volume_id), "{err:?}");
    let log = env.plugin.log();
    for l in log.lines().filter(|l| {
        l.contains("live snapshot cut") || l.contains("frozen") || l.contains("not answering")
    }) {
        eprintln!("  {l}");
    }
    assert!(!log.contains("guest agent"), "{log}");
    // The healthy member was never frozen: nothing was (the stopped member's dirty data did
    // not go out in time, so no freeze began), and nothing stays frozen.
    assert!(
        !log.contains("file systems of the snapshot's volumes frozen"),
        "{log}"
    );
    let given_up = log
        .lines()
        .find(|l| l.contains("could not all be frozen"))
        .expect("the freeze was given up");
    assert!(given_up.contains("thawed=[]"), "{given_up}");

    stopped.resume();
    assert!(
        writes_within(sa, "after.txt", std::time::Duration::from_secs(30)),
        "the stopped member is thawed once its daemon runs again"
    );
    remove_staged(&env, &vols).await;
}
