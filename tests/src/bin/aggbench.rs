//! `aggbench`: the aggregator's throughput benchmark, a benchmark rather than a test.
//!
//! One invocation starts a private Redis, fills one stream with N realistic usage events, and
//! measures two readers of that same stream, each in its own consumer group so neither disturbs
//! the other: a bare in-process consumer (`XREADGROUP` + `XACK`, no decoding), which is the
//! physical limit of any consumer on this Redis, and then the release `aggregator` binary with
//! its default group, followed through `/metrics` until it has applied all N. It then checks
//! through `/v1/usage` that every event, token and attodollar was counted exactly once, and
//! prints one Markdown report. It stops by itself: the only open-ended wait, the aggregator's,
//! is bounded by `--timeout-secs` (by default 1.2 ms per event, at least 60 s).
//!
//! ```text
//! cargo run --release -p tests --bin aggbench -- [--events 1000000] [--keys 100] [--models 10] [--replay] [--out FILE.md]
//! ```
//!
//! Layout, in the order this file uses them: `servers` (Redis, the aggregator binary and the
//! guards that kill them), `events` (the deterministic traffic and its expected totals, drawn
//! from `rng`), `stream` (preloading and the bare consumer), `probes` (`/proc`, Redis `INFO`,
//! `/metrics`), `catch_up` (following the aggregator), `conservation` (the check) and `report`
//! (Markdown).

#[path = "../aggbench/catch_up.rs"]
mod catch_up;
#[path = "../aggbench/conservation.rs"]
mod conservation;
#[path = "../aggbench/events.rs"]
mod events;
#[path = "../aggbench/probes.rs"]
mod probes;
#[path = "../aggbench/report.rs"]
mod report;
#[path = "../aggbench/rng.rs"]
mod rng;
#[path = "../aggbench/servers.rs"]
mod servers;
#[path = "../aggbench/stream.rs"]
mod stream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use tokio::time::Instant;

use crate::catch_up::Watched;
use crate::events::Generator;
use crate::report::{Cpu, RedisMemory, Report, Workload};
use crate::servers::Redis;

#[derive(Debug, Parser)]
#[command(about = "Aggregator throughput: the release aggregator against a bare stream consumer")]
struct Args {
    /// Usage events to preload and consume.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Distinct client keys.
    #[arg(long, default_value_t = 100)]
    keys: u32,
    /// Models in the mix (1–10); with two or more, one of them is unpriced.
    #[arg(long, default_value_t = 10)]
    models: usize,
    /// Event timestamps are spread over this many seconds before now.
    #[arg(long, default_value_t = 600)]
    spread_secs: u64,
    /// Draw each `ts` uniformly from the spread instead of in stream order (the default, as
    /// live traffic arrives): every batch then touches every minute of the spread.
    #[arg(long)]
    shuffled_ts: bool,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Give up when the aggregator has not applied every event after this many seconds.
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run `cargo build --release` for the aggregator even when the binary is already there.
    #[arg(long)]
    rebuild: bool,
    /// Then time `aggregator replay` (unchanged prices) while the aggregator keeps running,
    /// and check the figures again after its switch.
    #[arg(long)]
    replay: bool,
    /// `--batch-size` of that replay (default: the replay's own).
    #[arg(long)]
    replay_batch_size: Option<usize>,
}

/// The stream both readers consume; the Redis is private, so a fixed name is safe.
const STREAM: &str = "aggbench:events";
/// The bare consumer's group; the aggregator uses its default, `aggregator`.
const BARE_GROUP: &str = "bare";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.events > 0, "--events must be at least 1");
    ensure!(args.keys > 0, "--keys must be at least 1");
    let binary = servers::aggregator_binary(args.rebuild)?;
    // Losing the race to a signal drops `bench`, and with it the guards that kill Redis and the
    // aggregator.
    let report = tokio::select! {
        report = bench(&args, &binary) => report?,
        () = shutdown_signal() => bail!("interrupted; redis-server and the aggregator were stopped"),
    };
    let markdown = report.markdown();
    print!("{markdown}");
    if let Some(path) = &args.out {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("aggbench: report written to {}", path.display());
    }
    ensure!(
        report.passed(),
        "the conservation check failed; see the report"
    );
    Ok(())
}

async fn bench(args: &Args, binary: &Path) -> anyhow::Result<Report> {
    let n = args.events;
    let hz = probes::clock_ticks_per_sec() as f64;
    let mut redis = Redis::start().await?;
    let mut conn = servers::connect(&redis.url).await?;
    let memory_empty = probes::redis_used_memory(&mut conn).await?;

    let models = events::pick_models(args.models)?;
    let spread = Duration::from_secs(args.spread_secs);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut generator = Generator::new(
        args.seed,
        models.clone(),
        args.keys,
        now_ms,
        u64::try_from(spread.as_millis()).unwrap_or(u64::MAX),
    );
    if !args.shuffled_ts {
        generator = generator.in_arrival_order(n);
    }
    let models: Vec<_> = models
        .into_iter()
        .map(|m| (m, generator.is_priced(m.name)))
        .collect();
    eprintln!(
        "aggbench: preloading {n} events, ts = now − U[0, {} s] (the last {:.0} minutes)",
        spread.as_secs(),
        spread.as_secs_f64() / 60.0
    );
    let preload = stream::preload(&mut conn, STREAM, &mut generator, n).await?;
    let expected = std::mem::take(&mut generator.expected);
    let memory_after_preload = probes::redis_used_memory(&mut conn).await?;

    eprintln!("aggbench: bare consumer (group `{BARE_GROUP}`)");
    let redis_ticks = probes::cpu_ticks(redis.pid())?;
    let pings = probes::Waits::start(&redis.url).await?;
    let bare = stream::bare_consumer(&mut conn, STREAM, BARE_GROUP, n).await?;
    let mut waits = vec![("the bare consumer", pings.finish().await?)];
    let redis_cpu_bare = probes::cpu_ticks(redis.pid())?.saturating_sub(redis_ticks) as f64 / hz;
    let memory_after_bare = probes::redis_used_memory(&mut conn).await?;

    let listen = SocketAddr::from(([127, 0, 0, 1], servers::free_port()?));
    let base_url = format!("http://{listen}");
    let http = reqwest::Client::new();
    let timeout = Duration::from_secs(
        args.timeout_secs
            .unwrap_or_else(|| (n.saturating_mul(12) / 10_000).max(60)),
    );
    eprintln!(
        "aggbench: aggregator on {listen} (timeout {} s)",
        timeout.as_secs()
    );
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(&mut conn)
        .await?;
    let redis_ticks = probes::cpu_ticks(redis.pid())?;
    let pings = probes::Waits::start(&redis.url).await?;
    let started = Instant::now();
    let mut aggregator = servers::spawn_aggregator(binary, &redis.url, STREAM, listen)?;
    let catch_up = catch_up::follow(
        Watched {
            aggregator: &mut aggregator,
            redis: &mut redis,
            conn: &mut conn,
            http: &http,
            metrics_url: format!("{base_url}/metrics"),
        },
        n,
        started,
        timeout,
    )
    .await?;
    waits.push(("the aggregator's catch-up", pings.finish().await?));
    let redis_cpu_aggregator =
        probes::cpu_ticks(redis.pid())?.saturating_sub(redis_ticks) as f64 / hz;
    let aggregator_cpu = probes::cpu_ticks(aggregator.pid())? as f64 / hz;
    let redis_commands = probes::command_stats(&mut conn).await?;
    let memory_after_aggregator = catch_up.redis_memory.last;

    eprintln!("aggbench: checking /v1/usage");
    let checks = conservation::check(&http, &base_url, &expected, n, &catch_up.metrics).await?;
    let replay = if args.replay {
        eprintln!("aggbench: aggregator replay");
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut conn)
            .await?;
        let pings = probes::Waits::start(&redis.url).await?;
        let started = Instant::now();
        let mut command = tokio::process::Command::new(binary);
        command.arg("replay");
        if let Some(n) = args.replay_batch_size {
            command.arg("--batch-size").arg(n.to_string());
        }
        let output = command
            .env_clear()
            .env("REDIS_URL", &redis.url)
            .env("METER_STREAM", STREAM)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .context("running aggregator replay")?;
        let wall = started.elapsed();
        waits.push(("the replay", pings.finish().await?));
        ensure!(
            output.status.success(),
            "aggregator replay failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let scripts = probes::command_stats(&mut conn)
            .await?
            .into_iter()
            .find(|(name, _, _)| name == "evalsha")
            .map(|(_, calls, usec)| (calls, usec));
        let checks = conservation::check(&http, &base_url, &expected, n, &catch_up.metrics).await?;
        Some(report::ReplayRun {
            wall,
            scripts,
            summary: String::from_utf8_lossy(&output.stdout).into_owned(),
            checks,
        })
    } else {
        None
    };
    drop(aggregator);
    let by_key_shape = probes::memory_by_key_shape(&mut conn).await?;

    Ok(Report {
        measured_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        cores: std::thread::available_parallelism().map_or(0, |c| c.get()),
        redis_version: redis.version.clone(),
        workload: Workload {
            events: n,
            seed: args.seed,
            keys: args.keys,
            spread,
            shuffled_ts: args.shuffled_ts,
            models,
            expected,
        },
        preload,
        bare,
        catch_up,
        redis_memory: RedisMemory {
            empty: memory_empty,
            after_preload: memory_after_preload,
            after_bare: memory_after_bare,
            after_aggregator: memory_after_aggregator,
            by_key_shape,
        },
        cpu: Cpu {
            redis_during_bare: redis_cpu_bare,
            redis_during_aggregator: redis_cpu_aggregator,
            aggregator: aggregator_cpu,
            redis_commands,
        },
        checks,
        replay,
        waits,
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
