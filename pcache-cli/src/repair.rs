//! `pcache repair`: show, then on request carry out, the repairs of a
//! device's backing table (second copies, lost caches, damaged entries).

use std::path::Path;

use pcache_pmem::cache::repair::{apply, plan};

pub fn run(device: &Path, backing: Option<&Path>, head: Option<u32>, yes: bool) -> u8 {
    let fail = |msg: String| {
        eprintln!("pcache repair: {msg}");
        1
    };
    let dev = match crate::open::cache_dev(device) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let file = match backing.map(|b| crate::open::backing(device, b)).transpose() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    for (id, why) in dev.damaged() {
        println!("found: backing entry {id} is damaged: {why}");
    }
    for (o, _) in dev.orphans() {
        println!(
            "found: a cache owned by no entry: {} segment(s) from segment {}, {} kset(s), {} dirty key(s){}",
            o.segs.len(),
            o.head,
            o.log.ksets,
            o.log.dirty_keys,
            if o.holds_dirty_data() { "" } else { " (nothing to write back: its segments are free)" }
        );
    }
    let (repairs, blocked) = match plan(&dev, file.as_ref(), head) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    for b in &blocked {
        println!("cannot repair yet: {}", b.0);
    }
    if repairs.is_empty() {
        println!("{}: nothing to repair", device.display());
        return if blocked.is_empty() { 0 } else { 1 };
    }
    for r in &repairs {
        println!("{} {r}", if yes { "repair:" } else { "would" });
    }
    if !yes {
        println!("nothing was changed; run the same command with --yes to do this");
        return if blocked.is_empty() { 0 } else { 1 };
    }
    if let Err(e) = apply(&dev, &repairs) {
        return fail(format!("{e}; run `pcache check {}`", device.display()));
    }
    println!("{}: {} repair(s) done; `pcache check` shows the result", device.display(), repairs.len());
    if blocked.is_empty() { 0 } else { 1 }
}
