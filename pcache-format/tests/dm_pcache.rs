//! The dm-pcache dialect: images the Linux kernel module wrote (metadata
//! and key log cut out of a QEMU NVDIMM by tests/fixtures/dm-pcache/
//! extract.py), and images the reference writer makes, intact and damaged.

use std::path::PathBuf;

use pcache_format::dm::DM_CACHE_INFO_OFF;
use pcache_format::image::{DM_CACHE_ID, Issue, Report, ScanOptions, Severity, scan};
use pcache_format::media::read_superblock;
use pcache_format::sparse::{ImageBuilder, SparseImage};
use pcache_format::*;

const GIB: u64 = 1 << 30;

fn problems(r: &Report) -> Vec<String> {
    r.findings.iter().filter(|f| f.severity == Severity::Problem).map(|f| f.to_string()).collect()
}

fn notes(r: &Report) -> Vec<String> {
    r.findings.iter().filter(|f| f.severity == Severity::Note).map(|f| f.to_string()).collect()
}

/// A fixture: the size of the pmem device, then runs of bytes.
fn fixture(name: &str) -> SparseImage {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "tests", "fixtures", "dm-pcache", name].iter().collect();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"PCFIX1\0\0", "{}", path.display());
    let size = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let mut img = SparseImage::new(size);
    let mut at = 16;
    while at < bytes.len() {
        let off = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        img.write_at(off, &bytes[at + 12..at + 12 + len]).unwrap();
        at += 12 + len;
    }
    img
}

/// Data CRCs need the cached data, which the fixtures leave out.
const METADATA: ScanOptions = ScanOptions { walk_logs: true, verify_data: false };

#[test]
fn a_cache_the_kernel_wrote_before_a_power_cut() {
    // The module's last `dmsetup status` before the cut:
    // 0 524288 pcache 0 62 62 3 70 1183 0:82776 0:368 0:0
    let img = fixture("cut.fix");
    let layout = read_superblock(&img).unwrap();
    assert_eq!((layout.dialect(), layout.seg_num()), (Dialect::DmPcache, 62));
    let r = scan(&img, METADATA);
    assert_eq!(problems(&r), Vec::<String>::new());
    // Never-written copies are not damage.
    assert_eq!(notes(&r), Vec::<String>::new());
    assert_eq!(r.superblock.dialect, Some(Dialect::DmPcache));
    let ci = r.cache_info.unwrap().latest.unwrap().record;
    assert_eq!((ci.flags.get(), ci.n_segs.get(), ci.gc_percent()), (0x1183, 62, 70));
    let cache = &r.backings[0];
    assert_eq!(cache.id, DM_CACHE_ID);
    let kt = cache.key_tail.unwrap();
    let dt = cache.dirty_tail.unwrap();
    assert_eq!((kt.cache_seg_id.get(), kt.seg_off.get()), (0, 0));
    assert_eq!((dt.cache_seg_id.get(), dt.seg_off.get()), (0, 368));
    let log = cache.log.as_ref().unwrap();
    assert_eq!(log.end, (0, 82_776), "key_head");
    // 8 keys of 1 MiB written back (P1), then 2 MiB (P2) and 2048 4 KiB keys.
    assert_eq!((log.keys, log.written_back_keys, log.dirty_keys), (2058, 8, 2050));
}

#[test]
fn the_same_cache_written_back_and_removed_by_the_kernel() {
    // 0 524288 pcache 0 62 62 4 70 1183 0:165080 0:165080 0:0
    let r = scan(&fixture("clean.fix"), METADATA);
    assert_eq!(problems(&r), Vec::<String>::new());
    let cache = &r.backings[0];
    let log = cache.log.as_ref().unwrap();
    let dt = cache.dirty_tail.unwrap();
    assert_eq!((dt.cache_seg_id.get(), dt.seg_off.get()), (0, 165_080));
    assert_eq!(log.end, (0, 165_080));
    assert_eq!((log.keys, log.dirty_keys), (4106, 0));
}

#[test]
fn damage_to_the_kernel_cache_is_found() {
    let mut img = fixture("cut.fix");
    let layout = read_superblock(&img).unwrap();
    // A bit of the key log, inside the dirty part: its kset's CRC fails with
    // ksets after it, which is damage, not a torn end.
    let log = layout.data_offset(0).unwrap();
    let mut b = [0u8; 1];
    img.read_at(log + 1000, &mut b).unwrap();
    img.write_at(log + 1000, &[b[0] ^ 0x20]).unwrap();
    let r = scan(&img, METADATA);
    assert!(r.findings.iter().any(|f| matches!(f.issue, Issue::LogDamaged(_))), "{:?}", problems(&r));
    // Both cache-info copies gone: the kernel would start a new, empty cache.
    let mut img = fixture("cut.fix");
    img.write_at(DM_CACHE_INFO_OFF, &[0u8; 8192]).unwrap();
    let r = scan(&img, METADATA);
    assert!(r.findings.iter().any(|f| matches!(f.issue, Issue::NoCacheInfo(_))), "{:?}", problems(&r));
}

#[test]
fn reference_writer_images_scan_clean_in_both_dialects() {
    let (mut b, mut c) = ImageBuilder::format_dm(GIB, true).unwrap();
    c.write(&mut b, 0, &[1u8; 4096], false).unwrap();
    c.write(&mut b, 8192, &[2u8; 512], false).unwrap();
    c.close(&mut b).unwrap();
    c.write(&mut b, 1 << 20, &[4u8; 8192], true).unwrap();
    c.close(&mut b).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(problems(&r), Vec::<String>::new());
    assert_eq!(notes(&r), Vec::<String>::new());
    let log = r.backings[0].log.as_ref().unwrap();
    assert_eq!((log.ksets, log.keys, log.dirty_keys, log.clean_keys), (2, 3, 2, 1));
    // One cached byte changed: its data CRC (CRC-32C, seed 0x3B15A) fails.
    let data = b.layout().data_offset(c.chain()[1]).unwrap();
    b.image_mut().write_at(data + 10, &[9]).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert!(r.findings.iter().any(|f| matches!(f.issue, Issue::DataCrc { .. })), "{:?}", problems(&r));
}

#[test]
fn a_superblock_with_the_other_dialects_crc_is_damage() {
    let (mut b, _) = ImageBuilder::format_dm(GIB, false).unwrap();
    // The dm-pcache struct sealed with the RFC CRC: neither dialect's.
    let mut area = [0u8; SB_SIZE];
    b.image().read_at(SB_OFF, &mut area).unwrap();
    Dialect::RfcV1.seal(&mut area, 24);
    b.image_mut().write_at(SB_OFF, &area).unwrap();
    let r = scan(b.image(), ScanOptions::default());
    assert_eq!(r.superblock.dialect, Some(Dialect::DmPcache), "guessed from the layout");
    assert!(!r.superblock_ok());
    assert!(matches!(r.superblock.error.unwrap().kind, ErrorKind::BadCrc { .. }));
}

#[test]
fn a_stale_key_whose_data_changed_fails_as_the_kernel_fails_it() {
    // A key, then its segment's generation bumped and the data overwritten:
    // the key is stale. The kernel still verifies its data CRC at replay
    // and refuses the cache; the RFC reader skips it.
    let build = |dialect: Dialect| {
        let (mut b, mut c) = match dialect {
            Dialect::DmPcache => ImageBuilder::format_dm(GIB, true).unwrap(),
            Dialect::RfcV1 => {
                let mut b = ImageBuilder::format(GIB).unwrap();
                let c = b.add_cache(0, b"/dev/b", 64 << 20, 8, true).unwrap();
                (b, c)
            }
        };
        c.write(&mut b, 0, &[1u8; 4096], false).unwrap();
        c.close(&mut b).unwrap();
        let seg = c.chain()[1];
        let layout = b.layout();
        let mut pair = [0u8; 32];
        encode_copy(dialect, &CacheSegGen::new(1), 3, &mut pair[..16]).unwrap();
        encode_copy(dialect, &CacheSegGen::new(1), 4, &mut pair[16..]).unwrap();
        b.image_mut().write_at(layout.ctrl_offset(seg).unwrap(), &pair).unwrap();
        b.image_mut().write_at(layout.data_offset(seg).unwrap(), &[2u8; 4096]).unwrap();
        scan(b.image(), ScanOptions::default())
    };
    let dm = build(Dialect::DmPcache);
    assert_eq!(dm.backings[0].log.as_ref().unwrap().stale_keys, 1);
    assert!(dm.findings.iter().any(|f| matches!(f.issue, Issue::DataCrc { .. })), "{:?}", problems(&dm));
    let rfc = build(Dialect::RfcV1);
    assert_eq!(rfc.backings[0].log.as_ref().unwrap().stale_keys, 1);
    assert_eq!(problems(&rfc), Vec::<String>::new());
}
