//! The two dialects of the format, and what differs between them.
//!
//! The RFC v1 patch (April 2025) and the Linux dm-pcache target (merged in
//! 6.18) write the same key log, the same 16 MiB segments, the same magic
//! and the same double-copy records, but differ in:
//!
//! | | RFC v1 | dm-pcache |
//! |---|---|---|
//! | CRC | CRC-32, register 0 ([`crc32`]) | CRC-32C, register `0x3B15A` ([`crc32c`]) |
//! | CRC of a 4 KiB record slot | the whole slot from byte 4 | the struct only, from byte 4 |
//! | superblock | version, u16 `seg_num`, CRC over the 4 KiB area | no version, u32 `seg_num`, CRC over 20 bytes |
//! | caches per device | many, in a backing table in segment 0 | one, owning every segment |
//! | cache info | inside a backing-table entry | two copies at `0x2000`/`0x3000` |
//! | tails | control page of the first cache segment | `0x4000` |
//! | segments from | `0x4000` | `0x5000` |
//! | segment info | 24 bytes, type and state bytes | 16 bytes, type in the flags |
//!
//! A [`Dialect`] value says which one a device speaks. It is found from the
//! superblock ([`Dialect::detect`]) and carried by the
//! [`Layout`](crate::Layout), so the readers, the scanner and the engine
//! are written once: every CRC, offset and record codec that differs asks
//! the dialect.

use core::fmt;

use crate::consts::{MAGIC, SB_SIZE};
use crate::crc::{crc32, crc32c, is_zero};

/// Which on-media dialect a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dialect {
    /// The RFC v1 patch's format (`drivers/block/pcache`): several caches
    /// per device, a backing table in segment 0. What `pcache format`
    /// writes unless told otherwise.
    #[default]
    RfcV1,
    /// The Linux kernel's dm-pcache target (`drivers/md/dm-pcache`, 6.18
    /// and later): one cache owning the whole device.
    DmPcache,
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Dialect {
    /// Both dialects.
    pub const ALL: [Dialect; 2] = [Dialect::RfcV1, Dialect::DmPcache];

    /// The name tools print: `rfc-v1` or `dm-pcache`.
    pub const fn name(self) -> &'static str {
        match self {
            Dialect::RfcV1 => "rfc-v1",
            Dialect::DmPcache => "dm-pcache",
        }
    }

    /// The dialect named `name` (as [`Dialect::name`] prints it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The dialect's CRC of `data`.
    pub fn crc(self, data: &[u8]) -> u32 {
        match self {
            Dialect::RfcV1 => crc32(data),
            Dialect::DmPcache => crc32c(data),
        }
    }

    /// The CRC of a record copy: bytes `[4, covered)` of `copy` (fewer if
    /// the copy is shorter). The RFC CRC of zeros is zero, which is checked
    /// for before hashing (most of a backing table is zeros).
    pub fn record_crc(self, copy: &[u8], covered: usize) -> u32 {
        let body = copy.get(4..covered.min(copy.len())).unwrap_or(&[]);
        match self {
            Dialect::RfcV1 if is_zero(body) => 0,
            _ => self.crc(body),
        }
    }

    /// Computes the CRC of `copy` over `[4, covered)` and stores it in the
    /// first 4 bytes. Does nothing on a copy shorter than 4 bytes.
    pub fn seal(self, copy: &mut [u8], covered: usize) {
        let crc = self.record_crc(copy, covered);
        if let Some(field) = copy.get_mut(..4) {
            field.copy_from_slice(&crc.to_le_bytes());
        }
    }

    /// How many bytes of a record copy its CRC covers (from the start of
    /// the copy): the whole slot of `slot` bytes in the RFC, the record's
    /// own `record` bytes in dm-pcache.
    pub const fn covered(self, slot: usize, record: usize) -> usize {
        match self {
            Dialect::RfcV1 => slot,
            Dialect::DmPcache => record,
        }
    }

    /// Device offset of segment 0.
    pub const fn segments_off(self) -> u64 {
        match self {
            Dialect::RfcV1 => crate::consts::SEGMENTS_OFF,
            Dialect::DmPcache => crate::dm::DM_SEGMENTS_OFF,
        }
    }

    /// The most segments a superblock can count.
    pub const fn seg_num_max(self) -> u32 {
        match self {
            Dialect::RfcV1 => crate::consts::SEG_NUM_MAX as u32,
            Dialect::DmPcache => crate::dm::DM_SEG_NUM_MAX,
        }
    }

    /// Whether segment 0 holds a backing table (RFC) rather than cache data.
    pub const fn has_backing_table(self) -> bool {
        matches!(self, Dialect::RfcV1)
    }

    /// The dialect whose superblock fills the start of `area` (the 4 KiB at
    /// device offset 4096), judged by the magic and whichever dialect's CRC
    /// matches. `None` when the magic is not pcache's, or neither CRC
    /// matches (a damaged superblock: [`Dialect::guess`] says which dialect
    /// it more likely was).
    ///
    /// ```
    /// use pcache_format::{Dialect, Superblock, dm::DmSuperblock};
    /// assert_eq!(Dialect::detect(&Superblock::encode_area(63)), Some(Dialect::RfcV1));
    /// assert_eq!(Dialect::detect(&DmSuperblock::encode_area(62)), Some(Dialect::DmPcache));
    /// assert_eq!(Dialect::detect(&[0u8; 4096]), None);
    /// ```
    pub fn detect(area: &[u8]) -> Option<Self> {
        if read_u64(area, 8) != Some(MAGIC) {
            return None;
        }
        let stored = read_u32(area, 0)?;
        let dm = crate::dm::DmSuperblock::SIZE;
        if area.len() >= dm && Dialect::DmPcache.record_crc(area, dm) == stored {
            return Some(Dialect::DmPcache);
        }
        if area.len() >= SB_SIZE && Dialect::RfcV1.record_crc(area, SB_SIZE) == stored {
            return Some(Dialect::RfcV1);
        }
        None
    }

    /// The dialect a superblock with pcache's magic but a CRC neither
    /// dialect accepts was most likely written in: RFC v1 has a version
    /// field of 1 where dm-pcache keeps the low half of its flags (0).
    /// `None` without the magic.
    pub fn guess(area: &[u8]) -> Option<Self> {
        if let Some(d) = Self::detect(area) {
            return Some(d);
        }
        if read_u64(area, 8) != Some(MAGIC) {
            return None;
        }
        let version = u16::from_le_bytes([*area.get(4)?, *area.get(5)?]);
        Some(if version == crate::consts::VERSION { Dialect::RfcV1 } else { Dialect::DmPcache })
    }
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dialect::ALL {
            assert_eq!(Dialect::from_name(d.name()), Some(d));
        }
        assert_eq!(Dialect::from_name("rfc"), None);
    }

    #[test]
    fn record_crc_covers_what_it_is_told() {
        let mut copy = [0u8; 4096];
        copy[4] = 1;
        copy[100] = 7;
        // RFC: the slot; dm-pcache: the struct only.
        assert_eq!(Dialect::RfcV1.record_crc(&copy, 4096), crc32(&copy[4..]));
        assert_eq!(Dialect::DmPcache.record_crc(&copy, 24), crc32c(&copy[4..24]));
        // Past the end: what there is.
        assert_eq!(Dialect::DmPcache.record_crc(&copy[..10], 24), crc32c(&copy[4..10]));
        assert_eq!(Dialect::RfcV1.record_crc(&[1, 2], 16), 0);
        // Zeros: 0 in the RFC, not in dm-pcache.
        assert_eq!(Dialect::RfcV1.record_crc(&[0u8; 16], 16), 0);
        assert_ne!(Dialect::DmPcache.record_crc(&[0u8; 16], 16), 0);
    }

    #[test]
    fn golden_tail_and_last_kset() {
        // Spec §5 example 2: tail {seq 1, seg 0, off 0}.
        let mut rec = [0u8; 16];
        rec[4] = 1;
        Dialect::RfcV1.seal(&mut rec, 16);
        assert_eq!(read_u32(&rec, 0), Some(0x9BA5_4C6F));
        Dialect::DmPcache.seal(&mut rec, 16);
        assert_eq!(read_u32(&rec, 0), Some(0x6EF5_DFB0));
    }

    #[test]
    fn a_damaged_superblock_is_guessed_not_detected() {
        let mut rfc = crate::Superblock::encode_area(63);
        rfc[3000] ^= 1;
        assert_eq!(Dialect::detect(&rfc), None);
        assert_eq!(Dialect::guess(&rfc), Some(Dialect::RfcV1));
        let mut dm = crate::dm::DmSuperblock::encode_area(62);
        dm[16] ^= 1;
        assert_eq!(Dialect::detect(&dm), None);
        assert_eq!(Dialect::guess(&dm), Some(Dialect::DmPcache));
        assert_eq!(Dialect::guess(&[0u8; 4096]), None);
        assert_eq!(Dialect::guess(&[0u8; 3]), None);
    }
}
