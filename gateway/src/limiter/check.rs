//! One request's limit check without the round trip: the script, its keys and arguments, and
//! what its reply means. Pure (time is passed in), so it is unit-tested and benchmarked
//! (`gateway/benches/limits.rs`) apart from Redis.

use std::fmt::Write as _;

use redis::{Script, ScriptInvocation};
use shared::Keyspace;

use crate::error::GatewayError;
use crate::spend;
use crate::store::{KeyRecord, Limit};

/// A concurrency slot frees when some response ends, which cannot be predicted; clients retry
/// after this.
pub const CONCURRENCY_RETRY_AFTER_SECS: u64 = 1;

/// Checks and counts one request. KEYS: the `requests` windows' logs, the lease set, the wait
/// queue, then the spend hashes. Replies `{1, free slots left, entries granted, slots granted,
/// (count, reset ms) per window}`,
/// `{0, 0, waiters ahead}` when no concurrency slot is free (queued when ARGV wait_until is in
/// the future), `{0, i, wait ms}` for requests window i, `{0, -c, wait ms}` for spend limit c,
/// `{0, -1000000, 0}` for the budget. When it was given spend limits or a budget to read, the
/// first two replies end with what it read, for the limiter's spend cache (`spend_cache.rs`):
/// each spend limit's window sum, then the lifetime cost in nanodollars if a budget was read.
/// The gateway leaves the spend part out while its cached sums are fresh and under every limit.
///
/// A replica may ask for a block (`blocks.rs`): ARGV entries > 1 asks for that many entries in
/// every `requests` window, scored at the block's end `now + block ms` and named
/// `<block id>:<i>`, granted only while each window stays far from full (at most 1/16 of its
/// free room); the request takes the first, and an admission granted 1 is counted alone as
/// before. ARGV slots > 1 asks for that many leases (`<block id>:c<i>`) instead of the
/// request's own, granted only when nobody waits and half the slots stay free after them.
/// Logs live `BLOCK_MAX_MS` past their window, so a block's entries outlive it.
pub const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local nwin = tonumber(ARGV[2])
local member = ARGV[3]
local pos = 4

-- 1. requests windows (read only here)
local counts = {}
local maxes = {}
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
  maxes[i] = max
end
local cc_max = tonumber(ARGV[pos]); local ttl = tonumber(ARGV[pos + 1])
local wait_until = tonumber(ARGV[pos + 2])
local want_entries = tonumber(ARGV[pos + 3]); local want_slots = tonumber(ARGV[pos + 4])
local block = ARGV[pos + 5]; local block_end = now + tonumber(ARGV[pos + 6])
pos = pos + 7
local BLOCK_MAX_MS = 5000
-- a block only far from every window's max, so near it each request is counted alone
local grant = 1
if want_entries > 1 then
  grant = want_entries
  for i = 1, nwin do grant = math.min(grant, math.floor((maxes[i] - counts[i]) / 16)) end
  if grant < 2 then grant = 1 end
end

-- 2. token and cost windows from the aggregator's spend counters. Each window comes as runs
--    of consecutive buckets of one hash, oldest first: key, first bucket start, width, count,
--    then the count field names, handed to HMGET as they are (building ~150 names in Lua cost
--    Redis ~60 µs per request; this costs it ~10).
local nspend = tonumber(ARGV[pos]); pos = pos + 1
local sums = {}
for c = 1, nspend do
  local max = tonumber(ARGV[pos]); local window = tonumber(ARGV[pos + 1])
  local nruns = tonumber(ARGV[pos + 2]); pos = pos + 3
  -- only buckets with spend: {value, ms until it leaves the window}, oldest first
  local values = {}
  local sum = 0
  for r = 1, nruns do
    local k = tonumber(ARGV[pos]); local first = tonumber(ARGV[pos + 1])
    local width = tonumber(ARGV[pos + 2]); local n = tonumber(ARGV[pos + 3]); pos = pos + 4
    local got = redis.call('HMGET', KEYS[k], unpack(ARGV, pos, pos + n - 1))
    pos = pos + n
    for i = 1, n do
      local v = tonumber(got[i])
      if v and v ~= 0 then
        sum = sum + v
        values[#values + 1] = {v, math.max(0, first + i * width + window - now)}
      end
    end
  end
  sums[c] = sum
  if sum >= max then
    local wait = 0
    for f = 1, #values do
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
  sums[#sums + 1] = spent
end
-- what was read goes back to the gateway's spend cache at the end of a reply
local function with_spend(out)
  for i = 1, #sums do out[#out + 1] = sums[i] end
  return out
end

-- 4. concurrency: take a lease, unless the waiters queued before this request need every free
--    slot. The queue is scored by each waiter's deadline (arrival + the key's wait), so its
--    order is arrival order, and a waiter whose deadline passed has given up.
local free_after = 0
local slots = 0
if cc_max >= 0 then
  local k = KEYS[nwin + 1]
  local q = KEYS[nwin + 2]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local free = cc_max - redis.call('ZCARD', k)
  -- nobody waiting (the common case) costs one ZCARD
  local ahead = redis.call('ZCARD', q)
  local queued = ahead > 0
  if queued then
    redis.call('ZREMRANGEBYSCORE', q, '-inf', now)
    ahead = redis.call('ZRANK', q, member) or redis.call('ZCARD', q)
  end
  if free <= ahead then
    if wait_until > now then
      redis.call('ZADD', q, 'NX', wait_until, member)
      if redis.call('PTTL', q) < wait_until - now then
        redis.call('PEXPIRE', q, wait_until - now)
      end
    end
    return with_spend({0, 0, ahead})
  end
  if queued then redis.call('ZREM', q, member) end
  if want_slots > 1 and not queued and free - want_slots >= cc_max / 2 then
    local add = {}
    for j = 1, want_slots do
      add[#add + 1] = now + ttl; add[#add + 1] = block .. ':c' .. j
    end
    redis.call('ZADD', k, unpack(add))
    slots = want_slots
  else
    redis.call('ZADD', k, now + ttl, member)
  end
  redis.call('PEXPIRE', k, ttl * 2)
  free_after = free - math.max(slots, 1)
end

-- 5. admitted: count the request (or a block) in every window
local out = {1, free_after, grant, slots}
pos = 4
for i = 1, nwin do
  local window = tonumber(ARGV[pos]); pos = pos + 2
  if grant > 1 then
    local add = {}
    for j = 1, grant do add[#add + 1] = block_end; add[#add + 1] = block .. ':' .. j end
    redis.call('ZADD', KEYS[i], unpack(add))
  else
    redis.call('ZADD', KEYS[i], now, member)
  end
  redis.call('PEXPIRE', KEYS[i], window + BLOCK_MAX_MS)
  local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  out[#out + 1] = counts[i] + grant
  out[#out + 1] = tonumber(oldest[2]) + window - now
end
return with_spend(out)
"#;

/// Where the most constrained `requests` window of an admitted request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBudget {
    pub limit: u64,
    pub remaining: u64,
    /// Until the oldest counted request leaves the window.
    pub reset_ms: u64,
}

/// What the script decided for one attempt.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Admitted {
        budget: Option<RequestBudget>,
        /// Concurrency slots still free after this one: another waiter may go too.
        free_after: u64,
        /// What the script leased to this replica beyond the request itself.
        granted: Granted,
    },
    /// Every concurrency slot is taken (or claimed by earlier waiters).
    Full { ahead: u64 },
}

/// A block asked of the script with an attempt (`blocks.rs`); sizes of 0 or 1 ask for none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockAsk {
    /// Entries in every `requests` window.
    pub entries: u64,
    /// Concurrency slots.
    pub slots: u64,
    /// Unique per block: its members are `<id>:<i>` in the windows and `<id>:c<i>` in the
    /// lease set.
    pub id: String,
    /// How long the entries are counted ahead: they are scored `now + lifetime`.
    pub lifetime_ms: u64,
    /// The request already holds a slot of one of the replica's blocks: the script leaves the
    /// concurrency limit alone.
    pub slot_held: bool,
}

/// What an admitting reply granted. `entries` is 1 when the request was counted alone; the
/// request takes the first entry, and the first of the `slots` when any were granted (then it
/// has no lease of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Granted {
    pub entries: u64,
    pub slots: u64,
}

/// One `requests` window as the admitting reply left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCount {
    pub max: u64,
    /// Entries counted, this request's (or its block's) included.
    pub count: u64,
    pub reset_ms: u64,
}

/// The lease set, the wait queue and the spend hashes of a key.
pub fn lease_key(keyspace: &Keyspace, key_id: &str) -> String {
    keyspace.key(&format!("cc:{key_id}"))
}

pub fn queue_key(keyspace: &Keyspace, key_id: &str) -> String {
    keyspace.key(&format!("cq:{key_id}"))
}

pub fn spend_key(keyspace: &Keyspace, key_id: &str) -> String {
    keyspace.key(&format!("sp:{key_id}"))
}

pub fn window_key(keyspace: &Keyspace, key_id: &str, window_secs: u64) -> String {
    keyspace.key(&format!("rl:{key_id}:{window_secs}"))
}

/// The logs of a key's `requests` windows, in the key's order.
pub fn window_keys(keyspace: &Keyspace, key: &KeyRecord) -> Vec<String> {
    key.limits
        .iter()
        .filter(|l| l.metric == "requests")
        .map(|l| window_key(keyspace, &key.id, l.window_secs))
        .collect()
}

/// The inputs of one attempt.
pub struct Attempt<'a> {
    pub key: &'a KeyRecord,
    pub request_id: &'a str,
    pub now_ms: i64,
    pub lease_ttl_ms: u64,
    /// Until when the request may wait in the queue; 0 = it does not wait.
    pub wait_until_ms: i64,
    /// Read the spend counters for the token and cost windows and the budget. False when the
    /// limiter's cached sums already admit the key (`spend_cache.rs`).
    pub read_spend: bool,
}

/// One attempt's script call, and what is needed to read its reply.
pub struct Check<'a> {
    key: &'a KeyRecord,
    windows: Vec<(u64, u64)>,
    spend: Vec<&'a Limit>,
    /// How many sums end an admitting or queueing reply: one per spend limit and one for the
    /// budget, when the script read them.
    spent_len: usize,
    pub invocation: ScriptInvocation<'a>,
}

/// Whether a key has any limit the script must check.
pub fn is_limited(key: &KeyRecord) -> bool {
    !key.limits.is_empty() || key.budget_usd.is_some() || key.max_concurrency.is_some()
}

/// Whether a key has a limit that the aggregator's spend counters decide: a `tokens` or
/// `cost_usd` window, or a budget.
pub fn has_spend_limits(key: &KeyRecord) -> bool {
    key.budget_usd.is_some() || key.limits.iter().any(is_spend_limit)
}

/// Whether a key has a limit that needs the script whatever the spend: a `requests` window
/// (counted on admission) or `max_concurrency` (a lease taken).
pub fn has_counted_limits(key: &KeyRecord) -> bool {
    key.max_concurrency.is_some() || key.limits.iter().any(|l| l.metric == "requests")
}

fn is_spend_limit(limit: &Limit) -> bool {
    matches!(limit.metric.as_str(), "tokens" | "cost_usd")
}

/// A `tokens` or `cost_usd` limit in the spend counters' terms: the field prefix (`t` tokens,
/// `c` nanodollars), the window and the max in that unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendLimit {
    pub prefix: char,
    pub window_ms: i64,
    pub max: i64,
}

impl SpendLimit {
    pub fn of(limit: &Limit) -> Self {
        let window_ms =
            i64::try_from(limit.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4);
        let (prefix, max) = match limit.metric.as_str() {
            "tokens" => ('t', limit.max as i64),
            _ => ('c', nanodollars(limit.max)),
        };
        Self {
            prefix,
            window_ms,
            max,
        }
    }
}

/// The key's token and cost limits, in the key's order (the script's `-c` refusals count in it).
pub fn spend_limits(key: &KeyRecord) -> impl Iterator<Item = &Limit> {
    key.limits.iter().filter(|l| is_spend_limit(l))
}

/// What the script read from the spend counters for one key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Spent {
    /// Per token or cost window: (field prefix, window ms) → tokens or nanodollars in it.
    pub windows: Vec<(char, i64, i64)>,
    /// Lifetime cost in nanodollars (rounded up), when the key has a budget.
    pub lifetime_nanos: Option<i64>,
}

impl<'a> Check<'a> {
    /// A check that asks for no block.
    pub fn new(script: &'a Script, keyspace: &Keyspace, a: &Attempt<'a>) -> Self {
        Self::asking(script, keyspace, a, &BlockAsk::default())
    }

    pub fn asking(
        script: &'a Script,
        keyspace: &Keyspace,
        a: &Attempt<'a>,
        ask: &BlockAsk,
    ) -> Self {
        let key = a.key;
        let windows: Vec<(u64, u64)> = key
            .limits
            .iter()
            .filter(|l| l.metric == "requests")
            .map(|l| (l.window_secs.saturating_mul(1000), l.max as u64))
            .collect();
        let spend: Vec<&Limit> = spend_limits(key).collect();
        let spend_prefix = spend_key(keyspace, &key.id);
        let mut keys: Vec<String> = windows
            .iter()
            .map(|(window_ms, _)| window_key(keyspace, &key.id, window_ms / 1000))
            .collect();
        keys.push(lease_key(keyspace, &key.id));
        keys.push(queue_key(keyspace, &key.id));
        let mut key_index = |name: String| -> usize {
            match keys.iter().position(|k| *k == name) {
                Some(i) => i + 1,
                None => {
                    keys.push(name);
                    keys.len()
                }
            }
        };

        let mut invocation = script.prepare_invoke();
        invocation
            .arg(a.now_ms)
            .arg(windows.len())
            .arg(a.request_id);
        for (window_ms, max) in &windows {
            invocation.arg(*window_ms).arg(*max);
        }
        invocation
            .arg(if ask.slot_held {
                -1
            } else {
                key.max_concurrency.map_or(-1, i64::from)
            })
            .arg(a.lease_ttl_ms)
            .arg(a.wait_until_ms)
            .arg(ask.entries)
            .arg(ask.slots)
            .arg(ask.id.as_str())
            .arg(ask.lifetime_ms);
        // Without spend reads the script sees no spend limit and no budget; the tiling, the
        // bulk of this function's time, is skipped too.
        let read = if a.read_spend { &spend[..] } else { &[] };
        invocation.arg(read.len());
        for limit in read {
            let SpendLimit {
                prefix,
                window_ms,
                max,
            } = SpendLimit::of(limit);
            let reads = spend::window_reads(a.now_ms, window_ms);
            let runs = runs(&reads);
            invocation.arg(max).arg(window_ms).arg(runs.len());
            let mut field = String::with_capacity(16);
            for run in runs {
                let k = key_index(format!("{spend_prefix}{}", run.hash_suffix));
                invocation
                    .arg(k)
                    .arg(run.first)
                    .arg(run.width)
                    .arg(run.count);
                for i in 0..run.count as i64 {
                    field.clear();
                    // Writing to a String cannot fail.
                    let _ = write!(field, "{prefix}{}", run.first + i * run.width);
                    invocation.arg(field.as_str());
                }
            }
        }
        let read_budget = a.read_spend && key.budget_usd.is_some();
        match key.budget_usd {
            Some(budget) if read_budget => invocation
                .arg(key_index(spend_prefix))
                .arg(nanodollars(budget)),
            _ => invocation.arg(0).arg(0),
        };
        for k in &keys {
            invocation.key(k);
        }
        Self {
            key,
            windows,
            spent_len: read.len() + usize::from(read_budget),
            spend,
            invocation,
        }
    }

    /// The spend sums at the end of an admitting or queueing reply, when this check read them.
    pub fn spent(&self, reply: &[i64]) -> Option<Spent> {
        if self.spent_len == 0 {
            return None;
        }
        let tail = match reply {
            [1, _, _, _, rest @ ..] => rest.get(2 * self.windows.len()..)?,
            [0, 0, _, rest @ ..] => rest,
            _ => return None,
        };
        if tail.len() != self.spent_len {
            tracing::error!(reply = ?reply, "limiter reply without the spend it read");
            return None;
        }
        let windows: Vec<(char, i64, i64)> = self
            .spend
            .iter()
            .zip(tail)
            .map(|(limit, sum)| {
                let l = SpendLimit::of(limit);
                (l.prefix, l.window_ms, *sum)
            })
            .collect();
        Some(Spent {
            lifetime_nanos: tail.get(windows.len()).copied(),
            windows,
        })
    }

    /// Each `requests` window of an admitting reply, in the key's order.
    pub fn window_counts(&self, reply: &[i64]) -> Vec<WindowCount> {
        let [1, _, _, _, counts @ ..] = reply else {
            return Vec::new();
        };
        // Any spend sums follow the windows' pairs; `zip` stops before them.
        self.windows
            .iter()
            .zip(counts.chunks_exact(2))
            .filter_map(|((_, max), c)| {
                Some(WindowCount {
                    max: *max,
                    count: u64::try_from(*c.first()?).ok()?,
                    reset_ms: u64::try_from(*c.get(1)?).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Whether the reply refused the request for a token or cost window or the budget.
    pub fn refused_for_spend(reply: &[i64]) -> bool {
        matches!(reply, [0, index, _] if *index < 0)
    }

    /// Reads the script's reply: admitted, queued behind a full concurrency limit, or refused
    /// for a window or the budget.
    pub fn decide(&self, reply: &[i64]) -> Result<Verdict, GatewayError> {
        let key = self.key;
        // Round up: arriving a moment early would be refused again.
        let secs_up = |ms: i64| Some(u64::try_from(ms).unwrap_or(0).div_ceil(1000).max(1));
        match reply {
            [1, free_after, entries, slots, ..] => {
                let budget = self
                    .window_counts(reply)
                    .into_iter()
                    .map(|w| RequestBudget {
                        limit: w.max,
                        remaining: w.max.saturating_sub(w.count),
                        reset_ms: w.reset_ms,
                    })
                    .min_by_key(|b| b.remaining);
                Ok(Verdict::Admitted {
                    budget,
                    free_after: u64::try_from(*free_after).unwrap_or(0),
                    granted: Granted {
                        entries: u64::try_from(*entries).unwrap_or(1),
                        slots: u64::try_from(*slots).unwrap_or(0),
                    },
                })
            }
            [0, 0, ahead, ..] => Ok(Verdict::Full {
                ahead: u64::try_from(*ahead).unwrap_or(0),
            }),
            [0, -1_000_000, _] => Err(GatewayError::QuotaExceeded {
                limit: format!("budget_usd {} spent", key.budget_usd.unwrap_or(0.0)),
                retry_after_secs: None,
            }),
            [0, index, wait_ms] if *index < 0 => {
                let Some(limit) = usize::try_from(-index - 1)
                    .ok()
                    .and_then(|i| self.spend.get(i))
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
                let (window_ms, max) = self.windows.get(index).copied().unwrap_or_default();
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
}

/// The refusal for a full concurrency limit, after waiting `waited_ms` for a slot.
pub fn concurrency_refusal(key: &KeyRecord, waited_ms: Option<u64>) -> GatewayError {
    let max = key.max_concurrency.unwrap_or(0);
    GatewayError::RateLimited {
        limit: match waited_ms {
            Some(ms) => format!("max_concurrency {max} reached (no slot freed within {ms} ms)"),
            None => format!("max_concurrency {max} reached"),
        },
        retry_after_secs: Some(CONCURRENCY_RETRY_AFTER_SECS),
    }
}

/// Consecutive buckets of one spend hash.
#[derive(Debug, PartialEq, Eq)]
struct Run<'r> {
    hash_suffix: &'r str,
    first: i64,
    width: i64,
    count: usize,
}

/// The tiling's buckets as runs, oldest first (the script relies on that order to compute how
/// long until enough spend leaves the window).
fn runs(reads: &[spend::Read]) -> Vec<Run<'_>> {
    let mut runs: Vec<Run<'_>> = Vec::with_capacity(reads.len());
    for read in reads {
        let width = bucket_width(&read.hash_suffix);
        for &bucket in &read.buckets {
            match runs.last_mut() {
                Some(run)
                    if run.hash_suffix == read.hash_suffix
                        && run.first + run.width * run.count as i64 == bucket =>
                {
                    run.count += 1
                }
                _ => runs.push(Run {
                    hash_suffix: &read.hash_suffix,
                    first: bucket,
                    width,
                    count: 1,
                }),
            }
        }
    }
    runs.sort_by_key(|run| run.first);
    runs
}

/// USD → whole nanodollars (limits are compared in the unit the spend counters use).
pub fn nanodollars(usd: f64) -> i64 {
    (usd * 1e9).round() as i64
}

pub fn bucket_width(hash_suffix: &str) -> i64 {
    match hash_suffix.as_bytes().get(1) {
        Some(b'd') => 86_400_000,
        Some(b'h') => 3_600_000,
        _ => 60_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyRecord {
        KeyRecord {
            id: "key_1".into(),
            name: "k".into(),
            limits: vec![
                Limit {
                    metric: "requests".into(),
                    max: 5.0,
                    window_secs: 60,
                },
                Limit {
                    metric: "requests".into(),
                    max: 100.0,
                    window_secs: 3600,
                },
                Limit {
                    metric: "cost_usd".into(),
                    max: 1.5,
                    window_secs: 86_400,
                },
            ],
            budget_usd: Some(10.0),
            max_concurrency: Some(2),
            concurrency_wait_ms: 1000,
            ..KeyRecord::default()
        }
    }

    #[track_caller]
    fn check(reply: &[i64]) -> Result<Verdict, GatewayError> {
        read(true, reply).0
    }

    /// The verdict and the spend sums of a reply to a check that did or did not read spend.
    #[track_caller]
    fn read(read_spend: bool, reply: &[i64]) -> (Result<Verdict, GatewayError>, Option<Spent>) {
        let script = Script::new(SCRIPT);
        let keyspace = Keyspace::new("meter:events").unwrap();
        let key = key();
        let attempt = Attempt {
            key: &key,
            request_id: "r1",
            now_ms: 1_700_000_000_000,
            lease_ttl_ms: 60_000,
            wait_until_ms: 0,
            read_spend,
        };
        let check = Check::new(&script, &keyspace, &attempt);
        (check.decide(reply), check.spent(reply))
    }

    #[test]
    fn an_admitting_reply_ends_with_each_spend_window_sum_then_the_lifetime_cost() {
        let (verdict, spent) = read(true, &[1, 1, 1, 0, 3, 40_000, 10, 3_000_000, 123, 456]);
        assert!(
            matches!(verdict, Ok(Verdict::Admitted { budget: Some(b), .. }) if b.remaining == 2)
        );
        assert_eq!(
            spent,
            Some(Spent {
                windows: vec![('c', 86_400_000, 123)],
                lifetime_nanos: Some(456),
            })
        );
    }

    #[test]
    fn a_queueing_reply_brings_the_spend_it_read_too() {
        let (verdict, spent) = read(true, &[0, 0, 3, 123, 456]);
        assert_eq!(verdict.unwrap(), Verdict::Full { ahead: 3 });
        assert_eq!(spent.unwrap().lifetime_nanos, Some(456));
    }

    #[test]
    fn a_check_decided_by_the_spend_cache_reads_no_spend() {
        let (verdict, spent) = read(false, &[1, 1, 1, 0, 3, 40_000, 10, 3_000_000]);
        assert!(matches!(verdict, Ok(Verdict::Admitted { .. })));
        assert_eq!(spent, None);
    }

    #[test]
    fn a_reply_missing_its_spend_caches_nothing() {
        assert_eq!(read(true, &[1, 1, 1, 0, 3, 40_000, 10, 3_000_000]).1, None);
    }

    #[test]
    fn only_token_cost_and_budget_refusals_are_spend_refusals() {
        assert!(Check::refused_for_spend(&[0, -1, 1_001]));
        assert!(Check::refused_for_spend(&[0, -1_000_000, 0]));
        assert!(!Check::refused_for_spend(&[0, 2, 5_000]));
        assert!(!Check::refused_for_spend(&[0, 0, 3]));
    }

    #[test]
    fn an_admitted_request_reports_its_most_constrained_window() {
        let verdict = check(&[1, 1, 1, 0, 3, 40_000, 10, 3_000_000]).unwrap();
        assert_eq!(
            verdict,
            Verdict::Admitted {
                budget: Some(RequestBudget {
                    limit: 5,
                    remaining: 2,
                    reset_ms: 40_000
                }),
                free_after: 1,
                granted: Granted {
                    entries: 1,
                    slots: 0
                },
            }
        );
    }

    #[test]
    fn a_full_concurrency_limit_is_not_an_error_so_the_request_can_wait() {
        assert_eq!(check(&[0, 0, 3]).unwrap(), Verdict::Full { ahead: 3 });
    }

    #[test]
    fn a_spent_cost_window_is_a_quota_error_with_a_rounded_up_retry_after() {
        match check(&[0, -1, 1_001]) {
            Err(GatewayError::QuotaExceeded {
                limit,
                retry_after_secs,
            }) => {
                assert_eq!(limit, "1.5 cost_usd per 86400 s");
                assert_eq!(retry_after_secs, Some(2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_full_requests_window_names_itself() {
        match check(&[0, 2, 5_000]) {
            Err(GatewayError::RateLimited { limit, .. }) => {
                assert_eq!(limit, "100 requests per 3600 s")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_day_window_is_a_handful_of_runs_oldest_first_covering_it_whole() {
        let now = 20_000 * 86_400_000 + 13 * 3_600_000 + 17 * 60_000 + 5_000;
        let reads = spend::window_reads(now, 86_400_000);
        let runs = runs(&reads);
        assert!(runs.len() <= 5, "{runs:?}");
        for pair in runs.windows(2) {
            assert_eq!(
                pair[0].first + pair[0].width * pair[0].count as i64,
                pair[1].first
            );
        }
        let first = runs.first().unwrap();
        let last = runs.last().unwrap();
        assert_eq!(first.first, now - 5_000 - 86_400_000);
        assert_eq!(
            last.first + last.width * last.count as i64,
            now - 5_000 + 60_000
        );
    }

    #[test]
    fn every_key_of_the_script_shares_the_deployment_hash_tag() {
        let keyspace = Keyspace::new("meter:events").unwrap();
        for k in [
            lease_key(&keyspace, "key_1"),
            queue_key(&keyspace, "key_1"),
            spend_key(&keyspace, "key_1"),
            window_key(&keyspace, "key_1", 60),
        ] {
            assert!(k.starts_with("{meter:events}:"), "{k}");
        }
    }
}
