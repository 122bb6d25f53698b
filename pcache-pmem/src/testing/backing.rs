//! Backing devices for tests: in memory ([`MemBacking`]), failing on
//! request ([`FaultyBacking`]), and losing unsynced writes in a crash
//! ([`SimBacking`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::backing::{BackingDev, BackingError, BackingId};

/// A backing device that fails on request: a test double for the faults
/// a real device has (writes, syncs or reads returning EIO). Each kind of
/// operation fails from a chosen point on: at once, or after a number of
/// further operations of that kind have succeeded (so that a batch can fail
/// partway), until switched off.
#[derive(Debug)]
pub struct FaultyBacking<B> {
    inner: B,
    /// Per kind (write, sync, read): operations still to succeed before
    /// failing; `NEVER` when not failing.
    ok_left: [AtomicU64; 3],
    /// Writes, syncs and reads refused so far.
    pub refused: AtomicU64,
}

const NEVER: u64 = u64::MAX;
const WRITES: usize = 0;
const SYNCS: usize = 1;
const READS: usize = 2;

impl<B: BackingDev> FaultyBacking<B> {
    /// `inner`, not failing yet.
    pub fn new(inner: B) -> Self {
        Self { inner, ok_left: [NEVER.into(), NEVER.into(), NEVER.into()], refused: 0.into() }
    }

    fn set(&self, kind: usize, v: u64) {
        self.ok_left[kind].store(v, Ordering::SeqCst);
    }

    /// Makes every write fail (or work again).
    pub fn fail_writes(&self, on: bool) {
        self.set(WRITES, if on { 0 } else { NEVER });
    }

    /// Lets `n` more writes succeed, then fails every write until
    /// [`FaultyBacking::fail_writes`]`(false)`.
    pub fn fail_writes_after(&self, n: u64) {
        self.set(WRITES, n.min(NEVER - 1));
    }

    /// Makes every sync fail (or work again).
    pub fn fail_syncs(&self, on: bool) {
        self.set(SYNCS, if on { 0 } else { NEVER });
    }

    /// Lets `n` more syncs succeed, then fails every sync.
    pub fn fail_syncs_after(&self, n: u64) {
        self.set(SYNCS, n.min(NEVER - 1));
    }

    /// Makes every read fail (or work again).
    pub fn fail_reads(&self, on: bool) {
        self.set(READS, if on { 0 } else { NEVER });
    }

    /// The device behind.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn check(&self, kind: usize, op: &'static str) -> Result<(), BackingError> {
        let passed = self.ok_left[kind]
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| match v {
                NEVER => Some(NEVER),
                0 => None,
                v => Some(v - 1),
            })
            .is_ok();
        if !passed {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(BackingError {
                op,
                path: self.inner.path().to_path_buf(),
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(())
    }
}

impl<B: BackingDev> BackingDev for FaultyBacking<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.check(READS, "read")?;
        self.inner.read_at(off, buf)
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), BackingError> {
        self.check(WRITES, "write")?;
        self.inner.write_at(off, data)
    }

    fn sync(&self) -> Result<(), BackingError> {
        self.check(SYNCS, "fdatasync")?;
        self.inner.sync()
    }

    fn zero(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        self.check(WRITES, "zero")?;
        self.inner.zero(off, len)
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn identity(&self) -> Option<BackingId> {
        self.inner.identity()
    }
}

/// A backing device in memory, for tests and examples.
#[derive(Debug)]
pub struct MemBacking {
    data: Mutex<Vec<u8>>,
    path: PathBuf,
}

impl MemBacking {
    /// `size` zero bytes, recorded under `path`.
    pub fn new(path: impl Into<PathBuf>, size: u64) -> Self {
        Self::from_vec(path, vec![0; size as usize])
    }

    /// `data`, recorded under `path`.
    pub fn from_vec(path: impl Into<PathBuf>, data: Vec<u8>) -> Self {
        Self { data: Mutex::new(data), path: path.into() }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn range(
        &self,
        op: &'static str,
        off: u64,
        len: usize,
        size: usize,
    ) -> Result<std::ops::Range<usize>, BackingError> {
        let start = usize::try_from(off).ok();
        match start.and_then(|s| Some(s..s.checked_add(len)?)).filter(|r| r.end <= size) {
            Some(r) => Ok(r),
            None => Err(BackingError {
                op,
                path: self.path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "past the end"),
            }),
        }
    }
}

impl BackingDev for MemBacking {
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.range("read", off, buf.len(), data.len())?;
        buf.copy_from_slice(&data[r]);
        Ok(())
    }

    fn write_at(&self, off: u64, src: &[u8]) -> Result<(), BackingError> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let len = data.len();
        let r = self.range("write", off, src.len(), len)?;
        data[r].copy_from_slice(src);
        Ok(())
    }

    fn sync(&self) -> Result<(), BackingError> {
        Ok(())
    }

    /// Zeroes without a buffer, as `fallocate(ZERO_RANGE)` does.
    fn zero(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let size = data.len();
        let r = self.range("zero", off, usize::try_from(len).unwrap_or(usize::MAX), size)?;
        data[r].fill(0);
        Ok(true)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A backing device in memory whose writes since the last sync may or may
/// not survive a crash ([`SimBacking::crash`]). Content is a
/// shared base plus an overlay of the 4 KiB pages written since, so that
/// freezing and copying it costs only what was written.
pub struct SimBacking {
    path: PathBuf,
    size: u64,
    state: Mutex<BackingState>,
}

type Overlay = std::collections::HashMap<u64, Arc<[u8; 4096]>>;

struct BackingState {
    base: Arc<Vec<u8>>,
    current: Overlay,
    durable: Overlay,
    pending: Vec<Arc<(u64, Vec<u8>)>>,
}

fn overlay_write(base: &[u8], ov: &mut Overlay, off: u64, data: &[u8]) {
    let mut done = 0usize;
    while done < data.len() {
        let at = off + done as u64;
        let (page, in_page) = (at / 4096, (at % 4096) as usize);
        let n = (4096 - in_page).min(data.len() - done);
        let p = ov.entry(page).or_insert_with(|| {
            let start = (page * 4096) as usize;
            let mut fresh = [0u8; 4096];
            let end = (start + 4096).min(base.len());
            fresh[..end - start].copy_from_slice(&base[start..end]);
            Arc::new(fresh)
        });
        Arc::make_mut(p)[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
        done += n;
    }
}

/// A frozen backing device: durable content and writes not yet synced.
#[derive(Clone)]
pub struct BackingCrash {
    path: PathBuf,
    base: Arc<Vec<u8>>,
    durable: Overlay,
    pending: Vec<Arc<(u64, Vec<u8>)>>,
}

impl std::fmt::Debug for BackingCrash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackingCrash")
            .field("durable_pages", &self.durable.len())
            .field("unsynced_writes", &self.pending.len())
            .finish()
    }
}

impl BackingCrash {
    /// The device after a crash: `keep` chooses which unsynced writes survive.
    pub fn image(&self, keep: impl Fn(usize) -> bool) -> SimBacking {
        let mut ov = self.durable.clone();
        for (i, w) in self.pending.iter().enumerate() {
            if keep(i) {
                overlay_write(&self.base, &mut ov, w.0, &w.1);
            }
        }
        SimBacking::with(self.path.clone(), self.base.clone(), ov)
    }
}

impl std::fmt::Debug for SimBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBacking").field("path", &self.path).field("size", &self.size).finish_non_exhaustive()
    }
}

impl SimBacking {
    /// A device holding `content`, all of it durable, recorded under `path`.
    pub fn new(path: impl Into<PathBuf>, content: Vec<u8>) -> Self {
        Self::with(path.into(), Arc::new(content), Overlay::new())
    }

    fn with(path: PathBuf, base: Arc<Vec<u8>>, ov: Overlay) -> Self {
        let size = base.len() as u64;
        let state = BackingState { base, current: ov.clone(), durable: ov, pending: Vec::new() };
        Self { path, size, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BackingState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The device frozen now: what a crash at this moment could leave.
    pub fn crash(&self) -> BackingCrash {
        let s = self.lock();
        BackingCrash {
            path: self.path.clone(),
            base: s.base.clone(),
            durable: s.durable.clone(),
            pending: s.pending.clone(),
        }
    }
}

impl BackingDev for SimBacking {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let s = self.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let (page, in_page) = (at / 4096, (at % 4096) as usize);
            let n = (4096 - in_page).min(buf.len() - done);
            match s.current.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].copy_from_slice(&s.base[at as usize..at as usize + n]),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), BackingError> {
        let mut s = self.lock();
        let base = s.base.clone();
        overlay_write(&base, &mut s.current, off, data);
        s.pending.push(Arc::new((off, data.to_vec())));
        Ok(())
    }

    fn sync(&self) -> Result<(), BackingError> {
        let mut s = self.lock();
        if !s.pending.is_empty() {
            s.durable = s.current.clone();
            s.pending.clear();
        }
        Ok(())
    }

    /// Zeroes like any write: lost in a crash unless synced.
    fn zero(&self, off: u64, len: u64) -> Result<bool, BackingError> {
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Ok(false);
        }
        self.write_at(off, &vec![0u8; len as usize])?;
        Ok(true)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_backing_bounds() {
        let m = MemBacking::new("/mem", 100);
        m.write_at(90, &[1; 10]).unwrap();
        assert!(m.write_at(91, &[1; 10]).is_err());
        assert!(m.read_at(u64::MAX, &mut [0; 1]).is_err());
        assert_eq!(m.contents()[95], 1);
    }

    #[test]
    fn sim_backing_keeps_synced_writes_and_chooses_unsynced_ones() {
        let b = SimBacking::new("/sim", vec![7; 3 * 4096]);
        b.write_at(4090, &[1; 10]).unwrap();
        b.sync().unwrap();
        b.write_at(0, &[2; 4]).unwrap();
        b.write_at(8192, &[3; 4]).unwrap();
        let mut buf = [0; 4];
        b.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [2; 4], "the current view has every write");
        let frozen = b.crash();
        for (keep, first, last) in [(false, 7, 7), (true, 2, 3)] {
            let img = frozen.image(|_| keep);
            img.read_at(4090, &mut buf).unwrap();
            assert_eq!(buf, [1; 4], "synced");
            img.read_at(0, &mut buf).unwrap();
            assert_eq!(buf, [first; 4]);
            img.read_at(8192, &mut buf).unwrap();
            assert_eq!(buf, [last; 4]);
        }
        let img = frozen.image(|i| i == 1);
        img.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [7; 4], "each unsynced write is kept or dropped on its own");
    }
}
