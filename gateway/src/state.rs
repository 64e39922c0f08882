//! The state every handler shares. Axum clones it for each request, so it is one `Arc`: a
//! single reference count to bump instead of one per handle (each an atomic that both cores
//! contend for under load).

use std::ops::Deref;
use std::sync::Arc;

use crate::accounts::Accounts;
use crate::auth::KeyCache;
use crate::config::Config;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::store::Store;

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub config: Arc<Config>,
    pub http: crate::relay::UpstreamClient,
    pub store: Store,
    pub keys: Arc<KeyCache>,
    pub accounts: Arc<Accounts>,
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<Limiter>,
    /// Turns true when a graceful shutdown begins. Upgraded sockets are not tracked by the
    /// server's drain, so they watch this to close once their response in flight is done.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
