//! `pcache attach`: run the cache of one or more backing devices and serve
//! each as an NBD export until SIGINT or SIGTERM.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcache_cli::nbd::{self, BlockDevice, DevError, Export, NbdError};
use pcache_format::SEG_SIZE;
use pcache_pmem::{
    BackingDev, BackingId, Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, EngineError, FileBacking,
    default_cache_segs,
};
use tracing::{info, warn};

use crate::units::human;

type PmemCache = Cache<DaxMapping, FileBacking>;

/// What to do, from the command line.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The pmem device (formatted with `pcache format`).
    pub device: PathBuf,
    /// A backing device or file to cache and serve; repeat for several.
    #[arg(long = "backing", value_name = "BACKING", required = true)]
    pub backings: Vec<PathBuf>,
    /// Export name for each --backing, in order (default: the file name).
    #[arg(long = "export", value_name = "EXPORT")]
    pub exports: Vec<String>,
    /// Size of each new cache (default: sized for its backing device —
    /// the backing rounded up to 16 MiB segments plus an eighth for its
    /// log — within the free segments). An existing cache keeps its size.
    #[arg(long, value_parser = crate::units::parse_size)]
    pub cache_size: Option<u64>,
    /// Ksets and data heads per cache (default: the CPUs, at most one
    /// per 10 segments).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=128))]
    pub queues: Option<u32>,
    /// Keep a CRC of all cached data and verify it on every read hit
    /// (new caches; an existing cache keeps its setting).
    #[arg(long)]
    pub data_crc: bool,
    /// Start GC when this percentage of a cache's segments is in use.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=90))]
    pub gc_percent: Option<u16>,
    /// Where to listen: unix:PATH (mode 0600) or tcp:HOST:PORT.
    #[arg(long, default_value = "tcp:127.0.0.1:10809", value_parser = parse_listen)]
    pub listen: Listen,
    /// Print a status line every SECS seconds (SIGUSR1 prints one any time).
    #[arg(long, value_name = "SECS")]
    pub status_interval: Option<u64>,
    /// Limit writeback to this many bytes a second (e.g. 100M), to
    /// spare the backing device; default unlimited (0 is refused: it
    /// would stop writeback for good).
    #[arg(long, value_parser = parse_rate)]
    pub writeback_rate: Option<u64>,
    /// Do not cache what read misses fetch from the backing device: the
    /// cache then holds only written data (for read-mostly backings
    /// that are fast enough on their own).
    #[arg(long)]
    pub no_read_cache: bool,
    /// Close an open kset at most this many milliseconds after its first key.
    #[arg(long, value_name = "MS", hide = true)]
    pub kset_flush_ms: Option<u64>,
}

/// Parses a writeback rate: a size a second, not 0.
fn parse_rate(s: &str) -> Result<u64, String> {
    match crate::units::parse_size(s)? {
        0 => Err("0 would never write anything back; leave --writeback-rate out for no limit".into()),
        n => Ok(n),
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket, created with mode 0600.
    Unix(PathBuf),
    /// TCP.
    Tcp(String, u16),
}

/// Parses `unix:PATH` or `tcp:HOST:PORT`.
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a socket path, e.g. unix:/run/pcache.sock".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(rest) = s.strip_prefix("tcp:") {
        let (host, port) = rest.rsplit_once(':').ok_or("tcp: needs HOST:PORT, e.g. tcp:127.0.0.1:10809")?;
        let port: u16 = port.parse().map_err(|_| format!("'{port}' is not a TCP port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("tcp: needs a host, e.g. tcp:127.0.0.1:10809".into());
        }
        return Ok(Listen::Tcp(host.to_string(), port));
    }
    Err(format!("'{s}' is not unix:PATH or tcp:HOST:PORT"))
}

/// The cache as an NBD device.
struct CacheExport(Arc<PmemCache>);

fn dev_err(e: EngineError) -> DevError {
    let errno = match e {
        EngineError::OutOfRange { .. } | EngineError::InvalidOption(_) => nbd::EINVAL,
        EngineError::CacheFull | EngineError::Stalled(_) => nbd::ENOSPC,
        EngineError::Stopped => nbd::ESHUTDOWN,
        _ => nbd::EIO,
    };
    warn!(error = %e, "request failed");
    DevError { errno, message: e.to_string() }
}

impl BlockDevice for CacheExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.0.read(off, buf).map_err(dev_err)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
        self.0.write(off, data, fua).map_err(dev_err)
    }

    fn flush(&self) -> Result<(), DevError> {
        self.0.flush().map_err(dev_err)
    }

    fn trim(&self, off: u64, len: u64) -> Result<(), DevError> {
        self.0.discard(off, len).map_err(dev_err)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.0.write_zeroes(off, len, fua).map_err(dev_err)
    }

    fn read_may_block(&self, off: u64, len: u64) -> bool {
        !self.0.is_cached(off, len)
    }
}

/// A client connection, of either kind.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// Limits how long a read may block (`None`: forever).
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Limits how long a write may block (`None`: forever).
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
        }
    }

    fn shutdown_read(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Read),
            Conn::Tcp(s) => s.shutdown(Shutdown::Read),
        };
    }
}

impl io::Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// Binds a Unix socket at `path` that is never reachable with looser
/// permissions than 0600: it is bound inside a fresh directory of mode 0700
/// beside `path`, made 0600 there, and only then renamed into place (a
/// chmod after binding in place would leave a window in which the socket
/// has the umask's permissions).
fn bind_private(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::DirBuilderExt;
    let shown = path.display();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A short name: the socket's path inside it must fit the 108 bytes of a
    // socket address too.
    let mut attempt = 0u32;
    let dir = loop {
        let dir = parent.join(format!(".pcache.{}.{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(format!("cannot create a directory beside {shown}: {e}")),
        }
    };
    let tmp = dir.join("s");
    let bound = (|| {
        // The umask may have taken bits from 0700, never added any.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
        let listener = UnixListener::bind(&tmp).map_err(|e| format!("cannot listen on {shown}: {e}"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod {shown}: {e}"))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot move the socket to {shown}: {e}"))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    bound
}

/// A connection during the handshake: every read and write must be done
/// by one deadline (`None`: no deadline), so that a client that stalls, or
/// trickles bytes, cannot hold its thread for ever.
struct Deadline<'a> {
    conn: &'a mut Conn,
    deadline: Option<Instant>,
}

impl Deadline<'_> {
    /// The time left, or a `TimedOut` error once it is up.
    fn left(&self) -> io::Result<Option<Duration>> {
        let Some(d) = self.deadline else { return Ok(None) };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed"));
        }
        Ok(Some(left))
    }
}

impl io::Read for Deadline<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.conn.set_read_timeout(left)?;
        self.conn.read(b)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.conn.set_write_timeout(left)?;
        self.conn.write(b)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn bind(l: &Listen) -> Result<Self, String> {
        match l {
            Listen::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(format!("{} exists and is not a socket", path.display()));
                    }
                    if UnixStream::connect(path).is_ok() {
                        return Err(format!("{} is in use by another server", path.display()));
                    }
                    std::fs::remove_file(path).map_err(|e| format!("cannot remove stale {}: {e}", path.display()))?;
                }
                let listener = bind_private(path)?;
                Ok(Listener::Unix(listener, path.clone()))
            }
            Listen::Tcp(host, port) => {
                let listener = TcpListener::bind((host.as_str(), *port))
                    .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
                Ok(Listener::Tcp(listener))
            }
        }
    }

    fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => Ok(Conn::Unix(l.accept()?.0)),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
        }
    }

    /// Makes a blocked `accept` return.
    fn wake(&self) {
        let fd = match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        // SAFETY: shutdown on a socket this process owns; no memory passed.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Percent-encodes an export name for an NBD URI; `keep` are further bytes
/// left as they are.
fn uri_escape(s: &[u8], keep: &[u8]) -> String {
    s.iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b if keep.contains(&b) => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Quotes `s` for a POSIX shell, only when it needs it: single quotes,
/// with each `'` written as `'\''`.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Command lines, ready to paste into a shell, that connect to export `name`.
fn how_to_connect(l: &Listen, name: &str) -> Vec<String> {
    let n = uri_escape(name.as_bytes(), &[]);
    let q = shell_quote(name);
    match l {
        Listen::Unix(path) => {
            let p = path.as_os_str().as_encoded_bytes();
            let uri = shell_quote(&format!("nbd+unix:///{n}?socket={}", uri_escape(p, b"/")));
            vec![
                format!("nbdinfo {uri}"),
                format!("qemu-io -f raw {uri}"),
                format!("nbd-client -unix {} /dev/nbd0 -N {q}", shell_quote(&path.to_string_lossy())),
            ]
        }
        Listen::Tcp(host, port) => {
            let h = if host.contains(':') { format!("[{host}]") } else { host.clone() };
            let uri = shell_quote(&format!("nbd://{h}:{port}/{n}"));
            vec![
                format!("nbdinfo {uri}"),
                format!("qemu-io -f raw {uri}"),
                format!("nbd-client {} {port} /dev/nbd0 -N {q}", shell_quote(host)),
            ]
        }
    }
}

fn status_line(exports: &[(String, Arc<PmemCache>)]) -> String {
    exports
        .iter()
        .map(|(name, c)| {
            let s = c.stats();
            let h = c.health();
            let trouble = h
                .writeback_stopped
                .or(h.gc_stopped)
                .or(h.writeback_failing)
                .map(|e| format!(", ERROR: {e}"))
                .unwrap_or_default();
            format!(
                "{name}: hits {} partial {} misses {}, dirty {}, segments {}/{}, written back {}{trouble}",
                s.full_hits,
                s.partial_hits,
                s.misses,
                human(s.dirty_bytes),
                s.segments_used,
                s.segments,
                human(s.bytes_written_back)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Blocks the signals the server handles, in this thread and every thread
/// it starts, so that only the signal thread receives them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set is a valid local; the signal numbers are constants;
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: both pointers are valid locals; the set was initialised.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn stop_all(exports: &[(String, Arc<PmemCache>)]) {
    for (_, c) in exports {
        let _ = c.stop();
    }
}

/// Refuses a pmem file with holes: a store into a hole allocates a block
/// in the middle of a request, and a full filesystem answers with SIGBUS.
fn check_allocated(device: &Path) -> Result<(), String> {
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
pub(crate) fn check_backings(device: &Path, backings: &[PathBuf]) -> Result<(), String> {
    let pmem_meta = std::fs::metadata(device).ok();
    let pmem_id = pmem_meta.as_ref().and_then(BackingId::of_meta);
    let mut seen: Vec<(BackingId, &Path)> = Vec::new();
    for b in backings {
        let Ok(meta) = std::fs::metadata(b) else { continue };
        let Some(id) = BackingId::of_meta(&meta) else { continue };
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

fn cpus() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

pub fn run(a: AttachArgs) -> u8 {
    let fail = |msg: String| {
        eprintln!("pcache attach: {msg}");
        1
    };
    let signals = block_signals();
    let map = match DaxMapping::open(&a.device, &DaxOptions::default()) {
        Ok(m) => m,
        Err(e) => return fail(e.to_string()),
    };
    if let Err(msg) = check_allocated(&a.device) {
        return fail(msg);
    }
    let mode = map.mode();
    let flush = map.flush_text();
    let dev = match CacheDev::open(map) {
        Ok(d) => d,
        Err(e) => return fail(format!("{}: {e}", a.device.display())),
    };
    for (id, why) in dev.damaged() {
        warn!(entry = id, error = %why, "backing entry damaged; its id is not reused (see `pcache check`, `pcache repair`)");
    }
    for (o, _) in dev.orphans().iter().filter(|(_, r)| *r) {
        warn!(
            first_segment = o.head,
            segments = o.segs.len(),
            dirty_keys = o.log.dirty_keys,
            "a cache owned by no backing entry is kept aside, never reused (see `pcache check`, `pcache repair`)"
        );
    }
    let mut files = Vec::new();
    if let Err(msg) = check_backings(&a.device, &a.backings) {
        return fail(msg);
    }
    for path in &a.backings {
        match FileBacking::open(path) {
            Ok(f) => files.push(f),
            Err(e) => return fail(e.to_string()),
        }
    }
    let mut names = a.exports.clone();
    for f in files.iter().skip(names.len()) {
        names.push(f.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "disk".into()));
    }
    if names.len() > files.len() {
        return fail(format!("{} --export names for {} --backing devices", names.len(), files.len()));
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return fail(format!("two exports named {n:?}: give each --backing its own --export"));
        }
    }
    // Listen before any cache is created: a typo in --listen or a busy
    // port must not leave new caches behind holding segments.
    let listener = match Listener::bind(&a.listen) {
        Ok(l) => Arc::new(l),
        Err(e) => return fail(e),
    };
    let cleanup_socket = |listener: &Listener| {
        if let Listener::Unix(_, path) = listener {
            let _ = std::fs::remove_file(path);
        }
    };
    println!("pcache attach {}: {mode} (flush: {flush})", a.device.display());
    let mut exports: Vec<(String, Arc<PmemCache>)> = Vec::new();
    for (file, name) in files.into_iter().zip(names) {
        let path = file.path().to_path_buf();
        let size = file.size();
        let stored = match dev.find_entry(&path, file.identity()) {
            Ok(Ok((_, info))) => Some(info.cache_info.n_segs.get()),
            Ok(Err(_)) => None,
            Err(e) => {
                stop_all(&exports);
                cleanup_socket(&listener);
                return fail(format!("{}: {e}", path.display()));
            }
        };
        let n_segs = match (stored, a.cache_size) {
            (Some(n), _) => u64::from(n),
            (None, Some(bytes)) => bytes.div_ceil(SEG_SIZE),
            // Sized for the backing device, within what is free.
            (None, None) => u64::from(default_cache_segs(size, 1, dev.free_segments())),
        };
        let queues = a.queues.unwrap_or_else(|| cpus().min((n_segs / 10).max(1) as u32).clamp(1, 128));
        let opts = CacheOptions {
            // An existing cache keeps its size; the engine notes a different ask.
            cache_size: if stored.is_some() { a.cache_size } else { Some(n_segs * SEG_SIZE) },
            queues,
            data_crc: a.data_crc,
            gc_percent: a.gc_percent,
            kset_flush_delay: a.kset_flush_ms.map(Duration::from_millis).unwrap_or(pcache_format::KSET_FLUSH_DELAY),
            writeback_rate: a.writeback_rate,
            cache_reads: !a.no_read_cache,
            ..CacheOptions::default()
        };
        let (cache, rep) = match Cache::start(dev.clone(), file, &opts) {
            Ok(c) => c,
            Err(e) => {
                stop_all(&exports);
                cleanup_socket(&listener);
                return fail(format!("{}: {e}", path.display()));
            }
        };
        println!(
            "export {name:?}: {} ({}), {} cache of {} segments ({}), {} queue(s), gc {} %, data crc {}, {} keys replayed",
            path.display(),
            human(size),
            if rep.new { "new" } else { "existing" },
            rep.n_segs,
            human(u64::from(rep.n_segs) * SEG_SIZE),
            rep.queues,
            rep.gc_percent,
            if rep.data_crc { "on" } else { "off" },
            rep.replay.keys
        );
        for note in &rep.notes {
            println!("  note: {note}");
        }
        exports.push((name, cache));
    }
    let nbd_exports: Arc<Vec<Export>> = Arc::new(
        exports
            .iter()
            .map(|(name, c)| Export {
                name: name.clone(),
                description: format!("pcache of {}", c.backing().path().display()),
                device: Arc::new(CacheExport(c.clone())),
            })
            .collect(),
    );
    let shown = match &a.listen {
        Listen::Unix(p) => format!("unix:{}", p.display()),
        Listen::Tcp(h, p) => format!("tcp:{h}:{p}"),
    };
    println!("listening on {shown}; connect with:");
    for (name, _) in &exports {
        for line in how_to_connect(&a.listen, name) {
            println!("  {line}");
        }
    }
    println!("SIGINT or SIGTERM stops it (the cache stays warm); SIGUSR1 prints a status line");
    let _ = io::stdout().flush();

    let stop = Arc::new(AtomicBool::new(false));
    let conns: Arc<Mutex<HashMap<u64, Conn>>> = Arc::new(Mutex::new(HashMap::new()));
    let exports = Arc::new(exports);
    // Signals.
    let sig_thread = {
        let (stop, listener, conns, exports) = (stop.clone(), listener.clone(), conns.clone(), exports.clone());
        std::thread::spawn(move || {
            loop {
                match wait_signal(&signals) {
                    libc::SIGUSR1 => println!("status: {}", status_line(&exports)),
                    sig => {
                        info!(signal = sig, "stopping");
                        stop.store(true, Ordering::SeqCst);
                        listener.wake();
                        for c in conns.lock().unwrap_or_else(|e| e.into_inner()).values() {
                            c.shutdown_read();
                        }
                        return;
                    }
                }
                let _ = io::stdout().flush();
            }
        })
    };
    if let Some(secs) = a.status_interval.filter(|s| *s > 0) {
        let (stop, exports) = (stop.clone(), exports.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(secs));
                println!("status: {}", status_line(&exports));
                let _ = io::stdout().flush();
            }
        });
    }
    // Accept until stopped.
    let next_id = AtomicU64::new(0);
    let workers = std::env::var("PCACHE_NBD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| (cpus() as usize * 2).clamp(2, 16));
    let handshake_timeout = handshake_timeout();
    let mut threads = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                if !stop.load(Ordering::SeqCst) {
                    warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = conn.try_clone() {
            conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id, c);
        }
        if stop.load(Ordering::SeqCst) {
            conn.shutdown_read();
        }
        let (exports, conns) = (nbd_exports.clone(), conns.clone());
        threads.push(std::thread::spawn(move || {
            serve(id, conn, &exports, workers, handshake_timeout);
            conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        }));
        threads.retain(|t| !t.is_finished());
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = sig_thread.join();
    let mut code = 0;
    for (name, c) in exports.iter() {
        let stuck = c.stuck();
        match c.stop() {
            Ok(()) => println!(
                "stopped {name:?}: every kset closed, the cache stays warm ({} dirty)",
                human(c.stats().dirty_bytes)
            ),
            Err(e) => {
                eprintln!("pcache attach: stopping {name:?}: {e}");
                code = 1;
            }
        }
        // Dirty data that writeback cannot write is not a clean stop: say
        // so, and what to run, with a status scripts and systemd notice.
        if let Some(why) = stuck {
            let device = shell_quote(&a.device.display().to_string());
            let backing = shell_quote(&c.backing().path().display().to_string());
            eprintln!(
                "pcache attach: {name:?}: {why}\n  the data stays in the cache; `pcache detach {device} --backing \
                 {backing}` names what is wrong, `--salvage` writes back everything else and lists the rest"
            );
            code = 1;
        }
    }
    if let Listener::Unix(_, path) = &*listener {
        let _ = std::fs::remove_file(path);
    }
    code
}

/// How long a client may take over the handshake:
/// `PCACHE_NBD_HANDSHAKE_TIMEOUT_SECS` (0: no limit), default 30 s.
fn handshake_timeout() -> Option<Duration> {
    let secs = match std::env::var("PCACHE_NBD_HANDSHAKE_TIMEOUT_SECS") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            warn!(value = %v, "PCACHE_NBD_HANDSHAKE_TIMEOUT_SECS is not a number of seconds; using 30");
            30
        }),
        Err(_) => 30,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn serve(id: u64, conn: Conn, exports: &[Export], workers: usize, handshake_timeout: Option<Duration>) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = conn;
    // A client that connects and stalls must not hold this thread for ever:
    // the whole handshake has a deadline. It is lifted before transmission,
    // where an idle client is normal.
    let deadline = handshake_timeout.map(|t| Instant::now() + t);
    let negotiated =
        nbd::negotiate(&mut Deadline { conn: &mut r, deadline }, &mut Deadline { conn: &mut w, deadline }, exports);
    let session = match negotiated {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(NbdError::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            let secs = handshake_timeout.map_or(0, |t| t.as_secs());
            warn!(conn = id, timeout_secs = secs, "handshake timed out; connection closed");
            return;
        }
        Err(e) => {
            info!(conn = id, error = %e, "handshake ended");
            return;
        }
    };
    if let Err(e) = r.set_read_timeout(None).and_then(|()| r.set_write_timeout(None)) {
        warn!(conn = id, error = %e, "cannot lift the handshake timeout");
        return;
    }
    let e = &exports[session.export];
    info!(conn = id, export = %e.name, structured = session.structured, "client connected");
    match nbd::transmit(r, w, e.device.clone(), session.structured, workers) {
        Ok(s) => info!(conn = id, requests = s.requests, "client disconnected"),
        Err(err) => warn!(conn = id, error = %err, "connection ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("unix:/tmp/s"), Ok(Listen::Unix("/tmp/s".into())));
        assert_eq!(parse_listen("tcp:127.0.0.1:10809"), Ok(Listen::Tcp("127.0.0.1".into(), 10809)));
        assert_eq!(parse_listen("tcp:[::1]:99"), Ok(Listen::Tcp("::1".into(), 99)));
        assert!(parse_listen("tcp:host").is_err());
        assert!(parse_listen("tcp::80").is_err());
        assert!(parse_listen("tcp:h:99999").is_err());
        assert!(parse_listen("unix:").is_err());
        assert!(parse_listen("/tmp/s").is_err());
    }

    #[test]
    fn connect_lines() {
        let l = how_to_connect(&Listen::Tcp("127.0.0.1".into(), 10809), "disk.img");
        assert_eq!(l[0], "nbdinfo nbd://127.0.0.1:10809/disk.img");
        assert_eq!(l[1], "qemu-io -f raw nbd://127.0.0.1:10809/disk.img");
        assert_eq!(l[2], "nbd-client 127.0.0.1 10809 /dev/nbd0 -N disk.img");
        let l = how_to_connect(&Listen::Tcp("::1".into(), 10809), "my disk");
        assert_eq!(l[0], "nbdinfo 'nbd://[::1]:10809/my%20disk'");
        assert_eq!(l[2], "nbd-client ::1 10809 /dev/nbd0 -N 'my disk'");
        let l = how_to_connect(&Listen::Unix("/run/p.sock".into()), "a b");
        assert_eq!(l[0], "nbdinfo 'nbd+unix:///a%20b?socket=/run/p.sock'");
        assert_eq!(l[2], "nbd-client -unix /run/p.sock /dev/nbd0 -N 'a b'");
        let l = how_to_connect(&Listen::Unix("/tmp/it's here/p&q%.sock".into()), "x'y");
        assert_eq!(l[0], "nbdinfo 'nbd+unix:///x%27y?socket=/tmp/it%27s%20here/p%26q%25.sock'");
        assert_eq!(l[2], r"nbd-client -unix '/tmp/it'\''s here/p&q%.sock' /dev/nbd0 -N 'x'\''y'");
        let l = how_to_connect(&Listen::Tcp("localhost".into(), 1), "");
        assert_eq!(l[0], "nbdinfo nbd://localhost:1/");
        assert_eq!(l[2], "nbd-client localhost 1 /dev/nbd0 -N ''");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("plain/path-1.img"), "plain/path-1.img");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME*?;`x`"), "'$HOME*?;`x`'");
    }
}
