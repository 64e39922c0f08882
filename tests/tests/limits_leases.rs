//! Concurrency leases and `requests` windows of slow, draining and abandoned requests (issue 21,
//! items 2, 3 and 5): a request is timed from its admission, not its arrival; a replica that is
//! shutting down keeps renewing and releasing its leases until its last request is done; an
//! admission abandoned while its script waits in Redis leaves no lease behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tests::harness::{
    Pipeline, RedisServer, eventually, redis_url, spawn_gateway_joinable, wait_ready,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Short, so that a test can outlast it; renewals come every TTL/4 = 500 ms, so a live lease
/// only lapses if the keeper stalls for 1.5 s.
const LEASE_TTL_MS: u64 = 2_000;

/// An Anthropic message whose first user turn is `tag`, so the upstream log tells requests apart.
fn tagged(tag: &str, stream: bool, extra: Value) -> Value {
    json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": stream,
           "messages": [{"role": "user", "content": tag}], "mock": extra})
}

fn reached_upstream(p: &Pipeline, tag: &str) -> bool {
    p.upstream
        .received()
        .iter()
        .any(|r| r.body["messages"][0]["content"] == tag)
}

/// Opens a request on a raw connection and sends its head and all of its body but the last
/// `held_back` bytes.
async fn start_upload(
    addr: SocketAddr,
    path: &str,
    auth: (&str, &str),
    body: &Value,
    held_back: usize,
) -> (TcpStream, Vec<u8>) {
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\
         content-type: application/json\r\n{}: {}\r\ncontent-length: {}\r\n\r\n",
        auth.0,
        auth.1,
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let (sent, rest) = body.split_at(body.len() - held_back);
    stream.write_all(sent).await.unwrap();
    (stream, rest.to_vec())
}

/// A request whose body takes `upload` to arrive, as over a slow link: the head and all but the
/// last byte at once, the last byte `upload` later. Returns the connection to read the answer.
async fn slow_upload(addr: SocketAddr, secret: &str, body: &Value, upload: Duration) -> TcpStream {
    let (mut stream, rest) =
        start_upload(addr, "/v1/messages", ("x-api-key", secret), body, 1).await;
    tokio::time::sleep(upload).await;
    stream.write_all(&rest).await.unwrap();
    stream
}

/// Reads one response to its end (requests ask for `connection: close`): status and JSON body
/// (`Null` when the body is not one JSON value, e.g. chunked).
async fn read_answer(stream: &mut TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 8192];
        // A reset after the answer (the gateway closes without reading the rest) ends it too.
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the gateway answers within 10 s");
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

/// A gateway replica on `redis_url` and `stream` whose graceful shutdown the test starts with
/// the returned sender and whose end it can await.
async fn spawn_replica(
    redis_url: &str,
    stream: &str,
    tweak: impl FnOnce(&mut gateway::Args),
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    let (addr, tx, done) = spawn_gateway_joinable(redis_url, stream, tweak).await;
    let http = reqwest::Client::new();
    wait_ready(&http, addr).await;
    (addr, tx, done)
}

async fn redis_conn(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn lease_set(p: &Pipeline, key_id: &str) -> String {
    shared::Keyspace::new(&p.stream)
        .unwrap()
        .key(&format!("cc:{key_id}"))
}

async fn leases(conn: &MultiplexedConnection, lease_set: &str) -> u64 {
    redis::cmd("ZCARD")
        .arg(lease_set)
        .query_async(&mut conn.clone())
        .await
        .unwrap()
}

/// Waits until the key's lease set is empty, for at most 5 s; returns how long that took.
async fn leases_drain(conn: &MultiplexedConnection, lease_set: &str) -> Duration {
    let started = Instant::now();
    loop {
        let n = leases(conn, lease_set).await;
        if n == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{n} lease(s) still taken after 5 s, held by no request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_slow_upload_holds_its_concurrency_slot_from_its_admission() {
    let p = Pipeline::start_with(redis_url(), |a| a.lease_ttl_ms = Some(LEASE_TTL_MS)).await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "one", "max_concurrency": 1}))
        .await;

    // Arrives now, is admitted more than a lease TTL later, then the upstream holds it.
    let upload = Duration::from_millis(LEASE_TTL_MS + 500);
    let first = slow_upload(
        p.gateway,
        &secret,
        &tagged("slow", false, json!({"hang": true})),
        upload,
    )
    .await;
    eventually(Duration::from_secs(10), || async {
        reached_upstream(&p, "slow").then_some(())
    })
    .await;

    let second = p
        .messages(&secret)
        .json(&tagged("second", false, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(
        second.status(),
        429,
        "a second request was admitted while the first held the key's only slot"
    );
    let body: Value = second.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrency 1 reached"),
        "{body}"
    );

    // The slot was the first request's: once its client leaves, the key is free again.
    drop(first);
    eventually(Duration::from_secs(10), || async {
        let r = p
            .messages(&secret)
            .json(&tagged("after", false, json!({})))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_slow_upload_counts_in_its_requests_window_from_its_admission() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(
            json!({"name": "slow", "limits": [{"metric": "requests", "max": 1, "window_secs": 2}]}),
        )
        .await;

    // The upload takes longer than the window: counted at arrival, the request would already
    // have left the window when it is admitted.
    let mut first = slow_upload(
        p.gateway,
        &secret,
        &tagged("slow", false, json!({})),
        Duration::from_millis(2_500),
    )
    .await;
    let (status, _) = read_answer(&mut first).await;
    assert_eq!(status, 200);

    let second = p
        .messages(&secret)
        .json(&tagged("second", false, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(
        second.status(),
        429,
        "a request within 2 s of the first one's admission was admitted: 1 per 2 s exceeded"
    );
    let retry_after: u64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=2).contains(&retry_after),
        "retry-after {retry_after}: until the first request leaves the window"
    );
}

#[tokio::test]
async fn a_stalled_upload_gets_a_408_in_the_routes_shape_and_one_event() {
    let p = Pipeline::start_with(redis_url(), |a| a.body_read_timeout_ms = Some(500)).await;
    p.add_account("anthropic").await;
    p.add_account("openai").await;
    let (key_id, secret) = p.add_key(json!({"name": "stalls"})).await;
    let bearer = format!("Bearer {secret}");

    let routes = [
        ("/v1/messages", ("x-api-key", secret.as_str())),
        ("/v1/chat/completions", ("authorization", bearer.as_str())),
    ];
    for (path, auth) in routes {
        let body = json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []});
        let started = Instant::now();
        // Half the body, then nothing: the client's link stalled.
        let held_back = serde_json::to_vec(&body).unwrap().len() / 2;
        let (mut stream, _rest) = start_upload(p.gateway, path, auth, &body, held_back).await;
        let (status, body) = read_answer(&mut stream).await;
        let took = started.elapsed();
        println!("{path}: {status} after {took:?}");
        assert_eq!(status, 408, "{path}: {body}");
        assert!(
            took >= Duration::from_millis(500),
            "{path}: answered after {took:?}, before the body timeout"
        );
        let message = if path == "/v1/messages" {
            assert_eq!(body["type"], "error", "{body}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
            &body["error"]["message"]
        } else {
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
            assert_eq!(body["error"]["code"], "request_timeout", "{body}");
            assert_eq!(body["error"]["param"], Value::Null, "{body}");
            &body["error"]["message"]
        };
        assert!(
            message.as_str().unwrap().contains("500 ms"),
            "{path}: {body}"
        );
    }

    let events = p.wait_for_events(2).await;
    assert_eq!(events.len(), 2, "one event per request: {events:?}");
    for event in &events {
        assert_eq!(event.status, 408);
        assert_eq!(event.error.as_deref(), Some("request_timeout"));
        assert_eq!(event.key_id.as_deref(), Some(key_id.as_str()));
    }
    assert!(
        p.upstream.received().is_empty(),
        "a request whose body never arrived reaches no upstream"
    );
    let ok = p
        .messages(&secret)
        .json(&tagged("after", false, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_keeps_its_lease_until_its_last_stream_ends() {
    // `p.gateway` is replica B; replica A is started here so the test can shut it down.
    let ttl = |a: &mut gateway::Args| a.lease_ttl_ms = Some(LEASE_TTL_MS);
    let p = Pipeline::start_with(redis_url(), ttl).await;
    p.add_account("anthropic").await;
    let (key_id, secret) = p
        .add_key(json!({"name": "one", "max_concurrency": 1}))
        .await;
    let (a, stop_a, a_done) = spawn_replica(&p.redis_url, &p.stream, ttl).await;
    let conn = redis_conn(&p.redis_url).await;
    let lease_set = lease_set(&p, &key_id);

    // 26 events 300 ms apart: ~7.5 s, far longer than the TTL and the checks below.
    let mut long = tagged(
        "long",
        true,
        json!({"chunk_delay_ms": 300, "text": vec!["word"; 40].join(" ")}),
    );
    long["max_tokens"] = json!(1000);
    let mut stream = p
        .http
        .post(format!("http://{a}/v1/messages"))
        .header("x-api-key", &secret)
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some());
    // Read as it arrives; finishes when the stream ends, with the moment it did.
    let reader = tokio::spawn(async move {
        while stream.chunk().await.unwrap().is_some() {}
        Instant::now()
    });

    // A starts its graceful shutdown: it stops accepting connections, the stream goes on.
    stop_a.send(()).unwrap();
    eventually(Duration::from_secs(5), || async {
        TcpStream::connect(a).await.is_err().then_some(())
    })
    .await;
    // Long enough for A's lease to expire, had A stopped renewing it when shutdown began.
    tokio::time::sleep(Duration::from_millis(LEASE_TTL_MS + 1_000)).await;

    let second = p
        .messages(&secret)
        .json(&tagged("second", false, json!({})))
        .send()
        .await
        .unwrap();
    assert!(
        !reader.is_finished(),
        "the stream ended before the check; it must outlast it for the check to mean anything"
    );
    assert_eq!(
        second.status(),
        429,
        "replica B admitted a second request while draining replica A still streams the first"
    );
    assert!(!a_done.is_finished(), "A is still draining its stream");

    let ended = reader.await.unwrap();
    // Released by A's keeper as the stream ended, not left to expire: an unreleased lease
    // stays in the set (ZCARD counts it) until a check prunes it or the set's own expiry, twice
    // the TTL, so a bound of one TTL tells the two apart with room for a loaded machine.
    leases_drain(&conn, &lease_set).await;
    let freed_after = ended.elapsed();
    assert!(
        freed_after < Duration::from_millis(LEASE_TTL_MS),
        "the slot was free {freed_after:?} after the stream ended"
    );
    println!("slot free {freed_after:?} after the stream's end");

    // With its last request done, A finishes its shutdown, its lease keeper included.
    tokio::time::timeout(Duration::from_secs(10), a_done)
        .await
        .expect("replica A finished its shutdown within 10 s of its last stream")
        .unwrap();
    let third = p
        .messages(&secret)
        .json(&tagged("third", false, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 200);
}

/// Pauses every write on the test's own Redis, scripts included, for at most 30 s.
async fn pause_writes(conn: &MultiplexedConnection) {
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(30_000)
        .arg("WRITE")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
}

async fn unpause(conn: &MultiplexedConnection) {
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
}

/// Whether a client's script call is held by the pause (CLIENT LIST: flag `b`, last command
/// `evalsha`, which only the gateway's limiter sends in these tests).
async fn script_waits(conn: &MultiplexedConnection) -> bool {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    list.lines().any(|line| {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or("")
                .to_owned()
        };
        field("cmd=") == "evalsha" && field("flags=").contains('b')
    })
}

async fn in_flight(p: &Pipeline) -> f64 {
    let text = p
        .http
        .get(p.gateway_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("meter_gateway_in_flight "))
        .expect("meter_gateway_in_flight in /metrics")
        .parse()
        .unwrap()
}

/// A pipeline on a Redis of the test's own (pausing it must not stall the other tests), a
/// key with `max_concurrency: 1` and the default 60 s lease TTL, and the limiter's script
/// loaded; returns the Redis (stops when dropped), the pipeline, the key's secret and its lease
/// set.
async fn paused_redis_pipeline() -> (RedisServer, Pipeline, String, String) {
    let redis = RedisServer::start();
    let p = Pipeline::start_with(&redis.url(), |_| {}).await;
    p.add_account("anthropic").await;
    let (key_id, secret) = p
        .add_key(json!({"name": "one", "max_concurrency": 1}))
        .await;
    let lease_set = lease_set(&p, &key_id);
    // One request first, so the script is cached in Redis: a paused first call would only get
    // NOSCRIPT, and a cancelled caller never sends the script itself.
    let warm = send(&p, &secret, "warm-up").send().await.unwrap();
    assert_eq!(warm.status(), 200);
    leases_drain(&redis_conn(&redis.url()).await, &lease_set).await;
    (redis, p, secret, lease_set)
}

fn send(p: &Pipeline, secret: &str, tag: &str) -> reqwest::RequestBuilder {
    p.messages(secret).json(&tagged(tag, false, json!({})))
}

/// Unpauses, waits until the held script has run, then until the key's lease set is empty
/// (far sooner than the 60 s TTL), and checks that the key's only slot admits again.
async fn script_runs_and_leaves_the_slot_free(
    p: &Pipeline,
    conn: &MultiplexedConnection,
    secret: &str,
    lease_set: &str,
) {
    unpause(conn).await;
    eventually(Duration::from_secs(10), || async {
        (!script_waits(conn).await).then_some(())
    })
    .await;
    let freed = leases_drain(conn, lease_set).await;
    println!("lease set empty {freed:?} after the script ran");
    let next = send(p, secret, "next").send().await.unwrap();
    assert_eq!(next.status(), 200, "the key's only slot is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_whose_client_leaves_while_its_script_waits_leaves_no_lease() {
    let (redis, p, secret, lease_set) = paused_redis_pipeline().await;
    let conn = redis_conn(&redis.url()).await;

    pause_writes(&conn).await;
    let gone = tokio::spawn(send(&p, &secret, "gone").send());
    eventually(Duration::from_secs(10), || async {
        script_waits(&conn).await.then_some(())
    })
    .await;
    gone.abort();
    // The handler is gone (hyper dropped it when the client hung up) while its script waits;
    // the script will take a lease for a request nobody serves.
    eventually(Duration::from_secs(10), || async {
        (in_flight(&p).await == 0.0).then_some(())
    })
    .await;
    script_runs_and_leaves_the_slot_free(&p, &conn, &secret, &lease_set).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_whose_script_outlasts_the_redis_timeout_leaves_no_lease() {
    let (redis, p, secret, lease_set) = paused_redis_pipeline().await;
    let conn = redis_conn(&redis.url()).await;

    // Redis runs the script only after the gateway's 2 s response timeout: the gateway has
    // moved on (limits fail open by default), and the lease the script takes is nobody's.
    pause_writes(&conn).await;
    let late = tokio::spawn(send(&p, &secret, "late").send());
    eventually(Duration::from_secs(10), || async {
        script_waits(&conn).await.then_some(())
    })
    .await;
    let late = late.await.unwrap().unwrap();
    assert_eq!(late.status(), 200, "admitted without a lease (fail open)");
    script_runs_and_leaves_the_slot_free(&p, &conn, &secret, &lease_set).await;
}
