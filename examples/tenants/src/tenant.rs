//! `Tenant`: a cluster-scoped kind whose settings the operator renders into a ConfigMap.
//!
//! Bad input is refused at admission by CEL rules in the CRD schema, so the reconcile
//! rarely meets it; an object admitted before a rule existed gets a terminal `Ready=False`
//! condition instead (see `reconcile`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::core::{Reason, Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of `Tenant`.
pub const GROUP: &str = "example.shardop.dev";

/// A rule on `metadata.name` checked on create only (`oldSelf` is absent then): names are
/// immutable, and a Tenant admitted before the rule existed must stay deletable (removing
/// its finalizer is an update).
fn on_create(rule: &str, message: &str) -> Rule {
    Rule {
        optional_old_self: Some(true),
        ..Rule::new(format!("oldSelf.hasValue() || {rule}"))
            .message(message)
            .reason(Reason::FieldValueInvalid)
    }
}

/// Desired state of a tenant.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "example.shardop.dev",
    version = "v1alpha1",
    kind = "Tenant",
    status = "TenantStatus",
    shortname = "tnt",
    doc = "A tenant of the platform: its settings are rendered into the ConfigMap tenant-<name>.",
    printcolumn(
        name = "Shard",
        type_ = "string",
        description = "The shard that owns this object (label tenants.shardop.dev/shard)",
        json_path = ".metadata.labels.tenants\\.shardop\\.dev/shard"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = on_create(
        "self.metadata.name.size() <= 63",
        "metadata.name must be at most 63 characters: the settings ConfigMap carries it as a label value"
    ),
    validation = on_create(
        "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        "metadata.name must be a DNS label: lowercase letters, digits and '-'"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Human-readable name shown in the platform's UI.
    #[schemars(length(min = 1, max = 128))]
    pub display_name: String,
    /// Who to contact about the tenant.
    #[schemars(length(min = 3, max = 254))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[^@\\\\s]+@[^@\\\\s]+$')",
        "message": "ownerEmail must look like name@domain"
    }]))]
    pub owner_email: String,
    /// Resource quota of the tenant.
    pub quota: TenantQuota,
    /// Labels put on the tenant's settings ConfigMap (keys without a prefix or with a prefix
    /// other than the operator's own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    #[schemars(extend("additionalProperties" = {
        "type": "string",
        "maxLength": 63,
        "pattern": "^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
    }))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(k, k.matches('^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))",
            "message": "labels keys must be Kubernetes label keys"
        },
        {
            "rule": "self.all(k, !k.contains('shardop.dev/'))",
            "message": "labels must not use the shardop.dev prefixes: the operator and its sharding own them"
        }
    ]))]
    pub labels: BTreeMap<String, String>,
}

/// Resource quota of a tenant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.memoryGiB <= self.cpu * 16",
    "message": "quota.memoryGiB may be at most 16 GiB per CPU"
}]))]
pub struct TenantQuota {
    /// CPUs the tenant may request in total.
    #[schemars(range(min = 1, max = 4096))]
    pub cpu: i32,
    /// Memory the tenant may request in total, in GiB.
    #[serde(rename = "memoryGiB")]
    #[schemars(range(min = 1, max = 65536))]
    pub memory_gib: i32,
    /// Namespaces the tenant may own.
    #[schemars(range(min = 0, max = 1000))]
    pub max_namespaces: i32,
}

/// Observed state of a tenant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the settings ConfigMap holds the current spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the settings ConfigMap (in the operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn the_crd_is_cluster_scoped_with_admission_rules() {
        let crd = Tenant::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("tenants.example.shardop.dev")
        );
        let yaml = serde_yaml::to_string(&crd).unwrap();
        for rule in [
            "self.memoryGiB <= self.cpu * 16",
            "shardop.dev/",
            "metadata.name.size() <= 63",
            "ownerEmail must look like name@domain",
            "maxProperties: 16",
        ] {
            assert!(yaml.contains(rule), "CRD lacks {rule:?}:\n{yaml}");
        }
        assert!(
            crd.spec.versions[0].subresources.is_some(),
            "status subresource"
        );
    }
}
