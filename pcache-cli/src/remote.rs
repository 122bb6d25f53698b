//! A remote backing store: an export of an NBD server, named by an NBD URI,
//! as a [`BackingDev`].
//!
//! The server may go away and come back. Every request is retried, with
//! back-off and a new connection, until the backing timeout runs out; then
//! it fails with the last reason. Writes the engine makes go to pmem and do
//! not wait for the server; writeback stalls while it is away and resumes
//! with nothing lost, since a write the server acknowledged but a flush
//! never covered is written again: every write since the last flush is
//! kept (up to [`JOURNAL_MAX`]), and a `sync` after a lost connection
//! writes them all again, in order, before it flushes. (Past that bound
//! the `sync` fails instead, and writeback repeats its whole batch before
//! it moves the dirty tail.)
//!
//! Requests honour the export's block sizes: split at its maximum (several
//! in flight at once), and a range not aligned to its minimum is
//! read-modified-written whole, alone. A write of zeroes is sent as
//! `NBD_CMD_WRITE_ZEROES` where the server offers it; `sync` is
//! `NBD_CMD_FLUSH` (a server without flush gets a warning at attach:
//! ordering then rests on it).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pcache_pmem::nbd_uri::NbdUri;
use pcache_pmem::{BackingDev, BackingError, BackingId};
use tracing::{info, warn};

use crate::nbd::client::{Conn, ExportInfo, ReqError, TF_READ_ONLY};
use crate::nbd::{TF_SEND_FLUSH, TF_SEND_WRITE_ZEROES};

/// How long requests to a remote backing are retried by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Writes of zeroes at least this long go as `WRITE_ZEROES`.
const ZERO_MIN: usize = 4096;
/// The most bytes of writes kept for a flush to cover (writeback syncs
/// every 64 MiB at most).
pub const JOURNAL_MAX: usize = 128 << 20;

/// The writes no flush has covered yet, in order.
#[derive(Debug, Default)]
struct Journal {
    writes: Vec<(u64, Vec<u8>)>,
    bytes: usize,
    /// More was written than is kept.
    overflow: bool,
}

/// An export of an NBD server, as a backing device.
#[derive(Debug)]
pub struct NbdBacking {
    uri: NbdUri,
    /// The URI in normal form, as the backing table stores it.
    path: PathBuf,
    info: ExportInfo,
    id: Option<BackingId>,
    timeout: Duration,
    conn: Mutex<Option<Arc<Conn>>>,
    /// A connection ended with writes no flush covered.
    lost_unflushed: AtomicBool,
    journal: Mutex<Journal>,
    /// Requests are failing now (logged once until one succeeds).
    failing: AtomicBool,
    /// Unaligned writes (read-modify-write) exclusive, the rest shared.
    rmw: RwLock<()>,
    reconnects: AtomicU64,
}

impl NbdBacking {
    /// Connects to the export `uri` names (once: a server that is not
    /// there now is an error the operator should see at once). Refuses a
    /// read-only or empty export. `timeout` bounds every later request,
    /// retries included.
    pub fn open(uri: &NbdUri, timeout: Duration) -> Result<Self, String> {
        let conn = Conn::open(uri, timeout.min(Duration::from_secs(10)))?;
        let info = conn.info();
        let name = uri.normal();
        if info.has(TF_READ_ONLY) {
            return Err(format!("{name}: the export is read-only; a cache writes back to its backing"));
        }
        if info.size == 0 {
            return Err(format!("{name}: the export is empty"));
        }
        if !info.has(TF_SEND_FLUSH) {
            warn!(
                backing = %name,
                "the server offers no flush: writeback cannot make its writes durable before it moves on, so \
                 after a crash of the server only what it wrote through survives"
            );
        }
        if name.len() >= pcache_format::PATH_LEN {
            return Err(format!(
                "{name}: {} bytes; a backing entry holds at most {} (use a shorter host or export name)",
                name.len(),
                pcache_format::PATH_LEN - 1
            ));
        }
        Ok(Self {
            id: uri.identity(),
            uri: uri.clone(),
            path: PathBuf::from(name),
            info,
            timeout,
            conn: Mutex::new(Some(Arc::new(conn))),
            lost_unflushed: AtomicBool::new(false),
            journal: Mutex::new(Journal::default()),
            failing: AtomicBool::new(false),
            rmw: RwLock::new(()),
            reconnects: AtomicU64::new(0),
        })
    }

    /// The export as the server described it.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.uri.export
    }

    /// Connections made again after one was lost.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The connection, made anew if the last one is gone.
    fn conn(&self) -> Result<Arc<Conn>, ReqError> {
        let mut slot = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = slot.as_ref() {
            if c.dead().is_none() {
                return Ok(c.clone());
            }
            if c.unflushed() {
                self.lost_unflushed.store(true, Ordering::Release);
            }
            *slot = None;
        }
        let c = Conn::open(&self.uri, self.timeout.min(Duration::from_secs(10))).map_err(ReqError::Lost)?;
        if c.info().size != self.info.size {
            return Err(ReqError::Lost(format!(
                "the export is now {} bytes, not {}: not the same export",
                c.info().size,
                self.info.size
            )));
        }
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        info!(backing = %self.path.display(), "reconnected");
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` on a live connection until it succeeds, fails for good, or
    /// the timeout runs out.
    fn retry<T>(
        &self,
        op: &'static str,
        mut f: impl FnMut(&Conn, Instant) -> Result<T, ReqError>,
    ) -> Result<T, BackingError> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(2);
        loop {
            let err = match self.conn() {
                Ok(c) => match f(&c, deadline) {
                    Ok(v) => {
                        if self.failing.swap(false, Ordering::Relaxed) {
                            info!(backing = %self.path.display(), op, "remote backing answers again");
                        }
                        return Ok(v);
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if !err.transient() {
                return Err(self.err(op, io::Error::other(err.to_string())));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.err(
                    op,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{err}; gave up after {} s of retries (--backing-timeout); check that the server is \
                             up and reachable",
                            self.timeout.as_secs()
                        ),
                    ),
                ));
            }
            if !self.failing.swap(true, Ordering::Relaxed) {
                warn!(backing = %self.path.display(), op, error = %err, "remote backing failed; retrying");
            }
            // The last try comes at the deadline itself.
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn err(&self, op: &'static str, source: io::Error) -> BackingError {
        BackingError { op, path: self.path.clone(), source }
    }

    fn check(&self, op: &'static str, off: u64, len: usize) -> Result<(), BackingError> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(self.err(
                op,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{len} bytes at {off} pass the end ({})", self.info.size),
                ),
            )),
        }
    }

    /// The aligned range around `off..off+len`, if it is not aligned.
    fn widen(&self, off: u64, len: usize) -> Option<(u64, usize)> {
        let min = u64::from(self.info.min_block);
        let end = off + len as u64;
        let (a, b) = (off - off % min, end.div_ceil(min) * min);
        (a != off || b != end).then_some((a, (b - a) as usize))
    }

    /// Requests of at most the server's maximum covering `off..off+len`.
    fn pieces(&self, off: u64, len: usize) -> Vec<(u64, usize)> {
        let max = self.info.max_block as usize;
        (0..len).step_by(max.max(1)).map(|at| (off + at as u64, max.min(len - at))).collect()
    }

    fn read_aligned(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let pieces = self.pieces(off, buf.len());
        self.retry("read", |c, deadline| c.read_many(&pieces, buf, deadline))
    }

    fn write_aligned(&self, off: u64, data: &[u8]) -> Result<(), BackingError> {
        let zeroes = self.info.has(TF_SEND_WRITE_ZEROES);
        let pieces: Vec<(u64, &[u8], bool)> = self
            .pieces(off, data.len())
            .into_iter()
            .map(|(o, n)| {
                let d = &data[(o - off) as usize..][..n];
                (o, d, zeroes && n >= ZERO_MIN && d.iter().all(|&b| b == 0))
            })
            .collect();
        self.retry("write", |c, deadline| c.write_many(&pieces, deadline))?;
        let mut j = lock(&self.journal);
        if j.overflow || j.bytes + data.len() > JOURNAL_MAX {
            *j = Journal { overflow: true, ..Journal::default() };
        } else {
            j.bytes += data.len();
            j.writes.push((off, data.to_vec()));
        }
        Ok(())
    }

    /// After a lost connection: every write since the last flush again, in
    /// order (or `false` if more was written than the journal keeps).
    fn rewrite_journal(&self) -> Result<bool, BackingError> {
        let j = lock(&self.journal);
        if j.overflow {
            return Ok(false);
        }
        for (off, data) in &j.writes {
            let pieces: Vec<(u64, &[u8], bool)> = self
                .pieces(*off, data.len())
                .into_iter()
                .map(|(o, n)| (o, &data[(o - off) as usize..][..n], false))
                .collect();
            self.retry("write", |c, deadline| c.write_many(&pieces, deadline))?;
        }
        Ok(true)
    }
}

impl BackingDev for NbdBacking {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.check("read", off, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        match self.widen(off, buf.len()) {
            None => self.read_aligned(off, buf),
            Some((a, n)) => {
                let mut whole = vec![0; n];
                self.read_aligned(a, &mut whole)?;
                buf.copy_from_slice(&whole[(off - a) as usize..][..buf.len()]);
                Ok(())
            }
        }
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), BackingError> {
        self.check("write", off, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        match self.widen(off, data.len()) {
            None => {
                let _shared = self.rmw.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                self.write_aligned(off, data)
            }
            Some((a, n)) => {
                let _alone = self.rmw.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut whole = vec![0; n];
                self.read_aligned(a, &mut whole)?;
                whole[(off - a) as usize..][..data.len()].copy_from_slice(data);
                self.write_aligned(a, &whole)
            }
        }
    }

    fn sync(&self) -> Result<(), BackingError> {
        let _writes = self.rmw.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let deadline = Instant::now() + self.timeout;
        loop {
            // Writes a lost connection took with it are written again
            // first; a reconnect while flushing means the same.
            if self.lost_unflushed.swap(false, Ordering::AcqRel) && !self.rewrite_journal()? {
                return Err(self.err(
                    "flush",
                    io::Error::other(
                        "the connection to the server was lost before a flush covered more writes than are kept \
                         to write again; writeback writes them again",
                    ),
                ));
            }
            if self.info.has(TF_SEND_FLUSH) {
                self.retry("flush", |c, deadline| c.flush(deadline))?;
            }
            // A connection lost during the flush is seen by the next
            // `conn()`; look now.
            let _ = self.conn();
            if !self.lost_unflushed.load(Ordering::Acquire) {
                *lock(&self.journal) = Journal::default();
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.err("flush", io::Error::new(io::ErrorKind::TimedOut, "the connection kept failing")));
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn identity(&self) -> Option<BackingId> {
        self.id
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for NbdBacking {
    fn drop(&mut self) {
        if let Some(c) = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            c.close();
        }
    }
}

/// A backing device given on the command line: a local file or block
/// device, or an NBD server's export.
#[derive(Debug)]
pub enum AnyBacking {
    /// A file or block device.
    File(pcache_pmem::FileBacking),
    /// An NBD export.
    Nbd(NbdBacking),
}

impl AnyBacking {
    /// Opens what `arg` names: an NBD URI, or a path.
    pub fn open(arg: &Path, timeout: Duration) -> Result<Self, String> {
        match arg.to_str().filter(|s| pcache_pmem::is_nbd_uri(s)) {
            Some(s) => NbdBacking::open(&NbdUri::parse(s)?, timeout).map(Self::Nbd),
            None => pcache_pmem::FileBacking::open(arg).map(Self::File).map_err(|e| e.to_string()),
        }
    }

    /// Whether it is remote.
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Nbd(_))
    }

    fn dev(&self) -> &dyn BackingDev {
        match self {
            Self::File(f) => f,
            Self::Nbd(n) => n,
        }
    }
}

impl BackingDev for AnyBacking {
    fn size(&self) -> u64 {
        self.dev().size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.dev().read_at(off, buf)
    }
    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), BackingError> {
        self.dev().write_at(off, data)
    }
    fn sync(&self) -> Result<(), BackingError> {
        self.dev().sync()
    }
    fn path(&self) -> &Path {
        self.dev().path()
    }
    fn identity(&self) -> Option<BackingId> {
        self.dev().identity()
    }
}
