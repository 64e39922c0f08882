//! A batch of usage events that reached the stream while its reply was lost is not counted twice
//! when the gateway sends it again, however long the outage in between (longer than the
//! aggregator's dedupe window here).
//!
//! A TCP proxy between the gateway and Redis forwards the gateway's batch, withholds Redis's
//! reply, waits until the batch is in the stream, then cuts every connection and refuses new ones
//! until the entry is more than two dedupe windows old, then lets traffic through again.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tests::harness::{
    ADMIN_TOKEN, StreamEntry, eventually, metric, redis_url, spawn_aggregator_with, spawn_gateway,
};
use tests::mock_upstream::MockUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const DEDUPE_WINDOW_SECS: i64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward both ways.
    Pass,
    /// Forward both ways until the gateway sends a command naming the bare stream (its batch);
    /// from then on, withhold every reply on that connection.
    Armed,
    /// A batch was forwarded and its reply is being withheld.
    Holding,
    /// Accept and close at once, as a Redis that is down.
    Refuse,
}

struct Shared {
    mode: Mutex<Mode>,
    /// `\r\n<stream>\r\n`: the stream's name as a whole RESP argument. Every other key of the
    /// deployment is `{<stream>}:…`, so only the batch's command matches.
    marker: Vec<u8>,
    /// Bumped to drop every open connection.
    cut: watch::Sender<u64>,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

struct CutProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl CutProxy {
    async fn start(upstream: SocketAddr, stream: &str) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            marker: format!("\r\n{stream}\r\n").into_bytes(),
            cut: watch::channel(0).0,
        });
        let accepting = Arc::clone(&shared);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accepting.mode() == Mode::Refuse {
                    continue; // dropped: the connection is closed at once
                }
                tokio::spawn(relay(client, upstream, Arc::clone(&accepting)));
            }
        });
        CutProxy { addr, shared }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Cuts every connection and refuses new ones.
    fn go_down(&self) {
        self.shared.set(Mode::Refuse);
        self.shared.cut.send_modify(|n| *n += 1);
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let mut cut = shared.cut.subscribe();
    let withhold = AtomicBool::new(false);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async {
        let mut buf = vec![0; 64 * 1024];
        // The end of the previous read too, so a marker split across two reads is still found.
        let mut recent: Vec<u8> = Vec::new();
        loop {
            let n = client_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let chunk = &buf[..n];
            recent.extend_from_slice(chunk);
            let found = recent
                .windows(shared.marker.len())
                .any(|w| w == shared.marker);
            // Short of a whole marker, so one is never found twice.
            recent.drain(..recent.len().saturating_sub(shared.marker.len() - 1));
            if shared.mode() == Mode::Armed && found {
                // Before the bytes go on, so the reply cannot slip through.
                withhold.store(true, Ordering::SeqCst);
                shared.set(Mode::Holding);
            }
            if server_write.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = server_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if withhold.load(Ordering::SeqCst) {
                continue;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = cut.changed() => {}
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Stream entry ids, oldest first.
async fn entry_ids(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<String> {
    let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    entries.into_iter().map(|(id, _)| id).collect()
}

/// True once the aggregator's group has been handed the stream's last entry and has
/// acknowledged everything it was handed.
async fn aggregator_caught_up(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> bool {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap_or_default();
    let [group] = groups.as_slice() else {
        return false;
    };
    let pending = group
        .get("pending")
        .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok());
    let delivered = group
        .get("last-delivered-id")
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
    let last = entry_ids(conn, stream).await.pop();
    pending == Some(0) && delivered.is_some() && delivered == last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_reply_was_lost_counts_once_after_an_outage_longer_than_the_dedupe_window() {
    let stream = tests::harness::unique_stream();
    let redis_addr: SocketAddr = redis_url().trim_start_matches("redis://").parse().unwrap();
    let proxy = CutProxy::start(redis_addr, &stream).await;
    let upstream = MockUpstream::spawn().await;
    let (gateway, _stop_gateway) = spawn_gateway(&proxy.url(), &stream, |_| {}).await;
    let (aggregator, _stop_aggregator) = spawn_aggregator_with(redis_url(), &stream, |args| {
        args.dedupe_window_secs = Some(DEDUPE_WINDOW_SECS);
    })
    .await;
    let http = reqwest::Client::new();
    let admin = |path: &str, body: Value| {
        http.post(format!("http://{gateway}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    eventually(Duration::from_secs(10), || async {
        let ready = http.get(format!("http://{gateway}/readyz")).send().await;
        ready.is_ok_and(|r| r.status() == 200).then_some(())
    })
    .await;
    let account = admin(
        "/admin/accounts",
        json!({"name": "mock", "provider": "anthropic", "api_key": "sk-upstream",
               "base_url": format!("{}/v1", upstream.base_url())}),
    )
    .await
    .unwrap();
    assert_eq!(account.status(), 201);
    let key: Value = admin("/admin/keys", json!({"name": "lost-reply"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = key["key"].as_str().unwrap().to_owned();
    let send = || async {
        let response = http
            .post(format!("http://{gateway}/v1/messages"))
            .header("x-api-key", &secret)
            .json(
                &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [],
                          "mock": {"input_tokens": 10, "output_tokens": 2}}),
            )
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        response.bytes().await.unwrap();
        status
    };
    let mut conn = redis().await;

    // A first event goes through normally (and loads whatever the publisher needs in Redis).
    assert_eq!(send().await, 200);
    eventually(Duration::from_secs(10), || async {
        (entry_ids(&mut redis().await, &stream).await.len() == 1).then_some(())
    })
    .await;

    // The second event's batch reaches Redis, its reply does not.
    proxy.shared.set(Mode::Armed);
    assert_eq!(send().await, 200);
    let ids = eventually(Duration::from_secs(10), || async {
        let ids = entry_ids(&mut redis().await, &stream).await;
        (ids.len() == 2 && proxy.shared.mode() == Mode::Holding).then_some(ids)
    })
    .await;
    proxy.go_down();
    eventually(Duration::from_secs(10), || async {
        (metric::<i64>(&http, gateway, "meter_gateway_events_spooled_total").await? >= 1)
            .then_some(())
    })
    .await;

    // Down until the entry is more than two dedupe windows old: a copy arriving after that is
    // outside every window the aggregator checks.
    let landed_ms: u128 = ids[1].split('-').next().unwrap().parse().unwrap();
    let up_at = landed_ms + 2 * DEDUPE_WINDOW_SECS as u128 * 1_000 + 1_000;
    eventually(Duration::from_secs(30), || async {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        (now >= up_at).then_some(())
    })
    .await;
    proxy.shared.set(Mode::Pass);

    // The gateway re-sends its spool; then the aggregator reads everything there is.
    eventually(Duration::from_secs(30), || async {
        let spool = metric::<i64>(&http, gateway, "meter_gateway_spool_bytes").await?;
        let pending = metric::<i64>(&http, gateway, "meter_gateway_events_pending").await?;
        (spool == 0 && pending == 0).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), || async {
        aggregator_caught_up(&mut redis().await, &stream)
            .await
            .then_some(())
    })
    .await;
    let usage: Value = http
        .get(format!("http://{aggregator}/v1/usage"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = entry_ids(&mut conn, &stream).await.len();
    assert_eq!(
        usage["rows"][0]["requests"], 2,
        "2 requests; the stream holds {entries} entries"
    );
}
