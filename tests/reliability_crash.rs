//! Crash safety: the plugin is killed (SIGKILL, see `src/failpoint.rs`) right after each
//! durable step of every operation, restarted, and the same RPC retried. Each case must
//! converge to the right end state: the retry answers OK with the same result a crash-free
//! run gives, no orphan image, record, layer, attachment, mount, loop device or daemon is
//! left, and no data is lost (patterns written with qemu-io, files in mounts).
//!
//! One table per backend lists (operation, failpoint); `every_failpoint_is_exercised` keeps
//! the tables and `failpoint::POINTS` in step. Failpoints exist in debug builds only (what
//! `cargo test` builds); a release-mode run skips these tests loudly.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};
use virtdisk_csi::failpoint::{ENV, POINTS};
use virtdisk_test_support::calls::*;
use virtdisk_test_support::local_attach::{self as env, block_reads, block_write};
use virtdisk_test_support::pool::{
    assert_index_matches_pool, assert_pool_clean, depth_of, volume_image, PoolView,
};
use virtdisk_test_support::prelude::*;

const M: u64 = 1 << 20;

/// Pool-only operations run with libvirt off (nothing to attach).
const POOL_CONFIG: &str = "[libvirt]\nenabled = false\n";
/// A chain deeper than 2 layers is flattened in the background.
const FLATTEN_CONFIG: &str = "[libvirt]\nenabled = false\n[snapshots]\nmax_chain_depth = 2\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolOp {
    Create,
    Restore,
    Clone,
    Delete,
    Expand,
    Snapshot,
    DeleteSnapshot,
    /// CreateSnapshot that pushes the chain past the limit: the background flattener runs.
    Flatten,
    /// CreateVolumeGroupSnapshot of two volumes.
    Group,
    /// DeleteVolumeGroupSnapshot.
    DeleteGroup,
}

use PoolOp::*;

/// Each write step of each operation, in the order an operation reaches them. The `store.*`
/// points are the steps of a record commit (the first commit of the operation dies there).
const VOLUME_CASES: &[(PoolOp, &str)] = &[
    (Create, "create.image-made"),
    (Create, "store.temp-written"),
    (Create, "store.journaled"),
    (Create, "store.renamed"),
    (Create, "create.committed"),
    (Restore, "create.image-made"),
    (Restore, "store.change-logged"),
    (Restore, "create.committed"),
    (Clone, "freeze.overlay-made"),
    (Clone, "freeze.switched"),
    (Clone, "create.image-made"),
    (Clone, "create.committed"),
    (Delete, "store.change-logged"),
    (Delete, "store.committed"),
    (Delete, "gc.layer-removed"),
    (Expand, "expand.resized"),
    (Expand, "store.committed"),
];

const LAYER_CASES: &[(PoolOp, &str)] = &[
    (Snapshot, "freeze.overlay-made"),
    (Snapshot, "store.temp-synced"),
    (Snapshot, "store.change-logged"),
    (Snapshot, "freeze.switched"),
    (Snapshot, "snapshot.recorded"),
    (DeleteSnapshot, "store.change-logged"),
    (DeleteSnapshot, "gc.layer-removed"),
    (DeleteSnapshot, "snapshot.deleted"),
    (Flatten, "flatten.job-written"),
    (Flatten, "flatten.converted"),
    (Flatten, "flatten.switching"),
    (Flatten, "flatten.rebased"),
    (Flatten, "flatten.recorded"),
];

const GROUP_CASES: &[(PoolOp, &str)] = &[
    (Group, "group.intent"),
    (Group, "freeze.overlay-made"),
    (Group, "freeze.switched"),
    (Group, "group.members-recorded"),
    (Group, "group.ready"),
    (DeleteGroup, "group.members-deleted"),
];

/// Ids a scenario set up before the crash.
#[derive(Default, Debug)]
struct Ids {
    src: String,
    snap: String,
    /// Group cases: the second volume.
    src2: String,
}

fn failpoints_compiled_in() -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: failpoints exist in debug builds only");
    }
    cfg!(debug_assertions)
}

/// Restarts the plugin with `point` armed.
async fn arm(p: &mut Plugin, point: &str) {
    p.restart_with_env(&[(ENV, point)]).await;
}

/// Checks the plugin died at `point` (in the call that answered `first`, or for background
/// work soon after) and restarts it unarmed.
async fn expect_death<T: std::fmt::Debug>(
    p: &mut Plugin,
    point: &str,
    first: &Result<T, tonic::Status>,
) {
    let status = p.wait_exit(Duration::from_secs(90)).await;
    let status = status.unwrap_or_else(|| {
        panic!("{point}: the plugin did not die at the failpoint (first answer: {first:?})")
    });
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{point}: exit {status:?}"
    );
    assert!(
        p.log()
            .contains(&format!("failpoint {point}: killing the process")),
        "{point}: died, but not at the failpoint"
    );
    p.restart().await;
}

impl PoolOp {
    fn config(self) -> &'static str {
        if self == Flatten {
            FLATTEN_CONFIG
        } else {
            POOL_CONFIG
        }
    }

    /// Whether the dying work runs after the RPC answered.
    fn background(self) -> bool {
        self == Flatten
    }

    async fn setup(self, p: &Plugin) -> Ids {
        let pool = p.pool_dir();
        let mut ids = Ids::default();
        if self == Create {
            return ids;
        }
        ids.src = create_volume(p, "src", 16 * MIB, &[]).await.unwrap();
        write_pattern(&volume_image(&pool, &ids.src), 0xa1, 0, M);
        match self {
            Restore => {
                ids.snap = snapshot(p, "snap", &ids.src).await.unwrap();
                write_pattern(&volume_image(&pool, &ids.src), 0xb2, 0, M);
            }
            DeleteSnapshot => {
                ids.snap = snapshot(p, "snap", &ids.src).await.unwrap();
                delete_volume(p, &ids.src).await.unwrap();
            }
            Flatten => {
                ids.snap = snapshot(p, "s1", &ids.src).await.unwrap();
                write_pattern(&volume_image(&pool, &ids.src), 0xb2, M, M);
            }
            Group | DeleteGroup => {
                ids.src2 = create_volume(p, "src2", 16 * MIB, &[]).await.unwrap();
                write_pattern(&volume_image(&pool, &ids.src2), 0xa2, 0, M);
                if self == DeleteGroup {
                    ids.snap = group_snapshot(p, "grp", &[&ids.src, &ids.src2])
                        .await
                        .unwrap();
                }
            }
            _ => {}
        }
        ids
    }

    /// The RPC under test; repeated as is after the crash.
    async fn act(self, p: &Plugin, ids: &Ids) -> Result<String, tonic::Status> {
        match self {
            Create => create_volume(p, "fresh", 16 * MIB, &[]).await,
            Restore => create_from(p, "restored", from_snapshot(&ids.snap)).await,
            Clone => create_from(p, "clone", from_volume(&ids.src)).await,
            Delete => delete_volume(p, &ids.src).await.map(|_| String::new()),
            Expand => expand(p, &ids.src, 32 * MIB).await.map(|c| c.to_string()),
            Snapshot => snapshot(p, "snap", &ids.src).await,
            DeleteSnapshot => delete_snapshot(p, &ids.snap).await.map(|_| String::new()),
            Flatten => snapshot(p, "s2", &ids.src).await,
            Group => group_snapshot(p, "grp", &[&ids.src, &ids.src2]).await,
            DeleteGroup => delete_group(p, &ids.snap).await.map(|_| String::new()),
        }
    }

    /// The end state a crash-free run reaches.
    async fn verify(self, p: &Plugin, ids: &Ids, answer: &str) {
        let pool = p.pool_dir();
        let volumes = list_volumes(p).await;
        match self {
            Create => {
                assert_eq!(volumes.get(answer), Some(&(16 * MIB)), "{volumes:?}");
                let img = volume_image(&pool, answer);
                write_pattern(&img, 0xc3, 0, M);
                assert_pattern(&img, 0xc3, 0, M);
            }
            Restore | Clone => {
                assert!(volumes.contains_key(answer), "{volumes:?}");
                let new = volume_image(&pool, answer);
                let src = volume_image(&pool, &ids.src);
                assert_pattern(&new, 0xa1, 0, M);
                let src_byte = if self == Restore { 0xb2 } else { 0xa1 };
                assert_pattern(&src, src_byte, 0, M);
                // The two are independent from now on.
                write_pattern(&new, 0xd4, 0, M);
                assert_pattern(&src, src_byte, 0, M);
            }
            Delete => assert!(!volumes.contains_key(&ids.src), "{volumes:?}"),
            Expand => {
                assert_eq!(answer, (32 * MIB).to_string());
                assert_eq!(volumes.get(&ids.src), Some(&(32 * MIB)));
                let img = volume_image(&pool, &ids.src);
                assert_eq!(qemu_img_info(&img)["virtual-size"], 32 * MIB);
                assert_pattern(&img, 0xa1, 0, M);
            }
            Snapshot => {
                let snaps = list_snapshots(p).await;
                assert_eq!(snaps, BTreeSet::from([answer.to_string()]));
                write_pattern(&volume_image(&pool, &ids.src), 0xb2, 0, M);
                let r = create_from(p, "check", from_snapshot(answer))
                    .await
                    .unwrap();
                assert_pattern(&volume_image(&pool, &r), 0xa1, 0, M);
                assert_pattern(&volume_image(&pool, &ids.src), 0xb2, 0, M);
            }
            DeleteSnapshot => {
                assert!(list_snapshots(p).await.is_empty());
                assert!(!volumes.contains_key(&ids.src));
            }
            Flatten => {
                wait_flattened(p, &ids.src).await;
                let src = volume_image(&pool, &ids.src);
                assert_pattern(&src, 0xa1, 0, M);
                assert_pattern(&src, 0xb2, M, M);
                let one = create_from(p, "from-s1", from_snapshot(&ids.snap))
                    .await
                    .unwrap();
                assert_pattern(&volume_image(&pool, &one), 0xa1, 0, M);
                assert_pattern(&volume_image(&pool, &one), 0, M, M);
                let two = create_from(p, "from-s2", from_snapshot(answer))
                    .await
                    .unwrap();
                assert_pattern(&volume_image(&pool, &two), 0xa1, 0, M);
                assert_pattern(&volume_image(&pool, &two), 0xb2, M, M);
                // Restores are deeper than the limit again: let that flattening end too.
                wait_flattened(p, &one).await;
                wait_flattened(p, &two).await;
            }
            Group => {
                let members = group_members(p, answer).await.unwrap();
                assert_eq!(list_snapshots(p).await, members.iter().cloned().collect());
                write_pattern(&volume_image(&pool, &ids.src), 0xb2, 0, M);
                for (m, byte) in members.iter().zip([0xa1, 0xa2]) {
                    let r = create_from(p, &format!("check-{byte}"), from_snapshot(m))
                        .await
                        .unwrap();
                    assert_pattern(&volume_image(&pool, &r), byte, 0, M);
                }
            }
            DeleteGroup => {
                assert!(list_snapshots(p).await.is_empty());
                assert!(volumes.contains_key(&ids.src) && volumes.contains_key(&ids.src2));
                assert_pattern(&volume_image(&pool, &ids.src2), 0xa2, 0, M);
            }
        }
    }
}

/// Waits until the background flattener has brought the volume's chain within the limit (2)
/// and no job is left.
async fn wait_flattened(p: &Plugin, volume: &str) {
    eventually(Duration::from_secs(120), || async {
        let view = PoolView::read(&p.pool_dir());
        let depth = depth_of(view.volume(volume).expect("volume record"));
        if depth <= 2 && view.flatten_jobs.is_empty() {
            return Ok(());
        }
        let jobs = &view.flatten_jobs;
        Err(format!(
            "volume {volume} still {depth} layers deep; jobs {jobs:?}"
        ))
    })
    .await
}

/// Calls `f` again while it answers ABORTED, as a CO does: the background flattener holds a
/// volume for a moment after a restart.
async fn retry_aborted<T, F, Fut>(f: F) -> Result<T, tonic::Status>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Err(e) if e.code() == tonic::Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
}

async fn pool_case(op: PoolOp, point: &str) {
    let t = Instant::now();
    let mut p = Plugin::start_with_config("controller", op.config(), &[]).await;
    let pool = p.pool_dir();
    let bystander = create_volume(&p, "bystander", 8 * MIB, &[]).await.unwrap();
    write_pattern(&volume_image(&pool, &bystander), 0x5a, 0, M);
    let ids = op.setup(&p).await;

    arm(&mut p, point).await;
    let first = op.act(&p, &ids).await;
    expect_death(&mut p, point, &first).await;
    if !op.background() {
        assert!(first.is_err(), "{op:?} at {point}: answered {first:?}");
        // The restarted plugin's index is what the pool holds.
        assert_index_matches_pool(&p, &pool).await;
    }
    let answer = retry_aborted(|| op.act(&p, &ids))
        .await
        .unwrap_or_else(|e| panic!("{op:?} at {point}: the retry failed: {e:?}"));
    op.verify(&p, &ids, &answer).await;
    // The retry answers the same again (idempotent).
    let again = retry_aborted(|| op.act(&p, &ids)).await.unwrap();
    assert_eq!(again, answer, "{op:?} at {point}");
    assert_pattern(&volume_image(&pool, &bystander), 0x5a, 0, M);
    assert_pool_clean(&pool);
    assert_index_matches_pool(&p, &pool).await;
    eprintln!(
        "{op:?} crashed at {point}: converged ({} ms)",
        t.elapsed().as_millis()
    );
}

async fn run_pool_cases(cases: &[(PoolOp, &str)]) {
    if !failpoints_compiled_in() {
        return;
    }
    for (op, point) in cases {
        pool_case(*op, point).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_each_durable_step_of_volume_operations() {
    run_pool_cases(VOLUME_CASES).await;
}

/// The checkpoint of journaled creates (`store::journal`): the process dies before it
/// fsyncs anything, after the create was answered.
const CHECKPOINT: &str = "store.checkpoint";

/// A create is durable once answered, though its files are made durable only later (by the
/// checkpoint): the plugin dies before the checkpoint, and the files a crash of the machine
/// could then lose are taken away — the record file gone or empty, the image gone. The next
/// start writes them again from the change log: the volume is listed with its size, its image
/// takes data, the pool is clean and the index agrees with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_create_survives_losing_its_files_before_the_checkpoint() {
    if !failpoints_compiled_in() {
        return;
    }
    let mut p = Plugin::start_with_config("controller", POOL_CONFIG, &[]).await;
    let pool = p.pool_dir();
    let bystander = create_volume(&p, "bystander", 8 * MIB, &[]).await.unwrap();
    write_pattern(&volume_image(&pool, &bystander), 0x5a, 0, M);
    for (round, lose_record) in [("gone", true), ("emptied", false)] {
        arm(&mut p, CHECKPOINT).await;
        let name = format!("journaled-{round}");
        let id = create_volume(&p, &name, 16 * MIB, &[]).await.unwrap();
        let record = pool.join(format!("volumes/{}.json", key_of(&id)));
        let image = volume_image(&pool, &id);
        let status = p.wait_exit(Duration::from_secs(90)).await;
        let status = status.expect("the plugin did not die at the checkpoint");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        if lose_record {
            std::fs::remove_file(&record).unwrap();
        } else {
            std::fs::write(&record, b"").unwrap();
        }
        std::fs::remove_file(&image).unwrap();
        p.restart().await;
        let volumes = list_volumes(&p).await;
        assert_eq!(volumes.get(&id), Some(&(16 * MIB)), "{round}: {volumes:?}");
        assert!(image.exists(), "{round}: the image was not written again");
        assert!(
            p.log().contains("wrote a record again from the change log")
                && p.log()
                    .contains("wrote the empty image of the volume again"),
            "{round}: {}",
            p.log()
        );
        write_pattern(&image, 0xc3, 0, M);
        assert_pattern(&image, 0xc3, 0, M);
        // Idempotent by name: the same volume.
        let again = create_volume(&p, &name, 16 * MIB, &[]).await.unwrap();
        assert_eq!(again, id);
        assert_pattern(&volume_image(&pool, &bystander), 0x5a, 0, M);
        assert_pool_clean(&pool);
        assert_index_matches_pool(&p, &pool).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_each_durable_step_of_snapshots_and_flattening() {
    run_pool_cases(LAYER_CASES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_each_durable_step_of_group_snapshots() {
    run_pool_cases(GROUP_CASES).await;
}

#[test]
fn every_failpoint_is_exercised() {
    let mut covered: BTreeSet<&str> = BTreeSet::new();
    covered.extend(VOLUME_CASES.iter().map(|c| c.1));
    covered.extend(LAYER_CASES.iter().map(|c| c.1));
    covered.extend(GROUP_CASES.iter().map(|c| c.1));
    covered.extend(LOCAL_CASES.iter().map(|c| c.1));
    covered.extend(LIBVIRT_CASES.iter().map(|c| c.1));
    covered.insert(CHECKPOINT);
    let all: BTreeSet<&str> = POINTS.iter().copied().collect();
    let missing: Vec<&&str> = all.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "failpoints no test crashes at: {missing:?}"
    );
    let unknown: Vec<&&str> = covered.difference(&all).collect();
    assert!(
        unknown.is_empty(),
        "cases name unknown failpoints: {unknown:?}"
    );
}

// ---- Local attach and the node service (a monolith on this host) ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LocalOp {
    /// ControllerPublish to this host.
    Attach,
    /// ControllerUnpublish from this host.
    Detach,
    /// NodeStage, mount volume (formats a blank disk).
    Stage,
    /// NodeStage, block volume.
    StageBlock,
    Unstage,
    NodePublish,
    NodePublishReadOnly,
    NodeUnpublish,
    /// CreateSnapshot of the staged (mounted) volume: the storage daemon switches live, the
    /// file system frozen around it.
    LiveSnapshot,
}

const LOCAL_CASES: &[(LocalOp, &str)] = &[
    (LocalOp::Attach, "localattach.recorded"),
    (LocalOp::Attach, "localattach.daemon-started"),
    (LocalOp::Attach, "localattach.loop-attached"),
    (LocalOp::Attach, "publish.attached"),
    (LocalOp::Detach, "localattach.loop-detached"),
    (LocalOp::Detach, "localattach.daemon-stopped"),
    (LocalOp::Stage, "stage.formatted"),
    (LocalOp::Stage, "stage.mounted"),
    (LocalOp::StageBlock, "stage.block-bound"),
    (LocalOp::Unstage, "unstage.unmounted"),
    (LocalOp::NodePublish, "node-publish.bound"),
    (LocalOp::NodePublishReadOnly, "node-publish.bound"),
    (LocalOp::NodeUnpublish, "node-unpublish.unmounted"),
    (LocalOp::LiveSnapshot, "freeze.intent"),
    (LocalOp::LiveSnapshot, "localattach.overlay-added"),
    (LocalOp::LiveSnapshot, "localattach.switched"),
    (LocalOp::LiveSnapshot, "freeze.switched"),
    (LocalOp::LiveSnapshot, "snapshot.recorded"),
];

const LOCAL_CONFIG: &str = "[libvirt]\nenabled = false\n[node]\ndevice_wait_secs = 5\n";

/// One volume on this host and the paths a CO would give it.
struct Local {
    vol: csi::Volume,
    cap: csi::VolumeCapability,
    ctx: Map,
    staging: String,
    target: String,
}

async fn attach(e: &env::Env, l: &Local) -> Result<Map, Status> {
    let req = csi::ControllerPublishVolumeRequest {
        volume_capability: Some(l.cap.clone()),
        ..publish_req(&l.vol.volume_id, &e.node_id)
    };
    e.plugin.controller().publish(req).await
}

impl LocalOp {
    fn block(self) -> bool {
        self == LocalOp::StageBlock
    }

    /// Brings the volume to the state the operation starts from.
    async fn setup(self, e: &env::Env, l: &mut Local) {
        use LocalOp::*;
        if self == Attach {
            return;
        }
        l.ctx = attach(e, l).await.unwrap();
        match self {
            Detach => {
                // Data written through a mount before the detach must survive it.
                e.stage(&l.vol, &l.ctx, &l.staging, &l.cap).await.unwrap();
                env::write_file(&l.staging, "kept.txt", b"before the crash");
                e.unstage(&l.vol, &l.staging).await.unwrap();
            }
            Unstage | NodePublish | NodePublishReadOnly | NodeUnpublish | LiveSnapshot => {
                e.stage(&l.vol, &l.ctx, &l.staging, &l.cap).await.unwrap();
                env::write_file(&l.staging, "kept.txt", b"before the crash");
                if self == NodeUnpublish {
                    e.publish(&l.vol, &l.staging, &l.target, &l.cap, false)
                        .await
                        .unwrap();
                }
            }
            _ => {}
        }
    }

    async fn act(self, e: &env::Env, l: &Local) -> Result<(), tonic::Status> {
        use LocalOp::*;
        match self {
            Attach => attach(e, l).await.map(drop),
            Detach => e.controller_unpublish(&l.vol).await,
            Stage | StageBlock => e.stage(&l.vol, &l.ctx, &l.staging, &l.cap).await,
            Unstage => e.unstage(&l.vol, &l.staging).await,
            NodePublish => {
                e.publish(&l.vol, &l.staging, &l.target, &l.cap, false)
                    .await
            }
            NodePublishReadOnly => e.publish(&l.vol, &l.staging, &l.target, &l.cap, true).await,
            NodeUnpublish => e.unpublish(&l.vol, &l.target).await,
            LiveSnapshot => snapshot(&e.plugin, "crash-live", &l.vol.volume_id)
                .await
                .map(drop),
        }
    }

    /// Checks the end state, uses the volume, and takes everything down again.
    async fn verify_and_finish(self, e: &env::Env, l: &mut Local) {
        use LocalOp::*;
        let kept = |dir: &str| std::fs::read(std::path::Path::new(dir).join("kept.txt")).ok();
        match self {
            Attach => {
                l.ctx = attach(e, l).await.unwrap();
                assert!(l.ctx["devicePath"].starts_with("/dev/loop"), "{:?}", l.ctx);
                // Exactly one of each: export mount, loop device, storage daemon.
                let live = env::leftovers(e.dir());
                for kind in ["mount ", "loop device ", "qemu-storage-daemon "] {
                    let n = live.iter().filter(|x| x.starts_with(kind)).count();
                    assert_eq!(n, 1, "{kind}: {live:?}");
                }
            }
            Detach => {
                assert!(
                    env::leftovers(e.dir()).is_empty(),
                    "{:?}",
                    env::leftovers(e.dir())
                );
                l.ctx = attach(e, l).await.unwrap();
                e.stage(&l.vol, &l.ctx, &l.staging, &l.cap).await.unwrap();
                assert_eq!(kept(&l.staging).as_deref(), Some(&b"before the crash"[..]));
                e.unstage(&l.vol, &l.staging).await.unwrap();
            }
            Stage | StageBlock => {
                let staged = if self.block() {
                    format!("{}/{}", l.staging, virtdisk_csi::node::BLOCK_STAGE_FILE)
                } else {
                    l.staging.clone()
                };
                assert!(env::is_mount(&staged), "{staged} is not mounted");
                if !self.block() {
                    // The crash came before the mount's record: the retry's request became
                    // it, so a repeat with other mount flags is told apart.
                    let other = with_flags(&l.cap, &["discard"]);
                    let differs = e.stage(&l.vol, &l.ctx, &l.staging, &other).await;
                    assert_eq!(differs.unwrap_err().code(), tonic::Code::AlreadyExists);
                }
                e.publish(&l.vol, &l.staging, &l.target, &l.cap, false)
                    .await
                    .unwrap();
                if self.block() {
                    block_write(&l.target, 0x77);
                    assert!(block_reads(&l.ctx["devicePath"], 0x77));
                } else {
                    env::write_file(&l.target, "new.txt", b"after the crash");
                    assert_eq!(
                        std::fs::read(format!("{}/new.txt", l.staging)).unwrap(),
                        b"after the crash"
                    );
                }
                e.unpublish(&l.vol, &l.target).await.unwrap();
                e.unstage(&l.vol, &l.staging).await.unwrap();
            }
            Unstage => {
                assert!(!env::is_mount(&l.staging));
                e.stage(&l.vol, &l.ctx, &l.staging, &l.cap).await.unwrap();
                assert_eq!(kept(&l.staging).as_deref(), Some(&b"before the crash"[..]));
                e.unstage(&l.vol, &l.staging).await.unwrap();
            }
            NodePublish | NodePublishReadOnly => {
                assert!(env::is_mount(&l.target));
                assert_eq!(kept(&l.target).as_deref(), Some(&b"before the crash"[..]));
                // The crash came before the publish's record: the retry's request became it.
                let other = with_flags(&l.cap, &["discard"]);
                let readonly = self == NodePublishReadOnly;
                let differs = e
                    .publish(&l.vol, &l.staging, &l.target, &other, readonly)
                    .await;
                assert_eq!(differs.unwrap_err().code(), tonic::Code::AlreadyExists);
                let write = std::fs::write(format!("{}/probe.txt", l.target), b"x");
                if self == NodePublishReadOnly {
                    let err = write.expect_err("a read-only publish must not be writable");
                    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
                } else {
                    write.unwrap();
                }
                // The publish counts as a user of the staging mount.
                let busy = e.unstage(&l.vol, &l.staging).await.unwrap_err();
                assert_eq!(busy.code(), tonic::Code::FailedPrecondition, "{busy:?}");
                e.unpublish(&l.vol, &l.target).await.unwrap();
                e.unstage(&l.vol, &l.staging).await.unwrap();
            }
            LiveSnapshot => {
                // One snapshot; the file system is thawed (writable) and the volume goes on.
                let snaps = list_snapshots(&e.plugin).await;
                assert_eq!(snaps.len(), 1, "{snaps:?}");
                env::write_file(&l.staging, "after.txt", b"after the snapshot");
                assert_eq!(kept(&l.staging).as_deref(), Some(&b"before the crash"[..]));
                // The snapshot: the file system as it was, clean.
                let id = snaps.into_iter().next().unwrap();
                let (restored, rctx) = e.restored("crash-r", &id, &l.cap).await;
                env::assert_fsck_clean(&rctx["devicePath"]);
                let rs = e.staging("crash-r");
                e.stage(&restored, &rctx, &rs, &l.cap).await.unwrap();
                assert_eq!(kept(&rs).as_deref(), Some(&b"before the crash"[..]));
                assert!(!std::path::Path::new(&rs).join("after.txt").exists());
                e.unstage(&restored, &rs).await.unwrap();
                e.controller_unpublish(&restored).await.unwrap();
                e.delete(&restored).await;
                delete_snapshot(&e.plugin, &id).await.unwrap();
                e.unstage(&l.vol, &l.staging).await.unwrap();
            }
            NodeUnpublish => {
                assert!(!env::is_mount(&l.target));
                assert!(
                    !std::path::Path::new(&l.target).exists(),
                    "target leaf left behind"
                );
                assert_eq!(kept(&l.staging).as_deref(), Some(&b"before the crash"[..]));
                e.unstage(&l.vol, &l.staging).await.unwrap();
            }
        }
        e.finish(&l.vol).await;
    }
}

async fn local_case(op: LocalOp, point: &str) {
    let t = Instant::now();
    let mut e = env::Env::start(LOCAL_CONFIG).await;
    let cap = if op.block() {
        block_cap(Mode::SingleNodeWriter)
    } else {
        mount_cap("ext4", Mode::SingleNodeWriter)
    };
    let mut l = Local {
        vol: e.create(&env::unique("crash"), 32 * MIB, cap.clone()).await,
        cap,
        ctx: Default::default(),
        staging: e.staging("crash"),
        target: e.target("crash-alloc"),
    };
    op.setup(&e, &mut l).await;

    arm(&mut e.plugin, point).await;
    let first = op.act(&e, &l).await;
    expect_death(&mut e.plugin, point, &first).await;
    assert!(first.is_err(), "{op:?} at {point}: answered {first:?}");
    op.act(&e, &l)
        .await
        .unwrap_or_else(|err| panic!("{op:?} at {point}: the retry failed: {err:?}"));
    if op == LocalOp::LiveSnapshot && point.starts_with("localattach.") {
        // Killed while the file system was frozen: the restarted plugin thawed it.
        let log = e.plugin.log();
        assert!(
            log.contains("left this file system frozen"),
            "{point}: {log}"
        );
    }
    // Idempotent: the same call answers OK again.
    op.act(&e, &l)
        .await
        .unwrap_or_else(|err| panic!("{op:?} at {point}: the second retry failed: {err:?}"));
    op.verify_and_finish(&e, &mut l).await;
    assert_pool_clean(&e.plugin.pool_dir());
    eprintln!(
        "{op:?} crashed at {point}: converged ({} ms)",
        t.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_each_durable_step_of_local_attach_and_node_operations() {
    if !failpoints_compiled_in() || !env::can_run() {
        return;
    }
    for (op, point) in LOCAL_CASES {
        local_case(*op, point).await;
    }
}

// ---- libvirt hot-plug ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LibvirtOp {
    Publish,
    Unpublish,
    /// CreateSnapshot of a volume attached read-write: the domain switches live.
    LiveSnapshot,
    /// ControllerModifyVolume of an attached volume (QoS).
    Modify,
}

const LIBVIRT_CASES: &[(LibvirtOp, &str)] = &[
    (LibvirtOp::Publish, "libvirt.attached"),
    (LibvirtOp::Publish, "publish.attached"),
    (LibvirtOp::Unpublish, "libvirt.detach-requested"),
    (LibvirtOp::Unpublish, "libvirt.live-detached"),
    (LibvirtOp::LiveSnapshot, "freeze.intent"),
    (LibvirtOp::Modify, "libvirt.iotune-set"),
];

/// The QoS the Modify case sets.
#[cfg(feature = "libvirt")]
const MODIFIED_IOPS: u64 = 300;

#[cfg(feature = "libvirt")]
impl LibvirtOp {
    async fn act(self, p: &Plugin, volume: &str, node: &str) -> Result<(), Status> {
        let mut c = p.controller();
        match self {
            LibvirtOp::Publish => c.publish(publish_req(volume, node)).await.map(drop),
            LibvirtOp::Unpublish => c.unpublish(unpublish_req(volume, node)).await,
            LibvirtOp::LiveSnapshot => snapshot(p, "hp-live-snap", volume).await.map(drop),
            LibvirtOp::Modify => c
                .controller_modify_volume(csi::ControllerModifyVolumeRequest {
                    volume_id: volume.into(),
                    mutable_parameters: params(&[("totalIopsSec", &MODIFIED_IOPS.to_string())]),
                    ..Default::default()
                })
                .await
                .map(drop),
        }
    }
}

/// How many disks with `serial` a domain definition holds.
#[cfg(feature = "libvirt")]
fn disks_with(xml: virtdisk_csi::hypervisor::domxml::DomainXml, serial: &str) -> usize {
    xml.disks
        .iter()
        .filter(|d| d.serial.as_deref() == Some(serial))
        .count()
}

#[cfg(feature = "libvirt")]
async fn libvirt_case(dom: &TestDomain, op: LibvirtOp, point: &str, n: usize) {
    let t = Instant::now();
    let config = "[libvirt]\ndetach_timeout_secs = 10\n";
    let launch = Plugin::launch("controller").config(config);
    let mut p = launch.readable_by_qemu().start().await;
    // Default options: bus=scsi, persist=true (live and persistent definitions).
    let vol = create_volume(&p, &format!("hp-{n}"), 16 * MIB, &[])
        .await
        .unwrap();
    let serial = serial_of(&vol);
    if op != LibvirtOp::Publish {
        LibvirtOp::Publish.act(&p, &vol, &dom.uuid).await.unwrap();
    }
    arm(&mut p, point).await;
    let first = op.act(&p, &vol, &dom.uuid).await;
    expect_death(&mut p, point, &first).await;
    assert!(first.is_err(), "{op:?} at {point}: answered {first:?}");
    op.act(&p, &vol, &dom.uuid)
        .await
        .unwrap_or_else(|e| panic!("{op:?} at {point}: the retry failed: {e:?}"));
    op.act(&p, &vol, &dom.uuid).await.unwrap();
    // Exactly one disk when published, none when not: in both definitions.
    let want = usize::from(op != LibvirtOp::Unpublish);
    assert_eq!(
        disks_with(dom.live(), &serial),
        want,
        "{point}: live definition"
    );
    assert_eq!(
        disks_with(dom.inactive(), &serial),
        want,
        "{point}: persistent definition"
    );
    if op == LibvirtOp::LiveSnapshot {
        assert_eq!(list_snapshots(&p).await.len(), 1);
    }
    if op == LibvirtOp::Modify {
        for (xml, which) in [(dom.live(), "live"), (dom.inactive(), "persistent")] {
            let disk = xml.disk_by_serial(&serial).unwrap().clone();
            assert_eq!(
                disk.iotune.total_iops_sec,
                Some(MODIFIED_IOPS),
                "{point}: {which} definition"
            );
        }
    }
    if op != LibvirtOp::Unpublish {
        LibvirtOp::Unpublish.act(&p, &vol, &dom.uuid).await.unwrap();
        assert_eq!(disks_with(dom.live(), &serial), 0);
        assert_eq!(disks_with(dom.inactive(), &serial), 0);
    }
    assert_index_matches_pool(&p, &p.pool_dir()).await;
    delete_volume(&p, &vol).await.unwrap();
    assert_pool_clean(&p.pool_dir());
    eprintln!(
        "{op:?} crashed at {point}: converged ({} ms)",
        t.elapsed().as_millis()
    );
}

#[cfg(feature = "libvirt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_each_durable_step_of_hot_plug() {
    if !failpoints_compiled_in() {
        return;
    }
    let dom = TestDomain::start("crash", 3);
    for (n, (op, point)) in LIBVIRT_CASES.iter().enumerate() {
        libvirt_case(&dom, *op, point, n).await;
    }
}
