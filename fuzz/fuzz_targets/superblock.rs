//! The superblock area in both dialects: `Superblock::decode` (RFC v1),
//! `DmSuperblock::decode` (dm-pcache), `Dialect::detect`/`guess`, and
//! `media::read_superblock` on a sparse device; `Layout::new`/`Layout::plan`
//! in both dialects on arbitrary sizes; and `pfn::decode` (the NVDIMM
//! namespace info block) on the same bytes.
//!
//! Input: the 4 KiB superblock area (a short input is all area), then up to
//! 14 bytes of layout parameters, zero-filled (from the start of a short
//! input):
//!
//! * bytes 0..2: `seg_num`, low 16 bits (le). Bit 0 of byte 0 clear: the
//!   layout takes the dialect and `seg_num` of the superblock instead, when
//!   one decodes.
//! * bytes 2..10: the device size (le), also the namespace size for `pfn`.
//! * byte 10, bit 0: the dialect of the layout checks when the superblock
//!   gives none (0: RFC v1, 1: dm-pcache).
//! * bytes 11..13: `seg_num`, high 16 bits (le): dm-pcache counts up to 2^20
//!   segments, and the RFC must refuse more than 65 535.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcache_format::consts::{
    CACHE_DEV_SIZE_MIN, CACHE_SEG_DATA_SIZE, DIRTY_TAIL_OFF, KEY_TAIL_OFF, MAGIC, META_ENTRIES, META_ENTRY_STRIDE,
    SB_OFF, SB_SIZE, SEG_SIZE, SEGMENTS_OFF, VERSION,
};
use pcache_format::crc::{crc32_reference, crc32c_reference};
use pcache_format::dm::{
    DM_CACHE_INFO_OFF, DM_CTRL_OFF, DM_DIRTY_TAIL_OFF, DM_KEY_TAIL_OFF, DM_SEG_NUM_MAX, DM_SEGMENTS_OFF, DmSuperblock,
};
use pcache_format::media::read_superblock;
use pcache_format::pfn::{self, DAX_SIGNATURE, PFN_INFO_OFF, PFN_INFO_SIZE, PFN_SIGNATURE, PfnInfo};
use pcache_format::sparse::SparseImage;
use pcache_format::{Dialect, ErrorKind, Layout, SbFlags, Superblock};

const PARAMS: usize = 14;

fuzz_target!(|data: &[u8]| {
    let rfc = rfc_superblock(data);
    let dm = dm_superblock(data);
    let detected = dialect(data, rfc.is_some(), dm.is_some());

    // Layout parameters: after the area, or from the start of a short input.
    let tail = data.get(SB_SIZE..).unwrap_or(data);
    let mut p = [0u8; PARAMS];
    let n = tail.len().min(PARAMS);
    p[..n].copy_from_slice(&tail[..n]);
    let size = u64::from_le_bytes(p[2..10].try_into().unwrap());
    let from_sb = match detected {
        Some(Dialect::RfcV1) => rfc.map(|n| (Dialect::RfcV1, n)),
        Some(Dialect::DmPcache) => dm.map(|n| (Dialect::DmPcache, n)),
        None => None,
    };
    let (d, seg_num) = match from_sb {
        Some(sb) if p[0] & 1 == 0 => sb,
        _ => {
            let d = if p[10] & 1 == 0 { Dialect::RfcV1 } else { Dialect::DmPcache };
            (d, u32::from(u16::from_le_bytes([p[0], p[1]])) | u32::from(u16::from_le_bytes([p[11], p[12]])) << 16)
        }
    };
    check_layout(d, seg_num, size);
    for d in Dialect::ALL {
        check_plan(d, size);
    }

    // The area as a device's superblock: the device is sparse, so any size
    // that holds the area is cheap.
    if let Some(area) = data.get(..SB_SIZE) {
        let dev_size = size.max(SB_OFF + SB_SIZE as u64);
        let mut img = SparseImage::new(dev_size);
        img.write_at(SB_OFF, area).expect("inside the device");
        // What read_superblock must make of it: the superblock of the
        // likelier dialect, if it decodes, and a layout that fits.
        let seg_num = match Dialect::guess(area).unwrap_or_default() {
            Dialect::RfcV1 => rfc,
            Dialect::DmPcache => dm,
        };
        let expected = seg_num.and_then(|n| Layout::new(detected.unwrap_or_default(), n, dev_size).ok());
        match read_superblock(&img) {
            Ok(layout) => {
                assert_eq!(Some(layout), expected);
                assert_eq!(Some(layout.dialect()), detected);
                assert!(layout.segments_end() <= dev_size);
            }
            Err(e) => {
                assert_eq!(expected, None, "refused: {e}");
                let _ = e.to_string();
            }
        }
    }

    check_pfn(data, size);
});

/// `Superblock::decode` (RFC v1), checked; its `seg_num` if it decodes.
fn rfc_superblock(data: &[u8]) -> Option<u32> {
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
    decoded.ok().map(|sb| u32::from(sb.seg_num.get()))
}

/// `DmSuperblock::decode`, checked; its `seg_num` if it decodes.
fn dm_superblock(data: &[u8]) -> Option<u32> {
    let decoded = DmSuperblock::decode(data);
    match &decoded {
        Ok(sb) => {
            assert!(data.len() >= DmSuperblock::SIZE);
            let seg_num = sb.seg_num.get();
            assert!((1..=DM_SEG_NUM_MAX).contains(&seg_num));
            assert_eq!(sb.magic.get(), MAGIC);
            // BIGENDIAN is refused and no other flag is known.
            assert_eq!(sb.flags.get(), 0);
            assert_eq!(sb.crc.get(), DmSuperblock::computed_crc(data));
            assert_eq!(sb.crc.get(), crc32c_reference(&data[4..DmSuperblock::SIZE]));
            // The CRC covers the struct only: what follows it is free.
            let mut area = DmSuperblock::encode_area(seg_num);
            assert_eq!(DmSuperblock::decode(&area).map(|s| s.seg_num.get()), Ok(seg_num));
            // The struct is what the kernel writes, but for the padding
            // (and so the CRC).
            assert_eq!(area[4..20], data[4..20]);
            if data[20..24] == [0; 4] {
                assert_eq!(area[..24], data[..24]);
            }
            let rest = (data.len() - DmSuperblock::SIZE).min(SB_SIZE - DmSuperblock::SIZE);
            area[DmSuperblock::SIZE..DmSuperblock::SIZE + rest]
                .copy_from_slice(&data[DmSuperblock::SIZE..DmSuperblock::SIZE + rest]);
            assert_eq!(DmSuperblock::decode(&area).map(|s| s.seg_num.get()), Ok(seg_num));
        }
        Err(e) => {
            let _ = e.to_string();
            if data.len() < DmSuperblock::SIZE {
                assert!(matches!(e.kind, ErrorKind::Truncated { .. }), "{e}");
            }
        }
    }
    if data.len() >= DmSuperblock::SIZE {
        let raw = DmSuperblock::read(data).expect("24 bytes are there");
        assert_eq!(raw.validate(DmSuperblock::computed_crc(data)).is_ok(), decoded.is_ok());
    } else {
        assert!(DmSuperblock::read(data).is_err());
    }
    decoded.ok().map(|sb| sb.seg_num.get())
}

/// `Dialect::detect` and `guess` against a model built on the reference
/// (table-driven) CRCs; returns what `detect` found.
fn dialect(data: &[u8], rfc_ok: bool, dm_ok: bool) -> Option<Dialect> {
    let magic = data.get(8..16) == Some(&MAGIC.to_le_bytes()[..]);
    let stored = data.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let dm_crc = data.get(4..DmSuperblock::SIZE).map(crc32c_reference);
    let rfc_crc = data.get(4..SB_SIZE).map(crc32_reference);
    let model = if !magic {
        None
    } else if dm_crc.is_some() && dm_crc == stored {
        Some(Dialect::DmPcache)
    } else if rfc_crc.is_some() && rfc_crc == stored {
        Some(Dialect::RfcV1)
    } else {
        None
    };
    let detected = Dialect::detect(data);
    assert_eq!(detected, model);
    let guessed = Dialect::guess(data);
    let model_guess = model.or_else(|| {
        magic.then(|| if data[4..6] == VERSION.to_le_bytes() { Dialect::RfcV1 } else { Dialect::DmPcache })
    });
    assert_eq!(guessed, model_guess);
    // A superblock that decodes is detected: dm-pcache's always as itself;
    // an RFC one as RFC unless its bytes also pass the dm-pcache CRC.
    if dm_ok {
        assert_eq!(detected, Some(Dialect::DmPcache));
    }
    if rfc_ok {
        assert!(detected == Some(Dialect::RfcV1) || (detected == Some(Dialect::DmPcache) && dm_crc == stored));
    }
    if let Some(d) = detected {
        assert_eq!(Dialect::from_name(d.name()), Some(d));
        let _ = d.to_string();
    }
    detected
}

/// `Layout::new` in dialect `d`: it accepts exactly the layouts that fit,
/// and every offset of one it accepts lies inside the device.
fn check_layout(d: Dialect, seg_num: u32, size: u64) {
    let max = u64::from(d.seg_num_max());
    assert_eq!(max, if d == Dialect::RfcV1 { 65_535 } else { u64::from(DM_SEG_NUM_MAX) });
    let segments_off = if d == Dialect::RfcV1 { SEGMENTS_OFF } else { DM_SEGMENTS_OFF };
    assert_eq!(d.segments_off(), segments_off);
    let end = segments_off + u64::from(seg_num) * SEG_SIZE;
    let fits =
        seg_num > 0 && u64::from(seg_num) <= max && end <= size && (d == Dialect::RfcV1 || size >= CACHE_DEV_SIZE_MIN);
    let l = match Layout::new(d, seg_num, size) {
        Ok(l) => l,
        Err(e) => {
            assert!(!fits, "{d}: refused a layout that fits: {seg_num} segments, {size} bytes: {e}");
            let _ = e.to_string();
            return;
        }
    };
    assert!(fits, "{d}: accepted a layout that does not fit: {seg_num} segments, {size} bytes");
    assert_eq!((l.dialect(), l.seg_num(), l.device_size()), (d, seg_num, size));
    assert_eq!(l.segments_end(), end);
    assert_eq!(l.first_cache_seg(), if d == Dialect::RfcV1 { 1 } else { 0 });
    assert_eq!(l.segment_offset(0), Ok(segments_off));
    let last = seg_num - 1;
    for seg in [0, last / 2, last] {
        let off = l.segment_offset(seg).expect("segment inside the layout");
        assert!(off + SEG_SIZE <= l.segments_end());
        assert_eq!(l.seg_info_offset(seg), Ok(off));
        let data = l.data_offset(seg).expect("data area");
        assert_eq!(data + u64::from(CACHE_SEG_DATA_SIZE), off + SEG_SIZE);
        let ctrl = l.ctrl_offset(seg).expect("control page");
        assert!(off < ctrl && ctrl < data);
        let end = l.data_range(seg, CACHE_SEG_DATA_SIZE - 512, 512).expect("last sector") + 512;
        assert!(end <= size);
        assert!(l.data_range(seg, CACHE_SEG_DATA_SIZE - 511, 512).is_err());
        assert!(l.data_range(seg, u32::MAX, u32::MAX).is_err());
        let tails = l.tail_offsets(seg).expect("tails");
        match d {
            Dialect::RfcV1 => assert_eq!(tails, (ctrl + KEY_TAIL_OFF as u64, ctrl + DIRTY_TAIL_OFF as u64)),
            Dialect::DmPcache => assert_eq!(tails, (DM_CTRL_OFF + DM_KEY_TAIL_OFF, DM_CTRL_OFF + DM_DIRTY_TAIL_OFF)),
        }
    }
    assert!(l.segment_offset(seg_num).is_err());
    assert!(l.ctrl_offset(u32::MAX).is_err());
    match d {
        Dialect::RfcV1 => {
            let last_entry = l.meta_entry_offset(META_ENTRIES - 1).expect("last entry");
            assert_eq!(last_entry + META_ENTRY_STRIDE, SEGMENTS_OFF + SEG_SIZE);
            assert!(l.meta_entry_offset(META_ENTRIES).is_err());
            assert!(l.cache_info_offset().is_err());
            assert!(l.tail_offsets(seg_num).is_err());
        }
        Dialect::DmPcache => {
            // No backing table; cache info and tails between the superblock
            // and segment 0, whatever the first segment asked for.
            assert!(l.meta_entry_offset(0).is_err());
            let ci = l.cache_info_offset().expect("cache info");
            assert_eq!(ci, DM_CACHE_INFO_OFF);
            assert!(SB_OFF + SB_SIZE as u64 <= ci && ci + 2 * 4096 <= DM_CTRL_OFF);
            let (key, dirty) = l.tail_offsets(u32::MAX).expect("one pair of tails per device");
            assert!(DM_CTRL_OFF <= key && key + 32 <= dirty && dirty + 32 <= segments_off);
        }
    }
}

/// `Layout::plan` in dialect `d`.
fn check_plan(d: Dialect, size: u64) {
    let Ok(plan) = Layout::plan(d, size) else {
        assert!(size < CACHE_DEV_SIZE_MIN, "{d}: refused to plan {size} bytes");
        return;
    };
    assert!(size >= CACHE_DEV_SIZE_MIN);
    let l = plan.layout;
    assert_eq!(l.dialect(), d);
    assert_eq!(Layout::new(d, l.seg_num(), size), Ok(l));
    assert_eq!(plan.segments_possible, (size - d.segments_off()) / SEG_SIZE);
    assert_eq!(u64::from(l.seg_num()), plan.segments_possible.min(d.seg_num_max().into()));
    assert!(plan.unused_bytes() <= size);
    assert_eq!(plan.unused_bytes(), size - l.segments_end());
    assert_eq!(plan.capped(), plan.segments_possible > u64::from(l.seg_num()));
    if !plan.capped() {
        assert!(plan.unused_bytes() < SEG_SIZE);
    }
}

/// The NVDIMM info block: `pfn::decode` never panics, and what it returns
/// is a block whose signature and checksum hold and whose `dataoff` is
/// inside the namespace, past the block, 4 KiB aligned. The same block with
/// its checksum fixed decodes exactly as a model of those rules says.
fn check_pfn(block: &[u8], size: u64) {
    if let Some(info) = pfn::decode(block, size) {
        let block = &block[..PFN_INFO_SIZE];
        assert_eq!(info, model_pfn(block, size).expect("decoded a block the rules refuse"));
        assert_eq!(fletcher(block), u64::from_le_bytes(block[PFN_INFO_SIZE - 8..].try_into().unwrap()));
        assert_eq!(pfn::decode(&pfn::encode(info.devdax, info.dataoff), size), Some(info));
    }
    if let Some(block) = block.get(..PFN_INFO_SIZE) {
        let mut fixed = block.to_vec();
        fixed[PFN_INFO_SIZE - 8..].fill(0);
        let sum = fletcher(&fixed);
        assert_eq!(pfn::fletcher64(&fixed), sum);
        fixed[PFN_INFO_SIZE - 8..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(pfn::decode(&fixed, size), model_pfn(&fixed, size));
    }
}

/// What an info block with a good checksum says, by the rules.
fn model_pfn(block: &[u8], size: u64) -> Option<PfnInfo> {
    let devdax = match &block[..16] {
        s if s == PFN_SIGNATURE => false,
        s if s == DAX_SIGNATURE => true,
        _ => return None,
    };
    let dataoff = u64::from_le_bytes(block[56..64].try_into().unwrap());
    let fits = dataoff >= PFN_INFO_OFF + PFN_INFO_SIZE as u64 && dataoff < size && dataoff % 4096 == 0;
    fits.then_some(PfnInfo { devdax, dataoff })
}

/// Fletcher-64 of a 4 KiB block with its checksum field taken as zeros:
/// 32-bit words summed, and the sums summed, both modulo 2^32.
fn fletcher(block: &[u8]) -> u64 {
    let (mut lo, mut hi) = (0u64, 0u64);
    for (i, w) in block[..PFN_INFO_SIZE].chunks_exact(4).enumerate() {
        let word = if i >= (PFN_INFO_SIZE - 8) / 4 { 0 } else { u64::from(u32::from_le_bytes(w.try_into().unwrap())) };
        lo = (lo + word) & 0xffff_ffff;
        hi = (hi + lo) & 0xffff_ffff;
    }
    hi << 32 | lo
}
