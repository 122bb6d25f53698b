//! The slow device behind a cache: a file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A failed backing-device operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct BackingError {
    /// What was being done.
    pub op: &'static str,
    /// The device.
    pub path: PathBuf,
    /// The error.
    pub source: io::Error,
}

/// What a backing device *is*, whatever it is called: the same file or
/// block device reached through another path (a symlink, `..`, a hard link,
/// `/dev/disk/by-id/…`) has the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackingId {
    /// A regular file: its filesystem's device and its inode.
    File {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
    /// A block device: its device number.
    Block {
        /// `st_rdev`.
        rdev: u64,
    },
    /// An export of an NBD server: the server (its address, or its Unix
    /// socket's inode) and the export's name, hashed
    /// ([`NbdUri::identity`](crate::nbd_uri::NbdUri::identity)).
    Remote {
        /// The hash.
        hash: u64,
    },
}

impl BackingId {
    /// The identity of what `path` names now (following symlinks), if it
    /// exists and is a file or block device, or of the export an NBD URI
    /// names, if its server's address resolves.
    pub fn of_path(path: &Path) -> Option<Self> {
        if let Some(uri) = crate::nbd_uri::stored_uri(path) {
            return uri.identity();
        }
        Self::of_meta(&std::fs::metadata(path).ok()?)
    }

    /// The identity of a file or block device from its metadata.
    pub fn of_meta(meta: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let ft = meta.file_type();
        if ft.is_block_device() {
            Some(Self::Block { rdev: meta.rdev() })
        } else if ft.is_file() {
            Some(Self::File { dev: meta.dev(), ino: meta.ino() })
        } else {
            None
        }
    }
}

/// The backing path an entry stores, as a path.
pub fn stored_path(info: &pcache_format::BackingDevInfo) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(info.path()))
}

/// The name to store for the backing device at `path`: its canonical path
/// (symlinks and `..` resolved); for a block device, a stable
/// `/dev/disk/by-id/` name of it when the system has one, since `/dev/sdX`
/// names can change between boots.
pub fn stored_name(path: &Path) -> io::Result<PathBuf> {
    let canonical = std::fs::canonicalize(path)?;
    let meta = std::fs::metadata(&canonical)?;
    if !meta.file_type().is_block_device() {
        return Ok(canonical);
    }
    Ok(stable_block_name(&meta).unwrap_or(canonical))
}

/// A `/dev/disk/by-id/` link to the block device `meta` describes: a
/// `wwn-` name first (the device's own world-wide name), then the others
/// in name order, so the choice is the same at every boot.
fn stable_block_name(meta: &std::fs::Metadata) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut names: Vec<PathBuf> = std::fs::read_dir("/dev/disk/by-id")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == meta.rdev()))
        .filter(|p| p.as_os_str().len() < 255)
        .collect();
    names.sort_by_key(|p| {
        let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (!n.starts_with("wwn-"), n)
    });
    names.into_iter().next()
}

/// The device a cache sits in front of. pcache keeps no metadata on it.
pub trait BackingDev: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `off`.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError>;
    /// Writes `data` at `off`.
    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), BackingError>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> Result<(), BackingError>;
    /// The path, as recorded in the backing table.
    fn path(&self) -> &Path;
    /// What the device is, if it is a file or block device (two paths
    /// that name one device have one identity).
    fn identity(&self) -> Option<BackingId> {
        None
    }
    /// The runs of `[off, off + len)` that hold data, in order; the rest
    /// are holes that read as zeroes. `None` if the device cannot tell
    /// (then all of it counts as data).
    fn data_ranges(&self, _off: u64, _len: u64) -> Option<Vec<(u64, u64)>> {
        None
    }
    /// Zeroes `[off, off + len)` without writing zeros, if the device can
    /// (`fallocate` `ZERO_RANGE`, an NBD `WRITE_ZEROES`): `Ok(false)` when
    /// it cannot, and nothing was done. Durable at the next [`sync`](Self::sync).
    fn zero(&self, _off: u64, _len: u64) -> Result<bool, BackingError> {
        Ok(false)
    }
    /// The contents of `[off, off + len)` no longer matter (a discard
    /// passed on: `fallocate` `PUNCH_HOLE`, an NBD `TRIM`); `Ok(false)` when
    /// the device cannot, and nothing was done. Advice only.
    fn trim(&self, _off: u64, _len: u64) -> Result<bool, BackingError> {
        Ok(false)
    }
}

impl<T: BackingDev + ?Sized> BackingDev for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        (**self).read_at(off, buf)
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), BackingError> {
        (**self).write_at(off, data)
    }

    fn sync(&self) -> Result<(), BackingError> {
        (**self).sync()
    }

    fn path(&self) -> &Path {
        (**self).path()
    }

    fn identity(&self) -> Option<BackingId> {
        (**self).identity()
    }

    fn data_ranges(&self, off: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        (**self).data_ranges(off, len)
    }

    fn zero(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        (**self).zero(off, len)
    }

    fn trim(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        (**self).trim(off, len)
    }
}

/// A file or block device, through `pread`/`pwrite`/`fdatasync`.
///
/// It is held exclusively for as long as it is open: an exclusive `flock`
/// (and, for a block device, an `O_EXCL` open as the kernel's own users of
/// a disk take), so a second cache, a `pcache format` or a second process
/// cannot write it at the same time.
#[derive(Debug)]
pub struct FileBacking {
    file: File,
    path: PathBuf,
    size: u64,
    id: Option<BackingId>,
}

impl FileBacking {
    /// Opens `path` read-write and locks it. The recorded path is its
    /// [`stored_name`]: canonical, or a stable `/dev/disk/by-id/` name.
    ///
    /// Refuses anything but a regular file or a block device, an empty
    /// device, and a device another process holds.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BackingError> {
        let path = path.as_ref();
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let err = |op, source| BackingError { op, path: abs.clone(), source };
        let meta = std::fs::metadata(path).map_err(|e| err("open", e))?;
        let block = meta.file_type().is_block_device();
        if !block && !meta.is_file() {
            let what = crate::sys::file_kind(&meta);
            return Err(err(
                "open",
                io::Error::new(io::ErrorKind::InvalidInput, format!("{what}, not a file or block device")),
            ));
        }
        let name = stored_name(path).map_err(|e| err("resolve", e))?;
        let mut oo = OpenOptions::new();
        oo.read(true).write(true).custom_flags(libc::O_CLOEXEC | if block { libc::O_EXCL } else { 0 });
        let file = oo.open(&name).map_err(|e| {
            if block && e.raw_os_error() == Some(libc::EBUSY) {
                err("open", io::Error::new(io::ErrorKind::ResourceBusy, "in use (mounted, or held by another program)"))
            } else {
                err("open", e)
            }
        })?;
        let opened = file.metadata().map_err(|e| err("stat", e))?;
        if let Err(e) = crate::sys::lock_exclusive(&file) {
            let holder = crate::sys::holder_of(&opened).map(|p| format!(" (pid {p})")).unwrap_or_default();
            return Err(err("lock", io::Error::new(e.kind(), format!("in use by another process{holder}"))));
        }
        let size =
            if block { crate::sys::block_size(&file).map_err(|e| err("ioctl BLKGETSIZE64", e))? } else { opened.len() };
        Ok(Self { file, path: name, size, id: BackingId::of_meta(&opened) })
    }

    fn err(&self, op: &'static str, source: io::Error) -> BackingError {
        BackingError { op, path: self.path.clone(), source }
    }

    fn check(&self, op: &'static str, off: u64, len: usize) -> Result<(), BackingError> {
        check_range(&self.path, op, off, len, self.size)
    }
}

/// Refuses `len` bytes at `off` on a device of `size` bytes that pass its
/// end (every backing checks before it touches the device).
pub fn check_range(path: &Path, op: &'static str, off: u64, len: usize, size: u64) -> Result<(), BackingError> {
    match off.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackingError {
            op,
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("{len} bytes at {off} pass the end ({size})")),
        }),
    }
}

impl BackingDev for FileBacking {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.check("read", off, buf.len())?;
        self.file.read_exact_at(buf, off).map_err(|e| self.err("read", e))
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), BackingError> {
        self.check("write", off, data.len())?;
        self.file.write_all_at(data, off).map_err(|e| self.err("write", e))
    }

    fn sync(&self) -> Result<(), BackingError> {
        self.file.sync_data().map_err(|e| self.err("fdatasync", e))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn identity(&self) -> Option<BackingId> {
        self.id
    }

    /// `fallocate(FALLOC_FL_ZERO_RANGE)`, on files and block devices alike
    /// (a file system or driver without it: `Ok(false)`).
    fn zero(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        use rustix::fs::{FallocateFlags, fallocate};
        self.check("zero", off, usize::try_from(len).unwrap_or(usize::MAX))?;
        match fallocate(&self.file, FallocateFlags::ZERO_RANGE, off, len) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => Ok(false),
            Err(e) => Err(self.err("fallocate ZERO_RANGE", e.into())),
        }
    }

    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`: the file
    /// system frees the blocks, a block device discards them.
    fn trim(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        use rustix::fs::{FallocateFlags, fallocate};
        self.check("trim", off, usize::try_from(len).unwrap_or(usize::MAX))?;
        match fallocate(&self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, off, len) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => Ok(false),
            Err(e) => Err(self.err("fallocate PUNCH_HOLE", e.into())),
        }
    }

    /// `SEEK_DATA`/`SEEK_HOLE` (a block device, or a file system without
    /// them, reports everything as data).
    fn data_ranges(&self, off: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        use rustix::fs::{SeekFrom, seek};
        let end = off.checked_add(len)?.min(self.size);
        let mut out = Vec::new();
        let mut at = off;
        while at < end {
            let data = match seek(&self.file, SeekFrom::Data(at)) {
                Ok(d) => d,
                // No data from here to the end of the file.
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => return None,
            };
            if data >= end {
                break;
            }
            let hole = seek(&self.file, SeekFrom::Hole(data)).ok()?.min(end);
            if hole <= data {
                return None;
            }
            out.push((data, hole - data));
            at = hole;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_backing_round_trip_and_bounds() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let b = FileBacking::open(f.path()).unwrap();
        assert_eq!(b.size(), 8192);
        assert!(b.path().is_absolute());
        b.write_at(4090, b"hello world").unwrap();
        b.sync().unwrap();
        let mut buf = [0u8; 11];
        b.read_at(4090, &mut buf).unwrap();
        assert_eq!(&buf, b"hello world");
        assert!(b.read_at(8190, &mut buf).is_err());
        assert!(b.write_at(u64::MAX, b"x").is_err());
        assert!(FileBacking::open("/dev/null").is_err());
    }

    #[test]
    fn data_ranges_follow_the_files_holes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        let b = FileBacking::open(f.path()).unwrap();
        b.write_at(1 << 20, &[7u8; 8192]).unwrap();
        b.sync().unwrap();
        let r = b.data_ranges(0, 4 << 20).unwrap();
        // File systems allocate in blocks of their own; the written range
        // is data, and most of the file is not.
        assert!(r.iter().any(|&(o, l)| o <= 1 << 20 && o + l >= (1 << 20) + 8192), "{r:?}");
        assert!(r.iter().map(|&(_, l)| l).sum::<u64>() < 1 << 20, "{r:?}");
        assert_eq!(b.data_ranges(2 << 20, 1 << 20).unwrap(), vec![]);
        assert!(FileBacking::open("/nonexistent/x").is_err());
    }
}
