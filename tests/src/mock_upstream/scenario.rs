//! The per-request `"mock"` field that tests use to script a response, and the deterministic
//! defaults used when a request does not carry one.
//!
//! Everything here is pure: the provider modules turn a [`Reply`] into wire JSON and the
//! [`Scenario`] timing fields into delays, so the arithmetic can be tested without a server.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Assistant text used when the scenario does not provide one; eight words, so the default
/// output token count is 8.
pub(crate) const DEFAULT_TEXT: &str = "Hello from the mock upstream, a deterministic reply.";

/// Every knob is optional; `deny_unknown_fields` turns a typo in a test into a 400 instead of a
/// silently ignored setting.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Scenario {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cache_creation_5m: u64,
    pub cache_creation_1h: u64,
    pub cache_read: u64,
    pub reasoning_tokens: u64,
    pub cache_write: Option<u64>,
    pub model: Option<String>,
    pub service_tier: Option<String>,
    pub text: Option<String>,
    pub latency_ms: u64,
    pub chunk_delay_ms: u64,
    pub error: Option<ErrorSpec>,
    pub hang: bool,
    pub cut_after_events: Option<usize>,
    pub omit_terminator: bool,
    /// Mix malformed events (bad JSON, wrong types, invalid UTF-8, stray lines) into the
    /// stream after its first event; the well-formed events still follow.
    pub malformed_sse: bool,
    pub delta_usage_full: bool,
    pub delta_input_tokens: Option<u64>,
    pub delta_cache_creation_5m: Option<u64>,
    pub delta_cache_creation_1h: Option<u64>,
    pub delta_cache_read: Option<u64>,
    pub final_chunk_with_choices: bool,
    pub responses_terminal: Option<Terminal>,
    /// Responses WebSocket mode: with `cut_after_events`, close the socket with this code
    /// (e.g. 1011) instead of dropping the connection without a close frame.
    pub close_code: Option<u16>,
}

/// A provider-shaped error to return instead of a completion.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ErrorSpec {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub message: Option<String>,
    /// Overrides the provider's error `type` (derived from the status otherwise).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// OpenAI only: overrides `error.code`.
    pub code: Option<String>,
}

/// The final event of a Responses stream, and the status of the response object.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Terminal {
    Completed,
    Incomplete,
    Failed,
}

/// Which request fields hold the prompt and the output cap differs per API.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Dialect {
    Anthropic,
    OpenAiChat,
    OpenAiResponses,
}

/// Token counts in Anthropic's vocabulary; the OpenAI modules fold the cache counts into their
/// inclusive `prompt_tokens` / `input_tokens`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Uncached input tokens.
    pub input: u64,
    pub cache_creation_5m: u64,
    pub cache_creation_1h: u64,
    pub cache_read: u64,
    pub cache_write: Option<u64>,
    /// Includes `reasoning`, as both providers count it.
    pub output: u64,
    pub reasoning: u64,
}

/// What the mock answers with, before it is shaped into one of the wire formats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub model: String,
    pub text: String,
    pub usage: Usage,
    /// The output hit the request's token cap (`max_tokens` and friends).
    pub truncated: bool,
}

impl Scenario {
    /// Reads the optional `"mock"` field of a request body.
    pub(crate) fn from_request(body: &Value) -> Result<Scenario, String> {
        let scenario = match body.get("mock") {
            None | Some(Value::Null) => Scenario::default(),
            Some(mock) => Scenario::deserialize(mock).map_err(|e| e.to_string())?,
        };
        if let Some(error) = &scenario.error
            && !(400..=599).contains(&error.status)
        {
            return Err(format!(
                "error.status must be 400..=599, got {}",
                error.status
            ));
        }
        Ok(scenario)
    }

    pub(crate) fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }

    pub(crate) fn chunk_delay(&self) -> Duration {
        Duration::from_millis(self.chunk_delay_ms)
    }

    /// Uncached input tokens: the scripted value, or an estimate of ~4 characters per token.
    pub(crate) fn input_tokens(&self, request: &Value, dialect: Dialect) -> u64 {
        self.input_tokens
            .unwrap_or_else(|| estimate_prompt_tokens(request, dialect))
    }

    /// The tier OpenAI reports: the scripted one, else what the request asked for, except that
    /// `auto` (and an absent field) is reported as the tier actually used, `default`.
    pub(crate) fn openai_service_tier(&self, request: &Value) -> String {
        let requested = request.get("service_tier").and_then(Value::as_str);
        self.service_tier
            .as_deref()
            .or(requested.filter(|tier| *tier != "auto"))
            .unwrap_or("default")
            .to_owned()
    }

    pub(crate) fn reply(&self, request: &Value, dialect: Dialect) -> Reply {
        let model = self
            .model
            .clone()
            .or_else(|| {
                request
                    .get("model")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| default_model(dialect).to_owned());
        let mut text = self.text.clone().unwrap_or_else(|| DEFAULT_TEXT.to_owned());
        let (output, truncated) = match self.output_tokens {
            // A scripted count is taken literally so tests can pin exact numbers.
            Some(output) => (output, false),
            None => {
                let wanted = word_count(&text) + self.reasoning_tokens;
                match output_cap(request, dialect) {
                    Some(cap) if wanted > cap => {
                        let visible = cap.saturating_sub(self.reasoning_tokens);
                        text = first_words(&text, visible);
                        (cap, true)
                    }
                    _ => (wanted, false),
                }
            }
        };
        let usage = Usage {
            input: self.input_tokens(request, dialect),
            cache_creation_5m: self.cache_creation_5m,
            cache_creation_1h: self.cache_creation_1h,
            cache_read: self.cache_read,
            cache_write: self.cache_write,
            output,
            reasoning: self.reasoning_tokens,
        };
        Reply {
            model,
            text,
            usage,
            truncated,
        }
    }
}

impl Usage {
    pub(crate) fn cache_creation(&self) -> u64 {
        self.cache_creation_5m + self.cache_creation_1h
    }
}

/// Splits text into stream deltas of two words each; concatenating them gives the text back.
pub(crate) fn text_chunks(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    words.chunks(2).map(|pair| pair.concat()).collect()
}

fn estimate_prompt_tokens(request: &Value, dialect: Dialect) -> u64 {
    let fields: &[&str] = match dialect {
        Dialect::Anthropic => &["system", "messages", "tools"],
        Dialect::OpenAiChat => &["messages", "tools"],
        Dialect::OpenAiResponses => &["instructions", "input", "tools"],
    };
    let chars: usize = fields
        .iter()
        .filter_map(|field| request.get(field))
        .map(|value| value.to_string().len())
        .sum();
    (chars as u64).div_ceil(4).max(1)
}

fn output_cap(request: &Value, dialect: Dialect) -> Option<u64> {
    let fields: &[&str] = match dialect {
        Dialect::Anthropic => &["max_tokens"],
        Dialect::OpenAiChat => &["max_completion_tokens", "max_tokens"],
        Dialect::OpenAiResponses => &["max_output_tokens"],
    };
    fields
        .iter()
        .find_map(|field| request.get(field).and_then(Value::as_u64))
}

fn default_model(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Anthropic => "claude-sonnet-4-5-20250929",
        Dialect::OpenAiChat => "gpt-4o-mini-2024-07-18",
        Dialect::OpenAiResponses => "gpt-5-codex",
    }
}

fn word_count(text: &str) -> u64 {
    (text.split_whitespace().count() as u64).max(1)
}

fn first_words(text: &str, n: u64) -> String {
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    let kept: String = text.split_inclusive(' ').take(n).collect();
    kept.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Dialect, Scenario, Terminal, Usage};

    #[track_caller]
    fn scenario(mock: serde_json::Value) -> Scenario {
        Scenario::from_request(&json!({ "mock": mock })).unwrap()
    }

    #[test]
    fn a_request_without_mock_gets_the_default_scenario() {
        let s = Scenario::from_request(&json!({"model": "m", "messages": []})).unwrap();
        assert_eq!(s, Scenario::default());
    }

    #[test]
    fn every_documented_field_parses() {
        let s = scenario(json!({
            "input_tokens": 1200, "output_tokens": 300, "cache_creation_5m": 40,
            "cache_creation_1h": 10, "cache_read": 4000, "reasoning_tokens": 5, "cache_write": 7,
            "model": "m2", "service_tier": "priority", "text": "Hi", "latency_ms": 3,
            "chunk_delay_ms": 4, "error": {"status": 429, "retry_after": 7, "message": "slow"},
            "hang": false, "cut_after_events": 3, "omit_terminator": true, "malformed_sse": true,
            "delta_usage_full": true, "delta_input_tokens": 9, "final_chunk_with_choices": true,
            "responses_terminal": "incomplete", "close_code": 1011
        }));
        assert_eq!(s.close_code, Some(1011));
        assert_eq!(s.cache_write, Some(7));
        assert_eq!(
            s.error.as_ref().map(|e| (e.status, e.retry_after)),
            Some((429, Some(7)))
        );
        assert_eq!(s.cut_after_events, Some(3));
        assert!(s.malformed_sse);
        assert_eq!(s.responses_terminal, Some(Terminal::Incomplete));
        assert_eq!(s.delta_input_tokens, Some(9));
    }

    #[test]
    fn unknown_fields_and_bad_statuses_are_rejected() {
        let typo = Scenario::from_request(&json!({"mock": {"input_tokenz": 1}}));
        assert!(typo.unwrap_err().contains("input_tokenz"));
        let status = Scenario::from_request(&json!({"mock": {"error": {"status": 200}}}));
        assert!(status.is_err());
    }

    #[test]
    fn scripted_counts_are_reported_verbatim() {
        let s = scenario(
            json!({"input_tokens": 1200, "output_tokens": 300, "cache_read": 4000,
                                "cache_creation_5m": 40, "cache_creation_1h": 10}),
        );
        let reply = s.reply(
            &json!({"model": "claude-x", "max_tokens": 10}),
            Dialect::Anthropic,
        );
        let want = Usage {
            input: 1200,
            cache_creation_5m: 40,
            cache_creation_1h: 10,
            cache_read: 4000,
            cache_write: None,
            output: 300,
            reasoning: 0,
        };
        assert_eq!(reply.usage, want);
        assert_eq!(reply.usage.cache_creation(), 50);
        assert_eq!(reply.model, "claude-x");
        assert!(!reply.truncated);
    }

    #[test]
    fn default_input_is_a_quarter_of_the_prompt_json_length() {
        let request = json!({"messages": [{"role": "user", "content": "Hello there"}]});
        // `[{"role":"user","content":"Hello there"}]` is 42 characters.
        assert_eq!(
            Scenario::default().input_tokens(&request, Dialect::OpenAiChat),
            11
        );
        assert_eq!(
            Scenario::default().input_tokens(&json!({}), Dialect::Anthropic),
            1
        );
    }

    #[test]
    fn default_output_counts_words_plus_reasoning() {
        let s = scenario(json!({"text": "one two three", "reasoning_tokens": 4}));
        let reply = s.reply(&json!({}), Dialect::OpenAiResponses);
        assert_eq!((reply.usage.output, reply.usage.reasoning), (7, 4));
        assert_eq!(reply.model, "gpt-5-codex");
    }

    #[test]
    fn default_output_is_capped_by_max_tokens_and_the_text_truncated() {
        let request = json!({"max_completion_tokens": 3});
        let reply = Scenario::default().reply(&request, Dialect::OpenAiChat);
        assert_eq!(reply.usage.output, 3);
        assert_eq!(reply.text, "Hello from the");
        assert!(reply.truncated);
    }

    #[test]
    fn the_mock_model_overrides_the_requested_one() {
        let reply = scenario(json!({"model": "gpt-4o-2024-08-06"}))
            .reply(&json!({"model": "gpt-4o"}), Dialect::OpenAiChat);
        assert_eq!(reply.model, "gpt-4o-2024-08-06");
    }

    #[test]
    fn openai_reports_the_requested_tier_unless_it_is_auto() {
        let s = Scenario::default();
        assert_eq!(
            s.openai_service_tier(&json!({"service_tier": "flex"})),
            "flex"
        );
        assert_eq!(
            s.openai_service_tier(&json!({"service_tier": "auto"})),
            "default"
        );
        let scripted = scenario(json!({"service_tier": "priority"}));
        assert_eq!(
            scripted.openai_service_tier(&json!({"service_tier": "flex"})),
            "priority"
        );
    }

    #[test]
    fn text_chunks_concatenate_back_to_the_text() {
        let chunks = super::text_chunks(super::DEFAULT_TEXT);
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[0], "Hello from ");
        assert_eq!(chunks.concat(), super::DEFAULT_TEXT);
        assert!(super::text_chunks("").is_empty());
    }
}
