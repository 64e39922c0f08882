//! The streaming-capacity run: `streams` concurrent long SSE streams, each of `events` events
//! spaced `interval` apart by the mock (its `chunk_delay_ms`), opened over `ramp`, through one
//! target process. It measures what holding streams open costs rather than how fast requests
//! go: the target's RSS while every stream is open, minus its RSS before, per stream; and its
//! CPU time over the whole run per relayed event.
//!
//! Every stream runs on its own connection (HTTP/1.1 cannot share one between open responses).
//! Events are counted by their blank-line terminators, which both providers' formats end every
//! event with; a stream counts as complete when it delivered every event the mock scripted and
//! its last one was `message_stop`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::probes;

/// The shape of one streaming-capacity run.
#[derive(Clone, Copy, Debug)]
pub struct StreamSpec {
    pub streams: usize,
    /// Events per stream, at least [`FIXED_EVENTS`] + 1.
    pub events: usize,
    pub interval: Duration,
    pub ramp: Duration,
}

/// Events of an Anthropic stream besides its text deltas: `message_start`,
/// `content_block_start`, `ping`, `content_block_stop`, `message_delta`, `message_stop`.
pub const FIXED_EVENTS: usize = 6;

impl StreamSpec {
    fn deltas(&self) -> usize {
        self.events.saturating_sub(FIXED_EVENTS).max(1)
    }

    /// What each stream delivers when it is complete.
    pub fn events_per_stream(&self) -> usize {
        self.deltas() + FIXED_EVENTS
    }

    /// The mock sends its text two words per delta, so twice as many words as deltas.
    fn request_body(&self) -> Bytes {
        let text = vec!["word"; 2 * self.deltas()].join(" ");
        let body = serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "stream": true,
            "messages": [{"role": "user", "content": "Hello"}],
            "mock": {
                "input_tokens": 100,
                "output_tokens": 20,
                "text": text,
                "chunk_delay_ms": self.interval.as_millis() as u64,
            },
        });
        Bytes::from(body.to_string())
    }

    /// How long one stream may take before it is given up: its own length plus the ramp and
    /// generous slack for a loaded machine.
    fn deadline(&self) -> Duration {
        self.interval * self.events as u32 + self.ramp + Duration::from_secs(30)
    }
}

/// What one target did over the run.
pub struct StreamResult {
    pub target: &'static str,
    pub idle_rss_kib: u64,
    /// The highest RSS sampled while the most streams were open at once.
    pub plateau_rss_kib: u64,
    /// The most streams open (first event received, not yet ended) at one sample.
    pub max_open: usize,
    pub cpu_secs: f64,
    pub events: u64,
    pub complete: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub wall: Duration,
}

impl StreamResult {
    pub fn rss_per_stream_kib(&self) -> Option<f64> {
        (self.max_open > 0).then(|| {
            self.plateau_rss_kib.saturating_sub(self.idle_rss_kib) as f64 / self.max_open as f64
        })
    }

    pub fn cpu_per_event_us(&self) -> Option<f64> {
        (self.events > 0).then(|| self.cpu_secs * 1e6 / self.events as f64)
    }
}

#[derive(Default)]
struct Counters {
    /// Streams whose first event has arrived.
    opened: AtomicUsize,
    /// Streams that ended, any way.
    ended: AtomicUsize,
}

struct Outcome {
    events: u64,
    complete: bool,
    error: Option<String>,
}

/// Runs the streams against `url` and measures process `pid`.
pub async fn run(
    target: &'static str,
    url: &str,
    api_key: &str,
    pid: u32,
    spec: &StreamSpec,
    hz: u64,
) -> anyhow::Result<StreamResult> {
    let client = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(spec.streams)
        .build()
        .context("building the HTTP client")?;
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-api-key",
        HeaderValue::from_str(api_key).context("the API key is not a header value")?,
    );
    headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = spec.request_body();
    let counters = Arc::new(Counters::default());

    let idle_rss_kib = probes::rss_kib(pid)?;
    let ticks_before = probes::cpu_ticks(pid)?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..spec.streams {
        let at = started + spec.ramp.mul_f64(i as f64 / spec.streams as f64);
        let request = client
            .post(url)
            .headers(headers.clone())
            .body(body.clone())
            .timeout(spec.deadline());
        let counters = Arc::clone(&counters);
        let expected = spec.events_per_stream() as u64;
        tasks.spawn(async move {
            tokio::time::sleep_until(at).await;
            let outcome = one_stream(request, expected, &counters).await;
            counters.ended.fetch_add(1, Ordering::Relaxed);
            outcome
        });
    }

    let mut max_open = 0;
    let mut plateau_rss_kib = idle_rss_kib;
    while !tasks.is_empty() && counters.ended.load(Ordering::Relaxed) < spec.streams {
        let ended = counters.ended.load(Ordering::Relaxed);
        let opened = counters.opened.load(Ordering::Relaxed);
        let open = opened.saturating_sub(ended);
        let rss = probes::rss_kib(pid)?;
        if open > max_open {
            max_open = open;
            plateau_rss_kib = rss;
        } else if open == max_open {
            plateau_rss_kib = plateau_rss_kib.max(rss);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut result = StreamResult {
        target,
        idle_rss_kib,
        plateau_rss_kib,
        max_open,
        cpu_secs: 0.0,
        events: 0,
        complete: 0,
        failed: 0,
        first_error: None,
        wall: Duration::ZERO,
    };
    while let Some(outcome) = tasks.join_next().await {
        let outcome = outcome.context("a stream task panicked")?;
        result.events += outcome.events;
        if outcome.complete {
            result.complete += 1;
        } else {
            result.failed += 1;
            result.first_error = result.first_error.or(outcome.error);
        }
    }
    result.wall = started.elapsed();
    // The gateway publishes a stream's usage event after the body ends, so its work for the
    // last streams finishes a moment after the client sees them end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    result.cpu_secs = probes::cpu_ticks(pid)?.saturating_sub(ticks_before) as f64 / hz as f64;
    Ok(result)
}

async fn one_stream(
    request: reqwest::RequestBuilder,
    expected: u64,
    counters: &Counters,
) -> Outcome {
    let mut outcome = Outcome {
        events: 0,
        complete: false,
        error: None,
    };
    let mut response = match request.send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            outcome.error = Some(format!("status {}", r.status()));
            return outcome;
        }
        Err(e) => {
            // Debug, not Display: the cause (a refused or reset connection) is in the sources.
            outcome.error = Some(format!("sending: {e:?}"));
            return outcome;
        }
    };
    let mut previous = 0u8;
    // The end of what arrived so far, enough to hold the whole last event.
    let mut tail: Vec<u8> = Vec::with_capacity(256);
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let before = outcome.events;
                for &byte in chunk.iter() {
                    if byte == b'\n' && previous == b'\n' {
                        outcome.events += 1;
                    }
                    previous = byte;
                }
                if before == 0 && outcome.events > 0 {
                    counters.opened.fetch_add(1, Ordering::Relaxed);
                }
                tail.extend_from_slice(&chunk);
                if tail.len() > 256 {
                    tail.drain(..tail.len() - 256);
                }
            }
            Ok(None) => break,
            Err(e) => {
                outcome.error = Some(format!("reading: {e:?}"));
                return outcome;
            }
        }
    }
    let last_is_stop = tail
        .windows(b"message_stop".len())
        .any(|w| w == b"message_stop");
    outcome.complete = outcome.events == expected && last_is_stop;
    if !outcome.complete {
        outcome.error = Some(format!(
            "{} of {expected} events, message_stop last: {last_is_stop}",
            outcome.events
        ));
    }
    outcome
}

/// The run's Markdown: one row per target, then their ratios.
pub fn markdown(
    spec: &StreamSpec,
    results: &[StreamResult],
    measured_at: &str,
    load: &str,
    conservation: &str,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Streaming capacity: {} streams × {} events, {} ms apart, opened over {} ms\n",
        spec.streams,
        spec.events_per_stream(),
        spec.interval.as_millis(),
        spec.ramp.as_millis()
    );
    let _ = writeln!(
        out,
        "Measured {measured_at}; load average before: {load}.\n"
    );
    let _ = writeln!(
        out,
        "| target | streams open at once | idle RSS KiB | RSS with all open KiB | RSS per open stream KiB | CPU s | events | CPU µs per event | complete | failed | wall s |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {:.1} |",
            r.target,
            r.max_open,
            r.idle_rss_kib,
            r.plateau_rss_kib,
            r.rss_per_stream_kib()
                .map_or("–".into(), |v| format!("{v:.1}")),
            r.cpu_secs,
            r.events,
            r.cpu_per_event_us()
                .map_or("–".into(), |v| format!("{v:.1}")),
            r.complete,
            r.failed,
            r.wall.as_secs_f64(),
        );
    }
    if let [gateway, nginx, ..] = results {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(
            out,
            "\n{} / {}: RSS per open stream {}, CPU per event {}.",
            gateway.target,
            nginx.target,
            ratio(gateway.rss_per_stream_kib(), nginx.rss_per_stream_kib()),
            ratio(gateway.cpu_per_event_us(), nginx.cpu_per_event_us()),
        );
    }
    for r in results {
        if let Some(error) = &r.first_error {
            let _ = writeln!(out, "\nFirst failure through {}: {error}", r.target);
        }
    }
    let _ = writeln!(out, "\n{conservation}");
    out
}
