//! Attached volumes outlive the plugin (issue 13), and a dead attachment is never reported
//! healthy (issue 12 §5). A monolith with local attach on this host, against the real things:
//! qemu-storage-daemon, loop devices, FUSE, ext4, cgroup v1 freezer (or cgroup v2 `cgroup.kill`).
//!
//! The plugin runs in a cgroup the test made (as Nomad's executor or a container runtime runs
//! a task). A consumer process writes and fsyncs records through the published volume the whole
//! time, while the plugin is SIGKILLed, then its process group, then every process of its
//! cgroup: after each kill a new plugin takes the attachment over, and at the end every record
//! the consumer saw acknowledged reads back and cleanup leaves nothing behind. The consumer runs
//! as `nobody` (the user Nomad's `exec` driver runs tasks as): the volume's `rootUid`/`rootGid`
//! parameters give it the fresh file system's root; another test gives a group access through
//! `volume_mount_group` (Kubernetes fsGroup). Needs root.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtdisk_test_support::local_attach::*;
use virtdisk_test_support::prelude::*;

/// The storage daemons' cgroup of this test run, relative to each hierarchy's root.
fn daemon_cgroup() -> String {
    format!("virtdisk-test/daemons-{}", std::process::id())
}

/// The plugin's config: short device wait, and the daemons' cgroup in the hierarchies a CO
/// kills by (the machine's memory cgroup belongs to the sandbox and stays untouched).
fn config() -> String {
    format!(
        "[node]\ndevice_wait_secs = 2\ndaemon_cgroup = \"{}\"\n\
         daemon_cgroup_hierarchies = [\"freezer\", \"pids\", \"unified\", \"\"]\n",
        daemon_cgroup()
    )
}

const ROOT: &str = "/sys/fs/cgroup";

/// A cgroup the test puts the plugin in, one per hierarchy that a CO kills by: the v1 freezer
/// (Nomad, runc) and pids hierarchies and the v2 unified one (or a pure v2 root).
struct TaskCgroup {
    dirs: Vec<PathBuf>,
}

impl TaskCgroup {
    fn create(name: &str) -> Option<TaskCgroup> {
        let v2_root = Path::new(ROOT).join("cgroup.controllers").exists();
        let parents: Vec<PathBuf> = if v2_root {
            vec![PathBuf::from(ROOT)]
        } else {
            ["freezer", "pids", "unified"]
                .iter()
                .map(|h| Path::new(ROOT).join(h))
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        };
        let dirs: Vec<PathBuf> = parents.iter().map(|p| p.join(name)).collect();
        for d in &dirs {
            std::fs::create_dir_all(d).ok()?;
        }
        let me = TaskCgroup { dirs };
        (me.freezer().is_some() || me.v2().is_some()).then_some(me)
    }

    fn freezer(&self) -> Option<&PathBuf> {
        self.dirs.iter().find(|d| d.join("freezer.state").exists())
    }

    fn v2(&self) -> Option<&PathBuf> {
        self.dirs.iter().find(|d| d.join("cgroup.kill").exists())
    }

    /// Puts a running process in the task's cgroups.
    fn enter(&self, pid: u32) {
        for d in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string()).unwrap();
        }
    }

    fn pids(&self) -> Vec<i32> {
        let d = self.freezer().or(self.v2()).unwrap();
        std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process in the cgroup the way Nomad's executor does (freeze, SIGKILL each
    /// pid, thaw), or by `cgroup.kill` on cgroup v2; returns the pids it killed.
    fn kill_all(&self) -> Vec<i32> {
        let killed;
        if let Some(f) = self.freezer() {
            std::fs::write(f.join("freezer.state"), "FROZEN").unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(f.join("freezer.state"))
                .unwrap()
                .trim()
                != "FROZEN"
            {
                assert!(Instant::now() < deadline, "the freezer did not freeze");
                std::thread::sleep(Duration::from_millis(10));
            }
            killed = self.pids();
            for pid in &killed {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::fs::write(f.join("freezer.state"), "THAWED").unwrap();
        } else {
            killed = self.pids();
            std::fs::write(self.v2().unwrap().join("cgroup.kill"), "1").unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pids().is_empty() {
            assert!(
                Instant::now() < deadline,
                "processes survived the cgroup kill"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        killed
    }
}

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        if !self.pids().is_empty() {
            self.kill_all();
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Removes this run's (empty) daemon cgroups.
fn remove_daemon_cgroups() {
    for (_, h) in hierarchies() {
        // Busy while another test of this run still has daemons there: it removes them.
        let _ = std::fs::remove_dir(h.join(daemon_cgroup()));
        let _ = std::fs::remove_dir(h.join("virtdisk-test"));
    }
}

fn hierarchies() -> Vec<(String, PathBuf)> {
    if Path::new(ROOT).join("cgroup.controllers").exists() {
        return vec![(String::new(), PathBuf::from(ROOT))];
    }
    std::fs::read_dir(ROOT)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect()
}

/// A process that appends a numbered record to `file`, fsyncs it, and only then prints the
/// number (its acknowledgement), until SIGTERM. Any I/O error ends it with a traceback.
struct Consumer {
    child: Child,
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

const CONSUMER: &str = r#"
import os, signal, sys, time
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = 0
while not stop:
    n += 1
    os.write(fd, b"record %08d\n" % n)
    os.fsync(fd)
    print(n, flush=True)
    time.sleep(0.005)
print("done", flush=True)
"#;

impl Consumer {
    /// Starts writing `file`, as `uid`:`gid` when given.
    fn start(file: &Path, ids: Option<(u32, u32)>) -> Consumer {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("python3");
        cmd.args(["-c", CONSUMER])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = ids {
            // As root, std drops the supplementary groups too.
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("python3");
        let out = child.stdout.take().unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let a = acked.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let line = line.unwrap();
                if let Ok(n) = line.trim().parse::<u64>() {
                    a.lock().unwrap().push((n, Instant::now()));
                }
            }
        });
        Consumer {
            child,
            acked,
            reader: Some(reader),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.lock().unwrap().last().map_or(0, |(n, _)| *n)
    }

    /// Waits until the consumer acknowledged `more` records beyond now (it is alive and its
    /// I/O works); panics with its stderr if it stopped.
    fn wait_for_progress(&mut self, more: u64) {
        let want = self.acked() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked() < want {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!(
                    "the consumer stopped ({status}) after {}: {err}",
                    self.acked()
                );
            }
            assert!(Instant::now() < deadline, "the consumer made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it (SIGTERM between records); returns the last acknowledged record and the
    /// longest pause between two acknowledgements.
    fn stop(mut self) -> (u64, Duration) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let out = self.child.wait_with_output().unwrap();
        self.reader.take().unwrap().join().unwrap();
        assert!(
            out.status.success(),
            "the consumer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let acked = self.acked.lock().unwrap().clone();
        assert!(
            acked.iter().map(|(n, _)| *n).eq(1..=acked.len() as u64),
            "acknowledgements out of order"
        );
        let longest = acked
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default();
        (acked.len() as u64, longest)
    }
}

/// Every record 1..=n is in the file, in order (and nothing else).
fn assert_records(file: &Path, n: u64) {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, n, "records in {}", file.display());
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("record {:08}", i + 1));
    }
}

async fn volume_condition(env: &Env, vol: &csi::Volume) -> csi::VolumeCondition {
    let got = env
        .plugin
        .controller()
        .volume(&vol.volume_id)
        .await
        .unwrap();
    got.status.unwrap().volume_condition.unwrap()
}

async fn listed_condition(env: &Env, vol: &csi::Volume) -> csi::VolumeCondition {
    let entry = env
        .plugin
        .controller()
        .all_volumes()
        .await
        .into_iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == vol.volume_id)
        .unwrap();
    entry.status.unwrap().volume_condition.unwrap()
}

/// After a kill: a new plugin (in the task cgroup again) takes the attachment over.
async fn restart_and_take_over(
    env: &mut Env,
    task: &TaskCgroup,
    vol: &csi::Volume,
    cap: &csi::VolumeCapability,
    ctx: &std::collections::BTreeMap<String, String>,
    daemon: i32,
    how: &str,
) {
    assert_eq!(
        env.daemon_pid(vol),
        Some(daemon),
        "{how}: the storage daemon died with the plugin"
    );
    let adopted_before = env.plugin.log().matches("adopted a storage daemon").count();
    let started = Instant::now();
    env.plugin.restart_in_own_group().await;
    let serving = started.elapsed();
    task.enter(env.plugin.pid().unwrap());
    assert!(
        env.plugin.log().matches("adopted a storage daemon").count() > adopted_before,
        "{how}: the new plugin did not adopt the daemon:\n{}",
        env.plugin.log()
    );
    assert_eq!(&env.controller_publish(vol, cap, false).await, ctx, "{how}");
    for c in [
        volume_condition(env, vol).await,
        listed_condition(env, vol).await,
    ] {
        assert!(!c.abnormal, "{how}: {}", c.message);
    }
    eprintln!(
        "{how}: plugin killed, daemon {daemon} kept serving, new plugin took over (serving \
         {} ms after its start)",
        serving.as_millis()
    );
}

/// `nobody`/`nogroup` on Debian, and the user Nomad's `exec` driver runs tasks as.
const NOBODY: u32 = 65534;
const NOBODY_S: &str = "65534";

/// CreateVolume (32 MiB… 64 MiB) with parameters.
async fn create_with(
    env: &Env,
    tag: &str,
    cap: csi::VolumeCapability,
    parameters: &[(&str, &str)],
) -> csi::Volume {
    let mut req = create_req(&unique(tag), 64 * MIB);
    req.volume_capabilities = vec![cap];
    req.parameters = params(parameters);
    env.plugin.controller().create(req).await.unwrap()
}

/// SIGKILL of the plugin, of its process group, of its whole cgroup, while a consumer writes:
/// no I/O error, every acknowledged write reads back, and cleanup afterwards is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_volumes_survive_killing_the_plugin_its_group_and_its_cgroup() {
    if !can_run() {
        return;
    }
    let Some(task) = TaskCgroup::create(&format!("virtdisk-test/task-{}", std::process::id()))
    else {
        eprintln!("SKIPPED: no cgroup v1 freezer and no cgroup v2 cgroup.kill here");
        return;
    };
    let mut env = Env::start(&config()).await;
    env.plugin.restart_in_own_group().await;
    task.enter(env.plugin.pid().unwrap());

    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    // Owned by nobody from the first format: the consumer below runs as nobody.
    let vol = create_with(
        &env,
        "survive",
        cap.clone(),
        &[("rootUid", NOBODY_S), ("rootGid", NOBODY_S)],
    )
    .await;
    let ctx = env.controller_publish(&vol, &cap, false).await;
    let s = env.staging("survive");
    let t = env.target("survive-alloc");
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    let daemon = env.daemon_pid(&vol).expect("storage daemon");
    // The daemon left the plugin's cgroups: it is in its own in every hierarchy a CO kills by.
    let cgroups = std::fs::read_to_string(format!("/proc/{daemon}/cgroup")).unwrap();
    for line in cgroups
        .lines()
        .filter(|l| l.contains(":freezer:") || l.contains(":pids:") || l.starts_with("0::"))
    {
        assert!(line.ends_with(&daemon_cgroup()), "{line}");
    }
    assert!(!task.pids().contains(&daemon));

    let file = Path::new(&t).join("records");
    let root = std::fs::metadata(&t).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((root.uid(), root.gid()), (NOBODY, NOBODY));
    let mut consumer = Consumer::start(&file, Some((NOBODY, NOBODY)));
    consumer.wait_for_progress(20);

    // 1. SIGKILL of the plugin alone.
    env.plugin.kill();
    consumer.wait_for_progress(20);
    restart_and_take_over(&mut env, &task, &vol, &cap, &ctx, daemon, "SIGKILL").await;
    consumer.wait_for_progress(20);

    // 2. SIGKILL of its whole process group (the plugin leads one, as a CO starts it).
    let pgid = nix::unistd::Pid::from_raw(env.plugin.pid().unwrap() as i32);
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
    env.plugin.reap();
    consumer.wait_for_progress(20);
    restart_and_take_over(&mut env, &task, &vol, &cap, &ctx, daemon, "process group").await;
    consumer.wait_for_progress(20);

    // 3. Every process of its cgroup (Nomad's executor: freeze, SIGKILL each pid, thaw).
    let killed = task.kill_all();
    assert!(killed.contains(&(env.plugin.pid().unwrap() as i32)));
    env.plugin.reap();
    consumer.wait_for_progress(20);
    restart_and_take_over(&mut env, &task, &vol, &cap, &ctx, daemon, "cgroup").await;
    consumer.wait_for_progress(20);

    let stats = env.stats(&vol, &t, &s).await.unwrap();
    assert!(!stats.volume_condition.unwrap().abnormal);
    let (n, longest) = consumer.stop();
    eprintln!(
        "the consumer wrote and fsynced {n} records across three plugin kills; longest pause \
         between two acknowledgements: {} ms",
        longest.as_millis()
    );
    assert_records(&file, n);

    // Cleanup as usual: nothing left (daemon, loop device, FUSE mount).
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    env.finish(&vol).await;
    assert_eq!(env.daemon_pid(&vol), None);
    // The records survived in the image: stage it again and read them back.
    drop(task);
    remove_daemon_cgroups();
}

/// Issue 12 §5: the plugin AND its storage daemon are SIGKILLed under a staged, published
/// volume. The restarted plugin never calls the dead attachment healthy: ControllerPublish
/// refuses (in use) and says what to do, every condition is abnormal, node RPCs refuse to use
/// it; once it is unpublished and unstaged on the node, ControllerPublish attaches it afresh
/// and the data written before reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_attachment_is_never_reported_healthy_and_is_repaired_when_unused() {
    if !can_run() {
        return;
    }
    let mut env = Env::start(&config()).await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vol = env.create(&unique("dead"), 32 * MIB, cap.clone()).await;
    let ctx = env.controller_publish(&vol, &cap, false).await;
    let s = env.staging("dead");
    let t = env.target("dead-alloc");
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    write_file(&t, "before", b"written before the crash");

    env.plugin.kill();
    let daemon = env.daemon_pid(&vol).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while env.daemon_pid(&vol).is_some() {
        std::thread::sleep(Duration::from_millis(10));
    }
    env.plugin.restart().await;

    // In use: an error that says what to do, never OK with a dead devicePath.
    let err = env
        .plugin
        .controller()
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: env.node_id.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    for word in ["dead", "NodeUnstageVolume", &s] {
        assert!(err.message().contains(word), "{word}: {}", err.message());
    }
    for c in [
        volume_condition(&env, &vol).await,
        listed_condition(&env, &vol).await,
        env.stats(&vol, &t, &s)
            .await
            .unwrap()
            .volume_condition
            .unwrap(),
    ] {
        assert!(c.abnormal, "reported healthy: {}", c.message);
        eprintln!("abnormal: {}", c.message);
    }
    // Node RPCs refuse to build on it.
    let t2 = env.target("dead-alloc-2");
    let msg = expect_code(
        env.publish(&vol, &s, &t2, &cap, false).await,
        Code::FailedPrecondition,
        "publish on a dead attachment",
    );
    assert!(msg.contains("storage daemon is gone"), "{msg}");

    // Unused now: the next publish attaches it afresh, and it works.
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    let repaired = env.controller_publish(&vol, &cap, false).await;
    assert!(
        repaired["devicePath"].starts_with("/dev/loop"),
        "{repaired:?}"
    );
    assert!(!volume_condition(&env, &vol).await.abnormal);
    assert!(env.plugin.log().contains("dead local attachment repaired"));
    let s = env.staging("dead");
    env.stage(&vol, &repaired, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    assert_eq!(
        std::fs::read(Path::new(&t).join("before")).unwrap(),
        b"written before the crash"
    );
    write_file(&t, "after", b"written after the repair");
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    env.finish(&vol).await;
    remove_daemon_cgroups();
}

/// Writes one file as `uid`:`gid` (no supplementary groups); the error, if any.
fn write_as(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let out = Command::new("sh")
        .args(["-c", "echo data > \"$1\"", "sh"])
        .arg(path)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A fresh volume's root is root-owned 0755: a task running as nobody cannot write. The
/// CO's `volume_mount_group` (Kubernetes fsGroup, VOLUME_MOUNT_GROUP) makes the file system the
/// group's, setgid included, so a member writes and its files keep the group; `rootMode`
/// and a bad group id are checked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_writers_through_fs_group_and_root_owner_parameters() {
    if !can_run() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let env = Env::start(&config()).await;
    let caps = env
        .plugin
        .node()
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(csi::node_service_capability::Type::Rpc(r))
            if r.r#type == csi::node_service_capability::rpc::Type::VolumeMountGroup as i32
    )));
    let mut cap = mount_cap("xfs", Mode::SingleNodeWriter);
    let plain = env
        .create(&unique("owner-plain"), 320 * MIB, cap.clone())
        .await;
    let ctx = env.controller_publish(&plain, &cap, false).await;
    let s = env.staging("owner-plain");
    let t = env.target("owner-plain-alloc");
    env.stage(&plain, &ctx, &s, &cap).await.unwrap();
    env.publish(&plain, &s, &t, &cap, false).await.unwrap();
    let err = write_as(&Path::new(&t).join("x"), NOBODY, NOBODY).unwrap_err();
    assert!(err.contains("Permission denied"), "{err}");
    env.unpublish_twice(&plain, &t).await;
    env.unstage_twice(&plain, &s).await;

    // fsGroup 4242: staged again with the group, a member (uid nobody, gid 4242) writes.
    let Some(csi::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() else {
        unreachable!()
    };
    m.volume_mount_group = "4242".into();
    let s = env.staging("owner-plain");
    env.stage(&plain, &ctx, &s, &cap).await.unwrap();
    env.publish(&plain, &s, &t, &cap, false).await.unwrap();
    let root = std::fs::metadata(&t).unwrap();
    assert_eq!(root.gid(), 4242);
    assert_eq!(root.mode() & 0o2070, 0o2070, "{:o}", root.mode());
    write_as(&Path::new(&t).join("by-member"), NOBODY, 4242).unwrap();
    let f = std::fs::metadata(Path::new(&t).join("by-member")).unwrap();
    assert_eq!(f.gid(), 4242, "setgid: new files keep the group");
    let mut bad = cap.clone();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = bad.access_type.as_mut() {
        m.volume_mount_group = "staff".into();
    }
    let t2 = env.target("owner-plain-bad");
    let msg = expect_code(
        env.publish(&plain, &s, &t2, &bad, false).await,
        Code::InvalidArgument,
        "non-numeric group",
    );
    assert!(msg.contains("volume_mount_group"), "{msg}");
    env.unpublish_twice(&plain, &t).await;
    env.unstage_twice(&plain, &s).await;
    env.finish(&plain).await;

    // rootMode with rootGid on a fresh ext4: the group's members write.
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vol = create_with(
        &env,
        "owner-mode",
        cap.clone(),
        &[("rootGid", "4343"), ("rootMode", "2770")],
    )
    .await;
    assert_eq!(
        vol.volume_context.get("rootMode").map(String::as_str),
        Some("2770")
    );
    let ctx = env.controller_publish(&vol, &cap, false).await;
    let s = env.staging("owner-mode");
    let t = env.target("owner-mode-alloc");
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    let root = std::fs::metadata(&t).unwrap();
    assert_eq!(
        (root.uid(), root.gid(), root.mode() & 0o7777),
        (0, 4343, 0o2770)
    );
    write_as(&Path::new(&t).join("by-group"), NOBODY, 4343).unwrap();
    assert!(write_as(&Path::new(&t).join("by-other"), NOBODY, NOBODY).is_err());
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    env.finish(&vol).await;

    // Bad values are refused at CreateVolume.
    for (k, v) in [
        ("rootUid", "nobody"),
        ("rootMode", "999"),
        ("rootGid", "-1"),
    ] {
        let mut req = create_req(&unique("owner-bad"), 16 * MIB);
        req.parameters = params(&[(k, v)]);
        let err = env
            .plugin
            .controller()
            .create_volume(req)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{k}={v}");
        assert!(err.message().contains(k), "{}", err.message());
    }
    remove_daemon_cgroups();
}
