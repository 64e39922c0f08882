//! What every process of a deployment must agree on before it touches a partition: how many
//! there are. A gateway with another count would put a key's events, spend and limiter state in
//! another partition than the aggregators read, so the first process records the count and every
//! later one compares.

use redis::AsyncCommands;

use crate::{Partitions, RedisConn};

/// The field of the global `ctl` hash that holds the deployment's partition count.
const PARTITIONS_FIELD: &str = "np";

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error(
        "this process is configured with {configured} partition(s), but the deployment has \
         {deployment} (recorded in Redis by its first process): a key's usage would be looked for \
         in the wrong partition. Start it with --partitions {deployment} (METER_PARTITIONS)"
    )]
    Partitions { deployment: u64, configured: u64 },
    #[error("cannot read the deployment's partition count: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Records `partitions`' count as the deployment's if none is recorded, and refuses a different
/// one. A deployment from before partitions existed has one.
pub async fn check_partitions(
    conn: &mut RedisConn,
    partitions: &Partitions,
) -> Result<(), DeploymentError> {
    let ctl = partitions.global().key("ctl");
    let configured = partitions.count() as u64;
    let recorded: Option<u64> = conn.hget(&ctl, PARTITIONS_FIELD).await?;
    if recorded.is_none() {
        // Older deployments recorded nothing: their single stream says they have one partition.
        let single: bool = configured > 1 && conn.exists(partitions.global().stream()).await?;
        let first = if single { 1 } else { configured };
        let _: bool = conn.hset_nx(&ctl, PARTITIONS_FIELD, first).await?;
    }
    let deployment: u64 = conn.hget(&ctl, PARTITIONS_FIELD).await?;
    if deployment == configured {
        Ok(())
    } else {
        Err(DeploymentError::Partitions {
            deployment,
            configured,
        })
    }
}
