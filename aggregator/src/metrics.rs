//! Process counters, rendered as Prometheus text on `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Metrics {
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub unpriced: AtomicU64,
    pub batches: AtomicU64,
    /// Commits redone because a cell changed between reading and writing it.
    pub commit_conflicts: AtomicU64,
    pub errors: AtomicU64,
    /// Events stamped further ahead of their arrival than a replay tolerates.
    pub clock_ahead: AtomicU64,
    pub stats_cache_hits: AtomicU64,
    pub stats_cache_misses: AtomicU64,
    apply_micros_total: AtomicU64,
}

impl Metrics {
    pub fn record_apply_time(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.apply_micros_total.fetch_add(micros, Ordering::Relaxed);
    }

    /// Renders counters plus the stream-side gauges read at scrape time, one per partition.
    pub fn render(&self, partitions: &[Gauges]) -> String {
        let total = Gauges::total(partitions);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            "meter_events_applied_total",
            "Usage events applied to the stats.",
            get(&self.applied),
        );
        counter(
            "meter_events_duplicate_total",
            "Events dropped as duplicates of an id already counted.",
            get(&self.duplicates),
        );
        counter(
            "meter_events_dead_lettered_total",
            "Stream entries moved to the dead-letter stream.",
            get(&self.dead_lettered),
        );
        counter(
            "meter_events_unpriced_total",
            "Relayed events whose model has no price (requests refused before an upstream was chosen are not counted).",
            get(&self.unpriced),
        );
        counter(
            "meter_batches_total",
            "Batches committed.",
            get(&self.batches),
        );
        counter(
            "meter_commit_conflicts_total",
            "Commits redone because a stats cell changed between reading and writing it.",
            get(&self.commit_conflicts),
        );
        counter(
            "meter_consumer_errors_total",
            "Failed consume or commit attempts (retried).",
            get(&self.errors),
        );
        counter(
            "meter_events_clock_ahead_total",
            "Events whose ts is more than 10 minutes after their arrival in the stream: a gateway clock runs ahead of Redis's, and a replay of their day may miss them.",
            get(&self.clock_ahead),
        );
        counter(
            "meter_stats_cache_hits_total",
            "Stats cells the API answered from its cache.",
            get(&self.stats_cache_hits),
        );
        counter(
            "meter_stats_cache_misses_total",
            "Stats cells the API read from Redis.",
            get(&self.stats_cache_misses),
        );
        let seconds = get(&self.apply_micros_total) as f64 / 1e6;
        let _ = writeln!(
            out,
            "# HELP meter_batch_apply_seconds_total Time spent decoding, pricing and committing batches.\n# TYPE meter_batch_apply_seconds_total counter\nmeter_batch_apply_seconds_total {seconds}"
        );
        for (name, help, value) in [
            (
                "meter_consumer_lag",
                "Stream entries not yet delivered to the group, over all partitions.",
                total.lag,
            ),
            (
                "meter_consumer_pending",
                "Entries delivered but not yet committed, over all partitions.",
                total.pending,
            ),
        ] {
            if let Some(value) = value {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
                );
            }
        }
        for (name, help, value) in [
            (
                "meter_consumer_partition_lag",
                "Stream entries of one partition not yet delivered to the group.",
                (|g: &Gauges| g.lag) as fn(&Gauges) -> Option<u64>,
            ),
            (
                "meter_consumer_partition_pending",
                "Entries of one partition delivered but not yet committed.",
                |g: &Gauges| g.pending,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (p, g) in partitions.iter().enumerate() {
                if let Some(v) = value(g) {
                    let _ = writeln!(out, "{name}{{partition=\"{p}\"}} {v}");
                }
            }
        }
        out
    }
}

/// One partition's consumer-group figures, read from Redis at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub lag: Option<u64>,
    pub pending: Option<u64>,
}

impl Gauges {
    /// Sums over partitions; unknown where no partition knows it.
    pub fn total(partitions: &[Gauges]) -> Gauges {
        let sum =
            |f: fn(&Gauges) -> Option<u64>| partitions.iter().filter_map(f).reduce(|a, b| a + b);
        Gauges {
            lag: sum(|g| g.lag),
            pending: sum(|g| g.pending),
        }
    }
}
