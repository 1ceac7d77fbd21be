//! Synthetic audit log lines, as the API server writes them, for unit tests of the readers
//! (here and in the bench). Each line goes through the real parser.

use jiff::Timestamp;
use serde_json::{Value, json};

use super::event::{AuditEvent, parse_line};

/// One `ResponseComplete` line under construction: 200, received at 0 ms, complete 10 ms
/// later, no response object.
#[derive(Debug, Clone)]
pub struct Line {
    value: Value,
}

impl Line {
    /// `verb` of `resource[/subresource]` `name` in `namespace` by user agent `agent`. The
    /// API group follows from the resource (`leases`, `databaseclusters`, `statefulsets`).
    pub fn new(verb: &str, agent: &str, resource: &str, namespace: &str, name: &str) -> Self {
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub)),
            None => (resource, None),
        };
        let group = match resource {
            "leases" => Some("coordination.k8s.io"),
            "databaseclusters" | "shards" => Some("shardop.dev"),
            "tenants" => Some("example.shardop.dev"),
            "statefulsets" => Some("apps"),
            _ => None,
        };
        // An empty namespace: a cluster-scoped object, whose objectRef has none.
        let mut object_ref = json!({ "resource": resource });
        if !namespace.is_empty() {
            object_ref["namespace"] = json!(namespace);
        }
        if !name.is_empty() {
            object_ref["name"] = json!(name);
        }
        if let Some(sub) = subresource {
            object_ref["subresource"] = json!(sub);
        }
        if let Some(group) = group {
            object_ref["apiGroup"] = json!(group);
        }
        let line = Self {
            value: json!({
                "kind": "Event",
                "apiVersion": "audit.k8s.io/v1",
                "level": "RequestResponse",
                "stage": "ResponseComplete",
                "verb": verb,
                "user": { "username": "system:admin" },
                "userAgent": agent,
                "objectRef": object_ref,
                "responseStatus": { "metadata": {}, "code": 200 },
            }),
        };
        line.at(0, 10)
    }

    /// Received at `received` ms, complete at `completed` ms (since the epoch).
    pub fn at(mut self, received: i64, completed: i64) -> Self {
        let stamp = |ms: i64| {
            Timestamp::from_millisecond(ms)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        self.value["requestReceivedTimestamp"] = json!(stamp(received));
        self.value["stageTimestamp"] = json!(stamp(completed));
        self
    }

    /// The response code.
    pub fn code(mut self, code: u16) -> Self {
        self.value["responseStatus"]["code"] = json!(code);
        self
    }

    /// No response status at all (the request never completed normally).
    pub fn no_status(mut self) -> Self {
        if let Some(object) = self.value.as_object_mut() {
            object.remove("responseStatus");
        }
        self
    }

    /// A response object of `kind` at `revision`, e.g. `DatabaseCluster` or
    /// `PartialObjectMetadata` (the metadata API's answer: metadata only).
    pub fn response(mut self, kind: &str, revision: u64) -> Self {
        let mut object = json!({
            "kind": kind,
            "metadata": { "name": self.value["objectRef"]["name"], "resourceVersion": revision.to_string() },
        });
        let metadata_only =
            kind == "PartialObjectMetadata" || kind == "Status" || kind.ends_with("List");
        if !metadata_only {
            object["spec"] = json!({ "replicas": 1 });
            object["status"] = json!({});
        }
        self.value["responseObject"] = object;
        self
    }

    /// A `Status` answer (a delete of most built-in kinds): no revision.
    pub fn status_answer(mut self) -> Self {
        self.value["responseObject"] =
            json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" });
        self
    }

    /// A Lease response at `revision` with `holder` (`None`: released).
    pub fn lease(mut self, holder: Option<&str>, revision: u64) -> Self {
        self.value["responseObject"] = json!({
            "kind": "Lease",
            "apiVersion": "coordination.k8s.io/v1",
            "metadata": { "name": self.value["objectRef"]["name"], "resourceVersion": revision.to_string() },
            "spec": { "holderIdentity": holder.unwrap_or(""), "leaseDurationSeconds": 15 },
        });
        self
    }

    /// The line as the API server writes it.
    pub fn to_json(&self) -> String {
        self.value.to_string()
    }

    /// The line parsed by [`parse_line`].
    pub fn event(&self) -> Option<AuditEvent> {
        parse_line(&self.to_json())
    }
}
