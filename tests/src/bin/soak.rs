//! `soak`: a bounded soak of the gateway, a benchmark rather than a test.
//!
//! Starts the same private deployment as `loadgen` (Redis, the mock upstream, the aggregator and
//! the gateway), then sends a fixed rate of requests for `--duration-secs`, a `--stream-share`
//! of them streaming. The load is open-loop: a scheduler sends whatever is due every few
//! milliseconds without waiting for earlier answers, so a slow gateway shows up as latency and
//! lag rather than as a lower rate; only when `MAX_IN_FLIGHT` requests are outstanding is a send
//! skipped (and counted). Every `--sample-secs` it records the window's sends, completions,
//! errors and exact p50/p99, the gateway's RSS and open fds, the aggregator's RSS, Redis
//! `used_memory` and the consumer group's lag and pending count. At the end it checks
//! conservation (answered == stream entries == `/v1/usage` requests) and compares the last third
//! of the samples with the first third (the first sample, a warm-up, left out).
//!
//! ```text
//! cargo run --release -p tests --bin soak -- [--duration-secs 600] [--rate 500]
//!     [--stream-share 0.5] [--sample-secs 30] [--out FILE.md]
//! ```

// These files are loadgen's; this binary uses only part of each.
#[allow(dead_code)]
#[path = "../loadgen/deployment.rs"]
mod deployment;
#[allow(dead_code)]
#[path = "../loadgen/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../loadgen/probes.rs"]
mod probes;
#[allow(dead_code)]
#[path = "../loadgen/processes.rs"]
mod processes;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::time::Instant;

use crate::deployment::{Conservation, Deployment};
use crate::load::{LoadSpec, Outcome, Request};
use crate::processes::{Binaries, Children};

#[derive(Debug, Parser)]
#[command(about = "Bounded soak: fixed-rate load, resources and lag sampled over time")]
struct Args {
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// Requests per second, in total, sent on schedule whether or not earlier ones were answered.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Fraction of the requests sent with `"stream": true`.
    #[arg(long, default_value_t = 0.5)]
    stream_share: f64,
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run `cargo build --release` for the binaries even when they are already there.
    #[arg(long)]
    rebuild: bool,
}

/// Outstanding requests beyond which a due send is skipped rather than piling up without bound.
const MAX_IN_FLIGHT: usize = 256;
/// How often the scheduler wakes to send what is due; coarser than the send interval at high
/// rates, which only bunches sends within a few milliseconds.
const TICK: Duration = Duration::from_millis(5);
/// How long the aggregator may take to count the last events.
const CONSERVATION_WAIT: Duration = Duration::from_secs(60);
/// The client's request timeout (10 s in `load.rs`) plus slack: in-flight requests are over by then.
const DRAIN_WAIT: Duration = Duration::from_secs(15);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.duration_secs == 0 || args.sample_secs == 0 {
        bail!("--duration-secs and --sample-secs must be at least 1");
    }
    if args.rate <= 0.0 || !args.rate.is_finite() || !(0.0..=1.0).contains(&args.stream_share) {
        bail!("--rate must be positive and --stream-share within 0..=1");
    }
    let binaries = Binaries::locate(args.rebuild)?;
    // Losing the race to a signal drops `soak`, and with it the guard that kills the children.
    let markdown = tokio::select! {
        markdown = soak(&args, &binaries) => markdown?,
        () = shutdown_signal() => bail!("interrupted; the child processes were stopped"),
    };
    print!("{markdown}");
    if let Some(path) = &args.out {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("soak: report written to {}", path.display());
    }
    Ok(())
}

/// What completed (or was sent) since the last sample; the sampler swaps it out.
#[derive(Default)]
struct Window {
    sent: u64,
    latencies_us: Vec<u64>,
    errors: u64,
    skipped: u64,
    first_error: Option<String>,
}

/// State shared by the scheduler, the request tasks and the sampler.
struct Shared {
    window: Mutex<Window>,
    in_flight: AtomicUsize,
    /// Responses of any status over the whole run, for conservation.
    responses: AtomicU64,
}

impl Shared {
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        // A poisoned lock means a request task panicked; its counts are still worth reading.
        self.window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Sample {
    elapsed: Duration,
    sent: u64,
    completed: u64,
    errors: u64,
    skipped: u64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    gateway_rss_mib: f64,
    gateway_fds: u64,
    aggregator_rss_mib: f64,
    redis_mib: f64,
    lag: Option<u64>,
    pending: Option<u64>,
}

async fn soak(args: &Args, binaries: &Binaries) -> anyhow::Result<String> {
    let mut children = Children::new()?;
    let mut deployment =
        Deployment::start(&mut children, binaries, &[], deployment::Redis::Node).await?;
    let key = deployment.provision().await?;
    let preflight = deployment.preflight(&key).await?;

    let request = |stream| {
        Request::new(&LoadSpec {
            url: format!("{}/v1/messages", deployment.gateway),
            api_key: key.clone(),
            stream,
            // Sizes the keep-alive pool so every in-flight request can reuse a connection.
            concurrency: MAX_IN_FLIGHT,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
        })
        .map(Arc::new)
    };
    let requests = [request(false)?, request(true)?];
    let shared = Arc::new(Shared {
        window: Mutex::default(),
        in_flight: AtomicUsize::new(0),
        responses: AtomicU64::new(0),
    });
    let duration = Duration::from_secs(args.duration_secs);
    let start = Instant::now();
    let end = start + duration;
    eprintln!(
        "soak: {} req/s for {} s, {:.0}% streaming, a sample every {} s",
        args.rate,
        args.duration_secs,
        args.stream_share * 100.0,
        args.sample_secs
    );
    let scheduler = tokio::spawn(schedule(
        requests,
        Arc::clone(&shared),
        args.rate,
        args.stream_share,
        start,
        end,
    ));

    let sample_every = Duration::from_secs(args.sample_secs);
    let mut samples = Vec::new();
    let mut at = start;
    while at < end {
        at = (at + sample_every).min(end);
        tokio::time::sleep_until(at).await;
        children.check_alive()?;
        let sample = take_sample(&mut deployment, &shared, at - start).await?;
        eprintln!("soak: {}", row(&sample));
        samples.push(sample);
    }
    scheduler.await.context("the scheduler panicked")?;

    let drained = Instant::now() + DRAIN_WAIT;
    while shared.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let still_in_flight = shared.in_flight.load(Ordering::Acquire);
    // Completions after the last sample (the drain) are counted in the totals, not in a row.
    let tail = std::mem::take(&mut *shared.window());
    let served = preflight + shared.responses.load(Ordering::Acquire);
    eprintln!("soak: waiting for the aggregator to count {served} requests …");
    let conservation = deployment.conservation(served, CONSERVATION_WAIT).await?;
    children.finish_cleanly();
    Ok(report(
        args,
        &samples,
        &tail,
        still_in_flight,
        &conservation,
    ))
}

/// Sends what is due every [`TICK`] until `end`: request `n` is due at `n / rate` seconds.
async fn schedule(
    requests: [Arc<Request>; 2],
    shared: Arc<Shared>,
    rate: f64,
    stream_share: f64,
    start: Instant,
    end: Instant,
) {
    let mut ticker = tokio::time::interval(TICK);
    let mut scheduled: u64 = 0;
    loop {
        let now = ticker.tick().await;
        if now >= end {
            return;
        }
        let due = ((now - start).as_secs_f64() * rate) as u64;
        while scheduled < due {
            // Spreads the streams evenly: request n streams when floor(n·share) steps up.
            let stream = ((scheduled + 1) as f64 * stream_share).floor()
                > (scheduled as f64 * stream_share).floor();
            scheduled += 1;
            if shared.in_flight.load(Ordering::Acquire) >= MAX_IN_FLIGHT {
                shared.window().skipped += 1;
                continue;
            }
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
            shared.window().sent += 1;
            let request = Arc::clone(&requests[usize::from(stream)]);
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let sent = Instant::now();
                let outcome = load::send(&request).await;
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut window = shared.window();
                match outcome {
                    Outcome::Ok => {
                        shared.responses.fetch_add(1, Ordering::AcqRel);
                        window.latencies_us.push(micros);
                    }
                    Outcome::Failed(error) => {
                        shared.responses.fetch_add(1, Ordering::AcqRel);
                        window.errors += 1;
                        window.first_error.get_or_insert(error);
                    }
                    Outcome::Transport(error) => {
                        window.errors += 1;
                        window.first_error.get_or_insert(error);
                    }
                }
                drop(window);
                shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }
}

async fn take_sample(
    d: &mut Deployment,
    shared: &Shared,
    elapsed: Duration,
) -> anyhow::Result<Sample> {
    let mut window = std::mem::take(&mut *shared.window());
    if let Some(error) = &window.first_error {
        eprintln!("soak: an error in this window: {error}");
    }
    window.latencies_us.sort_unstable();
    let ms = |q| load::percentile(&window.latencies_us, q).map(|us| us as f64 / 1000.0);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let fd_dir = format!("/proc/{}/fd", d.gateway_pid);
    let gateway_fds = std::fs::read_dir(&fd_dir)
        .with_context(|| format!("reading {fd_dir}"))?
        .count() as u64;
    let redis_bytes = d.redis.info_u64("memory", "used_memory").await?;
    // A failed scrape leaves the gauges empty for this row rather than ending the soak.
    let metrics = match d
        .control
        .get(format!("{}/metrics", d.aggregator))
        .send()
        .await
    {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let gauge = |name| probes::counter_sum(&metrics, name).map(|v| v as u64);
    Ok(Sample {
        elapsed,
        sent: window.sent,
        completed: window.latencies_us.len() as u64,
        errors: window.errors,
        skipped: window.skipped,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        gateway_rss_mib: mib(probes::rss_kib(d.gateway_pid)?),
        gateway_fds,
        aggregator_rss_mib: mib(probes::rss_kib(d.aggregator_pid)?),
        redis_mib: redis_bytes as f64 / (1024.0 * 1024.0),
        lag: gauge("meter_consumer_lag"),
        pending: gauge("meter_consumer_pending"),
    })
}

const HEADER: &str = "| t (s) | sent | ok | errors | skipped | p50 ms | p99 ms | gateway RSS MiB | gateway fds | aggregator RSS MiB | Redis used_memory MiB | lag | pending |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

fn row(s: &Sample) -> String {
    let opt_ms = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1}"));
    let opt = |v: Option<u64>| v.map_or("–".to_owned(), |v| v.to_string());
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {} | {} |",
        s.elapsed.as_secs(),
        s.sent,
        s.completed,
        s.errors,
        s.skipped,
        opt_ms(s.p50_ms),
        opt_ms(s.p99_ms),
        s.gateway_rss_mib,
        s.gateway_fds,
        s.aggregator_rss_mib,
        s.redis_mib,
        opt(s.lag),
        opt(s.pending),
    )
}

/// A metric of the flatness table: its name, its reading and the limit it must stay within.
type Series = (&'static str, fn(&Sample) -> f64, Option<Limit>);

#[derive(Clone, Copy)]
enum Limit {
    /// Last third at most this multiple of the first.
    Ratio(f64),
    /// The same, or last third below an absolute floor.
    RatioOrBelow(f64, f64),
}

impl Limit {
    fn holds(self, first: f64, last: f64) -> bool {
        match self {
            Self::Ratio(r) => last <= first * r,
            Self::RatioOrBelow(r, floor) => last <= first * r || last < floor,
        }
    }
}

/// Means of the first and of the last third of `values`.
fn thirds(values: &[f64]) -> Option<(f64, f64)> {
    let third = values.len() / 3;
    if third == 0 {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Some((
        mean(&values[..third]),
        mean(&values[values.len() - third..]),
    ))
}

fn report(
    args: &Args,
    samples: &[Sample],
    tail: &Window,
    still_in_flight: usize,
    c: &Conservation,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Measured {} on {} cores: {} req/s for {} s ({:.0}% streaming), sampled every {} s.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.rate,
        args.duration_secs,
        args.stream_share * 100.0,
        args.sample_secs,
    );
    md.push_str(HEADER);
    for s in samples {
        let _ = writeln!(md, "{}", row(s));
    }
    let total = |f: fn(&Sample) -> u64| samples.iter().map(f).sum::<u64>();
    let _ = writeln!(
        md,
        "\nTotals: {} sent, {} ok, {} errors, {} skipped at the in-flight cap of {MAX_IN_FLIGHT}; \
         after the last sample {} more completed ({} errors) and {still_in_flight} were still in flight.",
        total(|s| s.sent),
        total(|s| s.completed),
        total(|s| s.errors),
        total(|s| s.skipped),
        tail.latencies_us.len(),
        tail.errors,
    );
    if let Some(error) = &tail.first_error {
        let _ = writeln!(md, "First error after the last sample: `{error}`.");
    }
    let holds = c.served == c.stream_len && c.stream_len == c.usage_requests;
    let _ = writeln!(
        md,
        "\nConservation: {} answered by the gateway, {} events in the stream, {} requests in \
         `/v1/usage` (after waiting {:.1} s): {}.",
        c.served,
        c.stream_len,
        c.usage_requests,
        c.waited.as_secs_f64(),
        if holds { "holds" } else { "**does not hold**" },
    );

    // The first sample includes start-up and the first allocations: it is the warm-up.
    let steady = samples.get(1..).unwrap_or_default();
    // The limits a steady state stays within; Redis memory has none because the stream grows by
    // one entry per request by design (the aggregator keeps 7 days of it).
    let series: [Series; 6] = [
        (
            "gateway RSS MiB",
            |s| s.gateway_rss_mib,
            Some(Limit::Ratio(1.10)),
        ),
        (
            "gateway fds",
            |s| s.gateway_fds as f64,
            Some(Limit::Ratio(1.10)),
        ),
        (
            "p99 ms",
            |s| s.p99_ms.unwrap_or(0.0),
            Some(Limit::Ratio(1.50)),
        ),
        (
            "aggregator RSS MiB",
            |s| s.aggregator_rss_mib,
            Some(Limit::Ratio(1.10)),
        ),
        (
            "lag + pending",
            |s| (s.lag.unwrap_or(0) + s.pending.unwrap_or(0)) as f64,
            // A backlog under one second of load is noise, whatever its ratio.
            Some(Limit::RatioOrBelow(1.50, args.rate)),
        ),
        ("Redis used_memory MiB", |s| s.redis_mib, None),
    ];
    let _ = writeln!(
        md,
        "\nFlatness, mean of the last third of the samples against the first third (the first \
         sample left out as warm-up):\n\n| metric | first third | last third | ratio | flat |\n|---|---:|---:|---:|---|"
    );
    for (name, f, limit) in series {
        let values: Vec<f64> = steady.iter().map(f).collect();
        let Some((first, last)) = thirds(&values) else {
            let _ = writeln!(md, "| {name} | – | – | – | too few samples |");
            continue;
        };
        let ratio = (first > 0.0).then(|| last / first);
        let flat = match limit {
            None => "–",
            Some(limit) if limit.holds(first, last) => "yes",
            Some(_) => "**no**",
        };
        let ratio = ratio.map_or("–".to_owned(), |r| format!("{r:.2}"));
        let _ = writeln!(md, "| {name} | {first:.1} | {last:.1} | {ratio} | {flat} |");
    }
    md
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
