//! A REAL libvirtd restart (kill, then `libvirtd -d`) between and during calls: the plugin is not
//! restarted, reports not ready and UNAVAILABLE while libvirtd is gone, and recovers by itself.
//!
//! It kills the machine's libvirtd, so it runs only where nothing else uses libvirtd at the same
//! time: in CI (`CI` set; test binaries run one after another) or with
//! `VIRTDISK_RESTART_LIBVIRTD=1`. `hotplug_reconnect.rs` covers the same ground through a relay
//! on shared machines.

#![cfg(feature = "libvirt")]

use std::process::Command;
use std::time::{Duration, Instant};
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::virsh::{ensure_libvirtd, virsh};

fn libvirtd_running() -> bool {
    Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .status()
        .is_ok_and(|s| s.success())
}

fn kill_libvirtd() {
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while libvirtd_running() {
        assert!(Instant::now() < deadline, "libvirtd did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_libvirtd() {
    let status = Command::new("libvirtd")
        .arg("-d")
        .status()
        .expect("libvirtd");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !virsh(&["version"]).status.success() {
        assert!(Instant::now() < deadline, "libvirtd did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Restarts libvirtd if the test fails half-way.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        if !libvirtd_running() {
            start_libvirtd();
        }
    }
}

async fn probe(p: &Plugin) -> Result<(), Status> {
    p.identity().ready().await.map(drop)
}

async fn publish(p: &Plugin, volume: &str, node: &str) -> Result<(), Status> {
    let req = publish_req(volume, node);
    p.controller().publish(req).await.map(drop)
}

async fn unpublish(p: &Plugin, volume: &str, node: &str) -> Result<(), Status> {
    p.controller().unpublish(unpublish_req(volume, node)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_libvirtd_restart_does_not_break_the_plugin() {
    if std::env::var_os("CI").is_none() && std::env::var_os("VIRTDISK_RESTART_LIBVIRTD").is_none() {
        eprintln!(
            "SKIPPED a_real_libvirtd_restart_does_not_break_the_plugin: it kills libvirtd; set \
             CI=1 or VIRTDISK_RESTART_LIBVIRTD=1 where nothing else uses libvirtd"
        );
        return;
    }
    ensure_libvirtd();
    let _restore = Restore;
    let dom = TestDomain::start("restart", 3);
    let launch = Plugin::launch("controller").config("[libvirt]\ndetach_timeout_secs = 10\n");
    let p = launch.readable_by_qemu().start().await;
    let mut ids = Vec::new();
    for name in ["restart-one", "restart-two"] {
        let v = p.controller().create(create_req(name, 64 * MIB)).await;
        ids.push(v.unwrap().volume_id);
    }
    probe(&p).await.expect("ready");
    publish(&p, &ids[0], &dom.uuid).await.expect("publish");

    // Restarted between two calls.
    kill_libvirtd();
    start_libvirtd();
    publish(&p, &ids[1], &dom.uuid)
        .await
        .expect("publish after a libvirtd restart");
    assert!(dom.live_disk(&serial_of(&ids[1])).is_some());

    // Gone: not ready, retryable errors, nothing detached, never a false OK.
    kill_libvirtd();
    let err = probe(&p).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = unpublish(&p, &ids[1], &dom.uuid).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = publish(&p, &ids[0], &dom.uuid).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Back: the same plugin process recovers; the attachments are read back from the domain.
    start_libvirtd();
    assert!(
        dom.live_disk(&serial_of(&ids[1])).is_some(),
        "still attached"
    );
    probe(&p).await.expect("ready again");
    for e in &p.controller().all_volumes().await {
        assert_eq!(
            e.status.as_ref().unwrap().published_node_ids,
            vec![dom.uuid.clone()]
        );
    }
    for id in &ids {
        unpublish(&p, id, &dom.uuid).await.expect("unpublish");
        assert!(dom.live_disk(&serial_of(id)).is_none());
    }
}
