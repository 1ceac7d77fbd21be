//! Leader election over the `<operator>-assigner` Lease (kube-lease-manager). Only the leader
//! plans and writes; a standby takes over within one Lease duration of the leader's death
//! and, because every bit of progress is in labels and Leases, simply continues.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use shardop::OperatorNames;
use shardop_runtime::reachability::{chain_has_transport_error, error_chain};
use shardop_runtime::retry::{RetrySchedule, jitter_unit};
use tokio_util::sync::CancellationToken;

/// Leader-election settings.
pub struct Election {
    /// Whose assigner this is: the Lease name and field manager.
    pub names: OperatorNames,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub grace: Duration,
}

/// Runs `lead` whenever this replica holds the leader Lease, cancelling the token it gets
/// as soon as leadership is lost, until `shutdown`; then releases the Lease so a standby
/// takes over at once.
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
    let seconds = |d: Duration| d.as_secs().max(1);
    let duration = seconds(election.duration);
    let grace = seconds(election.grace).min(duration - 1).max(1);
    anyhow::ensure!(
        duration > grace,
        "--leader-lease-duration must exceed the grace"
    );
    let Some(manager) = build_manager(client, &election, duration, grace, &shutdown).await else {
        return Ok(());
    };
    let (mut leader, task) = manager.watch().await;
    tracing::info!(identity = %election.identity, "waiting for leadership");
    loop {
        // Wait to become leader.
        while !*leader.borrow_and_update() {
            tokio::select! {
                () = shutdown.cancelled() => return finish(leader, task).await,
                changed = leader.changed() => {
                    changed.context("leader election stopped")?;
                }
            }
        }
        tracing::info!(identity = %election.identity, "became leader");
        let term = CancellationToken::new();
        let work = lead(term.clone());
        tokio::pin!(work);
        let mut shutting_down = false;
        loop {
            tokio::select! {
                () = &mut work => break,
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
            }
        }
        if shutting_down || shutdown.is_cancelled() {
            return finish(leader, task).await;
        }
    }
}

/// Sets up the election, which reads (or creates) the leader Lease: retried with the
/// API-server backoff until it succeeds, so an assigner started before the API server
/// answers waits for it instead of exiting. `None` when `shutdown` comes first.
async fn build_manager(
    client: Client,
    election: &Election,
    duration: u64,
    grace: u64,
    shutdown: &CancellationToken,
) -> Option<LeaseManager> {
    let mut schedule = RetrySchedule::api_default();
    loop {
        let built = LeaseManagerBuilder::new(client.clone(), election.names.assigner_lease_name())
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(duration)
            .with_grace(grace)
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
    leader: tokio::sync::watch::Receiver<bool>,
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
