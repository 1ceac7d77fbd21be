//! What a Tenant's settings ConfigMap and status should be, and whether the cluster already
//! says so (no I/O): a converged Tenant costs 0 writes because every write is preceded by
//! one of these comparisons.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kube::Resource;
use kube::runtime::reflector::ObjectRef;

use crate::tenant::{GROUP, Tenant, TenantStatus};

/// Label on every settings ConfigMap, naming the operator that manages it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "tenants-operator";
/// Label naming the Tenant a settings ConfigMap belongs to.
pub const TENANT_LABEL: &str = "example.shardop.dev/tenant";
/// The condition type of [`TenantStatus::conditions`].
pub const READY: &str = "Ready";

/// Why a Tenant cannot be rendered; terminal until its spec changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTenant {
    /// The object has no name or uid (never true of an object read from the API server).
    #[error("the Tenant has no name or uid")]
    Unidentified,
    /// A label the spec asks for is one the CRD's rules refuse today.
    #[error("label {0:?} is not allowed on the settings ConfigMap")]
    Label(String),
}

/// Name of the settings ConfigMap of Tenant `tenant`.
pub fn config_map_name(tenant: &str) -> String {
    format!("tenant-{tenant}")
}

/// The Tenant a settings ConfigMap belongs to, from its controller reference.
///
/// kube's `Controller::owns` would give the owner the child's namespace, which a
/// cluster-scoped Tenant does not have, so the Controller watches ConfigMaps with this mapper
/// instead.
pub fn owner_of_settings(config_map: ConfigMap) -> Option<ObjectRef<Tenant>> {
    let owner = config_map
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|owner| owner.controller == Some(true))?;
    (owner.api_version == Tenant::api_version(&()) && owner.kind == Tenant::kind(&()))
        .then(|| ObjectRef::new(&owner.name))
}

/// The settings ConfigMap of `tenant` in `namespace`.
pub fn desired_config_map(tenant: &Tenant, namespace: &str) -> Result<ConfigMap, InvalidTenant> {
    let (Some(name), Some(uid)) = (&tenant.metadata.name, &tenant.metadata.uid) else {
        return Err(InvalidTenant::Unidentified);
    };
    let mut labels = BTreeMap::new();
    for (key, value) in &tenant.spec.labels {
        if !is_tenant_label_key(key) {
            return Err(InvalidTenant::Label(key.clone()));
        }
        labels.insert(key.clone(), value.clone());
    }
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels.insert(TENANT_LABEL.to_owned(), name.clone());
    let quota = &tenant.spec.quota;
    let data = BTreeMap::from([
        ("displayName".to_owned(), tenant.spec.display_name.clone()),
        ("ownerEmail".to_owned(), tenant.spec.owner_email.clone()),
        ("quota.cpu".to_owned(), quota.cpu.to_string()),
        ("quota.memoryGiB".to_owned(), quota.memory_gib.to_string()),
        (
            "quota.maxNamespaces".to_owned(),
            quota.max_namespaces.to_string(),
        ),
    ]);
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: Tenant::api_version(&()).into_owned(),
                kind: Tenant::kind(&()).into_owned(),
                name: name.clone(),
                uid: uid.clone(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    })
}

/// Whether a label key of the spec may go on the settings ConfigMap: not one of the keys
/// the operator or the sharding layer own (the CRD refuses them at admission too).
fn is_tenant_label_key(key: &str) -> bool {
    !key.is_empty()
        && key != MANAGED_BY_LABEL
        && !key.contains("shardop.dev/")
        && !key.starts_with(&format!("{GROUP}/"))
}

/// Whether `existing` differs from `desired` in anything the operator owns: data, labels
/// or the controller reference. `*shardop.dev/*` labels count only if `desired` has them
/// (its shard's child labels: a child still labelled for the previous shard differs);
/// others, e.g. another operator's, are not the reconcile's to judge. `None` (absent)
/// always differs.
pub fn config_map_differs(existing: Option<&ConfigMap>, desired: &ConfigMap) -> bool {
    let Some(existing) = existing else {
        return true;
    };
    let wanted = desired.metadata.labels.clone().unwrap_or_default();
    let own_labels = |cm: &ConfigMap| -> BTreeMap<String, String> {
        cm.metadata
            .labels
            .iter()
            .flatten()
            .filter(|(key, _)| !key.contains("shardop.dev/") || wanted.contains_key(*key))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    };
    let controller = |cm: &ConfigMap| -> Option<(String, String)> {
        cm.metadata
            .owner_references
            .iter()
            .flatten()
            .find(|owner| owner.controller == Some(true))
            .map(|owner| (owner.kind.clone(), owner.uid.clone()))
    };
    existing.data.clone().unwrap_or_default() != desired.data.clone().unwrap_or_default()
        || own_labels(existing) != own_labels(desired)
        || controller(existing) != controller(desired)
}

/// What a reconcile found, as the `Ready` condition says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The settings ConfigMap holds the current spec.
    Rendered,
    /// The spec cannot be rendered (terminal until it changes).
    Invalid(InvalidTenant),
}

/// The status `tenant` should have after a reconcile with `outcome`. `lastTransitionTime`
/// stays as it was while the condition's status does not change, so recomputing the status
/// of a converged Tenant yields the status it has.
pub fn desired_status(tenant: &Tenant, outcome: &Outcome, now: jiff::Timestamp) -> TenantStatus {
    let previous = tenant.status.as_ref();
    let (status, reason, message, config_map) = match outcome {
        Outcome::Rendered => (
            "True",
            "Rendered",
            "the settings ConfigMap holds the current spec".to_owned(),
            tenant.metadata.name.as_deref().map(config_map_name),
        ),
        Outcome::Invalid(why) => (
            "False",
            "InvalidSpec",
            why.to_string(),
            previous.and_then(|s| s.config_map_name.clone()),
        ),
    };
    let last_transition_time = previous
        .into_iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == READY && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    TenantStatus {
        observed_generation: tenant.metadata.generation,
        conditions: vec![Condition {
            type_: READY.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: tenant.metadata.generation,
            last_transition_time,
        }],
        config_map_name: config_map,
    }
}

/// Whether `tenant`'s status must be written to become `desired`.
pub fn status_differs(tenant: &Tenant, desired: &TenantStatus) -> bool {
    tenant.status.as_ref() != Some(desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::{TenantQuota, TenantSpec};

    fn tenant(name: &str) -> Tenant {
        let mut tenant = Tenant::new(
            name,
            TenantSpec {
                display_name: "Acme".into(),
                owner_email: "ops@acme.example".into(),
                quota: TenantQuota {
                    cpu: 8,
                    memory_gib: 32,
                    max_namespaces: 4,
                },
                labels: BTreeMap::from([("team".into(), "payments".into())]),
            },
        );
        tenant.metadata.uid = Some(format!("uid-{name}"));
        tenant.metadata.generation = Some(3);
        tenant
    }

    fn at(second: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn the_settings_config_map_renders_the_spec_and_names_its_owner() {
        let cm = desired_config_map(&tenant("acme"), "tenants").unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("tenant-acme"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("tenants"));
        let data = cm.data.as_ref().unwrap();
        assert_eq!(data["displayName"], "Acme");
        assert_eq!(data["quota.memoryGiB"], "32");
        let labels = cm.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "payments");
        assert_eq!(labels[TENANT_LABEL], "acme");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Tenant", "uid-acme")
        );
        assert_eq!(owner.api_version, "example.shardop.dev/v1alpha1");
        assert_eq!(owner_of_settings(cm.clone()), Some(ObjectRef::new("acme")));
        assert_eq!(owner_of_settings(cm.clone()).unwrap().namespace, None);
    }

    #[test]
    fn reserved_label_keys_are_invalid_not_applied() {
        for key in [
            "tenants.shardop.dev/shard",
            "shardop.dev/drain",
            MANAGED_BY_LABEL,
            "example.shardop.dev/tenant",
        ] {
            let mut t = tenant("acme");
            t.spec.labels.insert(key.into(), "x".into());
            assert_eq!(
                desired_config_map(&t, "tenants"),
                Err(InvalidTenant::Label(key.into()))
            );
        }
    }

    #[test]
    fn a_converged_config_map_does_not_differ_even_with_a_shard_label() {
        let desired = desired_config_map(&tenant("acme"), "tenants").unwrap();
        let mut live = desired.clone();
        live.metadata.resource_version = Some("42".into());
        live.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("tenants.shardop.dev/shard".into(), "2".into());
        assert!(!config_map_differs(Some(&live), &desired));
        assert!(config_map_differs(None, &desired));
    }

    #[test]
    fn a_child_labelled_for_another_shard_differs() {
        let mut desired = desired_config_map(&tenant("acme"), "tenants").unwrap();
        desired
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("tenants.shardop.dev/shard".into(), "3".into());
        let mut live = desired.clone();
        let live_labels = live.metadata.labels.as_mut().unwrap();
        live_labels.insert("tenants.shardop.dev/shard".into(), "1".into());
        assert!(config_map_differs(Some(&live), &desired));
        live.metadata
            .labels
            .as_mut()
            .unwrap()
            .remove("tenants.shardop.dev/shard");
        assert!(config_map_differs(Some(&live), &desired), "unlabelled");
        let mut relabelled = desired.clone();
        relabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("billing.shardop.dev/shard".into(), "0".into());
        assert!(
            !config_map_differs(Some(&relabelled), &desired),
            "another operator's label"
        );
    }

    #[test]
    fn data_labels_and_owner_drift_differ() {
        let desired = desired_config_map(&tenant("acme"), "tenants").unwrap();

        let mut edited = desired.clone();
        edited
            .data
            .as_mut()
            .unwrap()
            .insert("quota.cpu".into(), "999".into());
        assert!(config_map_differs(Some(&edited), &desired));

        let mut stale_label = desired.clone();
        stale_label
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("old".into(), "x".into());
        assert!(config_map_differs(Some(&stale_label), &desired));

        let mut orphan = desired.clone();
        orphan.metadata.owner_references = None;
        assert!(config_map_differs(Some(&orphan), &desired));

        let mut other_owner = desired.clone();
        other_owner.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-previous".into();
        assert!(config_map_differs(Some(&other_owner), &desired));
    }

    #[test]
    fn a_recomputed_status_of_a_converged_tenant_is_unchanged() {
        let mut t = tenant("acme");
        let first = desired_status(&t, &Outcome::Rendered, at(10));
        assert!(status_differs(&t, &first));
        assert_eq!(first.config_map_name.as_deref(), Some("tenant-acme"));
        assert_eq!(first.observed_generation, Some(3));
        t.status = Some(first.clone());
        let again = desired_status(&t, &Outcome::Rendered, at(20));
        assert_eq!(again, first, "transition time kept");
        assert!(!status_differs(&t, &again));
    }

    #[test]
    fn an_invalid_spec_flips_ready_and_a_new_generation_is_observed() {
        let mut t = tenant("acme");
        t.status = Some(desired_status(&t, &Outcome::Rendered, at(10)));
        let invalid = Outcome::Invalid(InvalidTenant::Label("shardop.dev/x".into()));
        let failed = desired_status(&t, &invalid, at(20));
        let ready = &failed.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert_eq!(ready.last_transition_time, Time(at(20)));
        assert_eq!(failed.config_map_name.as_deref(), Some("tenant-acme"));

        t.metadata.generation = Some(4);
        let bumped = desired_status(&t, &Outcome::Rendered, at(30));
        assert_eq!(bumped.observed_generation, Some(4));
        assert!(status_differs(&t, &bumped));
    }

    #[test]
    fn only_a_tenant_controller_reference_maps_to_a_tenant() {
        let mut cm = desired_config_map(&tenant("acme"), "tenants").unwrap();
        cm.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
        assert_eq!(owner_of_settings(cm.clone()), None);
        cm.metadata.owner_references.as_mut().unwrap()[0].controller = Some(true);
        cm.metadata.owner_references.as_mut().unwrap()[0].kind = "Other".into();
        assert_eq!(owner_of_settings(cm.clone()), None);
    }
}
