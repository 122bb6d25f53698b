//! An NBD server (fixed newstyle, `doc/proto.md` of the NBD project) for
//! anything that implements [`BlockDevice`]. It knows nothing of caching.
//!
//! Handshake: `NBD_OPT_GO`, `INFO`, `LIST`, `EXPORT_NAME`, `ABORT` and
//! `STRUCTURED_REPLY`; block-size information (minimum 1, preferred 4096,
//! maximum 32 MiB) with every export. Transmission: `READ`, `WRITE` (with
//! `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES` (with `FUA`) and `DISC`, many
//! requests in flight per connection and replies in any order; flush is
//! global, so `CAN_MULTI_CONN` is advertised. Every request is checked:
//! out of range or over 32 MiB gets `EINVAL`; a malformed handshake or
//! option gets an error reply or a disconnect, never a crash.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the option magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends the handshake.
pub const OPT_ABORT: u32 = 2;
/// Lists exports.
pub const OPT_LIST: u32 = 3;
/// TLS (not offered).
pub const OPT_STARTTLS: u32 = 5;
/// Export information.
pub const OPT_INFO: u32 = 6;
/// Export information, then transmission.
pub const OPT_GO: u32 = 7;
/// Structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// An export in reply to `LIST`.
pub const REP_SERVER: u32 = 2;
/// Information in reply to `INFO`/`GO`.
pub const REP_INFO: u32 = 3;
/// Errors.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Not allowed by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option data too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// The export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Flush supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Trim supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Write-zeroes supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Flush covers every connection.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not punch holes (write zeroes).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Structured reply types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply chunk: nothing (a successful reply without data).
pub const REPLY_TYPE_NONE: u16 = 0;
/// An error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Errors (errno values of the protocol).
pub const EIO: u32 = 5;
/// Invalid request.
pub const EINVAL: u32 = 22;
/// No space.
pub const ENOSPC: u32 = 28;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest request the server takes.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option payload the server reads.
const MAX_OPTION: u32 = 64 << 10;

/// A device failure, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevError {
    /// The protocol errno.
    pub errno: u32,
    /// What happened, for the client's user.
    pub message: String,
}

/// What the server serves.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `off`.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError>;
    /// Writes `data` at `off`, durably before returning if `fua`.
    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DevError>;
    /// The range's contents no longer matter.
    fn trim(&self, off: u64, len: u64) -> Result<(), DevError>;
    /// Writes zeros.
    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError>;
    /// Whether reading `[off, off + len)` may wait on something slow (a
    /// disk): such reads run on worker threads, so that other requests of
    /// the connection go on meanwhile; everything else runs at once on the
    /// connection's reading thread, which saves a thread hand-off per request.
    fn read_may_block(&self, _off: u64, _len: u64) -> bool {
        true
    }
}

/// A device in memory, for tests.
#[derive(Debug)]
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
    /// Flushes received.
    pub flushes: AtomicU64,
}

impl MemDevice {
    /// `size` zero bytes.
    pub fn new(size: usize) -> Self {
        Self { data: Mutex::new(vec![0; size]), flushes: AtomicU64::new(0) }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }

    fn write(&self, off: u64, data: &[u8], _fua: bool) -> Result<(), DevError> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        d[off as usize..off as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> Result<(), DevError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn trim(&self, _off: u64, _len: u64) -> Result<(), DevError> {
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64, _fua: bool) -> Result<(), DevError> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        d[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }

    fn read_may_block(&self, _off: u64, _len: u64) -> bool {
        false
    }
}

/// A named export.
#[derive(Clone)]
pub struct Export {
    /// Its name.
    pub name: String,
    /// A line about it.
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("name", &self.name).field("size", &self.device.size()).finish()
    }
}

/// Why a connection ended other than by `NBD_CMD_DISC`.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed or closed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the server disconnected.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

/// Transmission flags of every export.
pub const TRANSMISSION_FLAGS: u16 =
    TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;

/// What the handshake agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Index of the export in the list served.
    pub export: usize,
    /// Structured replies negotiated.
    pub structured: bool,
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply<W: Write>(w: &mut W, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&REP_MAGIC.to_be_bytes());
    msg.extend_from_slice(&opt.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)
}

fn find_export(exports: &[Export], name: &[u8]) -> Option<usize> {
    if name.is_empty() {
        return (!exports.is_empty()).then_some(0);
    }
    exports.iter().position(|e| e.name.as_bytes() == name)
}

/// Parses `NBD_OPT_INFO`/`GO` data: the export name and the info types asked for.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let reqs = rest.get(2..)?;
    if reqs.len() != 2 * n {
        return None;
    }
    Some((name, reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// Runs the handshake: returns the session to serve, or `None` when the
/// client aborted or asked for an export that does not exist with
/// `NBD_OPT_EXPORT_NAME` (which cannot be answered with an error).
pub fn negotiate<R: Read, W: Write>(r: &mut R, w: &mut W, exports: &[Export]) -> Result<Option<Session>, NbdError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    w.flush()?;
    let client = read_u32(r)?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {client:#x}")));
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    loop {
        w.flush()?;
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#x}")));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            // Too large to take; skip it only if it is sane to read.
            if opt == OPT_EXPORT_NAME || len > 16 << 20 {
                return Err(protocol(format!("option {opt} of {len} bytes")));
            }
            io::copy(&mut r.by_ref().take(u64::from(len)), &mut io::sink())?;
            option_reply(w, opt, REP_ERR_TOO_BIG, b"option too large")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let Some(i) = find_export(exports, &data) else { return Ok(None) };
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&exports[i].device.size().to_be_bytes());
                reply.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&reply)?;
                w.flush()?;
                return Ok(Some(Session { export: i, structured }));
            }
            OPT_ABORT => {
                let _ = option_reply(w, opt, REP_ACK, &[]);
                let _ = w.flush();
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in exports {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(w, opt, REP_SERVER, &d)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, reqs)) = parse_info_request(&data) else {
                    option_reply(w, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")?;
                    continue;
                };
                let Some(i) = find_export(exports, name) else {
                    let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
                    option_reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let e = &exports[i];
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&e.device.size().to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                option_reply(w, opt, REP_INFO, &info)?;
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(w, opt, REP_INFO, &bs)?;
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    option_reply(w, opt, REP_INFO, &d)?;
                }
                if reqs.contains(&INFO_DESCRIPTION) {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(w, opt, REP_INFO, &d)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    w.flush()?;
                    return Ok(Some(Session { export: i, structured }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else {
                    structured = true;
                    option_reply(w, opt, REP_ACK, &[])?;
                }
            }
            OPT_STARTTLS => option_reply(w, opt, REP_ERR_POLICY, b"TLS is not offered")?,
            _ => option_reply(w, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// A request of the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's cookie.
    pub handle: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u32,
}

/// The bytes a client sends for option `kind` with `data` (the server's
/// counterpart of [`negotiate`]; for tests, fuzz seeds and tools).
pub fn encode_option(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The 28-byte request header [`parse_request`] reads.
pub fn encode_request(kind: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(28);
    v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

/// Parses a 28-byte request header.
pub fn parse_request(h: &[u8; 28]) -> Result<Request, NbdError> {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != REQUEST_MAGIC {
        return Err(protocol(format!("bad request magic {magic:#x}")));
    }
    Ok(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        handle: u64::from_be_bytes(h[8..16].try_into().unwrap_or_default()),
        offset: u64::from_be_bytes(h[16..24].try_into().unwrap_or_default()),
        length: u32::from_be_bytes(h[24..28].try_into().unwrap_or_default()),
    })
}

/// Checks a request against the device; `Err` is the errno to reply with.
fn validate(req: &Request, size: u64) -> Result<(), DevError> {
    let inval = |m: String| Err(DevError { errno: EINVAL, message: m });
    // FUA is valid on every command (a server must accept it even where it
    // means nothing, as on READ and FLUSH); NO_HOLE only on WRITE_ZEROES.
    let allowed = match req.kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !allowed != 0 {
        return inval(format!("flags {:#x} not supported for this command", req.flags));
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.length > MAX_REQUEST {
        return inval(format!("{} bytes is more than the {MAX_REQUEST}-byte maximum", req.length));
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        match req.offset.checked_add(u64::from(req.length)) {
            Some(end) if end <= size => {}
            _ => {
                return inval(format!("{} bytes at {} pass the end of the {size}-byte export", req.length, req.offset));
            }
        }
    }
    Ok(())
}

/// Sends replies; shared by the workers of a connection.
struct Replier<W> {
    w: Mutex<W>,
    structured: bool,
}

/// Room for the header of a successful read reply, before its data.
const READ_HEADER: usize = 32;

impl<W: Write> Replier<W> {
    fn write(&self, msg: &[u8]) -> io::Result<()> {
        let mut w = self.w.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(msg)?;
        w.flush()
    }

    /// Replies with an error, or success without data.
    fn send(&self, req: &Request, result: Result<(), DevError>) -> io::Result<()> {
        let mut msg = Vec::with_capacity(64);
        match (&result, self.structured) {
            (Err(e), true) => {
                let text = &e.message.as_bytes()[..e.message.len().min(4096)];
                msg.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                msg.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                msg.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
                msg.extend_from_slice(&req.handle.to_be_bytes());
                msg.extend_from_slice(&(6 + text.len() as u32).to_be_bytes());
                msg.extend_from_slice(&e.errno.to_be_bytes());
                msg.extend_from_slice(&(text.len() as u16).to_be_bytes());
                msg.extend_from_slice(text);
            }
            (result, _) => {
                let errno = result.as_ref().err().map(|e| e.errno).unwrap_or(0);
                msg.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                msg.extend_from_slice(&errno.to_be_bytes());
                msg.extend_from_slice(&req.handle.to_be_bytes());
            }
        }
        self.write(&msg)
    }

    /// Replies to a successful read whose data fills `buf[READ_HEADER..]`:
    /// the header goes in front, and the reply leaves in one write.
    fn send_read(&self, req: &Request, buf: &mut [u8]) -> io::Result<()> {
        let data_len = buf.len() - READ_HEADER;
        if data_len == 0 && self.structured {
            // An OFFSET_DATA chunk must carry at least one byte.
            let mut msg = Vec::with_capacity(20);
            msg.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            msg.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            msg.extend_from_slice(&REPLY_TYPE_NONE.to_be_bytes());
            msg.extend_from_slice(&req.handle.to_be_bytes());
            msg.extend_from_slice(&0u32.to_be_bytes());
            return self.write(&msg);
        }
        let start = if self.structured {
            let h = &mut buf[..READ_HEADER];
            h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            h[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            h[6..8].copy_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
            h[8..16].copy_from_slice(&req.handle.to_be_bytes());
            h[16..20].copy_from_slice(&(8 + data_len as u32).to_be_bytes());
            h[20..28].copy_from_slice(&req.offset.to_be_bytes());
            // 28..32 is data: the structured header is 28 bytes with its offset.
            4
        } else {
            let h = &mut buf[16..READ_HEADER];
            h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            h[4..8].copy_from_slice(&0u32.to_be_bytes());
            h[8..16].copy_from_slice(&req.handle.to_be_bytes());
            16
        };
        if self.structured {
            // Shift the 28-byte header so it ends where the data starts.
            buf.copy_within(0..28, start);
        }
        self.write(&buf[start..])
    }
}

/// Executes one request and replies to it.
fn execute<W: Write>(dev: &dyn BlockDevice, rep: &Replier<W>, req: Request, payload: Vec<u8>) -> io::Result<()> {
    if let Err(e) = validate(&req, dev.size()) {
        return rep.send(&req, Err(e));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (off, len) = (req.offset, u64::from(req.length));
    match req.kind {
        CMD_READ => {
            let mut buf = vec![0u8; READ_HEADER + req.length as usize];
            match dev.read(off, &mut buf[READ_HEADER..]) {
                Ok(()) => rep.send_read(&req, &mut buf),
                Err(e) => rep.send(&req, Err(e)),
            }
        }
        CMD_WRITE => rep.send(&req, dev.write(off, &payload, fua)),
        CMD_FLUSH => rep.send(&req, dev.flush()),
        CMD_TRIM => rep.send(&req, dev.trim(off, len).and_then(|()| if fua { dev.flush() } else { Ok(()) })),
        CMD_WRITE_ZEROES => rep.send(&req, dev.write_zeroes(off, len, fua)),
        other => {
            let e = DevError { errno: EINVAL, message: format!("command {other} not supported") };
            rep.send(&req, Err(e))
        }
    }
}

/// Counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Requests served.
    pub requests: u64,
}

/// Serves the transmission phase on `r`/`w` until `NBD_CMD_DISC`, the end
/// of the stream, or a protocol violation. Reads that may block
/// ([`BlockDevice::read_may_block`]) run on up to `workers` threads and
/// reply when they complete, so replies go out of order; every other
/// request runs at once on the reading thread. With `workers` 0 every
/// request runs in order on the reading thread (for fuzzing). In-flight
/// requests always finish and are replied to before this returns.
pub fn transmit<R: Read, W: Write + Send + 'static>(
    r: R,
    w: W,
    dev: Arc<dyn BlockDevice>,
    structured: bool,
    workers: usize,
) -> Result<ConnStats, NbdError> {
    let mut r = io::BufReader::with_capacity(256 << 10, r);
    let rep = Arc::new(Replier { w: Mutex::new(w), structured });
    let mut stats = ConnStats::default();
    let (tx, rx) = crossbeam_channel::bounded::<(Request, Vec<u8>)>(64);
    let failed = Arc::new(AtomicBool::new(false));
    let pool: Vec<_> = (0..workers)
        .map(|_| {
            let (rx, rep, dev, failed) = (rx.clone(), rep.clone(), dev.clone(), failed.clone());
            std::thread::spawn(move || {
                while let Ok((req, payload)) = rx.recv() {
                    if execute(&*dev, &rep, req, payload).is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let result = (|| -> Result<(), NbdError> {
        loop {
            let mut h = [0u8; 28];
            match r.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let req = parse_request(&h)?;
            stats.requests += 1;
            if req.kind == CMD_DISC {
                return Ok(());
            }
            let mut payload = Vec::new();
            if req.kind == CMD_WRITE {
                if req.length > MAX_REQUEST {
                    // The payload cannot be skipped sensibly: reply, then disconnect.
                    let e = DevError { errno: EINVAL, message: format!("write of {} bytes", req.length) };
                    rep.send(&req, Err(e))?;
                    return Err(protocol(format!("write of {} bytes", req.length)));
                }
                payload = vec![0u8; req.length as usize];
                r.read_exact(&mut payload)?;
            }
            if failed.load(Ordering::SeqCst) {
                return Err(protocol("a reply could not be sent"));
            }
            let slow = req.kind == CMD_READ && dev.read_may_block(req.offset, u64::from(req.length));
            if workers == 0 || !slow {
                execute(&*dev, &rep, req, payload)?;
            } else if tx.send((req, payload)).is_err() {
                return Err(protocol("workers stopped"));
            }
        }
    })();
    drop(tx);
    for t in pool {
        let _ = t.join();
    }
    result.map(|_| stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports(size: usize) -> (Vec<Export>, Arc<MemDevice>) {
        let dev = Arc::new(MemDevice::new(size));
        (vec![Export { name: "disk".into(), description: "a test disk".into(), device: dev.clone() }], dev)
    }

    use super::encode_option as opt;
    use super::encode_request as request;

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        opt(OPT_GO, &d)
    }

    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut at = 18;
        while at + 20 <= out.len() {
            let magic = u64::from_be_bytes(out[at..at + 8].try_into().unwrap());
            assert_eq!(magic, REP_MAGIC);
            let opt = u32::from_be_bytes(out[at + 8..at + 12].try_into().unwrap());
            let kind = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap());
            let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
            v.push((opt, kind, out[at + 20..at + 20 + len].to_vec()));
            at += 20 + len;
        }
        v
    }

    #[test]
    fn handshake_go_list_info_and_errors() {
        let (ex, _) = exports(1 << 20);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(opt(OPT_LIST, &[]));
        input.extend(opt(OPT_LIST, b"x"));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(99, b"whatever"));
        input.extend(opt(OPT_STARTTLS, &[]));
        input.extend(opt(OPT_INFO, &[0, 0, 0, 9, 1]));
        input.extend(go("nope"));
        input.extend(go("disk"));
        let mut out = Vec::new();
        let s = negotiate(&mut &input[..], &mut out, &ex).unwrap().unwrap();
        assert_eq!(s, Session { export: 0, structured: true });
        assert_eq!(&out[..8], &NBDMAGIC.to_be_bytes());
        let r = replies(&out);
        let kinds: Vec<(u32, u32)> = r.iter().map(|(o, k, _)| (*o, *k)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_LIST, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (99, REP_ERR_UNSUP),
                (OPT_STARTTLS, REP_ERR_POLICY),
                (OPT_INFO, REP_ERR_INVALID),
                (OPT_GO, REP_ERR_UNKNOWN),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(&r[0].2[4..8], b"disk");
        // INFO_EXPORT: size and flags.
        assert_eq!(&r[8].2[2..10], &(1u64 << 20).to_be_bytes());
        assert_eq!(&r[8].2[10..12], &TRANSMISSION_FLAGS.to_be_bytes());
        // Block sizes 1 / 4096 / 32 MiB.
        assert_eq!(&r[9].2[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
        assert_eq!(&r[10].2[2..], b"disk");
    }

    #[test]
    fn export_name_and_abort_and_bad_magic() {
        let (ex, _) = exports(4096);
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b""));
        let mut out = Vec::new();
        assert_eq!(
            negotiate(&mut &input[..], &mut out, &ex).unwrap().unwrap(),
            Session { export: 0, structured: false }
        );
        assert_eq!(out.len(), 18 + 10, "no zeroes");
        // Structured replies, once acknowledged, hold after EXPORT_NAME too.
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_EXPORT_NAME, b"disk"));
        let s = negotiate(&mut &input[..], &mut Vec::new(), &ex).unwrap().unwrap();
        assert_eq!(s, Session { export: 0, structured: true });
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b"missing"));
        assert!(negotiate(&mut &input[..], &mut Vec::new(), &ex).unwrap().is_none());
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_ABORT, &[]));
        assert!(negotiate(&mut &input[..], &mut Vec::new(), &ex).unwrap().is_none());
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert!(matches!(negotiate(&mut &input[..], &mut Vec::new(), &ex), Err(NbdError::Protocol(_))));
        let input = 0x80u32.to_be_bytes().to_vec();
        assert!(matches!(negotiate(&mut &input[..], &mut Vec::new(), &ex), Err(NbdError::Protocol(_))));
        // A truncated stream is an I/O error, not a panic.
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(&opt(OPT_GO, &[0, 0, 0, 4])[..20]);
        assert!(matches!(negotiate(&mut &input[..], &mut Vec::new(), &ex), Err(NbdError::Io(_))));
    }

    /// A writer whose contents the test can read after the connection ends.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn simple_errors(out: &[u8]) -> Vec<(u64, u32)> {
        let mut v = Vec::new();
        let mut at = 0;
        while at + 16 <= out.len() {
            assert_eq!(&out[at..at + 4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
            let err = u32::from_be_bytes(out[at + 4..at + 8].try_into().unwrap());
            let handle = u64::from_be_bytes(out[at + 8..at + 16].try_into().unwrap());
            v.push((handle, err));
            at += 16;
            if handle == 100 && err == 0 {
                at += 512; // the read's data
            }
        }
        v
    }

    #[test]
    fn requests_are_checked() {
        let (ex, dev) = exports(1 << 20);
        let mut input = request(CMD_WRITE, CMD_FLAG_FUA, 1, 512, 4);
        input.extend_from_slice(b"abcd");
        input.extend(request(CMD_WRITE, 0, 2, (1 << 20) - 2, 4)); // past the end: payload skipped
        input.extend_from_slice(b"wxyz");
        input.extend(request(CMD_READ, 0, 3, 0, MAX_REQUEST + 1));
        input.extend(request(CMD_READ, 0, 4, u64::MAX, 1));
        input.extend(request(CMD_READ, CMD_FLAG_NO_HOLE, 5, 0, 1));
        input.extend(request(42, 0, 6, 0, 0));
        input.extend(request(CMD_FLUSH, 0, 7, 0, 0));
        input.extend(request(CMD_TRIM, 0, 8, 0, 4096));
        input.extend(request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 9, 514, 1));
        input.extend(request(CMD_READ, 0, 100, 0, 512));
        // FUA is accepted on every command, even where it means nothing.
        input.extend(request(CMD_FLUSH, CMD_FLAG_FUA, 12, 0, 0));
        input.extend(request(CMD_TRIM, CMD_FLAG_FUA, 13, 4096, 4096));
        input.extend(request(CMD_DISC, 0, 10, 0, 0));
        input.extend(request(CMD_FLUSH, 0, 11, 0, 0)); // after DISC: never served
        let out = Shared::default();
        let stats = transmit(&input[..], out.clone(), ex[0].device.clone(), false, 0).unwrap();
        assert_eq!(stats.requests, 13);
        let replies = simple_errors(&out.0.lock().unwrap());
        assert_eq!(
            replies,
            vec![
                (1, 0),
                (2, EINVAL),
                (3, EINVAL),
                (4, EINVAL),
                (5, EINVAL),
                (6, EINVAL),
                (7, 0),
                (8, 0),
                (9, 0),
                (100, 0),
                (12, 0),
                (13, 0)
            ]
        );
        assert_eq!(&dev.contents()[512..516], b"ab\0d");
        // FLUSH, FLUSH with FUA, and TRIM with FUA made durable.
        assert_eq!(dev.flushes.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn oversized_write_disconnects_after_replying() {
        let (ex, _) = exports(1 << 20);
        let input = request(CMD_WRITE, 0, 1, 0, MAX_REQUEST + 1);
        let out = Shared::default();
        let r = transmit(&input[..], out.clone(), ex[0].device.clone(), false, 2);
        assert!(matches!(r, Err(NbdError::Protocol(_))));
        assert_eq!(simple_errors(&out.0.lock().unwrap()), vec![(1, EINVAL)]);
        let r = transmit(&[0u8; 28][..], Shared::default(), ex[0].device.clone(), false, 2);
        assert!(matches!(r, Err(NbdError::Protocol(_))));
    }

    /// Reads at offset 0 are slow and run on workers.
    struct Slow(MemDevice);

    impl BlockDevice for Slow {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
            if off == 0 {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            self.0.read(off, buf)
        }
        fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
            self.0.write(off, data, fua)
        }
        fn flush(&self) -> Result<(), DevError> {
            self.0.flush()
        }
        fn trim(&self, off: u64, len: u64) -> Result<(), DevError> {
            self.0.trim(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError> {
            self.0.write_zeroes(off, len, fua)
        }
        fn read_may_block(&self, off: u64, _len: u64) -> bool {
            off == 0
        }
    }

    #[test]
    fn slow_reads_reply_out_of_order() {
        let dev: Arc<dyn BlockDevice> = Arc::new(Slow(MemDevice::new(1 << 20)));
        let mut input = request(CMD_READ, 0, 1, 0, 16);
        input.extend(request(CMD_WRITE, 0, 2, 4096, 2));
        input.extend_from_slice(b"hi");
        input.extend(request(CMD_READ, 0, 3, 4096, 2));
        let out = Shared::default();
        transmit(&input[..], out.clone(), dev, false, 2).unwrap();
        let out = out.0.lock().unwrap().clone();
        let handle = |at: usize| u64::from_be_bytes(out[at + 8..at + 16].try_into().unwrap());
        // The write and the fast read reply while the slow read waits.
        assert_eq!((handle(0), handle(16), handle(34)), (2, 3, 1));
        assert_eq!(&out[32..34], b"hi");
    }

    #[test]
    fn structured_replies() {
        let (ex, dev) = exports(1 << 20);
        dev.write(0, b"hello", false).unwrap();
        let mut input = request(CMD_READ, 0, 7, 0, 5);
        input.extend(request(CMD_READ, 0, 8, 1 << 20, 5));
        input.extend(request(CMD_READ, 0, 9, 0, 0));
        let out = Shared::default();
        transmit(&input[..], out.clone(), ex[0].device.clone(), true, 0).unwrap();
        let out = out.0.lock().unwrap().clone();
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0, 1, 0, 1]); // DONE, OFFSET_DATA
        assert_eq!(&out[16..20], &13u32.to_be_bytes());
        assert_eq!(&out[28..33], b"hello");
        let e = &out[33..];
        assert_eq!(&e[4..8], &[0, 1, 0x80, 1]); // DONE, ERROR
        assert_eq!(&e[20..24], &EINVAL.to_be_bytes());
        let len = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert!(String::from_utf8_lossy(&e[26..26 + len]).contains("pass the end"));
        // A zero-length read succeeds with a NONE chunk: OFFSET_DATA needs data.
        let z = &e[26 + len..];
        assert_eq!(z.len(), 20);
        assert_eq!(&z[4..8], &[0, 1, 0, 0]); // DONE, NONE
        assert_eq!(&z[8..16], &9u64.to_be_bytes());
        assert_eq!(&z[16..20], &0u32.to_be_bytes());
    }
}
