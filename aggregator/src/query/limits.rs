//! `GET /v1/limits`: where each key stands against its limits, for the dashboard's panel. The
//! gateway holds the limits and counts them, so this asks it (`GET /admin/keys`, whose entries
//! carry `usage`) rather than reading its Redis keys, whose layout is the gateway's own.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How long the dashboard waits for the gateway: a slow gateway leaves the rest of the page
/// alone, and the panel says so instead of hanging.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The gateway's admin API, as the aggregator reaches it.
#[derive(Clone)]
pub struct Gateway {
    http: reqwest::Client,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8080`.
    base: String,
}

/// Why the gateway's answer could not be had; the message is what the page shows.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway not reachable: {0}")]
    Unreachable(String),
    #[error("gateway refused: {0}")]
    Refused(String),
}

#[derive(Deserialize)]
struct KeyList {
    data: Vec<GatewayKey>,
}

#[derive(Deserialize)]
struct GatewayKey {
    id: String,
    name: String,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    usage: Vec<Value>,
}

/// One key of the answer: its limits are the gateway's `usage` entries, passed on unchanged
/// (metric, window_secs, max, used, remaining, resets_in_secs, waiting).
#[derive(Serialize)]
pub struct KeyLimits {
    id: String,
    name: String,
    disabled: bool,
    limits: Vec<Value>,
}

impl Gateway {
    pub fn new(base: &str) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(TIMEOUT).build()?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Every key with its usage, asked with the caller's `Authorization` (the operator gives
    /// the aggregator and the gateway the same admin token), sorted by name.
    pub async fn keys(&self, caller: &HeaderMap) -> Result<Vec<KeyLimits>, GatewayError> {
        let url = format!("{}/admin/keys", self.base);
        let mut request = self.http.get(&url);
        if let Some(auth) = caller.get(header::AUTHORIZATION) {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let response = request.send().await.map_err(|e| {
            GatewayError::Unreachable(if e.is_timeout() {
                format!(
                    "no answer from {} within {} s",
                    self.base,
                    TIMEOUT.as_secs()
                )
            } else if e.is_connect() {
                format!("cannot connect to {}", self.base)
            } else {
                format!("{} failed: {e}", self.base)
            })
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            GatewayError::Unreachable(format!("{} broke off its answer: {e}", self.base))
        })?;
        if !status.is_success() {
            return Err(GatewayError::Refused(refusal(status, &body)));
        }
        let list: KeyList = serde_json::from_slice(&body)
            .map_err(|e| GatewayError::Refused(format!("{url} did not answer a key list: {e}")))?;
        let mut keys: Vec<KeyLimits> = list
            .data
            .into_iter()
            .map(|k| KeyLimits {
                id: k.id,
                name: k.name,
                disabled: k.disabled,
                limits: k.usage,
            })
            .collect();
        keys.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        Ok(keys)
    }
}

/// `401 the admin token was refused` and the like, from the gateway's error body when it has one.
fn refusal(status: StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned));
    let hint = match status {
        StatusCode::UNAUTHORIZED => {
            " (the aggregator passes on its caller's admin token: give both the same ADMIN_TOKEN)"
        }
        _ => "",
    };
    match message {
        Some(m) => format!("{} {m}{hint}", status.as_u16()),
        None => format!("{status}{hint}"),
    }
}
