//! Kubernetes clients that identify themselves, respect a client-side rate limit, wait out
//! server throttling and count every request.
//!
//! Every client a [`ClientFactory`] builds shares one [`TokenBucket`]: the limit protects the
//! API server from this *process*, however many shards it serves. Each client carries its own
//! user agent, because a worker that took over shard `j` must appear in the audit log and in
//! API Priority and Fairness as `shardop-worker/shard-j`.
//!
//! The request path, outermost first:
//!
//! 1. [`RequestPolicy`] (this module): sets the user agent, takes a token, counts the
//!    response in `shardop_kube_requests_total{verb,code}`, and on `429 Too Many Requests`
//!    sleeps for the server's `Retry-After` (clamped to 1..=30 s) and sends again — a
//!    throttled request is not a failure, the reconcile never sees it. After
//!    `MAX_THROTTLE_RETRIES` resends the 429 goes to the caller, still only after its
//!    `Retry-After`, so no request ever follows a 429 sooner than the server asked;
//! 2. kube's default stack from the inferred config (base URI, auth, extra headers, HTTP
//!    tracing, TLS connector), behind a `tower::buffer::Buffer` so it can be cloned for
//!    resends. kube's own retry layer is switched off: it follows `Retry-After` without a cap
//!    (up to 1000 s) and its retries are invisible to our metrics.

mod token_bucket;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::header::{HeaderValue, RETRY_AFTER, USER_AGENT};
use http::{Method, Request, Response, StatusCode};
use kube::client::{Body, ClientBuilder};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service, ServiceExt};

pub use token_bucket::TokenBucket;

use crate::reachability::{ApiReachability, ReachabilityLayer};

/// How many times one request is resent after `429 Too Many Requests` before the 429 is
/// returned to the caller (who then backs off like for any transient error).
const MAX_THROTTLE_RETRIES: u32 = 10;
/// Bounds of the wait after a 429: at least 1 s so a missing/zero header cannot spin, at
/// most 30 s so a misconfigured server cannot park a reconcile for minutes.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Requests queued in front of kube's default stack; same as kube's own buffer.
const BUFFER_CAPACITY: usize = 1024;

/// Client flags shared by every shardop binary (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Debug)]
pub struct KubeClientArgs {
    /// Client-side request rate limit: sustained requests per second to the API server
    /// (token bucket refill rate, shared by all shards this process serves). 0 = no limit.
    #[arg(long, env = "SHARDOP_KUBE_QPS", default_value_t = 50.0, value_parser = parse_qps)]
    pub kube_qps: f32,
    /// Client-side request rate limit: burst size (token bucket capacity), at least 1.
    #[arg(long, env = "SHARDOP_KUBE_BURST", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_burst: u32,
}

/// `--kube-qps`: a finite number ≥ 0, where 0 means no limit. A negative or NaN rate is
/// rejected instead of silently switching the limit off.
pub fn parse_qps(value: &str) -> Result<f32, String> {
    let qps: f32 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if !qps.is_finite() || qps < 0.0 {
        return Err(format!(
            "{value:?} is not a request rate: use a finite number ≥ 0 (0 = no limit)"
        ));
    }
    Ok(qps)
}

impl Default for KubeClientArgs {
    fn default() -> Self {
        Self {
            kube_qps: 50.0,
            kube_burst: 100,
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Neither in-cluster config nor a kubeconfig was found.
    #[error("inferring the Kubernetes client configuration: {0}")]
    InferConfig(#[from] kube::config::InferConfigError),
    /// kube rejected the configuration (TLS, auth plugin, ...).
    #[error("building the Kubernetes client: {0}")]
    Build(#[from] kube::Error),
    /// The user agent contains characters not allowed in an HTTP header.
    #[error("invalid user agent {0:?}")]
    UserAgent(String),
}

/// Labels of `shardop_kube_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: &'static str,
    /// HTTP status code, or `error` when no response arrived.
    pub code: String,
}

/// Client-side request metrics.
#[derive(Clone, Debug, Default)]
pub struct KubeMetrics {
    /// `shardop_kube_requests_total{verb,code}`: every response (or transport error),
    /// including each throttled attempt.
    pub requests: Family<RequestLabels, Counter>,
    /// `shardop_kube_throttled_retries_total`: resends after `429 Too Many Requests`.
    pub throttled_retries: Counter,
}

impl KubeMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "shardop_kube_requests",
            "Requests to the Kubernetes API server by verb and HTTP status code",
            metrics.requests.clone(),
        );
        registry.register(
            "shardop_kube_throttled_retries",
            "Requests resent after 429 Too Many Requests, following Retry-After",
            metrics.throttled_retries.clone(),
        );
        metrics
    }
}

/// Builds clients from one inferred config, all sharing one rate limit and one set of
/// metrics. Cheap to clone.
#[derive(Clone)]
pub struct ClientFactory {
    config: kube::Config,
    bucket: TokenBucket,
    metrics: KubeMetrics,
    reachability: ApiReachability,
}

impl ClientFactory {
    /// Infers the config (in-cluster, then `KUBECONFIG` / `~/.kube/config`).
    pub async fn infer(args: &KubeClientArgs, metrics: KubeMetrics) -> Result<Self, ClientError> {
        let config = kube::Config::infer().await?;
        Ok(Self::new(config, args, metrics))
    }

    /// Uses the given config.
    pub fn new(mut config: kube::Config, args: &KubeClientArgs, metrics: KubeMetrics) -> Self {
        // Our RequestPolicy handles 429 with a capped, counted Retry-After (see module docs).
        config.default_retry = false;
        let reachability = ApiReachability::new(&config.cluster_url.to_string());
        Self {
            config,
            bucket: TokenBucket::new(args.kube_qps, args.kube_burst),
            metrics,
            reachability,
        }
    }

    /// The config the clients are built from.
    pub fn config(&self) -> &kube::Config {
        &self.config
    }

    /// The request metrics shared by all clients.
    pub fn metrics(&self) -> &KubeMetrics {
        &self.metrics
    }

    /// Whether the API server answers, as seen by every client of this factory.
    pub fn reachability(&self) -> &ApiReachability {
        &self.reachability
    }

    /// A client whose requests carry `user_agent`, e.g.
    /// `shardop-worker/shard-1 (shardop-worker-0)`. Must be called inside a Tokio runtime.
    pub fn client(&self, user_agent: &str) -> Result<kube::Client, ClientError> {
        let user_agent = HeaderValue::from_str(user_agent)
            .map_err(|_| ClientError::UserAgent(user_agent.to_owned()))?;
        let layer = RequestPolicyLayer {
            shared: Arc::new(Shared {
                user_agent,
                bucket: self.bucket.clone(),
                metrics: self.metrics.clone(),
            }),
        };
        let builder = ClientBuilder::try_from(self.config.clone())?;
        // Inside the policy: every attempt, each resend after a 429 included, is observed.
        let reachability = ReachabilityLayer::new(self.reachability.clone());
        Ok(builder.with_layer(&reachability).with_layer(&layer).build())
    }
}

struct Shared {
    user_agent: HeaderValue,
    bucket: TokenBucket,
    metrics: KubeMetrics,
}

/// Wraps kube's default stack in a [`RequestPolicy`].
#[derive(Clone)]
struct RequestPolicyLayer {
    shared: Arc<Shared>,
}

type InnerFuture<R> = BoxFuture<'static, Result<R, BoxError>>;

impl<S, R> Layer<S> for RequestPolicyLayer
where
    S: Service<Request<Body>, Response = R, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Service = RequestPolicy<Buffer<Request<Body>, InnerFuture<R>>>;

    fn layer(&self, inner: S) -> Self::Service {
        // kube's default stack is a non-Clone BoxService; a Buffer makes it clonable so a
        // throttled request can be sent again from inside our future.
        let inner = inner.map_future(|f| -> InnerFuture<R> { Box::pin(f) });
        RequestPolicy {
            inner: Buffer::new(inner, BUFFER_CAPACITY),
            shared: self.shared.clone(),
        }
    }
}

/// User agent, token bucket, request metrics and 429 handling around an inner service.
#[derive(Clone)]
pub struct RequestPolicy<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> Service<Request<Body>> for RequestPolicy<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<B>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness of the inner service is awaited on a clone inside the future, so the
        // rate-limit wait never blocks the caller's buffer worker.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let mut inner = self.inner.clone();
        let shared = self.shared.clone();
        request
            .headers_mut()
            .insert(USER_AGENT, shared.user_agent.clone());
        let verb = verb_of(request.method(), request.uri());
        Box::pin(async move {
            let mut attempt = 0;
            loop {
                let resend = (attempt < MAX_THROTTLE_RETRIES)
                    .then(|| clone_request(&request))
                    .flatten();
                shared.bucket.acquire().await;
                let result = match inner.ready().await {
                    Ok(ready) => ready.call(request).await.map_err(Into::into),
                    Err(err) => Err(err.into()),
                };
                let code = match &result {
                    Ok(response) => response.status().as_u16().to_string(),
                    Err(_) => "error".to_owned(),
                };
                shared
                    .metrics
                    .requests
                    .get_or_create(&RequestLabels { verb, code })
                    .inc();
                let response = match result {
                    Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => response,
                    other => return other,
                };
                let wait = retry_after(response.headers().get(RETRY_AFTER));
                let Some(next) = resend else {
                    // Out of resends: the caller gets the 429, but only after the wait the
                    // server asked for, so whatever backoff it adds comes on top of it
                    // and its next request cannot arrive early.
                    tracing::debug!(
                        verb,
                        wait_ms = wait.as_millis() as u64,
                        "still throttled (429) after {MAX_THROTTLE_RETRIES} resends, returning it after Retry-After"
                    );
                    tokio::time::sleep(wait).await;
                    return Ok(response);
                };
                drop(response);
                shared.metrics.throttled_retries.inc();
                tracing::debug!(
                    verb,
                    wait_ms = wait.as_millis() as u64,
                    "throttled by the API server (429), waiting for Retry-After"
                );
                tokio::time::sleep(wait).await;
                request = next;
                attempt += 1;
            }
        })
    }
}

/// A copy of a request for resending; `None` for streaming bodies (never used by kube's
/// typed API calls, which send buffered JSON).
fn clone_request(request: &Request<Body>) -> Option<Request<Body>> {
    let body = request.body().try_clone()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}

/// The wait a `Retry-After` header asks for, clamped to `1..=30` s. Only the delay-seconds
/// form is used by kube-apiserver; an HTTP date or garbage falls back to the minimum.
pub fn retry_after(header: Option<&HeaderValue>) -> Duration {
    header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(MIN_RETRY_AFTER, Duration::from_secs)
        .clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER)
}

/// The Kubernetes verb of a request, from its method and path.
///
/// Paths are `/api/v1/...` or `/apis/<group>/<version>/...`, then optionally
/// `namespaces/<ns>/`, then `<resource>[/<name>[/<subresource>]]`. A GET of a collection is
/// a `list`, or a `watch` with `watch=true`/`watch=1`.
pub fn verb_of(method: &Method, uri: &http::Uri) -> &'static str {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    let resource_path = match rest {
        // `namespaces/<ns>/<resource>...` is namespaced; `namespaces[/<ns>]` itself is the
        // cluster-scoped namespace resource.
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let named = resource_path.len() >= 2;
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb(method: Method, uri: &str) -> &'static str {
        verb_of(&method, &uri.parse().unwrap())
    }

    #[test]
    fn verbs_from_paths() {
        let dbc = "/apis/shardop.dev/v1alpha1/namespaces/ns/databaseclusters";
        assert_eq!(verb(Method::GET, dbc), "list");
        assert_eq!(
            verb(
                Method::GET,
                &format!("{dbc}?labelSelector=a%3Db&watch=true")
            ),
            "watch"
        );
        assert_eq!(verb(Method::GET, &format!("{dbc}/db-1")), "get");
        assert_eq!(verb(Method::PATCH, &format!("{dbc}/db-1/status")), "patch");
        assert_eq!(verb(Method::POST, dbc), "create");
        assert_eq!(
            verb(
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/x/leases/l"
            ),
            "update"
        );
        assert_eq!(
            verb(
                Method::DELETE,
                "/api/v1/namespaces/x/persistentvolumeclaims"
            ),
            "deletecollection"
        );
        assert_eq!(
            verb(
                Method::DELETE,
                "/api/v1/namespaces/x/persistentvolumeclaims/p"
            ),
            "delete"
        );
        assert_eq!(verb(Method::GET, "/api/v1/namespaces"), "list");
        assert_eq!(verb(Method::GET, "/api/v1/namespaces/x"), "get");
        assert_eq!(
            verb(
                Method::GET,
                "/apis/shardop.dev/v1alpha1/databaseclusters?watch=1"
            ),
            "watch"
        );
    }

    #[derive(clap::Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        kube: KubeClientArgs,
    }

    #[test]
    fn invalid_rate_limits_are_rejected() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            Flags::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .map(|f| (f.kube.kube_qps, f.kube.kube_burst))
        };
        assert_eq!(parse(&[]).unwrap(), (50.0, 100));
        assert_eq!(
            parse(&["--kube-qps", "0"]).unwrap(),
            (0.0, 100),
            "0 = no limit"
        );
        assert_eq!(
            parse(&["--kube-qps=2.5", "--kube-burst=1"]).unwrap(),
            (2.5, 1)
        );
        for bad in [
            &["--kube-qps=-1"][..],
            &["--kube-qps=NaN"],
            &["--kube-qps=inf"],
            &["--kube-qps=fast"],
            &["--kube-burst", "0"],
            &["--kube-burst=-5"],
        ] {
            let err = parse(bad).expect_err(&format!("{bad:?} must be rejected"));
            let message = err.to_string();
            assert!(message.contains("--kube-"), "{bad:?}: {message}");
        }
        let message = parse(&["--kube-qps=-1"]).unwrap_err().to_string();
        assert!(message.contains("0 = no limit"), "{message}");
    }

    #[test]
    fn retry_after_is_clamped() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(retry_after(None), Duration::from_secs(1));
        assert_eq!(retry_after(Some(&h("0"))), Duration::from_secs(1));
        assert_eq!(retry_after(Some(&h("7"))), Duration::from_secs(7));
        assert_eq!(retry_after(Some(&h("3600"))), Duration::from_secs(30));
        assert_eq!(
            retry_after(Some(&h("Wed, 21 Oct 2015 07:28:00 GMT"))),
            Duration::from_secs(1)
        );
    }

    /// A fake API server: answers 429 `throttles` times, then 200.
    #[derive(Clone)]
    struct Fake {
        throttles: Arc<std::sync::atomic::AtomicU32>,
        seen_agents: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Service<Request<Body>> for Fake {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Response<()>, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<Body>) -> Self::Future {
            use std::sync::atomic::Ordering;
            let agent = req
                .headers()
                .get(USER_AGENT)
                .map(|v| v.to_str().unwrap().to_owned());
            self.seen_agents
                .lock()
                .unwrap()
                .push(agent.unwrap_or_default());
            let throttle = self
                .throttles
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            Box::pin(async move {
                let status = if throttle {
                    StatusCode::TOO_MANY_REQUESTS
                } else {
                    StatusCode::OK
                };
                Ok(Response::builder()
                    .status(status)
                    .header(RETRY_AFTER, "2")
                    .body(())?)
            })
        }
    }

    impl Fake {
        fn throttling(times: u32) -> Self {
            Self {
                throttles: Arc::new(times.into()),
                seen_agents: Arc::default(),
            }
        }

        /// Sends one PATCH through a [`RequestPolicy`] in front of this fake; returns the
        /// response status, the time it took and the policy's metrics.
        async fn patch_through_policy(&self) -> (StatusCode, Duration, KubeMetrics) {
            let metrics = KubeMetrics::default();
            let mut service = RequestPolicy {
                inner: self.clone(),
                shared: Arc::new(Shared {
                    user_agent: HeaderValue::from_static("shardop-worker/shard-1 (w-0)"),
                    bucket: TokenBucket::new(0.0, 1),
                    metrics: metrics.clone(),
                }),
            };
            let start = tokio::time::Instant::now();
            let request = Request::builder()
                .method(Method::PATCH)
                .uri("/api/v1/namespaces/a/services/b")
                .body(Body::from(bytes::Bytes::from_static(b"{}")))
                .unwrap();
            let response = service.ready().await.unwrap().call(request).await.unwrap();
            (response.status(), start.elapsed(), metrics)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttled_requests_are_resent_after_retry_after() {
        let fake = Fake::throttling(2);
        let (status, took, metrics) = fake.patch_through_policy().await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(took, Duration::from_secs(4), "two waits of Retry-After 2 s");
        assert_eq!(metrics.throttled_retries.get(), 2);
        let count = |code: &str| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    verb: "patch",
                    code: code.into(),
                })
                .get()
        };
        assert_eq!((count("429"), count("200")), (2, 1));
        let agents = fake.seen_agents.lock().unwrap();
        assert_eq!(agents.len(), 3);
        assert!(agents.iter().all(|a| a == "shardop-worker/shard-1 (w-0)"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_handed_back_after_the_last_resend_still_waits_for_retry_after() {
        let fake = Fake::throttling(u32::MAX);
        let (status, took, metrics) = fake.patch_through_policy().await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let sends = MAX_THROTTLE_RETRIES + 1;
        assert_eq!(fake.seen_agents.lock().unwrap().len(), sends as usize);
        assert_eq!(
            metrics.throttled_retries.get(),
            u64::from(MAX_THROTTLE_RETRIES)
        );
        // Every one of the 429s, the last included, was followed by its 2 s Retry-After.
        assert_eq!(took, Duration::from_secs(2 * u64::from(sends)));
    }
}
