//! A real Nomad agent (1.1.0, `../shared/tools/nomad`) drives the plugin, through the `nomad`
//! CLI and the HTTP API, with the files users paste from `nomad-jobs/`: the plugin jobs run
//! under raw_exec on this host (their Nomad 1.1 variants, `nomad-jobs/nomad-1.1/`), volumes
//! are created from the volume specs, and `exec` tasks (user `nobody`) claim them, write, stop
//! and read back. After every stop, nothing of the volume is left on the host (claim, mount,
//! loop device, storage daemon). A claimed volume is snapshotted while its task writes, and
//! the monolith is restarted the ways Nomad restarts a task while a task writes through it.
//!
//! Required in CI (`CI` set): without root, FUSE, loop devices, qemu-storage-daemon, busybox
//! or the nomad binary the tests fail there, and say SKIPPED elsewhere.
//!
//! Duration (~40 s for the four tests, which share one agent and run at the same time): it is
//! Nomad's, not the plugin's. The agent is ready in ~2 s; each plugin job becomes healthy ~6 s
//! after it starts (Nomad probes a new plugin's socket at once, then every 5 s); the restart
//! test waits for the job's restart delay (5 s) after the SIGKILL and for Nomad 1.1's node
//! connection to recover (a few seconds, see the test). A claim takes 0.3-0.9 s from `job run`
//! to a running task, a release 0.1-0.3 s from `job stop`; the live snapshot and its restore
//! add ~2 s to the monolith test, which ends before the restart test. The agent config makes
//! exec tasks start in milliseconds instead of ~12 s (a busybox chroot instead of copying /usr).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use virtdisk_test_support::nomad_agent::{self, host, repo, step, Agent, Deployment, NODE_NAME};

/// The plugin binary cargo built, for the jobs' `binary` variable.
fn plugin_bin() -> String {
    virtdisk_test_support::plugin::bin().display().to_string()
}

/// The monolith job (Nomad 1.1 variant) with no configuration at all: the plugin runs on its
/// embedded default (one pool `default` under its data dir), plugin id hv1-virtdisk.
fn monolith(agent: &Agent) -> Arc<Deployment> {
    monolith_as(agent, &format!("{NODE_NAME}-virtdisk"), "virtdisk-local")
}

/// A monolith of the same file with another plugin id (a second job, as for a second host),
/// with its data in `<run dir>/<data>`.
fn monolith_as(agent: &Agent, plugin_id: &str, data: &str) -> Arc<Deployment> {
    agent.deployment(plugin_id, |a| {
        let data_dir = a.dir.path().join(data);
        let port = nomad_agent::free_port().to_string();
        a.run_job(
            &repo().join("nomad-jobs/nomad-1.1/plugin-monolith.nomad.hcl"),
            &[
                ("host", NODE_NAME),
                ("plugin_id", plugin_id),
                ("binary", &plugin_bin()),
                ("data_dir", &data_dir.display().to_string()),
                ("nomad_data_dir", &a.data_dir.display().to_string()),
                ("metrics_port", &port),
            ],
        );
        wait_healthy(a, plugin_id);
        let dir = a.plugin_dir("monolith", plugin_id);
        Deployment {
            controller_socket: dir.join("csi.sock"),
            node_dir: dir,
            plugin_id: plugin_id.to_string(),
            jobs: vec![format!("plugin-{plugin_id}")],
        }
    })
}

/// The controller and node jobs (Nomad 1.1 variants), plugin id `virtdisk`, both on this
/// host: the controller attaches locally (no VMs here) and has a small capped pool for the
/// refusals.
fn controller_and_node(agent: &Agent) -> Arc<Deployment> {
    agent.deployment("controller+node", |a| {
        let data_dir = a.dir.path().join("virtdisk-controller");
        let config = format!(
            "[node]\n\
             # This host is the node: ControllerPublish attaches here (qemu-storage-daemon + loop).\n\
             local_attach = true\n\
             [libvirt]\n\
             enabled = false\n\
             [[pool]]\n\
             name = \"default\"\n\
             path = \"{d}/pools/default\"\n\
             [[pool]]\n\
             name = \"small\"\n\
             path = \"{d}/pools/small\"\n\
             capacity_bytes = 1073741824\n",
            d = data_dir.display()
        );
        let nomad_data_dir = a.data_dir.display().to_string();
        let port = nomad_agent::free_port().to_string();
        a.run_job(
            &repo().join("nomad-jobs/nomad-1.1/plugin-controller.nomad.hcl"),
            &[
                ("binary", &plugin_bin()),
                ("config", &config),
                ("data_dir", &data_dir.display().to_string()),
                ("nomad_data_dir", &nomad_data_dir),
                ("metrics_port", &port),
                ("controller_count", "1"),
            ],
        );
        a.run_job(
            &repo().join("nomad-jobs/nomad-1.1/plugin-node.nomad.hcl"),
            &[("binary", &plugin_bin()), ("nomad_data_dir", &nomad_data_dir)],
        );
        wait_healthy(a, "virtdisk");
        Deployment {
            controller_socket: a.plugin_dir("controller", "virtdisk").join("csi.sock"),
            node_dir: a.plugin_dir("node", "virtdisk"),
            plugin_id: "virtdisk".into(),
            jobs: vec![
                "plugin-virtdisk-controller".into(),
                "plugin-virtdisk-node".into(),
            ],
        }
    })
}

fn wait_healthy(a: &Agent, plugin_id: &str) {
    a.wait_for(
        &format!("plugin {plugin_id} healthy (controller 1/1, node 1/1)"),
        Duration::from_secs(90),
        || match a.plugin_health(plugin_id) {
            Ok((1, 1)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    a.nomad_ok(&["plugin", "status", plugin_id]);
}

/// A volume spec from `nomad-jobs/` with attributes set, written below the run's dir: each
/// `(key, value)` sets the first `key = …` line to `key = "value"` (ids made unique,
/// placeholders filled); a key `+name` adds `name = "value"` to the `parameters` block.
fn spec(agent: &Agent, file: &str, set: &[(&str, &str)]) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("nomad-jobs").join(file)).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for (key, value) in set {
        if let Some(name) = key.strip_prefix('+') {
            let at = lines
                .iter()
                .position(|l| l.trim_start().starts_with("parameters {"))
                .unwrap_or_else(|| panic!("{file} has no parameters block"));
            lines.insert(at + 1, format!("  {name} = \"{value}\""));
            continue;
        }
        let line = lines
            .iter_mut()
            .find(|l| {
                let t = l.trim_start();
                t.strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with('='))
            })
            .unwrap_or_else(|| panic!("{file} sets no {key}"));
        let indent = &line[..line.len() - line.trim_start().len()];
        *line = format!("{indent}{key} = \"{value}\"");
    }
    let path = agent.dir.path().join(format!("{}-{file}", unique()));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn unique() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("s{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The API body of `nomad volume register` for a volume spec of the shape of
/// volume-register.hcl (top-level `key = "value"` lines, capability and mount_options blocks),
/// plus the top-level modes Nomad 1.1.0 checks.
fn register_body(spec: &str) -> serde_json::Value {
    let mut top = serde_json::Map::new();
    let mut caps = Vec::new();
    let mut mount = serde_json::Map::new();
    let mut block = "";
    let mut cap = serde_json::Map::new();
    for line in spec.lines().map(|l| l.split('#').next().unwrap().trim()) {
        if let Some(name) = line.strip_suffix('{').map(str::trim) {
            block = if name == "capability" {
                "capability"
            } else {
                "mount_options"
            };
            continue;
        }
        if line == "}" {
            if block == "capability" {
                caps.push(serde_json::Value::Object(std::mem::take(&mut cap)));
            }
            block = "";
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match (block, k.trim()) {
            ("capability", "access_mode") => drop(cap.insert("AccessMode".into(), v.into())),
            ("capability", "attachment_mode") => {
                drop(cap.insert("AttachmentMode".into(), v.into()))
            }
            ("mount_options", "fs_type") => drop(mount.insert("FSType".into(), v.into())),
            ("", k) => drop(top.insert(k.to_string(), v.into())),
            _ => {}
        }
    }
    let first = caps.first().cloned().expect("a capability block");
    serde_json::json!({"Volumes": [{
        "ID": top["id"], "Name": top["name"], "PluginID": top["plugin_id"],
        "ExternalID": top["external_id"], "Type": "csi",
        "RequestedCapabilities": caps, "MountOptions": mount,
        "AccessMode": first["AccessMode"], "AttachmentMode": first["AttachmentMode"],
    }]})
}

/// A volume Nomad knows: its Nomad id and the plugin's id (`<pool>.<key>`).
struct Vol {
    id: String,
    external_id: String,
}

impl Vol {
    fn get(agent: &Agent, id: &str) -> Vol {
        let v = agent.get(&format!("/v1/volume/csi/{id}")).expect("volume");
        Vol {
            id: id.to_string(),
            external_id: v["ExternalID"].as_str().expect("ExternalID").to_string(),
        }
    }

    fn key(&self) -> &str {
        self.external_id.rsplit_once('.').expect("<pool>.<key>").1
    }
}

/// `nomad volume create FILE`; the volume (its id from the spec).
fn create(agent: &Agent, file: &std::path::Path, id: &str) -> Vol {
    let out = agent.nomad_ok(&["volume", "create", &file.display().to_string()]);
    assert!(out.contains(&format!("with ID {id}")), "{out}");
    let vol = Vol::get(agent, id);
    assert!(
        out.contains(&format!("Created external volume {}", vol.external_id)),
        "{out}"
    );
    vol
}

/// A spec of `nomad-jobs/` with its id and name set to `id` and `set` applied (as [`spec`]).
fn spec_as(agent: &Agent, file: &str, id: &str, set: &[(&str, &str)]) -> PathBuf {
    let mut all = vec![("id", id), ("name", id)];
    all.extend_from_slice(set);
    spec(agent, file, &all)
}

/// [`create`] from [`spec_as`].
fn create_as(agent: &Agent, file: &str, id: &str, set: &[(&str, &str)]) -> Vol {
    create(agent, &spec_as(agent, file, id, set), id)
}

/// `nomad job stop` of a consumer job, then [`assert_released`] of its volume.
fn stop_and_release(agent: &Agent, dep: &Deployment, job: &str, vol: &Vol) {
    agent.stop_job(job);
    assert_released(agent, dep, vol);
}

/// `nomad volume delete`: the plugin deletes the image (its ListVolumes no longer has it).
fn delete(agent: &Agent, dep: &Deployment, vol: &Vol) {
    assert!(dep.volume_ids().contains(&vol.external_id));
    agent.nomad_ok(&["volume", "delete", &vol.id]);
    assert!(
        !dep.volume_ids().contains(&vol.external_id),
        "{} is still in the pool",
        vol.external_id
    );
}

/// Whether `vol` is released (as [`assert_released`]) within `timeout`.
fn released_within(agent: &Agent, dep: &Deployment, vol: &Vol, timeout: Duration) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < timeout {
        if leftovers(agent, dep, vol).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// What is left of `vol`: Nomad's claims on it, and on the host its mounts, loop device and
/// storage daemon.
fn leftovers(agent: &Agent, dep: &Deployment, vol: &Vol) -> Vec<String> {
    let dirs = [dep.node_dir.clone(), agent.dir.path().to_path_buf()];
    let mut left = host::leftovers(vol.key(), &vol.id, &dirs);
    match agent.get(&format!("/v1/volume/csi/{}", vol.id)) {
        Ok(v) => {
            let claims = ["ReadAllocs", "WriteAllocs"]
                .iter()
                .map(|k| v[k].as_object().map_or(0, |m| m.len()))
                .sum::<usize>();
            if claims > 0 {
                left.push(format!("{claims} claim(s) in Nomad"));
            }
        }
        Err(e) => left.push(e),
    }
    left
}

/// Waits until Nomad has released every claim on `vol` (its ControllerUnpublish answered)
/// and nothing of it is left on the host: no mount of its disk or below Nomad's directories
/// for it, no loop device, no storage daemon.
fn assert_released(agent: &Agent, dep: &Deployment, vol: &Vol) {
    agent.wait_for(
        &format!(
            "volume {} released (no claim, mount, loop device or daemon)",
            vol.id
        ),
        Duration::from_secs(60),
        || {
            let left = leftovers(agent, dep, vol);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    );
}

/// How a consumer job claims its volume.
#[derive(Clone, Copy, PartialEq)]
enum Claim {
    Write,
    ReadOnly,
    Block,
}

/// A service job whose `exec` task (user nobody) claims `volume` at /data (a block volume at
/// /dev/xvdz) and runs `script`, then waits to be stopped.
fn consumer_job(job: &str, volume: &str, claim: Claim, script: &str) -> String {
    // A signal handler, so that the stop does not wait for kill_timeout (the shell is pid 1
    // of the task's pid namespace: without a handler it ignores SIGINT).
    let script = format!("{script}\ntrap 'exit 0' INT TERM\nsleep 3600 & wait\n");
    job_hcl(job, "service", volume, claim, &script)
}

/// The same as a batch job: the allocation ends when `script` does.
fn batch_job(job: &str, volume: &str, claim: Claim, script: &str) -> String {
    job_hcl(job, "batch", volume, claim, script)
}

fn job_hcl(job: &str, kind: &str, volume: &str, claim: Claim, script: &str) -> String {
    let (access, attachment, ro) = match claim {
        Claim::Write => ("single-node-writer", "file-system", false),
        Claim::ReadOnly => ("single-node-reader-only", "file-system", true),
        Claim::Block => ("single-node-writer", "block-device", false),
    };
    let dest = if claim == Claim::Block {
        "/dev/xvdz"
    } else {
        "/data"
    };
    let quoted = serde_json::to_string(&script)
        .unwrap()
        .replace("${", "$${")
        .replace("%{", "%%{");
    format!(
        r#"job "{job}" {{
  datacenters = ["dc1"]
  type        = "{kind}"
  group "app" {{
    volume "data" {{
      type            = "csi"
      source          = "{volume}"
      access_mode     = "{access}"
      attachment_mode = "{attachment}"
      read_only       = {ro}
    }}
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    reschedule {{
      attempts  = 0
      unlimited = false
    }}
    task "app" {{
      driver = "exec"
      volume_mount {{
        volume      = "data"
        destination = "{dest}"
        read_only   = {ro}
      }}
      config {{
        command = "/bin/sh"
        args    = ["-c", {quoted}]
      }}
      resources {{
        cpu    = 50
        memory = 32
      }}
    }}
  }}
}}
"#
    )
}

/// Runs a consumer job and waits for its task to run; the allocation id.
fn run_consumer(agent: &Agent, job: &str, volume: &str, claim: Claim, script: &str) -> String {
    agent.run_job_text(job, &consumer_job(job, volume, claim, script));
    agent.wait_running(job)
}

/// The host path where the plugin published `vol` for `alloc`: what Nomad binds into the
/// task (`<plugin dir>/per-alloc/<alloc>/<volume>/<usage>`).
fn target_on_host(dep: &Deployment, alloc: &str, vol: &Vol) -> PathBuf {
    let dir = dep.node_dir.join("per-alloc").join(alloc).join(&vol.id);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.pop().unwrap()
}

/// The snapshot `nomad volume snapshot create` of `vol` made, from its output: its whole id,
/// from the API's list. The CLI shows 12 characters of the id (Nomad 1.1); `nomad volume
/// snapshot list -plugin P` of Nomad 1.1 refuses to run once two plugins exist ("Prefix
/// matched multiple plugins", nomad#12194): the API lists them.
fn snapshot_listed(agent: &Agent, dep: &Deployment, vol: &Vol, out: &str) -> String {
    let snaps = agent
        .get(&format!("/v1/volumes/snapshot?plugin_id={}", dep.plugin_id))
        .unwrap();
    let ids: Vec<&str> = snaps["Snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["ExternalSourceVolumeID"] == vol.external_id.as_str())
        .filter_map(|s| s["ID"].as_str())
        .collect();
    ids.iter()
        .find(|id| out.contains(&id[..12]))
        .unwrap_or_else(|| panic!("no snapshot of {} listed ({ids:?}) is in: {out}", vol.id))
        .to_string()
}

/// `snapshot` of the deployment's plugin restored with volume-from-snapshot.hcl as volume `id`,
/// claimed (writer) by the consumer job `<id>-reader` running `script`: the volume and the
/// running allocation.
fn restore_and_claim(
    agent: &Agent,
    dep: &Deployment,
    snapshot: &str,
    id: &str,
    script: &str,
) -> (Vol, String) {
    let vol = create_as(
        agent,
        "volume-from-snapshot.hcl",
        id,
        &[("plugin_id", &dep.plugin_id), ("snapshot_id", snapshot)],
    );
    let alloc = run_consumer(
        agent,
        &format!("{id}-reader"),
        &vol.id,
        Claim::Write,
        script,
    );
    (vol, alloc)
}

/// A task script that appends `line N` (N = 1, 2, …) to /data/seq every `interval` seconds,
/// syncs the file and prints `ack N` (`error at N` when the append or the sync failed), until
/// the task is stopped.
fn appender(interval: &str) -> String {
    format!(
        "trap 'exit 0' INT TERM\n\
         i=1\n\
         while :; do\n\
           if echo \"line $i\" >> /data/seq && sync -d /data/seq; then echo \"ack $i\"; else echo \"error at $i\"; fi\n\
           i=$((i+1)); sleep {interval}\n\
         done"
    )
}

/// The last line the [`appender`] task of `alloc` acknowledged (0: none yet); panics if it
/// saw an error.
fn last_ack(agent: &Agent, alloc: &str) -> i64 {
    let out = agent.task_stdout(alloc, "app");
    assert!(!out.contains("error"), "the writer saw an error:\n{out}");
    out.lines()
        .filter_map(|l| l.strip_prefix("ack ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// A task script that reads /data/seq (as the [`appender`] writes it) and prints `bad line
/// N: …` for the first line that is not `line N` (torn, missing, out of order), then
/// `lines <count>`.
const SEQ_CHECK: &str = "awk '$0 != \"line \" NR { print \"bad line \" NR \": \" $0; exit 1 } \
                         END { print \"lines \" NR }' /data/seq";

/// The monolith with no config: an ext4 volume from volume-local.hcl is claimed by a writer
/// (the task's file is read on the host through the plugin's mount, and a file the host
/// writes there is read by the task), snapshotted with the CLI while the writer appends and
/// syncs a line every 100 ms (the restore, claimed by a second job, holds a complete prefix of
/// the lines; the writer goes on), released, read back by a third job, claimed read-only
/// (writes refused), snapshotted unclaimed and restored; an xfs and a block volume; every
/// volume deleted. After every stop nothing of the volume is left on the host.
#[test]
fn monolith_lifecycle_with_volume_local_hcl() {
    let Some(agent) = Agent::shared() else { return };
    let dep = monolith(&agent);

    step("volume-local.hcl: ext4, 10-20 GiB, root owned by nobody, embedded default pool");
    let vol = create_as(&agent, "volume-local.hcl", "local-fs", &[]);
    assert!(
        vol.external_id.starts_with("default."),
        "{}",
        vol.external_id
    );
    let v = agent.get("/v1/volume/csi/local-fs").unwrap();
    assert_eq!(v["Context"]["pool"], "default", "{v}");
    assert_eq!(v["Context"]["format"], "qcow2", "{v}");

    step("a writer task (nobody: the volume's rootUid) and the host see the same files, both ways");
    let token = format!("token-{}", std::process::id());
    // Then the task appends `line N` (N = 1, 2, …) to /data/seq every 100 ms, syncs it and
    // prints `ack N`, until it is stopped.
    let alloc = run_consumer(
        &agent,
        "local-writer",
        &vol.id,
        Claim::Write,
        &format!(
            "id; echo {token} > /data/from-task && sync && echo wrote\n\
             until [ -f /data/from-host ]; do sleep 0.1; done; echo \"host says $(cat /data/from-host)\"\n\
             {}",
            appender("0.1")
        ),
    );
    agent.wait_line(&alloc, "app", "wrote");
    let target = target_on_host(&dep, &alloc, &vol);
    assert_eq!(
        std::fs::read_to_string(target.join("from-task"))
            .unwrap()
            .trim(),
        token,
        "the plugin's mount on the host holds what the task wrote"
    );
    std::fs::write(target.join("from-host"), "hello from the host\n").unwrap();
    assert_eq!(
        agent.wait_line(&alloc, "app", "host says"),
        "hello from the host"
    );
    assert!(agent
        .task_stdout(&alloc, "app")
        .contains("uid=65534(nobody)"));

    step("snapshot create (CLI) of the claimed volume while its task appends and syncs a line every 100 ms");
    let acked = |agent: &Agent| last_ack(agent, &alloc);
    agent.wait_line(&alloc, "app", "ack 5");
    let acked_before = acked(&agent);
    let out = agent.nomad_ok(&["volume", "snapshot", "create", "local-fs", "local-live"]);
    let acked_after = acked(&agent);
    let live_snap = snapshot_listed(&agent, &dep, &vol, &out);
    // The plugin's account of the cut: the host froze the file system around it.
    let plugin_alloc = agent.allocs(&dep.jobs[0])[0]["ID"]
        .as_str()
        .unwrap()
        .to_string();
    // Its stderr reaches Nomad's log a moment after the RPC answered.
    let cut = agent.wait_for("the plugin logged the cut", Duration::from_secs(10), || {
        let log = agent.get_text(&format!(
            "/v1/client/fs/logs/{plugin_alloc}?task=plugin&type=stderr&origin=start&offset=0&plain=true"
        ))?;
        log.lines()
            .rfind(|l| l.contains("live snapshot cut"))
            .map(str::to_string)
            .ok_or(format!("no live cut in:\n{log}"))
    });
    assert!(cut.contains("application-consistent"), "{cut}");
    step(format!(
        "snapshot {live_snap} cut between ack {acked_before} and ack {acked_after}: {cut}"
    ));
    step("restore it with volume-from-snapshot.hcl; a second job reads it");
    let (live_restored, reader) = restore_and_claim(
        &agent,
        &dep,
        &live_snap,
        "local-live-restored",
        &format!(
            "{SEQ_CHECK}\n\
             if [ -z \"$(tail -c 1 /data/seq)\" ]; then echo 'end: newline'; else echo 'end: torn'; fi\n\
             echo \"read $(cat /data/from-task)\""
        ),
    );
    assert_eq!(agent.wait_line(&reader, "app", "read"), token);
    let out = agent.task_stdout(&reader, "app");
    let lines: i64 = agent.wait_line(&reader, "app", "lines").parse().unwrap();
    assert!(!out.contains("bad line"), "{out}");
    assert_eq!(agent.wait_line(&reader, "app", "end:"), "newline", "{out}");
    // Every line acknowledged before the request is in the snapshot; none written after it
    // returned (the line being written then may or may not be).
    assert!(
        (acked_before..=acked_after + 1).contains(&lines),
        "the snapshot holds lines 1..={lines}, acknowledged {acked_before} before it and {acked_after} after it"
    );
    step(format!(
        "the restored volume holds lines 1..={lines}, complete and consecutive; the writer goes on"
    ));
    agent.wait_for("the writer goes on", Duration::from_secs(30), || {
        let now = acked(&agent);
        (now >= acked_after + 10)
            .then_some(())
            .ok_or(format!("acked {now}, {acked_after} at the snapshot"))
    });
    stop_and_release(&agent, &dep, "local-live-restored-reader", &live_restored);
    agent.nomad_ok(&["volume", "snapshot", "delete", &dep.plugin_id, &live_snap]);
    stop_and_release(&agent, &dep, "local-writer", &vol);
    let last = acked(&agent);

    step(format!(
        "a second job reads the data back (and every acknowledged line, 1..={last})"
    ));
    let alloc = run_consumer(
        &agent,
        "local-reader",
        &vol.id,
        Claim::Write,
        &format!("{SEQ_CHECK}\necho \"read $(cat /data/from-task)\""),
    );
    assert_eq!(agent.wait_line(&alloc, "app", "read"), token);
    let out = agent.task_stdout(&alloc, "app");
    let lines: i64 = agent.wait_line(&alloc, "app", "lines").parse().unwrap();
    assert!(!out.contains("bad line"), "{out}");
    assert!(lines >= last, "{lines} lines, {last} acknowledged");
    stop_and_release(&agent, &dep, "local-reader", &vol);

    step("a read-only claim reads and cannot write");
    let alloc = run_consumer(
        &agent,
        "local-ro-reader",
        &vol.id,
        Claim::ReadOnly,
        "echo \"read $(cat /data/from-task)\"\n\
         if echo x > /data/ro-probe; then echo 'write: accepted'; else echo 'write: refused'; fi 2>&1\n\
         grep ' /data ' /proc/mounts | sed 's/^/mount: /'",
    );
    assert_eq!(agent.wait_line(&alloc, "app", "read"), token);
    assert_eq!(agent.wait_line(&alloc, "app", "write:"), "refused");
    let out = agent.task_stdout(&alloc, "app");
    assert!(out.contains("Read-only file system"), "{out}");
    // volume-local.hcl's mount_options reach the mount: ext4, noatime, and ro for this claim.
    let mount = agent.wait_line(&alloc, "app", "mount:");
    assert!(
        mount.contains(" ext4 ro,") && mount.contains("noatime"),
        "{mount}"
    );
    stop_and_release(&agent, &dep, "local-ro-reader", &vol);

    step("snapshot create / list (CLI), restore with volume-from-snapshot.hcl, delete");
    let out = agent.nomad_ok(&["volume", "snapshot", "create", "local-fs", "local-snap"]);
    let snap_id = snapshot_listed(&agent, &dep, &vol, &out);
    let (restored, alloc) = restore_and_claim(
        &agent,
        &dep,
        &snap_id,
        "local-restored",
        "echo \"read $(cat /data/from-task)\"",
    );
    assert_eq!(agent.wait_line(&alloc, "app", "read"), token);
    stop_and_release(&agent, &dep, "local-restored-reader", &restored);
    agent.nomad_ok(&["volume", "snapshot", "delete", &dep.plugin_id, &snap_id]);

    step("xfs (300 MiB, the least mkfs.xfs takes)");
    let xfs = create_as(
        &agent,
        "volume-local.hcl",
        "local-xfs",
        &[
            ("capacity_min", "300MiB"),
            ("capacity_max", "1GiB"),
            ("fs_type", "xfs"),
        ],
    );
    let alloc = run_consumer(
        &agent,
        "local-xfs-user",
        &xfs.id,
        Claim::Write,
        "grep ' /data ' /proc/mounts | sed 's/^/mount: /'",
    );
    let mount = agent.wait_line(&alloc, "app", "mount:");
    assert!(mount.contains(" xfs "), "{mount}");
    stop_and_release(&agent, &dep, "local-xfs-user", &xfs);

    step("a block volume: the task sees the volume's block device");
    let block_spec = agent.dir.path().join("local-block.hcl");
    std::fs::write(
        &block_spec,
        format!(
            "id = \"local-block\"\nname = \"local-block\"\ntype = \"csi\"\n\
             plugin_id = \"{}\"\ncapacity_min = \"64MiB\"\ncapacity_max = \"64MiB\"\n\
             capability {{\n  access_mode = \"single-node-writer\"\n  attachment_mode = \"block-device\"\n}}\n",
            dep.plugin_id
        ),
    )
    .unwrap();
    let block = create(&agent, &block_spec, "local-block");
    let alloc = run_consumer(
        &agent,
        "local-block-user",
        &block.id,
        Claim::Block,
        "ls -l /dev/xvdz | sed 's/^/device: /'",
    );
    let device = agent.wait_line(&alloc, "app", "device:");
    let loops = host::loop_devices_of(block.key());
    assert_eq!(loops.len(), 1, "{loops:?}");
    // `ls -l` of a device: "brw------- 1 root root 7, 1 <date> /dev/xvdz".
    let words: Vec<&str> = device.split_whitespace().collect();
    let major = words.iter().position(|w| w.ends_with(','));
    let seen = major.map(|i| format!("{}:{}", words[i].trim_end_matches(','), words[i + 1]));
    assert!(device.starts_with('b'), "{device} is not a block device");
    assert_eq!(
        seen.as_deref(),
        Some(host::dev_numbers(&loops[0]).as_str()),
        "{device} is not {}",
        loops[0]
    );
    stop_and_release(&agent, &dep, "local-block-user", &block);

    step("volume delete: the plugin deletes the images");
    for v in [&vol, &live_restored, &restored, &xfs, &block] {
        delete(&agent, &dep, v);
    }
}

/// The controller and node jobs with the files as users paste them: volume.hcl as it is, the
/// example job (twice: the second run finds the first's data), a snapshot created, listed
/// and restored with volume-from-snapshot.hcl, a volume deregistered and registered again with
/// volume-register.hcl, `nomad volume detach` of what Nomad 1.1 leaves attached, and
/// `nomad volume delete`.
#[test]
fn controller_and_node_jobs_with_the_example_files() {
    let Some(agent) = Agent::shared() else { return };
    let dep = controller_and_node(&agent);

    step("volume.hcl as it is (id pgdata, parameters, topology_request)");
    let vol = create(&agent, &repo().join("nomad-jobs/volume.hcl"), "pgdata");

    step("example-job.nomad.hcl (exec, user nobody), twice: the second run finds the first's line");
    let example = repo().join("nomad-jobs/example-job.nomad.hcl");
    let mut lines = Vec::new();
    for run in 1..=2 {
        agent.run_job(&example, &[("datacenters", "[\"dc1\"]")]);
        let alloc = agent.wait_running("virtdisk-example");
        lines = agent.wait_for(
            &format!("run {run} of the example printed its log"),
            Duration::from_secs(30),
            || {
                let out = agent.task_stdout(&alloc, "app");
                let lines: Vec<String> = out.lines().map(str::to_string).collect();
                if lines.len() == run {
                    Ok(lines)
                } else {
                    Err(format!("stdout: {out:?}"))
                }
            },
        );
        stop_and_release(&agent, &dep, "virtdisk-example", &vol);
    }

    step("snapshot create (API: Nomad 1.1.0's CLI sends it to the first plugin by id) / list");
    // `nomad volume snapshot create` of Nomad 1.1.0-1.1.12 sends no plugin id and the server
    // takes the first plugin whose id starts with "" (here hv1-virtdisk, nomad#12195); the
    // API takes the plugin id.
    let created = agent
        .put(
            "/v1/volumes/snapshot",
            &serde_json::json!({"Snapshots": [{
                "SourceVolumeID": "pgdata", "Name": "pgdata-snap", "PluginID": "virtdisk"
            }]}),
        )
        .unwrap();
    let snap_id = created["Snapshots"][0]["ID"]
        .as_str()
        .expect("snapshot id")
        .to_string();
    assert_eq!(
        created["Snapshots"][0]["ExternalSourceVolumeID"],
        vol.external_id.as_str()
    );
    let listed = agent
        .get("/v1/volumes/snapshot?plugin_id=virtdisk")
        .unwrap();
    assert!(listed.to_string().contains(&snap_id), "{listed}");
    let restored = spec(
        &agent,
        "volume-from-snapshot.hcl",
        &[("snapshot_id", &snap_id)],
    );
    let restored = create(&agent, &restored, "pgdata-restored");
    let alloc = run_consumer(
        &agent,
        "restored-reader",
        &restored.id,
        Claim::Write,
        "sed 's/^/restored: /' /data/starts.log",
    );
    agent.wait_line(&alloc, "app", "restored:");
    let out = agent.task_stdout(&alloc, "app");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("restored: ")).count(),
        lines.len(),
        "{out}"
    );
    stop_and_release(&agent, &dep, "restored-reader", &restored);
    agent.nomad_ok(&["volume", "snapshot", "delete", "virtdisk", &snap_id]);
    let snaps = agent
        .get("/v1/volumes/snapshot?plugin_id=virtdisk")
        .unwrap();
    assert!(
        !snaps.to_string().contains(&snap_id),
        "the snapshot is still listed: {snaps}"
    );

    step("deregister keeps the volume in the pool; volume-register.hcl brings it back");
    agent.nomad_ok(&["volume", "deregister", "pgdata-restored"]);
    assert!(agent.get("/v1/volume/csi/pgdata-restored").is_err());
    assert!(dep.volume_ids().contains(&restored.external_id));
    let register = spec(
        &agent,
        "volume-register.hcl",
        &[
            ("id", "pgdata-again"),
            ("name", "pgdata-again"),
            ("external_id", &restored.external_id),
        ],
    );
    // `nomad volume register` of Nomad 1.1.0 cannot register a volume: it validates the
    // top-level access and attachment modes, which its CLI never fills (nomad#10703, fixed in
    // 1.1.1). The file's content goes through the API, with those two fields added, as the
    // file's header says.
    let body = register_body(&std::fs::read_to_string(&register).unwrap());
    agent.put("/v1/volume/csi/pgdata-again", &body).unwrap();
    let again = Vol::get(&agent, "pgdata-again");
    assert_eq!(again.external_id, restored.external_id);

    step("a batch job that ends by itself: Nomad 1.1 leaves the volume attached; nomad volume detach");
    agent.run_job_text(
        "batch-reader",
        &batch_job(
            "batch-reader",
            &again.id,
            Claim::Write,
            "cat /data/starts.log",
        ),
    );
    agent.wait_ended("batch-reader", "complete");
    let node = agent.node_id();
    agent.wait_for("claims released", Duration::from_secs(30), || {
        let v = agent.get("/v1/volume/csi/pgdata-again")?;
        let claims = v["WriteAllocs"].as_object().map_or(0, |m| m.len())
            + v["ReadAllocs"].as_object().map_or(0, |m| m.len());
        (claims == 0)
            .then_some(())
            .ok_or(format!("{claims} claims"))
    });
    let attached = host::loop_devices_of(again.key());
    step(format!(
        "after the batch allocation: loop devices {attached:?} (Nomad 1.1.0 sends no ControllerUnpublish, nomad#14484)"
    ));
    agent.nomad_ok(&["volume", "detach", "pgdata-again", &node]);
    assert_released(&agent, &dep, &again);

    step("volume delete: both volumes leave the pool");
    for v in [&vol, &again] {
        delete(&agent, &dep, v);
    }
}

/// What an operator gets for wrong input: a message that names the problem, from the CLI.
#[test]
fn wrong_inputs_name_the_problem() {
    let Some(agent) = Agent::shared() else { return };
    let dep = controller_and_node(&agent);
    let bad = |name: &str, set: &[(&str, &str)]| {
        let file = spec_as(&agent, "volume.hcl", name, set);
        agent.nomad_err(&["volume", "create", &file.display().to_string()])
    };

    step("capacity_min > capacity_max");
    let out = bad("bad-range", &[("capacity_min", "30GiB")]);
    assert!(
        out.contains("LimitBytes cannot be less than RequiredBytes"),
        "{out}"
    );

    step("an unknown parameter");
    let out = bad("bad-param", &[("+speed", "fast")]);
    assert!(
        out.contains("unknown parameter \\\"speed\\\"")
            || out.contains("unknown parameter \"speed\""),
        "{out}"
    );
    assert!(out.contains("InvalidArgument"), "{out}");

    step("more than the pool holds (pool small: capacity_bytes 1 GiB)");
    let out = bad("bad-size", &[("pool", "small")]);
    assert!(out.contains("small"), "{out}");
    assert!(
        out.contains("ResourceExhausted") || out.contains("OutOfRange"),
        "{out}"
    );

    step("xfs on 64 MiB: the claim fails with the plugin's reason");
    let tiny = create_as(
        &agent,
        "volume.hcl",
        "tiny-xfs",
        &[
            ("capacity_min", "64MiB"),
            ("capacity_max", "64MiB"),
            ("fs_type", "xfs"),
        ],
    );
    agent.run_job_text(
        "tiny-xfs-user",
        &consumer_job("tiny-xfs-user", &tiny.id, Claim::Write, "echo never"),
    );
    let events = agent.wait_ended("tiny-xfs-user", "failed");
    assert!(events.contains("too small for xfs"), "{events}");
    assert!(events.contains("300 MiB"), "{events}");
    // Nomad 1.1.0 does not unpublish a volume whose claim failed (nomad#14484): detach it.
    agent.nomad_ok(&["job", "stop", "-purge", "tiny-xfs-user"]);
    agent.nomad_ok(&["volume", "detach", &tiny.id, &agent.node_id()]);
    assert_released(&agent, &dep, &tiny);
    delete(&agent, &dep, &tiny);
}

/// The monolith restarted the ways Nomad restarts a task (`nomad alloc restart`: its executor
/// stops the whole task cgroup; a crash: SIGKILL, then Nomad starts it again after the job's
/// restart delay) while an exec task writes and syncs a line every 50 ms: the task never sees
/// an error, its storage daemon is the same process throughout, every acknowledged line reads
/// back afterwards, and the release after the restarts leaves nothing behind.
#[test]
fn monolith_restarts_keep_a_claimed_volume_working() {
    let Some(agent) = Agent::shared() else { return };
    // Its own monolith: the restarts must not disturb the other tests' claims.
    let dep = monolith_as(&agent, "survivor-virtdisk", "virtdisk-survivor");
    let vol = create_as(
        &agent,
        "volume-local.hcl",
        "local-survivor",
        &[
            ("plugin_id", "survivor-virtdisk"),
            ("capacity_min", "64MiB"),
            ("capacity_max", "64MiB"),
        ],
    );
    let alloc = run_consumer(
        &agent,
        "local-survivor-writer",
        &vol.id,
        Claim::Write,
        &appender("0.05"),
    );
    let acked = |agent: &Agent| last_ack(agent, &alloc);
    agent.wait_line(&alloc, "app", "ack 10");
    let daemon = || host::processes_with(&["qemu-storage-daemon", vol.key()]);
    let daemons = daemon();
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    let plugin_data = agent.dir.path().join("virtdisk-survivor");
    let plugin_data = plugin_data.display().to_string();
    let plugin_pid = || {
        host::processes_with(&["virtdisk-csi", "--mode monolith", &plugin_data])
            .first()
            .map(|(pid, _)| *pid)
    };
    let plugin_alloc = agent.allocs(&dep.jobs[0])[0]["ID"]
        .as_str()
        .unwrap()
        .to_string();

    for how in ["nomad alloc restart", "SIGKILL"] {
        let before = plugin_pid().expect("the plugin runs");
        let acked_before = acked(&agent);
        step(format!(
            "{how} of the plugin (pid {before}) while the task writes (acked {acked_before})"
        ));
        if how == "SIGKILL" {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(before),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        } else {
            agent.nomad_ok(&["alloc", "restart", &plugin_alloc, "plugin"]);
        }
        let after =
            agent.wait_for(
                "the plugin runs again",
                Duration::from_secs(60),
                || match plugin_pid() {
                    Some(pid) if pid != before => Ok(pid),
                    other => Err(format!("plugin pid {other:?}")),
                },
            );
        // Nomad's view of the plugin lags (its probe runs every 30 s): ask the plugin itself.
        // Nomad 1.1 does not retry a NodeUnpublish that found the plugin restarting, so a task
        // stopped in that window keeps its claim until the claim GC or `nomad volume detach`.
        agent.wait_for(
            "the restarted plugin answers",
            Duration::from_secs(60),
            || dep.answers(),
        );
        // The task wrote on while the plugin was down and after it came back.
        agent.wait_for("the task writes on", Duration::from_secs(30), || {
            let now = acked(&agent);
            (now >= acked_before + 40)
                .then_some(())
                .ok_or(format!("acked {now}, was {acked_before}"))
        });
        assert_eq!(
            daemon(),
            daemons,
            "the storage daemon changed across the restart"
        );
        step(format!(
            "plugin is pid {after}; storage daemon {:?} unchanged",
            daemons[0].0
        ));
    }

    agent.stop_job("local-survivor-writer");
    let last = acked(&agent);
    // Nomad 1.1 keeps one gRPC connection per node plugin: after the plugin went away it
    // reconnects with a growing backoff, and an RPC made meanwhile fails at once ("connection
    // refused") and is not retried before the claim GC (5 min). Then `nomad volume detach`
    // (retried until Nomad's connection is back) has the restarted plugin release it.
    let released = released_within(&agent, &dep, &vol, Duration::from_secs(5));
    if !released {
        step("Nomad 1.1's NodeUnpublish hit its stale connection: nomad volume detach");
        let node = agent.node_id();
        agent.wait_for("nomad volume detach", Duration::from_secs(90), || {
            let out = agent.nomad(&["volume", "detach", &vol.id, &node]);
            out.status
                .success()
                .then_some(())
                .ok_or(nomad_agent::text(&out))
        });
    }
    assert_released(&agent, &dep, &vol);

    step(format!("every acknowledged line reads back (1..={last})"));
    let alloc = run_consumer(
        &agent,
        "local-survivor-reader",
        &vol.id,
        Claim::ReadOnly,
        SEQ_CHECK,
    );
    let lines: i64 = agent.wait_line(&alloc, "app", "lines").parse().unwrap();
    let out = agent.task_stdout(&alloc, "app");
    assert!(!out.contains("bad line"), "{out}");
    assert!(lines >= last, "{lines} lines, {last} acknowledged");
    stop_and_release(&agent, &dep, "local-survivor-reader", &vol);
    delete(&agent, &dep, &vol);
}
