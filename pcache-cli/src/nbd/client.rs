//! The client side of the protocol, for a remote backing store: fixed
//! newstyle, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_GO` with the export's
//! block sizes (falling back to `NBD_OPT_EXPORT_NAME` on an old server),
//! then any number of requests in flight on one connection, their replies
//! matched by handle on a reader thread, in any order.
//!
//! Every byte from the server is checked before it is believed: a reply
//! for no request in flight, a chunk outside its request, a length past
//! what was asked, an unknown magic — each ends the connection with a
//! reason, and every request still in flight fails with it. Nothing the
//! server sends can make the client panic or allocate more than a request's
//! own size.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zerocopy::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::wire::*;
use pcache_pmem::nbd_uri::{NbdUri, Transport};

/// Structured reply chunk: a hole (reads as zeroes).
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply chunk: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// Transmission flag: the export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// The largest request sent when the server names no maximum (what the
/// protocol says every server takes).
const DEFAULT_MAX: u32 = 32 << 20;
/// The most bytes of block status descriptors believed for one request.
const MAX_BLOCK_STATUS: usize = 1 << 20;
/// The longest option reply believed.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReqError {
    /// The server answered with an error.
    #[error("the server answered {}{}", errno_name(*errno), if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Server {
        /// The protocol's errno.
        errno: u32,
        /// The server's message, if it sent one.
        message: String,
    },
    /// The connection is gone (or was never made).
    #[error("{0}")]
    Lost(String),
    /// No reply within the time allowed.
    #[error("no reply in {0:?}")]
    Timeout(Duration),
}

impl ReqError {
    /// Whether the same request may succeed if tried again: anything but a
    /// server's refusal of the request itself.
    pub fn transient(&self) -> bool {
        match self {
            Self::Server { errno, .. } => !matches!(*errno, EINVAL | ENOSPC | ENOTSUP | EPERM | EOVERFLOW),
            Self::Lost(_) | Self::Timeout(_) => true,
        }
    }
}

/// `EPERM` (a write to a read-only export).
pub const EPERM: u32 = 1;
/// `EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;

/// The name of one of the protocol's errnos.
pub fn errno_name(errno: u32) -> String {
    match errno {
        EPERM => "EPERM".into(),
        EIO => "EIO".into(),
        12 => "ENOMEM".into(),
        EINVAL => "EINVAL".into(),
        ENOSPC => "ENOSPC".into(),
        EOVERFLOW => "EOVERFLOW".into(),
        ENOTSUP => "ENOTSUP".into(),
        ESHUTDOWN => "ESHUTDOWN".into(),
        n => format!("errno {n}"),
    }
}

/// The reply to a request, still to come.
pub type Pending = Receiver<Result<Vec<u8>, ReqError>>;

/// What the server says of its export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Smallest block it takes (requests are aligned to it).
    pub min_block: u32,
    /// Its preferred block size.
    pub preferred_block: u32,
    /// Largest request it takes.
    pub max_block: u32,
    /// The id of `base:allocation`, if the server serves block status.
    pub block_status: Option<u32>,
}

impl ExportInfo {
    /// Whether the server takes `flag` (a `TF_*`).
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A connected socket, either kind.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Self::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens a socket to the server `uri` names, within `timeout`.
fn connect(uri: &NbdUri, timeout: Duration) -> Result<Stream, String> {
    match &uri.transport {
        Transport::Unix { socket } => UnixStream::connect(socket)
            .map(Stream::Unix)
            .map_err(|e| format!("cannot connect to {}: {e} (is the NBD server running?)", socket.display())),
        Transport::Tcp { host, port } => {
            let addrs = uri.addresses().map_err(|e| format!("cannot resolve {host}: {e}"))?;
            let mut last = format!("{host} resolves to no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = format!("cannot connect to {a}: {e} (is the NBD server running on port {port}?)"),
                }
            }
            Err(last)
        }
    }
}

/// A request in flight.
struct Waiter {
    tx: SyncSender<Result<Vec<u8>, ReqError>>,
    offset: u64,
    len: u32,
    /// The request's command (`CMD_*`).
    kind: u16,
    /// A read's data, filled chunk by chunk (structured replies).
    buf: Vec<u8>,
    /// Bytes of a read its data and hole chunks covered.
    covered: u64,
    /// The first error chunk.
    err: Option<ReqError>,
}

/// What the reader thread and the senders share.
#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<u64, Waiter>>,
    /// Why the connection ended, once it has.
    dead: Mutex<Option<String>>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Waiter>> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends the connection: every request in flight fails with `why`.
    fn kill(&self, why: String) {
        let mut dead = self.dead.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if dead.is_none() {
            *dead = Some(why.clone());
        }
        drop(dead);
        for (_, w) in self.pending().drain() {
            let _ = w.tx.try_send(Err(ReqError::Lost(why.clone())));
        }
    }

    fn dead(&self) -> Option<String> {
        self.dead.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// One connection to an export, open for requests.
pub struct Conn {
    writer: Mutex<Stream>,
    control: Stream,
    shared: Arc<Shared>,
    next: AtomicU64,
    reader: Mutex<Option<JoinHandle<()>>>,
    info: ExportInfo,
    /// Writes have completed since the last flush began.
    unflushed: AtomicBool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("info", &self.info).field("dead", &self.shared.dead()).finish_non_exhaustive()
    }
}

impl Conn {
    /// Connects to `uri` and haggles for its export; `timeout` bounds the
    /// connect and each step of the handshake.
    pub fn open(uri: &NbdUri, timeout: Duration) -> Result<Self, String> {
        let name = uri.normal();
        let mut s = connect(uri, timeout)?;
        s.set_timeouts(Some(timeout), Some(timeout)).map_err(|e| e.to_string())?;
        let no_zeroes = greet(&mut s).map_err(|e| format!("{name}: {e}"))?;
        if uri.tls {
            s = start_tls(s, uri, timeout).map_err(|e| format!("{name}: {e}"))?;
            s.set_timeouts(Some(timeout), Some(timeout)).map_err(|e| e.to_string())?;
        }
        let (info, structured) = haggle(&mut s, uri.export.as_bytes(), no_zeroes).map_err(|e| {
            // A server that refuses a client's certificate (or its absence)
            // does so after the client thinks TLS is up: the session ends.
            let hint = if uri.tls && e.starts_with("handshake:") {
                " (the server ended the TLS session: if it verifies clients, tls-certificates= needs \
                 client-cert.pem and client-key.pem signed by a CA it trusts)"
            } else {
                ""
            };
            format!("{name}: {e}{hint}")
        })?;
        // Replies may take as long as they take (each request has its own
        // deadline); a write that cannot be sent within the timeout is a
        // dead server.
        s.set_timeouts(None, Some(timeout)).map_err(|e| e.to_string())?;
        let reader = s.try_clone().map_err(|e| e.to_string())?;
        let control = s.try_clone().map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || {
                let mut reader = reader;
                let why = read_replies(&mut reader, &sh, structured);
                reader.shutdown();
                sh.kill(why);
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            writer: Mutex::new(s),
            control,
            shared,
            next: AtomicU64::new(1),
            reader: Mutex::new(Some(handle)),
            info,
            unflushed: AtomicBool::new(false),
        })
    }

    /// The export, as the server described it.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Why the connection ended, if it has.
    pub fn dead(&self) -> Option<String> {
        self.shared.dead()
    }

    /// Whether writes completed since the last flush was sent.
    pub fn unflushed(&self) -> bool {
        self.unflushed.load(Ordering::Acquire)
    }

    /// Sends a request; its reply arrives on the receiver.
    fn send(&self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Pending {
        let (tx, rx) = sync_channel(1);
        if let Some(why) = self.dead() {
            let _ = tx.try_send(Err(ReqError::Lost(why)));
            return rx;
        }
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        let waiter = Waiter { tx: tx.clone(), offset, len, kind, buf: Vec::new(), covered: 0, err: None };
        self.shared.pending().insert(handle, waiter);
        let header = RequestHeader::new(kind, flags, handle, offset, len);
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if data.len() <= 64 << 10 {
                w.write_all(&[header.as_bytes(), data].concat())
            } else {
                w.write_all(header.as_bytes()).and_then(|()| w.write_all(data))
            }
        };
        if let Err(e) = sent {
            self.kill(format!("sending a request: {e}"));
        }
        rx
    }

    /// Ends the connection now: requests in flight fail.
    pub fn kill(&self, why: String) {
        self.shared.kill(why);
        self.control.shutdown();
    }

    /// Waits for a reply until `deadline`; a request that outlives it kills
    /// the connection (a server that stops answering is a dead server).
    fn wait(&self, rx: &Pending, deadline: Instant) -> Result<Vec<u8>, ReqError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => r,
            Err(_) => {
                self.kill(format!("no reply in {left:?}"));
                Err(ReqError::Timeout(left))
            }
        }
    }

    /// Sends the requests of `reads` (offset, length) all at once, then
    /// waits for each: the replies fill `buf` in order.
    pub fn read_many(&self, reads: &[(u64, usize)], buf: &mut [u8], deadline: Instant) -> Result<(), ReqError> {
        let rxs: Vec<_> = reads.iter().map(|&(off, len)| self.send(CMD_READ, 0, off, len32(len), &[])).collect();
        let mut at = 0;
        for (rx, &(_, len)) in rxs.iter().zip(reads) {
            let data = self.wait(rx, deadline)?;
            buf[at..at + len].copy_from_slice(&data);
            at += len;
        }
        Ok(())
    }

    /// Sends every write of `writes` (offset, data, as zeroes) at once; the
    /// replies come on the receivers. The connection counts them as not
    /// flushed from now on (a write may reach the server before its reply
    /// is read).
    pub fn send_writes(&self, writes: &[(u64, &[u8], bool)]) -> Vec<Pending> {
        self.unflushed.store(true, Ordering::Release);
        writes
            .iter()
            .map(|&(off, data, zero)| {
                if zero {
                    self.send(CMD_WRITE_ZEROES, 0, off, len32(data.len()), &[])
                } else {
                    self.send(CMD_WRITE, 0, off, len32(data.len()), data)
                }
            })
            .collect()
    }

    /// Waits for every reply of `pending`: the first error, if any.
    pub fn wait_all(&self, pending: &[Pending], deadline: Instant) -> Result<(), ReqError> {
        let mut first = Ok(());
        for rx in pending {
            let r = self.wait(rx, deadline).map(drop);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Sends every write of `writes` at once, then waits for each.
    pub fn write_many(&self, writes: &[(u64, &[u8], bool)], deadline: Instant) -> Result<(), ReqError> {
        let pending = self.send_writes(writes);
        self.wait_all(&pending, deadline)
    }

    /// `NBD_CMD_WRITE_ZEROES` of `len` bytes at `offset`, waited for.
    pub fn zero(&self, offset: u64, len: u32, deadline: Instant) -> Result<(), ReqError> {
        self.unflushed.store(true, Ordering::Release);
        let rx = self.send(CMD_WRITE_ZEROES, 0, offset, len, &[]);
        self.wait(&rx, deadline).map(drop)
    }

    /// `NBD_CMD_TRIM` of `len` bytes at `offset`, waited for.
    pub fn trim(&self, offset: u64, len: u32, deadline: Instant) -> Result<(), ReqError> {
        let rx = self.send(CMD_TRIM, 0, offset, len, &[]);
        self.wait(&rx, deadline).map(drop)
    }

    /// `NBD_CMD_BLOCK_STATUS` of `base:allocation` from `offset`: the
    /// extents the server reports (length, `STATE_*` flags), in order; empty
    /// if it serves no block status.
    pub fn block_status(&self, offset: u64, len: u32, deadline: Instant) -> Result<Vec<(u32, u32)>, ReqError> {
        if self.info.block_status.is_none() {
            return Ok(Vec::new());
        }
        let rx = self.send(CMD_BLOCK_STATUS, 0, offset, len, &[]);
        // A hint: a slow answer is given up on, and the connection (with
        // the writes it carries) is left alone.
        let left = deadline.saturating_duration_since(Instant::now());
        let raw = rx.recv_timeout(left).map_err(|_| ReqError::Timeout(left))??;
        Ok(raw
            .chunks_exact(8)
            .map(|d| (u32::from_be_bytes([d[0], d[1], d[2], d[3]]), u32::from_be_bytes([d[4], d[5], d[6], d[7]])))
            .collect())
    }

    /// `NBD_CMD_FLUSH`: every write completed before it is durable.
    pub fn flush(&self, deadline: Instant) -> Result<(), ReqError> {
        self.unflushed.store(false, Ordering::Release);
        let rx = self.send(CMD_FLUSH, 0, 0, 0, &[]);
        let r = self.wait(&rx, deadline).map(drop);
        if r.is_err() {
            self.unflushed.store(true, Ordering::Release);
        }
        r
    }

    /// Says goodbye (`NBD_CMD_DISC`) and closes the socket.
    pub fn close(&self) {
        if self.dead().is_none() {
            let header = RequestHeader::new(CMD_DISC, 0, 0, 0, 0);
            let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = w.write_all(header.as_bytes());
        }
        self.kill("closed".into());
        if let Some(h) = self.reader.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.close();
    }
}

fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake: the stream to go on with
/// (the tunnel's plaintext end).
fn start_tls(mut s: Stream, uri: &NbdUri, timeout: Duration) -> Result<Stream, String> {
    let dir = uri.tls_certificates.clone().ok_or("nbds needs ?tls-certificates=DIR")?;
    let hostname = uri.tls_name();
    let config = super::tls::client_config(&dir)?;
    s.write_all(&encode_option(OPT_STARTTLS, &[])).map_err(io_err)?;
    let (kind, data) = option_reply(&mut s, OPT_STARTTLS)?;
    if kind != REP_ACK {
        return Err(format!(
            "the server does not offer TLS ({}): start it with TLS, or use nbd:// on a network you trust",
            rep_error(kind, &data)
        ));
    }
    let session = super::tls::client_session(config, &hostname)?;
    let plain = match s {
        Stream::Tcp(t) => super::tls::tunnel(t, session, timeout),
        Stream::Unix(u) => super::tls::tunnel(u, session, timeout),
    }
    .map_err(|e| {
        let dir = uri.tls_certificates.as_deref().unwrap_or(std::path::Path::new("?")).display().to_string();
        format!(
            "{e} (check {dir}: ca-cert.pem must be the CA that signed the server's certificate, which must name \
             {hostname:?} (or say tls-hostname=); client-cert.pem and client-key.pem if the server verifies \
             clients)"
        )
    })?;
    Ok(Stream::Unix(plain))
}

/// The handshake: fixed newstyle, structured replies if the server has
/// them, then `GO` (or `EXPORT_NAME`). Returns the export and whether
/// replies are structured.
#[cfg(test)]
fn handshake<S: Read + Write>(s: &mut S, export: &[u8]) -> Result<(ExportInfo, bool), String> {
    let no_zeroes = greet(s)?;
    haggle(s, export, no_zeroes)
}

/// The server's greeting, and the client's flags: whether the server
/// leaves out the zeroes after `EXPORT_NAME`.
fn greet<S: Read + Write>(s: &mut S) -> Result<bool, String> {
    let hello: ServerHello = read_header(s).map_err(|e| format!("no NBD greeting: {e}"))?;
    if hello.magic.get() != NBDMAGIC {
        return Err("the server does not speak NBD (no NBDMAGIC)".into());
    }
    if hello.option_magic.get() != IHAVEOPT {
        return Err("the server speaks only the old NBD handshake (oldstyle); run it in newstyle mode".into());
    }
    let flags = hello.flags.get();
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not offer the fixed newstyle handshake".into());
    }
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(U32::new(cflags).as_bytes()).map_err(io_err)?;
    Ok(no_zeroes)
}

/// Options up to transmission.
fn haggle<S: Read + Write>(s: &mut S, export: &[u8], no_zeroes: bool) -> Result<(ExportInfo, bool), String> {
    s.write_all(&encode_option(OPT_STRUCTURED_REPLY, &[])).map_err(io_err)?;
    let (kind, _) = option_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = kind == REP_ACK;
    let block_status = if structured { meta_context(s, export)? } else { None };
    let mut go = U32::new(len32(export.len())).as_bytes().to_vec();
    go.extend_from_slice(export);
    go.extend_from_slice(U16::new(1).as_bytes());
    go.extend_from_slice(U16::new(INFO_BLOCK_SIZE).as_bytes());
    s.write_all(&encode_option(OPT_GO, &go)).map_err(io_err)?;
    let mut info: Option<(u64, u16)> = None;
    let mut blocks = (1u32, PREFERRED_BLOCK, DEFAULT_MAX);
    for n in 0.. {
        if n == MAX_OPTION_REPLIES {
            return Err(format!("more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO"));
        }
        let (kind, data) = option_reply(s, OPT_GO)?;
        match kind {
            REP_ACK => break,
            REP_INFO => match U16::read_from_prefix(&data).map(|(t, _)| t.get()) {
                Ok(INFO_EXPORT) => {
                    let i = InfoExport::read_from_bytes(&data).map_err(|_| "malformed NBD_INFO_EXPORT")?;
                    info = Some((i.size.get(), i.flags.get()));
                }
                Ok(INFO_BLOCK_SIZE) => {
                    let b = InfoBlockSize::read_from_bytes(&data).map_err(|_| "malformed NBD_INFO_BLOCK_SIZE")?;
                    blocks = (b.minimum.get(), b.preferred.get(), b.maximum.get());
                }
                _ => {}
            },
            REP_ERR_UNSUP => {
                return export_name(s, export, no_zeroes).map(|i| (ExportInfo { block_status, ..i }, structured));
            }
            REP_ERR_UNKNOWN => {
                return Err(format!(
                    "the server has no export named {:?} (list them with `nbdinfo --list`)",
                    String::from_utf8_lossy(export)
                ));
            }
            k if k & (1 << 31) != 0 => {
                return Err(format!("the server refused the export: {}", rep_error(k, &data)));
            }
            k => return Err(format!("unexpected option reply {k} to NBD_OPT_GO")),
        }
    }
    let (size, flags) = info.ok_or("the server sent no NBD_INFO_EXPORT")?;
    let (min, pref, max) = blocks;
    if !min.is_power_of_two() || min > 64 << 10 || max < min || !pref.is_power_of_two() {
        return Err(format!("the server's block sizes make no sense (minimum {min}, preferred {pref}, maximum {max})"));
    }
    let max_block = (max - max % min).min(DEFAULT_MAX.max(min));
    Ok((ExportInfo { size, flags, min_block: min, preferred_block: pref, max_block, block_status }, structured))
}

/// Asks for `base:allocation` on `export`: its context id, if the server
/// has it.
fn meta_context<S: Read + Write>(s: &mut S, export: &[u8]) -> Result<Option<u32>, String> {
    let mut q = U32::new(len32(export.len())).as_bytes().to_vec();
    q.extend_from_slice(export);
    q.extend_from_slice(U32::new(1).as_bytes());
    q.extend_from_slice(U32::new(len32(BASE_ALLOCATION.len())).as_bytes());
    q.extend_from_slice(BASE_ALLOCATION.as_bytes());
    s.write_all(&encode_option(OPT_SET_META_CONTEXT, &q)).map_err(io_err)?;
    let mut id = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let (kind, data) = option_reply(s, OPT_SET_META_CONTEXT)?;
        match kind {
            REP_META_CONTEXT if data.get(4..) == Some(BASE_ALLOCATION.as_bytes()) => {
                id = U32::read_from_prefix(&data).ok().map(|(i, _)| i.get());
            }
            REP_META_CONTEXT => {}
            REP_ACK => return Ok(id),
            // Refused or unknown: no block status, and the handshake goes on.
            k if k & (1 << 31) != 0 => return Ok(None),
            k => return Err(format!("unexpected option reply {k} to NBD_OPT_SET_META_CONTEXT")),
        }
    }
    Err(format!("more than {MAX_OPTION_REPLIES} replies to NBD_OPT_SET_META_CONTEXT"))
}

/// The old way into transmission, for a server without `NBD_OPT_GO`.
fn export_name<S: Read + Write>(s: &mut S, export: &[u8], no_zeroes: bool) -> Result<ExportInfo, String> {
    s.write_all(&encode_option(OPT_EXPORT_NAME, export)).map_err(io_err)?;
    let r: ExportNameReply = read_header(s).map_err(|e| format!("the server closed on the export name: {e}"))?;
    if !no_zeroes {
        let mut pad = [0u8; EXPORT_NAME_PADDING];
        s.read_exact(&mut pad).map_err(io_err)?;
    }
    Ok(ExportInfo {
        size: r.size.get(),
        flags: r.flags.get(),
        min_block: 1,
        preferred_block: PREFERRED_BLOCK,
        max_block: DEFAULT_MAX,
        block_status: None,
    })
}

fn io_err(e: io::Error) -> String {
    format!("handshake: {e}")
}

/// Reads one option reply to `option`: its kind and data.
/// The most replies believed to one option (`REP_INFO`, `REP_META_CONTEXT`).
const MAX_OPTION_REPLIES: usize = 64;

fn option_reply<S: Read>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>), String> {
    let h: OptionReplyHeader = read_header(s).map_err(io_err)?;
    if h.magic.get() != REP_MAGIC {
        return Err("bad option reply magic".into());
    }
    if h.option.get() != option {
        return Err(format!("a reply to option {} where {option} was asked", h.option.get()));
    }
    let len = h.length.get();
    if len > MAX_OPTION_REPLY {
        return Err(format!("an option reply of {len} bytes"));
    }
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).map_err(io_err)?;
    Ok((h.kind.get(), data))
}

/// An option error in words, with the server's message.
fn rep_error(kind: u32, data: &[u8]) -> String {
    let name = match kind {
        REP_ERR_POLICY => "not allowed by the server's policy".to_string(),
        REP_ERR_INVALID => "invalid".to_string(),
        REP_ERR_TOO_BIG => "too big".to_string(),
        REP_ERR_TLS_REQD => "the server requires TLS: use an nbds:// URI with ?tls-certificates=DIR".to_string(),
        k => format!("error {:#x}", k),
    };
    let msg = String::from_utf8_lossy(data);
    if msg.is_empty() { name } else { format!("{name}: {msg}") }
}

/// The reader thread: reads replies until the connection ends, and says
/// why it ended.
fn read_replies<R: Read>(s: &mut R, shared: &Shared, structured: bool) -> String {
    loop {
        if let Some(why) = shared.dead() {
            return why;
        }
        if let Err(why) = read_reply(s, shared, structured) {
            return why;
        }
    }
}

/// Plays `bytes` as everything a server sends: the handshake for export
/// `disk`, then replies to reads, writes and a flush in flight, each
/// checked as a connection checks them. For the fuzz target: it must end
/// with an error or with replies, never panic, never hand a request more
/// than it asked for.
#[cfg(any(test, feature = "testing"))]
pub fn replay_server(bytes: &[u8]) {
    struct Script<'a>(&'a [u8], Vec<u8>);
    impl Read for Script<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for Script<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut s = Script(bytes, Vec::new());
    let structured = match greet(&mut s).and_then(|z| haggle(&mut s, b"disk", z)) {
        Ok((info, structured)) => {
            assert!(info.min_block.is_power_of_two() && info.max_block >= info.min_block);
            structured
        }
        // A script too short for a handshake still tests the replies.
        Err(_) => bytes.first().is_none_or(|b| b & 1 == 0),
    };
    let shared = Shared::default();
    let mut rxs = Vec::new();
    let reqs = [
        (0u64, 512u32, CMD_READ),
        (4096, 4096, CMD_READ),
        (0, 4096, CMD_WRITE),
        (0, 0, CMD_FLUSH),
        (0, 8192, CMD_BLOCK_STATUS),
    ];
    for (handle, (offset, len, kind)) in reqs.into_iter().enumerate() {
        let (tx, rx) = sync_channel(1);
        shared
            .pending()
            .insert(handle as u64 + 1, Waiter { tx, offset, len, kind, buf: Vec::new(), covered: 0, err: None });
        rxs.push((rx, len, kind));
    }
    let why = read_replies(&mut s, &shared, structured);
    shared.kill(why);
    for (rx, len, kind) in rxs {
        if let Ok(Ok(data)) = rx.try_recv() {
            match kind {
                CMD_READ => assert_eq!(data.len(), len as usize),
                CMD_BLOCK_STATUS => assert!(data.len().is_multiple_of(8) && data.len() <= MAX_BLOCK_STATUS),
                _ => assert!(data.is_empty()),
            }
        }
    }
}

/// Reads one reply (or structured chunk) and hands it to its request.
fn read_reply<R: Read>(s: &mut R, shared: &Shared, structured: bool) -> Result<(), String> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).map_err(|e| format!("connection lost: {e}"))?;
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => simple_reply(s, shared),
        STRUCTURED_REPLY_MAGIC if structured => chunk(s, shared),
        m => Err(format!("protocol violation: reply magic {m:#x}")),
    }
}

fn read_exact<R: Read>(s: &mut R, buf: &mut [u8]) -> Result<(), String> {
    s.read_exact(buf).map_err(|e| format!("connection lost: {e}"))
}

fn simple_reply<R: Read>(s: &mut R, shared: &Shared) -> Result<(), String> {
    let mut rest = [0u8; 12];
    read_exact(s, &mut rest)?;
    let error = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let handle = u64::from_be_bytes(rest[4..].try_into().unwrap_or_default());
    let w = shared
        .pending()
        .remove(&handle)
        .ok_or_else(|| format!("protocol violation: a reply for handle {handle}, not in flight"))?;
    if error != 0 {
        let _ = w.tx.try_send(Err(ReqError::Server { errno: error, message: String::new() }));
        return Ok(());
    }
    let mut data = Vec::new();
    if w.kind == CMD_READ {
        data = vec![0; w.len as usize];
        read_exact(s, &mut data)?;
    }
    let _ = w.tx.try_send(Ok(data));
    Ok(())
}

/// One structured reply chunk.
fn chunk<R: Read>(s: &mut R, shared: &Shared) -> Result<(), String> {
    let mut rest = [0u8; 16];
    read_exact(s, &mut rest)?;
    let flags = u16::from_be_bytes([rest[0], rest[1]]);
    let kind = u16::from_be_bytes([rest[2], rest[3]]);
    let handle = u64::from_be_bytes(rest[4..12].try_into().unwrap_or_default());
    let length = u32::from_be_bytes(rest[12..16].try_into().unwrap_or_default());
    let violation = |why: String| Err(format!("protocol violation: {why} (handle {handle})"));
    let mut pending = shared.pending();
    let Some(w) = pending.get_mut(&handle) else {
        return violation("a reply chunk for a request not in flight".into());
    };
    let limit = match w.kind {
        CMD_READ => u64::from(w.len) + 8,
        CMD_BLOCK_STATUS => MAX_BLOCK_STATUS as u64,
        _ => 0,
    }
    .max(u64::from(MAX_ERROR_MESSAGE as u32) + 16);
    if u64::from(length) > limit {
        return violation(format!("a chunk of {length} bytes"));
    }
    let mut payload = vec![0; length as usize];
    drop(pending);
    read_exact(s, &mut payload)?;
    let mut pending = shared.pending();
    let Some(w) = pending.get_mut(&handle) else { return Ok(()) };
    match kind {
        REPLY_TYPE_NONE if length == 0 => {}
        REPLY_TYPE_BLOCK_STATUS if w.kind == CMD_BLOCK_STATUS => {
            let n = payload.len();
            if n < 12 || !(n - 4).is_multiple_of(8) || w.buf.len() + n > MAX_BLOCK_STATUS {
                return violation(format!("a block status chunk of {length} bytes"));
            }
            // One context was asked for: its descriptors, whatever the id.
            w.buf.extend_from_slice(&payload[4..]);
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE if w.kind == CMD_READ => {
            let Ok((off, rest)) = U64::read_from_prefix(&payload) else {
                return violation("a short data chunk".into());
            };
            let (at, n) = if kind == REPLY_TYPE_OFFSET_DATA {
                (off.get(), rest.len() as u64)
            } else {
                match U32::read_from_bytes(rest) {
                    Ok(n) => (off.get(), u64::from(n.get())),
                    Err(_) => return violation("a malformed hole chunk".into()),
                }
            };
            let start = at.checked_sub(w.offset).filter(|s| s.saturating_add(n) <= u64::from(w.len));
            let Some(start) = start else { return violation(format!("data at {at}+{n} outside the read")) };
            if w.buf.is_empty() {
                w.buf = vec![0; w.len as usize];
            }
            if kind == REPLY_TYPE_OFFSET_DATA {
                w.buf[start as usize..(start + n) as usize].copy_from_slice(rest);
            } else {
                w.buf[start as usize..(start + n) as usize].fill(0);
            }
            // Chunks of one read may not overlap (the protocol says so), so
            // their lengths add up to what was covered.
            w.covered += n;
        }
        k if k & (1 << 15) != 0 => {
            let errno = U32::read_from_prefix(&payload).map(|(e, _)| e.get()).unwrap_or(EIO);
            let msg_len = payload.get(4..6).map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
            let message = payload.get(6..6 + msg_len).map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            let errno = if errno == 0 { EIO } else { errno };
            w.err.get_or_insert(ReqError::Server { errno, message });
        }
        k => return violation(format!("chunk type {k} of {length} bytes for this request")),
    }
    if flags & REPLY_FLAG_DONE != 0 {
        let w = pending.remove(&handle).expect("looked up above");
        let r = match w.err {
            Some(e) => Err(e),
            // A read its chunks did not cover whole is no success.
            None if w.kind == CMD_READ && w.covered != u64::from(w.len) => Err(ReqError::Server {
                errno: EIO,
                message: format!("the reply covered {} of the {} bytes read", w.covered, w.len),
            }),
            None => Ok(w.buf),
        };
        let _ = w.tx.try_send(r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server on one end of a socket pair.
    fn pair() -> (Stream, Stream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), Stream::Unix(b))
    }

    fn greet(server: &mut Stream) {
        server.write_all(&encode_hello()).unwrap();
    }

    #[test]
    fn the_handshake_against_our_own_server() {
        let (mut c, s) = pair();
        let (exports, _) = crate::nbd::test_util::exports(1 << 20);
        let t = std::thread::spawn(move || {
            let mut r = s.try_clone().unwrap();
            let mut w = s;
            crate::nbd::negotiate(&mut r, &mut w, &exports).map(|_| ())
        });
        let (info, structured) = handshake(&mut c, b"disk").unwrap();
        assert!(structured);
        assert_eq!(info.size, 1 << 20);
        assert!(info.has(TF_SEND_FLUSH) && !info.has(TF_READ_ONLY));
        assert_eq!((info.min_block, info.preferred_block, info.max_block), (MIN_BLOCK, PREFERRED_BLOCK, MAX_REQUEST));
        drop(c);
        let _ = t.join();
    }

    #[test]
    fn an_unknown_export_and_a_stranger_are_named() {
        let (mut c, s) = pair();
        let (exports, _) = crate::nbd::test_util::exports(1 << 20);
        let t = std::thread::spawn(move || {
            let mut r = s.try_clone().unwrap();
            let mut w = s;
            let _ = crate::nbd::negotiate(&mut r, &mut w, &exports);
        });
        let e = handshake(&mut c, b"nope").unwrap_err();
        assert!(e.contains("no export named \"nope\"") && e.contains("nbdinfo --list"), "{e}");
        drop(c);
        t.join().unwrap();
        let (mut c, mut s) = pair();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        assert!(handshake(&mut c, b"x").unwrap_err().contains("does not speak NBD"));
    }

    /// Replies that lie get the connection killed with a reason, and the
    /// request in flight fails: it never panics or reads past its buffer.
    #[test]
    fn lying_replies_end_the_connection() {
        let chunk = encode_chunk;
        let data_at = |off: u64, d: &[u8]| [&off.to_be_bytes()[..], d].concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("outside", chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &data_at(4096, &[1; 8]))),
            ("past the end", chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &data_at(0, &[1; 600]))),
            ("not in flight", chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, &[])),
            ("magic", vec![0xde, 0xad, 0xbe, 0xef]),
            ("chunk type", chunk(REPLY_FLAG_DONE, 77, 1, &[0; 4])),
            ("short", chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &[0; 3])),
            ("hole", chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &data_at(0, &4096u32.to_be_bytes()))),
            ("uncovered", chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[])),
            ("half", chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &data_at(0, &[1; 256]))),
        ];
        for (what, bytes) in cases {
            let (c, mut s) = pair();
            let shared = Arc::new(Shared::default());
            let (tx, rx) = sync_channel(1);
            shared
                .pending()
                .insert(1, Waiter { tx, offset: 0, len: 512, kind: CMD_READ, buf: Vec::new(), covered: 0, err: None });
            s.write_all(&bytes).unwrap();
            drop(s);
            let mut c = c;
            let why = read_replies(&mut c, &shared, true);
            shared.kill(why.clone());
            assert!(rx.recv().unwrap().is_err(), "{what}: {why}");
        }
        // A good read in two chunks, a hole and data, out of order.
        let (c, mut s) = pair();
        let shared = Arc::new(Shared::default());
        let (tx, rx) = sync_channel(1);
        shared
            .pending()
            .insert(1, Waiter { tx, offset: 100, len: 8, kind: CMD_READ, buf: Vec::new(), covered: 0, err: None });
        s.write_all(&chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &data_at(104, b"abcd"))).unwrap();
        s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &data_at(100, &4u32.to_be_bytes()))).unwrap();
        drop(s);
        let mut c = c;
        read_replies(&mut c, &shared, true);
        assert_eq!(rx.recv().unwrap().unwrap(), b"\0\0\0\0abcd");
    }

    #[test]
    fn replayed_scripts_never_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            replay_server(&bytes);
        }
    }

    #[test]
    fn old_servers_without_go_are_still_reached() {
        let (mut c, mut s) = pair();
        greet(&mut s);
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            for expect in [OPT_STRUCTURED_REPLY, OPT_GO] {
                let h: OptionHeader = read_header(&mut s).unwrap();
                assert_eq!(h.option.get(), expect);
                let mut d = vec![0; h.length.get() as usize];
                s.read_exact(&mut d).unwrap();
                s.write_all(&encode_option_reply(expect, REP_ERR_UNSUP, &[])).unwrap();
            }
            let h: OptionHeader = read_header(&mut s).unwrap();
            assert_eq!(h.option.get(), OPT_EXPORT_NAME);
            let mut d = vec![0; h.length.get() as usize];
            s.read_exact(&mut d).unwrap();
            assert_eq!(d, b"disk");
            let r = ExportNameReply { size: 12345.into(), flags: (TF_HAS_FLAGS | TF_SEND_FLUSH).into() };
            s.write_all(r.as_bytes()).unwrap();
        });
        let (info, structured) = handshake(&mut c, b"disk").unwrap();
        assert!(!structured);
        assert_eq!(info.size, 12345);
        t.join().unwrap();
    }
}
