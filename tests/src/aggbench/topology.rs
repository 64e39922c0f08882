//! Where the benchmark's Redis state lives: one private `redis-server`, or a private Redis
//! Cluster of 3 masters and 3 replicas on loopback ([`RedisCluster`]), and which
//! master serves a given key.
//!
//! The benchmark talks to each master on a plain connection of its own rather than through a
//! cluster client: it knows which master serves each partition (nothing moves slots during a
//! run), and per-master connections are what per-master figures (CPU, memory, command stats)
//! need anyway. Only the aggregator, the gateway and the replay use the cluster client.

use ::tests::cluster::RedisCluster;
use anyhow::{Context, bail, ensure};
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::servers::{self, Redis, info_field};

/// One `redis-server` of the store.
#[derive(Debug, Clone)]
pub struct Node {
    pub port: u16,
    pub url: String,
    pub pid: u32,
}

enum Backend {
    Single(Redis),
    /// Held for its `Drop`, which stops every node and removes their files.
    Cluster {
        _nodes: RedisCluster,
    },
}

pub struct Store {
    backend: Backend,
    /// `REDIS_URL` for the binaries: one URL, or every node's, comma-separated (a cluster).
    pub seeds: String,
    pub version: String,
    /// Masters, in port order; with one node, that node.
    pub masters: Vec<Node>,
    pub replicas: Vec<Node>,
    /// Cluster only: (first slot, last slot, index into `masters`).
    slots: Vec<(u16, u16, usize)>,
}

impl Store {
    pub async fn single() -> anyhow::Result<Self> {
        let redis = Redis::start().await?;
        let port = port_of(&redis.url)?;
        let node = Node {
            port,
            url: redis.url.clone(),
            pid: redis.pid(),
        };
        Ok(Self {
            seeds: redis.url.clone(),
            version: redis.version.clone(),
            masters: vec![node],
            replicas: Vec::new(),
            slots: Vec::new(),
            backend: Backend::Single(redis),
        })
    }

    pub async fn cluster(replicas: usize) -> anyhow::Result<Self> {
        // `RedisCluster::start` blocks and panics on failure (it is test support); the panic
        // comes back here as a join error.
        let cluster =
            tokio::task::spawn_blocking(move || RedisCluster::start_with_replicas(replicas))
                .await
                .context(
                    "starting the Redis Cluster (redis-server and redis-cli must be installed)",
                )?;
        let seeds = cluster.url();
        let (mut masters, mut replicas, mut version) = (Vec::new(), Vec::new(), String::new());
        for url in seeds.split(',') {
            let mut conn = servers::connect(url).await?;
            let server: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut conn)
                .await
                .with_context(|| format!("INFO server on {url}"))?;
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .with_context(|| format!("INFO replication on {url}"))?;
            let pid = info_field(&server, "process_id")
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("no process_id in INFO server of {url}"))?;
            version = info_field(&server, "redis_version")
                .unwrap_or("?")
                .to_owned();
            let node = Node {
                port: port_of(url)?,
                url: url.to_owned(),
                pid,
            };
            match info_field(&replication, "role") {
                Some("master") => masters.push(node),
                _ => replicas.push(node),
            }
        }
        masters.sort_by_key(|m| m.port);
        replicas.sort_by_key(|r| r.port);
        ensure!(!masters.is_empty(), "the cluster has no master");
        let mut conn = servers::connect(&masters[0].url).await?;
        let reply: Vec<Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .context("CLUSTER SLOTS")?;
        let mut slots = Vec::new();
        for (start, end, port) in parse_slots(&reply)? {
            let master = masters
                .iter()
                .position(|m| m.port == port)
                .with_context(|| format!("slots {start}–{end} are served by {port}, no master"))?;
            slots.push((start, end, master));
        }
        Ok(Self {
            backend: Backend::Cluster { _nodes: cluster },
            seeds,
            version,
            masters,
            replicas,
            slots,
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster { .. })
    }

    /// The index into [`Store::masters`] of the master that serves `key`.
    pub async fn master_of(&self, key: &str) -> anyhow::Result<usize> {
        if !self.is_cluster() {
            return Ok(0);
        }
        let mut conn = servers::connect(&self.masters[0].url).await?;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .with_context(|| format!("CLUSTER KEYSLOT {key}"))?;
        self.slots
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, master)| *master)
            .with_context(|| format!("no master serves slot {slot}"))
    }

    /// A connection of our own to each master, in [`Store::masters`] order.
    pub async fn connect_masters(&self) -> anyhow::Result<Vec<MultiplexedConnection>> {
        let mut conns = Vec::with_capacity(self.masters.len());
        for master in &self.masters {
            conns.push(servers::connect(&master.url).await?);
        }
        Ok(conns)
    }

    /// Fails if a node has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match &mut self.backend {
            Backend::Single(redis) => redis.check_alive(),
            Backend::Cluster { .. } => {
                for node in self.masters.iter().chain(&self.replicas) {
                    // The nodes are our children: one that died is a zombie until the cluster
                    // guard reaps it, and its `/proc` entry says so.
                    let stat = std::fs::read_to_string(format!("/proc/{}/stat", node.pid));
                    let state = stat.as_deref().ok().and_then(|s| {
                        s.rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                    });
                    if matches!(state, None | Some("Z" | "X")) {
                        bail!("the cluster node on port {} exited", node.port);
                    }
                }
                Ok(())
            }
        }
    }

    /// The masters that are no longer masters (a failover during the run), by port.
    pub async fn demoted_masters(&self) -> anyhow::Result<Vec<u16>> {
        let mut demoted = Vec::new();
        if !self.is_cluster() {
            return Ok(demoted);
        }
        for master in &self.masters {
            let mut conn = servers::connect(&master.url).await?;
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .with_context(|| format!("INFO replication on {}", master.url))?;
            if info_field(&info, "role") != Some("master") {
                demoted.push(master.port);
            }
        }
        Ok(demoted)
    }
}

fn port_of(url: &str) -> anyhow::Result<u16> {
    url.rsplit_once(':')
        .and_then(|(_, port)| port.trim_end_matches('/').parse().ok())
        .with_context(|| format!("no port in {url}"))
}

/// `CLUSTER SLOTS` as (first slot, last slot, master port).
fn parse_slots(reply: &[Value]) -> anyhow::Result<Vec<(u16, u16, u16)>> {
    let mut out = Vec::with_capacity(reply.len());
    for range in reply {
        let Value::Array(parts) = range else {
            bail!("unexpected CLUSTER SLOTS entry {range:?}");
        };
        let number = |v: Option<&Value>| -> anyhow::Result<u16> {
            let v = v.context("short CLUSTER SLOTS entry")?;
            redis::from_redis_value_ref(v).context("CLUSTER SLOTS number")
        };
        let Some(Value::Array(master)) = parts.get(2) else {
            bail!("CLUSTER SLOTS entry without a master: {range:?}");
        };
        out.push((
            number(parts.first())?,
            number(parts.get(1))?,
            number(master.get(1))?,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_read_from_urls() {
        assert_eq!(port_of("redis://127.0.0.1:7001").unwrap(), 7001);
        assert!(port_of("redis://localhost").is_err());
    }

    #[test]
    fn slot_ranges_name_their_master() {
        let int = Value::Int;
        let node = |port| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = vec![
            Value::Array(vec![int(0), int(5460), node(7001), node(7004)]),
            Value::Array(vec![int(5461), int(10922), node(7002)]),
        ];
        assert_eq!(
            parse_slots(&reply).unwrap(),
            [(0, 5460, 7001), (5461, 10922, 7002)]
        );
    }
}
