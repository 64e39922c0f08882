//! Independent arithmetic the tests check the pipeline against: list prices written out by
//! hand from the providers' price pages (not read from our pricing code), exact decimal costs,
//! and a reproducible pseudo-random sequence.

#![allow(clippy::unwrap_used)] // test support: failing loudly is the point

use std::str::FromStr;

use rust_decimal::Decimal;
use shared::UsageEvent;

/// USD per token: input, output, 5-minute cache write, 1-hour cache write, cache read.
pub fn list_price(model: &str) -> Option<[&'static str; 5]> {
    match model {
        "claude-sonnet-4-5" => Some([
            "0.000003",
            "0.000015",
            "0.00000375",
            "0.000006",
            "0.0000003",
        ]),
        "claude-haiku-4-5" => Some([
            "0.000001",
            "0.000005",
            "0.00000125",
            "0.000002",
            "0.0000001",
        ]),
        // OpenAI has no cache-write price: writes are charged as input.
        "gpt-4o" => Some([
            "0.0000025",
            "0.00001",
            "0.0000025",
            "0.0000025",
            "0.00000125",
        ]),
        _ => None,
    }
}

fn usd(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// docs/pricing.md for the models above (below every long-context tier); unknown models cost 0.
pub fn hand_cost(e: &UsageEvent) -> Decimal {
    let Some(r) = list_price(&e.model) else {
        return Decimal::ZERO;
    };
    Decimal::from(e.input_tokens) * usd(r[0])
        + Decimal::from(e.output_tokens) * usd(r[1])
        + Decimal::from(e.cache_creation_input_tokens - e.cache_creation_1h_input_tokens)
            * usd(r[2])
        + Decimal::from(e.cache_creation_1h_input_tokens) * usd(r[3])
        + Decimal::from(e.cache_read_input_tokens) * usd(r[4])
}

/// What the event's cache reads saved (docs/pricing.md, cache savings) for the models above:
/// the reads at the input price less at the cache-read price; unknown models save 0.
pub fn hand_savings(e: &UsageEvent) -> Decimal {
    let Some(r) = list_price(&e.model) else {
        return Decimal::ZERO;
    };
    Decimal::from(e.cache_read_input_tokens) * (usd(r[0]) - usd(r[4]))
}

/// A deterministic pseudo-random sequence, so a failure can be reproduced.
pub struct Lcg(pub u64);

impl Lcg {
    /// A number in `0..below`.
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}
