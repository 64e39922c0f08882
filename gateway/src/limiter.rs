//! Per-key admission limits that hold across every gateway replica: `requests` per rolling
//! window, and `max_concurrency`.
//!
//! Both live in Redis and are checked and counted by one Lua script, so all checks of a request
//! cost one round trip and N replicas together admit exactly `max`.
//! - A `requests` window is a sliding log: a sorted set of the admitted requests' times. It is
//!   exact (no boundary burst as with fixed windows) and costs memory in proportion to `max`.
//! - Concurrency is a sorted set of leases scored by their expiry. A lease is removed when its
//!   response ends (stream included) or the client leaves, and is renewed while it is held, so
//!   the leases of a gateway that dies expire within the lease TTL (default 60 s; CONTRACT.md
//!   §7.4 asks for 2 minutes).
//!
//! When Redis cannot be reached, the policy decides: `open` admits (and counts the decision),
//! `closed` refuses. Never a per-replica fallback, which would multiply the limit by the number
//! of replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use shared::Keyspace;
use tokio::sync::{mpsc, watch};

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::spend;
use crate::store::{KeyRecord, Limit};

/// A concurrency slot frees when some response ends, which cannot be predicted; clients retry
/// after this.
const CONCURRENCY_RETRY_AFTER_SECS: u64 = 1;

const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local nwin = tonumber(ARGV[2])
local member = ARGV[3]
local pos = 4

-- 1. requests windows (read only here)
local counts = {}
for i = 1, nwin do
  local window = tonumber(ARGV[pos]); local max = tonumber(ARGV[pos + 1]); pos = pos + 2
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local n = redis.call('ZCARD', KEYS[i])
  if n >= max then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local wait = window
    if oldest[2] then wait = tonumber(oldest[2]) + window - now end
    return {0, i, wait}
  end
  counts[i] = n
end
local cc_max = tonumber(ARGV[pos]); local ttl = tonumber(ARGV[pos + 1]); pos = pos + 2

-- 2. token and cost windows from the aggregator's spend counters: fields oldest first, each
--    with the milliseconds until it leaves the window
local nspend = tonumber(ARGV[pos]); pos = pos + 1
for c = 1, nspend do
  local max = tonumber(ARGV[pos]); local nf = tonumber(ARGV[pos + 1]); pos = pos + 2
  local values = {}
  local sum = 0
  for f = 1, nf do
    local v = tonumber(redis.call('HGET', KEYS[tonumber(ARGV[pos])], ARGV[pos + 1])) or 0
    values[f] = {v, tonumber(ARGV[pos + 2])}
    sum = sum + v
    pos = pos + 3
  end
  if sum >= max then
    local wait = 0
    for f = 1, nf do
      sum = sum - values[f][1]
      wait = values[f][2]
      if sum < max then break end
    end
    return {0, -c, wait}
  end
end

-- 3. lifetime budget, nanodollars
local bk = tonumber(ARGV[pos]); local budget = tonumber(ARGV[pos + 1]); pos = pos + 2
if bk > 0 then
  local v = redis.call('HMGET', KEYS[bk], 'ch', 'cl')
  local spent = (tonumber(v[1]) or 0) + math.ceil((tonumber(v[2]) or 0) / 1e9)
  if spent >= budget then return {0, -1000000, 0} end
end

-- 4. concurrency: take a lease
if cc_max >= 0 then
  local k = KEYS[nwin + 1]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  if redis.call('ZCARD', k) >= cc_max then return {0, 0, 0} end
  redis.call('ZADD', k, now + ttl, member)
  redis.call('PEXPIRE', k, ttl * 2)
end

-- 5. admitted: count the request in every window
local out = {1}
pos = 4
for i = 1, nwin do
  local window = tonumber(ARGV[pos]); pos = pos + 2
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], window)
  local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  out[#out + 1] = counts[i] + 1
  out[#out + 1] = tonumber(oldest[2]) + window - now
end
return out
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisDownPolicy {
    Open,
    Closed,
}

/// Where the most constrained `requests` window of an admitted request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBudget {
    pub limit: u64,
    pub remaining: u64,
    /// Until the oldest counted request leaves the window.
    pub reset_ms: u64,
}

#[derive(Debug, Default)]
pub struct Admission {
    pub budget: Option<RequestBudget>,
    pub lease: Option<LeaseGuard>,
}

/// A concurrency slot; released when dropped.
#[derive(Debug)]
pub struct LeaseGuard {
    id: String,
    key: String,
    keeper: Arc<Keeper>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.keeper.release(&self.id, &self.key);
    }
}

/// The leases this replica holds, renewed in the background and released on drop.
#[derive(Debug)]
struct Keeper {
    held: Mutex<HashMap<String, String>>,
    releases: mpsc::UnboundedSender<(String, String)>,
}

impl Keeper {
    fn hold(&self, id: &str, key: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.insert(id.to_owned(), key.to_owned());
        }
    }

    fn release(&self, id: &str, key: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(id);
        }
        let _ = self.releases.send((id.to_owned(), key.to_owned()));
    }
}

pub struct Limiter {
    conn: ConnectionManager,
    keyspace: Keyspace,
    script: Script,
    policy: RedisDownPolicy,
    /// A lease not renewed for this long is free again.
    lease_ttl: Duration,
    keeper: Arc<Keeper>,
    metrics: Arc<Metrics>,
}

pub struct KeeperTask {
    conn: ConnectionManager,
    keeper: Arc<Keeper>,
    releases: mpsc::UnboundedReceiver<(String, String)>,
    shutdown: watch::Receiver<bool>,
    lease_ttl: Duration,
}

impl Limiter {
    pub fn new(
        conn: ConnectionManager,
        keyspace: Keyspace,
        policy: RedisDownPolicy,
        lease_ttl: Duration,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, KeeperTask) {
        let (tx, rx) = mpsc::unbounded_channel();
        let keeper = Arc::new(Keeper {
            held: Mutex::new(HashMap::new()),
            releases: tx,
        });
        let task = KeeperTask {
            conn: conn.clone(),
            keeper: Arc::clone(&keeper),
            releases: rx,
            shutdown,
            lease_ttl,
        };
        let limiter = Self {
            conn,
            keyspace,
            script: Script::new(SCRIPT),
            policy,
            lease_ttl,
            keeper,
            metrics,
        };
        (limiter, task)
    }

    /// Checks and counts one request of `key`. `request_id` is unique per request.
    pub async fn admit(
        &self,
        key: &KeyRecord,
        request_id: &str,
        now_ms: i64,
    ) -> Result<Admission, GatewayError> {
        let windows: Vec<(u64, u64)> = key
            .limits
            .iter()
            .filter(|l| l.metric == "requests")
            .map(|l| (l.window_secs.saturating_mul(1000), l.max as u64))
            .collect();
        let spend: Vec<&Limit> = key
            .limits
            .iter()
            .filter(|l| matches!(l.metric.as_str(), "tokens" | "cost_usd"))
            .collect();
        if windows.is_empty()
            && spend.is_empty()
            && key.budget_usd.is_none()
            && key.max_concurrency.is_none()
        {
            return Ok(Admission::default());
        }
        let cc_key = self.keyspace.key(&format!("cc:{}", key.id));
        let spend_prefix = self.keyspace.key(&format!("sp:{}", key.id));
        let mut keys: Vec<String> = windows
            .iter()
            .map(|(window_ms, _)| {
                self.keyspace
                    .key(&format!("rl:{}:{}", key.id, window_ms / 1000))
            })
            .collect();
        keys.push(cc_key.clone());
        let mut key_index = |name: String| -> usize {
            match keys.iter().position(|k| *k == name) {
                Some(i) => i + 1,
                None => {
                    keys.push(name);
                    keys.len()
                }
            }
        };

        let mut invocation = self.script.prepare_invoke();
        invocation.arg(now_ms).arg(windows.len()).arg(request_id);
        for (window_ms, max) in &windows {
            invocation.arg(*window_ms).arg(*max);
        }
        invocation
            .arg(key.max_concurrency.map_or(-1, i64::from))
            .arg(self.lease_ttl.as_millis() as u64);
        invocation.arg(spend.len());
        for limit in &spend {
            let window_ms =
                i64::try_from(limit.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4);
            let (prefix, max) = match limit.metric.as_str() {
                "tokens" => ('t', limit.max as i64),
                _ => ('c', nanodollars(limit.max)),
            };
            let mut fields: Vec<(usize, String, i64)> = Vec::new();
            for read in spend::window_reads(now_ms, window_ms) {
                let k = key_index(format!("{spend_prefix}{}", read.hash_suffix));
                let width = bucket_width(&read.hash_suffix);
                for bucket in &read.buckets {
                    // When this bucket's spend leaves the window.
                    let leaves_in = (bucket + width + window_ms - now_ms).max(0);
                    fields.push((k, format!("{prefix}{bucket}"), leaves_in));
                }
            }
            fields.sort_by_key(|(_, _, leaves)| *leaves);
            invocation.arg(max).arg(fields.len());
            for (k, field, leaves) in fields {
                invocation.arg(k).arg(field).arg(leaves);
            }
        }
        match key.budget_usd {
            Some(budget) => invocation
                .arg(key_index(spend_prefix.clone()))
                .arg(nanodollars(budget)),
            None => invocation.arg(0).arg(0),
        };
        for k in &keys {
            invocation.key(k);
        }

        self.metrics.redis_round_trips.inc();
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = match invocation.invoke_async(&mut conn).await {
            Ok(reply) => reply,
            Err(e) => return self.redis_down(e),
        };
        self.decide(key, &windows, &spend, &reply, request_id, &cc_key)
    }

    fn decide(
        &self,
        key: &KeyRecord,
        windows: &[(u64, u64)],
        spend: &[&Limit],
        reply: &[i64],
        request_id: &str,
        cc_key: &str,
    ) -> Result<Admission, GatewayError> {
        // Round up: arriving a moment early would be refused again.
        let secs_up = |ms: i64| Some(u64::try_from(ms).unwrap_or(0).div_ceil(1000).max(1));
        match reply {
            [1, counts @ ..] => {
                let budget = windows
                    .iter()
                    .zip(counts.chunks(2))
                    .filter_map(|((_, max), c)| {
                        let used = u64::try_from(*c.first()?).ok()?;
                        Some(RequestBudget {
                            limit: *max,
                            remaining: max.saturating_sub(used),
                            reset_ms: u64::try_from(*c.get(1)?).unwrap_or(0),
                        })
                    })
                    .min_by_key(|b| b.remaining);
                let lease = key.max_concurrency.map(|_| {
                    self.keeper.hold(request_id, cc_key);
                    LeaseGuard {
                        id: request_id.to_owned(),
                        key: cc_key.to_owned(),
                        keeper: Arc::clone(&self.keeper),
                    }
                });
                Ok(Admission { budget, lease })
            }
            [0, 0, _] => Err(GatewayError::RateLimited {
                limit: format!(
                    "max_concurrency {} reached",
                    key.max_concurrency.unwrap_or(0)
                ),
                retry_after_secs: Some(CONCURRENCY_RETRY_AFTER_SECS),
            }),
            [0, -1_000_000, _] => Err(GatewayError::QuotaExceeded {
                limit: format!("budget_usd {} spent", key.budget_usd.unwrap_or(0.0)),
                retry_after_secs: None,
            }),
            [0, index, wait_ms] if *index < 0 => {
                let Some(limit) = usize::try_from(-index - 1).ok().and_then(|i| spend.get(i))
                else {
                    return Err(GatewayError::InvalidRequest("limiter failure".into()));
                };
                let what = format!("{} {} per {} s", limit.max, limit.metric, limit.window_secs);
                let retry_after_secs = secs_up(*wait_ms);
                Err(if limit.metric == "cost_usd" {
                    GatewayError::QuotaExceeded {
                        limit: what,
                        retry_after_secs,
                    }
                } else {
                    GatewayError::RateLimited {
                        limit: what,
                        retry_after_secs,
                    }
                })
            }
            [0, window, wait_ms] => {
                let index = usize::try_from(*window - 1).unwrap_or(0);
                let (window_ms, max) = windows.get(index).copied().unwrap_or_default();
                Err(GatewayError::RateLimited {
                    limit: format!("{max} requests per {} s", window_ms / 1000),
                    retry_after_secs: secs_up(*wait_ms),
                })
            }
            other => {
                tracing::error!(reply = ?other, "unexpected limiter reply");
                Err(GatewayError::InvalidRequest("limiter failure".into()))
            }
        }
    }

    fn redis_down(&self, e: redis::RedisError) -> Result<Admission, GatewayError> {
        tracing::warn!(error = %e, policy = ?self.policy, "limits unavailable: Redis unreachable");
        match self.policy {
            RedisDownPolicy::Open => {
                self.metrics.limits_failed_open.inc();
                Ok(Admission::default())
            }
            RedisDownPolicy::Closed => Err(GatewayError::Store(e)),
        }
    }
}

/// USD → whole nanodollars (limits are compared in the unit the spend counters use).
fn nanodollars(usd: f64) -> i64 {
    (usd * 1e9).round() as i64
}

fn bucket_width(hash_suffix: &str) -> i64 {
    match hash_suffix.as_bytes().get(1) {
        Some(b'd') => 86_400_000,
        Some(b'h') => 3_600_000,
        _ => 60_000,
    }
}

impl KeeperTask {
    /// Releases finished leases at once and renews held ones until shutdown.
    pub async fn run(mut self) {
        // Renewed four times per TTL, so a slow round trip or two cannot let a live lease lapse.
        let mut renew = tokio::time::interval(self.lease_ttl / 4);
        loop {
            let release = tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => break,
                Some(release) = self.releases.recv() => Some(release),
                _ = renew.tick() => None,
            };
            match release {
                Some((id, key)) => {
                    let result: redis::RedisResult<()> = redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&id)
                        .query_async(&mut self.conn)
                        .await;
                    if let Err(e) = result {
                        // It expires by itself within the lease TTL.
                        tracing::warn!(error = %e, "releasing a concurrency lease failed");
                    }
                }
                None => self.renew().await,
            }
        }
    }

    async fn renew(&mut self) {
        let held: Vec<(String, String)> = match self.keeper.held.lock() {
            Ok(held) => held
                .iter()
                .map(|(id, key)| (id.clone(), key.clone()))
                .collect(),
            Err(_) => return,
        };
        if held.is_empty() {
            return;
        }
        let until = chrono::Utc::now().timestamp_millis() + self.lease_ttl.as_millis() as i64;
        let mut pipe = redis::pipe();
        for (id, key) in &held {
            pipe.cmd("ZADD")
                .arg(key)
                .arg("XX")
                .arg(until)
                .arg(id)
                .ignore();
            pipe.cmd("PEXPIRE")
                .arg(key)
                .arg(self.lease_ttl.as_millis() as u64 * 2)
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut self.conn).await {
            tracing::warn!(error = %e, leases = held.len(), "renewing concurrency leases failed");
        }
    }
}
