//! One response on a Responses socket, from its `response.create` to its terminal event: its
//! usage event and its concurrency slot. Like the SSE relay's `Metered`, it publishes exactly
//! once: at the terminal event, when the socket is cut, or (from `Drop`) when the client goes
//! away or the socket's task ends, billing what was seen.

use std::sync::Arc;

use axum::http::StatusCode;
use serde::Deserialize;

use super::super::StreamUsage;
use super::super::openai::ResponsesStream;
use crate::limiter::LeaseGuard;
use crate::metrics::Metrics;
use crate::sse::SseHandler;
use crate::usage::{CLIENT_CLOSED, Call};

pub(crate) struct Turn {
    call: Call,
    usage: ResponsesStream,
    /// The key's concurrency slot: a socket holds one only while a response is in flight.
    concurrency: Option<LeaseGuard>,
    metrics: Arc<Metrics>,
    first_delta_seen: bool,
    /// An upstream event of this response has been relayed to the client.
    relayed: bool,
    finished: bool,
}

/// The parts of a server event the turn looks at beyond what the usage parser reads.
#[derive(Deserialize)]
struct EventHead {
    #[serde(rename = "type")]
    kind: Option<String>,
    /// The HTTP status an `error` event stands for (OpenAI's socket wraps HTTP errors so).
    #[serde(alias = "status_code")]
    status: Option<u16>,
}

impl Turn {
    pub(crate) fn start(
        call: Call,
        concurrency: Option<LeaseGuard>,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.in_flight.inc();
        Self {
            call,
            usage: ResponsesStream::default(),
            concurrency,
            metrics,
            first_delta_seen: false,
            relayed: false,
            finished: false,
        }
    }

    /// Meters an upstream event of this response, about to be relayed. Returns the status the
    /// response ended with when this was its terminal event (`response.completed`,
    /// `.incomplete`, `.failed`, or `error`).
    pub(crate) fn observe(&mut self, text: &str) -> Option<StatusCode> {
        self.relayed = true;
        let head = || serde_json::from_str::<EventHead>(text).ok();
        if !self.first_delta_seen
            && head()
                .and_then(|h| h.kind)
                .is_some_and(|kind| kind.ends_with(".delta"))
        {
            // Time to first token: the first delta, not the `response.created` that precedes
            // every answer at once.
            self.first_delta_seen = true;
            self.call.first_byte_sent();
        }
        self.usage.on_event("", text);
        if !self.usage.completed() {
            return None;
        }
        let (status, error) = match self.usage.error() {
            // An `error` event that ends the response: the status it carries, if any.
            Some("upstream_error") => match head()
                .and_then(|h| h.status)
                .and_then(|s| StatusCode::from_u16(s).ok())
                .filter(|s| !s.is_success())
            {
                Some(status) => (status, super::super::upstream_error_kind(status)),
                None => (StatusCode::OK, Some("upstream_error")),
            },
            other => (StatusCode::OK, other),
        };
        self.finish(status.as_u16(), error);
        Some(status)
    }

    /// The socket is cut before the terminal event (upstream closed or failed, or went quiet):
    /// as for a stream cut short, a response of which nothing was relayed gets the gateway's
    /// status (`unrelayed`), one already under way keeps 200 with `error` saying why.
    pub(crate) fn cut(&mut self, unrelayed: StatusCode, error: &str) {
        if self.relayed {
            let error = if error == "upstream_timeout" {
                error
            } else {
                "stream_incomplete"
            };
            self.finish(StatusCode::OK.as_u16(), Some(error));
        } else {
            self.finish(unrelayed.as_u16(), Some(error));
        }
    }

    fn finish(&mut self, status: u16, error: Option<&str>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.call.publish(status, self.usage.usage(), error);
        self.concurrency.take();
        self.metrics.in_flight.dec();
        self.metrics
            .request_done(self.call.endpoint.as_str(), status);
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.finish(CLIENT_CLOSED, Some("client_disconnected"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Endpoint;
    use crate::publisher::Publisher;

    fn turn() -> (
        Turn,
        tokio::sync::mpsc::UnboundedReceiver<shared::UsageEvent>,
    ) {
        let (events, rx) = Publisher::for_test();
        let call = Call::start(Endpoint::Responses, events);
        (Turn::start(call, None, Arc::default()), rx)
    }

    const CREATED: &str = r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","model":"gpt-5-codex","status":"in_progress","usage":null}}"#;
    const DELTA: &str = r#"{"type":"response.output_text.delta","sequence_number":1,"delta":"Hi"}"#;
    const COMPLETED: &str = r#"{"type":"response.completed","sequence_number":2,"response":{"id":"resp_1","model":"gpt-5-codex","status":"completed","service_tier":"default","usage":{"input_tokens":120,"input_tokens_details":{"cached_tokens":100},"output_tokens":7}}}"#;

    #[test]
    fn the_terminal_event_publishes_its_usage_once() {
        let (mut turn, mut rx) = turn();
        assert_eq!(turn.observe(CREATED), None);
        assert_eq!(turn.observe(DELTA), None);
        assert_eq!(turn.observe(COMPLETED), Some(StatusCode::OK));
        drop(turn);
        let event = rx.try_recv().unwrap();
        assert_eq!(
            (
                event.status,
                event.input_tokens,
                event.cache_read_input_tokens,
                event.output_tokens
            ),
            (200, 20, 100, 7)
        );
        assert!(event.ttft_us.is_some_and(|t| t <= event.latency_us));
        assert!(rx.try_recv().is_err(), "one event, not another on drop");
    }

    #[test]
    fn a_wrapped_error_event_ends_the_response_with_its_status() {
        let (mut turn, mut rx) = turn();
        let error = r#"{"type":"error","status":429,"error":{"type":"requests","code":"rate_limit_exceeded","message":"slow down","param":null}}"#;
        assert_eq!(turn.observe(error), Some(StatusCode::TOO_MANY_REQUESTS));
        let event = rx.try_recv().unwrap();
        assert_eq!(
            (event.status, event.error.as_deref()),
            (429, Some("upstream_rate_limited"))
        );
    }

    #[test]
    fn a_dropped_turn_bills_what_was_seen_as_a_disconnect() {
        let (mut turn, mut rx) = turn();
        turn.observe(CREATED);
        drop(turn);
        let event = rx.try_recv().unwrap();
        assert_eq!(
            (event.status, event.error.as_deref(), event.model.as_str()),
            (CLIENT_CLOSED, Some("client_disconnected"), "gpt-5-codex")
        );
        assert_eq!(event.ttft_us, None, "no delta was seen");
    }

    #[test]
    fn a_cut_before_any_event_gets_the_gateways_status() {
        let (mut turn, mut rx) = turn();
        turn.cut(StatusCode::BAD_GATEWAY, "upstream_unreachable");
        let event = rx.try_recv().unwrap();
        assert_eq!(
            (event.status, event.error.as_deref()),
            (502, Some("upstream_unreachable"))
        );

        let (mut turn, mut rx) = super::tests::turn();
        turn.observe(DELTA);
        turn.cut(StatusCode::BAD_GATEWAY, "upstream_unreachable");
        let event = rx.try_recv().unwrap();
        assert_eq!(
            (event.status, event.error.as_deref()),
            (200, Some("stream_incomplete"))
        );
    }
}
