//! One controller, two hypervisor hosts: the machine's libvirtd (host `hv-a`) and a second,
//! independent libvirtd in its own mount namespace (host `hv-b`, `second_libvirtd`). Pools:
//! `local-a` (hv-a only), `local-b` (hv-b only), `shared` (both). Real KVM domains (no guest
//! OS) on each host; everything is checked in the domains' XML as each libvirtd reports it,
//! and data through the domains' own QEMU (`qemu-io` over the monitor).
//!
//! Issue 14's race: two controller processes, each configured with both hosts and one shared
//! pool, racing on one name and on one volume (`two_controllers_on_two_hosts_…`).

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use virtdisk_test_support::calls::race_create;
use virtdisk_test_support::failpoint::Hold;
use virtdisk_test_support::metrics::{http_get, metrics_addr, sample};
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::second_libvirtd::SecondLibvirtd;
use virtdisk_test_support::virsh::URI;

const HOST_KEY: &str = "topology.virtdisk.csi.io/host";

/// Two hosts, a controller that knows both, a domain on each.
struct Cluster {
    // Dropped in this order: domains, controller, then the second libvirtd.
    dom_a: TestDomain,
    dom_b: TestDomain,
    p: Plugin,
    b: SecondLibvirtd,
}

impl Cluster {
    async fn start(tag: &str) -> Cluster {
        let t = Instant::now();
        let b = SecondLibvirtd::start();
        eprintln!("second libvirtd up in {} ms at {}", ms(t), b.uri());
        let config = format!(
            r#"
[[pool]]
name = "local-a"
path = "{{dir}}/pools/local-a"
[[pool]]
name = "local-b"
path = "{{dir}}/pools/local-b"
[[pool]]
name = "shared"
path = "{{dir}}/pools/shared"
[[host]]
name = "hv-a"
uri = "{URI}"
pools = ["local-a", "shared"]
[[host]]
name = "hv-b"
uri = "{}"
pools = ["local-b", "shared"]
[libvirt]
detach_timeout_secs = 5
"#,
            b.uri()
        );
        let launch = Plugin::launch("controller").config(&config);
        let launch = launch.args(&["--metrics-addr", "127.0.0.1:0"]);
        let p = launch.readable_by_qemu().start().await;
        let dom_a = TestDomain::start(&format!("{tag}-a"), 4);
        let dom_b = on_b(&b, &format!("{tag}-b"));
        Cluster { dom_a, dom_b, p, b }
    }

    async fn create(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        self.p.controller().create(req).await
    }

    async fn create_in(&self, name: &str, pool: &str) -> String {
        let req = csi::CreateVolumeRequest {
            parameters: params(&[("pool", pool)]),
            ..create_req(name, 64 * MIB)
        };
        self.create(req).await.expect("create").volume_id
    }

    async fn publish(&self, volume: &str, node: &str) -> Result<(), Status> {
        let t = Instant::now();
        let r = self.p.controller().publish(publish_req(volume, node)).await;
        let r = r.map(drop);
        eprintln!("publish {volume} → {node}: {} ms ({r:?})", ms(t));
        r
    }

    async fn unpublish(&self, volume: &str, node: &str) -> Result<(), Status> {
        let t = Instant::now();
        let r = self
            .p
            .controller()
            .unpublish(unpublish_req(volume, node))
            .await;
        eprintln!("unpublish {volume} ← {node}: {} ms ({r:?})", ms(t));
        r
    }

    async fn published_nodes(&self, volume: &str) -> Vec<String> {
        self.p.controller().published_nodes(volume).await
    }

    /// ListVolumes: (published nodes, condition) of every volume.
    async fn listing(&self) -> BTreeMap<String, (Vec<String>, csi::VolumeCondition)> {
        self.p
            .controller()
            .all_volumes()
            .await
            .into_iter()
            .map(|e| {
                let status = e.status.unwrap();
                (
                    e.volume.unwrap().volume_id,
                    (status.published_node_ids, status.volume_condition.unwrap()),
                )
            })
            .collect()
    }
}

fn on(host: &str) -> csi::Topology {
    csi::Topology {
        segments: [(HOST_KEY.to_string(), host.to_string())].into(),
    }
}

fn hosts_of(v: &csi::Volume) -> Vec<String> {
    v.accessible_topology
        .iter()
        .map(|t| t.segments[HOST_KEY].clone())
        .collect()
}

/// A domain on the second host.
fn on_b(b: &SecondLibvirtd, tag: &str) -> TestDomain {
    TestDomain::builder(tag).on(b.uri()).root_ports(5).start()
}

/// `qemu-io` inside the domain's QEMU, on the volume's disk (HMP); what it printed (QEMU
/// prints it on its stdout: the domain's log on whichever host runs it).
fn qemu_io(c: &Cluster, dom: &TestDomain, serial: &str, command: &str) -> String {
    let log = if dom.uri == URI {
        std::path::PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", dom.name))
    } else {
        c.b.domain_log(&dom.name)
    };
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    dom.qemu_io(serial, command);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let new = text.get(before..).unwrap_or_default();
        if new.contains(" ops;") {
            return new.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no qemu-io output in {}: {new}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_places_volumes_and_publishes_reach_either_host() {
    let c = Cluster::start("topo").await;
    let caps =
        c.p.identity()
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    use csi::plugin_capability::{service::Type, Type as Cap};
    assert!(
        caps.capabilities.iter().any(|cap| matches!(
            &cap.r#type,
            Some(Cap::Service(s)) if s.r#type == Type::VolumeAccessibilityConstraints as i32
        )),
        "{caps:?}"
    );

    // Requisite hv-b: a pool hv-b reaches, reported accessible from hv-b only.
    let mut req = create_req("mh-topo-b", 64 * MIB);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![on("hv-b")],
        preferred: vec![on("hv-b")],
    });
    let vb = c.create(req).await.expect("create on hv-b");
    assert!(vb.volume_id.starts_with("local-b."), "{}", vb.volume_id);
    assert_eq!(hosts_of(&vb), ["hv-b"]);
    // Either host, hv-a preferred: hv-a's local pool.
    let mut req = create_req("mh-topo-a", 64 * MIB);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![on("hv-a"), on("hv-b")],
        preferred: vec![on("hv-a")],
    });
    let va = c.create(req).await.expect("create on hv-a");
    assert!(va.volume_id.starts_with("local-a."), "{}", va.volume_id);
    assert_eq!(hosts_of(&va), ["hv-a"]);
    // The shared pool is accessible from both.
    let mut req = create_req("mh-topo-s", 64 * MIB);
    req.parameters = params(&[("pool", "shared")]);
    let vs = c.create(req).await.expect("create shared");
    assert_eq!(hosts_of(&vs), ["hv-a", "hv-b"]);
    // Nothing is accessible from an unknown host; the shared pool from hv-b only with
    // requisite hv-b and pool=shared.
    let mut req = create_req("mh-topo-none", 64 * MIB);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![on("hv-c")],
        preferred: vec![],
    });
    let err = c.create(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let mut req = create_req("mh-topo-local-a-on-b", 64 * MIB);
    req.parameters = params(&[("pool", "local-a")]);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![on("hv-b")],
        preferred: vec![],
    });
    let err = c.create(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // GetCapacity per topology.
    for (host, some) in [("hv-a", true), ("hv-b", true), ("hv-c", false)] {
        let cap =
            c.p.controller()
                .get_capacity(csi::GetCapacityRequest {
                    accessible_topology: Some(on(host)),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .available_capacity;
        assert_eq!(cap > 0, some, "{host}: {cap}");
    }

    // Publish to a VM on either host: the disk lands in that host's domain.
    let (a, b) = (&c.dom_a, &c.dom_b);
    c.publish(&va.volume_id, &a.uuid)
        .await
        .expect("local-a → A");
    c.publish(&vb.volume_id, &b.uuid)
        .await
        .expect("local-b → B");
    assert!(a.live_disk(&serial_of(&va.volume_id)).is_some());
    assert!(b.live_disk(&serial_of(&vb.volume_id)).is_some());
    assert!(b.live_disk(&serial_of(&va.volume_id)).is_none());
    // By domain name too.
    c.publish(&vb.volume_id, &b.name)
        .await
        .expect("idempotent by name");

    // A local volume of hv-a to a VM on hv-b: refused, naming both hosts; nothing attached.
    let va2 = c.create_in("mh-topo-a2", "local-a").await;
    let err = c.publish(&va2, &b.uuid).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("hv-a") && err.message().contains("hv-b"),
        "{}",
        err.message()
    );
    assert!(b.live_disk(&serial_of(&va2)).is_none());
    let vb2 = c.create_in("mh-topo-b2", "local-b").await;
    let err = c.publish(&vb2, &a.uuid).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(a.live_disk(&serial_of(&vb2)).is_none());

    // A shared volume goes to either: A, then (after unpublish) B.
    c.publish(&vs.volume_id, &a.uuid).await.expect("shared → A");
    assert_eq!(c.published_nodes(&vs.volume_id).await, vec![a.uuid.clone()]);
    c.unpublish(&vs.volume_id, &a.uuid).await.unwrap();
    c.publish(&vs.volume_id, &b.uuid).await.expect("shared → B");
    assert!(b.live_disk(&serial_of(&vs.volume_id)).is_some());
    assert!(a.live_disk(&serial_of(&vs.volume_id)).is_none());

    // ListVolumes sees both hosts' attachments.
    let listing = c.listing().await;
    assert_eq!(listing[&va.volume_id].0, vec![a.uuid.clone()]);
    assert_eq!(listing[&vb.volume_id].0, vec![b.uuid.clone()]);
    assert_eq!(listing[&vs.volume_id].0, vec![b.uuid.clone()]);
    assert!(listing.values().all(|(_, cond)| !cond.abnormal));

    for (v, n) in [
        (&va.volume_id, &a.uuid),
        (&vb.volume_id, &b.uuid),
        (&vs.volume_id, &b.uuid),
    ] {
        c.unpublish(v, n).await.unwrap();
    }

    // doctor with the same config checks each host, by name.
    let config = c.p.dir.path().join("config.toml");
    let out = std::process::Command::new(virtdisk_test_support::plugin::bin())
        .args(["doctor", "--mode", "controller", "-o", "json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ok = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == name && c["status"] == "OK")
    };
    for check in [
        "libvirt (hv-a)",
        "libvirt (hv-b)",
        "domains (hv-b)",
        "domain UUIDs",
    ] {
        assert!(ok(check), "no OK check {check:?}: {report:#}");
    }
    assert!(b.live_disk(&serial_of(&vb.volume_id)).is_none());
    assert!(b.inactive_disk(&serial_of(&vb.volume_id)).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_keeps_the_volume_and_every_later_rpc_follows_the_domain() {
    let c = Cluster::start("mig").await;
    let mut dom = on_b(&c.b, "mig-vm");
    let vol = c.create_in("mh-mig", "shared").await;
    let serial = serial_of(&vol);
    c.publish(&vol, &dom.uuid).await.expect("publish on hv-b");
    let wrote = qemu_io(&c, &dom, &serial, "write -P 0xab 0 1M");
    assert!(wrote.contains("wrote 1048576"), "{wrote}");

    // hv-b → hv-a: the disk moves with the domain; the data reads back through its new QEMU.
    let took = dom.migrate_live(URI);
    eprintln!("live migration hv-b → hv-a: {} ms", took.as_millis());
    assert!(
        dom.live_disk(&serial).is_some(),
        "disk attached after migration"
    );
    let read = qemu_io(&c, &dom, &serial, "read -P 0xab 0 1M");
    assert!(
        read.contains("read 1048576") && !read.contains("Pattern verification failed"),
        "{read}"
    );
    // hv-b keeps the shut-off definition (with the disk in it); the node is the running copy.
    assert!(dom.inactive_xml_at(c.b.uri()).contains(&serial));
    assert_eq!(c.published_nodes(&vol).await, vec![dom.uuid.clone()]);
    assert_eq!(c.listing().await[&vol].0, vec![dom.uuid.clone()]);

    // Expand: the running domain on hv-a sees the new size.
    c.p.controller()
        .expand(expand_req(&vol, 96 * MIB))
        .await
        .expect("expand after migration");
    let target = dom.live_disk(&serial).unwrap().target;
    assert_eq!(dom.capacity(&target), 96 << 20);
    // QoS change: applied to the live disk on hv-a.
    c.p.controller()
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: vol.clone(),
            mutable_parameters: params(&[("totalIopsSec", "500")]),
            ..Default::default()
        })
        .await
        .expect("modify after migration");
    assert_eq!(
        dom.live_disk(&serial).unwrap().iotune.total_iops_sec,
        Some(500)
    );
    // Live snapshot: the domain on hv-a switches to a new overlay.
    let before = dom.live_disk(&serial).unwrap().source.unwrap();
    c.p.controller()
        .snapshot(snapshot_req("mh-mig-snap", &vol))
        .await
        .expect("live snapshot after migration");
    let after = dom.live_disk(&serial).unwrap().source.unwrap();
    assert_ne!(before, after, "the disk continues in the new overlay");
    let read = qemu_io(&c, &dom, &serial, "read -P 0xab 0 1M");
    assert!(!read.contains("Pattern verification failed"), "{read}");

    // And back hv-a → hv-b, then unpublish finds it there and cleans every definition.
    let took = dom.migrate_live(c.b.uri());
    eprintln!("live migration hv-a → hv-b: {} ms", took.as_millis());
    let read = qemu_io(&c, &dom, &serial, "read -P 0xab 0 1M");
    assert!(!read.contains("Pattern verification failed"), "{read}");
    c.unpublish(&vol, &dom.uuid)
        .await
        .expect("unpublish on hv-b");
    assert!(dom.live_disk(&serial).is_none(), "gone from the live XML");
    assert!(
        dom.inactive_disk(&serial).is_none(),
        "gone from the definition"
    );
    assert!(c.published_nodes(&vol).await.is_empty());
}

/// A group snapshot of volumes attached to a domain on each host (and in a pool of each
/// host): both domains are paused together while each is cut in one operation, so a writer
/// alternating across the volumes of both shows one point in every restored member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_across_two_hosts_is_one_point_of_its_writes() {
    use virtdisk_test_support::pool::{group_record, volume_image};
    use virtdisk_test_support::sequence::{MonitorWriter, Sequence};
    let c = Cluster::start("grp").await;
    let mut vols = Vec::new();
    for (i, (pool, dom)) in [("local-a", &c.dom_a), ("local-b", &c.dom_b)]
        .iter()
        .cycle()
        .take(4)
        .enumerate()
    {
        let v = c.create_in(&format!("mh-grp-{i}"), pool).await;
        c.publish(&v, &dom.uuid).await.expect("publish");
        vols.push((v, *dom, *pool));
    }
    let seq = Sequence::new(vols.len(), 4096);
    let disks = vols
        .iter()
        .map(|(v, d, _)| d.monitor_disk(&serial_of(v)))
        .collect();
    let writer = MonitorWriter::start(seq, disks);
    writer.wait_for(8).await;
    let ids: Vec<&str> = vols.iter().map(|(v, _, _)| v.as_str()).collect();
    let (before, t) = (writer.done(), Instant::now());
    let group =
        c.p.group_controller()
            .create_group(group_snapshot_req("mh-grp", &ids))
            .await
            .expect("group snapshot across hosts");
    // Started by the end of the call: a write lands before its `virsh` returns.
    let after = writer.issued();
    eprintln!("group of 4 volumes on two hosts: {} ms", ms(t));
    writer.wait_for(after + 4).await;
    writer.stop();
    assert_eq!(c.dom_a.state(), "running");
    assert_eq!(c.dom_b.state(), "running");
    let pool_dir = |pool: &str| c.p.dir.path().join("pools").join(pool);
    assert_eq!(
        group_record(&pool_dir("local-a"), &group.group_snapshot_id)["consistency"],
        "crash"
    );
    let mut counts = Vec::new();
    for (i, (v, _, pool)) in vols.iter().enumerate() {
        let member = group
            .snapshots
            .iter()
            .find(|s| s.source_volume_id == *v)
            .expect("a member per volume");
        assert!(member.snapshot_id.starts_with(pool), "{member:?} in {pool}");
        let req = create_from_req(
            &format!("mh-grp-r{i}"),
            0,
            from_snapshot(&member.snapshot_id),
        );
        let restored = c.create(req).await.expect("restore").volume_id;
        counts.push(seq.written_blocks(&volume_image(&pool_dir(pool), &restored), 16384));
    }
    let held = seq
        .prefix(&counts)
        .unwrap_or_else(|e| panic!("not one point across the hosts: {e}"));
    eprintln!("the group holds the first {held} writes ({before}..={after}: done before, started by the end of the call)");
    assert!(held >= before && held <= after);
    for (v, d, _) in &vols {
        c.unpublish(v, &d.uuid).await.expect("unpublish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_libvirtd_stops_fails_only_its_own_operations() {
    let c = Cluster::start("down").await;
    let (a, b) = (&c.dom_a, &c.dom_b);
    let va = c.create_in("mh-down-a", "local-a").await;
    let va2 = c.create_in("mh-down-a2", "local-a").await;
    let vb = c.create_in("mh-down-b", "local-b").await;
    let vb2 = c.create_in("mh-down-b2", "local-b").await;
    c.publish(&va, &a.uuid).await.unwrap();
    c.publish(&vb, &b.uuid).await.unwrap();

    c.b.stop_daemon();
    // hv-a keeps serving: publish, unpublish, listing, readiness.
    c.publish(&va2, &a.uuid).await.expect("hv-a serves");
    c.unpublish(&va2, &a.uuid).await.expect("hv-a serves");
    assert_eq!(c.published_nodes(&va).await, vec![a.uuid.clone()]);
    let listing = c.listing().await;
    assert_eq!(listing[&va].0, vec![a.uuid.clone()]);
    assert!(!listing[&va].1.abnormal);
    let (_, cond) = &listing[&vb];
    assert!(cond.abnormal && cond.message.contains("hv-b"), "{cond:?}");
    c.p.identity()
        .probe(csi::ProbeRequest {})
        .await
        .expect("ready while one host answers");
    // Metrics by host: hv-b is down, hv-a up and attaching.
    let (_, body) = http_get(&metrics_addr(&c.p).await, "/metrics");
    assert_eq!(
        sample(&body, "virtdisk_csi_host_up{host=\"hv-a\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "virtdisk_csi_host_up{host=\"hv-b\"}"),
        Some(0.0)
    );
    assert!(
        sample(
            &body,
            "virtdisk_csi_attach_duration_seconds_count{host=\"hv-a\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{body}"
    );
    // hv-b's nodes: UNAVAILABLE, naming the host.
    for (what, r) in [
        ("publish", c.publish(&vb2, &b.uuid).await),
        ("unpublish", c.unpublish(&vb, &b.uuid).await),
    ] {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{what}: {e:?}");
        assert!(e.message().contains("hv-b"), "{what}: {}", e.message());
    }
    // ControllerGetVolume answers what hv-b's attach ledger says, flagged unconfirmed.
    let got = c.p.controller().volume(&vb).await.expect("get volume");
    let status = got.status.unwrap();
    assert_eq!(status.published_node_ids, vec![b.uuid.clone()]);
    let cond = status.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("hv-b"), "{cond:?}");
    // A volume of hv-b's pool that its ledger never saw attached can still be deleted.
    c.p.controller().delete(&vb2).await.expect("delete vb2");

    // hv-b back: its connection reopens by itself, and its node is served again.
    c.b.start_daemon();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.unpublish(&vb, &b.uuid).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline && e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("unpublish after hv-b came back: {e:?}"),
        }
    }
    assert!(b.live_disk(&serial_of(&vb)).is_none());
    c.unpublish(&va, &a.uuid).await.unwrap();
}

/// Two controller processes (as Nomad runs two controller instances), each with both hosts
/// and the one pool they share; a domain on each host.
struct TwoControllers {
    dom_a: TestDomain,
    dom_b: TestDomain,
    pa: Plugin,
    pb: Plugin,
    b: SecondLibvirtd,
    /// Holds the shared pool.
    dir: tempfile::TempDir,
}

impl TwoControllers {
    async fn start(tag: &str) -> TwoControllers {
        let b = SecondLibvirtd::start();
        let dir = tempfile::tempdir().unwrap();
        open_for_qemu(dir.path());
        let config = format!(
            r#"
[[pool]]
name = "shared"
path = "{}/shared"
[[host]]
name = "hv-a"
uri = "{URI}"
pools = ["shared"]
[[host]]
name = "hv-b"
uri = "{}"
pools = ["shared"]
[libvirt]
detach_timeout_secs = 5
"#,
            dir.path().display(),
            b.uri()
        );
        let launch = Plugin::launch("controller").config(&config);
        let pa = launch.clone().readable_by_qemu().start().await;
        let pb = launch.readable_by_qemu().start().await;
        let dom_a = TestDomain::start(&format!("{tag}-a"), 4);
        let dom_b = on_b(&b, &format!("{tag}-b"));
        TwoControllers {
            dom_a,
            dom_b,
            pa,
            pb,
            b,
            dir,
        }
    }

    /// Restarts process A with its attach held after libvirt attached until `hold` (a hold of
    /// `libvirt.attached`) is released, starts a publish of `volume` to A's VM through it, and
    /// returns once that publish pauses (the `nth` pause of A's log).
    async fn paused_publish_by_a(
        &mut self,
        volume: &str,
        hold: &Hold,
        nth: usize,
    ) -> tokio::task::JoinHandle<
        Result<tonic::Response<csi::ControllerPublishVolumeResponse>, Status>,
    > {
        self.pa.restart_with_env(&hold.env()).await;
        let ch = self.pa.channel.clone();
        let req = publish_req(volume, &self.dom_a.uuid);
        let call = tokio::spawn(async move {
            csi::controller_client::ControllerClient::new(ch)
                .controller_publish_volume(req)
                .await
        });
        self.pa.wait_paused("libvirt.attached", nth).await;
        call
    }

    /// Where the volume's disk is, as the two libvirtds report their domains' live XML.
    fn holders(&self, volume: &str) -> Vec<&str> {
        let serial = serial_of(volume);
        [(&self.dom_a, "A"), (&self.dom_b, "B")]
            .into_iter()
            .filter(|(d, _)| d.live_disk(&serial).is_some())
            .map(|(_, n)| n)
            .collect()
    }
}

fn code_of_result<T>(r: &Result<T, Status>) -> Code {
    r.as_ref().err().map_or(Code::Ok, |s| s.code())
}

/// Issue 14: two controller processes, both hosts, one shared pool. One name makes one
/// volume; one single-node volume published at once to VMs on different hosts, through
/// different processes, lands in exactly one VM (the other call answers FAILED_PRECONDITION
/// or ABORTED); a process killed while it holds the volume frees it; with a host down, each
/// process knows from the pool's attach ledger what the other attached there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_controllers_on_two_hosts_race_on_one_name_and_one_volume() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let mut c = TwoControllers::start("race2").await;

    // One name from both processes at once: one volume.
    let again = csi::CreateVolumeRequest {
        parameters: params(&[("pool", "shared"), ("bus", "scsi")]),
        ..create_req("mh-race", 64 * MIB)
    };
    let ids = race_create(&[&c.pa, &c.pb], 8, again.clone()).await;
    assert!(ids.len() <= 1, "several volumes for one name: {ids:?}");
    let vol =
        c.pa.controller()
            .create(again.clone())
            .await
            .unwrap()
            .volume_id;
    assert_eq!(
        c.pb.controller().create(again).await.unwrap().volume_id,
        vol
    );
    assert!(ids.is_empty() || ids.contains(&vol));
    let records = std::fs::read_dir(c.dir.path().join("shared/volumes"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count();
    assert_eq!(records, 1, "one record in the shared pool");

    // One single-node volume to a VM on each host, through each process, at once; several
    // rounds, the winner unpublished between them.
    for round in 0..4 {
        let (first, second) = if round % 2 == 0 {
            (&c.pa, &c.pb)
        } else {
            (&c.pb, &c.pa)
        };
        let (mut ca, mut cb) = (first.controller(), second.controller());
        let to_a = ca.publish(publish_req(&vol, &c.dom_a.uuid));
        let to_b = cb.publish(publish_req(&vol, &c.dom_b.uuid));
        let (ra, rb) = tokio::join!(to_a, to_b);
        let codes = [code_of_result(&ra), code_of_result(&rb)];
        eprintln!(
            "round {round}: publish to A {:?}, to B {:?}",
            codes[0], codes[1]
        );
        let ok = codes.iter().filter(|c| **c == Code::Ok).count();
        assert_eq!(ok, 1, "round {round}: {ra:?} / {rb:?}");
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, Code::Ok | Code::FailedPrecondition | Code::Aborted)),
            "round {round}: {ra:?} / {rb:?}"
        );
        let winner = if ra.is_ok() { "A" } else { "B" };
        assert_eq!(c.holders(&vol), [winner], "round {round}: the live XML");
        let node = if ra.is_ok() {
            &c.dom_a.uuid
        } else {
            &c.dom_b.uuid
        };
        c.pb.controller()
            .unpublish(unpublish_req(&vol, node))
            .await
            .expect("unpublish the winner");
        assert!(c.holders(&vol).is_empty());
    }

    // Process A holds the volume (its attach to A paused): B's publish to B is refused while
    // it runs, and B sees A's attachment once it is done.
    let hold = Hold::new("libvirt.attached");
    let first = c.paused_publish_by_a(&vol, &hold, 1).await;
    let refused =
        c.pb.controller()
            .publish(publish_req(&vol, &c.dom_b.uuid))
            .await;
    expect_code(refused, Code::Aborted, "publish to B while A attaches");
    hold.release();
    first.await.unwrap().expect("publish to A");
    let refused =
        c.pb.controller()
            .publish(publish_req(&vol, &c.dom_b.uuid))
            .await;
    expect_code(refused, Code::FailedPrecondition, "publish to B while on A");
    assert_eq!(c.holders(&vol), ["A"]);
    c.pb.controller()
        .unpublish(unpublish_req(&vol, &c.dom_a.uuid))
        .await
        .expect("unpublish from A through B");

    // Process A is killed while it holds the volume (paused after attaching): its lock goes
    // with it, so B decides at once, from the live XML.
    let hold = Hold::new("libvirt.attached");
    let doomed = c.paused_publish_by_a(&vol, &hold, 2).await;
    c.pa.kill();
    assert!(doomed.await.unwrap().is_err());
    let t = Instant::now();
    let refused =
        c.pb.controller()
            .publish(publish_req(&vol, &c.dom_b.uuid))
            .await;
    expect_code(
        refused,
        Code::FailedPrecondition,
        "publish to B, A's disk attached",
    );
    c.pb.controller()
        .unpublish(unpublish_req(&vol, &c.dom_a.uuid))
        .await
        .expect("B removes what the killed process attached");
    c.pb.controller()
        .publish(publish_req(&vol, &c.dom_b.uuid))
        .await
        .expect("then B publishes to B");
    eprintln!("after the kill, B took the volume over in {} ms", ms(t));
    assert_eq!(c.holders(&vol), ["B"]);
    c.pb.controller()
        .unpublish(unpublish_req(&vol, &c.dom_b.uuid))
        .await
        .unwrap();
    c.pa.restart().await;

    // The attach ledger is the pool's: with hv-b's libvirtd down, B knows what A attached
    // there (after B's last read of hv-b), so B refuses to decide about that volume instead
    // of deleting it or attaching it a second time.
    let other = csi::CreateVolumeRequest {
        parameters: params(&[("pool", "shared"), ("bus", "scsi")]),
        ..create_req("mh-race-free", 64 * MIB)
    };
    let free = c.pb.controller().create(other).await.unwrap().volume_id;
    assert!(c.pb.controller().published_nodes(&vol).await.is_empty());
    c.pa.controller()
        .publish(publish_req(&vol, &c.dom_b.uuid))
        .await
        .expect("A publishes to B");
    c.b.stop_daemon();
    let delete = c.pb.controller().delete(&vol).await;
    expect_code(
        delete,
        Code::Unavailable,
        "B deletes what A attached on hv-b",
    );
    let publish =
        c.pb.controller()
            .publish(publish_req(&vol, &c.dom_a.uuid))
            .await;
    expect_code(
        publish,
        Code::Unavailable,
        "B publishes to A what A attached on hv-b",
    );
    let got =
        c.pb.controller()
            .volume(&vol)
            .await
            .expect("B's ControllerGetVolume");
    let status = got.status.unwrap();
    assert_eq!(status.published_node_ids, [c.dom_b.uuid.clone()]);
    assert!(status.volume_condition.unwrap().abnormal);
    // A volume the ledger places nowhere is still decided.
    c.pb.controller()
        .publish(publish_req(&free, &c.dom_a.uuid))
        .await
        .expect("a volume on no host of the pool");
    c.b.start_daemon();
    assert_eq!(c.holders(&vol), ["B"], "the disk stayed where A put it");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r =
            c.pb.controller()
                .unpublish(unpublish_req(&vol, &c.dom_b.uuid))
                .await;
        match r {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline && e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("unpublish after hv-b came back: {e:?}"),
        }
    }
    c.pb.controller()
        .unpublish(unpublish_req(&free, &c.dom_a.uuid))
        .await
        .unwrap();
    c.pa.controller()
        .delete(&vol)
        .await
        .expect("delete through the restarted A");
}
