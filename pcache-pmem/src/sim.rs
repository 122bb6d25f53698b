//! A simulated persistence domain, for producing the images a power failure
//! could leave behind.
//!
//! [`SimPmem`] is an in-memory [`Pmem`] that keeps two views of the device:
//! the *durable* image (what survives a power failure for certain) and, per
//! 64-byte cache line, the list of stores that have been issued but are not
//! yet known to be durable. [`Pmem::read`] sees the current, program-order
//! view (durable image with every pending store applied); [`SimPmem::crash_image`]
//! and [`CrashState`] produce images that a power failure at this instant
//! could leave, as new [`SimPmem`]s that recovery code can open, write and
//! crash again.
//!
//! **Why per-line prefixes.** A store sits in the CPU cache until its line is
//! written back, either because the program flushed it or because the cache
//! evicted it, which may happen at any moment. A line is written back whole,
//! with every store made to it so far, so what reaches the media from one line
//! is always some *program-order prefix* of the stores made to that line; the
//! lines themselves are written back independently, in no particular order.
//! A crash image is therefore the durable image plus, for every line, a prefix
//! (possibly empty, possibly complete) of its pending stores, chosen
//! independently per line.
//!
//! **Why 8-byte atomicity.** The persistence domain guarantees that aligned
//! 8-byte stores are power-fail atomic, and nothing larger. Every store is
//! split into *units*: an aligned 8-byte word plus a mask of the bytes the
//! store covers. A unit is either entirely in a crash image or entirely
//! absent; a store spanning several words (or lines) may tear between its
//! units, never inside one.
//!
//! **Why per-thread fences.** `clwb`/`clflushopt` only *start* a write-back;
//! the `sfence` that makes it durable orders the flushes of the CPU that
//! executes it, not those of other CPUs. [`Pmem::flush`] therefore records,
//! for the calling thread, a mark per line ("everything stored to this line up
//! to now"), and [`Pmem::fence`] makes the marked units durable only for the
//! marks of the calling thread. A thread relying on another thread's fence
//! is a bug this simulator exposes.
//!
//! Storage is sparse: 4 KiB pages are allocated only when written (and shared
//! copy-on-write between a simulator, its snapshots and its crash images), so
//! a 512 MiB device with a few touched pages costs a few pages. Storing zeros
//! to a page that was never written is a no-op, since it changes no possible
//! image.
//!
//! For crash campaigns, [`SimPmem::set_hook`] installs a callback that sees
//! every fence (and every write) *before* it takes effect, with a
//! [`SimEvent::snapshot`] of the state at that moment.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

use crate::pmem::{CACHE_LINE, Pmem, PmemError, check_range};

/// Size of a storage page of the simulator.
const PAGE: u64 = 4096;
/// Size of a power-fail atomic unit.
const WORD: u64 = 8;

/// One sparse storage page.
type Page = [u8; PAGE as usize];
/// Sparse image: page index to page; an absent page is all zeros.
type Pages = BTreeMap<u64, Arc<Page>>;

/// One store unit: the bytes `mask` selects of the aligned word at `off`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    /// Global program-order sequence number of the unit.
    seq: u64,
    /// Offset of the aligned 8-byte word.
    off: u64,
    /// Which of the word's bytes the store covers (bit `i` = byte `off + i`).
    mask: u8,
    /// The stored bytes (only those in `mask` are meaningful).
    data: [u8; WORD as usize],
}

impl Unit {
    /// Applies the unit to a sparse image.
    fn apply(&self, pages: &mut Pages) {
        let page = Arc::make_mut(pages.entry(self.off / PAGE).or_insert_with(zero_page));
        let base = (self.off % PAGE) as usize;
        for (i, &b) in self.data.iter().enumerate() {
            if self.mask & (1 << i) != 0 {
                page[base + i] = b;
            }
        }
    }
}

fn zero_page() -> Arc<Page> {
    Arc::new([0; PAGE as usize])
}

/// Copies `[off, off + buf.len())` of a sparse image into `buf`.
fn read_pages(pages: &Pages, off: u64, buf: &mut [u8]) {
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
fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen != 0 && blen != 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// What a crash image keeps of the stores that are not yet durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashStrategy {
    /// Every pending store is lost: only what was flushed and fenced survives.
    NothingExtra,
    /// Every pending store survives: the image equals the current view.
    Everything,
    /// Each line independently keeps a pseudo-random program-order prefix of
    /// its pending stores: none with probability 1/4, all with probability
    /// 1/4, otherwise a length drawn uniformly. The same seed and state give
    /// the same image.
    Random {
        /// Seed of the pseudo-random generator.
        seed: u64,
    },
}

/// A hook observing a [`SimPmem`]'s [`SimEvent`]s; see [`SimPmem::set_hook`].
pub type SimHook = Box<dyn FnMut(&SimEvent<'_>) + Send>;

/// The kind of a [`SimEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimEventKind {
    /// A [`Pmem::fence`] (also the fence inside `persist`, `copy_persist`,
    /// `zero_persist`), about to take effect.
    Fence,
    /// A [`Pmem::write`], [`Pmem::copy_nodrain`] or [`Pmem::zero_nodrain`]
    /// (one event per call), about to take effect.
    Write,
}

/// An event a [`SimPmem`] hook observes: a fence or a write, *before* it
/// takes effect.
///
/// The event borrows the simulator's state while its lock is held; take a
/// [`SimEvent::snapshot`] to keep the state beyond the hook.
pub struct SimEvent<'a> {
    kind: SimEventKind,
    index: u64,
    state: &'a State,
}

impl SimEvent<'_> {
    /// Whether this is a fence or a write.
    pub fn kind(&self) -> SimEventKind {
        self.kind
    }

    /// How many events of this kind happened before this one: the first
    /// fence has index 0, and so has the first write.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The state at this moment (before the event takes effect), from which
    /// crash images can be produced.
    pub fn snapshot(&self) -> CrashState {
        self.state.snapshot()
    }

    /// Number of cache lines with stores that are not yet durable.
    pub fn pending_lines(&self) -> usize {
        self.state.pending.len()
    }
}

impl fmt::Debug for SimEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimEvent").field("kind", &self.kind).field("index", &self.index).finish_non_exhaustive()
    }
}

/// A frozen simulator state: the durable image plus the pending stores of
/// every line, from which crash images are produced.
///
/// Cheap to take: pages are shared copy-on-write with the simulator.
#[derive(Clone)]
pub struct CrashState {
    size: u64,
    durable: Pages,
    /// Lines with pending units, in ascending line order, units in program order.
    pending: Vec<(u64, Vec<Unit>)>,
    media: Vec<(u64, u64)>,
}

impl CrashState {
    /// Number of cache lines with stores that are not yet durable.
    pub fn pending_lines(&self) -> usize {
        self.pending.len()
    }

    /// Number of 8-byte store units that are not yet durable.
    pub fn pending_units(&self) -> usize {
        self.pending.iter().map(|(_, u)| u.len()).sum()
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image a power failure in this state could leave, chosen by
    /// `strategy`, as a new simulator with no pending stores.
    pub fn image(&self, strategy: CrashStrategy) -> SimPmem {
        match strategy {
            CrashStrategy::NothingExtra => self.build(|_, _| 0),
            CrashStrategy::Everything => self.build(|_, n| n),
            CrashStrategy::Random { seed } => {
                let mut rng = SplitMix64(seed);
                self.build(|_, n| match rng.next() % 4 {
                    0 => 0,
                    1 => n,
                    _ => (rng.next() % (n as u64 + 1)) as usize,
                })
            }
        }
    }

    /// Every image a power failure in this state could leave (every
    /// combination of per-line prefix lengths), or `None` if there are more
    /// than `limit` of them. With nothing pending there is exactly one.
    pub fn exhaustive(&self, limit: usize) -> Option<Vec<SimPmem>> {
        let count = self.pending.iter().try_fold(1usize, |acc, (_, u)| acc.checked_mul(u.len() + 1))?;
        if count > limit {
            return None;
        }
        let mut prefixes = vec![0usize; self.pending.len()];
        let mut images = Vec::with_capacity(count);
        loop {
            images.push(self.build(|i, _| prefixes[i]));
            // Mixed-radix increment of the prefix lengths.
            let mut i = 0;
            loop {
                if i == prefixes.len() {
                    return Some(images);
                }
                if prefixes[i] < self.pending[i].1.len() {
                    prefixes[i] += 1;
                    break;
                }
                prefixes[i] = 0;
                i += 1;
            }
        }
    }

    /// Builds the image keeping `prefix(line_index, pending_units)` units of
    /// every pending line.
    fn build(&self, mut prefix: impl FnMut(usize, usize) -> usize) -> SimPmem {
        let mut pages = self.durable.clone();
        for (i, (_, units)) in self.pending.iter().enumerate() {
            let keep = prefix(i, units.len()).min(units.len());
            for unit in &units[..keep] {
                unit.apply(&mut pages);
            }
        }
        SimPmem::from_image(self.size, pages, self.media.clone())
    }
}

impl fmt::Debug for CrashState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashState")
            .field("size", &self.size)
            .field("durable_pages", &self.durable.len())
            .field("pending_lines", &self.pending_lines())
            .field("pending_units", &self.pending_units())
            .finish()
    }
}

/// SplitMix64, a small seeded pseudo-random generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The simulator state proper (everything but the hook).
struct State {
    size: u64,
    /// What survives a power failure for certain.
    durable: Pages,
    /// The program-order view: `durable` plus every pending unit.
    current: Pages,
    /// Per line, the units not yet durable, in program order. Never holds an
    /// empty list.
    pending: BTreeMap<u64, Vec<Unit>>,
    /// Per thread, per line: units with `seq` below the mark become durable
    /// at that thread's next fence.
    marks: HashMap<ThreadId, HashMap<u64, u64>>,
    next_seq: u64,
    fences: u64,
    writes: u64,
    /// Injected media errors, as `(off, len)`.
    media: Vec<(u64, u64)>,
}

impl State {
    fn snapshot(&self) -> CrashState {
        CrashState {
            size: self.size,
            durable: self.durable.clone(),
            pending: self.pending.iter().map(|(&line, units)| (line, units.clone())).collect(),
            media: self.media.clone(),
        }
    }

    /// Stores `len` bytes at `off` (range already checked): `src` holds them,
    /// or `None` stores zeros.
    fn store(&mut self, off: u64, len: u64, src: Option<&[u8]>) {
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
        if !self.current.contains_key(&page_index) && src.is_none_or(|d| d.iter().all(|&b| b == 0)) {
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
        let end = off + len;
        let mut word = off & !(WORD - 1);
        while word < end {
            let lo = off.max(word);
            let hi = end.min(word + WORD);
            let mut unit = Unit { seq: self.next_seq, off: word, mask: 0, data: [0; WORD as usize] };
            for pos in lo..hi {
                let i = (pos - word) as usize;
                unit.mask |= 1 << i;
                if let Some(data) = src {
                    unit.data[i] = data[(pos - off) as usize];
                }
            }
            self.next_seq += 1;
            self.pending.entry(word / CACHE_LINE).or_default().push(unit);
            word += WORD;
        }
    }

    fn flush(&mut self, off: u64, len: u64) {
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

    fn fence(&mut self) {
        let Some(marks) = self.marks.remove(&std::thread::current().id()) else { return };
        for (line, mark) in marks {
            let Some(units) = self.pending.get_mut(&line) else { continue };
            let durable = units.partition_point(|u| u.seq < mark);
            for unit in units.drain(..durable) {
                unit.apply(&mut self.durable);
            }
            if units.is_empty() {
                self.pending.remove(&line);
            }
        }
    }
}

/// Everything behind the simulator's lock.
struct Inner {
    state: State,
    hook: Option<SimHook>,
    /// Fences still to fail (see [`SimPmem::fail_fences`]).
    failing_fences: u64,
}

thread_local! {
    /// Address of the simulator whose hook this thread is running, or 0.
    static IN_HOOK: Cell<usize> = const { Cell::new(0) };
}

/// Restores [`IN_HOOK`] when a hook returns or unwinds.
struct HookGuard(usize);

impl Drop for HookGuard {
    fn drop(&mut self) {
        IN_HOOK.with(|h| h.set(self.0));
    }
}

/// A simulated persistence domain: an in-memory, sparse pmem image that tracks
/// every store per cache line, so that the images a power failure could leave
/// can be produced (see the [module documentation](self) for the model).
///
/// Thread-safe: all operations take an internal lock, so concurrent stores are
/// serialised in some order, which is the program order the simulator sees.
pub struct SimPmem {
    inner: Mutex<Inner>,
}

impl SimPmem {
    /// A zero-filled device of `size` bytes, all of it durable. Allocates
    /// nothing until written.
    pub fn new(size: u64) -> Self {
        Self::from_image(size, Pages::new(), Vec::new())
    }

    /// A device whose durable and current views are both `pages`.
    fn from_image(size: u64, pages: Pages, media: Vec<(u64, u64)>) -> Self {
        let state = State {
            size,
            current: pages.clone(),
            durable: pages,
            pending: BTreeMap::new(),
            marks: HashMap::new(),
            next_seq: 0,
            fences: 0,
            writes: 0,
            media,
        };
        SimPmem { inner: Mutex::new(Inner { state, hook: None, failing_fences: 0 }) }
    }

    fn id(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// Locks the state, recovering from poisoning.
    ///
    /// # Panics
    ///
    /// If called from this simulator's own hook, which would deadlock.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        assert!(
            IN_HOOK.with(Cell::get) != self.id(),
            "SimPmem: a hook must not call back into the SimPmem it observes"
        );
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the hook, if any, for an event about to take effect.
    fn notify(&self, inner: &mut Inner, kind: SimEventKind) {
        let index = match kind {
            SimEventKind::Fence => inner.state.fences,
            SimEventKind::Write => inner.state.writes,
        };
        // Taken out while it runs: a hook that panics is dropped.
        if let Some(mut hook) = inner.hook.take() {
            let _guard = HookGuard(IN_HOOK.with(|h| h.replace(self.id())));
            hook(&SimEvent { kind, index, state: &inner.state });
            inner.hook = Some(hook);
        }
    }

    /// Installs (or with `None`, removes) a hook called at every fence and
    /// every write (`write`, `copy_nodrain`, `zero_nodrain`; one call each)
    /// *before* it takes effect. Out-of-bounds accesses, which have no effect,
    /// are not reported.
    ///
    /// The hook runs on the thread issuing the fence or write, while the
    /// simulator's lock is held: it must not call back into this `SimPmem`
    /// (doing so panics rather than deadlocking), and it blocks every other
    /// thread using the simulator until it returns. Use
    /// [`SimEvent::snapshot`] to inspect the state. A hook that panics is
    /// removed.
    pub fn set_hook(&self, hook: Option<SimHook>) {
        self.lock().hook = hook;
    }

    /// The current state, from which crash images can be produced.
    pub fn snapshot(&self) -> CrashState {
        self.lock().state.snapshot()
    }

    /// The image a power failure at this instant could leave, chosen by
    /// `strategy`, as a new simulator (durable and current view equal to the
    /// image, nothing pending, injected media errors kept, no hook).
    pub fn crash_image(&self, strategy: CrashStrategy) -> SimPmem {
        self.snapshot().image(strategy)
    }

    /// Every image a power failure at this instant could leave, or `None` if
    /// there are more than `limit`. See [`CrashState::exhaustive`].
    pub fn crash_images_exhaustive(&self, limit: usize) -> Option<Vec<SimPmem>> {
        self.snapshot().exhaustive(limit)
    }

    /// Number of fences so far.
    pub fn fence_count(&self) -> u64 {
        self.lock().state.fences
    }

    /// Number of writes (`write`, `copy_nodrain`, `zero_nodrain` calls) so far.
    pub fn write_count(&self) -> u64 {
        self.lock().state.writes
    }

    /// Number of cache lines with stores that are not yet durable.
    pub fn pending_lines(&self) -> usize {
        self.lock().state.pending.len()
    }

    /// Number of 8-byte store units that are not yet durable.
    pub fn pending_units(&self) -> usize {
        self.lock().state.pending.values().map(Vec::len).sum()
    }

    /// Number of 4 KiB pages allocated for the current view (pages ever
    /// written with something other than zeros, roughly).
    pub fn touched_pages(&self) -> usize {
        self.lock().state.current.len()
    }

    /// Makes every read overlapping `[off, off + len)` fail with
    /// [`PmemError::Media`], until [`SimPmem::clear_media_errors`]. Writes are
    /// unaffected; crash images inherit the errors.
    pub fn inject_media_error(&self, off: u64, len: u64) -> Result<(), PmemError> {
        let mut inner = self.lock();
        check_range(off, len, inner.state.size)?;
        inner.state.media.push((off, len));
        Ok(())
    }

    /// Makes the next `n` fences fail with an I/O error (as `msync` can on
    /// emulated pmem) without making anything durable; 0 stops it. Crash
    /// images do not inherit this.
    pub fn fail_fences(&self, n: u64) {
        self.lock().failing_fences = n;
    }

    /// Removes every injected media error.
    pub fn clear_media_errors(&self) {
        self.lock().state.media.clear();
    }

    /// Reads `len` bytes at `off` of the current view into a new vector.
    pub fn read_vec(&self, off: u64, len: u64) -> Result<Vec<u8>, PmemError> {
        let size = self.size();
        check_range(off, len, size)?;
        let n = usize::try_from(len).map_err(|_| PmemError::OutOfBounds { off, len, size })?;
        let mut buf = vec![0; n];
        self.read(off, &mut buf)?;
        Ok(buf)
    }

    /// Stores after the range check and the hook; `src` of `None` stores zeros.
    fn store(&self, off: u64, len: u64, src: Option<&[u8]>, flush: bool) -> Result<(), PmemError> {
        let mut inner = self.lock();
        check_range(off, len, inner.state.size)?;
        self.notify(&mut inner, SimEventKind::Write);
        let state = &mut inner.state;
        state.writes += 1;
        state.store(off, len, src);
        if flush {
            state.flush(off, len);
        }
        Ok(())
    }
}

impl Pmem for SimPmem {
    fn size(&self) -> u64 {
        self.lock().state.size
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        let inner = self.lock();
        let state = &inner.state;
        let len = buf.len() as u64;
        check_range(off, len, state.size)?;
        if state.media.iter().any(|&(m, mlen)| overlaps(off, len, m, mlen)) {
            return Err(PmemError::Media { off, len });
        }
        read_pages(&state.current, off, buf);
        Ok(())
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<(), PmemError> {
        self.store(off, data.len() as u64, Some(data), false)
    }

    fn flush(&self, off: u64, len: u64) -> Result<(), PmemError> {
        let mut inner = self.lock();
        check_range(off, len, inner.state.size)?;
        inner.state.flush(off, len);
        Ok(())
    }

    fn fence(&self) -> Result<(), PmemError> {
        let mut inner = self.lock();
        if inner.failing_fences > 0 {
            inner.failing_fences -= 1;
            return Err(PmemError::Io {
                op: "fence",
                path: "simulated pmem".into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.notify(&mut inner, SimEventKind::Fence);
        inner.state.fences += 1;
        inner.state.fence();
        Ok(())
    }

    fn copy_nodrain(&self, off: u64, src: &[u8]) -> Result<(), PmemError> {
        self.store(off, src.len() as u64, Some(src), true)
    }

    fn zero_nodrain(&self, off: u64, len: u64) -> Result<(), PmemError> {
        self.store(off, len, None, true)
    }
}

impl fmt::Debug for SimPmem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `try_lock`: Debug may be used from a hook, while the lock is held.
        match self.inner.try_lock() {
            Ok(inner) => debug_state(&inner.state, f),
            Err(std::sync::TryLockError::Poisoned(p)) => debug_state(&p.into_inner().state, f),
            Err(std::sync::TryLockError::WouldBlock) => f.write_str("SimPmem { <locked> }"),
        }
    }
}

fn debug_state(state: &State, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.debug_struct("SimPmem")
        .field("size", &state.size)
        .field("touched_pages", &state.current.len())
        .field("pending_lines", &state.pending.len())
        .field("fences", &state.fences)
        .field("writes", &state.writes)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The region the property tests store to: 4 lines straddling a page boundary.
    const BASE: u64 = PAGE - 2 * CACHE_LINE;
    const REGION: u64 = 4 * CACHE_LINE;

    fn word(sim: &SimPmem, off: u64) -> [u8; 8] {
        let mut w = [0; 8];
        sim.read(off, &mut w).unwrap();
        w
    }

    fn region(sim: &SimPmem) -> Vec<u8> {
        sim.read_vec(BASE, REGION).unwrap()
    }

    fn strategies(seed: u64) -> Vec<CrashStrategy> {
        let mut s = vec![CrashStrategy::NothingExtra, CrashStrategy::Everything];
        s.extend((0..8).map(|i| CrashStrategy::Random { seed: seed.wrapping_add(i) }));
        s
    }

    /// Every crash image of the current state: the strategies, plus all
    /// combinations when there are at most `limit`.
    fn images(sim: &SimPmem, seed: u64, limit: usize) -> Vec<SimPmem> {
        let snap = sim.snapshot();
        let mut all: Vec<SimPmem> = strategies(seed).into_iter().map(|s| snap.image(s)).collect();
        all.extend(snap.exhaustive(limit).unwrap_or_default());
        all
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, Vec<u8>),
        Flush(u64, u64),
        Fence,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..REGION, prop::collection::vec(1..=255u8, 1..20)).prop_map(|(off, mut data)| {
                data.truncate((REGION - off) as usize);
                Op::Write(BASE + off, data)
            }),
            2 => (0..REGION, 0..REGION).prop_map(|(off, len)| Op::Flush(BASE + off, len.min(REGION - off))),
            1 => Just(Op::Fence),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        // Test 1: what was written, flushed and fenced (and not overwritten
        // since) is in every crash image; the current view is program order.
        #[test]
        fn flushed_and_fenced_data_survives(ops in prop::collection::vec(op(), 1..60), seed in any::<u64>()) {
            let sim = SimPmem::new(2 * PAGE);
            let n = REGION as usize;
            let mut current = vec![0u8; n];
            // The value every crash image must hold, if known.
            let mut must: Vec<Option<u8>> = vec![Some(0); n];
            let mut flushed = vec![false; n];
            for op in &ops {
                match op {
                    Op::Write(off, data) => {
                        sim.write(*off, data).unwrap();
                        let at = (off - BASE) as usize;
                        current[at..at + data.len()].copy_from_slice(data);
                        for i in at..at + data.len() {
                            must[i] = None;
                            flushed[i] = false;
                        }
                    }
                    Op::Flush(off, len) => {
                        sim.flush(*off, *len).unwrap();
                        if *len > 0 {
                            // Whole lines are written back.
                            let first = (off / CACHE_LINE * CACHE_LINE).max(BASE);
                            let end = (off + len).div_ceil(CACHE_LINE) * CACHE_LINE;
                            for f in &mut flushed[(first - BASE) as usize..(end - BASE) as usize] {
                                *f = true;
                            }
                        }
                    }
                    Op::Fence => {
                        sim.fence().unwrap();
                        for i in 0..n {
                            if flushed[i] {
                                must[i] = Some(current[i]);
                                flushed[i] = false;
                            }
                        }
                        for image in images(&sim, seed, 256) {
                            prop_assert_eq!(image.pending_lines(), 0);
                            let got = region(&image);
                            for i in 0..n {
                                if let Some(v) = must[i] {
                                    prop_assert_eq!(got[i], v, "byte {:#x} after {:?}", BASE + i as u64, ops);
                                }
                            }
                        }
                    }
                }
                prop_assert_eq!(region(&sim), current.clone());
            }
            // Everything keeps exactly the current view.
            prop_assert_eq!(region(&sim.crash_image(CrashStrategy::Everything)), current);
        }

        // Test 4: no crash image holds a byte value that was never stored there.
        #[test]
        fn no_byte_out_of_thin_air(ops in prop::collection::vec(op(), 1..60), seed in any::<u64>()) {
            let sim = SimPmem::new(2 * PAGE);
            let n = REGION as usize;
            // Per byte, which values were ever stored (0 is the initial value).
            let mut initial = [false; 256];
            initial[0] = true;
            let mut stored = vec![initial; n];
            for (k, op) in ops.iter().enumerate() {
                match op {
                    Op::Write(off, data) => {
                        sim.write(*off, data).unwrap();
                        for (i, &b) in data.iter().enumerate() {
                            stored[(off - BASE) as usize + i][b as usize] = true;
                        }
                    }
                    Op::Flush(off, len) => sim.flush(*off, *len).unwrap(),
                    Op::Fence => sim.fence().unwrap(),
                }
                for (j, image) in images(&sim, seed.wrapping_add(k as u64), 64).iter().enumerate() {
                    // The whole device for the strategy images, the region for all.
                    let all = image.read_vec(0, 2 * PAGE).unwrap();
                    let (before, rest) = all.split_at(BASE as usize);
                    let (got, after) = rest.split_at(n);
                    for i in 0..n {
                        prop_assert!(stored[i][got[i] as usize], "byte {:#x} = {:#x} never stored", BASE + i as u64, got[i]);
                    }
                    if j < 10 {
                        prop_assert!(before.iter().chain(after).all(|&b| b == 0), "stored outside the region");
                    }
                }
            }
        }
    }

    // Test 2: data never flushed may or may not survive.
    #[test]
    fn unflushed_data_may_or_may_not_survive() {
        let sim = SimPmem::new(PAGE);
        sim.write(64, &[7; 8]).unwrap();
        assert_eq!(word(&sim, 64), [7; 8], "the current view has it");
        assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 64), [0; 8]);
        assert_eq!(word(&sim.crash_image(CrashStrategy::Everything), 64), [7; 8]);
        let outcomes: HashSet<[u8; 8]> =
            (0..64).map(|seed| word(&sim.crash_image(CrashStrategy::Random { seed }), 64)).collect();
        assert_eq!(outcomes, HashSet::from([[0; 8], [7; 8]]), "random images show both outcomes");
        let all: HashSet<[u8; 8]> = sim.crash_images_exhaustive(10).unwrap().iter().map(|i| word(i, 64)).collect();
        assert_eq!(all, HashSet::from([[0; 8], [7; 8]]));
    }

    // Random images: every prefix length occurs, 0 and full often; lines
    // choose independently; the same seed gives the same image.
    #[test]
    fn random_strategy_distribution() {
        let sim = SimPmem::new(PAGE);
        for k in 1..=4u8 {
            sim.write(0, &[k; 8]).unwrap();
        }
        for line in 1..8 {
            sim.write(line * CACHE_LINE, &[9; 8]).unwrap();
        }
        let snap = sim.snapshot();
        let mut counts = [0usize; 5];
        let mut mixed = false;
        for seed in 0..400 {
            let image = snap.image(CrashStrategy::Random { seed });
            counts[word(&image, 0)[0] as usize] += 1;
            let others: HashSet<u8> = (1..8).map(|line| word(&image, line * CACHE_LINE)[0]).collect();
            mixed |= others.len() == 2;
            let again = snap.image(CrashStrategy::Random { seed });
            assert_eq!(image.read_vec(0, 512).unwrap(), again.read_vec(0, 512).unwrap());
        }
        // Expected: 160 for none and for all, 60 for each other length.
        assert!(counts[0] >= 120 && counts[4] >= 120, "{counts:?}");
        assert!(counts[1..4].iter().all(|&c| c >= 30), "{counts:?}");
        assert!(mixed, "lines choose their prefixes independently");
    }

    // Test 3: a flush is durable only after a fence.
    #[test]
    fn flush_needs_fence() {
        let sim = SimPmem::new(PAGE);
        sim.write(128, &[9; 16]).unwrap();
        sim.flush(128, 16).unwrap();
        assert_eq!(sim.read_vec(128, 16).unwrap(), [9; 16]);
        assert_eq!(sim.crash_image(CrashStrategy::NothingExtra).read_vec(128, 16).unwrap(), [0; 16]);
        assert_eq!(sim.pending_lines(), 1);
        sim.fence().unwrap();
        assert_eq!(sim.pending_lines(), 0);
        for image in images(&sim, 1, 256) {
            assert_eq!(image.read_vec(128, 16).unwrap(), [9; 16]);
        }

        // The same for the _nodrain variants.
        sim.copy_nodrain(256, &[3; 300]).unwrap();
        sim.zero_nodrain(128, 8).unwrap();
        assert_eq!(sim.read_vec(120, 16).unwrap(), [0; 16]);
        let before = sim.crash_image(CrashStrategy::NothingExtra);
        assert_eq!(before.read_vec(256, 300).unwrap(), [0; 300]);
        assert_eq!(before.read_vec(128, 8).unwrap(), [9; 8]);
        sim.fence().unwrap();
        let after = sim.crash_image(CrashStrategy::NothingExtra);
        assert_eq!(after.read_vec(256, 300).unwrap(), [3; 300]);
        assert_eq!(after.read_vec(128, 16).unwrap(), [0, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9]);

        // And for the _persist ones, with nothing left pending.
        sim.copy_persist(1000, b"hello").unwrap();
        sim.zero_persist(258, 2).unwrap();
        assert_eq!(sim.pending_lines(), 0);
        let image = sim.crash_image(CrashStrategy::NothingExtra);
        assert_eq!(image.read_vec(1000, 5).unwrap(), b"hello");
        assert_eq!(image.read_vec(256, 4).unwrap(), [3, 3, 0, 0]);
    }

    // A flush covers the stores made before it, not later ones to the same line.
    #[test]
    fn flush_covers_only_earlier_stores() {
        let sim = SimPmem::new(PAGE);
        sim.write(0, &[1; 8]).unwrap();
        sim.flush(0, 1).unwrap();
        sim.write(8, &[2; 8]).unwrap();
        sim.write(0, &[3; 8]).unwrap();
        sim.fence().unwrap();
        let image = sim.crash_image(CrashStrategy::NothingExtra);
        assert_eq!(image.read_vec(0, 16).unwrap(), [[1; 8], [0; 8]].concat());
        assert_eq!((sim.pending_lines(), sim.pending_units()), (1, 2));
        // Prefixes of what is still pending: nothing, then [2], then [2] and [3].
        let seen: Vec<Vec<u8>> =
            sim.crash_images_exhaustive(3).unwrap().iter().map(|i| i.read_vec(0, 16).unwrap()).collect();
        assert_eq!(seen, [[[1; 8], [0; 8]].concat(), [[1; 8], [2; 8]].concat(), [[3; 8], [2; 8]].concat()]);
        // A fence without a new flush changes nothing.
        sim.fence().unwrap();
        assert_eq!(sim.pending_units(), 2);
        sim.persist(15, 1).unwrap();
        assert_eq!(sim.pending_units(), 0);
        assert_eq!(sim.crash_image(CrashStrategy::NothingExtra).read_vec(0, 16).unwrap(), [[3; 8], [2; 8]].concat());
    }

    // Test 5: within one line, a later store survives only with every earlier one.
    #[test]
    fn program_order_prefix_per_line() {
        let sim = SimPmem::new(PAGE);
        let (a, b) = (64, 72); // two words of line 1
        for k in 1..=5u8 {
            sim.write(a, &[k; 8]).unwrap();
            sim.write(b, &[k + 100; 8]).unwrap();
        }
        // Which round of A and of B survived (0 = none).
        let rounds = |image: &SimPmem| {
            let (wa, wb) = (word(image, a), word(image, b));
            (wa[0], if wb[0] == 0 { 0 } else { wb[0] - 100 })
        };
        let valid = |(ra, rb): (u8, u8)| ra == rb || ra == rb + 1;
        let seen: HashSet<(u8, u8)> = sim.crash_images_exhaustive(100).unwrap().iter().map(rounds).collect();
        let expected: HashSet<(u8, u8)> = (0..=5).flat_map(|k| [(k, k), (k + 1, k)]).filter(|&(a, _)| a <= 5).collect();
        assert_eq!(seen.len(), 11);
        assert_eq!(seen, expected);
        for seed in 0..200 {
            let r = rounds(&sim.crash_image(CrashStrategy::Random { seed }));
            assert!(valid(r), "seed {seed}: {r:?} is not a prefix");
        }

        // Lines are independent: a later store to another line may survive
        // without an earlier one to this line.
        let sim = SimPmem::new(PAGE);
        sim.write(0, &[1; 8]).unwrap();
        sim.write(64, &[2; 8]).unwrap();
        let images = sim.crash_images_exhaustive(4).unwrap();
        let seen: HashSet<([u8; 8], [u8; 8])> = images.iter().map(|i| (word(i, 0), word(i, 64))).collect();
        assert_eq!(seen.len(), 4);
        assert!(seen.contains(&([0; 8], [2; 8])));
        assert!(sim.crash_images_exhaustive(3).is_none());
    }

    // Test 6: aligned 8-byte stores never tear; wider or unaligned ones may,
    // at 8-byte boundaries only.
    #[test]
    fn eight_byte_atomicity() {
        let sim = SimPmem::new(PAGE);
        sim.write(0, &[0xAA; 64]).unwrap();
        sim.persist(0, 64).unwrap();
        for k in 1..=4u8 {
            sim.write(8, &[k; 8]).unwrap();
        }
        let mut seen = HashSet::new();
        let mut all = sim.crash_images_exhaustive(100).unwrap();
        all.extend((0..100).map(|seed| sim.crash_image(CrashStrategy::Random { seed })));
        for image in &all {
            let w = word(image, 8);
            assert!(w.iter().all(|&b| b == w[0]), "torn aligned word {w:x?}");
            seen.insert(w[0]);
        }
        assert_eq!(seen, HashSet::from([0xAA, 1, 2, 3, 4]));

        // An unaligned 16-byte store covers three words, and may tear between them.
        let sim = SimPmem::new(PAGE);
        sim.write(0, &[0xAA; 24]).unwrap();
        sim.persist(0, 24).unwrap();
        sim.write(4, &[0x55; 16]).unwrap();
        let images = sim.crash_images_exhaustive(100).unwrap();
        assert_eq!(images.len(), 4);
        let mut torn = false;
        for image in &images {
            let bytes = image.read_vec(0, 24).unwrap();
            assert_eq!(&bytes[..4], [0xAA; 4]);
            assert_eq!(&bytes[20..], [0xAA; 4]);
            for unit in [&bytes[4..8], &bytes[8..16], &bytes[16..20]] {
                assert!(unit.iter().all(|&b| b == unit[0]), "torn inside a unit: {bytes:x?}");
            }
            torn |= bytes[4] == 0x55 && bytes[8] == 0xAA;
        }
        assert!(torn, "the store can tear at the 8-byte boundary");

        // Across a line boundary, the second half may survive without the first.
        let sim = SimPmem::new(PAGE);
        sim.write(60, &[0x55; 8]).unwrap();
        let seen: HashSet<Vec<u8>> =
            sim.crash_images_exhaustive(4).unwrap().iter().map(|i| i.read_vec(60, 8).unwrap()).collect();
        assert!(seen.contains(&[0, 0, 0, 0, 0x55, 0x55, 0x55, 0x55][..]));
        assert_eq!(seen.len(), 4);
    }

    // Test 7: a fence makes durable only the calling thread's flushes.
    #[test]
    fn fences_are_per_thread() {
        let sim = SimPmem::new(PAGE);
        sim.write(0, &[1; 8]).unwrap();
        sim.flush(0, 8).unwrap();
        sim.copy_nodrain(64, &[2; 8]).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| sim.fence().unwrap()).join().unwrap();
        });
        let image = sim.crash_image(CrashStrategy::NothingExtra);
        assert_eq!(word(&image, 0), [0; 8], "another thread's fence does not drain our flush");
        assert_eq!(word(&image, 64), [0; 8], "nor our non-temporal stores");
        sim.fence().unwrap();
        let image = sim.crash_image(CrashStrategy::NothingExtra);
        assert_eq!(word(&image, 0), [1; 8]);
        assert_eq!(word(&image, 64), [2; 8]);

        // A line written by one thread and flushed and fenced by another is
        // written back whole.
        sim.write(128, &[3; 8]).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| sim.persist(128, 8).unwrap()).join().unwrap();
        });
        assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 128), [3; 8]);
        assert_eq!(sim.fence_count(), 3);
    }

    // Test 8: bad ranges fail cleanly; media errors fail overlapping reads only.
    #[test]
    fn out_of_bounds_and_media_errors() {
        let size = 4 * PAGE;
        let sim = SimPmem::new(size);
        let bad = [(u64::MAX, 1), (1, u64::MAX), (u64::MAX, u64::MAX), (size, 1), (size - 1, 2), (0, size + 1)];
        let is_oob = |r: Result<(), PmemError>, off: u64, len: u64| matches!(r, Err(PmemError::OutOfBounds { off: o, len: l, size: s }) if o == off && l == len && s == size);
        for (off, len) in bad {
            assert!(is_oob(sim.flush(off, len), off, len), "flush {off:#x}+{len:#x}");
            assert!(is_oob(sim.zero_nodrain(off, len), off, len), "zero {off:#x}+{len:#x}");
            assert!(is_oob(sim.zero_persist(off, len), off, len));
            assert!(is_oob(sim.persist(off, len), off, len));
            assert!(is_oob(sim.inject_media_error(off, len), off, len));
            assert!(is_oob(sim.read_vec(off, len).map(drop), off, len));
        }
        for off in [u64::MAX, size, size - 1] {
            let mut buf = [0; 2];
            assert!(is_oob(sim.read(off, &mut buf), off, 2));
            assert!(is_oob(sim.write(off, &buf), off, 2));
            assert!(is_oob(sim.copy_nodrain(off, &buf), off, 2));
            assert!(is_oob(sim.copy_persist(off, &buf), off, 2));
        }
        assert_eq!(sim.write_count(), 0, "failed writes are not counted");
        assert_eq!(sim.touched_pages(), 0);
        // Empty accesses at the very end are fine.
        sim.read(size, &mut []).unwrap();
        sim.write(size, &[]).unwrap();
        sim.persist(size, 0).unwrap();
        sim.write(size - 2, &[1, 2]).unwrap();
        assert_eq!(sim.read_vec(size - 2, 2).unwrap(), [1, 2]);

        sim.write(100, &[5; 10]).unwrap();
        sim.inject_media_error(100, 10).unwrap();
        sim.inject_media_error(200, 0).unwrap();
        let mut buf = [0; 10];
        sim.read(90, &mut buf).unwrap();
        sim.read(110, &mut buf).unwrap();
        sim.read(195, &mut buf).unwrap();
        sim.read(105, &mut []).unwrap();
        assert!(matches!(sim.read(105, &mut buf[..1]), Err(PmemError::Media { off: 105, len: 1 })));
        assert!(matches!(sim.read(91, &mut buf), Err(PmemError::Media { off: 91, len: 10 })));
        assert!(matches!(sim.read_vec(0, size), Err(PmemError::Media { off: 0, len }) if len == size));
        // Writes still work; crash images keep the errors.
        sim.copy_persist(100, &[6; 10]).unwrap();
        let image = sim.crash_image(CrashStrategy::NothingExtra);
        assert!(matches!(image.read(109, &mut buf[..1]), Err(PmemError::Media { .. })));
        sim.clear_media_errors();
        sim.read(100, &mut buf).unwrap();
        assert_eq!(buf, [6; 10]);
    }

    // A failed fence makes nothing durable and is not counted.
    #[test]
    fn failed_fences_make_nothing_durable() {
        let sim = SimPmem::new(4 * PAGE);
        sim.fail_fences(2);
        sim.write(64, &[9; 8]).unwrap();
        sim.flush(64, 8).unwrap();
        assert!(matches!(sim.fence(), Err(PmemError::Io { op: "fence", .. })));
        assert!(sim.persist(64, 8).is_err());
        assert_eq!(sim.fence_count(), 0);
        assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 64), [0; 8]);
        sim.fence().unwrap();
        assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 64), [9; 8]);
        sim.fail_fences(1);
        assert!(sim.crash_image(CrashStrategy::NothingExtra).fence().is_ok(), "images do not inherit it");
    }

    // Test 9: the hook sees every fence once, in order, before it takes effect.
    #[test]
    fn hook_sees_fences_before_they_take_effect() {
        let sim = SimPmem::new(PAGE);
        let fences = Arc::new(Mutex::new(Vec::new()));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let before_second = Arc::new(Mutex::new(None));
        {
            let (fences, writes, before_second) = (fences.clone(), writes.clone(), before_second.clone());
            sim.set_hook(Some(Box::new(move |e: &SimEvent<'_>| match e.kind() {
                SimEventKind::Fence => {
                    fences.lock().unwrap().push(e.index());
                    if e.index() == 1 {
                        *before_second.lock().unwrap() = Some(e.snapshot());
                    }
                }
                SimEventKind::Write => writes.lock().unwrap().push(e.index()),
            })));
        }
        sim.write(0, &[1; 8]).unwrap();
        sim.persist(0, 8).unwrap(); // fence 0
        sim.copy_nodrain(64, &[2; 8]).unwrap();
        sim.fence().unwrap(); // fence 1: makes line 1 durable
        sim.zero_persist(0, 8).unwrap(); // fence 2
        sim.fence().unwrap(); // fence 3
        sim.fence().unwrap(); // fence 4
        assert_eq!(*fences.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert_eq!(*writes.lock().unwrap(), [0, 1, 2]);
        assert_eq!((sim.fence_count(), sim.write_count()), (5, 3));

        let snap = before_second.lock().unwrap().take().unwrap();
        assert_eq!((snap.pending_lines(), snap.pending_units()), (1, 1));
        assert_eq!(word(&snap.image(CrashStrategy::NothingExtra), 64), [0; 8], "not yet durable");
        assert_eq!(word(&snap.image(CrashStrategy::NothingExtra), 0), [1; 8], "fence 0 was");
        assert_eq!(word(&snap.image(CrashStrategy::Everything), 64), [2; 8]);
        assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 64), [2; 8]);

        sim.set_hook(None);
        sim.fence().unwrap();
        assert_eq!(fences.lock().unwrap().len(), 5);
    }

    #[test]
    fn hook_calling_back_panics_and_is_removed() {
        let sim = Arc::new(SimPmem::new(PAGE));
        let called = Arc::new(AtomicBool::new(false));
        {
            let (sim2, called) = (Arc::downgrade(&sim), called.clone());
            sim.set_hook(Some(Box::new(move |_: &SimEvent<'_>| {
                called.store(true, Ordering::SeqCst);
                if let Some(sim) = sim2.upgrade() {
                    let _ = sim.fence_count();
                }
            })));
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.fence()));
        assert!(r.is_err());
        assert!(called.swap(false, Ordering::SeqCst));
        // The lock is usable again and the hook is gone.
        sim.fence().unwrap();
        assert!(!called.load(Ordering::SeqCst));
        assert_eq!(sim.fence_count(), 1);
        assert!(format!("{sim:?}").len() < 120);
    }

    // Test 10: a large device stays sparse, and crash images are cheap.
    #[test]
    fn large_sparse_device_and_many_images() {
        let size = 512 << 20;
        let sim = SimPmem::new(size);
        sim.write(0, &[1; 100]).unwrap();
        sim.copy_persist(size / 2, &[2; 5000]).unwrap();
        sim.write(size - 8, &[3; 8]).unwrap();
        sim.zero_persist(0, size / 4).unwrap();
        assert_eq!(sim.touched_pages(), 4);
        sim.zero_persist(0, size).unwrap();
        assert_eq!(sim.touched_pages(), 4, "zeroing untouched pages allocates nothing");
        assert_eq!(sim.read_vec(size / 2, 5000).unwrap(), vec![0; 5000]);
        sim.flush(0, size).unwrap();
        sim.fence().unwrap();
        assert_eq!(sim.pending_lines(), 0);

        // A workload over 50 pages spread over the device, partly fenced.
        for p in 0..50u64 {
            let off = p * (size / 50) / PAGE * PAGE;
            for line in 0..8 {
                sim.write(off + line * CACHE_LINE, &[p as u8 + 1; 24]).unwrap();
            }
            if p % 2 == 0 {
                sim.flush(off, 4 * CACHE_LINE).unwrap();
            }
        }
        sim.fence().unwrap();
        assert!(sim.touched_pages() <= 54);
        let snap = sim.snapshot();
        assert_eq!(snap.pending_lines(), 25 * 4 + 25 * 8);
        let start = std::time::Instant::now();
        let mut survived = 0usize;
        for seed in 0..2000 {
            let image = snap.image(CrashStrategy::Random { seed });
            assert!(image.touched_pages() <= 54);
            survived += image.read_vec(size / 50 / PAGE * PAGE, 1).unwrap()[0] as usize;
        }
        eprintln!("2000 crash images of a 50-page workload in {:?}", start.elapsed());
        assert!(survived > 0);
    }

    #[test]
    fn crash_images_can_be_reused_and_crashed_again() {
        let sim = SimPmem::new(2 * PAGE);
        sim.copy_persist(PAGE - 4, &[1; 8]).unwrap();
        sim.write(0, &[2; 8]).unwrap();
        let image = sim.crash_image(CrashStrategy::NothingExtra);
        assert_eq!((image.pending_lines(), image.fence_count(), image.write_count()), (0, 0, 0));
        assert_eq!(image.read_vec(PAGE - 4, 8).unwrap(), [1; 8], "reads across a page boundary");
        image.write(PAGE - 8, &[3; 16]).unwrap();
        // The original is unaffected by writes to its image (pages are copy-on-write).
        assert_eq!(sim.read_vec(PAGE - 8, 16).unwrap(), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]);
        let again = image.crash_image(CrashStrategy::NothingExtra);
        assert_eq!(again.read_vec(PAGE - 4, 8).unwrap(), [1; 8]);
        image.persist(PAGE - 8, 16).unwrap();
        assert_eq!(image.crash_image(CrashStrategy::NothingExtra).read_vec(PAGE - 8, 16).unwrap(), [3; 16]);
        assert_eq!(again.read_vec(PAGE - 4, 8).unwrap(), [1; 8], "an older image is unaffected too");
        // Nothing pending: exactly one image.
        assert_eq!(again.crash_images_exhaustive(1).unwrap().len(), 1);
        assert!(again.crash_images_exhaustive(0).is_none());
    }

    #[test]
    fn sim_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SimPmem>();
        check::<CrashState>();
    }
}
