//! The periodic resync: every object of a shard's cache is reconciled again once per
//! [`RESYNC_PERIOD`], a safety net against an event lost to a bug in event filtering. It
//! costs no API request (children and status are compared with the caches).
//!
//! The period is cut into [`SLOTS`] ticks and each object belongs to one of them by a hash
//! of its uid, so objects converged together (a mass creation, a restart) do not come back
//! together. The resync is not a requeue of every converged object: kube-runtime's
//! scheduler would hold a delay-queue entry and two map entries per object for the whole
//! hour (about 0.6 KB each in a heap profile), most of a worker's memory that is not the
//! objects themselves.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};

/// How often every object is reconciled again without an event.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(60 * 60);

/// Into how many ticks the period is cut.
pub const SLOTS: u32 = 60;

/// The tick of the period an object with `uid` is resynced at: FNV-1a 64 of the uid, so
/// that it is the same in every process and after every restart.
pub fn slot_of(uid: &str, slots: u32) -> u32 {
    let hash = uid.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    // The remainder is below `slots`, a u32.
    u32::try_from(hash % u64::from(slots.max(1))).unwrap_or_default()
}

/// The objects of `store` due for their resync, tick after tick of `period` / [`SLOTS`]
/// (the first tick one tick after the call): at tick `n`, those whose
/// [`slot_of`] is `n mod SLOTS`. Lazy: the store is read when a tick is taken, so a
/// controller that stops polling while busy delays the resync but queues nothing.
pub fn due_for_resync<K>(
    store: Store<K>,
    period: Duration,
) -> impl Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let tick = period / SLOTS;
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    // After a stall, the next tick comes one tick later rather than in a burst.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold((interval, 0_u32), |(mut interval, n)| async move {
        interval.tick().await;
        Some((n % SLOTS, (interval, n.wrapping_add(1))))
    })
    .flat_map(move |slot| {
        let due: Vec<ObjectRef<K>> = store
            .state()
            .iter()
            .filter(|object| {
                slot_of(object.meta().uid.as_deref().unwrap_or_default(), SLOTS) == slot
            })
            .map(|object| ObjectRef::from_obj(object.as_ref()))
            .collect();
        futures::stream::iter(due)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;
    use shardop_api::DatabaseCluster;

    fn cluster(name: &str) -> DatabaseCluster {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "shardop.dev/v1alpha1",
            "kind": "DatabaseCluster",
            "metadata": { "name": name, "namespace": "ns", "uid": format!("uid-of-{name}") },
            "spec": { "replicas": 1, "image": "postgres:17", "storage": { "size": "1Gi" } },
        }))
        .unwrap()
    }

    #[test]
    fn slots_are_stable_and_spread_evenly() {
        assert_eq!(slot_of("a-uid", SLOTS), slot_of("a-uid", SLOTS));
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            slot_of("a", 1000),
            (0xaf63_dc4c_8601_ec8c_u64 % 1000) as u32
        );
        let mut counts = vec![0_u32; SLOTS as usize];
        for i in 0..60_000 {
            let uid = format!("6f1c2a9e-0000-4000-8000-{i:012}");
            counts[slot_of(&uid, SLOTS) as usize] += 1;
        }
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(min > 850 && max < 1150, "1,000 each expected: {min}..{max}");
        assert_eq!(slot_of("anything", 0), 0, "no slots: one");
    }

    #[tokio::test(start_paused = true)]
    async fn every_object_comes_due_once_per_period_at_its_own_tick() {
        let (store, mut writer) = reflector::store();
        let names: Vec<String> = (0..200).map(|i| format!("db-{i}")).collect();
        for name in &names {
            writer.apply_watcher_event(&Event::Apply(cluster(name)));
        }
        let period = Duration::from_secs(3600);
        let started = tokio::time::Instant::now();
        let mut due = Box::pin(due_for_resync(store, period));
        let mut seen = std::collections::HashMap::new();
        // Two periods: every object twice, one period apart, at its slot's tick.
        while seen.values().map(Vec::len).sum::<usize>() < 2 * names.len() {
            let object = due.next().await.unwrap();
            let at = started.elapsed();
            seen.entry(object.name.clone())
                .or_insert_with(Vec::new)
                .push(at);
        }
        assert_eq!(seen.len(), names.len());
        let tick = period / SLOTS;
        for (name, times) in &seen {
            let slot = slot_of(&format!("uid-of-{name}"), SLOTS);
            assert_eq!(
                times,
                &[tick * (slot + 1), tick * (slot + 1) + period],
                "{name}"
            );
        }
    }
}
