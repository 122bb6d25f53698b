//! `pcache inspect`: what a device holds, as text or JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use pcache_format::dm::DmCacheInfo;
use pcache_format::image::{
    BackingReport, DM_CACHE_ID, KeyState, Location, Report, ScanOptions, Severity, scan, scan_with,
};
use pcache_format::media::{Pair, ReadMedia, Window};
use pcache_format::{CopyInfo, Dialect, Key, SB_OFF, SB_SIZE, SEG_SIZE, pfn};
use pcache_pmem::{AsMedia, DaxMapping, DaxOptions};
use serde_json::{Value, json};

use crate::units::{human, ranges};

fn open(cmd: &str, device: &Path) -> Result<DaxMapping, u8> {
    DaxMapping::open(device, &DaxOptions { read_only: true, ..DaxOptions::default() }).map_err(|e| {
        eprintln!("pcache {cmd}: {e}");
        2
    })
}

/// Where the pmem device starts in what was opened, and why there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// Byte of the opened file or device where the pmem device starts.
    pub base: u64,
    /// Why not at 0: `--offset`, or the namespace's info block.
    pub how: Option<String>,
}

/// Finds where the pmem device starts in `map`: at `offset` when given;
/// else at 0 when a pcache superblock (of either dialect, damaged or not)
/// is there; else, when an NVDIMM namespace info block is (a QEMU NVDIMM
/// file, a namespace dump), at the `dataoff` it names.
pub fn locate<M: ReadMedia>(media: &M, offset: Option<u64>) -> Result<Located, String> {
    let size = media.size();
    if let Some(off) = offset {
        if off >= size {
            return Err(format!("--offset {off} is past the end of the {size}-byte device"));
        }
        return Ok(Located { base: off, how: Some(format!("--offset {off}")) });
    }
    let mut area = [0u8; SB_SIZE];
    if size < SB_OFF + SB_SIZE as u64 || media.read_at(SB_OFF, &mut area).is_err() {
        return Ok(Located { base: 0, how: None });
    }
    if Dialect::guess(&area).is_some() {
        return Ok(Located { base: 0, how: None });
    }
    match pfn::decode(&area, size) {
        Some(info) => {
            let mode = if info.devdax { "devdax" } else { "fsdax" };
            let how = format!(
                "an NVDIMM namespace ({mode}): its info block at byte 4096 puts the pmem device at byte {}",
                info.dataoff
            );
            Ok(Located { base: info.dataoff, how: Some(how) })
        }
        None => Ok(Located { base: 0, how: None }),
    }
}

/// Opens `device` read-only (under a shared lock), finds the pmem device in
/// it ([`locate`]) and scans it.
pub fn open_and_scan(
    cmd: &str,
    device: &Path,
    opts: ScanOptions,
    offset: Option<u64>,
) -> Result<(DaxMapping, Located, Report), u8> {
    let map = open(cmd, device)?;
    let at = locate(&AsMedia(&map), offset).map_err(|e| {
        eprintln!("pcache {cmd}: {}: {e}", device.display());
        2
    })?;
    let report = scan(&Window::new(AsMedia(&map), at.base), opts);
    Ok((map, at, report))
}

/// The live keys of a cache, after later keys have overwritten earlier
/// ones and stale keys are dropped: what replay would index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Summary {
    dirty_keys: u64,
    clean_keys: u64,
    dirty_bytes: u64,
    clean_bytes: u64,
    segments_used: u32,
}

/// The live keys of each cache (or why they cannot be told).
type Summaries = Vec<Result<Summary, String>>;

/// The keys of one cache's log as the scan meets them, in log order: each
/// later key wins over the ranges of the earlier ones it overlaps (which
/// are cut, or split in two), as the engine's index does on replay.
#[derive(Debug, Default)]
struct LiveKeys {
    /// Start of each live range: its end and whether it is dirty.
    ranges: BTreeMap<u64, (u64, bool)>,
    /// Cache segments keys point into (stale keys too).
    segs: BTreeSet<u32>,
}

impl LiveKeys {
    fn add(&mut self, key: &Key, state: KeyState) {
        self.segs.insert(key.cache_seg_id.get());
        let dirty = match state {
            KeyState::Stale => return,
            KeyState::Dirty => true,
            KeyState::WrittenBack | KeyState::Clean => false,
        };
        let (ks, ke) = (key.off.get(), key.end());
        // Ranges are disjoint: walking back from the key's end, the ones it
        // overlaps come first.
        let overlapped: Vec<(u64, (u64, bool))> =
            self.ranges.range(..ke).rev().take_while(|(_, (te, _))| *te > ks).map(|(ts, t)| (*ts, *t)).collect();
        for (ts, (te, d)) in overlapped {
            self.ranges.remove(&ts);
            if ts < ks {
                self.ranges.insert(ts, (ks, d));
            }
            if te > ke {
                self.ranges.insert(ke, (te, d));
            }
        }
        self.ranges.insert(ks, (ke, dirty));
    }

    /// The summary of cache `b`, unless the scan found it damaged (replay
    /// would refuse it).
    fn summary(&self, r: &Report, b: &BackingReport) -> Result<Summary, String> {
        let mine = |l: &Location| match *l {
            Location::Backing { id } => id == b.id,
            Location::Segment { backing, .. } | Location::Log { backing, .. } => backing == b.id,
            _ => false,
        };
        if let Some(f) = r.findings.iter().find(|f| f.severity == Severity::Problem && mine(&f.location)) {
            return Err(f.to_string());
        }
        let Some(log) = &b.log else { return Err("the key log was not walked".into()) };
        if let Some(s) = log.segs.iter().find(|s| self.segs.contains(s)) {
            return Err(format!("cache segment {s} is both in the key log and referenced by keys"));
        }
        let mut sum = Summary::default();
        for (&start, &(end, dirty)) in &self.ranges {
            let (keys, bytes) = if dirty {
                (&mut sum.dirty_keys, &mut sum.dirty_bytes)
            } else {
                (&mut sum.clean_keys, &mut sum.clean_bytes)
            };
            *keys += 1;
            *bytes += end - start;
        }
        let mut used = self.segs.clone();
        used.extend(&log.segs);
        sum.segments_used = used.len() as u32;
        Ok(sum)
    }
}

pub fn run(device: &Path, json: bool, offset: Option<u64>) -> u8 {
    let Ok(map) = open("inspect", device) else { return 2 };
    let at = match locate(&AsMedia(&map), offset) {
        Ok(at) => at,
        Err(e) => {
            eprintln!("pcache inspect: {}: {e}", device.display());
            return 2;
        }
    };
    // One walk of each log: the scan hands each key it accepts on to the
    // live-key count.
    let mut live: BTreeMap<u32, LiveKeys> = BTreeMap::new();
    let opts = ScanOptions { walk_logs: true, verify_data: false };
    let media = Window::new(AsMedia(&map), at.base);
    let report = scan_with(&media, opts, &mut |id, key, state| live.entry(id).or_default().add(key, state));
    let sums: Summaries = if report.layout.is_none() {
        Vec::new()
    } else {
        report.backings.iter().map(|b| live.remove(&b.id).unwrap_or_default().summary(&report, b)).collect()
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&to_json(device, &map, &at, &report, &sums)).unwrap_or_default());
    } else {
        print_text(device, &map, &at, &report, &sums);
    }
    if report.superblock_ok() { 0 } else { 1 }
}

fn copy_json(c: &CopyInfo) -> Value {
    json!({
        "seq": c.seq,
        "crc": format!("{:#010x}", c.stored_crc),
        "crc_ok": c.crc_ok(),
        "never_written": c.blank,
    })
}

fn pos_json(p: Option<pcache_format::CachePos>) -> Value {
    match p {
        Some(p) => json!({ "seg": p.cache_seg_id.get(), "off": p.seg_off.get() }),
        None => Value::Null,
    }
}

fn keys_json(sum: Option<&Result<Summary, String>>) -> Value {
    match sum {
        Some(Ok(s)) => json!({
            "dirty": s.dirty_keys, "clean": s.clean_keys,
            "dirty_bytes": s.dirty_bytes, "clean_bytes": s.clean_bytes,
            "segments_used": s.segments_used,
        }),
        Some(Err(e)) => json!({ "error": e }),
        None => Value::Null,
    }
}

fn backing_json(b: &BackingReport, sum: Option<&Result<Summary, String>>) -> Value {
    let ci = &b.info.cache_info;
    let log = b.log.as_ref().map(|l| {
        json!({
            "ksets": l.ksets, "last_ksets": l.last_ksets, "keys": l.keys,
            "dirty_keys": l.dirty_keys, "written_back_keys": l.written_back_keys,
            "clean_keys": l.clean_keys, "stale_keys": l.stale_keys,
            "end": { "seg": l.end.0, "off": l.end.1 }, "dirty_tail_reached": l.dirty_tail_reached,
        })
    });
    let dm = b.id == DM_CACHE_ID;
    json!({
        // dm-pcache's one cache has no entry, id or stored path.
        "id": (!dm).then_some(b.id),
        // The on-media state is RUNNING (the RFC's name): the entry is in
        // use, whether or not anything runs its cache now.
        "state": "in_use",
        "path": (!dm).then(|| String::from_utf8_lossy(b.info.path())),
        "dev_size": b.info.dev_size.get() * 512,
        "copy": b.copy,
        "copies": b.copies.iter().map(copy_json).collect::<Vec<_>>(),
        "cache": {
            "seg_id": ci.seg_id.get(),
            "n_segs": ci.n_segs.get(),
            "gc_percent": ci.gc_percent.get(),
            "data_crc": ci.data_crc(),
        },
        "chain": b.chain.iter().map(|s| s.dev_seg).collect::<Vec<_>>(),
        "chain_complete": b.chain_complete,
        "gens": b.chain.iter().map(|s| s.gen_).collect::<Vec<_>>(),
        "key_tail": pos_json(b.key_tail),
        "dirty_tail": pos_json(b.dirty_tail),
        "log": log,
        "keys": keys_json(sum),
    })
}

fn findings_json(r: &Report, severity: Severity) -> Vec<String> {
    r.findings.iter().filter(|f| f.severity == severity).map(|f| f.to_string()).collect()
}

fn superblock_json(r: &Report) -> Value {
    let sb = &r.superblock;
    let common = |magic: u64, crc: u32| {
        json!({
            "dialect": sb.dialect.map(Dialect::name),
            "magic": format!("{magic:#018x}"),
            "crc": format!("{crc:#010x}"),
            "crc_computed": format!("{:#010x}", sb.computed_crc),
            "crc_ok": sb.crc_ok(),
            "ok": sb.error.is_none(),
            "error": sb.error.map(|e| e.to_string()),
        })
    };
    let (mut v, extra) = match (sb.raw_dm, sb.raw) {
        (Some(dm), _) => {
            (common(dm.magic.get(), dm.crc.get()), json!({ "flags": dm.flags.get(), "seg_num": dm.seg_num.get() }))
        }
        (None, Some(raw)) => (
            common(raw.magic.get(), raw.crc.get()),
            json!({ "version": raw.version.get(), "flags": raw.flags.get(), "seg_num": raw.seg_num.get() }),
        ),
        (None, None) => return Value::Null,
    };
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), extra) {
        obj.extend(extra);
    }
    v
}

/// dm-pcache's cache info: both copies and the fields of the current one.
fn cache_info_json(pair: &Pair<DmCacheInfo>) -> Value {
    let latest = pair.latest.as_ref().ok();
    json!({
        "copies": pair.copies.iter().map(copy_json).collect::<Vec<_>>(),
        "current": latest.map(|l| l.copy),
        "flags": latest.map(|l| format!("{:#x}", l.record.flags.get())),
        "seg_id": latest.map(|l| l.record.seg_id.get()),
        "n_segs": latest.map(|l| l.record.n_segs.get()),
        "data_crc": latest.map(|l| l.record.data_crc()),
        "init_done": latest.map(|l| l.record.init_done()),
        "cache_mode": latest.and_then(|l| l.record.mode()).map(|m| m.name()),
        "gc_percent": latest.map(|l| l.record.gc_percent()),
        "error": pair.latest.as_ref().err().map(|e| e.to_string()),
    })
}

fn to_json(device: &Path, map: &DaxMapping, at: &Located, r: &Report, sums: &Summaries) -> Value {
    let superblock = superblock_json(r);
    let meta = r.meta.as_ref().map(|m| {
        json!({
            "copies": m.copies.iter().map(copy_json).collect::<Vec<_>>(),
            "current": m.latest.as_ref().ok().map(|l| l.copy),
            "error": m.latest.as_ref().err().map(|e| e.to_string()),
        })
    });
    json!({
        "device": device.display().to_string(),
        "size": r.device_size,
        "mapping": map.mode().to_string(),
        "offset": at.base,
        "offset_from": at.how,
        "superblock": superblock,
        "meta": meta,
        "cache_info": r.cache_info.as_ref().map(cache_info_json),
        "backings": r.backings.iter().enumerate().map(|(i, b)| backing_json(b, sums.get(i))).collect::<Vec<_>>(),
        "orphans": r.orphans.iter().map(orphan_json).collect::<Vec<_>>(),
        "problems": findings_json(r, Severity::Problem),
        "notes": findings_json(r, Severity::Note),
    })
}

/// A cache no backing entry owns (see `pcache repair`).
fn orphan_json(o: &pcache_format::image::Orphan) -> Value {
    json!({
        "first_segment": o.head,
        "chain": o.segs,
        "key_tail": pos_json(Some(o.key_tail)),
        "dirty_tail": pos_json(Some(o.dirty_tail)),
        "ksets": o.log.ksets,
        "dirty_keys": o.log.dirty_keys,
        "key_end": o.log.key_end,
        "data_crc": o.data_crc(),
        "holds_dirty_data": o.holds_dirty_data(),
    })
}

fn copies_text(copies: &[CopyInfo; 2], current: Option<u8>) -> String {
    let one = |i: usize| {
        let c = &copies[i];
        let state = if c.blank {
            return format!("copy {i} never written");
        } else if !c.crc_ok() {
            "bad CRC"
        } else if current == Some(i as u8) {
            "current"
        } else {
            "older"
        };
        format!("copy {i} seq {} ({state})", c.seq)
    };
    format!("{}, {}", one(0), one(1))
}

fn print_text(device: &Path, map: &DaxMapping, at: &Located, r: &Report, sums: &Summaries) {
    println!("device      {}", device.display());
    if let Some(how) = &at.how {
        println!("offset      {} ({how})", at.base);
    }
    println!("size        {} ({} bytes)", human(r.device_size), r.device_size);
    println!("mapping     {}", map.mode());
    if let Some(d) = r.superblock.dialect {
        println!("dialect     {d}");
    }
    println!();
    let sb = &r.superblock;
    if sb.raw_dm.is_some() {
        print_dm_superblock(r);
    } else {
        print_rfc_superblock(r);
    }
    if let Some(meta) = &r.meta {
        println!();
        let current = meta.latest.as_ref().ok().map(|l| l.copy);
        println!("meta segment  {}", copies_text(&meta.copies, current));
        if let Err(e) = &meta.latest {
            println!("  UNUSABLE: {e}");
        }
    }
    if let Some(ci) = &r.cache_info {
        print_cache_info(ci);
    } else if r.layout.is_some() {
        println!("backings      {} in use of {}", r.backings.len(), pcache_format::META_ENTRIES);
    }
    print_caches(r, sums);
    print_findings(r);
}

fn print_dm_superblock(r: &Report) {
    let sb = &r.superblock;
    let Some(raw) = sb.raw_dm else { return };
    match sb.error {
        None => println!("superblock  ok"),
        Some(e) => println!("superblock  UNUSABLE: {e}"),
    }
    println!("  magic     {:#018x}", raw.magic.get());
    println!("  flags     {:#010x}", raw.flags.get());
    let segs = raw.seg_num.get();
    println!("  seg_num   {segs} ({} in one cache)", human(u64::from(segs) * SEG_SIZE));
    let crc_state =
        if sb.crc_ok() { "ok".to_string() } else { format!("MISMATCH, computed {:#010x}", sb.computed_crc) };
    println!("  crc       {:#010x} ({crc_state})", raw.crc.get());
}

fn print_cache_info(pair: &Pair<DmCacheInfo>) {
    println!();
    let current = pair.latest.as_ref().ok().map(|l| l.copy);
    println!("cache info  {}", copies_text(&pair.copies, current));
    match &pair.latest {
        Ok(l) => {
            let ci = &l.record;
            let mode = ci.mode().map_or("unknown", |m| m.name());
            println!(
                "  flags     {:#x}: {mode}, gc {} %, data crc {}, {}",
                ci.flags.get(),
                ci.gc_percent(),
                if ci.data_crc() { "on" } else { "off" },
                if ci.init_done() { "INIT_DONE" } else { "INIT_DONE not set (the kernel would start it anew)" }
            );
        }
        Err(e) => println!("  UNUSABLE: {e}"),
    }
}

fn print_caches(r: &Report, sums: &Summaries) {
    for (i, b) in r.backings.iter().enumerate() {
        print_backing(b, sums.get(i));
    }
    for o in &r.orphans {
        println!();
        println!(
            "lost cache  {} segment(s) from segment {}, owned by no backing entry{}",
            o.segs.len(),
            o.head,
            if o.holds_dirty_data() { "" } else { " (no dirty data: its segments are free)" }
        );
        println!(
            "  key log   {} kset(s), {} dirty key(s), keys up to backing offset {}",
            o.log.ksets, o.log.dirty_keys, o.log.key_end
        );
    }
}

fn print_findings(r: &Report) {
    let problems = r.problems();
    let notes = r.findings.len() - problems;
    println!();
    if r.findings.is_empty() {
        println!("no problems found");
    } else {
        println!("{problems} problem(s), {notes} note(s):");
        for f in &r.findings {
            let tag = if f.severity == Severity::Problem { "problem" } else { "note" };
            println!("  {tag}: {f}");
        }
    }
}

fn print_rfc_superblock(r: &Report) {
    let sb = &r.superblock;
    match (sb.raw, sb.error) {
        (None, Some(e)) => println!("superblock  unusable: {e}"),
        (None, None) => println!("superblock  unreadable"),
        (Some(raw), Some(e)) if matches!(e.kind, pcache_format::ErrorKind::BadMagic { .. }) => {
            println!("superblock  none: not a pcache device ({:#018x} where the magic belongs)", raw.magic.get());
        }
        (Some(raw), err) => {
            match err {
                None => println!("superblock  ok"),
                Some(e) => println!("superblock  UNUSABLE: {e}"),
            }
            println!("  magic     {:#018x}", raw.magic.get());
            println!("  version   {}", raw.version.get());
            println!("  flags     {:#06x}", raw.flags.get());
            let segs = raw.seg_num.get();
            println!(
                "  seg_num   {segs} (segment 0 holds the backing table; {} for caches)",
                human(u64::from(segs.saturating_sub(1)) * SEG_SIZE)
            );
            let crc_state =
                if sb.crc_ok() { "ok".to_string() } else { format!("MISMATCH, computed {:#010x}", sb.computed_crc) };
            println!("  crc       {:#010x} ({crc_state})", raw.crc.get());
        }
    }
}

fn print_backing(b: &BackingReport, sum: Option<&Result<Summary, String>>) {
    let ci = &b.info.cache_info;
    println!();
    if b.id == DM_CACHE_ID {
        println!("cache  (dm-pcache: one cache, owning the device; it stores no backing path)");
    } else {
        println!("backing {}  {}  in use", b.id, String::from_utf8_lossy(b.info.path()));
        println!("  entry       {}", copies_text(&b.copies, Some(b.copy)));
    }
    let sectors = b.info.dev_size.get();
    if sectors > 0 {
        println!("  size        {}", human(sectors * 512));
    }
    let n = ci.n_segs.get();
    println!(
        "  cache       {n} segments ({}) from segment {}, gc {} %, data crc {}",
        human(u64::from(n) * SEG_SIZE),
        ci.seg_id.get(),
        ci.gc_percent.get(),
        if ci.data_crc() { "on" } else { "off" }
    );
    let chain: Vec<u32> = b.chain.iter().map(|s| s.dev_seg).collect();
    let complete = if b.chain_complete { String::new() } else { format!("  (INCOMPLETE: {} of {n})", chain.len()) };
    println!("  chain       {}{complete}", ranges(&chain));
    let pos = |p: Option<pcache_format::CachePos>| match p {
        Some(p) => format!("segment {} offset {:#x}", p.cache_seg_id.get(), p.seg_off.get()),
        None => "unreadable".to_string(),
    };
    println!("  key_tail    {}", pos(b.key_tail));
    println!("  dirty_tail  {}", pos(b.dirty_tail));
    if let Some(l) = &b.log {
        println!(
            "  key log     {} ksets ({} LAST), {} keys: {} dirty, {} written back, {} clean, {} stale; ends at segment {} offset {:#x}",
            l.ksets,
            l.last_ksets,
            l.keys,
            l.dirty_keys,
            l.written_back_keys,
            l.clean_keys,
            l.stale_keys,
            l.end.0,
            l.end.1
        );
    }
    match sum {
        Some(Ok(s)) => println!(
            "  live keys   {} dirty ({}), {} clean ({}); {} of {n} segments in use",
            s.dirty_keys,
            human(s.dirty_bytes),
            s.clean_keys,
            human(s.clean_bytes),
            s.segments_used
        ),
        Some(Err(e)) => println!("  live keys   unavailable: {e}"),
        None => {}
    }
}
