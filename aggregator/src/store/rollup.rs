//! The time resolutions stats are kept at, their bucket boundaries (UTC) and retention.
//!
//! Every event is counted once at each resolution, so a query can read the coarsest buckets
//! that tile its range exactly. Minutes answer recent, ragged ranges; hours, days and months
//! answer long ones with few reads. Latency sketches are kept at minute, hour and day
//! resolution: a month's quantiles merge its days.

use chrono::{DateTime, Datelike, TimeZone, Utc};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolution {
    Minute,
    Hour,
    Day,
    Month,
}

impl Resolution {
    pub const ALL: [Resolution; 4] = [Self::Minute, Self::Hour, Self::Day, Self::Month];

    /// One character in key names: `{t}:st:<code>:<bucket start ms>`.
    fn code(self) -> char {
        match self {
            Self::Minute => 'm',
            Self::Hour => 'h',
            Self::Day => 'd',
            Self::Month => 'M',
        }
    }

    /// Start (Unix ms) of the bucket containing `ts_ms`.
    pub fn start_of(self, ts_ms: i64) -> i64 {
        match self {
            Self::Minute => ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS,
            Self::Hour => ts_ms.div_euclid(HOUR_MS) * HOUR_MS,
            Self::Day => ts_ms.div_euclid(DAY_MS) * DAY_MS,
            Self::Month => month_start(ts_ms),
        }
    }

    /// Start of the bucket after the one starting at `start_ms`.
    pub fn next(self, start_ms: i64) -> i64 {
        match self {
            Self::Minute => start_ms + MINUTE_MS,
            Self::Hour => start_ms + HOUR_MS,
            Self::Day => start_ms + DAY_MS,
            Self::Month => month_start(month_start(start_ms) + 32 * DAY_MS),
        }
    }

    /// How long buckets are kept after they end; `None`: for ever.
    pub fn retention_ms(self) -> Option<i64> {
        match self {
            Self::Minute => Some(48 * HOUR_MS),
            Self::Hour => Some(90 * DAY_MS),
            Self::Day | Self::Month => None,
        }
    }

    /// Whether latency and time-to-first-token sketches are kept at this resolution.
    pub fn has_sketches(self) -> bool {
        !matches!(self, Self::Month)
    }

    /// Key name (below the keyspace prefix) of the hash holding one bucket.
    pub fn key(self, start_ms: i64) -> String {
        format!("{}{start_ms}", self.key_prefix())
    }

    /// What every key name of this resolution starts with.
    pub fn key_prefix(self) -> String {
        format!("st:{}:", self.code())
    }

    /// Unix seconds at which a bucket's hash expires, `None` for kept resolutions.
    pub fn expire_at_secs(self, start_ms: i64) -> Option<i64> {
        self.retention_ms()
            .map(|keep| (self.next(start_ms) + keep).div_euclid(1000))
    }

    /// Whether a bucket starting at `start_ms` is still within retention at `now_ms`.
    pub fn retained(self, start_ms: i64, now_ms: i64) -> bool {
        self.retention_ms()
            .is_none_or(|keep| self.next(start_ms) + keep > now_ms)
    }
}

fn month_start(ts_ms: i64) -> i64 {
    let Some(t) = DateTime::<Utc>::from_timestamp_millis(ts_ms) else {
        return ts_ms.div_euclid(DAY_MS) * DAY_MS;
    };
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .map_or(ts_ms, |m| m.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[track_caller]
    fn check(resolution: Resolution, at: &str, start: &str, next: &str) {
        let s = resolution.start_of(ms(at));
        assert_eq!(s, ms(start), "start");
        assert_eq!(resolution.next(s), ms(next), "next");
    }

    #[test]
    fn buckets_align_in_utc() {
        check(
            Resolution::Minute,
            "2026-03-01T10:15:42Z",
            "2026-03-01T10:15:00Z",
            "2026-03-01T10:16:00Z",
        );
        check(
            Resolution::Hour,
            "2026-03-01T10:15:42Z",
            "2026-03-01T10:00:00Z",
            "2026-03-01T11:00:00Z",
        );
        check(
            Resolution::Day,
            "2026-03-01T23:59:59Z",
            "2026-03-01T00:00:00Z",
            "2026-03-02T00:00:00Z",
        );
        check(
            Resolution::Month,
            "2026-02-28T23:00:00Z",
            "2026-02-01T00:00:00Z",
            "2026-03-01T00:00:00Z",
        );
        check(
            Resolution::Month,
            "2024-12-31T23:00:00Z",
            "2024-12-01T00:00:00Z",
            "2025-01-01T00:00:00Z",
        );
    }

    #[test]
    fn minutes_expire_two_days_after_they_end_and_months_never() {
        let start = ms("2026-03-01T10:15:00Z");
        assert_eq!(
            Resolution::Minute.expire_at_secs(start),
            Some(ms("2026-03-03T10:16:00Z") / 1000)
        );
        assert_eq!(Resolution::Month.expire_at_secs(start), None);
        assert!(Resolution::Minute.retained(start, ms("2026-03-03T10:15:59Z")));
        assert!(!Resolution::Minute.retained(start, ms("2026-03-03T10:16:00Z")));
    }
}
