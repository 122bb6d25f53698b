//! `pcache check`: verify every record, read-only.

use std::path::Path;

use pcache_format::image::{Issue, ScanOptions, Severity};

use crate::inspect::open_and_scan;

pub fn run(device: &Path, verify_data: bool) -> u8 {
    let Ok((_map, report)) = open_and_scan("check", device, ScanOptions { walk_logs: true, verify_data }) else {
        return 2;
    };
    for f in &report.findings {
        let tag = if f.severity == Severity::Problem { "problem" } else { "note" };
        println!("{}: {tag}: {f}", device.display());
    }
    let problems = report.problems();
    let notes = report.findings.len() - problems;
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
