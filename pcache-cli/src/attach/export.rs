//! A running cache as the NBD server's [`BlockDevice`], with the engine's
//! errors turned into the protocol's errnos.

use std::sync::Arc;

use pcache_cli::nbd::{self, BlockDevice, DevError};
use pcache_pmem::EngineError;
use tracing::warn;

/// The cache `attach` runs: on a DAX mapping, in front of a file or block
/// device.
pub(super) type PmemCache = pcache_pmem::Cache<pcache_pmem::DaxMapping, pcache_cli::remote::AnyBacking>;

/// The cache as an NBD device.
pub struct CacheExport {
    cache: Arc<PmemCache>,
    /// Every write waits for an `msync` (pmem emulated by an ordinary
    /// file): a connection's writes in flight then run side by side on its
    /// workers. On pmem a write takes microseconds, and handing it to a
    /// worker costs more than it saves.
    writes_sync: bool,
}

impl CacheExport {
    pub fn new(cache: Arc<PmemCache>) -> Self {
        let writes_sync = cache.dev().pmem().mode() == pcache_pmem::MapMode::Emulated;
        Self { cache, writes_sync }
    }
}

/// The errno a client sees for `e` (logged: the client may not show it).
fn dev_err(e: EngineError) -> DevError {
    let errno = match e {
        EngineError::OutOfRange { .. } | EngineError::InvalidOption(_) => nbd::EINVAL,
        EngineError::CacheFull | EngineError::Stalled(_) => nbd::ENOSPC,
        EngineError::Stopped => nbd::ESHUTDOWN,
        _ => nbd::EIO,
    };
    warn!(error = %e, "request failed");
    DevError { errno, message: e.to_string() }
}

impl BlockDevice for CacheExport {
    fn size(&self) -> u64 {
        self.cache.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.cache.read(off, buf).map_err(dev_err)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
        self.cache.write(off, data, fua).map_err(dev_err)
    }

    fn flush(&self) -> Result<(), DevError> {
        self.cache.flush().map_err(dev_err)
    }

    fn trim(&self, off: u64, len: u64) -> Result<(), DevError> {
        self.cache.discard(off, len).map_err(dev_err)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.cache.write_zeroes(off, len, fua).map_err(dev_err)
    }

    fn read_may_block(&self, off: u64, len: u64) -> bool {
        !self.cache.is_cached(off, len)
    }

    fn writes_may_block(&self) -> bool {
        self.writes_sync
    }
}
