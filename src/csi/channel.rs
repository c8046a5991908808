//! A gRPC channel to a plugin's unix socket (for the built-in client and the tests).

use crate::error::{Error, Result};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

/// Connects to `socket` with authority `localhost`, as Nomad and the sidecars do.
pub async fn connect(socket: &Path) -> Result<Channel> {
    let socket: PathBuf = socket.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to the plugin socket: {e}")))
}
