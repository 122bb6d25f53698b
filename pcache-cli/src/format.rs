//! `pcache format`.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::Path;

use pcache_format::{CACHE_DEV_SIZE_MIN, SEG_SIZE, SEGMENTS_OFF};
use pcache_pmem::format::{FormatError, format};
use pcache_pmem::{DaxMapping, DaxOptions};

use crate::units::human;

/// Creates `device` as a sparse file of `size` bytes if it does not exist;
/// an existing file must already have that size.
fn prepare(device: &Path, size: u64) -> Result<(), String> {
    match std::fs::metadata(device) {
        Ok(meta) if meta.is_file() => {
            if meta.len() != size {
                return Err(format!(
                    "{} exists with {} ({} bytes), not the {} asked for; remove it first or leave out --size",
                    device.display(),
                    human(meta.len()),
                    meta.len(),
                    human(size)
                ));
            }
            Ok(())
        }
        Ok(_) => {
            Err(format!("{}: --size applies only to regular files; a device has the size it has", device.display()))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // Refused before anything is created: a refusal leaves no file.
            if size < CACHE_DEV_SIZE_MIN {
                return Err(format!(
                    "{}: {size} bytes asked for; pcache needs at least {CACHE_DEV_SIZE_MIN} (512 MiB)",
                    device.display()
                ));
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(device)
                .map_err(|e| format!("cannot create {}: {e}", device.display()))?;
            file.set_len(size).map_err(|e| format!("cannot size {} to {size} bytes: {e}", device.display()))?;
            Ok(())
        }
        Err(e) => Err(format!("{}: {e}", device.display())),
    }
}

pub fn run(device: &Path, size: Option<u64>, force: bool) -> u8 {
    if let Some(size) = size {
        if let Err(msg) = prepare(device, size) {
            eprintln!("pcache format: {msg}");
            return 1;
        }
    } else if !device.exists() {
        eprintln!("pcache format: {} does not exist; give --size to create it as a file", device.display());
        return 1;
    }
    let map = match DaxMapping::open(device, &DaxOptions::default()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("pcache format: {e}");
            return 1;
        }
    };
    let done = match format(&map, force) {
        Ok(done) => done,
        Err(e @ FormatError::AlreadyFormatted { .. }) => {
            eprintln!("pcache format: {}: {e}; add --force to format it anyway", device.display());
            return 1;
        }
        Err(e) => {
            eprintln!("pcache format: {}: {e}", device.display());
            return 1;
        }
    };
    let layout = done.plan.layout;
    let segs = layout.seg_num();
    println!("formatted {}", device.display());
    println!("  size      {} ({} bytes)", human(layout.device_size()), layout.device_size());
    println!("  mapping   {} (flush: {})", map.mode(), map.flush_text());
    println!(
        "  segments  {segs} of 16 MiB from offset {SEGMENTS_OFF:#x}: segment 0 holds the backing table, \
         {} for caches ({})",
        segs - 1,
        human(u64::from(segs - 1) * SEG_SIZE)
    );
    if done.plan.capped() {
        println!(
            "  note      the device could hold {} segments, but the format counts at most 65535: \
             the last {} are left unused",
            done.plan.segments_possible,
            human(done.plan.unused_bytes())
        );
    }
    if done.overwrote {
        println!("  note      the previous pcache format was overwritten (--force)");
    }
    0
}
