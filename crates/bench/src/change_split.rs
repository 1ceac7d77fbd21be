//! Where a spec change's time goes in the API server's audit log: the user's PATCH
//! answered → the first StatefulSet apply of the object by a worker received (the change's
//! watch event reaching the worker, its queue, and its reconcile up to the apply) → the
//! first status patch by a worker answered after that apply (the change converged in the
//! API server). The bench's own lag adds its watch showing that status; the ideal writer
//! has neither watch hop, so the split says what shardop's lag spends beyond its writes.

use jiff::Timestamp;
use serde_json::{Value, json};

use crate::convergence::quantile;

/// One user's spec change as the audit log shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChangeTimeline {
    /// The user's PATCH answered.
    pub changed: Timestamp,
    /// The first StatefulSet apply of the object by a worker received after that.
    pub applied: Option<Timestamp>,
    /// The first status patch of the object by a worker answered after that apply.
    pub status_written: Option<Timestamp>,
}

/// p50 and p99 of change → apply received (`to_apply_*`) and change → status written
/// (`to_status_*`) over the changes that have both, and how many have not
/// (`unsplit_changes`: deleted before, or carried out after the log was read).
pub fn summary(changes: &[ChangeTimeline]) -> Value {
    let mut to_apply = Vec::new();
    let mut to_status = Vec::new();
    for change in changes {
        if let (Some(applied), Some(written)) = (change.applied, change.status_written) {
            to_apply.push(seconds_between(change.changed, applied));
            to_status.push(seconds_between(change.changed, written));
        }
    }
    let round_ms = |s: f64| (s * 1000.0).round() / 1000.0;
    json!({
        "to_apply_p50_s": round_ms(quantile(&to_apply, 0.50)),
        "to_apply_p99_s": round_ms(quantile(&to_apply, 0.99)),
        "to_status_p50_s": round_ms(quantile(&to_status, 0.50)),
        "to_status_p99_s": round_ms(quantile(&to_status, 0.99)),
        "split_changes": to_status.len(),
        "unsplit_changes": changes.len() - to_status.len(),
    })
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(1_700_000_000_000 + ms).unwrap()
    }

    #[test]
    fn splits_the_changes_that_were_carried_out() {
        let mut changes: Vec<ChangeTimeline> = (1..=100)
            .map(|i| ChangeTimeline {
                changed: at(0),
                applied: Some(at(10 * i)),
                status_written: Some(at(10 * i + 50)),
            })
            .collect();
        changes.push(ChangeTimeline {
            changed: at(0),
            applied: None,
            status_written: None,
        });
        let figures = summary(&changes);
        assert_eq!(figures["to_apply_p50_s"], 0.5);
        assert_eq!(figures["to_apply_p99_s"], 0.99);
        assert_eq!(figures["to_status_p99_s"], 1.04);
        assert_eq!(figures["split_changes"], 100);
        assert_eq!(figures["unsplit_changes"], 1);
        assert_eq!(summary(&[])["split_changes"], 0);
    }
}
