//! A stand-in for the Anthropic and OpenAI APIs, used by the end-to-end tests and the local
//! demo (`mock-upstream` binary). It speaks the providers' real wire formats:
//!
//! - `POST /v1/messages`, `POST /v1/messages/count_tokens` (Anthropic Messages),
//! - `POST /v1/chat/completions` (OpenAI Chat Completions),
//! - `POST /v1/responses` (OpenAI Responses), and `GET /v1/responses` upgraded to its
//!   WebSocket mode (`response.create` in, the stream's events out, one response at a time),
//! - `GET /v1/models` (in the caller's dialect).
//!
//! Each response is scripted by an optional `"mock"` object in the request body (token counts,
//! text, latency, injected errors, broken streams; see `scenario.rs`), so a test states what
//! the "provider" reports right next to the request it sends through the gateway. Every
//! request is recorded, in arrival order, for assertions on what the gateway forwarded.
//!
//! Layout: `provider` (credentials, headers, admission) and `error` (error envelopes) →
//! `scenario` (the `"mock"` field and default usage) → one module per wire format
//! (`anthropic`, `openai_chat`, `openai_responses`, `models`), streaming through `sse`;
//! `ids` makes provider-shaped identifiers.

mod anthropic;
mod error;
mod ids;
mod models;
mod openai_chat;
mod openai_responses;
mod openai_socket;
mod provider;
mod scenario;
mod sse;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use error::ApiError;
use provider::Provider;

/// Anthropic's documented request size limit; also applied to the OpenAI routes.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A mock upstream serving on `127.0.0.1` in a background task of the current runtime.
pub struct MockUpstream {
    pub addr: SocketAddr,
    log: RequestLog,
    /// Never sent on: dropping it (with the `MockUpstream`) resolves the server's shutdown
    /// future, which is what stops the background task.
    _shutdown: oneshot::Sender<()>,
}

#[derive(Clone, Debug, Default)]
pub struct MockConfig {
    /// When set, Anthropic routes require `x-api-key: KEY` and OpenAI routes
    /// `authorization: Bearer KEY`; otherwise any credential (or none) is accepted.
    pub api_key: Option<String>,
}

/// One request as the mock received it; a message on a Responses socket is logged as method
/// `WS` with no headers (the upgrade that opened the socket is logged as its `GET`).
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    pub method: String,
    pub path: String,
    /// The query string, without the `?`.
    pub query: Option<String>,
    /// Lowercase names, in the order they arrived; repeated headers appear repeatedly.
    pub headers: Vec<(String, String)>,
    /// `Value::Null` when the body is empty or not JSON.
    pub body: Value,
}

impl ReceivedRequest {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Shared, append-only log of received requests; cloning it gives another view of the same log.
#[derive(Clone, Debug, Default)]
pub struct RequestLog {
    entries: Arc<Mutex<Vec<ReceivedRequest>>>,
}

impl RequestLog {
    /// Every request received so far, in arrival order.
    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.lock().clone()
    }

    fn push(&self, request: ReceivedRequest) {
        self.lock().push(request);
    }

    /// The critical sections only push or clone, so a panic cannot leave the vector half
    /// updated and a poisoned lock is safe to keep using.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ReceivedRequest>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MockUpstream {
    pub async fn spawn() -> MockUpstream {
        MockUpstream::spawn_with(MockConfig::default()).await
    }

    pub async fn spawn_with(config: MockConfig) -> MockUpstream {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("mock upstream could not bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has a local address");
        let (router, log, closing) = build(config);
        let (shutdown, dropped) = oneshot::channel::<()>();
        // The task is owned through `_shutdown`: it ends once the `MockUpstream` is dropped
        // and in-flight responses finish (hanging ones are released by `closing`). Drop cannot
        // await it, and the test runtime reaps whatever is left when it shuts down.
        tokio::spawn(async move {
            let shutdown = async {
                // Resolves with an error when the sender is dropped, which is the signal.
                let _ = dropped.await;
            };
            if let Err(error) = serve(listener, router, closing, shutdown).await {
                tracing::warn!(%error, "mock upstream stopped with an error");
            }
        });
        MockUpstream {
            addr,
            log,
            _shutdown: shutdown,
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.log.received()
    }
}

/// The mock as a router, for mounting in another server; the log sees every request it serves.
/// Requests scripted to `hang` are only released when their client disconnects, as this
/// router has no shutdown signal of its own (`run` and `MockUpstream` do).
pub fn router(config: MockConfig) -> (Router, RequestLog) {
    let (router, log, _closing) = build(config);
    (router, log)
}

/// Serves the mock on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    listener: TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (router, _log, closing) = build(config);
    serve(listener, router, closing, shutdown).await
}

/// Handler state: the configuration, plus a shutdown flag for work that would otherwise
/// outlive a graceful shutdown (hanging requests, slow scripted streams).
#[derive(Clone)]
struct MockState {
    config: Arc<MockConfig>,
    /// Socket messages are logged by their handler, not by the HTTP `record` layer.
    log: RequestLog,
    closing: watch::Sender<bool>,
}

impl MockState {
    /// Resolves once the server starts shutting down.
    fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let sender_gone = closing.wait_for(|closing| *closing).await.is_err();
            // Every handler holds the state, and with it a sender, so this cannot happen
            // while a request is in flight; if it somehow did, waiting on is the safe answer.
            if sender_gone {
                std::future::pending::<()>().await;
            }
        }
    }
}

fn build(config: MockConfig) -> (Router, RequestLog, watch::Sender<bool>) {
    let log = RequestLog::default();
    let (closing, _) = watch::channel(false);
    let state = MockState {
        config: Arc::new(config),
        log: log.clone(),
        closing: closing.clone(),
    };
    let router = Router::new()
        .merge(anthropic::routes())
        .merge(openai_chat::routes())
        .merge(openai_responses::routes())
        .route("/v1/models", get(models::list))
        .fallback(not_found)
        .with_state(state)
        .layer(middleware::from_fn(provider::stamp_headers))
        .layer(middleware::from_fn_with_state(log.clone(), record))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    (router, log, closing)
}

async fn serve(
    listener: TcpListener,
    router: Router,
    closing: watch::Sender<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Graceful shutdown waits for every in-flight response, so release the ones that
            // are scripted to wait forever or to trickle out slowly.
            closing.send_replace(true);
        })
        .await
}

/// Logs the request before any handler runs, so even requests that are rejected or never
/// answered show up in `received()`.
async fn record(State(log): State<RequestLog>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect();
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES).await;
    log.push(ReceivedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers,
        body: bytes
            .as_ref()
            .ok()
            .and_then(|bytes| serde_json::from_slice(bytes).ok())
            .unwrap_or(Value::Null),
    });
    tracing::info!(method = %parts.method, path = %parts.uri.path(), "mock upstream request");
    match bytes {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(_) => {
            let provider = Provider::for_request(parts.uri.path(), &parts.headers);
            let message = "request body too large or unreadable";
            ApiError::new(provider, StatusCode::PAYLOAD_TOO_LARGE, message).into_response()
        }
    }
}

async fn not_found(uri: Uri, headers: HeaderMap) -> ApiError {
    ApiError::not_found(Provider::for_request(uri.path(), &headers))
}
