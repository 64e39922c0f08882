//! Relaying one admitted request to its upstream account and metering the answer.
//!
//! Bodies pass through unchanged. A streamed (SSE) answer is forwarded chunk by chunk as it
//! arrives while a copy feeds the endpoint's usage parser; the usage event is published when
//! the stream ends, fails, or the client goes away (the body is dropped), whichever comes first.
//! From the moment `forward` is called it owns the request's event: every path out of it
//! publishes exactly one.

mod anthropic;
mod openai;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::stream::{BoxStream, Stream, StreamExt};

use crate::accounts::Lease;
use crate::error::GatewayError;
use crate::provider::{Endpoint, Provider};
use crate::publisher::Publisher;
use crate::sse::{SseHandler, SseParser};
use crate::state::AppState;
use crate::usage::{Call, Usage};

/// Accumulates usage from a provider's stream events.
pub trait StreamUsage: SseHandler + Send {
    fn usage(&self) -> &Usage;
    /// The provider's terminal event was seen; a stream ending without it was cut short.
    fn completed(&self) -> bool;
    /// The error kind a completed stream still reports (e.g. a Responses stream that ended
    /// with `response.failed`); `None` for a normal end.
    fn error(&self) -> Option<&'static str> {
        None
    }
}

const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

pub async fn forward(
    state: &AppState,
    call: Call,
    lease: Lease,
    client_headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let endpoint = call.endpoint;
    let account = &lease.account.record;
    let url = format!("{}{}", account.base_url, endpoint.upstream_path());
    let request = state
        .http
        .post(url)
        .headers(upstream_headers(
            endpoint.provider(),
            client_headers,
            &account.api_key,
        ))
        .body(body);
    let upstream = match request.send().await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::warn!(error = %e, account = %account.id, "upstream request failed");
            let err = if e.is_timeout() {
                GatewayError::UpstreamTimeout
            } else {
                GatewayError::UpstreamUnreachable(e.to_string())
            };
            return reject(&state.events, &call, err);
        }
    };
    let status = upstream.status();
    let headers = client_response_headers(upstream.headers());
    let is_sse = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));

    if is_sse && status.is_success() {
        let metered = Metered {
            upstream: upstream.bytes_stream().boxed(),
            parser: SseParser::default(),
            usage: stream_usage(endpoint),
            call,
            status: status.as_u16(),
            events: state.events.clone(),
            _lease: lease,
            finished: false,
        };
        return respond(status, headers, Body::from_stream(metered));
    }

    let mut call = call;
    let body = match upstream.bytes().await {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(error = %e, account = %account.id, "reading the upstream body failed");
            return reject(
                &state.events,
                &call,
                GatewayError::UpstreamUnreachable(e.to_string()),
            );
        }
    };
    let usage = if status.is_success() {
        json_usage(endpoint, &body).unwrap_or_default()
    } else {
        Usage::default()
    };
    call.first_byte_sent();
    state
        .events
        .publish(call.finish(status.as_u16(), &usage, upstream_error_kind(status)));
    drop(lease);
    respond(status, headers, Body::from(body))
}

/// Publishes the event for a request that failed before any upstream byte reached the client.
pub fn reject(events: &Publisher, call: &Call, err: GatewayError) -> Response {
    events.publish(call.finish(err.status().as_u16(), &Usage::default(), Some(err.kind())));
    err.into_response_for(call.endpoint.provider())
}

fn respond(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn stream_usage(endpoint: Endpoint) -> Box<dyn StreamUsage> {
    match endpoint {
        Endpoint::Messages | Endpoint::CountTokens => Box::<anthropic::MessagesStream>::default(),
    }
}

fn json_usage(endpoint: Endpoint, body: &[u8]) -> Option<Usage> {
    match endpoint {
        Endpoint::Messages => anthropic::usage_from_json(body),
        // Counting tokens consumes none (CONTRACT.md §3).
        Endpoint::CountTokens => None,
    }
}

fn upstream_error_kind(status: StatusCode) -> Option<&'static str> {
    match status.as_u16() {
        s if s < 400 => None,
        429 => Some("upstream_rate_limited"),
        401 | 403 => Some("upstream_unauthorized"),
        s if s < 500 => Some("upstream_rejected"),
        _ => Some("upstream_error"),
    }
}

/// Headers for the upstream: the account's credential replaces whatever the client sent, and
/// only headers that shape the request (versions, betas, content type) are carried over.
fn upstream_headers(provider: Provider, client: &HeaderMap, api_key: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(accept) = client.get(header::ACCEPT) {
        out.insert(header::ACCEPT, accept.clone());
    }
    let secret = HeaderValue::from_str(api_key).ok();
    match provider {
        Provider::Anthropic => {
            if let Some(mut secret) = secret {
                secret.set_sensitive(true);
                out.insert("x-api-key", secret);
            }
            let version = client
                .get("anthropic-version")
                .cloned()
                .unwrap_or(HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION));
            out.insert("anthropic-version", version);
            for value in client.get_all("anthropic-beta") {
                out.append("anthropic-beta", value.clone());
            }
        }
        Provider::OpenAi => {
            if let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {api_key}")) {
                bearer.set_sensitive(true);
                out.insert(header::AUTHORIZATION, bearer);
            }
            for (name, value) in client {
                if name.as_str().starts_with("openai-beta") {
                    out.append(name.clone(), value.clone());
                }
            }
        }
    }
    out
}

/// Upstream response headers that matter to clients (CONTRACT.md §2); hop-by-hop and
/// length headers are left for our own server to set.
fn client_response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        if passes_to_client(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn passes_to_client(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "content-type" | "request-id" | "x-request-id" | "retry-after" | "cache-control"
    ) || name.starts_with("anthropic-")
        || name.starts_with("openai-")
}

/// The client's view of an upstream SSE stream, metering it on the way through.
struct Metered {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    usage: Box<dyn StreamUsage>,
    call: Call,
    status: u16,
    events: Publisher,
    /// Held so the account's in-flight slot is freed exactly when the stream ends.
    _lease: Lease,
    finished: bool,
}

impl Metered {
    fn finish(&mut self, error: Option<&str>) {
        if !self.finished {
            self.finished = true;
            self.events
                .publish(self.call.finish(self.status, self.usage.usage(), error));
        }
    }
}

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        match ready!(this.upstream.poll_next_unpin(cx)) {
            Some(Ok(chunk)) => {
                this.call.first_byte_sent();
                this.parser.feed(&chunk, this.usage.as_mut());
                Poll::Ready(Some(Ok(chunk)))
            }
            Some(Err(e)) => {
                // Bytes already reached the client, so there is no retrying: bill what was seen
                // and cut the client's stream so it knows the answer is incomplete.
                tracing::warn!(error = %e, "upstream stream failed");
                this.finish(Some("upstream_error"));
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            None => {
                let error = if this.usage.completed() {
                    this.usage.error()
                } else {
                    Some("stream_incomplete")
                };
                this.finish(error);
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for Metered {
    /// Dropped before the end: the client went away. Bill what was observed.
    fn drop(&mut self) {
        self.finish(Some("client_disconnected"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_key_never_reaches_the_upstream() {
        let mut client = HeaderMap::new();
        client.insert("x-api-key", HeaderValue::from_static("mk-client"));
        client.insert(
            "authorization",
            HeaderValue::from_static("Bearer mk-client"),
        );
        client.insert(
            "anthropic-beta",
            HeaderValue::from_static("prompt-caching-2024-07-31"),
        );
        let out = upstream_headers(Provider::Anthropic, &client, "sk-ant-account");
        assert_eq!(out["x-api-key"], "sk-ant-account");
        assert!(out.get("authorization").is_none());
        assert_eq!(out["anthropic-beta"], "prompt-caching-2024-07-31");
        assert_eq!(out["anthropic-version"], DEFAULT_ANTHROPIC_VERSION);

        let out = upstream_headers(Provider::OpenAi, &client, "sk-account");
        assert_eq!(out["authorization"], "Bearer sk-account");
        assert!(out.get("x-api-key").is_none());
    }

    #[test]
    fn only_client_relevant_headers_come_back() {
        let mut upstream = HeaderMap::new();
        for (k, v) in [
            ("request-id", "req_1"),
            ("anthropic-ratelimit-tokens-remaining", "5"),
            ("openai-processing-ms", "12"),
            ("retry-after", "7"),
            ("connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("set-cookie", "a=b"),
        ] {
            upstream.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = client_response_headers(&upstream);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "anthropic-ratelimit-tokens-remaining",
                "openai-processing-ms",
                "request-id",
                "retry-after"
            ]
        );
    }
}
