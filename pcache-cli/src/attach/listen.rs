//! The server's sockets: the listener (a private Unix socket or TCP), the
//! connections it accepts, and the life of one connection — a handshake
//! with a deadline, then transmission.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcache_cli::nbd::{self, Export, NbdError, Progress};
use tracing::{info, warn};

use super::args::Listen;

/// A client connection, of either kind.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub fn try_clone(&self) -> io::Result<Conn> {
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

    /// Ends the client's side: a read blocked on it returns the end of the
    /// stream, so the connection finishes what is in flight and closes.
    pub fn shutdown_read(&self) {
        self.shutdown(Shutdown::Read);
    }

    /// Ends both sides: a read returns the end of the stream, and a write
    /// blocked on a client that does not read (and every later one) fails,
    /// so the connection ends whatever the client does.
    pub fn shutdown_both(&self) {
        self.shutdown(Shutdown::Both);
    }

    fn shutdown(&self, how: Shutdown) {
        let done = match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        };
        match done {
            Ok(()) => {}
            // A client that has already gone is what this is for.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
            Err(e) => warn!(error = %e, "cannot shut a connection down"),
        }
    }
}

impl Read for Conn {
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

/// The listening socket.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Listens at `l`; a Unix socket left by a server that is gone is
    /// replaced, one in use or anything else at its path refused.
    pub fn bind(l: &Listen) -> Result<Self, String> {
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

    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => Ok(Conn::Unix(l.accept()?.0)),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
        }
    }

    /// Makes a blocked `accept` return (with an error), now and from now on.
    pub fn wake(&self) {
        let shut = match self {
            Listener::Unix(l, _) => rustix::net::shutdown(l, rustix::net::Shutdown::Both),
            Listener::Tcp(l) => rustix::net::shutdown(l, rustix::net::Shutdown::Both),
        };
        if let Err(e) = shut {
            warn!(error = %io::Error::from(e), "cannot wake the listener; it stops at the next connection");
        }
    }

    /// Removes a Unix socket's path (the socket itself closes when the
    /// listener is dropped).
    pub fn remove_path(&self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
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

impl Read for Deadline<'_> {
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

/// How every connection is served.
pub struct ServeOptions {
    /// Worker threads per connection.
    pub workers: usize,
    /// How long a client may take over the handshake.
    pub handshake_timeout: Option<Duration>,
    /// TLS, required of every client when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The handshake, with TLS started when the client asks for it: the
/// connection to transmit on (the TLS tunnel's plaintext end, with TLS)
/// and the session.
fn handshake(
    mut r: Conn,
    mut w: Conn,
    exports: &[Export],
    opts: &ServeOptions,
) -> Result<Option<(Conn, Conn, nbd::Session)>, NbdError> {
    // A client that connects and stalls must not hold this thread for ever:
    // the whole handshake has a deadline. It is lifted before transmission,
    // where an idle client is normal.
    let deadline = opts.handshake_timeout.map(|t| Instant::now() + t);
    let state = if opts.tls.is_some() { nbd::TlsState::Required } else { nbd::TlsState::Off };
    let (dr, dw) = (&mut Deadline { conn: &mut r, deadline }, &mut Deadline { conn: &mut w, deadline });
    match nbd::negotiate_with(dr, dw, exports, state, None)? {
        nbd::Outcome::Serve(s) => Ok(Some((r, w, s))),
        nbd::Outcome::Close => Ok(None),
        nbd::Outcome::StartTls { no_zeroes } => {
            let Some(config) = &opts.tls else { return Ok(None) };
            drop(w);
            let session = nbd::tls::server_session(config.clone()).map_err(io::Error::other)?;
            let left = deadline.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(Instant::now()));
            let plain = match r {
                Conn::Unix(s) => nbd::tls::tunnel(s, session, left),
                Conn::Tcp(s) => nbd::tls::tunnel(s, session, left),
            }
            .map_err(io::Error::other)?;
            let (mut r, mut w) = (Conn::Unix(plain.try_clone()?), Conn::Unix(plain));
            let (dr, dw) = (&mut Deadline { conn: &mut r, deadline }, &mut Deadline { conn: &mut w, deadline });
            match nbd::negotiate_with(dr, dw, exports, nbd::TlsState::Active, Some(no_zeroes))? {
                nbd::Outcome::Serve(s) => Ok(Some((r, w, s))),
                _ => Ok(None),
            }
        }
    }
}

/// Serves connection `id` from handshake to disconnection, counting its
/// requests in `progress`.
pub fn serve(id: u64, conn: Conn, exports: &[Export], opts: &ServeOptions, progress: Arc<Progress>) {
    let Ok(w) = conn.try_clone() else { return };
    let tls = opts.tls.is_some();
    let (r, w, session) = match handshake(conn, w, exports, opts) {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(NbdError::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            let secs = opts.handshake_timeout.map_or(0, |t| t.as_secs());
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
    info!(
        conn = id,
        export = %e.name,
        structured = session.structured,
        extended_headers = session.extended,
        block_status = session.block_status,
        tls,
        "client connected"
    );
    match nbd::transmit_with(r, w, e.device.clone(), session, opts.workers, progress) {
        Ok(s) => info!(conn = id, requests = s.requests, "client disconnected"),
        Err(err) => warn!(conn = id, error = %err, "connection ended"),
    }
}
