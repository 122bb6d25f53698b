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
//! The simulator is test scaffolding, built with the `testing` feature.
//!
//! For crash campaigns, [`SimPmem::set_hook`] installs a callback that sees
//! every fence (and every write) *before* it takes effect, with a
//! [`SimEvent::snapshot`] of the state at that moment.

mod crash;
mod event;
mod state;
#[cfg(test)]
mod tests;

pub use crash::{CrashState, CrashStrategy};
pub use event::{SimEvent, SimEventKind, SimHook};

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::pmem::{Pmem, PmemError, check_range};
use state::{PAGE, Pages, State, overlaps, read_pages};

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
    /// The size, fixed: read without the lock.
    size: u64,
    /// What [`Pmem::bulk_sync`] answers: off (real pmem) unless set, to
    /// drive the engine's group commit as over an msync'd file.
    bulk: std::sync::atomic::AtomicBool,
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
        SimPmem {
            inner: Mutex::new(Inner { state, hook: None, failing_fences: 0 }),
            size,
            bulk: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes the device answer [`Pmem::bulk_sync`] with `on`: a device
    /// whose [`Pmem::sync_all`] costs one call, as an msync'd file, so the
    /// engine defers data to its kset's close (group commit).
    pub fn set_bulk_sync(&self, on: bool) {
        self.bulk.store(on, std::sync::atomic::Ordering::Relaxed);
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
        self.size
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

    fn unwritten(&self, off: u64, len: u64) -> bool {
        if len == 0 || check_range(off, len, self.size).is_err() {
            return false;
        }
        let inner = self.lock();
        let state = &inner.state;
        !state.media.iter().any(|&(m, mlen)| overlaps(off, len, m, mlen))
            && state.current.range(off / PAGE..=(off + len - 1) / PAGE).next().is_none()
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

    fn bulk_sync(&self) -> bool {
        self.bulk.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A fence (a crash point, failing when fences are set to fail) that
    /// makes every pending store durable, from every thread, flushed or not:
    /// what `msync` of a whole file does.
    fn sync_all(&self) -> Result<(), PmemError> {
        let mut inner = self.lock();
        if inner.failing_fences > 0 {
            inner.failing_fences -= 1;
            return Err(PmemError::Io {
                op: "sync_all",
                path: "simulated pmem".into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.notify(&mut inner, SimEventKind::Fence);
        inner.state.fences += 1;
        inner.state.sync_all();
        Ok(())
    }

    /// Without a hook to observe the store and the fence, a store that
    /// nothing else pending shares a line or a fence with goes straight
    /// into both views: the state is the one a store, a flush and a fence
    /// leave, at a fraction of the cost (what the engine fuzz target lives
    /// on). With a hook, each step happens and is seen.
    fn copy_persist(&self, off: u64, src: &[u8]) -> Result<(), PmemError> {
        {
            let mut inner = self.lock();
            check_range(off, src.len() as u64, self.size)?;
            if inner.hook.is_none() && inner.failing_fences == 0 && inner.state.persists_alone(off, src.len() as u64) {
                inner.state.persist_alone(off, src);
                return Ok(());
            }
        }
        self.copy_nodrain(off, src)?;
        self.fence()
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
