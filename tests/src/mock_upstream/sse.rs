//! Server-sent event framing and the paced, optionally sabotaged, streaming body.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use serde_json::Value;

use super::scenario::Scenario;

/// One SSE event as a provider sends it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Frame {
    /// `event: NAME` + `data: JSON` (Anthropic, OpenAI Responses).
    Named { event: &'static str, data: Value },
    /// `data: JSON` only (OpenAI Chat Completions).
    Data(Value),
    /// OpenAI Chat's `data: [DONE]` sentinel.
    Done,
    /// Bytes sent as they are, for malformed streams.
    Raw(&'static [u8]),
}

/// What `malformed_sse` mixes in: each is something a broken upstream or proxy might emit, and
/// none is a well-formed event of any provider.
const MALFORMED: &[&[u8]] = &[
    b"data: {not json\n\n",
    b"data: \xff\xfe\xfd invalid utf-8\n\n",
    b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":\"many\"}}\n\n",
    b"a line without a colon\r\n\r\n",
    b"data:\n\n",
    b": just a comment\n\n",
    b"event: \ndata: [1,2,3]\n\n",
];

impl Frame {
    pub(crate) fn named(event: &'static str, data: Value) -> Frame {
        Frame::Named { event, data }
    }

    pub(crate) fn render(&self) -> Bytes {
        let text = match self {
            Frame::Raw(bytes) => return Bytes::from_static(bytes),
            Frame::Named { event, data } => format!("event: {event}\ndata: {data}\n\n"),
            Frame::Data(data) => format!("data: {data}\n\n"),
            Frame::Done => "data: [DONE]\n\n".to_owned(),
        };
        Bytes::from(text)
    }
}

/// How the frames are delivered.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Pacing {
    pub chunk_delay: Duration,
    /// Abort the connection after this many frames instead of finishing the body.
    pub cut_after: Option<usize>,
    /// Insert the [`MALFORMED`] events after the first frame.
    pub malformed: bool,
}

impl From<&Scenario> for Pacing {
    fn from(scenario: &Scenario) -> Pacing {
        Pacing {
            chunk_delay: scenario.chunk_delay(),
            cut_after: scenario.cut_after_events,
            malformed: scenario.malformed_sse,
        }
    }
}

/// Streams `frames` as a `text/event-stream` body. The body ends early (cleanly) once `closed`
/// resolves, so a mock that is shutting down does not wait for slow scripted streams.
pub(crate) fn response(
    frames: Vec<Frame>,
    pacing: Pacing,
    closed: impl Future<Output = ()> + Send + 'static,
) -> Response {
    let mut frames = frames;
    if pacing.malformed {
        let at = frames.len().min(1);
        frames.splice(at..at, MALFORMED.iter().map(|bytes| Frame::Raw(bytes)));
    }
    let delay = pacing.chunk_delay;
    let cut = pacing.cut_after.filter(|&n| n < frames.len());
    let keep = cut.unwrap_or(frames.len());
    let events = stream::iter(frames.into_iter().take(keep).enumerate()).then(
        move |(index, frame)| async move {
            if index > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, io::Error>(frame.render())
        },
    );
    let abort = stream::iter(cut).then(|_| async {
        // Returning Pending once lets hyper flush the frames already written before the error
        // below makes it drop the connection; otherwise they could die in its write buffer.
        tokio::task::yield_now().await;
        Err(io::Error::other(
            "mock upstream: connection cut by scenario",
        ))
    });
    let body = Body::from_stream(events.chain(abort).take_until(closed));
    (
        [
            (CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Frame;

    #[track_caller]
    fn check(frame: Frame, want: &str) {
        assert_eq!(frame.render(), want.as_bytes());
    }

    #[test]
    fn named_events_carry_an_event_line_then_compact_json() {
        check(
            Frame::named("ping", json!({"type": "ping"})),
            "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        );
    }

    #[test]
    fn data_only_events_have_no_event_line() {
        check(Frame::Data(json!({"a": 1})), "data: {\"a\":1}\n\n");
    }

    #[test]
    fn done_is_the_literal_sentinel() {
        check(Frame::Done, "data: [DONE]\n\n");
    }
}
