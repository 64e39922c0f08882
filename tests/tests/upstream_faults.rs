//! Upstream faults, injected through the mock: a hang before the answer, a stall mid-stream, a
//! connection reset mid-stream, malformed SSE, a 429 storm and a slow drip. Each gets a
//! provider-shaped error or a clean stream end within bounded time, each is metered as exactly
//! one event with its error kind, and afterwards the gateway is healthy and serves normally.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};
use tests::harness::{Pipeline, redis_url};

/// Status, whether the body arrived whole, the body (what did arrive), and the time taken.
async fn send(
    p: &Pipeline,
    secret: &str,
    path: &str,
    body: Value,
) -> (u16, bool, String, Duration) {
    // A fresh connection per request: a fault that cuts a response makes the gateway close
    // that connection, and a pooled client could still pick it for the next request before
    // it saw the close (hyper's IncompleteMessage, seen once in CI).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let response = client
        .post(p.gateway_url(path))
        .header("x-api-key", secret)
        .bearer_auth(secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    // Chunk by chunk, so that what arrived before a cut is kept.
    let mut response = response;
    let mut bytes = Vec::new();
    let whole = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let text = match retry_after {
        Some(v) => format!("retry-after={} {text}", v.to_str().unwrap()),
        None => text,
    };
    (status, whole, text, started.elapsed())
}

fn messages(mock: Value, stream: bool) -> Value {
    json!({"model": "claude-haiku-4-5", "max_tokens": 50, "stream": stream, "messages": [],
           "mock": mock})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_end_cleanly_are_metered_once_and_leave_the_gateway_healthy() {
    let p = Pipeline::start_with(redis_url(), |args| {
        args.upstream_first_byte_timeout_ms = Some(300);
        args.upstream_idle_timeout_ms = Some(300);
        args.default_cooldown_ms = Some(50);
    })
    .await;
    p.add_account("anthropic").await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "faults"})).await;
    let bounded = Duration::from_secs(3);

    // Hang before any answer: the first-byte timeout answers 504 in the route's shape.
    let (status, whole, body, took) = send(
        &p,
        &secret,
        "/v1/messages",
        messages(json!({"hang": true}), false),
    )
    .await;
    assert_eq!((status, whole), (504, true), "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "api_error");
    assert!(took < bounded, "{took:?}");
    println!("hang: 504 after {took:?}");

    // Stall mid-stream (the next event would come after 5 s): the idle timeout cuts the
    // client's stream, which it sees as an incomplete body.
    let (status, whole, body, took) = send(
        &p,
        &secret,
        "/v1/messages",
        messages(json!({"chunk_delay_ms": 5000}), true),
    )
    .await;
    assert_eq!((status, whole), (200, false), "{body}");
    assert!(took < bounded, "{took:?}");
    println!("stall mid-stream: cut after {took:?}");

    // Connection reset after three events.
    let (status, whole, body, took) = send(
        &p,
        &secret,
        "/v1/messages",
        messages(json!({"cut_after_events": 3}), true),
    )
    .await;
    assert_eq!((status, whole), (200, false), "{body}");
    assert!(
        body.contains("message_start"),
        "what arrived before the cut was relayed"
    );
    println!("reset mid-stream: cut after {took:?}");

    // Reset after the head, before the first event: no byte reached the client yet, so it
    // gets a well-formed 502 rather than a 200 head on a connection that then breaks.
    let (status, whole, body, _) = send(
        &p,
        &secret,
        "/v1/messages",
        messages(json!({"cut_after_events": 0}), true),
    )
    .await;
    assert_eq!((status, whole), (502, true), "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["type"], "error", "{body}");

    // Malformed SSE mixed into a stream: relayed byte for byte, and the usage of the
    // well-formed events is still captured.
    let (status, whole, body, _) = send(
        &p,
        &secret,
        "/v1/messages",
        messages(
            json!({"malformed_sse": true, "input_tokens": 11, "output_tokens": 7}),
            true,
        ),
    )
    .await;
    assert_eq!((status, whole), (200, true), "{body}");
    assert!(
        body.contains("data: {not json") && body.contains("\u{fffd}"),
        "{body}"
    );
    assert!(
        body.trim_end()
            .ends_with(r#"data: {"type":"message_stop"}"#),
        "{body}"
    );
    for path in ["/v1/chat/completions", "/v1/responses"] {
        let (status, whole, body, _) = send(
            &p,
            &secret,
            path,
            json!({"model": "gpt-4o", "stream": true, "messages": [], "input": "hi",
                   "mock": {"malformed_sse": true, "input_tokens": 11, "output_tokens": 7}}),
        )
        .await;
        assert_eq!((status, whole), (200, true), "{path}: {body}");
        assert!(body.contains("data: {not json"), "{body}");
    }

    // A 429 storm: 60 concurrent requests, all refused upstream, half of them per provider.
    let storm = join_all((0..60).map(|i| {
        let (p, secret) = (&p, &secret);
        async move {
            if i % 2 == 0 {
                send(p, secret, "/v1/messages", messages(json!({"error": {"status": 429, "retry_after": 1}}), false)).await
            } else {
                send(
                    p,
                    secret,
                    "/v1/chat/completions",
                    json!({"model": "gpt-4o", "messages": [], "mock": {"error": {"status": 429, "retry_after": 1}}}),
                )
                .await
            }
        }
    }))
    .await;
    for (i, (status, whole, body, took)) in storm.iter().enumerate() {
        assert_eq!((*status, *whole), (429, true), "{body}");
        assert!(body.starts_with("retry-after=1 "), "{body}");
        let json: Value = serde_json::from_str(body.trim_start_matches("retry-after=1 ")).unwrap();
        if i % 2 == 0 {
            assert_eq!(json["error"]["type"], "rate_limit_error", "{json}");
        } else {
            assert_eq!(json["error"]["code"], "rate_limit_exceeded", "{json}");
        }
        assert!(*took < bounded, "{took:?}");
    }

    // A slow drip (an event every 100 ms, under the 300 ms idle timeout) completes.
    let (status, whole, body, took) = send(
        &p,
        &secret,
        "/v1/messages",
        messages(
            json!({"chunk_delay_ms": 100, "input_tokens": 3, "output_tokens": 2}),
            true,
        ),
    )
    .await;
    assert_eq!((status, whole), (200, true), "{body}");
    assert!(
        body.trim_end()
            .ends_with(r#"data: {"type":"message_stop"}"#)
    );
    println!("slow drip: complete after {took:?}");

    // Absurd usage (2^64 − 1 output tokens) is clamped to `shared::MAX_TOKENS` (2^32) rather
    // than overflowing the aggregator's counters; the aggregator accepts it.
    let (status, whole, body, _) = send(
        &p,
        &secret,
        "/v1/messages",
        messages(json!({"input_tokens": 1, "output_tokens": u64::MAX}), false),
    )
    .await;
    assert_eq!((status, whole), (200, true), "{body}");

    // Healthy afterwards.
    let health = p.http.get(p.gateway_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let (status, whole, body, _) = send(
        &p,
        &secret,
        "/v1/messages",
        messages(json!({"input_tokens": 5, "output_tokens": 1}), false),
    )
    .await;
    assert_eq!((status, whole), (200, true), "{body}");

    // Exactly one event per request, each with its error kind.
    let want = 1 + 1 + 1 + 1 + 3 + 60 + 1 + 1 + 1;
    let events = p.wait_for_events(want).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = if p.events().await.len() == events.len() {
        events
    } else {
        p.events().await
    };
    assert_eq!(events.len(), want);
    let mut kinds: BTreeMap<(u16, Option<String>), usize> = BTreeMap::new();
    for e in &events {
        *kinds.entry((e.status, e.error.clone())).or_default() += 1;
    }
    let expected: BTreeMap<(u16, Option<String>), usize> = [
        ((504, Some("upstream_timeout".to_owned())), 1),
        ((200, Some("upstream_timeout".to_owned())), 1),
        ((200, Some("upstream_error".to_owned())), 1),
        ((502, Some("upstream_unreachable".to_owned())), 1),
        ((200, None), 3 + 1 + 1 + 1),
        ((429, Some("upstream_rate_limited".to_owned())), 60),
    ]
    .into_iter()
    .collect();
    assert_eq!(kinds, expected);
    let malformed = &events[4];
    assert_eq!(
        (malformed.input_tokens, malformed.output_tokens),
        (11, 7),
        "usage survives malformed events"
    );
    assert_eq!(
        events[want - 2].output_tokens,
        shared::MAX_TOKENS,
        "{:?}",
        events[want - 2]
    );
    // The aggregator counts every one of them, the clamped event included.
    let usage = tests::harness::eventually(Duration::from_secs(20), || async {
        let usage = p.try_usage("").await?;
        (usage["rows"][0]["requests"].as_u64()? == want as u64).then_some(usage)
    })
    .await;
    assert_eq!(
        usage["rows"][0]["output_tokens"].as_u64().unwrap() / shared::MAX_TOKENS,
        1,
        "{usage}"
    );
}
