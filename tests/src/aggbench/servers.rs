//! The two processes the benchmark runs: a private `redis-server` and the release `aggregator`.
//!
//! Each is owned by a [`ChildGuard`] that SIGKILLs and reaps it when dropped, and the guards are
//! dropped on every way out of `main`: success, an error, a panic (unwinding), and Ctrl-C or
//! SIGTERM, which `main` turns into dropping the benchmark future. So no server outlives a run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

/// A child process that dies with its guard.
pub struct ChildGuard {
    name: &'static str,
    child: Child,
}

impl ChildGuard {
    pub fn new(name: &'static str, child: Child) -> Self {
        Self { name, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited, with its exit status.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited unexpectedly: {status}", self.name),
            Err(e) => Err(e).with_context(|| format!("checking on {}", self.name)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now. Another process could take it before our child binds
/// it; on a loopback benchmark machine that race is rare enough to accept.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A private, non-persistent Redis on a free loopback port.
pub struct Redis {
    pub url: String,
    pub version: String,
    guard: ChildGuard,
}

impl Redis {
    pub async fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--logfile", "", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed?)")?;
        let mut guard = ChildGuard {
            name: "redis-server",
            child,
        };
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = connect(&url).await
                && let Ok(info) = redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut conn)
                    .await
            {
                let version = info_field(&info, "redis_version").unwrap_or("?").to_owned();
                return Ok(Self {
                    url,
                    version,
                    guard,
                });
            }
            guard.check_alive()?;
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.guard.check_alive()
    }
}

/// A connection of our own. The client's default 500 ms response timeout is too short for a
/// pipeline of a thousand `XADD`s on a busy two-core machine, so it is raised.
pub async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url).with_context(|| format!("invalid Redis URL {url}"))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// The value of `name:` in `INFO` output.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The release `aggregator` next to our own executable (`cargo run --release` puts both in
/// `target/release`), or, when it is missing or `rebuild` is set, what `cargo build --release`
/// produces. Without `rebuild` an existing binary is used as it is, even if the sources changed
/// since; its age is printed so a stale one stands out.
pub fn aggregator_binary(rebuild: bool) -> anyhow::Result<PathBuf> {
    release_binary("aggregator", rebuild)
}

/// The same for any binary of the workspace (`gateway`, `mock-upstream`, ...).
pub fn release_binary(name: &str, rebuild: bool) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating our own executable")?;
    let beside = exe
        .parent()
        .context("our executable has no parent directory")?
        .join(name);
    let path = if beside.is_file() && !rebuild {
        beside
    } else {
        build(name)?
    };
    let age = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    match age {
        Some(age) => eprintln!(
            "aggbench: using {} (built {} s ago; --rebuild to rebuild)",
            path.display(),
            age.as_secs()
        ),
        None => eprintln!("aggbench: using {}", path.display()),
    }
    Ok(path)
}

/// Runs `cargo build --release --bin <name>` and takes the path from cargo's JSON messages, so
/// a custom target directory works too.
fn build(name: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // This crate lives one level below the workspace root.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has no parent directory")?;
    eprintln!("aggbench: building the release {name}");
    let output = Command::new(&cargo)
        .args(["build", "--release", "--bin", name])
        .arg("--message-format=json")
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", cargo.to_string_lossy()))?;
    if !output.status.success() {
        bail!(
            "cargo build --release --bin {name} failed: {}",
            output.status
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo did not report the {name} executable"))
}

/// Starts the aggregator on `listen`, consuming the `partitions` partitions of `stream` with its
/// default group (`aggregator`, created at the start of each stream). `redis_url` is one URL or
/// a cluster's comma-separated seeds. Its warnings go to our stderr.
pub fn spawn_aggregator(
    binary: &Path,
    redis_url: &str,
    stream: &str,
    partitions: u32,
    listen: SocketAddr,
) -> anyhow::Result<ChildGuard> {
    let child = Command::new(binary)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("REDIS_URL", redis_url)
        .env("METER_STREAM", stream)
        .env("METER_PARTITIONS", partitions.to_string())
        .env("METER_CONSUMER", "aggbench")
        .env("AGGREGATOR_LISTEN", listen.to_string())
        .env("RUST_LOG", "warn")
        // Batching knobs pass through, so their effect can be measured.
        .envs(
            ["METER_BATCH_SIZE", "METER_COMMIT_EVENTS", "METER_LINGER_MS"]
                .into_iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k, v))),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(ChildGuard {
        name: "aggregator",
        child,
    })
}
