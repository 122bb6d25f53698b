//! Writing a Linux dm-pcache cache back without the kernel module: the
//! rescue path for a cache whose module cannot run (another kernel, a failed
//! host, pmem moved to a new machine).
//!
//! dm-pcache decides what is dirty by position alone: every key from the
//! dirty tail to the end of the log is dirty, except the CLEAN keys that
//! read misses wrote. So the rescue writes those keys' data to the backing
//! device in log order (a later key wins over the ranges of earlier ones),
//! makes the backing device durable, and only then moves the dirty tail to
//! the end of the log. The kernel then loads the cache clean: not
//! reformatted, every key from the key tail still indexed, its cached data
//! still served. Nothing else on the device is written.
//!
//! Before anything is written, the whole device is checked as `pcache
//! check` checks it, data CRCs included: a damaged cache is refused, so a
//! rescue never writes back what the cache did not hold.

use pcache_format::image::{KeyState, ScanOptions, scan_with};
use pcache_format::media::read_superblock;
use pcache_format::{CachePos, Dialect, Key};

use crate::backing::BackingDev;
use crate::cache::EngineError;
use crate::pmem::AsMedia;
use crate::pmem::Pmem;
use crate::records::write_record;

/// One dirty extent to write back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyExtent {
    /// Offset on the backing device.
    pub off: u64,
    /// Length.
    pub len: u32,
    /// Where its data lies on the pmem device.
    pub pmem_off: u64,
}

/// What a rescue found, and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescue {
    /// Dirty keys, in log order.
    pub extents: Vec<DirtyExtent>,
    /// Bytes they hold.
    pub bytes: u64,
    /// The dirty tail before.
    pub dirty_tail: (u32, u32),
    /// The end of the log: the dirty tail after.
    pub log_end: (u32, u32),
    /// The end of the furthest key on the backing device.
    pub key_end: u64,
    /// Whether anything was written (not a dry run, and something dirty).
    pub written: bool,
}

/// Finds the dirty keys of the dm-pcache cache on `pmem` and, unless
/// `dry_run`, writes them back to `backing` and moves the dirty tail to the
/// end of the log. `progress(done, total)` is told the bytes written.
///
/// Refused: a device not in the dm-pcache dialect; a device `pcache check`
/// finds a problem on (the first one is named); keys past the end of
/// `backing` (the wrong backing device, or too small a one).
pub fn dm_writeback<P: Pmem, B: BackingDev>(
    pmem: &P,
    backing: &B,
    dry_run: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<Rescue, EngineError> {
    let media = AsMedia(pmem);
    let layout = read_superblock(&media)?;
    if layout.dialect() != Dialect::DmPcache {
        return Err(EngineError::Corrupt(
            "not a dm-pcache cache: `pcache detach` writes an rfc-v1 cache back through its own path".into(),
        ));
    }
    let mut dirty: Vec<Key> = Vec::new();
    let opts = ScanOptions { walk_logs: true, verify_data: true };
    let report = scan_with(&media, opts, &mut |_, key, state| {
        if state == KeyState::Dirty {
            dirty.push(*key);
        }
    });
    if let Some(f) = report.findings.iter().find(|f| f.severity == pcache_format::image::Severity::Problem) {
        return Err(EngineError::Corrupt(format!(
            "{f}; nothing was written (see `pcache check`; the kernel module would refuse this cache too)"
        )));
    }
    let cache = report.backings.first().ok_or_else(|| EngineError::Corrupt("the device holds no cache".into()))?;
    let (Some(dt), Some(log)) = (cache.dirty_tail, cache.log.as_ref()) else {
        return Err(EngineError::Corrupt("the cache's tails or key log could not be read".into()));
    };
    let chain: Vec<u32> = cache.chain.iter().map(|s| s.dev_seg).collect();
    let mut extents = Vec::with_capacity(dirty.len());
    let mut key_end = 0;
    for k in &dirty {
        let dev_seg = chain[k.cache_seg_id.get() as usize];
        let pmem_off = layout.data_range(dev_seg, k.cache_seg_off.get(), k.len.get())?;
        extents.push(DirtyExtent { off: k.off.get(), len: k.len.get(), pmem_off });
        key_end = key_end.max(k.end());
    }
    if key_end > backing.size() {
        return Err(EngineError::Corrupt(format!(
            "the cache holds dirty data up to byte {key_end}, past the end of {} ({} bytes): the wrong backing \
             device, or too small a one; nothing was written",
            backing.path().display(),
            backing.size()
        )));
    }
    let bytes = extents.iter().map(|e| u64::from(e.len)).sum();
    let mut rescue = Rescue {
        extents,
        bytes,
        dirty_tail: (dt.cache_seg_id.get(), dt.seg_off.get()),
        log_end: log.end,
        key_end,
        written: false,
    };
    if dry_run || rescue.dirty_tail == rescue.log_end {
        return Ok(rescue);
    }
    let mut buf = Vec::new();
    let mut done = 0;
    for e in &rescue.extents {
        buf.resize(e.len as usize, 0);
        pmem.read(e.pmem_off, &mut buf)?;
        backing.write_at(e.off, &buf)?;
        done += u64::from(e.len);
        progress(done, bytes);
    }
    // The data is durable on the backing device before the tail says so.
    backing.sync()?;
    let (_, dirty_tail_off) = layout.tail_offsets(0)?;
    let end = CachePos::new(rescue.log_end.0, rescue.log_end.1);
    write_record(pmem, Dialect::DmPcache, dirty_tail_off, &end)?;
    rescue.written = true;
    Ok(rescue)
}
