//! `statsbench`: latency of the stats API over a realistic store, a benchmark rather than a test.
//!
//! It starts a private Redis, writes N events (100 keys, 10 models, `ts` spread over the last
//! 30 days) to a stream, lets the release `aggregator` binary consume them (so the cells are
//! exactly what production writes), waits until its group has applied everything, and then
//! times two queries over HTTP, one request at a time:
//! - `/v1/usage?bucket=hour&group_by=model` over 30 days (720 hour cells, 7,200 rows), and
//! - `/v1/latency?group_by=model` over 7 days (day cells in the middle, hours and minutes at
//!   the edges),
//!
//! first against an aggregator with the cell cache disabled (`METER_STATS_CACHE_ROWS=0`, a few
//! requests: each reads every cell), then against one with the default cache (the first request
//! fills it, then `--requests` are timed). A request is timed until its whole body has arrived;
//! the client does not parse it. Prints one Markdown report.
//!
//! ```text
//! cargo run --release -p tests --bin statsbench -- [--events 1000000] [--requests 300]
//! ```

// aggbench's modules; statsbench uses part of each.
#[allow(dead_code)]
#[path = "../aggbench/events.rs"]
mod events;
#[allow(dead_code)]
#[path = "../aggbench/probes.rs"]
mod probes;
#[allow(dead_code)]
#[path = "../aggbench/rng.rs"]
mod rng;
#[allow(dead_code)]
#[path = "../aggbench/servers.rs"]
mod servers;
#[allow(dead_code)]
#[path = "../aggbench/stream.rs"]
mod stream;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use tokio::time::Instant;

use crate::events::Generator;
use crate::servers::{ChildGuard, Redis};

#[derive(Debug, Parser)]
#[command(about = "Stats API latency over a store of N events spread over 30 days")]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 100)]
    keys: u32,
    #[arg(long, default_value_t = 10)]
    models: usize,
    #[arg(long, default_value_t = 30)]
    days: u64,
    /// Timed requests per query with the cache on.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Timed requests per query with the cache off (each reads every cell).
    #[arg(long, default_value_t = 5)]
    uncached_requests: usize,
    #[arg(long)]
    rebuild: bool,
}

const STREAM: &str = "statsbench:events";
const DAY_MS: i64 = 86_400_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.events > 0 && args.requests > 0, "nothing to measure");
    let binary = servers::aggregator_binary(args.rebuild)?;
    let redis = Redis::start().await?;
    let mut conn = servers::connect(&redis.url).await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let spread_ms = args.days * DAY_MS as u64;
    let mut generator = Generator::new(
        42,
        events::pick_models(args.models)?,
        args.keys,
        now_ms,
        spread_ms,
    );
    eprintln!(
        "statsbench: preloading {} events over {} days",
        args.events, args.days
    );
    stream::preload(&mut conn, STREAM, &mut generator, args.events).await?;

    let started = Instant::now();
    let (first, addr) = spawn(&binary, &redis.url, None)?;
    wait_applied(&mut conn, Duration::from_secs(args.events / 2_000 + 120)).await?;
    let build = started.elapsed();
    let memory = probes::redis_used_memory(&mut conn).await?;
    eprintln!("statsbench: store built in {:.1} s", build.as_secs_f64());
    drop(first);

    let to = chrono::Utc::now().timestamp_millis();
    let queries = [
        (
            "usage, bucket=hour, group_by=model, 30 days",
            format!(
                "/v1/usage?bucket=hour&group_by=model&from={}&to={to}",
                to - 30 * DAY_MS
            ),
        ),
        (
            "latency, group_by=model, 7 days",
            format!(
                "/v1/latency?group_by=model&from={}&to={to}",
                to - 7 * DAY_MS
            ),
        ),
    ];
    let http = reqwest::Client::new();
    let mut lines = Vec::new();
    for (cache, rows, requests) in [
        ("off", Some(0), args.uncached_requests),
        ("on", None, args.requests),
    ] {
        let (server, _) = spawn(&binary, &redis.url, Some((addr, rows)))?;
        wait_up(&http, addr).await?;
        for (name, path) in &queries {
            let url = format!("http://{addr}{path}");
            let started = Instant::now();
            let body = get(&http, &url).await?;
            let first = started.elapsed();
            let size = body.len();
            let body: serde_json::Value = serde_json::from_slice(&body)?;
            let rows = body["rows"].as_array().map_or(0, Vec::len);
            let mut times = Vec::with_capacity(requests);
            for _ in 0..requests {
                let started = Instant::now();
                get(&http, &url).await?;
                times.push(started.elapsed());
            }
            times.sort_unstable();
            let at = |q: f64| {
                times[((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1]
            };
            lines.push(format!(
                "| {name} | {cache} | {rows} ({:.0} KiB) | {:.1} | {} | {:.2} | {:.2} | {:.2} |",
                size as f64 / 1024.0,
                first.as_secs_f64() * 1000.0,
                requests,
                at(0.5).as_secs_f64() * 1000.0,
                at(0.99).as_secs_f64() * 1000.0,
                times.last().map_or(0.0, |t| t.as_secs_f64() * 1000.0),
            ));
        }
        drop(server);
    }
    println!(
        "Measured {} UTC: {} events, {} keys, {} models, `ts` over the last {} days; \
         store built by the release aggregator in {:.1} s; Redis used {:.0} MiB.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        args.events,
        args.keys,
        args.models,
        args.days,
        build.as_secs_f64(),
        memory as f64 / 1048576.0
    );
    println!(
        "| query | cache | rows | first request ms | timed requests | p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// The whole body, unparsed: the time measured is the server's answer, not the client's JSON
/// parsing.
async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<bytes::Bytes> {
    let response = http.get(url).send().await.context("GET")?;
    if !response.status().is_success() {
        bail!("{url}: {} {}", response.status(), response.text().await?);
    }
    Ok(response.bytes().await?)
}

/// The aggregator binary on a free port (or `reuse`'s), with the cache size `rows` if given.
fn spawn(
    binary: &Path,
    redis_url: &str,
    reuse: Option<(SocketAddr, Option<usize>)>,
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let addr = match reuse {
        Some((addr, _)) => addr,
        None => SocketAddr::from(([127, 0, 0, 1], servers::free_port()?)),
    };
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("REDIS_URL", redis_url)
        .env("METER_STREAM", STREAM)
        .env("METER_CONSUMER", "statsbench")
        .env("AGGREGATOR_LISTEN", addr.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some((_, Some(rows))) = reuse {
        command.env("METER_STATS_CACHE_ROWS", rows.to_string());
    }
    let child = command.spawn().context("starting the aggregator")?;
    Ok((ChildGuard::new("aggregator", child), addr))
}

async fn wait_up(http: &reqwest::Client, addr: SocketAddr) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if http
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the aggregator did not come up on {addr}")
}

/// Until the default group has read and acknowledged every entry.
async fn wait_applied(
    conn: &mut redis::aio::MultiplexedConnection,
    timeout: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    let mut reported = Instant::now();
    loop {
        let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(STREAM)
            .query_async(conn)
            .await?;
        let number = |name: &str| {
            groups
                .first()
                .and_then(|g| g.get(name))
                .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
        };
        if number("lag") == Some(0) && number("pending") == Some(0) {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "the aggregator did not catch up in time"
        );
        if reported.elapsed() > Duration::from_secs(10) {
            reported = Instant::now();
            eprintln!(
                "statsbench: lag {:?}, pending {:?}",
                number("lag"),
                number("pending")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
