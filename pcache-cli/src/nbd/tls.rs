//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls, both ways: the server's
//! certificate and key (and, to verify clients, a CA), the client's CA (and
//! its own certificate, for servers that verify clients).
//!
//! After `STARTTLS` is acknowledged, [`tunnel`] hands the socket to a pump
//! thread that runs the TLS session and returns the other end of a local
//! socket pair, which the handshake and the transmission phase then read
//! and write as plain bytes, from as many threads as before. The pump never
//! blocks on either side: it buffers what one side cannot take yet and
//! stops reading the other until it can, so a client that pipelines many
//! requests while its replies wait can never deadlock it.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Plaintext held for the local side before the pump stops reading TLS.
const HELD_MAX: usize = 1 << 20;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: no PEM private key read: {e}", path.display()))
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    Ok(roots)
}

/// The server's side: its certificate chain and key, and the CA that
/// client certificates must chain to, if clients are verified.
pub fn server_config(
    cert: &Path,
    key_path: &Path,
    verify_peer: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match verify_peer {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key_path.display()))?;
    Ok(Arc::new(config))
}

/// The client's side, from the directory `nbds://` names: `ca-cert.pem`
/// (the CA the server's certificate must chain to) and, for servers that
/// verify clients, `client-cert.pem` and `client-key.pem` — the layout
/// nbdkit, qemu and libnbd use. The name to verify goes to
/// [`client_session`].
pub fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca = dir.join("ca-cert.pem");
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&ca)?);
    let (cert, key_path) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let config = if cert.exists() && key_path.exists() {
        builder.with_client_auth_cert(certs(&cert)?, key(&key_path)?).map_err(|e| e.to_string())?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// A client's TLS session to `hostname`.
pub fn client_session(config: Arc<rustls::ClientConfig>, hostname: &str) -> Result<rustls::Connection, String> {
    let name = ServerName::try_from(hostname.to_string()).map_err(|e| format!("{hostname:?}: {e}"))?;
    rustls::ClientConnection::new(config, name).map(Into::into).map_err(|e| e.to_string())
}

/// A server's TLS session.
pub fn server_session(config: Arc<rustls::ServerConfig>) -> Result<rustls::Connection, String> {
    rustls::ServerConnection::new(config).map(Into::into).map_err(|e| e.to_string())
}

/// A socket the pump can run TLS over.
pub trait Socket: Read + Write + AsFd + Send + 'static {
    /// `set_nonblocking`.
    fn nonblocking(&self, on: bool) -> io::Result<()>;
    /// `set_read_timeout` and `set_write_timeout` both.
    fn timeouts(&self, t: Option<Duration>) -> io::Result<()>;
    /// Shuts both directions down.
    fn close(&self);
}

/// Both kinds of socket have the same calls under the same names.
macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn nonblocking(&self, on: bool) -> io::Result<()> {
                self.set_nonblocking(on)
            }
            fn timeouts(&self, t: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(t)?;
                self.set_write_timeout(t)
            }
            fn close(&self) {
                let _ = self.shutdown(std::net::Shutdown::Both);
            }
        }
    };
}
socket!(UnixStream);
socket!(std::net::TcpStream);

/// Runs the TLS handshake on `sock` (within `timeout`), then hands the
/// session to a pump thread; returns the plaintext end.
pub fn tunnel<S: Socket>(mut sock: S, mut tls: rustls::Connection, timeout: Duration) -> Result<UnixStream, String> {
    sock.timeouts(Some(timeout)).map_err(|e| e.to_string())?;
    while tls.is_handshaking() {
        tls.complete_io(&mut sock).map_err(|e| format!("TLS handshake: {e}"))?;
    }
    let (plain, inner) = UnixStream::pair().map_err(|e| e.to_string())?;
    sock.timeouts(None).map_err(|e| e.to_string())?;
    sock.nonblocking(true).map_err(|e| e.to_string())?;
    inner.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || {
            if let Err(e) = pump(&mut sock, inner, tls) {
                tracing::debug!(error = %e, "TLS session ended");
            }
            sock.close();
        })
        .map_err(|e| e.to_string())?;
    Ok(plain)
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted
}

/// The pump's state: the session, and what waits for each side.
struct Pump {
    tls: rustls::Connection,
    /// Plaintext from the peer, for the local side.
    to_plain: Vec<u8>,
    /// Plaintext from the local side, for the session.
    to_tls: Vec<u8>,
    sock_eof: bool,
    plain_eof: bool,
    buf: Vec<u8>,
}

/// Moves bytes between the TLS socket and the plaintext end until the
/// local side is done (the peer closing is not the end: replies to what it
/// sent may still come from the local side, until it closes too).
fn pump<S: Socket>(sock: &mut S, mut plain: UnixStream, tls: rustls::Connection) -> io::Result<()> {
    let mut p = Pump {
        tls,
        to_plain: Vec::new(),
        to_tls: Vec::new(),
        sock_eof: false,
        plain_eof: false,
        buf: vec![0; 64 << 10],
    };
    loop {
        // Plaintext the session holds first (some may have come with the
        // handshake's last records).
        if !p.sock_eof {
            p.take_plaintext(&plain)?;
        }
        p.move_out(sock, &mut plain)?;
        if p.plain_eof && p.to_tls.is_empty() && !p.tls.wants_write() {
            return Ok(());
        }
        let read_sock = !p.sock_eof && p.to_plain.len() < HELD_MAX;
        let read_plain = !p.plain_eof && p.to_tls.len() < HELD_MAX;
        let sock_ev = flag(read_sock, PollFlags::IN) | flag(p.tls.wants_write(), PollFlags::OUT);
        let plain_ev = flag(read_plain, PollFlags::IN) | flag(!p.to_plain.is_empty(), PollFlags::OUT);
        if sock_ev.is_empty() && plain_ev.is_empty() {
            // Nothing left to wait for on either side.
            return Ok(());
        }
        // Only a side with something to wait for is polled: a closed end
        // reports HUP on every poll, wanted or not, and would spin the pump.
        // Once the local side is gone, a peer that takes nothing for
        // CLOSING_WAIT is given up on.
        let timeout = rustix::event::Timespec { tv_sec: CLOSING_WAIT.as_secs() as i64, tv_nsec: 0 };
        let timeout = p.plain_eof.then_some(&timeout);
        let (sock_rev, plain_rev) = match (sock_ev.is_empty(), plain_ev.is_empty()) {
            (false, false) => {
                let mut fds = [PollFd::new(sock, sock_ev), PollFd::new(&plain, plain_ev)];
                wait(&mut fds, timeout)?;
                (fds[0].revents(), fds[1].revents())
            }
            (false, true) => {
                let mut fds = [PollFd::new(sock, sock_ev)];
                wait(&mut fds, timeout)?;
                (fds[0].revents(), PollFlags::empty())
            }
            _ => {
                let mut fds = [PollFd::new(&plain, plain_ev)];
                wait(&mut fds, timeout)?;
                (PollFlags::empty(), fds[0].revents())
            }
        };
        let ready = PollFlags::IN | PollFlags::HUP | PollFlags::ERR;
        if read_sock && sock_rev.intersects(ready) {
            match p.tls.read_tls(sock) {
                Ok(0) => p.sock_eof = true,
                Ok(_) => {
                    p.tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    p.take_plaintext(&plain)?;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => p.sock_eof = true,
            }
            if p.sock_eof {
                let _ = plain.shutdown(std::net::Shutdown::Write);
            }
        }
        if read_plain && plain_rev.intersects(ready) {
            p.read_plain(&mut plain);
        }
    }
}

/// How long a session whose local side is gone may take to hand its last
/// bytes and its close to the peer.
const CLOSING_WAIT: Duration = Duration::from_secs(10);

/// `poll`, a timeout being the end (only ever set while closing).
fn wait(fds: &mut [PollFd<'_>], timeout: Option<&rustix::event::Timespec>) -> io::Result<()> {
    match poll(fds, timeout) {
        Ok(0) if timeout.is_some() => Err(io::Error::new(io::ErrorKind::TimedOut, "the peer took nothing")),
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn flag(on: bool, f: PollFlags) -> PollFlags {
    if on { f } else { PollFlags::empty() }
}

impl Pump {
    /// Moves the plaintext the session holds to `to_plain`; at the peer's
    /// end, ends the local side's input.
    fn take_plaintext(&mut self, plain: &UnixStream) -> io::Result<()> {
        loop {
            match self.tls.reader().read(&mut self.buf) {
                Ok(0) => {
                    self.sock_eof = true;
                    let _ = plain.shutdown(std::net::Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => self.to_plain.extend_from_slice(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves what can move now without blocking: the local side's bytes
    /// into the session and its records to the socket (the session takes
    /// plaintext only as fast as its records leave: alternate until neither
    /// moves), and the peer's bytes to the local side.
    fn move_out<S: Socket>(&mut self, sock: &mut S, plain: &mut UnixStream) -> io::Result<()> {
        loop {
            let mut moved = false;
            if !self.to_tls.is_empty() {
                let n = self.tls.writer().write(&self.to_tls)?;
                moved |= n > 0;
                drop(self.to_tls.drain(..n));
            }
            while self.tls.wants_write() {
                match self.tls.write_tls(sock) {
                    Ok(n) => moved |= n > 0,
                    Err(e) if would_block(&e) => break,
                    Err(e) => return Err(e),
                }
            }
            if !moved {
                break;
            }
        }
        while !self.to_plain.is_empty() {
            match plain.write(&self.to_plain) {
                Ok(n) => drop(self.to_plain.drain(..n)),
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the local side sent; at its end, closes the session.
    fn read_plain(&mut self, plain: &mut UnixStream) {
        match plain.read(&mut self.buf) {
            Ok(n) if n > 0 => self.to_tls.extend_from_slice(&self.buf[..n]),
            Err(e) if would_block(&e) => {}
            _ => {
                self.plain_eof = true;
                self.tls.send_close_notify();
            }
        }
    }
}
