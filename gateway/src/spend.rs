//! Reading the spend counters the aggregator keeps per key (layout in `aggregator/src/spend.rs`
//! and ARCHITECTURE.md): which hash fields sum to a rolling window's tokens or cost.
//!
//! A window `[now − W, now]` is tiled from its start with the coarsest buckets that fit whole:
//! days where a whole day fits, hours where a whole hour fits, minutes at the ragged ends. The
//! minute holding `now − W` counts whole, so a window can only count a little more than its
//! exact span, never less: a limit may trip up to a minute early, never late.

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

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
    let mut t = (now_ms - window_ms).div_euclid(MINUTE_MS) * MINUTE_MS;
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

    #[test]
    fn a_thirty_day_window_reads_few_fields_and_covers_the_span_without_gaps() {
        let now = 100 * DAY_MS + 13 * HOUR_MS + 17 * MINUTE_MS + 5;
        let window = 30 * DAY_MS;
        let reads = window_reads(now, window);
        let fields: usize = reads.iter().map(|r| r.buckets.len()).sum();
        assert!(fields < 200, "{fields} fields");
        // Covers at least the window, and at most one extra minute at each end.
        let span = covered(&reads);
        assert!(span >= window && span <= window + 2 * MINUTE_MS, "{span}");
        // Buckets are contiguous.
        let mut starts: Vec<(i64, i64)> = reads
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
        starts.sort_unstable();
        for pair in starts.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0);
        }
    }
}
