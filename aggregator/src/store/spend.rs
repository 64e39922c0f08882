//! Spend counters: per client key, tokens and cost over time, laid out so that the gateway can
//! sum any rolling window of up to 30 days with one script reading a few hundred fields.
//!
//! Layout (under the deployment's hash tag; `<k>` = key id; times are bucket starts, Unix ms):
//!
//! | key | fields | kept |
//! |---|---|---|
//! | `{t}:sp:<k>` | `t` tokens, `ch` + `cl` exact cost (nanodollars + attodollars), lifetime | for ever |
//! | `{t}:sp:<k>:d` | `t<day>`, `c<day>` per UTC day | for ever (one pair a day) |
//! | `{t}:sp:<k>:h:<day>` | `t<hour>`, `c<hour>` per hour of that day | 32 days after the day |
//! | `{t}:sp:<k>:m:<hour>` | `t<minute>`, `c<minute>` per minute of that hour | 26 hours after the hour |
//!
//! The retention of minutes and hours is `shared::spend_retention`'s, which the gateway's
//! window tiling reads too: it never reads a bucket this side may no longer keep.
//!
//! Window costs (`c…`) are whole nanodollars rounded up per key and minute of a batch, so a limit
//! can only trip early by less than a nanodollar per minute, never late; the lifetime cost is
//! exact. A window `[now − W, now)` is summed from minutes at its ragged ends, hours inside them,
//! and days in the middle.

use std::collections::HashMap;

use shared::UsageEvent;
use shared::spend_retention::{hours_gone_at, minutes_gone_at};

use crate::pricing::Cost;
use crate::store::rollup::{DAY_MS, HOUR_MS, MINUTE_MS};
use crate::store::stats::BucketWrite;

const ATTO_PER_NANO: i128 = 1_000_000_000;

#[derive(Debug, Default, Clone, Copy)]
struct Spent {
    tokens: i64,
    cost: Cost,
}

impl Spent {
    fn add(&mut self, tokens: i64, cost: Cost) {
        self.tokens += tokens;
        self.cost += cost;
    }

    /// Whole nanodollars, rounded up.
    fn nanos_up(&self) -> i64 {
        let atto = self.cost.atto();
        let nanos =
            atto.div_euclid(ATTO_PER_NANO) + i128::from(atto.rem_euclid(ATTO_PER_NANO) != 0);
        i64::try_from(nanos).unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Default)]
pub struct SpendDelta {
    /// (key id, minute start) → spent in that minute.
    minutes: HashMap<(String, i64), Spent>,
}

impl SpendDelta {
    pub fn add(&mut self, event: &UsageEvent, cost: Option<Cost>) {
        let Some(key) = &event.key_id else {
            return;
        };
        let tokens = i64::try_from(event.total_tokens()).unwrap_or(i64::MAX);
        let minute = event.ts.div_euclid(MINUTE_MS) * MINUTE_MS;
        self.minutes
            .entry((key.clone(), minute))
            .or_default()
            .add(tokens, cost.unwrap_or(Cost::ZERO));
    }

    /// The increments, as writes to hashes (below the keyspace prefix), for `now_ms`: minutes
    /// and hours past their retention are not written.
    pub fn writes(&self, now_ms: i64) -> Vec<BucketWrite> {
        let mut writes: HashMap<String, BucketWrite> = HashMap::new();
        let mut add = |key: String, expire_at: Option<i64>, field: String, n: i64| {
            if n == 0 {
                return;
            }
            writes
                .entry(key.clone())
                .or_insert_with(|| BucketWrite {
                    key,
                    expire_at,
                    fields: Vec::new(),
                })
                .fields
                .push((field, n));
        };
        let mut lifetime: HashMap<&str, Spent> = HashMap::new();
        for ((key, minute), spent) in &self.minutes {
            let hour = minute.div_euclid(HOUR_MS) * HOUR_MS;
            let day = minute.div_euclid(DAY_MS) * DAY_MS;
            let nanos = spent.nanos_up();
            if minutes_gone_at(hour) > now_ms {
                let (k, at) = (format!("sp:{key}:m:{hour}"), minutes_gone_at(hour) / 1000);
                add(k.clone(), Some(at), format!("t{minute}"), spent.tokens);
                add(k, Some(at), format!("c{minute}"), nanos);
            }
            if hours_gone_at(day) > now_ms {
                let (k, at) = (format!("sp:{key}:h:{day}"), hours_gone_at(day) / 1000);
                add(k.clone(), Some(at), format!("t{hour}"), spent.tokens);
                add(k, Some(at), format!("c{hour}"), nanos);
            }
            add(format!("sp:{key}:d"), None, format!("t{day}"), spent.tokens);
            add(format!("sp:{key}:d"), None, format!("c{day}"), nanos);
            lifetime
                .entry(key.as_str())
                .or_default()
                .add(spent.tokens, spent.cost);
        }
        for (key, spent) in lifetime {
            let atto = spent.cost.atto();
            let k = format!("sp:{key}");
            add(k.clone(), None, "t".into(), spent.tokens);
            add(
                k.clone(),
                None,
                "ch".into(),
                i64::try_from(atto.div_euclid(ATTO_PER_NANO)).unwrap_or(i64::MAX),
            );
            add(
                k,
                None,
                "cl".into(),
                i64::try_from(atto.rem_euclid(ATTO_PER_NANO)).unwrap_or(i64::MAX),
            );
        }
        writes.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: Option<&str>, ts: i64, tokens: u64) -> UsageEvent {
        UsageEvent {
            v: 1,
            id: "x".into(),
            ts,
            key_id: key.map(str::to_owned),
            account_id: None,
            provider: "anthropic".into(),
            endpoint: "messages".into(),
            model: "m".into(),
            status: 200,
            stream: false,
            latency_us: 1,
            ttft_us: None,
            input_tokens: tokens,
            output_tokens: 1,
            cache_creation_input_tokens: 0,
            cache_creation_1h_input_tokens: 0,
            cache_read_input_tokens: 0,
            service_tier: None,
            error: None,
        }
    }

    fn field(writes: &[BucketWrite], key: &str, field: &str) -> Option<i64> {
        writes
            .iter()
            .filter(|w| w.key == key)
            .flat_map(|w| w.fields.iter())
            .filter(|(f, _)| f == field)
            .map(|(_, n)| *n)
            .reduce(|a, b| a + b)
    }

    #[test]
    fn one_event_is_counted_at_every_level() {
        let mut delta = SpendDelta::default();
        let ts = DAY_MS + 2 * HOUR_MS + 3 * MINUTE_MS + 7;
        delta.add(
            &event(Some("k"), ts, 9),
            Some(Cost::from_atto(1_500_000_000)),
        );
        let writes = delta.writes(ts);
        let minute = ts - 7;
        let hour = DAY_MS + 2 * HOUR_MS;
        assert_eq!(
            field(&writes, &format!("sp:k:m:{hour}"), &format!("t{minute}")),
            Some(10)
        );
        assert_eq!(
            field(&writes, &format!("sp:k:m:{hour}"), &format!("c{minute}")),
            Some(2),
            "1.5 nanodollars round up"
        );
        assert_eq!(
            field(&writes, &format!("sp:k:h:{DAY_MS}"), &format!("t{hour}")),
            Some(10)
        );
        assert_eq!(field(&writes, "sp:k:d", &format!("c{DAY_MS}")), Some(2));
        assert_eq!(field(&writes, "sp:k", "t"), Some(10));
        assert_eq!(
            (field(&writes, "sp:k", "ch"), field(&writes, "sp:k", "cl")),
            (Some(1), Some(500_000_000)),
            "lifetime is exact"
        );
    }

    #[test]
    fn events_without_a_key_and_expired_minutes_are_not_written() {
        let mut delta = SpendDelta::default();
        delta.add(&event(None, 0, 5), None);
        assert!(delta.writes(0).is_empty());
        delta.add(&event(Some("k"), 0, 5), None);
        let writes = delta.writes(3 * DAY_MS);
        assert!(writes.iter().all(|w| !w.key.starts_with("sp:k:m:")));
        assert!(writes.iter().any(|w| w.key.starts_with("sp:k:h:")));
    }
}
