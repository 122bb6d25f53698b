//! A formatted pmem device: its layout, the backing table, and which
//! device segments belong to a cache (spec §2.7).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use pcache_format::media::{ChainWalk, read_backing, read_meta_segment_info, read_superblock};
use pcache_format::{BackingDevInfo, Layout, META_ENTRIES, ReadError};

use super::EngineError;
use crate::pmem::{AsMedia, Pmem, PmemError};
use crate::records::write_record;

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
    /// The backing table as on the media: the running entries by id. Read
    /// once at open, kept up to date by every write (which it serialises).
    table: Mutex<Vec<Option<BackingDevInfo>>>,
    /// Entries with a cache started in this process.
    started: Mutex<HashSet<u32>>,
}

pub(crate) fn format_err(e: ReadError<PmemError>) -> EngineError {
    match e {
        ReadError::Media { source, .. } => EngineError::Pmem(source),
        ReadError::Format(e) => EngineError::Corrupt(e.to_string()),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<P: Pmem> CacheDev<P> {
    /// Opens a formatted device: validates the superblock and the meta
    /// segment, and rebuilds the device segment bitmap from the chains of
    /// every running backing entry, each id bounds-checked and no segment
    /// in two chains. Refuses a device with a damaged backing table rather
    /// than risk handing a cache's segments to another.
    pub fn open(pmem: P) -> Result<Arc<Self>, EngineError> {
        let media = AsMedia(&pmem);
        let (_, layout) = read_superblock(&media).map_err(format_err)?;
        read_meta_segment_info(&media, &layout)
            .map_err(format_err)?
            .latest
            .map_err(|e| EngineError::Corrupt(e.to_string()))?;
        let mut used = vec![false; usize::from(layout.seg_num())];
        used[0] = true;
        let mut table = vec![None; META_ENTRIES as usize];
        for id in 0..META_ENTRIES {
            let pair = read_backing(&media, &layout, id).map_err(format_err)?;
            let info = pair
                .latest
                .map_err(|e| EngineError::Corrupt(format!("backing {id}: {e} (run `pcache check`)")))?
                .record;
            if !info.is_running() {
                continue;
            }
            table[id as usize] = Some(info);
            let ci = info.cache_info;
            let mut walk = ChainWalk::new(ci.seg_id.get(), ci.n_segs.get());
            while let Some(step) = walk.next(&media, &layout) {
                let step = step.map_err(|e| EngineError::Corrupt(format!("backing {id}: {}", format_err(e))))?;
                let slot = &mut used[step.dev_seg as usize];
                if *slot {
                    return Err(EngineError::Corrupt(format!(
                        "backing {id}: segment {} belongs to two chains (run `pcache check`)",
                        step.dev_seg
                    )));
                }
                *slot = true;
            }
        }
        let free = used.iter().filter(|u| !**u).count() as u32;
        Ok(Arc::new(Self {
            pmem,
            layout,
            segs: Mutex::new(DevSegs { used, free }),
            table: Mutex::new(table),
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
        Ok(table.iter().enumerate().filter_map(|(id, e)| e.map(|e| (id as u32, e))).collect())
    }

    /// The running entry for `path`, or the first free id.
    pub(crate) fn find_entry(&self, path: &[u8]) -> Result<Result<(u32, BackingDevInfo), u32>, EngineError> {
        let table = lock(&self.table);
        if let Some((id, e)) =
            table.iter().enumerate().find_map(|(id, e)| e.filter(|e| e.path() == path).map(|e| (id, e)))
        {
            return Ok(Ok((id as u32, e)));
        }
        table.iter().position(|e| e.is_none()).map(|id| Err(id as u32)).ok_or(EngineError::TableFull)
    }

    /// Backing entry `id`, running.
    pub(crate) fn read_entry(&self, id: u32) -> Result<BackingDevInfo, EngineError> {
        lock(&self.table)
            .get(id as usize)
            .copied()
            .flatten()
            .ok_or_else(|| EngineError::Corrupt(format!("backing {id} is not running")))
    }

    /// Writes backing entry `id`, durably.
    pub(crate) fn write_entry(&self, id: u32, info: &BackingDevInfo) -> Result<(), EngineError> {
        let mut table = lock(&self.table);
        let off = self.layout.meta_entry_offset(id).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        write_record(&self.pmem, off, info)?;
        table[id as usize] = info.is_running().then_some(*info);
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
