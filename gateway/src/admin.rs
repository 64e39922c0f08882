//! The admin API (docs/admin-api.md): upstream accounts and client keys, behind `ADMIN_TOKEN`.
//!
//! Request and response bodies are the DTOs below; the stored records are `store`'s. Secrets
//! (client keys, account credentials) are accepted here but never returned, except a new key's
//! secret, once, in the response that creates it.

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::auth::{self, SECRET_PREFIX};
use crate::error::GatewayError;
use crate::limiter::LimitUsage;
use crate::provider::Provider;
use crate::state::AppState;
use crate::store::{AccountRecord, KeyRecord, Limit};

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/accounts", get(list_accounts).post(create_account))
        .route(
            "/admin/accounts/{id}",
            get(get_account).patch(patch_account).delete(delete_account),
        )
        .route("/admin/keys", get(list_keys).post(create_key))
        .route(
            "/admin/keys/{id}",
            get(get_key).patch(patch_key).delete(delete_key),
        )
        .layer(axum::middleware::from_fn_with_state(state, require_admin))
}

/// Checks the bearer token in constant time, so response timing reveals nothing about how much
/// of a guessed token was right.
async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.config.admin_token.as_deref() else {
        return GatewayError::AdminDisabled.into_response();
    };
    if !token_matches(request.headers(), expected) {
        return GatewayError::AdminUnauthorized.into_response();
    }
    next.run(request).await
}

fn token_matches(headers: &HeaderMap, expected: &str) -> bool {
    let presented = auth::presented_secret(headers).unwrap_or("");
    // Compare fixed-size digests so that the length of the token does not leak either.
    let a = auth::hash_secret(presented);
    let b = auth::hash_secret(expected);
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, GatewayError> {
    serde_json::from_slice(body).map_err(|e| GatewayError::InvalidRequest(e.to_string()))
}

fn invalid(message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest(message.into())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

// ---- accounts ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    name: String,
    provider: String,
    base_url: String,
    api_key: String,
    priority: Option<i64>,
    max_concurrency: Option<u32>,
    models: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountPatch {
    name: Option<String>,
    base_url: Option<String>,
    api_key: Option<String>,
    priority: Option<i64>,
    max_concurrency: Option<u32>,
    models: Option<Vec<String>>,
}

#[derive(Serialize)]
struct AccountView {
    id: String,
    name: String,
    provider: String,
    base_url: String,
    priority: i64,
    max_concurrency: Option<u32>,
    models: Option<Vec<String>>,
    created_at: Option<String>,
    cooling_down_until: Option<String>,
}

impl AccountView {
    fn with_cooldown(r: &AccountRecord, cooling_until_ms: Option<i64>) -> Self {
        let mut view = Self::from(r);
        view.cooling_down_until = cooling_until_ms
            .filter(|until| *until > now_ms())
            .and_then(rfc3339);
        view
    }
}

impl From<&AccountRecord> for AccountView {
    fn from(r: &AccountRecord) -> Self {
        Self {
            id: r.id.clone(),
            name: r.name.clone(),
            provider: r.provider.clone(),
            base_url: r.base_url.clone(),
            priority: r.priority,
            max_concurrency: r.max_concurrency,
            models: r.models.clone(),
            created_at: rfc3339(r.created_at_ms),
            cooling_down_until: None,
        }
    }
}

/// `https://api.anthropic.com/v1/` → `https://api.anthropic.com`: routes append `/v1/...`.
fn normalize_base_url(raw: &str) -> Result<String, GatewayError> {
    let url = url::Url::parse(raw.trim()).map_err(|e| invalid(format!("base_url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid("base_url: must be an http(s) URL"));
    }
    let mut s = url.as_str().trim_end_matches('/').to_owned();
    if let Some(stripped) = s.strip_suffix("/v1") {
        s = stripped.to_owned();
    }
    Ok(s)
}

fn check_models(models: &Option<Vec<String>>) -> Result<(), GatewayError> {
    if models
        .as_ref()
        .is_some_and(|m| m.iter().any(String::is_empty))
    {
        return Err(invalid("models: names must not be empty"));
    }
    Ok(())
}

async fn create_account(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, GatewayError> {
    let new: NewAccount = parse(&body)?;
    if new.name.trim().is_empty() {
        return Err(invalid("name: must not be empty"));
    }
    if Provider::parse(&new.provider).is_none() {
        return Err(invalid("provider: must be \"anthropic\" or \"openai\""));
    }
    if new.api_key.is_empty() {
        return Err(invalid("api_key: must not be empty"));
    }
    check_models(&new.models)?;
    let record = AccountRecord {
        id: new_id("acct"),
        name: new.name,
        provider: new.provider,
        base_url: normalize_base_url(&new.base_url)?,
        api_key: new.api_key,
        priority: new.priority.unwrap_or(0),
        max_concurrency: new.max_concurrency,
        models: new.models,
        created_at_ms: now_ms(),
    };
    state.store.put_account(&record).await?;
    state.accounts.refresh().await?;
    Ok((StatusCode::CREATED, Json(AccountView::from(&record))).into_response())
}

async fn list_accounts(State(state): State<AppState>) -> Result<Response, GatewayError> {
    let accounts = state.store.accounts().await?;
    let ids: Vec<&str> = accounts.iter().map(|a| a.id.as_str()).collect();
    let cooldowns = state.store.cooldowns(&ids).await?;
    let views: Vec<AccountView> = accounts
        .iter()
        .zip(cooldowns)
        .map(|(a, until)| AccountView::with_cooldown(a, until))
        .collect();
    Ok(Json(serde_json::json!({ "data": views })).into_response())
}

async fn get_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let record = state
        .store
        .account(&id)
        .await?
        .ok_or(GatewayError::NotFound("account"))?;
    let until = state
        .store
        .cooldowns(&[record.id.as_str()])
        .await?
        .pop()
        .flatten();
    Ok(Json(AccountView::with_cooldown(&record, until)).into_response())
}

async fn patch_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, GatewayError> {
    let patch: AccountPatch = parse(&body)?;
    let mut record = state
        .store
        .account(&id)
        .await?
        .ok_or(GatewayError::NotFound("account"))?;
    if let Some(name) = patch.name {
        record.name = name;
    }
    if let Some(base_url) = patch.base_url {
        record.base_url = normalize_base_url(&base_url)?;
    }
    if let Some(api_key) = patch.api_key {
        record.api_key = api_key;
    }
    if let Some(priority) = patch.priority {
        record.priority = priority;
    }
    if patch.max_concurrency.is_some() {
        record.max_concurrency = patch.max_concurrency;
    }
    if patch.models.is_some() {
        check_models(&patch.models)?;
        record.models = patch.models;
    }
    state.store.put_account(&record).await?;
    state.accounts.refresh().await?;
    Ok(Json(AccountView::from(&record)).into_response())
}

async fn delete_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    if !state.store.delete_account(&id).await? {
        return Err(GatewayError::NotFound("account"));
    }
    state.accounts.refresh().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- keys ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    limits: Vec<LimitDto>,
    budget_usd: Option<f64>,
    max_concurrency: Option<u32>,
    concurrency_wait_ms: Option<u64>,
    models: Option<Vec<String>>,
    expires_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPatch {
    name: Option<String>,
    limits: Option<Vec<LimitDto>>,
    budget_usd: Option<f64>,
    max_concurrency: Option<u32>,
    concurrency_wait_ms: Option<u64>,
    models: Option<Vec<String>>,
    expires_at: Option<String>,
    disabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitDto {
    metric: String,
    max: f64,
    window_secs: u64,
}

/// A limit as the API shows it: `max` a count (`5`) or USD (`5.0`), as in the usage list.
#[derive(Serialize)]
struct LimitView {
    metric: String,
    max: Figure,
    window_secs: u64,
}

fn check_limits(limits: Vec<LimitDto>) -> Result<Vec<Limit>, GatewayError> {
    limits
        .into_iter()
        .map(|l| {
            if !matches!(l.metric.as_str(), "requests" | "tokens" | "cost_usd") {
                return Err(invalid(format!(
                    "limits.metric: {:?} is not one of requests, tokens, cost_usd",
                    l.metric
                )));
            }
            if !(l.max.is_finite() && l.max >= 0.0)
                || (l.metric != "cost_usd" && l.max.fract() != 0.0)
            {
                return Err(invalid(format!(
                    "limits.max: {} is not a valid {} limit",
                    l.max, l.metric
                )));
            }
            if l.window_secs == 0 {
                return Err(invalid("limits.window_secs: must be at least 1"));
            }
            Ok(Limit {
                metric: l.metric,
                max: l.max,
                window_secs: l.window_secs,
            })
        })
        .collect()
}

fn check_budget(budget: Option<f64>) -> Result<Option<f64>, GatewayError> {
    match budget {
        Some(b) if !(b.is_finite() && b >= 0.0) => {
            Err(invalid("budget_usd: must be a non-negative number"))
        }
        other => Ok(other),
    }
}

fn parse_expiry(raw: Option<&str>) -> Result<Option<i64>, GatewayError> {
    raw.map(|s| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|e| invalid(format!("expires_at: {e}")))
    })
    .transpose()
}

#[derive(Serialize)]
struct KeyView {
    id: String,
    name: String,
    /// The first characters of the secret, to recognise it.
    prefix: String,
    limits: Vec<LimitView>,
    budget_usd: Option<f64>,
    max_concurrency: Option<u32>,
    concurrency_wait_ms: u64,
    models: Option<Vec<String>>,
    expires_at: Option<String>,
    disabled: bool,
    created_at: Option<String>,
    /// Current usage against each limit; on `GET` only, which reads it from Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Vec<UsageView>>,
}

/// One limit's usage, e.g. `{"metric":"requests","window_secs":60,"max":5,"used":3,
/// "remaining":2,"resets_in_secs":41}`.
#[derive(Serialize)]
struct UsageView {
    metric: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_secs: Option<u64>,
    max: Figure,
    used: Figure,
    remaining: Figure,
    /// Until the oldest usage in the window leaves it; null when none is counted or the
    /// limit has no window.
    resets_in_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiting: Option<u64>,
}

/// A limit's figure as JSON: requests, tokens and slots are counts (`3`), money is USD (`0.0099`).
#[derive(Serialize)]
#[serde(untagged)]
enum Figure {
    Count(u64),
    Usd(f64),
}

impl Figure {
    fn of(metric: &str, value: f64) -> Self {
        if metric.ends_with("_usd") {
            Figure::Usd(value)
        } else {
            // Counts come from integer counters; the float is only the shared container.
            Figure::Count(value.max(0.0).round() as u64)
        }
    }
}

impl From<&LimitUsage> for UsageView {
    fn from(u: &LimitUsage) -> Self {
        let figure = |value| Figure::of(&u.metric, value);
        Self {
            metric: u.metric.clone(),
            window_secs: u.window_secs,
            max: figure(u.max),
            used: figure(u.used),
            remaining: figure(u.remaining()),
            resets_in_secs: u.resets_in_secs,
            waiting: u.waiting,
        }
    }
}

impl KeyView {
    fn with_usage(r: &KeyRecord, usage: &[LimitUsage]) -> Self {
        let mut view = Self::from(r);
        view.usage = Some(usage.iter().map(UsageView::from).collect());
        view
    }
}

impl From<&KeyRecord> for KeyView {
    fn from(r: &KeyRecord) -> Self {
        Self {
            id: r.id.clone(),
            name: r.name.clone(),
            prefix: r.prefix.clone(),
            limits: r
                .limits
                .iter()
                .map(|l| LimitView {
                    metric: l.metric.clone(),
                    max: Figure::of(&l.metric, l.max),
                    window_secs: l.window_secs,
                })
                .collect(),
            budget_usd: r.budget_usd,
            max_concurrency: r.max_concurrency,
            concurrency_wait_ms: r.concurrency_wait_ms,
            models: r.models.clone(),
            expires_at: r.expires_at_ms.and_then(rfc3339),
            disabled: r.disabled,
            created_at: rfc3339(r.created_at_ms),
            usage: None,
        }
    }
}

#[derive(Serialize)]
struct CreatedKey {
    /// The secret, shown this once.
    key: String,
    #[serde(flatten)]
    view: KeyView,
}

async fn create_key(State(state): State<AppState>, body: Bytes) -> Result<Response, GatewayError> {
    let new: NewKey = parse(&body)?;
    if new.name.trim().is_empty() {
        return Err(invalid("name: must not be empty"));
    }
    check_models(&new.models)?;
    let secret = auth::new_secret().map_err(|e| {
        tracing::error!(error = %e, "no randomness for a new key");
        GatewayError::InvalidRequest("could not generate a key; try again".into())
    })?;
    let record = KeyRecord {
        id: new_id("key"),
        name: new.name,
        hash: auth::hash_secret(&secret),
        prefix: secret.chars().take(SECRET_PREFIX.len() + 6).collect(),
        limits: check_limits(new.limits)?,
        budget_usd: check_budget(new.budget_usd)?,
        max_concurrency: new.max_concurrency,
        concurrency_wait_ms: new.concurrency_wait_ms.unwrap_or(0),
        models: new.models,
        expires_at_ms: parse_expiry(new.expires_at.as_deref())?,
        disabled: false,
        deleted: false,
        created_at_ms: now_ms(),
    };
    state.store.put_key(&record).await?;
    let created = CreatedKey {
        key: secret,
        view: KeyView::from(&record),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_keys(State(state): State<AppState>) -> Result<Response, GatewayError> {
    let keys = state.store.keys().await?;
    let usage = state.limiter.usage(&keys, now_ms()).await?;
    let views: Vec<KeyView> = keys
        .iter()
        .zip(&usage)
        .map(|(k, u)| KeyView::with_usage(k, u))
        .collect();
    Ok(Json(serde_json::json!({ "data": views })).into_response())
}

async fn get_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let record = state
        .store
        .key(&id)
        .await?
        .ok_or(GatewayError::NotFound("key"))?;
    let usage = state
        .limiter
        .usage(std::slice::from_ref(&record), now_ms())
        .await?;
    let usage = usage.first().map_or(&[][..], Vec::as_slice);
    Ok(Json(KeyView::with_usage(&record, usage)).into_response())
}

async fn patch_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, GatewayError> {
    let patch: KeyPatch = parse(&body)?;
    let mut record = state
        .store
        .key(&id)
        .await?
        .ok_or(GatewayError::NotFound("key"))?;
    if let Some(name) = patch.name {
        record.name = name;
    }
    if let Some(limits) = patch.limits {
        record.limits = check_limits(limits)?;
    }
    if patch.budget_usd.is_some() {
        record.budget_usd = check_budget(patch.budget_usd)?;
    }
    if patch.max_concurrency.is_some() {
        record.max_concurrency = patch.max_concurrency;
    }
    if let Some(wait) = patch.concurrency_wait_ms {
        record.concurrency_wait_ms = wait;
    }
    if patch.models.is_some() {
        check_models(&patch.models)?;
        record.models = patch.models;
    }
    if patch.expires_at.is_some() {
        record.expires_at_ms = parse_expiry(patch.expires_at.as_deref())?;
    }
    if let Some(disabled) = patch.disabled {
        record.disabled = disabled;
    }
    save_key(&state, &record).await?;
    Ok(Json(KeyView::from(&record)).into_response())
}

/// Disables the key at once and marks it deleted; the record stays, so an id found in stored
/// events still resolves to a record, but the stats API no longer names it.
async fn delete_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let mut record = state
        .store
        .key(&id)
        .await?
        .ok_or(GatewayError::NotFound("key"))?;
    record.disabled = true;
    record.deleted = true;
    save_key(&state, &record).await?;
    Ok(Json(KeyView::from(&record)).into_response())
}

async fn save_key(state: &AppState, record: &KeyRecord) -> Result<(), GatewayError> {
    state.store.put_key(record).await?;
    // This replica applies the change at once; others within their cache TTL.
    state.keys.invalidate(&record.hash);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(raw: &str, want: &str) {
        assert_eq!(normalize_base_url(raw).unwrap(), want);
    }

    #[test]
    fn a_trailing_v1_and_slash_are_tolerated() {
        check("https://api.anthropic.com", "https://api.anthropic.com");
        check("https://api.anthropic.com/", "https://api.anthropic.com");
        check("https://api.anthropic.com/v1", "https://api.anthropic.com");
        check("http://127.0.0.1:9090/v1/", "http://127.0.0.1:9090");
        check(
            "https://proxy.example/openai/v1",
            "https://proxy.example/openai",
        );
        assert!(normalize_base_url("ftp://x").is_err());
        assert!(normalize_base_url("not a url").is_err());
    }

    #[test]
    fn limits_are_validated() {
        let ok = |metric: &str, max: f64| {
            check_limits(vec![LimitDto {
                metric: metric.into(),
                max,
                window_secs: 60,
            }])
            .is_ok()
        };
        assert!(ok("requests", 5.0));
        assert!(ok("cost_usd", 0.25));
        assert!(!ok("requests", 0.5));
        assert!(!ok("bytes", 5.0));
        assert!(!ok("tokens", -1.0));
    }
}
