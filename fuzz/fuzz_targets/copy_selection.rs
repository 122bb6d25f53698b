//! The double-copy protocol on arbitrary bytes, in both dialects:
//! `find_latest`, `find_oldest`, `next_seq`, `copy_infos` at an arbitrary
//! stride and CRC coverage, and `read_latest`/`decode_copy`/`encode_copy`
//! for every record type, dm-pcache's cache info and segment info included.
//!
//! Input: a selector (3 bytes), then the copies.
//!   byte 0 % 4 == 0: stride 16 (and the update protocol with CacheSegGen
//!   and CachePos records); 1: stride 4096 (and the protocol with one 4 KiB
//!   record type picked by byte 1: SegmentInfo, MetaSegmentInfo or
//!   BackingDevInfo in RFC v1, DmSegmentInfo or DmCacheInfo in dm-pcache);
//!   2: stride byte 1 (0..=255); 3: stride u16 le at bytes 1..3 modulo 8193
//!   (0..=8192).
//!   byte 0 bit 2: the dialect (0: RFC v1, 1: dm-pcache), whose CRC seals
//!   the copies.
//!   byte 0 bits 3..8, k: what each copy's CRC covers: k = 0, the
//!   dialect's own rule (the whole slot in RFC v1; in dm-pcache the record,
//!   at strides 16 and 4096, else the slot); otherwise the first 8 * k bytes.
//! `read_latest` of every record type runs in the chosen dialect on every
//! input, and dm-pcache's records are checked against a model of their
//! rules.
//!
//! The update invariant: writing `next_seq` into `find_oldest`'s copy makes
//! it the latest, unless both copies were valid with sequence numbers 126 or
//! more apart (the new one may then not be after the other; the protocol
//! never produces that state).
#![no_main]

use core::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use pcache_format::consts::{CACHE_GC_PERCENT_MAX, META_INDEX_MAX};
use pcache_format::crc::{crc32_reference, crc32c_reference, meta_crc, stored_crc};
use pcache_format::dm::{DM_SEG_NUM_MAX, DM_SEGMENT_TYPE_CACHE_DATA, DmCacheInfo, DmCacheMode, DmSegmentInfo};
use pcache_format::meta::{Slots, copy_bytes, copy_info, copy_infos};
use pcache_format::{
    BackingDevInfo, CachePos, CacheSegGen, CopyInfo, Dialect, ErrorKind, MetaRecord, MetaSegmentInfo, SegmentInfo,
    decode_copy, encode_copy, find_latest, find_oldest, next_seq, read_latest, seq_after,
};

fuzz_target!(|data: &[u8]| {
    let sel = data.first().copied().unwrap_or(0);
    let b1 = data.get(1).copied().unwrap_or(0);
    let b2 = data.get(2).copied().unwrap_or(0);
    let d = if sel & 4 == 0 { Dialect::RfcV1 } else { Dialect::DmPcache };
    let stride = match sel % 4 {
        0 => 16,
        1 => 4096,
        2 => usize::from(b1),
        _ => usize::from(u16::from_le_bytes([b1, b2])) % 8193,
    };
    // The 4 KiB record type of this input, for the dialect's own coverage
    // and the protocol.
    let kind = match d {
        Dialect::RfcV1 => b1 % 3,
        Dialect::DmPcache => b1 % 2,
    };
    let covered = match sel >> 3 {
        0 => match (d, stride) {
            (Dialect::RfcV1, _) => stride,
            (Dialect::DmPcache, 16) => 16,
            (Dialect::DmPcache, 4096) if kind == 0 => size_of::<DmSegmentInfo>(),
            (Dialect::DmPcache, 4096) => size_of::<DmCacheInfo>(),
            (Dialect::DmPcache, _) => stride,
        },
        k => usize::from(k) * 8,
    };
    let s = Slots::new(d, stride, covered);
    let slots = data.get(3..).unwrap_or(&[]);

    selection(slots, s);
    if (8..=8192).contains(&stride) {
        let mut buf = slots.to_vec();
        buf.resize(2 * stride, 0);
        let copy = |b: &mut [u8], seq: u8| {
            b[4] = seq;
            d.seal(b, covered);
        };
        update(&mut buf, s, copy);
    }

    // Every record type reads its two copies from the input.
    read::<SegmentInfo>(d, slots);
    read::<MetaSegmentInfo>(d, slots);
    read::<BackingDevInfo>(d, slots);
    read::<CacheSegGen>(d, slots);
    read::<CachePos>(d, slots);
    read::<DmSegmentInfo>(d, slots);
    read::<DmCacheInfo>(d, slots);
    // dm-pcache's records, as the input's first bytes make them.
    if let Some(ci) = from_prefix::<DmCacheInfo>(slots) {
        dm_cache_info(&ci);
    }
    if let Some(si) = from_prefix::<DmSegmentInfo>(slots) {
        dm_segment_info(&si);
    }
    // The update protocol with real records, for the types whose copies are
    // laid out at this stride (one 4 KiB type per input: they are slow).
    match (stride, d, kind) {
        (16, _, _) => {
            protocol::<CacheSegGen>(d, slots);
            protocol::<CachePos>(d, slots);
        }
        (4096, Dialect::RfcV1, 0) => protocol::<SegmentInfo>(d, slots),
        (4096, Dialect::RfcV1, 1) => protocol::<MetaSegmentInfo>(d, slots),
        (4096, Dialect::RfcV1, _) => protocol::<BackingDevInfo>(d, slots),
        (4096, Dialect::DmPcache, 0) => protocol::<DmSegmentInfo>(d, slots),
        (4096, Dialect::DmPcache, _) => protocol::<DmCacheInfo>(d, slots),
        _ => {}
    }
});

/// The record at the start of `bytes`, unchecked.
fn from_prefix<R: MetaRecord>(bytes: &[u8]) -> Option<R> {
    R::read_from_prefix(bytes).ok().map(|(r, _)| r)
}

/// Both copies valid and 126 or more apart: the states where the update
/// rule need not hold (the new sequence, one or, across 0, two steps on,
/// may not be after the other copy). The protocol never produces them.
fn ambiguous(infos: &[CopyInfo; 2]) -> bool {
    infos[0].valid() && infos[1].valid() && (infos[0].seq.wrapping_sub(infos[1].seq) as i8).unsigned_abs() >= 126
}

/// The selection functions agree with each other and with the rules.
fn selection(slots: &[u8], s: Slots) {
    let stride = s.stride;
    let infos = copy_infos(s, slots);
    for (i, info) in infos.iter().enumerate() {
        assert_eq!(*info, copy_info(s, slots, i));
        match copy_bytes(slots, stride, i) {
            Some(copy) => {
                assert!(stride >= 8 && (i + 1) * stride <= slots.len());
                assert_eq!(copy.len(), stride);
                assert!(info.complete);
                assert_eq!(info.seq, copy[4]);
                assert_eq!(info.stored_crc, stored_crc(copy).unwrap());
                // The dialect's CRC of the covered bytes after the CRC field,
                // by the table-driven reference implementations.
                let body = copy.get(4..s.covered.min(stride)).unwrap_or(&[]);
                let model = match s.dialect {
                    Dialect::RfcV1 => crc32_reference(body),
                    Dialect::DmPcache => crc32c_reference(body),
                };
                assert_eq!(info.computed_crc, model, "{s:?}");
                if s.dialect == Dialect::RfcV1 && s.covered == stride {
                    assert_eq!(info.computed_crc, meta_crc(copy));
                }
                assert_eq!(info.blank, copy.iter().all(|&b| b == 0));
                assert_eq!(info.valid(), info.crc_ok() && !info.blank);
            }
            None => {
                assert!(stride < 8 || (i + 1).checked_mul(stride).is_none_or(|end| end > slots.len()));
                assert_eq!(*info, CopyInfo { complete: false, stored_crc: 0, computed_crc: 0, seq: 0, blank: false });
                assert!(!info.crc_ok() && !info.valid());
            }
        }
    }
    let latest = find_latest(s, slots);
    let oldest = find_oldest(s, slots);
    let next = next_seq(s, slots);
    assert!(oldest < 2);
    // A written copy is never all zeros: sequence 0 is never used.
    assert_ne!(next, 0);
    match latest {
        Some(l) => {
            assert!(l < 2);
            assert!(infos[l].valid(), "latest copy {l} is not valid");
            assert_eq!(next, infos[l].seq.wrapping_add(1).max(1));
            let other = &infos[1 - l];
            if other.valid() {
                // Not before the other copy; ties go to copy 0.
                assert!(!seq_after(other.seq, infos[l].seq));
                if !seq_after(infos[l].seq, other.seq) {
                    assert_eq!(l, 0);
                }
            }
        }
        None => {
            assert!(!infos[0].valid() && !infos[1].valid());
            assert_eq!(next, 1);
        }
    }
    match infos.iter().position(|c| !c.valid()) {
        Some(bad) => assert_eq!(oldest, bad),
        None => {
            if latest == Some(oldest) {
                // Only when neither is after the other.
                assert!(!seq_after(infos[0].seq, infos[1].seq) && !seq_after(infos[1].seq, infos[0].seq));
            }
        }
    }
}

/// Writes `next_seq` into the oldest copy of `buf` (two whole copies) with
/// `write` and checks the new copy becomes the latest. Returns the copy
/// written.
fn update(buf: &mut [u8], s: Slots, write: impl FnOnce(&mut [u8], u8)) -> usize {
    let stride = s.stride;
    assert_eq!(buf.len(), 2 * stride);
    let before = copy_infos(s, buf);
    let target = find_oldest(s, buf);
    let seq = next_seq(s, buf);
    write(&mut buf[target * stride..(target + 1) * stride], seq);
    let after = copy_infos(s, buf);
    assert_eq!(after[1 - target], before[1 - target], "the other copy changed");
    assert!(after[target].crc_ok() && after[target].seq == seq);
    if !ambiguous(&before) {
        assert_eq!(find_latest(s, buf), Some(target), "update did not make copy {target} the latest: {before:?}");
        assert_eq!(next_seq(s, buf), seq.wrapping_add(1).max(1));
        // The next write goes to the other copy.
        assert_eq!(find_oldest(s, buf), 1 - target);
    }
    target
}

/// `read_latest` in dialect `d` agrees with `find_latest` and `decode_copy`.
fn read<R: MetaRecord + Debug + PartialEq>(d: Dialect, slots: &[u8]) {
    let n = R::COPY_SIZE;
    let s = Slots::of::<R>(d);
    // RFC v1 covers the slot, dm-pcache the record.
    let covered = if d == Dialect::RfcV1 { n } else { size_of::<R>() };
    assert_eq!(s, Slots::new(d, n, covered));
    let infos = copy_infos(s, slots);
    let latest = find_latest(s, slots);
    match read_latest::<R>(d, slots) {
        Ok(l) => {
            assert_eq!(Some(usize::from(l.copy)), latest);
            assert!(l.record.check().is_ok());
            assert_eq!(l.record.header().seq, infos[usize::from(l.copy)].seq);
            let copy = copy_bytes(slots, n, usize::from(l.copy)).unwrap();
            assert_eq!(decode_copy::<R>(d, copy), Ok(l.record));
        }
        Err(e) => {
            let _ = e.to_string();
            if let Some(l) = latest {
                // The latest copy is valid but fails the record's checks.
                assert_eq!(e.copy, Some(l as u8), "{e}");
                let copy = copy_bytes(slots, n, l).unwrap();
                assert!(decode_copy::<R>(d, copy).is_err());
            } else if slots.len() < META_INDEX_MAX * n {
                assert!(matches!(e.kind, ErrorKind::Truncated { .. }), "{e}");
            } else if infos[0].blank && infos[1].blank {
                assert_eq!(e.kind, ErrorKind::NeverWritten);
            } else {
                let never_written = [infos[0].blank, infos[1].blank];
                assert!(matches!(e.kind, ErrorKind::NoValidCopy { never_written: w, .. } if w == never_written), "{e}");
            }
        }
    }
}

/// The protocol with real records: re-encode the oldest copy's record (or
/// a zeroed one) with the next sequence number.
fn protocol<R: MetaRecord + Debug + PartialEq>(d: Dialect, slots: &[u8]) {
    let n = R::COPY_SIZE;
    let s = Slots::of::<R>(d);
    let mut buf = slots.to_vec();
    buf.resize(2 * n, 0);
    let was_ambiguous = ambiguous(&copy_infos(s, &buf));
    let mut encoded = None;
    let target = update(&mut buf, s, |copy, seq| {
        let record = decode_copy::<R>(d, copy).unwrap_or_else(|_| R::new_zeroed());
        encode_copy(d, &record, seq, copy).expect("a whole copy");
        encoded = Some(record);
    });
    let record = encoded.unwrap();
    let copy = &buf[target * n..(target + 1) * n];
    match decode_copy::<R>(d, copy) {
        Ok(r) => {
            assert!(record.check().is_ok());
            // Only the header's CRC and sequence differ.
            assert_eq!(r.as_bytes()[5..], record.as_bytes()[5..]);
            assert_eq!(r.header().crc.get(), stored_crc(copy).unwrap());
            // The copy is the record, then zeros.
            assert_eq!(copy[..size_of::<R>()], *r.as_bytes());
            assert!(copy[size_of::<R>()..].iter().all(|&b| b == 0));
        }
        Err(e) => assert!(record.check().is_err(), "{e}"),
    }
    // Sealed in one dialect, the copy is damage to the other, unless the
    // CRCs collide: then it reads as the same record.
    let other = if d == Dialect::RfcV1 { Dialect::DmPcache } else { Dialect::RfcV1 };
    match decode_copy::<R>(other, copy) {
        Err(e) if matches!(e.kind, ErrorKind::BadCrc { .. }) => {}
        other_result => assert_eq!(other_result, decode_copy::<R>(d, copy)),
    }
    if !was_ambiguous {
        match read_latest::<R>(d, &buf) {
            Ok(l) => assert_eq!(usize::from(l.copy), target),
            Err(e) => assert!(record.check().is_err() && e.copy == Some(target as u8), "{e}"),
        }
    }
}

/// dm-pcache's cache info: `check` accepts exactly what the kernel loads,
/// and the accessors read the bits they name.
fn dm_cache_info(ci: &DmCacheInfo) {
    let flags = ci.flags.get();
    let (mode, gc, n_segs) = (flags >> 2 & 0xf, flags >> 6 & 0x7f, ci.n_segs.get());
    let valid = flags & !0x1fff == 0
        && mode == 0
        && gc <= u32::from(CACHE_GC_PERCENT_MAX)
        && (1..=DM_SEG_NUM_MAX).contains(&n_segs);
    let checked = ci.check();
    assert_eq!(checked.is_ok(), valid, "{ci:?}: {checked:?}");
    if let Err(e) = checked {
        let _ = e.to_string();
    }
    assert_eq!((ci.data_crc(), ci.init_done(), ci.gc_percent()), (flags & 1 != 0, flags & 2 != 0, gc));
    let names = [DmCacheMode::Writeback, DmCacheMode::Writethrough, DmCacheMode::Writearound, DmCacheMode::Writeonly];
    assert_eq!(ci.mode(), names.get(mode as usize).copied());
    if let Some(m) = ci.mode() {
        let _ = m.name();
    }
    // Replacing the gc percent (7 bits) touches nothing else.
    let percent = (n_segs as u8) & 0x7f;
    let replaced = ci.with_gc_percent(percent);
    assert_eq!(replaced.gc_percent(), u32::from(percent));
    assert_eq!(replaced.flags.get() & !(0x7f << 6), flags & !(0x7f << 6));
    assert_eq!((replaced.header, replaced.seg_id, replaced.n_segs), (ci.header, ci.seg_id, ci.n_segs));
    // A new cache's record is valid exactly when its size and gc percent are.
    let fresh = DmCacheInfo::new(n_segs, percent, flags & 1 != 0);
    let fresh_valid = (1..=DM_SEG_NUM_MAX).contains(&n_segs) && u16::from(percent) <= CACHE_GC_PERCENT_MAX;
    assert_eq!(fresh.check().is_ok(), fresh_valid, "{fresh:?}");
    assert!(fresh.init_done() && fresh.mode() == Some(DmCacheMode::Writeback));
    assert_eq!(
        (fresh.data_crc(), fresh.gc_percent(), fresh.n_segs.get()),
        (flags & 1 != 0, u32::from(percent), n_segs)
    );
}

/// dm-pcache's segment info: `check` accepts the data type and the
/// HAS_NEXT flag only, and `next` is the link when HAS_NEXT says so.
fn dm_segment_info(si: &DmSegmentInfo) {
    let flags = si.flags.get();
    let valid = flags & !0x1f == 0 && flags >> 1 & 0xf == DM_SEGMENT_TYPE_CACHE_DATA;
    let checked = si.check();
    assert_eq!(checked.is_ok(), valid, "{si:?}: {checked:?}");
    if let Err(e) = checked {
        let _ = e.to_string();
    }
    assert_eq!(si.seg_type(), flags >> 1 & 0xf);
    assert_eq!(si.next(), (flags & 1 != 0).then(|| si.next_seg.get()));
    let next = si.next_seg.get();
    for link in [None, Some(next)] {
        let made = DmSegmentInfo::data(link);
        assert!(made.check().is_ok());
        assert_eq!(made.next(), link);
        assert_eq!(made.seg_type(), DM_SEGMENT_TYPE_CACHE_DATA);
    }
}
