//! Read misses being filled. A reader that misses puts a placeholder in the
//! index for the range it reads from the backing device, then replaces it
//! with the cached data; readers of the same range wait for that fill
//! rather than read the backing device twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::ctx::lock;

/// A fill in progress; done once its placeholder is gone.
#[derive(Debug, Default)]
struct Fill {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Fill {
    fn finish(&self) {
        *lock(&self.done) = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The fills in progress, by id.
#[derive(Debug)]
pub(super) struct Fills {
    map: Mutex<HashMap<u32, Arc<Fill>>>,
    next: AtomicU32,
}

impl Default for Fills {
    fn default() -> Self {
        Self { map: Mutex::new(HashMap::new()), next: AtomicU32::new(1) }
    }
}

impl Fills {
    /// Starts a fill; returns its id.
    pub(super) fn start(&self) -> u32 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.map).insert(id, Arc::new(Fill::default()));
        id
    }

    /// Ends fill `id` and wakes its waiters.
    pub(super) fn finish(&self, id: u32) {
        if let Some(fill) = lock(&self.map).remove(&id) {
            fill.finish();
        }
    }

    /// Waits for fill `id` to end (at once if it already has).
    pub(super) fn wait(&self, id: u32) {
        let fill = lock(&self.map).get(&id).cloned();
        if let Some(fill) = fill {
            fill.wait();
        }
    }
}
