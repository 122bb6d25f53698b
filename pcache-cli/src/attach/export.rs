//! A running cache as the NBD server's [`BlockDevice`], with the engine's
//! errors turned into the protocol's errnos.

use std::sync::Arc;

use pcache_cli::nbd::{self, BlockDevice, DevError};
use pcache_pmem::EngineError;
use tracing::warn;

/// The cache `attach` runs: on a DAX mapping, in front of a file or block
/// device.
pub(super) type PmemCache = pcache_pmem::Cache<pcache_pmem::DaxMapping, pcache_pmem::FileBacking>;

/// The cache as an NBD device.
pub struct CacheExport(pub Arc<PmemCache>);

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
        self.0.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.0.read(off, buf).map_err(dev_err)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
        self.0.write(off, data, fua).map_err(dev_err)
    }

    fn flush(&self) -> Result<(), DevError> {
        self.0.flush().map_err(dev_err)
    }

    fn trim(&self, off: u64, len: u64) -> Result<(), DevError> {
        self.0.discard(off, len).map_err(dev_err)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.0.write_zeroes(off, len, fua).map_err(dev_err)
    }

    fn read_may_block(&self, off: u64, len: u64) -> bool {
        !self.0.is_cached(off, len)
    }
}
