//! The cache engine, case by case: overlaps, read hits and misses, slices
//! and segments, durability points, data CRCs, start options, concurrency.

use std::sync::Arc;
use std::time::Duration;

use pcache_format::image::{ScanOptions, scan};
use pcache_pmem::format::format;
use pcache_pmem::testing::{CrashStrategy, MemBacking, SimPmem};
use pcache_pmem::{AsMedia, BackingDev, Cache, CacheDev, CacheOptions, EngineError, Pmem};

const MIB: u64 = 1 << 20;

type TestCache = Arc<Cache<SimPmem, Arc<MemBacking>>>;

struct Rig {
    dev: Arc<CacheDev<SimPmem>>,
    backing: Arc<MemBacking>,
}

fn opts() -> CacheOptions {
    CacheOptions { cache_size: Some(320 * MIB), kset_flush_delay: Duration::from_secs(3600), ..Default::default() }
}

impl Rig {
    fn new(backing_size: u64) -> Self {
        let pmem = SimPmem::new(1 << 30);
        format(&pmem, false).unwrap();
        let backing = Arc::new(MemBacking::new("/rig/backing", backing_size));
        let original: Vec<u8> = (0..backing_size).map(|o| (o % 251) as u8).collect();
        backing.write_at(0, &original).unwrap();
        Self { dev: CacheDev::open(pmem).unwrap(), backing }
    }

    fn start(&self, o: &CacheOptions) -> TestCache {
        Cache::start(self.dev.clone(), self.backing.clone(), o).unwrap().0
    }

    /// Simulates a power failure: a crash image of the pmem, reopened.
    fn crash(&mut self, cache: TestCache, strategy: CrashStrategy) {
        let image = self.dev.pmem().crash_image(strategy);
        drop(cache);
        self.dev = CacheDev::open(image).unwrap();
    }

    fn check_clean(&self) {
        let r = scan(&AsMedia(self.dev.pmem()), ScanOptions::default());
        assert_eq!(r.problems(), 0, "{:?}", r.findings);
    }
}

fn orig(off: u64, len: usize) -> Vec<u8> {
    (off..off + len as u64).map(|o| (o % 251) as u8).collect()
}

fn read(c: &TestCache, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    c.read(off, &mut buf).unwrap();
    buf
}

#[test]
fn overlap_cases_through_the_engine() {
    let rig = Rig::new(16 * MIB);
    let c = rig.start(&opts());
    let base = 4096u64;
    // T = [base, base + 16 KiB) of 1s; each case writes K over a fresh T.
    let cases: [(u64, usize); 6] = [
        (base + 16384, 4096), // after T
        (base - 4096, 4096),  // before T
        (base + 4096, 4096),  // inside T: T split
        (base - 2048, 32768), // T inside K
        (base + 8192, 16384), // K covers T's tail
        (base - 4096, 8192),  // K covers T's head
    ];
    for (i, (k_off, k_len)) in cases.into_iter().enumerate() {
        let t_off = base + i as u64 * MIB;
        let k_off = k_off + i as u64 * MIB;
        c.write(t_off, &vec![1u8; 16384], false).unwrap();
        c.write(k_off, &vec![2u8; k_len], false).unwrap();
        let lo = t_off.min(k_off) - 4096;
        let hi = (t_off + 16384).max(k_off + k_len as u64) + 4096;
        let got = read(&c, lo, (hi - lo) as usize);
        for (j, b) in got.iter().enumerate() {
            let o = lo + j as u64;
            let want = if (k_off..k_off + k_len as u64).contains(&o) {
                2
            } else if (t_off..t_off + 16384).contains(&o) {
                1
            } else {
                (o % 251) as u8
            };
            assert_eq!(*b, want, "case {i}: byte at {o}");
        }
    }
    c.stop().unwrap();
    rig.check_clean();
}

#[test]
fn hits_partial_hits_misses_and_fills() {
    let rig = Rig::new(16 * MIB);
    let c = rig.start(&opts());
    assert_eq!(read(&c, 8192, 4096), orig(8192, 4096));
    let s = c.stats();
    assert_eq!((s.misses, s.full_hits, s.partial_hits, s.bytes_from_backing), (1, 0, 0, 4096));
    assert_eq!(s.clean_bytes, 4096, "the miss was filled as a clean key");
    assert_eq!(read(&c, 8192, 4096), orig(8192, 4096));
    assert_eq!(c.stats().full_hits, 1);
    assert_eq!(read(&c, 4096, 12288), orig(4096, 12288));
    let s = c.stats();
    assert_eq!((s.partial_hits, s.bytes_from_cache, s.bytes_from_backing), (1, 8192, 12288));
    assert_eq!(read(&c, 4096, 12288), orig(4096, 12288));
    assert_eq!(c.stats().full_hits, 2, "the partial hit's misses were filled");
    // A write over part of a clean key: dirty data wins, the rest stays cached.
    c.write(10000, &[9u8; 100], false).unwrap();
    let mut want = orig(4096, 12288);
    want[10000 - 4096..10100 - 4096].fill(9);
    assert_eq!(read(&c, 4096, 12288), want);
    assert_eq!(c.stats().dirty_bytes, 100);
    // Clean data survives a graceful restart too.
    c.stop().unwrap();
    drop(c);
    let c = rig.start(&opts());
    assert_eq!(read(&c, 4096, 12288), want);
    assert_eq!(c.stats().bytes_from_backing, 0);
}

#[test]
fn read_misses_stay_uncached_without_cache_reads() {
    let rig = Rig::new(16 * MIB);
    let c = rig.start(&CacheOptions { cache_reads: false, ..opts() });
    assert_eq!(read(&c, 8192, 4096), orig(8192, 4096));
    assert_eq!(read(&c, 8192, 4096), orig(8192, 4096));
    let s = c.stats();
    assert_eq!((s.misses, s.full_hits, s.clean_bytes, s.bytes_from_backing), (2, 0, 0, 8192));
    assert!(!c.is_cached(8192, 4096));
    // Writes are still cached, and a read around them is served from both.
    c.write(8192, &[7u8; 512], false).unwrap();
    let mut want = orig(8192, 4096);
    want[..512].fill(7);
    assert_eq!(read(&c, 8192, 4096), want);
    let s = c.stats();
    assert_eq!((s.partial_hits, s.clean_bytes, s.dirty_bytes), (1, 0, 512));
    assert!(c.is_cached(8192, 512) && !c.is_cached(8192, 4096));
}

#[test]
fn requests_across_slices_and_segments() {
    let rig = Rig::new(64 * MIB);
    let c = rig.start(&opts());
    // 20 MiB starting 1 MiB before a slice boundary: cut at every 4 MiB
    // slice, and longer than a segment's data area, so keys are shortened
    // where the data head's segment runs out.
    let off = 3 * MIB + 512;
    let data: Vec<u8> = (0..20 * MIB).map(|i| (i * 7 % 253) as u8).collect();
    c.write(off, &data, false).unwrap();
    assert_eq!(read(&c, off, data.len()), data);
    assert!(c.stats().segments_used >= 3);
    // Misses across slices fill across segments too.
    assert_eq!(read(&c, 40 * MIB - 100, 9 * MIB as usize), orig(40 * MIB - 100, 9 * MIB as usize));
    assert_eq!(read(&c, 40 * MIB - 100, 9 * MIB as usize), orig(40 * MIB - 100, 9 * MIB as usize));
    c.flush().unwrap();
    rig.check_clean();
    c.stop().unwrap();
    drop(c);
    let c = rig.start(&opts());
    assert_eq!(read(&c, off, data.len()), data);
}

#[test]
fn unaligned_byte_ranges() {
    let rig = Rig::new(8 * MIB);
    let c = rig.start(&opts());
    let mut model = orig(0, 8 * MIB as usize);
    let mut x = 12345u64;
    for i in 0..400u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = (x >> 20) % (8 * MIB - 5000);
        let len = 1 + ((x >> 8) % 4999) as usize;
        if i % 3 == 0 {
            assert_eq!(read(&c, off, len), model[off as usize..off as usize + len]);
        } else {
            let data = vec![(i % 255) as u8 + 1; len];
            c.write(off, &data, false).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
    }
    assert_eq!(read(&c, 0, 8 * MIB as usize), model);
}

#[test]
fn durability_points() {
    let mut rig = Rig::new(16 * MIB);
    // Two queues: slices 0 and 2 append to kset 0, slice 1 to kset 1.
    let o = CacheOptions { queues: 2, ..opts() };
    let c = rig.start(&o);
    c.write(4 * MIB, &[1u8; 4096], false).unwrap(); // kset 1, never closed
    c.write(0, &[2u8; 4096], true).unwrap(); // FUA: kset 0 closed before the reply
    c.write(8 * MIB, &[3u8; 4096], false).unwrap(); // kset 0 again, after the close
    rig.crash(c, CrashStrategy::NothingExtra);
    let c = rig.start(&o);
    assert_eq!(read(&c, 4 * MIB, 4096), orig(4 * MIB, 4096), "unflushed write in another kset is lost");
    assert_eq!(read(&c, 0, 4096), vec![2u8; 4096], "FUA write survives");
    assert_eq!(read(&c, 8 * MIB, 4096), orig(8 * MIB, 4096), "write after the FUA's close is lost");
    c.write(12 * MIB, &[4u8; 4096], false).unwrap();
    c.write(4 * MIB, &[5u8; 4096], false).unwrap();
    c.flush().unwrap();
    c.write(4 * MIB + 4096, &[6u8; 4096], false).unwrap();
    rig.crash(c, CrashStrategy::NothingExtra);
    let c = rig.start(&o);
    assert_eq!(read(&c, 12 * MIB, 4096), vec![4u8; 4096], "flushed writes survive");
    assert_eq!(read(&c, 4 * MIB, 4096), vec![5u8; 4096], "flushed writes survive");
    assert_eq!(read(&c, 4 * MIB + 4096, 4096), orig(4 * MIB + 4096, 4096));
    // With everything that was pending surviving, nothing is lost either.
    c.write(MIB, &[7u8; 4096], false).unwrap();
    rig.crash(c, CrashStrategy::Everything);
    let c = rig.start(&o);
    assert_eq!(read(&c, MIB, 4096), orig(MIB, 4096), "an open kset is in DRAM only");
    rig.check_clean();
    drop(c);
}

#[test]
fn idle_ksets_close_within_the_delay() {
    let mut rig = Rig::new(16 * MIB);
    let o = CacheOptions { kset_flush_delay: Duration::from_millis(50), ..opts() };
    let c = rig.start(&o);
    c.write(0, &[7u8; 512], false).unwrap();
    let t = std::time::Instant::now();
    while c.stats().ksets_closed == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the idle kset never closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    rig.crash(c, CrashStrategy::NothingExtra);
    let c = rig.start(&o);
    assert_eq!(read(&c, 0, 512), vec![7u8; 512]);
}

#[test]
fn full_ksets_close_by_themselves() {
    let mut rig = Rig::new(16 * MIB);
    let c = rig.start(&opts());
    for i in 0..128u64 {
        c.write(i * 4096, &[8u8; 4096], false).unwrap();
    }
    assert_eq!(c.stats().ksets_closed, 1);
    rig.crash(c, CrashStrategy::NothingExtra);
    let c = rig.start(&opts());
    assert_eq!(read(&c, 0, 128 * 4096), vec![8u8; 128 * 4096]);
}

#[test]
fn key_log_continues_in_new_segments() {
    let rig = Rig::new(64 * MIB);
    let c = rig.start(&CacheOptions { cache_size: Some(640 * MIB), ..opts() });
    // 512-byte keys, one per kset by flushing: 24 + 40 bytes of log each...
    // use full ksets instead: 128 keys of 512 bytes = 5144 bytes of log per
    // 64 KiB of data; 3300 ksets fill a log segment.
    let mut x = 1u64;
    for i in 0..3400 * 128u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let off = ((x >> 16) % (64 * MIB / 512)) * 512;
        c.write(off, &[(i % 200) as u8 + 1; 512], false).unwrap();
    }
    c.flush().unwrap();
    rig.check_clean();
    let r = scan(&AsMedia(rig.dev.pmem()), ScanOptions::default());
    assert!(r.backings[0].log.as_ref().unwrap().last_ksets >= 1);
    let before = read(&c, 0, 64 * MIB as usize);
    c.stop().unwrap();
    drop(c);
    let c = rig.start(&opts());
    assert_eq!(read(&c, 0, 64 * MIB as usize), before);
}

#[test]
fn data_crc_catches_corrupt_cache_data() {
    let rig = Rig::new(16 * MIB);
    let c = rig.start(&CacheOptions { data_crc: true, ..opts() });
    c.write(0, &[5u8; 8192], false).unwrap();
    c.write(4096, &[6u8; 100], false).unwrap(); // cuts the first key
    assert_eq!(read(&c, 0, 4096), vec![5u8; 4096]);
    c.flush().unwrap();
    // Find the first key's data and flip a byte inside it, past the part still indexed.
    let r = scan(&AsMedia(rig.dev.pmem()), ScanOptions::default());
    let seg = r.backings[0].chain[1].dev_seg;
    let at = rig.dev.layout().data_offset(seg).unwrap() + 6000;
    let mut b = [0u8; 1];
    rig.dev.pmem().read(at, &mut b).unwrap();
    rig.dev.pmem().write(at, &[b[0] ^ 1]).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = c.read(0, &mut buf).unwrap_err();
    assert!(matches!(err, EngineError::DataCrc { off: 0, len: 8192, .. }), "{err}");
    assert!(err.to_string().contains("fails its CRC"), "{err}");
    // The other key still reads.
    assert_eq!(read(&c, 4096, 100), vec![6u8; 100]);
}

#[test]
fn write_zeroes_and_discard() {
    let rig = Rig::new(16 * MIB);
    let c = rig.start(&opts());
    // Cached data under the zeroes: they go through the cache (dirty).
    c.write(1000, &[5u8; 10000], false).unwrap();
    c.write_zeroes(1000, 10000, true).unwrap();
    assert_eq!(c.stats().zeroed_on_backing, 0);
    assert_eq!(read(&c, 1000, 10000), vec![0u8; 10000]);
    assert_eq!(read(&c, 0, 1000), orig(0, 1000));
    // Discard drops clean keys only; content stays what it was.
    assert_eq!(read(&c, MIB, 8192), orig(MIB, 8192));
    assert_eq!(c.stats().clean_bytes, 1000 + 8192);
    c.discard(MIB + 4096, 8192).unwrap();
    assert_eq!(c.stats().clean_bytes, 1000 + 4096);
    c.discard(0, 20000).unwrap();
    assert_eq!(read(&c, 1000, 10000), vec![0u8; 10000], "dirty data is kept");
    assert_eq!(read(&c, MIB, 8192), orig(MIB, 8192));
}

#[test]
fn bad_requests_and_options_are_refused() {
    let rig = Rig::new(16 * MIB);
    let c = rig.start(&opts());
    let mut buf = [0u8; 10];
    assert!(matches!(c.read(16 * MIB - 5, &mut buf), Err(EngineError::OutOfRange { .. })));
    assert!(matches!(c.write(u64::MAX - 3, &buf, false), Err(EngineError::OutOfRange { .. })));
    assert!(matches!(c.write_zeroes(16 * MIB, 1, false), Err(EngineError::OutOfRange { .. })));
    // A second start of the same backing in this process.
    let err = Cache::start(rig.dev.clone(), rig.backing.clone(), &opts()).unwrap_err();
    assert!(matches!(err, EngineError::AlreadyStarted { .. }), "{err}");
    c.stop().unwrap();
    drop(c);
    for (o, what) in [
        (CacheOptions { queues: 0, ..opts() }, "queues 0"),
        (CacheOptions { queues: 129, ..opts() }, "queues 129"),
        (CacheOptions { gc_percent: Some(91), ..opts() }, "gc_percent 91"),
        (CacheOptions { queues: 3, ..opts() }, "too few for 3 queue(s)"),
    ] {
        let err = Cache::start(rig.dev.clone(), rig.backing.clone(), &o).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    // New caches: too small for their queues, or too large for the device.
    let other = Arc::new(MemBacking::new("/rig/other", MIB));
    let small = CacheOptions { cache_size: Some(100 * MIB), queues: 1, ..opts() };
    let err = Cache::start(rig.dev.clone(), other.clone(), &small).unwrap_err();
    assert!(err.to_string().contains("too small for 1 queue"), "{err}");
    let huge = CacheOptions { cache_size: Some(1 << 40), ..opts() };
    let err = Cache::start(rig.dev.clone(), other, &huge).unwrap_err();
    assert!(matches!(err, EngineError::NoSpace { .. }), "{err}");
    // A backing device that shrank.
    let shrunk = Arc::new(MemBacking::new("/rig/backing", 8 * MIB));
    let err = Cache::start(rig.dev.clone(), shrunk, &opts()).unwrap_err();
    assert!(matches!(err, EngineError::BackingShrunk { .. }), "{err}");
}

#[test]
fn stored_settings_win_and_say_so() {
    let rig = Rig::new(16 * MIB);
    let (c, rep) = Cache::start(rig.dev.clone(), rig.backing.clone(), &opts()).unwrap();
    assert!(rep.new);
    assert_eq!((rep.n_segs, rep.data_crc, rep.gc_percent), (20, false, 70));
    c.stop().unwrap();
    drop(c);
    let o = CacheOptions { cache_size: Some(640 * MIB), data_crc: true, gc_percent: Some(50), ..opts() };
    let (c, rep) = Cache::start(rig.dev.clone(), rig.backing.clone(), &o).unwrap();
    assert!(!rep.new);
    assert_eq!((rep.n_segs, rep.data_crc, rep.gc_percent), (20, false, 50));
    assert_eq!(rep.notes.len(), 2, "{:?}", rep.notes);
    assert!(rep.notes[0].contains("keeps its 320 MiB"), "{:?}", rep.notes);
    assert!(rep.notes[1].contains("keeps it off"), "{:?}", rep.notes);
    drop(c);
}

#[test]
fn several_backings_on_one_device() {
    let rig = Rig::new(16 * MIB);
    let b2 = Arc::new(MemBacking::new("/rig/second", 16 * MIB));
    let c1 = rig.start(&opts());
    let (c2, rep2) = Cache::start(rig.dev.clone(), b2.clone(), &opts()).unwrap();
    assert_ne!(rep2.id, c1.id());
    c1.write(0, &[1u8; 4096], false).unwrap();
    c2.write(0, &[2u8; 4096], false).unwrap();
    assert_eq!(read(&c1, 0, 4096), vec![1u8; 4096]);
    assert_eq!(read(&c2, 0, 4096), vec![2u8; 4096]);
    c1.stop().unwrap();
    c2.stop().unwrap();
    drop((c1, c2));
    rig.check_clean();
    // Reopening the device rebuilds which segments belong to whom.
    let image = rig.dev.pmem().crash_image(CrashStrategy::NothingExtra);
    let dev = CacheDev::open(image).unwrap();
    assert_eq!(dev.backings().unwrap().len(), 2);
    assert_eq!(dev.free_segments(), 62 - 40);
    let (c2, _) = Cache::start(dev.clone(), b2, &opts()).unwrap();
    let mut buf = vec![0u8; 4096];
    c2.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![2u8; 4096]);
}

#[test]
fn concurrent_writers_and_readers() {
    let rig = Rig::new(32 * MIB);
    let c = rig.start(&CacheOptions { queues: 4, cache_size: Some(800 * MIB), ..opts() });
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                // Each writer owns every 6th 64 KiB block; readers of shared
                // never-written ranges race to fill the same misses.
                let mut model = std::collections::HashMap::new();
                let mut x = t + 1;
                for i in 0..600u64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let block = ((x >> 33) % 64) * 6 + t;
                    let off = block * 65536 + ((x >> 10) % 60) * 1024;
                    let len = 512 * (1 + (x >> 50) % 8) as usize;
                    if i % 2 == 0 {
                        let data = vec![(t * 40 + i % 40) as u8; len];
                        c.write(off, &data, i % 50 == 0).unwrap();
                        for (j, b) in data.iter().enumerate() {
                            model.insert(off + j as u64, *b);
                        }
                    } else {
                        let mut buf = vec![0u8; len];
                        c.read(off, &mut buf).unwrap();
                        for (j, b) in buf.iter().enumerate() {
                            let o = off + j as u64;
                            let want = model.get(&o).copied().unwrap_or((o % 251) as u8);
                            assert_eq!(*b, want, "thread {t} at {o}");
                        }
                        let shared = 30 * MIB + ((x >> 20) % (MIB - 8192));
                        let mut buf = vec![0u8; 8192];
                        c.read(shared, &mut buf).unwrap();
                        assert_eq!(buf, orig(shared, 8192));
                    }
                }
                model
            })
        })
        .collect();
    let models: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    c.stop().unwrap();
    drop(c);
    rig.check_clean();
    let c = rig.start(&CacheOptions { queues: 2, cache_size: None, ..opts() });
    for model in models {
        for (o, b) in model {
            let mut one = [0u8; 1];
            c.read(o, &mut one).unwrap();
            assert_eq!(one[0], b, "after restart at {o}");
        }
    }
}

#[test]
fn stop_waits_for_writes_in_flight() {
    let mut rig = Rig::new(64 * MIB);
    let c = rig.start(&CacheOptions { queues: 2, ..opts() });
    let go = Arc::new(std::sync::Barrier::new(5));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (c, go) = (c.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                // Large writes keep each request in flight a while; every
                // one that returns Ok must survive the stop.
                let mut acked = Vec::new();
                for i in 0..16u64 {
                    let off = (t * 16 + i) * MIB;
                    match c.write(off, &vec![(t * 16 + i) as u8 + 1; MIB as usize], false) {
                        Ok(()) => acked.push(off),
                        Err(EngineError::Stopped) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                acked
            })
        })
        .collect();
    go.wait();
    std::thread::sleep(Duration::from_millis(5));
    c.stop().unwrap();
    let acked: Vec<u64> = writers.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(matches!(c.write(0, &[1], false), Err(EngineError::Stopped)));
    rig.crash(c, CrashStrategy::NothingExtra);
    let c = rig.start(&opts());
    for off in acked {
        assert_eq!(read(&c, off, MIB as usize), vec![(off / MIB) as u8 + 1; MIB as usize], "write at {off}");
    }
}

#[test]
fn stop_fails_a_write_waiting_for_space() {
    let mut rig = Rig::new(256 * MIB);
    // 10 segments, and writeback held back so that no segment is ever freed.
    let held = CacheOptions { cache_size: Some(160 * MIB), writeback_rate: Some(1), ..opts() };
    let c = rig.start(&held);
    let writer = {
        let c = c.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0..256u64 {
                match c.write(i * MIB, &vec![i as u8 + 1; MIB as usize], false) {
                    Ok(()) => acked.push(i * MIB),
                    Err(e) => return (acked, e),
                }
            }
            panic!("256 MiB fitted in a 160 MiB cache that writes nothing back");
        })
    };
    // The gauge says when a write waits for a segment that never comes.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while c.stats().space_waiters == 0 {
        assert!(!writer.is_finished(), "the writer ended without waiting for space");
        assert!(std::time::Instant::now() < until, "no write waited for space: {:?}", c.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    // The stop wakes it, it fails, and the stop returns.
    let (done, stopped) = std::sync::mpsc::channel();
    let stopper = {
        let c = c.clone();
        std::thread::spawn(move || done.send(c.stop()).unwrap())
    };
    let stop = stopped.recv_timeout(Duration::from_secs(30)).expect("the stop hung on a write waiting for space");
    stop.unwrap();
    stopper.join().unwrap();
    let (acked, err) = writer.join().unwrap();
    assert!(matches!(err, EngineError::Stopped), "{err}");
    assert_eq!(c.stats().space_waiters, 0);
    rig.crash(c, CrashStrategy::NothingExtra);
    let c = rig.start(&opts());
    assert!(!acked.is_empty());
    for off in acked {
        assert_eq!(read(&c, off, MIB as usize), vec![(off / MIB) as u8 + 1; MIB as usize], "write at {off}");
    }
}

/// A slow backing device that counts the reads reaching it.
struct SlowCounting {
    inner: MemBacking,
    reads: std::sync::atomic::AtomicU64,
}

impl BackingDev for SlowCounting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), pcache_pmem::BackingError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), pcache_pmem::BackingError> {
        self.inner.write_at(off, data)
    }
    fn sync(&self) -> Result<(), pcache_pmem::BackingError> {
        self.inner.sync()
    }
    fn path(&self) -> &std::path::Path {
        self.inner.path()
    }
}

#[test]
fn concurrent_misses_of_one_range_read_the_backing_device_once() {
    let pmem = SimPmem::new(1 << 30);
    format(&pmem, false).unwrap();
    let backing = Arc::new(SlowCounting { inner: MemBacking::new("/rig/slow", 16 * MIB), reads: 0.into() });
    backing.inner.write_at(0, &orig(0, 16 * MIB as usize)).unwrap();
    let (c, _) = Cache::start(CacheDev::open(pmem).unwrap(), backing.clone(), &opts()).unwrap();
    let go = Arc::new(std::sync::Barrier::new(4));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (c, go) = (c.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                let mut buf = vec![0u8; 65536];
                c.read(MIB, &mut buf).unwrap();
                buf
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), orig(MIB, 65536));
    }
    assert_eq!(backing.reads.load(std::sync::atomic::Ordering::SeqCst), 1, "the others waited for the first");
    let s = c.stats();
    assert_eq!(s.misses + s.full_hits, 4, "{s:?}");
}

/// A write of zeroes where the cache holds nothing costs no pmem: the
/// backing device zeroes the range itself (and is synced before the write
/// is acknowledged). Where the cache holds anything of the range — dirty
/// data, clean data, or clean data a discard dropped that replay would
/// bring back — the zeroes go through the cache, and every read, before
/// and after a crash, sees zeroes.
#[test]
fn zeroes_cost_no_pmem_where_the_cache_holds_nothing() {
    let mut rig = Rig::new(64 * MIB);
    let c = rig.start(&opts());
    let before = c.stats();
    c.write_zeroes(8 * MIB, 16 * MIB, false).unwrap();
    let after = c.stats();
    assert_eq!(after.keys, before.keys, "no key");
    assert_eq!(after.cached_bytes, before.cached_bytes, "no pmem data");
    assert_eq!(after.zeroed_on_backing, 16 * MIB);
    let mut b = vec![1u8; (16 * MIB) as usize];
    rig.backing.read_at(8 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "the backing device holds the zeroes");
    assert!(read(&c, 8 * MIB, 16 * MIB as usize).iter().all(|&x| x == 0));
    // Dirty data in the range: through the cache, so writeback cannot
    // write the old data over the zeroes later.
    c.write(30 * MIB, &[7u8; 4096], false).unwrap();
    c.write_zeroes(30 * MIB, 64 * 1024, false).unwrap();
    assert_eq!(c.stats().zeroed_on_backing, 16 * MIB);
    // Clean data filled by a read, made durable in the log, then dropped
    // by a discard: replay would bring it back, so through the cache too.
    assert_eq!(read(&c, 40 * MIB, 8192), orig(40 * MIB, 8192));
    c.flush().unwrap();
    c.discard(40 * MIB, 8192).unwrap();
    c.write_zeroes(40 * MIB, 8192, false).unwrap();
    assert_eq!(c.stats().zeroed_on_backing, 16 * MIB, "not past a discarded clean key");
    c.flush().unwrap();
    rig.crash(c, CrashStrategy::NothingExtra);
    let c = rig.start(&opts());
    assert!(read(&c, 8 * MIB, 16 * MIB as usize).iter().all(|&x| x == 0));
    assert_eq!(read(&c, 30 * MIB, 64 * 1024), vec![0u8; 64 * 1024]);
    assert_eq!(read(&c, 40 * MIB, 8192), vec![0u8; 8192], "the discarded clean key is not served");
    assert_eq!(read(&c, 48 * MIB, 4096), orig(48 * MIB, 4096));
}
