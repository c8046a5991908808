//! `GET /metrics` over plain HTTP/1 on a TCP address. Anything else is 404.

use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

/// Binds now (so a busy port fails the start) and serves in the background until the shutdown
/// begins. Returns the bound address (useful with port 0).
pub(crate) async fn serve(addr: SocketAddr, shutdown: &Shutdown) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("binding the metrics address {addr}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("reading the metrics address", e))?;
    tracing::info!(address = %bound, "serving metrics on /metrics");
    shutdown.spawn("metrics server", accept_loop(listener));
    Ok(bound)
}

/// Accepts until dropped; the connections it serves are dropped with it.
async fn accept_loop(listener: tokio::net::TcpListener) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            conn = listener.accept() => match conn {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next() => continue,
        };
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle));
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
}

async fn handle<B>(req: Request<B>) -> std::result::Result<Response<Full<Bytes>>, hyper::Error> {
    let response = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return Ok(response(
            StatusCode::NOT_FOUND,
            "text/plain",
            "only GET /metrics is served here\n".into(),
        ));
    }
    match crate::exec::blocking(|| Ok(super::render())).await {
        Ok(text) => Ok(response(StatusCode::OK, prometheus::TEXT_FORMAT, text)),
        Err(e) => Ok(response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        )),
    }
}
