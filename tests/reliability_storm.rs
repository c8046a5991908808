//! A concurrency storm: many clients, each on its own connection, fire hundreds of mixed and
//! conflicting RPCs (create, delete, expand, snapshot, delete snapshot, publish and unpublish
//! with local attach, reads) at a few names and volumes of one monolith. Every answer must be
//! a code that the call may give (OK, ABORTED, ALREADY_EXISTS, NOT_FOUND, FAILED_PRECONDITION,
//! INVALID_ARGUMENT for a raw snapshot source), the plugin must stay up, and the final state
//! must be one the successful answers allow: which volumes and snapshots exist and which
//! volumes are attached follows from the last successful operation on each (any one of those
//! whose calls overlapped at the end), capacities come from a successful create or expand, and
//! the pool holds no orphan file and only images that pass `qemu-img check`.
//!
//! Ids are unique over time (a name created again gets a new id), so clients learn each
//! name's current id from the create answers, and the end state is checked per id.
//!
//! The sequence is random but reproducible: `VDT_STORM_SEED=<n>` replays a run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use virtdisk_csi::csi::proto::controller_client::ControllerClient;
use virtdisk_csi::ids;
use virtdisk_test_support::calls::{delete_snapshot, list_snapshots};
use virtdisk_test_support::local_attach as env;
use virtdisk_test_support::pool::{
    assert_pool_clean, volume_image, wait_flattening_settled, PoolView,
};
use virtdisk_test_support::prelude::*;

const CLIENTS: usize = 16;
const CALLS_PER_CLIENT: usize = 40;
const NAMES: [&str; 3] = ["storm-a", "storm-b", "storm-c"];
const SNAPSHOTS: [&str; 2] = ["storm-snap-x", "storm-snap-y"];

/// xorshift64*: small, seeded, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone)]
enum Call {
    Create { name: usize, raw: bool },
    Delete(usize),
    Expand(usize, i64),
    Snapshot { snap: usize, source: usize },
    DeleteSnapshot(usize),
    Publish(usize),
    Unpublish(usize),
    Get(usize),
    List,
}

impl Call {
    fn random(rng: &mut Rng) -> Call {
        let v = rng.below(NAMES.len());
        match rng.below(20) {
            0..=3 => Call::Create {
                name: v,
                raw: rng.below(8) == 0,
            },
            4..=5 => Call::Delete(v),
            6..=7 => Call::Expand(v, [24, 32, 40][rng.below(3)] * MIB),
            8..=10 => Call::Snapshot {
                snap: rng.below(SNAPSHOTS.len()),
                source: v,
            },
            11 => Call::DeleteSnapshot(rng.below(SNAPSHOTS.len())),
            12..=14 => Call::Publish(v),
            15..=17 => Call::Unpublish(v),
            18 => Call::Get(v),
            _ => Call::List,
        }
    }

    /// The codes this call may answer in a storm.
    fn allowed(&self) -> &'static [Code] {
        use Code::*;
        match self {
            Call::Create { .. } => &[Ok, Aborted, AlreadyExists],
            Call::Delete(_) => &[Ok, Aborted, FailedPrecondition],
            Call::Expand(..) => &[Ok, Aborted, NotFound],
            // FAILED_PRECONDITION: attached read-write (local attach has no live snapshot);
            // INVALID_ARGUMENT: a raw source.
            Call::Snapshot { .. } => &[
                Ok,
                Aborted,
                NotFound,
                AlreadyExists,
                FailedPrecondition,
                InvalidArgument,
            ],
            Call::DeleteSnapshot(_) => &[Ok, Aborted],
            Call::Publish(_) => &[Ok, Aborted, NotFound],
            Call::Unpublish(_) => &[Ok, Aborted],
            Call::Get(_) => &[Ok, NotFound],
            Call::List => &[Ok],
        }
    }
}

/// The id each name had in the latest successful create (shared by the clients, as a CO
/// remembers what CreateVolume answered). A name never created yet has an id of the right
/// shape that names nothing.
#[derive(Default)]
struct Known {
    volumes: Mutex<BTreeMap<usize, String>>,
    snapshots: Mutex<BTreeMap<usize, String>>,
}

impl Known {
    fn volume(&self, name: usize) -> String {
        self.volumes
            .lock()
            .unwrap()
            .get(&name)
            .cloned()
            .unwrap_or_else(|| format!("default.{}", ids::legacy_volume_key(NAMES[name])))
    }

    fn snapshot(&self, snap: usize) -> String {
        self.snapshots
            .lock()
            .unwrap()
            .get(&snap)
            .cloned()
            .unwrap_or_else(|| format!("default.{}", ids::legacy_snapshot_key(SNAPSHOTS[snap])))
    }
}

/// One answered call.
#[derive(Debug, Clone)]
struct Answer {
    call: Call,
    /// The volume (or snapshot) id the call acted on; for a successful create, the id it
    /// answered.
    target: String,
    start: Instant,
    end: Instant,
    code: Code,
    message: String,
    /// Capacity answered by a successful create or expand.
    capacity: Option<i64>,
}

/// Performs `call` on `target` (the volume or snapshot id it acts on); returns the capacity a
/// create or expand answered and the id a create answered.
async fn perform(
    c: &mut ControllerClient<Channel>,
    node: &str,
    call: &Call,
    target: &str,
) -> Result<(Option<i64>, Option<String>), Status> {
    let none = |_| (None, None);
    match call {
        Call::Create { name, raw } => {
            let format: &[(&str, &str)] = if *raw { &[("format", "raw")] } else { &[] };
            let req = csi::CreateVolumeRequest {
                parameters: params(format),
                ..create_req(NAMES[*name], 16 * MIB)
            };
            c.create(req)
                .await
                .map(|v| (Some(v.capacity_bytes), Some(v.volume_id)))
        }
        Call::Delete(_) => c.delete(target).await.map(none),
        Call::Expand(_, size) => {
            let req = csi::ControllerExpandVolumeRequest {
                volume_capability: Some(ext4_cap()),
                ..expand_req(target, *size)
            };
            c.expand(req).await.map(|r| (Some(r.capacity_bytes), None))
        }
        Call::Snapshot { snap, .. } => {
            let req = snapshot_req(SNAPSHOTS[*snap], target);
            c.snapshot(req).await.map(|s| (None, Some(s.snapshot_id)))
        }
        Call::DeleteSnapshot(_) => c.remove_snapshot(target).await.map(none),
        Call::Publish(_) => c
            .publish(publish_req(target, node))
            .await
            .map(|_| (None, None)),
        Call::Unpublish(_) => c.unpublish(unpublish_req(target, node)).await.map(none),
        Call::Get(_) => c.volume(target).await.map(|_| (None, None)),
        Call::List => {
            let req = csi::ListVolumesRequest::default();
            c.list_volumes(req).await.map(|_| (None, None))
        }
    }
}

/// Answers each storm must have seen a few of.
const WANTED: [&str; 8] = [
    "Create Ok",
    "Delete Ok",
    "Expand Ok",
    "Snapshot Ok",
    "DeleteSnapshot Ok",
    "Publish Ok",
    "Unpublish Ok",
    "Create Aborted",
];

/// "Kind Code" → how many.
fn tally_of(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut tally = BTreeMap::new();
    for a in answers {
        let kind = format!("{:?}", a.call);
        let kind = kind.split(['(', ' ']).next().unwrap();
        *tally.entry(format!("{kind} {:?}", a.code)).or_default() += 1;
    }
    tally
}

/// CLIENTS clients, each on its own connection, CALLS_PER_CLIENT random calls each.
async fn storm_round(e: &env::Env, seed: u64, answers: Arc<Mutex<Vec<Answer>>>, known: Arc<Known>) {
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..CLIENTS {
        let socket = e.plugin.socket.clone();
        let node = e.node_id.clone();
        let answers = answers.clone();
        let known = known.clone();
        let mut rng = Rng(seed.wrapping_add((n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
        clients.spawn(async move {
            // Each client on its own connection, as separate COs/sidecars would be.
            let ch = virtdisk_csi::csi::channel::connect(&socket).await.unwrap();
            let mut c = ControllerClient::new(ch);
            for _ in 0..CALLS_PER_CLIENT {
                // A moment's think time, so that calls interleave rather than all collide.
                let pause = rng.below(80) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let call = Call::random(&mut rng);
                let mut target = match &call {
                    Call::Create { .. } | Call::List => String::new(),
                    Call::Delete(v)
                    | Call::Expand(v, _)
                    | Call::Publish(v)
                    | Call::Unpublish(v)
                    | Call::Get(v)
                    | Call::Snapshot { source: v, .. } => known.volume(*v),
                    Call::DeleteSnapshot(s) => known.snapshot(*s),
                };
                let start = Instant::now();
                let r = perform(&mut c, &node, &call, &target).await;
                let end = Instant::now();
                let (code, message, capacity) = match r {
                    Ok((cap, id)) => {
                        match (&call, id) {
                            (Call::Create { name, .. }, Some(id)) => {
                                known.volumes.lock().unwrap().insert(*name, id.clone());
                                target = id;
                            }
                            (Call::Snapshot { snap, .. }, Some(id)) => {
                                known.snapshots.lock().unwrap().insert(*snap, id.clone());
                                target = id;
                            }
                            _ => {}
                        }
                        (Code::Ok, String::new(), cap)
                    }
                    Err(s) => (s.code(), s.message().to_string(), None),
                };
                answers.lock().unwrap().push(Answer {
                    call,
                    target,
                    start,
                    end,
                    code,
                    message,
                    capacity,
                });
            }
        });
    }
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
}

/// The outcomes the last successful calls among `done` allow: the last call is one that no
/// other call started after it had answered (their server-side runs cannot overlap: one guard
/// per object, a second call is ABORTED). `initial` when nothing succeeded.
fn possible<T: Ord + Clone>(done: &[(&Answer, T)], initial: T) -> BTreeSet<T> {
    if done.is_empty() {
        return BTreeSet::from([initial]);
    }
    done.iter()
        .filter(|(a, _)| !done.iter().any(|(b, _)| b.start > a.end))
        .map(|(_, outcome)| outcome.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_conflicting_rpcs_give_correct_codes_and_a_consistent_end_state() {
    if !env::can_run() {
        return;
    }
    let seed: u64 = std::env::var("VDT_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0f57_0e00);
    eprintln!("storm seed {seed} (replay with VDT_STORM_SEED={seed})");
    let e = env::Env::start("[libvirt]\nenabled = false\n").await;
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let known: Arc<Known> = Arc::default();
    let started = Instant::now();
    // Rounds of the storm until every kind of change succeeded a few times (conflicts are
    // random: most rounds suffice alone).
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..4u64 {
        storm_round(
            &e,
            seed.wrapping_add(round << 32),
            answers.clone(),
            known.clone(),
        )
        .await;
        tally = tally_of(&answers.lock().unwrap());
        if WANTED
            .iter()
            .all(|k| tally.get(*k).copied().unwrap_or(0) >= 2)
        {
            break;
        }
    }
    let answers = answers.lock().unwrap().clone();
    for a in &answers {
        assert!(
            a.call.allowed().contains(&a.code),
            "{:?} answered {:?}: {}",
            a.call,
            a.code,
            a.message
        );
    }
    eprintln!(
        "{} calls from {CLIENTS} clients at a time in {} ms: {tally:#?}",
        answers.len(),
        started.elapsed().as_millis()
    );
    let ok = |a: &&Answer| a.code == Code::Ok;
    for kind in WANTED {
        assert!(
            tally.get(kind).copied().unwrap_or(0) >= 2,
            "too few {kind} to prove anything (try another VDT_STORM_SEED)"
        );
    }
    let ready = e.plugin.identity().ready().await;
    ready.expect("the plugin is still up and ready");
    assert!(!e.plugin.log().contains("panicked"), "a handler panicked");

    // Let background flattening settle before reading the pool.
    let pool = e.plugin.pool_dir();
    wait_flattening_settled(&e.plugin, virtdisk_csi::pool::DEFAULT_MAX_CHAIN_DEPTH).await;

    // The end state, as the plugin reports it.
    let mut exists = BTreeMap::new();
    let mut attached = BTreeMap::new();
    for entry in &e.plugin.controller().all_volumes().await {
        let v = entry.volume.as_ref().unwrap();
        exists.insert(v.volume_id.clone(), v.capacity_bytes);
        let nodes = &entry.status.as_ref().unwrap().published_node_ids;
        attached.insert(v.volume_id.clone(), !nodes.is_empty());
    }
    let snapshots = list_snapshots(&e.plugin).await;

    // Every volume id any call acted on or a create answered, with its name.
    let mut volume_ids: BTreeMap<String, usize> = BTreeMap::new();
    for a in &answers {
        if let Call::Create { name, .. } = a.call {
            if a.code == Code::Ok {
                volume_ids.insert(a.target.clone(), name);
            }
        }
    }
    for id in exists.keys() {
        assert!(
            volume_ids.contains_key(id),
            "volume {id} exists but no create answered it"
        );
    }
    for (i, name) in NAMES.iter().enumerate() {
        let of_name: Vec<&String> = volume_ids
            .iter()
            .filter(|(id, n)| **n == i && exists.contains_key(*id))
            .map(|(id, _)| id)
            .collect();
        assert!(
            of_name.len() <= 1,
            "{name}: several volumes exist: {of_name:?}"
        );
    }
    for (id, i) in &volume_ids {
        let name = NAMES[*i];
        let mine = |a: &Answer| {
            a.target == *id
                && matches!(
                    a.call,
                    Call::Create { .. }
                        | Call::Delete(_)
                        | Call::Publish(_)
                        | Call::Unpublish(_)
                        | Call::Expand(..)
                )
        };
        let succeeded: Vec<&Answer> = answers.iter().filter(|a| ok(a) && mine(a)).collect();
        let existence: Vec<(&Answer, bool)> = succeeded
            .iter()
            .filter_map(|a| match a.call {
                Call::Create { .. } => Some((*a, true)),
                Call::Delete(_) => Some((*a, false)),
                _ => None,
            })
            .collect();
        let allowed = possible(&existence, false);
        let now = exists.contains_key(id);
        assert!(
            allowed.contains(&now),
            "{name} ({id}): exists = {now}, the answers allow {allowed:?}"
        );
        let attachment: Vec<(&Answer, bool)> = succeeded
            .iter()
            .filter_map(|a| match a.call {
                Call::Publish(_) => Some((*a, true)),
                Call::Unpublish(_) | Call::Delete(_) => Some((*a, false)),
                _ => None,
            })
            .collect();
        let allowed = possible(&attachment, false);
        let now = attached.get(id).copied().unwrap_or(false);
        assert!(
            allowed.contains(&now),
            "{name} ({id}): attached = {now}, the answers allow {allowed:?}"
        );
        if let Some(cap) = exists.get(id) {
            let answered: BTreeSet<i64> = succeeded.iter().filter_map(|a| a.capacity).collect();
            assert!(
                answered.contains(cap),
                "{name} ({id}): capacity {cap} was never answered ({answered:?})"
            );
            let image = volume_image(&pool, id);
            assert_eq!(qemu_img_info(&image)["virtual-size"], *cap, "{name}");
        }
        eprintln!(
            "{name} ({id}): exists {}, attached {}",
            exists.contains_key(id),
            attached.get(id).copied().unwrap_or(false)
        );
    }
    let mut snapshot_ids: BTreeMap<String, usize> = BTreeMap::new();
    for a in answers.iter().filter(ok) {
        if let Call::Snapshot { snap, .. } = a.call {
            snapshot_ids.insert(a.target.clone(), snap);
        }
    }
    for id in &snapshots {
        assert!(
            snapshot_ids.contains_key(id),
            "snapshot {id} exists but no CreateSnapshot answered it"
        );
    }
    for (id, s) in &snapshot_ids {
        let name = SNAPSHOTS[*s];
        let history: Vec<(&Answer, bool)> = answers
            .iter()
            .filter(ok)
            .filter(|a| a.target == *id)
            .filter_map(|a| match &a.call {
                Call::Snapshot { .. } => Some((a, true)),
                Call::DeleteSnapshot(_) => Some((a, false)),
                _ => None,
            })
            .collect();
        let allowed = possible(&history, false);
        let now = snapshots.contains(id);
        assert!(
            allowed.contains(&now),
            "{name} ({id}): exists = {now}, the answers allow {allowed:?}"
        );
    }
    // Attachments on the host are exactly the attached volumes: one daemon and one loop
    // device each.
    let left = env::leftovers(e.dir());
    let want = attached.values().filter(|a| **a).count();
    for kind in ["loop device ", "qemu-storage-daemon "] {
        let n = left.iter().filter(|x| x.starts_with(kind)).count();
        assert_eq!(n, want, "{kind}: {left:?}");
    }
    assert_pool_clean(&pool);

    // Everything can still be taken down cleanly.
    let volumes: Vec<csi::Volume> = exists
        .keys()
        .map(|id| csi::Volume {
            volume_id: id.clone(),
            ..Default::default()
        })
        .collect();
    for vol in &volumes {
        e.controller_unpublish(vol).await.unwrap();
    }
    for vol in &volumes {
        e.delete(vol).await;
    }
    env::assert_no_leftovers(e.dir());
    for id in &snapshots {
        delete_snapshot(&e.plugin, id).await.unwrap();
    }
    assert_pool_clean(&pool);
    assert!(PoolView::read(&pool).images.is_empty());
}
