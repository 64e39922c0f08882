//! Following the aggregator while it works through the preloaded stream: its `/metrics` every
//! 100 ms until every event is applied, and, from its first applied batch on, its RSS and
//! Redis' memory every second.

use std::time::Duration;

use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;
use tokio::time::{Instant, MissedTickBehavior};

use crate::probes::{self, AggregatorMetrics, Range};
use crate::servers::{ChildGuard, Redis};

const POLL: Duration = Duration::from_millis(100);
const SAMPLE: Duration = Duration::from_secs(1);
const PROGRESS: Duration = Duration::from_secs(5);

/// What one catch-up took.
pub struct CatchUp {
    /// Process start until every event was applied.
    pub total: Duration,
    /// Process start until a scrape first showed applied events (startup, pricing load, first
    /// batches), and the events that scrape showed.
    pub first_seen: Duration,
    pub first_seen_applied: u64,
    pub rss_kib: Range,
    pub redis_memory: Range,
    /// The last scrape, taken after the end.
    pub metrics: AggregatorMetrics,
}

impl CatchUp {
    /// From the first scrape that showed progress to the end, and the events applied in it:
    /// the steady-state rate without process startup.
    pub fn steady(&self) -> (Duration, u64, u64) {
        let applied = self.metrics.applied;
        (
            self.total.saturating_sub(self.first_seen),
            applied.saturating_sub(self.first_seen_applied),
            applied,
        )
    }
}

pub struct Watched<'a> {
    pub aggregator: &'a mut ChildGuard,
    pub redis: &'a mut Redis,
    pub conn: &'a mut MultiplexedConnection,
    pub http: &'a reqwest::Client,
    pub metrics_url: String,
}

/// Polls until `n` events are applied; `started` is when the aggregator process was spawned.
pub async fn follow(
    w: Watched<'_>,
    n: u64,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<CatchUp> {
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut rss_kib, mut redis_memory) = (Range::default(), Range::default());
    let mut last_sample: Option<Instant> = None;
    let mut last_progress = (Instant::now(), 0);
    let mut first_seen: Option<(Duration, u64)> = None;
    let mut latest = AggregatorMetrics::default();
    let total = loop {
        ticker.tick().await;
        w.aggregator.check_alive()?;
        w.redis.check_alive()?;
        // Until the aggregator listens, scrapes fail; the deadline covers one that never does.
        if let Ok(metrics) = scrape(w.http, &w.metrics_url).await {
            latest = metrics;
        }
        let elapsed = started.elapsed();
        if latest.applied > 0 && first_seen.is_none() {
            first_seen = Some((elapsed, latest.applied));
        }
        // Memory is sampled from the first applied batch on: the question is whether it stays
        // flat while consuming, and a process still loading its price table would skew `min`.
        if first_seen.is_some() && last_sample.is_none_or(|t| t.elapsed() >= SAMPLE) {
            last_sample = Some(Instant::now());
            rss_kib.add(probes::rss_kib(w.aggregator.pid())?);
            redis_memory.add(probes::redis_used_memory(w.conn).await?);
        }
        if latest.applied >= n {
            break elapsed;
        }
        if last_progress.0.elapsed() >= PROGRESS {
            let rate =
                (latest.applied - last_progress.1) as f64 / last_progress.0.elapsed().as_secs_f64();
            eprintln!(
                "aggbench: aggregator applied {} / {n} ({rate:.0}/s lately), unpriced {}, lag {}",
                latest.applied,
                latest.unpriced,
                latest.lag.map_or("?".into(), |l| l.to_string()),
            );
            last_progress = (Instant::now(), latest.applied);
        }
        if elapsed > timeout {
            bail!(
                "the aggregator applied only {} of {n} events in {} s",
                latest.applied,
                timeout.as_secs()
            );
        }
    };
    rss_kib.add(probes::rss_kib(w.aggregator.pid())?);
    redis_memory.add(probes::redis_used_memory(w.conn).await?);
    let metrics = scrape(w.http, &w.metrics_url).await?;
    let (first_seen, first_seen_applied) = first_seen.unwrap_or((total, 0));
    Ok(CatchUp {
        total,
        first_seen,
        first_seen_applied,
        rss_kib,
        redis_memory,
        metrics,
    })
}

async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<AggregatorMetrics> {
    let response = http
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?;
    Ok(AggregatorMetrics::parse(&response.text().await?))
}
