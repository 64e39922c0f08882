//! `GET /v1/limits` on the aggregator: each key's usage against its limits, read from a real
//! gateway's admin API with the caller's token, and a 502 that says why when the gateway cannot
//! be had (docs/stats-api.md).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use serde_json::{Value, json};
use tests::harness::{ADMIN_TOKEN, Pipeline, refusing_port, spawn_aggregator_with};

/// `GET /v1/limits` on `aggregator`, with `token` if given: status and body.
async fn limits(
    p: &Pipeline,
    aggregator: std::net::SocketAddr,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = p.http.get(format!("http://{aggregator}/v1/limits"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_key_at_80_percent_of_its_request_limit_shows_in_the_limits_route() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (id, secret) = p
        .add_key(json!({"name": "eighty", "max_concurrency": 3,
                        "limits": [{"metric": "requests", "max": 5, "window_secs": 3600}]}))
        .await;
    let (idle, _) = p.add_key(json!({"name": "idle"})).await;
    for _ in 0..4 {
        let response = p
            .messages(&secret)
            .json(&json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let gateway = p.gateway_url("");
    let (aggregator, _stop) = spawn_aggregator_with(&p.redis_url, &p.stream, |a| {
        a.admin_token = Some(ADMIN_TOKEN.into());
        a.gateway_url = Some(gateway);
    })
    .await;

    let (status, body) = limits(&p, aggregator, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["configured"], true);
    let keys = body["keys"].as_array().unwrap();
    let names: Vec<_> = keys.iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["eighty", "idle"], "sorted by name");
    let key = &keys[0];
    assert_eq!(key["id"], id.as_str());
    assert_eq!(key["disabled"], false);
    let requests = &key["limits"][0];
    assert_eq!(requests["metric"], "requests");
    assert_eq!(requests["window_secs"], 3600);
    assert_eq!(requests["max"], 5);
    assert_eq!(requests["used"], 4);
    assert_eq!(requests["remaining"], 1);
    assert!(requests["resets_in_secs"].as_u64().unwrap() <= 3600);
    let concurrency = &key["limits"][1];
    assert_eq!(concurrency["metric"], "concurrency");
    assert_eq!(concurrency["max"], 3);
    assert_eq!(concurrency["used"], 0);
    assert_eq!(keys[1]["id"], idle.as_str());
    assert_eq!(keys[1]["limits"], json!([]));

    // The route is a stats route: behind the aggregator's token.
    let (status, _) = limits(&p, aggregator, None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn the_limits_route_says_when_the_gateway_cannot_be_had() {
    let p = Pipeline::start().await;

    // Nothing listens on the port: 502, naming the gateway.
    let (port, _reserved) = refusing_port();
    let closed = format!("http://127.0.0.1:{port}");
    let url = closed.clone();
    let (aggregator, _stop) = spawn_aggregator_with(&p.redis_url, &p.stream, |a| {
        a.gateway_url = Some(url);
    })
    .await;
    let (status, body) = limits(&p, aggregator, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert_eq!(
        message,
        format!("gateway not reachable: cannot connect to {closed}")
    );

    // A gateway that refuses the caller's token: 502, saying it refused and why.
    let gateway = p.gateway_url("");
    let (open, _stop_open) = spawn_aggregator_with(&p.redis_url, &p.stream, |a| {
        a.gateway_url = Some(gateway);
    })
    .await;
    let (status, body) = limits(&p, open, Some("not-the-admin-token")).await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("gateway refused: 401"), "{message}");
    assert!(message.contains("same ADMIN_TOKEN"), "{message}");

    // No gateway configured: an answer that says so, not an error.
    let (status, body) = limits(&p, p.aggregator, None).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"configured": false, "keys": []}));
}
