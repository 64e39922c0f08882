//! The relay over real sockets: every route streaming and not, with exact usage in the events;
//! the OpenAI usage chunk we ask for but the client did not; failover and cool-down; sticky
//! sessions; timeouts; client disconnects.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use serde_json::{Value, json};
use shared::UsageEvent;
use tests::harness::{Pipeline, eventually, redis_url};
use tests::mock_upstream::MockUpstream;

async fn post(p: &Pipeline, path: &str, secret: &str, body: Value) -> reqwest::Response {
    p.http
        .post(p.gateway_url(path))
        .bearer_auth(secret)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Data payloads of an SSE body (JSON only; `[DONE]` skipped).
fn sse_json(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

#[track_caller]
fn check_tokens(e: &UsageEvent, input: u64, output: u64, cache_write: u64, cache_read: u64) {
    assert_eq!(
        (
            e.input_tokens,
            e.output_tokens,
            e.cache_creation_input_tokens,
            e.cache_read_input_tokens
        ),
        (input, output, cache_write, cache_read),
        "{e:?}"
    );
}

#[tokio::test]
async fn openai_chat_usage_is_normalized_and_the_injected_usage_chunk_stays_hidden() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "codex"})).await;
    let scenario = json!({"input_tokens": 100, "output_tokens": 20, "cache_read": 30,
                          "cache_write": 5, "reasoning_tokens": 7, "service_tier": "priority",
                          "model": "gpt-4o-2024-08-06"});

    // Non-streaming: prompt_tokens 135 includes 30 cached and 5 written.
    let response = post(
        &p,
        "/v1/chat/completions",
        &secret,
        json!({
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "mock": scenario}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 135);

    // Streaming without include_usage: we ask upstream, and the client never sees the answer.
    let response = post(
        &p,
        "/v1/chat/completions",
        &secret,
        json!({
        "model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}],
        "mock": scenario}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        sse_json(&text)
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{text}"
    );
    let upstream_body = &p.upstream.received()[1].body;
    assert_eq!(upstream_body["stream_options"]["include_usage"], true);

    // Streaming with include_usage: the client asked, so it sees the usage chunk.
    let response = post(
        &p,
        "/v1/chat/completions",
        &secret,
        json!({
        "model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}], "mock": scenario}),
    )
    .await;
    let text = response.text().await.unwrap();
    assert!(
        sse_json(&text)
            .iter()
            .any(|c| c["usage"]["prompt_tokens"] == 135),
        "{text}"
    );

    // The provider quirk: usage on a chunk that also carries choices. Counted, and hidden
    // from a client that did not ask, while its choices still arrive.
    let mut quirk = scenario.clone();
    quirk["final_chunk_with_choices"] = json!(true);
    let response = post(
        &p,
        "/v1/chat/completions",
        &secret,
        json!({
        "model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}],
        "mock": quirk}),
    )
    .await;
    let text = response.text().await.unwrap();
    let chunks = sse_json(&text);
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{text}"
    );
    assert!(
        chunks
            .iter()
            .any(|c| !c["choices"][0]["finish_reason"].is_null()),
        "{text}"
    );

    let events = p.wait_for_events(4).await;
    for e in &events {
        assert_eq!(
            (e.provider.as_str(), e.endpoint.as_str(), e.status),
            ("openai", "chat_completions", 200)
        );
        assert_eq!(e.model, "gpt-4o-2024-08-06");
        assert_eq!(e.service_tier.as_deref(), Some("priority"));
        check_tokens(e, 100, 20, 5, 30);
    }
    assert_eq!(
        events.iter().map(|e| e.stream).collect::<Vec<_>>(),
        [false, true, true, true]
    );
}

#[tokio::test]
async fn responses_api_usage_and_terminal_states_are_metered() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "codex"})).await;
    let scenario = json!({"input_tokens": 400, "output_tokens": 50, "cache_read": 1000, "reasoning_tokens": 10});

    let response = post(
        &p,
        "/v1/responses",
        &secret,
        json!({"model": "gpt-5", "input": "hi", "mock": scenario}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["input_tokens"], 1400);

    let response = post(
        &p,
        "/v1/responses",
        &secret,
        json!({"model": "gpt-5", "input": "hi", "stream": true, "mock": scenario}),
    )
    .await;
    let text = response.text().await.unwrap();
    assert!(text.contains("response.completed"));

    let mut incomplete = scenario.clone();
    incomplete["responses_terminal"] = json!("incomplete");
    post(
        &p,
        "/v1/responses",
        &secret,
        json!({"model": "gpt-5", "input": "hi", "stream": true, "mock": incomplete}),
    )
    .await
    .text()
    .await
    .unwrap();

    let events = p.wait_for_events(3).await;
    for e in &events {
        assert_eq!(e.endpoint, "responses");
        check_tokens(e, 400, 50, 0, 1000);
    }
    assert_eq!(events[0].error, None);
    assert_eq!(events[1].error, None);
    assert_eq!(events[2].error.as_deref(), Some("response_incomplete"));
}

#[tokio::test]
async fn count_tokens_is_relayed_without_usage_and_models_lists_the_allowed_ones() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "a", "models": ["claude-haiku-4-5", "claude-sonnet-4-5"]}))
        .await;
    let response = p
        .http
        .post(p.gateway_url("/v1/messages/count_tokens"))
        .header("x-api-key", &secret)
        .json(&json!({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "count me"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["input_tokens"].as_u64().unwrap() > 0);
    let events = p.wait_for_events(1).await;
    assert_eq!(events[0].endpoint, "count_tokens");
    check_tokens(&events[0], 0, 0, 0, 0);

    let models: Value = p
        .http
        .get(p.gateway_url("/v1/models"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["claude-haiku-4-5", "claude-sonnet-4-5"]);
}

/// docs/gateway-api.md, "Headers and the query string": what a client sends reaches the
/// upstream, except its connection's own headers, its credentials and cookies, and what the
/// gateway sets itself.
#[tokio::test]
async fn client_headers_and_the_query_string_reach_the_upstream_but_credentials_and_cookies_do_not()
{
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "cli"})).await;
    // Sent on both routes; none of these may reach the upstream.
    let withheld = [
        ("cookie", "session=cookie-secret"),
        ("proxy-authorization", "Basic cHJveHktc2VjcmV0"),
        ("api-key", "azure-secret"),
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "named-by-connection"),
        ("accept-encoding", "gzip, br"),
        ("content-type", "text/plain"),
    ];
    let send = |path: &str, credential: (&str, String), passed: &[(&str, &str)], body: Value| {
        let mut request = p
            .http
            .post(p.gateway_url(path))
            .header(credential.0, credential.1)
            .body(body.to_string());
        for (name, value) in withheld.iter().chain(passed) {
            request = request.header(*name, *value);
        }
        request.send()
    };

    // Anthropic: the gateway key in x-api-key, and another credential in authorization (as
    // Claude Code sends with ANTHROPIC_AUTH_TOKEN set as well).
    let anthropic_passed = [
        ("user-agent", "claude-cli/2.1.0 (external, cli)"),
        ("x-stainless-lang", "js"),
        ("x-stainless-retry-count", "0"),
        ("anthropic-beta", "claude-code-20250219"),
        ("anthropic-version", "2023-06-01"),
        ("x-app", "cli"),
    ];
    let response = send(
        "/v1/messages?beta=true",
        ("x-api-key", secret.clone()),
        &anthropic_passed,
        json!({"model": "claude-haiku-4-5", "max_tokens": 5,
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let response = p
        .http
        .post(p.gateway_url("/v1/messages?beta=true"))
        .header("x-api-key", &secret)
        .bearer_auth("sk-ant-oat-client-secret")
        .json(
            &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("message_stop"));

    // OpenAI: the gateway key as the bearer token; Codex's headers.
    let openai_passed = [
        ("user-agent", "codex_cli_rs/0.171.0"),
        ("originator", "codex_cli_rs"),
        ("session-id", "0199a0c4-7c1e-7b42-9e1a-3f6a0d2b9c11"),
        ("x-codex-beta-features", "unified_exec"),
        ("openai-beta", "responses=experimental"),
    ];
    let response = send(
        "/v1/responses?beta=true&x=%2F1",
        ("authorization", format!("Bearer {secret}")),
        &openai_passed,
        json!({"model": "gpt-4o", "input": "hi", "stream": true}),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("response.completed")
    );

    let received = p.upstream.received();
    assert_eq!(received.len(), 3, "{received:?}");
    let upstream_host = p.upstream.addr.to_string();
    for (request, passed, credential) in [
        (
            &received[0],
            &anthropic_passed[..],
            ("x-api-key", "sk-upstream-anthropic"),
        ),
        (
            &received[2],
            &openai_passed[..],
            ("authorization", "Bearer sk-upstream-openai"),
        ),
    ] {
        for (name, value) in passed {
            assert_eq!(request.header(name), Some(*value), "{name}: {request:?}");
        }
        assert_eq!(request.header(credential.0), Some(credential.1));
        for (name, _) in withheld
            .iter()
            .filter(|(n, _)| !matches!(*n, "connection" | "accept-encoding" | "content-type"))
        {
            assert_eq!(request.header(name), None, "{name} was forwarded");
        }
        // Set by the gateway, whatever the client sent.
        assert_eq!(request.header("accept-encoding"), Some("identity"));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header("host"), Some(upstream_host.as_str()));
        assert_ne!(
            request.header("connection"),
            Some("keep-alive, x-hop-secret")
        );
    }
    assert_eq!(received[0].query.as_deref(), Some("beta=true"));
    assert_eq!(received[2].query.as_deref(), Some("beta=true&x=%2F1"));
    assert_eq!(received[2].path, "/v1/responses");
    // Neither credential of the Anthropic client, nor its key, reached the upstream.
    assert_eq!(received[1].query.as_deref(), Some("beta=true"));
    assert_eq!(
        received[1].header("x-api-key"),
        Some("sk-upstream-anthropic")
    );
    assert_eq!(received[1].header("authorization"), None);
    // No secret of the client's is anywhere in what the upstream got.
    for request in &received {
        for (name, value) in &request.headers {
            for secret in [
                secret.as_str(),
                "cookie-secret",
                "sk-ant-oat",
                "azure-secret",
            ] {
                assert!(!value.contains(secret), "{name}: {value}");
            }
        }
    }
}

#[tokio::test]
async fn a_failing_account_rests_and_the_request_fails_over_once() {
    let p = Pipeline::start().await;
    // The preferred account points at a closed port.
    let dead = format!("http://127.0.0.1:{}", tests::harness::free_port());
    let broken = p
        .add_account_at("anthropic", &dead, json!({"name": "broken", "priority": 0}))
        .await;
    let healthy = p
        .add_account_at(
            "anthropic",
            &p.upstream.base_url(),
            json!({"name": "healthy", "priority": 1}),
        )
        .await;
    let (_, secret) = p.add_key(json!({"name": "f"})).await;
    let request = json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [], "mock": {"output_tokens": 3}});

    let response = post(&p, "/v1/messages", &secret, request.clone()).await;
    assert_eq!(response.status(), 200);
    let (_, account) = p
        .admin(
            reqwest::Method::GET,
            &format!("/admin/accounts/{broken}"),
            None,
        )
        .await;
    assert!(account["cooling_down_until"].is_string(), "{account}");
    // While it rests, requests go straight to the healthy account.
    assert_eq!(
        post(&p, "/v1/messages", &secret, request).await.status(),
        200
    );

    let events = p.wait_for_events(2).await;
    assert!(
        events
            .iter()
            .all(|e| e.account_id.as_deref() == Some(healthy.as_str()) && e.status == 200)
    );
}

#[tokio::test]
async fn an_upstream_429_rests_both_accounts_and_reaches_the_client_with_retry_after() {
    let p = Pipeline::start().await;
    let second = MockUpstream::spawn().await;
    let a = p
        .add_account_at("anthropic", &p.upstream.base_url(), json!({"name": "a"}))
        .await;
    let b = p
        .add_account_at(
            "anthropic",
            &second.base_url(),
            json!({"name": "b", "priority": 1}),
        )
        .await;
    let (_, secret) = p.add_key(json!({"name": "r"})).await;
    let response = post(
        &p,
        "/v1/messages",
        &secret,
        json!({
        "model": "claude-haiku-4-5", "max_tokens": 5, "messages": [],
        "mock": {"error": {"status": 429, "retry_after": 7}}}),
    )
    .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        (p.upstream.received().len(), second.received().len()),
        (1, 1),
        "one failover, no more"
    );
    let (_, list) = p.admin(reqwest::Method::GET, "/admin/accounts", None).await;
    for account in list["data"].as_array().unwrap() {
        assert!(account["cooling_down_until"].is_string(), "{account}");
    }
    let events = p.wait_for_events(1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].status, events[0].error.as_deref()),
        (429, Some("upstream_rate_limited"))
    );
    assert_eq!(events[0].account_id.as_deref(), Some(b.as_str()));
    assert_ne!(a, b);
}

#[tokio::test]
async fn a_conversation_sticks_to_one_account_and_conversations_spread() {
    let p = Pipeline::start().await;
    for name in ["a", "b", "c"] {
        p.add_account_at("anthropic", &p.upstream.base_url(), json!({"name": name}))
            .await;
    }
    let (_, secret) = p.add_key(json!({"name": "s"})).await;
    for conversation in 0..12 {
        for _ in 0..3 {
            let response = post(
                &p,
                "/v1/messages",
                &secret,
                json!({
                "model": "claude-haiku-4-5", "max_tokens": 5, "messages": [],
                "metadata": {"user_id": format!("user_x_session_{conversation}")},
                "mock": {"output_tokens": 1}}),
            )
            .await;
            assert_eq!(response.status(), 200);
        }
    }
    let events = p.wait_for_events(36).await;
    let mut accounts = std::collections::HashSet::new();
    for conversation in events.chunks(3) {
        let first = &conversation[0].account_id;
        assert!(
            conversation.iter().all(|e| &e.account_id == first),
            "{conversation:?}"
        );
        accounts.insert(first.clone());
    }
    assert!(
        accounts.len() >= 2,
        "12 conversations all on one of 3 accounts"
    );
}

#[tokio::test]
async fn a_hanging_upstream_times_out_with_a_provider_shaped_504() {
    let p = Pipeline::start_with(redis_url(), |args| {
        args.upstream_first_byte_timeout_ms = Some(300);
        args.upstream_idle_timeout_ms = Some(300);
    })
    .await;
    p.add_account("anthropic").await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "h"})).await;

    let response = post(
        &p,
        "/v1/messages",
        &secret,
        json!({
        "model": "claude-haiku-4-5", "max_tokens": 5, "messages": [], "mock": {"hang": true}}),
    )
    .await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "api_error");

    let response = post(
        &p,
        "/v1/chat/completions",
        &secret,
        json!({
        "model": "gpt-4o", "messages": [], "mock": {"hang": true}}),
    )
    .await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");

    // A stream that goes quiet mid-way is cut, and what was seen is billed.
    let response = post(
        &p,
        "/v1/messages",
        &secret,
        json!({
        "model": "claude-haiku-4-5", "max_tokens": 5, "stream": true, "messages": [],
        "mock": {"input_tokens": 11, "chunk_delay_ms": 2000}}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.text().await.is_err(),
        "the client sees the stream break"
    );

    let events = p.wait_for_events(3).await;
    let kinds: Vec<(u16, Option<&str>)> = events
        .iter()
        .map(|e| (e.status, e.error.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        [
            (504, Some("upstream_timeout")),
            (504, Some("upstream_timeout")),
            (200, Some("upstream_timeout"))
        ]
    );
    assert_eq!(events[2].input_tokens, 11);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_is_billed_for_what_was_seen() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p.add_key(json!({"name": "d"})).await;
    let mut response = post(&p, "/v1/messages", &secret, json!({
        "model": "claude-haiku-4-5", "max_tokens": 500, "stream": true, "messages": [],
        "mock": {"input_tokens": 321, "cache_read": 50, "output_tokens": 40, "chunk_delay_ms": 300}})).await;
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    drop(response);

    let events = p.wait_for_events(1).await;
    let e = &events[0];
    assert_eq!(e.error.as_deref(), Some("client_disconnected"));
    assert_eq!(
        (e.input_tokens, e.cache_read_input_tokens),
        (321, 50),
        "input from message_start"
    );
    assert!(
        e.output_tokens < 40,
        "only the output seen before the disconnect: {e:?}"
    );
    // The gateway's in-flight gauge returns to zero.
    eventually(Duration::from_secs(5), || async {
        let text = p
            .http
            .get(p.gateway_url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("meter_gateway_streams_open 0").then_some(())
    })
    .await;
}

#[tokio::test]
async fn anthropic_stream_traps_are_billed_from_what_the_stream_said() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p.add_key(json!({"name": "t"})).await;
    // message_delta carries final input and cache counts: they win over message_start's.
    let response = post(
        &p,
        "/v1/messages",
        &secret,
        json!({
        "model": "claude-haiku-4-5", "max_tokens": 50, "stream": true, "messages": [],
        "mock": {"input_tokens": 10, "cache_read": 5, "output_tokens": 6, "delta_usage_full": true,
                 "delta_input_tokens": 12, "delta_cache_read": 9}}),
    )
    .await;
    response.text().await.unwrap();
    // A stream that ends cleanly but without message_stop: billed, and marked incomplete.
    let response = post(
        &p,
        "/v1/messages",
        &secret,
        json!({
        "model": "claude-haiku-4-5", "max_tokens": 50, "stream": true, "messages": [],
        "mock": {"input_tokens": 10, "output_tokens": 6, "omit_terminator": true}}),
    )
    .await;
    let text = response.text().await.unwrap();
    assert!(!text.contains("message_stop"));
    // An OpenAI chat stream without [DONE].
    p.add_account("openai").await;
    let response = post(
        &p,
        "/v1/chat/completions",
        &secret,
        json!({
        "model": "gpt-4o", "stream": true, "messages": [],
        "mock": {"input_tokens": 10, "output_tokens": 6, "omit_terminator": true}}),
    )
    .await;
    response.text().await.unwrap();

    let events = p.wait_for_events(3).await;
    check_tokens(&events[0], 12, 6, 0, 9);
    assert_eq!(events[0].error, None);
    check_tokens(&events[1], 10, 6, 0, 0);
    assert_eq!(events[1].error.as_deref(), Some("stream_incomplete"));
    assert_eq!(events[2].error.as_deref(), Some("stream_incomplete"));
}

#[tokio::test]
async fn an_account_at_its_concurrency_limit_is_skipped() {
    let p = Pipeline::start().await;
    let busy = p
        .add_account_at(
            "anthropic",
            &p.upstream.base_url(),
            json!({"name": "one-at-a-time", "max_concurrency": 1}),
        )
        .await;
    let spare = p
        .add_account_at(
            "anthropic",
            &p.upstream.base_url(),
            json!({"name": "spare", "priority": 5}),
        )
        .await;
    let (_, secret) = p.add_key(json!({"name": "c"})).await;
    let slow = post(
        &p,
        "/v1/messages",
        &secret,
        json!({
        "model": "claude-haiku-4-5", "max_tokens": 5, "stream": true, "messages": [],
        "mock": {"chunk_delay_ms": 100}}),
    )
    .await;
    let quick = post(
        &p,
        "/v1/messages",
        &secret,
        json!({
        "model": "claude-haiku-4-5", "max_tokens": 5, "messages": [], "mock": {}}),
    )
    .await;
    assert_eq!(quick.status(), 200);
    slow.text().await.unwrap();
    let events = p.wait_for_events(2).await;
    let by_stream: Vec<(bool, Option<&str>)> = events
        .iter()
        .map(|e| (e.stream, e.account_id.as_deref()))
        .collect();
    assert!(
        by_stream.contains(&(true, Some(busy.as_str()))),
        "{by_stream:?}"
    );
    assert!(
        by_stream.contains(&(false, Some(spare.as_str()))),
        "{by_stream:?}"
    );
}

/// A client that gives up before the answer's head arrives (a non-streaming call, or a stream
/// whose upstream is slow to start) still gets its request counted: hyper drops the handler
/// when the connection closes, and the gateway must publish the event anyway, and free the
/// key's concurrency slot.
#[tokio::test]
async fn a_client_that_leaves_before_the_answer_still_produces_one_event() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (open_id, open) = p.add_key(json!({"name": "impatient"})).await;
    let (one_id, one) = p
        .add_key(json!({"name": "one-at-a-time", "max_concurrency": 1}))
        .await;
    let give_up = |secret: &str, stream: bool| {
        p.http
            .post(p.gateway_url("/v1/messages"))
            .bearer_auth(secret)
            .timeout(Duration::from_millis(150))
            .json(
                &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": stream,
                          "messages": [], "mock": {"latency_ms": 4000}}),
            )
            .send()
    };
    for (secret, stream) in [(&open, false), (&open, true), (&one, false)] {
        assert!(give_up(secret, stream).await.unwrap_err().is_timeout());
    }

    let left: Vec<UsageEvent> = eventually(Duration::from_secs(10), || async {
        let left: Vec<UsageEvent> = p
            .events()
            .await
            .into_iter()
            .filter(|e| e.status == 499)
            .collect();
        (left.len() >= 3).then_some(left)
    })
    .await;
    assert_eq!(left.len(), 3, "{left:?}");
    for (e, (key, stream)) in
        left.iter()
            .zip([(&open_id, false), (&open_id, true), (&one_id, false)])
    {
        assert_eq!(
            (e.error.as_deref(), e.stream, e.key_id.as_ref()),
            (Some("client_disconnected"), stream, Some(key)),
            "{e:?}"
        );
        assert!(e.account_id.is_some(), "it was relayed: {e:?}");
        assert_eq!(e.model, "claude-haiku-4-5");
        check_tokens(e, 0, 0, 0, 0);
        // Until the client's 150 ms timeout, well before the upstream's 4 s answer. The
        // client's clock starts before it connects and the gateway's when the request is in,
        // which on a loaded machine can be most of the 150 ms apart: no lower bound but zero.
        assert!((1..2_500_000).contains(&e.latency_us), "{e:?}");
    }

    // The only slot of the max_concurrency 1 key is free again (its release reaches Redis
    // asynchronously, hence the retries).
    eventually(Duration::from_secs(5), || async {
        let r = post(
            &p,
            "/v1/messages",
            &one,
            json!({
            "model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}),
        )
        .await;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// The provider APIs never redirect, so a redirect means the account's base_url is wrong. The
/// gateway neither follows it (a POST would become a GET) nor passes it on (it would send the
/// client past the gateway): the client gets a 502 and the account rests.
#[tokio::test]
async fn an_upstream_redirect_is_a_502_and_rests_the_account() {
    let p = Pipeline::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let redirecting = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::TEMPORARY_REDIRECT,
            [(
                axum::http::header::LOCATION,
                "https://api.example.com/v1/messages",
            )],
        )
    });
    tokio::spawn(async move { axum::serve(listener, redirecting).await });
    let account = p
        .add_account_at("anthropic", &format!("http://{addr}"), json!({}))
        .await;
    let (_, secret) = p.add_key(json!({"name": "r"})).await;

    let response = post(
        &p,
        "/v1/messages",
        &secret,
        json!({
        "model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(response.status(), 502);
    assert!(response.headers().get("location").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");

    let events = p.wait_for_events(1).await;
    assert_eq!(
        (events[0].status, events[0].error.as_deref()),
        (502, Some("upstream_unreachable"))
    );
    let (_, resting) = p
        .admin(
            reqwest::Method::GET,
            &format!("/admin/accounts/{account}"),
            None,
        )
        .await;
    assert!(resting["cooling_down_until"].is_string(), "{resting}");
}
