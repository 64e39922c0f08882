//! The usage event (docs/events.md) and its one encode/decode pair.

use serde::{Deserialize, Serialize};

/// The schema version this build writes and the newest it can read.
pub const SCHEMA_VERSION: u32 = 1;

/// One relayed or rejected client request, as the gateway observed it.
///
/// Serialised as a MessagePack map with named fields so that readers can ignore fields they do
/// not know and writers can add fields without a version bump. Field order here is the wire
/// order, which the golden-bytes test pins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub v: u32,
    pub id: String,
    pub ts: i64,
    pub key_id: Option<String>,
    pub account_id: Option<String>,
    pub provider: String,
    pub endpoint: String,
    pub model: String,
    pub status: u16,
    pub stream: bool,
    pub latency_us: u64,
    pub ttft_us: Option<u64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_creation_1h_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub service_tier: Option<String>,
    pub error: Option<String>,
}

impl UsageEvent {
    /// All tokens the event consumed, the quantity `tokens` limits count. Saturating: the
    /// counts come off the wire, and a corrupt or hostile event must not overflow (a panic in
    /// debug builds, a wrapped and therefore tiny total in release ones).
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }
}

/// The most tokens an event may report in any one count: far above any real request (the
/// largest context windows hold a few million tokens) and far enough below 2^63 that no
/// counter the aggregator keeps can overflow. The gateway clamps larger upstream reports to it;
/// the aggregator dead-letters events above it.
pub const MAX_TOKENS: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a usage event: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("schema version {0} is newer than {SCHEMA_VERSION}")]
    UnsupportedVersion(u64),
}

/// Encodes an event for the `e` field of a stream entry.
pub fn encode(event: &UsageEvent) -> Vec<u8> {
    // Serialising a struct of plain fields into a Vec cannot fail: there is no I/O and no map
    // with non-string keys.
    // Sized for a typical event (~330 bytes) so the buffer is allocated once, not grown
    // through six doublings.
    let mut out = Vec::with_capacity(512);
    #[allow(clippy::expect_used)]
    rmp_serde::encode::write_named(&mut out, event).expect("a UsageEvent always serialises");
    out
}

/// Decodes the `e` field of a stream entry, refusing versions this build does not know.
pub fn decode(bytes: &[u8]) -> Result<UsageEvent, DecodeError> {
    match rmp_serde::from_slice::<UsageEvent>(bytes) {
        Ok(event) if u64::from(event.v) > u64::from(SCHEMA_VERSION) => {
            Err(DecodeError::UnsupportedVersion(event.v.into()))
        }
        Ok(event) => Ok(event),
        // A newer writer may have changed a field's type; say so rather than "malformed" when
        // the version alone can be read.
        Err(e) => match rmp_serde::from_slice::<VersionOnly>(bytes) {
            Ok(VersionOnly { v }) if v > u64::from(SCHEMA_VERSION) => {
                Err(DecodeError::UnsupportedVersion(v))
            }
            _ => Err(DecodeError::Malformed(e)),
        },
    }
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> UsageEvent {
        UsageEvent {
            v: 1,
            id: "0190a0b0-0000-7000-8000-000000000001".into(),
            ts: 1_767_225_600_000,
            key_id: Some("k1".into()),
            account_id: Some("a1".into()),
            provider: "anthropic".into(),
            endpoint: "messages".into(),
            model: "claude-sonnet-4-5".into(),
            status: 200,
            stream: true,
            latency_us: 1_500_000,
            ttft_us: Some(250_000),
            input_tokens: 1200,
            output_tokens: 300,
            cache_creation_input_tokens: 50,
            cache_creation_1h_input_tokens: 20,
            cache_read_input_tokens: 4000,
            service_tier: None,
            error: None,
        }
    }

    #[test]
    fn a_fixed_event_encodes_to_fixed_bytes() {
        // If this fails, the wire format changed: every reader in production is affected.
        let bytes = encode(&sample());
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_HEX);
    }

    // A map of 19 named fields (de 0013), then "v": 1, "id": ..., in declaration order.
    const GOLDEN_HEX: &str = concat!(
        "de0013a17601a26964d92430313930613062302d303030302d373030302d383030302d3030303030",
        "30303030303031a27473cf0000019b76daa800a66b65795f6964a26b31aa6163636f756e745f6964",
        "a26131a870726f7669646572a9616e7468726f706963a8656e64706f696e74a86d65737361676573",
        "a56d6f64656cb1636c617564652d736f6e6e65742d342d35a6737461747573ccc8a673747265616d",
        "c3aa6c6174656e63795f7573ce0016e360a7747466745f7573ce0003d090ac696e7075745f746f6b",
        "656e73cd04b0ad6f75747075745f746f6b656e73cd012cbb63616368655f6372656174696f6e5f69",
        "6e7075745f746f6b656e7332be63616368655f6372656174696f6e5f31685f696e7075745f746f6b",
        "656e7314b763616368655f726561645f696e7075745f746f6b656e73cd0fa0ac736572766963655f",
        "74696572c0a56572726f72c0",
    );

    #[test]
    fn a_map_with_unknown_fields_decodes() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["future_field"] = serde_json::json!({"nested": [1, 2, 3]});
        let bytes = rmp_serde::to_vec_named(&value).unwrap();
        assert_eq!(decode(&bytes).unwrap(), sample());
    }

    #[test]
    fn a_newer_version_is_refused() {
        let mut newer = sample();
        newer.v = 2;
        assert!(matches!(
            decode(&encode(&newer)),
            Err(DecodeError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn a_newer_version_with_a_changed_field_type_is_reported_as_newer() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["v"] = serde_json::json!(3);
        value["status"] = serde_json::json!("ok");
        let bytes = rmp_serde::to_vec_named(&value).unwrap();
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::UnsupportedVersion(3))
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            decode(b"\xc1 not msgpack"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode(&[]), Err(DecodeError::Malformed(_))));
    }

    fn opt_str() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(".{0,40}")
    }

    prop_compose! {
        fn any_event()(
            id in "[0-9a-f-]{1,36}", ts in any::<i64>(), key_id in opt_str(), account_id in opt_str(),
            provider in ".{0,12}", endpoint in ".{0,20}", model in ".{0,60}", status in any::<u16>(),
            stream in any::<bool>(), latency_us in any::<u64>(), ttft_us in proptest::option::of(any::<u64>()),
            tokens in proptest::array::uniform5(any::<u64>()), service_tier in opt_str(), error in opt_str(),
        ) -> UsageEvent {
            UsageEvent {
                v: SCHEMA_VERSION, id, ts, key_id, account_id, provider, endpoint, model, status, stream,
                latency_us, ttft_us, input_tokens: tokens[0], output_tokens: tokens[1],
                cache_creation_input_tokens: tokens[2], cache_creation_1h_input_tokens: tokens[3],
                cache_read_input_tokens: tokens[4], service_tier, error,
            }
        }
    }

    proptest! {
        #[test]
        fn every_event_round_trips(event in any_event()) {
            prop_assert_eq!(decode(&encode(&event)).unwrap(), event);
        }
    }

    #[test]
    fn total_tokens_saturates_instead_of_overflowing() {
        // Found by `decoding_arbitrary_bytes_never_panics`: a decoded event with huge counts
        // made `total_tokens` overflow.
        let huge = UsageEvent {
            input_tokens: u64::MAX,
            output_tokens: 1,
            ..sample()
        };
        assert_eq!(huge.total_tokens(), u64::MAX);
    }

    /// An encoded event with some bytes overwritten, some cut off, or some inserted.
    fn mangled() -> impl Strategy<Value = Vec<u8>> {
        (
            any_event(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            proptest::option::of(any::<usize>()),
        )
            .prop_map(|(event, edits, cut)| {
                let mut bytes = encode(&event);
                for (at, byte) in edits {
                    let at = at % (bytes.len() + 1);
                    if at == bytes.len() || byte % 2 == 0 {
                        bytes.insert(at, byte);
                    } else {
                        bytes[at] = byte;
                    }
                }
                if let Some(cut) = cut {
                    bytes.truncate(cut % (bytes.len() + 1));
                }
                bytes
            })
    }

    proptest! {
        // Fuzz target (scripts/fuzz.sh raises PROPTEST_CASES): the aggregator decodes whatever
        // is on the stream, so no input may panic, and whatever decodes is usable.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..300), mangled()],
        ) {
            if let Ok(event) = decode(&bytes) {
                prop_assert!(event.v <= SCHEMA_VERSION);
                let _ = event.total_tokens();
                prop_assert_eq!(decode(&encode(&event)).unwrap(), event);
            }
        }
    }
}
