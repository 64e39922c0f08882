//! The walking skeleton end to end: client → gateway → mock upstream, gateway → Redis stream →
//! aggregator → `/v1/usage`, over real sockets and a real Redis.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use rust_decimal::Decimal;
use serde_json::{Value, json};
use tests::harness::{Pipeline, eventually};

use std::str::FromStr;
use std::time::Duration;

fn usd(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Claude Sonnet 4.5 list prices per token, written out by hand (LiteLLM snapshot agrees).
fn sonnet_cost(input: u64, output: u64, cache_5m: u64, cache_1h: u64, cache_read: u64) -> Decimal {
    Decimal::from(input) * usd("0.000003")
        + Decimal::from(output) * usd("0.000015")
        + Decimal::from(cache_5m) * usd("0.00000375")
        + Decimal::from(cache_1h) * usd("0.000006")
        + Decimal::from(cache_read) * usd("0.0000003")
}

/// Data payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn anthropic_requests_are_relayed_metered_and_priced_exactly() {
    let p = Pipeline::start().await;
    let account = p.add_account("anthropic").await;
    let (key_id, secret) = p.add_key(json!({"name": "alice"})).await;

    // Non-streaming, with 5-minute and 1-hour cache writes and cache reads.
    let response = p
        .messages(&secret)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello"}],
            "mock": {"input_tokens": 1200, "output_tokens": 300, "cache_creation_5m": 40,
                     "cache_creation_1h": 10, "cache_read": 4000, "text": "Hi there!",
                     "model": "claude-sonnet-4-5-20250929"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["content"][0]["text"], "Hi there!");
    assert_eq!(body["usage"]["input_tokens"], 1200);
    assert_eq!(
        body["usage"]["cache_creation"]["ephemeral_1h_input_tokens"],
        10
    );

    // Streaming, with the Bearer header form.
    let response = p
        .http
        .post(p.gateway_url("/v1/messages"))
        .bearer_auth(&secret)
        .json(&json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "stream": true,
            "messages": [{"role": "user", "content": "Hello"}],
            "mock": {"input_tokens": 25, "output_tokens": 15, "cache_read": 300, "text": "one two three"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = response.text().await.unwrap();
    let kinds: Vec<String> = sse_data(&body)
        .iter()
        .map(|d| d["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("message_start"));
    assert_eq!(kinds.last().map(String::as_str), Some("message_stop"));
    let text: String = sse_data(&body)
        .iter()
        .filter_map(|d| d["delta"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "one two three");

    // The upstream saw the account's credential, never the client's.
    let received = p.upstream.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        assert_eq!(r.header("x-api-key"), Some("sk-upstream-anthropic"));
        assert!(r.header("authorization").is_none());
    }

    // Exactly one event per request, with the normalized usage.
    let events = p.wait_for_events(2).await;
    assert_eq!(events.len(), 2);
    let (plain, streamed) = (&events[0], &events[1]);
    assert_eq!(plain.key_id.as_deref(), Some(key_id.as_str()));
    assert_eq!(plain.account_id.as_deref(), Some(account.as_str()));
    assert_eq!(
        (plain.provider.as_str(), plain.endpoint.as_str()),
        ("anthropic", "messages")
    );
    assert_eq!(plain.model, "claude-sonnet-4-5-20250929");
    assert_eq!((plain.status, plain.stream), (200, false));
    assert_eq!(
        (
            plain.input_tokens,
            plain.output_tokens,
            plain.cache_creation_input_tokens,
            plain.cache_creation_1h_input_tokens,
            plain.cache_read_input_tokens
        ),
        (1200, 300, 50, 10, 4000)
    );
    assert_eq!(plain.error, None);
    assert!(streamed.stream);
    assert_eq!(streamed.model, "claude-sonnet-4-5");
    assert_eq!(
        (
            streamed.input_tokens,
            streamed.output_tokens,
            streamed.cache_read_input_tokens
        ),
        (25, 15, 300)
    );
    assert!(streamed.ttft_us.is_some_and(|t| t <= streamed.latency_us));
    assert_ne!(plain.id, streamed.id);

    // The aggregator prices them exactly.
    let want = sonnet_cost(1200, 300, 40, 10, 4000) + sonnet_cost(25, 15, 0, 0, 300);
    assert_eq!(want, usd("0.0099"));
    let usage = eventually(Duration::from_secs(10), || async {
        let usage = p.usage("group_by=key,model").await;
        let requests: i64 = usage["rows"]
            .as_array()?
            .iter()
            .map(|r| r["requests"].as_i64().unwrap_or(0))
            .sum();
        (requests == 2).then_some(usage)
    })
    .await;
    let rows = usage["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{usage}");
    let total_cost: Decimal = rows
        .iter()
        .map(|r| usd(r["cost_usd"].as_str().unwrap()))
        .sum();
    assert_eq!(total_cost, want);
    let dated = rows
        .iter()
        .find(|r| r["model"] == "claude-sonnet-4-5-20250929")
        .unwrap();
    assert_eq!(dated["key"], key_id.as_str());
    assert_eq!(dated["input_tokens"], 1200);
    assert_eq!(dated["output_tokens"], 300);
    assert_eq!(dated["cache_creation_input_tokens"], 50);
    assert_eq!(dated["cache_read_input_tokens"], 4000);
    assert_eq!(dated["cost_usd"], "0.00951");
    assert_eq!(dated["unpriced_requests"], 0);

    let all = p.usage("").await;
    assert_eq!(all["rows"][0]["requests"], 2);
    assert_eq!(all["rows"][0]["cost_usd"], "0.0099");
    assert!(all["rows"][0].get("bucket_start").is_none());

    // Rows grouped by key name it as it is now: a disabled key keeps its name, a deleted one
    // (its record stays, marked deleted) has none, nor has an id with no record at all.
    assert_eq!(dated["key_name"], "alice", "{dated}");
    let by_model = p.usage("group_by=model").await;
    assert!(by_model["rows"][0].get("key_name").is_none());
    let (status, _) = p
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/keys/{key_id}"),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(status, 200);
    let disabled = p.usage("group_by=key").await;
    assert_eq!(disabled["rows"][0]["key_name"], "alice", "{disabled}");
    let (status, _) = p
        .admin(
            reqwest::Method::DELETE,
            &format!("/admin/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let deleted = p.usage("group_by=key").await;
    assert_eq!(deleted["rows"][0]["key"], key_id.as_str());
    assert!(deleted["rows"][0].get("key_name").is_none(), "{deleted}");
    let client = redis::Client::open(p.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let record = shared::Keyspace::new(&p.stream)
        .unwrap()
        .key_record(&key_id);
    let _: () = redis::AsyncCommands::del(&mut conn, record).await.unwrap();
    let gone = p.usage("group_by=key").await;
    assert_eq!(gone["rows"][0]["key"], key_id.as_str());
    assert!(gone["rows"][0].get("key_name").is_none(), "{gone}");
}

#[tokio::test]
async fn a_bad_key_gets_an_anthropic_401_and_is_still_metered() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let response = p
        .messages("mk-not-a-real-key")
        .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert!(p.upstream.received().is_empty());

    let events = p.wait_for_events(1).await;
    assert_eq!(events[0].status, 401);
    assert_eq!(events[0].key_id, None);
    assert_eq!(events[0].error.as_deref(), Some("unauthorized"));

    let usage = eventually(Duration::from_secs(10), || async {
        let usage = p.usage("group_by=status,key").await;
        (usage["rows"].as_array()?.len() == 1).then_some(usage)
    })
    .await;
    let row = &usage["rows"][0];
    assert_eq!(
        (row["status"].as_i64(), row["errors"].as_i64()),
        (Some(401), Some(1))
    );
    assert_eq!(row["key"], Value::Null);
    assert_eq!(row["cost_usd"], "0");
}

#[tokio::test]
async fn hour_buckets_echo_the_effective_range() {
    let p = Pipeline::start().await;
    // Ten days ago only hours are kept, so both ends are aligned to their hour.
    let day = 86_400_000;
    let hour = 3_600_000;
    let base = (chrono::Utc::now().timestamp_millis() - 10 * day) / day * day + 10 * hour;
    let rfc3339 = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let usage = p
        .usage(&format!(
            "from={}&to={}&bucket=hour",
            rfc3339(base + 30 * 60_000),
            base + 2 * hour + 15 * 60_000
        ))
        .await;
    assert_eq!(usage["from"], rfc3339(base).as_str());
    assert_eq!(usage["to"], rfc3339(base + 2 * hour).as_str());
    assert_eq!(usage["rows"], json!([]));

    let response = p
        .http
        .get(p.aggregator_url("/v1/usage?group_by=colour"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "group_by");
}
