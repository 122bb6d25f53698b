//! The key log of one cache, walked: [`LogWalk`] follows ksets from a
//! position through LAST ksets into the next segments, and ends the log for
//! exactly one classified reason ([`LogEnd`]): its terminator, a newest kset
//! torn by a crash, damage the log goes on past, a loop, garbage or a media
//! error. Replay, writeback, GC, salvage and the image scan all walk logs
//! with it, so they agree on where a log ends and why.

use core::fmt;

use crate::consts::{CACHE_SEG_DATA_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC, KSET_ONMEDIA_SIZE_MAX};
use crate::ctrl::CachePos;
use crate::error::{Error, ErrorKind, Record};
use crate::kset::{Key, KsetFlags, KsetRecord, kset_size};
use crate::layout::Layout;
use crate::media::{KsetBuf, ReadError, ReadMedia, read, read_kset};
use zerocopy::FromBytes;
/// A position in a cache's key log: a cache segment index (its place in the
/// cache's chain) and an offset in that segment's data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogPos {
    /// Cache segment index.
    pub seg: u32,
    /// Offset in the segment's data area.
    pub off: u32,
}

impl LogPos {
    /// Offset `off` of cache segment `seg`.
    pub const fn new(seg: u32, off: u32) -> Self {
        Self { seg, off }
    }
}

impl fmt::Display for LogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {} offset {:#x}", self.seg, self.off)
    }
}

impl From<CachePos> for LogPos {
    fn from(p: CachePos) -> Self {
        Self::new(p.cache_seg_id.get(), p.seg_off.get())
    }
}

impl From<(u32, u32)> for LogPos {
    fn from((seg, off): (u32, u32)) -> Self {
        Self::new(seg, off)
    }
}

impl From<LogPos> for (u32, u32) {
    fn from(p: LogPos) -> Self {
        (p.seg, p.off)
    }
}

/// One step of a [`LogWalk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogStep<'b, E> {
    /// A kset with keys at `at`.
    Keys {
        /// Where it is.
        at: LogPos,
        /// Its keys, in log order.
        keys: &'b [Key],
    },
    /// A LAST kset at `at`: the log goes on at offset 0 of cache segment `next`.
    Last {
        /// Where it is.
        at: LogPos,
        /// The segment it leads to.
        next: u32,
    },
    /// The log ends at `at`, for the reason `end`.
    End {
        /// Where the record that ends the log is.
        at: LogPos,
        /// Why it ends there.
        end: LogEnd<E>,
    },
}

/// Why a key log ends where it does: cleanly, at what a crash leaves, or
/// at damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEnd<E> {
    /// A terminator: the clean end of the log.
    Terminator,
    /// The newest kset, torn by a crash while it was written (its error):
    /// harmless, the log ends there. Only the shapes a crash leaves count
    /// (see [`LogWalk`]).
    Torn(Error),
    /// A kset that fails its CRC (or has no usable key count) and is no
    /// torn newest kset: damage in the middle of the log, which goes on
    /// past it. The writes it and the ksets after it record cannot be
    /// replayed.
    Damaged(Error),
    /// A kset whose bytes do not hold a valid record for another reason
    /// (unknown flags, a key out of range, a LAST kset naming a segment
    /// outside the cache, a position outside the data area).
    Invalid(Error),
    /// A LAST kset leads back to a segment the walk already went through.
    Loop {
        /// The segment it names.
        next: u32,
    },
    /// Neither a kset nor a terminator: a record without the kset magic.
    Garbage {
        /// The magic found.
        magic: u64,
    },
    /// The device failed to read `len` bytes at `off`.
    Media {
        /// Device offset of the read.
        off: u64,
        /// Length of the read.
        len: usize,
        /// What the device said.
        source: E,
    },
}

impl<E: fmt::Display> fmt::Display for LogEnd<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogEnd::Terminator => f.write_str("terminator"),
            LogEnd::Torn(e) => write!(f, "{e} (the newest kset, torn by a crash)"),
            LogEnd::Damaged(e) => write!(f, "{e} (damage: the log goes on past it)"),
            LogEnd::Invalid(e) => e.fmt(f),
            LogEnd::Loop { next } => write!(f, "LAST kset leads back to segment {next}"),
            LogEnd::Garbage { magic } => write!(f, "no kset and no terminator (magic {magic:#018x})"),
            LogEnd::Media { off, len, source } => write!(f, "cannot read {len} bytes at {off:#x}: {source}"),
        }
    }
}

/// What lies at a position of the log, as far as telling a torn end from
/// damage needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Terminator,
    /// A kset with keys or a LAST kset whose magic and CRC verify.
    Kset,
    Other,
}

/// What follows a kset that fails to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follows {
    /// It is the newest kset, torn by a crash.
    Torn,
    /// The log goes on at a kset that verifies there.
    Continues(LogPos),
    /// Damage, and where the log goes on is unknown.
    Unknown,
}

/// The fields of a kset header that say what it is, read raw.
#[derive(Debug, Clone, Copy)]
struct RawHeader {
    crc: u32,
    key_num: u32,
    magic: u64,
    flags: u64,
}

impl RawHeader {
    fn is_kset(&self) -> bool {
        self.magic == KSET_MAGIC
    }

    fn is_last(&self) -> bool {
        self.is_kset() && self.flags & KsetFlags::LAST.bits() != 0
    }
}

/// Walks a cache's key log: every reader of the log (replay, the image
/// scan, writeback, GC, salvage) follows it with this cursor, so that all
/// of them read the same log and end it for the same reasons.
///
/// From a start position, [`step`](Self::step) yields each kset with keys
/// and each LAST kset (following it to the next segment), then exactly one
/// [`LogStep::End`] saying why the log ends there, then `None`:
///
/// * a terminator ([`LogEnd::Terminator`]): the clean end;
/// * the newest kset torn by a crash ([`LogEnd::Torn`]), judged by the only
///   shapes a crash can leave. A kset is written over the durable
///   terminator that ended the log, after the terminator that follows it
///   (or, for a LAST kset, the one that starts its next segment) is
///   durable, and a torn write leaves each 8-byte header word either the
///   old zeros or the new value. So a torn kset still has the zeros of
///   its first word (CRC and key count); or its key count leads to a
///   terminator; or it is a LAST
///   kset whose segment starts with a terminator; or it is a LAST kset
///   torn before its flags word, whose first word (the next segment)
///   makes it look like a kset of that many keys, and that segment starts
///   with a terminator;
/// * any other kset that fails its CRC ([`LogEnd::Damaged`]), or fails to
///   decode otherwise ([`LogEnd::Invalid`]): damage;
/// * a LAST kset leading back to a segment already walked ([`LogEnd::Loop`]);
/// * a record with neither the kset magic nor a terminator ([`LogEnd::Garbage`]);
/// * a failed read ([`LogEnd::Media`]).
///
/// After a damage end, [`resync`](Self::resync) finds where the log can be
/// picked up again, and the walk goes on from there (what salvage does).
///
/// [`pos`](Self::pos) is where the next record is read: after a kset, the
/// record after it; after an end, the record that ended the log (where
/// the next kset goes, for a terminator or a torn end). A caller walking
/// a bounded range (writeback from the dirty tail up to the log end it
/// knows is published, GC from the key tail up to the dirty tail) stops
/// when `pos()` reaches its bound, before calling `step` again:
///
/// ```
/// # use pcache_format::media::{LogPos, LogStep, LogWalk};
/// # use pcache_format::sparse::ImageBuilder;
/// let mut b = ImageBuilder::format(1 << 30).unwrap();
/// let mut c = b.add_cache(0, b"/dev/backing", 64 << 20, 4, false).unwrap();
/// for i in 0..3 {
///     c.write(&mut b, i * 4096, &[1u8; 4096], false).unwrap();
///     c.close(&mut b).unwrap();
/// }
/// let (layout, bound) = (b.layout(), LogPos::new(0, 2 * 64)); // the first two ksets
/// let mut visited = [false; 4];
/// let mut walk = LogWalk::new(b.image(), &layout, c.chain(), &mut visited, LogPos::new(0, 0));
/// let mut keys = 0;
/// while walk.pos() != bound {
///     match walk.step() {
///         Some(LogStep::Keys { keys: k, .. }) => keys += k.len(),
///         Some(LogStep::Last { .. }) => {}
///         Some(LogStep::End { .. }) | None => break,
///     }
/// }
/// assert_eq!(keys, 2);
/// ```
///
/// The walk needs no allocator: the caller lends the chain (`segs`, device
/// segment by cache segment index) and one flag per cache segment to mark
/// the segments walked (so a loop is caught at the LAST kset that closes
/// it, before any kset is yielded twice); the walk holds one kset buffer.
pub struct LogWalk<'a, M: ReadMedia + ?Sized> {
    m: &'a M,
    layout: &'a Layout,
    segs: &'a [u32],
    visited: &'a mut [bool],
    at: LogPos,
    ended: bool,
    resumable: bool,
    buf: KsetBuf,
}

impl<M: ReadMedia + ?Sized> fmt::Debug for LogWalk<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogWalk").field("at", &self.at).field("ended", &self.ended).finish_non_exhaustive()
    }
}

impl<'a, M: ReadMedia + ?Sized> LogWalk<'a, M> {
    /// A walk of the log of the cache whose chain is `segs` (device segment
    /// of each cache segment), from `start`. `visited` has a flag for each
    /// cache segment, all false (a segment without a flag counts as
    /// walked).
    pub fn new(m: &'a M, layout: &'a Layout, segs: &'a [u32], visited: &'a mut [bool], start: LogPos) -> Self {
        if let Some(v) = visited.get_mut(start.seg as usize) {
            *v = true;
        }
        let buf = [0; KSET_ONMEDIA_SIZE_MAX];
        Self { m, layout, segs, visited, at: start, ended: false, resumable: false, buf }
    }

    /// Where the next record is read; after the end, where the log ends.
    pub fn pos(&self) -> LogPos {
        self.at
    }

    fn n_segs(&self) -> u32 {
        self.segs.len() as u32
    }

    /// Marks cache segment `seg` walked; false if it already was.
    fn visit(&mut self, seg: u32) -> bool {
        self.visited.get_mut(seg as usize).is_some_and(|v| !core::mem::replace(v, true))
    }

    /// The next kset, or the end of the log; `None` after the end.
    pub fn step(&mut self) -> Option<LogStep<'_, M::Error>> {
        if self.ended {
            return None;
        }
        let at = self.at;
        self.ended = true;
        let Some(&dev_seg) = self.segs.get(at.seg as usize) else {
            let max = u64::from(self.n_segs()).saturating_sub(1);
            let e = Error::out_of_range(Record::Kset, "cache segment of the log", at.seg.into(), 0, max);
            return Some(LogStep::End { at, end: LogEnd::Invalid(e) });
        };
        // What the record is, without holding on to the buffer.
        let record = read_kset(self.m, self.layout, dev_seg, at.off, self.n_segs(), &mut self.buf).map(Read::of);
        let end = match record {
            Ok(Read::Keys(size)) => {
                self.ended = false;
                self.at.off += size as u32;
                let keys = <[Key]>::ref_from_bytes(&self.buf[KSET_HEADER_SIZE..size]).unwrap_or_default();
                return Some(LogStep::Keys { at, keys });
            }
            Ok(Read::Last(next)) if self.visit(next) => {
                self.ended = false;
                self.at = LogPos::new(next, 0);
                return Some(LogStep::Last { at, next });
            }
            Ok(Read::Last(next)) => LogEnd::Loop { next },
            Ok(Read::End(0)) => LogEnd::Terminator,
            Ok(Read::End(magic)) => LogEnd::Garbage { magic },
            Err(ReadError::Media { off, len, source }) => LogEnd::Media { off, len, source },
            Err(ReadError::Format(e)) if torn_shaped(&e) => match self.follows(at) {
                Follows::Torn => LogEnd::Torn(e),
                Follows::Continues(_) | Follows::Unknown => LogEnd::Damaged(e),
            },
            Err(ReadError::Format(e)) => LogEnd::Invalid(e),
        };
        self.resumable =
            matches!(end, LogEnd::Damaged(_) | LogEnd::Invalid(_) | LogEnd::Garbage { .. } | LogEnd::Media { .. });
        Some(LogStep::End { at, end })
    }

    /// After an end at damage (damaged, invalid, garbage, a read error):
    /// where the log can be picked up again, and the walk goes on from
    /// there. That is right after the damaged kset if its header still
    /// tells its size and a kset that verifies lies there; else the next
    /// kset in the same segment (ksets are 8-byte aligned) whose magic and
    /// CRC verify. After a damaged LAST kset nothing in its segment
    /// follows it: only the segment it names, if that starts with a valid
    /// kset and was not walked yet. `None`: nowhere (or the walk did not
    /// end at damage); every write logged after the damage is lost.
    pub fn resync(&mut self) -> Option<LogPos> {
        if !self.ended || !core::mem::take(&mut self.resumable) {
            return None;
        }
        let at = self.at;
        match self.follows(at) {
            // Onwards in this segment, or into a segment not walked yet.
            Follows::Continues(p) if (p.seg == at.seg && p.off > at.off) || self.visit(p.seg) => {
                return Some(self.resume(p));
            }
            Follows::Continues(_) => return None,
            _ if self.header(at).is_some_and(|h| h.is_last()) => return None,
            _ => {}
        }
        let magic = KSET_MAGIC.to_le_bytes();
        let last = CACHE_SEG_DATA_SIZE - KSET_HEADER_SIZE as u32;
        // A window of the segment in the kset buffer: [base, base + len),
        // or unreadable (then every position is tried).
        let (mut base, mut len, mut readable) = (0u32, 0u32, true);
        let mut p = at.off.saturating_add(8);
        while p <= last {
            if p + 16 > base + len {
                (base, len) = (p, (CACHE_SEG_DATA_SIZE - p).min(KSET_ONMEDIA_SIZE_MAX as u32));
                readable = self.read_data(at.seg, base, len as usize);
            }
            let i = (p - base) as usize;
            if !readable || self.buf[i + 8..i + 16] == magic {
                // The probe reuses the buffer: the window is read again after it.
                len = 0;
                if self.probe(at.seg, p) == Probe::Kset {
                    return Some(self.resume(LogPos::new(at.seg, p)));
                }
            }
            p += 8;
        }
        None
    }

    fn resume(&mut self, p: LogPos) -> LogPos {
        self.at = p;
        self.ended = false;
        p
    }

    /// Reads `len` bytes at `off` of cache segment `seg`'s data area into
    /// the buffer.
    fn read_data(&mut self, seg: u32, off: u32, len: usize) -> bool {
        let Some(&dev_seg) = self.segs.get(seg as usize) else { return false };
        let Ok(addr) = self.layout.data_range(dev_seg, off, len as u32) else { return false };
        read(self.m, addr, &mut self.buf[..len]).is_ok()
    }

    fn header(&mut self, at: LogPos) -> Option<RawHeader> {
        if !self.read_data(at.seg, at.off, KSET_HEADER_SIZE) {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(self.buf[i..i + 8].try_into().unwrap_or_default());
        let half = |i: usize| u32::from_le_bytes(self.buf[i..i + 4].try_into().unwrap_or_default());
        Some(RawHeader { crc: half(0), key_num: half(4), magic: word(8), flags: word(16) })
    }

    fn probe(&mut self, seg: u32, off: u32) -> Probe {
        let Some(&dev_seg) = self.segs.get(seg as usize) else { return Probe::Other };
        match read_kset(self.m, self.layout, dev_seg, off, self.n_segs(), &mut self.buf) {
            Ok(KsetRecord::End { magic: 0 }) => Probe::Terminator,
            Ok(KsetRecord::Keys { .. } | KsetRecord::Last { .. }) => Probe::Kset,
            _ => Probe::Other,
        }
    }

    /// Tells the newest kset torn by a crash from damage, for the kset at
    /// `at` that fails to decode (the shapes are listed on [`LogWalk`]).
    fn follows(&mut self, at: LogPos) -> Follows {
        let Some(h) = self.header(at).filter(RawHeader::is_kset) else { return Follows::Unknown };
        let n = h.key_num;
        if n == 0 && h.crc == 0 {
            return Follows::Torn;
        }
        if h.is_last() {
            return match self.probe(n, 0) {
                Probe::Terminator => Follows::Torn,
                Probe::Kset => Follows::Continues(LogPos::new(n, 0)),
                Probe::Other => Follows::Unknown,
            };
        }
        if (1..=KSET_KEYS_MAX).contains(&(n as usize)) {
            let next = at.off + kset_size(n as usize) as u32;
            match self.probe(at.seg, next) {
                Probe::Kset => return Follows::Continues(LogPos::new(at.seg, next)),
                // Not a kset that verifies at one of its own key boundaries
                // either: a segment used by the log before keeps old ksets
                // there, and a crash may leave them whole under a torn one.
                Probe::Terminator => return Follows::Torn,
                Probe::Other => {}
            }
        }
        // A LAST kset torn before its flags word.
        if n != at.seg && self.probe(n, 0) == Probe::Terminator {
            return Follows::Torn;
        }
        Follows::Unknown
    }
}

/// A record read, without the borrow of the buffer its keys are in.
enum Read {
    /// A kset with keys, of this size.
    Keys(usize),
    Last(u32),
    End(u64),
}

impl Read {
    fn of(r: KsetRecord<'_>) -> Self {
        match r {
            KsetRecord::Keys { keys } => Read::Keys(kset_size(keys.len())),
            KsetRecord::Last { next_cache_seg } => Read::Last(next_cache_seg),
            KsetRecord::End { magic } => Read::End(magic),
        }
    }
}

/// Errors a kset torn by a crash can show: a bad CRC, or a key count that
/// is not one (0 in the old terminator's zeros, or a segment number where
/// a LAST kset was torn before its flags).
fn torn_shaped(e: &Error) -> bool {
    e.record == Record::Kset
        && match e.kind {
            ErrorKind::BadCrc { .. } => true,
            ErrorKind::OutOfRange { field, .. } => field.starts_with("key_num"),
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    /// Each way a key log ends, on small logs written by hand.
    #[cfg(feature = "alloc")]
    mod log_walk {
        use alloc::string::ToString;
        use alloc::vec::Vec;
        use core::ops::Range;

        use crate::Dialect;
        use crate::kset::{Key, KeyFlags, TERMINATOR, encode_kset, encode_last};
        use crate::media::{LogEnd, LogPos, LogStep, LogWalk, ReadMedia};
        use crate::sparse::{ImageBuilder, SparseImage};

        /// A device whose reads fail over `bad`.
        struct Failing<'a> {
            img: &'a SparseImage,
            bad: Range<u64>,
        }

        impl ReadMedia for Failing<'_> {
            type Error = &'static str;

            fn size(&self) -> u64 {
                self.img.size()
            }

            fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), &'static str> {
                if off < self.bad.end && self.bad.start < off + buf.len() as u64 {
                    return Err("poisoned");
                }
                self.img.read_at(off, buf).map_err(|_| "out of bounds")
            }
        }

        type Steps = Vec<(&'static str, u32, u32)>;

        /// A cache of 4 segments whose log holds ksets A and B (one key
        /// each) and a LAST kset in segment 0, then kset C and the
        /// terminator in segment 2.
        struct Rig {
            b: ImageBuilder,
            chain: Vec<u32>,
        }

        impl Rig {
            fn new() -> Self {
                let mut b = ImageBuilder::format(1 << 30).unwrap();
                let chain = b.add_cache(0, b"/dev/b", 64 << 20, 4, false).unwrap().chain().to_vec();
                let mut r = Rig { b, chain };
                r.kset(0, 0, 0);
                r.kset(0, 64, 1);
                r.put(0, 128, &encode_last(Dialect::RfcV1, 2));
                r.kset(2, 0, 2);
                r.put(2, 64, &TERMINATOR);
                r
            }

            fn addr(&self, seg: u32, off: u32) -> u64 {
                self.b.layout().data_offset(self.chain[seg as usize]).unwrap() + u64::from(off)
            }

            fn put(&mut self, seg: u32, off: u32, bytes: &[u8]) {
                let a = self.addr(seg, off);
                self.b.image_mut().write_at(a, bytes).unwrap();
            }

            fn kset(&mut self, seg: u32, off: u32, i: u32) {
                let key = Key::new(u64::from(i) * 4096, 4096, KeyFlags::empty(), 1, i * 4096, 0);
                let mut buf = [0u8; 64];
                encode_kset(Dialect::RfcV1, &[key], &mut buf).unwrap();
                self.put(seg, off, &buf);
            }

            fn flip(&mut self, seg: u32, off: u32) {
                let mut b = [0u8; 1];
                self.b.image().read_at(self.addr(seg, off), &mut b).unwrap();
                self.put(seg, off, &[b[0] ^ 0x5a]);
            }

            /// The steps of a walk from the log's start; with `resync`, the
            /// walk is picked up again after damage as salvage does.
            fn walk_on<M: ReadMedia + ?Sized>(&self, m: &M, resync: bool) -> Steps {
                let layout = self.b.layout();
                let mut visited = [false; 4];
                let mut walk = LogWalk::new(m, &layout, &self.chain, &mut visited, LogPos::new(0, 0));
                let mut steps = Vec::new();
                loop {
                    let Some(step) = walk.step() else { break };
                    let (kind, at) = match step {
                        LogStep::Keys { at, keys } => {
                            assert_eq!(keys.len(), 1);
                            ("keys", at)
                        }
                        LogStep::Last { at, .. } => ("last", at),
                        LogStep::End { at, end } => (kind(&end), at),
                    };
                    steps.push((kind, at.seg, at.off));
                    if resync && let Some(p) = walk.resync() {
                        steps.push(("resync", p.seg, p.off));
                    }
                }
                steps
            }

            fn walk(&self) -> Steps {
                self.walk_on(self.b.image(), false)
            }

            fn salvage(&self) -> Steps {
                self.walk_on(self.b.image(), true)
            }
        }

        fn kind<E>(end: &LogEnd<E>) -> &'static str {
            match end {
                LogEnd::Terminator => "terminator",
                LogEnd::Torn(_) => "torn",
                LogEnd::Damaged(_) => "damaged",
                LogEnd::Invalid(_) => "invalid",
                LogEnd::Loop { .. } => "loop",
                LogEnd::Garbage { .. } => "garbage",
                LogEnd::Media { .. } => "media",
            }
        }

        const HEAD: [(&str, u32, u32); 3] = [("keys", 0, 0), ("keys", 0, 64), ("last", 0, 128)];

        fn with_head(rest: &[(&'static str, u32, u32)]) -> Steps {
            HEAD.iter().chain(rest).copied().collect()
        }

        #[test]
        fn a_clean_log_ends_at_its_terminator() {
            let r = Rig::new();
            assert_eq!(r.walk(), with_head(&[("keys", 2, 0), ("terminator", 2, 64)]));
            let layout = r.b.layout();
            let mut visited = [false; 4];
            let mut walk = LogWalk::new(r.b.image(), &layout, &r.chain, &mut visited, LogPos::new(0, 0));
            while walk.step().is_some() {}
            assert_eq!(walk.pos(), LogPos::new(2, 64));
            assert_eq!(walk.resync(), None, "nothing to pick up after a clean end");
            assert_eq!(LogPos::new(2, 64).to_string(), "segment 2 offset 0x40");
        }

        #[test]
        fn the_newest_kset_torn_ends_the_log() {
            // A key of the newest kset half written: its CRC fails, and
            // the terminator after it is in place.
            let mut r = Rig::new();
            r.flip(2, 24 + 9);
            assert_eq!(r.walk(), with_head(&[("torn", 2, 0)]));
            // Its first header word (the key count) not written yet.
            let mut r = Rig::new();
            r.put(2, 0, &[0; 8]);
            assert_eq!(r.walk(), with_head(&[("torn", 2, 0)]));
        }

        #[test]
        fn a_torn_last_kset_ends_the_log() {
            // Magic and flags written, the first word (CRC and next
            // segment) not: it seems to lead to segment 0, which holds
            // ksets, yet it is what a crash leaves.
            let mut r = Rig::new();
            let last = encode_last(Dialect::RfcV1, 3);
            r.put(2, 0, &[0; 8]);
            r.put(2, 8, &last[8..]);
            r.put(3, 0, &TERMINATOR);
            assert_eq!(r.walk(), with_head(&[("torn", 2, 0)]));
            // The first word and magic written, the flags not: a kset of 3
            // keys, and segment 3 starts with the terminator written before.
            let mut r = Rig::new();
            r.put(2, 0, &last[..16]);
            r.put(2, 16, &[0; 8]);
            r.put(2, 144, &[0xff; 24]);
            r.put(3, 0, &TERMINATOR);
            assert_eq!(r.walk(), with_head(&[("torn", 2, 0)]));
            // Without that terminator, it is damage.
            r.put(3, 0, &[0xff; 24]);
            assert_eq!(r.walk(), with_head(&[("damaged", 2, 0)]));
        }

        #[test]
        fn a_damaged_kset_in_the_middle_is_damage_and_the_log_resumes_after_it() {
            let mut r = Rig::new();
            r.flip(0, 24 + 9);
            assert_eq!(r.walk(), [("damaged", 0, 0)]);
            let mut rest = Steps::from([("damaged", 0, 0), ("resync", 0, 64)]);
            rest.extend(&with_head(&[("keys", 2, 0), ("terminator", 2, 64)])[1..]);
            assert_eq!(r.salvage(), rest);
        }

        #[test]
        fn old_ksets_under_a_torn_kset_do_not_make_it_damage() {
            // The newest kset, of three keys, torn by a crash over a part of
            // the segment the log used before: an old one-key kset is still
            // whole at one of its key boundaries, and the terminator after
            // it is in place. Still a torn end, so that a crash never stops
            // a cache from starting.
            let mut r = Rig::new();
            let keys: Vec<Key> =
                (0..3).map(|i| Key::new(i * 4096, 4096, KeyFlags::empty(), 1, i as u32 * 4096, 0)).collect();
            let mut buf = [0u8; 256];
            encode_kset(Dialect::RfcV1, &keys, &mut buf).unwrap();
            let size = crate::kset::kset_size(3) as u32;
            r.put(2, 0, &buf[..size as usize]);
            r.put(2, size, &TERMINATOR);
            r.kset(2, crate::kset::kset_size(1) as u32, 9);
            assert_eq!(r.walk(), with_head(&[("torn", 2, 0)]));
        }

        #[test]
        fn a_damaged_key_count_that_leads_to_a_terminator_reads_as_a_torn_end() {
            // B's key count becomes 91: its size leads to the zeros a
            // terminator has. A crash leaves the same bytes (see above), so
            // the walk ends there as at a torn kset; `pcache check` cannot
            // tell either, and salvage reads what the walk reads.
            let mut r = Rig::new();
            r.flip(0, 64 + 4);
            assert_eq!(r.walk(), [("keys", 0, 0), ("torn", 0, 64)]);
        }

        #[test]
        fn a_last_kset_back_into_the_log_is_a_loop() {
            let mut r = Rig::new();
            r.put(2, 64, &encode_last(Dialect::RfcV1, 0));
            assert_eq!(r.walk(), with_head(&[("keys", 2, 0), ("loop", 2, 64)]));
            assert_eq!(r.salvage(), r.walk(), "nothing to pick up after a loop");
        }

        #[test]
        fn no_magic_is_garbage_and_the_next_kset_is_found_by_scanning() {
            let mut r = Rig::new();
            r.flip(0, 8);
            assert_eq!(r.walk(), [("garbage", 0, 0)]);
            assert_eq!(r.salvage()[..3], [("garbage", 0, 0), ("resync", 0, 64), ("keys", 0, 64)]);
        }

        #[test]
        fn a_read_error_ends_the_walk_and_the_log_resumes_past_it() {
            let r = Rig::new();
            let m = Failing { img: r.b.image(), bad: r.addr(0, 64)..r.addr(0, 88) };
            assert_eq!(r.walk_on(&m, false), [("keys", 0, 0), ("media", 0, 64)]);
            assert_eq!(
                r.walk_on(&m, true)[..4],
                [("keys", 0, 0), ("media", 0, 64), ("resync", 0, 128), ("last", 0, 128)]
            );
        }

        #[test]
        fn a_kset_that_verifies_but_holds_wrong_values_is_invalid() {
            let mut r = Rig::new();
            r.put(0, 128, &encode_last(Dialect::RfcV1, 9));
            assert_eq!(r.walk(), [("keys", 0, 0), ("keys", 0, 64), ("invalid", 0, 128)]);
            // A key with EMPTY set: the header still tells where the next kset is.
            let mut r = Rig::new();
            let mut buf = [0u8; 64];
            encode_kset(Dialect::RfcV1, &[Key::new(0, 4096, KeyFlags::EMPTY, 1, 0, 0)], &mut buf).unwrap();
            r.put(0, 0, &buf);
            assert_eq!(r.salvage()[..3], [("invalid", 0, 0), ("resync", 0, 64), ("keys", 0, 64)]);
        }

        #[test]
        fn a_damaged_last_kset_resumes_in_the_segment_it_names_once() {
            let mut r = Rig::new();
            r.flip(0, 128);
            assert_eq!(r.walk(), [("keys", 0, 0), ("keys", 0, 64), ("damaged", 0, 128)]);
            let s = r.salvage();
            assert_eq!(s[2..], [("damaged", 0, 128), ("resync", 2, 0), ("keys", 2, 0), ("terminator", 2, 64)]);
            // Naming a segment already walked, it leads nowhere.
            let mut r = Rig::new();
            r.put(0, 128, &encode_last(Dialect::RfcV1, 0));
            r.flip(0, 128);
            assert_eq!(r.salvage(), [("keys", 0, 0), ("keys", 0, 64), ("damaged", 0, 128)]);
        }
    }
}
