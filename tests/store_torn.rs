//! Issue 16: CreateVolume of a blank volume is journaled (one fdatasync of the change log; the
//! record, the image and their directories are fsynced later), and removed records and layers
//! leave their inodes as spares for the next create. What a crash of the machine may then
//! leave, and what the plugin makes of it. A process kill keeps the page cache, so the machine
//! crash is staged on the files: the plugin is stopped and the pool is given the state a lost
//! write leaves. (`reliability_crash` has the crash before the files were made durable.)

use std::os::unix::fs::MetadataExt;
use virtdisk_test_support::calls::{
    create_from, create_volume, delete_snapshot, delete_volume, expand, list_snapshots,
    list_volumes, snapshot,
};
use virtdisk_test_support::pool::{
    assert_pool_clean, lose_journaled_line, read_record, write_record, PoolView,
};
use virtdisk_test_support::prelude::*;

fn record_of(p: &Plugin, id: &str) -> std::path::PathBuf {
    p.pool_dir()
        .join("volumes")
        .join(format!("{}.json", key_of(id)))
}

fn image_of(p: &Plugin, id: &str) -> std::path::PathBuf {
    p.pool_dir()
        .join("images")
        .join(format!("{}.qcow2", key_of(id)))
}

/// A record file whose bytes never reached the disk (empty), and whose journaled line did not
/// either, is a create that was never reported: the next start removes it, and its image with
/// it; the name is free again.
#[tokio::test]
async fn a_create_a_crash_cut_short_is_removed_at_start() {
    let mut p = Plugin::start("controller", &[]).await;
    let kept = create_volume(&p, "kept", 64 * MIB, &[]).await.unwrap();
    let torn = create_volume(&p, "torn", 64 * MIB, &[]).await.unwrap();
    p.stop();
    std::fs::File::create(record_of(&p, &torn)).unwrap();
    lose_journaled_line(&p.pool_dir(), &torn);
    p.restart().await;

    let listed = list_volumes(&p).await;
    assert_eq!(
        listed.keys().cloned().collect::<Vec<_>>(),
        vec![kept.clone()]
    );
    assert!(!record_of(&p, &torn).exists());
    assert!(
        !image_of(&p, &torn).exists(),
        "the unnamed image is collected"
    );
    assert!(p.log().contains("whose create a crash of the machine"));
    assert_pool_clean(&p.pool_dir());
    let again = create_volume(&p, "torn", 64 * MIB, &[]).await.unwrap();
    assert_ne!(again, torn, "a new id for the reused name");
    // An empty record beside an image that holds data is not a cut-short create: both stay.
    let used = create_volume(&p, "used", 64 * MIB, &[]).await.unwrap();
    p.stop();
    write_pattern(&image_of(&p, &used), 0x5a, 0, MIB as u64);
    std::fs::File::create(record_of(&p, &used)).unwrap();
    p.restart().await;
    assert!(record_of(&p, &used).exists());
    assert_pattern(&image_of(&p, &used), 0x5a, 0, MIB as u64);
    assert!(p.log().contains("its images hold data or other layers"));
    std::fs::remove_file(record_of(&p, &used)).unwrap();
    std::fs::remove_file(image_of(&p, &used)).unwrap();
    // A record that is not empty but unreadable is somebody's data: left alone, reported.
    // So is one naming another volume than its file (what a reused block could show).
    p.stop();
    std::fs::write(record_of(&p, &kept), b"{ not json").unwrap();
    let stranger = p.pool_dir().join("volumes/0123456789abcdef.json");
    std::fs::copy(record_of(&p, &again), &stranger).unwrap();
    p.restart().await;
    assert!(record_of(&p, &kept).exists() && stranger.exists());
    assert!(p.log().contains("skipping an unreadable record"));
    assert!(p.log().contains("not its own (a crash of"));
    // The log says what to do, and that removing the record would give the image up; until
    // then nothing in the pool is collected.
    assert!(p
        .log()
        .contains("restore it from a backup or mend its JSON"));
    assert!(p.log().contains("not collecting unused layers"));
    assert!(
        image_of(&p, &kept).exists(),
        "an unreadable record's image is kept"
    );
    let listed = list_volumes(&p).await;
    assert_eq!(
        listed.keys().cloned().collect::<Vec<_>>(),
        vec![again.clone()]
    );
}

/// An empty image whose blocks a crash lost (zeros of its length, or an empty file) is written
/// again by the next operation that takes the volume; the operation then succeeds on it.
#[tokio::test]
async fn an_empty_image_a_crash_left_without_blocks_is_written_again() {
    let mut p = Plugin::start("controller", &[]).await;
    let zeroed = create_volume(&p, "zeroed", GIB, &[]).await.unwrap();
    let emptied = create_volume(&p, "emptied", GIB, &[]).await.unwrap();
    p.stop();
    let len = std::fs::metadata(image_of(&p, &zeroed)).unwrap().len();
    std::fs::write(image_of(&p, &zeroed), vec![0u8; len as usize]).unwrap();
    std::fs::write(image_of(&p, &emptied), b"").unwrap();
    p.restart().await;

    let snap = snapshot(&p, "of-zeroed", &zeroed).await.unwrap();
    assert!(!snap.is_empty());
    assert_eq!(expand(&p, &emptied, 2 * GIB).await.unwrap(), 2 * GIB);
    let info = qemu_img_info(&image_of(&p, &emptied));
    assert_eq!(info["virtual-size"], 2 * GIB);
    assert_eq!(
        p.log()
            .matches("wrote the empty image of the volume again")
            .count(),
        2
    );
    assert_pool_clean(&p.pool_dir());
}

/// A record whose image never reached the disk (a file system that does not keep the order of
/// its writes), or whose image an operator removed: a repeated CreateVolume answers the same
/// volume (Nomad repeats it for volumes it knows), which is never recreated empty; what uses it
/// is FAILED_PRECONDITION naming the file.
#[tokio::test]
async fn a_volume_whose_image_is_missing_is_kept_and_refused() {
    let mut p = Plugin::start("controller", &[]).await;
    let lost = create_volume(&p, "lost", 64 * MIB, &[]).await.unwrap();
    p.stop();
    std::fs::remove_file(image_of(&p, &lost)).unwrap();
    p.restart().await;
    let again = create_volume(&p, "lost", 64 * MIB, &[]).await.unwrap();
    assert_eq!(again, lost);
    assert!(!image_of(&p, &lost).exists(), "never recreated empty");
    let e = snapshot(&p, "of-lost", &lost).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let path = image_of(&p, &lost);
    assert!(
        e.message().contains(path.to_str().unwrap()),
        "{}",
        e.message()
    );
    delete_volume(&p, &lost).await.unwrap();
    assert_pool_clean(&p.pool_dir());
}

/// A deleted volume's record and image stay as empty spare inodes; the next volume takes them
/// and never sees a byte of the old one; spares of a process that is gone are removed at start.
#[tokio::test]
async fn deleted_volumes_leave_empty_spares_that_never_carry_old_bytes() {
    let mut p = Plugin::start("controller", &[]).await;
    let old = create_volume(&p, "old", 64 * MIB, &[]).await.unwrap();
    // Data the guest wrote: QEMU appends clusters past the metadata.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(image_of(&p, &old))
            .unwrap();
        f.write_all(&vec![0xabu8; 1 << 20]).unwrap();
    }
    let inodes: Vec<u64> = [record_of(&p, &old), image_of(&p, &old)]
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().ino())
        .collect();
    delete_volume(&p, &old).await.unwrap();
    let view = PoolView::read(&p.pool_dir());
    assert_eq!(view.spares.len(), 2, "{:?}", view.spares);
    assert!(view.spares.iter().all(|(_, len)| *len == 0));
    assert_pool_clean(&p.pool_dir());

    // Handed out once durably empty (a background fsync): later creates take them.
    let (mut record_reused, mut image_reused) = (None, None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for i in 0.. {
        if std::time::Instant::now() > deadline {
            break;
        }
        let id = create_volume(&p, &format!("new-{i}"), 64 * MIB, &[])
            .await
            .unwrap();
        if std::fs::metadata(record_of(&p, &id)).unwrap().ino() == inodes[0] {
            record_reused = Some(id.clone());
        }
        if std::fs::metadata(image_of(&p, &id)).unwrap().ino() == inodes[1] {
            image_reused = Some(id.clone());
        }
        if record_reused.is_some() && image_reused.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (Some(record_new), Some(new)) = (record_reused, image_reused) else {
        panic!("the spares were never taken");
    };
    let bytes = std::fs::read(image_of(&p, &new)).unwrap();
    assert!(!bytes.contains(&0xab), "a byte of the deleted volume");
    qemu_img_check(&image_of(&p, &new));
    assert_eq!(qemu_img_info(&image_of(&p, &new))["virtual-size"], 64 * MIB);
    let rec = read_record(&record_of(&p, &record_new));
    assert_eq!(rec["id"], record_new.as_str());

    // A spare of a process that is gone is removed when the pool opens.
    delete_volume(&p, &new).await.unwrap();
    assert!(!PoolView::read(&p.pool_dir()).spares.is_empty());
    p.stop();
    p.restart().await;
    assert_eq!(PoolView::read(&p.pool_dir()).spares, vec![]);
    assert_pool_clean(&p.pool_dir());
}

/// An image that is missing, or not a qcow2 image any more (an overlay emptied, a header
/// zeroed), is refused before anything is done with it: FAILED_PRECONDITION naming it, and
/// nothing is left behind.
#[tokio::test]
async fn a_missing_or_damaged_image_is_refused_before_any_work() {
    use virtdisk_test_support::calls::create_from;
    let mut p = Plugin::start("controller", &[]).await;
    let gone = create_volume(&p, "gone", 64 * MIB, &[]).await.unwrap();
    let used = create_volume(&p, "used", 64 * MIB, &[]).await.unwrap();
    write_pattern(&image_of(&p, &used), 0x5a, 0, MIB as u64);
    let clone = create_from(&p, "clone", from_volume(&used)).await.unwrap();
    p.stop();
    let clone_image = virtdisk_test_support::pool::volume_image(&p.pool_dir(), &clone);
    std::fs::remove_file(image_of(&p, &gone)).unwrap();
    std::fs::write(&clone_image, b"").unwrap();
    overwrite_start(&image_of(&p, &used), &[0u8; 512]);
    p.restart().await;
    let files_before = virtdisk_test_support::pool::layer_files(&p.pool_dir());
    for (id, what) in [
        (&gone, "is missing"),
        (&clone, "not a qcow2"),
        (&used, "not a qcow2"),
    ] {
        let e = snapshot(&p, &format!("s-{}", key_of(id)), id)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(what), "{}", e.message());
        let e = expand(&p, id, 2 * GIB).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    assert_eq!(
        virtdisk_test_support::pool::layer_files(&p.pool_dir()),
        files_before,
        "nothing left behind"
    );
    // Deleting them works.
    for id in [&gone, &clone, &used] {
        delete_volume(&p, id).await.unwrap();
    }
    // A restore from a snapshot whose layer is damaged is refused before a volume is made.
    let base = create_volume(&p, "base", 64 * MIB, &[]).await.unwrap();
    let snap = snapshot(&p, "base-s", &base).await.unwrap();
    let layer = virtdisk_test_support::pool::snapshot_layer(&p.pool_dir(), &snap);
    overwrite_start(&layer, &[0u8; 512]);
    let before = list_volumes(&p).await;
    let e = create_from(&p, "restored", from_snapshot(&snap))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not a qcow2"), "{}", e.message());
    assert_eq!(list_volumes(&p).await, before, "no volume made");
}

/// Writes `bytes` over the start of the file at `path` (what damage by hand or a file system
/// that lost a write leaves: the qcow2 header gone).
fn overwrite_start(path: &std::path::Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, 0).unwrap();
}

/// The volume condition of ListVolumes and ControllerGetVolume follows the rule every
/// operation applies: an image or backing layer that is missing or not a qcow2 image any more
/// is abnormal, naming the file and the pool and saying what to do, and the operations on the
/// volume are refused; an empty image a crash of the machine left without its blocks is not
/// abnormal (its next use writes it again), and works once used.
#[tokio::test]
async fn the_volume_condition_reports_what_operations_refuse() {
    use virtdisk_test_support::calls::{create_from, listed_conditions, volume_condition};
    use virtdisk_test_support::pool::{snapshot_layer, volume_image};
    let mut p = Plugin::start("controller", &[]).await;
    let healthy = create_volume(&p, "healthy", 64 * MIB, &[]).await.unwrap();
    let gone = create_volume(&p, "gone", 64 * MIB, &[]).await.unwrap();
    // Images that held data (QEMU grew them), then lost their header.
    let zeroed_used = create_volume(&p, "zeroed-used", 64 * MIB, &[])
        .await
        .unwrap();
    let garbled = create_volume(&p, "garbled", 64 * MIB, &[]).await.unwrap();
    for id in [&zeroed_used, &garbled] {
        write_pattern(&image_of(&p, id), 0x5a, 0, MIB as u64);
    }
    // A volume restored from a snapshot: its image is an overlay on the snapshot's layer.
    let base = create_volume(&p, "base", 64 * MIB, &[]).await.unwrap();
    write_pattern(&image_of(&p, &base), 0x3c, 0, MIB as u64);
    let snap = snapshot(&p, "base-s", &base).await.unwrap();
    let restored = create_from(&p, "restored", from_snapshot(&snap))
        .await
        .unwrap();
    // Blank volumes whose blocks a crash lost: zeros of the image's length, an empty file.
    let zeroed = create_volume(&p, "zeroed", GIB, &[]).await.unwrap();
    let emptied = create_volume(&p, "emptied", GIB, &[]).await.unwrap();
    for (id, c) in listed_conditions(&p).await {
        assert!(!c.abnormal && c.message == "ok", "{id}: {c:?}");
    }
    p.stop();
    let pool = p.pool_dir();
    let layer = snapshot_layer(&pool, &snap);
    std::fs::remove_file(image_of(&p, &gone)).unwrap();
    overwrite_start(&image_of(&p, &zeroed_used), &[0u8; 512]);
    overwrite_start(&image_of(&p, &garbled), &[0xa7u8; 4096]);
    overwrite_start(&layer, &[0u8; 512]);
    let len = std::fs::metadata(image_of(&p, &zeroed)).unwrap().len();
    std::fs::write(image_of(&p, &zeroed), vec![0u8; len as usize]).unwrap();
    std::fs::write(image_of(&p, &emptied), b"").unwrap();
    p.restart().await;

    let pool_name = healthy.split_once('.').unwrap().0.to_string();
    let broken = [
        (&gone, image_of(&p, &gone), "image", "is missing"),
        (
            &zeroed_used,
            image_of(&p, &zeroed_used),
            "image",
            "not a qcow2",
        ),
        (&garbled, image_of(&p, &garbled), "image", "not a qcow2"),
        (&restored, layer.clone(), "backing layer", "not a qcow2"),
        // The snapshot froze the base's image as the layer under it too.
        (&base, layer.clone(), "backing layer", "not a qcow2"),
    ];
    let listed = listed_conditions(&p).await;
    assert_eq!(listed.len(), 8, "{listed:?}");
    for (id, file, kind, what) in &broken {
        let got = volume_condition(&p, id).await;
        assert_eq!(
            listed[*id], got,
            "ListVolumes and ControllerGetVolume agree"
        );
        assert!(got.abnormal, "{id}: {got:?}");
        let m = &got.message;
        let named = format!("{kind} {}", file.display());
        assert!(m.contains(&named), "{id}: {m}");
        assert!(
            m.contains(what) && m.contains(&format!("in pool {pool_name}")),
            "{m}"
        );
        assert!(m.contains("restore the file from a backup"), "{m}");
        // A client that keeps 20 characters of it (Nomad's CLI) still shows what it is.
        let status = if *what == "is missing" {
            "missing: "
        } else {
            "damaged: "
        };
        assert!(m.starts_with(status), "{m}");
        // What the condition says is what the operations answer.
        let e = expand(&p, id, 2 * GIB).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(&named), "{}", e.message());
    }
    assert!(!listed[&healthy].abnormal);
    // While a process holds the emptied image open (locked, as QEMU locks what it uses), no
    // use rewrites it: abnormal then, and refused, like any damaged image.
    {
        let held = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image_of(&p, &zeroed))
            .unwrap();
        let lock = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        nix::fcntl::fcntl(&held, nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)).unwrap();
        let got = volume_condition(&p, &zeroed).await;
        assert!(
            got.abnormal
                && got.message.starts_with("damaged: ")
                && got.message.contains("held open by a process")
                && got.message.contains("detach it first"),
            "{got:?}"
        );
        let e = expand(&p, &zeroed, 2 * GIB).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(
            e.message(),
            got.message,
            "the condition says what the operation answers"
        );
    }
    // Not abnormal: the next operation on the volume writes the image again.
    for id in [&zeroed, &emptied] {
        let got = volume_condition(&p, id).await;
        assert_eq!(listed[id], got);
        assert!(!got.abnormal, "{id}: {got:?}");
        assert!(got.message.contains("writes it again"), "{}", got.message);
        assert!(got.message.contains(image_of(&p, id).to_str().unwrap()));
    }
    // The listing repaired nothing (it takes no volume lock): the files are as the crash left
    // them until a use.
    assert_eq!(std::fs::metadata(image_of(&p, &emptied)).unwrap().len(), 0);
    assert_eq!(expand(&p, &zeroed, 2 * GIB).await.unwrap(), 2 * GIB);
    snapshot(&p, "of-emptied", &emptied).await.unwrap();
    for id in [&zeroed, &emptied, &healthy] {
        let got = volume_condition(&p, id).await;
        assert!(!got.abnormal && got.message == "ok", "{id}: {got:?}");
        qemu_img_check(&volume_image(&p.pool_dir(), id));
    }
    // Deleting the broken volumes works; what is left lists healthy.
    for (id, ..) in &broken {
        delete_volume(&p, id).await.unwrap();
    }
    for (id, c) in listed_conditions(&p).await {
        assert!(!c.abnormal, "{id}: {c:?}");
    }
}

// ---- Unreadable records: answered with their advice, never as missing (operator trial) ----

/// `status` is the answer about an object whose record `file` is unreadable:
/// FAILED_PRECONDITION (the pool is not in a state where the operation can run), never
/// NOT_FOUND or OK, with the record's advice and its file.
#[track_caller]
fn assert_unreadable<T: std::fmt::Debug>(
    rpc: &str,
    got: Result<T, Status>,
    file: &std::path::Path,
) {
    let status = match got {
        Ok(v) => panic!("{rpc} answered OK for an unreadable record: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::FailedPrecondition, "{rpc}: {status:?}");
    let msg = status.message();
    assert!(
        msg.contains("restore it from a backup or mend its JSON"),
        "{rpc}: no advice: {status:?}"
    );
    assert!(
        msg.contains(&file.display().to_string()),
        "{rpc}: no file: {status:?}"
    );
}

fn snapshot_record_of(p: &Plugin, id: &str) -> std::path::PathBuf {
    p.pool_dir()
        .join("snapshots")
        .join(format!("{}.json", key_of(id)))
}

async fn snapshots_with_id(p: &Plugin, id: &str) -> Result<Vec<String>, Status> {
    let req = csi::ListSnapshotsRequest {
        snapshot_id: id.to_string(),
        ..Default::default()
    };
    let r = p.controller().list_snapshots(req).await?.into_inner();
    Ok(r.entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect())
}

/// Found by the operator trial of the corrupt-record advice: a volume whose record is
/// unreadable at start is left out of listings, but a request that names its id must not
/// answer as if it never existed. It answered NOT_FOUND ("does not exist", no word of the
/// record or what to do), DeleteVolume OK (a CO then forgets a volume whose record and image
/// stay in the pool, and that comes back when the record is mended), and a CreateVolume of its
/// name made a second volume of that name. Now every request naming it is FAILED_PRECONDITION
/// with the record's advice, and so is a CreateVolume of a name no readable record has (the
/// unreadable one may hold it).
#[tokio::test]
async fn a_volume_whose_record_is_unreadable_is_not_answered_as_missing() {
    use virtdisk_test_support::metrics::{http_get, metrics_addr, sample};
    let mut p = Plugin::start("controller", &["--metrics-addr", "127.0.0.1:0"]).await;
    let vol = create_volume(&p, "precious", 64 * MIB, &[]).await.unwrap();
    let other = create_volume(&p, "other", 64 * MIB, &[]).await.unwrap();
    p.stop();
    let file = record_of(&p, &vol);
    let saved = std::fs::read(&file).unwrap();
    std::fs::write(&file, b"garbage{{").unwrap();
    p.restart().await;

    let get = p.controller().volume(&vol).await;
    assert_unreadable("ControllerGetVolume", get, &file);
    assert_unreadable(
        "ControllerExpandVolume",
        expand(&p, &vol, 128 * MIB).await,
        &file,
    );
    let validate = p
        .controller()
        .validate_volume_capabilities(validate_req(&vol, ext4_cap()))
        .await;
    assert_unreadable("ValidateVolumeCapabilities", validate, &file);
    assert_unreadable(
        "CreateSnapshot of it",
        snapshot(&p, "snap", &vol).await,
        &file,
    );
    let clone = create_from(&p, "clone", from_volume(&vol)).await;
    assert_unreadable("CreateVolume cloning it", clone, &file);
    assert_unreadable("DeleteVolume", delete_volume(&p, &vol).await, &file);
    assert!(
        file.exists() && image_of(&p, &vol).exists(),
        "nothing deleted"
    );
    // Its name, and any name no readable record has, cannot be told free.
    let again = create_volume(&p, "precious", 64 * MIB, &[]).await;
    assert_unreadable("CreateVolume of its name", again, &file);
    let fresh = create_volume(&p, "fresh", 64 * MIB, &[]).await;
    assert_unreadable("CreateVolume of a new name", fresh, &file);
    // A name a readable record has answers as always (idempotent), and its volume works.
    assert_eq!(
        create_volume(&p, "other", 64 * MIB, &[]).await.unwrap(),
        other
    );
    assert_eq!(expand(&p, &other, 128 * MIB).await.unwrap(), 128 * MIB);
    // Listings cannot describe it and leave it out.
    assert_eq!(
        list_volumes(&p).await.keys().cloned().collect::<Vec<_>>(),
        vec![other.clone()]
    );
    // An alert can tell: the metric counts it.
    let unreadable = |kind: &str| {
        format!("virtdisk_csi_pool_unreadable_records{{kind=\"{kind}\",pool=\"default\"}}")
    };
    let (_, body) = http_get(&metrics_addr(&p).await, "/metrics");
    assert_eq!(sample(&body, &unreadable("volumes")), Some(1.0), "{body}");
    assert_eq!(sample(&body, &unreadable("snapshots")), Some(0.0), "{body}");

    // The advice followed: the mended record brings the volume back, the only one of its name,
    // at the next request (no restart).
    std::fs::write(&file, &saved).unwrap();
    assert_eq!(
        create_volume(&p, "precious", 64 * MIB, &[]).await.unwrap(),
        vol
    );
    let fresh = create_volume(&p, "fresh", 64 * MIB, &[]).await.unwrap();
    let listed = list_volumes(&p).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.contains_key(&vol) && listed.contains_key(&fresh));
    let (_, body) = http_get(&metrics_addr(&p).await, "/metrics");
    assert_eq!(sample(&body, &unreadable("volumes")), Some(0.0), "{body}");
    assert_eq!(expand(&p, &vol, 128 * MIB).await.unwrap(), 128 * MIB);
    delete_volume(&p, &vol).await.unwrap();
    assert!(!file.exists());
}

/// The same for snapshots: a snapshot whose record is unreadable is not missing (a restore
/// from it, GetSnapshot, ListSnapshots by its id and DeleteSnapshot answer its advice), and no
/// new snapshot name can be told free while it is unreadable; volumes are not affected.
#[tokio::test]
async fn a_snapshot_whose_record_is_unreadable_is_not_answered_as_missing() {
    let mut p = Plugin::start("controller", &[]).await;
    let vol = create_volume(&p, "source", 64 * MIB, &[]).await.unwrap();
    let snap = snapshot(&p, "kept", &vol).await.unwrap();
    let other = snapshot(&p, "other", &vol).await.unwrap();
    p.stop();
    let file = snapshot_record_of(&p, &snap);
    let saved = std::fs::read(&file).unwrap();
    std::fs::write(&file, b"{\"id\": 1").unwrap();
    p.restart().await;

    let restore = create_from(&p, "restored", from_snapshot(&snap)).await;
    assert_unreadable("CreateVolume restoring it", restore, &file);
    let get = p.controller().snapshot_by_id(&snap).await;
    assert_unreadable("GetSnapshot", get, &file);
    assert_unreadable(
        "ListSnapshots by its id",
        snapshots_with_id(&p, &snap).await,
        &file,
    );
    assert_unreadable("DeleteSnapshot", delete_snapshot(&p, &snap).await, &file);
    assert!(file.exists());
    // Its name, or a new one, cannot be told free; a name a readable record has answers.
    assert_unreadable(
        "CreateSnapshot of its name",
        snapshot(&p, "kept", &vol).await,
        &file,
    );
    let new = snapshot(&p, "new", &vol).await;
    assert_unreadable("CreateSnapshot of a new name", new, &file);
    assert_eq!(snapshot(&p, "other", &vol).await.unwrap(), other);
    assert_eq!(
        snapshots_with_id(&p, &other).await.unwrap(),
        vec![other.clone()]
    );
    assert_eq!(list_snapshots(&p).await, [other.clone()].into());
    // Volumes are another kind: their names are known.
    let restored = create_from(&p, "from-other", from_snapshot(&other))
        .await
        .unwrap();

    // Mended while the plugin runs: the next request reads it again.
    std::fs::write(&file, &saved).unwrap();
    assert_eq!(snapshot(&p, "kept", &vol).await.unwrap(), snap);
    let new = snapshot(&p, "new", &vol).await.unwrap();
    assert_eq!(list_snapshots(&p).await, [snap.clone(), other, new].into());
    let back = create_from(&p, "restored", from_snapshot(&snap))
        .await
        .unwrap();
    assert_ne!(back, restored);
    delete_snapshot(&p, &snap).await.unwrap();
    assert!(!file.exists());
}

/// What mending can leave: two readable records carrying one name. The start warns naming
/// both ids and files; a CreateVolume of the name is refused with both (which one the CO
/// means is the operator's call), while each answers by its id; deleting one settles it.
#[tokio::test]
async fn two_records_of_one_name_are_reported_and_the_name_refused() {
    let mut p = Plugin::start("controller", &[]).await;
    let first = create_volume(&p, "twice", 64 * MIB, &[]).await.unwrap();
    p.stop();
    // A copy under another key, as if its record had been mended after the name was retaken.
    let second_key = "00000000000000ab";
    let second = format!("{}.{second_key}", first.rsplit_once('.').unwrap().0);
    let mut rec = read_record(&record_of(&p, &first));
    rec["id"] = second.clone().into();
    rec["image"] = format!("{second_key}.qcow2").into();
    write_record(&record_of(&p, &second), &rec);
    std::fs::copy(image_of(&p, &first), image_of(&p, &second)).unwrap();
    p.restart().await;

    let log = p.log();
    assert!(
        log.contains("2 volume records carry the name \"twice\""),
        "{log}"
    );
    for id in [&first, &second] {
        assert!(log.contains(id.as_str()), "{id} in {log}");
        p.controller().volume(id).await.unwrap();
    }
    assert!(log.contains(&record_of(&p, &second).display().to_string()));
    let got = create_volume(&p, "twice", 64 * MIB, &[]).await.unwrap_err();
    assert_eq!(got.code(), Code::FailedPrecondition, "{got:?}");
    assert!(
        got.message().contains(&first) && got.message().contains(&second),
        "{got:?}"
    );
    delete_volume(&p, &second).await.unwrap();
    assert_eq!(
        create_volume(&p, "twice", 64 * MIB, &[]).await.unwrap(),
        first
    );
}

/// A volume name is unique across pools: an unreadable volume record in one pool keeps a new
/// name from being created in another (it may hold that name), while names readable records
/// have answer as always in both.
#[tokio::test]
async fn an_unreadable_volume_record_in_one_pool_holds_names_in_every_pool() {
    let config = r#"
        [[pool]]
        name = "one"
        path = "{dir}/one"
        [[pool]]
        name = "two"
        path = "{dir}/two"
    "#;
    let mut p = Plugin::start_with_config("controller", config, &[]).await;
    let lost = create_volume(&p, "lost", 64 * MIB, &[("pool", "one")])
        .await
        .unwrap();
    let kept = create_volume(&p, "kept", 64 * MIB, &[("pool", "two")])
        .await
        .unwrap();
    p.stop();
    let file = p
        .data_dir()
        .parent()
        .unwrap()
        .join("one/volumes")
        .join(format!("{}.json", key_of(&lost)));
    let saved = std::fs::read(&file).unwrap();
    std::fs::write(&file, b"{\"schema\": 1, \"id\":").unwrap();
    p.restart().await;

    for (name, pool) in [("lost", "two"), ("new", "two"), ("new", "one")] {
        let got = create_volume(&p, name, 64 * MIB, &[("pool", pool)]).await;
        assert_unreadable(&format!("CreateVolume {name} in pool {pool}"), got, &file);
    }
    let again = create_volume(&p, "kept", 64 * MIB, &[("pool", "two")]).await;
    assert_eq!(again.unwrap(), kept);

    p.stop();
    std::fs::write(&file, &saved).unwrap();
    p.restart().await;
    let new = create_volume(&p, "new", 64 * MIB, &[("pool", "two")])
        .await
        .unwrap();
    let listed = list_volumes(&p).await;
    assert_eq!(
        listed
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        [lost, kept, new].into()
    );
}

/// Found by the operator trial: a pool file that is not a regular file (here a FIFO where an
/// image should be) makes the condition's probe block in open(2) for ever, so
/// ControllerGetVolume of that volume and every ListVolumes never answer (each call leaves a
/// blocking thread stuck). The volume should be reported abnormal (not a qcow2 image) at once.
#[tokio::test]
async fn an_image_that_is_not_a_regular_file_does_not_hang_the_listing() {
    let mut p = Plugin::start("controller", &[]).await;
    let vol = create_volume(&p, "odd", 64 * MIB, &[]).await.unwrap();
    p.stop();
    std::fs::remove_file(image_of(&p, &vol)).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(image_of(&p, &vol))
        .status()
        .unwrap();
    assert!(status.success());
    p.restart().await;
    // A hang is forever; the limit only has to outlast a slow machine.
    let limit = std::time::Duration::from_secs(30);
    let got = tokio::time::timeout(limit, p.controller().volume(&vol))
        .await
        .expect("ControllerGetVolume answers");
    let condition = got.unwrap().status.unwrap().volume_condition.unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert!(
        condition.message.starts_with("damaged: ")
            && condition.message.contains("is not a regular file (a fifo)"),
        "{condition:?}"
    );
    // The operations refuse it the same way, at once.
    let e = tokio::time::timeout(limit, expand(&p, &vol, 128 * MIB))
        .await
        .expect("ControllerExpandVolume answers")
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(e.message(), condition.message);
    tokio::time::timeout(limit, list_volumes(&p))
        .await
        .expect("ListVolumes answers");
    std::fs::remove_file(image_of(&p, &vol)).unwrap();
}

/// Found by the new-user trial: a volume attached locally (a qemu-storage-daemon holds its
/// image) whose record was removed by hand. The start-up sweep must not delete the image a
/// process holds open (its data would live only in an unlinked file, gone at detach): it is
/// left, with a warning naming it and saying why, and collected by the first start after the
/// holder let go. Here the holder is a qemu-io, which locks the image as QEMU and the storage
/// daemon do.
#[tokio::test]
async fn the_sweep_leaves_a_layer_a_process_holds_open() {
    use virtdisk_test_support::qemu::ImageHolder;
    let mut p = Plugin::start("controller", &[]).await;
    let vol = create_volume(&p, "attached", 64 * MIB, &[]).await.unwrap();
    let image = image_of(&p, &vol);
    write_pattern(&image, 0x5a, 0, MIB as u64);
    p.stop();
    let holder = ImageHolder::open(&image);
    std::fs::remove_file(record_of(&p, &vol)).unwrap();
    p.restart().await;
    assert!(image.exists(), "the held image was removed");
    let log = p.log();
    let warned = log.lines().any(|l| {
        l.contains("WARN")
            && l.contains(image.to_str().unwrap())
            && l.contains("a process holds it open")
            && l.contains("detach it, then the next start collects it")
    });
    assert!(warned, "{log}");
    assert!(!log.contains("removed a layer nothing uses"), "{log}");
    assert!(
        log.contains("removed=0"),
        "the sweep counts what it removed: {log}"
    );
    drop(holder);
    p.restart().await;
    assert!(!image.exists(), "collected once nothing holds it");
    assert_eq!(p.log().matches("removed a layer nothing uses").count(), 1);
    assert_pool_clean(&p.pool_dir());
}

/// DeleteVolume of a volume whose image a process outside the plugin holds open is refused
/// (FAILED_PRECONDITION naming the image): deleting would forget a volume whose data is in
/// use. Where a commit frees a layer some process holds (here DeleteSnapshot of a snapshot's
/// layer a reader holds), the record goes and the file stays, a warning says why, until a
/// start after the holder let go.
#[tokio::test]
async fn a_delete_leaves_the_image_a_process_holds_open() {
    use virtdisk_test_support::calls::delete_snapshot;
    use virtdisk_test_support::pool::snapshot_layer;
    use virtdisk_test_support::qemu::ImageHolder;
    let mut p = Plugin::start("controller", &[]).await;
    let vol = create_volume(&p, "busy", 64 * MIB, &[]).await.unwrap();
    let image = image_of(&p, &vol);
    let holder = ImageHolder::open(&image);
    let e = delete_volume(&p, &vol).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(image.to_str().unwrap()),
        "{}",
        e.message()
    );
    assert!(record_of(&p, &vol).exists());
    drop(holder);
    let snap = snapshot(&p, "busy-s", &vol).await.unwrap();
    delete_volume(&p, &vol).await.unwrap();
    let layer = snapshot_layer(&p.pool_dir(), &snap);
    let holder = ImageHolder::open(&layer);
    delete_snapshot(&p, &snap).await.unwrap();
    assert!(layer.exists(), "the held layer was removed");
    assert!(p.log().contains("a process holds it open"), "{}", p.log());
    drop(holder);
    p.restart().await;
    assert!(!layer.exists(), "collected once nothing holds it");
    assert_pool_clean(&p.pool_dir());
}

/// A record edited to name another volume's image (an operator "mending" a record that holds
/// another volume's bytes by editing its id and name, which the advice says not to do) is
/// unreadable: a volume's image files start with its own key. FAILED_PRECONDITION naming the
/// record, and the pool collects nothing while it is, so the volume's own image stays; the
/// other volume keeps working.
#[tokio::test]
async fn a_record_edited_to_name_another_volumes_image_is_not_a_second_owner() {
    let mut p = Plugin::start("controller", &[]).await;
    let first = create_volume(&p, "first", 64 * MIB, &[]).await.unwrap();
    let second = create_volume(&p, "second", 64 * MIB, &[]).await.unwrap();
    p.stop();
    let mut rec = read_record(&record_of(&p, &first));
    rec["id"] = second.clone().into();
    rec["name"] = "second".into();
    write_record(&record_of(&p, &second), &rec);
    p.restart().await;

    assert!(
        image_of(&p, &second).exists(),
        "the start collected the image of {second}, whose record was edited: {}",
        p.log()
    );
    let got = p.controller().volume(&second).await;
    let status = got.expect_err("a record that names another volume's image answered OK");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains(&record_of(&p, &second).display().to_string()),
        "{status:?}"
    );
    p.controller().volume(&first).await.unwrap();
}

/// While a record of the pool is unreadable, a change that leaves layers unnamed does not
/// remove them: the unreadable record's references are not counted, and it may use them (here
/// a volume restored from a snapshot, whose backing layer the snapshot's delete frees). Once
/// the record is mended the volume works on its layers, data intact.
#[tokio::test]
async fn layers_an_unreadable_record_may_use_are_kept_by_later_changes() {
    use virtdisk_test_support::calls::{create_from, delete_snapshot};
    use virtdisk_test_support::pool::{snapshot_layer, volume_image};
    let mut p = Plugin::start("controller", &[]).await;
    let base = create_volume(&p, "base", 64 * MIB, &[]).await.unwrap();
    write_pattern(&image_of(&p, &base), 0x3c, 0, MIB as u64);
    let snap = snapshot(&p, "base-s", &base).await.unwrap();
    let restored = create_from(&p, "restored", from_snapshot(&snap))
        .await
        .unwrap();
    let layer = snapshot_layer(&p.pool_dir(), &snap);
    p.stop();
    let record = record_of(&p, &restored);
    let good = std::fs::read(&record).unwrap();
    std::fs::write(&record, b"{ torn").unwrap();
    p.restart().await;
    delete_volume(&p, &base).await.unwrap();
    delete_snapshot(&p, &snap).await.unwrap();
    assert!(
        layer.exists(),
        "the restored volume's backing layer is kept"
    );
    assert!(p
        .log()
        .contains("not removing the layer files this change left unnamed"));
    p.stop();
    std::fs::write(&record, &good).unwrap();
    p.restart().await;
    assert!(
        layer.exists(),
        "and not collected once the record reads again"
    );
    assert_eq!(expand(&p, &restored, 128 * MIB).await.unwrap(), 128 * MIB);
    assert_pattern(&volume_image(&p.pool_dir(), &restored), 0x3c, 0, MIB as u64);
}

/// Marks a volume's record as handed to a writer (what its first read-write publish does),
/// the plugin being stopped.
fn mark_handed_to_writer(p: &Plugin, id: &str) {
    let path = record_of(p, id);
    let mut rec = read_record(&path);
    rec["handed_to_writer"] = serde_json::Value::Bool(true);
    write_record(&path, &rec);
}

/// A used blank volume: an empty qcow2 image made again in its place (another size: no longer
/// the plugin's empty image) is reported emptied by the condition as the operations refuse it;
/// a raw image cut short that still holds data is not emptied: it is lengthened at its next
/// use, bytes kept.
#[tokio::test]
async fn a_used_volume_is_judged_alike_by_the_condition_and_the_operations() {
    use virtdisk_test_support::calls::volume_condition;
    use virtdisk_test_support::pool::volume_image;
    let mut p = Plugin::start("controller", &[]).await;
    let remade = create_volume(&p, "remade", 64 * MIB, &[]).await.unwrap();
    let raw = create_volume(&p, "raw", 64 * MIB, &[("format", "raw")])
        .await
        .unwrap();
    p.stop();
    mark_handed_to_writer(&p, &remade);
    mark_handed_to_writer(&p, &raw);
    let image = volume_image(&p.pool_dir(), &remade);
    std::fs::remove_file(&image).unwrap();
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "1M"],
    );
    let raw_image = volume_image(&p.pool_dir(), &raw);
    std::fs::write(&raw_image, vec![0x5au8; MIB as usize]).unwrap();
    p.restart().await;

    let got = volume_condition(&p, &remade).await;
    assert!(
        got.abnormal && got.message.starts_with("damaged:"),
        "{got:?}"
    );
    let e = expand(&p, &remade, 128 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(e.message(), got.message, "one rule, one message");

    let got = volume_condition(&p, &raw).await;
    assert!(!got.abnormal, "{got:?}");
    assert_eq!(expand(&p, &raw, 128 * MIB).await.unwrap(), 128 * MIB);
    let bytes = std::fs::read(&raw_image).unwrap();
    assert_eq!(bytes.len() as i64, 128 * MIB);
    assert!(
        bytes[..MIB as usize].iter().all(|b| *b == 0x5a),
        "data kept"
    );
}

/// A create whose process died between its journaled line and its rename (the line durable,
/// no record file, never answered), while another process created the same name on the
/// retry: the next start writes the record again from the line, finds the name taken, and
/// removes it. The answered volume stays the only one of its name.
#[tokio::test]
async fn a_replayed_create_whose_name_was_taken_since_is_removed() {
    use sha2::{Digest, Sha256};
    let mut p = Plugin::start("controller", &[]).await;
    let kept = create_volume(&p, "dup", 64 * MIB, &[]).await.unwrap();
    p.stop();
    let pool = p.pool_dir();
    // The dead process's line: the same name, another key, an owner no process holds.
    let key = "0123456789abcdef";
    let mut rec = read_record(&record_of(&p, &kept));
    rec["id"] = format!("default.{key}").into();
    rec["image"] = format!("{key}.qcow2").into();
    let bytes = serde_json::to_vec_pretty(&rec).unwrap();
    let digest = Sha256::digest(&bytes);
    let check = u64::from_be_bytes(digest[..8].try_into().unwrap());
    let quoted = serde_json::to_string(std::str::from_utf8(&bytes).unwrap()).unwrap();
    let line = format!("+v {key} 00000000deadbeef {check:016x} {quoted}\n");
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(pool.join("changes"))
        .unwrap();
    std::io::Write::write_all(&mut log, line.as_bytes()).unwrap();
    p.restart().await;
    let listed = list_volumes(&p).await;
    assert_eq!(
        listed.keys().cloned().collect::<Vec<_>>(),
        vec![kept.clone()]
    );
    assert!(!pool.join(format!("volumes/{key}.json")).exists());
    assert!(
        p.log()
            .contains("removing a volume whose create never finished"),
        "{}",
        p.log()
    );
    assert_pool_clean(&pool);
    // Settled: the next start replays nothing (the log holds every start's lines).
    let settled = |p: &Plugin| p.log().matches("settling the journaled creates").count();
    assert_eq!(settled(&p), 1);
    p.stop();
    p.restart().await;
    assert_eq!(settled(&p), 1, "{}", p.log());
    assert_eq!(list_volumes(&p).await.len(), 1);
}
