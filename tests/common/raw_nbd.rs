//! A raw NBD client, written from the protocol's text, for what real
//! clients will not do: send requests and never read the replies, or send
//! a request past the end of an export (which they refuse themselves) to
//! see the server's errno.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// A connection in transmission, without structured replies.
pub struct RawClient {
    pub sock: UnixStream,
    /// The export's size, as the server announced it.
    pub size: u64,
}

impl RawClient {
    /// Connects to `socket` and picks `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> RawClient {
        let mut sock = UnixStream::connect(socket).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello).unwrap();
        assert_eq!(hello[..8], NBDMAGIC.to_be_bytes());
        assert_eq!(hello[8..16], IHAVEOPT.to_be_bytes());
        // Fixed newstyle, no zeroes.
        sock.write_all(&3u32.to_be_bytes()).unwrap();
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes()); // no information requests
        let mut option = IHAVEOPT.to_be_bytes().to_vec();
        option.extend(OPT_GO.to_be_bytes());
        option.extend((data.len() as u32).to_be_bytes());
        option.extend(data);
        sock.write_all(&option).unwrap();
        let mut size = None;
        loop {
            let mut header = [0u8; 20];
            sock.read_exact(&mut header).unwrap();
            let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
            let mut reply = vec![0u8; u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize];
            sock.read_exact(&mut reply).unwrap();
            match kind {
                REP_ACK => break,
                // NBD_INFO_EXPORT: the size, then the flags.
                REP_INFO if reply[..2] == [0, 0] => size = Some(u64::from_be_bytes(reply[2..10].try_into().unwrap())),
                REP_INFO => {}
                _ => panic!("NBD_OPT_GO refused ({kind:#x}): {}", String::from_utf8_lossy(&reply)),
            }
        }
        RawClient { sock, size: size.expect("no NBD_INFO_EXPORT") }
    }

    /// The bytes of a request and its payload.
    pub fn request(kind: u16, handle: u64, off: u64, len: u32, payload: &[u8]) -> Vec<u8> {
        Self::request_with(kind, 0, handle, off, len, payload)
    }

    /// [`RawClient::request`] with command flags.
    pub fn request_with(kind: u16, flags: u16, handle: u64, off: u64, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend(flags.to_be_bytes());
        r.extend(kind.to_be_bytes());
        r.extend(handle.to_be_bytes());
        r.extend(off.to_be_bytes());
        r.extend(len.to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    /// Sends a request (with a write's payload).
    pub fn send(&mut self, kind: u16, handle: u64, off: u64, len: u32, payload: &[u8]) {
        self.sock.write_all(&Self::request(kind, handle, off, len, payload)).unwrap();
    }

    /// Reads the header of a simple reply: its errno and handle. The data
    /// of a successful read follows; reading it is the caller's business.
    pub fn reply(&mut self) -> (u32, u64) {
        self.try_reply().expect("a reply")
    }

    /// [`RawClient::reply`], or `None` once the connection has ended.
    pub fn try_reply(&mut self) -> Option<(u32, u64)> {
        let mut r = [0u8; 16];
        self.sock.read_exact(&mut r).ok()?;
        assert_eq!(r[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        Some((u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap())))
    }
}
