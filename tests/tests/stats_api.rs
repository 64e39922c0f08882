//! The stats API's parameters (docs/stats-api.md) over real sockets: every bucket and time zone
//! against an independent computation over the events, conservation across groupings (§7.1),
//! exact cache savings per group, every parameter error, the admin token, the cache's freshness
//! and `aggregator usage`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::Value;
use shared::UsageEvent;
use tests::fixtures::{Lcg, hand_cost, hand_savings};
use tests::harness::{
    eventually, redis_url, spawn_aggregator, spawn_aggregator_with, unique_stream,
};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn event(i: usize, ts: i64, rng: &mut Lcg) -> UsageEvent {
    let models = ["claude-sonnet-4-5", "gpt-4o", "no-such-model"];
    let model = models[rng.next(3) as usize];
    let latency_us = 20_000 + rng.next(2_000_000);
    let status = [200, 200, 200, 429, 500][rng.next(5) as usize];
    UsageEvent {
        v: 1,
        id: format!("api-{i}"),
        ts,
        key_id: [Some("key_a"), Some("key_b"), None][rng.next(3) as usize].map(str::to_owned),
        account_id: Some(format!("acct_{}", rng.next(2))),
        provider: if model == "gpt-4o" {
            "openai"
        } else {
            "anthropic"
        }
        .into(),
        endpoint: if model == "gpt-4o" {
            "chat_completions"
        } else {
            "messages"
        }
        .into(),
        model: model.into(),
        status,
        stream: false,
        latency_us,
        // An upstream error sends no first token.
        ttft_us: (status != 500).then_some(latency_us / 3),
        input_tokens: rng.next(5_000),
        output_tokens: rng.next(1_000),
        cache_creation_input_tokens: 0,
        cache_creation_1h_input_tokens: 0,
        cache_read_input_tokens: rng.next(3_000),
        service_tier: None,
        error: None,
    }
}

/// Events over the last 400 days, denser recently: minutes, hours, days and months all get some.
fn events(now: i64) -> Vec<UsageEvent> {
    let mut rng = Lcg(77);
    (0..2400)
        .map(|i| {
            let age = match i % 4 {
                0 => rng.next(3 * HOUR as u64) as i64,
                1 => rng.next(46 * HOUR as u64) as i64,
                2 => rng.next(80 * DAY as u64) as i64,
                _ => rng.next(400 * DAY as u64) as i64,
            };
            event(i, now - 1 - age, &mut rng)
        })
        .collect()
}

async fn publish(stream: &str, events: &[UsageEvent]) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    tests::harness::xadd_events(&mut conn, stream, events).await;
}

/// Waits until the aggregator's group has read and acknowledged every entry of the stream.
async fn wait_applied(stream: &str) {
    let client = redis::Client::open(redis_url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    eventually(Duration::from_secs(30), || {
        let mut conn = conn.clone();
        async move {
            let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query_async(&mut conn)
                .await
                .ok()?;
            let number = |g: &std::collections::HashMap<String, redis::Value>, name: &str| {
                g.get(name)
                    .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
            };
            let ours = groups.first()?;
            (number(ours, "lag")? == 0 && number(ours, "pending")? == 0).then_some(())
        }
    })
    .await;
}

struct Api {
    http: reqwest::Client,
    addr: SocketAddr,
}

impl Api {
    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn metric(&self, name: &str) -> u64 {
        tests::harness::metric::<u64>(&self.http, self.addr, name)
            .await
            .unwrap()
    }

    async fn refused(&self, path: &str, param: &str) {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().len() > 10);
    }
}

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

fn number(v: &Value) -> Decimal {
    match v {
        Value::String(s) => Decimal::from_str(s).unwrap(),
        v => Decimal::from(v.as_i64().unwrap()),
    }
}

const FIELDS: [&str; 7] = [
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cost_usd",
    "cache_savings_usd",
];

/// The fields from here on are money, which the contract holds to 1e-9 USD against our hand
/// computation (the price file's rates are binary floats); the counts before are exact.
const MONEY: usize = 5;

/// The independent figures of a set of events, in the order of [`FIELDS`].
fn figures<'a>(events: impl Iterator<Item = &'a UsageEvent>) -> [Decimal; 7] {
    let mut out = [Decimal::ZERO; 7];
    for e in events {
        out[0] += Decimal::ONE;
        out[1] += Decimal::from(u8::from(e.status >= 400));
        out[2] += Decimal::from(e.input_tokens);
        out[3] += Decimal::from(e.output_tokens);
        out[4] += Decimal::from(e.cache_read_input_tokens);
        out[5] += hand_cost(e);
        out[6] += hand_savings(e);
    }
    out
}

/// Counts exactly, money within 1e-9 USD.
#[track_caller]
fn assert_figures(got: &[Decimal; 7], want: &[Decimal; 7], what: &str) {
    assert_eq!(got[..MONEY], want[..MONEY], "{what}");
    for (field, (got, want)) in FIELDS[MONEY..]
        .iter()
        .zip(got[MONEY..].iter().zip(&want[MONEY..]))
    {
        assert!(
            (got - want).abs() <= Decimal::from_str("0.000000001").unwrap(),
            "{what} {field}: {got} vs {want}"
        );
    }
}

fn row_figures(row: &Value) -> [Decimal; 7] {
    FIELDS.map(|f| number(&row[f]))
}

fn sum_rows(rows: &Value) -> [Decimal; 7] {
    let mut out = [Decimal::ZERO; 7];
    for row in rows.as_array().unwrap() {
        for (o, v) in out.iter_mut().zip(row_figures(row)) {
            *o += v;
        }
    }
    out
}

/// Checks a bucketed answer against the events: rows keyed by `bucket_start`, each equal to the
/// figures of the events in the effective range whose local bucket starts there.
#[track_caller]
fn check_buckets(all: &[UsageEvent], answer: &Value, bucket_of: impl Fn(i64) -> i64) {
    let (from, to) = (
        ms(answer["from"].as_str().unwrap()),
        ms(answer["to"].as_str().unwrap()),
    );
    let mut want: BTreeMap<i64, Vec<&UsageEvent>> = BTreeMap::new();
    for e in all.iter().filter(|e| (from..to).contains(&e.ts)) {
        want.entry(bucket_of(e.ts)).or_default().push(e);
    }
    let got: BTreeMap<i64, [Decimal; 7]> = answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (ms(r["bucket_start"].as_str().unwrap()), row_figures(r)))
        .collect();
    let want: BTreeMap<i64, [Decimal; 7]> = want
        .into_iter()
        .map(|(k, v)| (k, figures(v.into_iter())))
        .collect();
    assert_eq!(got.len(), want.len(), "bucket count");
    for ((gk, gv), (wk, wv)) in got.iter().zip(&want) {
        assert_eq!(gk, wk);
        assert_figures(gv, wv, &format!("bucket {gk}"));
    }
}

/// Start of the local day (or month) of `ts` in a fixed offset.
fn local_day(ts: i64, offset: i64) -> i64 {
    (ts + offset).div_euclid(DAY) * DAY - offset
}

fn local_month(ts: i64, offset: i64) -> i64 {
    use chrono::{Datelike, TimeZone};
    let t = chrono::Utc.timestamp_millis_opt(ts + offset).unwrap();
    chrono::Utc
        .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis()
        - offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bucket_and_time_zone_matches_an_independent_computation() {
    let stream = unique_stream();
    let now = chrono::Utc::now().timestamp_millis();
    let all = events(now);
    publish(&stream, &all).await;
    let (addr, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let api = Api {
        http: reqwest::Client::new(),
        addr,
    };
    wait_applied(&stream).await;

    // Everything, from 1970 on: months in the middle, exact totals.
    let everything = api.ok(&format!("/v1/usage?from=0&to={}", now + DAY)).await;
    assert_eq!(everything["from"], "1970-01-01T00:00:00Z");
    let totals = sum_rows(&everything["rows"]);
    let want = figures(all.iter());
    assert!(
        want[6] > Decimal::ZERO,
        "cache reads of priced models saved something"
    );
    assert_figures(&totals, &want, "everything");

    // Conservation: every grouping sums to the same totals.
    for group_by in [
        "key",
        "model",
        "account",
        "provider",
        "endpoint",
        "status",
        "model,status",
        "key,model,account,provider,endpoint,status",
    ] {
        for bucket in ["all", "month", "day"] {
            let from = if bucket == "day" { now - 300 * DAY } else { 0 };
            let ungrouped = api
                .ok(&format!("/v1/usage?from={from}&to={now}&bucket={bucket}"))
                .await;
            let grouped = api
                .ok(&format!(
                    "/v1/usage?from={from}&to={now}&bucket={bucket}&group_by={group_by}"
                ))
                .await;
            assert_eq!(
                sum_rows(&grouped["rows"]),
                sum_rows(&ungrouped["rows"]),
                "{group_by} {bucket}"
            );
        }
    }

    // Minutes over the last three hours; `from` and `to` echo their minute alignment.
    let from = now - 3 * HOUR + 1234;
    let minutes = api
        .ok(&format!("/v1/usage?from={from}&to={now}&bucket=minute"))
        .await;
    assert_eq!(
        ms(minutes["from"].as_str().unwrap()),
        from / MINUTE * MINUTE
    );
    assert_eq!(ms(minutes["to"].as_str().unwrap()), now / MINUTE * MINUTE);
    check_buckets(&all, &minutes, |ts| ts / MINUTE * MINUTE);

    // Hours over 80 days: `from` is older than 48 h, so it is aligned to its hour.
    let from = now - 80 * DAY + 1234;
    let hours = api
        .ok(&format!("/v1/usage?from={from}&to={now}&bucket=hour"))
        .await;
    assert_eq!(ms(hours["from"].as_str().unwrap()), from / HOUR * HOUR);
    check_buckets(&all, &hours, |ts| ts / HOUR * HOUR);

    // UTC days over 400 days (days before 90 days ago: aligned to the day) and months.
    let from = now - 399 * DAY;
    let days = api
        .ok(&format!("/v1/usage?from={from}&to={now}&bucket=day"))
        .await;
    assert_eq!(ms(days["from"].as_str().unwrap()), from / DAY * DAY);
    check_buckets(&all, &days, |ts| local_day(ts, 0));
    let months = api
        .ok(&format!("/v1/usage?from={from}&to={now}&bucket=month"))
        .await;
    check_buckets(&all, &months, |ts| local_month(ts, 0));

    // Local days and months: +08:00 from hours over 80 days, -05:30 from minutes over 40 h.
    for (tz, offset, range) in [
        ("%2B08:00", 8 * HOUR, 80 * DAY),
        ("-05:30", -(5 * HOUR + 30 * MINUTE), 40 * HOUR),
        ("%2B05:45", 5 * HOUR + 45 * MINUTE, 40 * HOUR),
    ] {
        let from = now - range;
        let days = api
            .ok(&format!(
                "/v1/usage?from={from}&to={now}&bucket=day&tz={tz}"
            ))
            .await;
        check_buckets(&all, &days, |ts| local_day(ts, offset));
        let months = api
            .ok(&format!(
                "/v1/usage?from={from}&to={now}&bucket=month&tz={tz}"
            ))
            .await;
        check_buckets(&all, &months, |ts| local_month(ts, offset));
    }
    // `bucket_start` is written in the offset asked for.
    let days = api
        .ok(&format!(
            "/v1/usage?from={}&to={now}&bucket=day&tz=-05:30",
            now - 40 * HOUR
        ))
        .await;
    assert!(
        days["rows"][0]["bucket_start"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00-05:30")
    );

    // Latency per local day equals the exact quantiles of the same events, within 1 %.
    let from = now - 30 * HOUR;
    let latency = api
        .ok(&format!(
            "/v1/latency?from={from}&to={now}&bucket=day&tz=%2B08:00&quantiles=0.5,0.99"
        ))
        .await;
    let (from, to) = (
        ms(latency["from"].as_str().unwrap()),
        ms(latency["to"].as_str().unwrap()),
    );
    for row in latency["rows"].as_array().unwrap() {
        let start = ms(row["bucket_start"].as_str().unwrap());
        let mut values: Vec<u64> = all
            .iter()
            .filter(|e| (from..to).contains(&e.ts) && local_day(e.ts, 8 * HOUR) == start)
            .map(|e| e.latency_us)
            .collect();
        values.sort_unstable();
        assert_eq!(row["count"].as_u64().unwrap() as usize, values.len());
        let mut ttfts: Vec<u64> = all
            .iter()
            .filter(|e| (from..to).contains(&e.ts) && local_day(e.ts, 8 * HOUR) == start)
            .filter_map(|e| e.ttft_us)
            .collect();
        ttfts.sort_unstable();
        assert!(ttfts.len() < values.len(), "errors have no TTFT");
        assert_eq!(row["ttft_count"].as_u64().unwrap() as usize, ttfts.len());
        for (field, values) in [("latency_ms", &values), ("ttft_ms", &ttfts)] {
            for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
                let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
                let want = values[rank - 1] as f64 / 1000.0;
                let got = row[field][label].as_f64().unwrap();
                assert!(
                    (got - want).abs() <= 0.01 * want,
                    "{field} {label}: {got} vs {want}"
                );
                // No more digits than the sketch resolves (0.5 %): four significant ones.
                let digits = format!("{:e}", got);
                let mantissa = digits.split('e').next().unwrap().replace(['.', '-'], "");
                assert!(mantissa.len() <= 4, "{field} {label}: {got}");
            }
        }
    }
}

/// Events with known cache savings at the bundled prices, one per case of docs/pricing.md's
/// cache savings: a model's own read rate, a service tier's, a long-context one, a model without
/// a read rate (reads charged as input: nothing saved), an unpriced model, a refused request.
fn savings_cases(now: i64) -> Vec<UsageEvent> {
    let mut rng = Lcg(5);
    let mut events = Vec::new();
    let mut add = |key: Option<&str>, model: &str, tier: Option<&str>, input, reads, status| {
        let i = events.len();
        events.push(UsageEvent {
            id: format!("saved-{i}"),
            key_id: key.map(str::to_owned),
            account_id: (status < 400).then(|| "acct_0".to_owned()),
            model: model.to_owned(),
            service_tier: tier.map(str::to_owned),
            status,
            input_tokens: input,
            output_tokens: 0,
            cache_read_input_tokens: reads,
            ..event(i, now - 5 * MINUTE, &mut rng)
        });
    };
    // 50000 * (0.000003 - 0.0000003) = 0.135
    add(Some("key_a"), "claude-sonnet-4-5", None, 1_000, 50_000, 200);
    // 4000 * (0.0000025 - 0.00000125) = 0.005
    add(Some("key_a"), "gpt-4o", None, 500, 4_000, 200);
    // priority: 4000 * (0.00000425 - 0.000002125) = 0.0085
    add(Some("key_b"), "gpt-4o", Some("priority"), 500, 4_000, 200);
    // Bedrock Sonnet, P = 210,000 > 200k: 60000 * (0.000006 - 0.0000006) = 0.324
    let bedrock = "anthropic.claude-sonnet-4-5-20250929-v1:0";
    add(Some("key_b"), bedrock, None, 150_000, 60_000, 200);
    // gpt-4 has no cache-read rate: its 10,000 reads cost 10000 * 0.00003 = 0.3, save 0.
    add(Some("key_b"), "gpt-4", None, 0, 10_000, 200);
    add(Some("key_a"), "no-such-model", None, 100, 10_000, 200);
    add(None, "claude-sonnet-4-5", None, 0, 0, 401);
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_savings_are_exact_for_each_group_and_in_total() {
    let stream = unique_stream();
    let now = chrono::Utc::now().timestamp_millis();
    publish(&stream, &savings_cases(now)).await;
    let (addr, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let api = Api {
        http: reqwest::Client::new(),
        addr,
    };
    wait_applied(&stream).await;
    let range = format!("from={}&to={}", now - HOUR, now + MINUTE);
    let saved = |answer: &Value, dim: &str| -> BTreeMap<String, String> {
        answer["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let group = r[dim].as_str().unwrap_or("(none)").to_owned();
                (group, r["cache_savings_usd"].as_str().unwrap().to_owned())
            })
            .collect()
    };

    let total = api.ok(&format!("/v1/usage?{range}")).await;
    assert_eq!(total["rows"][0]["cache_savings_usd"], "0.4725");
    assert_eq!(total["rows"][0]["requests"], 7);

    let by_model = api.ok(&format!("/v1/usage?{range}&group_by=model")).await;
    let want: BTreeMap<String, String> = [
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "0.324"),
        ("claude-sonnet-4-5", "0.135"),
        ("gpt-4", "0"),
        ("gpt-4o", "0.0135"),
        ("no-such-model", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(saved(&by_model, "model"), want);
    // gpt-4's reads were charged as input: priced, not saved on.
    let gpt_4 = by_model["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == "gpt-4")
        .unwrap();
    assert_eq!(gpt_4["cost_usd"], "0.3");

    let by_key = api.ok(&format!("/v1/usage?{range}&group_by=key")).await;
    let want: BTreeMap<String, String> = [("(none)", "0"), ("key_a", "0.14"), ("key_b", "0.3325")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(saved(&by_key, "key"), want);

    // Conservation, exactly: the finest grouping and every bucket add up to the total.
    for query in [
        "group_by=key,model,account,provider,endpoint,status",
        "bucket=minute&group_by=model",
    ] {
        let rows = api.ok(&format!("/v1/usage?{range}&{query}")).await;
        assert_eq!(
            sum_rows(&rows["rows"])[6],
            Decimal::from_str("0.4725").unwrap(),
            "{query}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_refused_naming_the_parameter() {
    let stream = unique_stream();
    let (addr, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let api = Api {
        http: reqwest::Client::new(),
        addr,
    };
    let now = chrono::Utc::now().timestamp_millis();
    for (query, param) in [
        ("from=yesterday", "from"),
        ("to=2026-13-01T00:00:00Z", "to"),
        ("from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "from"),
        ("from=-5", "from"),
        ("to=99999999999999999", "to"),
        ("bucket=week", "bucket"),
        ("group_by=model,colour", "group_by"),
        ("tz=Europe/Paris", "tz"),
        ("tz=%2B25:00", "tz"),
        ("status=ok", "status"),
        ("limit=10", "limit"),
        ("quantiles=0.5", "quantiles"),
        // More than 10,000 buckets.
        ("from=0&bucket=day", "bucket"),
        // Minutes are kept 48 h, hours 90 days.
        (
            &format!("from={}&to={}&bucket=minute", now - 5 * DAY, now - 4 * DAY),
            "bucket",
        ),
        (
            &format!(
                "from={}&to={}&bucket=hour",
                now - 200 * DAY,
                now - 199 * DAY
            ),
            "bucket",
        ),
        // A half-hour offset needs minutes at every local midnight.
        (
            &format!("from={}&bucket=day&tz=%2B05:30", now - 5 * DAY),
            "tz",
        ),
        // A whole-hour offset needs hours.
        (
            &format!(
                "from={}&to={}&bucket=day&tz=-03:00",
                now - 200 * DAY,
                now - 190 * DAY
            ),
            "tz",
        ),
    ] {
        api.refused(&format!("/v1/usage?{query}"), param).await;
    }
    api.refused("/v1/latency?quantiles=1.5", "quantiles").await;
    api.refused("/v1/latency?quantiles=", "quantiles").await;
    api.refused("/v1/latency?bucket=fortnight", "bucket").await;
    // The same offset in UTC, and the default range, are fine.
    api.ok(&format!("/v1/usage?from={}&bucket=day", now - 5 * DAY))
        .await;
    let default = api.ok("/v1/latency").await;
    let (from, to) = (
        ms(default["from"].as_str().unwrap()),
        ms(default["to"].as_str().unwrap()),
    );
    // The server's clock may have passed a minute boundary since `now`.
    assert!(
        [1, 2].contains(&((to - now / MINUTE * MINUTE) / MINUTE)),
        "{default}"
    );
    assert_eq!(from, (to - 7 * DAY) / HOUR * HOUR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_the_stats_routes_only() {
    let stream = unique_stream();
    let (addr, _stop) = spawn_aggregator_with(redis_url(), &stream, |args| {
        args.admin_token = Some("s3cret".into());
    })
    .await;
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut request = http.get(format!("http://{addr}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for path in ["/v1/usage", "/v1/latency?group_by=model", "/v1/status"] {
        for token in [None, Some("wrong"), Some("s3cret-and-more"), Some("")] {
            let response = get(path, token).await.unwrap();
            assert_eq!(response.status(), 401, "{path} {token:?}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["type"], "authentication_error");
        }
        assert_eq!(get(path, Some("s3cret")).await.unwrap().status(), 200);
    }
    // Bad parameters are only judged once admitted.
    let response = get("/v1/usage?bucket=week", None).await.unwrap();
    assert_eq!(response.status(), 401);
    // The dashboard's files hold no data: the page asks for the token, then reads the API.
    for path in ["/healthz", "/metrics", "/", "/dashboard/app.js"] {
        assert_eq!(get(path, None).await.unwrap().status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_lag_pending_and_dead_letters() {
    let stream = unique_stream();
    let now = chrono::Utc::now().timestamp_millis();
    let mut rng = Lcg(17);
    let events: Vec<UsageEvent> = (0..5).map(|i| event(i, now - HOUR, &mut rng)).collect();
    publish(&stream, &events).await;
    // Two entries no decoder reads: they are set aside, not counted.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for garbage in [&b"not msgpack"[..], &b"\xff\x00"[..]] {
        redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(shared::EVENT_FIELD)
            .arg(garbage)
            .query_async::<String>(&mut conn)
            .await
            .unwrap();
    }
    let (addr, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let api = Api {
        http: reqwest::Client::new(),
        addr,
    };
    wait_applied(&stream).await;
    let status = eventually(Duration::from_secs(30), || async {
        let (code, body) = api.get("/v1/status").await;
        assert_eq!(code, 200, "{body}");
        (body["dead_letters"] == 2).then_some(body)
    })
    .await;
    assert_eq!(
        status,
        serde_json::json!({"lag": 0, "pending": 0, "dead_letters": 2, "partitions": [
            {"partition": 0, "stream": stream, "lag": 0, "pending": 0, "dead_letters": 2},
        ]})
    );
    assert_eq!(
        sum_rows(&api.ok("/v1/usage").await["rows"])[0],
        Decimal::from(5)
    );
}

/// The cache of reduced cells must never answer with a figure Redis no longer holds, whoever
/// changed it: a late event committed by the aggregator, or another client deleting and
/// rewriting a cell (as a replay would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_cells_follow_every_change_at_once() {
    let stream = unique_stream();
    let now = chrono::Utc::now().timestamp_millis();
    let hour = (now - 5 * DAY) / HOUR * HOUR;
    let mut rng = Lcg(5);
    let first: Vec<UsageEvent> = (0..20)
        .map(|i| event(i, hour + (i as i64) * MINUTE, &mut rng))
        .collect();
    publish(&stream, &first).await;
    let (addr, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let api = Api {
        http: reqwest::Client::new(),
        addr,
    };
    wait_applied(&stream).await;
    let query = format!(
        "/v1/usage?from={}&to={}&bucket=hour&group_by=model",
        hour - 2 * HOUR,
        hour + 3 * HOUR
    );
    let requests = |answer: &Value| sum_rows(&answer["rows"])[0];
    // Twice: the second answer comes from the cache.
    assert_eq!(requests(&api.ok(&query).await), Decimal::from(20));
    assert_eq!(requests(&api.ok(&query).await), Decimal::from(20));
    let hits = api.metric("meter_stats_cache_hits_total").await;
    assert!(hits >= 5, "the five hour cells were cached: {hits}");

    // A late event for that hour: the first answer after it is applied includes it.
    let late = vec![event(1000, hour + 30 * MINUTE, &mut rng)];
    publish(&stream, &late).await;
    wait_applied(&stream).await;
    assert_eq!(requests(&api.ok(&query).await), Decimal::from(21));

    // Another client deletes the hour's bucket and writes one cell.
    let keyspace = shared::Keyspace::new(&stream).unwrap();
    let cell = keyspace.key(&format!("st:h:{hour}"));
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("DEL")
        .arg(&cell)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(requests(&api.ok(&query).await), Decimal::ZERO);
    let tuple = ["k", "m", "a", "anthropic", "messages", "200"].join("\u{1f}");
    let write_cell = |requests: i64| {
        aggregator::cell::Cell {
            totals: aggregator::Totals {
                requests,
                ..Default::default()
            },
            ..Default::default()
        }
        .encode(aggregator::cell::new_stamp())
    };
    redis::cmd("HSET")
        .arg(&cell)
        .arg(&tuple)
        .arg(write_cell(7))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(requests(&api.ok(&query).await), Decimal::from(7));
    redis::cmd("HSET")
        .arg(&cell)
        .arg(&tuple)
        .arg(write_cell(8))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let answer = api.ok(&query).await;
    assert_eq!(requests(&answer), Decimal::from(8));
    assert_eq!(answer["rows"][0]["model"], "m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_command_prints_what_the_api_answers() {
    let stream = unique_stream();
    let now = chrono::Utc::now().timestamp_millis();
    let all = events(now);
    publish(&stream, &all).await;
    let (addr, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let api = Api {
        http: reqwest::Client::new(),
        addr,
    };
    wait_applied(&stream).await;
    let (from, to) = (now - 30 * DAY, now - 10 * DAY);
    let http = api
        .ok(&format!(
            "/v1/usage?from={from}&to={to}&group_by=model&bucket=month"
        ))
        .await;
    let binary = tests::process::binary("aggregator", "aggregator");
    let run = |extra: &[&str]| {
        let output = std::process::Command::new(&binary)
            .env_clear()
            .args(["usage", "--redis-url", redis_url(), "--stream", &stream])
            .args(["--from", &from.to_string(), "--to", &to.to_string()])
            .args(["--group-by", "model", "--bucket", "month"])
            .args(extra)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let json: Value = serde_json::from_str(&run(&["--json"])).unwrap();
    assert_eq!(json, http);
    // Byte for byte what the route answers, fields in the same order.
    let raw = |path: String| {
        let http = api.http.clone();
        async move {
            let response = http
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }
    };
    let http_text = raw(format!(
        "/v1/usage?from={from}&to={to}&group_by=model&bucket=month"
    ))
    .await;
    assert_eq!(run(&["--json"]).trim_end(), http_text);
    // The table's label columns follow the `--group-by` order.
    let output = std::process::Command::new(&binary)
        .env_clear()
        .args(["usage", "--redis-url", redis_url(), "--stream", &stream])
        .args(["--from", &from.to_string(), "--to", &to.to_string()])
        .args(["--group-by", "provider,model", "--bucket", "month"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8(output.stdout).unwrap();
    let header = table.lines().nth(1).unwrap();
    assert_eq!(
        header.split_whitespace().take(3).collect::<Vec<_>>(),
        ["bucket_start", "provider", "model"],
        "{table}"
    );
    let table = run(&[]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[1].starts_with("bucket_start"), "{table}");
    assert!(
        lines[1].contains("cost_usd  cache_savings_usd  unpriced"),
        "{table}"
    );
    assert_eq!(
        lines.len(),
        2 + http["rows"].as_array().unwrap().len() + 1,
        "{table}"
    );
    let total = lines.last().unwrap();
    let want = sum_rows(&http["rows"]);
    assert!(total.starts_with("total"), "{table}");
    assert!(total.contains(&format!(" {} ", want[0])), "{table}");
    // `aggregator latency`: the same for `/v1/latency`.
    let latency = |extra: &[&str]| {
        let output = std::process::Command::new(&binary)
            .env_clear()
            .args(["latency", "--redis-url", redis_url(), "--stream", &stream])
            .args(["--from", &from.to_string(), "--to", &to.to_string()])
            .args(["--group-by", "model", "--quantiles", "0.5,0.99"])
            .args(extra)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let http_text = raw(format!(
        "/v1/latency?from={from}&to={to}&group_by=model&quantiles=0.5,0.99"
    ))
    .await;
    assert_eq!(latency(&["--json"]).trim_end(), http_text);
    let document: Value = serde_json::from_str(&http_text).unwrap();
    let table = latency(&[]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[1].starts_with("model") && lines[1].contains("latency_p50_ms  latency_p99_ms"),
        "{table}"
    );
    assert_eq!(
        lines.len(),
        2 + document["rows"].as_array().unwrap().len(),
        "{table}"
    );
    // A bad parameter: a one-line reason and a non-zero exit.
    let output = std::process::Command::new(&binary)
        .env_clear()
        .args(["usage", "--redis-url", redis_url(), "--bucket", "week"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("bucket"));
}
