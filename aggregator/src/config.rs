//! The aggregator's one typed configuration: flags, then environment, then an optional TOML
//! file, then defaults (docs/configuration.md). Only parsing the command line (`cli::Cli`, in
//! `main`) reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use shared::{Partitions, Target};

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// One Redis node, or a cluster's seed nodes.
    pub redis: Target,
    /// The deployment's keyspaces: every aggregator consumes every partition.
    pub partitions: Partitions,
    pub group: String,
    pub consumer: String,
    /// `None`: the bundled LiteLLM snapshot.
    pub pricing_file: Option<PathBuf>,
    pub admin_token: Option<String>,
    /// The gateway whose admin API the dashboard's limits panel reads; `None`: no panel figures.
    pub gateway_url: Option<String>,
    pub batch_size: usize,
    pub commit_events: usize,
    pub claim_idle: Duration,
    pub dedupe_window_secs: i64,
    /// Acknowledged stream entries older than this are trimmed.
    pub stream_retention: std::time::Duration,
    /// How often the stream is trimmed.
    pub trim_interval: std::time::Duration,
    /// How long a partial batch waits for more events before it is committed.
    pub linger: std::time::Duration,
    /// Rows of reduced stats cells the API keeps in memory; 0 disables the cache.
    pub stats_cache_rows: usize,
    /// Start even though Redis may evict keys (`shared::redis_policy`), with a logged error.
    pub allow_redis_eviction: bool,
}

pub use shared::settings::SettingsError as ConfigError;

/// The server's settings. Those a subcommand uses are `global` (`aggregator usage --redis-url
/// ...`): `config`, `redis_url`, `redis_cluster`, `partitions` and `stream` for every one, `group` and `dedupe_window_secs` for
/// `replay`; the others are the server's only, and so stay out of the subcommands' `--help`.
#[derive(Debug, clap::Args, Default)]
pub struct Args {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(global = true, long, env = "AGGREGATOR_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "AGGREGATOR_LISTEN")]
    pub listen: Option<String>,
    /// One `redis://` or `rediss://` URL, or a comma-separated list of cluster seed nodes.
    #[arg(global = true, long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Treat a single Redis URL as a cluster seed node.
    #[arg(global = true, long, env = "REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// How many streams the events are spread over (default 1); the same in every process of
    /// a deployment.
    #[arg(global = true, long, env = "METER_PARTITIONS")]
    pub partitions: Option<u32>,
    #[arg(global = true, long, env = "METER_STREAM")]
    pub stream: Option<String>,
    #[arg(global = true, long, env = "METER_GROUP")]
    pub group: Option<String>,
    /// Consumer name within the group; default hostname + pid.
    #[arg(long, env = "METER_CONSUMER")]
    pub consumer: Option<String>,
    /// LiteLLM-format price file; default the bundled snapshot.
    #[arg(long = "pricing", env = "PRICING_FILE")]
    pub pricing: Option<PathBuf>,
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Base URL of the gateway (`http://gateway:8080`), whose admin API the dashboard's limits
    /// panel reads with the caller's admin token; unset: no limits panel figures.
    #[arg(long, env = "METER_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// Most stream entries per batch; default 24000. Live traffic makes smaller batches (see
    /// `--linger-ms`); a backlog is read in full batches, where larger ones share more cells per
    /// batch (less work for Redis per event). A batch is read and committed in bounded pieces
    /// (`--commit-events`), so its size no longer decides how long other clients wait.
    #[arg(long, env = "METER_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Most events one commit script applies; default 500. A batch is committed as several
    /// scripts, the events of one client key together, so that Redis serves its other clients
    /// (the gateway's limit checks) between them rather than waiting for a whole batch.
    #[arg(long, env = "METER_COMMIT_EVENTS")]
    pub commit_events: Option<usize>,
    /// Entries pending this long on another consumer are taken over, milliseconds.
    #[arg(long, env = "METER_CLAIM_IDLE_MS")]
    pub claim_idle_ms: Option<u64>,
    /// Copies of an event id arriving within this many seconds of each other count once.
    #[arg(global = true, long, env = "METER_DEDUPE_WINDOW_SECS")]
    pub dedupe_window_secs: Option<i64>,
    /// Keep acknowledged stream entries this many seconds (replay reads them); default 7 days.
    #[arg(long, env = "METER_STREAM_RETENTION_SECS")]
    pub stream_retention_secs: Option<u64>,
    /// Seconds between two trims of the stream; default 60.
    #[arg(long, env = "METER_TRIM_INTERVAL_SECS")]
    pub trim_interval_secs: Option<u64>,
    /// Milliseconds a partial batch waits for more events (fewer, larger commits); default 50.
    #[arg(long, env = "METER_LINGER_MS")]
    pub linger_ms: Option<u64>,
    /// Rows of reduced stats cells the stats API caches (about 200 bytes each); 0 disables;
    /// default 500000.
    #[arg(long, env = "METER_STATS_CACHE_ROWS")]
    pub stats_cache_rows: Option<usize>,
    /// Start (or replay) even when Redis's maxmemory-policy is not noeviction (evicted keys
    /// double-count or lose usage); without it the aggregator refuses to.
    #[arg(global = true, long, env = "METER_ALLOW_REDIS_EVICTION")]
    pub allow_redis_eviction: bool,

    /// Log lines as `text` (default; coloured on a terminal) or `json`, one object per line for
    /// log shippers. Flag and environment only: logging starts before the file is read.
    #[arg(global = true, long, env = "METER_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    redis_url: Option<String>,
    redis_cluster: Option<bool>,
    partitions: Option<u32>,
    stream: Option<String>,
    group: Option<String>,
    consumer: Option<String>,
    pricing: Option<PathBuf>,
    admin_token: Option<String>,
    gateway_url: Option<String>,
    batch_size: Option<usize>,
    commit_events: Option<usize>,
    claim_idle_ms: Option<u64>,
    dedupe_window_secs: Option<i64>,
    stream_retention_secs: Option<u64>,
    trim_interval_secs: Option<u64>,
    linger_ms: Option<u64>,
    stats_cache_rows: Option<usize>,
    allow_redis_eviction: Option<bool>,
}

impl Config {
    pub fn build(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => shared::settings::read_file(path)?,
            None => FileConfig::default(),
        };
        let listen = shared::settings::listen(args.listen.or(file.listen), "127.0.0.1:8081")?;
        let shared::settings::Deployment { redis, partitions } = shared::settings::deployment(
            args.redis_url.or(file.redis_url),
            args.redis_cluster || file.redis_cluster.unwrap_or(false),
            args.stream.or(file.stream),
            args.partitions.or(file.partitions),
        )?;
        let pricing_file = args.pricing.or(file.pricing);
        if let Some(path) = &pricing_file
            && !path.is_file()
        {
            return Err(ConfigError::Invalid {
                name: "pricing file",
                reason: format!("{} does not exist", path.display()),
            });
        }
        let gateway_url = args
            .gateway_url
            .or(file.gateway_url)
            .filter(|u| !u.is_empty());
        if let Some(url) = &gateway_url {
            let parsed = reqwest::Url::parse(url).map_err(|e| ConfigError::Invalid {
                name: "gateway URL",
                reason: format!("{url:?}: {e}"),
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::Invalid {
                    name: "gateway URL",
                    reason: format!("{url:?}: not an http:// or https:// URL"),
                });
            }
        }
        let batch_size = args.batch_size.or(file.batch_size).unwrap_or(24_000);
        if batch_size == 0 {
            return Err(ConfigError::Invalid {
                name: "batch size",
                reason: "must be at least 1".into(),
            });
        }
        let commit_events = args.commit_events.or(file.commit_events).unwrap_or(500);
        if commit_events == 0 {
            return Err(ConfigError::Invalid {
                name: "commit events",
                reason: "must be at least 1".into(),
            });
        }
        let dedupe_window_secs = args
            .dedupe_window_secs
            .or(file.dedupe_window_secs)
            .unwrap_or(3600);
        if dedupe_window_secs < 1 {
            return Err(ConfigError::Invalid {
                name: "dedupe window",
                reason: "must be at least 1 second".into(),
            });
        }
        Ok(Self {
            listen,
            redis,
            partitions,
            group: args
                .group
                .or(file.group)
                .unwrap_or_else(|| "aggregator".into()),
            consumer: args
                .consumer
                .or(file.consumer)
                .unwrap_or_else(default_consumer),
            pricing_file,
            admin_token: args
                .admin_token
                .or(file.admin_token)
                .filter(|t| !t.is_empty()),
            gateway_url,
            batch_size,
            commit_events,
            claim_idle: Duration::from_millis(
                args.claim_idle_ms.or(file.claim_idle_ms).unwrap_or(30_000),
            ),
            dedupe_window_secs,
            stream_retention: Duration::from_secs(
                args.stream_retention_secs
                    .or(file.stream_retention_secs)
                    .unwrap_or(7 * 24 * 3600),
            ),
            trim_interval: Duration::from_secs(
                args.trim_interval_secs
                    .or(file.trim_interval_secs)
                    .unwrap_or(60)
                    .max(1),
            ),
            linger: Duration::from_millis(args.linger_ms.or(file.linger_ms).unwrap_or(50)),
            stats_cache_rows: args
                .stats_cache_rows
                .or(file.stats_cache_rows)
                .unwrap_or(500_000),
            allow_redis_eviction: args.allow_redis_eviction
                || file.allow_redis_eviction.unwrap_or(false),
        })
    }

    /// A configuration for tests: free port, given Redis and stream.
    pub fn for_test(redis_url: &str, stream: &str) -> Result<Self, ConfigError> {
        Self::build(Args {
            listen: Some("127.0.0.1:0".into()),
            redis_url: Some(redis_url.into()),
            stream: Some(stream.into()),
            ..Args::default()
        })
    }
}

fn default_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "aggregator".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::build(Args::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.group, "aggregator");
        assert_eq!(c.partitions.global().stream(), "meter:events");
        assert!(c.consumer.ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn a_missing_pricing_file_is_refused() {
        let err = Config::build(Args {
            pricing: Some("/nonexistent/prices.json".into()),
            ..Args::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("pricing file"), "{err}");
    }

    #[test]
    fn a_gateway_url_must_be_http() {
        for url in ["gateway:8080", "redis://127.0.0.1:6379"] {
            let err = Config::build(Args {
                gateway_url: Some(url.into()),
                ..Args::default()
            })
            .unwrap_err();
            assert!(err.to_string().contains("gateway URL"), "{err}");
        }
        let c = Config::build(Args {
            gateway_url: Some("http://127.0.0.1:8080/".into()),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(c.gateway_url.as_deref(), Some("http://127.0.0.1:8080/"));
    }
}
