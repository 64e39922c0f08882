//! Per-key limits through real gateways sharing one Redis (CONTRACT.md §2 "Limits and 429").
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use tests::harness::{Pipeline, eventually, spawn_gateway};

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
            .http
            .post(p.gateway_url("/v1/messages"))
            .header("x-api-key", &secret)
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
        .http
        .post(p.gateway_url("/v1/messages"))
        .header("x-api-key", &secret)
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
    eventually(Duration::from_secs(5), || async {
        let r = p
            .http
            .get(format!("http://{second}/readyz"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
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
    let send = |stream: bool, extra: Value| {
        p.http
            .post(p.gateway_url("/v1/messages"))
            .header("x-api-key", &secret)
            .json(&message(stream, extra))
            .send()
    };
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
