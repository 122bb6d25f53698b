//! Backing-table entries (spec §2.6.4).

use bitflags::bitflags;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::consts::{BACKING_DEV_INFO_SIZE, CACHE_GC_PERCENT_MAX, CACHE_SEGS_MAX, PATH_LEN};
use crate::error::{Error, Record};
use crate::meta::{MetaHeader, MetaRecord};

bitflags! {
    /// `cache_info.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CacheFlags: u16 {
        /// Every key carries the CRC of its data.
        const DATA_CRC = 1 << 0;
    }
}

/// `backing_dev_info.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BackingState {
    /// The entry is free.
    None = 0,
    /// A cache for this backing device exists.
    Running = 1,
}

impl BackingState {
    /// The state stored as `v`, if it is one.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Running),
            _ => None,
        }
    }
}

/// The cache of one backing device, embedded in its table entry.
///
/// ```text
///  0        4        8            10      12     16
///  +--------+--------+------------+-------+------+
///  | seg_id | n_segs | gc_percent | flags | res2 |
///  | le32   | le32   | le16       | le16  | le32 |
///  +--------+--------+------------+-------+------+
///  seg_id: device number of the chain's first segment (cache segment 0).
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct CacheInfo {
    /// Device number of the first segment of the chain.
    pub seg_id: U32,
    /// Number of segments in the chain.
    pub n_segs: U32,
    /// GC watermark in percent, 0..=90.
    pub gc_percent: U16,
    /// [`CacheFlags`].
    pub flags: U16,
    /// Reserved, 0.
    pub res2: U32,
}

static_assertions::const_assert_eq!(core::mem::size_of::<CacheInfo>(), 16);
static_assertions::const_assert_eq!(core::mem::offset_of!(CacheInfo, n_segs), 4);
static_assertions::const_assert_eq!(core::mem::offset_of!(CacheInfo, gc_percent), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(CacheInfo, flags), 10);

impl CacheInfo {
    /// A cache of `n_segs` segments starting at device segment `seg_id`.
    pub fn new(seg_id: u32, n_segs: u32, gc_percent: u16, flags: CacheFlags) -> Self {
        Self {
            seg_id: U32::new(seg_id),
            n_segs: U32::new(n_segs),
            gc_percent: U16::new(gc_percent),
            flags: U16::new(flags.bits()),
            res2: U32::new(0),
        }
    }

    /// The flags, unknown bits dropped.
    pub fn flags(&self) -> CacheFlags {
        CacheFlags::from_bits_truncate(self.flags.get())
    }

    /// Whether keys carry data CRCs.
    pub fn data_crc(&self) -> bool {
        self.flags().contains(CacheFlags::DATA_CRC)
    }
}

/// One backing-table entry: two 4 KiB copies per entry, entry *i* at offset
/// `8192 + i * 8192` of segment 0.
///
/// ```text
///  0        8       9     10     12               16         24          280          296
///  +--------+-------+-----+------+----------------+----------+-----------+------------+
///  | header | state | res | res1 | backing_dev_id | dev_size | path[256] | cache_info |
///  | 8 B    | u8    | u8  | le16 | le32           | le64     | NUL-term. | 16 B       |
///  +--------+-------+-----+------+----------------+----------+-----------+------------+
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BackingDevInfo {
    /// Header, CRC over the 4 KiB copy.
    pub header: MetaHeader,
    /// [`BackingState`].
    pub state: u8,
    /// Reserved, 0.
    pub res: u8,
    /// Reserved, 0.
    pub res1: U16,
    /// The entry's index in the table.
    pub backing_dev_id: U32,
    /// Size of the backing device in 512-byte sectors (the RFC leaves it 0).
    pub dev_size: U64,
    /// Path of the backing device, NUL-terminated; the key entries are found by.
    pub path: [u8; PATH_LEN],
    /// The cache.
    pub cache_info: CacheInfo,
}

static_assertions::const_assert_eq!(core::mem::size_of::<BackingDevInfo>(), 296);
static_assertions::const_assert_eq!(core::mem::offset_of!(BackingDevInfo, state), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(BackingDevInfo, backing_dev_id), 12);
static_assertions::const_assert_eq!(core::mem::offset_of!(BackingDevInfo, dev_size), 16);
static_assertions::const_assert_eq!(core::mem::offset_of!(BackingDevInfo, path), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(BackingDevInfo, cache_info), 280);

impl BackingDevInfo {
    /// A running entry `id` for the backing device at `path` (bytes, no NUL)
    /// of `dev_sectors` 512-byte sectors.
    ///
    /// Fails if the path is empty, holds a NUL, or does not fit in 255 bytes.
    pub fn running(id: u32, path: &[u8], dev_sectors: u64, cache_info: CacheInfo) -> Result<Self, Error> {
        const R: Record = Record::BackingDevInfo;
        if path.is_empty() || path.len() >= PATH_LEN {
            return Err(Error::out_of_range(R, "path length", path.len() as u64, 1, PATH_LEN as u64 - 1));
        }
        if let Some(at) = path.iter().position(|&b| b == 0) {
            return Err(Error::invalid(R, "path byte (NUL) at", at as u64));
        }
        let mut info = Self::new_zeroed();
        info.state = BackingState::Running as u8;
        info.backing_dev_id = U32::new(id);
        info.dev_size = U64::new(dev_sectors);
        info.path[..path.len()].copy_from_slice(path);
        info.cache_info = cache_info;
        Ok(info)
    }

    /// A free entry `id`.
    pub fn free(id: u32) -> Self {
        let mut info = Self::new_zeroed();
        info.backing_dev_id = U32::new(id);
        info
    }

    /// The state, if known.
    pub fn state(&self) -> Option<BackingState> {
        BackingState::from_u8(self.state)
    }

    /// The path bytes up to the first NUL (all 256 if there is none).
    pub fn path(&self) -> &[u8] {
        let end = self.path.iter().position(|&b| b == 0).unwrap_or(PATH_LEN);
        &self.path[..end]
    }

    /// Whether the entry is in use.
    pub fn is_running(&self) -> bool {
        self.state() == Some(BackingState::Running)
    }
}

impl MetaRecord for BackingDevInfo {
    const RECORD: Record = Record::BackingDevInfo;
    const COPY_SIZE: usize = BACKING_DEV_INFO_SIZE;

    fn header(&self) -> &MetaHeader {
        &self.header
    }

    fn header_mut(&mut self) -> &mut MetaHeader {
        &mut self.header
    }

    /// A known state; for a running entry also a NUL-terminated, non-empty
    /// path, known cache flags, `gc_percent` ≤ 90 and 1 ≤ `n_segs` ≤ 2²⁰.
    fn check(&self) -> Result<(), Error> {
        const R: Record = Record::BackingDevInfo;
        match self.state() {
            None => Err(Error::invalid(R, "state", self.state.into())),
            Some(BackingState::None) => Ok(()),
            Some(BackingState::Running) => {
                let len = self.path().len();
                if len == 0 || len == PATH_LEN {
                    return Err(Error::out_of_range(R, "path length", len as u64, 1, PATH_LEN as u64 - 1));
                }
                let ci = &self.cache_info;
                let unknown = ci.flags.get() & !CacheFlags::all().bits();
                if unknown != 0 {
                    return Err(Error::unknown_flags(R, "cache flags", unknown.into()));
                }
                let gc = ci.gc_percent.get();
                if gc > CACHE_GC_PERCENT_MAX {
                    return Err(Error::out_of_range(R, "gc_percent", gc.into(), 0, CACHE_GC_PERCENT_MAX.into()));
                }
                let n = ci.n_segs.get();
                if n == 0 || n > CACHE_SEGS_MAX {
                    return Err(Error::out_of_range(R, "n_segs", n.into(), 1, CACHE_SEGS_MAX.into()));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dialect;
    use crate::error::ErrorKind;
    use crate::meta::{decode_copy, encode_copy};

    #[test]
    fn running_entry_round_trip() {
        let ci = CacheInfo::new(1, 32, 70, CacheFlags::DATA_CRC);
        let info = BackingDevInfo::running(3, b"/dev/sdb", 2048, ci).unwrap();
        let mut copy = [0u8; BACKING_DEV_INFO_SIZE];
        encode_copy(Dialect::RfcV1, &info, 1, &mut copy).unwrap();
        let back: BackingDevInfo = decode_copy(Dialect::RfcV1, &copy).unwrap();
        assert_eq!(back.path(), b"/dev/sdb");
        assert!(back.is_running());
        assert!(back.cache_info.data_crc());
        assert_eq!(back.cache_info.n_segs.get(), 32);
        assert_eq!(&copy[24..32], b"/dev/sdb");
        assert_eq!(&copy[280..284], &1u32.to_le_bytes());
    }

    #[test]
    fn bad_paths_are_refused() {
        let ci = CacheInfo::new(1, 1, 70, CacheFlags::empty());
        assert!(BackingDevInfo::running(0, b"", 0, ci).is_err());
        assert!(BackingDevInfo::running(0, &[b'a'; 256], 0, ci).is_err());
        assert!(BackingDevInfo::running(0, &[b'a'; 255], 0, ci).is_ok());
        assert!(BackingDevInfo::running(0, b"a\0b", 0, ci).is_err());
    }

    #[test]
    fn semantic_checks() {
        let ci = CacheInfo::new(1, 32, 70, CacheFlags::empty());
        let good = BackingDevInfo::running(0, b"/x", 0, ci).unwrap();
        assert!(good.check().is_ok());
        let mut gc = good;
        gc.cache_info.gc_percent = U16::new(91);
        assert!(matches!(gc.check().unwrap_err().kind, ErrorKind::OutOfRange { field: "gc_percent", .. }));
        let mut n = good;
        n.cache_info.n_segs = U32::new(0);
        assert!(matches!(n.check().unwrap_err().kind, ErrorKind::OutOfRange { field: "n_segs", .. }));
        let mut path = good;
        path.path = [b'x'; PATH_LEN];
        assert!(path.check().is_err());
        let mut flags = good;
        flags.cache_info.flags = U16::new(4);
        assert!(flags.check().is_err());
        let mut state = good;
        state.state = 2;
        assert!(state.check().is_err());
        // A free entry is valid whatever it holds.
        let mut free = BackingDevInfo::free(4);
        free.cache_info.n_segs = U32::new(0);
        assert!(free.check().is_ok());
    }
}
