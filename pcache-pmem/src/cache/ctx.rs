//! What every role of a running cache shares: whether it is stopping, the
//! requests in flight, the wake-up signal of the workers, the health of the
//! background work and the counters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::error::EngineError;
use super::options::{Counters, Health};
use super::shard::Sharded;

/// Locks `m`, also after a panic of another holder: every structure the
/// engine guards stays consistent between statements that can panic.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A wake-up signal with a generation count, so that a worker that was
/// busy when it fired still sees it.
#[derive(Debug, Default)]
pub(super) struct Event {
    gen_: Mutex<u64>,
    cv: Condvar,
}

impl Event {
    pub(super) fn notify(&self) {
        *lock(&self.gen_) += 1;
        self.cv.notify_all();
    }

    pub(super) fn current(&self) -> u64 {
        *lock(&self.gen_)
    }

    /// Waits until notified after `seen`, or `timeout`.
    pub(super) fn wait(&self, seen: u64, timeout: Duration) {
        let g = lock(&self.gen_);
        if *g == seen {
            let _ = self.cv.wait_timeout(g, timeout);
        }
    }
}

/// Errors of the background work.
#[derive(Debug, Default)]
pub(super) struct BgHealth {
    pub(super) writeback_failing_since: Option<Instant>,
    pub(super) writeback_last_error: Option<String>,
    pub(super) writeback_stopped: Option<String>,
    pub(super) gc_stopped: Option<String>,
}

impl BgHealth {
    /// Records a writeback failure: one that may clear (retried) is failing
    /// since the first of its kind; any other stops writeback until a
    /// restart.
    pub(super) fn writeback_failed(&mut self, msg: String, retry: bool) {
        if retry {
            self.writeback_failing_since.get_or_insert_with(Instant::now);
            self.writeback_last_error = Some(msg);
        } else {
            self.writeback_stopped = Some(msg);
        }
    }
}

/// The state every role of a running cache shares.
#[derive(Debug)]
pub(super) struct Ctx {
    /// Set once by `stop`: requests are refused, workers return.
    stopping: AtomicBool,
    /// Requests inside the public entry points; `stop` waits for them.
    inflight: Sharded,
    /// Wakes the flusher and the background workers.
    pub(super) wake: Event,
    pub(super) health: Mutex<BgHealth>,
    pub(super) stats: Counters,
    /// Writeback and GC run in background threads.
    pub(super) background: bool,
    /// A writer waiting for space gives up after writeback has failed this long.
    stall_timeout: Duration,
    /// Verify the invariants after every GC step.
    pub(super) self_check: bool,
}

/// A request in flight (see [`Ctx::enter`]).
pub(super) struct InflightGuard<'a>(&'a Sharded);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.add_with(-1, Ordering::SeqCst);
    }
}

impl Ctx {
    pub(super) fn new(background: bool, stall_timeout: Duration, self_check: bool) -> Self {
        Self {
            stopping: AtomicBool::new(false),
            inflight: Sharded::default(),
            wake: Event::default(),
            health: Mutex::new(BgHealth::default()),
            stats: Counters::default(),
            background,
            stall_timeout,
            self_check,
        }
    }

    /// Admits a request: counted in flight until the guard drops, refused
    /// once the cache stops.
    pub(super) fn enter(&self) -> Result<InflightGuard<'_>, EngineError> {
        self.inflight.add_with(1, Ordering::SeqCst);
        let guard = InflightGuard(&self.inflight);
        // SeqCst on both sides: either `stop` sees this request in flight
        // and waits, or this request sees `stopping`.
        if self.stopping() {
            return Err(EngineError::Stopped);
        }
        Ok(guard)
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Refuses new requests, wakes every worker, and waits for the requests
    /// already admitted to finish.
    pub(super) fn stop_requests(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify();
    }

    /// Waits for the requests admitted before [`Ctx::stop_requests`].
    pub(super) fn drain(&self) {
        while self.inflight.sum_with(Ordering::SeqCst) != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Why waiting for a free segment is pointless, if it is.
    pub(super) fn stalled(&self) -> Option<String> {
        let h = lock(&self.health);
        if let Some(e) = &h.writeback_stopped {
            return Some(format!("writeback stopped: {e}"));
        }
        if let Some(e) = &h.gc_stopped {
            return Some(format!("GC stopped: {e}"));
        }
        match (h.writeback_failing_since, &h.writeback_last_error) {
            (Some(since), Some(e)) if since.elapsed() >= self.stall_timeout => {
                Some(format!("writeback has failed for {} s: {e}", since.elapsed().as_secs()))
            }
            _ => None,
        }
    }

    /// The health as a caller sees it.
    pub(super) fn health(&self) -> Health {
        let h = lock(&self.health);
        Health {
            writeback_failing: h.writeback_failing_since.and(h.writeback_last_error.clone()),
            writeback_stopped: h.writeback_stopped.clone(),
            gc_stopped: h.gc_stopped.clone(),
        }
    }

    /// Why dirty data cannot be written back, while it cannot (see
    /// `Cache::stuck`).
    pub(super) fn stuck(&self) -> Option<String> {
        let pending = self.stats.dirty_pending();
        if pending == 0 {
            return None;
        }
        let h = lock(&self.health);
        let why = match (&h.writeback_stopped, h.writeback_failing_since, &h.writeback_last_error) {
            (Some(e), _, _) => e.clone(),
            (None, Some(since), Some(e)) => format!("{e} (failing for {} s)", since.elapsed().as_secs()),
            _ => return None,
        };
        Some(format!("{why}; {pending} dirty bytes are not written back"))
    }
}
