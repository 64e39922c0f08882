//! The record of entries that are applied but not yet acknowledged.
//!
//! A batch cut into several commits (`groups`) is acknowledged in stream order once all of them
//! applied: each commit acknowledging its own key's entries, scattered through the pending
//! list, cost Redis twice as much per entry. In between, an applied entry is still pending, and
//! a consumer that reads it again (its own pending entries after a crash, `XAUTOCLAIM`) must
//! not apply it twice. The seen-sets catch that only while they last (three dedupe windows),
//! so each commit also records its entries here, in the same script that applies them, in one
//! hash of the partition (no expiry): a field per commit, its entry ids space-separated.
//!
//! Whoever is about to read pending entries first settles the record: acknowledges every entry
//! in it and deletes the field, in one script per field. That is safe whoever's they are,
//! since every entry in it is applied; the consumer that wrote a field acknowledging the same
//! entries again later changes nothing. A replay settles it too, once registered: entries applied
//! before it started never reached its copy, and must not look pending to it, or it would leave
//! them to the live consumers, which have them already. (Every commit after the registration
//! writes the copy as well, so what it settles of those does no harm either.)

use redis::Script;
use shared::{Keyspace, RedisConn};

/// Acknowledges the entries of one field and deletes it. KEYS: the stream, the record; ARGV:
/// the group, the field. Replies with the number of entries.
const SETTLE: &str = r#"
local packed = redis.call('HGET', KEYS[2], ARGV[2])
if not packed then return 0 end
local ids = {}
for id in string.gmatch(packed, '%S+') do ids[#ids + 1] = id end
for s = 1, #ids, 512 do
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, s, math.min(s + 511, #ids)))
end
redis.call('HDEL', KEYS[2], ARGV[2])
return #ids
"#;

/// Entries acknowledged per `XACK`: about a quarter of a millisecond of Redis each.
const ACK_CHUNK: usize = 1000;

/// The partition's record.
pub fn key(keyspace: &Keyspace) -> String {
    keyspace.key("applied")
}

/// Entry ids as a field's value.
pub fn pack(entries: &[String]) -> String {
    let mut packed = String::with_capacity(entries.iter().map(|e| e.len() + 1).sum());
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            packed.push(' ');
        }
        packed.push_str(entry);
    }
    packed
}

/// Acknowledges a batch whose commits all applied: its entries in the order read (runs of the
/// pending list), then its fields of the record. Should this fail, or never run, the record
/// still says the entries are applied.
pub fn acknowledge(
    keyspace: &Keyspace,
    group: &str,
    entries: &[String],
    fields: &[String],
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for chunk in entries.chunks(ACK_CHUNK) {
        pipe.cmd("XACK")
            .arg(keyspace.stream())
            .arg(group)
            .arg(chunk)
            .ignore();
    }
    if !fields.is_empty() {
        pipe.cmd("HDEL").arg(key(keyspace)).arg(fields).ignore();
    }
    pipe
}

/// Acknowledges every entry the record holds; how many it held.
pub async fn settle(
    conn: &mut RedisConn,
    keyspace: &Keyspace,
    group: &str,
) -> redis::RedisResult<u64> {
    let record = key(keyspace);
    let fields: Vec<String> = redis::cmd("HKEYS").arg(&record).query_async(conn).await?;
    let script = Script::new(SETTLE);
    let mut settled = 0;
    for field in fields {
        let n: u64 = script
            .key(keyspace.stream())
            .key(&record)
            .arg(group)
            .arg(&field)
            .invoke_async(conn)
            .await?;
        settled += n;
    }
    Ok(settled)
}

/// Names a commit's field: unique per consumer (a consumer's name is unique in its group, and
/// the process's start tells its lives apart) and commit.
pub struct Fields {
    prefix: String,
    next: u64,
}

impl Fields {
    pub fn new(consumer: &str) -> Self {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        Self {
            prefix: format!("{consumer}:{started}:"),
            next: 0,
        }
    }

    pub fn next(&mut self) -> String {
        self.next += 1;
        format!("{}{}", self.prefix, self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_packed_space_separated() {
        assert_eq!(pack(&[]), "");
        assert_eq!(pack(&["1-0".into()]), "1-0");
        assert_eq!(
            pack(&["1-0".into(), "1-1".into(), "2-0".into()]),
            "1-0 1-1 2-0"
        );
    }

    #[test]
    fn fields_are_unique_per_consumer_and_life() {
        let mut a = Fields::new("agg-1");
        let (first, second) = (a.next(), a.next());
        assert!(
            first.starts_with("agg-1:") && first.ends_with(":1"),
            "{first}"
        );
        assert_ne!(first, second);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_ne!(Fields::new("agg-1").next(), first);
    }
}
