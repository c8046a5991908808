//! Secrets never leave the request: a unique marker is sent as secret values and keys in every
//! RPC that carries secrets (succeeding and failing calls alike), with trace logging, in text
//! and JSON log formats and with the metrics endpoint on, and it must appear in no log line,
//! no metric, no file of the data dir (records, local-attach state) and no error message.
//! (The socket's 0600 mode is proven in tests/server_lifecycle.rs and checked here again.)

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use virtdisk_test_support::metrics::{http_get_raw, metrics_addr};
use virtdisk_test_support::pool::assert_pool_clean;
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::walk;

fn marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("vdt-s3cr3t-{}-{nanos:x}", std::process::id())
}

fn secrets(m: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("password".to_string(), m.to_string()),
        (format!("key-{m}"), "value".to_string()),
        ("token".to_string(), format!("Bearer {m}")),
    ])
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    walk(dir)
        .into_iter()
        .filter(|(_, m)| m.is_file() && m.len() < 64 << 20)
        .filter(|(path, _)| {
            std::fs::read(path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .map(|(path, _)| path.display().to_string())
        .collect()
}

/// Runs every secret-carrying RPC with the marker; returns the error messages seen.
async fn exercise(p: &Plugin, m: &str, node_rpcs: bool) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |r: Result<(), Status>| {
        if let Err(e) = r {
            errors.push(format!("{:?}: {}", e.code(), e.message()));
        }
    };
    let s = secrets(m);
    let mut c = p.controller();
    let cap = ext4_cap();
    let req = csi::CreateVolumeRequest {
        secrets: s.clone(),
        ..create_req("secret-vol", 16 * MIB)
    };
    let vol = c.create(req).await.unwrap().volume_id;
    // Failing calls carry secrets too: their errors must not echo them.
    let bad = csi::CreateVolumeRequest {
        capacity_range: capacity(-5),
        secrets: s.clone(),
        ..create_req("secret-bad", -1)
    };
    note(c.create(bad).await.map(drop));
    let bad = csi::CreateVolumeRequest {
        parameters: params(&[("bus", "bogus")]),
        secrets: s.clone(),
        ..create_req("secret-bad2", 16 * MIB)
    };
    note(c.create(bad).await.map(drop));
    let validate = csi::ValidateVolumeCapabilitiesRequest {
        secrets: s.clone(),
        ..validate_req(&vol, cap.clone())
    };
    note(c.validate_volume_capabilities(validate).await.map(drop));
    let expand = csi::ControllerExpandVolumeRequest {
        secrets: s.clone(),
        ..expand_req(&vol, 32 * MIB)
    };
    note(c.expand(expand).await.map(drop));
    for qos in [("totalIopsSec", "100"), ("nope", "1")] {
        let modify = csi::ControllerModifyVolumeRequest {
            volume_id: vol.clone(),
            secrets: s.clone(),
            mutable_parameters: params(&[qos]),
        };
        note(c.controller_modify_volume(modify).await.map(drop));
    }
    let req = csi::CreateSnapshotRequest {
        secrets: s.clone(),
        ..snapshot_req("secret-snap", &vol)
    };
    let snap = c.snapshot(req).await.unwrap().snapshot_id;
    let list = csi::ListSnapshotsRequest {
        secrets: s.clone(),
        ..Default::default()
    };
    note(c.list_snapshots(list).await.map(drop));
    for id in [snap.as_str(), "default.s0000000000000000"] {
        let get = csi::GetSnapshotRequest {
            snapshot_id: id.into(),
            secrets: s.clone(),
        };
        note(c.get_snapshot(get).await.map(drop));
    }
    // A service this plugin does not offer, with secrets: Unimplemented, nothing logged.
    let mut g = csi::group_controller_client::GroupControllerClient::new(p.channel.clone());
    note(
        g.create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "g".into(),
            source_volume_ids: vec![vol.clone()],
            secrets: s.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
    );

    if node_rpcs {
        let node = p.node().node_id().await;
        let publish = csi::ControllerPublishVolumeRequest {
            secrets: s.clone(),
            ..publish_req(&vol, &node)
        };
        let ctx = c.publish(publish).await.unwrap();
        let staging = p.dir.path().join("csi/staging/s").display().to_string();
        let target = p.dir.path().join("csi/target/t").display().to_string();
        let mut n = p.node();
        let stage = |cap| csi::NodeStageVolumeRequest {
            publish_context: ctx.clone(),
            secrets: s.clone(),
            ..stage_req(&vol, &staging, cap)
        };
        n.stage(stage(cap.clone())).await.unwrap();
        let publish = csi::NodePublishVolumeRequest {
            secrets: s.clone(),
            ..node_publish_req(&vol, &staging, &target, cap.clone())
        };
        n.publish(publish).await.unwrap();
        let expand = csi::NodeExpandVolumeRequest {
            staging_target_path: staging.clone(),
            secrets: s.clone(),
            ..node_expand_req(&vol, &target, 32 * MIB)
        };
        note(n.expand(expand).await.map(drop));
        // A failing stage (wrong fs type on an existing filesystem) with secrets.
        note(
            n.stage(stage(mount_cap("xfs", Mode::SingleNodeWriter)))
                .await,
        );
        n.unpublish(node_unpublish_req(&vol, &target))
            .await
            .unwrap();
        n.unstage(unstage_req(&vol, &staging)).await.unwrap();
        let unpublish = csi::ControllerUnpublishVolumeRequest {
            secrets: s.clone(),
            ..unpublish_req(&vol, &node)
        };
        c.unpublish(unpublish).await.unwrap();
    }
    let delete_snapshot = csi::DeleteSnapshotRequest {
        snapshot_id: snap,
        secrets: s.clone(),
    };
    c.delete_snapshot(delete_snapshot).await.unwrap();
    let delete = |id: &str| csi::DeleteVolumeRequest {
        volume_id: id.into(),
        secrets: s.clone(),
    };
    note(c.delete_volume(delete("../../etc")).await.map(drop));
    c.delete_volume(delete(&vol)).await.unwrap();
    errors
}

async fn secrets_stay_secret(log_format: &str) {
    let m = marker();
    let node_rpcs = nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists();
    if !node_rpcs {
        eprintln!("node RPCs SKIPPED: they need root and /dev/fuse");
    }
    let config = "[libvirt]\nenabled = false\n[node]\ndevice_wait_secs = 5\n";
    let p = Plugin::start_with_env(
        "monolith",
        config,
        &["--log-format", log_format, "--metrics-addr", "127.0.0.1:0"],
        &[("RUST_LOG", "trace")],
    )
    .await;
    let mode = std::fs::metadata(&p.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    let addr = metrics_addr(&p).await;

    let errors = exercise(&p, &m, node_rpcs).await;
    assert!(errors.len() >= 6, "the failing calls failed: {errors:?}");
    for e in &errors {
        assert!(!e.contains(&m), "an error message carries the secret: {e}");
    }
    let metrics = http_get_raw(&addr, "/metrics");
    assert!(metrics.contains("virtdisk_csi_rpc_requests_total"));
    assert!(!metrics.contains(&m), "the metrics carry the secret");
    let log = p.log();
    assert!(
        log.contains("TRACE"),
        "trace logging is on ({} lines)",
        log.lines().count()
    );
    let leaked: Vec<&str> = log.lines().filter(|l| l.contains(&m)).take(3).collect();
    assert!(leaked.is_empty(), "the log carries the secret: {leaked:#?}");
    let in_files = files_containing(&p.data_dir(), &m);
    assert!(in_files.is_empty(), "files carry the secret: {in_files:?}");
    assert_pool_clean(&p.pool_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_text_logs_metrics_records_or_errors() {
    secrets_stay_secret("text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_json_logs_metrics_records_or_errors() {
    secrets_stay_secret("json").await;
}
