//! Following the aggregator while it works through the preloaded streams: its consumer group on
//! every partition every 100 ms until each has committed everything, its `/metrics` beside that,
//! and, from its first committed batch on, its RSS and Redis' memory (summed over the masters)
//! every second.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::future::try_join_all;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::probes::{self, AggregatorMetrics, Range};
use crate::servers::ChildGuard;
use crate::stream::Part;
use crate::topology::Store;

const POLL: Duration = Duration::from_millis(100);
const SAMPLE: Duration = Duration::from_secs(1);
const PROGRESS: Duration = Duration::from_secs(5);
/// A scrape reads each partition's group from Redis, behind whatever the aggregator's
/// connection has in flight; Prometheus' default scrape timeout.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one catch-up took.
pub struct CatchUp {
    /// Process start until every event was applied.
    pub total: Duration,
    /// Process start until Redis first showed committed events (startup, pricing load, first
    /// batches), and how many.
    pub first_seen: Duration,
    pub first_seen_applied: u64,
    pub rss_kib: Range,
    pub redis_memory: Range,
    /// A scrape taken after the end, once it showed every event applied (or 10 s later).
    pub metrics: AggregatorMetrics,
    /// Per partition: process start until its group first showed no lag and nothing pending
    /// (every entry read and committed).
    pub partition_done: Vec<Option<Duration>>,
    /// How `/metrics` answered while the backlog lasted.
    pub scrapes: Scrapes,
}

/// The `/metrics` scrapes of a catch-up: answered ones (and the slowest, in ms), and those
/// that got no answer within [`SCRAPE_TIMEOUT`] (a refused connection before the aggregator
/// listens is neither).
#[derive(Debug, Default, Clone, Copy)]
pub struct Scrapes {
    pub answered: u64,
    pub slowest_ms: u64,
    pub timed_out: u64,
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
    /// The partitions' streams, each on a connection of ours to its master.
    pub parts: &'a [Part],
    /// The aggregator's consumer group.
    pub group: &'a str,
    pub http: &'a reqwest::Client,
    pub metrics_url: String,
}

/// Polls until every partition's group has read and committed everything, `n` events in all;
/// `started` is when the aggregator process was spawned.
///
/// Progress is read from Redis on our own connections (`XINFO GROUPS`, every partition at
/// once), not from `/metrics`: the aggregator's scrape reads the same figures through its own
/// connection, behind whatever that has in flight, and took seconds on a busy cluster, which
/// would have been counted as catch-up time. `/metrics` is still scraped, beside the polling,
/// for the counters and for how it answers.
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
    let mut partition_done = vec![None; w.parts.len()];
    let mut scrapes = Scrapes::default();
    let mut scraping: Option<JoinHandle<Scraped>> = None;
    let total = loop {
        ticker.tick().await;
        w.aggregator.check_alive()?;
        w.store.check_alive()?;
        if scraping.as_ref().is_some_and(JoinHandle::is_finished)
            && let Some(task) = scraping.take()
        {
            scrapes.record(&task.await.context("the scrape task")?);
        }
        if scraping.is_none() {
            scraping = Some(tokio::spawn(scrape_timed(
                w.http.clone(),
                w.metrics_url.clone(),
            )));
        }
        let progress = group_progress(w.parts, w.group).await?;
        let elapsed = started.elapsed();
        let committed: u64 = progress.iter().flatten().map(Progress::committed).sum();
        for (done, p) in partition_done.iter_mut().zip(&progress) {
            if done.is_none() && p.as_ref().is_some_and(Progress::done) {
                *done = Some(elapsed);
            }
        }
        if committed > 0 && first_seen.is_none() {
            first_seen = Some((elapsed, committed));
        }
        // Memory is sampled from the first applied batch on: the question is whether it stays
        // flat while consuming, and a process still loading its price table would skew `min`.
        if first_seen.is_some() && last_sample.is_none_or(|t| t.elapsed() >= SAMPLE) {
            last_sample = Some(Instant::now());
            rss_kib.add(probes::rss_kib(w.aggregator.pid())?);
            redis_memory.add(probes::redis_used_memory_all(w.conns).await?);
        }
        if partition_done.iter().all(Option::is_some) {
            break elapsed;
        }
        if last_progress.0.elapsed() >= PROGRESS {
            let rate = committed.saturating_sub(last_progress.1) as f64
                / last_progress.0.elapsed().as_secs_f64();
            let lag: Option<u64> = progress
                .iter()
                .map(|p| p.as_ref().and_then(|p| p.lag))
                .sum();
            eprintln!(
                "aggbench: aggregator committed {committed} / {n} ({rate:.0}/s lately), lag {}",
                lag.map_or("?".into(), |l| l.to_string()),
            );
            last_progress = (Instant::now(), committed);
        }
        if elapsed > timeout {
            bail!(
                "the aggregator committed only {committed} of {n} events in {} s",
                timeout.as_secs()
            );
        }
    };
    if let Some(task) = scraping.take() {
        task.abort();
    }
    rss_kib.add(probes::rss_kib(w.aggregator.pid())?);
    redis_memory.add(probes::redis_used_memory_all(w.conns).await?);
    // The counters move when a commit's reply is back in the aggregator, a moment after Redis
    // shows it acknowledged.
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    let metrics = loop {
        let scraped = scrape_timed(w.http.clone(), w.metrics_url.clone()).await;
        scrapes.record(&scraped);
        let metrics = scraped.result?;
        if metrics.applied >= n || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(POLL).await;
    };
    let (first_seen, first_seen_applied) = first_seen.unwrap_or((total, 0));
    Ok(CatchUp {
        total,
        first_seen,
        first_seen_applied,
        rss_kib,
        redis_memory,
        metrics,
        partition_done,
        scrapes,
    })
}

/// One partition's consumer group, from `XINFO GROUPS`.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// Entries delivered to the group (`entries-read`), and of those not yet acknowledged.
    read: u64,
    pending: u64,
    /// Entries not yet delivered; Redis does not always know it.
    lag: Option<u64>,
}

impl Progress {
    /// The aggregator acknowledges a batch in the script that commits it.
    fn committed(&self) -> u64 {
        self.read.saturating_sub(self.pending)
    }

    fn done(&self) -> bool {
        self.lag == Some(0) && self.pending == 0
    }
}

/// Each partition's `group`, `None` until the aggregator has created it.
async fn group_progress(parts: &[Part], group: &str) -> anyhow::Result<Vec<Option<Progress>>> {
    try_join_all(parts.iter().map(|part| {
        let mut conn = part.conn.clone();
        async move {
            let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&part.stream)
                .query_async(&mut conn)
                .await
                .with_context(|| format!("XINFO GROUPS {}", part.stream))?;
            let ours = groups.iter().find(|g| {
                g.get("name")
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    .is_some_and(|name| name == group)
            });
            let number = |g: &HashMap<String, Value>, name: &str| {
                g.get(name)
                    .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
            };
            anyhow::Ok(ours.map(|g| Progress {
                read: number(g, "entries-read").unwrap_or(0),
                pending: number(g, "pending").unwrap_or(0),
                lag: number(g, "lag"),
            }))
        }
    }))
    .await
}

struct Scraped {
    took: Duration,
    result: anyhow::Result<AggregatorMetrics>,
}

impl Scrapes {
    fn record(&mut self, scraped: &Scraped) {
        match &scraped.result {
            Ok(_) => {
                self.answered += 1;
                let ms = u64::try_from(scraped.took.as_millis()).unwrap_or(u64::MAX);
                self.slowest_ms = self.slowest_ms.max(ms);
            }
            Err(e) if is_timeout(e) => self.timed_out += 1,
            // Refused: the aggregator is not listening yet.
            Err(_) => {}
        }
    }
}

async fn scrape_timed(http: reqwest::Client, url: String) -> Scraped {
    let sent = Instant::now();
    let result = scrape(&http, &url).await;
    Scraped {
        took: sent.elapsed(),
        result,
    }
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<reqwest::Error>())
        .any(reqwest::Error::is_timeout)
}

async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<AggregatorMetrics> {
    let response = http
        .get(url)
        .timeout(SCRAPE_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?;
    Ok(AggregatorMetrics::parse(&response.text().await?))
}
