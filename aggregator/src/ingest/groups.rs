//! Splits a batch into commits by client key, each small enough that Redis serves its other
//! clients (the gateway's limit checks) between them.
//!
//! Redis runs one command at a time: a commit script of a whole batch of 24,000 events held it
//! for about 100 ms, and every limit check on that node waited as long. The batch still shares
//! its cells as before, because every stats cell and spend counter has the client key as a
//! dimension: the events of one key go to one commit, so two commits of a batch never write the
//! same cell, and the cells written in all do not grow. Only a key with more events than one
//! commit holds is cut into several, which then share that key's hour, day and month cells
//! (the stamps keep them exact; they cost more writes, not figures).

use rustc_hash::FxHashMap;

/// The commit each event goes to (`0..count`), for events whose client keys are `keys`, in
/// batch order: keys in order of their first event, packed into commits of at most `max`
/// events, a key never split unless it alone has more than `max`.
pub(crate) fn by_key<'a>(
    keys: impl Iterator<Item = Option<&'a str>> + Clone,
    max: usize,
) -> Groups {
    let max = max.max(1);
    // Events per key, keys in order of appearance.
    let mut index: FxHashMap<Option<&str>, usize> = FxHashMap::default();
    let mut counts: Vec<usize> = Vec::new();
    for key in keys.clone() {
        let i = *index.entry(key).or_insert_with(|| {
            counts.push(0);
            counts.len() - 1
        });
        if let Some(n) = counts.get_mut(i) {
            *n += 1;
        }
    }
    // Each key's first commit; a key above `max` takes consecutive ones of its own, the last of
    // which the next keys may fill up.
    let mut first = Vec::with_capacity(counts.len());
    let (mut current, mut fill) = (0usize, 0usize);
    for &n in &counts {
        if fill > 0 && fill + n > max {
            current += 1;
            fill = 0;
        }
        first.push(current);
        let extra = n.saturating_sub(1) / max;
        current += extra;
        fill += n - extra * max;
    }
    let count = if counts.is_empty() { 0 } else { current + 1 };
    let mut taken = vec![0usize; counts.len()];
    let of_event = keys
        .map(|key| {
            let i = index.get(&key).copied().unwrap_or(0);
            let seen = taken.get(i).copied().unwrap_or(0);
            if let Some(t) = taken.get_mut(i) {
                *t += 1;
            }
            first.get(i).copied().unwrap_or(0) + seen / max
        })
        .collect();
    Groups { of_event, count }
}

/// The result of [`by_key`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Groups {
    /// For each event, in batch order, its commit.
    pub of_event: Vec<usize>,
    /// How many commits.
    pub count: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(keys: &[Option<&str>], max: usize) -> Groups {
        by_key(keys.iter().copied(), max)
    }

    #[test]
    fn keys_are_packed_whole_in_order_of_appearance() {
        let groups = split(
            &[Some("a"), Some("b"), Some("a"), None, Some("c"), Some("b")],
            3,
        );
        // a: 2, b: 2 → a alone (b would make 4), then b + the keyless one, then c.
        assert_eq!(groups.of_event, vec![0, 1, 0, 1, 2, 1]);
        assert_eq!(groups.count, 3);
    }

    #[test]
    fn a_key_above_the_bound_is_cut_and_the_next_keys_fill_its_last_commit() {
        let mut keys = vec![Some("big"); 7];
        keys.push(Some("small"));
        keys.insert(0, Some("first"));
        let groups = split(&keys, 3);
        // first: commit 0; big (7) cannot join it: 1, 1, 1, 2, 2, 2, 3; small fills commit 3.
        assert_eq!(groups.of_event, vec![0, 1, 1, 1, 2, 2, 2, 3, 3]);
        assert_eq!(groups.count, 4);
    }

    #[test]
    fn every_commit_holds_at_most_the_bound_and_every_key_as_few_commits_as_it_can() {
        let keys: Vec<Option<String>> = (0..1000u32)
            .map(|i| Some(format!("k{}", (i * 7919) % 37 % (1 + i % 5))))
            .collect();
        let keys: Vec<Option<&str>> = keys.iter().map(|k| k.as_deref()).collect();
        for max in [1, 2, 5, 64, 1000, 5000] {
            let groups = split(&keys, max);
            let mut sizes = vec![0usize; groups.count];
            for &g in &groups.of_event {
                sizes[g] += 1;
            }
            assert!(
                sizes.iter().all(|&n| n >= 1 && n <= max),
                "{max}: {sizes:?}"
            );
            let mut per_key: FxHashMap<Option<&str>, Vec<usize>> = FxHashMap::default();
            for (k, &g) in keys.iter().zip(&groups.of_event) {
                per_key.entry(*k).or_default().push(g);
            }
            for (key, commits) in per_key {
                let mut distinct = commits.clone();
                distinct.dedup();
                assert!(
                    distinct.len() <= commits.len().div_ceil(max),
                    "{max}: {key:?} spread over {distinct:?}"
                );
            }
        }
    }

    #[test]
    fn nothing_makes_no_commit() {
        assert_eq!(
            split(&[], 10),
            Groups {
                of_event: vec![],
                count: 0
            }
        );
    }
}
