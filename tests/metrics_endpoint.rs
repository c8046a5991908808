//! Prometheus metrics and JSON logs of a running plugin: per-RPC counters by code, latency
//! histograms, pool gauges; every RPC's span carries its volume id; secrets appear nowhere.

mod common;

use common::{create_req, Plugin, MIB};
use serde_json::Value;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use virtdisk_csi::csi::proto as csi;

const SECRET: &str = "vdt-ops-s3cr3t-value";

/// `GET path` over plain HTTP/1.1; returns (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON log line ({e}): {l}")))
        .collect()
}

/// The address the plugin bound for `--metrics-addr 127.0.0.1:0`, from its log.
async fn metrics_addr(p: &Plugin) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for line in json_lines(&p.log()) {
            if line["fields"]["message"] == "serving metrics on /metrics" {
                return line["fields"]["address"].as_str().unwrap().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in the log:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample whose line starts with `series` exactly.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
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

    id.probe(csi::ProbeRequest {}).await.unwrap();
    let mut with_secret = create_req("vdt-ops-metrics-a", 16 * MIB);
    with_secret.secrets.insert("password".into(), SECRET.into());
    let a = ctl
        .create_volume(with_secret)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let b = ctl
        .create_volume(create_req("vdt-ops-metrics-b", 8 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let missing = ctl
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "default.0000000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    ctl.list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap();
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
