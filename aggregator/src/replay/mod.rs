//! `aggregator replay`: recomputes every derived figure of whole UTC days from the retained
//! stream, with given prices, while live aggregators keep consuming, then switches atomically.
//!
//! 1. **Register** (one script): the replay gets an id `rid` and a lease; `{t}:ctl` names it and
//!    its day-aligned `ts` range `[from, to)`. From their next commit on, live consumers apply
//!    each event of that range twice: to the live figures and, priced with the replay's prices,
//!    to a shadow copy under `{t}:rp<rid>:` that has its own seen-sets (`commit`).
//! 2. **Rebuild**: read the stream from `from` to the last entry at registration. An entry the
//!    group has acknowledged was committed live; the replay applies it to the shadow (its
//!    seen-sets drop it if a live commit after registration got there first). An entry not
//!    acknowledged yet is left to the live consumers, which will apply it to the shadow (before
//!    the switch) or to the switched figures (after). So each event lands in the shadow once.
//! 3. **Switch** (`switch.rs`): commits pause; the shadow's minute, hour and day cells and
//!    spend windows of every day in range replace the live ones in one script; month cells and
//!    lifetime spend, which also hold days outside the range, change by the difference between
//!    the live and the shadow day cells; the replay's prices become the deployment's. Then the
//!    shadow's leftovers are deleted.
//!
//! A replay whose process dies loses its lease; the next live commit abandons it and figures are
//! untouched. Keys the scripts derive from the prefix share its hash tag, so they sit in the same
//! cluster slot as the declared ones.

pub(crate) mod control;
pub(crate) mod switch;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use redis::streams::{StreamInfoGroupsReply, StreamPendingCountReply};
use redis::{AsyncCommands, Script, Value};
use shared::RedisConn;
use shared::{Keyspace, UsageEvent};

use crate::Config;
use crate::ingest::commit::{
    self, Acks, Batch, CommitError, Committer, Outcome, Replies, Seen, ShadowSeen, Staged,
};
use crate::ingest::groups;
use crate::ingest::stream::{Entry, READ_CHUNK, into_string, take_entries, usage_of};
use crate::pricing::{Cost, Pricing, PricingError};
use crate::store::rollup::{DAY_MS, HOUR_MS};
use crate::store::stats::Delta;
use control::{Control, LEASE_MS};

/// `aggregator replay`; Redis, stream, group and dedupe window come from the aggregator's own
/// configuration (flags before the subcommand, environment, `--config`).
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// First day to rebuild: a stream id, RFC 3339 time or Unix ms, aligned down to a UTC day.
    /// Default: the first day the retained stream holds whole.
    #[arg(long)]
    pub from: Option<String>,
    /// End of the rebuilt range (exclusive), aligned up to a UTC day. Default: open.
    #[arg(long)]
    pub to: Option<String>,
    /// LiteLLM-format price file to re-price with; it becomes the deployment's pricing. Default:
    /// the pricing in force.
    #[arg(long = "pricing")]
    pub pricing: Option<PathBuf>,
    /// Stream entries per commit to the shadow. Larger batches share more cells (faster), but
    /// Redis serves nothing else while one commits: in `aggbench` a commit took 41–50 ms at
    /// 20,000 and 29–31 ms at 10,000, and another client's `PING` waited up to 69–77 ms (p99)
    /// against 45–48 ms (BENCHMARKS.md).
    #[arg(long, default_value_t = 20_000)]
    pub batch_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("invalid --{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error(transparent)]
    Pricing(#[from] PricingError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    EvictingRedis(#[from] shared::redis_policy::EvictingRedis),
    #[error(transparent)]
    Deployment(#[from] shared::deployment::DeploymentError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("replay {0} is already running")]
    Busy(i64),
    #[error("events from {0} on were trimmed from the stream; replay from the next day or later")]
    Trimmed(String),
    #[error("the replay was abandoned (its lease expired or another replay replaced it)")]
    Abandoned,
}

/// Per model: cost of the rebuilt days before and after.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CostChange {
    pub before: Cost,
    pub after: Cost,
}

#[derive(Debug)]
pub struct Summary {
    pub rid: i64,
    pub from_ms: i64,
    pub to_ms: i64,
    pub entries_read: u64,
    pub events_applied: u64,
    pub left_to_live: u64,
    pub duplicates: u64,
    pub days: usize,
    pub elapsed: Duration,
    /// How long the switch script held Redis (plus one round trip).
    pub switch_time: Duration,
    pub models: BTreeMap<String, CostChange>,
}

impl Summary {
    /// This partition's summary followed by `next`'s: the counts and changes of both.
    fn and(mut self, next: Summary) -> Summary {
        self.entries_read += next.entries_read;
        self.events_applied += next.events_applied;
        self.left_to_live += next.left_to_live;
        self.duplicates += next.duplicates;
        self.days = self.days.max(next.days);
        self.switch_time += next.switch_time;
        self.rid = self.rid.max(next.rid);
        for (model, change) in next.models {
            let sum = self.models.entry(model).or_default();
            sum.before += change.before;
            sum.after += change.after;
        }
        self
    }

    pub fn total(&self) -> CostChange {
        self.models
            .values()
            .fold(CostChange::default(), |mut sum, c| {
                sum.before += c.before;
                sum.after += c.after;
                sum
            })
    }

    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            out,
            "replay {} done: {} events applied from {} entries in {:.2} s ({:.0} events/s); \
             {} days rebuilt from {} to {} (switch {:.1} ms); {} left to the live consumers, \
             {} duplicates",
            self.rid,
            self.events_applied,
            self.entries_read,
            secs,
            self.events_applied as f64 / secs.max(1e-9),
            self.days,
            from_label(self.from_ms),
            if self.to_ms == i64::MAX {
                "open".into()
            } else {
                rfc3339(self.to_ms)
            },
            self.switch_time.as_secs_f64() * 1000.0,
            self.left_to_live,
            self.duplicates,
        )?;
        let total = self.total();
        writeln!(
            out,
            "total cost of those days: {} USD -> {} USD",
            total.before, total.after
        )?;
        let width = self
            .models
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            out,
            "{:width$}  {:>24}  {:>24}  {:>24}",
            "model", "before_usd", "after_usd", "difference_usd"
        )?;
        for (model, c) in &self.models {
            writeln!(
                out,
                "{model:width$}  {:>24}  {:>24}  {:>24}",
                c.before.to_string(),
                c.after.to_string(),
                (c.after - c.before).to_string()
            )?;
        }
        Ok(())
    }
}

/// The start of the rebuilt range: without `--from` on a stream never trimmed it is 0, which
/// reads as a 1970 date although the rebuild starts at the stream's first entry.
fn from_label(from_ms: i64) -> String {
    if from_ms == 0 {
        "the beginning of the stream".into()
    } else {
        rfc3339(from_ms)
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

const REGISTER: &str = r#"
local P = ARGV[1]
local rid = redis.call('HGET', KEYS[1], 'rid')
if rid and rid ~= '0' and redis.call('EXISTS', P .. 'rp' .. rid .. ':lease') == 1 then
  return {'busy', rid}
end
local new = redis.call('HINCRBY', KEYS[1], 'rseq', 1)
local S = P .. 'rp' .. new .. ':'
-- the rebuild reads up to the last entry now: every later one is committed live after this
-- script, so it reaches the copy through the live consumers
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local rend = '0-0'
if last[1] then rend = last[1][1] end
redis.call('HSET', KEYS[1], 'rid', new, 'rfrom', ARGV[2], 'rto', ARGV[3], 'rend', rend)
if ARGV[4] ~= '' then redis.call('SET', S .. 'pricing', ARGV[4]) end
redis.call('SET', S .. 'lease', '1', 'PX', ARGV[5])
local pv = redis.call('HGET', KEYS[1], 'pv') or '0'
return {'ok', tostring(new), pv, rend}
"#;

/// Runs a replay to the end, over every partition in turn (each one live-safe by itself, so a
/// query meanwhile sees each partition either before or after its switch, never half of one);
/// progress lines go to `progress`.
pub async fn run(
    config: &Config,
    args: ReplayArgs,
    progress: &mut impl Write,
) -> Result<Summary, ReplayError> {
    let started = Instant::now();
    // The switch is one script over every rebuilt day: allow it far longer than a command.
    let timeouts = shared::Timeouts::new(Duration::from_secs(5), Duration::from_secs(300));
    let mut conn = config.redis.connect(timeouts).await?;
    // Commands on one connection run in the order sent: a read sent after a chunk's commits
    // would wait for all of them, rather than take turns with them.
    let reads = config.redis.connect(timeouts).await?;
    shared::deployment::check_partitions(&mut conn, &config.partitions).await?;
    let mut total: Option<Summary> = None;
    for (p, keyspace) in config.partitions.iter().enumerate() {
        if config.partitions.count() > 1 {
            let _ = writeln!(progress, "replay: partition {p} ({})", keyspace.stream());
        }
        let summary = run_partition(
            config,
            &args,
            keyspace,
            (conn.clone(), reads.clone()),
            progress,
        )
        .await?;
        total = Some(match total {
            None => summary,
            Some(so_far) => so_far.and(summary),
        });
    }
    let mut total = total.ok_or(ReplayError::Abandoned)?;
    total.elapsed = started.elapsed();
    Ok(total)
}

/// The replay of one partition.
async fn run_partition(
    config: &Config,
    args: &ReplayArgs,
    keyspace: &Keyspace,
    (mut conn, reads): (RedisConn, RedisConn),
    progress: &mut impl Write,
) -> Result<Summary, ReplayError> {
    let started = Instant::now();
    let keyspace = keyspace.clone();
    let (pricing, text) = match &args.pricing {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| PricingError::Io {
                path: path.clone(),
                error,
            })?;
            (Some(Pricing::from_json(&text)?), Some(text))
        }
        None => (None, None),
    };
    // The replay writes the same TTL-carrying keys as the live consumers (seen-sets, spend).
    shared::redis_policy::check(&mut conn, config.allow_redis_eviction).await?;

    // Live consumers and the replay must number dedupe slots alike: the deployment's window,
    // whatever this process was configured with.
    let window_secs =
        control::dedupe_window(&mut conn, &keyspace, config.dedupe_window_secs).await?;
    if window_secs != config.dedupe_window_secs {
        let _ = writeln!(
            progress,
            "replay: using the deployment's dedupe window of {window_secs} s (configured here: {} s)",
            config.dedupe_window_secs
        );
    }

    let trimmed_until = trimmed_until(&mut conn, keyspace.stream()).await?;
    let from_ms = match &args.from {
        Some(raw) => day_floor(parse_bound("from", raw)?),
        // The first day whose every event is still in the stream, at least an hour ahead of
        // the trimming, which goes on while the replay runs.
        None => trimmed_until.map_or(0, |t| {
            day_floor(t.saturating_add(HOUR_MS)).saturating_add(DAY_MS)
        }),
    };
    let to_ms = match &args.to {
        Some(raw) => day_ceil(parse_bound("to", raw)?),
        None => i64::MAX,
    };
    if from_ms >= to_ms {
        return Err(ReplayError::Invalid {
            name: "to",
            reason: "the range is empty".into(),
        });
    }
    if let Some(t) = trimmed_until
        && t >= read_from(from_ms)
    {
        return Err(ReplayError::Trimmed(rfc3339(t)));
    }

    // Register.
    let reply: Vec<String> = Script::new(REGISTER)
        .key(keyspace.key(control::CTL))
        .key(keyspace.stream())
        .arg(keyspace.key(""))
        .arg(from_ms)
        .arg(to_ms)
        .arg(text.as_deref().unwrap_or(""))
        .arg(LEASE_MS)
        .invoke_async(&mut conn)
        .await?;
    let rid: i64 = reply.get(1).and_then(|r| r.parse().ok()).unwrap_or(0);
    if reply.first().map(String::as_str) != Some("ok") {
        return Err(ReplayError::Busy(rid));
    }
    let end = reply
        .get(3)
        .and_then(|id| parse_id(id))
        .filter(|id| *id > (0, 0));
    // Entries applied live before the registration but not yet acknowledged would look
    // pending to the rebuild, which leaves pending entries to the live consumers: they would
    // reach neither the copy nor, applied already, the live consumers' commits to it.
    crate::ingest::applied::settle(&mut conn, &keyspace, &config.group).await?;
    let prefix = control::shadow_prefix(rid);
    // Shadows of replays that died are garbage now.
    delete_matching(&mut conn, &keyspace.key("rp*"), &keyspace.key(&prefix)).await?;
    let _ = writeln!(
        progress,
        "replay {rid}: rebuilding days from {} to {}",
        from_label(from_ms),
        if to_ms == i64::MAX {
            "open".into()
        } else {
            rfc3339(to_ms)
        }
    );

    let (stop_lease, lease) = tokio::sync::oneshot::channel::<()>();
    let lease_task = tokio::spawn(renew_lease(
        conn.clone(),
        keyspace.key(&control::lease_key(rid)),
        lease,
    ));
    let rebuilt = match end {
        Some(end) => {
            let target = Target {
                rid,
                range: (from_ms, to_ms),
                end,
                window_secs,
            };
            rebuild(
                config,
                args,
                &keyspace,
                (&mut conn, reads),
                target,
                pricing.map(Arc::new),
                progress,
            )
            .await
        }
        None => Ok(Counts::default()),
    };
    let mut switch_started = None;
    let result = match rebuilt {
        Ok(counts) => {
            let _ = writeln!(progress, "replay {rid}: switching");
            switch_started = Some(Instant::now());
            let fingerprint = match &args.pricing {
                Some(path) => Pricing::load(path)?.fingerprint().to_string(),
                None => String::new(),
            };
            switch::run(&mut conn, &keyspace, rid, (from_ms, to_ms), &fingerprint)
                .await
                .map(|switched| (counts, switched.days, switched.models))
        }
        Err(e) => Err(e),
    };
    let switch_time = switch_started.map(|t| t.elapsed()).unwrap_or_default();
    let _ = stop_lease.send(());
    let _ = lease_task.await;
    // Whatever happened, the shadow is of no further use.
    delete_matching(&mut conn, &keyspace.key(&format!("{prefix}*")), "").await?;
    let (counts, days, models) = result?;
    Ok(Summary {
        rid,
        from_ms,
        to_ms,
        entries_read: counts.read,
        events_applied: counts.applied,
        left_to_live: counts.left,
        duplicates: counts.duplicates,
        days,
        elapsed: started.elapsed(),
        switch_time,
        models,
    })
}

#[derive(Default)]
struct Counts {
    read: u64,
    applied: u64,
    left: u64,
    duplicates: u64,
}

/// What a registered replay rebuilds.
struct Target {
    rid: i64,
    /// `ts` range, day-aligned.
    range: (i64, i64),
    /// The last stream entry at registration.
    end: (u64, u64),
    /// The deployment's dedupe window.
    window_secs: i64,
}

/// How far before `from` (stream time) the rebuild starts reading: `ts` is the gateway's clock
/// at the request's start and an entry's id Redis's clock at its arrival, so an event stamped
/// just inside the range can have arrived just before it when a gateway's clock runs ahead.
/// This is the skew between gateway and Redis clocks the replay tolerates; live consumers warn
/// about events stamped further ahead than this (`consumer.rs`).
pub const CLOCK_SKEW_MS: i64 = 10 * 60_000;

/// The first stream time the rebuild of days from `from_ms` reads.
fn read_from(from_ms: i64) -> i64 {
    from_ms.saturating_sub(CLOCK_SKEW_MS).max(0)
}

async fn rebuild(
    config: &Config,
    args: &ReplayArgs,
    keyspace: &Keyspace,
    (conn, mut reads): (&mut RedisConn, RedisConn),
    target_replay: Target,
    pricing: Option<Arc<Pricing>>,
    progress: &mut impl Write,
) -> Result<Counts, ReplayError> {
    let Target {
        rid,
        range: (from_ms, to_ms),
        end,
        window_secs,
    } = target_replay;
    let stream = keyspace.stream();
    let mut control = Control::new(keyspace.clone(), Arc::new(Pricing::bundled()));
    let state = control.load(conn).await?;
    let target = state.replay.as_ref().ok_or(ReplayError::Abandoned)?;
    if target.rid != rid {
        return Err(ReplayError::Abandoned);
    }
    let mut shadow = Shadow {
        committer: Committer::new(keyspace.clone(), config.group.clone(), window_secs),
        pricing: pricing.unwrap_or_else(|| Arc::clone(&target.pricing)),
        pricing_version: state.pricing_version,
        control,
        prefix: control::shadow_prefix(rid),
        rid,
        conflicts: std::sync::atomic::AtomicU64::new(0),
    };

    let mut reader = Some(Reader {
        stream: stream.to_owned(),
        group: config.group.clone(),
        cursor: format!("{}-0", read_from(from_ms)),
        end,
        batch_size: args.batch_size,
        range: (from_ms, to_ms),
        done: false,
    });
    let total: u64 = conn.xlen(stream).await?;
    let mut counts = Counts::default();
    let began = Instant::now();
    let mut last_report = Instant::now();
    // One chunk's commits run in Redis while the next chunk is decoded, priced and staged on
    // top of them, and the one after that is read (as in the live consumer's backlog path).
    // A chunk is committed in parts by client key, as a live batch is (`ingest::groups`).
    let max = config.commit_events;
    let mut inflight: Option<(Vec<Chunk>, Vec<Staged>)> = None;
    let mut reading: Option<ReadAhead> = None;
    loop {
        // The commits go first: Redis queues them behind the read started last time, so they
        // never wait for that reply to be parsed here.
        let sending = match inflight.take() {
            Some((parts, staged)) => {
                Some((parts, commit::spawn_send_all(staged, conn.clone()).await))
            }
            None => None,
        };
        let raw = match (reading.take(), reader.as_mut()) {
            (Some(task), _) => task.chunk().await.and_then(|(back, raw)| {
                reader = Some(back);
                raw
            }),
            (None, Some(idle)) => idle.next(&mut reads).await,
            (None, None) => Ok(None),
        };
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                // The commits sent must not land after the shadow is cleaned up.
                if let Some((_, sending)) = sending {
                    let _ = sending.replies().await;
                }
                return Err(e);
            }
        };
        counts.read += raw.as_ref().map_or(0, |r| r.len() as u64);
        let done = reader.as_ref().is_none_or(|r| r.done);
        if !done && let Some(idle) = reader.take() {
            reading = Some(ReadAhead::start(idle, reads.clone()).await);
        }
        let next = raw.map(|r| r.decode(&mut counts).split(max));
        inflight = match sending {
            None => next.map(|parts| shadow.stage_all(parts)),
            Some((parts, sending)) => {
                let mut next = next.map(|parts| shadow.stage_all(parts));
                let Some((sent, replies)) = sending.replies().await else {
                    return Err(ReplayError::Commit(CommitError::Lost));
                };
                // Staged on top of this chunk: undo it first if any of its commits did not
                // apply, and stage it again once they are in.
                let all_applied = commit::all_applied(&sent, &replies);
                if !all_applied && let Some((_, s)) = &mut next {
                    shadow.committer.forget_all(std::mem::take(s));
                }
                shadow
                    .settle_all(conn, parts, sent, replies, &mut counts)
                    .await?;
                next.map(|(parts, staged)| {
                    if all_applied {
                        (parts, staged)
                    } else {
                        shadow.stage_all(parts)
                    }
                })
            }
        }
        .filter(|(parts, _)| !parts.is_empty());
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            report(progress, &counts, began, total);
        }
        if done && inflight.is_none() {
            break;
        }
    }
    report(progress, &counts, began, counts.read);
    // The trimmer must not have removed entries the rebuild still needed.
    if let Some(t) = trimmed_until(conn, stream).await?
        && t >= read_from(from_ms)
    {
        return Err(ReplayError::Trimmed(rfc3339(t)));
    }
    Ok(counts)
}

/// Reads the stream in chunks, keeping the acknowledged entries of the range.
struct Reader {
    stream: String,
    group: String,
    cursor: String,
    /// The last entry at registration.
    end: (u64, u64),
    batch_size: usize,
    range: (i64, i64),
    done: bool,
}

/// A [`Reader`] reading its next chunk on a task of its own, so that Redis's reading and the
/// reply's parsing overlap the replay's work on the chunk before.
struct ReadAhead(tokio::task::JoinHandle<(Reader, Result<Option<Raw>, ReplayError>)>);

impl ReadAhead {
    async fn start(mut reader: Reader, mut conn: RedisConn) -> Self {
        Self(
            crate::ingest::task::spawn_started(async move {
                let raw = reader.next(&mut conn).await;
                (reader, raw)
            })
            .await,
        )
    }

    /// The reader back, and its chunk.
    async fn chunk(self) -> Result<(Reader, Result<Option<Raw>, ReplayError>), ReplayError> {
        self.0.await.map_err(|_| {
            ReplayError::Redis((redis::ErrorKind::Io, "a stream read ended without a reply").into())
        })
    }
}

impl Reader {
    /// The next chunk (up to `batch_size` entries) as stored, read in pieces of at most
    /// [`READ_CHUNK`], one after the other so that Redis serves its other clients in between;
    /// `None` once the stream is read up to `end`.
    async fn next(&mut self, conn: &mut RedisConn) -> Result<Option<Raw>, ReplayError> {
        let mut pieces = Vec::new();
        let mut read = 0;
        while read < self.batch_size {
            let want = (self.batch_size - read).min(READ_CHUNK);
            let Some(piece) = self.piece(conn, want).await? else {
                break;
            };
            read += piece.entries.len();
            pieces.push(piece);
        }
        Ok((!pieces.is_empty()).then_some(Raw {
            pieces,
            range: self.range,
        }))
    }

    /// Up to `count` entries from the cursor on, with what the group had delivered and which of
    /// them are pending; `None` once the stream is read up to `end`.
    async fn piece(
        &mut self,
        conn: &mut RedisConn,
        count: usize,
    ) -> Result<Option<Piece>, ReplayError> {
        if self.done {
            return Ok(None);
        }
        // One round trip, so that a commit sent meanwhile never waits between its parts.
        // Acknowledged = delivered to the group and no longer pending. The delivery position
        // is read first: an entry delivered after it then still counts as not acknowledged.
        // The first `count` pending ids from the cursor on include every pending one of the (at
        // most `count`) entries read.
        let (groups, entries, pending): (StreamInfoGroupsReply, Value, StreamPendingCountReply) =
            match redis::pipe()
                .cmd("XINFO")
                .arg("GROUPS")
                .arg(&self.stream)
                .cmd("XRANGE")
                .arg(&self.stream)
                .arg(&self.cursor)
                .arg("+")
                .arg("COUNT")
                .arg(count)
                .cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.cursor)
                .arg("+")
                .arg(count)
                .query_async(conn)
                .await
            {
                Ok(replies) => replies,
                // No consumer group yet: nothing was delivered, so everything is left.
                Err(e) if refused_with(&e, "NOGROUP") => {
                    let entries = redis::cmd("XRANGE")
                        .arg(&self.stream)
                        .arg(&self.cursor)
                        .arg("+")
                        .arg("COUNT")
                        .arg(count)
                        .query_async(conn)
                        .await?;
                    (
                        StreamInfoGroupsReply::default(),
                        entries,
                        StreamPendingCountReply::default(),
                    )
                }
                Err(e) => return Err(e.into()),
            };
        let end = self.end;
        let mut entries = take_entries(entries);
        entries.retain(|e| parse_id(&e.id).is_some_and(|id| id <= end));
        let Some(Entry { id: last, .. }) = entries.last() else {
            self.done = true;
            return Ok(None);
        };
        self.done = parse_id(last).unwrap_or(end) >= end;
        self.cursor = format!("({last}");
        let delivered = groups
            .groups
            .iter()
            .find(|g| g.name == self.group)
            .and_then(|g| parse_id(&g.last_delivered_id));
        Ok(Some(Piece {
            entries,
            delivered,
            pending: pending.ids.into_iter().map(|p| p.id).collect(),
        }))
    }
}

/// Whether Redis refused `e` with `code`, or one command of the pipeline `e` came from: a
/// pipeline's error is its failed commands' errors, and `code()` reads none of them.
fn refused_with(e: &redis::RedisError, code: &str) -> bool {
    e.code() == Some(code)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == code))
}

/// A chunk as read, in pieces.
struct Raw {
    pieces: Vec<Piece>,
    range: (i64, i64),
}

/// Entries read in one round trip, the group's delivery position and which of them are pending
/// (of the piece and maybe some after it), read together.
struct Piece {
    entries: Vec<Entry>,
    delivered: Option<(u64, u64)>,
    pending: HashSet<String>,
}

impl Raw {
    fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.entries.len()).sum()
    }

    /// The acknowledged events of the range, first copy of each id.
    fn decode(self, counts: &mut Counts) -> Chunk {
        let Raw { pieces, range } = self;
        let mut events: Vec<(i64, UsageEvent)> =
            Vec::with_capacity(pieces.iter().map(|p| p.entries.len()).sum());
        for Piece {
            entries,
            delivered,
            pending,
        } in &pieces
        {
            for Entry { id, payload } in entries {
                let acknowledged = delivered.is_some_and(|d| parse_id(id).is_some_and(|i| i <= d))
                    && !pending.contains(id.as_str());
                if !acknowledged {
                    counts.left += 1;
                    continue;
                }
                // Entries the live consumers dead-lettered count nowhere.
                let Some(Ok(Ok(event))) = payload
                    .as_deref()
                    .map(|b| shared::decode(b).map(crate::ingest::stream::plausible))
                else {
                    continue;
                };
                if !(range.0..range.1).contains(&event.ts) {
                    continue;
                }
                events.push((arrival_ms(id), event));
            }
        }
        let before = events.len();
        crate::ingest::stream::keep_first_of_each_id(&mut events);
        counts.duplicates += (before - events.len()) as u64;
        Chunk {
            events,
            in_shadow: HashSet::new(),
        }
    }
}

/// Events of one chunk for the shadow, and those it turned out to hold already.
struct Chunk {
    /// (arrival ms, event)
    events: Vec<(i64, UsageEvent)>,
    in_shadow: HashSet<String>,
}

impl Chunk {
    /// The chunk's parts by client key, one commit each ([`groups`]).
    fn split(self, max: usize) -> Vec<Chunk> {
        let groups = groups::by_key(self.events.iter().map(|(_, e)| e.key_id.as_deref()), max);
        let mut parts: Vec<Chunk> = std::iter::repeat_with(|| Chunk {
            events: Vec::new(),
            in_shadow: HashSet::new(),
        })
        .take(groups.count)
        .collect();
        for (event, part) in self.events.into_iter().zip(groups.of_event) {
            if let Some(chunk) = parts.get_mut(part) {
                chunk.events.push(event);
            }
        }
        parts
    }

    fn pending(&self) -> usize {
        self.events
            .iter()
            .filter(|(_, e)| !self.in_shadow.contains(&e.id))
            .count()
    }
}

/// Applies chunks to the replay's shadow copy.
struct Shadow {
    committer: Committer,
    control: Control,
    pricing: Arc<Pricing>,
    pricing_version: i64,
    prefix: String,
    rid: i64,
    conflicts: std::sync::atomic::AtomicU64,
}

impl Shadow {
    /// The chunk's commit, built against the cell cache; `None` when it has nothing to apply.
    fn stage(&mut self, chunk: &Chunk) -> Option<commit::Staged> {
        let now_ms = Utc::now().timestamp_millis();
        let mut delta = Delta::default();
        let mut seen = Vec::with_capacity(chunk.events.len());
        for (arrival, event) in &chunk.events {
            if chunk.in_shadow.contains(&event.id) {
                continue;
            }
            delta.add(event, self.pricing.price(&usage_of(event)), now_ms);
            seen.push(Seen {
                id: &event.id,
                slot: self.committer.slot_of(*arrival),
            });
        }
        if seen.is_empty() {
            return None;
        }
        let cells = Arc::new(delta.cell_writes(&self.prefix));
        let increments = delta.shadow_increments(&self.prefix, now_ms);
        Some(self.committer.stage(&Batch {
            token: &control::token(self.pricing_version, self.rid),
            live: &[],
            // The replay's own records expire as a live consumer's do, renewed as it moves on;
            // only what live commits record for entries it has yet to read is kept.
            shadow: Some(ShadowSeen {
                prefix: &self.prefix,
                seen: &seen,
                kept_through: i64::MIN,
            }),
            cells: &cells,
            increments: &increments,
            acks: Acks::Now(&[]),
        }))
    }

    /// Stages the parts of a chunk, each on top of the ones before; parts with nothing to
    /// apply are left out.
    fn stage_all(&mut self, parts: Vec<Chunk>) -> (Vec<Chunk>, Vec<Staged>) {
        let mut kept = Vec::with_capacity(parts.len());
        let mut staged = Vec::with_capacity(parts.len());
        for part in parts {
            if let Some(s) = self.stage(&part) {
                kept.push(part);
                staged.push(s);
            }
        }
        (kept, staged)
    }

    /// Takes the replies to a chunk's commits, counts those that applied and applies the
    /// others whatever it takes.
    async fn settle_all(
        &mut self,
        conn: &mut RedisConn,
        parts: Vec<Chunk>,
        sent: Vec<Staged>,
        replies: Replies,
        counts: &mut Counts,
    ) -> Result<(), ReplayError> {
        let outcomes = self.committer.settle_all(sent, replies, &self.conflicts)?;
        for (part, outcome) in parts.into_iter().zip(outcomes) {
            match outcome? {
                Some(Outcome::Applied) => counts.applied += part.pending() as u64,
                outcome => self.finish(conn, part, outcome, counts).await?,
            }
        }
        Ok(())
    }

    /// Applies a chunk whatever it takes; `outcome`: of an attempt already made (`None`:
    /// refused for changed cells, or none yet).
    async fn finish(
        &mut self,
        conn: &mut RedisConn,
        mut chunk: Chunk,
        mut outcome: Option<Outcome>,
        counts: &mut Counts,
    ) -> Result<(), ReplayError> {
        loop {
            let outcome = match outcome.take() {
                Some(outcome) => outcome,
                None => {
                    let Some(staged) = self.stage(&chunk) else {
                        return Ok(());
                    };
                    let reply = commit::send(&staged.cmd, conn).await;
                    match self.committer.settle(staged, reply, &self.conflicts)? {
                        Some(outcome) => outcome,
                        None => continue,
                    }
                }
            };
            match outcome {
                Outcome::Applied => {
                    counts.applied += chunk.pending() as u64;
                    return Ok(());
                }
                Outcome::ShadowDuplicates(dups) | Outcome::Duplicates(dups) => {
                    counts.duplicates += dups.len() as u64;
                    chunk.in_shadow.extend(dups);
                }
                Outcome::Stale => {
                    // A pricing change of the live figures is fine; losing the replay is not.
                    let state = self.control.load(conn).await?;
                    if state.replay.as_ref().map(|r| r.rid) != Some(self.rid) {
                        return Err(ReplayError::Abandoned);
                    }
                    self.pricing_version = state.pricing_version;
                }
                // Only this replay freezes, and only after its rebuild.
                Outcome::Frozen => return Err(ReplayError::Abandoned),
            }
        }
    }
}

/// `total`: entries in the stream when the rebuild started, an upper bound of what it reads.
fn report(progress: &mut impl Write, counts: &Counts, began: Instant, total: u64) {
    let secs = began.elapsed().as_secs_f64().max(1e-9);
    let done = (counts.read as f64 / total.max(1) as f64).clamp(0.0, 1.0);
    let rate = counts.read as f64 / secs;
    let eta = total.saturating_sub(counts.read) as f64 / rate.max(1e-9);
    let _ = writeln!(
        progress,
        "replay: {:5.1}%  {} entries read, {} events applied, {rate:.0} entries/s, ETA {eta:.0} s",
        done * 100.0,
        counts.read,
        counts.applied,
    );
}

async fn renew_lease(
    mut conn: RedisConn,
    key: String,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(Duration::from_millis(LEASE_MS / 6)) => {}
        }
        let renewed: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&key)
            .arg("1")
            .arg("PX")
            .arg(LEASE_MS)
            .arg("XX")
            .query_async(&mut conn)
            .await;
        match renewed {
            Ok(Some(_)) => {}
            // Abandoned: the next commit tells the rebuild.
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "cannot renew the replay lease; retrying"),
        }
    }
}

/// Deletes keys matching `pattern`, except those starting with `keep` (when non-empty).
async fn delete_matching(
    conn: &mut RedisConn,
    pattern: &str,
    keep: &str,
) -> redis::RedisResult<()> {
    let mut keys = conn.scan_slot(pattern).await?;
    keys.retain(|key| keep.is_empty() || !key.starts_with(keep));
    for chunk in keys.chunks(500) {
        conn.del::<_, ()>(chunk).await?;
    }
    Ok(())
}

/// A time (ms) at or after the newest entry trimmed away, if any was.
async fn trimmed_until(conn: &mut RedisConn, stream: &str) -> redis::RedisResult<Option<i64>> {
    let info: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await;
    let info = match info {
        Ok(info) => info,
        // No stream: nothing was ever trimmed.
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let fields: Vec<(String, Value)> = match info {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| Some((into_string(pair.first()?.clone())?, pair.get(1)?.clone())))
            .collect(),
        Value::Map(pairs) => pairs
            .into_iter()
            .filter_map(|(k, v)| Some((into_string(k)?, v)))
            .collect(),
        _ => Vec::new(),
    };
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let count = |name: &str| match field(name) {
        Some(Value::Int(n)) => *n,
        _ => 0,
    };
    // Trimming (XTRIM, MAXLEN) removes a prefix and, unlike XDEL, does not record what it
    // removed: entries were removed when more were added than are left, and all of them lay
    // before the first entry left.
    if count("entries-added") <= count("length") {
        return Ok(None);
    }
    let first = match field("first-entry") {
        Some(Value::Array(entry)) => entry.first().cloned().and_then(into_string),
        _ => None,
    };
    Ok(Some(
        first
            .and_then(|id| parse_id(&id))
            .map_or(i64::MAX, |(ms, _)| ms as i64),
    ))
}

/// RFC 3339, Unix ms, or a stream id (`<ms>-<seq>`, its time part counts).
fn parse_bound(name: &'static str, raw: &str) -> Result<i64, ReplayError> {
    if let Some((ms, _)) = parse_id(raw) {
        return i64::try_from(ms).map_err(|_| ReplayError::Invalid {
            name,
            reason: format!("{raw:?} is out of range"),
        });
    }
    if let Ok(ms) = raw.parse::<i64>() {
        return Ok(ms);
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.timestamp_millis())
        .map_err(|_| ReplayError::Invalid {
            name,
            reason: format!("{raw:?} is neither a stream id nor an RFC 3339 time"),
        })
}

fn day_floor(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

fn day_ceil(ms: i64) -> i64 {
    let floor = day_floor(ms);
    if floor == ms {
        ms
    } else {
        floor.saturating_add(DAY_MS)
    }
}

/// `<ms>-<seq>` as a comparable pair.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn arrival_ms(id: &str) -> i64 {
    parse_id(id).map_or(0, |(ms, _)| ms as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_from_the_start_of_a_young_stream_prints_no_1970_date() {
        let summary = |from_ms| Summary {
            rid: 1,
            from_ms,
            to_ms: i64::MAX,
            entries_read: 0,
            events_applied: 0,
            left_to_live: 0,
            duplicates: 0,
            days: 0,
            elapsed: Duration::from_secs(1),
            switch_time: Duration::ZERO,
            models: BTreeMap::new(),
        };
        let mut out = Vec::new();
        summary(0).print(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("1970"), "{text}");
        assert!(
            text.contains("from the beginning of the stream to open"),
            "{text}"
        );
        let mut out = Vec::new();
        summary(1_796_083_200_000).print(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("from 2026-12-01T00:00:00.000Z to open"),
            "{text}"
        );
    }

    #[test]
    fn bounds_parse_and_align_to_days() {
        assert_eq!(
            parse_bound("from", "1700000000123-4").unwrap(),
            1_700_000_000_123
        );
        assert_eq!(
            parse_bound("from", "2026-11-30T13:00:00Z").unwrap(),
            1_796_043_600_000
        );
        assert_eq!(day_floor(DAY_MS + 5), DAY_MS);
        assert_eq!(day_ceil(DAY_MS + 5), 2 * DAY_MS);
        assert_eq!(day_ceil(DAY_MS), DAY_MS);
        assert!(parse_bound("to", "yesterday").is_err());
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(parse_id("9-0") < parse_id("10-0"));
        assert!(parse_id("10-2") < parse_id("10-10"));
        assert_eq!(parse_id("x"), None);
    }
}
