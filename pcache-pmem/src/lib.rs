//! Persistent memory for pcache: the [`Pmem`] interface every pmem access
//! goes through, the real mapping ([`DaxMapping`]) with cache-line
//! persistence, device formatting, and the cache engine.
//!
//! With the `testing` feature, [`testing`] holds the test kit: a simulated
//! persistence domain for crash testing (`SimPmem`), backing devices in
//! memory, the workload alphabet and the model disk.
#![warn(missing_docs)]

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub mod backing;
pub mod cache;
pub mod dax;
pub mod dm_rescue;
pub mod flush;
pub mod format;
pub mod mutation;
pub mod nbd_uri;
pub mod pmem;
pub mod records;
pub mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use backing::{BackingDev, BackingError, BackingId, FileBacking, stored_name, stored_path};
pub use cache::{
    Cache, CacheDev, CacheOptions, CacheSummary, DamagedKset, DetachReport, EngineError, Entry, Health, LostExtent,
    SalvageReport, StartReport, Stats, default_cache_segs, detach, detach_salvage, discard, summarize,
};
pub use dax::{DaxMapping, DaxOptions, MapMode};
pub use flush::{FlushConfig, FlushInstr};
pub use nbd_uri::{NbdUri, is_nbd_uri};
pub use pmem::{AsMedia, CACHE_LINE, Pmem, PmemError, PmemWindow, check_range};
