//! What differs between the two provider families outside the message formats: credentials
//! and response headers, plus the admission checks every completion endpoint shares.

use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use chrono::{SecondsFormat, TimeDelta, Utc};
use serde_json::Value;

use super::MockState;
use super::error::ApiError;
use super::ids;
use super::scenario::Scenario;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Provider {
    Anthropic,
    OpenAi,
}

impl Provider {
    /// Routes that exist for both providers (`/v1/models`, unknown paths) answer in the style
    /// of whichever client is asking, recognised by Anthropic's own headers.
    pub(crate) fn for_request(path: &str, headers: &HeaderMap) -> Provider {
        if path.starts_with("/v1/messages") {
            Provider::Anthropic
        } else if path.starts_with("/v1/chat/") || path.starts_with("/v1/responses") {
            Provider::OpenAi
        } else if headers.contains_key("anthropic-version") || headers.contains_key("x-api-key") {
            Provider::Anthropic
        } else {
            Provider::OpenAi
        }
    }

    pub(crate) fn authorize(
        self,
        headers: &HeaderMap,
        expected: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(expected) = expected else {
            return Ok(());
        };
        match self {
            Provider::Anthropic => match header(headers, "x-api-key") {
                Some(key) if key == expected => Ok(()),
                Some(_) => Err(ApiError::unauthorized(self, "invalid x-api-key")),
                None => Err(ApiError::unauthorized(self, "x-api-key header is required")),
            },
            Provider::OpenAi => {
                match header(headers, "authorization").and_then(|v| v.strip_prefix("Bearer ")) {
                    Some(key) if key == expected => Ok(()),
                    Some(key) => Err(ApiError::unauthorized(
                        self,
                        format!(
                            "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                            mask(key)
                        ),
                    )),
                    None => Err(ApiError::unauthorized(
                        self,
                        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    )),
                }
            }
        }
    }

    /// Request-id, rate-limit and timing headers the real APIs put on every response.
    fn headers(self, processing_ms: u128) -> Vec<(String, String)> {
        let pair = |name: &str, value: &str| (name.to_owned(), value.to_owned());
        match self {
            Provider::Anthropic => {
                let reset =
                    (Utc::now() + TimeDelta::seconds(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
                let mut headers = vec![
                    pair("request-id", &ids::anthropic_request()),
                    pair("anthropic-organization-id", ANTHROPIC_ORGANIZATION),
                ];
                for (kind, limit, remaining) in ANTHROPIC_RATE_LIMITS {
                    let name = |suffix: &str| format!("anthropic-ratelimit-{kind}-{suffix}");
                    headers.push((name("limit"), limit.to_owned()));
                    headers.push((name("remaining"), remaining.to_owned()));
                    headers.push((name("reset"), reset.clone()));
                }
                headers
            }
            Provider::OpenAi => {
                let mut headers = vec![
                    pair("x-request-id", &ids::openai_request()),
                    pair("openai-processing-ms", &processing_ms.to_string()),
                ];
                headers.extend(OPENAI_STATIC_HEADERS.iter().map(|(n, v)| pair(n, v)));
                headers
            }
        }
    }
}

const ANTHROPIC_ORGANIZATION: &str = "5d2c7a1e-93b4-4f1e-8c55-0a6f3e9b2d71";

/// `(kind, limit, remaining)`; the mock never runs out, so remaining stays near the limit.
const ANTHROPIC_RATE_LIMITS: [(&str, &str, &str); 4] = [
    ("requests", "4000", "3999"),
    ("input-tokens", "2000000", "2000000"),
    ("output-tokens", "400000", "400000"),
    ("tokens", "2400000", "2400000"),
];

const OPENAI_STATIC_HEADERS: [(&str, &str); 9] = [
    ("openai-version", "2020-10-01"),
    ("openai-organization", "meter-mock"),
    ("openai-project", "proj_meterMock0000000000000"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-tokens", "29999000"),
    ("x-ratelimit-reset-tokens", "2ms"),
];

/// Middleware adding the provider headers to every response. `openai-processing-ms` is the
/// time until the response head is ready, which includes any scripted `latency_ms`.
pub(crate) async fn stamp_headers(request: Request, next: Next) -> Response {
    let provider = Provider::for_request(request.uri().path(), request.headers());
    let started = Instant::now();
    let mut response = next.run(request).await;
    let processing_ms = started.elapsed().as_millis();
    let headers = response.headers_mut();
    for (name, value) in provider.headers(processing_ms) {
        // Every name and value above is plain ASCII, so the conversions cannot fail.
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    response
}

/// A request that passed the common checks, with its body parsed and the scripted delay served.
pub(crate) struct Admitted {
    pub body: Value,
    pub scenario: Scenario,
}

/// The checks every completion endpoint makes before producing output, in the providers'
/// order: credentials, then body, then the scenario's latency, hang and injected error.
pub(crate) async fn admit(
    state: &MockState,
    provider: Provider,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Admitted, ApiError> {
    provider.authorize(headers, state.config.api_key.as_deref())?;
    let body: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::malformed_json(provider, &e))?;
    if !body.is_object() {
        return Err(ApiError::bad_request(
            provider,
            "The request body must be a JSON object.",
        ));
    }
    let scenario = Scenario::from_request(&body)
        .map_err(|e| ApiError::bad_request(provider, format!("invalid \"mock\" field: {e}")))?;
    if !scenario.latency().is_zero() {
        tokio::time::sleep(scenario.latency()).await;
    }
    if scenario.hang {
        // Hyper drops this future when the client hangs up, so only shutdown can end the wait.
        state.closed().await;
        return Err(ApiError::new(
            provider,
            StatusCode::SERVICE_UNAVAILABLE,
            "mock upstream is shutting down",
        ));
    }
    if let Some(spec) = &scenario.error {
        return Err(ApiError::injected(provider, spec));
    }
    Ok(Admitted { body, scenario })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// OpenAI echoes only the ends of a wrong key.
fn mask(key: &str) -> String {
    let head: String = key.chars().take(3).collect();
    let tail: String = key
        .chars()
        .skip(key.chars().count().saturating_sub(4))
        .collect();
    format!("{head}***{tail}")
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;

    use super::Provider;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn anthropic_wants_the_key_in_x_api_key() {
        let anthropic = Provider::Anthropic;
        assert!(
            anthropic
                .authorize(&headers(&[("x-api-key", "k")]), Some("k"))
                .is_ok()
        );
        assert!(
            anthropic
                .authorize(&headers(&[("authorization", "Bearer k")]), Some("k"))
                .is_err()
        );
        assert!(anthropic.authorize(&HeaderMap::new(), None).is_ok());
    }

    #[test]
    fn openai_wants_a_bearer_token() {
        let openai = Provider::OpenAi;
        assert!(
            openai
                .authorize(&headers(&[("authorization", "Bearer k")]), Some("k"))
                .is_ok()
        );
        let wrong = openai.authorize(
            &headers(&[("authorization", "Bearer sk-wrong-key")]),
            Some("k"),
        );
        let body = wrong.unwrap_err().body();
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("sk-***-key")
        );
    }

    #[test]
    fn shared_routes_answer_in_the_callers_dialect() {
        assert_eq!(
            Provider::for_request(
                "/v1/models",
                &headers(&[("anthropic-version", "2023-06-01")])
            ),
            Provider::Anthropic
        );
        assert_eq!(
            Provider::for_request("/v1/models", &HeaderMap::new()),
            Provider::OpenAi
        );
        assert_eq!(
            Provider::for_request("/v1/messages/count_tokens", &HeaderMap::new()),
            Provider::Anthropic
        );
    }
}
