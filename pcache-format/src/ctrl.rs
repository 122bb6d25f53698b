//! The control page of a cache segment: generation records and, in cache
//! segment 0, the key tail and dirty tail (spec §2.6.5).

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::consts::{CACHE_SEG_DATA_SIZE, DIRTY_TAIL_OFF, KEY_TAIL_OFF, SMALL_RECORD_SIZE};
use crate::error::{Error, Record};
use crate::meta::{MetaHeader, MetaRecord};

/// A cache segment's generation; two copies at offsets 0 and 16 of its
/// control page, CRC over bytes [4, 16) of each.
///
/// Keys record the generation of their segment when its space was
/// allocated; a key whose `seg_gen` is below the segment's generation is
/// stale.
///
/// ```text
///  0        8       16
///  +--------+-------+
///  | header | gen   |
///  | 8 B    | le64  |
///  +--------+-------+
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct CacheSegGen {
    /// Header, CRC over bytes [4, 16).
    pub header: MetaHeader,
    /// The generation.
    pub gen_: U64,
}

static_assertions::const_assert_eq!(core::mem::size_of::<CacheSegGen>(), SMALL_RECORD_SIZE);
static_assertions::const_assert_eq!(core::mem::offset_of!(CacheSegGen, gen_), 8);

impl CacheSegGen {
    /// Generation `gen_` (CRC and sequence set when encoded).
    pub fn new(gen_: u64) -> Self {
        let mut g = Self::new_zeroed();
        g.gen_ = U64::new(gen_);
        g
    }
}

impl MetaRecord for CacheSegGen {
    const RECORD: Record = Record::SegmentGen;
    const COPY_SIZE: usize = SMALL_RECORD_SIZE;

    fn header(&self) -> &MetaHeader {
        &self.header
    }

    fn header_mut(&mut self) -> &mut MetaHeader {
        &mut self.header
    }

    /// Any generation is valid.
    fn check(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A position in a cache's key log: a cache segment *index* (not a device
/// segment number) and an offset inside that segment's data area.
///
/// ```text
///  0        8              12        16
///  +--------+--------------+---------+
///  | header | cache_seg_id | seg_off |
///  | 8 B    | le32         | le32    |
///  +--------+--------------+---------+
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct CachePos {
    /// Header, CRC over bytes [4, 16).
    pub header: MetaHeader,
    /// Cache segment index.
    pub cache_seg_id: U32,
    /// Offset in that segment's data area.
    pub seg_off: U32,
}

static_assertions::const_assert_eq!(core::mem::size_of::<CachePos>(), SMALL_RECORD_SIZE);
static_assertions::const_assert_eq!(core::mem::offset_of!(CachePos, cache_seg_id), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(CachePos, seg_off), 12);

impl CachePos {
    /// Position `seg_off` in cache segment `cache_seg_id`.
    pub fn new(cache_seg_id: u32, seg_off: u32) -> Self {
        let mut p = Self::new_zeroed();
        p.cache_seg_id = U32::new(cache_seg_id);
        p.seg_off = U32::new(seg_off);
        p
    }
}

impl MetaRecord for CachePos {
    const RECORD: Record = Record::CachePos;
    const COPY_SIZE: usize = SMALL_RECORD_SIZE;

    fn header(&self) -> &MetaHeader {
        &self.header
    }

    fn header_mut(&mut self) -> &mut MetaHeader {
        &mut self.header
    }

    /// The offset lies inside the data area.
    fn check(&self) -> Result<(), Error> {
        let off = self.seg_off.get();
        if off >= CACHE_SEG_DATA_SIZE {
            return Err(Error::out_of_range(
                Record::CachePos,
                "seg_off",
                off.into(),
                0,
                (CACHE_SEG_DATA_SIZE - 1).into(),
            ));
        }
        Ok(())
    }
}

/// The control page of every cache segment (first 544 bytes of the page).
///
/// ```text
///  0        16       32                544
///  +--------+--------+-----------------+
///  | gen[0] | gen[1] | res: 64 x le64  |
///  +--------+--------+-----------------+
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct CacheSegCtrl {
    /// The two copies of the generation record.
    pub gen_: [CacheSegGen; 2],
    /// Reserved, 0.
    pub res: [U64; 64],
}

static_assertions::const_assert_eq!(core::mem::size_of::<CacheSegCtrl>(), 544);

/// The control page of cache segment 0 (first 608 bytes of the page): the
/// segment's own control fields followed by the two log tails.
///
/// ```text
///  0              544            560            576              592              608
///  +--------------+--------------+--------------+----------------+----------------+
///  | CacheSegCtrl | key_tail[0]  | key_tail[1]  | dirty_tail[0]  | dirty_tail[1]  |
///  +--------------+--------------+--------------+----------------+----------------+
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct CacheCtrl {
    /// Cache segment 0's own control fields.
    pub seg_ctrl: CacheSegCtrl,
    /// The oldest kset still owned by the cache (advanced by GC).
    pub key_tail_pos: [CachePos; 2],
    /// The oldest kset not yet written back (advanced by writeback).
    pub dirty_tail_pos: [CachePos; 2],
}

static_assertions::const_assert_eq!(core::mem::size_of::<CacheCtrl>(), 608);
static_assertions::const_assert_eq!(core::mem::offset_of!(CacheCtrl, key_tail_pos), KEY_TAIL_OFF);
static_assertions::const_assert_eq!(core::mem::offset_of!(CacheCtrl, dirty_tail_pos), DIRTY_TAIL_OFF);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dialect;
    use crate::meta::{encode_copy, read_latest};

    #[test]
    fn golden_tail() {
        // Spec §5 example 2.
        let mut copy = [0u8; 16];
        encode_copy(Dialect::RfcV1, &CachePos::new(0, 0), 1, &mut copy).unwrap();
        assert_eq!(u32::from_le_bytes(copy[..4].try_into().unwrap()), 0x9BA5_4C6F);
        assert_eq!(&copy[4..], &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn gen_pair_latest() {
        let mut pair = [0u8; 32];
        encode_copy(Dialect::RfcV1, &CacheSegGen::new(5), 10, &mut pair[..16]).unwrap();
        encode_copy(Dialect::RfcV1, &CacheSegGen::new(6), 11, &mut pair[16..]).unwrap();
        let l = read_latest::<CacheSegGen>(Dialect::RfcV1, &pair).unwrap();
        assert_eq!((l.copy, l.record.gen_.get()), (1, 6));
    }

    #[test]
    fn pos_offset_checked() {
        let mut copy = [0u8; 16];
        encode_copy(Dialect::RfcV1, &CachePos::new(0, CACHE_SEG_DATA_SIZE), 1, &mut copy).unwrap();
        let mut pair = [0u8; 32];
        pair[..16].copy_from_slice(&copy);
        pair[16..].copy_from_slice(&copy);
        let err = read_latest::<CachePos>(Dialect::RfcV1, &pair).unwrap_err();
        assert_eq!(err.copy, Some(0));
    }
}
