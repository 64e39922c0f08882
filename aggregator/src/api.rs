//! The stats HTTP API (CONTRACT.md §5) and the operational routes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query as QueryParams, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use redis::aio::ConnectionManager;
use serde_json::{Map, Value, json};
use shared::Keyspace;

use crate::metrics::Metrics;
use crate::query::{
    ParamError, Query, group, group_latency, parse_quantiles, quantile_label, rfc3339,
};
use crate::rollup::Resolution;
use crate::sketch::Sketch;
use crate::stats::{DIMENSIONS, Totals};

#[derive(Clone)]
pub struct ApiState {
    pub conn: ConnectionManager,
    pub keyspace: Keyspace,
    pub group: String,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/latency", get(latency))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error("store unavailable: {0}")]
    Store(#[from] redis::RedisError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Param(e) => (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"type": "invalid_request_error", "param": e.param, "message": e.to_string()}})),
            )
                .into_response(),
            Self::Store(e) => {
                tracing::error!(error = %e, "stats query failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": {"type": "api_error", "param": null, "message": "the stats store is unavailable; try again"}})),
                )
                    .into_response()
            }
        }
    }
}

async fn usage(
    State(state): State<ApiState>,
    QueryParams(params): QueryParams<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let query = Query::parse(&params, chrono::Utc::now().timestamp_millis())?;
    let hours: Vec<i64> = query.hours().collect();
    let mut pipe = redis::pipe();
    for hour in &hours {
        pipe.cmd("HGETALL")
            .arg(state.keyspace.key(&Resolution::Hour.key(*hour)));
    }
    let mut conn = state.conn.clone();
    let hashes: Vec<Vec<(String, i64)>> = if hours.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut conn).await?
    };
    let cells: Vec<(i64, Vec<(String, i64)>)> = hours.into_iter().zip(hashes).collect();
    let rows: Vec<Value> = group(&query, &cells)
        .into_iter()
        .map(|((bucket, values), totals)| row(&query, bucket, &values, &totals))
        .collect();
    Ok(Json(json!({
        "from": rfc3339(query.from_ms),
        "to": rfc3339(query.to_ms),
        "rows": rows,
    })))
}

/// Every hour hash of the query's range, in one pipeline.
async fn read_hours(
    state: &ApiState,
    query: &Query,
) -> Result<Vec<(i64, Vec<(String, i64)>)>, ApiError> {
    let hours: Vec<i64> = query.hours().collect();
    if hours.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for hour in &hours {
        pipe.cmd("HGETALL")
            .arg(state.keyspace.key(&Resolution::Hour.key(*hour)));
    }
    let mut conn = state.conn.clone();
    let hashes: Vec<Vec<(String, i64)>> = pipe.query_async(&mut conn).await?;
    Ok(hours.into_iter().zip(hashes).collect())
}

async fn latency(
    State(state): State<ApiState>,
    QueryParams(params): QueryParams<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let query = Query::parse(&params, chrono::Utc::now().timestamp_millis())?;
    let quantiles = parse_quantiles(&params)?;
    let cells = read_hours(&state, &query).await?;
    let quantiles_ms = |sketch: &Sketch| -> Value {
        let mut out = Map::new();
        for q in &quantiles {
            let ms = sketch.quantile(*q).map(|us| us / 1000.0);
            out.insert(quantile_label(*q), ms.map_or(Value::Null, Value::from));
        }
        Value::Object(out)
    };
    let rows: Vec<Value> = group_latency(&query, &cells)
        .into_iter()
        .map(|((bucket, values), sketches)| {
            let mut row = dimension_fields(&query, bucket, &values);
            row.insert("count".into(), sketches.latency.count().into());
            row.insert("latency_ms".into(), quantiles_ms(&sketches.latency));
            row.insert("ttft_ms".into(), quantiles_ms(&sketches.ttft));
            Value::Object(row)
        })
        .collect();
    Ok(Json(json!({
        "from": rfc3339(query.from_ms),
        "to": rfc3339(query.to_ms),
        "rows": rows,
    })))
}

/// The bucket and group-by fields that identify a row.
fn dimension_fields(query: &Query, bucket: Option<i64>, values: &[String]) -> Map<String, Value> {
    let mut row = Map::new();
    if let Some(start) = bucket {
        row.insert("bucket_start".into(), rfc3339(start).into());
    }
    for (index, value) in query.group_by.iter().zip(values) {
        let name = DIMENSIONS[*index];
        let value = match name {
            "status" => value.parse::<u16>().map_or(Value::Null, Value::from),
            // Unauthenticated or unrelayed requests have no key or account.
            "key" | "account" if value.is_empty() => Value::Null,
            _ => Value::from(value.as_str()),
        };
        row.insert(name.into(), value);
    }
    row
}

fn row(query: &Query, bucket: Option<i64>, values: &[String], t: &Totals) -> Value {
    let mut row = dimension_fields(query, bucket, values);
    for (name, n) in [
        ("requests", t.requests),
        ("errors", t.errors),
        ("input_tokens", t.input_tokens),
        ("output_tokens", t.output_tokens),
        ("cache_creation_input_tokens", t.cache_creation_input_tokens),
        ("cache_read_input_tokens", t.cache_read_input_tokens),
        ("unpriced_requests", t.unpriced_requests),
    ] {
        row.insert(name.into(), n.into());
    }
    row.insert("cost_usd".into(), t.cost.to_string().into());
    Value::Object(row)
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let (lag, pending) = group_gauges(&state).await.unwrap_or((None, None));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(lag, pending),
    )
        .into_response()
}

/// Lag and pending count of our group, from `XINFO GROUPS`.
async fn group_gauges(state: &ApiState) -> redis::RedisResult<(Option<u64>, Option<u64>)> {
    let mut conn = state.conn.clone();
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(state.keyspace.stream())
        .query_async(&mut conn)
        .await?;
    let ours = groups.iter().find(|g| {
        g.get("name")
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .is_some_and(|name| name == state.group)
    });
    let number = |name: &str| {
        ours.and_then(|g| g.get(name))
            .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
    };
    Ok((number("lag"), number("pending")))
}
