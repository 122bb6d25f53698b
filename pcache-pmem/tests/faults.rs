//! Faults: a backing device that fails reads, pmem with media errors.
//! (Backing write and sync errors during writeback, and a full cache with
//! writeback stalled, are in writeback.rs.)

use std::sync::Arc;
use std::time::Duration;

use pcache_format::image::{ScanOptions, scan};
use pcache_pmem::format::format;
use pcache_pmem::testing::{FaultyBacking, MemBacking, SimPmem};
use pcache_pmem::{AsMedia, BackingDev, Cache, CacheDev, CacheOptions, EngineError, PmemError};

const MIB: u64 = 1 << 20;

fn opts() -> CacheOptions {
    CacheOptions {
        cache_size: Some(256 * MIB),
        kset_flush_delay: Duration::from_secs(3600),
        background: false,
        ..Default::default()
    }
}

fn device() -> Arc<CacheDev<SimPmem>> {
    let pmem = SimPmem::new(512 * MIB);
    format(&pmem, false).unwrap();
    CacheDev::open(pmem).unwrap()
}

#[test]
fn backing_read_errors_fail_the_read_and_leave_the_cache_alone() {
    let dev = device();
    let backing = Arc::new(FaultyBacking::new(MemBacking::new("/faults/read", 16 * MIB)));
    backing.inner().write_at(0, &vec![0x33u8; 16 * MIB as usize]).unwrap();
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &opts()).unwrap();
    cache.write(0, &[0x44u8; 4096], false).unwrap();
    let before = cache.stats();
    backing.fail_reads(true);
    let mut buf = vec![0u8; 8192];
    let err = cache.read(0, &mut buf).unwrap_err(); // half cached, half a miss
    assert!(matches!(err, EngineError::Backing(_)), "{err}");
    assert!(err.to_string().contains("Input/output error"), "{err}");
    let err = cache.read(MIB, &mut buf).unwrap_err();
    assert!(matches!(err, EngineError::Backing(_)), "{err}");
    // Nothing was cached for the failed misses, and no placeholder was left.
    let after = cache.stats();
    assert_eq!((after.keys, after.clean_bytes), (before.keys, before.clean_bytes));
    // Cached data still reads while the device fails.
    let mut hit = vec![0u8; 4096];
    cache.read(0, &mut hit).unwrap();
    assert_eq!(hit, vec![0x44u8; 4096]);
    // Once the device works, the same reads succeed and fill the cache.
    backing.fail_reads(false);
    cache.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &[0x44u8; 4096][..]);
    assert_eq!(&buf[4096..], &[0x33u8; 4096][..]);
    cache.read(MIB, &mut buf).unwrap();
    assert_eq!(buf, vec![0x33u8; 8192]);
    assert!(cache.stats().clean_bytes > before.clean_bytes);
    cache.flush().unwrap();
    let r = scan(&AsMedia(dev.pmem()), ScanOptions::default());
    assert_eq!(r.problems(), 0, "{:?}", r.findings);
}

#[test]
fn pmem_media_errors_fail_only_the_reads_they_touch() {
    let dev = device();
    let backing = Arc::new(MemBacking::new("/faults/media", 16 * MIB));
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &opts()).unwrap();
    cache.write(0, &[1u8; 4096], false).unwrap();
    cache.write(MIB, &[2u8; 4096], false).unwrap();
    cache.flush().unwrap();
    // The first key's data is the first data written: cache segment 1's data area.
    let r = scan(&AsMedia(dev.pmem()), ScanOptions::default());
    let seg = r.backings[0].chain[1].dev_seg;
    let data = dev.layout().data_offset(seg).unwrap();
    dev.pmem().inject_media_error(data + 100, 8).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = cache.read(0, &mut buf).unwrap_err();
    assert!(matches!(err, EngineError::Pmem(PmemError::Media { .. })), "{err}");
    assert!(err.to_string().contains("media error"), "{err}");
    // The other key lives elsewhere and still reads; the process goes on.
    cache.read(MIB, &mut buf).unwrap();
    assert_eq!(buf, vec![2u8; 4096]);
    cache.write(2 * MIB, &[3u8; 4096], true).unwrap();
    cache.read(2 * MIB, &mut buf).unwrap();
    assert_eq!(buf, vec![3u8; 4096]);
    // Writeback of the damaged key fails and is retried, not skipped.
    let err = cache.write_back(|_, _| {}).unwrap_err();
    assert!(matches!(err, EngineError::Pmem(PmemError::Media { .. })), "{err}");
    assert!(backing.contents()[..4096].iter().all(|&b| b == 0), "nothing garbled was written back");
    dev.pmem().clear_media_errors();
    cache.write_back(|_, _| {}).unwrap();
    assert_eq!(&backing.contents()[..4096], &[1u8; 4096][..]);
}

#[test]
fn media_error_in_the_key_log_fails_the_start_cleanly() {
    let dev = device();
    let backing = Arc::new(MemBacking::new("/faults/log", 16 * MIB));
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &opts()).unwrap();
    cache.write(0, &[1u8; 4096], true).unwrap();
    cache.stop().unwrap();
    drop(cache);
    let r = scan(&AsMedia(dev.pmem()), ScanOptions::default());
    let log = dev.layout().data_offset(r.backings[0].chain[0].dev_seg).unwrap();
    dev.pmem().inject_media_error(log, 24).unwrap();
    let err = Cache::start(dev.clone(), backing.clone(), &opts()).unwrap_err();
    assert!(matches!(err, EngineError::Pmem(PmemError::Media { .. })), "{err}");
    dev.pmem().clear_media_errors();
    let (cache, rep) = Cache::start(dev.clone(), backing, &opts()).unwrap();
    assert_eq!(rep.replay.keys, 1);
    let mut buf = vec![0u8; 4096];
    cache.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![1u8; 4096]);
}

#[test]
fn failed_fences_fail_requests_and_gc_steps_without_damage() {
    let dev = device();
    let backing = Arc::new(MemBacking::new("/faults/fence", 16 * MIB));
    let o = CacheOptions { gc_percent: Some(0), self_check: true, ..opts() };
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &o).unwrap();
    // Kset A: eight keys in one data segment, written back.
    for i in 0..8u64 {
        cache.write(i * 4096, &[0xa0 + i as u8; 4096], false).unwrap();
    }
    cache.flush().unwrap();
    assert_eq!(cache.write_back_ksets(1).unwrap(), 1);
    // Kset B: four dirty keys in the same data segment.
    for i in 0..4u64 {
        cache.write(MIB + i * 4096, &[0xb0 + i as u8; 4096], false).unwrap();
    }
    cache.flush().unwrap();
    // A write whose data cannot be made durable fails, and so does a GC
    // step whose key tail cannot be.
    dev.pmem().fail_fences(1);
    let err = cache.write(2 * MIB, &[1u8; 4096], false).unwrap_err();
    assert!(matches!(err, EngineError::Pmem(PmemError::Io { .. })), "{err}");
    dev.pmem().fail_fences(1);
    let err = cache.gc().unwrap_err();
    assert!(matches!(err, EngineError::Pmem(PmemError::Io { .. })), "{err}");
    // The retry consumes kset A once: B's segment keeps B's references.
    assert_eq!(cache.gc().unwrap(), 1);
    cache.check_invariants().unwrap();
    assert_eq!(cache.stats().segments_freed, 0, "the data segment is still referenced");
    cache.write_back(|_, _| {}).unwrap();
    let contents = backing.contents();
    for i in 0..8u64 {
        let at = (i * 4096) as usize;
        assert!(contents[at..at + 4096].iter().all(|&b| b == 0xa0 + i as u8), "key {i} of A");
        let at = (MIB + i.min(3) * 4096) as usize;
        assert!(contents[at..at + 4096].iter().all(|&b| b == 0xb0 + i.min(3) as u8), "key of B");
    }
    let mut buf = vec![0u8; 4096];
    cache.read(MIB + 3 * 4096, &mut buf).unwrap();
    assert_eq!(buf, vec![0xb3u8; 4096]);
}
