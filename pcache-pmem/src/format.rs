//! Formatting a device (spec §2.7 step 3), with persist points that leave
//! it either formatted or recognisably not formatted at every crash.

use pcache_format::dm::{DM_CACHE_INFO_OFF, DM_GC_PERCENT_DEFAULT, DmCacheInfo, DmSegmentInfo, DmSuperblock};
use pcache_format::{
    CACHE_DEV_INFO_OFF, CachePos, CacheSegGen, Dialect, FormatPlan, Layout, MetaSegmentInfo, SB_OFF, SB_SIZE,
    SEG_INFO_SIZE, SEG_SIZE, SEGMENTS_OFF, Superblock, TERMINATOR, encode_copy,
};

use crate::pmem::{Pmem, PmemError};
use crate::records::write_record_both;

/// Why a device could not be formatted.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The device is too small.
    #[error("the device holds {size} bytes; pcache needs at least {min} (512 MiB)")]
    TooSmall {
        /// Its size.
        size: u64,
        /// The minimum.
        min: u64,
    },
    /// The device already holds a pcache superblock.
    #[error("the device already holds a pcache superblock ({seg_num} segments); formatting destroys every cache on it")]
    AlreadyFormatted {
        /// Segments of the existing format, as stored.
        seg_num: u32,
    },
    /// The device failed.
    #[error(transparent)]
    Pmem(#[from] PmemError),
    /// A record did not fit where the layout puts it (a bug, never media).
    #[error(transparent)]
    Layout(#[from] pcache_format::Error),
}

/// What `format` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formatted {
    /// The layout written.
    pub plan: FormatPlan,
    /// A previous pcache format was overwritten.
    pub overwrote: bool,
}

/// Reads the superblock area and returns the stored `seg_num` if it holds
/// the pcache magic (valid CRC or not), in either dialect.
pub fn existing_format<P: Pmem + ?Sized>(pmem: &P) -> Result<Option<u32>, PmemError> {
    if pmem.size() < SB_OFF + SB_SIZE as u64 {
        return Ok(None);
    }
    let mut area = [0u8; SB_SIZE];
    pmem.read(SB_OFF, &mut area)?;
    Ok(match Dialect::guess(&area) {
        None => None,
        Some(Dialect::RfcV1) => Superblock::read(&area).ok().map(|sb| u32::from(sb.seg_num.get())),
        Some(Dialect::DmPcache) => DmSuperblock::read(&area).ok().map(|sb| sb.seg_num.get()),
    })
}

/// Formats `pmem` with the RFC v1 layout: zeroes the reserved area and
/// segment 0 (the backing table), writes the meta segment info, and writes
/// the superblock last.
///
/// Refuses a device under 512 MiB, and a device that already holds a
/// pcache superblock unless `force`. With `force`, the old superblock is
/// invalidated (and made durable) before anything else changes, so a crash
/// midway leaves an unformatted device, never a half-formatted one that
/// looks valid.
pub fn format<P: Pmem + ?Sized>(pmem: &P, force: bool) -> Result<Formatted, FormatError> {
    let plan = plan(pmem, Dialect::RfcV1)?;
    let overwrote = invalidate_existing(pmem, force)?;
    // The reserved area and all of segment 0: empty backing table.
    pmem.zero_nodrain(CACHE_DEV_INFO_OFF, SEGMENTS_OFF - CACHE_DEV_INFO_OFF + SEG_SIZE)?;
    // Both copies of the meta segment's info (seq 1 and 2), so that one
    // damaged page cannot make the device unreadable.
    let mut copies = [0u8; 2 * SEG_INFO_SIZE];
    for (i, copy) in copies.chunks_exact_mut(SEG_INFO_SIZE).enumerate() {
        encode_copy(Dialect::RfcV1, &MetaSegmentInfo::default(), i as u8 + 1, copy)
            .map_err(|_| PmemError::OutOfBounds { off: SEGMENTS_OFF, len: SEG_INFO_SIZE as u64, size: pmem.size() })?;
    }
    pmem.copy_nodrain(SEGMENTS_OFF, &copies)?;
    pmem.fence()?;
    pmem.copy_persist(SB_OFF, &Superblock::encode_area(plan.layout.seg_num() as u16))?;
    Ok(Formatted { plan, overwrote })
}

/// The layout of `dialect` for `pmem`, or why it is too small.
fn plan<P: Pmem + ?Sized>(pmem: &P, dialect: Dialect) -> Result<FormatPlan, FormatError> {
    Layout::plan(dialect, pmem.size())
        .map_err(|_| FormatError::TooSmall { size: pmem.size(), min: pcache_format::CACHE_DEV_SIZE_MIN })
}

/// Refuses a device holding a pcache superblock unless `force`; with it,
/// invalidates that superblock durably before anything else changes.
/// Returns whether there was one.
fn invalidate_existing<P: Pmem + ?Sized>(pmem: &P, force: bool) -> Result<bool, FormatError> {
    let existing = existing_format(pmem)?;
    if let (Some(seg_num), false) = (existing, force) {
        return Err(FormatError::AlreadyFormatted { seg_num });
    }
    if existing.is_some() {
        pmem.zero_persist(SB_OFF, SB_SIZE as u64)?;
    }
    Ok(existing.is_some())
}

/// Formats `pmem` as the Linux kernel's dm-pcache leaves a device it first
/// loads: one cache owning every segment (the chain 0, 1, 2, ...), each
/// segment's info and generation 0, both tails at the log's start with an
/// empty log there, then the cache info (INIT_DONE, write-back, the default
/// gc percent, `data_crc` as given), and the superblock last. The kernel
/// loads it as its own cache (`dmsetup create` with the same `data_crc`),
/// and so does `pcache`.
///
/// The same refusals and crash rule as [`format`]: the old superblock is
/// invalidated first, and until the new one is written the device is
/// recognisably unformatted.
pub fn format_dm<P: Pmem + ?Sized>(pmem: &P, data_crc: bool, force: bool) -> Result<Formatted, FormatError> {
    format_dm_segments(pmem, data_crc, force, u32::MAX)
}

/// [`format_dm`] with at most `max_segs` segments (the superblock's
/// `seg_num`, which the kernel accepts below what the device holds): a
/// small cache on a device of the smallest size, for tests that must
/// wrap it.
pub fn format_dm_segments<P: Pmem + ?Sized>(
    pmem: &P,
    data_crc: bool,
    force: bool,
    max_segs: u32,
) -> Result<Formatted, FormatError> {
    let d = Dialect::DmPcache;
    let mut plan = plan(pmem, d)?;
    if max_segs < plan.layout.seg_num() {
        plan.layout = Layout::new(d, max_segs, pmem.size())?;
    }
    let overwrote = invalidate_existing(pmem, force)?;
    let layout = plan.layout;
    // The cache info and the tails, as the kernel zeroes them.
    pmem.zero_persist(DM_CACHE_INFO_OFF, d.segments_off() - DM_CACHE_INFO_OFF)?;
    let n_segs = layout.seg_num();
    for seg in 0..n_segs {
        let next = (seg + 1 < n_segs).then_some(seg + 1);
        write_record_both(pmem, d, layout.seg_info_offset(seg)?, &DmSegmentInfo::data(next))?;
        write_record_both(pmem, d, layout.ctrl_offset(seg)?, &CacheSegGen::new(0))?;
    }
    pmem.copy_persist(layout.data_offset(0)?, &TERMINATOR)?;
    let (key_tail, dirty_tail) = layout.tail_offsets(0)?;
    write_record_both(pmem, d, key_tail, &CachePos::new(0, 0))?;
    write_record_both(pmem, d, dirty_tail, &CachePos::new(0, 0))?;
    let info = DmCacheInfo::new(n_segs, DM_GC_PERCENT_DEFAULT, data_crc);
    write_record_both(pmem, d, layout.cache_info_offset()?, &info)?;
    pmem.copy_persist(SB_OFF, &DmSuperblock::encode_area(n_segs))?;
    Ok(Formatted { plan, overwrote })
}

/// Allocates every block of the first `len` bytes of the regular file
/// `file`, extending it to `len` bytes if it is shorter, so that writes
/// through a mapping of it can never fail for want of space (a sparse file
/// that cannot grow a block turns a store into SIGBUS). Data already there
/// is kept. Uses `posix_fallocate`: `fallocate(2)`, or on a filesystem
/// without it, glibc writes the missing blocks.
pub fn allocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: posix_fallocate takes an fd we own and two integers; no
    // memory is passed. It returns the error number rather than setting
    // errno.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(rc)) }
}

/// Bytes that an unprivileged process may still allocate on the filesystem
/// holding `file` (a file or a directory): `f_bavail * f_frsize` of
/// `fstatvfs(2)`.
pub fn free_space(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs fills the struct through a pointer to a live local,
    // on an fd we own.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field widths differ between targets
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

#[cfg(test)]
mod space_tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn allocate_fills_holes_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"keep").unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        allocate(&file, 1 << 20).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 1 << 20);
        assert!(meta.blocks() * 512 >= 1 << 20, "{} blocks", meta.blocks());
        assert_eq!(&std::fs::read(&path).unwrap()[..4], b"keep");
        assert!(free_space(&file).unwrap() > 0);
        let too_big = allocate(&file, u64::MAX).unwrap_err();
        assert_eq!(too_big.raw_os_error(), Some(libc::EFBIG));
    }
}
