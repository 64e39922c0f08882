//! `GET /v1/models`: a short catalogue in the shape of whichever provider the caller speaks to.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::MockState;
use super::error::ApiError;
use super::provider::Provider;

pub(super) async fn list(
    State(state): State<MockState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let provider = Provider::for_request("/v1/models", &headers);
    provider.authorize(&headers, state.config.api_key.as_deref())?;
    Ok(Json(match provider {
        Provider::Anthropic => anthropic(),
        Provider::OpenAi => openai(),
    }))
}

fn anthropic() -> Value {
    let models = [
        (
            "claude-sonnet-4-5-20250929",
            "Claude Sonnet 4.5",
            "2025-09-29T00:00:00Z",
        ),
        (
            "claude-haiku-4-5-20251001",
            "Claude Haiku 4.5",
            "2025-10-15T00:00:00Z",
        ),
        (
            "claude-opus-4-1-20250805",
            "Claude Opus 4.1",
            "2025-08-05T00:00:00Z",
        ),
    ];
    let data: Vec<Value> = models
        .iter()
        .map(|(id, name, created)| {
            json!({ "type": "model", "id": id, "display_name": name, "created_at": created })
        })
        .collect();
    json!({
        "data": data,
        "has_more": false,
        "first_id": models[0].0,
        "last_id": models[models.len() - 1].0,
    })
}

fn openai() -> Value {
    let models = [
        ("gpt-4o-mini", 1_721_172_741, "system"),
        ("gpt-4o", 1_715_367_049, "system"),
        ("gpt-5-codex", 1_757_894_400, "system"),
    ];
    let data: Vec<Value> = models
        .iter()
        .map(|(id, created, owner)| {
            json!({ "id": id, "object": "model", "created": created, "owned_by": owner })
        })
        .collect();
    json!({ "object": "list", "data": data })
}
