//! OpenAI Chat Completions: `POST /v1/chat/completions` (JSON or `data:`-only SSE).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use chrono::Utc;
use serde_json::{Value, json};

use super::MockState;
use super::error::ApiError;
use super::ids;
use super::provider::{Admitted, Provider, admit};
use super::scenario::{Dialect, Reply, Scenario, Usage, text_chunks};
use super::sse::{self, Frame, Pacing};

/// Real responses carry a backend fingerprint; a fixed one keeps the mock deterministic.
const SYSTEM_FINGERPRINT: &str = "fp_560af6e559";

pub(super) fn routes() -> Router<MockState> {
    Router::new().route("/v1/chat/completions", post(create))
}

async fn create(
    State(state): State<MockState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Admitted { body, scenario } = admit(&state, Provider::OpenAi, &headers, &body).await?;
    let completion = Completion {
        id: ids::chat_completion(),
        created: Utc::now().timestamp(),
        reply: scenario.reply(&body, Dialect::OpenAiChat),
        service_tier: scenario.openai_service_tier(&body),
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let frames = completion.stream(&scenario, include_usage);
        Ok(sse::response(
            frames,
            Pacing::from(&scenario),
            state.closed(),
        ))
    } else {
        Ok(Json(completion.complete()).into_response())
    }
}

/// OpenAI's `prompt_tokens` includes cached tokens, unlike Anthropic's `input_tokens`, and
/// `completion_tokens` includes the reasoning tokens it also itemises.
pub(crate) fn usage(usage: &Usage) -> Value {
    let prompt = usage.input + usage.cache_read + usage.cache_write.unwrap_or(0);
    let mut prompt_details = json!({ "cached_tokens": usage.cache_read, "audio_tokens": 0 });
    // OpenAI itself never sends this; some compatible providers do, so it only appears when a
    // test scripts it.
    if let Some(written) = usage.cache_write {
        prompt_details["cache_write_tokens"] = json!(written);
    }
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": usage.output,
        "total_tokens": prompt + usage.output,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    })
}

struct Completion {
    id: String,
    created: i64,
    reply: Reply,
    service_tier: String,
}

impl Completion {
    fn complete(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.reply.model,
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": self.reply.text,
                    "refusal": null,
                    "annotations": [],
                },
                "logprobs": null,
                "finish_reason": self.finish_reason(),
            }],
            "usage": usage(&self.reply.usage),
            "service_tier": self.service_tier,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        })
    }

    /// A role chunk, content chunks, a `finish_reason` chunk, then (only when the client asked
    /// via `stream_options.include_usage`) a usage chunk with empty `choices`, then `[DONE]`.
    fn stream(&self, scenario: &Scenario, include_usage: bool) -> Vec<Frame> {
        let mut frames = vec![Frame::Data(self.chunk(
            json!({ "role": "assistant", "content": "", "refusal": null }),
            None,
            include_usage,
        ))];
        frames.extend(
            text_chunks(&self.reply.text).into_iter().map(|text| {
                Frame::Data(self.chunk(json!({ "content": text }), None, include_usage))
            }),
        );
        let mut finish = self.chunk(json!({}), Some(self.finish_reason()), include_usage);
        match include_usage.then(|| usage(&self.reply.usage)) {
            // The quirk some compatible providers have: usage rides on the finish chunk, so
            // the chunk holding usage also has a non-empty `choices`.
            Some(usage) if scenario.final_chunk_with_choices => {
                finish["usage"] = usage;
                frames.push(Frame::Data(finish));
            }
            Some(usage) => {
                frames.push(Frame::Data(finish));
                let mut last = self.envelope(json!([]));
                last["usage"] = usage;
                frames.push(Frame::Data(last));
            }
            None => frames.push(Frame::Data(finish)),
        }
        if !scenario.omit_terminator {
            frames.push(Frame::Done);
        }
        frames
    }

    /// With `include_usage`, every chunk before the last carries `"usage": null`.
    fn chunk(&self, delta: Value, finish_reason: Option<&str>, include_usage: bool) -> Value {
        let mut chunk = self.envelope(json!([{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        }]));
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn envelope(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.reply.model,
            "service_tier": self.service_tier,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        })
    }

    fn finish_reason(&self) -> &'static str {
        if self.reply.truncated {
            "length"
        } else {
            "stop"
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::Completion;
    use crate::mock_upstream::scenario::{Dialect, Scenario};
    use crate::mock_upstream::sse::Frame;

    fn stream(mock: Value, include_usage: bool) -> Vec<Frame> {
        let scenario = Scenario::from_request(&json!({ "mock": mock })).unwrap();
        let completion = Completion {
            id: "chatcmpl-test".to_owned(),
            created: 1,
            reply: scenario.reply(&json!({"model": "gpt-4o"}), Dialect::OpenAiChat),
            service_tier: "default".to_owned(),
        };
        completion.stream(&scenario, include_usage)
    }

    fn data(frame: &Frame) -> &Value {
        match frame {
            Frame::Data(data) => data,
            other => panic!("expected a data frame, got {other:?}"),
        }
    }

    #[test]
    fn prompt_tokens_include_cache_reads_and_writes() {
        let usage = super::usage(&crate::mock_upstream::scenario::Usage {
            input: 100,
            cache_creation_5m: 0,
            cache_creation_1h: 0,
            cache_read: 4000,
            cache_write: Some(7),
            output: 30,
            reasoning: 12,
        });
        assert_eq!(usage["prompt_tokens"], 4107);
        assert_eq!(usage["total_tokens"], 4137);
        assert_eq!(
            usage["prompt_tokens_details"],
            json!({"cached_tokens": 4000, "audio_tokens": 0, "cache_write_tokens": 7})
        );
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 12);
    }

    #[test]
    fn usage_chunk_only_when_requested() {
        let without = stream(json!({}), false);
        assert!(
            without
                .iter()
                .all(|f| !matches!(f, Frame::Data(d) if d.get("usage").is_some()))
        );
        assert_eq!(without.last(), Some(&Frame::Done));

        let with = stream(json!({"input_tokens": 10, "output_tokens": 3}), true);
        let last = data(&with[with.len() - 2]);
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["prompt_tokens"], 10);
        assert_eq!(data(&with[0])["choices"][0]["delta"]["role"], "assistant");
        assert!(data(&with[0])["usage"].is_null());
    }

    #[test]
    fn the_quirk_puts_usage_on_the_finish_chunk() {
        let frames = stream(
            json!({"final_chunk_with_choices": true, "omit_terminator": true}),
            true,
        );
        let last = data(frames.last().unwrap());
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["usage"]["completion_tokens"], 8);
    }
}
