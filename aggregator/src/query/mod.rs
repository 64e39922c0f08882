//! Stats queries: parameters as the API receives them, validated into a [`Query`], and the pure
//! grouping of stored cells into result rows.
//!
//! Grouping happens in two steps so the second can be cached: each cell is first reduced to
//! its groups for one [`GroupSpec`] (a [`Partial`]: few rows, whatever the cell's cardinality),
//! then the partials of an output bucket are summed. Both steps add the same integers, so any
//! grouping of the same cells sums to the same totals.

pub(crate) mod api;
pub(crate) mod cache;
pub(crate) mod dashboard;
pub(crate) mod limits;
pub(crate) mod plan;

use std::collections::{BTreeMap, HashMap};

use crate::query::plan::{Bucket, PlanError, Request, Tz};
use crate::store::cell::Cell;
use crate::store::rollup::Resolution;
use crate::store::sketch::Sketch;
use crate::store::stats::{DIMENSIONS, Totals, read_tuple};

/// At most this many rows (output buckets × groups) per answer.
pub const MAX_ROWS: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Usage,
    Latency,
}

/// What one cell is reduced to: the grouped dimensions and the filters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupSpec {
    pub kind: Kind,
    /// Indices into [`DIMENSIONS`], in the order asked for.
    pub group_by: Vec<usize>,
    /// Dimension index → required value.
    pub filters: Vec<(usize, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub request: Request,
    pub spec: GroupSpec,
    pub quantiles: Vec<f64>,
    /// `unpriced=true` (usage only): keep the rows with unpriced requests, which grouped by
    /// model lists the models that were used without a price.
    pub unpriced: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{param}: {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

pub fn bad(param: &str, message: impl Into<String>) -> ParamError {
    ParamError {
        param: param.to_owned(),
        message: message.into(),
    }
}

/// RFC 3339 or Unix milliseconds, between 1970 and the end of 9999.
pub fn parse_time(param: &str, raw: &str) -> Result<i64, ParamError> {
    let ms = match raw.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => chrono::DateTime::parse_from_rfc3339(raw)
            .map(|t| t.timestamp_millis())
            .map_err(|_| {
                bad(
                    param,
                    format!("{raw:?} is neither RFC 3339 nor Unix milliseconds"),
                )
            })?,
    };
    if !(0..=crate::query::plan::MAX_TIME_MS).contains(&ms) {
        return Err(bad(
            param,
            format!("{raw:?} is outside 1970-01-01T00:00:00Z..=9999-12-31T23:59:59.999Z"),
        ));
    }
    Ok(ms)
}

impl Query {
    pub fn parse(params: &HashMap<String, String>, kind: Kind) -> Result<Self, ParamError> {
        let mut known = vec!["from", "to", "bucket", "group_by", "tz"];
        known.push(match kind {
            Kind::Latency => "quantiles",
            Kind::Usage => "unpriced",
        });
        for name in params.keys() {
            if !known.contains(&name.as_str()) && !DIMENSIONS.contains(&name.as_str()) {
                return Err(bad(name, "unknown parameter"));
            }
        }
        let time = |name: &str| {
            params
                .get(name)
                .map(|raw| parse_time(name, raw))
                .transpose()
        };
        let bucket = match params.get("bucket") {
            None => Bucket::All,
            Some(raw) => Bucket::parse(raw).ok_or_else(|| {
                bad(
                    "bucket",
                    format!("{raw:?} is not one of minute, hour, day, month, all"),
                )
            })?,
        };
        let tz = match params.get("tz") {
            None => Tz::UTC,
            Some(raw) => Tz::parse(raw).ok_or_else(|| {
                bad(
                    "tz",
                    format!("{raw:?} is not a fixed offset such as +08:00, -05:30 or Z"),
                )
            })?,
        };
        let mut group_by = Vec::new();
        for name in params.get("group_by").map_or("", String::as_str).split(',') {
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
        let mut filters = Vec::new();
        for (index, name) in DIMENSIONS.iter().enumerate() {
            if let Some(value) = params.get(*name) {
                if *name == "status" && value.parse::<u16>().is_err() {
                    return Err(bad("status", format!("{value:?} is not an HTTP status")));
                }
                filters.push((index, value.clone()));
            }
        }
        Ok(Self {
            request: Request {
                from_ms: time("from")?,
                to_ms: time("to")?,
                bucket,
                tz,
                needs_sketches: kind == Kind::Latency,
            },
            spec: GroupSpec {
                kind,
                group_by,
                filters,
            },
            quantiles: match kind {
                Kind::Latency => parse_quantiles(params)?,
                Kind::Usage => Vec::new(),
            },
            unpriced: match params.get("unpriced").map(String::as_str) {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    return Err(bad("unpriced", format!("{other:?} is not true or false")));
                }
            },
        })
    }
}

/// A plan error as the parameter to blame and a message for the client.
pub fn plan_error(error: PlanError, request: &Request) -> ParamError {
    let time = |ms| request.tz.format(ms);
    match error {
        PlanError::Inverted => bad("from", "must not be after `to`"),
        PlanError::OutOfRange => bad(
            "from",
            "times must lie between 1970-01-01 and 9999-12-31 (Unix ms ≥ 0)",
        ),
        PlanError::TooManyBuckets => bad(
            "bucket",
            format!(
                "the range has more than {} buckets; use a coarser bucket or a shorter range",
                crate::query::plan::MAX_BUCKETS
            ),
        ),
        PlanError::TooManyCells => bad(
            "from",
            format!(
                "answering would read more than {} stored cells; shorten the range or use a \
                 whole-hour tz",
                crate::query::plan::MAX_CELLS
            ),
        ),
        PlanError::Missing {
            needed,
            at_ms,
            because_of_tz,
        } => {
            let kept = match needed {
                Resolution::Minute => "minute cells, which are kept 48 hours",
                _ => "hour cells, which are kept 90 days",
            };
            if because_of_tz {
                bad(
                    "tz",
                    format!(
                        "buckets in this offset need {kept}; none are left at {}; use a later \
                         `from` or tz=Z",
                        time(at_ms)
                    ),
                )
            } else {
                bad(
                    "bucket",
                    format!(
                        "this bucket needs {kept}; none are left at {}; use a later `from` or a \
                         coarser bucket",
                        time(at_ms)
                    ),
                )
            }
        }
    }
}

/// A result row's group values, in `group_by` order.
pub type GroupKey = Vec<String>;

/// Latency and time-to-first-token sketches of one group.
#[derive(Debug, Default, Clone)]
pub struct LatencyRow {
    pub latency: Sketch,
    pub ttft: Sketch,
}

/// One cell reduced to its groups under one [`GroupSpec`].
#[derive(Debug)]
pub enum Partial {
    Usage(Vec<(GroupKey, Totals)>),
    Latency(Vec<(GroupKey, LatencyRow)>),
}

/// Reduces a stored bucket (its cells: field = tuple, value = packed cell) to its groups.
pub fn reduce(spec: &GroupSpec, fields: &[(String, Vec<u8>)]) -> Partial {
    let mut usage: HashMap<GroupKey, Totals> = HashMap::new();
    let mut latency: HashMap<GroupKey, LatencyRow> = HashMap::new();
    for (field, value) in fields {
        let Some(dims) = read_tuple(field) else {
            continue;
        };
        if !spec.filters.iter().all(|(i, v)| dims.0[*i] == *v) {
            continue;
        }
        let key: GroupKey = spec.group_by.iter().map(|i| dims.0[*i].clone()).collect();
        // Usage needs only the counters at the front of the value, not the sketch bins.
        match spec.kind {
            Kind::Usage => {
                if let Some(totals) = Cell::decode_totals(value) {
                    usage.entry(key).or_default().add(&totals);
                }
            }
            Kind::Latency => {
                if let Some(cell) = Cell::decode(value) {
                    let row = latency.entry(key).or_default();
                    for (bin, n) in cell.latency {
                        row.latency.add_bin(bin, n);
                    }
                    for (bin, n) in cell.ttft {
                        row.ttft.add_bin(bin, n);
                    }
                }
            }
        }
    }
    match spec.kind {
        Kind::Usage => Partial::Usage(usage.into_iter().collect()),
        Kind::Latency => Partial::Latency(latency.into_iter().collect()),
    }
}

/// Result rows, keyed by (bucket start, group values); the bucket is `None` for `all`.
pub type RowKey = (Option<i64>, GroupKey);

/// Sums the partials of each output bucket into rows.
#[derive(Debug, Default)]
pub struct Rows {
    pub usage: BTreeMap<RowKey, Totals>,
    pub latency: BTreeMap<RowKey, LatencyRow>,
}

impl Rows {
    /// Every row's group-by values, in no particular order.
    pub fn group_values(&self) -> impl Iterator<Item = &Vec<String>> {
        self.usage
            .keys()
            .chain(self.latency.keys())
            .map(|(_, values)| values)
    }

    pub fn add(&mut self, bucket: Option<i64>, partial: &Partial) -> Result<(), ParamError> {
        match partial {
            Partial::Usage(rows) => {
                for (key, totals) in rows {
                    self.usage
                        .entry((bucket, key.clone()))
                        .or_default()
                        .add(totals);
                }
            }
            Partial::Latency(rows) => {
                for (key, row) in rows {
                    let merged = self.latency.entry((bucket, key.clone())).or_default();
                    merged.latency.merge(&row.latency);
                    merged.ttft.merge(&row.ttft);
                }
            }
        }
        if self.usage.len().max(self.latency.len()) > MAX_ROWS {
            return Err(bad(
                "group_by",
                format!(
                    "the answer has more than {MAX_ROWS} rows (buckets × groups); group by \
                     fewer dimensions, filter, or use a coarser bucket"
                ),
            ));
        }
        Ok(())
    }
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
    fn check_err(kind: Kind, pairs: &[(&str, &str)], param: &str) {
        let err = Query::parse(&params(pairs), kind).unwrap_err();
        assert_eq!(err.param, param, "{err}");
    }

    #[test]
    fn bad_parameters_are_named() {
        check_err(Kind::Usage, &[("from", "yesterday")], "from");
        check_err(Kind::Usage, &[("to", "")], "to");
        check_err(Kind::Usage, &[("to", "-1")], "to");
        check_err(Kind::Usage, &[("bucket", "week")], "bucket");
        check_err(Kind::Usage, &[("group_by", "model,colour")], "group_by");
        check_err(Kind::Usage, &[("limit", "3")], "limit");
        check_err(Kind::Usage, &[("tz", "Europe/Paris")], "tz");
        check_err(Kind::Usage, &[("status", "ok")], "status");
        check_err(Kind::Usage, &[("quantiles", "0.5")], "quantiles");
        check_err(Kind::Latency, &[("quantiles", "1.5")], "quantiles");
        check_err(Kind::Usage, &[("unpriced", "yes")], "unpriced");
        check_err(Kind::Latency, &[("unpriced", "true")], "unpriced");
    }

    #[test]
    fn every_parameter_is_read() {
        let q = Query::parse(
            &params(&[
                ("from", "2026-01-01T10:30:00+01:00"),
                ("to", "1767272400001"),
                ("bucket", "day"),
                ("tz", "-05:30"),
                ("group_by", "model, key,model"),
                ("account", "a1"),
                ("status", "200"),
                ("quantiles", "0.999, 1"),
            ]),
            Kind::Latency,
        )
        .unwrap();
        assert_eq!(q.request.from_ms, Some(1_767_259_800_000));
        assert_eq!(q.request.to_ms, Some(1_767_272_400_001));
        assert_eq!(q.request.bucket, Bucket::Day);
        assert_eq!(q.request.tz, Tz::parse("-05:30").unwrap());
        assert!(q.request.needs_sketches);
        assert_eq!(q.spec.group_by, [1, 0]);
        assert_eq!(
            q.spec.filters,
            [(2, "a1".to_owned()), (5, "200".to_owned())]
        );
        assert_eq!(q.quantiles, [0.999, 1.0]);
    }

    #[test]
    fn quantiles_are_labelled() {
        assert_eq!(parse_quantiles(&params(&[])).unwrap(), [0.5, 0.9, 0.99]);
        assert_eq!(quantile_label(0.5), "p50");
        assert_eq!(quantile_label(0.999), "p99.9");
        assert_eq!(quantile_label(0.99), "p99");
    }

    fn tuple(model: &str, status: &str) -> String {
        ["k", model, "a", "anthropic", "messages", status].join("\u{1f}")
    }

    fn cell(requests: i64, input: i64, latency: &[(u32, u64)], ttft: &[(u32, u64)]) -> Vec<u8> {
        Cell {
            totals: Totals {
                requests,
                input_tokens: input,
                ..Totals::default()
            },
            latency: latency.to_vec(),
            ttft: ttft.to_vec(),
        }
        .encode(crate::store::cell::new_stamp())
    }

    #[test]
    fn reducing_filters_and_sums_a_cell() {
        let spec = GroupSpec {
            kind: Kind::Usage,
            group_by: vec![1],
            filters: vec![(5, "200".into())],
        };
        let fields = vec![
            (tuple("m1", "200"), cell(2, 0, &[], &[])),
            (tuple("m1", "500"), cell(9, 0, &[], &[])),
            (tuple("m2", "200"), cell(3, 7, &[(12, 3)], &[])),
            // Neither a tuple nor a cell: skipped.
            ("#v".to_owned(), vec![4]),
            (tuple("m3", "200"), b"garbage".to_vec()),
        ];
        let Partial::Usage(mut rows) = reduce(&spec, &fields) else {
            panic!("usage spec")
        };
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1.requests, 2);
        assert_eq!((rows[1].1.requests, rows[1].1.input_tokens), (3, 7));
    }

    #[test]
    fn partials_of_a_bucket_sum_into_rows_and_sketches_merge() {
        let spec = GroupSpec {
            kind: Kind::Latency,
            group_by: vec![],
            filters: vec![],
        };
        let a = reduce(&spec, &[(tuple("m", "200"), cell(2, 0, &[(5, 2)], &[]))]);
        let b = reduce(
            &spec,
            &[(tuple("n", "500"), cell(1, 0, &[(5, 1)], &[(3, 1)]))],
        );
        let mut rows = Rows::default();
        rows.add(None, &a).unwrap();
        rows.add(None, &b).unwrap();
        let row = &rows.latency[&(None, vec![])];
        assert_eq!((row.latency.count(), row.ttft.count()), (3, 1));
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::query::plan::{MAX_BUCKETS, MAX_CELLS, Retention, plan};

        /// Values near the parser's edges: any integer, times and offsets with random digits,
        /// the words it knows, and arbitrary text.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                (0i64..=4_102_444_800_000).prop_map(|n| n.to_string()),
                "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})",
                "[+-][0-9]{1,3}:[0-9]{1,3}",
                prop::sample::select(vec!["minute", "hour", "day", "month", "all", "week", ""])
                    .prop_map(str::to_owned),
                "(key|model|account|provider|endpoint|status|,|x){0,8}",
                "(0\\.[0-9]{0,3}|1|,|-|e9|NaN){0,6}",
                ".{0,40}",
            ]
        }

        fn params() -> impl Strategy<Value = HashMap<String, String>> {
            let names = prop::sample::select(vec![
                "from",
                "to",
                "bucket",
                "group_by",
                "tz",
                "quantiles",
                "key",
                "model",
                "status",
                "junk",
            ]);
            prop::collection::hash_map(names.prop_map(str::to_owned), value(), 0..7)
        }

        proptest! {
            /// The stats query parser and planner, fed anything: never a panic, and whatever
            /// they accept stays within the caps (bounded work).
            #[test]
            fn query_parsing_and_planning_never_panic_and_stay_bounded(
                params in params(),
                now in 0i64..=4_102_444_800_000,
            ) {
                for kind in [Kind::Usage, Kind::Latency] {
                    let _ = parse_quantiles(&params);
                    if let Ok(query) = Query::parse(&params, kind)
                        && let Ok(plan) = plan(query.request, now, Retention::serving())
                    {
                        prop_assert!(plan.buckets.len() <= MAX_BUCKETS);
                        prop_assert!(plan.cell_count() <= MAX_CELLS);
                    }
                }
            }
        }
    }
}
