//! Objects that make no progress for long, so that none can stay so silently: how long
//! each object has been without a valid owner, and which moves have stalled and whose
//! objects are due a re-read. Pure book-keeping; the engine logs, exports and reads.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::objects::ObjectKey;
use crate::planning::Unassigned;

/// An object without a valid owner this long is reported (once until it is owned).
pub const LONG_UNASSIGNED: Duration = Duration::from_secs(60);
/// A move without its next step this long has its object re-read, and again after as
/// long, so a record that fell behind its object cannot hold the move forever.
pub const STALLED_MOVE: Duration = Duration::from_secs(60);

/// An object that has just been without a valid owner for [`LONG_UNASSIGNED`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongUnassigned {
    pub key: ObjectKey,
    pub why: Unassigned,
    pub waited: Duration,
}

/// Since when each object has been without a valid owner.
#[derive(Default)]
pub struct UnassignedClock {
    /// The start, and whether it was reported already.
    since: HashMap<ObjectKey, (Instant, bool)>,
}

impl UnassignedClock {
    /// Takes in one pass's objects without a valid owner (the others are forgotten).
    /// Returns how long the oldest has waited, and those that just passed
    /// [`LONG_UNASSIGNED`].
    pub fn observe(
        &mut self,
        unassigned: &[(ObjectKey, Unassigned)],
        now: Instant,
    ) -> (Duration, Vec<LongUnassigned>) {
        let mut since = HashMap::with_capacity(unassigned.len());
        let mut oldest = Duration::ZERO;
        let mut long = Vec::new();
        for (key, why) in unassigned {
            let (start, mut reported) = self.since.remove(key).unwrap_or((now, false));
            let waited = now.saturating_duration_since(start);
            oldest = oldest.max(waited);
            if waited >= LONG_UNASSIGNED && !reported {
                reported = true;
                long.push(LongUnassigned {
                    key: key.clone(),
                    why: *why,
                    waited,
                });
            }
            since.insert(key.clone(), (start, reported));
        }
        self.since = since;
        (oldest, long)
    }
}

/// When each stalled move's object was last re-read.
#[derive(Default)]
pub struct Rereads {
    last: HashMap<ObjectKey, Instant>,
}

impl Rereads {
    /// Of `moves` (object → start of its move), how many have stalled, and the objects
    /// due a re-read now (stalled, no write in flight, not re-read for [`STALLED_MOVE`]),
    /// which are counted as re-read from `now`.
    pub fn due(
        &mut self,
        moves: &HashMap<ObjectKey, Instant>,
        in_flight: impl Fn(&ObjectKey) -> bool,
        now: Instant,
    ) -> (usize, Vec<ObjectKey>) {
        self.last.retain(|key, _| moves.contains_key(key));
        let stalled = |since: &Instant| now.saturating_duration_since(*since) >= STALLED_MOVE;
        let mut count = 0;
        let mut due = Vec::new();
        for (key, started) in moves {
            if !stalled(started) {
                continue;
            }
            count += 1;
            if !in_flight(key) && self.last.get(key).is_none_or(stalled) {
                due.push(key.clone());
            }
        }
        for key in &due {
            self.last.insert(key.clone(), now);
        }
        (count, due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            kind: 0,
            namespace: "".into(),
            name: name.into(),
        }
    }

    #[test]
    fn an_object_unassigned_for_long_is_reported_once_until_it_is_owned() {
        let mut clock = UnassignedClock::default();
        let start = Instant::now();
        let x = [(key("x"), Unassigned::NoLiveDestination)];
        assert_eq!(clock.observe(&x, start), (Duration::ZERO, vec![]));
        let later = start + LONG_UNASSIGNED;
        let (oldest, long) = clock.observe(&x, later);
        assert_eq!(oldest, LONG_UNASSIGNED);
        assert_eq!(
            long,
            vec![LongUnassigned {
                key: key("x"),
                why: Unassigned::NoLiveDestination,
                waited: LONG_UNASSIGNED,
            }]
        );
        let (oldest, long) = clock.observe(&x, later + Duration::from_secs(1));
        assert_eq!(oldest, LONG_UNASSIGNED + Duration::from_secs(1));
        assert!(long.is_empty(), "reported already");
        // Owned, then unassigned again: a new episode.
        assert_eq!(clock.observe(&[], later), (Duration::ZERO, vec![]));
        assert_eq!(clock.observe(&x, later).0, Duration::ZERO);
    }

    #[test]
    fn a_stalled_move_is_reread_once_per_period_unless_a_write_is_in_flight() {
        let mut rereads = Rereads::default();
        let start = Instant::now();
        let moves = HashMap::from([(key("old"), start), (key("busy"), start)]);
        let busy = |k: &ObjectKey| *k.name == *"busy";
        let young = start + STALLED_MOVE - Duration::from_secs(1);
        assert_eq!(rereads.due(&moves, busy, young), (0, vec![]));
        let stalled = start + STALLED_MOVE;
        assert_eq!(rereads.due(&moves, busy, stalled), (2, vec![key("old")]));
        assert_eq!(
            rereads.due(&moves, busy, stalled),
            (2, vec![]),
            "just re-read"
        );
        let again = stalled + STALLED_MOVE;
        assert_eq!(rereads.due(&moves, busy, again), (2, vec![key("old")]));
        // A finished move is forgotten.
        assert_eq!(rereads.due(&HashMap::new(), busy, again), (0, vec![]));
        assert!(rereads.last.is_empty());
    }
}
