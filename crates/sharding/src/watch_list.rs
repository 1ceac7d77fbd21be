//! Streaming lists (WatchList) only where the API server serves them.
//!
//! A watch with `sendInitialEvents=true` replaces the initial paginated LIST. Servers
//! before Kubernetes 1.32 (1.33 too) have the `WatchList` feature gate off by default, and
//! any server may have it switched off: such a server answers the watch with `422 Invalid`
//! ("sendInitialEvents is forbidden for watch unless the WatchList feature gate is
//! enabled"), and a watcher configured for streaming lists would retry that forever and
//! never sync. A server that predates the parameter ignores it and never sends the
//! bookmark that ends the initial events.
//!
//! So the process asks once, at start-up, with a probe watch over the shard Leases
//! ([`streaming_lists_served`]), and every watch of the process (the shard Lease watch, the
//! shard controllers' caches) uses the answer.

use std::time::Duration;

use crate::constants::SHARD_LEASE_LABEL;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::reachability::{error_chain, is_transport_error};
use crate::retry::{RetrySchedule, jitter_unit};

/// The annotation of the bookmark that ends the initial events of a streaming list.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";
/// How long the probe waits for that bookmark (the server ends the watch then).
const PROBE_TIMEOUT_SECONDS: u32 = 10;

/// Whether the API server serves streaming lists: a watch of the shard Leases in
/// `namespace` with `sendInitialEvents=true` ends its initial events with the
/// `k8s.io/initial-events-end` bookmark. `Ok(false)` when the server rejects the parameter
/// (400/422) or ignores it; `Err` when it could not be asked (unreachable, forbidden, ...).
pub async fn streaming_lists_served(client: Client, namespace: &str) -> Result<bool, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let params = WatchParams::streaming_lists()
        .labels(SHARD_LEASE_LABEL)
        .timeout(PROBE_TIMEOUT_SECONDS);
    let events = match leases.watch(&params, "").await {
        Ok(events) => events,
        Err(kube::Error::Api(status)) if refuses_streaming_lists(status.code) => {
            tracing::debug!(reason = %status.message, "the streaming-list probe was refused");
            return Ok(false);
        }
        Err(err) => return Err(err),
    };
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event? {
            WatchEvent::Bookmark(bookmark) => {
                if bookmark
                    .metadata
                    .annotations
                    .contains_key(INITIAL_EVENTS_END)
                {
                    return Ok(true);
                }
            }
            WatchEvent::Error(status) if refuses_streaming_lists(status.code) => return Ok(false),
            WatchEvent::Error(status) => return Err(kube::Error::Api(status)),
            WatchEvent::Added(lease) | WatchEvent::Modified(lease) | WatchEvent::Deleted(lease) => {
                tracing::trace!(lease = %lease.name_any(), "streaming-list probe event");
            }
        }
    }
    // The watch timed out without the bookmark: a server that ignores the parameter.
    Ok(false)
}

/// 400 or 422: the server understood the request and rejected its parameters.
fn refuses_streaming_lists(code: u16) -> bool {
    code == 400 || code == 422
}

/// Whether this process's watches use streaming lists: `requested` (the flag) and served
/// by the API server. Asks until the API server answers, backing off like every other
/// retry against it; `None` when `shutdown` comes first. Logs one line when it falls back.
pub async fn resolve_streaming_lists(
    client: Client,
    namespace: &str,
    requested: bool,
    shutdown: &CancellationToken,
) -> Option<bool> {
    if !requested {
        return Some(false);
    }
    let mut schedule = RetrySchedule::api_default();
    loop {
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return None,
            served = streaming_lists_served(client.clone(), namespace) => served,
        };
        let delay = match attempt {
            Ok(true) => return Some(true),
            Ok(false) => {
                tracing::warn!(
                    "the API server does not serve streaming lists (WatchList feature gate off \
                     or before Kubernetes 1.27): every watch of this process starts with a \
                     paginated LIST instead"
                );
                return Some(false);
            }
            Err(err) => {
                let delay = schedule.next_delay(jitter_unit());
                log_probe_failure(&err, delay);
                delay
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn log_probe_failure(err: &kube::Error, delay: Duration) {
    let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    if is_transport_error(err) {
        // The outage itself is logged once by the reachability tracker.
        tracing::debug!(error = %error_chain(err), retry_in_ms, "probing for streaming lists failed");
    } else {
        tracing::warn!(error = %error_chain(err), retry_in_ms, "probing for streaming lists failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_of_the_parameter_mean_not_served() {
        assert!(refuses_streaming_lists(422));
        assert!(refuses_streaming_lists(400));
        for transient in [403, 429, 500, 503, 504] {
            assert!(!refuses_streaming_lists(transient), "{transient}");
        }
    }
}
