//! Reading the API server's audit log: the ground truth of who wrote what, with which
//! user agent, and when. Tests use it to prove shard ownership and count writes.

use std::path::Path;

use jiff::Timestamp;
use serde::Deserialize;

/// The fields of an audit event the tests look at.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// get, list, create, update, patch, delete, ...
    pub verb: String,
    /// The authenticated user.
    pub user: AuditUser,
    /// The client's User-Agent header.
    #[serde(default)]
    pub user_agent: String,
    /// What the request was about.
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
    /// The response status.
    #[serde(default)]
    pub response_status: Option<ResponseStatus>,
    /// When the API server received the request.
    pub request_received_timestamp: Timestamp,
    /// Which stage this record describes (ResponseComplete for finished requests).
    pub stage: String,
}

/// The user of an audit event.
#[derive(Debug, Clone, Deserialize)]
pub struct AuditUser {
    /// User name, e.g. `system:serviceaccount:shardop:shardop-worker`.
    #[serde(default)]
    pub username: String,
}

/// The object an audit event refers to.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// Plural resource name, e.g. `databaseclusters`.
    #[serde(default)]
    pub resource: String,
    /// Namespace, if namespaced.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Object name.
    #[serde(default)]
    pub name: Option<String>,
    /// Subresource, e.g. `status`.
    #[serde(default)]
    pub subresource: Option<String>,
    /// API group (empty for core).
    #[serde(default)]
    pub api_group: Option<String>,
}

/// The response status of an audit event.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseStatus {
    /// HTTP status code.
    #[serde(default)]
    pub code: u16,
}

impl AuditEvent {
    /// A write that the API server carried out (2xx).
    pub fn is_successful_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        ) && self
            .response_status
            .as_ref()
            .is_some_and(|s| (200..300).contains(&s.code))
    }

    /// Whether the event refers to an object in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> bool {
        self.object_ref
            .as_ref()
            .and_then(|o| o.namespace.as_deref())
            == Some(namespace)
    }

    /// The resource and name, e.g. (`databaseclusters`, `db-1`).
    pub fn target(&self) -> Option<(&str, &str)> {
        let object = self.object_ref.as_ref()?;
        Some((object.resource.as_str(), object.name.as_deref()?))
    }

    /// The DatabaseCluster an audited write belongs to: the object itself, or the one whose
    /// StatefulSet, `<name>-headless` Service or `data-<name>-<ordinal>` claim it is.
    pub fn database_cluster(&self) -> Option<String> {
        let (resource, name) = self.target()?;
        match resource {
            "databaseclusters" | "statefulsets" => Some(name.to_owned()),
            "services" => name.strip_suffix("-headless").map(str::to_owned),
            "persistentvolumeclaims" => {
                let rest = name.strip_prefix("data-")?;
                rest.rsplit_once('-').map(|(n, _)| n.to_owned())
            }
            _ => None,
        }
    }

    /// The shard in a `shardop-worker/shard-<i>` user agent.
    pub fn worker_shard(&self) -> Option<u32> {
        let rest = self.user_agent.strip_prefix("shardop-worker/shard-")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }
}

/// Every completed audit event (stage ResponseComplete) in the log.
pub fn read_events(path: &Path) -> anyhow::Result<Vec<AuditEvent>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<AuditEvent>(line).ok())
        .filter(|e| e.stage == "ResponseComplete")
        .collect())
}

/// Completed events about objects in `namespace`.
pub fn events_in_namespace(path: &Path, namespace: &str) -> anyhow::Result<Vec<AuditEvent>> {
    Ok(read_events(path)?
        .into_iter()
        .filter(|e| e.in_namespace(namespace))
        .collect())
}
