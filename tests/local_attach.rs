//! The whole node path on this host, against the real things: a monolith with local attach
//! (qemu-storage-daemon FUSE export + loop device), real mkfs, real mounts. Needs root.

use std::path::Path;
use std::time::{Duration, Instant};
use virtdisk_test_support::local_attach::*;
use virtdisk_test_support::pool::volume_depth;
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::qemu::{qemu_io, Read};

const SHORT_WAIT: &str = "[node]\ndevice_wait_secs = 2\n";

/// create → publish → stage (ext4) → stage again and under a second path → publish twice →
/// write → restart the plugin → unpublish/unstage → stage again → data reads back → teardown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_lifecycle_two_targets_two_staging_paths_and_restart() {
    let Some(mut env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (vol, ctx) = env.attached("ext4", 64 * MIB, &cap).await;
    assert_eq!(ctx.get("bus").map(String::as_str), Some("local"));
    assert!(ctx["devicePath"].starts_with("/dev/loop"), "{ctx:?}");
    assert_eq!(env.controller_publish(&vol, &cap, false).await, ctx);

    let s1 = env.staging("ext4-a");
    let s2 = env.staging("ext4-b");
    env.stage(&vol, &ctx, &s1, &cap).await.unwrap();
    env.stage(&vol, &ctx, &s1, &cap).await.unwrap();
    // Same path, another fs: incompatible.
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    expect_code(
        env.stage(&vol, &ctx, &s1, &xfs).await,
        Code::AlreadyExists,
        "restage as xfs",
    );
    // Second staging path (Nomad: one per usage), without publish_context (Nomad may lose it).
    env.stage(&vol, &Default::default(), &s2, &cap)
        .await
        .unwrap();

    let t1 = env.target("alloc1");
    let t2 = env.target("alloc2");
    let t3 = env.target("alloc3");
    env.publish(&vol, &s1, &t1, &cap, false).await.unwrap();
    env.publish(&vol, &s1, &t1, &cap, false).await.unwrap();
    expect_code(
        env.publish(&vol, &s1, &t1, &cap, true).await,
        Code::AlreadyExists,
        "republish read-only",
    );
    env.publish(&vol, &s1, &t2, &cap, true).await.unwrap();
    env.publish(&vol, &s2, &t3, &cap, false).await.unwrap();
    write_file(&t1, "hello.txt", b"written through target 1");
    assert_eq!(
        std::fs::read(Path::new(&t2).join("hello.txt")).unwrap(),
        b"written through target 1"
    );
    assert_eq!(
        std::fs::read(Path::new(&t3).join("hello.txt")).unwrap(),
        b"written through target 1"
    );
    let ro = std::fs::write(Path::new(&t2).join("nope"), b"x").unwrap_err();
    assert_eq!(ro.raw_os_error(), Some(libc::EROFS), "{ro}");

    // A restarted plugin knows the attachment and the mounts from the system alone.
    env.plugin.restart().await;
    assert_eq!(env.controller_publish(&vol, &cap, false).await, ctx);
    let listed = env.plugin.controller().all_volumes().await;
    let entry = listed
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == vol.volume_id)
        .unwrap();
    assert_eq!(
        entry.status.as_ref().unwrap().published_node_ids,
        vec![env.node_id.clone()]
    );

    // Unstage while published: refused (Nomad's unstage/publish race), naming the target.
    let msg = expect_code(
        env.unstage(&vol, &s1).await,
        Code::FailedPrecondition,
        "unstage in use",
    );
    assert!(msg.contains(&t1), "{msg}");
    // ControllerUnpublish while staged: refused, the volume is in use on this host.
    expect_code(
        env.controller_unpublish(&vol).await,
        Code::FailedPrecondition,
        "detach in use",
    );

    env.unpublish_twice(&vol, &t1).await;
    env.unpublish_twice(&vol, &t2).await;
    env.unstage_twice(&vol, &s1).await;
    // The second staging path is untouched by the first one's unstage.
    assert_eq!(
        std::fs::read(Path::new(&t3).join("hello.txt")).unwrap(),
        b"written through target 1"
    );
    env.unpublish_twice(&vol, &t3).await;
    env.unstage_twice(&vol, &s2).await;

    // Stage again: no reformat, the data is there.
    let s1 = env.staging("ext4-a");
    env.stage(&vol, &ctx, &s1, &cap).await.unwrap();
    env.publish(&vol, &s1, &t1, &cap, false).await.unwrap();
    assert_eq!(
        std::fs::read(Path::new(&t1).join("hello.txt")).unwrap(),
        b"written through target 1"
    );
    env.unpublish_twice(&vol, &t1).await;
    env.unstage_twice(&vol, &s1).await;
    env.finish(&vol).await;
}

/// xfs: format, mount (nouuid), grow online through ControllerExpand + NodeExpand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_stage_and_online_expand() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("xfs", Mode::SingleNodeWriter);
    // mkfs.xfs wants at least 300 MiB; the image stays sparse.
    let (vol, ctx) = env.attached("xfs", 320 * MIB, &cap).await;
    let s = env.staging("xfs");
    let t = env.target("xfs-alloc");
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    let mi = virtdisk_csi::node::mountinfo::MountTable::read().unwrap();
    let m = mi.at(Path::new(&s)).unwrap();
    assert_eq!(m.fs_type, "xfs");
    assert!(m.super_options.iter().any(|o| o == "nouuid"), "{m:?}");
    write_file(&t, "data", b"xfs data");
    let before = bytes_total(&env.stats(&vol, &t, &s).await.unwrap());

    // NodeExpand names another volume: this disk is not its disk, so nothing is grown, and
    // that volume is not at this path (CSI: NOT_FOUND).
    let req = node_expand_req("default.0123456789abcdef", &t, 480 * MIB);
    let err = env.plugin.node().expand(req).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    grow(&env, &vol, &t, &s, 480 * MIB).await;
    let after = env.stats(&vol, &t, &s).await.unwrap();
    assert!(!after.volume_condition.as_ref().unwrap().abnormal);
    assert!(
        bytes_total(&after) > before + 100 * MIB,
        "xfs did not grow: {before} → {}",
        bytes_total(&after)
    );
    assert_eq!(
        std::fs::read(Path::new(&t).join("data")).unwrap(),
        b"xfs data"
    );
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    env.finish(&vol).await;
}

fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    eff & (1 << 24/* CAP_SYS_RESOURCE */) != 0
}

/// ControllerExpand (online: QMP block_resize + loop capacity) then NodeExpand.
async fn grow(env: &Env, vol: &csi::Volume, target: &str, staging: &str, size: i64) {
    let n = try_grow(env, vol, target, staging, size).await.unwrap();
    assert_eq!(n, size);
}

/// ControllerExpand, then NodeExpand's result (its capacity).
async fn try_grow(
    env: &Env,
    vol: &csi::Volume,
    target: &str,
    staging: &str,
    size: i64,
) -> Result<i64, tonic::Status> {
    let req = expand_req(&vol.volume_id, size);
    let r = env.plugin.controller().expand(req).await.unwrap();
    assert_eq!(r.capacity_bytes, size);
    assert!(r.node_expansion_required);
    let req = csi::NodeExpandVolumeRequest {
        staging_target_path: staging.to_string(),
        ..node_expand_req(&vol.volume_id, target, size)
    };
    env.plugin.node().expand(req).await
}

/// Block volume: a byte pattern written through the published device file reads back, and
/// reaches the qcow2 image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_byte_pattern() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = block_cap(Mode::SingleNodeWriter);
    let (vol, ctx) = env.attached("block", 32 * MIB, &cap).await;
    let s = env.staging("block");
    let t = env.target("block-alloc");
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    // A mount capability on a block-staged path is incompatible.
    let mount = mount_cap("ext4", Mode::SingleNodeWriter);
    expect_code(
        env.stage(&vol, &ctx, &s, &mount).await,
        Code::AlreadyExists,
        "block as mount",
    );
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(&t).unwrap().file_type().is_block_device());
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&t)
            .unwrap();
        let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
        f.seek(SeekFrom::Start(MIB as u64)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0u8; pattern.len()];
        f.seek(SeekFrom::Start(MIB as u64)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert!(back == pattern, "pattern did not read back");
    }
    let stats = env.stats(&vol, &t, &s).await.unwrap();
    assert_eq!(bytes_total(&stats), 32 * MIB);
    assert!(!stats.volume_condition.unwrap().abnormal);
    let msg = expect_code(
        env.unstage(&vol, &s).await,
        Code::FailedPrecondition,
        "unstage in use",
    );
    assert!(msg.contains(&t), "{msg}");
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    env.controller_unpublish(&vol).await.unwrap();
    // The pattern is in the image itself (read by qemu-io, outside the plugin).
    let image = virtdisk_test_support::pool::layer_files(&env.plugin.pool_dir())
        .into_iter()
        .next()
        .unwrap();
    let (_, text) = qemu_io(&image, &["read -v 1048576 16"], Read::LockedNow);
    assert!(
        text.contains("00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f"),
        "{text}"
    );
    env.finish(&vol).await;
}

/// Stats: sizes for a healthy mount, grown ext4, abnormal for a broken staging mount under a
/// live target, NOT_FOUND for a path without the volume (unmounted or missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_conditions_and_ext4_expand() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("", Mode::SingleNodeMultiWriter);
    let (vol, ctx) = env.attached("stats", 64 * MIB, &cap).await;
    let s = env.staging("stats");
    let t1 = env.target("stats-1");
    let t2 = env.target("stats-2");
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t1, &cap, false).await.unwrap();
    env.publish(&vol, &s, &t2, &cap, false).await.unwrap();
    let st = env.stats(&vol, &t1, &s).await.unwrap();
    let cond = st.volume_condition.clone().unwrap();
    assert!(!cond.abnormal, "{}", cond.message);
    let total = bytes_total(&st);
    assert!(total > 50 * MIB && total <= 64 * MIB, "{total}");
    assert!(st
        .usage
        .iter()
        .any(|u| u.unit == csi::volume_usage::Unit::Inodes as i32 && u.total > 0));

    if !has_cap_sys_resource() {
        // ext4 online resize needs CAP_SYS_RESOURCE (some sandboxes drop it): the device
        // still grows, and NodeExpand says clearly why the filesystem cannot.
        let err = try_grow(&env, &vol, &t1, &s, 128 * MIB).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(
            err.message().contains("CAP_SYS_RESOURCE"),
            "{}",
            err.message()
        );
        eprintln!("NOTE: no CAP_SYS_RESOURCE here: ext4 online grow checked for its error only");
    } else {
        grow(&env, &vol, &t1, &s, 128 * MIB).await;
        let grown = bytes_total(&env.stats(&vol, &t1, &s).await.unwrap());
        assert!(
            grown > total + 50 * MIB,
            "ext4 did not grow: {total} → {grown}"
        );
        let df = std::process::Command::new("df")
            .args(["-B1", "--output=size", &t1])
            .output()
            .unwrap();
        let df_size: i64 = String::from_utf8_lossy(&df.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(df_size > 100 * MIB, "df shows {df_size}");
    }

    // The target lazily unmounted: the volume is not there any more (CSI: NOT_FOUND).
    nix::mount::umount2(Path::new(&t1), nix::mount::MntFlags::MNT_DETACH).unwrap();
    let err = env.stats(&vol, &t1, &s).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert!(
        err.message().contains("nothing is mounted"),
        "{}",
        err.message()
    );
    // The staging fs lazily unmounted under a live target: abnormal too.
    nix::mount::umount2(Path::new(&s), nix::mount::MntFlags::MNT_DETACH).unwrap();
    let c = env
        .stats(&vol, &t2, &s)
        .await
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(
        c.abnormal && c.message.contains("no longer mounted"),
        "{}",
        c.message
    );
    let missing = env.dir().join("csi/nowhere").display().to_string();
    let err = env.stats(&vol, &missing, "").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    env.unpublish_twice(&vol, &t1).await;
    env.unpublish_twice(&vol, &t2).await;
    env.unstage_twice(&vol, &s).await;
    env.finish(&vol).await;
}

/// What fails, fails cleanly: unknown serial, bad paths, publish before stage, a wrong fs,
/// and unpublish/unstage of paths never used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_errors() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let mut n = env.plugin.node();
    let caps = n.node_get_capabilities(csi::NodeGetCapabilitiesRequest {});
    assert_eq!(caps.await.unwrap().into_inner().capabilities.len(), 6);

    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vol = env.create(&unique("errors"), 32 * MIB, cap.clone()).await;
    let s = env.staging("errors");
    let t = env.target("errors-alloc");
    // Never published: the disk never appears.
    let msg = expect_code(
        env.stage(&vol, &Default::default(), &s, &cap).await,
        Code::NotFound,
        "no disk",
    );
    assert!(msg.contains("vd-"), "{msg}");
    // Never staged or published: OK.
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    let s = env.staging("errors");
    // Not attached to this node: as far as the node can tell, the volume does not exist.
    expect_code(
        env.publish(&vol, &s, &t, &cap, false).await,
        Code::NotFound,
        "publish before ControllerPublish",
    );
    for bad in ["relative/path", "/a/../b", "/a\0b"] {
        expect_code(env.unpublish(&vol, bad).await, Code::InvalidArgument, bad);
        expect_code(
            env.stage(&vol, &Default::default(), bad, &cap).await,
            Code::InvalidArgument,
            bad,
        );
    }

    let ctx = env.controller_publish(&vol, &cap, false).await;
    // Attached, not staged.
    expect_code(
        env.publish(&vol, &s, &t, &cap, false).await,
        Code::FailedPrecondition,
        "publish before stage",
    );
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.unstage_twice(&vol, &s).await;
    // An ext4 volume is never reformatted as xfs.
    let s = env.staging("errors");
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let msg = expect_code(
        env.stage(&vol, &ctx, &s, &xfs).await,
        Code::FailedPrecondition,
        "wrong fs",
    );
    assert!(msg.contains("ext4"), "{msg}");
    env.unstage_twice(&vol, &s).await;
    env.finish(&vol).await;
}

/// The storage daemon dies under a staged volume: stats say so, and unpublish, unstage and
/// ControllerUnpublish still clean up everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_crash_is_abnormal_and_cleanup_still_works() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (vol, ctx) = env.attached("crash", 32 * MIB, &cap).await;
    let s = env.staging("crash");
    let t = env.target("crash-alloc");
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    env.kill_daemon(&vol);
    let mut message = String::new();
    for _ in 0..50 {
        let c = env
            .stats(&vol, &t, &s)
            .await
            .unwrap()
            .volume_condition
            .unwrap();
        if c.abnormal {
            message = c.message;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(message.contains("disconnected"), "{message:?}");
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    env.finish(&vol).await;
}

/// An attach a crash interrupted (daemon running, no loop device yet) is cleaned up when the
/// plugin starts again, and the volume can be published afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_cleans_an_interrupted_attach() {
    let Some(mut env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = block_cap(Mode::SingleNodeWriter);
    let (vol, ctx) = env.attached("interrupted", 16 * MIB, &cap).await;
    env.plugin.kill();
    let status = std::process::Command::new("losetup")
        .args(["-d", &ctx["devicePath"]])
        .status()
        .unwrap();
    assert!(status.success());
    let slot = env
        .plugin
        .data_dir()
        .join("localattach")
        .join(key_of(&vol.volume_id));
    assert!(slot.exists());
    env.plugin.restart().await;
    assert!(!slot.exists(), "the interrupted attach was not cleaned up");
    assert_no_leftovers(env.dir());
    let again = env.controller_publish(&vol, &cap, false).await;
    assert!(again["devicePath"].starts_with("/dev/loop"));
    env.finish(&vol).await;
}

/// The condition ListVolumes reports for `vol` (its entry's status), and how long it took.
async fn listed_condition(env: &Env, vol: &csi::Volume) -> (csi::VolumeCondition, Duration) {
    let started = Instant::now();
    let entries = tokio::time::timeout(
        Duration::from_secs(30),
        env.plugin.controller().all_volumes(),
    )
    .await
    .expect("ListVolumes answers");
    let took = started.elapsed();
    let entry = entries
        .into_iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == vol.volume_id)
        .expect("the volume is listed");
    (entry.status.unwrap().volume_condition.unwrap(), took)
}

/// A storage daemon that does not answer (SIGSTOPped with the file system mounted: the
/// kernel's FUSE requests to it wait) hangs nothing else: ListVolumes answers, reporting that
/// volume abnormal, at once from the second call on; a snapshot of another volume succeeds;
/// what must touch the stopped volume answers UNAVAILABLE naming it. Once the daemon runs
/// again, everything is normal and cleanup is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_daemon_is_reported_not_waited_for() {
    let Some(env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (vol, ctx) = env.attached("stopped", 32 * MIB, &cap).await;
    let (s, t) = (env.staging("stopped"), env.target("stopped-alloc"));
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    write_file(&t, "a.txt", b"before the stop");
    let other = env.create("stopped-other", 16 * MIB, cap.clone()).await;
    assert!(!listed_condition(&env, &vol).await.0.abnormal);

    let stopped = env.stop_daemon(&vol);
    // The kernel answers from the FUSE file's cached attributes for a while; then it asks the
    // daemon, and ListVolumes must still answer (the probe is bounded).
    let deadline = Instant::now() + Duration::from_secs(15);
    let (first, took) = loop {
        let (c, took) = listed_condition(&env, &vol).await;
        if c.abnormal || Instant::now() > deadline {
            break (c, took);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "ListVolumes with a stopped storage daemon: {} ms",
        took.as_millis()
    );
    assert!(
        first.abnormal && first.message.contains("storage daemon not answering"),
        "{first:?}"
    );
    // The hung probe is outstanding: the next calls do not wait for it. One that waited would
    // take the probe's 2 s every time: the quickest of three tells, whatever the load.
    let mut quickest = Duration::MAX;
    for _ in 0..3 {
        let (again, took) = listed_condition(&env, &vol).await;
        assert!(again.abnormal, "{again:?}");
        quickest = quickest.min(took);
    }
    eprintln!(
        "ListVolumes again (probe outstanding): {} ms",
        quickest.as_millis()
    );
    assert!(
        quickest < Duration::from_secs(2),
        "waited {quickest:?} again"
    );
    let got = env
        .plugin
        .controller()
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: vol.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let c = got.status.unwrap().volume_condition.unwrap();
    assert!(c.abnormal && c.message.contains("not answering"), "{c:?}");

    // Another volume: snapshotted as usual.
    let started = Instant::now();
    let snap = tokio::time::timeout(
        Duration::from_secs(30),
        env.plugin.controller().snapshot(snapshot_req(
            &unique("stopped-other-snap"),
            &other.volume_id,
        )),
    )
    .await
    .expect("CreateSnapshot answers")
    .unwrap();
    eprintln!(
        "CreateSnapshot of another volume meanwhile: {} ms",
        started.elapsed().as_millis()
    );
    assert!(snap.ready_to_use);
    // The stopped volume itself: UNAVAILABLE, naming it, at once.
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        env.plugin
            .controller()
            .snapshot(snapshot_req(&unique("stopped-snap"), &vol.volume_id)),
    )
    .await
    .expect("CreateSnapshot answers")
    .unwrap_err();
    eprintln!(
        "CreateSnapshot of the stopped volume: {} ms, {:?}",
        started.elapsed().as_millis(),
        err.code()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&vol.volume_id), "{err:?}");

    // Running again: normal once the probe left behind has returned.
    stopped.resume();
    let mut cond = listed_condition(&env, &vol).await.0;
    for _ in 0..50 {
        if !cond.abnormal {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        cond = listed_condition(&env, &vol).await.0;
    }
    assert!(!cond.abnormal, "{cond:?}");
    write_file(&t, "b.txt", b"after the stop");
    env.plugin
        .controller()
        .remove_snapshot(&snap.snapshot_id)
        .await
        .unwrap();
    env.delete(&other).await;
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    env.finish(&vol).await;
}

/// A chain past the depth limit is flattened only while its volume is not attached; the
/// unpublish is what the flattener waited for, and it looks at once (not at its next periodic
/// pass, 30 s or more later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpublish_lets_the_flattener_shorten_a_deep_chain_at_once() {
    let config = format!("{SHORT_WAIT}[snapshots]\nmax_chain_depth = 2\n");
    let Some(env) = Env::try_start(&config).await else {
        return;
    };
    let cap = block_cap(Mode::SingleNodeWriter);
    let (vol, _) = env.attached("deep-attached", 16 * MIB, &cap).await;
    for name in ["deep-a1", "deep-a2"] {
        let req = snapshot_req(&unique(name), &vol.volume_id);
        env.plugin.controller().snapshot(req).await.expect(name);
    }
    let pool = env.plugin.pool_dir();
    // Long enough for the flattener's retry after a busy lock (2 s) to find the volume
    // attached and put it off for its slow retry (30 s).
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        volume_depth(&pool, &vol.volume_id),
        3,
        "attached: not flattened"
    );
    let started = std::time::Instant::now();
    env.controller_unpublish(&vol).await.unwrap();
    while volume_depth(&pool, &vol.volume_id) > 2 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "the chain was not flattened soon after the unpublish"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!(
        "flattened {} ms after the unpublish",
        started.elapsed().as_millis()
    );
    env.finish(&vol).await;
}

/// The first read-write ControllerPublish of a volume marks its record (one commit, before the
/// attach; publishing again commits nothing). A blank volume so handed to a writer, whose image
/// is then emptied or zeroed to an empty image's length while the plugin is down, held data:
/// its condition is abnormal and ControllerPublish and ControllerExpandVolume are refused,
/// and nothing writes it again (a node would format it). A never-published volume in the same
/// state is still an empty image a crash cut short: written again at its next use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_image_of_a_used_volume_is_damaged_not_rewritten() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    use virtdisk_test_support::calls::{expand, listed_conditions, volume_condition};
    use virtdisk_test_support::pool::{volume_image, volume_record};
    let Some(mut env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let pool = env.plugin.pool_dir();
    let cap = block_cap(Mode::SingleNodeWriter);
    let marked = |id: &str| volume_record(&pool, id).get("handed_to_writer").cloned();
    let record_file = |id: &str| {
        let m = std::fs::metadata(pool.join(format!("volumes/{}.json", key_of(id)))).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };
    let never = env.create(&unique("never"), 32 * MIB, cap.clone()).await;
    let mut used = Vec::new();
    for tag in ["emptied", "zeroed"] {
        let vol = env.create(&unique(tag), 32 * MIB, cap.clone()).await;
        assert_eq!(marked(&vol.volume_id), None, "not marked when created");
        let ctx = env.controller_publish(&vol, &cap, false).await;
        assert_eq!(marked(&vol.volume_id), Some(serde_json::Value::Bool(true)));
        let committed = record_file(&vol.volume_id);
        assert_eq!(env.controller_publish(&vol, &cap, false).await, ctx);
        assert_eq!(
            record_file(&vol.volume_id),
            committed,
            "publishing again commits nothing"
        );
        // The guest writes 1 MiB through the attached device.
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&ctx["devicePath"])
            .unwrap();
        dev.write_all_at(&vec![0x5au8; MIB as usize], 0).unwrap();
        dev.sync_all().unwrap();
        drop(dev);
        env.controller_unpublish(&vol).await.unwrap();
        used.push(vol);
    }
    assert_eq!(marked(&never.volume_id), None);
    let blank_len = std::fs::metadata(volume_image(&pool, &never.volume_id))
        .unwrap()
        .len();
    env.plugin.stop();
    let (emptied, zeroed) = (&used[0].volume_id, &used[1].volume_id);
    std::fs::write(volume_image(&pool, emptied), b"").unwrap();
    std::fs::write(volume_image(&pool, zeroed), vec![0u8; blank_len as usize]).unwrap();
    std::fs::write(volume_image(&pool, &never.volume_id), b"").unwrap();
    env.plugin.restart().await;

    let listed = listed_conditions(&env.plugin).await;
    for (id, len) in [(emptied, 0), (zeroed, blank_len)] {
        let image = volume_image(&pool, id);
        let got = volume_condition(&env.plugin, id).await;
        assert_eq!(listed[id], got, "ListVolumes and ControllerGetVolume agree");
        let m = &got.message;
        assert!(got.abnormal, "{id}: {got:?}");
        assert!(m.contains(&format!("image {}", image.display())), "{m}");
        assert!(m.contains("handed to a writer"), "{m}");
        assert!(m.contains("restore the file from a backup"), "{m}");
        let req = csi::ControllerPublishVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..publish_req(id, &env.node_id)
        };
        let e = env.plugin.controller().publish(req).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("handed to a writer"),
            "{}",
            e.message()
        );
        let e = expand(&env.plugin, id, 64 * MIB).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let bytes = std::fs::read(&image).unwrap();
        assert_eq!(bytes.len() as u64, len, "nothing written again");
        assert!(bytes.iter().all(|b| *b == 0), "nothing written again");
    }
    // Never published: an empty image a crash cut short, written again at its next use.
    let got = volume_condition(&env.plugin, &never.volume_id).await;
    assert!(
        !got.abnormal && got.message.contains("writes it again"),
        "{got:?}"
    );
    let ctx = env.controller_publish(&never, &cap, false).await;
    assert!(ctx["devicePath"].starts_with("/dev/loop"), "{ctx:?}");
    let header = std::fs::read(volume_image(&pool, &never.volume_id)).unwrap();
    assert!(
        header.starts_with(b"QFI\xfb"),
        "written again as a qcow2 image"
    );
    assert_eq!(
        marked(&never.volume_id),
        Some(serde_json::Value::Bool(true))
    );
    for vol in &used {
        env.delete(vol).await;
    }
    env.finish(&never).await;
}

/// Found by the new-user trial: the record of a volume attached on this host removed by hand
/// (as the advice for a corrupt record allows) while the plugin was stopped. The restarted
/// plugin adopts the volume's storage daemon, and its start-up sweep must leave the image the
/// daemon holds open (removing it would leave the volume's data only in an unlinked file,
/// gone at detach): a warning names the file and says why, and the first start after the
/// detach collects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_leaves_the_image_an_adopted_daemon_holds() {
    let Some(mut env) = Env::try_start(SHORT_WAIT).await else {
        return;
    };
    let cap = block_cap(Mode::SingleNodeWriter);
    let (vol, _ctx) = env.attached("orphaned", 16 * MIB, &cap).await;
    let daemon = env.daemon_pid(&vol).expect("a storage daemon");
    let pool = env.plugin.pool_dir();
    let key = key_of(&vol.volume_id).to_string();
    let image = pool.join("images").join(format!("{key}.qcow2"));
    env.plugin.stop();
    std::fs::remove_file(pool.join("volumes").join(format!("{key}.json"))).unwrap();
    env.plugin.restart().await;
    assert_eq!(env.daemon_pid(&vol), Some(daemon), "the daemon was adopted");
    assert!(image.exists(), "the image the daemon holds was removed");
    let log = env.plugin.log();
    let warned = log
        .lines()
        .any(|l| l.contains("a process holds it open") && l.contains(image.to_str().unwrap()));
    assert!(warned, "{log}");
    assert!(!log.contains("removed a layer nothing uses"), "{log}");
    // Detached (the record is gone, so whatever ControllerUnpublish answers, the daemon is
    // ended here if it still runs), the next start collects the image.
    let _ = env.controller_unpublish(&vol).await;
    if env.daemon_pid(&vol).is_some() {
        env.kill_daemon(&vol);
        let deadline = Instant::now() + Duration::from_secs(10);
        while env.daemon_pid(&vol).is_some() {
            assert!(Instant::now() < deadline, "the daemon did not end");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    env.plugin.restart().await;
    assert!(!image.exists(), "not collected once nothing holds it");
    assert_no_leftovers(env.dir());
}
