//! The upstream accounts this replica may relay to, and the choice of one per request.
//!
//! The list lives in Redis (so every replica sees the same accounts) and is re-read in the
//! background every `cache_ttl`; requests pick from the in-memory copy and never wait on Redis.
//! In-flight counts are per replica and survive refreshes, keyed by account id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::GatewayError;
use crate::provider::Provider;
use crate::store::{AccountRecord, Store};

#[derive(Debug)]
pub struct Account {
    pub record: AccountRecord,
    pub provider: Provider,
    in_flight: Arc<AtomicU32>,
}

impl Account {
    fn serves(&self, provider: Provider, model: &str) -> bool {
        self.provider == provider
            && self
                .record
                .models
                .as_ref()
                .is_none_or(|models| models.iter().any(|m| m == model))
    }

    fn has_capacity(&self) -> bool {
        self.record
            .max_concurrency
            .is_none_or(|max| self.in_flight.load(Ordering::Relaxed) < max)
    }
}

/// Holds one in-flight slot of an account until dropped.
#[derive(Debug)]
pub struct Lease {
    pub account: Arc<Account>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.account.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Accounts {
    store: Store,
    current: RwLock<Arc<Vec<Arc<Account>>>>,
}

impl Accounts {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            current: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// Re-reads the list from Redis.
    pub async fn refresh(&self) -> Result<(), GatewayError> {
        let records = self.store.accounts().await?;
        let old = self.snapshot();
        let counters: HashMap<&str, &Arc<AtomicU32>> = old
            .iter()
            .map(|a| (a.record.id.as_str(), &a.in_flight))
            .collect();
        let fresh: Vec<Arc<Account>> = records
            .into_iter()
            .filter_map(|record| {
                let provider = Provider::parse(&record.provider)?;
                let in_flight = counters
                    .get(record.id.as_str())
                    .map_or_else(Default::default, |c| Arc::clone(c));
                Some(Arc::new(Account {
                    record,
                    provider,
                    in_flight,
                }))
            })
            .collect();
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(fresh);
        }
        Ok(())
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Account>>> {
        self.current
            .read()
            .map(|c| Arc::clone(&c))
            .unwrap_or_default()
    }

    /// Picks the account for a request: lowest priority first, then fewest requests in flight.
    pub fn pick(&self, provider: Provider, model: &str) -> Result<Lease, GatewayError> {
        let snapshot = self.snapshot();
        let best = snapshot
            .iter()
            .filter(|a| a.serves(provider, model) && a.has_capacity())
            .min_by_key(|a| (a.record.priority, a.in_flight.load(Ordering::Relaxed)))
            .ok_or_else(|| GatewayError::NoAccount {
                provider,
                model: model.to_owned(),
            })?;
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            account: Arc::clone(best),
        })
    }

    /// Keeps the list fresh until shutdown.
    pub async fn run_refresher(
        self: Arc<Self>,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "refreshing upstream accounts failed; keeping the last list");
            }
        }
    }
}
