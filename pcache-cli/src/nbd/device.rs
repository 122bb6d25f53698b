//! What the server serves: the [`BlockDevice`] trait, the [`Export`] that
//! names one, and (with the `testing` feature, or in this crate's tests) a
//! device in memory.

use std::sync::Arc;

/// A device failure, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevError {
    /// The protocol errno.
    pub errno: u32,
    /// What happened, for the client's user.
    pub message: String,
}

/// A run of the export with one allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Its length in bytes.
    pub len: u64,
    /// `STATE_*` flags of `base:allocation`.
    pub flags: u32,
}

/// What the server serves.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `off`.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError>;
    /// Writes `data` at `off`, durably before returning if `fua`.
    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DevError>;
    /// The range's contents no longer matter.
    fn trim(&self, off: u64, len: u64) -> Result<(), DevError>;
    /// Writes zeros.
    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError>;
    /// Prefetches `[off, off + len)` (`NBD_CMD_CACHE`): by default reads it,
    /// a MiB at a time, which a caching device keeps.
    fn cache(&self, off: u64, len: u64) -> Result<(), DevError> {
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; len.min(CHUNK) as usize];
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(CHUNK) as usize;
            self.read(at, &mut buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }
    /// Whether reading `[off, off + len)` may wait on something slow (a
    /// disk): such reads run on worker threads, so that other requests of
    /// the connection go on meanwhile; everything else runs at once on the
    /// connection's reading thread, which saves a thread hand-off per request.
    fn read_may_block(&self, _off: u64, _len: u64) -> bool {
        true
    }

    /// The allocation of `[off, off + len)` (`base:allocation`), in order
    /// from `off`: runs of data (flags 0) and of holes that read as zeroes
    /// ([`STATE_HOLE`](super::STATE_HOLE) `|` [`STATE_ZERO`](super::STATE_ZERO)).
    /// They may stop short of the end; by default the whole range is data.
    fn extents(&self, _off: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        Ok(vec![Extent { len, flags: 0 }])
    }

    /// Whether a write (or zeroing) of `[off, off + len)`, with or without
    /// FUA, may wait on something slow, so that it should run on one of the
    /// connection's workers, beside the other requests in flight, rather
    /// than on its reading thread before them.
    fn write_may_block(&self, _off: u64, _len: u64, _fua: bool) -> bool {
        false
    }
}

/// A named export.
#[derive(Clone)]
pub struct Export {
    /// Its name.
    pub name: String,
    /// A line about it.
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("name", &self.name).field("size", &self.device.size()).finish()
    }
}

#[cfg(any(test, feature = "testing"))]
pub use mem::MemDevice;

#[cfg(any(test, feature = "testing"))]
mod mem {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{BlockDevice, DevError};

    /// A device in memory, for tests and fuzzing. The server checks every
    /// range against [`BlockDevice::size`] first, so it indexes freely.
    #[derive(Debug)]
    pub struct MemDevice {
        data: Mutex<Vec<u8>>,
        /// Flushes received.
        pub flushes: AtomicU64,
    }

    impl MemDevice {
        /// `size` zero bytes.
        pub fn new(size: usize) -> Self {
            Self { data: Mutex::new(vec![0; size]), flushes: AtomicU64::new(0) }
        }

        /// A copy of the contents.
        pub fn contents(&self) -> Vec<u8> {
            self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
        }

        fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
            let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        }

        fn write(&self, off: u64, data: &[u8], _fua: bool) -> Result<(), DevError> {
            let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
            d[off as usize..off as usize + data.len()].copy_from_slice(data);
            Ok(())
        }

        fn flush(&self) -> Result<(), DevError> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }

        fn trim(&self, _off: u64, _len: u64) -> Result<(), DevError> {
            Ok(())
        }

        fn write_zeroes(&self, off: u64, len: u64, _fua: bool) -> Result<(), DevError> {
            let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
            d[off as usize..(off + len) as usize].fill(0);
            Ok(())
        }

        fn read_may_block(&self, _off: u64, _len: u64) -> bool {
            false
        }
    }
}
