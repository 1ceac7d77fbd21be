//! A compact record per sharded object, fed by metadata-only watches: just what the
//! protocol needs (labels and the shard label's field manager reduced to a placement,
//! resourceVersion, deletion, key hash), so
//! memory stays a small fraction of a worker's full-object caches.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use jiff::Timestamp;
use kube::api::DynamicObject;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use shardop::assignment::object_key_hash;
use shardop::label_trust::shard_label_written_by;
use shardop::protocol::ObjectPlacement;
use shardop::{OperatorNames, ShardIndex};
use tokio::time::Instant;

use crate::resources::KindId;

/// The metadata of one object of a sharded kind, as watched and as a label write returns it.
pub type ObjectMeta = PartialObjectMeta<DynamicObject>;

/// The kind, namespace and name of an object; namespaces are interned. A cluster-scoped
/// object's namespace is empty, and the kind keeps objects of different kinds with the
/// same namespace and name apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: KindId,
    pub namespace: Arc<str>,
    pub name: Box<str>,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind != 0 {
            write!(f, "{}:", self.kind)?;
        }
        if self.namespace.is_empty() {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// What the assigner remembers about one object.
#[derive(Clone, Debug)]
pub struct ObjectRecord {
    pub resource_version: Box<str>,
    pub placement: ObjectPlacement,
    pub deleting: bool,
    pub key_hash: u64,
    pub created: Option<Timestamp>,
    /// The shard that may still be reconciling the object: the last trusted shard label
    /// seen, drained or not (tampering repair). Forgotten only when both labels go after a
    /// drain (the owner's acknowledgement).
    pub last_owner: Option<ShardIndex>,
    /// It carried a valid shard label at some point while this process watched.
    pub ever_owned: bool,
    /// It carries a drain label (whatever its placement says: an Untrusted one may too).
    pub drain_label: bool,
    /// While it has no valid owner: since when, as observed by this process. Kept on the
    /// record so that a pass over a backlog of 100,000 unassigned objects needs no map
    /// of its own (and no copy of their keys) to time them.
    pub unowned: Option<UnownedWait>,
    /// The number of the latest relist that listed it (see [`ObjectStore`]).
    listed_in: Option<u32>,
}

/// How long an object has been without a valid owner, and whether a warning said so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnownedWait {
    pub since: Instant,
    /// A warning named it (or counted it) already: reported once per wait.
    pub reported: bool,
}

impl ObjectRecord {
    /// Takes in a newer observation, carrying over what is only known from history.
    fn observe(&mut self, newer: ObjectRecord) {
        let previous_owner = self.last_owner;
        let was_draining = matches!(self.placement, ObjectPlacement::Draining { .. });
        let ever_owned = self.ever_owned;
        let unowned = self.unowned;
        let listed_in = self.listed_in;
        *self = newer;
        self.listed_in = self.listed_in.or(listed_in);
        // Still without an owner: the wait that began earlier goes on.
        if self.unowned.is_some() && unowned.is_some() {
            self.unowned = unowned;
        }
        self.ever_owned |= ever_owned;
        self.last_owner = match &self.placement {
            ObjectPlacement::Owned(shard) | ObjectPlacement::Draining { from: shard } => {
                Some(*shard)
            }
            // Both labels gone after a drain: the owner acknowledged it and has let go.
            ObjectPlacement::Unassigned { stray_drain: false } if was_draining => None,
            // Removed, garbled or hand-edited, during a drain too: the owner may still be
            // reconciling it.
            _ => previous_owner,
        };
    }
}

/// Which watch stream an event came from: an index into the engine's [`SourceScope`]s.
pub type Source = usize;

/// What one watch stream covers: one kind, in one namespace or all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceScope {
    pub kind: KindId,
    /// `None`: every namespace (and a cluster-scoped kind's only scope).
    pub namespace: Option<String>,
}

impl SourceScope {
    /// Whether an object with `key` is this stream's to list.
    fn covers(&self, key: &ObjectKey) -> bool {
        key.kind == self.kind
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| *key.namespace == *ns)
    }
}

/// All records, plus the book-keeping of relists.
#[derive(Default)]
pub struct ObjectStore {
    /// Whose labels and field manager placements are read with.
    names: OperatorNames,
    records: HashMap<ObjectKey, ObjectRecord>,
    namespaces: HashSet<Arc<str>>,
    /// Sources whose initial list has completed at least once.
    ready: HashSet<Source>,
    /// The number of the relist in progress, per source: the records it lists are stamped
    /// with it (rather than their keys copied into a set: 100,000 of them at start-up).
    relisting: HashMap<Source, u32>,
    /// The number of the latest relist of any source.
    relists: u32,
}

impl ObjectStore {
    /// An empty store reading the labels of the operator `names`.
    pub fn new(names: OperatorNames) -> Self {
        Self {
            names,
            ..Self::default()
        }
    }

    /// Applies one watch event from `source` (which covers `scope`).
    /// Returns whether anything changed.
    pub fn apply(
        &mut self,
        source: Source,
        scope: &SourceScope,
        event: watcher::Event<ObjectMeta>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                self.relists = self.relists.wrapping_add(1);
                self.relisting.insert(source, self.relists);
                false
            }
            watcher::Event::InitApply(meta) => {
                let relist = self.relisting.get(&source).copied();
                self.upsert(scope.kind, &meta, relist);
                true
            }
            watcher::Event::InitDone => {
                // Objects deleted while the watch was down never get a Delete event.
                let relist = self.relisting.remove(&source);
                self.records.retain(|key, record| {
                    !scope.covers(key) || relist.is_some_and(|r| record.listed_in == Some(r))
                });
                self.ready.insert(source);
                true
            }
            watcher::Event::Apply(meta) => self.upsert(scope.kind, &meta, None).is_some(),
            watcher::Event::Delete(meta) => self
                .key_of(scope.kind, &meta)
                .is_some_and(|key| self.records.remove(&key).is_some()),
        }
    }

    /// Takes in a changed (or new) object of `kind` seen by a watch, like an `Apply` event
    /// through [`apply`](Self::apply); returns its key.
    pub fn apply_change(&mut self, kind: KindId, meta: &ObjectMeta) -> Option<ObjectKey> {
        self.upsert(kind, meta, None)
    }

    /// Notes that the wait of `key` for an owner has been reported.
    pub fn mark_wait_reported(&mut self, key: &ObjectKey) {
        if let Some(wait) = self
            .records
            .get_mut(key)
            .and_then(|record| record.unowned.as_mut())
        {
            wait.reported = true;
        }
    }

    /// Whether every source has completed its initial list.
    pub fn is_ready(&self, sources: usize) -> bool {
        (0..sources).all(|s| self.ready.contains(&s))
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&ObjectRecord> {
        self.records.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &ObjectRecord)> {
        self.records.iter()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Takes in the metadata a label write or a re-read of an object of `kind` returned, if
    /// it is still the newest known. The request was made while the record was at
    /// `based_on` (a label write is conditional on it), so the answer is that version or a
    /// later one, and a record that has moved past `based_on` since is at least as new: the
    /// watch was faster than the answer. Taking the answer then would roll the record back:
    /// a drain the owner has acknowledged meanwhile would read as still requested, and as
    /// no further event comes for an object nobody touches again, it would wait
    /// unlabelled. Returns whether the answer was taken.
    pub fn observe_response(&mut self, kind: KindId, meta: &ObjectMeta, based_on: &str) -> bool {
        let Some(key) = self.key_of(kind, meta) else {
            return false;
        };
        // A record that is gone was deleted meanwhile: the response must not bring it back.
        if self
            .records
            .get(&key)
            .is_none_or(|r| *r.resource_version != *based_on)
        {
            return false;
        }
        self.upsert(kind, meta, None).is_some()
    }

    fn key_of(&mut self, kind: KindId, meta: &ObjectMeta) -> Option<ObjectKey> {
        let namespace = meta.metadata.namespace.as_deref().unwrap_or_default();
        let name = meta.metadata.name.as_deref()?;
        let namespace = match self.namespaces.get(namespace) {
            Some(interned) => interned.clone(),
            None => {
                let interned: Arc<str> = Arc::from(namespace);
                self.namespaces.insert(interned.clone());
                interned
            }
        };
        Some(ObjectKey {
            kind,
            namespace,
            name: name.into(),
        })
    }

    /// Takes in `meta`, listed by relist number `relist` if it comes from one.
    fn upsert(
        &mut self,
        kind: KindId,
        meta: &ObjectMeta,
        relist: Option<u32>,
    ) -> Option<ObjectKey> {
        let key = self.key_of(kind, meta)?;
        let mut record = record_of(&self.names, &key, meta, Instant::now());
        record.listed_in = relist;
        match self.records.get_mut(&key) {
            Some(existing) => existing.observe(record),
            None => {
                self.records.insert(key.clone(), record);
            }
        }
        Some(key)
    }
}

/// The record of `meta`. A cluster-scoped object's key hash is that of `/name` (its
/// namespace is empty).
/// `now` starts its wait if it has no valid owner.
fn record_of(
    names: &OperatorNames,
    key: &ObjectKey,
    meta: &ObjectMeta,
    now: Instant,
) -> ObjectRecord {
    let m = &meta.metadata;
    let trusted = shard_label_written_by(m.managed_fields.as_deref(), names);
    let placement = ObjectPlacement::from_labels_of(m.labels.as_ref(), trusted, names);
    ObjectRecord {
        resource_version: m.resource_version.as_deref().unwrap_or_default().into(),
        deleting: m.deletion_timestamp.is_some(),
        key_hash: object_key_hash(&key.namespace, &key.name),
        created: m.creation_timestamp.as_ref().map(|t| t.0),
        last_owner: match placement {
            ObjectPlacement::Owned(shard) | ObjectPlacement::Draining { from: shard } => {
                Some(shard)
            }
            _ => None,
        },
        ever_owned: placement.owner().is_some(),
        drain_label: m
            .labels
            .as_ref()
            .is_some_and(|labels| labels.contains_key(&names.drain_label())),
        unowned: placement.owner().is_none().then_some(UnownedWait {
            since: now,
            reported: false,
        }),
        listed_in: None,
        placement,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use kube::api::ObjectMeta;
    use shardop::constants::{ASSIGNER_FIELD_MANAGER, DRAIN_LABEL, SHARD_LABEL};
    use std::collections::BTreeMap;

    const ALL: SourceScope = SourceScope {
        kind: 0,
        namespace: None,
    };

    fn in_ns(ns: &str) -> SourceScope {
        SourceScope {
            kind: 0,
            namespace: Some(ns.to_owned()),
        }
    }

    fn meta(
        ns: &str,
        name: &str,
        rv: &str,
        labels: &[(&str, &str)],
    ) -> PartialObjectMeta<DynamicObject> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                managed_fields: Some(vec![assigner_owns_the_shard_label()]),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    /// The managedFields entry of a shard label the assigner wrote.
    fn assigner_owns_the_shard_label() -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(ASSIGNER_FIELD_MANAGER.into()),
            operation: Some("Update".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(serde_json::json!({
                "f:metadata": { "f:labels": { "f:shardop.dev/shard": {} } }
            }))),
            ..Default::default()
        }
    }

    /// `meta` after someone else than the assigner changed the labels.
    fn hand_edited(
        ns: &str,
        name: &str,
        rv: &str,
        labels: &[(&str, &str)],
    ) -> PartialObjectMeta<DynamicObject> {
        let mut edited = meta(ns, name, rv, labels);
        edited.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl-label".into()),
            ..assigner_owns_the_shard_label()
        }]);
        edited
    }

    #[test]
    fn a_hand_edited_shard_label_is_untrusted_and_the_last_owner_is_kept() {
        let mut store = ObjectStore::default();
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta("a", "x", "1", &[(SHARD_LABEL, "1")])),
        );
        let key = ObjectKey {
            kind: 0,
            namespace: "a".into(),
            name: "x".into(),
        };
        assert_eq!(
            store.get(&key).unwrap().placement,
            ObjectPlacement::Owned(ShardIndex(1))
        );
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(hand_edited("a", "x", "2", &[(SHARD_LABEL, "2")])),
        );
        let record = store.get(&key).unwrap();
        assert_eq!(
            record.placement,
            ObjectPlacement::Untrusted {
                labelled: ShardIndex(2)
            }
        );
        assert_eq!(record.last_owner, Some(ShardIndex(1)));
        // The out-of-range label of issue #11 is garbage, whoever wrote it.
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta("a", "x", "3", &[(SHARD_LABEL, "4294967295")])),
        );
        assert_eq!(
            store.get(&key).unwrap().placement,
            ObjectPlacement::Invalid {
                value: "4294967295".into()
            }
        );
    }

    #[test]
    fn relist_drops_objects_deleted_while_away_and_keeps_history() {
        let mut store = ObjectStore::default();
        store.apply(0, &ALL, watcher::Event::Init);
        store.apply(
            0,
            &ALL,
            watcher::Event::InitApply(meta("a", "x", "1", &[(SHARD_LABEL, "1")])),
        );
        store.apply(0, &ALL, watcher::Event::InitApply(meta("a", "y", "1", &[])));
        assert!(!store.is_ready(1));
        store.apply(0, &ALL, watcher::Event::InitDone);
        assert!(store.is_ready(1));
        assert_eq!(store.len(), 2);
        // The label is garbled: the last owner is remembered.
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta("a", "x", "2", &[(SHARD_LABEL, "x1")])),
        );
        let key = ObjectKey {
            kind: 0,
            namespace: "a".into(),
            name: "x".into(),
        };
        assert_eq!(store.get(&key).unwrap().last_owner, Some(ShardIndex(1)));
        // A drain is the assigner's own doing: the acknowledgement that follows is not
        // tampering.
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta(
                "a",
                "x",
                "3",
                &[(SHARD_LABEL, "1"), (DRAIN_LABEL, "2")],
            )),
        );
        store.apply(0, &ALL, watcher::Event::Apply(meta("a", "x", "4", &[])));
        assert_eq!(store.get(&key).unwrap().last_owner, None);
        assert!(store.get(&key).unwrap().ever_owned);
        // Relist without y.
        store.apply(0, &ALL, watcher::Event::Init);
        store.apply(0, &ALL, watcher::Event::InitApply(meta("a", "x", "4", &[])));
        store.apply(0, &ALL, watcher::Event::InitDone);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_draining_owner_is_remembered_until_it_acknowledges() {
        let mut store = ObjectStore::default();
        let key = ObjectKey {
            kind: 0,
            namespace: "a".into(),
            name: "x".into(),
        };
        let draining = &[(SHARD_LABEL, "1"), (DRAIN_LABEL, "2")];
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta("a", "x", "1", draining)),
        );
        assert_eq!(store.get(&key).unwrap().last_owner, Some(ShardIndex(1)));
        // The shard label is hand-edited (garbled) mid-drain: shard 1 may still be
        // reconciling, so the object must go back to it rather than straight to shard 2.
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta(
                "a",
                "x",
                "2",
                &[(SHARD_LABEL, "x"), (DRAIN_LABEL, "2")],
            )),
        );
        assert_eq!(store.get(&key).unwrap().last_owner, Some(ShardIndex(1)));
        // Back to draining, then both labels go: the acknowledgement.
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta("a", "x", "3", draining)),
        );
        store.apply(0, &ALL, watcher::Event::Apply(meta("a", "x", "4", &[])));
        assert_eq!(store.get(&key).unwrap().last_owner, None);
        // Seen draining at first sight (an assigner that just started) counts too.
        let mut fresh = ObjectStore::default();
        fresh.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta("a", "x", "5", draining)),
        );
        assert_eq!(fresh.get(&key).unwrap().last_owner, Some(ShardIndex(1)));
    }

    #[test]
    fn relist_of_one_namespace_keeps_the_others() {
        let mut store = ObjectStore::default();
        store.apply(
            0,
            &in_ns("a"),
            watcher::Event::Apply(meta("a", "x", "1", &[])),
        );
        store.apply(
            1,
            &in_ns("b"),
            watcher::Event::Apply(meta("b", "x", "1", &[])),
        );
        store.apply(0, &in_ns("a"), watcher::Event::Init);
        store.apply(0, &in_ns("a"), watcher::Event::InitDone);
        assert_eq!(store.len(), 1);
        assert!(!store.is_ready(2));
    }

    #[test]
    fn kinds_and_cluster_scoped_objects_never_share_a_key() {
        let mut store = ObjectStore::default();
        let cluster_scoped = SourceScope {
            kind: 1,
            namespace: None,
        };
        let mut widget = meta("", "x", "1", &[(SHARD_LABEL, "1")]);
        widget.metadata.namespace = None;
        store.apply(0, &ALL, watcher::Event::Apply(meta("a", "x", "1", &[])));
        store.apply(1, &cluster_scoped, watcher::Event::Apply(widget.clone()));
        assert_eq!(store.len(), 2);
        let widget_key = ObjectKey {
            kind: 1,
            namespace: "".into(),
            name: "x".into(),
        };
        let record = store.get(&widget_key).unwrap();
        assert_eq!(record.placement, ObjectPlacement::Owned(ShardIndex(1)));
        assert_eq!(record.key_hash, object_key_hash("", "x"));
        assert_eq!(widget_key.to_string(), "1:x");
        // A relist of kind 0 does not drop kind 1's objects, nor the other way round.
        store.apply(0, &ALL, watcher::Event::Init);
        store.apply(0, &ALL, watcher::Event::InitDone);
        assert_eq!(store.len(), 1);
        assert!(store.get(&widget_key).is_some());
        store.apply(1, &cluster_scoped, watcher::Event::Delete(widget));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn another_operators_labels_leave_an_object_unassigned() {
        let tenants = OperatorNames::new("tenants").unwrap();
        let mut store = ObjectStore::new(tenants);
        // Labelled by the default operator's assigner: not this operator's placement.
        store.apply(
            0,
            &ALL,
            watcher::Event::Apply(meta(
                "a",
                "x",
                "1",
                &[(SHARD_LABEL, "1"), (DRAIN_LABEL, "2")],
            )),
        );
        let key = ObjectKey {
            kind: 0,
            namespace: "a".into(),
            name: "x".into(),
        };
        let record = store.get(&key).unwrap();
        assert_eq!(
            record.placement,
            ObjectPlacement::Unassigned { stray_drain: false }
        );
        assert!(!record.drain_label);
    }
}
