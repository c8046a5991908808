//! The command line of the `virtdisk-csi` binary: `serve`, `client` and `doctor`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::attach::{Attacher, Attachments};
use crate::config::{Config, Mode, Overrides};
use crate::server::{self, ServeOptions};
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "virtdisk-csi",
    version,
    about = "CSI plugin: qcow2 volumes hot-plugged into libvirt domains"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CSI gRPC API (on a unix socket; tcp:// only for isolated test guests).
    Serve(ServeArgs),
    /// Call a CSI plugin's RPCs (any plugin's socket): identity, volume, node, snapshot.
    Client(crate::client::ClientArgs),
    /// Check that this host has what the plugin needs; exits non-zero on a FAIL.
    Doctor(crate::doctor::DoctorArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, value_enum, default_value = "monolith")]
    mode: Mode,
    /// unix:///path/to/csi.sock (or tcp://ip:port, unauthenticated: for isolated test guests only)
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Where the embedded default pool lives (<data-dir>/pools/default).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (pools, node limits, libvirt).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node id reported by NodeGetInfo (default: DMI product UUID, else /etc/machine-id).
    #[arg(long)]
    node_id: Option<String>,
    /// CSI driver name reported by GetPluginInfo [default: the config file's driver_name,
    /// else virtdisk.csi.io].
    #[arg(long)]
    driver_name: Option<String>,
    /// Make the socket 0660 and owned by this group (default: 0600).
    #[arg(long)]
    socket_group: Option<String>,
    /// libvirt URI of the hypervisor whose domains are the nodes (default qemu:///system).
    #[arg(long)]
    libvirt_uri: Option<String>,
    /// Staging and target paths must lead below this directory (repeatable; added to the
    /// config's `[node] allowed_path_roots`), e.g. the CO's directory for this plugin.
    #[arg(long, value_name = "DIR")]
    allowed_path_root: Vec<PathBuf>,
    /// Log format: text, or JSON lines.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9808).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// After SIGTERM/SIGINT, how long in-flight RPCs may finish before the plugin exits
    /// without them (a second signal ends it at once).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = grace_secs)]
    shutdown_grace: f64,
}

fn grace_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0 to 3600")),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log written to a file or a pipe (Nomad, systemd, docker)
    // gets plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Serves until SIGTERM/SIGINT, then shuts down within the grace period (see
/// [`crate::shutdown`]): in-flight RPCs finish, background tasks stop and are joined, the
/// controller's changes whose clients gave up are joined, and whatever still runs when the
/// grace period is over is given up.
async fn serve(args: ServeArgs) -> crate::error::Result<()> {
    let shutdown = Shutdown::new(Duration::from_secs_f64(args.shutdown_grace));
    shutdown.on_signals()?;
    // Starting (opening pools, binding) counts too: a signal during it is obeyed in time.
    let served = tokio::select! {
        served = start_and_serve(args, &shutdown) => served,
        _ = shutdown.grace_over() => {
            match crate::metrics::rpcs_in_flight() {
                _ if !server::serving() => tracing::warn!(
                    "still starting (opening the pools, reading the attachments) when the \
                     grace period ended: stopping without serving"
                ),
                // The server waits for its clients to close their connections (HTTP/2 GOAWAY,
                // then a PING they answer): a client that does not answer holds it.
                0 => tracing::warn!(
                    "no RPC in flight, but a client did not close its connection within the \
                     grace period (it does not answer): closing it"
                ),
                n => tracing::warn!(rpcs = n,
                    "RPCs still running after the grace period: stopping without them"),
            }
            Ok(())
        }
    };
    if let Err(e) = &served {
        tracing::error!(error = %e, "serving failed");
    }
    shutdown.join("serving ended").await;
    served
}

async fn start_and_serve(args: ServeArgs, shutdown: &Shutdown) -> crate::error::Result<()> {
    let cfg = Config::load(
        args.mode,
        args.config.as_deref(),
        Overrides {
            driver_name: args.driver_name,
            data_dir: args.data_dir,
            node_id: args.node_id,
            libvirt_uri: args.libvirt_uri,
            allowed_path_roots: args.allowed_path_root,
        },
    )?;
    let listen = server::listen_address(&args.endpoint)?;
    // Held until serving ends: one instance of each role per data directory.
    let mut _claims = Vec::new();
    for (runs, role) in [
        (cfg.mode.runs_controller(), "controller"),
        (cfg.mode.runs_node(), "node"),
    ] {
        if runs {
            let dir = cfg.data_dir.clone();
            _claims.push(
                crate::exec::blocking(move || crate::fsutil::claim_data_dir(&dir, role)).await?,
            );
        }
    }
    if let Some(addr) = args.metrics_addr {
        crate::metrics::serve(addr, shutdown).await?;
    }
    let attachers = attachments(&cfg).await?;
    server::serve(
        cfg,
        ServeOptions {
            listen,
            socket_group: args.socket_group,
        },
        attachers,
        shutdown,
    )
    .await
}

/// The attach backends of this process: libvirt first, then local attach (a node id that names a
/// VM belongs to the hypervisor backend).
async fn attachments(cfg: &Config) -> crate::error::Result<Attachments> {
    let mut backends: Vec<Arc<dyn Attacher>> = Vec::new();
    #[cfg(feature = "libvirt")]
    if cfg.mode.runs_controller() && cfg.libvirt.enabled {
        use crate::hypervisor::{Hypervisor, HypervisorConfig};
        backends.push(Arc::new(Hypervisor::new(HypervisorConfig::from_config(
            cfg,
        ))));
    }
    if let Some(local) = crate::localattach::from_config(cfg).await? {
        backends.push(local);
    }
    let pools: Vec<(String, std::path::PathBuf)> = cfg
        .pools
        .iter()
        .map(|p| (p.name.clone(), p.path.clone()))
        .collect();
    Ok(Attachments::new(backends, cfg.node.max_volumes_per_node)
        .with_ledgers(&pools)
        .with_quiesce_markers(&cfg.data_dir.join("quiesced"))
        .with_quiesce_timeout(std::time::Duration::from_secs(
            cfg.snapshots.quiesce_timeout_secs,
        )))
}

/// Parses the command line and runs the command: the whole `virtdisk-csi` binary.
///
/// Exit status: 0 when the command succeeded (for `serve`: after a signal, also when blocking
/// work had to be abandoned at the end of the grace period, which the log names); 1 when it
/// failed (`serve` could not start or serve, a `client` call failed, a `doctor` check FAILed);
/// 2 for a bad command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ok = match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            match runtime.block_on(serve(args)) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("virtdisk-csi: {e}");
                    false
                }
            }
        }
        Command::Client(args) => match runtime.block_on(crate::client::run(args)) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("error: {e}");
                false
            }
        },
        Command::Doctor(args) => runtime.block_on(crate::doctor::run(args)),
    };
    // Dropping the runtime would wait for every blocking closure, also one stuck in a call
    // that never returns (a libvirtd that accepts and never answers): name them and go.
    crate::exec::log_unfinished();
    runtime.shutdown_timeout(crate::shutdown::ABANDON_WAIT);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
