//! A running cache as the NBD server's [`BlockDevice`], with the engine's
//! errors turned into the protocol's errnos.

use std::sync::Arc;

use pcache_cli::nbd::{self, BlockDevice, DevError, Extent};
use pcache_pmem::BackingDev;
use pcache_pmem::EngineError;
use tracing::warn;

/// The cache `attach` runs: on a DAX mapping, in front of a file or block
/// device.
pub(super) type PmemCache = pcache_pmem::Cache<pcache_pmem::DaxMapping, pcache_cli::remote::AnyBacking>;

/// The cache as an NBD device.
pub struct CacheExport {
    cache: Arc<PmemCache>,
    /// Durability costs an `msync` (pmem emulated by an ordinary file): a
    /// FUA write waits for one, so a connection's FUA writes in flight run
    /// side by side on its workers, and share syncs. Other writes only
    /// store (group commit), and on pmem a FUA write takes microseconds:
    /// handing those to a worker costs more than it saves.
    fua_syncs: bool,
}

impl CacheExport {
    pub fn new(cache: Arc<PmemCache>) -> Self {
        let fua_syncs = cache.dev().pmem().mode() == pcache_pmem::MapMode::Emulated;
        Self { cache, fua_syncs }
    }
}

/// The errno a client sees for `e` (logged: the client may not show it).
fn dev_err(e: EngineError) -> DevError {
    let errno = match e {
        EngineError::OutOfRange { .. } | EngineError::InvalidOption(_) => nbd::EINVAL,
        EngineError::CacheFull | EngineError::Stalled(_) => nbd::ENOSPC,
        EngineError::Stopped => nbd::ESHUTDOWN,
        _ => nbd::EIO,
    };
    warn!(error = %e, "request failed");
    DevError { errno, message: e.to_string() }
}

impl BlockDevice for CacheExport {
    fn size(&self) -> u64 {
        self.cache.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.cache.read(off, buf).map_err(dev_err)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
        self.cache.write(off, data, fua).map_err(dev_err)
    }

    fn flush(&self) -> Result<(), DevError> {
        self.cache.flush().map_err(dev_err)
    }

    fn trim(&self, off: u64, len: u64) -> Result<(), DevError> {
        self.cache.discard(off, len).map_err(dev_err)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.cache.write_zeroes(off, len, fua).map_err(dev_err)
    }

    fn read_may_block(&self, off: u64, len: u64) -> bool {
        !self.cache.is_cached(off, len)
    }

    /// Cached data is data; elsewhere what the backing device says of its
    /// own allocation (a hole there reads as zeroes through the cache too).
    fn extents(&self, off: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        Ok(allocation(off, len, &self.cache.cached_ranges(off, len), |o, l| self.cache.backing().data_ranges(o, l)))
    }

    fn write_may_block(&self, _off: u64, _len: u64, fua: bool) -> bool {
        fua && self.fua_syncs
    }
}

/// The extents of `[off, off + len)`: the `cached` runs are data, and so is
/// whatever `backing_data` says holds data in the gaps between them (all of
/// a gap it cannot tell about); the rest are holes that read as zeroes.
fn allocation(
    off: u64,
    len: u64,
    cached: &[(u64, u64)],
    backing_data: impl Fn(u64, u64) -> Option<Vec<(u64, u64)>>,
) -> Vec<Extent> {
    let hole = nbd::STATE_HOLE | nbd::STATE_ZERO;
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |len: u64, flags: u32| {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(e) if e.flags == flags => e.len += len,
            _ => out.push(Extent { len, flags }),
        }
    };
    let gap = |from: u64, to: u64, push: &mut dyn FnMut(u64, u32)| {
        if from >= to {
            return;
        }
        match backing_data(from, to - from) {
            None => push(to - from, 0),
            Some(runs) => {
                let mut at = from;
                for (o, l) in runs {
                    let (o, e) = (o.clamp(at, to), (o + l).clamp(at, to));
                    push(o - at, hole);
                    push(e - o, 0);
                    at = e;
                }
                push(to - at, hole);
            }
        }
    };
    let end = off + len;
    let mut at = off;
    for &(o, l) in cached {
        let (o, e) = (o.clamp(at, end), (o + l).clamp(at, end));
        gap(at, o, &mut push);
        push(e - o, 0);
        at = e;
    }
    gap(at, end, &mut push);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_data_and_the_backings_holes_make_the_map() {
        let hole = nbd::STATE_HOLE | nbd::STATE_ZERO;
        let ext = |v: &[(u64, u32)]| v.iter().map(|&(len, flags)| Extent { len, flags }).collect::<Vec<_>>();
        // Backing: data at 100..200 only. Cache: 150..300 and 500..600.
        let backing = |o: u64, l: u64| {
            let (s, e) = (o.max(100), (o + l).min(200));
            Some(if s < e { vec![(s, e - s)] } else { vec![] })
        };
        let got = allocation(0, 1000, &[(150, 150), (500, 100)], backing);
        assert_eq!(got, ext(&[(100, hole), (200, 0), (200, hole), (100, 0), (400, hole)]));
        // A backing that cannot tell is all data.
        assert_eq!(allocation(0, 1000, &[(150, 150)], |_, _| None), ext(&[(1000, 0)]));
        // Nothing cached, all hole.
        assert_eq!(allocation(10, 90, &[], |_, _| Some(vec![])), ext(&[(90, hole)]));
    }
}
