//! Filling the streams, and the bare consumer that sets the baseline.
//!
//! The baseline is what any consumer group reader on this Redis can reach at best: read a batch
//! of 1,000 and acknowledge it, with no decoding and no stats. It pipelines the `XACK` of one
//! batch with the `XREADGROUP` of the next, so each batch costs exactly one round trip, which is
//! as cheap as a consumer that acks only what it has seen can be. With several partitions one
//! such reader runs per partition, all at once, as the aggregator's loops do: together they
//! measure what the whole store (every master of a cluster) can deliver.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures_util::future::try_join_all;
use redis::Value;
use redis::aio::MultiplexedConnection;
use shared::Partitions;
use tokio::time::Instant;

use crate::events::Generator;

/// Entries per `XADD` pipeline and per `XREADGROUP`.
pub const CHUNK: u64 = 1000;

/// One partition's stream and a connection to the node that serves it.
#[derive(Clone)]
pub struct Part {
    pub stream: String,
    pub conn: MultiplexedConnection,
}

pub struct Preload {
    pub wall: Duration,
    /// The part of `wall` spent waiting for Redis, rather than generating and encoding.
    pub redis_wait: Duration,
    /// Events written to each partition.
    pub per_partition: Vec<u64>,
}

/// Appends events `0..n` to `stream` with pipelined `XADD <stream> * e <event>`.
#[allow(dead_code)] // statsbench's one-stream entry point; aggbench calls `preload_partitioned`
pub async fn preload(
    conn: &mut MultiplexedConnection,
    stream: &str,
    generator: &mut Generator,
    n: u64,
) -> anyhow::Result<Preload> {
    let partitions = Partitions::new(stream, 1)?;
    let parts = [Part {
        stream: stream.to_owned(),
        conn: conn.clone(),
    }];
    preload_partitioned(&parts, &partitions, generator, n).await
}

/// Appends events `0..n`, each to the stream of its key's partition (`parts[p]` for partition
/// `p` of `partitions`, as the gateway places them), with pipelined `XADD <stream> * e <event>`;
/// the pipelines of one chunk go out together.
pub async fn preload_partitioned(
    parts: &[Part],
    partitions: &Partitions,
    generator: &mut Generator,
    n: u64,
) -> anyhow::Result<Preload> {
    ensure!(
        parts.len() == partitions.count(),
        "{} streams for {} partitions",
        parts.len(),
        partitions.count()
    );
    let started = Instant::now();
    let mut redis_wait = Duration::ZERO;
    let mut reported = Instant::now();
    let mut per_partition = vec![0u64; parts.len()];
    for start in (0..n).step_by(CHUNK as usize) {
        let mut pipes: Vec<redis::Pipeline> = parts.iter().map(|_| redis::pipe()).collect();
        for i in start..(start + CHUNK).min(n) {
            let (bytes, key_id) = generator.encoded(i);
            let p = partitions.of_key(key_id.as_deref());
            per_partition[p] += 1;
            pipes[p]
                .cmd("XADD")
                .arg(&parts[p].stream)
                .arg("*")
                .arg(shared::EVENT_FIELD)
                .arg(bytes)
                .ignore();
        }
        let sent = Instant::now();
        try_join_all(
            pipes
                .iter()
                .zip(parts)
                .filter(|(pipe, _)| !pipe.is_empty())
                .map(|(pipe, part)| {
                    let mut conn = part.conn.clone();
                    async move { pipe.query_async::<()>(&mut conn).await }
                }),
        )
        .await
        .with_context(|| format!("XADD of events {start}.."))?;
        redis_wait += sent.elapsed();
        if reported.elapsed() >= Duration::from_secs(5) {
            reported = Instant::now();
            eprintln!("aggbench: preloaded {} / {n}", start + CHUNK);
        }
    }
    for (part, &written) in parts.iter().zip(&per_partition) {
        let length: u64 = redis::cmd("XLEN")
            .arg(&part.stream)
            .query_async(&mut part.conn.clone())
            .await?;
        ensure!(
            length == written,
            "{} holds {length} entries, not {written}",
            part.stream
        );
    }
    Ok(Preload {
        wall: started.elapsed(),
        redis_wait,
        per_partition,
    })
}

pub struct Bare {
    /// From the start until the last partition was read to its end.
    pub wall: Duration,
    pub acked: u64,
    pub round_trips: u64,
    /// Each partition's own reader: its time and the entries it acked.
    pub per_partition: Vec<(Duration, u64)>,
}

/// One bare reader per partition, all at once, each in group `group` of its own stream;
/// `expected[p]` is what partition `p` holds.
pub async fn bare_consumers(parts: &[Part], group: &str, expected: &[u64]) -> anyhow::Result<Bare> {
    let started = Instant::now();
    let runs = try_join_all(parts.iter().zip(expected).map(|(part, &n)| {
        let mut conn = part.conn.clone();
        async move { bare_consumer(&mut conn, &part.stream, group, n).await }
    }))
    .await?;
    Ok(Bare {
        wall: started.elapsed(),
        acked: runs.iter().map(|r| r.acked).sum(),
        round_trips: runs.iter().map(|r| r.round_trips).sum(),
        per_partition: runs.iter().map(|r| (r.wall, r.acked)).collect(),
    })
}

/// Reads the whole stream as group `group` (created at its start) and acks every entry.
pub async fn bare_consumer(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    n: u64,
) -> anyhow::Result<Bare> {
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async::<()>(conn)
        .await
        .with_context(|| format!("creating group {group} on {stream}"))?;
    let started = Instant::now();
    let mut to_ack: Vec<String> = Vec::new();
    let (mut acked, mut round_trips) = (0, 0);
    loop {
        let mut pipe = redis::pipe();
        if !to_ack.is_empty() {
            pipe.cmd("XACK").arg(stream).arg(group).arg(&to_ack);
        }
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("c")
            .arg("COUNT")
            .arg(CHUNK)
            .arg("STREAMS")
            .arg(stream)
            .arg(">");
        let mut replies: Vec<Value> = pipe.query_async(conn).await.context("XREADGROUP")?;
        round_trips += 1;
        let read = replies.pop().context("no XREADGROUP reply")?;
        if let Some(count) = replies.pop() {
            let count: u64 = redis::from_redis_value(count).context("XACK reply")?;
            ensure!(
                count == to_ack.len() as u64,
                "XACK acknowledged {count} of {} entries",
                to_ack.len()
            );
            acked += count;
        }
        // Nothing is appended while we read, so an empty read means the stream is done.
        to_ack = entry_ids(&read)?;
        if to_ack.is_empty() {
            break;
        }
    }
    let wall = started.elapsed();
    ensure!(
        acked == n,
        "the bare consumer acked {acked} of {n} entries of {stream}"
    );
    Ok(Bare {
        wall,
        acked,
        round_trips,
        per_partition: vec![(wall, acked)],
    })
}

/// The entry ids of an `XREADGROUP` reply: `[[stream, [[id, fields], ...]]]`, or nil.
fn entry_ids(reply: &Value) -> anyhow::Result<Vec<String>> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams,
        other => bail!("unexpected XREADGROUP reply {other:?}"),
    };
    let mut ids = Vec::new();
    for stream in streams {
        let Value::Array(pair) = stream else {
            bail!("unexpected stream in XREADGROUP reply: {stream:?}");
        };
        let Some(Value::Array(entries)) = pair.get(1) else {
            bail!("stream without entries in XREADGROUP reply");
        };
        for entry in entries {
            let Value::Array(parts) = entry else {
                bail!("unexpected entry in XREADGROUP reply: {entry:?}");
            };
            let id = parts.first().context("entry without id")?;
            ids.push(redis::from_redis_value_ref::<String>(id).context("entry id")?);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn ids_are_taken_from_every_entry() {
        let entry =
            |id: &str| Value::Array(vec![bulk(id), Value::Array(vec![bulk("e"), bulk("x")])]);
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![entry("1-0"), entry("1-1")]),
        ])]);
        assert_eq!(entry_ids(&reply).unwrap(), ["1-0", "1-1"]);
        assert!(entry_ids(&Value::Nil).unwrap().is_empty());
    }
}
