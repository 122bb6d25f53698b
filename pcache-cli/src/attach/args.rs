//! The command line of `pcache attach`.

use std::path::PathBuf;

use crate::units::parse_size;

/// What to do, from the command line.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The pmem device (formatted with `pcache format`).
    pub device: PathBuf,
    /// A backing device or file to cache and serve, or an NBD server's
    /// export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH);
    /// repeat for several.
    #[arg(long = "backing", value_name = "BACKING", required = true)]
    pub backings: Vec<PathBuf>,
    /// How long requests to a remote (NBD) backing are retried, with a new
    /// connection each time, before they fail: a read miss then answers
    /// EIO; writeback waits and tries again.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub backing_timeout: u64,
    /// Export name for each --backing, in order (default: the file name).
    #[arg(long = "export", value_name = "EXPORT")]
    pub exports: Vec<String>,
    /// Size of each new cache (default: sized for its backing device —
    /// the backing rounded up to 16 MiB segments plus an eighth for its
    /// log — within the free segments). An existing cache keeps its size.
    #[arg(long, value_parser = parse_size)]
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
    /// The control socket (`pcache status`, `pcache set`), a Unix socket of
    /// mode 0600 (default: /run/pcache/DEVICE.control as root, else under
    /// $XDG_RUNTIME_DIR/pcache or the temporary directory's pcache-UID).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve the figures of `pcache status` in the Prometheus text format
    /// at http://HOST:PORT/metrics (tcp:HOST:PORT; loopback unless you mean
    /// otherwise: the figures are not secret, but they are no one else's).
    #[arg(long, value_name = "tcp:HOST:PORT", value_parser = parse_listen)]
    pub metrics: Option<Listen>,
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
    /// After SIGINT or SIGTERM, how long connections may take to finish
    /// the requests in flight; then those still open are cut off (a
    /// second signal cuts them at once). The caches stop cleanly either
    /// way.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub stop_timeout: u64,
    /// Show clients each backing's path in its export description (the
    /// export list, NBD_INFO_DESCRIPTION); by default any client that
    /// connects sees only the export names.
    #[arg(long)]
    pub describe_paths: bool,
    /// Allow --listen on an address other than loopback without TLS: any
    /// host that can connect then reads and writes every export. Only on a
    /// network you trust.
    #[arg(long)]
    pub insecure: bool,
    /// Require TLS of every client (NBD_OPT_STARTTLS), with this
    /// certificate (PEM, the chain from the server's own first).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Accept only clients whose certificate chains to this CA (PEM).
    #[arg(long, value_name = "CA-FILE", requires = "tls_cert")]
    pub tls_verify_peer: Option<PathBuf>,
    /// Close an open kset at most this many milliseconds after its first key.
    #[arg(long, value_name = "MS", hide = true)]
    pub kset_flush_ms: Option<u64>,
}

impl AttachArgs {
    /// The TLS configuration `--tls-cert` and `--tls-key` ask for, read
    /// now, so that a bad file is refused before anything starts.
    pub fn tls_config(&self) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return Ok(None) };
        pcache_cli::nbd::tls::server_config(cert, key, self.tls_verify_peer.as_deref())
            .map(Some)
            .map_err(|e| format!("TLS: {e} (--tls-cert and --tls-key take PEM files)"))
    }
}

/// Parses a writeback rate: a size a second, not 0.
fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
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

impl std::fmt::Display for Listen {
    /// As `--listen` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(h, p) => write!(f, "tcp:{h}:{p}"),
        }
    }
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

/// Refuses a TCP address that is not loopback unless the operator said
/// `--insecure`: NBD without TLS gives every host that can connect the
/// whole export.
pub fn check_exposure(l: &Listen, insecure: bool) -> Result<(), String> {
    let Listen::Tcp(host, port) = l else { return Ok(()) };
    if insecure {
        return Ok(());
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<std::net::SocketAddr> =
        (host.as_str(), *port).to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    if !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()) {
        return Ok(());
    }
    Err(format!(
        "--listen {l} is reachable from other hosts, and pcache serves NBD without TLS: any host that can \
         connect could read and write every export. Listen on loopback (tcp:127.0.0.1:{port}) or a Unix socket \
         and reach it through an SSH or TLS tunnel, or pass --insecure if this network is trusted"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_without_insecure() {
        let tcp = |h: &str| Listen::Tcp(h.into(), 10809);
        for ok in ["127.0.0.1", "::1", "localhost", "127.0.0.2"] {
            assert_eq!(check_exposure(&tcp(ok), false), Ok(()), "{ok}");
        }
        for exposed in ["0.0.0.0", "::"] {
            let e = check_exposure(&tcp(exposed), false).unwrap_err();
            assert!(e.contains("--insecure") && e.contains("tcp:127.0.0.1:10809"), "{e}");
            assert_eq!(check_exposure(&tcp(exposed), true), Ok(()));
        }
        assert_eq!(check_exposure(&Listen::Unix("/tmp/s".into()), false), Ok(()));
    }

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
    fn listen_addresses_print_as_given() {
        for s in ["unix:/tmp/s", "tcp:127.0.0.1:10809", "tcp:::1:99"] {
            assert_eq!(parse_listen(s).unwrap().to_string(), s);
        }
    }
}
