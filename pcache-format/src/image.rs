//! A read-only scan of a whole device: what `pcache inspect` shows and what
//! `pcache check` verifies.
//!
//! The scan never stops at the first problem: it records each one as a
//! [`Finding`] with where it is, and goes on with whatever can still be read.
//! Findings are *problems* (the image is damaged or inconsistent) or *notes*
//! (something a crash leaves behind and recovery handles, such as a torn copy
//! that was not the current one, or a kset torn at the end of the log).

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::backing::{BackingDevInfo, BackingState, CacheFlags, CacheInfo};
use crate::consts::{SB_OFF, SB_SIZE};
use crate::ctrl::CachePos;
use crate::dialect::Dialect;
use crate::dm::{DmCacheInfo, DmSuperblock};
use crate::error::{Error, ErrorKind, Record};
use crate::kset::Key;
use crate::layout::Layout;
use crate::media::{
    ChainWalk, LogEnd, LogPos, LogStep, LogWalk, Pair, ReadError, ReadMedia, Tails, read, read_backing,
    read_dm_cache_info, read_gen, read_meta_segment_info, read_tails, table_ids,
};
use crate::meta::{CopyInfo, MetaRecord};
use crate::segment::MetaSegmentInfo;
use crate::superblock::Superblock;

/// The id a dm-pcache device's one cache has in a [`Report`] (its
/// [`BackingReport::id`] and in [`Location`]s): dm-pcache has no backing
/// table, and its cache is printed as "the cache".
pub const DM_CACHE_ID: u32 = u32::MAX - 1;

/// What to scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOptions {
    /// Walk every cache's key log from its key tail.
    pub walk_logs: bool,
    /// Verify the data CRC of every live key of caches that keep them.
    pub verify_data: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self { walk_logs: true, verify_data: true }
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Left by a crash and handled by recovery; nothing is lost.
    Note,
    /// The image is damaged or inconsistent.
    Problem,
}

/// Where a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The device as a whole.
    Device,
    /// The superblock.
    Superblock,
    /// The meta segment's info.
    MetaSegment,
    /// A backing-table entry.
    Backing {
        /// Entry id.
        id: u32,
    },
    /// A segment of a cache's chain.
    Segment {
        /// Backing-table entry id.
        backing: u32,
        /// Cache segment index.
        cache_seg: u32,
        /// Device segment number.
        dev_seg: u32,
    },
    /// A device segment that no backing entry's chain holds.
    DeviceSegment {
        /// Device segment number.
        dev_seg: u32,
    },
    /// A position in a cache's key log.
    Log {
        /// Backing-table entry id.
        backing: u32,
        /// Cache segment index.
        cache_seg: u32,
        /// Offset in the segment's data area.
        seg_off: u32,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Location::Device => f.write_str("device"),
            Location::Superblock => f.write_str("superblock"),
            Location::MetaSegment => f.write_str("meta segment"),
            Location::Backing { id: DM_CACHE_ID } => f.write_str("cache"),
            Location::Backing { id } => write!(f, "backing {id}"),
            Location::Segment { backing: DM_CACHE_ID, cache_seg, dev_seg } => {
                write!(f, "cache segment {cache_seg} (device segment {dev_seg})")
            }
            Location::Segment { backing, cache_seg, dev_seg } => {
                write!(f, "backing {backing}, cache segment {cache_seg} (device segment {dev_seg})")
            }
            Location::DeviceSegment { dev_seg } => write!(f, "device segment {dev_seg}"),
            Location::Log { backing: DM_CACHE_ID, cache_seg, seg_off } => {
                write!(f, "key log at segment {cache_seg} offset {seg_off:#x}")
            }
            Location::Log { backing, cache_seg, seg_off } => {
                write!(f, "backing {backing}, key log at segment {cache_seg} offset {seg_off:#x}")
            }
        }
    }
}

/// What a finding is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issue {
    /// A record failed to decode.
    Record(Error),
    /// The device failed to read.
    Media(String),
    /// A segment belongs to two chains.
    SegmentShared {
        /// The other backing entry whose chain holds it.
        other: u32,
    },
    /// The last segment of a chain links on to another one.
    ChainTooLong {
        /// The segment it links to.
        next: u32,
    },
    /// A running entry's cache does not fit the device.
    CacheTooLarge {
        /// Its first segment.
        seg_id: u32,
        /// Its number of segments.
        n_segs: u32,
        /// Segments of the device.
        seg_num: u32,
    },
    /// dm-pcache: no valid cache info. The kernel would start a new, empty
    /// cache here, discarding whatever the segments hold.
    NoCacheInfo(Error),
    /// dm-pcache: the cache info lacks INIT_DONE (the cache never finished
    /// its first start): the kernel would start it anew, empty.
    NotInitialised,
    /// dm-pcache: a valid cache-info copy at 0x2018, where Linux 6.18.0
    /// wrote its second copy (a stride defect fixed in December 2025). A
    /// fixed kernel, and pcache, read the copies at 0x2000 and 0x3000 only.
    UnfixedKernelCopy {
        /// Its sequence number.
        seq: u8,
        /// It is newer than the copy in use: the update it holds (a
        /// gc_percent change) is not what a fixed kernel sees.
        newer: bool,
    },
    /// Two running entries name the same backing path.
    PathShared {
        /// The other entry.
        other: u32,
    },
    /// The current copy of an entry is its only written copy: one damaged
    /// page would lose the entry.
    SingleCopy {
        /// The copy that was never written.
        never_written: u8,
    },
    /// An entry without a valid copy, one of them never written, while no
    /// cache with dirty data lacks its entry: a crash tore the entry's first
    /// write (or damage hit an entry whose cache held nothing to lose). It
    /// is free.
    TornEntry(Error),
    /// A cache (a chain of running segments with tails and a key log) that
    /// no backing entry owns: its entry was lost or never written.
    OrphanCache {
        /// Segments in its chain.
        segs: u32,
        /// Ksets on its log from the key tail.
        ksets: u64,
        /// Dirty keys on its log (not yet written back).
        dirty_keys: u64,
    },
    /// A LAST kset leads back to a segment the log already went through.
    LogLoop {
        /// The segment it names.
        next: u32,
    },
    /// A kset in the middle of the log fails its CRC (or has no usable key
    /// count), and it is no kset torn by a crash: the log goes on past it,
    /// and the writes recorded from there on cannot be replayed.
    LogDamaged(Error),
    /// The log has a record without the kset magic where a kset or a
    /// terminator must be.
    LogGarbage {
        /// The magic found.
        magic: u64,
    },
    /// The dirty tail is not on the log that starts at the key tail.
    DirtyTailNotInLog {
        /// The dirty tail.
        seg: u32,
        /// Its offset.
        off: u32,
    },
    /// A key claims a newer generation than its segment has.
    KeyFromFuture {
        /// Index of the key in its kset.
        key: u32,
        /// The key's `seg_gen`.
        key_gen: u64,
        /// The segment's generation.
        seg_gen: u64,
    },
    /// A key's data does not match its CRC.
    DataCrc {
        /// Index of the key in its kset.
        key: u32,
        /// The CRC in the key.
        stored: u32,
        /// The CRC of the cached data.
        computed: u32,
    },
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Issue::Record(e) => e.fmt(f),
            Issue::Media(e) => write!(f, "read error: {e}"),
            Issue::SegmentShared { other } => write!(f, "segment also belongs to the chain of backing {other}"),
            Issue::ChainTooLong { next } => write!(f, "chain links on to segment {next} past its n_segs segments"),
            Issue::CacheTooLarge { seg_id, n_segs, seg_num } => {
                write!(
                    f,
                    "cache of {n_segs} segments from segment {seg_id} does not fit a device of {seg_num} segments"
                )
            }
            Issue::PathShared { other } => write!(f, "same backing path as backing {other}"),
            Issue::NoCacheInfo(e) => write!(
                f,
                "{e}: the kernel's dm-pcache would start a new, empty cache on this device, dropping what the \
                 segments hold; do not load the module on it before `pcache detach --salvage` or a copy"
            ),
            Issue::UnfixedKernelCopy { seq, newer: false } => write!(
                f,
                "a cache-info copy (seq {seq}) lies at 0x2018, where Linux 6.18.0 wrote its second copy: an unfixed \
                 kernel ran this cache; the copies at 0x2000 and 0x3000 are read, as a fixed kernel reads them"
            ),
            Issue::UnfixedKernelCopy { seq, newer: true } => write!(
                f,
                "a cache-info copy (seq {seq}) at 0x2018, where Linux 6.18.0 wrote its second copy, is newer than \
                 the copy in use: the update it holds (a gc_percent change) is not seen by a fixed kernel or pcache"
            ),
            Issue::NotInitialised => f.write_str(
                "cache info lacks INIT_DONE: the cache never finished its first start, and the kernel's \
                 dm-pcache would start it anew, empty",
            ),
            Issue::SingleCopy { never_written } => write!(
                f,
                "copy {never_written} was never written, so one damaged page would lose this entry \
                 (`pcache repair` writes it)"
            ),
            Issue::TornEntry(e) => write!(
                f,
                "{e}: torn while it was first written (a crash as a cache was created), or damaged while its \
                 cache held no dirty data; nothing is lost and the entry is free"
            ),
            Issue::OrphanCache { segs, ksets, dirty_keys: 0 } => write!(
                f,
                "a cache of {segs} segment(s) with {ksets} kset(s) on its log but no dirty data is owned by \
                 no backing entry (left by an interrupted create or detach); its segments are free"
            ),
            Issue::OrphanCache { segs, ksets, dirty_keys } => write!(
                f,
                "a cache of {segs} segment(s) holding {dirty_keys} dirty key(s) in {ksets} kset(s) is owned by no \
                 backing entry (its entry was lost); its segments are kept, never reused: \
                 `pcache repair` rebuilds the entry"
            ),
            Issue::LogDamaged(e) => write!(
                f,
                "{e}, and it is no kset torn by a crash: the log goes on past damage (`pcache detach --salvage` \
                 writes back what can be read)"
            ),
            Issue::LogLoop { next } => write!(f, "LAST kset leads back to segment {next}, already in the log"),
            Issue::LogGarbage { magic } => {
                write!(f, "no kset and no terminator where the log continues (magic {magic:#018x})")
            }
            Issue::DirtyTailNotInLog { seg, off } => {
                write!(f, "dirty tail (segment {seg} offset {off:#x}) is not on the log from the key tail")
            }
            Issue::KeyFromFuture { key, key_gen, seg_gen } => {
                write!(f, "key {key} has generation {key_gen}, newer than its segment's {seg_gen}")
            }
            Issue::DataCrc { key, stored, computed } => {
                write!(f, "key {key}: data CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
        }
    }
}

/// One thing the scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Problem or note.
    pub severity: Severity,
    /// Where.
    pub location: Location,
    /// What.
    pub issue: Issue,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.location, &self.issue) {
            // The error names its record already.
            (Location::Device | Location::Superblock | Location::MetaSegment, Issue::Record(e)) => e.fmt(f),
            (location, issue) => write!(f, "{location}: {issue}"),
        }
    }
}

/// The superblock as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperblockReport {
    /// The dialect the superblock is in: the one whose CRC matches, or the
    /// likelier one when neither does. `None` without pcache's magic.
    pub dialect: Option<Dialect>,
    /// The dm-pcache struct, when the dialect is dm-pcache.
    pub raw_dm: Option<DmSuperblock>,
    /// The struct as stored, if the device is large enough to hold one.
    pub raw: Option<Superblock>,
    /// The CRC computed over the superblock area.
    pub computed_crc: u32,
    /// Why the superblock is unusable, if it is.
    pub error: Option<Error>,
}

impl SuperblockReport {
    /// Whether the stored CRC matches the area.
    pub fn crc_ok(&self) -> bool {
        match self.raw_dm {
            Some(sb) => sb.crc.get() == self.computed_crc,
            None => self.raw.is_some_and(|sb| sb.crc.get() == self.computed_crc),
        }
    }
}

/// One segment of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentReport {
    /// Device segment number.
    pub dev_seg: u32,
    /// The copies of its segment info.
    pub info_copies: [CopyInfo; 2],
    /// Its generation, if readable.
    pub gen_: Option<u64>,
}

/// What a walk of a key log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogReport {
    /// Ksets with keys.
    pub ksets: u64,
    /// LAST ksets.
    pub last_ksets: u64,
    /// Keys in those ksets, every one counted (later keys may overwrite
    /// earlier ones).
    pub keys: u64,
    /// Of those, keys without CLEAN from the dirty tail on (not yet
    /// written back, not stale).
    pub dirty_keys: u64,
    /// Keys without CLEAN before the dirty tail: written back already.
    pub written_back_keys: u64,
    /// Of those, CLEAN keys (and not stale).
    pub clean_keys: u64,
    /// Keys whose segment was reclaimed since (older generation).
    pub stale_keys: u64,
    /// Where the log ends (the next kset goes there): segment and offset.
    pub end: (u32, u32),
    /// The cache segments the log runs through, in order from the key tail.
    pub segs: Vec<u32>,
    /// Whether the dirty tail was met on the way.
    pub dirty_tail_reached: bool,
    /// Keys that carry a non-zero data CRC.
    pub keys_with_crc: u64,
    /// The end of the furthest backing range any valid key covers.
    pub key_end: u64,
}

/// A backing-table entry in use and its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingReport {
    /// Entry id.
    pub id: u32,
    /// Which copy is current.
    pub copy: u8,
    /// Both copies.
    pub copies: [CopyInfo; 2],
    /// The entry.
    pub info: BackingDevInfo,
    /// The chain, as far as it could be read, in cache-segment order.
    pub chain: Vec<SegmentReport>,
    /// Whether all `n_segs` segments were read.
    pub chain_complete: bool,
    /// The key tail, if readable.
    pub key_tail: Option<CachePos>,
    /// The dirty tail, if readable.
    pub dirty_tail: Option<CachePos>,
    /// The key log, if walked.
    pub log: Option<LogReport>,
}

/// Everything a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Size of the device.
    pub device_size: u64,
    /// The superblock.
    pub superblock: SuperblockReport,
    /// The layout, if the superblock gave a usable `seg_num`.
    pub layout: Option<Layout>,
    /// The meta segment's info, if the scan got that far.
    pub meta: Option<Pair<MetaSegmentInfo>>,
    /// dm-pcache's cache info copies (`None` on an RFC device).
    pub cache_info: Option<Pair<DmCacheInfo>>,
    /// Entries in use.
    pub backings: Vec<BackingReport>,
    /// Caches owned by no entry.
    pub orphans: Vec<Orphan>,
    /// Problems and notes, in the order found.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Number of problems (notes are not problems).
    pub fn problems(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Problem).count()
    }

    /// Whether the superblock is valid.
    pub fn superblock_ok(&self) -> bool {
        self.superblock.error.is_none()
    }
}

/// What the scan made of a key of a cache's log that passed its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Its segment was reclaimed since (an older generation): not live.
    Stale,
    /// Dirty, from the dirty tail on: not yet written back.
    Dirty,
    /// Dirty, before the dirty tail: written back already, so clean now.
    WrittenBack,
    /// CLEAN.
    Clean,
}

/// Called with each key of a backing entry's log that passes its checks,
/// in log order: the entry's id, the key, what it is.
pub type KeySink<'k> = dyn FnMut(u32, &Key, KeyState) + 'k;

struct Scanner<'m, 'k, M: ReadMedia + ?Sized> {
    m: &'m M,
    opts: ScanOptions,
    findings: Vec<Finding>,
    keys: &'k mut KeySink<'k>,
}

impl<M: ReadMedia + ?Sized> Scanner<'_, '_, M> {
    fn push(&mut self, severity: Severity, location: Location, issue: Issue) {
        self.findings.push(Finding { severity, location, issue });
    }

    fn problem(&mut self, location: Location, issue: Issue) {
        self.push(Severity::Problem, location, issue);
    }

    fn problems(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Problem).count()
    }

    fn read_error(&mut self, location: Location, e: ReadError<M::Error>) {
        let issue = match e {
            ReadError::Format(e) => Issue::Record(e),
            media => Issue::Media(media.to_string()),
        };
        self.problem(location, issue);
    }

    /// Notes a copy that is not the current one and has a bad CRC.
    fn stale_copies<R: MetaRecord>(&mut self, location: Location, pair: &Pair<R>) {
        let Ok(latest) = &pair.latest else { return };
        for (i, c) in pair.copies.iter().enumerate() {
            if i != usize::from(latest.copy) && !c.crc_ok() && !c.blank {
                let e = Error::new(R::RECORD, ErrorKind::BadCrc { stored: c.stored_crc, computed: c.computed_crc });
                self.push(Severity::Note, location, Issue::Record(e.in_copy(i as u8)));
            }
        }
    }
}

/// Scans a device.
///
/// ```
/// use pcache_format::image::{scan, ScanOptions};
/// use pcache_format::Superblock;
/// // A sparse picture of a fresh 512 MiB format: superblock, zeroed segment 0.
/// let mut img = vec![0u8; 32 << 20];
/// img[4096..8192].copy_from_slice(&Superblock::encode_area(1));
/// let report = scan(&img[..], ScanOptions::default());
/// assert!(report.superblock_ok());
/// // Segment 0 is all zeros: its info was never written.
/// assert_eq!(report.problems(), 1);
/// ```
pub fn scan<M: ReadMedia + ?Sized>(m: &M, opts: ScanOptions) -> Report {
    scan_with(m, opts, &mut |_, _, _| {})
}

/// Scans a device like [`scan`], and hands each key of a backing entry's
/// log that passes its checks to `keys` as the walk meets it, so that a
/// caller can build on the same walk of the log (what `pcache inspect`
/// does to count the live keys).
pub fn scan_with<'k, M: ReadMedia + ?Sized>(m: &M, opts: ScanOptions, keys: &'k mut KeySink<'k>) -> Report {
    let mut s = Scanner { m, opts, findings: Vec::new(), keys };
    let mut report = Report {
        device_size: m.size(),
        superblock: SuperblockReport { dialect: None, raw: None, raw_dm: None, computed_crc: 0, error: None },
        layout: None,
        meta: None,
        cache_info: None,
        backings: Vec::new(),
        orphans: Vec::new(),
        findings: Vec::new(),
    };
    report.layout = scan_superblock(&mut s, &mut report.superblock);
    if let Some(layout) = report.layout.filter(|l| l.dialect() == Dialect::DmPcache) {
        scan_dm_cache(&mut s, &layout, &mut report);
    } else if let Some(layout) = report.layout {
        match read_meta_segment_info(m, &layout) {
            Ok(pair) => {
                if let Err(e) = pair.latest {
                    s.problem(Location::MetaSegment, Issue::Record(e));
                }
                s.stale_copies(Location::MetaSegment, &pair);
                report.meta = Some(pair);
            }
            Err(e) => s.read_error(Location::MetaSegment, e),
        }
        let (backings, owner, unreadable) = scan_backings(&mut s, &layout);
        report.backings = backings;
        let owned: Vec<bool> = owner.iter().map(Option::is_some).collect();
        report.orphans = find_orphans(m, &layout, &owned);
        for (id, e) in unreadable {
            if entry_torn_harmlessly(&e, &report.orphans) {
                s.push(Severity::Note, Location::Backing { id }, Issue::TornEntry(e));
            } else {
                s.problem(Location::Backing { id }, Issue::Record(e));
            }
        }
        for o in &report.orphans {
            let severity = if o.holds_dirty_data() { Severity::Problem } else { Severity::Note };
            let issue =
                Issue::OrphanCache { segs: o.segs.len() as u32, ksets: o.log.ksets, dirty_keys: o.log.dirty_keys };
            s.push(severity, Location::DeviceSegment { dev_seg: o.head }, issue);
        }
    }
    report.findings = s.findings;
    report
}

fn scan_superblock<M: ReadMedia + ?Sized>(s: &mut Scanner<'_, '_, M>, sb: &mut SuperblockReport) -> Option<Layout> {
    let size = s.m.size();
    if size < SB_OFF + SB_SIZE as u64 {
        let e = Error::truncated(Record::Superblock, SB_SIZE, size.saturating_sub(SB_OFF) as usize);
        sb.error = Some(e);
        s.problem(Location::Device, Issue::Record(e));
        return None;
    }
    let mut area = vec![0u8; SB_SIZE];
    if let Err(e) = read(s.m, SB_OFF, &mut area) {
        s.read_error(Location::Superblock, e);
        return None;
    }
    let dialect = Dialect::guess(&area).unwrap_or_default();
    sb.dialect = Dialect::guess(&area);
    let (seg_num, checked) = match dialect {
        Dialect::RfcV1 => {
            let raw = Superblock::read(&area).ok()?;
            sb.raw = Some(raw);
            sb.computed_crc = Superblock::computed_crc(&area);
            (u32::from(raw.seg_num.get()), raw.validate(sb.computed_crc))
        }
        Dialect::DmPcache => {
            let raw = DmSuperblock::read(&area).ok()?;
            sb.raw_dm = Some(raw);
            sb.computed_crc = DmSuperblock::computed_crc(&area);
            (raw.seg_num.get(), raw.validate(sb.computed_crc))
        }
    };
    if let Err(e) = checked {
        sb.error = Some(e);
        s.problem(Location::Superblock, Issue::Record(e));
        // Without the magic this is no pcache image; with a big-endian one
        // every other field would be misread. Otherwise show what can be.
        if matches!(e.kind, ErrorKind::BadMagic { .. } | ErrorKind::BigEndian) {
            return None;
        }
    }
    match Layout::new(dialect, seg_num, size) {
        Ok(layout) => Some(layout),
        Err(e) => {
            if sb.error.is_none() {
                sb.error = Some(e);
            }
            s.problem(Location::Superblock, Issue::Record(e));
            None
        }
    }
}

/// dm-pcache: the one cache, from its cache info, scanned as a backing
/// entry's cache is.
fn scan_dm_cache<M: ReadMedia + ?Sized>(s: &mut Scanner<'_, '_, M>, layout: &Layout, report: &mut Report) {
    let loc = Location::Backing { id: DM_CACHE_ID };
    let pair = match read_dm_cache_info(s.m, layout) {
        Ok(pair) => pair,
        Err(e) => return s.read_error(loc, e),
    };
    report.cache_info = Some(pair);
    let latest = match pair.latest {
        Ok(l) => l,
        // Formatted, never started (the kernel writes the cache info after
        // the segments): nothing to lose. Segments already set up say the
        // cache info was there and is gone.
        Err(e) if e.kind == ErrorKind::NeverWritten => {
            if crate::media::read_cache_segment_info(s.m, layout, 0).is_ok() {
                s.problem(loc, Issue::NoCacheInfo(e));
            }
            return;
        }
        Err(e) => return s.problem(loc, Issue::NoCacheInfo(e)),
    };
    s.stale_copies(loc, &pair);
    let ci = latest.record;
    unfixed_kernel_copy(s, layout, &ci);
    if !ci.init_done() {
        s.problem(loc, Issue::NotInitialised);
    }
    let flags = if ci.data_crc() { CacheFlags::DATA_CRC } else { CacheFlags::empty() };
    let mut info = BackingDevInfo::free(DM_CACHE_ID);
    info.state = BackingState::Running as u8;
    info.cache_info = CacheInfo::new(ci.seg_id.get(), ci.n_segs.get(), ci.gc_percent() as u16, flags);
    let mut b = BackingReport {
        id: DM_CACHE_ID,
        copy: latest.copy,
        copies: pair.copies,
        info,
        chain: Vec::new(),
        chain_complete: false,
        key_tail: None,
        dirty_tail: None,
        log: None,
    };
    let mut owner: Vec<Option<u32>> = vec![None; layout.seg_num() as usize];
    scan_cache(s, layout, &mut owner, &mut b);
    report.backings.push(b);
}

/// Notes the cache-info copy Linux 6.18.0 wrote at 0x2018 (its copy 1, at
/// a stride of the struct size instead of 4 KiB), if one is there.
fn unfixed_kernel_copy<M: ReadMedia + ?Sized>(s: &mut Scanner<'_, '_, M>, layout: &Layout, current: &DmCacheInfo) {
    const STRIDE_DEFECT_OFF: u64 = 0x18;
    let Ok(base) = layout.cache_info_offset() else { return };
    let mut copy = [0u8; core::mem::size_of::<DmCacheInfo>()];
    if read(s.m, base + STRIDE_DEFECT_OFF, &mut copy).is_err() {
        return;
    }
    let stored = u32::from_le_bytes([copy[0], copy[1], copy[2], copy[3]]);
    if Dialect::DmPcache.record_crc(&copy, copy.len()) != stored {
        return;
    }
    let seq = copy[4];
    let newer = crate::meta::seq_after(seq, current.header.seq);
    s.push(Severity::Note, Location::Backing { id: DM_CACHE_ID }, Issue::UnfixedKernelCopy { seq, newer });
}

type Unreadable = Vec<(u32, Error)>;

fn scan_backings<M: ReadMedia + ?Sized>(
    s: &mut Scanner<'_, '_, M>,
    layout: &Layout,
) -> (Vec<BackingReport>, Vec<Option<u32>>, Unreadable) {
    let mut unreadable = Vec::new();
    let mut backings: Vec<BackingReport> = Vec::new();
    // Which backing owns each device segment.
    let mut owner: Vec<Option<u32>> = vec![None; layout.seg_num() as usize];
    for id in table_ids(s.m, layout) {
        let loc = Location::Backing { id };
        let pair = match read_backing(s.m, layout, id) {
            Ok(p) => p,
            Err(e) => {
                s.read_error(loc, e);
                continue;
            }
        };
        let latest = match pair.latest {
            Ok(l) => l,
            // A free entry that was never written.
            Err(e) if e.kind == ErrorKind::NeverWritten => continue,
            Err(e) => {
                unreadable.push((id, e));
                continue;
            }
        };
        if !latest.record.is_running() {
            continue;
        }
        s.stale_copies(loc, &pair);
        let other = 1 - usize::from(latest.copy);
        if pair.copies[other].blank {
            s.push(Severity::Note, loc, Issue::SingleCopy { never_written: other as u8 });
        }
        if let Some(other) = backings.iter().find(|b| b.info.path() == latest.record.path()) {
            s.problem(loc, Issue::PathShared { other: other.id });
        }
        let mut b = BackingReport {
            id,
            copy: latest.copy,
            copies: pair.copies,
            info: latest.record,
            chain: Vec::new(),
            chain_complete: false,
            key_tail: None,
            dirty_tail: None,
            log: None,
        };
        scan_cache(s, layout, &mut owner, &mut b);
        backings.push(b);
    }
    (backings, owner, unreadable)
}

/// Whether an entry without a valid copy is harmless: one copy was never
/// written (what a crash leaves when it tears the first write of a new
/// entry) and no cache holding dirty data lacks an entry, so nothing can
/// be lost by taking it for free.
pub fn entry_torn_harmlessly(e: &Error, orphans: &[Orphan]) -> bool {
    matches!(e.kind, ErrorKind::NoValidCopy { never_written: [true, false] | [false, true], .. })
        && !orphans.iter().any(Orphan::holds_dirty_data)
}

/// A cache that no backing entry owns: a chain of running data segments
/// whose first segment has valid tails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// Its first device segment (where its tails are).
    pub head: u32,
    /// Its chain, in cache-segment order.
    pub segs: Vec<u32>,
    /// The key tail.
    pub key_tail: CachePos,
    /// The dirty tail.
    pub dirty_tail: CachePos,
    /// Its key log, walked from the key tail (keys checked against nothing
    /// but the chain: the entry that knew the backing size is gone).
    pub log: LogReport,
    /// Whether the walk of the log met damage before its end.
    pub log_damaged: bool,
}

impl Orphan {
    /// Whether it holds data not yet written back (or cannot tell).
    pub fn holds_dirty_data(&self) -> bool {
        self.log.dirty_keys > 0 || self.log_damaged
    }

    /// Whether its keys carry data CRCs (so its cache kept them).
    pub fn data_crc(&self) -> bool {
        self.log.keys_with_crc > 0
    }
}

/// Whether both copies of the segment info of `seg` start with 16 zero
/// bytes: a segment no cache ever used (formatting zeroes nothing but
/// segment 0). A cheap look before a full read, so that a scan of a large,
/// mostly unused device reads 32 bytes per segment, not 8 KiB.
fn never_written_info<M: ReadMedia + ?Sized>(m: &M, layout: &Layout, seg: u32) -> bool {
    let Ok(off) = layout.seg_info_offset(seg) else { return false };
    let mut head = [0u8; 16];
    [0u64, crate::consts::SEG_INFO_SIZE as u64]
        .iter()
        .all(|&copy| read(m, off + copy, &mut head).is_ok() && head.iter().all(|&b| b == 0))
}

/// Finds the caches on a device that no backing entry owns: device segments
/// outside `owned` (indexed by device segment) whose segment info says a
/// running data segment and whose control page holds valid tails, each with
/// the chain that follows from it and a walk of its key log.
///
/// Detach and create leave such chains when a crash interrupts them, with no
/// dirty data; an entry lost to damage leaves one with its dirty data. The
/// segments of one that [`Orphan::holds_dirty_data`] must never be reused.
pub fn find_orphans<M: ReadMedia + ?Sized>(m: &M, layout: &Layout, owned: &[bool]) -> Vec<Orphan> {
    let seg_num = layout.seg_num();
    let mut taken: Vec<bool> = (0..seg_num as usize).map(|i| owned.get(i).copied().unwrap_or(i == 0)).collect();
    let mut orphans = Vec::new();
    // Running data segments no entry owns, and which of them another one
    // links to. A segment reused in the middle of a chain can keep a
    // previous life's tails, so heads nothing links to are tried first:
    // the real first segment of a chain takes the whole chain before a
    // stale middle one could.
    let mut linked = vec![false; seg_num as usize];
    // For each running data segment no entry owns: where it links to.
    let mut next_of: Vec<Option<Option<u32>>> = vec![None; seg_num as usize];
    let mut candidates = Vec::new();
    for seg in 1..seg_num {
        if taken[seg as usize] || never_written_info(m, layout, seg) {
            continue;
        }
        if let Ok(found) = crate::media::read_cache_segment_info(m, layout, seg) {
            let next = found.latest.record.next();
            if let Some(l) = next.and_then(|n| linked.get_mut(n as usize)) {
                *l = true;
            }
            next_of[seg as usize] = Some(next);
            candidates.push(seg);
        }
    }
    candidates.sort_by_key(|&seg| linked[seg as usize]);
    for head in candidates {
        if taken[head as usize] {
            continue;
        }
        let Ok(tails) = read_tails(m, layout, head, seg_num) else { continue };
        let (Ok(kt), Ok(dt)) = (tails.key_tail.latest, tails.dirty_tail.latest) else { continue };
        // Follow the chain while it leads to running data segments not yet
        // taken (by an owner, another orphan, or this chain itself).
        let mut segs = alloc::vec![head];
        taken[head as usize] = true;
        let mut at = head;
        while let Some(next) = next_of[at as usize].flatten()
            && next_of.get(next as usize).is_some_and(Option::is_some)
            && !taken[next as usize]
        {
            segs.push(next);
            taken[next as usize] = true;
            at = next;
        }
        let n = segs.len() as u32;
        let (kt, dt) = (kt.record, dt.record);
        if kt.cache_seg_id.get() >= n || dt.cache_seg_id.get() >= n {
            for &seg in &segs[1..] {
                taken[seg as usize] = false;
            }
            continue;
        }
        let chain = segs
            .iter()
            .map(|&dev_seg| SegmentReport {
                dev_seg,
                info_copies: [CopyInfo::ABSENT; 2],
                gen_: read_gen(m, layout, dev_seg).ok().and_then(|p| p.latest.ok()).map(|l| l.record.gen_.get()),
            })
            .collect();
        let ci = crate::backing::CacheInfo::new(head, n, 0, crate::backing::CacheFlags::empty());
        let info = BackingDevInfo::running(u32::MAX, b"?", 0, ci).unwrap_or_else(|_| BackingDevInfo::free(u32::MAX));
        let b = BackingReport {
            id: u32::MAX,
            copy: 0,
            copies: [CopyInfo::ABSENT; 2],
            info,
            chain,
            chain_complete: true,
            key_tail: Some(kt),
            dirty_tail: Some(dt),
            log: None,
        };
        let opts = ScanOptions { walk_logs: true, verify_data: false };
        let mut scratch = Scanner { m, opts, findings: Vec::new(), keys: &mut |_, _, _| {} };
        let log = scan_log(&mut scratch, layout, &b, pos(&kt), pos(&dt));
        let log_damaged = scratch.problems() > 0;
        orphans.push(Orphan { head, segs, key_tail: kt, dirty_tail: dt, log, log_damaged });
    }
    orphans.sort_by_key(|o| o.head);
    orphans
}

fn scan_cache<M: ReadMedia + ?Sized>(
    s: &mut Scanner<'_, '_, M>,
    layout: &Layout,
    owner: &mut [Option<u32>],
    b: &mut BackingReport,
) {
    let ci = b.info.cache_info;
    let (first, n_segs) = (ci.seg_id.get(), ci.n_segs.get());
    let loc = Location::Backing { id: b.id };
    let room = layout.seg_num() - layout.first_cache_seg();
    if first < layout.first_cache_seg() || first >= layout.seg_num() || n_segs > room {
        s.problem(loc, Issue::CacheTooLarge { seg_id: first, n_segs, seg_num: layout.seg_num() });
        return;
    }
    let mut walk = ChainWalk::new(first, n_segs);
    while let Some(step) = walk.next(s.m, layout) {
        let step = match step {
            Ok(step) => step,
            Err(e) => {
                let at = Location::Segment { backing: b.id, cache_seg: walk.current_index(), dev_seg: walk.current() };
                s.read_error(at, e);
                return;
            }
        };
        let dev_seg = step.dev_seg;
        let at = Location::Segment { backing: b.id, cache_seg: step.index, dev_seg };
        let slot = &mut owner[dev_seg as usize];
        if let Some(other) = *slot {
            s.problem(at, Issue::SegmentShared { other });
            return;
        }
        *slot = Some(b.id);
        let info_pair = Pair { copies: step.copies, latest: Ok(step.info) };
        s.stale_copies(at, &info_pair);
        let gen_ = match read_gen(s.m, layout, dev_seg) {
            Ok(pair) => {
                s.stale_copies(at, &pair);
                match pair.latest {
                    Ok(l) => Some(l.record.gen_.get()),
                    Err(e) => {
                        s.problem(at, Issue::Record(e));
                        None
                    }
                }
            }
            Err(e) => {
                s.read_error(at, e);
                None
            }
        };
        b.chain.push(SegmentReport { dev_seg, info_copies: step.copies, gen_ });
    }
    if let Some(next) = walk.dangling_next() {
        s.problem(loc, Issue::ChainTooLong { next });
    }
    b.chain_complete = b.chain.len() as u32 == n_segs;
    if !b.chain_complete {
        return;
    }
    let tails = match read_tails(s.m, layout, first, n_segs) {
        Ok(t) => t,
        Err(e) => {
            s.read_error(loc, e);
            return;
        }
    };
    let Tails { key_tail, dirty_tail } = tails;
    for pair in [&key_tail, &dirty_tail] {
        s.stale_copies(loc, pair);
        match &pair.latest {
            Ok(_) => {}
            Err(e) => s.problem(loc, Issue::Record(*e)),
        }
    }
    b.key_tail = key_tail.latest.ok().map(|l| l.record);
    b.dirty_tail = dirty_tail.latest.ok().map(|l| l.record);
    if let (true, Some(kt), Some(dt)) = (s.opts.walk_logs, b.key_tail, b.dirty_tail) {
        b.log = Some(scan_log(s, layout, b, pos(&kt), pos(&dt)));
    }
}

fn pos(p: &CachePos) -> LogPos {
    LogPos::from(*p)
}

fn scan_log<M: ReadMedia + ?Sized>(
    s: &mut Scanner<'_, '_, M>,
    layout: &Layout,
    b: &BackingReport,
    key_tail: LogPos,
    dirty_tail: LogPos,
) -> LogReport {
    let ctx = KeyContext {
        dev_size: b.info.dev_size.get().checked_mul(512).filter(|&s| s > 0).unwrap_or(u64::MAX),
        data_crc: b.info.cache_info.data_crc(),
    };
    let mut log = LogReport { segs: vec![key_tail.seg], ..LogReport::default() };
    let segs: Vec<u32> = b.chain.iter().map(|s| s.dev_seg).collect();
    let mut visited = vec![false; segs.len()];
    let mut walk = LogWalk::new(s.m, layout, &segs, &mut visited, key_tail);
    let mut data = Vec::new();
    loop {
        if walk.pos() == dirty_tail {
            log.dirty_tail_reached = true;
        }
        let Some(step) = walk.step() else { break };
        match step {
            LogStep::Keys { at, keys } => {
                log.ksets += 1;
                let at = log_location(b.id, at);
                for (i, key) in keys.iter().enumerate() {
                    scan_key(s, layout, b, &mut log, at, i as u32, key, ctx, &mut data);
                }
            }
            LogStep::Last { next, .. } => {
                log.last_ksets += 1;
                log.segs.push(next);
            }
            LogStep::End { at, end } => {
                log_end(s, log_location(b.id, at), end);
                break;
            }
        }
    }
    log.end = walk.pos().into();
    if !log.dirty_tail_reached {
        let at = Location::Backing { id: b.id };
        s.problem(at, Issue::DirtyTailNotInLog { seg: dirty_tail.seg, off: dirty_tail.off });
    }
    log
}

fn log_location(backing: u32, at: LogPos) -> Location {
    Location::Log { backing, cache_seg: at.seg, seg_off: at.off }
}

/// Records why the log ends, unless it ends cleanly.
fn log_end<M: ReadMedia + ?Sized>(s: &mut Scanner<'_, '_, M>, at: Location, end: LogEnd<M::Error>) {
    match end {
        LogEnd::Terminator => {}
        LogEnd::Torn(e) => s.push(Severity::Note, at, Issue::Record(e)),
        LogEnd::Damaged(e) => s.problem(at, Issue::LogDamaged(e)),
        LogEnd::Invalid(e) => s.problem(at, Issue::Record(e)),
        LogEnd::Loop { next } => s.problem(at, Issue::LogLoop { next }),
        LogEnd::Garbage { magic } => s.problem(at, Issue::LogGarbage { magic }),
        LogEnd::Media { off, len, source } => s.read_error(at, ReadError::Media { off, len, source }),
    }
}

/// What checking a key needs to know of its cache.
#[derive(Debug, Clone, Copy)]
struct KeyContext {
    /// Size of the backing device (`u64::MAX` when the entry does not say).
    dev_size: u64,
    /// Whether the cache keeps data CRCs.
    data_crc: bool,
}

#[allow(clippy::too_many_arguments)]
fn scan_key<M: ReadMedia + ?Sized>(
    s: &mut Scanner<'_, '_, M>,
    layout: &Layout,
    b: &BackingReport,
    log: &mut LogReport,
    at: Location,
    index: u32,
    key: &Key,
    ctx: KeyContext,
    data: &mut Vec<u8>,
) {
    log.keys += 1;
    if key.data_crc.get() != 0 {
        log.keys_with_crc += 1;
    }
    if let Err(e) = key.check_in(b.chain.len() as u32, ctx.dev_size) {
        s.problem(at, Issue::Record(e.at_index(index)));
        return;
    }
    log.key_end = log.key_end.max(key.off.get().saturating_add(key.len.get().into()));
    let seg = &b.chain[key.cache_seg_id.get() as usize];
    let Some(seg_gen) = seg.gen_ else { return };
    let key_gen = key.seg_gen.get();
    if key_gen > seg_gen {
        s.problem(at, Issue::KeyFromFuture { key: index, key_gen, seg_gen });
        return;
    }
    let state = if key_gen < seg_gen {
        log.stale_keys += 1;
        KeyState::Stale
    } else if key.is_dirty() && log.dirty_tail_reached {
        log.dirty_keys += 1;
        KeyState::Dirty
    } else if key.is_dirty() {
        log.written_back_keys += 1;
        KeyState::WrittenBack
    } else {
        log.clean_keys += 1;
        KeyState::Clean
    };
    (s.keys)(b.id, key, state);
    // The dm-pcache kernel decodes every key from the key tail with its data
    // CRC before it looks at generations, and refuses the cache on a
    // mismatch, stale keys included; the RFC reader skips stale keys.
    if state == KeyState::Stale && layout.dialect() != Dialect::DmPcache {
        return;
    }
    if ctx.data_crc && s.opts.verify_data {
        let len = key.len.get();
        let off = match layout.data_range(seg.dev_seg, key.cache_seg_off.get(), len) {
            Ok(off) => off,
            Err(e) => return s.problem(at, Issue::Record(e)),
        };
        data.resize(len as usize, 0);
        if let Err(e) = read(s.m, off, data) {
            return s.read_error(at, e);
        }
        let computed = layout.dialect().crc(data);
        if computed != key.data_crc.get() {
            s.problem(at, Issue::DataCrc { key: index, stored: key.data_crc.get(), computed });
        }
    }
}
