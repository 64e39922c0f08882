//! The providers' error envelopes. Every error the mock returns goes through [`ApiError`], so
//! each provider's error shape, and the status-to-type mapping, is written exactly once.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::provider::Provider;
use super::scenario::ErrorSpec;

/// An error response in the shape of `provider`.
#[derive(Debug)]
pub(crate) struct ApiError {
    provider: Provider,
    status: StatusCode,
    message: String,
    kind: Option<String>,
    code: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(
        provider: Provider,
        status: StatusCode,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            provider,
            status,
            message: message.into(),
            kind: None,
            code: None,
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(provider: Provider, message: impl Into<String>) -> ApiError {
        ApiError::new(provider, StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(provider: Provider) -> ApiError {
        let message = match provider {
            Provider::Anthropic => "Not Found",
            Provider::OpenAi => "Invalid URL",
        };
        ApiError::new(provider, StatusCode::NOT_FOUND, message)
    }

    pub(crate) fn unauthorized(provider: Provider, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("invalid_api_key".to_owned()),
            ..ApiError::new(provider, StatusCode::UNAUTHORIZED, message)
        }
    }

    pub(crate) fn malformed_json(provider: Provider, error: &serde_json::Error) -> ApiError {
        let message = match provider {
            Provider::Anthropic => format!("invalid request: could not parse JSON body: {error}"),
            Provider::OpenAi => "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)".to_owned(),
        };
        ApiError::bad_request(provider, message)
    }

    pub(crate) fn injected(provider: Provider, spec: &ErrorSpec) -> ApiError {
        // `from_u16` only fails outside 100..=999 and the scenario already checked 400..=599.
        let status = StatusCode::from_u16(spec.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError {
            provider,
            status,
            message: spec
                .message
                .clone()
                .unwrap_or_else(|| default_message(provider, status).to_owned()),
            kind: spec.kind.clone(),
            code: spec.code.clone(),
            retry_after: spec.retry_after,
        }
    }

    pub(super) fn body(&self) -> Value {
        match self.provider {
            Provider::Anthropic => json!({
                "type": "error",
                "error": {
                    "type": self.kind.as_deref().unwrap_or(anthropic_kind(self.status)),
                    "message": self.message,
                },
            }),
            Provider::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": self.kind.as_deref().unwrap_or(openai_kind(self.status)),
                    "param": null,
                    "code": self.code.as_deref().or(openai_code(self.status)),
                },
            }),
        }
    }
}

impl ApiError {
    /// The error as OpenAI's Responses socket sends it: an `error` event wrapping the HTTP
    /// answer's status, body and headers; the socket stays open.
    pub(super) fn socket_event(&self) -> Value {
        let mut headers = serde_json::Map::new();
        if let Some(seconds) = self.retry_after {
            headers.insert("retry-after".to_owned(), json!(seconds.to_string()));
        }
        json!({
            "type": "error",
            "status": self.status.as_u16(),
            "error": self.body()["error"],
            "headers": headers,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

fn anthropic_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

fn openai_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "requests",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

fn openai_code(status: StatusCode) -> Option<&'static str> {
    match status.as_u16() {
        429 => Some("rate_limit_exceeded"),
        _ => None,
    }
}

fn default_message(provider: Provider, status: StatusCode) -> &'static str {
    match (provider, status.as_u16()) {
        (Provider::Anthropic, 429) => {
            "This request would exceed the rate limit for your organization. Please try again later."
        }
        (Provider::Anthropic, 529) => "Overloaded",
        (Provider::Anthropic, 500..=599) => "Internal server error",
        (Provider::OpenAi, 429) => "Rate limit reached for requests. Please try again later.",
        (Provider::OpenAi, 503) => "The engine is currently overloaded, please try again later.",
        (Provider::OpenAi, 500..=599) => {
            "The server had an error while processing your request. Sorry about that!"
        }
        _ => "Invalid request.",
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;

    use super::ApiError;
    use crate::mock_upstream::provider::Provider;

    #[test]
    fn error_envelopes_follow_each_provider() {
        let overloaded = ApiError::new(
            Provider::Anthropic,
            StatusCode::from_u16(529).unwrap(),
            "Overloaded",
        );
        assert_eq!(
            overloaded.body(),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
        let limited = ApiError::new(Provider::OpenAi, StatusCode::TOO_MANY_REQUESTS, "slow down");
        assert_eq!(
            limited.body(),
            json!({"error": {"message": "slow down", "type": "requests", "param": null, "code": "rate_limit_exceeded"}})
        );
    }
}
