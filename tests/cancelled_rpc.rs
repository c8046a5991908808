//! Issue 17 defect 6: an RPC cancelled while its libvirt call runs does not let the next call
//! on the same domain in before that libvirt call has returned. The domain's lock (and the
//! call's permit) are held by the blocking closure that makes the call, not by the RPC's
//! future, which the server drops when the client gives up.
//!
//! The libvirt call is made to hang for real: the domain's QEMU is stopped (SIGSTOP, by the
//! pid libvirt wrote for this test's own domain), so a QoS change waits for QEMU's monitor,
//! while reading the domain's XML still answers at once.

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

mod common;
mod hotplug_support;

use common::*;
use hotplug_support::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};
use virtdisk_csi::csi::proto as csi;

/// A stopped QEMU, continued again when dropped (also when the test fails).
struct Stopped(Pid);

impl Stopped {
    fn stop(dom: &TestDomain) -> Stopped {
        let pid: i32 = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", dom.name))
            .expect("QEMU pid file of the test domain")
            .trim()
            .parse()
            .unwrap();
        let pid = Pid::from_raw(pid);
        kill(pid, Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

fn publish_req(volume: &str, node: &str) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rpc_keeps_the_domain_locked_until_its_libvirt_call_returns() {
    let dom = TestDomain::start("cancel", 3);
    let p = Plugin::start("controller", &[]).await;
    open_for_qemu(p.dir.path());
    let vol = p
        .controller()
        .create_volume(create_req("cancel-qos", 64 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    p.controller()
        .controller_publish_volume(publish_req(&vol, &dom.uuid))
        .await
        .expect("publish");

    let stopped = Stopped::stop(&dom);
    // The QoS change's libvirt call waits for the stopped QEMU; the client gives up.
    let mut controller = p.controller();
    let modify = controller.controller_modify_volume(csi::ControllerModifyVolumeRequest {
        volume_id: vol.clone(),
        mutable_parameters: params(&[("totalIopsSec", "700")]),
        ..Default::default()
    });
    let gave_up = tokio::time::timeout(Duration::from_millis(800), modify).await;
    assert!(
        gave_up.is_err(),
        "the QoS change returned with QEMU stopped"
    );

    // A second call on the same domain, one whose own libvirt calls answer at once (the
    // volume is attached already: a read of the XML, no QEMU): it waits for the first.
    let started = Instant::now();
    let mut again = p.controller();
    let vol2 = vol.clone();
    let node = dom.uuid.clone();
    let second = tokio::spawn(async move {
        again
            .controller_publish_volume(publish_req(&vol2, &node))
            .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !second.is_finished(),
        "the second call ran while the cancelled call's libvirt call was still waiting"
    );
    let continued = Instant::now();
    drop(stopped);
    second
        .await
        .unwrap()
        .expect("the second call succeeds once the first call returned");
    eprintln!(
        "second call: waited {} ms, answered {} ms after QEMU was continued",
        started.elapsed().as_millis(),
        continued.elapsed().as_millis()
    );
    eprintln!("{}", p.log());
    // The cancelled call did finish its work meanwhile.
    let serial = serial_of(&vol);
    assert_eq!(
        dom.live_disk(&serial).unwrap().iotune.total_iops_sec,
        Some(700)
    );
    p.controller()
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: dom.uuid.clone(),
            ..Default::default()
        })
        .await
        .expect("unpublish");
}
