//! Segment infos (spec §2.6.2, §2.6.3).

use bitflags::bitflags;
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::consts::{BACKING_DEV_INFO_SIZE, CACHE_SEG_DATA_OFF, META_ENTRIES, META_SEG_DATA_OFF, SEG_INFO_SIZE};
use crate::error::{Error, Record};
use crate::meta::{MetaHeader, MetaRecord};

/// `segment_info.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SegmentType {
    /// Not a segment in use.
    None = 0,
    /// Segment 0: the backing-device table.
    Meta = 1,
    /// A cache segment.
    Data = 2,
}

impl SegmentType {
    /// The type stored as `v`, if it is one.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Meta),
            2 => Some(Self::Data),
            _ => None,
        }
    }
}

/// `segment_info.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SegmentState {
    /// Not in use.
    None = 0,
    /// In use.
    Running = 1,
}

impl SegmentState {
    /// The state stored as `v`, if it is one.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Running),
            _ => None,
        }
    }
}

bitflags! {
    /// `segment_info.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SegmentInfoFlags: u16 {
        /// `next_seg` names the next segment of the chain.
        const HAS_NEXT = 1 << 0;
    }
}

/// Segment info, at offsets 0 and 4096 of every segment in use (two copies,
/// CRC over each whole 4 KiB copy).
///
/// ```text
///  0        8      9       10      12         16       20         24
///  +--------+------+-------+-------+----------+--------+----------+
///  | header | type | state | flags | next_seg | seg_id | data_off |
///  | 8 B    | u8   | u8    | le16  | le32     | le32   | le32     |
///  +--------+------+-------+-------+----------+--------+----------+
///  next_seg and seg_id are device segment numbers.
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct SegmentInfo {
    /// Header, CRC over the 4 KiB copy.
    pub header: MetaHeader,
    /// [`SegmentType`].
    pub seg_type: u8,
    /// [`SegmentState`].
    pub state: u8,
    /// [`SegmentInfoFlags`].
    pub flags: U16,
    /// Device number of the next segment of the chain, if `HAS_NEXT`.
    pub next_seg: U32,
    /// Device number of this segment.
    pub seg_id: U32,
    /// Offset of the segment's data area: 8192 (meta) or 12288 (cache).
    pub data_off: U32,
}

static_assertions::const_assert_eq!(core::mem::size_of::<SegmentInfo>(), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(SegmentInfo, seg_type), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(SegmentInfo, state), 9);
static_assertions::const_assert_eq!(core::mem::offset_of!(SegmentInfo, flags), 10);
static_assertions::const_assert_eq!(core::mem::offset_of!(SegmentInfo, next_seg), 12);
static_assertions::const_assert_eq!(core::mem::offset_of!(SegmentInfo, seg_id), 16);
static_assertions::const_assert_eq!(core::mem::offset_of!(SegmentInfo, data_off), 20);

impl SegmentInfo {
    /// The info of cache segment `seg_id` (device number), running, linked to
    /// `next` if given.
    pub fn data(seg_id: u32, next: Option<u32>) -> Self {
        let mut info = Self::new_zeroed();
        info.seg_type = SegmentType::Data as u8;
        info.state = SegmentState::Running as u8;
        info.seg_id = U32::new(seg_id);
        info.data_off = U32::new(CACHE_SEG_DATA_OFF as u32);
        if let Some(next) = next {
            info.flags = U16::new(SegmentInfoFlags::HAS_NEXT.bits());
            info.next_seg = U32::new(next);
        }
        info
    }

    /// The type, if known.
    pub fn seg_type(&self) -> Option<SegmentType> {
        SegmentType::from_u8(self.seg_type)
    }

    /// The state, if known.
    pub fn state(&self) -> Option<SegmentState> {
        SegmentState::from_u8(self.state)
    }

    /// The next segment of the chain (device number), if any.
    pub fn next(&self) -> Option<u32> {
        let flags = SegmentInfoFlags::from_bits_truncate(self.flags.get());
        flags.contains(SegmentInfoFlags::HAS_NEXT).then(|| self.next_seg.get())
    }

    fn check_as(&self, record: Record) -> Result<(), Error> {
        let t = self.seg_type().filter(|t| *t != SegmentType::None);
        let Some(t) = t else {
            return Err(Error::invalid(record, "type", self.seg_type.into()));
        };
        if self.state().is_none() {
            return Err(Error::invalid(record, "state", self.state.into()));
        }
        let unknown = self.flags.get() & !SegmentInfoFlags::all().bits();
        if unknown != 0 {
            return Err(Error::unknown_flags(record, "flags", unknown.into()));
        }
        let expected_off = match t {
            SegmentType::Meta => META_SEG_DATA_OFF,
            _ => CACHE_SEG_DATA_OFF,
        };
        if u64::from(self.data_off.get()) != expected_off {
            return Err(Error::mismatch(record, "data_off", self.data_off.get().into(), expected_off));
        }
        Ok(())
    }
}

impl MetaRecord for SegmentInfo {
    const RECORD: Record = Record::SegmentInfo;
    const COPY_SIZE: usize = SEG_INFO_SIZE;

    fn header(&self) -> &MetaHeader {
        &self.header
    }

    fn header_mut(&mut self) -> &mut MetaHeader {
        &mut self.header
    }

    /// Type META or DATA, state NONE or RUNNING, known flags, and the data
    /// offset of its type.
    fn check(&self) -> Result<(), Error> {
        self.check_as(Record::SegmentInfo)
    }
}

/// Segment info of the meta segment (segment 0), extended with the backing
/// table's geometry.
///
/// ```text
///  0                    24          28         32
///  +--------------------+-----------+----------+
///  | SegmentInfo        | meta_size | meta_num |
///  | type 1, seg_id 0,  | le32 4096 | le32 2047|
///  | data_off 8192      |           |          |
///  +--------------------+-----------+----------+
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct MetaSegmentInfo {
    /// The segment info proper.
    pub info: SegmentInfo,
    /// Size of one backing-table entry copy: 4096.
    pub meta_size: U32,
    /// Number of backing-table entries: 2047.
    pub meta_num: U32,
}

static_assertions::const_assert_eq!(core::mem::size_of::<MetaSegmentInfo>(), 32);
static_assertions::const_assert_eq!(core::mem::offset_of!(MetaSegmentInfo, meta_size), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(MetaSegmentInfo, meta_num), 28);

impl Default for MetaSegmentInfo {
    /// The meta segment info the RFC writes at every registration.
    fn default() -> Self {
        let mut m = Self::new_zeroed();
        m.info.seg_type = SegmentType::Meta as u8;
        m.info.state = SegmentState::Running as u8;
        m.info.data_off = U32::new(META_SEG_DATA_OFF as u32);
        m.meta_size = U32::new(BACKING_DEV_INFO_SIZE as u32);
        m.meta_num = U32::new(META_ENTRIES);
        m
    }
}

impl MetaRecord for MetaSegmentInfo {
    const RECORD: Record = Record::MetaSegmentInfo;
    const COPY_SIZE: usize = SEG_INFO_SIZE;

    fn header(&self) -> &MetaHeader {
        &self.info.header
    }

    fn header_mut(&mut self) -> &mut MetaHeader {
        &mut self.info.header
    }

    /// Everything the RFC writes: type META, seg_id 0, no next meta
    /// segment, data offset 8192, 2047 entries of 4096 bytes.
    fn check(&self) -> Result<(), Error> {
        const R: Record = Record::MetaSegmentInfo;
        self.info.check_as(R)?;
        if self.info.seg_type() != Some(SegmentType::Meta) {
            return Err(Error::mismatch(R, "type", self.info.seg_type.into(), SegmentType::Meta as u64));
        }
        if self.info.seg_id.get() != 0 {
            return Err(Error::mismatch(R, "seg_id", self.info.seg_id.get().into(), 0));
        }
        if self.info.next().is_some() {
            return Err(Error::unknown_flags(R, "flags (a second meta segment)", self.info.flags.get().into()));
        }
        if self.meta_size.get() as usize != BACKING_DEV_INFO_SIZE {
            return Err(Error::mismatch(R, "meta_size", self.meta_size.get().into(), BACKING_DEV_INFO_SIZE as u64));
        }
        if self.meta_num.get() != META_ENTRIES {
            return Err(Error::mismatch(R, "meta_num", self.meta_num.get().into(), META_ENTRIES.into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dialect;
    use crate::error::ErrorKind;
    use crate::meta::{decode_copy, encode_copy, read_latest};

    #[test]
    fn data_info_round_trip() {
        let info = SegmentInfo::data(7, Some(9));
        let mut copy = [0u8; SEG_INFO_SIZE];
        encode_copy(Dialect::RfcV1, &info, 3, &mut copy).unwrap();
        let back: SegmentInfo = decode_copy(Dialect::RfcV1, &copy).unwrap();
        assert_eq!(back.header.seq, 3);
        assert_eq!(back.next(), Some(9));
        assert_eq!(back.seg_id.get(), 7);
        assert_eq!(back.seg_type(), Some(SegmentType::Data));
        let last = SegmentInfo::data(9, None);
        assert_eq!(last.next(), None);
    }

    #[test]
    fn semantic_checks() {
        let zero = SegmentInfo::new_zeroed();
        assert_eq!(zero.check().unwrap_err().kind, ErrorKind::Invalid { field: "type", found: 0 });
        let mut bad_state = SegmentInfo::data(1, None);
        bad_state.state = 9;
        assert!(bad_state.check().is_err());
        let mut bad_flags = SegmentInfo::data(1, None);
        bad_flags.flags = U16::new(0x10);
        assert!(matches!(bad_flags.check().unwrap_err().kind, ErrorKind::UnknownFlags { bits: 0x10, .. }));
        let mut bad_off = SegmentInfo::data(1, None);
        bad_off.data_off = U32::new(8192);
        assert!(matches!(bad_off.check().unwrap_err().kind, ErrorKind::Mismatch { field: "data_off", .. }));
    }

    #[test]
    fn meta_info_of_a_zeroed_segment_was_never_written() {
        // A zeroed slot pair passes the CRC (seed 0) but was never written.
        let err = read_latest::<MetaSegmentInfo>(Dialect::RfcV1, &[0u8; 2 * SEG_INFO_SIZE]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NeverWritten);
        assert_eq!(err.record, Record::MetaSegmentInfo);
        let mut pair = [0u8; 2 * SEG_INFO_SIZE];
        encode_copy(Dialect::RfcV1, &MetaSegmentInfo::default(), 1, &mut pair[..SEG_INFO_SIZE]).unwrap();
        let latest = read_latest::<MetaSegmentInfo>(Dialect::RfcV1, &pair).unwrap();
        assert_eq!((latest.copy, latest.record.meta_num.get()), (0, 2047));
    }
}
