//! The meta segment (segment 0: its info copies, then the backing table)
//! from the input, on a freshly formatted 1 GiB device: every backing entry
//! the input covers, the meta segment info, and a whole-image scan.
//!
//! The input is written over segment 0 from its start (at most 16 MiB);
//! the rest of the segment stays as the format left it (zeros).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pcache_format::consts::{META_ENTRIES, META_ENTRY_STRIDE, META_SEG_DATA_OFF, SEG_SIZE};
use pcache_format::image::{ScanOptions, scan};
use pcache_format::media::{backing_in_use, read_backing, read_meta_segment_info};
use pcache_format::meta::{Slots, copy_infos};
use pcache_format::sparse::{ImageBuilder, SparseImage};
use pcache_format::{Dialect, Layout, MetaRecord};

fn formatted() -> &'static (SparseImage, Layout) {
    static BASE: OnceLock<(SparseImage, Layout)> = OnceLock::new();
    BASE.get_or_init(|| {
        let b = ImageBuilder::format(1 << 30).expect("a 1 GiB format");
        (b.image().clone(), b.layout())
    })
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(SEG_SIZE as usize)];
    let (base, layout) = formatted();
    let mut img = base.clone();
    let seg0 = layout.segment_offset(0).unwrap();
    img.write_at(seg0, data).expect("segment 0 is inside the device");

    // Segment 0's info.
    let meta = read_meta_segment_info(&img, layout).expect("segment 0 is readable");
    // Where the input holds both copies of a record, they are what it holds.
    let expect_copies = |off: usize, stride: usize| {
        data.get(off..off + 2 * stride).map(|c| copy_infos(Slots::new(Dialect::RfcV1, stride, stride), c))
    };
    if let Some(copies) = expect_copies(0, 4096) {
        assert_eq!(meta.copies, copies);
    }
    match &meta.latest {
        Ok(l) => assert!(l.record.check().is_ok()),
        Err(e) => {
            let _ = e.to_string();
        }
    }

    // Every entry the input reaches into, and the one after.
    let covered = data.len().saturating_sub(META_SEG_DATA_OFF as usize).div_ceil(META_ENTRY_STRIDE as usize);
    let mut in_use = Vec::new();
    for id in 0..=(covered as u32).min(META_ENTRIES - 1) {
        let pair = read_backing(&img, layout, id).expect("entry is inside the device");
        let off = (META_SEG_DATA_OFF + u64::from(id) * META_ENTRY_STRIDE) as usize;
        if let Some(copies) = expect_copies(off, 4096) {
            assert_eq!(pair.copies, copies);
        }
        if let Ok(l) = &pair.latest {
            assert!(l.record.check().is_ok());
            if l.record.is_running() {
                assert_eq!(l.record.backing_dev_id.get(), id);
            }
        }
        if backing_in_use(&pair) && pair.latest.as_ref().is_ok_and(|l| l.record.is_running()) {
            in_use.push(id);
        }
    }
    assert!(read_backing(&img, layout, META_ENTRIES).is_err());

    let report = scan(&img, ScanOptions { walk_logs: true, verify_data: true });
    for f in &report.findings {
        let _ = f.to_string();
    }
    // Segment 0 is not the superblock: that is intact.
    assert!(report.superblock_ok());
    assert_eq!(report.layout.as_ref(), Some(layout));
    assert_eq!(report.meta, Some(meta));
    let ids: Vec<u32> = report.backings.iter().map(|b| b.id).collect();
    assert_eq!(ids, in_use, "scan and read_backing disagree on the entries in use");
});
