//! Key and account records as they are kept in Redis, shared by every gateway replica.
//!
//! Layout (all under the deployment's hash tag, see `shared::keyspace`):
//! - `{t}:key:<id>` — JSON [`KeyRecord`]; `{t}:keyhash:<sha256 of secret>` — the key's id;
//!   `{t}:keys` — set of key ids.
//! - `{t}:account:<id>` — JSON [`AccountRecord`]; `{t}:accounts` — set of account ids.
//!
//! These records are a storage format read by other replicas, which is why they, unlike other
//! internal types, derive serde.

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shared::Keyspace;

use crate::error::GatewayError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limit {
    pub metric: String,
    pub max: f64,
    pub window_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    conn: ConnectionManager,
    keyspace: Keyspace,
}

impl Store {
    pub fn new(conn: ConnectionManager, keyspace: Keyspace) -> Self {
        Self { conn, keyspace }
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn key_key(&self, id: &str) -> String {
        self.keyspace.key(&format!("key:{id}"))
    }

    fn hash_key(&self, hash: &str) -> String {
        self.keyspace.key(&format!("keyhash:{hash}"))
    }

    fn account_key(&self, id: &str) -> String {
        self.keyspace.key(&format!("account:{id}"))
    }

    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, GatewayError> {
        let mut conn = self.conn.clone();
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
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .set(self.key_key(&record.id), to_json(record))
            .set(self.hash_key(&record.hash), &record.id)
            .sadd(self.keyspace.key("keys"), &record.id)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn account(&self, id: &str) -> Result<Option<AccountRecord>, GatewayError> {
        self.get_json(&self.account_key(id)).await
    }

    pub async fn accounts(&self) -> Result<Vec<AccountRecord>, GatewayError> {
        self.list("accounts", |s, id| s.account_key(id)).await
    }

    pub async fn put_account(&self, record: &AccountRecord) -> Result<(), GatewayError> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .set(self.account_key(&record.id), to_json(record))
            .sadd(self.keyspace.key("accounts"), &record.id)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn delete_account(&self, id: &str) -> Result<bool, GatewayError> {
        let mut conn = self.conn.clone();
        let (deleted,): (u32,) = redis::pipe()
            .atomic()
            .del(self.account_key(id))
            .srem(self.keyspace.key("accounts"), id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(deleted > 0)
    }

    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, GatewayError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(key).await?;
        Ok(raw.and_then(|raw| parse_json(key, &raw)))
    }

    /// Every record of a kind, in id order, with one SMEMBERS and one MGET.
    async fn list<T: DeserializeOwned>(
        &self,
        set: &str,
        key_of: impl Fn(&Self, &str) -> String,
    ) -> Result<Vec<T>, GatewayError> {
        let mut conn = self.conn.clone();
        let mut ids: Vec<String> = conn.smembers(self.keyspace.key(set)).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let keys: Vec<String> = ids.iter().map(|id| key_of(self, id)).collect();
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
