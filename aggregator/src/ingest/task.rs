//! Work started on a task of its own while the caller goes on with CPU work: a commit in
//! flight, the next read of the stream.

use std::future::Future;

use tokio::task::JoinHandle;

/// Spawns `work` and lets it start (send its command) before returning.
///
/// A task spawned from a tokio worker waits in that worker's LIFO slot, which no other worker
/// takes: without the yield it would not even start until the caller's CPU work ended, and
/// nothing would overlap (the first pipelined commit this way ran at two thirds of the rate).
pub(crate) async fn spawn_started<F>(work: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task = tokio::spawn(work);
    tokio::task::yield_now().await;
    task
}
