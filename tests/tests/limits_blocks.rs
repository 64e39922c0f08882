//! Limits leased to replicas in blocks (issue 19, `gateway/src/limiter/blocks.rs`): replicas
//! admitting a busy key far from its limits from blocks they leased stay exact together, and
//! the slots of a block held by a gateway that dies free within the lease TTL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};
use tests::harness::{
    Pipeline, account_and_key, eventually, free_port, gateway_process, spawn_gateway,
    unique_stream, wait_ready,
};
use tests::mock_upstream::MockUpstream;

fn message(stream: bool, extra: Value) -> Value {
    json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": stream, "messages": [], "mock": extra})
}

/// A `/metrics` line's value, e.g. `meter_gateway_limit_blocks_total{kind="requests"}`.
async fn metric(http: &reqwest::Client, addr: SocketAddr, series: &str) -> f64 {
    tests::harness::metric(http, addr, series)
        .await
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

const REQUEST_BLOCKS: &str = "meter_gateway_limit_blocks_total{kind=\"requests\"}";
const SLOT_BLOCKS: &str = "meter_gateway_limit_blocks_total{kind=\"concurrency\"}";
const LOCAL: &str = "meter_gateway_limit_local_admissions_total";

/// One answered request: when it was sent and when its answer came, as seen by the client. The
/// gateway admitted it somewhere in between.
#[derive(Debug, Clone, Copy)]
struct Answered {
    sent: Instant,
    received: Instant,
    status: u16,
}

/// The most admissions that certainly fell in one window of `window`: for each start t (a
/// request's send time), those sent at or after t and answered before t + window. A sliding
/// log admits at most `max` in any half-open span of one window, so this must not exceed it.
fn most_in_a_window(answers: &[Answered], window: Duration) -> usize {
    let admitted: Vec<&Answered> = answers.iter().filter(|a| a.status == 200).collect();
    admitted
        .iter()
        .map(|start| {
            admitted
                .iter()
                .filter(|a| a.sent >= start.sent && a.received < start.sent + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Two replicas of `p` (its own gateway and a second one).
async fn second_replica(p: &Pipeline) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (second, stop) = spawn_gateway(&p.redis_url, &p.stream, |_| {}).await;
    wait_ready(&p.http, second).await;
    (second, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_leasing_blocks_admit_exactly_the_limit_of_a_burst() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "burst", "limits": [{"metric": "requests", "max": 300, "window_secs": 10}]}))
        .await;
    let (second, _stop) = second_replica(&p).await;
    let replicas = [p.gateway, second];
    let answers = join_all((0..600).map(|i| {
        let request = p
            .http
            .post(format!("http://{}/v1/messages", replicas[i % 2]))
            .header("x-api-key", &secret)
            .json(&message(false, json!({})));
        async move {
            let sent = Instant::now();
            let status = request.send().await.unwrap().status().as_u16();
            Answered {
                sent,
                received: Instant::now(),
                status,
            }
        }
    }))
    .await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers.iter().filter(|a| a.status == 429).count();
    assert_eq!((admitted, refused), (300, 300));
    assert!(most_in_a_window(&answers, Duration::from_secs(10)) <= 300);
    let mut blocks = 0.0;
    let mut local = 0.0;
    for addr in replicas {
        blocks += metric(&p.http, addr, REQUEST_BLOCKS).await;
        local += metric(&p.http, addr, LOCAL).await;
    }
    assert!(
        blocks > 0.0 && local > 0.0,
        "the replicas leased {blocks} blocks and admitted {local} requests from them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hammering_a_key_for_several_windows_never_admit_more_than_max_in_one() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "rolling", "limits": [{"metric": "requests", "max": 200, "window_secs": 1}]}))
        .await;
    let (second, _stop) = second_replica(&p).await;
    let replicas = [p.gateway, second];
    let until = Instant::now() + Duration::from_millis(3_500);
    let workers = (0..16).map(|w| {
        let request = p
            .http
            .post(format!("http://{}/v1/messages", replicas[w % 2]))
            .header("x-api-key", &secret)
            .json(&message(false, json!({})));
        async move {
            let mut answers = Vec::new();
            while Instant::now() < until {
                let sent = Instant::now();
                let status = request
                    .try_clone()
                    .unwrap()
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                answers.push(Answered {
                    sent,
                    received: Instant::now(),
                    status,
                });
            }
            answers
        }
    });
    let answers: Vec<Answered> = join_all(workers).await.into_iter().flatten().collect();
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers.iter().filter(|a| a.status == 429).count();
    assert!(
        refused > 0,
        "the load must reach the limit: {admitted} admitted, none refused"
    );
    assert!(
        admitted >= 400,
        "about 200 a second over 3.5 s, not {admitted}"
    );
    let most = most_in_a_window(&answers, Duration::from_secs(1));
    assert!(most <= 200, "{most} admissions within one 1 s window");
    let mut blocks = 0.0;
    for addr in replicas {
        blocks += metric(&p.http, addr, REQUEST_BLOCKS).await;
    }
    assert!(blocks > 0.0, "no block was leased: the test proves nothing");
}

fn lease_set(stream: &str, key_id: &str) -> String {
    shared::Keyspace::new(stream)
        .unwrap()
        .key(&format!("cc:{key_id}"))
}

/// Leases of the set that have not expired.
async fn live_leases(redis_url: &str, set: &str) -> u64 {
    let mut conn = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    redis::cmd("ZCOUNT")
        .arg(set)
        .arg(format!("({now}"))
        .arg("+inf")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Opens a stream that lasts about `chunk_delay_ms` × the mock's chunk count; returns its status
/// and the response, to be read to its end (or dropped) by the caller.
async fn open_stream(
    http: &reqwest::Client,
    addr: SocketAddr,
    secret: &str,
    chunk_delay_ms: u64,
) -> reqwest::Response {
    http.post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", secret)
        .json(&message(true, json!({"chunk_delay_ms": chunk_delay_ms})))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_leasing_slots_never_have_more_than_max_concurrency_streams_in_flight() {
    const MAX: usize = 40;
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (key_id, secret) = p
        .add_key(json!({"name": "wide", "max_concurrency": MAX}))
        .await;
    let (second, _stop) = second_replica(&p).await;
    let replicas = [p.gateway, second];
    let http = Arc::new(p.http.clone());
    let lease_set = lease_set(&p.stream, &key_id);
    for wave in 0..2 {
        // A few quick requests first: a replica leases slots only for a key it saw busy.
        for addr in replicas {
            for _ in 0..3 {
                open_stream(&http, addr, &secret, 0)
                    .await
                    .bytes()
                    .await
                    .unwrap();
            }
        }
        // Every admitted stream is held open until all 70 attempts have been answered, so the
        // admitted ones were all in flight together.
        let responses = join_all((0..70).map(|i| {
            let http = Arc::clone(&http);
            let secret = secret.clone();
            async move { open_stream(&http, replicas[i % 2], &secret, 300).await }
        }))
        .await;
        let admitted = responses.iter().filter(|r| r.status() == 200).count();
        let refused = responses.iter().filter(|r| r.status() == 429).count();
        assert_eq!(admitted + refused, 70, "wave {wave}");
        assert!(
            admitted <= MAX,
            "wave {wave}: {admitted} streams in flight at once"
        );
        assert!(
            admitted >= MAX / 2,
            "wave {wave}: only {admitted} of {MAX} slots used"
        );
        join_all(responses.into_iter().map(|r| r.bytes())).await;
        // A replica's idle block goes back within ~300 ms: every slot is free again.
        eventually(Duration::from_secs(5), || async {
            (live_leases(&p.redis_url, &lease_set).await == 0).then_some(())
        })
        .await;
    }
    let mut blocks = 0.0;
    for addr in replicas {
        blocks += metric(&p.http, addr, SLOT_BLOCKS).await;
    }
    assert!(
        blocks > 0.0,
        "no block of slots was leased: the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_of_slots_held_by_a_killed_gateway_frees_within_the_lease_ttl() {
    let stream = unique_stream();
    let upstream = MockUpstream::spawn().await;
    let http = reqwest::Client::new();
    let port = free_port();
    let spool = std::env::temp_dir().join(format!("meter-block-spool-{stream}"));
    let redis_url = tests::harness::redis_url();
    let (doomed, addr) = gateway_process(
        redis_url,
        &stream,
        port,
        &spool,
        &[("GATEWAY_LEASE_TTL_MS", "2000".to_owned())],
    );
    wait_ready(&http, addr).await;
    let key = account_and_key(
        &http,
        addr,
        &upstream.base_url(),
        json!({"name": "wide", "max_concurrency": 20}),
    )
    .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let key_id = key["id"].as_str().unwrap().to_owned();

    // A few quick requests show the gateway a busy key; then streams held open until it dies:
    // it leases a block of slots for them.
    for _ in 0..3 {
        let r = open_stream(&http, addr, &secret, 0).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let mut held = join_all((0..6).map(|_| open_stream(&http, addr, &secret, 1_000))).await;
    for r in &mut held {
        assert_eq!(r.status(), 200);
        r.chunk().await.unwrap();
    }
    assert!(
        metric(&http, addr, SLOT_BLOCKS).await > 0.0,
        "no block leased"
    );
    let lease_set = lease_set(&stream, &key_id);
    let mut conn = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let before: Vec<String> = redis::cmd("ZRANGE")
        .arg(&lease_set)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        before.iter().any(|m| m.starts_with('~')),
        "block leases in {before:?}"
    );

    doomed.kill();
    let killed_at = Instant::now();
    loop {
        let n = live_leases(redis_url, &lease_set).await;
        if n == 0 {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_millis(3_000),
            "{n} slot(s) still leased {:?} after the kill, with a 2 s lease TTL",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    let _ = std::fs::remove_dir_all(&spool);
}
