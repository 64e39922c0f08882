//! The Markdown report. Every number in it comes from the one run that produced it.

use std::fmt::Write;
use std::time::Duration;

use crate::catch_up::CatchUp;
use crate::conservation::Check;
use crate::events::{Expected, ModelSpec};
use crate::limited::RequestSummary;
use crate::probes::{KeyShape, Range, WaitSummary};
use crate::stream::{Bare, CHUNK, Preload};

/// Where the run's Redis state lived.
pub struct Topology {
    pub cluster: bool,
    /// Each partition's stream.
    pub streams: Vec<String>,
    /// Each partition's master, an index into `masters`.
    pub placement: Vec<usize>,
    pub masters: Vec<MasterRow>,
    pub replicas: usize,
    /// CPU seconds of all replicas together during the catch-up (replication of the commits).
    pub replica_cpu_catch_up: f64,
    /// Masters that were replicas by the end (a failover during the run), by port.
    pub demoted: Vec<u16>,
    /// The limited-key probe, unless left out.
    pub probe: Option<ProbeSetup>,
}

/// One master's share of the work, CPU in seconds.
pub struct MasterRow {
    pub port: u16,
    pub partitions: Vec<usize>,
    /// Events of those partitions.
    pub events: u64,
    /// The idle phase: the probes' own cost.
    pub cpu_idle: f64,
    pub cpu_bare: f64,
    pub cpu_catch_up: f64,
    pub cpu_replay: Option<f64>,
}

pub struct ProbeSetup {
    /// The probe gateway's `METER_STREAM` (one partition).
    pub stream: String,
    /// The master its key's limiter state is on: partition 0's.
    pub master_port: u16,
    pub limiter_check: Option<LimiterCheck>,
}

/// The key's `requests` window after the idle phase against the requests sent until then:
/// equal when every request ran the limiter script.
pub struct LimiterCheck {
    pub sent: u64,
    pub counted: u64,
}

/// What the probes saw during one phase.
pub struct Phase {
    pub name: &'static str,
    pub wall: Duration,
    pub ping: WaitSummary,
    pub limited: Option<RequestSummary>,
}

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
    /// How long single calls held a master over the aggregator run: (command, calls, p99 µs,
    /// max µs), power-of-two upper bounds (`probes::command_durations`).
    pub command_durations: Vec<(String, u64, u64, u64)>,
    /// What the probes alone cost Redis, from the idle phase.
    pub probe_load: ProbeLoad,
}

/// The probes' own Redis work in the idle phase, when nothing else ran: the gateway's limit
/// scripts, lease releases and `XADD`s show up in every later phase's command counts too, and
/// this is how much of those to take out.
pub struct ProbeLoad {
    /// The limited key's requests and the `PING`s sent in the idle phase.
    pub requests: u64,
    pub pings: u64,
    /// `INFO commandstats` over the idle phase, every master.
    pub commands: Vec<(String, u64, u64)>,
    /// CPU seconds of each master over the idle phase.
    pub cpu: Vec<f64>,
}

impl ProbeLoad {
    /// The probes' estimated (calls, microseconds) of `command` in a phase in which they sent
    /// `requests` requests and `pings` pings: the idle phase's per request (per ping for
    /// `ping`), scaled.
    pub fn share(&self, command: &str, requests: u64, pings: u64) -> (f64, f64) {
        let Some((_, calls, usec)) = self.commands.iter().find(|(name, _, _)| name == command)
        else {
            return (0.0, 0.0);
        };
        let (sent, now) = if command == "ping" {
            (self.pings, pings)
        } else {
            (self.requests, requests)
        };
        if sent == 0 {
            return (0.0, 0.0);
        }
        let scale = now as f64 / sent as f64;
        (*calls as f64 * scale, *usec as f64 * scale)
    }
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
    /// The probes during each phase, the idle one first.
    pub phases: Vec<Phase>,
    pub topology: Topology,
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
    /// Conservation held, and the probe's requests were all answered 200 and all counted by
    /// the limiter.
    pub fn passed(&self) -> bool {
        self.conserved() && self.probe_ok()
    }

    fn conserved(&self) -> bool {
        self.checks
            .iter()
            .chain(self.replay.iter().flat_map(|r| &r.checks))
            .all(Check::ok)
    }

    fn probe_ok(&self) -> bool {
        let all_200 = self
            .phases
            .iter()
            .filter_map(|p| p.limited.as_ref())
            .all(|l| l.failed == 0 && l.counters.failed_open == 0);
        let counted = self
            .topology
            .probe
            .iter()
            .filter_map(|p| p.limiter_check.as_ref())
            .all(|c| c.sent == c.counted);
        all_200 && counted
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
        self.write_topology(out)?;

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
            "| **bare consumer**: `XREADGROUP COUNT {CHUNK}` + `XACK`, no decoding, {} ({} round trips) | {} | {} | **{}** |",
            if self.bare.per_partition.len() > 1 {
                format!(
                    "one reader per partition, {} at once",
                    self.bare.per_partition.len()
                )
            } else {
                "one reader".to_owned()
            },
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
            "| aggregator, first commit seen (at {}, {} committed) → all applied | {} | {} | {} |",
            secs(c.first_seen),
            int(c.first_seen_applied),
            int(steady_events),
            secs(steady_time),
            per_sec(steady_rate)
        )?;
        writeln!(
            out,
            "\nAggregator / bare consumer: **{}** (from process start), {} (from first applied). \
             The aggregator ran {} commit scripts ({:.0} events each on average), retried {} \
             failed consume or commit attempts, and sent {} commits again because cells had \
             changed or were not cached (`meter_commit_conflicts_total`).",
            ratio(total_rate, bare_rate),
            ratio(steady_rate, bare_rate),
            int(c.metrics.batches),
            c.metrics.applied as f64 / c.metrics.batches.max(1) as f64,
            int(c.metrics.errors),
            int(c.metrics.conflicts)
        )?;
        writeln!(
            out,
            "\nThe times are read from Redis: every 100 ms, `XINFO GROUPS` of each partition on \
             connections of our own (the end is when every partition's group has no lag and \
             nothing pending). Meanwhile the aggregator's `/metrics` was scraped, one scrape at a \
             time: {} answered (the slowest in {} ms){}. Its lag and pending gauges read each \
             partition's group from Redis, one after the other, through the aggregator's own \
             connection; a slow scrape waited on that.",
            int(c.scrapes.answered),
            int(c.scrapes.slowest_ms),
            if c.scrapes.timed_out == 0 {
                String::new()
            } else {
                format!(
                    ", **{} got no answer within 10 s**",
                    int(c.scrapes.timed_out)
                )
            }
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
        self.write_masters(out)?;
        if !p.redis_commands.is_empty() {
            let (requests, pings) = self.probe_counts("the aggregator's catch-up");
            writeln!(
                out,
                "\n| Redis command during the aggregator run (all masters) | calls | total ms | the probes' share (est.): calls / ms | rest: µs per call | rest: µs per event |\n|---|---:|---:|---:|---:|---:|"
            )?;
            for (name, calls, usec) in p.redis_commands.iter().take(12) {
                let (probe_calls, probe_usec) = p.probe_load.share(name, requests, pings);
                let rest_calls = (*calls as f64 - probe_calls).max(0.0);
                let rest_usec = (*usec as f64 - probe_usec).max(0.0);
                writeln!(
                    out,
                    "| `{name}` | {calls} | {:.1} | {:.0} / {:.1} | {} | {:.3} |",
                    *usec as f64 / 1e3,
                    probe_calls,
                    probe_usec / 1e3,
                    // Below a few percent of the calls the rest is the estimate's error.
                    if rest_calls >= 1.0 && rest_calls >= 0.05 * *calls as f64 {
                        format!("{:.2}", rest_usec / rest_calls)
                    } else {
                        "–".to_owned()
                    },
                    rest_usec / n.max(1) as f64,
                )?;
            }
            writeln!(
                out,
                "\nThe probes' share is the idle phase's commands ({} limited requests, {} pings, \
                 nothing else running) scaled to this phase's {requests} requests and {pings} \
                 pings; *rest* is the aggregator's (and, on a cluster, its replication's) work.",
                p.probe_load.requests, p.probe_load.pings
            )?;
        }
        if !p.command_durations.is_empty() {
            writeln!(
                out,
                "\nHow long one call held a master during the aggregator run (`LATENCY HISTOGRAM`, all \
                 masters; Redis keeps power-of-two buckets, so each figure is an upper bound within \
                 2×, and it is time inside Redis: what a command arriving meanwhile waits, apart \
                 from time the machine did not run Redis at all):\n\n\
                 | command | calls | p99 µs ≤ | max µs ≤ |\n|---|---:|---:|---:|"
            )?;
            for (name, calls, p99, max) in p.command_durations.iter().take(8) {
                writeln!(out, "| `{name}` | {calls} | {p99} | {max} |")?;
            }
        }
        self.write_probes(out)?;

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
                let (requests, pings) = self.probe_counts("the replay");
                let (probe_calls, probe_usec) =
                    self.cpu.probe_load.share("evalsha", requests, pings);
                let rest_calls = (calls as f64 - probe_calls).max(1.0);
                let rest_usec = (usec as f64 - probe_usec).max(0.0);
                writeln!(
                    out,
                    "Redis ran {calls} scripts (`EVALSHA`) meanwhile, about {probe_calls:.0} of \
                     them ({:.1} ms) the probe's limit checks; the rest (the replay's commits and \
                     switch, and live commits if any): {:.1} ms each on average, {:.2} µs per \
                     event in all.\n",
                    probe_usec / 1e3,
                    rest_usec / 1e3 / rest_calls,
                    rest_usec / n.max(1) as f64,
                )?;
            }
            checks_table(out, "check after the switch", &replay.checks)?;
        }
        writeln!(
            out,
            "\nResult: **{}**",
            match (self.conserved(), self.probe_ok()) {
                (true, true) => "OK",
                (false, true) => "MISMATCH",
                (true, false) => "conservation OK, but the probe failed (see above)",
                (false, false) => "MISMATCH, and the probe failed (see above)",
            }
        )
    }

    fn write_topology(&self, out: &mut String) -> std::fmt::Result {
        let t = &self.topology;
        writeln!(
            out,
            "## Topology
"
        )?;
        if t.cluster {
            writeln!(
                out,
                "Redis Cluster on loopback: {} masters and {} replicas (`redis-server` processes \
                 of their own, `--cluster-replicas 1`), on the same cores as everything else. The \
                 aggregator and the replay get every node as a seed (`REDIS_URL`), \
                 `METER_PARTITIONS={}`.",
                t.masters.len(),
                t.replicas,
                t.streams.len()
            )?;
        } else {
            writeln!(
                out,
                "One `redis-server`, `METER_PARTITIONS={}`.",
                t.streams.len()
            )?;
        }
        if !t.demoted.is_empty() {
            writeln!(
                out,
                "\n**A failover happened during the run**: the masters on ports {:?} were \
                 replicas by the end, so the per-master figures below are unreliable.",
                t.demoted
            )?;
        }
        writeln!(
            out,
            "\n| partition | stream | master | events | bare reader events/s | aggregator: all committed at |"
        )?;
        writeln!(out, "|---:|---|---:|---:|---:|---:|")?;
        for (p, stream) in t.streams.iter().enumerate() {
            let master = t.placement.get(p).and_then(|&m| t.masters.get(m));
            let (wall, acked) = self.bare.per_partition.get(p).copied().unwrap_or_default();
            let done = self
                .catch_up
                .partition_done
                .get(p)
                .copied()
                .flatten()
                .map_or_else(|| "?".to_owned(), secs);
            writeln!(
                out,
                "| {p} | `{stream}` | {} | {} | {} | {done} |",
                master.map_or_else(|| "?".to_owned(), |m| m.port.to_string()),
                int(self.preload.per_partition.get(p).copied().unwrap_or(0)),
                per_sec(rate(acked, wall)),
            )?;
        }
        if t.masters.len() > 1 {
            writeln!(
                out,
                "\nPartition `p` is stream `{}:p`, a hash tag of its own; where that tag's slot \
                 lands is the cluster's doing, not forced. Events go to `crc32(key_id) % N`, and \
                 the keys are skewed (a few heavy ones), so partitions differ in size.",
                t.streams
                    .first()
                    .and_then(|s| s.rsplit_once(':'))
                    .map_or("", |(base, _)| base)
            )?;
        }
        writeln!(out)
    }

    /// The limited requests and pings the probes sent during the phase called `name`.
    fn probe_counts(&self, name: &str) -> (u64, u64) {
        self.phases
            .iter()
            .find(|p| p.name == name)
            .map_or((0, 0), |p| {
                (
                    p.limited.as_ref().map_or(0, |l| l.latency.pings as u64),
                    p.ping.pings as u64,
                )
            })
    }

    /// Redis CPU per master: what each one spent on its partitions' events.
    fn write_masters(&self, out: &mut String) -> std::fmt::Result {
        let t = &self.topology;
        let replay = t.masters.iter().any(|m| m.cpu_replay.is_some());
        writeln!(
            out,
            "\n| Redis master | partitions | events | CPU s, idle phase ({:.1} s, probes only) | CPU s, bare consumer | µs per event | CPU s, catch-up | **µs per event** |{}",
            self.phases.first().map_or(0.0, |p| p.wall.as_secs_f64()),
            if replay {
                " CPU s, replay | µs per event |"
            } else {
                ""
            }
        )?;
        writeln!(
            out,
            "|---:|---|---:|---:|---:|---:|---:|---:|{}",
            if replay { "---:|---:|" } else { "" }
        )?;
        let per_event = |cpu: f64, events: u64| {
            if events == 0 {
                "–".to_owned()
            } else {
                format!("{:.2}", cpu * 1e6 / events as f64)
            }
        };
        let row = |out: &mut String,
                   name: String,
                   partitions: String,
                   events: u64,
                   [idle, bare, catch_up]: [f64; 3],
                   replay_cpu: Option<f64>|
         -> std::fmt::Result {
            write!(
                out,
                "| {name} | {partitions} | {} | {idle:.2} | {bare:.1} | {} | {catch_up:.1} | **{}** |",
                int(events),
                per_event(bare, events),
                per_event(catch_up, events),
            )?;
            if replay {
                let cpu = replay_cpu.unwrap_or(0.0);
                write!(out, " {cpu:.1} | {} |", per_event(cpu, events))?;
            }
            writeln!(out)
        };
        for m in &t.masters {
            let partitions = if m.partitions.is_empty() {
                "none".to_owned()
            } else {
                m.partitions
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            row(
                out,
                m.port.to_string(),
                partitions,
                m.events,
                [m.cpu_idle, m.cpu_bare, m.cpu_catch_up],
                m.cpu_replay,
            )?;
        }
        if t.masters.len() > 1 {
            let sum = |f: fn(&MasterRow) -> f64| t.masters.iter().map(f).sum::<f64>();
            row(
                out,
                "**all masters**".to_owned(),
                "all".to_owned(),
                t.masters.iter().map(|m| m.events).sum(),
                [
                    sum(|m| m.cpu_idle),
                    sum(|m| m.cpu_bare),
                    sum(|m| m.cpu_catch_up),
                ],
                replay.then(|| sum(|m| m.cpu_replay.unwrap_or(0.0))),
            )?;
        }
        if t.replicas > 0 {
            writeln!(
                out,
                "\nThe {} replicas together used {:.1} s of CPU during the catch-up ({:.2} µs per \
                 event), applying what their masters replicated.",
                t.replicas,
                t.replica_cpu_catch_up,
                t.replica_cpu_catch_up * 1e6 / self.workload.events.max(1) as f64
            )?;
        }
        Ok(())
    }

    fn write_probes(&self, out: &mut String) -> std::fmt::Result {
        if self.phases.is_empty() {
            return Ok(());
        }
        let t = &self.topology;
        let watched = t
            .placement
            .first()
            .and_then(|&m| t.masters.get(m))
            .map_or(0, |m| m.port);
        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
        let added = |d: Duration, idle: Duration| {
            format!("{:+.2}", (d.as_secs_f64() - idle.as_secs_f64()) * 1e3)
        };
        writeln!(
            out,
            "\n## Redis responsiveness\n\nOn the master of partition 0{}: another client's \
             `PING` every 5 ms on a connection of its own{}. Redis runs one command at a time, so \
             every other client waits while a commit script runs. *Added* is the phase's figure \
             minus the idle phase's.\n",
            if t.cluster {
                format!(" (port {watched})")
            } else {
                String::new()
            },
            if t.probe.is_some() {
                ", and a limited key's request through a gateway every 5 ms (below)"
            } else {
                " (the limited key's requests were left out: `--no-limited-probe`)"
            }
        )?;
        let idle = &self.phases[0];
        writeln!(
            out,
            "| `PING` during | s | pings | errors | p50 ms | p99 ms | max ms | added p50 ms | added p99 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        for phase in &self.phases {
            let w = &phase.ping;
            writeln!(
                out,
                "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
                phase.name,
                phase.wall.as_secs_f64(),
                int(w.pings as u64),
                w.errors,
                ms(w.p50),
                ms(w.p99),
                ms(w.max),
                added(w.p50, idle.ping.p50),
                added(w.p99, idle.ping.p99),
            )?;
        }
        let (Some(probe), Some(idle_limited)) = (&t.probe, &idle.limited) else {
            return Ok(());
        };
        writeln!(
            out,
            "\n### A limited key's requests\n\nThe release `gateway` and `mock-upstream` \
             (canned answers) run against the same Redis as a deployment of their own: \
             `METER_STREAM={}`, one partition, a name chosen so that its slot, and with it the \
             key's limiter state, is on the master of partition 0{}. Nobody consumes its events. \
             The key has a `requests` window (60 s), `tokens` and `cost_usd` windows, a budget \
             and `max_concurrency`, none reachable, so each request runs the full limit script. \
             One non-streamed `/v1/messages` at a time, one every 5 ms, timed from sending until \
             the whole body has arrived.\n",
            probe.stream,
            if t.cluster {
                format!(" (port {})", probe.master_port)
            } else {
                String::new()
            }
        )?;
        let settings = crate::limited::passed_through();
        if !settings.is_empty() {
            writeln!(
                out,
                "The probe's gateway ran with {} (from aggbench's environment).\n",
                settings
                    .iter()
                    .map(|(k, v)| format!("`{k}={v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        if let Some(c) = &probe.limiter_check {
            writeln!(
                out,
                "Limiter check: after the idle phase the key's `requests` window (read through \
                 `GET /admin/keys/{{id}}`) counted **{}** of the {} requests sent so far (the \
                 preflight and the idle phase): {}.\n",
                int(c.counted),
                int(c.sent),
                if c.sent == c.counted {
                    "every request ran the limit script"
                } else {
                    "**NOT every request was counted**"
                }
            )?;
        }
        writeln!(
            out,
            "| requests during | requests | non-200 | p50 ms | p99 ms | max ms | added p50 ms | **added p99 ms** | Redis round trips per request | spend sums read / cached | failed open | gateway + mock CPU s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        let mut failures = Vec::new();
        for phase in &self.phases {
            let Some(l) = &phase.limited else {
                continue;
            };
            let w = &l.latency;
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | **{}** | {:.2} | {} / {} | {} | {:.1} |",
                phase.name,
                int(w.pings as u64),
                if l.failed == 0 {
                    "0".to_owned()
                } else {
                    format!("**{}**", l.failed)
                },
                ms(w.p50),
                ms(w.p99),
                ms(w.max),
                added(w.p50, idle_limited.latency.p50),
                added(w.p99, idle_limited.latency.p99),
                l.counters.round_trips as f64 / (w.pings as f64).max(1.0),
                int(l.counters.spend_reads),
                int(l.counters.spend_cached),
                l.counters.failed_open,
                l.cpu_secs,
            )?;
            if let Some(first) = &l.first_failure {
                failures.push((phase.name, first));
            }
        }
        writeln!(
            out,
            "\nRound trips are the gateway's `meter_gateway_redis_round_trips_total` over the \
             phase: the limit script, the lease release and the publisher's `XADD`s, all on that \
             master, and now and then a read of the key's record. *Failed open* counts checks \
             Redis did not answer in time (admitted unchecked); it must be 0 for the figures to \
             mean anything. The gateway and the mock run on the same two cores as the \
             aggregator: their CPU is taken from it."
        )?;
        for (phase, first) in failures {
            writeln!(out, "\nFirst failed request during {phase}: `{first}`")?;
        }
        writeln!(
            out,
            "\nThe slowest requests of each phase, in the order sent, as *start s: ms*:\n"
        )?;
        for phase in &self.phases {
            let Some(l) = &phase.limited else {
                continue;
            };
            writeln!(
                out,
                "- {}: {}",
                phase.name,
                l.slowest
                    .iter()
                    .map(|(at, latency)| format!(
                        "{:.2}: {:.1}",
                        at.as_secs_f64(),
                        latency.as_secs_f64() * 1e3
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        Ok(())
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
