//! The Responses API's WebSocket mode (`GET /v1/responses` upgraded), as OpenAI runs it: the
//! client sends `response.create` events (the `POST` body minus `stream`), and each gets the
//! events of the SSE stream as text messages, one response at a time; errors come as `error`
//! events wrapping the HTTP answer (`status`, `error`, `headers`) and leave the socket open.
//!
//! Scripted like the HTTP modes by the `"mock"` field of each `response.create`: usage, text,
//! latency, `error`, `hang` (no answer until the client closes), `chunk_delay_ms`,
//! `omit_terminator`, and `cut_after_events` (after that many events the connection is dropped,
//! or closed with `close_code`). `"generate": false` is the warm-up Codex sends first.

use std::future::Future;
use std::pin::Pin;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::Value;

use super::error::ApiError;
use super::openai_responses::ResponseObject;
use super::provider::Provider;
use super::scenario::Scenario;
use super::sse::Frame;
use super::{MockState, ReceivedRequest};

/// The credential is checked at the upgrade, as the API does: a wrong key gets the HTTP 401.
pub(super) async fn upgrade(
    State(state): State<MockState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    Provider::OpenAi.authorize(&headers, state.config.api_key.as_deref())?;
    Ok(upgrade.on_upgrade(move |socket| serve(state, socket)))
}

type Closed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Whether the socket is still there after a response.
enum After {
    Open,
    Gone,
}

async fn serve(state: MockState, mut socket: WebSocket) {
    let mut closed: Closed = Box::pin(state.closed());
    loop {
        let message = tokio::select! {
            message = socket.recv() => message,
            () = &mut closed => {
                close(&mut socket, 1001, "mock upstream is shutting down").await;
                return;
            }
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                let error =
                    ApiError::bad_request(Provider::OpenAi, "Binary messages are not supported.");
                if send(&mut socket, &error.socket_event()).await.is_err() {
                    return;
                }
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            None | Some(Err(_) | Ok(Message::Close(_))) => return,
        };
        let body: Value = match serde_json::from_str(&text) {
            Ok(body) => body,
            Err(e) => {
                let error = ApiError::malformed_json(Provider::OpenAi, &e);
                if send(&mut socket, &error.socket_event()).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let kind = body.get("type").and_then(Value::as_str).unwrap_or("(none)");
        let model = body.get("model").and_then(Value::as_str).unwrap_or("");
        tracing::info!(event = kind, model, "mock upstream socket event");
        state.log.push(ReceivedRequest {
            method: "WS".to_owned(),
            path: "/v1/responses".to_owned(),
            query: None,
            headers: Vec::new(),
            body: body.clone(),
        });
        let after = match body.get("type").and_then(Value::as_str) {
            Some("response.create") => respond(&mut socket, &body, &mut closed).await,
            // Codex acknowledges each response it has handled; nothing to answer.
            Some("response.processed") => After::Open,
            other => {
                let message = format!("Unknown event type: {}", other.unwrap_or("(none)"));
                let error = ApiError::bad_request(Provider::OpenAi, message);
                match send(&mut socket, &error.socket_event()).await {
                    Ok(()) => After::Open,
                    Err(()) => After::Gone,
                }
            }
        };
        if let After::Gone = after {
            return;
        }
    }
}

async fn respond(socket: &mut WebSocket, body: &Value, closed: &mut Closed) -> After {
    let scenario = match Scenario::from_request(body) {
        Ok(scenario) => scenario,
        Err(e) => {
            let error =
                ApiError::bad_request(Provider::OpenAi, format!("invalid \"mock\" field: {e}"));
            return sent(send(socket, &error.socket_event()).await);
        }
    };
    if scenario.hang {
        // No answer; the client's close (or the mock's shutdown) ends the socket.
        loop {
            tokio::select! {
                message = socket.recv() => match message {
                    None | Some(Err(_) | Ok(Message::Close(_))) => return After::Gone,
                    Some(Ok(_)) => {}
                },
                () = &mut *closed => return After::Gone,
            }
        }
    }
    if !scenario.latency().is_zero() && !pause(socket, scenario.latency(), closed).await {
        return After::Gone;
    }
    if let Some(spec) = &scenario.error {
        let error = ApiError::injected(Provider::OpenAi, spec);
        return sent(send(socket, &error.socket_event()).await);
    }
    let response = ResponseObject::new(&scenario, body);
    let frames = if body.get("generate") == Some(&Value::Bool(false)) {
        response.warmup()
    } else {
        response.stream(&scenario)
    };
    for (index, frame) in frames.iter().enumerate() {
        if scenario.cut_after_events == Some(index) {
            if let Some(code) = scenario.close_code {
                close(socket, code, "mock upstream: connection cut by scenario").await;
            }
            return After::Gone;
        }
        if index > 0 && !pause(socket, scenario.chunk_delay(), closed).await {
            return After::Gone;
        }
        let Frame::Named { data, .. } = frame else {
            continue;
        };
        if send(socket, data).await.is_err() {
            return After::Gone;
        }
    }
    After::Open
}

/// Waits `delay`, watching for the client's close; false when the socket is gone.
async fn pause(socket: &mut WebSocket, delay: std::time::Duration, closed: &mut Closed) -> bool {
    if delay.is_zero() {
        return true;
    }
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            message = socket.recv() => match message {
                None | Some(Err(_) | Ok(Message::Close(_))) => return false,
                // One response at a time: anything else waits for this one to end.
                Some(Ok(_)) => {}
            },
            () = &mut *closed => return false,
        }
    }
}

fn sent(result: Result<(), ()>) -> After {
    match result {
        Ok(()) => After::Open,
        Err(()) => After::Gone,
    }
}

async fn send(socket: &mut WebSocket, event: &Value) -> Result<(), ()> {
    socket
        .send(Message::Text(Utf8Bytes::from(event.to_string())))
        .await
        .map_err(|_| ())
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::error::ApiError;
    use super::super::provider::Provider;
    use super::super::scenario::Scenario;

    #[test]
    fn an_error_event_wraps_the_http_answer() {
        let scenario =
            Scenario::from_request(&json!({"mock": {"error": {"status": 429, "retry_after": 7}}}))
                .unwrap();
        let event =
            ApiError::injected(Provider::OpenAi, scenario.error.as_ref().unwrap()).socket_event();
        assert_eq!(event["type"], "error");
        assert_eq!(event["status"], 429);
        assert_eq!(event["error"]["code"], "rate_limit_exceeded");
        assert_eq!(event["headers"]["retry-after"], "7");
    }
}
