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
        Err(EngineError::NoCache { .. }) => {
            let known: Vec<String> = dev
                .backings()
                .unwrap_or_default()
                .iter()
                .map(|(_, b)| String::from_utf8_lossy(b.path()).into_owned())
                .collect();
            let list = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            fail(format!("{} holds no cache for {}; it caches: {list}", device.display(), old.display()))
        }
        Err(e) => fail(e.to_string()),
    }
}
