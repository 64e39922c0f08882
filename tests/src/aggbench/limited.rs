//! The second probe: a limited key's requests through a real gateway, timed end to end.
//!
//! The `PING` probe shows what any client of the Redis waits; this one shows what a gateway's
//! client waits, for the gateway checks a limited key's limits with one script per request on the
//! master of that key's partition, and Redis runs one script at a time. So the release
//! `mock-upstream` (canned answers, almost free) and the release `gateway` run against the same
//! Redis or cluster as the aggregator, as a deployment of their own (own stream name, one
//! partition): nobody consumes the probe's events, and the aggregator's totals stay exact. The
//! stream name is chosen by the caller so that the probe key's limiter state sits on the master
//! that runs the aggregator's partition 0.
//!
//! The key gets every kind of limit, none reachable (loadgen's `provision_limited`), so each
//! request pays for the full check: sliding log, spend read or cached sums, concurrency lease.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ::tests::process::log_tail;
use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tokio::time::MissedTickBehavior;

use crate::probes::{self, WaitSummary};
use crate::servers::{ChildGuard, free_port};

/// One request every this long, sequentially: paced like the `PING` probe, so both sample
/// Redis at the same rate, and light enough to leave the cores to the aggregator.
const PACE: Duration = Duration::from_millis(5);
/// The sliding `requests` window of the key; the limiter check after the idle phase counts
/// what it holds, so the idle phase and the preflight must fit in it.
const REQUESTS_WINDOW_SECS: u64 = 60;
/// How many of a phase's slowest requests the report lists.
pub const SLOWEST: usize = 8;
/// Gateway settings taken from our environment, so their effect on the probe can be measured.
pub const PASSED_THROUGH: [&str; 3] = [
    "GATEWAY_CACHE_TTL_MS",
    "GATEWAY_SPEND_CACHE_MS",
    "GATEWAY_LEASE_TTL_MS",
];

/// The mock upstream and the gateway, and the key the probe uses.
pub struct ProbeGateway {
    // Field order is drop order: the gateway goes before its upstream.
    gateway: ChildGuard,
    mock: ChildGuard,
    logs: PathBuf,
    base_url: String,
    admin_token: String,
    http: reqwest::Client,
    key_id: String,
    secret: String,
    pub stream: String,
}

impl Drop for ProbeGateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// Counters of the gateway's `/metrics` that tell whether the limiter ran.
#[derive(Debug, Default, Clone, Copy)]
pub struct GatewayCounters {
    /// Every Redis round trip: limit scripts, lease releases, publishes, key reads.
    pub round_trips: u64,
    /// Limit checks admitted unchecked because Redis did not answer: a fast probe with these
    /// would be measuring nothing.
    pub failed_open: u64,
    /// Spend sums read from Redis by the script, and taken from the replica's cache.
    pub spend_reads: u64,
    pub spend_cached: u64,
}

impl GatewayCounters {
    fn parse(text: &str) -> Self {
        let value = |name: &str| {
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .find_map(|line| {
                    let (metric, value) = line.rsplit_once(' ')?;
                    (metric == name).then(|| value.trim().parse::<f64>().ok())?
                })
                .map_or(0, |v| v as u64)
        };
        Self {
            round_trips: value("meter_gateway_redis_round_trips_total"),
            failed_open: value("meter_gateway_limits_failed_open_total"),
            spend_reads: value("meter_gateway_limit_spend_checks_total{source=\"redis\"}"),
            spend_cached: value("meter_gateway_limit_spend_checks_total{source=\"cache\"}"),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            round_trips: self.round_trips.saturating_sub(before.round_trips),
            failed_open: self.failed_open.saturating_sub(before.failed_open),
            spend_reads: self.spend_reads.saturating_sub(before.spend_reads),
            spend_cached: self.spend_cached.saturating_sub(before.spend_cached),
        }
    }
}

impl ProbeGateway {
    /// Starts both processes on free ports against `redis_url` (a URL or a cluster's seeds)
    /// under `stream`, waits until the gateway is ready, and provisions an account pointing
    /// at the mock and the limited key.
    pub async fn start(
        gateway_binary: &Path,
        mock_binary: &Path,
        redis_url: &str,
        stream: &str,
    ) -> anyhow::Result<Self> {
        let logs = std::env::temp_dir().join(format!("aggbench-probe-{}", std::process::id()));
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let mock_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let gateway_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let admin_token = format!("aggbench-{}", uuid::Uuid::new_v4().simple());

        let mut mock = Command::new(mock_binary);
        mock.args(["--listen", &mock_addr.to_string(), "--canned"]);
        let mock = spawn("mock-upstream", mock, &logs, &[("RUST_LOG", "warn")])?;
        let spool = logs.join("spool").display().to_string();
        let mut gateway = Command::new(gateway_binary);
        gateway.envs(passed_through());
        let gateway = spawn(
            "gateway",
            gateway,
            &logs,
            &[
                ("GATEWAY_SPOOL_DIR", &spool),
                ("REDIS_URL", redis_url),
                ("METER_STREAM", stream),
                // One partition: the key's limiter state is then in the stream name's own
                // slot, whatever id the gateway gives the key, so the caller can place it.
                ("METER_PARTITIONS", "1"),
                ("ADMIN_TOKEN", &admin_token),
                ("GATEWAY_LISTEN", &gateway_addr.to_string()),
                // Not what is measured, and a line per request would cost the cores.
                ("METER_ACCESS_LOG", "false"),
                // Every request runs the limit script, as for a key whose limits are too small
                // for leased blocks: that check is what must not wait behind a commit. With
                // blocks most requests would not reach Redis at all, and the window would also
                // hold a block's unused entries, so it could not be checked against those sent.
                ("GATEWAY_LIMIT_BLOCK_MS", "0"),
                ("RUST_LOG", "warn"),
            ],
        )?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the probe's HTTP client")?;
        let mut probe = Self {
            gateway,
            mock,
            logs,
            base_url: format!("http://{gateway_addr}"),
            admin_token,
            http,
            key_id: String::new(),
            secret: String::new(),
            stream: stream.to_owned(),
        };
        probe.wait_ready(Duration::from_secs(30)).await?;
        probe.provision(&format!("http://{mock_addr}")).await?;
        Ok(probe)
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let ready = format!("{}/readyz", self.base_url);
        loop {
            let answered = self.http.get(&ready).send().await;
            if answered.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the probe's gateway was not ready within {within:?}; its log:\n{}",
                    log_tail(&self.logs.join("gateway.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails, with the end of its log, if the gateway or the mock has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, guard) in [
            ("gateway", &mut self.gateway),
            ("mock-upstream", &mut self.mock),
        ] {
            guard.check_alive().with_context(|| {
                format!(
                    "the probe's {name}; its log ends with:\n{}",
                    log_tail(&self.logs.join(format!("{name}.log")))
                )
            })?;
        }
        Ok(())
    }

    async fn provision(&mut self, mock_url: &str) -> anyhow::Result<()> {
        let account = json!({
            "name": "mock", "provider": "anthropic", "base_url": mock_url, "api_key": "sk-mock",
        });
        self.admin_post("/admin/accounts", &account).await?;
        let key = self
            .admin_post(
                "/admin/keys",
                &json!({
                    "name": "aggbench-probe",
                    "limits": [
                        {"metric": "requests", "max": 1_000_000_000u64, "window_secs": REQUESTS_WINDOW_SECS},
                        {"metric": "tokens", "max": 1_000_000_000_000u64, "window_secs": 3600},
                        {"metric": "cost_usd", "max": 1_000_000.0, "window_secs": 86400}],
                    "budget_usd": 1_000_000_000.0,
                    "max_concurrency": 10_000,
                }),
            )
            .await?;
        self.secret = key["key"]
            .as_str()
            .context("the created key has no `key`")?
            .to_owned();
        self.key_id = key["id"]
            .as_str()
            .context("the created key has no `id`")?
            .to_owned();
        Ok(())
    }

    async fn admin_post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(&self.admin_token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        ensure!(status.is_success(), "POST {path}: {status}: {text}");
        serde_json::from_str(&text).with_context(|| format!("POST {path}: not JSON: {text}"))
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// What the key's `requests` window holds now, read by the admin API from Redis: the
    /// proof that every probe request went through the limiter script.
    pub async fn requests_in_window(&self) -> anyhow::Result<u64> {
        let path = format!("/admin/keys/{}", self.key_id);
        let key: Value = self
            .http
            .get(format!("{}{path}", self.base_url))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?
            .error_for_status()?
            .json()
            .await
            .with_context(|| format!("GET {path}: not JSON"))?;
        key["usage"]
            .as_array()
            .and_then(|usage| usage.iter().find(|u| u["metric"] == "requests"))
            .and_then(|u| u["used"].as_u64())
            .with_context(|| format!("GET {path}: no `requests` usage in {key}"))
    }

    /// CPU time of the gateway and the mock together, in clock ticks: what the probe takes
    /// from the cores the aggregator runs on.
    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        Ok(probes::cpu_ticks(self.gateway.pid())? + probes::cpu_ticks(self.mock.pid())?)
    }

    pub async fn counters(&self) -> anyhow::Result<GatewayCounters> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await
            .context("GET the gateway's /metrics")?
            .error_for_status()?
            .text()
            .await?;
        Ok(GatewayCounters::parse(&text))
    }

    /// Sends one request and fails unless it gets a 200: a broken setup shows before any phase.
    pub async fn preflight(&self) -> anyhow::Result<()> {
        let request = self.request()?;
        let sample = send(&self.http, &request).await;
        match sample.error {
            None => Ok(()),
            Some(error) => bail!("the probe's first request failed: {error}"),
        }
    }

    fn request(&self) -> anyhow::Result<reqwest::Request> {
        self.http
            .post(format!("{}/v1/messages", self.base_url))
            .header("x-api-key", &self.secret)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(
                json!({
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "ping"}],
                })
                .to_string(),
            )
            .build()
            .context("building the probe request")
    }

    /// Starts sending the key's requests, one at a time, one every [`PACE`].
    pub async fn start_requests(&self) -> anyhow::Result<Requests> {
        let request = self.request()?;
        let http = self.http.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let before = self.counters().await?;
        let ticks = self.cpu_ticks()?;
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let started = Instant::now();
            let mut ticker = tokio::time::interval(PACE);
            // A request slower than the pace is followed by the next at once, then the pace
            // resumes from there: never two in flight, never a burst to catch up.
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            while !stopped.load(Ordering::Relaxed) {
                ticker.tick().await;
                let at = started.elapsed();
                samples.push((at, send(&http, &request).await));
            }
            samples
        });
        Ok(Requests {
            stop,
            task,
            before,
            ticks,
        })
    }

    /// Stops the requests started by [`ProbeGateway::start_requests`] and sums them up.
    pub async fn finish(&self, requests: Requests) -> anyhow::Result<RequestSummary> {
        requests.stop.store(true, Ordering::Relaxed);
        let samples = requests.task.await.context("the probe request task")?;
        let counters = self.counters().await?.since(requests.before);
        let ticks = self.cpu_ticks()?.saturating_sub(requests.ticks);
        let mut latencies: Vec<Duration> = samples.iter().map(|(_, s)| s.latency).collect();
        latencies.sort_unstable();
        let failures: Vec<&String> = samples
            .iter()
            .filter_map(|(_, s)| s.error.as_ref())
            .collect();
        let mut slowest: Vec<(Duration, Duration)> =
            samples.iter().map(|(at, s)| (*at, s.latency)).collect();
        slowest.sort_unstable_by_key(|(_, latency)| std::cmp::Reverse(*latency));
        slowest.truncate(SLOWEST);
        slowest.sort_unstable();
        Ok(RequestSummary {
            latency: probes::summarise(&latencies),
            slowest,
            failed: failures.len(),
            first_failure: failures.first().map(|e| (*e).clone()),
            counters,
            cpu_secs: ticks as f64 / probes::clock_ticks_per_sec() as f64,
        })
    }
}

/// Requests in flight on a task of their own.
pub struct Requests {
    stop: Arc<AtomicBool>,
    /// Each request's start since the first's, and what it saw.
    task: tokio::task::JoinHandle<Vec<(Duration, Sample)>>,
    before: GatewayCounters,
    ticks: u64,
}

struct Sample {
    /// Send until the whole body has arrived.
    latency: Duration,
    /// Anything but a 200 with a complete body.
    error: Option<String>,
}

/// What one phase's requests saw.
#[derive(Debug, Clone)]
pub struct RequestSummary {
    /// Over every request, failed ones included (`pings` is their count).
    pub latency: WaitSummary,
    /// The [`SLOWEST`] slowest requests, in the order sent: (start since the phase's first,
    /// latency). Their spacing tells a periodic cause (a cache refresh) from commits.
    pub slowest: Vec<(Duration, Duration)>,
    pub failed: usize,
    pub first_failure: Option<String>,
    /// The gateway's counters over the phase.
    pub counters: GatewayCounters,
    /// CPU seconds the gateway and the mock used over the phase.
    pub cpu_secs: f64,
}

async fn send(http: &reqwest::Client, request: &reqwest::Request) -> Sample {
    let started = Instant::now();
    let Some(request) = request.try_clone() else {
        return Sample {
            latency: Duration::ZERO,
            error: Some("the request body cannot be cloned".into()),
        };
    };
    let error = match http.execute(request).await {
        Ok(response) => {
            let status = response.status();
            match response.bytes().await {
                Ok(_) if status == reqwest::StatusCode::OK => None,
                Ok(body) => Some(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                )),
                Err(e) => Some(format!("{status}, body cut: {e}")),
            }
        }
        Err(e) => Some(format!("transport: {e}")),
    };
    Sample {
        latency: started.elapsed(),
        error,
    }
}

/// Starts `command` with exactly `env` (plus `PATH`), stdout and stderr to `<logs>/<name>.log`.
fn spawn(
    name: &'static str,
    mut command: Command,
    logs: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<ChildGuard> {
    let log = logs.join(format!("{name}.log"));
    let stdout =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let stderr = stdout.try_clone()?;
    // Nothing from our shell (a GATEWAY_CONFIG, say) may change what is measured, beyond the
    // settings the caller set on `command` on purpose.
    let set: Vec<(std::ffi::OsString, std::ffi::OsString)> = command
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    let child = command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(set)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(ChildGuard::new(name, child))
}

/// The [`PASSED_THROUGH`] settings set in our environment.
pub fn passed_through() -> Vec<(&'static str, String)> {
    PASSED_THROUGH
        .into_iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_counters_are_read_by_exact_name_and_labels() {
        let text = "# TYPE meter_gateway_redis_round_trips_total counter\n\
                    meter_gateway_redis_round_trips_total 42\n\
                    meter_gateway_limits_failed_open_total 0\n\
                    meter_gateway_limit_spend_checks_total{source=\"cache\"} 7\n\
                    meter_gateway_limit_spend_checks_total{source=\"redis\"} 3\n";
        let c = GatewayCounters::parse(text);
        assert_eq!(
            (c.round_trips, c.failed_open, c.spend_reads, c.spend_cached),
            (42, 0, 3, 7)
        );
    }
}
