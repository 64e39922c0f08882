//! Starts the pipeline for one test: a private Redis (or `REDIS_URL`), the mock upstream, the
//! gateway and the aggregator in-process on port 0, all under a stream name no other test uses,
//! which gives each test its own keyspace. Dropping the [`Pipeline`] shuts the servers down.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test support: failing loudly is the point

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::mock_upstream::MockUpstream;

pub const ADMIN_TOKEN: &str = "admin";

/// The Redis all tests of this process share (keyspaces keep them apart): `REDIS_URL` when set,
/// else a private `redis-server` on a free port that dies with this process.
pub fn redis_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("REDIS_URL") {
            return url;
        }
        let port = free_port();
        // The shell keeps reading our stdin; when this process exits the pipe closes, `read`
        // returns and the private Redis is stopped, so no server outlives the test run.
        let script = format!(
            "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no --logfile '' --loglevel warning & pid=$!; read _; kill $pid"
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (or set REDIS_URL)");
        // Leak the handle on purpose: its stdin must stay open for the life of the process.
        std::mem::forget(child);
        let url = format!("redis://127.0.0.1:{port}");
        wait_for_redis(&url);
        url
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A port where connections are refused, which no server of the test can be given while the
/// returned socket lives: bound but never listening (a port from [`free_port`] may be handed
/// to the next listener that binds port 0).
pub fn refusing_port() -> (u16, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (port, socket)
}

fn wait_for_redis(url: &str) {
    let client = redis::Client::open(url).expect("valid url");
    for _ in 0..200 {
        if let Ok(mut conn) = client.get_connection()
            && redis::cmd("PING").query::<String>(&mut conn).is_ok()
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("redis-server at {url} did not start");
}

/// A stream name, and so a keyspace, that no other test uses.
pub fn unique_stream() -> String {
    format!("test:{}", uuid::Uuid::new_v4().simple())
}

/// An `XRANGE` entry: id and field/value pairs.
pub type StreamEntry = (String, Vec<(String, Vec<u8>)>);

pub struct Pipeline {
    pub redis_url: String,
    pub stream: String,
    pub upstream: MockUpstream,
    pub gateway: SocketAddr,
    pub aggregator: SocketAddr,
    pub http: reqwest::Client,
    stops: Vec<oneshot::Sender<()>>,
}

impl Pipeline {
    /// Redis, mock upstream, gateway and aggregator, ready to serve.
    pub async fn start() -> Self {
        Self::start_with(redis_url(), |_| {}).await
    }

    /// The same on a given Redis, with the gateway's settings adjusted by `tweak`.
    pub async fn start_with(redis_url: &str, tweak: impl FnOnce(&mut gateway::Args)) -> Self {
        Self::start_on(redis_url, tweak, |_| {}).await
    }

    /// The same, with the aggregator's settings adjusted too (a cluster's partitions, say).
    pub async fn start_on(
        redis_url: &str,
        tweak: impl FnOnce(&mut gateway::Args),
        tweak_aggregator: impl FnOnce(&mut aggregator::Args),
    ) -> Self {
        let redis_url = redis_url.to_owned();
        let stream = unique_stream();
        let upstream = MockUpstream::spawn().await;
        let mut stops = Vec::new();

        let (gateway, stop) = spawn_gateway(&redis_url, &stream, tweak).await;
        stops.push(stop);
        let (aggregator, stop) = spawn_aggregator_with(&redis_url, &stream, tweak_aggregator).await;
        stops.push(stop);
        let pipeline = Self {
            redis_url,
            stream,
            upstream,
            gateway,
            aggregator,
            http: reqwest::Client::new(),
            stops,
        };
        pipeline.wait_ready().await;
        pipeline
    }

    async fn wait_ready(&self) {
        eventually(Duration::from_secs(10), || async {
            let gw = self
                .http
                .get(format!("http://{}/readyz", self.gateway))
                .send()
                .await;
            let agg = self
                .http
                .get(format!("http://{}/healthz", self.aggregator))
                .send()
                .await;
            matches!((gw, agg), (Ok(a), Ok(b)) if a.status() == 200 && b.status() == 200)
                .then_some(())
        })
        .await;
    }

    pub fn gateway_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway)
    }

    /// `POST /v1/messages` on the gateway with a client key, body still to add.
    pub fn messages(&self, secret: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.gateway_url("/v1/messages"))
            .header("x-api-key", secret)
    }

    pub fn aggregator_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.aggregator)
    }

    /// POSTs an admin request; returns status and JSON body.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, self.gateway_url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// An upstream account on the mock for `provider`; returns its id.
    pub async fn add_account(&self, provider: &str) -> String {
        self.add_account_at(provider, &self.upstream.base_url(), json!({}))
            .await
    }

    /// An upstream account at `base_url`, with extra fields (priority, models, ...) merged in.
    pub async fn add_account_at(&self, provider: &str, base_url: &str, extra: Value) -> String {
        let mut body = json!({
            "name": format!("mock-{provider}"),
            "provider": provider,
            "base_url": format!("{base_url}/v1"),
            "api_key": format!("sk-upstream-{provider}"),
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let (status, body) = self
            .admin(reqwest::Method::POST, "/admin/accounts", Some(body))
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// A client key; returns (id, secret).
    pub async fn add_key(&self, body: Value) -> (String, String) {
        let (status, body) = self
            .admin(reqwest::Method::POST, "/admin/keys", Some(body))
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["key"].as_str().unwrap().to_owned(),
        )
    }

    /// Every event on this pipeline's stream, decoded, in stream order.
    pub async fn events(&self) -> Vec<shared::UsageEvent> {
        let client = redis::Client::open(self.redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(&self.stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        entries
            .into_iter()
            .flat_map(|(_, fields)| fields)
            .filter(|(name, _)| name == shared::EVENT_FIELD)
            .map(|(_, bytes)| shared::decode(&bytes).unwrap())
            .collect()
    }

    /// Waits until the stream holds `n` events and returns them.
    pub async fn wait_for_events(&self, n: usize) -> Vec<shared::UsageEvent> {
        eventually(Duration::from_secs(10), || async {
            let events = self.events().await;
            (events.len() >= n).then_some(events)
        })
        .await
    }

    /// `GET /v1/usage?<query>`, or `None` while the aggregator cannot answer (e.g. its Redis
    /// connection is being re-established).
    pub async fn try_usage(&self, query: &str) -> Option<Value> {
        let response = self
            .http
            .get(self.aggregator_url(&format!("/v1/usage?{query}")))
            .send()
            .await
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        response.json().await.ok()
    }

    /// `GET /v1/usage?<query>` on the aggregator.
    pub async fn usage(&self, query: &str) -> Value {
        let response = self
            .http
            .get(self.aggregator_url(&format!("/v1/usage?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// An in-process gateway on a free port, with its own spool; it stops when the returned
/// sender is sent or dropped. Several may share one Redis and stream, as replicas do.
pub async fn spawn_gateway(
    redis_url: &str,
    stream: &str,
    tweak: impl FnOnce(&mut gateway::Args),
) -> (SocketAddr, oneshot::Sender<()>) {
    let (addr, stop, _) = spawn_gateway_joinable(redis_url, stream, tweak).await;
    (addr, stop)
}

/// [`spawn_gateway`], with a handle that ends when the gateway's graceful shutdown has
/// finished (every request drained, its background tasks stopped).
pub async fn spawn_gateway_joinable(
    redis_url: &str,
    stream: &str,
    tweak: impl FnOnce(&mut gateway::Args),
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let mut args = gateway::Args {
        listen: Some("127.0.0.1:0".into()),
        redis_url: Some(redis_url.to_owned()),
        stream: Some(stream.to_owned()),
        admin_token: Some(ADMIN_TOKEN.into()),
        spool_dir: Some(
            std::env::temp_dir().join(format!("meter-spool-{}", uuid::Uuid::new_v4().simple())),
        ),
        ..gateway::Args::default()
    };
    tweak(&mut args);
    let config = gateway::Config::build(args).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        gateway::run(listener, config, async {
            let _ = rx.await;
        })
        .await
        .expect("gateway failed")
    });
    (addr, tx, done)
}

/// Writes events straight to the stream, as a gateway would, in one pipeline.
pub async fn xadd_events(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    events: &[shared::UsageEvent],
) {
    let mut pipe = redis::pipe();
    for e in events {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(shared::EVENT_FIELD)
            .arg(shared::encode(e))
            .ignore();
    }
    pipe.query_async::<()>(conn).await.unwrap();
}

/// An in-process aggregator on a free port; it stops when the returned sender is sent or dropped.
pub async fn spawn_aggregator(redis_url: &str, stream: &str) -> (SocketAddr, oneshot::Sender<()>) {
    spawn_aggregator_with(redis_url, stream, |_| {}).await
}

/// The same, with the aggregator's settings adjusted by `tweak`.
pub async fn spawn_aggregator_with(
    redis_url: &str,
    stream: &str,
    tweak: impl FnOnce(&mut aggregator::Args),
) -> (SocketAddr, oneshot::Sender<()>) {
    let mut args = aggregator::Args {
        listen: Some("127.0.0.1:0".into()),
        redis_url: Some(redis_url.into()),
        stream: Some(stream.into()),
        ..aggregator::Args::default()
    };
    tweak(&mut args);
    let config = aggregator::Config::build(args).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        aggregator::run(listener, config, async {
            let _ = rx.await;
        })
        .await
        .expect("aggregator failed")
    });
    (addr, tx)
}

/// Waits until the gateway at `addr` answers `/readyz` with 200 (its Redis is reachable).
pub async fn wait_ready(http: &reqwest::Client, addr: SocketAddr) {
    eventually(Duration::from_secs(20), || async {
        let r = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// The `gateway` binary on `127.0.0.1:port` (returned as its address too), for a test that
/// kills or restarts one: the [`ADMIN_TOKEN`], its spool in `spool`, and `extra` settings on
/// top. Ready once [`wait_ready`] returns.
pub fn gateway_process(
    redis_url: &str,
    stream: &str,
    port: u16,
    spool: &std::path::Path,
    extra: &[(&str, String)],
) -> (crate::process::Process, SocketAddr) {
    let mut env = vec![
        ("REDIS_URL", redis_url.to_owned()),
        ("METER_STREAM", stream.to_owned()),
        ("GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
        ("ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("GATEWAY_SPOOL_DIR", spool.display().to_string()),
    ];
    env.extend(extra.iter().cloned());
    let process = crate::process::Process::spawn("gateway", "gateway", &env);
    (process, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Through the admin API of the gateway at `addr`: an Anthropic account at `upstream` (a base
/// URL), then a key made from `key`. Returns the key as created (`key` is the secret).
pub async fn account_and_key(
    http: &reqwest::Client,
    addr: SocketAddr,
    upstream: &str,
    key: Value,
) -> Value {
    let admin = |path: &str, body: Value| {
        http.post(format!("http://{addr}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let account =
        json!({"name": "m", "provider": "anthropic", "base_url": upstream, "api_key": "sk-m"});
    let created = admin("/admin/accounts", account).await.unwrap();
    assert_eq!(created.status(), 201);
    let created = admin("/admin/keys", key).await.unwrap();
    assert_eq!(created.status(), 201);
    created.json().await.unwrap()
}

/// The value of a counter or gauge in the `/metrics` of the server at `addr` (`host:port`), if
/// it is there; `name` is the whole series, labels included (`name{kind="x"}`).
pub async fn metric<T: std::str::FromStr>(
    http: &reqwest::Client,
    addr: impl std::fmt::Display,
    name: &str,
) -> Option<T> {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `probe` until it returns `Some`, or panics after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `redis-server` of one test's own, with an append-only file, so the test can stop and
/// restart it without losing what it held (as a production Redis with persistence would).
pub struct RedisServer {
    pub port: u16,
    dir: std::path::PathBuf,
    /// Further `redis-server` settings, e.g. `--maxmemory-policy allkeys-lru`.
    extra_args: Vec<String>,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// The same, with further `redis-server` settings, kept across restarts.
    pub fn start_with(extra_args: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "meter-redis-{port}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port,
            dir,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", ""])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        wait_for_redis(&self.url());
    }

    /// Starts the server again with nothing in it, as a Redis without persistence comes back
    /// after a restart.
    pub fn restart_empty(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
        self.restart();
    }

    /// SIGTERM: Redis flushes its append-only file and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
