//! `pcache rename`: point a cache at its backing device's new name.

use std::path::Path;

use pcache_pmem::cache::repair::rename;
use pcache_pmem::{BackingDev, CacheDev, DaxMapping, DaxOptions, EngineError, FileBacking};

pub fn run(device: &Path, old: &Path, new: &Path) -> u8 {
    let fail = |msg: String| {
        eprintln!("pcache rename: {msg}");
        1
    };
    let map = match DaxMapping::open(device, &DaxOptions::default()) {
        Ok(m) => m,
        Err(e) => return fail(e.to_string()),
    };
    let dev = match CacheDev::open(map) {
        Ok(d) => d,
        Err(e) => return fail(format!("{}: {e}", device.display())),
    };
    if let Err(msg) = crate::attach::check_backings(device, &[new.to_path_buf()]) {
        return fail(msg);
    }
    let file = match FileBacking::open(new) {
        Ok(f) => f,
        Err(e) => return fail(e.to_string()),
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
