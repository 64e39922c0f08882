//! This replica's requests waiting for a concurrency slot, per key, in the same order as the
//! key's wait queue in Redis (deadline, then request id), and the local wake-ups that let them
//! go the moment this replica releases a lease.
//!
//! Redis decides who may take a freed slot (the queue in the limiter script is FIFO across every
//! replica); this room only decides whom to ask first. A release on this replica wakes the first
//! local waiter; a waiter that is admitted while slots remain free, or that leaves while holding
//! an unused wake-up, passes it on to the next. The first local waiter also re-checks on a short
//! interval, because a lease released by another replica (or expired) wakes nobody here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Room {
    /// Per lease key, sorted by `order`. Critical sections are a few pointer moves, no `.await`.
    queues: Mutex<HashMap<String, Vec<Arc<Waiter>>>>,
}

#[derive(Debug)]
struct Waiter {
    /// Deadline (Unix ms) and request id: the waiter's score and tie-break in Redis.
    order: (i64, String),
    notify: Notify,
    /// Set by a wake-up, cleared when the attempt it asks for starts.
    woken: AtomicBool,
}

impl Room {
    /// Queues a request of the key whose lease set is `key`.
    pub fn join(self: &Arc<Self>, key: &str, deadline_ms: i64, request_id: &str) -> Place {
        let waiter = Arc::new(Waiter {
            order: (deadline_ms, request_id.to_owned()),
            notify: Notify::new(),
            woken: AtomicBool::new(false),
        });
        if let Ok(mut queues) = self.queues.lock() {
            let queue = queues.entry(key.to_owned()).or_default();
            let at = queue.partition_point(|w| w.order <= waiter.order);
            queue.insert(at, Arc::clone(&waiter));
        }
        Place {
            room: Arc::clone(self),
            key: key.to_owned(),
            waiter,
            admitted: false,
        }
    }

    /// A lease of `key` was released on this replica: the first waiter may take it.
    pub fn wake_first(&self, key: &str) {
        if let Ok(queues) = self.queues.lock()
            && let Some(first) = queues.get(key).and_then(|q| q.first())
        {
            first.wake();
        }
    }

    /// Requests waiting on this replica, all keys.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.queues
            .lock()
            .map(|q| q.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}

impl Waiter {
    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        // A permit is stored if the waiter is between attempts, so no wake-up is lost.
        self.notify.notify_one();
    }
}

/// A request's place in the room; leaving (drop) hands an unused wake-up on.
#[derive(Debug)]
pub struct Place {
    room: Arc<Room>,
    key: String,
    waiter: Arc<Waiter>,
    admitted: bool,
}

impl Place {
    /// Resolves when a release wakes this request (immediately if one came since the last
    /// [`Place::attempting`]).
    pub async fn woken(&self) {
        self.waiter.notify.notified().await;
    }

    /// An attempt starts: it uses up any wake-up so far.
    pub fn attempting(&self) {
        self.waiter.woken.store(false, Ordering::Release);
    }

    /// Whether no request of this replica is ahead of this one.
    pub fn is_first(&self) -> bool {
        self.room.queues.lock().is_ok_and(|queues| {
            queues
                .get(&self.key)
                .and_then(|q| q.first())
                .is_some_and(|first| Arc::ptr_eq(first, &self.waiter))
        })
    }

    /// Admitted: the next waiter is woken only if slots are still free (leaving without a slot
    /// wakes it anyway, so that it takes over the re-checks).
    pub fn admitted(&mut self, free_after: u64) {
        self.admitted = true;
        if free_after > 0 {
            self.waiter.woken.store(true, Ordering::Release);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let Ok(mut queues) = self.room.queues.lock() else {
            return;
        };
        let Some(queue) = queues.get_mut(&self.key) else {
            return;
        };
        let Some(at) = queue.iter().position(|w| Arc::ptr_eq(w, &self.waiter)) else {
            return;
        };
        queue.remove(at);
        // The new first waiter takes over the re-checks, and an unused wake-up is not lost.
        if ((at == 0 && !self.admitted) || self.waiter.woken.load(Ordering::Acquire))
            && let Some(first) = queue.first()
        {
            first.wake();
        }
        if queue.is_empty() {
            queues.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn is_woken(place: &Place) -> bool {
        tokio::time::timeout(Duration::from_millis(20), place.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_release_wakes_the_earliest_waiter_not_the_first_to_join() {
        let room = Arc::new(Room::default());
        let late = room.join("cc", 2_000, "b");
        let early = room.join("cc", 1_000, "a");
        room.wake_first("cc");
        assert!(is_woken(&early).await);
        assert!(!is_woken(&late).await);
        assert!(early.is_first() && !late.is_first());
    }

    #[tokio::test]
    async fn leaving_with_an_unused_wake_up_hands_it_to_the_next_waiter() {
        let room = Arc::new(Room::default());
        let mut first = room.join("cc", 1_000, "a");
        let second = room.join("cc", 1_000, "b");
        first.attempting();
        first.admitted(1);
        drop(first);
        assert!(is_woken(&second).await);
        drop(second);
        assert_eq!(room.len(), 0, "no queue outlives its waiters");
    }

    #[tokio::test]
    async fn a_waiter_admitted_into_the_last_free_slot_wakes_nobody() {
        let room = Arc::new(Room::default());
        let mut first = room.join("cc", 1_000, "a");
        let second = room.join("cc", 1_000, "b");
        first.attempting();
        first.admitted(0);
        drop(first);
        assert!(!is_woken(&second).await);
        assert!(second.is_first());
    }

    #[tokio::test]
    async fn keys_wait_apart() {
        let room = Arc::new(Room::default());
        let a = room.join("cc:a", 1_000, "a");
        let b = room.join("cc:b", 1_000, "b");
        room.wake_first("cc:b");
        assert!(!is_woken(&a).await);
        assert!(is_woken(&b).await);
    }
}
