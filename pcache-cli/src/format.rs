//! `pcache format`.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use pcache_format::{CACHE_DEV_SIZE_MIN, Dialect, Layout, SB_OFF, SB_SIZE, SEG_SIZE};
use pcache_pmem::format::{FormatError, Formatted, allocate, existing_format, format, format_dm, free_space};
use pcache_pmem::{DaxMapping, DaxOptions, Pmem};

use crate::signatures::{self, Kind, Signature};
use crate::units::human;

/// Refuses to allocate `needed` more bytes for `device` on a filesystem
/// (the one holding `on`) that has less than that free, before trying: a
/// failed `fallocate` may first fill the filesystem.
fn check_space(device: &Path, on: &File, size: u64, needed: u64) -> Result<(), String> {
    let free = free_space(on)
        .map_err(|e| format!("{}: cannot tell the free space of its filesystem: {e}", device.display()))?;
    if needed > free {
        return Err(format!(
            "cannot allocate {} ({size} bytes) for {}: its filesystem has only {} ({free} bytes) free; \
             free some space or choose a smaller device",
            human(size),
            device.display(),
            human(free)
        ));
    }
    Ok(())
}

fn allocate_error(device: &Path, size: u64, e: &io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::ENOSPC) => "; its filesystem is full",
        Some(libc::EFBIG) => "; the filesystem does not allow a file that large",
        _ => "",
    };
    format!("cannot allocate {} ({size} bytes) for {}: {e}{hint}", human(size), device.display())
}

/// Creates `device` as a file of `size` bytes if it does not exist, all of
/// it allocated unless `sparse`; an existing file must already have that
/// size. Returns whether it created the file. A refusal or a failure leaves
/// no file behind.
fn prepare(device: &Path, size: u64, sparse: bool) -> Result<bool, String> {
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
            Ok(false)
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
            if !sparse {
                let parent = match device.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                let dir = File::open(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
                check_space(device, &dir, size, size)?;
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(device)
                .map_err(|e| format!("cannot create {}: {e}", device.display()))?;
            let sized = if sparse {
                file.set_len(size).map_err(|e| format!("cannot size {} to {size} bytes: {e}", device.display()))
            } else {
                allocate(&file, size).map_err(|e| allocate_error(device, size, &e))
            };
            if let Err(msg) = sized {
                drop(file);
                let _ = std::fs::remove_file(device);
                return Err(msg);
            }
            Ok(true)
        }
        Err(e) => Err(format!("{}: {e}", device.display())),
    }
}

/// Allocates every block of the existing regular file `device` of `size`
/// bytes, refusing if its filesystem cannot hold the blocks it lacks.
fn allocate_existing(device: &Path, size: u64) -> Result<(), String> {
    let file = OpenOptions::new().write(true).open(device).map_err(|e| format!("{}: {e}", device.display()))?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", device.display()))?;
    let needed = size.saturating_sub(meta.blocks().saturating_mul(512));
    if needed == 0 {
        return Ok(());
    }
    check_space(device, &file, size, needed)?;
    allocate(&file, size).map_err(|e| allocate_error(device, size, &e))
}

/// Which format to write: the dialect, and for dm-pcache whether its cache
/// keeps data CRCs (the kernel's `data_crc` table argument, fixed at the
/// cache's first start).
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub dialect: Dialect,
    pub data_crc: bool,
}

pub fn run(device: &Path, size: Option<u64>, force: bool, sparse: bool, kind: Target) -> u8 {
    if kind.data_crc && kind.dialect != Dialect::DmPcache {
        eprintln!(
            "pcache format: --data-crc is for --dialect dm-pcache, whose one cache is made by the format; an \
             rfc-v1 cache keeps data CRCs when `pcache attach --data-crc` creates it"
        );
        return 1;
    }
    let created = if let Some(size) = size {
        match prepare(device, size, sparse) {
            Ok(created) => created,
            Err(msg) => {
                eprintln!("pcache format: {msg}");
                return 1;
            }
        }
    } else if !device.exists() {
        eprintln!("pcache format: {} does not exist; give --size to create it as a file", device.display());
        return 1;
    } else {
        false
    };
    let code = format_device(device, force, sparse, created, kind);
    if code != 0 && created {
        // Whatever went wrong, a file this run created is not left behind.
        let _ = std::fs::remove_file(device);
    }
    code
}

fn format_device(device: &Path, force: bool, sparse: bool, created: bool, kind: Target) -> u8 {
    let map = match DaxMapping::open(device, &DaxOptions::default()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("pcache format: {e}");
            return 1;
        }
    };
    // Every refusal comes before anything is written or allocated.
    let found = match refusal(&map, force, created) {
        Ok(found) => found,
        Err(msg) => {
            eprintln!("pcache format: {}: {msg}", device.display());
            return 1;
        }
    };
    let is_file = std::fs::metadata(device).is_ok_and(|m| m.is_file());
    if is_file
        && !sparse
        && !created
        && let Err(msg) = allocate_existing(device, map.size())
    {
        eprintln!("pcache format: {msg}");
        return 1;
    }
    match write_format(&map, force, created, kind) {
        Ok(done) => {
            report(device, &map, &done, found.as_ref(), sparse && is_file);
            0
        }
        Err(msg) => {
            eprintln!("pcache format: {}: {msg}", device.display());
            1
        }
    }
}

/// Why the device may not be formatted (too small, holding something
/// other than pcache without --force, already formatted without
/// --force), or what signature it holds, if any.
fn refusal(map: &DaxMapping, force: bool, created: bool) -> Result<Option<Signature>, String> {
    let size = map.size();
    if Layout::plan(Dialect::RfcV1, size).is_err() {
        return Err(FormatError::TooSmall { size, min: CACHE_DEV_SIZE_MIN }.to_string());
    }
    let found = if created {
        None
    } else {
        signatures::detect(|off, buf| map.read(off, buf).map_err(io::Error::other), size)
            .map_err(|e| format!("cannot read what it holds: {e}"))?
    };
    match &found {
        Some(sig) if sig.kind != Kind::Pcache && !force => {
            return Err(format!("holds {sig}; add --force to destroy it"));
        }
        _ => {}
    }
    if !force && let Some(seg_num) = existing_format(map).map_err(|e| e.to_string())? {
        return Err(format!("{}; add --force to format it anyway", FormatError::AlreadyFormatted { seg_num }));
    }
    Ok(found)
}

/// Wipes what the device was, then writes the format.
fn write_format(map: &DaxMapping, force: bool, created: bool, kind: Target) -> Result<Formatted, String> {
    // The first 4 KiB is never used by pcache, but it is where partition
    // tables, LVM labels and the superblocks of ext*, XFS, FAT, NTFS and LUKS
    // live: zeroed so that nothing still recognises the device as what it
    // was. The superblock area after it (where dm-pcache, bcache, md 1.2 and
    // a 4Kn GPT keep theirs) is zeroed with it, first and durably, so that a
    // crash midway leaves a device that is plainly neither what it was nor
    // formatted. The other signatures looked for lie in the reserved area
    // and segment 0, which the format zeroes.
    if !created {
        map.zero_persist(0, SB_OFF + SB_SIZE as u64).map_err(|e| e.to_string())?;
    }
    let done = match kind.dialect {
        Dialect::RfcV1 => format(map, force),
        Dialect::DmPcache => format_dm(map, kind.data_crc, force),
    };
    done.map_err(|e| match e {
        e @ FormatError::AlreadyFormatted { .. } => format!("{e}; add --force to format it anyway"),
        e => e.to_string(),
    })
}

/// Says what was formatted, and what was lost or left unused.
fn report(device: &Path, map: &DaxMapping, done: &Formatted, found: Option<&Signature>, sparse_file: bool) {
    let layout = done.plan.layout;
    let segs = layout.seg_num();
    let d = layout.dialect();
    println!("formatted {} ({d})", device.display());
    println!("  size      {} ({} bytes)", human(layout.device_size()), layout.device_size());
    println!("  mapping   {} (flush: {})", map.mode(), map.flush_text());
    let start = d.segments_off();
    match d {
        Dialect::RfcV1 => println!(
            "  segments  {segs} of {} MiB from offset {start:#x}: segment 0 holds the backing table, \
             {} for caches ({})",
            SEG_SIZE >> 20,
            segs - 1,
            human(u64::from(segs - 1) * SEG_SIZE)
        ),
        Dialect::DmPcache => println!(
            "  segments  {segs} of {} MiB from offset {start:#x}, all of them one cache ({}); load it with \
             dmsetup's pcache target, or run it with `pcache detach`/`inspect`",
            SEG_SIZE >> 20,
            human(u64::from(segs) * SEG_SIZE)
        ),
    }
    if done.plan.capped() {
        println!(
            "  note      the device could hold {} segments, but the format counts at most {}: \
             the last {} are left unused",
            done.plan.segments_possible,
            d.seg_num_max(),
            human(done.plan.unused_bytes())
        );
    }
    match found {
        Some(sig) if sig.kind != Kind::Pcache => {
            println!("  note      {} on it was destroyed (--force)", sig.what);
        }
        Some(_) => println!("  note      the previous pcache format was overwritten (--force)"),
        None => {}
    }
    if sparse_file {
        println!(
            "  note      --sparse: the file's holes are not allocated; a write to one fails (SIGBUS) \
             if its filesystem is full"
        );
    }
}
