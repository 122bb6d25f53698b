//! The request paths: writes, reads, discards. A write's data is made
//! durable in pmem first, then its key goes into an open kset and the
//! index under the slice lock. A read takes what the index has, fills
//! misses from the backing device (and caches them as CLEAN keys behind
//! placeholders), and waits for fills of other readers it meets.
//!
//! When the cache is full, the request path closes the open ksets (so that
//! writeback sees their keys and can free the data they hold) and then
//! waits for space: that policy lives here, not in [`Space`].

use std::sync::atomic::{Ordering, fence};

use pcache_format::{CACHE_SUBTREE_SIZE, Dialect, Layout};

use super::ctx::Ctx;
use super::error::EngineError;
use super::fill::Fills;
use super::index::{Delta, IKey, Index, KeyState, Piece, slice_end};
use super::log::{Log, Ticket};
use super::space::{Extent, Space};
use crate::backing::BackingDev;
use crate::pmem::Pmem;

/// The roles a request goes through.
#[derive(Debug)]
pub(super) struct Roles<'a, P> {
    pub(super) space: &'a Space<P>,
    pub(super) log: &'a Log,
    pub(super) ctx: &'a Ctx,
}

// Not derived: a derive would ask `P: Copy`, and only references are copied.
impl<P> Clone for Roles<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Roles<'_, P> {}

/// What the request paths own: the backing device, the index and the
/// fills in progress.
#[derive(Debug)]
pub(super) struct Io<B> {
    backing: B,
    dev_size: u64,
    /// Whether keys carry a data CRC, and the dialect computing it.
    data_crc: Option<Dialect>,
    cache_reads: bool,
    index: Index,
    fills: Fills,
    /// Ranges whose clean keys a discard dropped from the index since the
    /// cache started (start → end): replay would bring them back, so a
    /// range that overlaps one is never zeroed on the backing device alone.
    discarded: std::sync::Mutex<std::collections::BTreeMap<u64, u64>>,
}

/// Bytes of one read: from the cache and from the backing device.
#[derive(Debug, Clone, Copy, Default)]
struct Served {
    cached: u64,
    backing: u64,
}

/// A miss this reader fills: its placeholder's range and fill id.
#[derive(Debug, Clone, Copy)]
struct OwnFill {
    off: u64,
    len: u32,
    id: u32,
}

impl<B: BackingDev> Io<B> {
    pub(super) fn new(backing: B, data_crc: Option<Dialect>, cache_reads: bool, index: Index) -> Self {
        let dev_size = backing.size();
        Self { backing, dev_size, data_crc, cache_reads, index, fills: Fills::default(), discarded: Default::default() }
    }

    pub(super) fn backing(&self) -> &B {
        &self.backing
    }

    pub(super) fn dev_size(&self) -> u64 {
        self.dev_size
    }

    pub(super) fn data_crc(&self) -> bool {
        self.data_crc.is_some()
    }

    pub(super) fn index(&self) -> &Index {
        &self.index
    }

    /// Refuses a range past the end of the backing device.
    pub(super) fn check_range(&self, off: u64, len: u64) -> Result<(), EngineError> {
        match off.checked_add(len) {
            Some(end) if end <= self.dev_size => Ok(()),
            _ => Err(EngineError::OutOfRange { off, len, size: self.dev_size }),
        }
    }

    /// Room for up to `len` bytes of data. With the cache full, closes the
    /// open ksets first, then waits for writeback and GC to free space.
    fn alloc<P: Pmem>(&self, len: u32, r: Roles<'_, P>) -> Result<Extent, EngineError> {
        if let Some(e) = r.space.alloc(len, false, r.ctx)? {
            return Ok(e);
        }
        // Make the keys of open ksets visible to writeback, so that the data
        // they hold can be written back and freed.
        let _ = r.log.flush_all(r.space, r.ctx);
        r.space.alloc(len, true, r.ctx)?.ok_or(EngineError::CacheFull)
    }

    /// Writes `data` at `off`; with `fua`, the ksets its keys went to are
    /// closed before the call returns.
    pub(super) fn write<P: Pmem>(&self, off: u64, data: &[u8], fua: bool, r: Roles<'_, P>) -> Result<(), EngineError> {
        let mut tickets = Vec::new();
        let mut done = 0usize;
        while done < data.len() {
            let at = off + done as u64;
            let chunk = ((slice_end(at) - at) as usize).min(data.len() - done);
            let (n, ticket) = self.write_piece(at, &data[done..done + chunk], r)?;
            if fua && !tickets.contains(&ticket) {
                tickets.push(ticket);
            }
            done += n;
        }
        r.log.close_since(&tickets, r.space, r.ctx)
    }

    /// Writes the first part of `data` (inside one slice) that fits one data
    /// allocation; returns its length and where its key went.
    fn write_piece<P: Pmem>(&self, off: u64, data: &[u8], r: Roles<'_, P>) -> Result<(usize, Ticket), EngineError> {
        let ext = self.alloc(data.len() as u32, r)?;
        let piece = &data[..ext.len as usize];
        let stored = r.space.put_data(ext.seg, ext.off, piece);
        if let Err(e) = stored {
            r.space.put_ref(ext.seg, r.ctx)?;
            return Err(e);
        }
        let key = self.new_key(ext, piece, KeyState::Dirty);
        let mut slice = self.index.slice(off);
        match r.log.append(key.to_media(off), r.space, r.ctx) {
            Ok(ticket) => {
                let mut d = Delta::default();
                slice.insert(off, key, &mut d);
                drop(slice);
                r.ctx.stats.apply(&d);
                Ok((ext.len as usize, ticket))
            }
            Err(e) => {
                drop(slice);
                r.space.put_ref(ext.seg, r.ctx)?;
                Err(e)
            }
        }
    }

    /// The key of `data` stored in `ext`.
    fn new_key(&self, ext: Extent, data: &[u8], state: KeyState) -> IKey {
        let crc = self.data_crc.map_or(0, |d| d.crc(data));
        let len = data.len() as u32;
        IKey { seg_gen: ext.gen_, len, cache_seg: ext.seg, seg_off: ext.off, crc, orig_delta: 0, orig_len: len, state }
    }

    /// Writes `len` zero bytes at `off`.
    pub(super) fn write_zeroes<P: Pmem>(
        &self,
        off: u64,
        len: u64,
        fua: bool,
        r: Roles<'_, P>,
    ) -> Result<(), EngineError> {
        let mut zeros = Vec::new();
        let mut on_backing = false;
        let (end, mut at) = (off + len, off);
        while at < end {
            let to = slice_end(at).min(end);
            if self.zero_on_backing(at, to, r.ctx)? {
                on_backing = true;
            } else {
                if zeros.is_empty() {
                    zeros = vec![0u8; len.min(CACHE_SUBTREE_SIZE) as usize];
                }
                let mut done = at;
                while done < to {
                    let n = (to - done).min(zeros.len() as u64);
                    self.write(done, &zeros[..n as usize], false, r)?;
                    done += n;
                }
            }
            at = to;
        }
        // Zeroes written past the cache are durable before they are
        // acknowledged, so that a flush need never sync the backing device.
        if on_backing {
            self.backing.sync()?;
        }
        if fua {
            r.log.flush_all(r.space, r.ctx)?;
        }
        Ok(())
    }

    /// Zeroes `[at, to)` (inside one slice) on the backing device alone,
    /// costing no pmem, if that is both cheap (the device zeroes without
    /// writing zeros) and right: the cache holds nothing of the range —
    /// no key, dirty, clean or being filled, and none that a discard
    /// dropped and replay would bring back — so nothing older can be
    /// served or written back over the zeroes. The slice stays locked
    /// meanwhile, so no write or fill of the range can start.
    fn zero_on_backing(&self, at: u64, to: u64, ctx: &Ctx) -> Result<bool, EngineError> {
        {
            let discarded = self.discarded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if discarded.range(..to).next_back().is_some_and(|(_, &e)| e > at) {
                return Ok(false);
            }
        }
        let slice = self.index.slice(at);
        if slice.overlapping(at, to).next().is_some() {
            return Ok(false);
        }
        let zeroed = self.backing.zero(at, to - at)?;
        drop(slice);
        if zeroed {
            ctx.stats.zeroed_on_backing.fetch_add(to - at, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(zeroed)
    }

    /// Drops clean cached copies of `[off, off + len)`.
    pub(super) fn discard(&self, off: u64, len: u64, ctx: &Ctx) {
        {
            let mut d = self.discarded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (mut s, mut e) = (off, off + len);
            let touching: Vec<(u64, u64)> =
                d.range(..=e).filter(|&(_, &end)| end >= s).map(|(&a, &b)| (a, b)).collect();
            for (a, b) in touching {
                d.remove(&a);
                (s, e) = (s.min(a), e.max(b));
            }
            d.insert(s, e);
        }
        let end = off + len;
        let mut at = off;
        while at < end {
            let to = slice_end(at).min(end);
            let mut d = Delta::default();
            self.index.slice(at).drop_clean(at, to, &mut d);
            ctx.stats.apply(&d);
            at = to;
        }
    }

    /// Whether all of `[off, off + len)` is cached.
    pub(super) fn is_cached<P: Pmem>(&self, off: u64, len: u64, space: &Space<P>) -> bool {
        if self.check_range(off, len).is_err() {
            return false;
        }
        let end = off + len;
        let mut at = off;
        while at < end {
            let to = slice_end(at).min(end);
            let mut pos = at;
            let slice = self.index.slice_shared(at);
            while pos < to {
                match slice.covering(pos, pos + 1) {
                    Some((ts, k)) if !k.is_filling() && !space.is_stale(&k) => pos = ts + u64::from(k.len),
                    _ => return false,
                }
            }
            at = to;
        }
        true
    }

    /// The runs of `[off, off + len)` the cache holds (merged, in order):
    /// what a read of them would serve without the backing device.
    pub(super) fn cached_ranges<P: Pmem>(&self, off: u64, len: u64, space: &Space<P>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        if self.check_range(off, len).is_err() {
            return out;
        }
        let end = off + len;
        let mut at = off;
        while at < end {
            let to = slice_end(at).min(end);
            let slice = self.index.slice_shared(at);
            for (ts, k) in slice.overlapping(at, to) {
                if k.is_filling() || space.is_stale(&k) {
                    continue;
                }
                let (s, e) = (ts.max(at), (ts + u64::from(k.len)).min(to));
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == s => last.1 += e - s,
                    _ => out.push((s, e - s)),
                }
            }
            at = to;
        }
        out
    }

    /// Reads `buf.len()` bytes at `off` and counts the read.
    pub(super) fn read<P: Pmem>(&self, off: u64, buf: &mut [u8], r: Roles<'_, P>) -> Result<(), EngineError> {
        let mut served = Served::default();
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let chunk = ((slice_end(at) - at) as usize).min(buf.len() - done);
            let s = self.read_chunk(at, &mut buf[done..done + chunk], r)?;
            served.cached += s.cached;
            served.backing += s.backing;
            done += chunk;
        }
        let s = &r.ctx.stats;
        s.bytes_from_cache.add(served.cached as i64);
        s.bytes_from_backing.add(served.backing as i64);
        let counter = match (served.cached > 0, served.backing > 0) {
            (true, false) => &s.full_hits,
            (true, true) => &s.partial_hits,
            _ => &s.misses,
        };
        if !buf.is_empty() {
            counter.add(1);
        }
        Ok(())
    }

    /// Copies `out.len()` bytes of `key` (at backing offset `key_off`)
    /// starting `skip` bytes into it; false when the key went stale while
    /// it was read (the caller looks again).
    fn copy_hit<P: Pmem>(
        &self,
        key_off: u64,
        key: &IKey,
        skip: u32,
        out: &mut [u8],
        space: &Space<P>,
    ) -> Result<bool, EngineError> {
        let read = read_extent(
            space.pmem(),
            space.layout(),
            space.dev_segs(),
            self.data_crc.is_some(),
            key_off,
            key,
            skip,
            out,
        );
        fence(Ordering::Acquire);
        if space.is_stale(key) {
            return Ok(false);
        }
        read.map(|()| true)
    }

    /// Reads within one slice.
    fn read_chunk<P: Pmem>(&self, off: u64, out: &mut [u8], r: Roles<'_, P>) -> Result<Served, EngineError> {
        let end = off + out.len() as u64;
        // The common case: one live key covers the whole range.
        let covering =
            self.index.slice_shared(off).covering(off, end).filter(|(_, k)| !k.is_filling() && !r.space.is_stale(k));
        if let Some((ts, key)) = covering
            && self.copy_hit(ts, &key, (off - ts) as u32, out, r.space)?
        {
            return Ok(Served { cached: out.len() as u64, backing: 0 });
        }
        loop {
            let (pieces, mine) = self.plan_read(off, end, r);
            let mut waits = Vec::new();
            let result = self.serve(off, &pieces, out, &mut waits, r.space);
            // Cache what was read (or drop the placeholders on failure), then
            // wake readers waiting for these fills.
            for f in &mine {
                if result.is_ok() {
                    let at = (f.off - off) as usize;
                    self.fill(f.off, &out[at..at + f.len as usize], f.id, r);
                }
                self.end_fill(f.off, f.id);
            }
            match result {
                Ok(Some(served)) => return Ok(served),
                Ok(None) => {
                    for id in waits {
                        self.fills.wait(id);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Under the slice lock: drops stale keys, maps `[off, end)` to pieces,
    /// and puts a placeholder on each miss this reader will fill (unless
    /// read misses are not cached at all).
    fn plan_read<P: Pmem>(&self, off: u64, end: u64, r: Roles<'_, P>) -> (Vec<Piece>, Vec<OwnFill>) {
        let mut slice = self.index.slice(off);
        let mut d = Delta::default();
        slice.drop_stale(off, end, |k| r.space.is_stale(k), &mut d);
        let pieces = slice.lookup(off, end);
        let mut mine = Vec::new();
        let misses = if self.cache_reads { &pieces[..] } else { &[] };
        for p in misses {
            if let Piece::Miss { off: m, len } = *p {
                let id = self.fills.start();
                slice.insert(m, IKey::placeholder(len, id), &mut d);
                mine.push(OwnFill { off: m, len, id });
            }
        }
        r.ctx.stats.apply(&d);
        (pieces, mine)
    }

    /// Copies each piece into `out`: hits from pmem, misses from the
    /// backing device. `None` when a piece must be looked up again (a key
    /// went stale, or another reader's fill was pending: its id is pushed
    /// on `waits`, waited for once this reader's own fills are done, so
    /// that a reader never waits while others wait for it).
    fn serve<P: Pmem>(
        &self,
        off: u64,
        pieces: &[Piece],
        out: &mut [u8],
        waits: &mut Vec<u32>,
        space: &Space<P>,
    ) -> Result<Option<Served>, EngineError> {
        let mut served = Served::default();
        let mut again = false;
        for p in pieces {
            match *p {
                Piece::Hit { off: h, len, key, skip } => {
                    let at = (h - off) as usize;
                    if self.copy_hit(h - u64::from(skip), &key, skip, &mut out[at..at + len as usize], space)? {
                        served.cached += u64::from(len);
                    } else {
                        again = true;
                    }
                }
                Piece::Pending { id, .. } => {
                    waits.push(id);
                    again = true;
                }
                Piece::Miss { off: m, len } => {
                    let at = (m - off) as usize;
                    self.backing.read_at(m, &mut out[at..at + len as usize])?;
                    served.backing += u64::from(len);
                }
            }
        }
        Ok((!again).then_some(served))
    }

    /// Caches `data` read from the backing device for placeholder `id` at
    /// `off`, as CLEAN keys, as far as there is space and the placeholder
    /// has not been overwritten meanwhile.
    fn fill<P: Pmem>(&self, off: u64, data: &[u8], id: u32, r: Roles<'_, P>) {
        let mut done = 0usize;
        while done < data.len() {
            let at = off + done as u64;
            let Ok(Some(ext)) = r.space.alloc((data.len() - done) as u32, false, r.ctx) else { return };
            let piece = &data[done..done + ext.len as usize];
            let stored = r.space.put_data(ext.seg, ext.off, piece);
            let mut slice = self.index.slice(at);
            let current = slice.get(at).filter(|k| k.fill_id() == Some(id));
            let (Some(ph), Ok(())) = (current, stored) else {
                drop(slice);
                let _ = r.space.put_ref(ext.seg, r.ctx);
                return;
            };
            let take = ext.len.min(ph.len);
            let key = self.new_key(ext, &piece[..take as usize], KeyState::Clean);
            if r.log.append(key.to_media(at), r.space, r.ctx).is_err() {
                drop(slice);
                let _ = r.space.put_ref(ext.seg, r.ctx);
                return;
            }
            let mut d = Delta::default();
            slice.remove(at, &mut d);
            slice.insert(at, key, &mut d);
            if ph.len > take {
                slice.insert(at + u64::from(take), IKey::placeholder(ph.len - take, id), &mut d);
            }
            drop(slice);
            r.ctx.stats.apply(&d);
            if take < ext.len {
                // The placeholder was cut back by a write: nothing more to fill.
                return;
            }
            done += take as usize;
        }
    }

    /// Removes what is left of placeholder `id` and wakes its waiters.
    fn end_fill(&self, off: u64, id: u32) {
        {
            let mut slice = self.index.slice(off);
            let left: Vec<u64> = slice
                .overlapping(off, slice_end(off))
                .filter(|(_, k)| k.fill_id() == Some(id))
                .map(|(o, _)| o)
                .collect();
            let mut d = Delta::default();
            for o in left {
                slice.remove(o, &mut d);
            }
        }
        self.fills.finish(id);
    }
}

/// Reads `out.len()` bytes of the data of key `k` (at backing offset
/// `key_off`), starting `skip` bytes into it, out of pmem. With `data_crc`,
/// the whole write the key came from is read and its CRC verified first:
/// a mismatch is [`EngineError::DataCrc`], never data. Shared by reads,
/// writeback and salvage.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_extent<P: Pmem + ?Sized>(
    pmem: &P,
    layout: &Layout,
    dev_segs: &[u32],
    data_crc: bool,
    key_off: u64,
    k: &IKey,
    skip: u32,
    out: &mut [u8],
) -> Result<(), EngineError> {
    let addr = |seg_off: u32, len: u32| -> Result<u64, EngineError> {
        let dev_seg = *dev_segs
            .get(k.cache_seg as usize)
            .ok_or_else(|| EngineError::Corrupt(format!("cache segment {}", k.cache_seg)))?;
        Ok(layout.data_range(dev_seg, seg_off, len)?)
    };
    let len = out.len() as u32;
    if !data_crc {
        pmem.read(addr(k.seg_off + skip, len)?, out)?;
        return Ok(());
    }
    let mut whole = vec![0u8; k.orig_len as usize];
    pmem.read(addr(k.seg_off - k.orig_delta, k.orig_len)?, &mut whole)?;
    let computed = layout.dialect().crc(&whole);
    if computed != k.crc {
        return Err(EngineError::DataCrc {
            off: key_off - u64::from(k.orig_delta),
            len: k.orig_len,
            stored: k.crc,
            computed,
        });
    }
    let from = (k.orig_delta + skip) as usize;
    out.copy_from_slice(&whole[from..from + len as usize]);
    Ok(())
}
