//! What every aggregator of a deployment must agree on, kept in Redis: the pricing in force and
//! the replay in progress, if any.
//!
//! | key | holds |
//! |---|---|
//! | `{t}:ctl` | hash: `pv` pricing version, `rid` running replay (absent or 0: none), `rfrom`/`rto` its day-aligned `ts` range, `rend` the last stream entry at its registration, `rseq` last replay id, `dw` the deployment's dedupe window (seconds) |
//! | `{t}:pricing` | the LiteLLM JSON in force (absent: each aggregator's own, the bundled snapshot unless `--pricing`) |
//! | `{t}:rp<rid>:pricing` | the JSON a running replay prices with (absent: the one in force) |
//! | `{t}:rp<rid>:lease` | exists while the replay process is alive (TTL, renewed) |
//!
//! Every commit carries the token (`pv:rid`) of the state it priced with, and the commit script
//! refuses a stale one. So a pricing change or a replay starting or switching takes effect
//! between two batches of every consumer, never inside one, and a batch is never priced with
//! prices that are no longer in force.

use std::sync::Arc;

use redis::{AsyncCommands, ErrorKind, RedisError, RedisResult};
use shared::Keyspace;
use shared::RedisConn;

use crate::pricing::Pricing;

pub const CTL: &str = "ctl";
/// The `ctl` field holding the deployment's dedupe window: every consumer and every replay must
/// number arrival slots alike, or two copies of an id would look in different seen-sets.
const DEDUPE_WINDOW: &str = "dw";
pub const PRICING: &str = "pricing";
/// A replay's lease lives this long unless renewed.
pub const LEASE_MS: u64 = 30_000;

/// Key names (below the keyspace prefix) of replay `rid`'s shadow copy start with this.
pub fn shadow_prefix(rid: i64) -> String {
    format!("rp{rid}:")
}

pub fn lease_key(rid: i64) -> String {
    format!("{}lease", shadow_prefix(rid))
}

pub fn replay_pricing_key(rid: i64) -> String {
    format!("{}pricing", shadow_prefix(rid))
}

/// A replay in progress, as consumers must honour it: events whose `ts` lies in
/// `[from_ms, to_ms)` are also applied, priced with `pricing`, to the shadow copy.
#[derive(Clone)]
pub struct ReplayTarget {
    pub rid: i64,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Arrival (ms) of the last stream entry at registration: the replay reads up to it, so
    /// what live commits record in the copy's seen-sets for arrivals up to there must outlive
    /// the rebuild, however long it takes.
    pub end_ms: i64,
    pub pricing: Arc<Pricing>,
}

impl ReplayTarget {
    pub fn covers(&self, ts_ms: i64) -> bool {
        (self.from_ms..self.to_ms).contains(&ts_ms)
    }
}

/// The deployment-wide state one batch is priced and committed under.
#[derive(Clone)]
pub struct Snapshot {
    pub pricing_version: i64,
    pub pricing: Arc<Pricing>,
    pub replay: Option<ReplayTarget>,
}

impl Snapshot {
    /// What the commit script compares with the state it finds.
    pub fn token(&self) -> String {
        token(
            self.pricing_version,
            self.replay.as_ref().map_or(0, |r| r.rid),
        )
    }
}

pub fn token(pricing_version: i64, rid: i64) -> String {
    format!("{pricing_version}:{rid}")
}

/// `pv`, `rid`, `rfrom`, `rto`, `rend` of `{t}:ctl`.
type CtlFields = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

/// Loads [`Snapshot`]s, parsing a price table only when its version changed.
pub struct Control {
    keyspace: Keyspace,
    /// Used while the deployment has published none.
    local: Arc<Pricing>,
    current: Option<(i64, Arc<Pricing>)>,
    replay: Option<(i64, Arc<Pricing>)>,
}

impl Control {
    pub fn new(keyspace: Keyspace, local: Arc<Pricing>) -> Self {
        Self {
            keyspace,
            local,
            current: None,
            replay: None,
        }
    }

    pub async fn load(&mut self, conn: &mut RedisConn) -> RedisResult<Snapshot> {
        let ctl = self.keyspace.key(CTL);
        let (pv, rid, from, to, end): CtlFields = redis::cmd("HMGET")
            .arg(&ctl)
            .arg(&["pv", "rid", "rfrom", "rto", "rend"])
            .query_async(conn)
            .await?;
        let pv = pv.unwrap_or(0);
        let pricing = match &self.current {
            Some((version, pricing)) if *version == pv => Arc::clone(pricing),
            _ => {
                let text: Option<String> = conn.get(self.keyspace.key(PRICING)).await?;
                let pricing = match text {
                    Some(text) => Arc::new(parse(&text)?),
                    None => Arc::clone(&self.local),
                };
                self.current = Some((pv, Arc::clone(&pricing)));
                pricing
            }
        };
        let replay = match (rid, from, to) {
            (Some(rid), Some(from_ms), Some(to_ms)) if rid > 0 => {
                let pricing = match &self.replay {
                    Some((cached, p)) if *cached == rid => Arc::clone(p),
                    _ => {
                        let text: Option<String> = conn
                            .get(self.keyspace.key(&replay_pricing_key(rid)))
                            .await?;
                        let p = match text {
                            Some(text) => Arc::new(parse(&text)?),
                            None => Arc::clone(&pricing),
                        };
                        self.replay = Some((rid, Arc::clone(&p)));
                        p
                    }
                };
                Some(ReplayTarget {
                    rid,
                    from_ms,
                    to_ms,
                    // A replay registered by an older version recorded no end: keep its
                    // copy's seen-sets for every arrival up to now.
                    end_ms: end
                        .as_deref()
                        .and_then(|id| id.split_once('-'))
                        .and_then(|(ms, _)| ms.parse().ok())
                        .unwrap_or(i64::MAX),
                    pricing,
                })
            }
            _ => None,
        };
        Ok(Snapshot {
            pricing_version: pv,
            pricing,
            replay,
        })
    }
}

/// The deployment's dedupe window in seconds: the one recorded in `ctl`, which `configured`
/// becomes if none is recorded yet.
pub async fn dedupe_window(
    conn: &mut RedisConn,
    keyspace: &Keyspace,
    configured: i64,
) -> RedisResult<i64> {
    let ctl = keyspace.key(CTL);
    let (recorded,): (i64,) = redis::pipe()
        .atomic()
        .hset_nx(&ctl, DEDUPE_WINDOW, configured)
        .ignore()
        .hget(&ctl, DEDUPE_WINDOW)
        .query_async(conn)
        .await?;
    Ok(recorded)
}

/// Makes `text` (a LiteLLM price file, already validated) the pricing every aggregator of the
/// deployment applies from its next batch on, unless it is in force already.
pub async fn publish_pricing(
    conn: &mut RedisConn,
    keyspace: &Keyspace,
    pricing: &Pricing,
    text: &str,
) -> RedisResult<bool> {
    let ctl = keyspace.key(CTL);
    let fingerprint = pricing.fingerprint().to_string();
    let current: Option<String> = conn.hget(&ctl, "pfp").await?;
    if current.as_deref() == Some(fingerprint.as_str()) {
        return Ok(false);
    }
    redis::pipe()
        .atomic()
        .set(keyspace.key(PRICING), text)
        .ignore()
        .hset(&ctl, "pfp", &fingerprint)
        .ignore()
        .hincr(&ctl, "pv", 1)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(true)
}

fn parse(text: &str) -> RedisResult<Pricing> {
    Pricing::from_json(text).map_err(|e| {
        RedisError::from((
            ErrorKind::Parse,
            "the pricing stored in Redis does not load",
            e.to_string(),
        ))
    })
}
