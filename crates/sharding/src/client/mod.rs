//! Kubernetes clients that identify themselves, respect a client-side rate limit, wait out
//! server throttling and count every request.
//!
//! The clients a [`ClientFactory`] builds share two [`TokenBucket`]s: the limit protects the
//! API server from this *process*, however many shards it serves. Bulk traffic (watches,
//! reconcile writes, the assigner's label writes) takes its tokens from the `--kube-qps`
//! bucket; Lease traffic ([`ClientFactory::lease_client`]: acquire, renew, release, hand-back
//! requests and the Lease reads they make) from a small bucket of its own
//! (`--kube-lease-qps`), so a renewal never queues behind a backlog of writes. Each client
//! carries its own user agent, because a worker that took over shard `j` must appear in the
//! audit log and in API Priority and Fairness as `shardop-worker/shard-j`.
//!
//! The request path, outermost first:
//!
//! 1. [`RequestPolicy`] (this module): sets the user agent, takes a token, counts the
//!    response in `shardop_kube_requests_total{verb,code}`, and on `429 Too Many Requests`
//!    sleeps for the server's `Retry-After` (clamped to 1..=30 s) and sends again — a
//!    throttled request is not a failure, the reconcile never sees it. After
//!    `MAX_THROTTLE_RETRIES` resends the 429 goes to the caller, still only after its
//!    `Retry-After`, so no request ever follows a 429 sooner than the server asked.
//!    With `--kube-qps-max` above `--kube-qps` the bulk bucket is adaptive: each answer
//!    tells it whether the server had room (answered a request that waited for its token
//!    in time), or was overloaded (a 429, or a write answered after [`SLOW_WRITE`]), and
//!    the rate moves between the two flags by AIMD ([`TokenBucket::adaptive`]);
//!    `shardop_kube_rate_limit_qps` shows where it is.
//!    A *fenced* client ([`ClientFactory::fenced_client`], one per held shard Lease) also
//!    checks the shard's [`LeaseGuard`] for every mutating request right before each send
//!    and resend (after the token wait, after each `Retry-After`), and abandons the request
//!    the moment the guard becomes invalid (deadline passed without a renew, Lease lost or
//!    released), wherever it is waiting. The caller gets [`LeaseLost`] (see
//!    [`fenced_out`]); a token reserved for a request that is never sent is refunded.
//!    Reads and watches are not fenced;
//! 2. kube's default stack from the inferred config (base URI, auth, extra headers, HTTP
//!    tracing, TLS connector), behind a `tower::buffer::Buffer` so it can be cloned for
//!    resends. kube's own retry layer is switched off: it follows `Retry-After` without a cap
//!    (up to 1000 s) and its retries are invisible to our metrics.

mod token_bucket;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::header::{HeaderValue, RETRY_AFTER, USER_AGENT};
use http::{Method, Request, Response, StatusCode};
use kube::client::{Body, ClientBuilder};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::lease::{LeaseGuard, LeaseLost};

pub use token_bucket::{Answer, Reservation, TokenBucket};

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
/// A write answered later than this is a sign of an overloaded API server (an adaptive
/// bulk budget halves; see [`TokenBucket::adaptive`]). Reads are not timed: a large list
/// is slow by nature.
pub const SLOW_WRITE: Duration = Duration::from_secs(1);

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
    /// Adaptive request rate: when above `--kube-qps`, the sustained rate starts at
    /// `--kube-qps` and follows the API server between the two (AIMD: it grows while
    /// answers come back in time and the limit binds, halves on a 429 or a write slower
    /// than 1 s). 0 = a fixed rate of `--kube-qps`.
    #[arg(long, env = "SHARDOP_KUBE_QPS_MAX", default_value_t = 0.0, value_parser = parse_qps)]
    pub kube_qps_max: f32,
    /// Rate limit of Lease traffic (acquire, renew, release, hand-back requests): a bucket
    /// of its own, so Lease requests never wait behind bulk writes. Sustained requests per
    /// second; 0 = no limit.
    #[arg(long, env = "SHARDOP_KUBE_LEASE_QPS", default_value_t = 10.0, value_parser = parse_qps)]
    pub kube_lease_qps: f32,
    /// Rate limit of Lease traffic: burst size, at least 1.
    #[arg(long, env = "SHARDOP_KUBE_LEASE_BURST", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_lease_burst: u32,
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
            kube_qps_max: 0.0,
            kube_lease_qps: 10.0,
            kube_lease_burst: 20,
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
    /// `shardop_kube_fenced_requests_total{verb}`: mutating requests not sent, or abandoned
    /// in flight, because the shard's Lease guard was no longer valid.
    pub fenced: Family<FencedLabels, Counter>,
    /// `shardop_kube_rate_limit_qps`: the bulk budget's current rate (an adaptive one
    /// moves; 0 without a limit).
    pub rate_limit: Gauge<f64, AtomicU64>,
}

/// Labels of `shardop_kube_fenced_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FencedLabels {
    /// Kubernetes verb.
    pub verb: &'static str,
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
        registry.register(
            "shardop_kube_rate_limit_qps",
            "Current sustained request rate of the bulk client budget (0 = no limit)",
            metrics.rate_limit.clone(),
        );
        registry.register(
            "shardop_kube_fenced_requests",
            "Mutating requests not sent or abandoned because the shard's Lease was no longer held",
            metrics.fenced.clone(),
        );
        metrics
    }
}

/// Builds clients from one inferred config, all sharing one bulk rate limit, one Lease rate
/// limit and one set of metrics. Cheap to clone.
#[derive(Clone)]
pub struct ClientFactory {
    config: kube::Config,
    bucket: TokenBucket,
    lease_bucket: TokenBucket,
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
            bucket: TokenBucket::adaptive(args.kube_qps, args.kube_qps_max, args.kube_burst),
            lease_bucket: TokenBucket::new(args.kube_lease_qps, args.kube_lease_burst),
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

    /// A client of the bulk budget whose requests carry `user_agent`, e.g.
    /// `shardop-worker/leases (shardop-worker-0)`. Must be called inside a Tokio runtime.
    pub fn client(&self, user_agent: &str) -> Result<kube::Client, ClientError> {
        self.build(self.layer(user_agent, Budget::Bulk, None)?)
    }

    /// A client of the Lease budget, for Lease requests only (acquire, renew, release,
    /// hand-back requests, and the Lease reads and watch they rely on).
    pub fn lease_client(&self, user_agent: &str) -> Result<kube::Client, ClientError> {
        self.build(self.layer(user_agent, Budget::Lease, None)?)
    }

    /// A client of the bulk budget whose mutating requests are fenced by `guard`: each one
    /// is checked right before every send and resend and abandoned when the guard becomes
    /// invalid. One per acquisition of a shard Lease.
    pub fn fenced_client(
        &self,
        user_agent: &str,
        guard: LeaseGuard,
    ) -> Result<kube::Client, ClientError> {
        self.build(self.layer(user_agent, Budget::Bulk, Some(guard))?)
    }

    fn layer(
        &self,
        user_agent: &str,
        budget: Budget,
        fence: Option<LeaseGuard>,
    ) -> Result<RequestPolicyLayer, ClientError> {
        let user_agent = HeaderValue::from_str(user_agent)
            .map_err(|_| ClientError::UserAgent(user_agent.to_owned()))?;
        let bucket = match budget {
            Budget::Bulk => &self.bucket,
            Budget::Lease => &self.lease_bucket,
        };
        Ok(RequestPolicyLayer {
            shared: Arc::new(Shared {
                user_agent,
                bucket: bucket.clone(),
                metrics: self.metrics.clone(),
                fence,
                reports_rate: budget == Budget::Bulk,
            }),
        })
    }

    fn build(&self, layer: RequestPolicyLayer) -> Result<kube::Client, ClientError> {
        let builder = ClientBuilder::try_from(self.config.clone())?;
        // Inside the policy: every attempt, each resend after a 429 included, is observed.
        let reachability = ReachabilityLayer::new(self.reachability.clone());
        Ok(builder.with_layer(&reachability).with_layer(&layer).build())
    }
}

/// Which token bucket a client takes its tokens from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Budget {
    /// `--kube-qps`: watches, reconcile writes, label writes.
    Bulk,
    /// `--kube-lease-qps`: shard Lease requests.
    Lease,
}

/// The [`LeaseLost`] a fenced client returned instead of sending a request (kube wraps it
/// as a service error), if `err` is one.
pub fn fenced_out(err: &kube::Error) -> Option<LeaseLost> {
    match err {
        kube::Error::Service(inner) => inner.downcast_ref::<LeaseLost>().copied(),
        _ => None,
    }
}

struct Shared {
    user_agent: HeaderValue,
    bucket: TokenBucket,
    metrics: KubeMetrics,
    /// The Lease guard of a fenced client: checked before every mutating send.
    fence: Option<LeaseGuard>,
    /// Whether the bucket's rate is `shardop_kube_rate_limit_qps` (the bulk budget's).
    reports_rate: bool,
}

impl Shared {
    /// Tells the bucket what the answer to a request sent at `sent` says about the
    /// server's load.
    fn observe_answer(
        &self,
        waited: bool,
        mutating: bool,
        sent: Instant,
        status: Option<StatusCode>,
    ) {
        let overloaded = status == Some(StatusCode::TOO_MANY_REQUESTS)
            || (mutating && sent.elapsed() > SLOW_WRITE);
        let answer = if overloaded {
            Answer::Overloaded
        } else if waited && status.is_some() {
            Answer::FastAfterWait
        } else {
            Answer::Fast
        };
        self.bucket.observe(answer);
        if self.reports_rate {
            let rate = self.bucket.rate();
            self.metrics
                .rate_limit
                .set(if rate.is_finite() { rate } else { 0.0 });
        }
    }
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
        let inner = self.inner.clone();
        let shared = self.shared.clone();
        request
            .headers_mut()
            .insert(USER_AGENT, shared.user_agent.clone());
        let verb = verb_of(request.method(), request.uri());
        let fence = shared
            .fence
            .clone()
            .filter(|_| is_mutating(request.method()));
        Box::pin(async move {
            let Some(guard) = fence else {
                return send_throttled(inner, &shared, request, verb, None).await;
            };
            // The fence travels with the request: whatever it waits on (a token, a
            // Retry-After, the buffer, the server), it is abandoned once the guard is invalid.
            let sent = tokio::select! {
                biased;
                () = guard.invalidated() => Err(LeaseLost(guard.shard()).into()),
                sent = send_throttled(inner, &shared, request, verb, Some(&guard)) => sent,
            };
            if sent.as_ref().is_err_and(|err| err.is::<LeaseLost>()) {
                shared
                    .metrics
                    .fenced
                    .get_or_create(&FencedLabels { verb })
                    .inc();
                tracing::debug!(verb, shard = %guard.shard(), "write fenced: the shard's lease is not held");
            }
            sent
        })
    }
}

/// Wraps an existing client so that its mutating requests are fenced by `guard`, like a
/// [`ClientFactory::fenced_client`]: each is checked right before it is sent and abandoned
/// once the guard becomes invalid; the caller gets [`LeaseLost`] (see [`fenced_out`]).
/// Reads and watches pass untouched. Use it when the process builds its own clients (no
/// [`ClientFactory`]: no shared rate limit, user agent or request metrics are added).
pub fn fence_client(client: kube::Client, guard: LeaseGuard) -> kube::Client {
    let default_namespace = client.default_namespace().to_owned();
    let service = tower::service_fn(move |request: Request<Body>| {
        let client = client.clone();
        let guard = guard.clone();
        async move {
            if !is_mutating(request.method()) {
                return client.send(request).await.map_err(BoxError::from);
            }
            guard.check()?;
            let on_the_wire = AbandonedWrite::new(guard.clone());
            let sent = tokio::select! {
                biased;
                () = guard.invalidated() => Err(LeaseLost(guard.shard()).into()),
                sent = client.send(request) => sent.map_err(BoxError::from),
            };
            // A transport error (a timeout, a reset) does not say the server never got it.
            if sent.is_ok() {
                on_the_wire.answered();
            }
            sent
        }
    });
    kube::Client::new(service, default_namespace)
}

/// A fenced write on the wire: dropped before [`Self::answered`] (given up, or failed
/// without an answer), it tells its guard that the write may still land.
struct AbandonedWrite(Option<LeaseGuard>);

impl AbandonedWrite {
    fn new(guard: LeaseGuard) -> Self {
        Self(Some(guard))
    }

    /// The server answered: nothing of this write is left in flight.
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for AbandonedWrite {
    fn drop(&mut self) {
        if let Some(guard) = self.0.take() {
            guard.note_abandoned_write();
        }
    }
}

/// Whether a request changes state (everything but reads and watches).
fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Sends `request`, resending after 429s (see the module docs). With `fence`, the guard is
/// checked after each token wait, immediately before the send.
async fn send_throttled<S, B>(
    mut inner: S,
    shared: &Shared,
    mut request: Request<Body>,
    verb: &'static str,
    fence: Option<&LeaseGuard>,
) -> Result<Response<B>, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>> + Send,
    S::Error: Into<BoxError>,
{
    let mut attempt = 0;
    loop {
        let resend = (attempt < MAX_THROTTLE_RETRIES)
            .then(|| clone_request(&request))
            .flatten();
        let token = shared.bucket.reservation().ready().await;
        if let Some(guard) = fence {
            // Dropping the unused token refunds it.
            guard.check()?;
        }
        let waited = token.waited();
        token.consume();
        let mutating = is_mutating(request.method());
        let sent = Instant::now();
        // Dropped before the answer (the caller gave up, the controller was aborted), a
        // write may still be applied by the server: the guard remembers it.
        let on_the_wire = fence
            .filter(|_| mutating)
            .map(|guard| AbandonedWrite::new(guard.clone()));
        let result = match inner.ready().await {
            Ok(ready) => ready.call(request).await.map_err(Into::into),
            Err(err) => Err(err.into()),
        };
        // A transport error (a timeout, a reset) does not say the server never got it.
        if let (Some(write), Ok(_)) = (on_the_wire, &result) {
            write.answered();
        }
        shared.observe_answer(
            waited,
            mutating,
            sent,
            result.as_ref().ok().map(Response::status),
        );
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
        /// Never answer (a request stuck in flight).
        hang: bool,
    }

    impl Service<Request<Body>> for Fake {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;
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
            let hang = self.hang;
            Box::pin(async move {
                if hang {
                    futures::future::pending::<()>().await;
                }
                let status = if throttle {
                    StatusCode::TOO_MANY_REQUESTS
                } else {
                    StatusCode::OK
                };
                Ok(Response::builder()
                    .status(status)
                    .header(RETRY_AFTER, "2")
                    .body(Body::from(b"{}".to_vec()))?)
            })
        }
    }

    impl Fake {
        fn throttling(times: u32) -> Self {
            Self {
                throttles: Arc::new(times.into()),
                seen_agents: Arc::default(),
                hang: false,
            }
        }

        fn hanging() -> Self {
            Self {
                hang: true,
                ..Self::throttling(0)
            }
        }

        fn sent(&self) -> usize {
            self.seen_agents.lock().unwrap().len()
        }

        /// A [`RequestPolicy`] in front of this fake, with `bucket` and `fence`.
        fn policy(&self, bucket: TokenBucket, fence: Option<LeaseGuard>) -> RequestPolicy<Self> {
            RequestPolicy {
                inner: self.clone(),
                shared: Arc::new(Shared {
                    user_agent: HeaderValue::from_static("shardop-worker/shard-1 (w-0)"),
                    bucket,
                    metrics: KubeMetrics::default(),
                    fence,
                    reports_rate: true,
                }),
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
                    fence: None,
                    reports_rate: true,
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

    fn request(method: Method) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri("/apis/apps/v1/namespaces/a/statefulsets/b")
            .body(Body::from(bytes::Bytes::from_static(b"{}")))
            .unwrap()
    }

    async fn send<S>(service: &mut S, method: Method) -> Result<StatusCode, BoxError>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    {
        let response = service.ready().await?.call(request(method)).await?;
        Ok(response.status())
    }

    fn lease_lost(result: Result<StatusCode, BoxError>) -> bool {
        result.is_err_and(|err| err.downcast_ref::<LeaseLost>() == Some(&LeaseLost(ShardIndex(1))))
    }

    use crate::ShardIndex;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waited_for_a_token_is_not_sent_once_the_lease_is_gone() {
        let fake = Fake::throttling(0);
        let guard =
            LeaseGuard::detached(ShardIndex(1), Instant::now() + Duration::from_millis(500));
        let mut policy = fake.policy(TokenBucket::new(1.0, 1), Some(guard));
        assert_eq!(
            send(&mut policy, Method::PATCH).await.unwrap(),
            StatusCode::OK
        );
        // The second write passes the guard (valid for 500 ms more), then waits 1 s for its
        // token: by then the Lease may belong to someone else.
        let start = Instant::now();
        assert!(lease_lost(send(&mut policy, Method::PATCH).await));
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "abandoned at valid_until"
        );
        assert_eq!(fake.sent(), 1, "the late write never left the process");
        let fenced = policy
            .shared
            .metrics
            .fenced
            .get_or_create(&FencedLabels { verb: "patch" })
            .get();
        assert_eq!(fenced, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_write_is_not_resent_once_the_lease_is_gone() {
        // 429 with Retry-After 2 s; the guard runs out after 1 s.
        let fake = Fake::throttling(1);
        let guard = LeaseGuard::detached(ShardIndex(1), Instant::now() + Duration::from_secs(1));
        let mut policy = fake.policy(TokenBucket::new(0.0, 1), Some(guard));
        assert!(lease_lost(send(&mut policy, Method::PATCH).await));
        assert_eq!(fake.sent(), 1, "no resend after the Retry-After");
    }

    #[tokio::test(start_paused = true)]
    async fn the_guard_is_checked_after_the_token_wait_even_if_it_is_never_awaited() {
        // A guard that is already invalid: the send itself is refused (the check right
        // before the send), not only the wait for it.
        let fake = Fake::throttling(0);
        let guard = LeaseGuard::detached(ShardIndex(1), Instant::now());
        let mut policy = fake.policy(TokenBucket::new(0.0, 1), Some(guard));
        assert!(lease_lost(send(&mut policy, Method::POST).await));
        assert!(lease_lost(send(&mut policy, Method::DELETE).await));
        assert_eq!(fake.sent(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_in_flight_is_abandoned_when_the_lease_is_lost() {
        let fake = Fake::hanging();
        let guard = LeaseGuard::detached(ShardIndex(1), Instant::now() + Duration::from_secs(60));
        let mut policy = fake.policy(TokenBucket::new(0.0, 1), Some(guard.clone()));
        let start = Instant::now();
        let write = tokio::spawn(async move { send(&mut policy, Method::PATCH).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(fake.sent(), 1, "the write is in flight");
        guard.invalidate();
        let abandoned = tokio::time::timeout(Duration::from_secs(30), write).await;
        assert!(lease_lost(abandoned.expect("still in flight").unwrap()));
        assert_eq!(start.elapsed(), Duration::from_secs(1), "cancelled at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_given_up_on_the_wire_is_remembered_by_its_guard() {
        let guard = LeaseGuard::detached(ShardIndex(1), Instant::now() + Duration::from_secs(60));
        // Answered: nothing is left in flight.
        let mut policy = Fake::throttling(0).policy(TokenBucket::new(0.0, 1), Some(guard.clone()));
        send(&mut policy, Method::PATCH).await.unwrap();
        assert_eq!(guard.abandoned_at(), None);
        // Given up (the controller aborted) while the server has not answered.
        let fake = Fake::hanging();
        let mut policy = fake.policy(TokenBucket::new(0.0, 1), Some(guard.clone()));
        let write = tokio::spawn(async move { send(&mut policy, Method::PATCH).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(fake.sent(), 1, "the write is in flight");
        write.abort();
        let _ = write.await;
        assert_eq!(guard.abandoned_at(), Some(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn reads_are_not_fenced() {
        let fake = Fake::throttling(0);
        let guard = LeaseGuard::detached(ShardIndex(1), Instant::now());
        let mut policy = fake.policy(TokenBucket::new(0.0, 1), Some(guard));
        assert_eq!(
            send(&mut policy, Method::GET).await.unwrap(),
            StatusCode::OK
        );
        assert_eq!(fake.sent(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_write_gives_its_token_back() {
        let fake = Fake::throttling(0);
        let bucket = TokenBucket::new(1.0, 1);
        let guard = LeaseGuard::detached(ShardIndex(1), Instant::now() + Duration::from_secs(60));
        let mut fenced = fake.policy(bucket.clone(), Some(guard.clone()));
        send(&mut fenced, Method::PATCH).await.unwrap();
        // Five writes wait for tokens (0.5 s apart) when the Lease is lost.
        let writes: Vec<_> = (0..5)
            .map(|_| {
                let mut policy = fenced.clone();
                tokio::spawn(async move { send(&mut policy, Method::PATCH).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        guard.invalidate();
        for write in writes {
            assert!(lease_lost(write.await.unwrap()));
        }
        // Another shard's write waits for the rest of one token, not behind five dead ones.
        let start = Instant::now();
        let mut other = fake.policy(bucket, None);
        send(&mut other, Method::PATCH).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(900));
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_budget_grows_with_timely_answers_and_halves_on_a_429() {
        let bucket = TokenBucket::adaptive(10.0, 100.0, 1);
        let mut policy = Fake::throttling(0).policy(bucket.clone(), None);
        // The first write takes the burst; the next 20 wait for their tokens and are
        // answered at once.
        for _ in 0..21 {
            send(&mut policy, Method::PATCH).await.unwrap();
        }
        assert_eq!(bucket.rate(), 15.0);
        assert_eq!(policy.shared.metrics.rate_limit.get(), 15.0);
        let mut throttled = Fake::throttling(1).policy(bucket.clone(), None);
        send(&mut throttled, Method::PATCH).await.unwrap();
        assert_eq!(bucket.rate(), 10.0, "halved, but not below --kube-qps");
    }

    #[tokio::test]
    async fn a_fixed_budget_stays_fixed() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let factory =
            ClientFactory::new(config, &KubeClientArgs::default(), KubeMetrics::default());
        factory.bucket.observe(Answer::FastAfterWait);
        assert_eq!(factory.bucket.rate(), 50.0);
        let args = KubeClientArgs {
            kube_qps_max: 80.0,
            ..KubeClientArgs::default()
        };
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let factory = ClientFactory::new(config, &args, KubeMetrics::default());
        factory.bucket.observe(Answer::FastAfterWait);
        assert_eq!(factory.bucket.rate(), 50.25);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_traffic_is_not_delayed_by_an_exhausted_bulk_bucket() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let args = KubeClientArgs {
            kube_qps: 1.0,
            kube_burst: 1,
            ..KubeClientArgs::default()
        };
        let factory = ClientFactory::new(config, &args, KubeMetrics::default());
        let fake = Fake::throttling(0);
        let mut bulk = factory
            .layer("shardop-worker/shard-1 (w-0)", Budget::Bulk, None)
            .unwrap()
            .layer(fake.clone());
        // A backlog of bulk writes: 30 s worth of tokens reserved.
        let _backlog: Vec<Reservation> = (0..30).map(|_| factory.bucket.reservation()).collect();
        let waited = tokio::time::timeout(Duration::from_secs(5), send(&mut bulk, Method::PATCH));
        assert!(waited.await.is_err(), "the bulk budget is exhausted");
        let mut leases = factory
            .layer("shardop-worker/shard-1 (w-0)", Budget::Lease, None)
            .unwrap()
            .layer(fake.clone());
        let start = Instant::now();
        assert_eq!(
            send(&mut leases, Method::PUT).await.unwrap(),
            StatusCode::OK
        );
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a renew waited behind bulk writes"
        );
    }

    #[tokio::test]
    async fn a_fenced_write_reaches_the_caller_as_lease_lost() {
        let fake = Fake::throttling(0);
        let guard = LeaseGuard::detached(ShardIndex(1), Instant::now());
        let client = kube::Client::new(fake.policy(TokenBucket::new(0.0, 1), Some(guard)), "a");
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(client, "a");
        let err = api
            .delete("b", &kube::api::DeleteParams::default())
            .await
            .unwrap_err();
        assert_eq!(fenced_out(&err), Some(LeaseLost(ShardIndex(1))), "{err:?}");
        assert_eq!(fake.sent(), 0);
    }
}
