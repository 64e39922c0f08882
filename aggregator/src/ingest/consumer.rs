//! Reads the usage stream as a member of a consumer group and commits each batch.
//!
//! Flow per batch: read (in pieces of at most 1,000 entries) → decode (undecodable entries go
//! to the dead-letter stream) → drop in-batch duplicate ids → split by client key into parts of
//! at most `commit_events` events ([`groups`]) → price each part → sum into a [`Delta`] → one
//! atomic commit per part, all parts in one pipeline. A batch of one part is acknowledged by its
//! commit; one of several parts, whose entries interleave, by one `XACK` per 1,000 entries in
//! stream order once every part applied, each part recording its entries as applied meanwhile
//! ([`applied`]).
//! Under a backlog the next batch goes through all but the last step while Redis runs the
//! commits of the one before (`process_pipelined`).
//! Entries that a crashed consumer had read but not committed stay pending in the group; on
//! start a consumer first re-reads its own pending entries, and every `claim_interval` it takes
//! over entries other consumers left idle for longer than `claim_idle` (`XAUTOCLAIM`). Since
//! commits are atomic and idempotent, any number of consumers, crashes and re-deliveries
//! produce the same figures.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;
use shared::RedisConn;
use shared::{EVENT_FIELD, Keyspace, UsageEvent};
use tokio::sync::watch;

use crate::ingest::applied::{self, Fields};
use crate::ingest::commit::{
    self, Acks, Batch, CommitError, Committer, Outcome, Replies, Seen, ShadowSeen, Staged,
};
use crate::ingest::groups;
use crate::ingest::stream::{
    Entry, READ_CHUNK, arrival_ms, first_of_each_id, plausible, read_entries, usage_of,
};
use crate::metrics::Metrics;
use crate::replay::control::{self, Control, Snapshot};
use crate::store::stats::{BucketWrite, CellWrite, Delta};

/// How long a batch waits before trying again while a replay switches (a few hundred ms).
const FROZEN_RETRY: Duration = Duration::from_millis(20);

pub struct ConsumerConfig {
    pub keyspace: Keyspace,
    pub group: String,
    pub consumer: String,
    pub batch_size: usize,
    /// Most events one commit applies ([`groups`]).
    pub commit_events: usize,
    pub block: Duration,
    /// How long a partial batch waits for more entries before it is committed.
    pub linger: Duration,
    pub claim_interval: Duration,
    pub claim_idle: Duration,
    pub dedupe_window_secs: i64,
}

/// One commit's part of a batch, decoded, deduplicated within the batch and priced: what the
/// commit needs. A batch is split into such parts by client key ([`groups`]).
struct Prepared {
    /// When the batch was read, on its last part only (for the apply-time metric).
    started: Option<std::time::Instant>,
    /// The entries of its events; the first part also acknowledges the batch's dead letters
    /// and the copies of ids it already had.
    acks: Vec<String>,
    /// Of a batch cut into several commits: the field under which this one records its
    /// entries as applied; they are acknowledged with the batch's ([`Deferred`]).
    field: Option<String>,
    /// (arrival ms, event)
    events: Vec<(i64, UsageEvent)>,
    dead: usize,
    duplicates: usize,
    /// Ids the running replay's copy already has: applied live only.
    in_shadow: InShadow,
    /// Computed from `events` and `in_shadow`.
    priced: Priced,
}

struct Priced {
    state: Snapshot,
    unpriced: usize,
    cells: Arc<Vec<CellWrite>>,
    increments: Vec<BucketWrite>,
}

/// The event ids of a batch, per dedupe slot, as a commit checks and records them.
struct SeenLists<'a> {
    live: Vec<Seen<'a>>,
    /// The replay's prefix, the events for its copy, and the last slot whose seen-set the copy
    /// keeps until the replay ends.
    shadow: Option<(String, Vec<Seen<'a>>, i64)>,
}

impl<'a> SeenLists<'a> {
    fn of(batch: &'a Prepared, committer: &Committer) -> Self {
        let seen = |(arrival, e): &'a (i64, UsageEvent)| Seen {
            id: &e.id,
            slot: committer.slot_of(*arrival),
        };
        let state = &batch.priced.state;
        Self {
            live: batch.events.iter().map(seen).collect(),
            shadow: state.replay.as_ref().map(|replay| {
                let ids = batch
                    .events
                    .iter()
                    .filter(|(_, e)| replay.covers(e.ts) && !batch.in_shadow.contains(&e.id))
                    .map(seen)
                    .collect();
                // Entries up to the replay's end are read by it later, maybe much later: what
                // is recorded for them (and for the slot after, which their check consults)
                // must be there then.
                let kept_through = committer.slot_of(replay.end_ms).saturating_add(1);
                (control::shadow_prefix(replay.rid), ids, kept_through)
            }),
        }
    }

    fn batch(&'a self, prepared: &'a Prepared, token: &'a str) -> Batch<'a> {
        Batch {
            token,
            live: &self.live,
            shadow: self
                .shadow
                .as_ref()
                .map(|(prefix, seen, kept_through)| ShadowSeen {
                    prefix,
                    seen,
                    kept_through: *kept_through,
                }),
            cells: &prepared.priced.cells,
            increments: &prepared.priced.increments,
            acks: match &prepared.field {
                None => Acks::Now(&prepared.acks),
                Some(field) => Acks::Record {
                    field,
                    entries: &prepared.acks,
                },
            },
        }
    }
}

/// The acknowledgement of a batch cut into several commits, sent once all applied: its
/// entries in the order read, and the fields they were recorded under ([`applied`]).
struct Deferred {
    entries: Vec<String>,
    fields: Vec<String>,
}

/// A batch ready to commit: its parts, and what acknowledges them all if they record.
struct Parts {
    parts: Vec<Prepared>,
    deferred: Option<Deferred>,
}

impl Parts {
    fn none() -> Self {
        Self {
            parts: Vec::new(),
            deferred: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// An acknowledgement on its way (`applied::acknowledge`).
struct Acknowledging(tokio::task::JoinHandle<redis::RedisResult<()>>);

impl Acknowledging {
    async fn done(self) -> Result<(), CommitError> {
        match self.0.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CommitError::Lost),
        }
    }
}

/// Ids a running replay's copy already holds, as a refused commit reported them: the batch
/// applies them to the live figures only.
#[derive(Default)]
struct InShadow(HashSet<String>);

impl InShadow {
    fn learn(&mut self, ids: Vec<String>) {
        self.0.extend(ids);
    }

    /// The state the batch was priced under is no longer in force: the replay these ids were
    /// learned from may have switched, died or been replaced, and a new copy holds none of them.
    /// Forgotten, they cost at most one more refused attempt if the replay is the same.
    fn state_changed(&mut self) {
        self.0.clear();
    }

    fn contains(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

pub struct Consumer {
    config: ConsumerConfig,
    conn: RedisConn,
    /// For reading: commands on one connection run in the order sent, so a read sent after a
    /// batch's commits would wait for all of them.
    reads: RedisConn,
    control: Control,
    /// The state batches are priced under; reloaded when a commit finds it stale.
    state: Option<Snapshot>,
    committer: Committer,
    fields: Fields,
    metrics: Arc<Metrics>,
}

impl Consumer {
    pub fn new(
        config: ConsumerConfig,
        conn: RedisConn,
        reads: RedisConn,
        control: Control,
        metrics: Arc<Metrics>,
    ) -> Self {
        let committer = Committer::new(
            config.keyspace.clone(),
            config.group.clone(),
            config.dedupe_window_secs,
        );
        Self {
            fields: Fields::new(&config.consumer),
            config,
            conn,
            reads,
            control,
            state: None,
            committer,
            metrics,
        }
    }

    /// Creates the group at the start of the stream (so events written before the first
    /// aggregator ran are counted), unless it exists.
    pub async fn ensure_group(&mut self) -> redis::RedisResult<()> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.config.keyspace.stream())
            .arg(&self.config.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Consumes until `shutdown` flips; a batch being committed is finished first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let mut own_pending_done = false;
        // Created once; again only if the stream (and with it the group) disappeared, e.g. a
        // Redis restarted without persistence.
        let mut group_ready = false;
        let mut last_claim = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let step = async {
                if !group_ready {
                    self.ensure_group().await?;
                    group_ready = true;
                }
                if !own_pending_done {
                    self.settle_applied().await?;
                    let entries = self.read("0").await?;
                    own_pending_done = entries.is_empty();
                    return self.process(entries).await;
                }
                if last_claim.elapsed() >= self.config.claim_interval {
                    last_claim = tokio::time::Instant::now();
                    let claimed = self.claim().await?;
                    if !claimed.is_empty() {
                        return self.process(claimed).await;
                    }
                }
                let mut entries = self.read(">").await?;
                // A full batch means a backlog: overlap Redis's work with ours.
                if entries.len() >= self.config.batch_size {
                    return self.process_pipelined(entries).await;
                }
                // A partial batch means traffic is light: wait a moment for more, so that one
                // commit covers many events. Events of one key and model then share cells and
                // Redis does a fraction of the work, at the price of `linger` more stats lag.
                if !entries.is_empty() && entries.len() < self.config.batch_size / 2 {
                    tokio::time::sleep(self.config.linger).await;
                    let more = self.config.batch_size - entries.len();
                    entries.extend(self.read_now(more).await?);
                }
                self.process(entries).await
            };
            let result = tokio::select! {
                r = step => r,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        group_ready = false;
                    }
                    // A batch that failed mid-way is still pending for this consumer: read it
                    // again first, rather than waiting for `claim_idle` to reclaim it.
                    own_pending_done = false;
                    tracing::warn!(error = %e, "consuming the usage stream failed; retrying");
                    self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn read(&mut self, from: &str) -> redis::RedisResult<Vec<Entry>> {
        let block = (from == ">").then_some(self.config.block);
        self.read_group(from, self.config.batch_size, block).await
    }

    /// New entries that are already there, without blocking.
    async fn read_now(&mut self, count: usize) -> redis::RedisResult<Vec<Entry>> {
        self.read_group(">", count, None).await
    }

    async fn read_group(
        &mut self,
        from: &str,
        count: usize,
        block: Option<Duration>,
    ) -> redis::RedisResult<Vec<Entry>> {
        self.reader()
            .read(&mut self.reads, from, count, block)
            .await
    }

    /// Reads the next new entries on a task of its own, so that Redis's reading and the reply's
    /// parsing overlap this task's work.
    async fn read_ahead(&self, count: usize) -> Reading {
        let reader = self.reader();
        let mut conn = self.reads.clone();
        Reading(
            crate::ingest::task::spawn_started(async move {
                reader.read(&mut conn, ">", count, None).await
            })
            .await,
        )
    }

    fn reader(&self) -> GroupReader {
        GroupReader {
            stream: self.config.keyspace.stream().to_owned(),
            group: self.config.group.clone(),
            consumer: self.config.consumer.clone(),
        }
    }

    /// Acknowledges what the record says is applied ([`applied`]), before pending entries are
    /// read: those must not be applied again.
    async fn settle_applied(&mut self) -> redis::RedisResult<()> {
        let settled =
            applied::settle(&mut self.conn, &self.config.keyspace, &self.config.group).await?;
        if settled > 0 {
            tracing::info!(
                entries = settled,
                "acknowledged entries a consumer had applied but not yet acknowledged"
            );
        }
        Ok(())
    }

    /// Sends a batch's deferred acknowledgement, on a task of its own.
    async fn acknowledge(&self, deferred: Option<Deferred>) -> Option<Acknowledging> {
        let Deferred { entries, fields } = deferred?;
        let pipe =
            applied::acknowledge(&self.config.keyspace, &self.config.group, &entries, &fields);
        let mut conn = self.conn.clone();
        Some(Acknowledging(
            crate::ingest::task::spawn_started(async move { pipe.query_async(&mut conn).await })
                .await,
        ))
    }

    /// Takes over entries that other (presumably dead) consumers left pending too long.
    /// In claims of at most [`READ_CHUNK`] entries, as reads are, up to a batch.
    async fn claim(&mut self) -> redis::RedisResult<Vec<Entry>> {
        self.settle_applied().await?;
        let mut entries: Vec<Entry> = Vec::new();
        let mut cursor = "0-0".to_owned();
        while entries.len() < self.config.batch_size {
            let want = (self.config.batch_size - entries.len()).min(READ_CHUNK);
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(self.config.keyspace.stream())
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(self.config.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(want)
                .query_async(&mut self.reads)
                .await?;
            // Reply: [next cursor, [entry, ...], [deleted ids]]; entries deleted by trimming
            // are already gone from the pending list, so there is nothing to do for them.
            let Value::Array(parts) = reply else {
                break;
            };
            let mut parts = parts.into_iter();
            let next = parts.next().and_then(crate::ingest::stream::into_string);
            entries.extend(
                parts
                    .next()
                    .map(crate::ingest::stream::take_entries)
                    .unwrap_or_default(),
            );
            match next {
                Some(next) if next != "0-0" => cursor = next,
                _ => break,
            }
        }
        Ok(entries)
    }

    async fn process(&mut self, entries: Vec<Entry>) -> Result<(), CommitError> {
        let Parts { parts, deferred } = self.prepare(entries).await?;
        if parts.is_empty() {
            return Ok(());
        }
        let staged = self.stage_all(&parts);
        let sending = commit::spawn_send_all(staged, self.conn.clone()).await;
        let (sent, replies) = sending.replies().await.ok_or(CommitError::Lost)?;
        self.settle_all(parts, sent, replies).await?;
        match self.acknowledge(deferred).await {
            Some(acknowledging) => acknowledging.done().await,
            None => Ok(()),
        }
    }

    /// Under a backlog: while Redis runs one batch's commits, the next batch is decoded,
    /// priced and merged against the cells as they will be once the first applies, and the
    /// one after it is read. If a commit does not apply, the batch staged on it is thrown away
    /// and built again; stamps make a wrong guess cost a retry, never a figure.
    ///
    /// Entries read ahead are pending for this consumer until committed: should anything fail,
    /// the consumer reads its own pending entries again before new ones.
    async fn process_pipelined(&mut self, entries: Vec<Entry>) -> Result<(), CommitError> {
        let batch_size = self.config.batch_size;
        let mut current = self.prepare(entries).await?;
        if current.is_empty() {
            return Ok(());
        }
        // The batch after: read now, so that the first commits queue behind it too.
        let mut reading = Some(self.read_ahead(batch_size).await);
        let mut staged = self.stage_all(&current.parts);
        // The acknowledgement of the batch before, in flight while this one is committed.
        let mut acknowledging: Option<Acknowledging> = None;
        loop {
            // The commits go first: Redis queues them behind the read already started, so they
            // do not wait for that reply to be parsed here.
            let sending = commit::spawn_send_all(staged, self.conn.clone()).await;
            let next_entries = match reading.take() {
                Some(reading) => reading.entries().await,
                None => self.read_now(batch_size).await,
            };
            // A full read means the backlog goes on: start reading the batch after next.
            if matches!(&next_entries, Ok(entries) if entries.len() >= batch_size) {
                reading = Some(self.read_ahead(batch_size).await);
            }
            let next = async {
                let next = self.prepare(next_entries?).await?;
                let next_staged = self.stage_all(&next.parts);
                Ok::<_, CommitError>((next, next_staged))
            }
            .await;
            let acknowledged = match acknowledging.take() {
                Some(acknowledging) => acknowledging.done().await,
                None => Ok(()),
            };
            let Some((sent, replies)) = sending.replies().await else {
                if let Ok((_, s)) = next {
                    self.committer.forget_all(s);
                }
                return Err(CommitError::Lost);
            };
            // The next batch was staged on top of this one: if any of its commits did not
            // apply, undo the next first (newest first), and build it again once this one is in.
            let all_applied = commit::all_applied(&sent, &replies);
            let mut next = next;
            if !all_applied && let Ok((_, s)) = &mut next {
                let s = std::mem::take(s);
                self.committer.forget_all(s);
            }
            let Parts { parts, deferred } = current;
            let settled = match self.settle_all(parts, sent, replies).await {
                Ok(()) => acknowledged,
                Err(e) => Err(e),
            };
            let (next, next_staged) = match (settled, next) {
                (Ok(()), Ok(next)) => next,
                (Err(e), Ok((_, s))) => {
                    self.committer.forget_all(s);
                    return Err(e);
                }
                (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
            };
            acknowledging = self.acknowledge(deferred).await;
            if next.is_empty() {
                return match acknowledging {
                    Some(acknowledging) => acknowledging.done().await,
                    None => Ok(()),
                };
            }
            staged = if all_applied {
                next_staged
            } else {
                self.stage_all(&next.parts)
            };
            current = next;
        }
    }

    /// Decodes a batch (undecodable entries go to the dead-letter stream), drops in-batch
    /// duplicates, splits it into commits by client key and prices each; empty when nothing is
    /// left to commit or acknowledge.
    async fn prepare(&mut self, entries: Vec<Entry>) -> Result<Parts, CommitError> {
        if entries.is_empty() {
            return Ok(Parts::none());
        }
        let started = std::time::Instant::now();
        // A batch of more events than one commit takes may be cut into several: then it is
        // acknowledged as a whole, in the order read.
        let order: Option<Vec<String>> = (entries.len() > self.config.commit_events)
            .then(|| entries.iter().map(|e| e.id.clone()).collect());
        // (entry id, arrival ms, event)
        let mut decoded: Vec<(String, i64, UsageEvent)> = Vec::with_capacity(entries.len());
        // Entries no commit applies an event of: dead letters, and copies of an id the batch
        // has already. The first commit acknowledges them.
        let mut other_acks: Vec<String> = Vec::new();
        let mut dead: Vec<(Entry, String)> = Vec::new();
        let mut ahead = 0;
        for entry in entries {
            let checked = match &entry.payload {
                Some(bytes) => shared::decode(bytes)
                    .map_err(|e| e.to_string())
                    .and_then(plausible),
                None => Err(format!("entry has no `{EVENT_FIELD}` field")),
            };
            match checked {
                Ok(event) => {
                    let arrival = arrival_ms(&entry.id);
                    if event.ts > arrival.saturating_add(crate::replay::CLOCK_SKEW_MS) {
                        ahead += 1;
                    }
                    decoded.push((entry.id, arrival, event));
                }
                Err(reason) => {
                    other_acks.push(entry.id.clone());
                    dead.push((entry, reason));
                }
            }
        }
        if !dead.is_empty() {
            self.dead_letter(&dead).await?;
        }
        if ahead > 0 {
            self.metrics.clock_ahead.fetch_add(ahead, Ordering::Relaxed);
            tracing::warn!(
                events = ahead,
                "events stamped more than 10 minutes after they reached the stream: a gateway's \
                 clock runs ahead of Redis's, and a replay of their day may miss them"
            );
        }

        // Within a batch, the first copy of an id wins; the commit deduplicates across batches.
        let first = first_of_each_id(decoded.iter().map(|(_, _, e)| e.id.as_str()));
        let mut duplicates = 0;
        let mut kept = Vec::with_capacity(decoded.len());
        for (event, first) in decoded.into_iter().zip(first) {
            if first {
                kept.push(event);
            } else {
                duplicates += 1;
                other_acks.push(event.0);
            }
        }
        let groups = groups::by_key(
            kept.iter().map(|(_, _, e)| e.key_id.as_deref()),
            self.config.commit_events,
        );
        // A batch of dead letters and duplicates only still has their acknowledgement to commit.
        // (acks, events) of each commit
        type Part = (Vec<String>, Vec<(i64, UsageEvent)>);
        let mut parts: Vec<Part> = std::iter::repeat_with(Default::default)
            .take(groups.count.max(1))
            .collect();
        for ((entry_id, arrival, event), part) in kept.into_iter().zip(groups.of_event) {
            if let Some((acks, events)) = parts.get_mut(part) {
                acks.push(entry_id);
                events.push((arrival, event));
            }
        }
        if let Some((acks, _)) = parts.first_mut() {
            acks.extend(other_acks);
        }
        let last = parts.len() - 1;
        let deferred = order.filter(|_| parts.len() > 1).map(|entries| Deferred {
            entries,
            fields: parts.iter().map(|_| self.fields.next()).collect(),
        });
        let mut prepared = Vec::with_capacity(parts.len());
        for (i, (acks, events)) in parts.into_iter().enumerate() {
            let in_shadow = InShadow::default();
            let priced = self.price(&events, &in_shadow).await?;
            prepared.push(Prepared {
                started: (i == last).then_some(started),
                acks,
                field: deferred.as_ref().and_then(|d| d.fields.get(i).cloned()),
                dead: if i == 0 { dead.len() } else { 0 },
                duplicates: if i == 0 { duplicates } else { 0 },
                events,
                in_shadow,
                priced,
            });
        }
        Ok(Parts {
            parts: prepared,
            deferred,
        })
    }

    /// Prices `events` under the state in force (loaded if unknown) and sums them into cells,
    /// for the live figures and a running replay's copy.
    async fn price(
        &mut self,
        events: &[(i64, UsageEvent)],
        in_shadow: &InShadow,
    ) -> Result<Priced, CommitError> {
        let state = match &self.state {
            Some(state) => state.clone(),
            None => {
                let state = self.control.load(&mut self.conn).await?;
                self.state = Some(state.clone());
                state
            }
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut delta = Delta::default();
        let mut unpriced = 0;
        for (_, event) in events {
            let charge = state.pricing.price(&usage_of(event));
            unpriced += usize::from(charge.is_none() && event.account_id.is_some());
            delta.add(event, charge, now_ms);
        }
        let mut cells = delta.cell_writes("");
        let mut increments = delta.increments(now_ms);
        if let Some(replay) = &state.replay {
            let prefix = control::shadow_prefix(replay.rid);
            let mut shadow = Delta::default();
            for (_, event) in events {
                if replay.covers(event.ts) && !in_shadow.contains(&event.id) {
                    shadow.add(event, replay.pricing.price(&usage_of(event)), now_ms);
                }
            }
            cells.extend(shadow.cell_writes(&prefix));
            increments.extend(shadow.shadow_increments(&prefix, now_ms));
        }
        Ok(Priced {
            state,
            unpriced,
            cells: Arc::new(cells),
            increments,
        })
    }

    fn stage(&mut self, batch: &Prepared) -> Staged {
        let lists = SeenLists::of(batch, &self.committer);
        let token = batch.priced.state.token();
        self.committer.stage(&lists.batch(batch, &token))
    }

    /// Stages a batch's commits, each on top of the ones before.
    fn stage_all(&mut self, parts: &[Prepared]) -> Vec<Staged> {
        parts.iter().map(|part| self.stage(part)).collect()
    }

    /// Takes the replies to a batch's commits, records those that applied and commits the
    /// others again, whatever it takes ([`Self::finish`]). After an error the parts not yet
    /// applied stay pending, and are read again.
    async fn settle_all(
        &mut self,
        parts: Vec<Prepared>,
        sent: Vec<Staged>,
        replies: Replies,
    ) -> Result<(), CommitError> {
        let outcomes = self
            .committer
            .settle_all(sent, replies, &self.metrics.commit_conflicts)?;
        let mut first_error = None;
        for (part, outcome) in parts.into_iter().zip(outcomes) {
            match outcome {
                Ok(Some(Outcome::Applied)) => self.applied(&part),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
                Ok(_) if first_error.is_some() => {}
                Ok(outcome) => {
                    if let Err(e) = self.finish(part, outcome).await {
                        first_error = Some(e);
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Commits a prepared batch, whatever it takes: drops duplicates, prices again after a
    /// pricing change, waits out a replay's switch. `outcome`: of an attempt already made.
    async fn finish(
        &mut self,
        mut batch: Prepared,
        mut outcome: Option<Outcome>,
    ) -> Result<(), CommitError> {
        loop {
            let outcome = match outcome.take() {
                Some(outcome) => outcome,
                None => {
                    let lists = SeenLists::of(&batch, &self.committer);
                    let token = batch.priced.state.token();
                    self.committer
                        .commit(
                            &mut self.conn,
                            &lists.batch(&batch, &token),
                            &self.metrics.commit_conflicts,
                        )
                        .await?
                }
            };
            match outcome {
                Outcome::Applied => {
                    self.applied(&batch);
                    return Ok(());
                }
                Outcome::Duplicates(dups) => {
                    let dups: HashSet<String> = dups.into_iter().collect();
                    batch.duplicates += dups.len();
                    batch.events.retain(|(_, e)| !dups.contains(&e.id));
                }
                Outcome::ShadowDuplicates(ids) => batch.in_shadow.learn(ids),
                Outcome::Stale => {
                    batch.in_shadow.state_changed();
                    tracing::info!("pricing or replay state changed; pricing the batch again");
                    self.state = None;
                }
                Outcome::Frozen => {
                    tokio::time::sleep(FROZEN_RETRY).await;
                    continue;
                }
            }
            batch.priced = self.price(&batch.events, &batch.in_shadow).await?;
        }
    }

    fn applied(&self, batch: &Prepared) {
        let m = &self.metrics;
        m.applied
            .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        m.unpriced
            .fetch_add(batch.priced.unpriced as u64, Ordering::Relaxed);
        m.duplicates
            .fetch_add(batch.duplicates as u64, Ordering::Relaxed);
        m.dead_lettered
            .fetch_add(batch.dead as u64, Ordering::Relaxed);
        m.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(started) = batch.started {
            m.record_apply_time(started.elapsed());
        }
    }

    async fn dead_letter(&mut self, dead: &[(Entry, String)]) -> redis::RedisResult<()> {
        let stream = self.config.keyspace.dead_letter_stream();
        let mut pipe = redis::pipe();
        for (entry, reason) in dead {
            tracing::warn!(entry = %entry.id, %reason, "dead-lettering an undecodable stream entry");
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("source_id")
                .arg(&entry.id)
                .arg("reason")
                .arg(reason)
                .arg("e")
                .arg(entry.payload.as_deref().unwrap_or_default())
                .ignore();
        }
        pipe.query_async(&mut self.conn).await
    }
}

/// This consumer's reads of its stream.
struct GroupReader {
    stream: String,
    group: String,
    consumer: String,
}

impl GroupReader {
    /// Up to `count` entries after `from` (`>`: new ones; an id: this consumer's pending ones
    /// after it), in reads of at most [`READ_CHUNK`], one after the other so that Redis serves
    /// its other clients in between. Only the first read blocks.
    async fn read(
        &self,
        conn: &mut RedisConn,
        from: &str,
        count: usize,
        mut block: Option<Duration>,
    ) -> redis::RedisResult<Vec<Entry>> {
        let mut entries: Vec<Entry> = Vec::with_capacity(count.min(64 * READ_CHUNK));
        let mut after = from.to_owned();
        while entries.len() < count {
            let want = (count - entries.len()).min(READ_CHUNK);
            let read = read_entries(self.command(&after, want, block.take()), conn).await?;
            let full = read.len() >= want;
            if from != ">"
                && let Some(last) = read.last()
            {
                after.clone_from(&last.id);
            }
            entries.extend(read);
            if !full {
                break;
            }
        }
        Ok(entries)
    }

    fn command(&self, from: &str, count: usize, block: Option<Duration>) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(from);
        cmd
    }
}

/// A read started by [`Consumer::read_ahead`].
struct Reading(tokio::task::JoinHandle<redis::RedisResult<Vec<Entry>>>);

impl Reading {
    /// Its entries. Should the task have been lost, what it read stays pending for this
    /// consumer, which reads its own pending entries again after an error.
    async fn entries(self) -> redis::RedisResult<Vec<Entry>> {
        self.0.await.unwrap_or_else(|_| {
            Err((
                redis::ErrorKind::Io,
                "the stream read ended without a reply",
            )
                .into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch refused because one replay's copy had some of its events, then refused as stale
    /// because that replay switched and another registered: the new copy has none of them.
    #[test]
    fn what_a_replays_copy_holds_is_forgotten_when_the_state_changes() {
        let mut in_shadow = InShadow::default();
        in_shadow.learn(vec!["a".into(), "b".into()]);
        assert!(in_shadow.contains("a"));
        in_shadow.state_changed();
        assert!(!in_shadow.contains("a"));
        assert!(!in_shadow.contains("b"));
    }
}
