//! The deployment under load: a private Redis, the mock upstream, the aggregator and the
//! gateway, started as children on free loopback ports under a stream name of this run, then
//! given an upstream account and a client key through the admin API.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::load::{self, LoadSpec};
use crate::probes::RedisProbe;
use crate::processes::{Binaries, Children, accepts_connections, free_addr};

/// The addresses and credentials of one benchmark deployment.
pub struct Deployment {
    pub mock: String,
    pub gateway: String,
    pub aggregator: String,
    pub gateway_pid: u32,
    #[allow(
        dead_code,
        reason = "the soak reads it; loadgen, which includes this file too, does not"
    )]
    pub aggregator_pid: u32,
    /// The usage stream (`METER_STREAM`), unique to this run.
    pub stream: String,
    admin_token: String,
    pub redis: RedisProbe,
    /// For admin calls and probes; the load itself uses a client per run.
    pub control: reqwest::Client,
    /// The Redis Cluster the deployment runs on, if it does; its nodes stop when it is dropped.
    _cluster: Option<tests::cluster::RedisCluster>,
}

/// Where the deployment keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redis {
    /// One `redis-server`, as most deployments run.
    Node,
    /// A 3-master, 3-replica cluster on loopback, events in this many partitions.
    Cluster { partitions: u32 },
}

impl Deployment {
    /// Starts Redis, the mock, the aggregator and the gateway (with `gateway_settings` added to
    /// its environment), each on a free port, and waits until each one serves.
    pub async fn start(
        children: &mut Children,
        binaries: &Binaries,
        gateway_settings: &[(&'static str, String)],
        redis_kind: Redis,
    ) -> anyhow::Result<Self> {
        let [redis_addr, mock_addr, aggregator_addr, gateway_addr] =
            [free_addr()?, free_addr()?, free_addr()?, free_addr()?];
        let stream = format!("bench:{}", std::process::id());
        let admin_token = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let control = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;

        let within = Duration::from_secs(10);
        let (redis_url, partitions, cluster, mut redis) = match redis_kind {
            Redis::Node => {
                let redis_url = format!("redis://{redis_addr}");
                let port = redis_addr.port().to_string();
                let redis_args = [
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ];
                children
                    .spawn("redis-server", Path::new("redis-server"), &redis_args, &[])
                    .context("redis-server must be on PATH (apt-get install redis-server)")?;
                children
                    .wait_until("redis-server", within, async || {
                        accepts_connections(redis_addr)
                    })
                    .await?;
                let probe =
                    RedisProbe::connect(std::slice::from_ref(&redis_url), &redis_url, 1).await?;
                (redis_url, 1, None, probe)
            }
            Redis::Cluster { partitions } => {
                let cluster = tokio::task::spawn_blocking(tests::cluster::RedisCluster::start)
                    .await
                    .context("starting the Redis Cluster")?;
                let redis_url = cluster.url();
                let probe =
                    RedisProbe::connect(&cluster.master_urls(), &redis_url, partitions).await?;
                (redis_url, partitions, Some(cluster), probe)
            }
        };
        redis.ping().await?;

        let mock_listen = mock_addr.to_string();
        let log = ("RUST_LOG", "warn".to_owned());
        children.spawn(
            "mock-upstream",
            &binaries.mock_upstream,
            &["--listen", &mock_listen],
            std::slice::from_ref(&log),
        )?;
        let common = [
            ("REDIS_URL", redis_url.clone()),
            ("METER_STREAM", stream.clone()),
            ("ADMIN_TOKEN", admin_token.clone()),
            ("METER_PARTITIONS", partitions.to_string()),
            log,
        ];
        let with = |name: &'static str, addr: String| {
            let mut env = common.to_vec();
            env.push((name, addr));
            env
        };
        let aggregator_env = with("AGGREGATOR_LISTEN", aggregator_addr.to_string());
        let aggregator_pid =
            children.spawn("aggregator", &binaries.aggregator, &[], &aggregator_env)?;
        let mut gateway_env = with("GATEWAY_LISTEN", gateway_addr.to_string());
        gateway_env.push((
            "GATEWAY_SPOOL_DIR",
            children.log_dir().join("spool").display().to_string(),
        ));
        gateway_env.extend_from_slice(gateway_settings);
        let gateway_pid = children.spawn("gateway", &binaries.gateway, &[], &gateway_env)?;

        let deployment = Self {
            mock: format!("http://{mock_addr}"),
            gateway: format!("http://{gateway_addr}"),
            aggregator: format!("http://{aggregator_addr}"),
            gateway_pid,
            aggregator_pid,
            stream,
            admin_token,
            redis,
            control,
            _cluster: cluster,
        };
        let get_ok = async |url: String| {
            let response = deployment.control.get(url).send().await;
            response.is_ok_and(|r| r.status().is_success())
        };
        children
            .wait_until("mock-upstream", within, async || {
                accepts_connections(mock_addr)
            })
            .await?;
        // `/v1/usage` answers only once the aggregator reaches Redis.
        let usage = format!("{}/v1/usage", deployment.aggregator);
        children
            .wait_until("aggregator", within, async || {
                let response = deployment
                    .control
                    .get(usage.clone())
                    .bearer_auth(&deployment.admin_token)
                    .send()
                    .await;
                response.is_ok_and(|r| r.status().is_success())
            })
            .await?;
        let ready = format!("{}/readyz", deployment.gateway);
        children
            .wait_until("gateway", within, async || get_ok(ready.clone()).await)
            .await?;
        Ok(deployment)
    }

    /// Creates the upstream account (the mock) and a client key; returns the key's secret.
    pub async fn provision(&self) -> anyhow::Result<String> {
        self.add_account().await?;
        self.add_key(json!({"name": "bench"})).await
    }

    /// A second key with every kind of limit, none of which the load can reach, so each of its
    /// requests pays for the full check (sliding log, spend windows, budget, concurrency lease)
    /// and is admitted.
    pub async fn provision_limited(&self) -> anyhow::Result<String> {
        self.add_key(json!({
            "name": "bench-limits",
            "limits": [
                {"metric": "requests", "max": 1_000_000_000u64, "window_secs": 60},
                {"metric": "tokens", "max": 1_000_000_000_000u64, "window_secs": 3600},
                {"metric": "cost_usd", "max": 1_000_000.0, "window_secs": 86400}],
            "budget_usd": 1_000_000_000.0,
            "max_concurrency": 10_000,
        }))
        .await
    }

    async fn add_account(&self) -> anyhow::Result<()> {
        let token = &self.admin_token;
        let account = json!({
            "name": "mock", "provider": "anthropic", "base_url": self.mock, "api_key": "sk-mock",
        });
        let response = self
            .control
            .post(format!("{}/admin/accounts", self.gateway))
            .bearer_auth(token)
            .json(&account)
            .send()
            .await
            .context("POST /admin/accounts")?;
        expect_success(response, "creating the upstream account").await?;
        Ok(())
    }

    /// Creates a client key; returns its secret.
    async fn add_key(&self, body: Value) -> anyhow::Result<String> {
        let response = self
            .control
            .post(format!("{}/admin/keys", self.gateway))
            .bearer_auth(&self.admin_token)
            .json(&body)
            .send()
            .await
            .context("POST /admin/keys")?;
        let created: Value = expect_success(response, "creating the key")
            .await?
            .json()
            .await
            .context("reading the created key")?;
        created["key"]
            .as_str()
            .map(str::to_owned)
            .context("the created key has no `key` field")
    }

    /// One request through the gateway before any load, so a broken setup fails in seconds rather
    /// than after every run. Returns how many gateway responses it caused, for conservation.
    pub async fn preflight(&self, key: &str) -> anyhow::Result<u64> {
        load::once(&LoadSpec {
            url: format!("{}/v1/messages", self.gateway),
            api_key: key.to_owned(),
            stream: false,
            concurrency: 1,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
        })
        .await
        .context("preflight request through the gateway")?;
        Ok(1)
    }

    /// Total `requests` over the rows of `GET /v1/usage` (default range: the last seven days).
    pub async fn usage_requests(&self) -> anyhow::Result<u64> {
        let response = self
            .control
            .get(format!("{}/v1/usage", self.aggregator))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .context("GET /v1/usage")?;
        let usage: Value = expect_success(response, "GET /v1/usage")
            .await?
            .json()
            .await
            .context("reading /v1/usage")?;
        let rows = usage["rows"]
            .as_array()
            .context("/v1/usage has no `rows` array")?;
        rows.iter()
            .map(|row| {
                row["requests"]
                    .as_u64()
                    .context("a usage row has no `requests`")
            })
            .sum()
    }
}

async fn expect_success(
    response: reqwest::Response,
    what: &str,
) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    bail!("{what}: {status}: {body}")
}

/// What the gateway answered against what the pipeline recorded.
pub struct Conservation {
    /// Responses the gateway sent on `/v1/messages`.
    pub served: u64,
    pub stream_len: u64,
    pub usage_requests: u64,
    pub waited: std::time::Duration,
}

impl Deployment {
    /// Waits (at most `wait`) until `/v1/usage` counts what the gateway answered, then reads
    /// the stream length.
    pub async fn conservation(
        &mut self,
        served: u64,
        wait: Duration,
    ) -> anyhow::Result<Conservation> {
        let started = tokio::time::Instant::now();
        let mut usage_requests = None;
        while started.elapsed() < wait {
            // A failed query (the aggregator busy, say) is retried until the deadline.
            if let Ok(n) = self.usage_requests().await {
                usage_requests = Some(n);
                if n >= served {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let waited = started.elapsed();
        let usage_requests = match usage_requests {
            Some(n) => n,
            None => self.usage_requests().await?,
        };
        Ok(Conservation {
            served,
            stream_len: self.redis.xlen(&self.stream).await?,
            usage_requests,
            waited,
        })
    }
}
