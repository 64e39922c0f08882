//! The state every handler shares: cheap handles, cloned per request.

use std::sync::Arc;

use crate::accounts::Accounts;
use crate::auth::KeyCache;
use crate::config::Config;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::store::Store;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub http: reqwest::Client,
    pub store: Store,
    pub keys: Arc<KeyCache>,
    pub accounts: Arc<Accounts>,
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<Limiter>,
}
