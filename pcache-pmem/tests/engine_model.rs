//! Model-based test of the cache engine: random writes, reads, flushes,
//! FUA writes, zeroing, discards, writeback, GC, graceful restarts and
//! crashes from the test kit's workload alphabet, run by its rig against
//! its model disk, checking every byte read.
//!
//! After a crash, each sector may hold any value written to it since its
//! value last became durable (by a flush, or a FUA write of it): the model
//! keeps those candidates per sector and the rig checks the whole reopened
//! device against them.

use std::time::Duration;

use pcache_pmem::CacheOptions;
use pcache_pmem::format::format;
use pcache_pmem::testing::{CrashStrategy, Op, Rig, SECTOR, SimPmem};
use proptest::prelude::*;

const BACKING: u64 = 10 << 20;
const SECTORS: u64 = BACKING / SECTOR;

fn op() -> impl Strategy<Value = Op> {
    let at = 0..SECTORS;
    // Mostly small requests; sometimes up to 2.25 MiB, crossing slices.
    let len = prop_oneof![20 => 1u64..=32, 4 => 1u64..=256, 1 => 1u64..=4608];
    prop_oneof![
        30 => (at.clone(), len.clone(), proptest::bool::weighted(0.1))
            .prop_map(|(sector, sectors, fua)| Op::Write { sector, sectors, fua }),
        3 => (at.clone(), 1u64..64).prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
        30 => (at.clone(), len).prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        2 => (at, 1u64..64).prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        3 => Just(Op::Flush),
        1 => (1usize..=4).prop_map(|ksets| Op::WriteBack { ksets }),
        1 => Just(Op::Gc),
        1 => Just(Op::Restart),
        1 => prop_oneof![
            Just(CrashStrategy::NothingExtra),
            Just(CrashStrategy::Everything),
            any::<u64>().prop_map(|seed| CrashStrategy::Random { seed }),
        ]
        .prop_map(Op::Crash),
    ]
}

fn run(ops: &[Op], queues: u32, data_crc: bool) -> Result<(), TestCaseError> {
    let pmem = SimPmem::new(2 << 30);
    format(&pmem, false).unwrap();
    let opts = CacheOptions {
        cache_size: Some(64 * (16 << 20)),
        queues,
        data_crc,
        kset_flush_delay: Duration::from_secs(3600),
        ..Default::default()
    };
    let mut rig = Rig::new(pmem, "/model/backing", SECTORS, opts).map_err(TestCaseError::fail)?;
    for (step, op) in ops.iter().enumerate() {
        rig.step(*op).map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
    }
    // The image passes the checker.
    rig.finish().map(drop).map_err(TestCaseError::fail)
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
