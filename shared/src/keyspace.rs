//! Names of every Redis key the pipeline uses.
//!
//! All keys of one deployment share one Redis Cluster hash tag, derived from the stream name, so
//! they live in the stream's slot. That is what lets the aggregator apply a batch's stats and
//! `XACK` it in one atomic script (exactly-once effect), and lets the gateway check every limit of
//! a request in one script, on a single node or on a cluster alike. A deployment that outgrows one
//! slot runs several streams (each with its own tag), not a different key layout.
//!
//! Tests get isolation for free: a unique stream name gives a disjoint keyspace.

/// Default stream name (docs/configuration.md).
pub const DEFAULT_STREAM: &str = "meter:events";

/// The one field of a stream entry; its value is the encoded event.
pub const EVENT_FIELD: &str = "e";

#[derive(Debug, thiserror::Error)]
#[error("stream name {0:?} is empty or has braces without a non-empty hash tag")]
pub struct InvalidStreamName(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    stream: String,
    /// `{tag}:` — every other key starts with it.
    prefix: String,
}

impl Keyspace {
    /// Fails for a stream name with braces but no usable hash tag (`a{}b`): Redis would hash such
    /// a name in a way no `{tag}:` prefix can reproduce.
    pub fn new(stream: &str) -> Result<Self, InvalidStreamName> {
        let tag = hash_tag(stream);
        if stream.is_empty() || tag.contains(['{', '}']) {
            return Err(InvalidStreamName(stream.to_owned()));
        }
        Ok(Self {
            stream: stream.to_owned(),
            prefix: format!("{{{tag}}}:"),
        })
    }

    /// The usage event stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Where undecodable entries go (docs/events.md). Its name is documented for consumers, so
    /// it carries no hash tag and may sit in another slot; dead-lettering therefore never
    /// shares a script with the stream.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}:dead", self.stream)
    }

    /// A client key's record (JSON, written by the gateway's admin API; the aggregator reads
    /// its `name`).
    pub fn key_record(&self, id: &str) -> String {
        self.key(&format!("key:{id}"))
    }

    /// The gateway's record that the batch of events starting with `first_event_id` is in the
    /// stream (how many of its events), so a re-sent batch is not added twice.
    pub fn publish_marker(&self, first_event_id: &str) -> String {
        self.key(&format!("pub:{first_event_id}"))
    }

    /// Any other key: `{tag}:<name>`.
    pub fn key(&self, name: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + name.len());
        key.push_str(&self.prefix);
        key.push_str(name);
        key
    }
}

/// The part of a key Redis Cluster hashes: the first non-empty `{...}` section, else the whole
/// key. Keys `{t}:x` then hash like the stream itself.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(stream: &str, want_key: &str) {
        assert_eq!(Keyspace::new(stream).unwrap().key("x"), want_key);
    }

    #[test]
    fn a_plain_stream_name_becomes_the_tag() {
        check("meter:events", "{meter:events}:x");
    }

    #[test]
    fn an_existing_tag_is_reused() {
        check("{team-a}:events", "{team-a}:x");
        check("pre{t}post", "{t}:x");
    }

    #[test]
    fn braces_without_a_tag_are_refused() {
        assert!(Keyspace::new("a{}b").is_err());
        assert!(Keyspace::new("a}b").is_err());
        assert!(Keyspace::new("").is_err());
    }

    #[test]
    fn a_publish_marker_shares_the_stream_slot() {
        assert_eq!(
            Keyspace::new("meter:events")
                .unwrap()
                .publish_marker("0190-ab"),
            "{meter:events}:pub:0190-ab"
        );
    }

    #[test]
    fn the_dead_letter_stream_follows_the_contract() {
        assert_eq!(
            Keyspace::new("meter:events").unwrap().dead_letter_stream(),
            "meter:events:dead"
        );
    }
}
