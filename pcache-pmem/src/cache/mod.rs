//! The cache engine: one pmem device caching one or more backing devices.
//!
//! ```text
//!  write(off, data) ─► data head: allocate space in a cache segment
//!                      copy_persist the data            (durable first)
//!                      slice lock: append the key to its kset, then index it
//!                      (the kset closes when full, after the flush delay,
//!                       on flush(), or before a FUA write returns)
//!  read(off, buf)  ─► slice lock: hits, misses, fills in flight
//!                      hits copied from pmem (data CRC verified if kept)
//!                      misses read from the backing device, then cached
//!                      as CLEAN keys behind placeholders
//! ```
//!
//! Durability contract: a write is acknowledged once its data is durable
//! and its key is in an open kset; the key is durable once that kset
//! closes. After [`Cache::flush`], or a FUA write, every write acknowledged
//! before it survives any crash.
//!
//! # Roles
//!
//! A running [`Cache`] (`facade`) composes roles, each owning its state:
//!
//! | module      | role                                                         |
//! |-------------|--------------------------------------------------------------|
//! | `dev`       | the device: layout, backing table, device segments, entries  |
//! | `start`     | options checked and a stored entry reconciled, before build  |
//! | `load`      | replay of a cache's chain, tails and key log                 |
//! | `space`     | cache segments, generations, references, data heads          |
//! | `log`       | open ksets, key head, tails, the flusher                     |
//! | `index`     | the in-memory index, one slice per 4 MiB                     |
//! | `fill`      | read misses in flight                                        |
//! | `io`        | the write and read paths, the CRC-verified extent read       |
//! | `writeback` | dirty data to the backing device, the dirty tail             |
//! | `gc`        | the key tail, segment reclaim, stale keys                    |
//! | `check`     | the invariants, between GC steps                             |
//! | `ctx`       | what every role shares: stopping, wake-ups, health, counters |
//! | `shard`     | counters split per thread, summed on read                    |
//! | `detach`    | detach, salvage and discard of a stopped cache               |
//! | `repair`    | rebuilding damaged or lost backing entries                   |
//!
//! Roles call each other through explicit references (see `io::Roles`);
//! no role reaches into another's fields.

mod check;
mod ctx;
pub mod detach;
pub mod dev;
mod error;
mod facade;
mod fill;
mod gc;
pub mod index;
mod io;
pub mod load;
mod log;
mod options;
pub mod repair;
mod shard;
mod space;
mod start;
mod writeback;

pub use detach::{
    DamagedKset, DetachReport, DiscardReport, LostExtent, SalvageReport, detach, detach_salvage, discard,
};
pub use dev::{CacheDev, Entry};
pub use error::EngineError;
pub use facade::{Cache, summarize};
pub use index::IKey;
pub use load::{LogPos, ReplayStats};
pub use options::{CacheOptions, CacheSummary, Health, StartReport, Stats, default_cache_segs};
