//! The simulator's tests: its model of persistence, case by case.

mod props;

use super::state::PAGE;
use super::*;
use crate::pmem::CACHE_LINE;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn word(sim: &SimPmem, off: u64) -> [u8; 8] {
    let mut w = [0; 8];
    sim.read(off, &mut w).unwrap();
    w
}

fn strategies(seed: u64) -> Vec<CrashStrategy> {
    let mut s = vec![CrashStrategy::NothingExtra, CrashStrategy::Everything];
    s.extend((0..8).map(|i| CrashStrategy::Random { seed: seed.wrapping_add(i) }));
    s
}

/// Every crash image of the current state: the strategies, plus all
/// combinations when there are at most `limit`.
fn images(sim: &SimPmem, seed: u64, limit: usize) -> Vec<SimPmem> {
    let snap = sim.snapshot();
    let mut all: Vec<SimPmem> = strategies(seed).into_iter().map(|s| snap.image(s)).collect();
    all.extend(snap.exhaustive(limit).unwrap_or_default());
    all
}

// Test 2: data never flushed may or may not survive.
#[test]
fn unflushed_data_may_or_may_not_survive() {
    let sim = SimPmem::new(PAGE);
    sim.write(64, &[7; 8]).unwrap();
    assert_eq!(word(&sim, 64), [7; 8], "the current view has it");
    assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 64), [0; 8]);
    assert_eq!(word(&sim.crash_image(CrashStrategy::Everything), 64), [7; 8]);
    let outcomes: HashSet<[u8; 8]> =
        (0..64).map(|seed| word(&sim.crash_image(CrashStrategy::Random { seed }), 64)).collect();
    assert_eq!(outcomes, HashSet::from([[0; 8], [7; 8]]), "random images show both outcomes");
    let all: HashSet<[u8; 8]> = sim.crash_images_exhaustive(10).unwrap().iter().map(|i| word(i, 64)).collect();
    assert_eq!(all, HashSet::from([[0; 8], [7; 8]]));
}

// Random images: every prefix length occurs, 0 and full often; lines
// choose independently; the same seed gives the same image.
#[test]
fn random_strategy_distribution() {
    let sim = SimPmem::new(PAGE);
    for k in 1..=4u8 {
        sim.write(0, &[k; 8]).unwrap();
    }
    for line in 1..8 {
        sim.write(line * CACHE_LINE, &[9; 8]).unwrap();
    }
    let snap = sim.snapshot();
    let mut counts = [0usize; 5];
    let mut mixed = false;
    for seed in 0..400 {
        let image = snap.image(CrashStrategy::Random { seed });
        counts[word(&image, 0)[0] as usize] += 1;
        let others: HashSet<u8> = (1..8).map(|line| word(&image, line * CACHE_LINE)[0]).collect();
        mixed |= others.len() == 2;
        let again = snap.image(CrashStrategy::Random { seed });
        assert_eq!(image.read_vec(0, 512).unwrap(), again.read_vec(0, 512).unwrap());
    }
    // Expected: 160 for none and for all, 60 for each other length.
    assert!(counts[0] >= 120 && counts[4] >= 120, "{counts:?}");
    assert!(counts[1..4].iter().all(|&c| c >= 30), "{counts:?}");
    assert!(mixed, "lines choose their prefixes independently");
}

// Test 3: a flush is durable only after a fence.
#[test]
fn flush_needs_fence() {
    let sim = SimPmem::new(PAGE);
    sim.write(128, &[9; 16]).unwrap();
    sim.flush(128, 16).unwrap();
    assert_eq!(sim.read_vec(128, 16).unwrap(), [9; 16]);
    assert_eq!(sim.crash_image(CrashStrategy::NothingExtra).read_vec(128, 16).unwrap(), [0; 16]);
    assert_eq!(sim.pending_lines(), 1);
    sim.fence().unwrap();
    assert_eq!(sim.pending_lines(), 0);
    for image in images(&sim, 1, 256) {
        assert_eq!(image.read_vec(128, 16).unwrap(), [9; 16]);
    }

    // The same for the _nodrain variants.
    sim.copy_nodrain(256, &[3; 300]).unwrap();
    sim.zero_nodrain(128, 8).unwrap();
    assert_eq!(sim.read_vec(120, 16).unwrap(), [0; 16]);
    let before = sim.crash_image(CrashStrategy::NothingExtra);
    assert_eq!(before.read_vec(256, 300).unwrap(), [0; 300]);
    assert_eq!(before.read_vec(128, 8).unwrap(), [9; 8]);
    sim.fence().unwrap();
    let after = sim.crash_image(CrashStrategy::NothingExtra);
    assert_eq!(after.read_vec(256, 300).unwrap(), [3; 300]);
    assert_eq!(after.read_vec(128, 16).unwrap(), [0, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9]);

    // And for the _persist ones, with nothing left pending.
    sim.copy_persist(1000, b"hello").unwrap();
    sim.zero_persist(258, 2).unwrap();
    assert_eq!(sim.pending_lines(), 0);
    let image = sim.crash_image(CrashStrategy::NothingExtra);
    assert_eq!(image.read_vec(1000, 5).unwrap(), b"hello");
    assert_eq!(image.read_vec(256, 4).unwrap(), [3, 3, 0, 0]);
}

// A flush covers the stores made before it, not later ones to the same line.
#[test]
fn flush_covers_only_earlier_stores() {
    let sim = SimPmem::new(PAGE);
    sim.write(0, &[1; 8]).unwrap();
    sim.flush(0, 1).unwrap();
    sim.write(8, &[2; 8]).unwrap();
    sim.write(0, &[3; 8]).unwrap();
    sim.fence().unwrap();
    let image = sim.crash_image(CrashStrategy::NothingExtra);
    assert_eq!(image.read_vec(0, 16).unwrap(), [[1; 8], [0; 8]].concat());
    assert_eq!((sim.pending_lines(), sim.pending_units()), (1, 2));
    // Prefixes of what is still pending: nothing, then [2], then [2] and [3].
    let seen: Vec<Vec<u8>> =
        sim.crash_images_exhaustive(3).unwrap().iter().map(|i| i.read_vec(0, 16).unwrap()).collect();
    assert_eq!(seen, [[[1; 8], [0; 8]].concat(), [[1; 8], [2; 8]].concat(), [[3; 8], [2; 8]].concat()]);
    // A fence without a new flush changes nothing.
    sim.fence().unwrap();
    assert_eq!(sim.pending_units(), 2);
    sim.persist(15, 1).unwrap();
    assert_eq!(sim.pending_units(), 0);
    assert_eq!(sim.crash_image(CrashStrategy::NothingExtra).read_vec(0, 16).unwrap(), [[3; 8], [2; 8]].concat());
}

// Test 5: within one line, a later store survives only with every earlier one.
#[test]
fn program_order_prefix_per_line() {
    let sim = SimPmem::new(PAGE);
    let (a, b) = (64, 72); // two words of line 1
    for k in 1..=5u8 {
        sim.write(a, &[k; 8]).unwrap();
        sim.write(b, &[k + 100; 8]).unwrap();
    }
    // Which round of A and of B survived (0 = none).
    let rounds = |image: &SimPmem| {
        let (wa, wb) = (word(image, a), word(image, b));
        (wa[0], if wb[0] == 0 { 0 } else { wb[0] - 100 })
    };
    let valid = |(ra, rb): (u8, u8)| ra == rb || ra == rb + 1;
    let seen: HashSet<(u8, u8)> = sim.crash_images_exhaustive(100).unwrap().iter().map(rounds).collect();
    let expected: HashSet<(u8, u8)> = (0..=5).flat_map(|k| [(k, k), (k + 1, k)]).filter(|&(a, _)| a <= 5).collect();
    assert_eq!(seen.len(), 11);
    assert_eq!(seen, expected);
    for seed in 0..200 {
        let r = rounds(&sim.crash_image(CrashStrategy::Random { seed }));
        assert!(valid(r), "seed {seed}: {r:?} is not a prefix");
    }

    // Lines are independent: a later store to another line may survive
    // without an earlier one to this line.
    let sim = SimPmem::new(PAGE);
    sim.write(0, &[1; 8]).unwrap();
    sim.write(64, &[2; 8]).unwrap();
    let images = sim.crash_images_exhaustive(4).unwrap();
    let seen: HashSet<([u8; 8], [u8; 8])> = images.iter().map(|i| (word(i, 0), word(i, 64))).collect();
    assert_eq!(seen.len(), 4);
    assert!(seen.contains(&([0; 8], [2; 8])));
    assert!(sim.crash_images_exhaustive(3).is_none());
}

// Test 6: aligned 8-byte stores never tear; wider or unaligned ones may,
// at 8-byte boundaries only.
#[test]
fn eight_byte_atomicity() {
    let sim = SimPmem::new(PAGE);
    sim.write(0, &[0xAA; 64]).unwrap();
    sim.persist(0, 64).unwrap();
    for k in 1..=4u8 {
        sim.write(8, &[k; 8]).unwrap();
    }
    let mut seen = HashSet::new();
    let mut all = sim.crash_images_exhaustive(100).unwrap();
    all.extend((0..100).map(|seed| sim.crash_image(CrashStrategy::Random { seed })));
    for image in &all {
        let w = word(image, 8);
        assert!(w.iter().all(|&b| b == w[0]), "torn aligned word {w:x?}");
        seen.insert(w[0]);
    }
    assert_eq!(seen, HashSet::from([0xAA, 1, 2, 3, 4]));

    // An unaligned 16-byte store covers three words, and may tear between them.
    let sim = SimPmem::new(PAGE);
    sim.write(0, &[0xAA; 24]).unwrap();
    sim.persist(0, 24).unwrap();
    sim.write(4, &[0x55; 16]).unwrap();
    let images = sim.crash_images_exhaustive(100).unwrap();
    assert_eq!(images.len(), 4);
    let mut torn = false;
    for image in &images {
        let bytes = image.read_vec(0, 24).unwrap();
        assert_eq!(&bytes[..4], [0xAA; 4]);
        assert_eq!(&bytes[20..], [0xAA; 4]);
        for unit in [&bytes[4..8], &bytes[8..16], &bytes[16..20]] {
            assert!(unit.iter().all(|&b| b == unit[0]), "torn inside a unit: {bytes:x?}");
        }
        torn |= bytes[4] == 0x55 && bytes[8] == 0xAA;
    }
    assert!(torn, "the store can tear at the 8-byte boundary");

    // Across a line boundary, the second half may survive without the first.
    let sim = SimPmem::new(PAGE);
    sim.write(60, &[0x55; 8]).unwrap();
    let seen: HashSet<Vec<u8>> =
        sim.crash_images_exhaustive(4).unwrap().iter().map(|i| i.read_vec(60, 8).unwrap()).collect();
    assert!(seen.contains(&[0, 0, 0, 0, 0x55, 0x55, 0x55, 0x55][..]));
    assert_eq!(seen.len(), 4);
}

// Test 7: a fence makes durable only the calling thread's flushes.
#[test]
fn fences_are_per_thread() {
    let sim = SimPmem::new(PAGE);
    sim.write(0, &[1; 8]).unwrap();
    sim.flush(0, 8).unwrap();
    sim.copy_nodrain(64, &[2; 8]).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| sim.fence().unwrap()).join().unwrap();
    });
    let image = sim.crash_image(CrashStrategy::NothingExtra);
    assert_eq!(word(&image, 0), [0; 8], "another thread's fence does not drain our flush");
    assert_eq!(word(&image, 64), [0; 8], "nor our non-temporal stores");
    sim.fence().unwrap();
    let image = sim.crash_image(CrashStrategy::NothingExtra);
    assert_eq!(word(&image, 0), [1; 8]);
    assert_eq!(word(&image, 64), [2; 8]);

    // A line written by one thread and flushed and fenced by another is
    // written back whole.
    sim.write(128, &[3; 8]).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| sim.persist(128, 8).unwrap()).join().unwrap();
    });
    assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 128), [3; 8]);
    assert_eq!(sim.fence_count(), 3);
}

// Test 8: bad ranges fail cleanly; media errors fail overlapping reads only.
#[test]
fn out_of_bounds_and_media_errors() {
    let size = 4 * PAGE;
    let sim = SimPmem::new(size);
    let bad = [(u64::MAX, 1), (1, u64::MAX), (u64::MAX, u64::MAX), (size, 1), (size - 1, 2), (0, size + 1)];
    let is_oob = |r: Result<(), PmemError>, off: u64, len: u64| matches!(r, Err(PmemError::OutOfBounds { off: o, len: l, size: s }) if o == off && l == len && s == size);
    for (off, len) in bad {
        assert!(is_oob(sim.flush(off, len), off, len), "flush {off:#x}+{len:#x}");
        assert!(is_oob(sim.zero_nodrain(off, len), off, len), "zero {off:#x}+{len:#x}");
        assert!(is_oob(sim.zero_persist(off, len), off, len));
        assert!(is_oob(sim.persist(off, len), off, len));
        assert!(is_oob(sim.inject_media_error(off, len), off, len));
        assert!(is_oob(sim.read_vec(off, len).map(drop), off, len));
    }
    for off in [u64::MAX, size, size - 1] {
        let mut buf = [0; 2];
        assert!(is_oob(sim.read(off, &mut buf), off, 2));
        assert!(is_oob(sim.write(off, &buf), off, 2));
        assert!(is_oob(sim.copy_nodrain(off, &buf), off, 2));
        assert!(is_oob(sim.copy_persist(off, &buf), off, 2));
    }
    assert_eq!(sim.write_count(), 0, "failed writes are not counted");
    assert_eq!(sim.touched_pages(), 0);
    // Empty accesses at the very end are fine.
    sim.read(size, &mut []).unwrap();
    sim.write(size, &[]).unwrap();
    sim.persist(size, 0).unwrap();
    sim.write(size - 2, &[1, 2]).unwrap();
    assert_eq!(sim.read_vec(size - 2, 2).unwrap(), [1, 2]);

    sim.write(100, &[5; 10]).unwrap();
    sim.inject_media_error(100, 10).unwrap();
    sim.inject_media_error(200, 0).unwrap();
    let mut buf = [0; 10];
    sim.read(90, &mut buf).unwrap();
    sim.read(110, &mut buf).unwrap();
    sim.read(195, &mut buf).unwrap();
    sim.read(105, &mut []).unwrap();
    assert!(matches!(sim.read(105, &mut buf[..1]), Err(PmemError::Media { off: 105, len: 1 })));
    assert!(matches!(sim.read(91, &mut buf), Err(PmemError::Media { off: 91, len: 10 })));
    assert!(matches!(sim.read_vec(0, size), Err(PmemError::Media { off: 0, len }) if len == size));
    // Writes still work; crash images keep the errors.
    sim.copy_persist(100, &[6; 10]).unwrap();
    let image = sim.crash_image(CrashStrategy::NothingExtra);
    assert!(matches!(image.read(109, &mut buf[..1]), Err(PmemError::Media { .. })));
    sim.clear_media_errors();
    sim.read(100, &mut buf).unwrap();
    assert_eq!(buf, [6; 10]);
}

// A failed fence makes nothing durable and is not counted.
#[test]
fn failed_fences_make_nothing_durable() {
    let sim = SimPmem::new(4 * PAGE);
    sim.fail_fences(2);
    sim.write(64, &[9; 8]).unwrap();
    sim.flush(64, 8).unwrap();
    assert!(matches!(sim.fence(), Err(PmemError::Io { op: "fence", .. })));
    assert!(sim.persist(64, 8).is_err());
    assert_eq!(sim.fence_count(), 0);
    assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 64), [0; 8]);
    sim.fence().unwrap();
    assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 64), [9; 8]);
    sim.fail_fences(1);
    assert!(sim.crash_image(CrashStrategy::NothingExtra).fence().is_ok(), "images do not inherit it");
}

// Test 9: the hook sees every fence once, in order, before it takes effect.
#[test]
fn hook_sees_fences_before_they_take_effect() {
    let sim = SimPmem::new(PAGE);
    let fences = Arc::new(Mutex::new(Vec::new()));
    let writes = Arc::new(Mutex::new(Vec::new()));
    let before_second = Arc::new(Mutex::new(None));
    {
        let (fences, writes, before_second) = (fences.clone(), writes.clone(), before_second.clone());
        sim.set_hook(Some(Box::new(move |e: &SimEvent<'_>| match e.kind() {
            SimEventKind::Fence => {
                fences.lock().unwrap().push(e.index());
                if e.index() == 1 {
                    *before_second.lock().unwrap() = Some(e.snapshot());
                }
            }
            SimEventKind::Write => writes.lock().unwrap().push(e.index()),
        })));
    }
    sim.write(0, &[1; 8]).unwrap();
    sim.persist(0, 8).unwrap(); // fence 0
    sim.copy_nodrain(64, &[2; 8]).unwrap();
    sim.fence().unwrap(); // fence 1: makes line 1 durable
    sim.zero_persist(0, 8).unwrap(); // fence 2
    sim.fence().unwrap(); // fence 3
    sim.fence().unwrap(); // fence 4
    assert_eq!(*fences.lock().unwrap(), [0, 1, 2, 3, 4]);
    assert_eq!(*writes.lock().unwrap(), [0, 1, 2]);
    assert_eq!((sim.fence_count(), sim.write_count()), (5, 3));

    let snap = before_second.lock().unwrap().take().unwrap();
    assert_eq!((snap.pending_lines(), snap.pending_units()), (1, 1));
    assert_eq!(word(&snap.image(CrashStrategy::NothingExtra), 64), [0; 8], "not yet durable");
    assert_eq!(word(&snap.image(CrashStrategy::NothingExtra), 0), [1; 8], "fence 0 was");
    assert_eq!(word(&snap.image(CrashStrategy::Everything), 64), [2; 8]);
    assert_eq!(word(&sim.crash_image(CrashStrategy::NothingExtra), 64), [2; 8]);

    sim.set_hook(None);
    sim.fence().unwrap();
    assert_eq!(fences.lock().unwrap().len(), 5);
}

#[test]
fn hook_calling_back_panics_and_is_removed() {
    let sim = Arc::new(SimPmem::new(PAGE));
    let called = Arc::new(AtomicBool::new(false));
    {
        let (sim2, called) = (Arc::downgrade(&sim), called.clone());
        sim.set_hook(Some(Box::new(move |_: &SimEvent<'_>| {
            called.store(true, Ordering::SeqCst);
            if let Some(sim) = sim2.upgrade() {
                let _ = sim.fence_count();
            }
        })));
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.fence()));
    assert!(r.is_err());
    assert!(called.swap(false, Ordering::SeqCst));
    // The lock is usable again and the hook is gone.
    sim.fence().unwrap();
    assert!(!called.load(Ordering::SeqCst));
    assert_eq!(sim.fence_count(), 1);
    assert!(format!("{sim:?}").len() < 120);
}

// Test 10: a large device stays sparse, and crash images are cheap.
#[test]
fn large_sparse_device_and_many_images() {
    let size = 512 << 20;
    let sim = SimPmem::new(size);
    sim.write(0, &[1; 100]).unwrap();
    sim.copy_persist(size / 2, &[2; 5000]).unwrap();
    sim.write(size - 8, &[3; 8]).unwrap();
    sim.zero_persist(0, size / 4).unwrap();
    assert_eq!(sim.touched_pages(), 4);
    sim.zero_persist(0, size).unwrap();
    assert_eq!(sim.touched_pages(), 4, "zeroing untouched pages allocates nothing");
    assert_eq!(sim.read_vec(size / 2, 5000).unwrap(), vec![0; 5000]);
    sim.flush(0, size).unwrap();
    sim.fence().unwrap();
    assert_eq!(sim.pending_lines(), 0);

    // A workload over 50 pages spread over the device, partly fenced.
    for p in 0..50u64 {
        let off = p * (size / 50) / PAGE * PAGE;
        for line in 0..8 {
            sim.write(off + line * CACHE_LINE, &[p as u8 + 1; 24]).unwrap();
        }
        if p % 2 == 0 {
            sim.flush(off, 4 * CACHE_LINE).unwrap();
        }
    }
    sim.fence().unwrap();
    assert!(sim.touched_pages() <= 54);
    let snap = sim.snapshot();
    assert_eq!(snap.pending_lines(), 25 * 4 + 25 * 8);
    let start = std::time::Instant::now();
    let mut survived = 0usize;
    for seed in 0..2000 {
        let image = snap.image(CrashStrategy::Random { seed });
        assert!(image.touched_pages() <= 54);
        survived += image.read_vec(size / 50 / PAGE * PAGE, 1).unwrap()[0] as usize;
    }
    eprintln!("2000 crash images of a 50-page workload in {:?}", start.elapsed());
    assert!(survived > 0);
}

#[test]
fn crash_images_can_be_reused_and_crashed_again() {
    let sim = SimPmem::new(2 * PAGE);
    sim.copy_persist(PAGE - 4, &[1; 8]).unwrap();
    sim.write(0, &[2; 8]).unwrap();
    let image = sim.crash_image(CrashStrategy::NothingExtra);
    assert_eq!((image.pending_lines(), image.fence_count(), image.write_count()), (0, 0, 0));
    assert_eq!(image.read_vec(PAGE - 4, 8).unwrap(), [1; 8], "reads across a page boundary");
    image.write(PAGE - 8, &[3; 16]).unwrap();
    // The original is unaffected by writes to its image (pages are copy-on-write).
    assert_eq!(sim.read_vec(PAGE - 8, 16).unwrap(), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]);
    let again = image.crash_image(CrashStrategy::NothingExtra);
    assert_eq!(again.read_vec(PAGE - 4, 8).unwrap(), [1; 8]);
    image.persist(PAGE - 8, 16).unwrap();
    assert_eq!(image.crash_image(CrashStrategy::NothingExtra).read_vec(PAGE - 8, 16).unwrap(), [3; 16]);
    assert_eq!(again.read_vec(PAGE - 4, 8).unwrap(), [1; 8], "an older image is unaffected too");
    // Nothing pending: exactly one image.
    assert_eq!(again.crash_images_exhaustive(1).unwrap().len(), 1);
    assert!(again.crash_images_exhaustive(0).is_none());
}

#[test]
fn sim_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SimPmem>();
    check::<CrashState>();
}

#[test]
fn unwritten_ranges_are_known_without_a_read() {
    let sim = SimPmem::new(16 * PAGE);
    assert!(sim.unwritten(0, 16 * PAGE));
    assert!(!sim.unwritten(0, 0), "an empty range says nothing");
    assert!(!sim.unwritten(15 * PAGE, 2 * PAGE), "past the end");
    // Zeros change no page; anything else makes its page written, durable
    // or not.
    sim.zero_nodrain(PAGE, PAGE).unwrap();
    assert!(sim.unwritten(PAGE, PAGE));
    sim.write(3 * PAGE + 100, &[1]).unwrap();
    assert!(!sim.unwritten(3 * PAGE, 1));
    assert!(!sim.unwritten(0, 4 * PAGE));
    assert!(sim.unwritten(4 * PAGE, 12 * PAGE));
    // A range that fails to read is not known to read as zeros.
    sim.inject_media_error(8 * PAGE, 8).unwrap();
    assert!(!sim.unwritten(7 * PAGE, 2 * PAGE));
}
