//! Group commit on a device that makes everything durable in one call (an
//! msync'd file): data is stored without a fence of its own and made durable
//! with its kset, so a flush or FUA write costs one sync for many writes,
//! and what the NBD contract promises still holds after a power failure.

use std::sync::Arc;
use std::time::Duration;

use pcache_pmem::format::format;
use pcache_pmem::testing::{CrashStrategy, MemBacking, SimPmem};
use pcache_pmem::{Cache, CacheDev, CacheOptions};

const MIB: u64 = 1 << 20;

fn opts() -> CacheOptions {
    CacheOptions {
        cache_size: Some(320 * MIB),
        kset_flush_delay: Duration::from_secs(3600),
        background: false,
        data_crc: true,
        ..Default::default()
    }
}

fn block(i: u64) -> Vec<u8> {
    (0..4096u64).map(|b| (b as u8) ^ (i as u8).wrapping_mul(7)).collect()
}

type TestCache = Cache<SimPmem, Arc<MemBacking>>;

/// A cache with `opts` on a fresh simulated device (making everything
/// durable in one call if `bulk`), in front of a 64 MiB backing.
fn start(bulk: bool, opts: &CacheOptions) -> (Arc<TestCache>, Arc<CacheDev<SimPmem>>, Arc<MemBacking>) {
    let pmem = SimPmem::new(1 << 30);
    pmem.set_bulk_sync(bulk);
    format(&pmem, false).unwrap();
    let dev = CacheDev::open(pmem).unwrap();
    let backing = Arc::new(MemBacking::new("/gc/backing", 64 * MIB));
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), opts).unwrap();
    (cache, dev, backing)
}

/// Power fails now, under `cache`: the cache recovered from what survives.
fn after_power_failure<C>(cache: C, dev: &CacheDev<SimPmem>, backing: Arc<MemBacking>) -> Arc<TestCache> {
    let img = dev.pmem().snapshot().image(CrashStrategy::NothingExtra);
    drop(cache);
    img.set_bulk_sync(true);
    let dev = CacheDev::open(img).unwrap();
    Cache::start(dev, backing, &opts()).unwrap().0
}

/// Power fails now, under `cache`: every block of `blocks` reads back
/// after recovery.
fn all_there<C>(cache: C, dev: &CacheDev<SimPmem>, backing: Arc<MemBacking>, blocks: std::ops::Range<u64>) {
    let cache = after_power_failure(cache, dev, backing);
    let mut buf = vec![0u8; 4096];
    for i in blocks {
        cache.read(i * 8192, &mut buf).unwrap();
        assert_eq!(buf, block(i), "block {i}");
    }
    cache.stop().unwrap();
}

/// 100 writes and a flush; returns the fences that took and the device.
fn hundred_writes(bulk: bool) -> (u64, Arc<CacheDev<SimPmem>>, Arc<MemBacking>) {
    let (cache, dev, backing) = start(bulk, &opts());
    let before = dev.pmem().fence_count();
    for i in 0..100 {
        cache.write(i * 8192, &block(i), false).unwrap();
    }
    cache.flush().unwrap();
    let fences = dev.pmem().fence_count() - before;
    cache.stop().unwrap();
    (fences, dev, backing)
}

#[test]
fn a_flush_commits_many_writes_with_one_sync() {
    let (per_write, _, _) = hundred_writes(false);
    let (grouped, dev, backing) = hundred_writes(true);
    assert!(per_write >= 100, "{per_write} fences: one per write at least");
    assert!(grouped <= 5, "{grouped} fences for 100 writes and a flush");
    // Power fails right after the flush: all of it is there.
    all_there((), &dev, backing, 0..100);
}

#[test]
fn a_fua_write_is_durable_when_it_returns_and_unflushed_ones_may_go() {
    let (cache, dev, backing) = start(true, &opts());
    cache.write(0, &block(1), false).unwrap();
    cache.write(8192, &block(2), true).unwrap();
    // Stored, never committed: a power failure may take it (and here does).
    cache.write(16384, &block(3), false).unwrap();
    let cache = after_power_failure(cache, &dev, backing);
    let mut buf = vec![0u8; 4096];
    // The FUA write closed the kset holding both earlier writes' keys.
    cache.read(0, &mut buf).unwrap();
    assert_eq!(buf, block(1));
    cache.read(8192, &mut buf).unwrap();
    assert_eq!(buf, block(2));
    cache.read(16384, &mut buf).unwrap();
    assert_eq!(buf, vec![0u8; 4096], "never flushed, never durable");
    cache.stop().unwrap();
}

/// A cache on a bulk-sync device with one queue, without background work
/// (so that sealed ksets wait for the writer that seals the fourth).
fn one_queue() -> (Arc<TestCache>, Arc<CacheDev<SimPmem>>, Arc<MemBacking>) {
    start(true, &CacheOptions { queues: 1, ..opts() })
}

#[test]
fn full_ksets_are_sealed_and_stored_with_one_sync_each() {
    let (cache, dev, backing) = one_queue();
    // The first write takes a data segment; the next 127 fill its kset.
    cache.write(0, &block(0), false).unwrap();
    let before = dev.pmem().fence_count();
    let fences = || dev.pmem().fence_count() - before;
    for i in 1..128 * 3 {
        cache.write(i * 8192, &block(i), false).unwrap();
    }
    assert_eq!(fences(), 0, "three full ksets sealed, no writer waited for a sync");
    for i in 128 * 3..128 * 4 {
        cache.write(i * 8192, &block(i), false).unwrap();
    }
    assert_eq!(fences(), 4, "the writer that sealed the fourth stored all four, one sync each");
    cache.flush().unwrap();
    assert_eq!(fences(), 5, "one sync for the kset stored last");
    cache.flush().unwrap();
    assert_eq!(fences(), 5, "nothing stored since: no sync");
    all_there(cache, &dev, backing, 0..128 * 4);
}

#[test]
fn a_fua_write_stores_the_sealed_ksets_before_it() {
    let (cache, dev, backing) = one_queue();
    for i in 0..128 * 2 {
        cache.write(i * 8192, &block(i), false).unwrap();
    }
    cache.write(128 * 2 * 8192, &block(128 * 2), true).unwrap();
    all_there(cache, &dev, backing, 0..128 * 2 + 1);
}
