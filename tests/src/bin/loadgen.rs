//! `loadgen`: the gateway's load harness, a benchmark rather than a test.
//!
//! One invocation starts a private Redis, the mock upstream, the aggregator and the gateway as
//! child processes on free loopback ports, then runs closed-loop load for concurrency {1, 32} ×
//! {non-streaming, streaming} × {direct to the mock, through the gateway}, and prints one
//! Markdown report: throughput, p50/p99, errors, the gateway's CPU per request, Redis commands
//! per request, its memory before and after, and a conservation check that every request the
//! gateway answered reached the stream and the aggregator's totals. Every number in the report
//! is measured in that one run. It stops by itself: about 8 × (1 s + duration) plus at most 30 s
//! of waiting for the aggregator.
//!
//! ```text
//! cargo run --release -p tests --bin loadgen -- [--duration-secs 10] [--limits] [--out FILE.md]
//!     [--spend-cache-ms N] [--driver auto|wrk|reqwest] [--cluster PARTITIONS]
//! cargo run --release -p tests --bin loadgen -- --streams 2000 [--stream-events 20]
//!     [--stream-interval-ms 500] [--stream-ramp-ms 2000]
//! ```
//!
//! With `--streams N`, it runs the streaming-capacity run instead (`streams.rs`): N concurrent
//! long SSE streams through the gateway, then through one nginx hop with `proxy_buffering off`
//! (`nginx.rs`; `apt-get install nginx-light`) to the same mock, and reports RSS per open stream
//! and CPU per relayed event for both, and the conservation check for the gateway's streams.
//! Each stream holds a connection on each side of the relay: raise `ulimit -n` to at least
//! 2 N + 256 first.
//!
//! The load comes from one of two drivers. `wrk` (`apt-get install wrk`) costs far less CPU per
//! request than our own client, which matters when it shares two cores with the servers it
//! measures; `reqwest`, our own client, has exact percentiles and checks that every stream ends
//! with `message_stop`. `auto`, the default, takes wrk when it is on `PATH`. With wrk, served
//! requests are the gateway's own count, since wrk drops its last requests unanswered.
//!
//! With `--limits`, every gateway run is repeated right after with a second key that has a
//! requests window, token and cost windows, a budget and `max_concurrency`, all out of the
//! load's reach, so each request pays for the whole limit check and is admitted; the report
//! then compares limits on and off.
//!
//! Layout, in the order this file uses them: `processes` (the binaries and the guard that kills
//! the children), `deployment` (starting and provisioning the servers), `load` (the closed
//! loop of the reqwest driver), `wrk` (the wrk driver), `probes` (`/proc`, Redis counters,
//! `/metrics`) and `report` (Markdown).

#[path = "../loadgen/deployment.rs"]
mod deployment;
#[path = "../loadgen/load.rs"]
mod load;
#[path = "../loadgen/nginx.rs"]
mod nginx;
#[path = "../loadgen/probes.rs"]
mod probes;
#[path = "../loadgen/processes.rs"]
mod processes;
#[path = "../loadgen/report.rs"]
mod report;
#[path = "../loadgen/streams.rs"]
mod streams;
#[path = "../loadgen/wrk.rs"]
mod wrk;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};

use crate::deployment::{Deployment, Redis};
use crate::load::{LoadResult, LoadSpec};
use crate::processes::{Binaries, Children};
use crate::report::{Driver, GatewayCost, Report, Row, Target};

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
    /// What sends the load: `wrk` (must be on PATH), our `reqwest` client, or `auto`, which is
    /// wrk when it is on PATH and reqwest otherwise.
    #[arg(long, value_enum, default_value_t = DriverChoice::Auto)]
    driver: DriverChoice,
    /// Run on a Redis Cluster on loopback (3 masters, 3 replicas) with this many partitions,
    /// instead of one redis-server.
    #[arg(long)]
    cluster: Option<u32>,
    /// Run the streaming-capacity run with this many concurrent streams instead of the
    /// throughput matrix.
    #[arg(long)]
    streams: Option<usize>,
    /// Events per stream in the streaming-capacity run (at least 7).
    #[arg(long, default_value_t = 20)]
    stream_events: usize,
    /// Milliseconds between a stream's events.
    #[arg(long, default_value_t = 500)]
    stream_interval_ms: u64,
    /// Milliseconds over which the streams are opened, evenly spaced.
    #[arg(long, default_value_t = 2000)]
    stream_ramp_ms: u64,
    /// Skip the nginx hop of the streaming-capacity run.
    #[arg(long)]
    no_nginx: bool,
    /// Run this gateway binary instead of the one beside loadgen, for A/B runs of two builds.
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DriverChoice {
    Auto,
    Wrk,
    Reqwest,
}

impl DriverChoice {
    fn resolve(self) -> anyhow::Result<Driver> {
        match self {
            Self::Auto if wrk::on_path() => Ok(Driver::Wrk),
            Self::Auto | Self::Reqwest => Ok(Driver::Reqwest),
            Self::Wrk if wrk::on_path() => Ok(Driver::Wrk),
            Self::Wrk => bail!("--driver wrk needs `wrk` on PATH (apt-get install wrk)"),
        }
    }
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
    let driver = args.driver.resolve()?;
    let mut binaries = Binaries::locate(args.rebuild)?;
    if let Some(path) = &args.gateway_bin {
        binaries.gateway.clone_from(path);
    }
    if let Some(streams) = args.streams {
        let markdown = tokio::select! {
            markdown = capacity(&args, streams, &binaries) => markdown?,
            () = shutdown_signal() => bail!("interrupted; the child processes were stopped"),
        };
        print!("{markdown}");
        if let Some(path) = &args.out {
            std::fs::write(path, &markdown)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
    // Losing the race to a signal drops `bench`, and with it the `Children` guard that kills
    // every server it started and the load tasks' `JoinSet`.
    let markdown = tokio::select! {
        markdown = bench(&args, driver, &binaries) => markdown?,
        () = shutdown_signal() => bail!("interrupted; the child processes were stopped"),
    };
    print!("{markdown}");
    if let Some(path) = &args.out {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("loadgen: report written to {}", path.display());
    }
    Ok(())
}

async fn bench(args: &Args, driver: Driver, binaries: &Binaries) -> anyhow::Result<String> {
    let mut children = Children::new()?;
    let gateway_settings: Vec<(&'static str, String)> = args
        .spend_cache_ms
        .map(|ms| ("GATEWAY_SPEND_CACHE_MS", ms.to_string()))
        .into_iter()
        .collect();
    let redis = match args.cluster {
        Some(partitions) => Redis::Cluster { partitions },
        None => Redis::Node,
    };
    let mut deployment =
        Deployment::start(&mut children, binaries, &gateway_settings, redis).await?;
    let key = deployment.provision().await?;
    eprintln!("loadgen: load from {}", driver.name());
    // Before the preflight, so that the gateway's count covers everything it answers.
    let gateway_counted_before = match driver {
        Driver::Wrk => Some(messages_counted(&deployment).await?),
        Driver::Reqwest => None,
    };
    // Counted by the client: what the gateway answered that the client saw.
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
    let plan = Plan {
        driver,
        duration,
        hz: probes::clock_ticks_per_sec(),
    };
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
                let row = run(&mut deployment, &plan, api_key, concurrency, stream, target)
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
    let client_counted = served;
    // wrk drops its last requests without counting them (see `messages_counted`), so with wrk
    // only the gateway's own count can match the stream.
    if let Some(before) = gateway_counted_before {
        served = messages_counted(&deployment).await?.saturating_sub(before);
    }
    eprintln!("loadgen: waiting for the aggregator to count {served} requests …");
    let conservation = deployment.conservation(served, CONSERVATION_WAIT).await?;
    children.finish_cleanly();
    let report = Report {
        measured_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        driver,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        warmup: WARMUP,
        duration,
        rows,
        rss_before_kib,
        rss_after_kib,
        conservation,
        client_counted,
        gateway_settings: gateway_settings
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect(),
        redis: match args.cluster {
            Some(n) => format!(
                "a Redis Cluster on loopback, 3 masters and 3 replicas, `METER_PARTITIONS={n}`"
            ),
            None => "one redis-server".into(),
        },
    };
    Ok(report.markdown())
}

/// The streaming-capacity run (see the module docs).
async fn capacity(args: &Args, streams: usize, binaries: &Binaries) -> anyhow::Result<String> {
    if args.stream_events <= streams::FIXED_EVENTS {
        bail!(
            "--stream-events must be at least {}",
            streams::FIXED_EVENTS + 1
        );
    }
    let need = streams as u64 * 2 + 256;
    let limit = open_files_limit()?;
    if limit < need {
        bail!("{streams} streams need `ulimit -n` of at least {need}; it is {limit}");
    }
    let with_nginx = !args.no_nginx;
    if with_nginx && !nginx::on_path() {
        bail!("the nginx hop needs `nginx` on PATH (apt-get install nginx-light), or --no-nginx");
    }
    let spec = streams::StreamSpec {
        streams,
        events: args.stream_events,
        interval: Duration::from_millis(args.stream_interval_ms),
        ramp: Duration::from_millis(args.stream_ramp_ms),
    };
    let mut children = Children::new()?;
    let mut deployment = Deployment::start(&mut children, binaries, &[], Redis::Node).await?;
    let key = deployment.provision().await?;
    let nginx = if with_nginx {
        Some(nginx::start(&mut children, &deployment.mock, streams).await?)
    } else {
        None
    };
    let counted_before = messages_counted(&deployment).await?;
    deployment.preflight(&key).await?;
    let hz = probes::clock_ticks_per_sec();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let measured_at = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let url = |base: &str| format!("{base}/v1/messages");
    eprintln!("loadgen: {streams} streams through the gateway …");
    let mut results = vec![
        streams::run(
            "gateway",
            &url(&deployment.gateway),
            &key,
            deployment.gateway_pid,
            &spec,
            hz,
        )
        .await?,
    ];
    children.check_alive()?;
    if let Some(nginx) = &nginx {
        eprintln!("loadgen: {streams} streams through nginx …");
        results
            .push(streams::run("nginx", &url(&nginx.url), "sk-mock", nginx.pid, &spec, hz).await?);
        children.check_alive()?;
    }
    let served = messages_counted(&deployment)
        .await?
        .saturating_sub(counted_before);
    eprintln!("loadgen: waiting for the aggregator to count {served} requests …");
    let c = deployment.conservation(served, CONSERVATION_WAIT).await?;
    let exact = c.served == c.stream_len && c.served == c.usage_requests;
    let conservation = format!(
        "Conservation (gateway, preflight included): {} requests answered, {} events in the \
         stream, {} requests in `/v1/usage`: {}.",
        c.served,
        c.stream_len,
        c.usage_requests,
        if exact { "exact" } else { "MISMATCH" }
    );
    children.finish_cleanly();
    Ok(streams::markdown(
        &spec,
        &results,
        &measured_at,
        &load,
        &conservation,
    ))
}

/// The soft limit on open files, which child processes inherit.
fn open_files_limit() -> anyhow::Result<u64> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|soft| soft.parse().unwrap_or(u64::MAX))
        .context("no `Max open files` in /proc/self/limits")
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

/// What every run of one invocation shares.
struct Plan {
    driver: Driver,
    duration: Duration,
    hz: u64,
}

async fn run(
    d: &mut Deployment,
    plan: &Plan,
    api_key: &str,
    concurrency: usize,
    stream: bool,
    target: Target,
) -> anyhow::Result<Row> {
    let base = match target {
        Target::Direct => &d.mock,
        Target::Gateway | Target::GatewayLimited => &d.gateway,
    };
    eprintln!("loadgen: concurrency {concurrency:>2}, stream {stream:<5}, {target:?} …");
    let spec = LoadSpec {
        url: format!("{base}/v1/messages"),
        api_key: api_key.to_owned(),
        stream,
        concurrency,
        warmup: WARMUP,
        duration: plan.duration,
    };
    let sample = target != Target::Direct;
    let (result, cost) = match plan.driver {
        Driver::Reqwest => run_reqwest(d, &spec, sample, plan.hz).await?,
        Driver::Wrk => run_wrk(d, &spec, sample, plan.hz).await?,
    };
    Ok(Row {
        concurrency,
        stream,
        target,
        result,
        cost,
    })
}

/// The reqwest driver's tasks run in the background, so the gateway is sampled at the edges of
/// the window they measure.
async fn run_reqwest(
    d: &mut Deployment,
    spec: &LoadSpec,
    sample: bool,
    hz: u64,
) -> anyhow::Result<(LoadResult, Option<GatewayCost>)> {
    let running = load::start(spec)?;
    let cost = if sample {
        tokio::time::sleep_until(running.start).await;
        let before = GatewaySample::take(d).await?;
        tokio::time::sleep_until(running.end).await;
        let after = GatewaySample::take(d).await?;
        Some(after.cost_since(&before, hz))
    } else {
        None
    };
    Ok((running.finish().await?, cost))
}

/// wrk measures its whole process, so the gateway is sampled right before the measured process
/// starts and right after it exits; the warm-up is a process of its own before that.
async fn run_wrk(
    d: &mut Deployment,
    spec: &LoadSpec,
    sample: bool,
    hz: u64,
) -> anyhow::Result<(LoadResult, Option<GatewayCost>)> {
    let wrk = wrk::Wrk::prepare(spec)?;
    let warmup = wrk.run(spec.warmup).await.context("wrk warm-up")?;
    let before = if sample {
        Some(GatewaySample::take(d).await?)
    } else {
        None
    };
    let measured = wrk.run(spec.duration).await.context("measured wrk run")?;
    let cost = match before {
        Some(before) => Some(GatewaySample::take(d).await?.cost_since(&before, hz)),
        None => None,
    };
    Ok((wrk::result(&warmup, &measured), cost))
}

/// How long the gateway may take to finish the requests a stopped wrk left in flight.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// The gateway's own count of `/v1/messages` requests, every status class, once no handler is
/// running: it counts a request when its handler returns, and wrk leaves up to one request per
/// connection in flight when it stops. The gateway prints only non-zero series, so no series
/// means none yet.
async fn messages_counted(d: &Deployment) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    loop {
        let text = probes::gateway_metrics(&d.control, &d.gateway).await?;
        let in_flight = probes::counter_sum(&text, probes::IN_FLIGHT_METRIC).unwrap_or(0.0);
        if in_flight == 0.0 || tokio::time::Instant::now() >= deadline {
            let counted =
                probes::counter_sum_labelled(&text, probes::REQUESTS_METRIC, r#"route="messages""#);
            return Ok(counted.unwrap_or(0.0) as u64);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
