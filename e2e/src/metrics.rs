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

/// The sum of every sample of `metric` whose label set contains all of `labels`.
pub fn metric_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, ""));
            (name == metric
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
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
}
