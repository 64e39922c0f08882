//! The client routes: admit (authenticate, read, check), then hand over to the relay.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use crate::accounts::Lease;
use crate::auth::presented_secret;
use crate::error::GatewayError;
use crate::provider::Endpoint;
use crate::relay;
use crate::state::AppState;
use crate::usage::Call;

pub async fn messages(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    handle(state, Endpoint::Messages, headers, body).await
}

pub async fn count_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Endpoint::CountTokens, headers, body).await
}

async fn handle(state: AppState, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let mut call = Call::start(endpoint);
    match admit(&state, &mut call, &headers, body).await {
        Ok((lease, body)) => relay::forward(&state, call, lease, &headers, body).await,
        Err(err) => {
            if let GatewayError::Store(e) = &err {
                tracing::error!(error = %e, "store unavailable while admitting a request");
            }
            relay::reject(&state.events, &call, err)
        }
    }
}

/// The parts of a request body the gateway looks at; everything else passes through unread.
#[derive(Deserialize)]
struct RequestMeta {
    model: Option<String>,
    stream: Option<bool>,
}

async fn admit(
    state: &AppState,
    call: &mut Call,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Lease, Bytes), GatewayError> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let key = state
        .keys
        .authenticate(presented_secret(headers), now_ms)
        .await?;
    call.key_id = Some(key.id.clone());

    let body = read_body(headers, body, state.config.max_body_bytes).await?;
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
    let lease = state.accounts.pick(call.endpoint.provider(), &model)?;
    call.account_id = Some(lease.account.record.id.clone());
    Ok((lease, body))
}

/// Reads the whole body, refusing early on a declared length over the limit.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
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
