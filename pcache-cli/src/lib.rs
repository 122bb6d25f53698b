//! The library part of the `pcache` command: the NBD server `attach` runs,
//! usable (and fuzzed) on its own.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod nbd;
pub mod remote;
