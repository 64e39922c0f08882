//! How long the aggregator keeps the spend counters' fine buckets, which is also how far back
//! the gateway may read them. Both sides take it from here so that they cannot drift apart: a
//! gateway reading a minute the aggregator no longer keeps would see no spend there and admit
//! requests over a cost limit.
//!
//! Minutes of an hour are kept [`MINUTES_KEPT_MS`] after the hour ends, hours of a day
//! [`HOURS_KEPT_MS`] after the day ends; days and lifetime figures are kept for ever. The
//! aggregator neither writes a bucket past these times nor keeps its hash longer (`EXPIREAT`).

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// Minute buckets live this long after the end of their hour.
pub const MINUTES_KEPT_MS: i64 = 26 * HOUR_MS;
/// Hour buckets live this long after the end of their day.
pub const HOURS_KEPT_MS: i64 = 32 * DAY_MS;

/// When the minute buckets of the hour starting at `hour_ms` are gone.
pub fn minutes_gone_at(hour_ms: i64) -> i64 {
    hour_ms + HOUR_MS + MINUTES_KEPT_MS
}

/// When the hour buckets of the day starting at `day_ms` are gone.
pub fn hours_gone_at(day_ms: i64) -> i64 {
    day_ms + DAY_MS + HOURS_KEPT_MS
}
