//! Counters that many threads bump on every request, split into one slot a
//! thread (by a per-thread index, modulo the slots) so that threads do not
//! fight over one cache line; a read sums the slots. Each slot has a cache
//! line pair of its own (adjacent-line prefetch pairs lines on x86).

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

/// A slot, alone on its 128 bytes.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicI64);

/// A sum split over per-thread slots.
#[derive(Debug)]
pub(super) struct Sharded {
    slots: Box<[Slot]>,
}

/// Slots a counter has: the CPUs, rounded up to a power of two, at most 64.
fn slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 64).next_power_of_two())
}

thread_local! {
    /// This thread's slot index (before the modulo).
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Hands each thread its own index.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

impl Default for Sharded {
    fn default() -> Self {
        Self { slots: (0..slots()).map(|_| Slot::default()).collect() }
    }
}

impl Sharded {
    fn mine(&self) -> &AtomicI64 {
        let i = SLOT.with(|s| {
            s.get().unwrap_or_else(|| {
                let i = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
                s.set(Some(i));
                i
            })
        });
        &self.slots[i & (self.slots.len() - 1)].0
    }

    /// Adds `v` (negative to subtract), with ordering `o` on this thread's slot.
    pub(super) fn add_with(&self, v: i64, o: Ordering) {
        self.mine().fetch_add(v, o);
    }

    /// Adds `v` (negative to subtract).
    pub(super) fn add(&self, v: i64) {
        self.add_with(v, Ordering::Relaxed);
    }

    /// The sum of the slots, each read with ordering `o`.
    pub(super) fn sum_with(&self, o: Ordering) -> i64 {
        self.slots.iter().map(|s| s.0.load(o)).sum()
    }

    /// The sum of the slots.
    pub(super) fn sum(&self) -> i64 {
        self.sum_with(Ordering::Relaxed)
    }

    /// The sum, as a count: never below zero.
    pub(super) fn count(&self) -> u64 {
        self.sum().max(0) as u64
    }

    /// Sets the sum to `v` (while nothing else updates it).
    pub(super) fn set(&self, v: i64) {
        for (i, s) in self.slots.iter().enumerate() {
            s.0.store(if i == 0 { v } else { 0 }, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn slots_sum_what_every_thread_added() {
        let c = Arc::new(Sharded::default());
        c.set(5);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(t + 1);
                    }
                    c.add(-(t + 1) * 10);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.sum(), 5 + (1..=8).map(|t| t * 990).sum::<i64>());
        c.set(-3);
        assert_eq!((c.sum(), c.count()), (-3, 0));
    }
}
