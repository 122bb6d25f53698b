//! The transmission phase: requests read one after another, each checked
//! against the export, executed, and replied to — fast ones at once on the
//! reading thread, reads that may block (and writes, on a device whose
//! writes may) on worker threads, so replies may go out of order.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use zerocopy::IntoBytes;
use zerocopy::network_endian::{U16, U32, U64};

use super::device::{BlockDevice, DevError, Extent};
use super::error::{NbdError, Violation};
use super::wire::*;

/// Room for the header of a successful read reply, before its data: the
/// larger of the two headers, so either fits in front of the data and the
/// reply leaves in one write.
const READ_HEADER: usize =
    max(max(size_of::<SimpleReply>(), size_of::<OffsetDataHeader>()), size_of::<ExtendedReplyHeader>() + 8);
/// Most extents in one block status reply (a client asks again for the
/// rest).
const MAX_EXTENTS: usize = 1024;
/// Requests read ahead of the workers, per connection.
const QUEUE_DEPTH: usize = 64;
/// Buffer of the reading side: many small requests per system call.
const READ_BUFFER: usize = 256 << 10;
/// Most bytes of replies held back while more requests are already read:
/// they leave together, in one system call, before the reading thread
/// could wait for the client.
const HELD_REPLIES: usize = 64 << 10;

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// How requests and replies are framed on a connection, as the handshake
/// agreed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Framing {
    /// Structured replies.
    pub structured: bool,
    /// Extended headers: 32-byte requests and replies, 64-bit lengths
    /// (implies structured replies).
    pub extended: bool,
    /// `base:allocation` selected: `NBD_CMD_BLOCK_STATUS` is served.
    pub block_status: bool,
}

impl From<bool> for Framing {
    /// Compact headers, with or without structured replies.
    fn from(structured: bool) -> Self {
        Self { structured, ..Self::default() }
    }
}

/// Counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Requests served.
    pub requests: u64,
}

/// How far a connection has got, readable by others while it is served:
/// what a server that stops can report of the requests it cut short.
#[derive(Debug, Default)]
pub struct Progress {
    received: AtomicU64,
    answered: AtomicU64,
}

impl Progress {
    /// Requests read that call for a reply (every one but `NBD_CMD_DISC`).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Requests whose reply was sent whole.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    /// Requests read and not (yet) answered.
    pub fn unanswered(&self) -> u64 {
        // Read in this order, an answer is never counted before its request.
        let answered = self.answered();
        self.received().saturating_sub(answered)
    }
}

/// Serves the transmission phase on `r`/`w` until `NBD_CMD_DISC`, the end
/// of the stream, or a protocol violation. Reads that may block
/// ([`BlockDevice::read_may_block`]), and writes that may
/// ([`BlockDevice::write_may_block`]), run on up to `workers` threads
/// and reply when they complete, so replies go out of order; every other
/// request runs at once on the reading thread. With `workers` 0 every
/// request runs in order on the reading thread (for fuzzing). In-flight
/// requests finish and are replied to before this returns, unless a reply
/// cannot be sent: the connection is then broken, and the requests still
/// waiting for a worker are dropped unanswered rather than executed.
pub fn transmit<R: Read, W: Write + Send + 'static>(
    r: R,
    w: W,
    dev: Arc<dyn BlockDevice>,
    framing: impl Into<Framing>,
    workers: usize,
) -> Result<ConnStats, NbdError> {
    transmit_with(r, w, dev, framing, workers, Arc::default())
}

/// [`transmit`], counting its requests in `progress` as it goes.
pub fn transmit_with<R: Read, W: Write + Send + 'static>(
    r: R,
    w: W,
    dev: Arc<dyn BlockDevice>,
    framing: impl Into<Framing>,
    workers: usize,
    progress: Arc<Progress>,
) -> Result<ConnStats, NbdError> {
    let framing = framing.into();
    let framing = Framing { structured: framing.structured || framing.extended, ..framing };
    let conn = Connection {
        r: io::BufReader::with_capacity(READ_BUFFER, r),
        rep: Arc::new(Replier { w: Mutex::new(Out { w, held: Vec::new(), held_count: 0 }), framing, progress }),
        dev,
        failed: Arc::new(AtomicBool::new(false)),
        stats: ConnStats::default(),
    };
    let (tx, rx) = crossbeam_channel::bounded::<(Request, Vec<u8>)>(QUEUE_DEPTH);
    let pool: Vec<_> = (0..workers).map(|_| conn.spawn_worker(rx.clone())).collect();
    let result = conn.serve(workers > 0, &tx);
    drop(tx);
    for t in pool {
        let _ = t.join();
    }
    result
}

/// One connection's reading side.
struct Connection<R, W> {
    r: io::BufReader<R>,
    rep: Arc<Replier<W>>,
    dev: Arc<dyn BlockDevice>,
    /// A worker could not send a reply.
    failed: Arc<AtomicBool>,
    stats: ConnStats,
}

impl<R: Read, W: Write + Send + 'static> Connection<R, W> {
    /// A worker that executes the requests sent on `rx` until it closes.
    fn spawn_worker(&self, rx: Receiver<(Request, Vec<u8>)>) -> JoinHandle<()> {
        let (rep, dev, failed) = (self.rep.clone(), self.dev.clone(), self.failed.clone());
        std::thread::spawn(move || {
            while let Ok((req, payload)) = rx.recv() {
                // Once a reply could not be sent no other one can be: the
                // requests left are dropped, not executed for nobody.
                if failed.load(Ordering::SeqCst) {
                    continue;
                }
                if execute(&*dev, &rep, req, payload, false).is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
            }
        })
    }

    /// Reads and dispatches requests until the client is done; slow reads
    /// go to the workers on `tx` if `pooled`.
    fn serve(mut self, pooled: bool, tx: &Sender<(Request, Vec<u8>)>) -> Result<ConnStats, NbdError> {
        let rep = self.rep.clone();
        let served = self.serve_requests(pooled, tx);
        // Replies held back go out whatever ended the connection.
        let released = rep.release();
        let stats = served?;
        released?;
        Ok(stats)
    }

    /// Size of a request header on this connection.
    fn header_len(&self) -> usize {
        if self.rep.framing.extended { size_of::<ExtendedRequestHeader>() } else { size_of::<RequestHeader>() }
    }

    /// Sends the replies held back unless the next `need` bytes are read
    /// already: the reading thread never waits for the client while a reply
    /// it owes is held.
    fn release_unless_buffered(&self, need: usize) -> io::Result<()> {
        if self.r.buffer().len() < need { self.rep.release() } else { Ok(()) }
    }

    /// [`Connection::serve`], without the last release of held replies.
    fn serve_requests(&mut self, pooled: bool, tx: &Sender<(Request, Vec<u8>)>) -> Result<ConnStats, NbdError> {
        loop {
            self.release_unless_buffered(self.header_len())?;
            let header = if self.rep.framing.extended {
                read_header::<ExtendedRequestHeader, _>(&mut self.r).map(|h| h.parse())
            } else {
                read_header::<RequestHeader, _>(&mut self.r).map(|h| h.parse())
            };
            let req = match header {
                Ok(req) => req?,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(self.stats),
                Err(e) => return Err(e.into()),
            };
            self.stats.requests += 1;
            if req.kind == CMD_DISC {
                return Ok(self.stats);
            }
            self.rep.progress.received.fetch_add(1, Ordering::SeqCst);
            let payload = self.payload(&req)?;
            if self.failed.load(Ordering::SeqCst) {
                return Err(Violation::ReplyFailed.into());
            }
            let slow = match req.kind {
                CMD_READ | CMD_CACHE => self.dev.read_may_block(req.offset, req.length),
                CMD_BLOCK_STATUS => true,
                CMD_WRITE | CMD_WRITE_ZEROES => {
                    self.dev.write_may_block(req.offset, req.length, req.flags & CMD_FLAG_FUA != 0)
                }
                _ => false,
            };
            if !pooled || !slow {
                // With the next request read already, its reply may join
                // this one's.
                let hold = self.r.buffer().len() >= self.header_len();
                execute(&*self.dev, &self.rep, req, payload, hold)?;
            } else {
                // Every worker busy: the reading thread may wait here.
                if tx.is_full() {
                    self.rep.release()?;
                }
                if tx.send((req, payload)).is_err() {
                    return Err(Violation::WorkersStopped.into());
                }
            }
        }
    }

    /// The payload of a write (nothing for other requests; with extended
    /// headers, whatever `PAYLOAD_LEN` says follows). One too large to skip
    /// sensibly is refused, and the connection ends.
    fn payload(&mut self, req: &Request) -> Result<Vec<u8>, NbdError> {
        // A write's length is its payload's, with or without `PAYLOAD_LEN`
        // (qemu leaves the flag off); with extended headers any request
        // may say it carries one.
        let has_payload = req.kind == CMD_WRITE || (self.rep.framing.extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        if !has_payload {
            return Ok(Vec::new());
        }
        if req.length > u64::from(MAX_REQUEST) {
            let e = DevError { errno: EINVAL, message: format!("a payload of {} bytes", req.length) };
            self.rep.send(false, req, Err(e))?;
            return Err(Violation::WriteTooLarge { length: req.length }.into());
        }
        self.release_unless_buffered(req.length as usize)?;
        let mut payload = vec![0u8; req.length as usize];
        self.r.read_exact(&mut payload)?;
        Ok(payload)
    }
}

/// Checks a request against the device; `Err` is the errno to reply with.
fn validate(req: &Request, size: u64, framing: Framing) -> Result<(), DevError> {
    let inval = |m: String| Err(DevError { errno: EINVAL, message: m });
    // FUA is valid on every command (a server must accept it even where it
    // means nothing, as on READ and FLUSH); NO_HOLE only on WRITE_ZEROES.
    let allowed = match req.kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    } | if framing.extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
    if req.flags & !allowed != 0 {
        return inval(format!("flags {:#x} not supported for this command", req.flags));
    }
    if req.kind != CMD_WRITE && req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        return inval("only a write carries a payload here".into());
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.length > u64::from(MAX_REQUEST) {
        return inval(format!("{} bytes is more than the {MAX_REQUEST}-byte maximum", req.length));
    }
    if req.kind == CMD_BLOCK_STATUS {
        if !framing.block_status {
            return inval("block status without a metadata context selected (NBD_OPT_SET_META_CONTEXT)".into());
        }
        if req.length == 0 {
            return inval("block status of 0 bytes".into());
        }
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE | CMD_BLOCK_STATUS) {
        match req.offset.checked_add(req.length) {
            Some(end) if end <= size => {}
            _ => {
                // The protocol asks for ENOSPC when a write passes the end
                // (as a file system answers), EINVAL for reads and trims.
                let errno = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
                let message = format!("{} bytes at {} pass the end of the {size}-byte export", req.length, req.offset);
                return Err(DevError { errno, message });
            }
        }
    }
    Ok(())
}

/// Sends replies; shared by the workers of a connection.
struct Replier<W> {
    w: Mutex<Out<W>>,
    framing: Framing,
    progress: Arc<Progress>,
}

/// The sending side, and the replies held back to leave with the next.
struct Out<W> {
    w: W,
    held: Vec<u8>,
    held_count: u64,
}

impl<W: Write> Out<W> {
    /// Sends the held replies, then `msg` (counted as `n` replies).
    fn send(&mut self, msg: &[u8], n: u64, progress: &Progress) -> io::Result<()> {
        let count = std::mem::take(&mut self.held_count) + n;
        if self.held.is_empty() {
            self.w.write_all(msg)?;
        } else {
            self.held.extend_from_slice(msg);
            let sent = self.w.write_all(&self.held);
            // Sent or not, they are gone; the buffer is kept for the next.
            self.held.clear();
            sent?;
        }
        self.w.flush()?;
        progress.answered.fetch_add(count, Ordering::SeqCst);
        Ok(())
    }
}

impl<W: Write> Replier<W> {
    /// Sends one whole reply, after those held back; with `hold`, a small
    /// one may wait to leave with the next (the reading thread holds only
    /// while it has the next request read, and releases before it could
    /// wait for the client).
    fn write(&self, hold: bool, msg: &[u8]) -> io::Result<()> {
        let mut out = self.w.lock().unwrap_or_else(|e| e.into_inner());
        if hold && out.held.len() + msg.len() <= HELD_REPLIES {
            out.held.extend_from_slice(msg);
            out.held_count += 1;
            return Ok(());
        }
        out.send(msg, 1, &self.progress)
    }

    /// Sends the replies held back, if any.
    fn release(&self) -> io::Result<()> {
        let mut out = self.w.lock().unwrap_or_else(|e| e.into_inner());
        if out.held_count == 0 {
            return Ok(());
        }
        out.send(&[], 0, &self.progress)
    }

    /// The header of the last reply chunk of `req`, of `kind` with `length`
    /// bytes of payload: extended or structured, as negotiated.
    fn chunk(&self, req: &Request, kind: u16, length: usize) -> Vec<u8> {
        if self.framing.extended {
            ExtendedReplyHeader {
                magic: EXTENDED_REPLY_MAGIC.into(),
                flags: REPLY_FLAG_DONE.into(),
                kind: kind.into(),
                handle: req.handle.into(),
                offset: req.offset.into(),
                length: (length as u64).into(),
            }
            .as_bytes()
            .to_vec()
        } else {
            StructuredReplyHeader {
                magic: STRUCTURED_REPLY_MAGIC.into(),
                flags: REPLY_FLAG_DONE.into(),
                kind: kind.into(),
                handle: req.handle.into(),
                length: (length as u32).into(),
            }
            .as_bytes()
            .to_vec()
        }
    }

    /// Replies with an error, or success without data.
    fn send(&self, hold: bool, req: &Request, result: Result<(), DevError>) -> io::Result<()> {
        match (result, self.framing.structured) {
            (Err(e), true) => {
                let text = &e.message.as_bytes()[..e.message.len().min(MAX_ERROR_MESSAGE)];
                let mut msg = self.chunk(req, REPLY_TYPE_ERROR, 6 + text.len());
                msg.extend_from_slice(U32::new(e.errno).as_bytes());
                msg.extend_from_slice(U16::new(text.len() as u16).as_bytes());
                msg.extend_from_slice(text);
                self.write(hold, &msg)
            }
            // Extended headers have no simple reply.
            (Ok(()), true) if self.framing.extended => self.write(hold, &self.chunk(req, REPLY_TYPE_NONE, 0)),
            (result, _) => {
                let errno = result.err().map_or(0, |e| e.errno);
                let reply =
                    SimpleReply { magic: SIMPLE_REPLY_MAGIC.into(), error: errno.into(), handle: req.handle.into() };
                self.write(hold, reply.as_bytes())
            }
        }
    }

    /// Replies to a successful read whose data fills `buf[READ_HEADER..]`:
    /// the header goes right in front, and the reply leaves in one write.
    fn send_read(&self, hold: bool, req: &Request, buf: &mut [u8]) -> io::Result<()> {
        let data_len = buf.len() - READ_HEADER;
        let header = if !self.framing.structured {
            SimpleReply { magic: SIMPLE_REPLY_MAGIC.into(), error: 0.into(), handle: req.handle.into() }
                .as_bytes()
                .to_vec()
        } else if data_len == 0 {
            // An OFFSET_DATA chunk must carry at least one byte.
            return self.write(hold, &self.chunk(req, REPLY_TYPE_NONE, 0));
        } else {
            let mut h = self.chunk(req, REPLY_TYPE_OFFSET_DATA, 8 + data_len);
            h.extend_from_slice(U64::new(req.offset).as_bytes());
            h
        };
        let start = READ_HEADER - header.len();
        buf[start..READ_HEADER].copy_from_slice(&header);
        self.write(hold, &buf[start..])
    }

    /// Replies to a block status request with `extents` of
    /// `base:allocation`: 32-bit lengths in a compact reply, 64-bit ones
    /// with extended headers.
    fn send_extents(&self, hold: bool, req: &Request, extents: &[Extent]) -> io::Result<()> {
        let mut payload = U32::new(BASE_ALLOCATION_ID).as_bytes().to_vec();
        let kind = if self.framing.extended {
            payload.extend_from_slice(U32::new(extents.len() as u32).as_bytes());
            for e in extents {
                payload.extend_from_slice(U64::new(e.len).as_bytes());
                payload.extend_from_slice(U64::new(u64::from(e.flags)).as_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            for e in extents {
                payload.extend_from_slice(U32::new(e.len as u32).as_bytes());
                payload.extend_from_slice(U32::new(e.flags).as_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS
        };
        let mut msg = self.chunk(req, kind, payload.len());
        msg.extend_from_slice(&payload);
        self.write(hold, &msg)
    }
}

/// The extents to report for `[off, off + len)`: what the device says,
/// trimmed to the range, merged where alike, at most [`MAX_EXTENTS`] (one
/// with `REQ_ONE`), each below 4 GiB for a compact reply.
fn extents(dev: &dyn BlockDevice, off: u64, len: u64, one: bool, extended: bool) -> Result<Vec<Extent>, DevError> {
    let cap = if extended { u64::MAX } else { u64::from(u32::MAX) & !4095 };
    let mut out: Vec<Extent> = Vec::new();
    let mut left = len;
    for e in dev.extents(off, len)? {
        if left == 0 {
            break;
        }
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        match out.last_mut() {
            Some(last) if last.flags == e.flags && last.len.saturating_add(n) <= cap => last.len += n,
            _ => {
                if out.len() == if one { 1 } else { MAX_EXTENTS } {
                    break;
                }
                out.push(Extent { len: n.min(cap), flags: e.flags });
                // An extent cut at the cap ends the reply: what follows it
                // would be reported at the wrong offset.
                if n > cap {
                    break;
                }
            }
        }
    }
    if out.is_empty() {
        // A device that said nothing: all data.
        out.push(Extent { len: len.min(cap), flags: 0 });
    }
    Ok(out)
}

/// Executes one request and replies to it; with `hold`, the reply may wait
/// to leave with the next ([`Replier::write`]).
fn execute<W: Write>(
    dev: &dyn BlockDevice,
    rep: &Replier<W>,
    req: Request,
    payload: Vec<u8>,
    hold: bool,
) -> io::Result<()> {
    if let Err(e) = validate(&req, dev.size(), rep.framing) {
        return rep.send(hold, &req, Err(e));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (off, len) = (req.offset, req.length);
    match req.kind {
        CMD_READ => {
            let mut buf = vec![0u8; READ_HEADER + req.length as usize];
            match dev.read(off, &mut buf[READ_HEADER..]) {
                Ok(()) => rep.send_read(hold, &req, &mut buf),
                Err(e) => rep.send(hold, &req, Err(e)),
            }
        }
        CMD_WRITE => rep.send(hold, &req, dev.write(off, &payload, fua)),
        CMD_FLUSH => rep.send(hold, &req, dev.flush()),
        CMD_TRIM => rep.send(hold, &req, dev.trim(off, len).and_then(|()| if fua { dev.flush() } else { Ok(()) })),
        // Zeros are stored through the cache like any write: never faster
        // than writing them, so a fast zero is refused at once, as the
        // protocol asks, and the client writes them itself (or need not).
        CMD_WRITE_ZEROES if req.flags & CMD_FLAG_FAST_ZERO != 0 => {
            let e = DevError { errno: ENOTSUP, message: "zeroing is not faster than writing zeros here".into() };
            rep.send(hold, &req, Err(e))
        }
        CMD_WRITE_ZEROES => rep.send(hold, &req, dev.write_zeroes(off, len, fua)),
        CMD_CACHE => rep.send(hold, &req, dev.cache(off, len)),
        CMD_BLOCK_STATUS => {
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            match extents(dev, off, len, one, rep.framing.extended) {
                Ok(e) => rep.send_extents(hold, &req, &e),
                Err(e) => rep.send(hold, &req, Err(e)),
            }
        }
        other => {
            let e = DevError { errno: EINVAL, message: format!("command {other} not supported") };
            rep.send(hold, &req, Err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use zerocopy::FromBytes;

    use super::*;
    use crate::nbd::MemDevice;
    use crate::nbd::test_util::{Shared, exports};

    use super::encode_request as request;

    /// The (handle, error) of each simple reply in `out`, skipping the data
    /// of handle 100's successful 512-byte read.
    fn simple_errors(out: &[u8]) -> Vec<(u64, u32)> {
        let mut v = Vec::new();
        let mut rest = out;
        while let Ok((reply, tail)) = SimpleReply::read_from_prefix(rest) {
            assert_eq!(reply.magic.get(), SIMPLE_REPLY_MAGIC);
            let (handle, err) = (reply.handle.get(), reply.error.get());
            v.push((handle, err));
            rest = if handle == 100 && err == 0 { &tail[512..] } else { tail };
        }
        v
    }

    /// Hands out its chunks one per read, noting how many bytes of replies
    /// had gone out each time it was asked for more: where a socket would
    /// make the server wait for the client.
    struct Chunks {
        chunks: std::collections::VecDeque<Vec<u8>>,
        out: CountedWrites,
        seen: Arc<Mutex<Vec<usize>>>,
    }

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.seen.lock().unwrap().push(self.out.bytes.lock().unwrap().len());
            let Some(mut c) = self.chunks.pop_front() else { return Ok(0) };
            let n = c.len().min(buf.len());
            buf[..n].copy_from_slice(&c[..n]);
            if n < c.len() {
                self.chunks.push_front(c.split_off(n));
            }
            Ok(n)
        }
    }

    /// A writer that counts its write calls.
    #[derive(Clone, Default)]
    struct CountedWrites {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
    }

    impl Write for CountedWrites {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.bytes.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn replies_to_requests_read_together_leave_together_before_the_server_waits() {
        let (ex, _) = exports(1 << 20);
        let batch = |first: u64| -> Vec<u8> {
            let mut v = Vec::new();
            for h in first..first + 8 {
                v.extend(request(CMD_WRITE, 0, h, h * 512, 512));
                v.extend_from_slice(&[h as u8; 512]);
            }
            v
        };
        // The second batch's last write arrives in two pieces.
        let mut second = batch(8);
        let tail = second.split_off(second.len() - 100);
        let mut last = tail;
        last.extend(request(CMD_DISC, 0, 99, 0, 0));
        let out = CountedWrites::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let input = Chunks { chunks: [batch(0), second, last].into(), out: out.clone(), seen: seen.clone() };
        let progress = Arc::new(Progress::default());
        transmit_with(input, out.clone(), ex[0].device.clone(), false, 0, progress.clone()).unwrap();
        let reply = size_of::<SimpleReply>();
        let replies = simple_errors(&out.bytes.lock().unwrap());
        assert_eq!(replies, (0..16).map(|h| (h, 0)).collect::<Vec<_>>());
        assert_eq!(progress.unanswered(), 0);
        // Before each read that could wait for the client, every reply owed
        // had gone out: none before the first, the first batch's eight
        // before the second, seven more before the rest of the last write.
        assert_eq!(seen.lock().unwrap()[..3], [0, 8 * reply, 15 * reply]);
        // Three sends for sixteen replies.
        assert_eq!(out.writes.load(Ordering::SeqCst), 3);
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
        // Past the end: writes get ENOSPC, reads and trims EINVAL.
        input.extend(request(CMD_WRITE_ZEROES, 0, 14, (1 << 20) - 1, 2));
        input.extend(request(CMD_TRIM, 0, 15, 1 << 20, 1));
        input.extend(request(CMD_WRITE, 0, 16, u64::MAX, 1));
        input.push(b'!');
        input.extend(request(CMD_DISC, 0, 10, 0, 0));
        input.extend(request(CMD_FLUSH, 0, 11, 0, 0)); // after DISC: never served
        let out = Shared::default();
        let progress = Arc::new(Progress::default());
        let stats = transmit_with(&input[..], out.clone(), ex[0].device.clone(), false, 0, progress.clone()).unwrap();
        assert_eq!(stats.requests, 16);
        // Every request but DISC called for a reply, and got it.
        assert_eq!((progress.received(), progress.answered(), progress.unanswered()), (15, 15, 0));
        let replies = simple_errors(&out.bytes());
        assert_eq!(
            replies,
            vec![
                (1, 0),
                (2, ENOSPC),
                (3, EINVAL),
                (4, EINVAL),
                (5, EINVAL),
                (6, EINVAL),
                (7, 0),
                (8, 0),
                (9, 0),
                (100, 0),
                (12, 0),
                (13, 0),
                (14, ENOSPC),
                (15, EINVAL),
                (16, ENOSPC)
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
        assert!(
            matches!(r, Err(NbdError::Protocol(Violation::WriteTooLarge { length })) if length == u64::from(MAX_REQUEST) + 1)
        );
        assert_eq!(simple_errors(&out.bytes()), vec![(1, EINVAL)]);
        let r = transmit(&[0u8; 28][..], Shared::default(), ex[0].device.clone(), false, 2);
        assert!(matches!(r, Err(NbdError::Protocol(Violation::RequestMagic { found: 0 }))));
    }

    /// A device whose requests of kind `slow` at offset 0 take 200 ms; they
    /// may block, so they run on workers.
    struct Slow {
        mem: MemDevice,
        slow: u16,
    }

    impl Slow {
        fn wait(&self, kind: u16, off: u64) {
            if kind == self.slow && off == 0 {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }

    impl BlockDevice for Slow {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
            self.wait(CMD_READ, off);
            self.mem.read(off, buf)
        }
        fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
            self.wait(CMD_WRITE, off);
            self.mem.write(off, data, fua)
        }
        fn flush(&self) -> Result<(), DevError> {
            self.mem.flush()
        }
        fn trim(&self, off: u64, len: u64) -> Result<(), DevError> {
            self.mem.trim(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError> {
            self.mem.write_zeroes(off, len, fua)
        }
        fn read_may_block(&self, off: u64, _len: u64) -> bool {
            self.slow == CMD_READ && off == 0
        }
        fn write_may_block(&self, _off: u64, _len: u64, _fua: bool) -> bool {
            self.slow == CMD_WRITE
        }
    }

    #[test]
    fn slow_reads_reply_out_of_order() {
        let dev: Arc<dyn BlockDevice> = Arc::new(Slow { mem: MemDevice::new(1 << 20), slow: CMD_READ });
        let mut input = request(CMD_READ, 0, 1, 0, 16);
        input.extend(request(CMD_WRITE, 0, 2, 4096, 2));
        input.extend_from_slice(b"hi");
        input.extend(request(CMD_READ, 0, 3, 4096, 2));
        let out = Shared::default();
        transmit(&input[..], out.clone(), dev, false, 2).unwrap();
        let out = out.bytes();
        let handle = |at: usize| SimpleReply::read_from_bytes(&out[at..at + 16]).unwrap().handle.get();
        // The write and the fast read reply while the slow read waits.
        assert_eq!((handle(0), handle(16), handle(34)), (2, 3, 1));
        assert_eq!(&out[32..34], b"hi");
    }

    #[test]
    fn writes_that_may_block_run_side_by_side() {
        let mem = Arc::new(Slow { mem: MemDevice::new(1 << 20), slow: CMD_WRITE });
        let dev: Arc<dyn BlockDevice> = mem.clone();
        let mut input = request(CMD_WRITE, 0, 1, 0, 2);
        input.extend_from_slice(b"ab");
        input.extend(request(CMD_WRITE, 0, 2, 4096, 2));
        input.extend_from_slice(b"cd");
        let out = Shared::default();
        transmit(&input[..], out.clone(), dev, false, 2).unwrap();
        let out = out.bytes();
        let handle = |at: usize| SimpleReply::read_from_bytes(&out[at..at + 16]).unwrap().handle.get();
        // The fast write replies while the slow one waits; both land.
        assert_eq!((handle(0), handle(16)), (2, 1));
        let mut b = [0u8; 2];
        mem.mem.read(0, &mut b).unwrap();
        assert_eq!(&b, b"ab");
        mem.mem.read(4096, &mut b).unwrap();
        assert_eq!(&b, b"cd");
    }

    /// A client that went away: every write fails.
    struct Gone;

    impl Write for Gone {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A device whose reads may block (they go to workers) and are counted.
    #[derive(Debug)]
    struct Counting {
        mem: MemDevice,
        reads: AtomicU64,
    }

    impl BlockDevice for Counting {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.mem.read(off, buf)
        }
        fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
            self.mem.write(off, data, fua)
        }
        fn flush(&self) -> Result<(), DevError> {
            self.mem.flush()
        }
        fn trim(&self, off: u64, len: u64) -> Result<(), DevError> {
            self.mem.trim(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError> {
            self.mem.write_zeroes(off, len, fua)
        }
    }

    #[test]
    fn requests_left_after_a_failed_reply_are_dropped() {
        let dev = Arc::new(Counting { mem: MemDevice::new(1 << 20), reads: AtomicU64::new(0) });
        let input: Vec<u8> = (0..5).flat_map(|h| request(CMD_READ, 0, h, 0, 512)).collect();
        let progress = Arc::new(Progress::default());
        // One worker: the reads run one after another.
        let r = transmit_with(&input[..], Gone, dev.clone(), false, 1, progress.clone());
        // The reader may see the end of its input or the failure first.
        assert!(matches!(r, Ok(_) | Err(NbdError::Protocol(Violation::ReplyFailed))), "{r:?}");
        assert_eq!(progress.answered(), 0);
        assert!(progress.received() >= 1 && progress.unanswered() == progress.received());
        // The first read ran and its reply failed; the others were dropped
        // rather than run for nobody.
        assert_eq!(dev.reads.load(Ordering::SeqCst), 1);
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
        let out = out.bytes();
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0, 1, 0, 1]); // DONE, OFFSET_DATA
        assert_eq!(&out[16..20], &13u32.to_be_bytes());
        assert_eq!(&out[20..28], &0u64.to_be_bytes());
        assert_eq!(&out[28..33], b"hello");
        let e = &out[33..];
        assert_eq!(&e[4..8], &[0, 1, 0x80, 1]); // DONE, ERROR
        assert_eq!(&e[20..24], &EINVAL.to_be_bytes());
        let len = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert_eq!(&e[16..20], &(6 + len as u32).to_be_bytes());
        assert!(String::from_utf8_lossy(&e[26..26 + len]).contains("pass the end"));
        // A zero-length read succeeds with a NONE chunk: OFFSET_DATA needs data.
        let z = &e[26 + len..];
        assert_eq!(z.len(), 20);
        assert_eq!(&z[4..8], &[0, 1, 0, 0]); // DONE, NONE
        assert_eq!(&z[8..16], &9u64.to_be_bytes());
        assert_eq!(&z[16..20], &0u32.to_be_bytes());
    }

    /// A device whose first half is a hole, for block status.
    struct Half(MemDevice);

    impl BlockDevice for Half {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
            self.0.read(off, buf)
        }
        fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
            self.0.write(off, data, fua)
        }
        fn flush(&self) -> Result<(), DevError> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> Result<(), DevError> {
            Ok(())
        }
        fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> Result<(), DevError> {
            self.0.write_zeroes(off, len, fua)
        }
        fn extents(&self, off: u64, len: u64) -> Result<Vec<Extent>, DevError> {
            let half = self.size() / 2;
            let mut v = Vec::new();
            if off < half {
                v.push(Extent { len: half - off, flags: STATE_HOLE | STATE_ZERO });
            }
            v.push(Extent { len: (off + len).saturating_sub(half.max(off)), flags: 0 });
            Ok(v)
        }
    }

    /// Extended headers: 32-byte requests with 64-bit lengths, and every
    /// reply an extended chunk, block status with 64-bit extents.
    #[test]
    fn extended_headers_and_block_status() {
        let dev: Arc<dyn BlockDevice> = Arc::new(Half(MemDevice::new(1 << 20)));
        let framing = Framing { structured: true, extended: true, block_status: true };
        let ext = encode_extended_request;
        // qemu's writes carry no PAYLOAD_LEN; libnbd's do: both work.
        let mut input = ext(CMD_WRITE, 0, 1, 4096, 5);
        input.extend_from_slice(b"hello");
        input.extend(ext(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 2, 8192, 3));
        input.extend_from_slice(b"abc");
        input.extend(ext(CMD_READ, 0, 3, 4096, 5));
        input.extend(ext(CMD_BLOCK_STATUS, 0, 4, 0, 1 << 20));
        input.extend(ext(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5, 0, 1 << 20));
        // A trim longer than 4 GiB is a legal request (and past the end here).
        input.extend(ext(CMD_TRIM, 0, 6, 0, 5 << 30));
        // A payload on a flush is read and refused; the connection goes on.
        input.extend(ext(CMD_FLUSH, CMD_FLAG_PAYLOAD_LEN, 7, 0, 2));
        input.extend_from_slice(b"xx");
        input.extend(ext(CMD_FLUSH, 0, 8, 0, 0));
        input.extend(ext(CMD_DISC, 0, 9, 0, 0));
        let out = Shared::default();
        transmit(&input[..], out.clone(), dev, framing, 0).unwrap();
        let out = out.bytes();
        let mut chunks = Vec::new();
        let mut rest = &out[..];
        while let Ok((h, tail)) = ExtendedReplyHeader::read_from_prefix(rest) {
            assert_eq!(h.magic.get(), EXTENDED_REPLY_MAGIC);
            assert_eq!(h.flags.get(), REPLY_FLAG_DONE);
            let (payload, tail) = tail.split_at(h.length.get() as usize);
            chunks.push((h.handle.get(), h.kind.get(), h.offset.get(), payload.to_vec()));
            rest = tail;
        }
        assert!(rest.is_empty(), "only extended replies");
        let kinds: Vec<(u64, u16)> = chunks.iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (1, REPLY_TYPE_NONE),
                (2, REPLY_TYPE_NONE),
                (3, REPLY_TYPE_OFFSET_DATA),
                (4, REPLY_TYPE_BLOCK_STATUS_EXT),
                (5, REPLY_TYPE_BLOCK_STATUS_EXT),
                (6, REPLY_TYPE_ERROR),
                (7, REPLY_TYPE_ERROR),
                (8, REPLY_TYPE_NONE),
            ]
        );
        assert_eq!(chunks[2].2, 4096, "the request's offset");
        assert_eq!(&chunks[2].3[..], &[&4096u64.to_be_bytes()[..], b"hello"].concat()[..]);
        let status = |p: &[u8]| -> (u32, u32, Vec<(u64, u64)>) {
            let id = u32::from_be_bytes(p[..4].try_into().unwrap());
            let n = u32::from_be_bytes(p[4..8].try_into().unwrap());
            let d = p[8..]
                .chunks(16)
                .map(|c| {
                    (u64::from_be_bytes(c[..8].try_into().unwrap()), u64::from_be_bytes(c[8..].try_into().unwrap()))
                })
                .collect();
            (id, n, d)
        };
        let hole = u64::from(STATE_HOLE | STATE_ZERO);
        assert_eq!(status(&chunks[3].3), (BASE_ALLOCATION_ID, 2, vec![(1 << 19, hole), (1 << 19, 0)]));
        assert_eq!(status(&chunks[4].3), (BASE_ALLOCATION_ID, 1, vec![(1 << 19, hole)]));
        assert_eq!(&chunks[5].3[..4], &EINVAL.to_be_bytes());
    }

    /// Compact block status: 32-bit extents; refused unless a context was
    /// selected.
    #[test]
    fn block_status_compact_and_refused_without_a_context() {
        let dev: Arc<dyn BlockDevice> = Arc::new(Half(MemDevice::new(1 << 20)));
        let input = request(CMD_BLOCK_STATUS, 0, 1, 1 << 18, 1 << 19);
        let out = Shared::default();
        let framing = Framing { structured: true, extended: false, block_status: true };
        transmit(&input[..], out.clone(), dev.clone(), framing, 0).unwrap();
        let out = out.bytes();
        let h = StructuredReplyHeader::read_from_prefix(&out).unwrap().0;
        assert_eq!((h.kind.get(), h.length.get()), (REPLY_TYPE_BLOCK_STATUS, 4 + 16));
        let p = &out[20..];
        assert_eq!(&p[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&p[4..8], &(1u32 << 18).to_be_bytes());
        assert_eq!(&p[8..12], &(STATE_HOLE | STATE_ZERO).to_be_bytes());
        assert_eq!(&p[12..16], &(1u32 << 18).to_be_bytes());
        assert_eq!(&p[16..20], &0u32.to_be_bytes());
        let out = Shared::default();
        transmit(&input[..], out.clone(), dev, true, 0).unwrap();
        let out = out.bytes();
        assert_eq!(&out[4..8], &[0, 1, 0x80, 1], "an error chunk");
        assert_eq!(&out[20..24], &EINVAL.to_be_bytes());
    }
}
