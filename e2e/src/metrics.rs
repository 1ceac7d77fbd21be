//! Reading the binaries' HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw HTTP/1.1 GET; returns the whole response, status line and headers included.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: shardop\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// The `/metrics` page of a process (the body); an error unless it answered 200 within 5 s.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let response = tokio::time::timeout(Duration::from_secs(5), http_get(addr, "/metrics"))
        .await
        .context("scrape timed out")??;
    if !response.starts_with("HTTP/1.1 200") {
        bail!("scrape failed: {response}");
    }
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .context("malformed HTTP response")
}

/// One sample line of the Prometheus text format: `name{labels} value`.
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// The label set without its braces, e.g. `shard="0",result="success"`.
    pub labels: &'a str,
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `key`, if the sample has it (escapes resolved).
    pub fn label(&self, key: &str) -> Option<String> {
        let mut rest = self.labels;
        while let Some((name, after)) = rest.split_once("=\"") {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, escaped)| escaped)),
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if name.trim_start_matches(',').trim() == key {
                return Some(value);
            }
            rest = &after[end..];
        }
        None
    }
}

/// The sample lines of a `/metrics` page (comments and malformed lines skipped).
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            Some(Sample {
                name,
                labels: labels.strip_suffix('}').unwrap_or(labels),
                value: value.parse().ok()?,
            })
        })
}

/// The sum of every sample of `metric` whose label set contains all of `labels`.
pub fn metric_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .filter(|sample| {
            sample.name == metric
                && labels
                    .iter()
                    .all(|(k, v)| sample.label(k).is_some_and(|value| value == *v))
        })
        .map(|sample| sample.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_series_with_all_the_labels() {
        let text = "# TYPE shardop_queue_depth gauge\n\
                    shardop_queue_depth{shard=\"0\"} 3\n\
                    shardop_queue_depth{shard=\"1\"} 4\n\
                    shardop_queue_depth_other 100\n\
                    shardop_reconcile_duration_seconds_count{shard=\"0\",result=\"success\"} 7\n\
                    shardop_reconcile_duration_seconds_count{shard=\"1\",result=\"error\"} 2\n";
        assert_eq!(metric_value(text, "shardop_queue_depth", &[]), 7.0);
        assert_eq!(
            metric_value(text, "shardop_queue_depth", &[("shard", "1")]),
            4.0
        );
        let runs = "shardop_reconcile_duration_seconds_count";
        assert_eq!(metric_value(text, runs, &[("result", "success")]), 7.0);
        assert_eq!(
            metric_value(text, runs, &[("shard", "1"), ("result", "success")]),
            0.0
        );
    }

    #[test]
    fn labels_with_commas_and_escapes() {
        let text = "m{a=\"x,y\",b=\"say \\\"hi\\\"\",c=\"\"} 1\n";
        let sample = samples(text).next().unwrap();
        assert_eq!(sample.label("a").as_deref(), Some("x,y"));
        assert_eq!(sample.label("b").as_deref(), Some("say \"hi\""));
        assert_eq!(sample.label("c").as_deref(), Some(""));
        assert_eq!(sample.label("d"), None);
    }
}
