//! Readings taken from outside the processes: `/proc` for memory and CPU, Redis `INFO`, and the
//! aggregator's Prometheus `/metrics`.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::MultiplexedConnection;

use crate::servers::info_field;

/// Resident set size of `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// User plus system CPU time of `pid` so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces, so count fields after its closing paren:
    // utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("malformed /proc/{pid}/stat"))?;
    let mut fields = after_name.split_whitespace().skip(11);
    let mut next = || -> anyhow::Result<u64> {
        fields
            .next()
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("malformed /proc/{pid}/stat"))
    };
    Ok(next()? + next()?)
}

/// `USER_HZ`, the unit of [`cpu_ticks`]; 100 on every common Linux when `getconf` is missing.
pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

/// Redis `used_memory`, in bytes.
pub async fn redis_used_memory(conn: &mut MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .context("INFO memory")?;
    info_field(&info, "used_memory")
        .and_then(|v| v.parse().ok())
        .context("no used_memory in INFO memory")
}

/// `used_memory` summed over `conns` (every master).
pub async fn redis_used_memory_all(conns: &mut [MultiplexedConnection]) -> anyhow::Result<u64> {
    let mut total = 0;
    for conn in conns {
        total += redis_used_memory(conn).await?;
    }
    Ok(total)
}

/// `CONFIG RESETSTAT` on every master, so `INFO commandstats` covers one phase.
pub async fn reset_stats(conns: &mut [MultiplexedConnection]) -> anyhow::Result<()> {
    for conn in conns {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(conn)
            .await
            .context("CONFIG RESETSTAT")?;
    }
    Ok(())
}

/// Keys of one name shape and the memory they take.
pub struct KeyShape {
    /// The key name with every run of digits replaced by `#`.
    pub shape: String,
    pub keys: u64,
    pub bytes: u64,
}

/// Every key in Redis grouped by [`KeyShape::shape`], largest first: shows what the memory
/// growth consists of (stream, stats hashes, dedupe sets, ...). `MEMORY USAGE .. SAMPLES 0`
/// walks whole values, so this is exact and is only run once, after the measurements.
pub async fn memory_by_key_shape(
    conns: &mut [MultiplexedConnection],
) -> anyhow::Result<Vec<KeyShape>> {
    let mut shapes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for conn in conns {
        add_key_shapes(conn, &mut shapes).await?;
    }
    let mut out: Vec<KeyShape> = shapes
        .into_iter()
        .map(|(shape, (keys, bytes))| KeyShape { shape, keys, bytes })
        .collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.shape.cmp(&b.shape)));
    Ok(out)
}

/// Adds the keys of one node to `shapes`: shape → (keys, bytes).
async fn add_key_shapes(
    conn: &mut MultiplexedConnection,
    shapes: &mut BTreeMap<String, (u64, u64)>,
) -> anyhow::Result<()> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("SCAN")?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    for chunk in keys.chunks(500) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(conn).await.context("MEMORY USAGE")?;
        for (key, size) in chunk.iter().zip(sizes) {
            let entry = shapes.entry(shape_of(key)).or_default();
            entry.0 += 1;
            entry.1 += size.unwrap_or(0);
        }
    }
    Ok(())
}

/// `INFO commandstats` summed over `conns` (every master) as (command, calls, microseconds),
/// most time first.
pub async fn command_stats(
    conns: &mut [MultiplexedConnection],
) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for conn in conns {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .context("INFO commandstats")?;
        for (name, calls, usec) in parse_command_stats(&info) {
            let entry = sums.entry(name).or_default();
            entry.0 += calls;
            entry.1 += usec;
        }
    }
    let mut out: Vec<_> = sums
        .into_iter()
        .map(|(name, (calls, usec))| (name, calls, usec))
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.2));
    Ok(out)
}

/// How long single calls of each command held Redis, from `LATENCY HISTOGRAM` summed over
/// `conns` (every master): (command, calls, p99 µs, max µs). Redis keeps
/// power-of-two buckets, so each figure is the bucket's upper bound: within 2× above the truth.
/// These are durations inside Redis: what a command arriving meanwhile waits at most, apart
/// from the time the machine did not run Redis at all. Longest first.
pub async fn command_durations(
    conns: &mut [MultiplexedConnection],
) -> anyhow::Result<Vec<(String, u64, u64, u64)>> {
    // command → bucket upper bound (µs) → calls in it. Each master's histogram is cumulative
    // and ends at its own slowest bucket, so they are summed bucket by bucket, not as given.
    let mut sums: BTreeMap<String, BTreeMap<u64, u64>> = BTreeMap::new();
    for conn in conns {
        let reply: redis::Value = redis::cmd("LATENCY")
            .arg("HISTOGRAM")
            .query_async(conn)
            .await
            .context("LATENCY HISTOGRAM")?;
        for (name, stats) in pairs(reply) {
            let Ok(name) = redis::from_redis_value::<String>(name) else {
                continue;
            };
            let histogram = pairs(stats)
                .into_iter()
                .find(|(k, _)| {
                    redis::from_redis_value_ref::<String>(k).is_ok_and(|k| k == "histogram_usec")
                })
                .map(|(_, v)| pairs(v))
                .unwrap_or_default();
            let mut cumulative: Vec<(u64, u64)> = histogram
                .into_iter()
                .filter_map(|(bucket, count)| {
                    Some((
                        redis::from_redis_value::<u64>(bucket).ok()?,
                        redis::from_redis_value::<u64>(count).ok()?,
                    ))
                })
                .collect();
            cumulative.sort_unstable();
            let buckets = sums.entry(name).or_default();
            let mut below = 0;
            for (bucket, count) in cumulative {
                *buckets.entry(bucket).or_default() += count.saturating_sub(below);
                below = below.max(count);
            }
        }
    }
    let mut out: Vec<_> = sums
        .into_iter()
        .filter_map(|(name, buckets)| {
            let calls: u64 = buckets.values().sum();
            let max = *buckets.iter().rev().find(|(_, c)| **c > 0)?.0;
            let mut seen = 0;
            let p99 = buckets
                .iter()
                .find(|(_, c)| {
                    seen += **c;
                    seen as f64 >= 0.99 * calls as f64
                })
                .map_or(max, |(b, _)| *b);
            Some((name, calls, p99, max))
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse((c.3, c.2)));
    Ok(out)
}

/// The (key, value) pairs of a RESP3 map or a RESP2 flat array.
fn pairs(value: redis::Value) -> Vec<(redis::Value, redis::Value)> {
    match value {
        redis::Value::Map(pairs) => pairs,
        redis::Value::Array(items) => {
            let mut items = items.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                out.push((k, v));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Lines like `cmdstat_hset:calls=3,usec=12,usec_per_call=4.00,...`.
fn parse_command_stats(info: &str) -> Vec<(String, u64, u64)> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            Some((name.to_owned(), field("calls")?, field("usec")?))
        })
        .collect()
}

fn shape_of(key: &str) -> String {
    let mut shape = String::with_capacity(key.len());
    for c in key.chars() {
        if !c.is_ascii_digit() {
            shape.push(c);
        } else if !shape.ends_with('#') {
            shape.push('#');
        }
    }
    shape
}

/// The aggregator's counters and gauges that the benchmark follows.
#[derive(Debug, Default, Clone, Copy)]
pub struct AggregatorMetrics {
    pub applied: u64,
    pub unpriced: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub batches: u64,
    pub errors: u64,
    /// Commits refused because a cell had changed (or was not cached) and sent again.
    pub conflicts: u64,
    /// Absent when the aggregator could not read its group's info.
    pub lag: Option<u64>,
    pub pending: Option<u64>,
}

impl AggregatorMetrics {
    pub fn parse(text: &str) -> Self {
        let value = |name: &str| {
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .find_map(|line| {
                    let (metric, value) = line.split_once(' ')?;
                    (metric == name).then(|| value.trim().parse::<f64>().ok())?
                })
                .map(|v| v as u64)
        };
        Self {
            applied: value("meter_events_applied_total").unwrap_or(0),
            unpriced: value("meter_events_unpriced_total").unwrap_or(0),
            duplicates: value("meter_events_duplicate_total").unwrap_or(0),
            dead_lettered: value("meter_events_dead_lettered_total").unwrap_or(0),
            batches: value("meter_batches_total").unwrap_or(0),
            errors: value("meter_consumer_errors_total").unwrap_or(0),
            conflicts: value("meter_commit_conflicts_total").unwrap_or(0),
            lag: value("meter_consumer_lag"),
            pending: value("meter_consumer_pending"),
        }
    }
}

/// Round trips of one `PING` every 5 ms on a connection of its own while something else runs:
/// how long any other client of this Redis (the gateway's limiter, say) waits meanwhile, for
/// Redis runs one command at a time and a commit script is one command.
pub struct Waits {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<Duration>, usize)>,
}

/// What [`Waits`] saw.
#[derive(Debug, Clone, Copy)]
pub struct WaitSummary {
    pub pings: usize,
    /// Pings that got an error instead of `PONG` (not in the percentiles).
    pub errors: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Waits {
    pub async fn start(url: &str) -> anyhow::Result<Self> {
        // The crate's default 500 ms response timeout would turn the longest waits, the ones
        // this probe is for, into errors; `connect` allows a minute.
        let mut conn = crate::servers::connect(url).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let (mut samples, mut errors) = (Vec::new(), 0);
            while !stopped.load(Ordering::Relaxed) {
                let sent = Instant::now();
                match redis::cmd("PING").query_async::<()>(&mut conn).await {
                    Ok(()) => samples.push(sent.elapsed()),
                    Err(_) => errors += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (samples, errors)
        });
        Ok(Self { stop, task })
    }

    pub async fn finish(self) -> anyhow::Result<WaitSummary> {
        self.stop.store(true, Ordering::Relaxed);
        let (mut samples, errors) = self.task.await.context("the PING task")?;
        samples.sort_unstable();
        Ok(WaitSummary {
            errors,
            ..summarise(&samples)
        })
    }
}

/// Nearest-rank percentiles of sorted `samples`.
pub fn summarise(samples: &[Duration]) -> WaitSummary {
    let at = |q: f64| {
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples
            .get(rank.saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    WaitSummary {
        pings: samples.len(),
        errors: 0,
        p50: at(0.5),
        p99: at(0.99),
        max: samples.last().copied().unwrap_or_default(),
    }
}

/// Minimum, maximum and last of a series of samples.
#[derive(Debug, Default, Clone, Copy)]
pub struct Range {
    pub min: u64,
    pub max: u64,
    pub last: u64,
    pub count: usize,
}

impl Range {
    pub fn add(&mut self, sample: u64) {
        if self.count == 0 {
            self.min = sample;
            self.max = sample;
        }
        self.min = self.min.min(sample);
        self.max = self.max.max(sample);
        self.last = sample;
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_percentiles_are_nearest_rank() {
        let ms = |n: u64| Duration::from_millis(n);
        let samples: Vec<Duration> = (1..=200).map(ms).collect();
        let s = summarise(&samples);
        assert_eq!(
            (s.pings, s.p50, s.p99, s.max),
            (200, ms(100), ms(198), ms(200))
        );
        assert_eq!(summarise(&[]).max, Duration::ZERO);
    }

    #[test]
    fn metrics_are_read_by_exact_name() {
        let text = "# HELP meter_events_applied_total x\n# TYPE meter_events_applied_total counter\n\
                    meter_events_applied_total 1200\nmeter_events_unpriced_total 3\n\
                    meter_batch_apply_seconds_total 1.5\nmeter_consumer_lag 0\n";
        let m = AggregatorMetrics::parse(text);
        assert_eq!(
            (m.applied, m.unpriced, m.lag, m.pending),
            (1200, 3, Some(0), None)
        );
    }

    #[test]
    fn command_stats_parse() {
        let info = "# Commandstats\r\ncmdstat_hset:calls=3,usec=12,usec_per_call=4.00,rejected_calls=0\r\n\
                    cmdstat_evalsha:calls=1,usec=900,usec_per_call=900.00\r\n";
        assert_eq!(
            parse_command_stats(info),
            [("hset".to_owned(), 3, 12), ("evalsha".to_owned(), 1, 900)]
        );
    }

    #[test]
    fn key_shapes_replace_digit_runs() {
        assert_eq!(shape_of("{s}:st:h:1767225600000"), "{s}:st:h:#");
        assert_eq!(shape_of("{s}:seen:g1:42"), "{s}:seen:g#:#");
    }

    #[test]
    fn our_own_cpu_time_and_rss_are_readable() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        cpu_ticks(pid).unwrap();
    }
}
