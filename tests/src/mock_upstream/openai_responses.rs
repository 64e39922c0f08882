//! OpenAI Responses API (what Codex CLI speaks): `POST /v1/responses` as JSON or as named SSE
//! events, each carrying `type` and a `sequence_number`.

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
use super::scenario::{Dialect, Reply, Scenario, Terminal, text_chunks};
use super::sse::{self, Frame, Pacing};

pub(super) fn routes() -> Router<MockState> {
    Router::new().route(
        "/v1/responses",
        post(create).get(super::openai_socket::upgrade),
    )
}

async fn create(
    State(state): State<MockState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Admitted { body, scenario } = admit(&state, Provider::OpenAi, &headers, &body).await?;
    let response = ResponseObject::new(&scenario, &body);
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let frames = response.stream(&scenario);
        Ok(sse::response(
            frames,
            Pacing::from(&scenario),
            state.closed(),
        ))
    } else {
        Ok(Json(response.snapshot(Phase::Done)).into_response())
    }
}

#[derive(Clone, Copy)]
enum Phase {
    InProgress,
    Done,
}

pub(super) struct ResponseObject {
    id: String,
    created_at: i64,
    reply: Reply,
    service_tier: String,
    terminal: Terminal,
    message_id: String,
    /// Reasoning models put a reasoning item before the message when they spent tokens on it.
    reasoning_id: Option<String>,
    /// Request parameters the API echoes back in the response object.
    instructions: Value,
    max_output_tokens: Value,
    previous_response_id: Value,
    reasoning_effort: Value,
}

impl ResponseObject {
    pub(super) fn new(scenario: &Scenario, request: &Value) -> ResponseObject {
        let reply = scenario.reply(request, Dialect::OpenAiResponses);
        let terminal = scenario.responses_terminal.unwrap_or(if reply.truncated {
            Terminal::Incomplete
        } else {
            Terminal::Completed
        });
        let echo = |pointer: &str| request.pointer(pointer).cloned().unwrap_or(Value::Null);
        ResponseObject {
            id: ids::response(),
            created_at: Utc::now().timestamp(),
            service_tier: scenario.openai_service_tier(request),
            terminal,
            message_id: ids::response_item("msg"),
            reasoning_id: (reply.usage.reasoning > 0).then(|| ids::response_item("rs")),
            instructions: echo("/instructions"),
            max_output_tokens: echo("/max_output_tokens"),
            previous_response_id: echo("/previous_response_id"),
            reasoning_effort: echo("/reasoning/effort"),
            reply,
        }
    }

    pub(super) fn stream(&self, scenario: &Scenario) -> Vec<Frame> {
        let in_progress = self.snapshot(Phase::InProgress);
        let mut events = vec![
            ("response.created", json!({ "response": in_progress })),
            ("response.in_progress", json!({ "response": in_progress })),
        ];
        let mut output_index = 0;
        if let Some(reasoning) = self.reasoning_item() {
            events.push((
                "response.output_item.added",
                json!({ "output_index": 0, "item": reasoning }),
            ));
            events.push((
                "response.output_item.done",
                json!({ "output_index": 0, "item": reasoning }),
            ));
            output_index = 1;
        }
        let part = |text: &str| json!({ "type": "output_text", "annotations": [], "logprobs": [], "text": text });
        let position =
            json!({ "item_id": self.message_id, "output_index": output_index, "content_index": 0 });
        let at = |mut fields: Value| {
            if let (Some(fields), Some(position)) = (fields.as_object_mut(), position.as_object()) {
                fields.extend(position.clone());
            }
            fields
        };
        events.push((
            "response.output_item.added",
            json!({ "output_index": output_index, "item": self.message_item(Phase::InProgress) }),
        ));
        events.push((
            "response.content_part.added",
            at(json!({ "part": part("") })),
        ));
        for delta in text_chunks(&self.reply.text) {
            events.push((
                "response.output_text.delta",
                at(json!({ "delta": delta, "logprobs": [] })),
            ));
        }
        events.push((
            "response.output_text.done",
            at(json!({ "text": self.reply.text, "logprobs": [] })),
        ));
        events.push((
            "response.content_part.done",
            at(json!({ "part": part(&self.reply.text) })),
        ));
        events.push((
            "response.output_item.done",
            json!({ "output_index": output_index, "item": self.message_item(Phase::Done) }),
        ));
        if !scenario.omit_terminator {
            let name = match self.terminal {
                Terminal::Completed => "response.completed",
                Terminal::Incomplete => "response.incomplete",
                Terminal::Failed => "response.failed",
            };
            events.push((name, json!({ "response": self.snapshot(Phase::Done) })));
        }
        events
            .into_iter()
            .enumerate()
            .map(|(sequence_number, (name, mut data))| {
                data["type"] = json!(name);
                data["sequence_number"] = json!(sequence_number);
                Frame::named(name, data)
            })
            .collect()
    }

    /// A socket's warm-up (`"generate": false`): the request is read and its state kept for a
    /// continuation, nothing is generated. The events of a response with no output, whose usage
    /// counts only the input.
    pub(super) fn warmup(&self) -> Vec<Frame> {
        let mut done = self.snapshot(Phase::Done);
        done["output"] = json!([]);
        let input = self.reply.usage.input + self.reply.usage.cache_read;
        done["usage"]["output_tokens"] = json!(0);
        done["usage"]["output_tokens_details"]["reasoning_tokens"] = json!(0);
        done["usage"]["total_tokens"] = json!(input);
        let in_progress = self.snapshot(Phase::InProgress);
        [
            ("response.created", in_progress),
            ("response.completed", done),
        ]
        .into_iter()
        .enumerate()
        .map(|(sequence_number, (name, response))| {
            Frame::named(
                name,
                json!({ "type": name, "sequence_number": sequence_number, "response": response }),
            )
        })
        .collect()
    }

    /// The response object as `response.created` (in progress) or the terminal event and the
    /// non-streaming body (done) show it.
    fn snapshot(&self, phase: Phase) -> Value {
        let (status, error, incomplete_details) = match (phase, self.terminal) {
            (Phase::InProgress, _) => ("in_progress", Value::Null, Value::Null),
            (Phase::Done, Terminal::Completed) => ("completed", Value::Null, Value::Null),
            (Phase::Done, Terminal::Incomplete) => (
                "incomplete",
                Value::Null,
                json!({ "reason": "max_output_tokens" }),
            ),
            (Phase::Done, Terminal::Failed) => (
                "failed",
                json!({ "code": "server_error", "message": "The model failed to generate a response." }),
                Value::Null,
            ),
        };
        let (output, usage) = match phase {
            Phase::InProgress => (json!([]), Value::Null),
            Phase::Done => {
                let mut output: Vec<Value> = self.reasoning_item().into_iter().collect();
                output.push(self.message_item(Phase::Done));
                (Value::Array(output), self.usage())
            }
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "error": error,
            "incomplete_details": incomplete_details,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": null,
            "model": self.reply.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": self.previous_response_id,
            "reasoning": { "effort": self.reasoning_effort, "summary": null },
            "service_tier": self.service_tier,
            "store": true,
            "temperature": 1.0,
            "text": { "format": { "type": "text" }, "verbosity": "medium" },
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": null,
            "metadata": {},
        })
    }

    /// Like Chat, `input_tokens` includes the cached tokens it itemises.
    fn usage(&self) -> Value {
        let usage = &self.reply.usage;
        let input = usage.input + usage.cache_read;
        json!({
            "input_tokens": input,
            "input_tokens_details": { "cached_tokens": usage.cache_read },
            "output_tokens": usage.output,
            "output_tokens_details": { "reasoning_tokens": usage.reasoning },
            "total_tokens": input + usage.output,
        })
    }

    fn reasoning_item(&self) -> Option<Value> {
        let id = self.reasoning_id.as_ref()?;
        Some(json!({ "id": id, "type": "reasoning", "summary": [] }))
    }

    fn message_item(&self, phase: Phase) -> Value {
        let (status, content) = match (phase, self.terminal) {
            (Phase::InProgress, _) => ("in_progress", json!([])),
            (Phase::Done, terminal) => (
                if terminal == Terminal::Completed {
                    "completed"
                } else {
                    "incomplete"
                },
                json!([{ "type": "output_text", "annotations": [], "logprobs": [], "text": self.reply.text }]),
            ),
        };
        json!({
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{Phase, ResponseObject};
    use crate::mock_upstream::scenario::Scenario;
    use crate::mock_upstream::sse::Frame;

    fn object(mock: Value) -> (Scenario, ResponseObject) {
        let scenario = Scenario::from_request(&json!({ "mock": mock })).unwrap();
        let object =
            ResponseObject::new(&scenario, &json!({"model": "gpt-5-codex", "input": "hi"}));
        (scenario, object)
    }

    fn events(frames: &[Frame]) -> Vec<(&'static str, &Value)> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Named { event, data } => (*event, data),
                other => panic!("unexpected frame {other:?}"),
            })
            .collect()
    }

    #[test]
    fn usage_input_includes_cached_tokens() {
        let (_, object) = object(
            json!({"input_tokens": 100, "cache_read": 900, "output_tokens": 50, "reasoning_tokens": 20}),
        );
        assert_eq!(
            object.snapshot(Phase::Done)["usage"],
            json!({
                "input_tokens": 1000, "input_tokens_details": {"cached_tokens": 900},
                "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 20},
                "total_tokens": 1050
            })
        );
    }

    #[test]
    fn stream_events_are_typed_and_numbered_in_order() {
        let (scenario, object) = object(json!({}));
        let frames = object.stream(&scenario);
        let events = events(&frames);
        let names: Vec<_> = events.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names[..4],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added"
            ]
        );
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "response.output_text.delta")
                .count(),
            4
        );
        assert_eq!(names.last(), Some(&"response.completed"));
        for (index, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], *name);
            assert_eq!(data["sequence_number"], index);
        }
        assert!(events[0].1["response"]["usage"].is_null());
        assert_eq!(
            events.last().unwrap().1["response"]["usage"]["output_tokens"],
            8
        );
    }

    #[test]
    fn a_warmup_reports_its_input_and_no_output() {
        let (_, object) = object(json!({"input_tokens": 100, "cache_read": 20}));
        let frames = object.warmup();
        let events = events(&frames);
        let names: Vec<_> = events.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["response.created", "response.completed"]);
        let done = &events[1].1["response"];
        assert_eq!(done["output"], json!([]));
        assert_eq!(done["usage"]["input_tokens"], 120);
        assert_eq!(done["usage"]["output_tokens"], 0);
        assert_eq!(done["usage"]["total_tokens"], 120);
    }

    #[test]
    fn reasoning_tokens_add_a_reasoning_item_first() {
        let (scenario, object) =
            object(json!({"reasoning_tokens": 3, "responses_terminal": "failed"}));
        let output = &object.snapshot(Phase::Done)["output"];
        assert_eq!(output[0]["type"], "reasoning");
        assert_eq!(output[1]["type"], "message");
        let frames = object.stream(&scenario);
        let (name, last) = *events(&frames).last().unwrap();
        assert_eq!(name, "response.failed");
        assert_eq!(last["response"]["status"], "failed");
        assert_eq!(
            last["response"]["usage"]["output_tokens_details"]["reasoning_tokens"],
            3
        );
    }
}
