//! The index of a shard and the number of shards.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The index of one shard, `0..N`. A worker's StatefulSet ordinal is its home shard.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct ShardIndex(pub u32);

impl ShardIndex {
    /// The value stamped into the shard label: canonical decimal, no sign, no leading zeros.
    pub fn label_value(self) -> String {
        self.0.to_string()
    }

    /// The name of the Lease that guards this shard.
    pub fn lease_name(self) -> String {
        format!("{}{}", crate::constants::SHARD_LEASE_PREFIX, self.0)
    }

    /// The name of the `Shard` object that reports on this shard.
    pub fn shard_object_name(self) -> String {
        format!("shard-{}", self.0)
    }

    /// The shard a Lease name guards, if it is a shard Lease.
    pub fn from_lease_name(name: &str) -> Option<Self> {
        name.strip_prefix(crate::constants::SHARD_LEASE_PREFIX)?
            .parse()
            .ok()
    }

    /// The label selector that matches exactly this shard's objects.
    pub fn selector(self) -> String {
        format!("{}={}", crate::constants::SHARD_LABEL, self.0)
    }
}

impl fmt::Display for ShardIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u32> for ShardIndex {
    fn from(value: u32) -> Self {
        Self(value)
    }
}

/// Why a shard label value is not a shard index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "shard label value {value:?} is not a canonical shard index (a decimal number without sign or leading zeros)"
)]
pub struct ParseShardIndexError {
    /// The rejected value.
    pub value: String,
}

impl FromStr for ShardIndex {
    type Err = ParseShardIndexError;

    /// Accepts only the canonical form, because a worker's label selector `shard=1`
    /// does not match `01` or `+1`: a non-canonical value is owned by nobody.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let canonical = !value.is_empty()
            && value.bytes().all(|b| b.is_ascii_digit())
            && (value == "0" || !value.starts_with('0'));
        let err = || ParseShardIndexError {
            value: value.to_owned(),
        };
        if !canonical {
            return Err(err());
        }
        value.parse::<u32>().map(ShardIndex).map_err(|_| err())
    }
}

/// The number of shards: at least one.
pub type ShardCount = NonZeroU32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_canonical_values() {
        assert_eq!("0".parse(), Ok(ShardIndex(0)));
        assert_eq!("17".parse(), Ok(ShardIndex(17)));
        assert_eq!("4294967295".parse(), Ok(ShardIndex(u32::MAX)));
        for bad in [
            "",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "a",
            "1.0",
            "4294967296",
            "٣",
        ] {
            assert!(
                bad.parse::<ShardIndex>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn names_round_trip() {
        let shard = ShardIndex(3);
        assert_eq!(shard.lease_name(), "shardop-shard-3");
        assert_eq!(ShardIndex::from_lease_name("shardop-shard-3"), Some(shard));
        assert_eq!(ShardIndex::from_lease_name("shardop-shard-03"), None);
        assert_eq!(ShardIndex::from_lease_name("shardop-assigner"), None);
        assert_eq!(shard.selector(), "shardop.dev/shard=3");
        assert_eq!(shard.shard_object_name(), "shard-3");
    }
}
