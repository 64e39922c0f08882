//! `aggbench`: the aggregator's throughput benchmark, a benchmark rather than a test.
//!
//! One invocation starts a private Redis (or, with `--cluster`, a private Redis Cluster of 3
//! masters and 3 replicas), fills the stream (or, with `--partitions N`, its N partition streams,
//! each event in its key's partition as the gateway places it) with N realistic usage events,
//! and measures two readers, each in its own consumer group so neither disturbs the other: a
//! bare in-process consumer (`XREADGROUP` + `XACK`, no decoding; one per partition, all at
//! once), which is the physical limit of any consumer on this store, and then the release
//! `aggregator` binary with its default group, followed through `/metrics` until it has applied
//! all N. It then checks through `/v1/usage` that every event, token and attodollar was counted
//! exactly once, and prints one Markdown report. It stops by itself: the only open-ended wait,
//! the aggregator's, is bounded by `--timeout-secs` (by default 1.2 ms per event, at least 60 s).
//!
//! During every phase, and in an idle phase before the first, two probes measure what other
//! clients wait on the master of partition 0: a `PING` every 5 ms, and a limited key's request
//! through the release `gateway` (against the release `mock-upstream`) every 5 ms, whose limit
//! check is one script on that master (`limited`; `--no-limited-probe` leaves it out).
//!
//! ```text
//! cargo run --release -p tests --bin aggbench -- [--events 1000000] [--keys 100] [--models 10]
//!     [--cluster] [--partitions N] [--replay] [--out FILE.md]
//! ```
//! The gateway and the mock are taken from beside this executable, so build them too:
//! `cargo build --release --bin aggbench --bin aggregator --bin gateway --bin mock-upstream`.
//!
//! Layout, in the order this file uses them: `topology` (the node or the cluster, and which
//! master serves what), `servers` (the aggregator binary and the guards that kill processes),
//! `limited` (the gateway probe), `events` (the deterministic traffic and its expected totals,
//! drawn from `rng`), `stream` (preloading and the bare consumer), `probes` (`/proc`, Redis
//! `INFO`, `/metrics`, the `PING` probe), `catch_up` (following the aggregator), `conservation`
//! (the check) and `report` (Markdown).

#[path = "../aggbench/catch_up.rs"]
mod catch_up;
#[path = "../aggbench/conservation.rs"]
mod conservation;
#[path = "../aggbench/events.rs"]
mod events;
#[path = "../aggbench/limited.rs"]
mod limited;
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
#[path = "../aggbench/topology.rs"]
mod topology;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use shared::Partitions;
use tokio::time::Instant;

use crate::catch_up::Watched;
use crate::events::Generator;
use crate::limited::{ProbeGateway, RequestSummary, Requests};
use crate::report::{
    Cpu, LimiterCheck, MasterRow, Phase, ProbeLoad, ProbeSetup, RedisMemory, Report, Topology,
    Workload,
};
use crate::stream::Part;
use crate::topology::{Node, Store};

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
    /// Run on a private Redis Cluster (3 masters, by default 3 replicas, loopback) instead of one
    /// node.
    #[arg(long)]
    cluster: bool,
    /// Replicas per master with `--cluster` (0: the masters' CPU alone, which on a small
    /// machine tells the commits' own waits apart from the replicas competing for cores).
    #[arg(long, default_value_t = 1)]
    cluster_replicas: usize,
    /// Partitions of the stream (`METER_PARTITIONS`); each event goes to its key's.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Leave out the limited key's requests through a gateway (the `PING` probe stays).
    #[arg(long)]
    no_limited_probe: bool,
    /// Length of the idle phase that sets the probes' baselines.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// Give up when the aggregator has not applied every event after this many seconds.
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run `cargo build --release` for the binaries even when they are already there.
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

/// The stream both readers consume; the store is private, so a fixed name is safe.
const STREAM: &str = "aggbench:events";
/// The bare consumer's group.
const BARE_GROUP: &str = "bare";
/// The aggregator's default group, which it is left to use.
const AGGREGATOR_GROUP: &str = "aggregator";
/// The probe gateway's deployment is named from this, with a number added when the plain
/// name's slot is on another master than partition 0.
const PROBE_STREAM: &str = "aggbench-probe";

struct Binaries {
    aggregator: PathBuf,
    /// The gateway and the mock upstream, unless the limited probe is left out.
    probe: Option<(PathBuf, PathBuf)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.events > 0, "--events must be at least 1");
    ensure!(args.keys > 0, "--keys must be at least 1");
    let binaries = Binaries {
        aggregator: servers::aggregator_binary(args.rebuild)?,
        probe: if args.no_limited_probe {
            None
        } else {
            Some((
                servers::release_binary("gateway", args.rebuild)?,
                servers::release_binary("mock-upstream", args.rebuild)?,
            ))
        },
    };
    // Losing the race to a signal drops `bench`, and with it the guards that kill Redis, the
    // aggregator and the probe's processes.
    let report = tokio::select! {
        report = bench(&args, &binaries) => report?,
        () = shutdown_signal() => bail!("interrupted; every process started was stopped"),
    };
    let markdown = report.markdown();
    print!("{markdown}");
    if let Some(path) = &args.out {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("aggbench: report written to {}", path.display());
    }
    ensure!(
        report.passed(),
        "the conservation check failed, or a probe request was refused; see the report"
    );
    Ok(())
}

async fn bench(args: &Args, binaries: &Binaries) -> anyhow::Result<Report> {
    let n = args.events;
    let binary = binaries.aggregator.as_path();
    let hz = probes::clock_ticks_per_sec() as f64;
    let mut store = if args.cluster {
        eprintln!(
            "aggbench: starting a Redis Cluster (3 masters, {} replicas)",
            3 * args.cluster_replicas
        );
        Store::cluster(args.cluster_replicas).await?
    } else {
        Store::single().await?
    };
    let mut conns = store.connect_masters().await?;
    let memory_empty = probes::redis_used_memory_all(&mut conns).await?;

    let partitions = Partitions::new(STREAM, args.partitions)?;
    let mut placement = Vec::with_capacity(partitions.count());
    for keyspace in partitions.iter() {
        placement.push(store.master_of(keyspace.stream()).await?);
    }
    let parts: Vec<Part> = partitions
        .iter()
        .zip(&placement)
        .map(|(keyspace, &master)| Part {
            stream: keyspace.stream().to_owned(),
            conn: conns[master].clone(),
        })
        .collect();
    // Both probes watch the master of partition 0.
    let watched = placement[0];
    let ping_url = store.masters[watched].url.clone();

    let gateway = match &binaries.probe {
        Some((gateway, mock)) => Some(start_probe_gateway(&store, watched, gateway, mock).await?),
        None => None,
    };

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
        "aggbench: preloading {n} events into {} partition(s), ts = now − U[0, {} s] (the last {:.0} minutes)",
        partitions.count(),
        spread.as_secs(),
        spread.as_secs_f64() / 60.0
    );
    let preload = stream::preload_partitioned(&parts, &partitions, &mut generator, n).await?;
    let expected = std::mem::take(&mut generator.expected);
    let memory_after_preload = probes::redis_used_memory_all(&mut conns).await?;

    eprintln!("aggbench: idle phase ({} s)", args.idle_secs);
    let mut limiter_check = None;
    if let Some(gateway) = &gateway {
        gateway.preflight().await?;
    }
    // What the probes alone cost Redis, to tell their share from the aggregator's later.
    probes::reset_stats(&mut conns).await?;
    let ticks = node_ticks(&store.masters)?;
    let running = start_probes(&ping_url, gateway.as_ref()).await?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle = finish_probes(running, gateway.as_ref(), "idle (nothing else running)").await?;
    let probe_load = ProbeLoad {
        requests: idle.limited.as_ref().map_or(0, |l| l.latency.pings as u64),
        pings: idle.ping.pings as u64,
        commands: probes::command_stats(&mut conns).await?,
        cpu: cpu_since(&store.masters, &ticks, hz)?,
    };
    if let (Some(gateway), Some(limited)) = (&gateway, &idle.limited) {
        // The preflight and the idle phase lie within the key's 60 s window.
        limiter_check = Some(LimiterCheck {
            sent: limited.latency.pings as u64 + 1,
            counted: gateway.requests_in_window().await?,
        });
    }
    let mut phases = vec![idle];

    eprintln!("aggbench: bare consumer (group `{BARE_GROUP}` on each partition)");
    let ticks = node_ticks(&store.masters)?;
    let running = start_probes(&ping_url, gateway.as_ref()).await?;
    let bare = stream::bare_consumers(&parts, BARE_GROUP, &preload.per_partition).await?;
    phases.push(finish_probes(running, gateway.as_ref(), "the bare consumer").await?);
    let redis_cpu_bare = cpu_since(&store.masters, &ticks, hz)?;
    let memory_after_bare = probes::redis_used_memory_all(&mut conns).await?;

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
    probes::reset_stats(&mut conns).await?;
    let ticks = node_ticks(&store.masters)?;
    let replica_ticks = node_ticks(&store.replicas)?;
    let running = start_probes(&ping_url, gateway.as_ref()).await?;
    let started = Instant::now();
    let mut aggregator =
        servers::spawn_aggregator(binary, &store.seeds, STREAM, args.partitions, listen)?;
    let catch_up = catch_up::follow(
        Watched {
            aggregator: &mut aggregator,
            store: &mut store,
            conns: &mut conns,
            parts: &parts,
            group: AGGREGATOR_GROUP,
            http: &http,
            metrics_url: format!("{base_url}/metrics"),
        },
        n,
        started,
        timeout,
    )
    .await?;
    phases.push(finish_probes(running, gateway.as_ref(), "the aggregator's catch-up").await?);
    let redis_cpu_aggregator = cpu_since(&store.masters, &ticks, hz)?;
    let replica_cpu_aggregator = cpu_since(&store.replicas, &replica_ticks, hz)?;
    let aggregator_cpu = probes::cpu_ticks(aggregator.pid())? as f64 / hz;
    let redis_commands = probes::command_stats(&mut conns).await?;
    let command_durations = probes::command_durations(&mut conns).await?;
    let memory_after_aggregator = catch_up.redis_memory.last;

    eprintln!("aggbench: checking /v1/usage");
    let checks = conservation::check(&http, &base_url, &expected, n, &catch_up.metrics).await?;
    let mut redis_cpu_replay = None;
    let replay = if args.replay {
        eprintln!("aggbench: aggregator replay");
        probes::reset_stats(&mut conns).await?;
        let ticks = node_ticks(&store.masters)?;
        let running = start_probes(&ping_url, gateway.as_ref()).await?;
        let started = Instant::now();
        let mut command = tokio::process::Command::new(binary);
        command.arg("replay");
        if let Some(n) = args.replay_batch_size {
            command.arg("--batch-size").arg(n.to_string());
        }
        let output = command
            .env_clear()
            .env("REDIS_URL", &store.seeds)
            .env("METER_STREAM", STREAM)
            .env("METER_PARTITIONS", args.partitions.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .await
            .context("running aggregator replay")?;
        let wall = started.elapsed();
        phases.push(finish_probes(running, gateway.as_ref(), "the replay").await?);
        redis_cpu_replay = Some(cpu_since(&store.masters, &ticks, hz)?);
        ensure!(
            output.status.success(),
            "aggregator replay failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let scripts = probes::command_stats(&mut conns)
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
    let probe = match &gateway {
        Some(gateway) => Some(ProbeSetup {
            stream: gateway.stream.clone(),
            master_port: store.masters[watched].port,
            limiter_check,
        }),
        None => None,
    };
    drop(gateway);
    let by_key_shape = probes::memory_by_key_shape(&mut conns).await?;
    let demoted = store.demoted_masters().await?;

    let masters = store
        .masters
        .iter()
        .enumerate()
        .map(|(i, node)| MasterRow {
            port: node.port,
            partitions: (0..placement.len())
                .filter(|&p| placement[p] == i)
                .collect(),
            events: (0..placement.len())
                .filter(|&p| placement[p] == i)
                .map(|p| preload.per_partition[p])
                .sum(),
            cpu_bare: redis_cpu_bare[i],
            cpu_catch_up: redis_cpu_aggregator[i],
            cpu_idle: probe_load.cpu[i],
            cpu_replay: redis_cpu_replay.as_ref().map(|cpu: &Vec<f64>| cpu[i]),
        })
        .collect();

    Ok(Report {
        measured_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        cores: std::thread::available_parallelism().map_or(0, |c| c.get()),
        redis_version: store.version.clone(),
        topology: Topology {
            cluster: store.is_cluster(),
            streams: parts.iter().map(|p| p.stream.clone()).collect(),
            placement,
            masters,
            replicas: store.replicas.len(),
            replica_cpu_catch_up: replica_cpu_aggregator.iter().sum(),
            demoted,
            probe,
        },
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
            redis_during_bare: redis_cpu_bare.iter().sum(),
            redis_during_aggregator: redis_cpu_aggregator.iter().sum(),
            aggregator: aggregator_cpu,
            redis_commands,
            command_durations,
            probe_load,
        },
        checks,
        replay,
        phases,
    })
}

/// Starts the mock and the gateway under a stream name whose slot (and so the probe key's
/// limiter state, the deployment having one partition) is served by master `watched`.
async fn start_probe_gateway(
    store: &Store,
    watched: usize,
    gateway: &Path,
    mock: &Path,
) -> anyhow::Result<ProbeGateway> {
    let mut chosen = None;
    // Each name lands on a given one of three masters about a third of the time, so a
    // thousand tries never all miss.
    for i in 0..1000 {
        let name = if i == 0 {
            format!("{PROBE_STREAM}:events")
        } else {
            format!("{PROBE_STREAM}-{i}:events")
        };
        let probe_partitions = Partitions::new(&name, 1)?;
        if store
            .master_of(&probe_partitions.get(0).key("limits"))
            .await?
            == watched
        {
            chosen = Some((name, probe_partitions));
            break;
        }
    }
    let (name, probe_partitions) =
        chosen.context("no probe stream name lands on the master of partition 0")?;
    eprintln!(
        "aggbench: probe gateway on stream `{name}` (master {})",
        store.masters[watched].port
    );
    let gateway = ProbeGateway::start(gateway, mock, &store.seeds, &name).await?;
    // The key's id is the gateway's choice: check that its limiter state is where it was meant
    // to be.
    let limiter_key = probe_partitions
        .for_key(Some(gateway.key_id()))
        .key("limits");
    ensure!(
        store.master_of(&limiter_key).await? == watched,
        "the probe key's limiter state is not on the master of partition 0"
    );
    Ok(gateway)
}

/// The probes of one phase, running.
struct Running {
    pings: probes::Waits,
    requests: Option<Requests>,
    started: Instant,
}

async fn start_probes(ping_url: &str, gateway: Option<&ProbeGateway>) -> anyhow::Result<Running> {
    let requests = match gateway {
        Some(gateway) => Some(gateway.start_requests().await?),
        None => None,
    };
    Ok(Running {
        pings: probes::Waits::start(ping_url).await?,
        requests,
        started: Instant::now(),
    })
}

async fn finish_probes(
    running: Running,
    gateway: Option<&ProbeGateway>,
    name: &'static str,
) -> anyhow::Result<Phase> {
    let wall = running.started.elapsed();
    let ping = running.pings.finish().await?;
    let limited: Option<RequestSummary> = match (gateway, running.requests) {
        (Some(gateway), Some(requests)) => Some(gateway.finish(requests).await?),
        _ => None,
    };
    Ok(Phase {
        name,
        wall,
        ping,
        limited,
    })
}

fn node_ticks(nodes: &[Node]) -> anyhow::Result<Vec<u64>> {
    nodes.iter().map(|n| probes::cpu_ticks(n.pid)).collect()
}

/// CPU seconds of each node since `before` (from [`node_ticks`]).
fn cpu_since(nodes: &[Node], before: &[u64], hz: f64) -> anyhow::Result<Vec<f64>> {
    let now = node_ticks(nodes)?;
    Ok(now
        .iter()
        .zip(before)
        .map(|(now, before)| now.saturating_sub(*before) as f64 / hz)
        .collect())
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
