//! Group snapshots (CSI GroupController, VolumeGroupSnapshot) against the real binary,
//! libvirtd, KVM domains and qemu-img: every member is cut at one point of a writer that
//! alternates writes across the volumes (so a cut at different points would show), on one
//! domain (one QEMU transaction) and across two domains (paused together); restoring the
//! members shows a prefix of the writer's sequence. Plus the RPCs' contract: idempotency,
//! the spec's codes, members listed with their group and deleted only with it.

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

use std::collections::BTreeSet;
use std::time::Instant;
use virtdisk_test_support::metrics::{http_get, metrics_addr, sample};
use virtdisk_test_support::pool::{assert_pool_clean, group_record, snapshot_record, volume_image};
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::sequence::{MonitorWriter, Sequence};

const VOL: i64 = 64 * MIB;
/// Each write of the sequence: one 4 KiB block.
const BLOCK: u64 = 4096;

async fn controller() -> Plugin {
    let launch = Plugin::launch("controller").config("[libvirt]\ndetach_timeout_secs = 2\n");
    let launch = launch.args(&["--metrics-addr", "127.0.0.1:0"]);
    launch.readable_by_qemu().start().await
}

/// The guarantee a group met, as the operator sees it: the "group snapshot created" log line
/// of `group_id` names it, and the metrics count `groups` groups of that kind.
async fn assert_guarantee_reported(p: &Plugin, group_id: &str, consistency: &str, groups: f64) {
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("group snapshot created") && l.contains(group_id))
        .unwrap_or_else(|| panic!("no \"group snapshot created\" line for {group_id}:\n{log}"));
    assert!(
        line.contains(consistency),
        "the log names the guarantee {consistency}: {line}"
    );
    let (status, body) = http_get(&metrics_addr(p).await, "/metrics");
    assert!(status.contains("200"), "{status}");
    let series = format!("virtdisk_csi_group_snapshots_total{{consistency=\"{consistency}\"}}");
    assert_eq!(sample(&body, &series), Some(groups), "{series}:\n{body}");
}

async fn create(p: &Plugin, name: &str, parameters: &[(&str, &str)]) -> String {
    let req = csi::CreateVolumeRequest {
        parameters: params(parameters),
        ..create_req(name, VOL)
    };
    let vol = p.controller().create(req).await;
    vol.unwrap_or_else(|e| panic!("create volume {name}: {e:?}"))
        .volume_id
}

async fn restore(p: &Plugin, name: &str, snapshot_id: &str) -> String {
    let req = create_from_req(name, VOL, from_snapshot(snapshot_id));
    let vol = p.controller().create(req).await;
    vol.unwrap_or_else(|e| panic!("restore {name}: {e:?}"))
        .volume_id
}

/// The writes a group snapshot holds: each member restored, its written blocks counted; the
/// counts must be a prefix of the writer's sequence (`sources` in the writer's order).
async fn writes_in_group(
    p: &Plugin,
    group: &csi::VolumeGroupSnapshot,
    sources: &[String],
    seq: Sequence,
    tag: &str,
) -> u64 {
    let mut counts = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let member = group
            .snapshots
            .iter()
            .find(|s| s.source_volume_id == *source)
            .unwrap_or_else(|| panic!("no member of {source} in {group:?}"));
        let restored = restore(p, &format!("{tag}-restored-{i}"), &member.snapshot_id).await;
        let image = volume_image(&p.pool_dir(), &restored);
        counts.push(seq.written_blocks(&image, (VOL as u64) / BLOCK));
    }
    seq.prefix(&counts)
        .unwrap_or_else(|e| panic!("the group is not one point of the writes: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_of_one_domain_are_cut_in_one_transaction_under_a_writer() {
    let dom = TestDomain::with_guest_agent("group1");
    let p = controller().await;
    // On virtio-scsi: HMP's `qemu-io -d` reaches a SCSI disk's block backend by its device id
    // (a virtio-blk-pci device keeps it on a child device). The guest sequence covers
    // virtio-blk (tests/guest_e2e_sequence.rs).
    let mut vols = Vec::new();
    for i in 0..4 {
        let v = create(&p, &format!("g1-{i}"), &[]).await;
        p.controller()
            .publish(publish_req(&v, &dom.uuid))
            .await
            .expect("publish");
        vols.push(v);
    }
    let seq = Sequence::new(vols.len(), BLOCK);
    let disks = vols
        .iter()
        .map(|v| dom.monitor_disk(&serial_of(v)))
        .collect();
    let writer = MonitorWriter::start(seq, disks);
    writer.wait_for(10).await;

    let ids: Vec<&str> = vols.iter().map(String::as_str).collect();
    let before = writer.done();
    let t = Instant::now();
    let group = p
        .group_controller()
        .create_group(group_snapshot_req("g1", &ids))
        .await
        .expect("CreateVolumeGroupSnapshot");
    let took = t.elapsed();
    // Started by the end of the call: a write lands before its `virsh` returns.
    let after = writer.issued();
    writer.wait_for(after + 8).await;
    let total = writer.stop();
    eprintln!(
        "group of {} attached volumes: {} ms; writes done before / started by the end of the call: {before}/{after} \
         of {total}",
        vols.len(),
        took.as_millis()
    );

    assert!(group.ready_to_use);
    assert_eq!(group.snapshots.len(), vols.len());
    assert!(group.creation_time.is_some());
    for s in &group.snapshots {
        assert_eq!(s.group_snapshot_id, group.group_snapshot_id);
        assert!(s.ready_to_use);
        assert_eq!(s.size_bytes, VOL);
        assert_eq!(
            s.creation_time, group.creation_time,
            "members share the cut's time"
        );
    }
    // No guest agent answers in a domain without an OS: crash-consistent, one transaction.
    let record = group_record(&p.pool_dir(), &group.group_snapshot_id);
    assert_eq!(record["consistency"], "crash");
    assert_guarantee_reported(&p, &group.group_snapshot_id, "crash-consistent", 1.0).await;
    assert_eq!(
        p.log()
            .matches("live snapshot: the domain writes to the new overlay(s)")
            .count(),
        1,
        "one live operation for the four disks:\n{}",
        p.log()
    );
    for v in &vols {
        let live = dom.live_disk(&serial_of(v)).expect("still attached");
        assert_eq!(
            live.source.as_deref(),
            Some(volume_image(&p.pool_dir(), v).as_path()),
            "{v} writes to its new overlay"
        );
    }

    let held = writes_in_group(&p, &group, &vols, seq, "g1").await;
    eprintln!("the group holds the first {held} writes");
    assert!(
        held >= before && held <= after,
        "the cut lies within the call: {before} <= {held} <= {after}"
    );

    // Members are ordinary snapshots that name their group, deleted only with it.
    let mut c = p.controller();
    for s in &group.snapshots {
        let got = c.snapshot_by_id(&s.snapshot_id).await.expect("GetSnapshot");
        assert_eq!(got.group_snapshot_id, group.group_snapshot_id);
        expect_code(
            c.remove_snapshot(&s.snapshot_id).await,
            Code::InvalidArgument,
            "a member cannot be deleted alone",
        );
    }
    let mut g = p.group_controller();
    let members: Vec<String> = group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    g.delete_group(&group.group_snapshot_id, &members)
        .await
        .expect("DeleteVolumeGroupSnapshot");
    for v in &vols {
        p.controller()
            .unpublish(unpublish_req(v, &dom.uuid))
            .await
            .expect("unpublish");
    }
    assert_pool_clean(&p.pool_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_of_two_domains_and_an_unattached_one_share_one_point() {
    let a = TestDomain::with_guest_agent("group2a");
    let b = TestDomain::with_guest_agent("group2b");
    let p = controller().await;
    let mut attached = Vec::new();
    for (i, dom) in [&a, &b, &a, &b].iter().enumerate() {
        let v = create(&p, &format!("g2-{i}"), &[]).await;
        p.controller()
            .publish(publish_req(&v, &dom.uuid))
            .await
            .expect("publish");
        attached.push((v, *dom));
    }
    let idle = create(&p, "g2-idle", &[]).await;
    write_pattern(&volume_image(&p.pool_dir(), &idle), 0x5a, 0, BLOCK);

    let seq = Sequence::new(attached.len(), BLOCK);
    let disks = attached
        .iter()
        .map(|(v, d)| d.monitor_disk(&serial_of(v)))
        .collect();
    let writer = MonitorWriter::start(seq, disks);
    writer.wait_for(10).await;
    let mut ids: Vec<&str> = attached.iter().map(|(v, _)| v.as_str()).collect();
    ids.push(&idle);
    let before = writer.done();
    let t = Instant::now();
    let group = p
        .group_controller()
        .create_group(group_snapshot_req("g2", &ids))
        .await
        .expect("CreateVolumeGroupSnapshot");
    let took = t.elapsed();
    // Started by the end of the call: a write lands before its `virsh` returns.
    let after = writer.issued();
    writer.wait_for(after + 8).await;
    writer.stop();
    eprintln!(
        "group of 4 volumes on 2 domains + 1 unattached: {} ms",
        took.as_millis()
    );

    assert_eq!(group.snapshots.len(), 5);
    assert_eq!(
        group_record(&p.pool_dir(), &group.group_snapshot_id)["consistency"],
        "crash"
    );
    let log = p.log();
    assert!(
        log.contains("paused") && log.contains("live snapshot cut"),
        "both domains were paused for the cut:\n{log}"
    );
    assert_eq!(a.state(), "running", "resumed");
    assert_eq!(b.state(), "running", "resumed");

    let sources: Vec<String> = attached.iter().map(|(v, _)| v.clone()).collect();
    let held = writes_in_group(&p, &group, &sources, seq, "g2").await;
    eprintln!("the group holds the first {held} writes ({before}..={after} done before, started by the end of the call)");
    assert!(held >= before && held <= after);
    // The unattached member: its layer frozen offline, its data in the snapshot.
    let idle_member = group
        .snapshots
        .iter()
        .find(|s| s.source_volume_id == idle)
        .unwrap();
    let record = snapshot_record(&p.pool_dir(), &idle_member.snapshot_id);
    assert!(
        record["quiesced"].is_null(),
        "not a live snapshot: {record}"
    );
    let restored = restore(&p, "g2-idle-restored", &idle_member.snapshot_id).await;
    assert_pattern(&volume_image(&p.pool_dir(), &restored), 0x5a, 0, BLOCK);

    p.group_controller()
        .delete_group(&group.group_snapshot_id, &[])
        .await
        .expect("delete");
    for (v, d) in &attached {
        p.controller()
            .unpublish(unpublish_req(v, &d.uuid))
            .await
            .expect("unpublish");
    }
    assert_pool_clean(&p.pool_dir());
}

/// The writer the group tests rely on writes as a guest does: nothing lands while its domain
/// is paused (HMP's `qemu-io` alone would write to a paused domain, and then a group of
/// paused domains would not be one point of its writes), and it goes on once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_writes_nothing_while_its_domain_is_paused() {
    let dom = TestDomain::with_guest_agent("gwpause");
    let p = controller().await;
    let v = create(&p, "gw-0", &[]).await;
    p.controller()
        .publish(publish_req(&v, &dom.uuid))
        .await
        .expect("publish");
    let seq = Sequence::new(1, BLOCK);
    let writer = MonitorWriter::start(seq, vec![dom.monitor_disk(&serial_of(&v))]);
    writer.wait_for(2).await;
    dom.virsh_ok(&["suspend", &dom.name]);
    // At most the write whose check came before the pause lands after it.
    let paused_at = writer.done();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let while_paused = writer.done() - paused_at;
    dom.virsh_ok(&["resume", &dom.name]);
    writer.wait_for(paused_at + 3).await;
    let total = writer.stop();
    eprintln!("writes done while the domain was paused for 500 ms: {while_paused}");
    assert!(
        while_paused <= 1,
        "{while_paused} writes landed while the domain was paused"
    );
    p.controller()
        .unpublish(unpublish_req(&v, &dom.uuid))
        .await
        .expect("unpublish");
    // Detached, so QEMU flushed it: every write the writer counted is in the image.
    assert_eq!(
        seq.written_blocks(&volume_image(&p.pool_dir(), &v), 1024),
        total
    );
}

/// The RPCs' contract, on volumes nobody writes: idempotent by name (volumes in any order),
/// ALREADY_EXISTS for another set, the spec's codes, listing with the group's id, restores
/// that outlive the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshot_contract() {
    let p = controller().await;
    let mut g = p.group_controller();
    assert_eq!(
        g.group_rpc_types().await,
        vec![
            csi::group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot
                as i32
        ]
    );
    let caps = p
        .identity()
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(csi::plugin_capability::Type::Service(s))
            if s.r#type == csi::plugin_capability::service::Type::GroupControllerService as i32
    )));

    let a = create(&p, "c-a", &[]).await;
    let b = create(&p, "c-b", &[]).await;
    let c = create(&p, "c-c", &[]).await;
    let raw = create(&p, "c-raw", &[("format", "raw")]).await;
    write_pattern(&volume_image(&p.pool_dir(), &a), 0xa1, 0, BLOCK);
    write_pattern(&volume_image(&p.pool_dir(), &b), 0xb2, 0, BLOCK);

    let t = Instant::now();
    let group = g
        .create_group(group_snapshot_req("c", &[&a, &b]))
        .await
        .unwrap_or_else(|e| panic!("create: {e:?}\n{}", p.log()));
    eprintln!(
        "group of 2 unattached volumes: {} ms",
        t.elapsed().as_millis()
    );
    assert!(group.ready_to_use);
    assert_eq!(
        group_record(&p.pool_dir(), &group.group_snapshot_id)["consistency"],
        "offline"
    );
    assert_guarantee_reported(&p, &group.group_snapshot_id, "offline", 1.0).await;
    let again = g
        .create_group(group_snapshot_req("c", &[&b, &a]))
        .await
        .expect("the same group again, volumes in another order");
    assert_eq!(again, group);
    // A replay answers the group already made: no second group counted.
    assert_guarantee_reported(&p, &group.group_snapshot_id, "offline", 1.0).await;
    let members: Vec<String> = group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();

    // The spec's codes.
    let cases: Vec<(csi::CreateVolumeGroupSnapshotRequest, Code, &str)> = vec![
        (
            group_snapshot_req("c", &[&a, &c]),
            Code::AlreadyExists,
            "same name, other volumes",
        ),
        (
            csi::CreateVolumeGroupSnapshotRequest {
                parameters: params(&[("x", "y")]),
                ..group_snapshot_req("c", &[&a, &b])
            },
            Code::AlreadyExists,
            "same name, other parameters",
        ),
        (
            group_snapshot_req("", &[&a]),
            Code::InvalidArgument,
            "no name",
        ),
        (
            group_snapshot_req("e", &[]),
            Code::InvalidArgument,
            "no volumes",
        ),
        (
            group_snapshot_req("e", &[&a, &a]),
            Code::InvalidArgument,
            "a volume twice",
        ),
        (
            group_snapshot_req("e", &[&a, "../x"]),
            Code::InvalidArgument,
            "bad id",
        ),
        (
            group_snapshot_req("e", &[&a, "default.0000000000000000"]),
            Code::NotFound,
            "no such volume",
        ),
        (
            group_snapshot_req("e", &[&a, &raw]),
            Code::FailedPrecondition,
            "a raw volume",
        ),
    ];
    for (req, code, what) in cases {
        expect_code(g.create_group(req).await, code, what);
    }
    expect_code(g.group("", &[]).await, Code::InvalidArgument, "no id");
    expect_code(
        g.group("default.g0000000000000000", &[]).await,
        Code::NotFound,
        "unknown group",
    );
    expect_code(
        g.group("not-ours", &[]).await,
        Code::NotFound,
        "an id not of this plugin",
    );
    expect_code(
        g.group(&group.group_snapshot_id, &members[..1]).await,
        Code::InvalidArgument,
        "snapshot list mismatch",
    );
    let got = g
        .group(&group.group_snapshot_id, &members)
        .await
        .expect("get");
    assert_eq!(got, group);
    expect_code(
        g.delete_group(
            &group.group_snapshot_id,
            &["default.s0000000000000000".into()],
        )
        .await,
        Code::InvalidArgument,
        "delete: snapshot list mismatch",
    );
    expect_code(
        g.delete_group("", &[]).await,
        Code::InvalidArgument,
        "no id",
    );
    g.delete_group("not-ours", &[])
        .await
        .expect("an unknown group is deleted already");

    // Listed like any snapshot, with the group's id; restorable.
    let listed = p
        .controller()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let listed: BTreeSet<(String, String)> = listed
        .into_iter()
        .map(|e| e.snapshot.unwrap())
        .map(|s| (s.snapshot_id, s.group_snapshot_id))
        .collect();
    for m in &members {
        assert!(
            listed.contains(&(m.clone(), group.group_snapshot_id.clone())),
            "{m} listed with its group: {listed:?}"
        );
    }
    let member_of_a = group
        .snapshots
        .iter()
        .find(|s| s.source_volume_id == a)
        .unwrap();
    let restored = restore(&p, "c-restored", &member_of_a.snapshot_id).await;
    assert_pattern(&volume_image(&p.pool_dir(), &restored), 0xa1, 0, BLOCK);

    // Deleting the group takes its members; the restore keeps reading its layer.
    g.delete_group(&group.group_snapshot_id, &members)
        .await
        .expect("delete");
    g.delete_group(&group.group_snapshot_id, &members)
        .await
        .expect("delete again");
    expect_code(
        g.group(&group.group_snapshot_id, &[]).await,
        Code::NotFound,
        "deleted",
    );
    for m in &members {
        expect_code(
            p.controller().snapshot_by_id(m).await,
            Code::NotFound,
            "member gone",
        );
    }
    assert_pattern(&volume_image(&p.pool_dir(), &restored), 0xa1, 0, BLOCK);
    // The name is free again.
    let group2 = g
        .create_group(group_snapshot_req("c", &[&a, &c]))
        .await
        .expect("the name can be used again");
    g.delete_group(&group2.group_snapshot_id, &[])
        .await
        .unwrap();
    assert_pool_clean(&p.pool_dir());
}
