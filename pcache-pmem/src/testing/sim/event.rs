//! What a hook sees: fences and writes, before they take effect.

use std::fmt;

use super::CrashState;
use super::state::State;

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
    pub(super) kind: SimEventKind,
    pub(super) index: u64,
    pub(super) state: &'a State,
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
