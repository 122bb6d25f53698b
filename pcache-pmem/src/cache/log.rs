//! The key log (spec §2.9.6): the open ksets writers append keys to, the
//! key head where closed ksets go, the published end of the closed ksets,
//! the key and dirty tails, and the flusher that closes ksets after the
//! flush delay.
//!
//! A kset is written over a durable terminator, after the terminator that
//! follows it was made durable, so that replay stops right after the newest
//! kset; a segment without room for a kset and a LAST kset continues in a
//! new segment.
//!
//! On a device with bulk sync (an msync'd file) a close costs one sync: the
//! kset's terminator is stored, then one [`Pmem::sync_all`] makes it
//! durable together with the data of the kset's keys (group commit) and the
//! ksets stored before, and only then is the kset stored, without a sync of
//! its own. A closed kset is then durable at the next sync: the one a flush
//! or FUA write asks for ([`Log::sync_closed`]), the next close's, or the
//! one before the dirty tail moves past it. There a full kset is sealed
//! rather than stored by the writer that filled it: the flusher stores
//! sealed ksets in the order they were sealed, so that no writer waits for
//! an `msync` unless it asked for durability (or the flusher falls
//! [`MAX_SEALED`] behind).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pcache_format::{
    CACHE_SEG_DATA_SIZE, CACHE_SUBTREE_SHIFT, CachePos, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_ONMEDIA_SIZE_MAX, Key,
    TERMINATOR, encode_kset, encode_last, kset_size,
};

use super::ctx::{Ctx, lock};
use super::error::EngineError;
use super::load::LogPos;
use super::space::{For, Space};
use crate::pmem::Pmem;
use crate::records::write_record;

/// Sealed ksets waiting to be stored (bulk sync) at which the writer that
/// seals one stores them all itself.
pub(super) const MAX_SEALED: usize = 4;

/// A kset being filled in memory.
#[derive(Debug, Default)]
struct OpenKset {
    keys: Vec<Key>,
    /// Its number among the ksets of this queue: the ones before it are
    /// closed (stored, or sealed and waiting to be).
    batch: u64,
    first_key_at: Option<Instant>,
}

/// A closed kset waiting to be stored (bulk sync).
#[derive(Debug)]
struct Sealed {
    kset: usize,
    batch: u64,
    keys: Vec<Key>,
}

/// Where a key went: its open kset and that kset's batch number. The key
/// is on the log once that batch is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ticket {
    kset: usize,
    batch: u64,
}

/// Which tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tail {
    /// The oldest kset still owned: GC moves it.
    Key,
    /// The oldest kset not written back: writeback moves it.
    Dirty,
}

/// The key log of one cache.
#[derive(Debug)]
pub(super) struct Log {
    ksets: Vec<Mutex<OpenKset>>,
    /// Per open kset: every batch numbered below this is stored.
    stored_batches: Vec<AtomicU64>,
    /// Sealed ksets, oldest first.
    sealed: Mutex<VecDeque<Sealed>>,
    /// Held while sealed ksets are stored, so that they are stored in the
    /// order they were sealed.
    storing: Mutex<()>,
    /// Whether the flusher stores sealed ksets as they come; without
    /// background work they wait for [`MAX_SEALED`], a flush or the delay.
    background: bool,
    key_head: Mutex<LogPos>,
    /// The end of the closed ksets, published after each close so that
    /// writeback and GC never wait for a close in progress.
    end: AtomicU64,
    key_tail: Mutex<LogPos>,
    dirty_tail: Mutex<LogPos>,
    flush_delay: Duration,
    /// Bulk sync only: ksets stored so far, counted after each is stored.
    stored: AtomicU64,
    /// Bulk sync only: every kset counted in `stored` up to this value is
    /// durable (the value `stored` had before a sync that completed).
    synced: AtomicU64,
}

fn pack(p: LogPos) -> u64 {
    (u64::from(p.seg) << 32) | u64::from(p.off)
}

fn unpack(v: u64) -> LogPos {
    LogPos { seg: (v >> 32) as u32, off: v as u32 }
}

impl Log {
    /// The log of a loaded cache with `queues` open ksets, whose flusher
    /// stores sealed ksets as they come if `background`.
    pub(super) fn new(
        queues: u32,
        (head, key_tail, dirty_tail): (LogPos, LogPos, LogPos),
        flush_delay: Duration,
        background: bool,
    ) -> Self {
        Self {
            ksets: (0..queues).map(|_| Mutex::new(OpenKset::default())).collect(),
            stored_batches: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            sealed: Mutex::new(VecDeque::new()),
            storing: Mutex::new(()),
            background,
            key_head: Mutex::new(head),
            end: AtomicU64::new(pack(head)),
            key_tail: Mutex::new(key_tail),
            dirty_tail: Mutex::new(dirty_tail),
            flush_delay,
            stored: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        }
    }

    /// The end of the closed ksets.
    pub(super) fn end(&self) -> LogPos {
        unpack(self.end.load(Ordering::Acquire))
    }

    /// The key tail, held: GC holds it for a whole step.
    pub(super) fn key_tail(&self) -> MutexGuard<'_, LogPos> {
        lock(&self.key_tail)
    }

    /// The dirty tail as last published.
    pub(super) fn dirty_tail(&self) -> LogPos {
        *lock(&self.dirty_tail)
    }

    /// Publishes the dirty tail, once it is durable.
    pub(super) fn publish_dirty_tail(&self, at: LogPos) {
        *lock(&self.dirty_tail) = at;
    }

    /// Persists tail `which` at `pos` (one copy, the older).
    /// On a device with bulk sync, the ksets before the dirty tail's new
    /// position are made durable first: a tail never points past the
    /// durable end of the log. The key tail needs no sync of its own: it
    /// never passes the published dirty tail, whose persist made every
    /// kset before it durable.
    pub(super) fn persist_tail<P: Pmem>(&self, space: &Space<P>, which: Tail, pos: LogPos) -> Result<(), EngineError> {
        if which == Tail::Dirty {
            self.sync_closed(space)?;
        }
        let (key, dirty) = space.tail_addrs()?;
        let at = match which {
            Tail::Key => key,
            Tail::Dirty => dirty,
        };
        write_record(space.pmem(), space.layout().dialect(), at, &CachePos::new(pos.seg, pos.off))?;
        Ok(())
    }

    fn kset_index(&self, off: u64) -> usize {
        ((off >> CACHE_SUBTREE_SHIFT) % self.ksets.len() as u64) as usize
    }

    /// Appends `key` (for backing offset `off`) to its kset, closing the
    /// kset when full: stored at once on pmem, sealed for the flusher on a
    /// device with bulk sync. Called under the slice lock of `off`.
    pub(super) fn append<P: Pmem>(&self, key: Key, space: &Space<P>, ctx: &Ctx) -> Result<Ticket, EngineError> {
        let idx = self.kset_index(key.off.get());
        let mut kset = lock(&self.ksets[idx]);
        let dirty = if key.is_dirty() { i64::from(key.len.get()) } else { 0 };
        kset.keys.push(key);
        if kset.first_key_at.is_none() {
            kset.first_key_at = Some(Instant::now());
        }
        let ticket = Ticket { kset: idx, batch: kset.batch };
        ctx.stats.dirty_pending.add(dirty);
        if kset.keys.len() < KSET_KEYS_MAX {
            return Ok(ticket);
        }
        if !space.pmem().bulk_sync() {
            if let Err(e) = self.close(idx, &mut kset, space, ctx) {
                kset.keys.pop();
                ctx.stats.dirty_pending.add(-dirty);
                return Err(e);
            }
            return Ok(ticket);
        }
        let waiting = self.seal(idx, &mut kset);
        drop(kset);
        if waiting >= MAX_SEALED {
            // The flusher falls behind, or there is none: this writer
            // stores them. A failure leaves them sealed, to be stored again
            // by the next store; the flush or FUA write waiting for them
            // reports it. The key itself is accepted either way.
            let _ = self.store_sealed(space, ctx);
        } else if self.background {
            ctx.wake.notify();
        }
        Ok(ticket)
    }

    /// Closes open kset `idx` (pmem: stored at once).
    fn close<P: Pmem>(&self, idx: usize, kset: &mut OpenKset, space: &Space<P>, ctx: &Ctx) -> Result<(), EngineError> {
        if kset.keys.is_empty() {
            return Ok(());
        }
        self.store(&kset.keys, space, ctx)?;
        kset.keys.clear();
        kset.batch += 1;
        kset.first_key_at = None;
        self.stored_batches[idx].store(kset.batch, Ordering::Release);
        Ok(())
    }

    /// Seals open kset `idx` (bulk sync): its keys wait for
    /// [`Log::store_sealed`] behind those sealed before. Returns how many
    /// sealed ksets wait now.
    fn seal(&self, idx: usize, kset: &mut OpenKset) -> usize {
        if kset.keys.is_empty() {
            return lock(&self.sealed).len();
        }
        let keys = std::mem::replace(&mut kset.keys, Vec::with_capacity(KSET_KEYS_MAX));
        let mut sealed = lock(&self.sealed);
        sealed.push_back(Sealed { kset: idx, batch: kset.batch, keys });
        kset.batch += 1;
        kset.first_key_at = None;
        sealed.len()
    }

    /// Stores every sealed kset, oldest first. On a failure the ones not
    /// stored stay sealed, in order, for the next call.
    fn store_sealed<P: Pmem>(&self, space: &Space<P>, ctx: &Ctx) -> Result<(), EngineError> {
        let _order = lock(&self.storing);
        loop {
            let Some(next) = lock(&self.sealed).pop_front() else { return Ok(()) };
            if let Err(e) = self.store(&next.keys, space, ctx) {
                lock(&self.sealed).push_front(next);
                return Err(e);
            }
            self.stored_batches[next.kset].store(next.batch + 1, Ordering::Release);
        }
    }

    /// Writes `keys` as one kset at the key head.
    fn store<P: Pmem>(&self, keys: &[Key], space: &Space<P>, ctx: &Ctx) -> Result<(), EngineError> {
        let size = kset_size(keys.len());
        let mut buf = [0u8; KSET_ONMEDIA_SIZE_MAX];
        encode_kset(space.layout().dialect(), keys, &mut buf)?;
        let pmem = space.pmem();
        let mut head = lock(&self.key_head);
        let room = (CACHE_SEG_DATA_SIZE - head.off) as usize;
        if room < size + KSET_HEADER_SIZE {
            *head = self.chain_segment(*head, space, ctx)?;
        }
        let terminator = space.data_addr(head.seg, head.off + size as u32, KSET_HEADER_SIZE as u32)?;
        let at = space.data_addr(head.seg, head.off, size as u32)?;
        if pmem.bulk_sync() {
            self.store_grouped(pmem, terminator, at, &buf[..size])?;
        } else {
            if crate::mutation::active(crate::mutation::Mutation::NoFenceTerminator) {
                pmem.copy_nodrain(terminator, &TERMINATOR)?;
            } else {
                pmem.copy_persist(terminator, &TERMINATOR)?;
            }
            pmem.copy_persist(at, &buf[..size])?;
        }
        head.off += size as u32;
        self.end.store(pack(*head), Ordering::Release);
        drop(head);
        if keys.iter().any(Key::is_dirty) {
            ctx.wake.notify();
        }
        ctx.stats.ksets_closed.add(1);
        Ok(())
    }

    /// Group commit (bulk sync): the terminator stored, one sync that makes
    /// it durable with the data of the kset's keys (and of any stored since)
    /// and the ksets stored before, then the kset stored over the previous
    /// terminator, durable at the next sync. Under the key head's lock, so
    /// that ksets are stored in log order.
    fn store_grouped<P: Pmem>(&self, pmem: &P, terminator: u64, at: u64, kset: &[u8]) -> Result<(), EngineError> {
        use crate::mutation::{Mutation, active};
        if active(Mutation::NoFenceTerminator) {
            // The terminator stored after the sync: nothing orders it
            // before the kset.
            if !active(Mutation::NoGroupCommitSync) {
                self.sync(pmem)?;
            }
            pmem.write(terminator, &TERMINATOR)?;
        } else {
            pmem.write(terminator, &TERMINATOR)?;
            if !active(Mutation::NoGroupCommitSync) {
                self.sync(pmem)?;
            }
        }
        pmem.write(at, kset)?;
        self.stored.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// One [`Pmem::sync_all`], recording the ksets it made durable.
    fn sync<P: Pmem>(&self, pmem: &P) -> Result<(), EngineError> {
        let stored = self.stored.load(Ordering::Acquire);
        pmem.sync_all()?;
        self.synced.fetch_max(stored, Ordering::AcqRel);
        Ok(())
    }

    /// On a device with bulk sync, makes every kset closed so far durable,
    /// unless a sync since its close already did; on real pmem a closed
    /// kset is durable already.
    pub(super) fn sync_closed<P: Pmem>(&self, space: &Space<P>) -> Result<(), EngineError> {
        let pmem = space.pmem();
        if pmem.bulk_sync() && self.synced.load(Ordering::Acquire) < self.stored.load(Ordering::Acquire) {
            self.sync(pmem)?;
        }
        Ok(())
    }

    /// Continues the log at `head` in a new segment: its terminator first,
    /// then the LAST kset pointing at it. Returns the new head.
    fn chain_segment<P: Pmem>(&self, head: LogPos, space: &Space<P>, ctx: &Ctx) -> Result<LogPos, EngineError> {
        let next = space.get_segment(For::Log, ctx)?;
        let chain = || -> Result<(), EngineError> {
            let pmem = space.pmem();
            pmem.copy_persist(space.data_addr(next, 0, KSET_HEADER_SIZE as u32)?, &TERMINATOR)?;
            pmem.copy_persist(
                space.data_addr(head.seg, head.off, KSET_HEADER_SIZE as u32)?,
                &encode_last(space.layout().dialect(), next),
            )?;
            Ok(())
        };
        if let Err(e) = chain() {
            // The LAST kset pointing at the new segment was not written
            // (or not made durable): nothing refers to it; give it back.
            space.free_segment(next);
            return Err(e);
        }
        Ok(LogPos { seg: next, off: 0 })
    }

    /// Ends open kset `idx`'s batch: stored at once on pmem, sealed for
    /// [`Log::store_sealed`] on a device with bulk sync.
    fn close_or_seal<P: Pmem>(
        &self,
        idx: usize,
        kset: &mut OpenKset,
        space: &Space<P>,
        ctx: &Ctx,
    ) -> Result<(), EngineError> {
        if space.pmem().bulk_sync() {
            self.seal(idx, kset);
            Ok(())
        } else {
            self.close(idx, kset, space, ctx)
        }
    }

    /// Stores the sealed ksets (bulk sync), then makes every kset closed
    /// so far durable.
    fn commit_closed<P: Pmem>(&self, space: &Space<P>, ctx: &Ctx) -> Result<(), EngineError> {
        if space.pmem().bulk_sync() {
            self.store_sealed(space, ctx)?;
        }
        self.sync_closed(space)
    }

    /// Closes every open kset; every kset closed before is durable on
    /// return.
    pub(super) fn flush_all<P: Pmem>(&self, space: &Space<P>, ctx: &Ctx) -> Result<(), EngineError> {
        for (idx, k) in self.ksets.iter().enumerate() {
            self.close_or_seal(idx, &mut lock(k), space, ctx)?;
        }
        self.commit_closed(space, ctx)
    }

    /// Closes each kset of `tickets` that has not closed since the append;
    /// the keys of every ticket are durable on return.
    pub(super) fn close_since<P: Pmem>(
        &self,
        tickets: &[Ticket],
        space: &Space<P>,
        ctx: &Ctx,
    ) -> Result<(), EngineError> {
        if tickets.is_empty() {
            return Ok(());
        }
        for t in tickets {
            if self.stored_batches[t.kset].load(Ordering::Acquire) > t.batch {
                continue;
            }
            let mut kset = lock(&self.ksets[t.kset]);
            if kset.batch == t.batch {
                self.close_or_seal(t.kset, &mut kset, space, ctx)?;
            }
        }
        // Every ticket's kset is stored or sealed: once the sealed ones
        // are stored (after any store in progress), all are.
        self.commit_closed(space, ctx)
    }

    /// Closes ksets whose first key is older than the flush delay, until
    /// the cache stops.
    pub(super) fn flusher<P: Pmem>(&self, space: &Space<P>, ctx: &Ctx) {
        let tick = (self.flush_delay / 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
        loop {
            let seen = ctx.wake.current();
            if ctx.stopping() {
                return;
            }
            ctx.wake.wait(seen, tick);
            if ctx.stopping() {
                return;
            }
            let bulk = space.pmem().bulk_sync();
            let mut store = bulk && self.background;
            for (idx, k) in self.ksets.iter().enumerate() {
                let mut kset = lock(k);
                // Closed at the last tick before the delay runs out, so no
                // key waits longer than the delay for durability.
                if kset.first_key_at.is_some_and(|t| t.elapsed() + tick >= self.flush_delay) {
                    // A failure is retried on the next tick; flush()
                    // reports it.
                    let _ = self.close_or_seal(idx, &mut kset, space, ctx);
                    store |= bulk;
                }
            }
            if store {
                // Likewise.
                let _ = self.store_sealed(space, ctx);
            }
        }
    }

    /// The dirty keys of the open and sealed ksets not busy right now.
    pub(super) fn open_dirty_keys(&self) -> Vec<Key> {
        let mut keys = Vec::new();
        for kset in &self.ksets {
            let Ok(kset) = kset.try_lock() else { continue };
            keys.extend(kset.keys.iter().filter(|k| k.is_dirty()).copied());
        }
        if let Ok(sealed) = self.sealed.try_lock() {
            for s in sealed.iter() {
                keys.extend(s.keys.iter().filter(|k| k.is_dirty()).copied());
            }
        }
        keys
    }
}
