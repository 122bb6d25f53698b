//! Opening what the offline commands work on, with the errors they print.

use std::path::Path;
use std::sync::Arc;

use pcache_pmem::{CacheDev, DaxMapping, DaxOptions, FileBacking};

/// Opens the pmem device `device` exclusively and reads its backing table.
pub fn cache_dev(device: &Path) -> Result<Arc<CacheDev<DaxMapping>>, String> {
    let map = DaxMapping::open(device, &DaxOptions::default()).map_err(|e| e.to_string())?;
    CacheDev::open(map).map_err(|e| format!("{}: {e}", device.display()))
}

/// Opens and locks the backing device `backing` of the pmem device
/// `device`, refusing the pmem device itself under any name.
pub fn backing(device: &Path, backing: &Path) -> Result<FileBacking, String> {
    crate::attach::check_backings(device, &[backing.to_path_buf()])?;
    FileBacking::open(backing).map_err(|e| e.to_string())
}
