//! Which stored cells answer a stats query: a pure function of the range, the bucket, the time
//! zone, the clock and the retention, so every rule below is unit-tested without Redis.
//!
//! Cells exist at four UTC resolutions (see `rollup`), kept for different times: minutes for
//! 48 h, hours for 90 days, days and months for ever. A query is answered exactly by tiling each
//! output bucket with the coarsest cells that fit inside it (months or days in the middle of a
//! long range, hours and then minutes at ragged edges), so a 30-day range costs about 30 reads,
//! not 43,200.
//!
//! Rules:
//! - `from` and `to` are aligned down to the finest resolution still kept for that time, so the
//!   answer never silently misses an edge; the effective values are echoed in the response.
//! - Output buckets are local calendar units of a fixed UTC offset. UTC day and month cells do
//!   not fit a `+08:00` day, so such buckets are tiled with hours (or minutes, for offsets that
//!   are not whole hours), and refused where those are no longer kept.
//! - A cell is used only if it will still exist a safety margin from now, so a cell that expires
//!   between planning and reading (or on a Redis whose clock runs a little ahead) is never read
//!   as empty. Writers skip cells that are already expired, so a cell we consider kept has
//!   received every event of its span.

use chrono::{DateTime, FixedOffset, SecondsFormat};

use crate::store::rollup::{DAY_MS, HOUR_MS, MINUTE_MS, Resolution};

/// At most this many output buckets per query (48 h of minutes, 90 days of hours and ten years
/// of days all fit).
pub const MAX_BUCKETS: usize = 10_000;
/// At most this many cells read per query: bounds the Redis work of one request.
pub const MAX_CELLS: usize = 10_000;
/// Cells closer than this to their expiry are not used.
pub const SAFETY_MARGIN_MS: i64 = 10 * MINUTE_MS;
/// The latest instant accepted (9999-12-31T23:59:59.999Z), so calendar arithmetic never fails.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Minute,
    Hour,
    Day,
    Month,
    All,
}

impl Bucket {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "minute" => Self::Minute,
            "hour" => Self::Hour,
            "day" => Self::Day,
            "month" => Self::Month,
            "all" => Self::All,
            _ => return None,
        })
    }

    /// The cell resolution a UTC bucket of this kind is made of.
    fn resolution(self) -> Option<Resolution> {
        match self {
            Self::Minute => Some(Resolution::Minute),
            Self::Hour => Some(Resolution::Hour),
            Self::Day => Some(Resolution::Day),
            Self::Month => Some(Resolution::Month),
            Self::All => None,
        }
    }
}

/// A fixed UTC offset, in whole minutes (every offset in use is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tz {
    offset_ms: i64,
}

impl Tz {
    pub const UTC: Tz = Tz { offset_ms: 0 };

    /// `Z`, `UTC`, or `±HH:MM` (up to ±23:59). A leading space is read as `+`, because an
    /// unescaped `+` in a query string decodes to a space.
    pub fn parse(raw: &str) -> Option<Self> {
        if matches!(raw, "Z" | "z" | "UTC" | "utc") {
            return Some(Self::UTC);
        }
        let (sign, rest) = match raw.as_bytes().first()? {
            b'+' | b' ' => (1, &raw[1..]),
            b'-' => (-1, &raw[1..]),
            _ => return None,
        };
        let (hours, minutes) = rest.split_once(':')?;
        if hours.len() != 2 || minutes.len() != 2 {
            return None;
        }
        let hours: i64 = hours.parse().ok().filter(|h| *h < 24)?;
        let minutes: i64 = minutes.parse().ok().filter(|m| *m < 60)?;
        Some(Self {
            offset_ms: sign * (hours * HOUR_MS + minutes * MINUTE_MS),
        })
    }

    #[cfg(test)]
    pub fn offset_ms(self) -> i64 {
        self.offset_ms
    }

    /// `ms` as RFC 3339 in this offset (`Z` for UTC).
    pub fn format(self, ms: i64) -> String {
        let offset = i32::try_from(self.offset_ms / 1000)
            .ok()
            .and_then(FixedOffset::east_opt);
        match (DateTime::from_timestamp_millis(ms), offset) {
            (Some(t), Some(offset)) if self.offset_ms != 0 => t
                .with_timezone(&offset)
                .to_rfc3339_opts(SecondsFormat::Secs, true),
            (Some(t), _) => t.to_rfc3339_opts(SecondsFormat::Secs, true),
            _ => ms.to_string(),
        }
    }
}

/// How long each resolution's cells can be relied on after they end; `None`: for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub minute_ms: Option<i64>,
    pub hour_ms: Option<i64>,
}

impl Retention {
    /// What the writers keep (`rollup`), less [`SAFETY_MARGIN_MS`].
    pub fn serving() -> Self {
        let usable = |r: Resolution| r.retention_ms().map(|keep| keep - SAFETY_MARGIN_MS);
        Self {
            minute_ms: usable(Resolution::Minute),
            hour_ms: usable(Resolution::Hour),
        }
    }

    /// Whether the cell of `resolution` starting at `start` can be read at `now`.
    pub fn keeps(self, resolution: Resolution, start: i64, now_ms: i64) -> bool {
        let keep = match resolution {
            Resolution::Minute => self.minute_ms,
            Resolution::Hour => self.hour_ms,
            Resolution::Day | Resolution::Month => None,
        };
        keep.is_none_or(|keep| resolution.next(start) + keep > now_ms)
    }
}

/// What a query asks for, with times already parsed (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub bucket: Bucket,
    pub tz: Tz,
    /// Latency queries need sketches, which month cells do not have.
    pub needs_sketches: bool,
}

/// Default range: the last seven days up to the end of the current minute.
pub const DEFAULT_RANGE_MS: i64 = 7 * DAY_MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    pub resolution: Resolution,
    pub start: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBucket {
    /// Start of the output bucket (its calendar start, which may precede `from`); `None` for
    /// `bucket=all`.
    pub start: Option<i64>,
    /// Cells that tile the part of the bucket inside `[from, to)`, each exactly once.
    pub cells: Vec<Cell>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Effective half-open range.
    pub from_ms: i64,
    pub to_ms: i64,
    pub buckets: Vec<PlannedBucket>,
}

impl Plan {
    #[cfg(test)]
    pub fn cell_count(&self) -> usize {
        self.buckets.iter().map(|b| b.cells.len()).sum()
    }
}

/// Why a plan cannot be made; the API names the parameter to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// `from` after `to`.
    Inverted,
    /// A time outside 1970..=9999.
    OutOfRange,
    TooManyBuckets,
    TooManyCells,
    /// The cells needed to answer exactly were not kept (or never will be, e.g. minutes of a
    /// `+05:30` day three days ago). `needed` is the resolution that is missing.
    Missing {
        needed: Resolution,
        at_ms: i64,
        /// The bucket would be answerable in UTC: the offset is to blame, not the range.
        because_of_tz: bool,
    },
}

/// The finest resolution whose cells from `t` onwards are kept.
fn align_from(t: i64, now: i64, retention: Retention) -> i64 {
    for r in [Resolution::Minute, Resolution::Hour] {
        let start = r.start_of(t);
        if retention.keeps(r, start, now) {
            return start;
        }
    }
    Resolution::Day.start_of(t)
}

/// The finest resolution whose cells between the enclosing coarser cell's start and `t` are
/// all kept (the oldest of them is the one at that start).
fn align_to(t: i64, now: i64, retention: Retention) -> i64 {
    for (r, parent) in [
        (Resolution::Minute, Resolution::Hour),
        (Resolution::Hour, Resolution::Day),
    ] {
        if retention.keeps(r, parent.start_of(t), now) {
            return r.start_of(t);
        }
    }
    Resolution::Day.start_of(t)
}

/// Start of the local period of `bucket` containing `t`.
fn period_start(bucket: Bucket, tz: Tz, t: i64) -> i64 {
    match bucket.resolution() {
        Some(r) => r.start_of(t + tz.offset_ms) - tz.offset_ms,
        None => t,
    }
}

fn period_next(bucket: Bucket, tz: Tz, start: i64) -> i64 {
    match bucket.resolution() {
        Some(r) => r.next(start + tz.offset_ms) - tz.offset_ms,
        None => i64::MAX,
    }
}

pub fn plan(request: Request, now_ms: i64, retention: Retention) -> Result<Plan, PlanError> {
    let in_range = |t: i64| (0..=MAX_TIME_MS).contains(&t);
    let raw_to = request
        .to_ms
        .unwrap_or_else(|| Resolution::Minute.start_of(now_ms) + MINUTE_MS);
    let raw_from = request.from_ms.unwrap_or(raw_to - DEFAULT_RANGE_MS).max(0);
    if !in_range(raw_to) || !in_range(raw_from) {
        return Err(PlanError::OutOfRange);
    }
    let from_ms = align_from(raw_from, now_ms, retention);
    let to_ms = align_to(raw_to, now_ms, retention);
    if from_ms > to_ms {
        return Err(PlanError::Inverted);
    }
    let levels: &[Resolution] = if request.needs_sketches {
        &[Resolution::Day, Resolution::Hour, Resolution::Minute]
    } else {
        &[
            Resolution::Month,
            Resolution::Day,
            Resolution::Hour,
            Resolution::Minute,
        ]
    };
    let mut tiler = Tiler {
        now_ms,
        retention,
        cells: 0,
    };
    let mut buckets = Vec::new();
    let mut at = from_ms;
    while at < to_ms {
        if buckets.len() == MAX_BUCKETS {
            return Err(PlanError::TooManyBuckets);
        }
        let start = period_start(request.bucket, request.tz, at);
        let end = period_next(request.bucket, request.tz, start).min(to_ms);
        let mut cells = Vec::new();
        tiler
            .tile(at, end, levels, &mut cells)
            .map_err(|missing| blame(missing, request))?;
        buckets.push(PlannedBucket {
            start: (request.bucket != Bucket::All).then_some(start),
            cells,
        });
        at = end;
    }
    Ok(Plan {
        from_ms,
        to_ms,
        buckets,
    })
}

/// A missing cell is the offset's fault when a UTC bucket of the same kind would not need it.
fn blame(error: PlanError, request: Request) -> PlanError {
    match (error, request.bucket.resolution()) {
        (PlanError::Missing { needed, at_ms, .. }, Some(natural)) => PlanError::Missing {
            needed,
            at_ms,
            because_of_tz: request.tz != Tz::UTC && needed < natural,
        },
        (error, _) => error,
    }
}

struct Tiler {
    now_ms: i64,
    retention: Retention,
    cells: usize,
}

impl Tiler {
    /// Covers `[a, b)` with the coarsest cells of `levels` (coarsest first) that fit inside it:
    /// a run of whole cells of the coarsest level that fits, and the ragged parts on either
    /// side with the finer levels.
    fn tile(
        &mut self,
        a: i64,
        b: i64,
        levels: &[Resolution],
        out: &mut Vec<Cell>,
    ) -> Result<(), PlanError> {
        if a >= b {
            return Ok(());
        }
        let Some((&resolution, finer)) = levels.split_first() else {
            // Unreachable: `from`, `to` and every offset are whole minutes.
            return Err(PlanError::OutOfRange);
        };
        let first = resolution.start_of(a);
        let first = if first == a {
            a
        } else {
            resolution.next(first)
        };
        let mut end = first;
        while end < b && resolution.next(end) <= b {
            end = resolution.next(end);
        }
        if end == first {
            return self.tile(a, b, finer, out);
        }
        self.tile(a, first, finer, out)?;
        let mut start = first;
        while start < end {
            if !self.retention.keeps(resolution, start, self.now_ms) {
                return Err(PlanError::Missing {
                    needed: resolution,
                    at_ms: start,
                    because_of_tz: false,
                });
            }
            self.cells += 1;
            if self.cells > MAX_CELLS {
                return Err(PlanError::TooManyCells);
            }
            out.push(Cell { resolution, start });
            start = resolution.next(start);
        }
        self.tile(end, b, finer, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    const NOW: &str = "2026-06-15T12:34:56Z";

    fn request(from: &str, to: &str, bucket: Bucket, tz: &str) -> Request {
        Request {
            from_ms: Some(ms(from)),
            to_ms: Some(ms(to)),
            bucket,
            tz: Tz::parse(tz).unwrap(),
            needs_sketches: false,
        }
    }

    fn run(request: Request) -> Result<Plan, PlanError> {
        plan(request, ms(NOW), Retention::serving())
    }

    /// A cell as `<code>@<RFC 3339>`, for readable expectations.
    fn show(cell: &Cell) -> String {
        let code = match cell.resolution {
            Resolution::Minute => "m",
            Resolution::Hour => "h",
            Resolution::Day => "d",
            Resolution::Month => "M",
        };
        format!("{code}@{}", Tz::UTC.format(cell.start))
    }

    /// Every bucket's cells are contiguous, cover exactly its part of the range, and no cell is
    /// used twice: the property that makes the answer exact.
    #[track_caller]
    fn check_tiling(plan: &Plan) {
        let mut at = plan.from_ms;
        for bucket in &plan.buckets {
            for cell in &bucket.cells {
                assert_eq!(cell.start, at, "gap or overlap at {}", show(cell));
                at = cell.resolution.next(cell.start);
            }
        }
        assert_eq!(at, plan.to_ms, "the cells end at `to`");
    }

    #[track_caller]
    fn check_cells(request: Request, want: &[&str]) {
        let plan = run(request).unwrap();
        check_tiling(&plan);
        let got: Vec<String> = plan
            .buckets
            .iter()
            .flat_map(|b| &b.cells)
            .map(show)
            .collect();
        assert_eq!(got, want);
    }

    #[track_caller]
    fn check_starts(plan: &Plan, tz: Tz, want: &[&str]) {
        let got: Vec<String> = plan
            .buckets
            .iter()
            .map(|b| tz.format(b.start.unwrap()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_recent_ragged_range_uses_minutes_at_the_edges_and_hours_between() {
        check_cells(
            request(
                "2026-06-15T08:58:00Z",
                "2026-06-15T11:02:00Z",
                Bucket::All,
                "Z",
            ),
            &[
                "m@2026-06-15T08:58:00Z",
                "m@2026-06-15T08:59:00Z",
                "h@2026-06-15T09:00:00Z",
                "h@2026-06-15T10:00:00Z",
                "m@2026-06-15T11:00:00Z",
                "m@2026-06-15T11:01:00Z",
            ],
        );
    }

    #[test]
    fn a_long_range_uses_months_and_days_in_the_middle() {
        check_cells(
            request(
                "2026-03-30T00:00:00Z",
                "2026-06-02T00:00:00Z",
                Bucket::All,
                "Z",
            ),
            &[
                "d@2026-03-30T00:00:00Z",
                "d@2026-03-31T00:00:00Z",
                "M@2026-04-01T00:00:00Z",
                "M@2026-05-01T00:00:00Z",
                "d@2026-06-01T00:00:00Z",
            ],
        );
    }

    #[test]
    fn latency_never_reads_months_which_have_no_sketches() {
        let plan = run(Request {
            needs_sketches: true,
            ..request(
                "2026-03-01T00:00:00Z",
                "2026-05-01T00:00:00Z",
                Bucket::All,
                "Z",
            )
        })
        .unwrap();
        check_tiling(&plan);
        assert_eq!(plan.cell_count(), 61);
        assert!(
            plan.buckets[0]
                .cells
                .iter()
                .all(|c| c.resolution == Resolution::Day)
        );
    }

    #[test]
    fn from_and_to_align_to_the_finest_resolution_kept_then() {
        // Within 48 h: minutes. Within 90 days: hours. Before: days.
        let plan = run(request(
            "2026-06-14T10:15:42Z",
            "2026-06-15T12:34:56Z",
            Bucket::All,
            "Z",
        ))
        .unwrap();
        assert_eq!(Tz::UTC.format(plan.from_ms), "2026-06-14T10:15:00Z");
        assert_eq!(Tz::UTC.format(plan.to_ms), "2026-06-15T12:34:00Z");
        let plan = run(request(
            "2026-05-01T10:15:42Z",
            "2026-06-12T07:08:09Z",
            Bucket::All,
            "Z",
        ))
        .unwrap();
        assert_eq!(Tz::UTC.format(plan.from_ms), "2026-05-01T10:00:00Z");
        assert_eq!(Tz::UTC.format(plan.to_ms), "2026-06-12T07:00:00Z");
        check_tiling(&plan);
        let plan = run(request(
            "2025-01-01T10:15:42Z",
            "2025-02-03T07:08:09Z",
            Bucket::All,
            "Z",
        ))
        .unwrap();
        assert_eq!(Tz::UTC.format(plan.from_ms), "2025-01-01T00:00:00Z");
        assert_eq!(Tz::UTC.format(plan.to_ms), "2025-02-03T00:00:00Z");
        check_tiling(&plan);
    }

    #[test]
    fn retention_edges_keep_a_safety_margin() {
        let now = ms(NOW);
        let retention = Retention::serving();
        // The minute ending exactly 48 h − margin ago is gone; the next one is kept.
        let edge = now - 48 * HOUR_MS + SAFETY_MARGIN_MS;
        let last_gone = Resolution::Minute.start_of(edge) - MINUTE_MS;
        assert!(!retention.keeps(Resolution::Minute, last_gone, now));
        assert!(retention.keeps(Resolution::Minute, last_gone + MINUTE_MS, now));
        // `to` falls back to hours once the first minute of its hour is gone.
        let t = Resolution::Hour.start_of(edge) + 30 * MINUTE_MS;
        let plan = plan(
            Request {
                from_ms: Some(t - HOUR_MS),
                to_ms: Some(t),
                bucket: Bucket::All,
                tz: Tz::UTC,
                needs_sketches: false,
            },
            now,
            retention,
        )
        .unwrap();
        assert_eq!(plan.to_ms, Resolution::Hour.start_of(t));
        check_tiling(&plan);
        // Hours: 90 days after they end, less the margin.
        let hour = Resolution::Hour.start_of(now - 90 * DAY_MS);
        assert!(!retention.keeps(Resolution::Hour, hour - HOUR_MS, now));
        assert!(retention.keeps(Resolution::Hour, hour + HOUR_MS, now));
    }

    #[test]
    fn utc_days_are_day_cells_with_partial_edges() {
        let plan = run(request(
            "2026-06-10T06:00:00Z",
            "2026-06-12T18:00:00Z",
            Bucket::Day,
            "Z",
        ))
        .unwrap();
        check_tiling(&plan);
        check_starts(
            &plan,
            Tz::UTC,
            &[
                "2026-06-10T00:00:00Z",
                "2026-06-11T00:00:00Z",
                "2026-06-12T00:00:00Z",
            ],
        );
        let counts: Vec<usize> = plan.buckets.iter().map(|b| b.cells.len()).collect();
        assert_eq!(counts, [18, 1, 18]);
    }

    #[test]
    fn a_positive_offset_day_starts_at_local_midnight_and_reads_hours() {
        let tz = Tz::parse("+08:00").unwrap();
        let plan = run(request(
            "2026-06-09T16:00:00Z",
            "2026-06-11T16:00:00Z",
            Bucket::Day,
            "+08:00",
        ))
        .unwrap();
        check_tiling(&plan);
        check_starts(
            &plan,
            tz,
            &["2026-06-10T00:00:00+08:00", "2026-06-11T00:00:00+08:00"],
        );
        assert_eq!(plan.buckets[0].start, Some(ms("2026-06-09T16:00:00Z")));
        for bucket in &plan.buckets {
            assert_eq!(bucket.cells.len(), 24);
            assert!(
                bucket
                    .cells
                    .iter()
                    .all(|c| c.resolution == Resolution::Hour)
            );
        }
    }

    #[test]
    fn a_negative_half_hour_offset_day_reads_minutes_at_its_edges() {
        let tz = Tz::parse("-05:30").unwrap();
        let plan = run(request(
            "2026-06-14T05:30:00Z",
            "2026-06-15T05:30:00Z",
            Bucket::Day,
            "-05:30",
        ))
        .unwrap();
        check_tiling(&plan);
        check_starts(&plan, tz, &["2026-06-14T00:00:00-05:30"]);
        let cells = &plan.buckets[0].cells;
        let minutes = cells
            .iter()
            .filter(|c| c.resolution == Resolution::Minute)
            .count();
        assert_eq!((minutes, cells.len() - minutes), (60, 23));
    }

    #[test]
    fn a_day_that_needs_expired_minutes_is_refused_because_of_the_offset() {
        let err = run(request(
            "2026-06-01T05:30:00Z",
            "2026-06-02T05:30:00Z",
            Bucket::Day,
            "+05:30",
        ))
        .unwrap_err();
        assert!(
            matches!(
                err,
                PlanError::Missing {
                    needed: Resolution::Minute,
                    because_of_tz: true,
                    ..
                }
            ),
            "{err:?}"
        );
        // A whole-hour offset is answered from hours there ...
        assert!(
            run(request(
                "2026-06-01T05:00:00Z",
                "2026-06-02T05:00:00Z",
                Bucket::Day,
                "+05:00",
            ))
            .is_ok()
        );
        // ... but not once hours are gone too; in UTC, days always answer.
        let old = |tz| {
            run(request(
                "2025-06-01T00:00:00Z",
                "2025-06-03T00:00:00Z",
                Bucket::Day,
                tz,
            ))
        };
        assert!(matches!(
            old("+08:00"),
            Err(PlanError::Missing {
                needed: Resolution::Hour,
                because_of_tz: true,
                ..
            })
        ));
        assert_eq!(old("Z").unwrap().cell_count(), 2);
    }

    #[test]
    fn hour_and_minute_buckets_older_than_their_cells_are_refused() {
        let err = run(request(
            "2026-01-01T00:00:00Z",
            "2026-01-02T00:00:00Z",
            Bucket::Hour,
            "Z",
        ))
        .unwrap_err();
        assert!(matches!(
            err,
            PlanError::Missing {
                needed: Resolution::Hour,
                because_of_tz: false,
                ..
            }
        ));
        let err = run(request(
            "2026-06-10T00:00:00Z",
            "2026-06-10T01:00:00Z",
            Bucket::Minute,
            "Z",
        ))
        .unwrap_err();
        assert!(matches!(
            err,
            PlanError::Missing {
                needed: Resolution::Minute,
                ..
            }
        ));
    }

    #[test]
    fn months_follow_calendar_lengths_in_the_offset() {
        let plan = run(request(
            "2024-01-01T00:00:00Z",
            "2025-01-01T00:00:00Z",
            Bucket::Month,
            "Z",
        ))
        .unwrap();
        check_tiling(&plan);
        assert_eq!(plan.buckets.len(), 12);
        assert!(
            plan.buckets
                .iter()
                .all(|b| b.cells.len() == 1 && b.cells[0].resolution == Resolution::Month)
        );
        // Local months in +09:00 start at 15:00 UTC the day before, which hours tile.
        let tz = Tz::parse("+09:00").unwrap();
        let plan = run(request(
            "2026-04-30T15:00:00Z",
            "2026-06-15T12:00:00Z",
            Bucket::Month,
            "+09:00",
        ))
        .unwrap();
        check_tiling(&plan);
        check_starts(
            &plan,
            tz,
            &["2026-05-01T00:00:00+09:00", "2026-06-01T00:00:00+09:00"],
        );
        let may = &plan.buckets[0].cells;
        assert_eq!(may.first().map(show).unwrap(), "h@2026-04-30T15:00:00Z");
        assert_eq!(
            may.iter()
                .filter(|c| c.resolution == Resolution::Day)
                .count(),
            30,
            "May 1 15:00 UTC to May 31 15:00 UTC: 30 whole UTC days"
        );
        // February 2024 has 29 days.
        let feb = run(request(
            "2024-02-01T00:00:00Z",
            "2024-03-01T00:00:00Z",
            Bucket::Day,
            "Z",
        ))
        .unwrap();
        assert_eq!(feb.buckets.len(), 29);
    }

    #[test]
    fn offsets_parse_strictly() {
        assert_eq!(Tz::parse("+08:00").unwrap().offset_ms(), 8 * HOUR_MS);
        assert_eq!(Tz::parse(" 08:00").unwrap().offset_ms(), 8 * HOUR_MS);
        assert_eq!(
            Tz::parse("-05:30").unwrap().offset_ms(),
            -(5 * HOUR_MS + 30 * MINUTE_MS)
        );
        assert_eq!(Tz::parse("UTC"), Some(Tz::UTC));
        for bad in [
            "08:00",
            "+8:00",
            "+24:00",
            "+08:60",
            "+0800",
            "Asia/Tokyo",
            "",
        ] {
            assert_eq!(Tz::parse(bad), None, "{bad}");
        }
        assert_eq!(
            Tz::parse("-05:30")
                .unwrap()
                .format(ms("2026-06-14T05:30:00Z")),
            "2026-06-14T00:00:00-05:30"
        );
    }

    #[test]
    fn bucket_starts_cross_month_and_year_boundaries() {
        let tz = Tz::parse("-03:00").unwrap();
        let plan = run(request(
            "2026-05-31T03:00:00Z",
            "2026-06-02T03:00:00Z",
            Bucket::Day,
            "-03:00",
        ))
        .unwrap();
        check_starts(
            &plan,
            tz,
            &["2026-05-31T00:00:00-03:00", "2026-06-01T00:00:00-03:00"],
        );
        // Month buckets across New Year, in days (old enough that hours are gone but UTC).
        let plan = run(request(
            "2025-12-20T00:00:00Z",
            "2026-01-10T00:00:00Z",
            Bucket::Month,
            "Z",
        ))
        .unwrap();
        check_tiling(&plan);
        check_starts(
            &plan,
            Tz::UTC,
            &["2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z"],
        );
    }

    #[test]
    fn caps_and_bad_ranges_are_refused() {
        assert_eq!(
            run(request(
                "2026-06-15T00:00:00Z",
                "2026-06-14T00:00:00Z",
                Bucket::All,
                "Z"
            )),
            Err(PlanError::Inverted)
        );
        assert_eq!(
            run(request(
                "1990-01-01T00:00:00Z",
                "2026-06-01T00:00:00Z",
                Bucket::Day,
                "Z"
            )),
            Err(PlanError::TooManyBuckets)
        );
        let far = Request {
            to_ms: Some(MAX_TIME_MS + 1),
            ..request(NOW, NOW, Bucket::All, "Z")
        };
        assert_eq!(run(far), Err(PlanError::OutOfRange));
        // From 1970, everything: months keep it small.
        let plan = run(Request {
            from_ms: Some(0),
            ..request(NOW, NOW, Bucket::All, "Z")
        })
        .unwrap();
        check_tiling(&plan);
        assert!(plan.cell_count() < 1000, "{}", plan.cell_count());
    }

    #[test]
    fn the_default_range_is_the_last_seven_days_to_the_end_of_this_minute() {
        let plan = run(Request {
            from_ms: None,
            to_ms: None,
            bucket: Bucket::All,
            tz: Tz::UTC,
            needs_sketches: true,
        })
        .unwrap();
        assert_eq!(Tz::UTC.format(plan.to_ms), "2026-06-15T12:35:00Z");
        assert_eq!(Tz::UTC.format(plan.from_ms), "2026-06-08T12:00:00Z");
        check_tiling(&plan);
    }

    #[test]
    fn an_empty_range_plans_no_buckets() {
        let plan = run(request(NOW, NOW, Bucket::Hour, "Z")).unwrap();
        assert!(plan.buckets.is_empty());
    }
}
