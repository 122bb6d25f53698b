//! `pcache rename`: point a cache at its backing device's new name.

use std::path::Path;

use pcache_pmem::cache::repair::rename;
use pcache_pmem::{BackingDev, EngineError};

pub fn run(device: &Path, old: &Path, new: &Path) -> u8 {
    let fail = |msg: String| {
        eprintln!("pcache rename: {msg}");
        1
    };
    let dev = match crate::open::cache_dev(device) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let file = match crate::open::backing(device, new) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    match rename(&dev, old, &file) {
        Ok(id) => {
            println!("backing entry {id}: the cache of {} now caches {}", old.display(), file.path().display());
            0
        }
        Err(EngineError::NoCache { .. }) => fail(crate::open::no_cache(&dev, device, old)),
        Err(e) => fail(e.to_string()),
    }
}
