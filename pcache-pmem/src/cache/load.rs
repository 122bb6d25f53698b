//! Loading an existing cache: its chain, generations, tails, and the replay
//! of its key log (spec §2.8.1, §2.9.13). Loading only reads, so it also
//! serves read-only inspection.

use std::collections::BTreeMap;

use pcache_format::media::{ChainWalk, LogEnd, LogStep, LogWalk, read_gen, read_tails};
use pcache_format::{BackingDevInfo, CACHE_SUBTREE_SHIFT, Layout};

use super::error::EngineError;
use super::index::{Delta, IKey, Slice};
use crate::pmem::{AsMedia, Pmem};

pub use pcache_format::media::LogPos;

/// What replay went through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Ksets with keys.
    pub ksets: u64,
    /// LAST ksets.
    pub last_ksets: u64,
    /// Keys read.
    pub keys: u64,
    /// Keys dropped because their segment was reclaimed since.
    pub stale_keys: u64,
    /// The log ended at a kset torn by a crash (its CRC bad).
    pub torn_end: bool,
}

/// Everything loading a cache rebuilds.
#[derive(Debug)]
pub struct Loaded {
    /// Device segment of each cache segment.
    pub dev_segs: Vec<u32>,
    /// Generation of each cache segment.
    pub gens: Vec<u64>,
    /// Keys in the log referencing each cache segment.
    pub refs: Vec<u32>,
    /// Cache segments in use (key log or referenced data).
    pub used: Vec<bool>,
    /// The index, by slice.
    pub slices: BTreeMap<u64, Slice>,
    /// Counters of the index.
    pub delta: Delta,
    /// Oldest kset still owned.
    pub key_tail: LogPos,
    /// Oldest kset not written back.
    pub dirty_tail: LogPos,
    /// Where the next kset goes.
    pub key_head: LogPos,
    /// The segments the log runs through, in order from the key tail.
    pub log_segs: Vec<u32>,
    /// Bytes of dirty keys from the dirty tail on: not yet written back.
    pub dirty_pending: u64,
    /// What replay saw.
    pub replay: ReplayStats,
}

/// The device segment of each cache segment of the cache of entry `info`,
/// its chain checked on the way.
pub(super) fn chain_of<P: Pmem + ?Sized>(
    pmem: &P,
    layout: &Layout,
    info: &BackingDevInfo,
) -> Result<Vec<u32>, EngineError> {
    let media = AsMedia(pmem);
    let ci = info.cache_info;
    let mut dev_segs = Vec::with_capacity(ci.n_segs.get() as usize);
    let mut walk = ChainWalk::new(ci.seg_id.get(), ci.n_segs.get());
    while let Some(step) = walk.next(&media, layout) {
        dev_segs.push(step?.dev_seg);
    }
    Ok(dev_segs)
}

/// Loads the cache of backing entry `info` for a backing device of
/// `dev_size` bytes. Every on-media value is checked before use; a damaged
/// cache is refused with the place and the reason, except for the one
/// thing a crash leaves behind, a torn newest kset, which ends the log.
pub fn load<P: Pmem + ?Sized>(
    pmem: &P,
    layout: &Layout,
    info: &BackingDevInfo,
    dev_size: u64,
) -> Result<Loaded, EngineError> {
    let media = AsMedia(pmem);
    let ci = info.cache_info;
    let n_segs = ci.n_segs.get();
    let dev_segs = chain_of(pmem, layout, info)?;
    let mut gens = Vec::with_capacity(dev_segs.len());
    for (i, &seg) in dev_segs.iter().enumerate() {
        let pair = read_gen(&media, layout, seg)?;
        let g =
            pair.latest.map_err(|e| EngineError::Corrupt(format!("cache segment {i} (device segment {seg}): {e}")))?;
        gens.push(g.record.gen_.get());
    }
    let tails = read_tails(&media, layout, dev_segs[0], n_segs)?;
    let key_tail = LogPos::from(tails.key_tail.latest?.record);
    let dirty_tail = LogPos::from(tails.dirty_tail.latest?.record);
    let mut r = Replay::new(&gens, dev_size, dirty_tail);
    let key_head = r.walk(&media, layout, &dev_segs, key_tail)?;
    r.check()?;
    let Replay { refs, mut used, slices, delta, log_segs, dirty_pending, stats: replay, .. } = r;
    for &s in &log_segs {
        used[s as usize] = true;
    }
    Ok(Loaded {
        dev_segs,
        gens,
        refs,
        used,
        slices,
        delta,
        key_tail,
        dirty_tail,
        key_head,
        log_segs,
        dirty_pending,
        replay,
    })
}

/// The index as replay rebuilds it, kset by kset.
struct Replay<'a> {
    gens: &'a [u64],
    dev_size: u64,
    dirty_tail: LogPos,
    dirty_reached: bool,
    refs: Vec<u32>,
    used: Vec<bool>,
    log_segs: Vec<u32>,
    slices: BTreeMap<u64, Slice>,
    delta: Delta,
    dirty_pending: u64,
    stats: ReplayStats,
}

impl<'a> Replay<'a> {
    fn new(gens: &'a [u64], dev_size: u64, dirty_tail: LogPos) -> Self {
        let n = gens.len();
        Self {
            gens,
            dev_size,
            dirty_tail,
            dirty_reached: false,
            refs: vec![0; n],
            used: vec![false; n],
            log_segs: Vec::new(),
            slices: BTreeMap::new(),
            delta: Delta::default(),
            dirty_pending: 0,
            stats: ReplayStats::default(),
        }
    }

    /// Replays the log from `key_tail` to its end; returns where it ends
    /// (where the next kset goes).
    fn walk<M: pcache_format::ReadMedia<Error = crate::pmem::PmemError> + ?Sized>(
        &mut self,
        media: &M,
        layout: &Layout,
        dev_segs: &[u32],
        key_tail: LogPos,
    ) -> Result<LogPos, EngineError> {
        self.log_segs.push(key_tail.seg);
        let mut visited = vec![false; dev_segs.len()];
        let mut walk = LogWalk::new(media, layout, dev_segs, &mut visited, key_tail);
        loop {
            if walk.pos() == self.dirty_tail {
                self.dirty_reached = true;
            }
            match walk.step() {
                Some(LogStep::Keys { at, keys }) => {
                    self.stats.ksets += 1;
                    for (i, k) in keys.iter().enumerate() {
                        self.key(at, i, k)?;
                    }
                }
                Some(LogStep::Last { next, .. }) => {
                    self.stats.last_ksets += 1;
                    self.log_segs.push(next);
                }
                Some(LogStep::End { at, end }) => {
                    self.stats.torn_end = matches!(end, LogEnd::Torn(_));
                    refuse(at, end)?;
                    break;
                }
                None => break,
            }
        }
        Ok(walk.pos())
    }

    /// Indexes key `i` of the kset at `at`.
    fn key(&mut self, at: LogPos, i: usize, k: &pcache_format::Key) -> Result<(), EngineError> {
        self.stats.keys += 1;
        k.check_in(self.gens.len() as u32, self.dev_size).map_err(|e| EngineError::log(at, e.at_index(i as u32)))?;
        let seg = k.cache_seg_id.get() as usize;
        self.used[seg] = true;
        self.refs[seg] += 1;
        let (kg, sg) = (k.seg_gen.get(), self.gens[seg]);
        if kg < sg {
            self.stats.stale_keys += 1;
            return Ok(());
        }
        if kg > sg {
            return Err(EngineError::log(at, format!("key {i} has generation {kg}, newer than its segment's {sg}")));
        }
        let len = k.len.get();
        // Keys before the dirty tail were written back: their data is
        // clean now.
        let dirty = k.is_dirty() && self.dirty_reached;
        if dirty {
            self.dirty_pending += u64::from(len);
        }
        let off = k.off.get();
        self.slices.entry(off >> CACHE_SUBTREE_SHIFT).or_default().insert(
            off,
            IKey::from_media(k, dirty),
            &mut self.delta,
        );
        Ok(())
    }

    /// What the whole log must satisfy once replayed.
    fn check(&self) -> Result<(), EngineError> {
        if !self.dirty_reached {
            let LogPos { seg, off } = self.dirty_tail;
            return Err(EngineError::Corrupt(format!(
                "the dirty tail (segment {seg} offset {off:#x}) is not on the key log (run `pcache check`)"
            )));
        }
        if let Some(s) = self.log_segs.iter().copied().filter(|&s| self.refs[s as usize] > 0).min() {
            return Err(EngineError::Corrupt(format!(
                "cache segment {s} is both in the key log and referenced by keys"
            )));
        }
        Ok(())
    }
}

/// Refuses a log that ends anywhere but at its terminator or a torn newest
/// kset.
fn refuse(at: LogPos, end: LogEnd<crate::pmem::PmemError>) -> Result<(), EngineError> {
    Err(match end {
        LogEnd::Terminator | LogEnd::Torn(_) => return Ok(()),
        LogEnd::Damaged(e) => EngineError::log(
            at,
            format!(
                "{e}, and this is no kset torn by a crash: the log goes on past damage, and the writes recorded \
                 after it cannot be replayed; `pcache detach --salvage` writes back what can be read"
            ),
        ),
        LogEnd::Invalid(e) => EngineError::log(at, e),
        LogEnd::Loop { next } => EngineError::log(at, format!("LAST kset leads back to segment {next}")),
        LogEnd::Garbage { magic } => EngineError::log(at, format!("no kset and no terminator (magic {magic:#018x})")),
        LogEnd::Media { source, .. } => EngineError::Pmem(source),
    })
}
