//! Process metrics, rendered as Prometheus text on `/metrics`.
//!
//! Labels stay low-cardinality (route, status class, provider, account): per-key breakdowns
//! belong to the stats API. Everything is a plain atomic, so recording costs a few nanoseconds
//! on the request path and no lock.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::provider::Provider;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds, seconds, of the latency histograms (upstream, concurrency waits).
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// One count per bucket, plus +Inf.
    counts: [Counter; BUCKETS.len() + 1],
    sum_micros: Counter,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let index = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[index].inc();
        self.sum_micros
            .add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// `labels` is empty or ends with a comma: `provider="openai",`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.get();
            let le = BUCKETS.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        let labels = labels.trim_end_matches(',');
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.get() as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

const ROUTES: [&str; 6] = [
    "messages",
    "count_tokens",
    "chat_completions",
    "responses",
    "models",
    "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[Counter; CLASSES.len()]; ROUTES.len()],
    pub in_flight: Gauge,
    pub streams_open: Gauge,
    upstream_latency: [Histogram; 2],
    pub events_published: Counter,
    pub events_spooled: Counter,
    pub events_pending: Gauge,
    pub spool_bytes: Gauge,
    pub spool_skipped: Gauge,
    pub spool_fsyncs: Counter,
    /// Event batches that landed but were not acknowledged by `--min-replicas` replicas in time.
    pub replica_waits_failed: Counter,
    pub redis_round_trips: Counter,
    pub auth_served_stale: Counter,
    pub limits_failed_open: Counter,
    /// Checks of a key's spend limits decided from the replica's cached sums, and those that
    /// read the spend counters.
    pub spend_cached: Counter,
    pub spend_reads: Counter,
    /// Blocks of `requests` window entries and of concurrency slots leased by this replica,
    /// and requests admitted from them without a round trip.
    pub limit_blocks_requests: Counter,
    pub limit_blocks_slots: Counter,
    pub limit_local_admissions: Counter,
    /// Requests waiting for a concurrency slot (`concurrency_wait_ms`), and how waits ended.
    pub concurrency_waiting: Gauge,
    pub concurrency_wait: Histogram,
    pub concurrency_wait_admitted: Counter,
    pub concurrency_wait_timeouts: Counter,
    pub concurrency_wait_refused: Counter,
    pub concurrency_wait_cancelled: Counter,
    cooldowns: Mutex<Vec<(String, u64)>>,
}

impl Metrics {
    pub fn request_done(&self, route: &str, status: u16) {
        let r = ROUTES
            .iter()
            .position(|x| *x == route)
            .unwrap_or(ROUTES.len() - 1);
        let c = usize::from((status / 100).clamp(1, 5) - 1);
        self.requests[r][c].inc();
    }

    /// Time from sending the upstream request to its response headers.
    pub fn upstream_latency(&self, provider: Provider, took: Duration) {
        self.upstream_latency[provider_index(provider)].observe(took);
    }

    pub fn cooldown(&self, account: &str) {
        if let Ok(mut list) = self.cooldowns.lock() {
            match list.iter_mut().find(|(id, _)| id == account) {
                Some((_, n)) => *n += 1,
                None => list.push((account.to_owned(), 1)),
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP meter_gateway_requests_total Client requests by route and status class.\n# TYPE meter_gateway_requests_total counter"
        );
        for (r, route) in ROUTES.iter().enumerate() {
            for (c, class) in CLASSES.iter().enumerate() {
                let n = self.requests[r][c].get();
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "meter_gateway_requests_total{{route=\"{route}\",status=\"{class}\"}} {n}"
                    );
                }
            }
        }
        for (name, help, value) in [
            (
                "meter_gateway_in_flight",
                "Client requests being served.",
                self.in_flight.get(),
            ),
            (
                "meter_gateway_streams_open",
                "Streamed responses in progress.",
                self.streams_open.get(),
            ),
            (
                "meter_gateway_events_pending",
                "Usage events queued in memory, not yet in Redis.",
                self.events_pending.get(),
            ),
            (
                "meter_gateway_spool_skipped_records",
                "Damaged spool records skipped (lost events) since start.",
                self.spool_skipped.get(),
            ),
            (
                "meter_gateway_concurrency_waiting",
                "Requests waiting for a free concurrency slot of their key.",
                self.concurrency_waiting.get(),
            ),
            (
                "meter_gateway_spool_bytes",
                "Bytes of usage events waiting in the local spool.",
                self.spool_bytes.get(),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        for (name, help, value) in [
            (
                "meter_gateway_events_published_total",
                "Usage events written to the Redis stream.",
                self.events_published.get(),
            ),
            (
                "meter_gateway_events_spooled_total",
                "Usage events written to the local spool.",
                self.events_spooled.get(),
            ),
            (
                "meter_gateway_replica_waits_failed_total",
                "Event batches kept for a retry because fewer replicas than --min-replicas acknowledged them in time.",
                self.replica_waits_failed.get(),
            ),
            (
                "meter_gateway_spool_fsyncs_total",
                "fsyncs of the local spool's files and directory (none with --spool-fsync false).",
                self.spool_fsyncs.get(),
            ),
            (
                "meter_gateway_redis_round_trips_total",
                "Redis round trips made by the gateway.",
                self.redis_round_trips.get(),
            ),
            (
                "meter_gateway_limits_failed_open_total",
                "Requests admitted without limit checks because Redis was unreachable (policy open).",
                self.limits_failed_open.get(),
            ),
            (
                "meter_gateway_limit_local_admissions_total",
                "Requests admitted from this replica's leased blocks of their key's limits, without a Redis round trip.",
                self.limit_local_admissions.get(),
            ),
            (
                "meter_gateway_auth_stale_total",
                "Requests authenticated from a stale cache entry while Redis was unreachable.",
                self.auth_served_stale.get(),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP meter_gateway_limit_spend_checks_total Checks of token, cost and budget limits, by where the spend sums came from.\n# TYPE meter_gateway_limit_spend_checks_total counter"
        );
        for (source, counter) in [("cache", &self.spend_cached), ("redis", &self.spend_reads)] {
            let _ = writeln!(
                out,
                "meter_gateway_limit_spend_checks_total{{source=\"{source}\"}} {}",
                counter.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP meter_gateway_limit_blocks_total Blocks of a key's allowance leased by this replica, by kind.\n# TYPE meter_gateway_limit_blocks_total counter"
        );
        for (kind, counter) in [
            ("requests", &self.limit_blocks_requests),
            ("concurrency", &self.limit_blocks_slots),
        ] {
            let _ = writeln!(
                out,
                "meter_gateway_limit_blocks_total{{kind=\"{kind}\"}} {}",
                counter.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP meter_gateway_concurrency_waits_total Waits for a concurrency slot, by how they ended.\n# TYPE meter_gateway_concurrency_waits_total counter"
        );
        for (outcome, counter) in [
            ("admitted", &self.concurrency_wait_admitted),
            ("timed_out", &self.concurrency_wait_timeouts),
            ("refused", &self.concurrency_wait_refused),
            ("cancelled", &self.concurrency_wait_cancelled),
        ] {
            let _ = writeln!(
                out,
                "meter_gateway_concurrency_waits_total{{outcome=\"{outcome}\"}} {}",
                counter.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP meter_gateway_concurrency_wait_seconds Time requests spent waiting for a concurrency slot.\n# TYPE meter_gateway_concurrency_wait_seconds histogram"
        );
        self.concurrency_wait
            .render(&mut out, "meter_gateway_concurrency_wait_seconds", "");
        let _ = writeln!(
            out,
            "# HELP meter_gateway_upstream_seconds Time to upstream response headers.\n# TYPE meter_gateway_upstream_seconds histogram"
        );
        for provider in [Provider::Anthropic, Provider::OpenAi] {
            self.upstream_latency[provider_index(provider)].render(
                &mut out,
                "meter_gateway_upstream_seconds",
                &format!("provider=\"{provider}\","),
            );
        }
        let _ = writeln!(
            out,
            "# HELP meter_gateway_account_cooldowns_total Upstream accounts put to rest after a 429, 529, 5xx or connection failure.\n# TYPE meter_gateway_account_cooldowns_total counter"
        );
        if let Ok(list) = self.cooldowns.lock() {
            for (account, n) in list.iter() {
                let _ = writeln!(
                    out,
                    "meter_gateway_account_cooldowns_total{{account=\"{account}\"}} {n}"
                );
            }
        }
        out
    }
}

fn provider_index(provider: Provider) -> usize {
    match provider {
        Provider::Anthropic => 0,
        Provider::OpenAi => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_and_status_class() {
        let m = Metrics::default();
        m.request_done("messages", 200);
        m.request_done("messages", 201);
        m.request_done("weird", 429);
        let text = m.render();
        assert!(text.contains("meter_gateway_requests_total{route=\"messages\",status=\"2xx\"} 2"));
        assert!(text.contains("meter_gateway_requests_total{route=\"other\",status=\"4xx\"} 1"));
    }

    #[test]
    fn the_histogram_is_cumulative() {
        let m = Metrics::default();
        m.upstream_latency(Provider::Anthropic, Duration::from_millis(3));
        m.upstream_latency(Provider::Anthropic, Duration::from_secs(500));
        let text = m.render();
        assert!(text.contains(
            "meter_gateway_upstream_seconds_bucket{provider=\"anthropic\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "meter_gateway_upstream_seconds_bucket{provider=\"anthropic\",le=\"+Inf\"} 2"
        ));
    }
}
