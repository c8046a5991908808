//! The gRPC server on a unix socket: stale socket replaced, restrictive permissions from the
//! start, graceful stop when the process's [`Shutdown`] begins (in-flight RPCs finish within
//! its grace period, the socket is removed). A `tcp://`
//! endpoint exists for node plugins in test guests, reached through a user-mode port forward.
//! Every accepted connection goes through [`authority::AuthorityFix`], so that clients which
//! send the socket path as HTTP/2 `:authority` (Python grpcio, grpc-java, Nomad 1.0–1.2) get
//! answers.

mod authority;

use crate::attach::Attachments;
use crate::config::Config;
use crate::csi::controller::ControllerService;
use crate::csi::group_controller::GroupControllerService;
use crate::csi::identity::IdentityService;
use crate::csi::node::NodeService;
use crate::csi::proto::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer,
    identity_server::IdentityServer, node_server::NodeServer,
};
use crate::error::{Error, Result};
use crate::pool::Pools;
use crate::shutdown::Shutdown;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;

/// `unix:///csi/csi.sock` or `/csi/csi.sock` → the socket path.
pub(crate) fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.is_empty() || !path.starts_with('/') {
        return Err(Error::invalid(format!(
            "endpoint {endpoint:?} must be unix:///absolute/path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listen {
    Unix(PathBuf),
    /// No authentication and no TLS: only for an isolated network (a test guest's port forward).
    Tcp(SocketAddr),
}

/// `unix:///path` or `/path` → a unix socket; `tcp://ip:port` → TCP.
pub(crate) fn listen_address(endpoint: &str) -> Result<Listen> {
    match endpoint.strip_prefix("tcp://") {
        Some(addr) => addr.parse().map(Listen::Tcp).map_err(|_| {
            Error::invalid(format!(
                "endpoint {endpoint:?} must be tcp://ip:port (e.g. tcp://0.0.0.0:10000)"
            ))
        }),
        None => socket_path(endpoint).map(Listen::Unix),
    }
}

pub(crate) struct ServeOptions {
    pub listen: Listen,
    /// Group allowed to use the socket (mode 0660); none → 0600.
    pub socket_group: Option<String>,
}

/// Binds the socket at `path` with its final mode and group before anyone can reach it: the
/// socket is made in a fresh 0700 directory next to `path`, given its mode (0600, or 0660 and
/// the group), then renamed over `path` (which also replaces a stale socket atomically).
/// Nothing changes the process-wide umask.
fn bind(path: &Path, opts: &ServeOptions) -> Result<UnixListener> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating socket directory {}", dir.display()), e))?;
    // tempfile makes the directory 0700.
    let private = tempfile::Builder::new()
        .prefix(".virtdisk-csi-bind-")
        .tempdir_in(dir)
        .map_err(|e| {
            Error::io(
                format!("creating a private directory in {}", dir.display()),
                e,
            )
        })?;
    let fresh = private.path().join("csi.sock");
    let listener = UnixListener::bind(&fresh)
        .map_err(|e| Error::io(format!("binding {}", fresh.display()), e))?;
    let mode = match &opts.socket_group {
        Some(group) => {
            let gid = nix::unistd::Group::from_name(group)
                .map_err(|e| Error::sys(format!("looking up group {group}"), e))?
                .ok_or_else(|| Error::invalid(format!("group {group:?} does not exist")))?
                .gid;
            nix::unistd::chown(&fresh, None, Some(gid))
                .map_err(|e| Error::sys(format!("chown {}", fresh.display()), e))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {}", fresh.display()), e))?;
    if path.exists() {
        tracing::info!(socket = %path.display(), "replacing a stale socket");
    }
    std::fs::rename(&fresh, path)
        .map_err(|e| Error::io(format!("moving the socket to {}", path.display()), e))?;
    Ok(listener)
}

/// The socket file, removed when serving ends (also when the serving future is dropped at the
/// end of the grace period).
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(socket = %self.0.display(), error = %e, "could not remove socket");
            }
        }
    }
}

/// Builds the services for `cfg.mode` and serves until the shutdown begins; then in-flight
/// RPCs finish (the caller bounds this by the grace period) and the socket is removed.
pub(crate) async fn serve(
    cfg: Config,
    opts: ServeOptions,
    attachers: Attachments,
    shutdown: &Shutdown,
) -> Result<()> {
    let pools = if cfg.mode.runs_controller() {
        let pools = Pools::open(cfg.pools.clone(), cfg.default_volume_size)
            .await?
            .with_layers(attachers.clone(), cfg.snapshots.max_chain_depth);
        if attachers.ledgers_need_init() {
            // The volumes that exist before the attach ledger does may be attached anywhere.
            let (existing, _) = pools.list_page("", usize::MAX).await?;
            attachers
                .init_ledgers(existing.into_iter().map(|(v, _)| v.id).collect())
                .await?;
        }
        pools.start_flattener(shutdown);
        // Guests a crashed controller left frozen or paused for a live snapshot.
        attachers.release_left_quiesced().await;
        Some(pools)
    } else {
        None
    };
    if let Some(pools) = &pools {
        crate::metrics::watch_pools(pools.clone());
    }
    crate::metrics::set_build_info(&format!("{:?}", cfg.mode).to_lowercase());
    // A node's SMBIOS OEM strings (sysfs reads, off the runtime) may carry topology too.
    let smbios_topology = !cfg.has_topology() && cfg.mode.runs_node() && {
        let sysfs = cfg.node.sysfs_root();
        !crate::exec::blocking(move || Ok(crate::nodetopo::from_smbios(&sysfs)))
            .await?
            .is_empty()
    };
    let identity = IdentityService {
        driver_name: cfg.driver_name.clone(),
        controller: cfg.mode.runs_controller(),
        topology: cfg.has_topology() || smbios_topology,
        pools: pools.clone(),
        attachments: cfg.mode.runs_controller().then(|| attachers.clone()),
    };
    // The changes in flight, shared by the controller and group controller services.
    let inflight = crate::guard::InFlight::new(shutdown);
    let router = tonic::transport::Server::builder()
        .layer(crate::metrics::RpcLayer)
        .add_service(IdentityServer::new(identity))
        .add_optional_service(pools.clone().map(|pools| {
            GroupControllerServer::new(GroupControllerService {
                pools,
                inflight: inflight.clone(),
            })
        }))
        .add_optional_service(pools.map(|pools| {
            ControllerServer::new(ControllerService {
                pools,
                attachments: attachers.clone(),
                get_snapshot_capability: cfg.snapshots.get_snapshot_capability,
                inflight,
            })
        }));
    let node = if cfg.mode.runs_node() {
        let mut node_cfg = cfg.node.clone();
        node_cfg.local_attach = Some(crate::localattach::enabled(&cfg));
        node_cfg.state_dir = Some(cfg.data_dir.join("node"));
        // This host is a node of its own controller: it reports what local attach allows.
        if let Some(limit) = crate::localattach::node_limit(&cfg).await? {
            node_cfg.max_volumes_per_node = limit;
        }
        Some(NodeServer::new(NodeService::new(
            crate::nodeid::resolve(cfg.node_id.as_deref(), Path::new("/"))?,
            node_cfg,
        )))
    } else {
        None
    };
    let router = router.add_optional_service(node);
    let stop = shutdown.begun();
    let served = match &opts.listen {
        Listen::Unix(path) => {
            let listener = bind(path, &opts)?;
            let _socket = SocketFile(path.clone());
            tracing::info!(socket = %path.display(), mode = ?cfg.mode, driver = %cfg.driver_name, "serving");
            let incoming = UnixListenerStream::new(listener)
                .map(|conn| conn.map(authority::AuthorityFix::new));
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
        Listen::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("binding tcp://{addr}"), e))?;
            tracing::warn!(%addr, mode = ?cfg.mode, driver = %cfg.driver_name,
                "serving on TCP without authentication: keep this address on an isolated network");
            // gRPC calls are small request/response pairs: Nagle would only add latency.
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                conn.inspect(|stream| {
                    let _ = stream.set_nodelay(true);
                })
                .map(authority::AuthorityFix::new)
            });
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
    };
    served.map_err(|e| Error::internal(format!("gRPC server failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_to_unix_or_tcp() {
        assert_eq!(
            listen_address("unix:///csi/csi.sock").unwrap(),
            Listen::Unix(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(
            listen_address("/csi/csi.sock").unwrap(),
            Listen::Unix(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(
            listen_address("tcp://0.0.0.0:10000").unwrap(),
            Listen::Tcp("0.0.0.0:10000".parse().unwrap())
        );
        assert!(listen_address("tcp://localhost").is_err());
        assert!(listen_address("relative.sock").is_err());
    }
}
