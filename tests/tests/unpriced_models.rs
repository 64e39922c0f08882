//! Models used without a price (docs/pricing.md, "Models without a price"): a model the price
//! table lacks is relayed and metered at cost 0; `/v1/usage?unpriced=true` and
//! `aggregator usage --unpriced` name it, and a replay with a price for it prices its past
//! requests, after which it is no longer listed.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use tests::harness::{Pipeline, eventually};
use tests::process::binary;

/// Not in the bundled table (Codex CLI's default model when this was written).
const NEW_MODEL: &str = "gpt-6.2-sol";

/// The price file an operator would write: the models in use, the new one with its rates.
const PRICES: &str = r#"{
  "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
    "cache_read_input_token_cost": 1.25e-06, "litellm_provider": "openai", "mode": "chat"},
  "gpt-6.2-sol": {"input_cost_per_token": 1.75e-06, "output_cost_per_token": 1.4e-05,
    "cache_read_input_token_cost": 1.75e-07, "litellm_provider": "openai", "mode": "responses"}
}"#;

fn aggregator(p: &Pipeline, args: &[&str]) -> String {
    let output = Command::new(binary("aggregator", "aggregator"))
        .env_clear()
        .env("REDIS_URL", &p.redis_url)
        .env("METER_STREAM", &p.stream)
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_without_a_price_are_listed_until_a_replay_prices_them() {
    let p = Pipeline::start().await;
    p.add_account("openai").await;
    let (_, secret) = p.add_key(json!({"name": "codex"})).await;
    let respond = |model: &str| {
        p.http
            .post(p.gateway_url("/v1/responses"))
            .bearer_auth(&secret)
            .json(&json!({"model": model, "input": "hi",
                          "mock": {"input_tokens": 1000, "output_tokens": 200}}))
            .send()
    };
    for model in [NEW_MODEL, NEW_MODEL, "gpt-4o"] {
        assert_eq!(respond(model).await.unwrap().status(), 200);
    }
    // Refused before relaying (no such key): bought nothing, so never unpriced.
    let refused = p
        .http
        .post(p.gateway_url("/v1/responses"))
        .bearer_auth("mk-unknown")
        .json(&json!({"model": "another-new-model", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let query = "group_by=model&unpriced=true";
    let unpriced = eventually(Duration::from_secs(30), || async {
        let all = p.try_usage("").await?;
        (all["rows"][0]["requests"] == 4).then_some(())?;
        p.try_usage(query).await
    })
    .await;
    assert_eq!(
        unpriced["rows"],
        json!([{"model": NEW_MODEL, "requests": 2, "errors": 0, "input_tokens": 2000,
                "output_tokens": 400, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0, "cost_usd": "0", "cache_savings_usd": "0", "unpriced_requests": 2}]),
        "{unpriced}"
    );
    // Without the parameter every model is there, priced or not.
    let everything = p.usage("group_by=model").await;
    assert_eq!(
        everything["rows"].as_array().unwrap().len(),
        3,
        "{everything}"
    );
    let refused = p
        .http
        .get(p.aggregator_url("/v1/usage?unpriced=yes"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["param"], "unpriced", "{body}");

    // The command prints the same, as JSON and as a table.
    let cli = ["usage", "--unpriced", "--group-by", "model"];
    let printed: Value =
        serde_json::from_str(&aggregator(&p, &[&cli[..], &["--json"]].concat())).unwrap();
    assert_eq!(printed["rows"], unpriced["rows"]);
    let table = aggregator(&p, &cli);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "range, header, one model, total: {table}");
    assert!(lines[1].ends_with("unpriced"), "{table}");
    assert!(lines[2].starts_with(NEW_MODEL), "{table}");
    assert!(lines[2].trim_end().ends_with(" 2"), "2 unpriced: {table}");

    // A price for it, and a replay: the past requests are priced and the list is empty.
    let prices = std::env::temp_dir().join(format!("prices-{}.json", p.stream.replace(':', "-")));
    std::fs::write(&prices, PRICES).unwrap();
    let summary = aggregator(&p, &["replay", "--pricing", prices.to_str().unwrap()]);
    assert!(summary.contains(NEW_MODEL), "{summary}");
    assert_eq!(p.usage(query).await["rows"], json!([]));
    let repriced = p.usage(&format!("group_by=model&model={NEW_MODEL}")).await;
    let row = &repriced["rows"][0];
    assert_eq!(row["unpriced_requests"], 0, "{repriced}");
    // 2 × (1000 × 1.75e-06 + 200 × 1.4e-05), worked out by hand.
    assert_eq!(
        Decimal::from_str(row["cost_usd"].as_str().unwrap()).unwrap(),
        Decimal::from_str("0.0091").unwrap()
    );
    let _ = std::fs::remove_file(prices);
}
