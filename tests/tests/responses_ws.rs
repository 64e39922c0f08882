//! Responses WebSocket mode over real sockets: a tokio-tungstenite client through the gateway
//! to the mock's socket. Each response on a socket is one usage event; limits refuse a
//! `response.create` with an `error` event and the socket stays usable; closes pass through
//! with their codes; a bad key gets the HTTP error before the upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tests::harness::{
    Pipeline, eventually, redis_url, refusing_port, spawn_gateway_joinable, wait_ready,
};
use tests::mock_upstream::{MockConfig, MockUpstream};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Generous: a loaded 2-core machine can be slow to relay an event.
const WAIT: Duration = Duration::from_secs(20);

async fn connect(p: &Pipeline, secret: &str) -> Result<Socket, Error> {
    connect_to(p.gateway, secret).await
}

async fn connect_to(gateway: SocketAddr, secret: &str) -> Result<Socket, Error> {
    let mut request = format!("ws://{gateway}/v1/responses")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("authorization", format!("Bearer {secret}").parse().unwrap());
    headers.insert(
        "openai-beta",
        "responses_websockets=2026-02-06".parse().unwrap(),
    );
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

async fn create(socket: &mut Socket, body: Value) {
    let mut event = json!({"type": "response.create"});
    event
        .as_object_mut()
        .unwrap()
        .extend(body.as_object().unwrap().clone());
    socket
        .send(Message::Text(event.to_string().into()))
        .await
        .unwrap();
}

/// The next message: an event, or the close frame (as `Err`).
async fn next(socket: &mut Socket) -> Result<Value, Option<CloseFrame>> {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("the gateway relays within the deadline");
        match message {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => return Err(frame),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return Err(None),
        }
    }
}

fn is_terminal(event: &Value) -> bool {
    matches!(
        event["type"].as_str(),
        Some("response.completed" | "response.incomplete" | "response.failed" | "error")
    )
}

/// Every event of one response, its terminal event last.
async fn response(socket: &mut Socket) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = next(socket).await.expect("the socket stays open");
        let done = is_terminal(&event);
        events.push(event);
        if done {
            return events;
        }
    }
}

#[tokio::test]
async fn several_responses_on_one_socket_are_each_metered_once() {
    let p = Pipeline::start().await;
    let account = p.add_account("openai").await;
    let (key, secret) = p.add_key(json!({"name": "codex"})).await;
    let mut socket = connect(&p, &secret).await.unwrap();

    // The upstream socket was opened with the account's key, and the client's beta header.
    let upgrade = p
        .upstream
        .received()
        .into_iter()
        .find(|r| r.method == "GET")
        .unwrap();
    assert_eq!(upgrade.path, "/v1/responses");
    assert_eq!(
        upgrade.header("authorization"),
        Some("Bearer sk-upstream-openai")
    );
    assert_eq!(
        upgrade.header("openai-beta"),
        Some("responses_websockets=2026-02-06")
    );

    // Codex's warm-up, then two turns continuing it on the same socket.
    create(
        &mut socket,
        json!({"model": "gpt-5-codex", "generate": false, "input": "hi", "mock": {"input_tokens": 50}}),
    )
    .await;
    let warmup = response(&mut socket).await;
    let last = warmup.last().unwrap();
    assert_eq!(last["type"], "response.completed");
    assert_eq!(last["response"]["usage"]["output_tokens"], 0);
    let previous = last["response"]["id"].as_str().unwrap().to_owned();

    create(
        &mut socket,
        json!({"model": "gpt-5-codex", "previous_response_id": previous, "input": [],
               "mock": {"input_tokens": 400, "output_tokens": 50, "cache_read": 1000}}),
    )
    .await;
    let turn = response(&mut socket).await;
    assert_eq!(turn.last().unwrap()["type"], "response.completed");
    assert!(
        turn.iter()
            .any(|e| e["type"] == "response.output_text.delta")
    );

    create(
        &mut socket,
        json!({"model": "gpt-5-codex", "input": "more",
               "mock": {"input_tokens": 7, "output_tokens": 3, "responses_terminal": "incomplete"}}),
    )
    .await;
    assert_eq!(
        response(&mut socket).await.last().unwrap()["type"],
        "response.incomplete"
    );

    let events = p.wait_for_events(3).await;
    assert_eq!(events.len(), 3, "{events:?}");
    let tokens: Vec<_> = events
        .iter()
        .map(|e| (e.input_tokens, e.output_tokens, e.cache_read_input_tokens))
        .collect();
    assert_eq!(tokens, [(50, 0, 0), (400, 50, 1000), (7, 3, 0)]);
    for e in &events {
        assert_eq!(
            (e.endpoint.as_str(), e.provider.as_str(), e.stream, e.status),
            ("responses", "openai", true, 200)
        );
        assert_eq!(e.model, "gpt-5-codex");
        assert_eq!(e.key_id.as_deref(), Some(key.as_str()));
        assert_eq!(e.account_id.as_deref(), Some(account.as_str()));
    }
    assert_eq!(
        events
            .iter()
            .map(|e| e.error.as_deref())
            .collect::<Vec<_>>(),
        [None, None, Some("response_incomplete")]
    );
    // Time to first token is the first delta: a warm-up has none.
    assert_eq!(events[0].ttft_us, None);
    for e in &events[1..] {
        assert!(e.ttft_us.is_some_and(|t| t <= e.latency_us), "{e:?}");
    }

    // What went upstream is what the client sent, one message per response.create.
    let relayed: Vec<Value> = p
        .upstream
        .received()
        .into_iter()
        .filter(|r| r.method == "WS")
        .map(|r| r.body)
        .collect();
    assert_eq!(relayed.len(), 3);
    assert!(
        relayed
            .iter()
            .all(|b| b["type"] == "response.create" && b.get("stream").is_none())
    );

    // The stats count the three responses.
    eventually(WAIT, || async {
        let usage = p.try_usage("group_by=endpoint").await?;
        let row = usage["rows"].as_array()?.first()?.clone();
        (row["requests"] == 3).then_some(row)
    })
    .await;
}

#[tokio::test]
async fn a_response_refused_for_a_limit_gets_an_error_event_and_the_socket_stays_usable() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let (_, secret) = p
        .add_key(json!({"name": "one-at-a-time", "max_concurrency": 1}))
        .await;

    // A response in flight on one socket holds the key's only slot...
    let mut holder = connect(&p, &secret).await.unwrap();
    create(
        &mut holder,
        json!({"model": "gpt-5-codex", "input": "wait", "mock": {"hang": true}}),
    )
    .await;
    eventually(WAIT, || async {
        p.upstream
            .received()
            .iter()
            .any(|r| r.method == "WS")
            .then_some(())
    })
    .await;

    // ...so a response.create on another socket is refused, as the POST would be.
    let mut socket = connect(&p, &secret).await.unwrap();
    create(&mut socket, json!({"model": "gpt-5-codex", "input": "hi"})).await;
    let refusal = next(&mut socket).await.unwrap();
    assert_eq!(refusal["type"], "error");
    assert_eq!(refusal["status"], 429);
    assert_eq!(refusal["error"]["code"], "rate_limit_exceeded");
    assert_eq!(refusal["error"]["type"], "requests");
    assert!(
        refusal["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrency 1"),
        "{refusal}"
    );
    assert_eq!(refusal["headers"]["retry-after"], "1");

    // The holder leaves mid-response; its slot frees, and the same socket is served.
    holder.close(None).await.unwrap();
    // Polled: the slot is released by the holder's gateway task, not by this client.
    let until = tokio::time::Instant::now() + WAIT;
    let served = loop {
        create(&mut socket, json!({"model": "gpt-5-codex", "input": "hi"})).await;
        let events = response(&mut socket).await;
        if events.last().unwrap()["type"] == "response.completed" {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(served.iter().any(|e| e["type"] == "response.created"));

    let events = eventually(WAIT, || async {
        let events = p.events().await;
        events.iter().any(|e| e.status == 200).then_some(events)
    })
    .await;
    let statuses: Vec<(u16, Option<&str>)> = events
        .iter()
        .map(|e| (e.status, e.error.as_deref()))
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == (499, Some("client_disconnected")))
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| s.0 == 200).count(), 1);
    assert!(
        statuses
            .iter()
            .all(|s| matches!(s, (200, None) | (499, _) | (429, Some("rate_limited")))),
        "{statuses:?}"
    );
    assert!(statuses.contains(&(429, Some("rate_limited"))));
}

#[tokio::test]
async fn a_client_closing_mid_response_is_billed_once_for_what_was_seen() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "leaver"})).await;
    let mut socket = connect(&p, &secret).await.unwrap();
    create(
        &mut socket,
        json!({"model": "gpt-5-codex", "input": "hi",
               "mock": {"chunk_delay_ms": 300, "input_tokens": 10, "output_tokens": 8}}),
    )
    .await;
    loop {
        let event = next(&mut socket).await.unwrap();
        if event["type"] == "response.output_text.delta" {
            break;
        }
    }
    socket.close(None).await.unwrap();

    let events = p.wait_for_events(1).await;
    let e = &events[0];
    assert_eq!(
        (e.status, e.error.as_deref(), e.model.as_str()),
        (499, Some("client_disconnected"), "gpt-5-codex")
    );
    // The usage comes with the terminal event, which never came: only the model was seen.
    assert_eq!((e.input_tokens, e.output_tokens), (0, 0));
    assert!(e.ttft_us.is_some(), "a delta was relayed");

    // A later socket's response is its own event; the closed one was not published again.
    let mut socket = connect(&p, &secret).await.unwrap();
    create(&mut socket, json!({"model": "gpt-5-codex", "input": "hi"})).await;
    response(&mut socket).await;
    let events = p.wait_for_events(2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].status, 200);
}

#[tokio::test]
async fn upstream_errors_and_closes_reach_the_client_and_are_recorded() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "codex"})).await;
    let mut socket = connect(&p, &secret).await.unwrap();

    // An upstream error event passes through; the socket stays open.
    create(
        &mut socket,
        json!({"model": "gpt-5-codex", "input": "hi",
               "mock": {"error": {"status": 429, "retry_after": 3}}}),
    )
    .await;
    let error = next(&mut socket).await.unwrap();
    assert_eq!(
        (error["type"].as_str(), error["status"].as_u64()),
        (Some("error"), Some(429))
    );
    assert_eq!(error["headers"]["retry-after"], "3");

    // An upstream that closes mid-response: its close code reaches the client.
    create(
        &mut socket,
        json!({"model": "gpt-5-codex", "input": "hi",
               "mock": {"cut_after_events": 3, "close_code": 4010}}),
    )
    .await;
    let close = loop {
        match next(&mut socket).await {
            Ok(_) => {}
            Err(close) => break close,
        }
    };
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 4010);
    assert!(close.reason.contains("cut by scenario"), "{close:?}");

    // One that drops the connection without a close frame: the client gets 1011.
    let mut socket = connect(&p, &secret).await.unwrap();
    create(
        &mut socket,
        json!({"model": "gpt-5-codex", "input": "hi", "mock": {"cut_after_events": 0}}),
    )
    .await;
    let close = next(&mut socket).await.unwrap_err().expect("a close frame");
    assert_eq!(u16::from(close.code), 1011);

    let events = p.wait_for_events(3).await;
    let statuses: Vec<_> = events
        .iter()
        .map(|e| (e.status, e.error.as_deref()))
        .collect();
    assert_eq!(
        statuses,
        [
            (429, Some("upstream_rate_limited")),
            (200, Some("stream_incomplete")),
            (502, Some("upstream_unreachable")),
        ]
    );
    assert_eq!(events[1].model, "gpt-5-codex");
}

#[tokio::test]
async fn a_bad_key_gets_the_http_error_before_any_upgrade() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let Err(Error::Http(response)) = connect(&p, "mk-not-a-key").await else {
        panic!("the upgrade must be refused");
    };
    assert_eq!(response.status(), 401);
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(
        p.upstream.received().is_empty(),
        "no upstream socket was opened"
    );

    // A plain GET of the route is no upgrade.
    let (_, secret) = p.add_key(json!({"name": "k"})).await;
    let plain = p
        .http
        .get(p.gateway_url("/v1/responses"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);

    let events = p.wait_for_events(2).await;
    let statuses: Vec<_> = events
        .iter()
        .map(|e| (e.endpoint.as_str(), e.status, e.error.as_deref()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("responses", 401, Some("unauthorized")),
            ("responses", 400, Some("invalid_request")),
        ]
    );
}

#[tokio::test]
async fn a_response_that_goes_quiet_times_out_and_closes_the_socket() {
    let p = Pipeline::start_with(redis_url(), |args| {
        args.upstream_first_byte_timeout_ms = Some(500);
    })
    .await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "k"})).await;
    let mut socket = connect(&p, &secret).await.unwrap();
    create(
        &mut socket,
        json!({"model": "gpt-5-codex", "input": "hi", "mock": {"hang": true}}),
    )
    .await;
    let error = next(&mut socket).await.unwrap();
    assert_eq!(
        (error["status"].as_u64(), error["error"]["code"].as_str()),
        (Some(504), Some("upstream_timeout"))
    );
    let close = next(&mut socket).await.unwrap_err().expect("a close frame");
    assert_eq!(u16::from(close.code), 1011);
    let events = p.wait_for_events(1).await;
    assert_eq!(
        (events[0].status, events[0].error.as_deref()),
        (504, Some("upstream_timeout"))
    );
}

#[tokio::test]
async fn an_upstream_refusing_the_upgrade_is_failed_over_or_its_answer_reaches_the_client() {
    // The preferred account's upstream refuses connections: it rests, the next one serves.
    let p = Pipeline::start().await;
    let (port, _refusing) = refusing_port();
    let dead = format!("http://127.0.0.1:{port}");
    p.add_account_at("openai", &dead, json!({"name": "dead", "priority": 0}))
        .await;
    let healthy = p
        .add_account_at(
            "openai",
            &p.upstream.base_url(),
            json!({"name": "healthy", "priority": 1}),
        )
        .await;
    let (_, secret) = p.add_key(json!({"name": "k"})).await;
    let mut socket = connect(&p, &secret).await.unwrap();
    create(&mut socket, json!({"model": "gpt-5-codex", "input": "hi"})).await;
    assert_eq!(
        response(&mut socket).await.last().unwrap()["type"],
        "response.completed"
    );
    let events = p.wait_for_events(1).await;
    assert_eq!(events[0].account_id.as_deref(), Some(healthy.as_str()));

    // An upstream that answers the upgrade with an error: the client gets that answer.
    let p = Pipeline::start().await;
    let strict = MockUpstream::spawn_with(MockConfig {
        api_key: Some("sk-another-key".into()),
    })
    .await;
    p.add_account_at("openai", &strict.base_url(), json!({}))
        .await;
    let (_, secret) = p.add_key(json!({"name": "k"})).await;
    let Err(Error::Http(answer)) = connect(&p, &secret).await else {
        panic!("the upstream's refusal must reach the client");
    };
    assert_eq!(answer.status(), 401);
    let body: Value = serde_json::from_slice(answer.body().as_deref().unwrap()).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Incorrect API key"),
        "{body}"
    );
    assert!(answer.headers().contains_key("x-request-id"));
    let events = p.wait_for_events(1).await;
    assert_eq!(
        (events[0].status, events[0].error.as_deref()),
        (401, Some("upstream_unauthorized"))
    );
}

#[tokio::test]
async fn a_gateway_shutting_down_closes_its_sockets_once_their_response_is_done() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "k"})).await;
    // A replica of its own, whose shutdown the test starts and awaits.
    let (gateway, stop, done) = spawn_gateway_joinable(&p.redis_url, &p.stream, |_| {}).await;
    wait_ready(&p.http, gateway).await;

    let mut idle = connect_to(gateway, &secret).await.unwrap();
    let mut busy = connect_to(gateway, &secret).await.unwrap();
    create(
        &mut busy,
        json!({"model": "gpt-5-codex", "input": "hi",
               "mock": {"chunk_delay_ms": 100, "input_tokens": 5, "output_tokens": 8}}),
    )
    .await;
    assert_eq!(next(&mut busy).await.unwrap()["type"], "response.created");

    stop.send(()).unwrap();
    // The idle socket closes as "going away"; the busy one finishes its response first.
    let close = next(&mut idle).await.unwrap_err().expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
    let rest = response(&mut busy).await;
    assert_eq!(rest.last().unwrap()["type"], "response.completed");
    let close = next(&mut busy).await.unwrap_err().expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
    tokio::time::timeout(WAIT, done)
        .await
        .expect("the gateway finished its shutdown once its sockets closed")
        .unwrap();

    let events = p.wait_for_events(1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (
            events[0].status,
            events[0].input_tokens,
            events[0].output_tokens
        ),
        (200, 5, 8)
    );
}

#[tokio::test]
async fn a_key_deleted_while_its_socket_is_open_is_refused_at_the_next_response() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let (key, secret) = p
        .add_key(json!({"name": "k", "models": ["gpt-5-codex"]}))
        .await;
    let mut socket = connect(&p, &secret).await.unwrap();

    // A model the key may not use is refused like the POST, and the socket goes on.
    create(&mut socket, json!({"model": "gpt-9", "input": "hi"})).await;
    let refusal = next(&mut socket).await.unwrap();
    assert_eq!(
        (
            refusal["status"].as_u64(),
            refusal["error"]["code"].as_str()
        ),
        (Some(403), Some("model_not_allowed"))
    );
    create(&mut socket, json!({"model": "gpt-5-codex", "input": "hi"})).await;
    assert_eq!(
        response(&mut socket).await.last().unwrap()["type"],
        "response.completed"
    );

    let (status, _) = p
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{key}"), None)
        .await;
    assert_eq!(status, 200);
    create(&mut socket, json!({"model": "gpt-5-codex", "input": "hi"})).await;
    let refusal = next(&mut socket).await.unwrap();
    assert_eq!(
        (
            refusal["status"].as_u64(),
            refusal["error"]["code"].as_str()
        ),
        (Some(401), Some("invalid_api_key"))
    );
    assert_eq!(refusal["headers"]["x-should-retry"], "false");

    let events = p.wait_for_events(3).await;
    let statuses: Vec<_> = events
        .iter()
        .map(|e| (e.status, e.error.as_deref()))
        .collect();
    assert_eq!(
        statuses,
        [
            (403, Some("forbidden")),
            (200, None),
            (401, Some("unauthorized"))
        ]
    );
}
