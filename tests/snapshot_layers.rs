//! The pool's layer bookkeeping through the library, with real qemu-img: crash recovery from
//! every half-done step, and the live-snapshot seam with fake attach backends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use virtdisk_csi::attach::{Attacher, Attachment, Attachments, DiskSpec, FsFreeze, LiveMember};
use virtdisk_csi::config::PoolConfig;
use virtdisk_csi::error::{Error, Result};
use virtdisk_csi::model::{AccessMode, AccessType, Capability, ImageFormat};
use virtdisk_csi::params::Bus;
use virtdisk_csi::pool::record::{FlattenJob, FlattenState, Freezing, SnapshotRecord};
use virtdisk_csi::pool::{CreateSnapshot, CreateVolume, Pools, RecordState, VolumeRecord};
use virtdisk_test_support::key_of as key;
use virtdisk_test_support::qemu::*;

const MIB: u64 = 1 << 20;
const NODE: &str = "vdt-snap-node";

fn pool_config(dir: &Path) -> PoolConfig {
    PoolConfig {
        name: "default".into(),
        path: dir.join("pool"),
        format: ImageFormat::Qcow2,
        topology: BTreeMap::new(),
        capacity_bytes: None,
        overcommit: true,
        hosts: Vec::new(),
    }
}

async fn open(dir: &Path, attachments: Attachments) -> Pools {
    Pools::open(vec![pool_config(dir)], 64 * MIB)
        .await
        .unwrap()
        .with_layers(attachments, 3)
}

/// Pools in `dir` with one attach backend, a volume `name` and the backend's node holding it
/// read-write.
async fn attached(
    dir: &Path,
    backend: Arc<dyn Attacher>,
    node: &FakeNode,
    name: &str,
) -> (Pools, VolumeRecord) {
    let pools = open(dir, Attachments::new(vec![backend], 0)).await;
    let vol = pools.create(volume_req(name)).await.unwrap();
    node.attach(&vol.id, false);
    (pools, vol)
}

fn volume_req(name: &str) -> CreateVolume {
    CreateVolume {
        name: name.into(),
        required_bytes: 16 * MIB,
        limit_bytes: 0,
        capabilities: vec![Capability {
            access_type: AccessType::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec![],
            },
            access_mode: AccessMode::SingleNodeWriter,
        }],
        parameters: BTreeMap::new(),
        content_source: None,
        topology: Default::default(),
    }
}

fn snap_req(name: &str, vol: &VolumeRecord) -> CreateSnapshot {
    CreateSnapshot {
        name: name.into(),
        source_volume_id: vol.id.clone(),
        parameters: BTreeMap::new(),
    }
}

fn images(dir: &Path) -> PathBuf {
    dir.join("pool/images")
}

/// The files of `images/`, without spare inodes (`.spare-*`, empty, kept for new layers).
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(images(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".spare-"))
        .collect();
    v.sort();
    v
}

/// The first MiB of an image is all `pattern`.
fn write(image: &Path, pattern: u8) {
    write_pattern(image, pattern, 0, MIB);
}

fn reads(image: &Path, pattern: u8) -> bool {
    reads_pattern(image, pattern, 0, MIB, Read::LockedNow).is_ok()
}

/// A node that reports one attachment and records what it was asked to switch to.
struct FakeNode {
    attachments: Mutex<Vec<Attachment>>,
    switched_to: Mutex<Vec<PathBuf>>,
    can_snapshot_live: bool,
}

impl FakeNode {
    fn new(can_snapshot_live: bool) -> Arc<FakeNode> {
        Arc::new(FakeNode {
            attachments: Mutex::new(Vec::new()),
            switched_to: Mutex::new(Vec::new()),
            can_snapshot_live,
        })
    }

    fn attach(&self, volume_id: &str, readonly: bool) {
        self.attachments.lock().unwrap().push(Attachment {
            node_id: NODE.into(),
            volume_id: volume_id.into(),
            serial: format!("vd-{}", key(volume_id)),
            bus: Bus::Scsi,
            readonly,
            shareable: false,
            context: BTreeMap::new(),
            abnormal: None,
        });
    }
}

/// `impl Attacher for $backend` forwarding to its FakeNode (`.0`), with the extra methods
/// given (none: the trait's default `snapshot_live`).
macro_rules! fake_attacher {
    ($backend:ident $($extra:tt)*) => {
        #[async_trait::async_trait]
        impl Attacher for $backend {
            async fn serves(&self, node_id: &str) -> Result<bool> {
                Ok(node_id == NODE)
            }
            async fn attachments(&self) -> Result<Vec<Attachment>> {
                Ok(self.0.attachments.lock().unwrap().clone())
            }
            async fn attach(&self, _: &str, _: &DiskSpec, _: u64) -> Result<Attachment> {
                Err(Error::Unimplemented("fake".into()))
            }
            async fn detach(&self, _: &str, _: &virtdisk_csi::ids::VolumeId) -> Result<()> {
                Ok(())
            }
            async fn resize(&self, _: &str, _: &virtdisk_csi::ids::VolumeId, _: u64) -> Result<()> {
                Ok(())
            }
            async fn set_qos(&self, _: &str, _: &virtdisk_csi::ids::VolumeId, _: &virtdisk_csi::params::Qos) -> Result<()> {
                Ok(())
            }
            async fn check_health(&self) -> Result<()> {
                Ok(())
            }
            $($extra)*
        }
    };
}

/// Forwards to a FakeNode; the one without live snapshots keeps the trait's default.
struct OldBackend(Arc<FakeNode>);
struct LiveBackend(Arc<FakeNode>);

fake_attacher!(OldBackend);

fake_attacher!(LiveBackend
    async fn snapshot_live(&self, node_id: &str, members: &[LiveMember]) -> Result<()> {
        assert_eq!(node_id, NODE);
        assert!(self.0.can_snapshot_live);
        for m in members {
            // What libvirt needs: the overlay exists, is durable and backs onto the current
            // image.
            assert!(backing_of(&m.overlay).is_some());
            self.0.switched_to.lock().unwrap().push(m.overlay.clone());
        }
        Ok(())
    }
    // A guest agent answers: the snapshot is quiesced.
    async fn guest_agent(&self, _: &str, _: &[virtdisk_csi::ids::VolumeId]) -> Result<bool> {
        Ok(true)
    }
    async fn freeze_filesystems(&self, _: &str, _: &[virtdisk_csi::ids::VolumeId]) -> Result<FsFreeze> {
        Ok(FsFreeze::Frozen(1))
    }
);

#[tokio::test]
async fn attached_volume_snapshots_go_through_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::new(true);
    let backend = Arc::new(LiveBackend(node.clone()));
    let (pools, vol) = attached(dir.path(), backend, &node, "live-vol").await;

    let snap = pools
        .create_snapshot(snap_req("live-snap", &vol))
        .await
        .unwrap();
    assert_eq!(snap.quiesced, Some(true));
    assert_eq!(snap.layer, vol.image);
    let after = pools.volume(&vol.id).await.unwrap().unwrap();
    let switched = node.switched_to.lock().unwrap().clone();
    assert_eq!(switched, vec![images(dir.path()).join(&after.image)]);
    assert_eq!(after.chain.backing, vec![vol.image.clone()]);
    assert_eq!(after.chain.freezing, None);
    assert_eq!(
        backing_of(&images(dir.path()).join(&after.image)).as_deref(),
        Some(vol.image.as_str())
    );

    // Read-only attachments cannot write: the freeze happens offline.
    let ro = pools.create(volume_req("ro-vol")).await.unwrap();
    node.attach(&ro.id, true);
    let snap = pools
        .create_snapshot(snap_req("ro-snap", &ro))
        .await
        .unwrap();
    assert_eq!(snap.quiesced, None);
    assert_eq!(node.switched_to.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn attached_volumes_need_a_backend_that_snapshots_live() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::new(false);
    let backend = Arc::new(OldBackend(node.clone()));
    let (pools, vol) = attached(dir.path(), backend, &node, "old-vol").await;
    let before = files(dir.path());

    let err = pools
        .create_snapshot(snap_req("old-snap", &vol))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(err.to_string().contains("unpublish"), "{err}");
    let mut clone = volume_req("old-clone");
    clone.content_source = Some(virtdisk_csi::model::ContentSource::Volume(vol.id.clone()));
    let err = pools.create(clone).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");

    // Nothing changed: same record, no overlay left behind, no snapshot.
    assert_eq!(pools.volume(&vol.id).await.unwrap().unwrap(), vol);
    assert_eq!(files(dir.path()), before);
    assert!(pools.list_snapshots().await.unwrap().is_empty());
    // No volume was made for the clone (ids are random: count the records).
    let records = std::fs::read_dir(dir.path().join("pool/volumes"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".json") && !name.starts_with('.')
        })
        .count();
    assert_eq!(records, 1);
}

#[tokio::test]
async fn pool_open_finishes_or_undoes_every_interrupted_step() {
    let dir = tempfile::tempdir().unwrap();
    let img = images(dir.path());
    let pool_dir = dir.path().join("pool");
    let (v_off, v_live, v_unsent, v_conv, v_switch, snap) = {
        let pools = open(dir.path(), Attachments::default()).await;
        let pool = pools.get("default").unwrap().clone();

        // An offline freeze interrupted before the switch: undone.
        let mut v_off = pools.create(volume_req("rec-offline")).await.unwrap();
        write(&img.join(&v_off.image), 0xa1);
        let overlay = format!("{}-1.qcow2", key(&v_off.id));
        create_overlay(&img.join(&overlay), &v_off.image, None);
        v_off.chain.freezing = Some(Freezing {
            overlay,
            handed_to_domain: false,
        });
        pool.write_volume(&v_off).unwrap();

        // A live freeze interrupted after the domain switched (it wrote to the overlay, then
        // let go of it): finished.
        let mut v_live = pools.create(volume_req("rec-live")).await.unwrap();
        write(&img.join(&v_live.image), 0xa2);
        let overlay = format!("{}-2.qcow2", key(&v_live.id));
        create_overlay(&img.join(&overlay), &v_live.image, None);
        write(&img.join(&overlay), 0xa2);
        v_live.chain.freezing = Some(Freezing {
            overlay,
            handed_to_domain: true,
        });
        pool.write_volume(&v_live).unwrap();

        // A live freeze interrupted before the domain switched (the overlay is untouched and
        // nobody holds it): undone.
        let mut v_unsent = pools.create(volume_req("rec-unsent")).await.unwrap();
        write(&img.join(&v_unsent.image), 0xa5);
        let overlay = format!("{}-5.qcow2", key(&v_unsent.id));
        create_overlay(&img.join(&overlay), &v_unsent.image, None);
        v_unsent.chain.freezing = Some(Freezing {
            overlay,
            handed_to_domain: true,
        });
        pool.write_volume(&v_unsent).unwrap();

        // A flattening interrupted while copying: undone.
        let v_conv = pools.create(volume_req("rec-conv")).await.unwrap();
        let snap = pools
            .create_snapshot(snap_req("rec-conv-snap", &v_conv))
            .await
            .unwrap();
        let v_conv = pools.volume(&v_conv.id).await.unwrap().unwrap();
        let partial = format!("{}-3.qcow2", key(&v_conv.id));
        create_qcow2(&img.join(&partial), MIB);
        let job = FlattenJob {
            schema: 1,
            volume_id: v_conv.id.clone(),
            image: v_conv.image.clone(),
            source: v_conv.chain.backing.clone(),
            layer: partial,
            state: FlattenState::Converting,
            started_at: 0,
            updated_at: 0,
        };
        std::fs::write(
            pool_dir.join(format!("flatten/{}.json", key(&v_conv.id))),
            serde_json::to_vec(&job).unwrap(),
        )
        .unwrap();

        // A flattening interrupted while switching: finished.
        let v_switch = pools.create(volume_req("rec-switch")).await.unwrap();
        write(&img.join(&v_switch.image), 0xa4);
        pools
            .create_snapshot(snap_req("rec-switch-1", &v_switch))
            .await
            .unwrap();
        pools
            .create_snapshot(snap_req("rec-switch-2", &v_switch))
            .await
            .unwrap();
        let v_switch = pools.volume(&v_switch.id).await.unwrap().unwrap();
        let flat = format!("{}-4.qcow2", key(&v_switch.id));
        qemu_img(&[
            "convert",
            "-q",
            "-O",
            "qcow2",
            img.join(&v_switch.chain.backing[0]).to_str().unwrap(),
            img.join(&flat).to_str().unwrap(),
        ]);
        let job = FlattenJob {
            schema: 1,
            volume_id: v_switch.id.clone(),
            image: v_switch.image.clone(),
            source: v_switch.chain.backing.clone(),
            layer: flat,
            state: FlattenState::Switching,
            started_at: 0,
            updated_at: 0,
        };
        std::fs::write(
            pool_dir.join(format!("flatten/{}.json", key(&v_switch.id))),
            serde_json::to_vec(&job).unwrap(),
        )
        .unwrap();

        // A half-made snapshot record, an orphan layer, a stranger's file, temp files.
        let half = SnapshotRecord {
            state: RecordState::Creating,
            id: format!("default.{}", virtdisk_csi::ids::legacy_snapshot_key("half")),
            name: "half".into(),
            ..snap.clone()
        };
        pool.write_snapshot(&half).unwrap();
        std::fs::write(img.join("0123456789abcdef-5.qcow2"), b"orphan").unwrap();
        std::fs::write(img.join("notes.txt"), b"not ours").unwrap();
        std::fs::write(img.join("0123456789abcdef.qcow2.part"), b"partial").unwrap();
        (v_off, v_live, v_unsent, v_conv, v_switch, snap)
    };

    // "Restart".
    let pools = open(dir.path(), Attachments::default()).await;

    let off = pools.volume(&v_off.id).await.unwrap().unwrap();
    assert_eq!(off.image, v_off.image);
    assert_eq!(off.chain.freezing, None);
    assert!(off.chain.backing.is_empty());
    assert!(reads(&img.join(&off.image), 0xa1));

    let unsent = pools.volume(&v_unsent.id).await.unwrap().unwrap();
    assert_eq!(unsent.image, v_unsent.image);
    assert_eq!(unsent.chain.freezing, None);
    assert!(unsent.chain.backing.is_empty());
    assert!(reads(&img.join(&unsent.image), 0xa5));

    let live = pools.volume(&v_live.id).await.unwrap().unwrap();
    let overlay = v_live.chain.freezing.as_ref().unwrap().overlay.clone();
    assert_eq!(live.image, overlay);
    assert_eq!(live.chain.backing, vec![v_live.image.clone()]);
    assert!(reads(&img.join(&live.image), 0xa2));

    let conv = pools.volume(&v_conv.id).await.unwrap().unwrap();
    assert_eq!(conv, v_conv);

    let switched = pools.volume(&v_switch.id).await.unwrap().unwrap();
    let flat = format!("{}-4.qcow2", key(&v_switch.id));
    assert_eq!(switched.chain.backing, vec![flat.clone()]);
    assert_eq!(backing_of(&img.join(&switched.image)), Some(flat));
    assert!(reads(&img.join(&switched.image), 0xa4));

    // The half-made snapshot is gone, the finished one kept.
    let snaps = pools.list_snapshots().await.unwrap();
    assert_eq!(snaps.len(), 3);
    assert!(snaps.iter().any(|s| s.id == snap.id));
    assert!(!snaps.iter().any(|s| s.name == "half"));
    let jobs = virtdisk_test_support::pool::PoolView::read(&pool_dir).flatten_jobs;
    assert_eq!(jobs.len(), 0);

    // Exactly the referenced layers remain, plus the stranger's file.
    let mut expected: Vec<String> = vec!["notes.txt".into()];
    for v in [&off, &live, &unsent, &conv, &switched] {
        expected.push(v.image.clone());
        expected.extend(v.chain.backing.iter().cloned());
    }
    for s in &snaps {
        expected.push(s.layer.clone());
        expected.extend(s.backing.iter().cloned());
    }
    expected.sort();
    expected.dedup();
    assert_eq!(files(dir.path()), expected);
    for f in files(dir.path()).iter().filter(|f| f.ends_with(".qcow2")) {
        qemu_img_check(&img.join(f));
    }
}

/// A node whose switch outcome is unknown (libvirtd vanished mid-call).
struct UnsureBackend(Arc<FakeNode>);

fake_attacher!(UnsureBackend
    async fn snapshot_live(&self, _: &str, _: &[LiveMember]) -> Result<()> {
        Err(Error::Unavailable("libvirt connection lost".into()))
    }
);

#[tokio::test]
async fn an_unknown_live_switch_outcome_keeps_the_overlay_for_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::new(true);
    let backend = Arc::new(UnsureBackend(node.clone()));
    let (pools, vol) = attached(dir.path(), backend, &node, "unsure-vol").await;
    let err = pools
        .create_snapshot(snap_req("unsure-snap", &vol))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    // The node may already write to the overlay: it must still exist and be named.
    let rec = pools.volume(&vol.id).await.unwrap().unwrap();
    let pending = rec.chain.freezing.clone().expect("switch still pending");
    assert!(pending.handed_to_domain);
    assert!(images(dir.path()).join(&pending.overlay).exists());
    assert!(pools.list_snapshots().await.unwrap().is_empty());

    // A restarted controller continues the volume in the overlay once the node has written
    // there (the images tell: see `pool::recover`).
    write(&images(dir.path()).join(&pending.overlay), 0x6b);
    drop(pools);
    let pools = open(dir.path(), Attachments::default()).await;
    let rec = pools.volume(&vol.id).await.unwrap().unwrap();
    assert_eq!(rec.image, pending.overlay);
    assert_eq!(rec.chain.backing, vec![vol.image.clone()]);
    assert_eq!(rec.chain.freezing, None);
}
