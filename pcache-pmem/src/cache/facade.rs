//! [`Cache`]: a running cache of one backing device, composed of its roles
//! (space, key log, request paths, writeback, GC) and their shared state,
//! and the threads that run the flusher and the background work.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pcache_format::{BackingDevInfo, CACHE_GC_PERCENT_DEFAULT, CACHE_GC_PERCENT_MAX, CacheFlags, Dialect, Layout};

use super::ctx::{Ctx, lock};
use super::dev::{CacheDev, NewEntry};
use super::error::EngineError;
use super::index::Index;
use super::io::{Io, Roles};
use super::load::{self, Loaded};
use super::log::Log;
use super::options::{CacheOptions, CacheSummary, Health, StartReport, Stats};
use super::space::Space;
use super::writeback::Writeback;
use super::{check, gc, start};
use crate::backing::BackingDev;
use crate::pmem::{AsMedia, Pmem};

/// The roles of one running cache.
#[derive(Debug)]
struct Inner<P, B> {
    id: u32,
    ctx: Ctx,
    space: Space<P>,
    log: Log,
    io: Io<B>,
    writeback: Writeback,
}

impl<P: Pmem, B: BackingDev> Inner<P, B> {
    fn roles(&self) -> Roles<'_, P> {
        Roles { space: &self.space, log: &self.log, ctx: &self.ctx }
    }
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
            .field("path", &self.inner.io.backing().path())
            .field("n_segs", &self.inner.space.n_segs())
            .finish_non_exhaustive()
    }
}

/// Replays the cache of backing entry `info` without changing anything.
pub fn summarize<P: Pmem + ?Sized>(
    pmem: &P,
    layout: &Layout,
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

impl<P: Pmem + 'static, B: BackingDev + 'static> Cache<P, B> {
    /// Starts the cache of `backing` on `dev`: finds its backing-table entry
    /// by path or identity (or takes a free one and creates the cache),
    /// loads and replays it, and starts the kset flusher (and, with
    /// `background`, writeback and GC).
    pub fn start(
        dev: Arc<CacheDev<P>>,
        backing: B,
        opts: &CacheOptions,
    ) -> Result<(Arc<Self>, StartReport), EngineError> {
        let path = backing.path().to_path_buf();
        start::validate(opts, &path, backing.size())?;
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
        let (info, new, notes) = match existing {
            Some(stored) => {
                let media = AsMedia(dev.pmem());
                let both = match dev.layout().dialect() {
                    Dialect::RfcV1 => pcache_format::media::read_backing(&media, dev.layout(), id)?.copies,
                    Dialect::DmPcache => pcache_format::media::read_dm_cache_info(&media, dev.layout())?.copies,
                };
                let both = both.iter().all(|c| c.valid());
                let r = start::reconcile(stored, both, opts, &path, dev_size)?;
                if r.rewrite {
                    dev.write_entry(id, &r.info)?;
                }
                (r.info, false, r.notes)
            }
            None => {
                let flags = if opts.data_crc { CacheFlags::DATA_CRC } else { CacheFlags::empty() };
                let new = NewEntry {
                    path: &path,
                    sectors: dev_size / 512,
                    known_identity: backing.identity().is_some(),
                    gc_percent: opts.gc_percent.unwrap_or(CACHE_GC_PERCENT_DEFAULT),
                    flags,
                };
                let size = |free| start::new_cache_segs(opts, dev_size, free);
                (dev.create_entry(id, &new, size)?, true, Vec::new())
            }
        };
        let ci = info.cache_info;
        start::check_queues(ci.n_segs.get(), opts.queues)?;
        let loaded = load::load(dev.pmem(), dev.layout(), &info, dev_size)?;
        let report = StartReport {
            id,
            new,
            n_segs: ci.n_segs.get(),
            data_crc: ci.data_crc(),
            gc_percent: ci.gc_percent.get(),
            queues: opts.queues,
            notes,
            replay: loaded.replay,
            keys: loaded.delta.keys.max(0) as u64,
        };
        let inner = Arc::new(Self::build(dev, backing, opts, id, &info, loaded));
        let cache = Arc::new(Self { inner, threads: Mutex::new(Vec::new()) });
        cache.spawn_workers(opts.background)?;
        Ok((cache, report))
    }

    /// The roles of a loaded cache.
    fn build(
        dev: &Arc<CacheDev<P>>,
        backing: B,
        opts: &CacheOptions,
        id: u32,
        info: &BackingDevInfo,
        loaded: Loaded,
    ) -> Inner<P, B> {
        let ci = info.cache_info;
        let ctx = Ctx::new(opts.background, opts.stall_timeout, opts.self_check);
        ctx.stats.apply(&loaded.delta);
        ctx.stats.dirty_pending.set(loaded.dirty_pending as i64);
        let index = Index::new(backing.size(), loaded.slices);
        let space = Space::new(
            dev.clone(),
            loaded.dev_segs,
            loaded.gens,
            loaded.refs,
            loaded.used,
            opts.queues,
            ci.gc_percent.get(),
        );
        let log = Log::new(
            opts.queues,
            (loaded.key_head, loaded.key_tail, loaded.dirty_tail),
            opts.kset_flush_delay,
            opts.background,
        );
        Inner {
            id,
            ctx,
            space,
            log,
            io: Io::new(backing, ci.data_crc().then_some(dev.layout().dialect()), opts.cache_reads, index),
            writeback: Writeback::new(opts.writeback_rate),
        }
    }

    /// Starts the flusher, and with `background` writeback and GC.
    fn spawn_workers(&self, background: bool) -> Result<(), EngineError> {
        type Work<P, B> = fn(&Inner<P, B>);
        let mut workers: Vec<(&str, Work<P, B>)> = vec![("flush", |i| i.log.flusher(&i.space, &i.ctx))];
        if background {
            workers.push(("wb", |i| i.writeback.worker(&i.io, i.roles())));
            workers.push(("gc", |i| gc::worker(i.io.index(), i.roles())));
        }
        for (name, work) in workers {
            let inner = self.inner.clone();
            let t = std::thread::Builder::new()
                .name(format!("pcache-{name}-{}", self.inner.id))
                .spawn(move || work(&inner))
                .map_err(|e| EngineError::InvalidOption(format!("cannot start a worker thread: {e}")))?;
            lock(&self.threads).push(t);
        }
        Ok(())
    }

    /// Size of the backing device.
    pub fn size(&self) -> u64 {
        self.inner.io.dev_size()
    }

    /// The backing device.
    pub fn backing(&self) -> &B {
        self.inner.io.backing()
    }

    /// The pmem device the cache is on.
    pub fn dev(&self) -> &Arc<CacheDev<P>> {
        self.inner.space.dev()
    }

    /// The backing-table entry.
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// Device segment of each cache segment.
    pub(crate) fn dev_segs(&self) -> &[u32] {
        self.inner.space.dev_segs()
    }

    /// Writes `data` at `off`. On return the data is durable in pmem and its
    /// keys are in open ksets; with `fua`, those ksets are closed too, so the
    /// write survives any crash.
    pub fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), EngineError> {
        let _req = self.inner.ctx.enter()?;
        self.inner.io.check_range(off, data.len() as u64)?;
        self.inner.io.write(off, data, fua, self.inner.roles())
    }

    /// Writes `len` zero bytes at `off` (through the cache, like a write).
    pub fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        let _req = self.inner.ctx.enter()?;
        self.inner.io.check_range(off, len)?;
        self.inner.io.write_zeroes(off, len, fua, self.inner.roles())
    }

    /// Tells the cache the range's contents no longer matter: clean cached
    /// copies are dropped (dirty data still reaches the backing device), and
    /// the discard is passed on to the backing device where it takes one
    /// (a failure there is logged, not returned: a discard is advice).
    pub fn discard(&self, off: u64, len: u64) -> Result<(), EngineError> {
        let _req = self.inner.ctx.enter()?;
        self.inner.io.check_range(off, len)?;
        self.inner.io.discard(off, len, &self.inner.ctx);
        if let Err(e) = self.inner.io.backing().trim(off, len) {
            tracing::warn!(error = %e, "discard not passed on to the backing device");
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off`: hits from pmem, misses from the
    /// backing device (and cached). With data CRCs kept, a hit whose data
    /// fails its CRC fails the read.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let _req = self.inner.ctx.enter()?;
        self.inner.io.check_range(off, buf.len() as u64)?;
        self.inner.io.read(off, buf, self.inner.roles())
    }

    /// Whether all of `[off, off + len)` is cached, so that a read of it
    /// would not touch the backing device (a hint: the answer may change
    /// right after).
    pub fn is_cached(&self, off: u64, len: u64) -> bool {
        !self.inner.ctx.stopping() && self.inner.io.is_cached(off, len, &self.inner.space)
    }

    /// The runs of `[off, off + len)` the cache holds, merged and in order
    /// (a hint, as [`Cache::is_cached`]): with the backing device's own
    /// allocation, what `base:allocation` reports.
    pub fn cached_ranges(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        if self.inner.ctx.stopping() {
            return Vec::new();
        }
        self.inner.io.cached_ranges(off, len, &self.inner.space)
    }

    /// Closes every open kset: every write acknowledged before the call is
    /// durable on return.
    pub fn flush(&self) -> Result<(), EngineError> {
        let _req = self.inner.ctx.enter()?;
        self.inner.log.flush_all(&self.inner.space, &self.inner.ctx)
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let space = &self.inner.space;
        self.inner.ctx.stats.snapshot(space.used_count(), space.n_segs(), space.waiting_count())
    }

    /// Errors of writeback and GC.
    pub fn health(&self) -> Health {
        self.inner.ctx.health()
    }

    /// Why dirty data cannot be written back, while it cannot: writeback
    /// stopped at a kset or cached data it cannot read correctly (a data
    /// CRC mismatch, a pmem media error, an undecodable kset), or writeback
    /// keeps failing (the backing device refuses writes), and dirty bytes
    /// are still pending. `None` once nothing is dirty or writeback works.
    /// The cache itself stays intact either way; `pcache detach --salvage`
    /// ([`super::detach::detach_salvage`]) writes back everything else.
    pub fn stuck(&self) -> Option<String> {
        self.inner.ctx.stuck()
    }

    /// Sets the GC watermark (0..=90 percent of the cache's segments in
    /// use) and persists it in the backing entry.
    pub fn set_gc_percent(&self, percent: u16) -> Result<(), EngineError> {
        if percent > CACHE_GC_PERCENT_MAX {
            return Err(EngineError::InvalidOption(format!(
                "gc_percent {percent} out of range (0..={CACHE_GC_PERCENT_MAX})"
            )));
        }
        let (dev, id) = (self.inner.space.dev(), self.inner.id);
        let mut info = dev.read_entry(id)?;
        info.cache_info.gc_percent = percent.into();
        dev.write_entry(id, &info)?;
        self.inner.space.set_gc_percent(percent);
        self.inner.ctx.wake.notify();
        Ok(())
    }

    /// Limits writeback to `rate` bytes a second from now on (`None`: no
    /// limit). Not persisted: an attach option sets it at each start. A
    /// rate of 0 is refused, as it would stop writeback for good.
    pub fn set_writeback_rate(&self, rate: Option<u64>) -> Result<(), EngineError> {
        if rate == Some(0) {
            return Err(EngineError::InvalidOption(
                "writeback rate 0 would stop writeback for good; give a rate, or none for no limit".into(),
            ));
        }
        self.inner.writeback.set_rate(rate);
        self.inner.ctx.wake.notify();
        Ok(())
    }

    /// The writeback rate limit, bytes a second, if any.
    pub fn writeback_rate(&self) -> Option<u64> {
        self.inner.writeback.rate()
    }

    /// The GC watermark.
    pub fn gc_percent(&self) -> u16 {
        self.inner.space.gc_percent()
    }

    /// Closes every kset, then writes every dirty key back to the backing
    /// device, `fdatasync`s it and persists the dirty tail. Returns the ksets
    /// written back. `progress` is called with (bytes written back, bytes
    /// dirty when the call began) as writeback goes.
    pub fn write_back(&self, mut progress: impl FnMut(u64, u64)) -> Result<u64, EngineError> {
        let inner = &self.inner;
        inner.log.flush_all(&inner.space, &inner.ctx)?;
        let total = inner.ctx.stats.dirty_pending();
        let mut ksets = 0;
        loop {
            let n = inner.writeback.batch(usize::MAX, &inner.io, inner.roles())?;
            if n == 0 {
                return Ok(ksets);
            }
            ksets += n as u64;
            progress(total.saturating_sub(inner.ctx.stats.dirty_pending()), total);
        }
    }

    /// Writes back at most `max` closed ksets (LAST ksets count), syncs the
    /// backing device and persists the dirty tail; returns how many.
    pub fn write_back_ksets(&self, max: usize) -> Result<usize, EngineError> {
        self.inner.writeback.batch(max, &self.inner.io, self.inner.roles())
    }

    /// Runs GC until it can reclaim nothing more (below the watermark, or
    /// at the dirty tail); returns the ksets consumed.
    pub fn gc(&self) -> Result<u64, EngineError> {
        let mut n = 0;
        while gc::step(self.inner.roles())? {
            n += 1;
        }
        gc::clean_stale(self.inner.io.index(), self.inner.roles());
        Ok(n)
    }

    /// Checks the engine's invariants between GC steps: every indexed key
    /// that is not stale points at a segment in use that log keys still
    /// reference, and the tails and the log end lie in segments in use.
    /// Slices busy with requests are skipped. Returns the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        check::invariants(self.inner.io.index(), self.inner.roles())
    }

    /// Stops the cache gracefully: stops the background threads and closes
    /// every kset. The cache stays on the device, warm for the next start
    /// (dirty data is written back then). Further requests fail.
    pub fn stop(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner.ctx.stop_requests();
        // Writers waiting for space see `stopping` and give up.
        inner.space.wake_waiters();
        // Requests already past their entry check finish first, so that a
        // write acknowledged while the cache stops is in a closed kset too.
        inner.ctx.drain();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        let r = inner.log.flush_all(&inner.space, &inner.ctx);
        inner.space.dev().unclaim(inner.id);
        r
    }
}

impl<P: Pmem + 'static, B: BackingDev + 'static> Drop for Cache<P, B> {
    fn drop(&mut self) {
        if !self.inner.ctx.stopping() {
            let _ = self.stop();
        }
    }
}
