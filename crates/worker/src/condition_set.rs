//! Setting one condition of a status's condition list (no I/O), for the conditions that
//! are not part of every status: `StorageResizing` and `Cleanup`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition's status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionValue {
    /// `True` or `False`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// Puts `value` as condition `type_` into `conditions`, replacing an entry of that type. Its
/// `lastTransitionTime` is the one in `previous` while the status stays the same (so a
/// recomputation of an unchanged world yields an identical list), else `now`.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    previous: &[Condition],
    type_: &str,
    value: ConditionValue,
    observed_generation: Option<i64>,
    now: jiff::Timestamp,
) {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == value.status)
        .map_or_else(|| Time(now), |c| c.last_transition_time.clone());
    let condition = Condition {
        type_: type_.to_owned(),
        status: value.status.to_owned(),
        reason: value.reason.to_owned(),
        message: value.message,
        observed_generation,
        last_transition_time,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

/// Copies condition `type_` from `previous` into `conditions` if it is there and
/// `conditions` has none: a condition only some passes compute survives the others.
pub fn keep_condition(conditions: &mut Vec<Condition>, previous: &[Condition], type_: &str) {
    if conditions.iter().any(|c| c.type_ == type_) {
        return;
    }
    if let Some(kept) = previous.iter().find(|c| c.type_ == type_) {
        conditions.push(kept.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(seconds).unwrap()
    }

    fn value(status: &'static str, reason: &'static str) -> ConditionValue {
        ConditionValue {
            status,
            reason,
            message: reason.to_owned(),
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let mut first = Vec::new();
        set_condition(&mut first, &[], "X", value("True", "A"), Some(1), at(10));
        assert_eq!(first[0].last_transition_time, Time(at(10)));

        let mut same = first.clone();
        set_condition(&mut same, &first, "X", value("True", "B"), Some(2), at(20));
        assert_eq!(same.len(), 1);
        assert_eq!(same[0].reason, "B");
        assert_eq!(same[0].last_transition_time, Time(at(10)));

        let mut flipped = same.clone();
        set_condition(
            &mut flipped,
            &same,
            "X",
            value("False", "C"),
            Some(2),
            at(30),
        );
        assert_eq!(flipped[0].last_transition_time, Time(at(30)));
    }

    #[test]
    fn a_condition_not_computed_this_pass_is_kept() {
        let mut previous = Vec::new();
        set_condition(&mut previous, &[], "X", value("False", "A"), Some(1), at(1));
        let mut now = Vec::new();
        keep_condition(&mut now, &previous, "X");
        assert_eq!(now, previous);
        keep_condition(&mut now, &previous, "X");
        assert_eq!(now.len(), 1, "not duplicated");
    }
}
