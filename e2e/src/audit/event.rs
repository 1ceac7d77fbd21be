//! One audit event: the fields of a `ResponseComplete` line that the tests and the bench
//! look at, with the response object reduced to what ordering and Lease ownership need.

use jiff::Timestamp;
use serde::Deserialize;

/// The fields of an audit event the tests look at.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// get, list, create, update, patch, delete, ...
    pub verb: String,
    /// The authenticated user.
    #[serde(default)]
    pub user: AuditUser,
    /// The client's User-Agent header.
    #[serde(default)]
    pub user_agent: String,
    /// What the request was about.
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
    /// The response status (absent when the request never got one).
    #[serde(default)]
    pub response_status: Option<ResponseStatus>,
    /// The response body, when the policy logs it (`RequestResponse`).
    #[serde(default)]
    pub response_object: Option<ResponseObject>,
    /// When the API server received the request.
    pub request_received_timestamp: Timestamp,
    /// When this stage was recorded: for `ResponseComplete`, after the response was sent.
    pub stage_timestamp: Timestamp,
    /// Which stage this record describes (ResponseComplete for finished requests).
    pub stage: String,
}

/// The user of an audit event.
#[derive(Debug, Clone, Default, Deserialize)]
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
    /// Object name (absent for collection requests such as `deletecollection`).
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

/// The parts of a response body that order a write and tell a Lease's holder. Any kind
/// parses: a full object, a `PartialObjectMetadata` (the metadata API's answer, no spec), a
/// list (`deletecollection`) or a `Status`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseObject {
    /// `kind`, e.g. `Lease`, `PartialObjectMetadata`, `Status`.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    metadata: ResponseMetadata,
    #[serde(default)]
    spec: Option<LeaseSpecFields>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResponseMetadata {
    #[serde(default)]
    resource_version: Option<String>,
}

/// The one spec field read from responses; other kinds' specs simply lack it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseSpecFields {
    #[serde(default)]
    holder_identity: Option<String>,
}

impl ResponseObject {
    /// `metadata.resourceVersion` as the etcd revision it is on this API server.
    pub fn resource_version(&self) -> Option<u64> {
        self.metadata.resource_version.as_deref()?.parse().ok()
    }

    /// A Lease's `spec.holderIdentity`, `None` when empty or when this is no Lease.
    pub fn holder_identity(&self) -> Option<&str> {
        self.spec
            .as_ref()?
            .holder_identity
            .as_deref()
            .filter(|h| !h.is_empty())
    }
}

/// What became of a write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the API server carried it out.
    Applied,
    /// 504 or no status at all: the handler gave up (its client went away or the request
    /// timed out) while the storage write may still have gone through.
    PossiblyApplied,
    /// Any other code: refused before it reached storage (409, 422, 429, 403, ...).
    Rejected,
}

/// Verbs that change state.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// Parses one audit log line; `None` for anything but a complete `ResponseComplete` event.
pub fn parse_line(line: &str) -> Option<AuditEvent> {
    parse_line_checked(line).ok().flatten()
}

/// Parses one audit log line: `Ok(None)` for other stages, an error for a line that is no
/// audit event (e.g. torn when the API server could not write it whole: disk full).
pub fn parse_line_checked(line: &str) -> Result<Option<AuditEvent>, serde_json::Error> {
    let event = serde_json::from_str::<AuditEvent>(line)?;
    Ok((event.stage == "ResponseComplete").then_some(event))
}

impl AuditEvent {
    /// The HTTP code of the response, if it has one.
    pub fn code(&self) -> Option<u16> {
        self.response_status
            .as_ref()
            .map(|s| s.code)
            .filter(|c| *c != 0)
    }

    /// Whether the verb changes state.
    pub fn is_write(&self) -> bool {
        WRITE_VERBS.contains(&self.verb.as_str())
    }

    /// What became of the request (meaningful for writes).
    pub fn outcome(&self) -> Outcome {
        match self.code() {
            None | Some(504) => Outcome::PossiblyApplied,
            Some(200..=299) => Outcome::Applied,
            Some(_) => Outcome::Rejected,
        }
    }

    /// A write that the API server carried out (2xx).
    pub fn is_successful_write(&self) -> bool {
        self.is_write() && self.outcome() == Outcome::Applied
    }

    /// The etcd revision of an applied write: its response object's `resourceVersion`.
    pub fn resource_version(&self) -> Option<u64> {
        if self.outcome() != Outcome::Applied {
            return None;
        }
        self.response_object.as_ref()?.resource_version()
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

    /// The plural resource, empty when the event has no object.
    pub fn resource(&self) -> &str {
        self.object_ref.as_ref().map_or("", |o| o.resource.as_str())
    }

    /// The object's name, empty for collection requests.
    pub fn name(&self) -> &str {
        self.object_ref
            .as_ref()
            .and_then(|o| o.name.as_deref())
            .unwrap_or("")
    }

    /// The subresource, e.g. `status`.
    pub fn subresource(&self) -> Option<&str> {
        self.object_ref
            .as_ref()
            .and_then(|o| o.subresource.as_deref())
    }

    /// The DatabaseCluster an audited write belongs to: the object itself, or the one whose
    /// StatefulSet, `<name>-headless` Service or `data-<name>-<ordinal>` claim it is.
    pub fn owner(&self) -> Option<&str> {
        let (resource, name) = self.target()?;
        match resource {
            "databaseclusters" | "statefulsets" => Some(name),
            "services" => name.strip_suffix("-headless"),
            "persistentvolumeclaims" => {
                let rest = name.strip_prefix("data-")?;
                rest.rsplit_once('-').map(|(n, _)| n)
            }
            _ => None,
        }
        .filter(|n| !n.is_empty())
    }

    /// [`Self::owner`], owned.
    pub fn database_cluster(&self) -> Option<String> {
        self.owner().map(str::to_owned)
    }

    /// The shard in a `shardop-worker/shard-<i> (<pod>)` user agent.
    pub fn worker_shard(&self) -> Option<u32> {
        let rest = self.user_agent.strip_prefix("shardop-worker/shard-")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// The pod in a `shardop-worker/shard-<i> (<pod>)` user agent.
    pub fn worker_pod(&self) -> Option<&str> {
        self.worker_shard()?;
        let (_, rest) = self.user_agent.split_once('(')?;
        rest.split_once(')').map(|(pod, _)| pod)
    }

    /// Whether the assigner made this request (`shardop-assigner (<pod>)`).
    pub fn by_assigner(&self) -> bool {
        self.user_agent.starts_with("shardop-assigner")
    }

    /// Whether one of shardop's processes (assigner or worker) made this request.
    pub fn by_shardop(&self) -> bool {
        self.by_assigner() || self.user_agent.starts_with("shardop-worker/")
    }

    /// A label write by the assigner on a DatabaseCluster (it writes nothing else to
    /// DatabaseClusters, through the metadata API).
    pub fn is_assigner_label_write(&self) -> bool {
        self.by_assigner()
            && self.resource() == "databaseclusters"
            && self.subresource().is_none()
            && self.is_successful_write()
    }

    /// A label write by the assigner that was applied or may have been (504: a killed
    /// assigner's write can land; the new owner acting on the label shows it did).
    pub fn is_assigner_label_request(&self) -> bool {
        self.by_assigner()
            && self.resource() == "databaseclusters"
            && self.subresource().is_none()
            && self.is_write()
            && self.outcome() != Outcome::Rejected
    }

    /// Whether this is a successful write of a child object (StatefulSet or Service, not
    /// status).
    pub fn is_child_write(&self) -> bool {
        matches!(self.resource(), "statefulsets" | "services")
            && self.subresource().is_none()
            && self.is_successful_write()
    }
}
