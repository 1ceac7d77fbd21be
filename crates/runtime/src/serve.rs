//! A tiny HTTP server for `/metrics`, `/healthz` and `/readyz`.
//!
//! * `/metrics`: the prometheus-client registry in OpenMetrics text format;
//! * `/healthz`: `200 ok` while the process serves HTTP at all (liveness: a wedged runtime
//!   stops answering and gets restarted). It stays `200` while the API server is away:
//!   restarting the process would not bring the API server back;
//! * `/readyz`: `200` when the caller's readiness check says so (and, with
//!   [`Endpoints::requiring_api`], the API server answers), else `503`.
//!
//! The metrics and the health endpoints may share one address or use two; each call of
//! [`serve`] binds one listener and answers all three paths, so pointing both flags at the
//! same port simply means one call.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::reachability::ApiReachability;

/// Content type of the OpenMetrics text exposition format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[error("binding {addr}: {source}")]
pub struct ServeError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// A shared readiness flag, cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Sets whether the process is ready.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the process is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the server exposes.
#[derive(Clone)]
pub struct Endpoints {
    /// The metrics registry, read on every scrape.
    pub registry: Arc<std::sync::Mutex<Registry>>,
    /// Readiness check for `/readyz`.
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Endpoints {
    /// Endpoints whose `/readyz` reflects `readiness`.
    pub fn new(registry: Arc<std::sync::Mutex<Registry>>, readiness: Readiness) -> Self {
        Self {
            registry,
            ready: Arc::new(move || readiness.get()),
        }
    }

    /// `/readyz` additionally false while the API server does not answer: a process that
    /// cannot reach it can do no work, whatever it last knew.
    pub fn requiring_api(self, reachability: ApiReachability) -> Self {
        let ready = self.ready;
        Self {
            registry: self.registry,
            ready: Arc::new(move || ready() && reachability.is_reachable()),
        }
    }
}

/// Binds `addr` and serves until `stop` is cancelled. Binding happens before this returns,
/// so a port conflict fails start-up; the returned future runs the accept loop.
pub async fn serve(
    addr: SocketAddr,
    endpoints: Endpoints,
    stop: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError { addr, source })?;
    let run = async move {
        loop {
            let (stream, _) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::warn!(%err, "accepting a connection failed");
                        continue;
                    }
                },
            };
            let endpoints = endpoints.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let endpoints = endpoints.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(&endpoints, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(err) = result {
                            tracing::debug!(%err, "metrics/health connection ended with an error");
                        }
                    }
                    () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
                }
            });
        }
    };
    Ok((local, run))
}

fn route(endpoints: &Endpoints, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            let encoded = {
                let registry = endpoints
                    .registry
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                prometheus_client::encoding::text::encode(&mut body, &registry)
            };
            match encoded {
                Ok(()) => response(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, body),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding metrics failed\n",
                ),
            }
        }
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if (endpoints.ready)() {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.to_owned())
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("shardop_test", "A test counter", counter.clone());
        counter.inc();
        let readiness = Readiness::default();
        let stop = CancellationToken::new();
        let (addr, run) = serve(
            "127.0.0.1:0".parse().unwrap(),
            Endpoints::new(Arc::new(std::sync::Mutex::new(registry)), readiness.clone()),
            stop.clone(),
        )
        .await
        .unwrap();
        let server = tokio::spawn(run);

        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains(OPENMETRICS_CONTENT_TYPE));
        assert!(metrics.contains("shardop_test_total 1"));
        assert!(metrics.trim_end().ends_with("# EOF"));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        readiness.set(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        stop.cancel();
        server.await.unwrap();
    }
}
