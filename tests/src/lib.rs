//! Test support for the end-to-end suite: the mock upstream provider, and a harness that starts
//! Redis, the gateway and the aggregator on free ports with a keyspace of their own per test.

pub mod browser;
pub mod cluster;
pub mod fixtures;
pub mod harness;
pub mod mock_upstream;
pub mod process;
