//! Which headers cross the gateway, in each direction (docs/gateway-api.md, "Headers and the
//! query string").
//!
//! Towards the upstream the relay is transparent: SDKs and CLIs switch features with headers
//! the gateway cannot know in advance (`x-stainless-*`, `originator`, betas), so every client
//! header passes except those that belong to the client's own connection, the client's
//! credentials and cookies, and the ones the gateway sets itself. The map is walked once; the
//! rule is a `match` on the name, so forwarding costs a copy per header and nothing more.

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::provider::Provider;

/// What Anthropic requires; sent when the client names no version itself.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Headers for an upstream HTTP request: the client's (as [`forward_client_headers`] filters
/// them), then the gateway's own: a JSON content type (the body was parsed as JSON),
/// `accept-encoding: identity` (the relay reads answers to meter them, so they must come
/// uncompressed; none is compressed for the client either) and the account's (see
/// [`account_headers`]).
pub(crate) fn upstream_headers(provider: Provider, client: &HeaderMap, api_key: &str) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + 4);
    forward_client_headers(client, &mut out);
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    account_headers(provider, api_key, &mut out);
    out
}

/// Appends to `out` every client header that may reach the upstream, in one pass.
pub(crate) fn forward_client_headers(client: &HeaderMap, out: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1). Clients rarely send
    // one (HTTP/2 forbids it), so the common case costs this one lookup.
    let has_connection = client.contains_key(header::CONNECTION);
    for (name, value) in client {
        if passes_to_upstream(name) && !(has_connection && named_by_connection(client, name)) {
            out.append(name.clone(), value.clone());
        }
    }
}

/// The account's credential, in its provider's header, and Anthropic's required version when
/// the client sent none (a client's own `anthropic-version` has passed already).
pub(crate) fn account_headers(provider: Provider, api_key: &str, out: &mut HeaderMap) {
    match provider {
        Provider::Anthropic => {
            if let Ok(mut secret) = HeaderValue::from_str(api_key) {
                secret.set_sensitive(true);
                out.insert("x-api-key", secret);
            }
            if !out.contains_key("anthropic-version") {
                out.insert(
                    "anthropic-version",
                    HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
                );
            }
        }
        Provider::OpenAi => {
            if let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {api_key}")) {
                bearer.set_sensitive(true);
                out.insert(header::AUTHORIZATION, bearer);
            }
        }
    }
}

/// The rule, by name (names are lowercase in a `HeaderMap`).
fn passes_to_upstream(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        // Hop-by-hop (RFC 9110 §7.6.1), and what the client's own connection determines: the
        // upstream connection has its own host, length and framing, and the body was read
        // already, so an `Expect: 100-continue` has been answered.
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "expect"
            // The client's credentials (the gateway's key, in either header the gateway
            // accepts, or a provider key it does not) and cookies: never the upstream's
            // business; the account's credential replaces them.
            | "authorization"
            | "proxy-authorization"
            | "x-api-key"
            | "api-key"
            | "cookie"
            // Set by the gateway itself.
            | "content-type"
            | "accept-encoding"
    ) && !name.as_str().starts_with("sec-websocket-")
}

fn named_by_connection(client: &HeaderMap, name: &HeaderName) -> bool {
    client
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Upstream response headers that matter to clients (docs/gateway-api.md); hop-by-hop and
/// length headers are left for our own server to set.
pub(crate) fn client_response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        if passes_to_client(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn passes_to_client(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "content-type" | "request-id" | "x-request-id" | "retry-after" | "cache-control"
    ) || name.starts_with("anthropic-")
        || name.starts_with("openai-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn the_clients_key_never_reaches_the_upstream() {
        let client = client(&[
            ("x-api-key", "mk-client"),
            ("authorization", "Bearer mk-client"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
        ]);
        let out = upstream_headers(Provider::Anthropic, &client, "sk-ant-account");
        assert_eq!(out["x-api-key"], "sk-ant-account");
        assert!(out.get("authorization").is_none());
        assert_eq!(out["anthropic-beta"], "prompt-caching-2024-07-31");
        assert_eq!(out["anthropic-version"], DEFAULT_ANTHROPIC_VERSION);

        let out = upstream_headers(Provider::OpenAi, &client, "sk-account");
        assert_eq!(out["authorization"], "Bearer sk-account");
        assert!(out.get("x-api-key").is_none());
    }

    #[test]
    fn everything_else_passes_once_and_in_full() {
        let client = client(&[
            ("user-agent", "codex_cli_rs/0.171"),
            ("originator", "codex_cli_rs"),
            ("x-stainless-lang", "js"),
            ("anthropic-beta", "a"),
            ("anthropic-beta", "b"),
            ("anthropic-version", "2099-01-01"),
            ("content-type", "text/plain"),
            ("accept-encoding", "gzip, br"),
            ("connection", "keep-alive, X-Hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("host", "gateway.example"),
            ("content-length", "12"),
            ("expect", "100-continue"),
            ("cookie", "session=1"),
            ("api-key", "azure"),
            ("proxy-authorization", "Basic eDp5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let out = upstream_headers(Provider::Anthropic, &client, "sk-ant-account");
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept-encoding",
                "anthropic-beta",
                "anthropic-version",
                "content-type",
                "originator",
                "user-agent",
                "x-api-key",
                "x-stainless-lang",
            ]
        );
        let betas: Vec<_> = out.get_all("anthropic-beta").iter().collect();
        assert_eq!(betas, ["a", "b"]);
        assert_eq!(
            out["anthropic-version"], "2099-01-01",
            "the client's version wins"
        );
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out["accept-encoding"], "identity");
    }

    #[test]
    fn only_client_relevant_headers_come_back() {
        let mut upstream = HeaderMap::new();
        for (k, v) in [
            ("request-id", "req_1"),
            ("anthropic-ratelimit-tokens-remaining", "5"),
            ("openai-processing-ms", "12"),
            ("retry-after", "7"),
            ("connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("set-cookie", "a=b"),
        ] {
            upstream.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = client_response_headers(&upstream);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "anthropic-ratelimit-tokens-remaining",
                "openai-processing-ms",
                "request-id",
                "retry-after"
            ]
        );
    }
}
