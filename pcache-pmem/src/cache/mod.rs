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
//!                      as CLEAN keys behind EMPTY placeholders
//! ```
//!
//! Durability contract: a write is acknowledged once its data is durable
//! and its key is in an open kset; the key is durable once that kset
//! closes. After [`Cache::flush`], or a FUA write, every write acknowledged
//! before it survives any crash.

mod bg;
pub mod detach;
pub mod dev;
pub mod index;
pub mod load;
pub mod repair;

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pcache_format::{
    BackingDevInfo, CACHE_GC_PERCENT_DEFAULT, CACHE_GC_PERCENT_MAX, CACHE_PARAL_MAX, CACHE_SEG_DATA_SIZE,
    CACHE_SEGS_EACH_PARAL, CACHE_SUBTREE_SHIFT, CACHE_SUBTREE_SIZE, CacheFlags, CacheInfo, CachePos, CacheSegGen,
    DIRTY_TAIL_OFF, KEY_TAIL_OFF, KSET_HEADER_SIZE, KSET_KEYS_MAX, Key, KeyFlags, SEG_SIZE, SegmentInfo, TERMINATOR,
    encode_kset, encode_last, kset_size,
};

pub use detach::{
    DamagedKset, DetachReport, DiscardReport, LostExtent, SalvageReport, detach, detach_salvage, discard,
};
pub use dev::{CacheDev, Entry};
pub use index::IKey;
pub use load::{LogPos, ReplayStats};

use crate::backing::{BackingDev, BackingError};
use crate::pmem::{AsMedia, Pmem, PmemError};
use crate::records::{write_record, write_record_both};
use index::{CLEAN, Delta, Piece, Slice};

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pmem device failed.
    #[error(transparent)]
    Pmem(#[from] PmemError),
    /// The backing device failed.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// On-media metadata is damaged; nothing was changed.
    #[error("damaged cache metadata: {0}")]
    Corrupt(String),
    /// A request outside the backing device.
    #[error("request of {len} bytes at offset {off} is outside the {size}-byte device")]
    OutOfRange {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// No free cache segment.
    #[error("the cache is full: no free segment")]
    CacheFull,
    /// Cached data does not match its CRC; the read fails rather than
    /// return corrupt data.
    #[error(
        "cached data for backing offset {off} ({len} bytes) fails its CRC (stored {stored:#010x}, computed {computed:#010x})"
    )]
    DataCrc {
        /// Backing offset of the key.
        off: u64,
        /// Its length.
        len: u32,
        /// CRC stored in the key.
        stored: u32,
        /// CRC of the data read.
        computed: u32,
    },
    /// All 2047 backing entries are in use.
    #[error("the backing table is full (2047 entries in use)")]
    TableFull,
    /// Not enough free segments for a new cache.
    #[error("a cache of {need} segments does not fit: {free} segments are free")]
    NoSpace {
        /// Segments asked for.
        need: u32,
        /// Segments free.
        free: u32,
    },
    /// This process already runs a cache for the backing device.
    #[error("a cache for {} is already started", path.display())]
    AlreadyStarted {
        /// The backing path.
        path: PathBuf,
    },
    /// The backing device is smaller than when its cache was created.
    #[error("{} holds {found} bytes, less than the {expected} bytes its cache was created for", path.display())]
    BackingShrunk {
        /// The backing path.
        path: PathBuf,
        /// Its size now.
        found: u64,
        /// Its size at creation.
        expected: u64,
    },
    /// An option out of range.
    #[error("{0}")]
    InvalidOption(String),
    /// The cache is full and cannot free space: writeback or GC cannot
    /// make progress.
    #[error("the cache is full and cannot free space: {0}")]
    Stalled(String),
    /// The cache was stopped.
    #[error("the cache is stopped")]
    Stopped,
    /// A new cache was asked for while the device holds a cache whose
    /// entry was lost (or a damaged entry): that cache may be this backing
    /// device's, with data not yet written back, so none is created over it.
    #[error("{0}")]
    LostCache(String),
    /// The device holds no cache for this backing device.
    #[error("no cache for {} on this device", path.display())]
    NoCache {
        /// The backing path.
        path: PathBuf,
    },
}

/// How to start a cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// Size of a new cache in bytes (rounded up to 16 MiB segments); `None`
    /// sizes it for the backing device ([`default_cache_segs`]). An existing
    /// cache keeps its size.
    pub cache_size: Option<u64>,
    /// Ksets and data heads: how many writers append in parallel (1..=128;
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
    /// Ksets and data heads.
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

#[derive(Debug, Default)]
struct Counters {
    full_hits: AtomicU64,
    partial_hits: AtomicU64,
    misses: AtomicU64,
    bytes_from_cache: AtomicU64,
    bytes_from_backing: AtomicU64,
    keys: AtomicI64,
    dirty_bytes: AtomicI64,
    clean_bytes: AtomicI64,
    ksets_closed: AtomicU64,
    /// Bytes of dirty keys appended and not yet written back.
    dirty_pending: AtomicI64,
    ksets_written_back: AtomicU64,
    bytes_written_back: AtomicU64,
    ksets_collected: AtomicU64,
    segments_freed: AtomicU64,
    writeback_errors: AtomicU64,
}

impl Counters {
    fn apply(&self, d: &Delta) {
        if d.keys != 0 {
            self.keys.fetch_add(d.keys, Ordering::Relaxed);
        }
        if d.dirty_bytes != 0 {
            self.dirty_bytes.fetch_add(d.dirty_bytes, Ordering::Relaxed);
        }
        if d.clean_bytes != 0 {
            self.clean_bytes.fetch_add(d.clean_bytes, Ordering::Relaxed);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A kset being filled in memory.
#[derive(Debug, Default)]
struct OpenKset {
    keys: Vec<Key>,
    /// Number of closes so far: a key appended when this was `n` is durable
    /// once it exceeds `n`.
    closes: u64,
    first_key_at: Option<Instant>,
}

/// Where the next allocation of a data head goes.
#[derive(Debug, Default)]
struct DataHead {
    seg: Option<u32>,
    off: u32,
}

#[derive(Debug)]
struct SegMap {
    used: Vec<bool>,
    count: u32,
    hint: u32,
}

/// A read miss being filled; readers of the same range wait for it.
#[derive(Debug, Default)]
struct Fill {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Fill {
    fn finish(&self) {
        *lock(&self.done) = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Inner<P, B> {
    dev: Arc<CacheDev<P>>,
    backing: B,
    id: u32,
    n_segs: u32,
    data_crc: bool,
    dev_size: u64,
    dev_segs: Vec<u32>,
    gens: Vec<AtomicU64>,
    refs: Vec<AtomicU32>,
    seg_map: Mutex<SegMap>,
    slices: Vec<Mutex<Slice>>,
    fills: Mutex<HashMap<u32, Arc<Fill>>>,
    next_fill: AtomicU32,
    ksets: Vec<Mutex<OpenKset>>,
    key_head: Mutex<LogPos>,
    heads: Vec<Mutex<DataHead>>,
    next_head: AtomicUsize,
    /// The end of the closed ksets, published after each close so that
    /// writeback and GC never wait for a close in progress.
    log_end: AtomicU64,
    key_tail: Mutex<LogPos>,
    dirty_tail: Mutex<LogPos>,
    /// Held by writeback for a whole batch, the only mover of the dirty
    /// tail; `dirty_tail` itself is held only to read or publish it, so
    /// GC is never held up by backing writes.
    writeback: Mutex<()>,
    gc_percent: AtomicU32,
    flush_delay: Duration,
    background: bool,
    writeback_rate: Option<u64>,
    stall_timeout: Duration,
    self_check: bool,
    cache_reads: bool,
    stats: Counters,
    health: Mutex<BgHealth>,
    stopping: AtomicBool,
    /// Requests inside the public entry points; `stop` waits for them.
    inflight: AtomicUsize,
    /// Wakes the flusher and the background workers.
    wake: Event,
    /// Signalled with `seg_map` when a segment is freed.
    seg_freed: Condvar,
}

/// Background errors.
#[derive(Debug, Default)]
struct BgHealth {
    writeback_failing_since: Option<Instant>,
    writeback_last_error: Option<String>,
    writeback_stopped: Option<String>,
    gc_stopped: Option<String>,
}

/// A wake-up signal with a generation count, so that a worker that was
/// busy when it fired still sees it.
#[derive(Debug, Default)]
struct Event {
    gen_: Mutex<u64>,
    cv: Condvar,
}

impl Event {
    fn notify(&self) {
        *lock(&self.gen_) += 1;
        self.cv.notify_all();
    }

    fn current(&self) -> u64 {
        *lock(&self.gen_)
    }

    /// Waits until notified after `seen`, or `timeout`.
    fn wait(&self, seen: u64, timeout: Duration) {
        let g = lock(&self.gen_);
        if *g == seen {
            let _ = self.cv.wait_timeout(g, timeout);
        }
    }
}

fn pack(p: LogPos) -> u64 {
    (u64::from(p.0) << 32) | u64::from(p.1)
}

fn unpack(v: u64) -> LogPos {
    ((v >> 32) as u32, v as u32)
}

/// A running cache of one backing device.
pub struct Cache<P: Pmem + 'static, B: BackingDev + 'static> {
    inner: Arc<Inner<P, B>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl<P: Pmem, B: BackingDev> std::fmt::Debug for Cache<P, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("id", &self.inner.id)
            .field("path", &self.inner.backing.path())
            .field("n_segs", &self.inner.n_segs)
            .finish_non_exhaustive()
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

/// Replays the cache of backing entry `info` without changing anything
/// (for `pcache inspect`).
pub fn summarize<P: Pmem + ?Sized>(
    pmem: &P,
    layout: &pcache_format::Layout,
    info: &BackingDevInfo,
) -> Result<CacheSummary, EngineError> {
    let sectors = info.dev_size.get();
    let dev_size = if sectors == 0 { u64::MAX } else { sectors.saturating_mul(512) };
    let loaded = load::load(pmem, layout, info, dev_size)?;
    let mut s = CacheSummary {
        segments_used: loaded.used.iter().filter(|u| **u).count() as u32,
        key_head: loaded.key_head,
        replay: loaded.replay,
        ..Default::default()
    };
    for (_, k) in loaded.slices.values().flat_map(|slice| slice.iter()) {
        if k.is_dirty() {
            s.dirty_keys += 1;
            s.dirty_bytes += u64::from(k.len);
        } else {
            s.clean_keys += 1;
            s.clean_bytes += u64::from(k.len);
        }
    }
    Ok(s)
}

/// An error about the key log at `at`.
fn format_err_at(at: LogPos, what: impl std::fmt::Display) -> EngineError {
    load::corrupt(at, what)
}

fn data_err(e: pcache_format::Error) -> EngineError {
    EngineError::Corrupt(e.to_string())
}

/// Initialises a new cache's segments, tails and log, then its backing
/// entry last: a crash before the entry is written leaves the segments
/// unclaimed, and they are free again at the next open.
fn create<P: Pmem>(dev: &CacheDev<P>, segs: &[u32]) -> Result<(), EngineError> {
    let pmem = dev.pmem();
    let layout = dev.layout();
    // Both copies of every record are written, so that whatever the
    // segments held before (another cache, a filesystem) leaves no stale
    // copy behind.
    for (i, &seg) in segs.iter().enumerate() {
        let info = SegmentInfo::data(seg, segs.get(i + 1).copied());
        write_record_both(pmem, layout.seg_info_offset(seg).map_err(data_err)?, &info)?;
        write_record_both(pmem, layout.ctrl_offset(seg).map_err(data_err)?, &CacheSegGen::new(0))?;
    }
    let ctrl = layout.ctrl_offset(segs[0]).map_err(data_err)?;
    pmem.copy_persist(layout.data_offset(segs[0]).map_err(data_err)?, &TERMINATOR)?;
    let start = CachePos::new(0, 0);
    write_record_both(pmem, ctrl + DIRTY_TAIL_OFF as u64, &start)?;
    write_record_both(pmem, ctrl + KEY_TAIL_OFF as u64, &start)?;
    Ok(())
}

/// Segments for a new cache of a backing device of `dev_size` bytes when
/// no size is asked for: enough to hold all of it (16 MiB segments, rounded
/// up) plus an eighth for its key log and GC's headroom, at least 10 per
/// queue, and no more than `free`. A small backing no longer takes every
/// free segment of the device from the caches after it.
pub fn default_cache_segs(dev_size: u64, queues: u32, free: u32) -> u32 {
    let data = dev_size.div_ceil(SEG_SIZE);
    let want = data + data.div_ceil(8) + 2;
    let min = u64::from(CACHE_SEGS_EACH_PARAL) * u64::from(queues.max(1));
    u32::try_from(want.max(min)).unwrap_or(u32::MAX).min(free)
}

thread_local! {
    static HEAD_HINT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

impl<P: Pmem + 'static, B: BackingDev + 'static> Cache<P, B> {
    /// Starts the cache of `backing` on `dev`: finds its backing-table entry
    /// by path (or takes a free one and creates the cache), loads and
    /// replays it, and starts the kset flusher.
    pub fn start(
        dev: Arc<CacheDev<P>>,
        backing: B,
        opts: &CacheOptions,
    ) -> Result<(Arc<Self>, StartReport), EngineError> {
        if opts.queues == 0 || opts.queues > CACHE_PARAL_MAX {
            return Err(EngineError::InvalidOption(format!(
                "queues {} out of range (1..={CACHE_PARAL_MAX})",
                opts.queues
            )));
        }
        if let Some(gc) = opts.gc_percent.filter(|gc| *gc > CACHE_GC_PERCENT_MAX) {
            return Err(EngineError::InvalidOption(format!(
                "gc_percent {gc} out of range (0..={CACHE_GC_PERCENT_MAX})"
            )));
        }
        let path = backing.path().to_path_buf();
        let path_bytes = path.as_os_str().as_bytes();
        if path_bytes.is_empty() || path_bytes.len() >= pcache_format::PATH_LEN {
            return Err(EngineError::InvalidOption(format!(
                "backing path {} is longer than {} bytes",
                path.display(),
                pcache_format::PATH_LEN - 1
            )));
        }
        if backing.size() < 512 {
            return Err(EngineError::InvalidOption(format!(
                "backing device {} holds {} bytes: nothing to cache (it needs at least one 512-byte sector)",
                path.display(),
                backing.size()
            )));
        }
        let found = dev.find_entry(&path, backing.identity())?;
        let id = match found {
            Ok((id, _)) | Err(id) => id,
        };
        if !dev.claim(id) {
            return Err(EngineError::AlreadyStarted { path });
        }
        let started = Self::start_claimed(&dev, backing, opts, id, found.ok().map(|(_, info)| info));
        if started.is_err() {
            dev.unclaim(id);
        }
        started
    }

    fn start_claimed(
        dev: &Arc<CacheDev<P>>,
        backing: B,
        opts: &CacheOptions,
        id: u32,
        existing: Option<BackingDevInfo>,
    ) -> Result<(Arc<Self>, StartReport), EngineError> {
        let path = backing.path().to_path_buf();
        let dev_size = backing.size();
        let sectors = dev_size / 512;
        let mut notes = Vec::new();
        let (info, new) = match existing {
            Some(mut info) => {
                let ci = info.cache_info;
                let stored_segs = ci.n_segs.get();
                if let Some(size) = opts.cache_size {
                    let asked = size.div_ceil(SEG_SIZE);
                    if asked != u64::from(stored_segs) {
                        notes.push(format!(
                            "cache size {} MiB asked for; the existing cache keeps its {} MiB",
                            asked * 16,
                            u64::from(stored_segs) * 16
                        ));
                    }
                }
                // Only what was asked for and is not granted is worth a note:
                // `data_crc: false` is the default, not a request.
                if opts.data_crc && !ci.data_crc() {
                    notes.push("data CRC on asked for; the existing cache keeps it off".to_string());
                }
                let stored_sectors = info.dev_size.get();
                if stored_sectors > sectors {
                    return Err(EngineError::BackingShrunk { path, found: dev_size, expected: stored_sectors * 512 });
                }
                // An entry written with one copy (by the RFC, or by an
                // earlier pcache) gets its second now: a damaged page must
                // never make it read as free.
                let media = AsMedia(dev.pmem());
                let pair = pcache_format::media::read_backing(&media, dev.layout(), id).map_err(dev::format_err)?;
                let mut changed = !pair.copies.iter().all(|c| c.valid());
                if stored_sectors != sectors {
                    info.dev_size = sectors.into();
                    changed = true;
                }
                if let Some(gc) = opts.gc_percent.filter(|gc| *gc != ci.gc_percent.get()) {
                    info.cache_info.gc_percent = gc.into();
                    changed = true;
                }
                if changed {
                    dev.write_entry(id, &info)?;
                }
                (info, false)
            }
            None => {
                if let Some(why) = dev.lost_cache() {
                    return Err(EngineError::LostCache(format!(
                        "no cache for {} is known, but {why}: it may be this device's, with data not yet written \
                         back, so no new cache is created; see `pcache check`, then `pcache repair`",
                        path.display()
                    )));
                }
                if backing.identity().is_some()
                    && let Some((old_id, old)) = dev
                        .backings()?
                        .into_iter()
                        .find(|(_, e)| e.dev_size.get() == sectors && !crate::backing::stored_path(e).exists())
                {
                    return Err(EngineError::LostCache(format!(
                        "no cache for {} is known, but backing entry {old_id} caches {}, which no longer exists and \
                         had the same size: if {} is that device under a new name, run `pcache rename DEVICE \
                         --backing {} --to {}`; if that device is gone for good, drop its cache first with \
                         `pcache detach DEVICE --backing {} --discard` (its dirty data is lost)",
                        path.display(),
                        String::from_utf8_lossy(old.path()),
                        path.display(),
                        String::from_utf8_lossy(old.path()),
                        path.display(),
                        String::from_utf8_lossy(old.path()),
                    )));
                }
                let free = dev.free_segments();
                let n = match opts.cache_size {
                    Some(size) => u32::try_from(size.div_ceil(SEG_SIZE)).unwrap_or(u32::MAX),
                    None => default_cache_segs(dev_size, opts.queues, free),
                };
                let min = CACHE_SEGS_EACH_PARAL * opts.queues;
                if n < min {
                    return Err(EngineError::InvalidOption(format!(
                        "a cache of {n} segments is too small for {} queue(s): at least {min} segments ({} MiB) are needed",
                        opts.queues,
                        u64::from(min) * 16
                    )));
                }
                let segs = dev.alloc_segments(n).ok_or(EngineError::NoSpace { need: n, free })?;
                let flags = if opts.data_crc { CacheFlags::DATA_CRC } else { CacheFlags::empty() };
                let gc = opts.gc_percent.unwrap_or(CACHE_GC_PERCENT_DEFAULT);
                let made =
                    BackingDevInfo::running(id, path_bytes(&path), sectors, CacheInfo::new(segs[0], n, gc, flags))
                        .map_err(data_err)
                        .and_then(|info| {
                            create(dev, &segs)?;
                            dev.write_entry_both(id, &info)?;
                            Ok(info)
                        });
                match made {
                    Ok(info) => (info, true),
                    Err(e) => {
                        dev.release_segments(&segs);
                        return Err(e);
                    }
                }
            }
        };
        let ci = info.cache_info;
        let n_segs = ci.n_segs.get();
        let min = CACHE_SEGS_EACH_PARAL * opts.queues;
        if n_segs < min {
            return Err(EngineError::InvalidOption(format!(
                "the cache has {n_segs} segments, too few for {} queue(s) (10 segments each)",
                opts.queues
            )));
        }
        let loaded = load::load(dev.pmem(), dev.layout(), &info, dev_size)?;
        let n_slices = dev_size.div_ceil(CACHE_SUBTREE_SIZE) as usize;
        let mut slices: Vec<Mutex<Slice>> = (0..n_slices).map(|_| Mutex::new(Slice::default())).collect();
        for (idx, slice) in loaded.slices {
            if let Some(s) = slices.get_mut(idx as usize) {
                *s.get_mut().unwrap_or_else(|e| e.into_inner()) = slice;
            }
        }
        let count = loaded.used.iter().filter(|u| **u).count() as u32;
        let inner = Arc::new(Inner {
            dev: dev.clone(),
            backing,
            id,
            n_segs,
            data_crc: ci.data_crc(),
            dev_size,
            dev_segs: loaded.dev_segs,
            gens: loaded.gens.into_iter().map(AtomicU64::new).collect(),
            refs: loaded.refs.into_iter().map(AtomicU32::new).collect(),
            seg_map: Mutex::new(SegMap { used: loaded.used, count, hint: 0 }),
            slices,
            fills: Mutex::new(HashMap::new()),
            next_fill: AtomicU32::new(1),
            ksets: (0..opts.queues).map(|_| Mutex::new(OpenKset::default())).collect(),
            key_head: Mutex::new(loaded.key_head),
            heads: (0..opts.queues).map(|_| Mutex::new(DataHead::default())).collect(),
            next_head: AtomicUsize::new(0),
            log_end: AtomicU64::new(pack(loaded.key_head)),
            key_tail: Mutex::new(loaded.key_tail),
            dirty_tail: Mutex::new(loaded.dirty_tail),
            writeback: Mutex::new(()),
            gc_percent: AtomicU32::new(ci.gc_percent.get().into()),
            flush_delay: opts.kset_flush_delay,
            background: opts.background,
            writeback_rate: opts.writeback_rate,
            stall_timeout: opts.stall_timeout,
            self_check: opts.self_check,
            cache_reads: opts.cache_reads,
            stats: Counters::default(),
            health: Mutex::new(BgHealth::default()),
            stopping: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            wake: Event::default(),
            seg_freed: Condvar::new(),
        });
        inner.stats.apply(&loaded.delta);
        inner.stats.dirty_pending.store(loaded.dirty_pending as i64, Ordering::Relaxed);
        let report = StartReport {
            id,
            new,
            n_segs,
            data_crc: ci.data_crc(),
            gc_percent: ci.gc_percent.get(),
            queues: opts.queues,
            notes,
            replay: loaded.replay,
            keys: loaded.delta.keys.max(0) as u64,
        };
        let cache = Arc::new(Self { inner: inner.clone(), threads: Mutex::new(Vec::new()) });
        type Work<P, B> = fn(&Inner<P, B>);
        let mut workers: Vec<(&str, Work<P, B>)> = vec![("flush", Inner::flusher)];
        if opts.background {
            workers.push(("wb", Inner::writeback_worker));
            workers.push(("gc", Inner::gc_worker));
        }
        for (name, work) in workers {
            let inner = inner.clone();
            let t = std::thread::Builder::new()
                .name(format!("pcache-{name}-{id}"))
                .spawn(move || work(&inner))
                .map_err(|e| EngineError::InvalidOption(format!("cannot start a worker thread: {e}")))?;
            lock(&cache.threads).push(t);
        }
        Ok((cache, report))
    }

    /// Size of the backing device.
    pub fn size(&self) -> u64 {
        self.inner.dev_size
    }

    /// The backing device.
    pub fn backing(&self) -> &B {
        &self.inner.backing
    }

    /// The backing-table entry.
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// Writes `data` at `off`. On return the data is durable in pmem and its
    /// keys are in open ksets; with `fua`, those ksets are closed too, so the
    /// write survives any crash.
    pub fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), EngineError> {
        let _req = self.inner.enter(off, data.len() as u64)?;
        // With FUA, the ksets the keys went to, and their close counts.
        let mut closes = Vec::new();
        let mut done = 0usize;
        while done < data.len() {
            let at = off + done as u64;
            let slice_end = (at | (CACHE_SUBTREE_SIZE - 1)) + 1;
            let chunk = ((slice_end - at) as usize).min(data.len() - done);
            let (n, kset) = self.inner.write_piece(at, &data[done..done + chunk])?;
            if fua && !closes.contains(&kset) {
                closes.push(kset);
            }
            done += n;
        }
        self.inner.close_ksets_since(&closes)
    }

    /// Writes `len` zero bytes at `off` (through the cache, like a write).
    pub fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        let _req = self.inner.enter(off, len)?;
        let zeros = vec![0u8; len.min(CACHE_SUBTREE_SIZE) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write(off + done, &zeros[..n as usize], false)?;
            done += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Tells the cache the range's contents no longer matter: clean cached
    /// copies are dropped (dirty data still reaches the backing device).
    pub fn discard(&self, off: u64, len: u64) -> Result<(), EngineError> {
        let _req = self.inner.enter(off, len)?;
        let end = off + len;
        let mut at = off;
        while at < end {
            let slice_end = ((at | (CACHE_SUBTREE_SIZE - 1)) + 1).min(end);
            let mut d = Delta::default();
            lock(&self.inner.slices[(at >> CACHE_SUBTREE_SHIFT) as usize]).drop_clean(at, slice_end, &mut d);
            self.inner.stats.apply(&d);
            at = slice_end;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off`: hits from pmem, misses from the
    /// backing device (and cached). With data CRCs kept, a hit whose data
    /// fails its CRC fails the read.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let _req = self.inner.enter(off, buf.len() as u64)?;
        let (mut hit, mut missed) = (0u64, 0u64);
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let slice_end = (at | (CACHE_SUBTREE_SIZE - 1)) + 1;
            let chunk = ((slice_end - at) as usize).min(buf.len() - done);
            let (h, m) = self.inner.read_chunk(at, &mut buf[done..done + chunk])?;
            hit += h;
            missed += m;
            done += chunk;
        }
        let s = &self.inner.stats;
        s.bytes_from_cache.fetch_add(hit, Ordering::Relaxed);
        s.bytes_from_backing.fetch_add(missed, Ordering::Relaxed);
        let counter = match (hit > 0, missed > 0) {
            (true, false) => &s.full_hits,
            (true, true) => &s.partial_hits,
            _ => &s.misses,
        };
        if !buf.is_empty() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether all of `[off, off + len)` is cached, so that a read of it
    /// would not touch the backing device (a hint: the answer may change
    /// right after).
    pub fn is_cached(&self, off: u64, len: u64) -> bool {
        if self.inner.check_range(off, len).is_err() {
            return false;
        }
        let end = off + len;
        let mut at = off;
        while at < end {
            let slice_end = ((at | (CACHE_SUBTREE_SIZE - 1)) + 1).min(end);
            let mut pos = at;
            let slice = self.inner.slice(at);
            while pos < slice_end {
                match slice.covering(pos, pos + 1) {
                    Some((ts, k)) if !k.is_empty() && !self.inner.is_stale(&k) => pos = ts + u64::from(k.len),
                    _ => return false,
                }
            }
            at = slice_end;
        }
        true
    }

    /// Closes every open kset: every write acknowledged before the call is
    /// durable on return.
    pub fn flush(&self) -> Result<(), EngineError> {
        let _req = self.inner.enter(0, 0)?;
        self.inner.flush_all()
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let s = &self.inner.stats;
        let map = lock(&self.inner.seg_map);
        let get = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0) as u64;
        Stats {
            full_hits: s.full_hits.load(Ordering::Relaxed),
            partial_hits: s.partial_hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            bytes_from_cache: s.bytes_from_cache.load(Ordering::Relaxed),
            bytes_from_backing: s.bytes_from_backing.load(Ordering::Relaxed),
            keys: get(&s.keys),
            cached_bytes: get(&s.dirty_bytes) + get(&s.clean_bytes),
            clean_bytes: get(&s.clean_bytes),
            dirty_bytes: get(&s.dirty_pending),
            segments_used: map.count,
            segments: self.inner.n_segs,
            ksets_closed: s.ksets_closed.load(Ordering::Relaxed),
            ksets_written_back: s.ksets_written_back.load(Ordering::Relaxed),
            bytes_written_back: s.bytes_written_back.load(Ordering::Relaxed),
            ksets_collected: s.ksets_collected.load(Ordering::Relaxed),
            segments_freed: s.segments_freed.load(Ordering::Relaxed),
            writeback_errors: s.writeback_errors.load(Ordering::Relaxed),
        }
    }

    /// Errors of writeback and GC.
    pub fn health(&self) -> Health {
        let h = lock(&self.inner.health);
        Health {
            writeback_failing: h.writeback_failing_since.and(h.writeback_last_error.clone()),
            writeback_stopped: h.writeback_stopped.clone(),
            gc_stopped: h.gc_stopped.clone(),
        }
    }

    /// Sets the GC watermark (0..=90 percent of the cache's segments in
    /// use) and persists it in the backing entry.
    pub fn set_gc_percent(&self, percent: u16) -> Result<(), EngineError> {
        if percent > CACHE_GC_PERCENT_MAX {
            return Err(EngineError::InvalidOption(format!(
                "gc_percent {percent} out of range (0..={CACHE_GC_PERCENT_MAX})"
            )));
        }
        let inner = &self.inner;
        let mut info = inner.dev.read_entry(inner.id)?;
        info.cache_info.gc_percent = percent.into();
        inner.dev.write_entry(inner.id, &info)?;
        inner.gc_percent.store(percent.into(), Ordering::SeqCst);
        inner.wake.notify();
        Ok(())
    }

    /// The GC watermark.
    pub fn gc_percent(&self) -> u16 {
        self.inner.gc_percent.load(Ordering::SeqCst) as u16
    }

    /// Closes every kset, then writes every dirty key back to the backing
    /// device, `fdatasync`s it and persists the dirty tail. Returns the ksets
    /// written back. `progress` is called with (bytes written back, bytes
    /// dirty when the call began) as writeback goes.
    pub fn write_back(&self, mut progress: impl FnMut(u64, u64)) -> Result<u64, EngineError> {
        self.inner.flush_all()?;
        let total = self.inner.stats.dirty_pending.load(Ordering::Relaxed).max(0) as u64;
        let mut ksets = 0;
        loop {
            let n = self.inner.writeback_batch(usize::MAX)?;
            if n == 0 {
                return Ok(ksets);
            }
            ksets += n as u64;
            let left = self.inner.stats.dirty_pending.load(Ordering::Relaxed).max(0) as u64;
            progress(total.saturating_sub(left), total);
        }
    }

    /// Writes back at most `max` closed ksets (LAST ksets count), syncs the
    /// backing device and persists the dirty tail; returns how many.
    pub fn write_back_ksets(&self, max: usize) -> Result<usize, EngineError> {
        self.inner.writeback_batch(max)
    }

    /// Runs GC until it can reclaim nothing more (below the watermark, or
    /// at the dirty tail); returns the ksets consumed.
    pub fn gc(&self) -> Result<u64, EngineError> {
        let mut n = 0;
        while self.inner.gc_step()? {
            n += 1;
        }
        self.inner.clean_stale();
        Ok(n)
    }

    /// Checks the engine's invariants between GC steps: every indexed key
    /// that is not stale points at a segment in use that log keys still
    /// reference, and the tails and the log end lie in segments in use.
    /// Slices busy with requests are skipped. Returns the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.inner.check_invariants()
    }

    /// Stops the cache gracefully: stops the background threads and closes
    /// every kset. The cache stays on the device, warm for the next start
    /// (dirty data is written back then). Further requests fail.
    pub fn stop(&self) -> Result<(), EngineError> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.wake.notify();
        {
            let _map = lock(&self.inner.seg_map);
            self.inner.seg_freed.notify_all();
        }
        // Requests already past their entry check finish first, so that a
        // write acknowledged while the cache stops is in a closed kset too.
        // (Writers waiting for space see `stopping` and give up.)
        while self.inner.inflight.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        let r = self.inner.flush_all();
        self.inner.dev.unclaim(self.inner.id);
        r
    }
}

impl<P: Pmem + 'static, B: BackingDev + 'static> Drop for Cache<P, B> {
    fn drop(&mut self) {
        if !self.inner.stopping.load(Ordering::SeqCst) {
            let _ = self.stop();
        }
    }
}

/// A request in flight (see [`Inner::enter`]).
struct InflightGuard<'a>(&'a AtomicUsize);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn path_bytes(p: &std::path::Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

impl<P: Pmem, B: BackingDev> Inner<P, B> {
    fn pmem(&self) -> &P {
        self.dev.pmem()
    }

    /// Admits a request: counted in flight until the guard drops, refused
    /// once the cache stops or when the range passes the end.
    fn enter(&self, off: u64, len: u64) -> Result<InflightGuard<'_>, EngineError> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let guard = InflightGuard(&self.inflight);
        // SeqCst on both sides: either stop() sees this request in flight
        // and waits, or this request sees `stopping`.
        if self.stopping.load(Ordering::SeqCst) {
            return Err(EngineError::Stopped);
        }
        self.check_range(off, len)?;
        Ok(guard)
    }

    fn check_range(&self, off: u64, len: u64) -> Result<(), EngineError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(EngineError::Stopped);
        }
        match off.checked_add(len) {
            Some(end) if end <= self.dev_size => Ok(()),
            _ => Err(EngineError::OutOfRange { off, len, size: self.dev_size }),
        }
    }

    /// Device offset of `off` in the data area of cache segment `seg`.
    fn data_addr(&self, seg: u32, off: u32, len: u32) -> Result<u64, EngineError> {
        let dev_seg =
            *self.dev_segs.get(seg as usize).ok_or_else(|| EngineError::Corrupt(format!("cache segment {seg}")))?;
        self.dev.layout().data_range(dev_seg, off, len).map_err(data_err)
    }

    fn slice(&self, off: u64) -> MutexGuard<'_, Slice> {
        lock(&self.slices[(off >> CACHE_SUBTREE_SHIFT) as usize])
    }

    fn is_stale(&self, k: &IKey) -> bool {
        !k.is_empty() && k.seg_gen < self.gens[k.cache_seg as usize].load(Ordering::Acquire)
    }

    // ---- segments -------------------------------------------------------

    /// Takes a free cache segment. Data allocations leave one segment in
    /// reserve for the key log, so that ksets can always close and
    /// writeback can always see them. With no segment free, waits for
    /// writeback and GC to free one (they are woken), unless they are not
    /// running or cannot make progress.
    fn get_segment(&self, for_log: bool) -> Result<u32, EngineError> {
        let reserve = if for_log { 0 } else { 1 };
        let mut map = lock(&self.seg_map);
        loop {
            if let Some(s) = Self::take_segment(&mut map, self.n_segs, reserve) {
                drop(map);
                self.maybe_wake_gc();
                return Ok(s);
            }
            if self.stopping.load(Ordering::SeqCst) {
                return Err(EngineError::Stopped);
            }
            if !self.background {
                return Err(EngineError::CacheFull);
            }
            if let Some(why) = self.stalled() {
                return Err(EngineError::Stalled(why));
            }
            self.wake.notify();
            map = self.seg_freed.wait_timeout(map, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// A free data segment, without waiting.
    fn try_segment(&self) -> Option<u32> {
        let s = Self::take_segment(&mut lock(&self.seg_map), self.n_segs, 1)?;
        self.maybe_wake_gc();
        Some(s)
    }

    fn take_segment(map: &mut SegMap, n: u32, reserve: u32) -> Option<u32> {
        if n - map.count <= reserve {
            return None;
        }
        for i in 0..n {
            let s = (map.hint + i) % n;
            if !map.used[s as usize] {
                map.used[s as usize] = true;
                map.count += 1;
                map.hint = (s + 1) % n;
                return Some(s);
            }
        }
        None
    }

    /// Why waiting for a free segment is pointless, if it is.
    fn stalled(&self) -> Option<String> {
        let h = lock(&self.health);
        if let Some(e) = &h.writeback_stopped {
            return Some(format!("writeback stopped: {e}"));
        }
        if let Some(e) = &h.gc_stopped {
            return Some(format!("GC stopped: {e}"));
        }
        match (h.writeback_failing_since, &h.writeback_last_error) {
            (Some(since), Some(e)) if since.elapsed() >= self.stall_timeout => {
                Some(format!("writeback has failed for {} s: {e}", since.elapsed().as_secs()))
            }
            _ => None,
        }
    }

    /// Marks a segment free and wakes writers waiting for one.
    fn free_segment(&self, seg: u32) {
        let mut map = lock(&self.seg_map);
        if std::mem::replace(&mut map.used[seg as usize], false) {
            map.count -= 1;
        }
        self.seg_freed.notify_all();
    }

    fn get_ref(&self, seg: u32) {
        self.refs[seg as usize].fetch_add(1, Ordering::AcqRel);
    }

    /// Drops a reference; the last one invalidates the segment: its
    /// generation is bumped and persisted before the segment is free, so
    /// keys still pointing at it read as stale.
    fn put_ref(&self, seg: u32) -> Result<(), EngineError> {
        if self.refs[seg as usize].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.invalidate(seg)?;
        }
        Ok(())
    }

    fn invalidate(&self, seg: u32) -> Result<(), EngineError> {
        let g = self.gens[seg as usize].load(Ordering::Acquire) + 1;
        let ctrl = self.dev.layout().ctrl_offset(self.dev_segs[seg as usize]).map_err(data_err)?;
        write_record(self.pmem(), ctrl, &CacheSegGen::new(g))?;
        self.gens[seg as usize].store(g, Ordering::Release);
        self.free_segment(seg);
        self.stats.segments_freed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    // ---- data heads -----------------------------------------------------

    fn head_index(&self) -> usize {
        let n = self.heads.len();
        HEAD_HINT.with(|h| {
            let i = h.get().unwrap_or_else(|| {
                let i = self.next_head.fetch_add(1, Ordering::Relaxed);
                h.set(Some(i));
                i
            });
            i % n
        })
    }

    /// Allocates up to `len` bytes of data space (spec §2.9.5): the key may
    /// get less when its segment runs out. Takes a reference for the key.
    /// With `wait`, waits for free space when the cache is full.
    fn alloc_data(&self, len: u32, wait: bool) -> Result<(u32, u32, u64, u32), EngineError> {
        let mut head = lock(&self.heads[self.head_index()]);
        loop {
            if let Some(seg) = head.seg {
                let remain = CACHE_SEG_DATA_SIZE - head.off;
                let gen_ = self.gens[seg as usize].load(Ordering::Acquire);
                let off = head.off;
                if remain > len {
                    head.off += len;
                    self.get_ref(seg);
                    return Ok((seg, off, gen_, len));
                }
                head.off += remain;
                self.get_ref(seg);
                head.seg = None;
                // The head's own reference.
                self.put_ref(seg)?;
                return Ok((seg, off, gen_, remain));
            }
            let s = match self.try_segment() {
                Some(s) => s,
                None if !wait => return Err(EngineError::CacheFull),
                None => {
                    // Make the keys of open ksets visible to writeback, so
                    // that the data they hold can be written back and freed.
                    let _ = self.flush_all();
                    self.get_segment(false)?
                }
            };
            self.get_ref(s);
            head.seg = Some(s);
            head.off = 0;
        }
    }

    // ---- key log --------------------------------------------------------

    fn kset_index(&self, off: u64) -> usize {
        ((off >> CACHE_SUBTREE_SHIFT) % self.ksets.len() as u64) as usize
    }

    fn on_media_key(&self, off: u64, k: &IKey) -> Key {
        let flags = if k.flags & CLEAN != 0 { KeyFlags::CLEAN } else { KeyFlags::empty() };
        let mut key = Key::new(off, k.len, flags, k.cache_seg, k.seg_off, k.seg_gen);
        key.data_crc = k.crc.into();
        key
    }

    /// Appends a key to its kset (closing it when full) and returns the
    /// kset's index and close count at the append. Called under the slice lock.
    fn append(&self, off: u64, k: &IKey) -> Result<(usize, u64), EngineError> {
        let idx = self.kset_index(off);
        let mut kset = lock(&self.ksets[idx]);
        kset.keys.push(self.on_media_key(off, k));
        if kset.first_key_at.is_none() {
            kset.first_key_at = Some(Instant::now());
        }
        let closes = kset.closes;
        let dirty = if k.is_dirty() { i64::from(k.len) } else { 0 };
        self.stats.dirty_pending.fetch_add(dirty, Ordering::Relaxed);
        if kset.keys.len() == KSET_KEYS_MAX
            && let Err(e) = self.close(&mut kset)
        {
            kset.keys.pop();
            self.stats.dirty_pending.fetch_sub(dirty, Ordering::Relaxed);
            return Err(e);
        }
        Ok((idx, closes))
    }

    /// Writes the open kset at the key head (spec §2.9.6): the terminator
    /// after it is durable before the kset is written, so replay stops
    /// right after the newest kset; a segment without room for the kset and
    /// a LAST kset continues in a new segment.
    fn close(&self, kset: &mut OpenKset) -> Result<(), EngineError> {
        if kset.keys.is_empty() {
            return Ok(());
        }
        let size = kset_size(kset.keys.len());
        let mut buf = [0u8; pcache_format::KSET_ONMEDIA_SIZE_MAX];
        encode_kset(&kset.keys, &mut buf).map_err(data_err)?;
        let pmem = self.pmem();
        let mut head = lock(&self.key_head);
        let room = (CACHE_SEG_DATA_SIZE - head.1) as usize;
        if room < size + KSET_HEADER_SIZE {
            let next = self.get_segment(true)?;
            let chain = || -> Result<(), EngineError> {
                let next_start = self.data_addr(next, 0, KSET_HEADER_SIZE as u32)?;
                pmem.copy_persist(next_start, &TERMINATOR)?;
                let last = encode_last(next);
                pmem.copy_persist(self.data_addr(head.0, head.1, KSET_HEADER_SIZE as u32)?, &last)?;
                Ok(())
            };
            if let Err(e) = chain() {
                // The LAST kset pointing at the new segment was not written
                // (or not made durable): nothing refers to it; give it back.
                self.free_segment(next);
                return Err(e);
            }
            *head = (next, 0);
        }
        let terminator = self.data_addr(head.0, head.1 + size as u32, KSET_HEADER_SIZE as u32)?;
        if crate::mutation::active(crate::mutation::Mutation::NoFenceTerminator) {
            pmem.copy_nodrain(terminator, &TERMINATOR)?;
        } else {
            pmem.copy_persist(terminator, &TERMINATOR)?;
        }
        pmem.copy_persist(self.data_addr(head.0, head.1, size as u32)?, &buf[..size])?;
        head.1 += size as u32;
        self.log_end.store(pack(*head), Ordering::Release);
        drop(head);
        if kset.keys.iter().any(|k| k.is_dirty()) {
            self.wake.notify();
        }
        kset.keys.clear();
        kset.closes += 1;
        kset.first_key_at = None;
        self.stats.ksets_closed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush_all(&self) -> Result<(), EngineError> {
        for k in &self.ksets {
            self.close(&mut lock(k))?;
        }
        Ok(())
    }

    /// Closes each kset in `since` that has not closed since the append.
    fn close_ksets_since(&self, since: &[(usize, u64)]) -> Result<(), EngineError> {
        for &(idx, closes) in since {
            let mut kset = lock(&self.ksets[idx]);
            if kset.closes == closes {
                self.close(&mut kset)?;
            }
        }
        Ok(())
    }

    /// Closes ksets whose first key is older than the flush delay, until
    /// the cache stops.
    fn flusher(&self) {
        let tick = (self.flush_delay / 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
        loop {
            let seen = self.wake.current();
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            self.wake.wait(seen, tick);
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            for k in &self.ksets {
                let mut kset = lock(k);
                // Closed at the last tick before the delay runs out, so no
                // key waits longer than the delay for durability.
                if kset.first_key_at.is_some_and(|t| t.elapsed() + tick >= self.flush_delay) {
                    // A failure is retried on the next tick; flush() reports it.
                    let _ = self.close(&mut kset);
                }
            }
        }
    }

    // ---- write ----------------------------------------------------------

    /// Writes the first part of `data` (inside one slice) that fits one data
    /// allocation; returns its length, and the kset the key went to with its
    /// close count at the append.
    fn write_piece(&self, off: u64, data: &[u8]) -> Result<(usize, (usize, u64)), EngineError> {
        let (seg, seg_off, gen_, len) = self.alloc_data(data.len() as u32, true)?;
        let piece = &data[..len as usize];
        let stored = self.data_addr(seg, seg_off, len).and_then(|addr| Ok(self.pmem().copy_persist(addr, piece)?));
        if let Err(e) = stored {
            self.put_ref(seg)?;
            return Err(e);
        }
        let crc = if self.data_crc { pcache_format::crc::crc32(piece) } else { 0 };
        let key = IKey { seg_gen: gen_, len, cache_seg: seg, seg_off, crc, orig_delta: 0, orig_len: len, flags: 0 };
        let mut slice = self.slice(off);
        match self.append(off, &key) {
            Ok(c) => {
                let mut d = Delta::default();
                slice.insert(off, key, &mut d);
                drop(slice);
                self.stats.apply(&d);
                Ok((len as usize, c))
            }
            Err(e) => {
                drop(slice);
                self.put_ref(seg)?;
                Err(e)
            }
        }
    }

    // ---- read -----------------------------------------------------------

    /// Copies `out.len()` bytes of `key`'s data starting `skip` bytes into
    /// it; with data CRCs, verifies the key's whole extent as written.
    fn copy_hit(&self, off: u64, key: &IKey, skip: u32, out: &mut [u8]) -> Result<bool, EngineError> {
        let len = out.len() as u32;
        if self.data_crc {
            let start = key.seg_off - key.orig_delta;
            let mut whole = vec![0u8; key.orig_len as usize];
            self.pmem().read(self.data_addr(key.cache_seg, start, key.orig_len)?, &mut whole)?;
            std::sync::atomic::fence(Ordering::Acquire);
            if self.is_stale(key) {
                return Ok(false);
            }
            let computed = pcache_format::crc::crc32(&whole);
            if computed != key.crc {
                return Err(EngineError::DataCrc {
                    off: off - u64::from(skip) - u64::from(key.orig_delta),
                    len: key.orig_len,
                    stored: key.crc,
                    computed,
                });
            }
            let from = (key.orig_delta + skip) as usize;
            out.copy_from_slice(&whole[from..from + len as usize]);
        } else {
            self.pmem().read(self.data_addr(key.cache_seg, key.seg_off + skip, len)?, out)?;
            std::sync::atomic::fence(Ordering::Acquire);
            if self.is_stale(key) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads within one slice; returns (bytes from cache, bytes from backing).
    fn read_chunk(&self, off: u64, out: &mut [u8]) -> Result<(u64, u64), EngineError> {
        let end = off + out.len() as u64;
        // The common case: one live key covers the whole range.
        let covering = self.slice(off).covering(off, end).filter(|(_, k)| !k.is_empty() && !self.is_stale(k));
        if let Some((ts, key)) = covering
            && self.copy_hit(off, &key, (off - ts) as u32, out)?
        {
            return Ok((out.len() as u64, 0));
        }
        'retry: loop {
            let (pieces, mine) = {
                let mut slice = self.slice(off);
                let mut d = Delta::default();
                slice.drop_stale(off, end, |k| self.is_stale(k), &mut d);
                let pieces = slice.lookup(off, end);
                let mut mine = Vec::new();
                // Each miss gets a placeholder this reader fills, unless
                // read misses are not cached at all.
                let misses = if self.cache_reads { &pieces[..] } else { &[] };
                for p in misses {
                    if let Piece::Miss { off: m, len } = *p {
                        let id = self.next_fill.fetch_add(1, Ordering::Relaxed);
                        slice.insert(m, IKey::placeholder(len, id), &mut d);
                        lock(&self.fills).insert(id, Arc::new(Fill::default()));
                        mine.push((m, len, id));
                    }
                }
                self.stats.apply(&d);
                (pieces, mine)
            };
            let mut result = Ok((0u64, 0u64));
            let mut retry = false;
            let mut waits = Vec::new();
            for p in &pieces {
                match *p {
                    Piece::Hit { off: h, len, key, skip } => {
                        let at = (h - off) as usize;
                        match self.copy_hit(h, &key, skip, &mut out[at..at + len as usize]) {
                            Ok(true) => {
                                if let Ok((c, _)) = &mut result {
                                    *c += u64::from(len);
                                }
                            }
                            Ok(false) => retry = true,
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    Piece::Pending { id, .. } => {
                        // Waited for below, once this reader's own fills are
                        // done: a reader never waits while others wait for it.
                        waits.push(id);
                        retry = true;
                    }
                    Piece::Miss { off: m, len } => {
                        let at = (m - off) as usize;
                        match self.backing.read_at(m, &mut out[at..at + len as usize]) {
                            Ok(()) => {
                                if let Ok((_, b)) = &mut result {
                                    *b += u64::from(len);
                                }
                            }
                            Err(e) => {
                                result = Err(e.into());
                                break;
                            }
                        }
                    }
                }
            }
            // Cache what was read (or drop the placeholders on failure), then
            // wake readers waiting for these fills.
            for &(m, len, id) in &mine {
                if result.is_ok() {
                    let at = (m - off) as usize;
                    self.fill(m, &out[at..at + len as usize], id);
                }
                self.end_fill(m, id);
            }
            if retry && result.is_ok() {
                for id in waits {
                    let fill = lock(&self.fills).get(&id).cloned();
                    if let Some(fill) = fill {
                        fill.wait();
                    }
                }
                continue 'retry;
            }
            return result;
        }
    }

    /// Caches `data` read from the backing device for placeholder `id` at
    /// `off`, as CLEAN keys, as far as there is space and the placeholder
    /// has not been overwritten meanwhile.
    fn fill(&self, off: u64, data: &[u8], id: u32) {
        let mut done = 0usize;
        while done < data.len() {
            let at = off + done as u64;
            let Ok((seg, seg_off, gen_, got)) = self.alloc_data((data.len() - done) as u32, false) else { return };
            let piece = &data[done..done + got as usize];
            let stored = self.data_addr(seg, seg_off, got).and_then(|a| Ok(self.pmem().copy_persist(a, piece)?));
            let mut slice = self.slice(at);
            let current = slice.get(at).copied().filter(|k| k.is_empty() && k.cache_seg == id);
            let (Some(ph), Ok(())) = (current, stored) else {
                drop(slice);
                let _ = self.put_ref(seg);
                return;
            };
            let take = got.min(ph.len);
            let piece = &piece[..take as usize];
            let crc = if self.data_crc { pcache_format::crc::crc32(piece) } else { 0 };
            let key = IKey {
                seg_gen: gen_,
                len: take,
                cache_seg: seg,
                seg_off,
                crc,
                orig_delta: 0,
                orig_len: take,
                flags: CLEAN,
            };
            if self.append(at, &key).is_err() {
                drop(slice);
                let _ = self.put_ref(seg);
                return;
            }
            let mut d = Delta::default();
            slice.remove(at, &mut d);
            slice.insert(at, key, &mut d);
            if ph.len > take {
                let rest = IKey::placeholder(ph.len - take, id);
                slice.insert(at + u64::from(take), rest, &mut d);
            }
            drop(slice);
            self.stats.apply(&d);
            if take < got {
                // The placeholder was cut back by a write: nothing more to fill.
                return;
            }
            done += take as usize;
        }
    }

    /// Removes what is left of placeholder `id` and wakes its waiters.
    fn end_fill(&self, off: u64, id: u32) {
        {
            let mut slice = self.slice(off);
            let left: Vec<u64> = slice
                .overlapping(off, (off | (CACHE_SUBTREE_SIZE - 1)) + 1)
                .filter(|(_, k)| k.is_empty() && k.cache_seg == id)
                .map(|(o, _)| o)
                .collect();
            let mut d = Delta::default();
            for o in left {
                slice.remove(o, &mut d);
            }
        }
        if let Some(fill) = lock(&self.fills).remove(&id) {
            fill.finish();
        }
    }
}
