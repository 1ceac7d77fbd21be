//! The state of a shard Lease, judged from a snapshot of the Lease object.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;

use crate::names::OperatorNames;
use crate::shard_index::ShardIndex;

/// The protocol-relevant fields of a shard Lease.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LeaseSnapshot {
    /// `spec.holderIdentity`, `None` when empty.
    pub holder: Option<String>,
    /// Whether the Lease was ever acquired (`spec.acquireTime` set).
    pub acquired_once: bool,
    /// `spec.renewTime`.
    pub renew_time: Option<Timestamp>,
    /// `spec.leaseDurationSeconds`.
    pub duration: Option<Duration>,
    /// Who asked the holder to release the Lease (hand-back or retirement).
    pub release_requested_by: Option<String>,
    /// The shard is no longer part of the desired shard count.
    pub retired: bool,
    /// The ordinal of the shard's home worker, when the assigner named one (fixed shard
    /// count, shards spread over the workers); `None`: worker `i` is home for shard `i`.
    /// A value that is not a canonical index below `MAX_SHARDS` reads as `None`.
    pub home_worker: Option<ShardIndex>,
}

impl LeaseSnapshot {
    /// Reads the protocol fields from a Lease object.
    pub fn from_lease(lease: &Lease) -> Self {
        Self::from_lease_of(lease, &OperatorNames::default())
    }

    /// [`from_lease`](Self::from_lease) with the annotation keys of operator `names`.
    pub fn from_lease_of(lease: &Lease, names: &OperatorNames) -> Self {
        let spec = lease.spec.as_ref();
        let annotations = lease.metadata.annotations.as_ref();
        let annotation = |key: &str| {
            annotations
                .and_then(|a| a.get(key))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            acquired_once: spec.is_some_and(|s| s.acquire_time.is_some()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|d| u64::try_from(d).ok())
                .map(Duration::from_secs),
            release_requested_by: annotation(&names.release_requested_annotation()),
            retired: annotation(&names.retired_annotation()).is_some_and(|v| v == "true"),
            home_worker: annotation(&names.home_worker_annotation())
                .and_then(|v| v.parse::<ShardIndex>().ok()),
        }
    }

    /// The ordinal of `shard`'s home worker: the one the assigner named, else `shard`
    /// itself.
    pub fn home_of(&self, shard: ShardIndex) -> ShardIndex {
        self.home_worker.unwrap_or(shard)
    }

    /// When the current holder's claim runs out, if there is a holder.
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.holder.as_ref()?;
        let renewed = self.renew_time?;
        let duration = jiff::SignedDuration::try_from(self.duration?).ok()?;
        renewed.checked_add(duration).ok()
    }

    /// Whether a holder renews it in time at wall-clock time `now`: `state(now).is_live()`
    /// without copying the holder's name, as a planning pass asks it once per object.
    pub fn is_live_at(&self, now: Timestamp) -> bool {
        self.expires_at().is_some_and(|expires| now < expires)
    }

    /// The state of the Lease at wall-clock time `now`.
    pub fn state(&self, now: Timestamp) -> LeaseState {
        match (&self.holder, self.expires_at()) {
            (None, _) => LeaseState::Released,
            (Some(holder), Some(expires)) if now < expires => LeaseState::Held {
                holder: holder.clone(),
            },
            // A holder without renewTime/duration can never be judged alive: treat it as
            // expired so that a malformed Lease cannot block a shard forever.
            (Some(holder), _) => LeaseState::Expired {
                holder: holder.clone(),
            },
        }
    }
}

/// The state of a shard Lease (see "State of a shard Lease" in `docs/shard-protocol.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// No Lease object exists.
    Absent,
    /// A holder renews it in time.
    Held {
        /// The holder identity (a worker pod name).
        holder: String,
    },
    /// Its holder stopped renewing.
    Expired {
        /// The last holder identity.
        holder: String,
    },
    /// Its holder let it go on purpose.
    Released,
}

impl LeaseState {
    /// The state of an optional snapshot (`None` = no Lease object).
    pub fn of(snapshot: Option<&LeaseSnapshot>, now: Timestamp) -> Self {
        snapshot.map_or(Self::Absent, |s| s.state(now))
    }

    /// Whether some worker serves the shard right now.
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Held { .. })
    }

    /// The live holder, if any.
    pub fn live_holder(&self) -> Option<&str> {
        match self {
            Self::Held { holder } => Some(holder),
            _ => None,
        }
    }
}

/// The home shard of a worker identity: the StatefulSet ordinal at the end of its pod name
/// (`shardop-worker-2` → shard 2). An ordinal at or above `MAX_SHARDS` has no home shard.
/// Where a Lease names a home worker ([`LeaseSnapshot::home_worker`]), this is the
/// worker's ordinal, compared with that name.
pub fn home_shard_of(identity: &str) -> Option<ShardIndex> {
    let (_, ordinal) = identity.rsplit_once('-')?;
    ordinal.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::{
        HOME_WORKER_ANNOTATION, RELEASE_REQUESTED_ANNOTATION, RETIRED_ANNOTATION,
    };
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use std::collections::BTreeMap;

    fn ts(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn held(holder: &str, renewed: i64, duration: u64) -> LeaseSnapshot {
        LeaseSnapshot {
            holder: Some(holder.to_owned()),
            acquired_once: true,
            renew_time: Some(ts(renewed)),
            duration: Some(Duration::from_secs(duration)),
            ..Default::default()
        }
    }

    #[test]
    fn held_until_renew_time_plus_duration() {
        let lease = held("shardop-worker-1", 100, 15);
        assert!(LeaseState::of(Some(&lease), ts(114)).is_live());
        assert_eq!(
            lease.state(ts(115)),
            LeaseState::Expired {
                holder: "shardop-worker-1".into()
            }
        );
    }

    #[test]
    fn absent_released_and_malformed() {
        assert_eq!(LeaseState::of(None, ts(0)), LeaseState::Absent);
        let released = LeaseSnapshot {
            acquired_once: true,
            ..Default::default()
        };
        assert_eq!(released.state(ts(0)), LeaseState::Released);
        let no_renew = LeaseSnapshot {
            holder: Some("w-0".into()),
            ..Default::default()
        };
        assert!(!no_renew.state(ts(0)).is_live());
    }

    #[test]
    fn is_live_at_agrees_with_the_state() {
        let no_renew = LeaseSnapshot {
            holder: Some("w-0".into()),
            ..Default::default()
        };
        let released = LeaseSnapshot {
            renew_time: Some(ts(100)),
            duration: Some(Duration::from_secs(15)),
            ..Default::default()
        };
        for lease in [held("w-1", 100, 15), no_renew, released] {
            for now in [0, 99, 100, 114, 115, 200] {
                assert_eq!(lease.is_live_at(ts(now)), lease.state(ts(now)).is_live());
            }
        }
    }

    #[test]
    fn reads_a_lease_object() {
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                annotations: Some(BTreeMap::from([
                    (
                        RELEASE_REQUESTED_ANNOTATION.to_owned(),
                        "shardop-worker-1".to_owned(),
                    ),
                    (RETIRED_ANNOTATION.to_owned(), "true".to_owned()),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                acquire_time: Some(MicroTime(ts(5))),
                renew_time: Some(MicroTime(ts(10))),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
        };
        let snapshot = LeaseSnapshot::from_lease(&lease);
        assert_eq!(snapshot.holder, None, "an empty holder is no holder");
        assert!(snapshot.acquired_once);
        assert!(snapshot.retired);
        assert_eq!(
            snapshot.release_requested_by.as_deref(),
            Some("shardop-worker-1")
        );
        assert_eq!(snapshot.state(ts(11)), LeaseState::Released);
        assert_eq!(snapshot.home_worker, None);
        assert_eq!(snapshot.home_of(ShardIndex(4)), ShardIndex(4));
    }

    #[test]
    fn reads_the_home_worker_and_ignores_a_garbled_one() {
        let with_home = |value: &str| {
            LeaseSnapshot::from_lease(&Lease {
                metadata: kube::api::ObjectMeta {
                    annotations: Some(BTreeMap::from([(
                        HOME_WORKER_ANNOTATION.to_owned(),
                        value.to_owned(),
                    )])),
                    ..Default::default()
                },
                spec: None,
            })
        };
        assert_eq!(with_home("2").home_worker, Some(ShardIndex(2)));
        assert_eq!(with_home("2").home_of(ShardIndex(7)), ShardIndex(2));
        for garbled in ["", "02", "x", "-1", "1024"] {
            let snapshot = with_home(garbled);
            assert_eq!(snapshot.home_worker, None, "{garbled:?}");
            assert_eq!(snapshot.home_of(ShardIndex(7)), ShardIndex(7));
        }
    }

    #[test]
    fn home_shard_is_the_pod_ordinal() {
        assert_eq!(home_shard_of("shardop-worker-0"), Some(ShardIndex(0)));
        assert_eq!(home_shard_of("my-release-worker-12"), Some(ShardIndex(12)));
        assert_eq!(home_shard_of("shardop-worker-01"), None);
        assert_eq!(home_shard_of("worker"), None);
        assert_eq!(home_shard_of("shardop-assigner"), None);
        assert_eq!(home_shard_of("shardop-worker-1023"), Some(ShardIndex(1023)));
        assert_eq!(home_shard_of("shardop-worker-1024"), None);
        assert_eq!(home_shard_of("shardop-worker-4294967295"), None);
    }
}
