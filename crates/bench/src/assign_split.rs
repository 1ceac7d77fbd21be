//! Where the watch path's assignment latency goes, object by object: the API server's
//! audit log gives when it answered the create and when the assigner's label write arrived
//! and was answered; the bench's own watch gives when it first showed the object and when
//! it first showed the label. Together they split create response → label seen into the
//! watch delivering the object, the time beyond that until the label write reached the API
//! server (the assigner's own time, its client, the request's way into the server), the
//! label write, and the watch delivering the label — and give the **floor**: the watch's
//! delivery, the write and the watch showing the label with nothing in between, a bound no
//! watch-path assigner can beat on the same control plane, under the same load, for the
//! same objects.

use jiff::Timestamp;
use serde_json::{Value, json};

use crate::audit_tail::LabelTimeline;
use crate::convergence::{SeenAfterCreate, quantile};

/// One object's assignment, split (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectSplit {
    /// The create request in the API server (received → answered).
    pub create_s: f64,
    /// Create answered → the assigner's label write received: the assigner's watch
    /// delivering the object, the assigner's own time, and the request's way in.
    pub pickup_s: f64,
    /// The label write in the API server (received → answered).
    pub write_s: f64,
    /// Create response → the bench's watch first showed the object: a watch's delivery
    /// latency at this moment, with nothing done on receipt.
    pub delivered_s: f64,
    /// Label write answered → the bench's watch showed the label.
    pub observed_s: f64,
    /// `pickup_s − delivered_s` (0 when the assigner's watch was the faster one): the
    /// assigner's own time, its client's, and the label request's way into the API server.
    pub beyond_watch_s: f64,
    /// Create response → label seen (shardop's assignment latency).
    pub total_s: f64,
    /// `total_s − beyond_watch_s`: the same object with its label write received the
    /// moment a watch delivered it.
    pub floor_s: f64,
}

/// Splits one object's assignment; `None` when the audit log lacks its create or the
/// assigner's label write (then it was not assigned on the watch path).
pub fn split(seen: &SeenAfterCreate, timeline: &LabelTimeline) -> Option<ObjectSplit> {
    let (create_received, create_answered) = timeline.create?;
    let (label_received, label_answered) = timeline.label?;
    let create_s = seconds_between(create_received, create_answered);
    let pickup_s = seconds_between(create_answered, label_received);
    let write_s = seconds_between(label_received, label_answered);
    let beyond_watch_s = (pickup_s - seen.delivered_s).max(0.0);
    Some(ObjectSplit {
        create_s,
        pickup_s,
        write_s,
        delivered_s: seen.delivered_s,
        observed_s: (seen.labelled_s - pickup_s - write_s).max(0.0),
        beyond_watch_s,
        total_s: seen.labelled_s,
        floor_s: (seen.labelled_s - beyond_watch_s).max(0.0),
    })
}

/// Reads one part of a split.
type Part = fn(&ObjectSplit) -> f64;

/// p50 and p99 of every part as `<part>_p50_s` / `<part>_p99_s`, and `floor_ratio` =
/// floor p99 ÷ shardop's p99 (1 when the assigner adds nothing a watch does not).
pub fn summary(splits: &[ObjectSplit]) -> Value {
    let parts: [(&str, Part); 7] = [
        ("create_latency", |s| s.create_s),
        ("watch_delivery", |s| s.delivered_s),
        ("assigner_pickup", |s| s.pickup_s),
        ("beyond_watch", |s| s.beyond_watch_s),
        ("label_write", |s| s.write_s),
        ("label_observed", |s| s.observed_s),
        ("floor", |s| s.floor_s),
    ];
    let mut out = serde_json::Map::new();
    for (name, part) in parts {
        let values: Vec<f64> = splits.iter().map(part).collect();
        out.insert(
            format!("{name}_p50_s"),
            json!(round_ms(quantile(&values, 0.50))),
        );
        out.insert(
            format!("{name}_p99_s"),
            json!(round_ms(quantile(&values, 0.99))),
        );
    }
    let totals: Vec<f64> = splits.iter().map(|s| s.total_s).collect();
    let floors: Vec<f64> = splits.iter().map(|s| s.floor_s).collect();
    let total_p99 = quantile(&totals, 0.99);
    let ratio = if total_p99 > 0.0 {
        quantile(&floors, 0.99) / total_p99
    } else {
        1.0
    };
    out.insert(
        "floor_ratio".into(),
        json!((ratio * 1000.0).round() / 1000.0),
    );
    out.insert("split_objects".into(), json!(splits.len()));
    Value::Object(out)
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(1_700_000_000_000 + ms).unwrap()
    }

    fn seen(delivered_s: f64, labelled_s: f64) -> SeenAfterCreate {
        SeenAfterCreate {
            name: "a".into(),
            delivered_s,
            labelled_s,
        }
    }

    fn timeline(create: (i64, i64), label: (i64, i64)) -> LabelTimeline {
        LabelTimeline {
            create: Some((at(create.0), at(create.1))),
            label: Some((at(label.0), at(label.1))),
        }
    }

    #[test]
    fn an_assigner_slower_than_the_watch_shows_the_difference_beyond_the_watch() {
        // Create answered at 10 ms; the bench's watch saw it 20 ms later, the assigner's
        // label write arrived 50 ms later and took 30 ms; the label was seen 100 ms after
        // the create response.
        let split = split(&seen(0.020, 0.100), &timeline((0, 10), (60, 90))).unwrap();
        assert!((split.create_s - 0.010).abs() < 1e-9);
        assert!((split.pickup_s - 0.050).abs() < 1e-9);
        assert!((split.write_s - 0.030).abs() < 1e-9);
        assert!((split.beyond_watch_s - 0.030).abs() < 1e-9);
        assert!((split.observed_s - 0.020).abs() < 1e-9);
        assert!((split.floor_s - 0.070).abs() < 1e-9);
        assert!((split.total_s - 0.100).abs() < 1e-9);
    }

    #[test]
    fn an_assigner_faster_than_the_bench_watch_adds_nothing() {
        let split = split(&seen(0.040, 0.080), &timeline((0, 10), (30, 50))).unwrap();
        assert_eq!(split.beyond_watch_s, 0.0);
        assert_eq!(split.floor_s, split.total_s);
    }

    #[test]
    fn an_object_without_an_audited_label_write_is_not_split() {
        let mut t = timeline((0, 10), (30, 50));
        t.label = None;
        assert_eq!(split(&seen(0.01, 0.05), &t), None);
        t = timeline((0, 10), (30, 50));
        t.create = None;
        assert_eq!(split(&seen(0.01, 0.05), &t), None);
    }

    #[test]
    fn the_summary_has_every_part_and_the_floor_ratio() {
        let splits: Vec<ObjectSplit> = (1..=100)
            .filter_map(|i| {
                let i = i64::from(i);
                split(
                    &seen(0.010, 0.002 * i as f64 + 0.030),
                    &timeline((0, 5), (5 + 10 + i, 5 + 10 + 2 * i)),
                )
            })
            .collect();
        let figures = summary(&splits);
        for part in [
            "create_latency",
            "watch_delivery",
            "assigner_pickup",
            "beyond_watch",
            "label_write",
            "label_observed",
            "floor",
        ] {
            assert!(figures[format!("{part}_p50_s")].is_f64(), "{part}");
            assert!(figures[format!("{part}_p99_s")].is_f64(), "{part}");
        }
        let ratio = figures["floor_ratio"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
        assert_eq!(figures["split_objects"], 100);
        assert_eq!(summary(&[])["floor_ratio"], 1.0);
    }
}
