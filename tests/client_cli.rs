//! `virtdisk-csi client` against the real plugin binary: tables for people, JSON for
//! programs, paging, idempotency, and errors that name the gRPC code.

use serde_json::Value;
use std::process::{Command, Output};
use virtdisk_test_support::plugin::bin;
use virtdisk_test_support::Plugin;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed, and its stderr passes `check`: returns the stderr.
fn failed(o: &Output, check: impl Fn(&str) -> bool) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded: {err}");
    assert!(check(&err), "stderr: {err}");
    err
}

fn ids(list: &Value) -> Vec<String> {
    list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["volume"]["volume_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn identity_info_caps_probe() {
    let p = Plugin::start("controller", &[]).await;
    let info = p.client_json(&["identity", "info"]);
    assert_eq!(info["name"], "virtdisk.csi.io");
    assert_eq!(info["vendor_version"], env!("CARGO_PKG_VERSION"));
    let table = p.client_ok(&["identity", "info"]);
    assert!(
        table.contains("name:") && table.contains("virtdisk.csi.io"),
        "{table}"
    );
    let caps = p.client_json(&["identity", "caps"]);
    assert!(caps["capabilities"]
        .as_array()
        .unwrap()
        .contains(&Value::from("controller-service")));
    assert_eq!(p.client_ok(&["identity", "probe"]).trim(), "ready");
    assert_eq!(p.client_json(&["identity", "probe"])["ready"], true);
    let vcaps = p.client_json(&["volume", "caps"]);
    assert!(vcaps["capabilities"]
        .as_array()
        .unwrap()
        .contains(&Value::from("create-delete-volume")));
}

#[tokio::test]
async fn volume_lifecycle_with_paging() {
    let p = Plugin::start("controller", &[]).await;

    // Sizes as Nomad writes them: decimal and binary units.
    let create = [
        "volume",
        "create",
        "--name",
        "cli-0",
        "--size",
        "20M",
        "--fs",
        "ext4",
        "--param",
        "bus=scsi",
        "--param",
        "cache=none",
    ];
    let created = p.client_json(&create);
    let first = created["volume"]["volume_id"].as_str().unwrap().to_string();
    assert!(created["volume"]["capacity_bytes"].as_i64().unwrap() >= 20_000_000);
    assert_eq!(created["volume"]["volume_context"]["fsType"], "ext4");
    // Idempotent by name.
    let again = p.client_json(&create);
    assert_eq!(again["volume"]["volume_id"], first.as_str());
    for i in 1..5 {
        let name = format!("cli-{i}");
        let out = p.client_ok(&[
            "volume", "create", "--name", &name, "--size", "10MiB", "--block",
        ]);
        assert!(
            out.contains("volume id:") && out.contains("10 MiB"),
            "{out}"
        );
    }

    // One page of 2, then follow next_token by hand.
    let page = p.client_json(&["volume", "list", "--max-entries", "2"]);
    assert_eq!(ids(&page).len(), 2);
    let mut walked = ids(&page);
    let mut token = page["next_token"].as_str().unwrap().to_string();
    while !token.is_empty() {
        let page = p.client_json(&[
            "volume",
            "list",
            "--max-entries",
            "2",
            "--starting-token",
            &token,
        ]);
        walked.extend(ids(&page));
        token = page["next_token"].as_str().unwrap().to_string();
    }
    assert_eq!(walked.len(), 5);
    // --all does the same loop.
    let all = p.client_json(&["volume", "list", "--max-entries", "2", "--all"]);
    assert_eq!(ids(&all), walked);
    assert_eq!(all["next_token"], "");
    let unpaged = p.client_json(&["volume", "list"]);
    assert_eq!(ids(&unpaged), walked);
    // The table: a header, one row per volume, the next token when there is one.
    let table = p.client_ok(&["volume", "list", "--max-entries", "3"]);
    assert!(table.starts_with("VOLUME ID"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.starts_with("default.")).count(),
        3
    );
    assert!(table.contains("next token: "), "{table}");

    // get, validate, expand.
    let got = p.client_json(&["volume", "get", &first]);
    assert_eq!(got["volume"]["volume_id"], first.as_str());
    assert_eq!(got["status"]["volume_condition"]["abnormal"], false);
    // Nomad's register: mount{} without fs_type.
    let v = p.client_json(&["volume", "validate", &first]);
    assert_eq!(v["confirmed"], true);
    let grown = p.client_json(&["volume", "expand", &first, "--size", "30M"]);
    assert!(grown["capacity_bytes"].as_i64().unwrap() >= 30_000_000);
    assert_eq!(grown["node_expansion_required"], true);

    // delete everything; deleting again is OK.
    for id in &walked {
        p.client_ok(&["volume", "delete", id]);
    }
    p.client_ok(&["volume", "delete", &first]);
    assert!(ids(&p.client_json(&["volume", "list", "--all"])).is_empty());
    let gone = p.client(&["volume", "get", &first]);
    failed(&gone, |e| e.contains("NotFound:"));
}

/// `volume create --mutable-param` and `volume modify` (ControllerModifyVolume): the QoS keys
/// change, and the original create, repeated, still answers the same volume.
#[tokio::test]
async fn modify_changes_qos_and_the_original_create_stays_the_same_volume() {
    let p = Plugin::start("controller", &[]).await;
    let create = [
        "volume",
        "create",
        "--name",
        "cli-qos",
        "--size",
        "16M",
        "--param",
        "readIopsSec=100",
        "--mutable-param",
        "writeBytesSec=1048576",
    ];
    let id = p.client_json(&create)["volume"]["volume_id"]
        .as_str()
        .unwrap()
        .to_string();
    let modified = p.client_json(&[
        "volume",
        "modify",
        &id,
        "--param",
        "readIopsSec=500",
        "--param",
        "writeBytesSec=2097152",
    ]);
    assert_eq!(modified["modified"], id.as_str());
    assert_eq!(modified["mutable_parameters"]["readIopsSec"], "500");
    let table = p.client_ok(&["volume", "modify", &id, "--param", "readIopsSec=700"]);
    assert!(
        table.contains("modified") && table.contains("readIopsSec=700"),
        "{table}"
    );
    // The CO's retry of the original CreateVolume: the same volume.
    let again = p.client_json(&create);
    assert_eq!(again["volume"]["volume_id"], id.as_str());
    // Only QoS keys are mutable; a volume that does not exist is NOT_FOUND; no --param is a
    // usage error before any RPC.
    let bad = p.client(&["volume", "modify", &id, "--param", "cache=none"]);
    failed(&bad, |e| {
        e.contains("InvalidArgument:") && e.contains("cache")
    });
    let missing = p.client(&[
        "volume",
        "modify",
        "default.0123456789abcdef",
        "--param",
        "readIopsSec=5",
    ]);
    failed(&missing, |e| e.contains("NotFound:"));
    let none = p.client(&["volume", "modify", &id]);
    assert_eq!(none.status.code(), Some(2), "{}", stderr(&none));
    p.client_ok(&["volume", "delete", &id]);
}

#[tokio::test]
async fn errors_name_the_grpc_code_and_exit_non_zero() {
    let p = Plugin::start("controller", &[]).await;
    let bad_token = p.client(&["volume", "list", "--starting-token", "garbage"]);
    failed(&bad_token, |e| e.starts_with("error: Aborted:"));
    let bad_param = p.client(&["volume", "create", "--name", "x", "--param", "speed=fast"]);
    failed(&bad_param, |e| {
        e.contains("InvalidArgument:") && e.contains("speed")
    });
    // A size the client cannot read is a usage error (clap), before any RPC.
    let bad_size = p.client(&["volume", "create", "--name", "x", "--size", "10XB"]);
    assert_eq!(bad_size.status.code(), Some(2), "{}", stderr(&bad_size));
    assert!(stderr(&bad_size).contains("unknown unit"));
    // Nothing listening.
    let nowhere = Command::new(bin())
        .args([
            "client",
            "--endpoint",
            "unix:///nonexistent/virtdisk/csi.sock",
        ])
        .args(["identity", "probe"])
        .output()
        .unwrap();
    failed(&nowhere, |e| e.contains("Unavailable"));
}

#[tokio::test]
async fn node_info_from_a_monolith() {
    let p = Plugin::start("monolith", &["--node-id", "vdt-ops-node-1"]).await;
    let info = p.client_json(&["node", "info"]);
    assert_eq!(info["node_id"], "vdt-ops-node-1");
    let table = p.client_ok(&["node", "info"]);
    assert!(
        table.contains("node id:") && table.contains("vdt-ops-node-1"),
        "{table}"
    );
    // caps is a table with a header, whatever the node offers.
    assert!(p.client_ok(&["node", "caps"]).starts_with("CAPABILITY"));
}

/// `volume capacity` of a full pool says there is no room ("none"), not "unknown": for
/// GetCapacity 0 is an answer.
#[tokio::test]
async fn capacity_of_a_full_pool_reads_none() {
    let config = "[[pool]]\nname = \"small\"\npath = \"{dir}/small\"\ncapacity_bytes = 1048576\n";
    let p = Plugin::start_with_config("controller", config, &[]).await;
    p.client_ok(&["volume", "create", "--name", "fills", "--size", "1MiB"]);
    let out = p.client_ok(&["volume", "capacity", "--param", "pool=small"]);
    assert!(
        out.lines()
            .any(|l| l.contains("available") && l.contains("none (0 bytes)")),
        "{out}"
    );
    assert!(!out.contains("unknown"), "{out}");
}
