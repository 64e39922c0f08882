//! Concurrency leases on this replica: the guard a request holds, the guard an attempt holds
//! while its script may be taking a lease, and the keeper task that renews held leases and
//! releases finished ones (and wait-queue entries of requests that stopped waiting), and
//! returns what this replica's blocks (`blocks.rs`) leased and no longer need.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::RedisConn;
use tokio::sync::mpsc;

use super::blocks::{Blocks, Returned};
use super::wait;
use crate::metrics::Metrics;

/// Releases sent to Redis in one pipeline at most.
const RELEASE_BATCH: usize = 1024;

/// How often ended blocks of entries and idle blocks of slots are returned.
const SWEEP: Duration = Duration::from_millis(100);

/// A concurrency slot; released when dropped. It holds the keeper so that the keeper task
/// outlives every request holding a slot (block slots included, whose leases it renews).
#[derive(Debug)]
pub struct LeaseGuard {
    held: Held,
    keeper: Arc<Keeper>,
}

#[derive(Debug)]
enum Held {
    /// The request's own lease: its id in the lease set.
    Own { id: String, key: String },
    /// A slot of one of this replica's blocks: its count of requests in flight.
    Block(Arc<AtomicU64>),
}

impl LeaseGuard {
    pub fn block_slot(keeper: &Arc<Keeper>, in_flight: Arc<AtomicU64>) -> Self {
        Self {
            held: Held::Block(in_flight),
            keeper: Arc::clone(keeper),
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        match &self.held {
            Held::Own { id, key } => self.keeper.release(id, key),
            Held::Block(in_flight) => {
                in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// A lease that the script of an attempt in flight may be taking. Armed before the script is
/// sent; unless the reply shows the script took none (disarmed) or the lease becomes a
/// [`LeaseGuard`], dropping it releases the lease: the caller was cancelled mid-attempt (the
/// client hung up), or Redis answered with an error or after the response timeout, and the
/// script may still run. ZREM of an absent lease is harmless, and the release goes out on the
/// same connection as the script, so Redis runs it after the script.
pub struct PendingLease<'a> {
    keeper: &'a Arc<Keeper>,
    id: &'a str,
    key: String,
    armed: bool,
}

impl<'a> PendingLease<'a> {
    pub fn arm(keeper: &'a Arc<Keeper>, id: &'a str, key: String) -> Self {
        Self {
            keeper,
            id,
            key,
            armed: true,
        }
    }

    /// The script took the lease: from now on the request holds it.
    pub fn hold(mut self) -> LeaseGuard {
        self.armed = false;
        self.keeper.hold(self.id, &self.key);
        LeaseGuard {
            held: Held::Own {
                id: self.id.to_owned(),
                key: std::mem::take(&mut self.key),
            },
            keeper: Arc::clone(self.keeper),
        }
    }

    /// The script answered without taking a lease.
    pub fn disarm(mut self) {
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
    /// What a block leased and did not use, or may have leased for a failed ask.
    Returned(Returned),
}

/// The leases this replica holds, renewed in the background and released on drop. Held by
/// the limiter and by every lease, but not by the keeper task: its release channel closes when
/// the last of them is gone, which is how the task knows it is done.
#[derive(Debug)]
pub struct Keeper {
    ledger: Arc<Ledger>,
    releases: mpsc::UnboundedSender<Release>,
}

/// What the keeper task shares with the limiter and its leases.
#[derive(Debug)]
struct Ledger {
    /// Lease id → lease set, for renewal.
    held: Mutex<HashMap<String, String>>,
    room: Arc<wait::Room>,
    blocks: Blocks,
}

impl Keeper {
    pub fn new(
        conn: RedisConn,
        lease_ttl: Duration,
        block_lifetime: Duration,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, KeeperTask) {
        let (releases, rx) = mpsc::unbounded_channel();
        let ledger = Arc::new(Ledger {
            held: Mutex::default(),
            room: Arc::default(),
            blocks: Blocks::new(block_lifetime, lease_ttl),
        });
        let keeper = Arc::new(Self {
            ledger: Arc::clone(&ledger),
            releases,
        });
        let task = KeeperTask {
            conn,
            ledger,
            releases: rx,
            lease_ttl,
            metrics,
        };
        (keeper, task)
    }

    /// This replica's requests waiting for a slot.
    pub fn room(&self) -> &Arc<wait::Room> {
        &self.ledger.room
    }

    /// This replica's blocks of the keys' allowances.
    pub fn blocks(&self) -> &Blocks {
        &self.ledger.blocks
    }

    /// Renews the leases of a block of slots from now on.
    pub fn hold_block(&self, set: &str, members: &[String]) {
        if let Ok(mut held) = self.ledger.held.lock() {
            for m in members {
                held.insert(m.clone(), set.to_owned());
            }
        }
    }

    /// Stops renewing and removes what blocks leased and no longer need.
    pub fn give_back(&self, returned: Vec<Returned>) {
        forget(&self.ledger, &returned);
        for r in returned {
            let _ = self.releases.send(Release::Returned(r));
        }
    }

    /// Removes a request that stopped waiting from the Redis queue `queue`.
    pub fn leave_queue(&self, request_id: &str, queue: String) {
        let _ = self
            .releases
            .send(Release::QueueEntry(request_id.to_owned(), queue));
    }

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

/// Stops renewing returned leases (window entries were never renewed; removing them is a no-op).
fn forget(ledger: &Ledger, returned: &[Returned]) {
    if let Ok(mut held) = ledger.held.lock() {
        for m in returned.iter().flat_map(|r| &r.members) {
            held.remove(m);
        }
    }
}

/// Renews the held leases and releases finished ones. It has no shutdown signal of its own:
/// it runs until the limiter and the last lease are dropped, i.e. until the server has drained
/// every request after a graceful shutdown began, and releases everything queued before it
/// returns.
pub struct KeeperTask {
    conn: RedisConn,
    ledger: Arc<Ledger>,
    releases: mpsc::UnboundedReceiver<Release>,
    lease_ttl: Duration,
    metrics: Arc<Metrics>,
}

impl KeeperTask {
    /// Releases finished leases at once and renews held ones, until the limiter and every lease
    /// are gone. Stopping at the start of a graceful shutdown instead would let the leases of
    /// the requests still draining lapse (and admit over `max_concurrency` on the other
    /// replicas during every rolling restart), and leave finished ones taken for the TTL.
    pub async fn run(mut self) {
        // Renewed four times per TTL, so a slow round trip or two cannot let a live lease lapse.
        let mut renew = tokio::time::interval(self.lease_ttl / 4);
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = sweep.tick() => self.sweep(false).await,
            }
        }
        // Every request is done: what the blocks still hold goes back now rather than lapse.
        self.sweep(true).await;
    }

    async fn sweep(&mut self, everything: bool) {
        let returned = self
            .ledger
            .blocks
            .sweep(tokio::time::Instant::now().into_std(), everything);
        if returned.is_empty() {
            return;
        }
        forget(&self.ledger, &returned);
        let mut batch = returned.into_iter().map(Release::Returned).collect();
        self.release(&mut batch).await;
    }

    /// Removes every release queued so far in one pipeline. One ZREM round trip per release
    /// could not keep up with thousands of short requests a second: leases of finished
    /// requests piled up in Redis and refused requests far below `max_concurrency`.
    async fn release(&mut self, batch: &mut Vec<Release>) {
        let mut cmds = Vec::with_capacity(batch.len());
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
                Release::Returned(r) => {
                    if !r.members.is_empty() {
                        let cmd = redis::cmd("ZREM").arg(&r.set).arg(&r.members).to_owned();
                        cmds.push((r.set, cmd));
                    }
                    continue;
                }
            };
            let cmd = redis::cmd("ZREM").arg(&key).arg(id).to_owned();
            cmds.push((key, cmd));
        }
        if cmds.is_empty() {
            return;
        }
        self.metrics.redis_round_trips.inc();
        if let Err(e) = self.conn.run_ignored(cmds).await {
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
        let from = std::time::Instant::now();
        let until = chrono::Utc::now().timestamp_millis() + self.lease_ttl.as_millis() as i64;
        let mut cmds = Vec::with_capacity(held.len() * 2);
        self.metrics.redis_round_trips.inc();
        for (id, key) in &held {
            let renew = redis::cmd("ZADD")
                .arg(key)
                .arg("XX")
                .arg(until)
                .arg(id)
                .to_owned();
            let keep = redis::cmd("PEXPIRE")
                .arg(key)
                .arg(self.lease_ttl.as_millis() as u64 * 2)
                .to_owned();
            cmds.push((key.clone(), renew));
            cmds.push((key.clone(), keep));
        }
        match self.conn.run_ignored(cmds).await {
            Ok(()) => self.ledger.blocks.renewed(from, std::time::Instant::now()),
            Err(e) => {
                tracing::warn!(error = %e, leases = held.len(), "renewing concurrency leases failed")
            }
        }
    }
}
