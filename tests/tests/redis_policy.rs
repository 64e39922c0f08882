//! Both binaries refuse a Redis that may evict keys (`shared::redis_policy`): dedupe sets,
//! spend buckets, cells and leases carry TTLs, and an evicting Redis drops them silently.
//! Each test runs its own `redis-server` with the policy under test.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use tests::harness::{RedisServer, unique_stream};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How a start-up ended: the process returned this error, or it served.
#[derive(Debug)]
enum Started {
    Refused(String),
    Serving,
}

/// Runs `run` until it returns (a refusal) or `ready` answers 200 on its address. The
/// deadline is generous: a refusal comes after one round trip, a start after a few.
async fn start<F, E>(
    run: impl FnOnce(TcpListener, oneshot::Receiver<()>) -> F,
    ready: &str,
) -> (Started, oneshot::Sender<()>)
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{ready}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(run(listener, stopped));
    let http = reqwest::Client::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if task.is_finished() {
            let outcome = match task.await.unwrap() {
                Err(e) => Started::Refused(e.to_string()),
                Ok(()) => Started::Refused("returned without an error".into()),
            };
            return (outcome, stop);
        }
        if let Ok(response) = http.get(&url).send().await
            && response.status() == 200
        {
            return (Started::Serving, stop);
        }
        assert!(
            tokio::time::Instant::now() < until,
            "neither served nor refused within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_gateway(
    redis: &RedisServer,
    tweak: impl FnOnce(&mut gateway::Args),
) -> (Started, oneshot::Sender<()>) {
    let stream = unique_stream();
    let mut args = gateway::Args {
        redis_url: Some(redis.url()),
        stream: Some(stream.clone()),
        spool_dir: Some(std::env::temp_dir().join(format!("meter-spool-{stream}"))),
        ..gateway::Args::default()
    };
    tweak(&mut args);
    let config = gateway::Config::build(args).unwrap();
    start(
        |listener, stopped| {
            gateway::run(listener, config, async {
                let _ = stopped.await;
            })
        },
        "/readyz",
    )
    .await
}

async fn start_aggregator(
    redis: &RedisServer,
    tweak: impl FnOnce(&mut aggregator::Args),
) -> (Started, oneshot::Sender<()>) {
    let mut args = aggregator::Args {
        redis_url: Some(redis.url()),
        stream: Some(unique_stream()),
        ..aggregator::Args::default()
    };
    tweak(&mut args);
    let config = aggregator::Config::build(args).unwrap();
    start(
        |listener, stopped| {
            aggregator::run(listener, config, async {
                let _ = stopped.await;
            })
        },
        "/healthz",
    )
    .await
}

#[track_caller]
fn assert_refused_for_eviction(started: &Started, policy: &str) {
    match started {
        Started::Refused(error) => {
            assert!(
                error.contains(&format!("maxmemory-policy {policy}")),
                "{error}"
            );
            assert!(
                error.contains("CONFIG SET maxmemory-policy noeviction"),
                "{error}"
            );
        }
        Started::Serving => panic!("started on a Redis with maxmemory-policy {policy}"),
    }
}

#[tokio::test]
async fn the_gateway_refuses_to_start_on_a_redis_that_evicts_keys() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let (started, _stop) = start_gateway(&redis, |_| {}).await;
    assert_refused_for_eviction(&started, "allkeys-lru");
}

#[tokio::test]
async fn the_aggregator_refuses_to_start_on_a_redis_that_evicts_keys() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "volatile-lru"]);
    let (started, _stop) = start_aggregator(&redis, |_| {}).await;
    assert_refused_for_eviction(&started, "volatile-lru");
}

#[tokio::test]
async fn both_start_on_a_redis_that_never_evicts() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let (gateway, _stop_gateway) = start_gateway(&redis, |_| {}).await;
    assert!(matches!(gateway, Started::Serving), "{gateway:?}");
    let (aggregator, _stop_aggregator) = start_aggregator(&redis, |_| {}).await;
    assert!(matches!(aggregator, Started::Serving), "{aggregator:?}");
}

/// Managed Redis offerings often rename or forbid `CONFIG`: the check cannot be made there,
/// which is logged, and both start.
#[tokio::test]
async fn both_start_where_the_policy_cannot_be_read() {
    let redis = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let (gateway, _stop_gateway) = start_gateway(&redis, |_| {}).await;
    assert!(matches!(gateway, Started::Serving), "{gateway:?}");
    let (aggregator, _stop_aggregator) = start_aggregator(&redis, |_| {}).await;
    assert!(matches!(aggregator, Started::Serving), "{aggregator:?}");
}

/// Runs a built binary until it exits, or kills it after `deadline`: `None` means it was still
/// running, i.e. it started.
fn exit_of(
    bin: &str,
    args: &[&str],
    env: &[(&str, String)],
    deadline: Duration,
) -> Option<(i32, String)> {
    let log = std::env::temp_dir().join(format!(
        "meter-policy-{}.log",
        uuid::Uuid::new_v4().simple()
    ));
    let file = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(tests::process::binary(bin, bin))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    status.map(|s| (s.code().unwrap_or(-1), output))
}

/// The binaries exit with status 1 and say why, for the server and for `aggregator replay`.
#[test]
fn the_binaries_exit_with_the_policy_and_the_fix() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let stream = unique_stream();
    let env = [
        ("REDIS_URL", redis.url()),
        ("METER_STREAM", stream.clone()),
        // Port 0: a port picked in advance could be taken meanwhile, a failure for another
        // reason.
        ("GATEWAY_LISTEN", "127.0.0.1:0".to_owned()),
        ("AGGREGATOR_LISTEN", "127.0.0.1:0".to_owned()),
        (
            "GATEWAY_SPOOL_DIR",
            std::env::temp_dir()
                .join(format!("meter-spool-{stream}"))
                .display()
                .to_string(),
        ),
    ];
    // Generous: a refusal takes one round trip; a binary still running after this started.
    let deadline = Duration::from_secs(60);
    for (bin, args) in [
        ("gateway", &[][..]),
        ("aggregator", &[][..]),
        ("aggregator", &["replay"][..]),
    ] {
        let (code, output) = exit_of(bin, args, &env, deadline)
            .unwrap_or_else(|| panic!("{bin} {args:?} started on a Redis with allkeys-lru"));
        assert_eq!(code, 1, "{bin} {args:?}: {output}");
        assert!(
            output.contains("maxmemory-policy allkeys-lru"),
            "{bin} {args:?}: {output}"
        );
        assert!(
            output.contains("CONFIG SET maxmemory-policy noeviction"),
            "{bin} {args:?}: {output}"
        );
    }
}

/// The operator may accept the risk explicitly; both then start (and log an error saying so).
#[tokio::test]
async fn both_start_on_an_evicting_redis_when_eviction_is_explicitly_allowed() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let (gateway, _stop_gateway) =
        start_gateway(&redis, |args| args.allow_redis_eviction = true).await;
    assert!(matches!(gateway, Started::Serving), "{gateway:?}");
    let (aggregator, _stop_aggregator) =
        start_aggregator(&redis, |args| args.allow_redis_eviction = true).await;
    assert!(matches!(aggregator, Started::Serving), "{aggregator:?}");
}
