//! The stats data model: dimensions, totals, time buckets, and how they are laid out in Redis.
//!
//! Every event lands in one cell: (hour bucket of its `ts`) × (key, model, account, provider,
//! endpoint, status). A cell is a set of counters in the bucket's Redis hash, one hash field per
//! counter: `<metric>:<tuple>`. Group-by and filters are applied when reading, so any grouping
//! of the six dimensions is answered from the same cells and always sums to the same totals.
//!
//! Costs are exact: attodollars (1e-18 USD) split into two integer counters, `ch` (whole
//! nanodollars) and `cl` (the remaining attodollars, < 1e9 per event), because Redis counters
//! are 64-bit and a total in attodollars alone would overflow at 9.2 USD.

use std::collections::HashMap;

use shared::UsageEvent;

use crate::pricing::Cost;

pub const HOUR_MS: i64 = 3_600_000;
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

/// Start of the hour containing `ts_ms`.
pub fn hour_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// Name (below the keyspace prefix) of the hash holding the hour starting at `start_ms`.
pub fn hour_key(start_ms: i64) -> String {
    format!("st:h:{start_ms}")
}

/// A batch's effect on the stats: cells summed in memory, so a batch of many events costs
/// one increment per touched counter.
#[derive(Debug, Default)]
pub struct Delta {
    cells: HashMap<(i64, Dims), Totals>,
}

impl Delta {
    pub fn add(&mut self, event: &UsageEvent, cost: Option<Cost>) {
        self.cells
            .entry((hour_of(event.ts), Dims::of(event)))
            .or_default()
            .add(&Totals::of(event, cost));
    }

    /// Per hour bucket, the hash-field increments to apply.
    pub fn increments(&self) -> HashMap<i64, Vec<(String, i64)>> {
        let mut out: HashMap<i64, Vec<(String, i64)>> = HashMap::new();
        for ((hour, dims), totals) in &self.cells {
            let tuple = dims.encode();
            let fields = out.entry(*hour).or_default();
            fields.extend(
                totals
                    .increments()
                    .map(|(metric, n)| (format!("{metric}:{tuple}"), n)),
            );
        }
        out
    }
}

/// Decodes one hash field and its value back into a cell's contribution.
pub fn read_field(field: &str, value: i64) -> Option<(Dims, Totals)> {
    let (metric, tuple) = field.split_once(':')?;
    let dims = Dims::decode(tuple)?;
    let mut totals = Totals::default();
    totals.set(metric, value);
    Some((dims, totals))
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

    /// Applies a delta's increments to an in-memory "Redis" and reads them back.
    fn round_trip(delta: &Delta) -> HashMap<(i64, Dims), Totals> {
        let mut out: HashMap<(i64, Dims), Totals> = HashMap::new();
        for (hour, fields) in delta.increments() {
            for (field, n) in fields {
                let (dims, t) = read_field(&field, n).unwrap();
                out.entry((hour, dims)).or_default().add(&t);
            }
        }
        out
    }

    #[test]
    fn events_of_one_cell_are_summed_and_read_back() {
        let mut delta = Delta::default();
        let cost = Cost::from_atto(3 * ATTO_PER_NANO + 7);
        delta.add(&event(HOUR_MS + 5, "m", 200, 10), Some(cost));
        delta.add(&event(HOUR_MS + 9, "m", 500, 5), Some(cost));
        delta.add(&event(2 * HOUR_MS, "m", 200, 1), None);
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
        delta.add(&event(0, "bad\u{1f}model", 200, 1), None);
        let cells = round_trip(&delta);
        let (_, dims) = cells.keys().next().unwrap();
        assert_eq!(dims.0[1], "bad\u{fffd}model");
        assert_eq!(dims.0[5], "200");
    }

    #[test]
    fn hours_align_down_also_before_1970() {
        assert_eq!(hour_of(HOUR_MS + 1), HOUR_MS);
        assert_eq!(hour_of(-1), -HOUR_MS);
    }

    #[test]
    fn large_costs_split_exactly() {
        let mut delta = Delta::default();
        let cost = Cost::from_atto(123_456_789_012_345_678_901_234);
        delta.add(&event(0, "m", 200, 1), Some(cost));
        let cells = round_trip(&delta);
        assert_eq!(cells.values().next().unwrap().cost, cost);
    }
}
