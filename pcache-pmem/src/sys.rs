//! The few system calls beyond `std` that pcache needs for the devices it
//! opens: advisory locks and who holds them, block device sizes, holes in
//! files. Each returns `io::Result`, its return code checked.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// What kind of file `meta` describes, in words for error messages.
pub fn file_kind(meta: &Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Takes an exclusive `flock` on `file` without waiting; `WouldBlock` if
/// another open file holds one.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pid holding a `flock` on the file `meta` describes, from
/// `/proc/locks` (best effort).
pub fn holder_of(meta: &Metadata) -> Option<u32> {
    let (dev, ino) = (meta.dev(), meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().filter(|l| !l.contains("->")).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want).then(|| f[4].parse().ok()).flatten()
    })
}

/// Size in bytes of the block device open as `file`.
pub fn block_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Bytes of the regular file `meta` describes that have no block behind
/// them (holes), 0 when it is wholly allocated. A store through a shared
/// mapping into a hole allocates a block on the spot, and a full filesystem
/// answers that with SIGBUS: pmem files must have no holes.
///
/// Counted from `st_blocks`, not `SEEK_HOLE`: ext4 and XFS report the
/// unwritten extents of a `fallocate`d file as holes to `SEEK_HOLE`,
/// although their blocks are reserved.
pub fn unallocated(meta: &Metadata) -> u64 {
    meta.len().saturating_sub(meta.blocks().saturating_mul(512))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_counted_and_allocated_files_have_none() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        assert_eq!(unallocated(&f.as_file().metadata().unwrap()), 1 << 20);
        let g = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut g.as_file(), &vec![1u8; 1 << 20]).unwrap();
        g.as_file().sync_all().unwrap();
        assert_eq!(unallocated(&g.as_file().metadata().unwrap()), 0);
    }

    #[test]
    fn a_second_exclusive_lock_is_refused_and_names_the_holder() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = File::open(f.path()).unwrap();
        let b = File::open(f.path()).unwrap();
        lock_exclusive(&a).unwrap();
        assert_eq!(lock_exclusive(&b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(holder_of(&a.metadata().unwrap()), Some(std::process::id()));
        drop(a);
        lock_exclusive(&b).unwrap();
    }
}
