//! Whole-image scans of images built by the reference writer, intact and
//! damaged in each way `pcache check` must notice.

use pcache_format::image::{Issue, Location, Report, ScanOptions, Severity, scan};
use pcache_format::sparse::{CacheWriter, ImageBuilder, SparseImage};
use pcache_format::*;

const GIB: u64 = 1 << 30;

fn problems(r: &Report) -> Vec<String> {
    r.findings.iter().filter(|f| f.severity == Severity::Problem).map(|f| f.to_string()).collect()
}

fn notes(r: &Report) -> Vec<String> {
    r.findings.iter().filter(|f| f.severity == Severity::Note).map(|f| f.to_string()).collect()
}

/// A 1 GiB device with one cache of 8 segments (data CRC on) holding two
/// ksets: three dirty keys, then one clean key.
fn cached_image() -> (ImageBuilder, CacheWriter) {
    let mut b = ImageBuilder::format(GIB).unwrap();
    let mut c = b.add_cache(0, b"/dev/backing", 64 << 20, 8, true).unwrap();
    c.write(&mut b, 0, &[1u8; 4096], false).unwrap();
    c.write(&mut b, 8192, &[2u8; 512], false).unwrap();
    c.write(&mut b, 4096, &[3u8; 4096], false).unwrap();
    c.close(&mut b).unwrap();
    c.write(&mut b, 1 << 20, &[4u8; 8192], true).unwrap();
    c.close(&mut b).unwrap();
    (b, c)
}

#[test]
fn fresh_format_is_clean() {
    let b = ImageBuilder::format(GIB).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert!(r.superblock_ok());
    assert!(r.superblock.crc_ok());
    assert_eq!(r.layout.unwrap().seg_num(), 63);
    assert_eq!(problems(&r), Vec::<String>::new());
    assert!(r.backings.is_empty());
    let meta = r.meta.unwrap().latest.unwrap();
    assert_eq!((meta.copy, meta.record.header().seq), (0, 1));
}

#[test]
fn cache_is_walked() {
    let (b, _) = cached_image();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(problems(&r), Vec::<String>::new());
    assert_eq!(notes(&r), Vec::<String>::new());
    let cache = &r.backings[0];
    assert_eq!(cache.info.path(), b"/dev/backing");
    assert_eq!(cache.chain.iter().map(|s| s.dev_seg).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    assert!(cache.chain_complete);
    let log = cache.log.as_ref().unwrap();
    assert_eq!((log.ksets, log.keys, log.dirty_keys, log.clean_keys), (2, 4, 3, 1));
    assert_eq!(log.end, (0, (kset_size(3) + kset_size(1)) as u32));
    assert!(log.dirty_tail_reached);
}

#[test]
fn flipped_superblock_byte_is_a_problem_and_the_rest_still_shows() {
    let (mut b, _) = cached_image();
    let mut byte = [0u8; 1];
    b.image().read_at(SB_OFF + 3000, &mut byte).unwrap();
    b.image_mut().write_at(SB_OFF + 3000, &[byte[0] ^ 0x01]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert!(!r.superblock_ok());
    assert!(!r.superblock.crc_ok());
    let p = problems(&r);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("superblock: CRC mismatch"), "{p:?}");
    assert_eq!(r.backings.len(), 1);
}

#[test]
fn not_a_pcache_device() {
    let img = SparseImage::new(GIB);
    let r = scan(&img, ScanOptions::default());
    assert!(!r.superblock_ok());
    assert!(matches!(r.superblock.error.unwrap().kind, ErrorKind::BadMagic { found: 0, .. }));
    assert!(r.layout.is_none());
    // Too small to hold a superblock at all.
    let r = scan(&[0u8; 100][..], ScanOptions::default());
    assert_eq!(r.problems(), 1);
}

#[test]
fn torn_copy_that_is_not_current_is_only_a_note() {
    let (mut b, c) = cached_image();
    let seg = c.chain()[2];
    let copy1 = b.layout().seg_info_offset(seg).unwrap() + 4096;
    b.image_mut().write_at(copy1 + 40, &[0xff]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(problems(&r), Vec::<String>::new());
    let n = notes(&r);
    assert_eq!(n.len(), 1);
    assert!(n[0].contains("cache segment 2 (device segment 3): segment info copy 1: CRC mismatch"), "{n:?}");
}

#[test]
fn damaged_current_copy_falls_back_and_both_damaged_is_a_problem() {
    let (mut b, c) = cached_image();
    let seg = c.chain()[2];
    let copy0 = b.layout().seg_info_offset(seg).unwrap();
    // Copy 1 is current (records are created with both copies): damage it.
    b.image_mut().write_at(copy0 + 4096 + 40, &[0xff]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(problems(&r), Vec::<String>::new());
    assert!(r.backings[0].chain_complete);
    // Both copies damaged: a problem, and the chain ends there.
    b.image_mut().write_at(copy0 + 40, &[0xff]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    let p = problems(&r);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("segment info: no valid copy"), "{p:?}");
    assert!(!r.backings[0].chain_complete);
}

/// What one damaged page did to a cache whose entry had one written copy:
/// the entry read as free and its dirty data was lost without a word.
#[test]
fn a_damaged_entry_is_never_free_and_its_cache_is_found() {
    for how in ["garbage", "zeros"] {
        let (mut b, c) = cached_image();
        let entry = b.layout().meta_entry_offset(0).unwrap();
        // An entry as the RFC wrote it: copy 1 never written.
        b.image_mut().write_at(entry + 4096, &[0u8; 4096]).unwrap();
        let r = scan(b.image(), ScanOptions::default());
        assert_eq!(problems(&r), Vec::<String>::new());
        assert!(notes(&r).iter().any(|n| n.contains("copy 1 was never written")), "{:?}", notes(&r));
        // Now one page of damage over copy 0.
        let page = if how == "zeros" { [0u8; 4096] } else { [0x5au8; 4096] };
        b.image_mut().write_at(entry, &page).unwrap();
        let r = scan(b.image(), ScanOptions::default());
        let p = problems(&r);
        assert!(r.backings.is_empty());
        // Its cache is found, with its dirty keys, and is a problem.
        assert_eq!(r.orphans.len(), 1, "{how}");
        let o = &r.orphans[0];
        assert_eq!(o.head, c.chain()[0]);
        assert_eq!(o.segs, c.chain());
        assert_eq!((o.log.ksets, o.log.dirty_keys), (2, 3));
        assert!(o.holds_dirty_data() && o.data_crc());
        assert!(p.iter().any(|m| m.contains("holding 3 dirty key(s)") && m.contains("pcache repair")), "{how}: {p:?}");
        if how == "garbage" {
            // The entry itself is damage, not a free entry.
            assert!(p.iter().any(|m| m.starts_with("backing 0:") && m.contains("copy 1: never written")), "{p:?}");
        }
    }
}

#[test]
fn an_orphan_without_dirty_data_is_only_a_note() {
    let (mut b, _) = cached_image();
    // As after a crash between freeing the entry and clearing the control
    // pages in detach: every key written back.
    let ctrl = b.layout().ctrl_offset(1).unwrap();
    let end = CachePos::new(0, (kset_size(3) + kset_size(1)) as u32);
    let mut pair = [0u8; 32];
    encode_copy(Dialect::RfcV1, &end, 3, &mut pair[..16]).unwrap();
    encode_copy(Dialect::RfcV1, &end, 4, &mut pair[16..]).unwrap();
    b.image_mut().write_at(ctrl + DIRTY_TAIL_OFF as u64, &pair).unwrap();
    let entry = b.layout().meta_entry_offset(0).unwrap();
    let mut free = vec![0u8; 8192];
    encode_copy(Dialect::RfcV1, &BackingDevInfo::free(0), 3, &mut free[..4096]).unwrap();
    encode_copy(Dialect::RfcV1, &BackingDevInfo::free(0), 4, &mut free[4096..]).unwrap();
    b.image_mut().write_at(entry, &free).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(problems(&r), Vec::<String>::new());
    assert_eq!(r.orphans.len(), 1);
    assert!(!r.orphans[0].holds_dirty_data());
    assert!(notes(&r).iter().any(|n| n.contains("no dirty data")), "{:?}", notes(&r));
}

#[test]
fn data_crc_mismatch_is_found() {
    let (mut b, c) = cached_image();
    let data = b.layout().data_offset(c.chain()[1]).unwrap();
    b.image_mut().write_at(data + 4096 + 100, &[9]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    let p = problems(&r);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("key 1: data CRC mismatch"), "{p:?}");
    let quick = scan(b.image(), ScanOptions { walk_logs: true, verify_data: false });
    assert_eq!(quick.problems(), 0);
}

#[test]
fn torn_newest_kset_is_a_note_but_a_lost_dirty_tail_is_a_problem() {
    let (mut b, c) = cached_image();
    let log = b.layout().data_offset(c.chain()[0]).unwrap();
    let second = log + kset_size(3) as u64;
    b.image_mut().write_at(second + 30, &[0x55]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(problems(&r), Vec::<String>::new());
    assert_eq!(notes(&r).len(), 1);
    assert_eq!(r.backings[0].log.as_ref().unwrap().ksets, 1);

    // Now the dirty tail points past the torn kset.
    let ctrl = b.layout().ctrl_offset(c.chain()[0]).unwrap();
    let mut copy = [0u8; 16];
    encode_copy(Dialect::RfcV1, &CachePos::new(0, (kset_size(3) + kset_size(1)) as u32), 2, &mut copy).unwrap();
    b.image_mut().write_at(ctrl + DIRTY_TAIL_OFF as u64 + 16, &copy).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    let p = problems(&r);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("dirty tail (segment 0 offset 0x"), "{p:?}");
}

/// A kset whose CRC fails with a valid kset after it is no torn end: the
/// engine refuses such a log, and the scan calls it a problem.
#[test]
fn a_damaged_kset_in_the_middle_of_the_log_is_a_problem() {
    let (mut b, c) = cached_image();
    let log = b.layout().data_offset(c.chain()[0]).unwrap();
    b.image_mut().write_at(log + 30, &[0x55]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    let p = problems(&r);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("key log at segment 0 offset 0x0: kset: CRC mismatch"), "{p:?}");
    assert!(p[0].contains("no kset torn by a crash"), "{p:?}");
    assert_eq!(notes(&r), Vec::<String>::new());
}

#[test]
fn shared_segment_and_shared_path_are_problems() {
    let (mut b, _) = cached_image();
    let mut c2 = b.add_cache(1, b"/dev/other", 64 << 20, 4, false).unwrap();
    c2.write(&mut b, 0, &[7u8; 512], false).unwrap();
    c2.close(&mut b).unwrap();
    assert_eq!(scan(b.image(), ScanOptions::default()).problems(), 0);
    // Re-link the second cache's first segment to the first cache's segment 3.
    let first2 = c2.chain()[0];
    let mut copy = [0u8; 4096];
    encode_copy(Dialect::RfcV1, &SegmentInfo::data(first2, Some(3)), 2, &mut copy).unwrap();
    let at = b.layout().seg_info_offset(first2).unwrap() + 4096;
    b.image_mut().write_at(at, &copy).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    let p = problems(&r);
    assert!(p.iter().any(|p| p.contains("also belongs to the chain of backing 0")), "{p:?}");

    let (mut b, _) = cached_image();
    b.add_cache(5, b"/dev/backing", 64 << 20, 2, false).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert!(
        r.findings
            .iter()
            .any(|f| f.location == Location::Backing { id: 5 } && f.issue == Issue::PathShared { other: 0 })
    );
}

#[test]
fn key_outside_the_cache_is_a_problem() {
    let (mut b, c) = cached_image();
    // Rewrite the first kset with a key naming cache segment 8 of 8.
    let key = Key::new(0, 4096, KeyFlags::empty(), 8, 0, 0);
    let mut buf = [0u8; 64];
    encode_kset(Dialect::RfcV1, &[key], &mut buf).unwrap();
    let log = b.layout().data_offset(c.chain()[0]).unwrap();
    b.image_mut().write_at(log, &buf).unwrap();
    b.image_mut().write_at(log + 64, &TERMINATOR).unwrap();
    let p = problems(&scan(b.image(), ScanOptions::default()));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("key 0: cache_seg_id 8 out of range (0..=7)"), "{p:?}");
}

#[test]
fn log_that_loops_is_a_problem() {
    let (mut b, c) = cached_image();
    let log = b.layout().data_offset(c.chain()[0]).unwrap();
    b.image_mut().write_at(log, &encode_last(Dialect::RfcV1, 0)).unwrap();
    let p = problems(&scan(b.image(), ScanOptions::default()));
    assert!(p.iter().any(|p| p.contains("leads back to segment 0")), "{p:?}");
}

#[test]
fn log_spanning_segments() {
    let mut b = ImageBuilder::format(GIB).unwrap();
    let mut c = b.add_cache(0, b"/b", 1 << 30, 20, false).unwrap();
    // 128-key ksets of 512-byte keys: 5144 bytes each; 3260 fill a segment.
    let mut keys = 0u64;
    while c.key_head().0 == 0 || c.key_head().1 < 10_000 {
        c.write(&mut b, (keys % 8192) * 4096, &[1u8; 512], false).unwrap();
        keys += 1;
    }
    c.close(&mut b).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(r.problems(), 0, "{:?}", problems(&r));
    let log = r.backings[0].log.as_ref().unwrap();
    assert_eq!(log.last_ksets, 1);
    assert_eq!(log.keys, keys);
    assert_eq!(log.end.0, 19);
}

/// A crash that tears the first write of a new entry leaves one torn copy
/// and one never written: with no dirty cache lacking its entry, that is a
/// note and the entry is free — with one, it is a problem (see above).
#[test]
fn an_entry_torn_at_creation_is_a_note() {
    let mut b = ImageBuilder::format(GIB).unwrap();
    let c = b.add_cache(0, b"/dev/backing", 64 << 20, 8, false).unwrap();
    let entry = b.layout().meta_entry_offset(0).unwrap();
    let mut page = [0u8; 4096];
    b.image().read_at(entry, &mut page).unwrap();
    page[300] ^= 0x10;
    b.image_mut().write_at(entry, &page).unwrap();
    b.image_mut().write_at(entry + 4096, &[0u8; 4096]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(problems(&r), Vec::<String>::new());
    assert!(notes(&r).iter().any(|n| n.contains("torn while it was first written")), "{:?}", notes(&r));
    assert_eq!(r.orphans.len(), 1);
    assert_eq!(r.orphans[0].segs, c.chain());
    assert!(!r.orphans[0].holds_dirty_data());
}

/// A segment reused in the middle of a chain can keep a previous life's
/// tails; the orphan search must still start the chain at its real first
/// segment, the one nothing links to.
#[test]
fn an_orphan_chain_starts_where_nothing_links_to_it() {
    let (mut b, c) = cached_image();
    let layout = b.layout();
    assert_eq!(c.chain(), (1..=8).collect::<Vec<_>>());
    // Relink the chain as 5 -> 1 -> 2 -> 3 -> 4 -> 6 -> 7 -> 8.
    let order = [5u32, 1, 2, 3, 4, 6, 7, 8];
    for (i, &seg) in order.iter().enumerate() {
        let mut pair = vec![0u8; 8192];
        let info = SegmentInfo::data(seg, order.get(i + 1).copied());
        encode_copy(Dialect::RfcV1, &info, 3, &mut pair[..4096]).unwrap();
        encode_copy(Dialect::RfcV1, &info, 4, &mut pair[4096..]).unwrap();
        b.image_mut().write_at(layout.seg_info_offset(seg).unwrap(), &pair).unwrap();
    }
    // The tails move to the new first segment; segment 1 keeps its old ones.
    let mut tails = [0u8; 64];
    b.image().read_at(layout.ctrl_offset(1).unwrap() + KEY_TAIL_OFF as u64, &mut tails).unwrap();
    b.image_mut().write_at(layout.ctrl_offset(5).unwrap() + KEY_TAIL_OFF as u64, &tails).unwrap();
    // The entry is lost.
    let entry = layout.meta_entry_offset(0).unwrap();
    b.image_mut().write_at(entry, &[0x77u8; 8192]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(r.orphans.len(), 1, "{:?}", r.orphans.iter().map(|o| (o.head, o.segs.clone())).collect::<Vec<_>>());
    assert_eq!(r.orphans[0].head, 5);
    assert_eq!(r.orphans[0].segs, order);
}
