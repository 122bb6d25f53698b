//! The pcache on-media format: persistent memory used as a write-back cache
//! in front of slower block devices, in both of its dialects.
//!
//! This crate knows bytes, never I/O. It gives tools that read or write
//! pcache devices every record of the format as a `#[repr(C)]` struct of
//! explicitly little-endian fields (so a struct's layout is its own
//! documentation, and big-endian hosts read the same bytes), the CRCs, the
//! double-copy selection rules, the device layout, and decoders that
//! validate every value before it can become an index or an offset. It never
//! panics on any input, and record parsing needs no allocator.
//!
//! Two dialects share the key log, the segments and the magic ([`Dialect`]):
//! the RFC v1 patch's (`drivers/block/pcache`, several caches per device)
//! and the Linux kernel's dm-pcache target's (6.18 and later, one cache per
//! device, its own CRC and superblock; the [`dm`] module). The superblock
//! says which one a device speaks ([`Dialect::detect`]); the [`Layout`]
//! carries it, and every reader and codec asks it, so a tool is written once
//! for both. The golden vectors of spec §5 are tests for both.
//!
//! ```text
//! RFC v1 device                  records                        module
//! 0x1000 superblock area         Superblock                     superblock
//! 0x4000 segment 0               MetaSegmentInfo                segment
//!        backing table           BackingDevInfo + CacheInfo     backing
//! segment i (a cache segment)    SegmentInfo                    segment
//!        control page            CacheSegGen, CachePos tails    ctrl
//!        data area               cached data, ksets of Keys     kset
//!
//! dm-pcache device
//! 0x1000 superblock              DmSuperblock                   dm
//! 0x2000 cache info, two copies  DmCacheInfo                    dm
//! 0x4000 key and dirty tails     CachePos                       ctrl
//! 0x5000 segment i               DmSegmentInfo, then as above   dm, ctrl, kset
//! ```
//!
//! # Example: decode a superblock and pick the current copy of a record
//!
//! ```
//! use pcache_format::{encode_copy, read_latest, CachePos, Dialect, Superblock};
//!
//! let area = Superblock::encode_area(63);
//! assert_eq!(Dialect::detect(&area), Some(Dialect::RfcV1));
//! let sb = Superblock::decode(&area)?;
//! assert_eq!(sb.seg_num.get(), 63);
//!
//! // Two copies of a log tail; the writer overwrote the older one (copy 1).
//! let d = Dialect::RfcV1;
//! let mut pair = [0u8; 32];
//! encode_copy(d, &CachePos::new(0, 0), 1, &mut pair[..16])?;
//! encode_copy(d, &CachePos::new(0, 4096), 2, &mut pair[16..])?;
//! let tail = read_latest::<CachePos>(d, &pair)?;
//! assert_eq!((tail.copy, tail.record.seg_off.get()), (1, 4096));
//! // The same bytes are damage to a reader of the other dialect.
//! assert!(read_latest::<CachePos>(Dialect::DmPcache, &pair).is_err());
//! # Ok::<(), pcache_format::Error>(())
//! ```
//!
//! # Features
//!
//! * `alloc` — the [`image`] module: a scan of a whole device that collects
//!   every problem it finds (what `pcache inspect` and `pcache check` print).
//! * `testing` — implies `alloc`; the `sparse` module: a sparse in-memory
//!   image and a reference writer, for tests, fuzz targets and tools.
//! * `std` (default) — implies `alloc`.
//! * `arbitrary` — `Arbitrary` for every record, built from raw bytes.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod backing;
pub mod consts;
pub mod crc;
pub mod ctrl;
pub mod dialect;
pub mod dm;
pub mod error;
#[cfg(feature = "alloc")]
pub mod image;
pub mod keylog;
pub mod kset;
pub mod layout;
pub mod media;
pub mod meta;
pub mod pfn;
pub mod segment;
#[cfg(feature = "testing")]
pub mod sparse;
pub mod superblock;

#[cfg(feature = "arbitrary")]
mod arbitrary_impls;

pub use backing::{BackingDevInfo, BackingState, CacheFlags, CacheInfo};
pub use consts::*;
pub use ctrl::{CacheCtrl, CachePos, CacheSegCtrl, CacheSegGen};
pub use dialect::Dialect;
pub use error::{Error, ErrorKind, Record};
pub use kset::{
    Key, KeyFlags, KsetFlags, KsetHeader, KsetRecord, TERMINATOR, decode_kset, encode_kset, encode_last, kset_size,
};
pub use layout::{FormatPlan, Layout};
pub use media::{ReadError, ReadMedia};
pub use meta::{
    CopyInfo, Latest, MetaHeader, MetaRecord, Slots, decode_copy, encode_copy, find_latest, find_oldest, next_seq,
    read_latest, seq_after,
};
pub use segment::{MetaSegmentInfo, SegmentInfo, SegmentInfoFlags, SegmentState, SegmentType};
pub use superblock::{SbFlags, Superblock};
