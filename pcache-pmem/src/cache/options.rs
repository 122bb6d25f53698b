//! What a caller hands the engine and what it gets back: the options of a
//! start, its report, the counters and the health of a running cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pcache_format::{SEG_SIZE, SEGS_PER_QUEUE};

use super::index::Delta;
use super::load::{LogPos, ReplayStats};
use super::shard::Sharded;

/// How to start a cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// Size of a new cache in bytes (rounded up to 16 MiB segments); `None`
    /// sizes it for the backing device ([`default_cache_segs`]). An existing
    /// cache keeps its size.
    pub cache_size: Option<u64>,
    /// Queues: how many writers append in parallel, each queue one open
    /// kset and one data head (1..=[`pcache_format::QUEUES_MAX`];
    /// the cache needs 10 segments per queue).
    pub queues: u32,
    /// Keep a CRC of every key's data and verify it on read hits. An
    /// existing cache keeps its setting.
    pub data_crc: bool,
    /// GC watermark in percent (0..=90); `None` keeps the stored value (70
    /// for a new cache).
    pub gc_percent: Option<u16>,
    /// An open kset is closed at most this long after its first key.
    pub kset_flush_delay: Duration,
    /// Run writeback and GC in background threads. Without them nothing is
    /// written back or reclaimed unless [`Cache::write_back`] and
    /// [`Cache::gc`] are called (what `detach` and some tests do).
    pub background: bool,
    /// Limit writeback to this many bytes a second (`None`: as fast as the
    /// backing device takes them).
    pub writeback_rate: Option<u64>,
    /// A writer waiting for free space gives up after writeback has failed
    /// for this long without a segment being freed.
    pub stall_timeout: Duration,
    /// Verify the engine's invariants after every GC step (slow; for tests).
    pub self_check: bool,
    /// Cache what read misses fetch from the backing device (default on).
    /// Off, the cache holds only written data.
    pub cache_reads: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            cache_size: None,
            queues: 1,
            data_crc: false,
            gc_percent: None,
            kset_flush_delay: pcache_format::KSET_FLUSH_DELAY,
            background: true,
            writeback_rate: None,
            stall_timeout: Duration::from_secs(30),
            self_check: false,
            cache_reads: true,
        }
    }
}

/// What starting a cache found and decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartReport {
    /// Backing-table entry.
    pub id: u32,
    /// A new cache was created.
    pub new: bool,
    /// Segments in the cache.
    pub n_segs: u32,
    /// Data CRCs kept.
    pub data_crc: bool,
    /// GC watermark.
    pub gc_percent: u16,
    /// Queues (open ksets and data heads).
    pub queues: u32,
    /// Stored settings that override the options given, in words.
    pub notes: Vec<String>,
    /// What replay read.
    pub replay: ReplayStats,
    /// Keys in the index after replay.
    pub keys: u64,
}

/// Counters of a running cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Reads served wholly from the cache.
    pub full_hits: u64,
    /// Reads served partly from the cache.
    pub partial_hits: u64,
    /// Reads served wholly from the backing device.
    pub misses: u64,
    /// Bytes read from the cache.
    pub bytes_from_cache: u64,
    /// Bytes read from the backing device.
    pub bytes_from_backing: u64,
    /// Keys in the index.
    pub keys: u64,
    /// Bytes the index maps to cached data.
    pub cached_bytes: u64,
    /// Bytes of CLEAN keys in the index (filled by read misses).
    pub clean_bytes: u64,
    /// Bytes written to the cache and not yet written back.
    pub dirty_bytes: u64,
    /// Cache segments in use.
    pub segments_used: u32,
    /// Segments in the cache.
    pub segments: u32,
    /// Ksets closed since start.
    pub ksets_closed: u64,
    /// Ksets written back since start.
    pub ksets_written_back: u64,
    /// Bytes written to the backing device by writeback since start.
    pub bytes_written_back: u64,
    /// Ksets GC consumed since start.
    pub ksets_collected: u64,
    /// Segments reclaimed by GC since start.
    pub segments_freed: u64,
    /// Writeback attempts that failed (and were retried).
    pub writeback_errors: u64,
    /// Requests waiting, now, for writeback and GC to free a segment (a
    /// full cache; they fail when the cache stops).
    pub space_waiters: u32,
    /// Bytes of `write_zeroes` done on the backing device alone, costing no
    /// pmem (ranges the cache held nothing of), since start.
    pub zeroed_on_backing: u64,
}

/// Errors of the background work, in words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The last writeback error, while writeback keeps failing.
    pub writeback_failing: Option<String>,
    /// An error that stopped writeback until the cache is restarted.
    pub writeback_stopped: Option<String>,
    /// An error that stopped GC until the cache is restarted.
    pub gc_stopped: Option<String>,
}

/// The live counters behind [`Stats`], updated by every role. Those bumped
/// on every request are sharded by thread; the rest are plain atomics.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) full_hits: Sharded,
    pub(super) partial_hits: Sharded,
    pub(super) misses: Sharded,
    pub(super) bytes_from_cache: Sharded,
    pub(super) bytes_from_backing: Sharded,
    pub(super) keys: Sharded,
    pub(super) dirty_bytes: Sharded,
    pub(super) clean_bytes: Sharded,
    pub(super) ksets_closed: Sharded,
    /// Bytes of dirty keys appended and not yet written back.
    pub(super) dirty_pending: Sharded,
    pub(super) ksets_written_back: AtomicU64,
    pub(super) bytes_written_back: AtomicU64,
    pub(super) ksets_collected: AtomicU64,
    pub(super) segments_freed: AtomicU64,
    pub(super) writeback_errors: AtomicU64,
    pub(super) zeroed_on_backing: AtomicU64,
}

impl Counters {
    /// Applies the index changes `d`.
    pub(super) fn apply(&self, d: &Delta) {
        if d.keys != 0 {
            self.keys.add(d.keys);
        }
        if d.dirty_bytes != 0 {
            self.dirty_bytes.add(d.dirty_bytes);
        }
        if d.clean_bytes != 0 {
            self.clean_bytes.add(d.clean_bytes);
        }
    }

    /// The counters as a caller sees them.
    pub(super) fn snapshot(&self, segments_used: u32, segments: u32, space_waiters: u32) -> Stats {
        Stats {
            full_hits: self.full_hits.count(),
            partial_hits: self.partial_hits.count(),
            misses: self.misses.count(),
            bytes_from_cache: self.bytes_from_cache.count(),
            bytes_from_backing: self.bytes_from_backing.count(),
            keys: self.keys.count(),
            cached_bytes: self.dirty_bytes.count() + self.clean_bytes.count(),
            clean_bytes: self.clean_bytes.count(),
            dirty_bytes: self.dirty_pending.count(),
            segments_used,
            segments,
            ksets_closed: self.ksets_closed.count(),
            ksets_written_back: self.ksets_written_back.load(Ordering::Relaxed),
            bytes_written_back: self.bytes_written_back.load(Ordering::Relaxed),
            ksets_collected: self.ksets_collected.load(Ordering::Relaxed),
            segments_freed: self.segments_freed.load(Ordering::Relaxed),
            writeback_errors: self.writeback_errors.load(Ordering::Relaxed),
            space_waiters,
            zeroed_on_backing: self.zeroed_on_backing.load(Ordering::Relaxed),
        }
    }

    /// Bytes of dirty keys not yet written back.
    pub(super) fn dirty_pending(&self) -> u64 {
        self.dirty_pending.count()
    }
}

/// What a read-only replay of a cache finds: the live keys, after later
/// keys have overwritten earlier ones and stale keys are dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSummary {
    /// Live dirty keys (not yet written back).
    pub dirty_keys: u64,
    /// Live clean keys.
    pub clean_keys: u64,
    /// Bytes of live dirty keys.
    pub dirty_bytes: u64,
    /// Bytes of live clean keys.
    pub clean_bytes: u64,
    /// Cache segments in use.
    pub segments_used: u32,
    /// Where the next kset goes.
    pub key_head: LogPos,
    /// What replay read.
    pub replay: ReplayStats,
}

/// Segments for a new cache of a backing device of `dev_size` bytes when
/// no size is asked for: enough to hold all of it (16 MiB segments, rounded
/// up) plus an eighth for its key log and GC's headroom, at least 10 per
/// queue, and no more than `free`. A small backing no longer takes every
/// free segment of the device from the caches after it.
pub fn default_cache_segs(dev_size: u64, queues: u32, free: u32) -> u32 {
    let data = dev_size.div_ceil(SEG_SIZE);
    let want = data + data.div_ceil(8) + 2;
    let min = u64::from(SEGS_PER_QUEUE) * u64::from(queues.max(1));
    u32::try_from(want.max(min)).unwrap_or(u32::MAX).min(free)
}
