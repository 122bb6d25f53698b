//! Where everything lives on a device (spec §2.2).
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

use crate::consts::{
    CACHE_DEV_SIZE_MIN, CACHE_SEG_CTRL_OFF, CACHE_SEG_DATA_OFF, CACHE_SEG_DATA_SIZE, META_ENTRIES, META_ENTRY_STRIDE,
    META_SEG_DATA_OFF, SEG_NUM_MAX, SEG_SIZE, SEGMENTS_OFF,
};
use crate::error::{Error, ErrorKind, Record};

/// The geometry of a formatted device: how many segments it has and where
/// each record lives. Every offset it returns is inside the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    seg_num: u16,
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
    /// Plans the format of a device of `device_size` bytes: `seg_num` is
    /// `(size - 16 KiB) / 16 MiB`, capped at 65 535 (the cap is reported,
    /// never wrapped). Devices under 512 MiB are refused.
    ///
    /// ```
    /// use pcache_format::Layout;
    /// let plan = Layout::plan(1 << 30).unwrap();
    /// assert_eq!(plan.layout.seg_num(), 63);
    /// assert!(!plan.capped());
    /// assert!(Layout::plan(511 << 20).is_err());
    /// let huge = Layout::plan(2 << 40).unwrap();
    /// assert_eq!(huge.layout.seg_num(), 65_535);
    /// assert!(huge.capped());
    /// ```
    pub fn plan(device_size: u64) -> Result<FormatPlan, Error> {
        if device_size < CACHE_DEV_SIZE_MIN {
            return Err(Error::out_of_range(Record::Device, "size", device_size, CACHE_DEV_SIZE_MIN, u64::MAX));
        }
        let segments_possible = (device_size - SEGMENTS_OFF) / SEG_SIZE;
        let seg_num = segments_possible.min(SEG_NUM_MAX.into()) as u16;
        Ok(FormatPlan { layout: Layout { seg_num, device_size }, segments_possible })
    }

    /// The layout of a device of `device_size` bytes whose superblock says
    /// `seg_num`: refused if `seg_num` is 0 or its segments do not fit.
    pub fn new(seg_num: u16, device_size: u64) -> Result<Self, Error> {
        let layout = Layout { seg_num, device_size };
        if seg_num == 0 {
            return Err(Error::out_of_range(Record::Superblock, "seg_num", 0, 1, SEG_NUM_MAX.into()));
        }
        if layout.segments_end() > device_size {
            let fits = device_size.saturating_sub(SEGMENTS_OFF) / SEG_SIZE;
            return Err(Error::out_of_range(Record::Superblock, "seg_num", seg_num.into(), 1, fits));
        }
        Ok(layout)
    }

    /// Number of segments, segment 0 included.
    pub const fn seg_num(&self) -> u16 {
        self.seg_num
    }

    /// Size of the device.
    pub const fn device_size(&self) -> u64 {
        self.device_size
    }

    /// End of the last segment.
    pub const fn segments_end(&self) -> u64 {
        SEGMENTS_OFF + self.seg_num as u64 * SEG_SIZE
    }

    fn segment_error(&self, seg: u32) -> Error {
        Error::out_of_range(Record::SegmentInfo, "segment", seg.into(), 0, u64::from(self.seg_num) - 1)
    }

    /// Device offset of segment `seg`.
    pub fn segment_offset(&self, seg: u32) -> Result<u64, Error> {
        if seg >= u32::from(self.seg_num) {
            return Err(self.segment_error(seg));
        }
        Ok(SEGMENTS_OFF + u64::from(seg) * SEG_SIZE)
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
        if id >= META_ENTRIES {
            return Err(Error::out_of_range(Record::BackingDevInfo, "id", id.into(), 0, (META_ENTRIES - 1).into()));
        }
        Ok(SEGMENTS_OFF + META_SEG_DATA_OFF + u64::from(id) * META_ENTRY_STRIDE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_sizes() {
        assert!(Layout::plan(CACHE_DEV_SIZE_MIN - 1).is_err());
        let min = Layout::plan(CACHE_DEV_SIZE_MIN).unwrap();
        assert_eq!(min.layout.seg_num(), 31);
        assert_eq!(min.unused_bytes(), CACHE_DEV_SIZE_MIN - SEGMENTS_OFF - 31 * SEG_SIZE);
        let exact = SEGMENTS_OFF + 65_535 * SEG_SIZE;
        assert!(!Layout::plan(exact).unwrap().capped());
        let one_more = exact + SEG_SIZE;
        let p = Layout::plan(one_more).unwrap();
        assert!(p.capped());
        assert_eq!(p.segments_possible, 65_536);
        assert_eq!(p.layout.seg_num(), 65_535);
        assert_eq!(p.unused_bytes(), SEG_SIZE);
    }

    #[test]
    fn offsets() {
        let l = Layout::new(63, 1 << 30).unwrap();
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
    fn superblock_seg_num_must_fit() {
        assert!(Layout::new(0, 1 << 30).is_err());
        assert!(Layout::new(63, 1 << 30).is_ok());
        assert!(Layout::new(64, 1 << 30).is_err());
        assert!(Layout::new(1, 0).is_err());
    }
}
