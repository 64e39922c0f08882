//! Gateway: authenticate → admit → relay to an upstream account → emit one usage event.
//!
//! The gateway never prices or aggregates anything; it observes each request and publishes what
//! it saw to the Redis stream, off the request path. Keys and accounts live in Redis so that any
//! number of replicas serve the same configuration.
//!
//! Reading order: [`config`], then `state` and `error` (plumbing), `auth`, `accounts` and
//! `store` (admission), `proxy` → `relay` with `sse` and `usage` (proxying and accounting),
//! `publisher` (the stream), `admin` (the admin API).

pub mod config;
mod error;
mod provider;
mod state;
mod store;

mod accounts;
mod auth;
mod limiter;
mod spend;

mod access_log;
mod log_format;
mod proxy;
mod relay;
mod sse;
mod usage;

mod publisher;
mod spool;

mod metrics;

mod admin;

/// The pure part of the limit decision (script arguments, key names, window tiling, reading
/// the reply), exposed for `benches/limits.rs`, and the spool for `benches/spool.rs`. Not an API.
#[doc(hidden)]
pub mod bench {
    pub use crate::limiter::{Attempt, Check, SCRIPT, SpendCache, Spent, Verdict};
    pub use crate::spool::{Spool, SpoolOptions};
    pub use crate::store::{KeyRecord, Limit};
}

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use shared::RedisConn;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use access_log::log_filter;
pub use config::{Args, Config, ConfigError};
pub use log_format::TextFormat;

use accounts::Accounts;
use auth::KeyCache;
use state::AppState;
use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to Redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error(transparent)]
    EvictingRedis(#[from] shared::redis_policy::EvictingRedis),
    #[error(transparent)]
    Deployment(#[from] shared::deployment::DeploymentError),
    #[error(transparent)]
    Http(#[from] relay::ClientError),
    #[error("cannot open the event spool: {0}")]
    Spool(#[from] spool::SpoolError),
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Serves until `shutdown` resolves, then finishes in-flight requests and streams, flushes the
/// queued usage events and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let mut conn = connect_redis(&config.redis, config.allow_redis_eviction).await?;
    shared::deployment::check_partitions(&mut conn, &config.partitions).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(metrics::Metrics::default());

    let store = Store::new(
        conn.clone(),
        config.partitions.global().clone(),
        Arc::clone(&metrics),
        config.min_replicas,
    );
    let spool = spool::Spool::open_with(
        &config.spool_dir,
        spool::SpoolOptions {
            sync: config.spool_fsync,
            ..spool::SpoolOptions::default()
        },
    )?;
    if !spool.is_empty() {
        tracing::info!(events = spool.len(), dir = %config.spool_dir.display(), "re-publishing spooled usage events");
    }
    let (events, publisher) = publisher::channel(
        conn,
        &config.partitions,
        config.stream_maxlen,
        config.min_replicas,
        spool,
        Arc::clone(&metrics),
    );
    let publisher = tokio::spawn(publisher.run());

    let accounts = Arc::new(Accounts::new(store.clone()));
    if let Err(e) = accounts.refresh().await {
        tracing::warn!(error = %e, "could not load upstream accounts at startup");
    }
    let refresher =
        tokio::spawn(Arc::clone(&accounts).run_refresher(config.cache_ttl, stop_rx.clone()));

    let (limiter, keeper) = limiter::Limiter::new(
        store.connection(),
        config.partitions.clone(),
        config.limits_on_redis_down,
        config.lease_ttl,
        config.spend_cache,
        config.limit_block,
        Arc::clone(&metrics),
    );
    // Not stopped by the shutdown signal: it keeps renewing and releasing the leases of the
    // requests that drain after it, and returns once the router (the limiter's last handle)
    // is dropped.
    let keeper = tokio::spawn(keeper.run());

    let http = relay::UpstreamClient::new(config.upstream_connect_timeout)?;
    let state = AppState::new(state::Shared {
        limiter: Arc::new(limiter),
        metrics: Arc::clone(&metrics),
        keys: Arc::new(KeyCache::new(
            store.clone(),
            config.cache_ttl,
            Arc::clone(&metrics),
        )),
        config: Arc::new(config),
        http,
        store,
        accounts,
        events,
        shutdown: stop_rx,
    });

    let app = router(state);
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    // SSE events go out as separate small writes; with Nagle's algorithm on, each waits for
    // the client's delayed ACK (~40 ms on Linux). Streams must flow event by event.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let served = serve.await;

    // Every request and stream is done, so the router (and with it every `Publisher`, the
    // limiter and every lease) is gone: the publisher drains what is queued, the lease keeper
    // sends the last releases, and both return.
    for (task, name) in [(refresher, "account refresher"), (keeper, "lease keeper")] {
        if let Err(e) = task.await {
            tracing::error!(error = %e, task = name, "background task panicked");
        }
    }
    if let Err(e) = publisher.await {
        tracing::error!(error = %e, "usage publisher panicked");
    }
    served?;
    Ok(())
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/messages", post(proxy::messages))
        .route("/v1/messages/count_tokens", post(proxy::count_tokens))
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route(
            "/v1/responses",
            post(proxy::responses).get(proxy::responses_socket),
        )
        .route("/v1/models", get(proxy::models))
        .merge(admin::router(state.clone()))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .fallback(unknown_route)
        .with_state(state)
}

/// An unknown path gets a 404 in the shape of the provider the client seems to speak, so an SDK
/// pointed at a wrong base URL reports an error it can parse rather than an empty body.
async fn unknown_route(
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let provider = if uri.path().starts_with("/v1/messages")
        || headers.contains_key("anthropic-version")
        || headers.contains_key("x-api-key")
    {
        provider::Provider::Anthropic
    } else {
        provider::Provider::OpenAi
    };
    error::GatewayError::NotFound("route").into_response_for(provider)
}

/// Connects, then refuses a Redis that may evict keys unless that is explicitly allowed.
async fn connect_redis(
    target: &shared::Target,
    allow_eviction: bool,
) -> Result<RedisConn, StartError> {
    // Bounded timeouts: a stalled Redis must surface as an error the publisher retries, never
    // as a request that hangs.
    let timeouts = shared::Timeouts::new(Duration::from_secs(2), Duration::from_secs(2));
    let mut conn = target
        .connect(timeouts)
        .await
        .map_err(|source| StartError::Redis {
            url: target.describe(),
            source,
        })?;
    shared::redis_policy::check(&mut conn, allow_eviction).await?;
    Ok(conn)
}

async fn render_metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let mut conn = state.store.connection();
    match redis::cmd("PING").query_async::<String>(&mut conn).await {
        Ok(_) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "redis unreachable", "error": e.to_string()})),
        ),
    }
}
