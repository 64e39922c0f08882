//! Every way a gateway request can fail, and the one place each becomes an HTTP response.
//!
//! The body takes the shape of the provider the route imitates (docs/gateway-api.md): SDKs parse
//! these errors, so an Anthropic client must see an Anthropic error and an OpenAI client an
//! OpenAI one. Internal detail (Redis errors, upstream transport errors) is logged by the caller,
//! never sent.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::provider::Provider;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("missing API key")]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    #[error("API key expired")]
    ExpiredKey,
    #[error("model {0:?} is not allowed for this key")]
    ModelNotAllowed(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    #[error("no upstream account serves {provider} model {model:?}")]
    NoAccount { provider: Provider, model: String },
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("rate limit exceeded: {limit}")]
    RateLimited {
        /// Names the limit that was hit, e.g. "5 requests per 60 s".
        limit: String,
        /// `None` when waiting cannot help.
        retry_after_secs: Option<u64>,
    },
    /// A cost window or the lifetime budget: money, not request rate.
    #[error("quota exceeded: {limit}")]
    QuotaExceeded {
        limit: String,
        retry_after_secs: Option<u64>,
    },
    #[error("store unavailable: {0}")]
    Store(#[from] redis::RedisError),
    #[error("admin API disabled")]
    AdminDisabled,
    #[error("invalid admin token")]
    AdminUnauthorized,
    #[error("{0} not found")]
    NotFound(&'static str),
}

impl GatewayError {
    /// The short error kind recorded in the usage event (`error` field).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::ExpiredKey => "unauthorized",
            Self::ModelNotAllowed(_) => "forbidden",
            Self::InvalidRequest(_) => "invalid_request",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::BodyTimeout { .. } => "request_timeout",
            Self::NoAccount { .. } => "no_account",
            Self::RateLimited { .. } => "rate_limited",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Store(_) => "store_unavailable",
            Self::AdminDisabled | Self::AdminUnauthorized | Self::NotFound(_) => "admin",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::ExpiredKey | Self::AdminUnauthorized => {
                StatusCode::UNAUTHORIZED
            }
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::RateLimited { .. } | Self::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // RFC 9110's status for a request the server stopped waiting for; both providers'
            // SDKs retry it, as they should a stalled upload.
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::NoAccount { .. } | Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::AdminDisabled | Self::NotFound(_) => StatusCode::NOT_FOUND,
        }
    }

    /// The message clients see: our own wording, never a wrapped library error.
    fn public_message(&self) -> String {
        match self {
            Self::Store(_) => "the gateway's store is unavailable; try again".into(),
            Self::UpstreamUnreachable(_) => "the upstream provider could not be reached".into(),
            Self::AdminDisabled => "the admin API is disabled (set ADMIN_TOKEN)".into(),
            other => other.to_string(),
        }
    }

    /// Anthropic's `error.type`.
    fn anthropic_type(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            // Anthropic uses this type for the 4xx statuses it has no type of its own for.
            StatusCode::BAD_REQUEST | StatusCode::REQUEST_TIMEOUT => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            _ => "api_error",
        }
    }

    /// OpenAI's `error.type` and `error.code`.
    fn openai_type_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::ExpiredKey => {
                ("invalid_request_error", Some("invalid_api_key"))
            }
            Self::AdminUnauthorized => ("invalid_request_error", Some("invalid_admin_token")),
            Self::ModelNotAllowed(_) => ("invalid_request_error", Some("model_not_allowed")),
            Self::InvalidRequest(_) => ("invalid_request_error", None),
            Self::RateLimited { .. } => ("requests", Some("rate_limit_exceeded")),
            Self::QuotaExceeded { .. } => ("insufficient_quota", Some("insufficient_quota")),
            Self::BodyTooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            Self::BodyTimeout { .. } => ("invalid_request_error", Some("request_timeout")),
            Self::NotFound(_) | Self::AdminDisabled => ("invalid_request_error", Some("not_found")),
            Self::UpstreamTimeout => ("server_error", Some("upstream_timeout")),
            Self::NoAccount { .. } | Self::UpstreamUnreachable(_) | Self::Store(_) => {
                ("server_error", None)
            }
        }
    }

    /// The `error` object of an OpenAI error body.
    fn openai_error(&self, message: String) -> serde_json::Value {
        let (kind, code) = self.openai_type_and_code();
        json!({"message": message, "type": kind, "param": null, "code": code})
    }

    /// The error as an `error` event on a Responses WebSocket: the HTTP answer's status, body
    /// and retry headers, in the wrapped shape OpenAI's socket uses (Codex reads `status` and
    /// `headers` as it would an HTTP error's), so a refused `response.create` reads like the
    /// refused `POST` and the socket stays open.
    pub fn socket_event(&self) -> serde_json::Value {
        let mut headers = serde_json::Map::new();
        match self {
            Self::RateLimited {
                retry_after_secs, ..
            }
            | Self::QuotaExceeded {
                retry_after_secs, ..
            } => match retry_after_secs {
                Some(secs) => {
                    headers.insert("retry-after".into(), json!(secs.to_string()));
                }
                None => {
                    headers.insert("x-should-retry".into(), json!("false"));
                }
            },
            Self::MissingKey | Self::InvalidKey | Self::ExpiredKey => {
                headers.insert("x-should-retry".into(), json!("false"));
            }
            _ => {}
        }
        json!({
            "type": "error",
            "status": self.status().as_u16(),
            "error": self.openai_error(self.public_message()),
            "headers": headers,
        })
    }

    /// Renders the error in `provider`'s shape.
    pub fn into_response_for(self, provider: Provider) -> Response {
        let status = self.status();
        let message = self.public_message();
        let retry_after = match &self {
            Self::RateLimited {
                retry_after_secs, ..
            }
            | Self::QuotaExceeded {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        let body = match provider {
            Provider::Anthropic => json!({
                "type": "error",
                "error": {"type": self.anthropic_type(), "message": message},
            }),
            Provider::OpenAi => json!({ "error": self.openai_error(message) }),
        };
        let mut response = (status, Json(body)).into_response();
        match retry_after {
            Some(Some(secs)) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            // Waiting will not help: tell the SDKs not to retry.
            Some(None) => {
                response
                    .headers_mut()
                    .insert("x-should-retry", HeaderValue::from_static("false"));
            }
            None => {}
        }
        if status == StatusCode::UNAUTHORIZED {
            // Retrying a bad credential cannot succeed; the SDKs honour this header.
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// Admin and other non-provider routes answer in the OpenAI shape, the more common of the two.
impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_response_for(Provider::OpenAi)
    }
}
