//! The names one sharded operator uses in the cluster: its label keys, Lease names, Shard
//! object names and field managers, all derived from the operator's name so that two
//! operators sharded by shardop in one cluster never see each other's labels or Leases.
//!
//! The default operator, `shardop` (the DatabaseCluster operator), keeps the names of the
//! protocol's first version: `shardop.dev/shard`, `shardop-shard-<i>`, `shard-<i>`, the field
//! managers `shardop-assigner` and `shardop-worker`. Any other operator `foo` gets
//! `foo.shardop.dev/shard`, `foo-shard-<i>` (Lease and Shard), `foo-assigner`, `foo-worker`.

use crate::shard_index::ShardIndex;

/// The name of the operator whose names these are by default.
pub const DEFAULT_OPERATOR: &str = "shardop";

/// The longest operator name: `<name>-assigner` must stay a valid field manager and Lease
/// name, and `<name>.shardop.dev` a label prefix, with room for every shard index.
pub const MAX_OPERATOR_NAME_LEN: usize = 40;

/// An operator name that is not a lowercase DNS label of at most
/// [`MAX_OPERATOR_NAME_LEN`] characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid operator name {0:?}: use 1 to {max} lowercase letters, digits and '-', starting with a letter and not ending with '-'",
    max = MAX_OPERATOR_NAME_LEN
)]
pub struct InvalidOperatorName(pub String);

/// Every cluster-visible name of one sharded operator.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OperatorNames {
    operator: String,
    label_prefix: String,
}

impl Default for OperatorNames {
    fn default() -> Self {
        Self {
            operator: DEFAULT_OPERATOR.to_owned(),
            label_prefix: "shardop.dev".to_owned(),
        }
    }
}

impl OperatorNames {
    /// The names of operator `operator`; see the module docs for the scheme.
    pub fn new(operator: &str) -> Result<Self, InvalidOperatorName> {
        if !is_operator_name(operator) {
            return Err(InvalidOperatorName(operator.to_owned()));
        }
        if operator == DEFAULT_OPERATOR {
            return Ok(Self::default());
        }
        Ok(Self {
            operator: operator.to_owned(),
            label_prefix: format!("{operator}.shardop.dev"),
        })
    }

    /// The operator's name.
    pub fn operator(&self) -> &str {
        &self.operator
    }

    /// Whether these are the default operator's names.
    pub fn is_default(&self) -> bool {
        self.operator == DEFAULT_OPERATOR
    }

    /// The prefix of the operator's label and annotation keys (`shardop.dev`,
    /// `foo.shardop.dev`).
    pub fn label_prefix(&self) -> &str {
        &self.label_prefix
    }

    /// Label naming the shard that owns an object (`shardop.dev/shard`).
    pub fn shard_label(&self) -> String {
        format!("{}/shard", self.label_prefix)
    }

    /// Label the assigner sets to ask the owning shard to let go of an object
    /// (`shardop.dev/drain`).
    pub fn drain_label(&self) -> String {
        format!("{}/drain", self.label_prefix)
    }

    /// Label selector of one shard's objects (`shardop.dev/shard=3`).
    pub fn shard_selector(&self, shard: ShardIndex) -> String {
        format!("{}={}", self.shard_label(), shard)
    }

    /// Label on every shard Lease of the operator (`shardop.dev/shard-lease`).
    pub fn shard_lease_label(&self) -> String {
        format!("{}/shard-lease", self.label_prefix)
    }

    /// Annotation on a shard Lease asking its holder to release it.
    pub fn release_requested_annotation(&self) -> String {
        format!("{}/release-requested-by", self.label_prefix)
    }

    /// Annotation on the Lease of a shard outside the desired shard count.
    pub fn retired_annotation(&self) -> String {
        format!("{}/retired", self.label_prefix)
    }

    /// Annotation on a shard Lease naming the ordinal of the worker that is home for the
    /// shard (`shardop.dev/home-worker`), when shards outnumber workers; without it, shard
    /// `i`'s home is worker `i`.
    pub fn home_worker_annotation(&self) -> String {
        format!("{}/home-worker", self.label_prefix)
    }

    /// Prefix of the shard Lease names (`shardop-shard-`).
    pub fn shard_lease_prefix(&self) -> String {
        format!("{}-shard-", self.operator)
    }

    /// Name of shard `shard`'s Lease (`shardop-shard-3`).
    pub fn shard_lease_name(&self, shard: ShardIndex) -> String {
        format!("{}{}", self.shard_lease_prefix(), shard)
    }

    /// The shard whose Lease is named `name`, if it is one of this operator's shard Leases
    /// with an index below the maximum shard count.
    pub fn shard_of_lease(&self, name: &str) -> Option<ShardIndex> {
        name.strip_prefix(&self.shard_lease_prefix())?.parse().ok()
    }

    /// Name of shard `shard`'s `Shard` object (`shard-3` for the default operator,
    /// `foo-shard-3` otherwise).
    pub fn shard_object_name(&self, shard: ShardIndex) -> String {
        if self.is_default() {
            format!("shard-{shard}")
        } else {
            self.shard_lease_name(shard)
        }
    }

    /// Name of the assigner's leader-election Lease (`shardop-assigner`).
    pub fn assigner_lease_name(&self) -> String {
        format!("{}-assigner", self.operator)
    }

    /// Field manager of the assigner's writes (`shardop-assigner`); a worker trusts a shard
    /// label only if this manager owns it.
    pub fn assigner_field_manager(&self) -> String {
        format!("{}-assigner", self.operator)
    }

    /// Field manager of the workers' writes (`shardop-worker`).
    pub fn worker_field_manager(&self) -> String {
        format!("{}-worker", self.operator)
    }
}

/// A lowercase RFC 1123 label of at most [`MAX_OPERATOR_NAME_LEN`] characters that starts
/// with a letter.
fn is_operator_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=MAX_OPERATOR_NAME_LEN).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants;

    fn shard(i: u32) -> ShardIndex {
        i.to_string().parse().unwrap()
    }

    #[test]
    fn the_default_operator_keeps_the_first_versions_names() {
        let names = OperatorNames::default();
        assert_eq!(OperatorNames::new("shardop").unwrap(), names);
        assert_eq!(names.shard_label(), constants::SHARD_LABEL);
        assert_eq!(names.drain_label(), constants::DRAIN_LABEL);
        assert_eq!(names.shard_lease_label(), constants::SHARD_LEASE_LABEL);
        assert_eq!(names.shard_lease_prefix(), constants::SHARD_LEASE_PREFIX);
        assert_eq!(
            names.release_requested_annotation(),
            constants::RELEASE_REQUESTED_ANNOTATION
        );
        assert_eq!(names.retired_annotation(), constants::RETIRED_ANNOTATION);
        assert_eq!(
            names.home_worker_annotation(),
            constants::HOME_WORKER_ANNOTATION
        );
        assert_eq!(names.assigner_lease_name(), constants::ASSIGNER_LEASE_NAME);
        assert_eq!(
            names.assigner_field_manager(),
            constants::ASSIGNER_FIELD_MANAGER
        );
        assert_eq!(
            names.worker_field_manager(),
            constants::WORKER_FIELD_MANAGER
        );
        assert_eq!(names.shard_lease_name(shard(3)), "shardop-shard-3");
        assert_eq!(names.shard_object_name(shard(3)), "shard-3");
        assert_eq!(names.shard_selector(shard(3)), "shardop.dev/shard=3");
    }

    #[test]
    fn another_operator_shares_no_name_with_the_default() {
        let default = OperatorNames::default();
        let tenants = OperatorNames::new("tenants").unwrap();
        assert_eq!(tenants.shard_label(), "tenants.shardop.dev/shard");
        assert_eq!(tenants.shard_lease_name(shard(0)), "tenants-shard-0");
        assert_eq!(tenants.shard_object_name(shard(0)), "tenants-shard-0");
        assert_eq!(tenants.assigner_field_manager(), "tenants-assigner");
        assert_ne!(tenants.shard_label(), default.shard_label());
        assert_ne!(tenants.drain_label(), default.drain_label());
        assert_ne!(tenants.shard_lease_label(), default.shard_lease_label());
        assert_eq!(default.shard_of_lease("tenants-shard-0"), None);
        assert_eq!(tenants.shard_of_lease("tenants-shard-7"), Some(shard(7)));
        assert_eq!(tenants.shard_of_lease("tenants-shard-1024"), None);
    }

    #[test]
    fn operator_names_are_dns_labels() {
        for bad in ["", "Foo", "1abc", "a_b", "abc-", &"a".repeat(41)] {
            assert!(OperatorNames::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "tenants", "my-op-2", &"a".repeat(40)] {
            assert!(OperatorNames::new(good).is_ok(), "{good:?} rejected");
        }
    }
}
