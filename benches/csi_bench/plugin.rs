//! The plugin under test: the release binary, started as production would run it (default log
//! level, no debug logging), on a temp socket and data dir under a `vdt-bench-` temp dir.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use virtdisk_csi::csi::proto as csi;
use virtdisk_csi::csi::proto::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_virtdisk-csi");
/// Another build of the plugin to measure instead (e.g. an older commit, for a before/after).
pub const BIN_ENV: &str = "VIRTDISK_BENCH_BIN";

/// The plugin binary under test: `$VIRTDISK_BENCH_BIN`, else the one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os(BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BIN))
}

pub struct BenchPlugin {
    bin: PathBuf,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    args: Vec<String>,
    pub channel: Channel,
    /// Spawn → first answered GetPluginInfo, of the latest start.
    pub started_in: Duration,
}

/// Resident memory of a process, from /proc/<pid>/status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: u64,
    pub hwm: u64,
}

pub fn memory_of(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
    }
}

/// Threads of a process.
pub fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

impl BenchPlugin {
    /// `serve --mode <mode>` with `config` (TOML, `{dir}` = the temp dir) and `args`.
    pub async fn start(mode: &str, config: &str, args: &[&str]) -> BenchPlugin {
        Self::start_bin(&bin(), mode, config, args).await
    }

    /// Like `start`, with another build of the plugin.
    pub async fn start_bin(bin: &Path, mode: &str, config: &str, args: &[&str]) -> BenchPlugin {
        let dir = tempfile::Builder::new()
            .prefix("vdt-bench-")
            .tempdir()
            .expect("temp dir");
        // libvirt's QEMU (user libvirt-qemu) must reach the pool images below.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, config.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        let socket = dir.path().join("csi.sock");
        let mut full: Vec<String> = [
            "serve",
            "--mode",
            mode,
            "--endpoint",
            &format!("unix://{}", socket.display()),
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--config",
            cfg.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        full.extend(args.iter().map(|s| s.to_string()));
        let t = Instant::now();
        let child = spawn(bin, &full, dir.path());
        let channel = wait_serving(&socket).await;
        BenchPlugin {
            bin: bin.to_path_buf(),
            child: Some(child),
            dir,
            socket,
            args: full,
            channel,
            started_in: t.elapsed(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pool_dir(&self) -> PathBuf {
        self.data_dir().join("pools/default")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("plugin is running").id()
    }

    pub fn memory(&self) -> Memory {
        memory_of(self.pid())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    /// SIGTERM, wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// Stops and starts the same command line; returns spawn → serving.
    pub async fn restart(&mut self) -> Duration {
        self.stop();
        let t = Instant::now();
        self.child = Some(spawn(&self.bin, &self.args, self.dir.path()));
        self.channel = wait_serving(&self.socket).await;
        self.started_in = t.elapsed();
        self.started_in
    }

    /// Spawn → the first ready Probe (pools open and libvirt answering).
    pub async fn probe_ready(&self) -> bool {
        self.identity()
            .probe(csi::ProbeRequest {})
            .await
            .map(|r| r.into_inner().ready.unwrap_or(true))
            .unwrap_or(false)
    }
}

impl Drop for BenchPlugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(bin: &Path, args: &[String], dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("plugin.log"))
        .unwrap();
    Command::new(bin)
        .args(args)
        // Production defaults: the `info` level.
        .env_remove("RUST_LOG")
        .env_remove("CSI_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start virtdisk-csi")
}

/// Polls every 2 ms until GetPluginInfo answers (the resolution of the start-up figure).
async fn wait_serving(socket: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if socket.exists() {
            if let Ok(ch) = virtdisk_csi::csi::channel::connect(socket).await {
                let ok = IdentityClient::new(ch.clone())
                    .get_plugin_info(csi::GetPluginInfoRequest {})
                    .await
                    .is_ok();
                if ok {
                    return ch;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "plugin did not start serving on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
