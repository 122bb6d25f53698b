//! The info block at the start of a Linux NVDIMM namespace in fsdax or
//! devdax mode, to find where the pmem device's bytes start in a namespace
//! image (a QEMU NVDIMM backing file, a raw namespace dump).
//!
//! An fsdax namespace begins with a 4 KiB PFN info block at offset 4096
//! (signature `NVDIMM_PFN_INFO\0`; a devdax one says `NVDIMM_DAX_INFO\0`):
//! `/dev/pmemN` byte 0 is namespace byte `dataoff` (le64 at +56 of the
//! block), after the memmap the kernel keeps there. The block ends with a
//! Fletcher-64 checksum (le64 at +4088) over the block with that field
//! zeroed, which is checked here as the kernel checks it.

use crate::consts::PAGE_SIZE;

/// Offset of the info block in the namespace.
pub const PFN_INFO_OFF: u64 = 4096;
/// Size of the info block.
pub const PFN_INFO_SIZE: usize = PAGE_SIZE;
/// Signature of an fsdax namespace's block.
pub const PFN_SIGNATURE: &[u8; 16] = b"NVDIMM_PFN_INFO\0";
/// Signature of a devdax namespace's block.
pub const DAX_SIGNATURE: &[u8; 16] = b"NVDIMM_DAX_INFO\0";

const DATAOFF_AT: usize = 56;
const CHECKSUM_AT: usize = PFN_INFO_SIZE - 8;

/// What an info block says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfnInfo {
    /// The namespace is in devdax mode (else fsdax).
    pub devdax: bool,
    /// Where the device's bytes start in the namespace.
    pub dataoff: u64,
}

/// The Linux `nd_fletcher64` of `data` (little-endian 32-bit words; a
/// trailing partial word is ignored).
pub fn fletcher64(data: &[u8]) -> u64 {
    let (mut lo, mut hi) = (0u32, 0u32);
    for w in data.chunks_exact(4) {
        lo = lo.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        hi = hi.wrapping_add(lo);
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Decodes the info block `block` (the 4 KiB at namespace offset 4096) of a
/// namespace of `size` bytes: `None` unless the signature, the checksum and
/// a `dataoff` inside the namespace, past the block and 4 KiB aligned, all
/// say it is one.
///
/// ```
/// use pcache_format::pfn::{PfnInfo, encode, decode};
/// let block = encode(false, 18 << 20);
/// assert_eq!(decode(&block, 1 << 30), Some(PfnInfo { devdax: false, dataoff: 18 << 20 }));
/// let mut bad = block;
/// bad[100] ^= 1;
/// assert_eq!(decode(&bad, 1 << 30), None);
/// ```
pub fn decode(block: &[u8], size: u64) -> Option<PfnInfo> {
    let block = block.get(..PFN_INFO_SIZE)?;
    let devdax = match block.get(..16)? {
        s if s == PFN_SIGNATURE => false,
        s if s == DAX_SIGNATURE => true,
        _ => return None,
    };
    let stored = u64::from_le_bytes(block.get(CHECKSUM_AT..)?.try_into().ok()?);
    let mut copy = [0u8; PFN_INFO_SIZE];
    copy.copy_from_slice(block);
    copy[CHECKSUM_AT..].fill(0);
    if fletcher64(&copy) != stored {
        return None;
    }
    let dataoff = u64::from_le_bytes(block.get(DATAOFF_AT..DATAOFF_AT + 8)?.try_into().ok()?);
    let fits = dataoff >= PFN_INFO_OFF + PFN_INFO_SIZE as u64 && dataoff < size && dataoff % PAGE_SIZE as u64 == 0;
    fits.then_some(PfnInfo { devdax, dataoff })
}

/// An info block saying `dataoff` (only the fields read here, and the
/// checksum): for tests and for making namespace images.
pub fn encode(devdax: bool, dataoff: u64) -> [u8; PFN_INFO_SIZE] {
    let mut block = [0u8; PFN_INFO_SIZE];
    block[..16].copy_from_slice(if devdax { DAX_SIGNATURE } else { PFN_SIGNATURE });
    block[DATAOFF_AT..DATAOFF_AT + 8].copy_from_slice(&dataoff.to_le_bytes());
    let sum = fletcher64(&block);
    block[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fletcher_of_known_words() {
        // Words 1, 2, 3: lo = 6, hi = 1 + 3 + 6 = 10.
        let data = [1u8, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0xff];
        assert_eq!(fletcher64(&data), (10 << 32) | 6);
    }

    #[test]
    fn refuses_what_is_not_a_usable_block() {
        let size = 1 << 30;
        assert_eq!(decode(&encode(true, 2 << 20), size), Some(PfnInfo { devdax: true, dataoff: 2 << 20 }));
        assert_eq!(decode(&[0u8; PFN_INFO_SIZE], size), None);
        assert_eq!(decode(&encode(false, 4096), size), None, "dataoff inside the block");
        assert_eq!(decode(&encode(false, size), size), None, "dataoff past the end");
        assert_eq!(decode(&encode(false, (2 << 20) + 1), size), None, "unaligned");
        assert_eq!(decode(&encode(false, 2 << 20)[..100], size), None, "short");
    }
}
