//! Identifiers shaped like the ones the real providers hand out.
//!
//! Clients and the gateway only ever treat these as opaque strings, but keeping the familiar
//! prefixes and lengths makes logs from the demo read like production traffic and catches code
//! that accidentally assumes a fixed width.

use uuid::Uuid;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Anthropic message id, e.g. `msg_01XFDUDYJgAACzvnptvVoYEL`.
pub(crate) fn anthropic_message() -> String {
    format!("msg_01{}", base62(22))
}

/// Anthropic `request-id` header, e.g. `req_011CSHoEeqs5C35K2UUqR7Fy`.
pub(crate) fn anthropic_request() -> String {
    format!("req_011C{}", base62(20))
}

/// OpenAI chat completion id, e.g. `chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG`.
pub(crate) fn chat_completion() -> String {
    format!("chatcmpl-{}", base62(29))
}

/// OpenAI Responses object id: `resp_` and 48 hex digits.
pub(crate) fn response() -> String {
    format!("resp_{}", hex(48))
}

/// Output item id inside a Responses object; `kind` is `msg` or `rs`.
pub(crate) fn response_item(kind: &str) -> String {
    format!("{kind}_{}", hex(48))
}

/// OpenAI `x-request-id` header: `req_` and 32 hex digits.
pub(crate) fn openai_request() -> String {
    format!("req_{}", hex(32))
}

fn base62(len: usize) -> String {
    let mut out = String::with_capacity(len);
    while out.len() < len {
        // 62^21 < 2^128, so one v4 UUID yields 21 digits; its 6 fixed version bits only skew
        // the distribution slightly, which is irrelevant for opaque ids.
        let mut n = Uuid::new_v4().as_u128();
        for _ in 0..21 {
            if out.len() == len {
                break;
            }
            out.push(char::from(BASE62[(n % 62) as usize]));
            n /= 62;
        }
    }
    out
}

fn hex(len: usize) -> String {
    let mut out = String::with_capacity(len + 32);
    while out.len() < len {
        out.push_str(&Uuid::new_v4().simple().to_string());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    #[track_caller]
    fn check(id: &str, prefix: &str, len: usize) {
        assert!(id.starts_with(prefix), "{id} should start with {prefix}");
        assert_eq!(id.len(), len, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        );
    }

    #[test]
    fn ids_have_the_providers_prefixes_and_lengths() {
        check(&super::anthropic_message(), "msg_01", 28);
        check(&super::anthropic_request(), "req_011C", 28);
        check(&super::chat_completion(), "chatcmpl-", 38);
        check(&super::response(), "resp_", 53);
        check(&super::response_item("msg"), "msg_", 52);
        check(&super::openai_request(), "req_", 36);
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(super::chat_completion(), super::chat_completion());
    }
}
