//! The deployment files validate offline: Nomad HCL parses (python-hcl2), Kubernetes YAML
//! validates against the Kubernetes schemas (kubernetes-validate), the flags they pass exist,
//! the parameters they use are known, and the example config loads.
//!
//! Needs `pip install python-hcl2 kubernetes-validate`; without them the validation is skipped
//! with a printed reason (the script exits 77).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use virtdisk_test_support::output_text as text;
use virtdisk_test_support::plugin::bin;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the validator on `root`; None (after printing why) when it cannot run here.
fn validate(root: &Path) -> Option<Output> {
    let out = Command::new("python3")
        .arg(repo().join("scripts/validate-manifests.py"))
        .arg("--root")
        .arg(root)
        .arg("--binary")
        .arg(bin())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            println!("SKIPPED: python3 is not available ({e})");
            return None;
        }
    };
    if out.status.code() == Some(77) {
        println!(
            "SKIPPED: {} (pip install python-hcl2 kubernetes-validate)",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        return None;
    }
    Some(out)
}

#[test]
fn manifests_and_jobs_validate() {
    let Some(out) = validate(&repo()) else { return };
    let t = text(&out);
    assert!(out.status.success(), "validation failed:\n{t}");
    assert!(t.contains(" 0 failed"), "{t}");
    for expected in [
        "nomad-jobs/plugin-controller.nomad.hcl: parses as HCL2",
        "nomad-jobs/nomad-1.1/plugin-monolith.nomad.hcl: parses as HCL2",
        "nomad-jobs/volume.hcl: parses as HCL2",
        "nomad-jobs/volume-local.hcl: plugin_id 'hv1-virtdisk' is the csi_plugin id of a plugin job",
        "raw_exec plugin gets host paths (stage_publish_base_dir = /opt/nomad/data/client/csi/node/virtdisk",
        "raw_exec mount_dir /opt/nomad/data/client/csi/monolith/<host>-virtdisk is Nomad's directory",
        "--config local/config.toml is rendered by a template",
        "uses no stage_publish_base_dir (Nomad 1.3.3)",
        "does not start with plugin id",
        "CSIDriver virtdisk.csi.io validates against Kubernetes",
        "VolumeSnapshotClass virtdisk validates against the embedded",
        "controller has the csi-resizer sidecar",
        "ExecStart: `virtdisk-csi serve` accepts",
    ] {
        assert!(t.contains(expected), "missing {expected:?}:\n{t}");
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[test]
fn broken_files_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    copy_tree(&repo().join("nomad-jobs"), &root.join("nomad-jobs"));
    copy_tree(&repo().join("deploy"), &root.join("deploy"));
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::copy(repo().join("src/params.rs"), root.join("src/params.rs")).unwrap();

    // Each file with one text replaced.
    for (file, from, to) in [
        (
            "deploy/kubernetes/storageclass.yaml",
            "  bus: scsi\n",
            "  bus: scsi\n  speed: fast\n",
        ),
        (
            "deploy/kubernetes/csidriver.yaml",
            "attachRequired: true",
            "attachRequired: \"yes\"",
        ),
        (
            "nomad-jobs/plugin-node.nomad.hcl",
            "\"--log-format\", \"json\"",
            "\"--log-fmt\", \"json\"",
        ),
        // The paths of Nomad < 1.3 (state_dir without /client), a config file that exists on
        // no fresh host, and a monolith id that starts with "virtdisk".
        (
            "nomad-jobs/nomad-1.1/plugin-node.nomad.hcl",
            "\"${var.nomad_data_dir}/client\"",
            "var.nomad_data_dir",
        ),
        (
            "nomad-jobs/nomad-1.1/plugin-node.nomad.hcl",
            "\"local/config.toml\",",
            "\"/etc/virtdisk-csi/config.toml\",",
        ),
        (
            "nomad-jobs/plugin-monolith.nomad.hcl",
            "\"${var.host}-virtdisk\"",
            "\"virtdisk-local-${var.host}\"",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(root.join(file), text.replace(from, to)).unwrap();
    }
    std::fs::write(
        root.join("nomad-jobs/broken.hcl"),
        "job \"x\" {\n  group {\n",
    )
    .unwrap();

    let Some(out) = validate(root) else { return };
    let t = text(&out);
    assert!(!out.status.success(), "broken files passed:\n{t}");
    for expected in [
        "FAIL  nomad-jobs/broken.hcl: does not parse",
        "unknown: ['speed']",
        "CSIDriver virtdisk.csi.io against Kubernetes",
        "unknown: ['--log-fmt']",
        "FAIL  nomad-jobs/nomad-1.1/plugin-node.nomad.hcl: job plugin-virtdisk-node task plugin: raw_exec mount_dir /opt/nomad/data/csi/node/virtdisk is Nomad's directory /opt/nomad/data/client/csi/node/virtdisk",
        "FAIL  nomad-jobs/nomad-1.1/plugin-node.nomad.hcl: job plugin-virtdisk-node task plugin: --config /etc/virtdisk-csi/config.toml is rendered by a template",
        "FAIL  nomad-jobs: plugin id 'virtdisk-local-<host>' does not start with plugin id 'virtdisk'",
        // plugin-node.nomad.hcl changed, its nomad-1.1/ variant not.
        "FAIL  nomad-jobs/nomad-1.1/plugin-node.nomad.hcl: differs from nomad-jobs/plugin-node.nomad.hcl only where Nomad 1.1 needs it",
    ] {
        assert!(t.contains(expected), "missing {expected:?}:\n{t}");
    }
}

#[test]
fn example_config_loads() {
    use virtdisk_csi::config::{Config, Mode, Overrides};
    let path = repo().join("deploy/config.example.toml");
    let cfg = Config::load(Mode::Monolith, Some(&path), Overrides::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(cfg.pools.len(), 2);
    assert!(cfg.has_topology());
    assert_eq!(cfg.libvirt.uri, "qemu:///system");
}

#[test]
fn two_host_config_loads() {
    use virtdisk_csi::config::{Config, Mode, Overrides};
    let path = repo().join("deploy/config.two-hosts.toml");
    let cfg = Config::load(Mode::Controller, Some(&path), Overrides::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(cfg.hosts_configured && cfg.has_topology());
    let hosts: Vec<&str> = cfg.hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(hosts, ["hv1", "hv2"]);
    let shared = cfg.pools.iter().find(|p| p.name == "shared").unwrap();
    assert_eq!(shared.hosts, ["hv1", "hv2"]);
    assert_eq!(shared.accessible_topologies().len(), 2);
}
