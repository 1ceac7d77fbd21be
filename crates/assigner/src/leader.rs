//! Leader election over the `<operator>-assigner` Lease (kube-lease-manager). Only the leader
//! plans and writes; a standby takes over within one Lease duration of the leader's death
//! and, because every bit of progress is in labels and Leases, simply continues. A leader
//! that cannot renew stops at its renew deadline, before the Lease expires, so two
//! leaders never decide at once (given clocks that agree within the difference).

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use shardop::OperatorNames;
use shardop_runtime::reachability::{chain_has_transport_error, error_chain};
use shardop_runtime::retry::{RetrySchedule, jitter_unit};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::renewals::{Renewals, renewed_within, term_deadline};

mod renewals;

/// Leader-election settings.
pub struct Election {
    /// Whose assigner this is: the Lease name and field manager.
    pub names: OperatorNames,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub grace: Duration,
    /// A term ends once no renewal has succeeded for this long: shorter than `duration`,
    /// so the leader stops deciding before a standby may take the Lease over. `None`:
    /// `duration` minus half the grace.
    pub renew_deadline: Option<Duration>,
}

/// The Lease duration and grace in whole seconds, as the Lease stores them, and the renew
/// deadline.
struct Timing {
    duration: u64,
    grace: u64,
    renew_deadline: Duration,
}

impl Timing {
    /// Checks that a renewal falls due before the renew deadline, and the deadline comes
    /// before the Lease expires.
    fn new(election: &Election) -> anyhow::Result<Self> {
        let seconds = |d: Duration| d.as_secs().max(1);
        let duration = seconds(election.duration);
        let grace = seconds(election.grace).min(duration - 1).max(1);
        anyhow::ensure!(
            duration > grace,
            "--leader-lease-duration must exceed the grace"
        );
        let lease = Duration::from_secs(duration);
        let interval = Duration::from_secs(duration - grace);
        let renew_deadline = election
            .renew_deadline
            .unwrap_or(lease - Duration::from_secs(grace) / 2);
        anyhow::ensure!(
            renew_deadline < lease && renew_deadline > interval,
            "--leader-renew-deadline must lie between the renewal interval \
             (--leader-lease-duration minus --leader-lease-grace) and the Lease duration"
        );
        Ok(Self {
            duration,
            grace,
            renew_deadline,
        })
    }

    /// How long one election request may take: half the time left for retries between a
    /// renewal falling due and the renew deadline, at least a second.
    fn request_timeout(&self) -> Duration {
        let interval = Duration::from_secs(self.duration - self.grace);
        (self.renew_deadline.saturating_sub(interval) / 2).max(Duration::from_secs(1))
    }
}

/// Runs `lead` whenever this replica holds the leader Lease and has renewed it within the
/// renew deadline, cancelling the token it gets as soon as either stops being true, until
/// `shutdown`; then releases the Lease so a standby takes over at once.
pub async fn run<F, Fut>(
    client: Client,
    election: Election,
    shutdown: CancellationToken,
    mut lead: F,
) -> anyhow::Result<()>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let timing = Timing::new(&election)?;
    let (client, mut renewals) = renewals::observe(client, timing.request_timeout());
    let Some(manager) = build_manager(client, &election, &timing, &shutdown).await else {
        return Ok(());
    };
    let (mut leader, task) = manager.watch().await;
    tracing::info!(identity = %election.identity, "waiting for leadership");
    loop {
        let waited = wait_for_term(&mut leader, &mut renewals, &timing, &shutdown).await;
        if !waited? {
            return finish(leader, task).await;
        }
        tracing::info!(identity = %election.identity, "became leader");
        let term = CancellationToken::new();
        let shutting_down = serve_term(
            lead(term.clone()),
            &term,
            &mut leader,
            &mut renewals,
            timing.renew_deadline,
            &shutdown,
        )
        .await;
        if shutting_down || shutdown.is_cancelled() {
            return finish(leader, task).await;
        }
    }
}

/// Waits until this replica holds the Lease and has renewed it within the renew deadline;
/// `false` when `shutdown` comes first.
async fn wait_for_term(
    leader: &mut watch::Receiver<bool>,
    renewals: &mut Renewals,
    timing: &Timing,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    while !(*leader.borrow_and_update() && renewed_within(renewals, timing.renew_deadline)) {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            changed = leader.changed() => {
                changed.context("leader election stopped")?;
            }
            Ok(()) = renewals.changed() => {}
        }
    }
    Ok(true)
}

/// Drives one term's `work` to its end, cancelling `term` when the library reports the
/// Lease lost, when no renewal has succeeded for `renew_deadline` (a failing or hung
/// renewal leaves the library's channel at `true`), or on shutdown. Returns whether the
/// term ended for shutdown.
async fn serve_term(
    work: impl Future<Output = ()>,
    term: &CancellationToken,
    leader: &mut watch::Receiver<bool>,
    renewals: &mut Renewals,
    renew_deadline: Duration,
    shutdown: &CancellationToken,
) -> bool {
    tokio::pin!(work);
    let mut shutting_down = false;
    loop {
        let deadline = term_deadline(renewals, renew_deadline);
        tokio::select! {
            () = &mut work => return shutting_down,
            () = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                term.cancel();
            }
            changed = leader.changed(), if !term.is_cancelled() => {
                if changed.is_err() || !*leader.borrow_and_update() {
                    tracing::warn!("lost leadership, stopping");
                    term.cancel();
                }
            }
            Ok(()) = renewals.changed(), if !term.is_cancelled() => {}
            () = tokio::time::sleep_until(deadline), if !term.is_cancelled() => {
                tracing::warn!(
                    renew_deadline_ms = u64::try_from(renew_deadline.as_millis()).unwrap_or(u64::MAX),
                    "the leader Lease was not renewed within the renew deadline, stopping"
                );
                term.cancel();
            }
        }
    }
}

/// Sets up the election, which reads (or creates) the leader Lease: retried with the
/// API-server backoff until it succeeds, so an assigner started before the API server
/// answers waits for it instead of exiting. `None` when `shutdown` comes first.
async fn build_manager(
    client: Client,
    election: &Election,
    timing: &Timing,
    shutdown: &CancellationToken,
) -> Option<LeaseManager> {
    let mut schedule = RetrySchedule::api_default();
    loop {
        let built = LeaseManagerBuilder::new(client.clone(), election.names.assigner_lease_name())
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(timing.duration)
            .with_grace(timing.grace)
            .with_field_manager(election.names.assigner_field_manager())
            .build();
        let error = tokio::select! {
            () = shutdown.cancelled() => return None,
            built = built => match built {
                Ok(manager) => return Some(manager),
                Err(error) => error,
            },
        };
        let delay = schedule.next_delay(jitter_unit());
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let cause = error_chain(&error);
        if lease_error_is_transport(&error) {
            // The outage itself is logged once by the reachability tracker.
            tracing::debug!(error = %cause, retry_in_ms, "setting up leader election failed");
        } else {
            tracing::warn!(error = %cause, retry_in_ms, "setting up leader election failed");
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whether kube-lease-manager failed because no response arrived.
fn lease_error_is_transport(error: &LeaseManagerError) -> bool {
    chain_has_transport_error(error)
}

/// Drops the control channel, which makes the manager release the Lease, and waits a
/// moment for that release.
async fn finish(
    leader: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
) -> anyhow::Result<()> {
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(_))) => tracing::info!("leader lease released"),
        Ok(Ok(Err(err))) => tracing::warn!(%err, "releasing the leader lease failed"),
        Ok(Err(err)) => tracing::warn!(%err, "leader election task failed"),
        Err(_) => tracing::warn!("releasing the leader lease timed out"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use tokio::time::Instant;

    use super::*;

    /// What the mock API server does with Lease PATCHes once this replica acquired it.
    #[derive(Clone, Copy, Debug)]
    enum AfterAcquire {
        Fail,
        Hang,
    }

    /// An API server holding one Lease: GETs read it, PATCHes merge their `spec` into it
    /// until the acquisition's two PATCHes are done; later ones fail or never answer.
    fn lease_server(after: AfterAcquire) -> Client {
        let lease = Arc::new(Mutex::new(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "shardop-assigner", "namespace": "ns", "resourceVersion": "1"},
            "spec": {},
        })));
        let patches = Arc::new(Mutex::new(0_usize));
        let service = tower::service_fn(move |request: Request<Body>| {
            let lease = Arc::clone(&lease);
            let patches = Arc::clone(&patches);
            async move {
                let is_patch = request.method() == http::Method::PATCH;
                let body = request.into_body().collect_bytes().await?;
                if is_patch {
                    let n = {
                        let mut patches = patches.lock().unwrap();
                        *patches += 1;
                        *patches
                    };
                    match (n > 2, after) {
                        (true, AfterAcquire::Fail) => return Ok(server_error()),
                        (true, AfterAcquire::Hang) => std::future::pending::<()>().await,
                        (false, _) => merge_spec(&mut lease.lock().unwrap(), &body),
                    }
                }
                let lease = lease.lock().unwrap().clone();
                Ok::<_, tower::BoxError>(Response::new(Body::from(
                    serde_json::to_vec(&lease).unwrap(),
                )))
            }
        });
        Client::new(service, "ns")
    }

    fn merge_spec(lease: &mut serde_json::Value, patch: &[u8]) {
        let patch: serde_json::Value = serde_json::from_slice(patch).unwrap();
        let spec = lease["spec"].as_object_mut().unwrap();
        for (key, value) in patch["spec"].as_object().unwrap() {
            spec.insert(key.clone(), value.clone());
        }
        spec.retain(|_, value| !value.is_null());
    }

    fn server_error() -> Response<Body> {
        let status = serde_json::json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "etcd is sad", "reason": "InternalError", "code": 500,
        });
        let mut response = Response::new(Body::from(serde_json::to_vec(&status).unwrap()));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response
    }

    /// When each term started and ended.
    type Terms = Arc<Mutex<Vec<(Instant, Option<Instant>)>>>;

    fn election() -> Election {
        Election {
            names: OperatorNames::default(),
            namespace: "ns".to_owned(),
            identity: "me".to_owned(),
            duration: Duration::from_secs(15),
            grace: Duration::from_secs(10),
            renew_deadline: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_stops_within_the_renew_deadline() {
        for after in [AfterAcquire::Fail, AfterAcquire::Hang] {
            let terms: Terms = Arc::default();
            let shutdown = CancellationToken::new();
            let lead = {
                let terms = Arc::clone(&terms);
                move |term: CancellationToken| {
                    let terms = Arc::clone(&terms);
                    terms.lock().unwrap().push((Instant::now(), None));
                    async move {
                        term.cancelled().await;
                        terms.lock().unwrap().last_mut().unwrap().1 = Some(Instant::now());
                    }
                }
            };
            let election =
                tokio::spawn(run(lease_server(after), election(), shutdown.clone(), lead));
            tokio::time::sleep(Duration::from_secs(60)).await;
            shutdown.cancel();
            election.await.unwrap().unwrap();
            let terms = terms.lock().unwrap().clone();
            let (started, ended) = terms[0];
            let ended = ended.unwrap_or_else(|| panic!("{after:?}: the term never ended"));
            assert!(
                ended - started <= Duration::from_secs(10),
                "{after:?}: the term lasted {:?}",
                ended - started
            );
            assert_eq!(terms.len(), 1, "{after:?}: no renewal, no second term");
        }
    }

    #[test]
    fn the_renew_deadline_lies_between_the_renewal_interval_and_the_duration() {
        let timing = Timing::new(&election()).unwrap();
        assert_eq!(timing.renew_deadline, Duration::from_secs(10));
        assert_eq!(timing.request_timeout(), Duration::from_millis(2500));
        for bad in [5, 15] {
            let election = Election {
                renew_deadline: Some(Duration::from_secs(bad)),
                ..election()
            };
            assert!(Timing::new(&election).is_err(), "{bad}s accepted");
        }
    }
}
