//! The model disk: what every sector of a cached device must read back,
//! and what it may hold after a crash.
//!
//! **Content.** Write `id` puts in each 8-byte word of a sector its id and
//! the word's place on the device ([`sector_data`]), so a sector read back
//! tells which write it holds, whether it sits where it belongs and whether
//! it is whole ([`holds`]). Id 0 is the backing device's original content;
//! ids with the [`ZERO`] bit are zeroing, which reads back as zeros.
//!
//! **The durability contract.** A write acknowledged before a completed
//! flush, or written with FUA, survives a crash; one not yet flushed may
//! or may not, sector by sector. So after a crash each sector holds its
//! value at the last flush (or FUA write) covering it, or any value
//! written to it since: its *candidates*. A graceful stop is a flush.

use crate::testing::workload::{Op, SECTOR};

/// Which write a sector's content comes from.
pub type WriteId = u32;

/// The bit of a [`WriteId`] that marks zeroing; [`holds`] returns `ZERO`
/// alone for a sector of zeros.
pub const ZERO: WriteId = 1 << 31;

/// The 8-byte word at byte `off` (a multiple of 8) as write `id` leaves it.
pub fn word(id: WriteId, off: u64) -> u64 {
    if id & ZERO != 0 {
        return 0;
    }
    (u64::from(id) << 32) | (off / 8) | 1 << 31
}

/// `sectors` sectors from `sector` as write `id` leaves them.
pub fn sector_data(id: WriteId, sector: u64, sectors: u64) -> Vec<u8> {
    let mut buf = vec![0; (sectors * SECTOR) as usize];
    fill(id, sector, &mut buf);
    buf
}

/// Fills `buf` (whole sectors) with what write `id` leaves from `sector` on.
pub fn fill(id: WriteId, sector: u64, buf: &mut [u8]) {
    let off = sector * SECTOR;
    for (i, w) in buf.as_chunks_mut::<8>().0.iter_mut().enumerate() {
        *w = word(id, off + i as u64 * 8).to_le_bytes();
    }
}

/// The write whose content a sector at byte `off` holds: its id, [`ZERO`]
/// for zeros, `None` if it holds no write's content (torn, misplaced,
/// garbage).
pub fn holds(sector: &[u8], off: u64) -> Option<WriteId> {
    let (words, _) = sector.as_chunks::<8>();
    let first = u64::from_le_bytes(*words.first()?);
    let id = if first == 0 { ZERO } else { (first >> 32) as WriteId };
    let expect = word(id, off);
    let step = if id == ZERO { 0 } else { 1 };
    // Every word compared, no early exit: this loop vectorises.
    let diff = words.iter().zip(0..).fold(0, |d, (w, i)| d | (u64::from_le_bytes(*w) ^ (expect + i * step)));
    (diff == 0).then_some(id)
}

/// Whether a sector read back as `held` (from [`holds`]) is write `id`.
fn is(held: WriteId, id: WriteId) -> bool {
    if held == ZERO { id & ZERO != 0 } else { id == held }
}

/// What each sector of a device holds now and may hold after a crash.
#[derive(Debug, Clone)]
pub struct ModelDisk {
    /// Per sector, its value at the last flush (or FUA write) covering it.
    durable: Vec<WriteId>,
    /// Per sector, the writes to it since, in order: the last is what it
    /// holds now.
    since: Vec<Vec<WriteId>>,
}

impl ModelDisk {
    /// A device of `sectors` sectors holding its original content (id 0).
    pub fn new(sectors: u64) -> Self {
        Self { durable: vec![0; sectors as usize], since: vec![Vec::new(); sectors as usize] }
    }

    /// Sectors in the device.
    pub fn sectors(&self) -> u64 {
        self.durable.len() as u64
    }

    /// The write sector `s` holds now.
    pub fn current(&self, s: usize) -> WriteId {
        self.since[s].last().copied().unwrap_or(self.durable[s])
    }

    /// Applies op `id`, completed (acknowledged). Restarts are flushes;
    /// crashes are [`ModelDisk::settle`]d sector by sector.
    pub fn apply(&mut self, op: &Op, id: WriteId) {
        match *op {
            Op::Write { sector, sectors, fua } => {
                for s in sector as usize..(sector + sectors) as usize {
                    if fua {
                        self.settle(s, id);
                    } else {
                        self.since[s].push(id);
                    }
                }
            }
            Op::Zero { sector, sectors } => {
                for s in sector as usize..(sector + sectors) as usize {
                    self.since[s].push(id | ZERO);
                }
            }
            Op::Flush | Op::Restart => {
                for s in 0..self.since.len() {
                    if let Some(&last) = self.since[s].last() {
                        self.settle(s, last);
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether sector `s` may hold `held` (from [`holds`]) after a crash.
    pub fn may_hold(&self, s: usize, held: WriteId) -> bool {
        is(held, self.durable[s]) || self.since[s].iter().any(|&id| is(held, id))
    }

    /// What sector `s` may hold after a crash.
    pub fn candidates(&self, s: usize) -> Vec<WriteId> {
        let mut v = vec![self.durable[s]];
        v.extend(&self.since[s]);
        v
    }

    /// Sector `s` holds `id`, durably (after a crash, what it was found to hold).
    pub fn settle(&mut self, s: usize, id: WriteId) {
        self.durable[s] = id;
        self.since[s].clear();
    }

    /// Checks `buf`, read from `sector` on, against what it must hold now.
    pub fn check_read(&self, sector: u64, buf: &[u8]) -> Result<(), String> {
        for (i, chunk) in buf.chunks(SECTOR as usize).enumerate() {
            let s = sector as usize + i;
            let want = self.current(s);
            match holds(chunk, s as u64 * SECTOR) {
                Some(held) if is(held, want) => {}
                held => return Err(format!("sector {s} holds {}, not {}", name(held), name(Some(want)))),
            }
        }
        Ok(())
    }

    /// After a crash: checks `buf`, read from `sector` on, against what
    /// each sector may hold, and settles each on what it holds.
    pub fn check_crashed(&mut self, sector: u64, buf: &[u8]) -> Result<(), String> {
        for (i, chunk) in buf.chunks(SECTOR as usize).enumerate() {
            let s = sector as usize + i;
            match holds(chunk, s as u64 * SECTOR) {
                Some(held) if self.may_hold(s, held) => self.settle(s, held),
                held => {
                    return Err(format!("sector {s} holds {}, none of {:x?}", name(held), self.candidates(s)));
                }
            }
        }
        Ok(())
    }
}

/// How a sector's content is shown in a mismatch.
pub fn name(held: Option<WriteId>) -> String {
    match held {
        None => "no write's content (torn, misplaced or garbage)".into(),
        Some(id) if id & ZERO != 0 => "zeros".into(),
        Some(0) => "its original content".into(),
        Some(id) => format!("write {id:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_name_their_write_and_place() {
        let data = sector_data(7, 10, 2);
        assert_eq!(holds(&data[..512], 10 * SECTOR), Some(7));
        assert_eq!(holds(&data[512..], 11 * SECTOR), Some(7));
        assert_eq!(holds(&data[512..], 10 * SECTOR), None, "misplaced");
        let mut torn = data[..512].to_vec();
        torn[256..].copy_from_slice(&sector_data(8, 10, 1)[256..]);
        assert_eq!(holds(&torn, 10 * SECTOR), None, "torn");
        assert_eq!(holds(&[0; 512], 0), Some(ZERO));
        assert_eq!(holds(&sector_data(3 | ZERO, 0, 1), 0), Some(ZERO));
        assert_eq!(holds(&sector_data(0, 4, 1), 4 * SECTOR), Some(0));
    }

    #[test]
    fn the_durability_contract() {
        let mut m = ModelDisk::new(4);
        m.apply(&Op::Write { sector: 0, sectors: 2, fua: false }, 1);
        m.apply(&Op::Write { sector: 1, sectors: 2, fua: true }, 2);
        m.apply(&Op::Zero { sector: 2, sectors: 2 }, 3);
        assert_eq!((0..4).map(|s| m.current(s)).collect::<Vec<_>>(), [1, 2, 3 | ZERO, 3 | ZERO]);
        assert_eq!(m.candidates(0), [0, 1], "not flushed: old or new");
        assert_eq!(m.candidates(1), [2], "FUA: durable");
        assert!(m.may_hold(3, ZERO) && m.may_hold(3, 0) && !m.may_hold(3, 1));
        let mut crashed = m.clone();
        let mut image = sector_data(0, 0, 4);
        image[512..1024].copy_from_slice(&sector_data(2, 1, 1));
        image[1024..1536].fill(0);
        crashed.check_crashed(0, &image).unwrap();
        assert_eq!(crashed.candidates(0), [0], "settled on what it held");
        image[..512].copy_from_slice(&sector_data(2, 0, 1));
        assert!(m.clone().check_crashed(0, &image).is_err(), "never written there");
        m.apply(&Op::Flush, 4);
        assert_eq!(m.candidates(0), [1]);
        m.check_read(1, &sector_data(2, 1, 1)).unwrap();
        assert!(m.check_read(0, &sector_data(0, 0, 1)).is_err());
    }
}
