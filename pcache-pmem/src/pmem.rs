//! The persistence interface every pmem access goes through.
//!
//! Two rules, as for any memory shared with someone else:
//!
//! 1. No `&`/`&mut` reference into the device outlives a call: reads copy out
//!    and writes copy in, through range-checked offsets.
//! 2. A store is durable only after its cache lines are flushed *and* a later
//!    fence completes. [`Pmem::persist`] does both; [`Pmem::copy_persist`]
//!    copies, flushes and fences; the `_nodrain` variants leave the fence to
//!    the caller so that several ranges can share one.
//!
//! The trait is generic, so code written against it is monomorphised: the
//! real mapping ([`crate::DaxMapping`]) pays nothing for the crash
//! simulator (`testing::SimPmem`, with the `testing` feature) existing.

use std::path::PathBuf;

/// Size of a CPU cache line, the unit of flushing.
pub const CACHE_LINE: u64 = 64;

/// A failed pmem access.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    /// The access does not lie inside the device.
    #[error("access of {len} bytes at {off:#x} is outside the {size}-byte device")]
    OutOfBounds {
        /// Offset of the access.
        off: u64,
        /// Length of the access.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// A system call on the device failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "mmap", "msync", ...).
        op: &'static str,
        /// The device.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another process holds the device.
    #[error("{} is in use by another process{}", path.display(), holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Busy {
        /// The device.
        path: PathBuf,
        /// The process holding it, if known.
        holder: Option<u32>,
    },
    /// The device cannot be used as pmem.
    #[error("{}: {reason}", path.display())]
    Unsupported {
        /// The device.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The media reported an uncorrectable error in this range.
    #[error("media error reading {len} bytes at {off:#x}")]
    Media {
        /// Offset of the failed read.
        off: u64,
        /// Length of the failed read.
        len: u64,
    },
}

/// Persistent memory, byte-addressed.
///
/// Implementations are shared between threads; callers write disjoint
/// ranges concurrently (two threads storing to the same bytes at once get
/// one of the two values, as with real memory).
pub trait Pmem: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Copies `buf.len()` bytes at `off` into `buf`.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError>;

    /// Whether the `len` bytes at `off` are known to read as zeros without
    /// being read (see `pcache_format::ReadMedia::unwritten`): a simulator
    /// knows which of its pages were never written. A mapping cannot tell,
    /// and says `false`.
    fn unwritten(&self, off: u64, len: u64) -> bool {
        let _ = (off, len);
        false
    }

    /// Stores `data` at `off` through the CPU cache. Not durable until the
    /// lines are flushed and fenced.
    fn write(&self, off: u64, data: &[u8]) -> Result<(), PmemError>;

    /// Writes back the cache lines covering `[off, off + len)`. Durable only
    /// after the next [`Pmem::fence`].
    fn flush(&self, off: u64, len: u64) -> Result<(), PmemError>;

    /// Waits until every flush and non-temporal store issued before it by
    /// this thread is durable.
    fn fence(&self) -> Result<(), PmemError>;

    /// Stores `src` at `off` so that it is durable after the next fence:
    /// non-temporal stores for blocks of 256 bytes and more, cached stores
    /// and cache-line write-back below that.
    fn copy_nodrain(&self, off: u64, src: &[u8]) -> Result<(), PmemError>;

    /// Zeroes `[off, off + len)` so that it is durable after the next fence.
    fn zero_nodrain(&self, off: u64, len: u64) -> Result<(), PmemError>;

    /// Whether making every store durable at once ([`Pmem::sync_all`]) costs
    /// about what one fence costs: true where durability is a system call
    /// (an ordinary file or block device made durable by `msync`), false on
    /// real pmem, where a fence is a CPU instruction. The engine then stores
    /// cached data without a fence of its own and makes it durable together
    /// with the keys that name it, when their kset closes: a group commit,
    /// one `msync` for many writes, the order "data before key" kept.
    fn bulk_sync(&self) -> bool {
        false
    }

    /// Makes every store to the device durable, whichever thread made it
    /// and whether or not it was flushed. A device that says
    /// [`Pmem::bulk_sync`] must implement it; the default only fences this
    /// thread's flushes.
    fn sync_all(&self) -> Result<(), PmemError> {
        self.fence()
    }

    /// Flush, then fence.
    fn persist(&self, off: u64, len: u64) -> Result<(), PmemError> {
        self.flush(off, len)?;
        self.fence()
    }

    /// [`Pmem::copy_nodrain`], then fence: `src` is durable on return.
    fn copy_persist(&self, off: u64, src: &[u8]) -> Result<(), PmemError> {
        self.copy_nodrain(off, src)?;
        self.fence()
    }

    /// [`Pmem::zero_nodrain`], then fence.
    fn zero_persist(&self, off: u64, len: u64) -> Result<(), PmemError> {
        self.zero_nodrain(off, len)?;
        self.fence()
    }
}

/// Checks that `[off, off + len)` lies inside a device of `size` bytes.
pub fn check_range(off: u64, len: u64, size: u64) -> Result<(), PmemError> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(PmemError::OutOfBounds { off, len, size }),
    }
}

/// A [`Pmem`] seen as a [`pcache_format::ReadMedia`], to scan it with the
/// format crate.
#[derive(Debug)]
pub struct AsMedia<'a, P: ?Sized>(pub &'a P);

impl<P: Pmem + ?Sized> pcache_format::ReadMedia for AsMedia<'_, P> {
    type Error = PmemError;

    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        self.0.read(off, buf)
    }

    fn unwritten(&self, off: u64, len: u64) -> bool {
        self.0.unwritten(off, len)
    }
}

/// The part of a [`Pmem`] from byte `base` on, as a device of its own: the
/// pmem device inside an NVDIMM namespace image (a QEMU NVDIMM backing
/// file, whose info block says where the device starts), or wherever
/// `--offset` says. Every access is bounds-checked against the window.
#[derive(Debug)]
pub struct PmemWindow<P> {
    inner: P,
    base: u64,
    size: u64,
}

impl<P: Pmem> PmemWindow<P> {
    /// The bytes of `inner` from `base` on; refused if `base` is past its end.
    pub fn new(inner: P, base: u64) -> Result<Self, PmemError> {
        let size = inner.size();
        check_range(base, 0, size)?;
        Ok(Self { inner, base, size: size - base })
    }

    /// Where the window starts in the device.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The device.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    fn at(&self, off: u64, len: u64) -> Result<u64, PmemError> {
        check_range(off, len, self.size)?;
        Ok(self.base + off)
    }
}

impl<P: Pmem> Pmem for PmemWindow<P> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        self.inner.read(self.at(off, buf.len() as u64)?, buf)
    }

    fn unwritten(&self, off: u64, len: u64) -> bool {
        self.at(off, len).is_ok_and(|at| self.inner.unwritten(at, len))
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<(), PmemError> {
        self.inner.write(self.at(off, data.len() as u64)?, data)
    }

    fn flush(&self, off: u64, len: u64) -> Result<(), PmemError> {
        self.inner.flush(self.at(off, len)?, len)
    }

    fn fence(&self) -> Result<(), PmemError> {
        self.inner.fence()
    }

    fn copy_nodrain(&self, off: u64, src: &[u8]) -> Result<(), PmemError> {
        self.inner.copy_nodrain(self.at(off, src.len() as u64)?, src)
    }

    fn zero_nodrain(&self, off: u64, len: u64) -> Result<(), PmemError> {
        self.inner.zero_nodrain(self.at(off, len)?, len)
    }

    fn bulk_sync(&self) -> bool {
        self.inner.bulk_sync()
    }

    fn sync_all(&self) -> Result<(), PmemError> {
        self.inner.sync_all()
    }
}
