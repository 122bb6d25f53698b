//! The engine against the persistence layer's limits by thread count, each
//! ratio from the same run: 4 KiB random writes (1 in 64 FUA) vs 4 KiB
//! `copy_persist`, 4 KiB random read hits vs a 4 KiB memcpy out of pmem,
//! and a 70/30 mix of reads and writes vs the same mix of the two limits.
//! Every method runs on that many threads at once, each thread with its own
//! random 4 KiB offsets; the cache has as many queues as threads (as many
//! as its size allows: 10 segments a queue).
//!
//! `cargo bench -p pcache-pmem --bench scale [-- [--threads 1,2,4] [--background] [DIR]]`
//! (default DIR /dev/shm; default threads: powers of two up to the CPU
//! count, and the CPU count, at least 1,2). The mapping is treated as pmem
//! (cache-line write-back), as on real pmem. Each thread count gets a newly
//! zeroed and formatted device and a new cache, so none inherits another's
//! log.
//!
//! Writeback and GC are off unless `--background`: the cache is large
//! enough that nothing needs reclaiming, and a writeback thread would take
//! a core from the threads being counted (the engine bench measures with
//! them on).

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use pcache_format::{QUEUES_MAX, SEG_SIZE, SEGS_PER_QUEUE};
use pcache_pmem::format::format;
use pcache_pmem::{Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, FileBacking, Pmem};

const DEVICE: u64 = 4 << 30;
const BACKING: u64 = 1 << 30;
/// 160 segments: 16 queues. Leaves the last GiB of the device free.
const CACHE: u64 = 2560 << 20;
/// The limits run on the device's last GiB, which no cache uses.
const REGION: u64 = 1 << 30;
const REGION_BASE: u64 = DEVICE - REGION;
/// Requests a round, shared out among the threads: 128 MiB of 4 KiB.
const OPS: u64 = 32_768;
const ROUNDS: usize = 5;
/// Percent of the mix's requests that are writes.
const MIX_WRITES: u64 = 30;
/// A request in a plan: a 4 KiB-aligned offset, its low bit set for a write.
const WRITE: u64 = 1;
static BLOCK: [u8; 4096] = [0x5a; 4096];

fn rng(x: &mut u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *x >> 17
}

fn rate(ops: u64, d: Duration) -> f64 {
    ops as f64 / d.as_secs_f64()
}

/// What the command line asks for.
struct Args {
    dir: String,
    threads: Vec<usize>,
    background: bool,
}

/// Powers of two below the CPU count, then the CPU count; at least 1, 2.
fn default_threads() -> Vec<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).max(2);
    let mut list: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2)).take_while(|n| *n < cpus).collect();
    list.push(cpus);
    list
}

fn parse_threads(s: &str) -> Vec<usize> {
    let list: Vec<usize> =
        s.split(',').map(|t| t.trim().parse().unwrap_or_else(|_| panic!("--threads: {t:?} is not a number"))).collect();
    assert!(list.iter().all(|t| *t > 0), "--threads: counts start at 1");
    list
}

/// `--threads LIST` or `--threads=LIST`, `--background`, a directory;
/// other flags (`cargo bench` passes `--bench`) are ignored.
fn args() -> Args {
    let mut a = Args { dir: "/dev/shm".into(), threads: default_threads(), background: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--threads" {
            a.threads = parse_threads(&it.next().expect("--threads needs a list, e.g. 1,2,4"));
        } else if let Some(list) = arg.strip_prefix("--threads=") {
            a.threads = parse_threads(list);
        } else if arg == "--background" {
            a.background = true;
        } else if !arg.starts_with('-') {
            a.dir = arg;
        }
    }
    a
}

/// Runs `work(i)` on `n` threads at once; the time from the first one's
/// start until the last one is done. Each thread reads the clock itself: a
/// waiting main thread may not run until the workers are well under way.
fn parallel(n: usize, work: impl Fn(usize) + Sync) -> Duration {
    let start = Barrier::new(n);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (start, work) = (&start, &work);
                s.spawn(move || {
                    start.wait();
                    let t = Instant::now();
                    work(i);
                    (t, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench thread")).collect()
    });
    let first = spans.iter().map(|s| s.0).min().expect("a thread");
    let last = spans.iter().map(|s| s.1).max().expect("a thread");
    last - first
}

/// `per` requests for each of `n` threads: `writes` percent writes at
/// `write_at`, the rest reads at `read_at`.
fn plan(
    x: &mut u64,
    n: usize,
    per: u64,
    writes: u64,
    write_at: impl Fn(&mut u64) -> u64,
    read_at: impl Fn(&mut u64) -> u64,
) -> Vec<Vec<u64>> {
    (0..n)
        .map(|_| (0..per).map(|_| if rng(x) % 100 < writes { write_at(x) | WRITE } else { read_at(x) }).collect())
        .collect()
}

/// The plan's requests straight to pmem: `copy_persist` and `read`.
fn run_limit(pmem: &DaxMapping, plan: &[Vec<u64>]) -> Duration {
    parallel(plan.len(), |i| {
        let mut buf = [0u8; 4096];
        for &op in &plan[i] {
            if op & WRITE != 0 {
                pmem.copy_persist(op & !WRITE, &BLOCK).unwrap();
            } else {
                pmem.read(op, &mut buf).unwrap();
            }
            // The reads' bytes are used, so no copy is optimised away.
            std::hint::black_box(&mut buf);
        }
    })
}

/// The plan's requests through the cache; every 64th write of a thread is
/// FUA.
fn run_engine(cache: &Cache<DaxMapping, FileBacking>, plan: &[Vec<u64>]) -> Duration {
    parallel(plan.len(), |i| {
        let mut buf = [0u8; 4096];
        let mut writes = 0u64;
        for &op in &plan[i] {
            if op & WRITE != 0 {
                writes += 1;
                cache.write(op & !WRITE, &BLOCK, writes.is_multiple_of(64)).unwrap();
            } else {
                cache.read(op, &mut buf).unwrap();
            }
            std::hint::black_box(&mut buf);
        }
    })
}

/// A newly formatted device and a new cache with `threads` queues (as many
/// as its size allows).
struct Rig {
    dev: Arc<CacheDev<DaxMapping>>,
    cache: Arc<Cache<DaxMapping, FileBacking>>,
    queues: u32,
    flush: String,
    _disk: tempfile::NamedTempFile,
}

fn rig(pm_path: &Path, threads: usize, background: bool) -> Rig {
    let opts = DaxOptions { force_pmem: Some(true), ..Default::default() };
    let map = DaxMapping::open(pm_path, &opts).expect("map");
    // Zero the whole device: the previous thread count's cache would
    // otherwise be found as a lost cache. This also touches every page
    // once, so that no measurement pays for the first fault of a page.
    map.zero_persist(0, DEVICE).expect("zero");
    format(&map, false).expect("format");
    let flush = map.flush_config().instr.to_string();
    let dev = CacheDev::open(map).expect("open");
    let disk = tempfile::NamedTempFile::new().expect("backing file");
    disk.as_file().set_len(BACKING).expect("size");
    let most = (CACHE / SEG_SIZE) as u32 / SEGS_PER_QUEUE;
    let queues = u32::try_from(threads).unwrap_or(u32::MAX).min(most).min(QUEUES_MAX);
    let copts = CacheOptions { cache_size: Some(CACHE), queues, background, ..Default::default() };
    let (cache, report) = Cache::start(dev.clone(), FileBacking::open(disk.path()).unwrap(), &copts).expect("start");
    assert_eq!(report.queues, queues);
    Rig { dev, cache, queues, flush, _disk: disk }
}

/// Best rates of one thread count, in requests a second: the limit and
/// the engine for writes, reads and the mix.
#[derive(Clone, Copy)]
struct Row {
    threads: usize,
    queues: u32,
    rates: [f64; 6],
}

/// `ROUNDS` rounds of each method in turn, best round kept: the limit,
/// then the engine, for writes, read hits and the mix.
fn measure(rig: &Rig, threads: usize) -> Row {
    let (pmem, cache) = (rig.dev.pmem(), &rig.cache);
    let per = OPS / threads as u64;
    let region = |x: &mut u64| REGION_BASE + rng(x) % (REGION / 4096) * 4096;
    let backing = |x: &mut u64| rng(x) % (BACKING / 4096) * 4096;
    let mut x = threads as u64;
    let mut best = [Duration::MAX; 6];
    let mut written: Vec<u64> = Vec::new();
    let keep = |best: &mut Duration, d: Duration| *best = (*best).min(d);
    for _ in 0..ROUNDS {
        keep(&mut best[0], run_limit(pmem, &plan(&mut x, threads, per, 100, region, region)));
        let writes = plan(&mut x, threads, per, 100, backing, backing);
        keep(&mut best[1], run_engine(cache, &writes));
        written.extend(writes.iter().flatten().map(|op| op & !WRITE));
        keep(&mut best[2], run_limit(pmem, &plan(&mut x, threads, per, 0, region, region)));
        // Read hits: what the writes touched, in another order.
        let hit = |x: &mut u64| written[(rng(x) % written.len() as u64) as usize];
        keep(&mut best[3], run_engine(cache, &plan(&mut x, threads, per, 0, backing, hit)));
        keep(&mut best[4], run_limit(pmem, &plan(&mut x, threads, per, MIX_WRITES, region, region)));
        let mix = plan(&mut x, threads, per, MIX_WRITES, backing, hit);
        keep(&mut best[5], run_engine(cache, &mix));
        written.extend(mix.iter().flatten().filter(|op| *op & WRITE != 0).map(|op| op & !WRITE));
    }
    let stats = cache.stats();
    assert_eq!(stats.misses + stats.partial_hits, 0, "every read must hit: {stats:?}");
    Row { threads, queues: rig.queues, rates: best.map(|d| rate(per * threads as u64, d)) }
}

fn print_table(rows: &[Row]) {
    println!(
        "| threads | queues | `copy_persist` | writes (1/64 FUA) | ratio | memcpy | read hits | ratio | mix limit | 70/30 mix | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let m = |r: f64| format!("{:.2} M", r / 1e6);
    for r in rows {
        let [cp, w, mc, h, ml, mx] = r.rates;
        println!(
            "| {} | {} | {} | {} | {:.2}× | {} | {} | {:.2}× | {} | {} | {:.2}× |",
            r.threads,
            r.queues,
            m(cp),
            m(w),
            w / cp,
            m(mc),
            m(h),
            h / mc,
            m(ml),
            m(mx),
            mx / ml
        );
    }
}

fn main() {
    let args = args();
    let pm_file = tempfile::NamedTempFile::new_in(&args.dir).expect("pmem file");
    pm_file.as_file().set_len(DEVICE).expect("size");
    let mut rows = Vec::new();
    let mut flush = String::new();
    for &threads in &args.threads {
        let rig = rig(pm_file.path(), threads, args.background);
        rows.push(measure(&rig, threads));
        flush = rig.flush.clone();
        rig.cache.stop().unwrap();
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "engine vs persistence limits by thread count, {cpus} CPUs, pmem file in {} (write-back {flush}), \
         background work {}, best of {ROUNDS} rounds of {OPS} 4 KiB requests shared out among the threads, \
         rates in requests a second; the mix is {}% reads",
        args.dir,
        if args.background { "on" } else { "off" },
        100 - MIX_WRITES
    );
    print_table(&rows);
}
