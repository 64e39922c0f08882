//! Stream → decode → price → apply: the live consumer loop and its atomic commit.

pub(crate) mod applied;
pub(crate) mod commit;
pub(crate) mod consumer;
pub(crate) mod groups;
pub(crate) mod retention;
pub(crate) mod stream;
pub(crate) mod task;
