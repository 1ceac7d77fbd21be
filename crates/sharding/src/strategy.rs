//! The assignment strategy: how a shard's slice of the objects is selected and who decides
//! that an object belongs to the shard. It is the seam between the runtime
//! ([`crate::Sharding`], [`crate::ShardScope`]) and the way objects are assigned.
//!
//! Today there is one strategy, [`LabelAssignment`]: the assigner stamps a shard label
//! (two-phase handover with a drain label, see `docs/shard-protocol.md`), a shard watches
//! with the label selector `<prefix>/shard=<i>`, and acts only on labels the assigner's
//! field manager wrote.
//!
//! A later strategy for server-side sharded list/watch (Kubernetes 1.36 alpha
//! `ShardedListAndWatch`, a `shardSelector` on list and watch requests) implements the same
//! trait: its [`watcher_config`](AssignmentStrategy::watcher_config) asks the API server
//! for the shard's hash range instead of a label, and its
//! [`placement`](AssignmentStrategy::placement) says an object in that range is owned (no
//! drain labels: the hash range moves with the shard count). Users' code does not change:
//! they call [`crate::ShardScope::watcher_config`], [`crate::ShardScope::controller`] and
//! [`crate::ShardScope::admit`], which ask the strategy.

use std::collections::BTreeMap;
use std::fmt::Debug;

use kube::api::ObjectMeta;
use kube::runtime::watcher;

use crate::label_trust::{shard_label_trusted, trim_to_trust_marker};
use crate::names::OperatorNames;
use crate::protocol::ObjectPlacement;
use crate::shard_index::ShardIndex;

/// How objects are assigned to shards, as far as a shard's controller is concerned.
pub trait AssignmentStrategy: Debug + Send + Sync + 'static {
    /// The watcher config that selects shard `shard`'s objects (and their children).
    fn watcher_config(&self, shard: ShardIndex) -> watcher::Config;

    /// Where an object stands in the protocol, from its metadata (as cached, after
    /// [`trim_cached`](Self::trim_cached)).
    fn placement(&self, meta: &ObjectMeta) -> ObjectPlacement;

    /// The labels a child object carries so that it follows its controller's shard.
    fn child_labels(&self, shard: ShardIndex) -> BTreeMap<String, String>;

    /// Drops from a cached object what the strategy does not need (caches are a large
    /// share of a controller's memory), keeping what [`placement`](Self::placement) reads.
    fn trim_cached(&self, meta: &mut ObjectMeta);

    /// The metadata patch that acknowledges a drain (W2): the labels to remove, as a JSON
    /// merge patch of `metadata.labels`. `None` when the strategy never drains.
    fn drain_acknowledgement(&self) -> Option<serde_json::Value>;
}

/// The label strategy: the assigner stamps `<prefix>/shard=<i>` (and `<prefix>/drain` for a
/// move), a shard watches its label selector and trusts only labels the assigner's field
/// manager owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelAssignment {
    names: OperatorNames,
}

impl LabelAssignment {
    /// The label strategy of operator `names`.
    pub fn new(names: OperatorNames) -> Self {
        Self { names }
    }
}

impl AssignmentStrategy for LabelAssignment {
    fn watcher_config(&self, shard: ShardIndex) -> watcher::Config {
        watcher::Config::default().labels(&self.names.shard_selector(shard))
    }

    fn placement(&self, meta: &ObjectMeta) -> ObjectPlacement {
        let trusted = shard_label_trusted(meta, &self.names);
        ObjectPlacement::from_labels_of(meta.labels.as_ref(), trusted, &self.names)
    }

    fn child_labels(&self, shard: ShardIndex) -> BTreeMap<String, String> {
        BTreeMap::from([(self.names.shard_label(), shard.label_value())])
    }

    fn trim_cached(&self, meta: &mut ObjectMeta) {
        trim_to_trust_marker(meta, &self.names);
    }

    fn drain_acknowledgement(&self) -> Option<serde_json::Value> {
        let mut labels = serde_json::Map::new();
        labels.insert(self.names.shard_label(), serde_json::Value::Null);
        labels.insert(self.names.drain_label(), serde_json::Value::Null);
        Some(serde_json::Value::Object(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn meta(labels: &[(&str, &str)], by_assigner: bool) -> ObjectMeta {
        let names = OperatorNames::new("tenants").unwrap();
        let entry = ManagedFieldsEntry {
            manager: Some(if by_assigner {
                names.assigner_field_manager()
            } else {
                "kubectl-edit".to_owned()
            }),
            fields_v1: Some(FieldsV1(serde_json::json!({
                "f:metadata": { "f:labels": { "f:tenants.shardop.dev/shard": {} } }
            }))),
            ..Default::default()
        };
        ObjectMeta {
            name: Some("a".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            managed_fields: Some(vec![entry]),
            ..Default::default()
        }
    }

    #[test]
    fn the_label_strategy_selects_trusts_and_labels_children_by_the_operators_names() {
        let strategy = LabelAssignment::new(OperatorNames::new("tenants").unwrap());
        let shard = ShardIndex(3);
        assert_eq!(
            strategy.watcher_config(shard).label_selector.as_deref(),
            Some("tenants.shardop.dev/shard=3")
        );
        assert_eq!(
            strategy.child_labels(shard),
            BTreeMap::from([("tenants.shardop.dev/shard".to_owned(), "3".to_owned())])
        );
        let owned = meta(&[("tenants.shardop.dev/shard", "3")], true);
        assert_eq!(strategy.placement(&owned), ObjectPlacement::Owned(shard));
        let hand_edited = meta(&[("tenants.shardop.dev/shard", "3")], false);
        assert_eq!(
            strategy.placement(&hand_edited),
            ObjectPlacement::Untrusted { labelled: shard }
        );
        let draining = meta(
            &[
                ("tenants.shardop.dev/shard", "3"),
                ("tenants.shardop.dev/drain", "1"),
            ],
            true,
        );
        assert_eq!(
            strategy.placement(&draining),
            ObjectPlacement::Draining { from: shard }
        );
    }

    #[test]
    fn a_trimmed_cache_entry_keeps_its_trust() {
        let strategy = LabelAssignment::new(OperatorNames::new("tenants").unwrap());
        for by_assigner in [true, false] {
            let mut cached = meta(&[("tenants.shardop.dev/shard", "3")], by_assigner);
            let before = strategy.placement(&cached);
            strategy.trim_cached(&mut cached);
            assert_eq!(strategy.placement(&cached), before);
            // What is kept is the marker (no entries) or nothing.
            assert!(cached.managed_fields.as_ref().is_none_or(Vec::is_empty));
            assert_eq!(cached.managed_fields.is_some(), by_assigner);
        }
    }
}
