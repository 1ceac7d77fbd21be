//! Direct relabels off a fenced shard (A5, A7) wait for a fresh read of its Lease.
//!
//! A shard is fenced when it is out of range and its Lease is retired and not live, judged
//! by the wall clock on the copy the Lease watch last brought. When that watch stalls (an
//! error and its backoff, API throttling) the copy can be old while passes go on: a retired
//! Lease whose holder still renews it (finishing reconciles within its shutdown timeout)
//! reads expired, and relabelling its objects directly would let two shards act on one
//! object. So a shard the watched copy shows fenced counts as fenced for object decisions
//! only once a GET of its Lease showed the same; until then it counts as not fenced: its
//! objects are drained the normal way, or wait.
//!
//! A confirmation holds, without reading again, for as long as the watched copy of the same
//! Lease object (same uid) shows the shard fenced. A Lease that a read showed retired and
//! not live cannot become live again: no worker acquires a retired Lease, and a holder whose
//! own validity ran out treats it as lost (writing it again would be an acquisition). Only
//! the assigner ends a fence: by bringing the shard back into range, which the table shows
//! at once (N does not come from the Lease watch), or by deleting the Lease, which it does
//! only when no object carries the shard's label or the shard is back in range; a Lease
//! created after that is a new object with a new uid and is read afresh.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use shardop::protocol::{LeaseSnapshot, ShardTable};
use shardop::{OperatorNames, ShardCount, ShardIndex};
use tokio::time::Instant;

/// After a read that did not confirm a fence (or failed), the next read of that Lease waits
/// this long: a stalled watch can keep showing the fence for many passes.
pub const RECHECK: Duration = Duration::from_secs(1);
/// A read in flight is not repeated for this long (longer than a request's timeout), and is
/// assumed lost after it.
const READ_HOLD: Duration = Duration::from_secs(60);

/// The reads that confirm fences, and what they showed.
#[derive(Debug, Default)]
pub struct Fences {
    /// Shards whose fence a read confirmed, with the uid of the Lease read.
    confirmed: HashMap<ShardIndex, Option<String>>,
    /// Shards whose Lease is not to be read again before the instant: a read is in flight,
    /// or the last one did not confirm the fence.
    reads: HashMap<ShardIndex, Instant>,
    /// Shards a read answered since the watched copy showed them fenced (confirming it or
    /// not): no longer [`Review::pending`].
    answered: BTreeSet<ShardIndex>,
}

/// What [`Fences::review`] found in one pass's table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Review {
    /// Shards the watched Leases show fenced that no read confirmed: not fenced for object
    /// decisions.
    pub unconfirmed: BTreeSet<ShardIndex>,
    /// Of those, the ones whose Lease to read now (a read is then counted as in flight).
    pub to_read: Vec<ShardIndex>,
    /// Of the unconfirmed, those no read has answered yet: most likely fenced (the watch
    /// is usually right), so their objects get no drain request either — it would never be
    /// acknowledged, and cost a write per object before the direct relabel a confirmation
    /// brings a moment later. Once a read says the shard is live after all, its objects are
    /// drained the normal way.
    pub pending: BTreeSet<ShardIndex>,
}

impl Fences {
    /// Compares the fences `table` shows on the watched `leases` with the reads: forgets
    /// confirmations the watched copies no longer support, and returns the fences not
    /// confirmed and the Leases to read for them.
    pub fn review(
        &mut self,
        table: &ShardTable,
        leases: &BTreeMap<ShardIndex, Arc<Lease>>,
        now: Instant,
    ) -> Review {
        let fenced: BTreeMap<ShardIndex, Option<&str>> = leases
            .iter()
            .filter(|(shard, _)| table.is_fenced(**shard))
            .map(|(shard, lease)| (*shard, lease.metadata.uid.as_deref()))
            .collect();
        self.confirmed
            .retain(|shard, uid| fenced.get(shard) == Some(&uid.as_deref()));
        self.answered.retain(|shard| fenced.contains_key(shard));
        self.reads.retain(|_, until| now < *until);
        let unconfirmed: BTreeSet<ShardIndex> = fenced
            .keys()
            .filter(|shard| !self.confirmed.contains_key(shard))
            .copied()
            .collect();
        let to_read: Vec<ShardIndex> = unconfirmed
            .iter()
            .filter(|shard| !self.reads.contains_key(shard))
            .copied()
            .collect();
        for shard in &to_read {
            self.reads.insert(*shard, now + READ_HOLD);
        }
        let pending = unconfirmed
            .iter()
            .filter(|shard| !self.answered.contains(shard))
            .copied()
            .collect();
        Review {
            unconfirmed,
            to_read,
            pending,
        }
    }

    /// Takes the result of reading `shard`'s Lease (`None`: there is none) at wall-clock
    /// `wall` and `now`; returns whether it confirmed the fence.
    pub fn read(
        &mut self,
        shard: ShardIndex,
        fresh: Option<&Lease>,
        names: &OperatorNames,
        wall: Timestamp,
        now: Instant,
    ) -> bool {
        self.answered.insert(shard);
        match fresh.filter(|lease| reads_fenced(lease, names, wall)) {
            Some(lease) => {
                self.reads.remove(&shard);
                self.confirmed.insert(shard, lease.metadata.uid.clone());
                true
            }
            None => {
                self.read_failed(shard, now);
                false
            }
        }
    }

    /// The read of `shard`'s Lease failed: it is tried again after [`RECHECK`].
    pub fn read_failed(&mut self, shard: ShardIndex, now: Instant) {
        self.reads.insert(shard, now + RECHECK);
    }
}

/// Whether `lease` is retired and not live at `wall` (being out of range is the table's
/// part of being fenced).
fn reads_fenced(lease: &Lease, names: &OperatorNames, wall: Timestamp) -> bool {
    let snapshot = LeaseSnapshot::from_lease_of(lease, names);
    snapshot.retired && !snapshot.is_live_at(wall)
}

/// The table object decisions are made on: the watched `leases`, except that those of the
/// `unconfirmed` shards read as not retired, so these shards are not fenced. Nothing else
/// changes: retirement bears on an object's decision only through the fence, and these
/// shards are out of range, so `E` and the destinations stay the same.
pub fn object_table(
    names: &OperatorNames,
    n: ShardCount,
    leases: &BTreeMap<ShardIndex, Arc<Lease>>,
    unconfirmed: &BTreeSet<ShardIndex>,
    now: Timestamp,
) -> ShardTable {
    let snapshots = leases.iter().map(|(shard, lease)| {
        let mut snapshot = LeaseSnapshot::from_lease_of(lease, names);
        if unconfirmed.contains(shard) {
            snapshot.retired = false;
        }
        (*shard, snapshot)
    });
    ShardTable::new(n, snapshots, now)
}
