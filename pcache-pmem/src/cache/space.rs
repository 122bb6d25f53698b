//! The cache's space: which of its segments are in use, their generations
//! and the references keys hold on them, and the data heads that hand out
//! room for new data (spec §2.9.5). Space never waits on the key log: the
//! request path decides when to close the log and wait (see `io`).

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pcache_format::{CACHE_SEG_DATA_SIZE, CacheSegGen, Layout};

use super::ctx::{Ctx, lock};
use super::dev::CacheDev;
use super::error::EngineError;
use super::index::IKey;
use crate::pmem::Pmem;
use crate::records::write_record;

/// Which cache segments are in use.
#[derive(Debug)]
struct SegMap {
    used: Vec<bool>,
    count: u32,
    /// Where the search for a free segment starts.
    hint: u32,
    /// Requests waiting in [`Space::get_segment`] for a segment to be freed.
    waiting: u32,
}

/// Where the next allocation of a data head goes.
#[derive(Debug, Default)]
struct DataHead {
    seg: Option<u32>,
    off: u32,
}

/// Room for data handed out by a data head: `len` bytes at `off` in cache
/// segment `seg`, whose generation was `gen_`. It holds a reference on the
/// segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    pub(super) seg: u32,
    pub(super) off: u32,
    pub(super) gen_: u64,
    pub(super) len: u32,
}

/// Whether an allocation leaves the last free segment for the key log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum For {
    /// A data head: one segment stays in reserve, so that ksets can always
    /// close and writeback can always see them.
    Data,
    /// The key log.
    Log,
}

thread_local! {
    /// The data head of this thread, so that one writer's data stays together.
    static HEAD_HINT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The segments of one cache and the data heads that fill them.
#[derive(Debug)]
pub(super) struct Space<P> {
    dev: Arc<CacheDev<P>>,
    /// Device segment of each cache segment.
    dev_segs: Vec<u32>,
    gens: Vec<AtomicU64>,
    refs: Vec<AtomicU32>,
    map: Mutex<SegMap>,
    /// Signalled with `map` when a segment is freed.
    freed: Condvar,
    heads: Vec<Mutex<DataHead>>,
    next_head: AtomicUsize,
    gc_percent: AtomicU32,
}

impl<P: Pmem> Space<P> {
    /// The space of a loaded cache: `used` and `refs` as replay found them.
    pub(super) fn new(
        dev: Arc<CacheDev<P>>,
        dev_segs: Vec<u32>,
        gens: Vec<u64>,
        refs: Vec<u32>,
        used: Vec<bool>,
        queues: u32,
        gc_percent: u16,
    ) -> Self {
        let count = used.iter().filter(|u| **u).count() as u32;
        Self {
            dev,
            dev_segs,
            gens: gens.into_iter().map(AtomicU64::new).collect(),
            refs: refs.into_iter().map(AtomicU32::new).collect(),
            map: Mutex::new(SegMap { used, count, hint: 0, waiting: 0 }),
            freed: Condvar::new(),
            heads: (0..queues).map(|_| Mutex::new(DataHead::default())).collect(),
            next_head: AtomicUsize::new(0),
            gc_percent: AtomicU32::new(gc_percent.into()),
        }
    }

    pub(super) fn dev(&self) -> &Arc<CacheDev<P>> {
        &self.dev
    }

    pub(super) fn pmem(&self) -> &P {
        self.dev.pmem()
    }

    pub(super) fn layout(&self) -> &Layout {
        self.dev.layout()
    }

    /// Segments in the cache.
    pub(super) fn n_segs(&self) -> u32 {
        self.dev_segs.len() as u32
    }

    /// Device segment of each cache segment.
    pub(super) fn dev_segs(&self) -> &[u32] {
        &self.dev_segs
    }

    /// Device offset of `off` in the data area of cache segment `seg`.
    pub(super) fn data_addr(&self, seg: u32, off: u32, len: u32) -> Result<u64, EngineError> {
        let dev_seg =
            *self.dev_segs.get(seg as usize).ok_or_else(|| EngineError::Corrupt(format!("cache segment {seg}")))?;
        Ok(self.layout().data_range(dev_seg, off, len)?)
    }

    /// Stores cached data for a key not yet appended: durable on return on
    /// real pmem; on a device with [`Pmem::bulk_sync`] (an msync'd file)
    /// only stored, made durable with its key by the kset close's
    /// [`Pmem::sync_all`] (group commit: one `msync` for many writes).
    pub(super) fn put_data(&self, seg: u32, off: u32, data: &[u8]) -> Result<(), EngineError> {
        let at = self.data_addr(seg, off, data.len() as u32)?;
        if self.pmem().bulk_sync() {
            self.pmem().write(at, data)?;
        } else {
            self.pmem().copy_persist(at, data)?;
        }
        Ok(())
    }

    /// Device offset of the control page of the cache's first segment,
    /// where its tails live.
    pub(super) fn tail_addrs(&self) -> Result<(u64, u64), EngineError> {
        Ok(self.layout().tail_offsets(self.dev_segs[0])?)
    }

    /// The current generation of cache segment `seg`.
    pub(super) fn gen_of(&self, seg: u32) -> Option<u64> {
        self.gens.get(seg as usize).map(|g| g.load(Ordering::Acquire))
    }

    /// Whether `k` points at data of a segment reclaimed since.
    pub(super) fn is_stale(&self, k: &IKey) -> bool {
        !k.is_filling() && k.seg_gen < self.gens[k.cache_seg as usize].load(Ordering::Acquire)
    }

    /// Which segments are in use.
    pub(super) fn used(&self) -> Vec<bool> {
        lock(&self.map).used.clone()
    }

    /// How many segments are in use.
    pub(super) fn used_count(&self) -> u32 {
        lock(&self.map).count
    }

    /// Requests waiting for a segment to be freed, now.
    pub(super) fn waiting_count(&self) -> u32 {
        lock(&self.map).waiting
    }

    pub(super) fn gc_percent(&self) -> u16 {
        self.gc_percent.load(Ordering::SeqCst) as u16
    }

    pub(super) fn set_gc_percent(&self, percent: u16) {
        self.gc_percent.store(percent.into(), Ordering::SeqCst);
    }

    /// Whether used segments reached the GC watermark.
    pub(super) fn over_watermark(&self) -> bool {
        let used = u64::from(self.used_count());
        used * 100 >= u64::from(self.n_segs()) * u64::from(self.gc_percent())
    }

    /// Wakes GC when an allocation crossed the watermark.
    fn maybe_wake_gc(&self, ctx: &Ctx) {
        if ctx.background && self.over_watermark() {
            ctx.wake.notify();
        }
    }

    /// Takes a free segment. With none free, waits for writeback and GC to
    /// free one (they are woken), unless they are not running or cannot
    /// make progress.
    pub(super) fn get_segment(&self, purpose: For, ctx: &Ctx) -> Result<u32, EngineError> {
        let mut map = lock(&self.map);
        // Counted in `waiting` from its first wait until it returns.
        let mut waited = false;
        let taken = loop {
            if let Some(s) = take_segment(&mut map, purpose) {
                break Ok(s);
            }
            if ctx.stopping() {
                break Err(EngineError::Stopped);
            }
            if !ctx.background {
                break Err(EngineError::CacheFull);
            }
            if let Some(why) = ctx.stalled() {
                break Err(EngineError::Stalled(why));
            }
            if !waited {
                waited = true;
                map.waiting += 1;
            }
            ctx.wake.notify();
            map = self.freed.wait_timeout(map, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        };
        if waited {
            map.waiting -= 1;
        }
        drop(map);
        if taken.is_ok() {
            self.maybe_wake_gc(ctx);
        }
        taken
    }

    /// A free data segment, without waiting.
    fn try_segment(&self, ctx: &Ctx) -> Option<u32> {
        let s = take_segment(&mut lock(&self.map), For::Data)?;
        self.maybe_wake_gc(ctx);
        Some(s)
    }

    /// Marks a segment free and wakes writers waiting for one.
    pub(super) fn free_segment(&self, seg: u32) {
        let mut map = lock(&self.map);
        if std::mem::replace(&mut map.used[seg as usize], false) {
            map.count -= 1;
        }
        self.freed.notify_all();
    }

    /// Wakes writers waiting for a segment, to see that they should stop.
    pub(super) fn wake_waiters(&self) {
        let _map = lock(&self.map);
        self.freed.notify_all();
    }

    fn get_ref(&self, seg: u32) {
        self.refs[seg as usize].fetch_add(1, Ordering::AcqRel);
    }

    /// Drops a reference; the last one invalidates the segment.
    pub(super) fn put_ref(&self, seg: u32, ctx: &Ctx) -> Result<(), EngineError> {
        if self.release_ref(seg) {
            self.invalidate(seg, ctx)?;
        }
        Ok(())
    }

    /// Drops a reference without invalidating; true when it was the last.
    pub(super) fn release_ref(&self, seg: u32) -> bool {
        self.refs[seg as usize].fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Whether some key in the log still references `seg`.
    pub(super) fn referenced(&self, seg: u32) -> Option<bool> {
        self.refs.get(seg as usize).map(|r| r.load(Ordering::Acquire) != 0)
    }

    /// Invalidates a segment that lost its last reference: its generation
    /// is bumped and persisted before it is free, so keys still pointing at
    /// it read as stale.
    pub(super) fn invalidate(&self, seg: u32, ctx: &Ctx) -> Result<(), EngineError> {
        let g = self.gens[seg as usize].load(Ordering::Acquire) + 1;
        let ctrl = self.layout().ctrl_offset(self.dev_segs[seg as usize])?;
        write_record(self.pmem(), self.layout().dialect(), ctrl, &CacheSegGen::new(g))?;
        self.gens[seg as usize].store(g, Ordering::Release);
        self.free_segment(seg);
        ctx.stats.segments_freed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

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

    /// Allocates up to `len` bytes of data space: the key may get less when
    /// its segment runs out. The extent holds a reference for the key.
    /// `None` when the head needs a new segment and none is free; with
    /// `wait`, waits for one instead ([`Space::get_segment`]).
    pub(super) fn alloc(&self, len: u32, wait: bool, ctx: &Ctx) -> Result<Option<Extent>, EngineError> {
        let mut head = lock(&self.heads[self.head_index()]);
        loop {
            if let Some(seg) = head.seg {
                let remain = CACHE_SEG_DATA_SIZE - head.off;
                let gen_ = self.gens[seg as usize].load(Ordering::Acquire);
                let off = head.off;
                self.get_ref(seg);
                if remain > len {
                    head.off += len;
                    return Ok(Some(Extent { seg, off, gen_, len }));
                }
                head.off += remain;
                head.seg = None;
                // The head's own reference.
                self.put_ref(seg, ctx)?;
                return Ok(Some(Extent { seg, off, gen_, len: remain }));
            }
            let s = match self.try_segment(ctx) {
                Some(s) => s,
                None if !wait => return Ok(None),
                None => self.get_segment(For::Data, ctx)?,
            };
            self.get_ref(s);
            head.seg = Some(s);
            head.off = 0;
        }
    }
}

fn take_segment(map: &mut SegMap, purpose: For) -> Option<u32> {
    let n = map.used.len() as u32;
    let reserve = match purpose {
        For::Data => 1,
        For::Log => 0,
    };
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
