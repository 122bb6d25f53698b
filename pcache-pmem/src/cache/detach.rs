//! Detaching a backing device: write every dirty key back, then give the
//! cache up (the RFC's backing-stop, done offline and explicitly).

use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use pcache_format::{BackingDevInfo, CACHE_SEG_CTRL_SIZE};

use super::{Cache, CacheDev, CacheOptions, EngineError, data_err};
use crate::backing::BackingDev;
use crate::pmem::Pmem;

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
pub fn detach<P: Pmem + 'static, B: BackingDev + 'static>(
    dev: &Arc<CacheDev<P>>,
    backing: B,
    progress: impl FnMut(u64, u64),
) -> Result<DetachReport, EngineError> {
    let path = backing.path().to_path_buf();
    let (id, info) = match dev.find_entry(path.as_os_str().as_bytes())? {
        Ok(found) => found,
        Err(_) => return Err(EngineError::NoCache { path }),
    };
    let opts = CacheOptions { background: false, queues: 1, ..CacheOptions::default() };
    let (cache, _) = Cache::start(dev.clone(), backing, &opts)?;
    let ksets = cache.write_back(progress)?;
    let written = cache.stats().bytes_written_back;
    let segs = cache.inner.dev_segs.clone();
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
    dev.write_entry(id, &BackingDevInfo::free(id))?;
    let pmem = dev.pmem();
    for &seg in segs {
        pmem.zero_nodrain(dev.layout().ctrl_offset(seg).map_err(data_err)?, CACHE_SEG_CTRL_SIZE as u64)?;
    }
    pmem.fence()?;
    dev.release_segments(segs);
    Ok(())
}
