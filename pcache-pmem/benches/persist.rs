//! The limit figures of the persistence layer, measured in one run on one
//! mapping: how fast 4 KiB blocks and 64-byte records can be made durable.
//!
//! `cargo bench -p pcache-pmem --bench persist [-- DIR]` maps a 256 MiB
//! file in DIR (default /dev/shm) and prints throughput and the ratio of
//! each method to a plain memcpy into the same mapping. The mapping is
//! treated as pmem (cache-line write-back, as on real pmem) except for the
//! last line, which shows the msync path used for ordinary files.

use std::time::{Duration, Instant};

use pcache_pmem::{DaxMapping, DaxOptions, Pmem};

const REGION: u64 = 256 << 20;
const BLOCK: usize = 4096;

fn time<F: FnMut(u64)>(ops: u64, stride: u64, mut f: F) -> Duration {
    let start = Instant::now();
    for i in 0..ops {
        f((i * stride) % REGION);
    }
    start.elapsed()
}

/// A named way of writing one pass over the region, returning its duration.
type Method<'a> = (&'a str, Box<dyn FnMut() -> Duration + 'a>);

/// Best of several rounds, the methods interleaved round by round so that
/// noise from the shared machine hits them alike.
fn measure(methods: &mut [Method<'_>], rounds: usize) -> Vec<Duration> {
    let mut best = vec![Duration::MAX; methods.len()];
    for _ in 0..rounds {
        for (i, (_, m)) in methods.iter_mut().enumerate() {
            best[i] = best[i].min(m());
        }
    }
    best
}

fn main() {
    let dir = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_else(|| "/dev/shm".into());
    let file = tempfile::NamedTempFile::new_in(&dir).expect("temp file");
    file.as_file().set_len(REGION).expect("size");
    let forced = DaxOptions { force_pmem: Some(true), ..Default::default() };
    let pm = DaxMapping::open(file.path(), &forced).expect("map");
    let cfg = pm.flush_config();
    let clwb = DaxMapping::open(
        file.path(),
        &DaxOptions { no_lock: true, movnt: Some(false), flush: Some(cfg.instr), ..forced.clone() },
    )
    .expect("map");
    let nt =
        DaxMapping::open(file.path(), &DaxOptions { no_lock: true, movnt: Some(true), ..forced.clone() }).expect("map");
    let msync =
        DaxMapping::open(file.path(), &DaxOptions { no_lock: true, force_pmem: Some(false), ..Default::default() })
            .expect("map");
    let block = vec![0x5au8; BLOCK];
    let blocks = REGION / BLOCK as u64; // one pass over 256 MiB, larger than the L3 cache
    let lines = 200_000u64;
    // Touch every page once so no method pays for first faults.
    pm.zero_persist(0, REGION).expect("prefault");

    let mut methods: Vec<Method<'_>> = vec![
        ("4 KiB memcpy (no persistence)", Box::new(|| time(blocks, BLOCK as u64, |o| pm.write(o, &block).unwrap()))),
        ("4 KiB copy_persist", Box::new(|| time(blocks, BLOCK as u64, |o| pm.copy_persist(o, &block).unwrap()))),
        (
            "4 KiB copy + write-back + sfence",
            Box::new(|| {
                time(blocks, BLOCK as u64, |o| {
                    clwb.write(o, &block).unwrap();
                    clwb.persist(o, BLOCK as u64).unwrap();
                })
            }),
        ),
        (
            "4 KiB non-temporal copy + sfence",
            Box::new(|| time(blocks, BLOCK as u64, |o| nt.copy_persist(o, &block).unwrap())),
        ),
        (
            "64 B write + persist",
            Box::new(|| {
                time(lines, 64, |o| {
                    pm.write(o, &block[..64]).unwrap();
                    pm.persist(o, 64).unwrap();
                })
            }),
        ),
        (
            "4 KiB copy_persist, msync (ordinary file)",
            Box::new(|| time(blocks / 16, BLOCK as u64, |o| msync.copy_persist(o, &block).unwrap())),
        ),
    ];
    let best = measure(&mut methods, 5);
    let gib = |bytes: u64, d: Duration| bytes as f64 / d.as_secs_f64() / (1u64 << 30) as f64;
    let base = gib(REGION, best[0]);
    println!("persistence limits: 256 MiB mapping in {dir}, write-back {}, best of 5 rounds", cfg.instr);
    for (i, (name, _)) in methods.iter().enumerate() {
        let (bytes, ops) = match i {
            4 => (lines * 64, lines),
            5 => (REGION / 16, blocks / 16),
            _ => (REGION, blocks),
        };
        let rate = gib(bytes, best[i]);
        let per_op = best[i].as_nanos() as f64 / ops as f64;
        if i == 4 {
            println!("  {name:<42} {per_op:>8.0} ns per persist ({:.2} M persists/s)", 1e3 / per_op);
        } else {
            println!("  {name:<42} {rate:>7.2} GiB/s  {:>5.2}x memcpy  ({per_op:.0} ns per block)", rate / base);
        }
    }
    // The methods against each other: what copy_persist's choice of
    // instructions buys, and what a small persist costs next to a block.
    let ratio = |a: usize, b: usize| best[b].as_secs_f64() / best[a].as_secs_f64();
    let per = |i: usize, ops: u64| best[i].as_secs_f64() / ops as f64;
    println!("  copy_persist vs copy + write-back + sfence   {:>5.2}x", ratio(1, 2));
    println!("  copy_persist vs non-temporal copy + sfence   {:>5.2}x", ratio(1, 3));
    println!("  non-temporal vs copy + write-back + sfence   {:>5.2}x", ratio(3, 2));
    println!("  64 B persist vs 4 KiB copy_persist, per op   {:>5.2}x the time", per(4, lines) / per(1, blocks));
}
