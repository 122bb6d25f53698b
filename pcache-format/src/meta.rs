//! The metadata header and the double-copy protocol (spec §2.3, §2.5).
//!
//! Every mutable metadata record is kept twice, at a fixed stride: 4 KiB for
//! segment infos and backing-table entries, 16 bytes for generation records
//! and tails. Each copy opens with a [`MetaHeader`] whose `crc` covers every
//! byte of the copy after the CRC field and whose `seq` orders the copies.
//! A writer overwrites the *oldest* copy with the next sequence number, so a
//! torn write can only damage the copy that was not current.
//!
//! The selection rules below are those of the RFC, exactly:
//!
//! * [`seq_after`]: `a` is after `b` when `(a - b) as i8 > 0` (u8 wrap).
//!   (The spec's example "5 is not after 200" is wrong: 5 is 61 steps
//!   after 200; the rule itself is what the RFC code does.)
//! * [`find_latest`]: copies with a bad CRC are skipped; the first valid copy
//!   is kept and replaced only by a copy strictly after it (ties go to copy 0).
//! * [`find_oldest`]: the first copy with a bad CRC is the oldest; otherwise
//!   copy 0 unless copy 1 is strictly older (ties go to copy 0).
//! * [`next_seq`]: the latest valid sequence plus one, or 1 if no copy is
//!   valid; 0 is skipped (255 is followed by 1).
//!
//! One rule is ours, not the RFC's: a copy whose bytes are all zero was
//! **never written**, and is not a valid copy although its CRC (seed 0)
//! matches. Writers never use sequence 0, so no written copy is all zeros.
//! Without this rule a record created with one copy reads back as a zeroed
//! record once that copy is damaged — a backing entry as *free*, handing its
//! cache's segments to the next cache — and a copy that was never written
//! can even win over a real one (sequence 0 is "after" 129..=255). A pair
//! with one damaged copy and one never-written copy is damage
//! ([`ErrorKind::NoValidCopy`]); two never-written copies are
//! [`ErrorKind::NeverWritten`].

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::consts::META_INDEX_MAX;
use crate::crc::{is_zero, stored_crc};
use crate::dialect::Dialect;
use crate::error::{Error, ErrorKind, Record};

/// Header of every double-buffered record (8 bytes).
///
/// ```text
///  0        4     5         6      8
///  +--------+-----+---------+------+
///  | crc    | seq | version | res  |
///  | le32   | u8  | u8 (0)  | le16 |
///  +--------+-----+---------+------+
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct MetaHeader {
    /// CRC of the copy, every byte after this field.
    pub crc: U32,
    /// Sequence number of this copy.
    pub seq: u8,
    /// Never set by the RFC; written as 0.
    pub version: u8,
    /// Reserved, 0.
    pub res: U16,
}

static_assertions::const_assert_eq!(core::mem::size_of::<MetaHeader>(), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(MetaHeader, seq), 4);
static_assertions::const_assert_eq!(core::mem::offset_of!(MetaHeader, version), 5);
static_assertions::const_assert_eq!(core::mem::offset_of!(MetaHeader, res), 6);

/// `true` if sequence number `a` is after `b`: `a` lies 1 to 127 steps
/// ahead of `b`, counting with u8 wrap-around. So 1 is after 255, 5 is after
/// 200 (61 steps ahead), and 5 is not after 100 (95 steps behind).
///
/// ```
/// use pcache_format::seq_after;
/// assert!(seq_after(1, 255));
/// assert!(seq_after(5, 200));
/// assert!(!seq_after(5, 100));
/// assert!(!seq_after(7, 7));
/// assert!(!seq_after(128, 0) && !seq_after(0, 128));
/// ```
pub const fn seq_after(a: u8, b: u8) -> bool {
    (a.wrapping_sub(b) as i8) > 0
}

/// What one copy of a double-buffered record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyInfo {
    /// The copy lies wholly inside the bytes given (and the stride can hold a header).
    pub complete: bool,
    /// CRC stored in the copy (0 if incomplete).
    pub stored_crc: u32,
    /// CRC computed over the copy (0 if incomplete).
    pub computed_crc: u32,
    /// Sequence number stored in the copy (0 if incomplete).
    pub seq: u8,
    /// Every byte of the copy is zero: it was never written.
    pub blank: bool,
}

impl CopyInfo {
    /// A copy that does not lie wholly inside the bytes read (or was not
    /// read at all).
    pub const ABSENT: Self = Self { complete: false, stored_crc: 0, computed_crc: 0, seq: 0, blank: false };

    /// The copy is complete and its CRC matches (a never-written copy's
    /// does too: see [`CopyInfo::valid`]).
    pub const fn crc_ok(&self) -> bool {
        self.complete && self.stored_crc == self.computed_crc
    }

    /// The copy was written and its CRC matches: it may be selected.
    pub const fn valid(&self) -> bool {
        self.crc_ok() && !self.blank
    }
}

/// Where the two copies of a record lie and what each copy's CRC covers:
/// the copies are `stride` bytes apart, and each CRC covers bytes
/// `[4, covered)` of its copy, computed by `dialect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// The dialect whose CRC seals the copies.
    pub dialect: Dialect,
    /// Distance between the copies, and the size of each.
    pub stride: usize,
    /// Bytes of each copy (from its start) that its CRC covers.
    pub covered: usize,
}

impl Slots {
    /// Copies `stride` apart whose CRCs cover `covered` bytes.
    pub const fn new(dialect: Dialect, stride: usize, covered: usize) -> Self {
        Self { dialect, stride, covered }
    }

    /// The copies of record `R` in `dialect`: [`MetaRecord::COPY_SIZE`]
    /// apart, each CRC covering the whole slot (RFC) or the record (dm-pcache).
    pub const fn of<R: MetaRecord>(dialect: Dialect) -> Self {
        Self { dialect, stride: R::COPY_SIZE, covered: dialect.covered(R::COPY_SIZE, core::mem::size_of::<R>()) }
    }
}

/// The bytes of copy `index` in `copies`, if it lies wholly inside them.
pub fn copy_bytes(copies: &[u8], stride: usize, index: usize) -> Option<&[u8]> {
    if stride < core::mem::size_of::<MetaHeader>() {
        return None;
    }
    let start = index.checked_mul(stride)?;
    copies.get(start..start.checked_add(stride)?)
}

/// Reads copy `index` of the copies laid out as `slots` say in `copies`.
pub fn copy_info(slots: Slots, copies: &[u8], index: usize) -> CopyInfo {
    match copy_bytes(copies, slots.stride, index) {
        Some(copy) => {
            // Most copies of a backing table were never written: one pass
            // over their zeros, whose RFC CRC is 0 (seed 0, no final xor).
            let blank = is_zero(copy);
            let computed_crc = match slots.dialect {
                Dialect::RfcV1 if blank => 0,
                d => d.record_crc(copy, slots.covered),
            };
            CopyInfo { complete: true, stored_crc: stored_crc(copy).unwrap_or(0), computed_crc, seq: copy[4], blank }
        }
        None => CopyInfo::ABSENT,
    }
}

/// Both copies.
pub fn copy_infos(slots: Slots, copies: &[u8]) -> [CopyInfo; META_INDEX_MAX] {
    [copy_info(slots, copies, 0), copy_info(slots, copies, 1)]
}

/// Index of the latest valid copy (written, CRC matching), or `None` if
/// neither is valid.
pub fn find_latest(slots: Slots, copies: &[u8]) -> Option<usize> {
    latest_of(&copy_infos(slots, copies))
}

fn latest_of(infos: &[CopyInfo; META_INDEX_MAX]) -> Option<usize> {
    let mut latest: Option<usize> = None;
    for (i, info) in infos.iter().enumerate() {
        if !info.valid() {
            continue;
        }
        match latest {
            Some(l) if !seq_after(info.seq, infos[l].seq) => {}
            _ => latest = Some(i),
        }
    }
    latest
}

/// Index of the copy a writer overwrites: the first copy that is not valid
/// (bad CRC or never written), otherwise the older one (ties go to copy 0).
pub fn find_oldest(slots: Slots, copies: &[u8]) -> usize {
    let infos = copy_infos(slots, copies);
    let mut oldest: Option<usize> = None;
    for (i, info) in infos.iter().enumerate() {
        if !info.valid() {
            return i;
        }
        match oldest {
            Some(o) if !seq_after(infos[o].seq, info.seq) => {}
            _ => oldest = Some(i),
        }
    }
    oldest.unwrap_or(0)
}

/// Sequence number for the next write: the latest valid sequence plus one
/// (mod 256, skipping 0), or 1 if no copy is valid. Never 0, so that no
/// written copy is all zeros.
pub fn next_seq(slots: Slots, copies: &[u8]) -> u8 {
    let infos = copy_infos(slots, copies);
    match latest_of(&infos) {
        Some(l) => match infos[l].seq.wrapping_add(1) {
            0 => 1,
            s => s,
        },
        None => 1,
    }
}

/// A double-buffered record type.
///
/// `COPY_SIZE` is the stride between the two copies: 4096 for segment
/// infos, backing-table entries and dm-pcache's cache info, 16 for
/// generation records and tails. What each copy's CRC covers depends on the
/// dialect ([`Slots::of`]).
pub trait MetaRecord: FromBytes + IntoBytes + Immutable + KnownLayout + Copy {
    /// Which record this is, for errors.
    const RECORD: Record;
    /// Size of one copy, and the stride between copies.
    const COPY_SIZE: usize;
    /// The header.
    fn header(&self) -> &MetaHeader;
    /// The header, to set its sequence number and CRC.
    fn header_mut(&mut self) -> &mut MetaHeader;
    /// Checks that need nothing but the record itself: known flags, known
    /// state and type values, lengths within their limits.
    fn check(&self) -> Result<(), Error>;
}

/// The record found in one copy, with where it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latest<R> {
    /// Which copy (0 or 1).
    pub copy: u8,
    /// The record.
    pub record: R,
}

/// Encodes `record` as one whole copy with sequence `seq`: the record's
/// bytes, zeros up to `R::COPY_SIZE`, and the dialect's CRC.
///
/// `out` must be exactly `R::COPY_SIZE` bytes long.
pub fn encode_copy<R: MetaRecord>(dialect: Dialect, record: &R, seq: u8, out: &mut [u8]) -> Result<(), Error> {
    let size = core::mem::size_of::<R>();
    if out.len() != R::COPY_SIZE || size > R::COPY_SIZE {
        return Err(Error::truncated(R::RECORD, R::COPY_SIZE, out.len()));
    }
    let mut rec = *record;
    let header = rec.header_mut();
    header.seq = seq;
    header.crc = U32::new(0);
    out[..size].copy_from_slice(rec.as_bytes());
    out[size..].fill(0);
    dialect.seal(out, Slots::of::<R>(dialect).covered);
    Ok(())
}

/// Decodes one copy: its CRC, then [`MetaRecord::check`].
pub fn decode_copy<R: MetaRecord>(dialect: Dialect, copy: &[u8]) -> Result<R, Error> {
    if copy.len() < R::COPY_SIZE {
        return Err(Error::truncated(R::RECORD, R::COPY_SIZE, copy.len()));
    }
    let copy = &copy[..R::COPY_SIZE];
    let stored = stored_crc(copy).unwrap_or(0);
    let computed = dialect.record_crc(copy, Slots::of::<R>(dialect).covered);
    if stored != computed {
        return Err(Error::new(R::RECORD, ErrorKind::BadCrc { stored, computed }));
    }
    decode_checked(copy)
}

/// Decodes a copy whose CRC is known to match: [`MetaRecord::check`] only.
fn decode_checked<R: MetaRecord>(copy: &[u8]) -> Result<R, Error> {
    let (record, _) =
        R::read_from_prefix(copy).map_err(|_| Error::truncated(R::RECORD, core::mem::size_of::<R>(), copy.len()))?;
    record.check()?;
    Ok(record)
}

/// Selects the latest copy by the rules of [`find_latest`] and decodes it.
///
/// Errors with [`ErrorKind::NeverWritten`] if both copies are all zeros,
/// with [`ErrorKind::NoValidCopy`] if neither copy is valid otherwise; if the
/// latest copy fails [`MetaRecord::check`], the error names that copy (the
/// other copy is not used: it is older).
pub fn read_latest<R: MetaRecord>(dialect: Dialect, copies: &[u8]) -> Result<Latest<R>, Error> {
    latest_of_pair(copies, &copy_infos(Slots::of::<R>(dialect), copies))
}

/// [`read_latest`] of `copies` whose [`copy_infos`] are `infos`: each
/// copy's CRC is computed once, for both.
pub fn latest_of_pair<R: MetaRecord>(copies: &[u8], infos: &[CopyInfo; META_INDEX_MAX]) -> Result<Latest<R>, Error> {
    let Some(index) = latest_of(infos) else {
        let crcs = [(infos[0].stored_crc, infos[0].computed_crc), (infos[1].stored_crc, infos[1].computed_crc)];
        if copies.len() < R::COPY_SIZE * META_INDEX_MAX {
            return Err(Error::truncated(R::RECORD, R::COPY_SIZE * META_INDEX_MAX, copies.len()));
        }
        if infos[0].blank && infos[1].blank {
            return Err(Error::new(R::RECORD, ErrorKind::NeverWritten));
        }
        let never_written = [infos[0].blank, infos[1].blank];
        return Err(Error::new(R::RECORD, ErrorKind::NoValidCopy { crcs, never_written }));
    };
    // A valid copy is whole and its CRC matched.
    let copy = copy_bytes(copies, R::COPY_SIZE, index).unwrap_or(&[]);
    let record = decode_checked::<R>(copy).map_err(|e| e.in_copy(index as u8))?;
    Ok(Latest { copy: index as u8, record })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S16: Slots = Slots::new(Dialect::RfcV1, 16, 16);

    fn seal(copy: &mut [u8]) {
        Dialect::RfcV1.seal(copy, copy.len());
    }

    /// Two 16-byte copies with the given sequence numbers and validity.
    fn pair(c0: Option<u8>, c1: Option<u8>) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, c) in [c0, c1].into_iter().enumerate() {
            let copy = &mut b[i * 16..(i + 1) * 16];
            copy[4] = c.unwrap_or(0x5a);
            copy[8] = 0xee; // non-zero payload so that a bad CRC is really bad
            seal(copy);
            if c.is_none() {
                copy[0] ^= 1;
            }
        }
        b
    }

    #[test]
    fn latest_prefers_strictly_after_and_ties_go_to_copy_0() {
        assert_eq!(find_latest(S16, &pair(Some(1), Some(2))), Some(1));
        assert_eq!(find_latest(S16, &pair(Some(2), Some(1))), Some(0));
        assert_eq!(find_latest(S16, &pair(Some(7), Some(7))), Some(0));
        assert_eq!(find_latest(S16, &pair(Some(255), Some(0))), Some(1));
        assert_eq!(find_latest(S16, &pair(Some(0), Some(255))), Some(0));
        assert_eq!(find_latest(S16, &pair(None, Some(3))), Some(1));
        assert_eq!(find_latest(S16, &pair(Some(3), None)), Some(0));
        assert_eq!(find_latest(S16, &pair(None, None)), None);
    }

    #[test]
    fn oldest_is_first_bad_copy_then_strictly_older() {
        assert_eq!(find_oldest(S16, &pair(None, None)), 0);
        assert_eq!(find_oldest(S16, &pair(Some(1), None)), 1);
        assert_eq!(find_oldest(S16, &pair(None, Some(1))), 0);
        assert_eq!(find_oldest(S16, &pair(Some(1), Some(2))), 0);
        assert_eq!(find_oldest(S16, &pair(Some(2), Some(1))), 1);
        assert_eq!(find_oldest(S16, &pair(Some(9), Some(9))), 0);
        assert_eq!(find_oldest(S16, &pair(Some(0), Some(255))), 1);
    }

    #[test]
    fn next_seq_continues_from_media() {
        assert_eq!(next_seq(S16, &pair(None, None)), 1);
        assert_eq!(next_seq(S16, &pair(Some(41), Some(40))), 42);
        assert_eq!(next_seq(S16, &pair(Some(255), None)), 1);
        assert_eq!(next_seq(S16, &pair(Some(254), None)), 255);
        // All-zero copies were never written: not valid.
        assert_eq!(next_seq(S16, &[0u8; 32]), 1);
    }

    #[test]
    fn never_written_copies_are_not_valid() {
        let mut b = pair(Some(200), Some(9));
        // Without the rule, a zeroed copy 1 (seq 0) would win over seq 200.
        b[16..].fill(0);
        assert_eq!(find_latest(S16, &b), Some(0));
        assert_eq!(find_oldest(S16, &b), 1);
        assert_eq!(next_seq(S16, &b), 201);
        let infos = copy_infos(S16, &b);
        assert!(infos[1].blank && infos[1].crc_ok() && !infos[1].valid());
        // A damaged copy beside a never-written one is damage, not "free".
        let mut d = [0u8; 32];
        d[..16].copy_from_slice(&pair(Some(3), None)[..16]);
        d[0] ^= 0x40;
        let e = read_latest::<crate::CachePos>(Dialect::RfcV1, &d).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::NoValidCopy { never_written: [false, true], .. }), "{e}");
        // Two never-written copies are just that.
        let e = read_latest::<crate::CachePos>(Dialect::RfcV1, &[0u8; 32]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NeverWritten);
        // A record written with next_seq is never all zeros, even at the wrap.
        let mut w = [0u8; 32];
        w[..16].copy_from_slice(&pair(Some(255), None)[..16]);
        let seq = next_seq(S16, &w);
        assert_eq!(seq, 1);
        let t = find_oldest(S16, &w);
        encode_copy(Dialect::RfcV1, &crate::CachePos::new(0, 0), seq, &mut w[t * 16..t * 16 + 16]).unwrap();
        assert!(copy_infos(S16, &w)[t].valid());
        assert_eq!(find_latest(S16, &w), Some(t));
    }

    #[test]
    fn short_input_and_tiny_stride_do_not_panic() {
        assert_eq!(find_latest(S16, &[]), None);
        assert_eq!(find_latest(S16, &[0u8; 31]), None);
        assert_eq!(find_oldest(S16, &[0u8; 31]), 0);
        assert_eq!(find_latest(Slots::new(Dialect::RfcV1, 4, 4), &[0u8; 32]), None);
        assert_eq!(find_oldest(Slots::new(Dialect::RfcV1, 0, 0), &[0u8; 32]), 0);
        assert_eq!(next_seq(Slots::new(Dialect::RfcV1, usize::MAX, usize::MAX), &[0u8; 8]), 1);
        assert!(!copy_info(Slots::new(Dialect::RfcV1, usize::MAX, usize::MAX), &[0u8; 32], 1).complete);
    }

    proptest! {
        #[test]
        fn seq_after_is_antisymmetric(a: u8, b: u8) {
            prop_assert!(!(seq_after(a, b) && seq_after(b, a)));
            if a != b && a.wrapping_sub(b) != 128 {
                prop_assert!(seq_after(a, b) || seq_after(b, a));
            }
        }

        #[test]
        fn seq_after_window(b: u8, d in 1u8..=127) {
            prop_assert!(seq_after(b.wrapping_add(d), b));
            prop_assert!(!seq_after(b.wrapping_sub(d), b));
            prop_assert!(!seq_after(b.wrapping_add(128), b));
            prop_assert!(!seq_after(b, b));
        }

        /// Selection against a plain model of the rules.
        #[test]
        fn selection_matches_model(c0: Option<u8>, c1: Option<u8>) {
            let b = pair(c0, c1);
            let model_latest = match (c0, c1) {
                (None, None) => None,
                (Some(_), None) => Some(0),
                (None, Some(_)) => Some(1),
                (Some(s0), Some(s1)) => Some(if (s1.wrapping_sub(s0) as i8) > 0 { 1 } else { 0 }),
            };
            let model_oldest = match (c0, c1) {
                (None, _) => 0,
                (Some(_), None) => 1,
                (Some(s0), Some(s1)) => if (s0.wrapping_sub(s1) as i8) > 0 { 1 } else { 0 },
            };
            prop_assert_eq!(find_latest(S16, &b), model_latest);
            prop_assert_eq!(find_oldest(S16, &b), model_oldest);
            let model_next = model_latest.map(|i| [c0, c1][i].unwrap().wrapping_add(1)).unwrap_or(1).max(1);
            prop_assert_eq!(next_seq(S16, &b), model_next);
        }

        /// Writing `next_seq` into the oldest copy makes that copy the latest,
        /// whatever the pair held before, except two valid copies 126 or
        /// more apart: the new sequence (one or, across 0, two steps on) may
        /// then not be after the other, a state the protocol itself never
        /// produces (its copies differ by one or two).
        #[test]
        fn update_protocol_makes_new_copy_latest(c0: Option<u8>, c1: Option<u8>) {
            if let (Some(a), Some(b)) = (c0, c1) {
                prop_assume!((a.wrapping_sub(b) as i8).unsigned_abs() < 126);
            }
            let mut b = pair(c0, c1);
            let seq = next_seq(S16, &b);
            let target = find_oldest(S16, &b);
            let copy = &mut b[target * 16..(target + 1) * 16];
            copy.fill(0);
            copy[4] = seq;
            copy[8] = 0x77;
            seal(copy);
            prop_assert_eq!(find_latest(S16, &b), Some(target));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..100), stride in 0usize..64) {
            let latest = find_latest(Slots::new(Dialect::RfcV1, stride, stride), &data);
            let oldest = find_oldest(Slots::new(Dialect::RfcV1, stride, stride), &data);
            let _ = next_seq(Slots::new(Dialect::RfcV1, stride, stride), &data);
            prop_assert!(latest.is_none_or(|l| l < 2));
            prop_assert!(oldest < 2);
        }
    }
}
