//! The engine against the persistence layer's limits, in one run on one
//! mapping: 4 KiB random writes vs 4 KiB `copy_persist`, 4 KiB random read
//! hits vs a 4 KiB memcpy out of pmem, and the replay rate of 1 M keys.
//!
//! `cargo bench -p pcache-pmem --bench engine [-- DIR]` (default /dev/shm).
//! The mapping is treated as pmem (cache-line write-back), as on real pmem.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pcache_pmem::format::format;
use pcache_pmem::{Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, FileBacking, Pmem, StartReport, Stats};

const DEVICE: u64 = 4 << 30;
const BACKING: u64 = 1 << 30;
const OPS: u64 = 16_384; // 64 MiB of 4 KiB requests a round
const ROUNDS: usize = 5;
const REPLAY_KEYS: u64 = 1 << 20;

fn rng(x: &mut u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *x >> 17
}

fn rate(ops: u64, d: Duration) -> f64 {
    ops as f64 / d.as_secs_f64()
}

/// The four rates of [`rounds`], best of `ROUNDS`, in operations a second.
struct Rates {
    copy_persist: f64,
    writes: f64,
    memcpy: f64,
    reads: f64,
}

/// Rounds of each method in turn, best of `ROUNDS`: the limits on the last
/// GiB of the mapping (no cache uses it), then the engine.
fn rounds(pmem: &DaxMapping, cache: &Cache<DaxMapping, FileBacking>) -> Rates {
    let block = vec![0x5au8; 4096];
    let region = 1u64 << 30;
    let base = DEVICE - region;
    let blocks = BACKING / 4096;
    let mut x = 1;
    let mut buf = vec![0u8; 4096];
    let mut best = [Duration::MAX; 4];
    let mut written = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..OPS {
            pmem.copy_persist(base + (rng(&mut x) % (region / 4096)) * 4096, &block).unwrap();
        }
        best[0] = best[0].min(t.elapsed());
        let offs: Vec<u64> = (0..OPS).map(|_| (rng(&mut x) % blocks) * 4096).collect();
        let t = Instant::now();
        for (i, off) in offs.iter().enumerate() {
            cache.write(*off, &block[..], i % 64 == 63).unwrap();
        }
        best[1] = best[1].min(t.elapsed());
        written.extend(offs);
        let t = Instant::now();
        for _ in 0..OPS {
            pmem.read(base + (rng(&mut x) % (region / 4096)) * 4096, &mut buf).unwrap();
        }
        best[2] = best[2].min(t.elapsed());
        // Read hits: what the writes touched, in another order.
        let t = Instant::now();
        for _ in 0..OPS {
            cache.read(written[(rng(&mut x) % written.len() as u64) as usize], &mut buf).unwrap();
        }
        best[3] = best[3].min(t.elapsed());
    }
    let [copy_persist, writes, memcpy, reads] = best.map(|d| rate(OPS, d));
    Rates { copy_persist, writes, memcpy, reads }
}

/// What a restart replayed.
struct Replayed {
    /// Keys read from the log.
    keys: u64,
    /// Keys in the index after the restart.
    live: u64,
    /// Ksets GC had consumed before the stop.
    collected: u64,
    took: Duration,
}

/// Replay: `REPLAY_KEYS` keys of 512 bytes at distinct offsets in a second
/// cache, then a restart, timed.
///
/// The phase runs without background writeback and GC, and with one queue
/// (one writer), so nothing is reclaimed and replay must find every key
/// written, on any core count. Should GC have consumed ksets anyway, the
/// keys in them are gone from the log and the exact count no longer holds:
/// replay must then still find every key not yet written back, and never
/// more keys than the index held (see [`check_replay`]).
fn replay(dev: &Arc<CacheDev<DaxMapping>>) -> Replayed {
    let disk2 = tempfile::NamedTempFile::new().expect("backing file");
    disk2.as_file().set_len(BACKING).expect("size");
    let copts2 = CacheOptions { cache_size: Some(768 << 20), queues: 1, background: false, ..Default::default() };
    let (c2, _) = Cache::start(dev.clone(), FileBacking::open(disk2.path()).unwrap(), &copts2).expect("start");
    let small = [7u8; 512];
    for i in 0..REPLAY_KEYS {
        c2.write((i * 2 % (BACKING / 512)) * 512, &small, false).unwrap();
    }
    c2.stop().unwrap();
    let before = c2.stats();
    drop(c2);
    let t = Instant::now();
    let (c2, report) = Cache::start(dev.clone(), FileBacking::open(disk2.path()).unwrap(), &copts2).expect("restart");
    let took = t.elapsed();
    check_replay(&before, &report, small.len() as u64);
    drop(c2);
    Replayed { keys: report.replay.keys, live: report.keys, collected: before.ksets_collected, took }
}

/// What replay must find, given the stopped cache's counters `before` and
/// keys of `key_len` bytes at distinct offsets (no key replaces another).
fn check_replay(before: &Stats, report: &StartReport, key_len: u64) {
    if before.ksets_collected == 0 {
        // The whole log is there: every key written, each one live.
        assert_eq!(report.replay.keys, REPLAY_KEYS, "{report:?}");
        assert_eq!(report.keys, REPLAY_KEYS, "{report:?}");
        assert_eq!(before.keys, REPLAY_KEYS, "{before:?}");
    } else {
        let dirty = before.dirty_bytes / key_len;
        assert!(report.keys >= dirty, "replay lost keys not yet written back: {report:?} {before:?}");
        assert!(report.keys <= before.keys, "replay found keys the cache did not hold: {report:?} {before:?}");
    }
}

fn main() {
    let dir = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_else(|| "/dev/shm".into());
    let pm_file = tempfile::NamedTempFile::new_in(&dir).expect("pmem file");
    pm_file.as_file().set_len(DEVICE).expect("size");
    let disk = tempfile::NamedTempFile::new().expect("backing file");
    disk.as_file().set_len(BACKING).expect("size");
    let opts = DaxOptions { force_pmem: Some(true), ..Default::default() };
    let map = DaxMapping::open(pm_file.path(), &opts).expect("map");
    format(&map, false).expect("format");
    let flush = map.flush_config().instr;
    let dev = CacheDev::open(map).expect("open");
    // Touch every page past the backing table once, so that no measurement
    // pays for the first fault of a page.
    let first_seg = pcache_format::SEGMENTS_OFF + pcache_format::SEG_SIZE;
    dev.pmem().zero_persist(first_seg, DEVICE - first_seg).expect("prefault");

    let copts = CacheOptions { cache_size: Some(1536 << 20), queues: 1, ..Default::default() };
    let (cache, _) = Cache::start(dev.clone(), FileBacking::open(disk.path()).unwrap(), &copts).expect("start");
    let Rates { copy_persist, writes, memcpy, reads } = rounds(dev.pmem(), &cache);
    let stats = cache.stats();
    assert_eq!(stats.misses + stats.partial_hits, 0, "every read must hit: {stats:?}");
    cache.stop().unwrap();
    drop(cache);
    let replay = replay(&dev);

    println!(
        "engine vs persistence limits, one thread, pmem file in {dir} (write-back {flush}), best of {ROUNDS} rounds"
    );
    println!("  4 KiB copy_persist (limit)        {copy_persist:>9.0} ops/s");
    println!(
        "  4 KiB random writes (1/64 FUA)    {writes:>9.0} ops/s   {:.2}x copy_persist   (target >= 0.5x)",
        writes / copy_persist
    );
    println!("  4 KiB memcpy out of pmem (limit)  {memcpy:>9.0} ops/s");
    println!(
        "  4 KiB random read hits            {reads:>9.0} ops/s   {:.2}x memcpy         (target >= 0.6x)",
        reads / memcpy
    );
    println!(
        "  replay ({} keys read, {} in the index; {REPLAY_KEYS} written, {} ksets collected)   {:>9.0} keys/s ({:.2} s)    (target >= 2 M keys/s)",
        replay.keys,
        replay.live,
        replay.collected,
        rate(replay.keys, replay.took),
        replay.took.as_secs_f64()
    );
    let _ = Arc::strong_count(&dev);
}
