//! `pcache check`: verify every record, read-only.

use std::path::Path;

use pcache_format::image::{BackingReport, Issue, ScanOptions, Severity};
use pcache_pmem::{BackingId, stored_path};

use crate::inspect::open_and_scan;

/// What the stored backing paths name on this host, which only the host can
/// say: two entries that are one backing device reached by two names (a
/// problem: one backing, two caches), and paths that name nothing now (a
/// note: a device that is absent, or was renamed).
fn host_findings(backings: &[BackingReport]) -> Vec<(Severity, String)> {
    let mut out = Vec::new();
    let ids: Vec<(u32, &Path, Option<BackingId>)> = backings
        .iter()
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

pub fn run(device: &Path, verify_data: bool) -> u8 {
    let Ok((_map, report)) = open_and_scan("check", device, ScanOptions { walk_logs: true, verify_data }) else {
        return 2;
    };
    for f in &report.findings {
        let tag = if f.severity == Severity::Problem { "problem" } else { "note" };
        println!("{}: {tag}: {f}", device.display());
    }
    let host = host_findings(&report.backings);
    for (severity, msg) in &host {
        let tag = if *severity == Severity::Problem { "problem" } else { "note" };
        println!("{}: {tag}: {msg}", device.display());
    }
    let host_problems = host.iter().filter(|(s, _)| *s == Severity::Problem).count();
    let problems = report.problems() + host_problems;
    let notes = report.findings.len() + host.len() - problems;
    let keys: u64 = report.backings.iter().filter_map(|b| b.log.as_ref()).map(|l| l.keys).sum();
    println!(
        "{}: {} backing(s), {keys} key(s) checked: {problems} problem(s), {notes} note(s)",
        device.display(),
        report.backings.len()
    );
    let unreadable = report.findings.iter().any(|f| matches!(f.issue, Issue::Media(_)));
    if unreadable {
        2
    } else if problems > 0 {
        1
    } else {
        0
    }
}
