//! One AdmissionReview: decide with [`shardop::protocol::admission`] and, for a stamp,
//! answer with a JSONPatch that adds the shard label and records the assigner's field
//! manager as its owner.
//!
//! The API server computes `managedFields` before mutating admission, so a label a webhook
//! adds would be attributed to the creating request's manager, and workers trust a shard
//! label only when the assigner's manager owns it (`shardop::label_trust`). It keeps valid
//! `managedFields` changes a mutating webhook makes, so the patch also appends the entry
//! that makes the assigner the label's owner: the worker's trust rule stays "the assigner
//! wrote it", at creation or later.
//!
//! With `--webhook-finalizers`, the patch also adds those finalizers, with a `managedFields`
//! entry that makes the workers' field manager their owner, exactly as the worker's own
//! server-side apply of its finalizer would: the first reconcile then skips that write, and
//! a later apply by the creator that omits the finalizer cannot remove it (a field
//! another manager owns stays).

use jiff::Timestamp;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::{Value, json};
use shardop::OperatorNames;
use shardop::ShardIndex;
use shardop::protocol::{Admission, Creation, ShardTable, SkipReason, admission};

use crate::resources::ResourceName;

/// What happened to one review, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Stamped(ShardIndex),
    Skipped(SkipReason),
    /// Not a CREATE of a sharded kind (a misconfigured rule): admitted unchanged.
    NotOurs,
    /// The review did not parse: admitted unchanged (a webhook must never block).
    Unreadable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stamped(_) => "stamped",
            Self::Skipped(reason) => reason.as_str(),
            Self::NotOurs => "not_ours",
            Self::Unreadable => "unreadable",
        }
    }
}

/// What the webhook answers for.
pub struct Reviewer {
    pub names: OperatorNames,
    pub kinds: Vec<ResourceName>,
    /// Finalizers added to every stamped object, owned by the workers' field manager.
    pub finalizers: Vec<String>,
}

impl Reviewer {
    /// The response body for request body `body`, given the shard table now (if any).
    pub fn review(
        &self,
        body: &[u8],
        table: Option<&ShardTable>,
        now: Timestamp,
    ) -> (Vec<u8>, Verdict) {
        let request = serde_json::from_slice::<AdmissionReview<DynamicObject>>(body)
            .ok()
            .and_then(|review| TryInto::<AdmissionRequest<DynamicObject>>::try_into(review).ok());
        let (response, verdict) = match &request {
            Some(request) => self.respond(request, table, now),
            // Allowed, with no uid: the API server rejects the answer and applies the
            // failure policy (Ignore).
            None => (allow_unreadable(), Verdict::Unreadable),
        };
        let body = serde_json::to_vec(&response.into_review()).unwrap_or_default();
        (body, verdict)
    }

    fn respond(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        table: Option<&ShardTable>,
        now: Timestamp,
    ) -> (AdmissionResponse, Verdict) {
        let response = AdmissionResponse::from(request);
        let (Some(object), Operation::Create, true) = (
            request.object.as_ref(),
            &request.operation,
            self.is_sharded(request),
        ) else {
            return (response, Verdict::NotOurs);
        };
        let meta = &object.metadata;
        let namespace = meta
            .namespace
            .as_deref()
            .or(request.namespace.as_deref())
            .unwrap_or_default();
        let name = meta
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .or(Some(request.name.as_str()));
        let creation = Creation {
            namespace,
            name,
            labels: meta.labels.as_ref(),
        };
        match admission(creation, table, &self.names) {
            Admission::Skip(reason) => (response, Verdict::Skipped(reason)),
            Admission::Stamp(shard) => {
                let mut patch = stamp_patch(object, shard, &self.names, now);
                if let Value::Array(ops) = &mut patch {
                    ops.extend(finalizer_ops(object, &self.finalizers, &self.names, now));
                }
                match serde_json::from_value(patch).map(|p| response.clone().with_patch(p)) {
                    Ok(Ok(patched)) => (patched, Verdict::Stamped(shard)),
                    _ => (response, Verdict::Unreadable),
                }
            }
        }
    }

    fn is_sharded(&self, request: &AdmissionRequest<DynamicObject>) -> bool {
        let resource = &request.resource;
        request
            .sub_resource
            .as_deref()
            .unwrap_or_default()
            .is_empty()
            && self
                .kinds
                .iter()
                .any(|k| k.group == resource.group && k.resource == resource.resource)
    }
}

fn allow_unreadable() -> AdmissionResponse {
    let mut response = AdmissionResponse::invalid("unreadable AdmissionReview");
    response.allowed = true;
    response
}

/// A JSON Pointer token for `key` (RFC 6901).
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The JSONPatch that stamps `shard` on `object`: the label, and a `managedFields` entry
/// making the assigner's field manager its owner. Absent maps and lists are added whole.
pub fn stamp_patch(
    object: &DynamicObject,
    shard: ShardIndex,
    names: &OperatorNames,
    now: Timestamp,
) -> Value {
    let label = names.shard_label();
    let value = shard.to_string();
    let label_op = match &object.metadata.labels {
        Some(_) => json!({
            "op": "add",
            "path": format!("/metadata/labels/{}", pointer_token(&label)),
            "value": value,
        }),
        None => {
            json!({ "op": "add", "path": "/metadata/labels", "value": { label.clone(): value } })
        }
    };
    let api_version = api_version(object);
    let entry = json!({
        "manager": names.assigner_field_manager(),
        "operation": "Update",
        "apiVersion": api_version,
        "time": Timestamp::from_second(now.as_second()).unwrap_or(now).to_string(),
        "fieldsType": "FieldsV1",
        "fieldsV1": { "f:metadata": { "f:labels": { format!("f:{label}"): {} } } },
    });
    let fields_op = match &object.metadata.managed_fields {
        Some(_) => json!({ "op": "add", "path": "/metadata/managedFields/-", "value": entry }),
        None => json!({ "op": "add", "path": "/metadata/managedFields", "value": [entry] }),
    };
    json!([label_op, fields_op])
}

/// The JSONPatch operations that add `finalizers` (those `object` does not carry yet) and
/// a `managedFields` entry making the workers' field manager their owner, as its
/// server-side apply of them would. Nothing when every one is there already.
pub fn finalizer_ops(
    object: &DynamicObject,
    finalizers: &[String],
    names: &OperatorNames,
    now: Timestamp,
) -> Vec<Value> {
    let present = object.metadata.finalizers.as_deref().unwrap_or_default();
    let mut missing: Vec<&String> = Vec::new();
    for finalizer in finalizers {
        if !present.contains(finalizer) && !missing.contains(&finalizer) {
            missing.push(finalizer);
        }
    }
    if missing.is_empty() {
        return Vec::new();
    }
    let mut ops: Vec<Value> = match &object.metadata.finalizers {
        Some(_) => missing
            .iter()
            .map(|f| json!({ "op": "add", "path": "/metadata/finalizers/-", "value": f }))
            .collect(),
        None => vec![json!({ "op": "add", "path": "/metadata/finalizers", "value": missing })],
    };
    let owned: serde_json::Map<String, Value> = missing
        .iter()
        .map(|f| (format!("v:{}", Value::String((*f).clone())), json!({})))
        .collect();
    let entry = json!({
        "manager": names.worker_field_manager(),
        "operation": "Apply",
        "apiVersion": api_version(object),
        "time": Timestamp::from_second(now.as_second()).unwrap_or(now).to_string(),
        "fieldsType": "FieldsV1",
        "fieldsV1": { "f:metadata": { "f:finalizers": owned } },
    });
    // The label's entry was appended before this one, so the list exists by now.
    ops.push(json!({ "op": "add", "path": "/metadata/managedFields/-", "value": entry }));
    ops
}

fn api_version(object: &DynamicObject) -> String {
    object
        .types
        .as_ref()
        .map(|t| t.api_version.clone())
        .unwrap_or_default()
}

/// A finalizer name as the API server accepts it: `<DNS subdomain>/<name>`, the name at
/// most 63 characters of letters, digits, `-`, `_` and `.`, beginning and ending with a
/// letter or digit.
pub fn parse_finalizer(value: &str) -> Result<String, String> {
    let value = value.trim();
    let invalid = || format!("{value:?} is not a finalizer name (<domain>/<name>)");
    let (prefix, name) = value.split_once('/').ok_or_else(invalid)?;
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let prefix_ok = !prefix.is_empty()
        && prefix.len() <= 253
        && prefix.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && alnum(part.chars().next())
                && alnum(part.chars().last())
        });
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && alnum(name.chars().next())
        && alnum(name.chars().last());
    if prefix_ok && name_ok {
        Ok(value.to_owned())
    } else {
        Err(invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    use shardop::ShardCount;
    use shardop::label_trust::shard_label_written_by;
    use shardop::protocol::LeaseSnapshot;
    use std::time::Duration;

    const NOW: i64 = 1_800_000_000;

    fn table() -> ShardTable {
        let leases = (0..3).map(|i| {
            (
                ShardIndex(i),
                LeaseSnapshot {
                    holder: Some(format!("shardop-worker-{i}")),
                    acquired_once: true,
                    renew_time: Some(Timestamp::from_second(NOW - 1).unwrap()),
                    duration: Some(Duration::from_secs(15)),
                    ..Default::default()
                },
            )
        });
        ShardTable::new(ShardCount::new(3).unwrap(), leases, now())
    }

    fn now() -> Timestamp {
        Timestamp::from_second(NOW).unwrap()
    }

    fn reviewer() -> Reviewer {
        Reviewer {
            names: OperatorNames::default(),
            kinds: vec!["databaseclusters.v1alpha1.shardop.dev".parse().unwrap()],
            finalizers: Vec::new(),
        }
    }

    fn reviewer_adding(finalizers: &[&str]) -> Reviewer {
        Reviewer {
            finalizers: finalizers.iter().map(|f| (*f).to_owned()).collect(),
            ..reviewer()
        }
    }

    fn review(operation: &str, resource: &str, metadata: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "shardop.dev", "version": "v1alpha1", "kind": "DatabaseCluster"},
                "resource": {"group": "shardop.dev", "version": "v1alpha1", "resource": resource},
                "name": metadata.get("name").cloned().unwrap_or(json!("")),
                "namespace": "ns",
                "operation": operation,
                "userInfo": {"username": "alice"},
                "object": {
                    "apiVersion": "shardop.dev/v1alpha1",
                    "kind": "DatabaseCluster",
                    "metadata": metadata,
                    "spec": {}
                },
                "dryRun": false
            }
        }))
        .unwrap()
    }

    fn answer(body: &[u8]) -> Value {
        let (out, _) = reviewer().review(body, Some(&table()), now());
        serde_json::from_slice(&out).unwrap()
    }

    /// Applies the response's patch to the request's object.
    fn patched(request: &[u8], response: &Value) -> Value {
        let request: Value = serde_json::from_slice(request).unwrap();
        let mut object = request["request"]["object"].clone();
        // kube serializes the bytes as a JSON array, which the API server decodes too.
        let patch: Vec<u8> = serde_json::from_value(response["response"]["patch"].clone()).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        json_patch::patch(&mut object, &patch).unwrap();
        object
    }

    fn trusted(object: &Value) -> bool {
        let fields: Option<Vec<ManagedFieldsEntry>> =
            serde_json::from_value(object["metadata"]["managedFields"].clone()).unwrap();
        shard_label_written_by(fields.as_deref(), &OperatorNames::default())
    }

    #[test]
    fn a_create_without_labels_or_managed_fields_is_stamped_and_owned_by_the_assigner() {
        let request = review(
            "CREATE",
            "databaseclusters",
            json!({"name": "db-1", "namespace": "ns"}),
        );
        let response = answer(&request);
        assert_eq!(response["response"]["uid"], "u-1");
        assert_eq!(response["response"]["allowed"], true);
        assert_eq!(response["response"]["patchType"], "JSONPatch");
        let object = patched(&request, &response);
        let want = shardop::assignment::shard_for("ns", "db-1", ShardCount::new(3).unwrap());
        assert_eq!(
            object["metadata"]["labels"]["shardop.dev/shard"],
            want.to_string()
        );
        assert!(trusted(&object));
        let entry = &object["metadata"]["managedFields"][0];
        assert_eq!(entry["manager"], "shardop-assigner");
        assert_eq!(entry["apiVersion"], "shardop.dev/v1alpha1");
        assert_eq!(entry["time"], "2027-01-15T08:00:00Z");
    }

    #[test]
    fn a_stamped_create_gets_the_finalizers_owned_by_the_workers_manager() {
        let reviewer = reviewer_adding(&["shardop.dev/cleanup"]);
        let request = review("CREATE", "databaseclusters", json!({"name": "db-1"}));
        let (out, verdict) = reviewer.review(&request, Some(&table()), now());
        assert!(matches!(verdict, Verdict::Stamped(_)));
        let object = patched(&request, &serde_json::from_slice(&out).unwrap());
        assert_eq!(
            object["metadata"]["finalizers"],
            json!(["shardop.dev/cleanup"])
        );
        assert!(trusted(&object), "the label entry is still there");
        let entry = &object["metadata"]["managedFields"][1];
        assert_eq!(entry["manager"], "shardop-worker");
        assert_eq!(entry["operation"], "Apply");
        assert_eq!(
            entry["fieldsV1"],
            json!({"f:metadata": {"f:finalizers": {"v:\"shardop.dev/cleanup\"": {}}}})
        );
        let parsed: Vec<ManagedFieldsEntry> =
            serde_json::from_value(object["metadata"]["managedFields"].clone()).unwrap();
        assert_eq!(parsed.len(), 2);
    }

    #[test]
    fn finalizers_already_there_are_not_added_twice_and_others_are_kept() {
        let names = OperatorNames::default();
        let object = |finalizers: Value| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "shardop.dev/v1alpha1",
                "kind": "DatabaseCluster",
                "metadata": {"name": "db", "finalizers": finalizers},
            }))
            .unwrap()
        };
        let wanted = [
            "shardop.dev/cleanup".to_owned(),
            "shardop.dev/cleanup".to_owned(),
        ];
        let present = object(json!(["shardop.dev/cleanup"]));
        assert!(finalizer_ops(&present, &wanted, &names, now()).is_empty());
        let others = object(json!(["example.com/keep"]));
        let ops = finalizer_ops(&others, &wanted, &names, now());
        assert_eq!(
            ops[0],
            json!({"op": "add", "path": "/metadata/finalizers/-", "value": "shardop.dev/cleanup"})
        );
        assert_eq!(ops.len(), 2, "one finalizer, once, and its owner: {ops:?}");
        assert!(finalizer_ops(&others, &[], &names, now()).is_empty());
    }

    #[test]
    fn finalizer_names_are_checked() {
        for good in ["shardop.dev/cleanup", "a.b-c.io/x_y.z", "example.com/0"] {
            assert_eq!(parse_finalizer(good).as_deref(), Ok(good));
        }
        for bad in [
            "cleanup",
            "/cleanup",
            "shardop.dev/",
            "Shardop.dev/x",
            "shardop..dev/x",
            "shardop.dev/-x",
            "shardop.dev/x/y",
            "shardop.dev/a b",
        ] {
            assert!(parse_finalizer(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn existing_labels_and_managed_fields_are_kept() {
        let metadata = json!({
            "name": "db-2",
            "labels": {"app": "x"},
            "managedFields": [{
                "manager": "kubectl", "operation": "Update", "apiVersion": "shardop.dev/v1alpha1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}}
            }]
        });
        let request = review("CREATE", "databaseclusters", metadata);
        let object = patched(&request, &answer(&request));
        assert_eq!(object["metadata"]["labels"]["app"], "x");
        assert!(object["metadata"]["labels"]["shardop.dev/shard"].is_string());
        assert_eq!(object["metadata"]["managedFields"][0]["manager"], "kubectl");
        assert_eq!(
            object["metadata"]["managedFields"][1]["manager"],
            "shardop-assigner"
        );
        assert!(trusted(&object));
    }

    #[test]
    fn what_the_webhook_leaves_alone_is_admitted_unchanged() {
        let forged = json!({"name": "db-3", "labels": {"shardop.dev/shard": "1"}});
        let generated = json!({"generateName": "db-"});
        for (operation, resource, metadata, verdict) in [
            (
                "CREATE",
                "databaseclusters",
                forged,
                Verdict::Skipped(SkipReason::Labelled),
            ),
            (
                "CREATE",
                "databaseclusters",
                generated,
                Verdict::Skipped(SkipReason::NoName),
            ),
            (
                "UPDATE",
                "databaseclusters",
                json!({"name": "db-4"}),
                Verdict::NotOurs,
            ),
            (
                "CREATE",
                "widgets",
                json!({"name": "db-5"}),
                Verdict::NotOurs,
            ),
        ] {
            let request = review(operation, resource, metadata);
            let (out, got) = reviewer().review(&request, Some(&table()), now());
            assert_eq!(got, verdict);
            let response: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(response["response"]["allowed"], true);
            assert!(response["response"].get("patch").is_none(), "{verdict:?}");
        }
        let request = review("CREATE", "databaseclusters", json!({"name": "db-6"}));
        let (_, got) = reviewer().review(&request, None, now());
        assert_eq!(got, Verdict::Skipped(SkipReason::NotReady));
        let (out, got) = reviewer().review(b"{not json", Some(&table()), now());
        assert_eq!(got, Verdict::Unreadable);
        let response: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(response["response"]["allowed"], true);
    }

    #[test]
    fn label_keys_are_escaped_in_the_patch_path() {
        let names = OperatorNames::new("tenants").unwrap();
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {}}
        }))
        .unwrap();
        let patch = stamp_patch(&object, ShardIndex(2), &names, now());
        assert_eq!(
            patch[0]["path"],
            "/metadata/labels/tenants.shardop.dev~1shard"
        );
        assert_eq!(patch[1]["path"], "/metadata/managedFields");
    }
}
