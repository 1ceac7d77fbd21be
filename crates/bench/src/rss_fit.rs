//! The worker memory model of `create`: the peak RSS of every worker of every run against
//! the size of its slice (the objects labelled for its shard), fitted as a line, base +
//! slope × objects. With one shard count, runs of several shard counts or workers of
//! different slice sizes give the points; one slice size alone fits no line.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Bytes in a MiB.
const MIB: f64 = 1024.0 * 1024.0;

/// A fitted line: RSS in bytes = base + slope × objects.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Line {
    /// RSS at an empty slice, bytes.
    pub base_bytes: f64,
    /// Bytes per object of the slice.
    pub slope_bytes_per_object: f64,
}

/// Peak worker RSS per slice size, over the runs of one scenario.
#[derive(Debug, Default)]
pub struct RssFit {
    /// (objects in the slice, peak RSS in bytes), one per worker and run.
    points: Vec<(f64, f64)>,
}

impl RssFit {
    /// Adds the workers of one run: `peak_rss_mib` by process name (`shardop-worker-<i>`),
    /// `shards` the shard label of every object at the end of the run.
    pub fn add_run<'a>(
        &mut self,
        peak_rss_mib: &BTreeMap<String, f64>,
        shards: impl IntoIterator<Item = &'a Option<u32>>,
    ) {
        let mut slices: BTreeMap<u32, usize> = BTreeMap::new();
        for shard in shards.into_iter().flatten() {
            *slices.entry(*shard).or_default() += 1;
        }
        for (name, rss_mib) in peak_rss_mib {
            let Some(shard) = name
                .strip_prefix("shardop-worker-")
                .and_then(|i| i.parse::<u32>().ok())
            else {
                continue;
            };
            let objects = slices.get(&shard).copied().unwrap_or_default();
            self.points.push((objects as f64, rss_mib * MIB));
        }
    }

    /// The least-squares line through the points; `None` with fewer than two distinct
    /// slice sizes.
    pub fn line(&self) -> Option<Line> {
        let n = self.points.len() as f64;
        let mean_x = self.points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = self.points.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = self.points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
        let sxy: f64 = self
            .points
            .iter()
            .map(|p| (p.0 - mean_x) * (p.1 - mean_y))
            .sum();
        // Slice sizes a few objects apart fit nothing but noise.
        if self.points.len() < 2 || sxx < n {
            return None;
        }
        let slope = sxy / sxx;
        Some(Line {
            base_bytes: mean_y - slope * mean_x,
            slope_bytes_per_object: slope,
        })
    }

    /// `rss_base_bytes` and `rss_slope_bytes_per_object` (null without a line) and the
    /// points as `rss_fit_points`: `[objects, peak RSS MiB]`.
    pub fn to_json(&self) -> Value {
        let line = self.line();
        json!({
            "rss_base_bytes": line.map(|l| l.base_bytes.round()),
            "rss_slope_bytes_per_object": line.map(|l| l.slope_bytes_per_object.round()),
            "rss_fit_points": self
                .points
                .iter()
                .map(|(objects, bytes)| json!([objects, (bytes / MIB * 10.0).round() / 10.0]))
                .collect::<Vec<_>>(),
        })
    }

    /// The smoke check: a line, when there is one, is finite (not its value: timing and
    /// load move it).
    pub fn checks(&self) -> Vec<(String, bool)> {
        let finite = self
            .line()
            .is_none_or(|l| l.base_bytes.is_finite() && l.slope_bytes_per_object.is_finite());
        vec![("rss fit finite".into(), finite)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss(workers: &[(u32, f64)]) -> BTreeMap<String, f64> {
        workers
            .iter()
            .map(|(i, mib)| (format!("shardop-worker-{i}"), *mib))
            .collect()
    }

    #[test]
    fn the_line_goes_through_workers_of_different_slices() {
        let mut fit = RssFit::default();
        // 20 MiB + 4 KiB per object: 1,000 objects on one shard, then 3 shards.
        let mib = |objects: f64| (20.0 * MIB + 4096.0 * objects) / MIB;
        fit.add_run(&rss(&[(0, mib(1000.0))]), &vec![Some(0); 1000]);
        let labels: Vec<Option<u32>> = (0..1000)
            .map(|i| {
                Some(if i < 500 {
                    0
                } else if i < 800 {
                    1
                } else {
                    2
                })
            })
            .chain([None])
            .collect();
        fit.add_run(
            &rss(&[(0, mib(500.0)), (1, mib(300.0)), (2, mib(200.0))]),
            &labels,
        );
        let line = fit.line().unwrap();
        assert!((line.slope_bytes_per_object - 4096.0).abs() < 1e-6);
        assert!((line.base_bytes - 20.0 * MIB).abs() < 1e-3);
        assert_eq!(fit.to_json()["rss_slope_bytes_per_object"], 4096.0);
        assert!(fit.checks().iter().all(|(_, holds)| *holds));
    }

    #[test]
    fn one_slice_size_fits_no_line() {
        let mut fit = RssFit::default();
        fit.add_run(&rss(&[(0, 50.0)]), &vec![Some(0); 100]);
        fit.add_run(&rss(&[(0, 52.0)]), &vec![Some(0); 100]);
        assert_eq!(fit.line(), None);
        assert_eq!(fit.to_json()["rss_slope_bytes_per_object"], Value::Null);
        assert!(fit.checks().iter().all(|(_, holds)| *holds));
        assert_eq!(RssFit::default().line(), None);
    }
}
