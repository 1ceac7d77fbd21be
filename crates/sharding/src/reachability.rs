//! Whether the API server answers, as seen by every request this process sends, and the
//! only place that logs an outage.
//!
//! Every client a [`crate::ClientFactory`] builds passes each attempt through a
//! [`ReachabilityLayer`]: any HTTP response (whatever its status) means the API server is
//! reachable; an attempt that ends without a response (connection refused, reset, TLS
//! failure, timeout) means it is not. The process then logs, naming the API server's
//! address and the cause:
//!
//! * one `WARN` line at the first failed attempt of an outage;
//! * one `WARN` summary every [`SUMMARY_INTERVAL`] while it lasts (failed attempts, last
//!   cause);
//! * one `INFO` line when the API server answers again.
//!
//! Everything else that fails because of the outage (watches, the supervisor's steps,
//! start-up) logs at `debug` when [`is_transport_error`] says so, which keeps the log rate
//! bounded however long the API server is away. `/readyz` uses [`ApiReachability::is_reachable`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::Request;
use kube::client::Body;
use tower::{BoxError, Layer, Service};

/// How often a lasting outage is summarised in the log.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(30);

/// Whether an outage is being reported (between the "unreachable" and the "reachable again"
/// line): the log filter in [`crate::telemetry`] drops libraries' per-retry lines meanwhile.
static OUTAGE_REPORTED: AtomicBool = AtomicBool::new(false);

/// Whether this process is reporting an API server outage right now.
pub fn outage_reported() -> bool {
    OUTAGE_REPORTED.load(Ordering::Relaxed)
}

/// What an observation changed, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The first failed attempt after a response (or since start-up).
    Unreachable {
        /// Why the attempt failed.
        cause: String,
    },
    /// The outage lasts; emitted once per [`SUMMARY_INTERVAL`].
    StillUnreachable {
        /// Since the first failed attempt.
        elapsed: Duration,
        /// Failed attempts since then.
        failures: u64,
        /// Why the latest one failed.
        cause: String,
    },
    /// The first response after an outage.
    Reachable {
        /// How long the outage lasted.
        elapsed: Duration,
        /// Failed attempts during the outage.
        failures: u64,
    },
}

#[derive(Debug)]
struct Outage {
    since: Instant,
    failures: u64,
    next_summary: Instant,
}

/// The pure state: responses and failures in, log transitions out.
#[derive(Debug, Default)]
pub struct OutageTracker {
    answered: bool,
    outage: Option<Outage>,
}

impl OutageTracker {
    /// A response arrived at `now`.
    pub fn on_response(&mut self, now: Instant) -> Option<Transition> {
        self.answered = true;
        let outage = self.outage.take()?;
        Some(Transition::Reachable {
            elapsed: now.saturating_duration_since(outage.since),
            failures: outage.failures,
        })
    }

    /// An attempt failed without a response at `now`, because of `cause`.
    pub fn on_failure(&mut self, now: Instant, cause: String) -> Option<Transition> {
        match &mut self.outage {
            None => {
                self.outage = Some(Outage {
                    since: now,
                    failures: 1,
                    next_summary: now + SUMMARY_INTERVAL,
                });
                Some(Transition::Unreachable { cause })
            }
            Some(outage) => {
                outage.failures = outage.failures.saturating_add(1);
                if now < outage.next_summary {
                    return None;
                }
                outage.next_summary = now + SUMMARY_INTERVAL;
                Some(Transition::StillUnreachable {
                    elapsed: now.saturating_duration_since(outage.since),
                    failures: outage.failures,
                    cause,
                })
            }
        }
    }

    /// Whether the API server has answered and the latest attempt got a response.
    pub fn is_reachable(&self) -> bool {
        self.answered && self.outage.is_none()
    }
}

/// The process-wide view of the API server's reachability. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiReachability {
    server: Arc<str>,
    tracker: Arc<Mutex<OutageTracker>>,
}

impl ApiReachability {
    /// Tracks the API server at `server` (its URL, for the log).
    pub fn new(server: &str) -> Self {
        Self {
            server: server.into(),
            tracker: Arc::default(),
        }
    }

    /// The API server's address.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Whether the API server has answered and the latest attempt got a response; false
    /// before the first response.
    pub fn is_reachable(&self) -> bool {
        self.lock().is_reachable()
    }

    /// Records an HTTP response (any status).
    pub fn record_response(&self) {
        let transition = self.lock().on_response(Instant::now());
        self.log(transition);
    }

    /// Records an attempt that ended without a response.
    pub fn record_failure(&self, error: &(dyn std::error::Error + 'static)) {
        let transition = self.lock().on_failure(Instant::now(), error_chain(error));
        self.log(transition);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutageTracker> {
        // Poisoned only if a thread panicked between two field updates; still usable.
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self, transition: Option<Transition>) {
        let server = &*self.server;
        match &transition {
            Some(Transition::Unreachable { .. }) => OUTAGE_REPORTED.store(true, Ordering::Relaxed),
            Some(Transition::Reachable { .. }) => OUTAGE_REPORTED.store(false, Ordering::Relaxed),
            _ => {}
        }
        match transition {
            None => {}
            Some(Transition::Unreachable { cause }) => tracing::warn!(
                api_server = server,
                %cause,
                "API server unreachable; retrying with backoff (a summary follows every {}s while it lasts)",
                SUMMARY_INTERVAL.as_secs()
            ),
            Some(Transition::StillUnreachable {
                elapsed,
                failures,
                cause,
            }) => tracing::warn!(
                api_server = server,
                %cause,
                failures,
                outage_s = elapsed.as_secs(),
                "API server still unreachable"
            ),
            Some(Transition::Reachable { elapsed, failures }) => tracing::info!(
                api_server = server,
                failures,
                outage_s = elapsed.as_secs(),
                "API server reachable again"
            ),
        }
    }
}

/// An error and its sources, joined by `": "` (repeated messages once): "client error
/// (Connect): tcp connect error: Connection refused (os error 111)".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Whether a kube error means that no response arrived (the outage is logged by
/// [`ApiReachability`], so the caller need not log it again).
pub fn is_transport_error(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Service(_) | kube::Error::HyperError(_))
}

/// [`is_transport_error`] for a watcher's errors.
pub fn is_watch_transport_error(error: &kube::runtime::watcher::Error) -> bool {
    use kube::runtime::watcher::Error;
    match error {
        Error::InitialListFailed(err) | Error::WatchStartFailed(err) | Error::WatchFailed(err) => {
            is_transport_error(err)
        }
        Error::WatchError(_) | Error::NoResourceVersion => false,
    }
}

/// Whether any error in an `anyhow` chain is a [`is_transport_error`].
pub fn chain_has_transport_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(err) = next {
        if err
            .downcast_ref::<kube::Error>()
            .is_some_and(is_transport_error)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Logs a failed watch at `warn`, or at `debug` when the API server is unreachable (see
/// the module docs). `what` names the watch, e.g. "shard leases".
pub fn log_watch_error(what: &str, error: &kube::runtime::watcher::Error) {
    if is_watch_transport_error(error) {
        tracing::debug!(watch = what, %error, "watch failed, retrying");
    } else {
        tracing::warn!(watch = what, %error, "watch failed, retrying");
    }
}

/// Feeds every attempt's outcome into an [`ApiReachability`].
#[derive(Clone, Debug)]
pub struct ReachabilityLayer {
    reachability: ApiReachability,
}

impl ReachabilityLayer {
    /// Records into `reachability`.
    pub fn new(reachability: ApiReachability) -> Self {
        Self { reachability }
    }
}

impl<S> Layer<S> for ReachabilityLayer {
    type Service = Reachability<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Reachability {
            inner,
            reachability: self.reachability.clone(),
        }
    }
}

/// See [`ReachabilityLayer`].
#[derive(Clone, Debug)]
pub struct Reachability<S> {
    inner: S,
    reachability: ApiReachability,
}

impl<S, R> Service<Request<Body>> for Reachability<S>
where
    S: Service<Request<Body>, Response = R, Error = BoxError>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<R, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let response = self.inner.call(request);
        let reachability = self.reachability.clone();
        Box::pin(async move {
            let result = response.await;
            match &result {
                Ok(_) => reachability.record_response(),
                Err(error) => reachability.record_failure(error.as_ref()),
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_outage_then_one_summary_per_interval_then_recovery() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut tracker = OutageTracker::default();
        assert!(!tracker.is_reachable(), "unknown before the first response");
        assert_eq!(tracker.on_response(at(0)), None);
        assert!(tracker.is_reachable());

        assert_eq!(
            tracker.on_failure(at(1), "refused".into()),
            Some(Transition::Unreachable {
                cause: "refused".into()
            })
        );
        assert!(!tracker.is_reachable());
        // A failed attempt every 100 ms for 65 s: two summaries, nothing else.
        let lines: Vec<Transition> = (11..=650)
            .filter_map(|tenth| {
                let now = start + Duration::from_millis(tenth * 100);
                tracker.on_failure(now, "refused".into())
            })
            .collect();
        assert_eq!(
            lines,
            [
                Transition::StillUnreachable {
                    elapsed: Duration::from_secs(30),
                    failures: 301,
                    cause: "refused".into()
                },
                Transition::StillUnreachable {
                    elapsed: Duration::from_secs(60),
                    failures: 601,
                    cause: "refused".into()
                },
            ]
        );
        assert_eq!(
            tracker.on_response(at(70)),
            Some(Transition::Reachable {
                elapsed: Duration::from_secs(69),
                failures: 641
            })
        );
        assert!(tracker.is_reachable());
        assert_eq!(tracker.on_response(at(71)), None);
        // The next outage is reported afresh.
        assert!(matches!(
            tracker.on_failure(at(80), "reset".into()),
            Some(Transition::Unreachable { .. })
        ));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn the_cause_names_every_source() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = Outer(Inner(refused));
        assert_eq!(
            error_chain(&error),
            "client error (Connect): tcp connect error: connection refused"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("acquiring shard 0")]
    struct Wrapped(#[source] kube::Error);

    #[test]
    fn only_errors_without_a_response_are_transport_errors() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let service = kube::Error::Service(Box::new(refused));
        assert!(is_transport_error(&service));
        let api = kube::Error::Api(Box::new(kube::core::Status::failure(
            "conflict", "Conflict",
        )));
        assert!(!is_transport_error(&api));
        let wrapped = Wrapped(service);
        assert!(chain_has_transport_error(&wrapped));
        assert!(!chain_has_transport_error(&Wrapped(api)));
        assert!(is_watch_transport_error(
            &kube::runtime::watcher::Error::WatchStartFailed(kube::Error::Service(Box::new(
                std::io::Error::from(std::io::ErrorKind::TimedOut)
            )))
        ));
    }
}
