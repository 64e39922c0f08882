//! The access log (docs/configuration.md, "Access log") of the real gateway binary: one line
//! per request, relayed or refused, in text and in JSON, on at `RUST_LOG=warn`, and none with
//! `--access-log false`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tests::harness::{ADMIN_TOKEN, eventually, free_port, redis_url, unique_stream};
use tests::mock_upstream::MockUpstream;
use tests::process::Process;

const TARGET: &str = "meter::access";

struct Gateway {
    process: Process,
    url: String,
    log: PathBuf,
}

/// The gateway binary on a free port, logging to a file of its own; `RUST_LOG` stays the
/// harness's `warn`, below the access log's `info`.
async fn gateway(
    stream: &str,
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Gateway {
    let port = free_port();
    let log = dir.join(format!("{name}.log"));
    let mut vars = vec![
        ("REDIS_URL", redis_url().to_owned()),
        ("METER_STREAM", stream.to_owned()),
        ("GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
        ("ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        (
            "GATEWAY_SPOOL_DIR",
            dir.join(format!("{name}-spool")).display().to_string(),
        ),
    ];
    vars.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let process = Process::spawn_logged_args("gateway", "gateway", args, &vars, &log);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), || async {
        let ready = http.get(format!("{url}/readyz")).send().await.ok()?;
        (ready.status() == 200).then_some(())
    })
    .await;
    Gateway { process, url, log }
}

impl Gateway {
    /// One relayed request (a stream, key `alice`) and one refused (no such key); returns the
    /// relayed request's status and the refused one's.
    async fn traffic(&self, secret: &str) -> (u16, u16) {
        let http = reqwest::Client::new();
        let relayed = http
            .post(format!("{}/v1/messages", self.url))
            .header("x-api-key", secret)
            .json(
                &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": true,
                          "messages": [{"role": "user", "content": "hi"}],
                          "mock": {"input_tokens": 25, "output_tokens": 15, "cache_read": 300}}),
            )
            .send()
            .await
            .unwrap();
        let relayed_status = relayed.status().as_u16();
        relayed.text().await.unwrap();
        let refused = http
            .post(format!("{}/v1/chat/completions?key=not-logged", self.url))
            .bearer_auth("mk-nobody")
            .json(&json!({"model": "gpt-4o", "messages": []}))
            .send()
            .await
            .unwrap();
        (relayed_status, refused.status().as_u16())
    }

    /// Stops the gateway gracefully, so that everything it had to log is in the file, and
    /// returns the access-log lines.
    fn stop(self) -> Vec<String> {
        assert!(self.process.terminate().success());
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|line| line.contains(TARGET))
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_request_in_text_and_json_unless_switched_off() {
    let stream = unique_stream();
    let dir = std::env::temp_dir().join(format!("meter-access-{}", stream.replace(':', "-")));
    std::fs::create_dir_all(&dir).unwrap();
    let upstream = MockUpstream::spawn().await;

    // Text, the default.
    let text = gateway(&stream, &dir, "text", &[], &[]).await;
    let http = reqwest::Client::new();
    let admin = |path: &str, body: Value| {
        http.post(format!("{}{path}", text.url))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let account: Value = admin(
        "/admin/accounts",
        json!({"name": "ant", "provider": "anthropic", "base_url": upstream.base_url(),
               "api_key": "sk-upstream"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let account = account["id"].as_str().unwrap().to_owned();
    let key: Value = admin("/admin/keys", json!({"name": "alice"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key_id, secret) = (
        key["id"].as_str().unwrap().to_owned(),
        key["key"].as_str().unwrap().to_owned(),
    );
    assert_eq!(text.traffic(&secret).await, (200, 401));
    let lines = text.stop();
    assert_eq!(lines.len(), 2, "one line per request: {lines:#?}");
    let (relayed, refused) = (&lines[0], &lines[1]);
    for field in [
        "INFO".to_owned(),
        "method=\"POST\"".to_owned(),
        "path=\"/v1/messages\"".to_owned(),
        "status=200".to_owned(),
        format!("key_id=\"{key_id}\""),
        "key_name=\"alice\"".to_owned(),
        "model=\"claude-haiku-4-5\"".to_owned(),
        format!("account=\"{account}\""),
        "stream=true".to_owned(),
        "latency_ms=".to_owned(),
        "ttft_ms=".to_owned(),
        "input_tokens=25".to_owned(),
        "output_tokens=15".to_owned(),
        "cache_write_tokens=0".to_owned(),
        "cache_read_tokens=300".to_owned(),
        "cost_class=\"metered\"".to_owned(),
    ] {
        assert!(relayed.contains(&field), "{field} in {relayed}");
    }
    for field in [
        "path=\"/v1/chat/completions\"",
        "status=401",
        "cost_class=\"not_relayed\"",
        "error=\"unauthorized\"",
    ] {
        assert!(refused.contains(field), "{field} in {refused}");
    }
    // Refused at authentication: no key, no account, no first byte, and the body (its model)
    // was never read.
    for absent in [
        "key_id=",
        "model=",
        "account=",
        "ttft_ms=",
        "not-logged",
        "mk-nobody",
    ] {
        assert!(!refused.contains(absent), "{absent} in {refused}");
    }
    assert!(!relayed.contains(&secret));

    // JSON, with the JSON log format.
    let json_gateway = gateway(&stream, &dir, "json", &[], &[("METER_LOG_FORMAT", "json")]).await;
    assert_eq!(json_gateway.traffic(&secret).await, (200, 401));
    let lines: Vec<Value> = json_gateway
        .stop()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines
            .iter()
            .all(|l| l["target"] == TARGET && l["level"] == "INFO")
    );
    let relayed = &lines[0]["fields"];
    assert_eq!(
        (
            &relayed["message"],
            &relayed["method"],
            &relayed["path"],
            &relayed["status"],
            &relayed["key_id"],
            &relayed["key_name"],
            &relayed["model"],
            &relayed["account"],
        ),
        (
            &json!("request"),
            &json!("POST"),
            &json!("/v1/messages"),
            &json!(200),
            &json!(key_id),
            &json!("alice"),
            &json!("claude-haiku-4-5"),
            &json!(account),
        ),
        "{relayed}"
    );
    assert_eq!(
        (
            &relayed["input_tokens"],
            &relayed["output_tokens"],
            &relayed["cache_read_tokens"],
            &relayed["cost_class"],
            &relayed["stream"],
        ),
        (
            &json!(25),
            &json!(15),
            &json!(300),
            &json!("metered"),
            &json!(true)
        ),
    );
    let (latency, ttft) = (
        relayed["latency_ms"].as_f64().unwrap(),
        relayed["ttft_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < ttft && ttft <= latency, "{relayed}");
    let refused = &lines[1]["fields"];
    assert_eq!(
        (
            &refused["status"],
            &refused["cost_class"],
            &refused["error"]
        ),
        (&json!(401), &json!("not_relayed"), &json!("unauthorized")),
        "{refused}"
    );
    assert!(refused.get("key_id").is_none(), "{refused}");

    // Switched off: requests are served, nothing is logged for them.
    let off = gateway(&stream, &dir, "off", &["--access-log", "false"], &[]).await;
    assert_eq!(off.traffic(&secret).await, (200, 401));
    assert_eq!(off.stop(), Vec::<String>::new());
    let off = gateway(
        &stream,
        &dir,
        "off-env",
        &[],
        &[("METER_ACCESS_LOG", "false")],
    )
    .await;
    assert_eq!(off.traffic(&secret).await, (200, 401));
    assert_eq!(off.stop(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}
