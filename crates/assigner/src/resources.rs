//! The kinds the assigner shards: `--resource <resource>.<version>.<group>` names, and their
//! API discovery (the kind's `ApiResource` and whether it is namespaced) at the start of
//! each leadership term.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use kube::Client;
use kube::core::{ApiResource, GroupVersion};
use kube::discovery::{self, Scope};
use shardop::retry::{RetrySchedule, jitter_unit};
use tokio_util::sync::CancellationToken;

/// The kind sharded when no `--resource` is given.
pub const DEFAULT_RESOURCE: &str = "databaseclusters.v1alpha1.shardop.dev";

/// A kind as named on the command line: `databaseclusters.v1alpha1.shardop.dev`, or
/// `configmaps.v1` for the core group.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResourceName {
    /// The plural resource name (`databaseclusters`).
    pub resource: String,
    /// The API version (`v1alpha1`).
    pub version: String,
    /// The API group, empty for the core group.
    pub group: String,
}

/// A `--resource` value that is not `<resource>.<version>[.<group>]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid resource {0:?}: write <resource>.<version>.<group> (e.g. databaseclusters.v1alpha1.shardop.dev), or <resource>.<version> for the core group (e.g. configmaps.v1)"
)]
pub struct InvalidResourceName(String);

impl FromStr for ResourceName {
    type Err = InvalidResourceName;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidResourceName(value.to_owned());
        let trimmed = value.trim();
        let mut parts = trimmed.splitn(3, '.');
        let resource = parts
            .next()
            .filter(|r| is_name_segment(r))
            .ok_or_else(invalid)?;
        let version = parts
            .next()
            .filter(|v| is_name_segment(v))
            .ok_or_else(invalid)?;
        let group = parts.next().unwrap_or_default();
        if !group.is_empty() && !group.split('.').all(is_name_segment) {
            return Err(invalid());
        }
        Ok(Self {
            resource: resource.to_owned(),
            version: version.to_owned(),
            group: group.to_owned(),
        })
    }
}

/// A lowercase DNS label (resource names, versions and group segments all are).
fn is_name_segment(segment: &str) -> bool {
    !segment.is_empty()
        && !segment.starts_with('-')
        && !segment.ends_with('-')
        && segment
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.resource, self.version)?;
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        Ok(())
    }
}

impl ResourceName {
    fn group_version(&self) -> GroupVersion {
        GroupVersion::gv(&self.group, &self.version)
    }
}

/// Index of a sharded kind in the assigner's list of kinds: part of every object key, so
/// objects of different kinds never share a key.
pub type KindId = u16;

/// A sharded kind as the API server serves it.
#[derive(Clone, Debug)]
pub struct ShardedKind {
    /// Its place in the list of kinds (see [`KindId`]).
    pub id: KindId,
    /// As given on the command line.
    pub name: ResourceName,
    /// Group, version, kind and plural for dynamic requests.
    pub api: ApiResource,
    /// Namespaced (true) or cluster-scoped.
    pub namespaced: bool,
}

/// Why a kind could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The API server does not serve the group version, or the resource in it.
    #[error(
        "the API server does not serve {0} (is its CustomResourceDefinition installed, and the version served?)"
    )]
    NotServed(ResourceName),
    /// More kinds than a [`KindId`] can tell apart.
    #[error("too many --resource kinds ({0})")]
    TooMany(usize),
    /// Discovery failed otherwise.
    #[error("discovering {0}: {1}")]
    Api(ResourceName, #[source] kube::Error),
}

/// Looks every kind up by API discovery.
pub async fn discover(
    client: &Client,
    names: &[ResourceName],
) -> Result<Vec<ShardedKind>, DiscoveryError> {
    let mut kinds = Vec::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        let id = KindId::try_from(index).map_err(|_| DiscoveryError::TooMany(names.len()))?;
        let group = match discovery::pinned_group(client, &name.group_version()).await {
            Ok(group) => group,
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                return Err(DiscoveryError::NotServed(name.clone()));
            }
            Err(err) => return Err(DiscoveryError::Api(name.clone(), err)),
        };
        let (api, caps) = group
            .versioned_resources(&name.version)
            .into_iter()
            .find(|(api, _)| api.plural == name.resource)
            .ok_or_else(|| DiscoveryError::NotServed(name.clone()))?;
        kinds.push(ShardedKind {
            id,
            name: name.clone(),
            api,
            namespaced: caps.scope == Scope::Namespaced,
        });
    }
    Ok(kinds)
}

/// [`discover`], retried with the API-server backoff until every kind resolves (a CRD
/// installed after the assigner is picked up) or `stop` is cancelled (`None`). Every
/// failure is logged with its reason, so an assigner that waits says what for.
pub async fn discover_until_served(
    client: &Client,
    names: &[ResourceName],
    stop: &CancellationToken,
) -> Option<Vec<ShardedKind>> {
    let mut schedule = RetrySchedule::api_default();
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return None,
            result = discover(client, names) => result,
        };
        let err = match result {
            Ok(kinds) => {
                for kind in &kinds {
                    tracing::info!(
                        resource = %kind.name,
                        kind = %kind.api.kind,
                        namespaced = kind.namespaced,
                        "sharding"
                    );
                }
                return Some(kinds);
            }
            Err(err) => err,
        };
        let delay: Duration = schedule.next_delay(jitter_unit());
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        tracing::warn!(error = %err, retry_in_ms, "cannot shard the configured resources yet");
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_parse_with_and_without_a_group() {
        let default: ResourceName = DEFAULT_RESOURCE.parse().unwrap();
        assert_eq!(default.resource, "databaseclusters");
        assert_eq!(default.version, "v1alpha1");
        assert_eq!(default.group, "shardop.dev");
        assert_eq!(default.to_string(), DEFAULT_RESOURCE);
        let core: ResourceName = "configmaps.v1".parse().unwrap();
        assert_eq!(core.group, "");
        assert_eq!(core.to_string(), "configmaps.v1");
        assert_eq!(core.group_version().api_version(), "v1");
        assert_eq!(
            default.group_version().api_version(),
            "shardop.dev/v1alpha1"
        );
        for bad in [
            "",
            "configmaps",
            "configmaps.",
            ".v1",
            "Widgets.v1.example.com",
            "widgets.v1.example..com",
            "widgets/v1",
        ] {
            assert!(bad.parse::<ResourceName>().is_err(), "{bad:?} accepted");
        }
    }
}
