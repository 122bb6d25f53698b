//! What travels on the socket: the protocol's constants, and every fixed
//! header as a `#[repr(C)]` struct of network-byte-order fields, so that a
//! header's layout is its own documentation and building or parsing one is
//! a copy, never a sequence of `to_be_bytes` calls to keep in step.
//!
//! Every field type has alignment 1 and every bit pattern is valid, so any
//! byte string of the right length is a header: a header is read whole with
//! [`read_header`], and only its magic needs checking. Variable-length
//! option data is parsed from a byte slice with the `read_from_prefix`
//! family, each short or odd length a [`Violation`] that names it.

use std::io::{self, Read};

use static_assertions::const_assert_eq;
use zerocopy::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::error::Violation;

/// `NBDMAGIC`: the first eight bytes a server sends.
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
/// Extended request magic (64-bit lengths, `NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Extended reply magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

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
/// Starts TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Export information.
pub const OPT_INFO: u32 = 6;
/// Export information, then transmission.
pub const OPT_GO: u32 = 7;
/// Structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Lists metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Selects metadata contexts (`base:allocation`).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Extended headers: 64-bit lengths in requests and replies.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// An export in reply to `LIST`.
pub const REP_SERVER: u32 = 2;
/// Information in reply to `INFO`/`GO`.
pub const REP_INFO: u32 = 3;
/// A metadata context, in reply to `LIST_META_CONTEXT`/`SET_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Errors.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Not allowed by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// TLS must be started first.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option data too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
/// Extended headers are in use (a `STRUCTURED_REPLY` after them).
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

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
/// `NBD_CMD_CACHE` supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` understood (answered `ENOTSUP` when zeroing is
/// not faster than writing).
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Transmission flags of every export.
pub const TRANSMISSION_FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_CAN_MULTI_CONN
    | TF_SEND_CACHE
    | TF_SEND_FAST_ZERO;

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
/// Prefetch into the cache: read, and keep what was read, replying no data.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status of a range, in the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not punch holes (write zeroes).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: block status of the first extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: zero only if that is faster than writing zeros, else fail
/// at once with `ENOTSUP` (write zeroes).
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended requests): the length is the payload's.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply chunk: nothing (a successful reply without data).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Block status extents with 32-bit lengths.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status extents with 64-bit lengths (extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id on every connection.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// An error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Errors (errno values of the protocol).
pub const EIO: u32 = 5;
/// Invalid request.
pub const EINVAL: u32 = 22;
/// No space.
pub const ENOSPC: u32 = 28;
/// Not supported (a fast zero this server cannot promise).
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest request the server takes.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Smallest block size: any byte range may be asked for.
pub const MIN_BLOCK: u32 = 1;
/// Preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Zero bytes that follow [`ExportNameReply`] unless the client set
/// [`FLAG_C_NO_ZEROES`] (the old handshake's reserved field).
pub const EXPORT_NAME_PADDING: usize = 124;
/// Longest error message sent in a structured error chunk.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// The server's greeting, the first bytes on a connection.
///
/// ```text
/// 0        8        16   18
/// NBDMAGIC IHAVEOPT flags
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ServerHello {
    /// [`NBDMAGIC`].
    pub magic: U64,
    /// [`IHAVEOPT`]: fixed newstyle.
    pub option_magic: U64,
    /// `FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES`.
    pub flags: U16,
}

/// An option the client sends, before its `length` bytes of data.
///
/// ```text
/// 0        8      12     16
/// IHAVEOPT option length
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionHeader {
    /// [`IHAVEOPT`].
    pub magic: U64,
    /// `OPT_*`.
    pub option: U32,
    /// Bytes of data that follow.
    pub length: U32,
}

/// The server's reply to an option, before its `length` bytes of data.
///
/// ```text
/// 0         8      12   16     20
/// REP_MAGIC option kind length
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionReplyHeader {
    /// [`REP_MAGIC`].
    pub magic: U64,
    /// The option replied to.
    pub option: U32,
    /// `REP_*`.
    pub kind: U32,
    /// Bytes of data that follow.
    pub length: U32,
}

/// The reply to `NBD_OPT_EXPORT_NAME`, followed by
/// [`EXPORT_NAME_PADDING`] zero bytes unless the client said no zeroes.
///
/// ```text
/// 0    8     10
/// size flags
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExportNameReply {
    /// The export's size in bytes.
    pub size: U64,
    /// [`TRANSMISSION_FLAGS`].
    pub flags: U16,
}

/// `NBD_INFO_EXPORT`: the data of a `REP_INFO` reply.
///
/// ```text
/// 0    2    10    12
/// info size flags
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoExport {
    /// [`INFO_EXPORT`].
    pub info: U16,
    /// The export's size in bytes.
    pub size: U64,
    /// [`TRANSMISSION_FLAGS`].
    pub flags: U16,
}

/// `NBD_INFO_BLOCK_SIZE`: the data of a `REP_INFO` reply.
///
/// ```text
/// 0    2       6         10      14
/// info minimum preferred maximum
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoBlockSize {
    /// [`INFO_BLOCK_SIZE`].
    pub info: U16,
    /// [`MIN_BLOCK`].
    pub minimum: U32,
    /// [`PREFERRED_BLOCK`].
    pub preferred: U32,
    /// [`MAX_REQUEST`].
    pub maximum: U32,
}

/// A request of the transmission phase, before a write's payload.
///
/// ```text
/// 0             4     6    8      16     24     28
/// REQUEST_MAGIC flags kind handle offset length
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    /// [`REQUEST_MAGIC`].
    pub magic: U32,
    /// `CMD_FLAG_*`.
    pub flags: U16,
    /// `CMD_*`.
    pub kind: U16,
    /// The client's cookie, echoed in the reply.
    pub handle: U64,
    /// Offset in the export.
    pub offset: U64,
    /// Length in bytes.
    pub length: U32,
}

/// An extended request (after `NBD_OPT_EXTENDED_HEADERS`), before a
/// payload of `length` bytes if its flags say `PAYLOAD_LEN`.
///
/// ```text
/// 0                      4     6    8      16     24
/// EXTENDED_REQUEST_MAGIC flags kind cookie offset length (64 bits)
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExtendedRequestHeader {
    /// [`EXTENDED_REQUEST_MAGIC`].
    pub magic: U32,
    /// `CMD_FLAG_*`.
    pub flags: U16,
    /// `CMD_*`.
    pub kind: U16,
    /// The client's cookie.
    pub handle: U64,
    /// Offset in the export.
    pub offset: U64,
    /// Effect length, or payload length with `PAYLOAD_LEN`.
    pub length: U64,
}

/// An extended reply chunk, before its `length` bytes of payload: every
/// reply once extended headers are in use.
///
/// ```text
/// 0                    4     6    8      16     24
/// EXTENDED_REPLY_MAGIC flags kind cookie offset length (64 bits)
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExtendedReplyHeader {
    /// [`EXTENDED_REPLY_MAGIC`].
    pub magic: U32,
    /// `REPLY_FLAG_*`.
    pub flags: U16,
    /// `REPLY_TYPE_*`.
    pub kind: U16,
    /// The request's cookie.
    pub handle: U64,
    /// The request's offset.
    pub offset: U64,
    /// Bytes of payload that follow.
    pub length: U64,
}

/// A simple reply, before a successful read's data.
///
/// ```text
/// 0                  4     8      16
/// SIMPLE_REPLY_MAGIC error handle
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SimpleReply {
    /// [`SIMPLE_REPLY_MAGIC`].
    pub magic: U32,
    /// 0, or the errno of the failure.
    pub error: U32,
    /// The request's handle.
    pub handle: U64,
}

/// A structured reply chunk, before its `length` bytes of payload.
///
/// ```text
/// 0                      4     6    8      16     20
/// STRUCTURED_REPLY_MAGIC flags kind handle length
/// ```
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct StructuredReplyHeader {
    /// [`STRUCTURED_REPLY_MAGIC`].
    pub magic: U32,
    /// `REPLY_FLAG_*`.
    pub flags: U16,
    /// `REPLY_TYPE_*`.
    pub kind: U16,
    /// The request's handle.
    pub handle: U64,
    /// Bytes of payload that follow.
    pub length: U32,
}

/// An `OFFSET_DATA` chunk up to its data: the chunk header and the offset
/// the data belongs at.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OffsetDataHeader {
    /// Its header, of kind [`REPLY_TYPE_OFFSET_DATA`].
    pub chunk: StructuredReplyHeader,
    /// Offset of the data in the export.
    pub offset: U64,
}

/// An `ERROR` chunk up to its message: the chunk header, the errno and the
/// message's length.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorChunkHeader {
    /// Its header, of kind [`REPLY_TYPE_ERROR`].
    pub chunk: StructuredReplyHeader,
    /// The errno.
    pub error: U32,
    /// Bytes of message that follow.
    pub message_length: U16,
}

const_assert_eq!(size_of::<ServerHello>(), 18);
const_assert_eq!(size_of::<OptionHeader>(), 16);
const_assert_eq!(size_of::<OptionReplyHeader>(), 20);
const_assert_eq!(size_of::<ExportNameReply>(), 10);
const_assert_eq!(size_of::<InfoExport>(), 12);
const_assert_eq!(size_of::<InfoBlockSize>(), 14);
const_assert_eq!(size_of::<RequestHeader>(), 28);
const_assert_eq!(size_of::<SimpleReply>(), 16);
const_assert_eq!(size_of::<StructuredReplyHeader>(), 20);
const_assert_eq!(size_of::<OffsetDataHeader>(), 28);
const_assert_eq!(size_of::<ErrorChunkHeader>(), 26);
const_assert_eq!(size_of::<ExtendedRequestHeader>(), 32);
const_assert_eq!(size_of::<ExtendedReplyHeader>(), 32);

/// Reads one whole header of type `H`.
pub fn read_header<H: FromBytes + IntoBytes, R: Read>(r: &mut R) -> io::Result<H> {
    let mut h = H::new_zeroed();
    r.read_exact(h.as_mut_bytes())?;
    Ok(h)
}

/// A request of the transmission phase, its header checked.
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
    /// Length (the effect length; a write's payload length).
    pub length: u64,
}

impl RequestHeader {
    /// The header of a request.
    pub fn new(kind: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Self {
        Self {
            magic: REQUEST_MAGIC.into(),
            flags: flags.into(),
            kind: kind.into(),
            handle: handle.into(),
            offset: offset.into(),
            length: length.into(),
        }
    }

    /// The request, if the magic is right.
    pub fn parse(&self) -> Result<Request, Violation> {
        let magic = self.magic.get();
        if magic != REQUEST_MAGIC {
            return Err(Violation::RequestMagic { found: magic });
        }
        Ok(Request {
            flags: self.flags.get(),
            kind: self.kind.get(),
            handle: self.handle.get(),
            offset: self.offset.get(),
            length: u64::from(self.length.get()),
        })
    }
}

impl ExtendedRequestHeader {
    /// The request, if the magic is right.
    pub fn parse(&self) -> Result<Request, Violation> {
        let magic = self.magic.get();
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(Violation::RequestMagic { found: magic });
        }
        Ok(Request {
            flags: self.flags.get(),
            kind: self.kind.get(),
            handle: self.handle.get(),
            offset: self.offset.get(),
            length: self.length.get(),
        })
    }
}

/// The bytes of an extended request header.
pub fn encode_extended_request(kind: u16, flags: u16, handle: u64, offset: u64, length: u64) -> Vec<u8> {
    ExtendedRequestHeader {
        magic: EXTENDED_REQUEST_MAGIC.into(),
        flags: flags.into(),
        kind: kind.into(),
        handle: handle.into(),
        offset: offset.into(),
        length: length.into(),
    }
    .as_bytes()
    .to_vec()
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`:
///
/// ```text
/// 0           4          4+n     6+n
/// name length name (n bytes) count info types (count × u16)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export's name (empty: the default export).
    pub name: &'a [u8],
    /// The `INFO_*` types the client asked for.
    pub infos: &'a [U16],
}

impl<'a> InfoRequest<'a> {
    /// Parses the option's data: every byte must belong to it.
    pub fn parse(data: &'a [u8]) -> Result<Self, Violation> {
        let malformed = |why| Violation::InfoRequest { why };
        let (name_len, rest) = U32::read_from_prefix(data).map_err(|_| malformed("no name length"))?;
        let name_len = usize::try_from(name_len.get()).map_err(|_| malformed("name past the end"))?;
        let (name, rest) = rest.split_at_checked(name_len).ok_or(malformed("name past the end"))?;
        let (count, rest) = U16::read_from_prefix(rest).map_err(|_| malformed("no count of info types"))?;
        let infos = <[U16]>::ref_from_bytes(rest).map_err(|_| malformed("odd length of info types"))?;
        if infos.len() != usize::from(count.get()) {
            return Err(malformed("info types other than counted"));
        }
        Ok(Self { name, infos })
    }

    /// Whether the client asked for `info`.
    pub fn wants(&self, info: u16) -> bool {
        self.infos.iter().any(|i| i.get() == info)
    }
}

/// The bytes a client sends for option `kind` with `data` (the server's
/// counterpart of [`negotiate`](super::negotiate); for tests, fuzz seeds and
/// tools).
pub fn encode_option(kind: u32, data: &[u8]) -> Vec<u8> {
    let header = OptionHeader { magic: IHAVEOPT.into(), option: kind.into(), length: (data.len() as u32).into() };
    [header.as_bytes(), data].concat()
}

/// The bytes of a request header (the client's side of a request).
pub fn encode_request(kind: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    RequestHeader::new(kind, flags, handle, offset, length).as_bytes().to_vec()
}

/// The server's greeting: fixed newstyle, no zeroes.
pub fn encode_hello() -> Vec<u8> {
    ServerHello {
        magic: NBDMAGIC.into(),
        option_magic: IHAVEOPT.into(),
        flags: (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).into(),
    }
    .as_bytes()
    .to_vec()
}

/// The bytes of an option reply of `kind` to `option`, with `data` (the
/// server's side of [`encode_option`]).
pub fn encode_option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let header =
        OptionReplyHeader { magic: REP_MAGIC.into(), option: option.into(), kind: kind.into(), length: len.into() };
    [header.as_bytes(), data].concat()
}

/// The bytes of a simple reply (before a read's data).
pub fn encode_simple_reply(error: u32, handle: u64) -> Vec<u8> {
    SimpleReply { magic: SIMPLE_REPLY_MAGIC.into(), error: error.into(), handle: handle.into() }.as_bytes().to_vec()
}

/// The bytes of a structured reply chunk with `payload` (for tests, fuzz
/// seeds and tools; the server writes its chunks in place).
pub fn encode_chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let header = StructuredReplyHeader {
        magic: STRUCTURED_REPLY_MAGIC.into(),
        flags: flags.into(),
        kind: kind.into(),
        handle: handle.into(),
        length: len.into(),
    };
    [header.as_bytes(), payload].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_and_a_bad_magic_is_named() {
        let bytes = encode_request(CMD_WRITE, CMD_FLAG_FUA, 7, 1 << 40, 512);
        assert_eq!(&bytes[..4], &REQUEST_MAGIC.to_be_bytes());
        let h = RequestHeader::read_from_bytes(&bytes).unwrap();
        let want = Request { flags: CMD_FLAG_FUA, kind: CMD_WRITE, handle: 7, offset: 1 << 40, length: 512 };
        let ext = encode_extended_request(CMD_WRITE, CMD_FLAG_FUA, 7, 1 << 40, 512);
        assert_eq!(ExtendedRequestHeader::read_from_bytes(&ext).unwrap().parse(), Ok(want.clone()));
        assert_eq!(h.parse(), Ok(want));
        let h = RequestHeader::read_from_bytes(&[0xab; 28][..]).unwrap();
        assert_eq!(h.parse(), Err(Violation::RequestMagic { found: 0xabab_abab }));
        assert!(RequestHeader::read_from_bytes(&bytes[..27]).is_err(), "one byte short");
    }

    #[test]
    fn info_requests_take_exactly_their_bytes() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = InfoRequest::parse(&d).unwrap();
        assert_eq!(r.name, b"disk");
        assert!(r.wants(INFO_NAME) && r.wants(INFO_BLOCK_SIZE) && !r.wants(INFO_DESCRIPTION));
        for short in 0..d.len() {
            assert!(InfoRequest::parse(&d[..short]).is_err(), "{short} bytes");
        }
        let mut long = d.clone();
        long.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert!(InfoRequest::parse(&long).is_err(), "a type more than counted");
        long.push(0);
        assert!(InfoRequest::parse(&long).is_err(), "an odd byte");
        let huge = [0xff, 0xff, 0xff, 0xff, 0, 0];
        assert!(InfoRequest::parse(&huge).is_err(), "a name longer than the data");
        let empty = [0, 0, 0, 0, 0, 0];
        assert_eq!(InfoRequest::parse(&empty).unwrap(), InfoRequest { name: b"", infos: &[] });
    }
}
