//! Heap bytes per cached object, measured with dhat's heap statistics (only with
//! `--features heap-profile`, whose global allocator counts every allocation):
//!
//! ```text
//! cargo test -p shardop-worker --features heap-profile --bin shardop-worker cache_footprint -- --nocapture
//! ```
//!
//! Run alone (the filter above): the allocator counts every thread, so tests running
//! beside it would add their own allocations.
#![cfg(all(test, feature = "heap-profile"))]

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};
use kube::Resource;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use shardop::change_filter::ChangeFilter;
use shardop::{AssignmentStrategy, LabelAssignment, OperatorNames};
use shardop_api::{DatabaseCluster, ShardIndex};

use crate::child_cache::{Projected, sample_parent};
use crate::child_events::ChildCache;
use crate::child_store::ChildStore;
use crate::children::{desired_service, desired_stateful_set};
use crate::cluster_cache::CachedCluster;
use crate::controller::drop_unread_metadata;

/// Objects per measurement: enough that hash tables and one-off allocations fade.
const OBJECTS: usize = 2_000;

/// Heap bytes and blocks per object that `fill` leaves allocated.
struct PerObject {
    bytes: f64,
    blocks: f64,
}

fn per_object<T>(fill: impl FnOnce() -> T) -> (PerObject, T) {
    let before = dhat::HeapStats::get();
    let held = fill();
    let after = dhat::HeapStats::get();
    let per = |n: usize| n as f64 / OBJECTS as f64;
    let measured = PerObject {
        bytes: per(after.curr_bytes - before.curr_bytes),
        blocks: per(after.curr_blocks - before.curr_blocks),
    };
    (measured, held)
}

/// DatabaseCluster `i` as the API server serves it: a name, uid and resourceVersion of
/// its own, the shard label the assigner owns, the finalizer.
fn served_cluster(i: usize) -> DatabaseCluster {
    let mut cluster = sample_parent();
    let meta = &mut cluster.metadata;
    meta.name = Some(format!("orders-{i:05}"));
    meta.namespace = Some("shop".into());
    meta.uid = Some(format!("5f0c1d2e-aaaa-bbbb-cccc-{i:012}"));
    meta.resource_version = Some(format!("{}", 1_000_000 + i));
    meta.generation = Some(1);
    meta.creation_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
    meta.labels = Some(BTreeMap::from([("shardop.dev/shard".into(), "0".into())]));
    meta.finalizers = Some(vec!["shardop.dev/cleanup".into()]);
    meta.managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some("shardop-assigner".into()),
        operation: Some("Apply".into()),
        fields_type: Some("FieldsV1".into()),
        fields_v1: Some(FieldsV1(serde_json::json!({
            "f:metadata": {"f:labels": {"f:shardop.dev/shard": {}}}
        }))),
        ..Default::default()
    }]);
    cluster
}

/// `child` as served: a uid and resourceVersion of its own.
fn served<K: Resource>(mut child: K, i: usize) -> K {
    child.meta_mut().uid = Some(format!("9a8b7c6d-1111-2222-3333-{i:012}"));
    child.meta_mut().resource_version = Some(format!("{}", 2_000_000 + i));
    child.meta_mut().generation = Some(1);
    child
}

/// A child store filled by a watch's initial list of `children`.
fn listed<K: Projected>(children: &[K]) -> ChildStore<K> {
    let store = ChildStore::default();
    let mut cache = ChildCache::new(store.clone());
    cache.apply(&Event::Init);
    for child in children {
        cache.apply(&Event::InitApply(child.clone()));
    }
    cache.apply(&Event::InitDone);
    store
}

#[test]
fn cache_footprint() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let clusters: Vec<DatabaseCluster> = (0..OBJECTS).map(served_cluster).collect();
    let stateful_sets: Vec<StatefulSet> = (0..OBJECTS)
        .map(|i| served(desired_stateful_set(&clusters[i], ShardIndex(0)), i))
        .collect();
    let services: Vec<Service> = (0..OBJECTS)
        .map(|i| served(desired_service(&clusters[i], ShardIndex(0)), i))
        .collect();

    let (sts, _sts_store) = per_object(|| listed(&stateful_sets));
    let (svc, _svc_store) = per_object(|| listed(&services));
    let (cluster, _cluster_store) = per_object(|| {
        let (reader, mut writer) = reflector::store::<CachedCluster>();
        writer.apply_watcher_event(&Event::Init);
        for cluster in &clusters {
            // Trimmed as the worker's watch trims it.
            let mut cluster = cluster.clone();
            LabelAssignment::default().trim_cached(&mut cluster.metadata);
            drop_unread_metadata(&mut cluster);
            writer.apply_watcher_event(&Event::InitApply(CachedCluster::of(cluster)));
        }
        writer.apply_watcher_event(&Event::InitDone);
        (reader, writer)
    });
    let (filter, _filter) = per_object(|| {
        let mut filter = ChangeFilter::new(OperatorNames::default());
        for cluster in &clusters {
            // What stays allocated is the filter's own: the object it passes on is dropped.
            drop(filter.admit(Event::InitApply(cluster.clone())));
        }
        filter
    });
    for (what, measured) in [
        ("StatefulSet in the child store", &sts),
        ("Service in the child store", &svc),
        ("DatabaseCluster in the reflector store", &cluster),
        ("DatabaseCluster in the change filter", &filter),
    ] {
        eprintln!(
            "{what}: {:.0} B in {:.1} blocks per object",
            measured.bytes, measured.blocks
        );
    }
    // A child is its compressed text and its map entry; the typed metadata and the
    // reflector's key strings it once had took about a kilobyte in fifteen blocks.
    for child in [&sts, &svc] {
        assert!(child.bytes < 400.0, "{} B per child", child.bytes);
        assert!(child.blocks < 2.5, "{} blocks per child", child.blocks);
    }
    // The filter's entry lives in its table's slots: no allocation of its own. Keyed by
    // namespace and name as strings it took about 100 B more in three blocks.
    assert!(filter.bytes < 80.0, "{} B per filter entry", filter.bytes);
    assert!(
        filter.blocks < 0.1,
        "{} blocks per filter entry",
        filter.blocks
    );
}
