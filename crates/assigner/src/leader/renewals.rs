//! How the leader learns that its Lease was renewed. kube-lease-manager only reports a
//! change of holder: a renewal that fails with anything but a conflict, or never answers,
//! leaves its channel at `true`. So the election's client is wrapped: every request gets
//! a timeout, and each successful PATCH that writes a `renewTime` (an acquisition or a
//! renewal by this replica; a release writes `null`) is published with the instant it
//! was sent.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use kube::client::Body;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::BoxError;

/// A Lease request that got no complete answer within the election's request timeout.
#[derive(Debug, thiserror::Error)]
#[error("leader Lease request got no answer within {0:?}")]
pub struct RequestTimedOut(Duration);

/// The instant the newest successful renewal was sent; `None` before the first.
pub type Renewals = watch::Receiver<Option<Instant>>;

/// Wraps `client` for the election (see the module docs). The instant published is when
/// the PATCH left, a moment after the library stamped `renewTime`, which is what a
/// standby counts the Lease duration from.
pub fn observe(client: kube::Client, timeout: Duration) -> (kube::Client, Renewals) {
    let default_namespace = client.default_namespace().to_owned();
    let (renewed, renewals) = watch::channel(None);
    let service = tower::service_fn(move |request: Request<Body>| {
        let client = client.clone();
        let renewed = renewed.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect_bytes().await?;
            let renews = parts.method == Method::PATCH && writes_renew_time(&body);
            let request = Request::from_parts(parts, Body::from(body));
            let sent = Instant::now();
            let response = tokio::time::timeout(timeout, send_buffered(&client, request))
                .await
                .map_err(|_| RequestTimedOut(timeout))??;
            if renews && response.status().is_success() {
                renewed.send_replace(Some(sent));
            }
            Ok::<_, BoxError>(response)
        }
    });
    (kube::Client::new(service, default_namespace), renewals)
}

/// Sends `request` and reads the whole (small) response, so the timeout also covers a
/// body that stops arriving.
async fn send_buffered(
    client: &kube::Client,
    request: Request<Body>,
) -> Result<Response<Body>, kube::Error> {
    let (parts, body) = client.send(request).await?.into_parts();
    let body = body.collect_bytes().await?;
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// Whether a Lease patch sets `spec.renewTime` (to a time, not `null`).
fn writes_renew_time(body: &Bytes) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|patch| patch.pointer("/spec/renewTime").cloned())
        .is_some_and(|time| time.is_string())
}

/// Whether a renewal was seen less than `deadline` ago; marks the newest seen.
pub fn renewed_within(renewals: &mut Renewals, deadline: Duration) -> bool {
    renewals
        .borrow_and_update()
        .is_some_and(|sent| sent.elapsed() < deadline)
}

/// When the current term must end unless another renewal succeeds first; marks the
/// newest renewal seen.
pub fn term_deadline(renewals: &mut Renewals, deadline: Duration) -> Instant {
    renewals
        .borrow_and_update()
        .map_or_else(Instant::now, |sent| sent + deadline)
}
