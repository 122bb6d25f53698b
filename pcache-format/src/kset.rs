//! The key log: ksets, keys, LAST ksets and terminators (spec §2.6.6).
//!
//! A cache's key log is a chain of ksets packed back to back in the data
//! areas of its key segments. Each kset holds up to 128 keys; a segment that
//! fills up ends with a LAST kset naming the next key segment; the newest
//! kset is followed by a terminator (24 zero bytes), so a reader stops at
//! the first record without the kset magic or with a bad CRC.

use bitflags::bitflags;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::consts::{
    CACHE_SEG_DATA_SIZE, CACHE_SUBTREE_SIZE, CACHE_SUBTREE_SIZE_MASK, KEY_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX,
    KSET_MAGIC,
};
use crate::crc::stored_crc;
use crate::dialect::Dialect;
use crate::error::{Error, ErrorKind, Record};

bitflags! {
    /// `kset.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct KsetFlags: u64 {
        /// The kset ends its segment; `key_num` holds the next key segment.
        const LAST = 1 << 0;
    }
}

bitflags! {
    /// `key.flags`. A key without CLEAN is dirty.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct KeyFlags: u32 {
        /// A placeholder for a read miss in flight; lives only in memory.
        const EMPTY = 1 << 0;
        /// Data filled from the backing device on a read miss: never
        /// written back.
        const CLEAN = 1 << 1;
    }
}

/// Kset header; for a LAST kset it is the whole record.
///
/// ```text
///  0      4                              8          16        24
///  +------+------------------------------+----------+---------+------------+
///  | crc  | key_num | next_cache_seg_id  | magic    | flags   | keys...    |
///  | le32 | le32 (a union)               | le64     | le64    | 40 B each  |
///  +------+------------------------------+----------+---------+------------+
///  crc covers [4, 24 + 40 * key_num), or [4, 24) for a LAST kset.
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct KsetHeader {
    /// CRC of the kset after this field.
    pub crc: U32,
    /// Number of keys, or for a LAST kset the next key segment's cache index.
    pub key_num: U32,
    /// [`KSET_MAGIC`]; anything else ends the log.
    pub magic: U64,
    /// [`KsetFlags`].
    pub flags: U64,
}

static_assertions::const_assert_eq!(core::mem::size_of::<KsetHeader>(), KSET_HEADER_SIZE);
static_assertions::const_assert_eq!(core::mem::offset_of!(KsetHeader, key_num), 4);
static_assertions::const_assert_eq!(core::mem::offset_of!(KsetHeader, magic), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(KsetHeader, flags), 16);

/// One key: a range of the backing device and where its data is cached.
///
/// ```text
///  0      8      12      16             20              24        32         36        40
///  +------+------+-------+--------------+---------------+---------+----------+---------+
///  | off  | len  | flags | cache_seg_id | cache_seg_off | seg_gen | data_crc | padding |
///  | le64 | le32 | le32  | le32         | le32          | le64    | le32     | 4 B     |
///  +------+------+-------+--------------+---------------+---------+----------+---------+
///  cache_seg_id is a cache segment index; cache_seg_off an offset in its data area.
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Key {
    /// Byte offset on the backing device.
    pub off: U64,
    /// Length in bytes.
    pub len: U32,
    /// [`KeyFlags`].
    pub flags: U32,
    /// Cache segment index holding the data.
    pub cache_seg_id: U32,
    /// Offset of the data in that segment's data area.
    pub cache_seg_off: U32,
    /// Generation of the segment when the space was allocated.
    pub seg_gen: U64,
    /// CRC of the data, when the cache keeps data CRCs; else 0.
    pub data_crc: U32,
    /// Padding, 0 (covered by the kset CRC).
    pub padding: U32,
}

static_assertions::const_assert_eq!(core::mem::size_of::<Key>(), KEY_SIZE);
static_assertions::const_assert_eq!(core::mem::offset_of!(Key, len), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(Key, flags), 12);
static_assertions::const_assert_eq!(core::mem::offset_of!(Key, cache_seg_id), 16);
static_assertions::const_assert_eq!(core::mem::offset_of!(Key, cache_seg_off), 20);
static_assertions::const_assert_eq!(core::mem::offset_of!(Key, seg_gen), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(Key, data_crc), 32);

/// The 24-byte terminator that follows the newest kset.
pub const TERMINATOR: [u8; KSET_HEADER_SIZE] = [0; KSET_HEADER_SIZE];

impl Key {
    /// A key for `[off, off + len)` cached at `cache_seg_off` of cache
    /// segment `cache_seg_id`, generation `seg_gen`.
    pub fn new(off: u64, len: u32, flags: KeyFlags, cache_seg_id: u32, cache_seg_off: u32, seg_gen: u64) -> Self {
        let mut k = Self::new_zeroed();
        k.off = U64::new(off);
        k.len = U32::new(len);
        k.flags = U32::new(flags.bits());
        k.cache_seg_id = U32::new(cache_seg_id);
        k.cache_seg_off = U32::new(cache_seg_off);
        k.seg_gen = U64::new(seg_gen);
        k
    }

    /// The flags, unknown bits dropped.
    pub fn flags(&self) -> KeyFlags {
        KeyFlags::from_bits_truncate(self.flags.get())
    }

    /// Whether the key's data is dirty (must be written back).
    pub fn is_dirty(&self) -> bool {
        !self.flags().contains(KeyFlags::CLEAN)
    }

    /// End of the key's range on the backing device (saturating).
    pub fn end(&self) -> u64 {
        self.off.get().saturating_add(self.len.get().into())
    }

    /// Checks that need only the key: known flags, never EMPTY, a length of
    /// at least one byte that stays inside its 4 MiB slice and inside the
    /// segment's data area.
    pub fn check(&self) -> Result<(), Error> {
        const R: Record = Record::Key;
        let flags = self.flags.get();
        let unknown = flags & !KeyFlags::all().bits();
        if unknown != 0 {
            return Err(Error::unknown_flags(R, "flags", unknown.into()));
        }
        if flags & KeyFlags::EMPTY.bits() != 0 {
            return Err(Error::invalid(R, "flags (EMPTY is never persisted)", flags.into()));
        }
        let len = u64::from(self.len.get());
        let in_slice = self.off.get() & CACHE_SUBTREE_SIZE_MASK;
        if len == 0 || in_slice + len > CACHE_SUBTREE_SIZE {
            return Err(Error::out_of_range(R, "len", len, 1, CACHE_SUBTREE_SIZE - in_slice));
        }
        if self.off.get().checked_add(len).is_none() {
            return Err(Error::out_of_range(R, "off", self.off.get(), 0, u64::MAX - len));
        }
        let seg_off = u64::from(self.cache_seg_off.get());
        let max_off = u64::from(CACHE_SEG_DATA_SIZE) - len;
        if seg_off > max_off {
            return Err(Error::out_of_range(R, "cache_seg_off", seg_off, 0, max_off));
        }
        Ok(())
    }

    /// Checks against the cache it belongs to: its segment index below
    /// `n_segs` and its range inside a backing device of `dev_size` bytes.
    pub fn check_in(&self, n_segs: u32, dev_size: u64) -> Result<(), Error> {
        const R: Record = Record::Key;
        let seg = self.cache_seg_id.get();
        if seg >= n_segs {
            return Err(Error::out_of_range(R, "cache_seg_id", seg.into(), 0, u64::from(n_segs).saturating_sub(1)));
        }
        if self.end() > dev_size {
            let max = dev_size.saturating_sub(self.len.get().into());
            return Err(Error::out_of_range(R, "off", self.off.get(), 0, max));
        }
        Ok(())
    }

    /// Whether `data` (the key's `len` cached bytes) matches `data_crc`,
    /// computed with `dialect`'s CRC.
    pub fn data_crc_matches(&self, dialect: Dialect, data: &[u8]) -> bool {
        dialect.crc(data) == self.data_crc.get()
    }
}

/// What a kset-sized piece of the log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KsetRecord<'a> {
    /// No kset: the log ends here. A terminator has magic 0.
    End {
        /// The magic found instead of [`KSET_MAGIC`].
        magic: u64,
    },
    /// A LAST kset: the log continues at offset 0 of another key segment.
    Last {
        /// Cache index of the next key segment.
        next_cache_seg: u32,
    },
    /// A kset with keys.
    Keys {
        /// The keys, in log order.
        keys: &'a [Key],
    },
}

impl KsetRecord<'_> {
    /// Bytes the record occupies in the log (0 for an end).
    pub fn size(&self) -> usize {
        match self {
            KsetRecord::End { .. } => 0,
            KsetRecord::Last { .. } => KSET_HEADER_SIZE,
            KsetRecord::Keys { keys } => kset_size(keys.len()),
        }
    }
}

/// Size of a kset of `n` keys.
pub const fn kset_size(n: usize) -> usize {
    KSET_HEADER_SIZE + n * KEY_SIZE
}

/// Decodes the kset at the start of `bytes` (which may run on past it).
///
/// A record without the kset magic is [`KsetRecord::End`], not an error.
/// Errors: a truncated record, unknown flags, `key_num` outside 1..=128, a
/// bad CRC, or a key failing [`Key::check`] (the error names the key).
///
/// ```
/// use pcache_format::{decode_kset, encode_kset, Dialect, Key, KeyFlags, KsetRecord};
/// let key = Key::new(4096, 4096, KeyFlags::empty(), 1, 0, 0);
/// let mut buf = [0u8; 64];
/// let size = encode_kset(Dialect::RfcV1, &[key], &mut buf).unwrap();
/// assert_eq!(size, 64);
/// assert_eq!(decode_kset(Dialect::RfcV1, &buf).unwrap(), KsetRecord::Keys { keys: &[key] });
/// assert_eq!(decode_kset(Dialect::RfcV1, &[0u8; 24]).unwrap(), KsetRecord::End { magic: 0 });
/// // The same bytes sealed by the other dialect's CRC are damage.
/// assert!(decode_kset(Dialect::DmPcache, &buf).is_err());
/// ```
pub fn decode_kset(dialect: Dialect, bytes: &[u8]) -> Result<KsetRecord<'_>, Error> {
    const R: Record = Record::Kset;
    let Ok((header, _)) = KsetHeader::ref_from_prefix(bytes) else {
        return Err(Error::truncated(R, KSET_HEADER_SIZE, bytes.len()));
    };
    let magic = header.magic.get();
    if magic != KSET_MAGIC {
        return Ok(KsetRecord::End { magic });
    }
    let flags = header.flags.get();
    let unknown = flags & !KsetFlags::all().bits();
    if unknown != 0 {
        return Err(Error::unknown_flags(R, "flags", unknown));
    }
    let last = flags & KsetFlags::LAST.bits() != 0;
    let size = if last {
        KSET_HEADER_SIZE
    } else {
        let n = header.key_num.get();
        if n == 0 || n as usize > KSET_KEYS_MAX {
            return Err(Error::out_of_range(R, "key_num", n.into(), 1, KSET_KEYS_MAX as u64));
        }
        kset_size(n as usize)
    };
    let Some(record) = bytes.get(..size) else {
        return Err(Error::truncated(R, size, bytes.len()));
    };
    let stored = stored_crc(record).unwrap_or(0);
    let computed = dialect.record_crc(record, record.len());
    if stored != computed {
        return Err(Error::new(R, ErrorKind::BadCrc { stored, computed }));
    }
    if last {
        return Ok(KsetRecord::Last { next_cache_seg: header.key_num.get() });
    }
    let keys =
        <[Key]>::ref_from_bytes(&record[KSET_HEADER_SIZE..]).map_err(|_| Error::truncated(R, size, record.len()))?;
    for (i, key) in keys.iter().enumerate() {
        key.check().map_err(|e| e.at_index(i as u32))?;
    }
    Ok(KsetRecord::Keys { keys })
}

/// Encodes a kset of `keys` (1 to 128) at the start of `out`, CRC included,
/// and returns its size.
pub fn encode_kset(dialect: Dialect, keys: &[Key], out: &mut [u8]) -> Result<usize, Error> {
    const R: Record = Record::Kset;
    if keys.is_empty() || keys.len() > KSET_KEYS_MAX {
        return Err(Error::out_of_range(R, "key_num", keys.len() as u64, 1, KSET_KEYS_MAX as u64));
    }
    let size = kset_size(keys.len());
    let len = out.len();
    let Some(record) = out.get_mut(..size) else {
        return Err(Error::truncated(R, size, len));
    };
    let header = KsetHeader {
        crc: U32::new(0),
        key_num: U32::new(keys.len() as u32),
        magic: U64::new(KSET_MAGIC),
        flags: U64::new(0),
    };
    record[..KSET_HEADER_SIZE].copy_from_slice(header.as_bytes());
    record[KSET_HEADER_SIZE..].copy_from_slice(keys.as_bytes());
    dialect.seal(record, size);
    Ok(size)
}

/// Encodes a LAST kset pointing at key segment `next_cache_seg`.
pub fn encode_last(dialect: Dialect, next_cache_seg: u32) -> [u8; KSET_HEADER_SIZE] {
    let header = KsetHeader {
        crc: U32::new(0),
        key_num: U32::new(next_cache_seg),
        magic: U64::new(KSET_MAGIC),
        flags: U64::new(KsetFlags::LAST.bits()),
    };
    let mut out = [0u8; KSET_HEADER_SIZE];
    out.copy_from_slice(header.as_bytes());
    dialect.seal(&mut out, KSET_HEADER_SIZE);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(record: &mut [u8]) {
        Dialect::RfcV1.seal(record, record.len());
    }

    const GOLDEN_ONE_KEY: [u8; 64] = [
        0x89, 0xe8, 0x0f, 0xd3, 0x01, 0x00, 0x00, 0x00, 0x1a, 0x4f, 0x16, 0x4e, 0xa6, 0x94, 0x68, 0x67, //
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn golden_one_key_kset() {
        // Spec §5 example 4.
        let key = Key::new(4096, 4096, KeyFlags::empty(), 1, 0, 0);
        let mut out = [0u8; 64];
        assert_eq!(encode_kset(Dialect::RfcV1, &[key], &mut out).unwrap(), 64);
        assert_eq!(out, GOLDEN_ONE_KEY);
        assert_eq!(decode_kset(Dialect::RfcV1, &GOLDEN_ONE_KEY).unwrap(), KsetRecord::Keys { keys: &[key] });
    }

    #[test]
    fn golden_last_kset() {
        // Spec §5 example 3.
        let last = encode_last(Dialect::RfcV1, 5);
        assert_eq!(u32::from_le_bytes(last[..4].try_into().unwrap()), 0xB6EB_3DD5);
        assert_eq!(decode_kset(Dialect::RfcV1, &last).unwrap(), KsetRecord::Last { next_cache_seg: 5 });
    }

    #[test]
    fn golden_dm_pcache_ksets() {
        // Spec §5 examples 3 and 4, upstream CRCs.
        let last = encode_last(Dialect::DmPcache, 5);
        assert_eq!(u32::from_le_bytes(last[..4].try_into().unwrap()), 0x5917_C2A5);
        assert_eq!(decode_kset(Dialect::DmPcache, &last).unwrap(), KsetRecord::Last { next_cache_seg: 5 });
        let key = Key::new(4096, 4096, KeyFlags::empty(), 1, 0, 0);
        let mut out = [0u8; 64];
        encode_kset(Dialect::DmPcache, &[key], &mut out).unwrap();
        assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()), 0xD0EE_3C16);
        assert_eq!(out[4..], GOLDEN_ONE_KEY[4..]);
        assert!(decode_kset(Dialect::RfcV1, &out).is_err());
        // Data CRCs: spec §5 example 5.
        let mut k = key;
        k.data_crc = U32::new(0x6035_71B1);
        assert!(k.data_crc_matches(Dialect::DmPcache, &[0u8; 4096]));
        assert!(!k.data_crc_matches(Dialect::RfcV1, &[0u8; 4096]));
    }

    #[test]
    fn boundaries() {
        // One byte short.
        let err = decode_kset(Dialect::RfcV1, &GOLDEN_ONE_KEY[..63]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Truncated { needed: 64, found: 63 });
        assert!(decode_kset(Dialect::RfcV1, &GOLDEN_ONE_KEY[..23]).is_err());
        // One bit flipped anywhere after the magic.
        for at in (4..8).chain(16..64) {
            let mut bad = GOLDEN_ONE_KEY;
            bad[at] ^= 0x04;
            assert!(decode_kset(Dialect::RfcV1, &bad).is_err(), "flip at {at}");
        }
        // A flipped magic ends the log.
        let mut bad = GOLDEN_ONE_KEY;
        bad[9] ^= 1;
        assert!(matches!(decode_kset(Dialect::RfcV1, &bad).unwrap(), KsetRecord::End { .. }));
        // key_num out of range.
        let mut many = [0u8; 24];
        many[4..8].copy_from_slice(&129u32.to_le_bytes());
        many[8..16].copy_from_slice(&KSET_MAGIC.to_le_bytes());
        seal(&mut many);
        assert!(matches!(
            decode_kset(Dialect::RfcV1, &many).unwrap_err().kind,
            ErrorKind::OutOfRange { field: "key_num", .. }
        ));
        many[4..8].copy_from_slice(&0u32.to_le_bytes());
        seal(&mut many);
        assert!(decode_kset(Dialect::RfcV1, &many).is_err());
    }

    #[test]
    fn key_checks() {
        let ok = Key::new(4 * 1024 * 1024 - 4096, 4096, KeyFlags::CLEAN, 0, 0, 0);
        assert!(ok.check().is_ok());
        let crosses_slice = Key::new(4 * 1024 * 1024 - 512, 4096, KeyFlags::empty(), 0, 0, 0);
        assert!(crosses_slice.check().is_err());
        let empty = Key::new(0, 512, KeyFlags::EMPTY, 0, 0, 0);
        assert!(empty.check().is_err());
        let zero = Key::new(0, 0, KeyFlags::empty(), 0, 0, 0);
        assert!(zero.check().is_err());
        let past_area = Key::new(0, 4096, KeyFlags::empty(), 0, CACHE_SEG_DATA_SIZE - 4095, 0);
        assert!(past_area.check().is_err());
        let overflow = Key::new(u64::MAX - 49, 50, KeyFlags::empty(), 0, 0, 0);
        assert!(overflow.check().is_err());
        assert!(ok.check_in(1, 4 * 1024 * 1024).is_ok());
        assert!(ok.check_in(0, 4 * 1024 * 1024).is_err());
        assert!(ok.check_in(1, 4 * 1024 * 1024 - 1).is_err());
        // A bad key inside a kset is named by its index.
        let mut out = [0u8; 24 + 80];
        encode_kset(Dialect::RfcV1, &[ok, zero], &mut out).unwrap();
        let err = decode_kset(Dialect::RfcV1, &out).unwrap_err();
        assert_eq!((err.record, err.index), (Record::Key, Some(1)));
    }

    #[test]
    fn encode_refuses_bad_counts() {
        let mut out = [0u8; 8192];
        assert!(encode_kset(Dialect::RfcV1, &[], &mut out).is_err());
        let keys = [Key::new(0, 512, KeyFlags::empty(), 0, 0, 0); 129];
        assert!(encode_kset(Dialect::RfcV1, &keys, &mut out).is_err());
        assert_eq!(encode_kset(Dialect::RfcV1, &keys[..128], &mut out).unwrap(), 5144);
        assert!(encode_kset(Dialect::RfcV1, &keys[..2], &mut [0u8; 63]).is_err());
    }
}
