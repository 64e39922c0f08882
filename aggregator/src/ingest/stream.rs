//! One partition stream's entries as the consumer and the replay read them: the read itself,
//! the reply taken apart without copying the payloads, and the checks every event passes
//! before it is priced.

use std::collections::HashSet;

use redis::Value;
use shared::RedisConn;
use shared::{EVENT_FIELD, MAX_TOKENS, UsageEvent};

use crate::pricing::Usage;

/// Most entries one read of the stream asks for: a batch is read in several, one after the
/// other, as one read of 24,000 entries held Redis for tens of milliseconds, and every limit
/// check on that node waited behind it.
pub(crate) const READ_CHUNK: usize = 1_000;

/// One stream entry as read: its id and the raw `e` field, if any.
pub(crate) struct Entry {
    pub id: String,
    pub payload: Option<Vec<u8>>,
}

/// Drops every event whose id an earlier one of `events` has (a producer's retry that arrived
/// close behind its original). SipHash, as producers choose ids; borrowed, as a batch has
/// thousands.
pub(crate) fn keep_first_of_each_id(events: &mut Vec<(i64, UsageEvent)>) {
    let first = first_of_each_id(events.iter().map(|(_, e)| e.id.as_str()));
    let mut first = first.into_iter();
    events.retain(|_| first.next().unwrap_or(true));
}

/// For each of `ids`, whether no earlier one is the same.
pub(crate) fn first_of_each_id<'a>(ids: impl ExactSizeIterator<Item = &'a str>) -> Vec<bool> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.map(|id| seen.insert(id)).collect()
}

/// An event whose token counts no real request has (above [`MAX_TOKENS`]) is dead-lettered, not
/// counted: its counters could overflow, and a commit script that fails half-way keeps the
/// writes it made.
pub fn plausible(event: UsageEvent) -> Result<UsageEvent, String> {
    let counts = [
        ("input_tokens", event.input_tokens),
        ("output_tokens", event.output_tokens),
        (
            "cache_creation_input_tokens",
            event.cache_creation_input_tokens,
        ),
        (
            "cache_creation_1h_input_tokens",
            event.cache_creation_1h_input_tokens,
        ),
        ("cache_read_input_tokens", event.cache_read_input_tokens),
    ];
    match counts.iter().find(|(_, n)| *n > MAX_TOKENS) {
        Some((name, n)) => Err(format!("implausible {name}: {n} (more than {MAX_TOKENS})")),
        None => Ok(event),
    }
}

pub fn usage_of(event: &UsageEvent) -> Usage<'_> {
    Usage {
        model: &event.model,
        service_tier: event.service_tier.as_deref(),
        input_tokens: event.input_tokens,
        output_tokens: event.output_tokens,
        cache_creation_input_tokens: event.cache_creation_input_tokens,
        cache_creation_1h_input_tokens: event.cache_creation_1h_input_tokens,
        cache_read_input_tokens: event.cache_read_input_tokens,
    }
}

/// The millisecond part of a stream entry id: when Redis accepted the entry.
pub(crate) fn arrival_ms(entry_id: &str) -> i64 {
    entry_id
        .split_once('-')
        .map_or(entry_id, |(ms, _)| ms)
        .parse()
        .unwrap_or(0)
}

pub(crate) async fn read_entries(
    cmd: redis::Cmd,
    conn: &mut RedisConn,
) -> redis::RedisResult<Vec<Entry>> {
    let reply: Value = cmd.query_async(conn).await?;
    // Reply: [[stream, [entry, ...]]] or nil on timeout.
    let Value::Array(streams) = reply else {
        return Ok(Vec::new());
    };
    Ok(streams
        .into_iter()
        .filter_map(|pair| match pair {
            Value::Array(pair) => pair.into_iter().nth(1),
            _ => None,
        })
        .flat_map(take_entries)
        .collect())
}

/// The entries of a list of them, taken apart rather than copied out of (a batch's payloads
/// are megabytes).
pub(crate) fn take_entries(entries: Value) -> Vec<Entry> {
    match entries {
        Value::Array(entries) => entries.into_iter().filter_map(take_entry).collect(),
        _ => Vec::new(),
    }
}

/// `[id, [field, value, ...]]`; the field list is nil for an entry deleted while pending.
fn take_entry(value: Value) -> Option<Entry> {
    let Value::Array(parts) = value else {
        return None;
    };
    let mut parts = parts.into_iter();
    let id = into_string(parts.next()?)?;
    let mut payload = None;
    if let Some(Value::Array(fields)) = parts.next() {
        let mut fields = fields.into_iter();
        while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
            let named = match &field {
                Value::BulkString(f) => f.as_slice(),
                Value::SimpleString(f) => f.as_bytes(),
                _ => &[],
            };
            if named == EVENT_FIELD.as_bytes() {
                payload = into_bytes(value);
                break;
            }
        }
    }
    Some(Entry { id, payload })
}

fn into_bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// A stream entry id (or any text) of a reply.
pub(crate) fn into_string(value: Value) -> Option<String> {
    into_bytes(value).and_then(|b| String::from_utf8(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_token_counts_are_refused() {
        let mut event = shared::UsageEvent {
            v: 1,
            id: "x".into(),
            ts: 0,
            key_id: None,
            account_id: None,
            provider: "anthropic".into(),
            endpoint: "messages".into(),
            model: "m".into(),
            status: 200,
            stream: false,
            latency_us: 1,
            ttft_us: None,
            input_tokens: MAX_TOKENS,
            output_tokens: 0,
            cache_creation_input_tokens: 0,
            cache_creation_1h_input_tokens: 0,
            cache_read_input_tokens: 0,
            service_tier: None,
            error: None,
        };
        assert!(plausible(event.clone()).is_ok());
        event.cache_read_input_tokens = u64::MAX;
        let reason = plausible(event).unwrap_err();
        assert!(reason.contains("cache_read_input_tokens"), "{reason}");
    }

    #[test]
    fn arrival_time_is_the_id_millisecond_part() {
        assert_eq!(arrival_ms("1700000000123-7"), 1_700_000_000_123);
        assert_eq!(arrival_ms("garbage"), 0);
    }

    #[test]
    fn entries_are_parsed_with_and_without_payload() {
        let entry = Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"x".to_vec()),
                Value::BulkString(b"y".to_vec()),
                Value::BulkString(b"e".to_vec()),
                Value::BulkString(vec![1, 2, 3]),
            ]),
        ]);
        let parsed = take_entry(entry).unwrap();
        assert_eq!(
            (parsed.id.as_str(), parsed.payload),
            ("1-0", Some(vec![1, 2, 3]))
        );
        let deleted = Value::Array(vec![Value::BulkString(b"2-0".to_vec()), Value::Nil]);
        assert_eq!(take_entry(deleted).unwrap().payload, None);
    }
}
