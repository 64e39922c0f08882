//! One stats cell as stored: every counter and sketch bin of one (bucket, dimension tuple),
//! packed into a single hash-field value.
//!
//! Why packed: a cell used to be one hash field per counter and per sketch bin, about 35
//! `HINCRBY`s per event across the resolutions, and Redis spent ~30 µs of CPU per event on them.
//! Packed, a batch writes each touched cell once, whatever it holds. The price is that Redis can
//! no longer add to a value: the consumer reads the cells it is about to change, adds its batch
//! in memory, and writes them back in a script that first checks each cell still carries the
//! stamp it read (`commit.rs`). A stamp is 8 random bytes, new on every write, so a cell that
//! was changed, deleted or replaced by anyone in between is noticed, and the batch is recomputed.
//!
//! Layout (a forever contract, like the sketch bin index):
//!
//! ```text
//! stamp: 8 bytes | format: 1 byte (= 2)
//! varints (LEB128, zigzag): requests errors input output cache_creation cache_creation_1h
//!                           cache_read unpriced cost_attodollars(i128)
//!                           cache_savings_attodollars(i128)
//! latency bins: count, then (bin − previous bin, count) ascending
//! ttft bins:    the same
//! ```
//!
//! Cost is one exact i128 of attodollars: sums are done here, not by Redis, so no 64-bit split.
//! Format 1 is the same without the cache savings; cells written before they were counted are
//! still read, as having saved 0, and are written back as format 2 when next changed. Only
//! format 2 is written, so every aggregator of a deployment must be able to read it (upgrade them
//! together).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pricing::Cost;
use crate::store::stats::Totals;

/// Length of the stamp that starts every value; the commit script compares exactly this prefix.
pub const STAMP_LEN: usize = 8;
const FORMAT: u8 = 2;
/// Cells written before cache savings were counted.
const FORMAT_WITHOUT_SAVINGS: u8 = 1;

/// Sketch bins with a nonzero count, ascending: (bin, count). A sorted vector rather than a
/// map, because cells are cloned, merged and encoded far more often than searched.
pub type Bins = Vec<(u32, u64)>;

/// Counters and latency / time-to-first-token bin counts of one cell (or of a sum of cells).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell {
    pub totals: Totals,
    pub latency: Bins,
    pub ttft: Bins,
}

/// Adds `n` to `bin`, keeping `bins` sorted.
pub fn add_bin(bins: &mut Bins, bin: u32, n: u64) {
    if n == 0 {
        return;
    }
    match bins.binary_search_by_key(&bin, |(b, _)| *b) {
        Ok(i) => bins[i].1 = bins[i].1.saturating_add(n),
        Err(i) => bins.insert(i, (bin, n)),
    }
}

/// Adds the sorted `more` to the sorted `bins`. A busy cell holds hundreds of bins, usually
/// cold in the CPU cache, and a batch changes a few of them, mostly bins it has already: those
/// are added to in place, in one forward walk. At the first bin it lacks, the rest is merged
/// into a new vector, which streams through memory where inserting each new bin (and shifting
/// the tail) cost more in cache misses. (Merging into a reused spare vector instead left every
/// cached cell holding a buffer sized for the largest: twice the memory.)
fn add_bins(bins: &mut Bins, more: &[(u32, u64)]) {
    let mut i = 0;
    for (j, &(y, m)) in more.iter().enumerate() {
        if m == 0 {
            continue;
        }
        while bins.get(i).is_some_and(|&(x, _)| x < y) {
            i += 1;
        }
        match bins.get_mut(i) {
            Some((x, n)) if *x == y => {
                *n = n.saturating_add(m);
                i += 1;
            }
            _ => {
                let mut sum = Vec::with_capacity(bins.len() + more.len() - j);
                sum.extend_from_slice(&bins[..i]);
                merge_into(&mut sum, &bins[i..], &more[j..]);
                *bins = sum;
                return;
            }
        }
    }
}

/// Appends the sorted union of `bins` and `more` to `sum`, adding the counts of shared bins.
fn merge_into(sum: &mut Bins, bins: &[(u32, u64)], more: &[(u32, u64)]) {
    let (mut i, mut j) = (0, 0);
    while let (Some(&(x, n)), Some(&(y, m))) = (bins.get(i), more.get(j)) {
        if x < y {
            sum.push((x, n));
            i += 1;
        } else if y < x {
            if m > 0 {
                sum.push((y, m));
            }
            j += 1;
        } else {
            sum.push((x, n.saturating_add(m)));
            i += 1;
            j += 1;
        }
    }
    sum.extend_from_slice(&bins[i..]);
    sum.extend(more[j..].iter().filter(|(_, m)| *m > 0));
}

impl Cell {
    pub fn add(&mut self, other: &Cell) {
        self.totals.add(&other.totals);
        add_bins(&mut self.latency, &other.latency);
        add_bins(&mut self.ttft, &other.ttft);
    }

    /// Takes back an `add` of `other` (a staged change that did not apply).
    pub fn subtract(&mut self, other: &Cell) {
        self.totals.subtract(&other.totals);
        for (bins, less) in [
            (&mut self.latency, &other.latency),
            (&mut self.ttft, &other.ttft),
        ] {
            for (bin, n) in less {
                if let Ok(i) = bins.binary_search_by_key(bin, |(b, _)| *b) {
                    bins[i].1 = bins[i].1.saturating_sub(*n);
                    if bins[i].1 == 0 {
                        bins.remove(i);
                    }
                }
            }
        }
    }

    /// Whether the cell counts nothing at all (then it is deleted rather than stored).
    pub fn is_empty(&self) -> bool {
        self.totals == Totals::default() && self.latency.is_empty() && self.ttft.is_empty()
    }

    /// The stored value, starting with `stamp`.
    pub fn encode(&self, stamp: [u8; STAMP_LEN]) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + 4 * (self.latency.len() + self.ttft.len()));
        self.encode_into(&mut out, stamp);
        out
    }

    /// [`Cell::encode`], appended to `out` (a commit encodes thousands of cells into one buffer).
    pub fn encode_into(&self, out: &mut Vec<u8>, stamp: [u8; STAMP_LEN]) {
        header(out, &self.totals, stamp);
        put_bins(out, &self.latency);
        put_bins(out, &self.ttft);
    }

    /// The whole cell; `None` if the bytes are not a cell of a known format.
    pub fn decode(bytes: &[u8]) -> Option<Cell> {
        let mut reader = Reader::new(bytes)?;
        let totals = reader.totals()?;
        let latency = reader.bins()?;
        let ttft = reader.bins()?;
        reader.rest.is_empty().then_some(Cell {
            totals,
            latency,
            ttft,
        })
    }

    /// Only the counters, without building the sketches (what usage queries need).
    pub fn decode_totals(bytes: &[u8]) -> Option<Totals> {
        Reader::new(bytes)?.totals()
    }

    /// Every figure by name (`r`, `e`, `i`, `o`, `cc`, `c1`, `cr`, `u`, `cost` and `saved` in
    /// attodollars, `l<bin>`, `t<bin>`), zeros left out: a stable view for comparisons.
    pub fn figures(&self) -> Vec<(String, i128)> {
        let t = &self.totals;
        let counters = [
            ("r", t.requests),
            ("e", t.errors),
            ("i", t.input_tokens),
            ("o", t.output_tokens),
            ("cc", t.cache_creation_input_tokens),
            ("c1", t.cache_creation_1h_input_tokens),
            ("cr", t.cache_read_input_tokens),
            ("u", t.unpriced_requests),
        ];
        counters
            .into_iter()
            .map(|(name, n)| (name.to_owned(), i128::from(n)))
            .chain([
                ("cost".to_owned(), t.cost.atto()),
                ("saved".to_owned(), t.cache_savings.atto()),
            ])
            .chain(
                self.latency
                    .iter()
                    .map(|(bin, n)| (format!("l{bin}"), i128::from(*n))),
            )
            .chain(
                self.ttft
                    .iter()
                    .map(|(bin, n)| (format!("t{bin}"), i128::from(*n))),
            )
            .filter(|(_, n)| *n != 0)
            .collect()
    }
}

fn header(out: &mut Vec<u8>, t: &Totals, stamp: [u8; STAMP_LEN]) {
    out.extend_from_slice(&stamp);
    out.push(FORMAT);
    for n in [
        t.requests,
        t.errors,
        t.input_tokens,
        t.output_tokens,
        t.cache_creation_input_tokens,
        t.cache_creation_1h_input_tokens,
        t.cache_read_input_tokens,
        t.unpriced_requests,
    ] {
        put(out, zigzag(i128::from(n)));
    }
    put(out, zigzag(t.cost.atto()));
    put(out, zigzag(t.cache_savings.atto()));
}

/// Writes sorted `bins`: their count, then (step from the previous bin, count) pairs.
///
/// With [`add_bins`] this is the aggregator's hottest loop: every touch of a cell rewrites all
/// its bins (a busy day cell has hundreds).
fn put_bins(out: &mut Vec<u8>, bins: &[(u32, u64)]) {
    put64(out, bins.len() as u64);
    let mut previous = 0;
    for &(bin, n) in bins {
        put64(out, u64::from(bin - previous));
        put64(out, n);
        previous = bin;
    }
}

/// The stamp a value starts with; empty for a value too short to have one.
pub fn stamp_of(bytes: &[u8]) -> &[u8] {
    bytes.get(..STAMP_LEN).unwrap_or_default()
}

/// A stamp no other write carries: a per-process random seed (from the standard library's
/// randomly keyed hasher) mixed with a counter.
pub fn new_stamp() -> [u8; STAMP_LEN] {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    splitmix64(seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))).to_le_bytes()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn zigzag(n: i128) -> u128 {
    ((n << 1) ^ (n >> 127)) as u128
}

fn unzigzag(n: u128) -> i128 {
    ((n >> 1) as i128) ^ -((n & 1) as i128)
}

/// [`put`] for the bins' steps and counts, which never need more than 64 bits.
#[inline]
fn put64(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put(out: &mut Vec<u8>, mut n: u128) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

struct Reader<'a> {
    rest: &'a [u8],
    with_savings: bool,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Option<Self> {
        match bytes.get(STAMP_LEN..)?.split_first() {
            Some((&FORMAT, rest)) => Some(Self {
                rest,
                with_savings: true,
            }),
            Some((&FORMAT_WITHOUT_SAVINGS, rest)) => Some(Self {
                rest,
                with_savings: false,
            }),
            _ => None,
        }
    }

    fn next(&mut self) -> Option<u128> {
        let mut n: u128 = 0;
        for shift in (0..128).step_by(7) {
            let (&byte, rest) = self.rest.split_first()?;
            self.rest = rest;
            n |= u128::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn signed(&mut self) -> Option<i64> {
        i64::try_from(unzigzag(self.next()?)).ok()
    }

    fn totals(&mut self) -> Option<Totals> {
        Some(Totals {
            requests: self.signed()?,
            errors: self.signed()?,
            input_tokens: self.signed()?,
            output_tokens: self.signed()?,
            cache_creation_input_tokens: self.signed()?,
            cache_creation_1h_input_tokens: self.signed()?,
            cache_read_input_tokens: self.signed()?,
            unpriced_requests: self.signed()?,
            cost: Cost::from_atto(unzigzag(self.next()?)),
            cache_savings: if self.with_savings {
                Cost::from_atto(unzigzag(self.next()?))
            } else {
                Cost::ZERO
            },
        })
    }

    fn bins(&mut self) -> Option<Bins> {
        let len = usize::try_from(self.next()?).ok()?;
        // Each pair takes at least two bytes: a bound on what garbage can make us allocate.
        let mut bins = Vec::with_capacity(len.min(self.rest.len() / 2));
        let mut bin: u32 = 0;
        for i in 0..len {
            let step = u32::try_from(self.next()?).ok()?;
            // Strictly ascending, as written (a zero step after the first would be a repeat).
            if i > 0 && step == 0 {
                return None;
            }
            bin = bin.checked_add(step)?;
            bins.push((bin, u64::try_from(self.next()?).ok()?));
        }
        Some(bins)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Cell {
        Cell {
            totals: Totals {
                requests: 3,
                errors: 1,
                input_tokens: 1_000_000,
                output_tokens: 20,
                cache_creation_input_tokens: 7,
                cache_creation_1h_input_tokens: 2,
                cache_read_input_tokens: 48_000,
                cost: Cost::from_atto(123_456_789_012_345_678_901_234),
                cache_savings: Cost::from_atto(98_765_432_109_876_543_210),
                unpriced_requests: 0,
            },
            latency: vec![(0, 1), (17, 2), (900, 5)],
            ttft: vec![(3, 1)],
        }
    }

    #[test]
    fn a_cell_round_trips_with_its_stamp_in_front() {
        let cell = sample();
        let stamp = new_stamp();
        let bytes = cell.encode(stamp);
        assert_eq!(stamp_of(&bytes), stamp);
        assert_eq!(Cell::decode(&bytes), Some(cell.clone()));
        assert_eq!(Cell::decode_totals(&bytes), Some(cell.totals));
    }

    #[test]
    fn stamps_differ() {
        let a: std::collections::HashSet<_> = (0..10_000).map(|_| new_stamp()).collect();
        assert_eq!(a.len(), 10_000);
    }

    #[test]
    fn adding_cells_adds_counters_and_bins() {
        let mut sum = sample();
        sum.add(&sample());
        assert_eq!(sum.totals.requests, 6);
        assert_eq!(sum.totals.cost.atto(), 2 * sample().totals.cost.atto());
        assert_eq!(sum.latency, [(0, 2), (17, 4), (900, 10)]);
        assert_eq!(sum.ttft, [(3, 2)]);
        assert!(!sum.is_empty());
        assert!(Cell::default().is_empty());
        sum.subtract(&sample());
        assert_eq!(sum, sample());
    }

    #[test]
    fn bins_are_stored_as_count_then_steps_and_counts() {
        // Stored values outlive the code: this layout must not change.
        let mut out = Vec::new();
        put_bins(&mut out, &[(5, 1), (17, 2), (300, 1)]);
        assert_eq!(out, [3, 5, 1, 12, 2, 0x9b, 0x02, 1]);
    }

    #[test]
    fn garbage_and_unknown_formats_are_refused() {
        assert_eq!(Cell::decode(b""), None);
        assert_eq!(Cell::decode(b"12345678"), None);
        for unknown in [0, 3] {
            let mut bytes = sample().encode(new_stamp());
            bytes[STAMP_LEN] = unknown;
            assert_eq!(Cell::decode(&bytes), None, "format {unknown}");
        }
        let mut bytes = sample().encode(new_stamp());
        bytes.push(0);
        assert_eq!(Cell::decode(&bytes), None, "trailing bytes");
        let bytes = sample().encode(new_stamp());
        assert_eq!(Cell::decode(&bytes[..bytes.len() - 1]), None, "truncated");
    }

    #[test]
    fn a_cell_stored_before_cache_savings_were_counted_reads_as_saving_nothing() {
        // A format-1 value as such a cell holds it: one request of 10 input, 2 output and 300
        // cache-read tokens costing 5 attodollars, one latency bin (3), no TTFT bins.
        let stamp = [7u8; STAMP_LEN];
        let mut bytes = stamp.to_vec();
        bytes.extend_from_slice(&[1, 2, 0, 20, 4, 0, 0, 0xd8, 0x04, 0, 10, 1, 3, 1, 0]);
        let want = Cell {
            totals: Totals {
                requests: 1,
                input_tokens: 10,
                output_tokens: 2,
                cache_read_input_tokens: 300,
                cost: Cost::from_atto(5),
                ..Totals::default()
            },
            latency: vec![(3, 1)],
            ttft: vec![],
        };
        assert_eq!(Cell::decode(&bytes), Some(want.clone()));
        assert_eq!(Cell::decode_totals(&bytes), Some(want.totals));
        // Changed, it is written in the current format, savings and all.
        let mut cell = want;
        cell.add(&Cell {
            totals: Totals {
                cache_savings: Cost::from_atto(9),
                ..Totals::default()
            },
            ..Cell::default()
        });
        let rewritten = cell.encode(stamp);
        assert_eq!(rewritten[STAMP_LEN], FORMAT);
        assert_eq!(Cell::decode(&rewritten), Some(cell));
        // Truncated inside the counters it is refused, as any value is.
        assert_eq!(Cell::decode(&bytes[..STAMP_LEN + 8]), None);
    }

    #[test]
    fn figures_name_what_is_nonzero() {
        let figures = sample().figures();
        assert!(figures.contains(&("r".into(), 3)));
        assert!(figures.contains(&("l900".into(), 5)));
        assert!(figures.contains(&("saved".into(), 98_765_432_109_876_543_210)));
        assert!(!figures.iter().any(|(name, _)| name == "u"));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Cell::decode(&bytes);
        }

        #[test]
        fn any_cell_round_trips(
            counts in proptest::array::uniform8(any::<i64>()),
            cost in any::<i128>(),
            saved in any::<i128>(),
            latency in proptest::collection::btree_map(any::<u32>(), 1..u64::MAX, 0..20),
            more in proptest::collection::btree_map(any::<u32>(), 1..u64::MAX, 0..20),
        ) {
            let latency: Bins = latency.into_iter().collect();
            let more: Bins = more.into_iter().collect();
            let cell = Cell {
                totals: Totals {
                    requests: counts[0],
                    errors: counts[1],
                    input_tokens: counts[2],
                    output_tokens: counts[3],
                    cache_creation_input_tokens: counts[4],
                    cache_creation_1h_input_tokens: counts[5],
                    cache_read_input_tokens: counts[6],
                    unpriced_requests: counts[7],
                    cost: Cost::from_atto(cost),
                    cache_savings: Cost::from_atto(saved),
                },
                ttft: latency.clone(),
                latency,
            };
            let stamp = new_stamp();
            prop_assert_eq!(Cell::decode(&cell.encode(stamp)), Some(cell.clone()));
            let change = Cell { latency: more, ..Cell::default() };
            let mut sum = cell.clone();
            sum.add(&change);
            prop_assert_eq!(Cell::decode(&sum.encode(stamp)), Some(sum.clone()));
            let mut one_by_one = cell.clone();
            for (bin, n) in &change.latency {
                add_bin(&mut one_by_one.latency, *bin, *n);
            }
            prop_assert_eq!(&sum.latency, &one_by_one.latency);
            prop_assert!(sum.latency.windows(2).all(|w| w[0].0 < w[1].0));
        }

        #[test]
        fn adding_overlapping_bins_matches_adding_one_at_a_time(
            base in proptest::collection::btree_map(0u32..64, 1..1000u64, 0..40),
            more in proptest::collection::btree_map(0u32..64, 0..1000u64, 0..40),
        ) {
            let mut sum: Bins = base.into_iter().collect();
            let mut expected = sum.clone();
            let more: Bins = more.into_iter().collect();
            for (bin, n) in &more {
                add_bin(&mut expected, *bin, *n);
            }
            add_bins(&mut sum, &more);
            prop_assert_eq!(sum, expected);
        }

        #[test]
        fn bins_a_cell_has_are_added_to_in_place(
            base in proptest::collection::btree_map(0u32..64, 1..1000u64, 1..40),
            step in 1usize..4,
        ) {
            let mut sum: Bins = base.into_iter().collect();
            let more: Bins = sum.iter().step_by(step).map(|&(bin, _)| (bin, 7)).collect();
            let mut expected = sum.clone();
            for (bin, n) in &more {
                add_bin(&mut expected, *bin, *n);
            }
            let buffer = sum.as_ptr();
            add_bins(&mut sum, &more);
            prop_assert_eq!(&sum, &expected);
            prop_assert_eq!(sum.as_ptr(), buffer, "no new vector");
        }
    }
}
