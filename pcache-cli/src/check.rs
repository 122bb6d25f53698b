//! `pcache check`: verify every record, read-only.

use std::path::Path;

use pcache_format::image::{BackingReport, DM_CACHE_ID, Issue, ScanOptions, Severity};
use pcache_pmem::{BackingId, stored_path};
use serde_json::json;

use crate::inspect::open_and_scan;

/// What the stored backing paths name on this host, which only the host can
/// say: two entries that are one backing device reached by two names (a
/// problem: one backing, two caches), and paths that name nothing now (a
/// note: a device that is absent, or was renamed).
fn host_findings(backings: &[BackingReport]) -> Vec<(Severity, String)> {
    let mut out = Vec::new();
    let ids: Vec<(u32, &Path, Option<BackingId>)> = backings
        .iter()
        .filter(|b| b.id != DM_CACHE_ID)
        .map(|b| {
            let p = stored_path(&b.info);
            (b.id, p, BackingId::of_path(p))
        })
        .collect();
    for (i, (id, path, ident)) in ids.iter().enumerate() {
        match ident {
            None => out.push((
                Severity::Note,
                format!(
                    "backing {id}: {} does not exist on this host (absent, or renamed: `pcache rename` points \
                     the cache at its new name)",
                    path.display()
                ),
            )),
            Some(ident) => {
                if let Some((other, other_path, _)) = ids[..i].iter().find(|(_, _, o)| o.as_ref() == Some(ident)) {
                    out.push((
                        Severity::Problem,
                        format!(
                            "backing {id}: {} is the same backing device as backing {other} ({}): one backing \
                             has two caches, and each may hold data the other overwrote",
                            path.display(),
                            other_path.display()
                        ),
                    ));
                }
            }
        }
    }
    out
}

pub fn run(device: &Path, verify_data: bool, json: bool, offset: Option<u64>) -> u8 {
    let opts = ScanOptions { walk_logs: true, verify_data };
    let Ok((_map, at, report)) = open_and_scan("check", device, opts, offset) else {
        return 2;
    };
    let mut found: Vec<(Severity, String)> = report.findings.iter().map(|f| (f.severity, f.to_string())).collect();
    found.extend(host_findings(&report.backings));
    let problems: Vec<&str> = found.iter().filter(|(s, _)| *s == Severity::Problem).map(|(_, m)| m.as_str()).collect();
    let notes: Vec<&str> = found.iter().filter(|(s, _)| *s == Severity::Note).map(|(_, m)| m.as_str()).collect();
    let keys: u64 = report.backings.iter().filter_map(|b| b.log.as_ref()).map(|l| l.keys).sum();
    let unreadable = report.findings.iter().any(|f| matches!(f.issue, Issue::Media(_)));
    let code = if unreadable {
        2
    } else if !problems.is_empty() {
        1
    } else {
        0
    };
    let dialect = report.superblock.dialect.map(|d| d.name());
    if json {
        let v = json!({
            "device": device.display().to_string(),
            "offset": at.base,
            "dialect": dialect,
            "caches": report.backings.len(),
            "keys": keys,
            "problems": problems,
            "notes": notes,
            "exit": code,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return code;
    }
    if let Some(how) = &at.how {
        println!("{}: offset {}: {how}", device.display(), at.base);
    }
    for (severity, msg) in &found {
        let tag = if *severity == Severity::Problem { "problem" } else { "note" };
        println!("{}: {tag}: {msg}", device.display());
    }
    let what = match dialect {
        Some("dm-pcache") => format!("dm-pcache, {} cache(s)", report.backings.len()),
        _ => format!("{} backing(s)", report.backings.len()),
    };
    println!(
        "{}: {what}, {keys} key(s) checked: {} problem(s), {} note(s)",
        device.display(),
        problems.len(),
        notes.len()
    );
    code
}
