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
/// How many of the objects that just passed [`LONG_UNASSIGNED`] a warning names.
pub const LONG_UNASSIGNED_EXAMPLES: usize = 5;
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
    since: HashMap<ObjectKey, Waiting>,
    /// Counts the passes, so that entries not seen in the latest one can be dropped.
    pass: u64,
}

/// One object's wait: when it started, whether it was reported, the last pass it was seen.
struct Waiting {
    start: Instant,
    reported: bool,
    seen_in_pass: u64,
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
        // Updated in place: a pass over a backlog of 100,000 objects copies no key but
        // those of objects that just lost their owner.
        self.pass += 1;
        let pass = self.pass;
        let mut oldest = Duration::ZERO;
        let mut long = Vec::new();
        for (key, why) in unassigned {
            if !self.since.contains_key(key) {
                let waiting = Waiting {
                    start: now,
                    reported: false,
                    seen_in_pass: pass,
                };
                self.since.insert(key.clone(), waiting);
            }
            let Some(waiting) = self.since.get_mut(key) else {
                continue;
            };
            waiting.seen_in_pass = pass;
            let waited = now.saturating_duration_since(waiting.start);
            oldest = oldest.max(waited);
            if waited >= LONG_UNASSIGNED && !waiting.reported {
                waiting.reported = true;
                long.push(LongUnassigned {
                    key: key.clone(),
                    why: *why,
                    waited,
                });
            }
        }
        self.since.retain(|_, waiting| waiting.seen_in_pass == pass);
        (oldest, long)
    }
}

/// Logs the objects that just passed [`LONG_UNASSIGNED`]: one warning per pass with their
/// count, the count per reason and a few of their names, and each object at debug level.
/// A warning per object would write one line for every object of a backlog at once (an
/// assigner started beside 100,000 unlabelled objects logged 98,896 lines in one pass).
pub fn log_long_unassigned(long: &[LongUnassigned]) {
    let Some(oldest) = long.iter().map(|l| l.waited).max() else {
        return;
    };
    let mut per_reason: Vec<(&'static str, usize)> = Vec::new();
    for LongUnassigned { key, why, waited } in long {
        tracing::debug!(object = %key, waited_s = waited.as_secs(), reason = why.as_str(), "object without a shard label for long");
        match per_reason
            .iter_mut()
            .find(|(reason, _)| *reason == why.as_str())
        {
            Some((_, count)) => *count += 1,
            None => per_reason.push((why.as_str(), 1)),
        }
    }
    let reasons = per_reason
        .iter()
        .map(|(reason, count)| format!("{reason}: {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    let examples = long
        .iter()
        .take(LONG_UNASSIGNED_EXAMPLES)
        .map(|l| l.key.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    tracing::warn!(
        objects = long.len(),
        waited_s = oldest.as_secs(),
        reasons = %reasons,
        examples = %examples,
        "objects without a shard label for long"
    );
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

    /// Counts the warnings logged while it is the default subscriber.
    #[derive(Clone, Default)]
    struct WarningCount(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarningCount {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn a_backlog_of_long_unassigned_objects_is_one_warning_not_one_per_object() {
        use tracing_subscriber::layer::SubscriberExt;
        let long: Vec<LongUnassigned> = (0..10_000)
            .map(|i| LongUnassigned {
                key: key(&format!("tenant-{i}")),
                why: if i % 2 == 0 {
                    Unassigned::WritePlanned
                } else {
                    Unassigned::NoLiveDestination
                },
                waited: LONG_UNASSIGNED,
            })
            .collect();
        let warnings = WarningCount::default();
        let subscriber = tracing_subscriber::registry().with(warnings.clone());
        tracing::subscriber::with_default(subscriber, || {
            log_long_unassigned(&long);
            log_long_unassigned(&[]);
        });
        assert_eq!(warnings.0.load(std::sync::atomic::Ordering::Relaxed), 1);
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
