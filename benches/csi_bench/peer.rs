//! Side by side with the reference driver, csi-driver-host-path's `hostpathplugin`, in the same
//! run, on the same RPCs from the same client, the two drivers taking turns (blocks of calls)
//! so that load on the machine weighs on both alike.
//!
//! Neither attaches anything here: hostpath has no attach backend, and the plugin runs as a
//! controller with libvirt off (with libvirt on, DeleteVolume and the snapshots also read every
//! domain on the host: see the controller section). The plugin's volumes are qcow2 images;
//! hostpath's mount volumes are directories. The data written before a snapshot (256 MiB) goes
//! into the image with qemu-io, and into a file in hostpath's volume directory.
//!
//! The tool is found at `$VIRTDISK_BENCH_HOSTPATH`, on PATH, or in `shared/tools/` beside a
//! parent of the project; without it the section says so and measures nothing.

use super::floors;
use super::footprint::breakdown;
use super::plugin::memory_of;
use super::snapshots::{fill, image_of, reads_back};
use super::stats::{mib, ms, timed, PeerRow, Samples};
use super::Settings;
use csi::{controller_client::ControllerClient, identity_client::IdentityClient};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use virtdisk_test_support::prelude::{
    create_from_req, create_req, csi, from_snapshot, from_volume, Source, GIB,
};

pub const TOOL_ENV: &str = "VIRTDISK_BENCH_HOSTPATH";
const TOOL: &str = "hostpathplugin";

/// Where the reference driver is, if anywhere.
pub fn tool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(TOOL_ENV) {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join(TOOL))
            .find(|p| p.is_file())
        {
            return Some(p);
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join("shared/tools").join(TOOL))
        .find(|p| p.is_file())
}

/// hostpathplugin on a temp socket and state dir.
pub struct HostPath {
    child: Child,
    _dir: tempfile::TempDir,
    state: PathBuf,
    channel: Channel,
}

impl HostPath {
    /// Started with its temp dir under `parent` (`None`: the system's temp dir).
    pub async fn start(bin: &Path, parent: Option<&Path>) -> HostPath {
        let mut builder = tempfile::Builder::new();
        builder.prefix("vdt-bench-hostpath-");
        let dir = match parent {
            Some(p) => builder.tempdir_in(p),
            None => builder.tempdir(),
        }
        .unwrap();
        let socket = dir.path().join("csi.sock");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let log = std::fs::File::create(dir.path().join("hostpath.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("-endpoint=unix://{}", socket.display()))
            .arg("-nodeid=vdt-bench-hostpath")
            .arg(format!("-statedir={}", state.display()))
            .arg("-capacity=slow=100Ti")
            .arg("-enable-volume-expansion")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start hostpathplugin");
        let deadline = Instant::now() + Duration::from_secs(30);
        let channel = loop {
            if socket.exists() {
                if let Ok(ch) = virtdisk_csi::csi::channel::connect(&socket).await {
                    // (Its GetPluginInfo fails in builds without a version stamp.)
                    let up = IdentityClient::new(ch.clone())
                        .probe(csi::ProbeRequest {})
                        .await
                        .is_ok();
                    if up {
                        break ch;
                    }
                }
            }
            assert!(Instant::now() < deadline, "hostpathplugin did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        HostPath {
            child,
            _dir: dir,
            state,
            channel,
        }
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    /// The directory of a mount volume.
    fn volume_dir(&self, id: &str) -> PathBuf {
        self.state.join(id)
    }
}

impl Drop for HostPath {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `bytes` into a file of a hostpath volume directory and syncs it.
fn fill_dir(dir: &Path, bytes: u64) {
    let mut f = std::fs::File::create(dir.join("data")).unwrap();
    let chunk = vec![0xaau8; 1 << 20];
    for _ in 0..bytes >> 20 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

fn req(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    create_req(name, bytes)
}

async fn create(c: &mut ControllerClient<Channel>, s: &mut Samples, name: &str) -> String {
    timed(s, c.create_volume(req(name, GIB)))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}"))
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn delete(c: &mut ControllerClient<Channel>, s: &mut Samples, id: &str) {
    timed(
        s,
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("DeleteVolume {id}: {e:?}"));
}

/// Every page of ListVolumes; returns the wall time and how many volumes it saw.
async fn walk(c: &mut ControllerClient<Channel>, page: i32) -> (Duration, usize) {
    let t = Instant::now();
    let mut token = String::new();
    let mut seen = 0;
    loop {
        let r = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: page,
                starting_token: token,
            })
            .await
            .expect("ListVolumes")
            .into_inner();
        seen += r.entries.len();
        if r.next_token.is_empty() {
            return (t.elapsed(), seen);
        }
        token = r.next_token;
    }
}

/// Resident memory after registration calls and 2 s idle: "RSS / RssAnon / Pss" and RssAnon.
async fn idle_memory(ch: Channel, pid: u32) -> (String, u64) {
    let _ = IdentityClient::new(ch.clone())
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await;
    let _ = IdentityClient::new(ch.clone())
        .probe(csi::ProbeRequest {})
        .await;
    let _ = ControllerClient::new(ch)
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = memory_of(pid).rss;
    let (anon, _, pss) = breakdown(pid);
    (format!("{} / {} / {}", mib(rss), mib(anon), mib(pss)), anon)
}

fn p50(s: &Samples) -> Duration {
    s.p50().unwrap_or_default()
}

fn ratio(theirs: Duration, ours: Duration) -> Option<f64> {
    (!ours.is_zero()).then(|| theirs.as_secs_f64() / ours.as_secs_f64())
}

pub async fn run(s: &Settings) -> Vec<PeerRow> {
    let Some(bin) = tool() else {
        eprintln!("hostpath: {TOOL} not found (set {TOOL_ENV}); no side-by-side figures");
        return Vec::new();
    };
    eprintln!("hostpath: side by side with {}", bin.display());
    let ours = super::plugin::start(
        "controller",
        "[libvirt]\nenabled = false\n[snapshots]\nmax_chain_depth = 64\n",
        &[],
    )
    .await;
    let theirs = HostPath::start(&bin, None).await;
    let mut rows = Vec::new();

    let (mine, my_anon) = idle_memory(ours.channel.clone(), ours.pid().expect("running")).await;
    let (other, _) = idle_memory(theirs.channel.clone(), theirs.child.id()).await;
    rows.push(
        PeerRow::new("idle memory: RSS / RssAnon / Pss", mine, other)
            .target("RssAnon ≤ 4.0 MiB", my_anon <= 4 << 20)
            .note("freshly started, after GetPluginCapabilities, Probe, ControllerGetCapabilities and 2 s idle"),
    );

    // The floor of a durable create, in this run, on the same file system.
    let floor = floors::durable_write(&ours.data_dir(), 200);

    let (mut a, mut b) = (ours.controller(), theirs.controller());
    let n = s.creates;
    eprintln!("hostpath: {n} CreateVolume and DeleteVolume each, in alternating blocks");
    let [ca, cb, da, db] = creates_and_deletes(&mut a, &mut b, n).await;
    let fl = p50(&floor);
    let create_ok = p50(&ca) <= p50(&cb) * 2 && p50(&ca).as_secs_f64() <= 1.5 * fl.as_secs_f64();
    rows.push(
        PeerRow::new("CreateVolume 1 GiB, p50", ms(p50(&ca)), ms(p50(&cb)))
            .ratio(ratio(p50(&cb), p50(&ca)))
            .target(
                format!("≤ hostpath × 2 and ≤ 1.5 × floor ({})", ms(fl)),
                create_ok,
            )
            .note(format!(
            "{n} calls each; floor: one durable record write (write, fsync, rename, fsync dir), \
             p50 of 200 in this run; p90 ours {} / hostpath {}",
            ms(ca.pct(90.0).unwrap_or_default()),
            ms(cb.pct(90.0).unwrap_or_default())
        )),
    );
    rows.push(
        PeerRow::new("DeleteVolume, p50", ms(p50(&da)), ms(p50(&db)))
            .ratio(ratio(p50(&db), p50(&da)))
            .target("≤ hostpath × 2", p50(&da) <= p50(&db) * 2)
            .note(format!(
                "{n} calls each; p90 ours {} / hostpath {}",
                ms(da.pct(90.0).unwrap_or_default()),
                ms(db.pct(90.0).unwrap_or_default())
            )),
    );
    rows.push(
        PeerRow::new("(floor) durable record write, p50", ms(fl), "–")
            .note("write, fsync, rename, fsync dir: the least a crash-safe create costs here"),
    );
    // What the RPC itself costs (client, socket, HTTP/2, server), with no work behind it.
    let (mut ra, mut rb) = (Samples::default(), Samples::default());
    for _ in 0..n {
        timed(
            &mut ra,
            a.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}),
        )
        .await
        .expect("ControllerGetCapabilities");
        timed(
            &mut rb,
            b.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}),
        )
        .await
        .expect("ControllerGetCapabilities");
    }
    rows.push(
        PeerRow::new(
            "(floor) an RPC with no work: ControllerGetCapabilities, p50",
            ms(p50(&ra)),
            ms(p50(&rb)),
        )
        .ratio(ratio(p50(&rb), p50(&ra)))
        .note(format!(
            "{n} calls each, alternating: the client, the socket, HTTP/2 and the server; part of \
             every figure above"
        )),
    );

    // ListVolumes of the same 1 000 volumes, made through CreateVolume on both.
    let count = s.list_scales.first().copied().unwrap_or(1000);
    eprintln!("hostpath: ListVolumes of {count} volumes");
    let mut sink = Samples::default();
    for i in 0..count {
        let name = format!("peer-list-{i}");
        create(&mut a, &mut sink, &name).await;
        create(&mut b, &mut sink, &name).await;
    }
    // hostpath cannot page (v1.16.1 returns the first page without a next_token), so it lists
    // everything in one call; the plugin is timed both ways.
    let (mut paged, mut whole, mut lb) = (Vec::new(), Vec::new(), Vec::new());
    for pass in 0..4 {
        let (tp, np) = walk(&mut a, s.list_page).await;
        let (tw, nw) = walk(&mut a, 0).await;
        let (tb, nb) = walk(&mut b, 0).await;
        assert_eq!((np, nw, nb), (count, count, count), "volumes listed");
        // The first pass warms caches on both.
        if pass > 0 {
            paged.push(tp);
            whole.push(tw);
            lb.push(tb);
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (paged, whole, lb) = (median(paged), median(whole), median(lb));
    rows.push(
        PeerRow::new(
            format!(
                "ListVolumes, {count} volumes: ours in pages of {}, hostpath in one call; total",
                s.list_page
            ),
            ms(paged),
            ms(lb),
        )
        .ratio(ratio(lb, paged))
        .target(
            "≤ hostpath × 1.5",
            paged.as_secs_f64() <= 1.5 * lb.as_secs_f64(),
        )
        .note(
            "median of 3 walks after a warm-up; hostpath does not page (it returns the first \
             page and no next_token), so it gets max_entries = 0",
        ),
    );
    rows.push(
        PeerRow::new(
            format!("ListVolumes, {count} volumes, both in one call"),
            ms(whole),
            ms(lb),
        )
        .ratio(ratio(lb, whole))
        .note("max_entries = 0; median of 3"),
    );

    // Snapshot, restore and clone of a volume with data.
    let rounds = s.snapshot_rounds.min(5);
    let data = s.snapshot_data;
    eprintln!(
        "hostpath: {rounds} rounds of snapshot, restore, clone with {} MiB",
        data >> 20
    );
    let mut ours_s: [Samples; 3] = Default::default();
    let mut theirs_s: [Samples; 3] = Default::default();
    for r in 0..rounds {
        let (restored, cloned) = round(&mut a, &mut ours_s, r, |id| {
            fill(&image_of(&ours, id), data)
        })
        .await;
        assert!(reads_back(&image_of(&ours, &restored), 0));
        assert!(reads_back(&image_of(&ours, &cloned), 0));
        let (restored, cloned) = round(&mut b, &mut theirs_s, r, |id| {
            fill_dir(&theirs.volume_dir(id), data)
        })
        .await;
        for id in [&restored, &cloned] {
            let len = std::fs::metadata(theirs.volume_dir(id).join("data")).map(|m| m.len());
            assert_eq!(len.ok(), Some(data), "hostpath {id} holds the data");
        }
    }
    for (i, what) in [
        "CreateSnapshot",
        "restore: CreateVolume from snapshot",
        "clone: CreateVolume from volume",
    ]
    .iter()
    .enumerate()
    {
        let (x, y) = (p50(&ours_s[i]), p50(&theirs_s[i]));
        rows.push(
            PeerRow::new(
                format!("{what}, {} MiB written, p50", data >> 20),
                ms(x),
                ms(y),
            )
            .ratio(ratio(y, x))
            .target("faster than hostpath", x < y)
            .note(format!("{rounds} rounds each")),
        );
    }
    rows
}

/// One round on one driver: a source volume filled by `fill`, then CreateSnapshot, a restore
/// and a clone, each timed into `s`; returns the restored and the cloned volume.
async fn round(
    c: &mut ControllerClient<Channel>,
    s: &mut [Samples; 3],
    r: usize,
    fill: impl Fn(&str),
) -> (String, String) {
    let src = create(c, &mut Samples::default(), &format!("peer-src-{r}")).await;
    fill(&src);
    let snap = snapshot(c, &mut s[0], &format!("peer-snap-{r}"), &src).await;
    let restored = from(
        c,
        &mut s[1],
        &format!("peer-restore-{r}"),
        from_snapshot(&snap),
    )
    .await;
    let cloned = from(c, &mut s[2], &format!("peer-clone-{r}"), from_volume(&src)).await;
    (restored, cloned)
}

async fn snapshot(
    c: &mut ControllerClient<Channel>,
    s: &mut Samples,
    name: &str,
    source: &str,
) -> String {
    timed(
        s,
        c.create_snapshot(csi::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("CreateSnapshot {name}: {e:?}"))
    .into_inner()
    .snapshot
    .unwrap()
    .snapshot_id
}

async fn from(
    c: &mut ControllerClient<Channel>,
    s: &mut Samples,
    name: &str,
    source: Source,
) -> String {
    timed(s, c.create_volume(create_from_req(name, GIB, source)))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}"))
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// `n` CreateVolume (1 GiB) and `n` DeleteVolume on each of `a` (the plugin) and `b`
/// (hostpath), in alternating blocks. Returns their latencies: creates of a, of b, deletes of
/// a, of b.
pub async fn creates_and_deletes(
    a: &mut ControllerClient<Channel>,
    b: &mut ControllerClient<Channel>,
    n: usize,
) -> [Samples; 4] {
    let (mut ca, mut cb, mut da, mut db) = Default::default();
    // Blocks rather than single calls: a commit's fsync flushes the file system's journal,
    // which would otherwise carry the other driver's last writes too.
    let block = (n / 4).max(1);
    for round in 0..n.div_ceil(block) {
        let names: Vec<String> = (round * block..((round + 1) * block).min(n))
            .map(|i| format!("peer-{i}"))
            .collect();
        let mut ours = Vec::new();
        for name in &names {
            ours.push(create(a, &mut ca, name).await);
        }
        for id in &ours {
            delete(a, &mut da, id).await;
        }
        let mut theirs = Vec::new();
        for name in &names {
            theirs.push(create(b, &mut cb, name).await);
        }
        for id in &theirs {
            delete(b, &mut db, id).await;
        }
    }
    [ca, cb, da, db]
}
