//! Offline repairs of the backing table: what `pcache repair` shows and, on
//! request, does. Nothing here writes a byte of cached data or of a key log;
//! each action rewrites or creates one backing entry, both copies.
//!
//! - An entry with one valid copy (the other damaged, or never written, as
//!   the RFC and earlier pcache versions left them) gets its other copy.
//! - A cache whose entry was lost (found by [`CacheDev::orphans`] with dirty
//!   data) gets a new entry, for a backing device the user names: the entry
//!   cannot say which it was. The backing device must hold every key.
//! - A damaged entry with no lost cache left to give it is freed.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use pcache_format::image::Orphan;
use pcache_format::media::read_backing;
use pcache_format::{BackingDevInfo, CACHE_GC_PERCENT_DEFAULT, CacheFlags, CacheInfo};

use super::dev::CacheDev;
use super::error::EngineError;
use crate::backing::BackingDev;
use crate::pmem::{AsMedia, Pmem};

/// One repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Write the copy of entry `id` that is not valid, from the valid one.
    SecondCopy {
        /// The entry.
        id: u32,
        /// Its backing path.
        path: String,
    },
    /// Give the lost cache starting at device segment `head` a new entry
    /// `id` for the backing device at `path`.
    Rebuild {
        /// The entry to write.
        id: u32,
        /// The cache's first segment.
        head: u32,
        /// Its segments.
        segs: u32,
        /// Its dirty keys.
        dirty_keys: u64,
        /// Whether its keys carry data CRCs (so the entry says so).
        data_crc: bool,
        /// The backing device, as it will be stored.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// Free damaged entry `id`: no lost cache with dirty data is left.
    FreeDamaged {
        /// The entry.
        id: u32,
    },
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repair::SecondCopy { id, path } => {
                write!(f, "write the second copy of backing entry {id} ({path}) from its valid copy")
            }
            Repair::Rebuild { id, head, segs, dirty_keys, data_crc, path, size } => write!(
                f,
                "rebuild backing entry {id} for {} ({size} bytes): the cache of {segs} segment(s) from segment \
                 {head}, {dirty_keys} dirty key(s), data crc {}",
                path.display(),
                if *data_crc { "on" } else { "off" }
            ),
            Repair::FreeDamaged { id } => write!(f, "free damaged backing entry {id} (no lost cache holds dirty data)"),
        }
    }
}

/// What stands in the way of a repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked(pub String);

/// Works out the repairs for `dev`. `backing` is the device a lost cache is
/// to be given to, and `head` picks the lost cache when there are several.
/// A lost cache with dirty data and no `backing` is reported as blocked:
/// only the user knows whose it was.
pub fn plan<P: Pmem, B: BackingDev>(
    dev: &CacheDev<P>,
    backing: Option<&B>,
    head: Option<u32>,
) -> Result<(Vec<Repair>, Vec<Blocked>), EngineError> {
    let media = AsMedia(dev.pmem());
    let mut repairs = Vec::new();
    let mut blocked = Vec::new();
    for (id, info) in dev.backings()? {
        let pair = read_backing(&media, dev.layout(), id)?;
        if !pair.copies.iter().all(|c| c.valid()) {
            repairs.push(Repair::SecondCopy { id, path: String::from_utf8_lossy(info.path()).into_owned() });
        }
    }
    let lost: Vec<Orphan> = dev.orphans().into_iter().filter(|(o, _)| o.holds_dirty_data()).map(|(o, _)| o).collect();
    let damaged: Vec<u32> = dev.damaged().into_iter().map(|(id, _)| id).collect();
    let chosen: Option<&Orphan> = match (head, lost.as_slice()) {
        (Some(h), _) => Some(
            lost.iter()
                .find(|o| o.head == h)
                .ok_or_else(|| EngineError::InvalidOption(format!("no lost cache starts at segment {h}")))?,
        ),
        (None, [one]) => Some(one),
        (None, []) => None,
        (None, many) => {
            let heads: Vec<String> = many.iter().map(|o| o.head.to_string()).collect();
            blocked.push(Blocked(format!(
                "{} lost caches (first segments {}): pick one with --cache-segment",
                many.len(),
                heads.join(", ")
            )));
            None
        }
    };
    let mut rebuilt = 0;
    if let Some(o) = chosen {
        match backing {
            None => blocked.push(Blocked(format!(
                "the lost cache from segment {} holds {} dirty key(s) (backing offsets up to {}): name the backing \
                 device it caches with --backing PATH to rebuild its entry",
                o.head, o.log.dirty_keys, o.log.key_end
            ))),
            Some(b) => {
                if o.log.key_end > b.size() {
                    return Err(EngineError::InvalidOption(format!(
                        "{} holds {} bytes, but the lost cache has keys up to offset {}: it is not that cache's \
                         backing device",
                        b.path().display(),
                        b.size(),
                        o.log.key_end
                    )));
                }
                let id = match dev.find_entry(b.path(), b.identity())? {
                    Ok((id, _)) => {
                        return Err(EngineError::InvalidOption(format!(
                            "{} already has a cache (backing entry {id}); a backing device has one cache",
                            b.path().display()
                        )));
                    }
                    Err(free) => damaged.first().copied().unwrap_or(free),
                };
                repairs.push(Repair::Rebuild {
                    id,
                    head: o.head,
                    segs: o.segs.len() as u32,
                    dirty_keys: o.log.dirty_keys,
                    data_crc: o.data_crc(),
                    path: b.path().to_path_buf(),
                    size: b.size(),
                });
                rebuilt = 1;
            }
        }
    }
    if lost.len() <= rebuilt {
        let reused = repairs.iter().find_map(|r| match r {
            Repair::Rebuild { id, .. } => Some(*id),
            _ => None,
        });
        for id in damaged.into_iter().filter(|id| Some(*id) != reused) {
            repairs.push(Repair::FreeDamaged { id });
        }
    }
    Ok((repairs, blocked))
}

/// Carries out `repairs`, in order.
pub fn apply<P: Pmem>(dev: &CacheDev<P>, repairs: &[Repair]) -> Result<(), EngineError> {
    for r in repairs {
        match r {
            Repair::SecondCopy { id, .. } => {
                let info = dev.read_entry(*id)?;
                // The older (here: the invalid) copy is the one rewritten.
                dev.write_entry(*id, &info)?;
            }
            Repair::Rebuild { id, head, segs, data_crc, path, size, .. } => {
                let flags = if *data_crc { CacheFlags::DATA_CRC } else { CacheFlags::empty() };
                let ci = CacheInfo::new(*head, *segs, CACHE_GC_PERCENT_DEFAULT, flags);
                let info = BackingDevInfo::running(*id, path.as_os_str().as_bytes(), size / 512, ci)
                    .map_err(|e| EngineError::InvalidOption(format!("{}: {e}", Path::new(path).display())))?;
                dev.adopt(*head, *id, &info)?;
            }
            Repair::FreeDamaged { id } => dev.write_entry_both(*id, &BackingDevInfo::free(*id))?,
        }
    }
    Ok(())
}

/// Points the cache of the backing device once stored as `old` at the
/// device `new` (the same device under a new name: `/dev/sdb` that became
/// `/dev/sdc`, a file moved). Refused unless `new` has exactly the size
/// stored for the cache and no cache of its own. Returns the entry id.
pub fn rename<P: Pmem, B: BackingDev>(dev: &CacheDev<P>, old: &Path, new: &B) -> Result<u32, EngineError> {
    let (id, info) = entry_named(dev, old)?;
    if let Ok((other, _)) = dev.find_entry(new.path(), new.identity())?
        && other != id
    {
        return Err(EngineError::InvalidOption(format!(
            "{} already has a cache of its own (backing entry {other})",
            new.path().display()
        )));
    }
    let stored = info.dev_size.get() * 512;
    if new.size() / 512 != info.dev_size.get() {
        return Err(EngineError::InvalidOption(format!(
            "{} holds {} bytes, but the cache of {} was made for {stored} bytes: a renamed device keeps its size, \
             so this is not it",
            new.path().display(),
            new.size(),
            old.display()
        )));
    }
    let path = new.path().as_os_str().as_bytes();
    let renamed = BackingDevInfo::running(id, path, info.dev_size.get(), info.cache_info)
        .map_err(|e| EngineError::InvalidOption(format!("{}: {e}", new.path().display())))?;
    dev.write_entry_both(id, &renamed)?;
    Ok(id)
}

/// The running entry whose stored path is `old` — as given, made
/// absolute, or canonical if it still exists — or, if `old` names a file
/// or device now, whose stored path names the same one.
pub(crate) fn entry_named<P: Pmem>(dev: &CacheDev<P>, old: &Path) -> Result<(u32, BackingDevInfo), EngineError> {
    let abs = std::path::absolute(old).unwrap_or_else(|_| old.to_path_buf());
    let canonical = std::fs::canonicalize(old).ok();
    let old_id = crate::backing::BackingId::of_path(old);
    let found: Vec<(u32, BackingDevInfo)> = dev
        .backings()?
        .into_iter()
        .filter(|(_, e)| {
            let stored = crate::backing::stored_path(e);
            stored == old
                || stored == abs
                || canonical.as_deref() == Some(stored)
                || old_id.is_some_and(|i| crate::backing::BackingId::of_path(stored) == Some(i))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(EngineError::NoCache { path: old.to_path_buf() }),
        _ => Err(EngineError::InvalidOption(format!(
            "several backing entries match {}: run `pcache check`",
            old.display()
        ))),
    }
}
