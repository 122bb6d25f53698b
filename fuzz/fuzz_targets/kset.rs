//! `decode_kset` on raw bytes in both dialects, `encode_kset`/`encode_last`
//! round trips in either, and `Key::check`/`check_in` on arbitrary keys.
//!
//! Invariants: a decoded kset re-encodes, in the dialect it decoded in, to
//! exactly the bytes it came from; every decoded key passes `Key::check`;
//! the two dialects decode the same bytes alike but for the CRC (where they
//! differ, one of them found a bad CRC); `Key::check` and `check_in` accept
//! exactly the keys the spec allows (a plain model of the rules below);
//! ksets of arbitrary keys round-trip in the dialect of the input's first
//! byte (bit 0: 0 RFC v1, 1 dm-pcache), and a kset with a bad key is
//! refused naming the first bad key. Both dialects' fast CRCs agree with
//! the table-driven reference on the input.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use pcache_format::consts::{
    CACHE_SEG_DATA_SIZE, CACHE_SUBTREE_SIZE, KEY_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC,
};
use pcache_format::crc::{crc32_reference, crc32c_reference};
use pcache_format::{
    Dialect, Error, ErrorKind, Key, KeyFlags, KsetRecord, Record, decode_kset, encode_kset, encode_last, kset_size,
};

fuzz_target!(|data: &[u8]| {
    let rfc = raw(Dialect::RfcV1, data);
    let dm = raw(Dialect::DmPcache, data);
    alike_but_crc(&rfc, &dm);
    assert_eq!(Dialect::RfcV1.crc(data), crc32_reference(data));
    assert_eq!(Dialect::DmPcache.crc(data), crc32c_reference(data));

    let mut u = Unstructured::new(data);
    let Ok(sel) = u8::arbitrary(&mut u) else { return };
    let d = if sel & 1 == 0 { Dialect::RfcV1 } else { Dialect::DmPcache };
    let Ok(n_segs) = u32::arbitrary(&mut u) else { return };
    let Ok(dev_size) = u64::arbitrary(&mut u) else { return };
    let mut keys = Vec::new();
    while keys.len() <= KSET_KEYS_MAX {
        let Ok(key) = Key::arbitrary(&mut u) else { break };
        check_key(&key, n_segs, dev_size);
        keys.push(key);
    }
    // The rest of the input as the data of the first key.
    if let Some(key) = keys.first() {
        let cached = u.take_rest();
        assert_eq!(key.data_crc_matches(d, cached), d.crc(cached) == key.data_crc.get());
    }
    round_trip(d, &keys);
    let good: Vec<Key> = keys.iter().copied().filter(|k| k.check().is_ok()).collect();
    round_trip(d, &good);
    let last = encode_last(d, n_segs);
    assert_eq!(decode_kset(d, &last), Ok(KsetRecord::Last { next_cache_seg: n_segs }));
    assert_eq!(last[4..], encode_last(other(d), n_segs)[4..], "LAST ksets differ beyond the CRC");
    alike_but_crc(&decode_kset(d, &last), &decode_kset(other(d), &last));
});

fn other(d: Dialect) -> Dialect {
    match d {
        Dialect::RfcV1 => Dialect::DmPcache,
        Dialect::DmPcache => Dialect::RfcV1,
    }
}

fn bad_crc(r: &Result<KsetRecord<'_>, Error>) -> bool {
    matches!(r, Err(e) if matches!(e.kind, ErrorKind::BadCrc { .. }))
}

/// The results of decoding the same bytes in the two dialects: the same,
/// or one of them (at least) found a bad CRC, and then the other got past
/// everything checked before the CRC (no end, no truncation, flags and
/// key_num in range). Either dialect may accept the bytes: CRCs can
/// collide.
fn alike_but_crc(a: &Result<KsetRecord<'_>, Error>, b: &Result<KsetRecord<'_>, Error>) {
    if a == b {
        return;
    }
    for (x, y) in [(a, b), (b, a)] {
        if bad_crc(x) {
            let past_crc = matches!(y, Ok(KsetRecord::Last { .. } | KsetRecord::Keys { .. }))
                || bad_crc(y)
                || matches!(y, Err(e) if e.record == Record::Key);
            assert!(past_crc, "dialects disagree before the CRC: {x:?} and {y:?}");
            return;
        }
    }
    panic!("dialects disagree beyond the CRC: {a:?} and {b:?}");
}

/// Decodes the input as a kset in dialect `d`.
fn raw(d: Dialect, data: &[u8]) -> Result<KsetRecord<'_>, Error> {
    let decoded = decode_kset(d, data);
    match &decoded {
        Ok(record) => {
            assert!(record.size() <= data.len());
            match *record {
                KsetRecord::End { magic } => {
                    assert_ne!(magic, KSET_MAGIC);
                    assert_eq!(magic.to_le_bytes(), data[8..16]);
                }
                KsetRecord::Last { next_cache_seg } => {
                    assert_eq!(encode_last(d, next_cache_seg), data[..KSET_HEADER_SIZE]);
                }
                KsetRecord::Keys { keys } => {
                    assert!((1..=KSET_KEYS_MAX).contains(&keys.len()));
                    for k in keys {
                        assert!(k.check().is_ok(), "decoded key fails its check: {k:?}");
                    }
                    let size = kset_size(keys.len());
                    let mut out = vec![0u8; size];
                    assert_eq!(encode_kset(d, keys, &mut out), Ok(size));
                    assert_eq!(out, data[..size], "re-encoded kset differs");
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(matches!(e.record, Record::Kset | Record::Key), "{e}");
        }
    }
    decoded
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

/// Encodes `keys` as a kset in dialect `d` and decodes it back.
fn round_trip(d: Dialect, keys: &[Key]) {
    let mut out = vec![0u8; kset_size(keys.len()) + KSET_HEADER_SIZE];
    let size = match encode_kset(d, keys, &mut out) {
        Ok(size) => size,
        Err(e) => {
            assert!(keys.is_empty() || keys.len() > KSET_KEYS_MAX, "{e}");
            return;
        }
    };
    assert_eq!(size, KSET_HEADER_SIZE + keys.len() * KEY_SIZE);
    // A short buffer is refused.
    assert!(encode_kset(d, keys, &mut out[..size - 1]).is_err());
    // The other dialect writes the same kset but for the CRC.
    let mut theirs = vec![0u8; size];
    assert_eq!(encode_kset(other(d), keys, &mut theirs), Ok(size));
    assert_eq!(theirs[4..], out[4..size], "ksets differ beyond the CRC");
    let first_bad = keys.iter().position(|k| k.check().is_err());
    let decoded = decode_kset(d, &out);
    match (&decoded, first_bad) {
        (Ok(KsetRecord::Keys { keys: decoded }), None) => assert_eq!(*decoded, keys),
        (Err(e), Some(i)) => {
            assert_eq!((e.record, e.index), (Record::Key, Some(i as u32)), "{e}");
        }
        (other, bad) => panic!("kset of {} keys (first bad: {bad:?}) decoded as {other:?}", keys.len()),
    }
    // Sealed in `d`, the kset is damage to the other dialect unless the
    // CRCs collide (not asserted: only that nothing else differs).
    alike_but_crc(&decoded, &decode_kset(other(d), &out));
    // Truncated by one byte, it is refused as truncated, in either dialect.
    for dialect in [d, other(d)] {
        match decode_kset(dialect, &out[..size - 1]) {
            Err(e) => assert!(matches!(e.kind, ErrorKind::Truncated { .. }), "{e}"),
            Ok(r) => panic!("truncated kset decoded as {r:?}"),
        }
    }
}
