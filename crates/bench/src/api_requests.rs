//! Where the API server's time goes, by verb and resource: the counts and summed durations
//! of its `apiserver_request_duration_seconds` histogram, read before and after a load phase.
//!
//! The resource tells who caused the work: pods, controller revisions and events are written
//! only by the controller manager; DatabaseClusters, StatefulSet applies (`APPLY`) and Shards
//! only by shardop and the load generator. That is what separates "our writes are expensive"
//! from "the control plane is busy rolling out what we asked for".

use std::collections::BTreeMap;

use kube::Client;
use serde_json::{Value, json};
use shardop_e2e::metrics::samples;

const SUM: &str = "apiserver_request_duration_seconds_sum";
const COUNT: &str = "apiserver_request_duration_seconds_count";

/// One kind of request: verb and resource (`resource/subresource` for subresources).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestKind {
    pub verb: String,
    pub resource: String,
}

/// Requests served and seconds spent serving them, per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Served {
    pub requests: f64,
    pub seconds: f64,
}

/// A reading of the API server's request counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestTimes(BTreeMap<RequestKind, Served>);

impl RequestTimes {
    /// Reads the API server's `/metrics` (the bench's client is a cluster admin).
    pub async fn read(client: &Client) -> anyhow::Result<Self> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        Ok(Self::parse(&client.request_text(request).await?))
    }

    /// Parses the exposition text. Watches and other long-running requests are left out:
    /// their duration is how long a client stayed connected, not work.
    pub fn parse(text: &str) -> Self {
        let mut times = BTreeMap::<RequestKind, Served>::new();
        for sample in samples(text).filter(|s| s.name == SUM || s.name == COUNT) {
            let label = |key: &str| sample.label(key).unwrap_or_default();
            let verb = label("verb");
            if matches!(verb.as_str(), "WATCH" | "WATCHLIST" | "CONNECT" | "") {
                continue;
            }
            let resource = match label("subresource").as_str() {
                "" => label("resource"),
                sub => format!("{}/{sub}", label("resource")),
            };
            let served = times.entry(RequestKind { verb, resource }).or_default();
            if sample.name == SUM {
                served.seconds += sample.value;
            } else {
                served.requests += sample.value;
            }
        }
        Self(times)
    }

    /// What was served between `before` and this reading.
    pub fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(kind, now)| {
                    let then = before.0.get(kind).copied().unwrap_or_default();
                    let served = Served {
                        requests: (now.requests - then.requests).max(0.0),
                        seconds: (now.seconds - then.seconds).max(0.0),
                    };
                    (kind.clone(), served)
                })
                .filter(|(_, served)| served.requests > 0.0)
                .collect(),
        )
    }

    /// The `n` kinds with the most request time, with their share of all request time, as
    /// the JSON the reports carry.
    pub fn top(&self, n: usize) -> Value {
        let total: f64 = self.0.values().map(|s| s.seconds).sum();
        let mut kinds: Vec<_> = self.0.iter().collect();
        kinds.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        let top: Vec<Value> = kinds
            .into_iter()
            .take(n)
            .map(|(kind, served)| {
                json!({
                    "verb": kind.verb,
                    "resource": kind.resource,
                    "requests": served.requests.round(),
                    "seconds": round3(served.seconds),
                    "share": if total > 0.0 { round3(served.seconds / total) } else { 0.0 },
                })
            })
            .collect();
        json!({ "total_seconds": round3(total), "top": top })
    }

    /// Requests and API server seconds per object of a phase that handled `objects`
    /// objects: in total, and per kind for the 12 kinds with the most requests.
    pub fn per_object(&self, objects: usize) -> Value {
        let objects = objects.max(1) as f64;
        let requests: f64 = self.0.values().map(|s| s.requests).sum();
        let seconds: f64 = self.0.values().map(|s| s.seconds).sum();
        let mut kinds: Vec<_> = self.0.iter().collect();
        kinds.sort_by(|a, b| b.1.requests.total_cmp(&a.1.requests));
        let by_kind: serde_json::Map<String, Value> = kinds
            .into_iter()
            .take(12)
            .map(|(kind, served)| {
                (
                    format!("{} {}", kind.verb, kind.resource),
                    json!(round3(served.requests / objects)),
                )
            })
            .collect();
        json!({
            "requests": round3(requests / objects),
            "api_server_seconds": round3(seconds / objects),
            "by_kind": by_kind,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP apiserver_request_duration_seconds ...\n\
        apiserver_request_duration_seconds_bucket{component=\"apiserver\",dry_run=\"\",group=\"apps\",resource=\"statefulsets\",scope=\"resource\",subresource=\"\",verb=\"APPLY\",version=\"v1\",le=\"0.1\"} 3\n\
        apiserver_request_duration_seconds_sum{component=\"apiserver\",dry_run=\"\",group=\"apps\",resource=\"statefulsets\",scope=\"resource\",subresource=\"\",verb=\"APPLY\",version=\"v1\"} 0.5\n\
        apiserver_request_duration_seconds_count{component=\"apiserver\",dry_run=\"\",group=\"apps\",resource=\"statefulsets\",scope=\"resource\",subresource=\"\",verb=\"APPLY\",version=\"v1\"} 5\n\
        apiserver_request_duration_seconds_sum{component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"pods\",scope=\"watch\",subresource=\"\",verb=\"WATCH\",version=\"v1\"} 9000\n\
        apiserver_request_duration_seconds_count{component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"pods\",scope=\"watch\",subresource=\"\",verb=\"WATCH\",version=\"v1\"} 10\n";

    const AFTER: &str = "apiserver_request_duration_seconds_sum{component=\"apiserver\",dry_run=\"\",group=\"apps\",resource=\"statefulsets\",scope=\"resource\",subresource=\"\",verb=\"APPLY\",version=\"v1\"} 2.5\n\
        apiserver_request_duration_seconds_count{component=\"apiserver\",dry_run=\"\",group=\"apps\",resource=\"statefulsets\",scope=\"resource\",subresource=\"\",verb=\"APPLY\",version=\"v1\"} 25\n\
        apiserver_request_duration_seconds_sum{component=\"apiserver\",dry_run=\"\",group=\"apps\",resource=\"statefulsets\",scope=\"resource\",subresource=\"status\",verb=\"PUT\",version=\"v1\"} 1\n\
        apiserver_request_duration_seconds_count{component=\"apiserver\",dry_run=\"\",group=\"apps\",resource=\"statefulsets\",scope=\"resource\",subresource=\"status\",verb=\"PUT\",version=\"v1\"} 40\n\
        apiserver_request_duration_seconds_sum{component=\"apiserver\",dry_run=\"All\",group=\"\",resource=\"pods\",scope=\"resource\",subresource=\"\",verb=\"POST\",version=\"v1\"} 6\n\
        apiserver_request_duration_seconds_count{component=\"apiserver\",dry_run=\"All\",group=\"\",resource=\"pods\",scope=\"resource\",subresource=\"\",verb=\"POST\",version=\"v1\"} 30\n\
        apiserver_request_duration_seconds_sum{component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"pods\",scope=\"watch\",subresource=\"\",verb=\"WATCH\",version=\"v1\"} 99000\n";

    fn kind(verb: &str, resource: &str) -> RequestKind {
        RequestKind {
            verb: verb.into(),
            resource: resource.into(),
        }
    }

    #[test]
    fn deltas_by_verb_and_resource_without_watches() {
        let delta = RequestTimes::parse(AFTER).since(&RequestTimes::parse(BEFORE));
        assert_eq!(
            delta.0.get(&kind("APPLY", "statefulsets")),
            Some(&Served {
                requests: 20.0,
                seconds: 2.0
            })
        );
        assert_eq!(
            delta.0.get(&kind("PUT", "statefulsets/status")),
            Some(&Served {
                requests: 40.0,
                seconds: 1.0
            })
        );
        assert!(delta.0.keys().all(|k| k.verb != "WATCH"));
        assert_eq!(delta.0.len(), 3);
    }

    #[test]
    fn top_orders_by_time_with_shares() {
        let delta = RequestTimes::parse(AFTER).since(&RequestTimes::parse(BEFORE));
        let top = delta.top(2);
        assert_eq!(top["total_seconds"], 9.0);
        assert_eq!(top["top"][0]["resource"], "pods");
        assert_eq!(top["top"][0]["share"], 0.667);
        assert_eq!(top["top"][1]["verb"], "APPLY");
        assert_eq!(top["top"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn per_object_divides_every_kind_by_the_objects() {
        let delta = RequestTimes::parse(AFTER).since(&RequestTimes::parse(BEFORE));
        let per_object = delta.per_object(10);
        assert_eq!(per_object["requests"], 9.0);
        assert_eq!(per_object["api_server_seconds"], 0.9);
        assert_eq!(per_object["by_kind"]["PUT statefulsets/status"], 4.0);
        assert_eq!(per_object["by_kind"]["APPLY statefulsets"], 2.0);
        assert_eq!(per_object["by_kind"]["POST pods"], 3.0);
    }
}
