//! Model-based test of the cache engine: random writes, reads, flushes,
//! FUA writes, zeroing, discards, graceful restarts and crashes, against a
//! model disk, comparing every byte read.
//!
//! After a crash, each sector may hold any value written to it since its
//! value last became durable (by a flush, or a FUA write of it): the model
//! keeps those candidates per sector and checks the reopened cache against
//! them.

use std::sync::Arc;
use std::time::Duration;

use pcache_pmem::format::format;
use pcache_pmem::{BackingDev, Cache, CacheDev, CacheOptions, CrashStrategy, MemBacking, SimPmem};
use proptest::prelude::*;

const SECTOR: u64 = 512;
const BACKING: u64 = 10 << 20;
const SECTORS: usize = (BACKING / SECTOR) as usize;
const ZERO_BIT: u32 = 1 << 31;

/// Content of `off` as written by write `id` (0: the original content).
fn val(id: u32, off: u64) -> u8 {
    if id & ZERO_BIT != 0 {
        return 0;
    }
    let x = (u64::from(id).wrapping_mul(0x9E37_79B9) ^ off).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 56) as u8
}

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u32, sectors: u32, fua: bool },
    Zero { sector: u32, sectors: u32 },
    Read { sector: u32, sectors: u32 },
    Discard { sector: u32, sectors: u32 },
    Flush,
    Restart,
    Crash(CrashStrategy),
}

fn op() -> impl Strategy<Value = Op> {
    let at = 0u32..SECTORS as u32;
    // Mostly small requests; sometimes up to 2.25 MiB, crossing slices.
    let len = prop_oneof![20 => 1u32..=32, 4 => 1u32..=256, 1 => 1u32..=4608];
    prop_oneof![
        30 => (at.clone(), len.clone(), proptest::bool::weighted(0.1))
            .prop_map(|(sector, sectors, fua)| Op::Write { sector, sectors, fua }),
        3 => (at.clone(), 1u32..64).prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
        30 => (at.clone(), len).prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        2 => (at, 1u32..64).prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        3 => Just(Op::Flush),
        1 => Just(Op::Restart),
        1 => prop_oneof![
            Just(CrashStrategy::NothingExtra),
            Just(CrashStrategy::Everything),
            any::<u64>().prop_map(|seed| CrashStrategy::Random { seed }),
        ]
        .prop_map(Op::Crash),
    ]
}

struct Model {
    /// The write whose data each sector holds now.
    cur: Vec<u32>,
    /// Writes each sector may hold after a crash.
    candidates: Vec<Vec<u32>>,
    next_id: u32,
}

impl Model {
    fn new() -> Self {
        Self { cur: vec![0; SECTORS], candidates: vec![vec![0]; SECTORS], next_id: 1 }
    }

    fn write(&mut self, range: std::ops::Range<usize>, id: u32, durable: bool) {
        for s in range {
            self.cur[s] = id;
            if durable {
                self.candidates[s] = vec![id];
            } else {
                self.candidates[s].push(id);
            }
        }
    }

    fn flush(&mut self) {
        for (c, cur) in self.candidates.iter_mut().zip(&self.cur) {
            *c = vec![*cur];
        }
    }

    fn expected(&self, sector: usize, sectors: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(sectors * SECTOR as usize);
        for s in sector..sector + sectors {
            let base = s as u64 * SECTOR;
            v.extend((0..SECTOR).map(|i| val(self.cur[s], base + i)));
        }
        v
    }
}

type TestCache = Arc<Cache<SimPmem, Arc<MemBacking>>>;

fn start(dev: &Arc<CacheDev<SimPmem>>, backing: &Arc<MemBacking>, queues: u32, data_crc: bool) -> TestCache {
    let opts = CacheOptions {
        cache_size: Some(64 * (16 << 20)),
        queues,
        data_crc,
        kset_flush_delay: Duration::from_secs(3600),
        ..Default::default()
    };
    Cache::start(dev.clone(), backing.clone(), &opts).expect("start").0
}

fn run(ops: &[Op], queues: u32, data_crc: bool) -> Result<(), TestCaseError> {
    let pmem = SimPmem::new(2 << 30);
    format(&pmem, false).unwrap();
    let backing = Arc::new(MemBacking::new("/model/backing", BACKING));
    let original: Vec<u8> = (0..BACKING).map(|o| val(0, o)).collect();
    backing.write_at(0, &original).unwrap();
    let mut dev = CacheDev::open(pmem).unwrap();
    let mut cache = start(&dev, &backing, queues, data_crc);
    let mut m = Model::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { sector, sectors, .. } | Op::Zero { sector, sectors } => {
                let sectors = sectors.min(SECTORS as u32 - sector);
                let zero = matches!(op, Op::Zero { .. });
                let fua = matches!(op, Op::Write { fua: true, .. });
                let id = m.next_id | if zero { ZERO_BIT } else { 0 };
                m.next_id += 1;
                let off = u64::from(sector) * SECTOR;
                let len = u64::from(sectors) * SECTOR;
                if zero {
                    cache.write_zeroes(off, len, false).unwrap();
                } else {
                    let data: Vec<u8> = (off..off + len).map(|o| val(id, o)).collect();
                    cache.write(off, &data, fua).unwrap();
                }
                m.write(sector as usize..(sector + sectors) as usize, id, fua);
            }
            Op::Read { sector, sectors } | Op::Discard { sector, sectors } => {
                let sectors = sectors.min(SECTORS as u32 - sector);
                let off = u64::from(sector) * SECTOR;
                if matches!(op, Op::Discard { .. }) {
                    cache.discard(off, u64::from(sectors) * SECTOR).unwrap();
                    continue;
                }
                let mut buf = vec![0u8; (sectors as u64 * SECTOR) as usize];
                cache.read(off, &mut buf).unwrap();
                let want = m.expected(sector as usize, sectors as usize);
                if buf != want {
                    let at = buf.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                    prop_assert!(false, "step {step} {op:?}: first mismatch at byte {}", off + at as u64);
                }
            }
            Op::Flush => {
                cache.flush().unwrap();
                m.flush();
            }
            Op::Restart => {
                cache.stop().unwrap();
                drop(cache);
                cache = start(&dev, &backing, queues, data_crc);
                m.flush();
            }
            Op::Crash(strategy) => {
                let image = dev.pmem().crash_image(strategy);
                drop(cache);
                dev = CacheDev::open(image).unwrap();
                cache = start(&dev, &backing, queues, data_crc);
                // Every sector must hold one of its candidates.
                let mut buf = vec![0u8; BACKING as usize];
                cache.read(0, &mut buf).unwrap();
                for s in 0..SECTORS {
                    let base = s as u64 * SECTOR;
                    let bytes = &buf[base as usize..(base + SECTOR) as usize];
                    let found = m.candidates[s]
                        .iter()
                        .copied()
                        .find(|&id| bytes.iter().enumerate().all(|(i, b)| *b == val(id, base + i as u64)));
                    let Some(id) = found else {
                        prop_assert!(false, "step {step} {op:?}: sector {s} holds none of {:?}", m.candidates[s]);
                        unreachable!()
                    };
                    m.cur[s] = id;
                }
                m.flush();
            }
        }
    }
    // The image passes the checker.
    cache.stop().unwrap();
    let report = pcache_format::image::scan(&pcache_pmem::AsMedia(dev.pmem()), Default::default());
    prop_assert_eq!(report.problems(), 0, "{:?}", report.findings);
    Ok(())
}

/// Cases to run: `PCACHE_MODEL_CASES`, default 8.
fn cases() -> u32 {
    std::env::var("PCACHE_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

proptest! {
    #![proptest_config(ProptestConfig { max_shrink_iters: 200, ..ProptestConfig::with_cases(cases()) })]

    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 2000..3000), queues in 1u32..=4, data_crc: bool) {
        run(&ops, queues, data_crc)?;
    }
}
