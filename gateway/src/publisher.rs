//! Hands usage events to the Redis stream off the request path.
//!
//! Request handlers only push onto an unbounded channel, which never blocks and never waits on
//! Redis. One background task owns the Redis side: it drains whatever has queued up into one
//! pipelined batch of `XADD`s, so under load many events share one round trip. When Redis
//! fails, the batch is kept and retried with backoff; nothing is dropped while the process lives.
//! On shutdown the task drains the channel and makes a bounded last attempt to flush.

use std::time::Duration;

use std::sync::Arc;

use redis::aio::ConnectionManager;
use shared::{EVENT_FIELD, Keyspace, UsageEvent};
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;

/// Most events per pipeline: bounds one round trip's size.
const MAX_BATCH: usize = 512;
/// How long shutdown keeps retrying an unflushable batch before giving up.
const SHUTDOWN_FLUSH_DEADLINE: Duration = Duration::from_secs(5);

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

pub struct PublisherTask {
    rx: mpsc::UnboundedReceiver<UsageEvent>,
    conn: ConnectionManager,
    stream: String,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

pub fn channel(
    conn: ConnectionManager,
    keyspace: &Keyspace,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> (Publisher, PublisherTask) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = PublisherTask {
        rx,
        conn,
        stream: keyspace.stream().to_owned(),
        shutdown,
        metrics: Arc::clone(&metrics),
    };
    (Publisher { tx, metrics }, task)
}

impl PublisherTask {
    /// Runs until every `Publisher` is dropped (the server has finished its last request) and
    /// the queue is flushed.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            if self.rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
            self.flush(&batch).await;
            batch.clear();
        }
    }

    async fn flush(&mut self, batch: &[UsageEvent]) {
        let mut pipe = redis::pipe();
        for event in batch {
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("*")
                .arg(EVENT_FIELD)
                .arg(shared::encode(event))
                .ignore();
        }
        let mut backoff = Duration::from_millis(50);
        let mut gave_up_at = None;
        loop {
            self.metrics.redis_round_trips.inc();
            match pipe.query_async::<()>(&mut self.conn).await {
                Ok(()) => {
                    let n = batch.len() as u64;
                    self.metrics.events_published.add(n);
                    self.metrics
                        .events_pending
                        .set(self.metrics.events_pending.get() - n as i64);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), "publishing usage events failed; retrying");
                }
            }
            if *self.shutdown.borrow() {
                let deadline = *gave_up_at
                    .get_or_insert_with(|| tokio::time::Instant::now() + SHUTDOWN_FLUSH_DEADLINE);
                if tokio::time::Instant::now() >= deadline {
                    tracing::error!(
                        events = batch.len(),
                        "shutting down with unpublished usage events"
                    );
                    return;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
