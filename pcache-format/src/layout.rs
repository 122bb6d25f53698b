//! Where everything lives on a device (spec §2.2, §3.4).
//!
//! RFC v1 ([`Dialect::RfcV1`]):
//!
//! ```text
//! 0x0000  unused 4 KiB (never touched)
//! 0x1000  superblock area, 4 KiB
//! 0x2000  reserved 8 KiB
//! 0x4000  segment 0: the backing table         segment i at 0x4000 + i * 16 MiB
//!         segment 1 ... segment seg_num - 1
//!
//! meta segment (0)                    cache segment
//! +0x0000 segment info copy 0         +0x0000 segment info copy 0
//! +0x1000 segment info copy 1         +0x1000 segment info copy 1
//! +0x2000 entry 0 copy 0              +0x2000 control page (gens; tails in cache segment 0)
//! +0x3000 entry 0 copy 1              +0x3000 data area, 16 764 928 bytes
//! +0x4000 entry 1 copy 0 ... (2047 entries)
//! ```
//!
//! dm-pcache ([`Dialect::DmPcache`]): the superblock at 0x1000, cache info
//! at 0x2000/0x3000, tails at 0x4000, segment 0 at 0x5000; every segment is
//! a cache segment with the layout above (see [`crate::dm`]).

use crate::consts::{
    CACHE_DEV_SIZE_MIN, CACHE_SEG_CTRL_OFF, CACHE_SEG_DATA_OFF, CACHE_SEG_DATA_SIZE, DIRTY_TAIL_OFF, KEY_TAIL_OFF,
    META_ENTRIES, META_ENTRY_STRIDE, META_SEG_DATA_OFF, SEG_SIZE,
};
use crate::dialect::Dialect;
use crate::dm::{DM_CACHE_INFO_OFF, DM_CTRL_OFF, DM_DIRTY_TAIL_OFF, DM_KEY_TAIL_OFF};
use crate::error::{Error, ErrorKind, Record};

/// The geometry of a formatted device: how many segments it has and where
/// each record lives. Every offset it returns is inside the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    dialect: Dialect,
    seg_num: u32,
    device_size: u64,
}

/// What formatting a device of a given size yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatPlan {
    /// The layout to write.
    pub layout: Layout,
    /// Segments the device could hold without the 16-bit cap.
    pub segments_possible: u64,
}

impl FormatPlan {
    /// The device holds more segments than `seg_num` can count; the rest of
    /// it is left unused.
    pub fn capped(&self) -> bool {
        self.segments_possible > u64::from(self.layout.seg_num)
    }

    /// Bytes of the device that the format leaves unused.
    pub fn unused_bytes(&self) -> u64 {
        self.layout.device_size - self.layout.segments_end()
    }
}

impl Layout {
    /// Plans the RFC v1 format of a device of `device_size` bytes: `seg_num`
    /// is `(size - 16 KiB) / 16 MiB`, capped at 65 535 (the cap is reported,
    /// never wrapped). Devices under 512 MiB are refused.
    ///
    /// ```
    /// use pcache_format::{Dialect, Layout};
    /// let plan = Layout::plan(Dialect::RfcV1, 1 << 30).unwrap();
    /// assert_eq!(plan.layout.seg_num(), 63);
    /// assert!(!plan.capped());
    /// assert!(Layout::plan(Dialect::RfcV1, 511 << 20).is_err());
    /// let huge = Layout::plan(Dialect::RfcV1, 2 << 40).unwrap();
    /// assert_eq!(huge.layout.seg_num(), 65_535);
    /// assert!(huge.capped());
    /// // dm-pcache: segments from 20 KiB, up to 1 048 576 of them.
    /// let dm = Layout::plan(Dialect::DmPcache, 1 << 30).unwrap();
    /// assert_eq!(dm.layout.seg_num(), 63);
    /// assert_eq!(Layout::plan(Dialect::DmPcache, 2 << 40).unwrap().layout.seg_num(), 131_071);
    /// ```
    pub fn plan(dialect: Dialect, device_size: u64) -> Result<FormatPlan, Error> {
        if device_size < CACHE_DEV_SIZE_MIN {
            return Err(Error::out_of_range(Record::Device, "size", device_size, CACHE_DEV_SIZE_MIN, u64::MAX));
        }
        let segments_possible = (device_size - dialect.segments_off()) / SEG_SIZE;
        let seg_num = segments_possible.min(dialect.seg_num_max().into()) as u32;
        Ok(FormatPlan { layout: Layout { dialect, seg_num, device_size }, segments_possible })
    }

    /// The layout of a device of `device_size` bytes whose superblock says
    /// `seg_num`: refused if `seg_num` is 0, over the dialect's bound, or
    /// its segments do not fit; in dm-pcache also under 512 MiB, which the
    /// kernel refuses to load.
    pub fn new(dialect: Dialect, seg_num: u32, device_size: u64) -> Result<Self, Error> {
        let layout = Layout { dialect, seg_num, device_size };
        if dialect == Dialect::DmPcache && device_size < CACHE_DEV_SIZE_MIN {
            return Err(Error::out_of_range(Record::Device, "size", device_size, CACHE_DEV_SIZE_MIN, u64::MAX));
        }
        let fits = device_size.saturating_sub(dialect.segments_off()) / SEG_SIZE;
        let max = fits.min(dialect.seg_num_max().into());
        if seg_num == 0 || u64::from(seg_num) > max {
            return Err(Error::out_of_range(Record::Superblock, "seg_num", seg_num.into(), 1, max.max(1)));
        }
        Ok(layout)
    }

    /// The dialect the device speaks.
    pub const fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The first device segment a cache may use: 1 in the RFC (segment 0
    /// holds the backing table), 0 in dm-pcache.
    pub const fn first_cache_seg(&self) -> u32 {
        if self.dialect.has_backing_table() { 1 } else { 0 }
    }

    /// Number of segments, segment 0 included.
    pub const fn seg_num(&self) -> u32 {
        self.seg_num
    }

    /// Size of the device.
    pub const fn device_size(&self) -> u64 {
        self.device_size
    }

    /// End of the last segment.
    pub const fn segments_end(&self) -> u64 {
        self.dialect.segments_off() + self.seg_num as u64 * SEG_SIZE
    }

    fn segment_error(&self, seg: u32) -> Error {
        Error::out_of_range(Record::SegmentInfo, "segment", seg.into(), 0, u64::from(self.seg_num).saturating_sub(1))
    }

    /// Device offset of segment `seg`.
    pub fn segment_offset(&self, seg: u32) -> Result<u64, Error> {
        if seg >= self.seg_num {
            return Err(self.segment_error(seg));
        }
        Ok(self.dialect.segments_off() + u64::from(seg) * SEG_SIZE)
    }

    /// Device offset of the two segment-info copies of segment `seg`
    /// (copy 1 follows at +4096).
    pub fn seg_info_offset(&self, seg: u32) -> Result<u64, Error> {
        self.segment_offset(seg)
    }

    /// Device offset of the control page of cache segment `seg`.
    pub fn ctrl_offset(&self, seg: u32) -> Result<u64, Error> {
        Ok(self.segment_offset(seg)? + CACHE_SEG_CTRL_OFF)
    }

    /// Device offset of the data area of cache segment `seg`.
    pub fn data_offset(&self, seg: u32) -> Result<u64, Error> {
        Ok(self.segment_offset(seg)? + CACHE_SEG_DATA_OFF)
    }

    /// Device offset of `off` inside the data area of cache segment `seg`,
    /// checking that `[off, off + len)` stays inside that data area.
    pub fn data_range(&self, seg: u32, off: u32, len: u32) -> Result<u64, Error> {
        let end = u64::from(off) + u64::from(len);
        if end > u64::from(CACHE_SEG_DATA_SIZE) {
            let kind = ErrorKind::OutOfRange {
                field: "data area offset",
                found: u64::from(off),
                min: 0,
                max: u64::from(CACHE_SEG_DATA_SIZE).saturating_sub(len.into()),
            };
            return Err(Error::new(Record::Device, kind));
        }
        Ok(self.data_offset(seg)? + u64::from(off))
    }

    /// Device offset of the two copies of backing-table entry `id` (copy 1
    /// follows at +4096).
    pub fn meta_entry_offset(&self, id: u32) -> Result<u64, Error> {
        if !self.dialect.has_backing_table() {
            return Err(Error::invalid(Record::BackingDevInfo, "table (a dm-pcache device has none)", id.into()));
        }
        if id >= META_ENTRIES {
            return Err(Error::out_of_range(Record::BackingDevInfo, "id", id.into(), 0, (META_ENTRIES - 1).into()));
        }
        Ok(self.dialect.segments_off() + META_SEG_DATA_OFF + u64::from(id) * META_ENTRY_STRIDE)
    }
}

impl Layout {
    /// Device offset of dm-pcache's two cache-info copies (copy 1 at
    /// +4096). An RFC device keeps its caches' infos in the backing table.
    pub fn cache_info_offset(&self) -> Result<u64, Error> {
        match self.dialect {
            Dialect::DmPcache => Ok(DM_CACHE_INFO_OFF),
            Dialect::RfcV1 => {
                Err(Error::invalid(Record::CacheInfo, "record (RFC caches keep it in the backing table)", 0))
            }
        }
    }

    /// Device offsets of the key-tail and dirty-tail copy pairs of the cache
    /// whose first segment is `first_seg`: in that segment's control page
    /// (RFC), or at 0x4000 (dm-pcache, one cache per device).
    pub fn tail_offsets(&self, first_seg: u32) -> Result<(u64, u64), Error> {
        match self.dialect {
            Dialect::RfcV1 => {
                let ctrl = self.ctrl_offset(first_seg)?;
                Ok((ctrl + KEY_TAIL_OFF as u64, ctrl + DIRTY_TAIL_OFF as u64))
            }
            Dialect::DmPcache => Ok((DM_CTRL_OFF + DM_KEY_TAIL_OFF, DM_CTRL_OFF + DM_DIRTY_TAIL_OFF)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::SEGMENTS_OFF;

    #[test]
    fn plan_sizes() {
        assert!(Layout::plan(Dialect::RfcV1, CACHE_DEV_SIZE_MIN - 1).is_err());
        let min = Layout::plan(Dialect::RfcV1, CACHE_DEV_SIZE_MIN).unwrap();
        assert_eq!(min.layout.seg_num(), 31);
        assert_eq!(min.unused_bytes(), CACHE_DEV_SIZE_MIN - SEGMENTS_OFF - 31 * SEG_SIZE);
        let exact = SEGMENTS_OFF + 65_535 * SEG_SIZE;
        assert!(!Layout::plan(Dialect::RfcV1, exact).unwrap().capped());
        let one_more = exact + SEG_SIZE;
        let p = Layout::plan(Dialect::RfcV1, one_more).unwrap();
        assert!(p.capped());
        assert_eq!(p.segments_possible, 65_536);
        assert_eq!(p.layout.seg_num(), 65_535);
        assert_eq!(p.unused_bytes(), SEG_SIZE);
    }

    #[test]
    fn offsets() {
        let l = Layout::new(Dialect::RfcV1, 63, 1 << 30).unwrap();
        assert_eq!(l.segment_offset(0).unwrap(), 0x4000);
        assert_eq!(l.segment_offset(1).unwrap(), 0x4000 + SEG_SIZE);
        assert!(l.segment_offset(63).is_err());
        assert_eq!(l.ctrl_offset(1).unwrap(), 0x4000 + SEG_SIZE + 0x2000);
        assert_eq!(l.data_offset(1).unwrap(), 0x4000 + SEG_SIZE + 0x3000);
        assert_eq!(l.meta_entry_offset(0).unwrap(), 0x6000);
        assert_eq!(l.meta_entry_offset(1).unwrap(), 0x8000);
        assert_eq!(l.meta_entry_offset(2046).unwrap(), 0x4000 + 0x2000 + 2046 * 0x2000);
        assert!(l.meta_entry_offset(2047).is_err());
        // The last entry ends exactly at the end of segment 0.
        assert_eq!(l.meta_entry_offset(2046).unwrap() + 0x2000, 0x4000 + SEG_SIZE);
        assert!(l.data_range(1, CACHE_SEG_DATA_SIZE - 512, 512).is_ok());
        assert!(l.data_range(1, CACHE_SEG_DATA_SIZE - 511, 512).is_err());
        assert!(l.data_range(1, u32::MAX, u32::MAX).is_err());
    }

    #[test]
    fn dm_pcache_offsets() {
        let l = Layout::new(Dialect::DmPcache, 62, 1_054_867_456).unwrap();
        assert_eq!(l.segment_offset(0).unwrap(), 0x5000);
        assert_eq!(l.data_offset(1).unwrap(), 0x5000 + SEG_SIZE + 0x3000);
        assert_eq!(l.cache_info_offset().unwrap(), 0x2000);
        assert_eq!(l.tail_offsets(0).unwrap(), (0x4000, 0x4020));
        assert_eq!(l.first_cache_seg(), 0);
        assert!(l.meta_entry_offset(0).is_err());
        assert!(Layout::new(Dialect::DmPcache, 63, 1_054_867_456).is_err());
        assert!(Layout::new(Dialect::DmPcache, 1 << 21, u64::MAX).is_err());
        // The kernel refuses a device under 512 MiB, whatever its superblock says.
        assert!(Layout::new(Dialect::DmPcache, 2, 511 << 20).is_err());
        assert!(Layout::new(Dialect::RfcV1, 2, 511 << 20).is_ok());
        let rfc = Layout::new(Dialect::RfcV1, 63, 1 << 30).unwrap();
        assert_eq!(
            rfc.tail_offsets(1).unwrap(),
            (0x4000 + SEG_SIZE + 0x2000 + 0x220, 0x4000 + SEG_SIZE + 0x2000 + 0x240)
        );
        assert!(rfc.cache_info_offset().is_err());
    }

    #[test]
    fn superblock_seg_num_must_fit() {
        assert!(Layout::new(Dialect::RfcV1, 0, 1 << 30).is_err());
        assert!(Layout::new(Dialect::RfcV1, 63, 1 << 30).is_ok());
        assert!(Layout::new(Dialect::RfcV1, 64, 1 << 30).is_err());
        assert!(Layout::new(Dialect::RfcV1, 1, 0).is_err());
    }
}
