//! What a device already holds, recognised by the signatures `blkid` and
//! `wipefs` look for, so that `pcache format` does not destroy a filesystem,
//! a partition table or another cache by mistake.
//!
//! Everything here is a pure function of the first [`HEAD_LEN`] bytes of
//! the device; a device shorter than that is checked for what fits in it.

use std::fmt;
use std::io;

use pcache_format::{MAGIC, SB_OFF, SB_SIZE, Superblock};

/// How much of the start of a device the checks look at: up to the end of
/// the 64 KiB swap page and the btrfs superblock (at 64 KiB + 64).
pub const HEAD_LEN: u64 = 64 * 1024 + 4096;

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// This project's own (RFC v1) pcache superblock, valid or damaged.
    Pcache,
    /// A Linux dm-pcache cache (upstream superblock, CRC-32C).
    DmPcache,
    /// A bcache backing or cache device.
    Bcache,
    /// A LUKS encrypted volume.
    Luks,
    /// A Linux software RAID (md) member, superblock version 1.1 or 1.2.
    MdRaid,
    /// A GPT partition table.
    Gpt,
    /// An XFS filesystem.
    Xfs,
    /// An ext2, ext3 or ext4 filesystem (or an ext journal device).
    Ext,
    /// A btrfs filesystem.
    Btrfs,
    /// An NTFS filesystem.
    Ntfs,
    /// An exFAT filesystem.
    Exfat,
    /// A FAT12/16/32 (vfat) filesystem.
    Fat,
    /// An ISO 9660 filesystem.
    Iso9660,
    /// A swap area (or a hibernation image in one).
    Swap,
    /// An LVM2 physical volume.
    Lvm2,
    /// A DOS (MBR) partition table.
    Dos,
}

/// A signature found on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    /// Its kind.
    pub kind: Kind,
    /// What the device holds, with its article: "an ext4 filesystem".
    pub what: &'static str,
    /// What identified it: "its superblock magic".
    pub how: &'static str,
    /// Device offset of what identified it.
    pub offset: u64,
}

impl fmt::Display for Signature {
    /// `an ext4 filesystem (found by its superblock magic at byte 1080)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (found by {} at byte {})", self.what, self.how, self.offset)
    }
}

/// Reads the first [`HEAD_LEN`] bytes of a device of `size` bytes (all of
/// it if it is smaller) through `read(offset, buf)` and returns the first
/// signature found, in the order of [`detect_in`].
pub fn detect(read: impl FnOnce(u64, &mut [u8]) -> io::Result<()>, size: u64) -> io::Result<Option<Signature>> {
    let len = usize::try_from(size.min(HEAD_LEN)).unwrap_or(0);
    let mut head = vec![0u8; len];
    if len > 0 {
        read(0, &mut head)?;
    }
    Ok(detect_in(&head))
}

/// One check: the signature it looks for, if `head` holds it.
type Check = fn(&[u8]) -> Option<Signature>;

/// The first signature found in `head`, the start of a device (any length:
/// a check whose bytes lie past its end finds nothing).
///
/// The superblock at 4 KiB is looked at first (pcache's own and dm-pcache's
/// share the magic there), then bcache, LUKS, md, GPT, the filesystems,
/// swap, LVM2, and last the DOS partition table, whose boot signature FAT
/// and NTFS boot sectors also carry.
pub fn detect_in(head: &[u8]) -> Option<Signature> {
    let checks: [Check; 15] =
        [pcache_superblock, bcache, luks, md_raid, gpt, xfs, ext, btrfs, ntfs, exfat, fat, iso9660, swap, lvm2, dos];
    checks.iter().find_map(|check| check(head))
}

fn bytes(head: &[u8], off: usize, len: usize) -> Option<&[u8]> {
    head.get(off..off.checked_add(len)?)
}

fn has(head: &[u8], off: usize, magic: &[u8]) -> bool {
    bytes(head, off, magic.len()) == Some(magic)
}

fn le16(head: &[u8], off: usize) -> Option<u16> {
    bytes(head, off, 2)?.try_into().ok().map(u16::from_le_bytes)
}

fn le32(head: &[u8], off: usize) -> Option<u32> {
    bytes(head, off, 4)?.try_into().ok().map(u32::from_le_bytes)
}

fn le64(head: &[u8], off: usize) -> Option<u64> {
    bytes(head, off, 8)?.try_into().ok().map(u64::from_le_bytes)
}

fn sig(kind: Kind, what: &'static str, how: &'static str, offset: usize) -> Option<Signature> {
    Some(Signature { kind, what, how, offset: offset as u64 })
}

/// Seed of every dm-pcache CRC (spec §3.6).
const DM_PCACHE_CRC_SEED: u32 = 0x3_B15A;

/// Linux `crc32c(seed, data)`: reflected CRC-32C (Castagnoli), the register
/// starting at `seed`, no final inversion (spec §3.6).
fn crc32c(seed: u32, data: &[u8]) -> u32 {
    let mut crc = seed;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    crc
}

/// The superblock at 4 KiB with the pcache magic: dm-pcache's if its
/// CRC-32C over [4, 24) verifies and the RFC CRC-32 over [4, 4096) does not
/// (spec §3.5 vs §2.6.1), else this project's own format, valid or damaged
/// (as `pcache_pmem::format::existing_format` sees it).
fn pcache_superblock(head: &[u8]) -> Option<Signature> {
    let sb_off = SB_OFF as usize;
    let sb = bytes(head, sb_off, 24)?;
    if le64(sb, 8)? != MAGIC {
        return None;
    }
    let stored = le32(sb, 0)?;
    let dm_ok = crc32c(DM_PCACHE_CRC_SEED, sb.get(4..24)?) == stored;
    let rfc_ok = bytes(head, sb_off, SB_SIZE).is_some_and(|area| Superblock::computed_crc(area) == stored);
    if dm_ok && !rfc_ok {
        sig(Kind::DmPcache, "a Linux dm-pcache cache", "its superblock magic and CRC-32C", sb_off)
    } else {
        sig(Kind::Pcache, "a pcache superblock", "its magic", sb_off + 8)
    }
}

/// bcache's superblock magic, at 4 KiB + 24.
const BCACHE_MAGIC: [u8; 16] =
    [0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81];

fn bcache(head: &[u8]) -> Option<Signature> {
    let off = 4096 + 24;
    has(head, off, &BCACHE_MAGIC).then_some(())?;
    sig(Kind::Bcache, "a bcache device", "its superblock magic", off)
}

fn luks(head: &[u8]) -> Option<Signature> {
    has(head, 0, b"LUKS\xba\xbe").then_some(())?;
    sig(Kind::Luks, "a LUKS encrypted volume", "its header magic", 0)
}

/// md superblock 1.1 (at 0) and 1.2 (at 4 KiB); 0.90 and 1.0 live at the
/// end of the device and are not looked for.
fn md_raid(head: &[u8]) -> Option<Signature> {
    const MD_MAGIC: u32 = 0xa92b_4efc;
    let off = [0usize, 4096].into_iter().find(|&off| le32(head, off) == Some(MD_MAGIC))?;
    sig(Kind::MdRaid, "a Linux software RAID (md) member", "its superblock magic", off)
}

/// The GPT header at LBA 1, for 512-byte or 4 KiB sectors.
fn gpt(head: &[u8]) -> Option<Signature> {
    let off = [512usize, 4096].into_iter().find(|&off| has(head, off, b"EFI PART"))?;
    sig(Kind::Gpt, "a GPT partition table", "its header signature", off)
}

fn xfs(head: &[u8]) -> Option<Signature> {
    has(head, 0, b"XFSB").then_some(())?;
    sig(Kind::Xfs, "an XFS filesystem", "its superblock magic", 0)
}

/// The ext2/3/4 superblock at 1024, magic 0xEF53 at 1024 + 56, told apart
/// by its feature flags as `blkid` does.
fn ext(head: &[u8]) -> Option<Signature> {
    const SB: usize = 1024;
    const MAGIC_OFF: usize = SB + 56;
    if le16(head, MAGIC_OFF)? != 0xEF53 {
        return None;
    }
    let how = "its superblock magic";
    // s_feature_compat, s_feature_incompat, s_feature_ro_compat.
    let (Some(compat), Some(incompat), Some(ro_compat)) =
        (le32(head, SB + 0x5C), le32(head, SB + 0x60), le32(head, SB + 0x64))
    else {
        return sig(Kind::Ext, "an ext2/ext3/ext4 filesystem", how, MAGIC_OFF);
    };
    const COMPAT_HAS_JOURNAL: u32 = 0x4;
    const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
    // What ext3 understands; anything else is ext4's.
    const EXT3_INCOMPAT: u32 = 0x2 | 0x4 | 0x10; // FILETYPE, RECOVER, META_BG
    const EXT3_RO_COMPAT: u32 = 0x1 | 0x2 | 0x4; // SPARSE_SUPER, LARGE_FILE, BTREE_DIR
    let what = if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        "an ext3/ext4 external journal"
    } else if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        "an ext4 filesystem"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "an ext3 filesystem"
    } else {
        "an ext2 filesystem"
    };
    sig(Kind::Ext, what, how, MAGIC_OFF)
}

fn btrfs(head: &[u8]) -> Option<Signature> {
    let off = 64 * 1024 + 64;
    has(head, off, b"_BHRfS_M").then_some(())?;
    sig(Kind::Btrfs, "a btrfs filesystem", "its superblock magic", off)
}

fn ntfs(head: &[u8]) -> Option<Signature> {
    has(head, 3, b"NTFS    ").then_some(())?;
    sig(Kind::Ntfs, "an NTFS filesystem", "its boot sector OEM id", 3)
}

fn exfat(head: &[u8]) -> Option<Signature> {
    has(head, 3, b"EXFAT   ").then_some(())?;
    sig(Kind::Exfat, "an exFAT filesystem", "its boot sector OEM id", 3)
}

const BOOT_SIGNATURE: [u8; 2] = [0x55, 0xAA];

/// A FAT boot sector: the file system type string of a FAT12/16 or FAT32
/// BIOS parameter block, and the boot signature at 510.
fn fat(head: &[u8]) -> Option<Signature> {
    if !has(head, 510, &BOOT_SIGNATURE) {
        return None;
    }
    let how = "its boot sector type string";
    if has(head, 54, b"FAT12   ") {
        sig(Kind::Fat, "a FAT12 (vfat) filesystem", how, 54)
    } else if has(head, 54, b"FAT16   ") {
        sig(Kind::Fat, "a FAT16 (vfat) filesystem", how, 54)
    } else if has(head, 82, b"FAT32   ") {
        sig(Kind::Fat, "a FAT32 (vfat) filesystem", how, 82)
    } else {
        None
    }
}

/// The primary volume descriptor's standard identifier, sector 16 of 2 KiB.
fn iso9660(head: &[u8]) -> Option<Signature> {
    let off = 16 * 2048 + 1;
    has(head, off, b"CD001").then_some(())?;
    sig(Kind::Iso9660, "an ISO 9660 filesystem", "its volume descriptor", off)
}

/// The swap signature in the last 10 bytes of the first page, for pages of
/// 4, 8, 16 and 64 KiB.
fn swap(head: &[u8]) -> Option<Signature> {
    for page in [4096usize, 8192, 16384, 65536] {
        let off = page - 10;
        if has(head, off, b"SWAPSPACE2") || has(head, off, b"SWAP-SPACE") {
            return sig(Kind::Swap, "a swap area", "its signature", off);
        }
        let suspend: [&[u8]; 4] = [b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001"];
        if suspend.iter().any(|m| has(head, off, m)) {
            return sig(Kind::Swap, "a swap area holding a hibernation image", "its signature", off);
        }
    }
    None
}

/// The LVM2 label, in any of the first four sectors.
fn lvm2(head: &[u8]) -> Option<Signature> {
    let off =
        (0..4usize).map(|s| s * 512).find(|&off| has(head, off, b"LABELONE") && has(head, off + 24, b"LVM2 001"))?;
    sig(Kind::Lvm2, "an LVM2 physical volume", "its label", off)
}

/// A DOS partition table: the boot signature, at least one partition entry
/// in use, and every entry's boot flag 0x00 or 0x80.
fn dos(head: &[u8]) -> Option<Signature> {
    if !has(head, 510, &BOOT_SIGNATURE) {
        return None;
    }
    let mut used = false;
    for i in 0..4 {
        let entry = bytes(head, 446 + 16 * i, 16)?;
        let (boot, kind) = (*entry.first()?, *entry.get(4)?);
        if boot != 0x00 && boot != 0x80 {
            return None;
        }
        used |= kind != 0;
    }
    used.then_some(())?;
    sig(Kind::Dos, "a DOS (MBR) partition table", "its boot signature and partition entries", 510)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros() -> Vec<u8> {
        vec![0u8; HEAD_LEN as usize]
    }

    fn put(head: &mut [u8], off: usize, data: &[u8]) {
        head[off..off + data.len()].copy_from_slice(data);
    }

    fn found(head: &[u8]) -> (Kind, &'static str, u64) {
        let s = detect_in(head).expect("a signature");
        (s.kind, s.what, s.offset)
    }

    /// A tiny xorshift generator: the same "random" bytes on every run.
    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn ext_sb(compat: u32, incompat: u32, ro_compat: u32) -> Vec<u8> {
        let mut h = zeros();
        put(&mut h, 1080, &0xEF53u16.to_le_bytes());
        put(&mut h, 1024 + 0x5C, &compat.to_le_bytes());
        put(&mut h, 1024 + 0x60, &incompat.to_le_bytes());
        put(&mut h, 1024 + 0x64, &ro_compat.to_le_bytes());
        h
    }

    #[test]
    fn nothing_on_zeros_random_or_short_input() {
        assert_eq!(detect_in(&zeros()), None);
        for seed in 1..=64 {
            assert_eq!(detect_in(&random(seed, HEAD_LEN as usize)), None, "seed {seed}");
        }
        for len in [0usize, 1, 3, 10, 511, 512, 600, 1081, 4097, 4119, 8191, 32770, 65609] {
            assert_eq!(detect_in(&vec![0u8; len]), None, "{len}");
        }
    }

    #[test]
    fn ext_flavours() {
        // mke2fs defaults: ext2 = ext_attr, resize_inode, dir_index,
        // filetype, sparse_super, large_file.
        assert_eq!(found(&ext_sb(0x38, 0x2, 0x3)), (Kind::Ext, "an ext2 filesystem", 1080));
        assert_eq!(found(&ext_sb(0x3C, 0x2, 0x3)), (Kind::Ext, "an ext3 filesystem", 1080));
        // ext4: extents, 64bit, flex_bg; metadata_csum.
        assert_eq!(found(&ext_sb(0x3C, 0x2C2, 0x46B)), (Kind::Ext, "an ext4 filesystem", 1080));
        assert_eq!(found(&ext_sb(0x3C, 0x2, 0x40)).1, "an ext4 filesystem");
        assert_eq!(found(&ext_sb(0, 0x8, 0)).1, "an ext3/ext4 external journal");
        // Cut off after the magic: still reported, flavour unknown.
        let h = ext_sb(0x3C, 0x2C2, 0x46B);
        assert_eq!(found(&h[..1100]), (Kind::Ext, "an ext2/ext3/ext4 filesystem", 1080));
        assert_eq!(detect_in(&h[..1081]), None);
        assert_eq!(
            detect_in(&h).unwrap().to_string(),
            "an ext4 filesystem (found by its superblock magic at byte 1080)"
        );
    }

    #[test]
    fn filesystems() {
        let mut h = zeros();
        put(&mut h, 0, b"XFSB");
        assert_eq!(found(&h), (Kind::Xfs, "an XFS filesystem", 0));

        let mut h = zeros();
        put(&mut h, 65600, b"_BHRfS_M");
        assert_eq!(found(&h), (Kind::Btrfs, "a btrfs filesystem", 65600));
        assert_eq!(detect_in(&h[..65607]), None);

        let mut h = zeros();
        put(&mut h, 3, b"NTFS    ");
        put(&mut h, 510, &BOOT_SIGNATURE);
        put(&mut h, 446, &[0x80, 1, 1, 0, 0x07]); // boot code that looks like an entry
        assert_eq!(found(&h), (Kind::Ntfs, "an NTFS filesystem", 3));

        let mut h = zeros();
        put(&mut h, 3, b"EXFAT   ");
        put(&mut h, 510, &BOOT_SIGNATURE);
        assert_eq!(found(&h), (Kind::Exfat, "an exFAT filesystem", 3));

        let mut h = zeros();
        put(&mut h, 32769, b"CD001");
        assert_eq!(found(&h), (Kind::Iso9660, "an ISO 9660 filesystem", 32769));
    }

    #[test]
    fn fat_is_not_mistaken_for_a_partition_table() {
        for (off, name, what) in [
            (54, b"FAT12   ", "a FAT12 (vfat) filesystem"),
            (54, b"FAT16   ", "a FAT16 (vfat) filesystem"),
            (82, b"FAT32   ", "a FAT32 (vfat) filesystem"),
        ] {
            let mut h = zeros();
            put(&mut h, 3, b"mkfs.fat");
            put(&mut h, off, name);
            put(&mut h, 510, &BOOT_SIGNATURE);
            // Boot code bytes where a partition table would be.
            put(&mut h, 446, &[0x00, 0x20, 0x21, 0x00, 0x0c]);
            assert_eq!(found(&h), (Kind::Fat, what, off as u64));
            // Without the boot signature it is not FAT (nor anything else).
            put(&mut h, 510, &[0, 0]);
            assert_eq!(detect_in(&h), None);
        }
    }

    #[test]
    fn partition_tables() {
        // A protective MBR and a GPT header at LBA 1.
        let mut h = zeros();
        put(&mut h, 446, &[0x00, 0x00, 0x02, 0x00, 0xEE, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        put(&mut h, 510, &BOOT_SIGNATURE);
        put(&mut h, 512, b"EFI PART");
        assert_eq!(found(&h), (Kind::Gpt, "a GPT partition table", 512));
        // 4 KiB sectors.
        let mut h = zeros();
        put(&mut h, 4096, b"EFI PART");
        assert_eq!(found(&h), (Kind::Gpt, "a GPT partition table", 4096));

        // DOS: one Linux partition.
        let mut h = zeros();
        put(&mut h, 446 + 16, &[0x80, 0x20, 0x21, 0x00, 0x83]);
        put(&mut h, 510, &BOOT_SIGNATURE);
        assert_eq!(found(&h), (Kind::Dos, "a DOS (MBR) partition table", 510));
        // A bad boot flag, or no entry in use: not a partition table.
        let mut bad = h.clone();
        put(&mut bad, 446 + 48, &[0x12]);
        assert_eq!(detect_in(&bad), None);
        let mut empty = zeros();
        put(&mut empty, 510, &BOOT_SIGNATURE);
        assert_eq!(detect_in(&empty), None);
        assert_eq!(detect_in(&h[..511]), None);
        assert_eq!(found(&h[..512]).0, Kind::Dos);
    }

    #[test]
    fn swap_for_every_page_size() {
        for off in [4086usize, 8182, 16374, 65526] {
            for magic in [&b"SWAPSPACE2"[..], b"SWAP-SPACE"] {
                let mut h = zeros();
                put(&mut h, off, magic);
                assert_eq!(found(&h), (Kind::Swap, "a swap area", off as u64));
            }
            let mut h = zeros();
            put(&mut h, off, b"S1SUSPEND");
            assert_eq!(found(&h), (Kind::Swap, "a swap area holding a hibernation image", off as u64));
        }
        let mut h = zeros();
        put(&mut h, 4086, b"SWAPSPACE2");
        assert_eq!(detect_in(&h[..4095]), None);
    }

    #[test]
    fn lvm2_label_in_any_of_the_first_four_sectors() {
        for sector in 0..4 {
            let mut h = zeros();
            put(&mut h, sector * 512, b"LABELONE");
            put(&mut h, sector * 512 + 24, b"LVM2 001");
            assert_eq!(found(&h), (Kind::Lvm2, "an LVM2 physical volume", sector as u64 * 512));
        }
        let mut h = zeros();
        put(&mut h, 4 * 512, b"LABELONE");
        put(&mut h, 4 * 512 + 24, b"LVM2 001");
        assert_eq!(detect_in(&h), None, "sector 4 is not looked at");
        let mut h = zeros();
        put(&mut h, 512, b"LABELONE");
        assert_eq!(detect_in(&h), None, "the label without its type");
    }

    #[test]
    fn luks_bcache_md() {
        let mut h = zeros();
        put(&mut h, 0, b"LUKS\xba\xbe\x00\x02");
        assert_eq!(found(&h), (Kind::Luks, "a LUKS encrypted volume", 0));

        let mut h = zeros();
        put(&mut h, 4096 + 24, &BCACHE_MAGIC);
        assert_eq!(found(&h), (Kind::Bcache, "a bcache device", 4120));
        assert_eq!(detect_in(&h[..4135]), None);

        for off in [0usize, 4096] {
            let mut h = zeros();
            put(&mut h, off, &0xa92b_4efcu32.to_le_bytes());
            assert_eq!(found(&h), (Kind::MdRaid, "a Linux software RAID (md) member", off as u64));
        }
    }

    #[test]
    fn crc32c_matches_the_spec() {
        // Spec §3.6 check value and §5 example 6.
        assert_eq!(crc32c(DM_PCACHE_CRC_SEED, b"123456789"), 0xE586_8AB2);
        assert_eq!(crc32c(DM_PCACHE_CRC_SEED, &[0u8; 20]), 0xB9B6_9066);
    }

    /// Spec §5 example 6: a dm-pcache superblock, flags 0, seg_num 100.
    const DM_SB: [u8; 24] = [
        0xee, 0x53, 0x76, 0x0e, 0x00, 0x00, 0x00, 0x00, 0xef, 0x96, 0xc5, 0x96, 0xfa, 0x5e, 0xb0, 0x65, 0x64, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn dm_pcache_and_our_own_superblock_are_told_apart() {
        let mut h = zeros();
        put(&mut h, 4096, &DM_SB);
        assert_eq!(found(&h), (Kind::DmPcache, "a Linux dm-pcache cache", 4096));
        assert_eq!(found(&h[..4096 + 24]).0, Kind::DmPcache, "only the 24-byte struct is needed");
        // Whatever dm-pcache's flags and seg_num, sealed with its CRC.
        let mut sb = DM_SB;
        sb[4] = 1; // flags 1 reads as RFC version 1, flags 0
        sb[16..20].copy_from_slice(&70_000u32.to_le_bytes());
        let crc = crc32c(DM_PCACHE_CRC_SEED, &sb[4..24]);
        sb[..4].copy_from_slice(&crc.to_le_bytes());
        put(&mut h, 4096, &sb);
        assert_eq!(found(&h).0, Kind::DmPcache);
        // A damaged dm-pcache superblock still carries the magic: reported as
        // a pcache superblock, which format refuses just the same.
        h[4096 + 20] ^= 1;
        assert_eq!(found(&h).0, Kind::Pcache);

        // Our own RFC v1 superblock, valid and damaged.
        let mut h = zeros();
        put(&mut h, 4096, &Superblock::encode_area(100));
        assert_eq!(found(&h), (Kind::Pcache, "a pcache superblock", 4104));
        h[4096 + 3000] ^= 1;
        assert_eq!(found(&h).0, Kind::Pcache);
        // Ours wins over what an old format left in the first 4 KiB.
        put(&mut h, 1080, &0xEF53u16.to_le_bytes());
        assert_eq!(found(&h).0, Kind::Pcache);
        // No magic, no superblock.
        h[4096 + 8] ^= 1;
        assert_eq!(found(&h).0, Kind::Ext);
    }

    #[test]
    fn detect_reads_only_what_the_device_has() {
        let mut dev = vec![0u8; 2048];
        put(&mut dev, 1080, &0xEF53u16.to_le_bytes());
        let read = |off: u64, buf: &mut [u8]| -> io::Result<()> {
            let off = off as usize;
            let src = dev.get(off..off + buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        };
        assert_eq!(detect(read, 2048).unwrap().map(|s| s.kind), Some(Kind::Ext));
        assert_eq!(detect(|_, _| panic!("nothing to read"), 0).unwrap(), None);
        let big = |off: u64, buf: &mut [u8]| -> io::Result<()> {
            assert_eq!((off, buf.len() as u64), (0, HEAD_LEN));
            Ok(())
        };
        assert_eq!(detect(big, 1 << 40).unwrap(), None);
        let failing = |_: u64, _: &mut [u8]| -> io::Result<()> { Err(io::Error::other("media error")) };
        assert!(detect(failing, 1 << 30).is_err());
    }
}
