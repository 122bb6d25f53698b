//! Detaching a backing device: write every dirty key back, then give the
//! cache up (the RFC's backing-stop, done offline and explicitly).

use std::sync::Arc;

use pcache_format::media::{ChainWalk, read_gen, read_kset, read_tails};
use pcache_format::{
    BackingDevInfo, CACHE_SEG_CTRL_SIZE, CACHE_SEG_DATA_SIZE, ErrorKind, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC,
    KSET_ONMEDIA_SIZE_MAX, Key, KsetFlags, KsetRecord, Layout, ReadError, Record, kset_size,
};

use super::dev::{CacheDev, format_err};
use super::error::EngineError;
use super::facade::Cache;
use super::io::read_extent;
use super::load::LogPos;
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
    let (cache, report) = Cache::start(dev.clone(), backing, &opts)?;
    let refuse = |cache: Arc<Cache<P, B>>, e: EngineError| {
        let _ = cache.stop();
        Err(e)
    };
    // Replay ends the log at a kset whose CRC fails, as a crash leaves the
    // newest kset torn. When a valid kset follows it, it is damage in the
    // middle of the log instead: giving the cache up would drop every
    // write logged after it.
    if report.replay.torn_end {
        let end = cache.log_end();
        let segs = cache.dev_segs();
        let why = match after_bad_kset(dev.pmem(), dev.layout(), segs, end, segs.len() as u32) {
            After::Torn => None,
            After::Continues((seg, off)) => Some(format!("the log goes on at segment {seg} offset {off:#x}")),
            After::Damaged(why) => Some(why),
        };
        if let Some(why) = why {
            let e = EngineError::Corrupt(format!(
                "cannot write back {}: the kset at key log segment {} offset {:#x} fails to decode, and it is no \
                 kset torn by a crash ({why}): the writes logged from there on cannot be replayed",
                path.display(),
                end.0,
                end.1
            ));
            return refuse(cache, e);
        }
    }
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
            self.at.0, self.at.1, self.bytes, self.why
        )?;
        match self.resumed_at {
            Some((seg, off)) => write!(f, "; the log resumes at segment {seg} offset {off:#x}"),
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
    let media = AsMedia(pmem);
    let dev_size = backing.size();
    let stored = info.dev_size.get().saturating_mul(512);
    if stored > dev_size {
        return Err(EngineError::BackingShrunk {
            path: backing.path().to_path_buf(),
            found: dev_size,
            expected: stored,
        });
    }
    let ci = info.cache_info;
    let n_segs = ci.n_segs.get();
    let mut dev_segs = Vec::with_capacity(n_segs as usize);
    let mut chain = ChainWalk::new(ci.seg_id.get(), n_segs);
    while let Some(step) = chain.next(&media, layout) {
        dev_segs.push(step.map_err(format_err)?.dev_seg);
    }
    // A segment whose generation cannot be read: its keys are lost.
    let gens: Vec<Option<u64>> = dev_segs
        .iter()
        .map(|&seg| read_gen(&media, layout, seg).ok()?.latest.ok().map(|g| g.record.gen_.get()))
        .collect();
    let tails = read_tails(&media, layout, dev_segs[0], n_segs).map_err(format_err)?;
    let dirty_tail = tails
        .dirty_tail
        .latest
        .map(|l| (l.record.cache_seg_id.get(), l.record.seg_off.get()))
        .map_err(|e| EngineError::Corrupt(format!("the dirty tail: {e}")))?;
    if dirty_tail.0 >= n_segs {
        return Err(EngineError::Corrupt(format!("the dirty tail is in segment {}, outside the cache", dirty_tail.0)));
    }
    let walk = Walk { pmem, layout, dev_segs: &dev_segs, n_segs };
    let data_crc = ci.data_crc();
    // Why the data of a dirty key cannot be written back, before reading it.
    let unusable = |off: u64, k: &super::index::IKey| -> Option<String> {
        if off.saturating_add(u64::from(k.len)) > dev_size {
            return Some(format!("the key lies outside the {dev_size}-byte backing device"));
        }
        match gens.get(k.cache_seg as usize).copied() {
            None => Some(format!("the key points at cache segment {}, outside the cache", k.cache_seg)),
            Some(None) => Some(format!("the generation of cache segment {} cannot be read", k.cache_seg)),
            Some(Some(g)) if k.seg_gen < g => {
                Some(format!("its cached data was reclaimed (key generation {}, segment {g})", k.seg_gen))
            }
            Some(Some(g)) if k.seg_gen > g => {
                Some(format!("key generation {} is newer than its segment's {g}", k.seg_gen))
            }
            Some(Some(_)) => None,
        }
    };

    // First pass: how much is dirty, for the progress.
    let mut total = 0u64;
    walk.run(
        dirty_tail,
        |_, keys| {
            total += collapse(keys).iter().filter(|(_, k)| k.is_dirty()).map(|(_, k)| u64::from(k.len)).sum::<u64>();
            Ok(())
        },
        |_| {},
    )?;
    progress(0, total);

    // Second pass: write back what reads correctly.
    let (mut done, mut written) = (0u64, 0u64);
    let mut lost: Vec<LostExtent> = Vec::new();
    let mut damaged = Vec::new();
    let mut data = Vec::new();
    let ksets = walk.run(
        dirty_tail,
        |_, keys| {
            for (off, k) in collapse(keys).iter().filter(|(_, k)| k.is_dirty()) {
                let len = u64::from(k.len);
                let why = match unusable(off, k) {
                    Some(why) => Some(why),
                    None => {
                        data.resize(k.len as usize, 0);
                        read_extent(pmem, layout, &dev_segs, data_crc, off, k, 0, &mut data).err()
                    }
                    .map(|e| extent_why(&e, off, k.len)),
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

/// Errors a crash leaves at the end of the log: the newest kset torn (as
/// replay treats them).
fn torn(e: &pcache_format::Error) -> bool {
    e.record == Record::Kset
        && matches!(e.kind, ErrorKind::BadCrc { .. } | ErrorKind::OutOfRange { field: "key_num", found: 0, .. })
}

/// What follows a kset that fails to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum After {
    /// The newest kset, torn by a crash: the log ends there.
    Torn,
    /// The log goes on at this kset, whose magic and CRC verify: damage in
    /// the middle of the log.
    Continues(LogPos),
    /// Damage, and where the log goes on is not known: why it is no torn
    /// end.
    Damaged(String),
}

/// Tells a kset torn by a crash from damage in the middle of the log, for
/// the kset at `at` (cache segment, offset), which fails to decode.
///
/// A kset is written only after the terminator that follows it is durable,
/// and the terminator it overwrites was durable before: so a torn kset
/// either still has the key count 0 of that terminator, or a key count
/// whose size leads to a terminator. A torn LAST kset leads to a segment
/// that starts with a terminator. Anything else is damage; when a kset
/// whose magic and CRC verify lies where the header says the next record
/// is (or, with that terminator in place, at one of the kset's own key
/// boundaries: its key count is what is damaged), the log goes on there.
pub(crate) fn after_bad_kset<P: Pmem + ?Sized>(
    pmem: &P,
    layout: &Layout,
    dev_segs: &[u32],
    at: LogPos,
    n_segs: u32,
) -> After {
    let dev_seg = dev_segs[at.0 as usize];
    let mut h = [0u8; KSET_HEADER_SIZE];
    let read = layout.data_range(dev_seg, at.1, KSET_HEADER_SIZE as u32).ok().map(|a| pmem.read(a, &mut h));
    if !matches!(read, Some(Ok(()))) {
        return After::Damaged("its header cannot be read".into());
    }
    let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
    let key_num = u32::from_le_bytes(h[4..8].try_into().unwrap_or_default());
    let (magic, flags) = (word(8), word(16));
    if magic != KSET_MAGIC {
        return After::Damaged(format!("it has no kset magic ({magic:#018x})"));
    }
    if flags & KsetFlags::LAST.bits() != 0 {
        return match dev_segs.get(key_num as usize) {
            Some(&next) if valid_kset_at(pmem, layout, next, 0, n_segs) => After::Continues((key_num, 0)),
            _ => After::Torn,
        };
    }
    if key_num == 0 {
        return After::Torn;
    }
    if key_num as usize > KSET_KEYS_MAX {
        return After::Damaged(format!("its key count {key_num} is out of range"));
    }
    let next = at.1 + kset_size(key_num as usize) as u32;
    if next as usize + KSET_HEADER_SIZE > CACHE_SEG_DATA_SIZE as usize {
        return After::Damaged(format!("its key count {key_num} runs past the segment"));
    }
    let mut buf = [0u8; KSET_ONMEDIA_SIZE_MAX];
    match read_kset(&AsMedia(pmem), layout, dev_seg, next, n_segs, &mut buf) {
        // The terminator is where a torn kset leaves it, unless the key
        // count itself is damaged: a kset that verifies at one of its key
        // boundaries says so.
        Ok(KsetRecord::End { magic: 0 }) => (1..key_num as usize)
            .map(|m| at.1 + kset_size(m) as u32)
            .find(|&p| valid_kset_at(pmem, layout, dev_seg, p, n_segs))
            .map_or(After::Torn, |p| After::Continues((at.0, p))),
        Ok(KsetRecord::Keys { .. } | KsetRecord::Last { .. }) => After::Continues((at.0, next)),
        Ok(KsetRecord::End { magic }) => After::Damaged(format!(
            "magic {magic:#018x} follows it at offset {next:#x}, where a torn kset leaves a terminator"
        )),
        Err(e) => After::Damaged(format!(
            "what follows it at offset {next:#x} is not the terminator a torn kset leaves: {}",
            format_err(e)
        )),
    }
}

/// Whether a kset (with keys, or LAST) whose magic and CRC verify lies at
/// `off` of device segment `dev_seg`.
fn valid_kset_at<P: Pmem + ?Sized>(pmem: &P, layout: &Layout, dev_seg: u32, off: u32, n_segs: u32) -> bool {
    if off as usize + KSET_HEADER_SIZE > CACHE_SEG_DATA_SIZE as usize {
        return false;
    }
    let mut buf = [0u8; KSET_ONMEDIA_SIZE_MAX];
    matches!(
        read_kset(&AsMedia(pmem), layout, dev_seg, off, n_segs, &mut buf),
        Ok(KsetRecord::Keys { .. } | KsetRecord::Last { .. })
    )
}

/// A walk of a key log that goes on past damage.
struct Walk<'a, P: ?Sized> {
    pmem: &'a P,
    layout: &'a Layout,
    dev_segs: &'a [u32],
    n_segs: u32,
}

impl<P: Pmem + ?Sized> Walk<'_, P> {
    /// Follows the key log from `from` to its end, calling `keys` for every
    /// kset with keys, in log order, and `damage` for every stretch it
    /// cannot read (then picks the log up again where it can). Returns the
    /// ksets (LAST ones included) read.
    fn run(
        &self,
        from: LogPos,
        mut keys: impl FnMut(LogPos, &[Key]) -> Result<(), EngineError>,
        mut damage: impl FnMut(DamagedKset),
    ) -> Result<u64, EngineError> {
        let mut seen = vec![false; self.n_segs as usize];
        seen[from.0 as usize] = true;
        let mut at = from;
        let mut ksets = 0u64;
        let mut buf = [0u8; KSET_ONMEDIA_SIZE_MAX];
        loop {
            let dev_seg = self.dev_segs[at.0 as usize];
            let why = match read_kset(&AsMedia(self.pmem), self.layout, dev_seg, at.1, self.n_segs, &mut buf) {
                Ok(KsetRecord::End { magic: 0 }) => break,
                Ok(KsetRecord::Keys { keys: k }) => {
                    keys(at, k)?;
                    ksets += 1;
                    at.1 += kset_size(k.len()) as u32;
                    continue;
                }
                Ok(KsetRecord::Last { next_cache_seg }) if !seen[next_cache_seg as usize] => {
                    seen[next_cache_seg as usize] = true;
                    ksets += 1;
                    at = (next_cache_seg, 0);
                    continue;
                }
                Ok(KsetRecord::Last { next_cache_seg }) => {
                    // A loop: nothing sensible follows.
                    damage(DamagedKset {
                        at,
                        bytes: KSET_HEADER_SIZE as u32,
                        why: format!("its LAST kset leads back to segment {next_cache_seg}"),
                        resumed_at: None,
                    });
                    break;
                }
                Ok(KsetRecord::End { magic }) => format!("no kset and no terminator (magic {magic:#018x})"),
                Err(ReadError::Media { source, .. }) => format!("pmem media error: {source}"),
                Err(ReadError::Format(e)) => {
                    if torn(&e) && after_bad_kset(self.pmem, self.layout, self.dev_segs, at, self.n_segs) == After::Torn
                    {
                        // The newest kset, torn by a crash: the log ends.
                        break;
                    }
                    format!("undecodable kset: {e}")
                }
            };
            // Resumed in another segment (after a damaged LAST kset): once.
            let resumed = self.resync(at).filter(|r| r.0 == at.0 || !std::mem::replace(&mut seen[r.0 as usize], true));
            let bytes = resumed.map_or(CACHE_SEG_DATA_SIZE - at.1, |r| r.1 - at.1);
            damage(DamagedKset { at, bytes, why, resumed_at: resumed });
            match resumed {
                Some(r) => at = r,
                None => break,
            }
        }
        Ok(ksets)
    }

    /// Whether the header at `off` of device segment `dev_seg` has the kset
    /// magic and the LAST flag.
    fn is_last(&self, dev_seg: u32, off: u32) -> bool {
        let mut h = [0u8; KSET_HEADER_SIZE];
        let Ok(a) = self.layout.data_range(dev_seg, off, KSET_HEADER_SIZE as u32) else { return false };
        self.pmem.read(a, &mut h).is_ok()
            && h[8..16] == KSET_MAGIC.to_le_bytes()
            && u64::from_le_bytes(h[16..24].try_into().unwrap_or_default()) & KsetFlags::LAST.bits() != 0
    }

    /// Where the log goes on after the damaged kset at `at`: right after it
    /// if its header still tells its size, else the next kset in the same
    /// segment (ksets are 8-byte aligned) whose magic and CRC verify.
    fn resync(&self, at: LogPos) -> Option<LogPos> {
        let dev_seg = self.dev_segs[at.0 as usize];
        match after_bad_kset(self.pmem, self.layout, self.dev_segs, at, self.n_segs) {
            After::Continues(next) => return Some(next),
            // A damaged LAST kset: what follows it in its segment is older
            // than the log, and where the log goes on is not known.
            _ if self.is_last(dev_seg, at.1) => return None,
            _ => {}
        }
        const CHUNK: u32 = 64 << 10;
        let magic = KSET_MAGIC.to_le_bytes();
        let last = CACHE_SEG_DATA_SIZE - KSET_HEADER_SIZE as u32;
        let mut chunk = vec![0u8; CHUNK as usize + KSET_HEADER_SIZE];
        let mut base = at.1 + 8;
        while base <= last {
            let n = (last - base + KSET_HEADER_SIZE as u32).min(CHUNK + KSET_HEADER_SIZE as u32);
            let buf = &mut chunk[..n as usize];
            let read = self.layout.data_range(dev_seg, base, n).ok().is_some_and(|a| self.pmem.read(a, buf).is_ok());
            let mut p = 0u32;
            while p + KSET_HEADER_SIZE as u32 <= n && p < CHUNK {
                // A chunk that cannot be read whole is tried kset by kset.
                let candidate = !read || buf[p as usize + 8..p as usize + 16] == magic;
                if candidate && valid_kset_at(self.pmem, self.layout, dev_seg, base + p, self.n_segs) {
                    return Some((at.0, base + p));
                }
                p += 8;
            }
            base += CHUNK;
        }
        None
    }
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
    let ci = info.cache_info;
    let media = crate::pmem::AsMedia(dev.pmem());
    let mut segs = Vec::new();
    let mut walk = pcache_format::media::ChainWalk::new(ci.seg_id.get(), ci.n_segs.get());
    while let Some(step) = walk.next(&media, dev.layout()) {
        segs.push(step.map_err(super::dev::format_err)?.dev_seg);
    }
    let dirty_bytes = super::facade::summarize(dev.pmem(), dev.layout(), &info).ok().map(|s| s.dirty_bytes);
    release(dev, id, &info, &segs)?;
    Ok(DiscardReport { id, dirty_bytes, segments_released: segs.len() as u32 })
}
