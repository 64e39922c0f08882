//! The mock over real HTTP: each wire format streaming and not, plus credentials, injected
//! errors, broken streams, the request log and shutdown.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{MockConfig, MockUpstream};

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).unwrap().to_str().unwrap()
    }

    /// `(event name or "", data)` for every SSE event, with `data: [DONE]` as `Value::Null`.
    fn events(&self) -> Vec<(String, Value)> {
        self.body
            .split("\n\n")
            .filter(|block| !block.is_empty())
            .map(|block| {
                let mut name = String::new();
                let mut data = Value::Null;
                for line in block.lines() {
                    if let Some(event) = line.strip_prefix("event: ") {
                        name = event.to_owned();
                    } else if let Some(payload) = line.strip_prefix("data: ") {
                        data = if payload == "[DONE]" {
                            Value::Null
                        } else {
                            serde_json::from_str(payload).unwrap()
                        };
                    }
                }
                (name, data)
            })
            .collect()
    }
}

async fn post(
    mock: &MockUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> Reply {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", mock.base_url()))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.body(body).send().await.unwrap();
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

async fn post_json(mock: &MockUpstream, path: &str, body: Value) -> Reply {
    post(mock, path, &[], serde_json::to_vec(&body).unwrap()).await
}

fn anthropic_request(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream,
        "messages": [{"role": "user", "content": "Say hello"}],
        "mock": {"input_tokens": 1200, "output_tokens": 300, "cache_creation_5m": 40,
                 "cache_creation_1h": 10, "cache_read": 4000, "text": "Hello there, how are you today?"}
    })
}

#[tokio::test]
async fn anthropic_messages_json_and_stream() {
    let mock = MockUpstream::spawn().await;

    let reply = post_json(&mock, "/v1/messages", anthropic_request(false)).await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").starts_with("application/json"));
    assert!(reply.header("request-id").starts_with("req_"));
    assert!(
        reply
            .headers
            .contains_key("anthropic-ratelimit-requests-remaining")
    );
    let message = reply.json();
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(
        message["content"][0]["text"],
        "Hello there, how are you today?"
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"]["cache_creation_input_tokens"], 50);
    assert_eq!(message["usage"]["output_tokens"], 300);

    let reply = post_json(&mock, "/v1/messages", anthropic_request(true)).await;
    assert!(
        reply
            .header("content-type")
            .starts_with("text/event-stream")
    );
    let events = reply.events();
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    assert_eq!(events[0].0, "message_start");
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 1200);
    assert_eq!(
        events[0].1["message"]["usage"]["cache_read_input_tokens"],
        4000
    );
    assert_eq!(events[0].1["message"]["usage"]["service_tier"], "standard");
    let text: String = events
        .iter()
        .filter(|(name, _)| name == "content_block_delta")
        .map(|(_, data)| data["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello there, how are you today?");
    let (name, delta) = &events[events.len() - 2];
    assert_eq!(
        (name.as_str(), &delta["usage"]),
        ("message_delta", &json!({"output_tokens": 300}))
    );
    assert_eq!(events.last().unwrap().0, "message_stop");

    let count = post_json(
        &mock,
        "/v1/messages/count_tokens",
        json!({"model": "m", "messages": [], "mock": {"input_tokens": 77}}),
    )
    .await;
    assert_eq!(count.json(), json!({"input_tokens": 77}));
}

#[tokio::test]
async fn openai_chat_json_and_stream() {
    let mock = MockUpstream::spawn().await;
    let request = |stream: bool, include_usage: bool| {
        json!({
            "model": "gpt-4o", "stream": stream, "stream_options": {"include_usage": include_usage},
            "messages": [{"role": "user", "content": "hi"}],
            "mock": {"input_tokens": 100, "cache_read": 900, "output_tokens": 40, "reasoning_tokens": 10}
        })
    };

    let reply = post_json(&mock, "/v1/chat/completions", request(false, false)).await;
    assert!(reply.header("x-request-id").starts_with("req_"));
    assert!(reply.header("openai-processing-ms").parse::<u64>().is_ok());
    let completion = reply.json();
    assert!(completion["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["usage"]["prompt_tokens"], 1000);
    assert_eq!(
        completion["usage"]["prompt_tokens_details"]["cached_tokens"],
        900
    );
    assert_eq!(
        completion["usage"]["completion_tokens_details"]["reasoning_tokens"],
        10
    );
    assert_eq!(completion["service_tier"], "default");

    let reply = post_json(&mock, "/v1/chat/completions", request(true, true)).await;
    assert!(
        reply
            .header("content-type")
            .starts_with("text/event-stream")
    );
    assert!(reply.body.ends_with("data: [DONE]\n\n"));
    let events = reply.events();
    assert!(events.iter().all(|(name, _)| name.is_empty()));
    let usage_chunk = &events[events.len() - 2].1;
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["total_tokens"], 1040);
    assert_eq!(
        events[events.len() - 3].1["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(events[0].1["object"], "chat.completion.chunk");

    let reply = post_json(&mock, "/v1/chat/completions", request(true, false)).await;
    assert!(!reply.body.contains("\"usage\""));
}

#[tokio::test]
async fn openai_responses_json_and_stream() {
    let mock = MockUpstream::spawn().await;
    let request = |stream: bool| {
        json!({"model": "gpt-5-codex", "stream": stream, "input": "hi", "instructions": "be brief",
               "mock": {"input_tokens": 100, "cache_read": 900, "output_tokens": 40}})
    };

    let response = post_json(&mock, "/v1/responses", request(false))
        .await
        .json();
    assert!(response["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(response["status"], "completed");
    assert_eq!(response["instructions"], "be brief");
    assert_eq!(response["usage"]["input_tokens"], 1000);
    assert_eq!(response["usage"]["total_tokens"], 1040);

    let events = post_json(&mock, "/v1/responses", request(true))
        .await
        .events();
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    for (index, (name, data)) in events.iter().enumerate() {
        assert_eq!(
            (&data["type"], &data["sequence_number"]),
            (&json!(name), &json!(index))
        );
    }
    assert_eq!(
        events.last().unwrap().1["response"]["usage"]["input_tokens_details"]["cached_tokens"],
        900
    );
}

#[tokio::test]
async fn credentials_are_checked_per_provider() {
    let mock = MockUpstream::spawn_with(MockConfig {
        api_key: Some("sk-test".to_owned()),
    })
    .await;
    let body = || serde_json::to_vec(&json!({"model": "m", "messages": []})).unwrap();

    let wrong = post(&mock, "/v1/messages", &[("x-api-key", "nope")], body()).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"]["type"], "authentication_error");
    assert_eq!(
        post(&mock, "/v1/messages", &[("x-api-key", "sk-test")], body())
            .await
            .status,
        200
    );

    let missing = post(&mock, "/v1/chat/completions", &[], body()).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], "invalid_api_key");
    let bearer = [("authorization", "Bearer sk-test")];
    assert_eq!(
        post(&mock, "/v1/chat/completions", &bearer, body())
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn malformed_bodies_and_injected_errors_use_provider_shapes() {
    let mock = MockUpstream::spawn().await;

    let malformed = post(&mock, "/v1/messages", &[], "{not json").await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"]["type"], "invalid_request_error");
    let malformed = post(&mock, "/v1/responses", &[], "{not json").await;
    assert_eq!(
        (malformed.status, malformed.json()["error"]["type"].clone()),
        (400, json!("invalid_request_error"))
    );

    let limited = post_json(
        &mock,
        "/v1/chat/completions",
        json!({"mock": {"error": {"status": 429, "retry_after": 7}}}),
    )
    .await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), "7");
    assert_eq!(limited.json()["error"]["code"], "rate_limit_exceeded");

    let overloaded = post_json(
        &mock,
        "/v1/messages",
        json!({"stream": true, "mock": {"error": {"status": 529}}}),
    )
    .await;
    assert_eq!(overloaded.status, 529);
    assert!(
        overloaded
            .header("content-type")
            .starts_with("application/json")
    );
    assert_eq!(
        overloaded.json(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );

    let typo = post_json(&mock, "/v1/messages", json!({"mock": {"input_tokenz": 1}})).await;
    assert_eq!(typo.status, 400);
}

#[tokio::test]
async fn cut_streams_end_in_a_transport_error_after_n_events() {
    let mock = MockUpstream::spawn().await;
    let body = json!({"stream": true, "messages": [], "mock": {"cut_after_events": 3}});
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", mock.base_url()))
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body should end with an error, not cleanly");
    let text = String::from_utf8(received).unwrap();
    assert_eq!(text.matches("event: ").count(), 3, "{text}");
    assert!(!text.contains("message_stop"));
}

#[tokio::test]
async fn omitted_terminators_end_the_body_cleanly() {
    let mock = MockUpstream::spawn().await;
    let chat = post_json(
        &mock,
        "/v1/chat/completions",
        json!({"stream": true, "mock": {"omit_terminator": true}}),
    )
    .await;
    assert!(!chat.body.contains("[DONE]"));
    let responses = post_json(
        &mock,
        "/v1/responses",
        json!({"stream": true, "mock": {"omit_terminator": true}}),
    )
    .await;
    assert_eq!(
        responses.events().last().unwrap().0,
        "response.output_item.done"
    );
}

#[tokio::test]
async fn requests_are_recorded_in_order() {
    let mock = MockUpstream::spawn().await;
    post(&mock, "/v1/messages", &[("X-Api-Key", "k")], "{not json").await;
    post_json(&mock, "/v1/chat/completions", json!({"model": "gpt-4o"})).await;
    let received = mock.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        (received[0].method.as_str(), received[0].path.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(received[0].header("x-api-key"), Some("k"));
    assert_eq!(received[0].body, Value::Null);
    assert_eq!(received[1].body, json!({"model": "gpt-4o"}));
}

#[tokio::test]
async fn dropping_the_mock_releases_hanging_requests_and_stops_the_server() {
    let mock = MockUpstream::spawn().await;
    let url = format!("{}/v1/messages", mock.base_url());
    let hanging = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .body(r#"{"mock": {"hang": true}}"#)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.received().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the hanging request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let addr = mock.addr;
    drop(mock);
    let status = tokio::time::timeout(Duration::from_secs(5), hanging)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.unwrap(), 503);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the server kept accepting connections after drop"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn models_are_listed_in_the_callers_dialect() {
    let mock = MockUpstream::spawn().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/models", mock.base_url());
    let openai: Value = serde_json::from_slice(
        &client
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(openai["object"], "list");
    let anthropic = client
        .get(&url)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    let anthropic: Value = serde_json::from_slice(&anthropic.bytes().await.unwrap()).unwrap();
    assert_eq!(anthropic["data"][0]["type"], "model");
}
