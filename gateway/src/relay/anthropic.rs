//! Usage in Anthropic Messages responses, JSON and SSE.
//!
//! Anthropic reports `input_tokens` without cache reads and writes, the event's own meaning, and
//! splits cache writes by TTL in `usage.cache_creation`. In a stream, `message_start` carries the
//! input side and a first output count; each `message_delta` carries the cumulative output
//! count and, on some models, final input and cache counts that supersede `message_start`'s.

use std::sync::LazyLock;

use memchr::memmem;
use serde::Deserialize;

use super::StreamUsage;
use crate::sse::SseHandler;
use crate::usage::Usage;

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
    service_tier: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct CacheCreation {
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Message {
    model: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct StreamEvent {
    #[serde(rename = "type")]
    kind: String,
    message: Option<Message>,
    usage: Option<WireUsage>,
}

/// Folds a usage block into `usage`: fields present in the block win, absent ones stay.
fn apply(usage: &mut Usage, wire: WireUsage) {
    if let Some(n) = wire.input_tokens {
        usage.input_tokens = n;
    }
    if let Some(n) = wire.output_tokens {
        usage.output_tokens = n;
    }
    if let Some(n) = wire.cache_creation_input_tokens {
        usage.cache_creation_input_tokens = n;
    }
    if let Some(n) = wire.cache_read_input_tokens {
        usage.cache_read_input_tokens = n;
    }
    if let Some(n) = wire
        .cache_creation
        .and_then(|c| c.ephemeral_1h_input_tokens)
    {
        usage.cache_creation_1h_input_tokens = n;
    }
    if wire.service_tier.is_some() {
        usage.service_tier = wire.service_tier;
    }
}

/// Usage of a non-streaming response body; `None` when the body is not a message (an error).
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    let message: Message = serde_json::from_slice(body).ok()?;
    let mut usage = Usage {
        model: message.model,
        ..Usage::default()
    };
    apply(&mut usage, message.usage?);
    Some(usage)
}

#[derive(Debug, Default)]
pub struct MessagesStream {
    usage: Usage,
    stopped: bool,
}

/// Whether an event may change anything `on_event` keeps: only events that mention usage,
/// `message_start` (which also names the model) or `message_stop` can, and `\u` catches any of
/// those spelled with JSON escapes. Text deltas are most of a stream and mention none of them;
/// parsing each one as JSON was most of the relay's work per event (callgrind), and a few
/// vectorised substring searches are a tenth of that.
fn may_matter(data: &str) -> bool {
    static NEEDLES: LazyLock<[memmem::Finder<'static>; 4]> = LazyLock::new(|| {
        ["usage", "message_start", "message_stop", "\\u"].map(memmem::Finder::new)
    });
    NEEDLES
        .iter()
        .any(|needle| needle.find(data.as_bytes()).is_some())
}

impl SseHandler for MessagesStream {
    fn on_event(&mut self, _event: &str, data: &str) {
        if !may_matter(data) {
            return;
        }
        // The `type` inside the data is authoritative; the `event:` line merely repeats it.
        let Ok(event) = serde_json::from_str::<StreamEvent>(data) else {
            return;
        };
        match event.kind.as_str() {
            "message_start" => {
                if let Some(message) = event.message {
                    if message.model.is_some() {
                        self.usage.model = message.model;
                    }
                    if let Some(wire) = message.usage {
                        apply(&mut self.usage, wire);
                    }
                }
            }
            "message_delta" => {
                if let Some(wire) = event.usage {
                    apply(&mut self.usage, wire);
                }
            }
            "message_stop" => self.stopped = true,
            _ => {}
        }
    }
}

impl StreamUsage for MessagesStream {
    fn usage(&self) -> &Usage {
        &self.usage
    }

    fn completed(&self) -> bool {
        self.stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseParser;

    fn stream_usage(sse: &str) -> MessagesStream {
        let mut acc = MessagesStream::default();
        SseParser::default().feed(sse.as_bytes(), &mut acc);
        acc
    }

    #[test]
    fn events_that_cannot_matter_are_skipped_and_the_others_are_not() {
        let delta =
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#;
        assert!(!may_matter(delta));
        assert!(!may_matter(r#"{"type":"ping"}"#));
        assert!(may_matter(r#"{"type":"message_stop"}"#));
        assert!(may_matter(
            r#"{"type":"message_delta","usage":{"output_tokens":3}}"#
        ));
        assert!(may_matter(r#"{"type":"message\u005fstop"}"#));
        // Escaped or not, the parse decides what they are.
        let mut stream = stream_usage("data: {\"type\":\"message\\u005fstop\"}\n\n");
        assert!(stream.completed());
        stream.on_event("", delta);
        assert_eq!(stream.usage, Usage::default());
    }

    const START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-sonnet-4-5-20250929\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":40,\"cache_read_input_tokens\":300,\"cache_creation\":{\"ephemeral_5m_input_tokens\":30,\"ephemeral_1h_input_tokens\":10},\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n";

    #[test]
    fn a_stream_takes_input_from_message_start_and_output_from_message_delta() {
        let acc = stream_usage(&format!(
            "{START}event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":15}}}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
        ));
        assert_eq!(
            acc.usage,
            Usage {
                model: Some("claude-sonnet-4-5-20250929".into()),
                input_tokens: 25,
                output_tokens: 15,
                cache_creation_input_tokens: 40,
                cache_creation_1h_input_tokens: 10,
                cache_read_input_tokens: 300,
                service_tier: Some("standard".into()),
            }
        );
        assert!(acc.completed());
    }

    #[test]
    fn input_fields_in_message_delta_win_over_message_start() {
        let acc = stream_usage(&format!(
            "{START}event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"input_tokens\":26,\"cache_read_input_tokens\":310,\"output_tokens\":9}}}}\n\n"
        ));
        assert_eq!(acc.usage.input_tokens, 26);
        assert_eq!(acc.usage.cache_read_input_tokens, 310);
        assert_eq!(acc.usage.cache_creation_input_tokens, 40);
        assert_eq!(acc.usage.output_tokens, 9);
        assert!(!acc.completed(), "no message_stop was seen");
    }

    #[test]
    fn a_json_message_yields_its_usage_and_an_error_yields_none() {
        let body = br#"{"id":"msg_1","type":"message","model":"claude-haiku-4-5","content":[],"usage":{"input_tokens":7,"output_tokens":3,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}"#;
        let usage = usage_from_json(body).unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (7, 3));
        assert_eq!(usage.model.as_deref(), Some("claude-haiku-4-5"));
        assert!(
            usage_from_json(br#"{"type":"error","error":{"type":"api_error","message":"x"}}"#)
                .is_none()
        );
    }
}
