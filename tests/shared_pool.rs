//! Two controller processes on one pool, as Nomad runs controller instances on a shared pool:
//! locks live in the pool, so one name makes one volume, one volume sees one operation at a
//! time (the other process's attempt answers ABORTED), each process sees the other's writes
//! before it answers, and a process killed while holding a lock frees it.
//!
//! To hold a lock for certain while the other process tries it, a failpoint is armed in
//! pause mode (`VIRTDISK_FAILPOINT_PAUSE_MS`): the operation stops for a while at that step,
//! holding what it holds there.

use std::path::{Path, PathBuf};
use std::time::Duration;
use virtdisk_csi::failpoint::{ENV, PAUSE_ENV};
use virtdisk_test_support::calls::*;
use virtdisk_test_support::failpoint::Hold;
use virtdisk_test_support::pool::{
    assert_index_matches_pool, assert_pool_clean, snapshot_record, volume_image,
    wait_pool_flattening_settled, PoolView,
};
use virtdisk_test_support::prelude::*;

const M: u64 = 1 << 20;

fn config(pool: &Path) -> String {
    format!(
        "[libvirt]\nenabled = false\n\n[[pool]]\nname = \"default\"\npath = \"{}\"\n",
        pool.display()
    )
}

/// Two controller processes on the pool at `pool`.
async fn two(pool: &Path) -> (Plugin, Plugin) {
    let cfg = config(pool);
    let a = Plugin::start_with_config("controller", &cfg, &[]).await;
    let b = Plugin::start_with_config("controller", &cfg, &[]).await;
    (a, b)
}

fn code<T>(r: &Result<T, tonic::Status>) -> Code {
    r.as_ref().err().map_or(Code::Ok, |s| s.code())
}

fn names_on_disk(pool: &Path, name: &str) -> usize {
    PoolView::read(pool)
        .volumes
        .iter()
        .filter(|v| v["name"] == name)
        .count()
}

/// Both processes answer what the pool holds, and the pool is clean.
async fn assert_agree(a: &Plugin, b: &Plugin, pool: &Path) {
    // At rest: both processes' flatteners have finished what the calls left them.
    wait_pool_flattening_settled(pool, virtdisk_csi::pool::DEFAULT_MAX_CHAIN_DEPTH).await;
    assert_index_matches_pool(a, pool).await;
    assert_index_matches_pool(b, pool).await;
    assert_pool_clean(pool);
}

fn shared_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    (dir, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_creating_one_name_make_one_volume() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let (_dir, pool) = shared_dir();
    let (mut a, b) = two(&pool).await;

    // Free-for-all: both processes, many clients each, several names.
    for round in 0..6 {
        let name = format!("race-{round}");
        let ids = race_create(&[&a, &b], 12, create_req(&name, 16 * MIB)).await;
        assert!(ids.len() <= 1, "{name}: several ids answered: {ids:?}");
        // Whoever lost retries and gets the same volume, from either process.
        let from_a = create_volume(&a, &name, 16 * MIB, &[]).await.unwrap();
        let from_b = create_volume(&b, &name, 16 * MIB, &[]).await.unwrap();
        assert_eq!(from_a, from_b);
        assert!(ids.is_empty() || ids.contains(&from_a));
        assert_eq!(names_on_disk(&pool, &name), 1, "{name}");
    }

    // A holds the name (paused after writing the image): B is refused, then gets A's volume.
    let hold = Hold::new("create.image-made");
    a.restart_with_env(&hold.env()).await;
    let ch = a.channel.clone();
    let first = tokio::spawn(async move {
        csi::controller_client::ControllerClient::new(ch)
            .create_volume(create_req("held", 16 * MIB))
            .await
            .map(|r| r.into_inner().volume.unwrap().volume_id)
    });
    a.wait_paused("create.image-made", 1).await;
    let refused = create_volume(&b, "held", 16 * MIB, &[]).await;
    assert_eq!(code(&refused), Code::Aborted, "{refused:?}");
    hold.release();
    let id = first.await.unwrap().unwrap();
    assert_eq!(create_volume(&b, "held", 16 * MIB, &[]).await.unwrap(), id);
    assert!(list_volumes(&b).await.contains_key(&id));

    // A is killed while holding the name: the lock goes with it, B makes the volume, and A's
    // half-made image is collected when A starts again.
    a.restart_with_env(&[(ENV, "create.image-made"), (PAUSE_ENV, "20000")])
        .await;
    let ch = a.channel.clone();
    let doomed = tokio::spawn(async move {
        csi::controller_client::ControllerClient::new(ch)
            .create_volume(create_req("orphaned", 16 * MIB))
            .await
    });
    a.wait_paused("create.image-made", 2).await;
    a.kill();
    assert!(doomed.await.unwrap().is_err());
    let id = create_volume(&b, "orphaned", 16 * MIB, &[]).await.unwrap();
    a.restart().await;
    assert_eq!(
        create_volume(&a, "orphaned", 16 * MIB, &[]).await.unwrap(),
        id
    );
    assert_eq!(names_on_disk(&pool, "orphaned"), 1);
    assert_agree(&a, &b, &pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_volume_take_turns_and_never_corrupt_it() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let (_dir, pool) = shared_dir();
    let (mut a, b) = two(&pool).await;
    let vol = create_volume(&b, "shared", 16 * MIB, &[]).await.unwrap();
    write_pattern(&volume_image(&pool, &vol), 0x11, 0, M);

    // A holds the volume (a snapshot paused after making its overlay): everything B tries on
    // the volume is refused, then works once A is done, on A's result.
    let hold = Hold::new("freeze.overlay-made");
    a.restart_with_env(&hold.env()).await;
    let ch = a.channel.clone();
    let v = vol.clone();
    let first = tokio::spawn(async move {
        csi::controller_client::ControllerClient::new(ch)
            .create_snapshot(csi::CreateSnapshotRequest {
                name: "from-a".into(),
                source_volume_id: v,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap().snapshot_id)
    });
    a.wait_paused("freeze.overlay-made", 1).await;
    assert_eq!(code(&snapshot(&b, "from-b", &vol).await), Code::Aborted);
    assert_eq!(code(&expand(&b, &vol, 32 * MIB).await), Code::Aborted);
    assert_eq!(code(&delete_volume(&b, &vol).await), Code::Aborted);
    assert_eq!(
        code(&create_from(&b, "clone-b", from_volume(&vol)).await),
        Code::Aborted
    );
    hold.release();
    let snap_a = first.await.unwrap().unwrap();
    a.restart().await;
    write_pattern(&volume_image(&pool, &vol), 0x22, 0, M);
    let snap_b = snapshot(&b, "from-b", &vol).await.unwrap();
    assert_eq!(expand(&b, &vol, 32 * MIB).await.unwrap(), 32 * MIB);
    assert!(list_snapshots(&a).await.contains(&snap_b));
    assert_eq!(list_volumes(&a).await.get(&vol), Some(&(32 * MIB)));

    // Both processes at once on the one volume: each call is done whole or refused.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..24 {
        let ch = if i % 2 == 0 {
            a.channel.clone()
        } else {
            b.channel.clone()
        };
        let vol = vol.clone();
        calls.spawn(async move {
            let mut c = csi::controller_client::ControllerClient::new(ch);
            let r = match i % 3 {
                0 => c
                    .create_snapshot(csi::CreateSnapshotRequest {
                        name: format!("storm-{i}"),
                        source_volume_id: vol,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                1 => c
                    .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                        volume_id: vol,
                        capacity_range: Some(csi::CapacityRange {
                            required_bytes: (32 + i) * MIB,
                            limit_bytes: 0,
                        }),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                _ => c
                    .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vol })
                    .await
                    .map(drop),
            };
            (i, r)
        });
    }
    while let Some(r) = calls.join_next().await {
        let (i, r) = r.unwrap();
        assert!(
            matches!(code(&r), Code::Ok | Code::Aborted),
            "call {i}: {r:?}"
        );
    }
    assert_agree(&a, &b, &pool).await;
    // The data of each point in time is intact.
    let r_a = create_from(&a, "check-a", from_snapshot(&snap_a))
        .await
        .unwrap();
    let r_b = create_from(&b, "check-b", from_snapshot(&snap_b))
        .await
        .unwrap();
    assert_pattern(&volume_image(&pool, &r_a), 0x11, 0, M);
    assert_pattern(&volume_image(&pool, &r_b), 0x22, 0, M);
    assert_pattern(&volume_image(&pool, &vol), 0x22, 0, M);

    // A is killed while holding the volume: B can work on it at once; A's leftovers are
    // collected when it starts again.
    a.restart_with_env(&[(ENV, "freeze.overlay-made")]).await;
    let killed = snapshot(&a, "from-a-2", &vol).await;
    assert!(killed.is_err());
    assert!(a.wait_exit(Duration::from_secs(30)).await.is_some());
    let snap = snapshot(&b, "from-b-2", &vol).await.unwrap();
    a.restart().await;
    assert!(list_snapshots(&a).await.contains(&snap));
    assert_agree(&a, &b, &pool).await;
}

fn groups_on_disk(pool: &Path, name: &str) -> Vec<serde_json::Value> {
    let view = PoolView::read(pool);
    view.groups
        .into_iter()
        .filter(|g| g["name"] == name)
        .collect()
}

/// CreateVolumeGroupSnapshot through a channel → the group snapshot id.
async fn create_group_on(
    ch: tonic::transport::Channel,
    name: &str,
    sources: &[&str],
) -> Result<String, tonic::Status> {
    let req = group_snapshot_req(name, sources);
    csi::group_controller_client::GroupControllerClient::new(ch)
        .create_volume_group_snapshot(req)
        .await
        .map(|r| r.into_inner().group_snapshot.unwrap().group_snapshot_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_make_one_group_per_name_and_see_each_others_groups() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
        return;
    }
    let (_dir, pool) = shared_dir();
    let (mut a, b) = two(&pool).await;
    let x = create_volume(&a, "gx", 16 * MIB, &[]).await.unwrap();
    let y = create_volume(&b, "gy", 16 * MIB, &[]).await.unwrap();
    write_pattern(&volume_image(&pool, &x), 0x31, 0, M);
    write_pattern(&volume_image(&pool, &y), 0x32, 0, M);

    // Free-for-all on one name from both processes: one group, whoever answers.
    for round in 0..3 {
        let name = format!("group-race-{round}");
        let ids = race_group(&[&a, &b], 8, group_snapshot_req(&name, &[&x, &y])).await;
        assert!(ids.len() <= 1, "{name}: several ids answered: {ids:?}");
        let from_a = group_snapshot(&a, &name, &[&y, &x]).await.unwrap();
        let from_b = group_snapshot(&b, &name, &[&x, &y]).await.unwrap();
        assert_eq!(from_a, from_b);
        assert!(ids.is_empty() || ids.contains(&from_a));
        assert_eq!(groups_on_disk(&pool, &name).len(), 1, "{name}");
        assert_eq!(
            group_members(&a, &from_a).await.unwrap(),
            group_members(&b, &from_a).await.unwrap()
        );
    }

    // A holds a group being cut (paused with its members recorded, the group not yet Ready):
    // B is refused the name and both volumes, and sees no member yet; then B sees A's group.
    let hold = Hold::new("group.members-recorded");
    a.restart_with_env(&hold.env()).await;
    let (ch, xs, ys) = (a.channel.clone(), x.clone(), y.clone());
    let first = tokio::spawn(async move { create_group_on(ch, "held", &[&xs, &ys]).await });
    a.wait_paused("group.members-recorded", 1).await;
    let creating = groups_on_disk(&pool, "held");
    assert_eq!(creating.len(), 1);
    assert_eq!(creating[0]["state"], "creating", "{}", creating[0]);
    let held_id = creating[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        code(&group_snapshot(&b, "held", &[&x, &y]).await),
        Code::Aborted
    );
    assert_eq!(
        code(&group_snapshot(&b, "other", &[&y]).await),
        Code::Aborted
    );
    assert_eq!(code(&snapshot(&b, "alone", &x).await), Code::Aborted);
    assert_eq!(code(&group_members(&b, &held_id).await), Code::NotFound);
    let hidden = list_snapshots(&b).await;
    for member in creating[0]["snapshot_ids"].as_array().unwrap() {
        assert!(
            !hidden.contains(member.as_str().unwrap()),
            "{member} listed before its group is ready"
        );
    }
    hold.release();
    let id = first.await.unwrap().unwrap();
    assert_eq!(id, held_id);
    a.restart().await;
    let members = group_members(&b, &id).await.unwrap();
    let listed = list_snapshots(&b).await;
    assert!(
        members.iter().all(|m| listed.contains(m)),
        "{members:?} in {listed:?}"
    );
    let of_x = members
        .iter()
        .find(|m| snapshot_record(&pool, m)["source_volume_id"] == x.as_str())
        .expect("a member of x")
        .clone();
    let restored = create_from(&b, "restored-x", from_snapshot(&of_x))
        .await
        .unwrap();
    assert_pattern(&volume_image(&pool, &restored), 0x31, 0, M);
    // A member goes only with its group, whichever process is asked.
    assert_eq!(
        code(&delete_snapshot(&a, &of_x).await),
        Code::InvalidArgument
    );
    delete_group(&b, &id).await.unwrap();
    assert_eq!(code(&group_members(&a, &id).await), Code::NotFound);
    let after = list_snapshots(&a).await;
    assert!(members.iter().all(|m| !after.contains(m)), "{after:?}");

    // A is killed while holding a group being cut: the name is free at once for B, whose
    // attempt removes A's leftover and makes the group; A agrees once it starts again.
    a.restart_with_env(&[(ENV, "group.members-recorded"), (PAUSE_ENV, "20000")])
        .await;
    let (ch, xs, ys) = (a.channel.clone(), x.clone(), y.clone());
    let doomed = tokio::spawn(async move { create_group_on(ch, "orphaned", &[&xs, &ys]).await });
    a.wait_paused("group.members-recorded", 2).await;
    let leftover = groups_on_disk(&pool, "orphaned")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    a.kill();
    assert!(doomed.await.unwrap().is_err());
    let id = group_snapshot(&b, "orphaned", &[&x, &y]).await.unwrap();
    assert_ne!(id, leftover, "a new group, the leftover removed");
    assert_eq!(groups_on_disk(&pool, "orphaned").len(), 1);
    a.restart().await;
    assert_eq!(group_snapshot(&a, "orphaned", &[&x, &y]).await.unwrap(), id);
    assert_agree(&a, &b, &pool).await;
}
