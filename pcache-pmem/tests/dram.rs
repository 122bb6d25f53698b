//! DRAM per cached key: the index must stay within 48 bytes a key.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use pcache_pmem::cache::index::{Delta, IKey, KeyState, Slice};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn key(len: u32) -> IKey {
    IKey { seg_gen: 1, len, cache_seg: 1, seg_off: 0, crc: 0, orig_delta: 0, orig_len: len, state: KeyState::Dirty }
}

/// Bytes per key of 4 KiB keys inserted at `offsets`, in that order, into
/// slices of 4 MiB. The offsets are allocated before counting starts (and
/// freed after it ends), so only the index is counted.
fn per_key(offsets: &[u64]) -> f64 {
    let before = LIVE.load(Ordering::Relaxed);
    let mut slices: Vec<Slice> = (0..256).map(|_| Slice::default()).collect();
    let mut d = Delta::default();
    for &off in offsets {
        slices[(off >> 22) as usize].insert(off, key(4096), &mut d);
    }
    let after = LIVE.load(Ordering::Relaxed);
    let bytes = (after - before) as f64 - 256.0 * std::mem::size_of::<Slice>() as f64;
    drop(slices);
    bytes / offsets.len() as f64
}

#[test]
fn index_dram_per_key_is_at_most_48_bytes() {
    let n = 256 * 1024u64; // 1 GiB of 4 KiB keys over 256 slices
    let sequential: Vec<u64> = (0..n).map(|i| i * 4096).collect();
    let sequential = per_key(&sequential);
    let mut x = 7u64;
    let mut order: Vec<u64> = (0..n).collect();
    for i in (1..order.len()).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    let random: Vec<u64> = order.iter().map(|i| i * 4096).collect();
    let random = per_key(&random);
    println!("index DRAM per key: {sequential:.1} bytes (sequential inserts), {random:.1} bytes (random inserts)");
    assert!(sequential <= 48.0, "sequential: {sequential:.1} bytes per key");
    assert!(random <= 48.0, "random: {random:.1} bytes per key");
}
