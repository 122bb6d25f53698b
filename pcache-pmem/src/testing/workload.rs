//! The workload alphabet: the requests and events every engine test drives
//! the cache with (the `engine` fuzz target, the model test, the crash
//! campaign), in sectors of 512 bytes.
//!
//! An [`Op`] says what happens, not what it carries: the data of a write is
//! derived from the write's id by [`crate::testing::model::sector_data`], so
//! a sector read back names the write it holds.

use std::ops::Range;

use crate::testing::model::{WriteId, ZERO};
use crate::testing::sim::CrashStrategy;

/// Bytes in a sector, the unit of every [`Op`].
pub const SECTOR: u64 = 512;

/// One step of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Writes `sectors` sectors at `sector`; with `fua`, durable on return.
    Write {
        /// First sector.
        sector: u64,
        /// Sectors written (at least 1).
        sectors: u64,
        /// Forced unit access.
        fua: bool,
    },
    /// Zeroes `sectors` sectors at `sector` (not FUA).
    Zero {
        /// First sector.
        sector: u64,
        /// Sectors zeroed (at least 1).
        sectors: u64,
    },
    /// Reads `sectors` sectors at `sector`: they must hold what was written last.
    Read {
        /// First sector.
        sector: u64,
        /// Sectors read (at least 1).
        sectors: u64,
    },
    /// Discards `sectors` sectors at `sector` from the cache (the data stays).
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors discarded (at least 1).
        sectors: u64,
    },
    /// Makes every write acknowledged so far durable.
    Flush,
    /// Writes back at most `ksets` ksets' worth of dirty data.
    WriteBack {
        /// Ksets to write back.
        ksets: usize,
    },
    /// One pass of segment reclaim.
    Gc,
    /// A graceful stop and a new start of the cache.
    Restart,
    /// A power failure of the pmem, leaving the image `strategy` picks,
    /// and a new start (recovery) on it.
    Crash(CrashStrategy),
}

impl Op {
    /// The sectors the op addresses, if it addresses any.
    pub fn sectors(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { sector, sectors, .. }
            | Op::Zero { sector, sectors }
            | Op::Read { sector, sectors }
            | Op::Discard { sector, sectors } => Some((sector, sectors)),
            _ => None,
        }
    }

    /// The op moved inside a device of `device` sectors: its first sector
    /// taken modulo the device, its length cut at the end (at least one
    /// sector). Ops that address no sector are unchanged.
    pub fn fit(self, device: u64) -> Op {
        let place = |sector: u64, sectors: u64| {
            let s = sector % device.max(1);
            (s, sectors.clamp(1, device - s))
        };
        match self {
            Op::Write { sector, sectors, fua } => {
                let (sector, sectors) = place(sector, sectors);
                Op::Write { sector, sectors, fua }
            }
            Op::Zero { sector, sectors } => {
                let (sector, sectors) = place(sector, sectors);
                Op::Zero { sector, sectors }
            }
            Op::Read { sector, sectors } => {
                let (sector, sectors) = place(sector, sectors);
                Op::Read { sector, sectors }
            }
            Op::Discard { sector, sectors } => {
                let (sector, sectors) = place(sector, sectors);
                Op::Discard { sector, sectors }
            }
            other => other,
        }
    }

    /// The sectors op `id` changes, and the write they then hold: what a
    /// crash while the op is in progress may leave in them besides their
    /// candidates.
    pub fn changes(&self, id: WriteId) -> Option<(Range<usize>, WriteId)> {
        match *self {
            Op::Write { sector, sectors, .. } => Some((sector as usize..(sector + sectors) as usize, id)),
            Op::Zero { sector, sectors } => Some((sector as usize..(sector + sectors) as usize, id | ZERO)),
            _ => None,
        }
    }
}

/// Compact for the fuzzer: a sector is a `u16`, a length a `u8` (1 to 16
/// sectors; 16 to 256 in steps of 16 for the top sixteen values: the
/// simulator tracks every 8-byte word, so long requests cost cases a
/// second, and most of what the engine does with a request shows in short
/// ones), a crash one of three strategies; [`Op::fit`] then places the op
/// in the device.
impl<'a> arbitrary::Arbitrary<'a> for Op {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let at = |u: &mut arbitrary::Unstructured<'a>| -> arbitrary::Result<(u64, u64)> {
            let len = u8::arbitrary(u)?;
            let sectors = if len >= 0xf0 { u64::from(len - 0xef) * 16 } else { u64::from(len & 0x0f) + 1 };
            Ok((u64::from(u16::arbitrary(u)?), sectors))
        };
        Ok(match u.int_in_range(0u8..=8)? {
            0 => {
                let (sector, sectors) = at(u)?;
                Op::Write { sector, sectors, fua: bool::arbitrary(u)? }
            }
            1 => {
                let (sector, sectors) = at(u)?;
                Op::Zero { sector, sectors }
            }
            2 => {
                let (sector, sectors) = at(u)?;
                Op::Read { sector, sectors }
            }
            3 => {
                let (sector, sectors) = at(u)?;
                Op::Discard { sector, sectors }
            }
            4 => Op::Flush,
            5 => Op::WriteBack { ksets: usize::from(u.int_in_range(1u8..=4)?) },
            6 => Op::Gc,
            7 => Op::Restart,
            _ => Op::Crash(match u.int_in_range(0u8..=2)? {
                0 => CrashStrategy::NothingExtra,
                1 => CrashStrategy::Everything,
                _ => CrashStrategy::Random { seed: u64::arbitrary(u)? },
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_places_every_op_inside_the_device() {
        for (sector, sectors) in [(0, 0), (5, 1), (99, 7), (100, 3), (250, 1000), (u64::MAX, u64::MAX)] {
            for op in [
                Op::Write { sector, sectors, fua: true },
                Op::Zero { sector, sectors },
                Op::Read { sector, sectors },
                Op::Discard { sector, sectors },
            ] {
                let (s, n) = op.fit(100).sectors().unwrap();
                assert!(n >= 1 && s + n <= 100, "{op:?} -> {s}+{n}");
            }
        }
        assert_eq!(Op::Flush.fit(100), Op::Flush);
    }

    #[test]
    fn arbitrary_ops_cover_the_alphabet() {
        use arbitrary::{Arbitrary, Unstructured};
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut u = Unstructured::new(&bytes);
        let mut ops = Vec::new();
        while !u.is_empty() {
            ops.push(Op::arbitrary(&mut u).unwrap());
        }
        let kinds: std::collections::HashSet<_> = ops.iter().map(std::mem::discriminant).collect();
        assert_eq!(kinds.len(), 9, "{ops:?}");
    }
}
