//! The dashboard at `GET /` in a real headless Chromium (through chromedriver), against an
//! aggregator filled with known events and behind an admin token: the page asks for the token,
//! shows the API's figures with the keys' names and each key's usage against its limits (read
//! from the gateway), and follows its range, grouping and filter controls, without a console
//! error; an unreachable gateway is said so in the limits panel. It saves a screenshot to `target/dashboard.png`, and to
//! `docs/dashboard.png` with `UPDATE_SCREENSHOT=1`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use shared::UsageEvent;
use tests::browser::Browser;
use tests::harness::{
    eventually, redis_url, refusing_port, spawn_aggregator_with, spawn_gateway, unique_stream,
    xadd_events,
};
use tests::mock_upstream::MockUpstream;

const DASHBOARD_TOKEN: &str = "dashboard-secret";
const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;

fn event(id: String, ts: i64, key: &str, model: &str, status: u16) -> UsageEvent {
    let openai = model.starts_with("gpt");
    UsageEvent {
        v: 1,
        id,
        ts,
        key_id: Some(key.to_owned()),
        account_id: Some("acct_dash".into()),
        provider: if openai { "openai" } else { "anthropic" }.into(),
        endpoint: if openai {
            "chat_completions"
        } else {
            "messages"
        }
        .into(),
        model: model.into(),
        status,
        stream: !openai,
        latency_us: if openai { 900_000 } else { 2_400_000 } + (ts % 7) as u64 * 50_000,
        ttft_us: (status < 400).then_some(if openai { 200_000 } else { 450_000 }),
        input_tokens: if openai { 500 } else { 1_000 },
        output_tokens: if openai { 100 } else { 200 },
        cache_creation_input_tokens: if openai { 0 } else { 50 },
        cache_creation_1h_input_tokens: 0,
        cache_read_input_tokens: if openai { 0 } else { 3_000 },
        service_tier: None,
        error: None,
    }
}

/// `$1,234.56`: the page's format for amounts of a dollar or more.
fn dollars(cost: &str) -> String {
    let cents = (cost.parse::<Decimal>().unwrap() * Decimal::from(100)).round();
    let cents: i64 = cents.try_into().unwrap();
    format!("${}.{:02}", format_count((cents / 100) as u64), cents % 100)
}

/// The page's format for an amount this test expects to be nothing or at least a dollar.
fn money(amount: &str) -> String {
    let value = amount.parse::<Decimal>().unwrap();
    if value.is_zero() {
        return "$0.00".to_owned();
    }
    assert!(value >= Decimal::ONE, "{amount}: below a dollar");
    dollars(amount)
}

/// The column of the top keys and models tables that shows what cache reads saved.
const SAVINGS_COLUMN: usize = 7;

/// Each row of a top table against the API's row of the same group: the money its cache reads
/// saved, as the page formats it.
async fn check_savings_column(browser: &Browser, table: &str, dim: &str, api: &Value) {
    assert_eq!(
        browser
            .attribute(
                &format!("#{table} th:nth-child({SAVINGS_COLUMN})"),
                "data-col"
            )
            .await
            .unwrap(),
        "savings"
    );
    for row in api["rows"].as_array().unwrap() {
        let value = row[dim].as_str().unwrap();
        let saved = row["cache_savings_usd"].as_str().unwrap();
        let cell = format!("#{table} tr[data-value='{value}'] td:nth-child({SAVINGS_COLUMN})");
        browser.wait_for_text(&cell, |t| t == money(saved)).await;
    }
}

async fn usage(http: &reqwest::Client, aggregator: &str, query: &str) -> Value {
    let response = http
        .get(format!("{aggregator}/v1/usage?{query}"))
        .bearer_auth(DASHBOARD_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The page's totals against the API's over the same range (`from` = `span` ago, `to` the API's
/// default, as the page asks).
async fn check_totals(browser: &Browser, http: &reqwest::Client, aggregator: &str, span: i64) {
    let from = chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis() - span)
        .unwrap()
        .to_rfc3339();
    let api = usage(http, aggregator, &format!("from={}", urlencode(&from))).await;
    let row = &api["rows"][0];
    let requests = row["requests"].as_u64().unwrap();
    let shown = browser
        .wait_for_text("#total-requests", |t| t == format_count(requests).as_str())
        .await;
    assert_eq!(shown, format_count(requests));
    assert_eq!(
        browser
            .attribute("#total-cost", "data-value")
            .await
            .unwrap(),
        row["cost_usd"].as_str().unwrap()
    );
    assert_eq!(
        browser.text("#total-cost").await.unwrap(),
        dollars(row["cost_usd"].as_str().unwrap())
    );
    // What cache reads saved: the API's exact figure behind the card, shown as money.
    let saved = row["cache_savings_usd"].as_str().unwrap();
    assert_eq!(
        browser
            .attribute("#total-cache-savings", "data-value")
            .await
            .unwrap(),
        saved
    );
    assert_eq!(
        browser.text("#total-cache-savings").await.unwrap(),
        money(saved)
    );
    let tokens = [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .map(|f| row[f].as_u64().unwrap())
    .sum::<u64>();
    assert_eq!(
        browser.text("#total-tokens").await.unwrap(),
        format_count(tokens)
    );
    for (id, field) in [
        ("#total-input", "input_tokens"),
        ("#total-output", "output_tokens"),
        ("#total-cache-write", "cache_creation_input_tokens"),
        ("#total-cache-read", "cache_read_input_tokens"),
        ("#total-errors", "errors"),
    ] {
        assert_eq!(
            browser.text(id).await.unwrap(),
            format_count(row[field].as_u64().unwrap()),
            "{id}"
        );
    }
}

/// Console entries that are warnings or errors (Chromium also logs debugging hints).
fn problems(console: Vec<Value>) -> Vec<Value> {
    console
        .into_iter()
        .filter(|e| matches!(e["level"].as_str(), Some("WARNING" | "SEVERE")))
        .collect()
}

fn format_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_apis_figures_and_follows_its_controls() {
    let redis = redis_url();
    let stream = unique_stream();
    // One admin token for both: the limits panel passes the page's token on to the gateway.
    let (gateway, _stop_gateway) = spawn_gateway(redis, &stream, |g| {
        g.admin_token = Some(DASHBOARD_TOKEN.into());
    })
    .await;
    let (aggregator, _stop_aggregator) = spawn_aggregator_with(redis, &stream, |a| {
        a.admin_token = Some(DASHBOARD_TOKEN.into());
        a.gateway_url = Some(format!("http://{gateway}"));
    })
    .await;
    let aggregator = format!("http://{aggregator}");
    let http = reqwest::Client::new();
    let upstream = MockUpstream::spawn().await;

    // Key records, so rows grouped by key carry names, with limits for the limits panel: alice
    // may make 5 requests an hour, bob 1,000 a day.
    let mut keys = Vec::new();
    for (name, max, window) in [("alice", 5, 3600), ("bob", 1000, 86400)] {
        let body = json!({"name": name,
                          "limits": [{"metric": "requests", "max": max, "window_secs": window}]});
        let created: Value = eventually(Duration::from_secs(30), || async {
            let response = http
                .post(format!("http://{gateway}/admin/keys"))
                .bearer_auth(DASHBOARD_TOKEN)
                .json(&body)
                .send()
                .await
                .ok()?;
            (response.status() == 201).then_some(())?;
            response.json().await.ok()
        })
        .await;
        keys.push((
            created["id"].as_str().unwrap().to_owned(),
            created["key"].as_str().unwrap().to_owned(),
        ));
    }
    let (alice, bob) = (&keys[0].0, &keys[1].0);

    // Four of alice's five requests through the gateway: 80 %, flagged.
    let response = http
        .post(format!("http://{gateway}/admin/accounts"))
        .bearer_auth(DASHBOARD_TOKEN)
        .json(&json!({"name": "mock", "provider": "anthropic",
                      "base_url": format!("{}/v1", upstream.base_url()), "api_key": "sk-upstream"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    for _ in 0..4 {
        let response = http
            .post(format!("http://{gateway}/v1/messages"))
            .header("x-api-key", &keys[0].1)
            .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    // In the last hour: alice on Claude (1,000 besides the four above), bob on GPT-4o (250, a tenth of them failed).
    // Three days ago: 300 more of alice's, seen only from the 7-day range on.
    let now = Utc::now().timestamp_millis();
    let mut events = Vec::new();
    for i in 0..1_000 {
        let ts = now - (3 + i % 45) * MINUTE - i;
        events.push(event(format!("a-{i}"), ts, alice, "claude-sonnet-4-5", 200));
    }
    for i in 0..250 {
        let ts = now - (3 + i % 45) * MINUTE - i;
        let status = if i % 10 == 0 { 500 } else { 200 };
        events.push(event(format!("b-{i}"), ts, bob, "gpt-4o", status));
    }
    for i in 0..300 {
        let ts = now - 3 * DAY - (i % 120) * MINUTE;
        events.push(event(
            format!("old-{i}"),
            ts,
            alice,
            "claude-sonnet-4-5",
            200,
        ));
    }
    let client = redis::Client::open(redis).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    xadd_events(&mut conn, &stream, &events).await;
    eventually(Duration::from_secs(60), || async {
        let all = usage(&http, &aggregator, "from=0").await;
        (all["rows"][0]["requests"] == 1_554).then_some(())
    })
    .await;

    let browser = Browser::start().await;
    browser.goto(&format!("{aggregator}/")).await;

    // The API wants the token: the page asks for it once.
    browser
        .wait_for_text("#login h2", |t| t == "Admin token")
        .await;
    assert_eq!(browser.text("#login-error").await, None);
    browser.type_into("#token", "not-the-token").await;
    browser.click("#login-submit").await;
    browser
        .wait_for_text("#login-error", |t| t == "That token was refused.")
        .await;
    assert_eq!(
        browser.text("#main").await,
        None,
        "no figures without the token"
    );
    browser.type_into("#token", DASHBOARD_TOKEN).await;
    browser.click("#login-submit").await;
    check_totals(&browser, &http, &aggregator, DAY).await;
    assert_eq!(browser.text("#login").await, None, "the token form is gone");
    assert_eq!(
        browser.text("#custom-range").await,
        None,
        "no custom range asked for"
    );
    assert_eq!(browser.text("#total-error-rate").await.unwrap(), "2.0%");
    // Before the token, the API's 401s are in the console; nothing else may be.
    for entry in problems(browser.console().await) {
        let message = entry["message"].as_str().unwrap_or_default();
        assert!(message.contains("401"), "console: {entry}");
    }

    // Names, not ids, in both tables and in the chart legend.
    let top_keys = browser
        .wait_for_text("#top-keys", |t| t.contains("alice") && t.contains("bob"))
        .await;
    assert!(!top_keys.contains(alice.as_str()), "{top_keys}");
    browser
        .wait_for_text("#top-models", |t| {
            t.contains("claude-sonnet-4-5") && t.contains("gpt-4o")
        })
        .await;
    browser
        .wait_for_text("#chart-cost", |t| t.contains("gpt-4o"))
        .await;
    browser
        .wait_for_text("#chart-latency", |t| t.contains("claude-sonnet-4-5 p99"))
        .await;
    // The cache view by model and by key: what each saved, from the API's grouped rows. GPT-4o
    // read nothing from cache here, so bob saved nothing.
    let from = chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis() - DAY)
        .unwrap()
        .to_rfc3339();
    for (table, dim) in [("top-models", "model"), ("top-keys", "key")] {
        let api = usage(
            &http,
            &aggregator,
            &format!("from={}&group_by={dim}", urlencode(&from)),
        )
        .await;
        check_savings_column(&browser, table, dim, &api).await;
    }
    let bob_saved = format!("#top-keys tr[data-value='{bob}'] td:nth-child({SAVINGS_COLUMN})");
    assert_eq!(browser.text(&bob_saved).await.unwrap(), "$0.00");

    // The tables sort by any column: by cost, most first; requests, twice, fewest first.
    let first_key = "#top-keys tbody tr:first-child td:first-child";
    assert_eq!(browser.text(first_key).await.unwrap(), "alice");
    browser.click("#top-keys th[data-col='requests']").await;
    browser.click("#top-keys th[data-col='requests']").await;
    browser.wait_for_text(first_key, |t| t == "bob").await;

    // Grouping the charts by key.
    browser.click("#grouping button[data-group='key']").await;
    browser
        .wait_for_text("#chart-cost", |t| {
            t.contains("alice") && t.contains("bob") && !t.contains("gpt-4o")
        })
        .await;
    browser
        .wait_for_text("#chart-tokens", |t| t.contains("alice"))
        .await;

    // A longer range takes in the older events.
    browser.click("#ranges button[data-range='7d']").await;
    check_totals(&browser, &http, &aggregator, 7 * DAY).await;

    // A row of the keys table filters the whole page to that key.
    browser
        .click(&format!("#top-keys tr[data-value='{bob}']"))
        .await;
    browser
        .wait_for_text("#filters", |t| t.contains("key: bob"))
        .await;
    browser
        .wait_for_text("#total-requests", |t| t == "250")
        .await;
    assert_eq!(browser.text("#total-cache-savings").await.unwrap(), "$0.00");
    browser
        .wait_for_text("#top-models", |t| !t.contains("claude"))
        .await;
    assert_eq!(browser.text("#total-error-rate").await.unwrap(), "10%");
    browser.click("#filter-key button").await;
    browser
        .wait_for_text("#total-requests", |t| t == "1,554")
        .await;

    // The limits panel: alice's requests at 80 %, flagged in words; bob's not.
    let alice_row = format!("#limits tr[data-key='{alice}']");
    let shown = browser
        .wait_for_text(&alice_row, |t| t.contains("4 / 5"))
        .await;
    assert!(shown.contains("alice"), "{shown}");
    assert!(shown.contains("requests per 1 h"), "{shown}");
    assert!(shown.contains("⚠ 80% near limit"), "{shown}");
    assert_eq!(
        browser.attribute(&alice_row, "class").await.unwrap(),
        "static flagged"
    );
    let bob_row = format!("#limits tr[data-key='{bob}']");
    let shown = browser.text(&bob_row).await.unwrap();
    assert!(
        shown.contains("bob") && shown.contains("0 / 1,000"),
        "{shown}"
    );
    assert!(shown.contains("0%") && !shown.contains('⚠'), "{shown}");
    assert_eq!(
        browser.attribute(&bob_row, "class").await.unwrap(),
        "static"
    );
    assert_eq!(browser.text("#limits-message").await, None);

    // The status corner: everything consumed, nothing dead-lettered.
    browser.wait_for_text("#status-dead", |t| t == "0").await;
    browser.wait_for_text("#status-lag", |t| t == "0").await;

    // A custom range around the older events only, drawn by the hour.
    browser.click("#ranges button[data-range='custom']").await;
    browser
        .script(&format!(
            "const local = (ms) => new Date(ms - new Date(ms).getTimezoneOffset() * 60000).toISOString().slice(0, 16);
             document.getElementById('custom-from').value = local({});
             document.getElementById('custom-to').value = local({});
             return null;",
            now - 4 * DAY,
            now - 2 * DAY
        ))
        .await;
    browser.click("#custom-range button[type='submit']").await;
    browser
        .wait_for_text("#total-requests", |t| t == "300")
        .await;
    browser
        .wait_for_text("#bucket-label", |t| t == "one bar per hour")
        .await;
    browser
        .wait_for_text("#top-models", |t| !t.contains("gpt-4o"))
        .await;

    // The last hour, by model, for the screenshot.
    browser.click("#ranges button[data-range='1h']").await;
    browser.click("#grouping button[data-group='model']").await;
    check_totals(&browser, &http, &aggregator, 60 * MINUTE).await;
    browser
        .wait_for_text("#chart-cost", |t| t.contains("gpt-4o"))
        .await;

    let errors = browser.script("return window.__meterErrors;").await;
    assert_eq!(errors, json!([]), "page errors");
    let console = problems(browser.console().await);
    assert!(console.is_empty(), "console: {console:?}");

    // Back to the most expensive key first, in a window the page fills, for the README.
    browser.click("#top-keys th[data-col='cost']").await;
    browser.wait_for_text(first_key, |t| t == "alice").await;
    browser.resize(1280, 1300).await;
    eventually(Duration::from_secs(30), || async {
        let width = browser.script("return window.innerWidth;").await;
        (width == 1280).then_some(())
    })
    .await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let target = target_dir();
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("dashboard.png"), &png).unwrap();
    if std::env::var_os("UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png");
        std::fs::write(docs, &png).unwrap();
    }

    // At a phone's width nothing sticks out sideways: the page reflows to one column.
    browser.resize(390, 1600).await;
    eventually(Duration::from_secs(30), || async {
        let fits = browser
            .script(
                "return window.innerWidth <= 500 && document.documentElement.scrollWidth <= window.innerWidth;",
            )
            .await;
        (fits == true).then_some(())
    })
    .await;
    std::fs::write(
        target.join("dashboard-phone.png"),
        browser.screenshot().await,
    )
    .unwrap();
    let console = problems(browser.console().await);
    assert!(console.is_empty(), "console: {console:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_limits_panel_says_when_the_gateway_is_not_reachable() {
    let (port, _reserved) = refusing_port();
    let closed = format!("http://127.0.0.1:{port}");
    let url = closed.clone();
    let (aggregator, _stop) = spawn_aggregator_with(redis_url(), &unique_stream(), |a| {
        a.gateway_url = Some(url);
    })
    .await;
    let browser = Browser::start().await;
    browser.goto(&format!("http://{aggregator}/")).await;
    browser
        .wait_for_text("#limits-message", |t| {
            t == format!("gateway not reachable: cannot connect to {closed}")
        })
        .await;
    assert_eq!(browser.text("#limits").await.unwrap_or_default(), "");
    // The rest of the page does not depend on the gateway.
    browser.wait_for_text("#total-requests", |t| t == "0").await;
}
