//! The pipeline on a real Redis Cluster (3 masters, 3 replicas on loopback) with partitioned
//! streams: two gateways and two aggregators, conservation and exact money across partitions,
//! limits exact across gateways, replay, and a master SIGKILLed under load.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use futures_util::future::join_all;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use shared::UsageEvent;
use tests::cluster::RedisCluster;
use tests::fixtures::hand_cost;
use tests::harness::{
    Pipeline, eventually, metric, redis_url, spawn_aggregator_with, spawn_gateway, unique_stream,
    wait_ready,
};
use tests::process::binary;
use tokio::sync::oneshot;

const PARTITIONS: u32 = 3;

/// Two gateways and two aggregators of one deployment on `cluster`.
struct Deployment {
    p: Pipeline,
    second_gateway: SocketAddr,
    second_aggregator: SocketAddr,
    _stops: Vec<oneshot::Sender<()>>,
}

impl Deployment {
    async fn start(cluster: &RedisCluster, min_replicas: u32) -> Self {
        let url = cluster.url();
        let gateway = move |g: &mut gateway::Args| {
            g.partitions = Some(PARTITIONS);
            g.min_replicas = Some(min_replicas);
        };
        let p = Pipeline::start_on(&url, gateway, |a| {
            a.partitions = Some(PARTITIONS);
            a.consumer = Some("first".into());
        })
        .await;
        // Before the second gateway starts, so it has the account from its first read.
        p.add_account("anthropic").await;
        let (second_gateway, stop_g) = spawn_gateway(&url, &p.stream, gateway).await;
        let (second_aggregator, stop_a) = spawn_aggregator_with(&url, &p.stream, |a| {
            a.partitions = Some(PARTITIONS);
            a.consumer = Some("second".into());
        })
        .await;
        wait_ready(&p.http, second_gateway).await;
        Self {
            p,
            second_gateway,
            second_aggregator,
            _stops: vec![stop_g, stop_a],
        }
    }

    /// The two gateways' `/v1/messages`.
    fn urls(&self) -> [String; 2] {
        [
            self.p.gateway_url("/v1/messages"),
            format!("http://{}/v1/messages", self.second_gateway),
        ]
    }

    /// Sends `n` requests, alternating gateways and spreading them over `secrets`, at most
    /// `concurrency` at a time; returns the statuses (0: no answer).
    async fn send(&self, secrets: &[String], n: usize, concurrency: usize) -> Vec<u16> {
        let urls = self.urls();
        let mut statuses = Vec::with_capacity(n);
        let requests: Vec<usize> = (0..n).collect();
        for wave in requests.chunks(concurrency) {
            let answers = join_all(wave.iter().map(|&i| {
                let model = if i % 3 == 0 {
                    "claude-sonnet-4-5"
                } else {
                    "claude-haiku-4-5"
                };
                let request = self
                    .p
                    .http
                    .post(&urls[i % 2])
                    .header("x-api-key", &secrets[i % secrets.len()])
                    .json(&json!({
                        "model": model, "max_tokens": 5, "stream": i % 4 == 1, "messages": [],
                    }));
                async move {
                    match request.send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            // A streamed answer counts once its body has been read whole.
                            match r.bytes().await {
                                Ok(_) => status,
                                Err(_) => 0,
                            }
                        }
                        Err(_) => 0,
                    }
                }
            }))
            .await;
            statuses.extend(answers);
        }
        statuses
    }

    /// Every event in every partition stream, decoded.
    async fn events(&self, cluster: &RedisCluster) -> Vec<UsageEvent> {
        let mut conn = cluster.client().get_async_connection().await.unwrap();
        let mut events = Vec::new();
        for part in 0..PARTITIONS {
            let entries: Vec<tests::harness::StreamEntry> = redis::cmd("XRANGE")
                .arg(format!("{}:{part}", self.p.stream))
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap();
            events.extend(
                entries
                    .into_iter()
                    .flat_map(|(_, fields)| fields)
                    .filter(|(name, _)| name == shared::EVENT_FIELD)
                    .map(|(_, bytes)| shared::decode(&bytes).unwrap()),
            );
        }
        events
    }

    async fn usage_at(&self, aggregator: SocketAddr, query: &str) -> Option<Value> {
        let r = self
            .p
            .http
            .get(format!("http://{aggregator}/v1/usage?{query}"))
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    }

    /// Waits until both aggregators report `requests` requests in total, then returns the
    /// first one's answer to `query`.
    async fn settled_usage(&self, requests: u64, query: &str) -> Value {
        eventually(Duration::from_secs(60), || async {
            for agg in [self.p.aggregator, self.second_aggregator] {
                let total = self.usage_at(agg, "").await?;
                if total["rows"][0]["requests"].as_u64() != Some(requests) {
                    return None;
                }
            }
            self.usage_at(self.p.aggregator, query).await
        })
        .await
    }
}

/// The events with each id once (a re-sent batch may have landed twice).
fn distinct(events: Vec<UsageEvent>) -> Vec<UsageEvent> {
    let mut seen = HashSet::new();
    events
        .into_iter()
        .filter(|e| seen.insert(e.id.clone()))
        .collect()
}

fn money(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap()).unwrap()
}

fn total_cost(events: &[UsageEvent]) -> Decimal {
    events.iter().map(hand_cost).sum()
}

/// `n` keys, at least one of them in partition 0.
async fn keys(d: &Deployment, n: usize) -> Vec<String> {
    let partitions = shared::Partitions::new(&d.p.stream, PARTITIONS).unwrap();
    let mut secrets = Vec::new();
    let mut in_first = false;
    let mut i = 0;
    while secrets.len() < n || !in_first {
        let (id, secret) = d.p.add_key(json!({"name": format!("team-{i}")})).await;
        in_first |= partitions.of_key(Some(&id)) == 0;
        if secrets.len() < n || partitions.of_key(Some(&id)) == 0 {
            secrets.push(secret);
        }
        i += 1;
    }
    secrets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_conserve_every_figure_and_a_replay_reproduces_them() {
    let cluster = RedisCluster::start();
    let d = Deployment::start(&cluster, 0).await;
    let secrets = keys(&d, 8).await;
    let statuses = d.send(&secrets, 240, 12).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let events = d.events(&cluster).await;
    assert_eq!(distinct(events.clone()).len(), 240);
    let by_partition: BTreeMap<usize, usize> = {
        let partitions = shared::Partitions::new(&d.p.stream, PARTITIONS).unwrap();
        let mut counts = BTreeMap::new();
        for e in &events {
            *counts
                .entry(partitions.of_key(e.key_id.as_deref()))
                .or_default() += 1;
        }
        counts
    };
    assert!(
        by_partition.len() > 1,
        "keys spread over partitions: {by_partition:?}"
    );

    let by_key = d.settled_usage(240, "group_by=key").await;
    let total = d.usage_at(d.p.aggregator, "").await.unwrap();
    let second = d.usage_at(d.second_aggregator, "").await.unwrap();
    assert_eq!(
        total["rows"], second["rows"],
        "both aggregators answer alike"
    );
    assert_eq!(money(&total["rows"][0]["cost_usd"]), total_cost(&events));
    let rows = by_key["rows"].as_array().unwrap();
    // Eight keys, or nine when none of the first eight fell in partition 0 (`keys`).
    assert_eq!(rows.len(), secrets.len(), "{by_key}");
    let mut per_key: BTreeMap<String, (u64, Decimal)> = BTreeMap::new();
    for e in &events {
        let entry = per_key.entry(e.key_id.clone().unwrap()).or_default();
        entry.0 += 1;
        entry.1 += hand_cost(e);
    }
    for row in rows {
        let (requests, cost) = per_key[row["key"].as_str().unwrap()];
        assert_eq!(row["requests"].as_u64(), Some(requests), "{row}");
        assert_eq!(money(&row["cost_usd"]), cost, "{row}");
        assert!(row["key_name"].as_str().unwrap().starts_with("team-"));
    }

    // `aggregator usage` reads every partition as the API does.
    let cli = Command::new(binary("aggregator", "aggregator"))
        .args(["usage", "--group-by", "model", "--json"])
        .env_clear()
        .env("REDIS_URL", cluster.url())
        .env("METER_STREAM", &d.p.stream)
        .env("METER_PARTITIONS", PARTITIONS.to_string())
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    let api = d.usage_at(d.p.aggregator, "group_by=model").await.unwrap();
    assert_eq!(cli["rows"], api["rows"]);

    // A replay with the prices in force rebuilds every partition to the same figures.
    let before = d
        .usage_at(d.p.aggregator, "group_by=key,model")
        .await
        .unwrap();
    let replay = Command::new(binary("aggregator", "aggregator"))
        .arg("replay")
        .env_clear()
        .env("REDIS_URL", cluster.url())
        .env("METER_STREAM", &d.p.stream)
        .env("METER_PARTITIONS", PARTITIONS.to_string())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert!(replay.status.success(), "replay failed: {stderr}");
    for part in 0..PARTITIONS {
        assert!(
            stderr.contains(&format!("partition {part}")),
            "each partition replayed: {stderr}"
        );
    }
    let after = d
        .usage_at(d.p.aggregator, "group_by=key,model")
        .await
        .unwrap();
    assert_eq!(before["rows"], after["rows"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_limit_is_exact_across_both_gateways_on_the_cluster() {
    let cluster = RedisCluster::start();
    let d = Deployment::start(&cluster, 0).await;
    let (_, secret) =
        d.p.add_key(json!({"name": "shared", "limits": [{"metric": "requests", "max": 10, "window_secs": 60}]}))
            .await;
    let statuses = d.send(&[secret], 40, 40).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_no_event_and_changes_no_figure() {
    let mut cluster = RedisCluster::start();
    let d = Deployment::start(&cluster, 1).await;
    let secrets = keys(&d, 6).await;
    // Warm every gateway's key cache, so the relay goes on from it while the master is gone.
    let warm = d.send(&secrets, 12, 12).await;
    assert!(warm.iter().all(|s| *s == 200), "{warm:?}");

    // The master of partition 0.
    let victim_key = format!("{}:0", d.p.stream);
    let started = std::time::Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Requests keep coming until the replica has served for a while.
    let load = async {
        let mut statuses = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            statuses.extend(d.send(&secrets, 24, 6).await);
        }
        statuses
    };
    let failover = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let port = cluster.kill_master_of(&victim_key);
        eprintln!(
            "killed the master on port {port} after {:?}",
            started.elapsed()
        );
        eventually(Duration::from_secs(60), || async {
            cluster.failed_over(port, &victim_key).then_some(())
        })
        .await;
        eprintln!("failed over after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        port
    };
    let (statuses, port) = tokio::join!(load, failover);
    eprintln!("{} requests until {:?}", statuses.len(), started.elapsed());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request answered: {statuses:?}"
    );
    // The old master comes back as the new one's replica, so the events waiting for a
    // replica's acknowledgement can land.
    tokio::task::block_in_place(|| {
        cluster.wait_until_healthy(Duration::from_secs(60));
        cluster.restart(port);
        cluster.wait_until_healthy(Duration::from_secs(60));
    });

    let answered = (12 + statuses.len()) as u64;
    let events = eventually(Duration::from_secs(60), || async {
        let events = distinct(d.events(&cluster).await);
        (events.len() as u64 >= answered).then_some(events)
    })
    .await;
    assert_eq!(
        events.len() as u64,
        answered,
        "one distinct event per request"
    );
    let usage = d.settled_usage(answered, "").await;
    assert_eq!(money(&usage["rows"][0]["cost_usd"]), total_cost(&events));
    // The kill fell inside the load: events of partition 0 were kept back, in the spool or
    // for want of a replica's acknowledgement, and sent again.
    let mut held_back = 0;
    for gateway in [d.p.gateway, d.second_gateway] {
        for name in [
            "meter_gateway_events_spooled_total",
            "meter_gateway_replica_waits_failed_total",
            "meter_gateway_limits_failed_open_total",
            "meter_gateway_events_published_total",
        ] {
            let n = metric::<u64>(&d.p.http, gateway, name).await.unwrap_or(0);
            eprintln!("{gateway} {name} {n}");
            held_back += n;
        }
    }
    assert!(held_back > 0, "the failover was under load");
}

#[tokio::test]
async fn a_process_with_another_partition_count_refuses_to_start() {
    let stream = unique_stream();
    let (_aggregator, _stop) = spawn_aggregator_with(redis_url(), &stream, |_| {}).await;
    // The aggregator has recorded one partition; a gateway configured with three must refuse.
    let recorded = eventually(Duration::from_secs(10), || async {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let np: Option<u32> = redis::cmd("HGET")
            .arg(shared::Keyspace::new(&stream).unwrap().key("ctl"))
            .arg("np")
            .query_async(&mut conn)
            .await
            .ok()?;
        np
    })
    .await;
    assert_eq!(recorded, 1);
    for bin in ["gateway", "aggregator"] {
        let out = Command::new(binary(bin, bin))
            .env_clear()
            .env("REDIS_URL", redis_url())
            .env("METER_STREAM", &stream)
            .env("METER_PARTITIONS", "3")
            .env("GATEWAY_LISTEN", "127.0.0.1:0")
            .env("AGGREGATOR_LISTEN", "127.0.0.1:0")
            .env(
                "GATEWAY_SPOOL_DIR",
                std::env::temp_dir().join(format!("spool-{stream}")),
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} started: {stderr}");
        assert!(
            stderr.contains("3 partition(s)") && stderr.contains("has 1"),
            "{bin} names both counts: {stderr}"
        );
    }
}
