//! Writeback, GC, back-pressure and detach.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pcache_pmem::format::format;
use pcache_pmem::testing::{CrashStrategy, FaultyBacking, MemBacking, SimPmem};
use pcache_pmem::{Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, EngineError, FileBacking, detach};

const MIB: u64 = 1 << 20;

/// A pmem device on a file in /dev/shm (or the temp dir), treated as pmem.
fn shm_dev(size: u64) -> (tempfile::NamedTempFile, Arc<CacheDev<DaxMapping>>) {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(size).unwrap();
    let map = DaxMapping::open(f.path(), &DaxOptions { force_pmem: Some(true), ..Default::default() }).unwrap();
    format(&map, false).unwrap();
    (f, CacheDev::open(map).unwrap())
}

fn rng(x: &mut u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *x >> 17
}

fn small_cache() -> CacheOptions {
    CacheOptions {
        cache_size: Some(160 * MIB), // 10 segments
        kset_flush_delay: Duration::from_millis(20),
        self_check: true,
        ..Default::default()
    }
}

#[test]
fn three_times_the_cache_then_detach() {
    let (_f, dev) = shm_dev(768 * MIB);
    let size = 96 * MIB;
    // A real backing file: after detach, the file alone must hold the data.
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(size).unwrap();
    let backing = Arc::new(FileBacking::open(file.path()).unwrap());
    let mut model = vec![0u8; size as usize];
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &small_cache()).unwrap();
    let mut x = 42;
    let mut written = 0u64;
    let mut i = 0u64;
    while written < 3 * 160 * MIB {
        i += 1;
        let len = 512 * (1 + rng(&mut x) % 128) as usize;
        let off = (rng(&mut x) % ((size - len as u64) / 512)) * 512;
        if i.is_multiple_of(3) {
            let mut buf = vec![0u8; len];
            cache.read(off, &mut buf).unwrap();
            assert!(buf == model[off as usize..off as usize + len], "read at {off} after {written} bytes written");
        } else {
            let data = vec![(i % 251) as u8 + 1; len];
            if let Err(e) = cache.write(off, &data, i.is_multiple_of(97)) {
                panic!("write {i} at {off} after {written} bytes: {e}; {:?} {:?}", cache.stats(), cache.health());
            }
            model[off as usize..off as usize + len].copy_from_slice(&data);
            written += len as u64;
        }
    }
    let s = cache.stats();
    assert!(s.segments_freed > 10, "GC reclaimed segments over and over: {s:?}");
    assert!(s.ksets_written_back > 0 && s.bytes_written_back > 0, "{s:?}");
    assert_eq!(cache.health(), Default::default());
    cache.check_invariants().unwrap();
    // Every byte still reads right, from the cache or the backing device.
    let mut all = vec![0u8; size as usize];
    cache.read(0, &mut all).unwrap();
    assert!(all == model);
    cache.stop().unwrap();
    drop(cache);

    let mut seen = Vec::new();
    let report = detach(&dev, backing.clone(), |done, total| seen.push((done, total))).unwrap();
    assert_eq!(report.segments_released, 10);
    drop(backing);
    assert!(std::fs::read(file.path()).unwrap() == model, "after detach the backing file alone holds every write");
    let backing = Arc::new(FileBacking::open(file.path()).unwrap());
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "progress only grows: {seen:?}");
    assert_eq!(dev.backings().unwrap().len(), 0);
    assert_eq!(dev.free_segments(), 46, "all 46 cache segments of the device are free again");
    let r = pcache_format::image::scan(&pcache_pmem::AsMedia(dev.pmem()), Default::default());
    assert_eq!(r.problems(), 0, "{:?}", r.findings);
    // The next start of that path is a new, empty cache.
    let (cache, rep) = Cache::start(dev.clone(), backing.clone(), &small_cache()).unwrap();
    assert!(rep.new);
    assert_eq!(cache.stats().keys, 0);
    let err = detach(&dev, Arc::new(MemBacking::new("/wb/other", MIB)), |_, _| {}).unwrap_err();
    assert!(matches!(err, EngineError::NoCache { .. }), "{err}");
}

/// Counts the bytes where two images differ, kept up to date as either changes.
struct Diff {
    model: Vec<u8>,
    differing: usize,
}

impl Diff {
    fn new(model: Vec<u8>, backing: &[u8]) -> Self {
        let differing = model.iter().zip(backing).filter(|(a, b)| a != b).count();
        Self { model, differing }
    }

    fn apply(&mut self, off: usize, data: &[u8], backing: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let (was, now) = (self.model[off + i] != backing[off + i], *b != backing[off + i]);
            self.differing = self.differing + now as usize - was as usize;
            self.model[off + i] = *b;
        }
    }
}

#[test]
fn backing_always_holds_a_prefix_of_the_history() {
    let pmem = SimPmem::new(512 * MIB);
    format(&pmem, false).unwrap();
    let dev = CacheDev::open(pmem).unwrap();
    let size = 8 * MIB;
    let backing = Arc::new(MemBacking::new("/wb/prefix", size));
    let opts = CacheOptions {
        background: false,
        cache_size: Some(512 * MIB - 32 * MIB),
        kset_flush_delay: Duration::from_secs(3600),
        ..Default::default()
    };
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &opts).unwrap();
    let mut history: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut x = 7;
    for i in 0..3000u64 {
        let len = 512 * (1 + rng(&mut x) % 16) as usize;
        let off = (rng(&mut x) % ((size - len as u64) / 512)) * 512;
        let data = vec![(i % 250) as u8 + 1; len];
        cache.write(off, &data, false).unwrap();
        history.push((off, data));
        if rng(&mut x).is_multiple_of(20) {
            cache.flush().unwrap();
        }
    }
    cache.flush().unwrap();
    // Write back one kset at a time: after each, the backing device equals
    // the model after some prefix of the writes, and the prefix only grows.
    let mut applied = 0usize;
    let contents = backing.contents();
    let mut diff = Diff::new(vec![0u8; size as usize], &contents);
    let mut steps = 0;
    while cache.write_back_ksets(1).unwrap() > 0 {
        steps += 1;
        let contents = backing.contents();
        diff = Diff::new(diff.model, &contents);
        while diff.differing != 0 && applied < history.len() {
            let (off, data) = &history[applied];
            diff.apply(*off as usize, data, &contents);
            applied += 1;
        }
        assert_eq!(diff.differing, 0, "after {steps} ksets the backing device is no prefix of the history");
    }
    assert_eq!(applied, history.len(), "everything was written back");
    assert!(steps > 30);
}

/// The dirty tail as persisted on the device, read back with the format
/// crate's scan.
fn persisted_dirty_tail(dev: &CacheDev<DaxMapping>) -> (u32, u32) {
    let r = pcache_format::image::scan(&pcache_pmem::AsMedia(dev.pmem()), Default::default());
    let t = r.backings[0].dirty_tail.expect("a valid dirty tail");
    (t.cache_seg_id.get(), t.seg_off.get())
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn failing_backing_device_loses_nothing_and_recovers() {
    let (_f, dev) = shm_dev(768 * MIB);
    let size = 64 * MIB;
    let backing = Arc::new(FaultyBacking::new(MemBacking::new("/wb/faulty", size)));
    let opts = CacheOptions { stall_timeout: Duration::from_secs(60), ..small_cache() };
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &opts).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut write = |cache: &Cache<DaxMapping, Arc<FaultyBacking<MemBacking>>>, i: u64| {
        let off = (i * 7919 % (size / 65536)) * 65536;
        let data = vec![(i % 250) as u8 + 1; 65536];
        cache.write(off, &data, false).unwrap();
        model[off as usize..off as usize + 65536].copy_from_slice(&data);
    };
    for i in 0..500 {
        write(&cache, i);
    }
    cache.flush().unwrap();
    wait_for("writeback never caught up", 30, || cache.stats().dirty_bytes == 0);
    let tail = persisted_dirty_tail(&dev);
    // Writes start failing partway through the next batch: some of its
    // keys reach the backing device, the rest do not.
    backing.fail_writes_after(5);
    for i in 500..900 {
        write(&cache, i);
    }
    cache.flush().unwrap();
    wait_for("writeback never tried", 20, || cache.stats().writeback_errors >= 3);
    let stuck = cache.stats();
    assert!(stuck.dirty_bytes > 0);
    assert!(backing.refused.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    assert_eq!(persisted_dirty_tail(&dev), tail, "the dirty tail holds still while writes fail");
    let h = cache.health();
    assert!(h.writeback_failing.as_deref().unwrap_or("").contains("Input/output error"), "{h:?}");
    // Reads are still right while writeback is stuck.
    let mut all = vec![0u8; size as usize];
    cache.read(0, &mut all).unwrap();
    assert!(all == model);
    // Syncs failing instead of writes: every write of the batch lands, the
    // sync fails, and the dirty tail still does not move.
    let errors = cache.stats().writeback_errors;
    let refused = backing.refused.load(std::sync::atomic::Ordering::SeqCst);
    backing.fail_syncs(true);
    backing.fail_writes(false);
    wait_for("no failing sync was tried", 20, || {
        cache.stats().writeback_errors >= errors + 2
            && backing.refused.load(std::sync::atomic::Ordering::SeqCst) >= refused + 2
    });
    assert!(cache.stats().dirty_bytes >= stuck.dirty_bytes);
    assert_eq!(persisted_dirty_tail(&dev), tail, "the dirty tail holds still while syncs fail");
    assert!(cache.health().writeback_failing.as_deref().unwrap_or("").contains("fdatasync"), "{:?}", cache.health());
    backing.fail_syncs(false);
    wait_for("writeback did not resume", 30, || cache.stats().dirty_bytes == 0);
    assert_ne!(persisted_dirty_tail(&dev), tail, "the dirty tail moves again");
    assert_eq!(cache.health().writeback_failing, None);
    cache.stop().unwrap();
    drop(cache);
    detach(&dev, backing.clone(), |_, _| {}).unwrap();
    assert!(backing.inner().contents() == model);
}

#[test]
fn writers_wait_for_space_then_resume() {
    let (_f, dev) = shm_dev(768 * MIB);
    let backing = Arc::new(FaultyBacking::new(MemBacking::new("/wb/full", 512 * MIB)));
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &small_cache()).unwrap();
    backing.fail_writes(true);
    let writer = {
        let cache = cache.clone();
        std::thread::spawn(move || {
            // 320 MiB: twice the cache, impossible without writeback.
            for i in 0..320u64 {
                cache.write(i * MIB, &vec![(i % 250) as u8 + 1; MIB as usize], false).unwrap();
            }
        })
    };
    let t = Instant::now();
    while cache.stats().segments_used < cache.stats().segments - 1 {
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", cache.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!writer.is_finished(), "the writer must be waiting for space");
    backing.fail_writes(false);
    writer.join().unwrap();
    for i in (0..320u64).step_by(37) {
        let mut buf = vec![0u8; MIB as usize];
        cache.read(i * MIB, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == (i % 250) as u8 + 1), "MiB {i}");
    }
}

#[test]
fn writes_fail_clearly_when_no_progress_is_possible() {
    let (_f, dev) = shm_dev(768 * MIB);
    let backing = Arc::new(FaultyBacking::new(MemBacking::new("/wb/stalled", 512 * MIB)));
    let opts = CacheOptions { stall_timeout: Duration::from_millis(300), ..small_cache() };
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &opts).unwrap();
    backing.fail_writes(true);
    let mut err = None;
    for i in 0..320u64 {
        if let Err(e) = cache.write(i * MIB, &vec![1u8; MIB as usize], false) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("a write must fail once the cache cannot free space");
    assert!(matches!(err, EngineError::Stalled(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("cannot free space") && msg.contains("Input/output error"), "{msg}");
    // Nothing written before was lost: once the device works, it all goes back.
    backing.fail_writes(false);
    cache.stop().unwrap();
    drop(cache);
    detach(&dev, backing.clone(), |_, _| {}).unwrap();
}

#[test]
fn gc_percent_is_persisted() {
    let pmem = SimPmem::new(512 * MIB);
    format(&pmem, false).unwrap();
    let dev = CacheDev::open(pmem).unwrap();
    let backing = Arc::new(MemBacking::new("/wb/gc", 16 * MIB));
    let (cache, rep) = Cache::start(dev.clone(), backing.clone(), &small_cache()).unwrap();
    assert_eq!(rep.gc_percent, 70);
    cache.set_gc_percent(35).unwrap();
    assert_eq!(cache.gc_percent(), 35);
    assert!(cache.set_gc_percent(91).is_err());
    drop(cache);
    // Survives a crash, not only a graceful stop.
    let image = dev.pmem().crash_image(CrashStrategy::NothingExtra);
    let dev = CacheDev::open(image).unwrap();
    let (cache, rep) = Cache::start(dev.clone(), backing.clone(), &small_cache()).unwrap();
    assert_eq!((rep.gc_percent, cache.gc_percent()), (35, 35));
    let entry = dev.backings().unwrap()[0].1;
    assert_eq!(entry.cache_info.gc_percent.get(), 35);
}

#[test]
fn gc_never_passes_the_dirty_tail() {
    let pmem = SimPmem::new(512 * MIB);
    format(&pmem, false).unwrap();
    let dev = CacheDev::open(pmem).unwrap();
    let backing = Arc::new(MemBacking::new("/wb/manual", 64 * MIB));
    let opts = CacheOptions { background: false, gc_percent: Some(0), ..small_cache() };
    let (cache, _) = Cache::start(dev.clone(), backing.clone(), &opts).unwrap();
    for i in 0..64u64 {
        cache.write(i * MIB, &vec![3u8; MIB as usize], false).unwrap();
    }
    cache.flush().unwrap();
    assert_eq!(cache.gc().unwrap(), 0, "nothing is written back yet");
    assert!(backing.contents().iter().all(|&b| b == 0));
    cache.write_back_ksets(1).unwrap();
    let n = cache.gc().unwrap();
    assert_eq!(n, 1, "GC stops at the dirty tail");
    cache.check_invariants().unwrap();
    cache.write_back(|_, _| {}).unwrap();
    assert!(cache.gc().unwrap() > 0);
    cache.check_invariants().unwrap();
    let mut buf = vec![0u8; MIB as usize];
    cache.read(63 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
}
