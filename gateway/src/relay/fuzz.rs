//! Fuzz targets for everything that reads what an upstream sends: the usage extractors of each
//! format, the stream handlers behind the SSE parser, and the usage-chunk hider. Written as
//! proptest properties so they run in CI at the default case count; `scripts/fuzz.sh` runs them
//! with a large `PROPTEST_CASES` for a bounded time. The property is the same everywhere:
//! arbitrary input never panics, and what is produced is self-consistent.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::StreamUsage;
use super::anthropic::{self, MessagesStream};
use super::openai::{self, ChatStream, ResponsesStream, UsageChunkHider};
use crate::sse::SseParser;
use crate::sse::tests::sse_like_bytes;

/// Keys the extractors look for, so generated objects hit their code paths, not only the
/// "unknown field" one.
const KEYS: &[&str] = &[
    "type",
    "model",
    "usage",
    "message",
    "response",
    "service_tier",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cache_creation",
    "ephemeral_1h_input_tokens",
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "cached_tokens",
    "cache_write_tokens",
    "input_tokens_details",
    "choices",
    "stream",
    "stream_options",
    "include_usage",
    "delta",
    "error",
];

const KINDS: &[&str] = &[
    "message_start",
    "message_delta",
    "message_stop",
    "response.completed",
    "response.incomplete",
    "response.failed",
    "error",
    "ping",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        proptest::sample::select(KINDS).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

/// JSON of any shape, biased towards the keys and values the extractors read.
fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        proptest::sample::select(KEYS).prop_map(str::to_owned),
                        ".{0,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|fields| Value::Object(Map::from_iter(fields))),
        ]
    })
}

/// A body: arbitrary bytes, or JSON of any shape.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        json_value().prop_map(|v| v.to_string().into_bytes()),
    ]
}

/// An SSE stream: events whose data is JSON of any shape or noise, optionally named.
fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    let event = (
        proptest::option::of(proptest::sample::select(KINDS)),
        prop_oneof![
            json_value().prop_map(|v| v.to_string()),
            Just("[DONE]".to_owned())
        ],
    )
        .prop_map(|(name, data)| match name {
            Some(name) => format!("event: {name}\ndata: {data}\n\n").into_bytes(),
            None => format!("data: {data}\n\n").into_bytes(),
        });
    prop_oneof![
        proptest::collection::vec(event, 0..8).prop_map(|events| events.concat()),
        sse_like_bytes(),
    ]
}

fn cut(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for c in cuts {
        chunks.push(input[start..c].to_vec());
        start = c;
    }
    chunks.push(input[start..].to_vec());
    chunks
}

/// Feeds `input` to a fresh handler in the given chunking and reads everything it reports.
fn stream_summary<H: StreamUsage + Default>(input: &[u8], cuts: &[usize]) -> String {
    let mut parser = SseParser::default();
    let mut handler = H::default();
    for chunk in cut(input, cuts) {
        parser.feed(&chunk, &mut handler);
    }
    format!(
        "{:?} {} {:?}",
        handler.usage(),
        handler.completed(),
        handler.error()
    )
}

fn hide(input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut hider = UsageChunkHider::default();
    let mut out = Vec::new();
    for chunk in cut(input, cuts) {
        out.extend(hider.push(&chunk));
    }
    out.extend(hider.finish());
    out
}

proptest! {
    #[test]
    fn json_extractors_never_panic(body in body()) {
        let _ = anthropic::usage_from_json(&body);
        let _ = openai::chat_usage_from_json(&body);
        let _ = openai::responses_usage_from_json(&body);
    }

    #[test]
    fn stream_handlers_never_panic_and_ignore_chunking(
        input in sse_stream(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        prop_assert_eq!(
            stream_summary::<MessagesStream>(&input, &cuts),
            stream_summary::<MessagesStream>(&input, &[])
        );
        prop_assert_eq!(
            stream_summary::<ChatStream>(&input, &cuts),
            stream_summary::<ChatStream>(&input, &[])
        );
        prop_assert_eq!(
            stream_summary::<ResponsesStream>(&input, &cuts),
            stream_summary::<ResponsesStream>(&input, &[])
        );
    }

    #[test]
    fn the_usage_hider_ignores_chunking_and_passes_usage_free_streams_unchanged(
        input in sse_stream(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = hide(&input, &[]);
        prop_assert_eq!(hide(&input, &cuts), whole.clone());
        if !input.windows(7).any(|w| w == b"\"usage\"") {
            prop_assert_eq!(whole, input);
        }
    }

    #[test]
    fn injecting_include_usage_never_panics_and_yields_a_request_that_asks_for_usage(body in body()) {
        if let Some(injected) = openai::inject_include_usage(&body) {
            let request: Value = serde_json::from_slice(&injected).unwrap();
            prop_assert_eq!(&request["stream_options"]["include_usage"], &Value::Bool(true));
            prop_assert_eq!(&request["stream"], &Value::Bool(true));
        }
    }
}
