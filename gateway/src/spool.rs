//! The local append-only spool for usage events that cannot reach Redis.
