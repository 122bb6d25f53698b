//! What `attach` does, in order: open the pmem device and the backings,
//! refuse what must be refused, listen, start each cache, serve until a
//! signal, then stop every cache and say what it left.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use pcache_cli::nbd::{Export, Progress};
use pcache_cli::remote::AnyBacking;
use pcache_format::SEG_SIZE;
use pcache_pmem::{BackingDev, Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, default_cache_segs};
use tracing::{info, warn};

use super::args::{AttachArgs, Listen};
use super::checks::{check_allocated, check_backings};
use super::control::{self, Control};
use super::export::{CacheExport, PmemCache};
use super::hints::{how_to_connect, shell_quote, status_line};
use super::listen::{Listener, ServeOptions, serve};
use super::metrics::Metrics;
use super::signals::{self, Caught, Handling};
use super::stop::{Connections, Cut};
use crate::units::human;

/// The caches served, each under its export name.
type Caches = [(String, Arc<PmemCache>)];

/// The most ksets and data heads a cache takes (`--queues`' limit).
const MAX_QUEUES: u32 = 128;
/// A cache gets at most one queue per this many segments by default.
const SEGMENTS_PER_QUEUE: u64 = 10;
/// How long a client may take over the handshake by default.
const HANDSHAKE_TIMEOUT_SECS: u64 = 30;
/// Exit status of a stop that had to cut connections off: every cache
/// stopped cleanly, but clients saw requests fail.
const EXIT_CUT_SHORT: u8 = 3;

pub fn run(a: AttachArgs) -> u8 {
    match attach(&a) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("pcache attach: {msg}");
            1
        }
    }
}

/// Runs the whole command: `Err` is a refusal or a failure before serving.
fn attach(a: &AttachArgs) -> Result<u8, String> {
    let tls = a.tls_config()?;
    super::args::check_exposure(&a.listen, a.insecure || tls.is_some())?;
    let signals = Caught::catch()?;
    let pmem = PmemDevice::open(&a.device)?;
    if pmem.dev.layout().dialect() == pcache_format::Dialect::DmPcache && a.backings.len() > 1 {
        return Err(format!(
            "{} is a Linux dm-pcache device, which holds one cache for one backing device: give one --backing",
            a.device.display()
        ));
    }
    check_backings(&a.device, &a.backings)?;
    let timeout = Duration::from_secs(a.backing_timeout);
    let files: Vec<AnyBacking> =
        a.backings.iter().map(|path| AnyBacking::open(path, timeout)).collect::<Result<_, _>>()?;
    let names = export_names(&a.exports, &files)?;
    // Listen before any cache is created: a typo in --listen or a busy
    // port must not leave new caches behind holding segments.
    let listener = Arc::new(Listener::bind(&a.listen)?);
    let control_path = a.control.clone().unwrap_or_else(|| control::default_path(&a.device));
    let mut control = Control::bind(&control_path).inspect_err(|_| listener.remove_path())?;
    let metrics_server = match &a.metrics {
        None => None,
        Some(Listen::Tcp(host, port)) => match Metrics::bind(host, *port) {
            Ok(m) => Some(m),
            Err(e) => {
                listener.remove_path();
                control.stop();
                return Err(e);
            }
        },
        Some(Listen::Unix(_)) => {
            listener.remove_path();
            control.stop();
            return Err("--metrics takes tcp:HOST:PORT (Prometheus scrapes over HTTP)".into());
        }
    };
    println!("pcache attach {}: {}", a.device.display(), pmem.mapping);
    let caches = match start_caches(a, &pmem.dev, files, names) {
        Ok(c) => c,
        Err(e) => {
            listener.remove_path();
            control.stop();
            return Err(e);
        }
    };
    announce(&a.listen, &caches);
    super::notify::ready(&a.listen, caches.iter().map(|(name, _)| name.as_str()));
    let caches: Arc<Caches> = caches.into();
    control.serve(caches.clone());
    println!("control socket {} (`pcache status --control {}`)", control.path().display(), control.path().display());
    let metrics = metrics_server.map(|m| Metrics::serve(m, caches.clone()));
    if let Some(m) = &metrics {
        println!("metrics at http://{}/metrics", m.addr());
    }
    let served = serve_until_stopped(a, &listener, &caches, signals, tls);
    // After a cut, requests may still wait in a cache (for space that never
    // comes): stopping it fails them, and their connections end.
    let code = stop_caches(&a.device, &caches);
    let cut = served.finish();
    control.stop();
    if let Some(m) = metrics {
        m.stop();
    }
    listener.remove_path();
    Ok(if code == 0 && cut { EXIT_CUT_SHORT } else { code })
}

/// The pmem device, open, and how it is mapped in words.
struct PmemDevice {
    dev: Arc<CacheDev<DaxMapping>>,
    /// The mapping mode and flush instruction.
    mapping: String,
}

impl PmemDevice {
    /// Maps and opens the device, refusing a sparse file; warns of
    /// damaged backing entries and of caches no entry owns.
    fn open(device: &Path) -> Result<Self, String> {
        let map = DaxMapping::open(device, &DaxOptions::default()).map_err(|e| e.to_string())?;
        check_allocated(device)?;
        let mut mapping = format!("{} (flush: {})", map.mode(), map.flush_text());
        let dev = CacheDev::open(map).map_err(|e| format!("{}: {e}", device.display()))?;
        if dev.layout().dialect() == pcache_format::Dialect::DmPcache {
            mapping.push_str(", a Linux dm-pcache cache (the module must not run it at the same time)");
        }
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
        Ok(Self { dev, mapping })
    }
}

/// The export name of each backing: the one given with --export, in
/// order, else its file name. Two exports may not share a name.
fn export_names(given: &[String], files: &[AnyBacking]) -> Result<Vec<String>, String> {
    if given.len() > files.len() {
        return Err(format!("{} --export names for {} --backing devices", given.len(), files.len()));
    }
    let mut names = given.to_vec();
    for f in &files[given.len()..] {
        names.push(match f {
            AnyBacking::Nbd(n) if !n.export().is_empty() => n.export().to_string(),
            AnyBacking::Nbd(_) => "disk".into(),
            AnyBacking::File(f) => {
                f.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "disk".into())
            }
        });
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(format!("two exports named {n:?}: give each --backing its own --export"));
        }
    }
    Ok(names)
}

/// Starts the cache of each backing, in order; on a failure, stops those
/// already started.
fn start_caches(
    a: &AttachArgs,
    dev: &Arc<CacheDev<DaxMapping>>,
    files: Vec<AnyBacking>,
    names: Vec<String>,
) -> Result<Vec<(String, Arc<PmemCache>)>, String> {
    let mut caches = Vec::new();
    for (file, name) in files.into_iter().zip(names) {
        match start_cache(a, dev, file, &name) {
            Ok(cache) => caches.push((name, cache)),
            Err(msg) => {
                for (_, c) in &caches {
                    let _ = c.stop();
                }
                return Err(msg);
            }
        }
    }
    Ok(caches)
}

/// Starts (creating it if need be) the cache of `file`, and says what it is.
fn start_cache(
    a: &AttachArgs,
    dev: &Arc<CacheDev<DaxMapping>>,
    file: AnyBacking,
    name: &str,
) -> Result<Arc<PmemCache>, String> {
    let path = file.path().to_path_buf();
    let failed = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let size = file.size();
    let stored = match dev.find_entry(&path, file.identity()) {
        Ok(Ok((_, info))) if file.is_remote() && info.dev_size.get() != size / 512 => {
            return Err(format!(
                "{}: the export is {size} bytes, but its cache was made for {} bytes: this is not the export the \
                 cache belongs to (check the URI, and the server's export), or it was resized; `pcache inspect \
                 {}` shows the cache",
                path.display(),
                info.dev_size.get() * 512,
                a.device.display()
            ));
        }
        Ok(Ok((_, info))) => Some(info.cache_info.n_segs.get()),
        Ok(Err(_)) => None,
        Err(e) => return Err(failed(&e)),
    };
    let n_segs = match (stored, a.cache_size) {
        (Some(n), _) => u64::from(n),
        (None, Some(bytes)) => bytes.div_ceil(SEG_SIZE),
        // Sized for the backing device, within what is free.
        (None, None) => u64::from(default_cache_segs(size, 1, dev.free_segments())),
    };
    let by_size = u32::try_from((n_segs / SEGMENTS_PER_QUEUE).max(1)).unwrap_or(MAX_QUEUES);
    let opts = CacheOptions {
        // An existing cache keeps its size; the engine notes a different ask.
        cache_size: if stored.is_some() { a.cache_size } else { Some(n_segs * SEG_SIZE) },
        queues: a.queues.unwrap_or_else(|| cpus().min(by_size).clamp(1, MAX_QUEUES)),
        data_crc: a.data_crc,
        gc_percent: a.gc_percent,
        kset_flush_delay: a.kset_flush_ms.map(Duration::from_millis).unwrap_or(pcache_format::KSET_FLUSH_DELAY),
        writeback_rate: a.writeback_rate,
        cache_reads: !a.no_read_cache,
        ..CacheOptions::default()
    };
    let (cache, rep) = Cache::start(dev.clone(), file, &opts).map_err(|e| failed(&e))?;
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
    Ok(cache)
}

/// Says where the server listens and how to connect to each export.
fn announce(listen: &Listen, caches: &Caches) {
    println!("listening on {listen}; connect with:");
    for (name, _) in caches {
        for line in how_to_connect(listen, name) {
            println!("  {line}");
        }
    }
    println!("SIGINT or SIGTERM stops it (the cache stays warm); SIGUSR1 prints a status line");
    let _ = io::stdout().flush();
}

/// The description of an export any client may read: its name, and the
/// backing's path only if the operator asked for it (`--describe-paths`).
fn describe(name: &str, cache: &PmemCache, paths: bool) -> String {
    if paths { format!("pcache of {}", cache.backing().path().display()) } else { format!("pcache export {name}") }
}

/// Prints a status line now.
fn print_status(caches: &Caches) {
    println!("status: {}", status_line(caches));
    let _ = io::stdout().flush();
}

/// Serves every connection until SIGINT or SIGTERM, then lets each finish
/// what it has in flight, for up to `--stop-timeout` or until a second
/// signal; then cuts those still open.
fn serve_until_stopped(
    a: &AttachArgs,
    listener: &Arc<Listener>,
    caches: &Arc<Caches>,
    signals: Caught,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Served {
    let exports: Arc<Vec<Export>> = Arc::new(
        caches
            .iter()
            .map(|(name, c)| Export {
                name: name.clone(),
                description: describe(name, c, a.describe_paths),
                device: Arc::new(CacheExport::new(c.clone())),
            })
            .collect(),
    );
    let conns = Arc::new(Connections::default());
    let timeout = Duration::from_secs(a.stop_timeout);
    let signals = {
        let (listener, conns, caches) = (listener.clone(), conns.clone(), caches.clone());
        signals.handle(
            move || print_status(&caches),
            move |signal| {
                let name = signals::name(signal);
                if conns.stop(name) {
                    info!(signal = name, "stopping");
                    super::notify::stopping();
                    listener.wake();
                    println!(
                        "stopping ({name}): finishing the requests in flight, for up to {} s; a second SIGINT \
                         or SIGTERM stops at once",
                        timeout.as_secs()
                    );
                    let _ = io::stdout().flush();
                }
            },
        )
    };
    if let Some(secs) = a.status_interval.filter(|s| *s > 0) {
        let (conns, caches) = (conns.clone(), caches.clone());
        std::thread::spawn(move || {
            while !conns.stopping() {
                std::thread::sleep(Duration::from_secs(secs));
                print_status(&caches);
            }
        });
    }
    let threads = accept_until_stopped(listener, &exports, &conns, tls);
    let cut = conns.wait(timeout);
    if let Some(cut) = &cut {
        println!("stopping now ({}): shutting down {} connection(s) still open", cut.why, cut.connections());
        let _ = io::stdout().flush();
    }
    Served { threads, cut, signals }
}

/// What is left to do once the server stopped serving.
struct Served {
    /// The threads of the connections, ended or ending.
    threads: Vec<JoinHandle<()>>,
    /// What the stop cut short, if anything.
    cut: Option<Cut>,
    signals: Handling,
}

impl Served {
    /// Waits for the connections' threads, stops handling signals, and
    /// says what the stop cut short; true if it cut anything.
    fn finish(self) -> bool {
        for t in self.threads {
            let _ = t.join();
        }
        self.signals.close();
        let Some(cut) = self.cut else { return false };
        println!(
            "stop cut short ({}): {} connection(s) shut down, {} request(s) left unanswered (their clients see \
             them fail)",
            cut.why,
            cut.connections(),
            cut.unanswered()
        );
        true
    }
}

/// Accepts connections, each served on a thread of its own, until a stop
/// signal; returns the threads.
fn accept_until_stopped(
    listener: &Listener,
    exports: &Arc<Vec<Export>>,
    conns: &Arc<Connections>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Vec<JoinHandle<()>> {
    let opts = Arc::new(ServeOptions { workers: nbd_workers(), handshake_timeout: handshake_timeout(), tls });
    let mut threads = Vec::new();
    for id in 0.. {
        if conns.stopping() {
            break;
        }
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                if !conns.stopping() {
                    warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        // Kept so that a stop can shut it down: a connection a stop could
        // not reach is not served.
        let handle = match conn.try_clone() {
            Ok(c) => c,
            Err(e) => {
                warn!(conn = id, error = %e, "cannot keep a handle on a new connection; closed");
                continue;
            }
        };
        let progress = Arc::new(Progress::default());
        conns.add(id, handle, progress.clone());
        let (exports, conns, opts) = (exports.clone(), conns.clone(), opts.clone());
        threads.push(std::thread::spawn(move || {
            serve(id, conn, &exports, &opts, progress);
            conns.remove(id);
        }));
        threads.retain(|t| !t.is_finished());
    }
    threads
}

/// Stops every cache; 1 if one failed to stop, or left dirty data that
/// writeback cannot write (with what to run about it), else 0.
fn stop_caches(device: &Path, caches: &Caches) -> u8 {
    let mut code = 0;
    for (name, c) in caches {
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
            let device = shell_quote(&device.display().to_string());
            let backing = shell_quote(&c.backing().path().display().to_string());
            eprintln!(
                "pcache attach: {name:?}: {why}\n  the data stays in the cache; `pcache detach {device} --backing \
                 {backing}` names what is wrong, `--salvage` writes back everything else and lists the rest"
            );
            code = 1;
        }
    }
    code
}

fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// Worker threads per connection for reads that may block:
/// `PCACHE_NBD_WORKERS`, default twice the CPUs within 2..=16.
fn nbd_workers() -> usize {
    std::env::var("PCACHE_NBD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| (cpus() as usize * 2).clamp(2, 16))
}

/// How long a client may take over the handshake:
/// `PCACHE_NBD_HANDSHAKE_TIMEOUT_SECS` (0: no limit), default 30 s.
fn handshake_timeout() -> Option<Duration> {
    let secs = match std::env::var("PCACHE_NBD_HANDSHAKE_TIMEOUT_SECS") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            warn!(
                value = %v,
                "PCACHE_NBD_HANDSHAKE_TIMEOUT_SECS is not a number of seconds; using {HANDSHAKE_TIMEOUT_SECS}"
            );
            HANDSHAKE_TIMEOUT_SECS
        }),
        Err(_) => HANDSHAKE_TIMEOUT_SECS,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}
