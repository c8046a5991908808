//! Issue 17 defect 6: an RPC cancelled while its libvirt call runs does not let the next call
//! on the same domain in before that call has returned. The domain's lock (and the call's
//! permit) are held by the blocking closure that makes the call, not by the RPC's future,
//! which the server drops when the client gives up.
//!
//! The libvirt call is made long with the failpoint `libvirt.iotune-set` armed to pause (a
//! debug build's `VIRTDISK_FAILPOINT_PAUSE_MS`): ControllerModifyVolume's blocking closure
//! sleeps right after setting the disk's live I/O limits, as a slow libvirtd would keep it.

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

use std::time::{Duration, Instant};
use virtdisk_csi::failpoint::{ENV, PAUSE_ENV};
use virtdisk_test_support::prelude::*;

/// How long the QoS change's libvirt closure is held.
const PAUSE: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rpc_keeps_the_domain_locked_until_its_libvirt_call_returns() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let dom = TestDomain::start("cancel", 3);
    let pause = PAUSE.as_millis().to_string();
    let launch =
        Plugin::launch("controller").env(&[(ENV, "libvirt.iotune-set"), (PAUSE_ENV, &pause)]);
    let p = launch.readable_by_qemu().start().await;
    // Two volumes, the first attached to the domain: the per-volume operation guard must not
    // be what serializes the two calls below; the domain's lock must.
    let mut vols = Vec::new();
    for name in ["cancel-qos", "cancel-other"] {
        let vol = p.controller().create(create_req(name, 64 * MIB)).await;
        let vol = vol.expect("create").volume_id;
        vols.push(vol);
    }
    let (vol, other) = (vols[0].clone(), vols[1].clone());
    p.controller()
        .publish(publish_req(&vol, &dom.uuid))
        .await
        .expect("publish");

    // The QoS change reaches its (paused) libvirt closure; the client gives up meanwhile.
    let started = Instant::now();
    let mut controller = p.controller();
    let modify = controller.controller_modify_volume(csi::ControllerModifyVolumeRequest {
        volume_id: vol.clone(),
        mutable_parameters: params(&[("totalIopsSec", "700")]),
        ..Default::default()
    });
    let gave_up = tokio::time::timeout(Duration::from_millis(1500), modify).await;
    assert!(gave_up.is_err(), "the QoS change returned during the pause");
    assert!(
        p.log().contains("failpoint libvirt.iotune-set: pausing"),
        "the QoS change did not reach its libvirt call within 1.5 s"
    );

    // Attaching the other volume to the same domain waits until the cancelled call's closure
    // has returned, not just until the RPC was cancelled.
    p.controller()
        .publish(publish_req(&other, &dom.uuid))
        .await
        .expect("the second call succeeds once the first call returned");
    let waited = started.elapsed();
    eprintln!(
        "second call answered {} ms after the first call began (its closure pauses {} ms)",
        waited.as_millis(),
        PAUSE.as_millis()
    );
    assert!(
        waited >= PAUSE,
        "the second call ran while the cancelled call's libvirt closure still held the domain"
    );
    // The cancelled call did finish its work.
    let serial = serial_of(&vol);
    assert_eq!(
        dom.live_disk(&serial).unwrap().iotune.total_iops_sec,
        Some(700)
    );
}
