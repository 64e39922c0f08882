//! The command line: `aggregator` alone runs the server (docs/configuration.md); subcommands are
//! one-shot tools over the same configuration.
//!
//! `aggregator usage` reads Redis directly rather than calling the HTTP API: it needs no running
//! server and no admin token, takes the same `--redis-url`/`--stream` settings as the server,
//! and runs the very code that answers `/v1/usage` (parsing, planning, reading, grouping), so
//! its figures and errors are the API's by construction; `--json` prints the API's document
//! byte for byte. `aggregator latency` does the same for `/v1/latency`.

use std::collections::HashMap;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use serde_json::Value;

use crate::config::{Args, Config};
use crate::query::Kind;

#[derive(Debug, Parser)]
#[command(
    name = "aggregator",
    version,
    about = "Consumes usage events, prices them, serves stats"
)]
pub struct Cli {
    #[command(flatten)]
    pub args: Args,
    /// Without a subcommand, the aggregator runs as the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prints usage and cost from the stats in Redis, as a table or as the `/v1/usage` JSON.
    Usage(UsageArgs),
    /// Prints latency and time-to-first-token quantiles from the stats in Redis, as a table or
    /// as the `/v1/latency` JSON.
    Latency(LatencyArgs),
    /// Recomputes stats and spend counters of whole days from the retained stream (e.g. with new
    /// prices) while live aggregators keep consuming, then switches to them atomically.
    Replay(crate::replay::ReplayArgs),
}

/// The parameters of `/v1/usage`, and of `/v1/latency` but `quantiles`.
#[derive(Debug, ClapArgs)]
pub struct QueryArgs {
    /// Start, RFC 3339 or Unix ms (default: 7 days before `--to`).
    #[arg(long)]
    pub from: Option<String>,
    /// End (exclusive), RFC 3339 or Unix ms (default: the end of the current minute).
    #[arg(long)]
    pub to: Option<String>,
    /// minute, hour, day, month or all.
    #[arg(long)]
    pub bucket: Option<String>,
    /// Comma list of key, model, account, provider, endpoint, status; the table's columns
    /// follow this order.
    #[arg(long)]
    pub group_by: Option<String>,
    /// Fixed offset for day and month buckets, such as +08:00.
    #[arg(long, allow_hyphen_values = true)]
    pub tz: Option<String>,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub provider: Option<String>,
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long)]
    pub status: Option<String>,
    /// Print the API's JSON document, exactly as the HTTP route answers it, instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, ClapArgs)]
pub struct UsageArgs {
    #[command(flatten)]
    pub query: QueryArgs,
    /// Only rows with requests whose model had no price (`unpriced=true`); with
    /// `--group-by model`, the models used without a price.
    #[arg(long)]
    pub unpriced: bool,
}

#[derive(Debug, ClapArgs)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub query: QueryArgs,
    /// Comma list of 1 to 20 quantiles in [0, 1] (default 0.5,0.9,0.99).
    #[arg(long)]
    pub quantiles: Option<String>,
}

impl QueryArgs {
    /// The same query parameters the HTTP API takes.
    fn params(&self) -> HashMap<String, String> {
        [
            ("from", &self.from),
            ("to", &self.to),
            ("bucket", &self.bucket),
            ("group_by", &self.group_by),
            ("tz", &self.tz),
            ("key", &self.key),
            ("model", &self.model),
            ("account", &self.account),
            ("provider", &self.provider),
            ("endpoint", &self.endpoint),
            ("status", &self.status),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.clone().map(|v| (name.to_owned(), v)))
        .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("cannot connect to Redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error("{0}")]
    Query(String),
}

/// Runs `aggregator usage`; the output goes to `out`.
pub async fn usage(
    config: &Config,
    args: &UsageArgs,
    out: &mut impl std::io::Write,
) -> Result<(), UsageError> {
    let mut params = args.query.params();
    if args.unpriced {
        params.insert("unpriced".to_owned(), "true".to_owned());
    }
    query(config, Kind::Usage, &params, args.query.json, out).await
}

/// Runs `aggregator latency`; the output goes to `out`.
pub async fn latency(
    config: &Config,
    args: &LatencyArgs,
    out: &mut impl std::io::Write,
) -> Result<(), UsageError> {
    let mut params = args.query.params();
    if let Some(quantiles) = &args.quantiles {
        params.insert("quantiles".to_owned(), quantiles.clone());
    }
    query(config, Kind::Latency, &params, args.query.json, out).await
}

async fn query(
    config: &Config,
    kind: Kind,
    params: &HashMap<String, String>,
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(), UsageError> {
    let redis_error = |source| UsageError::Redis {
        url: config.redis.describe(),
        source,
    };
    // Only reads, so no eviction-policy check (`shared::redis_policy`): an evicting Redis
    // cannot make this command count anything twice, and the servers refuse to run on one.
    let timeouts = shared::Timeouts::new(Duration::from_secs(5), Duration::from_secs(30));
    let conn = config.redis.connect(timeouts).await.map_err(redis_error)?;
    // One query: nothing to cache.
    let cells = crate::query::cache::CellReader::new(
        &config.redis,
        config.partitions.clone(),
        conn,
        0,
        Default::default(),
    )
    .map_err(redis_error)?;
    let now = chrono::Utc::now().timestamp_millis();
    let answer = crate::query::api::answer(&cells, params, kind, now)
        .await
        .map_err(|e| UsageError::Query(e.to_string()))?;
    let render_error =
        |e: serde_json::Error| UsageError::Query(format!("cannot render the answer: {e}"));
    // Serialised straight from the answer, like the route does: a `serde_json::Value` would
    // sort the fields by name.
    let document = serde_json::to_string(&answer).map_err(render_error)?;
    let text = if json {
        document + "\n"
    } else {
        let parsed: Value = serde_json::from_str(&document).map_err(render_error)?;
        let columns = match answer.kind() {
            Kind::Usage => usage_columns(),
            Kind::Latency => latency_columns(&answer.quantile_labels()),
        };
        table(
            &parsed,
            &answer.label_fields(),
            &columns,
            answer.kind() == Kind::Usage,
        )
    };
    out.write_all(text.as_bytes())
        .map_err(|e| UsageError::Query(format!("cannot write output: {e}")))
}

/// A figure column of the table: its header and where its value is in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub header: String,
    pub field: &'static str,
    /// The entry of an object field (`latency_ms.p50`).
    pub entry: Option<String>,
}

impl Column {
    fn plain(field: &'static str, header: &str) -> Self {
        Self {
            header: header.to_owned(),
            field,
            entry: None,
        }
    }

    fn value<'a>(&self, row: &'a Value) -> &'a Value {
        match &self.entry {
            Some(entry) => &row[self.field][entry.as_str()],
            None => &row[self.field],
        }
    }
}

pub fn usage_columns() -> Vec<Column> {
    [
        ("requests", "requests"),
        ("errors", "errors"),
        ("input_tokens", "input"),
        ("output_tokens", "output"),
        ("cache_creation_input_tokens", "cache_write"),
        ("cache_read_input_tokens", "cache_read"),
        ("cost_usd", "cost_usd"),
        ("cache_savings_usd", "cache_savings_usd"),
        ("unpriced_requests", "unpriced"),
    ]
    .into_iter()
    .map(|(field, header)| Column::plain(field, header))
    .collect()
}

/// `count`, `ttft_count`, then each latency quantile and each TTFT quantile, in milliseconds.
pub fn latency_columns(quantiles: &[String]) -> Vec<Column> {
    let mut columns = vec![
        Column::plain("count", "count"),
        Column::plain("ttft_count", "ttft_count"),
    ];
    for (field, prefix) in [("latency_ms", "latency"), ("ttft_ms", "ttft")] {
        for q in quantiles {
            columns.push(Column {
                header: format!("{prefix}_{q}_ms"),
                field,
                entry: Some(q.clone()),
            });
        }
    }
    columns
}

/// The rows of a stats document as an aligned table: the label fields present in the rows, in
/// the order given (the group-by order), left-aligned, then the figure columns right-aligned,
/// then a total line when `total` (sums: usage only, quantiles do not add up).
pub fn table(document: &Value, label_fields: &[&str], columns: &[Column], total: bool) -> String {
    let rows = document["rows"].as_array().cloned().unwrap_or_default();
    let labels: Vec<&str> = label_fields
        .iter()
        .copied()
        .filter(|name| rows.iter().any(|r| r.get(name).is_some()))
        .collect();
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut lines: Vec<Vec<String>> = vec![
        labels
            .iter()
            .map(|l| (*l).to_owned())
            .chain(columns.iter().map(|c| c.header.clone()))
            .collect(),
    ];
    for row in &rows {
        lines.push(
            labels
                .iter()
                .map(|l| cell(&row[*l]))
                .chain(columns.iter().map(|c| cell(c.value(row))))
                .collect(),
        );
    }
    // Ungrouped, the one row is the total.
    if total && !labels.is_empty() {
        let mut sums = vec![String::new(); labels.len()];
        if let Some(first) = sums.first_mut() {
            *first = "total".to_owned();
        }
        for column in columns {
            let sum: rust_decimal::Decimal = rows
                .iter()
                .filter_map(|r| match column.value(r) {
                    Value::String(s) => s.parse().ok(),
                    Value::Number(n) => n.as_i64().map(rust_decimal::Decimal::from),
                    _ => None,
                })
                .sum();
            sums.push(sum.normalize().to_string());
        }
        lines.push(sums);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = format!(
        "from {} to {}, {} rows\n",
        cell(&document["from"]),
        cell(&document["to"]),
        rows.len()
    );
    for line in &lines {
        let fields: Vec<String> = line
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c < labels.len() {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        text.push_str(fields.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_columns_and_totals_them() {
        let document = serde_json::json!({
            "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z",
            "rows": [
                {"model": "claude-sonnet-4-5", "requests": 12, "errors": 1, "input_tokens": 100,
                 "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                 "cost_usd": "0.000375", "cache_savings_usd": "0", "unpriced_requests": 0},
                {"model": "gpt-4o", "requests": 3, "errors": 0, "input_tokens": 7,
                 "output_tokens": 2000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 9,
                 "cost_usd": "0.02", "cache_savings_usd": "0.00001125", "unpriced_requests": 0}
            ]
        });
        let text = table(
            &document,
            &["bucket_start", "model"],
            &usage_columns(),
            true,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "from 2026-01-01T00:00:00Z to 2026-01-02T00:00:00Z, 2 rows"
        );
        assert!(
            lines[1].starts_with("model              requests  errors"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("claude-sonnet-4-5        12       1"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("total                    15       1"),
            "{text}"
        );
        assert!(
            lines[4].ends_with("0.020375         0.00001125         0"),
            "{text}"
        );
        let widths: Vec<usize> = lines[1..].iter().map(|l| l.len()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{text}");
    }

    #[test]
    fn the_label_columns_follow_the_group_by_order() {
        let document = serde_json::json!({
            "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z",
            "rows": [
                {"provider": "openai", "model": "gpt-4o", "key": "key_1", "key_name": "alice",
                 "requests": 1, "errors": 0, "input_tokens": 1, "output_tokens": 1,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                 "cost_usd": "0.1", "cache_savings_usd": "0", "unpriced_requests": 0}
            ]
        });
        let text = table(
            &document,
            &["bucket_start", "provider", "model", "key", "key_name"],
            &usage_columns(),
            true,
        );
        let header = text.lines().nth(1).unwrap_or_default();
        assert!(
            header.starts_with("provider  model   key    key_name  requests"),
            "{text}"
        );
    }

    #[test]
    fn the_latency_table_shows_each_quantile_and_no_total() {
        let document = serde_json::json!({
            "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z",
            "rows": [
                {"model": "m", "count": 3, "ttft_count": 2,
                 "latency_ms": {"p50": 812.4, "p99.9": 5230.0},
                 "ttft_ms": {"p50": 120.0, "p99.9": null}}
            ]
        });
        let quantiles = ["p50".to_owned(), "p99.9".to_owned()];
        let text = table(&document, &["model"], &latency_columns(&quantiles), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[1],
            "model  count  ttft_count  latency_p50_ms  latency_p99.9_ms  ttft_p50_ms  ttft_p99.9_ms"
        );
        assert_eq!(
            lines[2],
            "m          3           2           812.4            5230.0        120.0              -"
        );
    }

    #[test]
    fn replay_help_lists_only_the_flags_that_apply_to_it() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        // Propagates the global flags to the subcommands, as parsing does.
        cli.build();
        let help = cli
            .find_subcommand_mut("replay")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        for flag in [
            "--from",
            "--pricing",
            "--batch-size",
            "--redis-url",
            "--stream",
        ] {
            assert!(help.contains(flag), "{flag} missing:\n{help}");
        }
        for flag in [
            "--listen",
            "--admin-token",
            "--linger-ms",
            "--stats-cache-rows",
        ] {
            assert!(!help.contains(flag), "{flag} listed:\n{help}");
        }
        // `--pricing` and `--batch-size` are the replay's own, not the server's.
        let cli = Cli::try_parse_from([
            "aggregator",
            "replay",
            "--pricing",
            "p.json",
            "--batch-size",
            "7",
        ])
        .unwrap();
        assert_eq!(cli.args.pricing, None);
        assert_eq!(cli.args.batch_size, None);
        match cli.command {
            Some(Command::Replay(args)) => {
                assert_eq!(args.pricing, Some("p.json".into()));
                assert_eq!(args.batch_size, 7);
            }
            other => panic!("{other:?}"),
        }
    }
}
