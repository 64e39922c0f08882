//! Stream retention: trims entries every consumer group is done with and that are older than
//! the retention window, so replay always has that window and nothing unread is ever dropped.

use std::time::Duration;

use redis::Value;
use shared::RedisConn;
use tokio::sync::watch;

/// A stream entry id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EntryId(u64, u64);

impl EntryId {
    fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }

    /// The smallest id after this one.
    fn successor(self) -> Self {
        match self.1.checked_add(1) {
            Some(seq) => Self(self.0, seq),
            None => Self(self.0 + 1, 0),
        }
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

pub async fn run(
    mut conn: RedisConn,
    stream: String,
    retention: Duration,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(every) => {}
        }
        match trim_once(&mut conn, &stream, retention).await {
            Ok(0) => {}
            Ok(trimmed) => tracing::info!(trimmed, "trimmed the usage stream"),
            Err(e) => tracing::warn!(error = %e, "trimming the usage stream failed"),
        }
    }
}

/// One trim; returns the number of entries removed.
async fn trim_once(
    conn: &mut RedisConn,
    stream: &str,
    retention: Duration,
) -> redis::RedisResult<u64> {
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let cutoff = EntryId(
        now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX)),
        0,
    );
    let groups: Vec<Value> = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(groups) => groups,
        // No stream yet: nothing to trim.
        Err(e) if e.code() == Some("ERR") => return Ok(0),
        Err(e) => return Err(e),
    };
    // Without any group nobody has read anything: keep everything.
    let mut keep_from = None;
    for group in &groups {
        let info: std::collections::HashMap<String, Value> = redis::from_redis_value_ref(group)?;
        let text = |name: &str| {
            info.get(name)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        };
        let (Some(name), Some(last)) = (text("name"), text("last-delivered-id")) else {
            continue;
        };
        let pending: u64 = info
            .get("pending")
            .and_then(|v| redis::from_redis_value_ref(v).ok())
            .unwrap_or(0);
        let needed = if pending > 0 {
            // [count, smallest id, greatest id, consumers]
            let summary: (u64, Option<String>, Option<String>, Value) = redis::cmd("XPENDING")
                .arg(stream)
                .arg(&name)
                .query_async(conn)
                .await?;
            summary.1.as_deref().and_then(EntryId::parse)
        } else {
            EntryId::parse(&last).map(EntryId::successor)
        };
        let Some(needed) = needed else {
            return Ok(0);
        };
        keep_from = Some(keep_from.map_or(needed, |k: EntryId| k.min(needed)));
    }
    let Some(keep_from) = keep_from else {
        return Ok(0);
    };
    let threshold = keep_from.min(cutoff);
    redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg(threshold.to_string())
        .query_async(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_numerically_and_have_successors() {
        let a = EntryId::parse("99-5").unwrap();
        let b = EntryId::parse("100-0").unwrap();
        assert!(a < b);
        assert_eq!(a.successor().to_string(), "99-6");
        assert_eq!(EntryId(7, u64::MAX).successor(), EntryId(8, 0));
        assert!(EntryId::parse("nope").is_none());
    }
}
