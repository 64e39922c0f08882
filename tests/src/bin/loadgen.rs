//! `loadgen`: the gateway's load harness, a benchmark rather than a test.
//!
//! One invocation starts a private Redis, the mock upstream, the aggregator and the gateway as
//! child processes on free loopback ports, then runs closed-loop load for concurrency {1, 32} ×
//! {non-streaming, streaming} × {direct to the mock, through the gateway}, and prints one
//! Markdown report: throughput, exact p50/p99, errors, the gateway's CPU per request, Redis
//! commands per request, its memory before and after, and a conservation check that every
//! request the gateway answered reached the stream and the aggregator's totals. Every number in
//! the report is measured in that one run. It stops by itself: about 8 × (1 s + duration) plus at
//! most 30 s of waiting for the aggregator.
//!
//! ```text
//! cargo run --release -p tests --bin loadgen -- [--duration-secs 10] [--limits] [--out FILE.md]
//!     [--spend-cache-ms N]
//! ```
//!
//! With `--limits`, every gateway run is repeated right after with a second key that has a
//! requests window, token and cost windows, a budget and `max_concurrency`, all out of the
//! load's reach, so each request pays for the whole limit check and is admitted; the report
//! then compares limits on and off.
//!
//! Layout, in the order this file uses them: `processes` (the binaries and the guard that kills
//! the children), `deployment` (starting and provisioning the servers), `load` (the closed
//! loop), `probes` (`/proc`, Redis counters, `/metrics`) and `report` (Markdown).

#[path = "../loadgen/deployment.rs"]
mod deployment;
#[path = "../loadgen/load.rs"]
mod load;
#[path = "../loadgen/probes.rs"]
mod probes;
#[path = "../loadgen/processes.rs"]
mod processes;
#[path = "../loadgen/report.rs"]
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use crate::deployment::Deployment;
use crate::load::LoadSpec;
use crate::processes::{Binaries, Children};
use crate::report::{GatewayCost, Report, Row, Target};

#[derive(Debug, Parser)]
#[command(about = "Load harness: the gateway against direct calls to the mock upstream")]
struct Args {
    /// Measured seconds per run; each run first warms up for 1 s.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run `cargo build --release` for the binaries even when they are already there.
    #[arg(long)]
    rebuild: bool,
    /// Also run every gateway row with a key that has every kind of limit (requests, tokens and
    /// cost windows, budget, max_concurrency), none reachable, and compare limits on and off.
    #[arg(long)]
    limits: bool,
    /// Run the gateway with this `--spend-cache-ms` instead of its default (0 reads the spend
    /// counters on every request, as before the cache).
    #[arg(long)]
    spend_cache_ms: Option<u64>,
}

const WARMUP: Duration = Duration::from_secs(1);
const CONCURRENCIES: [usize; 2] = [1, 32];
/// How long the aggregator may take to count the last events.
const CONSERVATION_WAIT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.duration_secs == 0 {
        bail!("--duration-secs must be at least 1");
    }
    let binaries = Binaries::locate(args.rebuild)?;
    // Losing the race to a signal drops `bench`, and with it the `Children` guard that kills
    // every server it started and the load tasks' `JoinSet`.
    let markdown = tokio::select! {
        markdown = bench(&args, &binaries) => markdown?,
        () = shutdown_signal() => bail!("interrupted; the child processes were stopped"),
    };
    print!("{markdown}");
    if let Some(path) = &args.out {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("loadgen: report written to {}", path.display());
    }
    Ok(())
}

async fn bench(args: &Args, binaries: &Binaries) -> anyhow::Result<String> {
    let mut children = Children::new()?;
    let gateway_settings: Vec<(&'static str, String)> = args
        .spend_cache_ms
        .map(|ms| ("GATEWAY_SPEND_CACHE_MS", ms.to_string()))
        .into_iter()
        .collect();
    let mut deployment = Deployment::start(&mut children, binaries, &gateway_settings).await?;
    let key = deployment.provision().await?;
    let mut served = deployment.preflight(&key).await?;
    let limited = if args.limits {
        let limited = deployment.provision_limited().await?;
        served += deployment.preflight(&limited).await?;
        Some(limited)
    } else {
        None
    };
    let mut targets = vec![Target::Direct, Target::Gateway];
    if limited.is_some() {
        targets.push(Target::GatewayLimited);
    }

    let duration = Duration::from_secs(args.duration_secs);
    let hz = probes::clock_ticks_per_sec();
    let rss_before_kib = probes::rss_kib(deployment.gateway_pid)?;
    let mut rows = Vec::new();
    for concurrency in CONCURRENCIES {
        for stream in [false, true] {
            for &target in &targets {
                let api_key = match target {
                    Target::Direct => "sk-mock",
                    Target::Gateway => &key,
                    Target::GatewayLimited => limited.as_deref().unwrap_or(&key),
                };
                let row = run(
                    &mut deployment,
                    api_key,
                    concurrency,
                    stream,
                    target,
                    duration,
                    hz,
                )
                .await
                .with_context(|| {
                    format!("run: concurrency {concurrency}, stream {stream}, {target:?}")
                })?;
                children.check_alive()?;
                if target != Target::Direct {
                    served += row.result.responses;
                }
                rows.push(row);
            }
        }
    }
    let rss_after_kib = probes::rss_kib(deployment.gateway_pid)?;
    eprintln!("loadgen: waiting for the aggregator to count {served} requests …");
    let conservation = deployment.conservation(served, CONSERVATION_WAIT).await?;
    children.finish_cleanly();
    let report = Report {
        measured_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        warmup: WARMUP,
        duration,
        rows,
        rss_before_kib,
        rss_after_kib,
        conservation,
        gateway_settings: gateway_settings
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect(),
    };
    Ok(report.markdown())
}

/// `INFO` calls of one [`GatewaySample`] that a delta between two samples includes.
const PROBE_INFO_CALLS: u64 = 2;

/// Readings taken at both ends of a gateway run's window.
struct GatewaySample {
    cpu_ticks: u64,
    redis_commands: u64,
    command_calls: BTreeMap<String, u64>,
    round_trips: Option<f64>,
}

impl GatewaySample {
    async fn take(d: &mut Deployment) -> anyhow::Result<Self> {
        Ok(Self {
            cpu_ticks: probes::cpu_ticks(d.gateway_pid)?,
            redis_commands: d.redis.commands_processed().await?,
            command_calls: d.redis.command_calls().await?,
            round_trips: probes::gateway_round_trips(&d.control, &d.gateway).await,
        })
    }

    fn cost_since(&self, before: &Self, hz: u64) -> GatewayCost {
        GatewayCost {
            cpu_secs: self.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / hz as f64,
            // Redis counts a command after replying to it, so both deltas include exactly two
            // of the probe's own `INFO` calls: the first sample's two, not the second's.
            redis_commands: (self.redis_commands.saturating_sub(before.redis_commands))
                .saturating_sub(PROBE_INFO_CALLS),
            by_command: by_command(&before.command_calls, &self.command_calls),
            round_trips: self.round_trips.zip(before.round_trips).map(|(a, b)| a - b),
        }
    }
}

/// Per-command call deltas, most called first, without the probe's own `INFO` calls.
fn by_command(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut delta: Vec<(String, u64)> = after
        .iter()
        .map(|(name, &n)| {
            let probe = u64::from(name == "info") * PROBE_INFO_CALLS;
            let was = before.get(name).copied().unwrap_or(0);
            (name.clone(), n.saturating_sub(was).saturating_sub(probe))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    delta.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    delta
}

async fn run(
    d: &mut Deployment,
    api_key: &str,
    concurrency: usize,
    stream: bool,
    target: Target,
    duration: Duration,
    hz: u64,
) -> anyhow::Result<Row> {
    let base = match target {
        Target::Direct => &d.mock,
        Target::Gateway | Target::GatewayLimited => &d.gateway,
    };
    eprintln!("loadgen: concurrency {concurrency:>2}, stream {stream:<5}, {target:?} …");
    let running = load::start(&LoadSpec {
        url: format!("{base}/v1/messages"),
        api_key: api_key.to_owned(),
        stream,
        concurrency,
        warmup: WARMUP,
        duration,
    })?;
    let cost = if target != Target::Direct {
        tokio::time::sleep_until(running.start).await;
        let before = GatewaySample::take(d).await?;
        tokio::time::sleep_until(running.end).await;
        let after = GatewaySample::take(d).await?;
        Some(after.cost_since(&before, hz))
    } else {
        None
    };
    let result = running.finish().await?;
    Ok(Row {
        concurrency,
        stream,
        target,
        result,
        cost,
    })
}

/// Resolves on SIGINT or SIGTERM; a handler that cannot be installed never fires.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
