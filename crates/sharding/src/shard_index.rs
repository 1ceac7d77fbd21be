//! The index of a shard and the number of shards.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The index of one shard, `0..N` with `N ≤ MAX_SHARDS`. A worker's StatefulSet ordinal is
/// its home shard. Every index parsed from a label, a Lease name or a flag is below
/// [`MAX_SHARDS`](crate::constants::MAX_SHARDS).
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
    "{value:?} is not a shard index (a decimal number below {max} without sign or leading zeros)",
    max = crate::constants::MAX_SHARDS
)]
pub struct ParseShardIndexError {
    /// The rejected value.
    pub value: String,
}

impl FromStr for ShardIndex {
    type Err = ParseShardIndexError;

    /// Accepts only the canonical form, because a worker's label selector `shard=1`
    /// does not match `01` or `+1`: a non-canonical value is owned by nobody. Values at
    /// or above [`MAX_SHARDS`](crate::constants::MAX_SHARDS) are rejected too.
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
        value
            .parse::<u32>()
            .ok()
            .filter(|&index| index < crate::constants::MAX_SHARDS)
            .map(ShardIndex)
            .ok_or_else(err)
    }
}

/// The number of shards: at least one, at most [`MAX_SHARDS`](crate::constants::MAX_SHARDS).
pub type ShardCount = NonZeroU32;

/// `count` as a shard count, capped at [`MAX_SHARDS`](crate::constants::MAX_SHARDS);
/// `None` for zero.
pub fn capped_shard_count(count: u32) -> Option<ShardCount> {
    ShardCount::new(count.min(crate::constants::MAX_SHARDS))
}

/// Parses a shard count flag: `1..=MAX_SHARDS`.
pub fn parse_shard_count(value: &str) -> Result<ShardCount, String> {
    let max = crate::constants::MAX_SHARDS;
    value
        .parse::<u32>()
        .ok()
        .filter(|count| (1..=max).contains(count))
        .and_then(ShardCount::new)
        .ok_or_else(|| format!("{value:?} is not a shard count (a whole number from 1 to {max})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::MAX_SHARDS;

    #[test]
    fn parses_only_canonical_values() {
        assert_eq!("0".parse(), Ok(ShardIndex(0)));
        assert_eq!("17".parse(), Ok(ShardIndex(17)));
        assert_eq!("1023".parse(), Ok(ShardIndex(MAX_SHARDS - 1)));
        for bad in [
            "1024",
            "4294967295",
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

    #[test]
    fn lease_names_past_the_maximum_are_not_shard_leases() {
        assert_eq!(
            ShardIndex::from_lease_name("shardop-shard-1023"),
            Some(ShardIndex(1023))
        );
        for name in [
            "shardop-shard-1024",
            "shardop-shard-4294967295",
            "shardop-shard-4294967296",
            "shardop-shard-18446744073709551616",
        ] {
            assert_eq!(ShardIndex::from_lease_name(name), None, "{name}");
        }
    }

    #[test]
    fn shard_counts_are_bounded() {
        assert_eq!(parse_shard_count("1"), Ok(ShardCount::MIN));
        assert_eq!(
            parse_shard_count("1024").map(ShardCount::get),
            Ok(MAX_SHARDS)
        );
        for bad in ["0", "1025", "4294967295", "4294967296", "-1", "x"] {
            assert!(parse_shard_count(bad).is_err(), "{bad:?} must be rejected");
        }
        assert_eq!(capped_shard_count(0), None);
        assert_eq!(capped_shard_count(3).map(ShardCount::get), Some(3));
        assert_eq!(
            capped_shard_count(u32::MAX).map(ShardCount::get),
            Some(MAX_SHARDS)
        );
    }
}
