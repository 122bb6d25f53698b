//! Round trips of every record, and decoders fed arbitrary bytes.

use pcache_format::*;
use proptest::prelude::*;
use zerocopy::FromBytes;

fn round_trip<R: MetaRecord + PartialEq + std::fmt::Debug>(record: R, seq: u8) -> Result<(), TestCaseError> {
    for d in Dialect::ALL {
        let mut copy = vec![0u8; R::COPY_SIZE];
        encode_copy(d, &record, seq, &mut copy).unwrap();
        let back: R = decode_copy(d, &copy).unwrap();
        prop_assert_eq!(back.header().seq, seq);
        let mut expected = record;
        expected.header_mut().seq = seq;
        expected.header_mut().crc = back.header().crc;
        prop_assert_eq!(back, expected);
        // Both copies: the one with the later sequence is selected.
        let mut pair = vec![0u8; 2 * R::COPY_SIZE];
        encode_copy(d, &record, seq, &mut pair[..R::COPY_SIZE]).unwrap();
        encode_copy(d, &record, seq.wrapping_add(1), &mut pair[R::COPY_SIZE..]).unwrap();
        prop_assert_eq!(read_latest::<R>(d, &pair).unwrap().copy, 1);
    }
    Ok(())
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(1u8..=255, 1..=255)
}

proptest! {
    #[test]
    fn segment_info(seg in 1u32.., next in proptest::option::of(1u32..), seq: u8) {
        round_trip(SegmentInfo::data(seg, next), seq)?;
    }

    #[test]
    fn meta_segment_info(seq: u8) {
        round_trip(MetaSegmentInfo::default(), seq)?;
    }

    #[test]
    fn backing_dev_info(id in 0u32..2047, path in path(), sectors: u64, seg in 1u32..65535,
                        n in 1u32..=CACHE_SEGS_MAX, gc in 0u16..=90, crc: bool, seq: u8) {
        let flags = if crc { CacheFlags::DATA_CRC } else { CacheFlags::empty() };
        let info = BackingDevInfo::running(id, &path, sectors, CacheInfo::new(seg, n, gc, flags)).unwrap();
        prop_assert_eq!(info.path(), &path[..]);
        round_trip(info, seq)?;
        round_trip(BackingDevInfo::free(id), seq)?;
    }

    #[test]
    fn gen_and_pos(gen_: u64, seg: u32, off in 0u32..CACHE_SEG_DATA_SIZE, seq: u8) {
        round_trip(CacheSegGen::new(gen_), seq)?;
        round_trip(CachePos::new(seg, off), seq)?;
    }

    /// Cache segment 0's control page: both copies of the generation and
    /// of each tail, written where the layout says, read back through the
    /// page's struct and through copy selection.
    #[test]
    fn control_page(g: u64, kt in (any::<u32>(), 0u32..CACHE_SEG_DATA_SIZE),
                    dt in (any::<u32>(), 0u32..CACHE_SEG_DATA_SIZE), seq: u8) {
        let mut page = vec![0u8; core::mem::size_of::<CacheCtrl>()];
        let s = SMALL_RECORD_SIZE;
        for copy in 0..2 {
            let q = seq.wrapping_add(copy as u8);
            encode_copy(Dialect::RfcV1, &CacheSegGen::new(g), q, &mut page[copy * s..(copy + 1) * s]).unwrap();
            let at = KEY_TAIL_OFF + copy * s;
            encode_copy(Dialect::RfcV1, &CachePos::new(kt.0, kt.1), q, &mut page[at..at + s]).unwrap();
            let at = DIRTY_TAIL_OFF + copy * s;
            encode_copy(Dialect::RfcV1, &CachePos::new(dt.0, dt.1), q, &mut page[at..at + s]).unwrap();
        }
        let ctrl = CacheCtrl::read_from_bytes(&page[..]).unwrap();
        prop_assert_eq!(ctrl.seg_ctrl.gen_[1].gen_.get(), g);
        prop_assert!(ctrl.seg_ctrl.res.iter().all(|r| r.get() == 0));
        prop_assert_eq!(ctrl.key_tail_pos[0].cache_seg_id.get(), kt.0);
        prop_assert_eq!(ctrl.dirty_tail_pos[1].seg_off.get(), dt.1);
        let gen_ = read_latest::<CacheSegGen>(Dialect::RfcV1, &page[..2 * s]).unwrap();
        prop_assert_eq!((gen_.copy, gen_.record.gen_.get()), (1, g));
        let k = read_latest::<CachePos>(Dialect::RfcV1, &page[KEY_TAIL_OFF..KEY_TAIL_OFF + 2 * s]).unwrap().record;
        prop_assert_eq!((k.cache_seg_id.get(), k.seg_off.get()), kt);
        let d = read_latest::<CachePos>(Dialect::RfcV1, &page[DIRTY_TAIL_OFF..DIRTY_TAIL_OFF + 2 * s]).unwrap().record;
        prop_assert_eq!((d.cache_seg_id.get(), d.seg_off.get()), dt);
    }

    /// A key alone: its 40 bytes read back equal, and pass the checks.
    #[test]
    fn key(off in 0u64..1 << 40, len in 1u32..=8192, clean: bool, seg: u32,
           seg_off in 0u32..CACHE_SEG_DATA_SIZE - 8192, g: u64, crc: u32) {
        let off = off & !CACHE_SUBTREE_SIZE_MASK;
        let flags = if clean { KeyFlags::CLEAN } else { KeyFlags::empty() };
        let mut k = Key::new(off, len, flags, seg, seg_off, g);
        k.data_crc = crc.into();
        let bytes = zerocopy::IntoBytes::as_bytes(&k).to_vec();
        prop_assert_eq!(bytes.len(), 40);
        let back = Key::read_from_bytes(&bytes[..]).unwrap();
        prop_assert_eq!(back, k);
        prop_assert!(back.check().is_ok());
        prop_assert_eq!(back.is_dirty(), !clean);
    }

    #[test]
    fn superblock(seg_num in 1u16..) {
        let area = Superblock::encode_area(seg_num);
        let sb = Superblock::decode(&area).unwrap();
        prop_assert_eq!(sb.seg_num.get(), seg_num);
        prop_assert_eq!(sb.version.get(), VERSION);
        prop_assert_eq!(sb.magic.get(), MAGIC);
    }

    #[test]
    fn kset(keys in proptest::collection::vec(
        (0u64..1 << 40, 1u32..=8192, any::<bool>(), any::<u32>(), 0u32..CACHE_SEG_DATA_SIZE - 8192, any::<u64>(), any::<u32>()),
        1..=KSET_KEYS_MAX)) {
        let keys: Vec<Key> = keys.into_iter().map(|(off, len, clean, seg, seg_off, g, crc)| {
            let off = off & !CACHE_SUBTREE_SIZE_MASK; // slice start: any len up to 8 KiB fits
            let flags = if clean { KeyFlags::CLEAN } else { KeyFlags::empty() };
            let mut k = Key::new(off, len, flags, seg, seg_off, g);
            k.data_crc = crc.into();
            k
        }).collect();
        let mut buf = vec![0u8; KSET_ONMEDIA_SIZE_MAX + 7];
        let size = encode_kset(Dialect::RfcV1, &keys, &mut buf).unwrap();
        prop_assert_eq!(size, kset_size(keys.len()));
        prop_assert_eq!(decode_kset(Dialect::RfcV1, &buf).unwrap(), KsetRecord::Keys { keys: &keys });
    }

    #[test]
    fn last_kset(next: u32) {
        let last = encode_last(Dialect::RfcV1, next);
        prop_assert_eq!(decode_kset(Dialect::RfcV1, &last).unwrap(), KsetRecord::Last { next_cache_seg: next });
    }

    /// No decoder panics, whatever the bytes.
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
        let _ = Superblock::decode(&bytes);
        let _ = decode_kset(Dialect::RfcV1, &bytes);
        let _ = decode_copy::<SegmentInfo>(Dialect::RfcV1, &bytes);
        let _ = decode_copy::<BackingDevInfo>(Dialect::RfcV1, &bytes);
        let _ = read_latest::<MetaSegmentInfo>(Dialect::RfcV1, &bytes);
        let _ = read_latest::<CachePos>(Dialect::RfcV1, &bytes);
        let _ = read_latest::<CacheSegGen>(Dialect::RfcV1, &bytes);
        if let Ok((key, _)) = Key::read_from_prefix(&bytes) {
            let _ = key.check();
            let _ = key.check_in(u32::MAX, u64::MAX);
        }
    }

    /// A valid kset with any one byte after its magic changed is refused.
    #[test]
    fn kset_one_byte_flipped(at in 16usize..64, bit in 0u8..8) {
        let key = Key::new(4096, 4096, KeyFlags::empty(), 1, 0, 0);
        let mut buf = [0u8; 64];
        encode_kset(Dialect::RfcV1, &[key], &mut buf).unwrap();
        buf[at] ^= 1 << bit;
        prop_assert!(decode_kset(Dialect::RfcV1, &buf).is_err());
    }
}

#[test]
fn both_copies_bad() {
    let mut pair = vec![0u8; 2 * SEG_INFO_SIZE];
    encode_copy(Dialect::RfcV1, &SegmentInfo::data(3, None), 1, &mut pair[..SEG_INFO_SIZE]).unwrap();
    encode_copy(Dialect::RfcV1, &SegmentInfo::data(3, None), 2, &mut pair[SEG_INFO_SIZE..]).unwrap();
    pair[100] ^= 1;
    pair[SEG_INFO_SIZE + 100] ^= 1;
    let err = read_latest::<SegmentInfo>(Dialect::RfcV1, &pair).unwrap_err();
    assert!(matches!(err.kind, ErrorKind::NoValidCopy { .. }), "{err}");
    assert_eq!(err.record, Record::SegmentInfo);
    assert!(err.to_string().starts_with("segment info: no valid copy"));
    // One byte short of the second copy: it counts as bad.
    let err = read_latest::<SegmentInfo>(Dialect::RfcV1, &pair[..2 * SEG_INFO_SIZE - 1]).unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Truncated { .. }));
}

#[test]
fn one_copy_bad_falls_back_to_the_other() {
    let mut pair = vec![0u8; 2 * SEG_INFO_SIZE];
    encode_copy(Dialect::RfcV1, &SegmentInfo::data(3, Some(4)), 7, &mut pair[..SEG_INFO_SIZE]).unwrap();
    encode_copy(Dialect::RfcV1, &SegmentInfo::data(3, None), 8, &mut pair[SEG_INFO_SIZE..]).unwrap();
    assert_eq!(read_latest::<SegmentInfo>(Dialect::RfcV1, &pair).unwrap().record.next(), None);
    pair[SEG_INFO_SIZE + 4000] ^= 0x80; // a bit in the zero tail of copy 1
    let latest = read_latest::<SegmentInfo>(Dialect::RfcV1, &pair).unwrap();
    assert_eq!((latest.copy, latest.record.next()), (0, Some(4)));
}
