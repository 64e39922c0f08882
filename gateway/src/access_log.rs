//! The access log: one line per client request (docs/configuration.md, "Access log"), logged
//! where the request's one usage event is published, so every way out of a request logs once.
//!
//! It goes through `tracing` under its own target, so the log format (`--log-format json`)
//! applies and `--access-log false` is a filter directive: a switched-off line costs a cached
//! check, and a switched-on one formats only what the event already holds.

use shared::UsageEvent;
use tracing_subscriber::EnvFilter;

/// The target of access-log lines, for filter directives (`RUST_LOG=meter::access=off`).
pub(crate) const TARGET: &str = "meter::access";

/// The process's log filter: `rust_log` (`RUST_LOG`; `info` when unset or invalid), with the
/// access log on at `info` whatever its level, unless `rust_log` names the access log's target
/// itself, or off when `enabled` is false.
pub fn log_filter(rust_log: Option<&str>, enabled: bool) -> EnvFilter {
    let filter = rust_log
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let directive = if !enabled {
        format!("{TARGET}=off")
    } else if rust_log.is_some_and(|directives| directives.contains(TARGET)) {
        return filter;
    } else {
        format!("{TARGET}=info")
    };
    match directive.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Logs `event`'s line. `method` and `path` are the client's route, `key_name` the name of the
/// key that made the request.
pub(crate) fn log(method: &str, path: &str, key_name: Option<&str>, event: &UsageEvent) {
    tracing::info!(
        target: TARGET,
        method,
        path,
        status = event.status,
        key_id = event.key_id.as_deref(),
        key_name,
        model = (!event.model.is_empty()).then_some(event.model.as_str()),
        account = event.account_id.as_deref(),
        stream = event.stream,
        latency_ms = millis(event.latency_us),
        ttft_ms = event.ttft_us.map(millis),
        input_tokens = event.input_tokens,
        output_tokens = event.output_tokens,
        cache_write_tokens = event.cache_creation_input_tokens,
        cache_read_tokens = event.cache_read_input_tokens,
        cost_class = cost_class(event),
        error = event.error.as_deref(),
        id = event.id.as_str(),
        "request"
    );
}

/// Milliseconds to the microsecond, as a number log readers can compare.
fn millis(us: u64) -> f64 {
    // Exact below 2^53 µs (285 years).
    us as f64 / 1000.0
}

/// What the request costs as far as the gateway can tell; it never prices, so whether a price
/// exists for the model is the aggregator's to say (`unpriced_requests` in the stats API).
/// - `metered`: the upstream reported tokens; the aggregator prices them.
/// - `no_usage`: relayed (an account was chosen), but no tokens were reported: the upstream
///   refused or failed, the stream ended or the client left before its usage, or the
///   endpoint consumes none (`count_tokens`).
/// - `not_relayed`: refused by the gateway (key, body, model, limit, no account): no upstream
///   cost at all.
fn cost_class(event: &UsageEvent) -> &'static str {
    let tokens = event.input_tokens
        | event.output_tokens
        | event.cache_creation_input_tokens
        | event.cache_read_input_tokens;
    if event.account_id.is_none() {
        "not_relayed"
    } else if tokens > 0 {
        "metered"
    } else {
        "no_usage"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spool's test event, with `account` and `output_tokens` set and no other tokens.
    fn event(account: Option<&str>, output_tokens: u64) -> UsageEvent {
        UsageEvent {
            account_id: account.map(str::to_owned),
            output_tokens,
            ..crate::spool::tests::event(0)
        }
    }

    #[test]
    fn the_access_log_is_on_at_info_whatever_the_level_unless_switched_off() {
        let on = |rust_log, enabled| log_filter(rust_log, enabled).to_string();
        assert!(on(None, true).contains("meter::access=info"));
        assert!(on(Some("warn"), true).contains("meter::access=info"));
        assert!(on(Some("debug"), false).contains("meter::access=off"));
        assert!(on(Some("warn,meter::access=off"), true).contains("meter::access=off"));
        assert!(!on(Some("warn,meter::access=off"), true).contains("meter::access=info"));
    }

    #[test]
    fn the_cost_class_says_what_the_gateway_observed() {
        assert_eq!(cost_class(&event(None, 0)), "not_relayed");
        assert_eq!(cost_class(&event(Some("a"), 0)), "no_usage");
        assert_eq!(cost_class(&event(Some("a"), 3)), "metered");
        assert_eq!(millis(1_500), 1.5);
    }
}
