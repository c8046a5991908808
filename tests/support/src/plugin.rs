//! The plugin under test: the real `virtdisk-csi` binary serving on a unix socket in a temp dir,
//! with its data dir there too, talked to over gRPC as a CO would.
//!
//! ```ignore
//! let p = Plugin::start("controller", &[]).await;                  // defaults, debug logs
//! let p = Plugin::start_with_config("monolith", "[node]\n…", &[]).await;  // `{dir}` = temp dir
//! let mut p = Plugin::launch("controller")                         // everything else
//!     .config("[libvirt]\ndetach_timeout_secs = 2\n")
//!     .env(&[("RUST_LOG", "trace")])
//!     .readable_by_qemu()                                          // for libvirt hot-plug
//!     .start()
//!     .await;
//! p.kill(); p.restart().await;                                     // a crash, then a new start
//! ```
//!
//! The process is killed when the `Plugin` is dropped (also when the test failed); its stderr
//! and stdout go to `<dir>/plugin.log` ([`Plugin::log`]).

use crate::csi;
use csi::{
    controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    identity_client::IdentityClient, node_client::NodeClient,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The plugin binary cargo built for this test or bench run (`CARGO_BIN_EXE_virtdisk-csi`,
/// which cargo sets when it runs tests and benches; else the binary next to the test's own
/// `deps/` directory).
pub fn bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_virtdisk-csi") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut dir = exe.parent().expect("the test binary's dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("virtdisk-csi")
}

/// How to start a plugin: built by [`Plugin::launch`], run by [`Launch::start`].
#[derive(Debug, Clone)]
pub struct Launch {
    mode: String,
    config: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// `RUST_LOG` of the process; `None`: unset (the production default, `info`).
    rust_log: Option<String>,
    bin: PathBuf,
    dir_prefix: String,
    /// Where the temp dir is made (`None`: the system's temp dir).
    dir_parent: Option<PathBuf>,
    /// The socket path (`None`: `<dir>/csi.sock`).
    socket: Option<PathBuf>,
    readable_by_qemu: bool,
    /// The plugin leads a process group of its own (as a CO's executor starts a task).
    own_process_group: bool,
    poll: Duration,
    timeout: Duration,
}

impl Launch {
    /// A config file (TOML) written to `<dir>/config.toml` and passed with `--config`; `{dir}`
    /// in it stands for the temp dir.
    pub fn config(mut self, toml: &str) -> Launch {
        self.config = Some(toml.to_string());
        self
    }

    /// More command line arguments after `serve --mode … --endpoint … --data-dir …`.
    pub fn args(mut self, args: &[&str]) -> Launch {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Environment variables of the first process only: [`Plugin::restart`] starts the same
    /// command line without them (e.g. `VIRTDISK_FAILPOINT`, `RUST_LOG=trace`).
    pub fn env(mut self, env: &[(impl AsRef<str>, impl AsRef<str>)]) -> Launch {
        self.env.extend(
            env.iter()
                .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string())),
        );
        self
    }

    /// Runs as production would: `RUST_LOG` unset (tests run with `debug`).
    pub fn production(mut self) -> Launch {
        self.rust_log = None;
        self
    }

    /// Another build of the plugin (default: [`bin`]).
    pub fn bin(mut self, bin: &Path) -> Launch {
        self.bin = bin.to_path_buf();
        self
    }

    /// The temp dir's name prefix (default `.tmp`, tempfile's own).
    pub fn dir_prefix(mut self, prefix: &str) -> Launch {
        self.dir_prefix = prefix.to_string();
        self
    }

    /// Makes the temp dir (socket, data dir, pool) under `parent` instead of the system's temp
    /// dir: e.g. on another file system.
    pub fn in_dir(mut self, parent: &Path) -> Launch {
        self.dir_parent = Some(parent.to_path_buf());
        self
    }

    /// Serves on `path` instead of `<dir>/csi.sock`: e.g. a socket file another process left.
    pub fn socket(mut self, path: &Path) -> Launch {
        self.socket = Some(path.to_path_buf());
        self
    }

    /// Makes the temp dir 0755 so libvirt's QEMU reaches the pool images below it (for
    /// hot-plug into KVM domains).
    pub fn readable_by_qemu(mut self) -> Launch {
        self.readable_by_qemu = true;
        self
    }

    /// How often to poll for the first answer (default 20 ms), and for how long at most
    /// (default 30 s): the resolution and limit of [`Plugin::started_in`].
    pub fn poll(mut self, every: Duration, timeout: Duration) -> Launch {
        self.poll = every;
        self.timeout = timeout;
        self
    }

    /// Starts the plugin and waits until it answers GetPluginInfo.
    pub async fn start(self) -> Plugin {
        let mut builder = tempfile::Builder::new();
        builder.prefix(&self.dir_prefix);
        let dir = match &self.dir_parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .expect("temp dir");
        if self.readable_by_qemu {
            crate::open_for_qemu(dir.path());
        }
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| dir.path().join("csi.sock"));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--mode".into(),
            self.mode.clone(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
        ];
        if let Some(config) = &self.config {
            let path = dir.path().join("config.toml");
            let text = config.replace("{dir}", dir.path().to_str().unwrap());
            std::fs::write(&path, text).unwrap();
            args.extend(["--config".to_string(), path.display().to_string()]);
        }
        args.extend(self.args.iter().cloned());
        let mut p = Plugin {
            child: None,
            dir,
            socket,
            args,
            // Replaced once the plugin answers.
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
            started_in: Duration::ZERO,
            launch: self,
        };
        let env = p.launch.env.clone();
        p.spawn(&env).await;
        p
    }
}

/// A running plugin process and a gRPC channel to it.
pub struct Plugin {
    child: Option<Child>,
    /// The temp dir: socket, data dir (`data/`), config file, `plugin.log`.
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The whole command line after the binary.
    pub args: Vec<String>,
    pub channel: Channel,
    /// Spawn → first answered GetPluginInfo, of the latest start.
    pub started_in: Duration,
    launch: Launch,
}

impl Plugin {
    /// A launch of `serve --mode <mode>` (controller, node or monolith) with debug logging,
    /// no config file and no extra arguments: adjust it, then [`Launch::start`].
    pub fn launch(mode: &str) -> Launch {
        Launch {
            mode: mode.to_string(),
            config: None,
            args: Vec::new(),
            env: Vec::new(),
            rust_log: Some("debug".into()),
            bin: bin(),
            dir_prefix: ".tmp".into(),
            dir_parent: None,
            socket: None,
            readable_by_qemu: false,
            own_process_group: false,
            poll: Duration::from_millis(20),
            timeout: Duration::from_secs(30),
        }
    }

    /// Starts `virtdisk-csi serve --mode <mode>` with a temp data dir and socket, plus `args`.
    pub async fn start(mode: &str, args: &[&str]) -> Plugin {
        Plugin::launch(mode).args(args).start().await
    }

    /// Like [`Plugin::start`], with `config` written to `<dir>/config.toml` (`{dir}` = the
    /// temp dir).
    pub async fn start_with_config(mode: &str, config: &str, args: &[&str]) -> Plugin {
        Plugin::launch(mode).config(config).args(args).start().await
    }

    /// Like [`Plugin::start_with_config`] (no config file when `config` is empty), with extra
    /// environment variables for this first process only.
    pub async fn start_with_env(
        mode: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Plugin {
        let mut launch = Plugin::launch(mode).args(args).env(env);
        if !config.is_empty() {
            launch = launch.config(config);
        }
        launch.start().await
    }

    async fn spawn(&mut self, env: &[(String, String)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("plugin.log"))
            .unwrap();
        let mut cmd = Command::new(&self.launch.bin);
        cmd.args(&self.args).env_remove("CSI_ENDPOINT");
        if self.launch.own_process_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        match &self.launch.rust_log {
            Some(level) => cmd.env("RUST_LOG", level),
            None => cmd.env_remove("RUST_LOG"),
        };
        let t = Instant::now();
        let child = cmd
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start virtdisk-csi");
        self.child = Some(child);
        self.channel = self.wait_serving().await;
        self.started_in = t.elapsed();
    }

    /// Polls until GetPluginInfo answers on the socket.
    async fn wait_serving(&self) -> Channel {
        let deadline = Instant::now() + self.launch.timeout;
        loop {
            if self.socket.exists() {
                if let Ok(ch) = connect(&self.socket).await {
                    let info = IdentityClient::new(ch.clone())
                        .get_plugin_info(csi::GetPluginInfoRequest {})
                        .await;
                    if info.is_ok() {
                        return ch;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "plugin did not start listening on {}:\n{}",
                self.socket.display(),
                self.log()
            );
            tokio::time::sleep(self.launch.poll).await;
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The `default` pool's directory.
    pub fn pool_dir(&self) -> PathBuf {
        self.data_dir().join("pools/default")
    }

    /// The endpoint as the CLI takes it: `unix://<socket>`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn group_controller(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("plugin is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    /// SIGKILL (a crash) and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the same command line again (stopping it first if it runs), without the
    /// launch's extra environment; returns spawn → serving.
    pub async fn restart(&mut self) -> Duration {
        self.restart_with_env(&[] as &[(&str, &str)]).await
    }

    /// Stops the plugin (if running) and starts the same command line with extra environment
    /// variables; a later [`Plugin::restart`] goes back to the plain environment.
    pub async fn restart_with_env(
        &mut self,
        env: &[(impl AsRef<str>, impl AsRef<str>)],
    ) -> Duration {
        if self.child.is_some() {
            self.stop();
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
            .collect();
        self.spawn(&env).await;
        self.started_in
    }

    /// Waits up to `timeout` for the plugin process to exit by itself (e.g. at a failpoint);
    /// returns its exit status, or None if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the plugin (if running) and starts the same command line leading a process group
    /// of its own, as a CO's executor starts a task, so a test can kill that whole group
    /// (`killpg`, then [`Plugin::reap`]); later restarts keep that. Returns spawn → serving.
    pub async fn restart_in_own_group(&mut self) -> Duration {
        self.launch.own_process_group = true;
        self.restart().await
    }

    /// Reaps the plugin after something else killed it (its process group, its cgroup);
    /// returns how it ended.
    pub fn reap(&mut self) -> Option<ExitStatus> {
        self.child.take().map(|mut c| c.wait().unwrap())
    }

    /// The pid of the running plugin process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The plugin's stderr and stdout so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    /// Waits (30 s at most) until the failpoint `point`, armed in pause mode
    /// (`VIRTDISK_FAILPOINT_PAUSE_MS`), has paused the `n`th time in this plugin's log, which
    /// keeps the lines of every run (count the earlier runs' pauses too).
    pub async fn wait_paused(&self, point: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = format!("failpoint {point}: pausing");
        while self.log().matches(&line).count() < n {
            assert!(Instant::now() < deadline, "{point} did not pause {n} times");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `virtdisk-csi client --endpoint <this plugin> <args>`.
    pub fn client(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(["client", "--endpoint", &self.endpoint()])
            .args(args)
            .env_remove("CSI_ENDPOINT")
            .output()
            .expect("run virtdisk-csi client")
    }

    /// [`Plugin::client`] that must succeed; returns its stdout.
    pub fn client_ok(&self, args: &[&str]) -> String {
        let o = self.client(args);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "client {args:?} failed: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    /// [`Plugin::client_ok`] with `--output json`; returns the parsed output.
    pub fn client_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.client_ok(&[args, &["--output", "json"]].concat());
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The runtime that drives the tests' connections to their plugins. A test may block its own
/// runtime for a while (`Plugin::stop` waits for the process); a connection driven by that
/// runtime could not answer the server's graceful shutdown then (HTTP/2 GOAWAY and PING), and
/// the plugin would wait out its whole grace period for a client that looks hung. Real clients
/// (kubelet, Nomad) answer at once.
fn connections() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vdt-connections")
            .enable_all()
            .build()
            .expect("the connections' runtime")
    })
}

/// Spawns the channel's tasks on [`connections`].
#[derive(Clone, Copy)]
struct OnConnections;

impl<F> hyper::rt::Executor<F> for OnConnections
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        connections().spawn(fut);
    }
}

/// A channel to the plugin's unix socket with authority `localhost` (as Nomad and the sidecars
/// send it), driven by a runtime of its own (see [`connections`]): its socket is opened there
/// too, so that its I/O does not wait for the caller's runtime.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .executor(OnConnections)
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = connections()
                    .spawn(tokio::net::UnixStream::connect(socket))
                    .await
                    .map_err(std::io::Error::other)??;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
