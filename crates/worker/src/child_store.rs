//! The shard's cache of one child kind: every child of its slice as a [`CachedChild`],
//! by namespace and name.
//!
//! kube-runtime's reflector store would keep each child as an `Arc` of its type under an
//! `ObjectRef` key: per child a 360-byte `ObjectMeta` (mostly empty options), four owned
//! strings in the key and four more in the metadata, and the owner reference with four
//! strings of its own, about a kilobyte with the allocator's overhead, for a child whose
//! compressed text is 160–230 bytes. Nothing needs that form: the controller hears of child
//! changes as references to their parents ([`crate::child_events`]), and a reconcile reads
//! a child by namespace and name and decodes it ([`CachedChild::object`]). So this store
//! keeps, per child, its name and its [`CachedChild`], under one copy of each namespace.
//!
//! Like kube-runtime's store, a relist is buffered: readers see the previous state until
//! the relist completes, then the listed state at once.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::child_cache::{CachedChild, Projected};

/// The children of one kind by namespace, then by name.
type Namespaces<K> = HashMap<Box<str>, HashMap<Box<str>, CachedChild<K>>>;

/// What the store holds: the state readers see, and a relist in progress.
struct Children<K> {
    live: Namespaces<K>,
    /// Between a relist's start and its end, what it listed so far.
    relist: Option<Namespaces<K>>,
}

/// The shard's cache of child kind `K`; clones share it. Written by the kind's watch only
/// ([`crate::child_events::ChildCache`]), read by every reconcile.
pub struct ChildStore<K> {
    children: Arc<RwLock<Children<K>>>,
}

impl<K> Clone for ChildStore<K> {
    fn clone(&self) -> Self {
        Self {
            children: self.children.clone(),
        }
    }
}

impl<K> Default for ChildStore<K> {
    fn default() -> Self {
        Self {
            children: Arc::new(RwLock::new(Children {
                live: HashMap::new(),
                relist: None,
            })),
        }
    }
}

impl<K: Projected> ChildStore<K> {
    /// The child `namespace/name` with the fields a reconcile reads; `None` when the cache
    /// does not hold it (or, never for a child the watch stored, its text does not decode).
    pub fn get(&self, namespace: &str, name: &str) -> Option<K> {
        self.read().live.get(namespace)?.get(name)?.object()
    }

    /// Stores `child` as `namespace/name`: for readers at once, or, during a relist, once
    /// the relist completes. Returns the [`Projected::change_fingerprint`] of the version
    /// readers saw before: `None` when they saw none, `Some(None)` for a kind without
    /// fingerprints.
    pub fn insert(
        &self,
        namespace: &str,
        name: &str,
        child: CachedChild<K>,
    ) -> Option<Option<u64>> {
        let mut guard = self.write();
        let children = &mut *guard;
        let before = children
            .live
            .get(namespace)
            .and_then(|names| names.get(name))
            .map(CachedChild::change_fingerprint);
        let target = children.relist.as_mut().unwrap_or(&mut children.live);
        target
            .entry(namespace.into())
            .or_default()
            .insert(name.into(), child);
        before
    }

    /// Forgets the child `namespace/name` (in a relist's buffer too).
    pub fn remove(&self, namespace: &str, name: &str) {
        let mut children = self.write();
        remove_from(&mut children.live, namespace, name);
        if let Some(relist) = children.relist.as_mut() {
            remove_from(relist, namespace, name);
        }
    }

    /// A relist starts: what it lists is buffered until [`Self::finish_relist`].
    pub fn start_relist(&self) {
        self.write().relist = Some(Namespaces::new());
    }

    /// The relist is complete: readers see what it listed. Returns the children that were
    /// cached before and that it did not list (they left while the watch was down).
    pub fn finish_relist(&self) -> Vec<K> {
        let mut children = self.write();
        let Some(listed) = children.relist.take() else {
            return Vec::new();
        };
        let before = std::mem::replace(&mut children.live, listed);
        let vanished: Vec<CachedChild<K>> = before
            .into_iter()
            .flat_map(|(namespace, names)| {
                let still = children.live.get(&namespace);
                names
                    .into_iter()
                    .filter(move |(name, _)| still.is_none_or(|names| !names.contains_key(name)))
                    .map(|(_, child)| child)
            })
            .collect();
        drop(children);
        vanished.iter().filter_map(CachedChild::object).collect()
    }

    /// How many children readers see.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.read().live.values().map(HashMap::len).sum()
    }

    /// Poisoning only means a panic elsewhere; the maps stay usable.
    fn read(&self) -> RwLockReadGuard<'_, Children<K>> {
        self.children.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Children<K>> {
        self.children
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes `namespace/name` from `namespaces`, and the namespace once it holds nothing.
fn remove_from<K>(namespaces: &mut Namespaces<K>, namespace: &str, name: &str) {
    if let Some(names) = namespaces.get_mut(namespace) {
        names.remove(name);
        if names.is_empty() {
            namespaces.remove(namespace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::ObjectMeta;

    fn service(namespace: &str, name: &str, resource_version: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                resource_version: Some(resource_version.to_owned()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    fn put(store: &ChildStore<Service>, namespace: &str, name: &str, resource_version: &str) {
        let child = CachedChild::of(&service(namespace, name, resource_version));
        store.insert(namespace, name, child);
    }

    fn version(store: &ChildStore<Service>, namespace: &str, name: &str) -> Option<String> {
        store.get(namespace, name)?.metadata.resource_version
    }

    #[test]
    fn children_are_found_by_namespace_and_name_and_read_back_whole() {
        let store = ChildStore::default();
        put(&store, "a", "db", "1");
        put(&store, "b", "db", "2");
        assert_eq!(version(&store, "a", "db").as_deref(), Some("1"));
        assert_eq!(version(&store, "b", "db").as_deref(), Some("2"));
        assert_eq!(store.get("c", "db"), None);
        let read = store.get("a", "db").unwrap();
        assert_eq!(read.metadata.namespace.as_deref(), Some("a"));
        assert_eq!(read.metadata.name.as_deref(), Some("db"));
        put(&store, "a", "db", "3");
        assert_eq!(version(&store, "a", "db").as_deref(), Some("3"));
        assert_eq!(store.len(), 2);
        store.remove("a", "db");
        assert_eq!(store.get("a", "db"), None);
        assert_eq!(store.len(), 1);
        assert!(
            !store.read().live.contains_key("a"),
            "an empty namespace goes"
        );
    }

    #[test]
    fn a_relist_shows_once_complete_and_returns_what_it_no_longer_lists() {
        let store = ChildStore::default();
        put(&store, "a", "kept", "1");
        put(&store, "a", "gone", "1");
        put(&store, "b", "gone-too", "1");
        store.start_relist();
        put(&store, "a", "kept", "2");
        put(&store, "c", "new", "1");
        assert_eq!(
            version(&store, "a", "kept").as_deref(),
            Some("1"),
            "readers see the state before the relist until it completes"
        );
        assert_eq!(store.get("c", "new"), None);
        let mut vanished: Vec<String> = store
            .finish_relist()
            .into_iter()
            .filter_map(|child| child.metadata.name)
            .collect();
        vanished.sort();
        assert_eq!(vanished, ["gone", "gone-too"]);
        assert_eq!(version(&store, "a", "kept").as_deref(), Some("2"));
        assert_eq!(version(&store, "c", "new").as_deref(), Some("1"));
        assert_eq!(store.len(), 2);
        assert!(store.finish_relist().is_empty(), "no relist in progress");
    }

    #[test]
    fn a_deletion_during_a_relist_is_not_undone_by_it() {
        let store = ChildStore::default();
        put(&store, "a", "db", "1");
        store.start_relist();
        put(&store, "a", "db", "2");
        store.remove("a", "db");
        assert!(store.finish_relist().is_empty(), "removed already");
        assert_eq!(store.get("a", "db"), None);
    }
}
