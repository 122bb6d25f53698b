//! The library part of the `pcache` command: the NBD server `attach` runs,
//! usable (and fuzzed) on its own.
#![warn(missing_docs)]

pub mod nbd;
