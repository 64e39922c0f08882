//! The HTTP client upstream requests go out through: hyper-util's pooled client over rustls,
//! set up for a relay.
//!
//! reqwest wraps this same client, but a relay needs nothing its layers add (redirects, a URL
//! type, cookies, decompression), and they cost: two URL parses per request even with
//! redirects off (9 % of the gateway's instructions per request), and no say over a
//! connection's buffers. Measured in BENCHMARKS.md ("The upstream client").

use std::time::Duration;

use axum::body::Bytes;
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::error::GatewayError;

/// An upstream answer with its body still to be read.
pub(crate) type Answer = Response<Incoming>;

/// Idle pooled connections close after this (the value the gateway used with reqwest).
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Read buffer of an upstream HTTP/1 connection. An SSE event is a few hundred bytes, and a
/// long stream holds its connection's buffer for minutes; hyper's adaptive default starts at
/// 8 KiB and grows for large bodies. 4 KiB reads a typical JSON answer in one or two reads.
const READ_BUFFER: usize = 4096;

#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for upstream connections: {0}")]
pub struct ClientError(#[from] rustls::Error);

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> Result<Self, ClientError> {
        let mut tcp = HttpConnector::new();
        // https is handled by the TLS layer around it; plain http is for local upstreams.
        tcp.enforce_http(false);
        // Streams flow event by event; Nagle would hold small writes back.
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let connector = HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .http1_read_buf_exact_size(READ_BUFFER)
            .build(connector);
        Ok(Self { inner })
    }

    /// POSTs `body` to `uri`, up to the answer's head. Redirects are not followed: a relay
    /// passes answers on as they come (following would also turn the POST into a GET).
    pub async fn post(
        &self,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, GatewayError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        self.inner.request(request).await.map_err(|e| {
            if timed_out(&e) {
                GatewayError::UpstreamTimeout
            } else {
                GatewayError::UpstreamUnreachable(describe(&e))
            }
        })
    }
}

/// `uri` with the client's query string in place of its own.
pub(crate) fn with_query(uri: &Uri, query: &str) -> Option<Uri> {
    let mut parts = uri.clone().into_parts();
    let path = parts
        .path_and_query
        .as_ref()
        .map_or("/", PathAndQuery::path);
    parts.path_and_query = Some(PathAndQuery::try_from(format!("{path}?{query}")).ok()?);
    Uri::from_parts(parts).ok()
}

/// A connect timeout (the connector's own) counts as a timeout, like the first-byte timeout.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// The error and its causes on one line ("client error (Connect): tcp connect error:
/// Connection refused (os error 111)"): the outer error alone names only the stage.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_replaces_the_one_in_the_uri() {
        let uri: Uri = "https://api.anthropic.com/v1/messages".parse().unwrap();
        assert_eq!(
            with_query(&uri, "beta=true").unwrap().to_string(),
            "https://api.anthropic.com/v1/messages?beta=true"
        );
        let with_own: Uri = "http://127.0.0.1:9/v1/messages?x=1".parse().unwrap();
        assert_eq!(
            with_query(&with_own, "a=b&c").unwrap().to_string(),
            "http://127.0.0.1:9/v1/messages?a=b&c"
        );
        assert!(with_query(&uri, "bad query").is_none());
    }

    #[test]
    fn a_timeout_anywhere_in_the_chain_is_a_timeout() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let timed = Outer(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"));
        assert!(timed_out(&timed));
        assert_eq!(describe(&timed), "outer: connect");
        let refused = Outer(std::io::ErrorKind::ConnectionRefused.into());
        assert!(!timed_out(&refused));
    }

    /// No provider can be reached from a test, and no certificate made here is in the webpki
    /// roots: what can be checked is that an `https` upstream gets a TLS handshake naming the
    /// host and offering HTTP/2, and that refusing it is an unreachable upstream.
    #[tokio::test]
    async fn an_https_upstream_gets_tls_with_its_name_and_http2_offered() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = UpstreamClient::new(Duration::from_secs(5)).unwrap();
        let uri: Uri = format!("https://localhost:{port}/v1/messages")
            .parse()
            .unwrap();
        let sent =
            tokio::spawn(async move { client.post(uri, HeaderMap::new(), Bytes::new()).await });
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut hello = Vec::new();
        // A TLS record: type, version (2 bytes), length (2 bytes), then that many bytes.
        let record_len = |h: &[u8]| 5 + usize::from(u16::from_be_bytes([h[3], h[4]]));
        while hello.len() < 5 || hello.len() < record_len(&hello) {
            let mut chunk = [0; 1024];
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed after {} bytes", hello.len());
            hello.extend_from_slice(&chunk[..n]);
            assert_eq!(
                hello[0],
                0x16,
                "a handshake record, not {:?}",
                String::from_utf8_lossy(&hello)
            );
        }
        let has = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"localhost"), "server name indication");
        assert!(
            has(b"\x02h2") && has(b"\x08http/1.1"),
            "ALPN offers h2 and http/1.1"
        );
        drop(socket);
        assert!(matches!(
            sent.await.unwrap(),
            Err(GatewayError::UpstreamUnreachable(_))
        ));
    }
}
