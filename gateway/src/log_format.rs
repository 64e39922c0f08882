//! The text log line, written directly: byte for byte what `tracing-subscriber`'s default
//! (`Full`) format writes without colour, at a fraction of the cost.
//!
//! The access log writes a line per request, and with the stock formatter that line was 16 % of
//! a request's instructions (callgrind, BENCHMARKS.md): each of its 18 fields went through two
//! `Style::paint` wrappers and a three-argument `write!` even with colour off, and each string
//! value through `str`'s `Debug` escaping char by char. Here a field is its name, `=` and its
//! value, and a string that needs no escaping is copied as it is. Anything this formatter does
//! not reproduce itself goes to the stock one: coloured output (a terminal), events forwarded
//! from the `log` crate (their metadata is rewritten first), and `Error` values.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::VisitOutput;
use tracing_subscriber::fmt::format::{DefaultVisitor, Format, Full, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter of text logs (`--log-format text`, the default).
pub struct TextFormat<T = Clock> {
    timer: T,
    /// The stock formatter, with the same timer, for what is not written here.
    stock: Format<Full, T>,
}

impl Default for TextFormat {
    fn default() -> Self {
        Self::with_timer(Clock)
    }
}

/// The stock `SystemTime` timestamp (`2026-12-05T16:00:00.000001Z`, UTC, microseconds), with its
/// digits written directly rather than through seven `write!` paddings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock;

impl FormatTime for Clock {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = std::time::SystemTime::now();
        match now
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|since| {
                let secs = i64::try_from(since.as_secs()).ok()?;
                timestamp(secs, since.subsec_micros())
            }) {
            Some(text) => w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?),
            // Before 1970 or after 9999: the stock clock's own (rare) forms.
            None => SystemTime.format_time(w),
        }
    }
}

/// `secs` after the epoch (and `micros`) as `YYYY-MM-DDTHH:MM:SS.ffffffZ`; `None` past year 9999.
fn timestamp(secs: i64, micros: u32) -> Option<[u8; 27]> {
    use chrono::{Datelike, Timelike};
    let at = chrono::DateTime::from_timestamp(secs, 0)?;
    let year = u32::try_from(at.year()).ok().filter(|&y| y <= 9999)?;
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u32| {
        for i in (at..at + width).rev() {
            // A digit: `value % 10` is below 10.
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, at.month());
    put(8, 2, at.day());
    put(11, 2, at.hour());
    put(14, 2, at.minute());
    put(17, 2, at.second());
    put(20, 6, micros);
    Some(out)
}

impl<T: FormatTime + Clone> TextFormat<T> {
    pub fn with_timer(timer: T) -> Self {
        Self {
            stock: Format::default().with_timer(timer.clone()),
            timer,
        }
    }
}

impl<S, N, T> FormatEvent<S, N> for TextFormat<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // `log` records arrive with the placeholder target "log"; the stock formatter swaps in
        // their real metadata.
        if writer.has_ansi_escapes() || meta.target() == "log" {
            return self.stock.format_event(ctx, writer, event);
        }
        if self.timer.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        writer.write_char(' ')?;
        writer.write_str(level(meta.level()))?;
        writer.write_char(' ')?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{{{fields}}}")?;
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = Fields {
            writer: writer.by_ref(),
            is_empty: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// The level as the stock formatter pads it, to five characters.
fn level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// Writes an event's fields as the stock `DefaultVisitor` does: the message first as it is,
/// then `name=value` with the value's `Debug` form, separated by spaces.
struct Fields<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl Fields<'_> {
    /// Starts a field: the separating space, then `name=` (`r#type` is written `type`).
    /// False for fields that are not written at all.
    fn start(&mut self, name: &str) -> bool {
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if !std::mem::take(&mut self.is_empty) {
            self.result = self.writer.write_char(' ');
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self
            .result
            .and_then(|()| self.writer.write_str(name))
            .and_then(|()| self.writer.write_char('='));
        self.result.is_ok()
    }

    /// The message, with terminal control characters escaped as the stock formatter does.
    fn message(&mut self, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        if !std::mem::take(&mut self.is_empty) {
            self.result = self.writer.write_char(' ');
        }
        self.result = self.result.and_then(|()| {
            if self.writer.sanitizes_ansi_escapes() {
                Escaping(&mut self.writer).write_fmt(value)
            } else {
                self.writer.write_fmt(value)
            }
        });
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.message(format_args!("{value}"));
        }
        if self.start(field.name()) {
            self.result = if needs_no_escaping(value) {
                self.writer
                    .write_char('"')
                    .and_then(|()| self.writer.write_str(value))
                    .and_then(|()| self.writer.write_char('"'))
            } else {
                write!(self.writer, "{value:?}")
            };
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field.name()) {
            self.result = self.writer.write_str(itoa(value, &mut [0; 20]));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field.name()) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    /// Rare (`error = &e as &dyn Error`; `%e` is `record_debug`): the stock visitor's form,
    /// escaping and the list of sources included.
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_ok() {
            let mut stock = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
            stock.record_error(field, value);
            self.result = stock.finish();
            self.is_empty = false;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            return self.message(format_args!("{value:?}"));
        }
        if self.start(field.name()) {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

/// True when `str`'s `Debug` form is the string in quotes: printable ASCII, no `"` or `\`.
fn needs_no_escaping(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// `value` in decimal, in `buf`.
fn itoa(mut value: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        // A digit: `value % 10` is below 10.
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[at..]).unwrap_or_default()
}

/// Escapes the control characters that could drive a terminal, as `tracing-subscriber` does for
/// messages: ESC, BEL, BS, FF, DEL and the C1 controls.
struct Escaping<'w, 'a>(&'w mut Writer<'a>);

impl Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let clean = |c: char| {
            !matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        };
        if s.chars().all(clean) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A fixed clock, so that both formatters' lines can be compared whole.
    #[derive(Clone)]
    struct Fixed;
    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-12-05T16:00:00.000001Z")
        }
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer failure")]
    struct Outer(#[source] std::io::Error);

    /// Every kind of field the gateway logs, and the awkward values.
    fn events() {
        let event = crate::spool::tests::event(7);
        crate::access_log::log("POST", "/v1/messages", Some("alice \"quoted\""), &event);
        crate::access_log::log("GET", "/v1/responses", None, &event);
        let io = std::io::Error::other("refused");
        tracing::warn!(error = %io, account = "acct-1", "upstream request failed");
        tracing::error!(
            error = &Outer(std::io::Error::other("inner")) as &(dyn std::error::Error + 'static),
            "with sources"
        );
        tracing::error!(
            error = &io as &(dyn std::error::Error + 'static),
            "no sources"
        );
        tracing::info!(
            r#type = "x",
            signed = -42i64,
            big = u64::MAX,
            zero = 0u64,
            ratio = 0.000_01f64,
            whole = 12.0f64,
            flag = false,
            text = "tab\there é ' \\ \u{1b}[31m",
            debug = ?Some("x"),
            "message with {} and \u{1b}[0m and \u{85}",
            "args"
        );
        tracing::info!(empty = "");
        tracing::debug!("message only");
        let span = tracing::info_span!("outer", id = 3);
        let _outer = span.enter();
        let inner = tracing::info_span!("inner");
        let _inner = inner.enter();
        tracing::warn!(n = 1u64, "inside spans");
    }

    fn lines(stock: bool) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(Level::DEBUG)
            .with_timer(Fixed);
        if stock {
            tracing::subscriber::with_default(builder.finish(), events);
        } else {
            let builder = builder.event_format(TextFormat::with_timer(Fixed));
            tracing::subscriber::with_default(builder.finish(), events);
        }
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn lines_are_byte_for_byte_the_stock_formatters() {
        let stock = lines(true);
        assert_eq!(stock.lines().count(), 9, "{stock}");
        assert_eq!(lines(false), stock);
    }

    #[test]
    fn timestamps_are_the_stock_clocks() {
        // The stock clock's format, `{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z` in UTC.
        for secs in [
            0,
            951_782_400,
            1_764_950_400,
            1_798_761_599,
            253_402_300_799,
        ] {
            let want = chrono::DateTime::from_timestamp(secs, 123_456_000)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            let got = timestamp(secs, 123_456).unwrap();
            assert_eq!(std::str::from_utf8(&got).unwrap(), want);
        }
        assert_eq!(timestamp(253_402_300_800, 0), None, "year 10000");
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 99, 1_000_000, u64::MAX] {
            assert_eq!(itoa(n, &mut [0; 20]), n.to_string());
        }
    }
}
