//! The upstream accounts this replica may relay to, and the choice of one per request.
//!
//! The list and the accounts' cool-downs live in Redis (so every replica sees the same) and are
//! re-read in the background every `cache_ttl`; requests pick from the in-memory copy and never
//! wait on Redis. In-flight counts are per replica and survive refreshes, keyed by account id.
//!
//! Choice: accounts of the route's provider that serve the model, resting ones last; lowest
//! `priority` first; then, for a request that belongs to a session (conversation), the account
//! that rendezvous hashing assigns to that session, so that every replica sends a conversation
//! to the same account and the provider's prompt cache keeps hitting, without any shared
//! state; for other requests, the account with the fewest requests in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderValue, Uri};
use tokio::sync::watch;

use crate::error::GatewayError;
use crate::provider::{Endpoint, Provider};
use crate::store::{AccountRecord, Store};

#[derive(Debug)]
pub struct Account {
    pub record: AccountRecord,
    pub provider: Provider,
    /// The upstream URL of each endpoint, parsed once here rather than on every request.
    urls: [Option<Uri>; Endpoint::ALL.len()],
    /// The `Host` header of every upstream request (`host[:port]`, as in the URLs), made once:
    /// the HTTP client would otherwise format it per request.
    host: Option<HeaderValue>,
    in_flight: Arc<AtomicU32>,
    /// Unix ms until which the account rests (0 = not resting).
    cooling_until: Arc<AtomicI64>,
}

impl Account {
    fn new(
        record: AccountRecord,
        provider: Provider,
        in_flight: Arc<AtomicU32>,
        cooling_until: Arc<AtomicI64>,
    ) -> Self {
        let urls = Endpoint::ALL.map(|endpoint| {
            // Through `url` first: it normalises what `Uri` would take as it is or refuse
            // (international host names, default ports, dot segments).
            let url = url::Url::parse(&format!("{}{}", record.base_url, endpoint.upstream_path()));
            Uri::try_from(url.ok()?.as_str()).ok()
        });
        let host = urls
            .iter()
            .flatten()
            .find_map(|url| HeaderValue::from_str(url.authority()?.as_str()).ok());
        Self {
            record,
            provider,
            urls,
            host,
            in_flight,
            cooling_until,
        }
    }

    /// Where `endpoint` is on this account's upstream; `None` for a base URL that does not
    /// parse (the admin API refuses those, so only a hand-edited record can have one).
    pub fn url(&self, endpoint: Endpoint) -> Option<&Uri> {
        self.urls[endpoint as usize].as_ref()
    }

    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// `model` `None`: any model (a Responses socket is opened before its first model is known).
    pub fn serves(&self, provider: Provider, model: Option<&str>) -> bool {
        self.provider == provider
            && model.is_none_or(|model| {
                self.record
                    .models
                    .as_ref()
                    .is_none_or(|models| models.iter().any(|m| m == model))
            })
    }

    fn has_capacity(&self) -> bool {
        self.record
            .max_concurrency
            .is_none_or(|max| self.in_flight.load(Ordering::Relaxed) < max)
    }

    pub fn cooling_until(&self, now_ms: i64) -> Option<i64> {
        let until = self.cooling_until.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
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

/// What a request needs from an account.
pub struct Want<'a> {
    pub provider: Provider,
    /// `None`: an account for any model of the provider.
    pub model: Option<&'a str>,
    pub session: Option<&'a str>,
    /// Accounts already tried for this request.
    pub exclude: Option<&'a str>,
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

    /// Re-reads the list and the cool-downs from Redis.
    pub async fn refresh(&self) -> Result<(), GatewayError> {
        let records = self.store.accounts().await?;
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let cooldowns = self.store.cooldowns(&ids).await?;
        let old = self.snapshot();
        let carried: HashMap<&str, &Arc<Account>> =
            old.iter().map(|a| (a.record.id.as_str(), a)).collect();
        let fresh: Vec<Arc<Account>> = records
            .iter()
            .zip(cooldowns)
            .filter_map(|(record, cooldown)| {
                let provider = Provider::parse(&record.provider)?;
                let previous = carried.get(record.id.as_str());
                let in_flight =
                    previous.map_or_else(Default::default, |a| Arc::clone(&a.in_flight));
                let cooling_until =
                    previous.map_or_else(Default::default, |a| Arc::clone(&a.cooling_until));
                // Redis is the shared truth, but a rest this replica just started may not have
                // reached it yet: keep the later of the two.
                cooling_until.fetch_max(cooldown.unwrap_or(0), Ordering::Relaxed);
                Some(Arc::new(Account::new(
                    record.clone(),
                    provider,
                    in_flight,
                    cooling_until,
                )))
            })
            .collect();
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(fresh);
        }
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Account>>> {
        self.current
            .read()
            .map(|c| Arc::clone(&c))
            .unwrap_or_default()
    }

    /// Picks the account for a request and takes one of its in-flight slots.
    pub fn pick(&self, want: &Want<'_>, now_ms: i64) -> Result<Lease, GatewayError> {
        let snapshot = self.snapshot();
        let best = choose(&snapshot, want, now_ms).ok_or_else(|| GatewayError::NoAccount {
            provider: want.provider,
            model: want.model.unwrap_or_default().to_owned(),
        })?;
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            account: Arc::clone(best),
        })
    }

    /// Rests an account after an upstream 429, 529, 5xx or connection failure: at once on this
    /// replica, and on the others through Redis. A failure to tell Redis is logged, not fatal.
    pub async fn cool_down(&self, account: &Account, rest: Duration, now_ms: i64) {
        let until = now_ms + i64::try_from(rest.as_millis()).unwrap_or(i64::MAX / 2);
        account.cooling_until.fetch_max(until, Ordering::Relaxed);
        tracing::warn!(account = %account.record.id, rest_secs = rest.as_secs(), "upstream account cooling down");
        let shared = self.store.set_cooldown(&account.record.id, until, rest);
        match tokio::time::timeout(Duration::from_millis(250), shared).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not share an account cool-down"),
            Err(_) => tracing::warn!("sharing an account cool-down timed out"),
        }
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

/// The pure choice (see the module comment).
fn choose<'a>(
    accounts: &'a [Arc<Account>],
    want: &Want<'_>,
    now_ms: i64,
) -> Option<&'a Arc<Account>> {
    let eligible = || {
        accounts.iter().filter(|a| {
            a.serves(want.provider, want.model)
                && a.has_capacity()
                && want.exclude != Some(a.record.id.as_str())
        })
    };
    // Resting accounts are used only when nothing else can serve.
    let rested = eligible().any(|a| a.cooling_until(now_ms).is_none());
    let candidates = eligible().filter(|a| !rested || a.cooling_until(now_ms).is_none());
    let top = candidates.clone().map(|a| a.record.priority).min()?;
    let tier = candidates.filter(move |a| a.record.priority == top);
    match want.session {
        Some(session) => tier.max_by_key(|a| rendezvous(session, &a.record.id)),
        None => tier.min_by_key(|a| (a.in_flight(), a.cooling_until(now_ms).unwrap_or(0))),
    }
}

/// Highest-random-weight score of a (session, account) pair: stable across replicas and
/// restarts (FNV-1a, not the process-randomised std hasher), so all agree without sharing state.
fn rendezvous(session: &str, account_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in session.bytes().chain([0]).chain(account_id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short inputs; a final avalanche spreads them.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str, priority: i64, in_flight: u32, cooling_until: i64) -> Arc<Account> {
        Arc::new(Account::new(
            AccountRecord {
                id: id.into(),
                name: id.into(),
                provider: "anthropic".into(),
                base_url: "http://x".into(),
                api_key: "k".into(),
                priority,
                max_concurrency: Some(2),
                models: None,
                created_at_ms: 0,
            },
            Provider::Anthropic,
            Arc::new(AtomicU32::new(in_flight)),
            Arc::new(AtomicI64::new(cooling_until)),
        ))
    }

    #[test]
    fn each_endpoints_upstream_url_is_parsed_once_below_the_base_url() {
        let mut a = Arc::try_unwrap(account("a", 0, 0, 0)).unwrap();
        assert_eq!(
            a.url(Endpoint::ChatCompletions)
                .map(Uri::to_string)
                .as_deref(),
            Some("http://x/v1/chat/completions")
        );
        a.record.base_url = "https://gw.example.com/anthropic".into();
        let mut a = Account::new(a.record, a.provider, a.in_flight, a.cooling_until);
        assert_eq!(
            a.url(Endpoint::CountTokens).map(Uri::to_string).as_deref(),
            Some("https://gw.example.com/anthropic/v1/messages/count_tokens")
        );
        assert_eq!(a.host().unwrap(), "gw.example.com");
        a.record.base_url = "http://127.0.0.1:8080".into();
        let mut a = Account::new(a.record, a.provider, a.in_flight, a.cooling_until);
        assert_eq!(a.host().unwrap(), "127.0.0.1:8080");
        a.record.base_url.clear();
        let a = Account::new(a.record, a.provider, a.in_flight, a.cooling_until);
        assert!(a.url(Endpoint::Messages).is_none(), "no scheme, no URL");
    }

    fn want<'a>(session: Option<&'a str>, exclude: Option<&'a str>) -> Want<'a> {
        Want {
            provider: Provider::Anthropic,
            model: Some("m"),
            session,
            exclude,
        }
    }

    #[track_caller]
    fn check(accounts: &[Arc<Account>], want: &Want<'_>, expected: Option<&str>) {
        let got = choose(accounts, want, 1_000).map(|a| a.record.id.as_str());
        assert_eq!(got, expected);
    }

    #[test]
    fn lower_priority_wins_then_fewest_in_flight() {
        let accounts = [
            account("a", 1, 0, 0),
            account("b", 0, 1, 0),
            account("c", 0, 0, 0),
        ];
        check(&accounts, &want(None, None), Some("c"));
    }

    #[test]
    fn full_resting_and_excluded_accounts_are_skipped() {
        let accounts = [
            account("full", 0, 2, 0),
            account("resting", 0, 0, 5_000),
            account("ok", 9, 1, 0),
        ];
        check(&accounts, &want(None, None), Some("ok"));
        check(&accounts, &want(None, Some("ok")), Some("resting"));
        let only_resting = [account("resting", 0, 0, 5_000)];
        check(&only_resting, &want(None, None), Some("resting"));
        let expired_rest = [account("a", 0, 1, 999), account("b", 0, 0, 0)];
        check(&expired_rest, &want(None, None), Some("b"));
    }

    #[test]
    fn a_session_sticks_to_one_account_whatever_the_load() {
        let accounts: Vec<_> = (0..5)
            .map(|i| account(&format!("acct_{i}"), 0, 0, 0))
            .collect();
        let first = choose(&accounts, &want(Some("conv-1"), None), 0)
            .unwrap()
            .record
            .id
            .clone();
        for a in &accounts {
            if a.record.id != first {
                a.in_flight.store(1, Ordering::Relaxed);
            }
        }
        check(&accounts, &want(Some("conv-1"), None), Some(&first));
        // Sessions spread over the accounts.
        let chosen: std::collections::HashSet<String> = (0..50)
            .map(|i| {
                choose(&accounts, &want(Some(&format!("s{i}")), None), 0)
                    .unwrap()
                    .record
                    .id
                    .clone()
            })
            .collect();
        assert!(chosen.len() >= 4, "{chosen:?}");
    }

    #[test]
    fn a_resting_sticky_account_hands_its_session_to_the_next_choice_only() {
        let accounts: Vec<_> = (0..4)
            .map(|i| account(&format!("acct_{i}"), 0, 0, 0))
            .collect();
        let first = choose(&accounts, &want(Some("conv"), None), 0)
            .unwrap()
            .record
            .id
            .clone();
        let other_session = choose(&accounts, &want(Some("other"), None), 0)
            .unwrap()
            .record
            .id
            .clone();
        if let Some(a) = accounts.iter().find(|a| a.record.id == first) {
            a.cooling_until.store(5_000, Ordering::Relaxed);
        }
        let moved = choose(&accounts, &want(Some("conv"), None), 1_000).unwrap();
        assert_ne!(moved.record.id, first);
        if other_session != first {
            check(&accounts, &want(Some("other"), None), Some(&other_session));
        }
    }
}
