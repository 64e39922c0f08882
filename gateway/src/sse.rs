//! An incremental Server-Sent Events parser that observes a stream without changing it.
//!
//! The relay forwards upstream bytes to the client untouched and feeds a copy here, so the
//! parser must accept any chunking: an event split across reads, several events in one read,
//! and `\n`, `\r\n` or `\r` line ends (the SSE spec allows all three). Parser crates on
//! crates.io consume the stream they parse, which would force us to re-serialise events; this
//! one only watches.

/// Receives each complete event: its `event:` name (empty when absent) and its data lines
/// joined with `\n`.
pub trait SseHandler {
    fn on_event(&mut self, event: &str, data: &str);
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` opening the next chunk ends nothing new.
    pending_cr: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub fn feed<H: SseHandler + ?Sized>(&mut self, chunk: &[u8], handler: &mut H) {
        let mut rest = chunk;
        // An empty chunk must not consume the pending `\r`: the `\n` may still come next.
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if let [b'\n', tail @ ..] = rest {
                rest = tail;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            let is_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if is_cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    None => self.pending_cr = true,
                    Some(_) => {}
                }
            }
            self.end_line(handler);
        }
        self.line.extend_from_slice(rest);
    }

    fn end_line<H: SseHandler + ?Sized>(&mut self, handler: &mut H) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.has_data {
                handler.on_event(&self.event, &self.data);
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
        } else if line[0] != b':' {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (&line[..], &[][..]),
            };
            let value = String::from_utf8_lossy(value);
            match field {
                b"event" => {
                    self.event.clear();
                    self.event.push_str(&value);
                }
                b"data" => {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(&value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        // Hand the allocation back so steady-state parsing does not allocate per line.
        self.line = line;
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Default)]
    struct Collect(Vec<(String, String)>);
    impl SseHandler for Collect {
        fn on_event(&mut self, event: &str, data: &str) {
            self.0.push((event.to_owned(), data.to_owned()));
        }
    }

    fn parse_in_chunks(input: &[u8], cuts: &[usize]) -> Vec<(String, String)> {
        let mut parser = SseParser::default();
        let mut out = Collect::default();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, input.len());
            parser.feed(&input[start..cut], &mut out);
            start = cut;
        }
        parser.feed(&input[start..], &mut out);
        out.0
    }

    #[track_caller]
    fn check(input: &str, want: &[(&str, &str)]) {
        let got = parse_in_chunks(input.as_bytes(), &[]);
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(e, d)| ((*e).to_owned(), (*d).to_owned()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn named_events_are_dispatched_on_a_blank_line() {
        check(
            "event: message_start\ndata: {\"a\":1}\n\nevent: ping\ndata: {}\n\n",
            &[("message_start", "{\"a\":1}"), ("ping", "{}")],
        );
    }

    #[test]
    fn all_three_line_ends_work() {
        check(
            "data: a\r\n\r\ndata: b\r\rdata: c\n\n",
            &[("", "a"), ("", "b"), ("", "c")],
        );
    }

    #[test]
    fn multi_line_data_is_joined_and_comments_are_skipped() {
        check(": keep-alive\ndata: x\ndata:y\n\n", &[("", "x\ny")]);
    }

    #[test]
    fn an_unterminated_event_is_not_dispatched() {
        check("data: partial\n", &[]);
    }

    const SAMPLE: &str = "event: message_start\r\ndata: {\"type\":\"message_start\"}\r\n\r\n: c\n\
        data: [DONE]\n\nevent: e\rdata: one\rdata: two\r\r";

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(0usize..SAMPLE.len(), 0..12)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let whole = parse_in_chunks(SAMPLE.as_bytes(), &[]);
            prop_assert_eq!(whole.len(), 3);
            prop_assert_eq!(parse_in_chunks(SAMPLE.as_bytes(), &cuts), whole);
        }
    }
}
