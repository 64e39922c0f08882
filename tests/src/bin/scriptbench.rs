//! `scriptbench`: the Redis time of one limiter script call, a benchmark rather than a test.
//!
//! It starts a private `redis-server` (no persistence), then for each case calls the gateway's
//! limiter script `--calls` times in a row for one key, releasing each concurrency lease with a
//! `ZREM` as the lease keeper would, and reads `usec_per_call` of `evalsha` from
//! `INFO commandstats` (reset before each case). The key is loadgen's limited key: a requests
//! window, tokens per hour, cost per day, a budget and `max_concurrency`, none reachable.
//! "Busy" spend counters are what the aggregator keeps for a key that spent every minute of the
//! last 26 hours, every hour of the last 32 days and every day of the last 90 days; loadgen's
//! key has spent only in the minutes of its run, which is the cheap case.
//!
//! ```text
//! cargo run --release -p tests --bin scriptbench -- [--calls 20000]
//! ```
#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap is a failed run

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use gateway::bench::{Attempt, Check, KeyRecord, Limit, SCRIPT};
use redis::Script;
use redis::aio::MultiplexedConnection;
use shared::Keyspace;

#[derive(Debug, Parser)]
#[command(about = "Redis time per limiter script call")]
struct Args {
    /// Script calls per case.
    #[arg(long, default_value_t = 20_000)]
    calls: u32,
}

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// The private Redis; killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn key(id: &str, limits: &[(&str, f64, u64)], budget: Option<f64>) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        name: "bench".into(),
        limits: limits
            .iter()
            .map(|(metric, max, window_secs)| Limit {
                metric: (*metric).into(),
                max: *max,
                window_secs: *window_secs,
            })
            .collect(),
        budget_usd: budget,
        max_concurrency: Some(10_000),
        ..KeyRecord::default()
    }
}

/// Spend counters in the aggregator's layout (`aggregator/src/store/spend.rs`) for a key that spent
/// in every minute, hour and day kept.
async fn write_busy_spend(conn: &mut MultiplexedConnection, keyspace: &Keyspace, key_id: &str) {
    let sp = keyspace.key(&format!("sp:{key_id}"));
    let now = chrono::Utc::now().timestamp_millis();
    let mut pipe = redis::pipe();
    let mut fill = |hash: String, bucket: i64| {
        pipe.cmd("HSET")
            .arg(hash)
            .arg(format!("t{bucket}"))
            .arg(120)
            .arg(format!("c{bucket}"))
            .arg(360_000)
            .ignore();
    };
    let mut t = (now - 26 * HOUR_MS).div_euclid(MINUTE_MS) * MINUTE_MS;
    while t <= now {
        fill(format!("{sp}:m:{}", t.div_euclid(HOUR_MS) * HOUR_MS), t);
        t += MINUTE_MS;
    }
    let mut t = (now - 32 * DAY_MS).div_euclid(HOUR_MS) * HOUR_MS;
    while t <= now {
        fill(format!("{sp}:h:{}", t.div_euclid(DAY_MS) * DAY_MS), t);
        t += HOUR_MS;
    }
    let mut t = (now - 90 * DAY_MS).div_euclid(DAY_MS) * DAY_MS;
    while t <= now {
        fill(format!("{sp}:d"), t);
        t += DAY_MS;
    }
    pipe.cmd("HSET")
        .arg(&sp)
        .arg("t")
        .arg(1_000_000)
        .arg("ch")
        .arg(3_000_000_000u64)
        .arg("cl")
        .arg(5)
        .ignore();
    pipe.query_async::<()>(conn).await.unwrap();
}

/// Microseconds of Redis time per script call over `calls` admitted requests of `key`.
async fn time_script(
    conn: &mut MultiplexedConnection,
    keyspace: &Keyspace,
    key: &KeyRecord,
    read_spend: bool,
    calls: u32,
) -> f64 {
    let script = Script::new(SCRIPT);
    let lease_set = keyspace.key(&format!("cc:{}", key.id));
    // Loads the script, so that its first call's NOSCRIPT is not counted.
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SCRIPT)
        .query_async(conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .unwrap();
    for i in 0..calls {
        let request_id = format!("req-{i}");
        let attempt = Attempt {
            key,
            request_id: &request_id,
            now_ms: chrono::Utc::now().timestamp_millis(),
            lease_ttl_ms: 60_000,
            wait_until_ms: 0,
            read_spend,
        };
        let check = Check::new(&script, keyspace, &attempt);
        let reply: Vec<i64> = check.invocation.invoke_async(conn).await.unwrap();
        assert_eq!(reply.first(), Some(&1), "not admitted: {reply:?}");
        let _: () = redis::cmd("ZREM")
            .arg(&lease_set)
            .arg(&request_id)
            .query_async(conn)
            .await
            .unwrap();
    }
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    // Each case starts with an empty requests log, as the first one did.
    let _: () = redis::cmd("DEL")
        .arg(keyspace.key(&format!("rl:{}:60", key.id)))
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("usec_per_call="))
        })
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let port = tests::harness::free_port();
    let _server = Server(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--logfile", ""])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH"),
    );
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = None;
    for _ in 0..200 {
        if let Ok(c) = client.get_multiplexed_async_connection().await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut conn = conn.expect("redis-server did not start");
    let keyspace = Keyspace::new("meter:events").unwrap();
    let limits = [
        ("requests", 1e9, 60),
        ("tokens", 1e12, 3600),
        ("cost_usd", 1e6, 86_400),
    ];
    let requests_only = key("key_requests", &limits[..1], None);
    let quiet = key("key_quiet", &limits, Some(1e9));
    let busy = key("key_busy", &limits, Some(1e9));
    write_busy_spend(&mut conn, &keyspace, &busy.id).await;

    let cases = [
        ("`requests` window + concurrency only", &requests_only, true),
        (
            "loadgen's key, spend read, counters of a quiet key",
            &quiet,
            true,
        ),
        (
            "loadgen's key, spend read, counters of a busy key",
            &busy,
            true,
        ),
        ("loadgen's key, spend cached (busy or not)", &busy, false),
    ];
    // One shorter untimed round first: the first case measured would otherwise also pay for
    // Redis growing its allocations and the machine settling.
    for (_, key, read_spend) in &cases {
        time_script(&mut conn, &keyspace, key, *read_spend, args.calls / 4).await;
    }
    println!(
        "| script call ({} calls each) | Redis µs per call |",
        args.calls
    );
    println!("|---|---|");
    for (name, key, read_spend) in &cases {
        let usec = time_script(&mut conn, &keyspace, key, *read_spend, args.calls).await;
        println!("| {name} | {usec:.2} |");
    }
}
