//! The client's view of an upstream SSE stream, metered on the way through.
//!
//! Each upstream chunk is forwarded as soon as it arrives (optionally through a filter that
//! hides events we asked for but the client did not) while a copy feeds the usage parser. The
//! usage event is published exactly once: at the end of the stream, on an upstream error or
//! idle timeout, or — through `Drop` — when the client goes away. Dropping the stream also drops
//! the upstream response, which closes that connection and so cancels the upstream request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use futures_util::stream::Stream;
use hyper::body::{Body, Incoming};
use tokio::time::{Instant, Sleep};

use super::StreamUsage;
use crate::accounts::Lease;
use crate::limiter::LeaseGuard;
use crate::metrics::Metrics;
use crate::sse::SseParser;
use crate::usage::Call;
use std::sync::Arc;

/// Rewrites the byte stream on its way to the client; see `openai::UsageChunkHider`.
pub trait ChunkFilter: Send {
    fn push(&mut self, chunk: &[u8]) -> Vec<u8>;
    fn finish(&mut self) -> Vec<u8>;
}

pub struct Metered {
    /// The first chunk, read before the response head was sent (`relay_answer`).
    first: Option<Bytes>,
    upstream: Incoming,
    parser: SseParser,
    usage: Box<dyn StreamUsage>,
    filter: Option<Box<dyn ChunkFilter>>,
    call: Call,
    status: u16,
    metrics: Arc<Metrics>,
    /// Held so the account's in-flight slot and the key's concurrency slot are freed exactly
    /// when the stream ends.
    _lease: Lease,
    _concurrency: Option<LeaseGuard>,
    idle: Duration,
    /// When the last chunk arrived. The idle timer is not pushed back on every chunk (a timer
    /// update per relayed event); when it fires early it is rearmed from here instead.
    last_chunk: Instant,
    idle_deadline: Pin<Box<Sleep>>,
    finished: bool,
    /// An upstream failure, held back for one poll (see `poll_next`).
    failed: Option<std::io::Error>,
}

pub struct MeteredParts {
    pub first: Bytes,
    pub upstream: Incoming,
    pub usage: Box<dyn StreamUsage>,
    pub filter: Option<Box<dyn ChunkFilter>>,
    pub call: Call,
    pub status: u16,
    pub metrics: Arc<Metrics>,
    pub lease: Lease,
    pub concurrency: Option<LeaseGuard>,
    pub idle: Duration,
}

impl Metered {
    pub fn new(parts: MeteredParts) -> Self {
        parts.metrics.streams_open.inc();
        Self {
            first: Some(parts.first),
            upstream: parts.upstream,
            parser: SseParser::default(),
            usage: parts.usage,
            filter: parts.filter,
            call: parts.call,
            status: parts.status,
            metrics: parts.metrics,
            _lease: parts.lease,
            _concurrency: parts.concurrency,
            idle: parts.idle,
            last_chunk: Instant::now(),
            idle_deadline: Box::pin(tokio::time::sleep(parts.idle)),
            finished: false,
            failed: None,
        }
    }

    fn finish(&mut self, error: Option<&str>) {
        if !self.finished {
            self.finished = true;
            self.metrics.streams_open.dec();
            self.call.publish(self.status, self.usage.usage(), error);
        }
    }
}

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            let next = match this.first.take() {
                Some(first) => Poll::Ready(Some(Ok(first))),
                None => poll_data(Pin::new(&mut this.upstream), cx),
            };
            match next {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.last_chunk = Instant::now();
                    this.parser.feed(&chunk, this.usage.as_mut());
                    let out = match this.filter.as_mut() {
                        Some(filter) => Bytes::from(filter.push(&chunk)),
                        None => chunk,
                    };
                    if out.is_empty() {
                        continue;
                    }
                    this.call.first_byte_sent();
                    return Poll::Ready(Some(Ok(out)));
                }
                Poll::Ready(Some(Err(e))) => {
                    // Bytes already reached the client, so there is no retrying: bill what was
                    // seen and cut the client's stream so it knows the answer is incomplete.
                    tracing::warn!(error = %e, "upstream stream failed");
                    this.finish(Some("upstream_error"));
                    // The error aborts the client's connection, and hyper drops whatever it
                    // has not written yet: the last chunks, or even the head if the failure
                    // came in the same read as the first event. Returning Pending once lets
                    // it flush them first.
                    this.failed = Some(std::io::Error::other(e));
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    let rest = this.filter.as_mut().map(|f| f.finish()).unwrap_or_default();
                    let error = if this.usage.completed() {
                        this.usage.error()
                    } else {
                        Some("stream_incomplete")
                    };
                    this.finish(error);
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Bytes::from(rest))));
                }
                Poll::Pending => {
                    while this.idle_deadline.as_mut().poll(cx).is_ready() {
                        let due = this.last_chunk + this.idle;
                        if Instant::now() < due {
                            // Chunks came since the timer was set: wait the rest of the idle
                            // time from the last one (and poll again, to register the waker).
                            this.idle_deadline.as_mut().reset(due);
                            continue;
                        }
                        tracing::warn!(
                            idle_secs = this.idle.as_secs_f64(),
                            "upstream stream went idle"
                        );
                        this.finish(Some("upstream_timeout"));
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "upstream stream idle timeout",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The body's next chunk of data; trailers (which no provider sends on a stream) are skipped.
pub(crate) fn poll_data(
    mut body: Pin<&mut Incoming>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, hyper::Error>>> {
    loop {
        match std::task::ready!(body.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Poll::Ready(Some(Ok(data)));
                }
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => return Poll::Ready(None),
        }
    }
}

impl Drop for Metered {
    /// Dropped before the end: the client went away. Bill what was observed.
    fn drop(&mut self) {
        self.finish(Some("client_disconnected"));
    }
}
