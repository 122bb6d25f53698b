//! The double-copy protocol on arbitrary bytes: `find_latest`,
//! `find_oldest`, `next_seq`, `copy_infos` at an arbitrary stride, and
//! `read_latest`/`decode_copy`/`encode_copy` for every record type.
//!
//! Input: a stride selector (3 bytes), then the copies.
//!   byte 0 % 4 == 0: stride 16 (and the update protocol with CacheSegGen
//!   and CachePos records); 1: stride 4096 (and the protocol with
//!   SegmentInfo, MetaSegmentInfo or BackingDevInfo records for byte 1 % 3
//!   = 0, 1, 2); 2: stride byte 1 (0..=255); 3: stride u16 le at bytes 1..3
//!   modulo 8193 (0..=8192). `read_latest` of every record type runs on
//!   every input.
//!
//! The update invariant: writing `next_seq` into `find_oldest`'s copy makes
//! it the latest, unless both copies were valid with sequence numbers
//! exactly 128 apart (neither is after the other; the protocol never
//! produces that state).
#![no_main]

use core::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use pcache_format::crc::{meta_crc, seal, stored_crc};
use pcache_format::meta::{Slots, copy_bytes, copy_info, copy_infos};
use pcache_format::{
    BackingDevInfo, CachePos, CacheSegGen, CopyInfo, Dialect, MetaRecord, MetaSegmentInfo, SegmentInfo, decode_copy,
    encode_copy, find_latest, find_oldest, next_seq, read_latest, seq_after,
};

fuzz_target!(|data: &[u8]| {
    let sel = data.first().copied().unwrap_or(0);
    let b1 = data.get(1).copied().unwrap_or(0);
    let b2 = data.get(2).copied().unwrap_or(0);
    let stride = match sel % 4 {
        0 => 16,
        1 => 4096,
        2 => usize::from(b1),
        _ => usize::from(u16::from_le_bytes([b1, b2])) % 8193,
    };
    let slots = data.get(3..).unwrap_or(&[]);

    selection(slots, Slots::new(Dialect::RfcV1, stride, stride));
    if (8..=8192).contains(&stride) {
        let mut buf = slots.to_vec();
        buf.resize(2 * stride, 0);
        let copy = |b: &mut [u8], seq: u8| {
            b[4] = seq;
            seal(b);
        };
        update(&mut buf, Slots::new(Dialect::RfcV1, stride, stride), copy);
    }

    // Every record type reads its two copies from the input.
    read::<SegmentInfo>(slots);
    read::<MetaSegmentInfo>(slots);
    read::<BackingDevInfo>(slots);
    read::<CacheSegGen>(slots);
    read::<CachePos>(slots);
    // The update protocol with real records, for the types whose copies are
    // laid out at this stride (one 4 KiB type per input: they are slow).
    match (stride, b1 % 3) {
        (16, _) => {
            protocol::<CacheSegGen>(slots);
            protocol::<CachePos>(slots);
        }
        (4096, 0) => protocol::<SegmentInfo>(slots),
        (4096, 1) => protocol::<MetaSegmentInfo>(slots),
        (4096, _) => protocol::<BackingDevInfo>(slots),
        _ => {}
    }
});

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
                assert_eq!(info.computed_crc, meta_crc(copy));
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

/// `read_latest` agrees with `find_latest` and `decode_copy`.
fn read<R: MetaRecord + Debug + PartialEq>(slots: &[u8]) {
    let n = R::COPY_SIZE;
    let s = Slots::of::<R>(Dialect::RfcV1);
    let infos = copy_infos(s, slots);
    let latest = find_latest(s, slots);
    match read_latest::<R>(Dialect::RfcV1, slots) {
        Ok(l) => {
            assert_eq!(Some(usize::from(l.copy)), latest);
            assert!(l.record.check().is_ok());
            assert_eq!(l.record.header().seq, infos[usize::from(l.copy)].seq);
            let copy = copy_bytes(slots, n, usize::from(l.copy)).unwrap();
            assert_eq!(decode_copy::<R>(Dialect::RfcV1, copy), Ok(l.record));
        }
        Err(e) => {
            let _ = e.to_string();
            if let Some(l) = latest {
                // The latest copy is valid but fails the record's checks.
                assert_eq!(e.copy, Some(l as u8), "{e}");
                let copy = copy_bytes(slots, n, l).unwrap();
                assert!(decode_copy::<R>(Dialect::RfcV1, copy).is_err());
            }
        }
    }
}

/// The protocol with real records: re-encode the oldest copy's record (or
/// a zeroed one) with the next sequence number.
fn protocol<R: MetaRecord + Debug + PartialEq>(slots: &[u8]) {
    let n = R::COPY_SIZE;
    let s = Slots::of::<R>(Dialect::RfcV1);
    let mut buf = slots.to_vec();
    buf.resize(2 * n, 0);
    let was_ambiguous = ambiguous(&copy_infos(s, &buf));
    let mut encoded = None;
    let target = update(&mut buf, s, |copy, seq| {
        let record = decode_copy::<R>(Dialect::RfcV1, copy).unwrap_or_else(|_| R::new_zeroed());
        encode_copy(Dialect::RfcV1, &record, seq, copy).expect("a whole copy");
        encoded = Some(record);
    });
    let record = encoded.unwrap();
    let copy = &buf[target * n..(target + 1) * n];
    match decode_copy::<R>(Dialect::RfcV1, copy) {
        Ok(r) => {
            assert!(record.check().is_ok());
            // Only the header's CRC and sequence differ.
            assert_eq!(r.as_bytes()[5..], record.as_bytes()[5..]);
            assert_eq!(r.header().crc.get(), stored_crc(copy).unwrap());
        }
        Err(e) => assert!(record.check().is_err(), "{e}"),
    }
    if !was_ambiguous {
        match read_latest::<R>(Dialect::RfcV1, &buf) {
            Ok(l) => assert_eq!(usize::from(l.copy), target),
            Err(e) => assert!(record.check().is_err() && e.copy == Some(target as u8), "{e}"),
        }
    }
}
