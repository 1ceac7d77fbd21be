//! The webhook's view of the shards: the shard Leases and the desired count, each kept by
//! its own watch in every replica (leader or standby), read as a snapshot on each request so
//! an answer never waits for the engine.

use jiff::Timestamp;
use shardop::protocol::ShardTable;
use shardop::{OperatorNames, ShardLeaseWatch};

use crate::planning;
use crate::shard_count::ShardCountRx;

/// A cheap-to-clone handle on the two watches.
#[derive(Clone)]
pub struct ShardView {
    pub names: OperatorNames,
    pub leases: ShardLeaseWatch,
    pub count: ShardCountRx,
}

impl ShardView {
    /// The shard table at `now`; `None` until both watches have synced (then the webhook
    /// stamps nothing and the watch path assigns).
    pub fn table(&self, now: Timestamp) -> Option<ShardTable> {
        if !self.leases.is_ready() {
            return None;
        }
        let count = (*self.count.borrow())?;
        Some(planning::shard_table(
            &self.names,
            count,
            &self.leases.all(),
            now,
        ))
    }
}
