//! Per-key admission limits that hold across every gateway replica: `requests`, `tokens` and
//! `cost_usd` per rolling window, the lifetime budget, and `max_concurrency`.
//!
//! All live in Redis and are checked and counted by one Lua script, so all checks of a request
//! cost one round trip at most and N replicas together admit exactly `max`. A replica admitting
//! many requests of a key far from its `requests` and concurrency limits leases blocks of them
//! with that script call and admits from the blocks locally, with no round trip, while they last
//! (`blocks`, which says why that stays exact); near a limit every request is checked alone.
//! - A `requests` window is a sliding log: a sorted set of the admitted requests' times. It is
//!   exact (no boundary burst as with fixed windows) and costs memory in proportion to `max`.
//! - Concurrency is a sorted set of leases scored by their expiry. A lease is removed when its
//!   response ends (stream included) or the client leaves, and is renewed while it is held, so
//!   the leases of a gateway that dies expire within the lease TTL (default 60 s; a
//!   dead gateway's slots must be free within 2 minutes). Every attempt is timed when its script is sent, not when the
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

mod blocks;
mod check;
mod lease;
mod spend_cache;
mod usage;
mod wait;

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use shared::Partitions;
use shared::RedisConn;
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::store::KeyRecord;

pub use blocks::MAX_BLOCK_MS;
pub use check::{Attempt, Check, Granted, RequestBudget, SCRIPT, Spent, Verdict, is_limited};
use lease::{Keeper, PendingLease};
pub use lease::{KeeperTask, LeaseGuard};
pub use spend_cache::SpendCache;
pub use usage::LimitUsage;

/// How often the first waiter of a key on this replica re-checks for a slot that another
/// replica released (its own releases wake it at once). The others re-check more rarely, as a
/// safety net: they are behind it.
const RECHECK_FIRST: Duration = Duration::from_millis(100);
const RECHECK_OTHERS: Duration = Duration::from_millis(500);

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

pub struct Limiter {
    conn: RedisConn,
    /// A key's limiter state lives in its partition, beside its spend counters.
    partitions: Partitions,
    script: Script,
    policy: RedisDownPolicy,
    /// A lease not renewed for this long is free again.
    lease_ttl: Duration,
    keeper: Arc<Keeper>,
    spend_cache: SpendCache,
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
            self.limiter
                .keeper
                .leave_queue(self.request_id, std::mem::take(&mut self.queue_key));
        }
    }
}

impl Limiter {
    pub fn new(
        conn: RedisConn,
        partitions: Partitions,
        policy: RedisDownPolicy,
        lease_ttl: Duration,
        spend_cache: Duration,
        block_lifetime: Duration,
        metrics: Arc<Metrics>,
    ) -> (Self, KeeperTask) {
        let (keeper, task) = Keeper::new(
            conn.clone(),
            lease_ttl,
            block_lifetime,
            Arc::clone(&metrics),
        );
        let limiter = Self {
            conn,
            partitions,
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
        let lease_key = check::lease_key(self.partitions.for_key(Some(&key.id)), &key.id);
        // In the room before the first attempt, so a release between that attempt and joining
        // cannot go unnoticed.
        let mut waiting = Waiting {
            place: self
                .keeper
                .room()
                .join(&lease_key, wait_until_ms, request_id),
            limiter: self,
            request_id,
            queue_key: check::queue_key(self.partitions.for_key(Some(&key.id)), &key.id),
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
                granted: Granted::default(),
            };
            return Ok((verdict, Admission::default()));
        }
        let blocks = self.keeper.blocks();
        if !read_spend && let Some(local) = blocks.take(key, read_at) {
            // Every counted limit has room in this replica's blocks: no round trip.
            self.metrics.limit_local_admissions.inc();
            let verdict = Verdict::Admitted {
                budget: local.budget,
                free_after: 0,
                granted: Granted::default(),
            };
            let admission = Admission {
                budget: local.budget,
                lease: local
                    .slot
                    .map(|slot| LeaseGuard::block_slot(&self.keeper, slot)),
            };
            return Ok((verdict, admission));
        }
        let keyspace = self.partitions.for_key(Some(&key.id));
        // Dropped (the slot freed) unless the request is admitted.
        let slot = blocks
            .take_slot(key, read_at)
            .map(|slot| LeaseGuard::block_slot(&self.keeper, slot));
        let ask = blocks.ask(&self.keeper, key, read_at, slot.is_some(), || {
            blocks::BlockKeys {
                windows: check::window_keys(keyspace, key),
                lease: check::lease_key(keyspace, &key.id),
            }
        });
        let attempt = Attempt {
            key,
            request_id,
            now_ms,
            lease_ttl_ms: u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX),
            wait_until_ms,
            read_spend,
        };
        let mut block_ask = ask.as_ref().map(|a| a.block.clone()).unwrap_or_default();
        block_ask.slot_held = slot.is_some();
        let check = Check::asking(&self.script, keyspace, &attempt, &block_ask);
        let pending = key.max_concurrency.filter(|_| slot.is_none()).map(|_| {
            let lease_key = check::lease_key(self.partitions.for_key(Some(&key.id)), &key.id);
            PendingLease::arm(&self.keeper, request_id, lease_key)
        });
        let mut ask = ask;
        self.metrics.redis_round_trips.inc();
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = match check.invocation.invoke_async(&mut conn).await {
            Ok(reply) => reply,
            Err(e) => {
                // A timeout does not stop the script from running later: release (`pending`
                // and `ask` drop here) whatever it takes.
                drop((pending, ask, slot));
                return self.redis_down(e).map(|admission| {
                    let verdict = Verdict::Admitted {
                        budget: None,
                        free_after: 0,
                        granted: Granted::default(),
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
            Some(1) => pending,
            Some(0) => {
                if let Some(pending) = pending {
                    pending.disarm();
                }
                if let Some(ask) = ask.take() {
                    ask.refused();
                }
                None
            }
            _ => None,
        };
        let verdict = match check.decide(&reply) {
            Ok(verdict) => verdict,
            // Refused for a full window while this replica holds unused entries of it (the
            // request was sent to lease the next block ahead): those entries are its to use.
            Err(e)
                if matches!(reply.as_slice(), [0, window, _] if *window > 0)
                    && (key.max_concurrency.is_none() || slot.is_some()) =>
            {
                let Some(budget) = blocks.take_entry(key, read_at) else {
                    return Err(e);
                };
                self.metrics.limit_local_admissions.inc();
                let verdict = Verdict::Admitted {
                    budget,
                    free_after: 0,
                    granted: Granted::default(),
                };
                return Ok((
                    verdict,
                    Admission {
                        budget,
                        lease: slot,
                    },
                ));
            }
            Err(e) => return Err(e),
        };
        let admission = match &verdict {
            Verdict::Admitted {
                budget, granted, ..
            } => {
                let installed =
                    blocks.install(ask, key, *granted, check.window_counts(&reply), read_at);
                if granted.entries > 1 {
                    self.metrics.limit_blocks_requests.inc();
                }
                if !installed.returned.is_empty() {
                    self.keeper.give_back(installed.returned);
                }
                let lease = match (installed.slot, lease) {
                    _ if slot.is_some() => slot,
                    // The request holds a slot of the block it leased, not a lease of its own.
                    (Some(slot), pending) => {
                        self.metrics.limit_blocks_slots.inc();
                        if let Some(pending) = pending {
                            pending.disarm();
                        }
                        if let Some((set, members)) = &installed.leases {
                            self.keeper.hold_block(set, members);
                        }
                        Some(LeaseGuard::block_slot(&self.keeper, slot))
                    }
                    (None, pending) => pending.map(PendingLease::hold),
                };
                Admission {
                    budget: installed.budget.or(*budget),
                    lease,
                }
            }
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
        usage::read_usage(&mut conn, &self.partitions, keys, now_ms).await
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
