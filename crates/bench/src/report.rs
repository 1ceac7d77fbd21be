//! A scenario's result: one JSON object written to `target/bench/<scenario>.json` and
//! printed as the last line on stdout, so scripts can `tail -n1` it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use serde_json::{Map, Value};

/// The figures of one scenario run, in insertion order.
#[derive(Debug, Clone)]
pub struct Report {
    scenario: String,
    fields: Map<String, Value>,
}

impl Report {
    /// A report with the fields every scenario carries.
    pub fn new(scenario: &str, objects: usize, shards: &[u32]) -> Self {
        let mut fields = Map::new();
        fields.insert("scenario".into(), scenario.into());
        fields.insert("objects".into(), objects.into());
        let shards: Value = match shards {
            [one] => (*one).into(),
            many => many.to_vec().into(),
        };
        fields.insert("shards".into(), shards);
        fields.insert("machine".into(), machine().into());
        Self {
            scenario: scenario.to_owned(),
            fields,
        }
    }

    /// Sets a field (numbers are rounded to 3 decimals for readability).
    pub fn set(&mut self, key: &str, value: impl Serialize) -> &mut Self {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.fields.insert(key.to_owned(), round(value));
        self
    }

    /// Reads a field back.
    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// A human summary: the scalar fields, one `key = value` per line.
    pub fn summary(&self) -> String {
        let mut out = format!("== {} ==", self.scenario);
        for (key, value) in &self.fields {
            match value {
                Value::Number(_) | Value::Bool(_) | Value::String(_) => {
                    out.push_str(&format!("\n  {key:<24} {value}"));
                }
                Value::Object(map) if key == "checks" => {
                    for (check, ok) in map {
                        out.push_str(&format!("\n  check {check:<18} {ok}"));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Writes `<dir>/<scenario>.json` and prints the JSON as one line.
    pub fn finish(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.scenario));
        let json = Value::Object(self.fields.clone());
        std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
        println!("{json}");
        Ok(path)
    }
}

fn round(value: Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => n
            .as_f64()
            .and_then(|f| serde_json::Number::from_f64((f * 1000.0).round() / 1000.0))
            .map_or(Value::Null, Value::Number),
        Value::Array(items) => Value::Array(items.into_iter().map(round).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, round(v))).collect()),
        other => other,
    }
}

/// A one-line description of the machine the figures were taken on.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cores} cores, {memory_gib:.0} GiB, {cpu}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_floats_and_keeps_order() {
        let mut report = Report::new("raw", 10, &[1, 2]);
        report.set("creates_per_s", 123.456_789).set("writes", 0);
        assert_eq!(
            report.get("creates_per_s"),
            Some(&serde_json::json!(123.457))
        );
        assert_eq!(report.get("shards"), Some(&serde_json::json!([1, 2])));
        let keys: Vec<&String> = report.fields.keys().collect();
        assert_eq!(keys[..3], ["scenario", "objects", "shards"]);
    }
}
