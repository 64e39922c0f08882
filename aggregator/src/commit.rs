//! Applies a batch to Redis exactly once: state check, dedupe check, stats increments and `XACK`
//! in one Lua script, so no crash can separate "counted" from "acknowledged".
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

use redis::Script;
use redis::aio::ConnectionManager;
use shared::Keyspace;

use crate::control;
use crate::stats::BucketWrite;

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
  redis.call('HDEL', KEYS[2], 'rid', 'rfrom', 'rto')
  rid = '0'
end
if pv .. ':' .. rid ~= token then return {'stale'} end

-- 1. duplicates, live then shadow: nothing is written if any are found
for _, status in ipairs({'dup', 'sdup'}) do
  local out = {status}
  local n = tonumber(take())
  for _ = 1, n do
    local k = tonumber(take()); local cnt = tonumber(take())
    for s = pos, pos + cnt - 1, 512 do
      local e = math.min(s + 511, pos + cnt - 1)
      local hit = redis.call('SMISMEMBER', KEYS[k], unpack(ARGV, s, e))
      for j = 1, #hit do if hit[j] == 1 then out[#out + 1] = ARGV[s + j - 1] end end
    end
    pos = pos + cnt
  end
  if #out > 1 then return out end
end

-- 2. record ids as seen
local n = tonumber(take())
for _ = 1, n do
  local k = tonumber(take()); local cnt = tonumber(take())
  for s = pos, pos + cnt - 1, 512 do
    redis.call('SADD', KEYS[k], unpack(ARGV, s, math.min(s + 511, pos + cnt - 1)))
  end
  redis.call('EXPIRE', KEYS[k], seen_ttl)
  pos = pos + cnt
end

-- 3. stats increments: key index, expiry (unix s, 0 = keep), pair count, then field/incr pairs
n = tonumber(take())
for _ = 1, n do
  local k = tonumber(take()); local expire_at = tonumber(take()); local cnt = tonumber(take())
  for _ = 1, cnt do
    local f = take(); redis.call('HINCRBY', KEYS[k], f, take())
  end
  if expire_at > 0 then redis.call('EXPIREAT', KEYS[k], expire_at) end
end

-- 4. acknowledge every entry of the batch, duplicates and dead letters included
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

/// Everything one commit applies. Key names are below the keyspace prefix; shadow ones carry
/// their replay's prefix already.
pub struct Batch<'a> {
    pub token: &'a str,
    pub live: &'a [Seen<'a>],
    /// The replay's shadow prefix (`rp<rid>:`) and the events applied to its copy.
    pub shadow: Option<(&'a str, &'a [Seen<'a>])>,
    pub writes: &'a [BucketWrite],
    pub acks: &'a [String],
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
}

pub struct Committer {
    script: Script,
    keyspace: Keyspace,
    group: String,
    window_secs: i64,
}

impl Committer {
    pub fn new(keyspace: Keyspace, group: String, window_secs: i64) -> Self {
        Self {
            script: Script::new(SCRIPT),
            keyspace,
            group,
            window_secs: window_secs.max(1),
        }
    }

    /// The dedupe slot of a stream entry that arrived at `arrival_ms`.
    pub fn slot_of(&self, arrival_ms: i64) -> i64 {
        arrival_ms.div_euclid(self.window_secs * 1000)
    }

    pub async fn commit(
        &self,
        conn: &mut ConnectionManager,
        batch: &Batch<'_>,
    ) -> redis::RedisResult<Outcome> {
        let mut keys: Vec<String> = vec![
            self.keyspace.stream().to_owned(),
            self.keyspace.key(control::CTL),
        ];
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        let mut key_index = |name: String, keys: &mut Vec<String>| -> usize {
            *index.entry(name.clone()).or_insert_with(|| {
                keys.push(name);
                keys.len()
            })
        };

        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(&self.group)
            .arg(self.window_secs * 3)
            .arg(batch.token)
            .arg(self.keyspace.key(""));
        let sets: Vec<(&str, &[Seen])> = std::iter::once(("", batch.live))
            .chain(batch.shadow)
            .collect();
        let mut records: Vec<(String, Vec<&str>)> = Vec::new();
        for (section, (prefix, seen)) in sets.iter().enumerate() {
            let mut by_slot: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
            for s in seen.iter() {
                by_slot.entry(s.slot).or_default().push(s.id);
            }
            let mut checks: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
            for (slot, ids) in &by_slot {
                for neighbour in slot - 1..=slot + 1 {
                    checks.entry(neighbour).or_default().extend(ids);
                }
            }
            invocation.arg(checks.len());
            for (slot, ids) in &checks {
                let k = key_index(self.seen_key(prefix, *slot), &mut keys);
                invocation.arg(k).arg(ids.len()).arg(ids);
            }
            if section == 0 && batch.shadow.is_none() {
                invocation.arg(0);
            }
            records.extend(
                by_slot
                    .into_iter()
                    .map(|(slot, ids)| (self.seen_key(prefix, slot), ids)),
            );
        }
        invocation.arg(records.len());
        for (key, ids) in records {
            let k = key_index(key, &mut keys);
            invocation.arg(k).arg(ids.len()).arg(ids);
        }
        invocation.arg(batch.writes.len());
        for write in batch.writes {
            let k = key_index(self.keyspace.key(&write.key), &mut keys);
            invocation
                .arg(k)
                .arg(write.expire_at.unwrap_or(0))
                .arg(write.fields.len());
            for (field, n) in &write.fields {
                invocation.arg(field).arg(*n);
            }
        }
        invocation.arg(batch.acks.len()).arg(batch.acks);
        for key in &keys {
            invocation.key(key);
        }
        let mut reply: Vec<String> = invocation.invoke_async(conn).await?;
        let status = if reply.is_empty() {
            String::new()
        } else {
            reply.remove(0)
        };
        Ok(match status.as_str() {
            "ok" => Outcome::Applied,
            "dup" => Outcome::Duplicates(reply),
            "sdup" => Outcome::ShadowDuplicates(reply),
            _ => Outcome::Stale,
        })
    }

    fn seen_key(&self, prefix: &str, slot: i64) -> String {
        self.keyspace.key(&format!("{prefix}seen:{slot}"))
    }
}
