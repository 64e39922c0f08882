//! Relaying one admitted request to its upstream account and metering the answer.
//!
//! Bodies pass through unchanged, and so do the query string and the client's headers but those
//! `headers` keeps back. A streamed (SSE) answer is forwarded chunk by chunk as it
//! arrives while a copy feeds the endpoint's usage parser; the usage event is published when
//! the stream ends, fails, or the client goes away (the body is dropped), whichever comes first.
//! From the moment `forward` is called it owns the request's event: every path out of it
//! publishes exactly one.

mod anthropic;
mod client;
mod headers;
mod openai;

mod metered;
pub mod socket;

#[cfg(test)]
mod fuzz;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;

use crate::accounts::{Account, Lease, Want};
use crate::error::GatewayError;
use crate::limiter::LeaseGuard;
use crate::provider::Endpoint;
use crate::sse::SseHandler;
use crate::state::AppState;
use crate::usage::{Call, Usage};
use headers::{client_response_headers, upstream_headers};
use metered::{ChunkFilter, Metered, MeteredParts};

pub use client::{ClientError, UpstreamClient};

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

/// What the relay needs to know about an admitted request beyond its [`Call`].
pub struct Outbound<'a> {
    pub client_headers: &'a HeaderMap,
    /// The client's query string, passed on as it came (`?beta=true`).
    pub query: Option<&'a str>,
    /// The body to send upstream: the client's bytes, unchanged unless `hide_usage`.
    pub body: Bytes,
    pub model: &'a str,
    pub session: Option<&'a str>,
    /// We asked an OpenAI chat stream for usage the client did not request: hide it.
    pub hide_usage: bool,
    /// The key's concurrency slot, held until the answer has been sent.
    pub concurrency: Option<LeaseGuard>,
}

/// Sends the request to `lease`'s account and relays the answer. An upstream 429, 529, 5xx or
/// connection failure rests the account and — since no byte has reached the client yet — is
/// retried once on another account that is not resting.
pub async fn forward(
    state: &AppState,
    mut call: Call,
    mut lease: Lease,
    mut out: Outbound<'_>,
) -> Response {
    let endpoint = call.endpoint;
    let provider = endpoint.provider();
    let mut failed_over = false;
    loop {
        let account = Arc::clone(&lease.account);
        let sent_at = std::time::Instant::now();
        let attempt = send(state, endpoint, &account, &out).await;
        let rest = match &attempt {
            Ok(upstream) => {
                state.metrics.upstream_latency(provider, sent_at.elapsed());
                rests_account(upstream.status()).then(|| {
                    retry_after(upstream.headers()).unwrap_or(state.config.default_cooldown)
                })
            }
            Err(_) => Some(state.config.default_cooldown),
        };
        if let Some(rest) = rest {
            let want = Want {
                provider,
                model: Some(out.model),
                session: out.session,
                exclude: Some(&account.record.id),
            };
            let again = (!failed_over).then_some(&want);
            if let Some(next) = rest_and_fail_over(state, &mut call, &account, rest, again).await {
                failed_over = true;
                lease = next;
                continue;
            }
        }
        return match attempt {
            Err(err) => reject(call, err),
            // Not followed (a relay passes answers on, and following would turn the POST into
            // a GET), and not passed on either: it would point the client past the gateway.
            Ok(upstream) if upstream.status().is_redirection() => {
                let location = upstream
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("nowhere");
                tracing::warn!(account = %account.record.id, status = %upstream.status(), location, "upstream answered with a redirect; set the account's base_url to the final address");
                reject(
                    call,
                    GatewayError::UpstreamUnreachable(format!("redirected to {location}")),
                )
            }
            Ok(upstream) => {
                let held = (lease, out.concurrency.take());
                relay_answer(state, call, held, upstream, out.hide_usage).await
            }
        };
    }
}

/// Rests `account` after a failed attempt and, when `another` is given (the request has not
/// failed over yet), takes the account it names if that one is not resting too.
async fn rest_and_fail_over(
    state: &AppState,
    call: &mut Call,
    account: &Account,
    rest: Duration,
    another: Option<&Want<'_>>,
) -> Option<Lease> {
    let now = now_ms();
    state.metrics.cooldown(&account.record.id);
    state.accounts.cool_down(account, rest, now).await;
    let next = state
        .accounts
        .pick(another?, now)
        .ok()
        .filter(|next| next.account.cooling_until(now).is_none())?;
    tracing::info!(from = %account.record.id, to = %next.account.record.id, "failing over to another account");
    call.account_id = Some(next.account.record.id.clone());
    Some(next)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Statuses after which an account should rest and the request may go elsewhere. A redirect
/// is among them: the provider APIs do not redirect, so the account's `base_url` is wrong.
fn rests_account(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status.as_u16() == 529
        || status.is_server_error()
        || status.is_redirection()
}

/// `retry-after` in seconds (HTTP dates are not used by the providers).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: f64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// One upstream attempt, up to the response headers.
async fn send(
    state: &AppState,
    endpoint: Endpoint,
    account: &Account,
    out: &Outbound<'_>,
) -> Result<client::Answer, GatewayError> {
    let invalid = || {
        GatewayError::UpstreamUnreachable(format!(
            "account {} has an invalid base_url",
            account.record.id
        ))
    };
    let url = account.url(endpoint).ok_or_else(invalid)?;
    let url = match out.query {
        // The client's query came through our own server's URI parser, so it is valid in one.
        Some(query) => client::with_query(url, query).ok_or_else(invalid)?,
        None => url.clone(),
    };
    let mut headers = upstream_headers(
        endpoint.provider(),
        out.client_headers,
        &account.record.api_key,
    );
    if let Some(host) = account.host() {
        headers.insert(header::HOST, host.clone());
    }
    let account = &account.record;
    let request = state.http.post(url, headers, out.body.clone());
    match tokio::time::timeout(state.config.upstream_first_byte_timeout, request).await {
        Err(_) => {
            tracing::warn!(account = %account.id, "upstream did not answer in time");
            Err(GatewayError::UpstreamTimeout)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, account = %account.id, "upstream request failed");
            Err(e)
        }
        Ok(Ok(response)) => Ok(response),
    }
}

/// Relays an upstream answer (streamed or whole) and publishes its event.
async fn relay_answer(
    state: &AppState,
    mut call: Call,
    (lease, concurrency): (Lease, Option<LeaseGuard>),
    upstream: client::Answer,
    hide_usage: bool,
) -> Response {
    let endpoint = call.endpoint;
    let (head, mut body) = upstream.into_parts();
    let status = head.status;
    let headers = client_response_headers(&head.headers);
    let is_sse = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));

    if is_sse && status.is_success() {
        // The head goes out with the first event, not before: should the stream die before any
        // byte of it, the client still gets a well-formed error instead of a connection closed
        // without an answer (and the event says so). No byte waits: the first one is the reason
        // to answer at all.
        let next = std::future::poll_fn(|cx| metered::poll_data(Pin::new(&mut body), cx));
        let first = match tokio::time::timeout(state.config.upstream_idle_timeout, next).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, account = %lease.account.record.id, "upstream stream failed before its first event");
                return reject(call, GatewayError::UpstreamUnreachable(e.to_string()));
            }
            Ok(None) => {
                tracing::warn!(account = %lease.account.record.id, "upstream stream ended before its first event");
                return reject(
                    call,
                    GatewayError::UpstreamUnreachable("empty event stream".into()),
                );
            }
            Err(_) => return reject(call, GatewayError::UpstreamTimeout),
        };
        let metered = Metered::new(MeteredParts {
            first,
            upstream: body,
            usage: stream_usage(endpoint),
            filter: hide_usage.then(chunk_filter),
            call,
            status: status.as_u16(),
            metrics: Arc::clone(&state.metrics),
            lease,
            concurrency,
            idle: state.config.upstream_idle_timeout,
        });
        return respond(status, headers, Body::from_stream(metered));
    }

    let body = match tokio::time::timeout(state.config.upstream_idle_timeout, body.collect()).await
    {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, account = %lease.account.record.id, "reading the upstream body failed");
            return reject(call, GatewayError::UpstreamUnreachable(e.to_string()));
        }
        Err(_) => return reject(call, GatewayError::UpstreamTimeout),
    };
    let usage = if status.is_success() {
        json_usage(endpoint, &body).unwrap_or_default()
    } else {
        Usage::default()
    };
    call.first_byte_sent();
    call.publish(status.as_u16(), &usage, upstream_error_kind(status));
    drop((lease, concurrency));
    respond(status, headers, Body::from(body))
}

/// Publishes the event for a request that failed before any upstream byte reached the client.
pub fn reject(mut call: Call, err: GatewayError) -> Response {
    call.publish(err.status().as_u16(), &Usage::default(), Some(err.kind()));
    err.into_response_for(call.endpoint.provider())
}

fn respond(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

pub use openai::inject_include_usage;

fn stream_usage(endpoint: Endpoint) -> Box<dyn StreamUsage> {
    match endpoint {
        Endpoint::Messages | Endpoint::CountTokens => Box::<anthropic::MessagesStream>::default(),
        Endpoint::ChatCompletions => Box::<openai::ChatStream>::default(),
        Endpoint::Responses => Box::<openai::ResponsesStream>::default(),
    }
}

fn json_usage(endpoint: Endpoint, body: &[u8]) -> Option<Usage> {
    match endpoint {
        Endpoint::Messages => anthropic::usage_from_json(body),
        // Counting tokens consumes none (docs/events.md).
        Endpoint::CountTokens => None,
        Endpoint::ChatCompletions => openai::chat_usage_from_json(body),
        Endpoint::Responses => openai::responses_usage_from_json(body),
    }
}

fn chunk_filter() -> Box<dyn ChunkFilter> {
    Box::<openai::UsageChunkHider>::default()
}

impl ChunkFilter for openai::UsageChunkHider {
    fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        openai::UsageChunkHider::push(self, chunk)
    }
    fn finish(&mut self) -> Vec<u8> {
        openai::UsageChunkHider::finish(self)
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
