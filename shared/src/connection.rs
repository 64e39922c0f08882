//! One Redis connection type for both processes, over one node or a Redis Cluster.
//!
//! `REDIS_URL` is one `redis://`/`rediss://` URL (one node) or a comma-separated list of them
//! (cluster seed nodes); `REDIS_CLUSTER` makes a single URL a cluster seed. Everything above this
//! module talks to a [`RedisConn`], which routes each command, script and pipeline by its keys:
//! every script and pipeline of the pipeline touches one hash slot (`keyspace`), so the same code
//! runs on both. The cluster side is the redis crate's own client (MOVED/ASK, topology refresh
//! after a failover); nothing here speaks the cluster protocol.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr,
};
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("REDIS_URL is empty")]
    Empty,
    #[error("REDIS_URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("REDIS_URL mixes redis:// and rediss:// nodes; a cluster is all TLS or none")]
    MixedTls,
}

/// Where Redis is: one node, or the seed nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    urls: Vec<String>,
    cluster: bool,
}

impl Target {
    /// `urls` as `REDIS_URL` gives it; `cluster` as `REDIS_CLUSTER` does. Every URL is checked
    /// here, so a bad one stops the process at start-up with its reason.
    pub fn parse(urls: &str, cluster: bool) -> Result<Self, TargetError> {
        let urls: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(TargetError::Empty);
        }
        for url in &urls {
            url.as_str()
                .into_connection_info()
                .map_err(|e| TargetError::Url {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        }
        let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls != 0 && tls != urls.len() {
            return Err(TargetError::MixedTls);
        }
        let cluster = cluster || urls.len() > 1;
        Ok(Self { urls, cluster })
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The first URL: the node itself, or the first seed.
    pub fn first_url(&self) -> &str {
        &self.urls[0]
    }

    /// How the target is named in errors and logs.
    pub fn describe(&self) -> String {
        self.urls.join(",")
    }

    /// Connects with these bounds. One node gets a [`ConnectionManager`] (reconnects by
    /// itself); a cluster gets the crate's cluster connection, which follows slot moves and
    /// failovers.
    pub async fn connect(&self, timeouts: Timeouts) -> RedisResult<RedisConn> {
        if self.cluster {
            let mut builder = ClusterClientBuilder::new(self.urls.clone())
                .connection_timeout(timeouts.connect)
                .response_timeout(timeouts.response)
                .retries(timeouts.cluster_retries)
                // A failover takes the cluster a few seconds (node timeout + election): the
                // retries must span it rather than give up in the first hundred milliseconds.
                .min_retry_wait(100)
                .max_retry_wait(1_000);
            if self.urls[0].starts_with("rediss://") {
                builder = builder.tls(redis::TlsMode::Secure);
            }
            let client = builder.build()?;
            Ok(RedisConn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(self.urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeouts.connect))
                .set_response_timeout(Some(timeouts.response))
                .set_number_of_retries(timeouts.node_retries);
            Ok(RedisConn::Node(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
    }
}

/// Bounds on one connection's commands.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    /// Reconnection attempts of a one-node connection before a command fails.
    pub node_retries: usize,
    /// Attempts of a cluster command across MOVED, ASK and failovers before it fails.
    pub cluster_retries: u32,
}

impl Timeouts {
    pub fn new(connect: Duration, response: Duration) -> Self {
        Self {
            connect,
            response,
            node_retries: 1,
            cluster_retries: 6,
        }
    }
}

/// A connection to one node or to a cluster; cheap to clone (both multiplex one socket per
/// node), and usable wherever the redis crate takes a connection.
#[derive(Clone)]
pub enum RedisConn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Runs `cmd`, which names no key (`SCAN`, `WAIT`, `INFO`), on the master that holds
    /// `key`'s slot: on a cluster, where that key's neighbours are.
    pub async fn query_at<T: FromRedisValue>(&mut self, key: &str, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Self::Node(conn) => cmd.query_async(conn).await,
            Self::Cluster(conn) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                let value = conn.route_command(cmd.clone(), routing).await?;
                redis::from_redis_value(value).map_err(Into::into)
            }
        }
    }

    /// Runs commands whose replies do not matter, each naming the key it is routed by, in as
    /// few round trips as their slots allow: one pipeline on a single node, one per slot (sent
    /// together) on a cluster, where a pipeline must stay within one slot.
    pub async fn run_ignored(&mut self, cmds: Vec<(String, Cmd)>) -> RedisResult<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            for (_, cmd) in cmds {
                pipe.add_command(cmd).ignore();
            }
            return pipe.query_async(self).await;
        }
        let mut by_slot: std::collections::HashMap<Slot, redis::Pipeline> = Default::default();
        for (key, cmd) in cmds {
            by_slot
                .entry(Slot::for_key(&key))
                .or_insert_with(redis::pipe)
                .add_command(cmd)
                .ignore();
        }
        let sends = by_slot.into_values().map(|pipe| {
            let mut conn = self.clone();
            async move { pipe.query_async::<()>(&mut conn).await }
        });
        futures_util::future::try_join_all(sends).await.map(drop)
    }

    /// Every key matching `pattern`, which must carry the hash tag of the one slot its keys
    /// are in: on a cluster, `SCAN` walks that slot's master only.
    pub async fn scan_slot(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let cmd = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1_000)
                .to_owned();
            let (next, batch): (u64, Vec<String>) = self.query_at(pattern, &cmd).await?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// Every master's answer to `cmd` (one node: its answer), e.g. `CONFIG GET` where each
    /// master must qualify.
    pub async fn query_each_master(&mut self, cmd: &Cmd) -> RedisResult<Vec<Value>> {
        match self {
            Self::Node(conn) => Ok(vec![cmd.query_async(conn).await?]),
            Self::Cluster(conn) => {
                // No response policy: the crate answers a map of node address → its reply.
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match conn.route_command(cmd.clone(), routing).await? {
                    Value::Map(per_node) => Ok(per_node.into_iter().map(|(_, v)| v).collect()),
                    other => Ok(vec![other]),
                }
            }
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_one_node_unless_told() {
        let t = Target::parse("redis://127.0.0.1:6379", false).unwrap();
        assert!(!t.is_cluster());
        assert!(
            Target::parse("redis://127.0.0.1:6379", true)
                .unwrap()
                .is_cluster()
        );
    }

    #[test]
    fn a_list_is_a_cluster() {
        let t = Target::parse("redis://a:1, redis://b:2,redis://c:3", false).unwrap();
        assert!(t.is_cluster());
        assert_eq!(t.describe(), "redis://a:1,redis://b:2,redis://c:3");
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(matches!(
            Target::parse(" , ", false),
            Err(TargetError::Empty)
        ));
        assert!(matches!(
            Target::parse("redis://a:1,rediss://b:2", false),
            Err(TargetError::MixedTls)
        ));
        assert!(matches!(
            Target::parse("redis://a:1,http://b", false),
            Err(TargetError::Url { .. })
        ));
    }
}
