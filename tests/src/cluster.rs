//! A real Redis Cluster on loopback for one test: 3 masters and 3 replicas, each a
//! `redis-server --cluster-enabled yes` of its own, joined by `redis-cli --cluster create`.
//! Dropping the [`RedisCluster`] stops every node and removes their files.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test support: failing loudly is the point

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;

/// How long a node may be unreachable before the others fail it over. Short, so a test sees the
/// replica promoted within seconds; long enough that a loaded machine does not fail over a
/// node that is merely slow.
const NODE_TIMEOUT_MS: u64 = 2_000;

pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

struct Node {
    port: u16,
    child: Option<Child>,
}

impl RedisCluster {
    /// Starts six nodes and forms the cluster; returns once every slot is served and every
    /// replica is in sync with its master.
    pub fn start() -> Self {
        Self::start_with_replicas(1)
    }

    /// Three masters with `replicas` replicas each (0 for a benchmark that wants the masters'
    /// CPU alone on a small machine).
    pub fn start_with_replicas(replicas: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("meter-cluster-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let ports = cluster_ports(3 * (1 + replicas));
        let nodes = ports
            .iter()
            .map(|&port| Node {
                port,
                child: Some(spawn_node(&dir, port)),
            })
            .collect();
        let cluster = Self { dir, nodes };
        for node in &cluster.nodes {
            wait_for(Duration::from_secs(10), || ping(node.port));
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until_healthy(Duration::from_secs(60));
        cluster
    }

    /// Seed URLs as `REDIS_URL` takes them: every node, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URLs of the nodes that are masters now.
    pub fn master_urls(&self) -> Vec<String> {
        self.live_ports()
            .into_iter()
            .filter(|&port| {
                connect(port).is_some_and(|mut c| {
                    redis::cmd("INFO")
                        .arg("replication")
                        .query::<String>(&mut c)
                        .is_ok_and(|info| info.contains("role:master"))
                })
            })
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// A client of the cluster for the test's own reads.
    pub fn client(&self) -> ClusterClient {
        ClusterClient::new(
            self.nodes
                .iter()
                .map(|n| format!("redis://127.0.0.1:{}", n.port))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    /// The port of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        self.try_master_of(key)
            .unwrap_or_else(|| panic!("no live node knows the master of {key}"))
    }

    /// The same, as the first live node that answers sees it.
    fn try_master_of(&self, key: &str) -> Option<u16> {
        for port in self.live_ports() {
            let Some(mut conn) = connect(port) else {
                continue;
            };
            let Ok(slot) = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query::<u16>(&mut conn)
            else {
                continue;
            };
            let Ok(slots) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query::<Vec<redis::Value>>(&mut conn)
            else {
                continue;
            };
            for range in slots {
                let redis::Value::Array(parts) = range else {
                    continue;
                };
                let (Some(start), Some(end), Some(master)) = (
                    parts
                        .first()
                        .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok()),
                    parts
                        .get(1)
                        .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok()),
                    parts.get(2),
                ) else {
                    continue;
                };
                let redis::Value::Array(master) = master else {
                    continue;
                };
                let port = master
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok());
                if let Some(port) = port
                    && (start..=end).contains(&slot)
                {
                    return Some(port);
                }
            }
        }
        None
    }

    /// SIGKILLs the master serving `key` (what a crashed host does: nothing is flushed), and
    /// returns its port. The cluster promotes its replica after the node timeout.
    pub fn kill_master_of(&mut self, key: &str) -> u16 {
        let port = self.master_of(key);
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        let mut child = node.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        port
    }

    /// Whether a replica has taken over `key`'s slot from the dead master on `dead`.
    pub fn failed_over(&self, dead: u16, key: &str) -> bool {
        self.try_master_of(key).is_some_and(|p| p != dead)
    }

    /// Starts the node on `port` again, from its own cluster config: it rejoins the cluster, as
    /// a replica of whoever took over its slots.
    pub fn restart(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        assert!(node.child.is_none(), "node {port} is running");
        node.child = Some(spawn_node(&self.dir, port));
        wait_for(Duration::from_secs(10), || ping(port));
    }

    /// Waits until every slot is served by a live master again, and the live replicas are in
    /// sync.
    pub fn wait_until_healthy(&self, deadline: Duration) {
        wait_for(deadline, || {
            self.live_ports().into_iter().all(|port| {
                let Some(mut conn) = connect(port) else {
                    return false;
                };
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut conn)
                    .unwrap_or_default();
                let replication: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut conn)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            })
        });
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_node(dir: &std::path::Path, port: u16) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &format!("nodes-{port}.conf"),
            "--cluster-node-timeout",
            &NODE_TIMEOUT_MS.to_string(),
            "--dir",
            dir.to_str().unwrap(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            &format!("node-{port}.log"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed")
}

/// `n` ports that are free, and whose cluster bus port (+10000) is free too.
fn cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    // Hold every probe until all are chosen, so no two picks collide.
    let mut held = Vec::new();
    while ports.len() < n {
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let port = listener.local_addr().unwrap().port();
        if port > 55_000 {
            continue;
        }
        let Ok(bus) = std::net::TcpListener::bind(("127.0.0.1", port + 10_000)) else {
            continue;
        };
        ports.push(port);
        held.push((listener, bus));
    }
    ports
}

fn connect(port: u16) -> Option<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}

fn ping(port: u16) -> bool {
    connect(port).is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
}

fn wait_for(deadline: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the Redis Cluster did not become ready within {deadline:?}");
}
