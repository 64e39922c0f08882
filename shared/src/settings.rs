//! The settings both processes read the same way: their config file, their listen address,
//! and where the deployment lives (Redis, the stream and its partition count). A deployment's
//! processes must agree on the last three, so they are parsed here once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::{DEFAULT_STREAM, Partitions, Target};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    ParseFile {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Where a deployment lives: its Redis and its partitioned stream.
#[derive(Debug)]
pub struct Deployment {
    pub redis: Target,
    pub partitions: Partitions,
}

/// A TOML config file, read whole.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| SettingsError::ParseFile {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// The address to listen on: `value` (flag, environment or file) or `default`.
pub fn listen(value: Option<String>, default: &str) -> Result<SocketAddr, SettingsError> {
    let listen = value.unwrap_or_else(|| default.into());
    listen.parse().map_err(|e| SettingsError::Invalid {
        name: "listen address",
        reason: format!("{listen:?}: {e}"),
    })
}

/// The deployment from its settings, each already taken from the flag, the environment or the
/// file: `REDIS_URL` (one URL, or seed nodes), whether a single URL is a cluster seed, the
/// stream name and the partition count (defaults: a local Redis, the default stream, one
/// partition).
pub fn deployment(
    redis_url: Option<String>,
    cluster: bool,
    stream: Option<String>,
    partitions: Option<u32>,
) -> Result<Deployment, SettingsError> {
    let redis_url = redis_url.unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let redis = Target::parse(&redis_url, cluster).map_err(|e| SettingsError::Invalid {
        name: "REDIS_URL",
        reason: e.to_string(),
    })?;
    let stream = stream.unwrap_or_else(|| DEFAULT_STREAM.into());
    let partitions =
        Partitions::new(&stream, partitions.unwrap_or(1)).map_err(|e| SettingsError::Invalid {
            name: "stream/partitions",
            reason: e.to_string(),
        })?;
    Ok(Deployment { redis, partitions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_local_redis_the_default_stream_and_one_partition() {
        let d = deployment(None, false, None, None).unwrap();
        assert_eq!(d.partitions.count(), 1);
        assert_eq!(listen(None, "127.0.0.1:8080").unwrap().port(), 8080);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = listen(Some("nowhere".into()), "127.0.0.1:1").unwrap_err();
        assert!(
            err.to_string().starts_with("invalid listen address"),
            "{err}"
        );
        let err = deployment(Some("ftp://x".into()), false, None, None).unwrap_err();
        assert!(err.to_string().starts_with("invalid REDIS_URL"), "{err}");
        let err = deployment(None, false, None, Some(0)).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid stream/partitions"),
            "{err}"
        );
    }
}
