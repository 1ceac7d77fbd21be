//! The per-shard bookkeeping of the DatabaseCluster controller (a leaf module): what this
//! shard wrote and the watch has not delivered yet (apply and status memos), the terminal
//! problem per generation, and when each unconverged change was first seen. Shared by a
//! shard's controllers and reconciles behind one lock; only methods touch the maps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use shardop_api::DatabaseClusterStatus;
use tokio::time::Instant;

/// The resourceVersion as a number. Kubernetes calls it opaque, but with etcd it is the
/// store revision; it is only used to tell "the cache has not caught up with our own write
/// yet" from "someone changed the object since", and anything unparsable means "apply".
pub fn numeric_resource_version<K: Resource>(object: &K) -> Option<u64> {
    object.meta().resource_version.as_deref()?.parse().ok()
}

/// The key of an object.
pub fn key_of<K: Resource>(object: &K) -> ObjectKey {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// A problem retrying cannot fix, shown as `Degraded=True`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TerminalProblem {
    /// CamelCase reason, e.g. `StatefulSetRejected`.
    pub reason: String,
    /// Human-readable detail (the API server's message).
    pub message: String,
}

/// A status this worker wrote, kept until the watch delivers the write (or a later version).
#[derive(Clone, Debug, PartialEq)]
pub struct WrittenStatus {
    /// The object's resourceVersion our write produced.
    pub resource_version: u64,
    /// The status as the server returned it.
    pub status: DatabaseClusterStatus,
}

impl WrittenStatus {
    /// Whether `cached` already holds this write or a later version of the object. A
    /// resourceVersion that is not a number counts as seen: the cache answers then, and
    /// the worst outcome is one redundant write.
    pub fn is_seen_in(&self, cached: &impl Resource) -> bool {
        numeric_resource_version(cached).is_none_or(|seen| seen >= self.resource_version)
    }
}

/// `namespace/name`, the key of an object in the bookkeeping maps.
pub type ObjectKey = String;

/// Per-object bookkeeping of one shard, shared by its controllers and its reconciles.
#[derive(Default)]
pub struct Bookkeeping {
    /// When a spec change of an object was first seen, for the lag histogram.
    unconverged_since: HashMap<ObjectKey, Instant>,
    /// The last terminal problem per object UID and the generation it belongs to: the
    /// same generation is not re-applied (no requeue storm).
    terminal: HashMap<String, (Option<i64>, TerminalProblem)>,
    /// The last server-side apply of each child (`Kind/namespace/name`): fingerprint of the
    /// desired object, resourceVersion and object returned. Lets a reconcile that runs
    /// before the watch delivered our own write skip re-applying it; an entry is dropped as
    /// soon as the watch delivers that version, so the memo holds only writes in flight.
    applied: HashMap<String, AppliedMemo>,
    /// The last status written per object, until the watch delivers that write: a
    /// reconcile in between compares with it instead of the stale cached status.
    status_written: HashMap<ObjectKey, WrittenStatus>,
}

/// A child object as returned by its last apply (a StatefulSet or a Service).
pub type AppliedObject = Arc<dyn std::any::Any + Send + Sync>;

/// The memo of a child's last apply: fingerprint of the desired object, resourceVersion
/// and object returned.
pub type AppliedMemo = (u64, Option<u64>, AppliedObject);

impl Bookkeeping {
    /// Records that a spec change of the object was seen (kept from the first sighting
    /// until it converges).
    pub fn mark_unconverged(&mut self, key: &str) {
        self.unconverged_since
            .entry(key.to_owned())
            .or_insert_with(Instant::now);
    }

    /// The object's change converged (or it stopped counting: Degraded, gone): returns
    /// when it was first seen.
    pub fn converged(&mut self, key: &str) -> Option<Instant> {
        self.unconverged_since.remove(key)
    }

    /// The terminal problem recorded for the object's current generation, if any.
    pub fn known_problem(&self, uid: &str, generation: Option<i64>) -> Option<TerminalProblem> {
        self.terminal
            .get(uid)
            .filter(|(g, _)| *g == generation)
            .map(|(_, p)| p.clone())
    }

    /// Records the outcome of applying generation `generation`: its terminal problem, or
    /// none (which forgets an earlier one).
    pub fn record_problem(
        &mut self,
        uid: &str,
        generation: Option<i64>,
        problem: Option<&TerminalProblem>,
    ) {
        match problem {
            Some(p) => {
                self.terminal
                    .insert(uid.to_owned(), (generation, p.clone()));
            }
            None => {
                self.terminal.remove(uid);
            }
        }
    }

    /// The memo of a child's last apply (see [`Self::applied_key`]).
    pub fn applied_memo(&self, key: &str) -> Option<AppliedMemo> {
        self.applied.get(key).cloned()
    }

    /// Remembers a child's apply until the watch delivers it.
    pub fn remember_applied(&mut self, key: String, memo: AppliedMemo) {
        self.applied.insert(key, memo);
    }

    /// The status this shard wrote for the object and the watch has not delivered yet.
    pub fn written_status(&self, key: &str) -> Option<WrittenStatus> {
        self.status_written.get(key).cloned()
    }

    /// Remembers a status write unless a later one is remembered already.
    pub fn remember_status(&mut self, key: &str, written: WrittenStatus) {
        if self
            .status_written
            .get(key)
            .is_none_or(|previous| previous.resource_version < written.resource_version)
        {
            self.status_written.insert(key.to_owned(), written);
        }
    }

    /// Forgets everything about an object whose cleanup finished.
    pub fn forget_deleted(&mut self, key: &str, uid: &str, cluster: &impl Resource) {
        self.terminal.remove(uid);
        self.unconverged_since.remove(key);
        self.forget_object(cluster);
    }

    /// The apply memo key of a child.
    pub fn applied_key(kind: &str, namespace: &str, name: &str) -> String {
        format!("{kind}/{namespace}/{name}")
    }

    /// Drops the apply memo of a child once the watch delivered the applied version (or a
    /// later one): from then on the cache answers for it.
    pub fn forget_applied_once_seen<K: Resource<DynamicType = ()>>(&mut self, child: &K) {
        let key = Self::applied_key(
            &K::kind(&()),
            child.meta().namespace.as_deref().unwrap_or_default(),
            child.meta().name.as_deref().unwrap_or_default(),
        );
        let seen = numeric_resource_version(child);
        if let Some((_, applied_version, _)) = self.applied.get(&key)
            && seen.is_some_and(|seen| applied_version.is_none_or(|applied| seen >= applied))
        {
            self.applied.remove(&key);
        }
    }

    /// Drops the status memo of an object once the watch delivered the written version
    /// (or a later one).
    pub fn forget_status_once_seen(&mut self, cluster: &impl Resource) {
        let key = key_of(cluster);
        if self
            .status_written
            .get(&key)
            .is_some_and(|written| written.is_seen_in(cluster))
        {
            self.status_written.remove(&key);
        }
    }

    /// Age of the oldest change the shard is still working on: objects seen behind their
    /// generation and not converged since, still in the shard (`cached` finds them), and not
    /// Degraded for their current generation: those wait for the user to change the spec,
    /// their condition says why, and counting them would keep the gauge high for a problem
    /// the operator cannot fix. Zero when there is none.
    pub fn oldest_unconverged<K: Resource>(
        &self,
        now: Instant,
        cached: impl Fn(&str) -> Option<Arc<K>>,
    ) -> Duration {
        self.unconverged_since
            .iter()
            .filter(|(key, _)| cached(key).is_some_and(|object| !self.is_degraded(object.meta())))
            .map(|(_, since)| now.saturating_duration_since(*since))
            .max()
            .unwrap_or_default()
    }

    /// Whether the object's current generation was found impossible to apply.
    fn is_degraded(&self, object: &ObjectMeta) -> bool {
        object
            .uid
            .as_ref()
            .and_then(|uid| self.terminal.get(uid))
            .is_some_and(|(generation, _)| *generation == object.generation)
    }

    /// Forgets what this shard wrote for an object that leaves it (drained, deleted):
    /// the status memo and the apply memo of its children.
    pub fn forget_object(&mut self, cluster: &impl Resource) {
        self.status_written.remove(&key_of(cluster));
        self.forget_children(
            cluster.meta().namespace.as_deref().unwrap_or_default(),
            cluster.meta().name.as_deref().unwrap_or_default(),
        );
    }

    /// Forgets the apply memo of a DatabaseCluster's children.
    fn forget_children(&mut self, namespace: &str, name: &str) {
        self.applied
            .remove(&Self::applied_key("StatefulSet", namespace, name));
        self.applied.remove(&Self::applied_key(
            "Service",
            namespace,
            &crate::children::service_name(name),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use shardop_api::DatabaseCluster;

    fn cached_cluster(name: &str, uid: &str, generation: i64) -> Arc<DatabaseCluster> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "shardop.dev/v1alpha1",
                "kind": "DatabaseCluster",
                "metadata": { "namespace": "ns", "name": name, "uid": uid, "generation": generation },
                "spec": { "replicas": 1, "image": "postgres:17", "storage": { "size": "1Gi" } },
            }))
            .unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_unconverged_change_counts_objects_still_in_the_shard_and_not_degraded() {
        let mut book = Bookkeeping::default();
        let cache: HashMap<&str, Arc<DatabaseCluster>> = HashMap::from([
            ("ns/stuck", cached_cluster("stuck", "u-stuck", 1)),
            ("ns/fresh", cached_cluster("fresh", "u-fresh", 1)),
            ("ns/degraded", cached_cluster("degraded", "u-degraded", 2)),
        ]);
        let cached = |key: &str| cache.get(key).cloned();
        assert_eq!(
            book.oldest_unconverged(Instant::now(), cached),
            Duration::ZERO
        );

        book.unconverged_since
            .insert("ns/degraded".into(), Instant::now());
        book.unconverged_since
            .insert("ns/gone".into(), Instant::now());
        book.terminal.insert(
            "u-degraded".into(),
            (
                Some(2),
                TerminalProblem {
                    reason: "StatefulSetRejected".into(),
                    message: "invalid".into(),
                },
            ),
        );
        tokio::time::advance(Duration::from_secs(100)).await;
        book.unconverged_since
            .insert("ns/stuck".into(), Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        book.unconverged_since
            .insert("ns/fresh".into(), Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        // Degraded and no longer cached (left the shard) are older but do not count.
        assert_eq!(
            book.oldest_unconverged(Instant::now(), cached),
            Duration::from_secs(35)
        );
        // A new generation of the Degraded object is being worked on again.
        let cache = HashMap::from([("ns/degraded", cached_cluster("degraded", "u-degraded", 3))]);
        assert_eq!(
            book.oldest_unconverged(Instant::now(), |key: &str| cache.get(key).cloned()),
            Duration::from_secs(135)
        );
        // Converged: gone from the map.
        book.unconverged_since.remove("ns/stuck");
        book.unconverged_since.remove("ns/fresh");
        book.unconverged_since.remove("ns/degraded");
        assert_eq!(
            book.oldest_unconverged(Instant::now(), cached),
            Duration::ZERO
        );
    }

    #[test]
    fn the_apply_memo_is_dropped_once_the_watch_delivers_the_applied_version() {
        let service = |version: &str| Service {
            metadata: kube::api::ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("a-headless".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut book = Bookkeeping::default();
        let key = Bookkeeping::applied_key("Service", "ns", "a-headless");
        book.applied.insert(
            key.clone(),
            (1, Some(7), Arc::new(service("7")) as AppliedObject),
        );
        // An older version (the watch is still behind our write) keeps it.
        book.forget_applied_once_seen(&service("6"));
        assert!(book.applied.contains_key(&key));
        // The applied version, or a later one, makes the cache authoritative again.
        book.forget_applied_once_seen(&service("7"));
        assert!(!book.applied.contains_key(&key));
    }

    #[test]
    fn the_status_memo_is_dropped_once_the_watch_delivers_the_write() {
        let cluster = |version: &str| -> DatabaseCluster {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "shardop.dev/v1alpha1",
                "kind": "DatabaseCluster",
                "metadata": { "namespace": "ns", "name": "a", "resourceVersion": version },
                "spec": { "replicas": 1, "image": "postgres:17", "storage": { "size": "1Gi" } },
            }))
            .unwrap()
        };
        let mut book = Bookkeeping::default();
        let written = WrittenStatus {
            resource_version: 7,
            status: Default::default(),
        };
        book.status_written.insert("ns/a".into(), written);
        book.forget_status_once_seen(&cluster("6"));
        assert!(book.status_written.contains_key("ns/a"));
        book.forget_status_once_seen(&cluster("8"));
        assert!(book.status_written.is_empty());

        book.status_written.insert(
            "ns/a".into(),
            WrittenStatus {
                resource_version: 9,
                status: Default::default(),
            },
        );
        book.forget_object(&cluster("9"));
        assert!(book.status_written.is_empty());
    }
}
