//! `DatabaseCluster`: shardop's reference workload, a database run as a StatefulSet
//! behind a headless Service.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::core::{Reason, Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The longest value of a label (and a DNS-1123/1035 label).
pub const LABEL_VALUE_MAX_LENGTH: usize = 63;
/// The longest hash the StatefulSet controller puts in a pod's `controller-revision-hash`
/// label: the decimal form of an FNV-32 sum (at most 4294967295, 10 digits), each digit
/// mapped to one safe character (`HashControllerRevision` in k8s.io/kubernetes
/// `pkg/controller/history`).
pub const REVISION_HASH_MAX_LENGTH: usize = 10;
/// The longest DatabaseCluster name whose children can all exist: every pod carries the
/// label `controller-revision-hash=<name>-<hash>`, so `name + 1 + 10 <= 63`. The other
/// derived names are shorter or have more room: `<name>-headless` (a Service name, a
/// DNS-1035 label, up to 54), pods `<name>-<ordinal>` and their host names (DNS labels),
/// claims `data-<name>-<ordinal>` (DNS subdomains, up to 253).
pub const MAX_NAME_LENGTH: usize = LABEL_VALUE_MAX_LENGTH - 1 - REVISION_HASH_MAX_LENGTH;
/// The longest `generateName`: the API server appends 5 random characters.
pub const MAX_GENERATE_NAME_LENGTH: usize = MAX_NAME_LENGTH - 5;

/// Admission rules on `metadata.name` (the only metadata CEL sees besides `generateName`)
/// apply on create only (`oldSelf` is absent then): names are immutable, and an object
/// admitted before the rules existed must stay deletable (its finalizer removal is an
/// update). `optionalOldSelf` needs Kubernetes 1.30 or newer.
fn on_create(rule: &str, message: &str) -> Rule {
    Rule {
        optional_old_self: Some(true),
        ..Rule::new(format!("oldSelf.hasValue() || {rule}"))
            .message(message)
            .reason(Reason::FieldValueInvalid)
    }
}

/// [`MAX_NAME_LENGTH`] at admission.
fn name_length_rule() -> Rule {
    on_create(
        "self.metadata.name.size() <= 52",
        "metadata.name must be at most 52 characters: the StatefulSet controller labels every pod \
         controller-revision-hash=<name>-<hash of up to 10 characters>, and a label value is at most 63 characters",
    )
}

/// Names whose derived names are DNS labels (no dots, a letter first).
fn name_shape_rule() -> Rule {
    on_create(
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "metadata.name must start with a lowercase letter and contain only lowercase letters, digits and '-' \
         (no dots): the headless Service <name>-headless must be a DNS-1035 label and each pod's host name <name>-<ordinal> a DNS label",
    )
}

/// [`MAX_GENERATE_NAME_LENGTH`] at admission, with its own message (the generated name
/// would fail [`name_length_rule`] with a random suffix in the message).
fn generate_name_length_rule() -> Rule {
    on_create(
        "!has(self.metadata.generateName) || self.metadata.generateName.size() <= 47",
        "metadata.generateName must be at most 47 characters: the API server appends 5 random characters \
         and metadata.name is limited to 52",
    )
}

/// Desired state of a database cluster.
// Each `printcolumn(...)` repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shardop.dev",
    version = "v1alpha1",
    kind = "DatabaseCluster",
    namespaced,
    status = "DatabaseClusterStatus",
    shortname = "dbc",
    category = "shardop",
    doc = "A database cluster: a StatefulSet of database pods behind a headless Service, reconciled by the shardop worker that owns its shard.",
    printcolumn(
        name = "Shard",
        type_ = "string",
        description = "The shard that owns this object (label shardop.dev/shard)",
        json_path = ".metadata.labels.shardop\\.dev/shard"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        description = "Desired number of database pods",
        json_path = ".spec.replicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        description = "Database pods that are ready",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        description = "Whether all desired pods are ready",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = name_length_rule(),
    validation = name_shape_rule(),
    validation = generate_name_length_rule()
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = resource_quantity_rules, transform = crate::schema::known_formats_only)]
pub struct DatabaseClusterSpec {
    /// Number of database pods.
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,

    /// Container image of the database, e.g. `postgres:17`.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^\S+$"))]
    pub image: String,

    /// Compute resources of each database container. Every limit and request must be a
    /// quantity (checked at admission).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Persistent storage of each database pod.
    pub storage: StorageSpec,
}

/// Persistent storage of each database pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
        "message": "storageClassName is immutable",
        "fieldPath": ".storageClassName",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0",
        "message": "size cannot be decreased",
        "fieldPath": ".size",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct StorageSpec {
    /// StorageClass of the volume claims; the cluster default when unset. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,

    /// Size of each pod's volume, a Kubernetes quantity such as `10Gi`. May grow, never shrink.
    #[schemars(schema_with = "positive_quantity_schema")]
    pub size: Quantity,

    /// What happens to the volumes when the DatabaseCluster is deleted.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
}

/// What happens to a DatabaseCluster's volumes when it is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReclaimPolicy {
    /// Keep the PersistentVolumeClaims (the data survives the cluster).
    #[default]
    Retain,
    /// Delete the PersistentVolumeClaims with the cluster.
    Delete,
}

/// A quantity given as a string the API server can parse, greater than zero.
fn positive_quantity_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "description": "A Kubernetes quantity such as 10Gi or 500Mi.",
        "maxLength": 64,
        "x-kubernetes-validations": [
            {
                "rule": "isQuantity(self)",
                "message": "must be a Kubernetes quantity such as 10Gi",
                "reason": "FieldValueInvalid"
            },
            {
                "rule": "!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))",
                "message": "must be greater than zero",
                "reason": "FieldValueInvalid"
            }
        ]
    })
}

/// Admission rules for every value of `resources.limits` and `resources.requests`: without
/// them `cpu: lots` is admitted and then rejected by the API server on every StatefulSet
/// apply. k8s-openapi describes a Quantity as int-or-string, so an integer is accepted as
/// it is and a string must parse as a quantity.
fn resource_quantity_rules(schema: &mut schemars::Schema) {
    for list in ["limits", "requests"] {
        let pointer = format!("/properties/resources/properties/{list}");
        let Some(map) = schema.pointer_mut(&pointer).and_then(|v| v.as_object_mut()) else {
            continue;
        };
        // Bounds keep the rules' estimated CEL cost within the API server's budget.
        map.insert("maxProperties".to_owned(), 32.into());
        if let Some(values) = map
            .get_mut("additionalProperties")
            .and_then(|v| v.as_object_mut())
        {
            values.insert("maxLength".to_owned(), 64.into());
            values.insert(
                "x-kubernetes-validations".to_owned(),
                serde_json::json!([
                    {
                        "rule": "type(self) != string || isQuantity(self)",
                        "message": "must be a Kubernetes quantity such as 500m or 1Gi",
                        "reason": "FieldValueInvalid"
                    },
                    {
                        "rule": "type(self) == string ? !isQuantity(self) || quantity(self).compareTo(quantity('0')) >= 0 : self >= 0",
                        "message": "must not be negative",
                        "reason": "FieldValueInvalid"
                    }
                ]),
            );
        }
    }
}

/// Observed state of a database cluster, written only by the owning shard's worker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::known_formats_only)]
pub struct DatabaseClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods the StatefulSet has created.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Available, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// How many volume-claim ordinals may exist: claims `data-<name>-0` up to
    /// `data-<name>-<claimOrdinals - 1>`, the highest replica count the StatefulSet was ever
    /// given. Claims of removed replicas are kept on scale-down, so deletion with
    /// `reclaimPolicy: Delete` deletes this many claim names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_ordinals: Option<i32>,
}

impl DatabaseCluster {
    /// The condition of the given type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status.as_ref()?.condition(type_)
    }
}

impl DatabaseClusterStatus {
    /// The condition of the given type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn root_rules() -> Vec<serde_json::Value> {
        let crd = serde_json::to_value(DatabaseCluster::crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn the_name_limit_follows_from_the_revision_hash_label() {
        assert_eq!(MAX_NAME_LENGTH, 52);
        assert_eq!(MAX_GENERATE_NAME_LENGTH, 47);
        // The longest name leaves room for every derived name.
        let longest = "a".repeat(MAX_NAME_LENGTH);
        assert!(format!("{longest}-{}", "9".repeat(REVISION_HASH_MAX_LENGTH)).len() <= 63);
        assert!(format!("{longest}-headless").len() <= 63);
        assert!(format!("data-{longest}-8").len() <= 253);
        let rules = root_rules();
        let text = |i: usize, key: &str| rules[i][key].as_str().unwrap().to_owned();
        assert!(text(0, "rule").ends_with(&format!("size() <= {MAX_NAME_LENGTH}")));
        assert!(text(0, "message").contains(&format!("at most {MAX_NAME_LENGTH} characters")));
        assert!(text(2, "rule").ends_with(&format!("size() <= {MAX_GENERATE_NAME_LENGTH}")));
        assert!(text(2, "message").contains(&format!("limited to {MAX_NAME_LENGTH}")));
    }

    #[test]
    fn name_rules_apply_on_create_only() {
        let rules = root_rules();
        assert_eq!(rules.len(), 3);
        for rule in rules {
            assert_eq!(rule["optionalOldSelf"], true, "{rule}");
            assert!(
                rule["rule"]
                    .as_str()
                    .unwrap()
                    .starts_with("oldSelf.hasValue() || "),
                "{rule}"
            );
        }
    }

    #[test]
    fn every_resource_quantity_is_validated() {
        let crd = serde_json::to_value(DatabaseCluster::crd()).unwrap();
        let resources = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["resources"]["properties"];
        for list in ["limits", "requests"] {
            let rules = resources[list]["additionalProperties"]["x-kubernetes-validations"]
                .as_array()
                .unwrap_or_else(|| panic!("{list} values carry no rules"));
            assert!(
                rules
                    .iter()
                    .any(|r| r["rule"].as_str().unwrap().contains("isQuantity(self)"))
            );
        }
    }
}
