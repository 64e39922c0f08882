//! Each key's spend sums (token and cost windows, lifetime cost), cached per replica for a
//! short freshness, so that most requests of a key with spend limits skip reading the
//! aggregator's spend counters: ~60–85 hash fields per window, which made the limiter script
//! cost Redis ~3× as much for a key with a few minutes of spend and ~11× for one with a month of
//! it (`scriptbench`, BENCHMARKS.md).
//!
//! Why a cached sum is good enough: the counters change only when the aggregator commits a
//! batch, and enforcement may lag the spending event by < 1 s (issue 5). A sum is used only
//! while it is younger than the freshness, counted from before the script that read it was sent.
//! So a spend the aggregator committed at time C is in every sum used after C + freshness, and
//! the key is refused at most `aggregator lag + freshness` after the spending event (measured
//! ~70 ms + the default 200 ms). Before that, requests admitted from the cache can each
//! overshoot by their own size, as any single request can.
//!
//! The cache only ever admits. Sums at or over a limit, a limit the entry has no sum for (a key
//! just created or changed) or an old entry send the request to the full read, which refuses
//! with the `retry-after` computed from the window's buckets, or admits and refreshes the entry.
//! The admin usage view never reads it. While Redis is down, a fresh entry still admits; once it
//! is stale, `--limits-on-redis-down` decides, as for any check.
//!
//! Refreshing ahead: once an entry is half its freshness old, one request reads the counters
//! while the others keep using the entry. Waiting for it to go stale would
//! send every concurrent request of a busy key to the full read at once, each costing Redis
//! ~250–350 µs for a key with a month of spend history, every freshness period.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::check::{SpendLimit, Spent, nanodollars, spend_limits};
use crate::store::KeyRecord;

/// Below this many entries the cache is not swept; above, a sweep happens each time the count
/// doubles, so sweeping costs O(1) per insert.
const SWEEP_MIN: usize = 1024;

pub struct SpendCache {
    /// Zero turns the cache off: every check reads the counters.
    freshness: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    sweep_at: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Taken before the script was sent, so the sums are at least this recent.
    read_at: Instant,
    spent: Spent,
    /// A request has been sent to refresh the entry ahead of its staleness. If it never comes
    /// back (Redis error, client gone), the entry goes stale and the next requests read.
    refreshing: bool,
}

impl Entry {
    fn is_fresh(&self, now: Instant, freshness: Duration) -> bool {
        // `Instant` is monotonic, so a wall-clock step cannot make an entry look younger.
        now.saturating_duration_since(self.read_at) < freshness
    }

    /// Whether the sums cover every spend limit of `key` and are all under their max (the
    /// script's comparison: a sum at the max refuses).
    fn admits(&self, key: &KeyRecord) -> bool {
        let windows_under = spend_limits(key).all(|limit| {
            let l = SpendLimit::of(limit);
            self.spent
                .windows
                .iter()
                .find(|(prefix, window_ms, _)| *prefix == l.prefix && *window_ms == l.window_ms)
                .is_some_and(|(_, _, sum)| *sum < l.max)
        });
        let budget_under = match key.budget_usd {
            None => true,
            Some(budget) => self
                .spent
                .lifetime_nanos
                .is_some_and(|spent| spent < nanodollars(budget)),
        };
        windows_under && budget_under
    }
}

impl SpendCache {
    pub fn new(freshness: Duration) -> Self {
        Self {
            freshness,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether `key`'s spend limits may be decided from the cache at `now`: a fresh entry that
    /// admits the key, unless this request is the one chosen to refresh it ahead of time.
    pub fn admits(&self, key: &KeyRecord, now: Instant) -> bool {
        if self.freshness.is_zero() {
            return false;
        }
        // A poisoned lock only costs the cache: the caller reads the counters.
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        let Some(entry) = inner.entries.get_mut(&key.id) else {
            return false;
        };
        if !entry.is_fresh(now, self.freshness) || !entry.admits(key) {
            return false;
        }
        if entry.refreshing || now.saturating_duration_since(entry.read_at) < self.freshness / 2 {
            return true;
        }
        entry.refreshing = true;
        false
    }

    /// Keeps what a script sent at `read_at` read, unless an entry read later is already there
    /// (replies of concurrent requests can arrive out of order).
    pub fn insert(&self, key_id: &str, read_at: Instant, spent: Spent) {
        if self.freshness.is_zero() {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let entry = Entry {
            read_at,
            spent,
            refreshing: false,
        };
        if let Some(e) = inner.entries.get_mut(key_id) {
            if e.read_at <= read_at {
                *e = entry;
            }
            return;
        }
        if inner.entries.len() >= inner.sweep_at {
            // Stale entries are never used again; without this, every key ever seen would stay.
            let freshness = self.freshness;
            inner.entries.retain(|_, e| e.is_fresh(read_at, freshness));
            inner.sweep_at = (inner.entries.len() * 2).max(SWEEP_MIN);
        }
        inner.entries.insert(key_id.to_owned(), entry);
    }

    /// Drops `key_id`'s entry if it was read before `read_at`: a script sent then refused the
    /// key for its spend, so the older sums must not admit it again.
    pub fn forget_older(&self, key_id: &str, read_at: Instant) {
        if let Ok(mut inner) = self.inner.lock()
            && inner
                .entries
                .get(key_id)
                .is_some_and(|e| e.read_at <= read_at)
        {
            inner.entries.remove(key_id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Limit;

    const FRESH: Duration = Duration::from_millis(200);

    /// 100 tokens per hour, $1 per day, $2 budget.
    fn key() -> KeyRecord {
        KeyRecord {
            id: "key_1".into(),
            name: "k".into(),
            limits: vec![
                Limit {
                    metric: "requests".into(),
                    max: 5.0,
                    window_secs: 60,
                },
                Limit {
                    metric: "tokens".into(),
                    max: 100.0,
                    window_secs: 3600,
                },
                Limit {
                    metric: "cost_usd".into(),
                    max: 1.0,
                    window_secs: 86_400,
                },
            ],
            budget_usd: Some(2.0),
            ..KeyRecord::default()
        }
    }

    fn spent(tokens: i64, cost_nanos: i64, lifetime_nanos: i64) -> Spent {
        Spent {
            windows: vec![('t', 3_600_000, tokens), ('c', 86_400_000, cost_nanos)],
            lifetime_nanos: Some(lifetime_nanos),
        }
    }

    #[test]
    fn fresh_sums_under_every_limit_admit_without_a_read() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        cache.insert("key_1", t0, spent(99, 999_999_999, 1_999_999_999));
        assert!(cache.admits(&key(), t0));
        assert!(cache.admits(&key(), t0 + FRESH / 2 - Duration::from_millis(1)));
    }

    #[test]
    fn half_way_to_stale_one_request_refreshes_while_the_others_use_the_cache() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        cache.insert("key_1", t0, spent(0, 0, 0));
        let half = t0 + FRESH / 2;
        assert!(!cache.admits(&key(), half), "the first one refreshes");
        assert!(cache.admits(&key(), half));
        assert!(cache.admits(&key(), half + Duration::from_millis(10)));
        // Its reply replaces the entry, which is young again.
        let read = half + Duration::from_millis(1);
        cache.insert("key_1", read, spent(1, 0, 0));
        assert!(cache.admits(&key(), read + FRESH / 4));
    }

    #[test]
    fn after_a_refresh_that_never_comes_back_everyone_reads_once_the_entry_is_stale() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        cache.insert("key_1", t0, spent(0, 0, 0));
        assert!(!cache.admits(&key(), t0 + FRESH / 2));
        assert!(cache.admits(&key(), t0 + FRESH - Duration::from_millis(1)));
        assert!(!cache.admits(&key(), t0 + FRESH));
        assert!(!cache.admits(&key(), t0 + FRESH));
    }

    #[test]
    fn sums_as_old_as_the_freshness_are_read_again() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        cache.insert("key_1", t0, spent(0, 0, 0));
        assert!(!cache.admits(&key(), t0 + FRESH));
    }

    #[test]
    fn a_sum_at_any_limit_sends_the_request_to_the_full_read() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        for (tokens, cost, lifetime) in [(100, 0, 0), (0, 1_000_000_000, 0), (0, 0, 2_000_000_000)]
        {
            cache.insert("key_1", t0, spent(tokens, cost, lifetime));
            assert!(!cache.admits(&key(), t0), "{tokens} {cost} {lifetime}");
        }
    }

    #[test]
    fn a_limit_the_entry_has_no_sum_for_is_read() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        cache.insert("key_1", t0, spent(0, 0, 0));
        // The key was changed: its token window is now a day long.
        let mut changed = key();
        changed.limits[1].window_secs = 86_400;
        assert!(!cache.admits(&changed, t0));
        // A budget added to a key whose entry has no lifetime cost.
        let mut budgeted = key();
        cache.insert(
            "key_1",
            t0,
            Spent {
                lifetime_nanos: None,
                ..spent(0, 0, 0)
            },
        );
        assert!(!cache.admits(&budgeted, t0));
        budgeted.budget_usd = None;
        assert!(cache.admits(&budgeted, t0));
    }

    #[test]
    fn a_lowered_max_is_compared_with_the_cached_sum() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        cache.insert("key_1", t0, spent(50, 0, 0));
        let mut lowered = key();
        lowered.limits[1].max = 50.0;
        assert!(!cache.admits(&lowered, t0));
    }

    #[test]
    fn an_older_read_arriving_late_does_not_replace_a_newer_one() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(50);
        cache.insert("key_1", later, spent(100, 0, 0));
        cache.insert("key_1", t0, spent(0, 0, 0));
        assert!(!cache.admits(&key(), later));
    }

    #[test]
    fn a_refusal_forgets_sums_read_before_it_but_not_after() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        cache.insert("key_1", t0, spent(0, 0, 0));
        cache.forget_older("key_1", t0 - Duration::from_millis(1));
        assert!(cache.admits(&key(), t0));
        cache.forget_older("key_1", t0 + Duration::from_millis(1));
        assert!(!cache.admits(&key(), t0));
    }

    #[test]
    fn a_zero_freshness_turns_the_cache_off() {
        let cache = SpendCache::new(Duration::ZERO);
        let t0 = Instant::now();
        cache.insert("key_1", t0, spent(0, 0, 0));
        assert!(!cache.admits(&key(), t0));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn stale_entries_are_swept_as_keys_come_and_go() {
        let cache = SpendCache::new(FRESH);
        let t0 = Instant::now();
        for i in 0..SWEEP_MIN {
            cache.insert(&format!("old_{i}"), t0, spent(0, 0, 0));
        }
        assert_eq!(cache.len(), SWEEP_MIN);
        cache.insert("new", t0 + FRESH, spent(0, 0, 0));
        assert_eq!(cache.len(), 1);
    }
}
