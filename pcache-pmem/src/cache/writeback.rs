//! Writeback (spec §2.9.10, with upstream's improvements): follows the key
//! log from the dirty tail in order. Each kset's keys are collapsed first
//! (later keys win), CLEAN keys are skipped, the dirty data is written to
//! the backing device, and only after an `fdatasync` is the advanced dirty
//! tail persisted: the backing device always holds a prefix of the write
//! history, at kset boundaries. A failed write or sync leaves the dirty
//! tail where it is; the same ksets are retried.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pcache_format::CACHE_SUBTREE_SHIFT;
use pcache_format::media::{LogEnd, LogStep, LogWalk};

use super::ctx::lock;
use super::error::EngineError;
use super::index::{Delta, IKey, Slice};
use super::io::{Io, Roles, read_extent};
use super::load::LogPos;
use super::log::Tail;
use crate::backing::BackingDev;
use crate::pmem::{AsMedia, Pmem, PmemError};

/// Writeback writes back at most this many ksets, or bytes, per sync.
const BATCH_KSETS: usize = 64;
const BATCH_BYTES: u64 = 64 << 20;

/// The writeback role: the only mover of the dirty tail.
#[derive(Debug)]
pub(super) struct Writeback {
    /// Held for a whole batch; the dirty tail itself is held only to read
    /// or publish it, so GC is never held up by backing writes.
    batch: Mutex<()>,
    /// Bytes a second, at most; 0 for no limit. Changed while running by
    /// [`Writeback::set_rate`].
    rate: std::sync::atomic::AtomicU64,
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

/// What one batch went through.
#[derive(Debug, Default)]
struct Batch {
    at: LogPos,
    ksets: usize,
    bytes: u64,
    done_dirty: u64,
}

impl Writeback {
    pub(super) fn new(rate: Option<u64>) -> Self {
        Self { batch: Mutex::new(()), rate: std::sync::atomic::AtomicU64::new(rate.unwrap_or(0)) }
    }

    /// The rate limit, if any: bytes a second.
    pub(super) fn rate(&self) -> Option<u64> {
        Some(self.rate.load(std::sync::atomic::Ordering::Relaxed)).filter(|r| *r > 0)
    }

    /// Sets the rate limit (`None`: none) for the keys written from now on.
    pub(super) fn set_rate(&self, rate: Option<u64>) {
        self.rate.store(rate.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes back up to `max_ksets` ksets (LAST ones count) from the dirty
    /// tail, syncs the backing device and persists the dirty tail; returns
    /// how many, 0 when there is nothing to do.
    ///
    /// A kset that cannot be read or decoded, or a dirty key whose cached
    /// data cannot be read correctly (CRC mismatch, pmem media error),
    /// stops the batch there: the ksets before it are still synced and the
    /// dirty tail persisted up to them, then the failure is logged, recorded
    /// in the health (see `Cache::stuck`) and returned.
    pub(super) fn batch<P: Pmem, B: BackingDev>(
        &self,
        max_ksets: usize,
        io: &Io<B>,
        r: Roles<'_, P>,
    ) -> Result<usize, EngineError> {
        self.step(max_ksets, io, r).map_err(|f| f.err)
    }

    fn step<P: Pmem, B: BackingDev>(&self, max_ksets: usize, io: &Io<B>, r: Roles<'_, P>) -> Result<usize, Failure> {
        let _batch = lock(&self.batch);
        let end = r.log.end();
        let mut b = Batch { at: r.log.dirty_tail(), ..Batch::default() };
        let space = r.space;
        let media = AsMedia(space.pmem());
        let mut visited = vec![false; space.n_segs() as usize];
        let mut walk = LogWalk::new(&media, space.layout(), space.dev_segs(), &mut visited, b.at);
        let mut data = Vec::new();
        let mut blocked = None;
        while walk.pos() != end && b.ksets < max_ksets.min(BATCH_KSETS) && b.bytes < BATCH_BYTES {
            match walk.step() {
                Some(LogStep::Keys { at, keys }) => {
                    let mut written = 0;
                    if let Some(stop) = self.write_kset(at, keys, io, r, &mut data, &mut written)? {
                        blocked = Some(stop);
                        break;
                    }
                    b.bytes += written;
                    b.done_dirty += keys.iter().filter(|k| k.is_dirty()).map(|k| u64::from(k.len.get())).sum::<u64>();
                }
                Some(LogStep::Last { .. }) => {}
                Some(LogStep::End { at, end }) => {
                    blocked = Some(Blocked::end(at, end));
                    break;
                }
                None => break,
            }
            b.ksets += 1;
            b.at = walk.pos();
        }
        if b.ksets > 0 {
            // Whatever stopped the batch, the ksets before it are done.
            self.commit(&b, io, r).map_err(Failure::other)?;
        }
        match blocked {
            Some(stop) => Err(self.record_blocked(stop, io, r)),
            None => Ok(b.ksets),
        }
    }

    /// Writes the live dirty keys of one kset back, adding the bytes to
    /// `written`; `Some` when a key's data cannot be read correctly
    /// (nothing after it is written).
    fn write_kset<P: Pmem, B: BackingDev>(
        &self,
        at: LogPos,
        keys: &[pcache_format::Key],
        io: &Io<B>,
        r: Roles<'_, P>,
        data: &mut Vec<u8>,
        written: &mut u64,
    ) -> Result<Option<Blocked>, Failure> {
        let space = r.space;
        for (off, k) in collapse(keys).iter().filter(|(_, k)| k.is_dirty()) {
            if k.cache_seg >= space.n_segs() || space.is_stale(k) {
                let why = "the key points at reclaimed cached data".to_string();
                let err = EngineError::log(at, format!("dirty key at {off} points at reclaimed data"));
                return Ok(Some(Blocked { at, range: Some((off, k.len)), why, retry: false, err }));
            }
            data.resize(k.len as usize, 0);
            let read = read_extent(space.pmem(), space.layout(), space.dev_segs(), io.data_crc(), off, k, 0, data);
            if let Err(e) = read {
                return Ok(Some(Blocked::extent(at, off, k, e)));
            }
            // Paid for before it is written: at a rate too low to write a
            // key before the cache stops, nothing is written back at all.
            self.throttle(u64::from(k.len), r.ctx).map_err(Failure::other)?;
            io.backing().write_at(off, data).map_err(|e| Failure::other(e.into()))?;
            *written += u64::from(k.len);
        }
        Ok(None)
    }

    /// Syncs the backing device, then persists and publishes the dirty tail
    /// past the ksets of `b`.
    fn commit<P: Pmem, B: BackingDev>(&self, b: &Batch, io: &Io<B>, r: Roles<'_, P>) -> Result<(), EngineError> {
        io.backing().sync()?;
        r.log.persist_tail(r.space, Tail::Dirty, b.at)?;
        // Published after it is durable: GC, which stops at the published
        // tail, never consumes a kset whose data is not safely written back.
        r.log.publish_dirty_tail(b.at);
        {
            let mut h = lock(&r.ctx.health);
            h.writeback_failing_since = None;
            h.writeback_last_error = None;
        }
        let s = &r.ctx.stats;
        s.dirty_pending.add(-(b.done_dirty as i64));
        s.ksets_written_back.fetch_add(b.ksets as u64, Ordering::Relaxed);
        s.bytes_written_back.fetch_add(b.bytes, Ordering::Relaxed);
        r.ctx.wake.notify();
        Ok(())
    }

    /// Logs a place writeback cannot pass (once, not on every retry) and
    /// records it in the health: latched, or failing while it may clear.
    fn record_blocked<P: Pmem, B: BackingDev>(&self, b: Blocked, io: &Io<B>, r: Roles<'_, P>) -> Failure {
        let path = io.backing().path().display().to_string();
        let msg = b.message(&path);
        let mut h = lock(&r.ctx.health);
        let repeat = h.writeback_stopped.as_deref() == Some(msg.as_str())
            || h.writeback_last_error.as_deref() == Some(msg.as_str());
        h.writeback_failed(msg.clone(), b.retry);
        drop(h);
        if !repeat {
            let (off, len) = b.range.map_or((None, None), |(o, l)| (Some(o), Some(l)));
            tracing::error!(
                backing = %path,
                segment = b.at.seg,
                offset = b.at.off,
                backing_offset = off,
                length = len,
                "{msg}"
            );
        }
        Failure { err: b.err, blocked: Some(b.retry) }
    }

    /// Sleeps as long as writing `bytes` takes at the writeback rate, but
    /// gives up (without moving the dirty tail) as soon as the cache stops.
    fn throttle(&self, bytes: u64, ctx: &super::ctx::Ctx) -> Result<(), EngineError> {
        let Some(rate) = self.rate() else { return Ok(()) };
        let until = Instant::now() + Duration::from_secs_f64(bytes as f64 / rate as f64);
        loop {
            if ctx.stopping() {
                return Err(EngineError::Stopped);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(Duration::from_millis(20)));
        }
    }

    /// Writes back as dirty ksets appear, with back-off on errors, until
    /// the cache stops or writeback meets something it cannot pass.
    pub(super) fn worker<P: Pmem, B: BackingDev>(&self, io: &Io<B>, r: Roles<'_, P>) {
        let ctx = r.ctx;
        let mut backoff = Duration::from_millis(10);
        loop {
            let seen = ctx.wake.current();
            if ctx.stopping() {
                return;
            }
            match self.step(BATCH_KSETS, io, r) {
                Ok(0) => ctx.wake.wait(seen, pcache_format::WORKER_INTERVAL),
                Ok(_) => backoff = Duration::from_millis(10),
                Err(Failure { err: EngineError::Stopped, .. }) => return,
                Err(Failure { err, blocked }) => {
                    ctx.stats.writeback_errors.fetch_add(1, Ordering::Relaxed);
                    // A place writeback cannot pass was recorded (and
                    // logged) where it was met; other errors are recorded
                    // here.
                    let retry = blocked.unwrap_or(matches!(err, EngineError::Backing(_) | EngineError::Pmem(_)));
                    if blocked.is_none() {
                        lock(&ctx.health).writeback_failed(err.to_string(), retry);
                    }
                    if !retry {
                        r.space.wake_waiters();
                        return;
                    }
                    ctx.wake.wait(seen, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

impl Blocked {
    /// The log ends at `at`, before its published end.
    fn end(at: LogPos, end: LogEnd<PmemError>) -> Self {
        let (why, err) = match end {
            LogEnd::Media { source, .. } => {
                let why = format!("pmem media error under the kset: {source}");
                return Self { at, range: None, why, retry: true, err: EngineError::Pmem(source) };
            }
            LogEnd::Damaged(e) | LogEnd::Invalid(e) | LogEnd::Torn(e) => {
                (format!("undecodable kset: {e}"), EngineError::log(at, e))
            }
            end => {
                let why = format!("the log ends ({end}) before its published end");
                (why.clone(), EngineError::log(at, why))
            }
        };
        Self { at, range: None, why, retry: false, err }
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
        let LogPos { seg, off: pos } = self.at;
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
        EngineError::Pmem(e @ PmemError::Media { .. }) => format!("pmem media error: {e}"),
        EngineError::Pmem(e) => format!("pmem read failed: {e}"),
        e => e.to_string(),
    }
}

/// A kset's keys collapsed: what is left of each, in backing offset order.
pub(super) struct Collapsed(Vec<(u64, IKey)>);

impl Collapsed {
    /// Each key left, with its offset.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &IKey)> {
        self.0.iter().map(|(o, k)| (*o, k))
    }
}

/// Collapses a kset's keys as the index does: later keys win. A kset holds
/// keys of several slices, each collapsed in its own.
pub(super) fn collapse(keys: &[pcache_format::Key]) -> Collapsed {
    let mut slices: BTreeMap<u64, Slice> = BTreeMap::new();
    let mut d = Delta::default();
    for k in keys {
        let off = k.off.get();
        slices.entry(off >> CACHE_SUBTREE_SHIFT).or_default().insert(off, IKey::from_media(k, k.is_dirty()), &mut d);
    }
    Collapsed(slices.values().flat_map(Slice::iter).collect())
}
