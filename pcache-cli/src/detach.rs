//! `pcache detach`: write a backing device's cache back and give it up.

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use pcache_format::{Dialect, SEG_SIZE};
use pcache_pmem::cache::detach::{SalvageReport, detach_salvage};
use pcache_pmem::dm_rescue::{Rescue, dm_writeback};
use pcache_pmem::{AsMedia, CacheDev, DaxMapping, DaxOptions, EngineError, Pmem, PmemError, PmemWindow, detach};

use crate::inspect::locate;

use crate::units::human;

/// Whether `device` holds a dm-pcache superblock (a damaged one too), at
/// `offset` or where [`locate`] finds the pmem device: then `detach` is
/// the dm-pcache rescue.
pub fn is_dm_pcache(device: &Path, offset: Option<u64>) -> bool {
    let Ok(map) = DaxMapping::open(device, &DaxOptions { read_only: true, ..DaxOptions::default() }) else {
        return false;
    };
    let Ok(at) = locate(&AsMedia(&map), offset) else { return false };
    let mut area = [0u8; pcache_format::SB_SIZE];
    map.read(at.base + pcache_format::SB_OFF, &mut area).is_ok() && Dialect::guess(&area) == Some(Dialect::DmPcache)
}

/// `pcache detach --backing BACKING` of a dm-pcache device: every dirty key
/// written back in log order, the backing device synced, then the dirty
/// tail moved to the end of the log.
pub fn dm(device: &Path, backing: &Path, dry_run: bool, salvage: bool, offset: Option<u64>) -> u8 {
    let fail = |msg: String| {
        eprintln!("pcache detach: {msg}");
        1
    };
    if salvage {
        return fail(format!(
            "{}: --salvage is for rfc-v1 caches; a dm-pcache cache `pcache check` finds damaged is refused \
             whole, as the kernel refuses it",
            device.display()
        ));
    }
    let map = match DaxMapping::open(device, &DaxOptions::default()) {
        Ok(m) => m,
        Err(e) => return fail(e.to_string()),
    };
    let at = match locate(&AsMedia(&map), offset) {
        Ok(at) => at,
        Err(e) => return fail(format!("{}: {e}", device.display())),
    };
    if let Some(how) = &at.how {
        println!("{}: offset {}: {how}", device.display(), at.base);
    }
    let map = match PmemWindow::new(map, at.base) {
        Ok(m) => m,
        Err(e) => return fail(format!("{}: {e}", device.display())),
    };
    let file = match crate::open::backing(device, backing) {
        Ok(f) => f,
        Err(e) => return fail(format!("{e} (the cache is written back to it, so it must be there)")),
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("writing back {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = Instant::now();
    let done = dm_writeback(&map, &file, dry_run, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let r = match done {
        Ok(r) => r,
        Err(e) => return fail(format!("{}: {e}", device.display())),
    };
    dm_report(device, backing, &r, dry_run, t);
    0
}

/// Says what a dm-pcache rescue found, and did.
fn dm_report(device: &Path, backing: &Path, r: &Rescue, dry_run: bool, t: Instant) {
    let (dt, end) = (r.dirty_tail, r.log_end);
    if dry_run {
        for e in &r.extents {
            println!("would write {} bytes at backing offset {} (pmem offset {:#x})", e.len, e.off, e.pmem_off);
        }
        println!(
            "{}: {} dirty key(s), {} to write back to {}, from dirty tail {}:{} to the log's end {}:{}; nothing written",
            device.display(),
            r.extents.len(),
            human(r.bytes),
            backing.display(),
            dt.0,
            dt.1,
            end.0,
            end.1
        );
        return;
    }
    if !r.written {
        println!(
            "{}: the cache is clean (dirty tail {}:{} is the log's end); nothing to write",
            device.display(),
            dt.0,
            dt.1
        );
        return;
    }
    println!(
        "{}: {} dirty key(s), {} written back to {} in {:.1?}; dirty tail {}:{} -> {}:{}: the cache is clean and \
         kept (the dm-pcache module loads it with its data still cached)",
        device.display(),
        r.extents.len(),
        human(r.bytes),
        backing.display(),
        t.elapsed(),
        dt.0,
        dt.1,
        end.0,
        end.1
    );
}

/// Exit status of `detach --salvage` when it detached but could not write
/// everything back: the lost extents and damaged ksets are listed.
pub const EXIT_DATA_LOST: u8 = 3;

pub fn run(device: &Path, backing: &Path, salvage: bool) -> u8 {
    let fail = |msg: String| {
        eprintln!("pcache detach: {msg}");
        1
    };
    let dev = match crate::open::cache_dev(device) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let file = match crate::open::backing(device, backing) {
        Ok(f) => f,
        Err(e) => return fail(format!("{e} (detach writes the cache back to it, so it must be there)")),
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("writing back {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = Instant::now();
    let progress = |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    };
    if salvage {
        let done = detach_salvage(&dev, file, progress);
        bar.finish_and_clear();
        return match done {
            Ok(r) => salvaged(device, backing, &r, t),
            Err(e) => failed(&dev, device, backing, e, true),
        };
    }
    let done = detach(&dev, file, progress);
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
                human(u64::from(r.segments_released) * SEG_SIZE)
            );
            println!("the backing device now holds all its data; backing entry {} is free", r.id);
            0
        }
        Err(e) => failed(&dev, device, backing, e, false),
    }
}

/// Prints what a salvage did: a `lost:` line per extent not written back,
/// a `damaged:` line per damaged stretch of the key log, then a summary.
fn salvaged(device: &Path, backing: &Path, r: &SalvageReport, t: Instant) -> u8 {
    for l in &r.lost {
        println!("lost: {l}");
    }
    for d in &r.damaged {
        println!("damaged: {d}");
    }
    let d = &r.detach;
    println!(
        "detached {} from {}{}: {} written back in {} kset(s) in {:.1?}, {} segments ({}) released",
        backing.display(),
        device.display(),
        if r.lost_anything() { " with data lost" } else { "" },
        human(d.bytes_written_back),
        d.ksets_written_back,
        t.elapsed(),
        d.segments_released,
        human(u64::from(d.segments_released) * SEG_SIZE)
    );
    if !r.lost_anything() {
        println!("nothing was lost: the backing device now holds all its data; backing entry {} is free", d.id);
        return 0;
    }
    println!(
        "{} extent(s) ({}) lost, {} damaged kset(s): the backing device holds older data in every range listed \
         above (restore those from a backup); everything else is written back; backing entry {} is free",
        r.lost.len(),
        human(r.lost_bytes()),
        r.damaged.len(),
        d.id
    );
    EXIT_DATA_LOST
}

/// Reports a detach that failed: nothing was released.
fn failed(dev: &CacheDev<DaxMapping>, device: &Path, backing: &Path, e: EngineError, salvage: bool) -> u8 {
    let msg = match e {
        EngineError::NoCache { path } => crate::open::no_cache(dev, device, &path),
        // Damaged cache data or metadata: salvage writes back the rest.
        e @ (EngineError::Corrupt(_) | EngineError::DataCrc { .. } | EngineError::Pmem(PmemError::Media { .. }))
            if !salvage =>
        {
            format!(
                "{}: {e}\nnothing was released, the cache is intact; `pcache detach {} --backing {} --salvage` \
                 writes back everything else and lists what it cannot",
                backing.display(),
                device.display(),
                backing.display()
            )
        }
        e => format!("{}: {e}; nothing was released, the cache is intact", backing.display()),
    };
    eprintln!("pcache detach: {msg}");
    1
}

/// `pcache detach --discard`: give a cache up without writing it back.
pub fn discard(device: &Path, stored: &Path) -> u8 {
    let fail = |msg: String| {
        eprintln!("pcache detach: {msg}");
        1
    };
    let dev = match crate::open::cache_dev(device) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    match pcache_pmem::discard(&dev, stored) {
        Ok(r) => {
            let lost = r.dirty_bytes.map_or_else(|| "an unknown amount of".to_string(), human);
            println!(
                "discarded the cache of {} on {}: {lost} dirty data not written back is gone, {} segments ({}) released",
                stored.display(),
                device.display(),
                r.segments_released,
                human(u64::from(r.segments_released) * SEG_SIZE)
            );
            println!("backing entry {} is free", r.id);
            0
        }
        Err(EngineError::NoCache { path }) => fail(crate::open::no_cache(&dev, device, &path)),
        Err(e) => fail(format!("{e}; nothing was released")),
    }
}
