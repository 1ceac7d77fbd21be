//! A served shard's share of its `Shard` object's status: `holder`, `queueDepth`, `backlog`
//! and `lastHeartbeatTime`, server-side applied with the operator's worker field manager
//! (`shardop-worker`; the assigner applies its own fields with its own manager), at most
//! every 10 s and only when one of the reported values changed.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::time::Instant;

use crate::lease::LeaseGuard;
use crate::names::OperatorNames;
use crate::shard::Shard;

/// Minimum time between two heartbeat writes of one shard.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// The reported values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Holder identity.
    pub holder: String,
    /// Objects waiting for a reconcile.
    pub queue_depth: i64,
    /// Objects behind their generation.
    pub backlog: i64,
}

/// Per-shard heartbeat state.
#[derive(Debug, Default)]
pub struct Heartbeat {
    last_attempt: Option<Instant>,
    last_sent: Option<Report>,
}

impl Heartbeat {
    /// Whether `report` should be written at `now`.
    pub fn due(&self, report: &Report, now: Instant) -> bool {
        self.last_sent.as_ref() != Some(report)
            && self
                .last_attempt
                .is_none_or(|t| now.saturating_duration_since(t) >= MIN_INTERVAL)
    }

    /// Writes `report` if due. A missing Shard object (the assigner creates them) is
    /// skipped quietly and tried again after the interval.
    pub async fn maybe_send(
        &mut self,
        api: &Api<Shard>,
        names: &OperatorNames,
        guard: &LeaseGuard,
        report: Report,
    ) {
        let shard = guard.shard();
        let now = Instant::now();
        if !self.due(&report, now) || guard.check().is_err() {
            return;
        }
        self.last_attempt = Some(now);
        let name = names.shard_object_name(shard);
        let patch = json!({
            "apiVersion": crate::constants::API_GROUP.to_owned() + "/" + crate::constants::API_VERSION,
            "kind": "Shard",
            "metadata": { "name": name },
            "status": {
                "holder": report.holder,
                "queueDepth": report.queue_depth,
                "backlog": report.backlog,
                "lastHeartbeatTime": Time(jiff::Timestamp::now()),
            }
        });
        let params = PatchParams::apply(&names.worker_field_manager()).force();
        match api
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => self.last_sent = Some(report),
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                tracing::debug!(%shard, "no Shard object yet, heartbeat skipped");
            }
            // The Lease went while the write waited: the fenced client refused it, as it
            // should; the controller is being stopped.
            Err(err) if crate::client::fenced_out(&err).is_some() => {
                tracing::debug!(%shard, "heartbeat not sent: the shard's lease is gone");
            }
            Err(err) => tracing::warn!(%shard, %err, "shard heartbeat failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(queue: i64) -> Report {
        Report {
            holder: "w-0".into(),
            queue_depth: queue,
            backlog: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_on_change_and_at_most_every_ten_seconds() {
        let mut hb = Heartbeat::default();
        let now = Instant::now();
        assert!(hb.due(&report(1), now), "first report goes out at once");
        hb.last_attempt = Some(now);
        hb.last_sent = Some(report(1));
        assert!(
            !hb.due(&report(1), now + Duration::from_secs(60)),
            "unchanged"
        );
        assert!(
            !hb.due(&report(2), now + Duration::from_secs(9)),
            "too soon"
        );
        assert!(hb.due(&report(2), now + Duration::from_secs(10)));
    }
}
