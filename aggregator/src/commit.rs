//! Applies a batch to Redis exactly once: dedupe check, stats increments and `XACK` in one Lua
//! script, so no crash can separate "counted" from "acknowledged".
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
//! Every key the script touches carries the deployment's hash tag, so it runs on a cluster too.

use std::collections::BTreeMap;

use redis::Script;
use redis::aio::ConnectionManager;
use shared::Keyspace;

use crate::stats::Delta;

const SCRIPT: &str = r#"
local pos = 1
local function take() local v = ARGV[pos]; pos = pos + 1; return v end
local group = take()
local seen_ttl = tonumber(take())

-- 1. duplicates: nothing is written if any are found
local dups = {}
local n = tonumber(take())
for _ = 1, n do
  local k = tonumber(take()); local cnt = tonumber(take())
  for s = pos, pos + cnt - 1, 512 do
    local e = math.min(s + 511, pos + cnt - 1)
    local hit = redis.call('SMISMEMBER', KEYS[k], unpack(ARGV, s, e))
    for j = 1, #hit do if hit[j] == 1 then dups[#dups + 1] = ARGV[s + j - 1] end end
  end
  pos = pos + cnt
end
if #dups > 0 then return dups end

-- 2. record ids as seen
n = tonumber(take())
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
return {}
"#;

/// One event admitted to a commit: its id and the arrival slot its stream entry fell in.
pub struct Seen<'a> {
    pub id: &'a str,
    pub slot: i64,
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

    fn seen_key(&self, slot: i64) -> String {
        self.keyspace.key(&format!("seen:{slot}"))
    }

    /// Runs the commit. `Ok(dups)` non-empty means nothing was written: drop those ids from
    /// the batch and call again.
    pub async fn commit(
        &self,
        conn: &mut ConnectionManager,
        seen: &[Seen<'_>],
        delta: &Delta,
        acks: &[String],
    ) -> redis::RedisResult<Vec<String>> {
        let mut keys: Vec<String> = vec![self.keyspace.stream().to_owned()];
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        let mut key_index = |name: String, keys: &mut Vec<String>| -> usize {
            *index.entry(name.clone()).or_insert_with(|| {
                keys.push(name);
                keys.len()
            })
        };

        let mut by_slot: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
        for s in seen {
            by_slot.entry(s.slot).or_default().push(s.id);
        }
        let mut checks: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
        for (slot, ids) in &by_slot {
            for neighbour in slot - 1..=slot + 1 {
                checks.entry(neighbour).or_default().extend(ids);
            }
        }

        let mut invocation = self.script.prepare_invoke();
        invocation.arg(&self.group).arg(self.window_secs * 3);
        invocation.arg(checks.len());
        for (slot, ids) in &checks {
            let k = key_index(self.seen_key(*slot), &mut keys);
            invocation.arg(k).arg(ids.len()).arg(ids);
        }
        invocation.arg(by_slot.len());
        for (slot, ids) in &by_slot {
            let k = key_index(self.seen_key(*slot), &mut keys);
            invocation.arg(k).arg(ids.len()).arg(ids);
        }
        let writes = delta.writes(chrono::Utc::now().timestamp_millis());
        invocation.arg(writes.len());
        for write in &writes {
            let k = key_index(self.keyspace.key(&write.key), &mut keys);
            invocation
                .arg(k)
                .arg(write.expire_at.unwrap_or(0))
                .arg(write.fields.len());
            for (field, n) in &write.fields {
                invocation.arg(field).arg(*n);
            }
        }
        invocation.arg(acks.len()).arg(acks);
        for key in &keys {
            invocation.key(key);
        }
        invocation.invoke_async(conn).await
    }
}
