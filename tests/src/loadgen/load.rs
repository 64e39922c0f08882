//! Closed-loop load: `concurrency` tasks, each sending the next request as soon as the previous
//! response body has been read in full, for a warm-up and then a measured window.
//!
//! All tasks share one `reqwest::Client` whose HTTP/1.1 keep-alive pool holds one connection per
//! task, so after the warm-up no connection is opened inside the window. A request belongs to
//! the window when it *completes* inside it; throughput is completions per second of window.
//! Requests still in flight at the end are finished (so the servers see complete requests) but
//! not measured. Latencies are kept, one `u64` of microseconds each, so percentiles are exact:
//! at the rates a 2-core machine reaches that is a few MB per run, and it avoids a histogram
//! crate and its bucketing error.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// One load run's fixed inputs.
pub struct LoadSpec {
    /// Full URL of `POST /v1/messages`.
    pub url: String,
    pub api_key: String,
    pub stream: bool,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// The Anthropic Messages request every run sends, whichever driver sends it; `mock` tells the
/// mock upstream what usage to report.
pub(crate) fn request_body(stream: bool) -> Bytes {
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": "Hello"}],
        "mock": {"input_tokens": 100, "output_tokens": 20},
    });
    Bytes::from(body.to_string())
}

/// A started run: its tasks and the measured window `[start, end)`.
pub struct RunningLoad {
    tasks: JoinSet<Tally>,
    pub start: Instant,
    pub end: Instant,
}

/// What one run measured, by either driver.
pub struct LoadResult {
    /// 2xx responses completed in the window.
    pub ok: u64,
    /// Latency percentiles of those responses in microseconds; `None` without any.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// Non-2xx responses, transport failures and truncated streams in the window.
    pub errors: u64,
    /// The same over the whole run, warm-up and tail included.
    pub errors_total: u64,
    /// The first error seen anywhere in the run, for the report.
    pub first_error: Option<String>,
    /// Responses of any status received over the whole run, warm-up and tail included: what the
    /// server answered, for the conservation check.
    pub responses: u64,
    pub window: Duration,
}

impl LoadResult {
    pub fn requests_per_sec(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    pub fn p50_ms(&self) -> Option<f64> {
        self.p50_us.map(ms)
    }

    pub fn p99_ms(&self) -> Option<f64> {
        self.p99_us.map(ms)
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `q` of all
/// samples at or below it.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    let n = sorted.len();
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n.max(1));
    sorted.get(rank - 1).copied()
}

/// Starts the tasks; the window opens `spec.warmup` from now.
pub fn start(spec: &LoadSpec) -> anyhow::Result<RunningLoad> {
    let request = Arc::new(Request::new(spec)?);
    let start = Instant::now() + spec.warmup;
    let end = start + spec.duration;
    let mut tasks = JoinSet::new();
    for _ in 0..spec.concurrency {
        tasks.spawn(worker(Arc::clone(&request), start, end));
    }
    Ok(RunningLoad { tasks, start, end })
}

/// Sends the request of `spec` once and fails unless it gets a complete 2xx answer.
pub async fn once(spec: &LoadSpec) -> anyhow::Result<()> {
    match send(&Request::new(spec)?).await {
        Outcome::Ok => Ok(()),
        Outcome::Failed(error) | Outcome::Transport(error) => {
            anyhow::bail!("POST {}: {error}", spec.url)
        }
    }
}

impl RunningLoad {
    /// Waits for every task to finish its last request and merges their tallies.
    pub async fn finish(mut self) -> anyhow::Result<LoadResult> {
        let mut latencies_us = Vec::new();
        let mut result = LoadResult {
            ok: 0,
            p50_us: None,
            p99_us: None,
            errors: 0,
            errors_total: 0,
            first_error: None,
            responses: 0,
            window: self.end - self.start,
        };
        while let Some(tally) = self.tasks.join_next().await {
            let tally = tally.context("a load task panicked")?;
            latencies_us.extend(tally.latencies_us);
            result.errors += tally.errors;
            result.errors_total += tally.errors_total;
            result.responses += tally.responses;
            result.first_error = result.first_error.or(tally.first_error);
        }
        latencies_us.sort_unstable();
        result.ok = latencies_us.len() as u64;
        result.p50_us = percentile(&latencies_us, 0.50);
        result.p99_us = percentile(&latencies_us, 0.99);
        Ok(result)
    }
}

/// A request ready to send again and again over one keep-alive pool (of `spec.concurrency`
/// idle connections).
pub struct Request {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    body: Bytes,
    stream: bool,
}

impl Request {
    pub fn new(spec: &LoadSpec) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .http1_only()
            .pool_max_idle_per_host(spec.concurrency)
            .tcp_nodelay(true)
            // Bounds a run even if a server stops answering.
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-api-key",
            HeaderValue::from_str(&spec.api_key).context("the API key is not a header value")?,
        );
        headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(Self {
            client,
            url: spec.url.clone(),
            headers,
            body: request_body(spec.stream),
            stream: spec.stream,
        })
    }
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    errors_total: u64,
    first_error: Option<String>,
    responses: u64,
}

impl Tally {
    fn count_error(&mut self, measured: bool, error: String) {
        self.errors += u64::from(measured);
        self.errors_total += 1;
        self.first_error.get_or_insert(error);
    }
}

pub enum Outcome {
    Ok,
    /// The server answered, but not with a complete 2xx response.
    Failed(String),
    /// No response at all (connect, reset, timeout).
    Transport(String),
}

async fn worker(request: Arc<Request>, start: Instant, end: Instant) -> Tally {
    let mut tally = Tally::default();
    loop {
        let sent = Instant::now();
        if sent >= end {
            return tally;
        }
        let outcome = send(&request).await;
        let done = Instant::now();
        let measured = done >= start && done < end;
        match outcome {
            Outcome::Ok => {
                tally.responses += 1;
                if measured {
                    let us = u64::try_from((done - sent).as_micros()).unwrap_or(u64::MAX);
                    tally.latencies_us.push(us);
                }
            }
            Outcome::Failed(error) => {
                tally.responses += 1;
                tally.count_error(measured, error);
            }
            Outcome::Transport(error) => {
                tally.count_error(measured, error);
                // A refused connection fails in microseconds; without a pause the loop would
                // spin and starve the servers of the CPU they share with us.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Sends one request and reads the whole body (for a stream, every SSE event up to the end).
pub async fn send(request: &Request) -> Outcome {
    let response = match request
        .client
        .post(&request.url)
        .headers(request.headers.clone())
        .body(request.body.clone())
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => return Outcome::Transport(format!("{e:#}")),
    };
    let status = response.status();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => return Outcome::Failed(format!("{status}: body read failed: {e:#}")),
    };
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        return Outcome::Failed(format!(
            "{status}: {}",
            text.chars().take(300).collect::<String>()
        ));
    }
    // A relay that cut a stream short would still have sent 200 first; the last event of a
    // complete Anthropic stream is `message_stop`.
    if request.stream && !contains(&body, b"message_stop") {
        return Outcome::Failed(format!("{status}: stream ended without message_stop"));
    }
    Outcome::Ok
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[track_caller]
    fn check(sorted: &[u64], q: f64, want: Option<u64>) {
        assert_eq!(percentile(sorted, q), want);
    }

    #[test]
    fn p50_of_three_samples_is_the_middle_one() {
        check(&[1, 3, 5], 0.5, Some(3));
    }

    #[test]
    fn p99_of_a_hundred_samples_is_the_99th() {
        let samples: Vec<u64> = (1..=100).collect();
        check(&samples, 0.99, Some(99));
        check(&samples, 1.0, Some(100));
    }

    #[test]
    fn no_samples_have_no_percentile() {
        check(&[], 0.5, None);
    }
}
