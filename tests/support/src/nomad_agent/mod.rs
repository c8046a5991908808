//! A real Nomad agent (`nomad agent -dev`, the binary in `../shared/tools/`) for end-to-end
//! tests: its own config file (raw_exec and exec, a temp data_dir, 127.0.0.1, free ports),
//! driven through the `nomad` CLI and the HTTP API, every command printed. One agent serves
//! the tests of a binary that run at the same time (they share it through [`Agent::shared`]);
//! the last one out stops it and removes what the run left below its temp dir.
//!
//! ```ignore
//! let Some(agent) = Agent::shared() else { return };      // SKIPPED (or required in CI)
//! agent.run_job(&repo().join("nomad-jobs/nomad-1.1/plugin-monolith.nomad.hcl"), &vars);
//! agent.wait_for("healthy", Duration::from_secs(60), || agent.plugin_health("hv1-virtdisk")…);
//! agent.nomad_ok(&["volume", "create", "volume-local.hcl"]);
//! let alloc = agent.wait_running("my-job");
//! let line = agent.wait_line(&alloc, "app", "wrote");
//! agent.stop_job("my-job");
//! ```

pub mod host;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The Nomad node name of the agent: the `host` the monolith job is pinned to, as in the
/// examples (`-var host=hv1`, plugin id `hv1-virtdisk`).
pub const NODE_NAME: &str = "hv1";

/// The repository root (the support crate lives in `tests/support`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Nomad CLI and agent: `$VIRTDISK_NOMAD`, `../shared/tools/nomad` or `nomad` on PATH
/// ([`crate::shared_tool`]).
pub fn nomad_binary() -> Option<PathBuf> {
    crate::shared_tool("nomad", "VIRTDISK_NOMAD")
}

/// Whether this host can run the real-Nomad tests; otherwise says why (SKIPPED), or panics
/// when `CI` is set: there the tests are required.
pub fn can_run() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for p in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(p).exists() {
            missing.push(p.to_string());
        }
    }
    for tool in ["qemu-storage-daemon", "busybox", "mkfs.xfs"] {
        if which(tool).is_none() {
            missing.push(tool.to_string());
        }
    }
    if nomad_binary().is_none() {
        missing.push("the nomad binary (../shared/tools/nomad, $VIRTDISK_NOMAD or PATH)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("needs {}", missing.join(", "));
    assert!(
        std::env::var_os("CI").is_none(),
        "the real-Nomad tests are required in CI: {why}"
    );
    println!("SKIPPED: {why}");
    false
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

static STARTED: Mutex<Option<Instant>> = Mutex::new(None);

/// Prints one step of a test, with the time since the first agent started.
pub fn step(what: impl std::fmt::Display) {
    let t0 = *STARTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(Instant::now);
    say(&format!(
        "[nomad-e2e {:>6.1}s] {what}",
        t0.elapsed().as_secs_f64()
    ));
}

/// One line on stdout; a closed stdout (`| head`) must not turn into a panic, least of all
/// in the agent's cleanup.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Starts `cmd` from a thread that lives as long as the test process, with SIGINT as its
/// parent-death signal: if the test process dies without cleaning up (killed, aborted), the
/// agent gets the signal an operator's Ctrl-C sends and stops its allocations.
fn spawn_tied_to_this_process(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let tx = SPAWNER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
            tx
        })
        .clone();
    let (reply, answer) = mpsc::channel();
    tx.send((cmd, reply)).expect("spawner thread");
    answer.recv().expect("spawner thread")
}

/// A port nobody listens on now (the agent binds it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The agent configuration: the things Nomad 1.1 lets a test tune for speed are here.
fn agent_config(dir: &Path, data_dir: &Path, ports: [u16; 3], rootfs: &Path) -> String {
    format!(
        r#"# A private single-node Nomad (server + client) for virtdisk-csi's end-to-end tests.
data_dir  = "{data}"
bind_addr = "127.0.0.1"
name      = "{node}"
log_level = "DEBUG"
ports {{
  http = {http}
  rpc  = {rpc}
  serf = {serf}
}}
client {{
  enabled = true
  # What the job files' constraints look for on hypervisor hosts and VMs.
  meta {{
    virtdisk_hypervisor = "true"
    virtdisk_node       = "true"
  }}
  options {{
    "driver.allowlist" = "raw_exec,exec"
  }}
  # exec builds each task's chroot by copying these: the default (/bin, /lib, /usr, …) takes
  # ~12 s per task here; busybox and the user database take milliseconds.
  chroot_env {{
    "{rootfs}" = "/bin"
    "/etc/passwd" = "/etc/passwd"
    "/etc/group"  = "/etc/group"
  }}
}}
plugin "raw_exec" {{
  config {{
    enabled = true
  }}
}}
# {dir}
"#,
        data = data_dir.display(),
        node = NODE_NAME,
        http = ports[0],
        rpc = ports[1],
        serf = ports[2],
        rootfs = rootfs.display(),
        dir = dir.display(),
    )
}

/// A running `nomad agent -dev` with its own config, data dir and ports.
pub struct Agent {
    child: Mutex<Option<Child>>,
    /// Everything of this run lives below it (the agent's data dir, the plugins' data dirs).
    pub dir: tempfile::TempDir,
    /// The agent's data_dir.
    pub data_dir: PathBuf,
    /// The Nomad CLI.
    pub nomad: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub addr: String,
    /// cgroups below .../nomad that existed before: the others are this run's.
    cgroups_before: Vec<PathBuf>,
    deployments: Mutex<Vec<(String, Arc<Deployment>)>>,
}

static SHARED: Mutex<Weak<Agent>> = Mutex::new(Weak::new());

impl Agent {
    /// The agent the running tests share, started by the first one. None when the host
    /// cannot run it (see [`can_run`]).
    pub fn shared() -> Option<Arc<Agent>> {
        if !can_run() {
            return None;
        }
        let mut g = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = g.upgrade() {
            return Some(a);
        }
        let a = Arc::new(Agent::start());
        *g = Arc::downgrade(&a);
        Some(a)
    }

    fn start() -> Agent {
        let nomad = nomad_binary().expect("nomad binary");
        let version = Command::new(&nomad)
            .arg("version")
            .output()
            .expect("nomad version");
        step(format!(
            "{} ({})",
            String::from_utf8_lossy(&version.stdout).trim(),
            nomad.display()
        ));
        let stale = host::sweep_stale_runs("vdt-nomad-");
        if !stale.is_empty() {
            step(format!("removed what crashed runs left: {stale:?}"));
        }
        let dir = tempfile::Builder::new()
            .prefix("vdt-nomad-")
            .tempdir()
            .expect("tempdir");
        // The task's chroot: busybox as /bin/* (sh, cat, sync …).
        let rootfs = dir.path().join("rootfs/bin");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::copy(which("busybox").unwrap(), rootfs.join("busybox")).unwrap();
        for app in [
            "sh", "cat", "echo", "ls", "id", "sleep", "sync", "touch", "stat", "test", "[", "dd",
            "date", "mkdir", "rm", "grep", "head", "tail", "wc", "true", "false",
        ] {
            std::os::unix::fs::symlink("busybox", rootfs.join(app)).unwrap();
        }
        let data_dir = dir.path().join("nomad");
        let cgroups_before = host::nomad_cgroups();
        let config = dir.path().join("agent.hcl");
        let log_path = dir.path().join("agent.log");
        let mut attempt = 0;
        let (child, addr) = loop {
            attempt += 1;
            let ports = [free_port(), free_port(), free_port()];
            std::fs::write(&config, agent_config(dir.path(), &data_dir, ports, &rootfs)).unwrap();
            let log = std::fs::File::create(&log_path).unwrap();
            let t = Instant::now();
            let mut cmd = Command::new(&nomad);
            cmd.args(["agent", "-dev", "-config"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            let mut child = spawn_tied_to_this_process(cmd).expect("start nomad agent");
            let addr = format!("http://127.0.0.1:{}", ports[0]);
            match wait_ready(&mut child, &addr, Duration::from_secs(60)) {
                Ok(()) => {
                    step(format!(
                        "agent ready at {addr} in {} ms (data_dir {})",
                        t.elapsed().as_millis(),
                        data_dir.display()
                    ));
                    break (child, addr);
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    assert!(attempt < 3, "nomad agent did not start: {e}\n{log}");
                    step(format!("agent did not start ({e}); again with other ports"));
                }
            }
        };
        Agent {
            child: Mutex::new(Some(child)),
            data_dir,
            nomad,
            addr,
            cgroups_before,
            deployments: Mutex::new(Vec::new()),
            dir,
        }
    }

    /// The last `n` lines of the agent's log.
    pub fn agent_log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The client's state_dir: Nomad keeps CSI plugins below `<state_dir>/csi/`.
    pub fn state_dir(&self) -> PathBuf {
        self.data_dir.join("client")
    }

    /// Where Nomad keeps a plugin's staging and per-alloc directories on the host (exactly as
    /// its client does: `<data_dir>/client/csi/<type>/<plugin id>`).
    pub fn plugin_dir(&self, kind: &str, plugin_id: &str) -> PathBuf {
        self.state_dir().join("csi").join(kind).join(plugin_id)
    }

    /// This node's Nomad id.
    pub fn node_id(&self) -> String {
        let nodes = self.get("/v1/nodes").expect("nodes");
        nodes[0]["ID"].as_str().expect("node id").to_string()
    }

    // ---- the CLI ----

    /// `nomad ARGS` against this agent; prints the command line and what it said.
    pub fn nomad(&self, args: &[&str]) -> Output {
        let out = Command::new(&self.nomad)
            .args(args)
            .env("NOMAD_ADDR", &self.addr)
            .env("NOMAD_CLI_NO_COLOR", "1")
            .env_remove("NOMAD_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run nomad");
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains('\n') {
                    format!("'{}…'", a.lines().next().unwrap_or(""))
                } else {
                    a.to_string()
                }
            })
            .collect();
        step(format!("$ nomad {}  [{}]", shown.join(" "), out.status));
        for line in text(&out).lines().filter(|l| !l.trim().is_empty()).take(25) {
            say(&format!("    | {line}"));
        }
        out
    }

    /// `nomad ARGS`, which must succeed; its stdout and stderr. A plugin answer ABORTED
    /// ("an operation on the volume is in progress; retry later") is retried, as an operator
    /// would: Nomad 1.1 sends each ControllerUnpublish twice at once (client and volume
    /// watcher), and the second can still be running when the next command arrives.
    pub fn nomad_ok(&self, args: &[&str]) -> String {
        let mut out = self.nomad(args);
        for _ in 0..10 {
            if out.status.success() || !text(&out).contains("code = Aborted") {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            out = self.nomad(args);
        }
        assert!(
            out.status.success(),
            "nomad {args:?} failed:\n{}\n{}",
            text(&out),
            self.plugin_logs()
        );
        text(&out)
    }

    /// `nomad ARGS`, which must fail; its stdout and stderr.
    pub fn nomad_err(&self, args: &[&str]) -> String {
        let out = self.nomad(args);
        assert!(
            !out.status.success(),
            "nomad {args:?} succeeded:\n{}",
            text(&out)
        );
        text(&out)
    }

    // ---- the HTTP API ----

    /// GET on the HTTP API, as JSON.
    pub fn get(&self, path: &str) -> Result<Value, String> {
        let r = minreq::get(format!("{}{path}", self.addr))
            .with_timeout(10)
            .send()
            .map_err(|e| format!("GET {path}: {e}"))?;
        if r.status_code != 200 {
            return Err(format!(
                "GET {path}: {} {}",
                r.status_code,
                r.as_str().unwrap_or("")
            ));
        }
        r.json().map_err(|e| format!("GET {path}: {e}"))
    }

    /// PUT of a JSON body on the HTTP API; the JSON answer. ABORTED from the plugin is
    /// retried, as in [`Agent::nomad_ok`].
    pub fn put(&self, path: &str, body: &Value) -> Result<Value, String> {
        step(format!("PUT {path} {body}"));
        let mut tries = 0;
        let (status, answer) = loop {
            let r = minreq::put(format!("{}{path}", self.addr))
                .with_timeout(150)
                .with_body(body.to_string())
                .send()
                .map_err(|e| format!("PUT {path}: {e}"))?;
            let answer = r.as_str().unwrap_or("").to_string();
            for line in answer.lines().take(10) {
                say(&format!("    | {line}"));
            }
            tries += 1;
            if r.status_code == 200 || !answer.contains("code = Aborted") || tries > 10 {
                break (r.status_code, answer);
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        if status != 200 {
            return Err(format!("PUT {path}: {status} {answer}"));
        }
        if answer.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&answer).map_err(|e| format!("PUT {path}: {e}: {answer}"))
    }

    /// GET on the HTTP API as plain text (alloc logs).
    pub fn get_text(&self, path: &str) -> Result<String, String> {
        let r = minreq::get(format!("{}{path}", self.addr))
            .with_timeout(10)
            .send()
            .map_err(|e| format!("GET {path}: {e}"))?;
        match r.status_code {
            200 => Ok(r.as_str().unwrap_or("").to_string()),
            code => Err(format!("GET {path}: {code} {}", r.as_str().unwrap_or(""))),
        }
    }

    /// Polls `check` every 100 ms until it answers `Ok`, at most `timeout`; then panics with
    /// its last `Err` and `diag()`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<T, String>,
    ) -> T {
        let t = Instant::now();
        loop {
            match check() {
                Ok(v) => {
                    step(format!("{what}: after {} ms", t.elapsed().as_millis()));
                    return v;
                }
                Err(why) if t.elapsed() > timeout => panic!(
                    "{what}: not after {timeout:?}: {why}\n--- agent log ---\n{}\n{}",
                    self.agent_log_tail(30),
                    self.plugin_logs()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A CSI plugin's health as Nomad sees it: (controllers healthy, nodes healthy).
    pub fn plugin_health(&self, id: &str) -> Result<(u64, u64), String> {
        let p = self.get(&format!("/v1/plugin/csi/{id}"))?;
        Ok((
            p["ControllersHealthy"].as_u64().unwrap_or(0),
            p["NodesHealthy"].as_u64().unwrap_or(0),
        ))
    }

    // ---- jobs and allocations ----

    /// `nomad job run -detach [-var …] FILE`.
    pub fn run_job(&self, file: &Path, vars: &[(&str, &str)]) {
        let mut args: Vec<String> = vec!["job".into(), "run".into(), "-detach".into()];
        for (k, v) in vars {
            args.push("-var".into());
            args.push(format!("{k}={v}"));
        }
        args.push(file.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.nomad_ok(&args);
    }

    /// Writes a job file below the run's temp dir and runs it.
    pub fn run_job_text(&self, name: &str, hcl: &str) {
        let path = self.dir.path().join(format!("{name}.nomad.hcl"));
        std::fs::write(&path, hcl).unwrap();
        self.run_job(&path, &[]);
    }

    /// The allocations of a job (API), newest first.
    pub fn allocs(&self, job: &str) -> Vec<Value> {
        let mut a = self
            .get(&format!("/v1/job/{job}/allocations"))
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        a.sort_by_key(|x| std::cmp::Reverse(x["CreateIndex"].as_u64().unwrap_or(0)));
        a
    }

    /// Waits until `check` accepts the job's newest allocation (API JSON) and its client
    /// status; what it returns.
    pub fn wait_alloc<T>(
        &self,
        job: &str,
        what: &str,
        check: impl Fn(&Value, &str) -> Result<T, String>,
    ) -> T {
        self.wait_for(
            &format!("job {job} {what}"),
            Duration::from_secs(90),
            || {
                let allocs = self.allocs(job);
                let a = allocs.first().ok_or("no allocation yet")?;
                check(a, a["ClientStatus"].as_str().unwrap_or(""))
            },
        )
    }

    /// Waits for the job's newest allocation to run (its tasks started); its id. Panics with
    /// the task events when it fails instead.
    pub fn wait_running(&self, job: &str) -> String {
        self.wait_alloc(job, "running", |a, status| match status {
            "running" => Ok(a["ID"].as_str().unwrap().to_string()),
            "failed" | "lost" => panic!(
                "job {job}: allocation {} {status}: {}\n{}",
                a["ID"],
                task_events(a),
                self.plugin_logs()
            ),
            other => Err(format!("allocation is {other}: {}", task_events(a))),
        })
    }

    /// Waits for the job's newest allocation to end with `status` (complete, failed); the
    /// task events (what Nomad tells the operator).
    pub fn wait_ended(&self, job: &str, status: &str) -> String {
        self.wait_alloc(job, status, |a, now| {
            if now == status {
                Ok(task_events(a))
            } else {
                Err(format!("allocation is {now}: {}", task_events(a)))
            }
        })
    }

    /// A task's stdout so far (API: /v1/client/fs/logs).
    pub fn task_stdout(&self, alloc: &str, task: &str) -> String {
        self.get_text(&format!(
            "/v1/client/fs/logs/{alloc}?task={task}&type=stdout&origin=start&offset=0&plain=true"
        ))
        .unwrap_or_default()
    }

    /// Waits until the task's stdout has a line starting with `prefix`; that line's rest.
    pub fn wait_line(&self, alloc: &str, task: &str, prefix: &str) -> String {
        self.wait_for(
            &format!("task {task} printed {prefix:?}"),
            Duration::from_secs(60),
            || {
                let out = self.task_stdout(alloc, task);
                out.lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .map(|r| r.trim().to_string())
                    .ok_or_else(|| format!("stdout so far: {out:?}"))
            },
        )
    }

    /// `nomad job stop -detach JOB`, then waits until its allocations are terminal.
    pub fn stop_job(&self, job: &str) {
        self.nomad_ok(&["job", "stop", "-detach", job]);
        self.wait_for(
            &format!("job {job} stopped"),
            Duration::from_secs(60),
            || {
                let live: Vec<String> = self
                    .allocs(job)
                    .iter()
                    .filter(|a| matches!(a["ClientStatus"].as_str(), Some("pending" | "running")))
                    .map(|a| a["ID"].as_str().unwrap_or("").to_string())
                    .collect();
                if live.is_empty() {
                    Ok(())
                } else {
                    Err(format!("allocations still live: {live:?}"))
                }
            },
        )
    }

    // ---- plugins ----

    /// Runs the plugin jobs of `name` once per agent (`deploy` runs them and waits for
    /// health); later calls get the same deployment.
    pub fn deployment(
        &self,
        name: &str,
        deploy: impl FnOnce(&Agent) -> Deployment,
    ) -> Arc<Deployment> {
        let mut g = self.deployments.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, d)) = g.iter().find(|(n, _)| n == name) {
            return d.clone();
        }
        let d = Arc::new(deploy(self));
        g.push((name.to_string(), d.clone()));
        d
    }

    /// The last lines of every plugin task's stderr, for failure messages.
    pub fn plugin_logs(&self) -> String {
        let mut out = String::new();
        for (name, d) in self
            .deployments
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
        {
            for job in &d.jobs {
                for a in self.allocs(job).iter().take(1) {
                    let id = a["ID"].as_str().unwrap_or("");
                    let log = self
                        .get_text(&format!(
                            "/v1/client/fs/logs/{id}?task=plugin&type=stderr&origin=end&offset=6000&plain=true"
                        ))
                        .unwrap_or_default();
                    out.push_str(&format!("--- {name}: {job} ({id}) stderr ---\n{log}\n"));
                }
            }
        }
        out
    }
}

/// Plugin jobs running on the agent.
pub struct Deployment {
    /// The CSI plugin id volumes name.
    pub plugin_id: String,
    /// The jobs that run it.
    pub jobs: Vec<String>,
    /// Nomad's host directories of its node part (staging/, per-alloc/).
    pub node_dir: PathBuf,
    /// The controller's socket (Nomad 1.1 keeps it in the plugin's directory).
    pub controller_socket: PathBuf,
}

impl Deployment {
    /// Whether the plugin answers Probe on its controller socket now (the built-in client,
    /// `virtdisk-csi client identity probe`): Nomad's own view of a plugin's health lags by
    /// up to 30 s.
    pub fn answers(&self) -> Result<(), String> {
        let out = Command::new(crate::plugin::bin())
            .args(["client", "--timeout", "2", "--endpoint"])
            .arg(format!("unix://{}", self.controller_socket.display()))
            .args(["identity", "probe"])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(text(&out))
        }
    }

    /// The plugin's volume ids, asked through its controller socket with the built-in client
    /// (`virtdisk-csi client volume list --all`).
    pub fn volume_ids(&self) -> Vec<String> {
        let out = Command::new(crate::plugin::bin())
            .args(["client", "--endpoint"])
            .arg(format!("unix://{}", self.controller_socket.display()))
            .args(["-o", "json", "volume", "list", "--all"])
            .output()
            .expect("virtdisk-csi client");
        assert!(out.status.success(), "volume list: {}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["volume"]["volume_id"].as_str().map(str::to_string))
            .collect()
    }
}

/// Waits until the agent's node is ready with exec and raw_exec healthy.
fn wait_ready(child: &mut Child, addr: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the agent exited: {status}"));
        }
        let ready = minreq::get(format!("{addr}/v1/nodes"))
            .with_timeout(5)
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .and_then(|nodes| {
                let node = nodes.as_array()?.first()?.clone();
                let drivers = &node["Drivers"];
                (node["Status"] == "ready"
                    && drivers["exec"]["Healthy"] == true
                    && drivers["raw_exec"]["Healthy"] == true)
                    .then_some(())
            });
        if ready.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not ready after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A finished command's stdout and stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The task events of an allocation (API JSON), oldest first, for messages.
pub fn task_events(alloc: &Value) -> String {
    let mut out = Vec::new();
    if let Some(states) = alloc["TaskStates"].as_object() {
        for (task, st) in states {
            for e in st["Events"].as_array().into_iter().flatten() {
                let msg = [
                    e["DisplayMessage"].as_str(),
                    e["SetupError"].as_str(),
                    e["DriverError"].as_str(),
                ]
                .into_iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
                out.push(format!(
                    "{task}: {}: {msg}",
                    e["Type"].as_str().unwrap_or("")
                ));
            }
        }
    }
    out.join("\n")
}

impl Drop for Agent {
    /// Stops the jobs (consumers first, so the plugins still serve their unpublish), then the
    /// agent (SIGINT; a -dev agent destroys its allocations), then removes what is left below
    /// the run's temp dir and the cgroups the run created.
    fn drop(&mut self) {
        let t = Instant::now();
        let plugin_jobs: Vec<String> = self
            .deployments
            .lock()
            .map(|g| g.iter().flat_map(|(_, d)| d.jobs.clone()).collect())
            .unwrap_or_default();
        if let Ok(jobs) = self.get("/v1/jobs") {
            let consumers: Vec<String> = jobs
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|j| j["ID"].as_str().map(str::to_string))
                .filter(|id| !plugin_jobs.contains(id))
                .collect();
            for job in &consumers {
                let _ = self.nomad(&["job", "stop", "-detach", "-purge", job]);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline
                && consumers.iter().any(|j| {
                    self.allocs(j)
                        .iter()
                        .any(|a| matches!(a["ClientStatus"].as_str(), Some("pending" | "running")))
                })
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let left = host::sweep(self.dir.path());
        let cgroups = host::remove_new_cgroups(&self.cgroups_before);
        step(format!(
            "agent stopped in {} ms; swept {} leftover(s){}{}",
            t.elapsed().as_millis(),
            left.len(),
            if left.is_empty() {
                String::new()
            } else {
                format!(": {left:?}")
            },
            if cgroups.is_empty() {
                String::new()
            } else {
                format!("; cgroups still busy: {cgroups:?}")
            },
        ));
    }
}
