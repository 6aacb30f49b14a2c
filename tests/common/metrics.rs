//! The server's Prometheus scrape, read in tests. Metrics are process-wide, so a test that
//! reads a counter no rule labels must read how much it moved, with nothing else moving it.

use std::time::Duration;

use super::TestServer;

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

pub fn base(server: &TestServer) -> String {
    format!("http://{}", server.running.as_ref().unwrap().http_addr)
}

/// One sample of a scrape: name, sorted labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Every sample of the scrape.
pub async fn scrape(server: &TestServer) -> Vec<Sample> {
    scrape_at(&base(server)).await
}

/// Every sample of the scrape served at `base` (`http://host:port`).
/// The body of `GET url`, as text.
pub async fn text_of(url: &str) -> String {
    http().get(url).send().await.unwrap().text().await.unwrap()
}

pub async fn scrape_at(base: &str) -> Vec<Sample> {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            };
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            (s.metric, labels, value)
        })
        .collect()
}

pub fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

/// The value of an unlabelled counter, as a whole number.
pub async fn counted(server: &TestServer, name: &str) -> u64 {
    sample(&scrape(server).await, name, &[]) as u64
}
