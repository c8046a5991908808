//! Prometheus metrics and JSON logs of a running plugin: per-RPC counters by code, latency
//! histograms, pool gauges; every RPC's span carries its volume id; secrets appear nowhere;
//! attaches, detaches and timed operations move their histograms.

use serde_json::Value;
use virtdisk_test_support::metrics::{http_get, metrics_addr, sample};
use virtdisk_test_support::prelude::*;

const SECRET: &str = "vdt-ops-s3cr3t-value";

/// The whole JSON lines of `log` (the plugin may be writing its last one now).
fn json_lines(log: &str) -> Vec<Value> {
    let whole = log.rfind('\n').map_or("", |end| &log[..end]);
    whole
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON log line ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn metrics_count_rpcs_by_code_and_logs_carry_the_volume_id() {
    let p = Plugin::start(
        "controller",
        &["--metrics-addr", "127.0.0.1:0", "--log-format", "json"],
    )
    .await;
    let addr = metrics_addr(&p).await;
    let mut ctl = p.controller();
    let mut id = p.identity();

    id.ready().await.unwrap();
    let with_secret = csi::CreateVolumeRequest {
        secrets: params(&[("password", SECRET)]),
        ..create_req("vdt-ops-metrics-a", 16 * MIB)
    };
    let a = ctl.create(with_secret).await.unwrap().volume_id;
    let b = ctl.create(create_req("vdt-ops-metrics-b", 8 * MIB)).await;
    let b = b.unwrap().volume_id;
    let missing = ctl.volume("default.0000000000000000").await;
    expect_code(missing, Code::NotFound, "ControllerGetVolume of nothing");
    ctl.all_volumes().await;
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: b.clone(),
        secrets: [("token".to_string(), SECRET.to_string())].into(),
    })
    .await
    .unwrap();

    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let c = |method: &str, code: &str| {
        let series = format!(
            "virtdisk_csi_rpc_requests_total{{code=\"{code}\",method=\"{method}\",service=\"Controller\"}}"
        );
        sample(&body, &series)
    };
    assert_eq!(c("CreateVolume", "OK"), Some(2.0), "{body}");
    assert_eq!(c("DeleteVolume", "OK"), Some(1.0));
    assert_eq!(c("ControllerGetVolume", "NotFound"), Some(1.0));
    assert!(c("ListVolumes", "OK").unwrap() >= 1.0);
    assert_eq!(
        sample(
            &body,
            "virtdisk_csi_rpc_errors_total{code=\"NotFound\",method=\"ControllerGetVolume\",service=\"Controller\"}"
        ),
        Some(1.0)
    );
    assert!(sample(
        &body,
        "virtdisk_csi_rpc_requests_total{code=\"OK\",method=\"Probe\",service=\"Identity\"}"
    )
    .is_some());
    // Latency histograms per RPC.
    assert_eq!(
        sample(
            &body,
            "virtdisk_csi_rpc_duration_seconds_bucket{method=\"CreateVolume\",service=\"Controller\",le=\"+Inf\"}"
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "virtdisk_csi_rpc_duration_seconds_count{method=\"ControllerGetVolume\",service=\"Controller\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "virtdisk_csi_rpc_in_flight{method=\"CreateVolume\",service=\"Controller\"}"
        ),
        Some(0.0)
    );
    // Pool gauges, read at the scrape.
    assert_eq!(
        sample(&body, "virtdisk_csi_pool_volumes{pool=\"default\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "virtdisk_csi_pool_up{pool=\"default\"}"),
        Some(1.0)
    );
    assert!(
        sample(
            &body,
            "virtdisk_csi_pool_provisioned_bytes{pool=\"default\"}"
        )
        .unwrap()
            >= (16 * MIB) as f64
    );
    assert!(sample(&body, "virtdisk_csi_pool_free_bytes{pool=\"default\"}").unwrap() > 0.0);
    // The hooks other modules call are exposed even before the first attach.
    assert!(body.contains("virtdisk_csi_attach_duration_seconds_count"));
    assert!(body.contains("virtdisk_csi_detach_duration_seconds_count"));
    assert!(body.contains("virtdisk_csi_build_info{mode=\"controller\""));
    assert!(!body.contains(SECRET));

    let (status, _) = http_get(&addr, "/other");
    assert!(status.contains("404"), "{status}");

    // Logs: JSON lines; each RPC's span names its volume; no secret anywhere.
    let log = p.log();
    assert!(!log.contains(SECRET), "a secret reached the log");
    let lines = json_lines(&log);
    let in_span = |rpc: &str, field: &str, value: &str| {
        lines
            .iter()
            .any(|l| l["span"]["rpc"] == rpc && l["span"][field] == value)
    };
    assert!(
        in_span("DeleteVolume", "volume_id", &b),
        "no DeleteVolume line with volume_id {b}"
    );
    assert!(in_span("CreateVolume", "volume_name", "vdt-ops-metrics-a"));
    assert!(in_span(
        "ControllerGetVolume",
        "volume_id",
        "default.0000000000000000"
    ));
    // The failed RPC is logged with its code.
    assert!(lines
        .iter()
        .any(|l| l["span"]["rpc"] == "ControllerGetVolume" && l["fields"]["code"] == "NotFound"));
    let _ = a;
}

/// The `_count` of histogram `name` (with `labels`, e.g. `{operation="mkfs"}`) now; 0 when the
/// series does not exist yet.
fn count(addr: &str, name: &str, labels: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    sample(&body, &format!("virtdisk_csi_{name}_count{labels}")).unwrap_or(0.0)
}

/// Issue 17 defect 1: a publish, an unpublish and a filesystem creation each move their
/// histogram by one; calls that change nothing (a repeated publish or unpublish) do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_detach_and_operation_histograms_follow_what_happened() {
    use virtdisk_test_support::local_attach::{unique, Env};
    let Some(env) = Env::try_start_with_args(
        "[node]\ndevice_wait_secs = 2\n",
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await
    else {
        return;
    };
    let addr = metrics_addr(&env.plugin).await;
    // Local attach is this machine: host "local".
    let attaches = || count(&addr, "attach_duration_seconds", "{host=\"local\"}");
    let detaches = || count(&addr, "detach_duration_seconds", "{host=\"local\"}");
    let mkfs = || count(&addr, "operation_duration_seconds", "{operation=\"mkfs\"}");
    assert_eq!((attaches(), detaches(), mkfs()), (0.0, 0.0, 0.0));

    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vol = env.create(&unique("metrics"), 32 * MIB, cap.clone()).await;
    assert_eq!(attaches(), 0.0, "a create attaches nothing");
    let ctx = env.controller_publish(&vol, &cap, false).await;
    assert_eq!(attaches(), 1.0);
    env.controller_publish(&vol, &cap, false).await;
    assert_eq!(attaches(), 1.0, "an idempotent publish is no attach");

    let staging = env.staging("metrics");
    env.stage(&vol, &ctx, &staging, &cap).await.unwrap();
    assert_eq!(mkfs(), 1.0, "the blank disk got a filesystem");
    env.unstage(&vol, &staging).await.unwrap();
    env.stage(&vol, &ctx, &staging, &cap).await.unwrap();
    assert_eq!(mkfs(), 1.0, "a formatted disk is not formatted again");
    env.unstage(&vol, &staging).await.unwrap();

    assert_eq!(detaches(), 0.0);
    env.finish(&vol).await; // unpublish twice, delete, nothing left
    assert_eq!(
        detaches(),
        1.0,
        "one detach, and the second unpublish changed nothing"
    );
    assert_eq!(attaches(), 1.0);
}

/// The same for libvirt hot-plug: one attach and one detach of the implicit host ("local"),
/// each confirmed in the domain's XML; repeats change nothing.
#[cfg(feature = "libvirt")]
#[tokio::test]
async fn hot_plug_attach_and_detach_move_the_host_histograms() {
    virtdisk_test_support::virsh::ensure_libvirtd();
    let dom = TestDomain::start("metrics", 2);
    let p = Plugin::launch("controller")
        .config("[libvirt]\ndetach_timeout_secs = 5\n")
        .args(&["--metrics-addr", "127.0.0.1:0"])
        .readable_by_qemu()
        .start()
        .await;
    let addr = metrics_addr(&p).await;
    let attaches = || count(&addr, "attach_duration_seconds", "{host=\"local\"}");
    let detaches = || count(&addr, "detach_duration_seconds", "{host=\"local\"}");
    let (a0, d0) = (attaches(), detaches());

    let vol = p
        .controller()
        .create(create_req("vdt-ops-metrics-hotplug", 16 * MIB))
        .await
        .unwrap();
    let serial = serial_of(&vol.volume_id);
    for _ in 0..2 {
        p.controller()
            .publish(publish_req(&vol.volume_id, &dom.uuid))
            .await
            .unwrap();
    }
    assert!(dom.live_disk(&serial).is_some());
    assert_eq!(attaches(), a0 + 1.0, "one attach; the repeat found it done");
    for _ in 0..2 {
        p.controller()
            .unpublish(unpublish_req(&vol.volume_id, &dom.uuid))
            .await
            .unwrap();
    }
    assert!(dom.live_disk(&serial).is_none());
    assert_eq!(attaches(), a0 + 1.0);
    assert_eq!(
        detaches(),
        d0 + 1.0,
        "one detach; the repeat had nothing to detach"
    );
}
