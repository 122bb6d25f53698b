//! The cache engine on the crash simulator, driven by arbitrary sequences of
//! writes, reads, flushes, FUA writes, zeroing, writeback, GC, graceful
//! restarts and crashes, against a model disk: every read must return what
//! the model allows, a crash may only lose writes not yet flushed, and the
//! image must always pass the checker.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pcache_pmem::format::format;
use pcache_pmem::{AsMedia, Cache, CacheDev, CacheOptions, CrashStrategy, MemBacking, SimPmem};

const SECTOR: u64 = 512;
const SECTORS: u64 = 4096; // a 2 MiB backing device

#[derive(Arbitrary, Debug)]
enum Op {
    Write { sector: u16, len: u8, fua: bool },
    Zero { sector: u16, len: u8 },
    Read { sector: u16, len: u8 },
    Discard { sector: u16, len: u8 },
    Flush,
    WriteBack,
    Gc,
    Restart,
    Crash { strategy: u8, seed: u64 },
}

fn val(id: u32, off: u64) -> u8 {
    let x = (u64::from(id).wrapping_mul(0x9E37_79B9) ^ off).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    if id == 0 { 0 } else { (x >> 56) as u8 | 1 }
}

fn opts() -> CacheOptions {
    CacheOptions {
        cache_size: Some(10 << 24),
        kset_flush_delay: Duration::from_secs(3600),
        background: false,
        gc_percent: Some(0),
        ..CacheOptions::default()
    }
}

fn range(sector: u16, len: u8) -> (u64, u64) {
    let s = u64::from(sector) % SECTORS;
    (s, (u64::from(len) + 1).min(SECTORS - s))
}

fuzz_target!(|ops: Vec<Op>| {
    if ops.len() > 64 {
        return;
    }
    let pmem = SimPmem::new(512 << 20);
    format(&pmem, false).unwrap();
    let backing = Arc::new(MemBacking::new("/fuzz/backing", SECTORS * SECTOR));
    let mut dev = CacheDev::open(pmem).unwrap();
    let mut cache = Cache::start(dev.clone(), backing.clone(), &opts()).unwrap().0;
    // Per sector: the write it holds now, and the writes a crash may leave.
    let mut cur = vec![0u32; SECTORS as usize];
    let mut cands: Vec<Vec<u32>> = vec![vec![0]; SECTORS as usize];
    for (i, op) in ops.iter().enumerate() {
        let id = i as u32 + 1;
        match *op {
            Op::Write { sector, len, fua } => {
                let (s, n) = range(sector, len);
                let data: Vec<u8> = (s * SECTOR..(s + n) * SECTOR).map(|o| val(id, o)).collect();
                cache.write(s * SECTOR, &data, fua).unwrap();
                for k in s..s + n {
                    cur[k as usize] = id;
                    if fua {
                        cands[k as usize] = vec![id];
                    } else {
                        cands[k as usize].push(id);
                    }
                }
            }
            Op::Zero { sector, len } => {
                let (s, n) = range(sector, len);
                cache.write_zeroes(s * SECTOR, n * SECTOR, false).unwrap();
                for k in s..s + n {
                    cur[k as usize] = 0;
                    cands[k as usize].push(0);
                }
            }
            Op::Read { sector, len } => {
                let (s, n) = range(sector, len);
                let mut buf = vec![0u8; (n * SECTOR) as usize];
                cache.read(s * SECTOR, &mut buf).unwrap();
                for (j, b) in buf.iter().enumerate() {
                    let o = s * SECTOR + j as u64;
                    assert_eq!(*b, val(cur[(o / SECTOR) as usize], o), "read at {o}");
                }
            }
            Op::Discard { sector, len } => {
                let (s, n) = range(sector, len);
                cache.discard(s * SECTOR, n * SECTOR).unwrap();
            }
            Op::Flush => {
                cache.flush().unwrap();
                for (c, v) in cands.iter_mut().zip(&cur) {
                    *c = vec![*v];
                }
            }
            Op::WriteBack => {
                cache.write_back_ksets(2).unwrap();
            }
            Op::Gc => {
                cache.gc().unwrap();
            }
            Op::Restart => {
                cache.stop().unwrap();
                drop(cache);
                cache = Cache::start(dev.clone(), backing.clone(), &opts()).unwrap().0;
                for (c, v) in cands.iter_mut().zip(&cur) {
                    *c = vec![*v];
                }
            }
            Op::Crash { strategy, seed } => {
                let strategy = match strategy % 3 {
                    0 => CrashStrategy::NothingExtra,
                    1 => CrashStrategy::Everything,
                    _ => CrashStrategy::Random { seed },
                };
                let image = dev.pmem().crash_image(strategy);
                drop(cache);
                dev = CacheDev::open(image).unwrap();
                cache = Cache::start(dev.clone(), backing.clone(), &opts()).unwrap().0;
                let mut all = vec![0u8; (SECTORS * SECTOR) as usize];
                cache.read(0, &mut all).unwrap();
                for (s, chunk) in all.chunks(SECTOR as usize).enumerate() {
                    let base = s as u64 * SECTOR;
                    let held = cands[s]
                        .iter()
                        .copied()
                        .find(|&c| chunk.iter().enumerate().all(|(j, b)| *b == val(c, base + j as u64)));
                    let Some(held) = held else { panic!("sector {s} holds none of {:?}", cands[s]) };
                    cur[s] = held;
                    cands[s] = vec![held];
                }
            }
        }
    }
    cache.stop().unwrap();
    let report = pcache_format::image::scan(&AsMedia(dev.pmem()), Default::default());
    assert_eq!(report.problems(), 0, "{:?}", report.findings);
});
