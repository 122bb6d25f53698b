//! Refusals before anything is opened for writing: a sparse pmem file, and
//! backing devices that are the pmem device, hold it, or repeat.

use std::path::{Path, PathBuf};

use pcache_pmem::BackingId;

use super::hints::shell_quote;

/// Refuses a pmem file with holes: a store into a hole allocates a block
/// in the middle of a request, and a full filesystem answers with SIGBUS.
pub fn check_allocated(device: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(device) else { return Ok(()) };
    if !meta.is_file() {
        return Ok(());
    }
    match pcache_pmem::sys::unallocated(&meta) {
        0 => Ok(()),
        holes => Err(format!(
            "{} is sparse ({holes} of its {} bytes have no blocks): a write into a hole needs a new block, and a \
             full filesystem answers that with SIGBUS; allocate the whole file first, keeping its contents: \
             fallocate -l {} {}",
            device.display(),
            meta.len(),
            meta.len(),
            shell_quote(&device.display().to_string())
        )),
    }
}

/// Refuses backings that are the pmem device (or hold it), and one backing
/// given twice under two names, before anything is opened for writing.
pub fn check_backings(device: &Path, backings: &[PathBuf]) -> Result<(), String> {
    let pmem_meta = std::fs::metadata(device).ok();
    let pmem_id = pmem_meta.as_ref().and_then(BackingId::of_meta);
    let mut seen: Vec<(BackingId, &Path)> = Vec::new();
    for b in backings {
        // An NBD URI's identity is its server and export (resolved now);
        // a path's is the file or block device it names.
        let Some(id) = BackingId::of_path(b) else { continue };
        if Some(id) == pmem_id {
            return Err(format!(
                "{} is the pmem device {} itself: a cache cannot be its own backing device (every write \
                 to the export would overwrite the cache)",
                b.display(),
                device.display()
            ));
        }
        if let (BackingId::Block { rdev }, Some(pm)) = (id, &pmem_meta)
            && pm.is_file()
        {
            if std::os::unix::fs::MetadataExt::dev(pm) == rdev {
                return Err(format!(
                    "{} holds the filesystem that the pmem file {} lives on: writing it would destroy the cache",
                    b.display(),
                    device.display()
                ));
            }
            if loop_backing_file(rdev).is_some_and(|f| BackingId::of_path(&f) == pmem_id) {
                return Err(format!(
                    "{} is a loop device over the pmem file {}: a cache cannot be its own backing device",
                    b.display(),
                    device.display()
                ));
            }
        }
        if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
            return Err(format!(
                "{} and {} are the same backing device: give it once (one backing, one cache)",
                first.display(),
                b.display()
            ));
        }
        seen.push((id, b));
    }
    Ok(())
}

/// The file a loop block device reads, from sysfs.
fn loop_backing_file(rdev: u64) -> Option<PathBuf> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let f = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file")).ok()?;
    Some(PathBuf::from(f.trim_end()))
}
