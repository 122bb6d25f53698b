//! Reading records from a whole device: the superblock, the backing table,
//! segment chains and ksets, every on-media value bounds-checked before it
//! becomes an offset. The walk of a whole key log is [`LogWalk`] (in
//! `keylog`, re-exported here).
//!
//! The device is anything that implements [`ReadMedia`]: a byte slice, a
//! memory mapping, a file. Nothing here allocates.

use core::fmt;

use crate::backing::BackingDevInfo;
use crate::consts::{
    CACHE_SEG_DATA_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC, KSET_ONMEDIA_SIZE_MAX, META_ENTRIES,
    META_ENTRY_STRIDE, SB_OFF, SB_SIZE, SEG_INFO_SIZE,
};
use crate::crc::is_zero;
use crate::ctrl::{CachePos, CacheSegGen};
use crate::dialect::Dialect;
use crate::dm::{DmCacheInfo, DmSegmentInfo, DmSuperblock};
use crate::error::{Error, ErrorKind, Record};
use crate::kset::{KsetFlags, KsetRecord, decode_kset, kset_size};
use crate::layout::Layout;
use crate::meta::{CopyInfo, Latest, MetaRecord, Slots, copy_infos, latest_of_pair};
use crate::segment::{MetaSegmentInfo, SegmentInfo, SegmentState, SegmentType};
use crate::superblock::Superblock;

pub use crate::keylog::{LogEnd, LogPos, LogStep, LogWalk};

/// A device to read records from.
pub trait ReadMedia {
    /// What a failed read reports.
    type Error: fmt::Debug + fmt::Display;
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from device offset `off`.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), Self::Error>;

    /// Whether the `len` bytes at `off` are known to read as zeros without
    /// being read: a range of a sparse image or a simulator that was never
    /// written (and reads without error). `false` says nothing, and is what
    /// a device that cannot tell answers. Readers of large, mostly
    /// never-written areas (the backing table) skip them with it.
    fn unwritten(&self, off: u64, len: u64) -> bool {
        let _ = (off, len);
        false
    }
}

/// The part of a device from byte `base` on, seen as a device of its own:
/// a pmem device inside a namespace image ([`crate::pfn`]), or whatever
/// `--offset` names.
#[derive(Debug, Clone, Copy)]
pub struct Window<M> {
    inner: M,
    base: u64,
}

impl<M: ReadMedia> Window<M> {
    /// The bytes of `inner` from `base` on (none if `base` is past its end).
    pub fn new(inner: M, base: u64) -> Self {
        Self { inner, base }
    }

    /// Where the window starts in the device.
    pub fn base(&self) -> u64 {
        self.base
    }
}

impl<M: ReadMedia> ReadMedia for Window<M> {
    type Error = M::Error;

    fn size(&self) -> u64 {
        self.inner.size().saturating_sub(self.base)
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        // An offset past the window is past the device too: the device says so.
        self.inner.read_at(self.base.saturating_add(off), buf)
    }

    fn unwritten(&self, off: u64, len: u64) -> bool {
        self.inner.unwritten(self.base.saturating_add(off), len)
    }
}

/// A read past the end of an in-memory image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBounds {
    /// Offset of the read.
    pub off: u64,
    /// Length of the read.
    pub len: usize,
    /// Size of the image.
    pub size: u64,
}

impl fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "read of {} bytes at {:#x} past the end of a {}-byte image", self.len, self.off, self.size)
    }
}

impl ReadMedia for [u8] {
    type Error = OutOfBounds;

    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        let err = OutOfBounds { off, len: buf.len(), size: self.len() as u64 };
        let start = usize::try_from(off).map_err(|_| err)?;
        let end = start.checked_add(buf.len()).ok_or(err)?;
        buf.copy_from_slice(self.get(start..end).ok_or(err)?);
        Ok(())
    }
}

impl<T: ReadMedia + ?Sized> ReadMedia for &T {
    type Error = T::Error;

    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        (**self).read_at(off, buf)
    }

    fn unwritten(&self, off: u64, len: u64) -> bool {
        (**self).unwritten(off, len)
    }
}

/// A failure to read a record: the device failed, or the bytes are wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError<E> {
    /// The device failed to read `len` bytes at `off`.
    Media {
        /// Device offset of the read.
        off: u64,
        /// Length of the read.
        len: usize,
        /// What the device said.
        source: E,
    },
    /// The bytes do not hold a valid record.
    Format(Error),
}

impl<E> From<Error> for ReadError<E> {
    fn from(e: Error) -> Self {
        ReadError::Format(e)
    }
}

impl<E: fmt::Display> fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Media { off, len, source } => write!(f, "cannot read {len} bytes at {off:#x}: {source}"),
            ReadError::Format(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for ReadError<E> {}

impl<E> ReadError<E> {
    /// The format error, if this is one.
    pub fn format(&self) -> Option<&Error> {
        match self {
            ReadError::Format(e) => Some(e),
            ReadError::Media { .. } => None,
        }
    }
}

/// Reads `buf.len()` bytes at `off`.
pub fn read<M: ReadMedia + ?Sized>(m: &M, off: u64, buf: &mut [u8]) -> Result<(), ReadError<M::Error>> {
    m.read_at(off, buf).map_err(|source| ReadError::Media { off, len: buf.len(), source })
}

/// Reads and validates the superblock of either dialect, and derives the
/// layout (dialect, segments) from it and the device size.
///
/// A superblock with pcache's magic whose CRC neither dialect accepts is
/// reported with the CRC of the dialect it most likely was
/// ([`Dialect::guess`]).
pub fn read_superblock<M: ReadMedia + ?Sized>(m: &M) -> Result<Layout, ReadError<M::Error>> {
    let mut area = [0u8; SB_SIZE];
    if m.size() < SB_OFF + SB_SIZE as u64 {
        let found = m.size().saturating_sub(SB_OFF) as usize;
        return Err(Error::truncated(Record::Superblock, SB_SIZE, found).into());
    }
    read(m, SB_OFF, &mut area)?;
    // The decoder checks the CRC: once it accepts the area, the guess was
    // the dialect whose CRC verifies.
    let dialect = Dialect::guess(&area).unwrap_or_default();
    let seg_num = match dialect {
        Dialect::RfcV1 => u32::from(Superblock::decode(&area)?.seg_num.get()),
        Dialect::DmPcache => DmSuperblock::decode(&area)?.seg_num.get(),
    };
    Ok(Layout::new(dialect, seg_num, m.size())?)
}

/// A double-buffered record and the state of both its copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair<R> {
    /// Both copies.
    pub copies: [CopyInfo; 2],
    /// The latest copy decoded, or why it could not be.
    pub latest: Result<Latest<R>, Error>,
}

/// Reads both copies of the record `R` at device offset `off`, sealed by
/// `dialect`'s CRC.
pub fn read_pair<R: MetaRecord, M: ReadMedia + ?Sized>(
    dialect: Dialect,
    m: &M,
    off: u64,
) -> Result<Pair<R>, ReadError<M::Error>> {
    let blank = || {
        let blank = CopyInfo { complete: true, stored_crc: 0, computed_crc: 0, seq: 0, blank: true };
        Pair { copies: [blank; 2], latest: Err(Error::new(R::RECORD, ErrorKind::NeverWritten)) }
    };
    if m.unwritten(off, 2 * R::COPY_SIZE as u64) {
        return Ok(blank());
    }
    let mut buf = [0u8; 2 * SEG_INFO_SIZE];
    let copies = buf.get_mut(..2 * R::COPY_SIZE).unwrap_or_default();
    read(m, off, copies)?;
    if copies.len() == 2 * R::COPY_SIZE && is_zero(copies) {
        // Never written, as most of a backing table is: one pass over the
        // zeros instead of one per copy for its CRC and one for its blankness.
        return Ok(blank());
    }
    let infos = copy_infos(Slots::of::<R>(dialect), copies);
    Ok(Pair { copies: infos, latest: latest_of_pair(copies, &infos) })
}

/// Reads the meta segment's info.
pub fn read_meta_segment_info<M: ReadMedia + ?Sized>(
    m: &M,
    layout: &Layout,
) -> Result<Pair<MetaSegmentInfo>, ReadError<M::Error>> {
    read_pair(layout.dialect(), m, layout.seg_info_offset(0)?)
}

/// Reads backing-table entry `id`.
pub fn read_backing<M: ReadMedia + ?Sized>(
    m: &M,
    layout: &Layout,
    id: u32,
) -> Result<Pair<BackingDevInfo>, ReadError<M::Error>> {
    let pair = read_pair::<BackingDevInfo, M>(layout.dialect(), m, layout.meta_entry_offset(id)?)?;
    if let Ok(latest) = &pair.latest {
        let found = latest.record.backing_dev_id.get();
        if latest.record.is_running() && found != id {
            let err = Error::mismatch(Record::BackingDevInfo, "backing_dev_id", found.into(), id.into());
            return Ok(Pair { copies: pair.copies, latest: Err(err.in_copy(latest.copy)) });
        }
    }
    Ok(pair)
}

/// The backing-table ids worth reading, in order: every id, except those in
/// blocks of 64 entries that the media knows were never written (see
/// [`ReadMedia::unwritten`]; a device that cannot tell gets every id). A
/// never-written entry reads as free, so a skipped one is one.
pub fn table_ids<'a, M: ReadMedia + ?Sized>(m: &'a M, layout: &'a Layout) -> impl Iterator<Item = u32> + 'a {
    const BLOCK: u32 = 64;
    (0..META_ENTRIES.div_ceil(BLOCK)).flat_map(move |b| {
        let (first, end) = (b * BLOCK, ((b + 1) * BLOCK).min(META_ENTRIES));
        let never_written = match (layout.meta_entry_offset(first), layout.meta_entry_offset(end - 1)) {
            (Ok(a), Ok(z)) => m.unwritten(a, z + META_ENTRY_STRIDE - a),
            _ => false,
        };
        if never_written { end..end } else { first..end }
    })
}

/// Whether a backing-table entry is in use: its latest copy is valid and
/// RUNNING, or it is damaged (a copy that was written but no valid copy:
/// it may have owned a cache, so it is never taken for free). Only an entry
/// whose latest copy says NONE, or that was never written, is free. (The
/// RFC took every entry without a valid copy for free.)
pub fn backing_in_use(pair: &Pair<BackingDevInfo>) -> bool {
    match &pair.latest {
        Ok(l) => l.record.is_running(),
        Err(e) => !matches!(e.kind, ErrorKind::NeverWritten),
    }
}

/// The segment info of one segment of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStep {
    /// Cache segment index.
    pub index: u32,
    /// Device segment number.
    pub dev_seg: u32,
    /// Both copies of its segment info.
    pub copies: [CopyInfo; 2],
    /// The current copy.
    pub info: Latest<SegmentInfo>,
}

/// Reads the segment info of cache segment `dev_seg` (a device segment
/// number) and checks it is a running data segment that knows its number
/// and links, if at all, to a segment of the device.
pub fn read_cache_segment_info<M: ReadMedia + ?Sized>(
    m: &M,
    layout: &Layout,
    dev_seg: u32,
) -> Result<Found<SegmentInfo>, ReadError<M::Error>> {
    const R: Record = Record::SegmentInfo;
    if dev_seg < layout.first_cache_seg() {
        return Err(Error::invalid(R, "segment (segment 0 is the backing table)", 0).into());
    }
    let off = layout.seg_info_offset(dev_seg)?;
    let (copies, latest) = match layout.dialect() {
        Dialect::RfcV1 => {
            let pair = read_pair::<SegmentInfo, M>(Dialect::RfcV1, m, off)?;
            (pair.copies, pair.latest?)
        }
        Dialect::DmPcache => {
            // dm-pcache's 16-byte record, seen as the RFC's: it has no
            // type byte, state or seg_id, so those read as what they must be.
            let pair = read_pair::<DmSegmentInfo, M>(Dialect::DmPcache, m, off)?;
            let dm = pair.latest?;
            let mut info = SegmentInfo::data(dev_seg, dm.record.next());
            info.header = dm.record.header;
            (pair.copies, Latest { copy: dm.copy, record: info })
        }
    };
    let info = &latest.record;
    let fail = |e: Error| ReadError::Format(e.in_copy(latest.copy));
    if info.seg_type() != Some(SegmentType::Data) {
        return Err(fail(Error::mismatch(R, "type", info.seg_type.into(), SegmentType::Data as u64)));
    }
    if info.state() != Some(SegmentState::Running) {
        return Err(fail(Error::mismatch(R, "state", info.state.into(), SegmentState::Running as u64)));
    }
    if info.seg_id.get() != dev_seg {
        return Err(fail(Error::mismatch(R, "seg_id", info.seg_id.get().into(), dev_seg.into())));
    }
    if let Some(next) = info.next()
        && (next < layout.first_cache_seg() || next >= layout.seg_num())
    {
        let max = u64::from(layout.seg_num()) - 1;
        return Err(fail(Error::out_of_range(R, "next_seg", next.into(), layout.first_cache_seg().into(), max)));
    }
    Ok(Found { copies, latest })
}

/// Reads both copies of dm-pcache's cache info (at 0x2000 and 0x3000).
pub fn read_dm_cache_info<M: ReadMedia + ?Sized>(
    m: &M,
    layout: &Layout,
) -> Result<Pair<DmCacheInfo>, ReadError<M::Error>> {
    read_pair(layout.dialect(), m, layout.cache_info_offset()?)
}

/// A record that passed every check, and the state of both its copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found<R> {
    /// Both copies.
    pub copies: [CopyInfo; 2],
    /// The current copy.
    pub latest: Latest<R>,
}

/// Walks a cache's segment chain: from the entry's first segment, `n_segs`
/// segments linked by `next_seg`. It never yields more than `n_segs` steps,
/// so a looping chain cannot hang it; callers detect segments seen twice.
#[derive(Debug, Clone)]
pub struct ChainWalk {
    next: Option<u32>,
    current: u32,
    current_index: u32,
    index: u32,
    n_segs: u32,
}

impl ChainWalk {
    /// The chain of a cache starting at device segment `first` with `n_segs` segments.
    pub fn new(first: u32, n_segs: u32) -> Self {
        Self { next: Some(first), current: first, current_index: 0, index: 0, n_segs }
    }

    /// The next segment; `None` once `n_segs` segments were yielded or a
    /// step failed.
    pub fn next<M: ReadMedia + ?Sized>(
        &mut self,
        m: &M,
        layout: &Layout,
    ) -> Option<Result<ChainStep, ReadError<M::Error>>> {
        if self.index >= self.n_segs {
            return None;
        }
        let dev_seg = self.next.take()?;
        self.current = dev_seg;
        self.current_index = self.index;
        let Found { copies, latest: info } = match read_cache_segment_info(m, layout, dev_seg) {
            Ok(found) => found,
            Err(e) => return Some(Err(e)),
        };
        let index = self.index;
        self.index += 1;
        self.next = info.record.next();
        if self.next.is_none() && self.index < self.n_segs {
            let err = Error::out_of_range(
                Record::SegmentInfo,
                "chain length (HAS_NEXT missing)",
                self.index.into(),
                self.n_segs.into(),
                self.n_segs.into(),
            );
            return Some(Err(err.in_copy(info.copy).into()));
        }
        Some(Ok(ChainStep { index, dev_seg, copies, info }))
    }

    /// Cache index of the segment the last step read (or failed to read).
    pub fn current_index(&self) -> u32 {
        self.current_index
    }

    /// Device segment the last step read (or failed to read).
    pub fn current(&self) -> u32 {
        self.current
    }

    /// After the walk: the segment the last one links to, if it links on
    /// (a chain longer than `n_segs`).
    pub fn dangling_next(&self) -> Option<u32> {
        if self.index >= self.n_segs { self.next } else { None }
    }
}

/// Reads the generation of cache segment `dev_seg`.
pub fn read_gen<M: ReadMedia + ?Sized>(
    m: &M,
    layout: &Layout,
    dev_seg: u32,
) -> Result<Pair<CacheSegGen>, ReadError<M::Error>> {
    read_pair(layout.dialect(), m, layout.ctrl_offset(dev_seg)?)
}

/// The key tail and the dirty tail, from the control page of a cache's first
/// segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tails {
    /// The key tail's copies.
    pub key_tail: Pair<CachePos>,
    /// The dirty tail's copies.
    pub dirty_tail: Pair<CachePos>,
}

/// Reads both tails of the cache whose first segment is `first_seg`, and
/// checks their segment indexes against `n_segs`.
pub fn read_tails<M: ReadMedia + ?Sized>(
    m: &M,
    layout: &Layout,
    first_seg: u32,
    n_segs: u32,
) -> Result<Tails, ReadError<M::Error>> {
    let (key, dirty) = layout.tail_offsets(first_seg)?;
    let mut key_tail = read_pair::<CachePos, M>(layout.dialect(), m, key)?;
    let mut dirty_tail = read_pair::<CachePos, M>(layout.dialect(), m, dirty)?;
    for pair in [&mut key_tail, &mut dirty_tail] {
        if let Ok(l) = &pair.latest {
            let seg = l.record.cache_seg_id.get();
            if seg >= n_segs {
                let max = u64::from(n_segs).saturating_sub(1);
                pair.latest =
                    Err(Error::out_of_range(Record::CachePos, "cache_seg_id", seg.into(), 0, max).in_copy(l.copy));
            }
        }
    }
    Ok(Tails { key_tail, dirty_tail })
}

/// Buffer large enough for any kset.
pub type KsetBuf = [u8; KSET_ONMEDIA_SIZE_MAX];

/// Reads the log record at offset `seg_off` of the data area of device
/// segment `dev_seg`, into `buf`.
///
/// On top of [`decode_kset`]: the record must lie inside the data area, a
/// kset with keys must leave room for the LAST kset after it (the writer
/// always does), and a LAST kset must name a cache segment below `n_segs`.
pub fn read_kset<'b, M: ReadMedia + ?Sized>(
    m: &M,
    layout: &Layout,
    dev_seg: u32,
    seg_off: u32,
    n_segs: u32,
    buf: &'b mut KsetBuf,
) -> Result<KsetRecord<'b>, ReadError<M::Error>> {
    const R: Record = Record::Kset;
    let room = CACHE_SEG_DATA_SIZE.saturating_sub(seg_off) as usize;
    if room < KSET_HEADER_SIZE {
        let max = u64::from(CACHE_SEG_DATA_SIZE) - KSET_HEADER_SIZE as u64;
        return Err(Error::out_of_range(R, "position in segment", seg_off.into(), 0, max).into());
    }
    let base = layout.data_range(dev_seg, seg_off, KSET_HEADER_SIZE as u32)?;
    read(m, base, &mut buf[..KSET_HEADER_SIZE])?;
    let magic = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
    let flags = u64::from_le_bytes(buf[16..24].try_into().unwrap_or_default());
    let key_num = u32::from_le_bytes(buf[4..8].try_into().unwrap_or_default());
    if magic == KSET_MAGIC && flags & KsetFlags::LAST.bits() == 0 && (1..=KSET_KEYS_MAX as u32).contains(&key_num) {
        let size = kset_size(key_num as usize);
        if size + KSET_HEADER_SIZE > room {
            let max = ((room.saturating_sub(2 * KSET_HEADER_SIZE)) / crate::consts::KEY_SIZE) as u64;
            return Err(Error::out_of_range(R, "key_num (kset runs past its segment)", key_num.into(), 1, max).into());
        }
        read(m, base + KSET_HEADER_SIZE as u64, &mut buf[KSET_HEADER_SIZE..size])?;
    }
    let record = decode_kset(layout.dialect(), &buf[..])?;
    if let KsetRecord::Last { next_cache_seg } = record
        && next_cache_seg >= n_segs
    {
        let max = u64::from(n_segs).saturating_sub(1);
        return Err(Error::out_of_range(R, "next_cache_seg_id", next_cache_seg.into(), 0, max).into());
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_media_bounds() {
        let data = [1u8, 2, 3, 4];
        let m: &[u8] = &data;
        let mut buf = [0u8; 2];
        m.read_at(2, &mut buf).unwrap();
        assert_eq!(buf, [3, 4]);
        assert!(m.read_at(3, &mut buf).is_err());
        assert!(m.read_at(u64::MAX, &mut buf).is_err());
    }

    #[test]
    #[cfg(feature = "testing")]
    fn a_pair_known_unwritten_reads_as_one_of_zeros() {
        use crate::sparse::SparseImage;
        let img = SparseImage::new(1 << 20);
        let zeros = alloc::vec![0u8; 1 << 20];
        let off = 64 << 10;
        assert!(img.unwritten(off, 8192) && !zeros[..].unwritten(off, 8192));
        let known = read_pair::<BackingDevInfo, _>(Dialect::RfcV1, &img, off).unwrap();
        let read = read_pair::<BackingDevInfo, _>(Dialect::RfcV1, &zeros[..], off).unwrap();
        assert_eq!(known, read);
        assert!(matches!(known.latest, Err(e) if e.kind == ErrorKind::NeverWritten));
    }

    #[test]
    #[cfg(feature = "testing")]
    fn table_ids_skip_only_blocks_known_never_written() {
        use crate::sparse::ImageBuilder;
        let mut b = ImageBuilder::format(1 << 30).unwrap();
        b.add_cache(100, b"/dev/b", 64 << 20, 10, false).unwrap();
        let layout = b.layout();
        let ids: alloc::vec::Vec<u32> = table_ids(b.image(), &layout).collect();
        assert_eq!(ids, (64..128).collect::<alloc::vec::Vec<u32>>(), "only the block holding entry 100");
        // A device that cannot tell gets every id.
        let mut bytes = alloc::vec![0u8; 64 << 20];
        b.image().read_at(0, &mut bytes).unwrap();
        assert_eq!(table_ids(&bytes[..], &layout).count(), META_ENTRIES as usize);
    }

    #[test]
    fn superblock_on_short_device() {
        let small = [0u8; 6000];
        let err = read_superblock(&small[..]).unwrap_err();
        assert!(matches!(err, ReadError::Format(e) if matches!(e.kind, ErrorKind::Truncated { .. })));
    }
}
