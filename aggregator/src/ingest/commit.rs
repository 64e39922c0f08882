//! Applies a batch to Redis exactly once: state check, dedupe check, stats writes and `XACK` in
//! one Lua script, so no crash can separate "counted" from "acknowledged". (A batch cut into
//! several commits records its entries as applied instead, in the same script, and is
//! acknowledged as a whole once all applied: `applied.rs`.)
//!
//! Stats cells are packed values (`cell.rs`) that Redis cannot add to, so the committer adds the
//! batch to each cell's last known value (its cache of what it wrote or was told; a cell it does
//! not know is taken as absent) and the script writes the sums only if every cell still carries
//! the stamp they were computed from. If one does not (another consumer, or a replay's switch,
//! changed it; or the cache did not know it), nothing is written, the reply carries the current
//! values, and the batch is merged again. Each refusal means someone else's write landed or the
//! cache learned a value, so the system as a whole always makes progress.
//!
//! Deduplication is by event id within a window of arrival time (the stream entry id's
//! millisecond part, which Redis assigns, so every consumer and every replay agrees on it).
//! Ids are kept in one set per window-sized arrival slot; an event in slot `s` is checked
//! against slots `s-1`, `s`, `s+1` and recorded in `s`, so two copies arriving less than one
//! window apart always meet, whichever is processed first. Sets expire after three windows.
//!
//! An id is recorded only in the same script that applies its event (recording first and
//! failing after would meter a retried event zero times). When the check finds duplicates the
//! script writes nothing and returns them; the caller drops them and commits again.
//!
//! While a replay runs, a commit also applies its events to the replay's shadow copy, which
//! has seen-sets of its own (the replay may have applied an event there already), and the
//! script refuses a batch priced under a state (`control`) that is no longer in force.
//!
//! Every key the script touches carries the deployment's hash tag, so it runs on a cluster too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::{Script, Value};
use rustc_hash::FxHashMap;
use shared::Keyspace;
use shared::RedisConn;

use crate::ingest::applied;
use crate::replay::control;
use crate::store::cell::{self, Cell};
use crate::store::stats::{BucketWrite, CellWrite};

const SCRIPT: &str = r#"
local pos = 1
local function take() local v = ARGV[pos]; pos = pos + 1; return v end
local group = take()
local seen_ttl = tonumber(take())
local token = take()
local prefix = take()

-- 0. the state this batch was priced under must still be in force; a replay whose process
--    died (its lease expired) is abandoned here, which stops the shadow writes
local pv = redis.call('HGET', KEYS[2], 'pv') or '0'
local rid = redis.call('HGET', KEYS[2], 'rid') or '0'
if rid ~= '0' and redis.call('EXISTS', prefix .. 'rp' .. rid .. ':lease') == 0 then
  redis.call('HDEL', KEYS[2], 'rid', 'rfrom', 'rto', 'rend', 'rfz')
  rid = '0'
end
if pv .. ':' .. rid ~= token then return {'stale'} end
-- a replay is switching: it needs the figures still for a moment
if rid ~= '0' and redis.call('HGET', KEYS[2], 'rfz') == rid then return {'frozen'} end

-- 1. duplicates, live then shadow: nothing is written if any are found. Per arrival slot s:
--    the key indexes of the seen-sets of s-1, s and s+1, how s's set is kept (0: expires
--    `seen_ttl` after its last write; 1: a replay's copy, kept until the replay ends; 2: a
--    replay's copy, expiring like 0 unless it is kept), a count, then the ids, sent once and
--    checked against all three; recorded in s's set in step 2.
local records = {}
for _, status in ipairs({'dup', 'sdup'}) do
  local out = {status}
  local n = tonumber(take())
  for _ = 1, n do
    local before = tonumber(take()); local own = tonumber(take()); local after = tonumber(take())
    local sets = {before, own, after}
    local keep = tonumber(take())
    local cnt = tonumber(take())
    for _, k in ipairs(sets) do
      -- the next slot's set rarely exists (nor, in a deployment's first window, the last
      -- one's), and each id sent to SMISMEMBER costs Lua a string for Redis and a result
      if redis.call('EXISTS', KEYS[k]) == 1 then
        for s = pos, pos + cnt - 1, 512 do
          local e = math.min(s + 511, pos + cnt - 1)
          local hit = redis.call('SMISMEMBER', KEYS[k], unpack(ARGV, s, e))
          for j = 1, #hit do if hit[j] == 1 then out[#out + 1] = ARGV[s + j - 1] end end
        end
      end
    end
    records[#records + 1] = {sets[2], pos, cnt, keep, sets[1]}
    pos = pos + cnt
  end
  if #out > 1 then return out end
end

-- 1b. cells: each must still carry the stamp the batch was computed from ('' = absent);
--     per hash: key index, expiry, count, then (field, stamp, new value) triples. Every cell
--     that does not is returned with its current value (false = absent), nothing written.
local CHUNK = 256
local cells_at = pos
local conflicts = {'conflict'}
local n = tonumber(take())
for _ = 1, n do
  local k = tonumber(take()); take(); local cnt = tonumber(take())
  for s = pos, pos + 3 * cnt - 1, 3 * CHUNK do
    local e = math.min(s + 3 * CHUNK - 1, pos + 3 * cnt - 1)
    local fields = {}
    for j = s, e, 3 do fields[#fields + 1] = ARGV[j] end
    local current = redis.call('HMGET', KEYS[k], unpack(fields))
    for j = 1, #current do
      local stamp = current[j] and string.sub(current[j], 1, 8) or ''
      if stamp ~= ARGV[s + (j - 1) * 3 + 1] then
        conflicts[#conflicts + 1] = KEYS[k]
        conflicts[#conflicts + 1] = fields[j]
        conflicts[#conflicts + 1] = current[j]
      end
    end
  end
  pos = pos + 3 * cnt
end
if #conflicts > 1 then return conflicts end

-- 2. record ids as seen, in their own slot's set. A replay's copy must find what live commits
--    recorded there for entries it has yet to read, however long its rebuild takes: those
--    sets are kept (no expiry) until the replay deletes its copy, and the copy's other sets
--    never put an expiry back on them. Its sets that do expire are renewed, with the one of
--    the slot before, while the replay moves through the next slot, whatever its speed.
for _, r in ipairs(records) do
  local k, at, cnt, keep, before = r[1], r[2], r[3], r[4], r[5]
  local kept = keep == 2 and redis.call('TTL', KEYS[k]) == -1
  for s = at, at + cnt - 1, 512 do
    redis.call('SADD', KEYS[k], unpack(ARGV, s, math.min(s + 511, at + cnt - 1)))
  end
  if keep == 1 then
    redis.call('PERSIST', KEYS[k])
  elseif not kept then
    redis.call('EXPIRE', KEYS[k], seen_ttl)
  end
  if keep == 2 and redis.call('TTL', KEYS[before]) >= 0 then
    redis.call('EXPIRE', KEYS[before], seen_ttl)
  end
end

-- 3. cells: write the new values checked in 1b
local after = pos
pos = cells_at
n = tonumber(take())
for _ = 1, n do
  local k = tonumber(take()); local expire_at = tonumber(take()); local cnt = tonumber(take())
  for s = pos, pos + 3 * cnt - 1, 3 * CHUNK do
    local args = {}
    for j = s, math.min(s + 3 * CHUNK - 1, pos + 3 * cnt - 1), 3 do
      args[#args + 1] = ARGV[j]; args[#args + 1] = ARGV[j + 2]
    end
    redis.call('HSET', KEYS[k], unpack(args))
  end
  if expire_at > 0 then redis.call('EXPIREAT', KEYS[k], expire_at) end
  pos = pos + 3 * cnt
end
pos = after

-- 4. counter increments (spend): key index, expiry (unix s, 0 = keep), pair count, pairs
n = tonumber(take())
for _ = 1, n do
  local k = tonumber(take()); local expire_at = tonumber(take()); local cnt = tonumber(take())
  for _ = 1, cnt do
    local f = take(); redis.call('HINCRBY', KEYS[k], f, take())
  end
  if expire_at > 0 then redis.call('EXPIREAT', KEYS[k], expire_at) end
end

-- 5. the entries of the commit, duplicates and dead letters included: acknowledged now, or,
--    for a batch cut into several commits, recorded as applied under a field of their own,
--    space-separated, for the consumer to acknowledge in stream order once all are in
--    (`applied.rs`)
if take() == 'r' then
  redis.call('HSET', KEYS[3], take(), take())
  return {'ok'}
end
n = tonumber(take())
for s = pos, pos + n - 1, 512 do
  redis.call('XACK', KEYS[1], group, unpack(ARGV, s, math.min(s + 511, pos + n - 1)))
end
return {'ok'}
"#;

/// One event admitted to a commit: its id and the arrival slot its stream entry fell in.
pub struct Seen<'a> {
    pub id: &'a str,
    pub slot: i64,
}

/// The events a commit applies to a running replay's copy.
#[derive(Clone, Copy)]
pub struct ShadowSeen<'a> {
    /// The replay's shadow prefix (`rp<rid>:`).
    pub prefix: &'a str,
    pub seen: &'a [Seen<'a>],
    /// Seen-sets of slots up to this one are kept until the replay ends (`i64::MIN`: none):
    /// the slots of the entries the replay has yet to read, and the one after.
    pub kept_through: i64,
}

/// Everything one commit applies. Key names are below the keyspace prefix; shadow ones carry
/// their replay's prefix already.
pub struct Batch<'a> {
    pub token: &'a str,
    pub live: &'a [Seen<'a>],
    pub shadow: Option<ShadowSeen<'a>>,
    /// What to add to each stats cell (live and shadow); shared with the staged commit, which
    /// undoes its changes to the cache from these if it does not apply.
    pub cells: &'a Arc<Vec<CellWrite>>,
    /// Counter increments (spend, the shadow's day list).
    pub increments: &'a [BucketWrite],
    pub acks: Acks<'a>,
}

/// How a commit acknowledges its entries.
#[derive(Clone, Copy)]
pub enum Acks<'a> {
    /// `XACK` them in the script that applies their events.
    Now(&'a [String]),
    /// Record them as applied under this field of [`applied::key`]: they belong to a batch cut
    /// into several commits, whose entries are acknowledged together, in stream order, once
    /// every commit applied (`XACK` of ids scattered through the pending list costs Redis
    /// twice as much as of a run).
    Record {
        field: &'a str,
        entries: &'a [String],
    },
}

impl Acks<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Now(entries) | Self::Record { entries, .. } => entries.len(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Nothing was written: these ids were counted already; drop them and commit again.
    Duplicates(Vec<String>),
    /// Nothing was written: the replay's copy has these already; leave them out of it.
    ShadowDuplicates(Vec<String>),
    /// Nothing was written: pricing or replay changed; reload the state and price again.
    Stale,
    /// Nothing was written: a replay is switching; commit the same batch again in a moment.
    Frozen,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// A stored cell is not one we wrote. Overwriting it would destroy figures, so the batch
    /// waits (and is retried) until someone looks.
    #[error("stats cell {key} field {field:?} holds a value that is not a cell")]
    Corrupt { key: String, field: String },
    /// The task sending a commit ended without its reply; whether it applied is unknown, and
    /// the batch is read again (the dedupe check makes that safe).
    #[error("a commit was sent but its reply was lost")]
    Lost,
}

impl CommitError {
    /// The Redis error code, if Redis refused something (`NOGROUP` after a restart, say).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Redis(e) => e.code(),
            Self::Corrupt { .. } | Self::Lost => None,
        }
    }
}

pub struct Committer {
    script: Script,
    keyspace: Keyspace,
    ctl_key: String,
    applied_key: String,
    group: String,
    window_secs: i64,
    cache: CellCache,
    /// Of the last staging (see [`Known::generation`]).
    generation: u64,
    /// The last staging's encoded cell values, kept for its capacity.
    values: Vec<u8>,
}

/// The last known value of cells, as this committer wrote or was told them: a batch is merged
/// into these and sent in one round trip, without reading first. A wrong entry (someone else
/// wrote the cell, it expired, a replay replaced it) costs one refused attempt, whose reply
/// carries the current value; the stamp check makes the cache a guess that is never trusted.
struct CellCache {
    cells: FxHashMap<String, FxHashMap<Arc<str>, Known>>,
    len: usize,
    max_cells: usize,
    /// The staging that last evicted (at most once per staging).
    evicted_at: u64,
}

impl Default for CellCache {
    fn default() -> Self {
        Self {
            cells: FxHashMap::default(),
            len: 0,
            max_cells: CACHE_CELLS,
            evicted_at: 0,
        }
    }
}

/// A cell's stamp (`None`: absent) and its counts.
struct Known {
    stamp: Option<[u8; cell::STAMP_LEN]>,
    cell: Cell,
    /// The staging that last changed it (0: read from Redis), so a staging that did not apply
    /// undoes exactly its own change and nothing else.
    generation: u64,
    /// The staging that last touched it, changed or read: what eviction goes by.
    used: u64,
}

/// Cells kept in the cache before its least recently used half or more is dropped (minute
/// cells of the past pile up; hour, day and month cells stay hot). A busy hour, day or month
/// cell holds a few hundred sketch bins (a few KiB): in `aggbench` the aggregator's RSS peaked
/// at 370 MiB with this bound.
///
/// The bound must hold the hour, day and month cells of every tuple that spends now and then:
/// a dropped cell that exists is sent as absent, and the whole commit is refused once. With
/// 50,000 and the cache starting over when full, 3,000,000 events over an hour (about 15,000
/// tuples) were refused once per batch after the first 20 minutes: 243 refusals, 49,477
/// events/s, against none and 80,659 now.
const CACHE_CELLS: usize = 200_000;

impl CellCache {
    #[cfg(test)]
    fn get(&self, key: &str, field: &str) -> Option<&Known> {
        self.cells.get(key)?.get(field)
    }

    fn get_mut(&mut self, key: &str, field: &str) -> Option<&mut Known> {
        self.cells.get_mut(key)?.get_mut(field)
    }

    fn remove(&mut self, key: &str, field: &str) {
        if let Some(fields) = self.cells.get_mut(key)
            && fields.remove(field).is_some()
        {
            self.len -= 1;
        }
    }

    /// Drops the least recently used cells, at least half of them when the cells of staging
    /// `now` and the one before (which may still be in flight, and are never dropped) are not
    /// the majority, and the hashes left empty.
    /// Dropping is always safe: a cell the cache does not know is sent as absent, and the stamp
    /// check corrects it, at the price of refusing the whole commit once. So what goes must be
    /// cold: past minutes' cells, not the hour, day and month cells of a key that spends every
    /// few batches (dropping all that no recent batch touched still refused most commits).
    fn evict(&mut self, now: u64) {
        self.evicted_at = now;
        let mut used: Vec<u64> = self
            .cells
            .values()
            .flat_map(|fields| fields.values().map(|known| known.used))
            .collect();
        if used.is_empty() {
            return;
        }
        let half = used.len() / 2;
        let (_, median, _) = used.select_nth_unstable(half);
        // Cells touched by one staging share its number, so "at the median" can be many: they
        // go too, or one eviction could free little and the next staging scan everything again.
        let threshold = median.saturating_add(1).min(now.saturating_sub(1));
        let mut len = 0;
        self.cells.retain(|_, fields| {
            fields.retain(|_, known| known.used >= threshold);
            len += fields.len();
            !fields.is_empty()
        });
        self.len = len;
    }

    /// The entry for a cell, created empty if missing, marked as used by staging `now`. `None`
    /// only if the map refused to hold the key it was just given, which cannot happen; a cache
    /// miss would be harmless anyway.
    fn slot(&mut self, key: &str, field: &Arc<str>, now: u64) -> Option<(&mut Known, bool)> {
        if self.len >= self.max_cells && self.evicted_at != now {
            self.evict(now);
        }
        if !self.cells.contains_key(key) {
            self.cells.insert(key.to_owned(), FxHashMap::default());
        }
        let fields = self.cells.get_mut(key)?;
        let created = !fields.contains_key(&**field);
        if created {
            self.len += 1;
            fields.insert(
                Arc::clone(field),
                Known {
                    stamp: None,
                    cell: Cell::default(),
                    generation: 0,
                    used: now,
                },
            );
        }
        fields.get_mut(&**field).map(|known| {
            known.used = now;
            (known, created)
        })
    }
}

/// A cell's stamp as last known (`None`: absent) and its value after the batch.
struct Merged {
    stamp: Option<[u8; cell::STAMP_LEN]>,
    /// Where the value is in the staging's buffer of values.
    value: std::ops::Range<usize>,
}

/// A commit ready to send, and the cells it put into the cache.
pub struct Staged {
    pub cmd: redis::Cmd,
    /// The full key name of each of `writes`' hashes.
    keys: Vec<String>,
    /// The batch's changes, which `touched` refers to.
    writes: Arc<Vec<CellWrite>>,
    touched: Vec<Touch>,
}

/// One cell a staging changed in the cache (the `cell`th of `writes[write]`), and how to undo
/// it. Indices rather than copies: a batch touches thousands of cells.
struct Touch {
    write: usize,
    cell: usize,
    generation: u64,
    /// Stamp and generation before; `None`: the staging created the entry.
    before: Option<(Option<[u8; cell::STAMP_LEN]>, u64)>,
}

/// The reply of one attempt.
enum Attempt {
    Done(Outcome),
    /// Cells that did not carry the expected stamp: (key, field, current value).
    Conflicts(Vec<(String, String, Option<Vec<u8>>)>),
}

impl Committer {
    pub fn new(keyspace: Keyspace, group: String, window_secs: i64) -> Self {
        Self {
            script: Script::new(SCRIPT),
            ctl_key: keyspace.key(control::CTL),
            applied_key: applied::key(&keyspace),
            keyspace,
            group,
            window_secs: window_secs.max(1),
            cache: CellCache::default(),
            generation: 0,
            values: Vec::new(),
        }
    }

    /// The dedupe slot of a stream entry that arrived at `arrival_ms`.
    pub fn slot_of(&self, arrival_ms: i64) -> i64 {
        arrival_ms.div_euclid(self.window_secs * 1000)
    }

    /// Commits `batch`, retrying with the current values as long as cells turn out to have
    /// changed; `conflicts` counts such retries.
    pub async fn commit(
        &mut self,
        conn: &mut RedisConn,
        batch: &Batch<'_>,
        conflicts: &AtomicU64,
    ) -> Result<Outcome, CommitError> {
        loop {
            let staged = self.stage(batch);
            let reply = send(&staged.cmd, conn).await;
            match self.settle(staged, reply, conflicts)? {
                Some(outcome) => return Ok(outcome),
                None => continue,
            }
        }
    }

    /// Builds the commit of `batch` against the cache, and updates the cache as if it applied,
    /// so the next batch can be staged before this one's reply (each is checked by stamps).
    pub fn stage(&mut self, batch: &Batch<'_>) -> Staged {
        let keys: Vec<String> = batch
            .cells
            .iter()
            .map(|w| self.keyspace.key(&w.key))
            .collect();
        self.generation += 1;
        let generation = self.generation;
        let mut touched = Vec::with_capacity(batch.cells.iter().map(|w| w.cells.len()).sum());
        // Each cell is added to its cache entry, and the sum encoded from there: one pass over
        // its bins to add, one to encode.
        let mut merged = Vec::with_capacity(batch.cells.len());
        // All values in one buffer rather than one allocation each: they are copied into the
        // command next.
        let values = &mut self.values;
        values.clear();
        for (w, (key, write)) in keys.iter().zip(batch.cells.iter()).enumerate() {
            let mut cells = Vec::with_capacity(write.cells.len());
            for (c, (field, change)) in write.cells.iter().enumerate() {
                let new_stamp = cell::new_stamp();
                let Some((known, created)) = self.cache.slot(key, field, generation) else {
                    let at = values.len();
                    change.encode_into(values, new_stamp);
                    cells.push(Merged {
                        stamp: None,
                        value: at..values.len(),
                    });
                    continue;
                };
                let before = (!created).then_some((known.stamp, known.generation));
                known.cell.add(change);
                let at = values.len();
                known.cell.encode_into(values, new_stamp);
                cells.push(Merged {
                    stamp: known.stamp,
                    value: at..values.len(),
                });
                known.stamp = Some(new_stamp);
                known.generation = generation;
                touched.push(Touch {
                    write: w,
                    cell: c,
                    generation,
                    before,
                });
            }
            merged.push(cells);
        }
        let cmd = self.build(batch, &keys, &merged);
        Staged {
            cmd,
            keys,
            writes: Arc::clone(batch.cells),
            touched,
        }
    }

    /// Takes a staged commit's reply: its outcome, or `None` when cells had changed (the cache
    /// now holds their current values; stage the batch again).
    pub fn settle(
        &mut self,
        staged: Staged,
        reply: redis::RedisResult<Vec<Value>>,
        conflicts: &AtomicU64,
    ) -> Result<Option<Outcome>, CommitError> {
        let attempt = match reply {
            Ok(reply) => parse_reply(reply),
            Err(e) => {
                self.forget(staged);
                return Err(e.into());
            }
        };
        match attempt {
            Attempt::Done(Outcome::Applied) => Ok(Some(Outcome::Applied)),
            Attempt::Done(outcome) => {
                self.forget(staged);
                Ok(Some(outcome))
            }
            Attempt::Conflicts(current) => {
                conflicts.fetch_add(1, Ordering::Relaxed);
                self.forget(staged);
                for (key, field, value) in current {
                    let (stamp, cell) = match value {
                        None => (None, Cell::default()),
                        Some(bytes) => match (Cell::decode(&bytes), stamp_of(&bytes)) {
                            (Some(cell), Some(stamp)) => (Some(stamp), cell),
                            _ => return Err(CommitError::Corrupt { key, field }),
                        },
                    };
                    let now = self.generation;
                    if let Some((known, _)) = self.cache.slot(&key, &Arc::from(field), now) {
                        *known = Known {
                            stamp,
                            cell,
                            generation: 0,
                            used: now,
                        };
                    }
                }
                Ok(None)
            }
        }
    }

    /// Takes the replies to commits sent together ([`send_all`]): each one's outcome as
    /// [`Self::settle`] gives it, settled newest first, as stagings are undone. `Err` when the
    /// pipeline failed as a whole (every staging undone).
    pub fn settle_all(
        &mut self,
        sent: Vec<Staged>,
        replies: Replies,
        conflicts: &AtomicU64,
    ) -> Result<Vec<Result<Option<Outcome>, CommitError>>, CommitError> {
        let replies = match replies {
            Ok(replies) => replies,
            Err(e) => {
                self.forget_all(sent);
                return Err(e.into());
            }
        };
        let mut replies = replies.into_iter();
        let paired: Vec<_> = sent.into_iter().map(|s| (s, replies.next())).collect();
        let mut outcomes: Vec<_> = paired
            .into_iter()
            .rev()
            .map(|(staged, reply)| {
                let reply = reply.unwrap_or_else(|| {
                    Err((redis::ErrorKind::Io, "a pipeline reply was missing").into())
                });
                self.settle(staged, reply, conflicts)
            })
            .collect();
        outcomes.reverse();
        Ok(outcomes)
    }

    /// Undoes stagings that will not apply, newest first.
    pub fn forget_all(&mut self, staged: Vec<Staged>) {
        for s in staged.into_iter().rev() {
            self.forget(s);
        }
    }

    /// Undoes what a staged commit that did not apply put into the cache. Stagings are undone
    /// newest first; an entry is only ever left either exact or with a stamp no cell carries
    /// (which any commit built on it is refused for), never with an exact stamp and a wrong
    /// value.
    pub fn forget(&mut self, staged: Staged) {
        for touch in staged.touched.into_iter().rev() {
            let (Some((field, change)), Some(key)) = (
                staged
                    .writes
                    .get(touch.write)
                    .and_then(|w| w.cells.get(touch.cell)),
                staged.keys.get(touch.write),
            ) else {
                continue;
            };
            let Some(known) = self.cache.get_mut(key, field) else {
                continue;
            };
            // Changed since by a refusal's answer, or recreated after an eviction: not ours to
            // undo.
            if known.generation != touch.generation {
                continue;
            }
            match touch.before {
                Some((stamp, generation)) => {
                    known.cell.subtract(change);
                    known.stamp = stamp;
                    known.generation = generation;
                }
                None => self.cache.remove(key, field),
            }
        }
    }

    /// The script call (`EVALSHA`) for `batch` with its cells' merged values; `cell_keys` are
    /// the full names of `batch.cells`' hashes.
    ///
    /// `EVALSHA` lists the keys before the arguments that refer to them by index, so a first
    /// pass collects the keys (and each reference, in argument order) and a second writes the
    /// arguments straight into the command: a commit is megabytes of cell values, copied once.
    fn build(&self, batch: &Batch<'_>, cell_keys: &[String], merged: &[Vec<Merged>]) -> redis::Cmd {
        // (prefix, keep mode of a slot's set, ids by slot); modes as in the script's step 1.
        let live = ("", None, batch.live);
        let shadow = batch
            .shadow
            .map(|s| (s.prefix, Some(s.kept_through), s.seen));
        let sections: Vec<Section<'_>> = std::iter::once(live)
            .chain(shadow)
            .map(|(prefix, kept_through, seen)| {
                let mut by_slot: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
                for s in seen {
                    by_slot.entry(s.slot).or_default().push(s.id);
                }
                (prefix, kept_through, by_slot)
            })
            .collect();
        let increment_keys: Vec<String> = batch
            .increments
            .iter()
            .map(|w| self.keyspace.key(&w.key))
            .collect();

        let mut keys: Vec<&str> = vec![self.keyspace.stream(), &self.ctl_key, &self.applied_key];
        let seen_keys: Vec<String> = sections
            .iter()
            .flat_map(|(prefix, _, by_slot)| {
                by_slot
                    .keys()
                    .flat_map(move |slot| (slot - 1..=slot + 1).map(move |s| (*prefix, s)))
            })
            .map(|(prefix, slot)| self.seen_key(prefix, slot))
            .collect();
        let mut index: FxHashMap<&str, usize> = FxHashMap::default();
        let mut refs: Vec<usize> = Vec::new();
        for name in seen_keys.iter().chain(cell_keys).chain(&increment_keys) {
            let i = *index.entry(name.as_str()).or_insert_with(|| {
                keys.push(name);
                keys.len()
            });
            refs.push(i);
        }
        let mut refs = refs.into_iter();
        let mut next_ref = || refs.next().unwrap_or(0);

        let data: usize = merged
            .iter()
            .flatten()
            .map(|m| m.value.len() + 2 * cell::STAMP_LEN)
            .sum::<usize>()
            + batch
                .cells
                .iter()
                .flat_map(|w| &w.cells)
                .map(|(f, _)| f.len())
                .sum::<usize>()
            + 64 * (batch.live.len() + batch.acks.len() + keys.len());
        let mut cmd = redis::Cmd::with_capacity(0, data);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(keys.len())
            .arg(&keys)
            .arg(&self.group)
            .arg(self.window_secs * 3)
            .arg(batch.token)
            .arg(self.keyspace.key(""));
        for (section, (_, kept_through, by_slot)) in sections.iter().enumerate() {
            cmd.arg(by_slot.len());
            for (slot, ids) in by_slot {
                let keep = match kept_through {
                    None => 0,
                    Some(through) if slot <= through => 1,
                    Some(_) => 2,
                };
                cmd.arg(next_ref())
                    .arg(next_ref())
                    .arg(next_ref())
                    .arg(keep)
                    .arg(ids.len())
                    .arg(ids);
            }
            if section == 0 && batch.shadow.is_none() {
                cmd.arg(0);
            }
        }
        cmd.arg(batch.cells.len());
        for (write, cells) in batch.cells.iter().zip(merged) {
            cmd.arg(next_ref())
                .arg(write.expire_at.unwrap_or(0))
                .arg(cells.len());
            for ((field, _), cell) in write.cells.iter().zip(cells) {
                let stamp: &[u8] = cell.stamp.as_ref().map_or(&[], |s| &s[..]);
                let value = self.values.get(cell.value.clone()).unwrap_or_default();
                cmd.arg(&**field).arg(stamp).arg(value);
            }
        }
        cmd.arg(batch.increments.len());
        for write in batch.increments {
            cmd.arg(next_ref())
                .arg(write.expire_at.unwrap_or(0))
                .arg(write.fields.len());
            for (field, n) in &write.fields {
                cmd.arg(field).arg(*n);
            }
        }
        match batch.acks {
            Acks::Now(entries) => {
                cmd.arg("a").arg(entries.len()).arg(entries);
            }
            Acks::Record { field, entries } => {
                cmd.arg("r").arg(field).arg(applied::pack(entries));
            }
        }
        cmd
    }

    fn seen_key(&self, prefix: &str, slot: i64) -> String {
        self.keyspace.key(&format!("{prefix}seen:{slot}"))
    }
}

/// One section of a commit's seen ids: the prefix of its seen-sets (live or a replay's copy),
/// the last slot whose set the copy keeps (`None`: live), and the ids by arrival slot.
type Section<'a> = (&'a str, Option<i64>, BTreeMap<i64, Vec<&'a str>>);

/// Sends a staged commit (apart from the committer, so it can run while the caller prepares
/// the next batch), loading the script first if Redis does not have it (a restart, `SCRIPT FLUSH`).
pub async fn send(cmd: &redis::Cmd, conn: &mut RedisConn) -> redis::RedisResult<Vec<Value>> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SCRIPT)
                .query_async::<()>(conn)
                .await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// The replies of commits sent together: one per commit, or the connection's error for all.
pub type Replies = redis::RedisResult<Vec<redis::RedisResult<Vec<Value>>>>;

/// Sends the commits of one batch ([`crate::ingest::groups`]) in one pipeline: written at once,
/// so Redis never waits for the next one, yet each is a command of its own, and Redis reads a
/// command of this size over several turns of its event loop, serving its other clients in
/// between. Scripts Redis does not have are loaded and those commits sent again.
pub async fn send_all(cmds: Vec<redis::Cmd>, conn: &mut RedisConn) -> Replies {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for cmd in cmds {
        pipe.add_command(cmd);
    }
    let mut replies: Vec<redis::RedisResult<Vec<Value>>> = pipe.query_async(conn).await?;
    let missing = |r: &redis::RedisResult<Vec<Value>>| matches!(r, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript));
    if replies.iter().any(missing) {
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SCRIPT)
            .query_async::<()>(conn)
            .await?;
        let mut again = redis::pipe();
        again.ignore_errors();
        let resend: Vec<usize> = (0..replies.len())
            .filter(|&i| replies.get(i).is_some_and(missing))
            .collect();
        for &i in &resend {
            if let Some(cmd) = pipe.cmd_iter().nth(i) {
                again.add_command(cmd.clone());
            }
        }
        let answers: Vec<redis::RedisResult<Vec<Value>>> = again.query_async(conn).await?;
        for (i, answer) in resend.into_iter().zip(answers) {
            if let Some(slot) = replies.get_mut(i) {
                *slot = answer;
            }
        }
    }
    Ok(replies)
}

/// [`send_all`] on a task of its own, so that the commits go on while the caller prepares the
/// next batch (polled beside that CPU work, their replies would wait for it).
pub async fn spawn_send_all(mut staged: Vec<Staged>, mut conn: RedisConn) -> Sending {
    let cmds = staged
        .iter_mut()
        .map(|s| std::mem::replace(&mut s.cmd, redis::Cmd::new()))
        .collect();
    Sending(
        crate::ingest::task::spawn_started(async move {
            let replies = send_all(cmds, &mut conn).await;
            (staged, replies)
        })
        .await,
    )
}

/// Commits sent by [`spawn_send_all`].
pub struct Sending(tokio::task::JoinHandle<(Vec<Staged>, Replies)>);

impl Sending {
    /// The staged commits back (without their commands), and the replies. `None` only if the
    /// task panicked: what they staged stays in the cache as a guess the stamps will correct.
    pub async fn replies(self) -> Option<(Vec<Staged>, Replies)> {
        self.0.await.ok()
    }
}

/// Whether every one of a batch's commits applied.
pub fn all_applied(sent: &[Staged], replies: &Replies) -> bool {
    matches!(replies, Ok(r) if r.len() == sent.len() && r.iter().all(applied))
}

/// Whether a commit's reply says it applied.
pub fn applied(reply: &redis::RedisResult<Vec<Value>>) -> bool {
    matches!(reply, Ok(values) if values.first().and_then(text).as_deref() == Some("ok"))
}

fn parse_reply(reply: Vec<Value>) -> Attempt {
    let mut reply = reply.into_iter();
    let status = reply.next().and_then(|v| text(&v)).unwrap_or_default();
    // An id can be in two neighbouring slots' sets (copies that arrived an hour apart), and
    // is reported once per set it is in.
    let strings = |rest: std::vec::IntoIter<Value>| {
        let mut seen = std::collections::HashSet::new();
        rest.filter_map(|v| text(&v))
            .filter(|id| seen.insert(id.clone()))
            .collect()
    };
    Attempt::Done(match status.as_str() {
        "ok" => Outcome::Applied,
        "dup" => Outcome::Duplicates(strings(reply)),
        "sdup" => Outcome::ShadowDuplicates(strings(reply)),
        "frozen" => Outcome::Frozen,
        "conflict" => {
            let rest: Vec<Value> = reply.collect();
            let current = rest
                .chunks(3)
                .filter_map(|c| match c {
                    [key, field, value] => Some((text(key)?, text(field)?, bytes(value))),
                    _ => None,
                })
                .collect();
            return Attempt::Conflicts(current);
        }
        _ => Outcome::Stale,
    })
}

fn stamp_of(bytes: &[u8]) -> Option<[u8; cell::STAMP_LEN]> {
    cell::stamp_of(bytes).try_into().ok()
}

fn bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    bytes(value).and_then(|b| String::from_utf8(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::stats::Totals;

    fn cell(requests: i64, latency: &[(u32, u64)]) -> Cell {
        Cell {
            totals: Totals {
                requests,
                ..Totals::default()
            },
            latency: latency.to_vec(),
            ttft: Vec::new(),
        }
    }

    fn stage(committer: &mut Committer, change: Cell) -> Staged {
        let cells = Arc::new(vec![CellWrite {
            key: "st:h:0".into(),
            expire_at: None,
            cells: vec![("tuple".into(), change), ("new".into(), cell(1, &[]))],
        }]);
        committer.stage(&Batch {
            token: "0:0",
            live: &[],
            shadow: None,
            cells: &cells,
            increments: &[],
            acks: Acks::Now(&[]),
        })
    }

    fn known(committer: &Committer, field: &str) -> Option<(Option<[u8; 8]>, Cell)> {
        let key = committer.keyspace.key("st:h:0");
        committer
            .cache
            .get(&key, field)
            .map(|k| (k.stamp, k.cell.clone()))
    }

    #[test]
    fn stagings_that_did_not_apply_are_undone_exactly_newest_first() {
        let mut committer = Committer::new(Keyspace::new("t").unwrap(), "g".into(), 3600);
        let key = committer.keyspace.key("st:h:0");
        let (entry, _) = committer.cache.slot(&key, &"tuple".into(), 0).unwrap();
        *entry = Known {
            stamp: Some([7; 8]),
            cell: cell(5, &[(3, 1)]),
            generation: 0,
            used: 0,
        };
        let first = stage(&mut committer, cell(2, &[(3, 1), (9, 1)]));
        let second = stage(&mut committer, cell(1, &[(9, 2)]));
        let (stamp, sum) = known(&committer, "tuple").unwrap();
        assert_eq!(sum, cell(8, &[(3, 2), (9, 3)]), "both stagings counted");
        assert_ne!(stamp, Some([7; 8]));

        committer.forget(second);
        committer.forget(first);
        assert_eq!(
            known(&committer, "tuple"),
            Some((Some([7; 8]), cell(5, &[(3, 1)]))),
            "back to what Redis holds"
        );
        assert_eq!(
            known(&committer, "new"),
            None,
            "created entries are removed"
        );
    }

    #[test]
    fn an_entry_refreshed_since_is_not_undone() {
        let mut committer = Committer::new(Keyspace::new("t").unwrap(), "g".into(), 3600);
        let key = committer.keyspace.key("st:h:0");
        let staged = stage(&mut committer, cell(2, &[]));
        // A refusal's answer: the cell as Redis holds it now.
        let (entry, _) = committer.cache.slot(&key, &"tuple".into(), 0).unwrap();
        *entry = Known {
            stamp: Some([9; 8]),
            cell: cell(40, &[]),
            generation: 0,
            used: 0,
        };
        committer.forget(staged);
        assert_eq!(
            known(&committer, "tuple"),
            Some((Some([9; 8]), cell(40, &[])))
        );
    }

    #[test]
    fn a_full_cache_drops_its_least_recently_used_half_or_more() {
        let mut cache = CellCache {
            max_cells: 4,
            ..CellCache::default()
        };
        // Stagings 1 to 4 each touch one cell; staging 5 finds the cache full.
        for (now, field) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            cache.slot("st:h:0", &field.into(), now).unwrap();
        }
        let (hot, created) = cache.slot("st:h:0", &"hot".into(), 5).unwrap();
        assert!(created);
        hot.cell.totals.requests = 7;
        assert!(cache.get("st:h:0", "a").is_none());
        assert!(cache.get("st:h:0", "b").is_none());
        assert!(cache.get("st:h:0", "c").is_none(), "the median goes too");
        assert!(
            cache.get("st:h:0", "d").is_some(),
            "the previous staging's cells stay"
        );
        assert_eq!(cache.get("st:h:0", "hot").unwrap().cell.totals.requests, 7);
        assert_eq!(cache.len, 2);
        // At most one eviction per staging, however full.
        cache.slot("st:m:1", &"e".into(), 5).unwrap();
        cache.slot("st:m:1", &"f".into(), 5).unwrap();
        assert_eq!(cache.len, 4);
        // The previous staging's cells are never dropped, even when they are the older half.
        cache.slot("st:m:1", &"g".into(), 6).unwrap();
        assert!(cache.get("st:m:1", "e").is_some() && cache.get("st:h:0", "hot").is_some());
        assert!(cache.get("st:h:0", "d").is_none());
        assert_eq!(cache.len, 4);
    }
}
