//! A valid image built from a recipe (RFC v1: caches, writes, closes;
//! dm-pcache: the kernel's first-use format, then writes and closes) with
//! the reference writer, then damaged by patches, then scanned with every
//! option on. Optionally the same image is also read through a
//! `media::Window`: placed at an offset of a larger device, behind an NVDIMM
//! info block that names that offset when the offset allows one.
//!
//! Invariants: the scan never panics; an image without patches has no
//! findings at all, and the scan sees exactly the caches and keys the
//! writer put there; the image read through a window is the same device
//! (the same report), and a window anywhere never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcache_format::image::{DM_CACHE_ID, Report, ScanOptions, scan};
use pcache_format::media::{Window, read_superblock};
use pcache_format::pfn::{self, PFN_INFO_OFF, PFN_INFO_SIZE, PfnInfo};
use pcache_format::sparse::SparseImage;
use pcache_format::{Dialect, ReadMedia};
use pcache_fuzz::{Recipe, build};

const OPTIONS: ScanOptions = ScanOptions { walk_logs: true, verify_data: true };

fuzz_target!(|recipe: Recipe| {
    let mut built = build(&recipe);
    built.apply(&recipe.patches);
    let report = scan(built.image(), OPTIONS);
    for f in &report.findings {
        let _ = f.to_string();
    }
    // What read_superblock accepts, the scan lays out the same way (the scan
    // also lays out what it can of a superblock with a bad CRC).
    if let Ok(layout) = read_superblock(built.image()) {
        assert_eq!(report.layout, Some(layout));
    }
    let dialect = built.builder.layout().dialect();

    if recipe.patches.is_empty() {
        let findings: Vec<String> = report.findings.iter().map(|f| format!("{:?}: {f}", f.severity)).collect();
        assert_eq!(report.problems(), 0, "valid image has problems: {findings:#?}\nrecipe: {recipe:?}");
        assert!(findings.is_empty(), "valid image has notes: {findings:#?}\nrecipe: {recipe:?}");
        assert!(report.superblock_ok());
        assert_eq!(report.superblock.dialect, Some(dialect));
        assert_eq!(report.layout, Some(built.builder.layout()));
        match dialect {
            Dialect::RfcV1 => assert!(report.meta.is_some() && report.cache_info.is_none()),
            Dialect::DmPcache => {
                assert!(report.meta.is_none());
                let ci = report.cache_info.expect("a dm-pcache scan reads the cache info");
                assert!(ci.latest.is_ok(), "{:?}", ci.latest);
                assert_eq!(built.caches.len(), 1);
                assert_eq!(built.caches[0].id, DM_CACHE_ID);
            }
        }
        assert_eq!(report.backings.len(), built.caches.len(), "recipe: {recipe:?}");
        let mut caches: Vec<_> = built.caches.iter().collect();
        caches.sort_by_key(|c| c.id);
        for (b, c) in report.backings.iter().zip(caches) {
            assert_eq!(b.id, c.id);
            assert!(b.chain_complete);
            let chain: Vec<u32> = b.chain.iter().map(|s| s.dev_seg).collect();
            assert_eq!(chain, c.writer.chain());
            assert_eq!(b.info.cache_info.n_segs.get(), c.n_segs);
            let log = b.log.as_ref().expect("log walked");
            assert_eq!(log.keys, c.logged, "cache {}: recipe {recipe:?}", c.id);
            assert_eq!(log.dirty_keys, c.logged_dirty, "cache {}: recipe {recipe:?}", c.id);
            assert_eq!(log.clean_keys, c.logged - c.logged_dirty);
            assert_eq!(log.stale_keys, 0);
            assert_eq!(log.end, c.writer.key_head(), "cache {}: recipe {recipe:?}", c.id);
            assert!(log.dirty_tail_reached);
        }
    } else {
        // Whatever the damage, the report stays self-consistent.
        let mut last = None;
        for b in &report.backings {
            assert!(last < Some(b.id));
            last = Some(b.id);
            assert!(b.info.is_running());
            assert!(b.chain.len() <= b.info.cache_info.n_segs.get() as usize);
            if let Some(log) = &b.log {
                assert!(log.dirty_keys + log.clean_keys + log.stale_keys <= log.keys);
            }
        }
        if report.superblock_ok() {
            assert_eq!(report.superblock.dialect, report.layout.map(|l| l.dialect()));
        }
        if report.layout.map(|l| l.dialect()) == Some(Dialect::DmPcache) {
            assert!(report.meta.is_none() && report.backings.len() <= 1 && report.orphans.is_empty());
            assert!(report.backings.iter().all(|b| b.id == DM_CACHE_ID));
        }
    }

    if let Some(base) = recipe.window {
        windows(built.image(), base, &report);
    }
});

/// The image at `base` of a larger device, read through a window, scans
/// as the image itself does; the image's bytes from `base` on, as a device
/// of their own, scan without a panic.
fn windows(img: &SparseImage, base: u64, report: &Report) {
    let own = Window::new(img, base);
    assert_eq!(own.base(), base);
    assert_eq!(own.size(), img.size().saturating_sub(base));
    let tail = scan(&own, OPTIONS);
    for f in &tail.findings {
        let _ = f.to_string();
    }
    if base == 0 {
        assert_eq!(&tail, report);
    }

    let Some(total) = base.checked_add(img.size()) else { return };
    let mut ns = SparseImage::new(total);
    let mut page = [0u8; 4096];
    let pages: Vec<u64> = img.written_pages().collect();
    for off in pages {
        img.read_at(off, &mut page).expect("a written page is inside the image");
        ns.write_at(base + off, &page).expect("inside the larger device");
    }
    // Where an info block can name the offset (past the block, 4 KiB
    // aligned), it does, and says what was written.
    let mut start = base;
    if base >= PFN_INFO_OFF + PFN_INFO_SIZE as u64 && base.is_multiple_of(4096) {
        let devdax = base & (1 << 12) != 0;
        ns.write_at(PFN_INFO_OFF, &pfn::encode(devdax, base)).expect("the block is before the image");
        let mut block = [0u8; PFN_INFO_SIZE];
        ns.read_at(PFN_INFO_OFF, &mut block).expect("the block is inside the device");
        let info = pfn::decode(&block, ns.size()).expect("a block naming the image");
        assert_eq!(info, PfnInfo { devdax, dataoff: base });
        start = info.dataoff;
    }
    let window = Window::new(&ns, start);
    assert_eq!(window.size(), img.size());
    let through = scan(&window, OPTIONS);
    assert_eq!(&through, report, "the image at {base:#x} of a larger device scans differently");
    assert_eq!(read_superblock(&window).ok(), read_superblock(img).ok());
}
