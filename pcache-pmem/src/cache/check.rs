//! The engine's invariants, checked between GC steps (by tests and with
//! `self_check`).

use pcache_format::media::{LogStep, LogWalk};

use super::index::Index;
use super::io::Roles;
use crate::pmem::{AsMedia, Pmem};

/// Checks that every indexed key that is not stale points at a segment in
/// use that log keys still reference, that the tails and the log end lie in
/// segments in use, and that every dirty key from the dirty tail on, closed
/// or not, points at a live segment of its own generation. Holds the key
/// tail, so GC is between steps; slices busy with requests are skipped.
pub(super) fn invariants<P: Pmem>(index: &Index, r: Roles<'_, P>) -> Result<(), String> {
    let (space, log) = (r.space, r.log);
    let key_tail = log.key_tail();
    indexed_keys(index, r)?;
    let (kt, dt, end) = (*key_tail, log.dirty_tail(), log.end());
    let used = space.used();
    for (name, pos) in [("key tail", kt), ("dirty tail", dt), ("log end", end)] {
        if !used.get(pos.seg as usize).copied().unwrap_or(false) {
            return Err(format!("the {name} is in free segment {}", pos.seg));
        }
    }
    // Data not yet written back must still be where its keys say.
    let live = |k: &pcache_format::Key, used: &[bool], what: &str| {
        let seg = k.cache_seg_id.get() as usize;
        if space.gen_of(seg as u32) != Some(k.seg_gen.get()) || !used.get(seg).copied().unwrap_or(false) {
            return Err(format!("{what} dirty key at {} points at reclaimed segment {seg}", k.off.get()));
        }
        Ok(())
    };
    let media = AsMedia(space.pmem());
    let mut visited = vec![false; space.n_segs() as usize];
    let mut walk = LogWalk::new(&media, space.layout(), space.dev_segs(), &mut visited, dt);
    while walk.pos() != end {
        match walk.step() {
            Some(LogStep::Keys { keys, .. }) => {
                for k in keys.iter().filter(|k| k.is_dirty()) {
                    live(k, &used, "a logged")?;
                }
            }
            Some(LogStep::Last { .. }) => {}
            Some(LogStep::End { at, end: why }) => {
                return Err(format!("the log ends at {at} ({why}) before its end {end}"));
            }
            None => break,
        }
    }
    let open = log.open_dirty_keys();
    let used = space.used();
    for k in &open {
        live(k, &used, "an open")?;
    }
    drop(key_tail);
    Ok(())
}

/// Every indexed key that is not stale points at a segment in use that log
/// keys still reference.
fn indexed_keys<P: Pmem>(index: &Index, r: Roles<'_, P>) -> Result<(), String> {
    for (i, slice) in index.slices().iter().enumerate() {
        // A slice held by a writer that waits for GC is skipped rather than
        // waited for: GC may be the caller.
        let Ok(s) = slice.try_read() else { continue };
        if s.is_empty() {
            continue;
        }
        // Which segments are in use, read after whatever is checked against
        // it was made (a key's segment is allocated before the key exists).
        let used = r.space.used();
        for (off, k) in s.iter() {
            if k.is_filling() || r.space.is_stale(&k) {
                continue;
            }
            let seg = k.cache_seg;
            if !used.get(seg as usize).copied().unwrap_or(false) {
                return Err(format!("slice {i}: key at {off} points at free segment {seg}"));
            }
            if r.space.referenced(seg) != Some(true) {
                return Err(format!("slice {i}: key at {off} points at segment {seg}, which has no references"));
            }
        }
    }
    Ok(())
}
