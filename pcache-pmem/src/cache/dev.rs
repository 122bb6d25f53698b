//! A formatted pmem device: its layout, the backing table, and which
//! device segments belong to a cache (spec §2.7).

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pcache_format::image::{Orphan, entry_torn_harmlessly, find_orphans};
use pcache_format::media::{
    ChainWalk, read_backing, read_dm_cache_info, read_meta_segment_info, read_superblock, table_ids,
};
use pcache_format::{
    BackingDevInfo, CacheFlags, CacheInfo, CachePos, CacheSegGen, Dialect, ErrorKind, Layout, META_ENTRIES,
    SegmentInfo, TERMINATOR,
};

use super::ctx::lock;
use super::error::EngineError;
use crate::backing::{BackingId, stored_path};
use crate::pmem::{AsMedia, Pmem, PmemError};
use crate::records::{write_record, write_record_both};

/// Walks the chain of the cache `ci` (of `whose`, for errors), marking each
/// of its device segments in `used`; a segment already marked is in two
/// chains (or twice in one), which is refused.
fn claim_chain<P: Pmem>(
    media: &AsMedia<'_, P>,
    layout: &Layout,
    ci: &CacheInfo,
    used: &mut [bool],
    whose: &str,
) -> Result<(), EngineError> {
    let mut walk = ChainWalk::new(ci.seg_id.get(), ci.n_segs.get());
    while let Some(step) = walk.next(media, layout) {
        let step = step.map_err(|e| match EngineError::from(e) {
            EngineError::Format(e) => EngineError::Corrupt(format!("{whose}: {e}")),
            other => other,
        })?;
        let slot = &mut used[step.dev_seg as usize];
        if *slot {
            return Err(EngineError::Corrupt(format!(
                "{whose}: segment {} belongs to two chains (run `pcache check`)",
                step.dev_seg
            )));
        }
        *slot = true;
    }
    Ok(())
}

/// A new cache entry, as `CacheDev::create_entry` writes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewEntry<'a> {
    /// The backing device's stored path.
    pub(crate) path: &'a Path,
    /// Its size in sectors.
    pub(crate) sectors: u64,
    /// Its identity is known: it is not just a path.
    pub(crate) known_identity: bool,
    pub(crate) gc_percent: u16,
    pub(crate) flags: CacheFlags,
}

/// A backing-table entry that is not free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A cache exists for this backing device.
    Running(Box<BackingDevInfo>),
    /// Neither copy is valid, but one was written: it may have owned a
    /// cache, so the id is never reused (`pcache repair` deals with it).
    Damaged(String),
}

impl Entry {
    fn running(&self) -> Option<&BackingDevInfo> {
        match self {
            Entry::Running(info) => Some(info),
            Entry::Damaged(_) => None,
        }
    }
}

/// Which device segments are in use.
#[derive(Debug)]
struct DevSegs {
    used: Vec<bool>,
    free: u32,
}

/// An opened, validated pmem device, shared by the caches on it.
#[derive(Debug)]
pub struct CacheDev<P> {
    pmem: P,
    layout: Layout,
    segs: Mutex<DevSegs>,
    /// The backing table as on the media: the entries in use by id. Read
    /// once at open, kept up to date by every write (which it serialises).
    table: Mutex<Vec<Option<Entry>>>,
    /// Caches owned by no entry, found at open; `reserved` ones keep their
    /// segments out of the free pool.
    orphans: Mutex<Vec<(Orphan, bool)>>,
    /// Entries with a cache started in this process.
    started: Mutex<HashSet<u32>>,
}

impl<P: Pmem> CacheDev<P> {
    /// Opens a formatted device: validates the superblock and the meta
    /// segment, and rebuilds the device segment bitmap from the chains of
    /// every running backing entry, each id bounds-checked and no segment
    /// in two chains. Refuses a device with a damaged backing table rather
    /// than risk handing a cache's segments to another.
    ///
    /// A damaged entry (no valid copy, one written) does not stop the
    /// others: it is kept as [`Entry::Damaged`], never reused. Caches that
    /// no entry owns are found ([`find_orphans`]); the segments of those
    /// holding dirty data — and of every one while an entry is damaged, as
    /// it may be the damaged entry's — are never allocated.
    pub fn open(pmem: P) -> Result<Arc<Self>, EngineError> {
        let media = AsMedia(&pmem);
        let layout = read_superblock(&media)?;
        if layout.dialect() == Dialect::DmPcache {
            return Self::open_dm(pmem, layout);
        }
        read_meta_segment_info(&media, &layout)?.latest?;
        let mut used = vec![false; layout.seg_num() as usize];
        used[0] = true;
        let mut table = vec![None; META_ENTRIES as usize];
        let mut unreadable = Vec::new();
        for id in table_ids(&media, &layout) {
            let pair = read_backing(&media, &layout, id)?;
            let info = match pair.latest {
                Ok(latest) => latest.record,
                Err(e) if e.kind == ErrorKind::NeverWritten => continue,
                Err(e) => {
                    unreadable.push((id, e));
                    table[id as usize] = Some(Entry::Damaged(e.to_string()));
                    continue;
                }
            };
            if !info.is_running() {
                continue;
            }
            table[id as usize] = Some(Entry::Running(Box::new(info)));
            claim_chain(&media, &layout, &info.cache_info, &mut used, &format!("backing {id}"))?;
        }
        let found = find_orphans(&media, &layout, &used);
        // An entry torn by a crash as it was first written holds nothing:
        // it is free (`pcache check` notes it).
        for (id, e) in &unreadable {
            if entry_torn_harmlessly(e, &found) {
                table[*id as usize] = None;
            }
        }
        let any_damaged = table.iter().any(|e| matches!(e, Some(Entry::Damaged(_))));
        let orphans: Vec<(Orphan, bool)> = found
            .into_iter()
            .map(|o| {
                let reserved = any_damaged || o.holds_dirty_data();
                (o, reserved)
            })
            .collect();
        for (o, reserved) in &orphans {
            if *reserved {
                for &seg in &o.segs {
                    used[seg as usize] = true;
                }
            }
        }
        let free = used.iter().filter(|u| !**u).count() as u32;
        Ok(Arc::new(Self {
            pmem,
            layout,
            segs: Mutex::new(DevSegs { used, free }),
            table: Mutex::new(table),
            orphans: Mutex::new(orphans),
            started: Mutex::new(HashSet::new()),
        }))
    }

    /// Opens a dm-pcache device: its one cache, from the cache info, seen as
    /// backing entry 0 (with no stored path: the kernel keeps none) whose
    /// chain holds every segment. Refused unless the kernel would load it as
    /// it is: a valid cache info with INIT_DONE in write-back mode, and a
    /// whole chain.
    fn open_dm(pmem: P, layout: Layout) -> Result<Arc<Self>, EngineError> {
        let media = AsMedia(&pmem);
        let ci = read_dm_cache_info(&media, &layout)?.latest.map_err(|e| {
            EngineError::Corrupt(format!(
                "dm-pcache cache info: {e}; the kernel would start a new, empty cache here (`pcache check` says more)"
            ))
        })?;
        let ci = ci.record;
        if !ci.init_done() {
            return Err(EngineError::Corrupt(
                "the dm-pcache cache never finished its first start (INIT_DONE is not set): load it with the \
                 kernel module once, or `pcache format --dialect dm-pcache --force`"
                    .into(),
            ));
        }
        let flags = if ci.data_crc() { CacheFlags::DATA_CRC } else { CacheFlags::empty() };
        let mut info = BackingDevInfo::free(0);
        info.state = pcache_format::BackingState::Running as u8;
        info.cache_info = CacheInfo::new(ci.seg_id.get(), ci.n_segs.get(), ci.gc_percent() as u16, flags);
        let mut used = vec![false; layout.seg_num() as usize];
        claim_chain(&media, &layout, &info.cache_info, &mut used, "the dm-pcache cache")?;
        let free = used.iter().filter(|u| !**u).count() as u32;
        Ok(Arc::new(Self {
            pmem,
            layout,
            segs: Mutex::new(DevSegs { used, free }),
            table: Mutex::new(vec![Some(Entry::Running(Box::new(info)))]),
            orphans: Mutex::new(Vec::new()),
            started: Mutex::new(HashSet::new()),
        }))
    }

    /// The device.
    pub fn pmem(&self) -> &P {
        &self.pmem
    }

    /// Its layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Device segments not in any cache.
    pub fn free_segments(&self) -> u32 {
        lock(&self.segs).free
    }

    /// The running backing entries: `(id, entry)`.
    pub fn backings(&self) -> Result<Vec<(u32, BackingDevInfo)>, EngineError> {
        let table = lock(&self.table);
        Ok(table.iter().enumerate().filter_map(|(id, e)| Some((id as u32, *e.as_ref()?.running()?))).collect())
    }

    /// The damaged entries: `(id, why)`.
    pub fn damaged(&self) -> Vec<(u32, String)> {
        let table = lock(&self.table);
        table
            .iter()
            .enumerate()
            .filter_map(|(id, e)| match e {
                Some(Entry::Damaged(why)) => Some((id as u32, why.clone())),
                _ => None,
            })
            .collect()
    }

    /// Why a new cache must not be created now, if it must not: an entry
    /// is damaged, or a cache holding dirty data is owned by no entry.
    pub fn lost_cache(&self) -> Option<String> {
        if let Some((id, _)) = self.damaged().first() {
            return Some(format!("backing entry {id} is damaged"));
        }
        let orphans = lock(&self.orphans);
        let (o, _) = orphans.iter().find(|(o, reserved)| *reserved && o.holds_dirty_data())?;
        Some(format!(
            "the cache in segments from {} ({} segment(s), {} dirty key(s)) is owned by no backing entry",
            o.head,
            o.segs.len(),
            o.log.dirty_keys
        ))
    }

    /// Caches owned by no entry, as found at open, each with whether its
    /// segments are kept out of the free pool.
    pub fn orphans(&self) -> Vec<(Orphan, bool)> {
        lock(&self.orphans).clone()
    }

    /// Gives the orphan cache whose chain starts at `head` the entry `info`
    /// in slot `id` (both copies written): its segments become the entry's.
    pub(crate) fn adopt(&self, head: u32, id: u32, info: &BackingDevInfo) -> Result<(), EngineError> {
        let mut orphans = lock(&self.orphans);
        let at = orphans.iter().position(|(o, _)| o.head == head).ok_or_else(|| {
            EngineError::InvalidOption(format!("no cache owned by no entry starts at segment {head}"))
        })?;
        {
            let mut segs = lock(&self.segs);
            for &seg in &orphans[at].0.segs {
                if let Some(u) = segs.used.get_mut(seg as usize)
                    && !*u
                {
                    *u = true;
                    segs.free -= 1;
                }
            }
        }
        self.write_entry_both(id, info)?;
        orphans.remove(at);
        Ok(())
    }

    /// The running entry for the backing device at `path` (as stored:
    /// canonical) with identity `id`, or the first free id.
    ///
    /// An entry matches when its stored path is `path`, or when what its
    /// stored path names now is the same file or block device (`id`): the
    /// same backing reached by another name is the same backing. Two
    /// entries that both match are refused: one backing must never have two
    /// caches.
    pub fn find_entry(
        &self,
        path: &Path,
        id: Option<BackingId>,
    ) -> Result<Result<(u32, BackingDevInfo), u32>, EngineError> {
        let table = lock(&self.table);
        if self.layout.dialect() == Dialect::DmPcache {
            // One cache, and no stored name to match: whatever backing
            // device is given is the one (its size is checked against the
            // keys when the cache loads).
            let info = table.first().and_then(|e| e.as_ref()?.running().copied());
            return info.map(|info| Ok(Ok((0, info)))).unwrap_or(Err(EngineError::TableFull));
        }
        let bytes = path.as_os_str().as_bytes();
        let matches: Vec<(u32, BackingDevInfo)> = table
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i as u32, *e.as_ref()?.running()?)))
            .filter(|(_, e)| e.path() == bytes || id.is_some_and(|id| BackingId::of_path(stored_path(e)) == Some(id)))
            .collect();
        match matches.as_slice() {
            [] => {}
            [one] => return Ok(Ok(*one)),
            [a, b, ..] => {
                return Err(EngineError::Corrupt(format!(
                    "backing entries {} ({}) and {} ({}) both name {}: one backing cannot have two caches \
                     (run `pcache check`)",
                    a.0,
                    String::from_utf8_lossy(a.1.path()),
                    b.0,
                    String::from_utf8_lossy(b.1.path()),
                    path.display()
                )));
            }
        }
        table.iter().position(|e| e.is_none()).map(|id| Err(id as u32)).ok_or(EngineError::TableFull)
    }

    /// Backing entry `id`, running.
    pub(crate) fn read_entry(&self, id: u32) -> Result<BackingDevInfo, EngineError> {
        lock(&self.table)
            .get(id as usize)
            .and_then(|e| e.as_ref()?.running().copied())
            .ok_or_else(|| EngineError::Corrupt(format!("backing {id} is not running")))
    }

    /// Writes backing entry `id`, durably: one copy, the older one, so that
    /// a crash leaves the old entry or the new one.
    pub(crate) fn write_entry(&self, id: u32, info: &BackingDevInfo) -> Result<(), EngineError> {
        self.put_entry(id, info, write_record)
    }

    /// Writes both copies of backing entry `id`, one after the other, each
    /// durable before the next: how an entry is created or freed, so that
    /// one damaged page can never make it read as something else.
    pub(crate) fn write_entry_both(&self, id: u32, info: &BackingDevInfo) -> Result<(), EngineError> {
        self.put_entry(id, info, write_record_both)
    }

    fn put_entry(
        &self,
        id: u32,
        info: &BackingDevInfo,
        write: fn(&P, Dialect, u64, &BackingDevInfo) -> Result<(), PmemError>,
    ) -> Result<(), EngineError> {
        let mut table = lock(&self.table);
        if self.layout.dialect() == Dialect::DmPcache {
            self.put_dm_cache_info(info)?;
            table[0] = Some(Entry::Running(Box::new(*info)));
            return Ok(());
        }
        let off = self.layout.meta_entry_offset(id)?;
        write(&self.pmem, self.layout.dialect(), off, info)?;
        table[id as usize] = info.is_running().then(|| Entry::Running(Box::new(*info)));
        Ok(())
    }

    /// dm-pcache: writes what of `info` its cache info keeps (the gc
    /// percent; the rest stays as stored), one copy, the older one — and
    /// nothing when both copies are valid and already say it. An entry
    /// cannot be freed: the cache owns the device.
    fn put_dm_cache_info(&self, info: &BackingDevInfo) -> Result<(), EngineError> {
        if !info.is_running() {
            return Err(EngineError::Dialect("a dm-pcache device (its cache cannot be given up)".into()));
        }
        let pair = read_dm_cache_info(&AsMedia(&self.pmem), &self.layout)?;
        let stored = pair.latest?.record;
        let gc = info.cache_info.gc_percent.get() as u8;
        if pair.copies.iter().all(|c| c.valid()) && stored.gc_percent() == u32::from(gc) {
            return Ok(());
        }
        let off = self.layout.cache_info_offset()?;
        write_record(&self.pmem, Dialect::DmPcache, off, &stored.with_gc_percent(gc))?;
        Ok(())
    }

    /// Creates cache entry `id` for the backing device `new`, with as many
    /// segments as `size` decides given the free ones, and returns it.
    ///
    /// Refused while the device may hold a lost cache (a damaged entry, or
    /// an orphan with dirty data): it may be this backing's. For a backing
    /// whose identity is known, also refused while an entry caches a
    /// vanished device of the same size: it may be this device under
    /// another name. The segments' records, tails and log are initialised
    /// first and the entry is written last, both copies: a crash before
    /// leaves the segments unclaimed, free again at the next open.
    pub(crate) fn create_entry(
        &self,
        id: u32,
        new: &NewEntry<'_>,
        size: impl FnOnce(u32) -> Result<u32, EngineError>,
    ) -> Result<BackingDevInfo, EngineError> {
        let (path, sectors) = (new.path, new.sectors);
        if let Some(why) = self.lost_cache() {
            return Err(EngineError::LostCache(format!(
                "no cache for {} is known, but {why}: it may be this device's, with data not yet written \
                 back, so no new cache is created; see `pcache check`, then `pcache repair`",
                path.display()
            )));
        }
        if new.known_identity {
            self.refuse_renamed(path, sectors)?;
        }
        let free = self.free_segments();
        let n = size(free)?;
        let segs = self.alloc_segments(n).ok_or(EngineError::NoSpace { need: n, free })?;
        let made = BackingDevInfo::running(
            id,
            path.as_os_str().as_bytes(),
            sectors,
            CacheInfo::new(segs[0], n, new.gc_percent, new.flags),
        )
        .map_err(EngineError::from)
        .and_then(|info| {
            self.init_cache(&segs)?;
            self.write_entry_both(id, &info)?;
            Ok(info)
        });
        if made.is_err() {
            self.release_segments(&segs);
        }
        made
    }

    /// Refuses a new entry for `path` while an entry caches a device of the
    /// same size that no longer exists.
    fn refuse_renamed(&self, path: &Path, sectors: u64) -> Result<(), EngineError> {
        let Some((old_id, old)) =
            self.backings()?.into_iter().find(|(_, e)| e.dev_size.get() == sectors && is_gone(stored_path(e)))
        else {
            return Ok(());
        };
        let old = String::from_utf8_lossy(old.path());
        let path = path.display();
        Err(EngineError::LostCache(format!(
            "no cache for {path} is known, but backing entry {old_id} caches {old}, which no longer exists and \
             had the same size: if {path} is that device under a new name, run `pcache rename DEVICE \
             --backing {old} --to {path}`; if that device is gone for good, drop its cache first with \
             `pcache detach DEVICE --backing {old} --discard` (its dirty data is lost)",
        )))
    }

    /// Initialises a new cache's segments (both copies of every record, so
    /// that whatever they held before leaves no stale copy), its tails and
    /// an empty log.
    fn init_cache(&self, segs: &[u32]) -> Result<(), EngineError> {
        let (pmem, layout) = (&self.pmem, &self.layout);
        let d = layout.dialect();
        for (i, &seg) in segs.iter().enumerate() {
            let info = SegmentInfo::data(seg, segs.get(i + 1).copied());
            write_record_both(pmem, d, layout.seg_info_offset(seg)?, &info)?;
            write_record_both(pmem, d, layout.ctrl_offset(seg)?, &CacheSegGen::new(0))?;
        }
        let (key_tail, dirty_tail) = layout.tail_offsets(segs[0])?;
        pmem.copy_persist(layout.data_offset(segs[0])?, &TERMINATOR)?;
        let start = CachePos::new(0, 0);
        write_record_both(pmem, d, dirty_tail, &start)?;
        write_record_both(pmem, d, key_tail, &start)?;
        Ok(())
    }

    /// Takes `n` free device segments, lowest first, or none if fewer are free.
    pub(crate) fn alloc_segments(&self, n: u32) -> Option<Vec<u32>> {
        let mut segs = lock(&self.segs);
        if segs.free < n {
            return None;
        }
        let mut got = Vec::with_capacity(n as usize);
        for (i, used) in segs.used.iter_mut().enumerate() {
            if got.len() as u32 == n {
                break;
            }
            if !*used {
                *used = true;
                got.push(i as u32);
            }
        }
        segs.free -= n;
        Some(got)
    }

    /// Returns device segments to the free pool.
    pub(crate) fn release_segments(&self, ids: &[u32]) {
        let mut segs = lock(&self.segs);
        for &id in ids {
            if let Some(u) = segs.used.get_mut(id as usize)
                && *u
            {
                *u = false;
                segs.free += 1;
            }
        }
    }

    /// Marks entry `id` as started in this process; false if it already is.
    pub(crate) fn claim(&self, id: u32) -> bool {
        lock(&self.started).insert(id)
    }

    /// Undoes [`CacheDev::claim`].
    pub(crate) fn unclaim(&self, id: u32) {
        lock(&self.started).remove(&id);
    }
}

/// Whether the local device a stored backing path names no longer exists
/// (an NBD URI's server may simply be down: never counted as gone).
fn is_gone(stored: &Path) -> bool {
    crate::nbd_uri::stored_uri(stored).is_none() && !stored.exists()
}
