//! Aggregator: the pipeline's source of truth. stream → decode → price → apply.
//!
//! It consumes usage events from the Redis stream as a member of a consumer group, prices each
//! one exactly, and commits a batch's effect on the stats together with its acknowledgement in
//! one atomic script, so crashes and redeliveries never change a figure. It also serves the
//! stats API over the same Redis state.
//!
//! Reading order: [`config`], [`pricing`], `stats` (the data model), `commit` (the atomic
//! apply), `consumer` (the loop), `query` and `api` (reading), `limits` (the gateway's limit
//! counts, for the dashboard), `metrics`.

pub mod cli;
pub mod config;
pub mod pricing;

mod ingest;
mod metrics;
mod query;
pub mod replay;
mod store;

pub use store::{cell, sketch};

/// What a stored cell counts; public for tests and tools that read cells directly.
pub use store::stats::Totals;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use shared::RedisConn;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use cli::{Cli, Command};
pub use config::{Args, Config, ConfigError};

use ingest::consumer::{Consumer, ConsumerConfig};
use ingest::retention;
use metrics::Metrics;
use pricing::{Pricing, PricingError};
use query::{api, cache, limits};
use replay::control;

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
    #[error("cannot load pricing: {0}")]
    Pricing(#[from] PricingError),
    #[error(
        "this aggregator's dedupe window is {configured} s, but the deployment's is {deployment} s \
         (recorded in Redis by the first aggregator): two copies of an event would be checked \
         against different seen-sets and counted twice. Start it with --dedupe-window-secs \
         {deployment}, or change the deployment's window: stop every aggregator, then \
         `redis-cli HSET '{ctl_key}' dw {configured}`"
    )]
    DedupeWindow {
        deployment: i64,
        configured: i64,
        ctl_key: String,
    },
    #[error("cannot build the client for the gateway: {0}")]
    GatewayClient(reqwest::Error),
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Consumes and serves until `shutdown` resolves; the batch being committed then finishes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let (pricing, text) = load_pricing(config.pricing_file.as_deref())?;
    tracing::info!(models = pricing.model_count(), "pricing loaded");
    let pricing = Arc::new(pricing);

    let mut api_conn = connect_redis(&config.redis).await?;
    shared::redis_policy::check(&mut api_conn, config.allow_redis_eviction).await?;
    shared::deployment::check_partitions(&mut api_conn, &config.partitions).await?;
    for keyspace in config.partitions.iter() {
        let deployment = control::dedupe_window(&mut api_conn, keyspace, config.dedupe_window_secs)
            .await
            .map_err(|source| StartError::Redis {
                url: config.redis.describe(),
                source,
            })?;
        if deployment != config.dedupe_window_secs {
            return Err(StartError::DedupeWindow {
                deployment,
                configured: config.dedupe_window_secs,
                ctl_key: keyspace.key(control::CTL),
            });
        }
    }
    // An explicit price file is the operator's word for the whole deployment; without one, an
    // aggregator applies what the deployment published (e.g. by a replay), else the bundled
    // snapshot.
    if let Some(text) = &text {
        publish(&mut api_conn, &config.partitions, &pricing, text).await;
    }
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    // One consumer per partition, each on connections of its own: it blocks in XREADGROUP.
    let mut tasks = Vec::new();
    for keyspace in config.partitions.iter() {
        let mut consumer = Consumer::new(
            ConsumerConfig {
                keyspace: keyspace.clone(),
                group: config.group.clone(),
                consumer: config.consumer.clone(),
                batch_size: config.batch_size,
                commit_events: config.commit_events,
                block: Duration::from_millis(500),
                linger: config.linger,
                claim_interval: Duration::from_secs(5),
                claim_idle: config.claim_idle,
                dedupe_window_secs: config.dedupe_window_secs,
            },
            connect_redis(&config.redis).await?,
            // Reads on a connection of their own, so that Redis takes them turn about with
            // the commits rather than after every commit sent before them.
            connect_redis(&config.redis).await?,
            control::Control::new(keyspace.clone(), Arc::clone(&pricing)),
            Arc::clone(&metrics),
        );
        if let Err(e) = consumer.ensure_group().await {
            tracing::warn!(error = %e, stream = keyspace.stream(), "could not create the consumer group yet; will retry");
        }
        tasks.push((tokio::spawn(consumer.run(stop_rx.clone())), "consumer"));
        tasks.push((
            tokio::spawn(retention::run(
                api_conn.clone(),
                keyspace.stream().to_owned(),
                config.stream_retention,
                config.trim_interval,
                stop_rx.clone(),
            )),
            "stream trimmer",
        ));
    }
    tasks.push((
        tokio::spawn(reload_on_hangup(
            config.pricing_file.clone(),
            api_conn.clone(),
            config.partitions.clone(),
            stop_rx.clone(),
        )),
        "pricing reloader",
    ));

    let cells = cache::CellReader::new(
        &config.redis,
        config.partitions.clone(),
        api_conn.clone(),
        config.stats_cache_rows,
        Arc::clone(&metrics),
    )
    .map_err(|source| StartError::Redis {
        url: config.redis.describe(),
        source,
    })?;
    let gateway = config
        .gateway_url
        .as_deref()
        .map(limits::Gateway::new)
        .transpose()
        .map_err(StartError::GatewayClient)?;
    let app = api::router(api::ApiState {
        gateway,
        conn: api_conn,
        cells: Arc::new(cells),
        admin_token_digest: config.admin_token.as_deref().map(api::token_digest),
        partitions: config.partitions.clone(),
        group: config.group.clone(),
        metrics,
    });
    tracing::info!(addr = %listener.local_addr()?, consumer = %config.consumer, "aggregator listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        })
        .await;
    for (task, name) in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, task = name, "background task panicked");
        }
    }
    served?;
    Ok(())
}

/// The price table and, for a file, its text (which is what gets published).
fn load_pricing(file: Option<&std::path::Path>) -> Result<(Pricing, Option<String>), PricingError> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| PricingError::Io {
                path: path.to_owned(),
                error,
            })?;
            Ok((Pricing::from_json(&text)?, Some(text)))
        }
        None => Ok((Pricing::bundled(), None)),
    }
}

/// Publishes to every partition: each one's consumers check its own control state, so a
/// commit script never reaches outside its slot.
async fn publish(conn: &mut RedisConn, partitions: &shared::Partitions, p: &Pricing, text: &str) {
    for keyspace in partitions.iter() {
        match control::publish_pricing(conn, keyspace, p, text).await {
            Ok(true) => tracing::info!(
                fingerprint = p.fingerprint(),
                stream = keyspace.stream(),
                "pricing published to the deployment"
            ),
            Ok(false) => {}
            // Consumers keep the prices in force; the operator sees why the new ones are not.
            Err(e) => tracing::error!(error = %e, "cannot publish the pricing"),
        }
    }
}

/// SIGHUP re-reads the price file and publishes it; every aggregator of the deployment applies
/// it from its next batch on (past events are re-priced only by `replay`). A file that fails to
/// load leaves the current prices in place.
async fn reload_on_hangup(
    file: Option<std::path::PathBuf>,
    mut conn: RedisConn,
    partitions: shared::Partitions,
    mut shutdown: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; pricing reload disabled");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        match load_pricing(file.as_deref()) {
            Ok((fresh, Some(text))) => {
                tracing::info!(
                    models = fresh.model_count(),
                    fingerprint = fresh.fingerprint(),
                    "pricing reloaded"
                );
                publish(&mut conn, &partitions, &fresh, &text).await;
            }
            Ok((_, None)) => tracing::info!("no --pricing file to reload"),
            Err(e) => {
                tracing::error!(error = %e, "pricing reload failed; keeping the current prices")
            }
        }
    }
}

async fn connect_redis(target: &shared::Target) -> Result<RedisConn, StartError> {
    // The response timeout must outlast the consumer's blocking read (500 ms).
    let timeouts = shared::Timeouts::new(Duration::from_secs(2), Duration::from_secs(5));
    target
        .connect(timeouts)
        .await
        .map_err(|source| StartError::Redis {
            url: target.describe(),
            source,
        })
}
