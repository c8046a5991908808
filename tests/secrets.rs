//! Secrets never leave the request: a unique marker is sent as secret values and keys in every
//! RPC that carries secrets (succeeding and failing calls alike), with trace logging, in text
//! and JSON log formats and with the metrics endpoint on, and it must appear in no log line,
//! no metric, no file of the data dir (records, local-attach state) and no error message.
//! (The socket's 0600 mode is proven in tests/server_lifecycle.rs and checked here again.)

mod common;
mod reliability_support;

use common::*;
use reliability_support::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};
use virtdisk_csi::csi::proto as csi;

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

/// The metrics address the plugin logged for `--metrics-addr 127.0.0.1:0` (text or JSON).
async fn metrics_addr(p: &Plugin) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = p.log();
        // Only the process started with the marker's environment counts: the last such line.
        if let Some(line) = log
            .lines()
            .rev()
            .find(|l| l.contains("serving metrics on /metrics"))
        {
            let at = line.find("127.0.0.1:").unwrap();
            let addr: String = line[at..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            return addr;
        }
        assert!(Instant::now() < deadline, "no metrics address in the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let path = e.path();
            let Ok(m) = path.symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                todo.push(path);
            } else if m.is_file() && m.len() < 64 << 20 {
                if let Ok(bytes) = std::fs::read(&path) {
                    if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                        hits.push(path.display().to_string());
                    }
                }
            }
        }
    }
    hits
}

/// Runs every secret-carrying RPC with the marker; returns the error messages seen.
async fn exercise(p: &Plugin, m: &str, node_rpcs: bool) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |r: Result<(), tonic::Status>| {
        if let Err(e) = r {
            errors.push(format!("{:?}: {}", e.code(), e.message()));
        }
    };
    let s = secrets(m);
    let mut c = p.controller();
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let mut req = create_req("secret-vol", 16 * MIB);
    req.secrets = s.clone();
    let vol = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    // Failing calls carry secrets too: their errors must not echo them.
    let mut bad = create_req("secret-bad", -1);
    bad.capacity_range = Some(csi::CapacityRange {
        required_bytes: -5,
        limit_bytes: 0,
    });
    bad.secrets = s.clone();
    note(c.create_volume(bad).await.map(drop));
    let mut bad = create_req("secret-bad2", 16 * MIB);
    bad.parameters = params(&[("bus", "bogus")]);
    bad.secrets = s.clone();
    note(c.create_volume(bad).await.map(drop));
    note(
        c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: vol.clone(),
            volume_capabilities: vec![cap.clone()],
            secrets: s.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
    );
    note(
        c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: vol.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            secrets: s.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
    );
    note(
        c.controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: vol.clone(),
            secrets: s.clone(),
            mutable_parameters: params(&[("totalIopsSec", "100")]),
        })
        .await
        .map(drop),
    );
    note(
        c.controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: vol.clone(),
            secrets: s.clone(),
            mutable_parameters: params(&[("nope", "1")]),
        })
        .await
        .map(drop),
    );
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "secret-snap".into(),
            source_volume_id: vol.clone(),
            secrets: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    note(
        c.list_snapshots(csi::ListSnapshotsRequest {
            secrets: s.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
    );
    note(
        c.get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: snap.clone(),
            secrets: s.clone(),
        })
        .await
        .map(drop),
    );
    note(
        c.get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: "default.s0000000000000000".into(),
            secrets: s.clone(),
        })
        .await
        .map(drop),
    );
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
        let node = p
            .node()
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .node_id;
        let ctx = c
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: vol.clone(),
                node_id: node.clone(),
                volume_capability: Some(cap.clone()),
                secrets: s.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        let staging = p.dir.path().join("csi/staging/s");
        let target = p.dir.path().join("csi/target/t");
        let mut n = p.node();
        n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.clone(),
            publish_context: ctx.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            secrets: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        n.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            secrets: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        note(
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: vol.clone(),
                volume_path: target.display().to_string(),
                staging_target_path: staging.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 0,
                }),
                secrets: s.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        );
        // A failing stage (wrong fs type on an existing filesystem) with secrets.
        note(
            n.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.clone(),
                publish_context: ctx,
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap("xfs", Mode::SingleNodeWriter)),
                secrets: s.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        );
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: vol.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: node,
            secrets: s.clone(),
        })
        .await
        .unwrap();
    }
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap,
        secrets: s.clone(),
    })
    .await
    .unwrap();
    note(
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: "../../etc".into(),
            secrets: s.clone(),
        })
        .await
        .map(drop),
    );
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: vol,
        secrets: s,
    })
    .await
    .unwrap();
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
    let metrics = http_get(&addr, "/metrics");
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
