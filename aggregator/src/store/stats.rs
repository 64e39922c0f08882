//! The stats data model: dimensions, totals, time buckets, and how they are laid out in Redis.
//!
//! Every event lands in one cell per resolution (see `rollup`): (bucket of its `ts`) × (key,
//! model, account, provider, endpoint, status). The bucket is a Redis hash; the cell is one field
//! of it, named by the encoded tuple, whose value packs the cell's counters and latency /
//! time-to-first-token sketch bins (`cell.rs`). Group-by and filters are applied when reading,
//! so any grouping of the six dimensions is answered from the same cells and always sums to the
//! same totals.
//!
//! Costs are exact: attodollars (1e-18 USD) in an i128.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use shared::UsageEvent;

use crate::pricing::{Charge, Cost};
use crate::store::cell::{self, Cell};
use crate::store::rollup::Resolution;
use crate::store::sketch;
use crate::store::spend::SpendDelta;

/// Separates dimension values inside a field name; values never contain it (see [`clean`]).
const SEP: char = '\u{1f}';

/// The six dimensions, in tuple order.
pub const DIMENSIONS: [&str; 6] = ["key", "model", "account", "provider", "endpoint", "status"];

/// One combination of dimension values. `key` and `account` are empty when absent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dims(pub [String; 6]);

impl Dims {
    #[cfg(test)]
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

    #[cfg(test)]
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
    /// What the cache reads saved against the input rate (`pricing::Charge`).
    pub cache_savings: Cost,
    pub unpriced_requests: i64,
}

fn tokens(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Totals {
    pub fn of(event: &UsageEvent, charge: Option<Charge>) -> Self {
        Self {
            requests: 1,
            errors: i64::from(event.status >= 400),
            input_tokens: tokens(event.input_tokens),
            output_tokens: tokens(event.output_tokens),
            cache_creation_input_tokens: tokens(event.cache_creation_input_tokens),
            cache_creation_1h_input_tokens: tokens(event.cache_creation_1h_input_tokens),
            cache_read_input_tokens: tokens(event.cache_read_input_tokens),
            cost: charge.map_or(Cost::ZERO, |c| c.cost),
            cache_savings: charge.map_or(Cost::ZERO, |c| c.cache_savings),
            // A request refused before an upstream was chosen bought nothing: no price is
            // missing for it.
            unpriced_requests: i64::from(charge.is_none() && event.account_id.is_some()),
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
        self.cache_savings += other.cache_savings;
        self.unpriced_requests += other.unpriced_requests;
    }

    /// `self − other`, counter by counter (a replay's change to a month).
    pub fn subtract(&mut self, other: &Totals) {
        self.requests -= other.requests;
        self.errors -= other.errors;
        self.input_tokens -= other.input_tokens;
        self.output_tokens -= other.output_tokens;
        self.cache_creation_input_tokens -= other.cache_creation_input_tokens;
        self.cache_creation_1h_input_tokens -= other.cache_creation_1h_input_tokens;
        self.cache_read_input_tokens -= other.cache_read_input_tokens;
        self.cost = self.cost - other.cost;
        self.cache_savings = self.cache_savings - other.cache_savings;
        self.unpriced_requests -= other.unpriced_requests;
    }

    /// Tokens as the spend counters count them (`UsageEvent::total_tokens`).
    pub fn tokens(&self) -> i64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }
}

/// A batch's effect on the stats: events summed into cells in memory, so each touched cell is
/// written once per batch, however many events it got.
#[derive(Debug, Default)]
pub struct Delta {
    /// Encoded dimension tuples (the cells' field names), each stored once and shared by every
    /// cell of the tuple down to the commit's cache (a batch writes thousands of cells).
    tuples: Vec<Arc<str>>,
    // Fx rather than SipHash: these maps are hit for every event, with keys that no client
    // chooses freely enough to attack the hash (SipHash was 3.6 % of replay CPU).
    tuple_index: FxHashMap<String, u32>,
    /// Events summed per (minute start, tuple). The hour, day and month cells are summed from
    /// these once per batch ([`Delta::cells`]): one map lookup per event instead of four.
    minutes: FxHashMap<(i64, u32), Cell>,
    /// The `now_ms` of the last event added, for retention.
    now_ms: i64,
    spend: SpendDelta,
    /// Scratch space for encoding a tuple without allocating.
    scratch: String,
}

/// The cells of one bucket hash that a batch changes, with the change to each.
#[derive(Debug, Clone)]
pub struct CellWrite {
    /// Key name below the keyspace prefix.
    pub key: String,
    /// Unix seconds; `None`: kept.
    pub expire_at: Option<i64>,
    /// (field = encoded tuple, what to add to it).
    pub cells: Vec<(Arc<str>, Cell)>,
}

/// Increments to the integer fields of one hash (spend counters, a replay's day list).
pub struct BucketWrite {
    /// Key name below the keyspace prefix.
    pub key: String,
    /// Unix seconds; `None`: kept.
    pub expire_at: Option<i64>,
    pub fields: Vec<(String, i64)>,
}

impl Delta {
    /// Adds an event to its minute's cell. Every resolution whose bucket for it is still
    /// retained at `now_ms` gets it ([`Delta::cells`]); a batch has one `now_ms` for all events.
    pub fn add(&mut self, event: &UsageEvent, charge: Option<Charge>, now_ms: i64) {
        debug_assert!(self.minutes.is_empty() || self.now_ms == now_ms);
        self.spend.add(event, charge.map(|c| c.cost));
        let tuple = self.intern(event);
        let totals = Totals::of(event, charge);
        let cell = self
            .minutes
            .entry((Resolution::Minute.start_of(event.ts), tuple))
            .or_default();
        cell.totals.add(&totals);
        cell::add_bin(&mut cell.latency, sketch::bin_of(event.latency_us), 1);
        if let Some(ttft) = event.ttft_us {
            cell::add_bin(&mut cell.ttft, sketch::bin_of(ttft), 1);
        }
        self.now_ms = now_ms;
    }

    /// Every cell the batch changes, at every resolution whose bucket is still retained (a
    /// very late event is not written where it would expire at once); months without sketches.
    fn cells(&self) -> FxHashMap<(Resolution, i64, u32), Cell> {
        let mut out: FxHashMap<(Resolution, i64, u32), Cell> = FxHashMap::default();
        out.reserve(self.minutes.len() * 2);
        for (&(minute, tuple), cell) in &self.minutes {
            for resolution in Resolution::ALL {
                let start = resolution.start_of(minute);
                if !resolution.retained(start, self.now_ms) {
                    continue;
                }
                match out.entry((resolution, start, tuple)) {
                    Entry::Occupied(mut sum) if resolution.has_sketches() => {
                        sum.get_mut().add(cell)
                    }
                    Entry::Occupied(mut sum) => sum.get_mut().totals.add(&cell.totals),
                    Entry::Vacant(slot) if resolution.has_sketches() => {
                        slot.insert(cell.clone());
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(Cell {
                            totals: cell.totals,
                            ..Cell::default()
                        });
                    }
                }
            }
        }
        out
    }

    fn intern(&mut self, event: &UsageEvent) -> u32 {
        self.scratch.clear();
        write_tuple(event, &mut self.scratch);
        if let Some(&i) = self.tuple_index.get(self.scratch.as_str()) {
            return i;
        }
        let i = self.tuples.len() as u32;
        self.tuples.push(Arc::from(self.scratch.as_str()));
        self.tuple_index.insert(self.scratch.clone(), i);
        i
    }

    /// The cells to change, per bucket hash, with key names under `prefix` (empty for the live
    /// figures, a replay's shadow prefix for its copy).
    pub fn cell_writes(&self, prefix: &str) -> Vec<CellWrite> {
        let mut out: FxHashMap<(Resolution, i64), Vec<_>> = FxHashMap::default();
        for ((resolution, start, tuple), cell) in self.cells() {
            out.entry((resolution, start))
                .or_default()
                .push((self.tuples[tuple as usize].clone(), cell));
        }
        out.into_iter()
            .map(|((resolution, start), cells)| CellWrite {
                key: format!("{prefix}{}", resolution.key(start)),
                expire_at: resolution.expire_at_secs(start),
                cells,
            })
            .collect()
    }

    /// The spend-counter increments for `now_ms`.
    pub fn increments(&self, now_ms: i64) -> Vec<BucketWrite> {
        self.spend.writes(now_ms)
    }

    /// The increments to a replay's shadow copy: its spend counters under `prefix`, plus a
    /// count per UTC day touched (`<prefix>days`), which tells the switch which days to swap in.
    pub fn shadow_increments(&self, prefix: &str, now_ms: i64) -> Vec<BucketWrite> {
        let mut days: HashMap<i64, i64> = HashMap::new();
        for (&(minute, _), cell) in &self.minutes {
            *days.entry(Resolution::Day.start_of(minute)).or_default() += cell.totals.requests;
        }
        let mut writes = self.increments(now_ms);
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

/// Appends an event's tuple, encoded as `Dims::of(event).encode()` would, without building it.
fn write_tuple(event: &UsageEvent, out: &mut String) {
    let parts = [
        event.key_id.as_deref().unwrap_or(""),
        &event.model,
        event.account_id.as_deref().unwrap_or(""),
        &event.provider,
        &event.endpoint,
    ];
    for part in parts {
        if part.contains(SEP) {
            out.push_str(&clean(part));
        } else {
            out.push_str(part);
        }
        out.push(SEP);
    }
    use std::fmt::Write;
    let _ = write!(out, "{}", event.status);
}

/// Decodes a stored cell's field name into its dimensions.
pub fn read_tuple(field: &str) -> Option<Dims> {
    Dims::decode(field)
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
            account_id: Some("acct_1".into()),
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

    const HOUR_MS: i64 = crate::store::rollup::HOUR_MS;
    /// Late enough that every resolution is still retained.
    const NOW: i64 = 3 * HOUR_MS;

    #[test]
    fn each_resolution_gets_the_events_of_its_retained_buckets_and_months_no_sketches() {
        // Three days later: the minutes of the first hour are gone, its hour is kept.
        let now = 72 * HOUR_MS;
        let mut delta = Delta::default();
        delta.add(&event(60_000, "m", 200, 1), None, now);
        delta.add(&event(2 * 60_000 + 5, "m", 200, 2), None, now);
        delta.add(&event(71 * HOUR_MS, "m", 200, 4), None, now);
        let writes = delta.cell_writes("");
        let input = |key: &str| -> Option<(i64, usize)> {
            let w = writes.iter().find(|w| w.key == key)?;
            let cell = &w.cells.first()?.1;
            Some((cell.totals.input_tokens, cell.latency.len()))
        };
        assert_eq!(
            input("st:m:60000"),
            None,
            "an expired minute is not written"
        );
        assert_eq!(input("st:h:0"), Some((3, 1)), "its hour sums both minutes");
        assert_eq!(input(&format!("st:m:{}", 71 * HOUR_MS)), Some((4, 1)));
        assert_eq!(input("st:d:0"), Some((3, 1)));
        assert_eq!(input(&format!("st:d:{}", 48 * HOUR_MS)), Some((4, 1)));
        assert_eq!(input("st:M:0"), Some((7, 0)), "a month has totals only");
        assert_eq!(writes.iter().map(|w| w.cells.len()).sum::<usize>(), 6);
    }

    /// The hour cells of a delta, by (hour, dimensions).
    fn hours(delta: &Delta) -> HashMap<(i64, Dims), Cell> {
        let mut out = HashMap::new();
        for write in delta.cell_writes("") {
            let Some(hour) = write.key.strip_prefix("st:h:") else {
                continue;
            };
            let hour: i64 = hour.parse().unwrap();
            for (field, cell) in write.cells {
                let bytes = cell.encode(crate::store::cell::new_stamp());
                let old = out.insert(
                    (hour, read_tuple(&field).unwrap()),
                    Cell::decode(&bytes).unwrap(),
                );
                assert!(old.is_none(), "one write per cell");
            }
        }
        out
    }

    #[test]
    fn events_of_one_cell_are_summed_and_read_back() {
        let mut delta = Delta::default();
        let charge = Charge {
            cost: Cost::from_atto(3_000_000_007),
            cache_savings: Cost::from_atto(1_000_000_003),
        };
        delta.add(&event(HOUR_MS + 5, "m", 200, 10), Some(charge), NOW);
        delta.add(&event(HOUR_MS + 9, "m", 500, 5), Some(charge), NOW);
        delta.add(&event(HOUR_MS + 9, "m", 200, 4), Some(charge), NOW);
        delta.add(&event(2 * HOUR_MS, "m", 200, 1), None, NOW);
        let cells = hours(&delta);
        assert_eq!(cells.len(), 3, "two statuses in hour 1, one cell in hour 2");
        let first = &cells[&(HOUR_MS, Dims::of(&event(0, "m", 200, 0)))];
        assert_eq!((first.totals.requests, first.totals.input_tokens), (2, 14));
        assert_eq!(first.totals.cost, Cost::from_atto(6_000_000_014));
        assert_eq!(first.totals.cache_savings, Cost::from_atto(2_000_000_006));
        assert_eq!(first.latency, [(sketch::bin_of(10), 2)]);
        let with_error = &cells[&(HOUR_MS, Dims::of(&event(0, "m", 500, 0)))];
        assert_eq!(
            (with_error.totals.errors, with_error.totals.input_tokens),
            (1, 5)
        );
        let unpriced = &cells[&(2 * HOUR_MS, Dims::of(&event(0, "m", 200, 0)))];
        assert_eq!(
            (
                unpriced.totals.unpriced_requests,
                unpriced.totals.cost,
                unpriced.totals.cache_savings
            ),
            (1, Cost::ZERO, Cost::ZERO)
        );
    }

    /// A request refused before any upstream was chosen (bad body, unknown key, a limit) has
    /// no price because nothing was bought, not because the price table lacks its model.
    #[test]
    fn only_relayed_requests_count_as_unpriced() {
        let mut delta = Delta::default();
        let refused = UsageEvent {
            account_id: None,
            status: 401,
            ..event(HOUR_MS, "", 401, 0)
        };
        delta.add(&refused, None, NOW);
        delta.add(&event(HOUR_MS, "no-such-model", 200, 3), None, NOW);
        let cells = hours(&delta);
        let refused = &cells[&(HOUR_MS, Dims::of(&refused))];
        assert_eq!(refused.totals.unpriced_requests, 0);
        let relayed = &cells[&(HOUR_MS, Dims::of(&event(0, "no-such-model", 200, 0)))];
        assert_eq!(relayed.totals.unpriced_requests, 1);
    }

    #[test]
    fn a_separator_inside_a_value_cannot_shift_dimensions() {
        let mut delta = Delta::default();
        delta.add(&event(0, "bad\u{1f}model", 200, 1), None, NOW);
        let cells = hours(&delta);
        let (_, dims) = cells.keys().next().unwrap();
        assert_eq!(dims.0[1], "bad\u{fffd}model");
        assert_eq!(dims.0[5], "200");
    }

    #[test]
    fn the_tuple_is_written_as_dims_encode_it() {
        let mut e = event(0, "m", 429, 1);
        e.account_id = Some("acct".into());
        let mut out = String::new();
        write_tuple(&e, &mut out);
        assert_eq!(out, Dims::of(&e).encode());
        assert_eq!(read_tuple(&out), Some(Dims::of(&e)));
    }

    #[test]
    fn every_resolution_gets_the_event_and_sketches_skip_months() {
        let mut delta = Delta::default();
        let mut e = event(HOUR_MS + 5, "m", 200, 10);
        e.ttft_us = Some(1_000);
        delta.add(&e, None, NOW);
        let mut keys: Vec<String> = delta.cell_writes("").into_iter().map(|w| w.key).collect();
        keys.extend(delta.increments(NOW).into_iter().map(|w| w.key));
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
        for w in delta.cell_writes("") {
            let cell = &w.cells[0].1;
            let bins = cell.latency.len() + cell.ttft.len();
            assert_eq!(
                bins,
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
                .cell_writes("")
                .iter()
                .all(|w| !w.key.starts_with("st:m:"))
        );
    }

    #[test]
    fn shadow_writes_carry_the_prefix_and_list_days() {
        let mut delta = Delta::default();
        delta.add(&event(HOUR_MS, "m", 200, 1), None, NOW);
        assert!(
            delta
                .cell_writes("rp7:")
                .iter()
                .all(|w| w.key.starts_with("rp7:st:"))
        );
        let increments = delta.shadow_increments("rp7:", NOW);
        assert!(increments.iter().all(|w| w.key.starts_with("rp7:")));
        let days = increments.iter().find(|w| w.key == "rp7:days").unwrap();
        assert_eq!(days.fields, [("0".to_owned(), 1)]);
    }

    #[test]
    fn large_costs_stay_exact() {
        let mut delta = Delta::default();
        let cost = Cost::from_atto(123_456_789_012_345_678_901_234);
        let charge = Charge {
            cost,
            cache_savings: cost,
        };
        delta.add(&event(0, "m", 200, 1), Some(charge), NOW);
        delta.add(&event(1, "m", 200, 1), Some(charge), NOW);
        let cells = hours(&delta);
        let totals = cells.values().next().unwrap().totals;
        assert_eq!(
            (totals.cost, totals.cache_savings),
            (cost + cost, cost + cost)
        );
    }
}
