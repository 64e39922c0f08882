//! The upstream end of a Responses socket: the account's `/v1/responses` as `ws`/`wss`, opened
//! with the account's credential.

use std::time::Duration;

use axum::http::{HeaderMap, Uri};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::accounts::Account;
use crate::error::GatewayError;
use crate::provider::{Endpoint, Provider};

pub(crate) type Upstream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How an upgrade to the upstream ended, short of a socket.
pub(crate) enum Refused {
    /// The upstream answered the upgrade with an HTTP response of its own (e.g. 401, 429): it
    /// goes to the client as it came, as the HTTP relay passes upstream errors on.
    Answered {
        status: axum::http::StatusCode,
        headers: HeaderMap,
        body: Vec<u8>,
    },
    Failed(GatewayError),
}

/// Opens the account's socket; on success also returns the upstream's 101 headers.
pub(crate) async fn connect(
    account: &Account,
    client_headers: &HeaderMap,
    timeout: Duration,
    max_message_bytes: usize,
) -> Result<(Upstream, HeaderMap), Refused> {
    let url = socket_url(account).ok_or_else(|| {
        Refused::Failed(GatewayError::UpstreamUnreachable(format!(
            "account {} has an invalid base_url",
            account.record.id
        )))
    })?;
    let mut request = url.into_client_request().map_err(|e| {
        Refused::Failed(GatewayError::UpstreamUnreachable(format!(
            "cannot build the upgrade request: {e}"
        )))
    })?;
    request
        .headers_mut()
        .extend(upgrade_headers(client_headers, &account.record.api_key));
    let config = WebSocketConfig::default().max_message_size(Some(max_message_bytes.max(64 << 20)));
    // Nagle off, as for the client side: events must flow one by one.
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, None);
    match tokio::time::timeout(timeout, connecting).await {
        Err(_) => Err(Refused::Failed(GatewayError::UpstreamTimeout)),
        Ok(Ok((socket, response))) => Ok((socket, response.headers().clone())),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            let (parts, body) = (*response).into_parts();
            Err(Refused::Answered {
                status: parts.status,
                headers: parts.headers,
                body: body.unwrap_or_default(),
            })
        }
        Ok(Err(e)) => Err(Refused::Failed(GatewayError::UpstreamUnreachable(
            e.to_string(),
        ))),
    }
}

/// The account's Responses URL with its scheme turned into the WebSocket one.
fn socket_url(account: &Account) -> Option<String> {
    as_socket_url(account.url(Endpoint::Responses)?)
}

fn as_socket_url(url: &Uri) -> Option<String> {
    let scheme = match url.scheme_str()? {
        "https" => "wss",
        "http" => "ws",
        _ => return None,
    };
    Some(format!("{scheme}://{}{}", url.authority()?, url.path()))
}

/// The headers of the upstream upgrade: the HTTP relay's rule for a request (the account's
/// credential in place of the client's, the client's headers that shape the request), minus
/// the body's content type, since an upgrade has no body. Its one place, so that the socket
/// follows whatever rule the HTTP relay has.
fn upgrade_headers(client: &HeaderMap, api_key: &str) -> HeaderMap {
    // The HTTP relay's rule, without the body headers it adds: an upgrade has no body, and the
    // WebSocket client sets its own handshake headers (`sec-websocket-*` never pass).
    let mut headers = HeaderMap::with_capacity(client.len() + 1);
    super::super::headers::forward_client_headers(client, &mut headers);
    super::super::headers::account_headers(Provider::OpenAi, api_key, &mut headers);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_upgrade_carries_the_accounts_key_and_never_the_clients() {
        let mut client = HeaderMap::new();
        client.insert(
            "authorization",
            HeaderValue::from_static("Bearer mk-client"),
        );
        client.insert(
            "openai-beta",
            HeaderValue::from_static("responses_websockets=2026-02-06"),
        );
        client.insert("sec-websocket-key", HeaderValue::from_static("abc"));
        let out = upgrade_headers(&client, "sk-account");
        assert_eq!(out["authorization"], "Bearer sk-account");
        assert_eq!(out["openai-beta"], "responses_websockets=2026-02-06");
        assert!(out.get("sec-websocket-key").is_none());
        assert!(out.get(axum::http::header::CONTENT_TYPE).is_none());
    }

    #[test]
    fn http_becomes_ws_and_https_wss() {
        let url = |s: &str| as_socket_url(&s.parse().unwrap());
        assert_eq!(
            url("https://api.openai.com/v1/responses").as_deref(),
            Some("wss://api.openai.com/v1/responses")
        );
        assert_eq!(
            url("http://127.0.0.1:9090/v1/responses").as_deref(),
            Some("ws://127.0.0.1:9090/v1/responses")
        );
        assert_eq!(url("ftp://x/v1/responses"), None);
    }
}
