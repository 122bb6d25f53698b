//! The cache engine on the crash simulator, driven by arbitrary sequences of
//! the test kit's ops (writes, reads, flushes, FUA writes, zeroing,
//! discards, writeback, GC, graceful restarts and crashes) and checked by
//! its rig against its model disk: every read must return what the model
//! allows, a crash may only lose writes not yet flushed, and the image must
//! pass the checker at the end.
//!
//! Every case starts from one device, prepared once per process: formatted,
//! with the (empty, stopped) cache of the 256 KiB backing device already on
//! it, so a case pays for opening and starting it, not for creating it.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pcache_pmem::CacheOptions;
use pcache_pmem::format::format;
use pcache_pmem::testing::{CrashState, CrashStrategy, Op, Rig, SimPmem};

/// The backing device: 256 KiB, 512 sectors.
const SECTORS: u64 = 512;
const PATH: &str = "/fuzz/backing";
/// Ops a case runs at most.
const MAX_OPS: usize = 64;

fn opts() -> CacheOptions {
    CacheOptions {
        cache_size: Some(10 << 24),
        kset_flush_delay: Duration::from_secs(3600),
        background: false,
        gc_percent: Some(0),
        ..CacheOptions::default()
    }
}

/// The device every case starts from.
fn prepared() -> &'static CrashState {
    static PREPARED: OnceLock<CrashState> = OnceLock::new();
    PREPARED.get_or_init(|| {
        let pmem = SimPmem::new(512 << 20);
        format(&pmem, false).expect("format");
        let rig = Rig::new(pmem, PATH, SECTORS, opts()).expect("create the cache");
        rig.finish().expect("stop the new cache")
    })
}

fuzz_target!(|ops: Vec<Op>| {
    if ops.len() > MAX_OPS {
        return;
    }
    let pmem = prepared().image(CrashStrategy::Everything);
    let mut rig = Rig::new(pmem, PATH, SECTORS, opts()).expect("start");
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = rig.step(*op) {
            panic!("op {i} {op:?}: {e}");
        }
    }
    if let Err(e) = rig.finish() {
        panic!("{e}");
    }
});
