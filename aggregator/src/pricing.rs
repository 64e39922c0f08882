//! Exact per-event pricing from a LiteLLM `model_prices_and_context_window.json` (docs/pricing.md).
//!
//! Loading does all the work: every usable rate becomes an integer number of attodollars per
//! token, and each model's tiered and long-context variants are sorted into a small ladder. So
//! pricing an event is at most three hash lookups on `&str` slices plus a few integer
//! multiply-adds, with no allocation and no floats.
//!
//! Rates pass through `f64` once, at load, because that is what `serde_json` gives us. Its
//! shortest round-trip text (`f64::to_string`) is the literal Python wrote into the file, and that
//! text converts to attodollars exactly. The exception is Python float noise with 17 significant
//! digits (`1.6000000000000001e-06`): `serde_json`'s fast float parser may land one ulp away from
//! it, about 1e-22 USD, which rounding to 18 decimals absorbs. Every rate in the bundled snapshot
//! has been checked against an exact decimal reading of its literal.

mod cost;

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use serde_json::{Map, Value};

pub use cost::Cost;
use cost::{Excess, parse_decimal};

/// What pricing one event gives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    pub cost: Cost,
    /// What the event's cache reads would have cost at the input rate, less what they cost at
    /// the cache-read rate: both rates as resolved for its cost (tier, prompt size), so the two
    /// figures never disagree about which prices applied. Zero when the entry has no cache-read
    /// rate of its own (reads are then charged as input), and never negative: a read rate above
    /// the input rate saved nothing rather than cost extra.
    pub cache_savings: Cost,
}

/// What pricing needs from an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage<'a> {
    pub model: &'a str,
    pub service_tier: Option<&'a str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_creation_1h_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

// The wrapped error's text goes into the message instead of `source()`, because the binary prints
// a one-line reason on stderr (docs/configuration.md) and that line must say what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("cannot read pricing file {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("pricing file is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("pricing file must be a JSON object of model entries, found {found}")]
    NotAnObject { found: &'static str },
    #[error("invalid USD amount {text:?}: {reason}")]
    InvalidAmount { text: String, reason: &'static str },
}

/// A resolved price table. Clones share it.
#[derive(Clone)]
pub struct Pricing {
    table: Arc<Table>,
}

struct Table {
    models: HashMap<Box<str>, Model>,
    fingerprint: u64,
    /// Rates that had more than 18 decimals and were rounded.
    rounded_rates: usize,
}

const BUNDLED_JSON: &str = include_str!("../pricing/model_prices_and_context_window.json");

// Parsed on first use and then shared, so every caller of `bundled` pays the ~3.5 MB parse once.
static BUNDLED: LazyLock<Pricing> = LazyLock::new(|| {
    Pricing::from_json(BUNDLED_JSON).expect("the bundled pricing snapshot parses (tested)")
});

impl Pricing {
    /// The LiteLLM snapshot compiled into the binary (see `aggregator/pricing/README.md`).
    pub fn bundled() -> Pricing {
        BUNDLED.clone()
    }

    pub fn from_json(text: &str) -> Result<Pricing, PricingError> {
        let root: Value = serde_json::from_str(text).map_err(PricingError::Json)?;
        let Value::Object(entries) = root else {
            return Err(PricingError::NotAnObject {
                found: json_kind(&root),
            });
        };
        let mut report = LoadReport::default();
        let mut models = HashMap::with_capacity(entries.len());
        for (name, entry) in &entries {
            // LiteLLM documents its schema in an entry of that name; it prices nothing.
            if name == "sample_spec" {
                continue;
            }
            let Value::Object(fields) = entry else {
                continue;
            };
            if let Some(model) = Model::from_fields(name, fields, &mut report) {
                models.insert(Box::from(name.as_str()), model);
            }
        }
        report.warn();
        let fingerprint = fingerprint(&models);
        Ok(Pricing {
            table: Arc::new(Table {
                models,
                fingerprint,
                rounded_rates: report.rounded,
            }),
        })
    }

    pub fn load(path: &Path) -> Result<Pricing, PricingError> {
        let text = std::fs::read_to_string(path).map_err(|error| PricingError::Io {
            path: path.to_owned(),
            error,
        })?;
        Pricing::from_json(&text)
    }

    /// `None` means the model is unknown or has no token rates: the caller counts the event as
    /// unpriced and uses zero for its cost and its savings.
    pub fn price(&self, usage: &Usage) -> Option<Charge> {
        self.lookup(usage.model).map(|model| model.price(usage))
    }

    /// Models that have at least one token rate.
    pub fn model_count(&self) -> usize {
        self.table.models.len()
    }

    /// FNV-1a over a canonical dump of the resolved table: equal for two files that price every
    /// event the same, whatever their key order, number formatting or unrelated fields.
    pub fn fingerprint(&self) -> u64 {
        self.table.fingerprint
    }

    /// Exact name, then without a provider prefix, then that without a date suffix.
    fn lookup(&self, name: &str) -> Option<&Model> {
        let models = &self.table.models;
        if let Some(model) = models.get(name) {
            return Some(model);
        }
        let bare = match name.split_once('/') {
            Some((_, bare)) => {
                if let Some(model) = models.get(bare) {
                    return Some(model);
                }
                bare
            }
            None => name,
        };
        strip_date_suffix(bare).and_then(|undated| models.get(undated))
    }
}

// Printing 4,000 models would bury any log line this appears in.
impl fmt::Debug for Pricing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pricing")
            .field("models", &self.model_count())
            .field("fingerprint", &format_args!("{:016x}", self.fingerprint()))
            .field("rounded_rates", &self.table.rounded_rates)
            .finish()
    }
}

/// Strips `-YYYYMMDD` (Anthropic) or `-YYYY-MM-DD` (OpenAI) from the end of a model name.
fn strip_date_suffix(name: &str) -> Option<&str> {
    let digits = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
    let (rest, last) = name.rsplit_once('-')?;
    if digits(last, 8) {
        return Some(rest);
    }
    let (rest, month) = rest.rsplit_once('-')?;
    let (base, year) = rest.rsplit_once('-')?;
    (digits(year, 4) && digits(month, 2) && digits(last, 2)).then_some(base)
}

/// The key of each base rate of the formula. The 1-hour write key comes before the 5-minute one
/// because it extends it, and the first prefix that matches wins.
const BASES: [(Base, &str); 5] = [
    (Base::Input, "input_cost_per_token"),
    (Base::Output, "output_cost_per_token"),
    (Base::Write1h, "cache_creation_input_token_cost_above_1hr"),
    (Base::Write5m, "cache_creation_input_token_cost"),
    (Base::Read, "cache_read_input_token_cost"),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Base {
    Input,
    Output,
    Write5m,
    Write1h,
    Read,
}

/// Index into `Ladder::flat` and `Step::slot`: the untiered rate and the two service tiers the
/// contract prices separately.
const STANDARD: usize = 0;
const PRIORITY: usize = 1;
const FLEX: usize = 2;

/// Every present variant of one base rate `R` for one model.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
struct Ladder {
    /// `R`, `R_priority`, `R_flex` in attodollars per token.
    flat: [Option<u64>; 3],
    /// `R_above_<N>k_tokens[_<T>]`, by slot and then largest threshold first, so the first step
    /// the prompt exceeds is the one with the largest N.
    steps: Vec<Step>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Step {
    slot: usize,
    /// N * 1000: the step applies when the prompt has strictly more tokens.
    over: u64,
    rate: u64,
}

impl Ladder {
    fn is_empty(&self) -> bool {
        self.flat.iter().all(Option::is_none) && self.steps.is_empty()
    }

    /// First present of `R_above_<N>k_tokens_<T>`, `R_<T>`, `R_above_<N>k_tokens`, `R`.
    fn resolve(&self, slot: usize, prompt: u64) -> Option<u64> {
        let tiered = match slot {
            STANDARD => None,
            _ => self.step(slot, prompt).or(self.flat[slot]),
        };
        tiered
            .or_else(|| self.step(STANDARD, prompt))
            .or(self.flat[STANDARD])
    }

    fn step(&self, slot: usize, prompt: u64) -> Option<u64> {
        self.steps
            .iter()
            .find(|step| step.slot == slot && prompt > step.over)
            .map(|step| step.rate)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Model {
    /// Indexed by `Base as usize`.
    ladders: [Ladder; 5],
}

impl Model {
    /// `None` when the entry has no input or output rate in any form: an image, audio or search
    /// model that tokens cannot price.
    fn from_fields(
        name: &str,
        fields: &Map<String, Value>,
        report: &mut LoadReport,
    ) -> Option<Model> {
        let mut ladders: [Ladder; 5] = Default::default();
        for (key, value) in fields {
            let Some((base, over, slot)) = parse_rate_key(key) else {
                continue;
            };
            let Some(rate) = report.rate(name, key, value) else {
                continue;
            };
            let ladder = &mut ladders[base as usize];
            match over {
                None => ladder.flat[slot] = Some(rate),
                Some(over) => ladder.steps.push(Step { slot, over, rate }),
            }
        }
        if ladders[Base::Input as usize].is_empty() && ladders[Base::Output as usize].is_empty() {
            return None;
        }
        for ladder in &mut ladders {
            ladder
                .steps
                .sort_unstable_by_key(|step| (step.slot, Reverse(step.over), step.rate));
            ladder.steps.shrink_to_fit();
        }
        Some(Model { ladders })
    }

    fn price(&self, usage: &Usage) -> Charge {
        let prompt = usage
            .input_tokens
            .saturating_add(usage.cache_creation_input_tokens)
            .saturating_add(usage.cache_read_input_tokens);
        let slot = match usage.service_tier {
            Some("priority") => PRIORITY,
            Some("flex") => FLEX,
            _ => STANDARD,
        };
        let rate = |base: Base| self.ladders[base as usize].resolve(slot, prompt);
        let input = rate(Base::Input);
        let write_5m = rate(Base::Write5m).or(input);
        let write_1h = rate(Base::Write1h).or(write_5m);
        let read = rate(Base::Read).or(input);

        let write_1h_tokens = usage.cache_creation_1h_input_tokens;
        let write_5m_tokens = usage
            .cache_creation_input_tokens
            .saturating_sub(write_1h_tokens);
        let atto = [
            term(usage.input_tokens, input),
            term(usage.output_tokens, rate(Base::Output)),
            term(write_5m_tokens, write_5m),
            term(write_1h_tokens, write_1h),
            term(usage.cache_read_input_tokens, read),
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add);
        let saved_per_read = input.unwrap_or(0).saturating_sub(read.unwrap_or(0));
        Charge {
            cost: atto_cost(atto),
            cache_savings: atto_cost(term(usage.cache_read_input_tokens, Some(saved_per_read))),
        }
    }
}

fn atto_cost(atto: u128) -> Cost {
    Cost::from_atto(i128::try_from(atto).unwrap_or(i128::MAX))
}

/// A `u64` times a `u64` always fits in a `u128`; only the sum of five can saturate.
fn term(tokens: u64, rate: Option<u64>) -> u128 {
    u128::from(tokens) * u128::from(rate.unwrap_or(0))
}

/// Splits `R`, `R_<T>`, `R_above_<N>k_tokens` or `R_above_<N>k_tokens_<T>` into (R, N * 1000,
/// slot of T). Every other key (`_batches`, `_above_12hr`, `_cache_hit`, ...) is not a rate of the
/// formula and gives `None`.
fn parse_rate_key(key: &str) -> Option<(Base, Option<u64>, usize)> {
    let (base, rest) = BASES
        .iter()
        .find_map(|&(base, prefix)| key.strip_prefix(prefix).map(|rest| (base, rest)))?;
    let (rest, slot) = if let Some(rest) = rest.strip_suffix("_priority") {
        (rest, PRIORITY)
    } else if let Some(rest) = rest.strip_suffix("_flex") {
        (rest, FLEX)
    } else {
        (rest, STANDARD)
    };
    if rest.is_empty() {
        return Some((base, None, slot));
    }
    let thousands = rest.strip_prefix("_above_")?.strip_suffix("k_tokens")?;
    if thousands.is_empty() || !thousands.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let over = thousands.parse::<u64>().ok()?.checked_mul(1000)?;
    Some((base, Some(over), slot))
}

/// Counts what loading had to round or skip, so one warning per load says so.
#[derive(Default)]
struct LoadReport {
    rounded: usize,
    first_rounded: Option<String>,
    skipped: usize,
    first_skipped: Option<String>,
}

impl LoadReport {
    /// The value of a rate field in attodollars per token. Non-numbers (objects, strings, null)
    /// are not rates and are passed over silently; numbers that cannot be a rate are skipped and
    /// counted.
    fn rate(&mut self, model: &str, key: &str, value: &Value) -> Option<u64> {
        let Value::Number(number) = value else {
            return None;
        };
        let parsed = match number.as_u64() {
            // Whole dollars per token: exact without a detour through f64.
            Some(whole) => parse_decimal(&whole.to_string(), Excess::Reject),
            None => match number.as_f64() {
                Some(float) if float >= 0.0 => {
                    parse_decimal(&float.to_string(), Excess::RoundHalfEven)
                }
                _ => Err("negative rate"),
            },
        };
        // A rate past u64::MAX attodollars is over $18 per token: not a real price.
        let rate = parsed.and_then(|parsed| {
            let atto = u64::try_from(parsed.atto).map_err(|_| "rate above $18 per token")?;
            Ok((atto, parsed.rounded))
        });
        match rate {
            Ok((atto, rounded)) => {
                if rounded {
                    self.rounded += 1;
                    self.first_rounded
                        .get_or_insert_with(|| format!("{model}.{key} = {number}"));
                }
                Some(atto)
            }
            Err(reason) => {
                self.skipped += 1;
                self.first_skipped
                    .get_or_insert_with(|| format!("{model}.{key} = {number}: {reason}"));
                None
            }
        }
    }

    fn warn(&self) {
        if let Some(example) = &self.first_rounded {
            tracing::warn!(
                count = self.rounded,
                example = %example,
                "pricing rates with more than 18 decimals were rounded half-even to attodollars"
            );
        }
        if let Some(example) = &self.first_skipped {
            tracing::warn!(
                count = self.skipped,
                example = %example,
                "pricing rates that cannot be a price were ignored"
            );
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// FNV-1a 64 over the models sorted by name. Written out by hand, with fixed-width little-endian
/// integers, so the value never changes with the platform, the Rust version or `HashMap` order.
fn fingerprint(models: &HashMap<Box<str>, Model>) -> u64 {
    let mut hash = Fnv1a::default();
    let mut sorted: Vec<(&str, &Model)> = models
        .iter()
        .map(|(name, model)| (&**name, model))
        .collect();
    sorted.sort_unstable_by_key(|&(name, _)| name);
    for (name, model) in sorted {
        // 0xFF never occurs in UTF-8, so it cannot be confused with a name's last byte.
        hash.write(name.as_bytes());
        hash.write(&[0xFF]);
        for ladder in &model.ladders {
            for rate in ladder.flat {
                match rate {
                    Some(rate) => {
                        hash.write(&[1]);
                        hash.write(&rate.to_le_bytes());
                    }
                    None => hash.write(&[0]),
                }
            }
            hash.write(&(ladder.steps.len() as u64).to_le_bytes());
            for step in &ladder.steps {
                hash.write(&[step.slot as u8]);
                hash.write(&step.over.to_le_bytes());
                hash.write(&step.rate.to_le_bytes());
            }
        }
    }
    hash.0
}

struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Pricing, PricingError, Usage};

    // Expected costs are worked out by hand from the rates written in each test, in the comment
    // beside them, so they do not share arithmetic with the code under test.

    fn pricing(json: &str) -> Pricing {
        Pricing::from_json(json).unwrap()
    }

    #[track_caller]
    fn check(pricing: &Pricing, usage: Usage<'_>, want: &str) {
        let got = pricing.price(&usage).map(|charge| charge.cost.to_string());
        assert_eq!(got.as_deref(), Some(want), "{usage:?}");
    }

    #[track_caller]
    fn check_unpriced(pricing: &Pricing, model: &str) {
        let usage = Usage {
            model,
            input_tokens: 1_000,
            ..Usage::default()
        };
        assert_eq!(pricing.price(&usage), None, "{model:?} should be unpriced");
    }

    #[track_caller]
    fn check_savings(pricing: &Pricing, usage: Usage<'_>, want: &str) {
        let got = pricing
            .price(&usage)
            .map(|charge| charge.cache_savings.to_string());
        assert_eq!(got.as_deref(), Some(want), "{usage:?}");
    }

    const ALL_FIVE: &str = r#"{"m": {
        "input_cost_per_token": 1e-06,
        "output_cost_per_token": 2e-06,
        "cache_creation_input_token_cost": 3e-06,
        "cache_creation_input_token_cost_above_1hr": 4e-06,
        "cache_read_input_token_cost": 5e-07}}"#;

    #[test]
    fn each_token_kind_is_charged_at_its_own_rate() {
        let usage = Usage {
            model: "m",
            input_tokens: 1_000,
            output_tokens: 100,
            cache_creation_input_tokens: 50,
            cache_creation_1h_input_tokens: 20,
            cache_read_input_tokens: 2_000,
            ..Usage::default()
        };
        // 1000*0.000001 + 100*0.000002 + 30*0.000003 + 20*0.000004 + 2000*0.0000005
        // = 0.001 + 0.0002 + 0.00009 + 0.00008 + 0.001
        check(&pricing(ALL_FIVE), usage, "0.00237");
    }

    #[test]
    fn cache_savings_are_reads_at_the_input_rate_less_the_read_rate() {
        let usage = Usage {
            model: "m",
            input_tokens: 1_000,
            output_tokens: 100,
            cache_creation_input_tokens: 50,
            cache_read_input_tokens: 2_000,
            ..Usage::default()
        };
        // 2000 * (0.000001 - 0.0000005); other tokens save nothing.
        check_savings(&pricing(ALL_FIVE), usage, "0.001");
        let no_reads = Usage {
            cache_read_input_tokens: 0,
            ..usage
        };
        check_savings(&pricing(ALL_FIVE), no_reads, "0");
    }

    #[test]
    fn a_model_without_a_cache_read_rate_saves_nothing() {
        // Its reads are charged at the input rate, so they cost what uncached input would.
        let p =
            pricing(r#"{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}}"#);
        let usage = Usage {
            model: "m",
            cache_read_input_tokens: 1_000,
            ..Usage::default()
        };
        check(&p, usage, "0.001");
        check_savings(&p, usage, "0");
    }

    #[test]
    fn savings_use_the_rates_the_cost_resolved_for_tier_and_prompt() {
        let p = pricing(
            r#"{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,
                      "input_cost_per_token_priority": 2e-06,
                      "input_cost_per_token_above_200k_tokens": 4e-06,
                      "cache_read_input_token_cost": 1e-07,
                      "cache_read_input_token_cost_priority": 5e-07,
                      "cache_read_input_token_cost_above_200k_tokens": 1e-06}}"#,
        );
        let at = |cache_read_input_tokens, service_tier| Usage {
            model: "m",
            service_tier,
            input_tokens: 100_000,
            cache_read_input_tokens,
            ..Usage::default()
        };
        // P = 110,000: 10000 * (0.000001 - 0.0000001)
        check_savings(&p, at(10_000, None), "0.009");
        // 10000 * (0.000002 - 0.0000005)
        check_savings(&p, at(10_000, Some("priority")), "0.015");
        // P = 250,000 > 200k, the reads counting towards it: 150000 * (0.000004 - 0.000001)
        check_savings(&p, at(150_000, None), "0.45");
        // Priority has no long-context rates of its own, so `_priority` wins for both:
        // 150000 * (0.000002 - 0.0000005)
        check_savings(&p, at(150_000, Some("priority")), "0.225");
    }

    #[test]
    fn a_read_rate_above_the_input_rate_saves_nothing_rather_than_a_negative_amount() {
        let p = pricing(
            r#"{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,
                      "cache_read_input_token_cost": 2e-06},
                "reads-only": {"output_cost_per_token": 1e-06,
                               "cache_read_input_token_cost": 1e-07}}"#,
        );
        let usage = |model| Usage {
            model,
            cache_read_input_tokens: 1_000,
            ..Usage::default()
        };
        check(&p, usage("m"), "0.002");
        check_savings(&p, usage("m"), "0");
        // No input rate: uncached input would have cost nothing, so reads saved nothing.
        check(&p, usage("reads-only"), "0.0001");
        check_savings(&p, usage("reads-only"), "0");
    }

    #[test]
    fn an_unpriced_model_has_no_savings_either() {
        let usage = Usage {
            model: "unknown",
            cache_read_input_tokens: 1_000,
            ..Usage::default()
        };
        assert_eq!(pricing(ALL_FIVE).price(&usage), None);
    }

    #[test]
    fn one_hour_writes_beyond_all_cache_writes_leave_none_at_the_five_minute_rate() {
        let usage = Usage {
            model: "m",
            cache_creation_input_tokens: 10,
            cache_creation_1h_input_tokens: 30,
            ..Usage::default()
        };
        // 0 * 0.000003 + 30 * 0.000004
        check(&pricing(ALL_FIVE), usage, "0.00012");
    }

    #[test]
    fn no_tokens_cost_zero() {
        check(
            &pricing(ALL_FIVE),
            Usage {
                model: "m",
                ..Usage::default()
            },
            "0",
        );
    }

    #[test]
    fn missing_cache_rates_fall_back_to_the_input_rate() {
        let p =
            pricing(r#"{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}}"#);
        let usage = Usage {
            model: "m",
            cache_creation_input_tokens: 100,
            cache_creation_1h_input_tokens: 40,
            cache_read_input_tokens: 1_000,
            ..Usage::default()
        };
        // (100 + 1000) * 0.000001
        check(&p, usage, "0.0011");
    }

    #[test]
    fn a_missing_one_hour_rate_falls_back_to_the_five_minute_rate() {
        let p = pricing(
            r#"{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                      "cache_creation_input_token_cost": 3e-06}}"#,
        );
        let usage = Usage {
            model: "m",
            cache_creation_input_tokens: 100,
            cache_creation_1h_input_tokens: 40,
            ..Usage::default()
        };
        // (60 + 40) * 0.000003
        check(&p, usage, "0.0003");
    }

    #[test]
    fn fallbacks_use_the_rates_resolved_for_this_prompt() {
        let p = pricing(
            r#"{"m": {"input_cost_per_token": 1e-06, "input_cost_per_token_above_200k_tokens": 2e-06,
                      "output_cost_per_token": 1e-06,
                      "cache_creation_input_token_cost": 3e-06,
                      "cache_creation_input_token_cost_above_200k_tokens": 6e-06}}"#,
        );
        let usage = Usage {
            model: "m",
            input_tokens: 150_000,
            cache_creation_input_tokens: 100,
            cache_creation_1h_input_tokens: 40,
            cache_read_input_tokens: 60_000,
            ..Usage::default()
        };
        // P = 210,100 > 200k. Reads fall back to the long-context input rate, 1-hour writes to the
        // long-context 5-minute rate: 150000*0.000002 + 100*0.000006 + 60000*0.000002
        // = 0.3 + 0.0006 + 0.12
        check(&p, usage, "0.4206");
    }

    const LONG_CONTEXT: &str = r#"{"m": {
        "input_cost_per_token": 1e-06, "input_cost_per_token_above_200k_tokens": 2e-06,
        "output_cost_per_token": 3e-06, "output_cost_per_token_above_200k_tokens": 6e-06}}"#;

    #[test]
    fn long_context_rates_apply_only_strictly_above_the_threshold() {
        let p = pricing(LONG_CONTEXT);
        let at = |input_tokens| Usage {
            model: "m",
            input_tokens,
            output_tokens: 10,
            ..Usage::default()
        };
        // 200000*0.000001 + 10*0.000003
        check(&p, at(200_000), "0.20003");
        // 200001*0.000002 + 10*0.000006
        check(&p, at(200_001), "0.400062");
    }

    #[test]
    fn prompt_size_counts_cache_tokens_but_not_output_tokens() {
        let p = pricing(LONG_CONTEXT);
        let with_cache = Usage {
            model: "m",
            input_tokens: 100_000,
            cache_creation_input_tokens: 50_000,
            cache_read_input_tokens: 50_001,
            output_tokens: 300_000,
            ..Usage::default()
        };
        // P = 200,001: (100000 + 50000 + 50001)*0.000002 + 300000*0.000006 = 0.400002 + 1.8
        check(&p, with_cache, "2.200002");
        let without_cache = Usage {
            model: "m",
            input_tokens: 100_000,
            output_tokens: 300_000,
            ..Usage::default()
        };
        // P = 100,000: 100000*0.000001 + 300000*0.000003 = 0.1 + 0.9
        check(&p, without_cache, "1");
    }

    #[test]
    fn the_largest_threshold_the_prompt_exceeds_wins() {
        // Listed largest first, to show the order in the file does not matter.
        let p = pricing(
            r#"{"m": {"input_cost_per_token": 1e-06,
                      "input_cost_per_token_above_256k_tokens": 4e-06,
                      "input_cost_per_token_above_32k_tokens": 2e-06}}"#,
        );
        let at = |input_tokens| Usage {
            model: "m",
            input_tokens,
            ..Usage::default()
        };
        check(&p, at(32_000), "0.032"); // 32000 * 0.000001
        check(&p, at(32_001), "0.064002"); // 32001 * 0.000002
        check(&p, at(256_000), "0.512"); // 256000 * 0.000002
        check(&p, at(256_001), "1.024004"); // 256001 * 0.000004
    }

    const TIERS: &str = r#"{"m": {
        "input_cost_per_token": 1e-06,
        "input_cost_per_token_priority": 2e-06,
        "input_cost_per_token_flex": 5e-07,
        "input_cost_per_token_above_272k_tokens": 3e-06,
        "input_cost_per_token_above_272k_tokens_priority": 6e-06,
        "output_cost_per_token": 1e-06}}"#;

    fn tiered(input_tokens: u64, service_tier: Option<&str>) -> Usage<'_> {
        Usage {
            model: "m",
            service_tier,
            input_tokens,
            ..Usage::default()
        }
    }

    #[test]
    fn service_tier_rates_replace_the_standard_ones() {
        let p = pricing(TIERS);
        check(&p, tiered(1_000, None), "0.001"); // 1000 * 0.000001
        check(&p, tiered(1_000, Some("priority")), "0.002"); // 1000 * 0.000002
        check(&p, tiered(1_000, Some("flex")), "0.0005"); // 1000 * 0.0000005
    }

    #[test]
    fn a_tiered_long_context_rate_beats_every_other_candidate() {
        // 300000 * 0.000006
        check(&pricing(TIERS), tiered(300_000, Some("priority")), "1.8");
    }

    #[test]
    fn a_tier_rate_beats_an_untiered_long_context_rate() {
        let p = pricing(TIERS);
        // No `_above_272k_tokens_flex`, so `_flex` wins over `_above_272k_tokens`: 300000 * 0.0000005
        check(&p, tiered(300_000, Some("flex")), "0.15");
        // 300000 * 0.000003
        check(&p, tiered(300_000, None), "0.9");
    }

    #[test]
    fn other_service_tiers_are_priced_as_standard() {
        let p = pricing(TIERS);
        for tier in [
            "default",
            "auto",
            "scale",
            "Priority",
            "FLEX",
            "",
            "priority ",
        ] {
            check(&p, tiered(1_000, Some(tier)), "0.001"); // 1000 * 0.000001
        }
    }

    #[test]
    fn a_tier_without_rates_of_its_own_uses_the_standard_ladder() {
        let p = pricing(
            r#"{"m": {"input_cost_per_token": 1e-06, "input_cost_per_token_above_272k_tokens": 3e-06,
                      "output_cost_per_token": 1e-06}}"#,
        );
        check(&p, tiered(1_000, Some("flex")), "0.001"); // 1000 * 0.000001
        check(&p, tiered(300_000, Some("flex")), "0.9"); // 300000 * 0.000003
    }

    #[test]
    fn each_base_rate_resolves_on_its_own() {
        let p = pricing(
            r#"{"m": {"input_cost_per_token": 1e-06,
                      "output_cost_per_token": 2e-06, "output_cost_per_token_priority": 4e-06,
                      "cache_read_input_token_cost": 1e-07,
                      "cache_read_input_token_cost_above_200k_tokens": 2e-07}}"#,
        );
        let usage = Usage {
            model: "m",
            service_tier: Some("priority"),
            input_tokens: 150_000,
            output_tokens: 1_000,
            cache_read_input_tokens: 60_000,
            ..Usage::default()
        };
        // P = 210,000: 150000*0.000001 + 1000*0.000004 + 60000*0.0000002 = 0.15 + 0.004 + 0.012
        check(&p, usage, "0.166");
    }

    #[test]
    fn entries_without_an_input_or_output_rate_are_unpriced() {
        let p = pricing(
            r#"{"image": {"output_cost_per_image": 0.04, "cache_read_input_token_cost": 1e-07},
                "batch-only": {"input_cost_per_token_batches": 1e-07},
                "embedding": {"input_cost_per_token": 1e-07}}"#,
        );
        check_unpriced(&p, "image");
        check_unpriced(&p, "batch-only");
        assert_eq!(p.model_count(), 1);
    }

    #[test]
    fn an_entry_with_only_an_output_rate_charges_only_output() {
        let p = pricing(r#"{"m": {"output_cost_per_token": 2e-06}}"#);
        let usage = Usage {
            model: "m",
            input_tokens: 1_000,
            output_tokens: 10,
            cache_read_input_tokens: 500,
            ..Usage::default()
        };
        // 10 * 0.000002; input and its cache fallbacks have no rate.
        check(&p, usage, "0.00002");
    }

    #[test]
    fn fields_and_entries_outside_the_formula_are_ignored() {
        let p = pricing(
            r#"{"sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
                "a number": 1, "a list": [1], "a string": "s", "null": null,
                "m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                      "litellm_provider": "openai", "max_tokens": 8192,
                      "input_cost_per_token_batches": 9.0,
                      "input_cost_per_token_cache_hit": 9.0,
                      "input_cost_per_token_above_272k_tokens_batches": 9.0,
                      "output_cost_per_token_ultrafast": 9.0,
                      "cache_creation_input_token_cost_above_12hr": 9.0,
                      "input_cost_per_token_above_k_tokens": 9.0,
                      "input_cost_per_token_above_2x0k_tokens": 9.0,
                      "input_cost_per_token_above_200_tokens": 9.0,
                      "cache_read_input_token_cost": {"nested": 9.0},
                      "cache_creation_input_token_cost": "9.0",
                      "input_cost_per_token_priority": null}}"#,
        );
        let usage = Usage {
            model: "m",
            service_tier: Some("priority"),
            input_tokens: 300_000,
            output_tokens: 10,
            cache_creation_input_tokens: 100,
            cache_read_input_tokens: 100,
            ..Usage::default()
        };
        // Only the two plain rates count; the cache tokens fall back to input:
        // (300000 + 100 + 100)*0.000001 + 10*0.000002 = 0.3002 + 0.00002
        check(&p, usage, "0.30022");
        check_unpriced(&p, "sample_spec");
        assert_eq!(p.model_count(), 1);
    }

    #[test]
    fn integer_rates_are_whole_dollars_per_token() {
        let p = pricing(r#"{"m": {"input_cost_per_token": 0, "output_cost_per_token": 2}}"#);
        let usage = Usage {
            model: "m",
            input_tokens: 5,
            output_tokens: 3,
            ..Usage::default()
        };
        check(&p, usage, "6"); // 5*0 + 3*2
    }

    #[test]
    fn negative_rates_are_ignored() {
        let p =
            pricing(r#"{"m": {"input_cost_per_token": -1e-06, "output_cost_per_token": 2e-06}}"#);
        let usage = Usage {
            model: "m",
            input_tokens: 1_000,
            output_tokens: 1,
            ..Usage::default()
        };
        check(&p, usage, "0.000002"); // 1 * 0.000002
    }

    #[test]
    fn rates_with_more_than_eighteen_decimals_round_half_even_per_token() {
        let p = pricing(
            r#"{"m": {"input_cost_per_token": 2.5e-18, "output_cost_per_token": 3.5e-18,
                      "cache_read_input_token_cost": 1.23456789012355e-06,
                      "cache_creation_input_token_cost": 1.5e-06}}"#,
        );
        let usage = Usage {
            model: "m",
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            cache_read_input_tokens: 1,
            ..Usage::default()
        };
        // Rates in attodollars: 2.5 -> 2 and 3.5 -> 4 (ties to even), 1234567890123.55 -> ..124.
        // 1000000*2 + 1000000*4 + 1*1234567890124 = 1234573890124 attodollars.
        check(&p, usage, "0.000001234573890124");
        assert_eq!(p.table.rounded_rates, 3);
    }

    const NAMES: &str = r#"{
        "claude-x": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
        "claude-x-20250101": {"input_cost_per_token": 2e-06, "output_cost_per_token": 1e-06},
        "gpt-y": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1e-06},
        "acme/z": {"input_cost_per_token": 4e-06, "output_cost_per_token": 1e-06}}"#;

    fn named(model: &str) -> Usage<'_> {
        Usage {
            model,
            input_tokens: 1_000,
            ..Usage::default()
        }
    }

    #[test]
    fn lookup_drops_a_provider_prefix_and_then_a_date_suffix() {
        let p = pricing(NAMES);
        // 1000 input tokens at $1, $2, $3 and $4 per million pick out the entry that matched.
        check(&p, named("claude-x"), "0.001");
        check(&p, named("anthropic/claude-x"), "0.001");
        check(&p, named("claude-x-20991231"), "0.001");
        check(&p, named("anthropic/claude-x-20991231"), "0.001");
        check(&p, named("gpt-y-2024-08-06"), "0.003");
        check(&p, named("openai/gpt-y-2024-08-06"), "0.003");
    }

    #[test]
    fn lookup_prefers_the_most_specific_name() {
        let p = pricing(NAMES);
        check(&p, named("claude-x-20250101"), "0.002");
        check(&p, named("anthropic/claude-x-20250101"), "0.002");
        check(&p, named("acme/z"), "0.004");
        // Only the first `/` is a provider prefix.
        check(&p, named("proxy/acme/z"), "0.004");
    }

    #[test]
    fn lookup_does_not_guess_beyond_prefix_and_date() {
        let p = pricing(NAMES);
        for model in [
            "",
            "unknown",
            "anthropic/",
            "claude",
            "claude-x-2025010",
            "claude-x-202501011",
            "claude-x20250101",
            "claude-x-v20250101",
            "gpt-y-24-08-06",
            "gpt-y-2024-8-06",
            "z",
            "acme/z-extra",
            "CLAUDE-X",
        ] {
            check_unpriced(&p, model);
        }
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(matches!(
            Pricing::from_json("[]"),
            Err(PricingError::NotAnObject { found: "an array" })
        ));
        assert!(matches!(
            Pricing::from_json("{"),
            Err(PricingError::Json(_))
        ));
        let missing = Path::new("/nonexistent/model_prices.json");
        let err = Pricing::load(missing).unwrap_err();
        assert!(matches!(&err, PricingError::Io { path, .. } if path == missing));
        assert!(
            err.to_string().contains("/nonexistent/model_prices.json"),
            "{err}"
        );
    }

    #[test]
    fn load_reads_a_file() {
        let path = std::env::temp_dir().join(format!("meter-pricing-{}.json", std::process::id()));
        std::fs::write(&path, ALL_FIVE).unwrap();
        let loaded = Pricing::load(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            loaded.unwrap().fingerprint(),
            pricing(ALL_FIVE).fingerprint()
        );
    }

    #[test]
    fn fingerprint_ignores_key_order_number_format_and_unrelated_fields() {
        let a = pricing(
            r#"{"m": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                      "input_cost_per_token_above_200k_tokens": 6e-06,
                      "input_cost_per_token_above_32k_tokens": 4e-06},
                "n": {"input_cost_per_token": 1e-06}}"#,
        );
        let b = pricing(
            r#"{"image": {"output_cost_per_image": 1},
                "n": {"input_cost_per_token": 0.000001, "mode": "embedding"},
                "m": {"input_cost_per_token_above_32k_tokens": 0.000004,
                      "input_cost_per_token_above_200k_tokens": 6e-6,
                      "output_cost_per_token": 0.0000150, "input_cost_per_token": 3E-6,
                      "input_cost_per_token_batches": 1.5e-06}}"#,
        );
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn fingerprint_changes_with_any_rate_or_name() {
        let base =
            pricing(r#"{"m": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}}"#);
        for changed in [
            r#"{"m": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.6e-05}}"#,
            r#"{"m": {"input_cost_per_token": 1.5e-05, "output_cost_per_token": 3e-06}}"#,
            r#"{"m2": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}}"#,
            r#"{"m": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                      "cache_read_input_token_cost": 3e-06}}"#,
            r#"{"m": {"input_cost_per_token": 3e-06, "output_cost_per_token_priority": 1.5e-05}}"#,
            r#"{"m": {"input_cost_per_token": 3e-06, "output_cost_per_token_above_1k_tokens": 1.5e-05}}"#,
        ] {
            assert_ne!(
                base.fingerprint(),
                pricing(changed).fingerprint(),
                "{changed}"
            );
        }
    }

    #[test]
    fn fingerprint_of_a_known_table_never_changes() {
        // Pinned so a change to the canonical dump, which would make equal pricings look
        // different across versions, cannot go unnoticed.
        assert_eq!(pricing(ALL_FIVE).fingerprint(), 0xf620_967c_5846_87f8);
    }

    #[test]
    fn debug_output_summarises_instead_of_listing_models() {
        let text = format!("{:?}", pricing(NAMES));
        assert!(
            text.starts_with("Pricing { models: 4, fingerprint: "),
            "{text}"
        );
    }

    // The bundled snapshot. Rates below are copied from it; counts were taken with Python.

    #[test]
    fn the_bundled_snapshot_parses() {
        let bundled = Pricing::bundled();
        // 4,878 entries: 931 without token rates and `sample_spec`.
        assert_eq!(bundled.model_count(), 3_946);
        // Python float noise such as 3.2000000000000003e-06: 51 such literals, all read back
        // exactly (serde_json's `float_roundtrip`) and rounded half-even to 18 decimals.
        assert_eq!(bundled.table.rounded_rates, 51);
        assert_eq!(bundled.fingerprint(), Pricing::bundled().fingerprint());
    }

    // claude-sonnet-4-5: input 3e-06, output 1.5e-05, 5m write 3.75e-06, 1h write 6e-06,
    // read 3e-07.
    fn sonnet(model: &str, one_hour_writes: u64) -> Usage<'_> {
        Usage {
            model,
            input_tokens: 1_200,
            output_tokens: 800,
            cache_creation_input_tokens: 2_000,
            cache_creation_1h_input_tokens: one_hour_writes,
            cache_read_input_tokens: 50_000,
            ..Usage::default()
        }
    }

    #[test]
    fn bundled_claude_sonnet_4_5_with_five_minute_writes() {
        // 1200*0.000003 + 800*0.000015 + 2000*0.00000375 + 50000*0.0000003
        // = 0.0036 + 0.012 + 0.0075 + 0.015
        check(
            &Pricing::bundled(),
            sonnet("claude-sonnet-4-5", 0),
            "0.0381",
        );
    }

    #[test]
    fn bundled_claude_sonnet_4_5_with_one_hour_writes() {
        // 1200*0.000003 + 800*0.000015 + 500*0.00000375 + 1500*0.000006 + 50000*0.0000003
        // = 0.0036 + 0.012 + 0.001875 + 0.009 + 0.015
        check(
            &Pricing::bundled(),
            sonnet("claude-sonnet-4-5", 1_500),
            "0.041475",
        );
    }

    #[test]
    fn bundled_lookup_falls_back_through_prefix_and_date() {
        let bundled = Pricing::bundled();
        // Same rates as claude-sonnet-4-5 above.
        check(&bundled, sonnet("anthropic/claude-sonnet-4-5", 0), "0.0381");
        check(
            &bundled,
            sonnet("anthropic/claude-sonnet-4-5-20250929", 0),
            "0.0381",
        );
        // Not in the snapshot with this date; claude-sonnet-4-6 has the 4-5 rates.
        check(&bundled, sonnet("claude-sonnet-4-6-20260217", 0), "0.0381");
        check(
            &bundled,
            sonnet("anthropic/claude-sonnet-4-6-20260217", 0),
            "0.0381",
        );
    }

    // The Bedrock claude-sonnet-4-5 entry keeps long-context rates: above 200k input 6e-06,
    // output 2.25e-05, 5m write 7.5e-06, 1h write 1.2e-05, read 6e-07.
    const BEDROCK_SONNET: &str = "anthropic.claude-sonnet-4-5-20250929-v1:0";

    #[test]
    fn bundled_claude_above_200k_uses_long_context_rates() {
        let usage = Usage {
            model: BEDROCK_SONNET,
            input_tokens: 150_000,
            output_tokens: 2_000,
            cache_creation_input_tokens: 10_000,
            cache_creation_1h_input_tokens: 4_000,
            cache_read_input_tokens: 60_000,
            ..Usage::default()
        };
        // P = 220,000: 150000*0.000006 + 2000*0.0000225 + 6000*0.0000075 + 4000*0.000012
        // + 60000*0.0000006 = 0.9 + 0.045 + 0.045 + 0.048 + 0.036
        check(&Pricing::bundled(), usage, "1.074");
    }

    #[test]
    fn bundled_claude_at_exactly_200k_uses_base_rates() {
        let usage = Usage {
            model: BEDROCK_SONNET,
            input_tokens: 140_000,
            output_tokens: 2_000,
            cache_read_input_tokens: 60_000,
            ..Usage::default()
        };
        // P = 200,000: 140000*0.000003 + 2000*0.000015 + 60000*0.0000003 = 0.42 + 0.03 + 0.018
        check(&Pricing::bundled(), usage, "0.468");
    }

    // gpt-4o: input 2.5e-06, output 1e-05, read 1.25e-06; priority 4.25e-06, 1.7e-05, 2.125e-06;
    // no flex rates.
    fn gpt_4o(model: &'static str, service_tier: Option<&'static str>) -> Usage<'static> {
        Usage {
            model,
            service_tier,
            input_tokens: 10_000,
            output_tokens: 1_000,
            cache_read_input_tokens: 4_000,
            ..Usage::default()
        }
    }

    #[test]
    fn bundled_gpt_4o_standard_and_priority() {
        let bundled = Pricing::bundled();
        // 10000*0.0000025 + 1000*0.00001 + 4000*0.00000125 = 0.025 + 0.01 + 0.005
        check(&bundled, gpt_4o("gpt-4o", None), "0.04");
        check(&bundled, gpt_4o("gpt-4o", Some("flex")), "0.04");
        check(&bundled, gpt_4o("openai/gpt-4o-2099-01-01", None), "0.04");
        // 10000*0.00000425 + 1000*0.000017 + 4000*0.000002125 = 0.0425 + 0.017 + 0.0085
        check(&bundled, gpt_4o("gpt-4o", Some("priority")), "0.068");
        check(
            &bundled,
            gpt_4o("gpt-4o-2024-08-06", Some("priority")),
            "0.068",
        );
    }

    fn gpt_5(
        model: &'static str,
        input_tokens: u64,
        service_tier: Option<&'static str>,
    ) -> Usage<'static> {
        Usage {
            model,
            service_tier,
            input_tokens,
            output_tokens: 10_000,
            cache_read_input_tokens: 20_000,
            ..Usage::default()
        }
    }

    #[test]
    fn bundled_gpt_5_has_no_long_context_rates() {
        // This snapshot lists none for gpt-5 itself: 300000*0.00000125 + 10000*0.00001
        // + 20000*0.000000125 = 0.375 + 0.1 + 0.0025
        check(&Pricing::bundled(), gpt_5("gpt-5", 300_000, None), "0.4775");
    }

    #[test]
    fn bundled_gpt_5_4_above_272k_by_service_tier() {
        let bundled = Pricing::bundled();
        // P = 272,000, base rates: 252000*0.0000025 + 10000*0.000015 + 20000*0.00000025
        // = 0.63 + 0.15 + 0.005
        check(&bundled, gpt_5("gpt-5.4", 252_000, None), "0.785");
        // P = 300,000, `_above_272k_tokens`: 280000*0.000005 + 10000*0.0000225 + 20000*0.0000005
        // = 1.4 + 0.225 + 0.01
        check(&bundled, gpt_5("gpt-5.4", 280_000, None), "1.635");
        // `_above_272k_tokens_flex`: 280000*0.0000025 + 10000*0.00001125 + 20000*0.00000025
        // = 0.7 + 0.1125 + 0.005
        check(&bundled, gpt_5("gpt-5.4", 280_000, Some("flex")), "0.8175");
        // No `_above_272k_tokens_priority`, so `_priority`: 280000*0.000005 + 10000*0.00003
        // + 20000*0.0000005 = 1.4 + 0.3 + 0.01
        check(
            &bundled,
            gpt_5("gpt-5.4", 280_000, Some("priority")),
            "1.71",
        );
    }

    #[test]
    fn bundled_gpt_5_6_priority_above_272k() {
        // `_above_272k_tokens_priority`: 280000*0.000016 + 10000*0.00006 + 20000*0.0000016
        // = 4.48 + 0.6 + 0.032
        check(
            &Pricing::bundled(),
            gpt_5("gpt-5.6", 280_000, Some("priority")),
            "5.112",
        );
    }

    #[test]
    fn bundled_cache_savings_follow_each_models_rates() {
        let bundled = Pricing::bundled();
        // claude-sonnet-4-5: 50000 * (0.000003 - 0.0000003)
        check_savings(&bundled, sonnet("claude-sonnet-4-5", 0), "0.135");
        // gpt-4o: 4000 * (0.0000025 - 0.00000125); priority 4000 * (0.00000425 - 0.000002125)
        check_savings(&bundled, gpt_4o("gpt-4o", None), "0.005");
        check_savings(&bundled, gpt_4o("gpt-4o", Some("priority")), "0.0085");
        // Bedrock Sonnet above 200k: 60000 * (0.000006 - 0.0000006)
        let long = Usage {
            model: BEDROCK_SONNET,
            input_tokens: 150_000,
            cache_read_input_tokens: 60_000,
            ..Usage::default()
        };
        check_savings(&bundled, long, "0.324");
        // gpt-5.4 flex above 272k: 20000 * (0.0000025 - 0.00000025)
        check_savings(&bundled, gpt_5("gpt-5.4", 280_000, Some("flex")), "0.045");
        // gpt-4 lists no cache-read rate: its reads are input, and save nothing.
        check_savings(&bundled, gpt_4o("gpt-4", None), "0");
    }

    #[test]
    fn bundled_unknown_model_is_unpriced() {
        let bundled = Pricing::bundled();
        check_unpriced(&bundled, "claude-nonexistent-9");
        check_unpriced(&bundled, "anthropic/claude-nonexistent-9-20250101");
    }
}
