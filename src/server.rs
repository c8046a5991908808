//! The gRPC server on a unix socket: a stale socket replaced (never one another process
//! serves on), restrictive permissions from the start, graceful stop when the process's
//! [`Shutdown`] begins (in-flight RPCs finish within its grace period, the socket is removed
//! unless another process has replaced it since). A `tcp://` endpoint exists for node plugins in test guests, reached through a user-mode port forward.
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

/// What was at the socket path before this process bound it.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    Nothing,
    /// A socket nobody accepts on (ECONNREFUSED): its process ended without removing it.
    StaleSocket,
}

/// Looks at what is at `path`, and refuses ([`Error::FailedPrecondition`]) when it is a socket
/// another process accepts on: replacing it would take that process's clients, and the first
/// of the two to stop would remove the path the other serves on. Anything else that is not a
/// socket (a file, a symlink, a directory: a mistyped `--endpoint`) is refused too, never
/// replaced: only a stale socket is the plugin's to replace. The test connect is
/// non-blocking: on a unix socket it succeeds, or fails with ECONNREFUSED, at once (EAGAIN: a
/// listener whose backlog is full, also alive).
fn check_not_served(path: &Path) -> Result<Existing> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(Error::io(format!("stat {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::FailedPrecondition(format!(
            "{} exists and is not a socket ({}): the plugin replaces only a stale socket; \
             remove it, or give another --endpoint",
            path.display(),
            crate::pool::qcow2::file_kind(meta.file_type())
        )));
    }
    let probing = || format!("checking whether a process serves on {}", path.display());
    let addr = UnixAddr::new(path).map_err(|e| Error::sys(probing(), e))?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::sys(probing(), e))?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS) => {
            Err(Error::FailedPrecondition(format!(
                "another process serves on the socket {}: stop it, or give this instance \
                 another --endpoint",
                path.display()
            )))
        }
        Err(Errno::ECONNREFUSED) => Ok(Existing::StaleSocket),
        Err(Errno::ENOENT) => Ok(Existing::Nothing),
        Err(e) => Err(Error::sys(probing(), e)),
    }
}

/// Binds the socket at `path` with its final mode and group before anyone can reach it: the
/// socket is made in a fresh 0700 directory next to `path`, given its mode (0600, or 0660 and
/// the group), then renamed over `path` (which also replaces a stale socket atomically).
/// A socket at `path` that another process accepts on is never replaced (see
/// [`check_not_served`]). Nothing changes the process-wide umask.
fn bind(path: &Path, opts: &ServeOptions) -> Result<(UnixListener, SocketFile)> {
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
    // The rename keeps the inode: this identifies the socket at `path` as this process's.
    let made = std::fs::symlink_metadata(&fresh)
        .map_err(|e| Error::io(format!("stat {}", fresh.display()), e))?;
    match check_not_served(path)? {
        Existing::Nothing => {}
        Existing::StaleSocket => {
            tracing::info!(socket = %path.display(), "replacing a stale socket (nobody accepts on it)")
        }
    }
    std::fs::rename(&fresh, path)
        .map_err(|e| Error::io(format!("moving the socket to {}", path.display()), e))?;
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            id: file_id(&made),
        },
    ))
}

/// A file's identity: device and inode.
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// The socket file this process made, removed when serving ends (also when the serving future
/// is dropped at the end of the grace period) if the path still holds it: another process
/// that replaced it meanwhile (a new instance, started once this one stopped accepting) keeps
/// its socket.
struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket made at bind.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let path = &self.path;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if file_id(&meta) == self.id => {}
            Ok(_) => {
                tracing::info!(socket = %path.display(),
                    "the socket path holds another process's file now: leaving it");
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "could not check the socket");
                return;
            }
        }
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(socket = %path.display(), error = %e, "could not remove socket");
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
    // Before opening anything: a socket another process serves on is checked again at bind.
    if let Listen::Unix(path) = &opts.listen {
        let path = path.clone();
        crate::exec::blocking(move || check_not_served(&path)).await?;
    }
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
    let checkpoint = pools.clone();
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
    // From here on the process accepts connections (the binds below are immediate).
    SERVING.store(true, std::sync::atomic::Ordering::SeqCst);
    let served = match &opts.listen {
        Listen::Unix(path) => {
            let (listener, _socket) = bind(path, &opts)?;
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
    // The new records' files made durable now: the next start has nothing to replay.
    if let Some(pools) = checkpoint {
        pools.checkpoint().await;
    }
    served.map_err(|e| Error::internal(format!("gRPC server failed: {e}")))
}

/// Whether this process got as far as serving (its services built, its socket about to be
/// bound): the shutdown's last words tell "still starting" from "a client held on".
static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// See [`SERVING`].
pub(crate) fn serving() -> bool {
    SERVING.load(std::sync::atomic::Ordering::SeqCst)
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

    #[test]
    fn a_socket_someone_accepts_on_is_refused_a_stale_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert_eq!(check_not_served(&path).unwrap(), Existing::Nothing);
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = check_not_served(&path).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("--endpoint"),
            "{msg}"
        );
        // The listener is gone, its file stays: nobody accepts.
        drop(live);
        assert_eq!(check_not_served(&path).unwrap(), Existing::StaleSocket);
        // Anything else at the path is refused, never replaced: a file, a symbolic link (even
        // to a stale socket), a directory.
        let stale = dir.path().join("stale.sock");
        std::fs::rename(&path, &stale).unwrap();
        std::fs::write(&path, "x").unwrap();
        let refused = |what: &str| {
            let err = check_not_served(&path).unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
            assert!(err.to_string().contains(what), "{err}");
        };
        refused("a regular file");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&stale, &path).unwrap();
        refused("a symbolic link");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        refused("a directory");
    }

    #[test]
    fn the_socket_file_is_removed_only_while_it_is_this_processs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let id = |p: &Path| file_id(&std::fs::symlink_metadata(p).unwrap());
        std::fs::write(&path, "mine").unwrap();
        drop(SocketFile {
            path: path.clone(),
            id: id(&path),
        });
        assert!(!path.exists());
        std::fs::write(&path, "mine").unwrap();
        let mine = SocketFile {
            path: path.clone(),
            id: id(&path),
        };
        let theirs = dir.path().join("theirs");
        std::fs::write(&theirs, "theirs").unwrap();
        std::fs::rename(&theirs, &path).unwrap();
        drop(mine);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "theirs");
    }
}
