//! Per-key admission limits that hold across every gateway replica: `requests` per rolling
//! window, and `max_concurrency`.
//!
//! Both live in Redis and are checked and counted by one Lua script, so all checks of a request
//! cost one round trip and N replicas together admit exactly `max`.
//! - A `requests` window is a sliding log: a sorted set of the admitted requests' times. It is
//!   exact (no boundary burst as with fixed windows) and costs memory in proportion to `max`.
//! - Concurrency is a sorted set of leases scored by their expiry. A lease is removed when its
//!   response ends (stream included) or the client leaves, and is renewed while it is held, so
//!   the leases of a gateway that dies expire within `LEASE_TTL`.
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
use crate::store::KeyRecord;

/// A lease not renewed for this long is free again (CONTRACT.md §7.4 asks for 2 minutes).
pub const LEASE_TTL: Duration = Duration::from_secs(60);
const RENEW_EVERY: Duration = Duration::from_secs(15);
/// A concurrency slot frees when some response ends, which cannot be predicted; clients retry
/// after this.
const CONCURRENCY_RETRY_AFTER_SECS: u64 = 1;

const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local nwin = tonumber(ARGV[2])
local member = ARGV[3]
local counts = {}
local pos = 4
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
local cc_max = tonumber(ARGV[pos]); local ttl = tonumber(ARGV[pos + 1])
if cc_max >= 0 then
  local k = KEYS[nwin + 1]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  if redis.call('ZCARD', k) >= cc_max then return {0, 0, 0} end
  redis.call('ZADD', k, now + ttl, member)
  redis.call('PEXPIRE', k, ttl * 2)
end
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
    keeper: Arc<Keeper>,
    metrics: Arc<Metrics>,
}

pub struct KeeperTask {
    conn: ConnectionManager,
    keeper: Arc<Keeper>,
    releases: mpsc::UnboundedReceiver<(String, String)>,
    shutdown: watch::Receiver<bool>,
}

impl Limiter {
    pub fn new(
        conn: ConnectionManager,
        keyspace: Keyspace,
        policy: RedisDownPolicy,
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
        };
        let limiter = Self {
            conn,
            keyspace,
            script: Script::new(SCRIPT),
            policy,
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
        if windows.is_empty() && key.max_concurrency.is_none() {
            return Ok(Admission::default());
        }
        let cc_key = self.keyspace.key(&format!("cc:{}", key.id));
        let mut invocation = self.script.prepare_invoke();
        for (window_ms, _) in &windows {
            invocation.key(
                self.keyspace
                    .key(&format!("rl:{}:{}", key.id, window_ms / 1000)),
            );
        }
        invocation.key(&cc_key);
        invocation.arg(now_ms).arg(windows.len()).arg(request_id);
        for (window_ms, max) in &windows {
            invocation.arg(*window_ms).arg(*max);
        }
        invocation
            .arg(key.max_concurrency.map_or(-1, i64::from))
            .arg(LEASE_TTL.as_millis() as u64);
        self.metrics.redis_round_trips.inc();
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = match invocation.invoke_async(&mut conn).await {
            Ok(reply) => reply,
            Err(e) => return self.redis_down(e),
        };
        match reply.as_slice() {
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
                    self.keeper.hold(request_id, &cc_key);
                    LeaseGuard {
                        id: request_id.to_owned(),
                        key: cc_key.clone(),
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
            [0, window, wait_ms] => {
                let index = usize::try_from(*window - 1).unwrap_or(0);
                let (window_ms, max) = windows.get(index).copied().unwrap_or_default();
                Err(GatewayError::RateLimited {
                    limit: format!("{max} requests per {} s", window_ms / 1000),
                    // Round up: arriving a moment early would be refused again.
                    retry_after_secs: Some(
                        u64::try_from(*wait_ms).unwrap_or(0).div_ceil(1000).max(1),
                    ),
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

impl KeeperTask {
    /// Releases finished leases at once and renews held ones until shutdown.
    pub async fn run(mut self) {
        let mut renew = tokio::time::interval(RENEW_EVERY);
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
        let until = chrono::Utc::now().timestamp_millis() + LEASE_TTL.as_millis() as i64;
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
                .arg(LEASE_TTL.as_millis() as u64 * 2)
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut self.conn).await {
            tracing::warn!(error = %e, leases = held.len(), "renewing concurrency leases failed");
        }
    }
}
