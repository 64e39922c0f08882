//! What the gateway and the aggregator must agree on, and nothing else.
//!
//! The two processes share no memory and no code paths at run time: they meet only in Redis.
//! This crate fixes that meeting point: the usage event and its MessagePack wire form
//! ([`event`]), the names of every Redis key either side reads or writes ([`keyspace`]), how
//! long the spend counters' fine buckets are kept ([`spend_retention`]), and what both require
//! of Redis itself ([`redis_policy`]), and the settings that say where a deployment lives
//! ([`settings`]). Changing the event changes the wire contract
//! (docs/events.md), so it is guarded by golden-bytes tests.

pub mod connection;
pub mod deployment;
pub mod event;
pub mod keyspace;
pub mod redis_policy;
pub mod settings;
pub mod spend_retention;

pub use connection::{RedisConn, Target, TargetError, Timeouts};
pub use event::{DecodeError, MAX_TOKENS, SCHEMA_VERSION, UsageEvent, decode, encode};
pub use keyspace::{
    DEFAULT_STREAM, EVENT_FIELD, InvalidPartitions, InvalidStreamName, Keyspace, Partitions,
};
