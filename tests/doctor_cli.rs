//! `virtdisk-csi doctor` on this machine: the CI host is set up like it, so it must pass.

use serde_json::Value;
use std::process::{Command, Output};
use virtdisk_test_support::output_text as text;
use virtdisk_test_support::plugin::bin;

fn doctor(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("doctor")
        .args(args)
        .output()
        .expect("run virtdisk-csi doctor")
}

#[test]
fn passes_on_this_host_and_prints_each_check() {
    let dir = tempfile::tempdir().unwrap();
    let o = doctor(&["--data-dir", dir.path().to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "doctor failed here:\n{out}");
    for check in [
        "qemu-img",
        "qemu-storage-daemon",
        "pool default",
        "/dev/kvm",
        "libvirt",
        "virtio-scsi",
        "sysfs",
        "mkfs.ext4",
        "blkid",
        "losetup",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("OK") && l.contains(check)),
            "no OK line for {check}:\n{out}"
        );
    }
    assert!(out.contains(" 0 FAIL"), "{out}");
}

#[test]
fn json_report_for_each_mode() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["controller", "node", "monolith"] {
        let o = doctor(&[
            "--mode",
            mode,
            "--data-dir",
            dir.path().to_str().unwrap(),
            "-o",
            "json",
        ]);
        let report: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{mode}: not JSON ({e}): {}", text(&o)));
        assert_eq!(report["mode"], mode);
        assert_eq!(report["passed"], true, "{mode}: {report:#}");
        assert!(o.status.success());
        for check in report["checks"].as_array().unwrap() {
            let status = check["status"].as_str().unwrap();
            assert!(["OK", "WARN", "FAIL"].contains(&status));
            if status != "OK" {
                assert!(
                    check["fix"].as_str().is_some_and(|f| !f.is_empty()),
                    "{check}"
                );
            }
        }
        let names: Vec<&str> = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        if mode != "node" {
            assert!(
                names.contains(&"libvirt") && names.contains(&"qemu-img"),
                "{names:?}"
            );
        } else {
            assert!(!names.contains(&"libvirt"), "{names:?}");
            assert!(
                names.contains(&"mountinfo") && names.contains(&"node id"),
                "{names:?}"
            );
        }
    }
}

#[test]
fn fails_with_a_fix_when_a_pool_is_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[pool]]\nname = \"broken\"\npath = \"{}\"\n",
            not_a_dir.display()
        ),
    )
    .unwrap();
    let o = doctor(&["--mode", "controller", "--config", config.to_str().unwrap()]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    let line = out
        .lines()
        .position(|l| l.starts_with("FAIL") && l.contains("pool broken"))
        .unwrap_or_else(|| panic!("no FAIL for the pool:\n{out}"));
    assert!(out.lines().nth(line + 1).unwrap().contains("fix:"), "{out}");

    // Two pools on one directory: the config FAILs, naming both.
    std::fs::write(
        &config,
        format!(
            "[[pool]]\nname = \"a\"\npath = \"{0}/p\"\n[[pool]]\nname = \"b\"\npath = \"{0}/p\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let o = doctor(&["--mode", "controller", "--config", config.to_str().unwrap()]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL")
            && l.contains("config")
            && l.contains("pool \"a\"")
            && l.contains("pool \"b\"")
            && l.contains("the same directory")),
        "{out}"
    );

    std::fs::write(&config, "[[pool]]\nname = \"x\"\n").unwrap();
    let o = doctor(&["--mode", "controller", "--config", config.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o)
        .lines()
        .any(|l| l.starts_with("FAIL") && l.contains("config")));
}

#[test]
fn unreachable_libvirt_fails_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let o = doctor(&[
        "--mode",
        "controller",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--libvirt-uri",
        "qemu+unix:///system?socket=/nonexistent/vdt-ops/libvirt-sock",
    ]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("libvirt")),
        "{out}"
    );
}

/// Two `[[host]]` entries, one on the machine's libvirtd and one whose libvirtd is down: the
/// first is checked, the second FAILs, and the domain UUIDs are not reported as all checked.
/// Two entries that reach the machine's libvirtd under two uris: one libvirtd, a FAIL that
/// says so (not "two domains share a UUID").
#[test]
fn two_hosts_one_down_or_one_libvirtd_twice() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let with_hosts = |second_uri: &str| {
        format!(
            "[[pool]]\nname = \"shared\"\npath = \"{}\"\n\
             [[host]]\nname = \"hv1\"\nuri = \"qemu:///system\"\npools = [\"shared\"]\n\
             [[host]]\nname = \"hv2\"\nuri = \"{second_uri}\"\npools = [\"shared\"]\n",
            dir.path().join("pool").display()
        )
    };
    let run = |config_text: String| {
        std::fs::write(&config, config_text).unwrap();
        let o = doctor(&[
            "--mode",
            "controller",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ]);
        let out = text(&o);
        assert!(!o.status.success(), "{out}");
        out
    };
    let line = |out: &str, start: &str| {
        out.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?}:\n{out}"))
            .to_string()
    };

    let out = run(with_hosts(
        "qemu+unix:///system?socket=/nonexistent/vdt-ops/libvirt-sock",
    ));
    assert!(
        line(&out, "OK    libvirt (hv1)").contains("reachable"),
        "{out}"
    );
    assert!(
        line(&out, "FAIL  libvirt (hv2)").contains("cannot use"),
        "{out}"
    );
    let uuids = line(&out, "WARN  domain UUIDs");
    assert!(uuids.contains("not checked on host(s) hv2"), "{out}");

    let out = run(with_hosts(
        "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
    ));
    let hosts = line(&out, "FAIL  hosts");
    assert!(
        hosts.contains("reach one and the same libvirtd: hv1 and hv2"),
        "{out}"
    );
    assert!(!out.contains("FAIL  domain UUIDs"), "{out}");
}
