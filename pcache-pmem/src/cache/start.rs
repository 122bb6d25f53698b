//! Starting a cache, decided before anything is built: the options are
//! checked, and a stored entry is reconciled with them (what the cache
//! keeps, what changes, what is worth a note) by pure functions, so that
//! every rule here has a unit test.

use std::path::Path;

use pcache_format::{BackingDevInfo, CACHE_GC_PERCENT_MAX, QUEUES_MAX, SEG_SIZE, SEGS_PER_QUEUE};

use super::error::EngineError;
use super::options::{CacheOptions, default_cache_segs};

/// Bytes in a MiB, for messages.
const MIB: u64 = 1 << 20;

/// Checks the options on their own.
pub(super) fn validate(opts: &CacheOptions, path: &Path, dev_size: u64) -> Result<(), EngineError> {
    if opts.queues == 0 || opts.queues > QUEUES_MAX {
        return Err(EngineError::InvalidOption(format!("queues {} out of range (1..={QUEUES_MAX})", opts.queues)));
    }
    if let Some(gc) = opts.gc_percent.filter(|gc| *gc > CACHE_GC_PERCENT_MAX) {
        return Err(EngineError::InvalidOption(format!("gc_percent {gc} out of range (0..={CACHE_GC_PERCENT_MAX})")));
    }
    let len = path.as_os_str().len();
    if len == 0 || len >= pcache_format::PATH_LEN {
        return Err(EngineError::InvalidOption(format!(
            "backing path {} is longer than {} bytes",
            path.display(),
            pcache_format::PATH_LEN - 1
        )));
    }
    if dev_size < 512 {
        return Err(EngineError::InvalidOption(format!(
            "backing device {} holds {dev_size} bytes: nothing to cache (it needs at least one 512-byte sector)",
            path.display(),
        )));
    }
    Ok(())
}

/// What starting makes of a stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reconciled {
    /// The entry to run with.
    pub(super) info: BackingDevInfo,
    /// It differs from what is stored (or only one copy is stored): write it.
    pub(super) rewrite: bool,
    /// Options asked for that the cache does not grant, in words.
    pub(super) notes: Vec<String>,
}

/// Reconciles the stored entry `stored` (with `both_copies` valid or not)
/// with the options, for a backing device of `dev_size` bytes at `path`.
/// A cache keeps its size and its data CRC setting; the gc percent asked
/// for and the backing's size (grown) are taken; a backing that shrank is
/// refused.
pub(super) fn reconcile(
    mut stored: BackingDevInfo,
    both_copies: bool,
    opts: &CacheOptions,
    path: &Path,
    dev_size: u64,
) -> Result<Reconciled, EngineError> {
    let ci = stored.cache_info;
    let stored_segs = u64::from(ci.n_segs.get());
    let mut notes = Vec::new();
    if let Some(size) = opts.cache_size {
        let asked = size.div_ceil(SEG_SIZE);
        if asked != stored_segs {
            notes.push(format!(
                "cache size {} MiB asked for; the existing cache keeps its {} MiB",
                asked * SEG_SIZE / MIB,
                stored_segs * SEG_SIZE / MIB
            ));
        }
    }
    // Only what was asked for and is not granted is worth a note:
    // `data_crc: false` is the default, not a request.
    if opts.data_crc && !ci.data_crc() {
        notes.push("data CRC on asked for; the existing cache keeps it off".to_string());
    }
    let sectors = dev_size / 512;
    let stored_sectors = stored.dev_size.get();
    if stored_sectors > sectors {
        return Err(EngineError::BackingShrunk {
            path: path.to_path_buf(),
            found: dev_size,
            expected: stored_sectors * 512,
        });
    }
    // An entry written with one copy (by the RFC, or by an earlier pcache)
    // gets its second now: a damaged page must never make it read as free.
    let mut rewrite = !both_copies;
    if stored_sectors != sectors {
        stored.dev_size = sectors.into();
        rewrite = true;
    }
    if let Some(gc) = opts.gc_percent.filter(|gc| *gc != ci.gc_percent.get()) {
        stored.cache_info.gc_percent = gc.into();
        rewrite = true;
    }
    Ok(Reconciled { info: stored, rewrite, notes })
}

/// Segments for a new cache: the size asked for, or the default for the
/// backing device, and never fewer than its queues need.
pub(super) fn new_cache_segs(opts: &CacheOptions, dev_size: u64, free: u32) -> Result<u32, EngineError> {
    let n = match opts.cache_size {
        Some(size) => u32::try_from(size.div_ceil(SEG_SIZE)).unwrap_or(u32::MAX),
        None => default_cache_segs(dev_size, opts.queues, free),
    };
    let min = SEGS_PER_QUEUE * opts.queues;
    if n < min {
        return Err(EngineError::InvalidOption(format!(
            "a cache of {n} segments is too small for {} queue(s): at least {min} segments ({} MiB) are needed",
            opts.queues,
            u64::from(min) * SEG_SIZE / MIB
        )));
    }
    Ok(n)
}

/// Checks that a cache of `n_segs` segments can run `queues` queues.
pub(super) fn check_queues(n_segs: u32, queues: u32) -> Result<(), EngineError> {
    if n_segs < SEGS_PER_QUEUE * queues {
        return Err(EngineError::InvalidOption(format!(
            "the cache has {n_segs} segments, too few for {queues} queue(s) ({SEGS_PER_QUEUE} segments each)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pcache_format::{CacheFlags, CacheInfo};

    use super::*;

    const GIB: u64 = 1 << 30;

    fn stored(segs: u32, gc: u16, crc: bool, sectors: u64) -> BackingDevInfo {
        let flags = if crc { CacheFlags::DATA_CRC } else { CacheFlags::empty() };
        BackingDevInfo::running(0, b"/dev/x", sectors, CacheInfo::new(1, segs, gc, flags)).unwrap()
    }

    #[test]
    fn an_entry_as_stored_is_left_alone() {
        let r =
            reconcile(stored(64, 70, false, GIB / 512), true, &CacheOptions::default(), Path::new("/x"), GIB).unwrap();
        assert!(!r.rewrite);
        assert!(r.notes.is_empty());
        assert_eq!(r.info, stored(64, 70, false, GIB / 512));
    }

    #[test]
    fn size_and_crc_stay_with_a_note() {
        let opts = CacheOptions { cache_size: Some(2 * GIB), data_crc: true, ..CacheOptions::default() };
        let r = reconcile(stored(64, 70, false, GIB / 512), true, &opts, Path::new("/x"), GIB).unwrap();
        assert!(!r.rewrite, "nothing asked for is stored");
        assert_eq!(r.info.cache_info.n_segs.get(), 64);
        assert!(!r.info.cache_info.data_crc());
        assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
        assert!(r.notes[0].contains("2048 MiB asked for") && r.notes[0].contains("its 1024 MiB"), "{:?}", r.notes);
    }

    #[test]
    fn gc_percent_growth_and_a_missing_copy_are_written() {
        let opts = CacheOptions { gc_percent: Some(50), ..CacheOptions::default() };
        let r = reconcile(stored(64, 70, false, GIB / 512), true, &opts, Path::new("/x"), GIB).unwrap();
        assert!(r.rewrite);
        assert_eq!(r.info.cache_info.gc_percent.get(), 50);

        let r = reconcile(stored(64, 70, false, GIB / 512), true, &CacheOptions::default(), Path::new("/x"), 2 * GIB)
            .unwrap();
        assert!(r.rewrite);
        assert_eq!(r.info.dev_size.get(), 2 * GIB / 512);

        let r =
            reconcile(stored(64, 70, false, GIB / 512), false, &CacheOptions::default(), Path::new("/x"), GIB).unwrap();
        assert!(r.rewrite, "a single-copy entry gets its second copy");
    }

    #[test]
    fn a_shrunk_backing_is_refused() {
        let e = reconcile(stored(64, 70, false, GIB / 512), true, &CacheOptions::default(), Path::new("/x"), GIB - 512)
            .unwrap_err();
        assert!(
            matches!(e, EngineError::BackingShrunk { found, expected, .. } if found == GIB - 512 && expected == GIB)
        );
    }

    #[test]
    fn options_are_checked() {
        let p = Path::new("/dev/x");
        assert!(validate(&CacheOptions::default(), p, 512).is_ok());
        for opts in [
            CacheOptions { queues: 0, ..CacheOptions::default() },
            CacheOptions { queues: QUEUES_MAX + 1, ..CacheOptions::default() },
            CacheOptions { gc_percent: Some(CACHE_GC_PERCENT_MAX + 1), ..CacheOptions::default() },
        ] {
            assert!(matches!(validate(&opts, p, GIB), Err(EngineError::InvalidOption(_))), "{opts:?}");
        }
        assert!(validate(&CacheOptions::default(), p, 511).is_err(), "less than a sector");
        assert!(validate(&CacheOptions::default(), Path::new(""), GIB).is_err());
        let long = "/".repeat(pcache_format::PATH_LEN);
        assert!(validate(&CacheOptions::default(), Path::new(&long), GIB).is_err());
    }

    #[test]
    fn new_caches_are_sized_for_their_queues() {
        let opts = CacheOptions { cache_size: Some(SEG_SIZE * 19), queues: 2, ..CacheOptions::default() };
        assert!(new_cache_segs(&opts, GIB, 1000).unwrap_err().to_string().contains("at least 20 segments (320 MiB)"));
        let opts = CacheOptions { cache_size: Some(SEG_SIZE * 20 - 1), queues: 2, ..CacheOptions::default() };
        assert_eq!(new_cache_segs(&opts, GIB, 1000).unwrap(), 20);
        let opts = CacheOptions::default();
        assert_eq!(new_cache_segs(&opts, GIB, 1000).unwrap(), default_cache_segs(GIB, 1, 1000));
        assert!(check_queues(19, 2).is_err());
        assert!(check_queues(20, 2).is_ok());
    }
}
