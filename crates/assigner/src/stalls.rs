//! Objects that make no progress for long, so that none can stay so silently: why an
//! object is without a valid owner and how a pass reports those that stay so for long
//! (the wait itself is kept on each object's record), and which moves have stalled and
//! whose objects are due a re-read. Pure book-keeping; the engine logs, exports and reads.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::objects::ObjectKey;

/// An object without a valid owner this long is reported (once until it is owned).
pub const LONG_UNASSIGNED: Duration = Duration::from_secs(60);
/// How many of the objects that just passed [`LONG_UNASSIGNED`] a warning names.
pub const LONG_UNASSIGNED_EXAMPLES: usize = 5;
/// A move without its next step this long has its object re-read, and again after as
/// long, so a record that fell behind its object cannot hold the move forever.
pub const STALLED_MOVE: Duration = Duration::from_secs(60);

/// Why a pass leaves an object without a valid owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unassigned {
    /// A label write for it is in flight.
    WriteInFlight,
    /// Its last write failed or conflicted: it waits out its hold.
    Held,
    /// Its destination has no live Lease (or no shard was ever acquired): it waits for a
    /// worker, however long that takes.
    NoLiveDestination,
    /// A label write is planned; it starts once the write bound lets it.
    WritePlanned,
}

impl Unassigned {
    /// A short description for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WriteInFlight => "label write in flight",
            Self::Held => "waiting after a failed or conflicted write",
            Self::NoLiveDestination => "no live destination shard",
            Self::WritePlanned => "label write planned",
        }
    }
}

/// An object that has just been without a valid owner for [`LONG_UNASSIGNED`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongUnassigned {
    pub key: ObjectKey,
    pub why: Unassigned,
    pub waited: Duration,
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
    /// due a re-read now (stalled, no write in flight, not re-read for [`STALLED_MOVE`]):
    /// at most `limit` of them, those never or least recently re-read first, then the
    /// oldest moves; they are counted as re-read from `now`.
    pub fn due(
        &mut self,
        moves: &HashMap<ObjectKey, Instant>,
        in_flight: impl Fn(&ObjectKey) -> bool,
        now: Instant,
        limit: usize,
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
            let last = self.last.get(key);
            if !in_flight(key) && last.is_none_or(stalled) {
                due.push((last.copied(), *started, key));
            }
        }
        due.sort_unstable();
        let due: Vec<ObjectKey> = due
            .into_iter()
            .take(limit)
            .map(|(_, _, key)| key.clone())
            .collect();
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
        assert_eq!(rereads.due(&moves, busy, young, usize::MAX), (0, vec![]));
        let stalled = start + STALLED_MOVE;
        assert_eq!(
            rereads.due(&moves, busy, stalled, usize::MAX),
            (2, vec![key("old")])
        );
        assert_eq!(
            rereads.due(&moves, busy, stalled, usize::MAX),
            (2, vec![]),
            "just re-read"
        );
        let again = stalled + STALLED_MOVE;
        assert_eq!(
            rereads.due(&moves, busy, again, usize::MAX),
            (2, vec![key("old")])
        );
        // A finished move is forgotten.
        assert_eq!(
            rereads.due(&HashMap::new(), busy, again, usize::MAX),
            (0, vec![])
        );
        assert!(rereads.last.is_empty());
    }

    #[test]
    fn rereads_beyond_the_limit_wait_for_a_later_pass_oldest_first() {
        let mut rereads = Rereads::default();
        let start = Instant::now();
        let moves: HashMap<ObjectKey, Instant> = (0..5_u64)
            .map(|i| (key(&format!("m-{i}")), start + Duration::from_secs(i)))
            .collect();
        let idle = |_: &ObjectKey| false;
        let now = start + STALLED_MOVE + Duration::from_secs(10);
        let (stalled, first) = rereads.due(&moves, idle, now, 2);
        assert_eq!((stalled, first), (5, vec![key("m-0"), key("m-1")]));
        let (_, next) = rereads.due(&moves, idle, now, 2);
        assert_eq!(
            next,
            [key("m-2"), key("m-3")],
            "the ones left out come next"
        );
    }
}
