//! Real persistent memory: a shared mapping of a DAX device, a file on a DAX
//! filesystem, or an ordinary file or block device standing in for pmem.
//!
//! | what is opened | how it is mapped | how stores become durable |
//! |---|---|---|
//! | device DAX (`/dev/daxX.Y`) | whole device, `MAP_SHARED` | cache-line write-back + `sfence` |
//! | file on a DAX filesystem | `MAP_SHARED_VALIDATE \| MAP_SYNC` | cache-line write-back + `sfence` |
//! | ordinary file or block device | `MAP_SHARED` (page cache) | `msync` of the flushed ranges at fence time |
//!
//! `PCACHE_FORCE_PMEM=1` treats any mapping as pmem (cache-line write-back,
//! no `msync`): it is for benchmarks and tests of the flush paths, and is not
//! durable across power loss on a device that is not pmem.
//!
//! Every writable open takes an exclusive advisory lock (`flock`) on the
//! device, so a second process gets [`PmemError::Busy`] and touches nothing;
//! read-only opens take a shared lock, so they never read a device another
//! process is changing.

use std::cell::RefCell;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::flush::{self, FlushConfig, FlushInstr};
use crate::pmem::{Pmem, PmemError, check_range};

/// How a device is mapped, in the words shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapMode {
    /// A device-DAX character device, mapped whole.
    DeviceDax,
    /// A file on a DAX filesystem, mapped with `MAP_SYNC`.
    FileDaxSync,
    /// A file on a DAX filesystem, mapped read-only (nothing to make durable).
    FileDax,
    /// An ordinary file or block device through the page cache; durable by `msync`.
    Emulated,
    /// An ordinary mapping treated as pmem because `PCACHE_FORCE_PMEM` is set.
    ForcedPmem,
}

impl fmt::Display for MapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapMode::DeviceDax => "device DAX",
            MapMode::FileDaxSync => "file DAX, MAP_SYNC",
            MapMode::FileDax => "file DAX, read-only",
            MapMode::Emulated => "emulated pmem: msync",
            MapMode::ForcedPmem => "forced pmem: cache flushes without msync (not power-safe)",
        })
    }
}

/// How to open a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaxOptions {
    /// Map read-only, under a shared lock.
    pub read_only: bool,
    /// Skip the advisory lock (for tests of locking itself).
    pub no_lock: bool,
    /// Use this flush instruction instead of the detected one.
    pub flush: Option<FlushInstr>,
    /// Use (or not) non-temporal stores instead of the default.
    pub movnt: Option<bool>,
    /// Treat the mapping as pmem whatever it is (default: `PCACHE_FORCE_PMEM`).
    pub force_pmem: Option<bool>,
}

/// A shared mapping of a whole pmem device.
pub struct DaxMapping {
    ptr: NonNull<u8>,
    len: u64,
    mode: MapMode,
    flush: FlushConfig,
    /// Durability comes from `msync` of the flushed ranges at each fence:
    /// emulated pmem, and file DAX on a CPU without a usable cache-line
    /// flush instruction (the kernel writes DAX caches back on msync).
    msync: bool,
    path: PathBuf,
    read_only: bool,
    /// Emulated pmem: stores are `pwrite`s to the file, and the mapping is
    /// read-only. A store through a shared file mapping costs a write fault
    /// per page after each `msync`, whose write-protection of the pages
    /// costs a TLB shootdown on every CPU; a `pwrite` into the same page
    /// cache costs neither, and a filesystem that cannot give it a block
    /// answers with an error rather than SIGBUS.
    pwrite: bool,
    id: u64,
    file: File,
}

// SAFETY: the mapping is plain shared memory owned by this value until drop;
// every access goes through range-checked copies, so sharing the pointer
// between threads is as safe as sharing a `&[AtomicU8]` would be.
unsafe impl Send for DaxMapping {}
// SAFETY: as above.
unsafe impl Sync for DaxMapping {}

impl fmt::Debug for DaxMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaxMapping")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("mode", &self.mode)
            .field("flush", &self.flush)
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Ranges this thread flushed on emulated mappings and has not fenced:
    /// (mapping id, page-aligned start, end).
    static PENDING_MSYNC: RefCell<Vec<(u64, usize, usize)>> = const { RefCell::new(Vec::new()) };
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> PmemError {
    PmemError::Io { op, path: path.to_path_buf(), source }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> PmemError {
    PmemError::Unsupported { path: path.to_path_buf(), reason: reason.into() }
}

/// Reads a small sysfs file, trimmed.
fn sysfs(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Whether every pmem region's persistence domain includes the CPU caches
/// (eADR): then cache-line write-back is unnecessary.
pub fn platform_has_eadr() -> bool {
    eadr_in(Path::new("/sys/bus/nd/devices"))
}

/// [`platform_has_eadr`] over the nvdimm bus directory `devices`: true when
/// there is at least one region and every region says `cpu_cache`.
fn eadr_in(devices: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir(devices) else { return false };
    let mut regions = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("region") {
            continue;
        }
        regions += 1;
        let domain = sysfs(&format!("{}/persistence_domain", entry.path().display()));
        if domain.as_deref() != Some("cpu_cache") {
            return false;
        }
    }
    regions > 0
}

/// Why a file of this type cannot be pmem, or `None` when it may be: a
/// regular file, a block device or a character device (device DAX, checked
/// further by [`probe`]).
fn refuse_kind(ft: std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() || ft.is_block_device() || ft.is_char_device() {
        None
    } else if ft.is_fifo() {
        Some("a FIFO, not a file, block device or device DAX")
    } else if ft.is_socket() {
        Some("a socket, not a file, block device or device DAX")
    } else if ft.is_dir() {
        Some("a directory, not a file, block device or device DAX")
    } else {
        Some("not a file, block device or device DAX")
    }
}

/// Size and kind of the device behind `file`.
fn probe(file: &File, path: &Path) -> Result<(u64, bool), PmemError> {
    let meta = file.metadata().map_err(|e| io_err("stat", path, e))?;
    let ft = meta.file_type();
    if let Some(why) = refuse_kind(ft) {
        return Err(unsupported(path, why));
    }
    if ft.is_file() {
        return Ok((meta.len(), false));
    }
    if ft.is_block_device() {
        let size = crate::sys::block_size(file).map_err(|e| io_err("ioctl BLKGETSIZE64", path, e))?;
        return Ok((size, false));
    }
    if ft.is_char_device() {
        let rdev = meta.rdev();
        let base = format!("/sys/dev/char/{}:{}", libc::major(rdev), libc::minor(rdev));
        let subsystem = std::fs::read_link(format!("{base}/subsystem")).ok();
        let is_dax = subsystem.as_ref().and_then(|p| p.file_name()).is_some_and(|n| n == "dax");
        if !is_dax {
            return Err(unsupported(path, "a character device that is not device DAX"));
        }
        let size = sysfs(&format!("{base}/size")).and_then(|s| s.parse().ok());
        let size =
            size.ok_or_else(|| unsupported(path, format!("cannot read the size of this device DAX from {base}/size")))?;
        return Ok((size, true));
    }
    Err(unsupported(path, "not a file, block device or device DAX"))
}

/// Whether the file is accessed through DAX (`STATX_ATTR_DAX`, Linux 5.8).
fn file_is_dax(file: &File) -> bool {
    // SAFETY: statx fills the zeroed struct through a valid pointer; the
    // path is an empty C string used with AT_EMPTY_PATH on our own fd.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let rc = libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, 0, &mut stx);
        rc == 0
            && stx.stx_attributes_mask & libc::STATX_ATTR_DAX as u64 != 0
            && stx.stx_attributes & libc::STATX_ATTR_DAX as u64 != 0
    }
}

/// Opens `path` for mapping: refuses what cannot be pmem, claims a block
/// device exclusively, and locks the file.
fn open_file(path: &Path, opts: &DaxOptions) -> Result<File, PmemError> {
    // Refuse what cannot be pmem before opening it: opening a FIFO blocks
    // until a writer comes, for ever if none does. O_NONBLOCK covers a FIFO
    // swapped in after the stat (it only affects FIFOs and sockets here:
    // regular files, block devices and device DAX ignore it for mmap, flock
    // and ioctl); `probe` checks the opened file again.
    let meta = std::fs::metadata(path).map_err(|e| io_err("open", path, e))?;
    if let Some(why) = refuse_kind(meta.file_type()) {
        return Err(unsupported(path, why));
    }
    // A block device opened for writing is claimed exclusively, as the
    // kernel's own users of a disk claim it: a mounted filesystem, a running
    // cache's backing (under any device node) or another program's
    // exclusive open makes the open fail, not the write.
    let excl = if meta.file_type().is_block_device() && !opts.read_only && !opts.no_lock { libc::O_EXCL } else { 0 };
    let mut oo = OpenOptions::new();
    oo.read(true).write(!opts.read_only).custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | excl);
    let file = oo.open(path).map_err(|e| {
        if excl != 0 && e.raw_os_error() == Some(libc::EBUSY) {
            PmemError::Busy { path: path.to_path_buf(), holder: None }
        } else {
            io_err("open", path, e)
        }
    })?;
    if !opts.no_lock {
        let op = if opts.read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on an fd we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let meta = file.metadata().ok();
                let holder = meta.as_ref().and_then(crate::sys::holder_of);
                return Err(PmemError::Busy { path: path.to_path_buf(), holder });
            }
            return Err(io_err("flock", path, err));
        }
    }
    Ok(file)
}

/// Whether pmem mode is forced on an ordinary mapping (`PCACHE_FORCE_PMEM=1`
/// or the option).
fn forced_pmem(opts: &DaxOptions) -> bool {
    opts.force_pmem.unwrap_or_else(|| std::env::var("PCACHE_FORCE_PMEM").is_ok_and(|v| v.trim() == "1"))
}

/// Maps `len` bytes of `file`: device DAX shared, a writable regular file
/// with `MAP_SYNC` where the filesystem is DAX, anything else through the
/// page cache. Returns the address and how it is mapped.
fn map_file(
    file: &File,
    path: &Path,
    map_len: usize,
    device_dax: bool,
    opts: &DaxOptions,
) -> Result<(*mut libc::c_void, MapMode), PmemError> {
    let prot = if opts.read_only { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
    let fd = file.as_raw_fd();
    let force = forced_pmem(opts);
    // Device DAX is wholly backed: build its page tables up front rather
    // than fault on first touch. A forced-pmem mapping (benchmarks, tests)
    // is populated too; an ordinary emulated file is not, since it may be
    // sparse and far larger than memory.
    let populate = if device_dax || (force && !opts.read_only) { libc::MAP_POPULATE } else { 0 };
    let map = |flags: libc::c_int| {
        let flags = flags | populate;
        // SAFETY: a new mapping of `map_len` bytes of our own fd at an
        // address the kernel picks; nothing existing is replaced.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), map_len, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED { Err(io::Error::last_os_error()) } else { Ok(p) }
    };
    let (addr, mode) = if device_dax {
        (map(libc::MAP_SHARED).map_err(|e| io_err("mmap device DAX", path, e))?, MapMode::DeviceDax)
    } else if opts.read_only || !file.metadata().map(|m| m.file_type().is_file()).unwrap_or(false) {
        // MAP_SYNC is for writable mappings; a read-only one only says
        // whether the file is on DAX.
        let mode = if opts.read_only && file_is_dax(file) { MapMode::FileDax } else { MapMode::Emulated };
        (map(libc::MAP_SHARED).map_err(|e| io_err("mmap", path, e))?, mode)
    } else {
        match map(libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC) {
            Ok(p) => (p, MapMode::FileDaxSync),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)) => {
                (map(libc::MAP_SHARED).map_err(|e| io_err("mmap", path, e))?, MapMode::Emulated)
            }
            Err(e) => return Err(io_err("mmap MAP_SYNC", path, e)),
        }
    };
    let mode = if mode == MapMode::Emulated && force { MapMode::ForcedPmem } else { mode };
    if mode == MapMode::Emulated && !opts.read_only {
        // Stores go through `pwrite` (see `DaxMapping::pwrite`): nothing is
        // stored through the mapping, and a read-only one makes sure of it.
        // SAFETY: mprotect of the mapping just made, whole; no reference
        // into it exists yet.
        if unsafe { libc::mprotect(addr, map_len, libc::PROT_READ) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmaps the mapping just made, which nothing uses.
            unsafe { libc::munmap(addr, map_len) };
            return Err(io_err("mprotect", path, e));
        }
    }
    if matches!(mode, MapMode::Emulated | MapMode::ForcedPmem | MapMode::FileDax) {
        // A cache reads and writes small records and blocks all over the
        // device: without this, each first touch of a page through the page
        // cache reads ahead the pages around it (holes of a large sparse
        // image included), and a scan of every segment's info reads
        // gigabytes. Advice only: a failure changes nothing.
        // SAFETY: madvise on the mapping just made, whole; MADV_RANDOM
        // changes no contents.
        let _ = unsafe { libc::madvise(addr, map_len, libc::MADV_RANDOM) };
    }
    Ok((addr, mode))
}

/// How stores to a mapping in `mode` are made durable: the flush
/// instruction and non-temporal stores, and whether fences `msync`.
fn persistence(mode: MapMode, opts: &DaxOptions, can_flush: bool, no_flush_wanted: bool) -> (FlushConfig, bool) {
    let eadr = matches!(mode, MapMode::DeviceDax | MapMode::FileDaxSync) && platform_has_eadr();
    let mut flush = FlushConfig::detect(eadr);
    if let Some(instr) = opts.flush {
        flush.instr = instr;
    }
    if let Some(movnt) = opts.movnt {
        flush.movnt = movnt && cfg!(target_arch = "x86_64");
    }
    if mode == MapMode::Emulated {
        // The page cache is DRAM: write-back instructions achieve nothing
        // there, msync does the work.
        flush = FlushConfig { instr: FlushInstr::None, movnt: false };
    }
    let msync = mode == MapMode::Emulated
        || (mode == MapMode::FileDaxSync && !can_flush && !no_flush_wanted && !eadr && !opts.read_only);
    (flush, msync)
}

impl DaxMapping {
    /// Opens and maps the whole of `path`.
    pub fn open(path: impl AsRef<Path>, opts: &DaxOptions) -> Result<Self, PmemError> {
        let path = path.as_ref();
        let file = open_file(path, opts)?;
        let (len, device_dax) = probe(&file, path)?;
        // Without a cache-line flush instruction (non-x86 CPUs), stores
        // reach DAX media only through the kernel: msync on a DAX file
        // writes the CPU caches back, device DAX offers no such call. Unless
        // the platform flushes caches on power loss (eADR) or the user says
        // so (PCACHE_NO_FLUSH=1), device DAX cannot be made durable here.
        let cpu = crate::flush::cpu_features();
        let can_flush = cpu.clwb || cpu.clflushopt || cpu.clflush || opts.flush.is_some_and(|i| i != FlushInstr::None);
        let no_flush_wanted =
            crate::flush::env_flag("PCACHE_NO_FLUSH") == Some(true) || opts.flush == Some(FlushInstr::None);
        if device_dax && !opts.read_only && !can_flush && !no_flush_wanted && !platform_has_eadr() {
            return Err(unsupported(
                path,
                "this CPU has no cache-line flush instruction pcache can use and the platform is not eADR, \
                 so writes to device DAX cannot be made durable; use a file on a DAX filesystem instead \
                 (made durable with msync)",
            ));
        }
        if len == 0 {
            return Err(unsupported(path, "the device is empty (0 bytes)"));
        }
        let map_len = usize::try_from(len).map_err(|_| unsupported(path, "too large to map on this host"))?;
        let (addr, mode) = map_file(&file, path, map_len, device_dax, opts)?;
        let (flush, msync) = persistence(mode, opts, can_flush, no_flush_wanted);
        let ptr = NonNull::new(addr as *mut u8).ok_or_else(|| unsupported(path, "mmap returned a null mapping"))?;
        Ok(Self {
            ptr,
            len,
            mode,
            flush,
            msync,
            path: path.to_path_buf(),
            read_only: opts.read_only,
            pwrite: mode == MapMode::Emulated && !opts.read_only,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            file,
        })
    }

    /// How the device is mapped.
    pub fn mode(&self) -> MapMode {
        self.mode
    }

    /// The flush configuration in use.
    pub fn flush_config(&self) -> FlushConfig {
        self.flush
    }

    /// How a flushed line is written back, in words: the instruction, or
    /// `msync` where the kernel does it on a DAX file, or `none`.
    pub fn flush_text(&self) -> String {
        if self.msync && self.mode != MapMode::Emulated { "msync".to_string() } else { self.flush.instr.to_string() }
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, off: u64, len: u64) -> Result<*mut u8, PmemError> {
        check_range(off, len, self.len)?;
        // SAFETY: `off + len <= self.len`, so `off` is inside the mapping
        // (or one past its end when len is 0).
        Ok(unsafe { self.ptr.as_ptr().add(off as usize) })
    }

    fn check_writable(&self, off: u64, len: u64) -> Result<*mut u8, PmemError> {
        if self.read_only {
            return Err(io_err("write", &self.path, io::Error::from_raw_os_error(libc::EROFS)));
        }
        self.check(off, len)
    }

    /// Stores `data` at `off` (`p` in the mapping, range-checked and
    /// writable): a `pwrite` on emulated pmem, a copy into the mapping
    /// otherwise.
    fn store(&self, p: *mut u8, off: u64, data: &[u8]) -> Result<(), PmemError> {
        if self.pwrite {
            use std::os::unix::fs::FileExt;
            return self.file.write_all_at(data, off).map_err(|e| io_err("pwrite", &self.path, e));
        }
        // SAFETY: `p..p + data.len()` is inside the writable mapping
        // (checked by the caller) and `data` is a distinct DRAM buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    fn note_msync(&self, p: *const u8, len: usize) {
        if len == 0 {
            return;
        }
        let start = p as usize & !(page_size() - 1);
        let end = p as usize + len;
        PENDING_MSYNC.with(|pending| pending.borrow_mut().push((self.id, start, end)));
    }

    fn msync_pending(&self) -> Result<(), PmemError> {
        let mut mine: Vec<(usize, usize)> = PENDING_MSYNC.with(|pending| {
            let mut pending = pending.borrow_mut();
            let mut mine = Vec::new();
            pending.retain(|&(id, s, e)| {
                if id == self.id {
                    mine.push((s, e));
                    false
                } else {
                    true
                }
            });
            mine
        });
        mine.sort_unstable();
        let mut i = 0;
        while i < mine.len() {
            let (start, mut end) = mine[i];
            i += 1;
            while i < mine.len() && mine[i].0 <= end {
                end = end.max(mine[i].1);
                i += 1;
            }
            // SAFETY: the range was derived from an in-bounds access to this
            // live mapping, its start rounded down to a page boundary inside
            // the (page-aligned) mapping.
            let rc = unsafe { libc::msync(start as *mut libc::c_void, end - start, libc::MS_SYNC) };
            if rc != 0 {
                return Err(io_err("msync", &self.path, io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory arguments.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

impl Drop for DaxMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `open`; no reference
        // into it can outlive `self` because none is ever handed out.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len as usize) };
    }
}

impl Pmem for DaxMapping {
    fn size(&self) -> u64 {
        self.len
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        let p = self.check(off, buf.len() as u64)?;
        // SAFETY: `p..p + buf.len()` is inside the mapping (checked above)
        // and `buf` is a distinct DRAM buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<(), PmemError> {
        let p = self.check_writable(off, data.len() as u64)?;
        self.store(p, off, data)
    }

    fn flush(&self, off: u64, len: u64) -> Result<(), PmemError> {
        let p = self.check(off, len)?;
        if self.msync {
            self.note_msync(p, len as usize);
        } else {
            // SAFETY: the range is inside the live mapping (checked above).
            unsafe { self.flush.flush(p, len as usize) };
        }
        Ok(())
    }

    fn fence(&self) -> Result<(), PmemError> {
        flush::fence();
        if self.msync {
            self.msync_pending()?;
        }
        Ok(())
    }

    fn bulk_sync(&self) -> bool {
        self.msync
    }

    fn sync_all(&self) -> Result<(), PmemError> {
        flush::fence();
        if !self.msync {
            // Stores that were never flushed have no range noted: without
            // msync there is no call that makes them durable.
            return Err(io_err("sync_all", &self.path, io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
        }
        // SAFETY: the whole live mapping, page-aligned by mmap; the kernel
        // writes back only the pages that are dirty.
        let rc = unsafe { libc::msync(self.ptr.as_ptr() as *mut libc::c_void, self.len as usize, libc::MS_SYNC) };
        if rc != 0 {
            return Err(io_err("msync", &self.path, io::Error::last_os_error()));
        }
        Ok(())
    }

    fn copy_nodrain(&self, off: u64, src: &[u8]) -> Result<(), PmemError> {
        let p = self.check_writable(off, src.len() as u64)?;
        if self.msync {
            self.store(p, off, src)?;
            self.note_msync(p, src.len());
        } else {
            // SAFETY: the destination range is inside the writable mapping
            // (checked above) and `src` is a distinct DRAM buffer.
            unsafe { self.flush.copy_nodrain(p, src) };
        }
        Ok(())
    }

    fn zero_nodrain(&self, off: u64, len: u64) -> Result<(), PmemError> {
        self.check_writable(off, len)?;
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64);
            self.copy_nodrain(off + done, &ZEROS[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens `path` on another thread and waits at most 10 s for the answer,
    /// so that an open that blocks fails the test rather than hanging it.
    fn open_with_deadline(path: &Path, read_only: bool) -> Result<DaxMapping, PmemError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(DaxMapping::open(&path, &DaxOptions { read_only, ..DaxOptions::default() }));
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("DaxMapping::open still blocked after 10 s")
    }

    #[test]
    fn fifos_sockets_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "{}", io::Error::last_os_error());
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let cases = [(&fifo, "a FIFO"), (&sock, "a socket"), (&dir.path().to_path_buf(), "a directory")];
        for (path, kind) in cases {
            for read_only in [true, false] {
                match open_with_deadline(path, read_only) {
                    Err(e @ PmemError::Unsupported { .. }) => {
                        let msg = e.to_string();
                        assert!(
                            msg.contains(&format!("{kind}, not a file, block device or device DAX")),
                            "{kind} (read_only {read_only}): {msg}"
                        );
                    }
                    other => panic!("{kind} (read_only {read_only}): {other:?}"),
                }
            }
        }
        // Ordinary files still open; a missing one is still an open error.
        let file = dir.path().join("pmem.img");
        std::fs::File::create(&file).unwrap().set_len(1 << 20).unwrap();
        let map = open_with_deadline(&file, false).unwrap();
        assert_eq!(map.size(), 1 << 20);
        let missing = open_with_deadline(&dir.path().join("missing"), true).unwrap_err();
        assert!(matches!(missing, PmemError::Io { op: "open", .. }), "{missing:?}");
    }

    #[test]
    fn eadr_needs_every_region_in_the_cpu_cache_domain() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path();
        assert!(!eadr_in(&dev.join("missing")), "no nvdimm bus");
        assert!(!eadr_in(dev), "no regions");
        let region = |name: &str, domain: Option<&str>| {
            let d = dev.join(name);
            std::fs::create_dir_all(&d).unwrap();
            if let Some(domain) = domain {
                std::fs::write(d.join("persistence_domain"), format!("{domain}\n")).unwrap();
            }
        };
        region("namespace0.0", Some("memory_controller")); // not a region: ignored
        region("region0", Some("cpu_cache"));
        assert!(eadr_in(dev));
        region("region1", Some("cpu_cache"));
        assert!(eadr_in(dev));
        region("region2", Some("memory_controller"));
        assert!(!eadr_in(dev), "one ADR-only region");
        std::fs::remove_dir_all(dev.join("region2")).unwrap();
        region("region3", None);
        assert!(!eadr_in(dev), "a region that does not say");
    }
}
