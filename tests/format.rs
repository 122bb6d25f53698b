//! End-to-end tests of `pcache format`'s refusals: devices that hold
//! something (a filesystem, a partition table, swap, another cache), and
//! files the filesystem has no room for; and of its allocating the whole
//! file.
//!
//! Tests that need `mkfs.ext4` (e2fsprogs), `mkswap` and `blkid`
//! (util-linux) or `sfdisk` (fdisk) fail when one is missing and CI=true,
//! and otherwise say loudly that they were skipped.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// `name` on PATH or in the sbin folders a non-root PATH lacks; `None`
/// (after saying so) when it is missing outside CI; a panic in CI.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    let found = dirs.map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is missing (Debian package {package}); CI=true requires it"
        );
        eprintln!("\n*** skipped: {name} missing (Debian package {package}) ***\n");
    }
    found
}

fn run_tool(tool: &Path, args: &[&str], stdin: Option<&str>) {
    let mut cmd = Command::new(tool);
    cmd.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}", tool.display()));
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        std::io::Write::write_all(&mut input, text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}{}",
        tool.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `blkid -p -o export`: every signature libblkid's low-level probe finds
/// at the start of `file`, as `KEY=value` lines (empty when none).
fn blkid(blkid: &Path, file: &Path) -> String {
    let out = Command::new(blkid).args(["-p", "-o", "export", s(file)]).output().unwrap();
    // Exit status 2: nothing found.
    assert!(matches!(out.status.code(), Some(0 | 2)), "blkid: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sparse file of `size` bytes.
fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(data, off).unwrap();
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut buf, off).unwrap();
    buf
}

/// What a refusal must leave unchanged: the first 128 KiB, the size and
/// the allocated blocks (a refused format allocates nothing either).
fn snapshot(path: &Path) -> (Vec<u8>, u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (read_at(path, 0, 128 << 10), meta.len(), meta.blocks())
}

/// Bytes an unprivileged user may still allocate on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let d = std::fs::File::open(dir).unwrap();
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs fills the live local through the pointer, on an fd
    // this test owns.
    assert_eq!(unsafe { libc::fstatvfs(d.as_raw_fd(), &mut st) }, 0);
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    avail * frsize
}

/// Asserts that every byte of `path` is allocated: its blocks cover its
/// size. (SEEK_HOLE cannot tell: ext4 reports fallocated, unwritten extents
/// as holes.)
fn assert_fully_allocated(path: &Path) {
    let meta = std::fs::metadata(path).unwrap();
    assert!(meta.blocks() * 512 >= meta.len(), "{} of {} bytes allocated", meta.blocks() * 512, meta.len());
}

/// `format` without --force refuses `dev`, naming `what`, and changes
/// nothing; with --force it formats it and says what it destroyed; after
/// that, with pcache's own superblock wiped, nothing else is recognised on
/// it any more (a second format without --force goes through).
fn refused_then_forced(dev: &Path, what: &str) {
    let before = snapshot(dev);
    let o = pcache(&["format", s(dev)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains(&format!("{}: holds {what}", s(dev))), "{what}: {err}");
    assert!(err.contains("add --force to destroy it"), "{err}");
    assert_eq!(snapshot(dev), before, "a refused format touches nothing");

    let o = pcache(&["format", "--force", s(dev)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let what_only = what.split(" (found by").next().unwrap();
    assert!(stdout(&o).contains(&format!("note      {what_only} on it was destroyed (--force)")), "{}", stdout(&o));
    assert_eq!(code(&pcache(&["check", s(dev)])), 0);

    let o = pcache(&["format", s(dev)]);
    assert!(stderr(&o).contains("already holds a pcache superblock"), "{}", stderr(&o));
    write_at(dev, 4096, &[0u8; 4096]);
    let o = pcache(&["format", s(dev)]);
    assert_eq!(code(&o), 0, "{what}: something is still recognised after --force: {}", stderr(&o));
}

#[test]
fn format_refuses_an_ext4_filesystem_and_wipes_it_with_force() {
    let Some(mkfs) = tool("mkfs.ext4", "e2fsprogs") else { return };
    let blkid_tool = tool("blkid", "util-linux");
    let d = Dir::new();
    let dev = d.path("ext4.img");
    sparse_file(&dev, GIB);
    run_tool(&mkfs, &["-F", "-q", s(&dev)], None);
    if let Some(b) = &blkid_tool {
        assert!(blkid(b, &dev).contains("TYPE=ext4"), "{}", blkid(b, &dev));
    }
    let before = snapshot(&dev);
    let o = pcache(&["format", s(&dev)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains(
            "holds an ext4 filesystem (found by its superblock magic at byte 1080); add --force to destroy it"
        ),
        "{}",
        stderr(&o)
    );
    assert_eq!(snapshot(&dev), before);

    let o = pcache(&["format", "--force", s(&dev)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("an ext4 filesystem on it was destroyed (--force)"), "{}", stdout(&o));
    if let Some(b) = &blkid_tool {
        let found = blkid(b, &dev);
        assert!(!found.contains("TYPE="), "blkid still finds: {found}");
    }
    assert_eq!(code(&pcache(&["check", s(&dev)])), 0);
    // What it is now is a pcache device, not an ext4 one.
    let o = pcache(&["format", s(&dev)]);
    assert!(stderr(&o).contains("already holds a pcache superblock"), "{}", stderr(&o));
}

#[test]
fn format_refuses_swap_for_4k_and_64k_pages() {
    let Some(mkswap) = tool("mkswap", "util-linux") else { return };
    let blkid_tool = tool("blkid", "util-linux");
    let d = Dir::new();
    for (page, at) in [("4096", 4086), ("65536", 65526)] {
        let dev = d.path(&format!("swap{page}.img"));
        sparse_file(&dev, 512 * MIB);
        run_tool(&mkswap, &["-q", "-p", page, s(&dev)], None);
        refused_then_forced(&dev, &format!("a swap area (found by its signature at byte {at})"));
        if let Some(b) = &blkid_tool {
            assert_eq!(blkid(b, &dev), "");
        }
    }
}

#[test]
fn format_refuses_gpt_and_dos_partition_tables() {
    let Some(sfdisk) = tool("sfdisk", "fdisk") else { return };
    let blkid_tool = tool("blkid", "util-linux");
    let d = Dir::new();
    for (label, what) in [
        ("gpt", "a GPT partition table (found by its header signature at byte 512)"),
        ("dos", "a DOS (MBR) partition table (found by its boot signature and partition entries at byte 510)"),
    ] {
        let dev = d.path(&format!("{label}.img"));
        sparse_file(&dev, 512 * MIB);
        run_tool(
            &sfdisk,
            &["-q", "--no-reread", "--no-tell-kernel", s(&dev)],
            Some(&format!("label: {label}\n,64M\n")),
        );
        if let Some(b) = &blkid_tool {
            assert!(blkid(b, &dev).contains(&format!("PTTYPE={label}")), "{}", blkid(b, &dev));
        }
        refused_then_forced(&dev, what);
        if let Some(b) = &blkid_tool {
            assert_eq!(blkid(b, &dev), "", "{label}");
        }
    }
}

/// Spec §5 example 6: a Linux dm-pcache superblock (flags 0, seg_num 100).
const DM_PCACHE_SB: [u8; 24] = [
    0xee, 0x53, 0x76, 0x0e, 0x00, 0x00, 0x00, 0x00, 0xef, 0x96, 0xc5, 0x96, 0xfa, 0x5e, 0xb0, 0x65, 0x64, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00,
];

/// Bytes to write, at their offsets.
type Writes = Vec<(u64, Vec<u8>)>;

#[test]
fn format_names_every_signature_it_refuses() {
    let bcache = [0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81];
    let mut fat32 = vec![0u8; 512];
    fat32[3..11].copy_from_slice(b"mkfs.fat");
    fat32[82..90].copy_from_slice(b"FAT32   ");
    fat32[446..451].copy_from_slice(&[0x80, 0x20, 0x21, 0x00, 0x0c]); // boot code, not a partition
    fat32[510..512].copy_from_slice(&[0x55, 0xAA]);
    let cases: Vec<(Writes, &str)> = vec![
        (vec![(1080, vec![0x53, 0xEF])], "an ext2 filesystem (found by its superblock magic at byte 1080)"),
        (vec![(0, b"XFSB".to_vec())], "an XFS filesystem (found by its superblock magic at byte 0)"),
        (vec![(65600, b"_BHRfS_M".to_vec())], "a btrfs filesystem (found by its superblock magic at byte 65600)"),
        (vec![(16374, b"SWAPSPACE2".to_vec())], "a swap area (found by its signature at byte 16374)"),
        (
            vec![(1024, b"LABELONE".to_vec()), (1048, b"LVM2 001".to_vec())],
            "an LVM2 physical volume (found by its label at byte 1024)",
        ),
        (vec![(4096, b"EFI PART".to_vec())], "a GPT partition table (found by its header signature at byte 4096)"),
        (vec![(0, fat32)], "a FAT32 (vfat) filesystem (found by its boot sector type string at byte 82)"),
        (vec![(3, b"NTFS    ".to_vec())], "an NTFS filesystem (found by its boot sector OEM id at byte 3)"),
        (vec![(32769, b"CD001".to_vec())], "an ISO 9660 filesystem (found by its volume descriptor at byte 32769)"),
        (vec![(0, b"LUKS\xba\xbe\x00\x02".to_vec())], "a LUKS encrypted volume (found by its header magic at byte 0)"),
        (vec![(4120, bcache.to_vec())], "a bcache device (found by its superblock magic at byte 4120)"),
        (
            vec![(4096, DM_PCACHE_SB.to_vec())],
            "a Linux dm-pcache cache (found by its superblock magic and CRC-32C at byte 4096)",
        ),
    ];
    let d = Dir::new();
    for (i, (writes, what)) in cases.into_iter().enumerate() {
        let dev = d.path(&format!("dev{i}.img"));
        sparse_file(&dev, 512 * MIB);
        for (off, data) in &writes {
            write_at(&dev, *off, data);
        }
        refused_then_forced(&dev, what);
        std::fs::remove_file(&dev).unwrap();
    }
}

#[test]
fn our_own_format_is_not_taken_for_dm_pcache() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    assert_eq!(code(&pcache(&["format", s(&dev), "--size", "512M"])), 0);
    for damaged in [false, true] {
        if damaged {
            // A bad CRC: still pcache's superblock, still refused as such.
            write_at(&dev, 4096 + 3000, &[0x5a]);
        }
        let o = pcache(&["format", s(&dev)]);
        assert_eq!(code(&o), 1);
        let err = stderr(&o);
        assert!(err.contains("already holds a pcache superblock") && err.contains("--force"), "{err}");
        assert!(!err.contains("dm-pcache"), "{err}");
    }
    let o = pcache(&["format", "--force", s(&dev)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("the previous pcache format was overwritten (--force)"), "{}", stdout(&o));
}

#[test]
fn format_allocates_the_whole_file() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let o = pcache(&["format", s(&dev), "--size", "1G"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&dev).unwrap().len(), GIB);
    assert_fully_allocated(&dev);

    // An existing sparse file is allocated too.
    let existing = d.path("existing.img");
    sparse_file(&existing, 768 * MIB);
    let o = pcache(&["format", s(&existing)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_fully_allocated(&existing);
    assert_eq!(std::fs::metadata(&existing).unwrap().len(), 768 * MIB);

    // --sparse leaves it sparse, and says so.
    let sparse = d.path("sparse.img");
    let o = pcache(&["format", s(&sparse), "--size", "1G", "--sparse"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("--sparse: the file's holes are not allocated"), "{}", stdout(&o));
    assert!(std::fs::metadata(&sparse).unwrap().blocks() * 512 < 64 * MIB);
    assert_eq!(code(&pcache(&["check", s(&sparse)])), 0);
}

#[test]
fn a_size_no_filesystem_can_hold_leaves_no_file() {
    let d = Dir::new();
    let dev = d.path("huge.img");
    let o = pcache(&["format", s(&dev), "--size", "8P"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("cannot allocate 8.00 PiB (9007199254740992 bytes) for"), "{err}");
    assert!(err.contains("huge.img"), "{err}");
    assert!(!dev.exists(), "a refused format leaves no file behind");
    // Sparse, the filesystem's largest file size stops it: no file either.
    let o = pcache(&["format", s(&dev), "--size", "8P", "--sparse"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stderr(&o).contains("cannot size"), "{}", stderr(&o));
    assert!(!dev.exists(), "a failed format leaves no file behind");
}

#[test]
fn a_size_beyond_the_free_space_is_refused() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let size = (free_bytes(d.dir.path()) + GIB) / MIB * MIB;
    let o = pcache(&["format", s(&dev), "--size", &size.to_string()]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("cannot allocate") && err.contains("its filesystem has only"), "{err}");
    assert!(err.contains(&format!("({size} bytes)")), "{err}");
    assert!(!dev.exists(), "a refused format leaves no file behind");

    // An existing sparse file of that size: refused, left as it was.
    sparse_file(&dev, size);
    let before = std::fs::metadata(&dev).unwrap().blocks();
    let o = pcache(&["format", s(&dev)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stderr(&o).contains("its filesystem has only"), "{}", stderr(&o));
    let meta = std::fs::metadata(&dev).unwrap();
    assert_eq!((meta.len(), meta.blocks()), (size, before));
    assert_eq!(read_at(&dev, 4096, 4096), vec![0u8; 4096], "nothing written");
}

#[test]
fn tiny_files_are_refused_without_a_crash() {
    let d = Dir::new();
    for len in [1u64, 600, 4100, 70_000] {
        let dev = d.path(&format!("tiny{len}.img"));
        std::fs::write(&dev, vec![0x55u8; len as usize]).unwrap();
        for args in [vec!["format", s(&dev)], vec!["format", "--force", s(&dev)]] {
            let o = pcache(&args);
            assert_eq!(code(&o), 1, "{len}: {}", stderr(&o));
            assert!(stderr(&o).contains("at least 536870912 (512 MiB)"), "{len}: {}", stderr(&o));
        }
        assert_eq!(std::fs::read(&dev).unwrap(), vec![0x55u8; len as usize]);
    }
}
