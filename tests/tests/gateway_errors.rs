//! Bad input and refused requests get well-formed, provider-shaped errors, and each one is
//! still metered as exactly one event.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use serde_json::{Value, json};
use tests::harness::Pipeline;

async fn post_messages(p: &Pipeline, secret: &str, body: reqwest::Body) -> (u16, Value) {
    let response = p
        .messages(secret)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[track_caller]
fn assert_anthropic_error(body: &Value, kind: &str) {
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn refused_requests_get_anthropic_errors_and_one_event_each() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p
        .add_key(json!({"name": "bob", "models": ["claude-haiku-4-5"]}))
        .await;
    let (_, expired) = p
        .add_key(json!({"name": "old", "expires_at": "2020-01-01T00:00:00Z"}))
        .await;

    let (status, body) = post_messages(&p, &secret, "{not json".into()).await;
    assert_eq!(status, 400);
    assert_anthropic_error(&body, "invalid_request_error");

    let (status, body) = post_messages(&p, &secret, r#"{"max_tokens": 5}"#.into()).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("model"));

    let (status, body) = post_messages(
        &p,
        &secret,
        json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []})
            .to_string()
            .into(),
    )
    .await;
    assert_eq!(status, 403);
    assert_anthropic_error(&body, "permission_error");

    let (status, body) = post_messages(
        &p,
        &expired,
        json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []})
            .to_string()
            .into(),
    )
    .await;
    assert_eq!(status, 401);
    assert_anthropic_error(&body, "authentication_error");

    // 33 MiB against the default 32 MiB limit.
    let huge = format!(
        r#"{{"model":"claude-haiku-4-5","pad":"{}"}}"#,
        "x".repeat(33 << 20)
    );
    let (status, body) = post_messages(&p, &secret, huge.into()).await;
    assert_eq!(status, 413);
    assert_anthropic_error(&body, "request_too_large");

    assert!(
        p.upstream.received().is_empty(),
        "nothing refused reached the upstream"
    );
    let events = p.wait_for_events(5).await;
    let seen: Vec<(u16, Option<&str>)> = events
        .iter()
        .map(|e| (e.status, e.error.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (400, Some("invalid_request")),
            (400, Some("invalid_request")),
            (403, Some("forbidden")),
            (401, Some("unauthorized")),
            (413, Some("request_too_large")),
        ]
    );
    assert_eq!(
        events[2].model, "claude-sonnet-4-5",
        "the requested model is recorded"
    );
}

#[tokio::test]
async fn a_deleted_key_stops_working_at_once_and_admin_needs_the_token() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (id, secret) = p.add_key(json!({"name": "carol"})).await;
    let request = json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [], "mock": {"output_tokens": 1}});

    let (status, _) = post_messages(&p, &secret, request.to_string().into()).await;
    assert_eq!(status, 200);
    let (status, body) = p
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!((status, &body["disabled"]), (200, &json!(true)));
    let (status, _) = post_messages(&p, &secret, request.to_string().into()).await;
    assert_eq!(status, 401);

    // Keys are never listed with their secret or hash.
    let (_, listed) = p.admin(reqwest::Method::GET, "/admin/keys", None).await;
    let text = listed.to_string();
    assert!(!text.contains(&secret) && !text.contains(&secret[3..]));
    assert!(listed["data"][0].get("hash").is_none());

    let (_, accounts) = p.admin(reqwest::Method::GET, "/admin/accounts", None).await;
    assert!(
        !accounts.to_string().contains("sk-upstream"),
        "credentials are never returned"
    );

    let response = p
        .http
        .get(p.gateway_url("/admin/keys"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = p
        .http
        .get(p.gateway_url("/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn upstream_errors_pass_through_with_their_headers_and_are_metered() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p.add_key(json!({"name": "dave"})).await;
    let (status, body) = post_messages(
        &p,
        &secret,
        json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [],
               "mock": {"error": {"status": 529}}})
        .to_string()
        .into(),
    )
    .await;
    assert_eq!(status, 529);
    assert_anthropic_error(&body, "overloaded_error");
    let events = p.wait_for_events(1).await;
    assert_eq!(
        (events[0].status, events[0].error.as_deref()),
        (529, Some("upstream_error"))
    );
}
