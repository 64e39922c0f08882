//! Key and account records as they are kept in Redis, shared by every gateway replica.
//!
//! Layout (all under the deployment's hash tag, see `shared::keyspace`):
//! - `{t}:key:<id>` — JSON [`KeyRecord`]; `{t}:keyhash:<sha256 of secret>` — the key's id;
//!   `{t}:keys` — set of key ids.
//! - `{t}:account:<id>` — JSON [`AccountRecord`]; `{t}:accounts` — set of account ids;
//!   `{t}:cooldown:<id>` — Unix ms until which the account rests after an upstream 429/5xx.
//!
//! These records are a storage format read by other replicas, which is why they, unlike other
//! internal types, derive serde.

use redis::AsyncCommands;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shared::Keyspace;
use shared::RedisConn;
use std::sync::Arc;

use crate::metrics::Metrics;

use crate::error::GatewayError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limit {
    pub metric: String,
    pub max: f64,
    pub window_secs: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the secret. The secret itself is never stored.
    pub hash: String,
    /// First characters of the secret, so people can tell their keys apart.
    pub prefix: String,
    #[serde(default)]
    pub limits: Vec<Limit>,
    pub budget_usd: Option<f64>,
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub concurrency_wait_ms: u64,
    pub models: Option<Vec<String>>,
    pub expires_at_ms: Option<i64>,
    #[serde(default)]
    pub disabled: bool,
    /// Set by `DELETE`: the record stays (its id may be in stored events) but the key is gone,
    /// so the stats API no longer names it.
    #[serde(default)]
    pub deleted: bool,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub id: String,
    pub name: String,
    pub provider: String,
    /// API root without a trailing slash or `/v1`.
    pub base_url: String,
    pub api_key: String,
    #[serde(default)]
    pub priority: i64,
    pub max_concurrency: Option<u32>,
    pub models: Option<Vec<String>>,
    pub created_at_ms: i64,
}

#[derive(Clone)]
pub struct Store {
    conn: RedisConn,
    keyspace: Keyspace,
    metrics: Arc<Metrics>,
    /// `METER_MIN_REPLICAS`: an admin write is confirmed only once this many replicas have it.
    min_replicas: u32,
}

/// How long an admin write waits for its replicas before it is reported as not confirmed.
const REPLICA_WAIT_MS: u64 = 5_000;

impl Store {
    pub fn new(
        conn: RedisConn,
        keyspace: Keyspace,
        metrics: Arc<Metrics>,
        min_replicas: u32,
    ) -> Self {
        Self {
            conn,
            keyspace,
            metrics,
            min_replicas,
        }
    }

    /// Waits until `min_replicas` replicas have this connection's writes to the master that
    /// holds the deployment's records. Without it, a key the admin API has just confirmed
    /// could vanish with a master that dies before replicating it (the promoted replica would
    /// answer that the key does not exist).
    async fn replicated(&self, conn: &mut RedisConn) -> Result<(), GatewayError> {
        if self.min_replicas == 0 {
            return Ok(());
        }
        let wait = redis::cmd("WAIT")
            .arg(self.min_replicas)
            .arg(REPLICA_WAIT_MS)
            .clone();
        let acknowledged: u32 = conn.query_at(&self.keyspace.key("keys"), &wait).await?;
        if acknowledged < self.min_replicas {
            return Err(GatewayError::Store(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the write is not on enough replicas",
                format!(
                    "{acknowledged} of {} replica(s) acknowledged it within {REPLICA_WAIT_MS} ms",
                    self.min_replicas
                ),
            ))));
        }
        Ok(())
    }

    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// A connection for one round trip, counted for `/metrics`.
    fn conn(&self) -> RedisConn {
        self.metrics.redis_round_trips.inc();
        self.conn.clone()
    }

    fn key_key(&self, id: &str) -> String {
        self.keyspace.key_record(id)
    }

    fn hash_key(&self, hash: &str) -> String {
        self.keyspace.key(&format!("keyhash:{hash}"))
    }

    fn account_key(&self, id: &str) -> String {
        self.keyspace.key(&format!("account:{id}"))
    }

    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, GatewayError> {
        let mut conn = self.conn();
        let id: Option<String> = conn.get(self.hash_key(hash)).await?;
        match id {
            Some(id) => self.key(&id).await,
            None => Ok(None),
        }
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyRecord>, GatewayError> {
        self.get_json(&self.key_key(id)).await
    }

    pub async fn keys(&self) -> Result<Vec<KeyRecord>, GatewayError> {
        self.list("keys", |s, id| s.key_key(id)).await
    }

    /// Writes a new or changed key. All three keys share the hash tag, so one MULTI covers them.
    pub async fn put_key(&self, record: &KeyRecord) -> Result<(), GatewayError> {
        let mut conn = self.conn();
        redis::pipe()
            .atomic()
            .set(self.key_key(&record.id), to_json(record))
            .set(self.hash_key(&record.hash), &record.id)
            .sadd(self.keyspace.key("keys"), &record.id)
            .query_async::<()>(&mut conn)
            .await?;
        self.replicated(&mut conn).await
    }

    pub async fn account(&self, id: &str) -> Result<Option<AccountRecord>, GatewayError> {
        self.get_json(&self.account_key(id)).await
    }

    pub async fn accounts(&self) -> Result<Vec<AccountRecord>, GatewayError> {
        self.list("accounts", |s, id| s.account_key(id)).await
    }

    pub async fn put_account(&self, record: &AccountRecord) -> Result<(), GatewayError> {
        let mut conn = self.conn();
        redis::pipe()
            .atomic()
            .set(self.account_key(&record.id), to_json(record))
            .sadd(self.keyspace.key("accounts"), &record.id)
            .query_async::<()>(&mut conn)
            .await?;
        self.replicated(&mut conn).await
    }

    pub async fn delete_account(&self, id: &str) -> Result<bool, GatewayError> {
        let mut conn = self.conn();
        let (deleted,): (u32,) = redis::pipe()
            .atomic()
            .del(self.account_key(id))
            .srem(self.keyspace.key("accounts"), id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        self.replicated(&mut conn).await?;
        Ok(deleted > 0)
    }

    fn cooldown_key(&self, id: &str) -> String {
        self.keyspace.key(&format!("cooldown:{id}"))
    }

    /// Records that an account should not be used until `until_ms`, for every replica. The key
    /// expires by itself when the cool-down ends.
    pub async fn set_cooldown(
        &self,
        id: &str,
        until_ms: i64,
        ttl: std::time::Duration,
    ) -> Result<(), GatewayError> {
        let mut conn = self.conn();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let _: () = redis::cmd("SET")
            .arg(self.cooldown_key(id))
            .arg(until_ms)
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Cool-down ends (Unix ms) of the given accounts, `None` where none is active.
    pub async fn cooldowns(&self, ids: &[&str]) -> Result<Vec<Option<i64>>, GatewayError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        let keys: Vec<String> = ids.iter().map(|id| self.cooldown_key(id)).collect();
        Ok(redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?)
    }

    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, GatewayError> {
        let mut conn = self.conn();
        let raw: Option<String> = conn.get(key).await?;
        Ok(raw.and_then(|raw| parse_json(key, &raw)))
    }

    /// Every record of a kind, in id order, with one SMEMBERS and one MGET.
    async fn list<T: DeserializeOwned>(
        &self,
        set: &str,
        key_of: impl Fn(&Self, &str) -> String,
    ) -> Result<Vec<T>, GatewayError> {
        let mut conn = self.conn();
        let mut ids: Vec<String> = conn.smembers(self.keyspace.key(set)).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let keys: Vec<String> = ids.iter().map(|id| key_of(self, id)).collect();
        self.metrics.redis_round_trips.inc();
        let raws: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(keys
            .iter()
            .zip(raws)
            .filter_map(|(key, raw)| raw.and_then(|raw| parse_json(key, &raw)))
            .collect())
    }
}

fn to_json<T: Serialize>(record: &T) -> String {
    // Records are plain structs of strings and numbers; serialising them cannot fail.
    serde_json::to_string(record).unwrap_or_default()
}

/// A record that no longer parses (written by an incompatible version) is skipped and logged
/// rather than failing every request.
fn parse_json<T: DeserializeOwned>(key: &str, raw: &str) -> Option<T> {
    match serde_json::from_str(raw) {
        Ok(record) => Some(record),
        Err(e) => {
            tracing::error!(%key, error = %e, "unreadable record in Redis");
            None
        }
    }
}
