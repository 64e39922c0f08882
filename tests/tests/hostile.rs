//! Hostile requests against a real gateway and the aggregator's stats API: each gets an exact
//! status (and, where our code answers, the route's error shape), quickly, with bounded work,
//! and the gateway stays healthy. RELIABILITY.md tabulates these cases; keep the two in step.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::harness::{ADMIN_TOKEN, Pipeline};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response read off the wire: status (0 when the server closed without one), headers
/// (lowercase names) and body.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one HTTP/1.1 response (content-length or close-delimited body).
async fn read_response(stream: &mut (impl AsyncReadExt + Unpin)) -> Raw {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                return Raw {
                    status: 0,
                    headers: Vec::new(),
                    body: buf,
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buf[head_end..].to_vec();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    while length.is_none_or(|n| body.len() < n) {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Raw {
        status,
        headers,
        body,
    }
}

/// Sends raw request bytes on a fresh connection and reads the answer, within 10 s.
async fn raw(p: &Pipeline, request: Vec<u8>) -> Raw {
    let mut stream = TcpStream::connect(p.gateway).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        // The server may answer (and close) before it has read everything, e.g. on a header
        // flood; what it answered is what counts.
        let _ = stream.write_all(&request).await;
        read_response(&mut stream).await
    })
    .await
    .expect("the gateway answers within 10 s")
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    text.into_bytes()
}

#[track_caller]
fn anthropic_error(r: &Raw, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{r:?}");
    let body = r.json();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[track_caller]
fn openai_error(r: &Raw, status: u16, code: Option<&str>) {
    assert_eq!(r.status, status, "{r:?}");
    let body = r.json();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert_eq!(error["param"], Value::Null, "{body}");
    assert_eq!(
        error["code"],
        code.map_or(Value::Null, Value::from),
        "{body}"
    );
}

/// Streams a chunked body of up to `total` bytes and returns the answer and how many body
/// bytes the gateway accepted (were written) before it answered.
async fn stream_body(p: &Pipeline, head: &str, total: usize) -> (Raw, usize, Duration) {
    let started = Instant::now();
    let stream = TcpStream::connect(p.gateway).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move { read_response(&mut rd).await });
    let mut chunk = format!("{:x}\r\n", 1 << 20).into_bytes();
    chunk.extend(std::iter::repeat_n(b'x', 1 << 20));
    chunk.extend_from_slice(b"\r\n");
    let mut written = 0;
    let writer = async {
        wr.write_all(head.as_bytes()).await.unwrap();
        while written < total {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            written += 1 << 20;
        }
        let _ = wr.write_all(b"0\r\n\r\n").await;
    };
    // The writer stops on its own once the gateway hangs up; the timeout is a backstop.
    let _ = tokio::time::timeout(Duration::from_secs(20), writer).await;
    let response = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("an answer within 10 s")
        .unwrap();
    (response, written, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_client_and_admin_requests_get_exact_statuses() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "hostile"})).await;
    let key = [("x-api-key", secret.as_str())];
    let bearer = format!("Bearer {secret}");
    let openai = [("authorization", bearer.as_str())];
    // Client-route requests that reach the handler: each must yield exactly one event.
    let mut metered = 0;

    // Bodies that are not what the route expects.
    let r = raw(&p, request("POST", "/v1/messages", &key, "{not json")).await;
    anthropic_error(&r, 400, "invalid_request_error");
    let r = raw(
        &p,
        request("POST", "/v1/chat/completions", &openai, "{not json"),
    )
    .await;
    openai_error(&r, 400, None);
    for body in [
        r#"{"model": 5, "max_tokens": 5, "messages": []}"#,
        r#"{"model": "claude-haiku-4-5", "stream": "yes", "messages": []}"#,
        r#"{"model": "claude-haiku-4-5", "metadata": 7, "messages": []}"#,
        r#"[1, 2, 3]"#,
        "null",
        "",
        "\u{feff}{}",
    ] {
        let r = raw(&p, request("POST", "/v1/messages", &key, body)).await;
        anthropic_error(&r, 400, "invalid_request_error");
    }
    metered += 9;
    // The gateway reads only `model`, `stream`, `metadata` and `prompt_cache_key`: everything
    // else passes through unchanged for the provider to judge (docs/gateway-api.md). The mock
    // accepts `messages: "x"`; a real provider's 400 would be relayed the same way.
    let r = raw(
        &p,
        request(
            "POST",
            "/v1/messages",
            &key,
            r#"{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": "x"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = raw(
        &p,
        request(
            "POST",
            "/v1/chat/completions",
            &openai,
            r#"{"model": "gpt-4o", "messages": "x", "mock": {"error": {"status": 400}}}"#,
        ),
    )
    .await;
    openai_error(&r, 400, None);
    metered += 2;

    // Credentials.
    let r = raw(&p, request("POST", "/v1/messages", &[], "{}")).await;
    anthropic_error(&r, 401, "authentication_error");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let r = raw(
        &p,
        request("POST", "/v1/messages", &[("x-api-key", "mk-00")], "{}"),
    )
    .await;
    anthropic_error(&r, 401, "authentication_error");
    let long_key = "k".repeat(64 * 1024);
    let r = raw(
        &p,
        request(
            "POST",
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {long_key}"))],
            "{}",
        ),
    )
    .await;
    openai_error(&r, 401, Some("invalid_api_key"));
    let r = raw(
        &p,
        request(
            "POST",
            "/v1/chat/completions",
            &[("authorization", "Bearer ")],
            "{}",
        ),
    )
    .await;
    openai_error(&r, 401, Some("invalid_api_key"));
    metered += 4;

    // Header floods: hyper refuses them before any of our code runs (no event, no body).
    let many: Vec<(String, String)> = (0..200)
        .map(|i| (format!("x-flood-{i}"), "v".into()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = raw(&p, request("POST", "/v1/messages", &many, "{}")).await;
    assert_eq!(r.status, 431, "{r:?}");
    let huge = "v".repeat(1 << 20);
    let r = raw(
        &p,
        request("POST", "/v1/messages", &[("x-flood", &huge)], "{}"),
    )
    .await;
    assert_eq!(r.status, 431, "{r:?}");
    // A large but acceptable header (64 KiB) is just carried along.
    let big = "v".repeat(64 * 1024);
    let r = raw(
        &p,
        request(
            "POST",
            "/v1/messages",
            &[key[0], ("x-big", &big)],
            r#"{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    metered += 1;

    // Routes and methods that do not exist.
    let r = raw(&p, request("GET", "/v2/nothing", &[], "")).await;
    openai_error(&r, 404, Some("not_found"));
    let r = raw(&p, request("POST", "/v1/messages/batches", &key, "{}")).await;
    anthropic_error(&r, 404, "not_found_error");
    let r = raw(&p, request("GET", "/v1/../../etc/passwd", &[], "")).await;
    openai_error(&r, 404, Some("not_found"));
    let r = raw(&p, request("GET", "/v1/messages", &key, "")).await;
    assert_eq!(r.status, 405, "{r:?}");

    // Admin: missing, wrong, or differently-shaped tokens.
    let admin = format!("Bearer {ADMIN_TOKEN}");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic admin"),
        Some("Bearer "),
        Some(&*format!("Bearer {}", "a".repeat(10_000))),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = raw(&p, request("GET", "/admin/keys", &headers, "")).await;
        openai_error(&r, 401, Some("invalid_admin_token"));
        let r = raw(
            &p,
            request("POST", "/admin/keys", &headers, r#"{"name":"x"}"#),
        )
        .await;
        openai_error(&r, 401, Some("invalid_admin_token"));
    }
    // Odd ids: traversal, NUL, very long, invalid UTF-8, reserved characters.
    let auth = [("authorization", admin.as_str())];
    let long_id = "a".repeat(10_000);
    for id in [
        "..%2F..",
        "..%2F..%2Fkeys",
        "%00",
        "%2e%2e",
        long_id.as_str(),
        "%F0%9F%92%A9",
        "a%20b",
        "*",
    ] {
        for path in [format!("/admin/keys/{id}"), format!("/admin/accounts/{id}")] {
            let r = raw(&p, request("GET", &path, &auth, "")).await;
            openai_error(&r, 404, Some("not_found"));
            let r = raw(&p, request("DELETE", &path, &auth, "")).await;
            openai_error(&r, 404, Some("not_found"));
            let r = raw(
                &p,
                request(
                    "PATCH",
                    &path,
                    &[auth[0], ("content-type", "application/json")],
                    r#"{"name":"x"}"#,
                ),
            )
            .await;
            openai_error(&r, 404, Some("not_found"));
        }
    }
    // An id past hyper's URI limit (64 KiB) is refused before routing.
    let r = raw(
        &p,
        request(
            "GET",
            &format!("/admin/keys/{}", "a".repeat(100_000)),
            &auth,
            "",
        ),
    )
    .await;
    assert_eq!(r.status, 414, "{r:?}");
    // A percent-escape that decodes to invalid UTF-8 is refused by the path extractor.
    let r = raw(&p, request("GET", "/admin/keys/%FF%FE", &auth, "")).await;
    assert_eq!(r.status, 400, "{r:?}");
    // An id two path segments deep is no route at all.
    let r = raw(&p, request("GET", "/admin/keys/a/b", &auth, "")).await;
    openai_error(&r, 404, Some("not_found"));
    // Admin bodies of the wrong shape.
    for body in [
        "{not json",
        r#"{"name": 5}"#,
        r#"{"name":"x","limits":"all"}"#,
        r#"{"name":"x","max_concurrency":-1}"#,
    ] {
        let r = raw(
            &p,
            request(
                "POST",
                "/admin/keys",
                &[auth[0], ("content-type", "application/json")],
                body,
            ),
        )
        .await;
        openai_error(&r, 400, None);
    }

    // The gateway is still healthy and serves a normal request.
    let r = raw(&p, request("GET", "/healthz", &[], "")).await;
    assert_eq!(r.status, 200);
    let r = raw(
        &p,
        request(
            "POST",
            "/v1/messages",
            &key,
            r#"{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    metered += 1;

    let events = p.wait_for_events(metered).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(p.events().await.len(), metered, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_body_is_refused_with_413_without_being_read() {
    let p = Pipeline::start().await;
    p.add_account("anthropic").await;
    let (_, secret) = p.add_key(json!({"name": "big"})).await;
    let head = |auth: &str| {
        format!(
            "POST /v1/messages HTTP/1.1\r\nhost: gateway\r\n{auth}content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
    };

    // Declared up front: refused before a byte of the body is read.
    let declared = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway\r\nx-api-key: {secret}\r\ncontent-length: {}\r\n\r\n",
        100 << 20
    );
    let started = Instant::now();
    let r = raw(&p, declared.into_bytes()).await;
    anthropic_error(&r, 413, "request_too_large");
    println!("declared 100 MiB: 413 after {:?}", started.elapsed());

    // Streamed without a length: read up to the 32 MiB limit, then refused.
    let (r, written, took) =
        stream_body(&p, &head(&format!("x-api-key: {secret}\r\n")), 100 << 20).await;
    anthropic_error(&r, 413, "request_too_large");
    println!(
        "streamed 100 MiB: 413 after {took:?}, {} MiB written before the gateway hung up",
        written >> 20
    );
    assert!(
        written < 100 << 20,
        "the gateway stopped reading: {written} bytes written"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");

    // Unauthenticated: refused before the body is read at all.
    let (r, written, took) = stream_body(&p, &head(""), 100 << 20).await;
    anthropic_error(&r, 401, "authentication_error");
    println!(
        "unauthenticated 100 MiB: 401 after {took:?}, {} MiB written",
        written >> 20
    );
    assert!(written < 100 << 20);

    assert!(
        p.upstream.received().is_empty(),
        "nothing reached the upstream"
    );
    let events = p.wait_for_events(3).await;
    let kinds: Vec<(u16, Option<&str>)> = events
        .iter()
        .map(|e| (e.status, e.error.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        [
            (413, Some("request_too_large")),
            (413, Some("request_too_large")),
            (401, Some("unauthorized"))
        ]
    );
    let health = p.http.get(p.gateway_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_queries_that_would_scan_years_are_refused_quickly() {
    let p = Pipeline::start().await;
    let now = chrono::Utc::now().timestamp_millis();
    let get = |query: String| {
        let p = &p;
        async move {
            let started = Instant::now();
            let response = p
                .http
                .get(p.aggregator_url(&format!("/v1/usage?{query}")))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body, started.elapsed())
        }
    };
    // Ranges that would scan years at a fine bucket, and times that would overflow, are
    // refused before any Redis read.
    for query in [
        format!("from=0&to={now}&bucket=minute"),
        format!("from=0&to={now}&bucket=hour&group_by=key,model,account,provider,endpoint,status"),
        format!("from={now}&to=0"),
        "from=-9000000000000000000&to=9000000000000000000".to_owned(),
        "from=-9223372036854775808".to_owned(),
        "to=9223372036854775807".to_owned(),
        "from=yesterday".to_owned(),
        "to=99999999999999999999999".to_owned(),
        "group_by=secret".to_owned(),
        "bucket=week".to_owned(),
        "tz=Mars/Olympus".to_owned(),
        "sql=1;DROP".to_owned(),
    ] {
        let (status, body, took) = get(query.clone()).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(
            body["error"]["type"], "invalid_request_error",
            "{query}: {body}"
        );
        assert!(body["error"]["message"].is_string(), "{query}: {body}");
        assert!(took < Duration::from_secs(1), "{query}: {took:?}");
    }
    // Years at a coarse bucket are answered from month and day cells: few reads, fast.
    for query in [
        format!("from=0&to={now}"),
        format!("from=0&to={now}&bucket=month"),
        format!("from={}&to={now}&bucket=day", now - 400 * 86_400_000),
    ] {
        let (status, body, took) = get(query.clone()).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert!(took < Duration::from_secs(1), "{query}: {took:?}");
    }
    // 89 days of hour buckets (hours are kept 90 days) is served, and stays cheap.
    let (status, body, took) = get(format!(
        "from={}&to={now}&bucket=hour",
        now - 89 * 86_400_000
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    println!("89 days, bucket=hour: {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
