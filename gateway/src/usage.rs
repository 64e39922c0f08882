//! What one client request consumed, gathered while it is served, and the usage event it becomes.

use std::sync::Arc;
use std::time::Instant;

use shared::{SCHEMA_VERSION, UsageEvent};

use crate::provider::Endpoint;
use crate::publisher::Publisher;
use crate::store::KeyRecord;

/// The status an event records when the client went away before any answer reached it (the
/// convention nginx started: no HTTP status was ever sent).
pub const CLIENT_CLOSED: u16 = 499;

/// Token counts in the event's normalized meaning (docs/events.md), whatever the provider's
/// format: `input_tokens` excludes cache reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_creation_1h_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub service_tier: Option<String>,
}

/// One request in flight: what is known about it so far, and the duty to publish its one usage
/// event and log its access-log line. [`Call::publish`] discharges the duty; a call dropped
/// before that (hyper drops the handler when the client hangs up, at whatever await it was)
/// publishes a `client_disconnected` event from `Drop`, so no path out of a request goes
/// unmetered.
#[derive(Debug)]
pub struct Call {
    id: uuid::Uuid,
    ts_ms: i64,
    started: Instant,
    pub endpoint: Endpoint,
    /// The client's HTTP method, for the access log (`POST` on every relay route).
    pub method: &'static str,
    /// The authenticated key: its id goes into the event, its name into the access log.
    pub key: Option<Arc<KeyRecord>>,
    pub account_id: Option<String>,
    /// The model the client asked for; the upstream's report wins when there is one.
    pub requested_model: Option<String>,
    pub stream: bool,
    ttft_us: Option<u64>,
    events: Publisher,
    published: bool,
}

impl Call {
    pub fn start(endpoint: Endpoint, events: Publisher) -> Self {
        Self {
            id: uuid::Uuid::now_v7(),
            ts_ms: chrono::Utc::now().timestamp_millis(),
            started: Instant::now(),
            endpoint,
            method: "POST",
            key: None,
            account_id: None,
            requested_model: None,
            stream: false,
            ttft_us: None,
            events,
            published: false,
        }
    }

    /// The request's (and its event's) unique id.
    pub fn id(&self) -> String {
        self.id.to_string()
    }

    fn elapsed_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records the first body byte going to the client; later calls keep the first.
    pub fn first_byte_sent(&mut self) {
        if self.ttft_us.is_none() {
            self.ttft_us = Some(self.elapsed_us());
        }
    }

    /// The request became a Responses WebSocket: the upgrade is no response of its own, and
    /// each response on the socket is metered as a call of its own (`relay::socket`).
    pub fn became_socket(mut self) {
        self.published = true;
    }

    /// Publishes the request's event, finished now, and logs its access-log line; only the
    /// first call publishes.
    pub fn publish(&mut self, status: u16, usage: &Usage, error: Option<&str>) {
        if !self.published {
            self.published = true;
            let event = self.event(status, usage, error);
            // The gateway's routes are the upstream's paths.
            let path = self.endpoint.upstream_path();
            let key_name = self.key.as_ref().map(|key| key.name.as_str());
            crate::access_log::log(self.method, path, key_name, &event);
            self.events.publish(event);
        }
    }

    /// The event for this request, finished now. Token counts come from the upstream and are
    /// clamped to [`MAX_TOKENS`].
    fn event(&self, status: u16, usage: &Usage, error: Option<&str>) -> UsageEvent {
        let model = usage
            .model
            .clone()
            .or_else(|| self.requested_model.clone())
            .unwrap_or_default();
        UsageEvent {
            v: SCHEMA_VERSION,
            id: self.id.to_string(),
            ts: self.ts_ms,
            key_id: self.key.as_ref().map(|key| key.id.clone()),
            account_id: self.account_id.clone(),
            provider: self.endpoint.provider().as_str().to_owned(),
            endpoint: self.endpoint.as_str().to_owned(),
            model,
            status,
            stream: self.stream,
            latency_us: self.elapsed_us(),
            ttft_us: self.ttft_us,
            input_tokens: clamp_tokens(usage.input_tokens),
            output_tokens: clamp_tokens(usage.output_tokens),
            cache_creation_input_tokens: clamp_tokens(usage.cache_creation_input_tokens),
            cache_creation_1h_input_tokens: clamp_tokens(usage.cache_creation_1h_input_tokens),
            cache_read_input_tokens: clamp_tokens(usage.cache_read_input_tokens),
            service_tier: usage.service_tier.clone(),
            error: error.map(str::to_owned),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.publish(
            CLIENT_CLOSED,
            &Usage::default(),
            Some("client_disconnected"),
        );
    }
}

/// A larger count is a broken (or hostile) upstream report; the aggregator would dead-letter
/// the event (see [`shared::MAX_TOKENS`]), so it is clamped here and the request still counts.
pub use shared::MAX_TOKENS;

fn clamp_tokens(n: u64) -> u64 {
    if n > MAX_TOKENS {
        tracing::warn!(
            reported = n,
            "upstream reported an implausible token count; clamped"
        );
    }
    n.min(MAX_TOKENS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_model_wins_over_the_requested_one() {
        let mut call = Call::start(Endpoint::Messages, Publisher::for_test().0);
        call.requested_model = Some("claude-sonnet-4-5".into());
        let usage = Usage {
            model: Some("claude-sonnet-4-5-20250929".into()),
            ..Usage::default()
        };
        assert_eq!(
            call.event(200, &usage, None).model,
            "claude-sonnet-4-5-20250929"
        );
        assert_eq!(
            call.event(401, &Usage::default(), Some("unauthorized"))
                .model,
            "claude-sonnet-4-5"
        );
    }

    #[test]
    fn time_to_first_byte_keeps_the_first_measurement() {
        let mut call = Call::start(Endpoint::Messages, Publisher::for_test().0);
        call.first_byte_sent();
        let first = call.ttft_us;
        std::thread::sleep(std::time::Duration::from_millis(2));
        call.first_byte_sent();
        assert_eq!(call.ttft_us, first);
        assert!(call.event(200, &Usage::default(), None).latency_us >= first.unwrap_or(0));
    }

    #[test]
    fn implausible_token_counts_are_clamped() {
        let usage = Usage {
            output_tokens: u64::MAX,
            input_tokens: 12,
            ..Usage::default()
        };
        let event =
            Call::start(Endpoint::Messages, Publisher::for_test().0).event(200, &usage, None);
        assert_eq!((event.input_tokens, event.output_tokens), (12, MAX_TOKENS));
    }

    #[test]
    fn a_call_publishes_exactly_one_event_and_a_dropped_one_counts_as_disconnected() {
        let (events, mut rx) = Publisher::for_test();
        let mut call = Call::start(Endpoint::Messages, events.clone());
        call.publish(200, &Usage::default(), None);
        call.publish(500, &Usage::default(), Some("upstream_error"));
        drop(call);
        let first = rx.try_recv().unwrap();
        assert_eq!((first.status, first.error), (200, None));
        assert!(rx.try_recv().is_err(), "published once, not again on drop");

        let mut call = Call::start(Endpoint::ChatCompletions, events);
        let key = serde_json::json!({"id": "k1", "name": "alice", "hash": "", "prefix": "",
            "created_at_ms": 0});
        call.key = Some(Arc::new(serde_json::from_value(key).unwrap()));
        drop(call);
        let left = rx.try_recv().unwrap();
        assert_eq!(
            (left.status, left.error.as_deref(), left.key_id.as_deref()),
            (CLIENT_CLOSED, Some("client_disconnected"), Some("k1"))
        );
    }
}
