//! A valid image built from a recipe (caches, writes, closes) with the
//! reference writer, then damaged by patches, then scanned with every
//! option on.
//!
//! Invariants: the scan never panics; an image without patches has no
//! findings at all, and the scan sees exactly the caches and keys the
//! writer put there.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcache_format::image::{ScanOptions, scan};
use pcache_fuzz::{Recipe, build};

fuzz_target!(|recipe: Recipe| {
    let mut built = build(&recipe);
    built.apply(&recipe.patches);
    let report = scan(built.image(), ScanOptions { walk_logs: true, verify_data: true });
    for f in &report.findings {
        let _ = f.to_string();
    }

    if recipe.patches.is_empty() {
        let findings: Vec<String> = report.findings.iter().map(|f| format!("{:?}: {f}", f.severity)).collect();
        assert_eq!(report.problems(), 0, "valid image has problems: {findings:#?}\nrecipe: {recipe:?}");
        assert!(findings.is_empty(), "valid image has notes: {findings:#?}\nrecipe: {recipe:?}");
        assert!(report.superblock_ok());
        assert_eq!(report.layout, Some(built.builder.layout()));
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
    }
});
