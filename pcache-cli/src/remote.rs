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
//! Writes are sent without waiting for their replies (up to
//! [`MAX_IN_FLIGHT`] at once), so that writeback over a network with a
//! round trip of a millisecond still moves thousands of blocks a second:
//! `sync` waits for every reply (writing again whatever failed) before it
//! flushes. A write that overlaps one in flight waits for it first, and so
//! does a read, since the protocol does not order requests in flight.
//!
//! Requests honour the export's block sizes: split at its maximum (several
//! in flight at once), and a range not aligned to its minimum is
//! read-modified-written whole, alone. A write of zeroes is sent as
//! `NBD_CMD_WRITE_ZEROES` where the server offers it; `sync` is
//! `NBD_CMD_FLUSH` (a server without flush gets a warning at attach:
//! ordering then rests on it).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pcache_pmem::nbd_uri::NbdUri;
use pcache_pmem::{BackingDev, BackingError, BackingId};
use tracing::{info, warn};

use crate::nbd::client::{Conn, ExportInfo, Pending, ReqError, TF_READ_ONLY};
use crate::nbd::{TF_SEND_FLUSH, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES};

/// How long requests to a remote backing are retried by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Writes of zeroes at least this long go as `WRITE_ZEROES`.
const ZERO_MIN: usize = 4096;
/// The most bytes of writes kept for a flush to cover (writeback syncs
/// every 64 MiB at most).
pub const JOURNAL_MAX: usize = 128 << 20;

/// Writes sent and not yet answered, at most.
pub const MAX_IN_FLIGHT: usize = 64;

/// A write sent, its replies still to be read.
struct InFlight {
    off: u64,
    data: Arc<[u8]>,
    conn: Arc<Conn>,
    pending: Vec<Pending>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").field("off", &self.off).field("len", &self.data.len()).finish_non_exhaustive()
    }
}

impl InFlight {
    fn overlaps(&self, off: u64, len: u64) -> bool {
        self.off < off.saturating_add(len) && off < self.off + self.data.len() as u64
    }
}

/// A write no flush has covered yet.
#[derive(Debug, Clone)]
enum Written {
    /// These bytes.
    Data(Arc<[u8]>),
    /// This many zeroes (`WRITE_ZEROES`).
    Zeroes(u64),
}

/// The writes no flush has covered yet, in order.
#[derive(Debug, Default)]
struct Journal {
    writes: Vec<(u64, Written)>,
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
    /// The journal must be written again before a flush counts: a
    /// connection ended with writes no flush covered, a write in flight
    /// failed, or a flush did. Cleared only once a rewrite and a flush
    /// after it succeed.
    lost_unflushed: AtomicBool,
    /// Writes were lost with more written since the last flush than the
    /// journal keeps: no flush can cover them any more, so every `sync`
    /// fails until the cache is restarted (and writes back again from its
    /// dirty tail).
    poisoned: AtomicBool,
    journal: Mutex<Journal>,
    /// Writes sent, oldest first; no two overlap.
    in_flight: Mutex<std::collections::VecDeque<InFlight>>,
    /// Requests are failing now (logged once until one succeeds).
    failing: AtomicBool,
    /// Unaligned writes (read-modify-write) exclusive, the rest shared.
    rmw: RwLock<()>,
    /// Held for as long as the backing is open: one cache per export on
    /// this host.
    _lock: Option<std::fs::File>,
}

/// Takes this host's lock on the export `id` names: a file under
/// `/run/lock` (or the temporary directory) locked with `flock`, as a local
/// backing is. NBD has no locking of its own, so two caches on two hosts
/// in front of one export are the operator's to prevent.
fn lock_export(id: Option<BackingId>, name: &str) -> Result<Option<std::fs::File>, String> {
    let Some(BackingId::Remote { hash }) = id else { return Ok(None) };
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() && std::fs::metadata(dir).is_ok_and(|m| !m.permissions().readonly()) {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("pcache-nbd-{hash:016x}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{name}: cannot create the lock {}: {e}", path.display()))?;
    if pcache_pmem::sys::lock_exclusive(&file).is_err() {
        let holder = file
            .metadata()
            .ok()
            .and_then(|m| pcache_pmem::sys::holder_of(&m))
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        return Err(format!(
            "{name}: the export is in use by another pcache on this host{holder}: one export, one cache \
             (lock {})",
            path.display()
        ));
    }
    Ok(Some(file))
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
            return Err(format!(
                "{name}: the export is read-only, and a cache writes back to its backing: serve it writable \
                 (without nbdkit -r or qemu-nbd --read-only)"
            ));
        }
        if info.size % u64::from(info.min_block) != 0 {
            return Err(format!(
                "{name}: the export's size ({}) is not a multiple of its minimum block size ({}): its last \
                 block cannot be written whole",
                info.size, info.min_block
            ));
        }
        if info.size == 0 {
            return Err(format!("{name}: the export is empty (0 bytes): check the server's export and its size"));
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
        let id = uri.identity();
        let lock = lock_export(id, &name)?;
        Ok(Self {
            _lock: lock,
            id,
            uri: uri.clone(),
            path: PathBuf::from(name),
            info,
            timeout,
            conn: Mutex::new(Some(Arc::new(conn))),
            lost_unflushed: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            journal: Mutex::new(Journal::default()),
            in_flight: Mutex::new(std::collections::VecDeque::new()),
            failing: AtomicBool::new(false),
            rmw: RwLock::new(()),
        })
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.uri.export
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
        pcache_pmem::backing::check_range(&self.path, op, off, len, self.info.size)
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
        // A read after a write of the same range sees it.
        self.settle_overlapping(&mut lock(&self.in_flight), off, buf.len() as u64)?;
        let pieces = self.pieces(off, buf.len());
        self.retry("read", |c, deadline| c.read_many(&pieces, buf, deadline))
    }

    /// `data` at `off` as requests within the server's maximum, zeroes as
    /// `WRITE_ZEROES` where it has it.
    fn pieces_of<'a>(&self, off: u64, data: &'a [u8]) -> Vec<(u64, &'a [u8], bool)> {
        let zeroes = self.info.has(TF_SEND_WRITE_ZEROES);
        self.pieces(off, data.len())
            .into_iter()
            .map(|(o, n)| {
                let d = &data[(o - off) as usize..][..n];
                (o, d, zeroes && n >= ZERO_MIN && d.iter().all(|&b| b == 0))
            })
            .collect()
    }

    /// Sends a write and returns without waiting for its reply (see the
    /// module's introduction).
    fn write_aligned(&self, off: u64, data: &[u8]) -> Result<(), BackingError> {
        let data: Arc<[u8]> = data.into();
        let mut q = lock(&self.in_flight);
        self.settle_overlapping(&mut q, off, data.len() as u64)?;
        while q.len() >= MAX_IN_FLIGHT {
            if let Some(w) = q.pop_front() {
                self.settle(w)?;
            }
        }
        // Journaled in the order sent (sends are serialised by the queue's
        // lock, and an overlapping write in flight was settled first), so
        // a rewrite leaves what the server was left with.
        self.journal(off, Written::Data(data.clone()));
        match self.conn() {
            Ok(conn) => {
                let pending = conn.send_writes(&self.pieces_of(off, &data));
                q.push_back(InFlight { off, data, conn, pending });
                Ok(())
            }
            // No connection now: the retries wait for one.
            Err(_) => {
                let pieces = self.pieces_of(off, &data);
                self.retry("write", |c, deadline| c.write_many(&pieces, deadline))
            }
        }
    }

    /// Notes a write no flush has covered yet.
    fn journal(&self, off: u64, w: Written) {
        let mut j = lock(&self.journal);
        let len = match &w {
            Written::Data(d) => d.len(),
            Written::Zeroes(_) => 0,
        };
        if j.overflow || j.bytes + len > JOURNAL_MAX {
            *j = Journal { overflow: true, ..Journal::default() };
        } else {
            j.bytes += len;
            j.writes.push((off, w));
        }
    }

    /// Waits for the replies of a write sent; writes it again (with
    /// retries) if it failed or its connection was lost. A write that
    /// still fails is remembered for the next `sync` (the journal is
    /// written again before a flush counts), whoever settles it.
    fn settle(&self, w: InFlight) -> Result<(), BackingError> {
        if w.conn.wait_all(&w.pending, Instant::now() + self.timeout).is_ok() {
            return Ok(());
        }
        let pieces = self.pieces_of(w.off, &w.data);
        let r = self.retry("write", |c, deadline| c.write_many(&pieces, deadline));
        if r.is_err() {
            self.lost_unflushed.store(true, Ordering::Release);
        }
        r
    }

    /// Settles every write in flight that overlaps `off..off+len`.
    fn settle_overlapping(
        &self,
        q: &mut std::collections::VecDeque<InFlight>,
        off: u64,
        len: u64,
    ) -> Result<(), BackingError> {
        let mut i = 0;
        while i < q.len() {
            if q[i].overlaps(off, len) {
                if let Some(w) = q.remove(i) {
                    self.settle(w)?;
                }
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Settles every write in flight.
    fn settle_all(&self) -> Result<(), BackingError> {
        let mut q = lock(&self.in_flight);
        while let Some(w) = q.pop_front() {
            self.settle(w)?;
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
        for (off, w) in &j.writes {
            match w {
                Written::Data(data) => {
                    let pieces = self.pieces_of(*off, data);
                    self.retry("write", |c, deadline| c.write_many(&pieces, deadline))?;
                }
                Written::Zeroes(len) => self.send_zeroes(*off, *len)?,
            }
        }
        Ok(true)
    }

    /// `WRITE_ZEROES` of `[off, off + len)`, split at the server's maximum,
    /// waited for.
    fn send_zeroes(&self, off: u64, len: u64) -> Result<(), BackingError> {
        let max = u64::from(self.info.max_block);
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(max);
            let n32 = u32::try_from(n).unwrap_or(u32::MAX);
            self.retry("zero", |c, deadline| c.zero(at, n32, deadline))?;
            at += n;
        }
        Ok(())
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
        let poisoned = || {
            self.err(
                "flush",
                io::Error::other(
                    "writes were lost with a connection after more than the journal keeps was written since \
                     the last flush: restart the cache (it writes back again from its dirty tail)",
                ),
            )
        };
        self.settle_all()?;
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(2);
        loop {
            if self.poisoned.load(Ordering::Acquire) {
                return Err(poisoned());
            }
            // Writes a lost connection took with it, a failed write, a
            // failed flush: the journal again first. The flag is taken
            // before the rewrite, so a connection lost during it sets it
            // again (and the loop rewrites again); a failed rewrite puts
            // it back.
            if self.lost_unflushed.swap(false, Ordering::AcqRel) {
                match self.rewrite_journal() {
                    Ok(true) => {}
                    Ok(false) => {
                        self.poisoned.store(true, Ordering::Release);
                        return Err(poisoned());
                    }
                    Err(e) => {
                        self.lost_unflushed.store(true, Ordering::Release);
                        return Err(e);
                    }
                }
            }
            let flushed =
                if self.info.has(TF_SEND_FLUSH) { self.conn().and_then(|c| c.flush(deadline)).err() } else { None };
            if let Some(e) = flushed {
                // A failed flush may have dropped what it was to save.
                self.lost_unflushed.store(true, Ordering::Release);
                if Instant::now() >= deadline {
                    return Err(self.err(
                        "flush",
                        io::Error::new(io::ErrorKind::TimedOut, format!("{e}; gave up (--backing-timeout)")),
                    ));
                }
                std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            // A connection lost since the flush is seen by `conn()`.
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

    /// `NBD_CMD_TRIM`, where the server offers it, on whole blocks of its
    /// minimum size (the rest of a discard is left alone).
    fn trim(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        self.check("trim", off, usize::try_from(len).unwrap_or(usize::MAX))?;
        let min = u64::from(self.info.min_block);
        let (start, end) = (off.div_ceil(min) * min, (off + len) / min * min);
        if !self.info.has(TF_SEND_TRIM) || start >= end {
            return Ok(false);
        }
        let _shared = self.rmw.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.settle_overlapping(&mut lock(&self.in_flight), start, end - start)?;
        let step = u64::from(u32::MAX) / min * min;
        let mut at = start;
        while at < end {
            let n = u32::try_from((end - at).min(step)).unwrap_or(u32::MAX);
            self.retry("trim", |c, deadline| c.trim(at, n, deadline))?;
            at += u64::from(n);
        }
        Ok(true)
    }

    /// The server's own `base:allocation`, where it serves block status
    /// (a hint: any failure is "cannot tell").
    fn data_ranges(&self, off: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        self.info.block_status?;
        let end = off.checked_add(len)?.min(self.info.size);
        let deadline = Instant::now() + self.timeout.min(Duration::from_secs(5));
        let conn = self.conn().ok()?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = off;
        while at < end {
            let ask = u32::try_from(end - at).unwrap_or(!4095);
            let extents = conn.block_status(at, ask, deadline).ok()?;
            if extents.is_empty() {
                return None;
            }
            let before = at;
            for (l, flags) in extents {
                let l = u64::from(l).min(end - at);
                if l == 0 {
                    break;
                }
                if flags & crate::nbd::STATE_HOLE == 0 {
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == at => last.1 += l,
                        _ => out.push((at, l)),
                    }
                }
                at += l;
            }
            if at == before {
                return None;
            }
        }
        Some(out)
    }

    /// `NBD_CMD_WRITE_ZEROES`, where the server offers it (and only on
    /// whole blocks of its minimum size).
    fn zero(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        self.check("zero", off, usize::try_from(len).unwrap_or(usize::MAX))?;
        if !self.info.has(TF_SEND_WRITE_ZEROES) || len == 0 || self.widen(off, len as usize).is_some() {
            return Ok(false);
        }
        let _shared = self.rmw.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.settle_overlapping(&mut lock(&self.in_flight), off, len)?;
        self.journal(off, Written::Zeroes(len));
        if let Err(e) = self.send_zeroes(off, len) {
            self.lost_unflushed.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(true)
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
    Nbd(Box<NbdBacking>),
}

impl AnyBacking {
    /// Opens what `arg` names: an NBD URI, or a path.
    pub fn open(arg: &Path, timeout: Duration) -> Result<Self, String> {
        match arg.to_str().filter(|s| pcache_pmem::is_nbd_uri(s)) {
            Some(s) => NbdBacking::open(&NbdUri::parse(s)?, timeout).map(|n| Self::Nbd(Box::new(n))),
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
            Self::Nbd(n) => &**n,
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
    fn data_ranges(&self, off: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        self.dev().data_ranges(off, len)
    }
    fn zero(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        self.dev().zero(off, len)
    }
    fn trim(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        self.dev().trim(off, len)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::nbd::{Export, MemDevice, negotiate, transmit};

    /// Our own server, in memory, on a Unix socket, serving connections
    /// with workers (so requests in flight complete in any order).
    fn serve(dir: &Path, size: usize) -> (NbdUri, Arc<MemDevice>) {
        let sock = dir.join("s");
        let listener = UnixListener::bind(&sock).unwrap();
        let dev = Arc::new(MemDevice::new(size));
        let exports = vec![Export { name: "m".into(), description: String::new(), device: dev.clone() }];
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let exports = exports.clone();
                std::thread::spawn(move || {
                    let (mut r, mut w) = (conn.try_clone().unwrap(), conn);
                    if let Ok(Some(s)) = negotiate(&mut r, &mut w, &exports) {
                        let _ = transmit(r, w, exports[s.export].device.clone(), s, 4);
                    }
                });
            }
        });
        (NbdUri::parse(&format!("nbd+unix:///m?socket={}", sock.display())).unwrap(), dev)
    }

    /// A server that the protocol allows and no client should trust: it
    /// holds writes back and carries them out newest first, and answers a
    /// read at once, before the writes it holds. Simple replies only.
    fn reordering_server(dir: &Path, size: usize) -> (NbdUri, Arc<Mutex<Vec<u8>>>) {
        let sock = dir.join("r");
        let listener = UnixListener::bind(&sock).unwrap();
        let disk = Arc::new(Mutex::new(vec![0u8; size]));
        let d = disk.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                let disk = d.clone();
                std::thread::spawn(move || {
                    simple_handshake(&mut c, size)?;
                    serve_reordered(&mut c, &disk)
                });
            }
        });
        (NbdUri::parse(&format!("nbd+unix:///?socket={}", sock.display())).unwrap(), disk)
    }

    /// Fixed newstyle, no structured replies, `GO` answered with the size.
    fn simple_handshake(c: &mut std::os::unix::net::UnixStream, size: usize) -> std::io::Result<()> {
        use std::io::{Read, Write};
        use zerocopy::IntoBytes;

        use crate::nbd::*;
        c.write_all(&encode_hello())?;
        let mut flags = [0u8; 4];
        c.read_exact(&mut flags)?;
        let reply = |c: &mut std::os::unix::net::UnixStream, opt: u32, kind: u32, data: &[u8]| {
            c.write_all(&encode_option_reply(opt, kind, data))
        };
        loop {
            let h: OptionHeader = read_header(c)?;
            let mut data = vec![0; h.length.get() as usize];
            c.read_exact(&mut data)?;
            if h.option.get() != OPT_GO {
                reply(c, h.option.get(), REP_ERR_UNSUP, &[])?;
                continue;
            }
            let flags = TF_HAS_FLAGS | TF_SEND_FLUSH;
            let info = InfoExport { info: INFO_EXPORT.into(), size: (size as u64).into(), flags: flags.into() };
            reply(c, OPT_GO, REP_INFO, info.as_bytes())?;
            return reply(c, OPT_GO, REP_ACK, &[]);
        }
    }

    /// Holds writes back and carries them out newest first (when 8 are
    /// held, at a flush, or when the client goes quiet); reads at once.
    fn serve_reordered(c: &mut std::os::unix::net::UnixStream, disk: &Mutex<Vec<u8>>) -> std::io::Result<()> {
        use std::io::{Read, Write};
        use zerocopy::FromBytes;

        use crate::nbd::*;
        let mut held: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        let simple = |c: &mut std::os::unix::net::UnixStream, handle: u64, data: &[u8]| {
            c.write_all(&[&encode_simple_reply(0, handle)[..], data].concat())
        };
        let carry_out = |c: &mut std::os::unix::net::UnixStream, held: &mut Vec<(u64, u64, Vec<u8>)>| {
            for (handle, off, data) in held.drain(..).rev() {
                disk.lock().unwrap()[off as usize..][..data.len()].copy_from_slice(&data);
                simple(c, handle, &[])?;
            }
            Ok::<(), std::io::Error>(())
        };
        loop {
            c.set_read_timeout(Some(Duration::from_millis(2)))?;
            let mut h = [0u8; 28];
            match c.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    carry_out(c, &mut held)?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            c.set_read_timeout(None)?;
            let r = RequestHeader::read_from_bytes(&h).unwrap().parse().unwrap();
            let (off, len) = (r.offset, r.length as usize);
            match r.kind {
                CMD_WRITE => {
                    let mut data = vec![0; len];
                    c.read_exact(&mut data)?;
                    held.push((r.handle, off, data));
                }
                CMD_READ => {
                    let data = disk.lock().unwrap()[off as usize..][..len].to_vec();
                    simple(c, r.handle, &data)?;
                }
                CMD_FLUSH => {
                    carry_out(c, &mut held)?;
                    simple(c, r.handle, &[])?;
                }
                _ => return Ok(()),
            }
            if held.len() >= 8 {
                carry_out(c, &mut held)?;
            }
        }
    }

    #[test]
    fn a_server_that_reorders_requests_in_flight_gets_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let (uri, disk) = reordering_server(dir.path(), size);
        let b = NbdBacking::open(&uri, Duration::from_secs(10)).unwrap();
        let mut model = vec![0u8; size];
        for round in 0..600u32 {
            let off = u64::from(round % 37) * 4096 + u64::from(round % 3) * 1000;
            let len = 4096 + (round as usize % 4) * 512;
            let data = vec![(round % 250) as u8 + 1; len];
            b.write_at(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            if round % 3 == 0 {
                let mut buf = vec![0; len];
                b.read_at(off, &mut buf).unwrap();
                assert!(buf == model[off as usize..off as usize + len], "round {round}: a read after a write");
            }
        }
        b.sync().unwrap();
        assert!(*disk.lock().unwrap() == model, "the server holds the last write of every range");
    }

    /// Writes overlapping writes still in flight, reads right after writes,
    /// and syncs, against a model: every read sees the last write, and
    /// after a sync the server holds exactly the model.
    #[test]
    fn writes_in_flight_keep_their_order_and_reads_see_them() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let (uri, dev) = serve(dir.path(), size);
        let b = NbdBacking::open(&uri, Duration::from_secs(10)).unwrap();
        assert_eq!(b.size(), size as u64);
        let mut model = vec![0u8; size];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..2000u32 {
            let off = (next() % (size as u64 - 70_000)) & !511;
            let len = [512, 4096, 65_536][(next() % 3) as usize];
            let off = if round % 7 == 0 { off + next() % 512 } else { off };
            let byte = (round % 251) as u8 + 1;
            let data = if round % 11 == 0 { vec![0; len] } else { vec![byte; len] };
            b.write_at(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            if round % 5 == 0 {
                let mut buf = vec![0; len];
                b.read_at(off, &mut buf).unwrap();
                assert!(buf == model[off as usize..off as usize + len], "round {round}: a read after a write");
            }
            if round % 97 == 0 {
                b.sync().unwrap();
                assert!(dev.contents() == model, "round {round}: after a sync");
            }
        }
        b.sync().unwrap();
        assert!(dev.contents() == model);
    }
}
