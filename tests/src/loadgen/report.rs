//! The Markdown report: one row per run, the gateway-versus-direct comparison, memory and the
//! conservation check. Pure formatting; every number comes from the run that prints it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::deployment::Conservation;
use crate::load::LoadResult;

/// What sent the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// The `wrk` executable (the `wrk` module).
    Wrk,
    /// Our own closed loop over reqwest (the `load` module).
    Reqwest,
}

impl Driver {
    pub fn name(self) -> &'static str {
        match self {
            Self::Wrk => "wrk",
            Self::Reqwest => "reqwest",
        }
    }

    /// The intro's description of how the load was sent.
    fn method(self) -> &'static str {
        match self {
            Self::Wrk => {
                "closed loop, HTTP/1.1 keep-alive, one connection per unit of concurrency over \
                 1 wrk thread (concurrency 1) or 2; the warm-up and the measured window are two \
                 wrk processes, so the window starts on fresh connections. wrk"
            }
            Self::Reqwest => {
                "closed loop, HTTP/1.1 keep-alive, one connection per concurrent task. Loadgen"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Direct,
    Gateway,
    /// Through the gateway with a key that has every kind of limit (`--limits`).
    GatewayLimited,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct to mock",
            Self::Gateway => "through gateway",
            Self::GatewayLimited => "through gateway, limits on",
        }
    }
}

/// What a gateway run cost, over its measured window.
pub struct GatewayCost {
    pub cpu_secs: f64,
    /// `total_commands_processed` delta, all clients.
    pub redis_commands: u64,
    /// Delta of the gateway's own round-trip counter, when it exposes one.
    pub round_trips: Option<f64>,
    /// `INFO commandstats` calls delta per command, most called first.
    pub by_command: Vec<(String, u64)>,
}

pub struct Row {
    pub concurrency: usize,
    pub stream: bool,
    pub target: Target,
    pub result: LoadResult,
    /// `Some` for gateway runs.
    pub cost: Option<GatewayCost>,
}

impl Row {
    /// Requests completed in the window, failed ones included: the denominator of costs.
    fn completed(&self) -> u64 {
        self.result.ok + self.result.errors
    }

    fn per_request(&self, total: f64) -> Option<f64> {
        let n = self.completed();
        (n > 0).then(|| total / n as f64)
    }
}

pub struct Report {
    pub measured_at: String,
    pub driver: Driver,
    pub cores: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub rows: Vec<Row>,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// `conservation.served` is the gateway's own count with wrk, and this the client's (which
    /// it is with reqwest too).
    pub conservation: Conservation,
    pub client_counted: u64,
    /// Gateway settings the run changed from their defaults, as `NAME=value`.
    pub gateway_settings: Vec<String>,
    /// What Redis the run used, in words: one node, or a cluster and its partitions.
    pub redis: String,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "## Gateway load — `loadgen`\n")?;
        writeln!(
            out,
            "Measured {} on {} cores with the {} driver (`--driver {}`): {} s per row after a \
             {} s warm-up that is not measured; {}, the mock upstream, Redis, the aggregator and \
             the gateway all share the machine.\n",
            self.measured_at,
            self.cores,
            self.driver.name(),
            self.driver.name(),
            self.duration.as_secs_f64(),
            self.warmup.as_secs_f64(),
            self.driver.method(),
        )?;
        writeln!(out, "Redis: {}.\n", self.redis)?;
        if !self.gateway_settings.is_empty() {
            writeln!(
                out,
                "Gateway settings changed from the defaults: `{}`.\n",
                self.gateway_settings.join("`, `")
            )?;
        }
        writeln!(
            out,
            "| concurrency | stream | target | req/s | p50 ms | p99 ms | errors \
             | gateway CPU-s / 1k req | Redis cmds / req | gateway Redis round trips / req |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|")?;
        for row in &self.rows {
            let r = &row.result;
            let (cpu, commands, round_trips) = match &row.cost {
                Some(cost) => (
                    fixed(row.per_request(cost.cpu_secs * 1000.0), 3),
                    fixed(row.per_request(cost.redis_commands as f64), 2),
                    match cost.round_trips {
                        Some(trips) => fixed(row.per_request(trips), 2),
                        None => "n/a".to_owned(),
                    },
                ),
                None => ("–".to_owned(), "–".to_owned(), "–".to_owned()),
            };
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {cpu} | {commands} | {round_trips} |",
                row.concurrency,
                yes_no(row.stream),
                row.target.label(),
                thousands(r.requests_per_sec().round() as u64),
                fixed(r.p50_ms(), 3),
                fixed(r.p99_ms(), 3),
                r.errors,
            )?;
        }

        writeln!(out, "\n### Gateway against direct, same run\n")?;
        writeln!(
            out,
            "| concurrency | stream | throughput gateway / direct | added p50 ms | added p99 ms |"
        )?;
        writeln!(out, "|---|---|---|---|---|")?;
        for direct in self.rows.iter().filter(|r| r.target == Target::Direct) {
            let Some(gateway) = self.rows.iter().find(|r| {
                r.target == Target::Gateway
                    && r.concurrency == direct.concurrency
                    && r.stream == direct.stream
            }) else {
                continue;
            };
            let (d, g) = (&direct.result, &gateway.result);
            let ratio = if d.requests_per_sec() > 0.0 {
                format!("{:.2}×", g.requests_per_sec() / d.requests_per_sec())
            } else {
                "–".to_owned()
            };
            let added = |p: Percentile| fixed(p(g).zip(p(d)).map(|(g, d)| g - d), 3);
            writeln!(
                out,
                "| {} | {} | {ratio} | {} | {} |",
                direct.concurrency,
                yes_no(direct.stream),
                added(LoadResult::p50_ms),
                added(LoadResult::p99_ms),
            )?;
        }

        self.write_limits(out)?;

        writeln!(out)?;
        writeln!(
            out,
            "- **Gateway memory (VmRSS):** {} before the first run, {} after the last \
             ({:+.1} MiB).",
            mib(self.rss_before_kib),
            mib(self.rss_after_kib),
            (self.rss_after_kib as f64 - self.rss_before_kib as f64) / 1024.0,
        )?;
        let c = &self.conservation;
        let verdict = if c.served == c.stream_len && c.served == c.usage_requests {
            "all equal"
        } else {
            "**MISMATCH**"
        };
        let (verb, source) = match self.driver {
            Driver::Wrk => (
                "counted",
                "its own `meter_gateway_requests_total` on `messages`, any status; ",
            ),
            Driver::Reqwest => ("answered", ""),
        };
        writeln!(
            out,
            "- **Conservation:** the gateway {verb} {} requests ({source}warm-ups and tails \
             included), the stream holds {} events, and `/v1/usage` reports {} requests: \
             {verdict} (polled {:.1} s).",
            thousands(c.served),
            thousands(c.stream_len),
            thousands(c.usage_requests),
            c.waited.as_secs_f64(),
        )?;
        if self.driver == Driver::Wrk {
            writeln!(
                out,
                "  wrk itself counted {} responses: when a wrk process stops it closes its \
                 connections with a request still in flight on each, which the gateway then \
                 finishes or records as a 499 `client_disconnected` event, so wrk falls short \
                 by up to its concurrency per process.",
                thousands(self.client_counted),
            )?;
        }
        writeln!(
            out,
            "- **Redis cmds / req** is the `total_commands_processed` delta over the window, \
             over every client of the private Redis: the gateway and the aggregator consuming at \
             the same time, less the probe's own `INFO` calls. Commands run inside the \
             aggregator's Lua scripts count one each; the per-command lines below split them. \
             The gateway's own count is its `meter_gateway_redis_round_trips_total` counter; \
             n/a means its `/metrics` has none."
        )?;
        writeln!(out, "{}", self.counting_note())?;
        for row in &self.rows {
            let Some(cost) = &row.cost else { continue };
            let parts: Vec<String> = cost
                .by_command
                .iter()
                .filter_map(|(name, calls)| {
                    let per = row.per_request(*calls as f64)?;
                    (per >= 0.005).then(|| format!("`{name}` {per:.2}"))
                })
                .collect();
            writeln!(
                out,
                "- Redis calls / req by command, concurrency {} stream {}: {}",
                row.concurrency,
                yes_no(row.stream),
                if parts.is_empty() {
                    "–".to_owned()
                } else {
                    parts.join(", ")
                },
            )?;
        }
        for row in &self.rows {
            if let Some(error) = &row.result.first_error {
                writeln!(
                    out,
                    "- First error, concurrency {} stream {} {}: {} errors over the whole run; {}",
                    row.concurrency,
                    yes_no(row.stream),
                    row.target.label(),
                    row.result.errors_total,
                    error.replace('\n', " "),
                )?;
            }
        }
        Ok(())
    }
}

impl Report {
    /// What the table's counts and times cover, which differs by driver.
    fn counting_note(&self) -> &'static str {
        match self.driver {
            Driver::Reqwest => {
                "- **req/s, p50, p99** count 2xx responses completed in the window (streams read \
                 to `message_stop`); **errors** are non-2xx, truncated streams and transport \
                 failures in the window. CPU is the gateway's utime + stime over the window."
            }
            Driver::Wrk => {
                "- **req/s** counts the 2xx responses of the measured wrk process over its own \
                 elapsed time; **p50, p99** are wrk's `--latency` distribution over all of its \
                 responses, printed by wrk to two decimals; **errors** are non-2xx responses and \
                 socket errors (connect, read, write, timeout). wrk reads streamed responses to \
                 their end but does not look at bodies, so it does not check them for \
                 `message_stop`. CPU is the gateway's utime + stime from just before the \
                 measured wrk process starts to just after it exits."
            }
        }
    }

    /// Limits on against off, when the run had both.
    fn write_limits(&self, out: &mut String) -> std::fmt::Result {
        let pairs: Vec<(&Row, &Row)> = self
            .rows
            .iter()
            .filter(|r| r.target == Target::GatewayLimited)
            .filter_map(|on| {
                let off = self.rows.iter().find(|r| {
                    r.target == Target::Gateway
                        && r.concurrency == on.concurrency
                        && r.stream == on.stream
                })?;
                Some((off, on))
            })
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        writeln!(out, "\n### Limits on against off, same run\n")?;
        writeln!(
            out,
            "| concurrency | stream | req/s off | req/s on | throughput on / off \
             | p50 off | p50 on | added p50 ms | p99 off | p99 on | added p99 ms |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for (off, on) in pairs {
            let (a, b) = (&off.result, &on.result);
            let ratio = if a.requests_per_sec() > 0.0 {
                format!("{:.3}×", b.requests_per_sec() / a.requests_per_sec())
            } else {
                "–".to_owned()
            };
            let q = |r: &LoadResult, p: Percentile| fixed(p(r), 3);
            let added = |p: Percentile| fixed(p(b).zip(p(a)).map(|(b, a)| b - a), 3);
            writeln!(
                out,
                "| {} | {} | {} | {} | {ratio} | {} | {} | {} | {} | {} | {} |",
                on.concurrency,
                yes_no(on.stream),
                thousands(a.requests_per_sec().round() as u64),
                thousands(b.requests_per_sec().round() as u64),
                q(a, LoadResult::p50_ms),
                q(b, LoadResult::p50_ms),
                added(LoadResult::p50_ms),
                q(a, LoadResult::p99_ms),
                q(b, LoadResult::p99_ms),
                added(LoadResult::p99_ms),
            )?;
        }
        Ok(())
    }
}

/// One of the result's latency percentiles, in milliseconds.
type Percentile = fn(&LoadResult) -> Option<f64>;

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn fixed(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `175412` → `175,412`, the style of BENCHMARKS.md.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_are_separated_by_commas() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(175_412), "175,412");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
