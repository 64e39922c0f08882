//! `Cost`: an exact USD amount, and the plain-decimal text it is written as.
//!
//! Money is an integer count of attodollars (1e-18 USD). Eighteen decimals hold every rate in the
//! LiteLLM price file exactly apart from binary-float noise, and an `i128` of them still reaches
//! about 1.7e20 USD, so sums never need floats and never lose a digit.

use std::cmp::Ordering;
use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Sub};
use std::str::FromStr;

use super::PricingError;

/// Decimal places of one attodollar.
const SCALE: usize = 18;
const ATTO_PER_USD: u128 = 1_000_000_000_000_000_000;

/// Exact USD amount in attodollars (1e-18 USD).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cost(pub i128);

impl Cost {
    pub const ZERO: Cost = Cost(0);

    pub const fn from_atto(a: i128) -> Cost {
        Cost(a)
    }

    pub const fn atto(self) -> i128 {
        self.0
    }
}

/// Plain decimal USD: no exponent, trailing zeros trimmed, `0` for zero (`0.0123`, `12`, `-0.5`).
impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        // `unsigned_abs` because `-i128::MIN` does not fit in an `i128`.
        let magnitude = self.0.unsigned_abs();
        let whole = magnitude / ATTO_PER_USD;
        let mut fraction = magnitude % ATTO_PER_USD;
        if fraction == 0 {
            return write!(f, "{sign}{whole}");
        }
        let mut width = SCALE;
        while fraction.is_multiple_of(10) {
            fraction /= 10;
            width -= 1;
        }
        write!(f, "{sign}{whole}.{fraction:0width$}")
    }
}

/// Parses what `Display` writes, and plain integers, exactly. More than 18 decimals is an error
/// rather than a silent rounding, because a stored amount is never supposed to have them.
impl FromStr for Cost {
    type Err = PricingError;

    fn from_str(text: &str) -> Result<Cost, PricingError> {
        parse_decimal(text, Excess::Reject)
            .map(|parsed| Cost(parsed.atto))
            .map_err(|reason| PricingError::InvalidAmount {
                text: text.to_owned(),
                reason,
            })
    }
}

// Saturating rather than wrapping or panicking: no real total comes near 1.7e20 USD, and a
// clamped figure is easier to spot than a wrapped one.
impl Add for Cost {
    type Output = Cost;
    fn add(self, rhs: Cost) -> Cost {
        Cost(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, rhs: Cost) {
        *self = *self + rhs;
    }
}

impl Sub for Cost {
    type Output = Cost;
    fn sub(self, rhs: Cost) -> Cost {
        Cost(self.0.saturating_sub(rhs.0))
    }
}

impl Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::ZERO, Add::add)
    }
}

impl<'a> Sum<&'a Cost> for Cost {
    fn sum<I: Iterator<Item = &'a Cost>>(iter: I) -> Cost {
        iter.copied().sum()
    }
}

/// What to do with digits beyond the 18th decimal.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Excess {
    Reject,
    RoundHalfEven,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Parsed {
    pub(crate) atto: i128,
    /// A non-zero digit beyond the 18th decimal was rounded away.
    pub(crate) rounded: bool,
}

/// Reads `-?digits(.digits)?` into attodollars with integer arithmetic only.
pub(crate) fn parse_decimal(text: &str, excess: Excess) -> Result<Parsed, &'static str> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (unsigned, None),
    };
    let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !is_digits(whole) {
        return Err("expected digits before any decimal point");
    }
    let fraction = match fraction {
        Some(digits) if !is_digits(digits) => {
            return Err("expected digits after the decimal point");
        }
        Some(digits) => digits,
        None => "",
    };
    let (kept, beyond) = fraction.split_at(fraction.len().min(SCALE));
    if !beyond.is_empty() && excess == Excess::Reject {
        return Err("more than 18 decimal places");
    }

    const TOO_LARGE: &str = "amount out of range";
    let mut atto = accumulate(whole).ok_or(TOO_LARGE)?;
    atto = atto.checked_mul(ATTO_PER_USD).ok_or(TOO_LARGE)?;
    // Pad the kept decimals to exactly 18 so they count attodollars.
    let mut fraction_atto = accumulate(kept).ok_or(TOO_LARGE)?;
    for _ in kept.len()..SCALE {
        fraction_atto *= 10;
    }
    atto = atto.checked_add(fraction_atto).ok_or(TOO_LARGE)?;

    let rounded = beyond.bytes().any(|b| b != b'0');
    if let [first, rest @ ..] = beyond.as_bytes() {
        let round_up = match first.cmp(&b'5') {
            Ordering::Greater => true,
            Ordering::Equal => rest.iter().any(|&b| b != b'0') || atto % 2 == 1,
            Ordering::Less => false,
        };
        if round_up {
            atto = atto.checked_add(1).ok_or(TOO_LARGE)?;
        }
    }

    let atto = if negative {
        // Reaches `i128::MIN`, whose magnitude is not an `i128`.
        0i128.checked_sub_unsigned(atto)
    } else {
        i128::try_from(atto).ok()
    }
    .ok_or(TOO_LARGE)?;
    Ok(Parsed { atto, rounded })
}

fn accumulate(digits: &str) -> Option<u128> {
    digits.bytes().try_fold(0u128, |acc, b| {
        acc.checked_mul(10)?.checked_add(u128::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{Cost, Excess, Parsed, parse_decimal};

    #[track_caller]
    fn check_display(atto: i128, want: &str) {
        assert_eq!(Cost::from_atto(atto).to_string(), want);
        assert_eq!(want.parse::<Cost>().unwrap(), Cost(atto), "parsing {want}");
    }

    #[track_caller]
    fn check_rejected(text: &str) {
        assert!(text.parse::<Cost>().is_err(), "{text:?} should not parse");
    }

    #[track_caller]
    fn check_rounding(text: &str, atto: i128, rounded: bool) {
        let got = parse_decimal(text, Excess::RoundHalfEven).unwrap();
        assert_eq!(got, Parsed { atto, rounded }, "rounding {text}");
    }

    #[test]
    fn display_writes_plain_decimals_with_trailing_zeros_trimmed() {
        check_display(0, "0");
        check_display(12_300_000_000_000_000, "0.0123");
        check_display(12_000_000_000_000_000_000, "12");
        check_display(-500_000_000_000_000_000, "-0.5");
        check_display(1, "0.000000000000000001");
        check_display(-1_000_000_000_000_000_001, "-1.000000000000000001");
        check_display(i128::MAX, "170141183460469231731.687303715884105727");
        check_display(i128::MIN, "-170141183460469231731.687303715884105728");
    }

    #[test]
    fn parsing_accepts_integers_and_redundant_zeros() {
        assert_eq!(
            "7".parse::<Cost>().unwrap(),
            Cost(7_000_000_000_000_000_000)
        );
        assert_eq!(
            "007.50".parse::<Cost>().unwrap(),
            Cost(7_500_000_000_000_000_000)
        );
        assert_eq!("-0".parse::<Cost>().unwrap(), Cost::ZERO);
        assert_eq!(
            "0.123456789012345678".parse::<Cost>().unwrap(),
            Cost(123_456_789_012_345_678)
        );
    }

    #[test]
    fn parsing_rejects_anything_but_a_plain_decimal() {
        for text in [
            "", "-", ".5", "1.", "+1", " 1", "1 ", "1e-6", "1,5", "0x10", "--1", "1.2.3",
        ] {
            check_rejected(text);
        }
    }

    #[test]
    fn parsing_rejects_more_than_eighteen_decimals() {
        check_rejected("0.0000000000000000001");
        check_rejected("0.1234567890123456780");
    }

    #[test]
    fn parsing_rejects_amounts_beyond_i128() {
        check_rejected("170141183460469231731.687303715884105728");
        check_rejected("-170141183460469231731.687303715884105729");
        check_rejected("1000000000000000000000000000000000000000000");
    }

    #[test]
    fn rounding_goes_half_to_even_on_the_eighteenth_decimal() {
        check_rounding("0.0000029999900000000002", 2_999_990_000_000, true);
        check_rounding("0.0000000000000000024", 2, true);
        check_rounding("0.0000000000000000025", 2, true);
        check_rounding("0.0000000000000000035", 4, true);
        check_rounding("0.00000000000000000250001", 3, true);
        check_rounding("0.0000000000000000026", 3, true);
        check_rounding("-0.0000000000000000035", -4, true);
        check_rounding("0.999999999999999999999", 1_000_000_000_000_000_000, true);
    }

    #[test]
    fn zeros_beyond_the_eighteenth_decimal_are_not_a_rounding() {
        check_rounding("0.00000300000000000000000", 3_000_000_000_000, false);
    }

    #[test]
    fn arithmetic_is_exact_and_saturates_at_the_ends() {
        let a: Cost = "0.1".parse().unwrap();
        let b: Cost = "0.2".parse().unwrap();
        assert_eq!((a + b).to_string(), "0.3");
        assert_eq!((a - b).to_string(), "-0.1");
        let mut total = Cost::ZERO;
        total += a;
        total += a;
        assert_eq!(total, a + a);
        assert_eq!([a, b, b].iter().sum::<Cost>().to_string(), "0.5");
        assert_eq!([a, b].into_iter().sum::<Cost>().to_string(), "0.3");
        assert_eq!(Cost(i128::MAX) + Cost(1), Cost(i128::MAX));
        assert_eq!(Cost(i128::MIN) - Cost(1), Cost(i128::MIN));
    }

    proptest! {
        #[test]
        fn every_cost_survives_display_and_parse(atto in any::<i128>()) {
            let text = Cost(atto).to_string();
            prop_assert_eq!(text.parse::<Cost>().unwrap(), Cost(atto));
        }

        #[test]
        fn every_plain_decimal_parses_to_its_canonical_form(
            negative in any::<bool>(),
            whole in 0u64..1_000_000_000,
            fraction in "[0-9]{0,18}",
        ) {
            let sign = if negative { "-" } else { "" };
            let text = if fraction.is_empty() {
                format!("{sign}{whole}")
            } else {
                format!("{sign}{whole}.{fraction}")
            };
            let canonical = text.parse::<Cost>().unwrap().to_string();
            // Canonical means the same number with trailing zeros and `-0` dropped.
            let trimmed = text.trim_end_matches('0').trim_end_matches('.');
            let expected = if text.contains('.') { trimmed } else { text.as_str() };
            let expected = if expected.trim_start_matches('-').trim_start_matches('0').is_empty() {
                "0"
            } else {
                expected
            };
            prop_assert_eq!(canonical, expected);
        }
    }
}
