//! Usage in OpenAI Chat Completions and Responses answers, JSON and SSE.
//!
//! OpenAI counts cached tokens (and, on some compatible providers, cache writes) inside its input
//! totals and itemises them in `*_tokens_details`; the event's `input_tokens` excludes both
//! (docs/events.md), so they are subtracted here. Output totals already include reasoning tokens.
//!
//! A Chat stream reports usage only when the request sets `stream_options.include_usage`. When
//! the client did not, the relay sets it ([`inject_include_usage`]) and hides the usage chunk
//! the client did not ask for ([`UsageChunkHider`]). A Responses stream always reports usage, in
//! its terminal event.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::StreamUsage;
use crate::sse::{SseHandler, SseParser};
use crate::usage::Usage;

#[derive(Debug, Deserialize)]
struct ChatUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
    /// Not sent by OpenAI itself, only by some compatible providers.
    cache_write_tokens: Option<u64>,
}

impl ChatUsage {
    /// A usage block is a complete report, so it replaces every count.
    fn apply(self, usage: &mut Usage) {
        let details = self.prompt_tokens_details;
        let cached = details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0);
        let written = details.and_then(|d| d.cache_write_tokens).unwrap_or(0);
        usage.input_tokens = self
            .prompt_tokens
            .unwrap_or(0)
            .saturating_sub(cached)
            .saturating_sub(written);
        usage.output_tokens = self.completion_tokens.unwrap_or(0);
        usage.cache_read_input_tokens = cached;
        usage.cache_creation_input_tokens = written;
        // OpenAI has no 1-hour cache TTL to report.
        usage.cache_creation_1h_input_tokens = 0;
    }
}

/// A chat completion or one chunk of a streamed one; `usage` is null in chunks that carry none.
#[derive(Debug, Deserialize)]
struct ChatBody {
    model: Option<String>,
    service_tier: Option<String>,
    usage: Option<ChatUsage>,
}

impl ChatBody {
    fn apply(self, usage: &mut Usage) {
        if self.model.is_some() {
            usage.model = self.model;
        }
        if self.service_tier.is_some() {
            usage.service_tier = self.service_tier;
        }
        if let Some(wire) = self.usage {
            wire.apply(usage);
        }
    }
}

/// Usage of a non-streaming Chat Completions body; `None` when it reports none (an error).
pub fn chat_usage_from_json(body: &[u8]) -> Option<Usage> {
    let completion: ChatBody = serde_json::from_slice(body).ok()?;
    completion.usage.as_ref()?;
    let mut usage = Usage::default();
    completion.apply(&mut usage);
    Some(usage)
}

#[derive(Debug, Deserialize)]
struct ResponsesUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<InputDetails>,
}

#[derive(Debug, Deserialize)]
struct InputDetails {
    cached_tokens: Option<u64>,
}

impl ResponsesUsage {
    fn apply(self, usage: &mut Usage) {
        let cached = self
            .input_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        usage.input_tokens = self.input_tokens.unwrap_or(0).saturating_sub(cached);
        usage.output_tokens = self.output_tokens.unwrap_or(0);
        usage.cache_read_input_tokens = cached;
        usage.cache_creation_input_tokens = 0;
        usage.cache_creation_1h_input_tokens = 0;
    }
}

/// A Responses API response object, as a JSON body or inside a stream's lifecycle events.
#[derive(Debug, Deserialize)]
struct ResponseObject {
    model: Option<String>,
    service_tier: Option<String>,
    usage: Option<ResponsesUsage>,
}

/// Usage of a non-streaming Responses body; `None` when it reports none (an error).
pub fn responses_usage_from_json(body: &[u8]) -> Option<Usage> {
    let response: ResponseObject = serde_json::from_slice(body).ok()?;
    let mut usage = Usage {
        model: response.model,
        service_tier: response.service_tier,
        ..Usage::default()
    };
    response.usage?.apply(&mut usage);
    Some(usage)
}

/// Chat Completions chunks: `data:` lines without event names, ended by `data: [DONE]`.
#[derive(Debug, Default)]
pub struct ChatStream {
    usage: Usage,
    done: bool,
}

impl SseHandler for ChatStream {
    fn on_event(&mut self, _event: &str, data: &str) {
        if data.trim() == "[DONE]" {
            self.done = true;
            return;
        }
        // Usage is taken from whichever chunk carries it: normally a last chunk with empty
        // `choices`, but some compatible providers put it on the finish chunk.
        if let Ok(chunk) = serde_json::from_str::<ChatBody>(data) {
            chunk.apply(&mut self.usage);
        }
    }
}

impl StreamUsage for ChatStream {
    fn usage(&self) -> &Usage {
        &self.usage
    }

    fn completed(&self) -> bool {
        self.done
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    Completed,
    Incomplete,
    Failed,
}

#[derive(Debug, Deserialize)]
struct ResponsesEvent {
    #[serde(rename = "type")]
    kind: Option<String>,
    response: Option<ResponseObject>,
}

/// Responses API events. Only the terminal event carries usage; earlier snapshots of the
/// response object have `usage: null` and the tier the client asked for (e.g. `auto`) rather
/// than the one that served it, so they contribute only the model.
#[derive(Debug, Default)]
pub struct ResponsesStream {
    usage: Usage,
    terminal: Option<Terminal>,
    /// A top-level `error` event was seen.
    errored: bool,
}

impl SseHandler for ResponsesStream {
    fn on_event(&mut self, event: &str, data: &str) {
        let Ok(parsed) = serde_json::from_str::<ResponsesEvent>(data) else {
            return;
        };
        let terminal = match parsed.kind.as_deref().unwrap_or(event) {
            "response.completed" => Some(Terminal::Completed),
            "response.incomplete" => Some(Terminal::Incomplete),
            "response.failed" => Some(Terminal::Failed),
            "error" => {
                self.errored = true;
                return;
            }
            _ => None,
        };
        if terminal.is_some() {
            self.terminal = terminal;
        }
        let Some(response) = parsed.response else {
            return;
        };
        if response.model.is_some() {
            self.usage.model = response.model;
        }
        if terminal.is_some() {
            if response.service_tier.is_some() {
                self.usage.service_tier = response.service_tier;
            }
            if let Some(wire) = response.usage {
                wire.apply(&mut self.usage);
            }
        }
    }
}

impl StreamUsage for ResponsesStream {
    fn usage(&self) -> &Usage {
        &self.usage
    }

    fn completed(&self) -> bool {
        self.terminal.is_some() || self.errored
    }

    fn error(&self) -> Option<&'static str> {
        match self.terminal {
            Some(Terminal::Completed) => None,
            Some(Terminal::Incomplete) => Some("response_incomplete"),
            Some(Terminal::Failed) => Some("response_failed"),
            // OpenAI may follow an `error` event with `response.failed`, which then wins.
            None => self.errored.then_some("upstream_error"),
        }
    }
}

/// For a streamed Chat Completions request that does not already ask for usage, the body with
/// `stream_options.include_usage` set; `None` means forward the original bytes unchanged.
pub fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let mut request: Map<String, Value> = serde_json::from_slice(body).ok()?;
    if request.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    match request.get_mut("stream_options") {
        None | Some(Value::Null) => {
            let options = Map::from_iter([("include_usage".to_owned(), Value::Bool(true))]);
            request.insert("stream_options".to_owned(), Value::Object(options));
        }
        Some(Value::Object(options)) => {
            if options.get("include_usage") == Some(&Value::Bool(true)) {
                return None;
            }
            options.insert("include_usage".to_owned(), Value::Bool(true));
        }
        // The upstream rejects a malformed `stream_options` either way; untouched, the client
        // sees that rejection for the request it actually sent.
        Some(_) => return None,
    }
    serde_json::to_vec(&request).ok()
}

/// Where the scanner is within the current line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line, after `\n` (or `\r\n`) or at the start of the stream.
    #[default]
    Start,
    /// At the start of a line after `\r`: a `\n` next only completes that line end.
    StartAfterCr,
    Text,
}

/// Removes, from a Chat stream whose usage the gateway requested, the usage report the client
/// did not ask for, and forwards everything else byte for byte.
///
/// Line ends are tracked byte by byte with no lookahead, so event boundaries (and therefore the
/// output) do not depend on how the upstream chunked the stream. Only an unfinished event is
/// held back, so forwarding adds no delay beyond an event boundary.
#[derive(Debug, Default)]
pub struct UsageChunkHider {
    /// The bytes after the last event boundary.
    held: Vec<u8>,
    /// How much of `held` the scanner has already seen.
    scanned: usize,
    line: Line,
    /// Set when the last event ended on a `\r`. That event has already gone out, since waiting
    /// for the next byte would delay it, so a `\n` arriving next (the rest of its `\r\n`)
    /// shares its fate: forwarded if the event went out unchanged (`Some(true)`), else dropped.
    ended_on_cr: Option<bool>,
}

impl UsageChunkHider {
    /// The bytes to forward now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len());
        self.held.extend_from_slice(chunk);
        let mut event_start = 0;
        let mut at = self.scanned;
        while let Some(offset) = self.held[at..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let end = self.held[at + offset];
            let ended_on_cr = self.ended_on_cr.take();
            if offset == 0
                && end == b'\n'
                && let Some(forwarded) = ended_on_cr
            {
                if forwarded {
                    out.push(b'\n');
                }
                self.line = Line::Start;
                at += 1;
                event_start = at;
                continue;
            }
            if offset > 0 {
                self.line = Line::Text;
            }
            // A blank line ends the event; `\r\n` is one line end, so its `\n` ends nothing.
            let blank =
                self.line == Line::Start || (end == b'\r' && self.line == Line::StartAfterCr);
            self.line = if end == b'\r' {
                Line::StartAfterCr
            } else {
                Line::Start
            };
            at += offset + 1;
            if blank {
                let forwarded = forward_event(&self.held[event_start..at], &mut out);
                self.ended_on_cr = (end == b'\r').then_some(forwarded);
                event_start = at;
            }
        }
        if at < self.held.len() {
            self.line = Line::Text;
            self.ended_on_cr = None;
        }
        self.held.drain(..event_start);
        self.scanned = self.held.len();
        out
    }

    /// What is still held at the end of the stream: an unterminated tail, unchanged.
    pub fn finish(&mut self) -> Vec<u8> {
        self.scanned = 0;
        self.line = Line::Start;
        self.ended_on_cr = None;
        std::mem::take(&mut self.held)
    }
}

/// Appends one complete event to `out`, minus a usage report; true when it went out unchanged.
fn forward_event(event: &[u8], out: &mut Vec<u8>) -> bool {
    if !may_report_usage(event) {
        out.extend_from_slice(event);
        return true;
    }
    let mut data = EventData::default();
    SseParser::default().feed(event, &mut data);
    let chunk = data
        .0
        .and_then(|d| serde_json::from_str::<Map<String, Value>>(&d).ok())
        .filter(|chunk| chunk.get("usage").is_some_and(|u| !u.is_null()));
    let Some(mut chunk) = chunk else {
        out.extend_from_slice(event);
        return true;
    };
    let has_choices = chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| !choices.is_empty());
    if !has_choices {
        return false;
    }
    chunk.remove("usage");
    match serde_json::to_vec(&chunk) {
        Ok(json) => {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&json);
            out.extend_from_slice(b"\n\n");
            false
        }
        // Showing the client a usage block is better than breaking its stream.
        Err(_) => {
            out.extend_from_slice(event);
            true
        }
    }
}

/// A cheap pre-filter so that the content chunks, which all carry `"usage": null` once usage
/// is requested, are never parsed: false only when every `"usage"` in the event is followed by
/// `: null`. Anything unexpected after `"usage"` counts as a maybe.
fn may_report_usage(event: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut rest = event;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let Some(value) = skip_whitespace(rest).strip_prefix(b":") else {
            return true;
        };
        if !skip_whitespace(value).starts_with(b"null") {
            return true;
        }
    }
    false
}

fn skip_whitespace(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &bytes[n..]
}

/// The data of the one event fed to it.
#[derive(Default)]
struct EventData(Option<String>);

impl SseHandler for EventData {
    fn on_event(&mut self, _event: &str, data: &str) {
        self.0 = Some(data.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed<H: SseHandler>(mut handler: H, sse: &str) -> H {
        SseParser::default().feed(sse.as_bytes(), &mut handler);
        handler
    }

    // Chat Completions.

    const ROLE: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}"#;
    const TEXT: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],"usage": null}"#;
    const FINISH: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#;
    const USAGE: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":4107,"completion_tokens":30,"total_tokens":4137,"prompt_tokens_details":{"cached_tokens":4000,"audio_tokens":0,"cache_write_tokens":7},"completion_tokens_details":{"reasoning_tokens":12,"audio_tokens":0}}}"#;
    const QUIRK: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","service_tier":"default","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":4107,"completion_tokens":30,"total_tokens":4137,"prompt_tokens_details":{"cached_tokens":4000,"cache_write_tokens":7}}}"#;
    const DONE: &str = "data: [DONE]";

    /// 4107 prompt tokens of which 4000 cache reads and 7 cache writes; 30 output tokens of
    /// which 12 reasoning.
    fn chat_usage() -> Usage {
        Usage {
            model: Some("gpt-4o-2024-08-06".into()),
            input_tokens: 100,
            output_tokens: 30,
            cache_creation_input_tokens: 7,
            cache_creation_1h_input_tokens: 0,
            cache_read_input_tokens: 4000,
            service_tier: Some("default".into()),
        }
    }

    fn chat_stream(events: &[&str]) -> ChatStream {
        let sse: String = events.iter().map(|e| format!("{e}\n\n")).collect();
        feed(ChatStream::default(), &sse)
    }

    #[test]
    fn a_chat_completion_counts_cache_reads_and_writes_apart_from_input() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4107,"completion_tokens":30,"total_tokens":4137,"prompt_tokens_details":{"cached_tokens":4000,"audio_tokens":0,"cache_write_tokens":7},"completion_tokens_details":{"reasoning_tokens":12}},"service_tier":"default"}"#;
        assert_eq!(chat_usage_from_json(body), Some(chat_usage()));
    }

    #[test]
    fn a_chat_completion_without_details_is_all_input_and_errors_have_no_usage() {
        let body = br#"{"object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":null}}"#;
        let usage = chat_usage_from_json(body).unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (12, 3));
        assert_eq!(usage.cache_read_input_tokens, 0);
        assert_eq!(usage.service_tier, None);
        let error = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert_eq!(chat_usage_from_json(error), None);
        assert_eq!(chat_usage_from_json(b"upstream exploded"), None);
    }

    #[test]
    fn more_cached_tokens_than_prompt_tokens_leave_zero_input() {
        let body = br#"{"model":"m","usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":9}}}"#;
        assert_eq!(chat_usage_from_json(body).unwrap().input_tokens, 0);
    }

    #[test]
    fn a_chat_stream_takes_usage_from_the_chunk_with_empty_choices() {
        let acc = chat_stream(&[ROLE, TEXT, FINISH, USAGE, DONE]);
        assert_eq!(acc.usage, chat_usage());
        assert!(acc.completed());
        assert_eq!(acc.error(), None);
    }

    #[test]
    fn a_chat_stream_counts_usage_riding_on_the_finish_chunk() {
        let acc = chat_stream(&[ROLE, TEXT, QUIRK, DONE]);
        assert_eq!(acc.usage, chat_usage());
        assert!(acc.completed());
    }

    #[test]
    fn a_chat_stream_without_done_was_cut_short() {
        let acc = chat_stream(&[ROLE, TEXT, FINISH, USAGE]);
        assert_eq!(acc.usage, chat_usage());
        assert!(!acc.completed());
    }

    #[test]
    fn a_chat_stream_without_a_usage_chunk_reports_only_model_and_tier() {
        let acc = chat_stream(&[ROLE, TEXT, FINISH, DONE]);
        assert_eq!(
            acc.usage,
            Usage {
                model: Some("gpt-4o-2024-08-06".into()),
                service_tier: Some("default".into()),
                ..Usage::default()
            }
        );
        assert!(acc.completed());
    }

    // Responses.

    const RESPONSES_USAGE: &str = r#"{"input_tokens":1000,"input_tokens_details":{"cached_tokens":900},"output_tokens":50,"output_tokens_details":{"reasoning_tokens":20},"total_tokens":1050}"#;

    /// 1000 input tokens of which 900 cached; 50 output tokens of which 20 reasoning.
    fn responses_usage() -> Usage {
        Usage {
            model: Some("gpt-5-codex".into()),
            input_tokens: 100,
            output_tokens: 50,
            cache_read_input_tokens: 900,
            service_tier: Some("priority".into()),
            ..Usage::default()
        }
    }

    fn response_object(status: &str, usage: &str, tier: &str) -> String {
        format!(
            r#"{{"id":"resp_1","object":"response","created_at":1,"status":"{status}","model":"gpt-5-codex","output":[],"service_tier":"{tier}","usage":{usage}}}"#
        )
    }

    fn event(name: &str, data: &str) -> String {
        format!("event: {name}\ndata: {data}\n\n")
    }

    fn lifecycle(name: &str, seq: u32, response: &str) -> String {
        event(
            name,
            &format!(r#"{{"type":"{name}","sequence_number":{seq},"response":{response}}}"#),
        )
    }

    /// A Responses stream up to (not including) its terminal event.
    fn responses_prefix() -> String {
        let in_progress = response_object("in_progress", "null", "auto");
        [
            lifecycle("response.created", 0, &in_progress),
            lifecycle("response.in_progress", 1, &in_progress),
            event(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi","logprobs":[]}"#,
            ),
        ]
        .concat()
    }

    #[test]
    fn a_responses_body_counts_cached_tokens_apart_from_input() {
        let body = response_object("completed", RESPONSES_USAGE, "priority");
        assert_eq!(
            responses_usage_from_json(body.as_bytes()),
            Some(responses_usage())
        );
        let error = br#"{"error":{"message":"The model `gpt-9` does not exist","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#;
        assert_eq!(responses_usage_from_json(error), None);
        let failed = response_object("failed", "null", "auto");
        assert_eq!(responses_usage_from_json(failed.as_bytes()), None);
    }

    #[test]
    fn each_terminal_event_ends_a_responses_stream_with_its_usage_and_error_kind() {
        for (terminal, status, want_error) in [
            ("response.completed", "completed", None),
            (
                "response.incomplete",
                "incomplete",
                Some("response_incomplete"),
            ),
            ("response.failed", "failed", Some("response_failed")),
        ] {
            let last = response_object(status, RESPONSES_USAGE, "priority");
            let acc = feed(
                ResponsesStream::default(),
                &(responses_prefix() + &lifecycle(terminal, 3, &last)),
            );
            assert_eq!(acc.usage, responses_usage(), "{terminal}");
            assert!(acc.completed(), "{terminal}");
            assert_eq!(acc.error(), want_error, "{terminal}");
        }
    }

    #[test]
    fn a_responses_stream_cut_before_its_terminal_knows_only_the_model() {
        let acc = feed(ResponsesStream::default(), &responses_prefix());
        assert_eq!(
            acc.usage,
            Usage {
                model: Some("gpt-5-codex".into()),
                ..Usage::default()
            }
        );
        assert!(!acc.completed());
        assert_eq!(acc.error(), None);
    }

    #[test]
    fn an_error_event_ends_a_responses_stream_unless_a_terminal_follows() {
        let error = event(
            "error",
            r#"{"type":"error","code":"server_error","message":"boom","param":null,"sequence_number":3}"#,
        );
        let acc = feed(ResponsesStream::default(), &(responses_prefix() + &error));
        assert!(acc.completed());
        assert_eq!(acc.error(), Some("upstream_error"));

        let failed = lifecycle(
            "response.failed",
            4,
            &response_object("failed", RESPONSES_USAGE, "priority"),
        );
        let acc = feed(
            ResponsesStream::default(),
            &(responses_prefix() + &error + &failed),
        );
        assert_eq!(acc.error(), Some("response_failed"));
        assert_eq!(acc.usage, responses_usage());
    }

    #[test]
    fn the_event_name_stands_in_for_a_missing_type() {
        let data = format!(
            r#"{{"response":{}}}"#,
            response_object("completed", RESPONSES_USAGE, "priority")
        );
        let acc = feed(
            ResponsesStream::default(),
            &event("response.completed", &data),
        );
        assert!(acc.completed());
        assert_eq!(acc.usage, responses_usage());
    }

    // Requesting usage.

    fn inject(body: &str) -> Option<Value> {
        inject_include_usage(body.as_bytes()).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn a_stream_request_without_include_usage_gets_it() {
        let got = inject(
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(
            got,
            Some(serde_json::json!({
                "model": "gpt-4o", "stream": true,
                "messages": [{"role": "user", "content": "hi"}],
                "stream_options": {"include_usage": true},
            }))
        );
        let got = inject(r#"{"stream":true,"stream_options":null}"#);
        assert_eq!(got.unwrap()["stream_options"]["include_usage"], true);
    }

    #[test]
    fn other_stream_options_are_kept_and_false_is_overridden() {
        let got = inject(
            r#"{"stream":true,"stream_options":{"include_usage":false,"include_obfuscation":false}}"#,
        );
        assert_eq!(
            got.unwrap()["stream_options"],
            serde_json::json!({"include_usage": true, "include_obfuscation": false})
        );
    }

    #[test]
    fn requests_that_need_no_change_are_forwarded_as_sent() {
        for body in [
            r#"{"model":"gpt-4o","messages":[]}"#,
            r#"{"stream":false}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":true,"stream_options":"weird"}"#,
            r#"[{"stream":true}]"#,
            "not json",
        ] {
            assert_eq!(inject(body), None, "{body}");
        }
    }

    // Hiding the usage chunk.

    /// Runs `input` through a hider in the given chunks and returns everything it forwarded.
    fn hide(input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut hider = UsageChunkHider::default();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, input.len());
            out.extend(hider.push(&input[start..cut]));
            start = cut;
        }
        out.extend(hider.push(&input[start..]));
        out.extend(hider.finish());
        out
    }

    /// Checks the output for `input` fed whole and fed one byte at a time.
    #[track_caller]
    fn check(input: &str, want: &str) {
        let whole = hide(input.as_bytes(), &[]);
        assert_eq!(String::from_utf8_lossy(&whole), want);
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            String::from_utf8_lossy(&hide(input.as_bytes(), &bytewise)),
            want
        );
    }

    #[test]
    fn events_without_usage_are_forwarded_byte_for_byte() {
        let input = format!(
            ": keep-alive\r\n\r\n{ROLE}\r\n\r\n{TEXT}\r\rdata: {{\"usage\"  :  null}}\n\n{FINISH}\n\n{DONE}\n\n"
        );
        check(&input, &input);
    }

    #[test]
    fn the_usage_chunk_is_dropped_whole() {
        check(
            &format!("{FINISH}\n\n{USAGE}\r\n\r\n{DONE}\n\n"),
            &format!("{FINISH}\n\n{DONE}\n\n"),
        );
    }

    #[test]
    fn a_finish_chunk_carrying_usage_loses_only_its_usage() {
        let out = hide(format!("{TEXT}\n\n{QUIRK}\n\n{DONE}\n\n").as_bytes(), &[]);
        let out = String::from_utf8(out).unwrap();
        let events: Vec<&str> = out.split("\n\n").collect();
        assert_eq!(events.len(), 4, "{out}");
        assert_eq!(events[0], TEXT);
        assert_eq!(events[2], DONE);
        assert_eq!(events[3], "");
        let rewritten: Value =
            serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
        let mut want: Value = serde_json::from_str(QUIRK.strip_prefix("data: ").unwrap()).unwrap();
        want.as_object_mut().unwrap().remove("usage");
        assert_eq!(rewritten, want);
    }

    #[test]
    fn an_unterminated_tail_is_held_until_finish() {
        let mut hider = UsageChunkHider::default();
        assert_eq!(
            hider.push(format!("{ROLE}\n\ndata: {{\"cho").as_bytes()),
            format!("{ROLE}\n\n").as_bytes()
        );
        assert_eq!(hider.push(b"ices\":[]}\n"), b"");
        assert_eq!(hider.finish(), b"data: {\"choices\":[]}\n");
    }

    /// Events a provider might send, with and without usage.
    const POOL: [&str; 7] = [
        ROLE,
        TEXT,
        FINISH,
        USAGE,
        QUIRK,
        DONE,
        ": comment\ndata: {\"usage\":{\"prompt_tokens\":1},\ndata: \"choices\":[]}",
    ];

    fn line_end(ending: usize) -> &'static str {
        ["\n", "\r\n", "\r"][ending]
    }

    fn stream_of(events: &[(usize, usize)], tail: &str) -> String {
        let mut sse = String::new();
        for &(event, ending) in events {
            let ending = line_end(ending);
            sse.push_str(&POOL[event].replace('\n', ending));
            sse.push_str(ending);
            sse.push_str(ending);
        }
        sse + tail
    }

    /// What the client should see of the same stream: usage-only chunks gone, the finish chunk
    /// without its usage, everything else as sent.
    fn expected_of(events: &[(usize, usize)], tail: &str) -> String {
        let mut quirk: Map<String, Value> =
            serde_json::from_str(QUIRK.strip_prefix("data: ").unwrap()).unwrap();
        quirk.remove("usage");
        let quirk = format!("data: {}\n\n", serde_json::to_string(&quirk).unwrap());
        let mut sse = String::new();
        for &(event, ending) in events {
            match POOL[event] {
                QUIRK => sse.push_str(&quirk),
                USAGE => {}
                other if other.contains("\"usage\":{") => {}
                _ => sse.push_str(&stream_of(&[(event, ending)], "")),
            }
        }
        sse + tail
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_output(
            events in proptest::collection::vec((0..POOL.len(), 0usize..3), 0..10),
            tail in prop_oneof![Just(""), Just("data: {\"usage\":{"), Just("\r")],
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let input = stream_of(&events, tail);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            cuts.sort_unstable();
            let whole = hide(input.as_bytes(), &[]);
            prop_assert_eq!(&hide(input.as_bytes(), &cuts), &whole);
            prop_assert_eq!(String::from_utf8(whole).unwrap(), expected_of(&events, tail));
        }
    }
}
