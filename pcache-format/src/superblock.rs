//! The superblock (spec §2.6.1).

use bitflags::bitflags;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::consts::{MAGIC, SB_SIZE, VERSION};
use crate::crc::{meta_crc, seal};
use crate::error::{Error, ErrorKind, Record};

bitflags! {
    /// `sb.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SbFlags: u16 {
        /// The image was formatted on a big-endian host. Every field of this
        /// format is little-endian whatever the host, so this is written as 0
        /// and an image that has it set is refused.
        const BIGENDIAN = 1 << 0;
    }
}

/// The superblock: the first 24 bytes of the 4 KiB superblock area at device
/// offset 4096.
///
/// ```text
///  0       4         6       8                 16        18          24
///  +-------+---------+-------+-----------------+---------+-----------+
///  | crc   | version | flags | magic           | seg_num | padding   |
///  | le32  | le16    | le16  | le64            | le16    | 6 bytes   |
///  +-------+---------+-------+-----------------+---------+-----------+
///  crc covers bytes [4, 4096) of the superblock area, not only the struct.
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Superblock {
    /// CRC of superblock-area bytes [4, 4096).
    pub crc: U32,
    /// Format version, 1.
    pub version: U16,
    /// [`SbFlags`].
    pub flags: U16,
    /// [`MAGIC`].
    pub magic: U64,
    /// Number of 16 MiB segments, segment 0 included.
    pub seg_num: U16,
    /// Compiler padding of the kernel's struct; whatever was on the media.
    pub padding: [u8; 6],
}

static_assertions::const_assert_eq!(core::mem::size_of::<Superblock>(), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(Superblock, version), 4);
static_assertions::const_assert_eq!(core::mem::offset_of!(Superblock, flags), 6);
static_assertions::const_assert_eq!(core::mem::offset_of!(Superblock, magic), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(Superblock, seg_num), 16);

impl Superblock {
    /// A version-1 little-endian superblock for `seg_num` segments (CRC not set).
    pub fn new(seg_num: u16) -> Self {
        let mut sb = Self::new_zeroed();
        sb.version = U16::new(VERSION);
        sb.flags = U16::new(0);
        sb.magic = U64::new(MAGIC);
        sb.seg_num = U16::new(seg_num);
        sb
    }

    /// The whole 4 KiB superblock area for `seg_num` segments: the struct,
    /// zeros, and the CRC over bytes [4, 4096).
    pub fn encode_area(seg_num: u16) -> [u8; SB_SIZE] {
        let mut area = [0u8; SB_SIZE];
        let sb = Self::new(seg_num);
        area[..core::mem::size_of::<Self>()].copy_from_slice(sb.as_bytes());
        seal(&mut area);
        area
    }

    /// The struct at the start of `area`, without any check but its length.
    pub fn read(area: &[u8]) -> Result<Self, Error> {
        Self::read_from_prefix(area)
            .map(|(sb, _)| sb)
            .map_err(|_| Error::truncated(Record::Superblock, core::mem::size_of::<Self>(), area.len()))
    }

    /// The CRC computed over `area` (bytes [4, 4096)).
    pub fn computed_crc(area: &[u8]) -> u32 {
        meta_crc(area.get(..SB_SIZE).unwrap_or(area))
    }

    /// Decodes and validates the superblock area: length, magic, CRC,
    /// version, the BIGENDIAN flag, unknown flags and `seg_num` > 0.
    ///
    /// The RFC kernel writes the CRC and version but never checks them; this
    /// decoder does.
    ///
    /// ```
    /// use pcache_format::Superblock;
    /// let area = Superblock::encode_area(100);
    /// assert_eq!(Superblock::decode(&area).unwrap().seg_num.get(), 100);
    /// let mut bad = area;
    /// bad[2000] ^= 1;
    /// assert!(Superblock::decode(&bad).is_err());
    /// ```
    pub fn decode(area: &[u8]) -> Result<Self, Error> {
        if area.len() < SB_SIZE {
            return Err(Error::truncated(Record::Superblock, SB_SIZE, area.len()));
        }
        let sb = Self::read(area)?;
        sb.validate(Self::computed_crc(area))?;
        Ok(sb)
    }

    /// Validates a superblock read from an area whose CRC is `computed_crc`.
    pub fn validate(&self, computed_crc: u32) -> Result<(), Error> {
        let magic = self.magic.get();
        if magic != MAGIC {
            return Err(Error::new(Record::Superblock, ErrorKind::BadMagic { expected: MAGIC, found: magic }));
        }
        let stored = self.crc.get();
        if stored != computed_crc {
            return Err(Error::new(Record::Superblock, ErrorKind::BadCrc { stored, computed: computed_crc }));
        }
        let version = self.version.get();
        if version != VERSION {
            return Err(Error::mismatch(Record::Superblock, "version", version.into(), VERSION.into()));
        }
        let flags = self.flags.get();
        if flags & SbFlags::BIGENDIAN.bits() != 0 {
            return Err(Error::new(Record::Superblock, ErrorKind::BigEndian));
        }
        let unknown = flags & !SbFlags::all().bits();
        if unknown != 0 {
            return Err(Error::unknown_flags(Record::Superblock, "flags", unknown.into()));
        }
        if self.seg_num.get() == 0 {
            return Err(Error::out_of_range(Record::Superblock, "seg_num", 0, 1, u16::MAX.into()));
        }
        Ok(())
    }

    /// `sb.flags` as [`SbFlags`], unknown bits dropped.
    pub fn flags(&self) -> SbFlags {
        SbFlags::from_bits_truncate(self.flags.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_area_crc() {
        // Spec §5 example 7: version 1, flags 0, seg_num 100, rest zero.
        let area = Superblock::encode_area(100);
        assert_eq!(u32::from_le_bytes(area[..4].try_into().unwrap()), 0x2095_CB8E);
        assert_eq!(&area[4..18], &[1, 0, 0, 0, 0xef, 0x96, 0xc5, 0x96, 0xfa, 0x5e, 0xb0, 0x65, 100, 0]);
        assert!(area[18..].iter().all(|&b| b == 0));
    }

    #[test]
    fn decode_checks_in_order() {
        let good = Superblock::encode_area(63);
        assert_eq!(Superblock::decode(&good).unwrap().seg_num.get(), 63);

        let err = Superblock::decode(&good[..SB_SIZE - 1]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Truncated { needed: SB_SIZE, found: SB_SIZE - 1 });

        let err = Superblock::decode(&[0u8; SB_SIZE]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::BadMagic { expected: MAGIC, found: 0 });

        // One bit flipped anywhere in the area, even past the struct.
        for at in [4usize, 17, 23, 24, 4095] {
            let mut bad = good;
            bad[at] ^= 0x10;
            let err = Superblock::decode(&bad).unwrap_err();
            assert!(matches!(err.kind, ErrorKind::BadCrc { .. } | ErrorKind::BadMagic { .. }), "{at}: {err}");
        }

        let mut v2 = good;
        v2[4] = 2;
        seal(&mut v2);
        assert_eq!(
            Superblock::decode(&v2).unwrap_err().kind,
            ErrorKind::Mismatch { field: "version", found: 2, expected: 1 }
        );

        let mut be = good;
        be[6] = 1;
        seal(&mut be);
        assert_eq!(Superblock::decode(&be).unwrap_err().kind, ErrorKind::BigEndian);

        let mut unknown = good;
        unknown[6] = 0x82;
        seal(&mut unknown);
        assert_eq!(
            Superblock::decode(&unknown).unwrap_err().kind,
            ErrorKind::UnknownFlags { field: "flags", bits: 0x82 }
        );

        let zero_segs = Superblock::encode_area(0);
        assert!(matches!(Superblock::decode(&zero_segs).unwrap_err().kind, ErrorKind::OutOfRange { .. }));
    }

    #[test]
    fn longer_area_uses_first_4k() {
        let mut big = [0u8; SB_SIZE + 10];
        big[..SB_SIZE].copy_from_slice(&Superblock::encode_area(5));
        big[SB_SIZE] = 0xff;
        assert!(Superblock::decode(&big).is_ok());
    }
}
