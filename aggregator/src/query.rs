//! Stats queries: parameters as the API receives them, validated into a [`Query`], and the pure
//! grouping of stored cells into result rows.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::rollup::{HOUR_MS, Resolution};
use crate::sketch::Sketch;
use crate::stats::{DIMENSIONS, Dims, Field, Totals, read_field};

fn hour_of(ts_ms: i64) -> i64 {
    Resolution::Hour.start_of(ts_ms)
}

/// Longest range one query may scan, in hour buckets: bounds the work of a request.
pub const MAX_HOURS: i64 = 24 * 93;
const DEFAULT_RANGE_HOURS: i64 = 24 * 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    All,
    Hour,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Effective half-open range `[from, to)`, aligned to hours.
    pub from_ms: i64,
    pub to_ms: i64,
    pub bucket: Bucket,
    /// Indices into [`DIMENSIONS`], in the order asked for.
    pub group_by: Vec<usize>,
    /// Dimension index → required value.
    pub filters: Vec<(usize, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{param}: {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

fn bad(param: &str, message: impl Into<String>) -> ParamError {
    ParamError {
        param: param.to_owned(),
        message: message.into(),
    }
}

/// RFC 3339 or Unix milliseconds.
pub fn parse_time(param: &str, raw: &str) -> Result<i64, ParamError> {
    if let Ok(ms) = raw.parse::<i64>() {
        return Ok(ms);
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            bad(
                param,
                format!("{raw:?} is neither RFC 3339 nor Unix milliseconds"),
            )
        })
}

impl Query {
    pub fn parse(params: &HashMap<String, String>, now_ms: i64) -> Result<Self, ParamError> {
        let known = ["from", "to", "bucket", "group_by", "tz", "quantiles"];
        for name in params.keys() {
            if !known.contains(&name.as_str()) && !DIMENSIONS.contains(&name.as_str()) {
                return Err(bad(name, "unknown parameter"));
            }
        }
        let to_ms = match params.get("to") {
            Some(raw) => hour_of(parse_time("to", raw)?),
            // Everything so far: the end of the current hour.
            None => hour_of(now_ms) + HOUR_MS,
        };
        let from_ms = match params.get("from") {
            Some(raw) => hour_of(parse_time("from", raw)?),
            None => to_ms - DEFAULT_RANGE_HOURS * HOUR_MS,
        };
        if from_ms > to_ms {
            return Err(bad("from", "must not be after `to`"));
        }
        if (to_ms - from_ms) / HOUR_MS > MAX_HOURS {
            return Err(bad(
                "from",
                format!("the range spans more than {MAX_HOURS} hours; narrow it"),
            ));
        }
        let bucket = match params.get("bucket").map(String::as_str) {
            None | Some("all") => Bucket::All,
            Some("hour") => Bucket::Hour,
            Some(other) => {
                return Err(bad("bucket", format!("{other:?} is not one of all, hour")));
            }
        };
        if let Some(tz) = params.get("tz")
            && !matches!(tz.as_str(), "Z" | "UTC" | "+00:00" | "-00:00")
        {
            // Offsets change day and month boundaries only; until those buckets exist an
            // offset would be silently ignored, so refuse it instead.
            return Err(bad("tz", "only UTC is supported with bucket=all|hour"));
        }
        let mut group_by = Vec::new();
        for name in params
            .get("group_by")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
        {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            let index = DIMENSIONS.iter().position(|d| *d == name).ok_or_else(|| {
                bad(
                    "group_by",
                    format!("{name:?} is not one of {}", DIMENSIONS.join(", ")),
                )
            })?;
            if !group_by.contains(&index) {
                group_by.push(index);
            }
        }
        let filters = DIMENSIONS
            .iter()
            .enumerate()
            .filter_map(|(i, d)| params.get(*d).map(|v| (i, v.clone())))
            .collect();
        Ok(Self {
            from_ms,
            to_ms,
            bucket,
            group_by,
            filters,
        })
    }

    /// Hour buckets the query reads.
    pub fn hours(&self) -> impl Iterator<Item = i64> + use<> {
        (self.from_ms..self.to_ms).step_by(HOUR_MS as usize)
    }

    fn matches(&self, dims: &Dims) -> bool {
        self.filters.iter().all(|(i, v)| dims.0[*i] == *v)
    }
}

/// A result row's identity: its bucket (None for `all`) and grouped dimension values.
pub type RowKey = (Option<i64>, Vec<String>);

/// Sums stored cells into rows. `hours` pairs each hour start with its hash's fields.
pub fn group(query: &Query, hours: &[(i64, Vec<(String, i64)>)]) -> BTreeMap<RowKey, Totals> {
    let mut rows: BTreeMap<RowKey, Totals> = BTreeMap::new();
    for (hour, fields) in hours {
        let bucket = match query.bucket {
            Bucket::All => None,
            Bucket::Hour => Some(*hour),
        };
        for (field, value) in fields {
            let Some((dims, Field::Counter(totals))) = read_field(field, *value) else {
                continue;
            };
            if !query.matches(&dims) {
                continue;
            }
            let values = query.group_by.iter().map(|i| dims.0[*i].clone()).collect();
            rows.entry((bucket, values)).or_default().add(&totals);
        }
    }
    rows
}

/// Latency and time-to-first-token sketches of one result row.
#[derive(Debug, Default)]
pub struct LatencyRow {
    pub latency: Sketch,
    pub ttft: Sketch,
}

/// Merges stored sketch bins into rows, like [`group`] does for counters.
pub fn group_latency(
    query: &Query,
    hours: &[(i64, Vec<(String, i64)>)],
) -> BTreeMap<RowKey, LatencyRow> {
    let mut rows: BTreeMap<RowKey, LatencyRow> = BTreeMap::new();
    for (hour, fields) in hours {
        let bucket = match query.bucket {
            Bucket::All => None,
            Bucket::Hour => Some(*hour),
        };
        for (field, value) in fields {
            let Some((dims, field)) = read_field(field, *value) else {
                continue;
            };
            if matches!(field, Field::Counter(_)) || !query.matches(&dims) {
                continue;
            }
            let values = query.group_by.iter().map(|i| dims.0[*i].clone()).collect();
            let row = rows.entry((bucket, values)).or_default();
            match field {
                Field::Latency(bin, n) => row.latency.add_bin(bin, n),
                Field::Ttft(bin, n) => row.ttft.add_bin(bin, n),
                Field::Counter(_) => {}
            }
        }
    }
    rows
}

/// `quantiles=0.5,0.9,0.99` (the default).
pub fn parse_quantiles(params: &HashMap<String, String>) -> Result<Vec<f64>, ParamError> {
    let Some(raw) = params.get("quantiles") else {
        return Ok(vec![0.5, 0.9, 0.99]);
    };
    let quantiles: Vec<f64> = raw
        .split(',')
        .map(|q| {
            q.trim()
                .parse::<f64>()
                .ok()
                .filter(|q| (0.0..=1.0).contains(q))
                .ok_or_else(|| {
                    bad(
                        "quantiles",
                        format!("{q:?} is not a number between 0 and 1"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    if quantiles.is_empty() || quantiles.len() > 20 {
        return Err(bad("quantiles", "give between 1 and 20 quantiles"));
    }
    Ok(quantiles)
}

/// `0.5` → `p50`, `0.999` → `p99.9`.
pub fn quantile_label(q: f64) -> String {
    let percent = q * 100.0;
    let rounded = (percent * 1e6).round() / 1e6;
    format!("p{rounded}")
}

pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[track_caller]
    fn check_err(pairs: &[(&str, &str)], param: &str) {
        let err = Query::parse(&params(pairs), 0).unwrap_err();
        assert_eq!(err.param, param, "{err}");
    }

    #[test]
    fn times_are_aligned_down_to_the_hour_in_either_format() {
        let q = Query::parse(
            &params(&[("from", "2026-01-01T10:30:00Z"), ("to", "1767272400001")]),
            0,
        )
        .unwrap();
        assert_eq!(rfc3339(q.from_ms), "2026-01-01T10:00:00Z");
        assert_eq!(rfc3339(q.to_ms), "2026-01-01T13:00:00Z");
        assert_eq!(q.hours().count(), 3);
    }

    #[test]
    fn bad_parameters_are_named() {
        check_err(&[("from", "yesterday")], "from");
        check_err(&[("bucket", "week")], "bucket");
        check_err(&[("group_by", "model,colour")], "group_by");
        check_err(&[("from", "0"), ("to", "999999999999")], "from");
        check_err(&[("limit", "3")], "limit");
        check_err(&[("from", "7200000"), ("to", "0")], "from");
        check_err(&[("tz", "+08:00")], "tz");
    }

    #[test]
    fn quantiles_are_parsed_and_labelled() {
        assert_eq!(parse_quantiles(&params(&[])).unwrap(), [0.5, 0.9, 0.99]);
        assert_eq!(
            parse_quantiles(&params(&[("quantiles", "0.999, 1")])).unwrap(),
            [0.999, 1.0]
        );
        assert_eq!(
            parse_quantiles(&params(&[("quantiles", "1.5")]))
                .unwrap_err()
                .param,
            "quantiles"
        );
        assert_eq!(quantile_label(0.5), "p50");
        assert_eq!(quantile_label(0.999), "p99.9");
        assert_eq!(quantile_label(0.99), "p99");
    }

    #[test]
    fn grouping_filters_and_sums_cells() {
        let q = Query::parse(
            &params(&[
                ("from", "0"),
                ("to", "7200000"),
                ("group_by", "model"),
                ("status", "200"),
            ]),
            0,
        )
        .unwrap();
        let tuple = |model: &str, status: &str| {
            ["k", model, "a", "anthropic", "messages", status].join("\u{1f}")
        };
        let hours = vec![
            (
                0,
                vec![
                    (format!("r:{}", tuple("m1", "200")), 2),
                    (format!("r:{}", tuple("m1", "500")), 9),
                ],
            ),
            (
                HOUR_MS,
                vec![
                    (format!("r:{}", tuple("m1", "200")), 3),
                    (format!("i:{}", tuple("m2", "200")), 7),
                ],
            ),
        ];
        let rows = group(&q, &hours);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[&(None, vec!["m1".to_owned()])].requests, 5);
        assert_eq!(rows[&(None, vec!["m2".to_owned()])].input_tokens, 7);
    }
}
