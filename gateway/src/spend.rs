//! Reading the spend counters the aggregator keeps per key (layout in `aggregator/src/spend.rs`
//! and ARCHITECTURE.md): which hash fields sum to a rolling window's tokens or cost.
//!
//! A window `[now − W, now]` is tiled from its start with the coarsest buckets that fit whole:
//! days where a whole day fits, hours where a whole hour fits, minutes at the ragged ends. The
//! minute holding `now − W` counts whole, so a window can only count a little more than its
//! exact span, never less: a limit may trip up to a minute early, never late.
//!
//! The aggregator keeps minutes only 26 h after their hour and hours 32 days after their day
//! (`shared::spend_retention`). A window reaching further back than that starts at the whole
//! hour (or day) holding `now − W` instead of at its minute (or hour): a bucket that is gone
//! would read as no spend, and a cost limit would admit requests it must refuse. Counting up to
//! an hour (past 32 days, a day) before the window is the safe side: the limit trips that much
//! early at worst, and only for spend at the very start of a window more than a day long.

use shared::spend_retention::{DAY_MS, HOUR_MS, MINUTE_MS, hours_gone_at, minutes_gone_at};

/// A bucket is read only while its hash has at least this long to live, for clock skew between
/// the gateway, the aggregator and Redis (which expires the hashes by its own clock).
const EXPIRY_MARGIN_MS: i64 = HOUR_MS;

/// Fields of one hash to read: the hash's name below `sp:<key>` and the bucket starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub hash_suffix: String,
    pub buckets: Vec<i64>,
}

/// The hashes and bucket fields covering `[now − window, now]`.
pub fn window_reads(now_ms: i64, window_ms: i64) -> Vec<Read> {
    // Hashes are told apart by number while tiling and named once at the end: this runs on
    // every request of a key with a spend limit, up to ~200 buckets for a 30-day window.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Hash {
        Days,
        Hours { day: i64 },
        Minutes { hour: i64 },
    }
    let mut reads: Vec<(Hash, Vec<i64>)> = Vec::new();
    let mut push = |hash: Hash, bucket: i64| match reads.iter_mut().find(|(h, _)| *h == hash) {
        Some((_, buckets)) => buckets.push(bucket),
        None => reads.push((hash, vec![bucket])),
    };
    let mut t = readable_start(
        now_ms,
        (now_ms - window_ms).div_euclid(MINUTE_MS) * MINUTE_MS,
    );
    while t <= now_ms {
        if t.rem_euclid(DAY_MS) == 0 && t + DAY_MS <= now_ms {
            push(Hash::Days, t);
            t += DAY_MS;
        } else if t.rem_euclid(HOUR_MS) == 0 && t + HOUR_MS <= now_ms {
            push(
                Hash::Hours {
                    day: t.div_euclid(DAY_MS) * DAY_MS,
                },
                t,
            );
            t += HOUR_MS;
        } else {
            push(
                Hash::Minutes {
                    hour: t.div_euclid(HOUR_MS) * HOUR_MS,
                },
                t,
            );
            t += MINUTE_MS;
        }
    }
    reads
        .into_iter()
        .map(|(hash, buckets)| Read {
            hash_suffix: match hash {
                Hash::Days => ":d".to_owned(),
                Hash::Hours { day } => format!(":h:{day}"),
                Hash::Minutes { hour } => format!(":m:{hour}"),
            },
            buckets,
        })
        .collect()
}

/// The start of the first bucket still kept that holds `minute`: the minute itself, else its
/// hour, else its day. Only the window's first bucket can be that old: the tiling moves on to
/// hours and days from there, and its other minutes and hours are the window's recent end.
fn readable_start(now_ms: i64, minute: i64) -> i64 {
    let hour = minute.div_euclid(HOUR_MS) * HOUR_MS;
    if minutes_gone_at(hour) - EXPIRY_MARGIN_MS > now_ms {
        return minute;
    }
    let day = minute.div_euclid(DAY_MS) * DAY_MS;
    if hours_gone_at(day) - EXPIRY_MARGIN_MS > now_ms {
        return hour;
    }
    day
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(reads: &[Read]) -> i64 {
        reads
            .iter()
            .map(|r| {
                let width = match r.hash_suffix.as_bytes().get(1) {
                    Some(b'd') => DAY_MS,
                    Some(b'h') => HOUR_MS,
                    _ => MINUTE_MS,
                };
                width * r.buckets.len() as i64
            })
            .sum()
    }

    #[test]
    fn a_minute_window_reads_two_minutes() {
        let now = 10 * DAY_MS + 5 * HOUR_MS + 30 * MINUTE_MS + 1234;
        let reads = window_reads(now, MINUTE_MS);
        assert_eq!(reads.len(), 1);
        assert_eq!(
            reads[0].hash_suffix,
            format!(":m:{}", 10 * DAY_MS + 5 * HOUR_MS)
        );
        assert_eq!(reads[0].buckets, [now - 1234 - MINUTE_MS, now - 1234]);
    }

    /// Every bucket read as (start, width), oldest first.
    fn buckets(reads: &[Read]) -> Vec<(i64, i64)> {
        let mut all: Vec<(i64, i64)> = reads
            .iter()
            .flat_map(|r| {
                let width = match r.hash_suffix.as_bytes().get(1) {
                    Some(b'd') => DAY_MS,
                    Some(b'h') => HOUR_MS,
                    _ => MINUTE_MS,
                };
                r.buckets.iter().map(move |b| (*b, width))
            })
            .collect();
        all.sort_unstable();
        all
    }

    /// The reads tile `[now − window, now]` without gaps, and read no bucket the aggregator
    /// may already have dropped: a minute whose hour's minutes are kept for less than another
    /// hour, an hour whose day's hours are (the hour covers clock skew between the processes).
    #[track_caller]
    fn check_tiling(now: i64, window: i64) {
        let reads = window_reads(now, window);
        let all = buckets(&reads);
        let (first, last) = (all[0], all[all.len() - 1]);
        assert!(
            first.0 <= now - window,
            "starts late: {first:?} ({now}, {window})"
        );
        assert!(
            last.0 + last.1 > now,
            "ends early: {last:?} ({now}, {window})"
        );
        for pair in all.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0, "gap ({now}, {window})");
        }
        for (start, width) in all {
            if width == MINUTE_MS {
                let hour = start.div_euclid(HOUR_MS) * HOUR_MS;
                assert!(
                    minutes_gone_at(hour) - HOUR_MS > now,
                    "minute {start} may be gone ({now}, {window})"
                );
            } else if width == HOUR_MS {
                let day = start.div_euclid(DAY_MS) * DAY_MS;
                assert!(
                    hours_gone_at(day) - HOUR_MS > now,
                    "hour {start} may be gone ({now}, {window})"
                );
            }
        }
    }

    #[test]
    fn a_thirty_day_window_reads_few_fields_and_covers_the_span_without_gaps() {
        let now = 100 * DAY_MS + 13 * HOUR_MS + 17 * MINUTE_MS + 5;
        let window = 30 * DAY_MS;
        let reads = window_reads(now, window);
        let fields: usize = reads.iter().map(|r| r.buckets.len()).sum();
        assert!(fields < 200, "{fields} fields");
        // Covers at least the window, and at most its first hour whole (the minutes of 30 days
        // ago are gone) and an extra minute at the end.
        let span = covered(&reads);
        assert!(
            span >= window && span <= window + HOUR_MS + MINUTE_MS,
            "{span}"
        );
        check_tiling(now, window);
    }

    #[test]
    fn a_week_long_window_reads_its_first_partial_hour_whole_since_its_minutes_are_gone() {
        // The window starts at 10:30 seven days ago; minutes of that hour were dropped 26 h
        // after it ended, so the hour is read whole: up to an hour longer, never shorter.
        let now = 100 * DAY_MS + 10 * HOUR_MS + 30 * MINUTE_MS + 5;
        let window = 7 * DAY_MS;
        let reads = window_reads(now, window);
        assert!(
            reads.iter().all(|r| !r.hash_suffix.starts_with(":m:")
                || r.buckets.iter().all(|b| *b > now - HOUR_MS)),
            "{reads:?}"
        );
        let all = buckets(&reads);
        assert_eq!(all[0], (93 * DAY_MS + 10 * HOUR_MS, HOUR_MS));
        let span = covered(&reads);
        assert!(
            span > window && span <= window + HOUR_MS + MINUTE_MS,
            "{span}"
        );
        check_tiling(now, window);
    }

    #[test]
    fn a_forty_day_window_reads_its_first_partial_day_whole_since_its_hours_are_gone() {
        let now = 100 * DAY_MS + 10 * HOUR_MS + 30 * MINUTE_MS + 5;
        let window = 40 * DAY_MS;
        let all = buckets(&window_reads(now, window));
        assert_eq!(all[0], (60 * DAY_MS, DAY_MS));
        check_tiling(now, window);
    }

    #[test]
    fn a_day_long_window_still_starts_at_its_minute() {
        // 24 h after it, a minute is still kept for three hours: the window stays exact.
        let now = 100 * DAY_MS + 10 * HOUR_MS + 30 * MINUTE_MS + 5;
        let all = buckets(&window_reads(now, DAY_MS));
        assert_eq!(all[0], (now - 5 - DAY_MS, MINUTE_MS));
    }

    #[test]
    fn every_window_up_to_forty_days_is_tiled_by_buckets_that_still_exist() {
        let windows = [
            MINUTE_MS,
            59 * MINUTE_MS,
            HOUR_MS,
            DAY_MS,
            25 * HOUR_MS,
            26 * HOUR_MS,
            27 * HOUR_MS,
            7 * DAY_MS,
            31 * DAY_MS,
            32 * DAY_MS,
            33 * DAY_MS + 7 * MINUTE_MS,
            40 * DAY_MS,
        ];
        let base = 20_000 * DAY_MS;
        for window in windows {
            // Every minute of a day and a few odd milliseconds.
            for step in 0..(24 * 60) {
                check_tiling(base + step * MINUTE_MS + (step % 7) * 1_001, window);
            }
        }
    }
}
