//! Anthropic Messages API: `POST /v1/messages` (JSON or SSE) and `POST /v1/messages/count_tokens`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use super::MockState;
use super::error::ApiError;
use super::ids;
use super::provider::{Admitted, Provider, admit};
use super::scenario::{Dialect, Reply, Scenario, text_chunks};
use super::sse::{self, Frame, Pacing};

pub(super) fn routes() -> Router<MockState> {
    Router::new()
        .route("/v1/messages", post(create))
        .route("/v1/messages/count_tokens", post(count_tokens))
}

async fn create(
    State(state): State<MockState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Admitted { body, scenario } = admit(&state, Provider::Anthropic, &headers, &body).await?;
    let message = Message {
        id: ids::anthropic_message(),
        reply: scenario.reply(&body, Dialect::Anthropic),
        service_tier: scenario.service_tier.as_deref().unwrap_or("standard"),
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let frames = message.stream(&scenario);
        Ok(sse::response(
            frames,
            Pacing::from(&scenario),
            state.closed(),
        ))
    } else {
        Ok(Json(message.complete()).into_response())
    }
}

async fn count_tokens(
    State(state): State<MockState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let Admitted { body, scenario } = admit(&state, Provider::Anthropic, &headers, &body).await?;
    let input_tokens = scenario.input_tokens(&body, Dialect::Anthropic);
    Ok(Json(json!({ "input_tokens": input_tokens })))
}

struct Message<'a> {
    id: String,
    reply: Reply,
    service_tier: &'a str,
}

impl Message<'_> {
    fn complete(&self) -> Value {
        let content = json!([{ "type": "text", "text": self.reply.text }]);
        self.envelope(content, json!(self.stop_reason()), self.reply.usage.output)
    }

    /// The event sequence of the streaming docs: `message_start` (empty content, provisional
    /// output count), one text block, `message_delta` with the cumulative output count, then
    /// `message_stop`.
    fn stream(&self, scenario: &Scenario) -> Vec<Frame> {
        let usage = &self.reply.usage;
        let mut frames = vec![
            Frame::named(
                "message_start",
                json!({
                    "type": "message_start",
                    "message": self.envelope(json!([]), Value::Null, usage.output.min(1)),
                }),
            ),
            Frame::named(
                "content_block_start",
                json!({
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": { "type": "text", "text": "" },
                }),
            ),
            Frame::named("ping", json!({ "type": "ping" })),
        ];
        frames.extend(text_chunks(&self.reply.text).into_iter().map(|text| {
            Frame::named(
                "content_block_delta",
                json!({
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": { "type": "text_delta", "text": text },
                }),
            )
        }));
        frames.push(Frame::named(
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": 0 }),
        ));
        frames.push(Frame::named(
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": { "stop_reason": self.stop_reason(), "stop_sequence": null },
                "usage": self.delta_usage(scenario),
            }),
        ));
        if !scenario.omit_terminator {
            frames.push(Frame::named(
                "message_stop",
                json!({ "type": "message_stop" }),
            ));
        }
        frames
    }

    fn envelope(&self, content: Value, stop_reason: Value, output_tokens: u64) -> Value {
        let usage = &self.reply.usage;
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.reply.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": {
                "input_tokens": usage.input,
                "cache_creation_input_tokens": usage.cache_creation(),
                "cache_read_input_tokens": usage.cache_read,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": usage.cache_creation_5m,
                    "ephemeral_1h_input_tokens": usage.cache_creation_1h,
                },
                "output_tokens": output_tokens,
                "service_tier": self.service_tier,
            },
        })
    }

    /// Newer API versions repeat the input-side counts in `message_delta`; they may differ from
    /// `message_start`, which is exactly what `delta_*` lets a test exercise.
    fn delta_usage(&self, scenario: &Scenario) -> Value {
        let usage = &self.reply.usage;
        if !scenario.delta_usage_full {
            return json!({ "output_tokens": usage.output });
        }
        let creation_5m = scenario
            .delta_cache_creation_5m
            .unwrap_or(usage.cache_creation_5m);
        let creation_1h = scenario
            .delta_cache_creation_1h
            .unwrap_or(usage.cache_creation_1h);
        json!({
            "input_tokens": scenario.delta_input_tokens.unwrap_or(usage.input),
            "cache_creation_input_tokens": creation_5m + creation_1h,
            "cache_read_input_tokens": scenario.delta_cache_read.unwrap_or(usage.cache_read),
            "output_tokens": usage.output,
        })
    }

    fn stop_reason(&self) -> &'static str {
        if self.reply.truncated {
            "max_tokens"
        } else {
            "end_turn"
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Message;
    use crate::mock_upstream::scenario::{Dialect, Scenario};
    use crate::mock_upstream::sse::Frame;

    fn message(scenario: &Scenario) -> Message<'static> {
        Message {
            id: "msg_01test".to_owned(),
            reply: scenario.reply(&json!({"model": "claude-haiku-4-5"}), Dialect::Anthropic),
            service_tier: "standard",
        }
    }

    fn names(frames: &[Frame]) -> Vec<&'static str> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Named { event, .. } => *event,
                _ => "?",
            })
            .collect()
    }

    fn data<'a>(frames: &'a [Frame], name: &str) -> &'a serde_json::Value {
        frames
            .iter()
            .find_map(|f| match f {
                Frame::Named { event, data } if *event == name => Some(data),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn stream_follows_the_documented_event_order() {
        let scenario = Scenario::default();
        let frames = message(&scenario).stream(&scenario);
        assert_eq!(
            names(&frames),
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let start = &data(&frames, "message_start")["message"]["usage"];
        assert_eq!(start["output_tokens"], 1);
        assert_eq!(
            data(&frames, "message_delta")["usage"],
            json!({"output_tokens": 8})
        );
    }

    #[test]
    fn cache_creation_is_the_sum_of_both_ttls() {
        let scenario = Scenario::from_request(&json!({"mock": {
            "input_tokens": 12, "cache_creation_5m": 40, "cache_creation_1h": 10, "cache_read": 4000
        }}))
        .unwrap();
        let usage = &message(&scenario).complete()["usage"];
        assert_eq!(
            *usage,
            json!({
                "input_tokens": 12, "cache_creation_input_tokens": 50, "cache_read_input_tokens": 4000,
                "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 10},
                "output_tokens": 8, "service_tier": "standard"
            })
        );
    }

    #[test]
    fn full_delta_usage_takes_the_delta_overrides() {
        let scenario = Scenario::from_request(&json!({"mock": {
            "input_tokens": 12, "cache_read": 30, "output_tokens": 5,
            "delta_usage_full": true, "delta_input_tokens": 20, "omit_terminator": true
        }}))
        .unwrap();
        let frames = message(&scenario).stream(&scenario);
        assert_eq!(
            data(&frames, "message_delta")["usage"],
            json!({"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 30, "output_tokens": 5})
        );
        assert_eq!(names(&frames).last(), Some(&"message_delta"));
    }
}
