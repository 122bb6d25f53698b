//! Opening what the offline commands work on, with the errors they print.

use std::path::Path;
use std::sync::Arc;

use pcache_cli::remote::{AnyBacking, DEFAULT_TIMEOUT};
use pcache_pmem::{CacheDev, DaxMapping, DaxOptions};

/// Opens the pmem device `device` exclusively and reads its backing table.
pub fn cache_dev(device: &Path) -> Result<Arc<CacheDev<DaxMapping>>, String> {
    let map = DaxMapping::open(device, &DaxOptions::default()).map_err(|e| e.to_string())?;
    CacheDev::open(map).map_err(|e| format!("{}: {e}", device.display()))
}

/// Opens and locks the backing device `backing` of the pmem device
/// `device` (or connects to it, for an NBD URI), refusing the pmem device
/// itself under any name.
pub fn backing(device: &Path, backing: &Path) -> Result<AnyBacking, String> {
    crate::attach::check_backings(device, &[backing.to_path_buf()])?;
    AnyBacking::open(backing, DEFAULT_TIMEOUT)
}

/// What to say when `device` holds no cache for `path`: which backings it
/// does cache, by their stored names.
pub fn no_cache(dev: &CacheDev<DaxMapping>, device: &Path, path: &Path) -> String {
    let known: Vec<String> = dev
        .backings()
        .unwrap_or_default()
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b.path()).into_owned())
        .collect();
    let list = if known.is_empty() { "none".to_string() } else { known.join(", ") };
    format!("{} holds no cache for {}; it caches: {list}", device.display(), path.display())
}
