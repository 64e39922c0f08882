//! What is stored in Redis and how it is counted: the cell and its packing, the dimensions and
//! totals, rollup buckets, latency sketches and the per-key spend counters.

pub mod cell;
pub(crate) mod rollup;
pub mod sketch;
pub(crate) mod spend;
pub(crate) mod stats;
