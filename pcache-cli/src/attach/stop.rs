//! How the connections of `attach` end when it stops. The first SIGINT or
//! SIGTERM ends the client side of every connection, so that each finishes
//! the requests it has in flight and closes. A client that never reads its
//! replies, or a request that waits for something that never comes (a
//! write into a full cache whose writeback is held back), could hold that
//! for ever: once the stop timeout has passed, or at a second signal, both
//! directions of every connection still open are shut down — its reads end
//! and its blocked writes fail — and the caller stops the caches anyway,
//! which fails the requests still waiting in them. Either way the caches
//! stop as always, every kset closed: nothing acknowledged is lost.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pcache_cli::nbd::Progress;

use super::listen::Conn;

/// How far the stop has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    /// No stop signal yet.
    #[default]
    Serving,
    /// Connections finish what they have in flight.
    Finishing,
    /// Connections are cut: a second signal came, or the timeout passed.
    Cutting,
}

/// A connection being served: a clone of its socket, to shut it down, and
/// its counters.
struct Open {
    conn: Conn,
    progress: Arc<Progress>,
}

#[derive(Default)]
struct State {
    open: HashMap<u64, Open>,
    phase: Phase,
    /// What the second signal was, once it came.
    second: Option<&'static str>,
}

/// The connections being served, and the stop that ends them.
#[derive(Default)]
pub struct Connections {
    state: Mutex<State>,
    /// Signalled when a connection ends or the phase changes.
    changed: Condvar,
}

/// What a stop cut short.
#[derive(Debug)]
pub struct Cut {
    /// Why the connections were cut.
    pub why: String,
    progress: Vec<Arc<Progress>>,
}

impl Cut {
    /// The connections cut.
    pub fn connections(&self) -> usize {
        self.progress.len()
    }

    /// Requests read on them and never answered (final once their threads
    /// have ended).
    pub fn unanswered(&self) -> u64 {
        self.progress.iter().map(|p| p.unanswered()).sum()
    }
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a stop signal came.
    pub fn stopping(&self) -> bool {
        self.lock().phase != Phase::Serving
    }

    /// Adds connection `id`; one accepted while the server stops is shut
    /// down at once, as the others were.
    pub fn add(&self, id: u64, conn: Conn, progress: Arc<Progress>) {
        let mut s = self.lock();
        match s.phase {
            Phase::Serving => {}
            Phase::Finishing => conn.shutdown_read(),
            Phase::Cutting => conn.shutdown_both(),
        }
        s.open.insert(id, Open { conn, progress });
    }

    /// Connection `id` has ended.
    pub fn remove(&self, id: u64) {
        self.lock().open.remove(&id);
        self.changed.notify_all();
    }

    /// A stop signal, `name`: the first makes every connection finish what
    /// it has in flight and close (true); a later one asks [`Self::wait`] to
    /// cut them now (false).
    pub fn stop(&self, name: &'static str) -> bool {
        let mut s = self.lock();
        let first = s.phase == Phase::Serving;
        if first {
            s.phase = Phase::Finishing;
            for o in s.open.values() {
                o.conn.shutdown_read();
            }
        } else if s.second.is_none() {
            s.second = Some(name);
        }
        self.changed.notify_all();
        first
    }

    /// After the first stop signal: waits until every connection has
    /// ended, for up to `timeout` or until a second signal; then cuts
    /// those still open and says so.
    pub fn wait(&self, timeout: Duration) -> Option<Cut> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        let why = loop {
            if s.open.is_empty() {
                return None;
            }
            if let Some(name) = s.second {
                break format!("a second signal, {name}");
            }
            let now = Instant::now();
            if now >= deadline {
                break format!("--stop-timeout of {} s passed", timeout.as_secs());
            }
            s = self.changed.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        };
        s.phase = Phase::Cutting;
        for o in s.open.values() {
            o.conn.shutdown_both();
        }
        Some(Cut { why, progress: s.open.values().map(|o| o.progress.clone()).collect() })
    }
}
