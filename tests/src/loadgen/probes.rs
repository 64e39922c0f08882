//! What the harness reads besides latencies: a process's CPU time and resident memory from
//! `/proc`, Redis's command counter and stream length, and a counter from the gateway's
//! `/metrics` if it has one.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;

/// The gateway counter of Redis round trips, read when the gateway exposes it.
pub const ROUND_TRIPS_METRIC: &str = "meter_gateway_redis_round_trips_total";

/// Clock ticks per second, the unit of `/proc/<pid>/stat` times (`getconf CLK_TCK`). Linux has
/// used 100 on every mainstream architecture for decades, so that is the fallback.
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

/// User plus system CPU time of `pid` so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))
}

/// `utime` and `stime` are fields 14 and 15 of `/proc/<pid>/stat`. Field 2, the command name,
/// is in parentheses and may itself contain spaces or parentheses, so counting starts after the
/// last `)`, where field 3 is.
fn parse_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let (_, rest) = stat
        .rsplit_once(')')
        .context("no `)` after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |number: usize| -> anyhow::Result<u64> {
        fields
            .get(number - 3)
            .with_context(|| format!("no field {number}"))?
            .parse()
            .with_context(|| format!("field {number} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// Resident set size of `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_rss_kib(&status).with_context(|| format!("parsing {path}"))
}

fn parse_rss_kib(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?;
    let Some(kib) = line.trim().strip_suffix("kB") else {
        bail!("VmRSS is not in kB: {line:?}");
    };
    kib.trim().parse().context("VmRSS is not a number")
}

/// Connections to the benchmark's private Redis (one node, or every master of a cluster) for
/// the counters the report needs: node counters are summed over the masters, stream lengths
/// over the partitions.
pub struct RedisProbe {
    nodes: Vec<MultiplexedConnection>,
    data: shared::RedisConn,
    partitions: u32,
}

impl RedisProbe {
    /// `nodes`: the node, or the cluster's masters; `target`: what `REDIS_URL` says.
    pub async fn connect(nodes: &[String], target: &str, partitions: u32) -> anyhow::Result<Self> {
        let mut conns = Vec::with_capacity(nodes.len());
        for url in nodes {
            let client =
                redis::Client::open(url.as_str()).with_context(|| format!("parsing {url}"))?;
            conns.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            );
        }
        let data = shared::Target::parse(target, false)?
            .connect(shared::Timeouts::new(
                Duration::from_secs(5),
                Duration::from_secs(5),
            ))
            .await
            .with_context(|| format!("connecting to {target}"))?;
        Ok(Self {
            nodes: conns,
            data,
            partitions,
        })
    }

    pub async fn ping(&mut self) -> anyhow::Result<()> {
        for conn in &mut self.nodes {
            let _: String = redis::cmd("PING").query_async(conn).await.context("PING")?;
        }
        Ok(())
    }

    /// `total_commands_processed` from `INFO stats`: every command of every client, so also
    /// the aggregator's and the `INFO` calls of this probe; summed over the masters.
    pub async fn commands_processed(&mut self) -> anyhow::Result<u64> {
        self.info_u64("stats", "total_commands_processed").await
    }

    /// One integer field of an `INFO` section, such as `used_memory` of `memory`, summed over
    /// the masters.
    pub async fn info_u64(&mut self, section: &str, field: &str) -> anyhow::Result<u64> {
        let mut sum = 0;
        for conn in &mut self.nodes {
            let info: String = redis::cmd("INFO")
                .arg(section)
                .query_async(conn)
                .await
                .with_context(|| format!("INFO {section}"))?;
            sum += info
                .lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .with_context(|| format!("INFO {section} has no {field}"))?
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{field} is not a number"))?;
        }
        Ok(sum)
    }

    /// Calls per command so far, from `INFO commandstats` (`cmdstat_xadd:calls=12,...`),
    /// summed over the masters. Commands that Lua scripts run are counted too, under their
    /// own names.
    pub async fn command_calls(&mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut calls = BTreeMap::new();
        for conn in &mut self.nodes {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(conn)
                .await
                .context("INFO commandstats")?;
            for (name, n) in parse_command_calls(&info)? {
                *calls.entry(name).or_default() += n;
            }
        }
        Ok(calls)
    }

    /// The events in `stream`, over all its partitions.
    pub async fn xlen(&mut self, stream: &str) -> anyhow::Result<u64> {
        let partitions = shared::Partitions::new(stream, self.partitions)?;
        let mut sum = 0;
        for keyspace in partitions.iter() {
            sum += redis::cmd("XLEN")
                .arg(keyspace.stream())
                .query_async::<u64>(&mut self.data)
                .await
                .with_context(|| format!("XLEN {}", keyspace.stream()))?;
        }
        Ok(sum)
    }
}

fn parse_command_calls(info: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut calls = BTreeMap::new();
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let n = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .with_context(|| format!("no calls= in {line:?}"))?
            .parse()
            .with_context(|| format!("calls is not a number in {line:?}"))?;
        calls.insert(name.to_owned(), n);
    }
    Ok(calls)
}

/// The gateway's count of answered client requests, by route and status class.
pub const REQUESTS_METRIC: &str = "meter_gateway_requests_total";
/// The gateway's gauge of client requests whose handler has not returned yet.
pub const IN_FLIGHT_METRIC: &str = "meter_gateway_in_flight";

/// The gateway's `/metrics` text.
pub async fn gateway_metrics(http: &reqwest::Client, gateway: &str) -> anyhow::Result<String> {
    let url = format!("{gateway}/metrics");
    let response = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("GET {url}: {status}");
    }
    response
        .text()
        .await
        .with_context(|| format!("reading {url}"))
}

/// The sum over all series of [`ROUND_TRIPS_METRIC`] on the gateway's `/metrics`, or `None` when
/// the gateway has no such endpoint or counter (yet).
pub async fn gateway_round_trips(http: &reqwest::Client, gateway: &str) -> Option<f64> {
    let response = http.get(format!("{gateway}/metrics")).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let text = response.text().await.ok()?;
    counter_sum(&text, ROUND_TRIPS_METRIC)
}

/// Sums the samples of `name` in a Prometheus text exposition: `name 12` or
/// `name{label="v"} 12`, possibly followed by a timestamp.
pub fn counter_sum(text: &str, name: &str) -> Option<f64> {
    counter_sum_where(text, name, None)
}

/// [`counter_sum`] over only the series that carry `label` (`route="messages"`) among theirs.
pub fn counter_sum_labelled(text: &str, name: &str, label: &str) -> Option<f64> {
    counter_sum_where(text, name, Some(label))
}

fn counter_sum_where(text: &str, name: &str, label: Option<&str>) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(labelled) = rest.strip_prefix('{') {
            labelled
                .split_once('}')
                .filter(|(labels, _)| label.is_none_or(|l| labels.split(',').any(|x| x == l)))
                .map(|(_, v)| v)
        } else if rest.starts_with(' ') && label.is_none() {
            Some(rest)
        } else {
            // Another metric whose name starts with ours, such as `..._total_created`, or an
            // unlabelled series when a label is asked for.
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime_even_with_parentheses_in_the_name() {
        let stat = "4242 (gate way) (x)) S 1 4242 4242 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat).unwrap(), 200);
    }

    #[test]
    fn command_calls_are_read_per_command() {
        let info = "# Commandstats\r\n\
            cmdstat_xadd:calls=12,usec=40,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_client|list:calls=1,usec=2\r\n";
        let calls = parse_command_calls(info).unwrap();
        assert_eq!(calls.get("xadd"), Some(&12));
        assert_eq!(calls.get("client|list"), Some(&1));
        assert_eq!(calls.len(), 2);
    }

    #[test]
    fn rss_is_read_in_kib() {
        let status = "Name:\tgateway\nVmPeak:\t  99 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status).unwrap(), 12345);
    }

    #[test]
    fn a_counter_is_summed_over_its_series_and_other_metrics_are_ignored() {
        let text =
            "# TYPE m counter\nm{op=\"xadd\"} 3\nm{op=\"get\"} 4 1700000000\nm_created 9\nm2 1\n";
        assert_eq!(counter_sum(text, "m"), Some(7.0));
        assert_eq!(counter_sum("m 5\n", "m"), Some(5.0));
        assert_eq!(counter_sum("other 5\n", "m"), None);
    }

    #[test]
    fn a_labelled_sum_keeps_only_the_series_with_that_label() {
        let text = "m{route=\"messages\",status=\"2xx\"} 30\n\
            m{route=\"messages\",status=\"4xx\"} 2\n\
            m{route=\"other\",status=\"2xx\"} 7\n\
            m 100\n";
        assert_eq!(
            counter_sum_labelled(text, "m", "route=\"messages\""),
            Some(32.0)
        );
        assert_eq!(counter_sum_labelled(text, "m", "route=\"models\""), None);
    }
}
