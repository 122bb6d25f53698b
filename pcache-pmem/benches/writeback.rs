//! Writeback against writing straight to the backing file, in one run.
//!
//! `cargo bench -p pcache-pmem --bench writeback [-- DIR]`: the backing
//! file lives in DIR (default: the temp dir, a real filesystem); the pmem
//! file in /dev/shm, treated as pmem.
//!
//! 1. Writeback of 64 MiB of random 4 KiB dirty data, against the same
//!    random 4 KiB `pwrite`s straight to the backing file plus one
//!    `fdatasync`.
//! 2. Sustained random 4 KiB writes through a 160 MiB cache over a working
//!    set three times its size, with writeback and GC running, against the
//!    same writes straight to the backing file.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcache_pmem::format::format;
use pcache_pmem::{Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, FileBacking, Stats};

const MIB: u64 = 1 << 20;

fn rng(x: &mut u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *x >> 17
}

/// Part 1's timings: direct pwrites + fdatasync, and writeback of the same
/// blocks; with the bytes writeback wrote.
struct WritebackRun {
    direct: Duration,
    writeback: Duration,
    written_back: u64,
}

/// Part 1, writeback vs direct pwrites of the same blocks.
fn writeback_vs_direct(dev: &Arc<CacheDev<DaxMapping>>, dir: &Path, block: &[u8]) -> WritebackRun {
    let span = 1 << 30; // random blocks over a 1 GiB backing file
    let n = 64 * MIB / 4096;
    let offs: Vec<u64> = {
        let mut x = 3;
        (0..n).map(|_| (rng(&mut x) % (span / 4096)) * 4096).collect()
    };
    let direct = tempfile::NamedTempFile::new_in(dir).unwrap();
    direct.as_file().set_len(span).unwrap();
    let t = Instant::now();
    for o in &offs {
        direct.as_file().write_all_at(block, *o).unwrap();
    }
    direct.as_file().sync_data().unwrap();
    let direct_t = t.elapsed();

    let disk = tempfile::NamedTempFile::new_in(dir).unwrap();
    disk.as_file().set_len(span).unwrap();
    let opts = CacheOptions { cache_size: Some(256 * MIB), background: false, ..Default::default() };
    let (cache, _) = Cache::start(dev.clone(), FileBacking::open(disk.path()).unwrap(), &opts).unwrap();
    for o in &offs {
        cache.write(*o, block, false).unwrap();
    }
    let t = Instant::now();
    cache.write_back(|_, _| {}).unwrap();
    let writeback = t.elapsed();
    let written_back = cache.stats().bytes_written_back;
    cache.stop().unwrap();
    drop(cache);
    pcache_pmem::detach(dev, FileBacking::open(disk.path()).unwrap(), |_, _| {}).unwrap();
    WritebackRun { direct: direct_t, writeback, written_back }
}

/// Part 2, sustained random writes with a working set three times the
/// cache: the time straight to the backing file, the time through the
/// cache, and the cache's counters.
fn sustained(
    dev: &Arc<CacheDev<DaxMapping>>,
    dir: &Path,
    block: &[u8],
    cache_size: u64,
    total: u64,
) -> (Duration, Duration, Stats) {
    let working = 3 * cache_size;
    let m = total / 4096;
    let offs: Vec<u64> = {
        let mut x = 5;
        (0..m).map(|_| (rng(&mut x) % (working / 4096)) * 4096).collect()
    };
    let direct2 = tempfile::NamedTempFile::new_in(dir).unwrap();
    direct2.as_file().set_len(working).unwrap();
    let t = Instant::now();
    for o in &offs {
        direct2.as_file().write_all_at(block, *o).unwrap();
    }
    direct2.as_file().sync_data().unwrap();
    let direct2_t = t.elapsed();
    let disk2 = tempfile::NamedTempFile::new_in(dir).unwrap();
    disk2.as_file().set_len(working).unwrap();
    let opts = CacheOptions { cache_size: Some(cache_size), ..Default::default() };
    let (cache, _) = Cache::start(dev.clone(), FileBacking::open(disk2.path()).unwrap(), &opts).unwrap();
    let t = Instant::now();
    for o in &offs {
        cache.write(*o, block, false).unwrap();
    }
    let sustained_t = t.elapsed();
    let s = cache.stats();
    cache.stop().unwrap();
    (direct2_t, sustained_t, s)
}

fn main() {
    let dir = std::env::args().skip(1).find(|a| !a.starts_with('-')).map(std::path::PathBuf::from);
    let dir = dir.unwrap_or_else(std::env::temp_dir);
    let pm = tempfile::NamedTempFile::new_in("/dev/shm").expect("pmem file");
    pm.as_file().set_len(1 << 30).unwrap();
    let map = DaxMapping::open(pm.path(), &DaxOptions { force_pmem: Some(true), ..Default::default() }).unwrap();
    format(&map, false).unwrap();
    let dev = CacheDev::open(map).unwrap();
    let block = [0x6bu8; 4096];

    let WritebackRun { direct: direct_t, writeback: wb_t, written_back: wb_bytes } =
        writeback_vs_direct(&dev, &dir, &block);
    let (cache_size, total) = (160 * MIB, 1024 * MIB);
    let (direct2_t, sustained_t, s) = sustained(&dev, &dir, &block, cache_size, total);

    let mibs = |bytes: u64, d: Duration| bytes as f64 / MIB as f64 / d.as_secs_f64();
    println!("writeback, backing files in {}", dir.display());
    println!("  64 MiB of random 4 KiB pwrites + fdatasync        {:>8.1} MiB/s", mibs(64 * MIB, direct_t));
    println!(
        "  writeback of the same 64 MiB of dirty data         {:>8.1} MiB/s  {:.2}x direct  ({} MiB written after collapsing)",
        mibs(64 * MIB, wb_t),
        direct_t.as_secs_f64() / wb_t.as_secs_f64(),
        wb_bytes / MIB
    );
    println!("  1 GiB of random 4 KiB writes, 480 MiB working set:");
    println!("    straight to the backing file (+ fdatasync)       {:>8.1} MiB/s", mibs(total, direct2_t));
    println!(
        "    through a 160 MiB cache, writeback and GC on     {:>8.1} MiB/s  {:.2}x direct  ({} segments reclaimed, {} MiB written back)",
        mibs(total, sustained_t),
        direct2_t.as_secs_f64() / sustained_t.as_secs_f64(),
        s.segments_freed,
        s.bytes_written_back / MIB
    );
}
