//! The images the plugin writes itself (no `qemu-img` process on CreateVolume, see
//! `src/pool/qcow2.rs`) against what `qemu-img create` writes for the same request: the same
//! bytes (the plugin's file is sparse where QEMU's holds zero blocks), the same
//! `qemu-img info` (format version/compat, size, cluster size, features, backing file and
//! format), and `qemu-img check` clean. Plain qcow2 at sizes from 1 MiB to 1 PiB, raw, and the
//! overlays a snapshot and a restore make.

use serde_json::Value;
use std::path::{Path, PathBuf};
use virtdisk_test_support::pool::volume_image;
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::qemu::qemu_img;

/// `qemu-img info` without what names the file itself or depends on how it is allocated.
fn info_without_names(path: &Path) -> Value {
    let mut v = qemu_img_info(path);
    let o = v.as_object_mut().unwrap();
    for k in ["filename", "actual-size", "full-backing-filename"] {
        o.remove(k);
    }
    v
}

/// The volume's active image, from its record.
fn image_of(p: &Plugin, volume_id: &str) -> PathBuf {
    volume_image(&p.pool_dir(), volume_id)
}

/// What `qemu-img create` makes for the same image, in `dir`.
fn reference(dir: &Path, ours: &Path) -> PathBuf {
    let info = qemu_img_info(ours);
    let format = info["format"].as_str().unwrap();
    let size = info["virtual-size"].as_u64().unwrap().to_string();
    let path = dir.join(format!(
        "ref-{}",
        ours.file_name().unwrap().to_string_lossy()
    ));
    let mut args = vec!["create", "-q", "-f", format];
    let backing = info["backing-filename"].as_str().map(str::to_string);
    if let Some(b) = &backing {
        // -u: the backing file is named, not opened (it lives in the pool, not here).
        args.extend(["-u", "-b", b, "-F", "qcow2"]);
    }
    let p = path.to_str().unwrap().to_string();
    args.push(&p);
    args.push(&size);
    qemu_img(&args);
    path
}

/// Ours and QEMU's agree in bytes, in `qemu-img info`, and both check clean.
fn assert_like_qemu_img(ours: &Path, refs: &Path) {
    let theirs = reference(refs, ours);
    assert_eq!(
        info_without_names(ours),
        info_without_names(&theirs),
        "qemu-img info of {} and of qemu-img create's image",
        ours.display()
    );
    let (a, b) = (
        std::fs::read(ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "file lengths of {}", ours.display());
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{} differs from qemu-img create's image at byte {at:#x}",
            ours.display()
        );
    }
    if qemu_img_info(ours)["format"] == "qcow2" {
        qemu_img_check(ours);
    }
}

async fn create(p: &Plugin, name: &str, bytes: i64, format: &str) -> String {
    let mut req = create_req(name, bytes);
    req.parameters = params(&[("format", format)]);
    p.controller().create(req).await.unwrap().volume_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_images_are_what_qemu_img_create_makes() {
    let p = Plugin::start("controller", &[]).await;
    let refs = tempfile::tempdir().unwrap();
    for (i, size) in [MIB, 16 * MIB, 1 << 30, 100 << 30, 1 << 40, 1 << 50]
        .into_iter()
        .enumerate()
    {
        let id = create(&p, &format!("q{i}"), size, "qcow2").await;
        let image = image_of(&p, &id);
        assert_eq!(qemu_img_info(&image)["virtual-size"], size);
        assert_eq!(
            qemu_img_info(&image)["format-specific"]["data"]["compat"],
            "1.1"
        );
        assert_like_qemu_img(&image, refs.path());
    }
    for (i, size) in [MIB, 1 << 30].into_iter().enumerate() {
        let id = create(&p, &format!("r{i}"), size, "raw").await;
        assert_like_qemu_img(&image_of(&p, &id), refs.path());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlays_are_what_qemu_img_create_makes() {
    let p = Plugin::start("controller", &[]).await;
    let refs = tempfile::tempdir().unwrap();
    let vol = create(&p, "src", 1 << 30, "qcow2").await;
    let before = image_of(&p, &vol);
    let snap = p
        .controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "snap".into(),
            source_volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    // The volume continues in an overlay on its frozen layer.
    let overlay = image_of(&p, &vol);
    assert_ne!(overlay, before);
    let info = qemu_img_info(&overlay);
    assert_eq!(
        info["backing-filename"].as_str(),
        before.file_name().unwrap().to_str()
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_like_qemu_img(&overlay, refs.path());

    // A restore is an overlay on the snapshot's layer, of the requested (larger) size.
    let mut req = create_req("restored", 2 << 30);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id,
            },
        )),
    });
    let restored = p.controller().create(req).await.unwrap().volume_id;
    let image = image_of(&p, &restored);
    assert_eq!(qemu_img_info(&image)["virtual-size"], 2i64 << 30);
    assert_like_qemu_img(&image, refs.path());
}
