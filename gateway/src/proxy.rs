//! The client routes: admit (authenticate, read, check), then hand over to the relay.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::accounts::{Lease, Want};
use crate::auth::presented_secret;
use crate::error::GatewayError;
use crate::limiter::{LeaseGuard, RequestBudget};
use crate::metrics::Metrics;
use crate::provider::{Endpoint, Provider};
use crate::relay::{self, Outbound};
use crate::state::AppState;
use crate::usage::{CLIENT_CLOSED, Call};

pub async fn messages(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Endpoint::Messages, &uri, headers, body).await
}

pub async fn count_tokens(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Endpoint::CountTokens, &uri, headers, body).await
}

pub async fn chat_completions(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Endpoint::ChatCompletions, &uri, headers, body).await
}

pub async fn responses(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Endpoint::Responses, &uri, headers, body).await
}

/// `GET /v1/responses`: the Responses API's WebSocket mode. The key is checked before the
/// upgrade, so a bad one gets the HTTP error (and its event) the `POST` would get; the socket
/// is then relayed to one account for its life, each response on it metered and limited as a
/// request of its own (`relay::socket`).
pub async fn responses_socket(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let mut in_flight = InFlight::enter(&state.metrics, Endpoint::Responses);
    let mut call = Call::start(Endpoint::Responses, state.events.clone());
    call.stream = true;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let secret = presented_secret(&headers).map(str::to_owned);
    let response = match state.keys.authenticate(secret.as_deref(), now_ms).await {
        Err(err) => relay::reject(call, err),
        Ok(key) => {
            call.key = Some(Arc::clone(&key));
            call.method = "GET";
            match (upgrade, secret) {
                (Ok(upgrade), Some(secret)) => {
                    let upgrade = upgrade.max_message_size(state.config.max_body_bytes);
                    relay::socket::open(&state, call, &headers, secret, upgrade).await
                }
                // Authenticated, so there was a secret; a plain GET is no request of the API.
                (Err(_), _) | (_, None) => relay::reject(
                    call,
                    GatewayError::InvalidRequest(
                        "GET /v1/responses is the WebSocket mode: send a WebSocket upgrade, or POST a request".into(),
                    ),
                ),
            }
        }
    };
    in_flight.answered(response.status().as_u16());
    response
}

async fn handle(
    state: AppState,
    endpoint: Endpoint,
    uri: &Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut in_flight = InFlight::enter(&state.metrics, endpoint);
    let mut call = Call::start(endpoint, state.events.clone());
    let response = match admit(&state, &mut call, &headers, body).await {
        Ok(admitted) => {
            let out = Outbound {
                client_headers: &headers,
                query: uri.query(),
                body: admitted.body,
                model: &admitted.model,
                session: admitted.session.as_deref(),
                hide_usage: admitted.hide_usage,
                concurrency: admitted.concurrency,
            };
            let mut response = relay::forward(&state, call, admitted.lease, out).await;
            if let Some(budget) = admitted.budget
                && response.status().is_success()
            {
                rate_limit_headers(endpoint.provider(), budget, response.headers_mut());
            }
            response
        }
        Err(err) => {
            if let GatewayError::Store(e) = &err {
                tracing::error!(error = %e, "store unavailable while admitting a request");
            }
            relay::reject(call, err)
        }
    };
    in_flight.answered(response.status().as_u16());
    response
}

/// Counts a request in flight until its handler returns or is dropped (the client hung up
/// first, which is then counted with the status its event records).
struct InFlight<'a> {
    metrics: &'a Metrics,
    endpoint: Endpoint,
    status: u16,
}

impl<'a> InFlight<'a> {
    fn enter(metrics: &'a Metrics, endpoint: Endpoint) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            endpoint,
            status: CLIENT_CLOSED,
        }
    }

    fn answered(&mut self, status: u16) {
        self.status = status;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics
            .request_done(self.endpoint.as_str(), self.status);
    }
}

/// The parts of a request body the gateway looks at; everything else passes through unread.
#[derive(Deserialize)]
struct RequestMeta {
    model: Option<String>,
    stream: Option<bool>,
    /// Anthropic: Claude Code puts a per-session id here.
    metadata: Option<Metadata>,
    /// OpenAI Responses: the client's own prompt-cache routing key.
    prompt_cache_key: Option<String>,
}

#[derive(Deserialize)]
struct Metadata {
    user_id: Option<String>,
}

struct Admitted {
    lease: Lease,
    concurrency: Option<LeaseGuard>,
    budget: Option<RequestBudget>,
    body: Bytes,
    model: String,
    session: Option<String>,
    hide_usage: bool,
}

async fn admit(
    state: &AppState,
    call: &mut Call,
    headers: &HeaderMap,
    body: Body,
) -> Result<Admitted, GatewayError> {
    let key = state
        .keys
        .authenticate(
            presented_secret(headers),
            chrono::Utc::now().timestamp_millis(),
        )
        .await?;
    call.key = Some(Arc::clone(&key));

    let body = read_body(headers, body, &state.config).await?;
    let meta: RequestMeta = serde_json::from_slice(&body)
        .map_err(|e| GatewayError::InvalidRequest(format!("the body is not valid JSON: {e}")))?;
    let model = meta
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| GatewayError::InvalidRequest("model: field required".into()))?;
    call.requested_model = Some(model.clone());
    call.stream = meta.stream.unwrap_or(false);

    if let Some(allowed) = &key.models
        && !allowed.contains(&model)
    {
        return Err(GatewayError::ModelNotAllowed(model));
    }

    // A conversation stays on one account so the provider's prompt cache keeps hitting.
    let session = headers
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| meta.metadata.and_then(|m| m.user_id))
        .or(meta.prompt_cache_key)
        .filter(|s| !s.is_empty());

    // An OpenAI chat stream reports usage only when asked; ask, and hide the answer.
    let (body, hide_usage) = match endpoint_injects_usage(call.endpoint)
        .then(|| relay::inject_include_usage(&body))
        .flatten()
    {
        Some(injected) => (Bytes::from(injected), true),
        None => (body, false),
    };

    // Limits last: a request refused for a bad body or model must not use up the key's quota.
    // The limiter reads the clock as it checks: the body may have taken long to arrive.
    let admission = state.limiter.admit(&key, &call.id()).await?;
    let now_ms = chrono::Utc::now().timestamp_millis();

    let want = Want {
        provider: call.endpoint.provider(),
        model: Some(&model),
        session: session.as_deref(),
        exclude: None,
    };
    let lease = state.accounts.pick(&want, now_ms)?;
    call.account_id = Some(lease.account.record.id.clone());
    Ok(Admitted {
        lease,
        concurrency: admission.lease,
        budget: admission.budget,
        body,
        model,
        session,
        hide_usage,
    })
}

/// The provider-style headers that tell a client where its request budget stands
/// (docs/gateway-api.md), for the key's most constrained `requests` window.
fn rate_limit_headers(
    provider: Provider,
    budget: RequestBudget,
    headers: &mut axum::http::HeaderMap,
) {
    use axum::http::HeaderValue;
    let reset = chrono::Utc::now()
        + chrono::Duration::milliseconds(i64::try_from(budget.reset_ms).unwrap_or(0));
    let (limit, remaining, reset) = match provider {
        Provider::Anthropic => (
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            (
                "anthropic-ratelimit-requests-reset",
                reset.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
        ),
        Provider::OpenAi => (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            (
                "x-ratelimit-reset-requests",
                format!("{}s", budget.reset_ms.div_ceil(1000)),
            ),
        ),
    };
    headers.insert(limit, HeaderValue::from(budget.limit));
    headers.insert(remaining, HeaderValue::from(budget.remaining));
    if let Ok(value) = HeaderValue::from_str(&reset.1) {
        headers.insert(reset.0, value);
    }
}

fn endpoint_injects_usage(endpoint: Endpoint) -> bool {
    endpoint == Endpoint::ChatCompletions
}

/// Reads the whole body, refusing early on a declared length over the limit, and refusing a
/// body that takes longer than `body_read_timeout` to arrive: without a bound, a stalled
/// client would hold its handler (and everything it has taken) for as long as its connection
/// lives.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    config: &crate::config::Config,
) -> Result<Bytes, GatewayError> {
    let limit = config.max_body_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let timeout = config.body_read_timeout;
    let Ok(read) = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await else {
        return Err(GatewayError::BodyTimeout {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        });
    };
    read.map_err(|e| {
        // `to_bytes` reports an over-limit body and a broken connection through one error type.
        let mut source = std::error::Error::source(&e);
        let mut over_limit = false;
        while let Some(cause) = source {
            over_limit |= cause.is::<http_body_util::LengthLimitError>();
            source = cause.source();
        }
        if over_limit {
            GatewayError::BodyTooLarge { limit }
        } else {
            GatewayError::InvalidRequest(format!("reading the body failed: {e}"))
        }
    })
}

/// `GET /v1/models`: the models the key may use, in the shape of the provider the client
/// speaks (Anthropic clients send `anthropic-version` or `x-api-key`).
pub async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let provider = if headers.contains_key("anthropic-version") || headers.contains_key("x-api-key")
    {
        Provider::Anthropic
    } else {
        Provider::OpenAi
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let key = match state
        .keys
        .authenticate(presented_secret(&headers), now_ms)
        .await
    {
        Ok(key) => key,
        Err(err) => return err.into_response_for(provider),
    };
    let mut names: Vec<String> = match &key.models {
        Some(models) => models.clone(),
        // No allowlist: whatever the configured accounts declare they serve.
        None => state
            .accounts
            .snapshot()
            .iter()
            .filter(|a| a.provider == provider)
            .flat_map(|a| a.record.models.clone().unwrap_or_default())
            .collect(),
    };
    names.sort();
    names.dedup();
    let body = match provider {
        Provider::Anthropic => serde_json::json!({
            "data": names.iter().map(|id| serde_json::json!({"type": "model", "id": id, "display_name": id})).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": names.first(),
            "last_id": names.last(),
        }),
        Provider::OpenAi => serde_json::json!({
            "object": "list",
            "data": names.iter().map(|id| serde_json::json!({"id": id, "object": "model", "owned_by": "meter"})).collect::<Vec<_>>(),
        }),
    };
    Json(body).into_response()
}
