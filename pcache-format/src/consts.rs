//! Every constant of the RFC v1 format (spec §2.1).
//!
//! Layout constants are fixed for 4 KiB pages: nothing here depends on the
//! page size of the host that reads or writes an image.

use core::time::Duration;

/// Size of one "page" of the on-media layout. The RFC derived several
/// layout constants from the kernel's `PAGE_SIZE`; images are only
/// compatible when that was 4 KiB, so it is fixed here.
pub const PAGE_SIZE: usize = 4096;

/// Superblock magic (`sb.magic`, little-endian u64).
pub const MAGIC: u64 = 0x65B0_5EFA_96C5_96EF;
/// Format version written to, and required in, `sb.version`.
pub const VERSION: u16 = 1;

/// Copies kept of every double-buffered metadata record.
pub const META_INDEX_MAX: usize = 2;

/// Device offset of the superblock area.
pub const SB_OFF: u64 = 4096;
/// Size of the superblock area; the superblock CRC covers all of it.
pub const SB_SIZE: usize = PAGE_SIZE;

/// Device offset of the "cache_dev_info" area, reserved and unused in RFC v1.
pub const CACHE_DEV_INFO_OFF: u64 = SB_OFF + SB_SIZE as u64;
/// Size of one copy in the reserved "cache_dev_info" area.
pub const CACHE_DEV_INFO_SIZE: usize = PAGE_SIZE;
/// Stride of the reserved "cache_dev_info" area (two copies).
pub const CACHE_DEV_INFO_STRIDE: usize = CACHE_DEV_INFO_SIZE * META_INDEX_MAX;

/// Device offset of segment 0.
pub const SEGMENTS_OFF: u64 = CACHE_DEV_INFO_OFF + CACHE_DEV_INFO_STRIDE as u64;
/// Size of one segment, the allocation unit of the cache device.
pub const SEG_SIZE: u64 = 16 * 1024 * 1024;
/// Size of one segment-info copy; two copies open every segment.
pub const SEG_INFO_SIZE: usize = PAGE_SIZE;
/// Size of one backing-device-info copy.
pub const BACKING_DEV_INFO_SIZE: usize = PAGE_SIZE;

/// Smallest device that can be formatted.
pub const CACHE_DEV_SIZE_MIN: u64 = 512 * 1024 * 1024;

/// Segment 0 holds the backing-device table.
pub const BACKING_DEV_INFO_SEG_ID: u32 = 0;

/// Largest number of cache devices the RFC kernel registers at once.
pub const CACHE_DEV_MAX: u32 = 1024;
/// Length of the on-media path buffer, NUL terminator included.
pub const PATH_LEN: usize = 256;
/// Partition bits of the RFC's `/dev/pcacheN` minors.
pub const PART_SHIFT: u32 = 4;

/// `sb.seg_num` is 16 bits wide: larger devices are formatted with this many
/// segments and the rest of the device is left unused.
pub const SEG_NUM_MAX: u16 = u16::MAX;

/// Smallest GC watermark, in percent of a cache's segments in use.
pub const CACHE_GC_PERCENT_MIN: u16 = 0;
/// Largest GC watermark.
pub const CACHE_GC_PERCENT_MAX: u16 = 90;
/// GC watermark of a new cache.
pub const CACHE_GC_PERCENT_DEFAULT: u16 = 70;

/// Largest number of queues of a cache. A queue is one open kset and one
/// data head, so that writers append in parallel (the RFC's `paral`).
pub const QUEUES_MAX: u32 = 128;
/// A cache needs at least this many segments per queue.
pub const SEGS_PER_QUEUE: u32 = 10;

/// The index is partitioned into slices of this size; no key crosses one.
pub const CACHE_SUBTREE_SIZE: u64 = 4 * 1024 * 1024;
/// Mask of an offset inside its slice.
pub const CACHE_SUBTREE_SIZE_MASK: u64 = CACHE_SUBTREE_SIZE - 1;
/// `off >> CACHE_SUBTREE_SHIFT` is the slice of `off`.
pub const CACHE_SUBTREE_SHIFT: u32 = 22;

/// Keys per kset.
pub const KSET_KEYS_MAX: usize = 128;
/// Largest number of segments in one cache.
pub const CACHE_SEGS_MAX: u32 = 1 << 20;

/// Size of a kset header, of a LAST kset and of a terminator.
pub const KSET_HEADER_SIZE: usize = 24;
/// Size of one on-media key.
pub const KEY_SIZE: usize = 40;
/// Size of the largest kset.
pub const KSET_ONMEDIA_SIZE_MAX: usize = KSET_HEADER_SIZE + KSET_KEYS_MAX * KEY_SIZE;
/// Kset magic.
pub const KSET_MAGIC: u64 = 0x6768_94a6_4e16_4f1a;

/// Offset of the control page inside a cache segment.
pub const CACHE_SEG_CTRL_OFF: u64 = (SEG_INFO_SIZE * META_INDEX_MAX) as u64;
/// Size of the control page.
pub const CACHE_SEG_CTRL_SIZE: usize = PAGE_SIZE;
/// Offset of the data area inside a cache segment.
pub const CACHE_SEG_DATA_OFF: u64 = CACHE_SEG_CTRL_OFF + CACHE_SEG_CTRL_SIZE as u64;
/// Size of the data area of a cache segment.
pub const CACHE_SEG_DATA_SIZE: u32 = (SEG_SIZE - CACHE_SEG_DATA_OFF) as u32;

/// Offset of the data area (the backing table) inside the meta segment.
pub const META_SEG_DATA_OFF: u64 = (SEG_INFO_SIZE * META_INDEX_MAX) as u64;
/// Distance between two backing-table entries (two 4 KiB copies each).
pub const META_ENTRY_STRIDE: u64 = (BACKING_DEV_INFO_SIZE * META_INDEX_MAX) as u64;
/// Entries in the backing table.
pub const META_ENTRIES: u32 = ((SEG_SIZE - META_SEG_DATA_OFF) / META_ENTRY_STRIDE) as u32;

/// Distance between the two copies of a generation record or a tail.
pub const SMALL_RECORD_SIZE: usize = 16;
/// Offset of `key_tail_pos[0]` inside cache segment 0's control page.
pub const KEY_TAIL_OFF: usize = 544;
/// Offset of `dirty_tail_pos[0]` inside cache segment 0's control page.
pub const DIRTY_TAIL_OFF: usize = KEY_TAIL_OFF + 2 * SMALL_RECORD_SIZE;

/// Stale keys removed from the index per lock hold.
pub const CLEAN_KEYS_MAX: usize = 10;
/// Period of the RFC's writeback and GC workers.
pub const WORKER_INTERVAL: Duration = Duration::from_secs(5);
/// An open kset is closed at most this long after its first key.
pub const KSET_FLUSH_DELAY: Duration = Duration::from_secs(1);

// Two entries of spec §2.1 are deliberately absent: the RFC's segment wait
// (a 100 × 100 µs busy-wait before a segment allocation fails; writers here
// sleep on a condition variable until writeback and GC free a segment) and
// the logic_dev queue limits (kernel block-layer settings; the NBD front end
// advertises its own block sizes). Neither affects a byte on the media.

static_assertions::const_assert_eq!(SEGMENTS_OFF, 0x4000);
static_assertions::const_assert_eq!(CACHE_SEG_DATA_OFF, 0x3000);
static_assertions::const_assert_eq!(CACHE_SEG_DATA_SIZE, 16_764_928);
static_assertions::const_assert_eq!(META_ENTRIES, 2047);
static_assertions::const_assert_eq!(KSET_ONMEDIA_SIZE_MAX, 5144);
static_assertions::const_assert_eq!(KEY_TAIL_OFF, 0x220);
static_assertions::const_assert_eq!(DIRTY_TAIL_OFF, 0x240);
