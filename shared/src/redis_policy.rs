//! What both processes require of the Redis they share: it must never evict a key.
//!
//! Seen-sets, spend minutes and hours, cells and concurrency leases carry TTLs, and under
//! `volatile-*` eviction Redis drops exactly those when memory runs short (under `allkeys-*`
//! anything): a dropped seen-set counts a redelivered event twice, a dropped spend bucket or
//! cell loses history, a dropped lease frees a slot that is still held. None of it is visible
//! afterwards. So each binary checks `maxmemory-policy` at start and refuses anything but
//! `noeviction` (where Redis answers writes with an OOM error instead, which every writer
//! already retries or spools), unless the operator explicitly accepts the risk.

use std::collections::HashMap;

use crate::RedisConn;

/// The one eviction policy that keeps every key until it expires or is deleted.
pub const REQUIRED_POLICY: &str = "noeviction";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Redis is configured to evict keys (maxmemory-policy {policy}): evicted dedupe sets, spend \
     counters and leases would silently double-count or lose usage. Run `CONFIG SET \
     maxmemory-policy noeviction` (and set it in redis.conf), or start with \
     --allow-redis-eviction to accept that risk"
)]
pub struct EvictingRedis {
    pub policy: String,
}

/// What `CONFIG GET maxmemory-policy` told us.
#[derive(Debug, PartialEq, Eq)]
enum Finding {
    NoEviction,
    Evicting(String),
    /// The check could not be made (e.g. managed Redis renames or forbids `CONFIG`).
    Unknown(String),
}

/// Checks the policy of the Redis behind `conn` (on a cluster, of every master): `Err` when it
/// evicts and the operator did not allow it. A Redis that does not let us look is accepted with
/// a warning: refusing to start there would make the gateway unusable on most managed offerings.
pub async fn check(conn: &mut RedisConn, allow_eviction: bool) -> Result<(), EvictingRedis> {
    let cmd = redis::Cmd::new()
        .arg("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .to_owned();
    let reply = match conn.query_each_master(&cmd).await {
        Ok(replies) => replies
            .into_iter()
            .map(|v| match v {
                redis::Value::ServerError(e) => Err(redis::RedisError::from(e)),
                v => redis::from_redis_value::<HashMap<String, String>>(v).map_err(Into::into),
            })
            // The first master that does not qualify decides.
            .min_by_key(|r| match judge_ref(r) {
                Finding::Evicting(_) => 0,
                Finding::Unknown(_) => 1,
                Finding::NoEviction => 2,
            })
            .unwrap_or_else(|| Err((redis::ErrorKind::Io, "no master answered").into())),
        Err(e) => Err(e),
    };
    match judge(reply) {
        Finding::NoEviction => Ok(()),
        Finding::Unknown(why) => {
            tracing::warn!(
                reason = %why,
                "could not check Redis's maxmemory-policy; it must be noeviction, or usage may \
                 be double-counted or lost under memory pressure"
            );
            Ok(())
        }
        Finding::Evicting(policy) if allow_eviction => {
            // Logged once: the operator chose this explicitly, in the configuration they
            // read; repeating it would only train readers to skip the line.
            tracing::error!(
                policy = %policy,
                "Redis evicts keys under memory pressure and --allow-redis-eviction is set: \
                 usage may be double-counted or lost; set maxmemory-policy noeviction"
            );
            Ok(())
        }
        Finding::Evicting(policy) => Err(EvictingRedis { policy }),
    }
}

fn judge(reply: redis::RedisResult<HashMap<String, String>>) -> Finding {
    judge_ref(&reply)
}

fn judge_ref(reply: &redis::RedisResult<HashMap<String, String>>) -> Finding {
    match reply {
        Ok(fields) => match fields.get("maxmemory-policy") {
            Some(policy) if policy.eq_ignore_ascii_case(REQUIRED_POLICY) => Finding::NoEviction,
            Some(policy) => Finding::Evicting(policy.clone()),
            None => Finding::Unknown("CONFIG GET returned no maxmemory-policy".into()),
        },
        Err(e) => Finding::Unknown(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(reply: redis::RedisResult<Vec<(&str, &str)>>, want: Finding) {
        let reply = reply.map(|pairs| {
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        });
        assert_eq!(judge(reply), want);
    }

    #[test]
    fn noeviction_passes() {
        check(
            Ok(vec![("maxmemory-policy", "noeviction")]),
            Finding::NoEviction,
        );
    }

    #[test]
    fn any_other_policy_is_eviction() {
        for policy in [
            "allkeys-lru",
            "volatile-ttl",
            "allkeys-random",
            "volatile-lfu",
        ] {
            check(
                Ok(vec![("maxmemory-policy", policy)]),
                Finding::Evicting(policy.into()),
            );
        }
    }

    #[test]
    fn a_forbidden_or_empty_config_get_is_unknown_not_a_refusal() {
        let forbidden: redis::RedisError = (
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "unknown command 'CONFIG'",
        )
            .into();
        assert!(matches!(judge(Err(forbidden)), Finding::Unknown(_)));
        check(
            Ok(vec![]),
            Finding::Unknown("CONFIG GET returned no maxmemory-policy".into()),
        );
    }

    #[test]
    fn the_refusal_names_the_policy_and_the_fix() {
        let text = EvictingRedis {
            policy: "allkeys-lru".into(),
        }
        .to_string();
        assert!(text.contains("allkeys-lru"), "{text}");
        assert!(
            text.contains("CONFIG SET maxmemory-policy noeviction"),
            "{text}"
        );
        assert!(text.contains("--allow-redis-eviction"), "{text}");
    }
}
