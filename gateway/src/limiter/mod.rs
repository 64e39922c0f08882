//! Per-key admission limits that hold across every gateway replica: `requests`, `tokens` and
//! `cost_usd` per rolling window, the lifetime budget, and `max_concurrency`.
//!
//! All live in Redis and are checked and counted by one Lua script, so all checks of a request
//! cost one round trip and N replicas together admit exactly `max`.
//! - A `requests` window is a sliding log: a sorted set of the admitted requests' times. It is
//!   exact (no boundary burst as with fixed windows) and costs memory in proportion to `max`.
//! - Concurrency is a sorted set of leases scored by their expiry. A lease is removed when its
//!   response ends (stream included) or the client leaves, and is renewed while it is held, so
//!   the leases of a gateway that dies expire within the lease TTL (default 60 s; CONTRACT.md
//!   §7.4 asks for 2 minutes). Every attempt is timed when its script is sent, not when the
//!   request arrived: a request whose body took longer than the TTL to upload would otherwise
//!   get a lease that is already expired, and a `requests` window entry dated in the past.
//! - The keeper task renews and releases until the last lease is gone: after a graceful
//!   shutdown begins, requests still drain and their leases must hold, then be released.
//! - An attempt whose script may be taking a lease is covered before the script is sent: if the
//!   caller goes away, or Redis answers with an error or after the response timeout, the lease
//!   the script may have taken is released (`PendingLease`).
//!
//! - A request of a key with `concurrency_wait_ms` that finds no free slot joins the key's wait
//!   queue, a sorted set in the same hash tag scored by its deadline, and the script admits a
//!   request only while the free slots outnumber the waiters queued before it: FIFO across every
//!   replica (to within the replicas' clock skew), with no barging by new arrivals. A waiter
//!   retries when this replica releases a lease of the key (`wait`'s local wake-ups) and on a
//!   short re-check interval for releases elsewhere; an entry left by a dead replica expires at
//!   its deadline.
//!
//! - `tokens` and `cost_usd` windows and the budget are read from the aggregator's spend
//!   counters by the same script, but only when this replica's cached sums for the key are
//!   older than `--spend-cache-ms` (default 200 ms) or at a limit (`spend_cache`): the counters
//!   change only when the aggregator commits, and enforcement may lag by < 1 s. A key that has
//!   no `requests` window and no `max_concurrency` then costs no round trip at all.
//!
//! When Redis cannot be reached, the policy decides: `open` admits (and counts the decision),
//! `closed` refuses. Never a per-replica fallback, which would multiply the limit by the number
//! of replicas.

mod check;
mod spend_cache;
mod usage;
mod wait;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use shared::Keyspace;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::store::KeyRecord;

pub use check::{Attempt, Check, RequestBudget, SCRIPT, Spent, Verdict, is_limited};
pub use spend_cache::SpendCache;
pub use usage::LimitUsage;

/// How often the first waiter of a key on this replica re-checks for a slot that another
/// replica released (its own releases wake it at once). The others re-check more rarely, as a
/// safety net: they are behind it.
const RECHECK_FIRST: Duration = Duration::from_millis(100);
const RECHECK_OTHERS: Duration = Duration::from_millis(500);

/// Releases sent to Redis in one pipeline at most.
const RELEASE_BATCH: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisDownPolicy {
    Open,
    Closed,
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

/// A lease that the script of an attempt in flight may be taking. Armed before the script is
/// sent; unless the reply shows the script took none (disarmed) or the lease becomes a
/// [`LeaseGuard`], dropping it releases the lease: the caller was cancelled mid-attempt (the
/// client hung up), or Redis answered with an error or after the response timeout, and the
/// script may still run. ZREM of an absent lease is harmless, and the release goes out on the
/// same connection as the script, so Redis runs it after the script.
struct PendingLease<'a> {
    keeper: &'a Arc<Keeper>,
    id: &'a str,
    key: String,
    armed: bool,
}

impl<'a> PendingLease<'a> {
    fn arm(keeper: &'a Arc<Keeper>, id: &'a str, key: String) -> Self {
        Self {
            keeper,
            id,
            key,
            armed: true,
        }
    }

    /// The script took the lease: from now on the request holds it.
    fn hold(mut self) -> LeaseGuard {
        self.armed = false;
        self.keeper.hold(self.id, &self.key);
        LeaseGuard {
            id: self.id.to_owned(),
            key: std::mem::take(&mut self.key),
            keeper: Arc::clone(self.keeper),
        }
    }

    /// The script answered without taking a lease.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingLease<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.keeper.releases.send(Release::Lease(
                self.id.to_owned(),
                std::mem::take(&mut self.key),
            ));
        }
    }
}

/// What the keeper task removes from Redis.
#[derive(Debug)]
enum Release {
    /// A lease (request id, lease set); its key's first local waiter is woken once it is gone.
    Lease(String, String),
    /// A wait-queue entry (request id, queue) of a request that stopped waiting.
    QueueEntry(String, String),
}

/// The leases this replica holds, renewed in the background and released on drop. Held by
/// the limiter and by every lease, but not by the keeper task: its release channel closes when
/// the last of them is gone, which is how the task knows it is done.
#[derive(Debug)]
struct Keeper {
    ledger: Arc<Ledger>,
    releases: mpsc::UnboundedSender<Release>,
}

/// What the keeper task shares with the limiter and its leases.
#[derive(Debug, Default)]
struct Ledger {
    /// Lease id → lease set, for renewal.
    held: Mutex<HashMap<String, String>>,
    room: Arc<wait::Room>,
}

impl Keeper {
    fn hold(&self, id: &str, key: &str) {
        if let Ok(mut held) = self.ledger.held.lock() {
            held.insert(id.to_owned(), key.to_owned());
        }
    }

    fn release(&self, id: &str, key: &str) {
        if let Ok(mut held) = self.ledger.held.lock() {
            held.remove(id);
        }
        let _ = self
            .releases
            .send(Release::Lease(id.to_owned(), key.to_owned()));
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
    spend_cache: SpendCache,
    metrics: Arc<Metrics>,
}

/// Renews the held leases and releases finished ones. It has no shutdown signal of its own:
/// it runs until the limiter and the last lease are dropped, i.e. until the server has drained
/// every request after a graceful shutdown began, and releases everything queued before it
/// returns.
pub struct KeeperTask {
    conn: ConnectionManager,
    ledger: Arc<Ledger>,
    releases: mpsc::UnboundedReceiver<Release>,
    lease_ttl: Duration,
    metrics: Arc<Metrics>,
}

/// A request waiting for a concurrency slot. Dropping it (admitted, timed out, refused for
/// another limit, or the client gone) leaves the local room and the Redis queue and settles
/// the metrics, so a cancelled wait leaks nothing.
struct Waiting<'a> {
    place: wait::Place,
    limiter: &'a Limiter,
    request_id: &'a str,
    queue_key: String,
    /// Since when the request has been in the Redis queue.
    since: Option<Instant>,
    /// An attempt, which may queue the request in Redis, has been sent and not answered.
    attempting: bool,
    outcome: Option<WaitOutcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitOutcome {
    Admitted,
    TimedOut,
    /// Refused for another limit while waiting.
    Refused,
}

impl Waiting<'_> {
    fn queued(&mut self) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            self.limiter.metrics.concurrency_waiting.inc();
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(since) = self.since {
            let m = &self.limiter.metrics;
            m.concurrency_waiting.dec();
            m.concurrency_wait.observe(since.elapsed());
            match self.outcome {
                Some(WaitOutcome::Admitted) => m.concurrency_wait_admitted.inc(),
                Some(WaitOutcome::TimedOut) => m.concurrency_wait_timeouts.inc(),
                Some(WaitOutcome::Refused) => m.concurrency_wait_refused.inc(),
                None => m.concurrency_wait_cancelled.inc(),
            }
        }
        // An admitted request's entry was removed by the script that admitted it; any other
        // (even one whose first attempt was cancelled mid-flight, so `since` is unset) would
        // block the key's later requests until its deadline.
        if (self.since.is_some() || self.attempting) && self.outcome != Some(WaitOutcome::Admitted)
        {
            let _ = self.limiter.keeper.releases.send(Release::QueueEntry(
                self.request_id.to_owned(),
                std::mem::take(&mut self.queue_key),
            ));
        }
    }
}

impl Limiter {
    pub fn new(
        conn: ConnectionManager,
        keyspace: Keyspace,
        policy: RedisDownPolicy,
        lease_ttl: Duration,
        spend_cache: Duration,
        metrics: Arc<Metrics>,
    ) -> (Self, KeeperTask) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ledger = Arc::new(Ledger::default());
        let keeper = Arc::new(Keeper {
            ledger: Arc::clone(&ledger),
            releases: tx,
        });
        let task = KeeperTask {
            conn: conn.clone(),
            ledger,
            releases: rx,
            lease_ttl,
            metrics: Arc::clone(&metrics),
        };
        let limiter = Self {
            conn,
            keyspace,
            script: Script::new(SCRIPT),
            policy,
            lease_ttl,
            keeper,
            spend_cache: SpendCache::new(spend_cache),
            metrics,
        };
        (limiter, task)
    }

    /// Checks and counts one request of `key`, as of now: call it once the request is ready
    /// to go (body read and validated). `request_id` is unique per request. With
    /// `concurrency_wait_ms`, a request that finds every concurrency slot taken waits (FIFO)
    /// up to that long for one before it is refused.
    pub async fn admit(
        &self,
        key: &KeyRecord,
        request_id: &str,
    ) -> Result<Admission, GatewayError> {
        if !is_limited(key) {
            return Ok(Admission::default());
        }
        if key.max_concurrency.is_none() || key.concurrency_wait_ms == 0 {
            return match self.attempt(key, request_id, 0).await? {
                (Verdict::Full { .. }, _) => Err(check::concurrency_refusal(key, None)),
                (_, admission) => Ok(admission),
            };
        }
        self.admit_waiting(key, request_id).await
    }

    async fn admit_waiting(
        &self,
        key: &KeyRecord,
        request_id: &str,
    ) -> Result<Admission, GatewayError> {
        let wait_ms = key.concurrency_wait_ms;
        let wait_until_ms = chrono::Utc::now()
            .timestamp_millis()
            .saturating_add(i64::try_from(wait_ms).unwrap_or(i64::MAX / 4));
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let lease_key = check::lease_key(&self.keyspace, &key.id);
        // In the room before the first attempt, so a release between that attempt and joining
        // cannot go unnoticed.
        let mut waiting = Waiting {
            place: self
                .keeper
                .ledger
                .room
                .join(&lease_key, wait_until_ms, request_id),
            limiter: self,
            request_id,
            queue_key: check::queue_key(&self.keyspace, &key.id),
            since: None,
            attempting: false,
            outcome: None,
        };
        loop {
            waiting.place.attempting();
            waiting.attempting = true;
            let decided = self.attempt(key, request_id, wait_until_ms).await;
            waiting.attempting = false;
            let (verdict, admission) = match decided {
                Ok(decided) => decided,
                Err(e) => {
                    waiting.outcome = Some(WaitOutcome::Refused);
                    return Err(e);
                }
            };
            match verdict {
                Verdict::Admitted { free_after, .. } => {
                    waiting.outcome = Some(WaitOutcome::Admitted);
                    waiting.place.admitted(free_after);
                    return Ok(admission);
                }
                Verdict::Full { .. } => waiting.queued(),
            }
            let now = Instant::now();
            if now >= deadline {
                waiting.outcome = Some(WaitOutcome::TimedOut);
                return Err(check::concurrency_refusal(key, Some(wait_ms)));
            }
            let recheck = if waiting.place.is_first() {
                RECHECK_FIRST
            } else {
                RECHECK_OTHERS
            };
            tokio::select! {
                () = waiting.place.woken() => {}
                () = tokio::time::sleep_until(deadline.min(now + recheck)) => {}
            }
        }
    }

    /// One script call at most, timed now. A full concurrency limit comes back as a verdict,
    /// not an error, so the caller may wait.
    async fn attempt(
        &self,
        key: &KeyRecord,
        request_id: &str,
        wait_until_ms: i64,
    ) -> Result<(Verdict, Admission), GatewayError> {
        // Both clocks are read as the attempt starts, never at the request's arrival: a lease
        // or window entry dated before a slow upload would expire early, and the spend sums'
        // age bounds the enforcement lag.
        let read_at = std::time::Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let spend_limited = check::has_spend_limits(key);
        let read_spend = spend_limited && !self.spend_cache.admits(key, read_at);
        if spend_limited {
            if read_spend {
                self.metrics.spend_reads.inc();
            } else {
                self.metrics.spend_cached.inc();
            }
        }
        if !read_spend && !check::has_counted_limits(key) {
            // Only spend limits, and the cache admits: nothing to count, no round trip.
            let verdict = Verdict::Admitted {
                budget: None,
                free_after: 0,
            };
            return Ok((verdict, Admission::default()));
        }
        let attempt = Attempt {
            key,
            request_id,
            now_ms,
            lease_ttl_ms: u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX),
            wait_until_ms,
            read_spend,
        };
        let check = Check::new(&self.script, &self.keyspace, &attempt);
        let pending = key.max_concurrency.map(|_| {
            let lease_key = check::lease_key(&self.keyspace, &key.id);
            PendingLease::arm(&self.keeper, request_id, lease_key)
        });
        self.metrics.redis_round_trips.inc();
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = match check.invocation.invoke_async(&mut conn).await {
            Ok(reply) => reply,
            Err(e) => {
                // A timeout does not stop the script from running later: release (`pending`
                // drops here) whatever it takes.
                drop(pending);
                return self.redis_down(e).map(|admission| {
                    let verdict = Verdict::Admitted {
                        budget: None,
                        free_after: 0,
                    };
                    (verdict, admission)
                });
            }
        };
        if let Some(spent) = check.spent(&reply) {
            self.spend_cache.insert(&key.id, read_at, spent);
        } else if Check::refused_for_spend(&reply) {
            self.spend_cache.forget_older(&key.id, read_at);
        }
        // `{1, ..}` admitted (with a lease, if the key has a concurrency limit); `{0, ..}` every
        // refusal, each returned before the script takes a lease. Anything else (a reply we do
        // not understand) leaves `pending` armed, and the lease is released.
        let lease = match reply.first() {
            Some(1) => pending.map(PendingLease::hold),
            Some(0) => {
                if let Some(pending) = pending {
                    pending.disarm();
                }
                None
            }
            _ => None,
        };
        let verdict = check.decide(&reply)?;
        let admission = match &verdict {
            Verdict::Admitted { budget, .. } => Admission {
                budget: *budget,
                lease,
            },
            Verdict::Full { .. } => Admission::default(),
        };
        Ok((verdict, admission))
    }

    /// Current usage against each limit of `keys`, one Redis round trip for all of them.
    pub async fn usage(
        &self,
        keys: &[KeyRecord],
        now_ms: i64,
    ) -> Result<Vec<Vec<LimitUsage>>, GatewayError> {
        self.metrics.redis_round_trips.inc();
        let mut conn = self.conn.clone();
        usage::read_usage(&mut conn, &self.keyspace, keys, now_ms).await
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
    /// Releases finished leases at once and renews held ones, until the limiter and every lease
    /// are gone. Stopping at the start of a graceful shutdown instead would let the leases of
    /// the requests still draining lapse (and admit over `max_concurrency` on the other
    /// replicas during every rolling restart), and leave finished ones taken for the TTL.
    pub async fn run(mut self) {
        // Renewed four times per TTL, so a slow round trip or two cannot let a live lease lapse.
        let mut renew = tokio::time::interval(self.lease_ttl / 4);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                // `recv_many` returns 0 only once the channel is closed and empty: every
                // release sent before has been flushed.
                n = self.releases.recv_many(&mut batch, RELEASE_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.release(&mut batch).await;
                }
                _ = renew.tick() => self.renew().await,
            }
        }
    }

    /// Removes every release queued so far in one pipeline. One ZREM round trip per release
    /// could not keep up with thousands of short requests a second: leases of finished
    /// requests piled up in Redis and refused requests far below `max_concurrency`.
    async fn release(&mut self, batch: &mut Vec<Release>) {
        let mut pipe = redis::pipe();
        let mut freed: Vec<String> = Vec::new();
        for release in batch.drain(..) {
            let (id, key) = match release {
                Release::Lease(id, key) => {
                    if !freed.contains(&key) {
                        freed.push(key.clone());
                    }
                    (id, key)
                }
                Release::QueueEntry(id, queue) => (id, queue),
            };
            pipe.cmd("ZREM").arg(key).arg(id).ignore();
        }
        self.metrics.redis_round_trips.inc();
        if let Err(e) = pipe.query_async::<()>(&mut self.conn).await {
            // Leases expire by themselves within the lease TTL, queue entries at their deadline.
            tracing::warn!(error = %e, "releasing concurrency leases failed");
        }
        // Only now are the slots free in Redis for a waiter's attempt to find.
        for key in &freed {
            self.ledger.room.wake_first(key);
        }
    }

    async fn renew(&mut self) {
        let held: Vec<(String, String)> = match self.ledger.held.lock() {
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
        self.metrics.redis_round_trips.inc();
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
