//! `decode_kset` on raw bytes, and `Key::check`/`check_in` on arbitrary keys.
//!
//! Invariants: a decoded kset re-encodes to exactly the bytes it came from;
//! every decoded key passes `Key::check`; `Key::check` and `check_in` accept
//! exactly the keys the spec allows (a plain model of the rules below);
//! ksets of arbitrary keys round-trip, and a kset with a bad key is refused
//! naming the first bad key.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use pcache_format::consts::{
    CACHE_SEG_DATA_SIZE, CACHE_SUBTREE_SIZE, KEY_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC,
};
use pcache_format::{
    Dialect, ErrorKind, Key, KeyFlags, KsetRecord, Record, decode_kset, encode_kset, encode_last, kset_size,
};

const D: Dialect = Dialect::RfcV1;

fuzz_target!(|data: &[u8]| {
    raw(data);

    let mut u = Unstructured::new(data);
    let Ok(n_segs) = u32::arbitrary(&mut u) else { return };
    let Ok(dev_size) = u64::arbitrary(&mut u) else { return };
    let mut keys = Vec::new();
    while keys.len() <= KSET_KEYS_MAX {
        let Ok(key) = Key::arbitrary(&mut u) else { break };
        check_key(&key, n_segs, dev_size);
        keys.push(key);
    }
    round_trip(&keys);
    let good: Vec<Key> = keys.iter().copied().filter(|k| k.check().is_ok()).collect();
    round_trip(&good);
    let last = encode_last(D, n_segs);
    assert_eq!(decode_kset(D, &last), Ok(KsetRecord::Last { next_cache_seg: n_segs }));
});

/// Decodes the input as a kset.
fn raw(data: &[u8]) {
    match decode_kset(D, data) {
        Ok(record) => {
            assert!(record.size() <= data.len());
            match record {
                KsetRecord::End { magic } => {
                    assert_ne!(magic, KSET_MAGIC);
                    assert_eq!(magic.to_le_bytes(), data[8..16]);
                }
                KsetRecord::Last { next_cache_seg } => {
                    assert_eq!(encode_last(D, next_cache_seg), data[..KSET_HEADER_SIZE]);
                }
                KsetRecord::Keys { keys } => {
                    assert!((1..=KSET_KEYS_MAX).contains(&keys.len()));
                    for k in keys {
                        assert!(k.check().is_ok(), "decoded key fails its check: {k:?}");
                    }
                    let size = kset_size(keys.len());
                    let mut out = vec![0u8; size];
                    assert_eq!(encode_kset(D, keys, &mut out), Ok(size));
                    assert_eq!(out, data[..size], "re-encoded kset differs");
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(matches!(e.record, Record::Kset | Record::Key), "{e}");
        }
    }
}

/// `Key::check` and `check_in` against a model of the rules.
fn check_key(key: &Key, n_segs: u32, dev_size: u64) {
    let flags = key.flags.get();
    let off = key.off.get();
    let len = u64::from(key.len.get());
    let seg_off = u64::from(key.cache_seg_off.get());
    let valid = flags & !(KeyFlags::EMPTY | KeyFlags::CLEAN).bits() == 0
        && flags & KeyFlags::EMPTY.bits() == 0
        && len >= 1
        && off % CACHE_SUBTREE_SIZE + len <= CACHE_SUBTREE_SIZE
        && off.checked_add(len).is_some()
        && seg_off + len <= u64::from(CACHE_SEG_DATA_SIZE);
    let checked = key.check();
    assert_eq!(checked.is_ok(), valid, "{key:?}: {checked:?}");
    if let Err(e) = checked {
        assert_eq!(e.record, Record::Key);
        let _ = e.to_string();
    }
    if valid {
        assert_eq!(key.end(), off + len);
        assert_eq!(key.is_dirty(), flags & KeyFlags::CLEAN.bits() == 0);
    }
    let in_cache = key.cache_seg_id.get() < n_segs && off.saturating_add(len) <= dev_size;
    let checked_in = key.check_in(n_segs, dev_size);
    assert_eq!(checked_in.is_ok(), in_cache, "{key:?} in {n_segs} segments, {dev_size} bytes: {checked_in:?}");
    if let Err(e) = checked_in {
        let _ = e.to_string();
    }
}

/// Encodes `keys` as a kset and decodes it back.
fn round_trip(keys: &[Key]) {
    let mut out = vec![0u8; kset_size(keys.len()) + KSET_HEADER_SIZE];
    let size = match encode_kset(D, keys, &mut out) {
        Ok(size) => size,
        Err(e) => {
            assert!(keys.is_empty() || keys.len() > KSET_KEYS_MAX, "{e}");
            return;
        }
    };
    assert_eq!(size, KSET_HEADER_SIZE + keys.len() * KEY_SIZE);
    // A short buffer is refused.
    assert!(encode_kset(D, keys, &mut out[..size - 1]).is_err());
    let first_bad = keys.iter().position(|k| k.check().is_err());
    match (decode_kset(D, &out), first_bad) {
        (Ok(KsetRecord::Keys { keys: decoded }), None) => assert_eq!(decoded, keys),
        (Err(e), Some(i)) => {
            assert_eq!((e.record, e.index), (Record::Key, Some(i as u32)), "{e}");
        }
        (other, bad) => panic!("kset of {} keys (first bad: {bad:?}) decoded as {other:?}", keys.len()),
    }
    // Truncated by one byte, it is refused as truncated.
    match decode_kset(D, &out[..size - 1]) {
        Err(e) => assert!(matches!(e.kind, ErrorKind::Truncated { .. }), "{e}"),
        Ok(r) => panic!("truncated kset decoded as {r:?}"),
    }
}
