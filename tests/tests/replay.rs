//! `aggregator replay` (docs/replay.md) through the built binary, against a live aggregator that
//! keeps consuming: re-pricing under live traffic equals an independent recomputation, an
//! unchanged price reproduces every stored figure bit for bit, and a range replay re-prices only
//! its days.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use aggregator::cell::Cell;
use redis::AsyncCommands;
use rust_decimal::Decimal;
use shared::UsageEvent;
use tests::fixtures::{Lcg, hand_cost, hand_savings};
use tests::harness::{
    eventually, free_port, redis_url, spawn_aggregator, spawn_aggregator_with, unique_stream,
};
use tests::process::{Process, binary};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// Twice the list prices of `fixtures::list_price`: input, output, 5m write, 1h write, read.
const DOUBLED: &str = r#"{
  "claude-sonnet-4-5": {"input_cost_per_token": 6e-06, "output_cost_per_token": 3e-05,
    "cache_creation_input_token_cost": 7.5e-06, "cache_creation_input_token_cost_above_1hr": 1.2e-05,
    "cache_read_input_token_cost": 6e-07, "litellm_provider": "anthropic", "mode": "chat"},
  "gpt-4o": {"input_cost_per_token": 5e-06, "output_cost_per_token": 2e-05,
    "cache_creation_input_token_cost": 5e-06, "cache_creation_input_token_cost_above_1hr": 5e-06,
    "cache_read_input_token_cost": 2.5e-06, "litellm_provider": "openai", "mode": "chat"}
}"#;

/// The cost under [`DOUBLED`], computed without our pricing code: models it lacks cost 0.
fn doubled_cost(e: &UsageEvent) -> Decimal {
    match e.model.as_str() {
        "claude-sonnet-4-5" | "gpt-4o" => hand_cost(e) * Decimal::from(2),
        _ => Decimal::ZERO,
    }
}

/// What cache reads saved under [`DOUBLED`]: both rates doubled, so twice the saving.
fn doubled_savings(e: &UsageEvent) -> Decimal {
    match e.model.as_str() {
        "claude-sonnet-4-5" | "gpt-4o" => hand_savings(e) * Decimal::from(2),
        _ => Decimal::ZERO,
    }
}

fn event(rng: &mut Lcg, id: String, ts: i64) -> UsageEvent {
    let models = [
        "claude-sonnet-4-5",
        "gpt-4o",
        "claude-haiku-4-5",
        "no-such-model",
    ];
    let model = models[rng.next(4) as usize];
    let cache_creation = if model == "gpt-4o" { 0 } else { rng.next(300) };
    UsageEvent {
        v: 1,
        id,
        ts,
        key_id: [Some("key_a"), Some("key_b"), None][rng.next(3) as usize].map(str::to_owned),
        account_id: Some(format!("acct_{}", rng.next(2))),
        provider: if model == "gpt-4o" {
            "openai"
        } else {
            "anthropic"
        }
        .into(),
        endpoint: "messages".into(),
        model: model.into(),
        status: [200, 200, 200, 429][rng.next(4) as usize],
        stream: rng.next(2) == 0,
        latency_us: 10_000 + rng.next(1_000_000),
        ttft_us: Some(5_000 + rng.next(100_000)),
        input_tokens: rng.next(20_000),
        output_tokens: rng.next(4_000),
        cache_creation_input_tokens: cache_creation,
        cache_creation_1h_input_tokens: rng.next(cache_creation + 1),
        cache_read_input_tokens: rng.next(50_000),
        service_tier: None,
        error: None,
    }
}

/// Events over the last `days` days, every tenth one a second copy of an earlier id.
fn history(seed: u64, n: usize, now: i64, days: i64) -> Vec<UsageEvent> {
    let mut rng = Lcg(seed);
    let mut out: Vec<UsageEvent> = Vec::with_capacity(n);
    for i in 0..n {
        if i % 10 == 9 {
            let copy = out[rng.next(out.len() as u64) as usize].clone();
            out.push(copy);
            continue;
        }
        // Not within minutes of the minute cells' 48 h retention: such a cell can expire
        // between two snapshots of the figures a test compares (1 run in 4 of one test failed
        // so).
        let ts = loop {
            let ts = now - rng.next((days * DAY) as u64) as i64;
            if (ts - (now - 2 * DAY)).abs() > 10 * 60_000 {
                break ts;
            }
        };
        out.push(event(&mut rng, format!("{seed}-{i}"), ts));
    }
    out
}

async fn write(conn: &mut redis::aio::MultiplexedConnection, stream: &str, events: &[UsageEvent]) {
    tests::harness::xadd_events(conn, stream, events).await;
}

/// Distinct events (the first copy of an id counts).
fn distinct(events: &[UsageEvent]) -> Vec<UsageEvent> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter(|e| seen.insert(e.id.clone()))
        .cloned()
        .collect()
}

fn keyspace(stream: &str) -> shared::Keyspace {
    shared::Keyspace::new(stream).unwrap()
}

/// Every stats and spend figure of the deployment, field by field. A cost is stored as two
/// counters (`ch` nanodollars + `cl` attodollars) whose split depends on how events were
/// batched, so they are compared as one value. Spend-window costs (`c<bucket>`) are whole
/// nanodollars rounded up per batch, so they are returned apart, to be compared within that
/// rounding.
type Hashes = BTreeMap<String, BTreeMap<String, i128>>;

async fn figures(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> (Hashes, Hashes) {
    let ks = keyspace(stream);
    let (mut exact, mut rounded) = (Hashes::new(), Hashes::new());
    // Stats cells: one packed value per tuple, compared figure by figure (its stamp differs).
    let keys: Vec<String> = conn.keys(ks.key("st:*")).await.unwrap();
    for key in keys {
        let fields: BTreeMap<String, Vec<u8>> = conn.hgetall(&key).await.unwrap();
        let into = exact.entry(key.clone()).or_default();
        for (tuple, value) in fields {
            let cell = Cell::decode(&value).unwrap_or_else(|| panic!("{key} {tuple:?}"));
            for (figure, n) in cell.figures() {
                into.insert(format!("{figure}:{tuple}"), n);
            }
        }
    }
    let keys: Vec<String> = conn.keys(ks.key("sp:*")).await.unwrap();
    for key in keys {
        let fields: BTreeMap<String, i64> = conn.hgetall(&key).await.unwrap();
        for (field, v) in fields {
            let v = i128::from(v);
            let (name, v, into) = if field == "ch" {
                ("cost".to_owned(), v * 1_000_000_000, &mut exact)
            } else if field == "cl" {
                ("cost".to_owned(), v, &mut exact)
            } else if field.starts_with('c') && field[1..].parse::<i64>().is_ok() {
                (field, v, &mut rounded)
            } else {
                (field, v, &mut exact)
            };
            *into
                .entry(key.clone())
                .or_default()
                .entry(name)
                .or_default() += v;
        }
    }
    (exact, rounded)
}

#[track_caller]
fn assert_same_figures(got: &(Hashes, Hashes), want: &(Hashes, Hashes), what: &str) {
    assert_eq!(got.0, want.0, "{what}: stats and exact spend");
    assert_eq!(
        got.1.keys().collect::<Vec<_>>(),
        want.1.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (key, fields) in &want.1 {
        assert_eq!(
            got.1[key].keys().collect::<Vec<_>>(),
            fields.keys().collect::<Vec<_>>()
        );
        for (field, v) in fields {
            let diff = (got.1[key][field] - v).abs();
            assert!(
                diff <= 3,
                "{what}: {key} {field}: {} vs {v}",
                got.1[key][field]
            );
        }
    }
}

/// Sum of the exact costs in the hashes matching `pattern`: stats cells (`st:…`) or lifetime
/// spend (`sp:<key>`: `ch` nanodollars + `cl` attodollars), in USD.
async fn stored_cost(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    pattern: &str,
) -> Decimal {
    if pattern.starts_with("st:") {
        return stored_in_cells(conn, stream, pattern, |t| t.cost).await;
    }
    let keys: Vec<String> = conn.keys(keyspace(stream).key(pattern)).await.unwrap();
    let mut atto: i128 = 0;
    for key in keys {
        let fields: BTreeMap<String, i64> = conn.hgetall(&key).await.unwrap();
        for (field, v) in fields {
            if field == "ch" {
                atto += i128::from(v) * 1_000_000_000;
            } else if field == "cl" {
                atto += i128::from(v);
            }
        }
    }
    Decimal::from_i128_with_scale(atto, 18)
}

/// Sum of one money figure of the stats cells in the hashes matching `pattern`, in USD.
async fn stored_in_cells(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    pattern: &str,
    figure: fn(&aggregator::Totals) -> aggregator::pricing::Cost,
) -> Decimal {
    let keys: Vec<String> = conn.keys(keyspace(stream).key(pattern)).await.unwrap();
    let mut atto: i128 = 0;
    for key in keys {
        let cells: BTreeMap<String, Vec<u8>> = conn.hgetall(&key).await.unwrap();
        for value in cells.values() {
            atto += figure(&Cell::decode(value).unwrap().totals).atto();
        }
    }
    Decimal::from_i128_with_scale(atto, 18)
}

async fn usage_requests(http: &reqwest::Client, aggregator: std::net::SocketAddr, now: i64) -> i64 {
    let from = (now - 20 * DAY).div_euclid(HOUR) * HOUR;
    let to = (now + 2 * HOUR).div_euclid(HOUR) * HOUR;
    let url = format!("http://{aggregator}/v1/usage?from={from}&to={to}");
    let Ok(response) = http.get(&url).send().await else {
        return -1;
    };
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    body["rows"][0]["requests"].as_i64().unwrap_or(0)
}

/// A new stream holding `events`, and a connection to its Redis.
async fn stream_of(events: &[UsageEvent]) -> (String, redis::aio::MultiplexedConnection) {
    let stream = unique_stream();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    write(&mut conn, &stream, events).await;
    (stream, conn)
}

/// Waits until `/v1/usage` counts `n` requests.
async fn until_requests(
    http: &reqwest::Client,
    aggregator: std::net::SocketAddr,
    now: i64,
    n: i64,
) {
    eventually(Duration::from_secs(30), || async {
        (usage_requests(http, aggregator, now).await == n).then_some(())
    })
    .await;
}

fn replay(stream: &str, extra: &[&str]) -> String {
    let output = Command::new(binary("aggregator", "aggregator"))
        .arg("replay")
        .args(extra)
        .env_clear()
        .env("REDIS_URL", redis_url())
        .env("METER_STREAM", stream)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "replay failed: {stdout}\n{stderr}");
    assert!(stderr.contains("replay:"), "progress on stderr: {stderr}");
    stdout
}

/// A price file holding [`DOUBLED`].
fn price_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("prices-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, DOUBLED).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_under_live_load_reprices_everything_exactly_once() {
    let now = chrono::Utc::now().timestamp_millis();
    let before = history(7, 3000, now, 12);
    let (stream, mut conn) = stream_of(&before).await;
    let (aggregator, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let n_before = distinct(&before).len() as i64;
    until_requests(&http, aggregator, now, n_before).await;

    // Live traffic keeps arriving from before the replay starts until after it switched.
    let replay_binary = tokio::task::spawn_blocking(|| binary("aggregator", "aggregator"));
    replay_binary.await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stream = stream.clone();
        let mut conn = conn.clone();
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut rng = Lcg(99);
            let mut written = Vec::new();
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || round < 10 {
                let batch: Vec<UsageEvent> = (0..20)
                    .map(|i| {
                        let ts = chrono::Utc::now().timestamp_millis() - rng.next(1000) as i64;
                        event(&mut rng, format!("live-{round}-{i}"), ts)
                    })
                    .collect();
                write(&mut conn, &stream, &batch).await;
                written.extend(batch);
                round += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            written
        })
    };
    let file = price_file();
    let summary = tokio::task::spawn_blocking({
        let stream = stream.clone();
        let path = file.to_str().unwrap().to_owned();
        move || replay(&stream, &["--pricing", &path])
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    eprintln!("{summary}");
    assert!(summary.contains("done"), "{summary}");
    assert!(summary.contains("claude-sonnet-4-5"), "{summary}");
    let live = writer.await.unwrap();

    let all: Vec<UsageEvent> = distinct(&[before, live].concat());
    let n = all.len() as i64;
    until_requests(&http, aggregator, now, n).await;

    // Every event priced once at the new prices: hour cells, day cells, month cells, and
    // every key's lifetime spend.
    let want: Decimal = all.iter().map(doubled_cost).sum();
    assert!(want > Decimal::ZERO);
    let want_saved: Decimal = all.iter().map(doubled_savings).sum();
    assert!(want_saved > Decimal::ZERO);
    for cells in ["st:h:*", "st:d:*", "st:M:*"] {
        assert_eq!(
            stored_cost(&mut conn, &stream, cells).await,
            want,
            "{cells}"
        );
        assert_eq!(
            stored_in_cells(&mut conn, &stream, cells, |t| t.cache_savings).await,
            want_saved,
            "cache savings in {cells}"
        );
    }
    for key in ["key_a", "key_b"] {
        let want: Decimal = all
            .iter()
            .filter(|e| e.key_id.as_deref() == Some(key))
            .map(doubled_cost)
            .sum();
        assert_eq!(
            stored_cost(&mut conn, &stream, &format!("sp:{key}")).await,
            want,
            "lifetime spend of {key}"
        );
    }
    // Tokens did not change, and the API agrees with the cells.
    let from = (now - 20 * DAY).div_euclid(HOUR) * HOUR;
    let to = (now + 2 * HOUR).div_euclid(HOUR) * HOUR;
    let body: serde_json::Value = http
        .get(format!("http://{aggregator}/v1/usage?from={from}&to={to}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = &body["rows"][0];
    assert_eq!(
        Decimal::from_str(row["cost_usd"].as_str().unwrap()).unwrap(),
        want
    );
    assert_eq!(
        Decimal::from_str(row["cache_savings_usd"].as_str().unwrap()).unwrap(),
        want_saved
    );
    let input: u64 = all.iter().map(|e| e.input_tokens).sum();
    assert_eq!(row["input_tokens"].as_u64().unwrap(), input);

    // Live consumers now price new events with the replayed prices.
    let mut rng = Lcg(5);
    let after = vec![event(&mut rng, "after-1".into(), now)];
    write(&mut conn, &stream, &after).await;
    until_requests(&http, aggregator, now, n + 1).await;
    assert_eq!(
        stored_cost(&mut conn, &stream, "st:d:*").await,
        want + doubled_cost(&after[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_unchanged_prices_reproduces_every_figure_and_is_idempotent() {
    let now = chrono::Utc::now().timestamp_millis();
    let events = history(11, 2000, now, 5);
    let (stream, mut conn) = stream_of(&events).await;
    let (aggregator, stop) = spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let n = distinct(&events).len() as i64;
    until_requests(&http, aggregator, now, n).await;
    let _ = stop.send(());
    let original = figures(&mut conn, &stream).await;
    assert!(original.0.len() > 50, "{}", original.0.len());

    replay(&stream, &[]);
    assert_same_figures(
        &figures(&mut conn, &stream).await,
        &original,
        "first replay",
    );
    replay(&stream, &[]);
    assert_same_figures(
        &figures(&mut conn, &stream).await,
        &original,
        "second replay",
    );
    // Nothing of the replays is left behind.
    let leftovers: Vec<String> = conn.keys(keyspace(&stream).key("rp*")).await.unwrap();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_replay_reprices_only_its_days() {
    let now = chrono::Utc::now().timestamp_millis();
    let today = now.div_euclid(DAY) * DAY;
    let events = history(13, 2000, now, 6);
    let (stream, mut conn) = stream_of(&events).await;
    let (aggregator, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let all = distinct(&events);
    let n = all.len() as i64;
    until_requests(&http, aggregator, now, n).await;

    // Rebuild the two days before yesterday; the --to bound is aligned up to a day end.
    let (from, to) = (today - 3 * DAY, today - DAY);
    let file = price_file();
    let to_raw = chrono::DateTime::from_timestamp_millis(to - 5 * HOUR)
        .unwrap()
        .to_rfc3339();
    replay(
        &stream,
        &[
            "--from",
            &from.to_string(),
            "--to",
            &to_raw,
            "--pricing",
            file.to_str().unwrap(),
        ],
    );
    // Events in the range at the doubled prices, the others still at the list prices.
    let repriced = |doubled: fn(&UsageEvent) -> Decimal, listed: fn(&UsageEvent) -> Decimal| {
        move |e: &UsageEvent| {
            if (from..to).contains(&e.ts) {
                doubled(e)
            } else {
                listed(e)
            }
        }
    };
    let cost = repriced(doubled_cost, hand_cost);
    let want: Decimal = all.iter().map(cost).sum();
    // Cache savings are recomputed with the prices too, in the range only; months, which the
    // switch computes from day differences, included.
    let saved = repriced(doubled_savings, hand_savings);
    let want_saved: Decimal = all.iter().map(saved).sum();
    assert_ne!(want_saved, all.iter().map(hand_savings).sum::<Decimal>());
    for cells in ["st:h:*", "st:d:*", "st:M:*"] {
        assert_eq!(
            stored_cost(&mut conn, &stream, cells).await,
            want,
            "{cells}"
        );
        assert_eq!(
            stored_in_cells(&mut conn, &stream, cells, |t| t.cache_savings).await,
            want_saved,
            "cache savings in {cells}"
        );
    }
    let key_a: Decimal = all
        .iter()
        .filter(|e| e.key_id.as_deref() == Some("key_a"))
        .map(cost)
        .sum();
    assert_eq!(stored_cost(&mut conn, &stream, "sp:key_a").await, key_a);
    // Each day outside the range kept its old figure.
    let day_cost = |day: i64, f: &dyn Fn(&UsageEvent) -> Decimal| -> Decimal {
        all.iter()
            .filter(|e| e.ts.div_euclid(DAY) * DAY == day)
            .map(f)
            .sum()
    };
    for day in [
        today - 4 * DAY,
        today - 3 * DAY,
        today - 2 * DAY,
        today - DAY,
    ] {
        let want = day_cost(day, &cost);
        assert_eq!(
            stored_cost(&mut conn, &stream, &format!("st:d:{day}")).await,
            want,
            "day {day}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_dies_changes_nothing_and_a_second_one_waits_for_it() {
    let now = chrono::Utc::now().timestamp_millis();
    let events = history(17, 20_000, now, 3);
    let (stream, mut conn) = stream_of(&events).await;
    let (aggregator, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let n = distinct(&events).len() as i64;
    eventually(Duration::from_secs(60), || async {
        (usage_requests(&http, aggregator, now).await == n).then_some(())
    })
    .await;
    let original = figures(&mut conn, &stream).await;

    // A replay with new prices, killed in the middle of its rebuild.
    let file = price_file();
    let mut first = Command::new(
        tokio::task::spawn_blocking(|| binary("aggregator", "aggregator"))
            .await
            .unwrap(),
    )
    .args([
        "replay",
        "--batch-size",
        "200",
        "--pricing",
        file.to_str().unwrap(),
    ])
    .env_clear()
    .env("REDIS_URL", redis_url())
    .env("METER_STREAM", &stream)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let ks = keyspace(&stream);
    let rid: i64 = eventually(Duration::from_secs(30), || {
        let mut conn = conn.clone();
        let ks = ks.clone();
        async move {
            let applied: Option<i64> = conn
                .hget(ks.key("rp1:days"), (now.div_euclid(DAY) * DAY).to_string())
                .await
                .ok()?;
            applied.filter(|a| *a > 0)?;
            Some(1)
        }
    })
    .await;

    // While it lives, a second replay is refused.
    let refused = Command::new(binary("aggregator", "aggregator"))
        .arg("replay")
        .env_clear()
        .env("REDIS_URL", redis_url())
        .env("METER_STREAM", &stream)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    first.kill().unwrap();
    first.wait().unwrap();
    // Its lease runs out (30 s; here at once), and the next live commit abandons it.
    let _: () = conn.del(ks.key(&format!("rp{rid}:lease"))).await.unwrap();
    let mut rng = Lcg(3);
    let late = vec![event(&mut rng, "after-the-crash".into(), now)];
    write(&mut conn, &stream, &late).await;
    until_requests(&http, aggregator, now, n + 1).await;
    let running: Option<String> = conn.hget(ks.key("ctl"), "rid").await.unwrap();
    assert_eq!(running, None, "the dead replay is abandoned");

    // Figures are the original ones plus the new event at the old prices; the abandoned
    // replay's prices never took effect.
    let mut want = original.clone();
    let now_day = now.div_euclid(DAY) * DAY;
    let day = want
        .0
        .get(&ks.key(&format!("st:d:{now_day}")))
        .cloned()
        .unwrap();
    let got = figures(&mut conn, &stream).await;
    let got_day = &got.0[&ks.key(&format!("st:d:{now_day}"))];
    let requests = |cell: &BTreeMap<String, i128>| -> i128 {
        cell.iter()
            .filter(|(f, _)| f.starts_with("r:"))
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(requests(got_day), requests(&day) + 1);
    let cost_of = |cell: &BTreeMap<String, i128>| -> i128 {
        cell.iter()
            .filter(|(f, _)| f.starts_with("cost:"))
            .map(|(_, v)| v)
            .sum()
    };
    let added = Decimal::from_i128_with_scale(cost_of(got_day) - cost_of(&day), 18);
    assert_eq!(added, hand_cost(&late[0]));
    want.0.remove(&ks.key(&format!("st:d:{now_day}")));
    let untouched_days: Vec<&String> = want.0.keys().filter(|k| k.contains(":st:d:")).collect();
    for key in untouched_days {
        assert_eq!(got.0[key], want.0[key], "{key}");
    }

    // Now a new replay runs, and cleans the dead one's shadow up.
    replay(&stream, &[]);
    let leftovers: Vec<String> = conn.keys(ks.key("rp*")).await.unwrap();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_refuses_days_the_stream_no_longer_holds_whole() {
    let now = chrono::Utc::now().timestamp_millis();
    let events = history(19, 500, now, 4);
    let (stream, mut conn) = stream_of(&events).await;
    let (aggregator, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let n = distinct(&events).len() as i64;
    until_requests(&http, aggregator, now, n).await;
    let original = figures(&mut conn, &stream).await;
    // Retention trimmed the oldest entries.
    let ids: Vec<Vec<redis::Value>> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(100)
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::BulkString(cut) = &ids[99][0] else {
        panic!("an entry id")
    };
    let _: i64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MINID")
        .arg(cut.as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();

    let output = Command::new(binary("aggregator", "aggregator"))
        .args(["replay", "--from", "0"])
        .env_clear()
        .env("REDIS_URL", redis_url())
        .env("METER_STREAM", &stream)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("trimmed"), "{stderr}");
    // By default it starts after the trimmed entries' day, and changes nothing there.
    let summary = replay(&stream, &[]);
    assert!(!summary.contains("1970"), "{summary}");
    assert_same_figures(
        &figures(&mut conn, &stream).await,
        &original,
        "after the replay",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_before_any_consumer_leaves_every_entry_to_them() {
    let now = chrono::Utc::now().timestamp_millis();
    let events = history(23, 300, now, 3);
    let (stream, _) = stream_of(&events).await;

    // No consumer group exists yet: nothing was delivered, so nothing is acknowledged.
    let summary = replay(&stream, &["--from", "0"]);
    assert!(
        summary.contains(&format!("{} left to the live consumers", events.len())),
        "{summary}"
    );

    // The first aggregator then counts every event once.
    let (aggregator, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let n = distinct(&events).len() as i64;
    until_requests(&http, aggregator, now, n).await;
}

/// Events written after `history`, all at `now`: the replay's overlap with live commits.
fn fresh(seed: u64, n: usize, now: i64) -> Vec<UsageEvent> {
    let mut rng = Lcg(seed);
    (0..n)
        .map(|i| event(&mut rng, format!("fresh-{seed}-{i}"), now))
        .collect()
}

fn aggregator_env(stream: &str, window_secs: Option<i64>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("REDIS_URL", redis_url().to_owned()),
        ("METER_STREAM", stream.to_owned()),
        ("AGGREGATOR_LISTEN", format!("127.0.0.1:{}", free_port())),
    ];
    if let Some(secs) = window_secs {
        env.push(("METER_DEDUPE_WINDOW_SECS", secs.to_string()));
    }
    env
}

/// The running replay's id, once one has registered.
async fn registered(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Option<i64> {
    let rid: Option<i64> = conn.hget(keyspace(stream).key("ctl"), "rid").await.ok()?;
    rid.filter(|r| *r > 0)
}

/// Entries that a live consumer commits after a replay registered, which the replay then finds
/// acknowledged: the live commit puts them into the replay's copy, and the replay must not
/// apply them again — however long its rebuild takes (`wait_for_expiry`: longer than three
/// dedupe windows, when seen-sets used to expire) and whatever dedupe window the replay
/// process was configured with (`replay_window`).
async fn overlap_counts_once(
    seed: u64,
    live_window: i64,
    replay_window: i64,
    wait_for_expiry: bool,
) {
    let now = chrono::Utc::now().timestamp_millis();
    let before = history(seed, 3000, now, 2);
    let (stream, mut conn) = stream_of(&before).await;
    let http = reqwest::Client::new();
    let n_before = distinct(&before).len() as i64;

    // A live aggregator counts the history, then dies: what arrives next stays unread.
    let port_env = aggregator_env(&stream, Some(live_window));
    let listen: std::net::SocketAddr = port_env[2].1.parse().unwrap();
    let first =
        tokio::task::spawn_blocking(move || Process::spawn("aggregator", "aggregator", &port_env))
            .await
            .unwrap();
    until_requests(&http, listen, now, n_before).await;
    first.kill();
    let overlap = fresh(seed, 200, now);
    write(&mut conn, &stream, &overlap).await;

    // The replay registers and is frozen before it reads those entries.
    let log = std::env::temp_dir().join(format!("replay-{}.log", uuid::Uuid::new_v4().simple()));
    let replay_env = vec![
        ("REDIS_URL", redis_url().to_owned()),
        ("METER_STREAM", stream.clone()),
        ("METER_DEDUPE_WINDOW_SECS", replay_window.to_string()),
    ];
    let mut replay = {
        let log = log.clone();
        tokio::task::spawn_blocking(move || {
            Process::spawn_logged_args(
                "aggregator",
                "aggregator",
                &["replay", "--batch-size", "100"],
                &replay_env,
                &log,
            )
        })
        .await
        .unwrap()
    };
    // On a machine loaded enough that the whole replay ran before this test saw it registered,
    // the entries were left to the live consumers, and the figures below must hold all the same.
    let waited = std::time::Instant::now();
    let rid = loop {
        if let Some(rid) = registered(&mut conn, &stream).await {
            break Some(rid);
        }
        if replay.exited() {
            break None;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the replay never registered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let frozen = rid.is_some() && replay.try_signal("STOP");

    // A live consumer commits the new entries: to the live figures and the replay's copy.
    let (aggregator, _stop) = spawn_aggregator_with(redis_url(), &stream, |a| {
        a.dedupe_window_secs = Some(live_window)
    })
    .await;
    let n = n_before + overlap.len() as i64;
    until_requests(&http, aggregator, now, n).await;
    if let (true, Some(rid)) = (wait_for_expiry && frozen, rid) {
        // Until every seen-set of the copy that had an expiry has expired.
        let pattern = keyspace(&stream).key(&format!("rp{rid}:seen:*"));
        eventually(Duration::from_secs(30), || {
            let mut conn = conn.clone();
            let pattern = pattern.clone();
            async move {
                let keys: Vec<String> = conn.keys(&pattern).await.ok()?;
                for key in keys {
                    let ttl: i64 = conn.pttl(&key).await.ok()?;
                    if ttl >= 0 {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }

    if frozen {
        replay.signal("CONT");
    }
    let status =
        tokio::task::spawn_blocking(move || replay.wait_for_exit(Duration::from_secs(120)))
            .await
            .unwrap();
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "replay: {status:?}\n{printed}"
    );
    assert!(printed.contains("done"), "{printed}");

    let all = distinct(&[before, overlap].concat());
    assert_eq!(usage_requests(&http, aggregator, now).await, n, "{printed}");
    let want: Decimal = all.iter().map(hand_cost).sum();
    for cells in ["st:h:*", "st:d:*", "st:M:*"] {
        assert_eq!(
            stored_cost(&mut conn, &stream, cells).await,
            want,
            "{cells}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_committed_live_after_registration_count_once_after_a_long_rebuild() {
    overlap_counts_once(29, 1, 1, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_uses_the_deployments_dedupe_window_not_its_own() {
    overlap_counts_once(31, 3600, 7, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_configured_with_another_dedupe_window_refuses_to_start() {
    let stream = unique_stream();
    let (_, _stop) =
        spawn_aggregator_with(redis_url(), &stream, |a| a.dedupe_window_secs = Some(600)).await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    eventually(Duration::from_secs(30), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            let window: Option<i64> = conn.hget(keyspace(&stream).key("ctl"), "dw").await.ok()?;
            window
        }
    })
    .await;
    let _: () = conn.ping().await.unwrap();

    let env = aggregator_env(&stream, Some(900));
    let log = std::env::temp_dir().join(format!("agg-{}.log", uuid::Uuid::new_v4().simple()));
    let mut other = {
        let log = log.clone();
        tokio::task::spawn_blocking(move || {
            Process::spawn_logged("aggregator", "aggregator", &env, &log)
        })
        .await
        .unwrap()
    };
    let status = tokio::task::spawn_blocking(move || other.wait_for_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}: {printed}"
    );
    assert!(
        printed.contains("600") && printed.contains("900"),
        "names both windows: {printed}"
    );
}

/// A gateway's clock a little ahead of Redis's: an event stamped just inside the rebuilt range
/// arrived (stream time) just before it. The replay must read it, or the switch removes it from
/// the live figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stamped_inside_the_range_that_arrived_before_it_is_kept() {
    let now = chrono::Utc::now().timestamp_millis();
    let yesterday = now.div_euclid(DAY) * DAY - DAY;
    let mut rng = Lcg(37);
    let stream = unique_stream();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // (arrival, ts): one on each side of the day start, and the skewed one.
    let placed = [
        (yesterday - 60_000, yesterday - 61_000),
        (yesterday - 2_000, yesterday + 2_000),
        (yesterday + HOUR, yesterday + HOUR - 500),
    ];
    let mut events = Vec::new();
    for (i, (arrival, ts)) in placed.into_iter().enumerate() {
        let e = event(&mut rng, format!("skew-{i}"), ts);
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg(format!("{arrival}-0"))
            .arg(shared::EVENT_FIELD)
            .arg(shared::encode(&e))
            .query_async(&mut conn)
            .await
            .unwrap();
        events.push(e);
    }
    let (aggregator, stop) = spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    until_requests(&http, aggregator, now, 3).await;
    let _ = stop.send(());
    let original = figures(&mut conn, &stream).await;
    let day_cells = ks_day(&stream, yesterday);
    assert!(
        original.0.contains_key(&day_cells),
        "{:?}",
        original.0.keys()
    );

    replay(
        &stream,
        &[
            "--from",
            &yesterday.to_string(),
            "--to",
            &(yesterday + DAY).to_string(),
        ],
    );
    assert_same_figures(
        &figures(&mut conn, &stream).await,
        &original,
        "after the replay",
    );
}

fn ks_day(stream: &str, day: i64) -> String {
    keyspace(stream).key(&format!("st:d:{day}"))
}
