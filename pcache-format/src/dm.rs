//! The records only the dm-pcache dialect has (spec §3.4, §3.5).
//!
//! ```text
//! 0x0000  unused 4 KiB
//! 0x1000  superblock (24-byte struct, CRC over bytes [4, 24))
//! 0x2000  cache info copy 0         (24-byte struct in a 4 KiB slot)
//! 0x3000  cache info copy 1
//! 0x4000  key tail copies at +0x00 and +0x10, dirty tail copies at +0x20 and +0x30
//! 0x5000  segment 0 ... segment i at 0x5000 + i * 16 MiB, every one a cache segment
//! ```
//!
//! Inside a segment the layout is the RFC's: two segment-info slots, the
//! control page with the generation record, then the data area at +0x3000.
//! Ksets, keys, tails and generation records have the RFC's bytes; only
//! their CRC differs ([`Dialect::DmPcache`]).

use bitflags::bitflags;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::consts::{CACHE_GC_PERCENT_DEFAULT, CACHE_GC_PERCENT_MAX, MAGIC, PAGE_SIZE, SB_SIZE, SEG_INFO_SIZE};
use crate::dialect::Dialect;
use crate::error::{Error, ErrorKind, Record};
use crate::meta::{MetaHeader, MetaRecord};

/// Device offset of the two cache-info copies (copy 1 at +4096).
pub const DM_CACHE_INFO_OFF: u64 = 0x2000;
/// Device offset of the tails: key tail copies at +0 and +16, dirty tail
/// copies at +32 and +48.
pub const DM_CTRL_OFF: u64 = 0x4000;
/// Offset of the key tail copies inside the control area.
pub const DM_KEY_TAIL_OFF: u64 = 0;
/// Offset of the dirty tail copies inside the control area.
pub const DM_DIRTY_TAIL_OFF: u64 = 32;
/// Device offset of segment 0.
pub const DM_SEGMENTS_OFF: u64 = 0x5000;
/// The most segments a dm-pcache superblock may count (the kernel's bound).
pub const DM_SEG_NUM_MAX: u32 = 1 << 20;
/// `segment_info.flags` type value of a cache data segment.
pub const DM_SEGMENT_TYPE_CACHE_DATA: u32 = 1;

bitflags! {
    /// The dm-pcache superblock's `flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct DmSbFlags: u32 {
        /// Formatted on a big-endian host: refused (every field here is
        /// little-endian, and the kernel refuses a mismatch too).
        const BIGENDIAN = 1 << 0;
    }
}

/// The dm-pcache superblock, at device offset 4096.
///
/// ```text
///  0       4        8                 16        20        24
///  +-------+--------+-----------------+---------+---------+
///  | crc   | flags  | magic           | seg_num | padding |
///  | le32  | le32   | le64            | le32    | 4 bytes |
///  +-------+--------+-----------------+---------+---------+
///  crc: CRC-32C (register 0x3B15A) of bytes [4, 24), padding included.
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct DmSuperblock {
    /// CRC of bytes [4, 24).
    pub crc: U32,
    /// [`DmSbFlags`].
    pub flags: U32,
    /// [`MAGIC`].
    pub magic: U64,
    /// Number of 16 MiB segments.
    pub seg_num: U32,
    /// Padding; covered by the CRC and kept as found.
    pub padding: [u8; 4],
}

static_assertions::const_assert_eq!(core::mem::size_of::<DmSuperblock>(), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(DmSuperblock, flags), 4);
static_assertions::const_assert_eq!(core::mem::offset_of!(DmSuperblock, magic), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(DmSuperblock, seg_num), 16);

impl DmSuperblock {
    /// Size of the struct, which is what its CRC covers.
    pub const SIZE: usize = core::mem::size_of::<Self>();

    /// A little-endian superblock for `seg_num` segments, sealed.
    pub fn new(seg_num: u32) -> Self {
        let mut sb = Self::new_zeroed();
        sb.magic = U64::new(MAGIC);
        sb.seg_num = U32::new(seg_num);
        sb.seal();
        sb
    }

    /// Recomputes the CRC.
    pub fn seal(&mut self) {
        let crc = Dialect::DmPcache.record_crc(self.as_bytes(), Self::SIZE);
        self.crc = U32::new(crc);
    }

    /// The 4 KiB superblock area the kernel writes at first use: the struct,
    /// then zeros.
    pub fn encode_area(seg_num: u32) -> [u8; SB_SIZE] {
        let mut area = [0u8; SB_SIZE];
        area[..Self::SIZE].copy_from_slice(Self::new(seg_num).as_bytes());
        area
    }

    /// The struct at the start of `area`, without any check but its length.
    pub fn read(area: &[u8]) -> Result<Self, Error> {
        Self::read_from_prefix(area)
            .map(|(sb, _)| sb)
            .map_err(|_| Error::truncated(Record::Superblock, Self::SIZE, area.len()))
    }

    /// The CRC computed over the struct at the start of `area`.
    pub fn computed_crc(area: &[u8]) -> u32 {
        Dialect::DmPcache.record_crc(area, Self::SIZE)
    }

    /// Decodes and validates a superblock the way the kernel's load path
    /// does: magic, CRC, the BIGENDIAN flag, and `seg_num` between 1 and
    /// 1 048 576 (whether its segments fit the device is the
    /// [`Layout`](crate::Layout)'s check). Unknown flags are refused too.
    ///
    /// ```
    /// use pcache_format::dm::DmSuperblock;
    /// let area = DmSuperblock::encode_area(62);
    /// assert_eq!(DmSuperblock::decode(&area).unwrap().seg_num.get(), 62);
    /// let mut bad = area;
    /// bad[20] ^= 1; // the padding is covered by the CRC
    /// assert!(DmSuperblock::decode(&bad).is_err());
    /// ```
    pub fn decode(area: &[u8]) -> Result<Self, Error> {
        let sb = Self::read(area)?;
        sb.validate(Self::computed_crc(area))?;
        Ok(sb)
    }

    /// Validates a superblock whose computed CRC is `computed_crc`.
    pub fn validate(&self, computed_crc: u32) -> Result<(), Error> {
        const R: Record = Record::Superblock;
        let magic = self.magic.get();
        if magic != MAGIC {
            return Err(Error::new(R, ErrorKind::BadMagic { expected: MAGIC, found: magic }));
        }
        let stored = self.crc.get();
        if stored != computed_crc {
            return Err(Error::new(R, ErrorKind::BadCrc { stored, computed: computed_crc }));
        }
        let flags = self.flags.get();
        if flags & DmSbFlags::BIGENDIAN.bits() != 0 {
            return Err(Error::new(R, ErrorKind::BigEndian));
        }
        let unknown = flags & !DmSbFlags::all().bits();
        if unknown != 0 {
            return Err(Error::unknown_flags(R, "flags", unknown.into()));
        }
        let seg_num = self.seg_num.get();
        if seg_num == 0 || seg_num > DM_SEG_NUM_MAX {
            return Err(Error::out_of_range(R, "seg_num", seg_num.into(), 1, DM_SEG_NUM_MAX.into()));
        }
        Ok(())
    }
}

/// Cache modes (`cache_info.flags` bits 2-5). Only write-back exists in the
/// kernel; the others are refused by its constructor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmCacheMode {
    /// Write-back, the only mode the kernel runs.
    Writeback,
    /// Reserved by the kernel, never accepted.
    Writethrough,
    /// Reserved by the kernel, never accepted.
    Writearound,
    /// Reserved by the kernel, never accepted.
    Writeonly,
}

impl DmCacheMode {
    /// The mode of value `v` (0-3).
    pub const fn from_bits(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Writeback),
            1 => Some(Self::Writethrough),
            2 => Some(Self::Writearound),
            3 => Some(Self::Writeonly),
            _ => None,
        }
    }

    /// The name `dmsetup table` uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Writeback => "writeback",
            Self::Writethrough => "writethrough",
            Self::Writearound => "writearound",
            Self::Writeonly => "writeonly",
        }
    }
}

/// `cache_info.flags`: bit 0 data CRC, bit 1 INIT_DONE, bits 2-5 the cache
/// mode, bits 6-12 the gc percent.
pub mod cache_flags {
    /// The cache keeps a CRC of every key's data.
    pub const DATA_CRC: u32 = 1 << 0;
    /// The cache finished its first start; without it the kernel formats
    /// the cache again.
    pub const INIT_DONE: u32 = 1 << 1;
    /// Shift of the cache mode.
    pub const MODE_SHIFT: u32 = 2;
    /// Mask of the cache mode (after the shift).
    pub const MODE_MASK: u32 = 0xf;
    /// Shift of the gc percent.
    pub const GC_PERCENT_SHIFT: u32 = 6;
    /// Mask of the gc percent (after the shift).
    pub const GC_PERCENT_MASK: u32 = 0x7f;
    /// Every bit with a meaning.
    pub const KNOWN: u32 = DATA_CRC | INIT_DONE | (MODE_MASK << MODE_SHIFT) | (GC_PERCENT_MASK << GC_PERCENT_SHIFT);
}

/// The cache's own record (24 bytes in a 4 KiB slot, two copies at
/// `0x2000` and `0x3000`).
///
/// ```text
///  0        8        12       16       20         24
///  +--------+--------+--------+--------+----------+
///  | header | seg_id | n_segs | flags  | reserved |
///  +--------+--------+--------+--------+----------+
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct DmCacheInfo {
    /// CRC (over bytes [4, 24)) and sequence number.
    pub header: MetaHeader,
    /// Device segment of the first segment of the cache's chain.
    pub seg_id: U32,
    /// Segments in the chain.
    pub n_segs: U32,
    /// See [`cache_flags`].
    pub flags: U32,
    /// Reserved, 0.
    pub reserved: U32,
}

static_assertions::const_assert_eq!(core::mem::size_of::<DmCacheInfo>(), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(DmCacheInfo, seg_id), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(DmCacheInfo, flags), 16);

impl DmCacheInfo {
    /// The record the kernel writes when it starts a new cache of `n_segs`
    /// segments from segment 0 (INIT_DONE set, write-back). The gc percent
    /// keeps its low 7 bits, the field's width (valid values are 0 to 90).
    pub fn new(n_segs: u32, gc_percent: u8, data_crc: bool) -> Self {
        let mut ci = Self::new_zeroed();
        ci.n_segs = U32::new(n_segs);
        let gc = u32::from(gc_percent) & cache_flags::GC_PERCENT_MASK;
        let mut flags = cache_flags::INIT_DONE | (gc << cache_flags::GC_PERCENT_SHIFT);
        if data_crc {
            flags |= cache_flags::DATA_CRC;
        }
        ci.flags = U32::new(flags);
        ci
    }

    /// Whether the cache keeps data CRCs.
    pub fn data_crc(&self) -> bool {
        self.flags.get() & cache_flags::DATA_CRC != 0
    }

    /// Whether the cache finished its first start.
    pub fn init_done(&self) -> bool {
        self.flags.get() & cache_flags::INIT_DONE != 0
    }

    /// The cache mode, if the bits name one.
    pub fn mode(&self) -> Option<DmCacheMode> {
        DmCacheMode::from_bits((self.flags.get() >> cache_flags::MODE_SHIFT) & cache_flags::MODE_MASK)
    }

    /// The gc percent.
    pub fn gc_percent(&self) -> u32 {
        (self.flags.get() >> cache_flags::GC_PERCENT_SHIFT) & cache_flags::GC_PERCENT_MASK
    }

    /// The same record with the gc percent replaced (its low 7 bits, as
    /// for [`DmCacheInfo::new`]): no other flag changes.
    pub fn with_gc_percent(mut self, percent: u8) -> Self {
        let mask = cache_flags::GC_PERCENT_MASK << cache_flags::GC_PERCENT_SHIFT;
        let gc = u32::from(percent) & cache_flags::GC_PERCENT_MASK;
        let flags = (self.flags.get() & !mask) | (gc << cache_flags::GC_PERCENT_SHIFT);
        self.flags = U32::new(flags);
        self
    }
}

/// The default gc percent of a new cache.
pub const DM_GC_PERCENT_DEFAULT: u8 = CACHE_GC_PERCENT_DEFAULT as u8;

impl MetaRecord for DmCacheInfo {
    const RECORD: Record = Record::CacheInfo;
    const COPY_SIZE: usize = PAGE_SIZE;

    fn header(&self) -> &MetaHeader {
        &self.header
    }

    fn header_mut(&mut self) -> &mut MetaHeader {
        &mut self.header
    }

    fn check(&self) -> Result<(), Error> {
        const R: Record = Record::CacheInfo;
        let unknown = self.flags.get() & !cache_flags::KNOWN;
        if unknown != 0 {
            return Err(Error::unknown_flags(R, "flags", unknown.into()));
        }
        if self.mode() != Some(DmCacheMode::Writeback) {
            let mode = (self.flags.get() >> cache_flags::MODE_SHIFT) & cache_flags::MODE_MASK;
            return Err(Error::mismatch(R, "cache mode", mode.into(), 0));
        }
        if self.gc_percent() > u32::from(CACHE_GC_PERCENT_MAX) {
            return Err(Error::out_of_range(R, "gc_percent", self.gc_percent().into(), 0, CACHE_GC_PERCENT_MAX.into()));
        }
        if self.n_segs.get() == 0 || self.n_segs.get() > DM_SEG_NUM_MAX {
            return Err(Error::out_of_range(R, "n_segs", self.n_segs.get().into(), 1, DM_SEG_NUM_MAX.into()));
        }
        Ok(())
    }
}

/// A segment's info record in dm-pcache (16 bytes in a 4 KiB slot, copies
/// at segment offsets 0 and 4096).
///
/// ```text
///  0        8       12         16
///  +--------+-------+----------+
///  | header | flags | next_seg |
///  +--------+-------+----------+
///  flags: bit 0 HAS_NEXT, bits 1-4 the segment type (1: cache data)
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct DmSegmentInfo {
    /// CRC (over bytes [4, 16)) and sequence number.
    pub header: MetaHeader,
    /// HAS_NEXT and the type.
    pub flags: U32,
    /// Device segment of the next segment of the chain, when HAS_NEXT.
    pub next_seg: U32,
}

static_assertions::const_assert_eq!(core::mem::size_of::<DmSegmentInfo>(), 16);
static_assertions::const_assert_eq!(core::mem::offset_of!(DmSegmentInfo, next_seg), 12);

impl DmSegmentInfo {
    const HAS_NEXT: u32 = 1;
    const TYPE_SHIFT: u32 = 1;
    const TYPE_MASK: u32 = 0xf;

    /// A cache data segment's info, linked to `next` if given.
    pub fn data(next: Option<u32>) -> Self {
        let mut info = Self::new_zeroed();
        let mut flags = DM_SEGMENT_TYPE_CACHE_DATA << Self::TYPE_SHIFT;
        if let Some(next) = next {
            flags |= Self::HAS_NEXT;
            info.next_seg = U32::new(next);
        }
        info.flags = U32::new(flags);
        info
    }

    /// The segment type value.
    pub fn seg_type(&self) -> u32 {
        (self.flags.get() >> Self::TYPE_SHIFT) & Self::TYPE_MASK
    }

    /// The next segment of the chain, if any.
    pub fn next(&self) -> Option<u32> {
        (self.flags.get() & Self::HAS_NEXT != 0).then(|| self.next_seg.get())
    }
}

impl MetaRecord for DmSegmentInfo {
    const RECORD: Record = Record::SegmentInfo;
    const COPY_SIZE: usize = SEG_INFO_SIZE;

    fn header(&self) -> &MetaHeader {
        &self.header
    }

    fn header_mut(&mut self) -> &mut MetaHeader {
        &mut self.header
    }

    fn check(&self) -> Result<(), Error> {
        let unknown = self.flags.get() & !(Self::HAS_NEXT | (Self::TYPE_MASK << Self::TYPE_SHIFT));
        if unknown != 0 {
            return Err(Error::unknown_flags(Record::SegmentInfo, "flags", unknown.into()));
        }
        if self.seg_type() != DM_SEGMENT_TYPE_CACHE_DATA {
            let t = self.seg_type();
            return Err(Error::mismatch(Record::SegmentInfo, "type", t.into(), DM_SEGMENT_TYPE_CACHE_DATA.into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{Slots, decode_copy, encode_copy};

    #[test]
    fn golden_superblock() {
        // Spec §5 example 6.
        let area = DmSuperblock::encode_area(100);
        let golden = [
            0xee, 0x53, 0x76, 0x0e, 0, 0, 0, 0, 0xef, 0x96, 0xc5, 0x96, 0xfa, 0x5e, 0xb0, 0x65, 100, 0, 0, 0, 0, 0, 0,
            0,
        ];
        assert_eq!(area[..24], golden);
        assert!(area[24..].iter().all(|&b| b == 0));
        assert_eq!(DmSuperblock::decode(&area).unwrap().seg_num.get(), 100);
    }

    #[test]
    fn superblock_seen_on_a_kernel_cache() {
        // DM-PCACHE-RIG.md §4: a superblock the kernel wrote.
        let sb = [
            0xfc, 0x6f, 0x43, 0x40, 0, 0, 0, 0, 0xef, 0x96, 0xc5, 0x96, 0xfa, 0x5e, 0xb0, 0x65, 0x3e, 0, 0, 0, 0, 0, 0,
            0,
        ];
        assert_eq!(DmSuperblock::decode(&sb).unwrap().seg_num.get(), 62);
        // And its cache info copy 0: seq 2, seg_id 0, n_segs 62, flags 0x1183.
        let mut copy = [0u8; 4096];
        copy[..24].copy_from_slice(&[
            0x9b, 0xff, 0x10, 0xce, 2, 0, 0, 0, 0, 0, 0, 0, 0x3e, 0, 0, 0, 0x83, 0x11, 0, 0, 0, 0, 0, 0,
        ]);
        let ci: DmCacheInfo = decode_copy(Dialect::DmPcache, &copy).unwrap();
        assert_eq!((ci.n_segs.get(), ci.gc_percent(), ci.data_crc(), ci.init_done()), (62, 70, true, true));
        assert_eq!(ci.mode(), Some(DmCacheMode::Writeback));
        assert_eq!(DmCacheInfo::new(62, 70, true).flags.get(), 0x1183);
        // Bytes past the struct are not covered.
        copy[100] = 0xff;
        assert!(decode_copy::<DmCacheInfo>(Dialect::DmPcache, &copy).is_ok());
    }

    #[test]
    fn superblock_checks() {
        let mut be = DmSuperblock::new(10);
        be.flags = U32::new(1);
        be.seal();
        assert_eq!(DmSuperblock::decode(be.as_bytes()).unwrap_err().kind, ErrorKind::BigEndian);
        for n in [0, DM_SEG_NUM_MAX + 1] {
            let sb = DmSuperblock::new(n);
            assert!(matches!(DmSuperblock::decode(sb.as_bytes()).unwrap_err().kind, ErrorKind::OutOfRange { .. }));
        }
        assert!(DmSuperblock::decode(&[0u8; 23]).is_err());
        assert!(matches!(DmSuperblock::decode(&[0u8; 24]).unwrap_err().kind, ErrorKind::BadMagic { .. }));
    }

    #[test]
    fn segment_info_round_trip() {
        let slots = Slots::of::<DmSegmentInfo>(Dialect::DmPcache);
        assert_eq!(slots.covered, 16);
        let mut copy = [0u8; 4096];
        encode_copy(Dialect::DmPcache, &DmSegmentInfo::data(Some(7)), 1, &mut copy).unwrap();
        let back: DmSegmentInfo = decode_copy(Dialect::DmPcache, &copy).unwrap();
        assert_eq!((back.flags.get(), back.next()), (0x3, Some(7)));
        assert_eq!(DmSegmentInfo::data(None).flags.get(), 0x2);
        let mut wrong = DmSegmentInfo::data(None);
        wrong.flags = U32::new(0x4);
        assert!(wrong.check().is_err());
    }

    #[test]
    fn cache_info_checks() {
        assert!(DmCacheInfo::new(10, 70, false).check().is_ok());
        assert!(DmCacheInfo::new(10, 91, false).check().is_err());
        assert!(DmCacheInfo::new(0, 70, false).check().is_err());
        let mut wt = DmCacheInfo::new(10, 70, false);
        wt.flags = U32::new(wt.flags.get() | (1 << cache_flags::MODE_SHIFT));
        assert!(wt.check().is_err());
        assert_eq!(DmCacheInfo::new(10, 70, false).with_gc_percent(20).gc_percent(), 20);
        // A value past the field's 7 bits touches no other flag.
        let wide = DmCacheInfo::new(10, 70, true).with_gc_percent(200);
        assert_eq!(wide.flags.get() & !(cache_flags::GC_PERCENT_MASK << cache_flags::GC_PERCENT_SHIFT), 0x3);
        assert_eq!(DmCacheInfo::new(10, 255, false).flags.get() >> 13, 0);
    }
}
