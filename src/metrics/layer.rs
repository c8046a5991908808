//! The tower layer around the gRPC server: every RPC is counted by service, method and gRPC
//! code, timed, and run inside a `rpc` span that carries the ids it concerns, so every log line
//! an RPC writes (text or `--log-format json`) names its volume.
//!
//! A layer sees HTTP, not messages, so it reads the unary request body once, takes the ids out
//! (`request_ids`: only id fields, never secrets) and hands the same bytes on. The gRPC status
//! is read from the response headers (errors: trailers-only responses) or from the trailers.

use super::registry;
use super::request_ids::{self, RequestIds};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited};
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};
use tracing::Instrument;

/// tonic's default limit for a decoded message, plus the frame header.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024 + 5;

const SERVICES: &[&str] = &[
    "Identity",
    "Controller",
    "Node",
    "GroupController",
    "SnapshotMetadata",
];

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService { inner }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct RpcService<S> {
    inner: S,
}

/// `/csi.v1.Controller/CreateVolume` → (`Controller`, `CreateVolume`). Anything else is
/// labelled `other` so a stray path cannot grow the label set.
pub(crate) fn rpc_labels(path: &str) -> (&'static str, &str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("");
    let service = service.strip_prefix("csi.v1.").unwrap_or("");
    let method_ok = !method.is_empty()
        && method.len() <= 48
        && method.bytes().all(|b| b.is_ascii_alphanumeric());
    match SERVICES.iter().find(|s| **s == service) {
        Some(s) if method_ok => (s, method),
        _ => ("other", "other"),
    }
}

/// Go's names for the codes, as grpc-prometheus and CSI dashboards use them.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn rpc_span(method: &str, ids: &RequestIds) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        rpc = %method,
        volume_id = tracing::field::Empty,
        node_id = tracing::field::Empty,
        snapshot_id = tracing::field::Empty,
        volume_name = tracing::field::Empty,
        snapshot_name = tracing::field::Empty,
        source = tracing::field::Empty,
    );
    let fields = [
        ("volume_id", &ids.volume_id),
        ("node_id", &ids.node_id),
        ("snapshot_id", &ids.snapshot_id),
        ("volume_name", &ids.volume_name),
        ("snapshot_name", &ids.snapshot_name),
        ("source", &ids.source),
    ];
    for (field, value) in fields {
        if let Some(v) = value {
            span.record(field, v.as_str());
        }
    }
    span
}

/// Counts and logs one RPC exactly once: when its status is known, or as `Canceled` when the
/// response is dropped before that (the client went away).
struct Recorder {
    service: &'static str,
    method: String,
    start: Instant,
    span: tracing::Span,
    done: bool,
}

impl Recorder {
    fn start(service: &'static str, method: &str, span: tracing::Span) -> Recorder {
        registry::get()
            .rpc_in_flight
            .with_label_values(&[service, method])
            .inc();
        Recorder {
            service,
            method: method.to_string(),
            start: Instant::now(),
            span,
            done: false,
        }
    }

    fn finish(&mut self, code: Code, message: &str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = registry::get();
        let labels = [self.service, self.method.as_str()];
        let elapsed = self.start.elapsed();
        m.rpc_in_flight.with_label_values(&labels).dec();
        m.rpc_seconds
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        let code_label = code_name(code);
        m.rpc_requests
            .with_label_values(&[self.service, self.method.as_str(), code_label])
            .inc();
        let ms = elapsed.as_secs_f64() * 1000.0;
        let _entered = self.span.enter();
        match code {
            Code::Ok => {
                tracing::debug!(code = code_label, elapsed_ms = ms, "rpc ok");
            }
            Code::Internal | Code::Unknown | Code::DataLoss | Code::Unavailable => {
                m.rpc_errors
                    .with_label_values(&[self.service, self.method.as_str(), code_label])
                    .inc();
                tracing::warn!(
                    code = code_label,
                    elapsed_ms = ms,
                    error = message,
                    "rpc failed"
                );
            }
            _ => {
                m.rpc_errors
                    .with_label_values(&[self.service, self.method.as_str(), code_label])
                    .inc();
                tracing::info!(
                    code = code_label,
                    elapsed_ms = ms,
                    error = message,
                    "rpc failed"
                );
            }
        }
    }

    fn finish_from(&mut self, headers: &http::HeaderMap) -> bool {
        match Status::from_header_map(headers) {
            Some(status) => {
                self.finish(status.code(), status.message());
                true
            }
            None => false,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish(
            Code::Cancelled,
            "the response was dropped before its status was sent",
        );
    }
}

pin_project_lite::pin_project! {
    /// The response body, watched for the trailers that carry the status of a successful RPC.
    struct ObservedBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B> http_body::Body for ObservedBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        if let Some(rec) = this.recorder.as_mut() {
            match &polled {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        if !rec.finish_from(trailers) {
                            rec.finish(Code::Unknown, "trailers without grpc-status");
                        }
                    }
                }
                Some(Err(_)) => rec.finish(Code::Internal, "the response body failed"),
                None => rec.finish(Code::Unknown, "the response ended without grpc-status"),
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<Body>> for RpcService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready is the one to call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let (service, method) = rpc_labels(&path);
            let (parts, body) = req.into_parts();
            let bytes = match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    let span = rpc_span(method, &RequestIds::default());
                    let mut rec = Recorder::start(service, method, span);
                    let status = if e.is::<http_body_util::LengthLimitError>() {
                        Status::resource_exhausted("the request is larger than 4 MiB")
                    } else {
                        Status::cancelled(format!("reading the request failed: {e}"))
                    };
                    rec.finish(status.code(), status.message());
                    return Ok(status.into_http());
                }
            };
            let ids = request_ids::grpc_message(&bytes)
                .map(|m| request_ids::extract(method, m))
                .unwrap_or_default();
            let span = rpc_span(method, &ids);
            let mut rec = Recorder::start(service, method, span.clone());
            let req = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
            let resp = inner.call(req).instrument(span).await?;
            if rec.finish_from(resp.headers()) {
                return Ok(resp.map(Body::new));
            }
            Ok(resp.map(|inner| {
                Body::new(ObservedBody {
                    inner,
                    recorder: Some(rec),
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            rpc_labels("/csi.v1.Controller/CreateVolume"),
            ("Controller", "CreateVolume")
        );
        assert_eq!(rpc_labels("/csi.v1.Identity/Probe"), ("Identity", "Probe"));
        assert_eq!(
            rpc_labels("/grpc.health.v1.Health/Check"),
            ("other", "other")
        );
        assert_eq!(rpc_labels("/csi.v1.Node/../../x"), ("other", "other"));
        assert_eq!(rpc_labels(""), ("other", "other"));
    }
}
