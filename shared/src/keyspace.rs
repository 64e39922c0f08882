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

/// Why a partition count is refused.
#[derive(Debug, thiserror::Error)]
pub enum InvalidPartitions {
    #[error("partitions must be between 1 and {MAX_PARTITIONS}, not {0}")]
    Count(u32),
    #[error(transparent)]
    Stream(#[from] InvalidStreamName),
}

/// More would only spread one master's load thinner; 1,024 covers a cluster of hundreds.
pub const MAX_PARTITIONS: u32 = 1_024;

/// A deployment's keyspaces: the global one (client keys, accounts, cool-downs and the partition
/// count, which every process must find) and one per partition, each a complete pipeline in one
/// hash slot: its stream, dead letters, stats, spend counters, limiter state, dedupe sets,
/// pricing and replay state. So every script stays within one slot, and partitions spread over
/// a cluster's masters. With one partition both are the keyspace of the stream name itself,
/// exactly the single-stream layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    global: Keyspace,
    parts: Vec<Keyspace>,
}

impl Partitions {
    /// `count` partitions of `stream`: partition `p` is the stream `<stream>:<p>`, whose hash tag
    /// (unless `stream` has one of its own) is its whole name.
    pub fn new(stream: &str, count: u32) -> Result<Self, InvalidPartitions> {
        if count == 0 || count > MAX_PARTITIONS {
            return Err(InvalidPartitions::Count(count));
        }
        let global = Keyspace::new(stream)?;
        let parts = if count == 1 {
            vec![global.clone()]
        } else {
            (0..count)
                .map(|p| Keyspace::new(&format!("{stream}:{p}")))
                .collect::<Result<_, _>>()?
        };
        Ok(Self { global, parts })
    }

    /// Where every process finds the deployment's shared records.
    pub fn global(&self) -> &Keyspace {
        &self.global
    }

    pub fn count(&self) -> usize {
        self.parts.len()
    }

    pub fn get(&self, partition: usize) -> &Keyspace {
        &self.parts[partition % self.parts.len()]
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Keyspace> {
        self.parts.iter()
    }

    /// The partition of a client key's events, spend and limiter state: CRC-32 (IEEE) of its
    /// id, modulo the count; unauthenticated requests (no key) go to partition 0. Fixed for the
    /// life of a deployment, which is why the count cannot change under it.
    pub fn of_key(&self, key_id: Option<&str>) -> usize {
        match key_id {
            Some(id) if self.parts.len() > 1 => {
                (crc32fast::hash(id.as_bytes()) % self.parts.len() as u32) as usize
            }
            _ => 0,
        }
    }

    pub fn for_key(&self, key_id: Option<&str>) -> &Keyspace {
        &self.parts[self.of_key(key_id)]
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
    fn one_partition_is_the_single_stream_layout() {
        let p = Partitions::new("meter:events", 1).unwrap();
        assert_eq!(p.count(), 1);
        assert_eq!(p.get(0), p.global());
        assert_eq!(p.for_key(Some("k")).stream(), "meter:events");
    }

    #[test]
    fn partitions_are_streams_of_their_own_slot() {
        let p = Partitions::new("meter:events", 3).unwrap();
        assert_eq!(p.get(2).stream(), "meter:events:2");
        assert_eq!(p.get(2).key("x"), "{meter:events:2}:x");
        assert_eq!(p.get(2).dead_letter_stream(), "meter:events:2:dead");
        assert_eq!(p.global().key("x"), "{meter:events}:x");
        assert_eq!(p.of_key(None), 0);
        // Pinned: the partition of a key must never change between releases.
        assert_eq!(
            p.of_key(Some("key-1")),
            (crc32fast::hash(b"key-1") % 3) as usize
        );
        let spread: std::collections::HashSet<usize> =
            (0..100).map(|i| p.of_key(Some(&format!("k{i}")))).collect();
        assert_eq!(spread.len(), 3);
    }

    #[test]
    fn partition_counts_are_bounded() {
        assert!(Partitions::new("s", 0).is_err());
        assert!(Partitions::new("s", MAX_PARTITIONS + 1).is_err());
    }

    #[test]
    fn the_dead_letter_stream_follows_the_contract() {
        assert_eq!(
            Keyspace::new("meter:events").unwrap().dead_letter_stream(),
            "meter:events:dead"
        );
    }
}
