//! The processes under load: finding (or building) the release binaries, and running Redis, the
//! mock upstream, the aggregator and the gateway as children that never outlive the harness.
//!
//! Every child is owned by one [`Children`] guard. Dropping it SIGKILLs and reaps them all, and
//! it is dropped on every way out of `main`: success, an error, a panic (unwinding), and Ctrl-C
//! or SIGTERM, which `main` turns into an early return.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ::tests::process::log_tail;
use anyhow::{Context, bail};
use tokio::time::Instant;

/// The three release binaries the benchmark runs.
pub struct Binaries {
    pub gateway: PathBuf,
    pub aggregator: PathBuf,
    pub mock_upstream: PathBuf,
}

impl Binaries {
    /// The binaries next to our own executable (`cargo run --release` puts them all in
    /// `target/release`), or, when one is missing or `rebuild` is set, whatever
    /// `cargo build --release` produces for them.
    pub fn locate(rebuild: bool) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the loadgen executable")?;
        let dir = exe
            .parent()
            .context("the loadgen executable has no parent directory")?;
        let beside = Self {
            gateway: dir.join("gateway"),
            aggregator: dir.join("aggregator"),
            mock_upstream: dir.join("mock-upstream"),
        };
        let all_there = [&beside.gateway, &beside.aggregator, &beside.mock_upstream]
            .iter()
            .all(|p| p.is_file());
        if all_there && !rebuild {
            return Ok(beside);
        }
        build()
    }
}

/// Runs `cargo build --release` for the three binaries and takes their paths from cargo's JSON
/// messages, so a custom target directory works too.
fn build() -> anyhow::Result<Binaries> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // This crate lives one level below the workspace root.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has no parent directory")?;
    eprintln!("loadgen: building release binaries (gateway, aggregator, mock-upstream)");
    let output = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .args([
            "--bin",
            "gateway",
            "--bin",
            "aggregator",
            "--bin",
            "mock-upstream",
        ])
        .current_dir(workspace)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        bail!("cargo build --release failed ({})", output.status);
    }
    let executable = |name: &str| -> anyhow::Result<PathBuf> {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo reported no executable for {name}"))
    };
    Ok(Binaries {
        gateway: executable("gateway")?,
        aggregator: executable("aggregator")?,
        mock_upstream: executable("mock-upstream")?,
    })
}

/// A free loopback port. Another process could take it between this call and the child's bind;
/// on a benchmark machine that race is rare, and the child then exits and is reported.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port on 127.0.0.1")
}

struct Running {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// Owner of every child process; see the module docs for when it kills them.
pub struct Children {
    running: Vec<Running>,
    log_dir: PathBuf,
    keep_logs: bool,
}

impl Children {
    /// Children write stdout and stderr to `<tmp>/meter-loadgen-<pid>/<name>.log`; the directory
    /// is removed on a clean finish and kept (and named) otherwise.
    pub fn new() -> anyhow::Result<Self> {
        let log_dir = std::env::temp_dir().join(format!("meter-loadgen-{}", std::process::id()));
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        Ok(Self {
            running: Vec::new(),
            log_dir,
            keep_logs: true,
        })
    }

    /// Starts `program` with exactly `env` (plus `PATH`), so nothing from the caller's shell,
    /// such as a `GATEWAY_CONFIG`, changes what is measured. Returns the child's pid.
    /// Where the children's logs go; also a private place for the gateway's spool.
    pub fn log_dir(&self) -> &std::path::Path {
        &self.log_dir
    }

    pub fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<u32> {
        let log = self.log_dir.join(format!("{name}.log"));
        let stdout = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stderr = stdout
            .try_clone()
            .with_context(|| format!("opening {} twice", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id();
        self.running.push(Running { name, child, log });
        Ok(pid)
    }

    /// Fails, with the end of its log, if any child has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for r in &mut self.running {
            if let Some(status) = r.child.try_wait().context("polling a child")? {
                bail!(
                    "{} exited ({status}); its log {} ends with:\n{}",
                    r.name,
                    r.log.display(),
                    log_tail(&r.log)
                );
            }
        }
        Ok(())
    }

    /// Polls `ready` every 20 ms until it holds, failing when a child dies or after `within`.
    pub async fn wait_until(
        &mut self,
        what: &str,
        within: Duration,
        mut ready: impl AsyncFnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if ready().await {
                return Ok(());
            }
            self.check_alive()
                .with_context(|| format!("waiting for {what}"))?;
            if Instant::now() >= deadline {
                bail!(
                    "{what} was not ready within {within:?} (logs in {})",
                    self.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Marks the run as clean: the log directory is removed when the children are.
    pub fn finish_cleanly(&mut self) {
        self.keep_logs = false;
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // Reverse start order: the gateway goes before the Redis it writes to. SIGKILL is
        // enough, nothing the children hold is worth a graceful shutdown here.
        while let Some(mut r) = self.running.pop() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        if self.keep_logs {
            eprintln!("loadgen: child logs kept in {}", self.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}

/// True once something accepts TCP connections on `addr`.
pub fn accepts_connections(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
