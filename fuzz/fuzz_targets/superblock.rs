//! `Superblock::decode` on raw bytes, `Layout::new`/`Layout::plan` on
//! arbitrary sizes, and `media::read_superblock` on a sparse device.
//!
//! Input: the 4 KiB superblock area, then optionally 2 bytes of `seg_num`
//! and 8 bytes of device size (little-endian) for the layout checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcache_format::consts::{
    CACHE_DEV_SIZE_MIN, CACHE_SEG_DATA_SIZE, META_ENTRIES, META_ENTRY_STRIDE, SB_OFF, SB_SIZE, SEG_SIZE, SEGMENTS_OFF,
};
use pcache_format::media::read_superblock;
use pcache_format::sparse::SparseImage;
use pcache_format::{Dialect, Layout, SbFlags, Superblock};

fuzz_target!(|data: &[u8]| {
    let decoded = Superblock::decode(data);
    match &decoded {
        Ok(sb) => {
            assert!(data.len() >= SB_SIZE);
            let seg_num = sb.seg_num.get();
            assert!(seg_num > 0);
            assert_eq!(sb.flags.get() & !SbFlags::all().bits(), 0);
            assert!(!sb.flags().contains(SbFlags::BIGENDIAN));
            assert_eq!(sb.crc.get(), Superblock::computed_crc(data));
            // Re-encoding gives an area that decodes to the same seg_num;
            // its struct differs at most in the CRC and the padding.
            let area = Superblock::encode_area(seg_num);
            let again = Superblock::decode(&area).expect("encode_area decodes");
            assert_eq!(again.seg_num.get(), seg_num);
            assert_eq!((again.version, again.flags, again.magic), (sb.version, sb.flags, sb.magic));
            // The same area also decodes with bytes after it.
            let mut longer = area.to_vec();
            longer.extend_from_slice(&data[SB_SIZE..]);
            assert_eq!(Superblock::decode(&longer).map(|s| s.seg_num.get()), Ok(seg_num));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if data.len() >= SB_SIZE {
        let raw = Superblock::read(data).expect("24 bytes are there");
        assert_eq!(raw.validate(Superblock::computed_crc(data)).is_ok(), decoded.is_ok());
    }

    // Layout parameters: after the area, or from the start of a short input.
    let tail = data.get(SB_SIZE..).unwrap_or(data);
    let mut p = [0u8; 10];
    let n = tail.len().min(10);
    p[..n].copy_from_slice(&tail[..n]);
    let seg_num = match &decoded {
        Ok(sb) if p[0] & 1 == 0 => sb.seg_num.get(),
        _ => u16::from_le_bytes([p[0], p[1]]),
    };
    let size = u64::from_le_bytes(p[2..10].try_into().unwrap());
    check_layout(seg_num, size);
    if let Ok(plan) = Layout::plan(Dialect::RfcV1, size) {
        assert!(size >= CACHE_DEV_SIZE_MIN);
        let l = plan.layout;
        assert_eq!(Layout::new(Dialect::RfcV1, l.seg_num(), size), Ok(l));
        assert!(plan.unused_bytes() <= size);
        assert_eq!(plan.capped(), plan.segments_possible > u64::from(l.seg_num()));
        if !plan.capped() {
            assert!(plan.unused_bytes() < SEG_SIZE);
        }
    } else {
        assert!(size < CACHE_DEV_SIZE_MIN);
    }

    // The area as a device's superblock: the device is sparse, so any size
    // that holds the area is cheap.
    if let Some(area) = data.get(..SB_SIZE) {
        let dev_size = size.max(SB_OFF + SB_SIZE as u64);
        let mut img = SparseImage::new(dev_size);
        img.write_at(SB_OFF, area).expect("inside the device");
        match read_superblock(&img) {
            Ok(layout) if layout.dialect() == Dialect::RfcV1 => {
                let sb = decoded.as_ref().expect("the superblock decodes");
                assert_eq!(layout.seg_num(), u32::from(sb.seg_num.get()));
                assert!(layout.segments_end() <= dev_size);
            }
            Ok(_) => {}
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});

fn check_layout(seg_num: u16, size: u64) {
    let Ok(l) = Layout::new(Dialect::RfcV1, u32::from(seg_num), size) else {
        let fits = SEGMENTS_OFF + u64::from(seg_num) * SEG_SIZE <= size;
        assert!(seg_num == 0 || !fits, "refused a layout that fits: {seg_num} segments, {size} bytes");
        return;
    };
    assert!(seg_num > 0);
    assert_eq!(l.seg_num(), u32::from(seg_num));
    assert_eq!(l.device_size(), size);
    assert!(l.segments_end() <= size);
    let last = u32::from(seg_num) - 1;
    for seg in [0, last / 2, last] {
        let off = l.segment_offset(seg).expect("segment inside the layout");
        assert!(off + SEG_SIZE <= l.segments_end());
        assert_eq!(l.seg_info_offset(seg), Ok(off));
        let data = l.data_offset(seg).expect("data area");
        assert_eq!(data + u64::from(CACHE_SEG_DATA_SIZE), off + SEG_SIZE);
        assert!(l.ctrl_offset(seg).is_ok());
        let end = l.data_range(seg, CACHE_SEG_DATA_SIZE - 512, 512).expect("last sector") + 512;
        assert!(end <= size);
        assert!(l.data_range(seg, CACHE_SEG_DATA_SIZE - 511, 512).is_err());
    }
    assert!(l.segment_offset(u32::from(seg_num)).is_err());
    assert!(l.ctrl_offset(u32::MAX).is_err());
    let last_entry = l.meta_entry_offset(META_ENTRIES - 1).expect("last entry");
    assert_eq!(last_entry + META_ENTRY_STRIDE, SEGMENTS_OFF + SEG_SIZE);
    assert!(l.meta_entry_offset(META_ENTRIES).is_err());
}
