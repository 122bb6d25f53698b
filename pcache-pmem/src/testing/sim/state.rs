//! The simulator's state: a sparse durable image, the program-order view,
//! and the store units not yet durable, per cache line.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::thread::ThreadId;

use super::crash::CrashState;
use crate::pmem::CACHE_LINE;

/// Size of a storage page of the simulator.
pub(super) const PAGE: u64 = 4096;
/// Size of a power-fail atomic unit.
pub(super) const WORD: u64 = 8;

/// One sparse storage page.
pub(super) type Page = [u8; PAGE as usize];
/// Sparse image: page index to page; an absent page is all zeros.
pub(super) type Pages = BTreeMap<u64, Arc<Page>>;

/// One store unit: the bytes `mask` selects of the aligned word at `off`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Unit {
    /// Global program-order sequence number of the unit.
    pub(super) seq: u64,
    /// Offset of the aligned 8-byte word.
    pub(super) off: u64,
    /// Which of the word's bytes the store covers (bit `i` = byte `off + i`).
    pub(super) mask: u8,
    /// The stored bytes (only those in `mask` are meaningful).
    pub(super) data: [u8; WORD as usize],
}

impl Unit {
    /// Applies units, all of one line, in order, to a sparse image: the
    /// line's page is looked up (and copied on write) once.
    pub(super) fn apply_all(units: &[Unit], pages: &mut Pages) {
        let Some(first) = units.first() else { return };
        let page = Arc::make_mut(pages.entry(first.off / PAGE).or_insert_with(zero_page));
        for unit in units {
            debug_assert_eq!(unit.off / CACHE_LINE, first.off / CACHE_LINE, "units of one line");
            unit.apply_in(page);
        }
    }

    /// Applies the unit to its page.
    fn apply_in(&self, page: &mut Page) {
        let base = (self.off % PAGE) as usize;
        let dst = &mut page[base..base + WORD as usize];
        if self.mask == u8::MAX {
            dst.copy_from_slice(&self.data);
            return;
        }
        for (i, (d, &b)) in dst.iter_mut().zip(&self.data).enumerate() {
            if self.mask & (1 << i) != 0 {
                *d = b;
            }
        }
    }
}

pub(super) fn zero_page() -> Arc<Page> {
    Arc::new([0; PAGE as usize])
}

/// Copies `[off, off + buf.len())` of a sparse image into `buf`.
pub(super) fn read_pages(pages: &Pages, off: u64, buf: &mut [u8]) {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = off + done as u64;
        let in_page = (pos % PAGE) as usize;
        let n = (PAGE as usize - in_page).min(buf.len() - done);
        let dst = &mut buf[done..done + n];
        match pages.get(&(pos / PAGE)) {
            Some(page) => dst.copy_from_slice(&page[in_page..in_page + n]),
            None => dst.fill(0),
        }
        done += n;
    }
}

/// Whether `[a, a + alen)` and `[b, b + blen)` overlap (empty ranges overlap nothing).
pub(super) fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen != 0 && blen != 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// The simulator state proper (everything but the hook).
pub(super) struct State {
    pub(super) size: u64,
    /// What survives a power failure for certain.
    pub(super) durable: Pages,
    /// The program-order view: `durable` plus every pending unit.
    pub(super) current: Pages,
    /// Per line, the units not yet durable, in program order. Never holds an
    /// empty list.
    pub(super) pending: BTreeMap<u64, Vec<Unit>>,
    /// Per thread, per line: units with `seq` below the mark become durable
    /// at that thread's next fence.
    pub(super) marks: HashMap<ThreadId, HashMap<u64, u64>>,
    pub(super) next_seq: u64,
    pub(super) fences: u64,
    pub(super) writes: u64,
    /// Injected media errors, as `(off, len)`.
    pub(super) media: Vec<(u64, u64)>,
}

impl State {
    pub(super) fn snapshot(&self) -> CrashState {
        CrashState {
            size: self.size,
            durable: self.durable.clone(),
            pending: self.pending.iter().map(|(&line, units)| (line, units.clone())).collect(),
            media: self.media.clone(),
        }
    }

    /// Stores `len` bytes at `off` (range already checked): `src` holds them,
    /// or `None` stores zeros.
    pub(super) fn store(&mut self, off: u64, len: u64, src: Option<&[u8]>) {
        if len == 0 {
            return;
        }
        let end = off + len;
        match src {
            Some(data) => {
                let mut pos = off;
                while pos < end {
                    let chunk_end = ((pos / PAGE + 1) * PAGE).min(end);
                    let chunk = &data[(pos - off) as usize..(chunk_end - off) as usize];
                    self.store_in_page(pos, chunk_end - pos, Some(chunk));
                    pos = chunk_end;
                }
            }
            None => {
                // Zeros change nothing in a page that was never written: only
                // visit the pages that exist.
                let touched: Vec<u64> = self.current.range(off / PAGE..=(end - 1) / PAGE).map(|(&p, _)| p).collect();
                for page in touched {
                    let lo = off.max(page * PAGE);
                    let hi = end.min((page + 1) * PAGE);
                    self.store_in_page(lo, hi - lo, None);
                }
            }
        }
    }

    /// [`State::store`] for a range inside one page.
    fn store_in_page(&mut self, off: u64, len: u64, src: Option<&[u8]>) {
        let page_index = off / PAGE;
        if !self.current.contains_key(&page_index) && src.is_none_or(pcache_format::crc::is_zero) {
            // An absent page is zero in every view and has nothing pending.
            return;
        }
        let page = Arc::make_mut(self.current.entry(page_index).or_insert_with(zero_page));
        let base = (off % PAGE) as usize;
        let dst = &mut page[base..base + len as usize];
        match src {
            Some(data) => dst.copy_from_slice(data),
            None => dst.fill(0),
        }
        // One unit per word touched, queued on its line (one map lookup a line).
        let end = off + len;
        let mut word = off & !(WORD - 1);
        while word < end {
            let line = word / CACHE_LINE;
            let line_end = ((line + 1) * CACHE_LINE).min(end);
            let units = self.pending.entry(line).or_default();
            while word < line_end {
                let (lo, hi) = (off.max(word), end.min(word + WORD));
                let (a, b) = ((lo - word) as usize, (hi - word) as usize);
                let mut unit = Unit { seq: self.next_seq, off: word, mask: 0, data: [0; WORD as usize] };
                unit.mask = ((1u16 << b) - (1u16 << a)) as u8;
                if let Some(data) = src {
                    unit.data[a..b].copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
                }
                self.next_seq += 1;
                units.push(unit);
                word += WORD;
            }
        }
    }

    pub(super) fn flush(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / CACHE_LINE;
        let last = (off + len - 1) / CACHE_LINE;
        let mut lines = self.pending.range(first..=last).peekable();
        if lines.peek().is_none() {
            return;
        }
        let marks = self.marks.entry(std::thread::current().id()).or_default();
        for (&line, units) in lines {
            if let Some(unit) = units.last() {
                marks.insert(line, unit.seq + 1);
            }
        }
    }

    /// Whether a store of `[off, off + len)` by this thread, flushed and
    /// fenced at once, may go straight into both views: the thread has no
    /// line flushed and not yet fenced (its fence would make those durable
    /// too), and no store is pending on the lines (the flush would make
    /// those durable too).
    pub(super) fn persists_alone(&self, off: u64, len: u64) -> bool {
        len != 0
            && self.marks.get(&std::thread::current().id()).is_none_or(HashMap::is_empty)
            && self.pending.range(off / CACHE_LINE..=(off + len - 1) / CACHE_LINE).next().is_none()
    }

    /// Stores `data` at `off` durably, as a store, a flush of its lines and
    /// a fence do when [`State::persists_alone`] holds: nothing is left
    /// pending, and both views hold the data.
    pub(super) fn persist_alone(&mut self, off: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let chunk = &data[done..done + n];
            for pages in [&mut self.current, &mut self.durable] {
                // An absent page is zeros: zeros into it change nothing.
                if !pages.contains_key(&(pos / PAGE)) && pcache_format::crc::is_zero(chunk) {
                    continue;
                }
                let page = Arc::make_mut(pages.entry(pos / PAGE).or_insert_with(zero_page));
                page[in_page..in_page + n].copy_from_slice(chunk);
            }
            done += n;
        }
        self.writes += 1;
        self.fences += 1;
    }

    /// Makes every pending unit durable, whatever thread stored it and
    /// whether or not it was flushed.
    pub(super) fn sync_all(&mut self) {
        for units in self.pending.values() {
            Unit::apply_all(units, &mut self.durable);
        }
        self.pending.clear();
        self.marks.clear();
    }

    pub(super) fn fence(&mut self) {
        let Some(marks) = self.marks.remove(&std::thread::current().id()) else { return };
        for (line, mark) in marks {
            let Some(units) = self.pending.get_mut(&line) else { continue };
            let durable = units.partition_point(|u| u.seq < mark);
            Unit::apply_all(&units[..durable], &mut self.durable);
            units.drain(..durable);
            if units.is_empty() {
                self.pending.remove(&line);
            }
        }
    }
}
