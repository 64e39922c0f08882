//! Per-key limits through real gateways sharing one Redis (docs/admin-api.md, docs/gateway-api.md).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use tests::harness::{Pipeline, eventually, spawn_gateway, wait_ready};

fn message(stream: bool, extra: Value) -> Value {
    json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": stream, "messages": [], "mock": extra})
}

#[tokio::test]
async fn the_sixth_request_of_a_5_per_minute_key_gets_a_429_naming_the_limit() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    p.add_account("openai").await;
    let (_, secret) = p
        .add_key(json!({"name": "five", "limits": [{"metric": "requests", "max": 5, "window_secs": 60}]}))
        .await;
    for expected_remaining in (0..5).rev() {
        let response = p
            .messages(&secret)
            .json(&message(false, json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let h = response.headers();
        assert_eq!(h["anthropic-ratelimit-requests-limit"], "5");
        assert_eq!(
            h["anthropic-ratelimit-requests-remaining"],
            expected_remaining.to_string().as_str()
        );
        assert!(h.contains_key("anthropic-ratelimit-requests-reset"));
    }
    let response = p
        .messages(&secret)
        .json(&message(false, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (55..=60).contains(&retry_after),
        "retry-after {retry_after}: until the oldest request leaves the window"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("5 requests per 60 s")
    );

    // The OpenAI routes answer in OpenAI's shape.
    let response = p
        .http
        .post(p.gateway_url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    let events = p.wait_for_events(7).await;
    let refused: Vec<_> = events.iter().filter(|e| e.status == 429).collect();
    assert_eq!(refused.len(), 2);
    assert!(
        refused
            .iter()
            .all(|e| e.error.as_deref() == Some("rate_limited") && e.key_id.is_some())
    );
    assert_eq!(
        p.upstream.received().len(),
        5,
        "refused requests never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_together_admit_exactly_the_limit() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "shared", "limits": [{"metric": "requests", "max": 10, "window_secs": 60}]}))
        .await;
    let (second, _stop) = spawn_gateway(&p.redis_url, &p.stream, |_| {}).await;
    let urls = [
        p.gateway_url("/v1/messages"),
        format!("http://{second}/v1/messages"),
    ];
    wait_ready(&p.http, second).await;
    let statuses = join_all((0..40).map(|i| {
        let request = p
            .http
            .post(&urls[i % 2])
            .header("x-api-key", &secret)
            .json(&message(false, json!({})));
        async move { request.send().await.unwrap().status().as_u16() }
    }))
    .await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 30);
}

#[tokio::test]
async fn a_streaming_request_holds_the_keys_only_concurrency_slot_until_it_ends() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "one", "max_concurrency": 1}))
        .await;
    let send =
        |stream: bool, extra: Value| p.messages(&secret).json(&message(stream, extra)).send();
    let slow = send(true, json!({"chunk_delay_ms": 100})).await.unwrap();
    assert_eq!(slow.status(), 200);
    let refused = send(false, json!({})).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrency 1")
    );
    slow.text().await.unwrap();
    // The slot is free once the stream has ended...
    eventually(Duration::from_secs(5), || async {
        (send(false, json!({})).await.ok()?.status() == 200).then_some(())
    })
    .await;
    // ...and when a client walks away mid-stream.
    let mut walked_away = send(true, json!({"chunk_delay_ms": 200})).await.unwrap();
    walked_away.chunk().await.unwrap();
    drop(walked_away);
    eventually(Duration::from_secs(5), || async {
        (send(false, json!({})).await.ok()?.status() == 200).then_some(())
    })
    .await;
}

/// Sends requests until one is refused; returns the refusal and how long after `since` it came.
async fn until_refused(
    p: &Pipeline,
    path: &str,
    secret: &str,
    body: &Value,
) -> (reqwest::Response, Duration) {
    let since = std::time::Instant::now();
    loop {
        let response = p
            .http
            .post(p.gateway_url(path))
            .bearer_auth(secret)
            .json(body)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            return (response, since.elapsed());
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        assert!(since.elapsed() < Duration::from_secs(10), "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn token_and_cost_windows_and_the_budget_trip_once_the_aggregator_has_counted() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    p.add_account("openai").await;
    let (_, tokens) = p
        .add_key(
            json!({"name": "t", "limits": [{"metric": "tokens", "max": 100, "window_secs": 3600}]}),
        )
        .await;
    let (_, cost) = p
        .add_key(json!({"name": "c", "limits": [{"metric": "cost_usd", "max": 0.001, "window_secs": 86400}]}))
        .await;
    let (_, budget) = p.add_key(json!({"name": "b", "budget_usd": 0.002})).await;
    // 150 + 10 tokens; on claude-sonnet-4-5, 1000 input tokens cost $0.003.
    let small = json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [], "mock": {"input_tokens": 150, "output_tokens": 10}});
    let dear = json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [], "mock": {"input_tokens": 1000, "output_tokens": 0}});

    // A single request may overshoot (its cost is unknown in advance); the next one is refused
    // as soon as the aggregator has counted the first.
    let first = p
        .http
        .post(p.gateway_url("/v1/messages"))
        .bearer_auth(&tokens)
        .json(&small)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let (refused, lag) = until_refused(&p, "/v1/messages", &tokens, &small).await;
    eprintln!("token limit enforced {lag:?} after the spending response");
    assert!(lag < Duration::from_secs(3), "enforcement lagged {lag:?}");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (3540..=3660).contains(&retry_after),
        "until the spend leaves the hour window: {retry_after}"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100 tokens per 3600 s")
    );

    let (refused, _) = until_refused(&p, "/v1/messages", &cost, &dear).await;
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cost_usd"),
        "{body}"
    );
    let chat = json!({"model": "gpt-4o", "messages": []});
    let response = p
        .http
        .post(p.gateway_url("/v1/chat/completions"))
        .bearer_auth(&cost)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");

    // A spent budget cannot be waited out: no retry-after, and the SDKs are told not to retry.
    let (refused, _) = until_refused(&p, "/v1/messages", &budget, &dear).await;
    assert!(refused.headers().get("retry-after").is_none());
    assert_eq!(refused.headers()["x-should-retry"], "false");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budget"),
        "{body}"
    );
}

/// The gateway decides token, cost and budget limits from spend sums it caches per key for
/// `--spend-cache-ms` (ARCHITECTURE.md, invariants). A cached sum must not admit a key for
/// longer than that once the aggregator has counted the spend that puts it over its limit.
#[tokio::test]
async fn cached_spend_admits_a_spent_key_for_at_most_the_cache_freshness_after_it_is_counted() {
    const FRESHNESS: Duration = Duration::from_millis(500);
    let p = Pipeline::start_with(tests::harness::redis_url(), |args| {
        args.spend_cache_ms = Some(FRESHNESS.as_millis() as u64)
    })
    .await;
    p.add_account("anthropic").await;
    let (id, secret) = p
        .add_key(
            json!({"name": "t", "limits": [{"metric": "tokens", "max": 100, "window_secs": 3600}]}),
        )
        .await;
    // 160 tokens: one request puts the key over its limit.
    let spend = || async {
        let response = p
            .messages(&secret)
            .json(&message(
                false,
                json!({"input_tokens": 150, "output_tokens": 10}),
            ))
            .send()
            .await
            .unwrap();
        let status = response.status();
        response.bytes().await.unwrap();
        status
    };
    let cached = "meter_gateway_limit_spend_checks_total{source=\"cache\"}";

    // The first request reads the spend counters (nothing spent yet) and caches the sum; the
    // gateway reads them after `filled`, so the sum is used without a read until at least
    // `filled + FRESHNESS / 2` (then one request refreshes it ahead of its staleness).
    let filled = std::time::Instant::now();
    assert_eq!(spend().await, 200);
    assert_eq!(spend().await, 200);
    if filled.elapsed() < FRESHNESS / 2 {
        assert_eq!(
            metric(&p, p.gateway, cached).await,
            1.0,
            "the second request was decided by the cached sum"
        );
    }

    // The admin view reads the counters, never the cache: this is when the aggregator has
    // counted the spend (or a little later).
    eventually(Duration::from_secs(5), || async {
        let (_, key) = p
            .admin(reqwest::Method::GET, &format!("/admin/keys/{id}"), None)
            .await;
        (key["usage"][0]["used"].as_f64()? >= 160.0).then_some(())
    })
    .await;
    let counted = std::time::Instant::now();

    // From `counted + FRESHNESS` on, no cached sum can be old enough to predate the count, so
    // a request sent then must be refused; before, the cache may still admit it.
    let mut admitted_after_count = 0;
    loop {
        let sent = std::time::Instant::now();
        let status = spend().await;
        if status == 429 {
            eprintln!(
                "refused {:?} after the spend was counted, {admitted_after_count} admitted from \
                 the cache in between",
                sent.duration_since(counted)
            );
            break;
        }
        assert_eq!(status, 200);
        assert!(
            sent < counted + FRESHNESS,
            "admitted a request sent {:?} after the spend was counted",
            sent.duration_since(counted)
        );
        admitted_after_count += 1;
    }
    // The refusal came from a fresh read of the counters, so it still computes retry-after
    // from the window's buckets: until the spend leaves the hour.
    let response = p
        .messages(&secret)
        .json(&message(false, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3540..=3660).contains(&retry_after), "{retry_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_key_on_one_replica_stops_it_on_another_once_its_1_s_cache_expires() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (id, secret) = p.add_key(json!({"name": "gone"})).await;
    let (other, _stop) = spawn_gateway(&p.redis_url, &p.stream, |_| {}).await;
    let send = || {
        p.http
            .post(format!("http://{other}/v1/messages"))
            .header("x-api-key", &secret)
            .json(&message(false, json!({})))
            .send()
    };
    eventually(Duration::from_secs(5), || async {
        (send().await.ok()?.status() == 200).then_some(())
    })
    .await;
    let (status, _) = p
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(status, 200);
    let deleted_at = std::time::Instant::now();
    eventually(Duration::from_secs(3), || async {
        (send().await.ok()?.status() == 401).then_some(())
    })
    .await;
    let took = deleted_at.elapsed();
    assert!(
        took <= Duration::from_millis(1500),
        "the other replica still accepted the key after {took:?}"
    );
}

/// A line's value from the gateway's `/metrics` at `addr`, e.g.
/// `meter_gateway_concurrency_waits_total{outcome="admitted"}`.
async fn metric(p: &Pipeline, addr: std::net::SocketAddr, series: &str) -> f64 {
    tests::harness::metric(&p.http, addr, series)
        .await
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// Waits until `series` on the gateway at `addr` reads `want`.
async fn metric_reaches(p: &Pipeline, addr: std::net::SocketAddr, series: &str, want: f64) {
    eventually(Duration::from_secs(5), || async {
        (metric(p, addr, series).await == want).then_some(())
    })
    .await;
}

/// An Anthropic message whose first user turn is `tag`, so the upstream log tells requests apart.
fn tagged(tag: &str, stream: bool, extra: Value) -> Value {
    json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": stream,
           "messages": [{"role": "user", "content": tag}], "mock": extra})
}

const WAITING: &str = "meter_gateway_concurrency_waiting";
const ADMITTED: &str = "meter_gateway_concurrency_waits_total{outcome=\"admitted\"}";
const TIMED_OUT: &str = "meter_gateway_concurrency_waits_total{outcome=\"timed_out\"}";
const CANCELLED: &str = "meter_gateway_concurrency_waits_total{outcome=\"cancelled\"}";

#[tokio::test]
async fn with_a_wait_a_request_over_max_concurrency_waits_for_the_stream_ahead_to_end() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "patient", "max_concurrency": 1, "concurrency_wait_ms": 2000}))
        .await;
    let send = |body: Value| p.messages(&secret).json(&body).send();
    let mut slow = send(tagged("first", true, json!({"chunk_delay_ms": 100})))
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let second = tokio::spawn(send(tagged("second", false, json!({}))));
    metric_reaches(&p, p.gateway, WAITING, 1.0).await;
    assert!(
        !second.is_finished(),
        "the second request went past a held slot"
    );

    while slow.chunk().await.unwrap().is_some() {}
    let first_ended = std::time::Instant::now();
    let second = second.await.unwrap().unwrap();
    let woke_after = first_ended.elapsed();
    assert_eq!(second.status(), 200);
    second.bytes().await.unwrap();
    eprintln!("the waiter was answered {woke_after:?} after the stream ahead ended");
    assert!(
        woke_after < Duration::from_millis(500),
        "a local release must wake the waiter at once, not after {woke_after:?}"
    );
    let bodies: Vec<Value> = p.upstream.received().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[1]["messages"][0]["content"], "second");

    metric_reaches(&p, p.gateway, WAITING, 0.0).await;
    assert_eq!(metric(&p, p.gateway, ADMITTED).await, 1.0);
    assert_eq!(metric(&p, p.gateway, TIMED_OUT).await, 0.0);
    assert_eq!(
        metric(
            &p,
            p.gateway,
            "meter_gateway_concurrency_wait_seconds_count"
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order_across_two_replicas() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "queue", "max_concurrency": 1, "concurrency_wait_ms": 10000}))
        .await;
    let (second_gateway, _stop) = spawn_gateway(&p.redis_url, &p.stream, |_| {}).await;
    wait_ready(&p.http, second_gateway).await;
    let send = |addr: std::net::SocketAddr, body: Value| {
        p.http
            .post(format!("http://{addr}/v1/messages"))
            .header("x-api-key", &secret)
            .json(&body)
            .send()
    };
    let mut holder = send(
        p.gateway,
        tagged("holder", true, json!({"chunk_delay_ms": 200})),
    )
    .await
    .unwrap();
    assert_eq!(holder.status(), 200);
    // Each waiter is queued before the next one is sent, alternating between the replicas; the
    // replica of the first waiter releases every slot, so the others must not jump it.
    let order = ["w1", "w2", "w3", "w4"];
    let mut waiters = Vec::new();
    let mut queued = [0.0, 0.0];
    for (i, tag) in order.iter().enumerate() {
        let addr = if i % 2 == 0 {
            second_gateway
        } else {
            p.gateway
        };
        waiters.push(tokio::spawn(send(addr, tagged(tag, false, json!({})))));
        queued[i % 2] += 1.0;
        metric_reaches(&p, addr, WAITING, queued[i % 2]).await;
    }
    while holder.chunk().await.unwrap().is_some() {}
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().unwrap().status(), 200);
    }
    let served: Vec<String> = p
        .upstream
        .received()
        .into_iter()
        .map(|r| {
            r.body["messages"][0]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(served, ["holder", "w1", "w2", "w3", "w4"]);
}

#[tokio::test]
async fn a_wait_that_runs_out_gets_the_usual_429_and_a_client_that_leaves_frees_its_place() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (id, secret) = p
        .add_key(json!({"name": "short", "max_concurrency": 1, "concurrency_wait_ms": 300}))
        .await;
    let send = |body: Value| p.messages(&secret).json(&body);
    let mut holder = send(tagged("holder", true, json!({"chunk_delay_ms": 500})))
        .send()
        .await
        .unwrap();
    assert_eq!(holder.status(), 200);

    let started = std::time::Instant::now();
    let refused = send(tagged("late", false, json!({}))).send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(refused.status(), 429);
    assert!(
        waited >= Duration::from_millis(300),
        "gave up after {waited:?}"
    );
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrency 1 reached"),
        "{body}"
    );
    assert_eq!(metric(&p, p.gateway, TIMED_OUT).await, 1.0);

    // A client that gives up while waiting leaves nothing behind: not in the gauge, not in the
    // Redis queue (where it would block the key's next requests until its deadline).
    let gone = send(tagged("gone", false, json!({})))
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(gone.is_err(), "the client timed out");
    metric_reaches(&p, p.gateway, CANCELLED, 1.0).await;
    metric_reaches(&p, p.gateway, WAITING, 0.0).await;
    // ...except its usage event: the key's stats show a request that was never answered.
    eventually(Duration::from_secs(5), || async {
        let events = p.events().await;
        events
            .iter()
            .any(|e| e.status == 499 && e.error.as_deref() == Some("client_disconnected"))
            .then_some(())
    })
    .await;
    let client = redis::Client::open(p.redis_url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let queue = shared::Keyspace::new(&p.stream)
        .unwrap()
        .key(&format!("cq:{id}"));
    eventually(Duration::from_secs(5), || async {
        let n: u64 = redis::cmd("ZCARD")
            .arg(&queue)
            .query_async(&mut conn.clone())
            .await
            .ok()?;
        (n == 0).then_some(())
    })
    .await;

    while holder.chunk().await.unwrap().is_some() {}
    eventually(Duration::from_secs(5), || async {
        let r = send(tagged("after", false, json!({}))).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(
        !p.upstream
            .received()
            .iter()
            .any(|r| r.body["messages"][0]["content"] == "gone"),
        "a request whose client left while waiting never reaches the upstream"
    );
}

#[tokio::test]
async fn the_admin_api_shows_current_usage_against_each_limit() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (id, secret) = p
        .add_key(json!({"name": "watched",
            "limits": [
                {"metric": "requests", "max": 5, "window_secs": 60},
                {"metric": "tokens", "max": 10000, "window_secs": 3600},
                {"metric": "cost_usd", "max": 1.0, "window_secs": 86400}],
            "budget_usd": 2.0,
            "max_concurrency": 2}))
        .await;
    // 1000 input + 20 output tokens on claude-sonnet-4-5: $0.003 + $0.0003 each.
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [],
                      "mock": {"input_tokens": 1000, "output_tokens": 20}});
    for _ in 0..3 {
        let r = p.messages(&secret).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let mut holder = p
        .messages(&secret)
        .json(&tagged(
            "holder",
            true,
            json!({"chunk_delay_ms": 300, "input_tokens": 0, "output_tokens": 0}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(holder.status(), 200);

    // Tokens and cost appear once the aggregator has counted the three responses.
    let usage = eventually(Duration::from_secs(5), || async {
        let (status, key) = p
            .admin(reqwest::Method::GET, &format!("/admin/keys/{id}"), None)
            .await;
        assert_eq!(status, 200, "{key}");
        let usage = key["usage"].as_array().unwrap().clone();
        (usage[1]["used"] == 3060.0).then_some(usage)
    })
    .await;
    let find = |metric: &str| {
        usage
            .iter()
            .find(|u| u["metric"] == metric)
            .unwrap_or_else(|| panic!("no {metric} in {usage:?}"))
            .clone()
    };
    let requests = find("requests");
    assert_eq!(requests["window_secs"], 60);
    assert_eq!(requests["max"], 5.0);
    assert_eq!(requests["used"], 4.0, "three answered and one streaming");
    assert_eq!(requests["remaining"], 1.0);
    let resets = requests["resets_in_secs"].as_u64().unwrap();
    assert!((55..=60).contains(&resets), "{resets}");
    let tokens = find("tokens");
    assert_eq!(tokens["remaining"], 10000.0 - 3060.0);
    assert!(tokens["resets_in_secs"].as_u64().unwrap() > 3500);
    let cost = find("cost_usd");
    assert!(
        (cost["used"].as_f64().unwrap() - 0.0099).abs() < 1e-9,
        "{cost}"
    );
    let budget = find("budget_usd");
    assert!(
        (budget["used"].as_f64().unwrap() - 0.0099).abs() < 1e-9,
        "{budget}"
    );
    assert!(budget["resets_in_secs"].is_null());
    let concurrency = find("concurrency");
    assert_eq!(concurrency["max"], 2.0);
    assert_eq!(concurrency["used"], 1.0, "the stream holds a slot");
    assert_eq!(concurrency["waiting"], 0);
    // Counts are integers in the JSON (`3`, not `3.0`); only money has a fraction, in the
    // usage and in the limits as configured alike.
    let (_, record) = p
        .admin(reqwest::Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    for limit in record["limits"].as_array().unwrap() {
        let money = limit["metric"] == "cost_usd";
        assert_eq!(limit["max"].is_f64(), money, "{limit}");
    }
    for counted in [&requests, &tokens, &concurrency] {
        for field in ["max", "used", "remaining"] {
            assert!(counted[field].is_u64(), "{field} of {counted}");
        }
    }
    assert!(
        cost["used"].is_f64() && budget["max"].is_f64(),
        "{cost} {budget}"
    );

    // The list shows the same, for every key.
    while holder.chunk().await.unwrap().is_some() {}
    let (status, list) = p.admin(reqwest::Method::GET, "/admin/keys", None).await;
    assert_eq!(status, 200);
    let listed = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed["usage"].as_array().unwrap().len(), 5);
    assert_eq!(listed["usage"][0]["used"], 4.0);
}

/// The aggregator keeps per-minute spend only 26 h after the hour (`shared::spend_retention`),
/// so a week-long window cannot read the minutes of its first, partial hour: it must count
/// that hour whole rather than nothing, in the limiter and in the admin view alike.
#[tokio::test]
async fn a_week_long_cost_window_counts_spend_in_its_first_partial_hour() {
    const HOUR_MS: i64 = 3_600_000;
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    // A window of 7 days and part of an hour, chosen so that it starts half past an hour: its
    // ragged first hour then runs 30 minutes, and spend at 50 past stays in the window for
    // 20 minutes whatever the wall clock says when the test starts.
    let now_ms = chrono::Utc::now().timestamp_millis();
    let into_hour_secs = now_ms.rem_euclid(HOUR_MS) / 1000;
    let window_secs = 7 * 86_400 + (into_hour_secs + 3_600 - 1_800) % 3_600;
    let start_ms = now_ms - window_secs * 1000;
    let spent_at = start_ms.div_euclid(HOUR_MS) * HOUR_MS + 50 * 60_000;
    let (id, secret) = p
        .add_key(json!({"name": "week",
            "limits": [{"metric": "cost_usd", "max": 0.001, "window_secs": window_secs}]}))
        .await;

    // $0.003 (1000 input tokens of claude-sonnet-4-5), spent 7 days ago: the aggregator counts
    // it in that hour and day but no longer writes its minute.
    let event = shared::UsageEvent {
        v: 1,
        id: uuid::Uuid::new_v4().to_string(),
        ts: spent_at,
        key_id: Some(id.clone()),
        account_id: None,
        provider: "anthropic".into(),
        endpoint: "messages".into(),
        model: "claude-sonnet-4-5".into(),
        status: 200,
        stream: false,
        latency_us: 1000,
        ttft_us: None,
        input_tokens: 1000,
        output_tokens: 0,
        cache_creation_input_tokens: 0,
        cache_creation_1h_input_tokens: 0,
        cache_read_input_tokens: 0,
        service_tier: None,
        error: None,
    };
    let mut conn = redis::Client::open(p.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    tests::harness::xadd_events(&mut conn, &p.stream, &[event]).await;
    // The lifetime cost is written in the same script as the hour and day.
    let lifetime = shared::Keyspace::new(&p.stream)
        .unwrap()
        .key(&format!("sp:{id}"));
    eventually(Duration::from_secs(10), || {
        let mut conn = conn.clone();
        let lifetime = lifetime.clone();
        async move {
            let nanos: Option<i64> = redis::cmd("HGET")
                .arg(&lifetime)
                .arg("ch")
                .query_async(&mut conn)
                .await
                .unwrap();
            (nanos? >= 3_000_000).then_some(())
        }
    })
    .await;

    // Both are read before either is judged, so a failure shows the two.
    let (status, key) = p
        .admin(reqwest::Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(status, 200, "{key}");
    let used = key["usage"][0]["used"].as_f64().unwrap();
    let response = p
        .messages(&secret)
        .json(&message(false, json!({})))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert!(
        status == 429 && (used - 0.003).abs() < 1e-9,
        "spend of $0.003 7 days ago, inside the window: the admin view shows ${used}, the \
         next request got {status}: {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cost_usd"),
        "{body}"
    );
}
