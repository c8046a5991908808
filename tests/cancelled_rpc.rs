//! Issue 17 defect 6: an RPC cancelled while its libvirt call runs does not let the next call
//! on the same domain in before that call has returned. The domain's lock (and the call's
//! permit) are held by the blocking closure that makes the call, not by the RPC's future,
//! which the server drops when the client gives up.
//!
//! The same for the volume: a controller change runs as a task of its own that holds the
//! volume's lock until the work is done, whatever the client does; meanwhile another operation
//! on the volume answers ABORTED, and a request identical to the one in flight waits for its
//! result (Nomad repeats ControllerUnpublish while the first is still detaching).
//!
//! And at SIGTERM: a change whose client gave up is joined by the shutdown within its grace
//! period, not dropped with the process half way.
//!
//! The libvirt call is made long with the failpoint `libvirt.iotune-set` armed to pause (a
//! debug build's `VIRTDISK_FAILPOINT_PAUSE_MS`): ControllerModifyVolume's blocking closure
//! sleeps right after setting the disk's live I/O limits, as a slow libvirtd would keep it,
//! until the test releases it (`VIRTDISK_FAILPOINT_RELEASE`): what must happen during the
//! pause is checked before the release, however slow the machine is.

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

use std::time::{Duration, Instant};
use virtdisk_test_support::failpoint::Hold;
use virtdisk_test_support::pool::volume_record;
use virtdisk_test_support::prelude::*;

/// How long a call that must wait for a paused one is watched before the release: it must not
/// have answered by then (a wrong answer comes in milliseconds).
const WATCH: Duration = Duration::from_millis(500);

/// Checks that `call` (a spawned RPC that must wait for a paused one) has not answered within
/// `WATCH`, then releases the pause and returns its answer.
async fn answered_after_release<T: std::fmt::Debug>(
    call: tokio::task::JoinHandle<T>,
    release: &Hold,
    what: &str,
) -> T {
    tokio::time::sleep(WATCH).await;
    assert!(
        !call.is_finished(),
        "{what} answered while the call it must wait for was paused: {:?}",
        call.await
    );
    release.release();
    call.await.expect("the call's task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rpc_keeps_the_domain_locked_until_its_libvirt_call_returns() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let dom = TestDomain::start("cancel", 3);
    let release = Hold::new("libvirt.iotune-set");
    let p = paused_at(&release).await;
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
    let mut controller = p.controller();
    let modify = controller.controller_modify_volume(csi::ControllerModifyVolumeRequest {
        volume_id: vol.clone(),
        mutable_parameters: params(&[("totalIopsSec", "700")]),
        ..Default::default()
    });
    let gave_up = tokio::time::timeout(Duration::from_millis(1500), modify).await;
    assert!(gave_up.is_err(), "the QoS change returned during the pause");
    p.wait_paused("libvirt.iotune-set", 1).await;

    // Attaching the other volume to the same domain waits until the cancelled call's closure
    // has returned, not just until the RPC was cancelled.
    let mut c = p.controller();
    let req = publish_req(&other, &dom.uuid);
    let second = tokio::spawn(async move { c.controller_publish_volume(req).await });
    answered_after_release(second, &release, "the second call on the domain")
        .await
        .expect("the second call succeeds once the first call returned");
    // The cancelled call did finish its work.
    let serial = serial_of(&vol);
    assert_eq!(
        dom.live_disk(&serial).unwrap().iotune.total_iops_sec,
        Some(700)
    );
}

/// A controller whose step `hold` pauses each time it is reached, until released.
async fn paused_at(hold: &Hold) -> Plugin {
    Plugin::launch("controller")
        .env(&hold.env())
        .readable_by_qemu()
        .start()
        .await
}

/// A domain, a controller whose libvirt step `point` pauses, and a volume `tag`, published
/// to the domain when `publish`.
async fn volume_on_paused(
    tag: &str,
    publish: bool,
    release: &Hold,
) -> (TestDomain, Plugin, String) {
    let dom = TestDomain::start(tag, 3);
    let p = paused_at(release).await;
    let vol = p.controller().create(create_req(tag, 64 * MIB)).await;
    let vol = vol.expect("create").volume_id;
    if publish {
        p.controller()
            .publish(publish_req(&vol, &dom.uuid))
            .await
            .expect("publish");
    }
    (dom, p, vol)
}

fn modify_req(volume_id: &str, iops: &str) -> csi::ControllerModifyVolumeRequest {
    csi::ControllerModifyVolumeRequest {
        volume_id: volume_id.into(),
        mutable_parameters: params(&[("totalIopsSec", iops)]),
        ..Default::default()
    }
}

/// ControllerModifyVolume cancelled by its client while libvirt sets the limits: the volume
/// stays locked until the change is done (other operations on it answer ABORTED instead of
/// running beside it), and the change completes, on the disk and in the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_modify_keeps_the_volume_locked_until_it_is_done() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let release = Hold::new("libvirt.iotune-set");
    let (dom, p, vol) = volume_on_paused("cancel-mod", true, &release).await;

    let mut c = p.controller();
    let modify = c.controller_modify_volume(modify_req(&vol, "700"));
    let gave_up = tokio::time::timeout(Duration::from_millis(1500), modify).await;
    assert!(gave_up.is_err(), "the QoS change returned during the pause");
    p.wait_paused("libvirt.iotune-set", 1).await;

    // The client is gone; the change is not: every other operation on the volume is refused.
    let other = p
        .controller()
        .controller_modify_volume(modify_req(&vol, "800"))
        .await;
    expect_code(other, Code::Aborted, "another QoS change");
    let unpublish = p
        .controller()
        .unpublish(unpublish_req(&vol, &dom.uuid))
        .await;
    expect_code(unpublish, Code::Aborted, "unpublish during the change");
    let delete = p.controller().delete(&vol).await;
    expect_code(delete, Code::Aborted, "delete during the change");
    release.release();

    // The cancelled change completes: on the disk, and in the record.
    let serial = serial_of(&vol);
    eventually(Duration::from_secs(20), || {
        let rec = volume_record(&p.pool_dir(), &vol);
        async move {
            match rec["disk"]["qos"]["total_iops_sec"] == 700 {
                true => Ok(()),
                false => Err(format!("the cancelled change is not in the record: {rec}")),
            }
        }
    })
    .await;
    assert_eq!(
        dom.live_disk(&serial).unwrap().iotune.total_iops_sec,
        Some(700)
    );
    // And then the volume is free again.
    p.controller()
        .controller_modify_volume(modify_req(&vol, "800"))
        .await
        .expect("a change after the first one finished");
    assert_eq!(
        dom.live_disk(&serial).unwrap().iotune.total_iops_sec,
        Some(800)
    );
    p.controller()
        .unpublish(unpublish_req(&vol, &dom.uuid))
        .await
        .expect("unpublish");
}

/// ControllerPublish cancelled by its client while libvirt attaches: another operation on the
/// volume answers ABORTED; the same publish again (a CO's retry) waits for the first and gets
/// its answer; the disk is attached once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_publish_completes_and_its_retry_gets_its_answer() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let release = Hold::new("libvirt.attached");
    let (dom, p, vol) = volume_on_paused("cancel-pub", false, &release).await;

    let mut c = p.controller();
    let publish = c.controller_publish_volume(publish_req(&vol, &dom.uuid));
    let gave_up = tokio::time::timeout(Duration::from_millis(1500), publish).await;
    assert!(gave_up.is_err(), "the publish returned during the pause");
    p.wait_paused("libvirt.attached", 1).await;

    let unpublish = p
        .controller()
        .unpublish(unpublish_req(&vol, &dom.uuid))
        .await;
    expect_code(unpublish, Code::Aborted, "unpublish during the publish");
    let mut c = p.controller();
    let req = publish_req(&vol, &dom.uuid);
    let retry = tokio::spawn(async move { c.publish(req).await });
    let retry = answered_after_release(retry, &release, "the retried publish").await;
    let ctx = retry.expect("the retried publish gets the first one's answer");
    assert!(
        p.log().contains("an identical request is in flight"),
        "the retry did not wait for the first publish"
    );
    let serial = serial_of(&vol);
    assert_eq!(ctx.get("serial"), Some(&serial));
    assert!(dom.live_disk(&serial).is_some(), "the disk is not attached");
    // The one attach paused once: the retry attached nothing of its own.
    assert_eq!(
        p.log()
            .matches("failpoint libvirt.attached: pausing")
            .count(),
        1
    );
    p.controller()
        .unpublish(unpublish_req(&vol, &dom.uuid))
        .await
        .expect("unpublish");
    assert!(dom.live_disk(&serial).is_none());
}

/// Two identical ControllerUnpublish calls while the detach is slow (Nomad repeats them): both
/// answer OK once the disk is gone, and the detach runs once; a caller whose deadline ends
/// first gets DEADLINE_EXCEEDED; a different operation on the volume meanwhile is ABORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_unpublishes_in_flight_share_one_detach() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let release = Hold::new("libvirt.detach-requested");
    let (dom, p, vol) = volume_on_paused("dup-unpub", true, &release).await;
    let serial = serial_of(&vol);
    assert!(dom.live_disk(&serial).is_some());

    let calls: Vec<_> = (0..2)
        .map(|_| {
            let mut c = p.controller();
            let req = unpublish_req(&vol, &dom.uuid);
            tokio::spawn(async move { c.controller_unpublish_volume(req).await })
        })
        .collect();
    p.wait_paused("libvirt.detach-requested", 1).await;
    let mut short = tonic::Request::new(unpublish_req(&vol, &dom.uuid));
    short.set_timeout(Duration::from_millis(300));
    let impatient = p.controller().controller_unpublish_volume(short).await;
    let code = impatient.as_ref().err().map(|s| s.code());
    assert!(
        matches!(code, Some(Code::DeadlineExceeded | Code::Cancelled)),
        "a joined call outlived its deadline: {impatient:?}"
    );
    let publish = p.controller().publish(publish_req(&vol, &dom.uuid)).await;
    expect_code(publish, Code::Aborted, "publish during the detach");
    tokio::time::sleep(WATCH).await;
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "an unpublish answered while the detach was paused"
    );
    release.release();
    for call in calls {
        call.await
            .unwrap()
            .expect("both identical unpublishes succeed");
    }
    assert!(
        dom.live_disk(&serial).is_none(),
        "the disk is still attached"
    );
    assert_eq!(
        p.log()
            .matches("failpoint libvirt.detach-requested: pausing")
            .count(),
        1,
        "the detach ran more than once"
    );
}

/// CreateVolumeGroupSnapshot runs as a task of its own too: a client that gives up while the
/// group is being committed does not cut it short, the group's volumes stay locked meanwhile
/// (another change to a member is ABORTED), and the identical retry gets the first one's group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_group_snapshot_completes_and_its_retry_gets_its_answer() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let release = Hold::new("group.members-recorded");
    let p = paused_at(&release).await;
    let mut ids = Vec::new();
    for name in ["grp-cancel-a", "grp-cancel-b"] {
        let v = p.controller().create(create_req(name, 8 * MIB)).await;
        ids.push(v.expect("create").volume_id);
    }
    let members: Vec<&str> = ids.iter().map(String::as_str).collect();
    let req = group_snapshot_req("grp-cancel", &members);

    let mut g = p.group_controller();
    let create = g.create_volume_group_snapshot(req.clone());
    let gave_up = tokio::time::timeout(Duration::from_millis(1500), create).await;
    assert!(
        gave_up.is_err(),
        "the group snapshot returned during the pause"
    );
    p.wait_paused("group.members-recorded", 1).await;

    let expand = csi::ControllerExpandVolumeRequest {
        volume_id: ids[0].clone(),
        capacity_range: capacity(16 * MIB),
        ..Default::default()
    };
    let expand = p.controller().controller_expand_volume(expand).await;
    expect_code(
        expand,
        Code::Aborted,
        "expanding a member during its group snapshot",
    );

    let mut g = p.group_controller();
    let retry = tokio::spawn(async move { g.create_group(req).await });
    let retry = answered_after_release(retry, &release, "the retried group snapshot").await;
    let group = retry.expect("the retried group snapshot gets the first one's answer");
    assert!(group.ready_to_use);
    assert_eq!(group.snapshots.len(), 2);
    assert_eq!(
        p.log()
            .matches("failpoint group.members-recorded: pausing")
            .count(),
        1,
        "the retry made a group of its own"
    );
}

/// A change whose client gave up is not dropped at SIGTERM: the shutdown waits for it (within
/// the grace period, 10 s by default) and it completes, record included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_change_whose_client_gave_up() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let release = Hold::new("libvirt.iotune-set");
    let (dom, mut p, vol) = volume_on_paused("cancel-term", true, &release).await;
    let mut c = p.controller();
    let modify = c.controller_modify_volume(modify_req(&vol, "700"));
    let gave_up = tokio::time::timeout(Duration::from_millis(1500), modify).await;
    assert!(gave_up.is_err(), "the QoS change returned during the pause");
    p.wait_paused("libvirt.iotune-set", 1).await;

    // No RPC is in flight now, only the abandoned change.
    let asked = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid().expect("running") as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The shutdown waits for the change: still running while it is paused.
    let early = p.wait_exit(WATCH).await;
    assert!(
        early.is_none(),
        "exited during the paused change: {early:?}"
    );
    release.release();
    let status = p.wait_exit(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    let log = p.log();
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM:\n{log}"));
    assert!(status.success(), "exit status {status:?}:\n{log}");
    assert!(!log.contains("given up"), "{log}");
    assert!(!log.contains("abandoned"), "{log}");
    // The change completed before the exit: on the disk, and in the record.
    let rec = volume_record(&p.pool_dir(), &vol);
    assert_eq!(rec["disk"]["qos"]["total_iops_sec"], 700, "{rec}\n{log}");
    assert_eq!(
        dom.live_disk(&serial_of(&vol))
            .unwrap()
            .iotune
            .total_iops_sec,
        Some(700)
    );
    eprintln!("SIGTERM → exit after the abandoned change finished: {took:?}");
}
