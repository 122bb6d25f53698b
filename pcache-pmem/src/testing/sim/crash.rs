//! Crash images: what a power failure in a frozen state could leave.

use std::fmt;

use super::SimPmem;
use super::state::{Pages, Unit};

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

/// A frozen simulator state: the durable image plus the pending stores of
/// every line, from which crash images are produced.
///
/// Cheap to take: pages are shared copy-on-write with the simulator.
#[derive(Clone)]
pub struct CrashState {
    pub(super) size: u64,
    pub(super) durable: Pages,
    /// Lines with pending units, in ascending line order, units in program order.
    pub(super) pending: Vec<(u64, Vec<Unit>)>,
    pub(super) media: Vec<(u64, u64)>,
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
            Unit::apply_all(&units[..keep], &mut pages);
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
