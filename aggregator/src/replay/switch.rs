//! The end of a replay: its shadow copy replaces the live figures of the days it rebuilt.
//!
//! 1. **Freeze**: `{t}:ctl` gets `rfz = <rid>`; from then on every live commit returns `frozen`
//!    and is retried a moment later, so nothing changes under the steps below. The lease still
//!    guards it: if the replay dies here, its lease expires and the next commit lifts the freeze
//!    together with the replay (`commit.rs`).
//! 2. **Read and compute**: the live and the shadow day cells of every day in range. Their
//!    difference per tuple is what each month cell must change by, and per key what the lifetime
//!    spend must change by (both also hold days outside the range, which are not rebuilt). The
//!    arithmetic is exact (i128 attodollars) and done here, since cells are packed values.
//! 3. **Switch** (one script): write the months and lifetime spend, rename the shadow's day,
//!    hour and minute cells and spend windows over the live ones, hand over the pricing, bump the
//!    pricing version (which makes every commit priced before it stale) and lift the freeze.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redis::{AsyncCommands, Script};
use shared::Keyspace;
use shared::RedisConn;

use crate::pricing::Cost;
use crate::replay::control;
use crate::replay::{CostChange, ReplayError};
use crate::store::cell::{self, Cell};
use crate::store::rollup::Resolution;
use crate::store::stats::{Totals, read_tuple};

const FREEZE: &str = r#"
if redis.call('HGET', KEYS[1], 'rid') ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'rfz', ARGV[1])
return 1
"#;

const SWITCH: &str = r#"
local P, rid = ARGV[1], ARGV[2]
local S = P .. 'rp' .. rid .. ':'
if redis.call('HGET', KEYS[1], 'rid') ~= rid or redis.call('HGET', KEYS[1], 'rfz') ~= rid then
  return 'stale'
end
local now, fingerprint = tonumber(ARGV[3]), ARGV[4]
local DAY, HOUR, MINUTE = 86400000, 3600000, 60000
local pos = 5
local function take() local v = ARGV[pos]; pos = pos + 1; return v end
local function s(n) return string.format('%d', n) end

-- month cells: per month its key, the cells to set (field, value) and the fields to delete
local n = tonumber(take())
for _ = 1, n do
  local key = P .. take()
  local sets = tonumber(take())
  for i = pos, pos + 2 * sets - 1, 512 do
    redis.call('HSET', key, unpack(ARGV, i, math.min(i + 511, pos + 2 * sets - 1)))
  end
  pos = pos + 2 * sets
  local dels = tonumber(take())
  for i = pos, pos + dels - 1, 512 do
    redis.call('HDEL', key, unpack(ARGV, i, math.min(i + 511, pos + dels - 1)))
  end
  pos = pos + dels
end

-- lifetime spend: key id, then its new tokens, nanodollars and remaining attodollars
n = tonumber(take())
for _ = 1, n do
  local key = take()
  redis.call('HSET', P .. 'sp:' .. key, 't', take(), 'ch', take(), 'cl', take())
end

-- the keys with spend on those days, then the days
local keys = {}
n = tonumber(take())
for _ = 1, n do keys[#keys + 1] = take() end
local days = {}
while pos <= #ARGV do days[#days + 1] = tonumber(take()) end

local function swap(name)
  if redis.call('EXISTS', S .. name) == 1 then redis.call('RENAME', S .. name, P .. name)
  else redis.call('DEL', P .. name) end
end
for _, d in ipairs(days) do
  swap('st:d:' .. s(d))
  for h = 0, 23 do swap('st:h:' .. s(d + h * HOUR)) end
  if d + DAY + 49 * HOUR > now then
    for m = 0, 1439 do swap('st:m:' .. s(d + m * MINUTE)) end
  end
end
for _, key in ipairs(keys) do
  for _, d in ipairs(days) do
    local daily, t, c = 'sp:' .. key .. ':d', 't' .. s(d), 'c' .. s(d)
    redis.call('HDEL', P .. daily, t, c)
    local v = redis.call('HMGET', S .. daily, t, c)
    if v[1] then redis.call('HSET', P .. daily, t, v[1]) end
    if v[2] then redis.call('HSET', P .. daily, c, v[2]) end
    swap('sp:' .. key .. ':h:' .. s(d))
    if d + DAY + 27 * HOUR > now then
      for h = 0, 23 do swap('sp:' .. key .. ':m:' .. s(d + h * HOUR)) end
    end
  end
end

if redis.call('EXISTS', S .. 'pricing') == 1 then
  redis.call('RENAME', S .. 'pricing', P .. 'pricing')
  redis.call('HSET', KEYS[1], 'pfp', fingerprint)
end
redis.call('HINCRBY', KEYS[1], 'pv', 1)
redis.call('HDEL', KEYS[1], 'rid', 'rfrom', 'rto', 'rend', 'rfz')
return 'ok'
"#;

const ATTO_PER_NANO: i128 = 1_000_000_000;

/// What the switch changed: days swapped in, and per model the cost of those days before and
/// after.
pub struct Switched {
    pub days: usize,
    pub models: BTreeMap<String, CostChange>,
}

/// Freezes commits, computes the changes to months and lifetime spend, and switches.
/// `fingerprint`: of the replay's own pricing, empty when it kept the deployment's.
pub async fn run(
    conn: &mut RedisConn,
    keyspace: &Keyspace,
    rid: i64,
    (from_ms, to_ms): (i64, i64),
    fingerprint: &str,
) -> Result<Switched, ReplayError> {
    let frozen: i64 = Script::new(FREEZE)
        .key(keyspace.key(control::CTL))
        .key(keyspace.key(&control::lease_key(rid)))
        .arg(rid.to_string())
        .invoke_async(conn)
        .await?;
    if frozen != 1 {
        return Err(ReplayError::Abandoned);
    }
    let shadow = control::shadow_prefix(rid);
    let days = days_in_range(conn, keyspace, &shadow, (from_ms, to_ms)).await?;

    let mut months: BTreeMap<i64, HashMap<String, Totals>> = BTreeMap::new();
    let mut spend: BTreeMap<String, (i64, Cost)> = BTreeMap::new();
    let mut models: BTreeMap<String, CostChange> = BTreeMap::new();
    for &day in &days {
        let key = Resolution::Day.key(day);
        let live = read_cells(conn, &keyspace.key(&key)).await?;
        let rebuilt = read_cells(conn, &keyspace.key(&format!("{shadow}{key}"))).await?;
        let month = months.entry(Resolution::Month.start_of(day)).or_default();
        for (side, cells) in [(-1, live), (1, rebuilt)] {
            for (field, totals) in cells {
                let Some(dims) = read_tuple(&field) else {
                    continue;
                };
                let change = models.entry(dims.0[1].clone()).or_default();
                let diff = month.entry(field).or_default();
                let key_spend = (!dims.0[0].is_empty())
                    .then(|| spend.entry(dims.0[0].clone()).or_insert((0, Cost::ZERO)));
                if side < 0 {
                    change.before += totals.cost;
                    diff.subtract(&totals);
                    if let Some((tokens, cost)) = key_spend {
                        *tokens -= totals.tokens();
                        *cost = *cost - totals.cost;
                    }
                } else {
                    change.after += totals.cost;
                    diff.add(&totals);
                    if let Some((tokens, cost)) = key_spend {
                        *tokens += totals.tokens();
                        *cost += totals.cost;
                    }
                }
            }
        }
    }

    let switch = Script::new(SWITCH);
    let mut script = switch.prepare_invoke();
    script
        .key(keyspace.key(control::CTL))
        .arg(keyspace.key(""))
        .arg(rid.to_string())
        .arg(chrono::Utc::now().timestamp_millis())
        .arg(fingerprint);
    script.arg(months.len());
    for (month, diffs) in &months {
        let key = Resolution::Month.key(*month);
        let fields: Vec<&String> = diffs.keys().collect();
        let current: Vec<Option<Vec<u8>>> = if fields.is_empty() {
            Vec::new()
        } else {
            redis::cmd("HMGET")
                .arg(keyspace.key(&key))
                .arg(&fields)
                .query_async(conn)
                .await?
        };
        let (mut sets, mut dels): (Vec<(&String, Vec<u8>)>, Vec<&String>) = (vec![], vec![]);
        for (field, value) in fields.into_iter().zip(current) {
            let mut cell = match value.as_deref().map(Cell::decode) {
                None => Cell::default(),
                Some(Some(cell)) => cell,
                Some(None) => return Err(corrupt(keyspace.key(&key), field)),
            };
            cell.totals.add(&diffs[field]);
            if cell.is_empty() {
                dels.push(field);
            } else {
                sets.push((field, cell.encode(cell::new_stamp())));
            }
        }
        script.arg(key).arg(sets.len());
        for (field, value) in &sets {
            script.arg(*field).arg(&value[..]);
        }
        script.arg(dels.len()).arg(&dels);
    }

    let changed: Vec<(&String, &(i64, Cost))> = spend
        .iter()
        .filter(|(_, (tokens, cost))| *tokens != 0 || *cost != Cost::ZERO)
        .collect();
    script.arg(changed.len());
    for (key, (tokens, cost)) in &changed {
        let (t, ch, cl): (Option<i64>, Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(keyspace.key(&format!("sp:{key}")))
            .arg("t")
            .arg("ch")
            .arg("cl")
            .query_async(conn)
            .await?;
        let atto =
            i128::from(ch.unwrap_or(0)) * ATTO_PER_NANO + i128::from(cl.unwrap_or(0)) + cost.atto();
        script
            .arg(*key)
            .arg(t.unwrap_or(0).saturating_add(*tokens))
            .arg(i64::try_from(atto.div_euclid(ATTO_PER_NANO)).unwrap_or(i64::MAX))
            .arg(i64::try_from(atto.rem_euclid(ATTO_PER_NANO)).unwrap_or(i64::MAX));
    }
    script
        .arg(spend.len())
        .arg(spend.keys().collect::<Vec<_>>());
    script.arg(&days);
    let reply: String = script.invoke_async(conn).await?;
    if reply != "ok" {
        return Err(ReplayError::Abandoned);
    }
    models.retain(|_, change| *change != CostChange::default());
    Ok(Switched {
        days: days.len(),
        models,
    })
}

/// Days in `[from, to)` with live cells, or rebuilt by the replay (listed in its `days`).
async fn days_in_range(
    conn: &mut RedisConn,
    keyspace: &Keyspace,
    shadow: &str,
    (from_ms, to_ms): (i64, i64),
) -> redis::RedisResult<Vec<i64>> {
    let mut days: BTreeSet<i64> = BTreeSet::new();
    let day_prefix = keyspace.key(&Resolution::Day.key_prefix());
    for key in conn.scan_slot(&format!("{day_prefix}*")).await? {
        if let Some(day) = key.strip_prefix(&day_prefix).and_then(|d| d.parse().ok()) {
            days.insert(day);
        }
    }
    let rebuilt: Vec<String> = conn.hkeys(keyspace.key(&format!("{shadow}days"))).await?;
    days.extend(rebuilt.iter().filter_map(|d| d.parse::<i64>().ok()));
    Ok(days
        .into_iter()
        .filter(|d| (from_ms..to_ms).contains(d))
        .collect())
}

/// The counters of every cell in a bucket hash.
async fn read_cells(conn: &mut RedisConn, key: &str) -> Result<Vec<(String, Totals)>, ReplayError> {
    let fields: Vec<(String, Vec<u8>)> = conn.hgetall(key).await?;
    fields
        .into_iter()
        .map(|(field, value)| match Cell::decode_totals(&value) {
            Some(totals) => Ok((field, totals)),
            None => Err(corrupt(key.to_owned(), &field)),
        })
        .collect()
}

fn corrupt(key: String, field: &str) -> ReplayError {
    ReplayError::Commit(crate::ingest::commit::CommitError::Corrupt {
        key,
        field: field.to_owned(),
    })
}
