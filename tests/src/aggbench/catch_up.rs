//! Following the aggregator while it works through the preloaded streams: its `/metrics` every
//! 100 ms until every event is applied (and when each partition ran dry), and, from its first
//! applied batch on, its RSS and Redis' memory (summed over the masters) every second.

use std::time::Duration;

use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;
use tokio::time::{Instant, MissedTickBehavior};

use crate::probes::{self, AggregatorMetrics, Range};
use crate::servers::ChildGuard;
use crate::topology::Store;

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
    /// Per partition: process start until a scrape first showed it with no lag and nothing
    /// pending (every entry read and committed); `None` if no scrape did before the end.
    pub partition_done: Vec<Option<Duration>>,
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
    pub store: &'a mut Store,
    /// One per master, for `used_memory`.
    pub conns: &'a mut [MultiplexedConnection],
    pub http: &'a reqwest::Client,
    pub metrics_url: String,
}

/// Polls until `n` events are applied; `started` is when the aggregator process was spawned,
/// `partitions` how many it consumes.
pub async fn follow(
    w: Watched<'_>,
    n: u64,
    partitions: usize,
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
    let mut partition_done = vec![None; partitions];
    let total = loop {
        ticker.tick().await;
        w.aggregator.check_alive()?;
        w.store.check_alive()?;
        // Until the aggregator listens, scrapes fail; the deadline covers one that never does.
        let scraped = scrape(w.http, &w.metrics_url).await;
        let elapsed = started.elapsed();
        if let Ok((metrics, text)) = scraped {
            latest = metrics;
            for (p, gauges) in probes::partition_gauges(&text) {
                if let Some(done @ None) = partition_done.get_mut(p)
                    && gauges == (Some(0), Some(0))
                    && latest.applied > 0
                {
                    *done = Some(elapsed);
                }
            }
        }
        if latest.applied > 0 && first_seen.is_none() {
            first_seen = Some((elapsed, latest.applied));
        }
        // Memory is sampled from the first applied batch on: the question is whether it stays
        // flat while consuming, and a process still loading its price table would skew `min`.
        if first_seen.is_some() && last_sample.is_none_or(|t| t.elapsed() >= SAMPLE) {
            last_sample = Some(Instant::now());
            rss_kib.add(probes::rss_kib(w.aggregator.pid())?);
            redis_memory.add(probes::redis_used_memory_all(w.conns).await?);
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
    redis_memory.add(probes::redis_used_memory_all(w.conns).await?);
    let (metrics, text) = scrape(w.http, &w.metrics_url).await?;
    for (p, gauges) in probes::partition_gauges(&text) {
        if let Some(done @ None) = partition_done.get_mut(p)
            && gauges == (Some(0), Some(0))
        {
            *done = Some(total);
        }
    }
    let (first_seen, first_seen_applied) = first_seen.unwrap_or((total, 0));
    Ok(CatchUp {
        total,
        first_seen,
        first_seen_applied,
        rss_kib,
        redis_memory,
        metrics,
        partition_done,
    })
}

/// The parsed counters and the text, for the per-partition gauges.
async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<(AggregatorMetrics, String)> {
    let response = http
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?;
    let text = response.text().await?;
    Ok((AggregatorMetrics::parse(&text), text))
}
