//! `pcache detach`: write a backing device's cache back and give it up.

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use pcache_pmem::{CacheDev, DaxMapping, DaxOptions, EngineError, FileBacking, detach};

use crate::units::human;

pub fn run(device: &Path, backing: &Path) -> u8 {
    let fail = |msg: String| {
        eprintln!("pcache detach: {msg}");
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
    let file = match FileBacking::open(backing) {
        Ok(f) => f,
        Err(e) => return fail(format!("{e} (detach writes the cache back to it, so it must be there)")),
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("writing back {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = Instant::now();
    let done = detach(&dev, file, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    match done {
        Ok(r) => {
            println!(
                "detached {} from {}: {} written back in {} kset(s) in {:.1?}, {} segments ({}) released",
                backing.display(),
                device.display(),
                human(r.bytes_written_back),
                r.ksets_written_back,
                t.elapsed(),
                r.segments_released,
                human(u64::from(r.segments_released) << 24)
            );
            println!("the backing device now holds all its data; backing entry {} is free", r.id);
            0
        }
        Err(EngineError::NoCache { path }) => {
            let known: Vec<String> = dev
                .backings()
                .unwrap_or_default()
                .iter()
                .map(|(_, b)| String::from_utf8_lossy(b.path()).into_owned())
                .collect();
            let list = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            fail(format!("{} holds no cache for {}; it caches: {list}", device.display(), path.display()))
        }
        Err(e) => fail(format!("{}: {e}; nothing was released, the cache is intact", backing.display())),
    }
}
