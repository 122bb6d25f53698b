//! Property tests of the simulator: random stores, flushes and fences in a
//! small region, every crash image checked.

use super::super::state::PAGE;
use super::images;
use crate::pmem::{CACHE_LINE, Pmem};
use crate::testing::sim::{CrashStrategy, SimPmem};
use proptest::prelude::*;

/// The region the property tests store to: 4 lines straddling a page boundary.
const BASE: u64 = PAGE - 2 * CACHE_LINE;
const REGION: u64 = 4 * CACHE_LINE;

fn region(sim: &SimPmem) -> Vec<u8> {
    sim.read_vec(BASE, REGION).unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Flush(u64, u64),
    Fence,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..REGION, prop::collection::vec(1..=255u8, 1..20)).prop_map(|(off, mut data)| {
            data.truncate((REGION - off) as usize);
            Op::Write(BASE + off, data)
        }),
        2 => (0..REGION, 0..REGION).prop_map(|(off, len)| Op::Flush(BASE + off, len.min(REGION - off))),
        1 => Just(Op::Fence),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    // Test 1: what was written, flushed and fenced (and not overwritten
    // since) is in every crash image; the current view is program order.
    #[test]
    fn flushed_and_fenced_data_survives(ops in prop::collection::vec(op(), 1..60), seed in any::<u64>()) {
        let sim = SimPmem::new(2 * PAGE);
        let n = REGION as usize;
        let mut current = vec![0u8; n];
        // The value every crash image must hold, if known.
        let mut must: Vec<Option<u8>> = vec![Some(0); n];
        let mut flushed = vec![false; n];
        for op in &ops {
            match op {
                Op::Write(off, data) => {
                    sim.write(*off, data).unwrap();
                    let at = (off - BASE) as usize;
                    current[at..at + data.len()].copy_from_slice(data);
                    for i in at..at + data.len() {
                        must[i] = None;
                        flushed[i] = false;
                    }
                }
                Op::Flush(off, len) => {
                    sim.flush(*off, *len).unwrap();
                    if *len > 0 {
                        // Whole lines are written back.
                        let first = (off / CACHE_LINE * CACHE_LINE).max(BASE);
                        let end = (off + len).div_ceil(CACHE_LINE) * CACHE_LINE;
                        for f in &mut flushed[(first - BASE) as usize..(end - BASE) as usize] {
                            *f = true;
                        }
                    }
                }
                Op::Fence => {
                    sim.fence().unwrap();
                    for i in 0..n {
                        if flushed[i] {
                            must[i] = Some(current[i]);
                            flushed[i] = false;
                        }
                    }
                    for image in images(&sim, seed, 256) {
                        prop_assert_eq!(image.pending_lines(), 0);
                        let got = region(&image);
                        for i in 0..n {
                            if let Some(v) = must[i] {
                                prop_assert_eq!(got[i], v, "byte {:#x} after {:?}", BASE + i as u64, ops);
                            }
                        }
                    }
                }
            }
            prop_assert_eq!(region(&sim), current.clone());
        }
        // Everything keeps exactly the current view.
        prop_assert_eq!(region(&sim.crash_image(CrashStrategy::Everything)), current);
    }

    // Test 4: no crash image holds a byte value that was never stored there.
    #[test]
    fn no_byte_out_of_thin_air(ops in prop::collection::vec(op(), 1..60), seed in any::<u64>()) {
        let sim = SimPmem::new(2 * PAGE);
        let n = REGION as usize;
        // Per byte, which values were ever stored (0 is the initial value).
        let mut initial = [false; 256];
        initial[0] = true;
        let mut stored = vec![initial; n];
        for (k, op) in ops.iter().enumerate() {
            match op {
                Op::Write(off, data) => {
                    sim.write(*off, data).unwrap();
                    for (i, &b) in data.iter().enumerate() {
                        stored[(off - BASE) as usize + i][b as usize] = true;
                    }
                }
                Op::Flush(off, len) => sim.flush(*off, *len).unwrap(),
                Op::Fence => sim.fence().unwrap(),
            }
            for (j, image) in images(&sim, seed.wrapping_add(k as u64), 64).iter().enumerate() {
                // The whole device for the strategy images, the region for all.
                let all = image.read_vec(0, 2 * PAGE).unwrap();
                let (before, rest) = all.split_at(BASE as usize);
                let (got, after) = rest.split_at(n);
                for i in 0..n {
                    prop_assert!(stored[i][got[i] as usize], "byte {:#x} = {:#x} never stored", BASE + i as u64, got[i]);
                }
                if j < 10 {
                    prop_assert!(before.iter().chain(after).all(|&b| b == 0), "stored outside the region");
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Write(u64, Vec<u8>),
    Persist(u64, Vec<u8>),
    Flush(u64, u64),
    Fence,
}

fn step() -> impl Strategy<Value = Step> {
    let data = |off: u64, mut data: Vec<u8>| {
        data.truncate((REGION - off) as usize);
        (BASE + off, data)
    };
    prop_oneof![
        2 => (0..REGION, prop::collection::vec(0..=255u8, 1..40)).prop_map(move |(o, d)| {
            let (off, d) = data(o, d);
            Step::Write(off, d)
        }),
        3 => (0..REGION, prop::collection::vec(prop_oneof![Just(0u8), 1..=255u8], 1..200)).prop_map(move |(o, d)| {
            let (off, d) = data(o, d);
            Step::Persist(off, d)
        }),
        1 => (0..REGION, 0..REGION).prop_map(|(off, len)| Step::Flush(BASE + off, len.min(REGION - off))),
        1 => Just(Step::Fence),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    // Test 4: `copy_persist` without a hook (which may skip the store
    // units) leaves the state a store, a flush and a fence leave (what it
    // does with a hook): the same current view, and the same crash images.
    #[test]
    fn copy_persist_without_a_hook_is_store_flush_fence(steps in prop::collection::vec(step(), 1..40)) {
        let fast = SimPmem::new(4 * PAGE);
        let slow = SimPmem::new(4 * PAGE);
        slow.set_hook(Some(Box::new(|_| {})));
        for s in &steps {
            for sim in [&fast, &slow] {
                match s {
                    Step::Write(off, d) => sim.write(*off, d).unwrap(),
                    Step::Persist(off, d) => sim.copy_persist(*off, d).unwrap(),
                    Step::Flush(off, len) => sim.flush(*off, *len).unwrap(),
                    Step::Fence => sim.fence().unwrap(),
                }
            }
            prop_assert_eq!(region(&fast), region(&slow));
            let (f, s) = (fast.snapshot(), slow.snapshot());
            for strategy in [CrashStrategy::NothingExtra, CrashStrategy::Everything] {
                prop_assert_eq!(region(&f.image(strategy)), region(&s.image(strategy)), "{:?}", strategy);
            }
        }
    }
}
