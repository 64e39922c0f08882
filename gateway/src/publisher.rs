//! Hands usage events to the Redis stream off the request path, and never loses one.
//!
//! Request handlers only push onto an unbounded channel, which never blocks and never waits on
//! Redis. One background task owns the Redis side: it drains whatever has queued up into one
//! pipelined batch of `XADD`s, so under load many events share one round trip.
//!
//! When a batch cannot be written (Redis down, or slower than the response timeout), it goes to
//! the local spool file, and so does every later event until the spool is drained: order is
//! kept and memory stays flat however long the outage lasts. The spool is retried with backoff
//! and re-published with the events' original ids (the aggregator counts an id once), also by
//! the next process if this one dies first. On shutdown the task makes a bounded last attempt
//! to drain the spool; what remains waits on disk for the next start.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use shared::{EVENT_FIELD, Keyspace, UsageEvent};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::spool::Spool;

/// Most events per pipeline: bounds one round trip's size.
const MAX_BATCH: usize = 512;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long shutdown keeps trying to drain the spool before leaving it for the next start.
const SHUTDOWN_DRAIN_DEADLINE: Duration = Duration::from_secs(5);

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
    conn: ConnectionManager,
    stream: String,
    maxlen: Option<u64>,
    spool: Spool,
    /// Events that could be written neither to Redis nor to the spool (disk full): kept in
    /// memory and retried, never dropped.
    stranded: Vec<UsageEvent>,
    metrics: Arc<Metrics>,
}

pub fn channel(
    conn: ConnectionManager,
    keyspace: &Keyspace,
    maxlen: Option<u64>,
    spool: Spool,
    metrics: Arc<Metrics>,
) -> (Publisher, PublisherTask) {
    let (tx, rx) = mpsc::unbounded_channel();
    metrics
        .spool_bytes
        .set(i64::try_from(spool.bytes()).unwrap_or(i64::MAX));
    let task = PublisherTask {
        rx,
        conn,
        stream: keyspace.stream().to_owned(),
        maxlen,
        spool,
        stranded: Vec::new(),
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

    async fn xadd(&mut self, events: &[UsageEvent]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for event in events {
            let cmd = pipe.cmd("XADD").arg(&self.stream);
            if let Some(maxlen) = self.maxlen {
                cmd.arg("MAXLEN").arg("~").arg(maxlen);
            }
            cmd.arg("*")
                .arg(EVENT_FIELD)
                .arg(shared::encode(event))
                .ignore();
        }
        self.metrics.redis_round_trips.inc();
        pipe.query_async::<()>(&mut self.conn).await?;
        let n = events.len() as u64;
        self.metrics.events_published.add(n);
        self.metrics
            .events_pending
            .set(self.metrics.events_pending.get() - n as i64);
        Ok(())
    }

    /// Moves events from memory to the spool file.
    fn spill(&mut self, events: Vec<UsageEvent>) {
        if events.is_empty() {
            return;
        }
        let n = events.len();
        match self.spool.append(&events) {
            Ok(()) => {
                self.metrics.events_spooled.add(n as u64);
                self.metrics
                    .events_pending
                    .set(self.metrics.events_pending.get() - n as i64);
                self.update_spool_gauge();
            }
            Err(e) => {
                tracing::error!(error = %e, events = n, "cannot spool usage events; keeping them in memory");
                self.stranded.extend(events);
            }
        }
    }

    /// One attempt to move the oldest waiting events to Redis. True on progress.
    async fn drain_step(&mut self) -> bool {
        if !self.stranded.is_empty() {
            let take = self.stranded.len().min(MAX_BATCH);
            let events: Vec<UsageEvent> = self.stranded.drain(..take).collect();
            if self.xadd(&events).await.is_err() {
                self.stranded.splice(0..0, events);
                return false;
            }
            return true;
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
        if let Err(e) = self.spool.consume(n) {
            // They are in Redis; at worst they are re-sent later and deduplicated by id.
            tracing::error!(error = %e, "cannot advance the spool");
        }
        self.update_spool_gauge();
        if self.spool.is_empty() {
            tracing::info!("spool drained; publishing directly again");
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
        if !self.stranded.is_empty() {
            let stranded = std::mem::take(&mut self.stranded);
            self.spill(stranded);
        }
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

    fn update_spool_gauge(&self) {
        self.metrics
            .spool_bytes
            .set(i64::try_from(self.spool.bytes()).unwrap_or(i64::MAX));
        self.metrics
            .spool_skipped
            .set(i64::try_from(self.spool.skipped()).unwrap_or(i64::MAX));
    }
}
