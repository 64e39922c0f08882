#![allow(dead_code)] // used by stats and query
//! A mergeable quantile sketch for latencies (DDSketch-style, log-spaced bins).
//!
//! Values are microseconds. Each value falls into a bin whose index is a fixed function of the
//! value alone, so the consumer can store one counter per (cell, bin) and a query can merge any
//! set of cells by adding counters. The index is persisted in Redis field names, which makes the
//! mapping a forever contract: it must never change, and every process must compute the same
//! index for the same value.
//!
//! Bin `1 + k` holds the values in `(γ^(k-1), γ^k]` with `γ = (1+a)/(1-a) = 201/199` and
//! `a` = [`RELATIVE_ACCURACY`]; its representative value `2γ^k/(γ+1)` is within `a` of every
//! value in the bin. Bin 0 holds the value 0. Below about 200 µs bins are narrower than 1 µs,
//! so a bin holds one integer or none; the representative is then clamped to the integers the
//! bin holds, which makes small values read exactly (1 µs sits on a boundary, where the
//! midpoint would be exactly `a` off and floating point pushes it just past).
//!
//! Why a table and not just `ln`: `f64::ln` comes from the platform's libm and is not guaranteed
//! to be correctly rounded, so two builds could disagree on a value that sits within an ulp of a
//! boundary, and the plain formula can also misplace such a value by one bin (three times the
//! error bound). So the boundaries are integers computed at compile time with double-double
//! arithmetic (basic IEEE operations only, hence identical on every platform), `ln` only gives
//! a first guess, and one or two integer comparisons settle the bin. A test checks every
//! boundary against exact big-integer powers of 201 and 199.

use std::collections::BTreeMap;

/// Relative accuracy of a bin's representative value.
///
/// 0.5%, so any quantile read is within 1% of the exact one (the contract for `/v1/latency`);
/// in fact it is within 0.5%, because the exact quantile lies in the bin that is read.
pub const RELATIVE_ACCURACY: f64 = 0.005;

/// `1 / ln γ` for `γ = 201/199`, to 16 significant digits; only used to guess a bin.
const INV_LN_GAMMA: f64 = 99.999_166_661_111_04;

/// Bins with `k = 0..=4437`: `γ^4436 < 2^64 ≤ γ^4437`, so the last one reaches `u64::MAX`.
const POSITIVE_BINS: usize = 4438;

/// `UPPER[k]` is the largest u64 in bin `1 + k`, `floor(γ^k)`, saturated for the last bin.
static UPPER: [u64; POSITIVE_BINS] = tables().0;

/// `REPRESENTATIVE[k]` is the value of bin `1 + k`: the midpoint `2γ^k/(γ+1) = γ^k · 199/200`,
/// clamped to the integers the bin holds.
static REPRESENTATIVE: [f64; POSITIVE_BINS] = tables().1;

/// Bin index of a value in microseconds. Index 0 is reserved for the value 0; a positive value
/// `v` maps to `1 + ceil(log_γ(v))` with `γ = (1+a)/(1-a)`. Deterministic and monotonic in `v`.
pub fn bin_of(value_us: u64) -> u32 {
    if value_us == 0 {
        return 0;
    }
    // The guess is off by at most one near a boundary; the comparisons below make it exact.
    let mut k = guess(value_us).min(POSITIVE_BINS - 1);
    // The last upper bound is u64::MAX, so this stops inside the table.
    while value_us > UPPER[k] {
        k += 1;
    }
    while k > 0 && value_us <= UPPER[k - 1] {
        k -= 1;
    }
    k as u32 + 1
}

/// `ceil(log_γ(v))` in floating point: right except within an ulp or so of a boundary.
fn guess(value_us: u64) -> usize {
    ((value_us as f64).ln() * INV_LN_GAMMA).ceil() as usize
}

/// The representative value (µs) of a bin: every u64 value in the bin is within
/// [`RELATIVE_ACCURACY`] of it. Bin 0 is 0.
pub fn value_of(bin: u32) -> f64 {
    let Some(k) = (bin as usize).checked_sub(1) else {
        return 0.0;
    };
    // Bins past the table hold no u64 value; a stored one would be corrupt, and extending the
    // formula keeps the answer monotonic rather than inventing an error path for it.
    REPRESENTATIVE
        .get(k)
        .copied()
        .unwrap_or_else(|| (k as f64 / INV_LN_GAMMA).exp() * (1.0 - RELATIVE_ACCURACY))
}

/// Counts per bin of a set of values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketch {
    /// Only bins with a nonzero count, so equal samples give equal sketches.
    bins: BTreeMap<u32, u64>,
}

impl Sketch {
    pub fn add(&mut self, value_us: u64) {
        self.add_bin(bin_of(value_us), 1);
    }

    /// Adds `count` values of `bin`, as read back from storage.
    pub fn add_bin(&mut self, bin: u32, count: u64) {
        if count == 0 {
            return;
        }
        let slot = self.bins.entry(bin).or_default();
        *slot = slot.saturating_add(count);
    }

    pub fn merge(&mut self, other: &Sketch) {
        for (bin, count) in other.bins() {
            self.add_bin(bin, count);
        }
    }

    pub fn count(&self) -> u64 {
        self.bins.values().fold(0, |n, c| n.saturating_add(*c))
    }

    /// The q-quantile (0 ≤ q ≤ 1) in microseconds, by nearest rank: the value at rank
    /// `max(1, ceil(q·n))` of the sorted values. None when empty or when `q` is outside [0, 1].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&q) {
            return None;
        }
        let n = self.count();
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n.max(1));
        let mut seen = 0u64;
        self.bins.iter().find_map(|(bin, count)| {
            seen = seen.saturating_add(*count);
            (seen >= rank).then(|| value_of(*bin))
        })
    }

    /// `(bin, count)` pairs in increasing bin order, counts nonzero.
    pub fn bins(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.bins.iter().map(|(bin, count)| (*bin, *count))
    }
}

/// Builds both tables from `γ^k` held as double-doubles (about 106 bits). Only `+ - * /` are
/// used, which IEEE 754 rounds exactly the same everywhere, so the tables are the same on every
/// platform; const evaluation also means no start-up cost and no lazy initialisation per call.
const fn tables() -> ([u64; POSITIVE_BINS], [f64; POSITIVE_BINS]) {
    let gamma = dd_div(dd(201.0), 199.0);
    let mut upper = [0u64; POSITIVE_BINS];
    let mut representative = [0f64; POSITIVE_BINS];
    let mut power = dd(1.0);
    let mut k = 0;
    while k < POSITIVE_BINS {
        upper[k] = dd_floor(power);
        let midpoint = dd_div(dd_mul(power, dd(199.0)), 200.0).0;
        // Clamping never moves the value further from the integers in the bin, and it makes
        // a bin holding a single integer read exactly. Empty bins keep the midpoint.
        let lowest = if k == 0 { 1 } else { upper[k - 1] + 1 };
        representative[k] = if lowest > upper[k] {
            midpoint
        } else {
            midpoint.clamp(lowest as f64, upper[k] as f64)
        };
        power = dd_mul(power, gamma);
        k += 1;
    }
    (upper, representative)
}

/// A double-double `hi + lo` with `|lo| ≤ ulp(hi)/2`.
type Dd = (f64, f64);

const fn dd(x: f64) -> Dd {
    (x, 0.0)
}

/// `a + b` as a normalised double-double, given `|a| ≥ |b|`.
const fn quick_two_sum(a: f64, b: f64) -> Dd {
    let s = a + b;
    (s, b - (s - a))
}

/// Veltkamp split of `a` into two 26-bit halves, so their products are exact.
const fn split(a: f64) -> Dd {
    let c = 134_217_729.0 * a; // 2^27 + 1
    let hi = c - (c - a);
    (hi, a - hi)
}

/// `a · b` exactly, as a double-double (Dekker; no fused multiply-add, which is not const).
const fn two_prod(a: f64, b: f64) -> Dd {
    let p = a * b;
    let (ah, al) = split(a);
    let (bh, bl) = split(b);
    (p, ((ah * bh - p) + ah * bl + al * bh) + al * bl)
}

const fn dd_mul(x: Dd, y: Dd) -> Dd {
    let (p, e) = two_prod(x.0, y.0);
    quick_two_sum(p, e + (x.0 * y.1 + x.1 * y.0))
}

const fn dd_div(x: Dd, d: f64) -> Dd {
    let q = x.0 / d;
    let (p, e) = two_prod(q, d);
    let r = ((x.0 - p) - e) + x.1;
    quick_two_sum(q, r / d)
}

/// `floor(hi + lo)` for a positive double-double, saturating at `u64::MAX`.
const fn dd_floor(x: Dd) -> u64 {
    // Truncation is a floor for positive values; `as` saturates at the top.
    let whole = x.0 as u64;
    // Exact: below 2^53 `whole` is representable, above it `hi` is already an integer.
    let rest = (x.0 - whole as f64) + x.1;
    let mut rest_floor = rest as i64;
    if rest_floor as f64 > rest {
        rest_floor -= 1;
    }
    let floor = whole as i128 + rest_floor as i128;
    if floor < 0 {
        0
    } else if floor > u64::MAX as i128 {
        u64::MAX
    } else {
        floor as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR_US: u64 = 3_600_000_000;

    #[track_caller]
    fn check_accuracy(value: u64) {
        let got = value_of(bin_of(value));
        let error = (got - value as f64).abs() / value as f64;
        // A value next to a boundary is exactly `a` away from the exact midpoint (less a
        // sliver), and the f64 midpoint is one rounding away from that; up to 1e10 µs no
        // boundary comes close enough for the rounding to show, but further up it can, by
        // less than one f64::EPSILON (measured worst: 1.9e-16, near 9.8e18 µs).
        let slack = if value <= 10_000_000_000 {
            0.0
        } else {
            f64::EPSILON
        };
        assert!(
            error <= RELATIVE_ACCURACY + slack,
            "value {value} in bin {} reads as {got}: relative error {error}",
            bin_of(value)
        );
    }

    #[track_caller]
    fn check_quantile(samples: &[u64], q: f64, want: f64) {
        let got = sketch_of(samples).quantile(q).expect("nonempty");
        assert!(
            (got - want).abs() <= RELATIVE_ACCURACY * want,
            "q={q}: got {got}, want {want}"
        );
    }

    fn sketch_of(samples: &[u64]) -> Sketch {
        let mut sketch = Sketch::default();
        samples.iter().for_each(|v| sketch.add(*v));
        sketch
    }

    /// The reference: the same nearest-rank definition over the sorted samples.
    fn exact_quantile(samples: &[u64], q: f64) -> f64 {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1] as f64
    }

    /// Log-uniform over 1 µs … 1e9 µs: every bin range gets about the same attention.
    fn log_uniform() -> impl Strategy<Value = u64> {
        (0.0f64..9.0).prop_map(|e| 10f64.powf(e) as u64)
    }

    /// Powers `n^k` as little-endian u64 limbs, for exact boundary checks.
    fn times(limbs: &mut Vec<u64>, m: u64) {
        let mut carry = 0u128;
        for limb in limbs.iter_mut() {
            let t = *limb as u128 * m as u128 + carry;
            *limb = t as u64;
            carry = t >> 64;
        }
        if carry > 0 {
            limbs.push(carry as u64);
        }
    }

    fn product(limbs: &[u64], m: u64) -> Vec<u64> {
        let mut out = limbs.to_vec();
        times(&mut out, m);
        out
    }

    fn less_or_equal(a: &[u64], b: &[u64]) -> bool {
        // No leading zero limbs are ever produced, so length decides first.
        a.len() < b.len() || (a.len() == b.len() && a.iter().rev().le(b.iter().rev()))
    }

    #[test]
    fn every_boundary_is_the_exact_floor_of_a_power_of_gamma() {
        // UPPER[k] = floor(201^k / 199^k) ⇔ UPPER[k]·199^k ≤ 201^k < (UPPER[k]+1)·199^k.
        let (mut num, mut den) = (vec![1u64], vec![1u64]);
        for (k, upper) in UPPER.iter().enumerate() {
            if k + 1 == POSITIVE_BINS {
                assert_eq!(*upper, u64::MAX);
                assert!(
                    less_or_equal(&product(&den, u64::MAX), &num),
                    "2^64 ≤ γ^{k}"
                );
                break;
            }
            assert!(
                less_or_equal(&product(&den, *upper), &num),
                "k={k} too high"
            );
            assert!(
                !less_or_equal(&product(&den, upper + 1), &num),
                "k={k} too low"
            );
            times(&mut num, 201);
            times(&mut den, 199);
        }
    }

    #[test]
    fn the_floating_point_guess_is_never_more_than_one_bin_off() {
        // bin_of stays cheap only if its correcting loops run at most once.
        for (k, upper) in UPPER.iter().enumerate().take(POSITIVE_BINS - 1) {
            for (v, want) in [(*upper, k), (upper + 1, k + 1)] {
                // Below 200 µs the next integer may lie several (empty) bins further.
                if v > 200 {
                    assert!(
                        guess(v).abs_diff(want) <= 1,
                        "guess({v}) = {}, want {want}",
                        guess(v)
                    );
                }
            }
        }
    }

    #[test]
    fn zero_has_its_own_bin_and_value() {
        assert_eq!(bin_of(0), 0);
        assert_eq!(value_of(0), 0.0);
        assert_eq!(bin_of(1), 1);
        assert_eq!(bin_of(u64::MAX), POSITIVE_BINS as u32);
    }

    #[test]
    fn every_value_up_to_two_million_reads_within_the_accuracy() {
        (1..=2_000_000).for_each(check_accuracy);
    }

    #[test]
    fn powers_of_two_and_their_neighbours_read_within_the_accuracy() {
        for shift in 0..64 {
            let p = 1u64 << shift;
            [p - 1, p, p + 1]
                .into_iter()
                .filter(|v| *v > 0)
                .for_each(check_accuracy);
        }
        check_accuracy(u64::MAX);
    }

    #[test]
    fn values_beside_each_boundary_land_on_either_side_of_it() {
        for (k, upper) in UPPER.iter().enumerate().take(POSITIVE_BINS - 1) {
            // Below 200 µs some bins hold no integer; their bounds repeat the previous one.
            if k > 0 && UPPER[k - 1] == *upper {
                continue;
            }
            assert_eq!(bin_of(*upper), k as u32 + 1);
            // The next integer is in the next bin that holds any.
            let next = UPPER[k + 1..]
                .iter()
                .position(|u| *u > *upper)
                .map_or(0, |i| k + 1 + i);
            assert_eq!(bin_of(upper + 1), next as u32 + 1);
            // Within a bin the error grows towards its edges, so these are the worst values.
            check_accuracy(*upper);
            check_accuracy(upper + 1);
        }
    }

    #[test]
    fn bins_never_decrease_and_step_by_at_most_one_once_dense() {
        let mut previous = bin_of(1);
        for v in 2..=2_000_000u64 {
            let bin = bin_of(v);
            assert!(bin >= previous, "bin_of({v}) = {bin} < {previous}");
            // From 200 µs on a bin is at least one integer wide, so none is skipped.
            if v > 200 {
                assert!(
                    bin - previous <= 1,
                    "bin_of({v}) skips from {previous} to {bin}"
                );
            }
            previous = bin;
        }
    }

    #[test]
    fn values_from_one_microsecond_to_one_hour_use_at_most_1840_bins() {
        // The indices span 2,202 bins (1 ..= 2202), but below 200 µs bins are narrower than
        // one microsecond and many hold no integer: 1,840 bins can be occupied. That bounds
        // the sketch fields per cell (per sketch, plus bin 0 for a zero latency).
        assert_eq!(bin_of(1), 1);
        assert_eq!(bin_of(HOUR_US), 2202);
        let mut low: Vec<u32> = (1..=2_000_000).map(bin_of).collect();
        low.dedup();
        let occupied = low.len() as u32 + bin_of(HOUR_US) - bin_of(2_000_000);
        assert_eq!(occupied, 1840);
    }

    #[test]
    fn p50_of_three_values_is_the_middle_one() {
        check_quantile(&[1000, 2000, 3000], 0.5, 2000.0);
        check_quantile(&[3000, 1000, 2000], 0.5, 2000.0);
    }

    #[test]
    fn extreme_quantiles_are_the_smallest_and_largest_values() {
        check_quantile(&[7, 500, 1_000_000], 0.0, 7.0);
        check_quantile(&[7, 500, 1_000_000], 1.0, 1_000_000.0);
    }

    #[test]
    fn nearest_rank_takes_the_lower_value_between_ranks() {
        // n = 4, q = 0.5 → rank 2; q = 0.51 → rank 3.
        check_quantile(&[100, 200, 300, 400], 0.5, 200.0);
        check_quantile(&[100, 200, 300, 400], 0.51, 300.0);
        check_quantile(&(1..=100).collect::<Vec<_>>(), 0.99, 99.0);
    }

    #[test]
    fn zeros_read_as_zero() {
        check_quantile(&[0, 0, 5_000], 0.5, 0.0);
    }

    #[test]
    fn an_empty_sketch_or_a_quantile_outside_zero_to_one_has_no_answer() {
        assert_eq!(Sketch::default().quantile(0.5), None);
        assert_eq!(sketch_of(&[1]).quantile(1.5), None);
        assert_eq!(sketch_of(&[1]).quantile(f64::NAN), None);
    }

    #[test]
    fn stored_bins_read_back_into_an_equal_sketch() {
        let original = sketch_of(&[0, 1, 1, 950, 120_000, 120_001, HOUR_US]);
        let mut restored = Sketch::default();
        original
            .bins()
            .for_each(|(bin, n)| restored.add_bin(bin, n));
        restored.add_bin(17, 0);
        assert_eq!(restored, original);
        assert_eq!(restored.count(), 7);
    }

    proptest! {
        #[test]
        fn random_values_read_within_the_accuracy(v in 1u64..) {
            check_accuracy(v);
        }

        #[test]
        fn quantiles_are_within_one_percent_of_the_exact_ones(
            samples in prop::collection::vec(log_uniform(), 1..=5000)
        ) {
            let sketch = sketch_of(&samples);
            prop_assert_eq!(sketch.count(), samples.len() as u64);
            for q in [0.5, 0.9, 0.99, 0.999, 0.0, 1.0] {
                let exact = exact_quantile(&samples, q);
                let got = sketch.quantile(q).expect("nonempty");
                prop_assert!((got - exact).abs() <= 0.01 * exact, "q={} got {} exact {}", q, got, exact);
            }
        }

        #[test]
        fn merging_equals_sketching_the_concatenation(
            a in prop::collection::vec(log_uniform(), 0..500),
            b in prop::collection::vec(log_uniform(), 0..500),
        ) {
            let mut merged = sketch_of(&a);
            merged.merge(&sketch_of(&b));
            prop_assert_eq!(merged, sketch_of(&[a, b].concat()));
        }
    }
}
