//! The CRCs of both dialects (spec §2.4, §3.6).
//!
//! RFC v1 ([`crc32`]):
//! Every RFC checksum is the kernel's `crc32(seed, buf, len)` with seed 0:
//! the reflected CRC-32 polynomial `0x04C11DB7`, a register that starts at
//! zero and no final inversion. It is neither the zlib CRC (which starts at
//! `0xFFFFFFFF` and inverts) nor JAMCRC. One consequence matters for
//! recovery: the CRC of an all-zero buffer is zero, so an all-zero record
//! passes its CRC check and only semantic checks can tell it means nothing.
//!
//! ```
//! assert_eq!(pcache_format::crc::crc32(b"123456789"), 0x2DFD_2D88);
//! assert_eq!(pcache_format::crc::crc32(&[0u8; 4096]), 0);
//! ```
//!
//! dm-pcache ([`crc32c`]): the kernel's `crc32c(0x3B15A, buf, len)`, the
//! reflected Castagnoli polynomial `0x1EDC6F41` with a register that starts
//! at `0x3B15A` and no final inversion. Zeros do not hash to zero, so a
//! zeroed slot fails its CRC check.
//!
//! ```
//! assert_eq!(pcache_format::crc::crc32c(b"123456789"), 0xE586_8AB2);
//! assert_eq!(pcache_format::crc::crc32c(&[0u8; 4096]), 0x6035_71B1);
//! ```

use crc::{Algorithm, Crc, Table};

/// The RFC CRC as a `crc` crate algorithm.
pub const PCACHE_CRC32: Algorithm<u32> = Algorithm {
    width: 32,
    poly: 0x04C1_1DB7,
    init: 0,
    refin: true,
    refout: true,
    xorout: 0,
    check: 0x2DFD_2D88,
    residue: 0,
};

/// Slice-by-16 tables: the reference implementation of [`PCACHE_CRC32`],
/// which the fast one is tested against.
static CRC: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&PCACHE_CRC32);

/// CRC of `data`.
///
/// Computed by `crc32fast` (the carry-less multiply instruction where the
/// CPU has it: data CRCs cover every write and every read hit), which
/// implements the zlib CRC: the same reflected polynomial, with a register
/// that starts at `0xFFFFFFFF` and a final inversion. Its "initial value"
/// is a finished zlib CRC, so starting from `0xFFFFFFFF` (finished form of
/// a zero register) and inverting the result gives the RFC CRC.
pub fn crc32(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(u32::MAX);
    h.update(data);
    !h.finalize()
}

/// The RFC CRC of `data` by the table-driven reference implementation.
pub fn crc32_reference(data: &[u8]) -> u32 {
    CRC.checksum(data)
}

/// Register preset of every dm-pcache CRC.
pub const DM_CRC_SEED: u32 = 0x0003_B15A;

/// The dm-pcache CRC as a `crc` crate algorithm. The crate states `init` in
/// unreflected form: the bit reversal of [`DM_CRC_SEED`].
pub const DM_PCACHE_CRC32C: Algorithm<u32> = Algorithm {
    width: 32,
    poly: 0x1EDC_6F41,
    init: DM_CRC_SEED.reverse_bits(),
    refin: true,
    refout: true,
    xorout: 0,
    check: 0xE586_8AB2,
    residue: 0,
};

static CRC_C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&DM_PCACHE_CRC32C);

/// The dm-pcache CRC of `data`.
///
/// With `std`, computed by the `crc32c` crate (the CPU's CRC32 instruction
/// where it has one), whose functions invert the register before and after:
/// starting from the inverted seed and inverting the result gives the
/// kernel's CRC. Without `std`, the table-driven reference.
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(feature = "std")]
    {
        !crc32c_hw::crc32c_append(!DM_CRC_SEED, data)
    }
    #[cfg(not(feature = "std"))]
    {
        CRC_C.checksum(data)
    }
}

/// The dm-pcache CRC of `data` by the table-driven reference implementation.
pub fn crc32c_reference(data: &[u8]) -> u32 {
    CRC_C.checksum(data)
}

/// A CRC computed over several pieces, equal to [`crc32`] of their
/// concatenation.
#[derive(Clone)]
pub struct Crc32 {
    digest: crc32fast::Hasher,
}

impl core::fmt::Debug for Crc32 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Crc32").finish_non_exhaustive()
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32 {
    /// An empty CRC.
    pub fn new() -> Self {
        Self { digest: crc32fast::Hasher::new_with_initial(u32::MAX) }
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.digest.update(data);
    }

    /// The CRC of everything added.
    pub fn finish(self) -> u32 {
        !self.digest.finalize()
    }
}

/// CRC of a metadata record copy: every byte after the 4-byte CRC field.
/// Copies shorter than the field hash to zero.
pub fn meta_crc(copy: &[u8]) -> u32 {
    let body = copy.get(4..).unwrap_or(&[]);
    // Most of a backing table is zeros, whose CRC is zero (seed 0, no final
    // xor): checking for zeros is far cheaper than hashing them.
    if is_zero(body) { 0 } else { crc32(body) }
}

/// Whether every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-folded a block at a time, without a branch per word: the fold
    // vectorises, and a coverage-instrumented build (the fuzz targets) does
    // not call its comparison hook for every 16 bytes of a backing table.
    let (blocks, rest) = data.as_chunks::<256>();
    let fold = |b: &[u8]| b.iter().fold(0u8, |acc, &x| acc | x);
    blocks.iter().all(|b| fold(b) == 0) && fold(rest) == 0
}

/// Stored CRC field (the first 4 bytes, little-endian) of a record copy, or
/// `None` if the copy is shorter than 4 bytes.
pub fn stored_crc(copy: &[u8]) -> Option<u32> {
    let b = copy.get(..4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Computes the CRC of `copy` (all bytes after the CRC field) and stores it
/// in the first 4 bytes. Does nothing on a copy shorter than 4 bytes.
pub fn seal(copy: &mut [u8]) {
    let crc = meta_crc(copy);
    if let Some(field) = copy.get_mut(..4) {
        field.copy_from_slice(&crc.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(crc32(b"123456789"), 0x2DFD_2D88);
        assert_eq!(crc32_reference(b"123456789"), 0x2DFD_2D88);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn dm_pcache_check_values() {
        // Spec §5 examples 1 and 5, and §3.6.
        assert_eq!(crc32c(b"123456789"), 0xE586_8AB2);
        assert_eq!(crc32c_reference(b"123456789"), 0xE586_8AB2);
        assert_eq!(crc32c(&[0u8; 4096]), 0x6035_71B1);
        assert_eq!(crc32c(&[0u8; 20]), 0xB9B6_9066);
        assert_eq!(crc32c(b""), DM_CRC_SEED);
    }

    proptest::proptest! {
        #[test]
        fn fast_crc32c_equals_reference(data in proptest::collection::vec(proptest::num::u8::ANY, 0..5000)) {
            proptest::prop_assert_eq!(crc32c(&data), crc32c_reference(&data));
        }

        #[test]
        fn fast_equals_reference(data in proptest::collection::vec(proptest::num::u8::ANY, 0..5000), cut in 0usize..5000) {
            proptest::prop_assert_eq!(crc32(&data), crc32_reference(&data));
            let cut = cut.min(data.len());
            let mut c = Crc32::new();
            c.update(&data[..cut]);
            c.update(&data[cut..]);
            proptest::prop_assert_eq!(c.finish(), crc32_reference(&data));
        }
    }

    #[test]
    fn zeros_hash_to_zero() {
        // Spec §5 example 5: data CRC of 4096 zero bytes.
        assert_eq!(crc32(&[0u8; 4096]), 0);
        for len in [0, 1, 15, 16, 17, 4095] {
            let mut v = [0u8; 4096];
            assert!(is_zero(&v[..len]));
            assert_eq!(meta_crc(&v[..len]), crc32(v.get(4..len).unwrap_or(&[])));
            if len > 4 {
                v[len - 1] = 1;
                assert!(!is_zero(&v[..len]));
                assert_eq!(meta_crc(&v[..len]), crc32(&v[4..len]));
            }
        }
    }

    #[test]
    fn identity_with_zlib_crc() {
        // rfc_crc(d) = zlib(d) ^ zlib(zeros(len(d))), with zlib computed here
        // by the catalog's ISO-HDLC algorithm.
        let zlib = Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
        let data = b"pcache persistent memory cache";
        let zeros = [0u8; 30];
        assert_eq!(crc32(data), zlib.checksum(data) ^ zlib.checksum(&zeros));
    }

    #[test]
    fn pieces_equal_whole() {
        let data: [u8; 100] = core::array::from_fn(|i| (i * 7) as u8);
        let mut c = Crc32::new();
        c.update(&data[..33]);
        c.update(&data[33..]);
        assert_eq!(c.finish(), crc32(&data));
    }

    #[test]
    fn seal_then_verify() {
        let mut rec = [0u8; 16];
        rec[4] = 1;
        seal(&mut rec);
        assert_eq!(stored_crc(&rec), Some(meta_crc(&rec)));
        // Spec §5 example 2: tail {seq 1, cache_seg_id 0, seg_off 0}.
        assert_eq!(stored_crc(&rec), Some(0x9BA5_4C6F));
    }

    #[test]
    fn short_copies_do_not_panic() {
        assert_eq!(meta_crc(&[1, 2, 3]), 0);
        assert_eq!(stored_crc(&[1, 2, 3]), None);
        let mut short = [1u8, 2];
        seal(&mut short);
        assert_eq!(short, [1, 2]);
    }
}
