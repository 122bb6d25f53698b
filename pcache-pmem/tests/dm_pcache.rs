//! The engine on a dm-pcache device: it runs the one cache the kernel
//! would, persists what the kernel keeps, refuses what the kernel would
//! not load, and the rescue writes a cache back without the kernel.

use std::sync::Arc;
use std::time::Duration;

use pcache_format::dm::DM_CACHE_INFO_OFF;
use pcache_format::media::read_dm_cache_info;
use pcache_format::{CachePos, Dialect};
use pcache_pmem::dm_rescue::dm_writeback;
use pcache_pmem::format::{format_dm, format_dm_segments};
use pcache_pmem::records::write_record;
use pcache_pmem::testing::rig::check_image;
use pcache_pmem::testing::{CrashStrategy, MemBacking, SimPmem};
use pcache_pmem::{AsMedia, BackingDev, Cache, CacheDev, CacheOptions, Pmem};

const MIB: u64 = 1 << 20;

fn opts() -> CacheOptions {
    CacheOptions { kset_flush_delay: Duration::from_secs(3600), background: false, ..Default::default() }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A dm-pcache device of 512 MiB with a cache of `segs` segments.
fn device(segs: u32, data_crc: bool) -> Arc<CacheDev<SimPmem>> {
    let pmem = SimPmem::new(512 * MIB);
    format_dm_segments(&pmem, data_crc, false, segs).unwrap();
    CacheDev::open(pmem).unwrap()
}

#[test]
fn runs_the_one_cache_whatever_backing_is_named() {
    let dev = device(31, true);
    let backing = Arc::new(MemBacking::new("/any/name", 64 * MIB));
    let (cache, rep) = Cache::start(dev.clone(), backing.clone(), &opts()).unwrap();
    assert!(!rep.new, "the cache exists from the format on");
    assert!(rep.data_crc, "as the device says");
    assert_eq!(rep.n_segs, 31);
    cache.write(0, &pattern(1, 64 * 1024), false).unwrap();
    cache.write(8 * MIB, &pattern(2, 4096), true).unwrap();
    cache.flush().unwrap();
    cache.stop().unwrap();
    drop(cache);
    check_image(dev.pmem()).unwrap();
    // Power is cut; the image comes back under another name for the backing.
    let img = dev.pmem().snapshot().image(CrashStrategy::NothingExtra);
    drop(dev);
    let dev = CacheDev::open(img).unwrap();
    let (cache, rep) = Cache::start(dev.clone(), Arc::new(MemBacking::new("/other", 64 * MIB)), &opts()).unwrap();
    assert!(rep.replay.keys >= 2, "{:?}", rep.replay);
    let mut buf = vec![0u8; 64 * 1024];
    cache.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 64 * 1024));
    let mut buf = vec![0u8; 4096];
    cache.read(8 * MIB, &mut buf).unwrap();
    assert_eq!(buf, pattern(2, 4096));
    // A second start of the one cache in this process is refused.
    assert!(Cache::start(dev.clone(), Arc::new(MemBacking::new("/third", 64 * MIB)), &opts()).is_err());
    cache.stop().unwrap();
}

#[test]
fn gc_percent_is_kept_in_the_cache_info() {
    let dev = device(31, false);
    let (cache, _) = Cache::start(dev.clone(), Arc::new(MemBacking::new("/b", 16 * MIB)), &opts()).unwrap();
    cache.set_gc_percent(25).unwrap();
    cache.stop().unwrap();
    let pair = read_dm_cache_info(&AsMedia(dev.pmem()), dev.layout()).unwrap();
    let ci = pair.latest.unwrap().record;
    assert_eq!((ci.gc_percent(), ci.init_done(), ci.data_crc()), (25, true, false));
    check_image(dev.pmem()).unwrap();
}

#[test]
fn refuses_what_the_kernel_would_start_anew() {
    // Both cache-info copies gone.
    let pmem = SimPmem::new(512 * MIB);
    format_dm(&pmem, false, false).unwrap();
    pmem.zero_persist(DM_CACHE_INFO_OFF, 8192).unwrap();
    let err = CacheDev::open(pmem).unwrap_err().to_string();
    assert!(err.contains("new, empty cache"), "{err}");
    // INIT_DONE not set.
    let pmem = SimPmem::new(512 * MIB);
    format_dm(&pmem, false, false).unwrap();
    let layout = pcache_format::media::read_superblock(&AsMedia(&pmem)).unwrap();
    let ci = read_dm_cache_info(&AsMedia(&pmem), &layout).unwrap().latest.unwrap().record;
    let mut raw = ci;
    raw.flags = (ci.flags.get() & !pcache_format::dm::cache_flags::INIT_DONE).into();
    write_record(&pmem, Dialect::DmPcache, DM_CACHE_INFO_OFF, &raw).unwrap();
    write_record(&pmem, Dialect::DmPcache, DM_CACHE_INFO_OFF, &raw).unwrap();
    let err = CacheDev::open(pmem).unwrap_err().to_string();
    assert!(err.contains("INIT_DONE"), "{err}");
}

/// A cache with dirty data: two overlapping writes (the later wins), none
/// written back.
fn dirty_device() -> (Arc<CacheDev<SimPmem>>, Vec<u8>) {
    let dev = device(31, true);
    let backing = Arc::new(MemBacking::new("/b", 16 * MIB));
    let (cache, _) = Cache::start(dev.clone(), backing, &opts()).unwrap();
    cache.write(MIB, &pattern(3, 256 * 1024), false).unwrap();
    cache.write(MIB + 4096, &pattern(4, 8192), false).unwrap();
    cache.flush().unwrap();
    cache.stop().unwrap();
    let mut want = vec![0u8; 16 * MIB as usize];
    want[MIB as usize..MIB as usize + 256 * 1024].copy_from_slice(&pattern(3, 256 * 1024));
    want[MIB as usize + 4096..MIB as usize + 4096 + 8192].copy_from_slice(&pattern(4, 8192));
    (dev, want)
}

#[test]
fn the_rescue_writes_back_in_log_order_and_keeps_the_cache() {
    let (dev, want) = dirty_device();
    let backing = MemBacking::new("/rescued", 16 * MIB);
    // A dry run writes nothing.
    let dry = dm_writeback(dev.pmem(), &backing, true, |_, _| {}).unwrap();
    assert!(!dry.written && dry.bytes >= 256 * 1024 + 8192, "{dry:?}");
    assert!(backing.contents().iter().all(|&b| b == 0));
    // Too small a backing device: refused, nothing written.
    let small = MemBacking::new("/small", MIB);
    assert!(dm_writeback(dev.pmem(), &small, false, |_, _| {}).is_err());
    assert!(small.contents().iter().all(|&b| b == 0));
    let done = dm_writeback(dev.pmem(), &backing, false, |_, _| {}).unwrap();
    assert!(done.written);
    assert_eq!(backing.contents(), want);
    check_image(dev.pmem()).unwrap();
    // The cache is clean now, and kept: the next start has it all cached.
    let again = dm_writeback(dev.pmem(), &backing, false, |_, _| {}).unwrap();
    assert!(!again.written && again.extents.is_empty(), "{again:?}");
    let (cache, rep) = Cache::start(dev.clone(), Arc::new(backing), &opts()).unwrap();
    assert!(rep.replay.keys >= 2);
    assert_eq!(cache.stats().dirty_bytes, 0);
    cache.stop().unwrap();
}

#[test]
fn the_rescue_refuses_a_damaged_cache_and_writes_nothing() {
    let (dev, _) = dirty_device();
    // The dirty tail pointed past the log's end: `pcache check` finds it.
    let layout = dev.layout();
    let (_, dirty_tail) = layout.tail_offsets(0).unwrap();
    write_record(dev.pmem(), Dialect::DmPcache, dirty_tail, &CachePos::new(0, 1 << 20)).unwrap();
    let backing = MemBacking::new("/b", 16 * MIB);
    let err = dm_writeback(dev.pmem(), &backing, false, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("nothing was written"), "{err}");
    assert!(backing.contents().iter().all(|&b| b == 0));
    assert_eq!(backing.size(), 16 * MIB);
}
