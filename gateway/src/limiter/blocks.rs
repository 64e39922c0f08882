//! Blocks of a key's allowance that this replica leased in one script call and admits from
//! locally: entries of its `requests` windows and slots of its `max_concurrency`.
//!
//! Why a block of window entries is exact: the script adds a block's b entries to every
//! `requests` window only while the live count plus b stays at most 1/16 of the free room, and
//! scores each at the block's end T = now + lifetime. The replica admits from the block only
//! until T − margin by its own clock, so each real admission a has an entry scored T ≥ a. A
//! check at any later time t counts that entry while T > t − window, i.e. at least as long as
//! a > t − window: every window that contains an admission also contains its entry. Entries
//! never outnumber `max` in any window (the script refuses or counts alone beyond that), so
//! neither do admissions. Unused entries are removed when the block ends or is replaced, which
//! only lowers counts. An entry is counted up to `lifetime` longer than its admission needs;
//! blocks are granted only far from `max`, where that costs nobody an admission.
//!
//! Why a block of slots is exact: its k leases sit in the lease set like any request's, renewed
//! by the keeper and expiring with the TTL if this replica dies (so they free within the TTL,
//! as every lease does); the replica admits while its in-flight requests on the block are fewer
//! than k, and only while the block's leases are known to be alive (granted or renewed less than
//! TTL − margin ago). Slots go back once the block has been idle for two sweeps and at shutdown.
//! The script grants slots only when nobody waits and half of `max` stays free after them, and
//! keys with `concurrency_wait_ms` never get any, so near the limit and for waiting keys every
//! request takes its own lease with today's FIFO.
//!
//! A request is decided here only when every counted limit of its key has a block with room;
//! otherwise it goes to the script, which counts it alone or leases the next block (a request
//! that holds a block slot already sends only its windows). Once a block of entries is half
//! used, one request leases the next one ahead while the others keep admitting from the
//! current one, so a busy key never waits for a round trip between blocks. One block request
//! per key and kind is in flight at a time; a request finding no room meanwhile goes alone.
//! Blocks are sized by this replica's recent admissions of the key, so an idle replica asks for
//! none and a busy one grows to the caps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::check::{BlockAsk, Granted, RequestBudget, WindowCount};
use super::lease::Keeper;
use crate::store::KeyRecord;

/// How long past its window a `requests` log lives in Redis (the script's `BLOCK_MAX_MS`), so a
/// block's entries cannot expire with their key before they leave the window.
pub const MAX_BLOCK_MS: u64 = 5_000;
/// Entries per window and slots per key, at most: one round trip per 64 requests is already a
/// small share of a request's cost.
const MAX_ENTRIES: u64 = 64;
const MAX_SLOTS: u64 = 64;
/// The first block of slots of a key; later ones double it.
const FIRST_SLOTS: u64 = 4;
/// Sweeps without a request on an idle block of slots before it goes back.
const IDLE_SWEEPS: u8 = 2;

/// Members to remove from one sorted set: unused entries of a window, or a block's leases.
#[derive(Debug)]
pub struct Returned {
    pub set: String,
    pub members: Vec<String>,
}

/// The Redis keys a block of a key lives in.
#[derive(Debug, Clone, Default)]
pub struct BlockKeys {
    pub windows: Vec<String>,
    pub lease: String,
}

/// A request admitted from this replica's blocks.
pub struct Local {
    pub budget: Option<RequestBudget>,
    /// The block slot it holds, when the key has `max_concurrency`.
    pub slot: Option<Arc<AtomicU64>>,
}

#[derive(Debug)]
pub struct Blocks {
    /// Zero: no blocks.
    lifetime: Duration,
    lease_ttl: Duration,
    /// Unique per process, so block ids of replicas never collide.
    replica: String,
    seq: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<String, KeyBlocks>,
    /// Unused entries of blocks that ended between sweeps, to return at the next one.
    ended: Vec<Returned>,
    /// Slot blocks replaced while requests still held slots of them: returned once idle.
    retired: Vec<SlotBlock>,
}

#[derive(Debug, Default)]
struct KeyBlocks {
    demand: Demand,
    entries: Option<EntryBlock>,
    /// Leased while `entries` was half used, so that its end stalls nobody: the requests that
    /// come during the round trip keep admitting from `entries`.
    next_entries: Option<EntryBlock>,
    slots: Option<SlotBlock>,
    asking_entries: bool,
    /// `take` sent this request to the script to lease the next block ahead; `ask` asks it.
    refill_claimed: bool,
    asking_slots: bool,
}

impl KeyBlocks {
    /// Makes the next block of entries the current one once the current has no room left.
    fn promote(&mut self, key: &KeyRecord, now: Instant, ended: &mut Vec<Returned>) {
        if self.next_entries.is_some()
            && !self.entries.as_ref().is_some_and(|b| b.has_room(key, now))
            && let Some(old) = std::mem::replace(&mut self.entries, self.next_entries.take())
        {
            ended.extend(old.unused());
        }
    }

    fn entries_have_room(&self, key: &KeyRecord, now: Instant) -> bool {
        self.entries.as_ref().is_some_and(|b| b.has_room(key, now))
            || self
                .next_entries
                .as_ref()
                .is_some_and(|b| b.has_room(key, now))
    }
}

#[derive(Debug)]
struct EntryBlock {
    /// (window ms, max) per `requests` limit when granted: a changed key uses no old block.
    shape: Vec<(u64, u64)>,
    windows: Vec<WindowCount>,
    keys: Vec<String>,
    id: String,
    size: u64,
    used: u64,
    granted: Instant,
    usable_until: Instant,
}

#[derive(Debug)]
struct SlotBlock {
    max: u32,
    set: String,
    members: Vec<String>,
    in_flight: Arc<AtomicU64>,
    usable_until: Instant,
    idle_sweeps: u8,
}

/// This replica's admissions of a key in the current and the previous block lifetime.
#[derive(Debug, Default, Clone, Copy)]
struct Demand {
    since: Option<Instant>,
    this: u64,
    last: u64,
}

impl Demand {
    fn roll(&mut self, now: Instant, lifetime: Duration) {
        match self.since {
            Some(since) if now.saturating_duration_since(since) < lifetime => {}
            Some(since) if now.saturating_duration_since(since) < lifetime * 2 => {
                self.last = self.this;
                self.this = 0;
                self.since = Some(now);
            }
            _ => *self = Self::at(now),
        }
    }

    fn at(now: Instant) -> Self {
        Self {
            since: Some(now),
            this: 0,
            last: 0,
        }
    }

    fn recent(&self) -> u64 {
        self.this.max(self.last)
    }
}

/// Entries to ask for, given the replica's recent admissions of the key: none (1, counted
/// alone) until it has seen two in a lifetime, then as many as it admitted, up to the cap.
pub fn entries_wanted(recent: u64) -> u64 {
    if recent < 2 {
        1
    } else {
        recent.min(MAX_ENTRIES)
    }
}

/// Slots to ask for, given the slots the replica holds for the key (all in use when it asks):
/// none for a key seen once, a small first block, then as many again, up to the cap.
pub fn slots_wanted(held: u64, recent: u64) -> u64 {
    let want = match held {
        0 if recent < 2 => 1,
        0 => FIRST_SLOTS,
        held => held.min(MAX_SLOTS.saturating_sub(held)),
    };
    if want < 2 { 1 } else { want }
}

/// Where the most constrained window stands as this replica sees it: the count the script
/// returned, less the entries of the block that no request used yet.
fn budget(windows: &[WindowCount], unused: u64, elapsed: Duration) -> Option<RequestBudget> {
    let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    windows
        .iter()
        .map(|w| RequestBudget {
            limit: w.max,
            remaining: w.max.saturating_sub(w.count.saturating_sub(unused)),
            reset_ms: w.reset_ms.saturating_sub(elapsed_ms).max(1),
        })
        .min_by_key(|b| b.remaining)
}

/// (window ms, max) of each `requests` limit of a key, in its order.
fn shape(key: &KeyRecord) -> impl Iterator<Item = (u64, u64)> + '_ {
    key.limits
        .iter()
        .filter(|l| l.metric == "requests")
        .map(|l| (l.window_secs.saturating_mul(1000), l.max as u64))
}

/// Whether the key's concurrency limit may be leased in blocks.
fn slots_apply(key: &KeyRecord) -> bool {
    key.max_concurrency.is_some() && key.concurrency_wait_ms == 0
}

impl EntryBlock {
    fn has_room(&self, key: &KeyRecord, now: Instant) -> bool {
        self.used < self.size
            && now < self.usable_until
            && shape(key).eq(self.shape.iter().copied())
    }

    fn unused(&self) -> Vec<Returned> {
        if self.used >= self.size {
            return Vec::new();
        }
        self.keys
            .iter()
            .map(|set| Returned {
                set: set.clone(),
                members: (self.used + 1..=self.size)
                    .map(|i| format!("{}:{i}", self.id))
                    .collect(),
            })
            .collect()
    }
}

impl SlotBlock {
    fn has_room(&self, key: &KeyRecord, now: Instant) -> bool {
        key.max_concurrency == Some(self.max)
            && now < self.usable_until
            && self.in_flight.load(Ordering::Acquire) < self.members.len() as u64
    }

    fn usable(&self, key: &KeyRecord, now: Instant) -> bool {
        key.max_concurrency == Some(self.max) && now < self.usable_until
    }

    fn give_back(self) -> Returned {
        Returned {
            set: self.set,
            members: self.members,
        }
    }
}

/// A block request on its way to the script. Until [`Blocks::install`] took its reply or
/// [`Ask::refused`] said the script took nothing, dropping it returns whatever the script may
/// have leased (the caller gave up, or Redis failed or timed out and the script may still run).
/// Either way the next request of the key may ask again.
pub struct Ask<'a> {
    keeper: &'a Keeper,
    key_id: String,
    pub block: BlockAsk,
    keys: BlockKeys,
    sent: Instant,
    armed: bool,
    /// `install` has cleared the key's asking flags.
    settled: bool,
}

impl Ask<'_> {
    /// Everything the script may have leased for this ask.
    fn possible(&self) -> Vec<Returned> {
        let mut out = Vec::new();
        if self.block.entries > 1 {
            for set in &self.keys.windows {
                out.push(Returned {
                    set: set.clone(),
                    members: (1..=self.block.entries)
                        .map(|i| format!("{}:{i}", self.block.id))
                        .collect(),
                });
            }
        }
        if self.block.slots > 1 {
            out.push(Returned {
                set: self.keys.lease.clone(),
                members: (1..=self.block.slots)
                    .map(|i| format!("{}:c{i}", self.block.id))
                    .collect(),
            });
        }
        out
    }

    /// The script refused the request, which it does before leasing anything.
    pub fn refused(mut self) {
        self.armed = false;
    }
}

impl Drop for Ask<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let blocks = self.keeper.blocks();
        if let Ok(mut inner) = blocks.inner.lock()
            && let Some(kb) = inner.keys.get_mut(&self.key_id)
        {
            kb.asking_entries &= self.block.entries <= 1;
            kb.asking_slots &= self.block.slots <= 1;
        }
        if self.armed {
            self.keeper.give_back(self.possible());
        }
    }
}

/// What an admitting reply leased, installed as the key's blocks.
#[derive(Debug, Default)]
pub struct Installed {
    /// Where the request's windows stand, when it took the first entry of a new block.
    pub budget: Option<RequestBudget>,
    /// The slot the request holds, when the reply granted slots.
    pub slot: Option<Arc<AtomicU64>>,
    /// New leases (lease set, members), for the keeper to renew.
    pub leases: Option<(String, Vec<String>)>,
    /// Unused entries of the block the new one replaced.
    pub returned: Vec<Returned>,
}

impl Blocks {
    pub fn new(lifetime: Duration, lease_ttl: Duration) -> Self {
        Self {
            lifetime: lifetime.min(Duration::from_millis(MAX_BLOCK_MS)),
            lease_ttl,
            replica: uuid::Uuid::now_v7().simple().to_string(),
            seq: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn enabled(&self) -> bool {
        !self.lifetime.is_zero()
    }

    /// Local admissions stop this long before a block of entries ends: slack for the clocks
    /// (the entries are scored by the wall clock, the block ends by the monotonic one).
    fn entry_margin(&self) -> Duration {
        self.lifetime / 10
    }

    /// A block of slots admits only while its leases have at least this long to live: the
    /// keeper renews every TTL/4, so a renewal may be a round or two late without stopping it.
    fn slot_margin(&self) -> Duration {
        self.lease_ttl / 4
    }

    /// Admits one request of `key` from this replica's blocks, when every counted limit of the
    /// key has a block with room; `None` sends it to the script.
    pub fn take(&self, key: &KeyRecord, now: Instant) -> Option<Local> {
        if !self.enabled() {
            return None;
        }
        let windows = shape(key).next().is_some();
        let slots = key.max_concurrency.is_some();
        if (slots && !slots_apply(key)) || (!windows && !slots) {
            return None;
        }
        let mut inner = self.inner.lock().ok()?;
        let Inner { keys, ended, .. } = &mut *inner;
        let kb = keys.get_mut(&key.id)?;
        kb.promote(key, now, ended);
        if windows && !kb.entries.as_ref().is_some_and(|b| b.has_room(key, now)) {
            return None;
        }
        if slots && !kb.slots.as_ref().is_some_and(|b| b.has_room(key, now)) {
            return None;
        }
        let half_used = kb
            .entries
            .as_ref()
            .is_some_and(|b| b.size >= 4 && (b.size - b.used) * 2 <= b.size);
        if windows && half_used && !kb.asking_entries && kb.next_entries.is_none() {
            // This request leases the next block; the others keep using this one meanwhile.
            kb.asking_entries = true;
            kb.refill_claimed = true;
            return None;
        }
        kb.demand.roll(now, self.lifetime);
        kb.demand.this += 1;
        let budget = match kb.entries.as_mut() {
            Some(b) if windows => {
                b.used += 1;
                budget(
                    &b.windows,
                    b.size - b.used,
                    now.saturating_duration_since(b.granted),
                )
            }
            _ => None,
        };
        let slot = match kb.slots.as_mut() {
            Some(b) if slots => {
                b.in_flight.fetch_add(1, Ordering::AcqRel);
                b.idle_sweeps = 0;
                Some(Arc::clone(&b.in_flight))
            }
            _ => None,
        };
        Some(Local { budget, slot })
    }

    /// An entry of the key's blocks of entries, for a request the script refused for a full
    /// window while this replica still holds some: typically the one sent to lease the next
    /// block ahead. Without it the replicas would admit fewer than `max`. The budget is the
    /// request's; `None` when there is no entry left.
    pub fn take_entry(&self, key: &KeyRecord, now: Instant) -> Option<Option<RequestBudget>> {
        if !self.enabled() {
            return None;
        }
        let mut inner = self.inner.lock().ok()?;
        let Inner { keys, ended, .. } = &mut *inner;
        let kb = keys.get_mut(&key.id)?;
        kb.promote(key, now, ended);
        let b = kb.entries.as_mut().filter(|b| b.has_room(key, now))?;
        b.used += 1;
        Some(budget(
            &b.windows,
            b.size - b.used,
            now.saturating_duration_since(b.granted),
        ))
    }

    /// A slot of the key's block for a request that `take` did not admit (its windows need the
    /// script), so that the script need not lease one: while a block of entries is renewed,
    /// concurrent requests then cost the script their windows alone, and no release after.
    pub fn take_slot(&self, key: &KeyRecord, now: Instant) -> Option<Arc<AtomicU64>> {
        if !self.enabled() || !slots_apply(key) {
            return None;
        }
        let mut inner = self.inner.lock().ok()?;
        let b = inner.keys.get_mut(&key.id)?.slots.as_mut()?;
        if !b.has_room(key, now) {
            return None;
        }
        b.in_flight.fetch_add(1, Ordering::AcqRel);
        b.idle_sweeps = 0;
        Some(Arc::clone(&b.in_flight))
    }

    /// The blocks to ask for with the script call of a request that `take` did not admit, if
    /// any: `None` counts the request alone, as without blocks. `keys` names the key's sets;
    /// `slot_held`: the request holds a block slot already.
    pub fn ask<'a>(
        &self,
        keeper: &'a Keeper,
        key: &KeyRecord,
        now: Instant,
        slot_held: bool,
        keys: impl FnOnce() -> BlockKeys,
    ) -> Option<Ask<'a>> {
        if !self.enabled() {
            return None;
        }
        let windows = shape(key).next().is_some();
        let slots = slots_apply(key) && !slot_held;
        if !windows && !slots {
            return None;
        }
        let mut block = BlockAsk::default();
        {
            let mut inner = self.inner.lock().ok()?;
            let kb = inner.keys.entry(key.id.clone()).or_default();
            kb.demand.roll(now, self.lifetime);
            let recent = kb.demand.recent();
            let claimed = std::mem::take(&mut kb.refill_claimed);
            // A block with room is used first: the request is counted alone meanwhile.
            if windows && (claimed || (!kb.asking_entries && !kb.entries_have_room(key, now))) {
                block.entries = entries_wanted(recent);
            }
            if claimed && block.entries <= 1 {
                kb.asking_entries = false;
            }
            if slots && !kb.asking_slots {
                let held = match &kb.slots {
                    Some(b) if b.has_room(key, now) => None,
                    Some(b) if b.usable(key, now) => Some(b.members.len() as u64),
                    _ => Some(0),
                };
                if let Some(held) = held {
                    block.slots = slots_wanted(held, recent);
                }
            }
            if block.entries <= 1 && block.slots <= 1 {
                return None;
            }
            kb.asking_entries |= block.entries > 1;
            kb.asking_slots |= block.slots > 1;
        }
        block.id = format!(
            "~{}.{}",
            self.replica,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        block.lifetime_ms = u64::try_from(self.lifetime.as_millis()).unwrap_or(MAX_BLOCK_MS);
        Some(Ask {
            keeper,
            key_id: key.id.clone(),
            block,
            keys: keys(),
            sent: now,
            armed: true,
            settled: false,
        })
    }

    /// Notes an admission by the script, and installs what it granted for `ask`. `windows` is
    /// the reply's count per window.
    pub fn install(
        &self,
        ask: Option<Ask<'_>>,
        key: &KeyRecord,
        granted: Granted,
        windows: Vec<WindowCount>,
        now: Instant,
    ) -> Installed {
        let mut out = Installed::default();
        if !self.enabled() {
            return out;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return out;
        };
        let Inner { keys, retired, .. } = &mut *inner;
        let kb = keys.entry(key.id.clone()).or_default();
        kb.demand.roll(now, self.lifetime);
        kb.demand.this += 1;
        let Some(mut ask) = ask else {
            return out;
        };
        ask.armed = false;
        ask.settled = true;
        kb.asking_entries &= ask.block.entries <= 1;
        kb.asking_slots &= ask.block.slots <= 1;
        let sent = ask.sent;
        if granted.entries > 1 {
            let block = EntryBlock {
                shape: shape(key).collect(),
                windows,
                keys: std::mem::take(&mut ask.keys.windows),
                id: ask.block.id.clone(),
                size: granted.entries,
                used: 1,
                granted: sent,
                usable_until: sent + self.lifetime.saturating_sub(self.entry_margin()),
            };
            out.budget = budget(&block.windows, block.size - block.used, Duration::ZERO);
            let replaced = if kb.entries.as_ref().is_some_and(|b| b.has_room(key, now)) {
                kb.next_entries.replace(block)
            } else {
                kb.entries.replace(block)
            };
            if let Some(old) = replaced {
                out.returned.extend(old.unused());
            }
        }
        if granted.slots > 1 {
            let members: Vec<String> = (1..=granted.slots)
                .map(|i| format!("{}:c{i}", ask.block.id))
                .collect();
            let until = sent + self.lease_ttl.saturating_sub(self.slot_margin());
            match kb.slots.as_mut() {
                Some(b) if b.usable(key, now) => {
                    b.members.extend(members.iter().cloned());
                    b.usable_until = b.usable_until.min(until);
                    b.in_flight.fetch_add(1, Ordering::AcqRel);
                    b.idle_sweeps = 0;
                    out.slot = Some(Arc::clone(&b.in_flight));
                }
                _ => {
                    let b = SlotBlock {
                        max: key.max_concurrency.unwrap_or(0),
                        set: ask.keys.lease.clone(),
                        members: members.clone(),
                        in_flight: Arc::new(AtomicU64::new(1)),
                        usable_until: until,
                        idle_sweeps: 0,
                    };
                    out.slot = Some(Arc::clone(&b.in_flight));
                    if let Some(old) = kb.slots.replace(b) {
                        retired.push(old);
                    }
                }
            }
            out.leases = Some((ask.keys.lease.clone(), members));
        }
        out
    }

    /// The keeper renewed every lease held when it began at `from`, and heard back at
    /// `answered`: blocks of slots still usable then were alive in Redis when renewed.
    pub fn renewed(&self, from: Instant, answered: Instant) {
        let until = from + self.lease_ttl.saturating_sub(self.slot_margin());
        if let Ok(mut inner) = self.inner.lock() {
            for b in inner.keys.values_mut().filter_map(|kb| kb.slots.as_mut()) {
                if b.usable_until > answered {
                    b.usable_until = b.usable_until.max(until);
                }
            }
        }
    }

    /// Takes ended blocks of entries and idle blocks of slots off the table (every block, with
    /// `everything`, at shutdown) and returns what they leased and did not use.
    pub fn sweep(&self, now: Instant, everything: bool) -> Vec<Returned> {
        let mut out = Vec::new();
        let Ok(mut inner) = self.inner.lock() else {
            return out;
        };
        let Inner {
            keys,
            retired,
            ended,
        } = &mut *inner;
        out.append(ended);
        let lifetime = self.lifetime;
        keys.retain(|_, kb| {
            for block in [&mut kb.next_entries, &mut kb.entries] {
                if (everything || block.as_ref().is_some_and(|b| now >= b.usable_until))
                    && let Some(b) = block.take()
                {
                    out.extend(b.unused());
                }
            }
            if kb.entries.is_none() {
                kb.entries = kb.next_entries.take();
            }
            if let Some(b) = kb.slots.as_mut() {
                let idle = b.in_flight.load(Ordering::Acquire) == 0;
                if idle {
                    b.idle_sweeps = b.idle_sweeps.saturating_add(1);
                }
                let done = idle && (b.idle_sweeps > IDLE_SWEEPS || now >= b.usable_until);
                if (everything || done)
                    && let Some(b) = kb.slots.take()
                {
                    out.push(b.give_back());
                }
            }
            kb.entries.is_some()
                || kb.refill_claimed
                || kb.slots.is_some()
                || kb.asking_entries
                || kb.asking_slots
                || kb
                    .demand
                    .since
                    .is_some_and(|s| now.saturating_duration_since(s) < lifetime * 2)
        });
        let (done, kept): (Vec<SlotBlock>, Vec<SlotBlock>) = std::mem::take(retired)
            .into_iter()
            .partition(|b| everything || b.in_flight.load(Ordering::Acquire) == 0);
        *retired = kept;
        out.extend(done.into_iter().map(SlotBlock::give_back));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Limit;

    fn key(max_requests: u64, max_concurrency: Option<u32>) -> KeyRecord {
        KeyRecord {
            id: "key_1".into(),
            name: "k".into(),
            limits: vec![Limit {
                metric: "requests".into(),
                max: max_requests as f64,
                window_secs: 60,
            }],
            max_concurrency,
            ..KeyRecord::default()
        }
    }

    fn window(max: u64, count: u64) -> WindowCount {
        WindowCount {
            max,
            count,
            reset_ms: 60_000,
        }
    }

    /// The table with a block of `size` entries granted at `at`, its first entry taken.
    fn with_entries(key: &KeyRecord, size: u64, at: Instant) -> Blocks {
        let blocks = Blocks::new(Duration::from_millis(500), Duration::from_secs(60));
        let block = EntryBlock {
            shape: shape(key).collect(),
            windows: vec![window(1_000, 100 + size)],
            keys: vec!["rl".into()],
            id: "~r.0".into(),
            size,
            used: 1,
            granted: at,
            usable_until: at + Duration::from_millis(450),
        };
        let kb = KeyBlocks {
            entries: Some(block),
            ..KeyBlocks::default()
        };
        blocks.inner.lock().unwrap().keys.insert(key.id.clone(), kb);
        blocks
    }

    /// Gives `key_1` (which `with_entries` made) a block of `slots` concurrency slots with
    /// `in_flight` requests holding them, usable until `until`; returns the in-flight count.
    fn with_slots(blocks: &Blocks, slots: usize, in_flight: u64, until: Instant) -> Arc<AtomicU64> {
        let count = Arc::new(AtomicU64::new(in_flight));
        let mut inner = blocks.inner.lock().unwrap();
        let key = inner.keys.get_mut("key_1").unwrap();
        key.slots = Some(SlotBlock {
            max: 100,
            set: "cc".into(),
            members: (1..=slots).map(|i| format!("~r.0:c{i}")).collect(),
            in_flight: Arc::clone(&count),
            usable_until: until,
            idle_sweeps: 0,
        });
        count
    }

    #[test]
    fn a_replica_asks_for_no_block_until_it_admits_twice_in_a_lifetime_then_for_its_demand() {
        assert_eq!(entries_wanted(0), 1);
        assert_eq!(entries_wanted(1), 1);
        assert_eq!(entries_wanted(2), 2);
        assert_eq!(entries_wanted(40), 40);
        assert_eq!(entries_wanted(10_000), MAX_ENTRIES);
    }

    #[test]
    fn blocks_of_slots_start_small_double_and_stop_at_the_cap() {
        assert_eq!(slots_wanted(0, 1), 1);
        assert_eq!(slots_wanted(0, 2), FIRST_SLOTS);
        assert_eq!(slots_wanted(4, 50), 4);
        assert_eq!(slots_wanted(32, 50), 32);
        assert_eq!(slots_wanted(48, 50), 16);
        assert_eq!(slots_wanted(63, 50), 1);
        assert_eq!(slots_wanted(MAX_SLOTS, 50), 1);
    }

    #[test]
    fn demand_is_the_busier_of_this_lifetime_and_the_last_and_forgets_an_idle_key() {
        let t = Instant::now();
        let l = Duration::from_millis(500);
        let mut d = Demand::at(t);
        d.this = 30;
        d.roll(t + Duration::from_millis(600), l);
        assert_eq!((d.last, d.this, d.recent()), (30, 0, 30));
        d.this = 5;
        d.roll(t + Duration::from_millis(700), l);
        assert_eq!(d.recent(), 30, "still within the new lifetime");
        d.roll(t + Duration::from_secs(5), l);
        assert_eq!(d.recent(), 0);
    }

    #[test]
    fn remaining_counts_the_blocks_unused_entries_as_free() {
        let b = budget(
            &[window(300, 120), window(10_000, 5_000)],
            15,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(b.limit, 300);
        assert_eq!(b.remaining, 195);
        let later = budget(&[window(300, 120)], 0, Duration::from_secs(100)).unwrap();
        assert_eq!((later.remaining, later.reset_ms), (180, 1));
    }

    #[test]
    fn a_block_admits_its_entries_then_sends_the_next_request_to_the_script() {
        let k = key(1_000, None);
        let t = Instant::now();
        let blocks = with_entries(&k, 3, t);
        let first = blocks.take(&k, t).unwrap();
        assert_eq!(first.budget.unwrap().remaining, 1_000 - 103 + 1);
        assert!(blocks.take(&k, t).is_some());
        assert!(
            blocks.take(&k, t).is_none(),
            "three entries, three requests"
        );
    }

    #[test]
    fn half_way_through_a_block_one_request_leases_the_next_while_the_others_go_on() {
        let k = key(1_000, None);
        let t = Instant::now();
        let blocks = with_entries(&k, 8, t);
        for _ in 0..3 {
            assert!(blocks.take(&k, t).is_some());
        }
        assert!(
            blocks.take(&k, t).is_none(),
            "half used: this one leases the next"
        );
        for _ in 0..4 {
            assert!(blocks.take(&k, t).is_some(), "the rest meanwhile");
        }
        assert!(
            blocks.take(&k, t).is_none(),
            "used up, the next not there yet"
        );
        let mut inner = blocks.inner.lock().unwrap();
        let kb = inner.keys.get_mut("key_1").unwrap();
        assert!(kb.refill_claimed && kb.asking_entries);
        let mut next = with_entries(&k, 4, t)
            .inner
            .lock()
            .unwrap()
            .keys
            .remove("key_1")
            .unwrap()
            .entries
            .unwrap();
        next.id = "~r.1".into();
        kb.next_entries = Some(next);
        kb.asking_entries = false;
        kb.refill_claimed = false;
        drop(inner);
        assert!(blocks.take(&k, t).is_some(), "from the next block");
        let returned = blocks.sweep(t + Duration::from_secs(1), false);
        assert_eq!(
            returned.len(),
            1,
            "the first block was used up: {returned:?}"
        );
        assert_eq!(returned[0].members, ["~r.1:3", "~r.1:4"]);
    }

    #[test]
    fn a_block_stops_admitting_before_its_end_and_returns_what_it_did_not_use() {
        let k = key(1_000, None);
        let t = Instant::now();
        let blocks = with_entries(&k, 5, t);
        assert!(blocks.take(&k, t + Duration::from_millis(449)).is_some());
        assert!(blocks.take(&k, t + Duration::from_millis(450)).is_none());
        let returned = blocks.sweep(t + Duration::from_millis(450), false);
        assert_eq!(returned.len(), 1);
        assert_eq!(returned[0].set, "rl");
        assert_eq!(returned[0].members, ["~r.0:3", "~r.0:4", "~r.0:5"]);
        assert!(blocks.sweep(t + Duration::from_secs(5), false).is_empty());
        assert!(
            blocks.inner.lock().unwrap().keys.is_empty(),
            "an idle key is forgotten"
        );
    }

    #[test]
    fn a_changed_limit_does_not_admit_from_a_block_granted_under_the_old_one() {
        let k = key(1_000, None);
        let t = Instant::now();
        let blocks = with_entries(&k, 5, t);
        assert!(blocks.take(&key(500, None), t).is_none());
    }

    #[test]
    fn a_key_with_concurrency_needs_a_slot_block_too_and_waiting_keys_never_use_blocks() {
        let k = key(1_000, Some(100));
        let t = Instant::now();
        let blocks = with_entries(&k, 64, t);
        assert!(blocks.take(&k, t).is_none(), "no block of slots yet");
        let in_flight = with_slots(&blocks, 2, 0, t + Duration::from_secs(45));
        let a = blocks.take(&k, t).unwrap();
        let b = blocks.take(&k, t).unwrap();
        assert!(blocks.take(&k, t).is_none(), "both slots in flight");
        assert_eq!(in_flight.load(Ordering::Acquire), 2);
        drop(a);
        in_flight.fetch_sub(1, Ordering::AcqRel);
        assert!(
            blocks.take(&k, t).is_some(),
            "a finished request frees its slot"
        );
        drop(b);
        let mut waiting = k.clone();
        waiting.concurrency_wait_ms = 1_000;
        assert!(blocks.take(&waiting, t).is_none());
    }

    #[test]
    fn a_request_whose_windows_need_the_script_may_still_hold_a_block_slot() {
        let k = key(1_000, Some(100));
        let t = Instant::now();
        let blocks = with_entries(&k, 1, t);
        assert!(blocks.take_slot(&k, t).is_none(), "no block of slots");
        let in_flight = with_slots(&blocks, 1, 0, t + Duration::from_secs(45));
        assert!(blocks.take(&k, t).is_none(), "the entries are used up");
        assert!(blocks.take_slot(&k, t).is_some());
        assert!(blocks.take_slot(&k, t).is_none(), "one slot, in flight");
        assert_eq!(in_flight.load(Ordering::Acquire), 1);
    }

    #[test]
    fn an_idle_block_of_slots_goes_back_after_two_sweeps_and_a_busy_one_stays() {
        let k = key(1_000, Some(100));
        let t = Instant::now();
        let blocks = with_entries(&k, 5, t);
        let in_flight = with_slots(&blocks, 2, 1, t + Duration::from_secs(45));
        for _ in 0..5 {
            let back = blocks.sweep(t, false);
            assert!(back.iter().all(|r| r.set != "cc"), "in use");
        }
        in_flight.store(0, Ordering::Release);
        assert!(blocks.sweep(t, false).iter().all(|r| r.set != "cc"));
        assert!(blocks.sweep(t, false).iter().all(|r| r.set != "cc"));
        let back = blocks.sweep(t, false);
        assert_eq!(
            back.iter().find(|r| r.set == "cc").unwrap().members.len(),
            2
        );
    }

    #[test]
    fn a_block_of_slots_stops_admitting_when_its_leases_may_have_lapsed() {
        let k = key(1_000, Some(100));
        let t = Instant::now();
        let blocks = with_entries(&k, 64, t);
        with_slots(&blocks, 2, 0, t + Duration::from_millis(100));
        // A renewal that answered after the block's leases may have lapsed revives nothing.
        blocks.renewed(t, t + Duration::from_millis(200));
        assert!(blocks.take(&k, t + Duration::from_millis(200)).is_none());
        // One that answered in time extends it.
        blocks
            .inner
            .lock()
            .unwrap()
            .keys
            .get_mut("key_1")
            .unwrap()
            .slots
            .as_mut()
            .unwrap()
            .usable_until = t + Duration::from_millis(100);
        blocks.renewed(t, t + Duration::from_millis(50));
        assert!(blocks.take(&k, t + Duration::from_millis(300)).is_some());
    }
}
