//! Client keys: minting secrets, and finding the key record behind a presented secret.
//!
//! Secrets carry 256 random bits, so a single fast SHA-256 is a safe at-rest form (slow password
//! hashes defend low-entropy secrets). Records are cached per replica for `cache_ttl`, which
//! bounds how long a PATCH or DELETE made on another replica takes to apply here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::store::{KeyRecord, Store};

/// Recognisable prefix, so leaked keys are easy to grep for and to report.
pub const SECRET_PREFIX: &str = "mk-";
/// While Redis is unreachable, a key seen this recently keeps working (no lost usage, ARCHITECTURE.md: the
/// gateway keeps relaying for keys it has seen recently). A key disabled during an outage is
/// therefore honoured up to this long after it was last read.
const STALE_GRACE: Duration = Duration::from_secs(15 * 60);
/// Cache entries beyond this are dropped wholesale rather than tracked for LRU: an attacker
/// cycling random keys cannot grow memory without bound.
const MAX_CACHED: usize = 100_000;

/// A new random secret: the prefix and 64 hex digits (256 bits).
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{SECRET_PREFIX}{}", hex(&bytes)))
}

pub fn hash_secret(secret: &str) -> String {
    hex(&digest(secret))
}

/// A secret's SHA-256, the key cache's key: hex-encoding it (and allocating the string) is
/// left to the cache misses that look the key up in Redis.
type SecretDigest = [u8; 32];

fn digest(secret: &str) -> SecretDigest {
    Sha256::digest(secret.as_bytes()).into()
}

/// The digest a hex hash (a key record's `hash`) encodes; `None` if it is not one.
fn parse_hex(hash: &str) -> Option<SecretDigest> {
    let nibble = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let bytes = hash.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Lowercase hex by table lookup: `write!("{b:02x}")` per byte went through the formatting
/// machinery 32 times, about as many instructions as the SHA-256 itself (callgrind), when this
/// still ran on every request.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// The secret a client presented: `x-api-key`, else `Authorization: Bearer`.
pub fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim());
    }
    let auth = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A looked-up key (None: no such key, cached too) and when it was fetched.
type CacheEntry = (Option<Arc<KeyRecord>>, Instant);

pub struct KeyCache {
    store: Store,
    ttl: Duration,
    entries: Mutex<HashMap<SecretDigest, CacheEntry>>,
    metrics: Arc<Metrics>,
}

impl KeyCache {
    pub fn new(store: Store, ttl: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            ttl,
            entries: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The active key record for a presented secret.
    pub async fn authenticate(
        &self,
        secret: Option<&str>,
        now_ms: i64,
    ) -> Result<Arc<KeyRecord>, GatewayError> {
        let secret = secret
            .filter(|s| !s.is_empty())
            .ok_or(GatewayError::MissingKey)?;
        let digest = digest(secret);
        let record = match self.cached(&digest, self.ttl) {
            Some(hit) => hit,
            None => {
                let hash = hex(&digest);
                match self.store.key_by_hash(&hash).await {
                    Ok(fetched) => {
                        // The lookup was by hash already; comparing in constant time as well
                        // keeps timing independent of how much of a forged hash matched, should
                        // lookups ever change. Done here, so a cached record is known to match.
                        let fetched = fetched
                            .filter(|record| {
                                bool::from(record.hash.as_bytes().ct_eq(hash.as_bytes()))
                            })
                            .map(Arc::new);
                        self.insert(digest, fetched.clone());
                        fetched
                    }
                    Err(e) => match self.cached(&digest, STALE_GRACE) {
                        Some(stale) => {
                            self.metrics.auth_served_stale.inc();
                            stale
                        }
                        None => return Err(e),
                    },
                }
            }
        };
        let record = record.ok_or(GatewayError::InvalidKey)?;
        if record.disabled {
            return Err(GatewayError::InvalidKey);
        }
        if record.expires_at_ms.is_some_and(|at| at <= now_ms) {
            return Err(GatewayError::ExpiredKey);
        }
        Ok(record)
    }

    /// Forgets a key at once on this replica (after PATCH or DELETE).
    pub fn invalidate(&self, hash: &str) {
        if let Some(digest) = parse_hex(hash)
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.remove(&digest);
        }
    }

    fn cached(&self, digest: &SecretDigest, max_age: Duration) -> Option<Option<Arc<KeyRecord>>> {
        let entries = self.entries.lock().ok()?;
        let (record, fetched) = entries.get(digest)?;
        (fetched.elapsed() < max_age).then(|| record.clone())
    }

    fn insert(&self, digest: SecretDigest, record: Option<Arc<KeyRecord>>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_CACHED {
                entries.clear();
            }
            entries.insert(digest, (record, Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn secrets_are_prefixed_and_carry_256_bits() {
        let secret = new_secret().unwrap();
        assert!(secret.starts_with(SECRET_PREFIX));
        assert_eq!(secret.len(), SECRET_PREFIX.len() + 64);
        assert_ne!(secret, new_secret().unwrap());
    }

    #[test]
    fn a_hex_hash_parses_back_to_its_digest() {
        let digest = digest("abc");
        assert_eq!(parse_hex(&hex(&digest)), Some(digest));
        assert_eq!(parse_hex("ba78"), None);
        assert_eq!(parse_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn the_hash_is_hex_sha256() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[track_caller]
    fn check(name: &'static str, value: &'static str, want: Option<&str>) {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        assert_eq!(presented_secret(&headers), want);
    }

    #[test]
    fn the_secret_comes_from_either_header() {
        check("x-api-key", "mk-1", Some("mk-1"));
        check("authorization", "Bearer mk-2", Some("mk-2"));
        check("authorization", "bearer  mk-3", Some("mk-3"));
        check("authorization", "Basic abc", None);
    }
}
