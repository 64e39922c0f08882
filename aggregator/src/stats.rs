//! The stats data model: dimensions, totals, time buckets, and how they are laid out in Redis.
//!
//! Every event lands in one cell per resolution (see `rollup`): (bucket of its `ts`) × (key,
//! model, account, provider, endpoint, status). A cell is a set of counters in the bucket's
//! Redis hash, one hash field per counter: `<metric>:<tuple>`; latency and time-to-first-token
//! sketches add one field per occupied bin, `l<bin>:<tuple>` and `t<bin>:<tuple>`. Group-by and
//! filters are applied when reading, so any grouping of the six dimensions is answered from the
//! same cells and always sums to the same totals.
//!
//! Costs are exact: attodollars (1e-18 USD) split into two integer counters, `ch` (whole
//! nanodollars) and `cl` (the remaining attodollars, < 1e9 per event), because Redis counters
//! are 64-bit and a total in attodollars alone would overflow at 9.2 USD.

use std::collections::HashMap;

use shared::UsageEvent;

use crate::pricing::Cost;
use crate::rollup::Resolution;
use crate::sketch;
use crate::spend::SpendDelta;

const ATTO_PER_NANO: i128 = 1_000_000_000;
/// Separates dimension values inside a field name; values never contain it (see [`clean`]).
const SEP: char = '\u{1f}';

/// The six dimensions, in tuple order.
pub const DIMENSIONS: [&str; 6] = ["key", "model", "account", "provider", "endpoint", "status"];

/// One combination of dimension values. `key` and `account` are empty when absent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dims(pub [String; 6]);

impl Dims {
    pub fn of(event: &UsageEvent) -> Self {
        Self([
            clean(event.key_id.as_deref().unwrap_or("")),
            clean(&event.model),
            clean(event.account_id.as_deref().unwrap_or("")),
            clean(&event.provider),
            clean(&event.endpoint),
            event.status.to_string(),
        ])
    }

    fn encode(&self) -> String {
        self.0.join(&SEP.to_string())
    }

    fn decode(s: &str) -> Option<Self> {
        let mut parts = s.split(SEP);
        let dims = std::array::from_fn(|_| parts.next().unwrap_or_default().to_owned());
        // Exactly six parts, no more.
        (parts.next().is_none() && s.matches(SEP).count() == 5).then_some(Self(dims))
    }
}

/// A value that would contain the separator is stored with a replacement character instead;
/// such names do not occur in practice, and it keeps fields unambiguous.
fn clean(value: &str) -> String {
    value.replace(SEP, "\u{fffd}")
}

/// Counters of one cell, or of any sum of cells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: i64,
    pub errors: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_creation_input_tokens: i64,
    pub cache_creation_1h_input_tokens: i64,
    pub cache_read_input_tokens: i64,
    pub cost: Cost,
    pub unpriced_requests: i64,
}

fn tokens(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Totals {
    pub fn of(event: &UsageEvent, cost: Option<Cost>) -> Self {
        Self {
            requests: 1,
            errors: i64::from(event.status >= 400),
            input_tokens: tokens(event.input_tokens),
            output_tokens: tokens(event.output_tokens),
            cache_creation_input_tokens: tokens(event.cache_creation_input_tokens),
            cache_creation_1h_input_tokens: tokens(event.cache_creation_1h_input_tokens),
            cache_read_input_tokens: tokens(event.cache_read_input_tokens),
            cost: cost.unwrap_or(Cost::ZERO),
            unpriced_requests: i64::from(cost.is_none()),
        }
    }

    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_creation_1h_input_tokens += other.cache_creation_1h_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.cost += other.cost;
        self.unpriced_requests += other.unpriced_requests;
    }

    /// The counters as hash-field increments; zero increments are left out.
    fn increments(&self) -> impl Iterator<Item = (&'static str, i64)> {
        let atto = self.cost.atto();
        let (hi, lo) = (
            atto.div_euclid(ATTO_PER_NANO),
            atto.rem_euclid(ATTO_PER_NANO),
        );
        [
            ("r", self.requests),
            ("e", self.errors),
            ("i", self.input_tokens),
            ("o", self.output_tokens),
            ("cc", self.cache_creation_input_tokens),
            ("c1", self.cache_creation_1h_input_tokens),
            ("cr", self.cache_read_input_tokens),
            ("ch", i64::try_from(hi).unwrap_or(i64::MAX)),
            ("cl", i64::try_from(lo).unwrap_or(i64::MAX)),
            ("u", self.unpriced_requests),
        ]
        .into_iter()
        .filter(|(_, n)| *n != 0)
    }

    fn set(&mut self, metric: &str, value: i64) {
        match metric {
            "r" => self.requests += value,
            "e" => self.errors += value,
            "i" => self.input_tokens += value,
            "o" => self.output_tokens += value,
            "cc" => self.cache_creation_input_tokens += value,
            "c1" => self.cache_creation_1h_input_tokens += value,
            "cr" => self.cache_read_input_tokens += value,
            "ch" => self.cost += Cost::from_atto(i128::from(value) * ATTO_PER_NANO),
            "cl" => self.cost += Cost::from_atto(i128::from(value)),
            "u" => self.unpriced_requests += value,
            _ => {}
        }
    }
}

/// One cell's change within a batch.
#[derive(Debug, Default)]
struct CellDelta {
    totals: Totals,
    latency: HashMap<u32, i64>,
    ttft: HashMap<u32, i64>,
}

/// A batch's effect on the stats: cells summed in memory, so a batch of many events costs
/// one increment per touched counter.
#[derive(Debug, Default)]
pub struct Delta {
    cells: HashMap<(Resolution, i64, Dims), CellDelta>,
    spend: SpendDelta,
}

/// The writes to one bucket hash.
pub struct BucketWrite {
    /// Key name below the keyspace prefix.
    pub key: String,
    /// Unix seconds; `None`: kept.
    pub expire_at: Option<i64>,
    pub fields: Vec<(String, i64)>,
}

impl Delta {
    /// Adds an event to every resolution whose bucket for it is still retained at `now_ms`
    /// (a very late event is not written where it would expire at once).
    pub fn add(&mut self, event: &UsageEvent, cost: Option<Cost>, now_ms: i64) {
        self.spend.add(event, cost);
        let dims = Dims::of(event);
        let totals = Totals::of(event, cost);
        let latency = sketch::bin_of(event.latency_us);
        let ttft = event.ttft_us.map(sketch::bin_of);
        for resolution in Resolution::ALL {
            let start = resolution.start_of(event.ts);
            if !resolution.retained(start, now_ms) {
                continue;
            }
            let cell = self
                .cells
                .entry((resolution, start, dims.clone()))
                .or_default();
            cell.totals.add(&totals);
            if resolution.has_sketches() {
                *cell.latency.entry(latency).or_default() += 1;
                if let Some(bin) = ttft {
                    *cell.ttft.entry(bin).or_default() += 1;
                }
            }
        }
    }

    /// The hash-field increments to apply, per hash: stats buckets and spend counters.
    pub fn writes(&self, now_ms: i64) -> Vec<BucketWrite> {
        let mut out: HashMap<(Resolution, i64), Vec<(String, i64)>> = HashMap::new();
        for ((resolution, start, dims), cell) in &self.cells {
            let tuple = dims.encode();
            let fields = out.entry((*resolution, *start)).or_default();
            fields.extend(
                cell.totals
                    .increments()
                    .map(|(metric, n)| (format!("{metric}:{tuple}"), n)),
            );
            fields.extend(
                cell.latency
                    .iter()
                    .map(|(bin, n)| (format!("l{bin}:{tuple}"), *n)),
            );
            fields.extend(
                cell.ttft
                    .iter()
                    .map(|(bin, n)| (format!("t{bin}:{tuple}"), *n)),
            );
        }
        out.into_iter()
            .map(|((resolution, start), fields)| BucketWrite {
                key: resolution.key(start),
                expire_at: resolution.expire_at_secs(start),
                fields,
            })
            .chain(self.spend.writes(now_ms))
            .collect()
    }
}

impl Delta {
    /// The writes to a replay's shadow copy: the same increments under `prefix`, plus a count
    /// per UTC day touched (`<prefix>days`), which tells the switch which days to swap in.
    pub fn shadow_writes(&self, prefix: &str, now_ms: i64) -> Vec<BucketWrite> {
        let mut days: HashMap<i64, i64> = HashMap::new();
        for ((resolution, start, _), cell) in &self.cells {
            if *resolution == Resolution::Day {
                *days.entry(*start).or_default() += cell.totals.requests;
            }
        }
        let mut writes = self.writes(now_ms);
        for write in &mut writes {
            write.key.insert_str(0, prefix);
        }
        if !days.is_empty() {
            writes.push(BucketWrite {
                key: format!("{prefix}days"),
                expire_at: None,
                fields: days
                    .into_iter()
                    .map(|(day, n)| (day.to_string(), n))
                    .collect(),
            });
        }
        writes
    }
}

/// What one stored hash field holds.
#[derive(Debug, PartialEq)]
pub enum Field {
    Counter(Totals),
    Latency(u32, u64),
    Ttft(u32, u64),
}

/// Decodes one hash field and its value.
pub fn read_field(field: &str, value: i64) -> Option<(Dims, Field)> {
    let (metric, tuple) = field.split_once(':')?;
    let dims = Dims::decode(tuple)?;
    let count = || u64::try_from(value).ok();
    let bin = |digits: &str| digits.parse::<u32>().ok();
    let field = match metric.split_at_checked(1)? {
        ("l", digits) if !digits.is_empty() => Field::Latency(bin(digits)?, count()?),
        ("t", digits) if !digits.is_empty() => Field::Ttft(bin(digits)?, count()?),
        _ => {
            let mut totals = Totals::default();
            totals.set(metric, value);
            Field::Counter(totals)
        }
    };
    Some((dims, field))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ts: i64, model: &str, status: u16, input: u64) -> UsageEvent {
        UsageEvent {
            v: 1,
            id: format!("{ts}-{model}"),
            ts,
            key_id: Some("key_1".into()),
            account_id: None,
            provider: "anthropic".into(),
            endpoint: "messages".into(),
            model: model.into(),
            status,
            stream: false,
            latency_us: 10,
            ttft_us: None,
            input_tokens: input,
            output_tokens: 2,
            cache_creation_input_tokens: 0,
            cache_creation_1h_input_tokens: 0,
            cache_read_input_tokens: 0,
            service_tier: None,
            error: None,
        }
    }

    const HOUR_MS: i64 = crate::rollup::HOUR_MS;
    /// Late enough that every resolution is still retained.
    const NOW: i64 = 3 * HOUR_MS;

    /// Applies a delta's hour-bucket increments to an in-memory "Redis" and reads them back.
    fn round_trip(delta: &Delta) -> HashMap<(i64, Dims), Totals> {
        let mut out: HashMap<(i64, Dims), Totals> = HashMap::new();
        for write in delta.writes(NOW) {
            let Some(hour) = write.key.strip_prefix("st:h:") else {
                continue;
            };
            let hour: i64 = hour.parse().unwrap();
            for (field, n) in write.fields {
                if let (dims, Field::Counter(t)) = read_field(&field, n).unwrap() {
                    out.entry((hour, dims)).or_default().add(&t);
                }
            }
        }
        out
    }

    #[test]
    fn events_of_one_cell_are_summed_and_read_back() {
        let mut delta = Delta::default();
        let cost = Cost::from_atto(3 * ATTO_PER_NANO + 7);
        delta.add(&event(HOUR_MS + 5, "m", 200, 10), Some(cost), NOW);
        delta.add(&event(HOUR_MS + 9, "m", 500, 5), Some(cost), NOW);
        delta.add(&event(2 * HOUR_MS, "m", 200, 1), None, NOW);
        let cells = round_trip(&delta);
        assert_eq!(cells.len(), 3, "two statuses in hour 1, one cell in hour 2");
        let first = cells[&(HOUR_MS, Dims::of(&event(0, "m", 200, 0)))];
        assert_eq!(first.requests, 1);
        let with_error = cells[&(HOUR_MS, Dims::of(&event(0, "m", 500, 0)))];
        assert_eq!((with_error.errors, with_error.input_tokens), (1, 5));
        let unpriced = cells[&(2 * HOUR_MS, Dims::of(&event(0, "m", 200, 0)))];
        assert_eq!((unpriced.unpriced_requests, unpriced.cost), (1, Cost::ZERO));
        assert_eq!(first.cost, cost);
    }

    #[test]
    fn a_separator_inside_a_value_cannot_shift_dimensions() {
        let mut delta = Delta::default();
        delta.add(&event(0, "bad\u{1f}model", 200, 1), None, NOW);
        let cells = round_trip(&delta);
        let (_, dims) = cells.keys().next().unwrap();
        assert_eq!(dims.0[1], "bad\u{fffd}model");
        assert_eq!(dims.0[5], "200");
    }

    #[test]
    fn every_resolution_gets_the_event_and_sketches_skip_months() {
        let mut delta = Delta::default();
        let mut e = event(HOUR_MS + 5, "m", 200, 10);
        e.ttft_us = Some(1_000);
        delta.add(&e, None, NOW);
        let writes = delta.writes(NOW);
        let mut keys: Vec<&str> = writes.iter().map(|w| w.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "sp:key_1",
                "sp:key_1:d",
                "sp:key_1:h:0",
                "sp:key_1:m:3600000",
                "st:M:0",
                "st:d:0",
                "st:h:3600000",
                "st:m:3600000"
            ]
        );
        for w in writes.iter().filter(|w| w.key.starts_with("st:")) {
            let sketch_fields = w
                .fields
                .iter()
                .filter(|(f, _)| f.starts_with('l') || f.starts_with('t'))
                .count();
            assert_eq!(
                sketch_fields,
                if w.key.starts_with("st:M") { 0 } else { 2 },
                "{}",
                w.key
            );
        }
    }

    #[test]
    fn an_event_too_old_for_minutes_skips_them() {
        let mut delta = Delta::default();
        delta.add(&event(0, "m", 200, 1), None, 100 * HOUR_MS);
        assert!(
            delta
                .writes(100 * HOUR_MS)
                .iter()
                .all(|w| !w.key.starts_with("st:m:"))
        );
    }

    #[test]
    fn sketch_fields_read_back() {
        let tuple = ["k", "m", "a", "p", "e", "200"].join("\u{1f}");
        assert_eq!(
            read_field(&format!("l17:{tuple}"), 3).unwrap().1,
            Field::Latency(17, 3)
        );
        assert_eq!(
            read_field(&format!("t9:{tuple}"), 1).unwrap().1,
            Field::Ttft(9, 1)
        );
        assert!(
            read_field(&format!("l:{tuple}"), 1)
                .is_some_and(|(_, f)| matches!(f, Field::Counter(_)))
        );
    }

    #[test]
    fn large_costs_split_exactly() {
        let mut delta = Delta::default();
        let cost = Cost::from_atto(123_456_789_012_345_678_901_234);
        delta.add(&event(0, "m", 200, 1), Some(cost), NOW);
        let cells = round_trip(&delta);
        assert_eq!(cells.values().next().unwrap().cost, cost);
    }
}
