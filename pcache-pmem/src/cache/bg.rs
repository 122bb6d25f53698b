//! Writeback and GC (spec §2.9.10–§2.9.12, with upstream's improvements).
//!
//! Writeback follows the key log from the dirty tail in order. Each kset's
//! keys are collapsed first (later keys win), CLEAN keys are skipped, the
//! dirty data is written to the backing device, and only after an
//! `fdatasync` is the advanced dirty tail persisted: the backing device
//! always holds a prefix of the write history, at kset boundaries. A failed
//! write or sync leaves the dirty tail where it is; the same ksets are
//! retried.
//!
//! GC consumes ksets from the key tail, never past the dirty tail, once the
//! cache's used segments reach the GC watermark. Each key drops a reference
//! on its segment; the key tail is persisted past the kset *before* the
//! segments that lost their last reference are invalidated (generation
//! bumped and persisted, then freed), so that after a crash no replayed key
//! references a segment that was reused. Stale keys are then cleaned out of
//! the index in small batches.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pcache_format::media::read_kset;
use pcache_format::{CLEAN_KEYS_MAX, CachePos, DIRTY_TAIL_OFF, KEY_TAIL_OFF, KsetRecord};

use super::index::{Delta, IKey, Slice};
use super::load::LogPos;
use super::{EngineError, Inner, format_err_at, lock, unpack};
use crate::backing::BackingDev;
use crate::pmem::{AsMedia, Pmem};
use crate::records::write_record;

/// Writeback writes back at most this many ksets, or bytes, per sync.
const BATCH_KSETS: usize = 64;
const BATCH_BYTES: u64 = 64 << 20;

impl<P: Pmem, B: BackingDev> Inner<P, B> {
    pub(super) fn log_end(&self) -> LogPos {
        unpack(self.log_end.load(Ordering::Acquire))
    }

    fn persist_tail(&self, off: usize, pos: LogPos) -> Result<(), EngineError> {
        let ctrl = self.dev.layout().ctrl_offset(self.dev_segs[0]).map_err(super::data_err)?;
        write_record(self.pmem(), ctrl + off as u64, &CachePos::new(pos.0, pos.1))?;
        Ok(())
    }

    /// Reads the log record at `at`.
    fn read_log<'b>(
        &self,
        at: LogPos,
        buf: &'b mut [u8; pcache_format::KSET_ONMEDIA_SIZE_MAX],
    ) -> Result<KsetRecord<'b>, EngineError> {
        let dev_seg = self.dev_segs[at.0 as usize];
        read_kset(&AsMedia(self.pmem()), self.dev.layout(), dev_seg, at.1, self.n_segs, buf).map_err(|e| match e {
            pcache_format::ReadError::Media { source, .. } => EngineError::Pmem(source),
            pcache_format::ReadError::Format(e) => format_err_at(at, e),
        })
    }

    /// Reads the log record at `at`, with the raw error: [`Inner::read_log`]
    /// without the mapping.
    fn read_log_raw<'b>(
        &self,
        at: LogPos,
        buf: &'b mut [u8; pcache_format::KSET_ONMEDIA_SIZE_MAX],
    ) -> Result<KsetRecord<'b>, pcache_format::ReadError<crate::pmem::PmemError>> {
        let dev_seg = self.dev_segs[at.0 as usize];
        read_kset(&AsMedia(self.pmem()), self.dev.layout(), dev_seg, at.1, self.n_segs, buf)
    }

    /// Writes back up to a batch of ksets from the dirty tail, syncs the
    /// backing device and persists the dirty tail. Returns the ksets (LAST
    /// ones included) written back; 0 when there is nothing to do.
    ///
    /// A kset that cannot be read or decoded, or a dirty key whose cached
    /// data cannot be read correctly (CRC mismatch, pmem media error),
    /// stops the batch there: the ksets before it are still synced and the
    /// dirty tail persisted up to them, then the failure is logged, recorded
    /// in the health (see [`super::Cache::stuck`]) and returned.
    pub(super) fn writeback_batch(&self, max_ksets: usize) -> Result<usize, EngineError> {
        self.writeback_step(max_ksets).map_err(|f| f.err)
    }

    fn writeback_step(&self, max_ksets: usize) -> Result<usize, Failure> {
        let _writeback = lock(&self.writeback);
        let end = self.log_end();
        let mut at = *lock(&self.dirty_tail);
        let (mut ksets, mut bytes, mut done_dirty) = (0usize, 0u64, 0u64);
        let mut buf = [0u8; pcache_format::KSET_ONMEDIA_SIZE_MAX];
        let mut data = Vec::new();
        let mut blocked = None;
        while at != end && ksets < max_ksets.min(BATCH_KSETS) && bytes < BATCH_BYTES {
            let record = match self.read_log_raw(at, &mut buf) {
                Ok(r) => r,
                Err(e) => {
                    blocked = Some(Blocked::kset(at, e));
                    break;
                }
            };
            match record {
                KsetRecord::End { magic } => {
                    let why = format!("the log ends (magic {magic:#018x}) before its published end");
                    blocked = Some(Blocked { at, range: None, err: format_err_at(at, &why), why, retry: false });
                    break;
                }
                KsetRecord::Last { next_cache_seg } => at = (next_cache_seg, 0),
                KsetRecord::Keys { keys } => {
                    let tree = collapse(keys);
                    let (mut kset_bytes, mut stop) = (0u64, None);
                    for (off, k) in tree.iter().filter(|(_, k)| k.is_dirty()) {
                        if k.cache_seg >= self.n_segs || self.is_stale(k) {
                            let why = "the key points at reclaimed cached data".to_string();
                            let err = format_err_at(at, format!("dirty key at {off} points at reclaimed data"));
                            stop = Some(Blocked { at, range: Some((off, k.len)), why, retry: false, err });
                            break;
                        }
                        if let Err(e) = self.read_key_data(off, k, &mut data) {
                            stop = Some(Blocked::extent(at, off, k, e));
                            break;
                        }
                        self.backing.write_at(off, &data).map_err(|e| Failure::other(e.into()))?;
                        kset_bytes += u64::from(k.len);
                        self.throttle(u64::from(k.len)).map_err(Failure::other)?;
                    }
                    if stop.is_some() {
                        blocked = stop;
                        break;
                    }
                    bytes += kset_bytes;
                    done_dirty += keys.iter().filter(|k| k.is_dirty()).map(|k| u64::from(k.len.get())).sum::<u64>();
                    at.1 += pcache_format::kset_size(keys.len()) as u32;
                }
            }
            ksets += 1;
        }
        if ksets > 0 {
            // Whatever stopped the batch, the ksets before it are done.
            self.commit_writeback(at, ksets, bytes, done_dirty).map_err(Failure::other)?;
        }
        match blocked {
            Some(b) => Err(self.record_blocked(b)),
            None => Ok(ksets),
        }
    }

    /// Syncs the backing device, then persists and publishes the dirty tail
    /// at `at`, past `ksets` ksets written back.
    fn commit_writeback(&self, at: LogPos, ksets: usize, bytes: u64, done_dirty: u64) -> Result<(), EngineError> {
        self.backing.sync()?;
        self.persist_tail(DIRTY_TAIL_OFF, at)?;
        // Published after it is durable: GC, which stops at the published
        // tail, never consumes a kset whose data is not safely written back.
        *lock(&self.dirty_tail) = at;
        {
            let mut h = lock(&self.health);
            h.writeback_failing_since = None;
            h.writeback_last_error = None;
        }
        let s = &self.stats;
        s.dirty_pending.fetch_sub(done_dirty as i64, Ordering::Relaxed);
        s.ksets_written_back.fetch_add(ksets as u64, Ordering::Relaxed);
        s.bytes_written_back.fetch_add(bytes, Ordering::Relaxed);
        self.wake.notify();
        Ok(())
    }

    /// Logs a place writeback cannot pass (once, not on every retry) and
    /// records it in the health: latched, or failing while it may clear.
    fn record_blocked(&self, b: Blocked) -> Failure {
        let path = self.backing.path().display().to_string();
        let msg = b.message(&path);
        let mut h = lock(&self.health);
        let repeat = h.writeback_stopped.as_deref() == Some(msg.as_str())
            || h.writeback_last_error.as_deref() == Some(msg.as_str());
        if b.retry {
            h.writeback_failing_since.get_or_insert_with(Instant::now);
            h.writeback_last_error = Some(msg.clone());
        } else {
            h.writeback_stopped = Some(msg.clone());
        }
        drop(h);
        if !repeat {
            let (off, len) = b.range.map_or((None, None), |(o, l)| (Some(o), Some(l)));
            tracing::error!(
                backing = %path,
                segment = b.at.0,
                offset = b.at.1,
                backing_offset = off,
                length = len,
                "{msg}"
            );
        }
        Failure { err: b.err, blocked: Some(b.retry) }
    }

    /// Reads a key's data out of pmem into `data`, verifying its CRC when
    /// the cache keeps them.
    fn read_key_data(&self, off: u64, k: &IKey, data: &mut Vec<u8>) -> Result<(), EngineError> {
        read_extent(self.pmem(), self.dev.layout(), &self.dev_segs, self.data_crc, off, k, data)
    }

    /// Sleeps as long as writing `bytes` takes at the writeback rate, but
    /// gives up (without moving the dirty tail) as soon as the cache stops.
    fn throttle(&self, bytes: u64) -> Result<(), EngineError> {
        let Some(rate) = self.writeback_rate.filter(|r| *r > 0) else { return Ok(()) };
        let until = Instant::now() + Duration::from_secs_f64(bytes as f64 / rate as f64);
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return Err(EngineError::Stopped);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(Duration::from_millis(20)));
        }
    }

    pub(super) fn writeback_worker(&self) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let seen = self.wake.current();
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            match self.writeback_step(BATCH_KSETS) {
                Ok(0) => {
                    self.wake.wait(seen, pcache_format::WORKER_INTERVAL);
                }
                Ok(_) => backoff = Duration::from_millis(10),
                Err(Failure { err: EngineError::Stopped, .. }) => return,
                Err(Failure { err, blocked }) => {
                    self.stats.writeback_errors.fetch_add(1, Ordering::Relaxed);
                    // A place writeback cannot pass was recorded (and
                    // logged) where it was met; other errors are recorded
                    // here.
                    let retry = blocked.unwrap_or(matches!(err, EngineError::Backing(_) | EngineError::Pmem(_)));
                    let mut h = lock(&self.health);
                    if blocked.is_none() {
                        if retry {
                            h.writeback_failing_since.get_or_insert_with(Instant::now);
                            h.writeback_last_error = Some(err.to_string());
                        } else {
                            h.writeback_stopped = Some(err.to_string());
                        }
                    }
                    drop(h);
                    if !retry {
                        self.wake_writers();
                        return;
                    }
                    self.wake.wait(seen, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn wake_writers(&self) {
        let _map = lock(&self.seg_map);
        self.seg_freed.notify_all();
    }

    /// Whether used segments reached the GC watermark.
    fn over_watermark(&self) -> bool {
        let used = u64::from(lock(&self.seg_map).count);
        let pct = u64::from(self.gc_percent.load(Ordering::SeqCst));
        used * 100 >= u64::from(self.n_segs) * pct
    }

    /// Wakes GC when an allocation crossed the watermark.
    pub(super) fn maybe_wake_gc(&self) {
        if self.background && self.over_watermark() {
            self.wake.notify();
        }
    }

    /// Consumes the kset at the key tail if GC should run and may; returns
    /// whether it did.
    pub(super) fn gc_step(&self) -> Result<bool, EngineError> {
        if !self.over_watermark() {
            return Ok(false);
        }
        let mut key_tail = lock(&self.key_tail);
        let at = *key_tail;
        if at == *lock(&self.dirty_tail) {
            return Ok(false);
        }
        let mut buf = [0u8; pcache_format::KSET_ONMEDIA_SIZE_MAX];
        match self.read_log(at, &mut buf)? {
            KsetRecord::End { .. } => Err(format_err_at(at, "the log ends before the dirty tail")),
            KsetRecord::Last { next_cache_seg } => {
                let next = (next_cache_seg, 0);
                self.persist_tail(KEY_TAIL_OFF, next)?;
                *key_tail = next;
                drop(key_tail);
                // A key segment holds no data keys: freed without a new generation.
                self.free_segment(at.0);
                self.stats.ksets_collected.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            KsetRecord::Keys { keys } => {
                // Every key is checked before anything changes, and the
                // references are dropped only once the key tail is durable
                // past the kset: a step that fails leaves the refcounts as
                // they were, so a retry never drops a reference twice.
                if let Some(k) = keys.iter().find(|k| self.refs.get(k.cache_seg_id.get() as usize).is_none()) {
                    return Err(format_err_at(at, format!("key at {} outside the cache", k.off.get())));
                }
                let next = (at.0, at.1 + pcache_format::kset_size(keys.len()) as u32);
                self.persist_tail(KEY_TAIL_OFF, next)?;
                *key_tail = next;
                let mut released = Vec::new();
                for k in keys {
                    let seg = k.cache_seg_id.get() as usize;
                    if self.refs[seg].fetch_sub(1, Ordering::AcqRel) == 1 {
                        released.push(seg as u32);
                    }
                }
                // Still under the key-tail lock, so that check_invariants
                // never sees a segment between its last reference and its
                // invalidation.
                for seg in released {
                    self.invalidate(seg)?;
                }
                drop(key_tail);
                self.stats.ksets_collected.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
        }
    }

    pub(super) fn gc_worker(&self) {
        loop {
            let seen = self.wake.current();
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let freed_before = self.stats.segments_freed.load(Ordering::Relaxed);
            match self.gc_step() {
                Ok(true) => {
                    if self.self_check
                        && let Err(e) = self.check_invariants()
                    {
                        lock(&self.health).gc_stopped = Some(format!("invariant violated: {e}"));
                        self.wake_writers();
                        return;
                    }
                    if self.stats.segments_freed.load(Ordering::Relaxed) != freed_before {
                        self.clean_stale();
                    }
                }
                Ok(false) => self.wake.wait(seen, pcache_format::WORKER_INTERVAL),
                Err(e) => {
                    lock(&self.health).gc_stopped = Some(e.to_string());
                    self.wake_writers();
                    return;
                }
            }
        }
    }

    /// Removes stale keys from the index, a few at a time; slices busy with
    /// requests are skipped (reads drop stale keys they meet anyway).
    pub(super) fn clean_stale(&self) {
        for slice in &self.slices {
            loop {
                let Ok(mut s) = slice.try_lock() else { break };
                let stale: Vec<u64> =
                    s.iter().filter(|(_, k)| self.is_stale(k)).map(|(o, _)| o).take(CLEAN_KEYS_MAX).collect();
                let mut d = Delta::default();
                for o in &stale {
                    s.remove(*o, &mut d);
                }
                drop(s);
                self.stats.apply(&d);
                if stale.len() < CLEAN_KEYS_MAX {
                    break;
                }
            }
        }
    }

    /// See [`super::Cache::check_invariants`]. Holds the key tail, so GC
    /// is between steps.
    pub(super) fn check_invariants(&self) -> Result<(), String> {
        let key_tail = lock(&self.key_tail);
        // Which segments are in use, read after whatever is checked against
        // it was made (a key's segment is allocated before the key exists).
        let used_now = || lock(&self.seg_map).used.clone();
        for (i, slice) in self.slices.iter().enumerate() {
            // A slice held by a writer that waits for GC is skipped rather
            // than waited for: GC may be the caller.
            let Ok(s) = slice.try_lock() else { continue };
            if s.is_empty() {
                continue;
            }
            let used = used_now();
            for (off, k) in s.iter() {
                if k.is_empty() || self.is_stale(k) {
                    continue;
                }
                let seg = k.cache_seg as usize;
                if !used.get(seg).copied().unwrap_or(false) {
                    return Err(format!("slice {i}: key at {off} points at free segment {seg}"));
                }
                if self.refs[seg].load(Ordering::Acquire) == 0 {
                    return Err(format!("slice {i}: key at {off} points at segment {seg}, which has no references"));
                }
            }
        }
        let (kt, dt, end) = (*key_tail, *lock(&self.dirty_tail), self.log_end());
        let used = used_now();
        for (name, pos) in [("key tail", kt), ("dirty tail", dt), ("log end", end)] {
            if !used.get(pos.0 as usize).copied().unwrap_or(false) {
                return Err(format!("the {name} is in free segment {}", pos.0));
            }
        }
        // Data not yet written back must still be where its keys say: every
        // dirty key from the dirty tail on, closed or not, points at a live
        // segment of its own generation.
        let live = |k: &pcache_format::Key, used: &[bool], what: &str| {
            let seg = k.cache_seg_id.get() as usize;
            let gen_ = self.gens.get(seg).map(|g| g.load(Ordering::Acquire));
            if gen_ != Some(k.seg_gen.get()) || !used.get(seg).copied().unwrap_or(false) {
                return Err(format!("{what} dirty key at {} points at reclaimed segment {seg}", k.off.get()));
            }
            Ok(())
        };
        let mut at = dt;
        let mut buf = [0u8; pcache_format::KSET_ONMEDIA_SIZE_MAX];
        while at != end {
            match self.read_log(at, &mut buf).map_err(|e| e.to_string())? {
                KsetRecord::End { .. } => return Err(format!("the log ends at {at:?} before its end {end:?}")),
                KsetRecord::Last { next_cache_seg } => at = (next_cache_seg, 0),
                KsetRecord::Keys { keys } => {
                    for k in keys.iter().filter(|k| k.is_dirty()) {
                        live(k, &used, "a logged")?;
                    }
                    at.1 += pcache_format::kset_size(keys.len()) as u32;
                }
            }
        }
        for kset in &self.ksets {
            let Ok(kset) = kset.try_lock() else { continue };
            let used = used_now();
            for k in kset.keys.iter().filter(|k| k.is_dirty()) {
                live(k, &used, "an open")?;
            }
        }
        Ok(())
    }
}

/// A failed writeback batch: the error, and for a place writeback cannot
/// pass (already recorded in the health and logged), whether it is worth
/// retrying.
struct Failure {
    err: EngineError,
    blocked: Option<bool>,
}

impl Failure {
    fn other(err: EngineError) -> Self {
        Self { err, blocked: None }
    }
}

/// A kset, or a dirty key's cached data, that writeback cannot read
/// correctly.
struct Blocked {
    /// The kset.
    at: LogPos,
    /// The backing range of the key whose data is bad; `None` for the kset
    /// itself.
    range: Option<(u64, u32)>,
    /// Why, in words.
    why: String,
    /// A pmem media error may clear (the poison repaired): retried.
    /// Anything else stops writeback until the cache is restarted.
    retry: bool,
    err: EngineError,
}

impl Blocked {
    fn kset(at: LogPos, e: pcache_format::ReadError<crate::pmem::PmemError>) -> Self {
        match e {
            pcache_format::ReadError::Media { source, .. } => Self {
                at,
                range: None,
                why: format!("pmem media error under the kset: {source}"),
                retry: true,
                err: EngineError::Pmem(source),
            },
            pcache_format::ReadError::Format(e) => {
                Self { at, range: None, why: format!("undecodable kset: {e}"), retry: false, err: format_err_at(at, e) }
            }
        }
    }

    fn extent(at: LogPos, off: u64, k: &IKey, err: EngineError) -> Self {
        Self {
            at,
            range: Some((off, k.len)),
            why: extent_why(&err, off, k.len),
            retry: matches!(err, EngineError::Pmem(_)),
            err,
        }
    }

    fn message(&self, path: &str) -> String {
        let (seg, pos) = self.at;
        match self.range {
            Some((off, len)) => format!(
                "writeback of {path} is stuck at backing offset {off} length {len} (a key of the kset at key log \
                 segment {seg} offset {pos:#x}): {}",
                self.why
            ),
            None => format!(
                "writeback of {path} is stuck at the kset at key log segment {seg} offset {pos:#x}: {}",
                self.why
            ),
        }
    }
}

/// Why the data of the key at `off` (`len` bytes) could not be read
/// correctly, in words.
pub(super) fn extent_why(err: &EngineError, off: u64, len: u32) -> String {
    match err {
        EngineError::DataCrc { off: woff, len: wlen, stored, computed } => {
            let whole = if (*woff, *wlen) == (off, len) {
                String::new()
            } else {
                format!(" of the whole {wlen}-byte write at {woff}")
            };
            format!("data CRC mismatch{whole} (stored {stored:#010x}, computed {computed:#010x})")
        }
        EngineError::Pmem(e @ crate::pmem::PmemError::Media { .. }) => format!("pmem media error: {e}"),
        EngineError::Pmem(e) => format!("pmem read failed: {e}"),
        e => e.to_string(),
    }
}

/// Collapses a kset's keys as the index does: later keys win.
pub(super) fn collapse(keys: &[pcache_format::Key]) -> Slice {
    let mut tree = Slice::default();
    let mut d = Delta::default();
    for k in keys {
        let len = k.len.get();
        let ikey = IKey {
            seg_gen: k.seg_gen.get(),
            len,
            cache_seg: k.cache_seg_id.get(),
            seg_off: k.cache_seg_off.get(),
            crc: k.data_crc.get(),
            orig_delta: 0,
            orig_len: len,
            flags: if k.is_dirty() { 0 } else { super::index::CLEAN },
        };
        tree.insert(k.off.get(), ikey, &mut d);
    }
    tree
}

/// Reads the data of key `k` at backing offset `off` out of pmem into
/// `data`; with `data_crc`, verifies the CRC of the whole write it came
/// from first.
pub(super) fn read_extent<P: Pmem + ?Sized>(
    pmem: &P,
    layout: &pcache_format::Layout,
    dev_segs: &[u32],
    data_crc: bool,
    off: u64,
    k: &IKey,
    data: &mut Vec<u8>,
) -> Result<(), EngineError> {
    let addr = |seg_off: u32, len: u32| -> Result<u64, EngineError> {
        let dev_seg = *dev_segs
            .get(k.cache_seg as usize)
            .ok_or_else(|| EngineError::Corrupt(format!("cache segment {}", k.cache_seg)))?;
        layout.data_range(dev_seg, seg_off, len).map_err(super::data_err)
    };
    data.resize(k.len as usize, 0);
    if !data_crc {
        pmem.read(addr(k.seg_off, k.len)?, data)?;
        return Ok(());
    }
    let mut whole = vec![0u8; k.orig_len as usize];
    pmem.read(addr(k.seg_off - k.orig_delta, k.orig_len)?, &mut whole)?;
    let computed = pcache_format::crc::crc32(&whole);
    if computed != k.crc {
        return Err(EngineError::DataCrc {
            off: off - u64::from(k.orig_delta),
            len: k.orig_len,
            stored: k.crc,
            computed,
        });
    }
    let from = k.orig_delta as usize;
    data.copy_from_slice(&whole[from..from + k.len as usize]);
    Ok(())
}

impl<P: Pmem + 'static, B: BackingDev + 'static> super::Cache<P, B> {
    /// Why dirty data cannot be written back, while it cannot: writeback
    /// stopped at a kset or cached data it cannot read correctly (a data
    /// CRC mismatch, a pmem media error, an undecodable kset), or writeback
    /// keeps failing (the backing device refuses writes), and dirty bytes
    /// are still pending. `None` once nothing is dirty or writeback works.
    /// The cache itself stays intact either way; `pcache detach --salvage`
    /// ([`super::detach::detach_salvage`]) writes back everything else.
    pub fn stuck(&self) -> Option<String> {
        let pending = self.inner.stats.dirty_pending.load(Ordering::Relaxed).max(0) as u64;
        if pending == 0 {
            return None;
        }
        let h = lock(&self.inner.health);
        let why = match (&h.writeback_stopped, h.writeback_failing_since, &h.writeback_last_error) {
            (Some(e), _, _) => e.clone(),
            (None, Some(since), Some(e)) => format!("{e} (failing for {} s)", since.elapsed().as_secs()),
            _ => return None,
        };
        Some(format!("{why}; {pending} dirty bytes are not written back"))
    }
}
