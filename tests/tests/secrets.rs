//! Secrets never leak ("no secret appears in logs"): the real gateway and
//! aggregator binaries run at `RUST_LOG=debug` through successes, failures and admin calls;
//! then everything the system emitted or stored is searched for the client key secrets, the
//! upstream account credentials and the admin token.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::harness::{eventually, free_port, redis_url, unique_stream};
use tests::mock_upstream::{MockConfig, MockUpstream};
use tests::process::Process;

fn random(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Everything a Redis key holds, as text, whatever its type.
async fn dump(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> String {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(conn).await.unwrap();
    let value: redis::Value = match kind.as_str() {
        "string" => redis::cmd("GET").arg(key).query_async(conn).await,
        "hash" => redis::cmd("HGETALL").arg(key).query_async(conn).await,
        "set" => redis::cmd("SMEMBERS").arg(key).query_async(conn).await,
        "zset" => {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(conn)
                .await
        }
        "list" => {
            redis::cmd("LRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(conn)
                .await
        }
        "stream" => {
            redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query_async(conn)
                .await
        }
        _ => Ok(redis::Value::Nil),
    }
    .unwrap();
    format!("{key} {}", text(&value))
}

/// Every string and byte string inside a Redis reply, lossily decoded and joined.
fn text(value: &redis::Value) -> String {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().map(text).collect::<Vec<_>>().join(" ")
        }
        redis::Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| format!("{} {}", text(k), text(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_streams_metrics_errors_or_admin_reads() {
    let stream = unique_stream();
    let admin_token = random("adm-");
    let good_credential = random("sk-ant-good-");
    let bad_credential = random("sk-openai-wrong-");
    let stranger_key = format!(
        "mk-{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let wrong_admin = random("adm-wrong-");
    let upstream = MockUpstream::spawn_with(MockConfig {
        api_key: Some(good_credential.clone()),
    })
    .await;
    let dir = std::env::temp_dir().join(format!("meter-secrets-{stream}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (gw_port, agg_port) = (free_port(), free_port());
    let common = |listen_var: &'static str, port: u16| {
        vec![
            ("REDIS_URL", redis_url().to_owned()),
            ("METER_STREAM", stream.clone()),
            (listen_var, format!("127.0.0.1:{port}")),
            ("ADMIN_TOKEN", admin_token.clone()),
            ("RUST_LOG", "debug".to_owned()),
        ]
    };
    let mut gateway_env = common("GATEWAY_LISTEN", gw_port);
    gateway_env.push(("GATEWAY_SPOOL_DIR", dir.join("spool").display().to_string()));
    let gateway =
        Process::spawn_logged("gateway", "gateway", &gateway_env, &dir.join("gateway.log"));
    let aggregator = Process::spawn_logged(
        "aggregator",
        "aggregator",
        &common("AGGREGATOR_LISTEN", agg_port),
        &dir.join("aggregator.log"),
    );
    let http = reqwest::Client::new();
    let gw = format!("http://127.0.0.1:{gw_port}");
    let agg = format!("http://127.0.0.1:{agg_port}");
    eventually(Duration::from_secs(30), || async {
        let a = http.get(format!("{gw}/readyz")).send().await.ok()?;
        let b = http.get(format!("{agg}/healthz")).send().await.ok()?;
        (a.status() == 200 && b.status() == 200).then_some(())
    })
    .await;

    // Everything the system sends back to anyone, except the one response that shows a new
    // key's secret by design.
    let mut seen: Vec<String> = Vec::new();
    let admin = |method: reqwest::Method, path: &str, body: Option<Value>, token: &str| {
        let mut request = http
            .request(method, format!("{gw}{path}"))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    async fn read(response: reqwest::Response) -> (u16, String) {
        let status = response.status().as_u16();
        let headers = format!("{:?}", response.headers());
        // A stream the upstream cut ends in an error for the client too; keep what arrived.
        let body = match response.bytes().await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cut: {e}>"),
        };
        (status, format!("{headers} {body}"))
    }

    let (status, body) = read(
        admin(
            reqwest::Method::POST,
            "/admin/accounts",
            Some(json!({"name": "ant", "provider": "anthropic", "base_url": upstream.base_url(), "api_key": good_credential})),
            &admin_token,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    seen.push(body);
    let (status, body) = read(
        admin(
            reqwest::Method::POST,
            "/admin/accounts",
            Some(json!({"name": "oai", "provider": "openai", "base_url": upstream.base_url(), "api_key": bad_credential})),
            &admin_token,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    seen.push(body);
    let mut keys = Vec::new();
    for name in ["alice", "bob"] {
        let created: Value = admin(
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"name": name})),
            &admin_token,
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        keys.push((
            created["id"].as_str().unwrap().to_owned(),
            created["key"].as_str().unwrap().to_owned(),
        ));
    }
    let (alice_id, alice) = keys[0].clone();
    let (bob_id, bob) = keys[1].clone();

    let messages = |secret: &str, extra: Value| {
        let mut body = json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        http.post(format!("{gw}/v1/messages"))
            .header("x-api-key", secret)
            .json(&body)
            .send()
    };
    let mut sent = 0;
    for (secret, extra, want) in [
        (&alice, json!({}), 200),
        (&alice, json!({"stream": true}), 200),
        (&alice, json!({"mock": {"error": {"status": 500}}}), 500),
        (
            &alice,
            json!({"mock": {"error": {"status": 400, "message": "bad things"}}}),
            400,
        ),
        (
            &alice,
            json!({"stream": true, "mock": {"cut_after_events": 3}}),
            200,
        ),
        (&stranger_key, json!({}), 401),
        (&bob, json!({}), 200),
    ] {
        let (status, body) = read(messages(secret, extra).await.unwrap()).await;
        assert_eq!(status, want, "{body}");
        seen.push(body);
        sent += 1;
    }
    // The OpenAI account's credential is wrong: the upstream's 401 is relayed (masked by it).
    let (status, body) = read(
        http.post(format!("{gw}/v1/chat/completions"))
            .bearer_auth(&alice)
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    seen.push(body);
    sent += 1;

    // Admin reads and writes, and refused admin calls.
    for (method, path) in [
        (reqwest::Method::GET, "/admin/keys".to_owned()),
        (reqwest::Method::GET, format!("/admin/keys/{alice_id}")),
        (reqwest::Method::GET, "/admin/accounts".to_owned()),
        (reqwest::Method::DELETE, format!("/admin/keys/{bob_id}")),
        (reqwest::Method::GET, format!("/admin/keys/{bob_id}")),
    ] {
        let (status, body) = read(admin(method, &path, None, &admin_token).await.unwrap()).await;
        assert_eq!(status, 200, "{path}: {body}");
        seen.push(body);
    }
    let accounts: Value = admin(reqwest::Method::GET, "/admin/accounts", None, &admin_token)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for account in accounts["data"].as_array().unwrap() {
        let path = format!("/admin/accounts/{}", account["id"].as_str().unwrap());
        let (status, body) = read(
            admin(reqwest::Method::GET, &path, None, &admin_token)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        seen.push(body);
    }
    let (status, body) = read(
        admin(
            reqwest::Method::PATCH,
            &format!("/admin/keys/{alice_id}"),
            Some(json!({"name": "alice2"})),
            &admin_token,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    seen.push(body);
    for token in [wrong_admin.as_str(), ""] {
        let (status, body) = read(
            admin(reqwest::Method::GET, "/admin/keys", None, token)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        seen.push(body);
    }
    // The deleted key is refused.
    let (status, body) = read(messages(&bob, json!({})).await.unwrap()).await;
    assert_eq!(status, 401, "{body}");
    seen.push(body);
    sent += 1;

    // Every request's event is in, and counted.
    let usage_url = format!("{agg}/v1/usage");
    // The stats API is behind the admin token too (ADMIN_TOKEN is set).
    eventually(Duration::from_secs(30), || async {
        let usage: Value = http
            .get(&usage_url)
            .bearer_auth(&admin_token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (usage["rows"][0]["requests"].as_i64()? == sent).then_some(())
    })
    .await;
    for url in [
        format!("{gw}/metrics"),
        format!("{agg}/metrics"),
        usage_url.clone(),
        format!("{agg}/v1/latency"),
    ] {
        let response = http
            .get(url)
            .bearer_auth(&admin_token)
            .send()
            .await
            .unwrap();
        seen.push(response.text().await.unwrap());
    }
    // Without the token the stats API answers 401, and its error names no secret either.
    let refused = http.get(&usage_url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    seen.push(refused.text().await.unwrap());

    // Redis: every key of this deployment's keyspace, whatever its type, plus the stream and
    // its dead letters.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let names: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{stream}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(names.contains(&stream), "{names:?}");
    let mut stored = Vec::new();
    for name in &names {
        stored.push((name.clone(), dump(&mut conn, name).await));
    }

    // Stop both processes gracefully so their logs are complete.
    assert!(gateway.terminate().success());
    assert!(aggregator.terminate().success());
    let logs = [
        std::fs::read_to_string(dir.join("gateway.log")).unwrap(),
        std::fs::read_to_string(dir.join("aggregator.log")).unwrap(),
    ];
    assert!(
        logs[0].contains("DEBUG"),
        "the gateway logged at debug level"
    );
    // The aggregator has little to say at debug level; it did run and log.
    assert!(logs[1].contains("aggregator listening"));
    println!(
        "searched: {} log bytes, {} Redis keys ({} bytes), {} responses ({} bytes)",
        logs.iter().map(String::len).sum::<usize>(),
        stored.len(),
        stored.iter().map(|(_, v)| v.len()).sum::<usize>(),
        seen.len(),
        seen.iter().map(String::len).sum::<usize>()
    );

    // Client key secrets, with and without their prefix; the credentials and the admin tokens.
    let client_secrets: Vec<&str> = [&alice, &bob, &stranger_key]
        .iter()
        .flat_map(|s| [s.as_str(), &s[3..]])
        .collect();
    let everywhere: Vec<&str> = client_secrets
        .iter()
        .copied()
        .chain([admin_token.as_str(), wrong_admin.as_str()])
        .collect();
    for secret in &everywhere {
        for (i, log) in logs.iter().enumerate() {
            assert!(!log.contains(secret), "log {i} holds a secret");
        }
        for text in &seen {
            assert!(!text.contains(secret), "a response holds a secret: {text}");
        }
        for (name, value) in &stored {
            assert!(!value.contains(secret), "Redis key {name} holds a secret");
        }
    }
    for credential in [&good_credential, &bad_credential] {
        for log in &logs {
            assert!(!log.contains(credential.as_str()));
        }
        for text in &seen {
            assert!(
                !text.contains(credential.as_str()),
                "a response holds a credential: {text}"
            );
        }
        // Account credentials must be usable, so they are stored as given, but only in the
        // account's own record.
        let holders: Vec<&str> = stored
            .iter()
            .filter(|(_, v)| v.contains(credential.as_str()))
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(holders.len(), 1, "{holders:?}");
        assert!(holders[0].contains(":account:"), "{holders:?}");
    }
    // Keys are stored as their SHA-256 only: the hash index and the record carry the hash.
    for secret in [&alice, &bob] {
        let hash = sha256_hex(secret);
        assert!(
            names
                .iter()
                .any(|n| n.ends_with(&format!("keyhash:{hash}"))),
            "{names:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
