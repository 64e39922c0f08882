//! The stats HTTP API (docs/stats-api.md) and the operational routes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query as QueryParams, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shared::Partitions;
use shared::RedisConn;
use subtle::ConstantTimeEq;

use crate::metrics::{Gauges, Metrics};
use crate::query::cache::CellReader;
use crate::query::limits::{Gateway, GatewayError};
use crate::query::plan::{Retention, plan};
use crate::query::{Kind, LatencyRow, ParamError, Query, Rows, plan_error, quantile_label};
use crate::store::sketch::Sketch;
use crate::store::stats::{DIMENSIONS, Totals};

#[derive(Clone)]
pub struct ApiState {
    pub conn: RedisConn,
    pub cells: Arc<CellReader>,
    pub partitions: Partitions,
    pub group: String,
    pub metrics: Arc<Metrics>,
    /// SHA-256 of `ADMIN_TOKEN`; `None`: the stats API is open.
    pub admin_token_digest: Option<[u8; 32]>,
    /// The gateway the limits panel asks; `None`: not configured.
    pub gateway: Option<Gateway>,
}

pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/latency", get(latency))
        .route("/v1/status", get(status))
        .route("/v1/limits", get(limits))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(crate::query::dashboard::router())
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error("missing or wrong admin token")]
    Unauthorized,
    #[error("store unavailable: {0}")]
    Store(#[from] redis::RedisError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, param, message) = match &self {
            Self::Param(e) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some(e.param.clone()),
                e.to_string(),
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                None,
                "the stats API needs `Authorization: Bearer <ADMIN_TOKEN>`".to_owned(),
            ),
            Self::Store(e) => {
                tracing::error!(error = %e, "stats query failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    None,
                    "the stats store is unavailable; try again".to_owned(),
                )
            }
            Self::Gateway(e) => {
                tracing::warn!(error = %e, "limits not read from the gateway");
                (StatusCode::BAD_GATEWAY, "api_error", None, e.to_string())
            }
        };
        let body = json!({"error": {"type": kind, "param": param, "message": message}});
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Admission to the stats routes: with `ADMIN_TOKEN` set, a matching bearer token.
struct StatsAccess;

impl FromRequestParts<ApiState> for StatsAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let Some(expected) = &state.admin_token_digest else {
            return Ok(Self);
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or("");
        // Fixed-size digests compared in constant time: neither how much of a guess was right
        // nor the token's length shows in the response time.
        if bool::from(token_digest(presented.trim()).ct_eq(expected)) {
            Ok(Self)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// One query's answer: the JSON document of docs/stats-api.md, serialised straight from the rows
/// (a 30-day hourly answer has thousands of rows; building a `serde_json::Value` first cost
/// more than everything else). The `aggregator usage` command prints the same document.
pub(crate) struct Answer {
    query: Query,
    from_ms: i64,
    to_ms: i64,
    rows: Rows,
    /// Key id → current name, for rows grouped by key.
    key_names: HashMap<String, String>,
}

/// Parses, plans and reads one query.
pub(crate) async fn answer(
    cells: &CellReader,
    params: &HashMap<String, String>,
    kind: Kind,
    now_ms: i64,
) -> Result<Answer, ApiError> {
    let query = Query::parse(params, kind)?;
    let plan = plan(query.request, now_ms, Retention::serving())
        .map_err(|e| plan_error(e, &query.request))?;
    let wanted: Vec<_> = plan
        .buckets
        .iter()
        .flat_map(|b| b.cells.iter().copied())
        .collect();
    let partials = cells.read(&wanted, &query.spec).await?;
    let mut rows = Rows::default();
    let mut partials = partials.iter();
    for bucket in &plan.buckets {
        for partial in partials.by_ref().take(bucket.cells.len() * cells.copies()) {
            rows.add(bucket.start, partial)?;
        }
    }
    if query.unpriced {
        rows.usage.retain(|_, totals| totals.unpriced_requests > 0);
    }
    let key_names = match query
        .spec
        .group_by
        .iter()
        .position(|d| DIMENSIONS[*d] == "key")
    {
        Some(at) => {
            let mut ids: Vec<&str> = rows
                .group_values()
                .filter_map(|values| values.get(at))
                .map(String::as_str)
                .filter(|id| !id.is_empty())
                .collect();
            ids.sort_unstable();
            ids.dedup();
            cells.key_names(&ids).await?
        }
        None => HashMap::new(),
    };
    Ok(Answer {
        query,
        from_ms: plan.from_ms,
        to_ms: plan.to_ms,
        rows,
        key_names,
    })
}

impl Answer {
    /// The label fields a row can have, in the document's order: `bucket_start`, then the
    /// group-by dimensions in the order asked for, `key_name` right after `key`.
    pub(crate) fn label_fields(&self) -> Vec<&'static str> {
        let mut fields = vec!["bucket_start"];
        for index in &self.query.spec.group_by {
            fields.push(DIMENSIONS[*index]);
            if DIMENSIONS[*index] == "key" {
                fields.push("key_name");
            }
        }
        fields
    }

    /// The names of the quantiles in `latency_ms` and `ttft_ms`, in the order asked for.
    pub(crate) fn quantile_labels(&self) -> Vec<String> {
        self.query
            .quantiles
            .iter()
            .map(|q| quantile_label(*q))
            .collect()
    }

    pub(crate) fn kind(&self) -> Kind {
        self.query.spec.kind
    }
}

impl Serialize for Answer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let tz = self.query.request.tz;
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("from", &tz.format(self.from_ms))?;
        map.serialize_entry("to", &tz.format(self.to_ms))?;
        match self.query.spec.kind {
            Kind::Usage => map.serialize_entry("rows", &UsageRows(self))?,
            Kind::Latency => map.serialize_entry("rows", &LatencyRows(self))?,
        }
        map.end()
    }
}

struct UsageRows<'a>(&'a Answer);
struct LatencyRows<'a>(&'a Answer);

impl Serialize for UsageRows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let answer = self.0;
        let mut seq = s.serialize_seq(Some(answer.rows.usage.len()))?;
        let mut label = BucketLabel::default();
        for ((bucket, values), t) in &answer.rows.usage {
            seq.serialize_element(&Row {
                answer,
                bucket: label.of(&answer.query, *bucket),
                values,
                body: RowBody::Usage(t),
            })?;
        }
        seq.end()
    }
}

impl Serialize for LatencyRows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let answer = self.0;
        let mut seq = s.serialize_seq(Some(answer.rows.latency.len()))?;
        let mut label = BucketLabel::default();
        for ((bucket, values), sketches) in &answer.rows.latency {
            seq.serialize_element(&Row {
                answer,
                bucket: label.of(&answer.query, *bucket),
                values,
                body: RowBody::Latency(sketches),
            })?;
        }
        seq.end()
    }
}

/// `bucket_start` of consecutive rows: rows are sorted by bucket, so each is formatted once.
#[derive(Default)]
struct BucketLabel {
    last: Option<(i64, std::rc::Rc<str>)>,
}

impl BucketLabel {
    fn of(&mut self, query: &Query, bucket: Option<i64>) -> Option<std::rc::Rc<str>> {
        let start = bucket?;
        match &self.last {
            Some((at, text)) if *at == start => Some(text.clone()),
            _ => {
                let text: std::rc::Rc<str> = query.request.tz.format(start).into();
                self.last = Some((start, text.clone()));
                Some(text)
            }
        }
    }
}

enum RowBody<'a> {
    Usage(&'a Totals),
    Latency(&'a LatencyRow),
}

/// One row: its bucket and group-by fields, then its figures.
struct Row<'a> {
    answer: &'a Answer,
    bucket: Option<std::rc::Rc<str>>,
    values: &'a [String],
    body: RowBody<'a>,
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        if let Some(start) = &self.bucket {
            map.serialize_entry("bucket_start", &**start)?;
        }
        for (index, value) in self.answer.query.spec.group_by.iter().zip(self.values) {
            let name = DIMENSIONS[*index];
            match name {
                "status" => map.serialize_entry(name, &value.parse::<u16>().ok())?,
                // Unauthenticated or unrelayed requests have no key or account.
                "key" | "account" if value.is_empty() => map.serialize_entry(name, &None::<()>)?,
                _ => map.serialize_entry(name, value)?,
            }
            if name == "key"
                && let Some(key_name) = self.answer.key_names.get(value)
            {
                map.serialize_entry("key_name", key_name)?;
            }
        }
        match self.body {
            RowBody::Usage(t) => {
                for (name, n) in [
                    ("requests", t.requests),
                    ("errors", t.errors),
                    ("input_tokens", t.input_tokens),
                    ("output_tokens", t.output_tokens),
                    ("cache_creation_input_tokens", t.cache_creation_input_tokens),
                    ("cache_read_input_tokens", t.cache_read_input_tokens),
                    ("unpriced_requests", t.unpriced_requests),
                ] {
                    map.serialize_entry(name, &n)?;
                }
                map.serialize_entry("cost_usd", &t.cost.to_string())?;
                map.serialize_entry("cache_savings_usd", &t.cache_savings.to_string())?;
            }
            RowBody::Latency(sketches) => {
                let quantiles = &self.answer.query.quantiles;
                map.serialize_entry("count", &sketches.latency.count())?;
                // Requests that failed before a first token have a latency but no TTFT, so
                // the TTFT quantiles are over fewer (often faster) requests.
                map.serialize_entry("ttft_count", &sketches.ttft.count())?;
                map.serialize_entry("latency_ms", &Quantiles(quantiles, &sketches.latency))?;
                map.serialize_entry("ttft_ms", &Quantiles(quantiles, &sketches.ttft))?;
            }
        }
        map.end()
    }
}

/// `{"p50": ms, ...}`; `null` for an empty sketch.
struct Quantiles<'a>(&'a [f64], &'a Sketch);

impl Serialize for Quantiles<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for q in self.0 {
            let ms = self.1.quantile(*q).map(|us| significant(us / 1000.0));
            map.serialize_entry(&quantile_label(*q), &ms)?;
        }
        map.end()
    }
}

/// `x` to four significant digits: the sketch resolves 0.5 %, so further digits are noise
/// (`1.3597384250992983`), and rounding adds at most 0.05 % to its error.
fn significant(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    // Multiply or divide by an exact power of ten, never by an inexact 0.1.
    let shift = 3 - x.abs().log10().floor() as i32;
    let power = 10f64.powi(shift.abs());
    if shift >= 0 {
        (x * power).round() / power
    } else {
        (x / power).round() * power
    }
}

async fn usage(
    _: StatsAccess,
    State(state): State<ApiState>,
    QueryParams(params): QueryParams<HashMap<String, String>>,
) -> Result<Json<Answer>, ApiError> {
    let now = chrono::Utc::now().timestamp_millis();
    Ok(Json(answer(&state.cells, &params, Kind::Usage, now).await?))
}

async fn latency(
    _: StatsAccess,
    State(state): State<ApiState>,
    QueryParams(params): QueryParams<HashMap<String, String>>,
) -> Result<Json<Answer>, ApiError> {
    let now = chrono::Utc::now().timestamp_millis();
    Ok(Json(
        answer(&state.cells, &params, Kind::Latency, now).await?,
    ))
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let gauges = group_gauges(&state).await.unwrap_or_default();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&gauges),
    )
        .into_response()
}

/// `GET /v1/status`: how far behind the consumers are and how many entries were set aside, the
/// dashboard's corner; totals over the partitions, and each partition's.
async fn status(_: StatsAccess, State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let gauges = group_gauges(&state).await?;
    let mut conn = state.conn.clone();
    let mut partitions = Vec::with_capacity(gauges.len());
    let mut dead_letters = 0;
    for (p, (keyspace, g)) in state.partitions.iter().zip(&gauges).enumerate() {
        let dead: u64 = redis::cmd("XLEN")
            .arg(keyspace.dead_letter_stream())
            .query_async(&mut conn)
            .await?;
        dead_letters += dead;
        partitions.push(json!({
            "partition": p,
            "stream": keyspace.stream(),
            "lag": g.lag,
            "pending": g.pending,
            "dead_letters": dead,
        }));
    }
    let total = Gauges::total(&gauges);
    Ok(Json(json!({
        "lag": total.lag,
        "pending": total.pending,
        "dead_letters": dead_letters,
        "partitions": partitions,
    })))
}

/// `GET /v1/limits`: every key's usage against its limits, from the gateway's admin API, asked
/// with the caller's token. Without `--gateway-url`, `{"configured": false, "keys": []}`.
async fn limits(
    _: StatsAccess,
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let Some(gateway) = &state.gateway else {
        return Ok(Json(json!({"configured": false, "keys": []})));
    };
    let keys = gateway.keys(&headers).await?;
    Ok(Json(json!({"configured": true, "keys": keys})))
}

/// Lag and pending count of our group on each partition, from `XINFO GROUPS`, all partitions
/// at once: each read waits for whatever its master is running, and in turn they added up
/// (a scrape took seconds on a 6-partition cluster under a backlog).
async fn group_gauges(state: &ApiState) -> redis::RedisResult<Vec<Gauges>> {
    let reads = state.partitions.iter().map(|keyspace| {
        let mut conn = state.conn.clone();
        async move {
            let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(keyspace.stream())
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
            Ok(Gauges {
                lag: number("lag"),
                pending: number("pending"),
            })
        }
    });
    futures_util::future::try_join_all(reads).await
}

#[cfg(test)]
mod tests {
    use super::significant;

    #[test]
    fn quantiles_keep_four_significant_digits() {
        assert_eq!(significant(1.3597384250992983), 1.36);
        assert_eq!(significant(0.012345678), 0.01235);
        assert_eq!(significant(12_345.6), 12_350.0);
        assert_eq!(significant(987_654_321.0), 987_700_000.0);
        assert_eq!(significant(0.0), 0.0);
        assert_eq!(
            serde_json::to_string(&significant(20.004999)).unwrap(),
            "20.0"
        );
    }
}
