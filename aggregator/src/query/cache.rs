//! Reads stats cells for the API, through an in-process cache of reduced cells that Redis
//! itself keeps exact.
//!
//! A 30-day hourly query touches 720 hour hashes of thousands of fields each; reading and
//! decoding them costs seconds, while their reduction to one [`GroupSpec`] (say, ten rows per
//! model) is tiny. So reductions are cached per (cell, spec).
//!
//! **Why it is never stale.** Any process may change any cell at any time (late events, several
//! aggregators, `replay`), so the cache cannot know by itself when an entry is outdated. It
//! uses Redis server-assisted client-side caching instead: every cell is read on one RESP3
//! connection with `CLIENT TRACKING ON`, and Redis pushes an `invalidate` message on that same
//! connection whenever a key it served there changes, is deleted, renamed over or expires —
//! whoever does it. The redis client hands pushes to [`Invalidator`] in stream order, before
//! any later reply on the connection, so:
//! 1. every read first does one round trip (`PING`) on that connection; once it returns, every
//!    change made before it is already removed from the cache;
//! 2. a reduction read while a change is in flight is not inserted: reads register their keys
//!    before they are sent, and an invalidation of a registered key marks it dirty;
//! 3. if the connection drops, tracking is gone with it, so the whole cache is cleared and the
//!    next read opens a new tracked connection (a new *generation*; late inserts of an older
//!    generation are dropped).
//!
//! If a tracked connection cannot be had (a Redis without RESP3), reads go uncached through the
//! shared connection. So do they on a Redis Cluster, whose cells live on several masters while
//! tracking is per connection to one node.
//!
//! With several partitions each cell exists once per partition; a read returns, for each cell
//! asked for, the reductions of all its partitions' copies, which the caller adds like cells.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use shared::RedisConn;
use shared::{Partitions, Target};

use crate::metrics::Metrics;
use crate::query::plan::Cell;
use crate::query::{GroupSpec, Partial, reduce};

/// Cells fetched per pipeline, so a cold 720-hour query never holds all raw hashes at once.
const CHUNK: usize = 32;
/// Reductions kept per cell; the oldest goes first.
const SPECS_PER_CELL: usize = 16;

pub struct CellReader {
    partitions: Partitions,
    fallback: RedisConn,
    /// For the tracked connection; `None` on a cluster.
    client: Option<redis::Client>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    /// The tracked connection and its generation; replaced when it fails.
    tracked: tokio::sync::Mutex<Option<(MultiplexedConnection, u64)>>,
}

impl CellReader {
    /// `max_rows` bounds the cache (rows of all cached reductions); 0 disables it.
    pub fn new(
        target: &Target,
        partitions: Partitions,
        fallback: RedisConn,
        max_rows: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, redis::RedisError> {
        let client = if target.is_cluster() {
            None
        } else {
            let info = redis::IntoConnectionInfo::into_connection_info(target.first_url())?;
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            Some(redis::Client::open(info.set_redis_settings(settings))?)
        };
        Ok(Self {
            partitions,
            fallback,
            client,
            cache: Arc::new(Cache {
                state: Mutex::new(State::default()),
                max_rows,
            }),
            metrics,
            tracked: tokio::sync::Mutex::new(None),
        })
    }

    /// How many reductions [`Self::read`] returns per cell.
    pub fn copies(&self) -> usize {
        self.partitions.count()
    }

    /// Redis keys of `cells`: each cell's copy in every partition, cell by cell.
    fn keys(&self, cells: &[Cell]) -> Vec<String> {
        cells
            .iter()
            .flat_map(|c| {
                let name = c.resolution.key(c.start);
                self.partitions.iter().map(move |ks| ks.key(&name))
            })
            .collect()
    }

    /// The reduction of each cell under `spec`, in the order of `cells`: [`Self::copies`] per
    /// cell, one per partition.
    pub async fn read(
        &self,
        cells: &[Cell],
        spec: &GroupSpec,
    ) -> Result<Vec<Arc<Partial>>, redis::RedisError> {
        if self.cache.max_rows == 0 {
            return self.read_uncached(cells, spec).await;
        }
        let Some((mut conn, generation)) = self.tracked_connection().await else {
            return self.read_uncached(cells, spec).await;
        };
        // (1) After this round trip every earlier change has been pushed and applied.
        if let Err(e) = redis::cmd("PING").query_async::<Value>(&mut conn).await {
            // The tracked connection is gone (Redis restarted, say): this query goes uncached,
            // the next one opens a new tracked connection.
            tracing::warn!(error = %e, "tracked stats connection failed");
            self.drop_connection(generation).await;
            return self.read_uncached(cells, spec).await;
        }
        let keys = self.keys(cells);
        let mut out: Vec<Option<Arc<Partial>>> = vec![None; keys.len()];
        let mut misses = Vec::new();
        {
            let mut state = self.cache.lock();
            for (i, key) in keys.iter().enumerate() {
                match state.get(key, spec) {
                    Some(hit) => out[i] = Some(hit),
                    None => {
                        // (2) Registered before the read is sent.
                        state.inflight.entry(key.clone()).or_default().readers += 1;
                        misses.push(i);
                    }
                }
            }
        }
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let counters = &self.metrics;
        counters
            .stats_cache_hits
            .fetch_add(count(keys.len() - misses.len()), Ordering::Relaxed);
        counters
            .stats_cache_misses
            .fetch_add(count(misses.len()), Ordering::Relaxed);
        let fetched = fetch(&mut conn, &keys, &misses, self.copies(), spec).await;
        self.settle(&keys, &misses, &fetched, spec, generation);
        let fetched = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                tracing::warn!(error = %e, "tracked stats connection failed");
                self.drop_connection(generation).await;
                return self.read_uncached(cells, spec).await;
            }
        };
        for (slot, partial) in out.iter_mut().zip(fetched) {
            if slot.is_none() {
                *slot = partial;
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Ends the reads of `misses`: caches each one unless its key changed (or the connection
    /// was replaced) while it was in flight.
    fn settle(
        &self,
        keys: &[String],
        misses: &[usize],
        fetched: &Result<Vec<Option<Arc<Partial>>>, redis::RedisError>,
        spec: &GroupSpec,
        generation: u64,
    ) {
        let mut state = self.cache.lock();
        for &i in misses {
            let Some(flight) = state.inflight.get_mut(&keys[i]) else {
                continue;
            };
            flight.readers -= 1;
            let clean = !flight.dirty;
            if flight.readers == 0 {
                state.inflight.remove(&keys[i]);
            }
            if let Ok(partials) = &fetched
                && let Some(partial) = &partials[i]
                && clean
                && state.generation == generation
            {
                state.insert(&keys[i], spec, Arc::clone(partial), self.cache.max_rows);
            }
        }
    }

    /// The current names of client keys, from the gateway's key records; a deleted key (or an
    /// id with no record) has none.
    /// Names change rarely and a query names at most its rows' keys, so this is one uncached
    /// `MGET`.
    pub async fn key_names(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<String, String>, redis::RedisError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let global = self.partitions.global();
        let keys: Vec<String> = ids.iter().map(|id| global.key_record(id)).collect();
        let mut conn = self.fallback.clone();
        let records: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(ids
            .iter()
            .zip(records)
            .filter_map(|(id, record)| {
                let record: serde_json::Value = serde_json::from_str(&record?).ok()?;
                // A deleted key has no name any more; its id stays in the figures.
                if record.get("deleted").and_then(serde_json::Value::as_bool) == Some(true) {
                    return None;
                }
                let name = record.get("name")?.as_str()?.to_owned();
                Some(((*id).to_owned(), name))
            })
            .collect())
    }

    async fn read_uncached(
        &self,
        cells: &[Cell],
        spec: &GroupSpec,
    ) -> Result<Vec<Arc<Partial>>, redis::RedisError> {
        let keys = self.keys(cells);
        let all: Vec<usize> = (0..keys.len()).collect();
        let mut conn = self.fallback.clone();
        let fetched = fetch(&mut conn, &keys, &all, self.copies(), spec).await?;
        Ok(fetched.into_iter().flatten().collect())
    }

    /// The current tracked connection, opening one (a new generation, empty cache) if needed.
    async fn tracked_connection(&self) -> Option<(MultiplexedConnection, u64)> {
        let client = self.client.as_ref()?;
        let mut tracked = self.tracked.lock().await;
        if let Some((conn, generation)) = tracked.as_ref()
            && self.cache.lock().generation == *generation
        {
            return Some((conn.clone(), *generation));
        }
        let generation = self.cache.lock().next_generation();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_push_sender(Invalidator {
                cache: Arc::clone(&self.cache),
                generation,
            });
        let opened = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .query_async::<()>(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(conn)
        }
        .await;
        match opened {
            Ok(conn) => {
                *tracked = Some((conn.clone(), generation));
                Some((conn, generation))
            }
            Err(e) => {
                tracing::warn!(error = %e, "no tracked Redis connection; stats reads are uncached");
                *tracked = None;
                None
            }
        }
    }

    async fn drop_connection(&self, generation: u64) {
        let mut tracked = self.tracked.lock().await;
        if tracked.as_ref().is_some_and(|(_, g)| *g == generation) {
            *tracked = None;
        }
        self.cache.lock().flush_generation(generation);
    }
}

/// `HGETALL` of `keys[i]` for each `i` in `which`, reduced; `None` for the others. Keys are
/// cell by cell, one per partition (`copies`), and each pipeline reads one partition's, so it
/// stays in one cluster slot.
async fn fetch(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    keys: &[String],
    which: &[usize],
    copies: usize,
    spec: &GroupSpec,
) -> Result<Vec<Option<Arc<Partial>>>, redis::RedisError> {
    let mut out: Vec<Option<Arc<Partial>>> = vec![None; keys.len()];
    let by_partition: Vec<Vec<usize>> = (0..copies)
        .map(|p| which.iter().copied().filter(|i| i % copies == p).collect())
        .collect();
    for chunk in by_partition.iter().flat_map(|w| w.chunks(CHUNK)) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("HGETALL").arg(&keys[i]);
        }
        let hashes: Vec<Vec<(String, Vec<u8>)>> = pipe.query_async(conn).await?;
        for (&i, fields) in chunk.iter().zip(hashes) {
            out[i] = Some(Arc::new(reduce(spec, &fields)));
        }
    }
    Ok(out)
}

struct Cache {
    state: Mutex<State>,
    max_rows: usize,
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves at worst a missing entry; clearing is safe.
        self.state.lock().unwrap_or_else(|poisoned| {
            let mut state = poisoned.into_inner();
            state.clear();
            state
        })
    }
}

#[derive(Default)]
struct Flight {
    readers: u32,
    dirty: bool,
}

#[derive(Default)]
struct State {
    generation: u64,
    cells: HashMap<String, Vec<(GroupSpec, Arc<Partial>)>>,
    /// Insertion order of cell keys, for eviction; may hold keys already removed.
    order: VecDeque<String>,
    rows: usize,
    inflight: HashMap<String, Flight>,
}

impl State {
    fn get(&self, key: &str, spec: &GroupSpec) -> Option<Arc<Partial>> {
        self.cells
            .get(key)?
            .iter()
            .find(|(s, _)| s == spec)
            .map(|(_, p)| Arc::clone(p))
    }

    fn insert(&mut self, key: &str, spec: &GroupSpec, partial: Arc<Partial>, max_rows: usize) {
        let weight = partial.weight();
        if weight > max_rows {
            return;
        }
        if !self.cells.contains_key(key) {
            self.order.push_back(key.to_owned());
        }
        let entry = self.cells.entry(key.to_owned()).or_default();
        if entry.iter().any(|(s, _)| s == spec) {
            return;
        }
        if entry.len() == SPECS_PER_CELL {
            let (_, oldest) = entry.remove(0);
            self.rows -= oldest.weight();
        }
        entry.push((spec.clone(), partial));
        self.rows += weight;
        while self.rows > max_rows {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.remove(&oldest);
        }
        // Keys invalidated and re-inserted pile up in `order`; compact now and then.
        if self.order.len() > 2 * self.cells.len() + 1024 {
            let cells = &self.cells;
            let mut seen = std::collections::HashSet::new();
            self.order
                .retain(|k| cells.contains_key(k) && seen.insert(k.clone()));
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(specs) = self.cells.remove(key) {
            self.rows -= specs.iter().map(|(_, p)| p.weight()).sum::<usize>();
        }
    }

    fn invalidate(&mut self, key: &str) {
        self.remove(key);
        if let Some(flight) = self.inflight.get_mut(key) {
            flight.dirty = true;
        }
    }

    fn clear(&mut self) {
        self.cells.clear();
        self.order.clear();
        self.rows = 0;
        for flight in self.inflight.values_mut() {
            flight.dirty = true;
        }
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.clear();
        self.generation
    }

    /// The connection of `generation` is gone: nothing it tracked can be trusted.
    fn flush_generation(&mut self, generation: u64) {
        if self.generation == generation {
            self.generation += 1;
        }
        self.clear();
    }
}

impl Partial {
    /// Cache cost: one per row, plus sketch bins.
    fn weight(&self) -> usize {
        match self {
            Partial::Usage(rows) => rows.len().max(1),
            Partial::Latency(rows) => rows
                .iter()
                .map(|(_, r)| 1 + (r.latency.bins().count() + r.ttft.bins().count()) / 8)
                .sum::<usize>()
                .max(1),
        }
    }
}

/// Receives the tracked connection's pushes, on the client's reader task, in stream order.
struct Invalidator {
    cache: Arc<Cache>,
    generation: u64,
}

impl redis::aio::AsyncPushSender for Invalidator {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        let mut state = self.cache.lock();
        match info.kind {
            PushKind::Invalidate => match info.data.first() {
                Some(Value::Array(keys)) => {
                    for key in keys {
                        match key {
                            Value::BulkString(bytes) => {
                                state.invalidate(&String::from_utf8_lossy(bytes))
                            }
                            Value::SimpleString(s) => state.invalidate(s),
                            // Unknown shape: be safe.
                            _ => state.clear(),
                        }
                    }
                }
                // A nil payload means "everything" (FLUSHALL, or tracking table overflow).
                _ => state.clear(),
            },
            PushKind::Disconnection => state.flush_generation(self.generation),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Kind;
    use crate::store::stats::Totals;

    fn spec(group_by: &[usize]) -> GroupSpec {
        GroupSpec {
            kind: Kind::Usage,
            group_by: group_by.to_vec(),
            filters: Vec::new(),
        }
    }

    fn partial(rows: usize) -> Arc<Partial> {
        Arc::new(Partial::Usage(
            (0..rows)
                .map(|i| (vec![i.to_string()], Totals::default()))
                .collect(),
        ))
    }

    #[test]
    fn an_invalidation_drops_every_spec_of_the_cell_and_marks_reads_in_flight() {
        let mut state = State::default();
        state.insert("a", &spec(&[1]), partial(2), 100);
        state.insert("a", &spec(&[0]), partial(3), 100);
        state.insert("b", &spec(&[1]), partial(1), 100);
        state.inflight.entry("a".into()).or_default().readers += 1;
        assert_eq!(state.rows, 6);
        state.invalidate("a");
        assert!(state.get("a", &spec(&[1])).is_none());
        assert!(state.get("b", &spec(&[1])).is_some());
        assert_eq!(state.rows, 1);
        assert!(
            state.inflight["a"].dirty,
            "a read racing the change is not cached"
        );
    }

    #[test]
    fn the_oldest_cells_are_evicted_beyond_the_row_budget() {
        let mut state = State::default();
        for key in ["a", "b", "c"] {
            state.insert(key, &spec(&[]), partial(4), 10);
        }
        assert!(state.get("a", &spec(&[])).is_none());
        assert!(state.get("c", &spec(&[])).is_some());
        assert!(state.rows <= 10);
        // A reduction larger than the whole budget is never kept.
        state.insert("d", &spec(&[]), partial(11), 10);
        assert!(state.get("d", &spec(&[])).is_none());
    }

    #[test]
    fn losing_the_connection_clears_the_cache_and_retires_its_generation() {
        let mut state = State::default();
        let generation = state.next_generation();
        state.insert("a", &spec(&[]), partial(1), 10);
        state.inflight.entry("b".into()).or_default().readers += 1;
        state.flush_generation(generation);
        assert_ne!(state.generation, generation);
        assert!(state.get("a", &spec(&[])).is_none());
        assert!(state.inflight["b"].dirty);
        // A stale disconnect of an older connection still only clears.
        let current = state.generation;
        state.flush_generation(generation);
        assert_eq!(state.generation, current);
    }

    #[test]
    fn invalidation_pushes_are_applied_in_place() {
        let cache = Arc::new(Cache {
            state: Mutex::new(State::default()),
            max_rows: 100,
        });
        let invalidator = Invalidator {
            cache: Arc::clone(&cache),
            generation: 0,
        };
        cache.lock().insert("k1", &spec(&[]), partial(1), 100);
        cache.lock().insert("k2", &spec(&[]), partial(1), 100);
        use redis::aio::AsyncPushSender;
        invalidator
            .send(PushInfo {
                kind: PushKind::Invalidate,
                data: vec![Value::Array(vec![Value::BulkString(b"k1".to_vec())])],
            })
            .unwrap();
        assert!(cache.lock().get("k1", &spec(&[])).is_none());
        assert!(cache.lock().get("k2", &spec(&[])).is_some());
        // A nil payload: everything.
        invalidator
            .send(PushInfo {
                kind: PushKind::Invalidate,
                data: vec![Value::Nil],
            })
            .unwrap();
        assert!(cache.lock().get("k2", &spec(&[])).is_none());
    }
}
