//! The control socket of a running attach: live figures (`pcache status`)
//! and live tuning (`pcache set`), one JSON request and one JSON reply a
//! connection, on a Unix socket of mode 0600 beside the attach.
//!
//! ```text
//! {"cmd":"status"}                                        -> {"exports":[{...}, ...]}
//! {"cmd":"set","export":"disk","key":"gc-percent","value":"40"} -> {"ok":"gc percent 40 (persisted)"}
//! ```
//!
//! A sampler thread keeps, per export, the writeback rate over the last
//! few seconds (what the backlog drains at); everything else is read from
//! the engine when asked.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pcache_pmem::BackingDev;
use serde_json::{Value, json};
use tracing::warn;

use super::args::Listen;
use super::export::PmemCache;
use super::listen::{Conn, Listener};
use crate::units::parse_size;

/// The caches served, each under its export name.
pub type Caches = [(String, Arc<PmemCache>)];

/// How long a control client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The writeback rate is averaged over this many one-second samples.
const RATE_WINDOW: usize = 5;

/// Where the control socket of an attach of `device` is by default:
/// `/run/pcache/NAME.control` (root), else `$XDG_RUNTIME_DIR/pcache/…`,
/// else the system's temporary directory's `pcache-UID/…`. NAME is the
/// device's canonical path with `/` as `-` (`dev-dax0.0`), so that every
/// spelling of one device finds the same socket and two devices never
/// share one; a path too long for a socket address is shortened to its
/// file name and a hash of the whole.
pub fn default_path(device: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let full = canonical.to_string_lossy().trim_start_matches('/').replace('/', "-");
    let name = if full.len() <= 64 {
        full
    } else {
        // FNV-1a: stable across runs and builds, unlike the std hasher.
        let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let file = canonical.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{}-{hash:016x}", file.chars().take(40).collect::<String>())
    };
    let uid = rustix::process::getuid().as_raw();
    let dir = if uid == 0 {
        PathBuf::from("/run/pcache")
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(x).join("pcache")
    } else {
        std::env::temp_dir().join(format!("pcache-{uid}"))
    };
    dir.join(format!("{name}.control"))
}

/// The writeback rate of each export, sampled once a second.
#[derive(Debug, Default)]
struct Rates {
    /// Per export: `(when, bytes written back)` samples, newest last.
    samples: Vec<Vec<(Instant, u64)>>,
}

impl Rates {
    fn sample(&mut self, caches: &Caches) {
        self.samples.resize_with(caches.len(), Vec::new);
        let now = Instant::now();
        for (s, (_, c)) in self.samples.iter_mut().zip(caches) {
            s.push((now, c.stats().bytes_written_back));
            if s.len() > RATE_WINDOW + 1 {
                s.remove(0);
            }
        }
    }

    /// Bytes a second written back by export `i` over the window.
    fn rate(&self, i: usize) -> f64 {
        let Some(s) = self.samples.get(i) else { return 0.0 };
        match (s.first(), s.last()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => (b1 - b0) as f64 / (*t1 - *t0).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// A running control socket.
pub struct Control {
    path: PathBuf,
    listener: Arc<Listener>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Control {
    /// Listens at `path` (its directory created 0700 if missing; a stale
    /// socket replaced, one in use refused); [`Control::serve`] answers.
    pub fn bind(path: &Path) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(dir)
                .map_err(|e| {
                    format!(
                        "cannot create {} for the control socket: {e} (--control PATH puts it elsewhere)",
                        dir.display()
                    )
                })?;
        }
        let listener = Arc::new(Listener::bind(&Listen::Unix(path.to_path_buf())).map_err(|e| {
            format!("control socket: {e} (another attach of this device? --control PATH puts it elsewhere)")
        })?);
        Ok(Self { path: path.to_path_buf(), listener, stop: Arc::default(), threads: Vec::new() })
    }

    /// Answers requests about `caches` until [`Control::stop`].
    pub fn serve(&mut self, caches: Arc<Caches>) {
        let rates = Arc::new(Mutex::new(Rates::default()));
        let sampler = {
            let (stop, rates, caches) = (self.stop.clone(), rates.clone(), caches.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    rates.lock().unwrap_or_else(|e| e.into_inner()).sample(&caches);
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        };
        let server = {
            let (stop, listener) = (self.stop.clone(), self.listener.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok(conn) => answer(conn, &caches, &rates),
                        Err(e) if !stop.load(Ordering::SeqCst) => warn!(error = %e, "control socket: accept failed"),
                        Err(_) => {}
                    }
                }
            })
        };
        self.threads = vec![sampler, server];
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops answering and removes the socket.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.listener.wake();
        for t in self.threads {
            let _ = t.join();
        }
        self.listener.remove_path();
    }
}

/// Reads one request from `conn` and writes the reply.
fn answer(conn: Conn, caches: &Caches, rates: &Mutex<Rates>) {
    let mut reader = BufReader::new(conn);
    if let Some(c) = reader.get_ref().try_clone().ok().as_ref() {
        let _ = set_timeouts(c);
    }
    let mut line = String::new();
    let reply = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, caches, rates),
            Err(e) => json!({ "error": format!("not a JSON request: {e}") }),
        },
        Err(e) => json!({ "error": format!("cannot read the request: {e}") }),
    };
    let mut conn = reader.into_inner();
    let _ = writeln!(conn, "{reply}");
}

fn set_timeouts(c: &Conn) -> std::io::Result<()> {
    match c {
        Conn::Unix(s) => {
            s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            s.set_write_timeout(Some(REQUEST_TIMEOUT))
        }
        Conn::Tcp(s) => {
            s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            s.set_write_timeout(Some(REQUEST_TIMEOUT))
        }
    }
}

fn handle(req: &Value, caches: &Caches, rates: &Mutex<Rates>) -> Value {
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => {
            let rates = rates.lock().unwrap_or_else(|e| e.into_inner());
            let exports: Vec<Value> =
                caches.iter().enumerate().map(|(i, (name, c))| export_status(name, c, rates.rate(i))).collect();
            json!({ "pid": std::process::id(), "exports": exports })
        }
        Some("set") => match set(req, caches) {
            Ok(done) => json!({ "ok": done }),
            Err(e) => json!({ "error": e }),
        },
        other => json!({ "error": format!("unknown command {other:?}: status or set") }),
    }
}

/// The figures of one export.
pub fn export_status(name: &str, c: &PmemCache, writeback_rate: f64) -> Value {
    let s = c.stats();
    let h = c.health();
    json!({
        "name": name,
        "backing": c.backing().path().display().to_string(),
        "hits": s.full_hits + s.partial_hits,
        "full_hits": s.full_hits,
        "partial_hits": s.partial_hits,
        "misses": s.misses,
        "bytes_from_cache": s.bytes_from_cache,
        "bytes_from_backing": s.bytes_from_backing,
        "keys": s.keys,
        "cached_bytes": s.cached_bytes,
        "dirty_bytes": s.dirty_bytes,
        // Cached and not dirty: filled by read misses, or written back.
        "clean_bytes": s.cached_bytes.saturating_sub(s.dirty_bytes),
        "segments_used": s.segments_used,
        "segments": s.segments,
        "ksets_closed": s.ksets_closed,
        "zeroed_on_backing_bytes": s.zeroed_on_backing,
        "writeback": {
            "backlog_bytes": s.dirty_bytes,
            "bytes_written_back": s.bytes_written_back,
            "ksets_written_back": s.ksets_written_back,
            "rate_bytes_per_sec": writeback_rate.round() as u64,
            "rate_limit": c.writeback_rate(),
            "errors": s.writeback_errors,
        },
        "gc": {
            "percent": c.gc_percent(),
            "ksets_collected": s.ksets_collected,
            "segments_freed": s.segments_freed,
        },
        "health": {
            "ok": h.writeback_failing.is_none() && h.writeback_stopped.is_none() && h.gc_stopped.is_none(),
            "writeback_failing": h.writeback_failing,
            "writeback_stopped": h.writeback_stopped,
            "gc_stopped": h.gc_stopped,
        },
    })
}

/// `{"cmd":"set","export":E,"key":K,"value":V}`: what was done, or why not.
fn set(req: &Value, caches: &Caches) -> Result<String, String> {
    let field = |k: &str| req.get(k).and_then(Value::as_str).ok_or_else(|| format!("\"{k}\" is missing"));
    let (export, key, value) = (field("export")?, field("key")?, field("value")?);
    let Some((_, cache)) = caches.iter().find(|(n, _)| n == export) else {
        let names: Vec<&str> = caches.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!("no export named {export:?}; this attach serves {}", names.join(", ")));
    };
    match key {
        "gc-percent" => {
            let p: u16 =
                value.parse().map_err(|_| format!("gc-percent takes a percentage (0 to 90), not {value:?}"))?;
            cache.set_gc_percent(p).map_err(|e| e.to_string())?;
            Ok(format!("{export}: gc percent {p} (persisted in the cache's record)"))
        }
        "writeback-rate" => {
            let rate = match value {
                "none" | "unlimited" => None,
                v => Some(parse_size(v).map_err(|e| format!("writeback-rate: {e} (a rate such as 100M, or none)"))?),
            };
            cache.set_writeback_rate(rate).map_err(|e| e.to_string())?;
            Ok(match rate {
                Some(r) => format!("{export}: writeback limited to {r} bytes a second (until the next start)"),
                None => format!("{export}: writeback unlimited (until the next start)"),
            })
        }
        other => Err(format!("unknown setting {other:?}: gc-percent or writeback-rate")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_name_the_device_whatever_its_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("pmem.img");
        std::fs::write(&dev, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&dev, &link).unwrap();
        let a = default_path(&dev);
        assert_eq!(a, default_path(&link));
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(a, default_path(&dir.path().join("sub/../pmem.img")));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.ends_with("-pmem.img.control") && !name.contains('/'), "{name}");
        // Another device of the same file name elsewhere: another socket.
        let other = tempfile::tempdir().unwrap();
        let dev2 = other.path().join("pmem.img");
        std::fs::write(&dev2, b"x").unwrap();
        assert_ne!(a, default_path(&dev2));
        // A long path still fits a socket address.
        let deep = dir.path().join("a".repeat(100)).join("pmem.img");
        assert!(default_path(&deep).as_os_str().len() < 108, "{}", default_path(&deep).display());
    }
}
