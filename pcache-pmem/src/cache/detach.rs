//! Detaching a backing device: write every dirty key back, then give the
//! cache up (the RFC's backing-stop, done offline and explicitly).

use std::sync::Arc;

use pcache_format::media::{LogEnd, LogStep, LogWalk, read_gen, read_tails};
use pcache_format::{BackingDevInfo, CACHE_SEG_CTRL_SIZE, CACHE_SEG_DATA_SIZE, KSET_HEADER_SIZE, Key, Layout};

use super::dev::CacheDev;
use super::error::EngineError;
use super::facade::Cache;
use super::io::read_extent;
use super::load::{LogPos, chain_of};
use super::options::CacheOptions;
use super::writeback::{collapse, extent_why};
use crate::backing::BackingDev;
use crate::pmem::{AsMedia, Pmem};

/// What a detach did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetachReport {
    /// The backing entry that was freed.
    pub id: u32,
    /// Ksets written back.
    pub ksets_written_back: u64,
    /// Bytes written to the backing device.
    pub bytes_written_back: u64,
    /// Segments returned to the device.
    pub segments_released: u32,
}

/// Detaches `backing` from `dev`: replays its cache, writes every dirty key
/// back with `progress(bytes done, bytes dirty)`, `fdatasync`s the backing
/// device, then frees the backing entry (the commit point) and releases the
/// cache's segments (their control pages zeroed). Afterwards the backing
/// device alone holds all the data, and the next start of that path
/// creates a fresh cache. A crash at any point loses nothing: before the
/// commit the cache is intact, after it its segments are free.
///
/// Dirty data that cannot be written back correctly — cached data failing
/// its CRC, a pmem media error, a damaged kset — refuses the detach with
/// [`EngineError::Corrupt`] naming the place (backing range or key log
/// position) and the reason; everything before it in the log is written
/// back, and the cache is left intact. [`detach_salvage`] writes back the
/// rest and lists what it could not.
pub fn detach<P: Pmem + 'static, B: BackingDev + 'static>(
    dev: &Arc<CacheDev<P>>,
    backing: B,
    progress: impl FnMut(u64, u64),
) -> Result<DetachReport, EngineError> {
    let path = backing.path().to_path_buf();
    let (id, info) = match dev.find_entry(&path, backing.identity())? {
        Ok(found) => found,
        Err(_) => return Err(EngineError::NoCache { path }),
    };
    let opts = CacheOptions { background: false, queues: 1, ..CacheOptions::default() };
    let (cache, _) = Cache::start(dev.clone(), backing, &opts)?;
    let refuse = |cache: Arc<Cache<P, B>>, e: EngineError| {
        let _ = cache.stop();
        Err(e)
    };
    // Replay refuses a log that goes on past a damaged kset, so giving the
    // cache up drops nothing logged before its end.
    let ksets = match cache.write_back(progress) {
        Ok(k) => k,
        Err(e @ (EngineError::Backing(_) | EngineError::Stopped)) => return refuse(cache, e),
        Err(e) => {
            let e = cache.stuck().map_or(e, EngineError::Corrupt);
            return refuse(cache, e);
        }
    };
    let written = cache.stats().bytes_written_back;
    let segs = cache.dev_segs().to_vec();
    cache.stop()?;
    drop(cache);
    release(dev, id, &info, &segs)?;
    Ok(DetachReport {
        id,
        ksets_written_back: ksets,
        bytes_written_back: written,
        segments_released: segs.len() as u32,
    })
}

/// Frees entry `id`, then zeroes the control pages of its segments and
/// returns them to the device.
fn release<P: Pmem>(dev: &CacheDev<P>, id: u32, _info: &BackingDevInfo, segs: &[u32]) -> Result<(), EngineError> {
    dev.write_entry_both(id, &BackingDevInfo::free(id))?;
    let pmem = dev.pmem();
    for &seg in segs {
        pmem.zero_nodrain(dev.layout().ctrl_offset(seg)?, CACHE_SEG_CTRL_SIZE as u64)?;
    }
    pmem.fence()?;
    dev.release_segments(segs);
    Ok(())
}

/// A backing range that [`detach_salvage`] could not write back: the
/// backing device holds older data there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostExtent {
    /// Backing offset.
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
    /// Why, in words (`data CRC mismatch (...)`, `pmem media error: ...`).
    pub why: String,
}

impl std::fmt::Display for LostExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "offset {} length {} ({})", self.off, self.len, self.why)
    }
}

/// A stretch of the key log that [`detach_salvage`] could not read: the
/// writes its ksets recorded are unknown, and lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedKset {
    /// Where the damage starts: cache segment and offset in its data area.
    pub at: LogPos,
    /// Bytes of the log skipped.
    pub bytes: u32,
    /// Why, in words.
    pub why: String,
    /// Where the log was picked up again after it (the next kset whose magic
    /// and CRC verify); `None`: nowhere, and every write logged after it is
    /// lost too.
    pub resumed_at: Option<LogPos>,
}

impl std::fmt::Display for DamagedKset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kset at segment {} offset {:#x}: {} bytes unreadable; the writes it recorded are lost ({})",
            self.at.seg, self.at.off, self.bytes, self.why
        )?;
        match self.resumed_at {
            Some(LogPos { seg, off }) => write!(f, "; the log resumes at segment {seg} offset {off:#x}"),
            None => write!(f, "; the log could not be followed past it: every write logged after it is lost too"),
        }
    }
}

/// What a salvage did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalvageReport {
    /// What was written back and released.
    pub detach: DetachReport,
    /// Backing ranges whose cached data could not be read correctly, in log
    /// order: the backing device holds older data there. A range a later
    /// write overwrote successfully is not listed.
    pub lost: Vec<LostExtent>,
    /// Damaged stretches of the key log, in log order.
    pub damaged: Vec<DamagedKset>,
}

impl SalvageReport {
    /// Whether anything was lost.
    pub fn lost_anything(&self) -> bool {
        !self.lost.is_empty() || !self.damaged.is_empty()
    }

    /// Bytes of the lost extents (damaged ksets not counted: their extents
    /// are unknown).
    pub fn lost_bytes(&self) -> u64 {
        self.lost.iter().map(|l| l.len).sum()
    }
}

/// Detaches `backing` from `dev` whatever it costs: like [`detach`], but
/// every good dirty extent is written back, in log order (each kset's keys
/// collapsed, later keys winning, as writeback does), and what cannot be
/// is skipped and listed instead of refusing: an extent whose cached data
/// fails its CRC or meets a pmem media error (the backing device keeps its
/// older data there), and a damaged kset, whose writes are unknown. After a
/// damaged kset the log is picked up again at the next kset in the same
/// segment whose magic and CRC verify (LAST ksets lead on to the next
/// segment as usual). Then the backing device is synced, the entry freed
/// and the segments released, exactly as [`detach`] does. The cache is
/// not replayed through the engine, so a damaged log does not stop it; a
/// cache whose chain or dirty tail cannot be read is refused (nothing is
/// written then). A crash before the entry is freed changes nothing that a
/// second run does not redo.
pub fn detach_salvage<P: Pmem + 'static, B: BackingDev + 'static>(
    dev: &Arc<CacheDev<P>>,
    backing: B,
    mut progress: impl FnMut(u64, u64),
) -> Result<SalvageReport, EngineError> {
    let path = backing.path().to_path_buf();
    let (id, info) = match dev.find_entry(&path, backing.identity())? {
        Ok(found) => found,
        Err(_) => return Err(EngineError::NoCache { path }),
    };
    if !dev.claim(id) {
        return Err(EngineError::AlreadyStarted { path });
    }
    let done = salvage_claimed(dev, &backing, id, &info, &mut progress);
    dev.unclaim(id);
    done
}

fn salvage_claimed<P: Pmem, B: BackingDev>(
    dev: &CacheDev<P>,
    backing: &B,
    id: u32,
    info: &BackingDevInfo,
    progress: &mut impl FnMut(u64, u64),
) -> Result<SalvageReport, EngineError> {
    let (pmem, layout) = (dev.pmem(), dev.layout());
    let dev_size = backing.size();
    let stored = info.dev_size.get().saturating_mul(512);
    if stored > dev_size {
        return Err(EngineError::BackingShrunk {
            path: backing.path().to_path_buf(),
            found: dev_size,
            expected: stored,
        });
    }
    let (dev_segs, gens, dirty_tail) = read_for_salvage(dev, info)?;
    let data_crc = info.cache_info.data_crc();

    // First pass: how much is dirty, for the progress.
    let mut total = 0u64;
    let dirty_bytes = |keys: &[Key]| -> u64 {
        collapse(keys).iter().filter(|(_, k)| k.is_dirty()).map(|(_, k)| u64::from(k.len)).sum()
    };
    let count = |_, keys: &[Key]| {
        total += dirty_bytes(keys);
        Ok(())
    };
    walk_log(pmem, layout, &dev_segs, dirty_tail, count, |_| {})?;
    progress(0, total);

    // Second pass: write back what reads correctly.
    let (mut done, mut written) = (0u64, 0u64);
    let mut lost: Vec<LostExtent> = Vec::new();
    let mut damaged = Vec::new();
    let mut data = Vec::new();
    let ksets = walk_log(
        pmem,
        layout,
        &dev_segs,
        dirty_tail,
        |_, keys| {
            for (off, k) in collapse(keys).iter().filter(|(_, k)| k.is_dirty()) {
                let len = u64::from(k.len);
                let why = match unusable(off, k, dev_size, &gens) {
                    Some(why) => Some(why),
                    None => {
                        data.resize(k.len as usize, 0);
                        read_extent(pmem, layout, &dev_segs, data_crc, off, k, 0, &mut data)
                            .err()
                            .map(|e| extent_why(&e, off, k.len))
                    }
                };
                match why {
                    Some(why) => lost.push(LostExtent { off, len, why }),
                    None => {
                        backing.write_at(off, &data)?;
                        written += len;
                        overwrite(&mut lost, off, len);
                    }
                }
                done += len;
                progress(done.min(total), total);
            }
            Ok(())
        },
        |d| damaged.push(d),
    )?;
    backing.sync()?;
    release(dev, id, info, &dev_segs)?;
    Ok(SalvageReport {
        detach: DetachReport {
            id,
            ksets_written_back: ksets,
            bytes_written_back: written,
            segments_released: dev_segs.len() as u32,
        },
        lost,
        damaged,
    })
}

/// What salvage reads of a cache before it writes anything: the chain, the
/// generation of each segment (`None`: unreadable, and the keys of its data
/// are lost) and the dirty tail.
type SalvageStart = (Vec<u32>, Vec<Option<u64>>, LogPos);

fn read_for_salvage<P: Pmem>(dev: &CacheDev<P>, info: &BackingDevInfo) -> Result<SalvageStart, EngineError> {
    let (media, layout) = (AsMedia(dev.pmem()), dev.layout());
    let ci = info.cache_info;
    let n_segs = ci.n_segs.get();
    let dev_segs = chain_of(dev.pmem(), layout, info)?;
    let gens = dev_segs
        .iter()
        .map(|&seg| read_gen(&media, layout, seg).ok()?.latest.ok().map(|g| g.record.gen_.get()))
        .collect();
    let tails = read_tails(&media, layout, dev_segs[0], n_segs)?;
    let dirty_tail = tails
        .dirty_tail
        .latest
        .map(|l| LogPos::from(l.record))
        .map_err(|e| EngineError::Corrupt(format!("the dirty tail: {e}")))?;
    if dirty_tail.seg >= n_segs {
        return Err(EngineError::Corrupt(format!(
            "the dirty tail is in segment {}, outside the cache",
            dirty_tail.seg
        )));
    }
    Ok((dev_segs, gens, dirty_tail))
}

/// Why the data of the dirty key `k` at backing offset `off` cannot be
/// written back, before reading it.
fn unusable(off: u64, k: &super::index::IKey, dev_size: u64, gens: &[Option<u64>]) -> Option<String> {
    if off.saturating_add(u64::from(k.len)) > dev_size {
        return Some(format!("the key lies outside the {dev_size}-byte backing device"));
    }
    match gens.get(k.cache_seg as usize).copied() {
        None => Some(format!("the key points at cache segment {}, outside the cache", k.cache_seg)),
        Some(None) => Some(format!("the generation of cache segment {} cannot be read", k.cache_seg)),
        Some(Some(g)) if k.seg_gen < g => {
            Some(format!("its cached data was reclaimed (key generation {}, segment {g})", k.seg_gen))
        }
        Some(Some(g)) if k.seg_gen > g => Some(format!("key generation {} is newer than its segment's {g}", k.seg_gen)),
        Some(Some(_)) => None,
    }
}

/// Takes `[off, off + len)`, now written back, out of the lost extents.
fn overwrite(lost: &mut Vec<LostExtent>, off: u64, len: u64) {
    let end = off + len;
    if !lost.iter().any(|l| l.off < end && off < l.off + l.len) {
        return;
    }
    let mut kept = Vec::with_capacity(lost.len() + 1);
    for l in lost.drain(..) {
        let l_end = l.off + l.len;
        if l_end <= off || end <= l.off {
            kept.push(l);
            continue;
        }
        if l.off < off {
            kept.push(LostExtent { off: l.off, len: off - l.off, why: l.why.clone() });
        }
        if end < l_end {
            kept.push(LostExtent { off: end, len: l_end - end, why: l.why });
        }
    }
    *lost = kept;
}

/// Follows the key log from `from` to its end, calling `keys` for every
/// kset with keys, in log order, and `damage` for every stretch it cannot
/// read, then picks the log up again where it can ([`LogWalk::resync`]).
/// Returns the ksets (LAST ones included) read.
fn walk_log<P: Pmem + ?Sized>(
    pmem: &P,
    layout: &Layout,
    dev_segs: &[u32],
    from: LogPos,
    mut keys: impl FnMut(LogPos, &[Key]) -> Result<(), EngineError>,
    mut damage: impl FnMut(DamagedKset),
) -> Result<u64, EngineError> {
    let media = AsMedia(pmem);
    let mut visited = vec![false; dev_segs.len()];
    let mut walk = LogWalk::new(&media, layout, dev_segs, &mut visited, from);
    let mut ksets = 0u64;
    while let Some(step) = walk.step() {
        let (at, why) = match step {
            LogStep::Keys { at, keys: k } => {
                keys(at, k)?;
                ksets += 1;
                continue;
            }
            LogStep::Last { .. } => {
                ksets += 1;
                continue;
            }
            // The clean end, or the newest kset torn by a crash.
            LogStep::End { end: LogEnd::Terminator | LogEnd::Torn(_), .. } => break,
            LogStep::End { at, end: LogEnd::Loop { next } } => {
                // Nothing sensible follows.
                let why = format!("its LAST kset leads back to segment {next}");
                damage(DamagedKset { at, bytes: KSET_HEADER_SIZE as u32, why, resumed_at: None });
                break;
            }
            LogStep::End { at, end: LogEnd::Garbage { magic } } => {
                (at, format!("no kset and no terminator (magic {magic:#018x})"))
            }
            LogStep::End { at, end: LogEnd::Media { source, .. } } => (at, format!("pmem media error: {source}")),
            LogStep::End { at, end: LogEnd::Damaged(e) | LogEnd::Invalid(e) } => (at, format!("undecodable kset: {e}")),
        };
        let resumed = walk.resync();
        let bytes = match resumed {
            Some(r) if r.seg == at.seg => r.off - at.off,
            // After a damaged LAST kset, in the segment it names.
            Some(_) => KSET_HEADER_SIZE as u32,
            None => CACHE_SEG_DATA_SIZE - at.off,
        };
        damage(DamagedKset { at, bytes, why, resumed_at: resumed });
    }
    Ok(ksets)
}

/// What [`discard`] gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardReport {
    /// The backing entry that was freed.
    pub id: u32,
    /// Dirty bytes that were never written back and are gone, if the log
    /// could be read to count them.
    pub dirty_bytes: Option<u64>,
    /// Segments returned to the device.
    pub segments_released: u32,
}

/// Gives up the cache of the backing device stored as `stored` *without*
/// writing anything back: for a backing device that is gone for good. Its
/// dirty data is lost. The entry is matched by the stored path (as given,
/// made absolute, or canonical if it still exists) or, if the path still
/// names a file or device, by identity.
pub fn discard<P: Pmem>(dev: &CacheDev<P>, stored: &std::path::Path) -> Result<DiscardReport, EngineError> {
    let (id, info) = super::repair::entry_named(dev, stored)?;
    let segs = chain_of(dev.pmem(), dev.layout(), &info)?;
    let dirty_bytes = super::facade::summarize(dev.pmem(), dev.layout(), &info).ok().map(|s| s.dirty_bytes);
    release(dev, id, &info, &segs)?;
    Ok(DiscardReport { id, dirty_bytes, segments_released: segs.len() as u32 })
}
