//! Loading an existing cache: its chain, generations, tails, and the replay
//! of its key log (spec §2.8.1, §2.9.13). Loading only reads, so it also
//! serves read-only inspection.

use std::collections::BTreeMap;

use pcache_format::media::{ChainWalk, read_gen, read_kset, read_tails};
use pcache_format::{BackingDevInfo, CACHE_SUBTREE_SHIFT, ErrorKind, KsetRecord, Layout, Record};

use super::dev::format_err;
use super::error::EngineError;
use super::index::{Delta, IKey, KeyState, Slice};
use crate::pmem::{AsMedia, Pmem};

/// A position in the key log: cache segment index and offset in its data area.
pub type LogPos = (u32, u32);

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

pub(super) fn corrupt(at: LogPos, what: impl std::fmt::Display) -> EngineError {
    EngineError::Corrupt(format!("key log at segment {} offset {:#x}: {what} (run `pcache check`)", at.0, at.1))
}

/// Errors a crash leaves at the end of the log: the newest kset torn.
fn torn(e: &pcache_format::Error) -> bool {
    e.record == Record::Kset
        && matches!(e.kind, ErrorKind::BadCrc { .. } | ErrorKind::OutOfRange { field: "key_num", found: 0, .. })
}

/// Whether the kset at `off` of device segment `dev_seg`, which fails its
/// CRC (or has no key count), is the newest kset torn by a crash rather than
/// damage in the middle of the log.
///
/// A kset is written over a durable terminator, after the terminator that
/// follows it was made durable. Its header words are each either the old
/// terminator's zeros or the new value, so a torn kset has key count 0, is a
/// LAST kset, or its key count leads to a terminator. A kset whose size
/// leads anywhere else was written whole once: it was damaged since, and
/// the log may go on after it.
fn torn_end<M: pcache_format::ReadMedia + ?Sized>(m: &M, layout: &Layout, dev_seg: u32, off: u32, n_segs: u32) -> bool {
    let mut h = [0u8; pcache_format::KSET_HEADER_SIZE];
    let Ok(base) = layout.data_range(dev_seg, off, h.len() as u32) else { return false };
    if m.read_at(base, &mut h).is_err() {
        return false;
    }
    let key_num = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let flags = u64::from_le_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]);
    if flags & pcache_format::KsetFlags::LAST.bits() != 0 || key_num == 0 {
        return true;
    }
    if key_num as usize > pcache_format::KSET_KEYS_MAX {
        return false;
    }
    let next = off as usize + pcache_format::kset_size(key_num as usize);
    let Ok(next) = u32::try_from(next) else { return false };
    let mut buf = [0u8; pcache_format::KSET_ONMEDIA_SIZE_MAX];
    matches!(read_kset(m, layout, dev_seg, next, n_segs, &mut buf), Ok(KsetRecord::End { magic: 0 }))
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
    let mut dev_segs = Vec::with_capacity(n_segs as usize);
    let mut walk = ChainWalk::new(ci.seg_id.get(), n_segs);
    while let Some(step) = walk.next(&media, layout) {
        dev_segs.push(step.map_err(format_err)?.dev_seg);
    }
    let mut gens = Vec::with_capacity(dev_segs.len());
    for (i, &seg) in dev_segs.iter().enumerate() {
        let pair = read_gen(&media, layout, seg).map_err(format_err)?;
        let g =
            pair.latest.map_err(|e| EngineError::Corrupt(format!("cache segment {i} (device segment {seg}): {e}")))?;
        gens.push(g.record.gen_.get());
    }
    let tails = read_tails(&media, layout, dev_segs[0], n_segs).map_err(format_err)?;
    let pos = |p: Result<pcache_format::Latest<pcache_format::CachePos>, pcache_format::Error>| {
        p.map(|l| (l.record.cache_seg_id.get(), l.record.seg_off.get()))
            .map_err(|e| EngineError::Corrupt(e.to_string()))
    };
    let key_tail = pos(tails.key_tail.latest)?;
    let dirty_tail = pos(tails.dirty_tail.latest)?;

    let n = n_segs as usize;
    let mut refs = vec![0u32; n];
    let mut used = vec![false; n];
    let mut in_log = vec![false; n];
    let mut log_segs = vec![key_tail.0];
    let mut slices: BTreeMap<u64, Slice> = BTreeMap::new();
    let mut delta = Delta::default();
    let mut replay = ReplayStats::default();
    let mut buf = [0u8; pcache_format::KSET_ONMEDIA_SIZE_MAX];
    let mut at = key_tail;
    let mut dirty_reached = false;
    let mut dirty_pending = 0u64;
    in_log[at.0 as usize] = true;
    loop {
        if at == dirty_tail {
            dirty_reached = true;
        }
        let record = match read_kset(&media, layout, dev_segs[at.0 as usize], at.1, n_segs, &mut buf) {
            Ok(r) => r,
            Err(pcache_format::ReadError::Format(e)) if torn(&e) => {
                if !torn_end(&media, layout, dev_segs[at.0 as usize], at.1, n_segs) {
                    return Err(corrupt(
                        at,
                        format!(
                            "{e}, and this is no kset torn by a crash (no terminator follows it): the log goes on \
                             past damage, and the writes recorded after it cannot be replayed; \
                             `pcache detach --salvage` writes back what can be read"
                        ),
                    ));
                }
                replay.torn_end = true;
                break;
            }
            Err(pcache_format::ReadError::Media { source, .. }) => return Err(EngineError::Pmem(source)),
            Err(e) => return Err(corrupt(at, format_err(e))),
        };
        match record {
            KsetRecord::End { magic: 0 } => break,
            KsetRecord::End { magic } => {
                return Err(corrupt(at, format!("no kset and no terminator (magic {magic:#018x})")));
            }
            KsetRecord::Last { next_cache_seg } => {
                replay.last_ksets += 1;
                let seen = &mut in_log[next_cache_seg as usize];
                if *seen {
                    return Err(corrupt(at, format!("LAST kset leads back to segment {next_cache_seg}")));
                }
                *seen = true;
                log_segs.push(next_cache_seg);
                at = (next_cache_seg, 0);
            }
            KsetRecord::Keys { keys } => {
                replay.ksets += 1;
                for (i, k) in keys.iter().enumerate() {
                    replay.keys += 1;
                    k.check_in(n_segs, dev_size).map_err(|e| corrupt(at, e.at_index(i as u32)))?;
                    let seg = k.cache_seg_id.get() as usize;
                    used[seg] = true;
                    refs[seg] += 1;
                    let (kg, sg) = (k.seg_gen.get(), gens[seg]);
                    if kg < sg {
                        replay.stale_keys += 1;
                        continue;
                    }
                    if kg > sg {
                        return Err(corrupt(at, format!("key {i} has generation {kg}, newer than its segment's {sg}")));
                    }
                    let len = k.len.get();
                    // Keys before the dirty tail were written back: their
                    // data is clean now.
                    let dirty = k.is_dirty() && dirty_reached;
                    if dirty {
                        dirty_pending += u64::from(len);
                    }
                    let ikey = IKey {
                        seg_gen: kg,
                        len,
                        cache_seg: seg as u32,
                        seg_off: k.cache_seg_off.get(),
                        crc: k.data_crc.get(),
                        orig_delta: 0,
                        orig_len: len,
                        state: if dirty { KeyState::Dirty } else { KeyState::Clean },
                    };
                    let off = k.off.get();
                    slices.entry(off >> CACHE_SUBTREE_SHIFT).or_default().insert(off, ikey, &mut delta);
                }
                at.1 += pcache_format::kset_size(keys.len()) as u32;
            }
        }
    }
    if !dirty_reached {
        return Err(EngineError::Corrupt(format!(
            "the dirty tail (segment {} offset {:#x}) is not on the key log (run `pcache check`)",
            dirty_tail.0, dirty_tail.1
        )));
    }
    for (i, (&log, &r)) in in_log.iter().zip(&refs).enumerate() {
        if log && r > 0 {
            return Err(EngineError::Corrupt(format!(
                "cache segment {i} is both in the key log and referenced by keys"
            )));
        }
    }
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
        key_head: at,
        log_segs,
        dirty_pending,
        replay,
    })
}
