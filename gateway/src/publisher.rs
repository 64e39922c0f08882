//! Hands usage events to the Redis stream off the request path, and never loses or doubles one.
//!
//! Request handlers only push onto an unbounded channel, which never blocks and never waits on
//! Redis. One background task owns the Redis side: it drains whatever has queued up into one
//! batch, written by one script call, so under load many events share one round trip.
//!
//! When a batch cannot be written (Redis down, or slower than the response timeout), it goes to
//! the local spool file, and so does every later event until the spool is drained: order is
//! kept and memory stays flat however long the outage lasts. If the spool cannot take them
//! either (disk full), they wait in memory ("stranded"), and every later event queues behind
//! them there, so they still reach Redis after what the spool held and before anything newer.
//! The backlog is retried with backoff and re-published with the events' original ids, also by
//! the next process if this one dies first. On shutdown the task makes a bounded last attempt
//! to drain it; what remains waits on disk for the next start.
//!
//! A batch whose reply was lost may still have landed, and the aggregator's dedupe by id only
//! covers copies arriving within its window (an hour by default), not after a longer outage. So
//! the script adds a batch all or nothing, and records how many events of it landed under a
//! marker named after its first event; a failed batch is always retried from that same first
//! event (it stays at the head of the backlog, also across a restart), and the script skips what
//! the marker says already landed. Once this task has seen a batch's reply, the next batch
//! deletes that marker in the same call, so each replica normally leaves one marker behind.

use std::sync::Arc;
use std::time::Duration;

use shared::RedisConn;
use shared::{EVENT_FIELD, Partitions, UsageEvent};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::spool::Spool;

/// Most events per batch: bounds one round trip's size.
const MAX_BATCH: usize = 512;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long shutdown keeps trying to drain the spool before leaving it for the next start.
const SHUTDOWN_DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How long a batch's marker outlives its last write: as long as the stream keeps entries by
/// default, beyond which a late copy could not be told from a new event anyway.
const MARKER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a batch waits for its replicas (`--min-replicas`) before it counts as failed. Below
/// the connection's 2 s response timeout, so a slow acknowledgement is a retry, not a lost
/// connection.
const REPLICA_WAIT: Duration = Duration::from_millis(1_000);

/// Adds one batch to the stream, skipping the events an earlier attempt at the same batch added.
///
/// KEYS: the stream, this batch's marker, optionally the marker of a batch whose reply was seen
/// (deleted). ARGV: MAXLEN (`0`: no cap), the marker's TTL in seconds, the event field, then the
/// encoded events. Returns how many events it added.
///
/// A script runs atomically: no other client sees part of a batch, and a connection lost
/// part-way through sending it means Redis never ran it. Retries send the same first event,
/// possibly with more events after it, never fewer (the backlog only grows behind its head).
const SCRIPT: &str = r"
local landed = tonumber(redis.call('GET', KEYS[2]) or '0')
local total = #ARGV - 3
for i = 4 + landed, #ARGV do
  if ARGV[1] == '0' then
    redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[i])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[3], ARGV[i])
  end
end
redis.call('SET', KEYS[2], math.max(total, landed), 'EX', ARGV[2])
if KEYS[3] then
  redis.call('DEL', KEYS[3])
end
return math.max(total - landed, 0)
";

#[derive(Clone, Debug)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<UsageEvent>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// Queues an event; never blocks. Returns false only when the publisher has stopped.
    pub fn publish(&self, event: UsageEvent) -> bool {
        self.metrics.events_pending.inc();
        self.tx.send(event).is_ok()
    }
}

#[cfg(test)]
impl Publisher {
    /// A publisher whose events land in the returned receiver, for unit tests.
    pub fn for_test() -> (Self, mpsc::UnboundedReceiver<UsageEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Arc::default();
        (Self { tx, metrics }, rx)
    }
}

pub struct PublisherTask {
    rx: mpsc::UnboundedReceiver<UsageEvent>,
    conn: RedisConn,
    partitions: Partitions,
    maxlen: Option<u64>,
    /// `WAIT` for this many replicas after each write; 0: don't.
    min_replicas: u32,
    /// Per partition, the marker of the last batch whose reply was seen: that batch is never
    /// sent again, so the partition's next batch deletes it.
    acked_markers: Vec<Option<String>>,
    spool: Spool,
    /// Events that could be written neither to Redis nor to the spool (disk full): kept in
    /// memory and retried, never dropped. All newer than what the spool holds.
    stranded: Vec<UsageEvent>,
    /// The spool's fsync count last added to the metrics.
    fsyncs_counted: u64,
    metrics: Arc<Metrics>,
}

pub fn channel(
    conn: RedisConn,
    partitions: &Partitions,
    maxlen: Option<u64>,
    min_replicas: u32,
    spool: Spool,
    metrics: Arc<Metrics>,
) -> (Publisher, PublisherTask) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut task = PublisherTask {
        rx,
        conn,
        partitions: partitions.clone(),
        maxlen,
        min_replicas,
        acked_markers: vec![None; partitions.count()],
        spool,
        stranded: Vec::new(),
        fsyncs_counted: 0,
        metrics: Arc::clone(&metrics),
    };
    task.update_spool_gauge();
    (Publisher { tx, metrics }, task)
}

impl PublisherTask {
    /// Runs until every `Publisher` is dropped (the server has finished its last request) and
    /// everything queued is in Redis or in the spool.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut retry_at = Instant::now();
        let mut backoff = MIN_BACKOFF;
        loop {
            if self.degraded() {
                tokio::select! {
                    received = self.rx.recv_many(&mut batch, MAX_BATCH) => {
                        if received == 0 {
                            return self.drain_before_exit().await;
                        }
                        // Behind what is already waiting, to keep the order.
                        self.spill(std::mem::take(&mut batch));
                        continue;
                    }
                    () = tokio::time::sleep_until(retry_at) => {}
                }
                if self.drain_step().await {
                    backoff = MIN_BACKOFF;
                } else {
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                continue;
            }
            if self.rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
            let events = std::mem::take(&mut batch);
            if let Err(e) = self.xadd(&events).await {
                tracing::warn!(error = %e, events = events.len(), "Redis refused usage events; spooling them");
                self.spill(events);
                retry_at = Instant::now() + backoff;
            }
        }
    }

    fn degraded(&self) -> bool {
        !self.spool.is_empty() || !self.stranded.is_empty()
    }

    /// Writes one batch, one [`SCRIPT`] call per partition it has events of (in order within
    /// each). An error means the batch may or may not have landed, in part or whole; sending it
    /// again, from the same first event, adds only what did not: each partition's part starts
    /// with the same event again, and its marker says how much of it landed.
    async fn xadd(&mut self, events: &[UsageEvent]) -> redis::RedisResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut parts: Vec<Vec<&UsageEvent>> = vec![Vec::new(); self.partitions.count()];
        for event in events {
            parts[self.partitions.of_key(event.key_id.as_deref())].push(event);
        }
        let mut landed = Vec::with_capacity(parts.len());
        let mut failed = None;
        for (p, part) in parts.iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            // The other partitions go on: what they add now, a retry skips.
            match self.xadd_part(p, part).await {
                Ok(marker) => landed.push((p, marker)),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            // The batch will be sent again, so none of its markers may be deleted yet.
            return Err(e);
        }
        for (p, marker) in landed {
            self.acked_markers[p] = Some(marker);
        }
        self.metrics
            .events_pending
            .set(self.metrics.events_pending.get() - events.len() as i64);
        Ok(())
    }

    /// Adds one partition's part of a batch; returns its marker.
    async fn xadd_part(
        &mut self,
        partition: usize,
        events: &[&UsageEvent],
    ) -> redis::RedisResult<String> {
        let keyspace = self.partitions.get(partition).clone();
        let marker = keyspace.publish_marker(&events[0].id);
        let acked = self.acked_markers[partition]
            .as_ref()
            .filter(|m| **m != marker);
        // EVAL with the source rather than EVALSHA: a batch's payload dwarfs the script, and
        // no reply can then be NOSCRIPT (a restarted or failed-over master has no scripts).
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SCRIPT)
            .arg(2 + usize::from(acked.is_some()))
            .arg(keyspace.stream())
            .arg(&marker);
        if let Some(acked) = acked {
            cmd.arg(acked);
        }
        cmd.arg(self.maxlen.unwrap_or(0))
            .arg(MARKER_TTL.as_secs())
            .arg(EVENT_FIELD);
        for event in events {
            cmd.arg(shared::encode(event));
        }
        self.metrics.redis_round_trips.inc();
        let added = if self.min_replicas == 0 {
            cmd.query_async(&mut self.conn).await?
        } else {
            self.add_replicated(cmd, keyspace.stream()).await?
        };
        self.metrics.events_published.add(added);
        Ok(marker)
    }

    /// Runs the script and `WAIT` in one pipeline, so both reach the master that took the write
    /// on the same connection; fewer replicas than required is an error like a lost reply: the
    /// batch stays in the spool and is sent again (adding nothing twice) until enough have it.
    async fn add_replicated(
        &mut self,
        script: redis::Cmd,
        stream: &str,
    ) -> redis::RedisResult<u64> {
        let mut pipe = redis::pipe();
        pipe.add_command(script)
            .cmd("WAIT")
            .arg(self.min_replicas)
            .arg(REPLICA_WAIT.as_millis() as u64);
        let (added, replicas): (u64, u32) = pipe.query_async(&mut self.conn).await?;
        if replicas < self.min_replicas {
            self.metrics.replica_waits_failed.inc();
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "too few replicas acknowledged the events",
                format!(
                    "{replicas} of {} replica(s) of {stream}'s master within {} ms",
                    self.min_replicas,
                    REPLICA_WAIT.as_millis()
                ),
            )));
        }
        Ok(added)
    }

    /// Moves events from memory to the spool file, behind any stranded ones: those arrived
    /// earlier, so they go first, and nothing overtakes them while the disk refuses them.
    fn spill(&mut self, events: Vec<UsageEvent>) {
        let events = if self.stranded.is_empty() {
            events
        } else {
            let mut waiting = std::mem::take(&mut self.stranded);
            waiting.extend(events);
            waiting
        };
        if events.is_empty() {
            return;
        }
        let n = events.len();
        match on_disk(|| self.spool.append(&events)) {
            Ok(()) => {
                self.metrics.events_spooled.add(n as u64);
                self.metrics
                    .events_pending
                    .set(self.metrics.events_pending.get() - n as i64);
            }
            Err(e) => {
                tracing::error!(error = %e, events = n, "cannot spool usage events; keeping them in memory");
                self.stranded = events;
            }
        }
        self.update_spool_gauge();
    }

    /// One attempt to move the oldest waiting events to Redis. True on progress.
    async fn drain_step(&mut self) -> bool {
        // Stranded events are newer than the spool's: they wait until it is empty (the next
        // event to arrive also retries moving them to the disk, behind the spool's).
        if self.spool.is_empty() {
            return self.drain_stranded().await;
        }
        let events = match self.spool.peek(MAX_BATCH) {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the spool");
                return false;
            }
        };
        let n = events.len();
        // Re-published events were counted out of `pending` when spooled; count them back in
        // for the duration of the write so the gauge nets to zero.
        self.metrics
            .events_pending
            .set(self.metrics.events_pending.get() + n as i64);
        if let Err(e) = self.xadd(&events).await {
            self.metrics
                .events_pending
                .set(self.metrics.events_pending.get() - n as i64);
            tracing::debug!(error = %e, "Redis still unavailable for spooled events");
            return false;
        }
        if let Err(e) = on_disk(|| self.spool.consume(n)) {
            // They are in Redis and their batch's marker stays until the next batch's reply:
            // sent again from the same first event, they are skipped.
            tracing::error!(error = %e, "cannot advance the spool");
        }
        self.update_spool_gauge();
        if !self.degraded() {
            tracing::info!("spool drained; publishing directly again");
        }
        true
    }

    /// Sends the oldest stranded events, once the spool, which holds older ones, is empty.
    async fn drain_stranded(&mut self) -> bool {
        let take = self.stranded.len().min(MAX_BATCH);
        let events: Vec<UsageEvent> = self.stranded.drain(..take).collect();
        if self.xadd(&events).await.is_err() {
            self.stranded.splice(0..0, events);
            return false;
        }
        true
    }

    async fn drain_before_exit(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_DRAIN_DEADLINE;
        while self.degraded() && Instant::now() < deadline {
            if !self.drain_step().await {
                tokio::time::sleep(MIN_BACKOFF).await;
            }
        }
        self.spill(Vec::new());
        if !self.spool.is_empty() {
            tracing::warn!(
                events = self.spool.len(),
                "leaving usage events in the spool for the next start"
            );
        }
        if !self.stranded.is_empty() {
            tracing::error!(
                events = self.stranded.len(),
                "exiting with usage events neither published nor spooled"
            );
        }
    }

    fn update_spool_gauge(&mut self) {
        self.metrics
            .spool_bytes
            .set(i64::try_from(self.spool.bytes()).unwrap_or(i64::MAX));
        self.metrics
            .spool_skipped
            .set(i64::try_from(self.spool.skipped()).unwrap_or(i64::MAX));
        let fsyncs = self.spool.syncs();
        self.metrics
            .spool_fsyncs
            .add(fsyncs.saturating_sub(self.fsyncs_counted));
        self.fsyncs_counted = fsyncs;
    }
}

/// Runs the spool's blocking file I/O (an fsync takes milliseconds) after handing this worker
/// thread's other tasks to another worker, so requests do not wait behind the disk.
fn on_disk<T>(io: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(io),
        _ => io(),
    }
}

#[cfg(test)]
mod tests {
    use crate::spool::tests::event;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::spool::SpoolOptions;

    /// A private `redis-server` on a Unix socket in a directory of its own (no port to race
    /// for), stopped and removed when the test ends.
    struct TestRedis {
        dir: PathBuf,
        child: Child,
    }

    impl TestRedis {
        fn start() -> TestRedis {
            let dir = unique_dir("redis");
            fs_create(&dir);
            let socket = dir.join("redis.sock");
            let child = Command::new("redis-server")
                .args(["--port", "0", "--save", "", "--appendonly", "no"])
                .arg("--unixsocket")
                .arg(&socket)
                .args(["--logfile", ""])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            let redis = TestRedis { dir, child };
            let client = redis::Client::open(redis.url()).unwrap();
            for _ in 0..400 {
                if let Ok(mut conn) = client.get_connection()
                    && redis::cmd("PING").query::<String>(&mut conn).is_ok()
                {
                    return redis;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            panic!("redis-server did not start on {}", socket.display());
        }

        fn url(&self) -> String {
            format!("redis+unix://{}", self.dir.join("redis.sock").display())
        }

        async fn connection(&self) -> RedisConn {
            let client = redis::Client::open(self.url()).unwrap();
            RedisConn::Node(redis::aio::ConnectionManager::new(client).await.unwrap())
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn unique_dir(what: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::env::temp_dir().join(format!(
            "meter-publisher-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn fs_create(dir: &std::path::Path) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
    }

    fn events(ns: std::ops::Range<u64>) -> Vec<UsageEvent> {
        ns.map(event).collect()
    }

    /// Ids of the events in `stream`, in stream order.
    async fn stream_ids(conn: &mut RedisConn, stream: &str) -> Vec<String> {
        type Entry = (String, Vec<(String, Vec<u8>)>);
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .unwrap();
        entries
            .into_iter()
            .flat_map(|(_, fields)| fields)
            .map(|(_, bytes)| shared::decode(&bytes).unwrap().id)
            .collect()
    }

    fn ids(events: &[UsageEvent]) -> Vec<String> {
        events.iter().map(|e| e.id.clone()).collect()
    }

    #[tokio::test]
    async fn after_a_disk_full_episode_events_reach_redis_in_arrival_order() {
        let redis = TestRedis::start();
        let keyspace = Partitions::new("test:order", 1).unwrap();
        let spool_dir = unique_dir("spool");
        let away = spool_dir.with_extension("away");
        // One record per segment: every append creates a file, so a directory that is gone
        // makes appends fail the way a full disk does, and coming back makes them work again.
        let options = SpoolOptions {
            segment_bytes: 1,
            sync: false,
        };
        let spool = Spool::open_with(&spool_dir, options).unwrap();
        let (_publisher, mut task) = channel(
            redis.connection().await,
            &keyspace,
            None,
            0,
            spool,
            Arc::default(),
        );

        task.spill(events(0..2));
        std::fs::rename(&spool_dir, &away).unwrap();
        task.spill(events(2..4));
        std::fs::rename(&away, &spool_dir).unwrap();
        task.spill(events(4..6));
        while task.degraded() {
            assert!(
                task.drain_step().await,
                "Redis is up: every step makes progress"
            );
        }

        let mut conn = redis.connection().await;
        assert_eq!(
            stream_ids(&mut conn, keyspace.global().stream()).await,
            ids(&events(0..6)),
            "spooled events first, then the stranded ones, then the later ones"
        );
        let _ = std::fs::remove_dir_all(&spool_dir);
    }

    /// A publisher task on `redis` with a spool of its own, in `redis`'s directory.
    async fn task_on(redis: &TestRedis, stream: &str, maxlen: Option<u64>) -> PublisherTask {
        let dir = redis.dir.join("spool");
        let spool = Spool::open_with(&dir, SpoolOptions::default()).unwrap();
        let keyspace = Partitions::new(stream, 1).unwrap();
        channel(
            redis.connection().await,
            &keyspace,
            maxlen,
            0,
            spool,
            Arc::default(),
        )
        .1
    }

    async fn marker_exists(conn: &mut RedisConn, stream: &str, first: u64) -> bool {
        let key = shared::Keyspace::new(stream)
            .unwrap()
            .publish_marker(&event(first).id);
        redis::cmd("EXISTS")
            .arg(key)
            .query_async(conn)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_batch_that_landed_but_whose_reply_was_lost_is_added_once_when_sent_again() {
        let redis = TestRedis::start();
        let mut task = task_on(&redis, "test:lost-reply", None).await;
        let mut conn = redis.connection().await;

        task.xadd(&events(0..3)).await.unwrap();
        // As if the reply had not arrived: the batch goes back to the head of the backlog and is
        // sent again from the same first event, with more behind it.
        task.acked_markers = vec![None];
        task.xadd(&events(0..5)).await.unwrap();
        assert_eq!(
            stream_ids(&mut conn, "test:lost-reply").await,
            ids(&events(0..5))
        );

        // Its reply seen, the next batch deletes its marker and leaves only its own.
        task.xadd(&events(5..7)).await.unwrap();
        assert!(!marker_exists(&mut conn, "test:lost-reply", 0).await);
        assert!(marker_exists(&mut conn, "test:lost-reply", 5).await);
        assert_eq!(
            stream_ids(&mut conn, "test:lost-reply").await,
            ids(&events(0..7))
        );
        let ttl: i64 = redis::cmd("TTL")
            .arg(
                shared::Keyspace::new("test:lost-reply")
                    .unwrap()
                    .publish_marker(&event(5).id),
            )
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 6 * 24 * 3600,
            "the marker lives as long as the stream's retention"
        );
    }

    #[tokio::test]
    async fn a_batch_that_fails_in_redis_adds_nothing_and_is_retried_whole() {
        let redis = TestRedis::start();
        let mut task = task_on(&redis, "test:wrongtype", None).await;
        let mut conn = redis.connection().await;
        let () = redis::cmd("SET")
            .arg("test:wrongtype")
            .arg("not a stream")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(task.xadd(&events(0..4)).await.is_err());
        assert!(!marker_exists(&mut conn, "test:wrongtype", 0).await);

        let () = redis::cmd("DEL")
            .arg("test:wrongtype")
            .query_async(&mut conn)
            .await
            .unwrap();
        task.xadd(&events(0..4)).await.unwrap();
        assert_eq!(
            stream_ids(&mut conn, "test:wrongtype").await,
            ids(&events(0..4))
        );
    }

    #[tokio::test]
    async fn maxlen_still_caps_the_stream_approximately() {
        let redis = TestRedis::start();
        let mut task = task_on(&redis, "test:maxlen", Some(1)).await;
        for batch in 0..3 {
            task.xadd(&events(batch * 150..batch * 150 + 150))
                .await
                .unwrap();
        }
        let mut conn = redis.connection().await;
        let len: u64 = redis::cmd("XLEN")
            .arg("test:maxlen")
            .query_async(&mut conn)
            .await
            .unwrap();
        // `~` trims whole stream nodes (100 entries each by default), never below the cap.
        assert!((1..450).contains(&len), "{len} entries");
    }
}
