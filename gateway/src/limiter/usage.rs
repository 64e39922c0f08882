//! Where a key stands against each of its limits, for the admin API: requests from the sliding
//! logs, tokens and cost from the aggregator's spend counters (the same window tiling the
//! limiter script reads), the budget from the lifetime cost, concurrency from the live leases.
//!
//! Read-only, so one pipeline serves any number of keys in one round trip; all of a key's keys
//! share the deployment's hash tag, so it runs unchanged on a cluster.
//!
//! Blocks that replicas leased (`blocks.rs`) count as used here, their unused entries and slots
//! included: Redis cannot tell them apart, and the difference is at most one block (64) per
//! replica, only on a key far from its limit, and gone within ~300 ms of the block's end.

use redis::Value;
use shared::RedisConn;
use shared::{Keyspace, Partitions};

use super::check::{bucket_width, lease_key, queue_key, spend_key, window_key};
use crate::error::GatewayError;
use crate::spend;
use crate::store::KeyRecord;

/// One limit of a key and its current usage. Money is in USD.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitUsage {
    /// `requests`, `tokens`, `cost_usd`, `budget_usd` or `concurrency`.
    pub metric: String,
    pub window_secs: Option<u64>,
    pub max: f64,
    pub used: f64,
    /// When the oldest usage counted in the window leaves it; `None` when nothing is counted
    /// or the limit has no window.
    pub resets_in_secs: Option<u64>,
    /// Concurrency only: requests queued for a slot.
    pub waiting: Option<u64>,
}

impl LimitUsage {
    pub fn remaining(&self) -> f64 {
        (self.max - self.used).max(0.0)
    }
}

/// What one limit reads, in pipeline order.
enum Probe {
    /// ZCOUNT, then the oldest entry still in the window.
    Requests { window_ms: i64, max: f64 },
    /// One HMGET per hash; per field, the milliseconds until it leaves the window.
    Spend {
        metric: String,
        window_secs: u64,
        max: f64,
        hashes: usize,
        leaves_in: Vec<i64>,
    },
    /// HMGET of the lifetime cost.
    Budget { max: f64 },
    /// ZCOUNT of live leases, then of live waiters.
    Concurrency { max: u32 },
}

/// Reads the usage of every limit of `keys`, one round trip per partition they live in (one
/// with a single partition); one list per key, in order.
pub async fn read_usage(
    conn: &mut RedisConn,
    partitions: &Partitions,
    keys: &[KeyRecord],
    now_ms: i64,
) -> Result<Vec<Vec<LimitUsage>>, GatewayError> {
    let mut out: Vec<Vec<LimitUsage>> = keys.iter().map(|_| Vec::new()).collect();
    for p in 0..partitions.count() {
        let keyspace = partitions.get(p);
        let mut pipe = redis::pipe();
        let mut probes = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if partitions.of_key(Some(&key.id)) == p {
                probes.push((i, plan(&mut pipe, keyspace, key, now_ms)));
            }
        }
        if probes.iter().all(|(_, p)| p.is_empty()) {
            continue;
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        let mut replies = replies.into_iter();
        for (i, probes) in probes {
            out[i] = read(probes, &mut replies, now_ms);
        }
    }
    Ok(out)
}

fn plan(
    pipe: &mut redis::Pipeline,
    keyspace: &Keyspace,
    key: &KeyRecord,
    now_ms: i64,
) -> Vec<Probe> {
    let mut probes = Vec::new();
    for limit in &key.limits {
        let window_ms =
            i64::try_from(limit.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4);
        match limit.metric.as_str() {
            "requests" => {
                // The script drops entries at or before `now − window`.
                let log = window_key(keyspace, &key.id, limit.window_secs);
                let from = format!("({}", now_ms - window_ms);
                pipe.cmd("ZCOUNT").arg(&log).arg(&from).arg("+inf");
                pipe.cmd("ZRANGEBYSCORE")
                    .arg(&log)
                    .arg(&from)
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(1);
                probes.push(Probe::Requests {
                    window_ms,
                    max: limit.max,
                });
            }
            "tokens" | "cost_usd" => {
                let prefix = if limit.metric == "tokens" { 't' } else { 'c' };
                let reads = spend::window_reads(now_ms, window_ms);
                let mut leaves_in = Vec::new();
                for read in &reads {
                    let cmd = pipe.cmd("HMGET").arg(format!(
                        "{}{}",
                        spend_key(keyspace, &key.id),
                        read.hash_suffix
                    ));
                    let width = bucket_width(&read.hash_suffix);
                    for bucket in &read.buckets {
                        cmd.arg(format!("{prefix}{bucket}"));
                        leaves_in.push((bucket + width + window_ms - now_ms).max(0));
                    }
                }
                probes.push(Probe::Spend {
                    metric: limit.metric.clone(),
                    window_secs: limit.window_secs,
                    max: limit.max,
                    hashes: reads.len(),
                    leaves_in,
                });
            }
            _ => {}
        }
    }
    if let Some(max) = key.budget_usd {
        pipe.cmd("HMGET")
            .arg(spend_key(keyspace, &key.id))
            .arg("ch")
            .arg("cl");
        probes.push(Probe::Budget { max });
    }
    if let Some(max) = key.max_concurrency {
        // Leases are scored by expiry, waiters by deadline: both are live while in the future.
        let from = format!("({now_ms}");
        pipe.cmd("ZCOUNT")
            .arg(lease_key(keyspace, &key.id))
            .arg(&from)
            .arg("+inf");
        pipe.cmd("ZCOUNT")
            .arg(queue_key(keyspace, &key.id))
            .arg(&from)
            .arg("+inf");
        probes.push(Probe::Concurrency { max });
    }
    probes
}

fn read(
    probes: Vec<Probe>,
    replies: &mut impl Iterator<Item = Value>,
    now_ms: i64,
) -> Vec<LimitUsage> {
    let mut next = || replies.next().unwrap_or(Value::Nil);
    probes
        .into_iter()
        .map(|probe| match probe {
            Probe::Requests { window_ms, max } => {
                let used = int(&next());
                let oldest = match next() {
                    Value::Array(items) => items.get(1).map(int),
                    _ => None,
                };
                LimitUsage {
                    metric: "requests".into(),
                    window_secs: Some(u64::try_from(window_ms / 1000).unwrap_or(0)),
                    max,
                    used: used as f64,
                    resets_in_secs: oldest.map(|t| secs_up(t + window_ms - now_ms)),
                    waiting: None,
                }
            }
            Probe::Spend {
                metric,
                window_secs,
                max,
                hashes,
                leaves_in,
            } => {
                let values: Vec<i64> = (0..hashes)
                    .flat_map(|_| match next() {
                        Value::Array(items) => items.iter().map(int).collect(),
                        _ => Vec::new(),
                    })
                    .collect();
                let sum: i64 = values.iter().sum();
                let resets = values
                    .iter()
                    .zip(&leaves_in)
                    .filter(|(v, _)| **v > 0)
                    .map(|(_, leaves)| *leaves)
                    .min();
                let used = if metric == "cost_usd" {
                    sum as f64 / 1e9
                } else {
                    sum as f64
                };
                LimitUsage {
                    metric,
                    window_secs: Some(window_secs),
                    max,
                    used,
                    resets_in_secs: resets.map(secs_up),
                    waiting: None,
                }
            }
            Probe::Budget { max } => {
                let (whole, atto) = match next() {
                    Value::Array(items) => {
                        (items.first().map_or(0, int), items.get(1).map_or(0, int))
                    }
                    _ => (0, 0),
                };
                // Whole nanodollars plus the attodollar remainder, as the limiter counts it.
                let nanos = whole + (atto + 999_999_999) / 1_000_000_000;
                LimitUsage {
                    metric: "budget_usd".into(),
                    window_secs: None,
                    max,
                    used: nanos as f64 / 1e9,
                    resets_in_secs: None,
                    waiting: None,
                }
            }
            Probe::Concurrency { max } => {
                let leases = int(&next());
                let waiting = int(&next());
                LimitUsage {
                    metric: "concurrency".into(),
                    window_secs: None,
                    max: f64::from(max),
                    used: leases as f64,
                    resets_in_secs: None,
                    waiting: Some(u64::try_from(waiting).unwrap_or(0)),
                }
            }
        })
        .collect()
}

/// An integer reply or field; absent or unparsable counts as 0.
fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map_or(0, |f| f as i64),
        Value::SimpleString(s) => s.parse::<f64>().map_or(0, |f| f as i64),
        Value::Double(f) => *f as i64,
        _ => 0,
    }
}

fn secs_up(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Limit;

    fn key() -> KeyRecord {
        KeyRecord {
            id: "k".into(),
            name: "k".into(),
            limits: vec![
                Limit {
                    metric: "requests".into(),
                    max: 5.0,
                    window_secs: 60,
                },
                Limit {
                    metric: "cost_usd".into(),
                    max: 1.0,
                    window_secs: 60,
                },
            ],
            budget_usd: Some(2.0),
            max_concurrency: Some(1),
            ..KeyRecord::default()
        }
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_are_read_back_in_the_order_they_were_asked_for() {
        let keyspace = Keyspace::new("meter:events").unwrap();
        let now = 1_700_000_070_000; // 30 s into a minute: a 60 s window reads two minutes
        let mut pipe = redis::pipe();
        let probes = plan(&mut pipe, &keyspace, &key(), now);
        let replies = vec![
            Value::Int(3),
            Value::Array(vec![bulk("r1"), bulk(&(now - 20_000).to_string())]),
            Value::Array(vec![bulk("250000000"), Value::Nil]),
            Value::Array(vec![bulk("1500000000"), bulk("2")]),
            Value::Int(1),
            Value::Int(2),
        ];
        let usage = read(probes, &mut replies.into_iter(), now);
        let used: Vec<(&str, f64, Option<u64>)> = usage
            .iter()
            .map(|u| (u.metric.as_str(), u.used, u.resets_in_secs))
            .collect();
        assert_eq!(
            used,
            [
                ("requests", 3.0, Some(40)),
                ("cost_usd", 0.25, Some(30)),
                ("budget_usd", 1.500000001, None),
                ("concurrency", 1.0, None),
            ]
        );
        assert_eq!(usage[3].waiting, Some(2));
        assert_eq!(usage[0].remaining(), 2.0);
    }
}
