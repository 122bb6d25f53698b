//! Dirty data that cannot be written back: writeback stops at it but keeps
//! everything before it, says why (`Cache::stuck`), `detach` refuses
//! naming it, and `detach_salvage` writes back everything else and lists
//! exactly what it could not.

use std::sync::Arc;
use std::time::Duration;

use pcache_format::Key;
use pcache_format::media::{LogPos, LogStep, LogWalk};
use pcache_pmem::cache::detach::{LostExtent, detach_salvage};
use pcache_pmem::format::format;
use pcache_pmem::testing::{MemBacking, SimPmem};
use pcache_pmem::{AsMedia, BackingDev, Cache, CacheDev, CacheOptions, EngineError, Pmem, detach};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = 40;
/// What the backing device holds before anything is written back.
const OLD: u8 = 0xee;

fn opts() -> CacheOptions {
    CacheOptions {
        cache_size: Some(256 * MIB),
        data_crc: true,
        kset_flush_delay: Duration::from_secs(3600),
        background: false,
        ..Default::default()
    }
}

fn pattern(i: u64) -> u8 {
    i as u8 + 1
}

struct Rig {
    dev: Arc<CacheDev<SimPmem>>,
    backing: Arc<MemBacking>,
    free_before: u32,
}

impl Rig {
    fn new(name: &str) -> Self {
        let pmem = SimPmem::new(512 * MIB);
        format(&pmem, false).unwrap();
        let dev = CacheDev::open(pmem).unwrap();
        let backing = Arc::new(MemBacking::new(format!("/salvage/{name}"), 16 * MIB));
        backing.write_at(0, &vec![OLD; 16 * MIB as usize]).unwrap();
        let free_before = dev.free_segments();
        Self { dev, backing, free_before }
    }

    /// Starts the cache and writes blocks 0..40, each `pattern(i)`; with
    /// `kset_each`, each in its own kset.
    fn start_and_write(&self, kset_each: bool) -> Arc<Cache<SimPmem, Arc<MemBacking>>> {
        let (cache, _) = Cache::start(self.dev.clone(), self.backing.clone(), &opts()).unwrap();
        for i in 0..BLOCKS {
            cache.write(i * BLOCK, &[pattern(i); BLOCK as usize], false).unwrap();
            if kset_each {
                cache.flush().unwrap();
            }
        }
        cache.flush().unwrap();
        cache
    }

    /// Every key of the log from its start, with the kset position.
    fn log_keys(&self) -> Vec<((u32, u32), Key)> {
        let r = pcache_format::image::scan(&AsMedia(self.dev.pmem()), Default::default());
        let chain: Vec<u32> = r.backings[0].chain.iter().map(|s| s.dev_seg).collect();
        let media = AsMedia(self.dev.pmem());
        let mut visited = vec![false; chain.len()];
        let mut walk = LogWalk::new(&media, self.dev.layout(), &chain, &mut visited, LogPos::default());
        let mut out = Vec::new();
        while let Some(step) = walk.step() {
            if let LogStep::Keys { at, keys } = step {
                out.extend(keys.iter().map(|k| (at.into(), *k)));
            }
        }
        out
    }

    /// Device offset of the cached data of the key for block `i`, and of
    /// its kset.
    fn where_is(&self, i: u64) -> (u64, u64) {
        let r = pcache_format::image::scan(&AsMedia(self.dev.pmem()), Default::default());
        let chain: Vec<u32> = r.backings[0].chain.iter().map(|s| s.dev_seg).collect();
        let (at, k) = self.log_keys().into_iter().find(|(_, k)| k.off.get() == i * BLOCK).expect("block logged");
        let layout = self.dev.layout();
        let data =
            layout.data_range(chain[k.cache_seg_id.get() as usize], k.cache_seg_off.get(), BLOCK as u32).unwrap();
        let kset = layout.data_range(chain[at.0 as usize], at.1, 64).unwrap();
        (data, kset)
    }

    fn flip(&self, at: u64) {
        let mut b = [0u8; 1];
        self.dev.pmem().read(at, &mut b).unwrap();
        self.dev.pmem().write(at, &[b[0] ^ 0x5a]).unwrap();
    }

    fn block(&self, i: u64) -> Vec<u8> {
        self.backing.contents()[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize].to_vec()
    }

    fn assert_blocks(&self, written: impl Fn(u64) -> bool) {
        for i in 0..BLOCKS {
            let want = if written(i) { pattern(i) } else { OLD };
            assert!(self.block(i).iter().all(|&b| b == want), "block {i}: want {want:#x}, got {:#x}", self.block(i)[0]);
        }
    }

    fn assert_released(&self) {
        assert_eq!(self.dev.backings().unwrap().len(), 0, "the entry is free");
        assert_eq!(self.dev.free_segments(), self.free_before, "every segment is free again");
        let r = pcache_format::image::scan(&AsMedia(self.dev.pmem()), Default::default());
        assert_eq!(r.problems(), 0, "{:?}", r.findings);
    }
}

const BAD: u64 = 17;

#[test]
fn a_bad_extent_stops_writeback_after_everything_before_it_and_salvage_skips_only_it() {
    let rig = Rig::new("crc");
    let cache = rig.start_and_write(true);
    let (data, _) = rig.where_is(BAD);
    rig.flip(data + 100);

    let err = cache.write_back(|_, _| {}).unwrap_err();
    assert!(matches!(err, EngineError::DataCrc { off, len: 4096, .. } if off == BAD * BLOCK), "{err}");
    // The 17 ksets before the bad one are written back, synced, and the
    // dirty tail persisted past them.
    let s = cache.stats();
    assert_eq!(s.ksets_written_back, BAD, "{s:?}");
    assert_eq!(s.dirty_bytes, (BLOCKS - BAD) * BLOCK, "{s:?}");
    rig.assert_blocks(|i| i < BAD);
    let why = cache.stuck().expect("writeback is stuck");
    for part in [
        "/salvage/crc",
        &format!("backing offset {} length 4096", BAD * BLOCK),
        &format!("segment 0 offset {:#x}", BAD * 64),
        "data CRC mismatch",
        &format!("{} dirty bytes", (BLOCKS - BAD) * BLOCK),
    ] {
        assert!(why.contains(part), "{part:?} missing from {why}");
    }
    assert!(cache.health().writeback_stopped.is_some());
    cache.stop().unwrap();
    drop(cache);

    // The persisted dirty tail: a restart has only the 23 last blocks dirty.
    let (cache, _) = Cache::start(rig.dev.clone(), rig.backing.clone(), &opts()).unwrap();
    assert_eq!(cache.stats().dirty_bytes, (BLOCKS - BAD) * BLOCK);
    assert_eq!(cache.stuck(), None, "nothing is known to be stuck before writeback runs");
    cache.stop().unwrap();
    drop(cache);

    // A plain detach refuses, naming the extent; the cache stays.
    let err = detach(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("backing offset {} length 4096", BAD * BLOCK)), "{msg}");
    assert!(msg.contains("data CRC mismatch"), "{msg}");
    assert_eq!(rig.dev.backings().unwrap().len(), 1, "nothing was released");

    // Salvage writes back every other block and lists exactly the bad one.
    let mut seen = Vec::new();
    let r = detach_salvage(&rig.dev, rig.backing.clone(), |done, total| seen.push((done, total))).unwrap();
    assert_eq!(r.lost.len(), 1, "{:?}", r.lost);
    let LostExtent { off, len, why } = &r.lost[0];
    assert_eq!((*off, *len), (BAD * BLOCK, BLOCK));
    assert!(why.contains("data CRC mismatch"), "{why}");
    assert!(r.damaged.is_empty(), "{:?}", r.damaged);
    assert!(r.lost_anything());
    assert_eq!(r.detach.bytes_written_back, (BLOCKS - BAD - 1) * BLOCK);
    assert_eq!(seen.last(), Some(&((BLOCKS - BAD) * BLOCK, (BLOCKS - BAD) * BLOCK)), "{seen:?}");
    rig.assert_blocks(|i| i != BAD);
    rig.assert_released();
}

#[test]
fn a_bad_extent_inside_one_big_kset_is_salvaged_alone() {
    let rig = Rig::new("one-kset");
    let cache = rig.start_and_write(false);
    let (data, _) = rig.where_is(BAD);
    rig.flip(data + 4000);
    assert!(cache.write_back(|_, _| {}).is_err());
    assert_eq!(cache.stats().ksets_written_back, 0);
    assert!(cache.stuck().unwrap().contains("data CRC mismatch"));
    cache.stop().unwrap();
    drop(cache);
    let r = detach_salvage(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert_eq!(r.lost.iter().map(|l| (l.off, l.len)).collect::<Vec<_>>(), vec![(BAD * BLOCK, BLOCK)]);
    rig.assert_blocks(|i| i != BAD);
    rig.assert_released();
}

#[test]
fn a_media_error_under_an_extent_is_skipped_and_listed() {
    let rig = Rig::new("media");
    let cache = rig.start_and_write(true);
    let (data, _) = rig.where_is(BAD);
    rig.dev.pmem().inject_media_error(data + 512, 8).unwrap();
    assert!(matches!(cache.write_back(|_, _| {}), Err(EngineError::Pmem(_))));
    rig.assert_blocks(|i| i < BAD);
    let why = cache.stuck().expect("stuck");
    assert!(why.contains("media error") && why.contains(&format!("backing offset {}", BAD * BLOCK)), "{why}");
    cache.stop().unwrap();
    drop(cache);
    let r = detach_salvage(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert_eq!(r.lost.len(), 1, "{:?}", r.lost);
    assert_eq!((r.lost[0].off, r.lost[0].len), (BAD * BLOCK, BLOCK));
    assert!(r.lost[0].why.contains("media error"), "{}", r.lost[0].why);
    rig.assert_blocks(|i| i != BAD);
    rig.assert_released();
}

#[test]
fn a_later_write_that_lands_takes_its_range_off_the_lost_list() {
    let rig = Rig::new("rewritten");
    let cache = rig.start_and_write(true);
    // Block BAD written again later, in a kset of its own.
    cache.write(BAD * BLOCK, &[pattern(BAD); BLOCK as usize], true).unwrap();
    let (data, _) = rig.where_is(BAD); // the first key of the block
    rig.flip(data);
    cache.stop().unwrap();
    drop(cache);
    let r = detach_salvage(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert_eq!(r.lost, vec![], "the later write covers the bad one");
    assert!(!r.lost_anything());
    rig.assert_blocks(|_| true);
    rig.assert_released();
}

#[test]
fn a_damaged_kset_keeps_the_keys_before_it_and_salvage_resumes_after_it() {
    let rig = Rig::new("kset");
    let cache = rig.start_and_write(true);
    // Corrupt the key of block BAD in its kset (the key's length field):
    // its CRC fails.
    let (_, kset) = rig.where_is(BAD);
    assert_eq!(rig.where_is(BAD + 1).1, kset + 64);
    rig.flip(kset + 24 + 9);

    let err = cache.write_back(|_, _| {}).unwrap_err();
    assert!(matches!(err, EngineError::Corrupt(_)), "{err}");
    assert_eq!(cache.stats().ksets_written_back, BAD);
    rig.assert_blocks(|i| i < BAD);
    let why = cache.stuck().expect("stuck");
    assert!(why.contains(&format!("segment 0 offset {:#x}", BAD * 64)), "{why}");
    assert!(why.contains("undecodable kset"), "{why}");
    cache.stop().unwrap();
    drop(cache);

    // A kset whose CRC fails with the log going on after it is no torn
    // end: replay refuses it, so a plain detach refuses rather than drop
    // the 22 ksets after it.
    let err = detach(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("segment 0 offset {:#x}", BAD * 64)) && msg.contains("goes on"), "{msg}");
    assert_eq!(rig.dev.backings().unwrap().len(), 1, "nothing was released");
    rig.assert_blocks(|i| i < BAD);

    let r = detach_salvage(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert_eq!(r.lost, vec![]);
    assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
    let d = &r.damaged[0];
    assert_eq!(
        (d.at, d.bytes, d.resumed_at),
        (LogPos { seg: 0, off: BAD as u32 * 64 }, 64, Some(LogPos { seg: 0, off: (BAD as u32 + 1) * 64 }))
    );
    assert!(d.why.contains("CRC"), "{}", d.why);
    let line = d.to_string();
    assert!(line.contains("64 bytes unreadable; the writes it recorded are lost"), "{line}");
    rig.assert_blocks(|i| i != BAD);
    rig.assert_released();
}

#[test]
fn a_damaged_key_count_that_leads_to_the_terminator_reads_as_a_torn_end() {
    let rig = Rig::new("header");
    let cache = rig.start_and_write(true);
    cache.stop().unwrap();
    drop(cache);
    // The key count of kset BAD is damaged to 91 keys: the terminator at the
    // log's end lies where a kset of 91 keys would end, the very bytes a
    // crash leaves when the newest kset is torn (old ksets of a segment the
    // log used before can lie whole at its key boundaries, so a kset found
    // there proves nothing). The log is read as ending there, as replay
    // after a crash must read it; the ksets before it are written back.
    // (A key count damaged to anything else is damage, refused by detach
    // and salvaged: the tests above.)
    let (_, kset) = rig.where_is(BAD);
    rig.flip(kset + 4);
    let r = detach(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert_eq!(r.ksets_written_back, BAD, "{r:?}");
    for i in 0..BAD {
        assert!(rig.block(i).iter().all(|&b| b == pattern(i)), "block {i}");
    }
    assert_eq!(rig.dev.backings().unwrap().len(), 0, "the entry is free");
}

#[test]
fn salvage_of_a_healthy_cache_is_a_plain_detach() {
    let rig = Rig::new("healthy");
    let cache = rig.start_and_write(true);
    cache.stop().unwrap();
    drop(cache);
    let r = detach_salvage(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert!(!r.lost_anything(), "{r:?}");
    assert_eq!(r.detach.bytes_written_back, BLOCKS * BLOCK);
    assert_eq!(r.detach.ksets_written_back, BLOCKS);
    rig.assert_blocks(|_| true);
    rig.assert_released();
    let err = detach_salvage(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap_err();
    assert!(matches!(err, EngineError::NoCache { .. }), "{err}");
}

#[test]
fn a_damaged_kset_magic_is_passed_by_scanning_for_the_next_kset() {
    let rig = Rig::new("magic");
    let cache = rig.start_and_write(true);
    cache.stop().unwrap();
    drop(cache);
    let (_, kset) = rig.where_is(BAD);
    rig.flip(kset + 8);
    // Replay refuses the log; so does a plain detach.
    let err = detach(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap_err();
    assert!(matches!(err, EngineError::Corrupt(_)), "{err}");
    assert_eq!(rig.dev.backings().unwrap().len(), 1, "nothing was released");
    let r = detach_salvage(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
    assert_eq!(r.damaged[0].at, LogPos { seg: 0, off: BAD as u32 * 64 });
    assert_eq!(r.damaged[0].resumed_at, Some(LogPos { seg: 0, off: (BAD as u32 + 1) * 64 }));
    assert!(r.damaged[0].why.contains("no kset and no terminator"), "{}", r.damaged[0].why);
    rig.assert_blocks(|i| i != BAD);
    rig.assert_released();
}

#[test]
fn a_kset_torn_at_the_end_of_the_log_is_no_damage() {
    let rig = Rig::new("torn");
    let cache = rig.start_and_write(true);
    cache.stop().unwrap();
    drop(cache);
    // The newest kset fails its CRC and the terminator follows it: what a
    // crash while it was written leaves. Its write was never acknowledged
    // as durable; everything before it goes back, and nothing is "lost".
    let (_, kset) = rig.where_is(BLOCKS - 1);
    rig.flip(kset + 24 + 9);
    let r = detach_salvage(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert!(!r.lost_anything(), "{r:?}");
    rig.assert_blocks(|i| i < BLOCKS - 1);
    rig.assert_released();
}

#[test]
fn the_same_torn_end_detaches_plainly() {
    let rig = Rig::new("torn-plain");
    let cache = rig.start_and_write(true);
    cache.stop().unwrap();
    drop(cache);
    let (_, kset) = rig.where_is(BLOCKS - 1);
    rig.flip(kset + 24 + 9);
    let r = detach(&rig.dev, rig.backing.clone(), |_, _| {}).unwrap();
    assert_eq!(r.ksets_written_back, BLOCKS - 1);
    rig.assert_blocks(|i| i < BLOCKS - 1);
    rig.assert_released();
}

/// A damaged kset in the middle of the log is no torn end: a start that
/// took it for one replayed only the keys before it, and the next ksets it
/// wrote overwrote the rest, silently. The start refuses it instead, and a
/// kset torn at the very end still starts.
#[test]
fn a_start_refuses_a_damaged_kset_in_the_middle_of_the_log() {
    let rig = Rig::new("start");
    let cache = rig.start_and_write(true);
    cache.stop().unwrap();
    drop(cache);
    let (_, kset) = rig.where_is(BAD);
    rig.flip(kset + 24 + 9);
    let err = Cache::start(rig.dev.clone(), rig.backing.clone(), &opts()).map(|_| ()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EngineError::Corrupt(_)), "{msg}");
    assert!(msg.contains(&format!("segment 0 offset {:#x}", BAD * 64)) && msg.contains("--salvage"), "{msg}");
    // The newest kset torn instead: the log ends there and the cache starts.
    let rig = Rig::new("start-torn");
    let cache = rig.start_and_write(true);
    cache.stop().unwrap();
    drop(cache);
    let (_, last) = rig.where_is(BLOCKS - 1);
    rig.flip(last + 24 + 9);
    let (cache, report) = Cache::start(rig.dev.clone(), rig.backing.clone(), &opts()).unwrap();
    assert!(report.replay.torn_end);
    assert_eq!(report.replay.keys, BLOCKS - 1);
    cache.stop().unwrap();
}
