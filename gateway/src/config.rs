//! The gateway's one typed configuration: flags, then environment, then an optional TOML file,
//! then defaults (docs/configuration.md). Only [`Config::from_args`] reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use shared::{Partitions, Target};

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// One Redis node, or a cluster's seed nodes.
    pub redis: Target,
    /// The deployment's keyspaces: the global one and one per partition.
    pub partitions: Partitions,
    /// An event batch counts as published, and an admin write as confirmed, only once this
    /// many replicas have it (`WAIT`).
    pub min_replicas: u32,
    /// `None` disables the admin API.
    pub admin_token: Option<String>,
    pub max_body_bytes: usize,
    /// Longest a client may take to upload a request body. Bounds how long a handler waits on
    /// a slow or stalled client before the request is refused.
    pub body_read_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    /// From sending a request to the upstream's response headers.
    pub upstream_first_byte_timeout: Duration,
    /// Longest silence between two chunks of an upstream body.
    pub upstream_idle_timeout: Duration,
    /// How long an account rests after a 429/5xx without `retry-after`, or a connection failure.
    pub default_cooldown: Duration,
    /// Where usage events wait while Redis is unreachable. One directory per gateway process.
    pub spool_dir: PathBuf,
    /// fsync the spool on every append and position update (default), so that a host crash
    /// during a Redis outage loses no spooled event; off, only a process crash is survived.
    pub spool_fsync: bool,
    /// Approximate cap on the stream's length (`XADD MAXLEN ~`); `None`: the aggregator trims.
    pub stream_maxlen: Option<u64>,
    /// A concurrency lease not renewed for this long (its gateway died) is free again.
    pub lease_ttl: Duration,
    /// Admit (`open`) or refuse (`closed`) requests whose limits cannot be checked.
    pub limits_on_redis_down: crate::limiter::RedisDownPolicy,
    /// How long a cached key record or account list may be used before it is re-read.
    pub cache_ttl: Duration,
    /// How long a key's spend sums (token and cost windows, lifetime cost) may decide its
    /// limits before the spend counters are read again; zero reads them on every request.
    /// Token, cost and budget enforcement lags the aggregator by up to this much more.
    pub spend_cache: Duration,
    /// How long a block of a key's `requests` allowance leased by this replica lasts; zero
    /// turns leased blocks (of requests and of concurrency slots) off.
    pub limit_block: Duration,
    /// Start even though Redis may evict keys (`shared::redis_policy`), with a logged error.
    pub allow_redis_eviction: bool,
}

pub use shared::settings::SettingsError as ConfigError;

/// Command line; every flag also reads the environment variable of the same meaning.
#[derive(Debug, Parser, Default)]
#[command(
    name = "gateway",
    version,
    about = "LLM API gateway: auth, limits, relay, usage events"
)]
pub struct Args {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "GATEWAY_LISTEN")]
    pub listen: Option<String>,
    /// One `redis://` or `rediss://` URL, or a comma-separated list of cluster seed nodes.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Treat a single Redis URL as a cluster seed node.
    #[arg(long, env = "REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// How many streams the events are spread over (default 1); the same in every process of
    /// a deployment.
    #[arg(long, env = "METER_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Keep an event batch in the spool until this many replicas acknowledge it (default 0).
    #[arg(long, env = "METER_MIN_REPLICAS")]
    pub min_replicas: Option<u32>,
    #[arg(long, env = "METER_STREAM")]
    pub stream: Option<String>,
    /// Bearer token for /admin; unset disables the admin API.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Largest accepted request body, bytes.
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Longest a client may take to upload a request body, milliseconds (default 30000); a
    /// slower upload is answered 408.
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT_MS")]
    pub body_read_timeout_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_UPSTREAM_CONNECT_TIMEOUT_MS")]
    pub upstream_connect_timeout_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT_MS")]
    pub upstream_first_byte_timeout_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_UPSTREAM_IDLE_TIMEOUT_MS")]
    pub upstream_idle_timeout_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_DEFAULT_COOLDOWN_MS")]
    pub default_cooldown_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_CACHE_TTL_MS")]
    pub cache_ttl_ms: Option<u64>,
    /// Directory of the local event spool (default `./spool`); one per gateway process.
    #[arg(long, env = "GATEWAY_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// `true` (default): fsync each spool write, so a host crash loses no spooled event;
    /// `false`: faster spooling that survives only a process crash.
    #[arg(long, env = "GATEWAY_SPOOL_FSYNC")]
    pub spool_fsync: Option<bool>,
    /// Cap the stream at about this many entries (default: no cap; the aggregator trims).
    #[arg(long, env = "METER_STREAM_MAXLEN")]
    pub stream_maxlen: Option<u64>,
    /// Concurrency lease TTL, milliseconds (default 60000).
    #[arg(long, env = "GATEWAY_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// `open` (default): keep relaying when limits cannot be checked; `closed`: refuse.
    #[arg(long, env = "GATEWAY_LIMITS_ON_REDIS_DOWN")]
    pub limits_on_redis_down: Option<String>,
    /// How long a key's token/cost/budget sums are reused before the spend counters are read
    /// again, milliseconds (default 200; 0 = read on every request).
    #[arg(long, env = "GATEWAY_SPEND_CACHE_MS")]
    pub spend_cache_ms: Option<u64>,
    /// How long a block of a key's request allowance that a replica leases in one round trip
    /// lasts, milliseconds (default 500, at most 5000; 0 = no blocks: every request of a
    /// limited key is checked in Redis).
    #[arg(long, env = "GATEWAY_LIMIT_BLOCK_MS")]
    pub limit_block_ms: Option<u64>,
    /// Start even when Redis's maxmemory-policy is not noeviction (evicted keys double-count
    /// or lose usage); without it the gateway refuses to start there.
    #[arg(long, env = "METER_ALLOW_REDIS_EVICTION")]
    pub allow_redis_eviction: bool,

    /// Log lines as `text` (default; coloured on a terminal) or `json`, one object per line for
    /// log shippers. Flag and environment only: logging starts before the file is read.
    #[arg(long, env = "METER_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// `true` (default): one `info` line per client request, target `meter::access`, whatever
    /// `RUST_LOG`'s level (unless it names `meter::access` itself); `false`: none. Flag and
    /// environment only, like `--log-format`.
    #[arg(long, env = "METER_ACCESS_LOG")]
    pub access_log: Option<bool>,
}

/// The same settings as a TOML file spells them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    redis_url: Option<String>,
    redis_cluster: Option<bool>,
    partitions: Option<u32>,
    min_replicas: Option<u32>,
    stream: Option<String>,
    admin_token: Option<String>,
    max_body_bytes: Option<usize>,
    body_read_timeout_ms: Option<u64>,
    upstream_connect_timeout_ms: Option<u64>,
    upstream_first_byte_timeout_ms: Option<u64>,
    upstream_idle_timeout_ms: Option<u64>,
    default_cooldown_ms: Option<u64>,
    cache_ttl_ms: Option<u64>,
    spool_dir: Option<PathBuf>,
    spool_fsync: Option<bool>,
    stream_maxlen: Option<u64>,
    limits_on_redis_down: Option<String>,
    lease_ttl_ms: Option<u64>,
    spend_cache_ms: Option<u64>,
    limit_block_ms: Option<u64>,
    allow_redis_eviction: Option<bool>,
}

impl Config {
    /// Parses the process's flags and environment.
    pub fn from_args() -> Result<Self, ConfigError> {
        Self::build(Args::parse())
    }

    pub fn build(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => shared::settings::read_file(path)?,
            None => FileConfig::default(),
        };
        let listen = shared::settings::listen(args.listen.or(file.listen), "127.0.0.1:8080")?;
        let shared::settings::Deployment { redis, partitions } = shared::settings::deployment(
            args.redis_url.or(file.redis_url),
            args.redis_cluster || file.redis_cluster.unwrap_or(false),
            args.stream.or(file.stream),
            args.partitions.or(file.partitions),
        )?;
        let admin_token = args
            .admin_token
            .or(file.admin_token)
            .filter(|t| !t.is_empty());
        // Added to the aggregator's lag (~70 ms) in the enforcement lag of token, cost and
        // budget limits, which must stay under 1 s (issue 5).
        let spend_cache_ms = args.spend_cache_ms.or(file.spend_cache_ms).unwrap_or(200);
        if spend_cache_ms >= 1_000 {
            return Err(ConfigError::Invalid {
                name: "spend-cache-ms",
                reason: format!(
                    "{spend_cache_ms} ms: token, cost and budget limits must be enforced within 1 s"
                ),
            });
        }
        let limit_block_ms = args.limit_block_ms.or(file.limit_block_ms).unwrap_or(500);
        if limit_block_ms > crate::limiter::MAX_BLOCK_MS {
            return Err(ConfigError::Invalid {
                name: "limit-block-ms",
                reason: format!(
                    "{limit_block_ms} ms: the limiter keeps request logs only {} ms past their window",
                    crate::limiter::MAX_BLOCK_MS
                ),
            });
        }
        let body_read_timeout_ms = args
            .body_read_timeout_ms
            .or(file.body_read_timeout_ms)
            .unwrap_or(30_000);
        if body_read_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                name: "body-read-timeout-ms",
                reason: "0 ms: no request body could be read".into(),
            });
        }
        Ok(Self {
            listen,
            redis,
            partitions,
            min_replicas: args.min_replicas.or(file.min_replicas).unwrap_or(0),
            admin_token,
            max_body_bytes: args
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(32 * 1024 * 1024),
            body_read_timeout: Duration::from_millis(body_read_timeout_ms),
            upstream_connect_timeout: Duration::from_millis(
                args.upstream_connect_timeout_ms
                    .or(file.upstream_connect_timeout_ms)
                    .unwrap_or(10_000),
            ),
            // Non-streaming answers of long generations arrive whole after minutes; the official
            // SDKs wait up to 10 minutes, and so do we.
            upstream_first_byte_timeout: Duration::from_millis(
                args.upstream_first_byte_timeout_ms
                    .or(file.upstream_first_byte_timeout_ms)
                    .unwrap_or(600_000),
            ),
            upstream_idle_timeout: Duration::from_millis(
                args.upstream_idle_timeout_ms
                    .or(file.upstream_idle_timeout_ms)
                    .unwrap_or(300_000),
            ),
            default_cooldown: Duration::from_millis(
                args.default_cooldown_ms
                    .or(file.default_cooldown_ms)
                    .unwrap_or(60_000),
            ),
            spool_dir: args
                .spool_dir
                .or(file.spool_dir)
                .unwrap_or_else(|| PathBuf::from("spool")),
            spool_fsync: args.spool_fsync.or(file.spool_fsync).unwrap_or(true),
            stream_maxlen: args.stream_maxlen.or(file.stream_maxlen).filter(|n| *n > 0),
            lease_ttl: Duration::from_millis(
                args.lease_ttl_ms
                    .or(file.lease_ttl_ms)
                    .unwrap_or(60_000)
                    .max(100),
            ),
            limits_on_redis_down: match args
                .limits_on_redis_down
                .or(file.limits_on_redis_down)
                .as_deref()
            {
                None | Some("open") => crate::limiter::RedisDownPolicy::Open,
                Some("closed") => crate::limiter::RedisDownPolicy::Closed,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        name: "limits-on-redis-down",
                        reason: format!("{other:?} is not open or closed"),
                    });
                }
            },
            cache_ttl: Duration::from_millis(
                args.cache_ttl_ms.or(file.cache_ttl_ms).unwrap_or(1_000),
            ),
            spend_cache: Duration::from_millis(spend_cache_ms),
            limit_block: Duration::from_millis(limit_block_ms),
            allow_redis_eviction: args.allow_redis_eviction
                || file.allow_redis_eviction.unwrap_or(false),
        })
    }

    /// A configuration for tests: free port, given Redis and stream, admin token "admin".
    pub fn for_test(redis_url: &str, stream: &str) -> Result<Self, ConfigError> {
        Self::build(Args {
            listen: Some("127.0.0.1:0".into()),
            redis_url: Some(redis_url.into()),
            stream: Some(stream.into()),
            admin_token: Some("admin".into()),
            spool_dir: Some(std::env::temp_dir().join(format!("meter-spool-{stream}"))),
            ..Args::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let config = Config::build(Args::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.redis.describe(), "redis://127.0.0.1:6379");
        assert_eq!(config.partitions.global().stream(), "meter:events");
        assert_eq!(config.admin_token, None);
    }

    #[test]
    fn an_unparsable_redis_url_is_refused() {
        let args = Args {
            redis_url: Some("http://nope".into()),
            ..Args::default()
        };
        let err = Config::build(args).unwrap_err().to_string();
        assert!(err.contains("REDIS_URL"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("gw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9999\"\nstream = \"s:file\"\n").unwrap();
        let config = Config::build(Args {
            config: Some(path),
            stream: Some("s:flag".into()),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(config.partitions.global().stream(), "s:flag");
    }

    #[test]
    fn the_spend_cache_defaults_to_200_ms_and_stays_under_the_1_s_enforcement_lag() {
        let config = Config::build(Args::default()).unwrap();
        assert_eq!(config.spend_cache, Duration::from_millis(200));
        let dir = std::env::temp_dir().join(format!("gw-config-spend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "spend_cache_ms = 50\n").unwrap();
        let from_file = Config::build(Args {
            config: Some(path.clone()),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(from_file.spend_cache, Duration::from_millis(50));
        let off = Config::build(Args {
            config: Some(path),
            spend_cache_ms: Some(0),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(off.spend_cache, Duration::ZERO);
        let err = Config::build(Args {
            spend_cache_ms: Some(1_000),
            ..Args::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("spend-cache-ms"), "{err}");
    }

    #[test]
    fn the_body_read_timeout_defaults_to_30_s_and_is_never_zero() {
        let config = Config::build(Args::default()).unwrap();
        assert_eq!(config.body_read_timeout, Duration::from_secs(30));
        let dir = std::env::temp_dir().join(format!("gw-config-body-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "body_read_timeout_ms = 5000\n").unwrap();
        let from_file = Config::build(Args {
            config: Some(path.clone()),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(from_file.body_read_timeout, Duration::from_secs(5));
        let from_flag = Config::build(Args {
            config: Some(path),
            body_read_timeout_ms: Some(750),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(from_flag.body_read_timeout, Duration::from_millis(750));
        let err = Config::build(Args {
            body_read_timeout_ms: Some(0),
            ..Args::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("body-read-timeout-ms"), "{err}");
    }

    #[test]
    fn the_spool_is_fsynced_unless_turned_off_by_flag_environment_or_file() {
        assert!(Config::build(Args::default()).unwrap().spool_fsync);
        let dir = std::env::temp_dir().join(format!("gw-config-fsync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "spool_fsync = false\n").unwrap();
        let from_file = Config::build(Args {
            config: Some(path.clone()),
            ..Args::default()
        })
        .unwrap();
        assert!(!from_file.spool_fsync);
        let flag_wins = Config::build(Args {
            config: Some(path),
            spool_fsync: Some(true),
            ..Args::default()
        })
        .unwrap();
        assert!(flag_wins.spool_fsync);
        let parsed = Args::try_parse_from(["gateway", "--spool-fsync", "false"]).unwrap();
        assert_eq!(parsed.spool_fsync, Some(false));
    }

    #[test]
    fn redis_eviction_is_refused_unless_a_flag_or_the_file_allows_it() {
        assert!(!Config::build(Args::default()).unwrap().allow_redis_eviction);
        let flag = Args {
            allow_redis_eviction: true,
            ..Args::default()
        };
        assert!(Config::build(flag).unwrap().allow_redis_eviction);
        let dir = std::env::temp_dir().join(format!("gw-config-evict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "allow_redis_eviction = true\n").unwrap();
        let file = Args {
            config: Some(path),
            ..Args::default()
        };
        assert!(Config::build(file).unwrap().allow_redis_eviction);
    }

    #[test]
    fn an_unknown_file_setting_is_refused() {
        let dir = std::env::temp_dir().join(format!("gw-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "listne = \"127.0.0.1:9999\"\n").unwrap();
        let err = Config::build(Args {
            config: Some(path),
            ..Args::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::ParseFile { .. }));
    }
}
