//! GC (spec §2.9.11–§2.9.12): consumes ksets from the key tail, never past
//! the dirty tail, once the cache's used segments reach the GC watermark.
//! Each key drops a reference on its segment; the key tail is persisted
//! past the kset *before* the segments that lost their last reference are
//! invalidated (generation bumped and persisted, then freed), so that after
//! a crash no replayed key references a segment that was reused. Stale
//! keys are then cleaned out of the index in small batches.

use std::sync::atomic::Ordering;

use pcache_format::CLEAN_KEYS_MAX;
use pcache_format::media::{LogEnd, LogStep, LogWalk};

use super::ctx::lock;
use super::error::EngineError;
use super::index::{Delta, Index};
use super::io::Roles;
use super::load::LogPos;
use super::log::Tail;
use crate::pmem::{AsMedia, Pmem};

/// Consumes the kset at the key tail if GC should run and may; returns
/// whether it did.
pub(super) fn step<P: Pmem>(r: Roles<'_, P>) -> Result<bool, EngineError> {
    let (space, log) = (r.space, r.log);
    if !space.over_watermark() {
        return Ok(false);
    }
    let mut key_tail = log.key_tail();
    let at = *key_tail;
    if at == log.dirty_tail() {
        return Ok(false);
    }
    let media = AsMedia(space.pmem());
    let mut visited = vec![false; space.n_segs() as usize];
    let mut walk = LogWalk::new(&media, space.layout(), space.dev_segs(), &mut visited, at);
    let keys = match walk.step() {
        Some(LogStep::Keys { keys, .. }) => keys,
        Some(LogStep::Last { .. }) => {
            let next = walk.pos();
            log.persist_tail(space, Tail::Key, next)?;
            *key_tail = next;
            drop(key_tail);
            // A key segment holds no data keys: freed without a new generation.
            space.free_segment(at.seg);
            r.ctx.stats.ksets_collected.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        Some(LogStep::End { end: LogEnd::Media { source, .. }, .. }) => return Err(EngineError::Pmem(source)),
        Some(LogStep::End { end, .. }) => {
            return Err(EngineError::log(at, format!("the log ends before the dirty tail: {end}")));
        }
        None => return Ok(false),
    };
    // Every key is checked before anything changes, and the references are
    // dropped only once the key tail is durable past the kset: a step that
    // fails leaves the refcounts as they were, so a retry never drops a
    // reference twice.
    if let Some(k) = keys.iter().find(|k| space.referenced(k.cache_seg_id.get()).is_none()) {
        return Err(EngineError::log(at, format!("key at {} outside the cache", k.off.get())));
    }
    let next = LogPos { seg: at.seg, off: at.off + pcache_format::kset_size(keys.len()) as u32 };
    log.persist_tail(space, Tail::Key, next)?;
    *key_tail = next;
    let released: Vec<u32> = keys.iter().map(|k| k.cache_seg_id.get()).filter(|&seg| space.release_ref(seg)).collect();
    // Still under the key-tail lock, so that check_invariants never sees a
    // segment between its last reference and its invalidation.
    for seg in released {
        space.invalidate(seg, r.ctx)?;
    }
    drop(key_tail);
    r.ctx.stats.ksets_collected.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

/// Runs GC steps as the watermark is crossed, until the cache stops or a
/// step fails (recorded in the health).
pub(super) fn worker<P: Pmem>(index: &Index, r: Roles<'_, P>) {
    let ctx = r.ctx;
    loop {
        let seen = ctx.wake.current();
        if ctx.stopping() {
            return;
        }
        let freed_before = ctx.stats.segments_freed.load(Ordering::Relaxed);
        match step(r) {
            Ok(true) => {
                if ctx.self_check
                    && let Err(e) = super::check::invariants(index, r)
                {
                    lock(&ctx.health).gc_stopped = Some(format!("invariant violated: {e}"));
                    r.space.wake_waiters();
                    return;
                }
                if ctx.stats.segments_freed.load(Ordering::Relaxed) != freed_before {
                    clean_stale(index, r);
                }
            }
            Ok(false) => ctx.wake.wait(seen, pcache_format::WORKER_INTERVAL),
            Err(e) => {
                lock(&ctx.health).gc_stopped = Some(e.to_string());
                r.space.wake_waiters();
                return;
            }
        }
    }
}

/// Removes stale keys from the index, a few at a time; slices busy with
/// requests are skipped (reads drop stale keys they meet anyway).
pub(super) fn clean_stale<P: Pmem>(index: &Index, r: Roles<'_, P>) {
    for slice in index.slices() {
        loop {
            let Ok(mut s) = slice.try_write() else { break };
            let stale: Vec<u64> =
                s.iter().filter(|(_, k)| r.space.is_stale(k)).map(|(o, _)| o).take(CLEAN_KEYS_MAX).collect();
            let mut d = Delta::default();
            for o in &stale {
                s.remove(*o, &mut d);
            }
            drop(s);
            r.ctx.stats.apply(&d);
            if stale.len() < CLEAN_KEYS_MAX {
                break;
            }
        }
    }
}
