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

/// Longest event the parser holds (its current line plus its data so far). A stream that never
/// ends a line or an event would otherwise grow the parser without bound; a larger event is
/// dropped, unseen by the handler, while its bytes still pass through to the client untouched.
/// Real events are far smaller: the largest, a Responses `response.completed` carrying the
/// whole output, stays under a few MiB even at the output token cap.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The current event outgrew [`MAX_EVENT_BYTES`]: skip it up to the blank line that ends it.
    oversized: bool,
    /// While `oversized`: the current line had bytes, so its end is not the event's blank line.
    skipped_text: bool,
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
        // Every relayed byte passes here; a byte-at-a-time scan was a tenth of the relay's
        // instructions per event.
        while let Some(end) = memchr::memchr2(b'\n', b'\r', rest) {
            self.push_line(&rest[..end]);
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
        self.push_line(rest);
    }

    fn push_line(&mut self, bytes: &[u8]) {
        if self.oversized {
            self.skipped_text |= !bytes.is_empty();
            return;
        }
        if self.line.len() + self.data.len() + bytes.len() > MAX_EVENT_BYTES {
            self.oversized = true;
            self.skipped_text = true;
            // Give the memory back: this is the case the cap exists for.
            self.line = Vec::new();
            self.data = String::new();
            self.has_data = false;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line<H: SseHandler + ?Sized>(&mut self, handler: &mut H) {
        let line = std::mem::take(&mut self.line);
        if self.oversized {
            // Only the blank line that ends the oversized event resumes normal parsing.
            if !std::mem::take(&mut self.skipped_text) {
                self.oversized = false;
                self.event.clear();
            }
        } else if line.is_empty() {
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
            // Valid UTF-8 is the rule, and checking it is much cheaper than `from_utf8_lossy`'s
            // chunk-by-chunk walk over every data line.
            let value = match std::str::from_utf8(value) {
                Ok(value) => std::borrow::Cow::Borrowed(value),
                Err(_) => String::from_utf8_lossy(value),
            };
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
pub(crate) mod tests {
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

    #[test]
    fn an_event_over_the_cap_is_dropped_and_the_next_one_is_seen() {
        let mut parser = SseParser::default();
        let mut out = Collect::default();
        parser.feed(b"data: {\"a\":1}\n\nevent: big\ndata: ", &mut out);
        // 20 MiB without a line end, in 1 MiB reads, as a broken upstream might send it.
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            parser.feed(&chunk, &mut out);
            assert!(parser.line.capacity() + parser.data.capacity() <= MAX_EVENT_BYTES + (1 << 20));
        }
        parser.feed(
            b"\ndata: more of the big event\n\ndata: after\n\n",
            &mut out,
        );
        let events: Vec<&str> = out.0.iter().map(|(_, d)| d.as_str()).collect();
        assert_eq!(events, ["{\"a\":1}", "after"]);
        assert_eq!(
            out.0[1].0, "",
            "the oversized event's name does not leak into the next"
        );
    }

    /// Bytes that look like SSE more often than uniform noise would: field names, separators,
    /// every line end, and some arbitrary bytes (invalid UTF-8 included).
    pub(crate) fn sse_like_bytes() -> impl Strategy<Value = Vec<u8>> {
        let token = prop_oneof![
            Just(b"data: ".to_vec()),
            Just(b"data:".to_vec()),
            Just(b"event: ".to_vec()),
            Just(b": comment".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\n\n".to_vec()),
            Just(b"[DONE]".to_vec()),
            Just(b"{\"type\":\"message_start\"}".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8),
        ];
        proptest::collection::vec(token, 0..64).prop_map(|tokens| tokens.concat())
    }

    proptest! {
        // Fuzz target (scripts/fuzz.sh raises PROPTEST_CASES): any bytes, in any chunking,
        // never panic and give the events the whole input gives.
        #[test]
        fn arbitrary_bytes_in_any_chunking_parse_like_the_whole(
            input in prop_oneof![sse_like_bytes(), proptest::collection::vec(any::<u8>(), 0..512)],
            cuts in proptest::collection::vec(any::<usize>(), 0..16),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (input.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(parse_in_chunks(&input, &cuts), parse_in_chunks(&input, &[]));
        }
    }
}
