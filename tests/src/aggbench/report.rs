//! The Markdown report. Every number in it comes from the one run that produced it.

use std::fmt::Write;
use std::time::Duration;

use crate::catch_up::CatchUp;
use crate::conservation::Check;
use crate::events::{Expected, ModelSpec};
use crate::probes::{KeyShape, Range, WaitSummary};
use crate::stream::{Bare, CHUNK, Preload};

pub struct Workload {
    pub events: u64,
    pub seed: u64,
    pub keys: u32,
    pub spread: Duration,
    pub shuffled_ts: bool,
    /// Each model, and whether the bundled table prices it.
    pub models: Vec<(&'static ModelSpec, bool)>,
    pub expected: Expected,
}

/// Redis `used_memory` at the phase boundaries, bytes.
pub struct RedisMemory {
    pub empty: u64,
    pub after_preload: u64,
    pub after_bare: u64,
    pub after_aggregator: u64,
    /// What Redis holds at the end, by key shape, largest first.
    pub by_key_shape: Vec<KeyShape>,
}

/// CPU seconds.
pub struct Cpu {
    pub redis_during_bare: f64,
    pub redis_during_aggregator: f64,
    /// The aggregator process over its whole life so far, startup included.
    pub aggregator: f64,
    /// Redis `INFO commandstats` over the aggregator run: (command, calls, microseconds), most
    /// time first. Commands a script runs are counted under their own names too.
    pub redis_commands: Vec<(String, u64, u64)>,
}

pub struct Report {
    pub measured_at: String,
    pub cores: usize,
    pub redis_version: String,
    pub workload: Workload,
    pub preload: Preload,
    pub bare: Bare,
    pub catch_up: CatchUp,
    pub redis_memory: RedisMemory,
    pub cpu: Cpu,
    pub checks: Vec<Check>,
    /// `--replay`: the replay's run and the checks repeated after its switch.
    pub replay: Option<ReplayRun>,
    /// Another client's `PING` round trips during each phase.
    pub waits: Vec<(&'static str, WaitSummary)>,
}

pub struct ReplayRun {
    pub wall: std::time::Duration,
    /// Scripts Redis ran meanwhile (the replay's commits, its switch, and live commits, if
    /// any): calls and microseconds.
    pub scripts: Option<(u64, u64)>,
    /// The replay's own summary (stdout).
    pub summary: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks
            .iter()
            .chain(self.replay.iter().flat_map(|r| &r.checks))
            .all(Check::ok)
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) -> std::fmt::Result {
        let w = &self.workload;
        let n = w.events;
        writeln!(out, "# Aggregator throughput (`aggbench`)\n")?;
        writeln!(
            out,
            "Measured {} on {} cores, Redis {} (private, no persistence), loopback; one run, \
             every number below is from it. Other work on the machine may have shared the cores.\n",
            self.measured_at, self.cores, self.redis_version
        )?;

        writeln!(out, "## Workload\n")?;
        let e = &w.expected;
        let share = |k: u64| 100.0 * k as f64 / n.max(1) as f64;
        let status = e
            .by_status
            .iter()
            .map(|(s, k)| format!("{s}: {} ({:.1} %)", int(*k), share(*k)))
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            out,
            "- {} events (seed {}), {} keys (skewed), {} models, 3 upstream accounts; ids `bench-<i>`",
            int(n),
            w.seed,
            w.keys,
            w.models.len()
        )?;
        if w.shuffled_ts {
            writeln!(
                out,
                "- `ts` = generation time minus U[0, {} s], in no order (`--shuffled-ts`): every \
                 batch touches every minute of the last {} minutes",
                w.spread.as_secs(),
                w.spread.as_secs_f64() / 60.0
            )?;
        } else {
            writeln!(
                out,
                "- `ts` rises with the stream position over the last {} s, each up to 2 s early \
                 (a request starts before its event is written): live traffic in arrival order",
                w.spread.as_secs(),
            )?;
        }
        writeln!(
            out,
            "- status {status}; {:.1} % streamed; {:.0} bytes per encoded event",
            share(e.streams),
            e.encoded_bytes as f64 / n.max(1) as f64
        )?;
        writeln!(
            out,
            "\n| model | provider / endpoints | priced | events | input tokens | output tokens | cost USD |"
        )?;
        writeln!(out, "|---|---|---|---:|---:|---:|---:|")?;
        for (model, priced) in &w.models {
            let t = e.by_model.get(model.name).copied().unwrap_or_default();
            writeln!(
                out,
                "| `{}` | {} / {} | {} | {} | {} | {} | {} |",
                model.name,
                model.provider,
                model.endpoints.join(", "),
                if *priced { "yes" } else { "no" },
                int(t.requests),
                int(t.input_tokens),
                int(t.output_tokens),
                t.cost
            )?;
        }

        writeln!(out, "\n## Throughput\n")?;
        let bare_rate = rate(self.bare.acked, self.bare.wall);
        let c = &self.catch_up;
        let total_rate = rate(n, c.total);
        let (steady_time, steady_events, _) = c.steady();
        let steady_rate = rate(steady_events, steady_time);
        writeln!(out, "| phase | events | time | events/s |")?;
        writeln!(out, "|---|---:|---:|---:|")?;
        writeln!(
            out,
            "| preload: pipelined `XADD` ×{CHUNK}, incl. generating + encoding | {} | {} | {} |",
            int(n),
            secs(self.preload.wall),
            per_sec(rate(n, self.preload.wall))
        )?;
        writeln!(
            out,
            "| preload: time waiting on Redis only | {} | {} | {} |",
            int(n),
            secs(self.preload.redis_wait),
            per_sec(rate(n, self.preload.redis_wait))
        )?;
        writeln!(
            out,
            "| **bare consumer**: `XREADGROUP COUNT {CHUNK}` + `XACK`, no decoding ({} round trips) | {} | {} | **{}** |",
            int(self.bare.round_trips),
            int(self.bare.acked),
            secs(self.bare.wall),
            per_sec(bare_rate)
        )?;
        writeln!(
            out,
            "| **aggregator**, process start → all applied | {} | {} | **{}** |",
            int(n),
            secs(c.total),
            per_sec(total_rate)
        )?;
        writeln!(
            out,
            "| aggregator, first applied seen (at {}, {} applied) → all applied | {} | {} | {} |",
            secs(c.first_seen),
            int(c.first_seen_applied),
            int(steady_events),
            secs(steady_time),
            per_sec(steady_rate)
        )?;
        writeln!(
            out,
            "\nAggregator / bare consumer: **{}** (from process start), {} (from first applied). \
             The aggregator committed {} batches ({:.0} events each on average), retried {} \
             failed consume or commit attempts, and sent {} commits again because cells had \
             changed or were not cached (`meter_commit_conflicts_total`).",
            ratio(total_rate, bare_rate),
            ratio(steady_rate, bare_rate),
            int(c.metrics.batches),
            c.metrics.applied as f64 / c.metrics.batches.max(1) as f64,
            int(c.metrics.errors),
            int(c.metrics.conflicts)
        )?;

        writeln!(out, "\n## Resources\n")?;
        writeln!(
            out,
            "| sampled every second, first applied batch → end | min | max | last | samples |"
        )?;
        writeln!(out, "|---|---:|---:|---:|---:|")?;
        row_mib(out, "aggregator RSS (MiB)", &c.rss_kib, 1024)?;
        row_mib(
            out,
            "Redis `used_memory` (MiB)",
            &c.redis_memory,
            1024 * 1024,
        )?;
        let m = &self.redis_memory;
        writeln!(
            out,
            "\nRedis `used_memory`: empty {}, after preload {}, after the bare consumer {}, after the aggregator {} \
             (+{} for the aggregator's state; see below).",
            mib(m.empty),
            mib(m.after_preload),
            mib(m.after_bare),
            mib(m.after_aggregator),
            mib(m.after_aggregator.saturating_sub(m.after_bare))
        )?;
        writeln!(
            out,
            "\n| Redis keys at the end, by name shape (`MEMORY USAGE`) | keys | MiB | bytes per event |"
        )?;
        writeln!(out, "|---|---:|---:|---:|")?;
        for k in m.by_key_shape.iter().take(12) {
            writeln!(
                out,
                "| `{}` | {} | {:.1} | {:.0} |",
                k.shape,
                int(k.keys),
                k.bytes as f64 / (1024.0 * 1024.0),
                k.bytes as f64 / n.max(1) as f64
            )?;
        }
        if m.by_key_shape.len() > 12 {
            let rest = &m.by_key_shape[12..];
            writeln!(
                out,
                "| {} other shapes | {} | {:.1} | {:.0} |",
                rest.len(),
                int(rest.iter().map(|k| k.keys).sum()),
                rest.iter().map(|k| k.bytes).sum::<u64>() as f64 / (1024.0 * 1024.0),
                rest.iter().map(|k| k.bytes).sum::<u64>() as f64 / n.max(1) as f64
            )?;
        }
        let p = &self.cpu;
        writeln!(
            out,
            "\nCPU: aggregator {:.1} s in total ({:.1} µs per event, startup included); Redis {:.1} s \
             during the bare consumer ({:.2} µs per event) and {:.1} s during the aggregator run ({:.2} µs per event).",
            p.aggregator,
            p.aggregator * 1e6 / n.max(1) as f64,
            p.redis_during_bare,
            p.redis_during_bare * 1e6 / n.max(1) as f64,
            p.redis_during_aggregator,
            p.redis_during_aggregator * 1e6 / n.max(1) as f64,
        )?;
        if !p.redis_commands.is_empty() {
            writeln!(
                out,
                "\n| Redis command during the aggregator run | calls | total ms | µs per call | µs per event |\n|---|---:|---:|---:|---:|"
            )?;
            for (name, calls, usec) in p.redis_commands.iter().take(12) {
                writeln!(
                    out,
                    "| `{name}` | {calls} | {:.1} | {:.2} | {:.3} |",
                    *usec as f64 / 1e3,
                    *usec as f64 / (*calls).max(1) as f64,
                    *usec as f64 / n.max(1) as f64,
                )?;
            }
        }

        if !self.waits.is_empty() {
            writeln!(
                out,
                "\n## Redis responsiveness\n\nAnother client's `PING` every 5 ms on a connection \
                 of its own: what any other client of this Redis (the gateway's limiter, say) waits \
                 while a commit script runs.\n\n| during | pings | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|"
            )?;
            let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
            for (phase, w) in &self.waits {
                writeln!(
                    out,
                    "| {phase} | {} | {} | {} | {} |",
                    w.pings,
                    ms(w.p50),
                    ms(w.p99),
                    ms(w.max)
                )?;
            }
        }

        writeln!(
            out,
            "\n## Conservation (`GET /v1/usage?group_by=model` and `/metrics`)\n"
        )?;
        checks_table(out, "check", &self.checks)?;
        if let Some(replay) = &self.replay {
            writeln!(
                out,
                "\n## Replay (`aggregator replay`, unchanged prices, live aggregator running)\n"
            )?;
            writeln!(
                out,
                "Wall time {:.2} s: **{:.0} events/s** over the {n} events.\n\n```text\n{}```\n",
                replay.wall.as_secs_f64(),
                n as f64 / replay.wall.as_secs_f64().max(1e-9),
                replay.summary
            )?;
            if let Some((calls, usec)) = replay.scripts {
                writeln!(
                    out,
                    "Redis ran {calls} scripts meanwhile (the replay's commits and switch): {:.1} ms \
                     each on average, {:.2} µs per event in all.\n",
                    usec as f64 / 1e3 / calls.max(1) as f64,
                    usec as f64 / n.max(1) as f64,
                )?;
            }
            checks_table(out, "check after the switch", &replay.checks)?;
        }
        writeln!(
            out,
            "\nResult: **{}**",
            if self.passed() { "OK" } else { "MISMATCH" }
        )
    }
}

fn checks_table(out: &mut String, header: &str, checks: &[Check]) -> std::fmt::Result {
    writeln!(out, "| {header} | expected | actual | |")?;
    writeln!(out, "|---|---:|---:|---|")?;
    for check in checks {
        writeln!(
            out,
            "| {} | {} | {} | {} |",
            check.what,
            check.expected,
            check.actual,
            if check.ok() { "OK" } else { "**MISMATCH**" }
        )?;
    }
    Ok(())
}

/// A row of samples in MiB; `per_mib` is how many sample units make one MiB.
fn row_mib(out: &mut String, name: &str, r: &Range, per_mib: u64) -> std::fmt::Result {
    let v = |x: u64| format!("{:.1}", x as f64 / per_mib as f64);
    writeln!(
        out,
        "| {name} | {} | {} | {} | {} |",
        v(r.min),
        v(r.max),
        v(r.last),
        r.count
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn rate(events: u64, time: Duration) -> Option<f64> {
    let secs = time.as_secs_f64();
    (events > 0 && secs > 0.0).then(|| events as f64 / secs)
}

fn per_sec(rate: Option<f64>) -> String {
    rate.map_or_else(|| "n/a".into(), |r| int(r.round() as u64))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `1234567` → `1,234,567`.
fn int(n: u64) -> String {
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
    #[test]
    fn integers_get_thousands_separators() {
        assert_eq!(super::int(0), "0");
        assert_eq!(super::int(999), "999");
        assert_eq!(super::int(1_000), "1,000");
        assert_eq!(super::int(1_234_567), "1,234,567");
    }
}
